"""``deepunlearn evaluate``: a model's accuracy on the forgotten and the kept classes of an image tree."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .forget import first_per_class
from .options import check_out, check_positive, device_of, environment_info, model_source, write_json


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation import predictions
    from .image_tree import image_tree, loader, resolve_classes
    from .model_files import input_normalisation, load_model

    check_positive(batch_size=args.batch_size, per_class=args.per_class, image_size=args.image_size)
    source = model_source(args)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        check_out(report_path, args.overwrite, source.path)
    device = device_of(args)
    model = load_model(source, device)
    tree = image_tree(args.data, args.image_size, input_normalisation(source))
    classes = resolve_classes(tree, args.forget)
    labels = torch.as_tensor(tree.targets)
    idx = list(range(len(labels)))
    if args.per_class is not None:  # the first images of each class, in the tree's order
        idx = first_per_class(idx, labels, args.per_class)
    probs, y = predictions(model, loader(tree, idx, args.batch_size, args.workers, device))
    hit = probs.argmax(1) == y
    is_f = torch.isin(y, torch.as_tensor(classes))
    per_class = {int(c): 100.0 * float(hit[y == c].float().mean()) for c in y.unique().tolist()}
    blob = {
        "command": "evaluate", "data": args.data, "forget_classes": classes, "images": len(y),
        "retain_images": int((~is_f).sum()), "forget_images": int(is_f.sum()),
        "retain_accuracy": 100.0 * float(hit[~is_f].float().mean()) if (~is_f).any() else None,
        "forget_accuracy": 100.0 * float(hit[is_f].float().mean()) if is_f.any() else None,
        "per_class_accuracy": per_class, "environment": environment_info(device),
    }
    show = lambda v: "n/a" if v is None else f"{v:.2f} %"  # noqa: E731
    print(f"{blob['images']} images: retain accuracy {show(blob['retain_accuracy'])} ({blob['retain_images']}), "
          f"forget accuracy {show(blob['forget_accuracy'])} ({blob['forget_images']})")
    if report_path is not None:
        write_json(report_path, blob)
        print(f"wrote {report_path}")
    return 0
