"""The weight-side solve (W M without M) against numpy's float64 eigh, and against the formed-M path."""
import copy

import pytest
import torch
from torch import nn

from conftest import rel_err, spd
from test_projection import numpy_reference

import deepunlearn
from deepunlearn import plan as planning
from deepunlearn.layers import find_targets
from deepunlearn.collect import collect_statistics
from deepunlearn.weight_side import (FormedProjection, LowRankSpectrum, ScaledFactor, blocked_cholesky, edited_weight_sides,
                                     inverse_cholesky, side_flops, side_solver)


# 0.8, 1.1: near 1, where W Ĉ A⁻¹ replaces the difference α/(α−1) (W − W A⁻¹); 1.25: the first
# scale above 1 that takes the difference
@pytest.mark.parametrize("alpha", [0.25, 0.8, 1.0, 1.1, 1.25, 3.0, 100.0, 1000.0])
@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("overwrite", [False, True])
def test_right_multiply_matches_float64_reference(alpha, rank, overwrite):
    cov = spd(3, 20, rank)
    kept = cov.clone()
    w = torch.randn(3, 7, 20, dtype=torch.float64)
    got = ScaledFactor.of(cov, alpha, overwrite=overwrite).right_multiply(w)
    assert got.shape == w.shape
    assert rel_err(got, w @ numpy_reference(kept, alpha)) < 1e-10
    # read, never modified, unless the caller gave C up; near α = 1 the factor keeps C itself
    assert torch.equal(cov, kept) == (not overwrite or abs(alpha - 1.0) < 0.25)


def test_factor_reads_only_the_lower_triangle_and_batches_one_scale_per_member():
    """Several scales in one batched factorisation (as the GPU path batches them), zero-trace
    groups among them; away from α = 1 the upper triangle of C is not read (the accumulated sums
    need not be made exactly symmetric)."""
    cov = spd(5, 12)
    cov[3] = 0.0
    lower_only = torch.tril(cov) + torch.triu(torch.full_like(cov, 7.0), 1)
    w = torch.randn(5, 4, 12, dtype=torch.float64)
    groups = [1, 1, 3]
    for alphas, given in (([0.5, 1.0, 30.0], cov), ([0.5, 3.0, 30.0], lower_only)):
        factors = ScaledFactor.batch(given, alphas, groups)
        got = torch.cat([f.right_multiply(part) for f, part in zip(factors, w.split(groups))])
        want = torch.cat([p @ numpy_reference(c, a) for a, c, p in zip(alphas, cov.split(groups), w.split(groups))])
        assert rel_err(got, want) < 1e-10 and got[3].abs().max() == 0


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
    got = edited_weight_sides(w, ScaledFactor.of(cov_r, 100.0), ScaledFactor.of(cov_f, 3.0))
    assert rel_err(got, want) < 1e-10
    # retain data never reached the layer: M_r = 0
    assert rel_err(edited_weight_sides(w, None, ScaledFactor.of(cov_f, 3.0)), w - w @ m_f) < 1e-10


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


@pytest.mark.parametrize("rank", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_spectrum_matches_float64_reference(rank, dtype):
    """A second moment of n < d vectors with a spread spectrum: the sketch of n + OVERSAMPLE columns is
    exact up to rounding, within the float32 bound α·ε of the Cholesky way."""
    x = torch.randn(2, rank, 40, dtype=torch.float64) * torch.logspace(0, -3, 40, dtype=torch.float64)
    cov = x.transpose(1, 2) @ x
    w = torch.randn(2, 6, 40, dtype=torch.float64)
    for alpha in (0.5, 3.0, 1000.0):
        got = LowRankSpectrum.of(cov.to(dtype), alpha, rank).right_multiply(w.to(dtype))
        assert rel_err(got.double(), w @ numpy_reference(cov, alpha)) < (1e-9 if dtype == torch.float64 else 1e-4)


def test_low_rank_spectrum_of_zero_and_mixed_groups():
    x = torch.randn(3, 4, 30, dtype=torch.float64)
    x[1] = 0.0  # a group that saw only zeros
    cov = x.transpose(1, 2) @ x
    w = torch.randn(3, 5, 30, dtype=torch.float64)
    got = LowRankSpectrum.of(cov, 10.0, 4).right_multiply(w)
    assert torch.isfinite(got).all() and got[1].abs().max() == 0
    assert rel_err(got, w @ numpy_reference(cov, 10.0)) < 1e-9


def test_side_solver_picks_the_cheapest_way():
    cov = spd(1, 64)
    assert isinstance(side_solver(cov, 3.0, rows=10, vectors=1000), ScaledFactor)  # few rows, full rank
    # many rows: still the factor; forming M costs 2d³ more and is then applied with as many flops
    assert isinstance(side_solver(cov, 3.0, rows=200, vectors=1000), ScaledFactor)
    assert isinstance(side_solver(cov, 3.0, rows=200, vectors=1000, way="formed"), FormedProjection)
    assert isinstance(side_solver(spd(1, 256), 3.0, rows=10, vectors=5), LowRankSpectrum)  # few vectors
    assert isinstance(side_solver(cov, 3.0, rows=10, vectors=5, solver="eigh"), FormedProjection)
    assert "low-rank" not in side_flops(64, 10, 60)  # 60 + OVERSAMPLE columns is no sketch of 64
    with pytest.raises(ValueError, match="way must be one of"):
        side_solver(cov, 3.0, 10, 5, way="qr")


class Net(nn.Module):
    """Wide inputs read by few rows, narrow ones by many, a grouped conv, and attention whose packed
    q/k/v share one input."""

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
    mf = planning.layer_moments(targets, collect_statistics(model, xf, dtype=torch.float64), dev)
    mr = planning.layer_moments(targets, collect_statistics(model, xr, dtype=torch.float64), dev)
    return targets, mf, mr


@pytest.mark.parametrize("way", ["cholesky", "low-rank"])
def test_every_way_gives_the_formed_projections_model_and_consumed_statistics_are_dropped(way):
    torch.manual_seed(0)
    model = Net().double()
    xf, xr = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)
    weights = {}
    for w in (way, "formed"):
        targets, mf, mr = _moments(model, xf, xr)
        edit_for = planning.solved_edits(targets, mf, mr, 3.0, 100.0, way=w)
        plan, _ = planning.plan_edits_with(targets, edit_for, planning.traces(mf), planning.traces(mr))
        assert all(cov is None for cov, _ in [*mf.values(), *mr.values()])  # every input consumed
        weights[w] = {p.target.name: p.new_weight for p in plan}
    assert weights[way].keys() == weights["formed"].keys() and len(weights[way]) == len(targets)
    for name, w in weights[way].items():
        assert rel_err(w, weights["formed"][name]) < 1e-9, name


def test_auto_way_follows_the_flop_count(monkeypatch):
    torch.manual_seed(0)
    model = Net()
    chosen = []
    real = planning.side_solver

    def spy(cov, alpha, rows, vectors, way, solver, **kw):
        out = real(cov, alpha, rows, vectors, way, solver, **kw)
        chosen.append((cov.shape[-1], vectors, type(out).__name__))
        return out

    monkeypatch.setattr(planning, "side_solver", spy)
    deepunlearn.unlearn(model, torch.randn(2, 4, 4, 4), torch.randn(30, 4, 4, 4), alpha_r=100, alpha_f=3)
    got = sorted(chosen)
    # by side_flops: conv (18 per group, 3 rows per group), attention (6 wide, 18 and 6 rows) and
    # narrow's 30 retain vectors (5 wide, 40 rows) by a Cholesky factor on both sides; wide (96
    # wide), the head (40 wide) and narrow's 2 forget vectors saw fewer vectors than their width:
    # kept as vectors and solved in the sample space
    assert got == sorted([
        (18, 32, "ScaledFactor"), (18, 480, "ScaledFactor"),
        (6, 32, "ScaledFactor"), (6, 480, "ScaledFactor"),
        (6, 32, "ScaledFactor"), (6, 480, "ScaledFactor"),
        (96, 2, "SampleSpaceFactor"), (96, 30, "SampleSpaceFactor"),
        (5, 2, "SampleSpaceFactor"), (5, 30, "ScaledFactor"),
        (40, 2, "SampleSpaceFactor"), (40, 30, "SampleSpaceFactor"),
    ]), got


def test_default_dtype_is_float32_and_close_to_float64():
    torch.manual_seed(1)
    model = Net()
    xf, xr = torch.randn(8, 4, 4, 4), torch.randn(40, 4, 4, 4)
    r32 = deepunlearn.unlearn(model, xf, xr, inplace=False, alpha_r=100, alpha_f=3)
    r64 = deepunlearn.unlearn(copy.deepcopy(model).double(), xf.double(), xr.double(), inplace=False, alpha_r=100,
                              alpha_f=3)
    assert all(p.dtype == torch.float32 for p in r32.model.parameters())
    for (name, p), (_, q) in zip(r32.model.named_parameters(), r64.model.named_parameters()):
        assert rel_err(p.double(), q) < 1e-4, name


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18", "vit"])
def test_float32_default_matches_the_float64_eigen_reference_on_the_suite_models(arch):
    """Every layer of the suite's models: the default (float32 statistics, each side the cheapest
    way) against float64 statistics and M formed by eigh: the weight change within 1e-4 relative."""
    from deepunlearn.experiments.models import ARCHITECTURES

    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    xf, xr = torch.randn(12, 1, 28, 28), torch.randn(30, 1, 28, 28)
    new = {}
    for dtype, solver in ((torch.float32, "cholesky"), (torch.float64, "eigh")):
        targets, _ = find_targets(model)
        cpu = torch.device("cpu")
        mf = planning.layer_moments(targets, collect_statistics(model, xf, dtype=dtype), cpu)
        mr = planning.layer_moments(targets, collect_statistics(model, xr, dtype=dtype), cpu)
        plan, _ = planning.plan_edits_with(targets, planning.solved_edits(targets, mf, mr, 3.0, 100.0, solver=solver),
                                      planning.traces(mf), planning.traces(mr))
        new[solver] = {p.target.name: p.new_weight for p in plan}
    assert new["cholesky"].keys() == new["eigh"].keys() and len(new["eigh"]) == len(targets)
    before = {t.name: t.weight().detach().double() for t in targets}
    for name, w in new["cholesky"].items():  # the change itself, not only the new weight (measured: <= 2e-5)
        assert rel_err(w.double() - before[name], new["eigh"][name].double() - before[name]) < 1e-4, name


def test_scaled_cholesky_takes_one_scale_per_group():
    from deepunlearn.projection import scaled_cholesky

    cov = spd(3, 10)
    alphas = torch.tensor([0.5, 3.0, 100.0], dtype=torch.float64)
    c_hat, chol = scaled_cholesky(cov, alphas)
    for g, a in enumerate(alphas.tolist()):
        c_g, chol_g = scaled_cholesky(cov[g:g + 1], a)
        assert rel_err(c_hat[g], c_g[0]) < 1e-14 and rel_err(chol[g], chol_g[0]) < 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("d, block", [(37, 64), (50, 16), (130, 32)])  # one block; several, the last one short
@pytest.mark.parametrize("factor", [blocked_cholesky, inverse_cholesky])
def test_blocked_factors_against_float64(factor, d, block, dtype, tol):
    """``L`` and ``X = L⁻¹`` by blocks against float64 ``cholesky(B)`` and its inverse, exactly
    lower triangular, on shifted second moments with spectra spread over three decades (cond B
    about α = 1000), reading only the lower triangle (the upper one is poisoned)."""
    cov = spd(3, d)
    b = cov + cov.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] / 999.0 * torch.eye(d, dtype=torch.float64)
    want = torch.linalg.cholesky(b)
    if factor is inverse_cholesky:
        want = torch.linalg.inv(want)
    given = b.to(dtype).tril() + torch.full_like(b, float("nan"), dtype=dtype).triu(1)
    got, info = factor(given, block)
    assert got.dtype == dtype and info.tolist() == [0, 0, 0]
    assert torch.equal(got.triu(1), torch.zeros_like(got)) and bool(torch.isfinite(got).all())
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("factor", [blocked_cholesky, inverse_cholesky])
def test_blocked_factors_report_the_first_failing_column(factor):
    b = torch.eye(40, dtype=torch.float64).repeat(3, 1, 1)
    b[1, 35, 35] = -1.0
    b[2, 3, 3] = 0.0
    assert factor(b, 16)[1].tolist() == [0, 36, 4]
    indefinite = torch.diag(torch.tensor([5.0] * 19 + [-50.0], dtype=torch.float64))  # tr C > 0, B = C + tr C / 2 · I not
    with pytest.raises(RuntimeError, match="not positive definite"):
        ScaledFactor.batch(indefinite[None], [3.0], [1], inverse=factor is inverse_cholesky)


@pytest.mark.parametrize("inverse_factor", [False, True])
@pytest.mark.parametrize("batch_bytes", [1, 18 * 18 * 8 * 3, 1 << 30])  # one input a batch, a few, all of a width
def test_batched_factors_give_the_unbatched_edit_and_consume_the_statistics(batch_bytes, inverse_factor):
    """The Cholesky sides factored up front in batches (as on a GPU), as factors or as their
    inverses: the same new weights as one input at a time by triangular solves, every input
    consumed, on a model with several inputs of each width."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(64, 3)).double()
    xf, xr = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randn(9, 2, 4, 4, dtype=torch.float64)
    new = {}
    for limit in (0, batch_bytes):
        targets, mf, mr = _moments(model, xf, xr)
        edit_for = planning.solved_edits(targets, mf, mr, 3.0, 100.0, way="cholesky", batch_bytes=limit,
                                    inverse_factor=inverse_factor and limit > 0)
        plan, rows = planning.plan_edits_with(targets, edit_for, planning.traces(mf), planning.traces(mr))
        assert all(cov is None for cov, _ in [*mf.values(), *mr.values()])
        assert all(r.relative_change > 0 and r.forget_vectors > 0 for r in rows)
        new[limit] = {p.target.name: p.new_weight for p in plan}
    assert new[0].keys() == new[batch_bytes].keys() and len(new[0]) == 4
    for name, w in new[0].items():
        assert rel_err(new[batch_bytes][name], w) < 1e-12, name


def test_non_finite_edit_is_reported_by_layer_and_nothing_planned_is_written():
    torch.manual_seed(0)
    model = Net().double()
    targets, mf, mr = _moments(model, torch.randn(2, 4, 4, 4, dtype=torch.float64),
                               torch.randn(3, 4, 4, 4, dtype=torch.float64))
    before = [t.weight().detach().clone() for t in targets]
    edit_for = planning.solved_edits(targets, mf, mr, 3.0, 100.0)
    poisoned = targets[1].name

    def edit(t):
        fn = edit_for(t)
        return (lambda w: fn(w) * float("nan")) if t.name == poisoned else fn

    with pytest.raises(RuntimeError, match=f"non-finite weights at layer '{poisoned}'"):
        planning.plan_edits_with(targets, edit, planning.traces(mf), planning.traces(mr))
    assert all(torch.equal(t.weight(), b) for t, b in zip(targets, before))


def test_to_host_keeps_shapes_and_values():
    parts = [torch.randn(3), torch.randn(2, 2, dtype=torch.float64), torch.tensor([True, False])]
    for got, want in zip(planning.to_host(parts), parts):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    assert planning.to_host([]) == []


@pytest.mark.cuda
@pytest.mark.parametrize("inverse_factor", [False, True])
def test_batched_factors_on_cuda_match_float64_on_the_cpu(inverse_factor):
    """On a GPU (float32 statistics, factors batched by width, several blocks of
    :func:`inverse_cholesky` at width 600): within 1e-4 of the float64 edit on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = nn.Sequential(nn.Linear(600, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 10))
    xf, xr = torch.randn(700, 600), torch.randn(900, 600)  # more vectors than any width: dense sums
    new = {}
    for dev, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        m = copy.deepcopy(model).to(dev, dtype)
        targets, _ = find_targets(m)
        mf, mr = (planning.layer_moments(targets, collect_statistics(m, x.to(dev, dtype), dtype=dtype), torch.device(dev))
                  for x in (xf, xr))
        edit_for = planning.solved_edits(targets, mf, mr, 3.0, 100.0, way="cholesky",
                                    inverse_factor=inverse_factor and dev == "cuda")
        plan, _ = planning.plan_edits_with(targets, edit_for, planning.traces(mf), planning.traces(mr))
        new[dev] = {p.target.name: p.new_weight for p in plan}
    assert new["cpu"].keys() == new["cuda"].keys() and len(new["cpu"]) == 3
    for name, w in new["cpu"].items():
        assert new["cuda"][name].device.type == "cuda" and rel_err(new["cuda"][name].cpu(), w) < 1e-4, name
