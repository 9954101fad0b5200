"""Turn whatever the caller passes as data into a stream of input batches."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .inputs import TokenInputs, mapping_input, mapping_labels

DataLike = Any  # DataLoader | Dataset | Tensor | Iterable of batches
ModelInput = torch.Tensor | TokenInputs  # what one batch gives the model


def batch_input(batch: Any) -> ModelInput:
    """Return the model input of one batch: ``x`` itself, the first item of ``(x, y, ...)``, or a
    mapping's entries but its labels (:class:`~deepunlearn.inputs.TokenInputs`, passed as keywords)."""
    if isinstance(batch, (torch.Tensor, TokenInputs)):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        return mapping_input(batch)
    raise TypeError(
        "each batch must be a tensor x, a tuple/list (x, y, ...) whose first item is a tensor, or a mapping of "
        f"model inputs (input_ids, attention_mask, ..., labels); got {type(batch).__name__}"
    )


def batch_labels(batch: Any) -> torch.Tensor | None:
    """One batch's labels: ``y`` of ``(x, y, ...)``, a mapping's ``labels``, else None."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return torch.as_tensor(batch[1])
    if isinstance(batch, Mapping):
        return mapping_labels(batch)
    return None


def iter_raw_batches(data: DataLike, batch_size: int = 256) -> Iterator[Any]:
    """Yield the batches of a DataLoader, Dataset, tensor or iterable as they come.

    A tensor, a :class:`~deepunlearn.inputs.TokenInputs` or a mapping of tensors (a tokenizer's whole
    output, its labels included) is split along dim 0 into chunks of ``batch_size``; a map-style
    Dataset is wrapped in a DataLoader without shuffling; anything else is iterated as given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise ValueError("a data tensor needs a batch dimension; got a 0-d tensor")
        yield from data.split(batch_size)
        return
    if isinstance(data, TokenInputs):
        yield from data.split(batch_size)
        return
    if isinstance(data, Mapping):  # one batch of every sample, not an iterable of batches (its keys)
        bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor) or v.dim() == 0]
        if bad or not data:
            raise TypeError("data given as one mapping must hold tensors with a batch dimension (as a tokenizer's "
                            f"output with return_tensors='pt'); {', '.join(map(repr, bad)) or 'it is empty'}")
        n = len(next(iter(data.values())))
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in data.items()}
        return
    if isinstance(data, Dataset):  # map-style or iterable: both yield samples, batch them
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be a DataLoader, a Dataset, a tensor or an iterable of batches; "
            f"got {type(data).__name__}"
        )
    yield from data


def iter_batches(data: DataLike, batch_size: int = 256) -> Iterator[ModelInput]:
    """Yield model inputs (batch dimension first): each batch of :func:`iter_raw_batches` as
    :func:`batch_input` reads it."""
    for batch in iter_raw_batches(data, batch_size):
        yield batch_input(batch)


def iter_labelled(data: DataLike, batch_size: int = 256) -> Iterator[tuple[ModelInput, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a labelled DataLoader, Dataset or iterable of ``(x, y, ...)``
    batches or of mappings with ``labels``."""
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        y = batch_labels(batch)
        if y is None:
            raise TypeError("labelled data must yield (x, y, ...) batches or mappings with 'labels'")
        yield batch_input(batch), y
