"""The streaming second-moment update ``C += Σ x xᵀ`` of a layer's input vectors: the seam for
the compiled kernels.

:func:`accumulate_linear_` and :func:`accumulate_conv_` dispatch to the extension's ops when it is
loaded, and otherwise run the pure-PyTorch twins defined here, which also serve as the tests' oracle.

Shapes: a covariance buffer is ``(groups, d, d)``; ``d`` is the length of one input vector of one
group. Linear layers have ``groups == 1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..patches import ConvGeometry, conv_patches, pad_input
from .loader import has_op, library

# Upper bound on the elements of one unfolded patch chunk in the pure conv path (~128 MiB in float64).
_PATCH_CHUNK_ELEMENTS = 1 << 24


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
    if has_op("linear_cov_accumulate_", rows.device):
        library().linear_cov_accumulate_(cov[0], _narrowed(rows, cov))
        return cov
    return accumulate_linear_reference_(cov, rows)


def accumulate_conv_(cov: torch.Tensor, x: torch.Tensor, geom: ConvGeometry, form: str = "auto",
                     chunk_elements: int = 0) -> torch.Tensor:
    """``cov += Σ patch patchᵀ`` per group; the compiled op when available (conv1d/2d, and conv3d
    through it), else the pure twin. ``form`` and ``chunk_elements`` are the op's (its form forced,
    the entries of its chunks; ignored by the pure twin): every form gives the same statistics."""
    if not has_op("conv_cov_accumulate_", x.device):
        return accumulate_conv_reference_(cov, x, geom)
    if x.dim() == geom.spatial_dims + 1:
        x = x.unsqueeze(0)
    if geom.spatial_dims == 3:
        return _accumulate_conv3d_(cov, x, geom, form, chunk_elements)
    if geom.padding_mode == "zeros":  # the op pads with zeros itself, (low, high) per dim in natural order
        pad = [v for i in reversed(range(geom.spatial_dims)) for v in geom.padding[2 * i : 2 * i + 2]]
    else:  # reflect / replicate / circular: pad here (a copy of the input, not of the patches)
        x, pad = pad_input(x, geom), [0] * (2 * geom.spatial_dims)
    library().conv_cov_accumulate_(cov, _narrowed(x, cov), list(geom.kernel), list(geom.stride), pad, list(geom.dilation),
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
    ops = library()
    for n0, n1, z0, z1 in chunks:
        window = x[n0:n1, :, z0 * sd : (z1 - 1) * sd + span]
        slabs = window.unfold(2, span, sd)[..., ::dd]  # (n, C, z, H, W, kd)
        slabs = slabs.permute(0, 2, 1, 5, 3, 4).reshape((n1 - n0) * (z1 - z0), channels * kd, height, width)
        ops.conv_cov_accumulate_(cov, slabs, [kh, kw], [sh, sw], pad, [dh, dw], form, chunk_elements)
    return cov
