"""The classifier head's closed-form re-fit (deepunlearn/head_refit.py) against float64 references."""
import pytest
import torch

from deepunlearn.head_refit import (FORGET_WEIGHTS, RIDGE, ForgetFold, cross_validated_refit, best_refit,
                                    lowest_shift, refit_rows)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def problem(seed=0, n_r=120, n_f=80, d=9, classes=5):
    g = torch.Generator().manual_seed(seed)
    f_r = torch.randn(n_r, d, generator=g) + 0.5
    f_f = torch.randn(n_f, d, generator=g) - 0.5
    z_r = torch.randn(n_r, classes, generator=g) * 2
    z_f = torch.randn(n_f, classes, generator=g) * 2
    w = torch.randn(classes, d, generator=g)
    b = torch.randn(classes, generator=g)
    return f_r, z_r, f_f, z_f, w, b


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_rows_solves_the_weighted_ridge_problem(with_bias):
    f_r, z_r, f_f, z_f, w, b = problem()
    kept, weight = [1, 3, 4], 0.3
    got_w, got_b = refit_rows(f_r, z_r, f_f, z_f, w, b if with_bias else None, kept, weight)
    # reference: the same minimisation as one stacked float64 least-squares problem
    x = torch.cat([f_r, f_f]).double()
    if with_bias:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    s = torch.cat([torch.ones(len(f_r)), torch.full((len(f_f),), weight * len(f_r) / len(f_f))]).double()
    w0 = w.double()[kept]
    if with_bias:
        w0 = torch.cat([w0, b.double()[kept, None]], 1)
    ridge = RIDGE * (x.T @ (s[:, None] * x)).diagonal().mean()
    a = torch.cat([s.sqrt()[:, None] * x, ridge.sqrt() * torch.eye(x.shape[1], dtype=torch.float64)])
    rhs = torch.cat([s.sqrt()[:, None] * torch.cat([z_r, z_f]).double()[:, kept], ridge.sqrt() * w0.T])
    want = torch.linalg.lstsq(a, rhs).solution.T
    assert got_w.shape == (3, f_r.shape[1]) and got_w.dtype == w.dtype
    assert rel_err(got_w, want[:, : f_r.shape[1]]) < 1e-5
    if with_bias:
        assert got_b.shape == (3,) and rel_err(got_b, want[:, -1]) < 1e-5
    else:
        assert got_b is None


def test_wide_refits_in_one_batch_solve_on_two_threads():
    """Twenty-five 301-wide systems at once, in a process on two threads: torch.linalg.solve's
    batched CPU path failed there (an MKL parameter error) once torch.set_num_threads had been
    called; each system's rows must solve its own ridge problem."""
    import subprocess
    import sys

    code = """
import torch
from deepunlearn.head_refit import _Normal, _solved_many, RIDGE
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
d, kept = 300, torch.arange(0, 40, 2)
w, b = torch.randn(40, d, generator=g), torch.randn(40, generator=g)
problems, worst = [], 0.0
for k in range(25):
    f_r, f_f = torch.randn(50 + k, d, generator=g).relu(), torch.randn(30, d, generator=g).relu()
    z_r, z_f = torch.randn(50 + k, 40, generator=g), torch.randn(30, 40, generator=g)
    problems.append((_Normal.of(f_r, z_r, kept, True), _Normal.of(f_f, z_f, kept, True), 0.1 * (k % 5)))
for (r, f, weight), (rows_w, rows_b) in zip(problems, _solved_many(problems, w, b, kept)):
    per_f = weight * r.n / f.n
    gram, rhs = r.gram + per_f * f.gram, r.rhs + per_f * f.rhs
    ridge = RIDGE * gram.diagonal().mean()
    w0 = torch.cat([w.double()[kept], b.double()[kept, None]], 1)
    rows = torch.cat([rows_w.double(), rows_b.double()[:, None]], 1)  # (k, d + 1)
    residual = (gram + ridge * torch.eye(d + 1, dtype=torch.float64)) @ rows.T - (rhs + ridge * w0.T)
    worst = max(worst, float(residual.norm() / (rhs + ridge * w0.T).norm()))
print("worst", worst)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # float32 rows (the head's dtype) against the float64 system
    assert float(done.stdout.split("worst")[-1]) < 1e-5, done.stdout


def test_refit_rows_restores_a_head_that_explains_the_retain_logits():
    f_r, _, f_f, _, w, b = problem(1)
    true_w, true_b = w.flip(0), b.flip(0)
    z_r = f_r @ true_w.T + true_b  # the retain logits a head on these features gives
    z_f = f_f @ true_w.T + true_b
    got_w, got_b = refit_rows(f_r, z_r, f_f, z_f, w, b, range(5), FORGET_WEIGHTS[0])
    before = rel_err(f_r @ w.T + b, z_r)
    after = rel_err(f_r @ got_w.T + got_b, z_r)
    assert before > 0.5 and after < 0.02 * before


def hits_of(logits, recognised, forgotten, shift):
    lowered = [z.clone() for z in logits]
    for z in lowered:
        z[:, forgotten] -= shift
    return sum(int(r(z.argmax(-1)).sum()) for z, r in zip(lowered, recognised))


def test_the_lowest_shift_is_the_smallest_that_keeps_the_allowed_count():
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(60, 4, generator=g) for _ in range(3)]
    forgotten = torch.tensor([0, 2])
    recognised = [lambda p: torch.isin(p, forgotten)] * 3
    assert hits_of(logits, recognised, forgotten, 0.0) > 20
    for allowed in (0, 3, 10):
        s = lowest_shift(logits, recognised, forgotten, allowed)
        assert s > 0 and hits_of(logits, recognised, forgotten, s) <= allowed
        assert hits_of(logits, recognised, forgotten, s - 1e-3) > allowed  # nothing smaller does
    assert lowest_shift(logits, recognised, forgotten, 10_000) == 0.0
    # by labels: a sample predicted as another forgotten class is not recognised, and never becomes so
    labels = [forgotten[torch.randint(0, 2, (60,), generator=g)] for _ in range(3)]  # forget samples: forgotten classes
    by_label = [lambda p, y=y: p == y for y in labels]
    s = lowest_shift(logits, by_label, forgotten, 2)
    assert hits_of(logits, by_label, forgotten, s) <= 2 < hits_of(logits, by_label, forgotten, s - 1e-3)


def test_the_cross_validated_refit_keeps_the_allowed_count_and_reports_what_it_measured():
    f_r, _, f_f, _, w, b = problem(3, n_r=200, n_f=160)
    true_w = w.clone()
    true_w[1:] = w[1:].flip(0)  # the retained classes' rows mixed up by an edit; class 0 forgotten
    z_r = f_r @ true_w.T + b
    right = z_r.argmax(-1)
    kept = [1, 2, 3, 4]
    folds = [ForgetFold(part, (w, b), lambda p: p == 0) for part in f_f.split(40)]
    parts = list(torch.randperm(200, generator=torch.Generator().manual_seed(0)).split(50))
    for allowed in (0, 5):
        for r, weight in zip(cross_validated_refit(f_r, z_r, right, (w, b), folds, kept, parts, (0.0, 0.1), allowed),
                             (0.0, 0.1)):
            assert r.forget_hits <= allowed and r.forget_samples == 160 and r.kept == kept and r.forgotten_shift >= 0
            assert r.retain_acc_after > r.retain_acc_before + 20  # the mixed-up rows re-fitted
            assert r.weight.shape == (4, 9) and r.bias.shape == (4,) and r.forget_weight == weight
            # the rows kept are those fitted on every sample
            want = refit_rows(f_r, z_r, f_f, torch.cat([fold.features @ w.T + b for fold in folds]), w, b, kept, weight)
            assert rel_err(r.weight, want[0]) < 1e-5 and rel_err(r.bias, want[1]) < 1e-5
    best = best_refit(f_r, z_r, right, (w, b), folds, kept, parts, 0)
    every = cross_validated_refit(f_r, z_r, right, (w, b), folds, kept, parts, FORGET_WEIGHTS, 0)
    assert best is not None and best.forget_weight in FORGET_WEIGHTS and best.forget_hits == 0
    assert best.retain_acc_after == max(r.retain_acc_after for r in every)
    # a head whose rows already give the retain logits: re-fitting cannot raise its accuracy, and is kept only if it holds
    held = best_refit(f_r, z_r, right, (true_w, b), folds, kept, parts, 0)
    assert held is None or held.retain_acc_after >= held.retain_acc_before
