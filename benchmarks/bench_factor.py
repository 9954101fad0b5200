"""Batched factors of one width, applied to a layer's rows: triangular solves against inverse factors.

    python benchmarks/bench_factor.py                       # on a GPU: ViT-B/16's and ResNet-50's widths
    python benchmarks/bench_factor.py --device cpu --shapes 768x8x2304

Each shape ``d x g x rows`` is ``g`` shifted second moments ``B`` (``d × d``, float32, spread
spectra, cond about 1000) factored in one batched call, then ``W B⁻¹`` for ``rows`` weight rows of
each. Ways timed (median of paired blocks, so drift hits all alike):

* ``triangular``: ``torch.linalg.cholesky_ex`` (cuSOLVER's batched potrf on a GPU), then two
  triangular solves from the right (what :class:`~deepunlearn.weight_side.ScaledFactor` does without
  ``inverse``);
* ``inverse/<block>``: :func:`~deepunlearn.weight_side.inverse_cholesky` with that block, then the
  products ``(W Xᵀ) X``.

Also reported: each way's relative error of ``W B⁻¹`` against float64. Writes
``factor_<device>.json`` and ``.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, paired_median_times, write_results  # noqa: E402

from deepunlearn.weight_side import inverse_cholesky, right_solve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# ViT-B/16: 36 inputs of width 768 (both sides: 72 factors; qkv reads 2304 rows) and 12 of 3072
# (fc2, 768 rows); ResNet-50: its widest 3x3 convs (4608) and 1x1 inputs (2048).
DEFAULT_SHAPES = ["768x72x2304", "3072x24x768", "4608x6x512", "2048x12x512"]
BLOCKS = (128, 256, 512)


def problem(d: int, g: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(g, 2 * d, d, device=device, dtype=torch.float64) * torch.logspace(0, -1.5, d, device=device,
                                                                                         dtype=torch.float64)
    cov = x.mT @ x
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    b = cov + (tr / 999.0)[:, None, None] * torch.eye(d, device=device, dtype=torch.float64)  # A = (α−1)Ĉ + I, α = 1000
    return b, torch.randn(g, rows, d, device=device, dtype=torch.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="d x batch x rows")
    p.add_argument("--blocks", nargs="+", type=int, default=list(BLOCKS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows_out = []
    for shape in args.shapes:
        d, g, rows = (int(v) for v in shape.split("x"))
        b64, w64 = problem(d, g, rows, device)
        # W B⁻¹ (B symmetric positive definite), by float64 Cholesky: torch.linalg.solve's batched CPU
        # path fails from 257 wide on two threads (docs/testing.md)
        want = torch.cholesky_solve(w64.mT, torch.linalg.cholesky(b64)).mT
        b, w = b64.float(), w64.float()

        def triangular():
            chol, _ = torch.linalg.cholesky_ex(b)
            return right_solve(chol, w)

        ways = {"triangular": triangular}
        for block in args.blocks:
            ways[f"inverse/{block}"] = lambda block=block: right_solve(inverse_cholesky(b.clone(), block)[0], w, True)
        times = paired_median_times(list(ways.values()), device, args.repeat)
        for (name, fn), t in zip(ways.items(), times):
            err = float((fn().double() - want).norm() / want.norm())
            rows_out.append({"d": d, "batch": g, "rows": rows, "way": name, "seconds": t, "rel_err": err})
            print(f"d={d} g={g} rows={rows} {name}: {t * 1e3:.2f} ms, rel err {err:.1e}", flush=True)
        b64 = w64 = want = b = w = None  # freed before the next shape is made
    result = {"device": device_name(device), "rows": rows_out}
    lines = [f"# Batched factors applied to a layer's rows on {result['device']}", "",
             "float32; time of factoring the batch and computing every W B⁻¹ (median of paired blocks); "
             "error against float64.", "", "| d | batch | rows | way | ms | rel. error |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['d']} | {r['batch']} | {r['rows']} | {r['way']} | {r['seconds'] * 1e3:.2f} | {r['rel_err']:.1e} |"
              for r in rows_out]
    write_results(args.out or RESULTS / f"factor_{device.type}", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
