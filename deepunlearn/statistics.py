"""The :class:`Statistics` of a model's edited layers: per layer, the second moment ``C = Σ x xᵀ``
of its inputs (or, while it has seen fewer vectors than its width ``d``, the vectors themselves;
:mod:`deepunlearn.moments`), with sums, moves, a fingerprint of the model they belong to, and files.

Collecting them is :mod:`deepunlearn.collect`'s job (hooks in :mod:`deepunlearn.hooks`). Nothing but
those buffers is kept, so memory is O(d²) per layer whatever the number of samples, and statistics
from different batches, shards or processes simply add.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import EditTarget, eager_module, find_targets
from .moments import Moment, SampleRows, dense, moment_sum, moment_trace

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
    model = eager_module(model)  # a torch.compile wrapper's fingerprint is its module's
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
        first_token: whether sequence inputs contributed one position only, ``token_position``
            (:func:`collect_statistics`'s ``first_token``).
        token_position: that position: 0 (a class token), or -1 (models that read their last
            position, as GPT-2's sequence classifiers do).
        sequence_inputs: whether an edited layer read sequences (an ``nn.Linear`` input of shape
            ``(batch, sequence, features)``, or ``nn.MultiheadAttention``): where ``first_token`` matters.
    """

    slots: dict[str, SlotStatistics] = field(default_factory=dict)
    samples: int = 0
    fingerprint: str = ""
    aliases: dict[str, str] = field(default_factory=dict)
    first_token: bool = False
    sequence_inputs: bool = False
    token_position: int = 0

    # -- combination and movement ---------------------------------------------------------
    def __add__(self, other: "Statistics") -> "Statistics":
        if not isinstance(other, Statistics):
            return NotImplemented
        if self.fingerprint != other.fingerprint:
            raise ValueError(
                f"cannot add statistics of different models (fingerprints {self.fingerprint} and {other.fingerprint})"
            )
        if self.first_token != other.first_token:
            raise ValueError("cannot add statistics of all sequence positions to statistics of one position only "
                             "(collected with different first_token)")
        if self.first_token and self.token_position != other.token_position:
            raise ValueError(f"cannot add statistics of sequence position {self.token_position} to those of position "
                             f"{other.token_position} (collected with different token_position)")
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
                          self.sequence_inputs or other.sequence_inputs, self.token_position)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Statistics":
        """A copy with every buffer moved to ``device`` and/or cast to ``dtype``."""
        return Statistics({k: SlotStatistics(v.moment.to(device=device, dtype=dtype), v.count,
                                             None if v.total is None else v.total.to(device=device, dtype=dtype))
                           for k, v in self.slots.items()},
                          self.samples, self.fingerprint, dict(self.aliases), self.first_token, self.sequence_inputs,
                          self.token_position)

    def expanded(self) -> "Statistics":
        """The same statistics with every alias turned into a slot of its own (sharing the buffer)."""
        slots = dict(self.slots)
        for name, owner in self.aliases.items():
            slots[name] = self.slots[owner]
        return Statistics(slots, self.samples, self.fingerprint, first_token=self.first_token,
                          sequence_inputs=self.sequence_inputs, token_position=self.token_position)

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
                + (["first_token"] if self.first_token else [])
                + ([self.token_position] if self.first_token and self.token_position else []))
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
            "token_position": self.token_position,
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
                        bool(blob.get("sequence_inputs", False)), int(blob.get("token_position", 0)))
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
        blob = load_blob(path)
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


def load_blob(path: str | os.PathLike) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated or not a torch file
        raise ValueError(f"cannot read statistics from {os.fspath(path)!r}: {exc}") from exc
