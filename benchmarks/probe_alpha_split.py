"""Two forget scales instead of one, with the test split as an oracle: does a part of the model
want its own α_f?

    python benchmarks/probe_alpha_split.py                                  # the cases the single pair misses
    python benchmarks/probe_alpha_split.py --archs vit --forget 0 --part attention

The edit scope is the automatic choice's (every layer but the first; the first position's
statistics on the ViT). The layers are split into a *part* (``head``: the classifier; or
``attention``: every attention projection) and the *body* (the rest). For each α_r of a grid and
each α_f of the part on a grid (or the part left unedited), the body's α_f is the smallest whose
test forget accuracy is at most 1 % (a half-decade scan, then log bisection: past the window that
forgets, over-edited models can predict the forgotten class again), and the test retain drop
there is reported. Compare with ``alpha_oracle_*.md``, the best single pair over the same scope.

Results: ``benchmarks/results/alpha_split_cpu.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, suite_arguments, suite_data, suite_model, suite_samples, measured_split_note, write_results  # noqa: E402
from probe_alpha_oracle import accuracy, stacked  # noqa: E402
from deepunlearn import collect_statistics  # noqa: E402
from deepunlearn import plan as planning  # noqa: E402
from deepunlearn.candidates import SpectralCandidates  # noqa: E402
from deepunlearn.layers import find_targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MISSED = {"smallcnn": [[0], [0, 2]], "resnet18": [[0, 2, 7]], "vit": [[0], [0, 2], [0, 2, 7]]}  # by the single pair
ALPHA_R_GRID = {"smallcnn": (30, 100, 300), "resnet18": (30, 100, 300), "vit": (3, 10, 30)}  # around the chosen ones
PART_ALPHA_F = (None, 0.316, 1.0, 3.16, 10.0, 31.6)  # None: the part left unedited
BODY_SCAN = tuple(10 ** (k / 2) for k in range(-2, 7))  # 0.1 .. 1000 in half decades
BISECTION_STEPS = 5  # the half-decade step resolved to about 1.04
FORGET_TARGET = 1.0  # percent


def body_oracle(model, cands, in_part, a_r, a_part, forget, retain) -> dict:
    """The smallest body α_f (scan, then bisection) whose test forget accuracy is at most the target."""
    targets = cands.targets
    originals = [(t.weight().detach().clone(), None if t.bias() is None else t.bias().detach().clone()) for t in targets]

    def apply(a_body: float) -> None:
        part = originals if a_part is None else cands.edits(a_r, a_part)
        body = cands.edits(a_r, a_body)
        for i, t in enumerate(targets):
            t.write(*(part[i] if in_part[i] else body[i]))

    try:
        below, first = None, None
        for a in BODY_SCAN:
            apply(a)
            if accuracy(model, *forget) <= FORGET_TARGET:
                first = a
                break
            below = a
        if first is None:
            return {"alpha_f_part": a_part, "alpha_f_body": None, "retain": None, "forget": None}
        lo, hi = math.log(below if below is not None else first / math.sqrt(10.0)), math.log(first)
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            apply(math.exp(mid))
            if accuracy(model, *forget) <= FORGET_TARGET:
                hi = mid
            else:
                lo = mid
        apply(math.exp(hi))
        return {"alpha_f_part": a_part, "alpha_f_body": math.exp(hi), "retain": accuracy(model, *retain),
                "forget": accuracy(model, *forget)}
    finally:
        for t, (w, b) in zip(targets, originals):
            t.write(w, b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_arguments(p, RESULTS / "alpha_split_cpu")
    p.add_argument("--part", choices=["head", "attention"], default="head")
    p.add_argument("--alpha-r", type=float, nargs="+", help="the alpha_r grid (default: three around the chosen ones)")
    p.add_argument("--keep-retain-mean", action="store_true",
                   help="biases keep the retain samples' mean output (keep_retain_mean=True), part and body alike")
    a = p.parse_args(argv)
    train, labels, test = suite_data(a.data, a.test_images)
    x_test, y_test = stacked(test)
    result = {"device_name": device_name(torch.device("cpu")), "torch": torch.__version__, "part": a.part,
              "test_images": len(test),
              "keep_retain_mean": a.keep_retain_mean, "rows": []}
    cpu = torch.device("cpu")
    for arch in a.archs:
        model = suite_model(arch, train, a.seed, a.cache_dir).eval()
        for classes in a.forget or MISSED.get(arch, []):
            forget, retain = suite_samples(train, labels, classes, a.seed)
            (x_f, _), (x_r, _) = stacked(forget), stacked(retain)
            is_f = torch.isin(y_test, torch.as_tensor(classes))
            tf, tr = (x_test[is_f], y_test[is_f]), (x_test[~is_f], y_test[~is_f])
            original = accuracy(model, *tr)
            targets, _ = find_targets(model)
            layers = list(dict.fromkeys(t.layer for t in targets))  # the suite's models register their stem first
            chosen = [t for t in targets if t.layer != layers[0]]
            token = any(t.kind.startswith("attention") for t in targets)  # the ViT: the first position's statistics
            stats_f, stats_r = (collect_statistics(model, x, first_token=token) for x in (x_f, x_r))
            cands = SpectralCandidates(chosen, planning.layer_moments(chosen, stats_f, cpu), planning.layer_moments(chosen, stats_r, cpu),
                                   means_r=planning.layer_means(chosen, stats_r, cpu) if a.keep_retain_mean else None)
            in_part = [t.layer == layers[-1] if a.part == "head" else t.kind.startswith("attention") for t in chosen]
            for a_r in a.alpha_r or ALPHA_R_GRID[arch]:
                for a_part in PART_ALPHA_F:
                    r = body_oracle(model, cands, in_part, float(a_r), a_part, tf, tr)
                    r.update(arch=arch, classes=classes, alpha_r=a_r, original_retain=original,
                             drop=None if r["retain"] is None else original - r["retain"])
                    result["rows"].append(r)
                    print(f"[{arch} {classes}] alpha_r={a_r:g} part={a_part} body=" +
                          ("never" if r["drop"] is None else f"{r['alpha_f_body']:.3g} drop {r['drop']:.2f} "
                           f"forget {r['forget']:.2f}"), flush=True)
            write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    kept = ", the retain mean kept" if result.get("keep_retain_mean") else ""
    lines = [f"# Two forget scales, the {result['part']} apart from the body{kept}, test split as oracle "
             f"({result['device_name']})", "", *measured_split_note(result),
             "Per α_r and the part's α_f ('unedited': the part left as it was), the test retain drop (points) at the "
             "smallest body α_f whose test forget accuracy is at most 1 % ('-': never); best per case in bold.", "",
             "| arch | classes | α_r | part α_f | body α_f | retain drop | test forget (%) |", "|---|---|---|---|---|---|---|"]
    best = {}
    for r in result["rows"]:
        key = (r["arch"], tuple(r["classes"]))
        if r["drop"] is not None and (key not in best or r["drop"] < best[key]["drop"]):
            best[key] = r
    for r in result["rows"]:
        if r["drop"] is None:
            continue
        bold = "**" if best.get((r["arch"], tuple(r["classes"]))) is r else ""
        part = "unedited" if r["alpha_f_part"] is None else f"{r['alpha_f_part']:g}"
        lines.append(f"| {r['arch']} | {','.join(map(str, r['classes']))} | {r['alpha_r']:g} | {part} | "
                     f"{r['alpha_f_body']:.3g} | {bold}{r['drop']:.2f}{bold} | {r['forget']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
