"""The weight edit ``W ← W − (W (I − M_r)) M_f``, planned for every layer before any is written.

Planning computes every new weight (and, keeping the retain mean, bias) into fresh tensors; only
when all layers succeeded does :func:`apply_plan` copy them into the model, so an error anywhere
leaves the model untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import EditTarget


def edited_weight_reference(w: torch.Tensor, m_r: torch.Tensor, m_f: torch.Tensor) -> torch.Tensor:
    """``W − (W − W M_r) M_f`` per group. ``w``: ``(g, o, d)``; ``m_r``, ``m_f``: ``(g, d, d)``."""
    return w - (w - w @ m_r) @ m_f


def edited_weight(w: torch.Tensor, m_r: torch.Tensor, m_f: torch.Tensor) -> torch.Tensor:
    """As :func:`edited_weight_reference`; the extension's fused op when it is loaded."""
    from . import _ext

    if _ext.has_op("projected_edit", w.device):
        return _ext.ops().projected_edit(w, m_r, m_f)
    return edited_weight_reference(w, m_r, m_f)


def mean_keeping_bias(bias: torch.Tensor, w: torch.Tensor, new_weight: torch.Tensor,
                      mean: torch.Tensor) -> torch.Tensor:
    """The bias under which the edited layer's mean output over inputs of mean ``mean`` stays as it
    was: ``b + (W − W') μ`` per group (``W x + b`` and ``W' x + b'`` agree at ``x = μ``).

    ``bias``: the target's bias before the edit ``(out,)``; ``w`` / ``new_weight``: its weight
    before and after (its own shape, or ``(groups, out/groups, d)``); ``mean``: ``(groups, d)``.
    Returns a new tensor of the bias's shape and dtype.
    """
    dtype = torch.promote_types(new_weight.dtype, mean.dtype)
    delta = (w.to(dtype) - new_weight.to(dtype)).reshape(mean.shape[0], -1, mean.shape[1])  # (g, o/g, d)
    shift = (delta @ mean.to(device=delta.device, dtype=dtype)[:, :, None]).reshape(-1)
    return (bias.to(dtype) + shift).to(bias.dtype)


@dataclass
class PlannedEdit:
    target: EditTarget
    new_weight: torch.Tensor  # target.weight() shape and dtype
    new_bias: torch.Tensor | None = None  # target.bias() shape and dtype; None: the bias is kept


def apply_plan(plan: list[PlannedEdit]) -> None:
    """Write every planned weight (and bias) into its parameter (in place, without autograd)."""
    for p in plan:
        p.target.write(p.new_weight, p.new_bias)
