"""The default call (α chosen automatically) on the suite's models: quality on the test split and cost.

    python benchmarks/bench_auto_alpha.py                       # SmallCNN, ResNet-18, ViT; classes 0, 2, 7, {0, 2}, {0, 2, 7}
    python benchmarks/bench_auto_alpha.py --archs smallcnn --forget 2   # one case
    python benchmarks/bench_auto_alpha.py --device cuda --out benchmarks/results/auto_alpha_cuda_h100
    python benchmarks/bench_auto_alpha.py --archs timm-resnet10t timm-vit_tiny --out benchmarks/results/auto_alpha_timm_cpu
    python benchmarks/bench_auto_alpha.py --archs timm-regnetx_002 --alpha-f-only --out benchmarks/results/auto_alpha_timm_regnet_cpu
    python benchmarks/bench_auto_alpha.py --archs timm-mobilenetv3_small_100 --out benchmarks/results/auto_alpha_timm_mobilenet_cpu
    python benchmarks/bench_auto_alpha.py --archs timm-convnext --parts --out benchmarks/results/auto_alpha_timm_convnext_cpu

For each architecture the suite's original model (trained on Fashion-MNIST, cached as the suite
caches it) forgets each class set from the suite's samples (100 per kept class; as many forget
samples, spread over the forgotten classes), given two ways:

* ``labelled``: ``(x, y)`` Subsets, so the held-out candidates are scored by the labels;
* ``unlabelled``: plain image tensors, scored by agreement with the unedited model.

``timm-<key>`` names a timm model of ``common.TIMM_MODELS`` instead (one the choice was not developed
on), trained on the suite's split as the suite trains its own (5 to 6 minutes each on two cores).

Reported per case: the chosen pair, its held-out accuracies, the test split's retain accuracy (drop
from the original) and forget accuracy, the seconds spent choosing, and the ratio of choosing time
to one fixed-α call with the chosen pair (each the median of three calls, timed in the same run; the three
automatic calls must choose alike; target ≤ 2). ``--per-class`` gives every call more (or fewer) samples.
``--alpha-f-only`` also times the choice with the chosen ``α_r`` given, so that only ``α_f`` (and the head's
scale) is searched: what choosing costs beyond the search along ``α_r`` (the same held-out scoring, proof,
decompositions and head re-fit). ``--parts`` makes one more automatic call with its parts timed
(:func:`deepunlearn.profiled.part_times`: decompositions, edits, weight writes, each side's scoring, the head's
re-fit, each exclusive of the parts nested in it; the rest is set-up and bookkeeping). Results:
``benchmarks/results/auto_alpha_cpu.json`` and ``.md``. On a GPU each architecture is first unlearned once
untimed (the CUDA libraries' start-up) and every timed call ends with a device synchronisation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLASS_SETS, QUALITY, device_name, meets_quality, suite_arguments, suite_data, suite_model, suite_samples, measured_split_note, write_results  # noqa: E402
import deepunlearn  # noqa: E402
from deepunlearn.experiments import SUITE_PER_CLASS  # noqa: E402
from deepunlearn.evaluation import class_accuracies, predictions  # noqa: E402
from deepunlearn.profiled import part_times  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("decompose", "edit", "write", "score forget", "score retain", "head re-fit")  # the choice's parts, in the order
# they first run (deepunlearn.profiled)
REPEATS = 3  # automatic and fixed calls timed per case, each the median kept: one call alone once took four times its
# usual time


def test_accuracies(model, test, classes) -> tuple[float, float]:
    probs, labels = predictions(model, test)
    return class_accuracies(probs, labels, classes)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stacked(subset: Subset) -> torch.Tensor:
    return torch.stack([subset[i][0] for i in range(len(subset))])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_arguments(p, RESULTS / "auto_alpha_cpu")
    p.add_argument("--forms", nargs="+", choices=["labelled", "unlabelled"], default=["labelled", "unlabelled"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-class", type=int, default=SUITE_PER_CLASS,
                   help="images per kept class (as many to forget); the suite's calls get %(default)s")
    p.add_argument("--alpha-f-only", action="store_true",
                   help="also time the choice with the chosen alpha_r given (only alpha_f searched)")
    p.add_argument("--parts", action="store_true", help="also time one automatic call's choice by part")
    p.add_argument("--first-token", choices=["auto", "yes", "no"], default="auto",
                   help="statistics of sequence inputs from position 0 only (auto: the default call's choice)")
    a = p.parse_args(argv)
    first_token = {"auto": None, "yes": True, "no": False}[a.first_token]  # the unlearn() keyword
    sets = a.forget or CLASS_SETS
    train, labels, test = suite_data(a.data, a.test_images)
    device = torch.device(a.device)
    result = {"device_name": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "seed": a.seed,
              "test_images": len(test),
              "per_class": a.per_class, "targets": QUALITY, "first_token": a.first_token, "alpha_f_only": a.alpha_f_only,
              "rows": []}
    for arch in a.archs:
        original = suite_model(arch, train, a.seed, a.cache_dir).to(device)
        if device.type == "cuda":  # start-up of cuBLAS / cuSOLVER, not the method's cost
            deepunlearn.unlearn(original, *suite_samples(train, labels, sets[0], a.seed, a.per_class), alpha_r=100, alpha_f=3, inplace=False)
        for classes in sets:
            forget, retain = suite_samples(train, labels, classes, a.seed, a.per_class)
            orig_r, orig_f = test_accuracies(original, test, classes)
            for form in a.forms:
                f_data, r_data = (forget, retain) if form == "labelled" else (stacked(forget), stacked(retain))
                auto, auto_times, choose_times = None, [], []
                for _ in range(REPEATS):
                    t0 = time.perf_counter()
                    run = deepunlearn.unlearn(original, f_data, r_data, inplace=False, first_token=first_token)
                    synchronize(device)
                    auto_times.append(time.perf_counter() - t0)
                    choose_times.append(run.seconds["choose_alpha"])
                    if auto is None:  # the first call's model and choice are reported
                        auto = run
                    if (run.alpha_r, run.alpha_f, run.alpha_f_head) != (auto.alpha_r, auto.alpha_f, auto.alpha_f_head):
                        raise RuntimeError(f"{arch} {classes} {form}: the repeated automatic calls chose different scales")
                t_auto, t_choose = statistics.median(auto_times), statistics.median(choose_times)
                alpha_f_only = None
                if a.alpha_f_only:  # the same call with the chosen alpha_r given: alpha_f's search alone
                    runs = [deepunlearn.unlearn(original, f_data, r_data, inplace=False, alpha_r=auto.alpha_r,
                                                first_token=auto.alpha_choice.first_token) for _ in range(REPEATS)]
                    synchronize(device)
                    alone = runs[0].alpha_choice
                    alpha_f_only = {"seconds": statistics.median(r.alpha_choice.seconds for r in runs), "alpha_f": alone.alpha_f,
                                    "alpha_f_head": alone.alpha_f_head, "candidates": len(alone.candidates)}
                parts = None
                if a.parts:  # one more automatic call, its parts timed (device synchronised at their edges)
                    with part_times(device) as seconds:
                        timed = deepunlearn.unlearn(original, f_data, r_data, inplace=False, first_token=first_token)
                    parts = {"choose_seconds": timed.seconds["choose_alpha"],
                             "seconds": {k: v[0] for k, v in seconds.items()}, "calls": {k: v[1] for k, v in seconds.items()}}
                fixed_times = []
                for _ in range(REPEATS):
                    t0 = time.perf_counter()
                    deepunlearn.unlearn(original, f_data, r_data, alpha_r=auto.alpha_r, alpha_f=auto.alpha_f,
                                        alpha_f_head=auto.alpha_f_head, inplace=False,
                                        first_token=auto.alpha_choice.first_token, keep_retain_mean=auto.keep_retain_mean,
                                        skip_first_layer=True)
                    synchronize(device)
                    fixed_times.append(time.perf_counter() - t0)
                t_fixed = statistics.median(fixed_times)
                r_acc, f_acc = test_accuracies(auto.model, test, classes)
                c = auto.alpha_choice
                row = {"arch": arch, "classes": classes, "form": form, "samples": [len(forget), len(retain)],
                       "alpha_r": c.alpha_r, "alpha_f": c.alpha_f,
                       "alpha_f_head": c.alpha_f_head,
                       "held_out_retain": c.retain_acc, "held_out_forget": c.forget_acc, "reached_target": c.reached_target,
                       "held_out_forget_rebalanced": c.forget_acc_rebalanced,
                       "scoring": c.scoring, "candidates": len(c.candidates), "monotone": c.monotone, "first_token": c.first_token,
                       "keep_retain_mean": c.keep_retain_mean,
                       "original_retain_test": orig_r, "original_forget_test": orig_f, "retain_test": r_acc,
                       "forget_test": f_acc, "retain_drop": orig_r - r_acc, "choose_seconds": t_choose,
                       "auto_seconds": t_auto, "fixed_seconds": t_fixed, "choose_over_fixed": t_choose / t_fixed,
                       "auto_over_fixed": t_auto / t_fixed, "table": c.candidates,
                       "alpha_f_only": alpha_f_only, "parts": parts,
                       "head_fix": "re-fitted" if c.head_refit is not None else "rebalanced" if c.head_shift is not None else "none",
                       "head_refit": None if (h := c.head_refit) is None else {
                           "retain_acc_before": h.retain_acc_before, "retain_acc_after": h.retain_acc_after,
                           "forget_hits": h.forget_hits, "forget_weight": h.forget_weight, "forgotten_shift": h.forgotten_shift}}
                row["meets_targets"] = meets_quality(f_acc, row["retain_drop"])
                result["rows"].append(row)
                print(f"[{arch} {classes} {form}] alpha=({c.alpha_r:g}, {c.alpha_f:.3g}, head {'=' if c.alpha_f_head is None else format(c.alpha_f_head, '.3g')}) test retain {r_acc:.2f} "
                      f"(drop {row['retain_drop']:.2f}) forget {f_acc:.2f}; choose {row['choose_seconds']:.2f}s = "
                      f"{row['choose_over_fixed']:.2f}x a fixed call ({t_fixed:.2f}s); monotone {c.monotone}", flush=True)
                write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


def rebalanced_forget(row: dict) -> str:
    """The held-out forget accuracy with the head's bias rebalanced, where no candidate reached the target."""
    shifted = row.get("held_out_forget_rebalanced")
    return "" if shifted is None else f" ({shifted:.1f} rebalanced)"


def markdown(result: dict) -> str:
    split = all(r.get("alpha_f_only") for r in result["rows"]) and bool(result["rows"])
    lines = [f"# Automatic α on the suite's models ({result['device_name']})", "", *measured_split_note(result),
             "Test split of Fashion-MNIST; retain drop = original − unlearned retain accuracy (points). Targets: forget "
             f"≤ {QUALITY['forget']:g} %, retain drop ≤ {QUALITY['retain_drop']:g}; {result['per_class']} "
             "images per kept class, as many to forget; choose / fixed = seconds choosing α (the median of three automatic "
             "calls) over the median of three fixed-α calls with the chosen pair (target ≤ 2). Tokens: the statistics of sequence inputs (every position, "
             "or the first); \"+ mean\": the biases keep the retain samples' mean output. Head: the classifier head's "
             "correction after the edit (its retained rows re-fitted, or its bias rebalanced).", "",
             "| arch | classes | data | α_r | α_f | head α_f | tokens | held-out retain / forget | head | test retain (drop) | test forget | meets | candidates | choose (s) | choose / fixed |"
             + (" α_f alone / fixed |" if split else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if split else "")]
    for r in result["rows"]:
        lines.append(f"| {r['arch']} | {','.join(map(str, r['classes']))} | {r['form']} | {r['alpha_r']:g} | {r['alpha_f']:.3g} | "
                     f"{'=' if r.get('alpha_f_head') is None else format(r['alpha_f_head'], 'g')} | "
                     f"{'first' if r.get('first_token') else 'all'}{' + mean' if r.get('keep_retain_mean') else ''} | "
                     f"{r['held_out_retain']:.1f} / {r['held_out_forget']:.1f}{rebalanced_forget(r)} | {r.get('head_fix', '')} | "
                     f"{r['retain_test']:.2f} ({r['retain_drop']:.2f}) | "
                     f"{r['forget_test']:.2f} | {'yes' if r['meets_targets'] else 'no'} | {r['candidates']} | "
                     f"{r['choose_seconds']:.2f} | {r['choose_over_fixed']:.2f} |"
                     + (f" {r['alpha_f_only']['seconds'] / r['fixed_seconds']:.2f} |" if split else ""))
    rows = result["rows"]
    if rows:
        met = sum(r["meets_targets"] for r in rows)
        mono = sum(r["monotone"] for r in rows)
        lines += ["", f"- {met} of {len(rows)} cases meet both quality targets; held-out forget accuracy fell monotonically "
                      f"in α_f in {mono} of {len(rows)}; choose / fixed at most {max(r['choose_over_fixed'] for r in rows):.2f}."]
        if split:
            ratios = [r["alpha_f_only"]["seconds"] / r["fixed_seconds"] for r in rows]
            lines.append(f"- α_f alone: the choice with the chosen α_r given (only α_f and the head's scale searched), its "
                         f"seconds over the same fixed call: {min(ratios):.2f}–{max(ratios):.2f}.")
    timed = [r for r in rows if r.get("parts")]
    if timed:
        names = [*PARTS, *sorted({k for r in timed for k in r["parts"]["seconds"]} - set(PARTS))]
        lines += ["", "Where choosing's time went: one more automatic call, each part's seconds (exclusive of the parts "
                      "nested in it; the device synchronised at their edges); rest: set-up and bookkeeping.", "",
                  "| arch | classes | data | fixed (s) | choose (s) | " + " | ".join(names) + " | rest |",
                  "|---|---|---|---|---|" + "---|" * (len(names) + 1)]
        for r in timed:
            spent = r["parts"]["seconds"]
            lines.append(f"| {r['arch']} | {','.join(map(str, r['classes']))} | {r['form']} | {r['fixed_seconds']:.3f} | "
                         f"{r['parts']['choose_seconds']:.3f} | " + " | ".join(f"{spent.get(k, 0.0):.3f}" for k in names)
                         + f" | {r['parts']['choose_seconds'] - sum(spent.values()):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
