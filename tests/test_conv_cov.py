"""conv_cov_accumulate_ at its defaults against its pure twin and float64: every layout, dtype, chunking, conv3d through it, bad arguments."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from deepunlearn import ops as extension
from ext_cases import DEVICES, conv_case, device_or_skip, needs_ext
from deepunlearn.ops.covariance import accumulate_conv_, accumulate_conv_reference_
from deepunlearn.patches import ConvGeometry
from ext_cases import CONVS


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", CONVS, ids=[f"{i}-{type(c).__name__}" for i, c in enumerate(CONVS)])
@pytest.mark.parametrize("x_dtype,cov_dtype", [(torch.float32, torch.float64), (torch.float32, torch.float32),
                                              (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_cov_matches_pure_twin(device, conv, x_dtype, cov_dtype, channels_last):
    dev = device_or_skip(device)
    x, geom, start, ref = conv_case(conv, 3, x_dtype)
    if channels_last:
        if x.dim() != 4:
            pytest.skip("channels-last is a 4-d layout")
        x = x.to(memory_format=torch.channels_last)
    got = accumulate_conv_(start.to(device=dev, dtype=cov_dtype), x.to(dev), geom)
    tol = 1e-13 if cov_dtype == torch.float64 else (1e-5 if dev.type == "cpu" or x_dtype != torch.float32 else 2e-3)
    assert rel_err(got.cpu(), ref) < tol


@needs_ext
def test_conv_cov_uses_bounded_memory_and_matches_with_many_chunks():
    # 64 × 32 × 32 positions × d = 27: several chunks of the 4M-element buffer
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(64, 3, 128, 128)
    geom = ConvGeometry.of(conv)
    got = accumulate_conv_(torch.zeros(1, 27, 27, dtype=torch.float64), x, geom)
    ref = accumulate_conv_reference_(torch.zeros(1, 27, 27, dtype=torch.float64), x, geom)
    assert rel_err(got, ref) < 1e-12
    # the shifted form copies the images in chunks too: here one image per chunk
    conv = nn.Conv2d(16, 4, 3, padding=1)
    x = torch.randn(5, 16, 32, 32)
    geom = ConvGeometry.of(conv)
    got = accumulate_conv_(torch.zeros(1, 144, 144, dtype=torch.float64), x, geom, form="shifted",
                           chunk_elements=16 * 34 * 34)
    ref = accumulate_conv_reference_(torch.zeros(1, 144, 144, dtype=torch.float64), x, geom)
    assert rel_err(got, ref) < 1e-12 and torch.equal(got, got.transpose(1, 2))


CONV3D_CASES = [
    (nn.Conv3d(3, 4, 3, padding=1), (6, 9, 8)),
    (nn.Conv3d(4, 6, (2, 3, 1), stride=(2, 1, 1), padding=(1, 1, 0), dilation=(2, 1, 1), groups=2), (7, 9, 6)),
    (nn.Conv3d(4, 4, 3, stride=2, padding="valid"), (7, 9, 8)),
    (nn.Conv3d(6, 6, 3, padding="same", groups=6), (5, 8, 7)),  # depthwise
    (nn.Conv3d(2, 4, (3, 3, 3), padding=(1, 2, 0), padding_mode="replicate"), (4, 6, 9)),
    (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (5, 8, 8)),
]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunks", ["whole", "images", "depths"])
@pytest.mark.parametrize("conv,spatial", CONV3D_CASES, ids=[f"{i}" for i in range(len(CONV3D_CASES))])
def test_conv3d_through_the_2d_op_matches_float64_oracle(monkeypatch, device, dtype, chunks, conv, spatial):
    # conv3d as conv2d over depth slabs stacked as channels: the op, never the pure twin, and the
    # same statistics whatever the chunks (one image per chunk; three output depths per chunk)
    import deepunlearn.ops.covariance as cv

    dev = device_or_skip(device)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(cv, "accumulate_conv_reference_", lambda *a: pytest.fail("took the pure path"))
    x, geom, start, ref = conv_case(conv, 3, dtype, spatial=spatial)
    per_slab = conv.in_channels * conv.kernel_size[0] * spatial[1] * spatial[2]
    out_depth = conv.double()(x[:1].double()).shape[2]
    if chunks != "whole":
        monkeypatch.setattr(cv, "_SLAB_CHUNK_ELEMENTS", per_slab * (3 if chunks == "depths" else out_depth))
    got = accumulate_conv_(start.to(device=dev, dtype=dtype), x.to(dev), geom)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(got.cpu().double(), ref) < tol and torch.equal(got, got.transpose(1, 2))


@needs_ext
def test_conv3d_channels_last_and_bf16_inputs():
    conv = nn.Conv3d(4, 4, 3, padding=1)
    x, geom, start, ref = conv_case(conv, 2, torch.bfloat16, spatial=(5, 7, 6))
    got = accumulate_conv_(start.float(), x.to(memory_format=torch.channels_last_3d), geom)
    assert rel_err(got, ref) < 1e-5 and torch.equal(got, got.transpose(1, 2))


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("conv", [CONVS[1], CONVS[2], CONVS[8], CONVS[9], CONVS[14]],
                         ids=["strided-groups", "dilated", "d1000", "conv1d", "shifted"])
def test_cuda_conv_cov_many_small_chunks(conv):
    # 1000-entry chunks: rows of a chunk rarely align with images or output rows (the shifted
    # form, taken for float64 statistics of stride-1 convs, then runs one image per chunk).
    dev = device_or_skip("cuda")
    x, geom, start, ref = conv_case(conv, 5)
    got = accumulate_conv_(start.to(dev), x.to(dev), geom, chunk_elements=1000 + conv.weight[0].numel())
    assert rel_err(got.cpu(), ref) < 1e-13


@needs_ext
@pytest.mark.cuda
def test_cuda_conv_cov_64bit_indices():
    # More than 2^31 output positions: the gather switches to 64-bit index arithmetic.
    dev = device_or_skip("cuda")
    length = 2**31 + 4099
    if torch.cuda.mem_get_info(dev)[0] < 3 * length * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    x = torch.randn(1, 1, length, device=dev, dtype=torch.bfloat16)
    geom = ConvGeometry.of(nn.Conv1d(1, 1, 2, padding=1))  # d = 2: x_i² and x_i x_{i+1} sums
    got = accumulate_conv_(torch.zeros(1, 2, 2, device=dev), x, geom)
    sq = cross = 0.0
    step = 2**28
    for i in range(0, length, step):
        a = x[0, 0, i : i + step + 1].double()
        sq += a[: min(step, length - i)].pow(2).sum().item()
        cross += (a[:-1] * a[1:]).sum().item()
    ref = torch.tensor([[sq, cross], [cross, sq]], dtype=torch.float64)
    assert rel_err(got[0].cpu(), ref) < 1e-3
    del x


@needs_ext
def test_conv_cov_rejects_bad_arguments():
    ops = extension.library()
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(RuntimeError, match="C/groups"):
        ops.conv_cov_accumulate_(torch.zeros(1, 10, 10), x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="do not split into 3 groups"):
        ops.conv_cov_accumulate_(torch.zeros(3, 12, 12), x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.conv_cov_accumulate_(torch.zeros(1, 4 * 49, 4 * 49), x, [7, 7], [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="padding"):
        ops.conv_cov_accumulate_(torch.zeros(1, 36, 36), x, [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="chunk_elements must be >= 0"):
        ops.conv_cov_accumulate_(torch.zeros(1, 36, 36), x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "auto", -1)
