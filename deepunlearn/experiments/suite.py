"""The comparison suite: deepunlearn against the methods users would pick instead, on Fashion-MNIST.

    python -m deepunlearn.experiments.suite                       # default run (committed in benchmarks/results/)
    python -m deepunlearn.experiments.suite --quick               # a few minutes: one model, one class, small budgets

For every architecture and forget class it trains (or loads from the cache) the original model
and a model retrained without the class, runs every method, and records: retain and forget
accuracy on train and test, SVC-MIA efficacy on the forget samples, the gap of each to the
retrained model, a linear-probe audit (can the class be recovered from the penultimate
features?), wall time and peak memory. Writes ``results.json``, ``results.md`` and PNG figures.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from .. import ops, search_alphas, unlearn
from . import CACHE_DIR, SUITE_PER_CLASS
from ..sampling import dataset_labels, draw_samples
from .baselines import BASELINES
from .fashion_mnist import fashion_mnist
from ..evaluation import evaluate_forgetting, exact_rss_peaks, measure
from ..extras import require
from .models import ARCHITECTURES
from ..reference import unlearn_paper

np = require("numpy", "metrics", "the suite")
from .training import train_classifier

VALIDATION = 5000
METRICS = ("retain_train", "forget_train", "retain_test", "forget_test", "mia", "probe_forget_test")


def penultimate_features(model: nn.Module, data, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of the model's last ``nn.Linear`` (its penultimate features) and the labels."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats, labels = [], []
    handle = head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach().flatten(1).float().cpu()))
    try:
        model.eval()
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(data, batch_size=batch_size):
                model(x)
                labels.append(y)
    finally:
        handle.remove()
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def probe_audit(model: nn.Module, probe_train, forget_test, seed: int = 0) -> float:
    """Accuracy (%) on the forget-class test samples of a logistic-regression probe fitted on the
    penultimate features of retain and forget training samples. High: the class is still there."""
    linear_model = require("sklearn.linear_model", "metrics", "the suite's probe audit")
    preprocessing = require("sklearn.preprocessing", "metrics", "the suite's probe audit")

    xtr, ytr = penultimate_features(model, probe_train)
    xte, yte = penultimate_features(model, forget_test)
    scaler = preprocessing.StandardScaler().fit(xtr)
    clf = linear_model.LogisticRegression(max_iter=300, random_state=seed).fit(scaler.transform(xtr), ytr)
    return 100.0 * float((clf.predict(scaler.transform(xte)) == yte).mean())


def _pure(fn, *args, **kwargs):
    """Call ``fn`` with deepunlearn's compiled ops switched off (the pure-PyTorch path)."""
    with ops.pure_path():
        return fn(*args, **kwargs)


def cached_model(arch: str, train, epochs: int, seed: int, cache: Path, tag: str,
                 build: Callable[[], nn.Module] | None = None) -> tuple[nn.Module, float]:
    """Train ``arch`` on ``train`` (or load it), returning the model and the training seconds.
    ``build``: makes the untrained model (default: the suite's architecture named ``arch``)."""
    path = cache / f"suite_{arch}_{tag}_e{epochs}_s{seed}.pt"
    model = (ARCHITECTURES[arch] if build is None else build)()
    if path.exists():
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["state"])
        return model.eval(), float(blob["seconds"])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_classifier(model, train, epochs=epochs, seed=seed)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "seconds": seconds}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return model, seconds


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    full = fashion_mnist("train", args.data)
    test = fashion_mnist("test", args.data)
    n = len(full)
    train = Subset(full, range(n - VALIDATION))
    val = Subset(full, range(n - VALIDATION, n - VALIDATION + args.search_samples))
    labels = dataset_labels(train)
    test_labels = dataset_labels(test)
    g = torch.Generator().manual_seed(args.seed)
    eval_train = Subset(train, torch.randperm(len(train), generator=g)[: args.eval_train].sort().values.tolist())
    rows = []
    memory_jobs = []  # (row, fn): training-free methods re-run at the end for their exact peak memory
    for arch in args.archs:
        original, _ = cached_model(arch, train, args.epochs[arch], args.seed, args.cache_dir, "original")
        print(f"[{arch}] original model ready", flush=True)
        for c in args.classes:
            retain_all = [i for i, y in enumerate(labels.tolist()) if y != c]
            forget_all = [i for i, y in enumerate(labels.tolist()) if y == c]
            gc = torch.Generator().manual_seed(args.seed + c)
            forget_idx, retain_idx = draw_samples(labels, c, SUITE_PER_CLASS, None, gc)  # gc draws on below
            retain_sample, forget_sample = Subset(train, retain_idx), Subset(train, forget_idx)
            retain_budget = Subset(train, sorted(torch.tensor(retain_all)[torch.randperm(len(retain_all), generator=gc)[: args.retain_budget]].tolist()))
            forget_set = Subset(train, forget_all)
            forget_test = Subset(test, torch.nonzero(test_labels == c).flatten().tolist())
            probe_train = Subset(train, torch.randperm(len(train), generator=gc)[: args.probe_samples].sort().values.tolist())

            def record(method: str, model: nn.Module, seconds: float, peak: int, extra: dict | None = None):
                ev = evaluate_forgetting(model, eval_train, test, [c], seed=args.seed)
                ev["probe_forget_test"] = probe_audit(model, probe_train, forget_test, args.seed)
                row = {"arch": arch, "forget_class": c, "method": method, "seconds": seconds, "peak_bytes": peak, **ev, **(extra or {})}
                rows.append(row)
                print(f"[{arch} class {c}] {method:<18} {seconds:8.2f}s  retain_test {ev['retain_test']:6.2f}  "
                      f"forget_test {ev['forget_test']:6.2f}  mia {ev['mia']:6.2f}  probe {ev['probe_forget_test']:6.2f}", flush=True)

            record("original", original, 0.0, 0)
            retrained, t_retrain = cached_model(arch, Subset(train, retain_all), args.epochs[arch], args.seed, args.cache_dir, f"retrain{c}")
            record("retrain", retrained, t_retrain, 0, {"note": "cached; seconds from its training run"})

            search = search_alphas(original, forget_sample, retain_sample, val, [c],
                                   alpha_r_grid=args.alpha_r_grid, alpha_f_grid=args.alpha_f_grid)
            a_r, a_f = search.alpha_r, search.alpha_f
            # functools.partial binds this iteration's model, samples and alphas: the memory pass
            # re-runs these after the loop, when the loop variables point elsewhere
            common = dict(alpha_r=a_r, alpha_f=a_f, inplace=False)
            training_free = {
                "deepunlearn": partial(unlearn, original, forget_sample, retain_sample, **common),
                # the default call: α chosen on held-out parts of the same samples, its time counted
                "deepunlearn-auto": partial(unlearn, original, forget_sample, retain_sample, classes=[c], inplace=False),
                "deepunlearn-pure": partial(_pure, unlearn, original, forget_sample, retain_sample, **common),
                "paper-procedure": partial(unlearn_paper, original, forget_sample, retain_sample, conv_crop=True,
                                           max_patches=10000, **common),
            }
            for name, fn in training_free.items():
                with measure("cpu") as m:
                    rep = fn()
                extra = {"alpha_r": rep.alpha_r, "alpha_f": rep.alpha_f, "alpha_f_head": rep.alpha_f_head,
                         **({"search_seconds": search.seconds} if name == "deepunlearn" else {})}
                record(name, rep.model, m.seconds, m.peak_bytes, extra)
                memory_jobs.append((rows[-1], fn))
            for name in args.methods:
                opts = dict(args.baseline_options.get(name, {}))
                with measure("cpu") as m:
                    rep = BASELINES[name](original, forget_set, retain_budget, seed=args.seed, **opts)
                record(name, rep.model, m.seconds, m.peak_bytes, {"options": rep.options, "peak_is_lower_bound": True})
    exact_rss_peaks()  # after every timing: it slows allocation-heavy code
    for row, fn in memory_jobs:
        with measure("cpu") as m:
            fn()
        row["peak_bytes"] = m.peak_bytes
    return {"rows": rows}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread (population std) over forget classes per (arch, method), with gaps to retrain."""
    out = []
    keys = sorted({(r["arch"], r["method"]) for r in rows}, key=lambda k: (k[0], _ORDER.index(k[1]) if k[1] in _ORDER else 99))
    for arch, method in keys:
        sel = [r for r in rows if r["arch"] == arch and r["method"] == method]
        ref = {r["forget_class"]: r for r in rows if r["arch"] == arch and r["method"] == "retrain"}
        s = {"arch": arch, "method": method, "classes": len(sel)}
        for k in (*METRICS, "seconds", "peak_bytes"):
            vals = [float(r[k]) for r in sel]
            s[k] = statistics.fmean(vals)
            s[k + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        for k in METRICS:
            gaps = [abs(r[k] - ref[r["forget_class"]][k]) for r in sel if r["forget_class"] in ref]
            s[k + "_gap"] = statistics.fmean(gaps) if gaps else math.nan
        out.append(s)
    return out


_ORDER = ["original", "retrain", "deepunlearn", "deepunlearn-auto", "deepunlearn-pure", "paper-procedure", *BASELINES]


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [f"# Unlearning comparison on Fashion-MNIST ({meta['device']})", "",
             f"Mean ± spread over forget classes {meta['classes']}; accuracies and MIA in %; gap = mean |method − retrain|. "
             "probe = accuracy of a linear probe on the penultimate features for the forget-class test samples. "
             "Peak memory: extra CPU RSS, exact for the training-free methods (re-measured after all timings), "
             "a lower bound for the training baselines.", "",
             "| arch | method | retain test | forget test | MIA | MIA gap | probe | time (s) | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['arch']} | {s['method']} | {s['retain_test']:.2f} ± {s['retain_test_std']:.2f} | "
            f"{s['forget_test']:.2f} ± {s['forget_test_std']:.2f} | {s['mia']:.1f} | {s['mia_gap']:.1f} | "
            f"{s['probe_forget_test']:.1f} | {s['seconds']:.2f} | {s['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def targets(summary: list[dict]) -> list[str]:
    """The issue's targets for deepunlearn, checked per architecture (each line says met or missed)."""
    out = []
    for arch in sorted({s["arch"] for s in summary}):
        by = {s["method"]: s for s in summary if s["arch"] == arch}
        du, orig = by.get("deepunlearn"), by.get("original")
        if not du or not orig:
            continue
        out.append(f"{arch}: forget test {du['forget_test']:.2f}% (target <= 1%): {'met' if du['forget_test'] <= 1 else 'MISSED'}")
        drop = orig["retain_test"] - du["retain_test"]
        out.append(f"{arch}: retain test drop {drop:.2f} points (target <= 1.5): {'met' if drop <= 1.5 else 'MISSED'}")
        trained = [s for m, s in by.items() if m in BASELINES and m != "retrain"]
        if trained:
            best = min(trained, key=lambda s: s["mia_gap"])
            out.append(f"{arch}: MIA gap {du['mia_gap']:.1f} vs best baseline {best['method']} {best['mia_gap']:.1f}: "
                       f"{'met' if du['mia_gap'] <= best['mia_gap'] else 'MISSED'}")
            ok = [s for s in trained if s["forget_test"] <= 5]
            usable = [s for s in ok if orig["retain_test"] - s["retain_test"] <= 5]
            for pool, what in ((ok, "forget <= 5%"), (usable, "forget <= 5% and retain within 5 points")):
                if pool:
                    fastest = min(pool, key=lambda s: s["seconds"])
                    ratio = fastest["seconds"] / du["seconds"]
                    out.append(f"{arch}: {ratio:.1f}x less time than {fastest['method']} (fastest baseline with {what}; "
                               f"target 10x): {'met' if ratio >= 10 else 'MISSED'}")
        if "paper-procedure" in by:
            p = by["paper-procedure"]
            ratio = p["seconds"] / du["seconds"]
            out.append(f"{arch}: {ratio:.1f}x less time than the paper's procedure (target 5x): {'met' if ratio >= 5 else 'MISSED'}; "
                       f"peak memory {du['peak_bytes'] / 2**20:.0f} vs {p['peak_bytes'] / 2**20:.0f} MiB: "
                       f"{'lower' if du['peak_bytes'] < p['peak_bytes'] else 'NOT lower'}")
    return out


def figures(summary: list[dict], out: Path) -> None:
    require("matplotlib", "metrics", "the suite's figures").use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({s["arch"] for s in summary})
    fig, axes = plt.subplots(len(archs), 1, figsize=(11, 3.2 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs):
        sel = [s for s in summary if s["arch"] == arch]
        x = np.arange(len(sel))
        for i, (k, label) in enumerate([("retain_test", "retain test acc"), ("forget_test", "forget test acc"), ("mia", "MIA efficacy")]):
            ax.bar(x + (i - 1) * 0.27, [s[k] for s in sel], 0.27, yerr=[s[k + "_std"] for s in sel], label=label)
        ax.set_xticks(x, [s["method"] for s in sel], rotation=20, ha="right")
        ax.set_ylim(0, 119)
        ax.set_ylabel("%")
        ax.set_title(f"{arch}: mean over forget classes")
        ax.legend(ncol=3, loc="upper center", frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for arch, marker in zip(archs, "os^v"):
        for s in summary:
            if s["arch"] != arch or s["method"] == "original":
                continue
            ax.scatter(max(s["seconds"], 1e-3), s["retain_test"] * (100 - s["forget_test"]) / 100, marker=marker)
            ax.annotate(f"{s['method']} ({arch})", (max(s["seconds"], 1e-3), s["retain_test"] * (100 - s["forget_test"]) / 100), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, log)")
    ax.set_ylabel("retain acc × (100 − forget acc) / 100")
    ax.set_title("Time against quality (higher and further left is better)")
    fig.tight_layout()
    fig.savefig(out / "time_vs_quality.png", dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepunlearn.experiments.suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one model, one class, small budgets: a few minutes")
    p.add_argument("--archs", nargs="+", choices=sorted(ARCHITECTURES), default=None)
    p.add_argument("--classes", nargs="+", type=int, default=None)
    p.add_argument("--methods", nargs="+", choices=[m for m in BASELINES if m != "retrain"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/suite[-quick]")
    p.add_argument("--data", type=Path, default=None)
    a = p.parse_args(argv)
    a.archs = a.archs or (["smallcnn"] if a.quick else ["smallcnn", "resnet18", "vit"])
    a.classes = a.classes or ([0] if a.quick else [0, 2, 7])
    a.methods = a.methods or [m for m in BASELINES if m != "retrain"]
    a.epochs = {k: (1 if a.quick else 4) for k in ARCHITECTURES}
    a.retain_budget = 3000 if a.quick else 10000
    a.eval_train = 3000 if a.quick else 10000
    a.search_samples = 2000 if a.quick else 3000  # held-out images scored per alpha pair
    a.probe_samples = 2000 if a.quick else 5000
    a.alpha_r_grid = (10.0, 100.0, 1000.0) if a.quick else (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    a.alpha_f_grid = (3.0, 30.0, 100.0) if a.quick else (0.25, 0.5, 0.9, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    a.baseline_options = {"unsir": {"noise_steps": 20}} if a.quick else {}
    a.out = a.out or Path("benchmarks/results") / ("suite-quick" if a.quick else "suite")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    summary = summarise(result["rows"])
    meta = {"device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
            "extension": ops.extension_info(), "archs": args.archs, "classes": args.classes, "quick": args.quick,
            "epochs": args.epochs, "retain_budget_for_training_baselines": args.retain_budget,
            "eval_train_samples": args.eval_train, "wall_seconds": time.perf_counter() - t0}
    checks = targets(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "targets": checks, "rows": result["rows"]}, indent=2, default=str))
    md = markdown(summary, meta) + "\n## Targets\n\n" + "\n".join(f"- {c}" for c in checks) + "\n"
    (args.out / "results.md").write_text(md)
    figures(summary, args.out)
    print("\n" + md)
    print(f"wrote {args.out}/results.json, results.md, quality.png, time_vs_quality.png ({meta['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
