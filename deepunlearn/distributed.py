"""Data-parallel collection with ``torch.distributed``: statistics are sums, so summing them is exact.

When a process group is initialised (torchrun; NCCL on GPUs, gloo on CPUs), each rank streams
its own shard, :func:`all_reduce_statistics` sums the buffers over the ranks, and
:func:`on_rank0` runs the solve and the edit once, on rank 0, then broadcasts the new weights.
Every rank takes part in the same collectives in the same order, and an error on any rank is
raised on every rank (no rank is left waiting in a collective).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .moments import SampleRows, dense
from .statistics import SlotStatistics, Statistics

T = TypeVar("T")


def world() -> tuple[int, int] | None:
    """``(rank, world_size)`` when a process group with more than one rank is initialised, else ``None``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def _gather(obj: object) -> list:
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: every rank raises if any rank's ``error`` is set (message names the rank)."""
    errors = _gather(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        if error is not None:
            raise error
        rank, msg = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank}: {msg}")


def all_reduce_statistics(stats: Statistics, samples: int, error: BaseException | None) -> tuple[Statistics, int]:
    """Collective: the sum of every rank's statistics and sample count.

    A rank whose shard never reached a layer (or held no sample at all) contributes zeros there.
    Ranks disagreeing on a buffer's shape (different models) are refused on every rank. Slots that
    every rank kept as vectors, fewer than the width in all, stay vectors (gathered from every
    rank, in rank order); any other slot is summed in the dense form.
    """
    raise_if_any_failed(error, "collecting statistics")
    layout = {k: (tuple(v.moment.shape), str(v.stored.dtype)) for k, v in stats.slots.items()}
    kept = {k: v.moment.vectors for k, v in stats.slots.items() if isinstance(v.moment, SampleRows)}
    views = _gather((layout, stats.aliases, kept, stats.sequence_inputs))
    sequence_inputs = any(v[3] for v in views)
    views = [v[:3] for v in views]
    union: dict[str, tuple[tuple[int, ...], str]] = {}
    for rank, (lay, _, _) in enumerate(views):
        for k, shape_dtype in lay.items():
            if union.setdefault(k, shape_dtype) != shape_dtype:
                raise ValueError(f"ranks disagree on the statistics of layer '{k}' ({union[k]} against {shape_dtype} "
                                 f"on rank {rank}): every rank must run the same model")
    alias_sets = [a for lay, a, _ in views if lay]  # ranks that saw no sample have no say
    aliases = dict(alias_sets[0]) if alias_sets else {}
    if any(a != aliases for a in alias_sets):
        stats, aliases = stats.expanded(), {}  # some rank shared an input another did not: one slot per layer
        for a in alias_sets:
            for k, owner in a.items():
                union.setdefault(k, union[owner])
        views = [(lay, a, {}) for lay, a, _ in views]  # the slots' sharing differed: all summed dense
    device = stats.device
    if device is None:  # this rank saw nothing: take the others' layout
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    slots: dict[str, SlotStatistics] = {}
    counts = []
    for k in sorted(union):
        shape, dt = union[k]
        mine = stats.slots.get(k)
        dtype = getattr(torch, dt.replace("torch.", ""))
        vectors = [kept.get(k) if k in lay else 0 for lay, _, kept in views]  # None: that rank's is dense
        if any(kept for _, _, kept in views) and all(n is not None for n in vectors) and sum(vectors) < shape[-1]:
            moment = _gather_rows(None if mine is None else mine.moment.rows, vectors, shape, dtype, device)
        else:
            moment = dense(mine.moment) if mine is not None else torch.zeros(shape, dtype=dtype, device=device)
            torch.distributed.all_reduce(moment)
        total = mine.total.clone() if mine is not None and mine.total is not None else torch.zeros(
            shape[:-1], dtype=dtype, device=device)
        torch.distributed.all_reduce(total)
        slots[k] = SlotStatistics(moment, 0, total)
        counts.append(0 if mine is None else mine.count)
    total = torch.tensor([*counts, samples], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    for k, n in zip(slots, total[:-1].tolist()):
        slots[k].count = n
    order = [k for k in stats.slots if k in slots] + [k for k in slots if k not in stats.slots]
    samples = int(total[-1])
    return (Statistics({k: slots[k] for k in order}, samples, stats.fingerprint, aliases, stats.first_token, sequence_inputs,
                       stats.token_position),
            samples)


def _gather_rows(rows: torch.Tensor | None, vectors: list[int], shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> SampleRows:
    """Collective: every rank's ``(g, n_rank, d)`` vectors of one slot, concatenated in rank order."""
    g, _, d = shape
    padded = torch.zeros(g, max(vectors), d, dtype=dtype, device=device)  # all_gather needs one shape
    if rows is not None:
        padded[:, : rows.shape[1]] = rows
    parts = [torch.empty_like(padded) for _ in vectors]
    torch.distributed.all_gather(parts, padded)
    return SampleRows(torch.cat([p[:, :n] for p, n in zip(parts, vectors)], dim=1))


def on_rank0(fn: Callable[[], T], tensors: Sequence[torch.Tensor]) -> T:
    """Run ``fn`` on rank 0 only, then broadcast its result and the (edited) ``tensors`` to every rank.

    Without a process group this is just ``fn()``. An exception on rank 0 is re-raised on every rank.
    """
    if world() is None:
        return fn()
    dist = torch.distributed
    box: list = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # re-raised below, after the other ranks were told
            error = exc
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"the solve failed on rank 0: {value}")
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)
    return value


def shard(indices: list[int]) -> list[int]:
    """This rank's share of ``indices`` (every ``world_size``-th one), or all of them without a process group."""
    w = world()
    return indices if w is None else indices[w[0] :: w[1]]
