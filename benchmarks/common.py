"""Timing helpers and device ceilings shared by the benchmark scripts."""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall seconds of one call of ``fn`` (CUDA synchronised before and after) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# On a GPU a call is timed within a block of back-to-back calls lasting at least this long (seconds):
# a synchronised single launch costs tens of microseconds of host time that, in use, overlaps the
# GPU's work (the ops are queued behind the model's forward pass), yet would count fully against a
# 0.1 ms op. On the CPU every call is timed alone (its host time is its cost).
GPU_BLOCK_SECONDS = 2e-3


def calls_per_block(fn: Callable[[], object], device: torch.device) -> int:
    """How many back-to-back calls of ``fn`` make one timed block on ``device`` (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    return max(1, math.ceil(GPU_BLOCK_SECONDS / timed(fn, device)[0]))


def block_time(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Wall seconds per call of ``calls`` back-to-back calls of ``fn`` (CUDA synchronised around them)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def median_time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall seconds per call of ``fn`` over ``repeat`` blocks (``calls_per_block``) after one warm-up."""
    return paired_median_times([fn], device, repeat)[0]


def paired_median_times(fns: Sequence[Callable[[], object]], device: torch.device, repeat: int) -> list[float]:
    """Median wall seconds per call of each of ``fns`` over ``repeat`` rounds, one block of each
    (``calls_per_block``) per round in turn after one warm-up each: on a shared machine a load that
    comes and goes then slows every side alike, instead of whichever was being timed."""
    for fn in fns:
        fn()
    calls = [calls_per_block(fn, device) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, k, ts in zip(fns, calls, times):
            ts.append(block_time(fn, device, k))
    return [statistics.median(ts) for ts in times]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


@contextmanager
def tf32(enabled: bool, cudnn: bool | None = None) -> Iterator[None]:
    """tf32 for float32 matrix products (cuBLAS) and, unless ``cudnn`` says otherwise, convolutions
    (cuDNN): torch's switches, which the ops read too. The conv op's weight-gradient form takes a
    float32 input only where the two agree; a 16-bit input it widens, exact in tf32, so that its
    rows keep cuDNN's tf32 on (torch's default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled if cudnn is None else cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def ceilings(device: torch.device) -> dict[str, float]:
    """The device's copy bandwidth (GB/s, bytes read + written) and matrix-multiply rates (TFLOP/s),
    each the median of 5 runs on random data."""
    out = {}
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    out["copy_GBps"] = 2 * a.numel() * 4 / median_time(lambda: b.copy_(a), device, 5) / 1e9
    a = b = None  # free the copy buffers before the matrix products
    m = 8192 if device.type == "cuda" else 1024
    for name, dtype, use_tf32 in (("bf16_matmul_TFLOPs", torch.bfloat16, False), ("tf32_matmul_TFLOPs", torch.float32, True),
                                  ("fp32_matmul_TFLOPs", torch.float32, False)):
        x = torch.randn(m, m, device=device, dtype=dtype)
        with tf32(use_tf32):
            out[name] = 2 * m**3 / median_time(lambda: x @ x, device, 5) / 1e12
    return out


def write_results(stem: Path, result: dict, table: str) -> None:
    """``result`` as ``<stem>.json`` and ``table`` (Markdown) as ``<stem>.md``, the folder made if needed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(table)


# -- the suite's Fashion-MNIST cases, shared by the quality benchmarks --------------------------

QUALITY = {"forget": 1.0, "retain_drop": 1.0}  # the automatic choice's targets: test forget <= 1 %, retain within 1 point


def meets_quality(forget: float, retain_drop: float) -> bool:
    """Whether test forget accuracy and retain drop (percent, points) meet :data:`QUALITY`."""
    return forget <= QUALITY["forget"] and retain_drop <= QUALITY["retain_drop"]


CLASS_SETS = ([0], [2], [7], [0, 2], [0, 2, 7])  # one class at a time, then two and three at once
SUITE_EPOCHS = 4  # the suite's models


def suite_arguments(parser, out: Path, archs: Sequence[str] = ("smallcnn", "resnet18", "vit")) -> None:
    """``--archs``, ``--forget`` (repeatable class sets), ``--seed``, ``--cache-dir``, ``--data``, ``--test-images``,
    ``--out``."""
    from deepunlearn.experiments import CACHE_DIR

    parser.add_argument("--archs", nargs="+", default=list(archs))
    parser.add_argument("--forget", nargs="+", action="append", type=int, default=None,
                        help="a class set to forget (repeatable); default 0, 2, 7, then {0, 2} and {0, 2, 7}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="the suite's trained checkpoints")
    parser.add_argument("--data", type=Path, default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="measure on this many test-split images, as many of each class, the first ones "
                             "(default: all 10,000; fewer for a quick look, and the tables say so)")
    parser.add_argument("--out", type=Path, default=out)


def suite_data(root: Path | None = None, test_images: int | None = None):
    """``(train, labels, test)``: the suite's training split (its validation images held back), its
    labels, and the test split (the IDX files in ``root``, default Debian's), or of the test split
    the first ``test_images // 10`` images of each class."""
    from torch.utils.data import Subset

    from deepunlearn.sampling import dataset_labels
    from deepunlearn.experiments.fashion_mnist import fashion_mnist
    from deepunlearn.experiments.suite import VALIDATION

    full, test = fashion_mnist("train", root), fashion_mnist("test", root)
    train = Subset(full, range(len(full) - VALIDATION))
    if test_images is not None:
        test_labels = dataset_labels(test)
        classes = test_labels.unique()
        if not len(classes) <= test_images <= len(test):
            raise SystemExit(f"--test-images must be from {len(classes)} to {len(test)}, got {test_images}")
        first = [(test_labels == c).nonzero().flatten()[: test_images // len(classes)] for c in classes]
        test = Subset(test, torch.cat(first).sort().values.tolist())
    return train, dataset_labels(train), test


def measured_split_note(result: dict) -> list[str]:
    """The tables' line saying that only part of the test split was measured (none for all of it)."""
    n = result.get("test_images")
    return [] if n is None or n >= 10000 else [f"Measured on {n} images of the test split ({n // 10} from each class), "
                                               "not all 10,000: a quick look, not a result.", ""]


def suite_samples(train, labels: torch.Tensor, classes: Sequence[int], seed: int, per_class: int | None = None):
    """``(forget, retain)`` Subsets as the suite draws them: ``per_class`` images per kept class (the
    suite's ``SUITE_PER_CLASS`` by default), as many to forget."""
    from torch.utils.data import Subset

    from deepunlearn.experiments import SUITE_PER_CLASS
    from deepunlearn.sampling import draw_samples

    forget, retain = draw_samples(labels, classes, SUITE_PER_CLASS if per_class is None else per_class, None,
                                  seed + sum(classes))
    return Subset(train, forget), Subset(train, retain)


# Models from timm, which this project did not design or tune the automatic choice on: "timm-<key>" in --archs.
# Each is made for Fashion-MNIST's 1×28×28 images and trained as the suite trains its own.
TIMM_MODELS = {
    "resnet10t": {"model_name": "resnet10t"},  # BatchNorm, a three-convolution stem, 1×1 after its last stage
    # timm's ViT-Ti blocks (192 wide, three heads), six of them on 16 patches of 7×7 and a class token (twelve blocks
    # on 49 patches would train for two hours on two cores)
    "vit_tiny": {"model_name": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 7, "depth": 6},
    # group convolutions (8 channels a group), whose 3×3 taps past the map's edge read only padding: its last
    # stage runs at 1×1, where only the centre taps see data
    "regnetx_002": {"model_name": "regnetx_002"},
    # depthwise 3×3 and 5×5 convolutions, squeeze-and-excitation 1×1 convolutions on pooled features, hard-swish
    "mobilenetv3_small_100": {"model_name": "mobilenetv3_small_100"},
    # ConvNeXt blocks as convnext_tiny builds them: depthwise 7×7 convolutions, LayerNorm over channels, the MLP's
    # Linear layers on channels-last maps (conv_mlp off), layer scale; narrower and shallower than convnext_atto
    # (24-192 channels, two blocks a stage) and without the stem's stride (28×28 maps would run out by the last stage),
    # whose last two stages run their 7×7 kernels on 7×7 and 3×3 maps
    "convnext": {"model_name": "convnext_atto", "patch_size": 1, "depths": (2, 2, 2, 2), "dims": (24, 48, 96, 192),
                 "conv_mlp": False},
}


def suite_model(arch: str, train, seed: int, cache_dir: Path):
    """The suite's original model of ``arch`` (trained once, then loaded from ``cache_dir``); "timm-<key>"
    names a model of :data:`TIMM_MODELS`, trained on ``train`` the same way."""
    from deepunlearn.experiments.suite import cached_model

    build = None
    if arch.startswith("timm-"):
        import timm

        options = TIMM_MODELS[arch[len("timm-"):]]
        build = lambda: timm.create_model(**options, in_chans=1, num_classes=10)  # noqa: E731
    return cached_model(arch, train, SUITE_EPOCHS, seed, cache_dir, "original", build)[0]
