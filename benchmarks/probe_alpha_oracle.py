"""The best a single (α_r, α_f) pair can do, with the test split as an oracle: the ceiling of any choice.

    python benchmarks/probe_alpha_oracle.py                          # SmallCNN, ResNet-18, ViT; classes 0, 2, 7, {0, 2}, {0, 2, 7}
    python benchmarks/probe_alpha_oracle.py --archs vit --forget 2 --scopes all skip-first

For each architecture and class set (the suite's models and samples, as ``bench_auto_alpha.py``
draws them), each edit scope, and each α_r of a wide grid: the smallest α_f (log bisection over
[0.1, 10⁴]) whose *test* forget accuracy is at most 1 %, and the test retain accuracy there. The
automatic choice only sees held-out training samples; this shows what it could reach at best,
and whether a scope other than every layer raises that ceiling. Scopes:

* ``all``: every edited layer (the default);
* ``skip-first``: every layer but the first one the input reaches (a CNN's stem, a ViT's patch
  embedding), whose inputs are raw pixels shared by every class;
* ``skip-first-token``: as ``skip-first``, with the statistics of sequence inputs taken from their
  first position only (the class token; ``first_token=True``); the same as ``skip-first`` for
  models that read no sequence;
* ``skip-first-mean``, ``skip-first-token-mean``: as ``skip-first`` and ``skip-first-token``, each
  edited layer's bias shifted so that its mean output over the retain samples stays
  (``keep_retain_mean=True``);
* ``last-layers``: the last two layers only (a CNN's penultimate layer and head, a ViT's last
  MLP output and head): the features of the forget class kept, their use by the classifier removed;
* ``head``: the classifier alone.

``--depth-powers``: per power ``p``, the layers of the scope take ``α_f · ((l + 1) / L)^p`` (layer
``l`` of ``L`` in the order the input reaches them; ``p > 0`` grows the edit with depth, ``p < 0``
shrinks it; 0, the default, is one ``α_f``), and the bisection runs on the common ``α_f``.

Results: ``benchmarks/results/alpha_oracle_cpu.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLASS_SETS, device_name, suite_arguments, suite_data, suite_model, suite_samples, measured_split_note, write_results  # noqa: E402
from deepunlearn import collect_statistics  # noqa: E402
from deepunlearn import plan as planning  # noqa: E402
from deepunlearn.candidates import SpectralCandidates  # noqa: E402
from deepunlearn.layers import find_targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALPHA_R_GRID = (1, 3, 10, 30, 100, 300, 1000)
ALPHA_F_RANGE = (0.1, 1e4)  # bisection bounds (log scale)
BISECTION_STEPS = 8  # a factor of 10^5 resolved to about 1.05
FORGET_TARGET = 1.0  # percent
SCOPES = ("all", "skip-first", "skip-first-token", "skip-first-mean", "skip-first-token-mean", "last-layers", "head")
DEFAULT_SCOPES = SCOPES[:3]  # the others on request (--scopes skip-first-token-mean, last-layers head...)


def stacked(data) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(data[i][:2] for i in range(len(data))))
    return torch.stack(xs), torch.as_tensor(ys)


def accuracy(model, x, y, batch=1000) -> float:
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(batch)])
    return 100.0 * float((pred == y).double().mean())


def oracle(model, cands: SpectralCandidates, x_f, y_f, x_r, y_r, scales: list[float] | None = None) -> list[dict]:
    """Per α_r, the smallest α_f reaching the target and the test accuracies there; ``scales``:
    each target's factor on α_f (default 1)."""
    targets = cands.targets
    originals = [(t.weight().detach().clone(), None if t.bias() is None else t.bias().detach().clone()) for t in targets]
    scales = scales or [1.0] * len(targets)

    def apply(a_r, a_f):
        for i, t in enumerate(targets):
            t.write(*cands.edit(i, a_r, a_f * scales[i]))

    rows = []
    try:
        for a_r in ALPHA_R_GRID:
            lo, hi = math.log(ALPHA_F_RANGE[0]), math.log(ALPHA_F_RANGE[1])
            apply(a_r, math.exp(hi))
            if accuracy(model, x_f, y_f) > FORGET_TARGET:
                rows.append({"alpha_r": a_r, "alpha_f": None, "retain": None, "forget": None})
                continue
            apply(a_r, math.exp(lo))
            if accuracy(model, x_f, y_f) <= FORGET_TARGET:
                hi = lo
            else:
                for _ in range(BISECTION_STEPS):
                    mid = 0.5 * (lo + hi)
                    apply(a_r, math.exp(mid))
                    if accuracy(model, x_f, y_f) <= FORGET_TARGET:
                        hi = mid
                    else:
                        lo = mid
            apply(a_r, math.exp(hi))
            rows.append({"alpha_r": a_r, "alpha_f": math.exp(hi), "retain": accuracy(model, x_r, y_r),
                         "forget": accuracy(model, x_f, y_f)})
    finally:
        for t, (w, b) in zip(targets, originals):
            t.write(w, b)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_arguments(p, RESULTS / "alpha_oracle_cpu")
    p.add_argument("--scopes", nargs="+", choices=list(SCOPES), default=list(DEFAULT_SCOPES))
    p.add_argument("--depth-powers", nargs="+", type=float, default=[0.0],
                   help="α_f of layer l of L scaled by ((l + 1) / L)^p, per p (0: one α_f)")
    a = p.parse_args(argv)
    sets = a.forget or CLASS_SETS
    train, labels, test = suite_data(a.data, a.test_images)
    x_test, y_test = stacked(test)
    result = {"device_name": device_name(torch.device("cpu")), "torch": torch.__version__, "alpha_r_grid": ALPHA_R_GRID,
              "test_images": len(test),
              "rows": []}
    for arch in a.archs:
        model = suite_model(arch, train, a.seed, a.cache_dir).eval()
        for classes in sets:
            forget, retain = suite_samples(train, labels, classes, a.seed)
            (x_f, _), (x_r, _) = stacked(forget), stacked(retain)
            is_f = torch.isin(y_test, torch.as_tensor(classes))
            tf, tr = (x_test[is_f], y_test[is_f]), (x_test[~is_f], y_test[~is_f])
            original = (accuracy(model, *tr), accuracy(model, *tf))
            targets, _ = find_targets(model)
            cpu = torch.device("cpu")
            for scope in a.scopes:
                token = "-token" in scope
                stats_f, stats_r = (collect_statistics(model, x, first_token=token) for x in (x_f, x_r))
                t0 = time.perf_counter()
                layers = list(dict.fromkeys(t.layer for t in targets))  # the suite's models register their stem first
                kept = {"all": layers, "head": layers[-1:], "last-layers": layers[-2:]}.get(scope, layers[1:])
                chosen = [t for t in targets if t.layer in kept]
                means = planning.layer_means(chosen, stats_r, cpu) if scope.endswith("-mean") else None
                cands = SpectralCandidates(chosen, planning.layer_moments(chosen, stats_f, cpu), planning.layer_moments(chosen, stats_r, cpu),
                                       means_r=means)
                depth = [kept.index(t.layer) for t in cands.targets]
                for power in a.depth_powers:
                    scales = [((d + 1) / len(kept)) ** power for d in depth]
                    rows = oracle(model, cands, *tf, *tr, scales)
                    reached = [r for r in rows if r["retain"] is not None]
                    best = max(reached, key=lambda r: r["retain"]) if reached else None
                    row = {"arch": arch, "classes": classes, "scope": scope, "depth_power": power,
                           "original_retain": original[0], "original_forget": original[1], "per_alpha_r": rows,
                           "best": best, "best_drop": None if best is None else original[0] - best["retain"],
                           "seconds": time.perf_counter() - t0}
                    result["rows"].append(row)
                    print(f"[{arch} {classes} {scope} p={power:g}] " + (
                          f"best alpha=({best['alpha_r']:g}, {best['alpha_f']:.3g}) drop {row['best_drop']:.2f} forget "
                          f"{best['forget']:.2f}" if best else "never forgets") + " | " + ", ".join(
                          f"{r['alpha_r']:g}: " + ("-" if r["retain"] is None else f"{original[0] - r['retain']:.2f}")
                          for r in rows), flush=True)
                    write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    grid = result["alpha_r_grid"]
    lines = [f"# The best single pair, with the test split as oracle ({result['device_name']})", "", *measured_split_note(result),
             "Test retain drop (points) at the smallest α_f whose test forget accuracy is at most 1 %, per α_r ('-': "
             "never forgets with α_f ≤ 10⁴); best = the smallest drop over α_r.", "",
             "| arch | classes | scope | depth power | " + " | ".join(f"α_r={g}" for g in grid) + " | best (α_r, α_f) | best drop |",
             "|---|---|---|---|" + "---|" * len(grid) + "---|---|"]
    for r in result["rows"]:
        cells = ["-" if x["retain"] is None else f"{r['original_retain'] - x['retain']:.2f}" for x in r["per_alpha_r"]]
        b = r["best"]
        lines.append(f"| {r['arch']} | {','.join(map(str, r['classes']))} | {r['scope']} | {r.get('depth_power', 0):g} | "
                     + " | ".join(cells) + " | "
                     + ("-" if b is None else f"({b['alpha_r']:g}, {b['alpha_f']:.3g})") + " | "
                     + ("-" if b is None else f"{r['best_drop']:.2f}") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
