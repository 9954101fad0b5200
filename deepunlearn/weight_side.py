"""The edit ``W ← W − (W − W M_r) M_f`` solved on the weight's side, without forming ``M``.

``M(C, α) = α Ĉ A⁻¹`` with ``A = (α−1)Ĉ + I`` (``Ĉ = C / tr C``), and ``Ĉ`` commutes with ``A``,
so for a weight ``W`` of ``o`` rows

    W M = α (W Ĉ) A⁻¹

is one Cholesky factorisation of ``A`` (d³/3 flops), one product ``W Ĉ`` and two triangular
solves with ``o`` right-hand sides (4·o·d²), against about 2.3·d³ + 2·o·d² to form ``M`` and
multiply. The weight side is cheaper while the rows that read one input (all the layers sharing
it, every group) number fewer than its width ``d``: :func:`weight_side_pays`. ``A``'s eigenvalues
lie in ``[1, α]``, so float32 is enough (``cond A ≤ α``; docs/solver.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .projection import normalised


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
        c_hat, _ = normalised(cov)
        c_hat = 0.5 * (c_hat + c_hat.transpose(-1, -2))
        a = (alpha - 1.0) * c_hat
        a.diagonal(dim1=-2, dim2=-1).add_(1.0)  # SPD: eigenvalues in [min(1, α), max(1, α)]
        chol, info = torch.linalg.cholesky_ex(a)
        del a
        if int(info.max()) > 0:
            raise RuntimeError(f"Cholesky factorisation failed for alpha={alpha} (matrix not positive definite)")
        return cls(alpha, c_hat, chol)

    def right_multiply(self, w: torch.Tensor) -> torch.Tensor:
        """``W M`` for ``w`` of shape ``(g, o, d)``: ``α (W Ĉ) A⁻¹``, as ``(g, o, d)``."""
        y = w @ self.c_hat  # (g, o, d); A⁻¹ (W Ĉ)ᵀ by the factor, then transposed back (A symmetric)
        return torch.cholesky_solve(y.transpose(-1, -2), self.chol).transpose(-1, -2).mul_(self.alpha)


def edited_weight_factored(w: torch.Tensor, retain: ScaledFactor | None, forget: ScaledFactor) -> torch.Tensor:
    """``W − V M_f`` with ``V = W − W M_r`` (``retain`` None: ``M_r = 0``); ``w``: ``(g, o, d)``."""
    v = w if retain is None else w - retain.right_multiply(w)
    return w - forget.right_multiply(v)


def weight_side_pays(rows: int, d: int) -> bool:
    """Whether solving on the weight's side costs fewer flops than forming ``M`` for an input of
    width ``d`` read by ``rows`` weight rows in all: d³/3 + 4·rows·d² < 7d³/3 + 2·rows·d²."""
    return rows < d
