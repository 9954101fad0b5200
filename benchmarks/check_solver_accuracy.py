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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, suite_arguments, suite_data, suite_model, suite_samples, measured_split_note, write_results  # noqa: E402
import deepunlearn  # noqa: E402
from deepunlearn.evaluation import class_accuracies, predictions  # noqa: E402
from deepunlearn.layers import find_targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = {"alpha_r": 100.0, "alpha_f": 3.0}
TARGET_POINTS = 0.1


def weight_changes(original, edited) -> dict[str, torch.Tensor]:
    before = {t.name: t.weight().detach().double() for t in find_targets(original)[0]}
    return {t.name: t.weight().detach().double() - before[t.name] for t in find_targets(edited)[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_arguments(p, RESULTS / "solver_accuracy_cpu")
    a = p.parse_args(argv)
    sets = a.forget or [[0], [2], [7]]
    train, labels, test = suite_data(a.data, a.test_images)
    result = {"device_name": device_name(torch.device("cpu")), "torch": torch.__version__, "alphas": ALPHAS,
              "test_images": len(test), "rows": []}
    for arch in a.archs:
        original = suite_model(arch, train, a.seed, a.cache_dir)
        for classes in sets:
            forget, retain = suite_samples(train, labels, classes, a.seed)
            fast = deepunlearn.unlearn(original, forget, retain, inplace=False, **ALPHAS)
            ref = deepunlearn.unlearn(original, forget, retain, inplace=False, dtype=torch.float64, solver="eigh", **ALPHAS)
            acc = {}
            for name, r in (("default", fast), ("reference", ref)):
                probs, y = predictions(r.model, test)
                acc[name] = class_accuracies(probs, y, classes)
            d_fast, d_ref = weight_changes(original, fast.model), weight_changes(original, ref.model)
            worst = max(float((d_fast[k] - d_ref[k]).norm() / d_ref[k].norm().clamp_min(1e-300)) for k in d_ref)
            row = {"arch": arch, "class": ",".join(map(str, classes)), "default": acc["default"], "reference": acc["reference"],
                   "retain_diff": acc["default"][0] - acc["reference"][0], "forget_diff": acc["default"][1] - acc["reference"][1],
                   "worst_layer_change_rel_diff": worst, "default_seconds": fast.seconds["total"],
                   "reference_seconds": ref.seconds["total"]}
            result["rows"].append(row)
            print(f"[{arch} {classes}] retain {acc['default'][0]:.2f} vs {acc['reference'][0]:.2f}, forget {acc['default'][1]:.2f} "
                  f"vs {acc['reference'][1]:.2f}; worst layer change rel diff {worst:.1e}", flush=True)
            write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Default solve against the float64 eigen reference ({result['device_name']})", "", *measured_split_note(result),
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
