"""Re-fitting the classifier head's retained rows after an edit, in closed form (docs/auto_alpha.md).

The edit removes the forget space from every layer, and with it parts of the features the
retained classes share with the forgotten ones: the body still separates the retained classes,
but the head, fitted to the unedited features, reads them wrongly. Given the head's inputs under
the edited body, the retained classes' rows ``(weight, bias)`` are solved by ridge regression so
that the retain samples get the unedited model's logits back, while the forget samples keep the
edited model's logits (a lighter weight, one of :data:`FORGET_WEIGHTS`, picked by
cross-validation): no labels, no gradients, one ``(d + 1) × (d + 1)`` solve. The forgotten
classes' rows stay as edited, their bias lowered where the re-fit would otherwise recognise more
forget samples than the edit did (:func:`lowest_shift`).

Shapes: features ``(N, d)``, logits ``(N, C)``, head weight ``(C, d)``, bias ``(C,)``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# The ridge, relative to the mean diagonal of the features' weighted Gram matrix, pulling the rows
# towards the edited head's: on the suite's ViT 1e-3 and 1e-2 gave test retain accuracies within
# 0.3 points of each other, 1e-1 up to 0.8 lower; the larger of the two guards fits on fewer
# samples. Relative, so the features' scale does not matter
RIDGE = 1e-2
# Weights of the forget samples' anchors against the retain samples', in total; cross-validation
# picks one per call. Anchors keep the edit's forgetting (unanchored and without the forgotten
# bias lowered, the re-fit head recognised 2-4 % of the suite SmallCNN's class 7 again); lighter
# ones leave room to restore the retain logits. On the suite's ViT, picking from all five instead
# of the lightest of (0.1, 0.3, 1) that forgets cut the drop on {0, 2} from 1.44 to 0.79 points
FORGET_WEIGHTS = (0.0, 0.03, 0.1, 0.3, 1.0)
SHIFT_PAST = 1e-5  # the forgotten bias shift goes this far (relative) past a margin: float32 ties resolve to retained


@dataclass
class HeadRefit:
    """The re-fitted rows of the classifier head, and what cross-validation measured of them.

    Attributes:
        kept: the retained classes (row indices of the head).
        weight: ``(len(kept), d)`` their new weight rows; bias: ``(len(kept),)``, or None (no head bias).
        retain_acc_before, retain_acc_after: percent of the retain samples predicted right by the
            candidate's head and by the re-fitted one, each part fitted without it (cross-validated).
        forget_hits: forget samples still recognised with the re-fitted rows (each fold fitted
            without it), of ``forget_samples``.
        forget_weight: the forget anchors' weight it was fitted with (of :data:`FORGET_WEIGHTS`).
        forgotten_shift: what is taken from the forgotten classes' bias (>= 0) so that at most the
            allowed number of forget samples is recognised, cross-validated.
    """

    kept: list[int]
    weight: torch.Tensor = field(repr=False)
    bias: torch.Tensor | None = field(repr=False)
    retain_acc_before: float
    retain_acc_after: float
    forget_hits: int
    forget_samples: int
    forget_weight: float
    forgotten_shift: float = 0.0


@dataclass
class _Normal:
    """One block of samples' normal equations: ``gram = Xᵀ X`` ``(d', d')`` and ``rhs = Xᵀ Z``
    ``(d', k)`` in float64, with ``X = [features, 1]`` (the 1 where the head has a bias) and ``Z``
    the kept classes' target logits; ``n`` samples."""

    gram: torch.Tensor
    rhs: torch.Tensor
    n: int

    @staticmethod
    def of(features: torch.Tensor, logits: torch.Tensor, kept: torch.Tensor, bias: bool) -> _Normal:
        x = features.to(torch.float64)
        if bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
        return _Normal(x.T @ x, x.T @ logits.to(torch.float64)[:, kept], len(x))

    @staticmethod
    def total(blocks: Sequence[_Normal]) -> _Normal:
        return _Normal(sum(b.gram for b in blocks), sum(b.rhs for b in blocks), sum(b.n for b in blocks))


def _solved_rows(retain: _Normal, forget: _Normal, weight: torch.Tensor, bias: torch.Tensor | None,
                 kept: torch.Tensor, forget_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows minimising the retain blocks' squared error plus ``forget_weight`` (in total,
    against the retain samples') times the forget blocks', with ridge :data:`RIDGE` towards the
    given rows ``kept``."""
    return _solved_many([(retain, forget, forget_weight)], weight, bias, kept)[0]


def _solved_many(problems: Sequence[tuple[_Normal, _Normal, float]], weight: torch.Tensor, bias: torch.Tensor | None,
                 kept: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`_solved_rows` of each ``(retain, forget, forget_weight)``, in one batched solve (the
    cross-validation's 25 small systems in one call, not 25)."""
    if not problems:
        return []
    grams, rhss = [], []
    for retain, forget, forget_weight in problems:
        per_f = forget_weight * retain.n / max(1, forget.n)
        grams.append(retain.gram + per_f * forget.gram)
        rhss.append(retain.rhs + per_f * forget.rhs)
    gram, rhs = torch.stack(grams), torch.stack(rhss)
    w0 = weight.to(torch.float64)[kept]
    if bias is not None:
        w0 = torch.cat([w0, bias.to(torch.float64)[kept, None]], 1)  # (k, d + 1)
    ridge = RIDGE * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)[:, None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # Symmetric positive definite (a Gram matrix plus a positive ridge): Cholesky, at half an LU's
    # cost, and not torch.linalg.solve, whose batched CPU path (torch 2.14, MKL) fails on systems
    # 257 wide or more once torch.set_num_threads has set two threads or more (its LU runs
    # LAPACK's getrf in several threads at once: pytorch/pytorch#142815)
    factor, info = torch.linalg.cholesky_ex(gram + ridge * eye)
    if bool((info != 0).any()):
        raise ValueError("the head's re-fit met features that are not finite (its normal equations have no "
                         "Cholesky factor); check the model's outputs on the samples given")
    solved = torch.cholesky_solve(rhs + ridge * w0.T, factor).transpose(-1, -2)  # (p, k, d [+ 1])
    if bias is None:
        return [(rows.to(weight.dtype), None) for rows in solved]
    return [(rows[:, :-1].to(weight.dtype), rows[:, -1].to(bias.dtype)) for rows in solved]


def refit_rows(features_r: torch.Tensor, logits_r: torch.Tensor, features_f: torch.Tensor, logits_f: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor | None, kept: Sequence[int], forget_weight: float
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``kept`` of the head ``(weight, bias)`` re-fitted so that ``features_r`` ``(n_r, d)``
    give ``logits_r`` ``(n_r, C)`` and ``features_f`` ``(n_f, d)`` give ``logits_f``, the forget
    samples weighing ``forget_weight`` of the retain samples in total; ridge :data:`RIDGE`
    towards the given rows. Returns ``(weight (k, d), bias (k,) or None)`` in the weight's dtype."""
    idx = torch.as_tensor(list(kept), device=weight.device)
    return _solved_rows(_Normal.of(features_r, logits_r, idx, bias is not None),
                        _Normal.of(features_f, logits_f, idx, bias is not None), weight, bias, idx, forget_weight)


def _logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = features.to(weight.dtype) @ weight.T
    return out if bias is None else out + bias


def _with_rows(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor,
               rows: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = weight.clone()
    weight[kept] = rows[0].to(weight.dtype)
    if bias is not None:
        bias = bias.clone()
        bias[kept] = rows[1].to(bias.dtype)
    return weight, bias


@dataclass
class ForgetFold:
    """A forget fold as the chosen candidate saw it: ``features`` ``(n, d)`` under the body edited
    without it, that candidate's ``head`` ``(weight, bias)``, and ``recognised`` (predictions
    ``(n,)`` -> bool ``(n,)``: still recognised)."""

    features: torch.Tensor
    head: tuple[torch.Tensor, torch.Tensor | None]
    recognised: Callable[[torch.Tensor], torch.Tensor]


def _forgotten_lowered(logits: torch.Tensor, forgotten: torch.Tensor, shift: float) -> torch.Tensor:
    out = logits.clone()
    out[:, forgotten] -= shift
    return out


def lowest_shift(logits: Sequence[torch.Tensor], recognised: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 forgotten: torch.Tensor, allowed_hits: int) -> float:
    """The smallest ``s >= 0`` (to float32 rounding) such that, with ``s`` taken from the
    forgotten classes' logits, at most ``allowed_hits`` samples are still recognised
    (``logits[k]`` ``(n_k, C)``, judged by ``recognised[k]`` from predictions ``(n_k,)``).

    Lowering every forgotten class alike keeps their order, so a sample recognised at ``s = 0``
    stays recognised until ``s`` reaches its margin (its best forgotten logit minus its best
    retained one) and is predicted as a retained class after; one not recognised never becomes
    so. The answer is the ``(allowed_hits + 1)``-th largest margin of the recognised samples."""
    margins = []
    for z, r in zip(logits, recognised):
        retained = torch.ones(z.shape[-1], dtype=torch.bool, device=z.device)
        retained[forgotten] = False
        hit = r(z.argmax(-1).cpu()).to(z.device)
        margins.append((z[:, forgotten].max(-1).values - z[:, retained].max(-1).values)[hit])
    ordered = torch.cat(margins).float().sort(descending=True).values
    if len(ordered) <= allowed_hits:
        return 0.0
    m = float(ordered[allowed_hits])  # past it, at most allowed_hits margins stay above the shift
    return max(0.0, m + SHIFT_PAST * max(1.0, abs(m)))


def cross_validated_refit(features_r: torch.Tensor, logits_r: torch.Tensor, right_r: torch.Tensor,
                          head_r: tuple[torch.Tensor, torch.Tensor | None], folds: Sequence[ForgetFold],
                          kept: Sequence[int], parts_r: Sequence[torch.Tensor], forget_weights: Sequence[float],
                          allowed_hits: int) -> list[HeadRefit]:
    """Per forget weight, the head's rows ``kept`` re-fitted on every sample (:func:`refit_rows`),
    and the shift taken from the other (forgotten) classes' bias that keeps at most
    ``allowed_hits`` forget samples recognised (:func:`lowest_shift`), both measured by
    cross-validation: forget fold ``k`` and retain part ``parts_r[k]`` are scored by rows fitted on
    the other folds and parts. ``features_r`` ``(n_r, d)``: the retain samples' head inputs under
    the body of the head ``head_r``; ``logits_r`` ``(n_r, C)``: the unedited model's logits on
    them; ``right_r`` ``(n_r,)``: the class counted right for each. Every fit adds the same
    per-part normal equations, formed once."""
    w_r, b_r = head_r
    idx = torch.as_tensor(list(kept), device=w_r.device)
    retained = set(kept)
    forgotten = torch.as_tensor([c for c in range(len(w_r)) if c not in retained], device=idx.device)
    right_r = right_r.to(features_r.device)
    blocks_r = [_Normal.of(features_r[p], logits_r[p], idx, b_r is not None) for p in parts_r]
    blocks_f = [_Normal.of(f.features, _logits(f.features, *f.head), idx, b_r is not None) for f in folds]
    before = sum(int((_logits(features_r[p], *head_r).argmax(-1) == right_r[p]).sum()) for p in parts_r)
    n_r = sum(len(p) for p in parts_r)
    without = [(_Normal.total(blocks_r[:k] + blocks_r[k + 1:]), _Normal.total(blocks_f[:k] + blocks_f[k + 1:]))
               for k in range(len(folds))]  # each part's fit: every other part's equations
    every_r, every_f = _Normal.total(blocks_r), _Normal.total(blocks_f)
    # every weight's fits: one per part left out, then the one on every sample
    solved = iter(_solved_many([(*fit, weight) for weight in forget_weights for fit in [*without, (every_r, every_f)]],
                               w_r, b_r, idx))
    out = []
    for weight in forget_weights:
        forget_logits, retain_right = [], []
        for fold, part in zip(folds, parts_r):
            rows = next(solved)
            forget_logits.append(_logits(fold.features, *_with_rows(*fold.head, idx, rows)))
            retain_logits = _logits(features_r[part], *_with_rows(*head_r, idx, rows))
            retain_right.append((retain_logits, right_r[part]))
        shift = lowest_shift(forget_logits, [f.recognised for f in folds], forgotten, allowed_hits)
        hits = sum(int(f.recognised(_forgotten_lowered(z, forgotten, shift).argmax(-1).cpu()).sum())
                   for z, f in zip(forget_logits, folds))
        after = sum(int((_forgotten_lowered(z, forgotten, shift).argmax(-1) == y).sum()) for z, y in retain_right)
        rows = next(solved)
        out.append(HeadRefit(list(kept), *rows, 100.0 * before / n_r, 100.0 * after / n_r, hits,
                             sum(len(f.features) for f in folds), weight, shift))
    return out


def best_refit(features_r: torch.Tensor, logits_r: torch.Tensor, right_r: torch.Tensor,
               head_r: tuple[torch.Tensor, torch.Tensor | None], folds: Sequence[ForgetFold],
               kept: Sequence[int], parts_r: Sequence[torch.Tensor], allowed_hits: int) -> HeadRefit | None:
    """:func:`cross_validated_refit` with the one of :data:`FORGET_WEIGHTS` whose rows keep the
    highest cross-validated retain accuracy (ties: the heavier anchor), where that is at least the
    accuracy of ``head_r``; None where no weight keeps it."""
    refits = cross_validated_refit(features_r, logits_r, right_r, head_r, folds, kept, parts_r, FORGET_WEIGHTS,
                                   allowed_hits)
    kept_acc = [r for r in refits if r.retain_acc_after >= r.retain_acc_before]
    return max(kept_acc, key=lambda r: (r.retain_acc_after, r.forget_weight)) if kept_acc else None
