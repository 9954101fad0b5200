"""Each form of conv_cov_accumulate_ forced in turn against float64, and the choice among them."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from deepunlearn import ops as extension
from ext_cases import DEVICES, conv_case, device_or_skip, needs_ext, windows_overlap
from deepunlearn.ops.covariance import accumulate_conv_, accumulate_conv_reference_


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
@pytest.mark.parametrize("form", ["direct", "phases"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("conv,spatial", PHASE_CASES, ids=[f"{i}" for i in range(len(PHASE_CASES))])
def test_strided_conv_phase_form_matches_float64_oracle(form, dtype, conv, spatial):
    x, geom, start, ref = conv_case(conv, 3, dtype, spatial=spatial)
    if form == "phases" and not windows_overlap(conv.kernel_size, conv.stride):
        with pytest.raises(RuntimeError, match="the phase form needs a strided, undilated conv whose windows overlap"):
            accumulate_conv_(start.to(dtype), x, geom, form=form)
        return
    # one image per chunk: the first chunk writes the sums, the others add to them
    got = accumulate_conv_(start.to(dtype), x, geom, form=form, chunk_elements=1 if form == "phases" else 0)
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
@pytest.mark.parametrize("form", ["shifted/gemm", "shifted/fused", "shifted/generic", "wgrad", "direct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("conv,spatial", SHIFT_CASES + DILATED_CASES,
                         ids=[f"s{i}" for i in range(len(SHIFT_CASES))] + [f"d{i}" for i in range(len(DILATED_CASES))])
def test_each_form_matches_float64_oracle(monkeypatch, device, form, dtype, conv, spatial):
    # "shifted/…": its sums by GEMMs, by the CPU's one pass for few channels per group (forced here
    # at any width), or by the device-generic ATen path (what a GPU runs) on the CPU; dilated convs
    # take the same over their residue images. "wgrad": the weight-gradient form (stride-1,
    # undilated convs; asked for elsewhere, an error). "direct": the gather.
    dev = device_or_skip(device)
    dilated = max(conv.dilation) > 1
    if form.startswith("shifted/"):
        if device != "cpu" and form != "shifted/generic":
            pytest.skip("a CPU way of making the sums (the GPU makes the generic ones)")
        form = ("residues" if dilated else "shifted") + ("" if device != "cpu" else form[len("shifted"):])
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the wgrad form's float32 precision
    x, geom, start, ref = conv_case(conv, 3, dtype, spatial=spatial)
    start = start.to(device=dev, dtype=dtype)
    if form == "wgrad" and dilated:
        with pytest.raises(RuntimeError, match="weight-gradient form needs a stride-1, undilated conv"):
            accumulate_conv_(start, x.to(dev), geom, form=form)
        return
    # one image (its residue images) per chunk: the first writes the sums, the others add to them
    chunk = 1 if form in ("shifted/fused", "wgrad") or (form != "direct" and dilated) else 0
    run = lambda: accumulate_conv_(start, x.to(dev), geom, form=form, chunk_elements=chunk)  # noqa: E731
    # The weight-gradient form ran exactly where it was asked for. Profiled once per geometry and form
    # (the forms' control flow does not depend on the dtype), and not on the generic forms: profiling
    # their thousands of small ATen calls costs seconds a case, and they call no convolution.
    profiled = form == "wgrad" or (dtype == torch.float64 and not form.endswith("/generic"))
    got, ran = with_wgrad_check(run) if profiled else (run(), False)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(got.cpu().double(), ref) < tol and torch.equal(got, got.transpose(1, 2))
    assert ran == (form == "wgrad")


def with_wgrad_check(fn):
    """``fn()``'s result, and whether it ran the conv op's weight-gradient form (its one ATen call
    to ``convolution_backward``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, any(e.key == "aten::convolution_backward" for e in prof.key_averages())


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype,matmul_tf32,cudnn_tf32,taken", [
    (torch.float32, False, True, False),  # cuDNN would round more than cuBLAS may: refused
    (torch.float32, True, True, True),
    (torch.float32, False, False, True),
    (torch.bfloat16, False, True, True),  # widened to float32: exact in tf32 too
])
def test_wgrad_form_keeps_the_precision_torch_allows_on_cuda(monkeypatch, x_dtype, matmul_tf32, cudnn_tf32, taken):
    dev = device_or_skip("cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", matmul_tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn_tf32)
    x, geom, start, ref = conv_case(nn.Conv2d(16, 4, 3, padding=1), 3, x_dtype)
    start = start.to(device=dev, dtype=torch.float32)
    if not taken:
        with pytest.raises(RuntimeError, match="allow_tf32 differs"):
            accumulate_conv_(start, x.to(dev), geom, form="wgrad")
        return
    got, ran = with_wgrad_check(lambda: accumulate_conv_(start, x.to(dev), geom, form="wgrad"))
    tol = 2e-3 if x_dtype == torch.float32 and matmul_tf32 else 1e-5  # tf32 rounds float32 inputs
    assert rel_err(got.cpu().double(), ref) < tol and torch.equal(got, got.transpose(1, 2))
    assert ran


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sums", ["gemm", "fused"])
@pytest.mark.parametrize("layout", ["bf16", "channels-last", "strided", "chunks", "inference-mode"])
@pytest.mark.parametrize("form", ["shifted", "residues", "phases"])
def test_shifted_family_float32_statistics(monkeypatch, device, sums, layout, form):
    # float32 sums of bf16, channels-last, non-contiguous inputs; one image per chunk; under
    # inference mode (the op updates tensors it made itself in place). "fused": 3 channels per
    # group, where the CPU makes the sums in its fused pass. The form straight, over the residue
    # images of a dilated conv, over the phase images of a strided one.
    dev = device_or_skip(device)
    if (sums == "fused" or form == "phases") and device != "cpu":
        pytest.skip("the fused pass and the phase form are the CPU's")
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
    chosen = form if device != "cpu" else f"{form}/{sums}"
    with torch.inference_mode(layout == "inference-mode"):
        got = accumulate_conv_(start.to(device=dev, dtype=torch.float32), x.to(dev), geom, form=chosen,
                               chunk_elements=1 if layout == "chunks" else 0)
    assert rel_err(got.cpu(), ref) < 1e-5 and torch.equal(got, got.transpose(1, 2))


@needs_ext
@pytest.mark.parametrize("form,geometry,message", [
    ("fast", ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1]), "form must be 'auto', 'direct', 'shifted'"),
    ("direct/fused", ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1]), "only 'shifted', 'residues' and 'phases' make sums"),
    ("shifted/quick", ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1]), "the sums must be '/fused', '/gemm' or '/generic'"),
    ("shifted", ([3, 3], [2, 2], [1, 1, 1, 1], [1, 1]), "the shifted form needs a stride-1, undilated conv"),
    ("shifted", ([1, 1], [1, 1], [0, 0, 0, 0], [1, 1]), "of more than one tap"),
    ("residues", ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1]), "the residue form needs a stride-1, dilated conv"),
    ("phases", ([2, 2], [2, 2], [0, 0, 0, 0], [1, 1]), "whose windows overlap"),
    ("wgrad", ([3, 3], [2, 1], [1, 1, 1, 1], [1, 1]), "the weight-gradient form needs a stride-1, undilated conv"),
])
def test_a_form_the_conv_cannot_take_is_refused_by_name(form, geometry, message):
    x = torch.randn(2, 4, 6, 6)
    d = 4 * geometry[0][0] * geometry[0][1]
    cov = torch.zeros(1, d, d)
    with pytest.raises(RuntimeError, match=message):
        extension.library().conv_cov_accumulate_(cov, x, *geometry, form)
    assert cov.abs().max() == 0  # nothing written


# The CPU's choices on layers of the kernel benchmark (benchmarks/shapes.py; batch sizes as there),
# where each was measured fastest: the shifted form on every stride-1 layer (its sums in the fused
# pass for few channels per group), the phase form on strided layers with few channels per group,
# the residue form on dilated ones, the gather elsewhere.
CHOICES = [
    ((32, 3, 32, 3, 1, 1, 1), "shifted/fused"),  # ResNet-18 CIFAR stem
    ((32, 64, 32, 3, 1, 1, 1), "shifted/gemm"),
    ((32, 64, 32, 3, 2, 1, 1), "direct"),  # strided, 64 channels: no fused pass for its phase images
    ((2, 512, 14, 3, 1, 1, 1), "shifted/gemm"),
    ((8, 144, 56, 3, 1, 1, 144), "shifted/fused"),  # depthwise
    ((8, 96, 56, 7, 1, 1, 96), "shifted/fused"),
    ((8, 144, 56, 3, 2, 1, 144), "phases/fused"),  # strided depthwise
    ((8, 3, 224, 7, 2, 1, 1), "phases/fused"),  # ImageNet stem
    ((4, 256, 28, 3, 1, 2, 1), "residues/gemm"),
    ((8, 64, 28, 1, 1, 1, 1), "direct"),  # one tap
]


@needs_ext
@pytest.mark.parametrize("shape,chosen", CHOICES, ids=[c for _, c in CHOICES])
def test_the_cpu_chooses_the_forms_it_measured_fastest(shape, chosen):
    images, channels, size, k, stride, dilation, groups = shape
    x = torch.empty(images, channels, size, size)
    d = channels // groups * k * k
    cov = torch.empty(groups, d, d)
    geometry = ([k, k], [stride, stride], [dilation * (k // 2)] * 4, [dilation, dilation])
    assert extension.library().conv_cov_form(cov, x, *geometry) == chosen
    forced = "shifted/generic" if chosen.startswith("shifted") else chosen
    assert extension.library().conv_cov_form(cov, x, *geometry, forced) == forced  # a forced form is taken as asked
