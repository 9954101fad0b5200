"""Eigendecompositions of stacks of symmetric matrices: one call per matrix against one per stack.

    python benchmarks/bench_eigh.py                          # the suite's widths, 5 sides each
    python benchmarks/bench_eigh.py --device cuda --shapes 768x10 2304x5

Each shape ``d x batch`` is ``batch`` normalised second moments (float32, spread spectra), as the
automatic choice decomposes them (every side of one width: the retain side and four forget folds).
Ways timed (median of paired blocks, so drift hits all alike):

* ``per matrix``: ``torch.linalg.eigh`` on each matrix, what the choice did before the stacks;
* ``torch stack``: ``torch.linalg.eigh`` on the stack (on CUDA a loop of syevd calls past 32 wide);
* ``op``: :func:`deepunlearn.ops.eigh.symmetric_eigh` on the stack (the extension's op: on CUDA
  cuSOLVER's batched eigensolver, on the CPU LAPACK's through ATen).

Also reported: each way's relative error of ``U diag(e) Uᵀ`` against the float64 matrices. Writes
``eigh_<device>.json`` and ``.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, paired_median_times, write_results  # noqa: E402

from deepunlearn.ops import has_op  # noqa: E402
from deepunlearn.ops.eigh import symmetric_eigh  # noqa: E402
from deepunlearn.projection import symmetric_normalised  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Five sides of each width the suite's models decompose when α is chosen: SmallCNN's inputs (144,
# 288, 576, and the head's 128), the ViT's twelve 64-wide inputs, ResNet-18's widest (2304: five
# sides of its three layer4 3×3 inputs at 28×28 see fewer vectors, so the 1152-wide ones here).
DEFAULT_SHAPES = ["128x5", "144x5", "288x5", "576x5", "64x60", "1152x10"]


def problem(d: int, batch: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, 2 * d, d, device=device, dtype=torch.float64) * torch.logspace(0, -2, d, device=device,
                                                                                            dtype=torch.float64)
    return symmetric_normalised(x.mT @ x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="d x batch")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if not has_op("symmetric_eigh", device):
        print(f"the extension has no symmetric_eigh kernel for {device}: the op row times the twin", flush=True)
    rows_out = []
    for shape in args.shapes:
        d, batch = (int(v) for v in shape.split("x"))
        a64 = problem(d, batch, device)
        a = a64.float()
        ways = {"per matrix": lambda: [torch.linalg.eigh(m) for m in a],
                "torch stack": lambda: torch.linalg.eigh(a),
                "op": lambda: symmetric_eigh(a)}
        times = paired_median_times(list(ways.values()), device, args.repeat)
        for (name, fn), t in zip(ways.items(), times):
            got = fn()
            values, vectors = (torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])) if name == "per matrix" else got
            u = vectors.double()
            err = float(((u * values.double()[:, None, :]) @ u.mT - a64).norm() / a64.norm())
            rows_out.append({"d": d, "batch": batch, "way": name, "seconds": t, "rel_err": err})
            print(f"d={d} batch={batch} {name}: {t * 1e3:.2f} ms, rel err {err:.1e}", flush=True)
    for r in rows_out:
        r["per_matrix_over_way"] = next(q["seconds"] for q in rows_out if (q["d"], q["batch"], q["way"]) ==
                                        (r["d"], r["batch"], "per matrix")) / r["seconds"]
    result = {"device": device_name(device), "rows": rows_out}
    lines = [f"# Eigendecompositions of stacks on {result['device']}", "",
             "float32 normalised second moments; time of decomposing the stack (median of paired blocks); speed-up over "
             "one call per matrix in one run; error of U diag(e) Uᵀ against float64.", "",
             "| d | batch | way | ms | per matrix / way | rel. error |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['d']} | {r['batch']} | {r['way']} | {r['seconds'] * 1e3:.2f} | {r['per_matrix_over_way']:.2f} | "
              f"{r['rel_err']:.1e} |" for r in rows_out]
    write_results(args.out or RESULTS / f"eigh_{device.type}", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
