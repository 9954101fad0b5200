"""The weight-side solve (W M without M) against numpy's float64 eigh, and against the formed-M path."""
import copy

import pytest
import torch
from torch import nn

from conftest import rel_err, spd
from test_projection import numpy_reference

import deepunlearn
from deepunlearn import api
from deepunlearn.layers import find_targets
from deepunlearn.statistics import collect_statistics
from deepunlearn.weight_side import ScaledFactor, edited_weight_factored, weight_side_pays


@pytest.mark.parametrize("alpha", [0.25, 1.0, 3.0, 100.0, 1000.0])
@pytest.mark.parametrize("rank", [None, 4])
def test_right_multiply_matches_float64_reference(alpha, rank):
    cov = spd(3, 20, rank)
    w = torch.randn(3, 7, 20, dtype=torch.float64)
    got = ScaledFactor.of(cov, alpha).right_multiply(w)
    assert got.shape == w.shape
    assert rel_err(got, w @ numpy_reference(cov, alpha)) < 1e-10


def test_zero_trace_group_projects_nothing():
    cov = spd(2, 6)
    cov[1] = 0.0  # a group that saw only zeros
    w = torch.randn(2, 3, 6, dtype=torch.float64)
    out = ScaledFactor.of(cov, 10.0).right_multiply(w)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0


def test_edit_matches_formed_projections():
    cov_f, cov_r = spd(2, 12, 3), spd(2, 12)
    w = torch.randn(2, 5, 12, dtype=torch.float64)
    m_f, m_r = numpy_reference(cov_f, 3.0), numpy_reference(cov_r, 100.0)
    want = w - (w - w @ m_r) @ m_f
    got = edited_weight_factored(w, ScaledFactor.of(cov_r, 100.0), ScaledFactor.of(cov_f, 3.0))
    assert rel_err(got, want) < 1e-10
    # retain data never reached the layer: M_r = 0
    assert rel_err(edited_weight_factored(w, None, ScaledFactor.of(cov_f, 3.0)), w - w @ m_f) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_factor_error_is_bounded_by_alpha(dtype):
    """cond((α−1)Ĉ + I) <= α: float32 loses about α·ε₃₂ at worst (here ill-conditioned C, α = 1000)."""
    e = torch.logspace(0, -12, 64, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    cov = ((q * e) @ q.T)[None]
    w = torch.randn(1, 10, 64, dtype=torch.float64)
    want = w @ numpy_reference(cov, 1000.0)
    got = ScaledFactor.of(cov.to(dtype), 1000.0).right_multiply(w.to(dtype))
    assert rel_err(got.double(), want) < (1e-10 if dtype == torch.float64 else 1000 * 1.2e-7)


def test_weight_side_pays_by_flop_count():
    assert weight_side_pays(10, 64) and weight_side_pays(63, 64)
    assert not weight_side_pays(64, 64) and not weight_side_pays(200, 64)


class Net(nn.Module):
    """Wide inputs read by few rows (weight side), narrow ones by many (formed M), a grouped conv,
    and attention whose packed q/k/v share one input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.wide = nn.Linear(6 * 16, 5)
        self.narrow = nn.Linear(5, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (n, 6, 4, 4)
        t = h.flatten(2).transpose(1, 2)  # (n, 16, 6)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(torch.relu(self.narrow(torch.relu(self.wide(t.flatten(1))))))


def _moments(model, xf, xr):
    targets, _ = find_targets(model)
    dev = torch.device("cpu")
    mf = api.layer_moments(targets, collect_statistics(model, xf, dtype=torch.float64), dev)
    mr = api.layer_moments(targets, collect_statistics(model, xr, dtype=torch.float64), dev)
    return targets, mf, mr


def test_both_sides_give_the_same_model_and_consumed_statistics_are_dropped():
    torch.manual_seed(0)
    model = Net().double()
    xf, xr = torch.randn(6, 4, 4, 4, dtype=torch.float64), torch.randn(30, 4, 4, 4, dtype=torch.float64)
    weights = {}
    for side in ("weight", "matrix"):
        targets, mf, mr = _moments(model, xf, xr)
        edit_for = api.solved_edits(targets, mf, mr, 3.0, 100.0, side=side)
        plan, _ = api.plan_edits_with(targets, edit_for, api.traces(mf), api.traces(mr))
        assert all(cov is None for cov, _ in [*mf.values(), *mr.values()])  # every input consumed
        weights[side] = {p.target.name: p.new_weight for p in plan}
    assert weights["weight"].keys() == weights["matrix"].keys() and len(weights["weight"]) == len(targets)
    for name, w in weights["weight"].items():
        assert rel_err(w, weights["matrix"][name]) < 1e-10, name


def test_auto_side_follows_the_flop_count(monkeypatch):
    torch.manual_seed(0)
    model = Net()
    factored, formed = [], []
    real_factor, real_proj = api.ScaledFactor.of, api.scaled_projection
    monkeypatch.setattr(api.ScaledFactor, "of", lambda cov, a: factored.append(cov.shape[-1]) or real_factor(cov, a))
    monkeypatch.setattr(api, "scaled_projection", lambda cov, a, s: formed.append(cov.shape[-1]) or real_proj(cov, a, s))
    deepunlearn.unlearn(model, torch.randn(6, 4, 4, 4), torch.randn(30, 4, 4, 4))
    # weight side (both sides of each): conv (18 per group, 3 rows per group), wide (96, 5 rows),
    # head (40, 3 rows); M formed: attention's in_proj (6 wide, 18 rows) and out_proj (6, 6 rows),
    # narrow (5 wide, 40 rows)
    assert sorted(factored) == [18, 18, 40, 40, 96, 96]
    assert sorted(formed) == [5, 5, 6, 6, 6, 6]


def test_default_dtype_is_float32_and_close_to_float64():
    torch.manual_seed(1)
    model = Net()
    xf, xr = torch.randn(8, 4, 4, 4), torch.randn(40, 4, 4, 4)
    r32 = deepunlearn.unlearn(model, xf, xr, inplace=False)
    r64 = deepunlearn.unlearn(copy.deepcopy(model).double(), xf.double(), xr.double(), inplace=False)
    assert all(p.dtype == torch.float32 for p in r32.model.parameters())
    for (name, p), (_, q) in zip(r32.model.named_parameters(), r64.model.named_parameters()):
        assert rel_err(p.double(), q) < 1e-4, name
