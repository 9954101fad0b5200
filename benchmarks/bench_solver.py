"""The solve and its memory: deepunlearn against the paper's procedure and a plain implementation.

    python benchmarks/bench_solver.py                                   # both settings below, CPU
    python benchmarks/bench_solver.py --setting vgg11_bn_cifar --images 100 100   # a smaller run
    python benchmarks/bench_solver.py --setting vgg11_bn_cifar --repeat 3          # median of three runs each

Settings (random weights; timing and memory do not depend on them):

* ``vgg11_bn_cifar``: VGG-11-BN for 32×32 inputs (torchvision's features, a 512-512-10 classifier),
  900 forget + 900 retain images: the paper's CIFAR-10 setting.
* ``resnet18_224``: torchvision's ``resnet18`` at 224×224, 1 forget + 18 retain images (a deletion
  request with one photograph per class).
* ``vit_b_16_224``: torchvision's ``vit_b_16`` at 224×224, 64 + 64 images (run it with
  ``--setting vit_b_16_224``; not in the default set, it takes minutes per method here).
* ``vgg11_bn_224``: torchvision's ``vgg11_bn`` at 224×224, 50 + 50 images (``--images 100 100``
  for the other size): its first classifier layer is 25,088 wide, a 2.5 GB float32 second
  moment per side; run with ``--methods deepunlearn forward``.

Each method runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own:

* ``deepunlearn``: :func:`deepunlearn.unlearn` at its defaults (float32, the weight-side solve
  where it costs fewer flops);
* ``formed-M-float64``: the same with every ``M`` formed and float64 statistics (the defaults
  before the weight-side solve);
* ``plain-float32``: the anchor a user could write in an afternoon: streamed float32 covariance,
  ``M = α Ĉ ((α−1)Ĉ + I)⁻¹`` by a Cholesky solve, ``W ← W − (W − W M_r) M_f``;
* ``paper``: the paper's procedure (:func:`deepunlearn.reference.unlearn_paper`: activation
  matrices of one batch, an SVD per layer, the paper's 10,000-patch sampling of conv inputs);
* ``forward``: the plain forward passes over the same images (batches of 100, no autograd): the
  floor any method that looks at the data pays.

Ratios are of times and peaks measured in the same run. Results:
``benchmarks/results/solver_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"vgg11_bn_cifar": (32, 900, 900), "resnet18_224": (224, 1, 18), "vit_b_16_224": (224, 64, 64),
            "vgg11_bn_224": (224, 50, 50)}  # size, forget, retain
METHODS = ("deepunlearn", "formed-M-float64", "plain-float32", "paper", "forward")


def build_model(setting: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    if setting == "resnet18_224":
        return torchvision.models.resnet18(weights=None).eval()
    if setting == "vit_b_16_224":
        return torchvision.models.vit_b_16(weights=None).eval()
    if setting == "vgg11_bn_224":
        return torchvision.models.vgg11_bn(weights=None).eval()
    model = torchvision.models.vgg11_bn(weights=None)
    model.avgpool = nn.Identity()  # 32×32 inputs leave 512×1×1 after the five pools
    model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return model.eval()


def plain_float32(model: nn.Module, xf: torch.Tensor, xr: torch.Tensor, alpha_r: float, alpha_f: float,
                  batch_size: int) -> dict:
    """Streamed float32 statistics (always the d × d sums), M formed by one Cholesky solve per side,
    the two-GEMM edit."""
    from deepunlearn.plan import layer_moments
    from deepunlearn.layers import find_targets
    from deepunlearn.projection import projection_cholesky
    from deepunlearn.collect import collect_statistics

    t0 = time.perf_counter()
    targets, _ = find_targets(model)
    cpu = torch.device("cpu")
    moments_f, moments_r = (layer_moments(targets, collect_statistics(model, x, dtype=torch.float32, batch_size=batch_size,
                                                                      keep_vectors=False), cpu) for x in (xf, xr))
    t1 = time.perf_counter()
    with torch.no_grad():
        for t in targets:
            (cf, _), (cr, _) = moments_f[t.slots], moments_r[t.slots]
            if cf is None:
                continue
            m_f = projection_cholesky(cf, alpha_f)
            m_r = torch.zeros_like(m_f) if cr is None else projection_cholesky(cr, alpha_r)
            w = t.as_matrices(t.weight().detach())
            t.weight().copy_((w - (w - w @ m_r) @ m_f).reshape(t.weight().shape))
    t2 = time.perf_counter()
    return {"total": t2 - t0, "collect": t1 - t0, "solve": t2 - t1}


def run_one(setting: str, method: str, n_forget: int, n_retain: int, batch_size: int) -> dict:
    """One method on fresh data, in this process (called in a child process)."""
    import deepunlearn
    from deepunlearn import plan as planning
    from deepunlearn.reference import unlearn_paper

    size, _, _ = SETTINGS[setting]
    model = build_model(setting)
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(n_forget, 3, size, size, generator=g)
    xr = torch.randn(n_retain, 3, size, size, generator=g)
    alpha_r, alpha_f = 100.0, 3.0
    t0 = time.perf_counter()
    if method == "plain-float32":
        out = plain_float32(model, xf, xr, alpha_r, alpha_f, batch_size)
    elif method == "forward":
        with torch.no_grad():
            for x in (xf, xr):
                for batch in x.split(batch_size):
                    model(batch)
        out = {"total": time.perf_counter() - t0, "collect": 0.0, "solve": 0.0}
    else:
        if method == "paper":
            report = unlearn_paper(model, xf, xr, alpha_r=alpha_r, alpha_f=alpha_f, batch_size=max(n_forget, n_retain),
                                   conv_crop=False, max_patches=10_000)
        else:
            kw = {}
            if method == "formed-M-float64":  # every M formed, from the d × d sums, in float64
                solver_of = planning.side_solver
                planning.side_solver = lambda moment, alpha, rows, vectors, way, solver, **kw: solver_of(
                    moment, alpha, rows, vectors, "formed", solver, **kw)
                kw["dtype"] = torch.float64
            report = deepunlearn.unlearn(model, xf, xr, alpha_r=alpha_r, alpha_f=alpha_f, batch_size=batch_size, **kw)
        s = report.seconds
        out = {"total": time.perf_counter() - t0, "collect": s["collect_forget"] + s["collect_retain"],
               "solve": s["decompose"] + s["edit"]}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def child(setting: str, method: str, n_forget: int, n_retain: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", setting, method, str(n_forget), str(n_retain), str(batch_size)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = [f"# The solve and its memory on {result['device_name']} (torch {result['torch']})", "",
             f"Each method in a fresh process, {result.get('batch_size', 100)} images per forward pass; seconds and peak "
             "resident memory (ru_maxrss) of that process"
             + (f"; of {result['repeat']} runs per method, taken in turn, the one of median total time (every run's "
                "total in the last column)" if result.get("repeat", 1) > 1 else "") + ".", "",
             "| setting | images (forget + retain) | method | total (s) | statistics (s) | solve + edit (s) | peak RSS (MB) |"
             + (" runs' totals (s) |" if result.get("repeat", 1) > 1 else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if result.get("repeat", 1) > 1 else "")]
    for r in result["settings"]:
        for m, x in r["methods"].items():
            if "error" in x:
                lines.append(f"| {r['setting']} | {r['forget']} + {r['retain']} | {m} | error: {x['error']} | | | |")
                continue
            lines.append(f"| {r['setting']} | {r['forget']} + {r['retain']} | {m} | {x['total']:.2f} | {x['collect']:.2f} | "
                         f"{x['solve']:.2f} | {x['peak_rss_bytes'] / 1e6:.0f} |"
                         + (" " + ", ".join(f"{t:.2f}" for t in x["totals"]) + " |" if "totals" in x else ""))
    lines.append("")
    for r in result["settings"]:
        lines.append(f"- {r['setting']}: " + "; ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    return "\n".join(lines) + "\n"


def median_run(runs: list[dict]) -> dict:
    """The run of median total time (the lower middle one of an even count), with every run's total
    beside it; an error if any run failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    run = sorted(runs, key=lambda r: r["total"])[(len(runs) - 1) // 2]
    return run | ({"totals": [r["total"] for r in runs]} if len(runs) > 1 else {})


def ratios(methods: dict) -> dict:
    ours = methods.get("deepunlearn", {})
    out = {}
    if "total" not in ours:
        return out
    for other, label in (("paper", "paper / deepunlearn time"), ("plain-float32", "plain-float32 / deepunlearn time"),
                         ("formed-M-float64", "formed-M-float64 / deepunlearn time")):
        if "total" in methods.get(other, {}):
            out[label] = methods[other]["total"] / ours["total"]
    for other, label in (("paper", "deepunlearn / paper peak RSS"), ("formed-M-float64", "deepunlearn / formed-M-float64 peak RSS")):
        if "peak_rss_bytes" in methods.get(other, {}):
            out[label] = ours["peak_rss_bytes"] / methods[other]["peak_rss_bytes"]
    if "total" in methods.get("forward", {}):
        out["deepunlearn / forward time"] = ours["total"] / methods["forward"]["total"]
    if "solve" in methods.get("formed-M-float64", {}):
        out["deepunlearn / formed-M-float64 solve time"] = ours["solve"] / methods["formed-M-float64"]["solve"]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        setting, method, nf, nr, bs = argv[1:6]
        print(json.dumps(run_one(setting, method, int(nf), int(nr), int(bs))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=["vgg11_bn_cifar", "resnet18_224"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--images", nargs=2, type=int, metavar=("FORGET", "RETAIN"), help="override the setting's image counts")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass (every method)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each method, taken in turn; each method's run of median total time is reported")
    p.add_argument("--out", type=Path, default=RESULTS / "solver_cpu")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error(f"--repeat must be at least 1, got {a.repeat}")
    result = {"device_name": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch_size": a.batch_size, "repeat": a.repeat, "settings": []}
    for setting in a.setting:
        nf, nr = a.images or SETTINGS[setting][1:]
        runs: dict[str, list[dict]] = {m: [] for m in a.methods}
        for _ in range(a.repeat):  # in turn, so that a slow spell of the machine falls on every method
            for m in a.methods:
                runs[m].append(child(setting, m, nf, nr, a.batch_size))
                print(setting, m, runs[m][-1], flush=True)
        methods = {m: median_run(r) for m, r in runs.items()}
        result["settings"].append({"setting": setting, "forget": nf, "retain": nr, "methods": methods, "ratios": ratios(methods)})
        write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
