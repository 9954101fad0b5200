"""symmetric_eigh against float64 spectra it was built from, and Spectrum.of_many against one call per moment."""
import pytest
import torch

from conftest import rel_err
from deepunlearn import ops as extension
from deepunlearn import projection
from deepunlearn.ops.eigh import symmetric_eigh
from deepunlearn.projection import Spectrum
from ext_cases import DEVICES, device_or_skip, needs_ext


def known_spectrum(b: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, e)``: ``b`` symmetric ``d × d`` matrices ``Q diag(e) Qᵀ`` (float64) with distinct,
    spread eigenvalues ``e`` (ascending), some negative, none zero."""
    q = torch.linalg.qr(torch.randn(b, d, d, dtype=torch.float64))[0]
    e = torch.sort(torch.linspace(-1.0, 4.0, d, dtype=torch.float64) + 0.01 * torch.rand(b, d, dtype=torch.float64))[0]
    a = (q * e[:, None, :]) @ q.transpose(-1, -2)
    return 0.5 * (a + a.transpose(-1, -2)), e


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,d", [(1, 7), (5, 40), (3, 300)])
def test_symmetric_eigh_matches_the_float64_spectrum(device, dtype, b, d):
    dev = device_or_skip(device)
    a, e = known_spectrum(b, d)
    values, vectors = extension.library().symmetric_eigh(a.to(dev, dtype))
    assert values.shape == (b, d) and vectors.shape == (b, d, d) and values.dtype == vectors.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert rel_err(values.cpu(), e) < tol
    u = vectors.cpu().double()
    assert rel_err((u * values.cpu().double()[:, None, :]) @ u.transpose(-1, -2), a) < tol
    assert rel_err(u.transpose(-1, -2) @ u, torch.eye(d, dtype=torch.float64).expand(b, d, d)) < tol
    # the same layout as torch.linalg.eigh's (its twin), so that either can stand for the other
    twin = torch.linalg.eigh(a.to(dev, dtype))[1]
    assert vectors.stride() == twin.stride()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_symmetric_eigh_reads_the_lower_triangle(device):
    dev = device_or_skip(device)
    a, e = known_spectrum(2, 30)
    upper_spoilt = a + torch.triu(torch.randn_like(a), diagonal=1)  # only the strict upper triangle changed
    values, _ = extension.library().symmetric_eigh(upper_spoilt.to(dev))
    assert rel_err(values.cpu(), e) < 1e-12


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_symmetric_eigh_takes_an_empty_stack(device):
    dev = device_or_skip(device)
    values, vectors = extension.library().symmetric_eigh(torch.empty(0, 6, 6, device=dev))
    assert values.shape == (0, 6) and vectors.shape == (0, 6, 6)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_symmetric_eigh_rejects_bad_arguments(device):
    dev = device_or_skip(device)
    ops = extension.library()
    with pytest.raises(RuntimeError, match=r"stack \(b, d, d\) of square matrices"):
        ops.symmetric_eigh(torch.eye(4, device=dev))
    with pytest.raises(RuntimeError, match=r"stack \(b, d, d\) of square matrices"):
        ops.symmetric_eigh(torch.zeros(2, 4, 5, device=dev))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.symmetric_eigh(torch.eye(4, dtype=torch.float16, device=dev)[None])
    nan = torch.eye(5, device=dev)[None].repeat(2, 1, 1)
    nan[1, 2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="matrix 1 of 2 gave no finite spectrum"):
        ops.symmetric_eigh(nan)


def test_the_seam_falls_back_to_its_twin():
    a, e = known_spectrum(3, 20)
    with extension.pure_path():
        values, vectors = symmetric_eigh(a)
    assert rel_err(values, e) < 1e-12 and torch.equal(values, torch.linalg.eigh(a)[0])


def test_the_seam_keeps_gradients():
    a, _ = known_spectrum(2, 6)
    a.requires_grad_(True)
    values, _ = symmetric_eigh(a)
    values.sum().backward()  # d(Σλ)/dA = I: the trace
    assert torch.allclose(a.grad, torch.eye(6, dtype=torch.float64).expand(2, 6, 6))


@pytest.mark.parametrize("stack_bytes", [projection.EIGH_STACK_BYTES, 1])
def test_spectra_of_many_moments_match_one_at_a_time(monkeypatch, stack_bytes):
    # moments of mixed widths, dtypes and group counts; stack_bytes = 1: one moment a call
    monkeypatch.setattr(projection, "EIGH_STACK_BYTES", stack_bytes)
    covs = []
    for g, d, dtype in [(1, 12, torch.float64), (3, 12, torch.float64), (2, 9, torch.float64), (1, 12, torch.float32),
                        (2, 12, torch.float64)]:
        x = torch.randn(g, 2 * d, d, dtype=torch.float64)
        covs.append((x.transpose(-1, -2) @ x).to(dtype))
    together = Spectrum.of_many(covs)
    for cov, s in zip(covs, together):
        alone = Spectrum(*reversed(torch.linalg.eigh(projection.symmetric_normalised(cov))))
        assert s.vectors.shape == cov.shape and s.energies.shape == cov.shape[:2] and s.energies.dtype == cov.dtype
        tol = 1e-12 if cov.dtype == torch.float64 else 1e-5
        assert rel_err(s.energies, alone.energies.clamp(0.0, 1.0)) < tol
        assert rel_err(s.projection(3.0), alone.projection(3.0)) < tol
