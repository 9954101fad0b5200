"""The drop-in calls: :func:`unlearn` on forget/retain data, :func:`forget_classes` on a labelled dataset."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from ._batches import DataLike
from .auto_alpha import TARGET_FORGET_ACCURACY
from .automatic import choose_and_collect
from .collect import gather_statistics
from .hooks import check_token_position
from .layers import SkippedLayer, eager_module, editable_targets, find_targets
from .plan import (apply_plan, layer_means, layer_moments, plan_edits_with, rebalanced, refitted, solved_edits,
                   synchronize, traces)
from .projection import check_alpha, check_solver
from .reach import check_head_scale, edited_and_head
from .report import LayerReport, UnlearnReport
from .sampling import dataset_labels, draw_samples
from .statistics import Statistics, model_device

DEFAULT_BATCH_SIZE = 256  # samples per forward pass while collecting and scoring: fills a GPU, bounds activations


@torch.inference_mode(False)  # called under inference mode: statistics need version counters, edits normal tensors
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
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    skip_first_layer: bool | None = None,
    first_token: bool | None = None,
    token_position: int | None = None,
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
            iterable of batches ``x``, ``(x, y, ...)`` or mappings of model inputs (``input_ids``,
            ``attention_mask``, ..., ``labels``: given to the model as keywords, padding left out by the
            mask; :mod:`deepunlearn.inputs`), one such mapping of every sample, or :class:`Statistics`
            collected on this model.
        retain: samples of the classes to keep, in any of the same forms (the paper uses about
            100 per retain class).
        alpha_r: scale of the retain space, > 0 (paper: 100 for CIFAR-10 and ImageNet, 1000 for CIFAR-100).
            None (default): chosen automatically, with ``alpha_f``.
        alpha_f: scale of the forget space, > 0 (paper: 3 for CIFAR-10, 30 for CIFAR-100, 10 for ImageNet).
            None (default): chosen automatically. Choosing splits the forget samples into four
            folds, each scored by candidate pairs edited from the other folds' statistics, and
            holds out a quarter of the retain samples (at most 512); per ``alpha_r`` it keeps the
            smallest ``alpha_f`` whose forget accuracy over the folds is at most a quarter of
            ``target_forget_accuracy`` (:data:`~deepunlearn.scoring.HELD_OUT_SHARE`), and of those
            the one whose held-out retain samples keep the highest mean probability of their right
            class (else the best
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
        target_forget_accuracy: forget accuracy (percent) on unseen samples of the forgotten classes
            the automatic choice aims at. The held-out forget samples are training samples, which an
            edit forgets more easily, so they must show at most a quarter of it
            (:data:`~deepunlearn.scoring.HELD_OUT_SHARE`; 0 of 900 at the default 1 %, 2 of 1,800).
            Fewer than 554 forget samples cannot show it at the default (none recognised is then
            asked for, and the call warns).
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
        token_position: the one position ``first_token`` keeps: 0 (a class token) or -1 (the last
            position, which GPT-2's sequence classifiers read on unpadded inputs). None (default):
            when the scales are chosen, the position the model's output is read from where it reads
            one alone (``report.alpha_choice.token_position``), else 0; with both scales given, that
            of the :class:`Statistics` given, else 0.
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
            logit against a retained one, where that leaves no fewer of them right
            (:func:`~deepunlearn.scoring.rebalanced_shift`; ``report.alpha_choice.head_shift``).
            Needs the automatic choice (its folds and held-out samples); done where the head has a
            bias and the model's output is the head's. None
            (default): on when the scales are chosen (docs/auto_alpha.md); True with both scales
            given is an error.
        progress: show progress bars while collecting, and while choosing the scales (pairs scored).

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
    if token_position is not None:
        check_token_position(token_position)
    choosing = alpha_r is None or alpha_f is None
    if refit_head and not choosing:
        raise ValueError("refit_head=True needs the automatic choice of alpha (it uses its held-out retain samples); "
                         "leave alpha_r or alpha_f unset, or set refit_head=False")
    keep_mean = bool(keep_retain_mean)
    if choosing:
        _check_choosing(forget, retain, target_forget_accuracy)
    targets, skipped = editable_targets(eager_module(model))
    device = model_device(model)
    if inplace and any(p.is_inference() for p in model.parameters()):
        raise ValueError("the model's parameters are inference tensors (made under torch.inference_mode), which "
                         "cannot be changed in place; pass inplace=False for an edited copy")
    if not inplace:
        model = copy.deepcopy(model)
        targets, skipped = find_targets(eager_module(model))
    returned, model = model, eager_module(model)  # the user's torch.compile wrapper comes back as given
    if first_token is None and not choosing:  # statistics given: their kind; else every position (the paper's)
        given = [s.first_token for s in (forget, retain) if isinstance(s, Statistics)]
        first_token = given[0] if given else False
    if token_position is None and not choosing:
        given = [s.token_position for s in (forget, retain) if isinstance(s, Statistics)]
        token_position = given[0] if given else 0
    collect = dict(batch_size=batch_size, dtype=dtype, autocast=autocast, progress=progress)
    skip_first = choosing if skip_first_layer is None else skip_first_layer

    choice = None
    if choosing:
        chosen = choose_and_collect(model, forget, retain, targets, skipped, collect=collect, alpha_r=alpha_r,
                                    alpha_f=alpha_f, alpha_f_head=alpha_f_head, classes=classes,
                                    target=target_forget_accuracy, skip_first_layer=skip_first, first_token=first_token,
                                    token_position=token_position,
                                    keep_retain_mean=keep_retain_mean, refit_head=refit_head)
        choice, targets, skipped, head = chosen.choice, chosen.targets, chosen.skipped, chosen.head
        stats_f, stats_r, seconds = chosen.forget, chosen.retain, chosen.seconds
        alpha_r, alpha_f, alpha_f_head, keep_mean = choice.alpha_r, choice.alpha_f, choice.alpha_f_head, choice.keep_retain_mean
        del chosen
    else:
        t0 = time.perf_counter()
        stats_f = gather_statistics(model, forget, "forget", first_token=first_token, token_position=token_position,
                                    **collect)
        targets, skipped, head = edited_and_head(targets, skipped, stats_f, skip_first, want_head=alpha_f_head is not None)
        synchronize(device)
        t1 = time.perf_counter()
        stats_r = gather_statistics(model, retain, "retain", first_token=first_token, token_position=token_position,
                                    **collect)
        synchronize(device)
        seconds = {"collect_forget": t1 - t0, "collect_retain": time.perf_counter() - t1, "choose_alpha": 0.0}
        check_head_scale(head, alpha_f_head)
    t_chosen = time.perf_counter()

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

    seconds |= {"decompose": t3 - t_chosen, "edit": t4 - t3, "total": t4 - t_start}
    return UnlearnReport(
        returned, rows, [(s.name, s.reason) for s in skipped], samples_f, samples_r, alpha_r, alpha_f, solver, seconds,
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
    collate_fn: Callable | None = None,
    **unlearn_kwargs,
) -> UnlearnReport:
    """Forget whole ``classes`` using samples drawn from a labelled ``dataset``.

    Draws ``retain_per_class`` random samples of every other class (paper: 100 per class, 900
    for a 10-class problem) and ``forget_samples`` samples of the forgotten classes, spread
    evenly over them (default: as many as the retain sample), then calls :func:`unlearn`.

    Args:
        model: as in :func:`unlearn`.
        dataset: a labelled map-style dataset yielding ``(x, y, ...)`` or mappings of model inputs
            with ``labels`` (or ``label``); labels are read from its ``targets`` attribute when it has one.
        classes: the class index, or indices, to forget (several in one call).
        retain_per_class: retain samples per kept class.
        forget_samples: total forget samples; default ``retain_per_class * number of kept classes``.
        seed: seed of the random draw (under ``torch.distributed`` each rank streams its share of the draw).
        collate_fn: joins samples into a batch (a DataLoader's ``collate_fn``, e.g. one that pads
            token sequences); default: the DataLoader's own.
        **unlearn_kwargs: passed to :func:`unlearn` (``alpha_r``, ``alpha_f``, ``solver``, ``inplace``...).
    """
    forget_idx, retain_idx = draw_samples(dataset_labels(dataset), classes, retain_per_class, forget_samples, seed)
    unlearn_kwargs.setdefault("classes", [classes] if isinstance(classes, int) else list(classes))
    # Under torch.distributed every rank draws the same indices (same seed) and streams its share.
    forget, retain = Subset(dataset, distributed.shard(forget_idx)), Subset(dataset, distributed.shard(retain_idx))
    if collate_fn is not None:
        batch = unlearn_kwargs.get("batch_size", DEFAULT_BATCH_SIZE)
        forget, retain = (DataLoader(part, batch_size=batch, collate_fn=collate_fn) for part in (forget, retain))
    return unlearn(model, forget, retain, **unlearn_kwargs)
