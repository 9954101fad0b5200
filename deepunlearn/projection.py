"""Scaled subspace projections ``M(C, α) = U diag(λ(α)) Uᵀ`` with ``λ_i = α r_i / ((α−1) r_i + 1)``.

``r_i = e_i / tr(C)`` are the normalised energies of the second moment ``C``. Three solvers
give the same matrix (docs/algorithm.md, "The scaled spaces"):

* ``"cholesky"``: no decomposition, ``M = α Ĉ ((α−1)Ĉ + I)⁻¹`` with ``Ĉ = C / tr(C)``; cheapest for one α.
* ``"eigh"``: decompose ``C`` once (:class:`Spectrum`), then rescale per α; cheapest for many α.
* ``"svd"``: singular vectors of ``C`` (the paper's decomposition, for reference).

All functions take a batch of groups: ``C`` is ``(g, d, d)``. A group with ``tr(C) = 0`` (it saw
only zeros) yields ``M = 0``: nothing is projected there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ops.eigh import symmetric_eigh

SOLVERS = ("cholesky", "eigh", "svd")
# Most bytes of normalised second moments decomposed in one call by Spectrum.of_many: bounds the
# stack's copy (and the eigenvectors it yields) for wide inputs, while the suite's models' five sides
# of every width (at most 576 wide, 1.3 MiB a matrix) go in one call.
EIGH_STACK_BYTES = 256 << 20
# Given to the diagonal of a normalised second moment's rows and columns of zeros (a dead unit, a conv
# tap that read only padding): exactly decoupled, each is then an eigenvector of its own, away from
# the energies' [0, 1] (its energy clamps to 0). float32 divide and conquer (LAPACK's ssyevd) failed
# to converge on such matrices: regnetx_002's 3×3 group convolutions at 1×1, one 1,152-wide input of
# densenet121 with 256 rows of zeros
ZERO_ROW_EIGENVALUE = -1.0


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float, or raise ``ValueError`` unless it is finite and positive."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {alpha!r}") from None
    if not math.isfinite(a) or a <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {alpha!r}")
    return a


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def normalised(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ĉ, tr)``: ``C / tr(C)`` per group (zero where the trace is zero) and the traces ``(g,)``."""
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    safe = torch.where(tr > 0, tr, torch.ones_like(tr))
    c_hat = torch.where((tr > 0)[:, None, None], cov / safe[:, None, None], torch.zeros_like(cov))
    return c_hat, tr


def symmetric_normalised(cov: torch.Tensor) -> torch.Tensor:
    """``Ĉ = C / tr(C)`` per group, made exactly symmetric (for the symmetric solvers)."""
    c_hat, _ = normalised(cov)
    return 0.5 * (c_hat + c_hat.transpose(-1, -2))


def normalised_eigh(c_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(b, d)`` and eigenvectors ``(b, d, d)`` of the symmetric normalised second
    moments ``c_hat`` ``(b, d, d)`` (:func:`symmetric_normalised`; overwritten), as
    :func:`~deepunlearn.ops.eigh.symmetric_eigh` gives them, but for rows of zeros: those get
    :data:`ZERO_ROW_EIGENVALUE`. Solved again in float64 where float32 does not converge."""
    zero_rows = (c_hat == 0).all(-1)
    c_hat.diagonal(dim1=-2, dim2=-1).masked_fill_(zero_rows, ZERO_ROW_EIGENVALUE)
    try:
        return symmetric_eigh(c_hat)
    except torch.linalg.LinAlgError:
        if c_hat.dtype == torch.float64:
            raise
        values, vectors = symmetric_eigh(c_hat.double())
        return values.to(c_hat.dtype), vectors.to(c_hat.dtype)


def scaled_cholesky(cov: torch.Tensor, alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ĉ, L)``: the symmetric normalised second moment and the lower Cholesky factor of
    ``A = (α−1)Ĉ + I`` per group (SPD: eigenvalues in [min(1, α), max(1, α)]). ``alpha``: one
    scale, or ``(g,)`` scales, one per group."""
    c_hat = symmetric_normalised(cov)
    eye = torch.eye(c_hat.shape[-1], dtype=c_hat.dtype, device=c_hat.device)
    scale = (alpha - 1.0)[:, None, None] if isinstance(alpha, torch.Tensor) else alpha - 1.0
    chol, info = torch.linalg.cholesky_ex(scale * c_hat + eye)
    if int(info.max()) > 0:
        bad = sorted(set(alpha[info > 0].tolist())) if isinstance(alpha, torch.Tensor) else alpha
        raise RuntimeError(f"Cholesky factorisation failed for alpha={bad} (matrix not positive definite)")
    return c_hat, chol


def scale_energies(r: torch.Tensor, alpha: float) -> torch.Tensor:
    """``λ(α) = α r / ((α−1) r + 1)`` elementwise (``r`` in [0, 1])."""
    return alpha * r / ((alpha - 1.0) * r + 1.0)


def scale_weighted(r: torch.Tensor, alpha: float, weighted: torch.Tensor | bool = True) -> torch.Tensor:
    """``λ(α) / r = α / ((α−1) r + 1)`` where ``weighted`` (a basis whose columns are ``√r_i u_i``,
    :func:`~deepunlearn.weight_side.sample_basis`), else ``λ(α)``; elementwise, ``r`` in [0, 1]."""
    numerator = alpha * torch.where(torch.as_tensor(weighted, device=r.device), torch.ones_like(r), r)
    return numerator / ((alpha - 1.0) * r + 1.0)


@dataclass
class Spectrum:
    """Eigen-decomposition of a batch of second moments, reusable for any α.

    Attributes:
        vectors: ``(g, d, d)`` orthonormal eigenvectors (columns).
        energies: ``(g, d)`` normalised energies ``r_i = e_i / tr(C)``, clamped to [0, 1].
    """

    vectors: torch.Tensor
    energies: torch.Tensor

    @classmethod
    def of(cls, cov: torch.Tensor, method: str = "eigh") -> "Spectrum":
        if method != "svd":
            return cls.of_many([cov])[0]
        u, s, _ = torch.linalg.svd(symmetric_normalised(cov))
        return cls(u, s.clamp(0.0, 1.0))

    @classmethod
    def of_many(cls, covs: list[torch.Tensor]) -> list["Spectrum"]:
        """One :class:`Spectrum` per second moment ``(g, d, d)`` of ``covs``, those of one width, dtype
        and device decomposed together (:func:`~deepunlearn.ops.eigh.symmetric_eigh`: on a GPU one
        batched call instead of one per matrix), at most :data:`EIGH_STACK_BYTES` a call."""
        out: list[Spectrum | None] = [None] * len(covs)
        kinds: dict[tuple, list[int]] = {}
        for i, c in enumerate(covs):
            kinds.setdefault((c.shape[-1], c.dtype, c.device), []).append(i)
        for (d, dtype, _), members in kinds.items():
            per_matrix = d * d * torch.empty((), dtype=dtype).element_size()
            start = 0
            while start < len(members):
                taken, matrices = [], 0
                for i in members[start:]:  # at least one moment a call, however large
                    if taken and (matrices + covs[i].shape[0]) * per_matrix > EIGH_STACK_BYTES:
                        break
                    taken.append(i)
                    matrices += covs[i].shape[0]
                start += len(taken)
                stack = torch.cat([symmetric_normalised(covs[i]) for i in taken])
                energies, vectors = normalised_eigh(stack)
                groups = [covs[i].shape[0] for i in taken]
                for i, e, u in zip(taken, energies.clamp(0.0, 1.0).split(groups), vectors.split(groups)):
                    out[i] = cls(u, e)
        return out

    def projection(self, alpha: float) -> torch.Tensor:
        """``M(C, α)`` as ``(g, d, d)``."""
        lam = scale_energies(self.energies, alpha)
        return (self.vectors * lam[:, None, :]) @ self.vectors.transpose(-1, -2)


def projection_cholesky(cov: torch.Tensor, alpha: float) -> torch.Tensor:
    """``M = α ((α−1)Ĉ + I)⁻¹ Ĉ`` by one Cholesky factorisation and a triangular solve per group."""
    c_hat, chol = scaled_cholesky(cov, alpha)
    m = alpha * torch.cholesky_solve(c_hat, chol)
    return 0.5 * (m + m.transpose(-1, -2))  # Ĉ and A commute, so M is symmetric; remove rounding


def scaled_projection(cov: torch.Tensor, alpha: float, solver: str = "cholesky") -> torch.Tensor:
    """``M(C, α)`` for a batch ``cov`` of shape ``(g, d, d)`` by the named solver; returns ``(g, d, d)``."""
    check_solver(solver)
    alpha = check_alpha(alpha)
    if solver == "cholesky":
        return projection_cholesky(cov, alpha)
    return Spectrum.of(cov, solver).projection(alpha)
