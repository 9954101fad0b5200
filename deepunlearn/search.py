"""Choose ``(alpha_r, alpha_f)`` on held-out samples: decompose once, rescale per α."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._batches import DataLike, iter_labelled
from .evaluation import class_accuracies
from .layers import eager_module, editable_targets
from .projection import Spectrum, check_alpha
from .collect import eval_no_grad, gather_statistics, output_logits
from .inputs import call_model
from .statistics import Statistics, model_device
from .moments import dense
from .plan import Moments, apply_plan, layer_moments, map_shared, plan_edits, traces

ALPHA_R_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
ALPHA_F_GRID = (0.25, 0.5, 0.9, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclass
class AlphaSearch:
    """Outcome of :func:`search_alphas`.

    Attributes:
        table: one dict per pair: ``alpha_r``, ``alpha_f``, ``retain_acc``, ``forget_acc`` (percent on the
            held-out samples) and ``score = retain_acc * (100 - forget_acc)``, in grid order.
        alpha_r, alpha_f: the best pair (highest score; ties go to the earlier grid entry).
        seconds: wall time of the whole search.
    """

    table: list[dict[str, float]]
    alpha_r: float
    alpha_f: float
    seconds: float

    @property
    def best(self) -> dict[str, float]:
        return max(self.table, key=lambda r: r["score"])


def _cache_labelled(data: DataLike, device: torch.device, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.to(device), y) for x, y in iter_labelled(data, batch_size)]


def spectra(sides: Sequence[Moments]) -> list[dict[tuple[str, ...], Spectrum | None]]:
    """Per side, every slot's :class:`Spectrum` (None where the side never reached it): each
    distinct second moment decomposed once, those of one width on every side in one call
    (:meth:`Spectrum.of_many`)."""
    covs = [{k: cov for k, (cov, _) in moments.items()} for moments in sides]
    distinct = list({id(c): c for side in covs for c in side.values() if c is not None}.values())
    by_id = {id(c): s for c, s in zip(distinct, Spectrum.of_many([dense(c) for c in distinct]))}
    return [{k: None if c is None else by_id[id(c)] for k, c in side.items()} for side in covs]


@torch.inference_mode(False)  # called under inference mode: statistics need version counters, edits normal tensors
def search_alphas(
    model: nn.Module,
    forget: DataLike | Statistics,
    retain: DataLike | Statistics,
    validation: DataLike,
    forget_classes: Sequence[int],
    *,
    alpha_r_grid: Sequence[float] = ALPHA_R_GRID,
    alpha_f_grid: Sequence[float] = ALPHA_F_GRID,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    progress: bool = False,
) -> AlphaSearch:
    """Grid-search the two scales and return every pair's held-out score; the model is left unchanged.

    Each layer's second moments are eigen-decomposed once; each α only rescales the energies.
    Every pair is applied to the model, scored on ``validation`` by
    ``retain_acc · (100 − forget_acc)``, and the original weights are restored.

    Args:
        model: the trained classifier.
        forget, retain: the data (or :class:`Statistics`) the edit is computed from, as in
            :func:`deepunlearn.unlearn`.
        validation: labelled held-out samples of all classes, ``(x, y)`` batches or a Dataset.
            Use samples outside both ``forget``/``retain`` and the test split.
        forget_classes: the class indices being forgotten (to split ``validation``).
        alpha_r_grid, alpha_f_grid: candidate scales (the paper's grids by default, docs/algorithm.md "The scales").
        batch_size, dtype, autocast, progress: as in :func:`deepunlearn.unlearn` (validation runs in
            full precision). Under ``torch.distributed`` the statistics are summed over the ranks;
            give every rank the same ``validation`` data.
    """
    t0 = time.perf_counter()
    grid_r = [check_alpha(a, "alpha_r") for a in alpha_r_grid]
    grid_f = [check_alpha(a, "alpha_f") for a in alpha_f_grid]
    if not grid_r or not grid_f:
        raise ValueError("alpha grids must not be empty")
    model = eager_module(model)
    targets, _ = editable_targets(model)
    device = model_device(model)
    kw = dict(batch_size=batch_size, dtype=dtype, autocast=autocast, progress=progress)
    moments_f = layer_moments(targets, gather_statistics(model, forget, "forget", **kw), device)
    moments_r = layer_moments(targets, gather_statistics(model, retain, "retain", **kw), device)
    spectra_f, spectra_r = spectra([moments_f, moments_r])
    traces_f, traces_r = traces(moments_f), traces(moments_r)
    val = _cache_labelled(validation, device, batch_size)
    if not val:
        raise ValueError("the validation data is empty")
    y_all = torch.cat([y for _, y in val]).long()
    is_f = torch.isin(y_all, torch.as_tensor(list(forget_classes)))
    if not is_f.any() or is_f.all():
        raise ValueError("the validation data must hold samples of both the forget and the retain classes")

    originals = [t.weight().detach().clone() for t in targets]
    table: list[dict[str, float]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(grid_r) * len(grid_f), desc="alpha search", disable=not progress, leave=False)
    try:
        for a_r in grid_r:
            m_r = map_shared(spectra_r, lambda s: s.projection(a_r))
            for a_f in grid_f:
                m_f = map_shared(spectra_f, lambda s: s.projection(a_f))
                plan, _ = plan_edits(targets, m_f, m_r, traces_f, traces_r)
                apply_plan(plan)
                with eval_no_grad(model):
                    probs = torch.cat([output_logits(call_model(model, x)).float().cpu() for x, _ in val])
                r_acc, f_acc = class_accuracies(probs, y_all, forget_classes)
                table.append({"alpha_r": a_r, "alpha_f": a_f, "retain_acc": r_acc, "forget_acc": f_acc, "score": r_acc * (100.0 - f_acc)})
                with torch.no_grad():
                    for t, w in zip(targets, originals):
                        t.weight().copy_(w)
                bar.update()
    finally:
        bar.close()
        with torch.no_grad():
            for t, w in zip(targets, originals):
                t.weight().copy_(w)
    best = max(table, key=lambda r: r["score"])
    return AlphaSearch(table, best["alpha_r"], best["alpha_f"], time.perf_counter() - t0)
