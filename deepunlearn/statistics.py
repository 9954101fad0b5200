"""Streamed per-layer second moments ``C = Σ x xᵀ`` of the inputs every edited weight sees.

:func:`collect_statistics` runs the model over the data with hooks that feed each layer's
input vectors (every token, every conv patch, padding included) into a ``(groups, d, d)``
buffer. Nothing but those buffers is kept, so memory is O(d²) per layer whatever the
number of samples, and statistics from different batches, shards or processes simply add.
While a layer has seen fewer vectors than its width ``d``, the vectors themselves are kept
instead (``n·d < d²``; :mod:`deepunlearn.moments`), and folded into the sum once they are not fewer.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset

from ._batches import DataLike, iter_batches
from .covariance import ConvGeometry, accumulate_conv_, accumulate_linear_, conv_patches, linear_rows, patch_sums
from .layers import EditTarget, find_targets
from .moments import Moment, SampleRows, dense, fold_rows, moment_sum, moment_trace
from .weight_side import vectors_pay

_FORMAT = "deepunlearn.statistics"
_VERSION = 4  # 2 added input sharing (``aliases``), 3 slots kept as vectors, 4 first moments; older files are still read


@dataclass
class SlotStatistics:
    """Second and first moment of one input slot.

    Attributes:
        moment: ``(groups, d, d)`` sum of ``x xᵀ`` over every input vector ``x`` of each group, or,
            while fewer vectors than ``d`` were seen, those vectors as :class:`~deepunlearn.moments.SampleRows`.
        count: number of input vectors accumulated (per group).
        total: ``(groups, d)`` sum of the input vectors themselves (their mean keeps a layer's mean
            output, ``keep_retain_mean``), or None in statistics files of format version 3 and older.
    """

    moment: Moment
    count: int = 0
    total: torch.Tensor | None = None

    @property
    def cov(self) -> torch.Tensor:
        """The ``(groups, d, d)`` sum (formed from the vectors when they are what is kept)."""
        return dense(self.moment)

    @property
    def stored(self) -> torch.Tensor:
        """The tensor held: the dense sum, or the ``(groups, n, d)`` vectors."""
        return self.moment.rows if isinstance(self.moment, SampleRows) else self.moment

    def copy(self) -> "SlotStatistics":
        return SlotStatistics(_moment_like(self.moment, self.stored.clone()), self.count,
                              None if self.total is None else self.total.clone())


def _moment_like(moment: Moment, tensor: torch.Tensor) -> Moment:
    """``tensor`` in ``moment``'s form."""
    return SampleRows(tensor) if isinstance(moment, SampleRows) else tensor


def model_device(model: nn.Module) -> torch.device:
    """The one device holding all of ``model``'s parameters and buffers (error if several)."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    if not devices:
        raise ValueError("the model has no parameters")
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"the model's parameters are on several devices ({names}); move it to one device first")
    return devices.pop()


# Inside fingerprint_once(): each model's fingerprint as computed first (id(model) -> digest).
_FINGERPRINT_MEMO: ContextVar[dict[int, str] | None] = ContextVar("deepunlearn_fingerprints", default=None)


@contextmanager
def fingerprint_once() -> Iterator[None]:
    """Inside, :func:`model_fingerprint` digests each model once: for callers that collect several
    times without changing the weights in between (choosing α collects six parts; a fingerprint
    reads every weight, 0.17 s on ViT-B/16 on the CPU)."""
    token = _FINGERPRINT_MEMO.set({})
    try:
        yield
    finally:
        _FINGERPRINT_MEMO.reset(token)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the edited layers' names, shapes and weights (norms to 6 significant digits).

    Rounding keeps the fingerprint equal for the same model on another device or after a
    save/load round trip, while a different architecture or other weights change it.
    """
    memo = _FINGERPRINT_MEMO.get()
    if memo is not None and id(model) in memo:
        return memo[id(model)]
    targets, _ = find_targets(model)
    weights = [t.weight().detach() for t in targets]
    norms = torch.stack([w.double().norm() for w in weights]).tolist()  # one transfer, not one per layer
    desc = [[t.name, list(w.shape), str(w.dtype).replace("torch.", ""), f"{norm:.6g}"]
            for t, w, norm in zip(targets, weights, norms)]
    digest = hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]
    if memo is not None:
        memo[id(model)] = digest
    return digest


@dataclass
class Statistics:
    """Per-slot input second moments of one model on one data set.

    Attributes:
        slots: slot name -> :class:`SlotStatistics`, in the order layers first ran.
        samples: number of samples (batch rows) that went through the model.
        fingerprint: :func:`model_fingerprint` of the model they were collected on.
        aliases: slot name -> the slot that holds its statistics, for ``nn.Linear`` layers that
            read the very same input tensor as an earlier one in every forward pass (separate
            query/key/value projections): one buffer is accumulated for all of them.
        first_token: whether sequence inputs contributed their first position only
            (:func:`collect_statistics`'s ``first_token``).
        sequence_inputs: whether an edited layer read sequences (an ``nn.Linear`` input of shape
            ``(batch, sequence, features)``, or ``nn.MultiheadAttention``): where ``first_token`` matters.
    """

    slots: dict[str, SlotStatistics] = field(default_factory=dict)
    samples: int = 0
    fingerprint: str = ""
    aliases: dict[str, str] = field(default_factory=dict)
    first_token: bool = False
    sequence_inputs: bool = False

    # -- combination and movement ---------------------------------------------------------
    def __add__(self, other: "Statistics") -> "Statistics":
        if not isinstance(other, Statistics):
            return NotImplemented
        if self.fingerprint != other.fingerprint:
            raise ValueError(
                f"cannot add statistics of different models (fingerprints {self.fingerprint} and {other.fingerprint})"
            )
        if self.first_token != other.first_token:
            raise ValueError("cannot add statistics of all sequence positions to statistics of the first position only "
                             "(collected with different first_token)")
        a, b = (self, other) if self.aliases == other.aliases else (self.expanded(), other.expanded())
        slots: dict[str, SlotStatistics] = {}
        for name, mine in a.slots.items():
            theirs = b.slots.get(name)
            if theirs is None:
                slots[name] = mine.copy()
                continue
            if tuple(mine.moment.shape) != tuple(theirs.moment.shape):
                raise ValueError(f"slot '{name}' has shape {tuple(mine.moment.shape)} in one and "
                                 f"{tuple(theirs.moment.shape)} in the other")
            if mine.moment.device != theirs.moment.device:
                raise ValueError(f"slot '{name}' is on {mine.moment.device} in one and {theirs.moment.device} in the other; "
                                 "use .to() first")
            # a new tensor, never either operand: no copy of mine first
            total = None if mine.total is None or theirs.total is None else mine.total + theirs.total
            slots[name] = SlotStatistics(moment_sum([mine.moment, theirs.moment]), mine.count + theirs.count, total)
        slots.update({name: theirs.copy() for name, theirs in b.slots.items() if name not in slots})
        return Statistics(slots, a.samples + b.samples, a.fingerprint, dict(a.aliases), self.first_token,
                          self.sequence_inputs or other.sequence_inputs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Statistics":
        """A copy with every buffer moved to ``device`` and/or cast to ``dtype``."""
        return Statistics({k: SlotStatistics(v.moment.to(device=device, dtype=dtype), v.count,
                                             None if v.total is None else v.total.to(device=device, dtype=dtype))
                           for k, v in self.slots.items()},
                          self.samples, self.fingerprint, dict(self.aliases), self.first_token, self.sequence_inputs)

    def expanded(self) -> "Statistics":
        """The same statistics with every alias turned into a slot of its own (sharing the buffer)."""
        slots = dict(self.slots)
        for name, owner in self.aliases.items():
            slots[name] = self.slots[owner]
        return Statistics(slots, self.samples, self.fingerprint, first_token=self.first_token,
                          sequence_inputs=self.sequence_inputs)

    def resolve(self, slots: tuple[str, ...]) -> tuple[str, ...]:
        """The stored slots that hold the statistics of ``slots`` (aliases followed, duplicates dropped)."""
        return tuple(dict.fromkeys(self.aliases.get(s, s) for s in slots))

    @property
    def device(self) -> torch.device | None:
        return next(iter(self.slots.values())).stored.device if self.slots else None

    @property
    def dtype(self) -> torch.dtype | None:
        return next(iter(self.slots.values())).stored.dtype if self.slots else None

    # -- queries ----------------------------------------------------------------------------
    def moment(self, target: EditTarget) -> tuple[Moment | None, int]:
        """Summed second moment of the slots ``target`` reads (dense ``(groups, d, d)``, or the
        vectors while fewer than ``d``), and its vector count. ``(None, 0)`` when no input reached it."""
        present = [self.slots[s] for s in self.resolve(target.slots) if s in self.slots]
        if not present:
            return None, 0
        moment = moment_sum([p.moment for p in present])
        d, g = target.in_features, target.groups
        if tuple(moment.shape) != (g, d, d):
            raise ValueError(
                f"statistics for layer '{target.name}' have shape {tuple(moment.shape)} but the layer needs {(g, d, d)}: "
                "they do not match this model"
            )
        return moment, sum(p.count for p in present)

    def mean(self, target: EditTarget) -> torch.Tensor | None:
        """``(groups, d)``: the mean input vector of the slots ``target`` reads; None where no input
        reached it or the statistics hold no first moments (files of format version 3 and older)."""
        present = [self.slots[s] for s in self.resolve(target.slots) if s in self.slots]
        count = sum(p.count for p in present)
        if not present or count == 0 or any(p.total is None for p in present):
            return None
        return sum(p.total for p in present) / count

    def covariance(self, target: EditTarget) -> tuple[torch.Tensor | None, int]:
        """:meth:`moment` in the dense ``(groups, d, d)`` form."""
        moment, n = self.moment(target)
        return (None if moment is None else dense(moment)), n

    def check_matches(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless these statistics were collected on ``model`` as it is now."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(
                f"statistics do not match the model: collected on a model with fingerprint {self.fingerprint}, "
                f"this model has {fp} (different layers, shapes or weights)"
            )

    # -- persistence ------------------------------------------------------------------------
    def checksum(self) -> str:
        """SHA-256 of the metadata and every buffer's bytes (as stored on the CPU)."""
        head = ([self.fingerprint, self.samples] + ([sorted(self.aliases.items())] if self.aliases else [])
                + (["first_token"] if self.first_token else []))
        h = hashlib.sha256(json.dumps(head).encode())
        for name, s in self.slots.items():
            t = s.stored.detach().cpu().contiguous()
            form = ["rows"] if isinstance(s.moment, SampleRows) else []
            h.update(json.dumps([name, s.count, list(t.shape), str(t.dtype), *form]).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            if s.total is not None:
                h.update(s.total.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def to_blob(self) -> dict:
        """Plain data for ``torch.save``: CPU tensors, counts, fingerprint and checksum."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "fingerprint": self.fingerprint,
            "samples": self.samples,
            "slots": {k: {"rows" if isinstance(v.moment, SampleRows) else "cov": v.stored.detach().cpu(), "count": v.count,
                          **({} if v.total is None else {"total": v.total.detach().cpu()})}
                      for k, v in self.slots.items()},
            "aliases": dict(self.aliases),
            "first_token": self.first_token,
            "sequence_inputs": self.sequence_inputs,
            "checksum": self.checksum(),
        }

    @classmethod
    def from_blob(cls, blob: object, source: str = "statistics") -> "Statistics":
        """Inverse of :meth:`to_blob`; refuses other formats and corrupted contents."""
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{source} is not a deepunlearn statistics file")
        if blob.get("version") not in range(1, _VERSION + 1):
            raise ValueError(f"{source} has statistics format version {blob.get('version')}, expected at most {_VERSION}")
        try:
            slots = {k: SlotStatistics(SampleRows(v["rows"]) if "rows" in v else v["cov"], int(v["count"]), v.get("total"))
                     for k, v in blob["slots"].items()}
            aliases = {str(k): str(v) for k, v in blob.get("aliases", {}).items()}
            stats = cls(slots, int(blob["samples"]), str(blob["fingerprint"]), aliases, bool(blob.get("first_token", False)),
                        bool(blob.get("sequence_inputs", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source} is malformed: {exc}") from exc
        if any(owner not in slots for owner in aliases.values()):
            raise ValueError(f"{source} is malformed: an alias points to a slot it does not hold")
        if stats.checksum() != blob.get("checksum"):
            raise ValueError(f"{source} is corrupted: its checksum does not match its contents")
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (torch serialisation, tensors on the CPU, with a checksum)."""
        torch.save(self.to_blob(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: torch.device | str | None = None) -> "Statistics":
        """Read statistics written by :meth:`save` (safe loading: tensors and plain data only).

        Raises ``ValueError`` for an unreadable file, another format, or contents whose checksum
        does not match (a corrupted or hand-edited file).
        """
        blob = _load_blob(path)
        stats = cls.from_blob(blob, repr(os.fspath(path)))
        return stats if map_location is None else stats.to(map_location)

    def summary(self) -> list[dict]:
        """One row per slot: name, groups, d, vectors, whether the vectors themselves are kept
        (``kept_vectors``, while fewer than ``d``), energy ``tr(C)`` (summed over groups), and the
        slots that share its buffer."""
        shared: dict[str, list[str]] = {}
        for name, owner in self.aliases.items():
            shared.setdefault(owner, []).append(name)
        return [
            {"slot": k, "groups": v.moment.shape[0], "d": v.moment.shape[-1], "vectors": v.count,
             "kept_vectors": isinstance(v.moment, SampleRows), "energy": float(moment_trace(v.moment).sum()), "shared_by": shared.get(k, [])}
            for k, v in self.slots.items()
        ]


def _load_blob(path: str | os.PathLike) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated or not a torch file
        raise ValueError(f"cannot read statistics from {os.fspath(path)!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------


class _Collector:
    """Hooks that hand every edited layer's inputs to :meth:`add_rows` / :meth:`add_conv`.

    The base class streams them into :class:`SlotStatistics`; :mod:`deepunlearn.reference`
    subclasses it to keep the activation matrices instead, as the paper's code does.
    """

    def __init__(self, targets: list[EditTarget], device: torch.device, dtype: torch.dtype, share_inputs: bool = True,
                 autocast: torch.dtype | None = None, keep_vectors: bool | str = True, first_token: bool = False,
                 both_kinds: bool = False):
        self.stats = Statistics()
        if keep_vectors not in (True, False, "always"):
            raise ValueError(f"keep_vectors must be True, False or 'always', got {keep_vectors!r}")
        self.keep_vectors = keep_vectors
        self._kept: dict[int, tuple[SlotStatistics, list[torch.Tensor]]] = {}  # id(slot) -> (slot, vectors so far)
        # samples in the whole data (None: unknown) and in the current batch, set by run_with_hooks
        self.expected_samples: int | None = None
        self.batch_samples = 0
        self.first_token = first_token
        # both_kinds: also the first position's statistics of every sequence slot, in the same passes
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
        """Join every slot's kept vectors (called once the last batch has run)."""
        for s, _ in list(self._kept.values()):
            self._concatenate(s)

    def add_rows(self, name: str, rows: torch.Tensor, slots: dict[str, SlotStatistics] | None = None) -> None:
        """Input vectors ``(n, d)`` of a linear map (into ``slots``, default the statistics')."""
        self._add(name, 1, rows.shape[-1], rows.shape[0], lambda: rows[None], lambda cov: accumulate_linear_(cov, rows),
                  rows.sum(0, dtype=self.dtype)[None], slots)

    def add_conv(self, name: str, x: torch.Tensor, geom: ConvGeometry, d: int) -> None:
        """Input ``(N, C, *spatial)`` of a convolution with geometry ``geom``."""
        n = x.shape[0] * _out_positions(x.shape[2:], geom)
        self._add(name, geom.groups, d, n, lambda: conv_patches(x.to(self.dtype), geom),
                  lambda cov: accumulate_conv_(cov, x, geom), patch_sums(x, geom, self.dtype), conv=True)

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
        if self.share_inputs and self._shared_owner(name, x) is not None:
            return
        sequence = x.dim() == 3  # (batch, sequence, features): where the first position can be taken
        self.stats.sequence_inputs |= sequence
        for slots, first in (self._sinks() if sequence else [(None, False)]):
            with _autocast_off(self.device):
                self.add_rows(name, linear_rows(self._computed(x[:, 0] if first else x), d), slots)

    def _shared_owner(self, name: str, x: torch.Tensor) -> str | None:
        """The slot already holding ``x`` in this forward pass if ``name`` shares it, else ``None``.

        Raises :class:`_SharingChanged` when a sharing decided in the first pass does not hold.
        """
        entry = self._inputs.get(id(x))
        seen_by = entry[2] if entry is not None and entry[0]() is x and entry[1] == x._version else None
        alias = self.stats.aliases.get(name)
        owner = seen_by
        if alias is not None:
            if seen_by != alias:
                raise _SharingChanged(f"layer '{name}' read the same input as '{alias}' in the first batch but not later")
        elif seen_by is not None and self._forwards == 0 and name not in self.stats.slots and name not in self._calls:
            self.stats.aliases[name] = seen_by
        else:
            owner = None
            if seen_by is None:  # first reader of x in this pass
                self._inputs[id(x)] = (weakref.ref(x), x._version, name)
        self._calls[name] = self._calls.get(name, 0) + 1
        return owner

    def end_forward(self) -> None:
        """Close one forward pass: check the input sharing held, forget this pass's inputs."""
        for name, owner in self.stats.aliases.items():
            n_owner, n_member = self._calls.get(owner, 0), self._calls.get(name, 0)
            if n_owner != n_member or n_owner > 1:  # a buffer holds one input per pass, for all who share it
                raise _SharingChanged(f"layer '{name}' ran {n_member} time(s) in a forward pass where '{owner}', "
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
        x = self._computed(x)
        with _autocast_off(self.device):
            self.add_conv(name, x if x.dim() == geom.spatial_dims + 2 else x.unsqueeze(0), geom, d)

    def add_attention(self, name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      before_out_proj: torch.Tensor) -> None:
        """Inputs of attention layer ``name``'s projections, as ``F.multi_head_attention_forward``
        sees them (sequence first: ``(L, N, E)``, or unbatched ``(L, E)``); ``before_out_proj`` is
        what its output projection multiplies, already in the dtype it is multiplied in."""
        self.stats.sequence_inputs = True
        for slots, first in self._sinks():
            def rows(t: torch.Tensor, computed: bool = True) -> torch.Tensor:
                t = t[:1] if first else _batch_major(t)  # position 0 leads; all positions in any order
                return linear_rows(self._computed(t) if computed else t, t.shape[-1])

            with _autocast_off(self.device):
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


def check_autocast(dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` if it is a valid autocast dtype for collection (``None``: full precision)."""
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {dtype}")
    return dtype


def _autocast_off(device: torch.device):
    """Accumulate in the statistics' own dtype even inside the model's autocast region."""
    return torch.autocast(device.type, enabled=False)


def _autocast_on(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class _SharingChanged(RuntimeError):
    """The input sharing seen in the first forward pass did not hold in a later one."""


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

    def __init__(self, collector: "_Collector"):
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


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every module's own training flag restored after, even on error."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, f in flags.items():
            m.training = f


def _length(data: DataLike) -> int | None:
    """Number of samples in ``data`` when it is known without iterating (for the progress bar)."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, DataLoader):
        data = data.dataset
    try:
        return len(data) if isinstance(data, Dataset) else None  # type: ignore[arg-type]
    except TypeError:  # an iterable-style dataset without a length
        return None


def run_with_hooks(model: nn.Module, data: DataLike, collector: _Collector, batch_size: int, progress: bool, desc: str,
                   outputs: list[torch.Tensor | None] | None = None) -> int:
    """Run ``model`` over ``data`` in eval mode without autograd, feeding ``collector``; return the sample count.

    ``outputs``: emptied, then given the model's output per batch (:func:`batch_logits`).
    The hooks are removed and every module's training flag restored whatever happens.
    """
    from tqdm.auto import tqdm

    device = collector.device
    samples = 0
    # Fused transformer fast paths run whole encoder layers in one kernel, bypassing the module
    # calls our hooks watch; switch them off while collecting (restored after, whatever happens).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    collector.expected_samples = _length(data)
    if outputs is not None:
        outputs.clear()
    bar = tqdm(total=collector.expected_samples, desc=desc, unit="img", unit_scale=True, disable=not progress, leave=False)
    try:
        with _eval_no_grad(model):
            for x in iter_batches(data, batch_size):
                if x.shape[0] == 0:
                    continue
                collector.batch_samples = x.shape[0]
                with _autocast_on(device, collector.autocast), collector.capture():
                    y = model(x.to(device, non_blocking=True))
                collector.end_forward()
                if outputs is not None:
                    outputs.append(batch_logits(y, x.shape[0]))
                samples += x.shape[0]
                bar.update(x.shape[0])
        collector.end_collection()
    finally:
        bar.close()
        collector.remove()
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return samples


def batch_logits(output: object, rows: int) -> torch.Tensor | None:
    """A model's output on a batch of ``rows`` samples as float32 logits ``(rows, classes)`` (its
    ``.logits`` where it has them), or None where it is not such a tensor."""
    y = getattr(output, "logits", output)
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != rows:
        return None
    return y.detach().float()


def collection_setup(model: nn.Module, dtype: torch.dtype | None) -> tuple[list[EditTarget], torch.device, torch.dtype]:
    """The model's edit targets, its one device, and the accumulation dtype (default float32, or
    float64 for a model whose weights are float64); ``ValueError`` when nothing is editable or
    devices are mixed."""
    targets, _ = find_targets(model)
    if not targets:
        raise ValueError("the model has no layer deepunlearn can edit (Linear, Conv1d/2d/3d, MultiheadAttention)")
    device = model_device(model)
    return targets, device, dtype or default_dtype(targets)


def default_dtype(targets: list[EditTarget]) -> torch.dtype:
    """float32, enough for statistics and solves whatever the data (docs/solver.md); float64 where
    the model itself computes in float64."""
    return torch.float64 if any(t.weight().dtype == torch.float64 for t in targets) else torch.float32


def collect_statistics(
    model: nn.Module,
    data: DataLike,
    *,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    distributed: bool = True,
    keep_vectors: bool | str = True,
    first_token: bool = False,
    progress: bool = False,
    desc: str = "statistics",
    outputs: list[torch.Tensor | None] | None = None,
) -> Statistics:
    """Stream ``data`` through ``model`` and return every edited layer's input second moments.

    Args:
        model: the classifier; left exactly as it was (weights, training flags, hooks, requires_grad).
        data: a DataLoader, Dataset, tensor ``(N, ...)`` or iterable of batches ``x`` or ``(x, y, ...)``;
            batches are moved to the model's device.
        batch_size: batch size used when ``data`` is a tensor or a Dataset.
        dtype: accumulation dtype; default float32 (float64 for a float64 model).
        autocast: run the forward passes under ``torch.autocast`` with this dtype (``torch.bfloat16``
            or ``torch.float16``); each layer's statistics are then those of the reduced-precision
            inputs it really multiplies, accumulated in ``dtype``.
        distributed: when a ``torch.distributed`` process group is initialised, treat ``data`` as
            this rank's shard and return the sum over all ranks (every rank must call this).
        keep_vectors: keep a layer's input vectors themselves, ``(groups, n, d)``, while it sees
            fewer than its width ``d`` (less memory, and the solve then works on ``n × n``
            matrices): ``True`` (default) for linear inputs, and for conv inputs where that solve
            costs fewer flops than one from the ``d × d`` sum; ``"always"`` for every input;
            ``False``: always the ``(groups, d, d)`` sum.
        first_token: for inputs that are sequences, only the first position's vectors: every
            ``nn.Linear`` input of shape ``(batch, sequence, features)`` and every
            ``nn.MultiheadAttention`` input and output (in its own layout). For classifiers that
            read a class token at position 0 (ViT, DeiT): the statistics of what the head sees.
        progress: show a progress bar (images and images per second).
        desc: progress bar label.
        outputs: a list that is emptied, then given the model's output on each batch as float32
            logits ``(batch, classes)`` (its ``.logits`` where it has them; None for a batch whose
            output is no such tensor): the unedited predictions, at no extra forward pass.

    Raises:
        ValueError: empty data, no editable layer, the model on several devices, or non-finite
            statistics (the message names the first layer, in execution order, that saw them).
    """
    from . import distributed as dist

    targets, device, dtype = collection_setup(model, dtype)
    check_autocast(autocast)
    ranks = dist.world() if distributed else None
    try:
        stats, samples = _collect(model, data, targets, device, dtype, autocast, batch_size, progress, desc, keep_vectors,
                                  first_token, outputs)
    except Exception as exc:
        if ranks is None:
            raise
        stats, samples, error = Statistics(), 0, exc
    else:
        error = None
    return finish_statistics(model, stats, samples, error, ranks is not None, desc)


def finish_statistics(model: nn.Module, stats: Statistics, samples: int, error: BaseException | None,
                      distributed: bool, desc: str) -> Statistics:
    """Sum over ranks (if ``distributed``; a collective), check, and stamp with the model's fingerprint."""
    from . import distributed as dist

    if distributed:  # every rank reaches this collective, failed or not
        stats, samples = dist.all_reduce_statistics(stats, samples, error)
    elif error is not None:
        raise error
    if samples == 0:
        raise ValueError(f"no samples in the {desc} data: it yielded no non-empty batch")
    # a NaN or an infinity in any input vector, or an overflowed product, makes its diagonal entry
    # of C (Σ x_i²) non-finite, so the traces tell what checking all d² entries would
    traces = [moment_trace(s.moment).sum() for s in stats.slots.values()]
    finite = torch.isfinite(torch.stack(traces)).tolist() if traces else []
    for (name, slot), ok in zip(stats.slots.items(), finite):
        if not ok:
            raise ValueError(
                f"non-finite statistics at layer '{name}': its inputs contain NaN/Inf (or overflowed {slot.stored.dtype}); "
                "check the data and the layers before it"
            )
    stats.samples = samples
    stats.fingerprint = model_fingerprint(model)
    return stats


def collect_both_kinds(model: nn.Module, data: DataLike, *, batch_size: int = 256, dtype: torch.dtype | None = None,
                       autocast: torch.dtype | None = None, progress: bool = False, desc: str = "statistics",
                       outputs: list[torch.Tensor | None] | None = None) -> tuple[Statistics, Statistics | None]:
    """Every position's statistics and the first position's (``first_token``), from one set of
    forward passes; the second is None when no edited layer read a sequence. Slots that never saw a
    sequence are the same objects in both. In one process (not summed over ranks). ``outputs`` as
    for :func:`collect_statistics`."""
    targets, device, dtype = collection_setup(model, dtype)
    check_autocast(autocast)
    collector = _Collector(targets, device, dtype, autocast=autocast, keep_vectors="always", both_kinds=True)
    try:
        samples = run_with_hooks(model, data, collector, batch_size, progress, desc, outputs)
    except _SharingChanged:  # rare: collect each kind with one slot per layer
        full = collect_statistics(model, data, batch_size=batch_size, dtype=dtype, autocast=autocast, distributed=False,
                                  progress=progress, desc=desc, outputs=outputs)
        if not full.sequence_inputs:
            return full, None
        return full, collect_statistics(model, data, batch_size=batch_size, dtype=dtype, autocast=autocast,
                                        distributed=False, first_token=True, progress=progress, desc=desc)
    full = finish_statistics(model, collector.stats, samples, None, False, desc)
    if not full.sequence_inputs:
        return full, None
    token = Statistics({k: collector.token_slots.get(k, v) for k, v in full.slots.items()}, samples, "",
                       dict(full.aliases), first_token=True, sequence_inputs=True)
    return full, finish_statistics(model, token, samples, None, False, desc)


def _collect(model, data, targets, device, dtype, autocast, batch_size, progress, desc,
             keep_vectors: bool | str = True, first_token: bool = False,
             outputs: list[torch.Tensor | None] | None = None) -> tuple[Statistics, int]:
    collector = _Collector(targets, device, dtype, autocast=autocast, keep_vectors=keep_vectors, first_token=first_token)
    collector.stats.first_token = first_token
    try:
        samples = run_with_hooks(model, data, collector, batch_size, progress, desc, outputs)
    except _SharingChanged as exc:
        # Rare (layers whose inputs coincide only sometimes): collect again, one slot per layer.
        if isinstance(data, Iterator):
            raise ValueError(f"{exc}; pass data that can be iterated twice (a DataLoader, Dataset or tensor, "
                             "not a one-shot iterator) so the statistics can be collected again per layer") from exc
        warnings.warn(f"{exc}: collecting again with one statistic per layer", RuntimeWarning, stacklevel=3)
        collector = _Collector(targets, device, dtype, share_inputs=False, autocast=autocast, keep_vectors=keep_vectors,
                               first_token=first_token)
        collector.stats.first_token = first_token
        samples = run_with_hooks(model, data, collector, batch_size, progress, desc, outputs)
    return collector.stats, samples
