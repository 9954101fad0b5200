"""The unedited start of a forward pass, computed once per held-out sample while α is chosen.

Choosing α scores every candidate edit by forward passes over the same held-out samples. The
modules at the start of the forward pass that hold no edited weight (a CNN's stem, whose first
conv the search leaves unchanged, with its batch norm, activation and pooling; a ViT's patch
embedding) give the same output under every candidate. :func:`find_prefix` finds that chain from
one traced forward pass; :class:`FrozenPrefix` keeps the chain's output for each held-out sample
and, while scoring, stands in for the chain's modules: the last returns the kept output, the
others an empty tensor, so none of them computes. On the suite's SmallCNN the stem at 28×28 is
about half of each forward pass.

The chain is found by identity: the first module called on the model's input, then each module
called on the previous one's output, each called once and holding no edited parameter; a module
that holds an edited parameter is looked into, any other call ends the chain. Whatever the model
does between the calls is kept in the kept output, and :func:`find_prefix` only returns a chain
whose stand-ins give exactly the model's own output on a batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# The held-out samples' kept outputs stay on the model's device below this size (ViT-B/16's patch
# embedding in bf16 for 1,250 held-out images: 376 MiB); above it the search runs whole passes.
PREFIX_CACHE_BYTES = 512 << 20
# Kept images (N, C, H, W) on the CPU are stored channels-last, so the convolutions and pooling after
# them run channels-last: 1.5x faster on the suite's SmallCNN after its stem (NCHW max pooling is ~5x
# slower). Their outputs then match whole passes to rounding, not bit for bit (checked, below).
CHANNELS_LAST_ON_CPU = True


def _chain(model: nn.Module, x: torch.Tensor, edited: set[int],
           run: Callable[[torch.Tensor], object]) -> list[tuple[nn.Module, torch.Tensor]]:
    """``(module, output)`` of the chain on ``x``, in call order (see the module's docstring)."""
    calls: list[list] = []  # [module, first argument, output, depth]
    open_calls: list[int] = []

    def before(module: nn.Module, args: tuple) -> None:
        calls.append([module, args[0] if args else None, None, len(open_calls)])
        open_calls.append(len(calls) - 1)

    def after(module: nn.Module, args: tuple, out: object) -> None:
        calls[open_calls.pop()][2] = out

    modules = [m for m in model.modules() if m is not model]
    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        run(x)
    finally:
        for h in handles:
            h.remove()
    times_called: dict[int, int] = {}
    for module, *_ in calls:
        times_called[id(module)] = times_called.get(id(module), 0) + 1
    holds_edited = {id(m): any(id(p) in edited for p in m.parameters()) for m in modules}
    chain: list[tuple[nn.Module, torch.Tensor]] = []
    frontier, inside = x, None  # the last output of the chain; depth of the chain member being run
    for module, arg, out, depth in calls:
        if inside is not None and depth > inside:
            continue  # within a chain member
        inside = None
        if holds_edited[id(module)]:
            if any(True for _ in module.children()):
                continue  # look into it: its first children may still belong to the chain
            break
        if arg is not frontier or times_called[id(module)] != 1 or not isinstance(out, torch.Tensor):
            break
        chain.append((module, out))
        frontier, inside = out, depth
    return chain


@dataclass
class FrozenPrefix:
    """The chain's modules and the last one's output for each held-out sample, per source.

    Attributes:
        members: the chain's modules in call order.
        outputs: per source (a fold, the retain samples), the last member's output for each of its
            samples, ``(N, ...)`` on the model's device.
    """

    members: list[nn.Module]
    outputs: dict[object, torch.Tensor] = field(default_factory=dict)
    memory_format: torch.memory_format = torch.contiguous_format  # of kept images (N, C, H, W)
    composes: bool = False  # the members called one on the other's output give the kept output exactly
    input_format: torch.memory_format = torch.contiguous_format  # of 4-d inputs to each member in :meth:`keep_composed`
    _current: torch.Tensor | None = None

    def _stand_in(self, last: bool) -> Callable[..., torch.Tensor]:
        def forward(*args, **kwargs) -> torch.Tensor:
            return self._current.clone() if last else torch.empty(0)  # a clone: later modules may work in place
        return forward

    @contextmanager
    def standing_in(self) -> Iterator[None]:
        """The members' forwards replaced by stand-ins inside (restored after, even on error)."""
        own = [m.__dict__.get("forward") for m in self.members]
        for i, m in enumerate(self.members):
            m.forward = self._stand_in(i == len(self.members) - 1)
        try:
            yield
        finally:
            for m, f in zip(self.members, own):
                if f is None:
                    del m.forward
                else:
                    m.forward = f

    def kept(self, source: object, rows: torch.Tensor | slice) -> None:
        """The output the stand-ins give next: samples ``rows`` (indices or a slice) of ``source``."""
        self._current = self.outputs[source][rows]

    def _stored(self, out: torch.Tensor) -> torch.Tensor:
        """A copy of ``out`` to keep (later modules may work in place on it), images in :attr:`memory_format`."""
        return out.clone(memory_format=self.memory_format) if out.dim() == 4 else out.clone()

    def compose(self, x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """The members called one on the other's output, from the model's input ``x``; 4-d inputs
        to each member in ``memory_format`` (a 1-channel image is NCHW and channels-last at once, so
        the input's own layout would not carry over)."""
        for m in self.members:
            x = m(_in_format(x, memory_format))
        return x

    def keep_composed(self, source: object, xs: Sequence[torch.Tensor]) -> None:
        """Keep :meth:`compose` of each batch of ``xs`` as ``source``'s outputs (where :attr:`composes`):
        the rest of the model does not run."""
        self.outputs[source] = torch.cat([self._stored(self.compose(x, self.input_format)) for x in xs])

    @contextmanager
    def capturing(self, source: object, samples: int) -> Iterator[None]:
        """Keep the last member's outputs of the forward passes run inside as ``source``'s, where
        they come to ``samples`` rows (the passes ran over exactly the source's samples, in order,
        once); else keep nothing for it. The passes must run the model as :func:`find_prefix`'s
        ``run`` does (eval mode, no autograd, the same batches)."""
        kept: list[torch.Tensor] = []
        handle = self.members[-1].register_forward_hook(lambda module, args, out: kept.append(self._stored(out)))
        try:
            yield
        finally:
            handle.remove()
        if kept and sum(len(k) for k in kept) == samples:
            self.outputs[source] = torch.cat(kept)

    def capture(self, run: Callable[[torch.Tensor], torch.Tensor], source: object,
                xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``run`` (a whole forward pass) on each batch of ``xs``, keeping the last member's outputs
        as ``source``'s; returns ``run``'s results."""
        kept, results = [], []
        handle = self.members[-1].register_forward_hook(lambda module, args, out: kept.append(self._stored(out)))
        try:
            for x in xs:
                results.append(run(x))
        finally:
            handle.remove()
        self.outputs[source] = torch.cat(kept)
        return results


def find_prefix(model: nn.Module, x: torch.Tensor, edited: Sequence[nn.Parameter | torch.Tensor],
                run: Callable[[torch.Tensor], torch.Tensor], samples: int) -> FrozenPrefix | None:
    """The chain at the start of ``model``'s forward pass on ``x`` that holds none of ``edited``,
    or None: no such chain, the stand-ins do not give exactly ``run`` on ``x`` and on its first
    half (an output not per sample fails one of them), or keeping its output for
    ``samples`` samples would pass :data:`PREFIX_CACHE_BYTES`. ``run``: a whole forward pass of
    ``model`` (eval mode, no autograd), returning its output tensor."""
    chain = _chain(model, x, {id(p) for p in edited}, run)
    if not chain:
        return None
    out = chain[-1][1]
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        return None
    if out.element_size() * out[0].numel() * samples > PREFIX_CACHE_BYTES:
        return None
    prefix = FrozenPrefix([m for m, _ in chain])
    # two batch sizes: the kept output must be per sample along its first dimension (not, say, a
    # sequence-first tensor whose length happens to equal the batch)
    for batch in {x.shape[0], max(1, x.shape[0] // 2)}:
        if not _stands_in(prefix, run, x[:batch], exact=True):
            return None
    try:  # a plain chain of calls (no autocast, no arguments beside the previous output)
        prefix.composes = torch.equal(prefix.compose(x), out)
    except Exception:
        prefix.composes = False
    if CHANNELS_LAST_ON_CPU and out.dim() == 4 and out.device.type == "cpu":
        prefix.memory_format = torch.channels_last
        if not _stands_in(prefix, run, x, exact=False):  # e.g. a view() of the kept images
            prefix.memory_format = torch.contiguous_format
        elif prefix.composes and _close(prefix.compose(x, torch.channels_last), out):
            prefix.input_format = torch.channels_last  # the prefix's own convolutions and pooling channels-last too
    return prefix


def _in_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return x.contiguous(memory_format=memory_format) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to float32 rounding: 1e-4 relative, or 1e-5 of ``want``'s largest entry."""
    scale = want.abs().max().item()
    return torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-5 * scale)


def _stands_in(prefix: FrozenPrefix, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, exact: bool) -> bool:
    """Whether the stand-ins give ``run(x)`` from the kept outputs of ``x``: exactly, or to rounding
    (``exact=False``: a kept output in another memory format)."""
    try:
        want = prefix.capture(run, "check", [x])[0]
        if prefix.outputs["check"].shape[0] != x.shape[0]:
            return False
        prefix.kept("check", slice(0, x.shape[0]))
        with prefix.standing_in():
            got = run(x)
    except Exception:  # the stand-ins' empty outputs were used after all: not a prefix
        return False
    finally:
        prefix.outputs.clear()
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and got.shape == want.shape):
        return False
    return torch.equal(got, want) if exact else _close(got, want)
