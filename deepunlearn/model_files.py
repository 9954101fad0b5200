"""Read and write the model files the command line works on.

Two forms: a whole pickled module (``torch.save(model, path)``), or a torchvision architecture
name plus a state-dict file. Nothing is ever downloaded: without a weights file an architecture
is built at random initialisation (for tests and timing).
"""
from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, so that the edited one is written the same way.

    Attributes:
        arch: torchvision builder name (``"vit_b_16"``), or ``None`` for a pickled module.
        path: the weights or module file, or ``None`` for random initialisation.
        num_classes: output classes the architecture was built with.
    """

    arch: str | None
    path: str | None
    num_classes: int | None = None


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
    import torchvision

    names = set(torchvision.models.list_models())
    if source.arch not in names:
        close = sorted(n for n in names if source.arch.split("_")[0] in n)[:8]
        raise ValueError(f"unknown architecture {source.arch!r}" + (f" (did you mean one of {close}?)" if close else ""))
    kwargs = {} if source.num_classes is None else {"num_classes": source.num_classes}
    model = torchvision.models.get_model(source.arch, weights=None, **kwargs)
    if source.path is not None:
        try:
            state = torch.load(source.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read weights file {source.path!r}: {exc}") from exc
        state = _unwrap_state_dict(state, source.path)
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


def save_model(model: nn.Module, source: ModelSource, out: str | os.PathLike) -> None:
    """Write ``model`` as ``source`` was given: a state dict for an architecture, else the whole module.

    Tensors are written on the CPU, so the file loads on any machine (a whole module is moved
    there for the write and back afterwards when it sat on one device; one spread over several
    devices stays on the CPU). The file is written next to ``out`` and renamed over it, so an
    error never leaves half a file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.arch is not None:
        _write_atomically({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
        return
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    model.cpu()
    try:
        _write_atomically(model, out)
    finally:
        if len(devices) == 1:
            model.to(devices.pop())


def _write_atomically(payload: object, out: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
