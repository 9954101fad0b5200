"""Each compiled op against the pure-PyTorch path it replaces, side by side in one run.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--quick] [--layers NAME ...]

Compares linear covariance with ``cov.addmm_(xᵀ, x)``, conv covariance with ``F.unfold`` +
``addmm`` (per group), and the fused edit with the two-GEMM torch expression, on the real layer
shapes of ResNet-18 (CIFAR stem), VGG-11-BN and ViT-B/16, on depthwise layers of MobileNetV2 and
ConvNeXt-T, strided ones (MobileNetV2, the ImageNet ResNet stem) and dilated ones (ResNet-50 at
output stride 8). Prints a table of ratios (pure time / op time: above 1 means the op is faster)
and writes ``benchmarks/results/kernels_<device>.json`` and ``.md`` with the device name. A sweep
then times the conv op with each of its exact forms forced (its ``form`` argument: ``direct``,
``shifted``, ``phases``, ``residues``, ``wgrad``) and as chosen (``auto``).

On a GPU it also measures the device's ceilings (bf16 / tf32 / fp32 matrix-multiply rates, copy
bandwidth) in the same run, adds bf16 rows (the pure path being its float32 twin, as in
``deepunlearn.ops.covariance``), tf32 rows (linear: the op with tf32 against the float32 ``addmm``;
conv: tf32 allowed on both sides), and sweeps the ops' tuning arguments (the linear op's output
tile and split-K slices, also on the stems' patch matrices; the conv op's chunk size).
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GPU_BLOCK_SECONDS, ceilings, device_name, median_time, paired_median_times,  # noqa: E402
                    tf32, timed, write_results)
from shapes import DEPTHWISE, DILATED, RESNET18_CIFAR, STRIDED, VGG11_BN, VIT_B16  # noqa: E402

import deepunlearn  # noqa: E402
import deepunlearn.ops.covariance  # noqa: E402
from deepunlearn import ops as extension  # noqa: E402
from deepunlearn.evaluation import exact_rss_peaks, measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def peak_extra(fn, device: torch.device) -> int:
    if device.type == "cpu":  # freed heap pages back to the OS, so that reusing them shows in the RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with measure(device) as m:
        fn()
    return m.peak_bytes


def _name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def under_tf32(fn, allow: bool, cudnn: bool | None = None):
    """``fn`` run with torch's tf32 switches set (see ``common.tf32``)."""
    def run():
        with tf32(allow, cudnn):
            return fn()
    return run


def cudnn_tf32(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """cuDNN's tf32 switch for a conv row: as cuBLAS's for float32, on (torch's default) for 16-bit
    inputs, which the weight-gradient form widens to float32, exact in tf32."""
    return allow_tf32 or dtype != torch.float32


@dataclass
class Case:
    """One row of the benchmark: the op and the pure-PyTorch path it replaces, ready to call."""
    op: str
    layer: str
    d: int
    dtype: str | None  # None: the edit (float32 only)
    pure: Callable[[], object]
    run_op: Callable[[], object]
    info: dict  # the row's sizes: rows (linear), batch and map side (conv)


def linear_case(shape, batch, device, dtype, op_tf32=False) -> Case:
    """``op_tf32``: the op runs with tf32 allowed, the float32 ``addmm`` without (the issue's target)."""
    n = batch * shape.tokens_per_sample
    x = torch.randn(n, shape.d, device=device, dtype=dtype)
    cov = torch.zeros(shape.d, shape.d, device=device, dtype=torch.float32)

    def pure():  # the pure twin: float32 rows, one full GEMM
        xf = x.float()
        cov.addmm_(xf.T, xf)

    def op():
        extension.library().linear_cov_accumulate_(cov, x)

    return Case("linear_cov", shape.name, shape.d, _name(dtype) + ("/tf32" if op_tf32 else ""),
                under_tf32(pure, False), under_tf32(op, op_tf32), {"rows": n})


def conv_module(shape) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(shape.c_in, shape.c_in, shape.kernel, shape.stride, shape.padding, shape.dilation,
                           groups=shape.groups)


def conv_case(shape, batch, device, dtype=torch.float32, allow_tf32=False, wgrad=False) -> Case:
    """``allow_tf32``: both sides with tf32 allowed (the GPU's float32 GEMMs on the tensor cores);
    ``wgrad``: the op with its weight-gradient form forced (``form="wgrad"``)."""
    x = torch.randn(batch, shape.c_in, shape.size, shape.size, device=device, dtype=dtype)
    geom = deepunlearn.patches.ConvGeometry.of(conv_module(shape))
    d = shape.d
    cov = torch.zeros(shape.groups, d, d, device=device)

    def pure():  # the unfolded matrix in memory (float32, as the pure twin), then one GEMM per group
        u = F.unfold(x.float(), shape.kernel, shape.dilation, shape.padding, shape.stride).transpose(1, 2)
        if shape.groups == 1:
            u = u.reshape(-1, d)
            cov[0].addmm_(u.T, u)
        else:  # columns (c, ky, kx) with the channels of each group together
            u = u.reshape(-1, shape.groups, d).transpose(0, 1)
            cov.baddbmm_(u.transpose(1, 2), u)

    def op():
        deepunlearn.ops.covariance.accumulate_conv_(cov, x, geom, form="wgrad" if wgrad else "auto")

    return Case("conv_cov", shape.name, d, _name(dtype) + ("/tf32" if allow_tf32 else ""),
                under_tf32(pure, allow_tf32), under_tf32(op, allow_tf32, cudnn_tf32(dtype, allow_tf32)),
                {"batch": batch, "hw": shape.size, **({"form": "wgrad"} if wgrad else {})})


def edit_case(shape, device) -> Case:
    o, d = shape.d, shape.d
    w = torch.randn(1, o, d, device=device)
    m_r, m_f = torch.randn(1, d, d, device=device), torch.randn(1, d, d, device=device)

    def pure():
        return w - (w - w @ m_r) @ m_f

    def op():
        return extension.library().projected_edit(w, m_r, m_f)

    return Case("projected_edit", shape.name, d, None, pure, op, {})


def batch_sizes(gpu: bool, quick: bool) -> tuple[int, dict[str, int]]:
    """Images per call: ViT-B/16's, and each conv model's (keyed by the layer name's first part)."""
    vit = 1 if quick else (256 if gpu else 8)
    conv = {"resnet18": 8 if quick else (256 if gpu else 32), "vgg11": 1 if quick else (32 if gpu else 2),
            **{m: 2 if quick else (64 if gpu else 8) for m in ("mobilenet_v2", "convnext_tiny", "resnet50")},
            "resnet50_os8": 1 if quick else (32 if gpu else 4)}
    return vit, conv


def cases(device: torch.device, quick: bool, keep: Callable[[str], bool] = lambda layer: True) -> Iterator[Case]:
    """Every row of the benchmark whose layer name ``keep`` accepts, in order, built one at a time
    (each holds its inputs)."""
    gpu = device.type == "cuda"
    vit_batch, conv_batch = batch_sizes(gpu, quick)
    variants = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)] if gpu else [(torch.float32, False)]
    for s in filter(lambda s: keep(s.name), VIT_B16):
        for dt, t32 in variants:
            yield linear_case(s, vit_batch, device, dt, op_tf32=t32)
    for s in filter(lambda s: keep(s.name), RESNET18_CIFAR + VGG11_BN + DEPTHWISE + STRIDED + DILATED):
        for dt, t32 in variants:
            yield conv_case(s, conv_batch[s.name.split(".")[0]], device, dt, allow_tf32=t32)
    # On a GPU, the weight-gradient form (off by default until these rows have been read) on every
    # layer it applies to: the candidate for 3x on the tensor cores.
    wgrad_layers = [s for s in RESNET18_CIFAR + VGG11_BN + DEPTHWISE if s.stride == 1 and s.dilation == 1]
    for s in filter(lambda s: gpu and keep(s.name), wgrad_layers):
        for dt, t32 in variants:
            yield conv_case(s, conv_batch[s.name.split(".")[0]], device, dt, allow_tf32=t32, wgrad=True)
    for s in filter(lambda s: keep(s.name), VIT_B16):
        yield edit_case(s, device)


def bench(case: Case, device: torch.device, repeat: int) -> dict:
    """The case's row: pure and op timed in turn, their ratio, and for the linear op its rate."""
    t_pure, t_op = paired_median_times([case.pure, case.run_op], device, repeat)
    row = {"op": case.op, "layer": case.layer, "d": case.d, **case.info, **({"dtype": case.dtype} if case.dtype else {}),
           "pure_s": t_pure, "op_s": t_op, "speedup": t_pure / t_op}
    if case.op == "linear_cov":
        row["op_tflops_full_gemm_equiv"] = 2.0 * case.info["rows"] * case.d**2 / t_op / 1e12
        if device.type == "cuda":  # the rate of one synchronised call too, launch latency included
            row["op_single_call_s"] = statistics.median(timed(case.run_op, device)[0] for _ in range(repeat))
    return row


def sweep_knobs(device, repeat, vit_batch, conv_batch) -> list[dict]:
    """GPU only: op time against the CUDA kernels' tuning arguments, and the linear op's rate against
    the number of rows."""
    rows = []
    ops = extension.library()

    def record(knob, value, layer, dtype, t, flops=None):
        rows.append({"knob": knob, "value": value, "layer": layer, "dtype": dtype, "op_s": t}
                    | ({"tflops_full_gemm_equiv": flops / t / 1e12} if flops else {}))
        print(rows[-1], flush=True)

    for s in VIT_B16:
        cov = torch.zeros(s.d, s.d, device=device)
        for images in (64, 256, 1000):  # default tiles: rate against the length of the sum
            x = torch.randn(images * s.tokens_per_sample, s.d, device=device, dtype=torch.bfloat16)
            t = median_time(lambda: ops.linear_cov_accumulate_(cov, x), device, repeat)
            record("rows (images x 197)", images, s.name, "bfloat16", t, 2.0 * x.shape[0] * s.d**2)
        x16 = torch.randn(vit_batch * s.tokens_per_sample, s.d, device=device, dtype=torch.bfloat16)
        x32 = x16.float()
        for tile in (256, 512, 1024, s.d):
            for x, label in ((x16, "bfloat16"), (x32, "float32/tf32")):
                with tf32(True):
                    t = median_time(lambda: ops.linear_cov_accumulate_(cov, x, tile), device, repeat)
                record("tile", tile, s.name, label, t, 2.0 * x.shape[0] * s.d**2)
    for s in (RESNET18_CIFAR[1], VGG11_BN[1], VGG11_BN[3], VGG11_BN[5]):
        batch = conv_batch[s.name.split(".")[0]]
        geom = deepunlearn.patches.ConvGeometry.of(conv_module(s))
        cov = torch.zeros(1, s.d, s.d, device=device)
        x = torch.randn(batch, s.c_in, s.size, s.size, device=device, dtype=torch.bfloat16)
        for chunk in (1 << 24, 1 << 25, 1 << 26, 1 << 27):
            t = median_time(lambda: deepunlearn.ops.covariance.accumulate_conv_(cov, x, geom, chunk_elements=chunk), device,
                            repeat)
            record("chunk_elements", chunk, s.name, "bfloat16", t)
    for s in (RESNET18_CIFAR[0], VGG11_BN[0]):  # stems, d = 27: a cov of one CTA's tile over millions of rows
        x16 = torch.randn(conv_batch[s.name.split(".")[0]], s.c_in, s.size, s.size, device=device, dtype=torch.bfloat16)
        patches = F.unfold(x16, s.kernel, s.dilation, s.padding, s.stride).transpose(1, 2).reshape(-1, s.d)
        cov = torch.zeros(s.d, s.d, device=device)
        for x, label in ((patches, "bfloat16"), (patches.float(), "float32")):  # what the conv gather feeds the GEMMs
            for split in (1, 8, 64, 512):
                t = median_time(lambda: ops.linear_cov_accumulate_(cov, x, 0, split), device, repeat)
                record("split_k", split, s.name + " (patches)", label, t)
    s = VIT_B16[0]
    x = torch.randn(vit_batch * s.tokens_per_sample, s.d, device=device, dtype=torch.bfloat16)
    cov = torch.zeros(s.d, s.d, device=device)
    for split in (1, 2, 4, 8):
        t = median_time(lambda: ops.linear_cov_accumulate_(cov, x, 0, split), device, repeat)
        record("split_k", split, s.name, "bfloat16", t, 2.0 * x.shape[0] * s.d**2)
    rows += sweep_conv_forms(device, repeat, conv_batch, [RESNET18_CIFAR[1], VGG11_BN[1], VGG11_BN[3], VGG11_BN[5]] + DILATED)
    return rows


def sweep_conv_forms(device, repeat, conv_batch, shapes) -> list[dict]:
    """Conv covariance with each form that fits the layer forced, and as chosen ("auto"), timed in
    turn: float32 without tf32, and on a GPU also with tf32 and in bf16 (where the GEMMs run on the
    tensor cores and the gather is the default). Stride-1, undilated layers: the direct, shifted and
    weight-gradient forms, and on the CPU, where a group has few channels, the shifted form with its
    sums by GEMMs instead of the fused pass ("shifted/gemm"); strided ones: the direct form and the
    CPU's phase form; dilated ones: the direct and residue forms."""
    rows = []
    variants = [(torch.float32, False)] + ([(torch.float32, True), (torch.bfloat16, False)] if device.type == "cuda" else [])
    cpu = device.type == "cpu"
    for s, (dtype, allow_tf32) in itertools.product(shapes, variants):
        geom = deepunlearn.patches.ConvGeometry.of(conv_module(s))
        cov = torch.zeros(s.groups, s.d, s.d, device=device)
        x = torch.randn(conv_batch[s.name.split(".")[0]], s.c_in, s.size, s.size, device=device, dtype=dtype)
        if s.stride > 1:
            forms = ["direct", *(["phases"] if cpu else []), "auto"]
        elif s.dilation > 1:
            forms = ["direct", "residues", "auto"]
        else:
            forms = ["direct", "shifted", "auto", *(["shifted/gemm"] if cpu and s.c_in // s.groups <= 12 else []), "wgrad"]

        def under(form):
            def run():
                with tf32(allow_tf32, cudnn_tf32(dtype, allow_tf32)):
                    deepunlearn.ops.covariance.accumulate_conv_(cov, x, geom, form=form)
            return run

        times = paired_median_times([under(form) for form in forms], device, repeat)  # in turn
        for form, t in zip(forms, times):
            rows.append({"knob": "form", "value": form, "layer": s.name,
                         "dtype": _name(dtype) + ("/tf32" if allow_tf32 else ""), "op_s": t})
            print(rows[-1], flush=True)
    return rows


def variant(row: dict) -> str:
    """A row's dtype, and the conv form it forced if any: "bfloat16, wgrad form"."""
    form = row.get("form")
    return (row.get("dtype") or "") + (f", {form} form" if form else "")


def tflops_text(rate: float | None) -> str:
    """A TFLOP/s rate for the tables: whole numbers on a GPU, three significant digits below 10
    (a CPU's 0.1 would print as 0)."""
    if rate is None:
        return ""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.3g}"


def markdown(result: dict) -> str:
    lines = [f"# Kernel benchmark on {result['device']} (torch {result['torch']})", "",
             "speedup = pure-PyTorch time / op time, measured side by side in one run (medians, the two timed in turn).",
             *([f"Times per call, each timed within a block of back-to-back calls of at least {GPU_BLOCK_SECONDS * 1e3:g} ms "
                "(launch and synchronisation latency hidden, as when the calls queue behind a forward pass)."]
               if result["device_type"] == "cuda" else []), ""]
    if result.get("ceilings"):
        lines += ["Ceilings measured in the same run: " + ", ".join(f"{k} {v:.1f}" for k, v in result["ceilings"].items()), ""]
    lines += ["| op | layer | d | pure (ms) | op (ms) | speedup | op TFLOP/s (full-GEMM equiv.) | peak extra pure / op (MiB) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = (f"{r['pure_peak_extra_bytes'] / 2**20:.1f} / {r['op_peak_extra_bytes'] / 2**20:.1f}"
               if "pure_peak_extra_bytes" in r else "")
        rate = tflops_text(r.get("op_tflops_full_gemm_equiv"))
        if "op_single_call_s" in r:
            rate += f" ({tflops_text(r['op_tflops_full_gemm_equiv'] * r['op_s'] / r['op_single_call_s'])} one call alone)"
        label = r["layer"] + (f" ({variant(r)})" if r.get("dtype") else "")
        lines.append(f"| {r['op']} | {label} | {r['d']} | {r['pure_s'] * 1e3:.2f} | {r['op_s'] * 1e3:.2f} | "
                     f"{r['speedup']:.2f} | {rate} | {mem} |")
    if result.get("sweep"):
        lines += ["", "Tuning knobs and sizes (op time; linear: TFLOP/s as a full GEMM would count them):", "",
                  "| knob | value | layer | dtype | op (ms) | TFLOP/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['knob']} | {r['value']} | {r['layer']} | {r['dtype']} | {r['op_s'] * 1e3:.3f} | "
                  f"{tflops_text(r.get('tflops_full_gemm_equiv'))} |" for r in result["sweep"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small batches, few repeats (smoke run)")
    p.add_argument("--no-sweep", action="store_true", help="skip the tuning-knob sweep")
    p.add_argument("--layers", nargs="*", help="only the rows whose layer name contains one of these")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if not extension.loaded():
        sys.exit(f"the extension is not loaded: {extension.extension_info()}")
    gpu = device.type == "cuda"
    repeat = 3 if a.quick else (20 if gpu else 9)
    vit_batch, conv_batch = batch_sizes(gpu, a.quick)
    result = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
              "extension": extension.extension_info(), "quick": a.quick,
              "ceilings": ceilings(device) if gpu else None, "rows": [], "sweep": []}
    if gpu:
        print("ceilings:", result["ceilings"], flush=True)
    rows = result["rows"]
    pending = []  # (row, pure, op): peak memory is measured after every timing
    for case in cases(device, a.quick, lambda layer: not a.layers or any(name in layer for name in a.layers)):
        rows.append(bench(case, device, repeat))
        print(rows[-1], flush=True)
        if case.op != "linear_cov":
            pending.append((rows[-1], case.pure, case.run_op))
    if not rows:
        sys.exit(f"no benchmark row matches --layers {a.layers}")
    stem = a.out / (f"kernels_{device.type}" + ("_quick" if a.quick else ""))
    write_results(stem, result, markdown(result))  # the rows so far, in case the sweep is cut short
    if not a.quick and not a.no_sweep:
        result["sweep"] = (sweep_knobs(device, repeat, vit_batch, conv_batch) if gpu else
                           sweep_conv_forms(device, repeat, conv_batch,
                                            [s for s in RESNET18_CIFAR + VGG11_BN + DEPTHWISE if s.stride == 1] + STRIDED
                                            + DILATED))
    # Only now: on the CPU the exact RSS mode maps every large buffer afresh (page faults), which
    # slows allocation-heavy code and would distort the times above.
    exact_rss_peaks()
    for row, pure, op in pending:
        row["pure_peak_extra_bytes"], row["op_peak_extra_bytes"] = peak_extra(pure, device), peak_extra(op, device)
    text = markdown(result)
    write_results(stem, result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
