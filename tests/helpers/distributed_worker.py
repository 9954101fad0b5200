"""Run by ``torchrun --nproc-per-node 2`` from tests/test_distributed.py (gloo, CPU).

Every rank builds the same model and data, streams its own shard, and writes its edited weights
and report to ``OUT/rank{r}.pt``; the test compares them with a single-process run.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models_for_tests import fixture_data, fixture_model  # noqa: E402

import deepunlearn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--empty-forget-on-last-rank", action="store_true")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fixture_model()
    xf, xr = fixture_data()
    xf_mine, xr_mine = xf[rank::world], xr[rank::world]
    if args.empty_forget_on_last_rank:  # this rank holds no forget sample at all
        xf_mine = xf[: 0] if rank == world - 1 else xf[rank :: world - 1]
    stats = deepunlearn.collect_statistics(model, xr_mine, batch_size=4)
    report = deepunlearn.unlearn(model, xf_mine, xr_mine, batch_size=4, alpha_r=100, alpha_f=3, keep_retain_mean=True)
    torch.save({"state": model.state_dict(), "retain_samples": stats.samples,
                "layers": [(r.name, r.forget_vectors, r.retain_vectors) for r in report.layers],
                "report_samples": (report.forget_samples, report.retain_samples)},
               Path(args.out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
