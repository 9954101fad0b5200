"""Statistics objects: arithmetic, persistence, devices, and leaving the model as it was."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from deepunlearn import Statistics, collect_statistics
from deepunlearn.statistics import model_fingerprint


def small_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 25, 3))


def test_statistics_add_equals_collection_over_the_union():
    m = small_model()
    x = torch.randn(12, 1, 5, 5)
    kw = {"dtype": torch.float64}  # float64 sums: the two orders of summation agree to rounding
    a, b = collect_statistics(m, x[:5], **kw), collect_statistics(m, x[5:], **kw)
    both = collect_statistics(m, x, **kw)
    s = a + b
    assert s.samples == 12 and s.fingerprint == both.fingerprint
    for k in both.slots:
        assert rel_err(s.slots[k].cov, both.slots[k].cov) < 1e-13
        assert s.slots[k].count == both.slots[k].count
    # the operands are not modified
    assert rel_err(a.slots["0"].cov, collect_statistics(m, x[:5], **kw).slots["0"].cov) == 0


def test_adding_statistics_of_different_models_is_refused():
    x = torch.randn(4, 1, 5, 5)
    with pytest.raises(ValueError, match="different models"):
        collect_statistics(small_model(), x) + collect_statistics(small_model(), x)


def test_save_load_round_trip(tmp_path):
    m = small_model()
    s = collect_statistics(m, torch.randn(6, 1, 5, 5))
    path = tmp_path / "s.pt"
    s.save(path)
    t = Statistics.load(path)
    assert t.fingerprint == s.fingerprint and t.samples == 6 and list(t.slots) == list(s.slots)
    for k in s.slots:
        assert torch.equal(t.slots[k].cov, s.slots[k].cov) and t.slots[k].count == s.slots[k].count
    t.check_matches(m)
    assert t.dtype == torch.float32 and [r["slot"] for r in t.summary()] == ["0", "5"]  # the default


def test_loading_a_file_that_is_not_statistics_fails_clearly(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ValueError, match="not a deepunlearn statistics file"):
        Statistics.load(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read statistics"):
        Statistics.load(junk)


def test_to_moves_and_casts():
    s = collect_statistics(small_model(), torch.randn(3, 1, 5, 5))
    assert s.dtype == torch.float32  # the default for a float32 model
    t = s.to("meta", torch.float64)
    assert t.device.type == "meta" and t.dtype == torch.float64
    assert s.device.type == "cpu" and s.dtype == torch.float32  # the original stays


def test_fingerprint_changes_with_weights_and_matches_on_copy():
    m = small_model()
    fp = model_fingerprint(m)
    import copy

    assert model_fingerprint(copy.deepcopy(m)) == fp
    with torch.no_grad():
        m[0].weight.mul_(2)
    assert model_fingerprint(m) != fp


def model_state(m: nn.Module):
    return (
        {n: mod.training for n, mod in m.named_modules()},
        {n: p.requires_grad for n, p in m.named_parameters()},
        {n: (len(mod._forward_hooks), len(mod._forward_pre_hooks)) for n, mod in m.named_modules()},
        {k: v.clone() for k, v in m.state_dict().items()},
    )


def assert_same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
    assert a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


@pytest.mark.parametrize("fail", [False, True])
def test_collection_leaves_the_model_exactly_as_it_was(fail):
    m = small_model().train()
    m[1].eval()  # mixed flags must come back mixed
    m[0].weight.requires_grad_(False)
    before = model_state(m)
    data = [torch.randn(4, 1, 5, 5), torch.randn(4, 2, 5, 5) if fail else torch.randn(4, 1, 5, 5)]
    if fail:
        with pytest.raises(ValueError, match="a convolution over 1 channel.*got an input of shape \\(4, 2, 5, 5\\)"):
            collect_statistics(m, data)
    else:
        collect_statistics(m, data)
    assert_same_state(model_state(m), before)  # BN running stats untouched too: eval mode was used


def test_corrupted_statistics_file_is_refused(tmp_path):
    s = collect_statistics(small_model(), torch.randn(6, 1, 5, 5))
    path = tmp_path / "s.pt"
    s.save(path)
    blob = torch.load(path, weights_only=True)
    blob["slots"]["0"]["cov"][0, 0, 0] += 1.0  # one flipped value
    torch.save(blob, path)
    with pytest.raises(ValueError, match="corrupted"):
        Statistics.load(path)
    blob["slots"]["0"] = {"cov": 3}
    torch.save(blob, path)
    with pytest.raises(ValueError, match="malformed|corrupted"):
        Statistics.load(path)


@pytest.mark.parametrize("keep_vectors", [False, True, "always"])
def test_first_moments_are_the_sums_of_the_input_vectors(keep_vectors):
    """Each slot's total is the sum of the very vectors its second moment sums: conv patches
    (padding included) and linear rows, whether the vectors were kept or streamed."""
    from deepunlearn.patches import ConvGeometry, conv_patches
    from deepunlearn.layers import find_targets

    m = small_model().double().eval()
    x = torch.randn(7, 1, 5, 5, dtype=torch.float64) + 0.3  # a mean far from zero
    s = collect_statistics(m, x, batch_size=3, keep_vectors=keep_vectors)
    patches = conv_patches(x, ConvGeometry.of(m[0]))  # (1, 7 * 25, 9)
    with torch.no_grad():
        head_in = m[:5](x)  # (7, 100)
    assert rel_err(s.slots["0"].total, patches.sum(1)) < 1e-13
    assert rel_err(s.slots["5"].total, head_in.sum(0)[None]) < 1e-13
    conv, head = find_targets(m)[0]
    assert rel_err(s.mean(conv), patches.mean(1)) < 1e-13 and rel_err(s.mean(head), head_in.mean(0)[None]) < 1e-13
    halves = collect_statistics(m, x[:4], keep_vectors=keep_vectors) + collect_statistics(m, x[4:], keep_vectors=keep_vectors)
    assert rel_err(halves.slots["5"].total, s.slots["5"].total) < 1e-13 and rel_err(halves.mean(head), s.mean(head)) < 1e-13


def test_first_moments_survive_saving_and_files_without_them_still_load(tmp_path):
    m = small_model()
    s = collect_statistics(m, torch.randn(6, 1, 5, 5) + 0.5)
    path = tmp_path / "s.pt"
    s.save(path)
    t = Statistics.load(path)
    assert all(torch.equal(t.slots[k].total, s.slots[k].total) for k in s.slots)
    blob = torch.load(path, weights_only=True)
    blob["slots"]["5"]["total"][0, 0] += 1.0  # a changed mean is a corrupted file
    torch.save(blob, path)
    with pytest.raises(ValueError, match="corrupted"):
        Statistics.load(path)
    # a file of format version 3 (no first moments): it loads, and holds no means
    old = s.to()
    for slot in old.slots.values():
        slot.total = None
    blob = old.to_blob()
    blob["version"] = 3
    torch.save(blob, path)
    loaded = Statistics.load(path)
    from deepunlearn.layers import find_targets

    assert all(loaded.mean(t) is None for t in find_targets(m)[0])
    assert (loaded + s).slots["5"].total is None  # a sum with a file lacking them lacks them too


class LogitsObject(nn.Module):
    """Returns an object holding ``.logits``, as Hugging Face classifiers do."""

    def __init__(self):
        super().__init__()
        self.inner = small_model()

    def forward(self, x):
        return type("Output", (), {"logits": self.inner(x)})()


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = small_model()

    def forward(self, x):
        return self.inner(x), x


def test_the_models_outputs_come_with_the_statistics():
    """``outputs`` gets each batch's logits (float32, as the model gives them; its ``.logits``
    where it returns an object), None where the output is no such tensor, and only the last
    collection's."""
    torch.manual_seed(0)
    x = torch.randn(11, 1, 5, 5)
    for model in (small_model(), LogitsObject()):
        model.eval()
        with torch.no_grad():
            want = getattr(model(x), "logits", model(x))
        outputs = [torch.zeros(1)]  # emptied first
        collect_statistics(model, x, batch_size=4, outputs=outputs)
        assert [y.shape[0] for y in outputs] == [4, 4, 3]
        assert rel_err(torch.cat(outputs).double(), want.double()) < 1e-6
    outputs = []
    collect_statistics(TupleOut(), x, batch_size=8, outputs=outputs)
    assert outputs == [None, None]


@pytest.mark.filterwarnings("ignore:no candidate reached")
def test_fingerprints_are_digested_once_while_the_weights_stay(monkeypatch):
    """Inside ``fingerprint_once`` a model's fingerprint is digested once (changing its weights
    there is the caller's error: the first digest stays); outside, every call reads the weights.
    The automatic call digests the model once for its six collections."""
    import hashlib

    from deepunlearn import statistics
    from deepunlearn.statistics import fingerprint_once

    torch.manual_seed(0)
    m = small_model().eval()
    fp = model_fingerprint(m)
    with fingerprint_once():
        assert model_fingerprint(m) == fp
        with torch.no_grad():
            m[0].weight.mul_(2.0)
        assert model_fingerprint(m) == fp
    assert model_fingerprint(m) != fp

    digests = []
    real = hashlib.sha256

    def counted(*args):
        digests.append(1)
        return real(*args)

    monkeypatch.setattr(statistics.hashlib, "sha256", counted)
    import deepunlearn

    deepunlearn.unlearn(m, torch.randn(40, 1, 5, 5) + 1.0, torch.randn(80, 1, 5, 5), inplace=False)
    assert len(digests) == 1
