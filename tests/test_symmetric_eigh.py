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


def group_conv_tap_moments(count: int) -> torch.Tensor:
    """``(count, 72, 72)`` float32 second moments of a 3×3 convolution's groups of 8 channels run at
    1×1: only the centre taps (and one more) see data, the other rows and columns are zeros. Taken
    from regnetx_002's, on which float32 divide and conquer (MKL's ssyevd) failed to converge."""
    rows = torch.tensor([4, 22, 31, 40, 49, 58, 67])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(count, 50, len(rows), generator=gen) ** 3  # skewed, as ReLU outputs are
    block = x.transpose(-1, -2) @ x
    cov = torch.zeros(count, 72, 72)
    cov[:, rows[:, None], rows[None, :]] = block
    return cov


def test_spectra_of_moments_with_rows_of_zeros_match_float64():
    cov = group_conv_tap_moments(64)
    s = Spectrum.of(cov)
    want = Spectrum(*reversed(torch.linalg.eigh(projection.symmetric_normalised(cov.double()))))
    assert s.energies.dtype == torch.float32 and float(s.energies.min()) >= 0.0
    zero_rows = (cov == 0).all(-1)
    assert float(s.projection(1000.0)[zero_rows].abs().max()) < 1e-6  # what the data never reached is left alone
    for alpha in (0.3, 10.0, 1000.0):
        assert rel_err(s.projection(alpha).double(), want.projection(alpha)) < 1e-5


def test_a_stack_float32_does_not_solve_is_solved_in_float64(monkeypatch):
    def float64_only(a):
        if a.dtype != torch.float64:
            raise torch.linalg.LinAlgError("did not converge")
        return symmetric_eigh(a)

    monkeypatch.setattr(projection, "symmetric_eigh", float64_only)
    x = torch.randn(3, 40, 20, dtype=torch.float64)
    cov = x.transpose(-1, -2) @ x
    s = Spectrum.of(cov.float())
    want = Spectrum(*reversed(torch.linalg.eigh(projection.symmetric_normalised(cov))))
    assert s.energies.dtype == s.vectors.dtype == torch.float32
    assert rel_err(s.projection(10.0).double(), want.projection(10.0)) < 1e-5
    with pytest.raises(torch.linalg.LinAlgError):
        monkeypatch.setattr(projection, "symmetric_eigh", lambda a: float64_only(a.float()))
        Spectrum.of(cov)
