"""Statistics kept as their vectors while a layer saw fewer than its width, and the solve in the
sample space: against numpy's float64 eigh, against the dense statistics, through sums, files and
the whole edit."""
import copy

import pytest
import torch
from torch import nn

from conftest import rel_err
from test_projection import numpy_reference

import deepunlearn
from deepunlearn import Statistics, collect_statistics
from deepunlearn import hooks
from deepunlearn import plan as planning
from deepunlearn.moments import SampleRows, fold_rows, moment_sum
from deepunlearn.projection import Spectrum, scale_weighted
from deepunlearn.weight_side import SampleSpaceFactor, ScaledFactor, sample_basis, side_flops, side_solver


def spread_rows(g: int, n: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """``(g, n, d)`` vectors with energies spread over three decades across directions."""
    return torch.randn(g, n, d, dtype=dtype) * torch.logspace(0, -3, d, dtype=dtype)


@pytest.mark.parametrize("alpha", [0.25, 1.0, 3.0, 100.0, 1000.0])
@pytest.mark.parametrize("n", [1, 7, 39])
def test_sample_space_factor_matches_float64_reference(alpha, n):
    r = spread_rows(3, n, 40)
    w = torch.randn(3, 6, 40, dtype=torch.float64)
    want = w @ numpy_reference(r.transpose(1, 2) @ r, alpha)
    assert rel_err(SampleSpaceFactor.of(r, alpha).right_multiply(w), want) < 1e-10
    got32 = SampleSpaceFactor.of(r.float(), alpha).right_multiply(w.float())
    assert rel_err(got32.double(), want) < 1e-4  # cond B <= α, as for the Cholesky way


def weighted_basis(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, r)`` of kept vectors ``(g, n, d)``: the normalised Gram matrix's eigenvalues and
    :func:`sample_basis`, as the automatic choice decomposes them."""
    spectrum = Spectrum.of_many([rows @ rows.transpose(-1, -2)])[0]
    return sample_basis(rows, spectrum.vectors), spectrum.energies


def weighted_projection(rows: torch.Tensor, alpha: float) -> torch.Tensor:
    b, r = weighted_basis(rows)
    return (b * scale_weighted(r, alpha)[:, None, :]) @ b.transpose(1, 2)


@pytest.mark.parametrize("alpha", [0.25, 1.0, 10.0, 1000.0])
def test_sample_basis_gives_the_reference_projection(alpha):
    r = spread_rows(2, 9, 30)
    b, e = weighted_basis(r)
    assert b.shape == (2, 30, 9) and e.shape == (2, 9)
    want = numpy_reference(r.transpose(1, 2) @ r, alpha)
    assert rel_err(weighted_projection(r, alpha), want) < 1e-10
    assert rel_err(weighted_projection(r.float(), alpha).double(), want) < 1e-4  # about α·ε, as the Cholesky way
    # the columns carry √r: B Bᵀ is Ĉ itself; unweighted, the scale is λ(α)
    c_hat = r.transpose(1, 2) @ r / r.square().sum((1, 2))[:, None, None]
    assert rel_err(b @ b.transpose(1, 2), c_hat) < 1e-10
    assert torch.equal(scale_weighted(e, alpha, False), alpha * e / ((alpha - 1) * e + 1))


def test_zero_group_projects_nothing():
    r = spread_rows(2, 4, 12)
    r[1] = 0.0
    w = torch.randn(2, 3, 12, dtype=torch.float64)
    out = SampleSpaceFactor.of(r, 10.0).right_multiply(w)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0
    b, e = weighted_basis(r)
    assert torch.isfinite(b).all() and b[1].abs().max() == 0 and e[1].abs().max() == 0


def test_side_solver_uses_the_sample_space_for_kept_vectors():
    kept = SampleRows(spread_rows(1, 5, 64))
    assert isinstance(side_solver(kept, 3.0, rows=10, vectors=5), SampleSpaceFactor)
    assert isinstance(side_solver(kept, 3.0, rows=10, vectors=5, way="cholesky"), ScaledFactor)  # forced: formed C
    flops = side_flops(64, 10, 5, kept=True)
    assert flops["sample-space"] < min(v for k, v in flops.items() if k != "sample-space")
    with pytest.raises(ValueError, match="needs statistics kept as vectors"):
        side_solver(kept.dense(), 3.0, rows=10, vectors=5, way="sample-space")


class Wide(nn.Module):
    """A grouped conv on a 3×3 map (one position per image, d = 36 per group), a 72-wide linear and a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, groups=2)
        self.fc = nn.Linear(8 * 9, 72)
        self.head = nn.Linear(72, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (n, 8, 1, 1) from (n, 8, 3, 3)
        return self.head(torch.relu(self.fc(x.flatten(1)))) + h.flatten(1)[:, :4]


def test_collection_keeps_vectors_while_fewer_than_the_width_then_folds(monkeypatch):
    model = Wide().double()
    x = torch.randn(50, 8, 3, 3, dtype=torch.float64)
    dense_ref = collect_statistics(model, x[:20], keep_vectors=False, batch_size=8)  # the compiled kernels
    few = collect_statistics(model, x[:20], batch_size=8, keep_vectors="always")
    assert all(isinstance(s.moment, SampleRows) for s in few.slots.values())
    assert few.slots["conv"].moment.rows.shape == (2, 20, 36) and few.slots["fc"].moment.rows.shape == (1, 20, 72)
    assert all(isinstance(s.moment, torch.Tensor) for s in dense_ref.slots.values())
    for k, s in few.slots.items():
        assert s.count == dense_ref.slots[k].count == 20
        assert rel_err(s.cov, dense_ref.slots[k].cov) < 1e-13, k
    dense_all = collect_statistics(model, x, keep_vectors=False).slots
    folds = []
    monkeypatch.setattr(hooks, "fold_rows", lambda cov, rows: folds.append(rows.shape) or fold_rows(cov, rows))
    # the length unknown (an iterator of batches): conv keeps its vectors, then folds them at its 5th
    # batch (40 >= 36); known (a tensor): 50 >= 36 is foreseen and conv streams from the first batch
    for data, folded in ((iter(x.split(8)), [(2, 32, 36)]), (x, [])):
        folds.clear()
        many = collect_statistics(model, data, batch_size=8, keep_vectors="always")
        assert folds == folded
        assert isinstance(many.slots["conv"].moment, torch.Tensor) and isinstance(many.slots["fc"].moment, SampleRows)
        assert many.slots["fc"].moment.rows.shape == (1, 50, 72)  # 50 < 72 kept, the 7 batches joined in order
        for k, s in dense_all.items():
            assert rel_err(many.slots[k].cov, s.cov) < 1e-13, k
        assert [(r["vectors"], r["kept_vectors"]) for r in many.summary()] == [(50, False), (50, True), (50, True)]


def test_conv_inputs_keep_their_vectors_only_where_the_solve_gains():
    """By default a conv input keeps its vectors only where solving from them costs fewer flops than
    solving from the streamed sum: Wide's conv (36 wide, 4 rows a group) streams 20 vectors, a conv
    576 wide read by 8 rows keeps them; linear inputs keep theirs below their width."""
    from deepunlearn.weight_side import vectors_pay

    assert not vectors_pay(36, 20, 4) and vectors_pay(576, 20, 8)
    stats = collect_statistics(Wide().double(), torch.randn(20, 8, 3, 3, dtype=torch.float64), batch_size=8)
    assert isinstance(stats.slots["conv"].moment, torch.Tensor) and isinstance(stats.slots["fc"].moment, SampleRows)
    wide_conv = nn.Sequential(nn.Conv2d(64, 8, 3), nn.Flatten(), nn.Linear(8, 2)).double()
    x = torch.randn(20, 64, 3, 3, dtype=torch.float64)
    kept = collect_statistics(wide_conv, x, batch_size=8).slots["0"]
    assert isinstance(kept.moment, SampleRows) and kept.moment.rows.shape == (1, 20, 576)
    assert rel_err(kept.cov, collect_statistics(wide_conv, x, keep_vectors=False).slots["0"].cov) < 1e-13
    with pytest.raises(ValueError, match="keep_vectors must be"):
        collect_statistics(wide_conv, x, keep_vectors="sometimes")


def test_sums_concatenate_below_the_width_and_fold_above():
    model = Wide().double()
    x = torch.randn(80, 8, 3, 3, dtype=torch.float64)
    a, b, c = (collect_statistics(model, x[i:j], keep_vectors="always") for i, j in ((0, 10), (10, 30), (30, 80)))
    a_rows = a.slots["fc"].moment.rows.clone()
    ab, abc = a + b, a + b + c
    assert ab.slots["fc"].moment.rows.shape == (1, 30, 72) and isinstance(abc.slots["fc"].moment, torch.Tensor)
    assert isinstance(ab.slots["conv"].moment, SampleRows) and isinstance(abc.slots["conv"].moment, torch.Tensor)
    whole = collect_statistics(model, x, keep_vectors=False)
    for k in whole.slots:
        assert rel_err(abc.slots[k].cov, whole.slots[k].cov) < 1e-13, k
    assert torch.equal(a.slots["fc"].moment.rows, a_rows)  # operands unchanged
    mixed = moment_sum([whole.slots["fc"].moment, a.slots["fc"].moment])  # dense + vectors
    assert rel_err(mixed, whole.slots["fc"].cov + a.slots["fc"].cov) < 1e-13


def test_kept_vectors_survive_save_load_and_corruption_is_refused(tmp_path):
    model = Wide()
    s = collect_statistics(model, torch.randn(6, 8, 3, 3), keep_vectors="always")
    s.save(tmp_path / "s.pt")
    t = Statistics.load(tmp_path / "s.pt")
    for k in s.slots:
        assert isinstance(t.slots[k].moment, SampleRows) and torch.equal(t.slots[k].moment.rows, s.slots[k].moment.rows)
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    blob["slots"]["fc"]["rows"][0, 0, 0] += 1.0
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="corrupted"):
        Statistics.load(tmp_path / "bad.pt")


def test_edit_from_kept_vectors_equals_the_edit_from_dense_statistics(monkeypatch):
    torch.manual_seed(3)
    model = Wide().double()
    xf, xr = torch.randn(5, 8, 3, 3, dtype=torch.float64), torch.randn(30, 8, 3, 3, dtype=torch.float64)
    ways = []
    real = planning.side_solver

    def spy(moment, *args, **kw):
        out = real(moment, *args, **kw)
        ways.append(type(out).__name__)
        return out

    monkeypatch.setattr(planning, "side_solver", spy)
    new = {}
    for keep in ("always", False):
        stats = [collect_statistics(model, x, keep_vectors=keep) for x in (xf, xr)]
        r = deepunlearn.unlearn(copy.deepcopy(model), *stats, alpha_r=100, alpha_f=3)
        new[keep] = r.model.state_dict()
    assert ways[:6].count("SampleSpaceFactor") == 6 and "SampleSpaceFactor" not in ways[6:]
    for k, v in new[False].items():
        assert rel_err(new["always"][k], v) < 1e-10, k
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in new["always"].items())


def test_a_layer_wider_than_memory_allows_densely_is_solved_from_its_vectors():
    """A 200,000-wide linear input (a 160 GB float32 second moment) from 6 images: collected and
    edited through its 6 vectors; the edit's change agrees with an explicit rank-6 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(200_000, 3))
    xf, xr = torch.randn(2, 2, 100_000), torch.randn(4, 2, 100_000)
    before = model[1].weight.detach().double().clone()
    r = deepunlearn.unlearn(model, xf, xr, alpha_r=100, alpha_f=3)
    assert r.layers[0].d == 200_000
    # reference in the sample space of all 6 vectors, in float64: M = B diag(λ / r) Bᵀ on each side
    def apply(rows, alpha, w):
        b, e = weighted_basis(rows[None].double())
        return ((w @ b[0]) * scale_weighted(e[0], alpha)) @ b[0].T

    v = before - apply(xr.flatten(1), 100.0, before)
    want = before - apply(xf.flatten(1), 3.0, v)
    assert rel_err(model[1].weight.double() - before, want - before) < 1e-4
