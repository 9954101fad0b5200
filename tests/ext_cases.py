"""What the tests of the compiled ops share: which devices, a non-zero symmetric start, the conv
cases and their float64 oracle."""
import os

import pytest
import torch
from torch import nn

from deepunlearn import ops as extension
from deepunlearn.ops.covariance import accumulate_conv_reference_
from deepunlearn.patches import ConvGeometry

PURE_BUILD = os.environ.get("DEEPUNLEARN_NO_EXT", "0") not in ("", "0") or os.environ.get("DEEPUNLEARN_DISABLE_EXT", "0") not in ("", "0")


needs_ext = pytest.mark.skipif(not extension.loaded(), reason="extension not built or disabled")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def device_or_skip(device: str) -> torch.device:
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")
        if not extension.has_op("linear_cov_accumulate_", torch.device("cuda")):
            pytest.fail("a GPU is present but the extension has no CUDA kernels")
    return torch.device(device)


def sym_poison(d, dtype, device):
    """A non-zero symmetric starting value: the op must add to it, not overwrite it."""
    a = torch.randn(d, d, dtype=torch.float64)
    s = a @ a.T / d + 3.0
    return ((s + s.T) / 2).to(dtype=dtype, device=device)  # exactly symmetric, whatever the GEMM rounded


TOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


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


def windows_overlap(kernel, stride) -> bool:
    """Whether a strided conv's windows overlap in some dimension (the phase form's condition)."""
    return any(k > s for k, s in zip(kernel, stride))


def conv_case(conv: nn.Module, images: int, x_dtype: torch.dtype = torch.float64, spatial: tuple[int, ...] | None = None):
    """Input ``x`` (rounded to ``x_dtype``), geometry, a symmetric non-zero starting statistic
    and the float64 oracle's result on the stored values of ``x``."""
    spatial = spatial or ((19, 17) if isinstance(conv, nn.Conv2d) else (300,))
    x = torch.randn(images, conv.in_channels, *spatial, dtype=torch.float64).to(x_dtype)
    geom = ConvGeometry.of(conv)
    d = conv.weight[0].numel()
    start = torch.stack([sym_poison(d, torch.float64, "cpu") for _ in range(conv.groups)])
    return x, geom, start, accumulate_conv_reference_(start.clone(), x.double(), geom)
