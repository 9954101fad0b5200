"""The weight edit ``W ← W − (W (I − M_r)) M_f``, planned for every layer before any is written.

Planning computes every new weight into fresh tensors; only when all layers succeeded does
:func:`apply_plan` copy them into the model, so an error anywhere leaves the model untouched.
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


@dataclass
class PlannedEdit:
    target: EditTarget
    new_weight: torch.Tensor  # target.weight() shape and dtype


def apply_plan(plan: list[PlannedEdit]) -> None:
    """Write every planned weight into its parameter (in place, without autograd)."""
    with torch.no_grad():
        for p in plan:
            p.target.weight().copy_(p.new_weight)
