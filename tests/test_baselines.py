"""Baselines: each runs with unlearn's call shape, leaves the original alone, and does its job."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepunlearn.experiments.baselines import BASELINES, ssd
from deepunlearn.evaluation import accuracy


pytestmark = pytest.mark.xdist_group("test_baselines")  # one worker (-n): its module fixtures built once


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 2.5
    y = torch.arange(1200) % 4
    x = centers[y] + torch.randn(1200, 8, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    forget = TensorDataset(x[y == 0], y[y == 0])
    retain = TensorDataset(x[y != 0], y[y != 0])
    return model.eval(), forget, retain


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_runs_on_a_copy_and_reports_time(blobs, name):
    model, forget, retain = blobs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = {"noise_steps": 10} if name == "unsir" else {}
    rep = BASELINES[name](model, forget, retain, **opts)
    assert rep.model is not model and rep.seconds["total"] > 0 and rep.method == name.replace("_", "-")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = any(not torch.equal(before[k], v) for k, v in rep.model.state_dict().items())
    assert changed
    assert all(torch.isfinite(p).all() for p in rep.model.parameters())


@pytest.mark.parametrize("name", ["retrain", "random-labels"])  # ascent and noise methods need real images: see the suite
def test_training_baselines_forget_the_class_and_keep_the_rest(blobs, name):
    model, forget, retain = blobs
    assert accuracy(model, forget) > 90
    opts = {"epochs": 30} if name == "retrain" else ({"epochs": 5} if name != "unsir" else {})
    rep = BASELINES[name](model, forget, retain, **opts)
    assert accuracy(rep.model, forget) < 50, name
    assert accuracy(rep.model, retain) > 80, name


def test_ssd_dampens_only_forget_specialised_parameters(blobs):
    model, forget, retain = blobs
    rep = ssd(model, forget, retain, alpha=2.0)
    ratios = [(q / p)[p != 0] for p, q in zip(model.parameters(), rep.model.parameters())]
    flat = torch.cat([r.flatten() for r in ratios])
    assert (flat <= 1 + 1e-6).all() and (flat >= 0).all()  # only scaled down
    assert (flat < 1).any() and (flat == 1).float().mean() > 0.5  # selective
