"""The two forms of a layer's input second moment ``C = Σ x xᵀ`` (per group).

* dense: the ``(g, d, d)`` sum itself, what streaming accumulates;
* :class:`SampleRows`: the ``(g, n, d)`` input vectors themselves, ``C = Rᵀ R``, kept while a
  layer has seen fewer vectors than its width (``n < d``): heads and classifier layers that see one
  vector per image, VGG's 25,088-wide layer, a forget side of a few images. They take ``n·d``
  memory instead of ``d²``, and the solve works in the ``n``-dimensional sample space
  (:class:`~deepunlearn.weight_side.SampleSpaceFactor`).

Sums of the vector form concatenate while the total stays below the width, and fold into the
dense form once it does not (:func:`moment_sum`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SampleRows:
    """A second moment kept as the vectors that make it: ``C[g] = rows[g]ᵀ rows[g]``.

    Attributes:
        rows: ``(g, n, d)`` input vectors per group, ``n < d``.
    """

    rows: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """The dense form's shape ``(g, d, d)``."""
        g, _, d = self.rows.shape
        return (g, d, d)

    @property
    def vectors(self) -> int:
        return self.rows.shape[1]

    def dense(self) -> torch.Tensor:
        """``(g, d, d)``: ``Rᵀ R`` per group."""
        return self.rows.transpose(-1, -2) @ self.rows

    def gram(self) -> torch.Tensor:
        """``(g, n, n)``: the Gram matrix ``R Rᵀ`` per group, with ``Rᵀ R``'s nonzero eigenvalues."""
        return self.rows @ self.rows.transpose(-1, -2)

    def trace(self) -> torch.Tensor:
        """``(g,)``: ``tr C = ‖R‖²_F`` per group."""
        return self.rows.square().sum((-1, -2))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SampleRows":
        return SampleRows(self.rows.to(device=device, dtype=dtype))


Moment = torch.Tensor | SampleRows  # dense (g, d, d), or the (g, n, d) vectors


def dense(moment: Moment) -> torch.Tensor:
    """The ``(g, d, d)`` form of either."""
    return moment.dense() if isinstance(moment, SampleRows) else moment


def moment_trace(moment: Moment) -> torch.Tensor:
    """``(g,)`` traces of either form."""
    return moment.trace() if isinstance(moment, SampleRows) else moment.diagonal(dim1=-2, dim2=-1).sum(-1)


def fold_rows(cov: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``cov[g] += rows[g]ᵀ rows[g]`` in place (``rows`` cast to ``cov``'s dtype); returns ``cov``."""
    rows = rows.to(cov.dtype)
    return cov.baddbmm_(rows.transpose(-1, -2), rows)


def moment_sum(parts: Sequence[Moment]) -> Moment:
    """The sum of second moments of one shape, in the first part's dtype: the vectors concatenated
    while there are fewer than the width, else dense. The parts are never modified."""
    first = parts[0]
    if len(parts) == 1:
        return first
    dtype, d = first.dtype, first.shape[-1]
    vector_parts = [p.rows for p in parts if isinstance(p, SampleRows)]
    if len(vector_parts) == len(parts) and sum(r.shape[1] for r in vector_parts) < d:
        return SampleRows(torch.cat([r.to(dtype) for r in vector_parts], dim=1))
    out = None
    for p in parts:
        if isinstance(p, SampleRows):
            continue
        out = p.to(dtype, copy=True) if out is None else out.add_(p.to(dtype))
    if out is None:
        out = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for r in vector_parts:
        fold_rows(out, r)
    return out
