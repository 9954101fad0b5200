"""What the subcommands share: the model, run and collection options, the device, output checks, the
JSON report."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# -- shared arguments -------------------------------------------------------------------------
def model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of --model, --arch, --timm or --hf)")
    g.add_argument("--model", help="a whole pickled module (torch.save(model, path)); unpickling runs code: trust the file")
    g.add_argument("--arch", help="a torchvision architecture name, e.g. vit_b_16, resnet50")
    g.add_argument("--timm", metavar="NAME", help="a timm architecture name, e.g. convnext_tiny (pip install 'deepunlearn[timm]')")
    g.add_argument("--hf", metavar="DIR", help="a Hugging Face image classifier saved with save_pretrained (config.json and "
                                              "weights); the edited model is written as such a directory "
                                              "(pip install 'deepunlearn[hf]')")
    g.add_argument("--weights", help="state dict for --arch / --timm: a torch file or .safetensors; the edited weights "
                                     "are written in the same format (without it: random initialisation, for tests)")
    g.add_argument("--num-classes", type=int, default=None, help="outputs of --arch / --timm (default: the architecture's)")


def run_args(p: argparse.ArgumentParser, batch_size: int = 64) -> None:
    g = p.add_argument_group("running")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--image-size", type=int, default=224, help="centre crop size (short side resized to size*256/224)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def collect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autocast", choices=sorted(AUTOCAST), default="none",
                   help="collect under torch.autocast with this dtype; statistics stay in --dtype")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="statistics and solve dtype (default: float32; float64 for a float64 model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample draws")


def model_source(args: argparse.Namespace):
    from .model_files import ModelSource

    given = [name for name in ("model", "arch", "timm", "hf") if getattr(args, name) is not None]
    if len(given) != 1:
        raise ValueError("name the model with exactly one of --model FILE, --arch NAME, --timm NAME or --hf DIR")
    if (args.model is not None or args.hf is not None) and (args.weights or args.num_classes):
        raise ValueError(f"--weights and --num-classes go with --arch or --timm, not with --{given[0]}")
    if args.model is not None:
        return ModelSource(None, args.model)
    if args.hf is not None:
        return ModelSource(None, args.hf, library="hf")
    library = "timm" if args.timm is not None else "torchvision"
    return ModelSource(args.arch or args.timm, args.weights, args.num_classes, library)


def device_of(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def check_out(out: Path, overwrite: bool, *inputs: str | None, folder: bool = False) -> None:
    """Refuse, before any work, to overwrite an input or an existing output (unless asked);
    ``folder``: the output is a model directory, else a file."""
    for i in inputs:
        if i is not None and os.path.exists(i) and os.path.exists(out) and os.path.samefile(i, out):
            raise ValueError(f"--out {str(out)!r} is an input {'folder' if os.path.isdir(i) else 'file'}; "
                             "write the result elsewhere")
        if i is not None and folder and Path(i).resolve().is_relative_to(out.resolve()):
            raise ValueError(f"--out {str(out)!r} holds the input {i!r}; write the result elsewhere")
    if out.exists() and not overwrite:
        raise ValueError(f"{str(out)!r} exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir() != folder:
        raise ValueError(f"--out {str(out)!r} is a folder; name a file" if not folder else
                         f"--out {str(out)!r} is a file; name a folder for the model directory")


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); ``False`` when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or torch.distributed.is_initialized():
        return torch.distributed.is_initialized()
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def write_json(path: Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(blob, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def environment_info(device: torch.device) -> dict:
    from .. import extension_info

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "extension": extension_info(),
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
