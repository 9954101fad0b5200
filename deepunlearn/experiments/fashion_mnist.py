"""Fashion-MNIST from its original IDX files, offline.

Debian's ``dataset-fashion-mnist`` package installs the four IDX ``.gz`` files under
``/usr/share/datasets/fashion-mnist/``; they are read directly. torchvision's downloader is
used only when no local copy exists and ``download=True``.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..extras import require

np = require("numpy", "metrics", "the Fashion-MNIST loader")

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Mean and standard deviation of the training images' pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} elements")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        for folder in (root, root / "FashionMNIST" / "raw"):
            if (folder / name).exists():
                return folder / name
    return None


class LabelledTensors(TensorDataset):
    """A ``TensorDataset`` of ``(image, label)`` that also exposes ``targets`` like torchvision."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.targets = labels


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = False) -> LabelledTensors:
    """Fashion-MNIST as normalised float32 images ``(N, 1, 28, 28)`` and int64 labels ``(N,)``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder holding the IDX files; default the Debian package's.
        download: when the files are absent, fetch them with torchvision into ``root`` (needs network).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or DEBIAN_ROOT)
    paths = [_find(root, stem) for stem in _FILES[split]]
    if None in paths:
        if not download:
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files not found under {root}; install them with "
                "`apt-get install -y dataset-fashion-mnist` or pass download=True"
            )
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
        paths = [_find(root, stem) for stem in _FILES[split]]
    images, labels = (read_idx(p) for p in paths)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return LabelledTensors((x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64)))
