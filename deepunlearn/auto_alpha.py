"""Choosing ``(alpha_r, alpha_f)`` from the forget and retain samples themselves (docs/auto_alpha.md).

The forget samples are split into folds, each scored by candidates edited from the other folds'
statistics (cross-fitting: every forget sample scores, none scores an edit it shaped); a quarter
of the retain samples is held out. Each candidate pair's new weights (:mod:`.candidates`) are
applied to the model and scored on the held-out samples. The rule is the smallest edit that
forgets: per ``alpha_r``, the smallest ``alpha_f`` whose forget accuracy over the folds is at most
a quarter of the target (:func:`~deepunlearn.scoring.held_out_bound`: the held-out samples are
training samples, which the edit forgets more easily than unseen ones); of those, the one whose
held-out retain samples keep the highest mean probability of their right class wins (continuous,
where accuracies on a few hundred samples tie in steps); if none reaches the target, the best
``retain · (100 − forget)`` wins, with a warning. Along ``alpha_f`` the forget accuracy falls as the
forget space grows, so for each ``alpha_r`` a coarse scan stops at the first passing ``alpha_f`` and
bisection (in log scale) narrows the step below it. The classifier head may take its own
``alpha_f`` (:data:`HEAD_ALPHA_F`), scored on the same forward passes.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn

from .candidates import Candidates
from .head_refit import ForgetFold, HeadRefit, best_refit
from .profiled import part
from .report import AlphaChoice
from .collect import eval_no_grad
from .sampling import fold_split
from .scoring import (CHECK_SAMPLES, FORGET_CONFIDENCE, HeadReader, Scorer, allowed_forget_hits, binomial_upper_bound,
                      forget_samples_to_show, held_out_bound, rebalanced_shift)

TARGET_FORGET_ACCURACY = 1.0  # percent of unseen forget-class samples still recognised
ALPHA_R_CANDIDATES = (10.0, 100.0, 1000.0, 1.0)  # searched in this order: up from 10, where most of the suite's
# choices fall, then down, so that the best candidate so far cuts the low one after one round. Decades: searching the
# half decades between (30, 300, 3) too changed 44 of the 80 benchmark choices, all within both targets either way,
# for 16-82 % more choosing time (docs/auto_alpha.md). The seed-1 suite ViT needs 1 (oracle: class 0 loses 2.06
# points at alpha_r 1 against 12.86 at 10)
ALPHA_F_COARSE = tuple(10 ** (k / 2) for k in range(7))  # half decades, 1 to 1000: the scan stops at the first that
# forgets. Pairs far from forgetting cost one chunk of samples, so the finer scan is cheap, and it does not step over
# a window that forgets: past it, over-edited models can predict the forgotten class again (the suite's ViT, {0, 2})
DOWNWARD_SKIP_MARGIN = 1.0  # points of held-out retain probability by which a larger alpha_r's candidate must beat the
# first alpha_r's for the downward run to be skipped: on the suite's models retain probability along alpha_r peaked
# once, and near ties (a flat profile, rounding) still search downwards
BISECTION_STEPS = 1  # halves the log step below the first passing α_f: 10 -> 5.6 (below the smallest coarse
# value: one step down by √10). A second step changed 6 of the 30 benchmark choices, none across a target, once the
# head is rebalanced, and cost a third of the choosing time
HEAD_ALPHA_F = tuple(10 ** (k / 2) for k in range(5))  # 1 to 100 in half decades: the classifier head's own alpha_f,
# tried beside the body's at every scored pair: where the head forgets hard, the body can forget gently
# (docs/auto_alpha.md). Scored from the head's input read once per forward pass: a small matrix product per option
SCORE_CHUNK = 64  # forget samples scored at a time: a candidate that has missed the target stops early


def refitted_head(model: nn.Module, candidates: Candidates, pair: tuple[float, float, float | None], scorer: Scorer,
                  refit_on: tuple[torch.Tensor, torch.Tensor, torch.Tensor], allowed_hits: int) -> HeadRefit | None:
    """The classifier head's retained rows re-fitted for the candidate ``pair`` ``(alpha_r,
    alpha_f, head alpha_f or None)``, recognising at most ``allowed_hits`` forget samples
    (:func:`~deepunlearn.head_refit.best_refit`; None where no anchor weight keeps the retain
    accuracy), from each forget fold's head inputs under the candidate edited without it and every
    retain sample's (``refit_on``'s and the held-out ones) under the first fold's candidate. Leaves
    the first fold's candidate written; expects eval mode without autograd."""
    head = candidates.targets[candidates.head]
    reader = HeadReader(head.module, scorer.autocast)
    device = next(model.parameters()).device
    x_fit, logits_fit, right_fit = refit_on
    folds = []
    for k in reversed(range(len(scorer.x_f))):  # the first fold last, left written
        if k == 0 or not scorer.read_whole(pair[:2], k):  # the first fold's candidate reads the retain samples
            for t, (w, b) in zip(candidates.targets, candidates.edits(pair[0], pair[1], k, pair[2])):
                t.write(w, b)
        w, b = candidates.edit(candidates.head, pair[0], pair[1] if pair[2] is None else pair[2], k)
        folds.insert(0, ForgetFold(scorer.head_inputs(model, k, reader, pair[:2]),
                                   (w, head.bias().detach().clone() if b is None else b),
                                   lambda p, k=k: scorer.forget_hit[k](p, torch.arange(len(p)))))
    fit = []
    prefix = scorer.prefix if scorer.prefix is not None and "fit" in scorer.prefix.outputs else None
    with nullcontext() if prefix is None else prefix.standing_in():  # the fit samples' kept prefix outputs
        for start in range(0, len(x_fit), scorer.batch_size):
            rows = slice(start, start + scorer.batch_size)
            if prefix is not None:
                prefix.kept("fit", rows)
            reader.logits_of(model, x_fit[rows].to(device))
            fit.append(reader.features)
    features_r = torch.cat([*fit, scorer.head_inputs(model, "retain", reader, pair[:2])])
    logits_r = torch.cat([logits_fit.to(device), scorer.original_retain_logits.to(device)]).float()
    right_r = torch.cat([right_fit.cpu(), scorer.retain_ref.cpu()])
    kept = [c for c in range(head.module.out_features) if c not in scorer.forgotten]
    return best_refit(features_r, logits_r, right_r, folds[0].head, folds, kept,
                          fold_split(len(features_r), "retain", len(folds)), allowed_hits)


def choose_alphas(
    model: nn.Module,
    candidates: Candidates,
    scorer: Scorer,
    *,
    alpha_r: float | None = None,
    alpha_f: float | None = None,
    target: float = TARGET_FORGET_ACCURACY,
    bound: float | None = None,
    head_alphas: Sequence[float | None] = (None,),
    rebalance: bool = False,
    refit_on: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    new_pair: Callable[[], object] | None = None,
) -> AlphaChoice:
    """Score candidate pairs on the held-out samples and return the choice; the model is left as it was.

    ``alpha_r`` / ``alpha_f``: a given value is kept fixed and only the other is searched.
    ``target``: the forget accuracy (percent) the edit should leave on unseen samples; the held-out
    samples, training samples, must show :func:`held_out_bound` of it. A candidate reaches the
    target when at most :func:`allowed_forget_hits` forget samples, over every fold, are still
    recognised: the held-out bound holds at :data:`FORGET_CONFIDENCE`. The folds are
    scored in rounds and stop once more are recognised. Per ``alpha_r`` the smallest ``alpha_f`` that
    reaches the target is the candidate (:func:`smallest_passing`); only those are scored on the
    retain side (or, if none reaches it, every pair). ``alpha_r`` runs up from the first of
    :data:`ALPHA_R_CANDIDATES`, then down through the smaller ones. Upwards a larger retain space
    protects more of the forget space too, so each scan starts at the coarse step where the previous
    ``alpha_r`` first forgot, and the upward run stops at the first ``alpha_r`` that never forgets;
    each downward scan starts at the smallest step, and the downward run is skipped where retain
    probability peaked above the first ``alpha_r`` (:data:`DOWNWARD_SKIP_MARGIN`).

    Candidates that reach the target are ranked by the held-out retain samples' mean probability of
    their right class (then fewer forget samples recognised): accuracy on a few hundred samples
    moves in steps and ties between nearby edits.

    ``head_alphas``: the classifier head's (``candidates.head``) own ``alpha_f`` options, None for
    the body's. With several, every scored pair scores each option on the same forward passes (the
    head's input is read, :class:`HeadReader`; where the model's predictions are not the head's,
    only the first option is scored); the coarse scan goes by whether any option forgets, the
    finer steps follow the option that keeps the most retain probability where the scan first
    forgot, and :func:`smallest_passing` keeps a candidate per option.

    Only the choice is scored whole: a pair that comes through its first round (the samples the
    last candidates still recognised) is left pending, and the search counts it as forgetting.
    Afterwards the first candidate, where pending, is scored on, or else a pending coarse step that
    keeps more retain probability in some head option than it (were that to miss, its ``alpha_r``'s
    scan would go on to pairs that might win); then the search runs again, scoring only pairs new
    to it, until neither is left. Pairs still pending are reported with no forget hits.

    Branch and bound: once a candidate stands (reached the target, or pending), a pending pair is
    scored on the retain side, and scored no further where it keeps less retain probability for
    every head option; the search then treats it as a pair that forgets (a larger ``alpha_f``
    keeps less still, a smaller one may win). A finer step is scored on the retain side first, and
    not on the forget side where it cannot win (:func:`cannot_win` inside). ``bound``: the held-out
    retain probability of a candidate already chosen elsewhere (the other kind of statistics), the
    bound from the start.

    ``rebalance``: the choice also carries a correction of the classifier head, where the head has
    a bias and the model's output is the head's: its retained rows re-fitted (:func:`refitted_head`,
    ``refit_on``: the retain samples not held out ``(n, ...)``, the unedited model's logits on them
    ``(n, C)`` and the class counted right for each ``(n,)``) where cross-validation shows the
    re-fitted head (its forgotten classes' bias lowered as far as needed) recognising no more forget
    samples than the chosen candidate and keeping at least its retain accuracy, where the target was
    reached; else the shift of its bias that keeps the retained classes' shares on the held-out
    retain samples (:func:`rebalanced_shift`, from the chosen candidate's logits).

    ``new_pair``: called as each pair is first scored (a progress bar's step).
    """
    t0 = time.perf_counter()
    grid_r = [alpha_r] if alpha_r is not None else list(ALPHA_R_CANDIDATES)
    # the biases the candidates keep are copies of the originals already
    originals = [(t.weight().detach().clone(), b) for t, b in zip(candidates.targets, candidates.biases)]
    table: list[dict[str, float]] = []
    scored_at: dict[tuple[float, float], list[dict[str, float]]] = {}  # (alpha_r, alpha_f) -> a row per option
    n_f = scorer.forget_samples
    allowed = allowed_forget_hits(n_f, held_out_bound(target))
    needed = forget_samples_to_show(held_out_bound(target))
    options = list(head_alphas) if candidates.head is not None else [None]
    if len(options) > 1:
        scorer = replace(scorer, head=HeadReader(candidates.targets[candidates.head].module, scorer.autocast))

    head_apart: dict[tuple[float, float, int], tuple[torch.Tensor, torch.Tensor | None]] = {}  # (alpha_r, option,
    # fold) -> the head with its own scale: the same for every alpha_f, kept for the last alpha_r

    def head_weights(a_r: float, a_f: float, fold: int) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
        """Each option's head ``(weight, bias)``, or None to score the model as written (one option)."""
        if len(options) == 1:
            return None
        if any(key[0] != a_r for key in head_apart):
            head_apart.clear()
        for h in options:
            if h is not None and (a_r, h, fold) not in head_apart:
                head_apart[a_r, h, fold] = candidates.edit(candidates.head, a_r, h, fold)
        return [candidates.edit(candidates.head, a_r, a_f, fold) if h is None else head_apart[a_r, h, fold]
                for h in options]

    last_edited: list = [None, {}]  # the last pair edited, and its edits and head options per fold: a pair's
    # retain side is mostly scored right after its forget side, from the first fold's edits

    def edits_of(a_r: float, a_f: float, fold: int) -> tuple[list, list | None]:
        """The pair's edits of every target for ``fold`` and its head options (:func:`head_weights`),
        made once while it is the last pair edited (the previous pair's are dropped first)."""
        if last_edited[0] != (a_r, a_f):
            last_edited[:] = [(a_r, a_f), {}]
        made = last_edited[1]
        if fold not in made:
            with part("edit"):
                made[fold] = (candidates.edits(a_r, a_f, fold, options[0]), head_weights(a_r, a_f, fold))
        return made[fold]

    def apply(a_r: float, a_f: float, fold: int = 0) -> list | None:
        """Writes the pair's edits for ``fold``; returns its head options."""
        edits, heads = edits_of(a_r, a_f, fold)
        with part("write"):
            for t, (w, b) in zip(candidates.targets, edits):
                t.write(w, b)
        return heads

    def rows_of(a_r: float, a_f: float) -> list[dict[str, float]]:
        """The pair's row per head option in ``table``, made (nothing scored yet) on first use."""
        if (a_r, a_f) not in scored_at:
            scored_at[a_r, a_f] = [{"alpha_r": a_r, "alpha_f": a_f, "alpha_f_head": a_f if h is None else h,
                                    "head_apart": float(h is not None), "retain_acc": math.nan, "retain_prob": math.nan,
                                    "forget_acc": math.nan, "forget_hits": math.nan, "forget_scored": 0} for h in options]
            table.extend(scored_at[a_r, a_f])
            if new_pair is not None:
                new_pair()
        return scored_at[a_r, a_f]

    progress: dict[tuple[float, float], _Progress] = {}  # per pair: how far its forget side was scored
    sizes = [len(x) for x in scorer.x_f]

    def score(a_r: float, a_f: float, finish: bool = False) -> list[bool] | None:
        """Per head option, whether the pair forgets (so far, where it is pending); its rows get the
        forget side (the retain side is scored later). The folds are scored in rounds, a chunk of
        each per round (the samples still recognised by the last candidates first), until every
        option has missed the target. A pair that comes through its first round (the hardest
        samples) is left pending there, and scored on (``finish``) only where it may be the choice
        (the resolution below): only the pair chosen has to be shown to forget on every sample.
        None: the pair is pending and cannot win (:func:`cannot_win`, checked once a candidate
        stands), and is scored no further; its rows keep no forget hits."""
        p = progress.setdefault((a_r, a_f), _Progress.start(len(options), len(sizes)))
        scored_folds = set()
        while p.open(sizes, allowed) and (finish or p.rounds == 0):
            for fold in range(len(sizes)):
                if p.done(fold) == sizes[fold] or not any(p.passing(allowed)):
                    continue
                heads = apply(a_r, a_f, fold)
                scorer.key = (a_r, a_f)  # the head's inputs read here are kept for a re-fit (refitted_head)
                rows = scorer.next_rows(fold, p.scored_rows(fold), p.chunk)
                with part("score forget"):
                    p.add(fold, rows, scorer.rows_recognised(model, fold, rows, heads), allowed)
                scored_folds.add(fold)
            p.rounds += 1
            p.chunk *= 2  # a candidate that has not missed yet is likely near the target: score in larger batches
        for fold in scored_folds:
            scorer.recognised_first(fold, torch.cat(p.seen[fold], dim=-1).any(0), p.scored_rows(fold))
        # the rest would cost more than the retain side; options that have missed already cannot win
        p.cut = cut = p.open(sizes, allowed) and cannot_win(a_r, a_f, p.passing(allowed))
        for row, first, hits, scored in zip(rows_of(a_r, a_f), p.first_fold_accuracy(sizes[0]), p.hits, p.scored):
            row.update(forget_acc=first, forget_hits=math.nan if cut else hits, forget_scored=scored)
        return None if cut else p.passing(allowed)

    best_retain = -math.inf  # the current search()'s bound: the best standing candidate's retain probability

    def retain_of(row: dict[str, float]) -> float:
        if math.isnan(row["retain_acc"]):
            a_r, a_f = row["alpha_r"], row["alpha_f"]
            heads = apply(a_r, a_f)
            scorer.key = (a_r, a_f)
            with part("score retain"):
                scores = scorer.retain_scores(model, heads)
            for c, (acc, prob) in zip(scored_at[a_r, a_f], scores):
                c["retain_acc"], c["retain_prob"] = acc, prob
        return row["retain_prob"]

    def cannot_win(a_r: float, a_f: float, alive: Sequence[bool] | None = None) -> bool:
        """Whether a pair need not be scored (further) on the forget side: once a candidate has
        reached the target, a pair that keeps less held-out retain probability than it for every
        head option cannot win, and no larger ``alpha_f`` at its ``alpha_r`` can either. The finer
        steps then go below it, as past a pair that forgets; its rows keep no forget hits. Checked
        before a finer step is scored, and in :func:`score` after a pair's first round, there over
        the options still ``alive`` (an option that has missed the target cannot win here)."""
        rows = [c for i, c in enumerate(rows_of(a_r, a_f)) if alive is None or alive[i]]
        return best_retain > -math.inf and max(retain_of(c) for c in rows) < best_retain

    def unsure_pair() -> tuple[float, float] | None:
        """The pending pair to score on next, or None once the first candidate (by :func:`preference`)
        was scored whole: that candidate where it is pending; else the pending coarse step that keeps
        the most retain probability in some head option, where that is more than the first
        candidate's: were it to miss, its ``alpha_r``'s scan would go on past it, to pairs (other
        options at larger ``alpha_f``, keeping less retain probability than here) that might beat the
        first. (A finer step that misses only leaves its coarse step the candidate.)"""
        standing = smallest_passing(table, allowed)
        for c in standing:
            retain_of(c)
        first = max(standing, key=preference, default=None)
        unsure = [pair for pair, p in progress.items() if p.open(sizes, allowed) and not p.cut]
        if first is not None and (first["alpha_r"], first["alpha_f"]) in unsure:
            return first["alpha_r"], first["alpha_f"]
        bar = -math.inf if first is None else first["retain_prob"]
        coarse = [pair for pair in unsure if alpha_f is None and pair[1] in ALPHA_F_COARSE]
        potential = {pair: max(retain_of(c) for c in rows_of(*pair)) for pair in coarse}
        return max((pair for pair in coarse if potential[pair] > bar), key=potential.get, default=None)

    def peaked_above_first() -> bool:
        """Whether a larger ``alpha_r``'s candidate keeps :data:`DOWNWARD_SKIP_MARGIN` points more
        held-out retain probability than the first ``alpha_r``'s (pending ones counted as forgetting):
        retain probability then peaks above the first scale, and the scales below it, which keep
        less of the retain space, are not searched."""
        best_at: dict[float, float] = {}
        for c in smallest_passing(table, allowed):
            best_at[c["alpha_r"]] = max(best_at.get(c["alpha_r"], -math.inf), retain_of(c))
        first = grid_r[0]
        return first in best_at and any(p >= best_at[first] + DOWNWARD_SKIP_MARGIN
                                        for a_r, p in best_at.items() if a_r > first)

    def search() -> None:
        """The scan along ``alpha_f`` for every ``alpha_r`` (the function's docstring), pending pairs
        counted as forgetting; run again after a pending pair is scored on."""
        nonlocal best_retain
        best_retain = -math.inf if bound is None else bound
        start = 0  # index into ALPHA_F_COARSE where the scan begins
        stopped = False  # whether the upward run has met an alpha_r that never forgets
        for k, a_r in enumerate(grid_r):
            if alpha_f is not None:
                score(a_r, alpha_f)
                continue
            if k > 0 and a_r < grid_r[k - 1]:  # the downward run: a smaller retain space may forget sooner
                if peaked_above_first():
                    break
                start = 0
            elif stopped:
                continue
            passes = None  # where the scan has no step left
            failing = ALPHA_F_COARSE[start - 1] if start > 0 else None  # failed at the previous alpha_r
            passing = None
            for i in range(start, len(ALPHA_F_COARSE)):
                passes = score(a_r, ALPHA_F_COARSE[i])
                if passes is None or any(passes):  # forgets, or cannot win: the finer steps go below it
                    passing, start = ALPHA_F_COARSE[i], i
                    break
                failing = ALPHA_F_COARSE[i]
            if passing is None:
                stopped = True  # never forgets in range; a larger alpha_r would forget even less
                continue
            # the finer steps follow the head option that keeps the most retain accuracy where the scan first
            # forgot (of every option, where it could not win)
            rows = scored_at[a_r, passing]
            alive = [i for i, ok in enumerate(passes or [True] * len(options)) if ok]
            followed = alive[0] if len(alive) == 1 else max(alive, key=lambda i: (retain_of(rows[i]), -i))
            if failing is None:  # forgets at the smallest: step down while it still does
                for _ in range(BISECTION_STEPS):
                    lower = passing / math.sqrt(10.0)
                    if not (cannot_win(a_r, lower) or (passes := score(a_r, lower)) is None or passes[followed]):
                        break
                    passing = lower
            else:
                for _ in range(BISECTION_STEPS):
                    mid = math.sqrt(failing * passing)  # the log-scale midpoint
                    if cannot_win(a_r, mid) or (passes := score(a_r, mid)) is None or passes[followed]:
                        passing = mid
                    else:
                        failing = mid
            for c in smallest_passing([c for c in table if c["alpha_r"] == a_r], allowed):
                best_retain = max(best_retain, retain_of(c))

    head = None if candidates.head is None else candidates.targets[candidates.head]
    shares = None  # the unedited model's mean predicted probabilities on the held-out retain samples, where the
    # head is rebalanced
    try:
        # once for the whole search, not per scoring call; inference mode: less dispatch overhead per op
        # than no_grad on its many small passes (docs/auto_alpha.md), and nothing here needs autograd
        with eval_no_grad(model, inference=True):
            if (len(options) > 1 or rebalance) and head is not None:
                head_reads = HeadReader(head.module, scorer.autocast).reads_the_output(
                    model, scorer.x_r[:CHECK_SAMPLES].to(next(model.parameters()).device))
                options = options if head_reads else options[:1]
                if rebalance and head_reads and head.bias() is not None and len(scorer.forgotten) < head.module.out_features:
                    unedited = scorer.original_retain_logits  # else the model is unedited here
                    shares = (scorer.retain_logits(model) if unedited is None else unedited).softmax(-1).mean(0)
            search()
            while pair := unsure_pair():
                score(*pair, finish=True)
                search()  # scored pairs are not scored again: only pairs new to this run cost forward passes
            for (a_r, a_f), p in progress.items():  # pairs left pending were never shown to forget
                if p.open(sizes, allowed):
                    for row in rows_of(a_r, a_f):
                        row["forget_hits"] = math.nan
            reached = smallest_passing(table, allowed)
            for c in reached or table:  # the fallback ranks every candidate by both sides
                retain_of(c)
                if not reached and math.isnan(c["forget_acc"]):
                    heads = apply(c["alpha_r"], c["alpha_f"])
                    rows = scored_at[c["alpha_r"], c["alpha_f"]]
                    whole = len(scorer.x_f[0])
                    scorer.key = (c["alpha_r"], c["alpha_f"])
                    with part("score forget"):
                        hit = scorer.forget_recognised(model, 0, 0, whole, heads)
                    for row, n_hit in zip(rows, hit.sum(-1).tolist()):
                        row["forget_acc"] = 100.0 * n_hit / whole
    finally:
        for t, (w, b) in zip(candidates.targets, originals):
            t.write(w, b)
    if reached:  # the smallest edit that forgets: best retain, then fewer forget samples still recognised, then the
        # head edited like the body, then smaller scales
        best = max(reached, key=preference)
        forget_acc = 100.0 * best["forget_hits"] / n_f
    else:
        best = max(table, key=lambda c: compromise(c["retain_acc"], c["forget_acc"]))
        forget_acc = best["forget_acc"]
    last_edited[:] = [None, {}]  # the correction below edits one fold at a time
    head_shift = head_refit = shifted_hits = None
    shift_refused = False
    if shares is not None:  # the head re-fitted where that keeps forgetting, else its bias rebalanced
        chosen = (best["alpha_r"], best["alpha_f"], best["alpha_f_head"] if best["head_apart"] else None)
        try:
            with eval_no_grad(model, inference=True):
                if refit_on is not None and scorer.original_retain_logits is not None and reached:
                    # the re-fitted head may recognise no more forget samples than the chosen edit did
                    with part("head re-fit"):
                        head_refit = refitted_head(model, candidates, chosen, scorer, refit_on, int(best["forget_hits"]))
                if head_refit is None:  # the chosen edit's logits on the held-out retain samples
                    for t, (w, b) in zip(candidates.targets, candidates.edits(*chosen[:2], 0, chosen[2])):
                        t.write(w, b)
                    logits = scorer.retain_logits(model)
        finally:
            for t, (w, b) in zip(candidates.targets, originals):
                t.write(w, b)
        if head_refit is None:
            shift = rebalanced_shift(logits, shares, scorer.forgotten)
            # kept where it keeps at least as many held-out retain samples right: fitted to mean probabilities, it
            # can trade a retained class for another that the edit left close to it (a two-block BERT of
            # bench_text.py: 97.5 -> 80 % of its retain sequences right)
            if scorer.retain_right(logits + shift.to(logits)).sum() >= scorer.retain_right(logits).sum():
                head_shift = shift.tolist()
                if not reached:  # the shift lowers the forgotten classes against the kept ones: scored on the
                    # forget folds, it may reach the target that no edit alone reached
                    shifted_hits = rebalanced_forget_hits(model, candidates, chosen, scorer, shift, originals)
            else:
                shift_refused = True
        else:  # rows made in inference mode, as ordinary tensors for the caller
            head_refit = replace(head_refit, weight=head_refit.weight.clone(),
                                 bias=None if head_refit.bias is None else head_refit.bias.clone())
    reached_shifted = shifted_hits is not None and shifted_hits <= allowed
    if (reached or reached_shifted) and n_f < needed:
        warnings.warn(f"{n_f} forget samples are too few to show the forget-accuracy target of {target:g} %: none of "
                      f"them recognised bounds the held-out forget accuracy at "
                      f"{100.0 * binomial_upper_bound(0, n_f, FORGET_CONFIDENCE):.2g} % ({FORGET_CONFIDENCE:.0%} "
                      f"confidence), above the {held_out_bound(target):g} % that stands for the target on unseen "
                      f"samples. The chosen edit recognises none of them; unseen samples may stay above the target. "
                      f"{needed} forget samples would show it", stacklevel=3)
    if not reached and not reached_shifted:
        head = f", alpha_f_head={best['alpha_f_head']:g}" if best["head_apart"] else ""
        shifted = "" if shifted_hits is None else f" ({100.0 * shifted_hits / n_f:.2f} % with the head's bias rebalanced)"
        warnings.warn(f"no candidate reached the forget-accuracy target of {target:g} % (at most "
                      f"{held_out_bound(target):g} % of the held-out forget samples recognised); "
                      f"chose alpha_r={best['alpha_r']:g}, alpha_f={best['alpha_f']:g}{head} with held-out forget "
                      f"{best['forget_acc']:.2f} %{shifted}, retain {best['retain_acc']:.2f} %", stacklevel=3)
    scorer.key = None
    scorer.inputs_read.clear()
    monotone = all(  # per alpha_r and head option, over the candidates whose first fold was scored whole
        b["forget_acc"] <= a["forget_acc"] + 1e-9
        for rows in _by_option(c for c in table if not math.isnan(c["forget_acc"])).values()
        for a, b in _pairs_by_alpha_f(rows)
    )
    return AlphaChoice(best["alpha_r"], best["alpha_f"], best["retain_acc"], forget_acc, bool(reached) or reached_shifted, target,
                       scorer.scoring, (n_f, len(scorer.x_r)), monotone, table, time.perf_counter() - t0, allowed,
                       folds=candidates.folds,
                       alpha_f_head=best["alpha_f_head"] if best["head_apart"] and best["alpha_f_head"] != best["alpha_f"] else None,
                       retain_prob=best["retain_prob"], head_shift=head_shift, head_refit=head_refit, samples_to_show=needed,
                       head_shift_refused=shift_refused,
                       forget_acc_rebalanced=None if shifted_hits is None else 100.0 * shifted_hits / n_f)


def rebalanced_forget_hits(model: nn.Module, candidates: Candidates, pair: tuple[float, float, float | None],
                           scorer: Scorer, shift: torch.Tensor, originals: list) -> int:
    """The forget samples, over every fold, that the candidate ``pair`` ``(alpha_r, alpha_f, head
    alpha_f or None)`` still recognises (each fold's edit made without it) with ``shift`` ``(C,)``
    added to the classifier head's bias (:func:`rebalanced_shift`). The model is left with
    ``originals`` (each target's ``(weight, bias)``) written."""
    head = candidates.targets[candidates.head]
    bias = head.bias().detach().clone()  # the head's own, which originals may leave out (None: kept by every edit)
    hits = 0
    scorer.key = None  # no head inputs kept: nothing is re-fitted from these passes
    try:
        with eval_no_grad(model, inference=True):
            for k in range(len(scorer.x_f)):
                for t, (w, b) in zip(candidates.targets, candidates.edits(pair[0], pair[1], k, pair[2])):
                    t.write(w, b)
                head.write(head.weight(), (head.bias().double() + shift.to(bias.device)).to(bias.dtype))
                with part("score forget"):
                    hits += int(scorer.forget_recognised(model, k, 0, len(scorer.x_f[k])).sum())
    finally:
        for t, (w, b) in zip(candidates.targets, originals):
            t.write(w, b)
        head.write(head.weight(), bias)
    return hits


def preference(c: dict[str, float]) -> tuple[float, ...]:
    """The order of candidates that reach the target: best held-out retain probability, then fewer
    forget samples still recognised, then the head edited like the body, then smaller scales."""
    return c["retain_prob"], -c["forget_hits"], -c["head_apart"], -c["alpha_f"], -c["alpha_f_head"]


@dataclass
class _Progress:
    """How far one pair's forget side has been scored (:func:`choose_alphas`).

    Attributes:
        hits: per head option, the forget samples still recognised, counted until it missed.
        scored: per head option, the samples counted.
        rows: per fold, the samples scored (indices), chunk by chunk.
        seen: per fold, ``(options, chunk)`` whether each of those was recognised.
        chunk: the samples of each fold the next round scores.
        rounds: the rounds scored.
        cut: whether, when last scored, it was left pending as one that cannot win.
    """

    hits: list[int]
    scored: list[int]
    rows: list[list[torch.Tensor]]
    seen: list[list[torch.Tensor]]
    chunk: int
    rounds: int = 0
    cut: bool = False  # left pending because it cannot win (when last scored)

    @classmethod
    def start(cls, options: int, folds: int) -> "_Progress":
        return cls([0] * options, [0] * options, [[] for _ in range(folds)], [[] for _ in range(folds)], SCORE_CHUNK)

    def done(self, fold: int) -> int:
        return sum(len(r) for r in self.rows[fold])

    def scored_rows(self, fold: int) -> torch.Tensor:
        return torch.cat(self.rows[fold]) if self.rows[fold] else torch.empty(0, dtype=torch.long)

    def passing(self, allowed: int) -> list[bool]:
        """Per head option, whether it has not missed the target (yet)."""
        return [h <= allowed for h in self.hits]

    def open(self, sizes: Sequence[int], allowed: int) -> bool:
        """Whether scoring on could still change the outcome: some option has not missed and some
        fold (of ``sizes`` samples each) has samples left."""
        return any(self.passing(allowed)) and any(self.done(f) < n for f, n in enumerate(sizes))

    def add(self, fold: int, rows: torch.Tensor, hit: torch.Tensor, allowed: int) -> None:
        """``hit`` ``(options, len(rows))``: whether each of ``fold``'s samples ``rows`` was recognised."""
        for i, n_hit in enumerate(hit.sum(-1).tolist()):
            if self.hits[i] <= allowed:
                self.hits[i] += n_hit
                self.scored[i] += hit.shape[-1]
        self.rows[fold].append(rows)
        self.seen[fold].append(hit)

    def first_fold_accuracy(self, size: int) -> list[float]:
        """Per head option, the percent of the first fold recognised, where all ``size`` were scored."""
        if self.done(0) < size:
            return [math.nan] * len(self.hits)
        return (100.0 * torch.cat(self.seen[0], dim=-1).sum(-1) / size).tolist()


def _by_option(rows) -> dict[tuple[float, float | None], list[dict[str, float]]]:
    """Candidate rows grouped by ``alpha_r`` and head option (None: the head edited with ``alpha_f``)."""
    groups: dict[tuple[float, float | None], list[dict[str, float]]] = {}
    for c in rows:
        groups.setdefault((c["alpha_r"], c["alpha_f_head"] if c["head_apart"] else None), []).append(c)
    return groups


def smallest_passing(table: list[dict[str, float]], allowed: int) -> list[dict[str, float]]:
    """Per ``alpha_r`` and head option, the candidate with the smallest ``alpha_f`` that reaches the
    target. Retain accuracy falls as ``alpha_f`` grows, so a larger one that forgets too is only a
    larger edit; comparing them by a few hundred held-out retain samples would let noise pick it."""
    return [min(passing, key=lambda c: c["alpha_f"])
            for rows in _by_option(table).values() if (passing := [c for c in rows if c["forget_hits"] <= allowed])]


def compromise(retain_acc: float, forget_acc: float) -> float:
    """The fallback score where no candidate reaches the target: ``retain · (100 − forget)``."""
    return retain_acc * (100.0 - forget_acc)


def choice_rank(choice: AlphaChoice) -> tuple[bool, float]:
    """Orders choices as :func:`choose_alphas` orders candidates: reaching the target first, then
    held-out retain accuracy (else :func:`compromise`)."""
    if choice.reached_target:
        return True, choice.retain_prob
    return False, compromise(choice.retain_acc, choice.forget_acc)


def _pairs_by_alpha_f(rows: list[dict[str, float]]) -> list[tuple[dict, dict]]:
    ordered = sorted(rows, key=lambda c: c["alpha_f"])
    return list(zip(ordered, ordered[1:]))
