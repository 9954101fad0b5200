"""``deepunlearn forget``: draw forget and retain samples (or read stored statistics), unlearn, write
the edited model and its report."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .options import (AUTOCAST, DTYPES, check_out, check_positive, device_of, environment_info, init_distributed, is_writer,
                      model_source, write_json)


def cmd_forget(args: argparse.Namespace) -> int:
    from .. import ClassStatistics, collect_statistics, search_alphas, unlearn
    from ..sampling import draw_samples
    from ..distributed import shard
    from .image_tree import image_tree, loader, resolve_classes
    from .model_files import check_output_format, input_normalisation, load_model, save_model

    check_positive(batch_size=args.batch_size, retain_per_class=args.retain_per_class, forget_samples=args.forget_samples,
                    image_size=args.image_size, search_per_class=args.search_per_class)
    source = model_source(args)
    out = Path(args.out)
    check_output_format(source, out)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".json")
    check_out(out, args.overwrite, source.path, args.stats, folder=source.library == "hf")
    check_out(report_path, args.overwrite, source.path, args.stats)
    if args.stats is None and args.data is None:
        raise ValueError("give --data (an image tree to draw samples from) or --stats (a file from 'deepunlearn stats build')")
    if args.search and args.data is None and args.search_data is None:
        raise ValueError("--search needs held-out images of every class: give --data or --search-data")
    choosing = (args.alpha_r is None or args.alpha_f is None) and not args.search
    if choosing and args.stats is not None:
        raise ValueError("--stats holds sums, not images, so alpha cannot be chosen on held-out ones: give --alpha-r "
                         "and --alpha-f, or --search with --search-data")
    device = device_of(args)
    init_distributed(device)
    model = load_model(source, device)
    autocast, dtype, progress = AUTOCAST[args.autocast], DTYPES.get(args.dtype), not args.no_progress
    normalisation = input_normalisation(source)
    tree = image_tree(args.data, args.image_size, normalisation) if args.data else None
    timings: dict[str, float] = {}

    if args.stats is not None:
        store = ClassStatistics.load(args.stats)
        classes = resolve_classes(tree, args.forget) if tree is not None else int_classes(args.forget)
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
        val = held_out_indices(torch.as_tensor(val_tree.targets), used, args.search_per_class, args.seed + 1)
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
    if is_writer():
        save_model(report.model, source, out)
        blob = {"command": "forget", "forget_classes": classes, **drawn, "alpha_r": alpha_r, "alpha_f": alpha_f,
                "alpha_f_head": report.alpha_f_head, "autocast": args.autocast, "seconds": timings, "output": str(out),
                "search": None if search is None else search.table, "environment": environment_info(device),
                "report": report.to_dict()}
        write_json(report_path, blob)
        if report.alpha_choice is not None:
            print(report.alpha_choice)
        head = "" if report.alpha_f_head is None else f", alpha_f_head={report.alpha_f_head:g}"
        print(f"forgot class(es) {classes} with alpha_r={alpha_r:g}, alpha_f={alpha_f:g}{head}: "
              f"{len(report.layers)} weight matrices edited, {len(report.skipped)} skipped")
        print("time: " + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items()))
        print(f"wrote {out} and {report_path}")
    return 0


def first_per_class(order: list[int], labels: torch.Tensor, per_class: int) -> list[int]:
    """The first ``per_class`` indices of every class in ``order``, sorted."""
    taken: dict[int, int] = {}
    out = []
    for i in order:
        c = int(labels[i])
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            out.append(i)
    return sorted(out)


def held_out_indices(labels: torch.Tensor, used: set[int], per_class: int, seed: int) -> list[int]:
    """Up to ``per_class`` random indices of every class, none of them in ``used``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    return first_per_class([i for i in order if i not in used], labels, per_class)


def int_classes(specs: list[str]) -> list[int]:
    try:
        return sorted({int(s) for s in specs})
    except ValueError as exc:
        raise ValueError(f"without --data, --forget takes class indices: {exc}") from exc
