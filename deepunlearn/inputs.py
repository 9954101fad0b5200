"""Model inputs given as mappings of tensors: the batches of Hugging Face tokenizers and collators.

A batch such as ``{"input_ids": (N, S), "attention_mask": (N, S), "labels": (N,)}`` is passed to
the model as keywords (``model(input_ids=..., attention_mask=...)``); its labels, under ``"labels"``
or ``"label"``, are the samples' labels, never a model input. :class:`TokenInputs` holds such inputs
and behaves as a batch tensor does where this package handles samples (``len``, indexing by samples,
``split``, ``to``), so that the automatic choice's folds and held-out parts work on it unchanged.

The attention mask, where given, says which positions are tokens: the statistics of a layer that
reads ``(N, S, d)`` token vectors count only those (:mod:`deepunlearn.hooks`), and "the first" or "the
last position" means the first or last token of each sample, wherever the padding puts it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

LABEL_KEYS = ("labels", "label")  # a mapping batch's labels: never passed to the model
MASK_KEY = "attention_mask"  # which positions hold tokens (1) and which padding (0)


class TokenInputs:
    """Model inputs as named tensors, each with the samples along its first dimension.

    Args:
        tensors: name -> ``(N, ...)`` tensor; all with the same ``N``. ``attention_mask``, where
            present, is ``(N, S)``.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        if not tensors:
            raise ValueError("a mapping batch needs at least one model input besides its labels")
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor) or v.dim() == 0]
        if bad:
            raise TypeError(f"every model input of a mapping batch must be a tensor with a batch dimension; "
                            f"{', '.join(repr(k) for k in bad)} is not")
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the model inputs of a mapping batch must hold the same number of samples, got {sizes}")
        mask = tensors.get(MASK_KEY)
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"'{MASK_KEY}' must be (samples, positions), got shape {tuple(mask.shape)}")
        self.tensors = dict(tensors)

    # -- what a batch tensor offers ---------------------------------------------------------------
    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def shape(self) -> torch.Size:
        """``(N,)``: the number of samples (the batch dimension, all this package reads of a shape)."""
        return torch.Size([len(self)])

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __getitem__(self, index) -> "TokenInputs":
        return TokenInputs({k: v[index] for k, v in self.tensors.items()})

    def split(self, size: int) -> list["TokenInputs"]:
        return [self[i:i + size] for i in range(0, len(self), size)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TokenInputs":
        return TokenInputs({k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()})

    @property
    def mask(self) -> torch.Tensor | None:
        """``(N, S)`` bool: the positions holding tokens; None where no attention mask was given."""
        mask = self.tensors.get(MASK_KEY)
        return None if mask is None else mask != 0

    @property
    def padding_side(self) -> str | None:
        """Where the mask shows padding: "left" or "right" (None: no padding, or no mask)."""
        sides = _padded_sides(self.mask)
        return "left" if "left" in sides else "right" if sides else None

    # -- joining batches --------------------------------------------------------------------------
    @classmethod
    def cat(cls, batches: Sequence["TokenInputs"], model: nn.Module | None = None) -> "TokenInputs":
        """The samples of ``batches`` as one, each sequence input padded to the longest (on the side
        the batches padded on, with the value their padded positions hold, else ``model.config``'s
        ``pad_token_id`` for ``input_ids``). ``ValueError`` where the batches differ in their inputs, pad
        on both sides, or need padding whose value nothing shows."""
        keys = list(batches[0].tensors)
        if any(list(b.tensors) != keys for b in batches):
            raise ValueError(f"every batch must give the same model inputs; got {sorted({tuple(b.tensors) for b in batches})}")
        sides = {side for b in batches for side in _padded_sides(b.mask)}
        if len(sides) > 1:
            raise ValueError("some batches are padded on the left and some on the right; pad them all on one side")
        side = sides.pop() if sides else "right"
        pad_values: dict[str, float] = {MASK_KEY: 0}
        for b in batches:
            for k, v in _pad_values(b).items():
                pad_values.setdefault(k, v)
        length = max(_length(b) for b in batches)
        joined = {}
        for k in keys:
            parts = []
            for b in batches:
                t = b.tensors[k]
                missing = length - _length(b)
                if missing and _is_sequence(b, k):
                    if k not in pad_values:
                        pad_values[k] = _config_pad(model, k)
                    pad = t.new_full((t.shape[0], missing, *t.shape[2:]), pad_values[k])
                    t = torch.cat([t, pad] if side == "right" else [pad, t], dim=1)
                parts.append(t)
            if len({t.shape[1:] for t in parts}) > 1:
                raise ValueError(f"the batches' '{k}' differ in shape beyond their samples "
                                 f"({sorted({tuple(t.shape[1:]) for t in parts})}) and no attention_mask says which "
                                 "positions are padding; give each batch's attention_mask")
            joined[k] = torch.cat(parts)
        return cls(joined)


def _length(b: TokenInputs) -> int:
    """The positions of ``b``'s sequences (0 without an attention mask)."""
    return 0 if b.mask is None else b.mask.shape[1]


def _is_sequence(b: TokenInputs, key: str) -> bool:
    """Whether input ``key`` has one entry per position (its second dimension the mask's)."""
    t, length = b.tensors[key], _length(b)
    return length > 0 and t.dim() >= 2 and t.shape[1] == length


def _padded_sides(mask: torch.Tensor | None) -> set[str]:
    """The sides a batch's padding is on: "right" where a sample's last position is padding,
    "left" where a sample's first is."""
    if mask is None:
        return set()
    sides = set()
    if bool((~mask[:, -1]).any()):
        sides.add("right")
    if bool((~mask[:, 0]).any()):
        sides.add("left")
    return sides


def _pad_values(b: TokenInputs) -> dict[str, float]:
    """The value each sequence input holds at a padded position of ``b`` (where it has one)."""
    mask = b.mask
    if mask is None or bool(mask.all()):
        return {}
    row, col = (~mask).nonzero()[0].tolist()
    return {k: t[row, col].item() for k, t in b.tensors.items()
            if k != MASK_KEY and _is_sequence(b, k) and t.dim() == 2}


def _config_pad(model: nn.Module | None, key: str) -> float:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) if key == "input_ids" else None
    if pad is None:
        raise ValueError(f"the batches' sequences differ in length and none shows what '{key}' holds at a padded "
                         f"position (no padding in any batch{', and the model config has no pad_token_id' if key == 'input_ids' else ''}); "
                         "give batches of one length, or padded ones with their attention_mask")
    return pad


def mapping_input(batch: Mapping) -> TokenInputs:
    """The model inputs of a mapping batch: every entry but its labels (:data:`LABEL_KEYS`)."""
    return TokenInputs({k: v for k, v in batch.items() if k not in LABEL_KEYS})


def mapping_labels(batch: Mapping) -> torch.Tensor | None:
    """A mapping batch's labels (:data:`LABEL_KEYS`), or None."""
    for k in LABEL_KEYS:
        if k in batch:
            return torch.as_tensor(batch[k])
    return None


def cat_inputs(parts: Sequence["torch.Tensor | TokenInputs"]) -> "torch.Tensor | TokenInputs":
    """The samples of ``parts`` (tensors, or :class:`TokenInputs`) as one model input."""
    return TokenInputs.cat(parts) if isinstance(parts[0], TokenInputs) else torch.cat(list(parts))


def call_model(model: nn.Module, x: "torch.Tensor | TokenInputs") -> object:
    """``model(x)``, or ``model(**inputs)`` for :class:`TokenInputs`."""
    return model(**x.tensors) if isinstance(x, TokenInputs) else model(x)


def token_positions(mask: torch.Tensor, position: int) -> torch.Tensor:
    """``(N,)``: for each sample (row of the ``(N, S)`` bool ``mask``), the index of its token number
    ``position`` (0 the first, -1 the last, counting tokens only). ``ValueError`` for a sample with
    too few tokens."""
    counts = mask.sum(1)
    want = torch.full_like(counts, position + 1) if position >= 0 else counts + position + 1
    if bool(((want < 1) | (want > counts)).any()):
        raise ValueError(f"token_position={position}, but some sample holds only {int(counts.min())} token(s) "
                         "(by its attention_mask)")
    return ((mask.cumsum(1) == want[:, None]) & mask).int().argmax(1)
