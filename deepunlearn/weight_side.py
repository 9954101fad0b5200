"""The edit ``W ← W − (W − W M_r) M_f`` solved on the weight's side, without forming ``M``.

``M(C, α) = α Ĉ A⁻¹`` with ``A = (α−1)Ĉ + I`` (``Ĉ = C / tr C``). Each side of the edit needs only
``W ↦ W M``, and four ways give it (docs/solver.md):

* :class:`ScaledFactor`: ``W M = α/(α−1) (W − W A⁻¹)`` by one Cholesky factorisation of ``A``
  (d³/3 flops) and two triangular solves with ``o`` right-hand sides (2·o·d²);
* :class:`LowRankSpectrum`: when the layer saw ``n < d`` input vectors, ``C`` has rank at most
  ``n``; a sketch ``C Ω`` with ``k = n + OVERSAMPLE`` columns recovers its eigenpairs exactly (up
  to rounding) in about 4·d²·k flops, and ``W M = (W U) diag(λ) Uᵀ``;
* :class:`FormedProjection`: ``M`` itself (about 7d³/3 flops): never fewer flops than the factor,
  which is applied to as many rows for the same 2·o·d²; kept for ``way="formed"`` and the eigen and
  SVD solvers;
* :class:`SampleSpaceFactor`: where the statistics kept the ``n < d`` input vectors ``R`` themselves,
  ``W M = α/t (W Rᵀ) B⁻¹ R`` with ``B = (α−1) R Rᵀ / t + I`` (``n × n``, ``t = tr C``): about
  2·d·n² + n³/3 + 4·o·d·n flops and no ``d × d`` matrix at all.

:func:`side_solver` picks the cheapest by its flop count. ``A``'s and ``B``'s eigenvalues lie in
``[1, α]``, so float32 is enough (``cond ≤ α``).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .moments import Moment, SampleRows, dense
from .ops.edit import edited_weight
from .projection import normalised_eigh, scale_energies, scaled_projection, symmetric_normalised

OVERSAMPLE = 8  # sketch columns beyond the rank bound: a margin for rounding, as randomized methods use
SKETCH_SEED = 0  # a fixed sketch, so that the same statistics always give the same edit


# |α − 1| below which W M = α/(α−1) (W − W A⁻¹) would amplify rounding more than 5×; there
# W M = α (W Ĉ) A⁻¹ instead, at the cost of one more o × d × d product.
DIFFERENCE_MIN_GAP = 0.25


# Columns per step of :func:`inverse_cholesky`: each diagonal block is factored and inverted by the
# batched small-matrix kernels (at most 512 wide), and the products between blocks, which carry
# nearly all the flops, are batched GEMMs large enough to fill a GPU.
INVERSE_BLOCK = 256


# Bytes of second moments factored in one batched call, by device type. On a GPU one launch per
# matrix leaves most of the device idle (ViT-B/16: 100 factorisations of 768-3072 wide matrices);
# on the CPU LAPACK factors a batch one matrix at a time anyway, and solving lazily holds less.
SOLVE_BATCH_BYTES = {"cuda": 1 << 30}
# Device types whose batched factors are kept inverted (:func:`inverse_cholesky`), each layer then
# applying them by two GEMMs: on a GPU cuSOLVER's factorisation and cuBLAS's triangular solves run
# as thousands of small launches (ViT-B/16: 2,300 trsm kernels), the inverse as a few dozen GEMMs.
# On the CPU the factorisation (blocked) and the triangular solves run near GEMM speed for a quarter of the flops.
INVERSE_FACTOR_DEVICES = frozenset({"cuda"})


def _lower_inverse(l: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` for a batch of small lower triangular ``l`` ``(g, k, k)``."""
    eye = torch.eye(l.shape[-1], dtype=l.dtype, device=l.device).expand_as(l)
    return torch.linalg.solve_triangular(l, eye, upper=False)


def inverse_cholesky(b: torch.Tensor, block: int = INVERSE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, info)`` with ``X = L⁻¹`` (lower triangular, ``(g, d, d)``) for ``B = L Lᵀ`` (``b``:
    ``(g, d, d)``, only its lower triangle read; it is overwritten) and ``info`` ``(g,)``: 0, or the
    1-based column at which ``B`` was found not positive definite.

    Blocked by ``block`` columns, every step batched over the ``g`` matrices: the diagonal block of
    the Schur complement is factored and inverted, the panel below it becomes ``L``'s
    (``L_>j,j = S_>j,j X_jjᵀ``), the trailing complement is updated by one GEMM, and ``X``'s block
    row follows from ``X_j,<j = −X_jj (L_j,<j X_<j,<j)``. About 4d³/3 flops (a Cholesky
    factorisation is d³/3), nearly all in GEMMs, in ``3·d/block`` batched launches; applying
    ``B⁻¹ = Xᵀ X`` to ``o`` rows is then two GEMMs instead of two triangular solves.
    ``cond X = √cond B``: inverting the factor costs no more accuracy than solving with it.
    """
    g, d, _ = b.shape
    x = torch.zeros_like(b)
    info = torch.zeros(g, dtype=torch.int32, device=b.device)
    for r0 in range(0, d, block):
        r1 = min(d, r0 + block)
        l_jj, info_j = torch.linalg.cholesky_ex(b[:, r0:r1, r0:r1])
        info = torch.where((info == 0) & (info_j > 0), info_j + r0, info)
        x_jj = _lower_inverse(l_jj)
        x[:, r0:r1, r0:r1] = x_jj
        if r0 > 0:  # b[:, r0:r1, :r0] holds L_j,<j, written by the earlier panels
            x[:, r0:r1, :r0] = (x_jj @ (b[:, r0:r1, :r0] @ x[:, :r0, :r0])).neg_()
        if r1 < d:
            panel = b[:, r1:, r0:r1] @ x_jj.mT
            b[:, r1:, r0:r1] = panel
            b[:, r1:, r1:].baddbmm_(panel, panel.mT, alpha=-1.0)
    return x, info


# Columns per step of :func:`blocked_cholesky`: each step is one GEMM deep enough (d × j·block by
# block) to run at the BLAS's GEMM rate; on this project's 2-core CPU 256 and 384 are alike, 512 10 % slower.
CHOLESKY_BLOCK = 384
# Device types where :func:`blocked_cholesky` replaces LAPACK's potrf: MKL's factorisation ran at
# about 110 Gflop/s on two cores where its GEMMs ran at 310 (4608 wide: 0.33 s, blocked 0.17 s).
BLOCKED_CHOLESKY_DEVICES = frozenset({"cpu"})


def blocked_cholesky(b: torch.Tensor, block: int = CHOLESKY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, info)`` with ``L Lᵀ = B`` for ``b`` ``(g, d, d)`` (only its lower triangle read; it is
    overwritten and returned as ``L``) and ``info`` as :func:`torch.linalg.cholesky_ex` gives it.

    Left-looking by ``block`` columns: block column ``j`` is brought up to date by one GEMM,
    ``S_≥j,j = B_≥j,j − L_≥j,<j L_j,<jᵀ``, its diagonal block factored, the panel below it solved
    against it (times the small block's inverse). d³/3 flops, nearly all in the GEMMs.
    """
    d = b.shape[-1]
    info = torch.zeros(b.shape[0], dtype=torch.int32, device=b.device)
    for r0 in range(0, d, block):
        r1 = min(d, r0 + block)
        if r0 > 0:
            b[:, r0:, r0:r1].baddbmm_(b[:, r0:, :r0], b[:, r0:r1, :r0].mT, alpha=-1.0)
        l_jj, info_j = torch.linalg.cholesky_ex(b[:, r0:r1, r0:r1])
        info = torch.where((info == 0) & (info_j > 0), info_j + r0, info)
        b[:, r0:r1, r0:r1] = l_jj
        if r1 < d:  # S L_jj⁻ᵀ as a GEMM: a triangular solve would copy the strided panel twice
            b[:, r1:, r0:r1] = b[:, r1:, r0:r1] @ _lower_inverse(l_jj).mT
    return b.tril_(), info


def shifted_cholesky(cov: torch.Tensor, alpha: torch.Tensor, inverse: bool = False,
                     overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, shift, trace)`` for ``cov`` ``(g, d, d)`` and scales ``alpha`` ``(g,)``: ``L Lᵀ = B``
    with ``A = (α−1)Ĉ + I = B / shift``, ``B = ±C + shift·I`` and ``shift = tr C / |α−1|``;
    ``inverse``: ``L⁻¹`` instead of ``L`` (:func:`inverse_cholesky`); ``overwrite``: ``B`` is formed
    and factored in ``cov``'s own memory (a contiguous ``cov`` the caller no longer needs).

    ``A`` is ``B`` scaled, so factoring ``B`` needs no normalised copy of ``C``: one copy of it with
    its diagonal shifted (negated where ``α < 1``). Only the lower triangle is read, so ``C`` need
    not be made exactly symmetric. Groups where ``A = I`` (``tr C = 0`` or ``α = 1``) get
    ``B = I`` and ``shift = 1``. Raises ``RuntimeError`` where ``B`` is not positive definite.
    """
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    gap = alpha.to(cov.dtype) - 1.0
    identity = (trace <= 0) | (gap == 0)
    shift = torch.where(identity, torch.ones_like(trace), trace / torch.where(identity, torch.ones_like(gap), gap.abs()))
    # a copy of a 4608-wide C took a sixth of VGG-11-BN's solve on the CPU: skipped where C is spent
    b = cov if overwrite and cov.is_contiguous() else cov.clone()
    negative = gap < 0
    if bool(negative.any()):
        b[negative] = -b[negative]
    if bool(identity.any()):
        b[identity] = 0.0
    b.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    if inverse:
        chol, info = inverse_cholesky(b)
    elif b.device.type in BLOCKED_CHOLESKY_DEVICES and b.shape[-1] > CHOLESKY_BLOCK:
        chol, info = blocked_cholesky(b)
    else:
        chol, info = torch.linalg.cholesky_ex(b)
    if int(info.max()) > 0:
        bad = sorted(set(alpha[info > 0].tolist()))
        raise RuntimeError(f"Cholesky factorisation failed for alpha={bad} (matrix not positive definite)")
    return chol, shift, trace


def right_solve(chol: torch.Tensor, y: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``y (L Lᵀ)⁻¹ = y L⁻ᵀ L⁻¹`` for ``y`` ``(g, o, d)`` and lower ``chol`` ``(g, d, d)``: two
    triangular solves from the right, with no transposed copies of ``y``; ``inverse``: ``chol`` is
    ``X = L⁻¹`` and the solves are the products ``(y Xᵀ) X``."""
    if inverse:
        return (y @ chol.mT) @ chol
    z = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False)
    return torch.linalg.solve_triangular(chol, z, upper=False, left=False)


@dataclass
class ScaledFactor:
    """What right-multiplying by ``M(C, α)`` needs, for a batch of groups.

    ``M = α Ĉ A⁻¹`` and ``Ĉ = (A − I)/(α−1)`` give ``W M = α/(α−1) (W − W A⁻¹)``: one Cholesky
    factor and two triangular solves, no product with ``Ĉ``. Where ``|α − 1|`` is below
    :data:`DIFFERENCE_MIN_GAP` the difference would cancel: ``W M = α (W C / tr C) A⁻¹`` there
    (``W Ĉ`` for ``α = 1``, where ``A = I``).

    Attributes:
        alpha: the scale α.
        chol: ``(g, d, d)`` lower Cholesky factor ``L`` of ``B = A · shift`` (:func:`shifted_cholesky`),
            or its inverse ``L⁻¹`` where ``inverse``.
        shift: ``(g,)`` ``tr C / |α−1|`` (1 where ``A = I``): ``W A⁻¹ = shift · W B⁻¹``.
        trace: ``(g,)`` ``tr C``.
        cov: ``(g, d, d)`` ``C``, kept only where ``|α − 1| <`` :data:`DIFFERENCE_MIN_GAP`.
    """

    alpha: float
    chol: torch.Tensor
    shift: torch.Tensor
    trace: torch.Tensor
    cov: torch.Tensor | None = None
    inverse: bool = False

    @classmethod
    def of(cls, cov: torch.Tensor, alpha: float, overwrite: bool = False) -> "ScaledFactor":
        """Factor ``A`` for ``cov`` of shape ``(g, d, d)`` (in its dtype; ``overwrite``: in its memory)."""
        return cls.batch(cov, [alpha], [cov.shape[0]], overwrite=overwrite)[0]

    @classmethod
    def batch(cls, cov: torch.Tensor, alphas: Sequence[float], groups: Sequence[int],
              inverse: bool = False, overwrite: bool = False) -> list["ScaledFactor"]:
        """One factor per ``alphas[i]``, for consecutive runs of ``groups[i]`` groups of ``cov``,
        all factored by one batched call (``inverse``: as ``L⁻¹``, :func:`inverse_cholesky`;
        ``overwrite``: in ``cov``'s memory, unless a factor keeps ``C`` itself)."""
        alpha = torch.tensor([a for a, g in zip(alphas, groups) for _ in range(g)], dtype=cov.dtype, device=cov.device)
        overwrite = overwrite and all(abs(a - 1.0) >= DIFFERENCE_MIN_GAP for a in alphas)
        chol, shift, trace = shifted_cholesky(cov, alpha, inverse, overwrite)
        parts = zip(alphas, chol.split(groups), shift.split(groups), trace.split(groups), cov.split(groups))
        return [cls(a, ch, sh, tr, c if abs(a - 1.0) < DIFFERENCE_MIN_GAP else None, inverse)
                for a, ch, sh, tr, c in parts]

    def solve(self, y: torch.Tensor) -> torch.Tensor:
        """``y A⁻¹`` for ``y`` ``(g, o, d)``."""
        return right_solve(self.chol, y, self.inverse).mul_(self.shift[:, None, None])

    def right_multiply(self, w: torch.Tensor) -> torch.Tensor:
        """``W M`` for ``w`` of shape ``(g, o, d)``, as ``(g, o, d)``."""
        if self.cov is None:
            return self.solve(w).neg_().add_(w).mul_(self.alpha / (self.alpha - 1.0))
        safe = torch.where(self.trace > 0, self.trace, torch.ones_like(self.trace))
        w_c_hat = (w @ self.cov) / safe[:, None, None]
        return w_c_hat if self.alpha == 1.0 else self.solve(w_c_hat).mul_(self.alpha)


@dataclass
class SampleSpaceFactor:
    """``M(C, α)`` for ``C = Rᵀ R`` from the ``n < d`` vectors ``R`` themselves.

    Push-through: ``Ĉ A⁻¹ = Rᵀ R / t ((α−1) Rᵀ R / t + I)⁻¹ = Rᵀ ((α−1) G / t + I)⁻¹ R / t`` with
    the Gram matrix ``G = R Rᵀ`` (``n × n``) and ``t = tr G = tr C``. ``(α−1) G / t + I`` has
    its eigenvalues in ``[1, α]``, as ``A`` has; it is factored scaled, as ``A`` is
    (:func:`shifted_cholesky` of ``G``).

    Attributes:
        rows: ``(g, n, d)`` the vectors.
        scale: ``(g,)`` ``α · shift / t`` per group (0 where the vectors are all zero).
        chol: ``(g, n, n)`` lower Cholesky factor of ``±G + shift·I``.
    """

    rows: torch.Tensor
    scale: torch.Tensor
    chol: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, alpha: float, gram: torch.Tensor | None = None) -> "SampleSpaceFactor":
        """``gram``: ``R Rᵀ`` where already made (read only), else made here."""
        made = gram is None
        if made:
            gram = rows @ rows.transpose(-1, -2)  # (g, n, n); only its lower triangle is read
        chol, shift, t = shifted_cholesky(gram, gram.new_full(gram.shape[:1], alpha), overwrite=made)
        scale = torch.where(t > 0, alpha * shift / torch.where(t > 0, t, torch.ones_like(t)), torch.zeros_like(t))
        return cls(rows, scale, chol)

    def projected(self, w: torch.Tensor) -> torch.Tensor:
        """``W Rᵀ`` ``(g, o, n)``: what :meth:`right_multiply` starts from, the same at every α."""
        return w @ self.rows.transpose(-1, -2)

    def right_multiply(self, w: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """``W M`` for ``w`` of shape ``(g, o, d)``, as ``(g, o, d)`` (``projected``: :meth:`projected`
        of ``w``, where already made; read only)."""
        z = right_solve(self.chol, self.projected(w) if projected is None else projected)  # (g, o, n)
        return z.mul_(self.scale[:, None, None]) @ self.rows


def sample_basis(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``B = Rᵀ V / √t`` ``(g, d, n)`` from kept vectors ``R`` ``(g, n, d)`` and the eigenvectors ``V``
    ``(g, n, n)`` of their normalised Gram matrix ``R Rᵀ / t`` (``t = tr C = ‖R‖²_F``; eigenvalues
    ``r``, those of ``Ĉ = C / t``). Column ``i`` is ``√r_i u_i`` for ``Ĉ``'s eigenvector ``u_i``, so
    ``M(C, α) = B diag(α / ((α−1) r + 1)) Bᵀ`` (:func:`~deepunlearn.projection.scale_weighted`): no
    division by a small eigenvalue, and the rounding of the Gram route is that of the Cholesky way,
    about ``α·ε`` (docs/solver.md). A zero group gives ``B = 0``."""
    t = rows.square().sum((-1, -2))
    scale = torch.where(t > 0, t, torch.ones_like(t)).rsqrt()
    return (rows.transpose(-1, -2) @ vectors) * scale[:, None, None]


def sketched_eigenpairs(cov: torch.Tensor, rank_bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors ``(g, d, k)`` and normalised energies ``r = e / tr C`` ``(g, k)`` of ``cov``
    (``(g, d, d)``, rank <= ``rank_bound``), from a sketch of ``k = rank_bound + OVERSAMPLE`` columns.

    ``Q``, an orthonormal basis of ``C Ω`` for a random ``Ω`` (d × k), spans C's range; the k × k
    matrix ``Qᵀ C Q = V diag(e) Vᵀ`` then gives ``C = (Q V) diag(e) (Q V)ᵀ`` up to rounding:
    4·d²·k flops. Both steps are backward stable, so the error is ε‖C‖ as for the other ways (a
    one-pass Nyström sketch saves one product but solves with ``Ωᵀ C Ω``, whose condition is C's:
    10⁻³ relative error in float32 on spread spectra).
    """
    c_hat = symmetric_normalised(cov)  # its eigenvalues are the energies r (a zero C stays zero)
    g, d, _ = c_hat.shape
    k = min(d, rank_bound + OVERSAMPLE)
    gen = torch.Generator(device=cov.device).manual_seed(SKETCH_SEED)
    omega = torch.randn(g, d, k, generator=gen, device=cov.device, dtype=cov.dtype)
    q = torch.linalg.qr(c_hat @ omega)[0]  # (g, d, k)
    b = q.transpose(-1, -2) @ (c_hat @ q)
    e, v = normalised_eigh(0.5 * (b + b.transpose(-1, -2)))  # b's eigenvalues are energies too
    return q @ v, e.clamp(0.0, 1.0)


@dataclass
class LowRankSpectrum:
    """``M(C, α) = U diag(λ) Uᵀ`` from the eigenpairs of a second moment of rank at most ``k``.

    Attributes:
        vectors: ``(g, d, k)`` orthonormal eigenvectors (columns).
        scaled: ``(g, k)`` scaled energies ``λ(α)``.
    """

    vectors: torch.Tensor
    scaled: torch.Tensor

    @classmethod
    def of(cls, cov: torch.Tensor, alpha: float, rank_bound: int) -> "LowRankSpectrum":
        """By :func:`sketched_eigenpairs` of ``cov`` (``(g, d, d)``, rank <= ``rank_bound``)."""
        return cls.scaled(*sketched_eigenpairs(cov, rank_bound), alpha)

    @classmethod
    def scaled(cls, vectors: torch.Tensor, energies: torch.Tensor, alpha: float) -> "LowRankSpectrum":
        """From eigenpairs already made (:func:`sketched_eigenpairs`), at scale ``alpha``."""
        return cls(vectors, scale_energies(energies, alpha))

    def projected(self, w: torch.Tensor) -> torch.Tensor:
        """``W U`` ``(g, o, k)``: what :meth:`right_multiply` starts from, the same at every α."""
        return w @ self.vectors

    def right_multiply(self, w: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """``W M`` for ``w`` of shape ``(g, o, d)`` (``projected``: :meth:`projected` of ``w``, where
        already made)."""
        return ((self.projected(w) if projected is None else projected) * self.scaled[:, None, :]) @ self.vectors.mT


@dataclass
class FormedProjection:
    """``M`` itself, ``(g, d, d)``."""

    m: torch.Tensor

    def right_multiply(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.m


SideSolver = ScaledFactor | LowRankSpectrum | FormedProjection | SampleSpaceFactor
SIDES = ("auto", "cholesky", "low-rank", "formed", "sample-space")


def side_flops(d: int, rows: int, vectors: int, kept: bool = False) -> dict[str, float]:
    """Flops of each way to apply one side to ``rows`` weight rows reading an input of width ``d``
    that saw ``vectors`` input vectors (``low-rank`` only while they are fewer than ``d``).
    ``kept``: the statistics hold the vectors themselves, so ``sample-space`` is possible and the
    ways through ``d × d`` first pay for forming ``C``."""
    form = 2 * vectors * d**2 if kept else 0
    out = {"formed": form + 7 / 3 * d**3 + 2 * rows * d**2, "cholesky": form + d**3 / 3 + 2 * rows * d**2}
    k = vectors + OVERSAMPLE
    if k < d:
        out["low-rank"] = form + 4 * d**2 * k + 6 * d * k**2 + 10 * k**3 + 4 * rows * d * k
    if kept:
        out["sample-space"] = 2 * d * vectors**2 + vectors**3 / 3 + 4 * rows * d * vectors
    return out


def vectors_pay(d: int, vectors: int, rows: int) -> bool:
    """Whether ``rows`` weight rows reading an input of width ``d`` that saw ``vectors < d``
    vectors are applied with fewer flops from the vectors (the sample space) than from their
    ``d × d`` sum by a Cholesky factor, the sum's own cost left out (the compiled conv kernels
    stream it for far less than the GEMM that would form it from the vectors)."""
    return side_flops(d, rows, vectors, kept=True)["sample-space"] < side_flops(d, rows, vectors)["cholesky"]


def side_way(moment: Moment, rows: int, vectors: int, way: str = "auto", solver: str = "cholesky") -> str:
    """The way :func:`side_solver` applies ``M(C, α)`` to ``rows`` weight rows: ``way`` where forced,
    else the cheapest by :func:`side_flops`; ``"formed"`` for the eigen and SVD solvers."""
    if way not in SIDES:
        raise ValueError(f"way must be one of {SIDES}, got {way!r}")
    kept = isinstance(moment, SampleRows)
    if way == "sample-space" and not kept:
        raise ValueError("way='sample-space' needs statistics kept as vectors (collect_statistics(keep_vectors=True) "
                         "on fewer vectors than the layer's width)")
    if solver != "cholesky":
        return "formed"
    if way == "auto":
        flops = side_flops(moment.shape[-1], rows, vectors, kept)
        way = min(flops, key=flops.get)
    return way


def side_solver(moment: Moment, alpha: float, rows: int, vectors: int, way: str = "auto",
                solver: str = "cholesky", overwrite: bool = False) -> SideSolver:
    """What applies ``M(C, α)`` to ``rows`` weight rows, for ``C`` dense ``(g, d, d)`` or kept as
    its vectors, the way :func:`side_way` chooses (``way`` forces one: ``"sample-space"`` only where
    the vectors were kept); the eigen and SVD solvers always form ``M``. ``overwrite``: a dense
    ``C`` may be factored in its own memory (the caller is done with it)."""
    way = side_way(moment, rows, vectors, way, solver)
    if way == "formed":
        return FormedProjection(scaled_projection(dense(moment), alpha, solver))
    if way == "sample-space":
        return SampleSpaceFactor.of(moment.rows, alpha)
    cov = dense(moment)
    if way == "low-rank":
        return LowRankSpectrum.of(cov, alpha, vectors)
    return ScaledFactor.of(cov, alpha, overwrite or cov is not moment)


def batched_factors(moments: Sequence[Moment], alphas: Sequence[float], inverse: bool = False) -> list[ScaledFactor]:
    """``ScaledFactor.of(dense(C), α)`` for each pair, all of one width, by one batched
    factorisation: on a GPU the batch's matrices are factored side by side rather than one after
    another, each launch too small to fill the device alone. ``inverse``: each factor as ``L⁻¹``
    (:func:`inverse_cholesky`), so that applying it is GEMMs rather than triangular solves."""
    covs = [dense(m) for m in moments]
    return ScaledFactor.batch(torch.cat(covs), alphas, [c.shape[0] for c in covs], inverse, overwrite=True)


def factors_by_width(members: Sequence[Hashable], moment_of: Callable[[Hashable], Moment],
                     alpha_of: Callable[[Hashable], float], inverse: bool, limit: int
                     ) -> Iterator[list[tuple[Hashable, ScaledFactor]]]:
    """:func:`batched_factors` of ``members`` (keys; ``moment_of`` and ``alpha_of`` give each one's
    second moment and scale), same widths and dtypes together, in batches of at most ``limit`` bytes
    of second moments (a member alone where it is larger). Yields each batch's ``(key, factor)``
    pairs as it is made, so that the caller can drop the batch's moments before the next; moments
    are looked up, never held, between batches."""
    by_width: dict[tuple[int, torch.dtype], list[Hashable]] = {}
    for key in members:
        moment = moment_of(key)
        by_width.setdefault((moment.shape[-1], moment.dtype), []).append(key)
    for (d, dtype), keys in by_width.items():
        per_group = d * d * dtype.itemsize
        batch: list[Hashable] = []
        size = 0
        for key in [*keys, None]:
            grown = 0 if key is None else size + moment_of(key).shape[0] * per_group
            if batch and (key is None or grown > limit):
                factors = batched_factors([moment_of(k) for k in batch], [alpha_of(k) for k in batch], inverse)
                yield list(zip(batch, factors))
                batch, grown = [], grown - size
            if key is not None:
                batch.append(key)
                size = grown


def edited_weight_sides(w: torch.Tensor, retain: SideSolver | None, forget: SideSolver) -> torch.Tensor:
    """``W − V M_f`` with ``V = W − W M_r`` (``retain`` None: ``M_r = 0``); ``w``: ``(g, o, d)``.
    Both sides formed: the extension's fused edit."""
    if isinstance(forget, FormedProjection) and isinstance(retain, FormedProjection):
        return edited_weight(w, retain.m, forget.m)
    # in place on each product (a new tensor): two o × d temporaries at most, not four
    v = w if retain is None else retain.right_multiply(w).neg_().add_(w)
    return forget.right_multiply(v).neg_().add_(w)
