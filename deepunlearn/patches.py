"""The input vectors of each layer kind: a linear layer's rows, a convolution's patches.

A convolution's geometry (:class:`ConvGeometry`) is what it does to its input, enough to rebuild
every patch it multiplies exactly (:func:`conv_patches`), padding included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvGeometry:
    """What a convolution does to its input, enough to rebuild its patches exactly."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]  # F.pad order: (last_lo, last_hi, ..., first_lo, first_hi)
    padding_mode: str  # 'zeros' | 'reflect' | 'replicate' | 'circular'
    groups: int

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel)

    @classmethod
    def of(cls, conv: nn.modules.conv._ConvNd) -> "ConvGeometry":
        return cls.of_call(conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)

    @classmethod
    def of_call(cls, weight: torch.Tensor, stride, padding, dilation, groups: int,
                padding_mode: str = "zeros") -> "ConvGeometry":
        """The geometry of ``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)``
        (ints or tuples, padding also ``"valid"``/``"same"``)."""
        k = tuple(weight.shape[2:])

        def per_dim(v) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * len(k)

        dil = per_dim(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                lo_hi = [(0, 0)] * len(k)
            else:  # 'same': torch puts the odd pixel on the high side
                lo_hi = [(d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2) for kk, d in zip(k, dil)]
        else:
            lo_hi = [(p, p) for p in per_dim(padding)]
        pad = tuple(v for pair in reversed(lo_hi) for v in pair)
        return cls(k, per_dim(stride), dil, pad, padding_mode, int(groups))


def pad_input(x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``x`` padded as the conv pads it (any padding mode)."""
    if not any(geom.padding):
        return x
    if geom.padding_mode == "zeros":
        return F.pad(x, geom.padding, mode="constant", value=0.0)
    return F.pad(x, geom.padding, mode=geom.padding_mode)


def conv_patches(x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Every patch the convolution multiplies, as rows: ``(groups, N*prod(out), C/groups*prod(kernel))``.

    ``x`` is ``(N, C, *spatial)`` (an unbatched ``(C, *spatial)`` input is accepted). Padding is
    applied exactly as the conv applies it, so padded positions appear in the patches. Row
    entries are ordered like the flattened weight ``(C/groups, *kernel)``.
    """
    nd = geom.spatial_dims
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    x = pad_input(x, geom)
    for i, (k, s, d) in enumerate(zip(geom.kernel, geom.stride, geom.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends the window as a trailing dim
    x = x[(Ellipsis, *(slice(None, None, d) for d in geom.dilation))]
    n_batch, channels = x.shape[:2]
    perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    rows = x.permute(perm).reshape(-1, geom.groups, channels // geom.groups * math.prod(geom.kernel))
    return rows.transpose(0, 1)


def patch_sums(x: torch.Tensor, geom: ConvGeometry, dtype: torch.dtype) -> torch.Tensor:
    """``(groups, C/groups*prod(kernel))``: the sum of every patch :func:`conv_patches` gives, in
    ``dtype``. Patches (padding included: every mode copies or zero-fills) are linear in the input,
    so the sum over the batch's images is the sum of the patches of their summed image: one image
    is unfolded, not the batch."""
    nd = geom.spatial_dims
    batch = x if x.dim() == nd + 2 else x.unsqueeze(0)
    return conv_patches(batch.sum(0, keepdim=True, dtype=dtype), geom).sum(1)


def linear_rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """Input vectors of a linear map as rows ``(n, d)``: every position of every leading dim."""
    return x.reshape(-1, d)
