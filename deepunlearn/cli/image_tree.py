"""ImageNet-style image folders: the class index of each folder, the usual evaluation transform, loaders.

A tree is ``root/<class>/<image>``. Folder names that are all integers are taken as the model's
class indices (a partial tree of a 1000-class problem keeps the right outputs); otherwise folders
are numbered in sorted order, which for ImageNet's ``n01440764``-style names is the standard
index order of torchvision's models.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Resize the short side to ``image_size·256/224``, centre-crop ``image_size``, normalise per
    channel (default: ImageNet's mean and std)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def image_tree(root: str | os.PathLike, image_size: int = 224,
               normalisation: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD)) -> Dataset:
    """A labelled dataset over ``root/<class>/<image>`` (``.targets`` holds the model class indices),
    images normalised with ``normalisation = (mean, std)``.

    Raises ``ValueError`` when ``root`` is not a folder or holds no class folder with images.
    """
    from torchvision.datasets import ImageFolder

    class _Tree(ImageFolder):
        def find_classes(self, directory):
            names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not names:
                raise FileNotFoundError(f"no class folder in {directory}")
            if all(n.isdigit() for n in names):
                return names, {n: int(n) for n in names}
            return names, {n: i for i, n in enumerate(names)}

    if not os.path.isdir(root):
        raise ValueError(f"the image folder {os.fspath(root)!r} does not exist")
    try:
        return _Tree(os.fspath(root), transform=eval_transform(image_size, *normalisation))
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision's words for an empty tree
        raise ValueError(f"{os.fspath(root)!r} is not an image tree root/<class>/<image>: {exc}") from exc


def resolve_classes(tree: Dataset, specs: Sequence[str | int]) -> list[int]:
    """Class indices for ``specs``, each a folder name of ``tree`` or a class index it holds."""
    by_name = tree.class_to_idx
    present = set(by_name.values())
    out = []
    for s in specs:
        s = str(s)
        if s in by_name:
            out.append(by_name[s])
        elif s.lstrip("-").isdigit() and int(s) in present:
            out.append(int(s))
        else:
            shown = ", ".join(list(by_name)[:10]) + (" ..." if len(by_name) > 10 else "")
            raise ValueError(f"class {s!r} is neither a folder of {tree.root!r} nor one of its class indices "
                             f"(folders: {shown})")
    return sorted(set(out))


def loader(dataset: Dataset, indices: Sequence[int] | None, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """Batches of ``dataset[indices]`` in order, with worker processes and pinned memory on GPUs."""
    subset = dataset if indices is None else Subset(dataset, list(indices))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)
