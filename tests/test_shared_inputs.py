"""Linear layers that read one input tensor (separate q/k/v projections) share one statistic."""
import math

import pytest
import torch
from torch import nn

import deepunlearn
from deepunlearn import Statistics, collect_statistics
from deepunlearn.layers import find_targets
from deepunlearn.reference import unlearn_paper

from conftest import rel_err


class SelfAttention(nn.Module):
    """Hugging Face / timm style: query, key and value are separate Linear layers on one input."""

    def __init__(self, e: int = 12, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.out = nn.Linear(e, e)

    def forward(self, h):
        b, t, e = h.shape
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.query, self.key, self.value))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // self.heads), dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, t, e))


class TinyTransformer(nn.Module):
    def __init__(self, e: int = 12, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(5, e)
        self.attn = SelfAttention(e)
        self.norm = nn.LayerNorm(e)
        self.head = nn.Linear(e, classes)

    def forward(self, x):  # x: (N, T, 5)
        h = self.embed(x)
        h = self.norm(h + self.attn(h))
        return self.head(h.mean(1))


def independent_second_moments(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear's input second moment from plain hooks (no deepunlearn code)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, args, name=name):
                r = args[0].detach().double().reshape(-1, mod.in_features)
                out[name] = out.get(name, 0) + r.T @ r
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for xb in x.split(4):
            model(xb)
    for h in handles:
        h.remove()
    return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyTransformer().double()


def test_query_key_value_share_one_slot_and_match_an_independent_computation(model):
    x = torch.randn(10, 6, 5, dtype=torch.float64)
    stats = collect_statistics(model, x, batch_size=4)
    assert stats.aliases == {"attn.key": "attn.query", "attn.value": "attn.query"}
    assert "attn.key" not in stats.slots and "attn.value" not in stats.slots
    ref = independent_second_moments(model, x)
    targets, _ = find_targets(model)
    for t in targets:
        cov, n = stats.covariance(t)
        assert rel_err(cov[0], ref[t.name]) < 1e-12, t.name
        assert n == (10 if t.name == "head" else 60)


def test_shared_statistics_give_the_same_edit_as_one_slot_per_layer(model):
    torch.manual_seed(1)
    xf, xr = torch.randn(8, 6, 5, dtype=torch.float64) + 1, torch.randn(8, 6, 5, dtype=torch.float64)
    shared = deepunlearn.unlearn(model, xf, xr, inplace=False, batch_size=8, alpha_r=100, alpha_f=3)
    paper = unlearn_paper(model, xf, xr, inplace=False, batch_size=8)  # keeps one matrix per layer
    for (name, a), b in zip(shared.model.state_dict().items(), paper.model.state_dict().values()):
        assert rel_err(a, b) < 1e-10, name
    assert {r.name for r in shared.layers} == {"embed", "attn.query", "attn.key", "attn.value", "attn.out", "head"}


def test_save_load_and_add_keep_the_sharing(model, tmp_path):
    x = torch.randn(8, 6, 5, dtype=torch.float64)
    stats = collect_statistics(model, x)
    stats.save(tmp_path / "s.pt")
    back = Statistics.load(tmp_path / "s.pt")
    assert back.aliases == stats.aliases
    both = back + stats
    key = next(t for t in find_targets(model)[0] if t.name == "attn.key")
    assert rel_err(both.covariance(key)[0], 2 * stats.covariance(key)[0]) < 1e-14
    # adding statistics whose sharing differs expands the aliases first
    plain = stats.expanded()
    assert not plain.aliases and "attn.key" in plain.slots
    mixed = plain + stats
    assert rel_err(mixed.covariance(key)[0], 2 * stats.covariance(key)[0]) < 1e-14
    # the summary names the layers sharing a buffer
    row = next(r for r in stats.summary() if r["slot"] == "attn.query")
    assert row["shared_by"] == ["attn.key", "attn.value"]


def test_version_one_files_without_aliases_still_load(model, tmp_path):
    stats = collect_statistics(model, torch.randn(4, 6, 5, dtype=torch.float64)).expanded()
    blob = stats.to_blob()
    blob["version"] = 1
    del blob["aliases"]
    torch.save(blob, tmp_path / "v1.pt")
    back = Statistics.load(tmp_path / "v1.pt")
    assert not back.aliases and set(back.slots) == set(stats.slots)


class SometimesShared(nn.Module):
    """Key reads the query's input in the first batch only (a model whose wiring depends on the data)."""

    def __init__(self):
        super().__init__()
        self.query, self.key = nn.Linear(4, 3), nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.query(x) + self.key(x if self.calls == 1 else 2 * x)


def test_sharing_that_does_not_hold_later_is_collected_again_per_layer():
    model = SometimesShared().double()
    x = torch.randn(9, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="collecting again with one statistic per layer"):
        stats = collect_statistics(model, x, batch_size=3)
    assert not stats.aliases
    # independent: the second pass ran with calls 4..6, so key saw 2x in every batch
    q, k = x.T @ x, 4 * x.T @ x
    assert rel_err(stats.slots["query"].cov[0], q) < 1e-12
    assert rel_err(stats.slots["key"].cov[0], k) < 1e-12


def test_sharing_that_changes_on_a_one_shot_iterator_is_a_clear_error():
    model = SometimesShared().double()
    batches = iter(torch.randn(9, 4, dtype=torch.float64).split(3))
    with pytest.raises(ValueError, match="iterated twice"):
        collect_statistics(model, batches)


class CalledTwice(nn.Module):
    """``b`` reads x first; ``a`` then runs twice on that same x: one shared buffer would count x once."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x) + self.a(x) + self.a(x)


def test_a_layer_called_twice_on_a_shared_input_keeps_exact_statistics():
    model = CalledTwice().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="ran 2 time"):
        stats = collect_statistics(model, x, batch_size=3)
    assert not stats.aliases
    ref = independent_second_moments(model, x)
    for t in find_targets(model)[0]:
        assert rel_err(stats.covariance(t)[0][0], ref[t.name]) < 1e-12, t.name
