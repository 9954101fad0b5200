"""Data-parallel collection with torch.distributed (two gloo processes on the CPU) equals one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepunlearn

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from models_for_tests import fixture_data, fixture_model  # noqa: E402

from conftest import rel_err  # noqa: E402


def torchrun(out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HELPERS / "distributed_worker.py"), str(out), *extra]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


pytestmark = pytest.mark.xdist_group("test_distributed")  # one worker (-n): its module fixtures built once


@pytest.fixture(scope="module")
def single():
    model = fixture_model()
    xf, xr = fixture_data()
    report = deepunlearn.unlearn(model, xf, xr, batch_size=4, alpha_r=100, alpha_f=3, keep_retain_mean=True)  # biases too
    return model.state_dict(), report


@pytest.mark.parametrize("extra", [(), ("--empty-forget-on-last-rank",)], ids=["even-shards", "a-rank-without-forget-samples"])
def test_two_gloo_ranks_equal_one_process(tmp_path, single, extra):
    torchrun(tmp_path, *extra)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    state, report = single
    # Broadcast weights: both ranks hold the very same model, bit for bit.
    for k in state:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # Sums over shards equal the one-process sum to float64 rounding (the summation order differs).
    for k in state:
        assert rel_err(r0["state"][k], state[k]) < 1e-10, k
    assert r0["retain_samples"] == r1["retain_samples"] == 20
    assert r0["report_samples"] == r1["report_samples"] == (report.forget_samples, report.retain_samples)
    assert r0["layers"] == r1["layers"] == [(r.name, r.forget_vectors, r.retain_vectors) for r in report.layers]
    changed = [k for k in state if not torch.equal(state[k], fixture_model().state_dict()[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("bias") for k in changed), changed
