"""Where one ImageNet-shape unlearning call spends its time, phase by phase, on the kernels.

    python benchmarks/profile_unlearn.py                         # GPU: ViT-B/16 and ResNet-50, 1000 images a side
    python benchmarks/profile_unlearn.py --device cpu --images 4 --archs resnet18   # a smoke run

For each architecture (torchvision, random weights and images, 224x224, bf16 autocast, float32
statistics) three phases are timed apart from the profiler, then profiled:

* ``forward``: the forward passes over the forget images alone (the floor of collecting);
* ``collect``: :func:`~deepunlearn.collect_statistics` over the same images;
* ``solve``: every new weight computed from both sides' statistics (what ``unlearn`` does
  between collecting and writing), with the paper's ImageNet scales, by the device's default; the
  same with same-width factors batched and inverted (applied by GEMMs), batched and applied by
  triangular solves, and each input factored alone;
* with ``--choose``, one whole ``unlearn`` call with both scales chosen automatically, and the
  choice split into its parts (``deepunlearn/profiled.py``: decompositions or factors, edits,
  weight writes, forget and retain scoring, the head's re-fit; host wall seconds of each, which
  on a GPU include the waits for the device).

``--task`` gives the models a 10-class head fitted to class-structured images, as
``bench_imagenet.py --task`` does, so the choice can reach its target (with random weights it
scores every candidate); ``--phases`` profiles only the named phases. The results are written
after every phase, so a run cut short keeps what it measured.

Per phase: wall seconds, the device's busy seconds (the sum of its kernels' times), the kernel
count, host synchronisations, and the costliest kernels. Wall well above busy means launch
latency or host work; the busy difference between ``collect`` and ``forward`` is what the
statistics themselves cost on the device. Writes ``profile_unlearn_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_imagenet import FIXED_ALPHAS, RESULTS, forget_and_retain_images, forward_only  # noqa: E402
from common import device_name, sync, timed, write_results  # noqa: E402

import deepunlearn  # noqa: E402
from deepunlearn.plan import layer_moments, plan_edits_with, solved_edits, traces  # noqa: E402
from deepunlearn.layers import find_targets  # noqa: E402
from deepunlearn.profiled import CHOICE_PREFIX  # noqa: E402

TOP = 12  # kernels (or host ops) listed per phase
CHOICE_PHASE = "unlearn, α chosen"  # profiled with --choose
PHASES = ("forward", "collect", "solve", "solve, inverse factors", "solve, triangular solves", "solve, one input at a time",
          CHOICE_PHASE)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::_local_scalar_dense")


def phases(model, xf, xr, args, autocast):
    """The three phases as callables, the solve's statistics collected beforehand."""
    kw = dict(batch_size=args.batch_size, dtype=torch.float32, autocast=autocast)
    stats_f = deepunlearn.collect_statistics(model, xf, **kw)
    stats_r = deepunlearn.collect_statistics(model, xr, **kw)
    targets, _ = find_targets(model)
    device = xf.device

    def solve(batch_bytes: int | None = None, inverse_factor: bool | None = None):
        moments_f = layer_moments(targets, stats_f, device)
        moments_r = layer_moments(targets, stats_r, device)
        edit_for = solved_edits(targets, moments_f, moments_r, FIXED_ALPHAS["alpha_f"], FIXED_ALPHAS["alpha_r"],
                                batch_bytes=batch_bytes, inverse_factor=inverse_factor)
        return plan_edits_with(targets, edit_for, traces(moments_f), traces(moments_r))

    calls = [lambda: forward_only(model, xf, args.batch_size, autocast),
             lambda: deepunlearn.collect_statistics(model, xf, **kw),
             solve,
             lambda: solve(inverse_factor=True),
             lambda: solve(inverse_factor=False),
             lambda: solve(batch_bytes=0, inverse_factor=False),
             lambda: deepunlearn.unlearn(model, xf, xr, inplace=False, **kw)]
    return {name: call for name, call in zip(PHASES, calls) if args.choose or name != CHOICE_PHASE}


def where_time_goes(fn, device: torch.device, repeat: int = 2) -> dict:
    fn()  # warm
    wall = min(timed(fn, device)[0] for _ in range(repeat))
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        fn()
        sync(device)
    averages = prof.key_averages()
    host = {e.key: e for e in averages if e.device_type == DeviceType.CPU}
    syncs = {k: host[k].count for k in SYNC_EVENTS if k in host}
    if gpu:
        kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
        seconds = {e.key: e.self_device_time_total / 1e6 for e in kernels}
    else:
        kernels = [e for e in averages if e.key.startswith(("aten::", "deepunlearn::"))]
        seconds = {e.key: e.self_cpu_time_total / 1e6 for e in kernels}
    counts = {e.key: e.count for e in kernels}
    top = sorted(seconds, key=seconds.get, reverse=True)[:TOP]
    parts = {k[len(CHOICE_PREFIX):]: {"s": e.cpu_time_total / 1e6, "count": e.count} for k, e in host.items()
             if k.startswith(CHOICE_PREFIX)}
    return {"wall_s": wall, "busy_s": sum(seconds.values()) if gpu else None, "kernels": sum(counts.values()),
            "syncs": syncs, "top": [{"name": k[:110], "s": seconds[k], "count": counts[k]} for k in top],
            "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["s"]))}


def markdown(result: dict) -> str:
    lines = [f"# Where an unlearning call spends its time on {result['device']}", "",
             f"{result['images']} images a side at 224x224, bf16 autocast, batch {result['batch_size']}, "
             "float32 statistics; ``solve`` covers both sides' solves and every new weight.", ""]
    for arch, res in result["archs"].items():
        lines += [f"## {arch}", "", "| phase | wall (s) | device busy (s) | kernels | host syncs |", "|---|---|---|---|---|"]
        for name, p in res.items():
            busy = "—" if p["busy_s"] is None else f"{p['busy_s']:.3f}"
            lines.append(f"| {name} | {p['wall_s']:.3f} | {busy} | {p['kernels']} | {sum(p['syncs'].values())} |")
        for name, p in res.items():
            if p.get("parts"):
                lines += ["", f"{name}: the choice by part (host wall of each range, nested ones inside theirs)", "",
                          "| part | s | times |", "|---|---|---|"]
                lines += [f"| {k} | {v['s']:.3f} | {v['count']} |" for k, v in p["parts"].items()]
            lines += ["", f"{name}: costliest", "", "| kernel / op | s | count |", "|---|---|---|"]
            lines += [f"| `{t['name']}` | {t['s']:.4f} | {t['count']} |" for t in p["top"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archs", nargs="+", default=["vit_b_16", "resnet50"])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--choose", action="store_true", help="also profile a whole call with both scales chosen")
    p.add_argument("--task", action="store_true", help="a head fitted to class-structured images (the choice can reach its target)")
    p.add_argument("--phases", nargs="+", default=None, choices=PHASES, help="profile only these phases")
    p.add_argument("--repeat", type=int, default=2, help="timed runs of each phase (the fastest is kept)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/profile_unlearn_<device>")
    args = p.parse_args(argv)
    if args.phases is not None and CHOICE_PHASE in args.phases and not args.choose:
        p.error(f"the phase {CHOICE_PHASE!r} is profiled with --choose")
    device = torch.device(args.device)
    autocast = torch.bfloat16
    result = {"device": device_name(device), "device_type": device.type, "images": args.images,
              "batch_size": args.batch_size, "task": args.task, "archs": {}}
    stem = args.out or RESULTS / f"profile_unlearn_{device.type}"
    for arch in args.archs:
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None).to(device).eval()
        xf, xr, _ = forget_and_retain_images(model, args.images, device, 0, args.task, args.batch_size, autocast)
        res = result["archs"][arch] = {}
        for name, fn in phases(model, xf, xr, args, autocast).items():
            if args.phases is not None and name not in args.phases:
                continue
            r = res[name] = where_time_goes(fn, device, args.repeat)
            print(f"{arch} {name}: wall {r['wall_s']:.3f}s busy {r['busy_s']} kernels {r['kernels']} syncs {r['syncs']}"
                  + "".join(f"; {k} {v['s']:.3f}s" for k, v in r["parts"].items()), flush=True)
            write_results(stem, result, markdown(result))  # what was measured so far, in case the run is cut short
        del model, xf, xr
    write_results(stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
