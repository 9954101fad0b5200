"""linear_cov_accumulate_ against float64."""
import pytest
import torch

from conftest import rel_err
from deepunlearn import ops as extension
from ext_cases import DEVICES, TOL, device_or_skip, needs_ext, sym_poison


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,cov_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32), (torch.float32, torch.float64),
                                              (torch.float64, torch.float64)])
@pytest.mark.parametrize("n,d", [(0, 9), (1, 9), (37, 1), (200, 7), (150, 385), (64, 800), (33, 1030), (20, 2100)])
def test_linear_cov_matches_float64_reference(device, x_dtype, cov_dtype, n, d):
    dev = device_or_skip(device)
    x = torch.randn(n, d, dtype=torch.float64).to(x_dtype)
    cov = sym_poison(d, cov_dtype, dev)
    ref = cov.double().cpu() + x.double().T @ x.double()  # x as stored (already rounded to its dtype)
    extension.library().linear_cov_accumulate_(cov, x.to(dev))
    tol = TOL[x_dtype] if dev.type == "cpu" or x_dtype != torch.float32 else 2e-3  # tf32 on GPUs may be on
    assert rel_err(cov.cpu(), ref) < tol
    assert torch.equal(cov, cov.T)  # exactly symmetric


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_linear_cov_non_contiguous_inputs(device):
    dev = device_or_skip(device)
    base = torch.randn(40, 900, dtype=torch.float32, device=dev)
    for x in (base.T[:, :40].T, base[:, ::2], base.T.contiguous().T):  # strided and transposed views
        cov = sym_poison(x.shape[1], torch.float64, dev)
        ref = cov.clone() + x.double().T @ x.double()
        extension.library().linear_cov_accumulate_(cov, x)
        assert rel_err(cov, ref) < 1e-6


@needs_ext
def test_linear_cov_rejects_bad_arguments():
    ops = extension.library()
    with pytest.raises(RuntimeError, match=r"x must be \(n, 4\)"):
        ops.linear_cov_accumulate_(torch.zeros(4, 4), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="cov must be float32 or float64"):
        ops.linear_cov_accumulate_(torch.zeros(4, 4, dtype=torch.float16), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="float64 x needs a float64 cov"):
        ops.linear_cov_accumulate_(torch.zeros(4, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.linear_cov_accumulate_(torch.zeros(4, 8)[:, :4], torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="must be >= 0"):
        ops.linear_cov_accumulate_(torch.zeros(4, 4), torch.randn(3, 4), 0, -2)


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("tile,split_k,n,d", [(t, 0, 70, 385) for t in (1, 128, 300)]
                         + [(0, s, 3001, 27) for s in (2, 7, 1000)])
def test_cuda_symmetric_gemm_tuning(tile, split_k, n, d):
    # tile: the kernels pick one full GEMM up to d = 1024; small tiles exercise the triangle of
    # tiles with ragged edges. split_k: slices of the rows in one strided-batched GEMM, then their
    # sum (7: rows left over go straight into cov; 1000: capped at 256 rows a slice). Both memory
    # layouts the GEMMs read.
    dev = device_or_skip("cuda")
    for x in (torch.randn(n, d, device=dev), torch.randn(d, n, device=dev).T):  # row- and column-major
        for dtype, cov_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
            xd = x.to(dtype)
            cov = sym_poison(d, cov_dtype, dev)
            ref = cov.double() + xd.double().T @ xd.double()
            extension.library().linear_cov_accumulate_(cov, xd, tile, split_k)
            assert rel_err(cov, ref) < (1e-13 if cov_dtype == torch.float64 else 2e-3) and torch.equal(cov, cov.T)
