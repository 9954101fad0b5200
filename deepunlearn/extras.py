"""Optional dependencies. The library's core needs torch and tqdm only; each extra adds what one
job needs, and a missing one is named with the pip command that installs it."""
from __future__ import annotations

import importlib
from types import ModuleType

# extra -> the distributions it installs (pyproject.toml's optional-dependencies say the same)
EXTRAS = {
    "metrics": ("numpy", "scikit-learn", "matplotlib"),  # membership inference, the suite, figures
    "timm": ("timm", "safetensors"),  # --timm models, .safetensors weights
    "hf": ("transformers", "safetensors"),  # --hf model directories
    "safetensors": ("safetensors",),  # .safetensors weights for a torchvision architecture
}


def require(module: str, extra: str, why: str) -> ModuleType:
    """Import ``module``, or raise ``ImportError`` saying that ``why`` needs it and which extra installs it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(f"{why} needs the optional package {package!r}: pip install 'deepunlearn[{extra}]' "
                          f"(or 'deepunlearn[all]')") from None
