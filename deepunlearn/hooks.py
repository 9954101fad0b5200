"""The hooks that feed every edited layer's input vectors into its statistics during a forward pass:
module hooks for ``Linear`` and conv layers, a ``TorchFunctionMode`` for weights applied through
``F.linear`` / ``F.conv*`` and for ``nn.MultiheadAttention``'s projections (:class:`Collector`).
"""
from __future__ import annotations

import inspect
import math
import weakref
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .ops.covariance import accumulate_conv_, accumulate_linear_
from .patches import ConvGeometry, conv_patches, linear_rows, patch_sums
from .inputs import token_positions
from .layers import EditTarget
from .moments import SampleRows, fold_rows
from .pixel_moments import accumulate_pixels_, add_patch_moment_, pixels_pay
from .statistics import SlotStatistics, Statistics
from .weight_side import vectors_pay

# Inputs of a conv slot held back, at most, before the compiled op sums them (elements; 64 MiB in float32).
PENDING_MAX_ELEMENTS = 1 << 24


class _HeldInputs:
    """A conv slot's inputs held back (copied) until one call of the compiled op sums them: every
    call also passes over all of the ``d × d`` sum, so inputs that bring fewer patches than ``d``
    wait until together they reach it (or :data:`PENDING_MAX_ELEMENTS`)."""

    def __init__(self, cov: torch.Tensor, geom: ConvGeometry, shape: torch.Size):
        self.cov, self.geom, self.shape = cov, geom, shape  # shape: (C, *spatial) of the inputs it takes
        self.inputs: list[torch.Tensor] = []
        self.patches = 0  # the patches they hold, per group

    def add(self, x: torch.Tensor, patches: int) -> bool:
        """Hold ``x`` back; whether to sum the inputs held now."""
        self.inputs.append(x.clone())  # the model may overwrite its activations in place later
        self.patches += patches
        return self.patches >= self.cov.shape[-1] or sum(t.numel() for t in self.inputs) >= PENDING_MAX_ELEMENTS

    def finish(self) -> None:
        accumulate_conv_(self.cov, torch.cat(self.inputs) if len(self.inputs) > 1 else self.inputs[0], self.geom)


class _MapMoment:
    """A conv slot's whole maps summed until its patch sum is made from them (:mod:`~deepunlearn.pixel_moments`)."""

    def __init__(self, cov: torch.Tensor, geom: ConvGeometry, shape: torch.Size):
        self.cov, self.geom, self.shape = cov, geom, shape
        width = cov.shape[-1] // math.prod(geom.kernel) * math.prod(shape[1:])
        self.moment = torch.zeros(geom.groups, width, width, device=cov.device, dtype=cov.dtype)

    def add(self, x: torch.Tensor, patches: int) -> bool:
        accumulate_pixels_(self.moment, x, self.geom.groups)
        return False

    def finish(self) -> None:
        add_patch_moment_(self.cov, self.moment, self.geom, tuple(self.shape[1:]))


class Collector:
    """Hooks that hand every edited layer's inputs to :meth:`add_rows` / :meth:`add_conv`.

    The base class streams them into :class:`SlotStatistics`; :mod:`deepunlearn.reference`
    subclasses it to keep the activation matrices instead, as the paper's code does.
    """

    def __init__(self, targets: list[EditTarget], device: torch.device, dtype: torch.dtype, share_inputs: bool = True,
                 autocast: torch.dtype | None = None, keep_vectors: bool | str = True, first_token: bool = False,
                 both_kinds: bool = False, token_position: int = 0):
        self.stats = Statistics()
        if keep_vectors not in (True, False, "always"):
            raise ValueError(f"keep_vectors must be True, False or 'always', got {keep_vectors!r}")
        self.keep_vectors = keep_vectors
        self._kept: dict[int, tuple[SlotStatistics, list[torch.Tensor]]] = {}  # id(slot) -> (slot, vectors so far)
        self._deferred: dict[int, _HeldInputs | _MapMoment] = {}  # id(conv slot's sum) -> what it gets later (_defer)
        # samples in the whole data (None: unknown) and in the current batch, set by run_with_hooks
        self.expected_samples: int | None = None
        self.batch_samples = 0
        # (batch, positions) bool, the current batch's attention mask (mapping batches): a sequence input
        # of those positions counts only its tokens, and "a position" counts tokens only
        self.mask: torch.Tensor | None = None
        self.first_token = first_token
        self.token_position = check_token_position(token_position)  # the one position first_token keeps
        self.stats.first_token, self.stats.token_position = first_token, token_position if first_token else 0
        # both_kinds: also that position's statistics of every sequence slot, in the same passes
        self.token_slots: dict[str, SlotStatistics] | None = {} if both_kinds else None
        self.device, self.dtype = device, dtype
        self.autocast = check_autocast(autocast)
        self.handles: list = []
        # nn.MultiheadAttention layers, by their out_proj weight, and Linear and conv layers, by
        # their weight, for the functional calls that apply them (_FunctionalCapture)
        self.attention: dict[int, str] = {}
        self.linear_weights: dict[int, tuple[str, int]] = {}
        self.conv_weights: dict[int, tuple[str, int, int]] = {}  # name, groups, d
        self.conv_rows: dict[str, int] = {}
        self._module_call: int | None = None  # the weight whose module's hook ran just now
        self.functional_layers: set[str] = set()  # Linear and conv layers reached through functional calls alone
        # Linear layers reading the very tensor an earlier one read (separate q/k/v projections)
        # share its slot. Sharing is decided in the first forward pass and checked in every later one.
        self.share_inputs = share_inputs
        self._forwards = 0
        self._inputs: dict[int, tuple[weakref.ref, int, str]] = {}  # id(input) -> (ref, version, owner slot)
        self._calls: dict[str, int] = {}  # linear slot -> calls in the current forward pass
        seen: set[int] = set()
        for t in targets:
            m = t.module
            if id(m) in seen or t.kind == "attention-out":  # out_proj is fed by the attention hook
                continue
            seen.add(id(m))
            if t.kind == "attention-in":
                self.attention[id(m.out_proj.weight)] = t.layer
            elif t.kind == "linear":
                self.handles.append(m.register_forward_pre_hook(self._linear_hook(t.name, t.in_features, m.weight)))
                self.linear_weights[id(m.weight)] = (t.name, t.in_features)
            else:
                self.handles.append(m.register_forward_pre_hook(self._conv_hook(t.name, ConvGeometry.of(m), t.in_features, m.weight)))
                self.conv_weights[id(m.weight)] = (t.name, t.groups, t.in_features)
                self.conv_rows[t.name] = t.as_matrices(t.weight()).shape[1]  # weight rows per group

    # -- sinks (overridden by the reference procedure) --------------------------------------
    def _add(self, name: str, groups: int, d: int, n: int, vectors, accumulate, vector_sum: torch.Tensor,
             slots: dict[str, SlotStatistics] | None = None, conv: bool = False) -> None:
        """Add ``n`` input vectors to slot ``name`` of ``slots`` (default: the statistics'): kept as
        ``vectors()`` (``(groups, n, d)``) while :meth:`_keeps` says so, else streamed into the dense
        sum by ``accumulate(cov)`` (vectors kept so far are folded in first); their sum
        ``vector_sum`` (``(groups, d)``, in the statistics' dtype) is added to the slot's total."""
        slots = self.stats.slots if slots is None else slots
        s = slots.get(name)
        seen = 0 if s is None else s.count
        if (s is None or isinstance(s.moment, SampleRows)) and self._keeps(name, d, seen, n, conv):
            new = vectors().to(self.dtype, copy=True)  # never a view of the model's activations
            if s is None:
                s = slots[name] = SlotStatistics(SampleRows(new))
            else:  # concatenated once, at the end of the pass (or when folded)
                self._kept.setdefault(id(s), (s, [s.moment.rows]))[1].append(new)
        else:
            if s is None:
                s = slots[name] = SlotStatistics(torch.zeros(groups, d, d, device=self.device, dtype=self.dtype))
            elif isinstance(s.moment, SampleRows):  # the vectors are no longer what pays: fold them
                self._concatenate(s)
                s.moment = fold_rows(torch.zeros(groups, d, d, device=self.device, dtype=self.dtype), s.moment.rows)
            accumulate(s.moment)
        s.count += n
        s.total = vector_sum if s.total is None else s.total.add_(vector_sum)

    def _keeps(self, name: str, d: int, seen: int, n: int, conv: bool) -> bool:
        """Whether a slot of width ``d`` that has seen ``seen`` vectors keeps them with ``n`` more.

        Only while fewer than ``d``: by the count the whole data will bring, where its length is
        known (this many vectors a batch), else by the count so far. ``keep_vectors="always"``
        keeps them then (the automatic α decomposes vectors far more cheaply than sums); ``True``
        keeps a conv input's only where solving from them costs fewer flops than solving from
        the sum (:func:`~deepunlearn.weight_side.vectors_pay`: the compiled kernels stream a conv's
        sum more cheaply than a GEMM folds the vectors); linear inputs always.
        """
        if not self.keep_vectors:
            return False
        total = seen + n
        if self.expected_samples is not None and self.batch_samples > 0:
            total = max(total, math.ceil(n * self.expected_samples / self.batch_samples))
        if total >= d:
            return False
        return self.keep_vectors == "always" or not conv or vectors_pay(d, total, self.conv_rows.get(name, d))

    def _concatenate(self, s: SlotStatistics) -> None:
        """Join the vectors kept for ``s`` in this pass into its moment."""
        entry = self._kept.pop(id(s), None)
        if entry is not None:
            s.moment = SampleRows(torch.cat(entry[1], dim=1))

    def end_collection(self) -> None:
        """Join every slot's kept vectors and add to the sums what was deferred (called once the
        last batch has run)."""
        for s, _ in list(self._kept.values()):
            self._concatenate(s)
        for key in list(self._deferred):
            self._deferred.pop(key).finish()

    def _defer(self, kind: type[_HeldInputs] | type[_MapMoment], cov: torch.Tensor, x: torch.Tensor, geom: ConvGeometry,
               patches: int) -> None:
        """Hand conv input ``x`` (``patches`` patches) to the deferred work of ``kind`` for the sum
        ``cov``, which adds to ``cov`` when it says so, before inputs of another kind or size, or
        when the collection ends. Inputs that bring the sum's width of patches alone go straight
        to the compiled op."""
        key = id(cov)
        deferred = self._deferred.get(key)
        if deferred is not None and (type(deferred) is not kind or deferred.shape != x.shape[1:]):
            self._deferred.pop(key).finish()
            deferred = None
        if deferred is None:
            if kind is _HeldInputs and patches >= cov.shape[-1]:
                accumulate_conv_(cov, x, geom)
                return
            deferred = self._deferred[key] = kind(cov, geom, x.shape[1:])
        if deferred.add(x, patches):
            self._deferred.pop(key).finish()

    def add_rows(self, name: str, rows: torch.Tensor, slots: dict[str, SlotStatistics] | None = None) -> None:
        """Input vectors ``(n, d)`` of a linear map (into ``slots``, default the statistics')."""
        self._add(name, 1, rows.shape[-1], rows.shape[0], lambda: rows[None], lambda cov: accumulate_linear_(cov, rows),
                  rows.sum(0, dtype=self.dtype)[None], slots)

    def add_conv(self, name: str, x: torch.Tensor, geom: ConvGeometry, d: int) -> None:
        """Input ``(N, C, *spatial)`` of a convolution with geometry ``geom``."""
        n = x.shape[0] * _out_positions(x.shape[2:], geom)
        # maps no larger than the kernel are summed whole (pixel_moments); other inputs are held back until
        # they bring the sum's width of patches
        kind = _MapMoment if pixels_pay(geom, tuple(x.shape[2:])) else _HeldInputs
        self._add(name, geom.groups, d, n, lambda: conv_patches(x.to(self.dtype), geom),
                  lambda cov: self._defer(kind, cov, x, geom, n), patch_sums(x, geom, self.dtype), conv=True)

    # -- hooks ------------------------------------------------------------------------------
    def _computed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the layer multiplies it: autocast casts the inputs of linear maps and convs."""
        x = x.detach()
        return x.to(self.autocast) if self.autocast is not None and x.is_floating_point() else x

    def _sinks(self) -> list[tuple[dict[str, SlotStatistics] | None, bool]]:
        """Where sequence vectors go: ``(slots, first position only)`` for the statistics, and for
        the first position's statistics kept beside them (``both_kinds``)."""
        sinks = [(None, self.first_token)]
        if self.token_slots is not None:
            sinks.append((self.token_slots, True))
        return sinks

    def _linear_hook(self, name: str, d: int, weight: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> None:
            self._module_call = id(weight)  # the F.linear call the module makes next is this one
            self.linear_input(name, d, args[0])

        return hook

    def linear_input(self, name: str, d: int, x: torch.Tensor) -> None:
        """Input ``x`` (``(..., d)``) of linear layer ``name``, from its module or a functional call."""
        _check_floating(name, x)
        if self.share_inputs and self._shared_owner(name, x) is not None:
            return
        sequence = x.dim() == 3  # (batch, sequence, features): where the first position can be taken
        self.stats.sequence_inputs |= sequence
        for slots, first in (self._sinks() if sequence else [(None, False)]):
            with autocast_off(self.device):
                kept = self._tokens(name, x, first) if sequence else x
                self.add_rows(name, linear_rows(self._computed(kept), d), slots)

    def _tokens(self, name: str, x: torch.Tensor, first: bool, every: torch.Tensor | None = None) -> torch.Tensor:
        """The vectors layer ``name`` reads in batch-major ``x`` ``(N, S, d)``: every position's
        (``every``: the same vectors in a cheaper layout, where given) or, where ``first``, each
        sample's :attr:`token_position`; by the current batch's attention mask where it covers ``x``
        (its tokens only; the position counted over each sample's own tokens)."""
        mask = self.mask if self.mask is not None and x.shape[:2] == self.mask.shape else None
        if not first:
            return x[mask] if mask is not None else x if every is None else every
        position = self._position(name, x.shape[1])
        if mask is None:
            return x[:, position]
        return x[torch.arange(x.shape[0], device=x.device), token_positions(mask, position)]

    def _position(self, name: str, length: int) -> int:
        """:attr:`token_position`, checked against the ``length`` positions layer ``name`` read."""
        if not -length <= self.token_position < length:
            raise ValueError(f"token_position={self.token_position}, but layer '{name}' read sequences of {length} "
                             "position(s)")
        return self.token_position

    def _shared_owner(self, name: str, x: torch.Tensor) -> str | None:
        """The slot already holding ``x`` in this forward pass if ``name`` shares it, else ``None``.

        Raises :class:`SharingChanged` when a sharing decided in the first pass does not hold.
        """
        entry = self._inputs.get(id(x))
        seen_by = entry[2] if entry is not None and entry[0]() is x and entry[1] == _version(x) else None
        alias = self.stats.aliases.get(name)
        owner = seen_by
        if alias is not None:
            if seen_by != alias:
                raise SharingChanged(f"layer '{name}' read the same input as '{alias}' in the first batch but not later")
        elif seen_by is not None and self._forwards == 0 and name not in self.stats.slots and name not in self._calls:
            self.stats.aliases[name] = seen_by
        else:
            owner = None
            if seen_by is None:  # first reader of x in this pass
                self._inputs[id(x)] = (weakref.ref(x), _version(x), name)
        self._calls[name] = self._calls.get(name, 0) + 1
        return owner

    def end_forward(self) -> None:
        """Close one forward pass: check the input sharing held, forget this pass's inputs."""
        for name, owner in self.stats.aliases.items():
            n_owner, n_member = self._calls.get(owner, 0), self._calls.get(name, 0)
            if n_owner != n_member or n_owner > 1:  # a buffer holds one input per pass, for all who share it
                raise SharingChanged(f"layer '{name}' ran {n_member} time(s) in a forward pass where '{owner}', "
                                      f"whose input it shares, ran {n_owner} time(s)")
        self._inputs.clear()
        self._calls.clear()
        self._module_call = None
        self._forwards += 1

    def _conv_hook(self, name: str, geom: ConvGeometry, d: int, weight: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> None:
            self._module_call = id(weight)  # the F.conv call the module makes next is this one
            self.conv_input(name, geom, d, args[0])

        return hook

    def conv_input(self, name: str, geom: ConvGeometry, d: int, x: torch.Tensor) -> None:
        """Input ``x`` of convolution ``name`` with geometry ``geom``, from its module or a functional call."""
        channels = d * geom.groups // math.prod(geom.kernel)
        batched = x.dim() == geom.spatial_dims + 2
        if not (batched or x.dim() == geom.spatial_dims + 1) or x.shape[1 if batched else 0] != channels:
            raise ValueError(f"layer '{name}', a convolution over {channels} channel(s), got an input of shape "
                             f"{tuple(x.shape)}: a batch holds its samples along its first dimension, and a list "
                             "of single samples is read as a list of batches (stack them, or give a Dataset)")
        _check_floating(name, x)
        x = self._computed(x)
        with autocast_off(self.device):
            self.add_conv(name, x if x.dim() == geom.spatial_dims + 2 else x.unsqueeze(0), geom, d)

    def add_attention(self, name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      before_out_proj: torch.Tensor) -> None:
        """Inputs of attention layer ``name``'s projections, as ``F.multi_head_attention_forward``
        sees them (sequence first: ``(L, N, E)``, or unbatched ``(L, E)``); ``before_out_proj`` is
        what its output projection multiplies, already in the dtype it is multiplied in."""
        self.stats.sequence_inputs = True
        for slots, first in self._sinks():
            def rows(t: torch.Tensor, computed: bool = True) -> torch.Tensor:
                # sequence first (unbatched: one sample); every position's in any order, as a view
                t = self._tokens(name, t.transpose(0, 1) if t.dim() == 3 else t[None], first, every=_batch_major(t))
                return linear_rows(self._computed(t) if computed else t, t.shape[-1])

            with autocast_off(self.device):
                if query is key and key is value:
                    self.add_rows(f"{name}.in_proj", rows(query), slots)
                else:
                    for part, t in zip("qkv", (query, key, value)):
                        self.add_rows(f"{name}.{part}", rows(t), slots)
                self.add_rows(f"{name}.out_proj", rows(before_out_proj, computed=False), slots)

    def capture(self):
        """The context each forward pass runs in: :class:`_FunctionalCapture` where the model has
        attention layers to edit, or in the first pass (later ones only if it found Linear or conv
        weights applied by functional calls alone)."""
        layers = self.linear_weights or self.conv_weights
        watch = self.attention or (layers and (self._forwards == 0 or self.functional_layers))
        return _FunctionalCapture(self) if watch else nullcontext()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def check_token_position(position: int) -> int:
    """``position`` if it can name one sequence position (0 the first, -1 the last): an int, not a bool."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise ValueError(f"token_position must be a sequence position (0, -1), got {position!r}")
    return position


def check_autocast(dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` if it is a valid autocast dtype for collection (``None``: full precision)."""
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {dtype}")
    return dtype


def autocast_off(device: torch.device):
    """Accumulate in the statistics' own dtype even inside the model's autocast region."""
    return torch.autocast(device.type, enabled=False)


def autocast_on(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class SharingChanged(RuntimeError):
    """The input sharing seen in the first forward pass did not hold in a later one."""


def _version(x: torch.Tensor) -> int:
    """``x``'s version counter (bumped by in-place changes); -1 for an inference tensor, which has none
    (it cannot be changed in place outside inference mode, where the forward passes run)."""
    return -1 if x.is_inference() else x._version


def _check_floating(name: str, x: torch.Tensor) -> None:
    """``TypeError`` naming layer ``name`` unless its input ``x`` is floating point (the model's own
    call would fail on it too, less clearly)."""
    if not x.is_floating_point():
        raise TypeError(f"layer '{name}' got {x.dtype} inputs; the data must be given as the model computes, "
                        "in floating point (images, for example, as x.float() / 255)")


def _out_positions(spatial: torch.Size, geom: ConvGeometry) -> int:
    n = 1
    for i, (size, k, s, d) in enumerate(zip(spatial, geom.kernel, geom.stride, geom.dilation)):
        nd = geom.spatial_dims
        padded = size + geom.padding[2 * (nd - 1 - i)] + geom.padding[2 * (nd - 1 - i) + 1]
        n *= (padded - d * (k - 1) - 1) // s + 1
    return n


def _batch_major(t: torch.Tensor) -> torch.Tensor:
    """A sequence-first ``(L, N, E)`` view of a batch-first tensor turned back into ``(N, L, E)``,
    so that its rows are a view, not a copy (a second moment does not depend on the rows' order)."""
    return t.transpose(0, 1) if t.dim() == 3 and t.transpose(0, 1).is_contiguous() else t


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_CONVS = (F.conv1d, F.conv2d, F.conv3d)


class _FunctionalCapture(TorchFunctionMode):
    """Sees the functional calls of a forward pass that apply edited weights without their module.

    * ``F.linear`` / ``F.conv{1,2,3}d`` with the weight of a ``Linear`` / conv layer whose module
      was not called for it (for example torchvision's ``swin_t``, whose attention applies
      ``qkv.weight`` and ``proj.weight`` through ``F.linear``): its input goes to that layer's
      statistics, as a hook would send it (a conv with the call's own geometry).
    * ``F.multi_head_attention_forward``: ``nn.MultiheadAttention`` applies both its projections
      inside it, through their weights. The call is run with the output projection as the
      identity (an exact product, unless TF32 is allowed for float32 matrix products), which
      yields what ``out_proj`` multiplies; the projection is then applied here to give the
      layer's output, under the same autocast, so the attention runs once.

    Every other function passes through unchanged.
    """

    def __init__(self, collector: "Collector"):
        super().__init__()
        self.collector = collector
        self.identities: dict[tuple, torch.Tensor] = {}

    def _identity(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.shape[1], w.dtype, w.device)
        if key not in self.identities:
            self.identities[key] = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        return self.identities[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self._linear(*args, **kwargs)
        elif func in _CONVS:
            self._conv(*args, **kwargs)
        elif func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs)
        return func(*args, **kwargs)

    def _module_calls(self, weight: torch.Tensor) -> bool:
        """Whether this call is the one ``weight``'s module makes (its hook has the input already)."""
        own = self.collector._module_call == id(weight)
        if own:
            self.collector._module_call = None
        return own

    def _linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        c = self.collector
        if self._module_calls(weight):
            return
        layer = c.linear_weights.get(id(weight))
        if layer is not None:
            c.functional_layers.add(layer[0])
            c.linear_input(*layer, input)

    def _conv(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
              dilation=1, groups: int = 1) -> None:
        c = self.collector
        if self._module_calls(weight):
            return
        layer = c.conv_weights.get(id(weight))
        if layer is not None and layer[1] == groups:  # another grouping would need other statistics
            name, _, d = layer
            c.functional_layers.add(name)
            c.conv_input(name, ConvGeometry.of_call(weight, stride, padding, dilation, groups), d, input)

    def _attention(self, func, args: tuple, kwargs: dict):
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        a = call.arguments
        w, b = a["out_proj_weight"], a.get("out_proj_bias")
        name = self.collector.attention.get(id(w))
        if name is None:  # an attention layer not being edited
            return func(*args, **kwargs)
        a["out_proj_weight"], a["out_proj_bias"] = self._identity(w), None
        before_out_proj, weights = func(*call.args, **call.kwargs)
        self.collector.add_attention(name, a["query"], a["key"], a["value"], before_out_proj.detach())
        return F.linear(before_out_proj, w, b), weights
