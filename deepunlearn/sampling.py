"""Drawing forget and retain samples from a labelled dataset: its labels, and class-balanced draws."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Integer labels of every sample of a labelled dataset, as a 1-d tensor."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "tensors") and len(dataset.tensors) > 1:
        targets = dataset.tensors[1]
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.long).flatten()


def class_balanced_indices(labels: torch.Tensor, classes: Sequence[int], total: int, generator: torch.Generator) -> list[int]:
    """Up to ``total`` indices spread evenly over ``classes`` (random within each class)."""
    per = [torch.nonzero(labels == c).flatten() for c in classes]
    base, extra = divmod(total, len(classes))
    out: list[int] = []
    for i, idx in enumerate(per):
        k = min(len(idx), base + (1 if i < extra else 0))
        out += idx[torch.randperm(len(idx), generator=generator)[:k]].tolist()
    return sorted(out)


def draw_samples(labels: torch.Tensor, classes: int | Sequence[int], retain_per_class: int,
                 forget_samples: int | None, seed: int) -> tuple[list[int], list[int]]:
    """The paper's sample draw: ``(forget indices, retain indices)`` into a dataset with ``labels``.

    ``retain_per_class`` random samples of every class not in ``classes``, and ``forget_samples``
    samples of the ``classes`` spread evenly over them (default: as many as the retain sample,
    capped by what the classes hold). Raises ``ValueError`` naming what is wrong with the request.
    """
    forget_set = sorted({int(c) for c in ([classes] if isinstance(classes, int) else classes)})
    if not forget_set:
        raise ValueError("no class to forget given")
    if retain_per_class < 1:
        raise ValueError(f"retain_per_class must be at least 1, got {retain_per_class}")
    present = set(labels.unique().tolist())
    missing = [c for c in forget_set if c not in present]
    if missing:
        raise ValueError(f"class(es) {missing} do not occur in the dataset (its classes: {sorted(present)})")
    keep = sorted(present - set(forget_set))
    if not keep:
        raise ValueError("forgetting every class leaves nothing to retain")
    g = torch.Generator().manual_seed(seed)
    retain_idx = class_balanced_indices(labels, keep, retain_per_class * len(keep), g)
    n_forget = retain_per_class * len(keep) if forget_samples is None else int(forget_samples)
    if n_forget < 1:
        raise ValueError(f"forget_samples must be at least 1, got {forget_samples}")
    forget_idx = class_balanced_indices(labels, forget_set, n_forget, g)
    return forget_idx, retain_idx
