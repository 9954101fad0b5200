"""Per-class statistics: collect once, then answer any deletion request from stored sums.

Forgetting classes ``F`` needs the second moments of the retain classes, which are the same for
every request. :class:`ClassStatistics` keeps one :class:`~deepunlearn.Statistics` per class;
a request is answered with ``forget = Σ_{k∈F} S_k`` and ``retain = Σ_{k∉F} S_k``, without
touching any data again. The sums equal a fresh collection over the same samples (to float
rounding of the summation order).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._batches import batch_input
from .sampling import class_balanced_indices, dataset_labels
from .collect import collect_slots, collection_setup, finish_statistics
from .statistics import Statistics, load_blob

_FORMAT = "deepunlearn.class_statistics"


class ClassStatistics:
    """Input second moments of every edited layer, per class, for one model.

    Attributes:
        per_class: class index -> :class:`Statistics` of that class's samples.
        indices: class index -> dataset indices the statistics were collected from.
    """

    def __init__(self, per_class: dict[int, Statistics], indices: dict[int, list[int]] | None = None):
        if not per_class:
            raise ValueError("no class statistics given")
        fps = {s.fingerprint for s in per_class.values()}
        if len(fps) != 1:
            raise ValueError(f"class statistics come from different models (fingerprints {sorted(fps)})")
        self.per_class = dict(sorted(per_class.items()))
        self.indices = indices or {}

    @property
    def classes(self) -> list[int]:
        return list(self.per_class)

    @property
    def fingerprint(self) -> str:
        return next(iter(self.per_class.values())).fingerprint

    @classmethod
    def collect(cls, model: nn.Module, dataset: Dataset, *, per_class: int = 100, seed: int = 0,
                batch_size: int = 256, dtype: torch.dtype | None = None, autocast: torch.dtype | None = None,
                workers: int = 0, progress: bool = False, collate_fn: Callable | None = None) -> "ClassStatistics":
        """Collect ``per_class`` random samples' statistics for every class of a labelled ``dataset``.

        One pass over one DataLoader (``workers`` loader processes; ``collate_fn`` joins its samples
        into a batch, e.g. padding token sequences) whose batches never mix two
        classes. ``batch_size``, ``dtype``, ``autocast``, ``progress`` are as in
        :func:`deepunlearn.collect_statistics`. Under ``torch.distributed`` each rank streams its
        share of every class's draw and gets the sums.
        """
        from tqdm.auto import tqdm

        from . import distributed

        if per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}")
        targets, device, dtype = collection_setup(model, dtype)
        labels = dataset_labels(dataset)
        g = torch.Generator().manual_seed(seed)
        classes = sorted(labels.unique().tolist())
        idx = {c: class_balanced_indices(labels, [c], per_class, g) for c in classes}
        batches = [(c, mine[i : i + batch_size]) for c in classes
                   for mine in [distributed.shard(idx[c])] for i in range(0, len(mine), batch_size)]
        data = DataLoader(dataset, batch_sampler=[b for _, b in batches], num_workers=workers,
                          pin_memory=device.type == "cuda", collate_fn=collate_fn)
        partial: dict[int, tuple[Statistics, int]] = {}
        error = None
        bar = tqdm(total=sum(len(b) for _, b in batches), desc="class statistics", unit="img", unit_scale=True,
                   disable=not progress, leave=False)
        try:
            for (c, _), batch in zip(batches, data):
                one, n = collect_slots(model, [batch], targets, device, dtype, autocast, len(batch_input(batch)), False,
                                     f"class {c}")
                if c in partial:
                    one, n = partial[c][0] + one, partial[c][1] + n
                partial[c] = (one, n)
                bar.update(n)
        except Exception as exc:  # under torch.distributed the other ranks must hear of it
            error = exc
        finally:
            bar.close()
        stats = {c: finish_statistics(model, *partial.get(c, (Statistics(), 0)), error, distributed.world() is not None,
                                      f"class {c}") for c in classes}
        return cls(stats, idx)

    def _check(self, classes: Iterable[int]) -> list[int]:
        wanted = sorted({int(c) for c in classes})
        if not wanted:
            raise ValueError("no class to forget given")
        missing = [c for c in wanted if c not in self.per_class]
        if missing:
            raise ValueError(f"class(es) {missing} have no stored statistics (stored: {self.classes})")
        if len(wanted) == len(self.per_class):
            raise ValueError("forgetting every stored class leaves nothing to retain")
        return wanted

    def forget(self, classes: Iterable[int]) -> Statistics:
        """Summed statistics of the classes to forget."""
        wanted = self._check(classes)
        return sum((self.per_class[c] for c in wanted[1:]), self.per_class[wanted[0]])

    def retain(self, classes: Iterable[int]) -> Statistics:
        """Summed statistics of every stored class except ``classes``."""
        wanted = set(self._check(classes))
        keep = [c for c in self.per_class if c not in wanted]
        return sum((self.per_class[c] for c in keep[1:]), self.per_class[keep[0]])

    def save(self, path: str | os.PathLike) -> None:
        """Write every class's statistics (each with its checksum) and the sample indices."""
        torch.save({"format": _FORMAT, "classes": {c: s.to_blob() for c, s in self.per_class.items()},
                    "indices": self.indices}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassStatistics":
        """Read a file written by :meth:`save`; a corrupted class or another format is refused."""
        return cls.from_blob(load_blob(path), repr(os.fspath(path)))

    @classmethod
    def from_blob(cls, blob: object, source: str = "class statistics") -> "ClassStatistics":
        """Inverse of what :meth:`save` writes; each class's checksum is verified."""
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{source} is not a deepunlearn class-statistics file")
        per_class = {int(c): Statistics.from_blob(b, f"{source} (class {c})") for c, b in blob["classes"].items()}
        return cls(per_class, {int(c): list(v) for c, v in blob.get("indices", {}).items()})
