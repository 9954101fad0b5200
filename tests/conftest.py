import os

import pytest
import torch

THREADS = max(1, min(4, os.cpu_count() or 1))
# Under pytest-xdist (-n N) each of the N workers takes an equal share of the cores, and so do the
# processes its tests start (OMP_NUM_THREADS): N busy workers then never oversubscribe the machine.
WORKER_THREADS = max(1, THREADS // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
# The ops' tests run their parallel loops on two threads or more whatever the share, so that work
# split across threads (and any race between them) is still what they check.
KERNEL_TEST_THREADS = max(2, WORKER_THREADS)
# (Not test_symmetric_eigh: its CPU kernel is LAPACK's own, whose OpenMP threads stall when they
# outnumber the cores a busy neighbour leaves them.)
KERNEL_TEST_MODULES = {"test_build", "test_conv_cov", "test_conv_forms", "test_linear_cov", "test_projected_edit"}
torch.set_num_threads(WORKER_THREADS)
if WORKER_THREADS < THREADS:
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)


def pytest_configure(config):
    # The ops' internal scratch memory starts as NaN in the tests, so that an entry a kernel should
    # have written but did not shows in its result.
    from deepunlearn import ops as extension

    if extension.loaded():
        from deepunlearn import _C

        _C.set_poison_scratch(True)


def pytest_collection_modifyitems(config, items):
    # Files with slow tests first, each file's tests kept together: spread over workers (-n), the
    # long tests then overlap the short ones instead of running alone at the end.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def _kernel_threads(request):
    if request.module.__name__ not in KERNEL_TEST_MODULES:
        yield
        return
    torch.set_num_threads(KERNEL_TEST_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(WORKER_THREADS)


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
