"""The paper's own procedure, kept as the oracle for tests and the "paper" row of benchmarks.

Kodge et al.'s code takes one batch of forget and one of retain samples, stores each layer's
activation matrix ``R`` (input vectors as columns), and takes ``torch.linalg.svd`` of it:
``U`` and ``e_i = s_i²`` give ``M = U diag(λ(α)) Uᵀ``. For convolutions their code can keep a
random ``3k × 3k`` spatial crop of each input and at most 10,000 random patches; both are
optional flags here (off by default, so that the result equals :func:`deepunlearn.unlearn`
on the same batch to rounding).

This path needs the activation matrices in memory and an SVD per layer, which is what the
streamed second moment and the Cholesky solve of the main path avoid.
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict

import torch
from torch import nn

from ._batches import DataLike, iter_batches
from .patches import ConvGeometry, pad_input, conv_patches
from .plan import apply_plan
from .layers import find_targets
from .projection import check_alpha, scale_energies
from .report import UnlearnReport
from .collect import collection_setup, run_with_hooks
from .hooks import Collector
from .statistics import model_device
from .plan import plan_edits, synchronize


class _ActivationRecorder(Collector):
    """Keeps every layer's input vectors as ``(groups, n, d)`` activation matrices."""

    def __init__(self, targets, device, dtype, conv_crop: bool, max_patches: int | None, generator: torch.Generator):
        super().__init__(targets, device, dtype, share_inputs=False)  # the paper keeps one matrix per layer
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.conv_crop, self.max_patches, self.generator = conv_crop, max_patches, generator

    def add_rows(self, name: str, rows: torch.Tensor, slots=None) -> None:
        """Keep the activation rows; ``slots`` is always None here (one kind of statistics)."""
        self.rows[name].append(rows.to(self.dtype)[None])

    def add_conv(self, name: str, x: torch.Tensor, geom: ConvGeometry, d: int) -> None:
        if self.conv_crop:
            x, geom = self._crop(x, geom)
        patches = conv_patches(x.to(self.dtype), geom)  # (g, n, d)
        if self.max_patches is not None and patches.shape[1] > self.max_patches:
            keep = torch.randperm(patches.shape[1], generator=self.generator)[: self.max_patches]
            patches = patches[:, keep.to(patches.device)]
        self.rows[name].append(patches)

    def _crop(self, x: torch.Tensor, geom: ConvGeometry) -> tuple[torch.Tensor, ConvGeometry]:
        """A random window of ``3k`` (dilated kernel extents) per spatial dim of the padded input."""
        x = pad_input(x, geom)
        for i, (k, dil) in enumerate(zip(geom.kernel, geom.dilation)):
            size = x.shape[2 + i]
            win = min(size, 3 * (dil * (k - 1) + 1))
            start = int(torch.randint(0, size - win + 1, (1,), generator=self.generator))
            x = x.narrow(2 + i, start, win)
        return x, ConvGeometry(geom.kernel, geom.stride, geom.dilation, (0,) * len(geom.padding), "zeros", geom.groups)


def _first_batch(data: DataLike, batch_size: int) -> torch.Tensor:
    for x in iter_batches(data, batch_size):
        if x.shape[0]:
            return x
    raise ValueError("the data yielded no non-empty batch")


def activation_matrices(model: nn.Module, batch: torch.Tensor, *, conv_crop: bool = False, max_patches: int | None = None,
                        seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every slot's activation matrix on one batch, as ``(groups, n, d)`` (rows are input vectors)."""
    targets, device, dtype = collection_setup(model, dtype)
    rec = _ActivationRecorder(targets, device, dtype, conv_crop, max_patches, torch.Generator().manual_seed(seed))
    run_with_hooks(model, [batch], rec, batch.shape[0], False, "reference")
    return {k: torch.cat(v, dim=1) for k, v in rec.rows.items()}


def _svd_projections(targets, acts: dict[str, torch.Tensor], alpha: float):
    """Per slot tuple: ``M`` from the SVD of the activation matrix, the per-group traces and vector count."""
    m, info = {}, {}
    for t in targets:
        if t.slots in m:
            continue
        parts = [acts[s] for s in t.slots if s in acts]
        if not parts:
            m[t.slots], info[t.slots] = None, (None, 0)
            continue
        r = torch.cat(parts, dim=1)  # (g, n, d): the paper's R is its transpose
        u, s, _ = torch.linalg.svd(r.transpose(1, 2), full_matrices=False)  # U: (g, d, min(d, n))
        e = s.square()
        tr = e.sum(-1)
        ratio = torch.where(tr[:, None] > 0, e / torch.where(tr > 0, tr, torch.ones_like(tr))[:, None], torch.zeros_like(e))
        lam = scale_energies(ratio, alpha)
        m[t.slots] = (u * lam[:, None, :]) @ u.transpose(-1, -2)
        info[t.slots] = (tr, r.shape[1])
    return m, info


def unlearn_paper(
    model: nn.Module,
    forget: DataLike,
    retain: DataLike,
    *,
    alpha_r: float = 100.0,
    alpha_f: float = 3.0,
    conv_crop: bool = False,
    max_patches: int | None = None,
    batch_size: int = 900,
    seed: int = 0,
    inplace: bool = True,
    dtype: torch.dtype | None = None,
) -> UnlearnReport:
    """The paper's procedure: one batch each, activation matrices kept, SVD per layer, then the same edit.

    Args:
        model, alpha_r, alpha_f, inplace, dtype: as in :func:`deepunlearn.unlearn`.
        forget, retain: data in any form :func:`deepunlearn.unlearn` accepts; only the first batch is used.
        conv_crop: keep a random ``3k × 3k`` spatial window of each conv input (paper's code option).
        max_patches: keep at most this many random patches per conv layer (paper's code: 10,000).
        batch_size: batch size when the data is a tensor or a Dataset (the batch that is used).
        seed: seed of the crop and patch sampling.
    """
    t_start = time.perf_counter()
    alpha_r, alpha_f = check_alpha(alpha_r, "alpha_r"), check_alpha(alpha_f, "alpha_f")
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches must be at least 1, got {max_patches}")
    device = model_device(model)
    if not inplace:
        model = copy.deepcopy(model)
    targets, skipped = find_targets(model)
    xf, xr = _first_batch(forget, batch_size), _first_batch(retain, batch_size)
    kw = dict(conv_crop=conv_crop, max_patches=max_patches, seed=seed, dtype=dtype)
    t0 = time.perf_counter()
    acts_f = activation_matrices(model, xf, **kw)
    synchronize(device)
    t1 = time.perf_counter()
    acts_r = activation_matrices(model, xr, **kw)
    synchronize(device)
    t2 = time.perf_counter()
    m_f, info_f = _svd_projections(targets, acts_f, alpha_f)
    m_r, info_r = _svd_projections(targets, acts_r, alpha_r)
    synchronize(device)
    t3 = time.perf_counter()
    plan, rows = plan_edits(targets, m_f, m_r, info_f, info_r)
    apply_plan(plan)
    synchronize(device)
    t4 = time.perf_counter()
    seconds = {"collect_forget": t1 - t0, "collect_retain": t2 - t1, "decompose": t3 - t2, "edit": t4 - t3, "total": t4 - t_start}
    return UnlearnReport(model, rows, [(s.name, s.reason) for s in skipped], xf.shape[0], xr.shape[0], alpha_r, alpha_f, "paper-svd", seconds)
