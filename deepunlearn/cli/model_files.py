"""Read and write the model files the command line works on.

Three forms: a whole pickled module (``torch.save(model, path)``); an architecture name (from
torchvision, or from timm) plus a state-dict file, a torch file (``.pth``/``.pt``) or safetensors
(``.safetensors``); or a Hugging Face model directory (``save_pretrained``: ``config.json`` and its
weights). Nothing is ever downloaded: without a weights file an architecture is built at random
initialisation (for tests and timing). The edited weights are written in the input's format.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..extras import require


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, so that the edited one is written the same way.

    Attributes:
        arch: architecture name (``"vit_b_16"``, or timm's ``"convnext_atto"``), or ``None`` for a
            pickled module or a Hugging Face directory.
        path: the weights or module file, the Hugging Face directory, or ``None`` for random initialisation.
        num_classes: output classes the architecture was built with.
        library: where the model is built from: ``"torchvision"``, ``"timm"`` or ``"hf"``.
    """

    arch: str | None
    path: str | None
    num_classes: int | None = None
    library: str = "torchvision"

    @property
    def safetensors(self) -> bool:
        """Whether the weights file is safetensors (by its suffix)."""
        return self.arch is not None and self.path is not None and Path(self.path).suffix == SAFETENSORS_SUFFIX


SAFETENSORS_SUFFIX = ".safetensors"
LIBRARIES = ("torchvision", "timm", "hf")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", SAFETENSORS_SUFFIX)  # names that say "a file", not a model directory


class HFClassifier(nn.Module):
    """A Hugging Face image classifier as a plain one: ``forward(x)`` returns its ``.logits``."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values).logits


def _load_hf(directory: str) -> nn.Module:
    transformers = require("transformers", "hf", "--hf")
    if not os.path.isdir(directory) or not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"--hf {directory!r} is not a save_pretrained directory (no config.json in it)")
    try:
        hf = transformers.AutoModelForImageClassification.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers' own words: unknown model type, missing or mismatched weights
        raise ValueError(f"cannot load the Hugging Face model in {directory!r}: {exc}") from exc
    return HFClassifier(hf)


def input_normalisation(source: ModelSource) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the model's inputs are normalised with: a Hugging Face
    directory's ``preprocessor_config.json`` where it has one, else ImageNet's."""
    from .image_tree import IMAGENET_MEAN, IMAGENET_STD

    config = Path(source.path or "") / "preprocessor_config.json"
    if source.library == "hf" and config.is_file():
        import json

        blob = json.loads(config.read_text())
        if "image_mean" in blob and "image_std" in blob:
            return tuple(blob["image_mean"]), tuple(blob["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state dict (name -> tensor)")
    prefix = "module."  # saved from DistributedDataParallel / DataParallel
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_model(source: ModelSource, device: torch.device | str = "cpu") -> nn.Module:
    """Build or unpickle the model ``source`` names, on ``device``, in eval mode.

    Raises ``ValueError`` for a missing file, an unknown architecture, a state dict that does not
    fit the architecture (the first mismatching keys are named), or a file of the wrong kind.
    """
    if source.library == "hf":
        return _load_hf(source.path).to(device).eval()
    if source.path is not None and not os.path.isfile(source.path):
        raise ValueError(f"model file {source.path!r} does not exist")
    if source.arch is None:
        if source.path is None:
            raise ValueError("name a model: --model FILE (a pickled module) or --arch NAME [--weights FILE]")
        try:  # a whole module needs unpickling of its classes: only open files you trust
            obj = torch.load(source.path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"cannot read model file {source.path!r}: {exc}") from exc
        if isinstance(obj, dict):
            raise ValueError(f"{source.path!r} holds a state dict, not a module: name its architecture with --arch and pass "
                             "the file as --weights")
        if isinstance(obj, torch.jit.ScriptModule):
            raise ValueError(f"{source.path!r} is a TorchScript module; deepunlearn needs the eager nn.Module (its hooks)")
        if not isinstance(obj, nn.Module):
            raise ValueError(f"{source.path!r} holds a {type(obj).__name__}, not an nn.Module")
        return obj.to(device).eval()
    model = _build(source)
    if source.path is not None:
        state = _unwrap_state_dict(_read_weights(source.path), source.path)
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            parts = [f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}"
                     for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
            raise ValueError(f"weights {source.path!r} do not fit {source.arch}: " + "; ".join(parts))
        model.load_state_dict(state)
    return model.to(device).eval()


def _build(source: ModelSource) -> nn.Module:
    """The architecture ``source`` names, at random initialisation (nothing downloaded)."""
    kwargs = {} if source.num_classes is None else {"num_classes": source.num_classes}
    if source.library == "timm":
        timm = require("timm", "timm", "--timm")
        if not timm.is_model(source.arch):
            close = timm.list_models(f"*{source.arch.split('_')[0]}*")[:8]
            raise ValueError(f"unknown timm architecture {source.arch!r}" + (f" (did you mean one of {close}?)" if close else ""))
        return timm.create_model(source.arch, pretrained=False, **kwargs)
    if source.library != "torchvision":
        raise ValueError(f"library must be one of {LIBRARIES}, got {source.library!r}")
    import torchvision

    names = set(torchvision.models.list_models())
    if source.arch not in names:
        close = sorted(n for n in names if source.arch.split("_")[0] in n)[:8]
        raise ValueError(f"unknown architecture {source.arch!r}" + (f" (did you mean one of {close}?)" if close else ""))
    return torchvision.models.get_model(source.arch, weights=None, **kwargs)


def _read_weights(path: str) -> object:
    """A weights file's contents: safetensors by its suffix, else a torch file (tensors only)."""
    try:
        if Path(path).suffix == SAFETENSORS_SUFFIX:
            return require("safetensors.torch", "safetensors", "a .safetensors weights file").load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read weights file {path!r}: {exc}") from exc


def check_output_format(source: ModelSource, out: str | os.PathLike) -> None:
    """Refuse an output name whose suffix says another format than the input's (before any work)."""
    if source.library == "hf":
        if Path(out).suffix in WEIGHT_SUFFIXES or Path(out).is_file():
            raise ValueError(f"--hf writes a model directory (save_pretrained), so name --out as a folder, not {str(out)!r}")
        return
    if source.arch is None or source.path is None:
        return
    if (Path(out).suffix == SAFETENSORS_SUFFIX) != source.safetensors:
        kind = "safetensors" if source.safetensors else "a torch file"
        raise ValueError(f"the weights are {kind} ({source.path!r}), so the edited weights are too: name --out "
                         + (f"with the {SAFETENSORS_SUFFIX} suffix" if source.safetensors else f"without the {SAFETENSORS_SUFFIX} suffix"))


def save_model(model: nn.Module, source: ModelSource, out: str | os.PathLike) -> None:
    """Write ``model`` as ``source`` was given: a state dict for an architecture, else the whole module.

    Tensors are written on the CPU, so the file loads on any machine (a whole module is moved
    there for the write and back afterwards when it sat on one device; one spread over several
    devices stays on the CPU). The file is written next to ``out`` and renamed over it, so an
    error never leaves half a file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.library == "hf":
        _save_pretrained_atomically(model.hf, out, Path(source.path))
        return
    if source.arch is not None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if source.safetensors:  # one contiguous tensor per name (tied weights are written twice)
            _write_atomically({k: v.contiguous().clone() for k, v in state.items()}, out, safetensors=True)
        else:
            _write_atomically(state, out)
        return
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    model.cpu()
    try:
        _write_atomically(model, out)
    finally:
        if len(devices) == 1:
            model.to(devices.pop())


def _save_pretrained_atomically(hf: nn.Module, out: Path, source: Path) -> None:
    """``hf.save_pretrained`` (with the source directory's image-processor settings) into a fresh
    folder next to ``out``, then moved into place (an existing ``out``, which the caller allowed to
    be replaced, is removed only once the new one is whole)."""
    import shutil

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = out.with_name(f".{out.name}.old")
    try:
        hf.save_pretrained(tmp)
        if (source / "preprocessor_config.json").is_file():
            shutil.copy2(source / "preprocessor_config.json", tmp / "preprocessor_config.json")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_atomically(payload: object, out: Path, safetensors: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if safetensors:
            require("safetensors.torch", "safetensors", "writing .safetensors").save_file(payload, tmp)
        else:
            torch.save(payload, tmp)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
