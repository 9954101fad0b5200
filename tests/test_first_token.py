"""Statistics of sequence inputs from their first position only (``first_token``): against an
independent computation, kept apart from all-position statistics, and through the edit."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from test_covariance import unrolled_attention

import deepunlearn
from deepunlearn import Statistics, collect_statistics
from deepunlearn.experiments.models import SmallViT


class TokenNet(nn.Module):
    """A class token, self-attention in either layout, an MLP on every token, a head on token 0."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x):  # x: (n, L, 6)
        t = self.embed(x)
        a = t if self.batch_first else t.transpose(0, 1)
        a = self.attn(a, a, a, need_weights=False)[0]
        t = t + (a if self.batch_first else a.transpose(0, 1))
        t = t + torch.relu(self.mlp(t))
        return self.head(t[:, 0])


@pytest.mark.parametrize("position", [0, -1])
@pytest.mark.parametrize("batch_first", [True, False])
def test_one_position_statistics_match_an_independent_computation(batch_first, position):
    torch.manual_seed(0)
    model = TokenNet(batch_first).double().eval()
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    stats = collect_statistics(model, x, first_token=True, token_position=position)
    with torch.no_grad():
        t = model.embed(x)
        out = unrolled_attention(model.attn, t, t, t).reshape(5, 7, 16)
        t2 = t + out @ model.attn.out_proj.weight.T + model.attn.out_proj.bias
        t3 = t2 + torch.relu(model.mlp(t2))
    p = position
    want = {"embed": x[:, p], "attn.in_proj": t[:, p], "attn.out_proj": out[:, p], "mlp": t2[:, p], "head": t3[:, 0]}
    assert stats.first_token and stats.token_position == position and set(stats.slots) == set(want)
    for name, rows in want.items():
        assert stats.slots[name].count == 5, name  # one vector per sample
        assert rel_err(stats.slots[name].cov[0], rows.T @ rows) < 1e-12, name
    every = collect_statistics(model, x)
    assert every.slots["mlp"].count == 35 and every.slots["head"].count == 5  # the head's input was one vector already


def test_first_position_statistics_are_kept_apart(tmp_path):
    torch.manual_seed(0)
    model = TokenNet(True).eval()
    x = torch.randn(4, 7, 6)
    first, every = collect_statistics(model, x, first_token=True), collect_statistics(model, x)
    with pytest.raises(ValueError, match="one position only"):
        first + every
    last = collect_statistics(model, x, first_token=True, token_position=-1)
    with pytest.raises(ValueError, match="sequence position 0 to those of position -1"):
        first + last
    first.save(tmp_path / "s.pt")
    assert Statistics.load(tmp_path / "s.pt").first_token
    last.save(tmp_path / "last.pt")
    assert Statistics.load(tmp_path / "last.pt").token_position == -1
    with pytest.raises(ValueError, match="collected with token_position=-1, but the call has token_position=0"):
        deepunlearn.unlearn(model, last, x, alpha_r=100, alpha_f=3, first_token=True, token_position=0)
    with pytest.raises(ValueError, match="token_position must be a sequence position"):
        deepunlearn.unlearn(model, x, x, alpha_r=100, alpha_f=3, first_token=True, token_position=True)
    with pytest.raises(ValueError, match="token_position must be a sequence position"):
        collect_statistics(model, x, first_token=True, token_position=0.5)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"token_position=7, but layer 'embed' read sequences of 7 position\(s\)"):
        deepunlearn.unlearn(model, x, x, alpha_r=100, alpha_f=3, first_token=True, token_position=7)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="collected with first_token=True, but the call has first_token=False"):
        deepunlearn.unlearn(model, first, every, alpha_r=100, alpha_f=3, first_token=False)
    with pytest.raises(ValueError, match="collected with first_token=False, but the call has first_token=True"):
        deepunlearn.unlearn(model, first, every, alpha_r=100, alpha_f=3)  # the kind is taken from the forget side
    report = deepunlearn.unlearn(model, first, first + first, alpha_r=100, alpha_f=3, inplace=False)
    same = deepunlearn.unlearn(model, first, x, alpha_r=100, alpha_f=3, inplace=False)  # retain collected of that kind
    for p, q in zip(report.model.parameters(), same.model.parameters()):
        assert torch.isfinite(p).all() and rel_err(p, q) < 1e-5


def test_unlearn_with_first_token_on_a_small_vit():
    torch.manual_seed(0)
    model = SmallViT().eval()
    xf, xr = torch.randn(6, 1, 28, 28), torch.randn(12, 1, 28, 28)
    report = deepunlearn.unlearn(model, xf, xr, alpha_r=100, alpha_f=3, first_token=True, inplace=False)
    rows = {r.name: r for r in report.layers}
    # the encoder's linear maps saw one vector per image; the patch embedding (a conv) saw every patch
    assert rows["encoder.layers.0.linear1"].forget_vectors == 6 and rows["patch"].forget_vectors == 6 * 16
    assert rows["head"].retain_vectors == 12


@pytest.mark.filterwarnings("ignore:no candidate reached")  # untrained models: the modes are checked, not the choice
def test_the_automatic_choice_scores_both_ways_for_models_that_read_sequences(monkeypatch):
    from deepunlearn import automatic

    calls = []
    real = automatic.choose_alphas

    def spy(*args, **kwargs):
        c = real(*args, **kwargs)
        calls.append(c)
        return c

    monkeypatch.setattr(automatic, "choose_alphas", spy)
    torch.manual_seed(0)
    model = TokenNet(True).eval()
    xf, xr = torch.randn(24, 7, 6) + 1.0, torch.randn(48, 7, 6)
    report = deepunlearn.unlearn(model, xf, xr, inplace=False)
    assert len(calls) == 2  # the first position's statistics, then every position's
    assert [c.first_token for c in calls] == [True, False]
    from deepunlearn.auto_alpha import choice_rank

    ranks = [choice_rank(c) for c in calls]
    assert report.alpha_choice.first_token == (ranks[0] >= ranks[1])  # ties keep the first
    assert (report.alpha_choice.alpha_r, report.alpha_choice.alpha_f) == (report.alpha_r, report.alpha_f)
    calls.clear()
    deepunlearn.unlearn(model, xf, xr, inplace=False, first_token=False)  # given: one way only
    assert len(calls) == 1 and not calls[0].first_token
    calls.clear()
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    deepunlearn.unlearn(cnn, torch.randn(24, 1, 6, 6) + 1.0, torch.randn(48, 1, 6, 6), inplace=False)
    assert len(calls) == 1  # no sequence read: nothing to choose between


@pytest.mark.parametrize("batch_first", [True, False])
def test_both_kinds_from_one_set_of_forward_passes_equal_two_collections(batch_first):
    from deepunlearn.collect import collect_both_kinds

    torch.manual_seed(0)
    model = TokenNet(batch_first).double().eval()
    x = torch.randn(9, 7, 6, dtype=torch.float64)
    full, token = collect_both_kinds(model, x, batch_size=4)
    for got, want in ((full, collect_statistics(model, x, batch_size=4)),
                      (token, collect_statistics(model, x, batch_size=4, first_token=True))):
        assert got.first_token == want.first_token and got.sequence_inputs and got.samples == 9
        assert got.fingerprint == want.fingerprint and set(got.slots) == set(want.slots)
        for k in want.slots:
            assert got.slots[k].count == want.slots[k].count, k
            assert rel_err(got.slots[k].cov, want.slots[k].cov) < 1e-12, k
    assert token.slots["head"] is full.slots["head"]  # no sequence there: one object for both kinds
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    full, token = collect_both_kinds(cnn, torch.randn(5, 1, 6, 6))
    assert token is None and not full.sequence_inputs


class PooledTokenNet(TokenNet):
    """TokenNet whose head reads the mean of every position: no class token."""

    def forward(self, x):
        t = self.embed(x)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + torch.relu(self.mlp(t))
        return self.head(t.mean(1))


class LastTokenNet(TokenNet):
    """TokenNet whose head reads the last position (as GPT-2's sequence classifiers do)."""

    def forward(self, x):
        t = self.embed(x)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + torch.relu(self.mlp(t))
        return self.head(t[:, -1])


def test_a_class_token_model_is_told_from_one_that_pools_its_positions():
    from deepunlearn.scoring import read_position

    torch.manual_seed(0)
    x = torch.randn(8, 7, 6)
    for model, want in [(TokenNet(True), 0), (TokenNet(False), 0), (PooledTokenNet(True), None), (SmallViT(), 0),
                        (LastTokenNet(True), -1)]:
        model.train()  # restored after
        before = [p.clone() for p in model.parameters()]
        inputs = torch.randn(8, 1, 28, 28) if isinstance(model, SmallViT) else x
        got = read_position(model, inputs, model.head, None)
        assert got == want, type(model).__name__
        assert model.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert read_position(model, inputs[:1], model.head, None) is None  # one sample: cannot tell
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    assert read_position(cnn, torch.randn(8, 1, 6, 6), cnn[-1], None) is None  # no sequence at all


@pytest.mark.filterwarnings("ignore:no candidate reached")  # untrained models: the modes are checked, not the choice
@pytest.mark.parametrize("pooled", [False, True])
def test_every_position_is_not_searched_where_the_class_token_alone_is_read_and_reached_the_target(monkeypatch, pooled):
    from deepunlearn import automatic

    calls = []
    real = automatic.choose_alphas

    def reaching(*args, **kwargs):  # the first position's search counts as reaching the target
        c = real(*args, **kwargs)
        c.reached_target = c.reached_target or not calls
        calls.append(c)
        return c

    monkeypatch.setattr(automatic, "choose_alphas", reaching)
    torch.manual_seed(0)
    model = (PooledTokenNet if pooled else TokenNet)(True).eval()
    report = deepunlearn.unlearn(model, torch.randn(24, 7, 6) + 1.0, torch.randn(48, 7, 6), inplace=False)
    assert [c.first_token for c in calls] == ([True, False] if pooled else [True])
    assert report.alpha_choice.every_position_skipped is (not pooled)
    assert ("every position not searched" in str(report.alpha_choice)) is (not pooled)


@pytest.mark.filterwarnings("ignore:no candidate reached")
@pytest.mark.parametrize("reaches", [True, False])
def test_every_position_statistics_are_collected_only_where_their_search_runs(monkeypatch, reaches):
    """A class-token model: after the first fold (both kinds, in one pass), the other folds and the
    retain parts are collected for the first position alone; every position's follow, for those
    parts, only where the first position's search missed the target. The chosen edit is then the
    fixed call's with the chosen scales and kind."""
    from deepunlearn import automatic

    calls, collected = [], []
    real_choose, real_collect = automatic.choose_alphas, automatic.collect_statistics

    def choose(*args, **kwargs):
        c = real_choose(*args, **kwargs)
        c.reached_target = c.reached_target or (reaches and not calls)
        calls.append(c)
        return c

    def collect(model, data, **kwargs):
        collected.append(kwargs["first_token"])
        return real_collect(model, data, **kwargs)

    monkeypatch.setattr(automatic, "choose_alphas", choose)
    monkeypatch.setattr(automatic, "collect_statistics", collect)
    torch.manual_seed(0)
    model = TokenNet(True).eval()
    xf, xr = torch.randn(24, 7, 6) + 1.0, torch.randn(48, 7, 6)
    report = deepunlearn.unlearn(model, xf, xr, inplace=False, refit_head=False)
    parts = 3 + 2  # three more folds, the retain fit and its held-out part
    assert [c.first_token for c in calls] == ([True] if reaches else [True, False])
    assert collected == [True] * parts + ([] if reaches else [False] * parts)
    c = report.alpha_choice
    monkeypatch.setattr(automatic, "collect_statistics", real_collect)
    fixed = deepunlearn.unlearn(model, xf, xr, inplace=False, alpha_r=c.alpha_r, alpha_f=c.alpha_f, alpha_f_head=c.alpha_f_head,
                                first_token=c.first_token, keep_retain_mean=c.keep_retain_mean, skip_first_layer=True)
    for p, q in zip(report.model.parameters(), fixed.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool, want", [("token", 0), ("avg", None)])
def test_a_timm_vit_reads_its_class_token_only_with_token_pooling(pool, want):
    timm = pytest.importorskip("timm")
    from deepunlearn.scoring import read_position

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5, global_pool=pool).eval()
    assert read_position(model, torch.randn(4, 3, 32, 32), model.head, None) == want


@pytest.mark.parametrize("arch, want", [("bert", 0), ("gpt2", -1)])
def test_hugging_face_text_classifiers_read_their_class_token_or_their_last_position(arch, want):
    transformers = pytest.importorskip("transformers")
    from deepunlearn.scoring import read_position

    torch.manual_seed(0)
    common = dict(vocab_size=40, num_labels=3)
    if arch == "bert":  # the pooler reads [CLS], position 0
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **common))
    else:  # the score of the last non-padding position
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            n_embd=16, n_layer=1, n_head=2, pad_token_id=0, bos_token_id=None, eos_token_id=None, **common))
    x = torch.randint(1, 40, (6, 9))  # no padding token
    assert read_position(model.eval(), x, model.classifier if arch == "bert" else model.score, None) == want
