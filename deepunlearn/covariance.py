"""Input vectors of each layer kind and the streaming second-moment update ``C += Σ x xᵀ``.

This module is the seam for the compiled kernels: :func:`accumulate_linear_` and
:func:`accumulate_conv_` dispatch to the extension's ops when it is loaded, and otherwise
run the pure-PyTorch twins defined here, which also serve as the tests' oracle.

Shapes: a covariance buffer is ``(groups, d, d)``; ``d`` is the length of one input vector
of one group. Linear layers have ``groups == 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Upper bound on the elements of one unfolded patch chunk in the pure conv path (~128 MiB in float64).
_PATCH_CHUNK_ELEMENTS = 1 << 24


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


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch accumulation (the twins of the extension's ops)
# ---------------------------------------------------------------------------------------------


def accumulate_linear_reference_(cov: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``cov[0] += rowsᵀ rows`` in ``cov``'s dtype. ``cov``: ``(1, d, d)``; ``rows``: ``(n, d)``."""
    rows = rows.to(cov.dtype)
    cov[0].addmm_(rows.T, rows)
    return cov


def accumulate_conv_reference_(cov: torch.Tensor, x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``cov[g] += Σ_patches p pᵀ`` per group, unfolding the batch in bounded chunks.

    ``cov``: ``(groups, d_g, d_g)``; ``x``: ``(N, C, *spatial)``. Peak extra memory is about
    ``_PATCH_CHUNK_ELEMENTS`` elements of ``cov``'s dtype, whatever N is.
    """
    if x.dim() == geom.spatial_dims + 1:
        x = x.unsqueeze(0)
    d = cov.shape[-1]
    out_positions = max(1, math.prod(s // st for s, st in zip(x.shape[2:], geom.stride)))
    per_sample = out_positions * d * geom.groups
    chunk = max(1, _PATCH_CHUNK_ELEMENTS // per_sample)
    for xs in x.split(chunk):
        rows = conv_patches(xs.to(cov.dtype), geom)  # (g, n, d)
        cov.baddbmm_(rows.transpose(1, 2), rows)
    return cov


def _narrowed(x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """float64 inputs to float32 statistics are rounded first, as the pure twins do (the ops refuse
    them, so that no caller loses float64 precision without asking)."""
    return x.to(cov.dtype) if x.dtype == torch.float64 and cov.dtype != torch.float64 else x


def accumulate_linear_(cov: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``cov += rowsᵀ rows``; the compiled op when available, else the pure twin."""
    from . import _ext

    if _ext.has_op("linear_cov_accumulate_", rows.device):
        _ext.ops().linear_cov_accumulate_(cov[0], _narrowed(rows, cov))
        return cov
    return accumulate_linear_reference_(cov, rows)


def accumulate_conv_(cov: torch.Tensor, x: torch.Tensor, geom: ConvGeometry, form: str = "auto",
                     chunk_elements: int = 0) -> torch.Tensor:
    """``cov += Σ patch patchᵀ`` per group; the compiled op when available (conv1d/2d, and conv3d
    through it), else the pure twin. ``form`` and ``chunk_elements`` are the op's (its form forced,
    the entries of its chunks; ignored by the pure twin): every form gives the same statistics."""
    from . import _ext

    if not _ext.has_op("conv_cov_accumulate_", x.device):
        return accumulate_conv_reference_(cov, x, geom)
    if x.dim() == geom.spatial_dims + 1:
        x = x.unsqueeze(0)
    if geom.spatial_dims == 3:
        return _accumulate_conv3d_(cov, x, geom, form, chunk_elements)
    if geom.padding_mode == "zeros":  # the op pads with zeros itself, (low, high) per dim in natural order
        pad = [v for i in reversed(range(geom.spatial_dims)) for v in geom.padding[2 * i : 2 * i + 2]]
    else:  # reflect / replicate / circular: pad here (a copy of the input, not of the patches)
        x, pad = pad_input(x, geom), [0] * (2 * geom.spatial_dims)
    _ext.ops().conv_cov_accumulate_(cov, _narrowed(x, cov), list(geom.kernel), list(geom.stride), pad, list(geom.dilation),
                                    form, chunk_elements)
    return cov


# Upper bound on the elements of one chunk of depth slabs in the conv3d path (64 MiB in float32).
_SLAB_CHUNK_ELEMENTS = 1 << 24


def _accumulate_conv3d_(cov: torch.Tensor, x: torch.Tensor, geom: ConvGeometry, form: str = "auto",
                        chunk_elements: int = 0) -> torch.Tensor:
    """conv3d through the 2-d op: output depth z reads kd input slices, stacked as the channels
    ``(c, tz)`` of one 2-d input per (image, z), whose 2-d patch at ``(y, x)`` is the 3-d patch at
    ``(z, y, x)``, entries in the weight's ``(c, tz, ty, tx)`` order (and each group's channels
    still together). That costs kd copies of the input, in chunks of at most
    ``_SLAB_CHUNK_ELEMENTS``, instead of the kd·kh·kw of the unfolded patches.

    ``x``: ``(N, C, D, H, W)``.
    """
    from . import _ext

    (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = geom.kernel, geom.stride, geom.dilation
    if geom.padding_mode == "zeros":  # depth padded here; the op pads height and width itself
        w_lo, w_hi, h_lo, h_hi, d_lo, d_hi = geom.padding
        x = F.pad(x, (0, 0, 0, 0, d_lo, d_hi)) if d_lo or d_hi else x
        pad = [h_lo, h_hi, w_lo, w_hi]
    else:
        x, pad = pad_input(x, geom), [0, 0, 0, 0]
    x = _narrowed(x, cov)
    n_images, channels, depth, height, width = x.shape
    span = dd * (kd - 1) + 1
    out_depth = (depth - span) // sd + 1
    if out_depth < 1:
        raise ValueError(f"conv3d statistics: a depth kernel of span {span} does not fit the padded depth {depth}")
    per_slab = channels * kd * height * width
    if per_slab * out_depth <= _SLAB_CHUNK_ELEMENTS:  # whole images per chunk
        step = _SLAB_CHUNK_ELEMENTS // (per_slab * out_depth)
        chunks = [(n, min(n_images, n + step), 0, out_depth) for n in range(0, n_images, step)]
    else:  # runs of output depths of one image
        step = max(1, _SLAB_CHUNK_ELEMENTS // per_slab)
        chunks = [(n, n + 1, z, min(out_depth, z + step)) for n in range(n_images) for z in range(0, out_depth, step)]
    ops = _ext.ops()
    for n0, n1, z0, z1 in chunks:
        window = x[n0:n1, :, z0 * sd : (z1 - 1) * sd + span]
        slabs = window.unfold(2, span, sd)[..., ::dd]  # (n, C, z, H, W, kd)
        slabs = slabs.permute(0, 2, 1, 5, 3, 4).reshape((n1 - n0) * (z1 - z0), channels * kd, height, width)
        ops.conv_cov_accumulate_(cov, slabs, [kh, kw], [sh, sw], pad, [dh, dw], form, chunk_elements)
    return cov
