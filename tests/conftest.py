import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_configure(config):
    # The ops' internal scratch memory starts as NaN in the tests, so that an entry a kernel should
    # have written but did not shows in its result.
    from deepunlearn import ops as extension

    if extension.loaded():
        from deepunlearn import _C

        _C.set_poison_scratch(True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against reference ``b`` (both promoted to float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spd(g: int, d: int, rank: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """A batch of PSD second moments ``(g, d, d)`` with a spread spectrum (optionally low rank)."""
    rank = rank or d
    x = torch.randn(g, 3 * d, rank, dtype=dtype) @ torch.randn(g, rank, d, dtype=dtype)
    x = x * torch.logspace(0, -3, d, dtype=dtype)  # uneven energies per direction
    return x.transpose(1, 2) @ x
