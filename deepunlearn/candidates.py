"""Every target's new weight for any candidate ``(alpha_r, alpha_f)`` and forget fold, while α is chosen.

Two ways give the same weights (docs/auto_alpha.md, "What it does", step 2):

* :class:`SpectralCandidates`: each input's second moment decomposed once per side and fold
  (``C = U diag(e) Uᵀ``; those of one width in one call); a candidate then only rescales the
  energies. On the CPU the decompositions of the suite's models cost a few hundredths of a second.
* :class:`FactoredCandidates`: each candidate solved as the fixed call solves, by one Cholesky
  factor per input, side and scale (batched by width, kept inverted on a GPU). cuSOLVER's symmetric
  eigensolver runs as thousands of small launches (ViT-B/16 on an H200: about 2.5 s of a 6.3 s
  choice), where a batched factor of every input costs about 0.03 s.

:func:`candidate_edits` takes the second on a GPU for models with wide inputs (:func:`factors_pay`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .layers import EditTarget
from .moments import Moment, SampleRows, dense
from .profiled import part
from .projection import Spectrum, scale_weighted
from .weight_side import (INVERSE_FACTOR_DEVICES, OVERSAMPLE, SOLVE_BATCH_BYTES, LowRankSpectrum, SampleSpaceFactor,
                          SideSolver, factors_by_width, sample_basis, side_solver, side_way, sketched_eigenpairs)

# Device types where candidates are solved by factors rather than rescaled from eigendecompositions
# (module docstring): on a GPU the eigensolver's launches cost more than a factor per candidate...
FACTORED_DEVICES = frozenset({"cuda"})
# ... where some edited input is at least this wide. On an H200 ViT-B/16 (inputs 768 and 3072 wide)
# chose in 2.9 s by factors against 6.0 s; the suite's models (inputs at most 576 wide), whose
# eigendecompositions take a few milliseconds, chose as fast or faster without (SmallCNN 0.29 s
# against 0.40 s): each factored candidate adds launches and host syncs to a latency-bound search.
FACTORED_MIN_WIDTH = 768
# Scales whose rescaled energies SpectralCandidates keeps at once: the body's alpha_f and each head
# option's (auto_alpha.HEAD_ALPHA_F has five), so that scoring one candidate never recomputes them.
SCALES_KEPT = 6
# Factors kept by FactoredCandidates, in whole sets (every input at one scale and fold): the
# current candidate's and the one before (a retain-side rescoring rewrites a recent pair). A set
# is the size of the model's second moments (ViT-B/16: 0.54 GB in float32); a head option's factor
# counts as one input of a set.
FACTOR_SETS_KEPT = 2
# Kept input vectors R (n × d) are decomposed through their n × n Gram matrix (2·d·n² flops for it and as many for
# the basis, an n × n eigenproblem) while n is below this fraction of d; past it the full d × d eigendecomposition of
# RᵀR is faster. Measured on the 2-core CPU: 15 against 19 ms at 0.8·576, 20 against 19 at 0.9 (SmallCNN's 525 of
# 576); 0.72 against 0.80 s at 0.8·2304, 0.94 against 0.80 at 0.9.
KEPT_GRAM_MAX_FRACTION = 0.8
# Targets whose weight has at most this many elements per group (out × in) are edited in stacks, the targets of one
# shape (weight and eigenvectors) together in one batched product: on the suite's ViT (four blocks, no weight over
# 192 × 128) each separate edit was a few products of microseconds, dispatch rather than arithmetic, a fifth of choosing. The
# stacks copy these weights and eigenvectors once per fold, so large targets, cheap to dispatch, are left apart.
STACKED_MAX_ELEMENTS = 1 << 16


class Candidates:
    """What both ways share: the targets, copies of their weights, and the retain means and
    original biases that mean-keeping candidates start from.

    Args:
        targets: the weights to edit.
        moments_f: the first fold's forget moments per input (its candidates score that fold).
        moments_r: the retain moments (of the retain samples not held out).
        other_folds: for each further fold, a function giving its forget moments.
        head: the classifier head, which may take its own ``alpha_f``; :attr:`head` is its index in
            :attr:`targets` (None where it is not given, not reached, or the only target).
        means_r: the retain mean input per slot tuple (:func:`~deepunlearn.plan.layer_means`): each
            candidate's biases then keep the retain mean output (:meth:`edit`). None: biases kept.
    """

    def __init__(self, targets: Sequence[EditTarget], moments_f: dict, moments_r: dict,
                 other_folds: Sequence[Callable[[], dict]] = (), head: EditTarget | None = None,
                 means_r: dict | None = None):
        self.targets = [t for t in targets if moments_f[t.slots][0] is not None]
        self.head = next((i for i, t in enumerate(self.targets) if t is head), None) if len(self.targets) > 1 else None
        self.dtype = next((c.dtype for c, _ in moments_f.values() if c is not None), torch.float32)
        # copies: candidates are written into the very parameters these would otherwise view
        self.w = [t.as_matrices(t.weight().detach()).to(self.dtype, copy=True) for t in self.targets]
        self.means = [None if means_r is None or t.bias() is None else means_r.get(t.slots) for t in self.targets]
        self.biases = [None if m is None else t.bias().detach().clone() for t, m in zip(self.targets, self.means)]
        self.forms = [(t.weight().shape, t.weight().dtype) for t in self.targets]  # each new weight's shape and dtype
        self._folds = 1 + len(other_folds)

    @property
    def folds(self) -> int:
        return self._folds

    def edit(self, i: int, alpha_r: float, alpha_f: float, fold: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target ``i``'s new weight (its own shape and dtype) for the pair, edited with ``fold``'s
        forget side, and its new bias (None: kept; where :attr:`means` holds its retain mean, the
        bias that keeps its mean output, from the target's original bias)."""
        raise NotImplementedError

    def edits(self, alpha_r: float, alpha_f: float, fold: int = 0, alpha_f_head: float | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """:meth:`edit` of every target for the pair; the :attr:`head` with ``alpha_f_head`` where given."""
        return [self.edit(i, alpha_r, self._forget_scale(i, alpha_f, alpha_f_head), fold) for i in range(len(self.targets))]

    def _forget_scale(self, i: int, alpha_f: float, alpha_f_head: float | None) -> float:
        """Target ``i``'s ``alpha_f``: ``alpha_f_head`` for the :attr:`head` where given."""
        return alpha_f_head if i == self.head and alpha_f_head is not None else alpha_f

    def weights(self, alpha_r: float, alpha_f: float, fold: int = 0, alpha_f_head: float | None = None
                ) -> list[torch.Tensor]:
        """The new weights alone (:meth:`edits`)."""
        return [w for w, _ in self.edits(alpha_r, alpha_f, fold, alpha_f_head)]

    def _finished(self, i: int, new: torch.Tensor, mean_shift: Callable[[], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target ``i``'s new weight ``new`` ``(g, o, d)`` in its own form, and its bias: ``b + (W − W′) μ``
        (``mean_shift()`` gives ``(W − W′) μ`` as ``(g, o, 1)``) where it keeps the retain mean."""
        shape, dtype = self.forms[i]
        bias = None
        if self.means[i] is not None:  # plan.mean_keeping_bias
            b = self.biases[i]
            bias = (b.to(self.dtype).view(new.shape[0], -1, 1) + mean_shift()).reshape(-1).to(b.dtype)
        return new.reshape(shape).to(dtype), bias

    def _unedited(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape, dtype = self.forms[i]
        return self.w[i].reshape(shape).to(dtype), None if self.means[i] is None else self.biases[i]


def _eigenpairs(moments: Sequence[tuple[Moment, int]]) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``(B, r, weighted)`` of each second moment, given with the vectors it saw: ``B`` ``(g, d, k)``
    and ``r`` ``(g, k)`` with ``Ĉ = C / tr C = B diag(r) Bᵀ`` (eigenpairs), or, where ``weighted``,
    ``Ĉ = B Bᵀ`` with ``r`` its eigenvalues (:func:`~deepunlearn.weight_side.sample_basis`). Kept vectors
    that are few enough (:data:`KEPT_GRAM_MAX_FRACTION`) go through their Gram matrix; a sum that saw
    fewer vectors than half its width through the sketch; the rest by a full eigendecomposition.
    Every symmetric eigenproblem of one width (Gram matrices and full moments alike) is solved in
    one call (:meth:`Spectrum.of_many`)."""
    out: list = [None] * len(moments)
    solved: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (index, matrix, kept vectors or None)
    for i, (cov, n) in enumerate(moments):
        d = cov.shape[-1]
        if isinstance(cov, SampleRows) and cov.vectors < KEPT_GRAM_MAX_FRACTION * d:
            solved.append((i, cov.gram(), cov.rows))
        elif n + OVERSAMPLE < d // 2:
            out[i] = (*sketched_eigenpairs(dense(cov), n), False)
        else:
            solved.append((i, dense(cov), None))
    for (i, _, rows), spectrum in zip(solved, Spectrum.of_many([matrix for _, matrix, _ in solved])):
        if rows is None:
            out[i] = spectrum.vectors, spectrum.energies, False
        else:
            out[i] = sample_basis(rows, spectrum.vectors), spectrum.energies, True
    return out


class _ScaledEnergies:
    """Every target's scales on one side (retain, or a forget fold): ``λ(α)``, or ``λ(α) / r`` for a
    weighted basis (:func:`_eigenpairs`), computed for all targets at once per ``α`` (one elementwise
    pass instead of one per target)."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor, bool] | None]):
        present = [p for p in pairs if p is not None]
        self._flat = torch.cat([p[1].reshape(-1) for p in present]) if present else None
        self._weighted = torch.cat([torch.full((p[1].numel(),), p[2], device=p[1].device)
                                    for p in present]) if present else None
        self._layout = [None if p is None else p[1] for p in pairs]
        self._cache: dict[float, list[torch.Tensor | None]] = {}

    def __call__(self, alpha: float) -> list[torch.Tensor | None]:
        if alpha not in self._cache:
            if len(self._cache) >= SCALES_KEPT:
                self._cache.clear()
            parts = iter(scale_weighted(self._flat, alpha, self._weighted).split(
                [e.numel() for e in self._layout if e is not None]) if self._flat is not None else ())
            self._cache[alpha] = [None if e is None else next(parts).view(e.shape) for e in self._layout]
        return self._cache[alpha]


@dataclass
class _Stack:
    """Small targets of one shape edited together (:data:`STACKED_MAX_ELEMENTS`), for one fold.

    Attributes:
        members: the targets' indices.
        groups: each member's number of groups ``g``.
        w: ``(Σg, o, d)`` their original weights, stacked.
        u: ``(Σg, d, k)`` their forget-side bases ``U_f`` (eigenvectors, or a weighted basis), stacked.
        u_mean: ``(Σg, k, 1)`` ``U_fᵀ μ_r`` where the members' biases keep the retain mean, else None.
        bias: ``(Σg, o, 1)`` their original biases there, else None.
    """

    members: list[int]
    groups: list[int]
    w: torch.Tensor
    u: torch.Tensor
    u_mean: torch.Tensor | None
    bias: torch.Tensor | None


class SpectralCandidates(Candidates):
    """Candidates from one decomposition per input and side (the retain side and every forget fold,
    all made at once).

    With ``C = U diag(e) Uᵀ`` per side, ``W M = ((W U) diag(λ(α))) Uᵀ`` (with a weighted basis from
    kept vectors, :func:`_eigenpairs`, the same with ``λ(α) / r``): a candidate costs two thin
    products per side and layer; ``W U_r`` is kept per layer and ``V = W − W M_r`` per ``alpha_r``
    (shared by the folds, which differ in the forget side only). :meth:`edits` edits small targets of
    one shape in stacks (:data:`STACKED_MAX_ELEMENTS`). Arguments as :class:`Candidates`.
    """

    def __init__(self, targets: Sequence[EditTarget], moments_f: dict, moments_r: dict,
                 other_folds: Sequence[Callable[[], dict]] = (), head: EditTarget | None = None,
                 means_r: dict | None = None):
        super().__init__(targets, moments_f, moments_r, other_folds, head, means_r)
        # every side at once, so that equal widths share a call: a fold not scored yet is rare
        # (every fold scores the choice), and on a GPU the calls, not the work, cost
        self.retain, *self._forget = self._pairs([moments_r, moments_f, *(fold() for fold in other_folds)])
        self._scaled_r = _ScaledEnergies(self.retain)
        self._scaled_f = [_ScaledEnergies(pairs) for pairs in self._forget]
        self.wu_r = [None if r is None else w @ r[0] for w, r in zip(self.w, self.retain)]
        self._v: tuple[float, list[torch.Tensor]] | None = None
        self._vu: dict[tuple[int, int], torch.Tensor] = {}  # (fold, target) -> V U_f, for the last alpha_r
        self._u_mean: dict[tuple[int, int], torch.Tensor] = {}  # (fold, target) -> U_fᵀ μ_r, (g, k, 1)
        self._stacks: dict[int, list[_Stack]] = {}  # per fold: the small targets edited together
        self._stacked_vu: dict[tuple[int, int], torch.Tensor] = {}  # (fold, stack) -> V U_f stacked, for the last alpha_r

    def _pairs(self, sides: Sequence[dict]) -> list[list[tuple[torch.Tensor, torch.Tensor, bool] | None]]:
        """Per side, each target's ``(U, r, weighted)`` (:func:`_eigenpairs`; None where the side never
        reached it); inputs shared by several targets are decomposed once."""
        with part("decompose"):
            entries = [[moments[t.slots] for t in self.targets] for moments in sides]
            distinct = list({id(cov): (cov, n) for side in entries for cov, n in side if cov is not None}.values())
            pairs = {id(cov): pair for (cov, _), pair in zip(distinct, _eigenpairs(distinct))}
            return [[None if cov is None else pairs[id(cov)] for cov, _ in side] for side in entries]

    def _retain_side(self, alpha_r: float) -> list[torch.Tensor]:
        """``V = W − W M_r`` per target, kept for the last ``alpha_r``."""
        if self._v is None or self._v[0] != alpha_r:
            v = []
            for w, wu, r, lam in zip(self.w, self.wu_r, self.retain, self._scaled_r(alpha_r)):
                v.append(w if r is None else torch.baddbmm(w, wu * lam[:, None, :], r[0].transpose(-1, -2), alpha=-1.0))
            self._v, self._vu, self._stacked_vu = (alpha_r, v), {}, {}
        return self._v[1]

    def _stacks_of(self, fold: int) -> list["_Stack"]:
        """The fold's stacks: targets of at most :data:`STACKED_MAX_ELEMENTS` weight elements per group,
        two or more of one shape (weight, eigenvectors, whether the bias keeps the retain mean)."""
        if fold not in self._stacks:
            pairs = self._forget[fold]
            by_shape: dict[tuple, list[int]] = {}
            for i, (w, f) in enumerate(zip(self.w, pairs)):
                if f is not None and w.shape[-2] * w.shape[-1] <= STACKED_MAX_ELEMENTS:
                    by_shape.setdefault((w.shape, f[0].shape, self.means[i] is not None), []).append(i)
            stacks = []
            for members in by_shape.values():
                if len(members) > 1:
                    u = torch.cat([pairs[i][0] for i in members])
                    groups = [self.w[i].shape[0] for i in members]
                    mean = bias = None
                    if self.means[members[0]] is not None:
                        mean = torch.cat([pairs[i][0].transpose(-1, -2) @ self.means[i].to(u)[:, :, None] for i in members])
                        bias = torch.cat([self.biases[i].to(u).view(g, -1, 1) for i, g in zip(members, groups)])
                    stacks.append(_Stack(members, groups, torch.cat([self.w[i] for i in members]), u, mean, bias))
            self._stacks[fold] = stacks
        return self._stacks[fold]

    def edits(self, alpha_r: float, alpha_f: float, fold: int = 0, alpha_f_head: float | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        v = self._retain_side(alpha_r)
        stacks = self._stacks_of(fold)
        out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(self.targets)
        for k, stack in enumerate(stacks):
            if (fold, k) not in self._stacked_vu:
                self._stacked_vu[fold, k] = torch.cat([v[i] for i in stack.members]) @ stack.u
            lam = torch.cat([self._scaled_f[fold](self._forget_scale(i, alpha_f, alpha_f_head))[i] for i in stack.members])
            thin = self._stacked_vu[fold, k] * lam[:, None, :]  # (W − W′) = thin U_fᵀ, every member at once
            new = torch.baddbmm(stack.w, thin, stack.u.transpose(-1, -2), alpha=-1.0)
            members = new.split(stack.groups)
            biases = ([None] * len(members) if stack.u_mean is None else  # plan.mean_keeping_bias, every member at once
                      torch.baddbmm(stack.bias, thin, stack.u_mean).split(stack.groups))
            for i, member, bias in zip(stack.members, members, biases):
                shape, dtype = self.forms[i]
                out[i] = member.reshape(shape).to(dtype), None if bias is None else bias.reshape(-1).to(self.biases[i].dtype)
        return [edit if edit is not None else self.edit(i, alpha_r, self._forget_scale(i, alpha_f, alpha_f_head), fold)
                for i, edit in enumerate(out)]

    def edit(self, i: int, alpha_r: float, alpha_f: float, fold: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        v, f = self._retain_side(alpha_r)[i], self._forget[fold][i]
        if f is None:
            return self._unedited(i)
        if (fold, i) not in self._vu:  # the scan and bisection try several alpha_f per alpha_r
            self._vu[fold, i] = v @ f[0]
        thin = self._vu[fold, i] * self._scaled_f[fold](alpha_f)[i][:, None, :]  # (W − W′) = thin U_fᵀ

        def mean_shift() -> torch.Tensor:  # through the thin factor: U_fᵀ μ is kept per fold
            if (fold, i) not in self._u_mean:
                self._u_mean[fold, i] = f[0].transpose(-1, -2) @ self.means[i].to(f[0])[:, :, None]
            return thin @ self._u_mean[fold, i]

        return self._finished(i, torch.baddbmm(self.w[i], thin, f[0].transpose(-1, -2), alpha=-1.0), mean_shift)


class FactoredCandidates(Candidates):
    """Candidates solved as the fixed call solves them: ``V = W − W M_r`` per ``alpha_r`` and
    ``W′ = W − V M_f`` per ``alpha_f`` and fold, each side of each input applied by the cheapest way
    (:func:`~deepunlearn.weight_side.side_solver`), same-width Cholesky factors batched as the fixed call
    batches them (:func:`~deepunlearn.weight_side.factors_by_width`; inverted on a GPU).
    The most recent factors are kept, at most :data:`FACTOR_SETS_KEPT` sets' worth; the retain side's
    only until ``V`` is made. What no scale changes is made once per moment and kept
    (:meth:`_alpha_free_of`: kept vectors' Gram matrix or their sum ``RᵀR``, a sketch's eigenpairs;
    each at most the size of a dense second moment). Arguments as :class:`Candidates`.
    """

    def __init__(self, targets: Sequence[EditTarget], moments_f: dict, moments_r: dict,
                 other_folds: Sequence[Callable[[], dict]] = (), head: EditTarget | None = None,
                 means_r: dict | None = None):
        super().__init__(targets, moments_f, moments_r, other_folds, head, means_r)
        self._retain = [moments_r[t.slots] for t in self.targets]
        self._forget: list[list | Callable[[], dict]] = [[moments_f[t.slots] for t in self.targets], *other_folds]
        rows: dict[int, int] = {}  # per input: the weight rows reading it, which decide the cheapest way
        for t, w, (cov, _) in zip(self.targets, self.w, self._retain):
            if cov is not None:
                rows[id(cov)] = rows.get(id(cov), 0) + w.shape[1]
        self._rows = [rows.get(id(cov), w.shape[1]) for w, (cov, _) in zip(self.w, self._retain)]
        self._inputs = max(1, len(rows))  # distinct inputs: the size of one set of factors
        device = self.w[0].device if self.w else torch.device("cpu")
        self._inverse = device.type in INVERSE_FACTOR_DEVICES
        self._batch_bytes = SOLVE_BATCH_BYTES.get(device.type, 0)  # as the fixed call batches its factors
        self._solvers: dict[tuple[object, float], dict[int, SideSolver]] = {}  # (side, α) -> per input
        self._alpha_free: dict[tuple[int, str], object] = {}  # (moment id, what): its solvers' start at any α
        self._v: tuple[float, list[torch.Tensor]] | None = None
        self._projected: dict[tuple[int, int], torch.Tensor] = {}  # (fold, target) -> V projected on the forget
        # side's vectors or eigenvectors, for the last alpha_r: the scan and bisection try several alpha_f per alpha_r

    def _side_moments(self, side: object) -> list[tuple[Moment | None, int]]:
        """``"r"``, or a fold's index: each target's ``(moment, vectors)``."""
        if side == "r":
            return self._retain
        if callable(self._forget[side]):
            fit = self._forget[side]()
            self._forget[side] = [fit[t.slots] for t in self.targets]
        return self._forget[side]

    def _solver(self, side: object, alpha: float, indices: Sequence[int]) -> list[SideSolver | None]:
        """The side's solvers at ``alpha`` for targets ``indices``: made for every input among them
        not yet solved at that scale, those by a Cholesky factor batched by width."""
        moments = self._side_moments(side)
        solved = self._solvers.setdefault((side, alpha), {})
        to_factor: dict[int, Moment] = {}  # inputs factored together, by width
        for i in indices:
            cov, n = moments[i]
            if cov is None or id(cov) in solved:
                continue
            way = side_way(cov, self._rows[i], n)
            if way == "cholesky":
                to_factor[id(cov)] = cov
            else:
                solved[id(cov)] = self._solved_apart(cov, way, alpha, n)
        with part("decompose"):
            for batch in factors_by_width(list(to_factor), lambda key: self._alpha_free_of(to_factor[key], "dense"),
                                          lambda _: alpha, self._inverse, self._batch_bytes):
                solved.update(batch)
        out = [None if moments[i][0] is None else solved[id(moments[i][0])] for i in indices]
        budget = FACTOR_SETS_KEPT * self._inputs
        while sum(map(len, self._solvers.values())) > budget and len(self._solvers) > 1:
            del self._solvers[next(k for k in self._solvers if k != (side, alpha))]  # the oldest other scale
        return out

    def _alpha_free_of(self, cov: Moment, what: str, rank_bound: int = 0) -> object:
        """The part of ``cov``'s solvers that no scale changes, made on first use and kept: its dense
        form (``"dense"``: ``Rᵀ R`` for kept vectors, the moment itself otherwise), its vectors' Gram
        matrix (``"gram"``) or its sketched eigenpairs (``"spectrum"``, of rank at most ``rank_bound``)."""
        if what == "dense" and not isinstance(cov, SampleRows):
            return cov
        key = (id(cov), what)
        if key not in self._alpha_free:
            with part("decompose"):
                if what == "dense":
                    made = cov.dense()
                elif what == "gram":
                    made = cov.gram()
                else:
                    made = sketched_eigenpairs(dense(cov), rank_bound)
            self._alpha_free[key] = made
        return self._alpha_free[key]

    def _solved_apart(self, cov: Moment, way: str, alpha: float, vectors: int) -> SideSolver:
        """``cov``'s solver at ``alpha`` by ``way`` (not a batched Cholesky factor), from its scale-free
        part (:meth:`_alpha_free_of`): the search asks for many scales of one moment."""
        if way == "sample-space":
            return SampleSpaceFactor.of(cov.rows, alpha, self._alpha_free_of(cov, "gram"))
        if way == "low-rank":
            return LowRankSpectrum.scaled(*self._alpha_free_of(cov, "spectrum", vectors), alpha)
        return side_solver(cov, alpha, 0, vectors, way)

    def _retain_side(self, alpha_r: float) -> list[torch.Tensor]:
        """``V = W − W M_r`` per target, kept for the last ``alpha_r``."""
        if self._v is None or self._v[0] != alpha_r:
            solvers = self._solver("r", alpha_r, range(len(self.targets)))
            self._v = (alpha_r, [w if s is None else w - s.right_multiply(w) for w, s in zip(self.w, solvers)])
            self._projected = {}
            del self._solvers["r", alpha_r], solvers
        return self._v[1]

    def edits(self, alpha_r: float, alpha_f: float, fold: int = 0, alpha_f_head: float | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        body = [i for i in range(len(self.targets)) if i != self.head or alpha_f_head is None]
        self._solver(fold, alpha_f, body)  # every input at the body's scale in one batch per width
        return super().edits(alpha_r, alpha_f, fold, alpha_f_head)

    def edit(self, i: int, alpha_r: float, alpha_f: float, fold: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        v = self._retain_side(alpha_r)[i]
        forget = self._solver(fold, alpha_f, [i])[0]
        if forget is None:
            return self._unedited(i)
        if isinstance(forget, (SampleSpaceFactor, LowRankSpectrum)):
            if (fold, i) not in self._projected:
                self._projected[fold, i] = forget.projected(v)
            removed = forget.right_multiply(v, self._projected[fold, i])  # (W − W′) = V M_f
        else:
            removed = forget.right_multiply(v)
        return self._finished(i, self.w[i] - removed, lambda: removed @ self.means[i].to(removed)[:, :, None])


def factors_pay(device_type: str, widest_input: int) -> bool:
    """Whether candidates are solved by factors by default: on the devices of
    :data:`FACTORED_DEVICES`, for models with an input at least :data:`FACTORED_MIN_WIDTH` wide."""
    return device_type in FACTORED_DEVICES and widest_input >= FACTORED_MIN_WIDTH


def candidate_edits(targets: Sequence[EditTarget], moments_f: dict, moments_r: dict,
                    other_folds: Sequence[Callable[[], dict]] = (), head: EditTarget | None = None,
                    means_r: dict | None = None, factored: bool | None = None) -> Candidates:
    """:class:`FactoredCandidates` where ``factored`` (default: :func:`factors_pay`), else
    :class:`SpectralCandidates`. Arguments as :class:`Candidates`."""
    if factored is None:
        factored = bool(targets) and factors_pay(targets[0].weight().device.type,
                                                 max(t.as_matrices(t.weight()).shape[-1] for t in targets))
    kind = FactoredCandidates if factored else SpectralCandidates
    return kind(targets, moments_f, moments_r, other_folds, head, means_r)
