"""The weight edit ``W ← W − (W (I − M_r)) M_f`` from formed projections: the seam for the
extension's fused op, with its pure-PyTorch twin (the tests' oracle)."""
from __future__ import annotations

import torch

from .loader import has_op, library


def edited_weight_reference(w: torch.Tensor, m_r: torch.Tensor, m_f: torch.Tensor) -> torch.Tensor:
    """``W − (W − W M_r) M_f`` per group. ``w``: ``(g, o, d)``; ``m_r``, ``m_f``: ``(g, d, d)``."""
    return w - (w - w @ m_r) @ m_f


def edited_weight(w: torch.Tensor, m_r: torch.Tensor, m_f: torch.Tensor) -> torch.Tensor:
    """As :func:`edited_weight_reference`; the extension's fused op when it is loaded."""
    if has_op("projected_edit", w.device):
        return library().projected_edit(w, m_r, m_f)
    return edited_weight_reference(w, m_r, m_f)
