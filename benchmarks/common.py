"""Timing helpers and device ceilings shared by the benchmark scripts."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

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


def median_time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    fn()
    return statistics.median(timed(fn, device)[0] for _ in range(repeat))


def paired_median_times(fns: Sequence[Callable[[], object]], device: torch.device, repeat: int) -> list[float]:
    """Median wall seconds of each of ``fns`` over ``repeat`` rounds, one run of each per round in
    turn after one warm-up each: on a shared machine a load that comes and goes then slows every
    side alike, instead of whichever was being timed."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            ts.append(timed(fn, device)[0])
    return [statistics.median(ts) for ts in times]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """cuBLAS's tf32 mode for float32 matrix products (torch's switch, which the ops read too)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def env(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, leave) an environment variable for the block; the ops read their tuning knobs from it."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


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
