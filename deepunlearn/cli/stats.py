"""``deepunlearn stats build`` / ``show``: per-class statistics stored once, any deletion request answered
from them."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from .options import AUTOCAST, DTYPES, check_out, check_positive, device_of, init_distributed, is_writer, model_source


def cmd_stats_build(args: argparse.Namespace) -> int:
    from .. import ClassStatistics
    from .image_tree import image_tree
    from .model_files import input_normalisation, load_model

    check_positive(batch_size=args.batch_size, per_class=args.per_class, image_size=args.image_size)
    source = model_source(args)
    out = Path(args.out)
    check_out(out, args.overwrite, source.path)
    device = device_of(args)
    init_distributed(device)
    model = load_model(source, device)
    tree = image_tree(args.data, args.image_size, input_normalisation(source))
    t0 = time.perf_counter()
    store = ClassStatistics.collect(model, tree, per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                                    dtype=DTYPES.get(args.dtype), autocast=AUTOCAST[args.autocast], workers=args.workers,
                                    progress=not args.no_progress)
    if is_writer():
        store.save(out)
        print(f"collected {len(store.classes)} classes in {time.perf_counter() - t0:.1f}s; wrote {out}")
    return 0


def cmd_stats_show(args: argparse.Namespace) -> int:
    from .. import ClassStatistics, Statistics
    from ..statistics import load_blob

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
        print(f"{len(info['classes'])} classes ({class_span(info['classes'])}), {'/'.join(map(str, counts))} samples per class")
    else:
        print(f"{info['samples']} samples")
    print(f"{len(info['slots'])} statistic buffers ({info['dtype']}):")
    print(f"  {'slot':<44} {'groups':>6} {'d':>6} {'vectors':>10} {'energy':>12}")
    for r in info["slots"]:
        shared = f"  shared by {', '.join(r['shared_by'])}" if r["shared_by"] else ""
        print(f"  {r['slot'][:44]:<44} {r['groups']:>6} {r['d']:>6} {r['vectors']:>10} {r['energy']:>12.4g}{shared}")
    return 0


def class_span(classes: list[int]) -> str:
    return ", ".join(map(str, classes)) if len(classes) <= 8 else f"{classes[0]} ... {classes[-1]}"
