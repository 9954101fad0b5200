"""Planning edits: each edited layer's new weight computed from the statistics before any is written.

The second moments of every layer input (:func:`layer_moments`), each side solved once per input
(:func:`solved_edits`, :mod:`deepunlearn.weight_side`), and the plan (:func:`plan_edits_with`): per
layer its new weight and its report row, written by :func:`apply_plan` only once
every layer is planned, so that an error anywhere leaves the model unchanged.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from .head_refit import HeadRefit
from .layers import EditTarget
from .moments import Moment, moment_trace
from .ops.edit import edited_weight
from .report import LayerReport
from .statistics import Statistics
from .weight_side import (INVERSE_FACTOR_DEVICES, SOLVE_BATCH_BYTES, SideSolver, edited_weight_sides, factors_by_width,
                          side_solver, side_way)



def mean_keeping_bias(bias: torch.Tensor, w: torch.Tensor, new_weight: torch.Tensor,
                      mean: torch.Tensor) -> torch.Tensor:
    """The bias under which the edited layer's mean output over inputs of mean ``mean`` stays as it
    was: ``b + (W − W') μ`` per group (``W x + b`` and ``W' x + b'`` agree at ``x = μ``).

    ``bias``: the target's bias before the edit ``(out,)``; ``w`` / ``new_weight``: its weight
    before and after (its own shape, or ``(groups, out/groups, d)``); ``mean``: ``(groups, d)``.
    Returns a new tensor of the bias's shape and dtype.
    """
    dtype = torch.promote_types(new_weight.dtype, mean.dtype)
    delta = (w.to(dtype) - new_weight.to(dtype)).reshape(mean.shape[0], -1, mean.shape[1])  # (g, o/g, d)
    shift = (delta @ mean.to(device=delta.device, dtype=dtype)[:, :, None]).reshape(-1)
    return (bias.to(dtype) + shift).to(bias.dtype)


@dataclass
class PlannedEdit:
    target: EditTarget
    new_weight: torch.Tensor  # target.weight() shape and dtype
    new_bias: torch.Tensor | None = None  # target.bias() shape and dtype; None: the bias is kept


def apply_plan(plan: list[PlannedEdit]) -> None:
    """Write every planned weight (and bias) into its parameter (in place, without autograd)."""
    for p in plan:
        p.target.write(p.new_weight, p.new_bias)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's), so that the time taken so far is measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Moments = dict[tuple[str, ...], tuple[Moment | None, int]]  # slot tuple -> (C, dense or as vectors, or None; vectors)


def layer_moments(targets: Sequence[EditTarget], stats: Statistics, device: torch.device) -> Moments:
    """Second moment (dense ``(g, d, d)``, or the ``(g, n, d)`` vectors while ``n < d``) and vector
    count per distinct slot tuple.

    Targets reading one input (attention's packed q/k/v, or Linear layers the statistics record
    as sharing an input) get the very same object, so :func:`projections` solves once for them.
    """
    out: Moments = {}
    by_source: dict[tuple[str, ...], tuple[Moment | None, int]] = {}
    for t in targets:
        if t.slots in out:
            continue
        source = stats.resolve(t.slots)
        if source not in by_source:
            moment, n = stats.moment(t)
            by_source[source] = (None if moment is None else moment.to(device), n)
        out[t.slots] = by_source[source]
    return out


Means = dict[tuple[str, ...], "torch.Tensor | None"]  # slot tuple -> (g, d) mean input vector


def layer_means(targets: Sequence[EditTarget], stats: Statistics, device: torch.device) -> Means:
    """The mean input vector ``(g, d)`` per slot tuple of the targets that have a bias (None where
    no input reached it). Raises ``ValueError`` where the statistics hold no first moments."""
    out: Means = {}
    for t in targets:
        if t.slots in out or t.bias() is None:
            continue
        mean = stats.mean(t)
        if mean is None and stats.moment(t)[0] is not None:
            raise ValueError(f"the retain statistics hold no mean input of layer '{t.name}' (a statistics file of format "
                             "version 3 or older): collect them again to keep the retain mean, or do not keep it "
                             "(keep_retain_mean=False; --keep-retain-mean no)")
        out[t.slots] = None if mean is None else mean.to(device)
    return out


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU, by one transfer: on a GPU each transfer waits for the queued work,
    so one per layer would stall the queue as often."""
    if not tensors:
        return []
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors]).cpu()
    return [part.reshape(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def traces(moments: Moments) -> Moments:
    """The same dict with each second moment replaced by its per-group traces ``(g,)``, on the CPU."""
    on_device = map_shared({k: c for k, (c, _) in moments.items()}, moment_trace)
    keys = [k for k, tr in on_device.items() if tr is not None]
    host = dict(zip(keys, to_host([on_device[k] for k in keys])))
    return {k: (host.get(k), n) for k, (_, n) in moments.items()}


EditFn = Callable[[torch.Tensor], torch.Tensor]  # (g, o, d) weight -> (g, o, d) new weight, in the solve dtype


def plan_edits_with(
    targets: Sequence[EditTarget],
    edit_for: Callable[[EditTarget], EditFn],
    traces_f: Moments,
    traces_r: Moments,
    means_r: Means | None = None,
) -> tuple[list[PlannedEdit], list[LayerReport]]:
    """New weights for every target (nothing is written) and the per-layer report rows.

    ``edit_for(t)`` gives the function that maps the target's weight matrices to the new ones; it
    is asked only for targets the forget data reached. ``traces_f``/``traces_r`` map each slot
    tuple to the per-group energies ``tr(C)`` on the CPU (``None``: the data never reached it) and
    vector counts. ``means_r``: the retain samples' mean input per slot tuple (:func:`layer_means`);
    where given, each edited target with a bias gets the bias that keeps its mean output over the
    retain samples (:func:`mean_keeping_bias`). The weight changes and the
    finiteness checks come back in one transfer at the end.
    """
    plan, sums = [], []
    for t in targets:
        if traces_f[t.slots][0] is None:
            continue
        w = t.weight().detach()
        new = _edited(t, edit_for(t), w)
        sums.append(change_sums(new, w))
        mean = None if means_r is None else means_r.get(t.slots)
        plan.append(PlannedEdit(t, new.to(w.dtype), None if mean is None else mean_keeping_bias(t.bias(), w, new, mean)))
    sums = dict(zip((id(e.target) for e in plan), to_host(sums)))
    rows = []
    for t in targets:
        tr_f, n_f = traces_f[t.slots]
        tr_r, n_r = traces_r[t.slots]
        notes: list[str] = []
        change = 0.0
        if tr_f is None:
            notes.append("never reached by the forget data: unchanged")
        else:
            diff, norm, nonfinite = sums[id(t)].tolist()
            if nonfinite:
                raise RuntimeError(f"the edit produced non-finite weights at layer '{t.name}'; the model was not changed")
            change = math.sqrt(diff) / max(math.sqrt(norm), 1e-30)
            if (tr_f <= 0).any():
                notes.append(f"forget inputs all zero in group(s) {_zero_groups(tr_f)}: unchanged there")
            if tr_r is None:
                notes.append("never reached by the retain data: whole forget space removed")
            elif (tr_r <= 0).any():
                notes.append(f"retain inputs all zero in group(s) {_zero_groups(tr_r)}")
            if means_r is not None and means_r.get(t.slots) is not None:
                notes.append("bias shifted: the retain samples' mean output kept")
        energy_f = 0.0 if tr_f is None else float(tr_f.sum())
        energy_r = 0.0 if tr_r is None else float(tr_r.sum())
        w_shape = tuple(t.weight().shape)
        rows.append(LayerReport(t.name, t.kind, w_shape, t.groups, t.in_features, n_f, n_r, energy_f, energy_r, change, notes))
    return plan, rows


def rebalanced(plan: list[PlannedEdit], rows: list[LayerReport], head: EditTarget, shift: Sequence[float]) -> None:
    """Add ``shift`` (per class) to the planned bias of ``head`` (its current one where the plan
    keeps it), and say so in its report row; nothing where the forget data never reached it."""
    edit = next((p for p in plan if p.target is head), None)
    if edit is None:
        return
    bias = edit.new_bias if edit.new_bias is not None else head.bias().detach()
    edit.new_bias = (bias.double() + torch.tensor(list(shift), dtype=torch.float64, device=bias.device)).to(bias.dtype)
    next(r for r in rows if r.name == head.name).notes.append(
        "bias rebalanced: the held-out retain samples keep the unedited model's shares of the retained classes")


def refitted(plan: list[PlannedEdit], rows: list[LayerReport], head: EditTarget, refit: HeadRefit) -> None:
    """Write the re-fitted retained rows (:class:`~deepunlearn.head_refit.HeadRefit`) into the
    planned weight and bias of ``head``, and say so in its report row; nothing where the forget
    data never reached it."""
    edit = next((p for p in plan if p.target is head), None)
    if edit is None:
        return
    kept = torch.as_tensor(refit.kept, device=edit.new_weight.device)
    edit.new_weight = edit.new_weight.clone()
    edit.new_weight[kept] = refit.weight.to(edit.new_weight)
    if refit.bias is not None:
        bias = edit.new_bias if edit.new_bias is not None else head.bias().detach()
        edit.new_bias = bias - refit.forgotten_shift  # the forgotten classes' rows lowered, the others re-fitted
        edit.new_bias[kept] = refit.bias.to(bias)
    next(r for r in rows if r.name == head.name).notes.append(
        "retained classes' rows re-fitted: the retain samples keep the unedited model's logits (head_refit)")


CHANGE_CHUNK_ELEMENTS = 1 << 22  # the weight-change sums over slices of 16 MB (float32), not one o × d temporary


def change_sums(new: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[‖new − w‖²_F, ‖w‖²_F, 1 if new has a non-finite entry else 0]`` in float64, on the
    weights' device (no transfer), over row slices."""
    new2, w2 = new.reshape(new.shape[0], -1), w.reshape(w.shape[0], -1)
    rows = max(1, CHANGE_CHUNK_ELEMENTS // new2.shape[1])
    out = torch.zeros(3, dtype=torch.float64, device=w.device)
    for a, b in zip(new2.split(rows), w2.split(rows)):
        b = b.double()
        out[0] += (a.double() - b).square().sum()
        out[1] += b.square().sum()
        out[2] += (~torch.isfinite(a)).any()
    return out


def _edited(t: EditTarget, edit: EditFn, w: torch.Tensor) -> torch.Tensor:
    """The target's new weight, shaped as ``w``, in the solve dtype."""
    return edit(t.as_matrices(w)).reshape(w.shape)


def matrix_edit(m_r: torch.Tensor | None, m_f: torch.Tensor) -> EditFn:
    """The edit with both projections formed: ``W − (W − W M_r) M_f`` (``m_r`` None: ``M_r = 0``)."""
    m_r = torch.zeros_like(m_f) if m_r is None else m_r
    return lambda w: edited_weight(w.to(m_f.dtype), m_r, m_f)


def plan_edits(
    targets: Sequence[EditTarget],
    m_f: dict[tuple[str, ...], torch.Tensor | None],
    m_r: dict[tuple[str, ...], torch.Tensor | None],
    traces_f: Moments,
    traces_r: Moments,
) -> tuple[list[PlannedEdit], list[LayerReport]]:
    """:func:`plan_edits_with` for formed projections: ``m_f``/``m_r`` map each slot tuple to its
    ``(g, d, d)`` projection (``None``: the data never reached it)."""
    return plan_edits_with(targets, lambda t: matrix_edit(m_r[t.slots], m_f[t.slots]), traces_f, traces_r)


def solved_edits(
    targets: Sequence[EditTarget],
    moments_f: Moments,
    moments_r: Moments,
    alpha_f: float,
    alpha_r: float,
    solver: str = "cholesky",
    way: str = "auto",
    batch_bytes: int | None = None,
    inverse_factor: bool | None = None,
    spent_sides: Collection[str] = (),
) -> Callable[[EditTarget], EditFn]:
    """``edit_for`` for :func:`plan_edits_with`: solves each distinct input once.

    Each side of each input is applied the cheapest way for the rows of all layers reading it
    (:func:`~deepunlearn.weight_side.side_solver`: in the sample space where the statistics kept
    the input vectors, else on the weight's side by a Cholesky factor, from a low-rank spectrum
    where the input saw fewer vectors than its width, or with ``M`` formed);
    ``way`` forces one for both sides. The sides solved by a Cholesky factor are factored up front,
    same-width ones together in batches of at most ``batch_bytes`` of second moments (or one input;
    default :data:`SOLVE_BATCH_BYTES` for the device; 0: each when first asked, alone), as inverse
    factors where ``inverse_factor`` (default: on the devices of :data:`INVERSE_FACTOR_DEVICES`). An input's second
    moments are dropped from ``moments_f`` / ``moments_r`` once solved, and its solution once its
    last layer is planned, so that memory holds the statistics still to solve and the solutions
    still to apply. The sides named in ``spent_sides`` (``"f"``, ``"r"``: statistics the caller
    collected and needs no more) are factored in their second moments' own memory, without a copy.
    """
    key_of: dict[int, tuple[int, int]] = {}  # id(target) -> its input's key
    slots_of: dict[tuple[int, int], set[tuple[str, ...]]] = {}
    rows: dict[tuple[int, int], int] = {}
    users: dict[tuple[int, int], int] = {}
    for t in targets:
        cov_f, cov_r = moments_f[t.slots][0], moments_r[t.slots][0]
        if cov_f is None:
            continue
        k = key_of[id(t)] = (id(cov_f), id(cov_r))
        slots_of.setdefault(k, set()).add(t.slots)
        rows[k] = rows.get(k, 0) + t.as_matrices(t.weight()).shape[1]
        users[k] = users.get(k, 0) + 1
    moments_dtype = next((c.dtype for c, _ in moments_f.values() if c is not None), torch.float32)
    device = next((c.device for c, _ in moments_f.values() if c is not None), torch.device("cpu"))
    limit = SOLVE_BATCH_BYTES.get(device.type, 0) if batch_bytes is None else batch_bytes
    if inverse_factor is None:
        inverse_factor = device.type in INVERSE_FACTOR_DEVICES
    sides = {"f": (moments_f, alpha_f), "r": (moments_r, alpha_r)}
    factored: dict[tuple[tuple[int, int], str], SideSolver] = {}
    solved: dict[tuple[int, int], EditFn] = {}
    unfactored = limit > 0

    def consume(k: tuple[int, int], side: str) -> None:
        for slots in slots_of[k]:  # solved: the solution is all that is needed of them
            moments, _ = sides[side]
            moments[slots] = (None, moments[slots][1])

    def moment_of(k: tuple[int, int], side: str) -> tuple[Moment | None, int]:
        return sides[side][0][next(iter(slots_of[k]))]

    def factor_in_batches() -> None:
        """Every side solved by a Cholesky factor, same widths together (asked for with the first edit,
        once the caller has read the traces)."""
        members = []
        for k in slots_of:
            for side in sides:
                moment, n = moment_of(k, side)
                if moment is not None and side_way(moment, rows[k], n, way, solver) == "cholesky":
                    members.append((k, side))
        for batch in factors_by_width(members, lambda m: moment_of(*m)[0], lambda m: sides[m[1]][1], inverse_factor,
                                      limit):
            factored.update(batch)
            for m, _ in batch:
                consume(*m)

    def solve_side(k: tuple[int, int], side: str, moment: Moment | None, n: int) -> SideSolver | None:
        if (k, side) in factored:
            return factored.pop((k, side))
        return None if moment is None else side_solver(moment, sides[side][1], rows[k], n, way, solver,
                                                        overwrite=side in spent_sides)

    def edit_for(t: EditTarget) -> EditFn:
        k = key_of[id(t)]
        nonlocal unfactored
        if unfactored:
            unfactored = False
            factor_in_batches()
        if k not in solved:
            (cov_f, n_f), (cov_r, n_r) = moments_f[t.slots], moments_r[t.slots]
            consume(k, "f")
            consume(k, "r")
            retain = solve_side(k, "r", cov_r, n_r)
            del cov_r
            forget = solve_side(k, "f", cov_f, n_f)
            del cov_f
            solved[k] = lambda w: edited_weight_sides(w.to(moments_dtype), retain, forget)
        edit = solved[k]
        users[k] -= 1
        if users[k] == 0:
            del solved[k]
        return edit

    return edit_for


def _zero_groups(tr: torch.Tensor) -> list[int]:
    return torch.nonzero(tr <= 0).flatten().tolist()


def map_shared(values: dict, fn: Callable) -> dict:
    """``{k: fn(v)}``, calling ``fn`` once per distinct object (``None`` stays ``None``).

    Layers that read one input share one second-moment tensor; this solves it once for all.
    """
    done: dict[int, object] = {}
    out = {}
    for k, v in values.items():
        if v is not None and id(v) not in done:
            done[id(v)] = fn(v)
        out[k] = None if v is None else done[id(v)]
    return out
