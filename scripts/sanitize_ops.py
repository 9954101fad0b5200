"""Drive every CUDA code path of the ops once, on small shapes, for compute-sanitizer.

Run as ``compute-sanitizer --tool memcheck python3 scripts/sanitize_ops.py`` (and racecheck). Each
call is also checked against a float64 CPU reference, so a run that the sanitizer passes but that
computes wrong numbers still fails (exit 1). Shapes are small because the sanitizer slows every
kernel by orders of magnitude; they are chosen so that each path is taken: one tile and several
(d not a multiple of the tile), split-K, batched groups, the gather with stride / padding /
dilation / groups and 1-d input, the shifted, residue and weight-gradient forms, the edit, and the
batched eigensolver.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from deepunlearn import ops as extension


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b).norm() / b.norm())


failures: list[str] = []
DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = rel(got, want)
    ok = err <= tol and bool(torch.isfinite(got).all())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        failures.append(name)


def linear_cases(ops) -> None:
    gen = torch.Generator().manual_seed(0)
    for n, d, dtype, tuning in [
        (300, 40, torch.float32, {}),                  # one tile
        (257, 100, torch.float64, {"tile": 32}),       # several tiles, ragged edge
        (300, 70, torch.bfloat16, {"tile": 32}),
        (1100, 27, torch.float16, {"split_k": 4}),     # split-K, rows left over
        (1100, 27, torch.float32, {"split_k": 4}),
    ]:
        x = torch.randn(n, d, generator=gen).to(dtype)
        cov_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        base = torch.randn(d, d, generator=gen, dtype=torch.float64)
        base = base @ base.T
        cov = base.to(cov_dtype).to(DEVICE).clone()  # never an alias of base (the op writes in place)
        ops.linear_cov_accumulate_(cov, x.to(DEVICE), tuning.get("tile", 0), tuning.get("split_k", 0))
        sync()
        xd = x.double()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        check(f"linear n={n} d={d} {dtype} {tuning}", cov, base + xd.T @ xd, tol)


def conv_reference(x: torch.Tensor, kernel, stride, padding, dilation, groups: int) -> torch.Tensor:
    x = x.double()
    if x.dim() == 3:
        x = x.unsqueeze(2)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C·k, L)
    n, ck, length = cols.shape
    cols = cols.view(n, groups, ck // groups, length).permute(1, 0, 3, 2).reshape(groups, n * length, ck // groups)
    return cols.transpose(1, 2) @ cols


def conv_cases(ops) -> None:
    gen = torch.Generator().manual_seed(1)
    cases = [
        # (N, C, H, W, kernel, stride, padding, dilation, groups, dtype, the op's form and chunk_elements)
        (2, 3, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, {}),
        (2, 8, 10, 7, (3, 3), (2, 2), (1, 0), (1, 1), 2, torch.bfloat16, {}),  # batched groups
        (2, 6, 1, 12, (1, 3), (1, 1), (0, 1), (1, 1), 1, torch.float16, {}),   # a 1-d conv as 2-d
        (2, 4, 11, 11, (3, 3), (1, 1), (2, 2), (2, 2), 1, torch.float32, {}),  # dilated
        (2, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, torch.float32, {}),    # depthwise
        (2, 5, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float64, {"form": "shifted"}),
        (2, 4, 11, 11, (3, 3), (1, 1), (2, 2), (2, 2), 1, torch.float64,
         {"form": "residues"}),
        (2, 5, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, {"form": "wgrad"}),
        (2, 4, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), 2, torch.bfloat16, {"form": "wgrad"}),
        (3, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, {"chunk_elements": 700}),
    ]
    for N, C, H, W, k, s, p, dil, groups, dtype, options in cases:
        x = torch.randn(N, C, H, W, generator=gen).to(dtype)
        dg = C // groups * k[0] * k[1]
        cov_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        base = torch.randn(groups, dg, dg, generator=gen, dtype=torch.float64)
        base = base @ base.transpose(1, 2)
        cov = base.to(cov_dtype).to(DEVICE).clone()  # never an alias of base (the op writes in place)
        ops.conv_cov_accumulate_(cov, x.to(DEVICE), list(k), list(s), [p[0], p[0], p[1], p[1]], list(dil),
                                 options.get("form", "auto"), options.get("chunk_elements", 0))
        sync()
        want = base + conv_reference(x, k, s, p, dil, groups)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        check(f"conv {tuple(x.shape)} k={k} s={s} p={p} dil={dil} g={groups} {dtype} {options}", cov, want, tol)


def edit_cases(ops) -> None:
    gen = torch.Generator().manual_seed(2)
    for groups, out, d, dtype in [(1, 10, 40, torch.float32), (3, 70, 33, torch.float64), (2, 5, 130, torch.float32)]:
        w = torch.randn(groups, out, d, generator=gen).to(dtype)
        m_r = torch.randn(groups, d, d, generator=gen, dtype=torch.float64) / d
        m_f = torch.randn(groups, d, d, generator=gen, dtype=torch.float64) / d
        mt = torch.float64 if dtype == torch.float64 else torch.float32
        got = ops.projected_edit(w.to(DEVICE), m_r.to(mt).to(DEVICE), m_f.to(mt).to(DEVICE))
        sync()
        wd = w.double()
        want = wd - (wd - wd @ m_r) @ m_f
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        check(f"edit g={groups} out={out} d={d} {dtype}", got, want, tol)


def eigh_cases(ops) -> None:
    gen = torch.Generator().manual_seed(3)
    for b, d, dtype in [(1, 9, torch.float32), (5, 40, torch.float64), (3, 130, torch.float32)]:
        q = torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=torch.float64))[0]
        e = torch.linspace(0.5, 3.0, d, dtype=torch.float64).expand(b, d)
        a = (q * e[:, None, :]) @ q.transpose(-1, -2)
        values, vectors = ops.symmetric_eigh(a.to(dtype).to(DEVICE))
        sync()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        check(f"eigh values b={b} d={d} {dtype}", values, e, tol)
        u = vectors.double().cpu()
        check(f"eigh vectors b={b} d={d} {dtype}", (u * values.double().cpu()[:, None, :]) @ u.transpose(-1, -2), a, tol)


def main(argv: list[str]) -> int:
    global DEVICE
    DEVICE = torch.device(argv[0] if argv else "cuda")  # "cpu" checks this script where there is no GPU
    if not extension.has_op("linear_cov_accumulate_", DEVICE) or (DEVICE.type == "cuda" and not torch.cuda.is_available()):
        print(f"no kernels of the extension for {DEVICE}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ops = extension.library()
    linear_cases(ops)
    conv_cases(ops)
    edit_cases(ops)
    eigh_cases(ops)
    print(f"{len(failures)} failed" if failures else "all passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
