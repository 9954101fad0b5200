import math

import numpy as np
import pytest
import torch

from conftest import rel_err, spd
from deepunlearn.projection import Spectrum, projection_cholesky, scaled_projection


def numpy_reference(cov: torch.Tensor, alpha: float) -> torch.Tensor:
    """M(C, α) from numpy's float64 eigh and the closed-form λ — independent of the library code."""
    out = []
    for c in cov.double().numpy():
        e, u = np.linalg.eigh(c)
        tr = np.trace(c)
        r = np.clip(e / tr, 0, None) if tr > 0 else np.zeros_like(e)
        lam = alpha * r / ((alpha - 1) * r + 1)
        out.append((u * lam) @ u.T)
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("solver", ["cholesky", "eigh", "svd"])
@pytest.mark.parametrize("alpha", [0.25, 1.0, 3.0, 100.0, 1000.0])
@pytest.mark.parametrize("rank", [None, 5])
def test_solvers_match_float64_reference(solver, alpha, rank):
    cov = spd(3, 24, rank)
    m = scaled_projection(cov, alpha, solver)
    assert m.shape == cov.shape and m.dtype == torch.float64
    assert rel_err(m, numpy_reference(cov, alpha)) < 1e-10


def test_spectrum_rescales_without_new_decomposition():
    cov = spd(2, 16)
    s = Spectrum.of(cov)
    for alpha in (0.5, 10.0, 300.0):
        assert rel_err(s.projection(alpha), projection_cholesky(cov, alpha)) < 1e-10


def test_alpha_one_is_normalised_covariance():
    cov = spd(1, 10)
    m = scaled_projection(cov, 1.0)
    assert rel_err(m, cov / cov.diagonal(dim1=1, dim2=2).sum()) < 1e-12


def test_projection_eigenvalues_in_unit_interval_and_large_alpha_approaches_projector():
    cov = spd(1, 12, rank=4)
    m = scaled_projection(cov, 1e6)
    ev = torch.linalg.eigvalsh(m[0])
    assert ev.min() > -1e-9 and ev.max() < 1 + 1e-9
    # rank-4 input: four eigenvalues near 1, the rest 0
    assert torch.allclose(ev.sort().values[-4:], torch.ones(4, dtype=ev.dtype), atol=1e-3)
    assert ev.sort().values[:-4].abs().max() < 1e-9


@pytest.mark.parametrize("solver", ["cholesky", "eigh", "svd"])
def test_zero_trace_group_gives_zero_projection(solver):
    cov = spd(3, 8)
    cov[1] = 0
    m = scaled_projection(cov, 30.0, solver)
    assert torch.isfinite(m).all()
    assert m[1].abs().max() == 0
    assert m[0].abs().max() > 0


def test_float32_solvers_agree_to_float32_accuracy():
    cov = spd(2, 32)
    ref = numpy_reference(cov, 30.0)
    for solver in ("cholesky", "eigh", "svd"):
        assert rel_err(scaled_projection(cov.float(), 30.0, solver), ref) < 1e-4


@pytest.mark.parametrize("alpha", [0, -1, math.nan, math.inf, "x", None])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        scaled_projection(spd(1, 4), alpha)


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="solver"):
        scaled_projection(spd(1, 4), 3.0, "qr")
