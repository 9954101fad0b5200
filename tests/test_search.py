import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepunlearn import search_alphas, unlearn
from deepunlearn.evaluation import accuracy


def toy_problem():
    """Three Gaussian blobs in 6-d, a trained MLP, and separate fit/validation splits."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g) * 3
    y = torch.arange(600) % 3
    x = centers[y] + torch.randn(600, 6, generator=g)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:400]), y[:400]).backward()
        opt.step()
    return model.eval(), x, y


def test_search_scores_every_pair_and_restores_the_model():
    model, x, y = toy_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_f, fit_r = x[:400][y[:400] == 0], x[:400][y[:400] != 0]
    val = TensorDataset(x[400:], y[400:])
    res = search_alphas(model, fit_f, fit_r, val, [0], alpha_r_grid=[1, 10, 100], alpha_f_grid=[0.5, 3, 30])
    assert len(res.table) == 9
    assert [(r["alpha_r"], r["alpha_f"]) for r in res.table][:2] == [(1.0, 0.5), (1.0, 3.0)]
    best = max(res.table, key=lambda r: r["score"])
    assert (res.alpha_r, res.alpha_f) == (best["alpha_r"], best["alpha_f"]) and res.best == best
    for r in res.table:
        assert r["score"] == pytest.approx(r["retain_acc"] * (100 - r["forget_acc"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the table's numbers are what unlearn gives with that pair
    edited = unlearn(model, fit_f, fit_r, alpha_r=res.alpha_r, alpha_f=res.alpha_f, inplace=False).model
    r_acc = accuracy(edited, TensorDataset(x[400:][y[400:] != 0], y[400:][y[400:] != 0]))
    f_acc = accuracy(edited, TensorDataset(x[400:][y[400:] == 0], y[400:][y[400:] == 0]))
    assert r_acc == pytest.approx(best["retain_acc"], abs=1e-6) and f_acc == pytest.approx(best["forget_acc"], abs=1e-6)
    assert best["forget_acc"] < 50 < best["retain_acc"]


def test_search_needs_both_sides_in_validation():
    model, x, y = toy_problem()
    only_retain = TensorDataset(x[400:][y[400:] != 0], y[400:][y[400:] != 0])
    with pytest.raises(ValueError, match="both the forget and the retain"):
        search_alphas(model, x[:50], x[50:100], only_retain, [0], alpha_r_grid=[10], alpha_f_grid=[3])
    with pytest.raises(ValueError, match="alpha_f"):
        search_alphas(model, x[:50], x[50:100], only_retain, [0], alpha_r_grid=[10], alpha_f_grid=[0])


def test_spectra_decompose_each_distinct_moment_once_over_both_sides():
    from deepunlearn.projection import Spectrum
    from deepunlearn.search import spectra

    def moment(d, seed):
        x = torch.randn(20, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (x.T @ x)[None]

    shared, other, wide = moment(5, 1), moment(5, 2), moment(7, 3)
    forget = {("a",): (shared, 20), ("b",): (shared, 20), ("c",): (None, 0)}
    retain = {("a",): (other, 20), ("b",): (wide, 20), ("c",): (shared, 20)}
    spectra_f, spectra_r = spectra([forget, retain])
    assert spectra_f[("a",)] is spectra_f[("b",)] is spectra_r[("c",)] and spectra_f[("c",)] is None
    for side, moments in ((spectra_f, forget), (spectra_r, retain)):
        for key, (cov, _) in moments.items():
            if cov is not None:
                alone = Spectrum.of(cov)
                assert torch.allclose(side[key].energies, alone.energies, atol=1e-14)
                assert torch.allclose(side[key].projection(3.0), alone.projection(3.0), atol=1e-12)
