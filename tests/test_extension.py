"""The compiled ops against their pure-PyTorch twins, opcheck, and proof of what the binary holds."""
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import deepunlearn
from conftest import rel_err
from deepunlearn import _ext
from deepunlearn.covariance import ConvGeometry, accumulate_conv_, accumulate_conv_reference_
from deepunlearn.edit import edited_weight_reference

FIXED = {"alpha_r": 100.0, "alpha_f": 3.0}  # the fixed-α edit (the default call would choose α)

PURE_BUILD = os.environ.get("DEEPUNLEARN_NO_EXT", "0") not in ("", "0") or os.environ.get("DEEPUNLEARN_DISABLE_EXT", "0") not in ("", "0")
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="extension not built or disabled")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def device_or_skip(device: str) -> torch.device:
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")
        if not _ext.has_op("linear_cov_accumulate_", torch.device("cuda")):
            pytest.fail("a GPU is present but the extension has no CUDA kernels")
    return torch.device(device)


def cuda_build_expected() -> bool:
    """What setup.py does: CUDA kernels whenever torch is a CUDA build and a toolkit is present."""
    if os.environ.get("DEEPUNLEARN_CUDA") == "0" or torch.version.cuda is None:
        return False
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return any(h and (Path(h) / "bin" / "nvcc").exists() for h in homes)


def elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (enough to find .nv_fatbin)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def section(i):
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    strtab_off = section(shstrndx)[4]
    names = set()
    for i in range(shnum):
        name_off = section(i)[0]
        end = data.index(b"\0", strtab_off + name_off)
        names.add(data[strtab_off + name_off : end].decode())
    return names


# ---------------------------------------------------------------------------------------------
# What was built
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(PURE_BUILD, reason="pure-Python build requested")
def test_extension_is_built_and_loaded():
    info = deepunlearn.extension_info()
    assert info["extension_loaded"], info
    assert info["built_with_torch"].split("+")[0] == torch.__version__.split("+")[0]
    for op in ("linear_cov_accumulate_", "conv_cov_accumulate_", "projected_edit"):
        assert _ext.has_op(op, torch.device("cpu")), op


@pytest.mark.skipif(PURE_BUILD or not cuda_build_expected(), reason="no CUDA toolkit or CPU-only torch: CPU-only build")
def test_cuda_kernels_are_really_in_the_binary():
    info = deepunlearn.extension_info()
    assert info["cuda_kernels"] and info["built_with_cuda"] == torch.version.cuda, info
    for op in ("linear_cov_accumulate_", "conv_cov_accumulate_", "projected_edit"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deepunlearn::{op}", "CUDA"), op
    from deepunlearn import _C

    assert ".nv_fatbin" in elf_section_names(Path(_C.__file__)), "no device code in the extension"


def test_disable_switch_forces_the_pure_path(monkeypatch):
    import subprocess
    import sys

    code = "import deepunlearn, json; print(json.dumps(deepunlearn.extension_info()))"
    env = dict(os.environ, DEEPUNLEARN_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert '"extension_loaded": false' in out and "DEEPUNLEARN_DISABLE_EXT" in out


# ---------------------------------------------------------------------------------------------
# linear_cov_accumulate_
# ---------------------------------------------------------------------------------------------


def sym_poison(d, dtype, device):
    """A non-zero symmetric starting value: the op must add to it, not overwrite it."""
    a = torch.randn(d, d, dtype=torch.float64)
    s = a @ a.T / d + 3.0
    return ((s + s.T) / 2).to(dtype=dtype, device=device)  # exactly symmetric, whatever the GEMM rounded


TOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


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
    _ext.ops().linear_cov_accumulate_(cov, x.to(dev))
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
        _ext.ops().linear_cov_accumulate_(cov, x)
        assert rel_err(cov, ref) < 1e-6


@needs_ext
def test_linear_cov_rejects_bad_arguments():
    ops = _ext.ops()
    with pytest.raises(RuntimeError, match=r"x must be \(n, 4\)"):
        ops.linear_cov_accumulate_(torch.zeros(4, 4), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="cov must be float32 or float64"):
        ops.linear_cov_accumulate_(torch.zeros(4, 4, dtype=torch.float16), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="float64 x needs a float64 cov"):
        ops.linear_cov_accumulate_(torch.zeros(4, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.linear_cov_accumulate_(torch.zeros(4, 8)[:, :4], torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------
# conv_cov_accumulate_
# ---------------------------------------------------------------------------------------------

CONVS = [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
    nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3),
    nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
    nn.Conv2d(4, 4, 4, padding="same"),  # asymmetric zero padding
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular", stride=3),
    nn.Conv2d(2, 4, 5, padding="valid"),
    nn.Conv2d(40, 8, 5, padding=2),  # d = 1000: the tiled symmetric path
    nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2),
    nn.Conv1d(3, 3, 4, padding="same", padding_mode="replicate", dilation=2),
    # stride 1, dilation 1, wider layers: where the shifted cross-correlation form is likely taken
    nn.Conv1d(16, 5, 3, padding=1),
    nn.Conv2d(16, 4, (1, 5), padding=(0, 2)),
    nn.Conv2d(32, 4, (5, 3), padding=(2, 0), groups=2),
    nn.Conv2d(20, 4, 3, padding=1),
]


def conv_case(conv: nn.Module, images: int, x_dtype: torch.dtype = torch.float64, spatial: tuple[int, ...] | None = None):
    """Input ``x`` (rounded to ``x_dtype``), geometry, a symmetric non-zero starting statistic
    and the float64 oracle's result on the stored values of ``x``."""
    spatial = spatial or ((19, 17) if isinstance(conv, nn.Conv2d) else (300,))
    x = torch.randn(images, conv.in_channels, *spatial, dtype=torch.float64).to(x_dtype)
    geom = ConvGeometry.of(conv)
    d = conv.weight[0].numel()
    start = torch.stack([sym_poison(d, torch.float64, "cpu") for _ in range(conv.groups)])
    return x, geom, start, accumulate_conv_reference_(start.clone(), x.double(), geom)


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
def test_conv_cov_uses_bounded_memory_and_matches_with_many_chunks(monkeypatch):
    # 64 × 32 × 32 positions × d = 27: several chunks of the 4M-element buffer
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(64, 3, 128, 128)
    geom = ConvGeometry.of(conv)
    got = accumulate_conv_(torch.zeros(1, 27, 27, dtype=torch.float64), x, geom)
    ref = accumulate_conv_reference_(torch.zeros(1, 27, 27, dtype=torch.float64), x, geom)
    assert rel_err(got, ref) < 1e-12
    # the shifted form copies the images in chunks too: here one image per chunk
    monkeypatch.setenv("DEEPUNLEARN_CPU_CONV_CHUNK", str(16 * 34 * 34))
    monkeypatch.setenv("DEEPUNLEARN_CONV_SHIFT", "1")
    conv = nn.Conv2d(16, 4, 3, padding=1)
    x = torch.randn(5, 16, 32, 32)
    geom = ConvGeometry.of(conv)
    got = accumulate_conv_(torch.zeros(1, 144, 144, dtype=torch.float64), x, geom)
    ref = accumulate_conv_reference_(torch.zeros(1, 144, 144, dtype=torch.float64), x, geom)
    assert rel_err(got, ref) < 1e-12 and torch.equal(got, got.transpose(1, 2))


# Stride-1 geometries for the two exact forms of the conv op, each forced in turn: (conv, map).
# The shifted form reads whole rows of copies cut to the columns each shift has products in,
# never reads the conv's padding, and subtracts the real columns a window misses: these cases take
# every branch of that.
SHIFT_CASES = [
    (nn.Conv2d(3, 5, 3, padding=1), (19, 17)),
    (nn.Conv2d(7, 4, 3, padding=1), (9, 8)),  # channels not a multiple of the CPU scatter's 4-wide tiles
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), (19, 17)),  # depthwise
    (nn.Conv2d(4, 4, 4, padding="same"), (19, 17)),  # asymmetric zero padding (1, 2)
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (19, 17)),  # padded in Python: no zero columns
    (nn.Conv2d(2, 4, 5, padding="valid"), (19, 17)),
    (nn.Conv2d(3, 4, 3, padding=4), (6, 5)),  # padding wider than the kernel
    (nn.Conv2d(3, 4, 7, padding=3), (3, 2)),  # kernel wider than the map
    (nn.Conv2d(6, 4, 3, padding=1, groups=2), (1, 1)),  # one pixel: the centre tap only
    (nn.Conv2d(32, 4, (5, 3), padding=(2, 0), groups=2), (19, 17)),
    (nn.Conv2d(16, 4, (1, 5), padding=(0, 2)), (19, 17)),
    (nn.Conv1d(16, 5, 3, padding=1), (300,)),
]


# Strided, undilated geometries with overlapping windows: the CPU's phase form (a stride-1 conv
# over the input's phase images) against the gather, each forced.
PHASE_CASES = [
    (nn.Conv2d(3, 8, 7, stride=2, padding=3), (33, 30)),  # an ImageNet stem
    (nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), (15, 16)),  # strided depthwise
    (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2), (19, 17)),
    (nn.Conv2d(4, 4, (5, 2), stride=(2, 3), padding=(2, 1)), (11, 13)),  # k < s in one dim
    (nn.Conv2d(4, 4, 4, stride=2, padding="valid"), (4, 5)),  # one output row
    (nn.Conv2d(2, 4, 3, stride=3, padding=(0, 1), padding_mode="reflect"), (9, 9)),
    (nn.Conv2d(32, 8, 3, stride=2, padding=1), (9, 9)),  # wide: its phase conv's sums by GEMMs
    (nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2), (31,)),
]


@needs_ext
@pytest.mark.parametrize("phases", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("conv,spatial", PHASE_CASES, ids=[f"{i}" for i in range(len(PHASE_CASES))])
def test_strided_conv_phase_form_matches_float64_oracle(monkeypatch, phases, dtype, conv, spatial):
    monkeypatch.setenv("DEEPUNLEARN_CONV_PHASES", phases)
    if phases == "1":  # one image per chunk
        monkeypatch.setenv("DEEPUNLEARN_CPU_CONV_CHUNK", "1")
    x, geom, start, ref = conv_case(conv, 3, dtype, spatial=spatial)
    got = accumulate_conv_(start.to(dtype), x, geom)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(got.double(), ref) < tol and torch.equal(got, got.transpose(1, 2))


# Dilated stride-1 geometries, for the residue form (the shifted form over the residue images
# modulo the dilation). Maps whose size the dilation does not divide make runs of residues of two
# shapes; a dilation wider than the map leaves residues of padding only.
DILATED_CASES = [
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2), (16, 12)),  # one run per dimension
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2), (19, 17)),  # two runs per dimension
    (nn.Conv2d(3, 5, (3, 2), padding=(3, 1), dilation=(3, 2)), (13, 11)),
    (nn.Conv2d(6, 6, 3, padding=1, dilation=(1, 3), groups=3), (9, 14)),  # dilated in one dimension
    (nn.Conv2d(8, 8, 3, padding=4, dilation=4, groups=8), (14, 13)),  # depthwise
    (nn.Conv2d(4, 4, 3, padding="valid", dilation=3), (12, 10)),
    (nn.Conv2d(2, 4, 3, padding=5, dilation=5), (4, 6)),  # dilation wider than the map
    (nn.Conv2d(3, 4, 4, padding="same", dilation=3), (11, 10)),  # asymmetric zero padding (4, 5)
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect"), (10, 9)),  # padded in Python
    (nn.Conv2d(32, 8, 3, padding=2, dilation=2), (10, 10)),  # wide: sums by GEMMs
    (nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2), (31,)),
]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["shifted", "shifted-fused", "shifted-generic", "wgrad", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("conv,spatial", SHIFT_CASES + DILATED_CASES,
                         ids=[f"s{i}" for i in range(len(SHIFT_CASES))] + [f"d{i}" for i in range(len(DILATED_CASES))])
def test_shifted_and_gathered_forms_match_float64_oracle(monkeypatch, device, form, dtype, conv, spatial):
    # "shifted": its sums by GEMMs; "shifted-fused": by the CPU's one pass for few channels per
    # group (forced here at any width); "shifted-generic": the device-generic ATen path (what a
    # GPU runs) on the CPU. Dilated convs: the same over their residue images. "wgrad": the
    # weight-gradient form (stride-1, undilated convs; the others fall back to the gather).
    dev = device_or_skip(device)
    if form in ("shifted-fused", "shifted-generic") and device != "cpu":
        pytest.skip("a CPU path (the GPU runs the generic one anyway)")
    forced = "0" if form in ("gathered", "wgrad") else "1"
    monkeypatch.setenv("DEEPUNLEARN_CONV_SHIFT", forced)  # on a GPU, also allows the residue form at any width
    monkeypatch.setenv("DEEPUNLEARN_CONV_RESIDUES", forced)
    monkeypatch.setenv("DEEPUNLEARN_CONV_FUSED", "1" if form == "shifted-fused" else "0")
    monkeypatch.setenv("DEEPUNLEARN_CONV_SHIFT_GENERIC", "1" if form == "shifted-generic" else "0")
    monkeypatch.setenv("DEEPUNLEARN_CONV_WGRAD", "1" if form == "wgrad" else "0")
    if form in ("shifted-fused", "wgrad") or (form != "gathered" and max(conv.dilation) > 1):
        # one image (its residue images) per chunk: the first writes the sums, the others add to them
        monkeypatch.setenv("DEEPUNLEARN_CPU_CONV_CHUNK", "1")
        monkeypatch.setenv("DEEPUNLEARN_CUDA_CONV_CHUNK", "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the wgrad form's float32 precision
    x, geom, start, ref = conv_case(conv, 3, dtype, spatial=spatial)
    got, ran = with_wgrad_check(lambda: accumulate_conv_(start.to(device=dev, dtype=dtype), x.to(dev), geom))
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(got.cpu().double(), ref) < tol and torch.equal(got, got.transpose(1, 2))
    # the weight-gradient form ran exactly where it applies (else the gather answered for it)
    assert ran == (form == "wgrad" and max(conv.dilation) == 1 and conv.weight[0, 0].numel() > 1)


def with_wgrad_check(fn):
    """``fn()``'s result, and whether it ran the conv op's weight-gradient form (its one ATen call
    to ``convolution_backward``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, any(e.key == "aten::convolution_backward" for e in prof.key_averages())


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype,matmul_tf32,cudnn_tf32,taken", [
    (torch.float32, False, True, False),  # cuDNN would round more than cuBLAS may: declined
    (torch.float32, True, True, True),
    (torch.float32, False, False, True),
    (torch.bfloat16, False, True, True),  # widened to float32: exact in tf32 too
])
def test_wgrad_form_keeps_the_precision_torch_allows_on_cuda(monkeypatch, x_dtype, matmul_tf32, cudnn_tf32, taken):
    dev = device_or_skip("cuda")
    monkeypatch.setenv("DEEPUNLEARN_CONV_WGRAD", "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", matmul_tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn_tf32)
    x, geom, start, ref = conv_case(nn.Conv2d(16, 4, 3, padding=1), 3, x_dtype)
    got, ran = with_wgrad_check(lambda: accumulate_conv_(start.to(device=dev, dtype=torch.float32), x.to(dev), geom))
    tol = 2e-3 if x_dtype == torch.float32 and matmul_tf32 else 1e-5  # tf32 rounds float32 inputs
    assert rel_err(got.cpu().double(), ref) < tol and torch.equal(got, got.transpose(1, 2))
    assert ran == taken


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
    import deepunlearn.covariance as cv

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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sums", ["gemm", "fused"])
@pytest.mark.parametrize("layout", ["bf16", "channels-last", "strided", "chunks", "inference-mode"])
@pytest.mark.parametrize("form", ["shifted", "residues", "phases"])
def test_shifted_form_float32_statistics(monkeypatch, device, sums, layout, form):
    # float32 sums of bf16, channels-last, non-contiguous inputs; one image per chunk; under
    # inference mode (the op updates tensors it made itself in place). "fused": 3 channels per
    # group, where the CPU makes the sums in its fused pass. The form straight, over the residue
    # images of a dilated conv, over the phase images of a strided one.
    dev = device_or_skip(device)
    if (sums == "fused" or form == "phases") and device != "cpu":
        pytest.skip("the fused pass and the phase form are the CPU's")
    for knob in ("SHIFT", "RESIDUES", "PHASES"):
        monkeypatch.setenv(f"DEEPUNLEARN_CONV_{knob}", "1")
    monkeypatch.setenv("DEEPUNLEARN_CONV_FUSED", "1" if sums == "fused" else "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    options = {"shifted": {"padding": 1}, "residues": {"padding": 2, "dilation": 2},
               "phases": {"padding": 1, "stride": 2}}[form]
    conv = nn.Conv2d(20, 4, 3, **options) if sums == "gemm" else nn.Conv2d(12, 8, 3, groups=4, **options)
    x, geom, start, ref = conv_case(conv, 4, torch.bfloat16 if layout == "bf16" else torch.float32,
                                    spatial=(19, 21 if layout == "strided" else 17))
    if layout == "strided":  # every other column of a wider map
        x = x[..., ::2][..., :11]
        ref = accumulate_conv_reference_(start.clone(), x.double(), geom)
    if layout == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    if layout == "chunks":
        monkeypatch.setenv("DEEPUNLEARN_CPU_CONV_CHUNK", "1")
        monkeypatch.setenv("DEEPUNLEARN_CUDA_CONV_CHUNK", "1")
    with torch.inference_mode(layout == "inference-mode"):
        got = accumulate_conv_(start.to(device=dev, dtype=torch.float32), x.to(dev), geom)
    assert rel_err(got.cpu(), ref) < 1e-5 and torch.equal(got, got.transpose(1, 2))


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("knob,value,n,d", [("SYRK_TILE", v, 70, 385) for v in ("1", "128", "300")]
                         + [("SPLIT_K", v, 3001, 27) for v in ("2", "7", "1000")])
def test_cuda_symmetric_gemm_knobs(monkeypatch, knob, value, n, d):
    # SYRK_TILE: the kernels pick one full GEMM up to d = 1024; small tiles exercise the triangle of
    # tiles with ragged edges. SPLIT_K: slices of the rows in one strided-batched GEMM, then their
    # sum (7: rows left over go straight into cov; 1000: capped at 256 rows a slice). Both memory
    # layouts the GEMMs read, and the conv gather's.
    dev = device_or_skip("cuda")
    monkeypatch.setenv(f"DEEPUNLEARN_CUDA_{knob}", value)
    for x in (torch.randn(n, d, device=dev), torch.randn(d, n, device=dev).T):  # row- and column-major
        for dtype, cov_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
            xd = x.to(dtype)
            cov = sym_poison(d, cov_dtype, dev)
            ref = cov.double() + xd.double().T @ xd.double()
            _ext.ops().linear_cov_accumulate_(cov, xd)
            assert rel_err(cov, ref) < (1e-13 if cov_dtype == torch.float64 else 2e-3) and torch.equal(cov, cov.T)
    x, geom, start, ref = conv_case(CONVS[0], 40)  # d = 27, float64
    got = accumulate_conv_(start.to(dev), x.to(dev), geom)
    assert rel_err(got.cpu(), ref) < 1e-13


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("conv", [CONVS[1], CONVS[2], CONVS[8], CONVS[9], CONVS[14]],
                         ids=["strided-groups", "dilated", "d1000", "conv1d", "shifted"])
def test_cuda_conv_cov_many_small_chunks(monkeypatch, conv):
    # 1000-entry chunks: rows of a chunk rarely align with images or output rows (the shifted
    # form, taken for float64 statistics of stride-1 convs, then runs one image per chunk).
    dev = device_or_skip("cuda")
    monkeypatch.setenv("DEEPUNLEARN_CUDA_CONV_CHUNK", str(1000 + conv.weight[0].numel()))
    x, geom, start, ref = conv_case(conv, 5)
    got = accumulate_conv_(start.to(dev), x.to(dev), geom)
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
    ops = _ext.ops()
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(RuntimeError, match="C/groups"):
        ops.conv_cov_accumulate_(torch.zeros(1, 10, 10), x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="do not split into 3 groups"):
        ops.conv_cov_accumulate_(torch.zeros(3, 12, 12), x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.conv_cov_accumulate_(torch.zeros(1, 4 * 49, 4 * 49), x, [7, 7], [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="padding"):
        ops.conv_cov_accumulate_(torch.zeros(1, 36, 36), x, [3, 3], [1, 1], [1, 1], [1, 1])


# ---------------------------------------------------------------------------------------------
# projected_edit
# ---------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("g,o,d", [(1, 10, 7), (4, 3, 18), (1, 64, 600)])
def test_projected_edit_matches_float64_reference(device, dtype, g, o, d):
    dev = device_or_skip(device)
    w = torch.randn(g, o, d, dtype=torch.float64)
    m_r, m_f = (torch.linalg.qr(torch.randn(g, d, d, dtype=torch.float64))[0] for _ in range(2))
    m_r, m_f = m_r @ m_r.transpose(1, 2) * 0.5, m_f @ m_f.transpose(1, 2) * 0.3  # symmetric, non-trivial
    ref = edited_weight_reference(w, m_r, m_f)
    got = _ext.ops().projected_edit(w.to(dev, dtype), m_r.to(dev, dtype), m_f.to(dev, dtype))
    assert got.shape == w.shape and got.dtype == dtype
    tol = 1e-13 if dtype == torch.float64 else (1e-5 if dev.type == "cpu" else 2e-3)
    assert rel_err(got.cpu(), ref) < tol


@needs_ext
def test_projected_edit_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="shapes do not match"):
        _ext.ops().projected_edit(torch.randn(1, 3, 4), torch.randn(1, 5, 5), torch.randn(1, 5, 5))
    with pytest.raises(RuntimeError, match="share a dtype"):
        _ext.ops().projected_edit(torch.randn(1, 3, 4), torch.randn(1, 4, 4, dtype=torch.float64), torch.randn(1, 4, 4))


# ---------------------------------------------------------------------------------------------
# opcheck and end to end
# ---------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dev = device_or_skip(device)
    ops = _ext.ops()
    d = 12
    torch.library.opcheck(ops.linear_cov_accumulate_.default, (sym_poison(d, torch.float32, dev), torch.randn(5, d, device=dev)))
    torch.library.opcheck(
        ops.conv_cov_accumulate_.default,
        (torch.stack([sym_poison(18, torch.float32, dev)] * 2), torch.randn(2, 4, 5, 5, device=dev), [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    )
    torch.library.opcheck(
        ops.projected_edit.default,
        (torch.randn(2, 3, d, device=dev), torch.randn(2, d, d, device=dev), torch.randn(2, d, d, device=dev)),
    )


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_compile_in_one_graph(device, backend):
    # fullgraph: any graph break (an op dynamo or the fake kernels cannot trace) is an error; the
    # in-place ops must still write their inputs once functionalised, as in eager mode
    dev = device_or_skip(device)
    ops = _ext.ops()

    def step(cov, conv_cov, x, images, w, m_r, m_f):
        ops.linear_cov_accumulate_(cov, 2.0 * x)
        ops.conv_cov_accumulate_(conv_cov, images.relu(), [3, 3], [2, 1], [1, 0, 1, 1], [1, 2])
        return ops.projected_edit(w, m_r, m_f) + 1.0

    d = 12
    args = (sym_poison(d, torch.float32, dev), torch.stack([sym_poison(18, torch.float32, dev)] * 2),
            torch.randn(9, d, device=dev), torch.randn(3, 4, 7, 8, device=dev), torch.randn(2, 5, d, device=dev),
            torch.randn(2, d, d, device=dev), torch.randn(2, d, d, device=dev))
    eager_args = tuple(a.clone() for a in args)
    starts = tuple(a.clone() for a in args[:2])
    torch._dynamo.reset()
    # no cached graph: inductor compares the real outputs with the fake kernels' only when it compiles
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(step, fullgraph=True, backend=backend)(*args)
    expected = step(*eager_args)
    assert rel_err(out, expected) < 1e-6
    for got, want, start in zip(args[:2], eager_args[:2], starts):
        assert rel_err(got, want) < 1e-6 and rel_err(got, start) > 0.1  # written, as in eager mode


@needs_ext
def test_ops_compile_once_for_every_size():
    # dynamic shapes: the fake kernels hold for symbolic sizes, so new sizes reuse the one graph
    ops = _ext.ops()

    def step(cov, conv_cov, x, images, w, m_r, m_f):
        ops.linear_cov_accumulate_(cov, x)
        ops.conv_cov_accumulate_(conv_cov, images, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
        return ops.projected_edit(w, m_r, m_f)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    # no two sizes equal within a call: dynamo would take them for one symbol and recompile when they part
    for n, d, hw in ((5, 7, 9), (11, 13, 15), (17, 19, 21)):
        args = (sym_poison(d, torch.float64, "cpu"), torch.stack([sym_poison(18, torch.float64, "cpu")] * 2),
                torch.randn(n, d, dtype=torch.float64), torch.randn(n, 4, hw, hw + 1, dtype=torch.float64),
                torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, d, d, dtype=torch.float64),
                torch.randn(2, d, d, dtype=torch.float64))
        eager = tuple(a.clone() for a in args)
        assert rel_err(compiled(*args), step(*eager)) < 1e-12
        assert rel_err(args[0], eager[0]) < 1e-12 and rel_err(args[1], eager[1]) < 1e-12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@needs_ext
@pytest.mark.parametrize("forms", ["chosen", "forced", "wgrad"])
def test_unlearning_gives_the_same_model_with_and_without_the_extension(monkeypatch, forms):
    # "forced": the shifted, residue and phase forms wherever the geometry allows them; "wgrad": the
    # weight-gradient form for the stride-1, undilated convs
    if forms == "forced":
        for knob in ("SHIFT", "RESIDUES", "PHASES"):
            monkeypatch.setenv(f"DEEPUNLEARN_CONV_{knob}", "1")
    monkeypatch.setenv("DEEPUNLEARN_CONV_WGRAD", "1" if forms == "wgrad" else "0")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect"),
        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 9, 40), nn.ReLU(), nn.Linear(40, 5),
    ).double()
    x = torch.randn(20, 3, 6, 6, dtype=torch.float64)
    with_ext = deepunlearn.unlearn(model, x[:8], x[8:], inplace=False, **FIXED).model
    monkeypatch.setattr(_ext, "has_op", lambda name, device: False)
    without = deepunlearn.unlearn(model, x[:8], x[8:], inplace=False, **FIXED).model
    for (n, p), (_, q) in zip(with_ext.named_parameters(), without.named_parameters()):
        assert rel_err(p, q) < 1e-10, n


@needs_ext
@pytest.mark.cuda
def test_unlearning_on_cuda_matches_the_cpu():
    dev = device_or_skip("cuda")
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 36, 40), nn.ReLU(), nn.Linear(40, 5),
    ).double()
    x = torch.randn(20, 3, 6, 6, dtype=torch.float64)
    on_cpu = deepunlearn.unlearn(model, x[:8], x[8:], inplace=False, **FIXED).model
    kw = {"inplace": False, "dtype": torch.float64, **FIXED}  # the GPU's default statistics are float32
    on_gpu = deepunlearn.unlearn(model.to(dev), x[:8].to(dev), x[8:].to(dev), **kw).model
    for (n, p), (_, q) in zip(on_gpu.named_parameters(), on_cpu.named_parameters()):
        assert p.device.type == "cuda" and rel_err(p.cpu(), q) < 1e-10, n
    # float32 statistics (the GPU default) of a float64 model: float64 inputs rounded, then the same edit
    on_gpu32 = deepunlearn.unlearn(model.to(dev), x[:8].to(dev), x[8:].to(dev), inplace=False, **FIXED).model
    for (n, p), (_, q) in zip(on_gpu32.named_parameters(), on_cpu.named_parameters()):
        assert rel_err(p.cpu(), q) < 1e-5, n
