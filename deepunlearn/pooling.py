"""Max pooling for this package's own forward passes on the CPU: the same values as
``F.max_pool2d``, several times faster.

On the CPU, torch's ``max_pool2d`` of a contiguous ``(N, C, H, W)`` input computes the argmax
indices too and runs far below memory speed: 17 ms for VGG-11's first ``(100, 64, 32, 32)``
map, where the same maxima, taken as elementwise ``torch.maximum`` of the window's strided views
(rows first, then columns), take 2.1 ms; whole forward passes of VGG-11-BN at 32×32 and of the
suite's SmallCNN run 1.25× and 2.29× faster (``benchmarks/results/pooling_cpu.md``). A maximum is
exact in any order, and NaN propagates through both, so the result is identical. Collecting
statistics, scoring candidates and evaluating run inside :func:`~deepunlearn.collect.eval_no_grad`,
which has the model's ``nn.MaxPool2d`` layers pool here (:func:`pooling_by_maxima`); every call
this does not handle (indices, ceil mode, dilation, channels-last or non-CPU inputs) runs the
layer's own forward.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.utils import _pair


def _strided(x: torch.Tensor, dim: int, start: int, count: int, step: int) -> torch.Tensor:
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, start + (count - 1) * step + 1, step)
    return x[tuple(index)]


def _max_along(x: torch.Tensor, dim: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Max pooling of ``x`` along ``dim`` alone (floor mode; padding counts as ``-inf``), needs
    ``2·padding < kernel``: then the window's centre tap is inside the input for every output."""
    size = x.shape[dim]
    n = (size + 2 * padding - kernel) // stride + 1
    taps = []  # per kernel tap: the first and last output it is inside the input for, and its input start
    for i in range(kernel):
        first = max(0, -((i - padding) // stride))  # ceil((padding - i) / stride)
        last = min(n - 1, (size - 1 - i + padding) // stride)
        if last >= first:
            taps.append((first, last, first * stride + i - padding))
    whole = [t for t in taps if t[0] == 0 and t[1] == n - 1]
    parts = [t for t in taps if t not in whole]
    views = [_strided(x, dim, start, n, stride) for _, _, start in whole]
    out = torch.maximum(views[0], views[1]) if len(views) > 1 else views[0].clone(memory_format=torch.contiguous_format)
    for view in views[2:]:
        torch.maximum(out, view, out=out)
    for first, last, start in parts:
        part = out.narrow(dim, first, last - first + 1)
        torch.maximum(part, _strided(x, dim, start, last - first + 1, stride), out=part)
    return out


def fast_max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
                    return_indices: bool = False) -> torch.Tensor | None:
    """``F.max_pool2d(input, ...)`` computed separably by elementwise maxima, or None where this
    does not apply: indices asked for, ceil mode, dilation, padding of half the kernel or more,
    an input not a contiguous floating-point ``(N, C, H, W)`` or ``(C, H, W)`` tensor on the CPU."""
    kernel = _pair(kernel_size)
    step = _pair(stride) if stride is not None and _pair(stride) != () else kernel
    pad = _pair(padding)
    if (return_indices or ceil_mode or _pair(dilation) != (1, 1) or input.device.type != "cpu"
            or input.dim() not in (3, 4) or not input.is_floating_point() or not input.is_contiguous()
            or any(2 * p >= k for p, k in zip(pad, kernel)) or min(kernel) < 1 or min(step) < 1
            or any(size + 2 * p < k for size, p, k in zip(input.shape[-2:], pad, kernel))):
        return None
    rows = _max_along(input, -2, kernel[0], step[0], pad[0])
    return _max_along(rows, -1, kernel[1], step[1], pad[1])


def _pooling_forward(pool: nn.MaxPool2d):
    def forward(input: torch.Tensor) -> torch.Tensor:
        out = fast_max_pool2d(input, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                              pool.return_indices)
        return type(pool).forward(pool, input) if out is None else out
    return forward


@contextmanager
def pooling_by_maxima(model: nn.Module) -> Iterator[None]:
    """Inside, ``model``'s ``nn.MaxPool2d`` layers pool by :func:`fast_max_pool2d` where it applies
    (their own forward where not); their forwards are restored after, even on error. A layer whose
    forward is already replaced on the instance (a stand-in of :mod:`.frozen_prefix`), or of a
    subclass, is left as it is."""
    pools = [m for m in model.modules() if type(m) is nn.MaxPool2d and "forward" not in m.__dict__]
    for m in pools:
        m.forward = _pooling_forward(m)
    try:
        yield
    finally:
        for m in pools:
            m.__dict__.pop("forward", None)
