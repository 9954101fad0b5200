"""Each compiled op against the pure-PyTorch path it replaces, side by side in one run.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--quick]

Compares linear covariance with ``cov.addmm_(xᵀ, x)``, conv covariance with ``F.unfold`` +
``addmm`` (per group), and the fused edit with the two-GEMM torch expression, on the real layer
shapes of ResNet-18 (CIFAR stem), VGG-11-BN and ViT-B/16. Prints a table of ratios (pure time
/ op time: above 1 means the op is faster) and writes
``benchmarks/results/kernels_<device>.json`` and ``.md`` with the device name.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import RESNET18_CIFAR, VGG11_BN, VIT_B16  # noqa: E402

import deepunlearn  # noqa: E402
from deepunlearn import _ext  # noqa: E402
from deepunlearn.evaluation import exact_rss_peaks, measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, device: torch.device, repeat: int) -> float:
    """Median wall seconds of ``fn`` over ``repeat`` runs after one warm-up (CUDA synchronised)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra(fn, device: torch.device) -> int:
    with measure(device) as m:
        fn()
    return m.peak_bytes


def bench_linear(shape, batch, device, dtype, repeat):
    n = batch * shape.tokens_per_sample
    x = torch.randn(n, shape.d, device=device, dtype=dtype)
    cov = torch.zeros(shape.d, shape.d, device=device, dtype=torch.float32)
    xf = x.float()

    def pure():
        cov.addmm_(xf.T, xf)

    def op():
        _ext.ops().linear_cov_accumulate_(cov, x)

    t_pure, t_op = timeit(pure, device, repeat), timeit(op, device, repeat)
    flops = 2.0 * n * shape.d**2
    return {"op": "linear_cov", "layer": shape.name, "d": shape.d, "rows": n, "dtype": str(dtype).split(".")[-1],
            "pure_s": t_pure, "op_s": t_op, "speedup": t_pure / t_op, "op_tflops_full_gemm_equiv": flops / t_op / 1e12}


def bench_conv(shape, batch, device, repeat):
    x = torch.randn(batch, shape.c_in, shape.size, shape.size, device=device)
    conv = torch.nn.Conv2d(shape.c_in, shape.c_in, shape.kernel, shape.stride, shape.padding, groups=shape.groups)
    geom = deepunlearn.covariance.ConvGeometry.of(conv)
    d = shape.d
    cov = torch.zeros(shape.groups, d, d, device=device)

    def pure():  # the unfolded matrix in memory, then one GEMM
        u = F.unfold(x, shape.kernel, padding=shape.padding, stride=shape.stride).transpose(1, 2).reshape(-1, d)
        cov[0].addmm_(u.T, u)

    def op():
        deepunlearn.covariance.accumulate_conv_(cov, x, geom)

    t_pure, t_op = timeit(pure, device, repeat), timeit(op, device, repeat)
    return {"op": "conv_cov", "layer": shape.name, "d": d, "batch": batch, "hw": shape.size,
            "pure_s": t_pure, "op_s": t_op, "speedup": t_pure / t_op,
            "pure_peak_extra_bytes": peak_extra(pure, device), "op_peak_extra_bytes": peak_extra(op, device)}


def bench_edit(shape, device, repeat):
    o, d = shape.d, shape.d
    w = torch.randn(1, o, d, device=device)
    m_r, m_f = torch.randn(1, d, d, device=device), torch.randn(1, d, d, device=device)

    def pure():
        return w - (w - w @ m_r) @ m_f

    def op():
        return _ext.ops().projected_edit(w, m_r, m_f)

    t_pure, t_op = timeit(pure, device, repeat), timeit(op, device, repeat)
    return {"op": "projected_edit", "layer": shape.name, "d": d, "pure_s": t_pure, "op_s": t_op,
            "speedup": t_pure / t_op, "pure_peak_extra_bytes": peak_extra(pure, device),
            "op_peak_extra_bytes": peak_extra(op, device)}


def main(argv=None) -> int:
    exact_rss_peaks()  # the memory column needs it; op and pure path pay the same page faults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small batches, few repeats (smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if not _ext.loaded():
        sys.exit(f"the extension is not loaded: {_ext.extension_info()}")
    gpu = device.type == "cuda"
    repeat = 3 if a.quick else (20 if gpu else 5)
    vit_batch = (1 if a.quick else (64 if gpu else 8))
    conv_batch = {"resnet18": 8 if a.quick else (256 if gpu else 32), "vgg11": 1 if a.quick else (32 if gpu else 2)}
    rows = []
    for s in VIT_B16:
        for dt in ([torch.float32, torch.bfloat16] if gpu else [torch.float32]):
            rows.append(bench_linear(s, vit_batch, device, dt, repeat))
            print(rows[-1], flush=True)
    for s in RESNET18_CIFAR + VGG11_BN:
        rows.append(bench_conv(s, conv_batch[s.name.split(".")[0]], device, repeat))
        print(rows[-1], flush=True)
    for s in VIT_B16:
        rows.append(bench_edit(s, device, repeat))
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {"device": name, "device_type": device.type, "torch": torch.__version__, "extension": _ext.extension_info(),
              "tf32": torch.backends.cuda.matmul.allow_tf32, "quick": a.quick, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{device.type}" + ("_quick" if a.quick else "")
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Kernel benchmark on {name} (torch {torch.__version__})", "",
             "speedup = pure-PyTorch time / op time, measured side by side in one run.", "",
             "| op | layer | d | pure (ms) | op (ms) | speedup | peak extra pure / op (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = (f"{r['pure_peak_extra_bytes'] / 2**20:.1f} / {r['op_peak_extra_bytes'] / 2**20:.1f}"
               if "pure_peak_extra_bytes" in r else "")
        label = r["layer"] + (f" ({r['dtype']})" if "dtype" in r else "")
        lines.append(f"| {r['op']} | {label} | {r['d']} | {r['pure_s'] * 1e3:.2f} | {r['op_s'] * 1e3:.2f} | {r['speedup']:.2f} | {mem} |")
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
