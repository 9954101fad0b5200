"""The edit, the drop-in calls, and every bad input."""
import copy
import inspect
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import deepunlearn
from conftest import rel_err
from deepunlearn import collect_statistics, forget_classes, unlearn
from deepunlearn.reference import activation_matrices, unlearn_paper
from deepunlearn.layers import find_targets
from deepunlearn.moments import dense

FIXED = {"alpha_r": 100.0, "alpha_f": 3.0}  # the fixed-α edit (the default call would choose α)


class Mixed(nn.Module):
    """Conv (grouped), attention and linear layers, double precision."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.conv(x))))  # (N, 8, H, W)
        t = h.flatten(2).transpose(1, 2)  # tokens
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def paper_edit(w: np.ndarray, r_f: np.ndarray, r_r: np.ndarray, a_f: float, a_r: float) -> np.ndarray:
    """The paper's code path in numpy: SVD of each activation matrix R (d × n), P = I − M_f(I − M_r), W Pᵀ."""

    def m(r, a):
        u, s, _ = np.linalg.svd(r, full_matrices=False)
        e = s**2 / (s**2).sum()
        lam = a * e / ((a - 1) * e + 1)
        return (u * lam) @ u.T

    mf, mr = m(r_f, a_f), m(r_r, a_r)
    p = np.eye(w.shape[1]) - mf @ (np.eye(w.shape[1]) - mr)
    return w @ p.T


@pytest.mark.parametrize("solver", ["cholesky", "eigh", "svd"])
def test_edit_equals_w_times_p_transpose_of_the_paper(solver):
    model = Mixed().double()
    xf, xr = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randn(7, 2, 5, 5, dtype=torch.float64)
    acts_f, acts_r = activation_matrices(model, xf), activation_matrices(model, xr)
    edited = unlearn(model, xf, xr, alpha_r=30.0, alpha_f=5.0, solver=solver, inplace=False).model
    checks = {"conv": ("conv", "weight", None), "dw": ("dw", "weight", None), "head": ("head", "weight", None),
              "attn.in_proj": ("attn", "in_proj_weight", None), "attn.out_proj": ("attn.out_proj", "weight", None)}
    for slot, (mod, param, _) in checks.items():
        w = getattr(model.get_submodule(mod), param).detach()
        new = getattr(edited.get_submodule(mod), param).detach()
        g = acts_f[slot].shape[0]
        wg, ng = w.reshape(g, w.shape[0] // g, -1).numpy(), new.reshape(g, w.shape[0] // g, -1)
        ref = np.stack([paper_edit(wg[i], acts_f[slot][i].T.numpy(), acts_r[slot][i].T.numpy(), 5.0, 30.0) for i in range(g)])
        assert rel_err(ng, torch.from_numpy(ref)) < 1e-10, slot
        assert rel_err(ng, torch.from_numpy(wg)) > 1e-3, slot  # the edit did something
    for (n, p), (_, q) in zip(model.named_parameters(), edited.named_parameters()):
        if n.endswith("bias"):
            assert torch.equal(p, q), n  # biases are unchanged


def test_streaming_path_equals_paper_procedure_on_the_same_batch():
    model = Mixed().double()
    xf, xr = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randn(9, 2, 6, 6, dtype=torch.float64)
    a = unlearn(model, xf, xr, inplace=False, **FIXED).model
    b = unlearn_paper(model, xf, xr, inplace=False).model
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert rel_err(p, q) < 1e-10, n


def test_paper_procedure_crop_and_patch_sampling_options():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    x = torch.randn(8, 3, 16, 16)
    acts = activation_matrices(model, x, conv_crop=True, max_patches=50)
    assert acts["0"].shape == (1, 50, 27)
    full = activation_matrices(model, x)
    assert full["0"].shape == (1, 8 * 256, 27)
    crop = activation_matrices(model, x, conv_crop=True)
    assert crop["0"].shape == (1, 8 * 7 * 7, 27)  # 9×9 window of the padded 18×18 input, k=3
    r = unlearn_paper(model, x[:4], x[4:], conv_crop=True, max_patches=20, inplace=False)
    assert r.layers[0].forget_vectors == 20 and r.solver == "paper-svd"


def test_inplace_false_returns_an_edited_copy_and_keeps_the_original():
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(6, 2, 5, 5)
    r = unlearn(model, x[:3], x[3:], inplace=False, **FIXED)
    assert r.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(r.model.head.weight, model.head.weight)
    r2 = unlearn(model, x[:3], x[3:], **FIXED)
    assert r2.model is model and torch.allclose(model.head.weight, r.model.head.weight, atol=1e-6)



@pytest.mark.parametrize("alphas", [FIXED, {}])
def test_a_compiled_model_is_edited_through_its_module_without_running_the_wrapper(alphas):
    # the wrapper would compile again for every hook and batch shape; its module shares its parameters
    torch.manual_seed(0)
    model = Mixed().eval()
    compiled = torch.compile(copy.deepcopy(model))

    def never(module, args):
        raise AssertionError("the torch.compile wrapper ran")

    compiled.register_forward_pre_hook(never)
    x = torch.randn(40, 2, 5, 5)
    x[:16] += 1.0
    want = unlearn(model, x[:16], x[16:], inplace=False, **alphas)
    for inplace in (False, True):
        got = unlearn(compiled, x[:16], x[16:], inplace=inplace, **alphas)
        assert type(got.model) is type(compiled) and (got.model is compiled) == inplace
        assert [layer.name for layer in got.layers] == [layer.name for layer in want.layers]
        for p, q in zip(got.model._orig_mod.parameters(), want.model.parameters()):
            assert torch.equal(p, q)
    collect_statistics(compiled, x).check_matches(compiled._orig_mod)  # the wrapper's fingerprint is its module's


@pytest.mark.parametrize("alphas", [FIXED, {}])
def test_a_call_under_inference_mode_gives_the_same_edit(alphas):
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(40, 2, 5, 5)
    x[:16] += 1.0
    want = unlearn(model, x[:16], x[16:], inplace=False, **alphas)
    with torch.inference_mode():
        data = x.clone()  # an inference tensor: it has no version counter
        got = unlearn(model, data[:16], data[16:], inplace=False, **alphas)
        frozen = copy.deepcopy(model)  # its parameters inference tensors: they cannot be written in place
    for p, q in zip(got.model.parameters(), want.model.parameters()):
        assert torch.equal(p, q) and not p.is_inference()
    with pytest.raises(ValueError, match="inference tensors .* pass inplace=False"):
        unlearn(frozen, x[:16], x[16:], **alphas)
    assert all(torch.equal(p, q) for p, q in zip(frozen.parameters(), model.parameters()))
    got.model(x).sum().backward()  # trainable as before

def test_report_contents_and_json():
    model = Mixed()
    x = torch.randn(6, 2, 5, 5)
    r = unlearn(model, x[:2], x[2:], **FIXED)
    names = [layer.name for layer in r.layers]
    assert names == ["conv", "dw", "attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj", "head"]
    conv = r.layers[0]
    assert conv.weight_shape == (8, 2, 3, 3) and conv.d == 18 and conv.forget_vectors == 2 * 25 and conv.retain_vectors == 4 * 25
    assert r.layers[1].groups == 4 and r.layers[1].d == 18
    assert r.layers[-1].forget_vectors == 2 and r.forget_samples == 2 and r.retain_samples == 4
    assert all(layer.forget_energy > 0 and layer.retain_energy > 0 for layer in r.layers)
    assert set(r.seconds) == {"collect_forget", "collect_retain", "choose_alpha", "decompose", "edit", "total"}
    json.dumps(r.to_dict())
    assert "attn.out_proj" in str(r)


def test_unsupported_layers_are_listed_not_silently_skipped():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.up = nn.ConvTranspose1d(6, 6, 2)
            self.fc = nn.Linear(6, 3)

        def forward(self, idx):
            return self.fc(self.up(self.emb(idx).transpose(1, 2)).mean(-1))

    idx = torch.randint(0, 10, (8, 5))
    r = unlearn(WithEmbedding(), idx[:4], idx[4:], **FIXED)
    assert [layer.name for layer in r.layers] == ["fc"]
    assert {name for name, _ in r.skipped} == {"emb.weight", "up.weight"}
    assert all("not a supported layer type" in why for _, why in r.skipped)


def test_multi_class_forgetting_draws_balanced_samples():
    x = torch.randn(300, 4)
    y = torch.arange(300) % 5
    ds = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    r = forget_classes(model, ds, [1, 3], retain_per_class=20, inplace=False, **FIXED)
    assert r.retain_samples == 60 and r.forget_samples == 60


def test_dead_group_is_not_an_error_and_is_reported():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(4 * 16, 3)).double()
    x = torch.randn(10, 4, 4, 4, dtype=torch.float64)
    x[:, :2] = 0  # group 0 sees only zeros in both sets
    w0 = model[0].weight.detach().clone()
    r = unlearn(model, x[:4], x[4:], **FIXED)
    conv = r.layers[0]
    assert any("group(s) [0]" in n for n in conv.notes)
    assert torch.isfinite(model[0].weight).all()
    assert torch.equal(model[0].weight[:2], w0[:2])  # nothing projected in the dead group
    assert not torch.equal(model[0].weight[2:], w0[2:])


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and the model unchanged
# ---------------------------------------------------------------------------------------------


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def unchanged(m, snap):
    return all(torch.equal(snap[k], v) for k, v in m.state_dict().items())


@pytest.fixture
def net():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 4))


X = torch.randn(8, 1, 5, 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(forget=X[:0], retain=X), "no samples in the forget data"),
        (dict(forget=X, retain=[]), "no samples in the retain data"),
        (dict(forget=X, retain=X, alpha_r=0), "alpha_r"),
        (dict(forget=X, retain=X, alpha_f=-2), "alpha_f"),
        (dict(forget=X, retain=X, alpha_f=math.nan), "alpha_f"),
        (dict(forget=X, retain=X, alpha_r=math.inf), "alpha_r"),
        (dict(forget=X, retain=X, solver="lu"), "solver"),
        (dict(forget=None, retain=X), "no forget data"),
        (dict(forget=X, retain=X, batch_size=0), "batch_size"),
        (dict(forget=X, retain=X, keep_retain_mean="yes"), "keep_retain_mean"),
    ],
)
def test_bad_arguments(net, kwargs, match):
    snap = snapshot(net)
    with pytest.raises(ValueError, match=match):
        unlearn(net, **kwargs)
    assert unchanged(net, snap)


def test_wrong_batch_type_is_named(net):
    with pytest.raises(TypeError, match="each batch must be a tensor"):
        unlearn(net, [("x", X)], X, **FIXED)
    with pytest.raises(TypeError, match="each batch must be a tensor"):
        unlearn(net, [{X}], X, **FIXED)


def test_model_without_supported_layer():
    for model in (nn.Sequential(nn.ReLU()), nn.Sequential(nn.BatchNorm1d(3))):
        with pytest.raises(ValueError, match="no layer deepunlearn can edit"):
            unlearn(model, torch.randn(4, 3), torch.randn(4, 3), **FIXED)


def test_non_finite_activations_name_the_first_layer(net):
    snap = snapshot(net)
    bad = X.clone()
    bad[0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite statistics at layer '0'"):
        unlearn(net, bad, X, **FIXED)
    with torch.no_grad():
        net[3].weight[0, 0] = float("inf")  # a broken head: earlier layers are fine
    snap = snapshot(net)
    with pytest.raises(RuntimeError, match="non-finite weights at layer '3'"):
        unlearn(net, X, X, **FIXED)
    assert unchanged(net, snap)


def test_statistics_from_another_model_are_refused(net):
    other = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 4))
    stats = collect_statistics(other, X)
    snap = snapshot(net)
    with pytest.raises(ValueError, match="statistics do not match the model"):
        unlearn(net, stats, X, **FIXED)
    assert unchanged(net, snap)
    ok = collect_statistics(net, X)
    unlearn(net, ok, collect_statistics(net, X[:4]), **FIXED)  # matching statistics are accepted
    assert not unchanged(net, snap)


def test_model_on_several_devices_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        unlearn(model, torch.randn(4, 3), torch.randn(4, 3), **FIXED)


def test_failure_while_planning_leaves_the_model_untouched(net, monkeypatch):
    import deepunlearn.plan as u

    calls = []
    real = u._edited

    def flaky(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second layer")
        return real(*a)

    monkeypatch.setattr(u, "_edited", flaky)
    snap = snapshot(net)
    with pytest.raises(RuntimeError, match="boom"):
        unlearn(net, X, X, **FIXED)
    assert len(calls) == 2 and unchanged(net, snap)


def test_forget_classes_bad_input():
    ds = TensorDataset(torch.randn(40, 3), torch.arange(40) % 4)
    model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"class\(es\) \[7\] do not occur"):
        forget_classes(model, ds, 7)
    with pytest.raises(ValueError, match="nothing to retain"):
        forget_classes(model, ds, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="no class to forget"):
        forget_classes(model, ds, [])
    with pytest.raises(ValueError, match="retain_per_class"):
        forget_classes(model, ds, 1, retain_per_class=0)


def test_help_documents_every_argument():
    for fn in (deepunlearn.unlearn, deepunlearn.forget_classes, deepunlearn.search_alphas, deepunlearn.collect_statistics):
        doc = inspect.getdoc(fn)
        for name in inspect.signature(fn).parameters:
            if name.startswith("**") or name == "unlearn_kwargs":
                assert "unlearn_kwargs" in doc
                continue
            assert name in doc, f"{fn.__name__} does not document {name}"


def test_layers_applied_functionally_are_edited_and_weights_used_otherwise_are_listed():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.functional = nn.Linear(4, 4)  # its weight is applied through F.linear, never via its module
            self.bypassed = nn.Linear(4, 4)  # its weight is multiplied by hand: no call to see

        def forward(self, x):
            return nn.functional.linear(self.used(x), self.functional.weight) @ self.bypassed.weight.T

    model = Functional()
    w = model.bypassed.weight.detach().clone()
    r = unlearn(model, torch.randn(6, 4), torch.randn(6, 4), **FIXED)
    assert [layer.name for layer in r.layers] == ["used", "functional"]
    assert all(layer.relative_change > 0 for layer in r.layers)
    assert len(r.skipped) == 1 and r.skipped[0][0] == "bypassed" and "never called" in r.skipped[0][1]
    assert torch.equal(model.bypassed.weight, w)


class _Reversed(nn.Module):
    """Registered in the opposite order to the one the input reaches them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.mid = nn.Linear(16, 16)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.stem(x)).flatten(1))))


def test_skip_first_layer_leaves_the_layer_the_input_reaches_first_and_the_rest_as_before():
    torch.manual_seed(0)
    model = _Reversed()
    xf, xr = torch.randn(6, 2, 2, 2), torch.randn(20, 2, 2, 2)
    every = unlearn(model, xf, xr, alpha_r=100, alpha_f=3, inplace=False)  # both scales given: the paper's, all layers
    assert [r.name for r in every.layers] == ["head", "mid", "stem"] and not every.skipped
    skip = unlearn(model, xf, xr, alpha_r=100, alpha_f=3, inplace=False, skip_first_layer=True)
    assert [r.name for r in skip.layers] == ["head", "mid"]
    assert skip.skipped == [("stem", "the first layer the input reaches (skip_first_layer): unchanged")]
    assert torch.equal(skip.model.stem.weight, model.stem.weight)
    for name in ("head", "mid"):  # each layer's edit depends on its own statistics only
        assert torch.equal(getattr(skip.model, name).weight, getattr(every.model, name).weight), name
    one = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))  # a single editable layer is always edited
    assert [r.name for r in unlearn(one, xf, xr, alpha_r=100, alpha_f=3, inplace=False, skip_first_layer=True).layers] == ["1"]


@pytest.mark.filterwarnings("ignore:no candidate reached")  # an untrained model: the scope is checked, not the choice
def test_the_automatic_choice_skips_the_first_layer_unless_told_not_to():
    torch.manual_seed(0)
    model = _Reversed()
    xf, xr = torch.randn(40, 2, 2, 2) + 2.0, torch.randn(80, 2, 2, 2)
    auto = unlearn(model, xf, xr, inplace=False)
    assert [name for name, _ in auto.skipped] == ["stem"] and torch.equal(auto.model.stem.weight, model.stem.weight)
    edited = unlearn(model, xf, xr, inplace=False, skip_first_layer=False)
    assert not edited.skipped and not torch.equal(edited.model.stem.weight, model.stem.weight)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_keeping_the_retain_mean_shifts_each_bias_so_the_mean_output_stays(device):
    """Every edited layer with a bias (convs, grouped convs, attention's packed and output
    projections, Linear layers sharing an input, the head) maps the retain samples' mean input
    to what it did before; the weights are those of the plain edit, and only biases differ."""
    import sys
    from pathlib import Path

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from models_for_tests import fixture_data, fixture_model

    xf, xr = (x.to(device) for x in fixture_data())
    plain = fixture_model().to(device)
    kept = fixture_model().to(device)
    original = fixture_model().to(device)
    unlearn(plain, xf, xr, batch_size=4, **FIXED)
    report = unlearn(kept, xf, xr, batch_size=4, keep_retain_mean=True, **FIXED)
    assert report.keep_retain_mean and not unlearn(fixture_model().to(device), xf, xr, **FIXED).keep_retain_mean
    stats = collect_statistics(original, xr)  # float64: the model's dtype
    targets = {t.name: t for t in find_targets(original)[0]}
    checked = 0
    for t_new, t_plain in zip(find_targets(kept)[0], find_targets(plain)[0]):
        t_old = targets[t_new.name]
        assert torch.equal(t_new.weight(), t_plain.weight()) if device == "cpu" else rel_err(t_new.weight(), t_plain.weight()) < 1e-10
        mu = stats.mean(t_old)  # (g, d)
        w_old, w_new = t_old.as_matrices(t_old.weight()), t_new.as_matrices(t_new.weight())
        out_old = (w_old @ mu[:, :, None]).reshape(-1) + t_old.bias()
        out_new = (w_new @ mu[:, :, None]).reshape(-1) + t_new.bias()
        assert rel_err(out_new, out_old) < 1e-12, t_new.name
        assert not torch.equal(t_new.bias(), t_old.bias()) and torch.equal(t_plain.bias(), t_old.bias()), t_new.name
        checked += 1
    assert checked == len(targets) == 9
    assert all("bias shifted" in " ".join(r.notes) for r in report.layers)


def test_given_statistics_are_left_as_they_were_and_give_the_collected_edit(net):
    """Statistics the call collected are factored in their own memory; given ones are only read."""
    sf, sr = collect_statistics(net, X[:4]), collect_statistics(net, X[4:])
    before = copy.deepcopy((sf, sr))
    from_data = copy.deepcopy(net)
    unlearn(from_data, X[:4], X[4:], **FIXED)
    unlearn(net, sf, sr, **FIXED)
    targets = find_targets(net)[0]
    for given, kept in zip((sf, sr), before):
        for t in targets:
            assert torch.equal(dense(given.moment(t)[0]), dense(kept.moment(t)[0])), t.name
    for p, q in zip(net.parameters(), from_data.parameters()):
        assert torch.equal(p, q)


def test_keeping_the_retain_mean_needs_first_moments(net, tmp_path):
    sf, sr = collect_statistics(net, X[:4]), collect_statistics(net, X[4:])
    for slot in sr.slots.values():
        slot.total = None  # as read from a file of format version 3
    snap = snapshot(net)
    with pytest.raises(ValueError, match="no mean input of layer"):
        unlearn(net, sf, sr, keep_retain_mean=True, **FIXED)
    assert unchanged(net, snap)
    unlearn(net, sf, sr, **FIXED)  # the plain edit needs none
    assert not unchanged(net, snap)
