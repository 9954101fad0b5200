"""The drop-in calls: :func:`unlearn` on forget/retain data, :func:`forget_classes` on a labelled dataset."""
from __future__ import annotations

import copy
import functools
import math
import operator
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import distributed
from ._batches import DataLike
from .auto_alpha import HEAD_ALPHA_F, TARGET_FORGET_ACCURACY, choice_rank, choose_alphas
from .sampling import fold_split, holdout_split, materialise
from .scoring import CHECK_SAMPLES, make_scorer, reads_first_position
from .candidates import candidate_edits
from .collect import collect_both_kinds, collect_statistics
from .edit import apply_plan
from .layers import EditTarget, SkippedLayer, find_targets
from .plan import (Moments, layer_means, layer_moments, plan_edits_with, rebalanced, refitted, solved_edits,
                   synchronize, traces)
from .projection import check_alpha, check_solver
from .report import LayerReport, UnlearnReport
from .sampling import dataset_labels, draw_samples
from .statistics import Statistics, fingerprint_once, model_device


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
            logit against a retained one (:func:`~deepunlearn.scoring.rebalanced_shift`;
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
            synchronize(device)
            t1 = time.perf_counter()
            outputs_r, outputs_fit = [], []
            parts_r = [kinds(x_r[fit_r], "retain", outputs_fit, only), kinds(x_r[held_r], "retain", outputs_r, only)]
    else:
        stats_f = gather_statistics(model, forget, "forget", **kw)
        targets, skipped, head = edited_and_head(stats_f)
        synchronize(device)
        t1 = time.perf_counter()
        stats_r = gather_statistics(model, retain, "retain", **kw)
    synchronize(device)
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
        synchronize(device)
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
        synchronize(device)
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
    synchronize(device)
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
