"""The automatic call: the scales chosen from the call's own samples, then the statistics of all of them.

The forget samples are split into folds and the retain samples into a fit part and a held-out part
(:mod:`deepunlearn.sampling`); each part's statistics are collected once, by kind (every
position's and, for models that read sequences, the first position's). Per kind, candidate edits
(:mod:`deepunlearn.candidates`) are scored on the held-out samples (:mod:`deepunlearn.scoring`) and
chosen by :func:`deepunlearn.auto_alpha.choose_alphas`; the best kind's choice is kept, and the
statistics of every part are summed for the final edit.
"""
from __future__ import annotations

import functools
import operator
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._batches import DataLike
from .auto_alpha import HEAD_ALPHA_F, choice_rank, choose_alphas
from .candidates import candidate_edits
from .collect import collect_both_kinds, collect_statistics
from .layers import EditTarget, SkippedLayer
from .moments import SampleRows
from .plan import Moments, layer_means, layer_moments, synchronize
from .reach import check_head_scale, edited_and_head
from .report import AlphaChoice
from .sampling import content_order, fold_split, holdout_split, materialise
from .scoring import CHECK_SAMPLES, held_out_prefix, make_scorer, read_position
from .statistics import Statistics, fingerprint_once, model_device


@dataclass
class Chosen:
    """What the automatic choice leaves for the edit."""

    choice: AlphaChoice  # the chosen scales, kind of statistics and head correction; its seconds set
    targets: list[EditTarget]  # the layers to edit
    skipped: list[SkippedLayer]
    head: EditTarget | None  # the classifier head, where it can take its own scale
    forget: Statistics  # of every forget sample, of the chosen kind
    retain: Statistics  # of every retain sample, of the chosen kind
    seconds: dict[str, float]  # collect_forget, collect_retain, choose_alpha


def choose_and_collect(
    model: nn.Module,
    forget: DataLike,
    retain: DataLike,
    targets: list[EditTarget],
    skipped: list[SkippedLayer],
    *,
    collect: dict[str, Any],
    alpha_r: float | None,
    alpha_f: float | None,
    alpha_f_head: float | None,
    classes: Sequence[int] | None,
    target: float,
    skip_first_layer: bool,
    first_token: bool | None,
    token_position: int | None,
    keep_retain_mean: bool | None,
    refit_head: bool | None,
) -> Chosen:
    """Choose the scales :func:`deepunlearn.unlearn` leaves unset, from its samples.

    ``collect``: the collection's ``batch_size``, ``dtype``, ``autocast`` and ``progress``. The
    other arguments are :func:`deepunlearn.unlearn`'s (``target``: its ``target_forget_accuracy``;
    ``skip_first_layer`` resolved), already checked.
    """
    device = model_device(model)
    both_kinds = first_token is None  # every position's and one position's, in one pass
    # the one position of the token kind: given, else where the model reads its output from (read_position)
    position = 0 if token_position is None else token_position

    def kinds(x: torch.Tensor, role: str, outputs: list | None = None, only: bool | None = None) -> dict[bool, Statistics]:
        """The statistics of samples ``x`` by kind (``first_token``): both where both are wanted
        (unless ``only`` names one); ``outputs`` gets the unedited model's logits per batch."""
        if not both_kinds or only is not None:
            one = bool(first_token) if only is None else only
            return {one: collect_statistics(model, x, desc=role, outputs=outputs, first_token=one, token_position=position,
                                            **collect)}
        full, token = collect_both_kinds(model, x, desc=role, outputs=outputs, token_position=position, **collect)
        return {False: full} | ({} if token is None else {True: token})

    t0 = time.perf_counter()
    class_token = False  # the output read from one position alone (sequence models): every position's
    # statistics are then collected and scored only where that position's miss the target
    with fingerprint_once():  # six collections of the same weights
        x_f, y_f = materialise(forget, collect["batch_size"], "forget", model)
        x_r, y_r = materialise(retain, collect["batch_size"], "retain", model)
        # parts drawn over the samples in the order of their content: the same samples in any order, the same choice
        order_f, order_r = content_order(x_f, y_f), content_order(x_r, y_r)
        folds_f = [order_f[i] for i in fold_split(len(x_f), "forget")]
        fit_r, held_r = (order_r[i] for i in holdout_split(len(x_r), "retain"))
        outputs_f: list[list] = [[] for _ in folds_f]
        parts_f = [kinds(x_f[folds_f[0]], "forget", outputs_f[0])]
        targets, skipped, head = edited_and_head(targets, skipped, parts_f[0][min(parts_f[0])], skip_first_layer,
                                                 want_head=True)
        synchronize(device)
        t_probe = time.perf_counter()  # the probes below serve the choice: their time is choosing's
        if True in parts_f[0] and head is not None and parts_f[0][True].sequence_inputs:
            read = read_position(model, x_r[held_r][:CHECK_SAMPLES].to(device), head.module, collect["autocast"])
            if token_position is None and read == -1:  # the last position is read: the first fold's token statistics from it
                position = -1
                parts_f[0] |= kinds(x_f[folds_f[0]], "forget", None, True)
            class_token = read is not None and read == position
        only = True if class_token else None
        # the unedited start of the forward pass, whose outputs the scoring keeps: from here on the
        # collection passes keep them (the first fold's are computed when the scorer is made)
        edited = [getattr(t.module, t.param) for t in targets]
        prefix = held_out_prefix(model, x_r[held_r][:CHECK_SAMPLES].to(device), edited, collect["autocast"],
                                 len(x_f) + len(x_r))
        synchronize(device)
        probing = time.perf_counter() - t_probe

        def keeping(source: object, samples: int):
            return nullcontext() if prefix is None or source is None else prefix.capturing(source, samples)

        for k, (i, out) in enumerate(zip(folds_f[1:], outputs_f[1:]), 1):
            with keeping(k, len(i)):
                parts_f.append(kinds(x_f[i], "forget", out, only))
        synchronize(device)
        t1 = time.perf_counter()
        outputs_r, outputs_fit = [], []
        with keeping("fit" if refit_head is not False else None, len(fit_r)):
            parts_r = [kinds(x_r[fit_r], "retain", outputs_fit, only)]
        with keeping("retain", len(held_r)):
            parts_r.append(kinds(x_r[held_r], "retain", outputs_r, only))
    synchronize(device)
    t2 = time.perf_counter()
    check_head_scale(head, alpha_f_head)
    scorer = make_scorer(model, [x_f[i] for i in folds_f], None if y_f is None else [y_f[i] for i in folds_f],
                         x_r[held_r], None if y_r is None else y_r[held_r], classes, collect["batch_size"],
                         collect["autocast"], original=([_logits(o) for o in outputs_f], _logits(outputs_r)),
                         prefix=prefix)  # searched for above
    logits_fit = _logits(outputs_fit)
    refit_on = None if logits_fit is None or refit_head is False else (
        x_r[fit_r], logits_fit, y_r[fit_r] if y_r is not None else logits_fit.argmax(-1).cpu())
    del outputs_f, outputs_r, outputs_fit
    # the first position's statistics first (True): on class-token models they win, and their best
    # held-out retain accuracy then bounds the search with every position's
    modes = sorted(parts_f[0], reverse=True)
    head_options = (alpha_f_head,) if alpha_f_head is not None else (None,) if alpha_f is not None else (None, *HEAD_ALPHA_F)
    best = None
    from tqdm.auto import tqdm  # as collect.py: only where a bar is made

    # on wide inputs the decompositions and the search can take longer than the collection
    with tqdm(desc="choosing alpha", unit=" pairs", disable=not collect["progress"], leave=False) as bar:
        for mode in modes:
            if not mode and class_token and best is not None and best[0].reached_target:
                best[0].every_position_skipped = True
                break
            with fingerprint_once():  # the weights chosen from are back in place
                for x, part in [*zip((x_f[i] for i in folds_f), parts_f), (x_r[fit_r], parts_r[0]), (x_r[held_r], parts_r[1])]:
                    if mode not in part:  # a class-token model's first position missed: every position's too
                        part |= kinds(x, "statistics, every position", None, mode)
            folds = [p[mode] for p in parts_f]
            _dense_once(folds)

            def forget_fit(k: int, folds: list[Statistics] = folds) -> Moments:
                """The forget moments of every fold but ``k``."""
                return layer_moments(targets, functools.reduce(operator.add, folds[:k] + folds[k + 1:]), device)

            parts = (folds, parts_r[0][mode], parts_r[1][mode])
            keep = mode if keep_retain_mean is None else keep_retain_mean
            bar.set_postfix_str("decomposing")
            candidates = candidate_edits(targets, forget_fit(0), layer_moments(targets, parts[1], device),
                                         [functools.partial(forget_fit, k) for k in range(1, len(folds))], head,
                                         layer_means(targets, parts[1], device) if keep else None)
            with warnings.catch_warnings(record=True) as caught:  # only the kept mode's warning is shown
                warnings.simplefilter("always")
                bound = best[0].retain_prob if best is not None and best[0].reached_target else None
                bar.set_postfix_str("scoring")
                c = choose_alphas(model, candidates, scorer, alpha_r=alpha_r, alpha_f=alpha_f, target=target,
                                  bound=bound, head_alphas=head_options, rebalance=refit_head is not False,
                                  refit_on=refit_on, new_pair=bar.update)
            del candidates
            c.first_token, c.keep_retain_mean = mode, keep
            c.token_position = position if mode else 0
            if best is None or choice_rank(c) > choice_rank(best[0]):
                best = (c, parts, caught)
    choice, (folds, fit_sr, held_sr), caught = best
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    del scorer, best, parts_f, parts_r, refit_on
    synchronize(device)
    t_chosen = time.perf_counter()
    choice.seconds = t_chosen - t2 + probing  # probing the model, decomposing and scoring
    return Chosen(choice, targets, skipped, head, functools.reduce(operator.add, folds), fit_sr + held_sr,
                  {"collect_forget": t1 - t0 - probing, "collect_retain": t2 - t1, "choose_alpha": choice.seconds})


def _dense_once(parts: Sequence[Statistics]) -> None:
    """Makes a slot kept as vectors (:class:`~deepunlearn.moments.SampleRows`) dense in place, in every
    part, where every sum of all the parts but one holds at least the slot's width of vectors: the sums
    (each fold's forget fit, the final forget side) would otherwise fold the same vectors again for
    each sum they are in (ResNet-18 at 224 with 40 images a side: each fold's 1,960 vectors of its
    three 2,304-wide layer3 inputs, 0.1 s a fold, in three sums and the final one)."""
    for name, slot in parts[0].slots.items():
        moments = [p.slots[name].moment for p in parts if name in p.slots]
        if len(moments) < len(parts) or not any(isinstance(m, SampleRows) for m in moments):
            continue
        d = slot.moment.shape[-1]
        vectors = [m.vectors if isinstance(m, SampleRows) else d for m in moments]
        if sum(vectors) - max(vectors) >= d:
            for p in parts:
                if isinstance(p.slots[name].moment, SampleRows):
                    p.slots[name].moment = p.slots[name].moment.dense()


def _logits(outputs: list) -> torch.Tensor | None:
    """The unedited model's logits of a part, batches joined; None where a batch gave none."""
    return None if not outputs or any(y is None for y in outputs) else torch.cat(outputs)
