"""The default solve against the float64 eigen reference, in test accuracy of the unlearned models.

    python benchmarks/check_solver_accuracy.py

The suite's three Fashion-MNIST models (cached as the suite caches them) forget classes 0, 2 and 7
with the suite's samples and a fixed pair (α_r = 100, α_f = 3): once by the default solve (float32
statistics, each side the cheapest way: sample space, Cholesky factor, sketch or formed), once with
float64 statistics and every M formed by ``eigh`` (the reference). Reported: the test retain and
forget accuracies of both and their differences (target: within 0.1 point), and the largest
relative difference of any layer's weight change. Results: ``benchmarks/results/solver_accuracy_cpu.json``
and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_results  # noqa: E402
import deepunlearn  # noqa: E402
from deepunlearn.api import class_balanced_indices, dataset_labels  # noqa: E402
from deepunlearn.data import fashion_mnist  # noqa: E402
from deepunlearn.evaluation import class_accuracies, predictions  # noqa: E402
from deepunlearn.layers import find_targets  # noqa: E402
from deepunlearn.suite import VALIDATION, cached_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EPOCHS = 4  # the suite's
ALPHAS = {"alpha_r": 100.0, "alpha_f": 3.0}
TARGET_POINTS = 0.1


def weight_changes(original, edited) -> dict[str, torch.Tensor]:
    before = {t.name: t.weight().detach().double() for t in find_targets(original)[0]}
    return {t.name: t.weight().detach().double() - before[t.name] for t in find_targets(edited)[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["smallcnn", "resnet18", "vit"])
    p.add_argument("--forget", nargs="+", type=int, default=[0, 2, 7])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DEEPUNLEARN_CACHE", Path.home() / ".cache" / "deepunlearn")))
    p.add_argument("--out", type=Path, default=RESULTS / "solver_accuracy_cpu")
    a = p.parse_args(argv)
    full, test = fashion_mnist("train"), fashion_mnist("test")
    train = Subset(full, range(len(full) - VALIDATION))
    labels = dataset_labels(train)
    result = {"device_name": device_name(torch.device("cpu")), "torch": torch.__version__, "alphas": ALPHAS, "rows": []}
    for arch in a.archs:
        original, _ = cached_model(arch, train, EPOCHS, a.seed, a.cache_dir, "original")
        for c in a.forget:
            keep = [k for k in range(10) if k != c]
            g = torch.Generator().manual_seed(a.seed + c)
            retain = Subset(train, class_balanced_indices(labels, keep, 100 * len(keep), g))
            forget = Subset(train, class_balanced_indices(labels, [c], 100 * len(keep), g))
            fast = deepunlearn.unlearn(original, forget, retain, inplace=False, **ALPHAS)
            ref = deepunlearn.unlearn(original, forget, retain, inplace=False, dtype=torch.float64, solver="eigh", **ALPHAS)
            acc = {}
            for name, r in (("default", fast), ("reference", ref)):
                probs, y = predictions(r.model, test)
                acc[name] = class_accuracies(probs, y, [c])
            d_fast, d_ref = weight_changes(original, fast.model), weight_changes(original, ref.model)
            worst = max(float((d_fast[k] - d_ref[k]).norm() / d_ref[k].norm().clamp_min(1e-300)) for k in d_ref)
            row = {"arch": arch, "class": c, "default": acc["default"], "reference": acc["reference"],
                   "retain_diff": acc["default"][0] - acc["reference"][0], "forget_diff": acc["default"][1] - acc["reference"][1],
                   "worst_layer_change_rel_diff": worst, "default_seconds": fast.seconds["total"],
                   "reference_seconds": ref.seconds["total"]}
            result["rows"].append(row)
            print(f"[{arch} {c}] retain {acc['default'][0]:.2f} vs {acc['reference'][0]:.2f}, forget {acc['default'][1]:.2f} "
                  f"vs {acc['reference'][1]:.2f}; worst layer change rel diff {worst:.1e}", flush=True)
            write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Default solve against the float64 eigen reference ({result['device_name']})", "",
             f"Test split of Fashion-MNIST, α_r = {result['alphas']['alpha_r']:g}, α_f = {result['alphas']['alpha_f']:g}; "
             f"accuracies in %, target: within {TARGET_POINTS} point.", "",
             "| arch | class | retain: default / reference | forget: default / reference | worst layer, change rel. diff |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['arch']} | {r['class']} | {r['default'][0]:.2f} / {r['reference'][0]:.2f} | "
                     f"{r['default'][1]:.2f} / {r['reference'][1]:.2f} | {r['worst_layer_change_rel_diff']:.1e} |")
    rows = result["rows"]
    if rows:
        worst = max(max(abs(r["retain_diff"]), abs(r["forget_diff"])) for r in rows)
        lines += ["", f"- largest accuracy difference {worst:.2f} points over {len(rows)} cases (target ≤ {TARGET_POINTS})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
