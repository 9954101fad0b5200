"""Drawing samples: a labelled dataset's labels and class-balanced draws; the data of a call as tensors,
split into the parts that fit and score candidates while α is chosen."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ._batches import DataLike, ModelInput, batch_labels, batch_input, iter_raw_batches
from .inputs import TokenInputs

HOLDOUT_FRACTION = 0.25  # of the retain samples, to score candidates (the final edit uses all)
HOLDOUT_CAP = 512  # held-out samples per side and fold at most: resolves 0.2 % steps, bounds scoring time
FORGET_FOLDS = 4  # each a quarter, as the retain hold-out; all of them score, so 1 % of 900 forget samples
# is 9 to count, not 2: the target is shown at confidence with an edit that forgets less (docs/auto_alpha.md)
HOLDOUT_SEED = 0
DIGEST_SEED = 0  # the multipliers of content_order's digest
DIGEST_CHUNK_ELEMENTS = 1 << 22  # elements digested at a time: their products stay within 16 MiB
_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16}  # narrow elements' bits read as integers


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Integer labels of every sample of a labelled dataset (``targets``, else each sample's
    ``y`` of ``(x, y, ...)`` or mapping's ``labels``), as a 1-d tensor."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "tensors") and len(dataset.tensors) > 1:
        targets = dataset.tensors[1]
    if targets is None:
        targets = [int(_sample_label(dataset[i], i)) for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.long).flatten()


def _sample_label(sample, i: int) -> torch.Tensor:
    """The label of one sample, read as a batch's (:func:`~deepunlearn._batches.batch_labels`)."""
    y = batch_labels(sample)
    if y is None:
        raise TypeError(f"sample {i} of the dataset carries no label: a labelled dataset yields (x, y, ...) or "
                        f"mappings with 'labels' (or has .targets); got {type(sample).__name__}")
    return y


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
                 forget_samples: int | None, seed: int | torch.Generator) -> tuple[list[int], list[int]]:
    """The paper's sample draw: ``(forget indices, retain indices)`` into a dataset with ``labels``.

    ``retain_per_class`` random samples of every class not in ``classes``, and ``forget_samples``
    samples of the ``classes`` spread evenly over them (default: as many as the retain sample,
    capped by what the classes hold), the retain sample drawn first. ``seed``: an int, or a
    generator to draw from (left advanced, for draws that follow). Raises ``ValueError`` naming
    what is wrong with the request.
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
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    retain_idx = class_balanced_indices(labels, keep, retain_per_class * len(keep), g)
    n_forget = retain_per_class * len(keep) if forget_samples is None else int(forget_samples)
    if n_forget < 1:
        raise ValueError(f"forget_samples must be at least 1, got {forget_samples}")
    forget_idx = class_balanced_indices(labels, forget_set, n_forget, g)
    return forget_idx, retain_idx


def materialise(data: DataLike, batch_size: int, role: str = "given",
                model: nn.Module | None = None) -> tuple[ModelInput, torch.Tensor | None]:
    """All samples of ``data`` as one model input ``(N, ...)`` (mapping batches as one
    :class:`~deepunlearn.inputs.TokenInputs`, their sequences padded to the longest; ``model``'s
    config may say the pad token) and their labels ``(N,)``, or None where the batches carry no
    labels. ``role`` ("forget", "retain") names the data in errors."""
    if data is None:
        raise ValueError(f"no {role} data given")
    xs, ys = [], []
    for batch in iter_raw_batches(data, batch_size):
        xs.append(batch_input(batch))
        y = batch_labels(batch)
        ys.append(y if y is not None and y.dim() == 1 and y.shape[0] == len(xs[-1]) and not y.is_floating_point()
                  else None)
    if not xs:
        return torch.empty(0), None
    labels = None if any(y is None for y in ys) else torch.cat(ys).long().cpu()
    if any(isinstance(x, TokenInputs) for x in xs):
        if not all(isinstance(x, TokenInputs) for x in xs):
            raise TypeError(f"the {role} data mixes mapping batches with tensor batches")
        return TokenInputs.cat(xs, model), labels
    return torch.cat(xs), labels


def content_order(x: ModelInput, labels: torch.Tensor | None) -> torch.Tensor:
    """The indices of the samples of ``x`` ``(N, ...)`` (with their ``labels`` ``(N,)``, or None),
    ordered by a digest of each sample's bits and label: the same samples given in any order (a
    shuffling DataLoader) come out in one order, so they are split into the same parts and the
    choice of α is the same. The digest sums the elements' bits, read as 32-bit integers, times
    fixed random odd multipliers (products wrap at 32 bits, sums are exact in int64): integer
    arithmetic, so no reduction order changes it. Samples alike in every bit and label tie, and a
    stable sort keeps them in the order given."""
    entries = [v for _, v in sorted(x.tensors.items())] if isinstance(x, TokenInputs) else [x]
    if labels is not None:
        entries.append(labels.reshape(len(x), 1))
    g = torch.Generator().manual_seed(DIGEST_SEED)
    key = sum((_digest(t, g) for t in entries), torch.zeros(len(x), dtype=torch.int64))
    return torch.sort(key, stable=True).indices


def _digest(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(N,)`` int64 on the CPU: each sample's elements of ``t`` ``(N, ...)``, as 32-bit integers
    (an 8-byte element as its two halves), times odd multipliers drawn from ``generator``, summed."""
    if len(t) == 0:
        return torch.zeros(0, dtype=torch.int64)
    flat = (torch.view_as_real(t) if t.is_complex() else t).reshape(len(t), -1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.int32)
    elif flat.element_size() in (4, 8):
        flat = flat.view(torch.int32)
    else:
        flat = flat.view(_INTEGER_OF_SIZE[flat.element_size()]).to(torch.int32)
    multipliers = (torch.randint(-(1 << 30), 1 << 30, (flat.shape[1],), generator=generator) * 2 + 1).to(
        device=flat.device, dtype=torch.int32)
    per_chunk = max(1, DIGEST_CHUNK_ELEMENTS // max(1, flat.shape[1]))
    return torch.cat([(chunk * multipliers).sum(1, dtype=torch.int64).cpu() for chunk in flat.split(per_chunk)])


def _shuffled(n: int, role: str, seed: int) -> torch.Tensor:
    """A seeded random permutation of ``range(n)``; at least 2 samples are needed to choose alpha."""
    if n == 0:
        raise ValueError(f"no samples in the {role} data")
    if n < 2:
        raise ValueError(f"choosing alpha automatically needs at least 2 {role} samples (some score the candidates "
                         f"edited from the others); got {n}. Give alpha_r and alpha_f instead")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def holdout_split(n: int, role: str, seed: int = HOLDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, held)`` indices of ``n`` samples: a random :data:`HOLDOUT_FRACTION`, at least one and
    at most :data:`HOLDOUT_CAP`, held out."""
    perm = _shuffled(n, role, seed)
    held = min(HOLDOUT_CAP, max(1, round(n * HOLDOUT_FRACTION)))
    return perm[held:].sort().values, perm[:held].sort().values


def fold_split(n: int, role: str, folds: int = FORGET_FOLDS, seed: int = HOLDOUT_SEED) -> list[torch.Tensor]:
    """``min(folds, n)`` disjoint random index sets covering ``range(n)``, sizes within one."""
    return [part.sort().values for part in _shuffled(n, role, seed).tensor_split(min(folds, n))]
