"""Eigendecompositions of stacks of symmetric matrices: the seam for the extension's batched op,
with its pure-PyTorch twin (the tests' oracle)."""
from __future__ import annotations

import torch

from .loader import has_op, library


def symmetric_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(b, d)``, ascending, and eigenvectors ``(b, d, d)`` (columns) of the symmetric
    float32/float64 matrices ``a`` ``(b, d, d)`` (lower triangles read), as :func:`torch.linalg.eigh`
    gives them. The extension's op where it has a kernel: on CUDA one batched cuSOLVER call, where
    ``torch.linalg.eigh`` calls the solver once per matrix past 32 wide. The twin where gradients
    are wanted (the op has no backward)."""
    if has_op("symmetric_eigh", a.device) and not (a.requires_grad and torch.is_grad_enabled()):
        return tuple(library().symmetric_eigh(a))
    return tuple(torch.linalg.eigh(a))
