"""The second moment of a convolution's patches, for inputs no larger than its kernel, from the
second moment of the whole input map.

A patch of a conv's input holds input pixels (and padding) only: ``patch_o = S_o x`` for each
output position ``o``, with ``x`` the image's whole map ``(C·H·W,)`` per group and ``S_o`` picking
the pixels its kernel taps land on. So ``Σ patch patchᵀ = Σ_o S_o K S_oᵀ`` with ``K = Σ x xᵀ``
over the images: ``K`` can be summed batch by batch and turned into the patch sum once, at the
end. Where the map is no larger than the kernel (VGG's last layers on 2×2 maps at 32×32, any conv
on a 1×1 map), ``K`` is no wider than a patch, so summing it costs no more multiply-adds than
summing the patches' own products, and it skips what dominates the conv op there: scattering its
per-shift sums into the ``d × d`` sum on every batch (docs/kernels.md). The collector
(:mod:`deepunlearn.hooks`) sums such layers' maps here and adds their patch sums to the statistics
when the collection ends.
"""
from __future__ import annotations

import itertools
import math

import torch

from .patches import ConvGeometry


PAIR_BLOCK_ELEMENTS = 8192  # a pair of taps' (group, channel, channel) block from this size is added in place, one op
# per pair (VGG's 512 channels on 2×2 maps: 21 ms, 16× less than gathering); smaller blocks go through one gather per
# output position (a 7×7 depthwise conv on a 7×7 map: 18 ms against 0.44 s for an add per pair)


def pixels_pay(geom: ConvGeometry, spatial: tuple[int, ...]) -> bool:
    """Whether a conv with ``geom`` on maps of size ``spatial`` sums whole maps: 1-d or 2-d, zero
    padding, and a map of no more pixels than its kernel has taps."""
    return (geom.padding_mode == "zeros" and geom.spatial_dims in (1, 2) and len(spatial) == geom.spatial_dims
            and math.prod(spatial) <= math.prod(geom.kernel))


def accumulate_pixels_(moment: torch.Tensor, x: torch.Tensor, groups: int) -> torch.Tensor:
    """``moment += Σ_images x xᵀ`` per group, ``x`` ``(N, C, *spatial)`` flattened per group to
    ``(C/groups · prod(spatial),)`` (channel-major); ``moment`` ``(groups, m, m)``."""
    maps = x.reshape(x.shape[0], groups, -1).transpose(0, 1).to(moment.dtype)  # (groups, N, m)
    return moment.baddbmm_(maps.transpose(1, 2), maps)


def add_patch_moment_(cov: torch.Tensor, moment: torch.Tensor, geom: ConvGeometry, spatial: tuple[int, ...]) -> torch.Tensor:
    """``cov += Σ_o S_o moment S_oᵀ``: the patches' second moment ``(groups, d, d)`` (entries in
    the weight's ``(channel, *kernel)`` order) from the maps' ``moment`` (:func:`accumulate_pixels_`)
    of a conv with ``geom`` on maps of size ``spatial``."""
    groups, d = cov.shape[0], cov.shape[-1]
    taps, pixels = math.prod(geom.kernel), math.prod(spatial)
    channels = d // taps
    maps = moment.view(groups, channels, pixels, channels, pixels)
    positions = _positions(geom, spatial)
    if groups * channels * channels >= PAIR_BLOCK_ELEMENTS:  # an add per pair of taps inside the map
        patch = cov.view(groups, channels, taps, channels, taps)
        for hits in positions:
            for t1, p1 in hits:
                for t2, p2 in hits:
                    patch[:, :, t1, :, t2] += maps[:, :, p1, :, p2]
        return cov
    # small blocks: per pair of taps (t1 · taps + t2) its (group, channel, channel) block, one gather and one
    # index_add per output position over its taps inside the map
    pairs = moment.new_zeros(taps * taps, groups, channels, channels)
    for hits in positions:
        tap, pixel = torch.tensor(hits, dtype=torch.long, device=moment.device).T
        block = maps.index_select(2, pixel).index_select(4, pixel)  # (groups, c, n, c, n): S_o moment S_oᵀ
        pairs.index_add_(0, (tap[:, None] * taps + tap[None, :]).reshape(-1),
                         block.permute(2, 4, 0, 1, 3).reshape(-1, groups, channels, channels))
    cov.view(groups, channels, taps, channels, taps).add_(pairs.view(taps, taps, groups, channels, channels)
                                                          .permute(2, 3, 0, 4, 1))
    return cov


def _positions(geom: ConvGeometry, spatial: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Per output position with a tap inside the map, the ``(tap, pixel)`` flat indices of its kernel
    taps that land inside it (the others read padding, zeros)."""
    nd = geom.spatial_dims
    low = [geom.padding[2 * (nd - 1 - i)] for i in range(nd)]
    high = [geom.padding[2 * (nd - 1 - i) + 1] for i in range(nd)]
    outs = [(n + lo + hi - dl * (k - 1) - 1) // s + 1
            for n, lo, hi, dl, k, s in zip(spatial, low, high, geom.dilation, geom.kernel, geom.stride)]
    positions = []
    for o in itertools.product(*(range(n) for n in outs)):
        hits = []
        for t in itertools.product(*(range(k) for k in geom.kernel)):
            u = [oi * s + ti * dl - lo for oi, ti, s, dl, lo in zip(o, t, geom.stride, geom.dilation, low)]
            if all(0 <= ui < n for ui, n in zip(u, spatial)):
                hits.append((_flat(t, geom.kernel), _flat(u, spatial)))
        if hits:
            positions.append(hits)
    return positions


def _flat(index, sizes) -> int:
    flat = 0
    for i, n in zip(index, sizes):
        flat = flat * n + i
    return flat
