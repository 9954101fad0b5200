"""The edit ``W ← W − (W − W M_r) M_f`` solved on the weight's side, without forming ``M``.

``M(C, α) = α Ĉ A⁻¹`` with ``A = (α−1)Ĉ + I`` (``Ĉ = C / tr C``). Each side of the edit needs only
``W ↦ W M``, and three ways give it (docs/solver.md):

* :class:`ScaledFactor`: ``W M = α (W Ĉ) A⁻¹`` by one Cholesky factorisation of ``A`` (d³/3 flops)
  and two triangular solves with ``o`` right-hand sides (4·o·d² with ``W Ĉ``);
* :class:`LowRankSpectrum`: when the layer saw ``n < d`` input vectors, ``C`` has rank at most
  ``n``; a sketch ``C Ω`` with ``k = n + OVERSAMPLE`` columns recovers its eigenpairs exactly (up
  to rounding) in about 4·d²·k flops, and ``W M = (W U) diag(λ) Uᵀ``;
* :class:`FormedProjection`: ``M`` itself (about 7d³/3 flops), cheapest when many rows read the input.

:func:`side_solver` picks the cheapest by its flop count. ``A``'s eigenvalues lie in ``[1, α]``,
so float32 is enough (``cond A ≤ α``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .projection import scale_energies, scaled_cholesky, scaled_projection, symmetric_normalised

OVERSAMPLE = 8  # sketch columns beyond the rank bound: a margin for rounding, as randomized methods use
SKETCH_SEED = 0  # a fixed sketch, so that the same statistics always give the same edit


@dataclass
class ScaledFactor:
    """What right-multiplying by ``M(C, α)`` needs, for a batch of groups.

    Attributes:
        alpha: the scale α.
        c_hat: ``(g, d, d)`` normalised second moment ``C / tr C`` (zero where the trace is zero).
        chol: ``(g, d, d)`` lower Cholesky factor of ``A = (α−1)Ĉ + I``.
    """

    alpha: float
    c_hat: torch.Tensor
    chol: torch.Tensor

    @classmethod
    def of(cls, cov: torch.Tensor, alpha: float) -> "ScaledFactor":
        """Factor ``(α−1)Ĉ + I`` for ``cov`` of shape ``(g, d, d)`` (in its dtype)."""
        return cls(alpha, *scaled_cholesky(cov, alpha))

    def right_multiply(self, w: torch.Tensor) -> torch.Tensor:
        """``W M`` for ``w`` of shape ``(g, o, d)``: ``α (W Ĉ) A⁻¹``, as ``(g, o, d)``."""
        y = w @ self.c_hat  # (g, o, d); A⁻¹ (W Ĉ)ᵀ by the factor, then transposed back (A symmetric)
        return torch.cholesky_solve(y.transpose(-1, -2), self.chol).transpose(-1, -2).mul_(self.alpha)


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
    e, v = torch.linalg.eigh(0.5 * (b + b.transpose(-1, -2)))
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
        vectors, energies = sketched_eigenpairs(cov, rank_bound)
        return cls(vectors, scale_energies(energies, alpha))

    def right_multiply(self, w: torch.Tensor) -> torch.Tensor:
        """``W M`` for ``w`` of shape ``(g, o, d)``."""
        return ((w @ self.vectors) * self.scaled[:, None, :]) @ self.vectors.transpose(-1, -2)


@dataclass
class FormedProjection:
    """``M`` itself, ``(g, d, d)``."""

    m: torch.Tensor

    def right_multiply(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.m


SideSolver = ScaledFactor | LowRankSpectrum | FormedProjection
SIDES = ("auto", "cholesky", "low-rank", "formed")


def side_flops(d: int, rows: int, vectors: int) -> dict[str, float]:
    """Flops of each way to apply one side to ``rows`` weight rows reading an input of width ``d``
    that saw ``vectors`` input vectors (``low-rank`` only while they are fewer than ``d``)."""
    out = {"formed": 7 / 3 * d**3 + 2 * rows * d**2, "cholesky": d**3 / 3 + 4 * rows * d**2}
    k = vectors + OVERSAMPLE
    if k < d:
        out["low-rank"] = 4 * d**2 * k + 6 * d * k**2 + 10 * k**3 + 4 * rows * d * k
    return out


def side_solver(cov: torch.Tensor, alpha: float, rows: int, vectors: int, way: str = "auto",
                solver: str = "cholesky") -> SideSolver:
    """What applies ``M(cov, α)`` to ``rows`` weight rows: the cheapest way by :func:`side_flops`
    (``way`` forces one; the eigen and SVD solvers always form ``M``)."""
    if way not in SIDES:
        raise ValueError(f"way must be one of {SIDES}, got {way!r}")
    if solver != "cholesky":
        return FormedProjection(scaled_projection(cov, alpha, solver))
    if way == "auto":
        flops = side_flops(cov.shape[-1], rows, vectors)
        way = min(flops, key=flops.get)
    if way == "low-rank":
        return LowRankSpectrum.of(cov, alpha, vectors)
    if way == "cholesky":
        return ScaledFactor.of(cov, alpha)
    return FormedProjection(scaled_projection(cov, alpha, "cholesky"))


def edited_weight_sides(w: torch.Tensor, retain: SideSolver | None, forget: SideSolver) -> torch.Tensor:
    """``W − V M_f`` with ``V = W − W M_r`` (``retain`` None: ``M_r = 0``); ``w``: ``(g, o, d)``.
    Both sides formed: the extension's fused edit."""
    if isinstance(forget, FormedProjection) and isinstance(retain, FormedProjection):
        from .edit import edited_weight

        return edited_weight(w, retain.m, forget.m)
    v = w if retain is None else w - retain.right_multiply(w)
    return w - forget.right_multiply(v)
