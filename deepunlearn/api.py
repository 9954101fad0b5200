"""The drop-in calls: :func:`unlearn` on forget/retain data, :func:`forget_classes` on a labelled dataset."""
from __future__ import annotations

import copy
import functools
import math
import operator
import time
import warnings
from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import distributed
from ._batches import DataLike
from .edit import PlannedEdit, apply_plan, edited_weight, mean_keeping_bias
from .head_refit import HeadRefit
from .candidates import candidate_edits
from .auto_alpha import (CHECK_SAMPLES, HEAD_ALPHA_F, TARGET_FORGET_ACCURACY, choice_rank, choose_alphas,
                         fold_split, holdout_split, make_scorer, materialise, reads_first_position)
from .weight_side import (INVERSE_FACTOR_DEVICES, SOLVE_BATCH_BYTES, SideSolver, edited_weight_sides, factors_by_width,
                          side_solver, side_way)
from .layers import EditTarget, SkippedLayer, find_targets
from .moments import Moment, dense, moment_trace
from .projection import check_alpha, check_solver
from .report import LayerReport, UnlearnReport
from .collect import collect_both_kinds, collect_statistics
from .statistics import Statistics, fingerprint_once, model_device

ProjectionFn = Callable[[torch.Tensor], torch.Tensor]  # (g, d, d) second moment -> (g, d, d) M


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_statistics(model: nn.Module, data: DataLike | Statistics, role: str, **collect_kwargs) -> Statistics:
    """``data`` as :class:`Statistics` of ``model``: collected, or checked against the model (and
    ``first_token``) if given."""
    if isinstance(data, Statistics):
        data.check_matches(model)
        if data.samples == 0 or not data.slots:
            raise ValueError(f"the {role} statistics are empty")
        wanted = collect_kwargs.get("first_token", False)
        if data.first_token != wanted:
            raise ValueError(f"the {role} statistics were collected with first_token={data.first_token}, but the call "
                             f"has first_token={wanted}")
        return data
    if data is None:
        raise ValueError(f"no {role} data given")
    return collect_statistics(model, data, desc=role, **collect_kwargs)


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
    retain samples (:func:`~deepunlearn.edit.mean_keeping_bias`). The weight changes and the
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


def projections(moments: Moments, proj: ProjectionFn) -> dict[tuple[str, ...], torch.Tensor | None]:
    """``proj`` of every second moment (in the dense form), solved once per distinct tensor."""
    return map_shared({k: cov for k, (cov, _) in moments.items()}, lambda c: proj(dense(c)))


def unlearn(
    model: nn.Module,
    forget: DataLike | Statistics,
    retain: DataLike | Statistics,
    *,
    alpha_r: float | None = None,
    alpha_f: float | None = None,
    alpha_f_head: float | None = None,
    classes: Sequence[int] | None = None,
    target_forget_accuracy: float = TARGET_FORGET_ACCURACY,
    solver: str = "cholesky",
    inplace: bool = True,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    skip_first_layer: bool | None = None,
    first_token: bool | None = None,
    keep_retain_mean: bool | None = None,
    refit_head: bool | None = None,
    progress: bool = False,
) -> UnlearnReport:
    """Make ``model`` forget the classes that ``forget`` holds, keeping what ``retain`` holds. No training.

    For every weight matrix ``W`` (``Linear``, ``Conv1d/2d/3d`` per group, ``MultiheadAttention``
    input and output projections, the classifier head) the second moments ``C_f``, ``C_r`` of its
    inputs on the two data sets give scaled projections ``M_f = M(C_f, alpha_f)``,
    ``M_r = M(C_r, alpha_r)``, and ``W ← W − (W (I − M_r)) M_f``. Biases are unchanged unless
    ``keep_retain_mean``. All statistics are collected on the original model, every new weight is
    computed, and only then is anything written: on any error the model is left as it was.

    Args:
        model: a trained classifier on one device (CPU or CUDA). Not wrapped or modified in structure.
        forget: samples of the classes to forget: a DataLoader, a Dataset, a tensor ``(N, ...)``, an
            iterable of batches ``x`` or ``(x, y, ...)``, or :class:`Statistics` collected on this model.
        retain: samples of the classes to keep, in any of the same forms (the paper uses about
            100 per retain class).
        alpha_r: scale of the retain space, > 0 (paper: 100 for CIFAR-10 and ImageNet, 1000 for CIFAR-100).
            None (default): chosen automatically, with ``alpha_f``.
        alpha_f: scale of the forget space, > 0 (paper: 3 for CIFAR-10, 30 for CIFAR-100, 10 for ImageNet).
            None (default): chosen automatically. Choosing splits the forget samples into four
            folds, each scored by candidate pairs edited from the other folds' statistics, and
            holds out a quarter of the retain samples (at most 512); per ``alpha_r`` it keeps the
            smallest ``alpha_f`` whose forget accuracy over the folds is at most
            ``target_forget_accuracy``, and of those the one whose held-out retain samples keep the
            highest mean probability of their right class (else the best
            ``retain · (100 − forget)``, with a warning); the edit then uses all samples.
            Accuracies come from the labels where the batches are ``(x, y)``; else from
            ``classes``; else from agreement with the unedited model. The classifier head (the last
            layer the input reaches, a ``Linear`` whose output is the model's) may take its own
            scale: each candidate pair is also scored with the head at each of
            :data:`~deepunlearn.auto_alpha.HEAD_ALPHA_F` (read from one forward pass), and the best
            is kept (``report.alpha_f_head``).
        alpha_f_head: the classifier head's own forget scale, > 0. None (default): ``alpha_f``
            where that is given, else chosen with it. Where the head cannot take its own scale (it
            shares its input with other weights, is not a ``Linear``, or is the only layer edited),
            giving it is an error.
        classes: the class indices being forgotten, if known (scores the forget side without labels).
        target_forget_accuracy: held-out forget accuracy (percent) the automatic choice aims at.
        solver: ``"cholesky"`` (default, no decomposition), ``"eigh"`` or ``"svd"``; all give the same result.
        inplace: edit ``model`` itself (default) or a deep copy of it, returned as ``report.model``.
        batch_size: batch size used when ``forget``/``retain`` is a tensor or a Dataset.
        dtype: statistics and solve dtype; default float32 (float64 for a float64 model). float32 is
            enough: the solved matrices have condition number at most α (docs/solver.md).
        autocast: collect under ``torch.autocast`` with ``torch.bfloat16`` or ``torch.float16`` (faster
            forward passes on GPUs); statistics are still accumulated and solved in ``dtype``.
        skip_first_layer: leave the first layer the input reaches (a CNN's stem, a ViT's patch
            embedding) unedited: it reads raw pixels, which every class shares. None (default):
            skipped when the scales are chosen automatically (there it cost less retain accuracy for
            the same forgetting in most cases measured, docs/auto_alpha.md), edited when both are
            given (the paper's procedure). A model with one editable layer always has it edited.
        first_token: statistics of sequence inputs from their first position only (the class token
            of ViT-style classifiers, which is all their head reads; see
            :func:`~deepunlearn.collect_statistics`). None (default): when the scales are chosen and
            the model reads sequences, both ways are scored (the first position's with the retain
            mean kept, ``keep_retain_mean``) and the better kept (on the suite's ViT the first
            position's statistics cut the retain cost of forgetting several-fold, docs/auto_alpha.md); with both scales given, the kind of the :class:`Statistics` given, else
            every position (the paper's procedure).
        keep_retain_mean: shift the bias of every edited layer that has one so that its mean
            output over the retain samples stays as it was: ``b ← b + (W − W') μ_r``, with ``μ_r``
            the retain samples' mean input of the layer (of the first position, with
            ``first_token``). The edit then moves a forget sample's inputs towards the retain mean
            in the removed directions, not towards zero. Layers without a bias (convolutions
            before batch norm) keep the plain edit. None (default): on with the first position's
            statistics when the scales are chosen (on the suite's ViT it lowered the retain cost
            of forgetting two and three classes by 2–3 points; on CNNs, where the inputs of the
            biased layers are post-ReLU features, it cost far more: docs/auto_alpha.md), else off.
        refit_head: correct the classifier head after the edit, which takes from the retained
            classes the features they share with the forgotten ones. Its retained classes' rows
            are re-fitted by ridge regression so that the retain samples' logits under the edited
            body are the unedited model's again, the forget samples' staying as edited
            (:mod:`~deepunlearn.head_refit`; ``report.alpha_choice.head_refit``), where
            cross-validation over the folds shows it still forgetting and keeping at least the
            retain accuracy; else its bias is shifted so that the held-out retain samples keep the
            unedited model's shares of the retained classes, never raising a forgotten class's
            logit against a retained one (:func:`~deepunlearn.auto_alpha.rebalanced_shift`;
            ``report.alpha_choice.head_shift``). Needs the automatic choice (its folds and held-out
            samples); done where the head has a bias and the model's output is the head's. None
            (default): on when the scales are chosen (docs/auto_alpha.md); True with both scales
            given is an error.
        progress: show progress bars while collecting.

    With a ``torch.distributed`` process group initialised, every rank calls this with its own
    shard of ``forget`` and ``retain``: the statistics are summed over the ranks, rank 0 solves and
    edits, and the new weights are broadcast, so every rank ends with the same model.

    Returns:
        :class:`UnlearnReport` with the edited model, per-layer shapes, vector counts, energies and
        weight changes, skipped layers, the scales used and how they were chosen
        (``alpha_choice``), and seconds spent collecting, choosing, solving and editing.

    Raises:
        ValueError: empty data, ``alpha`` not finite and positive, unknown solver, no editable layer,
            model on several devices, statistics from another model, non-finite activations; with
            a scale to choose: :class:`Statistics` instead of samples, fewer than 2 samples on a
            side, a target outside (0, 100], or torch.distributed (give both scales there).
    """
    t_start = time.perf_counter()
    alpha_r = None if alpha_r is None else check_alpha(alpha_r, "alpha_r")
    alpha_f = None if alpha_f is None else check_alpha(alpha_f, "alpha_f")
    alpha_f_head = None if alpha_f_head is None else check_alpha(alpha_f_head, "alpha_f_head")
    check_solver(solver)
    if keep_retain_mean not in (None, True, False):
        raise ValueError(f"keep_retain_mean must be True, False or None, got {keep_retain_mean!r}")
    if refit_head not in (None, True, False):
        raise ValueError(f"refit_head must be True, False or None, got {refit_head!r}")
    choosing = alpha_r is None or alpha_f is None
    if refit_head and not choosing:
        raise ValueError("refit_head=True needs the automatic choice of alpha (it uses its held-out retain samples); "
                         "leave alpha_r or alpha_f unset, or set refit_head=False")
    keep_mean = bool(keep_retain_mean)
    if choosing:
        _check_choosing(forget, retain, target_forget_accuracy)
    targets, skipped = find_targets(model)
    if not targets:
        raise ValueError("the model has no layer deepunlearn can edit (Linear, Conv1d/2d/3d, MultiheadAttention)")
    device = model_device(model)
    if not inplace:
        model = copy.deepcopy(model)
        targets, skipped = find_targets(model)
    if first_token is None and not choosing:  # statistics given: their kind; else every position (the paper's)
        given = [s.first_token for s in (forget, retain) if isinstance(s, Statistics)]
        first_token = given[0] if given else False
    kw = dict(batch_size=batch_size, dtype=dtype, autocast=autocast, progress=progress, first_token=bool(first_token))

    both_kinds = choosing and first_token is None  # every position's and the first position's, in one pass

    def kinds(x: torch.Tensor, role: str, outputs: list | None = None, only: bool | None = None) -> dict[bool, Statistics]:
        """The statistics of samples ``x`` by kind (``first_token``): both where both are wanted
        (unless ``only`` names one); ``outputs`` gets the unedited model's logits per batch
        (:func:`~deepunlearn.collect.collect_statistics`)."""
        if not both_kinds or only is not None:
            one = bool(first_token) if only is None else only
            return {one: collect_statistics(model, x, desc=role, outputs=outputs, **(kw | {"first_token": one}))}
        full, token = collect_both_kinds(model, x, batch_size=batch_size, dtype=dtype, autocast=autocast,
                                         progress=progress, desc=role, outputs=outputs)
        return {False: full} | ({} if token is None else {True: token})

    def logits(outputs: list) -> torch.Tensor | None:
        return None if not outputs or any(y is None for y in outputs) else torch.cat(outputs)

    def edited_and_head(stats: Statistics) -> tuple[list[EditTarget], list[SkippedLayer], EditTarget | None]:
        """The targets (the first layer left where asked) and the classifier head, from the order in
        which the forward passes of ``stats`` reached them."""
        edited, left = targets, skipped
        if (choosing if skip_first_layer is None else skip_first_layer) and len({t.layer for t in targets}) > 1:
            first = first_layer(targets, stats)
            if first is not None:
                edited = [t for t in targets if t.layer != first]
                left = [*skipped, SkippedLayer(first, _FIRST_LAYER)]
        return edited, left, classifier_head(edited, stats) if choosing or alpha_f_head is not None else None

    t0 = time.perf_counter()
    class_token = False  # the output read from the first position alone (choosing, sequence models): every
    # position's statistics are then collected and scored only where the first position's miss the target
    if choosing:  # the statistics of each forget fold, and of the retain fit and held-out parts
        with fingerprint_once():  # six collections of the same weights
            x_f, y_f = materialise(forget, batch_size, "forget")
            x_r, y_r = materialise(retain, batch_size, "retain")
            folds_f = fold_split(len(x_f), "forget")
            fit_r, held_r = holdout_split(len(x_r), "retain")
            outputs_f: list[list] = [[] for _ in folds_f]
            parts_f = [kinds(x_f[folds_f[0]], "forget", outputs_f[0])]
            stats_f = parts_f[0][min(parts_f[0])]  # every position's where both kinds were collected
            targets, skipped, head = edited_and_head(stats_f)
            if len(parts_f[0]) > 1 and head is not None:
                class_token = reads_first_position(model, x_r[held_r][:CHECK_SAMPLES].to(device), head.module, autocast)
            only = True if class_token else None
            parts_f += [kinds(x_f[i], "forget", out, only) for i, out in zip(folds_f[1:], outputs_f[1:])]
            _sync(device)
            t1 = time.perf_counter()
            outputs_r, outputs_fit = [], []
            parts_r = [kinds(x_r[fit_r], "retain", outputs_fit, only), kinds(x_r[held_r], "retain", outputs_r, only)]
    else:
        stats_f = gather_statistics(model, forget, "forget", **kw)
        targets, skipped, head = edited_and_head(stats_f)
        _sync(device)
        t1 = time.perf_counter()
        stats_r = gather_statistics(model, retain, "retain", **kw)
    _sync(device)
    t2 = t_chosen = time.perf_counter()
    if alpha_f_head is not None and head is None:
        raise ValueError("alpha_f_head was given, but the last layer the input reaches cannot take its own scale (it must "
                         "be a Linear whose input no other edited weight reads, beside other edited layers)")
    choice = None
    if choosing:
        scorer = make_scorer(model, [x_f[i] for i in folds_f], None if y_f is None else [y_f[i] for i in folds_f],
                             x_r[held_r], None if y_r is None else y_r[held_r], classes, batch_size, autocast,
                             edited=[getattr(t.module, t.param) for t in targets],
                             original=([logits(o) for o in outputs_f], logits(outputs_r)))
        logits_fit = logits(outputs_fit)
        refit_on = None if logits_fit is None or refit_head is False else (
            x_r[fit_r], logits_fit, y_r[fit_r] if y_r is not None else logits_fit.argmax(-1).cpu())
        del outputs_f, outputs_r, outputs_fit
        # the first position's statistics first (True): on class-token models they win, and their best
        # held-out retain accuracy then bounds the search with every position's
        modes = sorted(parts_f[0], reverse=True)
        head_options = (alpha_f_head,) if alpha_f_head is not None else (None,) if alpha_f is not None else (None, *HEAD_ALPHA_F)
        best = None
        for mode in modes:
            if not mode and class_token and best is not None and best[0].reached_target:
                best[0].every_position_skipped = True
                break
            with fingerprint_once():  # the weights chosen from are back in place
                for x, part in [*zip((x_f[i] for i in folds_f), parts_f), (x_r[fit_r], parts_r[0]), (x_r[held_r], parts_r[1])]:
                    if mode not in part:  # a class-token model's first position missed: every position's too
                        part |= kinds(x, "statistics, every position", None, mode)
            folds = [p[mode] for p in parts_f]

            def forget_fit(k: int, folds: list[Statistics] = folds) -> Moments:
                """The forget moments of every fold but ``k``."""
                return layer_moments(targets, functools.reduce(operator.add, folds[:k] + folds[k + 1:]), device)

            parts = (folds, parts_r[0][mode], parts_r[1][mode])
            keep = mode if keep_retain_mean is None else keep_retain_mean
            candidates = candidate_edits(targets, forget_fit(0), layer_moments(targets, parts[1], device),
                                         [functools.partial(forget_fit, k) for k in range(1, len(folds))], head,
                                         layer_means(targets, parts[1], device) if keep else None)
            with warnings.catch_warnings(record=True) as caught:  # only the kept mode's warning is shown
                warnings.simplefilter("always")
                bound = best[0].retain_prob if best is not None and best[0].reached_target else None
                c = choose_alphas(model, candidates, scorer, alpha_r=alpha_r, alpha_f=alpha_f, target=target_forget_accuracy,
                                  bound=bound, head_alphas=head_options, rebalance=refit_head is not False,
                                  refit_on=refit_on)
            del candidates
            c.first_token, c.keep_retain_mean = mode, keep
            if best is None or choice_rank(c) > choice_rank(best[0]):
                best = (c, parts, caught)
        choice, (folds, fit_sr, held_sr), caught = best
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        del scorer, best, parts_f, parts_r, refit_on
        alpha_r, alpha_f, alpha_f_head, keep_mean = choice.alpha_r, choice.alpha_f, choice.alpha_f_head, choice.keep_retain_mean
        stats_f, stats_r = functools.reduce(operator.add, folds), fit_sr + held_sr  # the edit uses every sample
        del folds, fit_sr, held_sr
        _sync(device)
        t_chosen = time.perf_counter()
        choice.seconds = t_chosen - t2  # decomposing and scoring

    samples_f, samples_r = stats_f.samples, stats_r.samples
    shift = None if choice is None else choice.head_shift
    head_refit = None if choice is None else choice.head_refit

    def solve_and_edit() -> tuple[list[LayerReport], float]:
        nonlocal stats_f, stats_r
        moments_f = layer_moments(targets, stats_f, device)
        moments_r = layer_moments(targets, stats_r, device)
        means_r = layer_means(targets, stats_r, device) if keep_mean else None
        stats_f = stats_r = None  # statistics collected here are freed as each input is solved
        if all(cov is None for cov, _ in moments_f.values()):
            raise ValueError("the forget data reached none of the editable layers")
        spent = [side for side, given in (("f", forget), ("r", retain)) if not isinstance(given, Statistics)]
        if alpha_f_head is None:
            edit_for = solved_edits(targets, moments_f, moments_r, alpha_f, alpha_r, solver, spent_sides=spent)
        else:  # the head solved with its own forget scale, the body with alpha_f
            body_edit = solved_edits([t for t in targets if t is not head], moments_f, moments_r, alpha_f, alpha_r, solver,
                                     spent_sides=spent)
            head_edit = solved_edits([head], moments_f, moments_r, alpha_f_head, alpha_r, solver, spent_sides=spent)
            edit_for = lambda t: head_edit(t) if t is head else body_edit(t)  # noqa: E731
        plan, rows = plan_edits_with(targets, edit_for, traces(moments_f), traces(moments_r), means_r)
        if shift is not None:
            rebalanced(plan, rows, head, shift)
        if head_refit is not None:
            refitted(plan, rows, head, head_refit)
        _sync(device)
        t_solved = time.perf_counter()
        apply_plan(plan)
        return rows, t_solved - t_chosen

    # Under torch.distributed: solved and written once, on rank 0; the new weights are broadcast.
    params = [getattr(t.module, t.param) for t in targets]
    if keep_mean:
        params += [b for t in targets if (b := t.bias_parameter()) is not None]
    if shift is not None or head_refit is not None:  # the head's weight is a target's already
        params.append(head.bias_parameter())
    edited = list({id(p): p for p in params}.values())
    rows, solve_seconds = distributed.on_rank0(solve_and_edit, [p.data for p in edited])
    _sync(device)
    t4 = time.perf_counter()
    t3 = t_chosen + solve_seconds
    unreached = [r for r in rows if r.forget_vectors == 0 and r.retain_vectors == 0]
    rows = [r for r in rows if r not in unreached]
    skipped = [*skipped, *(SkippedLayer(r.name, _UNREACHED) for r in unreached)]

    seconds = {
        "collect_forget": t1 - t0,
        "collect_retain": t2 - t1,
        "choose_alpha": t_chosen - t2,
        "decompose": t3 - t_chosen,
        "edit": t4 - t3,
        "total": t4 - t_start,
    }
    return UnlearnReport(
        model, rows, [(s.name, s.reason) for s in skipped], samples_f, samples_r, alpha_r, alpha_f, solver, seconds,
        choice, alpha_f_head, keep_mean,
    )


def _check_choosing(forget: object, retain: object, target: float) -> None:
    """The errors of a call that is to choose a scale, before any work."""
    if isinstance(forget, Statistics) or isinstance(retain, Statistics):
        raise ValueError("choosing alpha automatically needs the forget and retain samples themselves (held-out ones "
                         "score the candidates), not Statistics; give alpha_r and alpha_f with Statistics")
    if distributed.world() is not None:
        raise ValueError("under torch.distributed give alpha_r and alpha_f: the automatic choice runs in one process")
    if not (isinstance(target, (int, float)) and 0 < target <= 100):
        raise ValueError(f"target_forget_accuracy must be a percentage in (0, 100], got {target!r}")


_FIRST_LAYER = "the first layer the input reaches (skip_first_layer): unchanged"


def _reached_at(targets: Sequence[EditTarget], stats: Statistics) -> dict[int, float]:
    """Per target (by id), the position among ``stats``' slots at which the forward passes first reached its input (inf: never)."""
    order = {slot: i for i, slot in enumerate(stats.slots)}
    return {id(t): min((order[s] for s in stats.resolve(t.slots) if s in order), default=math.inf) for t in targets}


def first_layer(targets: Sequence[EditTarget], stats: Statistics) -> str | None:
    """The layer (:attr:`EditTarget.layer`) of ``targets`` whose input the forward passes of
    ``stats`` reached first, or None if they reached none."""
    rank = _reached_at(targets, stats)
    first = min(targets, key=lambda t: rank[id(t)])
    return first.layer if rank[id(first)] < math.inf else None


def classifier_head(targets: Sequence[EditTarget], stats: Statistics) -> EditTarget | None:
    """The target that may take its own ``alpha_f``: the input the forward passes of ``stats``
    reached last, where it is a whole ``nn.Linear`` weight that no other target reads the input of,
    beside at least one other target; else None."""
    rank = _reached_at(targets, stats)
    reached = [t for t in targets if rank[id(t)] < math.inf]
    if len(reached) < 2:
        return None
    last = max(reached, key=lambda t: rank[id(t)])
    alone = all(t is last or not set(stats.resolve(t.slots)) & set(stats.resolve(last.slots)) for t in targets)
    whole_linear = isinstance(last.module, nn.Linear) and last.param == "weight" and last.rows is None and last.groups == 1
    return last if alone and whole_linear else None


_UNREACHED = ("its module was never called during the forward passes, nor its weight passed to F.linear / F.conv "
              "(the model may use it another way, e.g. a raw matrix product): unchanged")


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Integer labels of every sample of a labelled dataset, as a 1-d tensor."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "tensors") and len(dataset.tensors) > 1:
        targets = dataset.tensors[1]
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.long).flatten()


def class_balanced_indices(labels: torch.Tensor, classes: Sequence[int], total: int, generator: torch.Generator) -> list[int]:
    """Up to ``total`` indices spread evenly over ``classes`` (random within each class)."""
    per = [torch.nonzero(labels == c).flatten() for c in classes]
    base, extra = divmod(total, len(classes))
    out: list[int] = []
    for i, idx in enumerate(per):
        k = min(len(idx), base + (1 if i < extra else 0))
        out += idx[torch.randperm(len(idx), generator=generator)[:k]].tolist()
    return sorted(out)


def draw_samples(labels: torch.Tensor, classes: int | Sequence[int], retain_per_class: int,
                 forget_samples: int | None, seed: int) -> tuple[list[int], list[int]]:
    """The paper's sample draw: ``(forget indices, retain indices)`` into a dataset with ``labels``.

    ``retain_per_class`` random samples of every class not in ``classes``, and ``forget_samples``
    samples of the ``classes`` spread evenly over them (default: as many as the retain sample,
    capped by what the classes hold). Raises ``ValueError`` naming what is wrong with the request.
    """
    forget_set = sorted({int(c) for c in ([classes] if isinstance(classes, int) else classes)})
    if not forget_set:
        raise ValueError("no class to forget given")
    if retain_per_class < 1:
        raise ValueError(f"retain_per_class must be at least 1, got {retain_per_class}")
    present = set(labels.unique().tolist())
    missing = [c for c in forget_set if c not in present]
    if missing:
        raise ValueError(f"class(es) {missing} do not occur in the dataset (its classes: {sorted(present)})")
    keep = sorted(present - set(forget_set))
    if not keep:
        raise ValueError("forgetting every class leaves nothing to retain")
    g = torch.Generator().manual_seed(seed)
    retain_idx = class_balanced_indices(labels, keep, retain_per_class * len(keep), g)
    n_forget = retain_per_class * len(keep) if forget_samples is None else int(forget_samples)
    if n_forget < 1:
        raise ValueError(f"forget_samples must be at least 1, got {forget_samples}")
    forget_idx = class_balanced_indices(labels, forget_set, n_forget, g)
    return forget_idx, retain_idx


def forget_classes(
    model: nn.Module,
    dataset: Dataset,
    classes: int | Sequence[int],
    *,
    retain_per_class: int = 100,
    forget_samples: int | None = None,
    seed: int = 0,
    **unlearn_kwargs,
) -> UnlearnReport:
    """Forget whole ``classes`` using samples drawn from a labelled ``dataset``.

    Draws ``retain_per_class`` random samples of every other class (paper: 100 per class, 900
    for a 10-class problem) and ``forget_samples`` samples of the forgotten classes, spread
    evenly over them (default: as many as the retain sample), then calls :func:`unlearn`.

    Args:
        model: as in :func:`unlearn`.
        dataset: a labelled map-style dataset yielding ``(x, y, ...)``; labels are read from its
            ``targets`` attribute when it has one.
        classes: the class index, or indices, to forget (several in one call).
        retain_per_class: retain samples per kept class.
        forget_samples: total forget samples; default ``retain_per_class * number of kept classes``.
        seed: seed of the random draw (under ``torch.distributed`` each rank streams its share of the draw).
        **unlearn_kwargs: passed to :func:`unlearn` (``alpha_r``, ``alpha_f``, ``solver``, ``inplace``...).
    """
    forget_idx, retain_idx = draw_samples(dataset_labels(dataset), classes, retain_per_class, forget_samples, seed)
    unlearn_kwargs.setdefault("classes", [classes] if isinstance(classes, int) else list(classes))
    # Under torch.distributed every rank draws the same indices (same seed) and streams its share.
    return unlearn(model, Subset(dataset, distributed.shard(forget_idx)), Subset(dataset, distributed.shard(retain_idx)),
                   **unlearn_kwargs)
