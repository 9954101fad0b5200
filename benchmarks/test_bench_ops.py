"""pytest-benchmark timings of each op and its pure-PyTorch twin on a few real layer shapes.

    pytest benchmarks --benchmark-only            (CPU; add -m cuda on a GPU machine)

These are measurements, not pass/fail targets: compare the groups' rows side by side. The
ratio table with every shape comes from ``python benchmarks/bench_kernels.py``.
"""
import pytest
import torch
import torch.nn.functional as F

from deepunlearn import ops as extension
from deepunlearn.ops.covariance import accumulate_conv_
from deepunlearn.patches import ConvGeometry

pytestmark = pytest.mark.skipif(not extension.loaded(), reason="extension not built")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")])]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [768, 3072])
@pytest.mark.parametrize("impl", ["addmm", "op"])
def test_linear_cov(benchmark, device, d, impl):
    benchmark.group = f"linear_cov d={d} {device}"
    x = torch.randn(4 * 197, d, device=device)
    cov = torch.zeros(d, d, device=device)
    fn = (lambda: cov.addmm_(x.T, x)) if impl == "addmm" else (lambda: extension.library().linear_cov_accumulate_(cov, x))
    benchmark(lambda: (fn(), sync(device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,hw,groups", [(64, 32, 1), (128, 16, 1), (144, 56, 144)])  # the last: depthwise
@pytest.mark.parametrize("impl", ["unfold+addmm", "op"])
def test_conv_cov(benchmark, device, c, hw, groups, impl):
    benchmark.group = f"conv_cov C={c} {hw}x{hw} groups={groups} {device}"
    x = torch.randn(16 if groups == 1 else 4, c, hw, hw, device=device)
    geom = ConvGeometry.of(torch.nn.Conv2d(c, c, 3, padding=1, groups=groups))
    d = c // groups * 9
    cov = torch.zeros(groups, d, d, device=device)

    def unfold():  # one GEMM per group, batched
        u = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, groups, d).transpose(0, 1)
        cov.baddbmm_(u.transpose(1, 2), u)

    fn = unfold if impl != "op" else (lambda: accumulate_conv_(cov, x, geom))
    benchmark(lambda: (fn(), sync(device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["two-gemm", "op"])
def test_projected_edit(benchmark, device, impl):
    benchmark.group = f"projected_edit d=768 {device}"
    w, m_r, m_f = (torch.randn(1, 768, 768, device=device) for _ in range(3))
    fn = (lambda: w - (w - w @ m_r) @ m_f) if impl == "two-gemm" else (lambda: extension.library().projected_edit(w, m_r, m_f))
    benchmark(lambda: (fn(), sync(device)))
