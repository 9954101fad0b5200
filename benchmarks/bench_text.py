"""The default call on text classifiers given Hugging Face batches: quality and cost.

    python benchmarks/bench_text.py                         # BERT and GPT-2, 1 and 2 blocks, seeds 0 and 1
    python benchmarks/bench_text.py --archs bert --blocks 1 --seeds 0 --side left   # one model, left padding

Each model (:mod:`deepunlearn.experiments.token_task`: a transformers ``BertForSequenceClassification``
reading ``[CLS]``, or ``GPT2ForSequenceClassification`` reading its last token; 32 wide) is trained on
2,000 sequences of the synthetic token task (three epochs, a second or two on two cores) and forgets
class 0, class 2 and both, from padded mapping batches (``input_ids``, ``attention_mask``,
``labels``): 200 forget sequences and 100 per kept class, padded on ``--side``. Reported per case:
the chosen pair, the position whose statistics won, test accuracy on 1,000 sequences of the
forgotten classes and of the others (drop from the original), the seconds spent choosing and their
ratio to one fixed-α call with the chosen pair (medians of three calls each). Targets as
``bench_auto_alpha.py``'s: forget ≤ 1 %, retain drop ≤ 1 point. Results:
``benchmarks/results/text_cpu.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUALITY, device_name, meets_quality, write_results  # noqa: E402
import deepunlearn  # noqa: E402
from deepunlearn.evaluation import predictions  # noqa: E402
from deepunlearn.experiments.token_task import CLASSES, text_batches, text_classifier, train_text_classifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLASS_SETS = ([0], [2], [0, 2])
TRAIN, TEST, FORGET, PER_KEPT = 2000, 1000, 200, 100  # sequences: training, test, to forget, per kept class
REPEATS = 3  # automatic and fixed calls timed per case, the median kept


def accuracies(model, test, classes) -> tuple[float, float]:
    """Test accuracy (percent) on the sequences of ``classes`` and on the others."""
    probs, labels = predictions(model, test)
    right = probs.argmax(1) == labels
    forgotten = torch.isin(labels, torch.tensor(classes))
    return 100 * float(right[forgotten].float().mean()), 100 * float(right[~forgotten].float().mean())


def timed_median(call) -> tuple[float, list]:
    """The median wall seconds of :data:`REPEATS` calls and their results."""
    times, outs = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        outs.append(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", choices=["bert", "gpt2"], default=["bert", "gpt2"])
    p.add_argument("--blocks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--side", choices=["right", "left"], default="right", help="where the batches are padded")
    p.add_argument("--out", type=Path, default=RESULTS / "text_cpu")
    a = p.parse_args(argv)
    result = {"device_name": device_name(torch.device("cpu")), "torch": torch.__version__, "side": a.side,
              "targets": QUALITY, "rows": []}
    for arch in a.archs:
        for blocks in a.blocks:
            for seed in a.seeds:
                model = train_text_classifier(text_classifier(arch, blocks, seed=seed),
                                              text_batches(TRAIN, range(CLASSES), seed, side=a.side))
                test = text_batches(TEST, range(CLASSES), 1000 + seed, side=a.side)
                for classes in CLASS_SETS:
                    kept = [c for c in range(CLASSES) if c not in classes]
                    forget = text_batches(FORGET, classes, 100 + seed, side=a.side)
                    retain = text_batches(PER_KEPT * len(kept), kept, 200 + seed, side=a.side)
                    t_auto, autos = timed_median(lambda: deepunlearn.unlearn(model, forget, retain, inplace=False))
                    auto, c = autos[0], autos[0].alpha_choice
                    if any((r.alpha_r, r.alpha_f, r.alpha_f_head) != (c.alpha_r, c.alpha_f, c.alpha_f_head) for r in autos):
                        raise RuntimeError(f"{arch} {classes}: the repeated automatic calls chose different scales")
                    t_choose = statistics.median(r.alpha_choice.seconds for r in autos)
                    t_fixed, _ = timed_median(lambda: deepunlearn.unlearn(
                        model, forget, retain, alpha_r=c.alpha_r, alpha_f=c.alpha_f, alpha_f_head=c.alpha_f_head,
                        first_token=c.first_token, token_position=c.token_position, keep_retain_mean=auto.keep_retain_mean,
                        skip_first_layer=True, inplace=False))
                    (f0, r0), (f1, r1) = accuracies(model, test, classes), accuracies(auto.model, test, classes)
                    row = {"arch": arch, "blocks": blocks, "seed": seed, "classes": classes, "alpha_r": c.alpha_r,
                           "alpha_f": c.alpha_f, "alpha_f_head": c.alpha_f_head, "first_token": c.first_token,
                           "token_position": c.token_position, "reached_target": c.reached_target,
                           "original_forget": f0, "original_retain": r0, "forget_test": f1, "retain_test": r1,
                           "retain_drop": r0 - r1, "choose_seconds": t_choose, "auto_seconds": t_auto,
                           "fixed_seconds": t_fixed, "choose_over_fixed": t_choose / t_fixed}
                    row["meets_targets"] = meets_quality(f1, row["retain_drop"])
                    result["rows"].append(row)
                    print(f"[{arch} x{blocks} seed {seed} {classes}] alpha=({c.alpha_r:g}, {c.alpha_f:.3g}) forget "
                          f"{f0:.1f} -> {f1:.1f}, retain {r0:.1f} -> {r1:.1f}; choose {t_choose:.2f}s = "
                          f"{row['choose_over_fixed']:.2f}x a fixed call", flush=True)
                    write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# The default call on text classifiers given padded Hugging Face batches ({result['device_name']})", "",
             f"The synthetic token task (`deepunlearn/experiments/token_task.py`), batches padded on the {result['side']}; "
             f"{FORGET} forget sequences, {PER_KEPT} per kept class; test accuracy on {TEST} sequences (forgotten classes, "
             "the others; drop = original − unlearned). Targets: forget ≤ 1 %, retain drop ≤ 1 point. choose / fixed: "
             "seconds choosing α over one fixed-α call with the chosen pair (medians of three calls).", "",
             "| arch | blocks | seed | classes | α_r | α_f | head α_f | position | test forget | test retain (drop) | meets | choose (s) | choose / fixed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        position = "every" if not r["first_token"] else "last" if r["token_position"] == -1 else "first"
        lines.append(f"| {r['arch']} | {r['blocks']} | {r['seed']} | {','.join(map(str, r['classes']))} | {r['alpha_r']:g} | "
                     f"{r['alpha_f']:.3g} | {'=' if r['alpha_f_head'] is None else format(r['alpha_f_head'], '.3g')} | "
                     f"{position} | {r['original_forget']:.1f} → {r['forget_test']:.1f} | {r['retain_test']:.1f} "
                     f"({r['retain_drop']:.2f}) | {'yes' if r['meets_targets'] else 'no'} | {r['choose_seconds']:.2f} | "
                     f"{r['choose_over_fixed']:.2f} |")
    if rows:
        lines += ["", f"- {sum(r['meets_targets'] for r in rows)} of {len(rows)} cases meet both targets; "
                      f"choose / fixed {min(r['choose_over_fixed'] for r in rows):.2f}–{max(r['choose_over_fixed'] for r in rows):.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
