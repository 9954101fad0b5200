"""Where each op's time goes, on the kernel benchmark's rows (the same shapes, batches and dtypes).

    python benchmarks/profile_kernels.py [--device cpu|cuda] [--quick] [--calls N] [--layers NAME ...]

For each row, the op and the pure-PyTorch path it replaces each run ``--calls`` times back to back
under ``torch.profiler`` after a warm-up. Per call it records the wall time (timed apart from the
profiler, whose own cost would count), the device's busy time (the sum of its kernels' times, GPU
only) and the costliest kernels with their counts (on the CPU: the ATen ops by their own host
time). A wall time well above the busy time means launch latency or host work; one kernel far
above the rest names the part to improve. Writes ``benchmarks/results/profile_<device>.json`` and
``.md``.
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
from bench_kernels import RESULTS, Case, cases, variant  # noqa: E402
from common import block_time, device_name, sync, write_results  # noqa: E402

from deepunlearn import ops as extension  # noqa: E402

TOP = 5  # kernels (or ATen ops) kept per side


def where_time_goes(fn, device: torch.device, calls: int) -> dict:
    """Per call of ``fn``: wall seconds, device-busy seconds (GPU), and the top kernels or ops."""
    fn()
    wall = block_time(fn, device, calls)
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    if gpu:  # kernels, copies and fills: the events that ran on the device
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        seconds = {e.key: e.self_device_time_total / 1e6 for e in events}
    else:  # ATen ops by their own host time (what they spent outside the ops they called)
        events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "deepunlearn::"))]
        seconds = {e.key: e.self_cpu_time_total / 1e6 for e in events}
    counts = {e.key: e.count for e in events}
    top = sorted(seconds, key=seconds.get, reverse=True)[:TOP]
    return {"wall_s": wall, "busy_s": sum(seconds.values()) / calls if gpu else None,
            "top": [{"name": k, "s": seconds[k] / calls, "count": counts[k] / calls} for k in top]}


def profile_case(case: Case, device: torch.device, calls: int) -> dict:
    return {"op": case.op, "layer": case.layer, "d": case.d, "dtype": case.dtype, **case.info,
            "pure": where_time_goes(case.pure, device, calls), "op_side": where_time_goes(case.run_op, device, calls)}


def markdown(result: dict) -> str:
    gpu = result["device_type"] == "cuda"
    lines = [f"# Where the ops' time goes on {result['device']} (torch {result['torch']})", "",
             f"Per call, {result['calls']} calls back to back under torch.profiler. "
             + ("busy: the sum of the device's kernel times; " if gpu else "")
             + f"top: the {TOP} costliest {'kernels' if gpu else 'ATen ops (own host time)'}, ms x calls per call.", "",
             "| op | layer | dtype | side | wall (ms) | " + ("busy (ms) | " if gpu else "") + "top |",
             "|---|---|---|---|---|" + ("---|" if gpu else "") + "---|"]
    for r in result["rows"]:
        for side in ("pure", "op_side"):
            p = r[side]
            top = "; ".join(f"{t['name'][:70]} {t['s'] * 1e3:.3f} x{t['count']:g}" for t in p["top"])
            busy = f"{p['busy_s'] * 1e3:.3f} | " if gpu else ""
            lines.append(f"| {r['op']} | {r['layer']} | {variant(r)} | {side.split('_')[0]} | "
                         f"{p['wall_s'] * 1e3:.3f} | {busy}{top} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the benchmark's small batches (smoke run)")
    p.add_argument("--calls", type=int, default=5, help="calls per profile (default 5)")
    p.add_argument("--layers", nargs="*", help="only the rows whose layer name contains one of these")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if not extension.loaded():
        sys.exit(f"the extension is not loaded: {extension.extension_info()}")
    if a.calls < 1:
        sys.exit(f"--calls must be at least 1, got {a.calls}")
    result = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
              "extension": extension.extension_info(), "quick": a.quick, "calls": a.calls, "rows": []}
    for case in cases(device, a.quick, lambda layer: not a.layers or any(name in layer for name in a.layers)):
        result["rows"].append(profile_case(case, device, a.calls))
        r = result["rows"][-1]
        print(r["layer"], variant(r), f"pure {r['pure']['wall_s'] * 1e3:.3f} ms, op {r['op_side']['wall_s'] * 1e3:.3f} ms",
              flush=True)
    if not result["rows"]:
        sys.exit(f"no benchmark row matches --layers {a.layers}")
    text = markdown(result)
    write_results(a.out / (f"profile_{device.type}" + ("_quick" if a.quick else "")), result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
