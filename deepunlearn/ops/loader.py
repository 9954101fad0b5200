"""Load the compiled extension (``deepunlearn._C``) when it was built, and say what it holds.

Set ``DEEPUNLEARN_DISABLE_EXT=1`` to force the pure-PyTorch path.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .fakes import register_fakes


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    """Import the extension once; return (loaded, why-not)."""
    if os.environ.get("DEEPUNLEARN_DISABLE_EXT", "") not in ("", "0"):
        return False, "disabled by DEEPUNLEARN_DISABLE_EXT"
    try:
        from .. import _C  # noqa: F401  (importing registers the ops with torch.library)
    except ImportError as exc:
        return False, f"not built ({exc})"
    built = getattr(_C, "BUILT_WITH_TORCH", None)
    if built is not None and built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"deepunlearn's extension was built with torch {built} but torch {torch.__version__} is installed; "
            "rebuild it with `pip install --no-build-isolation -e .` (or set DEEPUNLEARN_DISABLE_EXT=1)"
        )
    register_fakes()
    return True, ""


def loaded() -> bool:
    return _load()[0]


def library() -> Any:
    """``torch.ops.deepunlearn``, after loading the extension (error if it cannot be loaded)."""
    ok, why = _load()
    if not ok:
        raise RuntimeError(f"deepunlearn's extension is not available: {why}")
    return torch.ops.deepunlearn


_force_pure = False


@contextmanager
def pure_path() -> Iterator[None]:
    """Inside this block every op runs its pure-PyTorch twin (for side-by-side comparisons)."""
    global _force_pure
    saved, _force_pure = _force_pure, True
    try:
        yield
    finally:
        _force_pure = saved


def has_op(name: str, device: torch.device) -> bool:
    """True when the extension is loaded, not switched off by :func:`pure_path`, and ``name`` has a
    kernel for ``device``'s type."""
    if _force_pure or not loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"deepunlearn::{name}", key)


def extension_info() -> dict[str, Any]:
    """What the installed package can run: extension loaded, CUDA kernels compiled in, versions."""
    ok, why = _load()
    info: dict[str, Any] = {"extension_loaded": ok, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not ok:
        info["reason"] = why
        info["cuda_kernels"] = False
        return info
    from .. import _C

    info["built_with_torch"] = getattr(_C, "BUILT_WITH_TORCH", None)
    info["built_with_cuda"] = getattr(_C, "BUILT_WITH_CUDA", None)
    info["cuda_kernels"] = bool(getattr(_C, "BUILT_WITH_CUDA", None))
    return info
