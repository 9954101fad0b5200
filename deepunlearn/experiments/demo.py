"""The main job: train a small CNN on Fashion-MNIST (cached), forget one class, report.

    python -m deepunlearn.experiments.demo --forget-class 0

Prints original vs unlearned accuracy on retain and forget classes (train and test),
SVC-MIA efficacy on the forget samples and the time taken, and writes the same table as
JSON and a PNG figure to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from .. import forget_classes
from . import CACHE_DIR
from .fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist
from ..evaluation import evaluate_forgetting, measure
from ..extras import require
from .models import SmallCNN
from .training import train_classifier

VALIDATION = 5000  # last training images, never trained on (as in the suite)
ROWS = [("retain_train", "retain acc, train (%)"), ("forget_train", "forget acc, train (%)"),
        ("retain_test", "retain acc, test (%)"), ("forget_test", "forget acc, test (%)"),
        ("mia", "MIA efficacy on forget (%)")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepunlearn.experiments.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forget-class", type=int, nargs="+", default=[0], help="class index(es) 0-9 to forget (default 0, T-shirt/top)")
    p.add_argument("--alpha-r", type=float, default=None, help="retain scale; with --alpha-f, fixes both (default: chosen automatically)")
    p.add_argument("--alpha-f", type=float, default=None, help="forget scale; with --alpha-r, fixes both")
    p.add_argument("--retain-per-class", type=int, default=100, help="retain samples per kept class (paper: 100)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs of the original model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for demo.json and demo.png")
    p.add_argument("--data", type=Path, default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    a = p.parse_args(argv)
    if (a.alpha_r is None) != (a.alpha_f is None):
        p.error("give both --alpha-r and --alpha-f, or neither (then they are chosen automatically)")
    bad = [c for c in a.forget_class if not 0 <= c < 10]
    if bad:
        p.error(f"--forget-class must be in 0..9, got {bad}")
    return a


def original_model(train: Subset, args: argparse.Namespace) -> SmallCNN:
    """The trained model, from the cache when a checkpoint of the same settings exists."""
    path = args.cache_dir / f"fmnist_smallcnn_e{args.epochs}_s{args.seed}.pt"
    model = SmallCNN()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            print(f"loaded cached model {path}")
            return model.eval()
        except (RuntimeError, OSError, ValueError) as exc:  # stale or corrupt cache: retrain
            print(f"ignoring unreadable checkpoint {path}: {exc}")
    print(f"training SmallCNN on {len(train)} Fashion-MNIST images for {args.epochs} epochs (CPU)...")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train_classifier(model, train, epochs=args.epochs, seed=args.seed, progress=True)
    print(f"trained in {time.perf_counter() - t0:.0f}s; checkpoint {path}")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def format_table(original: dict, unlearned: dict, seconds: float, peak_mb: float) -> str:
    lines = [f"{'':<28}{'original':>10}{'unlearned':>11}"]
    lines += [f"{label:<28}{original[k]:>10.2f}{unlearned[k]:>11.2f}" for k, label in ROWS]
    lines.append(f"{'unlearning time (s)':<28}{'':>10}{seconds:>11.2f}")
    lines.append(f"{'unlearning peak memory (MB)':<28}{'':>10}{peak_mb:>11.1f}")
    return "\n".join(lines)


def plot(original: dict, unlearned: dict, title: str, path: Path) -> None:
    require("matplotlib", "metrics", "the demo's figure").use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label.replace(" (%)", "") for _, label in ROWS]
    x = np.arange(len(ROWS))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, [original[k] for k, _ in ROWS], 0.4, label="original")
    ax.bar(x + 0.2, [unlearned[k] for k, _ in ROWS], 0.4, label="unlearned (deepunlearn)")
    ax.set_xticks(x, labels, rotation=15, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 125)  # head room for the legend above the bars
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    full_train = fashion_mnist("train", args.data)
    test = fashion_mnist("test", args.data)
    n = len(full_train)
    train = Subset(full_train, range(n - VALIDATION))
    forget = sorted(set(args.forget_class))
    names = ", ".join(f"{c} ({FASHION_MNIST_CLASSES[c]})" for c in forget)
    model = original_model(train, args)

    print("evaluating the original model...")
    before = evaluate_forgetting(model, train, test, forget, seed=args.seed)

    if args.alpha_r is None:
        print("forgetting, alpha chosen automatically on held-out forget / retain samples...")
    with measure("cpu") as m:
        report = forget_classes(model, train, forget, retain_per_class=args.retain_per_class, seed=args.seed,
                                alpha_r=args.alpha_r, alpha_f=args.alpha_f, inplace=False)
    if report.alpha_choice is not None:
        print(report.alpha_choice)
        args.alpha_r, args.alpha_f = report.alpha_r, report.alpha_f
    print("evaluating the unlearned model...")
    after = evaluate_forgetting(report.model, train, test, forget, seed=args.seed)

    title = f"Fashion-MNIST, SmallCNN: forgetting class {names}"
    table = format_table(before, after, m.seconds, m.peak_bytes / 2**20)
    head = "" if report.alpha_f_head is None else f", alpha_f_head={report.alpha_f_head:g}"
    print(f"\n{title}\nalpha_r={args.alpha_r:g}, alpha_f={args.alpha_f:g}{head}, "
          f"{report.forget_samples} forget / {report.retain_samples} retain samples\n{table}\n")
    print(f"time split: {', '.join(f'{k} {v:.3f}s' for k, v in report.seconds.items())}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "dataset": "Fashion-MNIST", "model": "SmallCNN", "forget_classes": forget,
        "alpha_r": args.alpha_r, "alpha_f": args.alpha_f, "alpha_f_head": report.alpha_f_head,
        "original": before, "unlearned": after,
        "unlearn_seconds": m.seconds, "unlearn_peak_bytes": m.peak_bytes,
        "report": report.to_dict(),
        "torch": torch.__version__,
    }
    (args.out / "demo.json").write_text(json.dumps(result, indent=2))
    plot(before, after, title, args.out / "demo.png")
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
