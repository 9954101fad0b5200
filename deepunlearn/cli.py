"""The ``deepunlearn`` command (also ``python -m deepunlearn``).

Subcommands::

    deepunlearn forget   --arch vit_b_16 --weights vit.pth --data imagenet/train --forget 7 --out vit-7.pth
    deepunlearn evaluate --arch vit_b_16 --weights vit-7.pth --data imagenet/val --forget 7
    deepunlearn stats build --arch vit_b_16 --weights vit.pth --data imagenet/train --per-class 10 --out stats.pt
    deepunlearn forget   --arch vit_b_16 --weights vit.pth --stats stats.pt --forget 7 --out vit-7.pth
    deepunlearn stats show stats.pt
    deepunlearn suite --quick

Models are a torchvision or timm architecture plus a state dict in a torch file or safetensors
(``--arch`` or ``--timm``, ``--weights``) or a whole pickled module (``--model``); the edited
model is written the same way, with a JSON report next to it. Under ``torchrun`` the statistics are collected data-parallel and rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# -- shared arguments -------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
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


def _run_args(p: argparse.ArgumentParser, batch_size: int = 64) -> None:
    g = p.add_argument_group("running")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--image-size", type=int, default=224, help="centre crop size (short side resized to size*256/224)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _collect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autocast", choices=sorted(_AUTOCAST), default="none",
                   help="collect under torch.autocast with this dtype; statistics stay in --dtype")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="statistics and solve dtype (default: float32; float64 for a float64 model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample draws")


def _source(args: argparse.Namespace):
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


def _device(args: argparse.Namespace) -> torch.device:
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


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def _check_out(out: Path, overwrite: bool, *inputs: str | None, folder: bool = False) -> None:
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


def _init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); ``False`` when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or torch.distributed.is_initialized():
        return torch.distributed.is_initialized()
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _write_json(path: Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(blob, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _environment(device: torch.device) -> dict:
    from . import extension_info

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "extension": extension_info(),
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}


# -- forget -----------------------------------------------------------------------------------
def cmd_forget(args: argparse.Namespace) -> int:
    from . import ClassStatistics, collect_statistics, search_alphas, unlearn
    from .sampling import draw_samples
    from .distributed import shard
    from .image_tree import image_tree, loader, resolve_classes
    from .model_files import check_output_format, input_normalisation, load_model, save_model

    _check_positive(batch_size=args.batch_size, retain_per_class=args.retain_per_class, forget_samples=args.forget_samples,
                    image_size=args.image_size, search_per_class=args.search_per_class)
    source = _source(args)
    out = Path(args.out)
    check_output_format(source, out)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".json")
    _check_out(out, args.overwrite, source.path, args.stats, folder=source.library == "hf")
    _check_out(report_path, args.overwrite, source.path, args.stats)
    if args.stats is None and args.data is None:
        raise ValueError("give --data (an image tree to draw samples from) or --stats (a file from 'deepunlearn stats build')")
    if args.search and args.data is None and args.search_data is None:
        raise ValueError("--search needs held-out images of every class: give --data or --search-data")
    choosing = (args.alpha_r is None or args.alpha_f is None) and not args.search
    if choosing and args.stats is not None:
        raise ValueError("--stats holds sums, not images, so alpha cannot be chosen on held-out ones: give --alpha-r "
                         "and --alpha-f, or --search with --search-data")
    device = _device(args)
    _init_distributed(device)
    model = load_model(source, device)
    autocast, dtype, progress = _AUTOCAST[args.autocast], _DTYPES.get(args.dtype), not args.no_progress
    normalisation = input_normalisation(source)
    tree = image_tree(args.data, args.image_size, normalisation) if args.data else None
    timings: dict[str, float] = {}

    if args.stats is not None:
        store = ClassStatistics.load(args.stats)
        classes = resolve_classes(tree, args.forget) if tree is not None else _int_classes(args.forget)
        forget_in, retain_in = store.forget(classes), store.retain(classes)
        forget_in, retain_in = (s.to(device, dtype or s.dtype) for s in (forget_in, retain_in))
        drawn = {"statistics_file": args.stats, "stored_classes": len(store.classes)}
        forget_idx = retain_idx = []
    else:
        classes = resolve_classes(tree, args.forget)
        labels = torch.as_tensor(tree.targets)
        forget_idx, retain_idx = draw_samples(labels, classes, args.retain_per_class, args.forget_samples, args.seed)
        kw = dict(batch_size=args.batch_size, dtype=dtype, autocast=autocast, progress=progress)
        forget_data = loader(tree, shard(forget_idx), args.batch_size, args.workers, device)
        retain_data = loader(tree, shard(retain_idx), args.batch_size, args.workers, device)
        if choosing:  # unlearn holds out part of the images itself: it gets the images, not their statistics
            forget_in, retain_in = forget_data, retain_data
        else:
            t0 = time.perf_counter()
            kw["first_token"] = args.first_token == "yes"  # scales given: auto means every position
            forget_in = collect_statistics(model, forget_data, desc="forget", **kw)
            t1 = time.perf_counter()
            retain_in = collect_statistics(model, retain_data, desc="retain", **kw)
            timings.update(collect_forget=t1 - t0, collect_retain=time.perf_counter() - t1)
        drawn = {"data": args.data, "forget_images": len(forget_idx), "retain_images": len(retain_idx)}

    alpha_r, alpha_f, search = args.alpha_r, args.alpha_f, None
    if args.search:
        val_tree = image_tree(args.search_data, args.image_size, normalisation) if args.search_data else tree
        used = set() if args.search_data else set(forget_idx) | set(retain_idx)
        val = _held_out(torch.as_tensor(val_tree.targets), used, args.search_per_class, args.seed + 1)
        if not val:
            raise ValueError("no held-out image left for --search: every image of --data went into the samples; "
                             "pass --search-data DIR or draw fewer samples")
        t0 = time.perf_counter()
        search = search_alphas(model, forget_in, retain_in, loader(val_tree, val, args.batch_size, args.workers, device), classes,
                               batch_size=args.batch_size, dtype=dtype, progress=progress)
        timings["search"] = time.perf_counter() - t0
        alpha_r, alpha_f = search.alpha_r, search.alpha_f
        drawn["search_images"] = len(val)

    report = unlearn(model, forget_in, retain_in, alpha_r=alpha_r, alpha_f=alpha_f, alpha_f_head=args.alpha_f_head,
                     classes=classes, solver=args.solver,
                     batch_size=args.batch_size, dtype=dtype, autocast=autocast, progress=progress,
                     skip_first_layer={"auto": None, "skip": True, "edit": False}[args.first_layer],
                     first_token={"auto": None, "yes": True, "no": False}[args.first_token],
                     keep_retain_mean={"auto": None, "yes": True, "no": False}[args.keep_retain_mean],
                     refit_head={"auto": None, "yes": True, "no": False}[args.refit_head])
    if choosing:
        alpha_r, alpha_f = report.alpha_r, report.alpha_f
        timings.update({k: report.seconds[k] for k in ("collect_forget", "collect_retain", "choose_alpha")})
    timings.update(decompose=report.seconds["decompose"], edit=report.seconds["edit"])
    if _is_writer():
        save_model(report.model, source, out)
        blob = {"command": "forget", "forget_classes": classes, **drawn, "alpha_r": alpha_r, "alpha_f": alpha_f,
                "alpha_f_head": report.alpha_f_head, "autocast": args.autocast, "seconds": timings, "output": str(out),
                "search": None if search is None else search.table, "environment": _environment(device),
                "report": report.to_dict()}
        _write_json(report_path, blob)
        if report.alpha_choice is not None:
            print(report.alpha_choice)
        head = "" if report.alpha_f_head is None else f", alpha_f_head={report.alpha_f_head:g}"
        print(f"forgot class(es) {classes} with alpha_r={alpha_r:g}, alpha_f={alpha_f:g}{head}: "
              f"{len(report.layers)} weight matrices edited, {len(report.skipped)} skipped")
        print("time: " + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items()))
        print(f"wrote {out} and {report_path}")
    return 0


def _per_class(order: list[int], labels: torch.Tensor, per_class: int) -> list[int]:
    """The first ``per_class`` indices of every class in ``order``, sorted."""
    taken: dict[int, int] = {}
    out = []
    for i in order:
        c = int(labels[i])
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            out.append(i)
    return sorted(out)


def _held_out(labels: torch.Tensor, used: set[int], per_class: int, seed: int) -> list[int]:
    """Up to ``per_class`` random indices of every class, none of them in ``used``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    return _per_class([i for i in order if i not in used], labels, per_class)


def _int_classes(specs: list[str]) -> list[int]:
    try:
        return sorted({int(s) for s in specs})
    except ValueError as exc:
        raise ValueError(f"without --data, --forget takes class indices: {exc}") from exc


# -- evaluate ---------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import predictions
    from .image_tree import image_tree, loader, resolve_classes
    from .model_files import input_normalisation, load_model

    _check_positive(batch_size=args.batch_size, per_class=args.per_class, image_size=args.image_size)
    source = _source(args)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        _check_out(report_path, args.overwrite, source.path)
    device = _device(args)
    model = load_model(source, device)
    tree = image_tree(args.data, args.image_size, input_normalisation(source))
    classes = resolve_classes(tree, args.forget)
    labels = torch.as_tensor(tree.targets)
    idx = list(range(len(labels)))
    if args.per_class is not None:  # the first images of each class, in the tree's order
        idx = _per_class(idx, labels, args.per_class)
    probs, y = predictions(model, loader(tree, idx, args.batch_size, args.workers, device))
    hit = probs.argmax(1) == y
    is_f = torch.isin(y, torch.as_tensor(classes))
    per_class = {int(c): 100.0 * float(hit[y == c].float().mean()) for c in y.unique().tolist()}
    blob = {
        "command": "evaluate", "data": args.data, "forget_classes": classes, "images": len(y),
        "retain_images": int((~is_f).sum()), "forget_images": int(is_f.sum()),
        "retain_accuracy": 100.0 * float(hit[~is_f].float().mean()) if (~is_f).any() else None,
        "forget_accuracy": 100.0 * float(hit[is_f].float().mean()) if is_f.any() else None,
        "per_class_accuracy": per_class, "environment": _environment(device),
    }
    show = lambda v: "n/a" if v is None else f"{v:.2f} %"  # noqa: E731
    print(f"{blob['images']} images: retain accuracy {show(blob['retain_accuracy'])} ({blob['retain_images']}), "
          f"forget accuracy {show(blob['forget_accuracy'])} ({blob['forget_images']})")
    if report_path is not None:
        _write_json(report_path, blob)
        print(f"wrote {report_path}")
    return 0


# -- stats ------------------------------------------------------------------------------------
def cmd_stats_build(args: argparse.Namespace) -> int:
    from . import ClassStatistics
    from .image_tree import image_tree
    from .model_files import input_normalisation, load_model

    _check_positive(batch_size=args.batch_size, per_class=args.per_class, image_size=args.image_size)
    source = _source(args)
    out = Path(args.out)
    _check_out(out, args.overwrite, source.path)
    device = _device(args)
    _init_distributed(device)
    model = load_model(source, device)
    tree = image_tree(args.data, args.image_size, input_normalisation(source))
    t0 = time.perf_counter()
    store = ClassStatistics.collect(model, tree, per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                                    dtype=_DTYPES.get(args.dtype), autocast=_AUTOCAST[args.autocast], workers=args.workers,
                                    progress=not args.no_progress)
    if _is_writer():
        store.save(out)
        print(f"collected {len(store.classes)} classes in {time.perf_counter() - t0:.1f}s; wrote {out}")
    return 0


def cmd_stats_show(args: argparse.Namespace) -> int:
    from . import ClassStatistics, Statistics
    from .statistics import load_blob

    blob = load_blob(args.file)  # read once; its format field tells the two kinds apart
    source = repr(args.file)
    kind = blob.get("format") if isinstance(blob, dict) else None
    if kind == "deepunlearn.class_statistics":
        store = ClassStatistics.from_blob(blob, source)
        parts = list(store.per_class.values())
        stats = sum(parts[1:], parts[0])  # buffers summed over the classes
        info = {"file": args.file, "kind": "per-class statistics", "classes": store.classes,
                "samples_per_class": {c: s.samples for c, s in store.per_class.items()}}
    else:
        stats = Statistics.from_blob(blob, source)
        info = {"file": args.file, "kind": "statistics", "samples": stats.samples}
    info.update(fingerprint=stats.fingerprint, dtype=str(stats.dtype).replace("torch.", ""), checksum="verified",
                slots=stats.summary())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['kind']}, model fingerprint {info['fingerprint']}, checksum verified")
    if "classes" in info:
        counts = sorted(set(info["samples_per_class"].values()))
        print(f"{len(info['classes'])} classes ({_span(info['classes'])}), {'/'.join(map(str, counts))} samples per class")
    else:
        print(f"{info['samples']} samples")
    print(f"{len(info['slots'])} statistic buffers ({info['dtype']}):")
    print(f"  {'slot':<44} {'groups':>6} {'d':>6} {'vectors':>10} {'energy':>12}")
    for r in info["slots"]:
        shared = f"  shared by {', '.join(r['shared_by'])}" if r["shared_by"] else ""
        print(f"  {r['slot'][:44]:<44} {r['groups']:>6} {r['d']:>6} {r['vectors']:>10} {r['energy']:>12.4g}{shared}")
    return 0


def _span(classes: list[int]) -> str:
    return ", ".join(map(str, classes)) if len(classes) <= 8 else f"{classes[0]} ... {classes[-1]}"


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepunlearn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("forget", help="make a model forget classes, from an image tree or stored statistics")
    _model_args(f)
    f.add_argument("--data", help="training image tree root/<class>/<image> to draw the samples from")
    f.add_argument("--stats", help="per-class statistics from 'deepunlearn stats build' (no image is read)")
    f.add_argument("--forget", nargs="+", required=True, metavar="CLASS", help="class folder names or class indices")
    f.add_argument("--retain-per-class", type=int, default=1, help="retain images per kept class (paper, ImageNet: 1)")
    f.add_argument("--forget-samples", type=int, default=None,
                   help="forget images in all (default: as many as the retain sample, capped by the class)")
    f.add_argument("--alpha-r", type=float, default=None,
                   help="retain-space scale (paper, ImageNet: 100); default: chosen on held-out images of the samples")
    f.add_argument("--alpha-f", type=float, default=None, help="forget-space scale (paper, ImageNet: 10); default: chosen")
    f.add_argument("--alpha-f-head", type=float, default=None,
                   help="the classifier head's own forget scale; default: --alpha-f where given, else chosen with it")
    f.add_argument("--search", action="store_true", help="choose alpha_r, alpha_f on held-out images of --data")
    f.add_argument("--search-per-class", type=int, default=2, help="held-out images per class for --search")
    f.add_argument("--search-data", help="image tree to score --search on (default: images of --data not drawn)")
    f.add_argument("--solver", choices=["cholesky", "eigh", "svd"], default="cholesky")
    f.add_argument("--first-layer", choices=["auto", "skip", "edit"], default="auto",
                   help="the layer the input reaches first: auto (default) skips it when alpha is chosen, edits it when "
                        "both scales are given (the paper's procedure)")
    f.add_argument("--first-token", choices=["auto", "yes", "no"], default="auto",
                   help="statistics of sequence inputs (ViT tokens) from the first position only: auto (default) "
                        "scores both when alpha is chosen, no when both scales are given")
    f.add_argument("--keep-retain-mean", choices=["auto", "yes", "no"], default="auto",
                   help="shift each edited layer's bias so that its mean output over the retain images stays: auto "
                        "(default) with the first position's statistics when alpha is chosen, else no")
    f.add_argument("--refit-head", choices=["auto", "yes", "no"], default="auto",
                   help="correct the classifier head after the edit: its retained classes' rows re-fitted so that the "
                        "retain images keep the original logits where cross-validation shows it still forgetting, else "
                        "its bias shifted to keep the retained classes' shares: auto (default) when alpha is chosen; "
                        "needs the automatic choice")
    _collect_args(f)
    f.add_argument("--out", required=True, help="the edited model file (same form as the input)")
    f.add_argument("--report", help="JSON report (default: OUT.json)")
    f.add_argument("--overwrite", action="store_true", help="replace --out / --report if they exist")
    _run_args(f)
    f.set_defaults(func=cmd_forget)

    e = sub.add_parser("evaluate", help="accuracy on the retain and the forget classes of an image tree")
    _model_args(e)
    e.add_argument("--data", required=True, help="image tree root/<class>/<image> (e.g. the validation split)")
    e.add_argument("--forget", nargs="+", required=True, metavar="CLASS", help="class folder names or class indices")
    e.add_argument("--per-class", type=int, default=None, help="at most this many images per class (default: all)")
    e.add_argument("--report", help="write the numbers as JSON here")
    e.add_argument("--overwrite", action="store_true")
    _run_args(e, batch_size=128)
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("stats", help="per-class statistics: build once, answer many deletion requests")
    ssub = s.add_subparsers(dest="stats_command", required=True, metavar="ACTION")
    b = ssub.add_parser("build", help="collect statistics per class from an image tree")
    _model_args(b)
    b.add_argument("--data", required=True, help="training image tree root/<class>/<image>")
    b.add_argument("--per-class", type=int, default=10, help="images per class")
    _collect_args(b)
    b.add_argument("--out", required=True, help="statistics file to write")
    b.add_argument("--overwrite", action="store_true")
    _run_args(b)
    b.set_defaults(func=cmd_stats_build)
    sh = ssub.add_parser("show", help="what a statistics file holds (its checksum is verified)")
    sh.add_argument("file")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=cmd_stats_show)

    sub.add_parser("suite", help="the comparison suite against baselines (python -m deepunlearn.experiments.suite; --help there)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["suite"]:  # its own parser, options passed through untouched
        from .experiments.suite import main as suite_main

        return suite_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as exc:  # bad input, or an optional package missing (extras.require)
        print(f"deepunlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2
