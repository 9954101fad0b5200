"""The unedited start of the forward pass, kept per held-out sample while α is chosen."""
import pytest
import torch
from torch import nn

from deepunlearn import frozen_prefix
from deepunlearn.scoring import make_scorer
from deepunlearn.frozen_prefix import find_prefix
from deepunlearn.layers import find_targets
from deepunlearn.experiments.models import SmallCNN


def run_of(model):
    return lambda x: model(x)


def edited_params(model, skip_first=True):
    targets, _ = find_targets(model)
    return [getattr(t.module, t.param) for t in targets[1 if skip_first else 0:]]


@torch.no_grad()
def test_the_stem_of_a_cnn_is_found_and_its_stand_ins_give_the_models_output():
    model = SmallCNN().eval()
    x = torch.randn(6, 1, 28, 28)
    prefix = find_prefix(model, x, edited_params(model), run_of(model), 100)
    assert prefix is not None and prefix.members == list(model.features[:4])  # conv, batch norm, ReLU, pool
    want = model(x)
    prefix.capture(run_of(model), "a", [x[:4], x[4:]])
    prefix.kept("a", slice(2, 6))
    with prefix.standing_in():
        got = model(torch.full_like(x[2:6], float("nan")))  # the input never reaches a computing module
    assert torch.allclose(got, want[2:6], rtol=1e-6, atol=1e-6)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the modules' own forwards are back
    assert find_prefix(model, x, edited_params(model, skip_first=False), run_of(model), 100) is None  # first conv edited


class ViewsTheStem(SmallCNN):
    """Flattens with ``view``, which channels-last images cannot serve: kept in the usual layout."""

    def forward(self, x):
        h = self.features(x)
        return self.classifier[1:](h.view(h.shape[0], -1))


@torch.no_grad()
def test_kept_images_are_channels_last_on_the_cpu_where_the_model_takes_them():
    x = torch.randn(6, 1, 28, 28)
    for model, form in [(SmallCNN(), torch.channels_last), (ViewsTheStem(), torch.contiguous_format)]:
        model.eval()
        prefix = find_prefix(model, x, edited_params(model), run_of(model), 100)
        assert prefix is not None and prefix.memory_format == form, type(model).__name__
        prefix.capture(run_of(model), "a", [x])
        assert prefix.outputs["a"].is_contiguous(memory_format=form)
        prefix.kept("a", torch.tensor([4, 0, 2]))
        with prefix.standing_in():
            got = model(torch.full_like(x[:3], float("nan")))
        assert torch.allclose(got, model(x[[4, 0, 2]]), rtol=1e-5, atol=1e-5)


class Scaled(nn.Module):
    def forward(self, x, scale=1.0):
        return x * scale


class ScaledStem(SmallCNN):
    """A chain member called with a second argument: calling the members in turn would miss it."""

    def __init__(self):
        super().__init__()
        self.scaled = Scaled()

    def forward(self, x):
        return self.classifier(self.features[4:](self.scaled(self.features[:4](x), 2.0)))


@torch.no_grad()
def test_the_prefix_alone_runs_where_its_members_compose():
    x = torch.randn(6, 1, 28, 28)
    for model, composes in [(SmallCNN(), True), (ScaledStem(), False)]:
        model.eval()
        prefix = find_prefix(model, x, edited_params(model), run_of(model), 100)
        assert prefix is not None and prefix.composes is composes, type(model).__name__
        prefix.capture(run_of(model), "whole", [x[:4], x[4:]])
        prefix.input_format = torch.contiguous_format
        prefix.keep_composed("alone", [x[:4], x[4:]])
        assert torch.equal(prefix.outputs["alone"], prefix.outputs["whole"]) is composes


@torch.no_grad()
def test_the_prefix_alone_runs_channels_last_on_the_cpu():
    """SmallCNN's stem (1-channel images, so NCHW and channels-last at once) composed with each
    member's input channels-last: its max pooling runs channels-last, the outputs match whole
    passes to rounding."""
    model = SmallCNN().eval()
    x = torch.randn(6, 1, 28, 28)
    prefix = find_prefix(model, x, edited_params(model), run_of(model), 100)
    assert prefix is not None and prefix.input_format == torch.channels_last
    seen = []
    handle = model.features[3].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        prefix.keep_composed("alone", [x[:4], x[4:]])
    finally:
        handle.remove()
    assert seen and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in seen)
    prefix.capture(run_of(model), "whole", [x])
    assert torch.allclose(prefix.outputs["alone"], prefix.outputs["whole"], rtol=1e-5, atol=1e-6)


class Reused(nn.Module):
    """The stem's output is read again after the edited body: its stand-in's empty output cannot serve."""

    def __init__(self, in_place: bool = False):
        super().__init__()
        self.stem, self.act = nn.Linear(8, 8), nn.ReLU(inplace=in_place)
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.body(self.act(y))) + y[:, :3]


class Shared(nn.Module):
    """The same unedited module is called twice: its second call's input depends on the edit."""

    def __init__(self):
        super().__init__()
        self.norm, self.body, self.head = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.body(self.norm(x))))


class TransposedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).transpose(0, 1)


class SequenceFirst(nn.Module):
    """The unedited embedding returns (sequence, batch, features); the test's sequence is as long as
    its batch, so only a second batch size shows that the output is not per sample."""

    def __init__(self):
        super().__init__()
        self.embed = TransposedEmbedding()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # x: (batch, 6, 8)
        return self.head(self.body(self.embed(x)).mean(0))


@torch.no_grad()
@pytest.mark.parametrize("model", [Reused(), Reused(in_place=True), Shared(), SequenceFirst()],
                         ids=["reused", "reused-in-place", "shared", "sequence-first"])
def test_no_prefix_where_the_stand_ins_would_change_the_output(model):
    model.eval()
    x = torch.randn(6, 6, 8) if isinstance(model, SequenceFirst) else torch.randn(5, 8)
    edited = [model.body.weight, model.head.weight]
    assert find_prefix(model, x, edited, run_of(model), 100) is None
    assert all("forward" not in m.__dict__ for m in model.modules())


@torch.no_grad()
def test_no_prefix_beyond_the_memory_cap(monkeypatch):
    model = SmallCNN().eval()
    x = torch.randn(4, 1, 28, 28)
    per_sample = 16 * 14 * 14 * 4  # the pool's output, float32
    monkeypatch.setattr(frozen_prefix, "PREFIX_CACHE_BYTES", 100 * per_sample - 1)
    assert find_prefix(model, x, edited_params(model), run_of(model), 100) is None
    assert find_prefix(model, x, edited_params(model), run_of(model), 99) is not None


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_scores_with_the_prefix_kept_equal_those_of_whole_passes(device):
    """An edited body scored with the stem kept per sample: the same forget hits and retain
    scores as whole forward passes, for several chunks, heads and batch sizes; the held-out
    samples unchanged (a ReLU works in place right after the kept output)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    model = SmallCNN().eval().to(device)
    xf = [torch.randn(70, 1, 28, 28), torch.randn(50, 1, 28, 28)]
    xr = torch.randn(40, 1, 28, 28)
    before = [x.clone() for x in (*xf, xr)]
    edited = edited_params(model)
    kept = make_scorer(model, xf, None, xr, None, [0, 3], 16, None, edited=edited)
    whole = make_scorer(model, xf, None, xr, None, [0, 3], 16, None)
    assert kept.prefix is not None and whole.prefix is None
    assert all(out.device == next(model.parameters()).device for out in kept.prefix.outputs.values())
    assert torch.equal(kept.retain_ref, whole.retain_ref)
    for p in edited:  # a candidate edit: every edited weight moves
        p.mul_(1.0 + 0.3 * torch.randn_like(p))
    heads = [(model.classifier[-1].weight * s, model.classifier[-1].bias * s) for s in (1.0, 0.5)]
    from deepunlearn.scoring import HeadReader

    for scorer in (kept, whole):
        scorer.head = HeadReader(model.classifier[-1], None)
    for fold in (0, 1):
        for hs in (None, heads):
            n = len(xf[fold])
            assert torch.equal(kept.forget_recognised(model, fold, 0, n, hs), whole.forget_recognised(model, fold, 0, n, hs))
    for hs in (None, heads):
        for (acc_k, prob_k), (acc_w, prob_w) in zip(kept.retain_scores(model, hs), whole.retain_scores(model, hs)):
            assert acc_k == acc_w and abs(prob_k - prob_w) < 1e-4
    assert all(torch.equal(x, b) for x, b in zip((*xf, xr), before))


@torch.no_grad()
def test_the_unedited_logits_given_spare_the_whole_pass():
    """Unlabelled scoring with the unedited model's logits from the statistics' passes: the same
    forget classes and retain references, the prefix computed alone (the head never runs)."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    xf, xr = [torch.randn(30, 1, 28, 28), torch.randn(20, 1, 28, 28)], torch.randn(25, 1, 28, 28)
    original = ([model(x) for x in xf], model(xr))
    calls = []
    handle = model.classifier[-1].register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    try:
        given = make_scorer(model, xf, None, xr, None, None, 16, None, edited=edited_params(model), original=original)
        checks = sum(calls)  # find_prefix's checks on one batch
        computed = make_scorer(model, xf, None, xr, None, None, 16, None, edited=edited_params(model))
    finally:
        handle.remove()
    assert sum(calls) - checks == checks + 75  # the second also ran every held-out sample through the head
    assert torch.equal(given.retain_ref, computed.retain_ref) and given.forgotten == computed.forgotten
    assert given.scoring == computed.scoring == "original predictions"
    assert torch.equal(given.original_retain_logits, original[1])


@torch.no_grad()
def test_capturing_keeps_the_outputs_of_passes_over_exactly_the_sources_samples():
    model = SmallCNN().eval()
    x = torch.randn(10, 1, 28, 28)
    prefix = find_prefix(model, x, edited_params(model), run_of(model), 100)
    with prefix.capturing("a", 10):
        model(x[:6])
        model(x[6:])
    whole = prefix.capture(run_of(model), "b", [x])
    assert torch.equal(prefix.outputs["a"], prefix.outputs["b"]) and len(whole) == 1
    with prefix.capturing("c", 10):  # a pass too many (collected again): nothing kept
        model(x)
        model(x)
    assert "c" not in prefix.outputs and not model.features[3]._forward_hooks


def test_the_automatic_call_keeps_the_stems_outputs_from_its_statistics_passes(monkeypatch):
    """The stem's outputs of every part but the first fold come from the statistics' passes, and
    the head's re-fit reads its retain samples through them: the same choice and, to float32
    rounding, the same edit as with every part's outputs computed for the scoring alone."""
    import deepunlearn
    from contextlib import nullcontext
    torch.manual_seed(0)
    templates = torch.randn(3, 1, 28, 28)  # three classes: a pattern each, under noise

    def draw(c: torch.Tensor) -> torch.Tensor:
        return templates[c] + 0.8 * torch.randn(len(c), 1, 28, 28)

    model = SmallCNN(num_classes=3)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    with torch.enable_grad():
        for _ in range(40):
            y = torch.randint(0, 3, (64,))
            loss = nn.functional.cross_entropy(model(draw(y)), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    forget, retain = draw(torch.zeros(600, dtype=torch.long)), draw(torch.arange(1, 3).repeat(100))
    composed, read = [], set()
    real_compose, real_kept = frozen_prefix.FrozenPrefix.keep_composed, frozen_prefix.FrozenPrefix.kept
    monkeypatch.setattr(frozen_prefix.FrozenPrefix, "keep_composed",
                        lambda self, source, xs: composed.append(source) or real_compose(self, source, xs))
    monkeypatch.setattr(frozen_prefix.FrozenPrefix, "kept",
                        lambda self, source, rows: read.add(source) or real_kept(self, source, rows))
    report = deepunlearn.unlearn(model, forget, retain, inplace=False)
    assert composed == [0] and "fit" in read  # only the first fold, collected before the stem was known
    composed.clear()
    read.clear()
    monkeypatch.setattr(frozen_prefix.FrozenPrefix, "capturing", lambda self, source, samples: nullcontext())
    without = deepunlearn.unlearn(model, forget, retain, inplace=False)
    assert composed == [0, 1, 2, 3, "retain"] and "fit" not in read
    c, w = report.alpha_choice, without.alpha_choice
    assert c.reached_target and c.head_refit is not None  # the re-fit ran, through the kept outputs
    assert (c.alpha_r, c.alpha_f, c.alpha_f_head) == (w.alpha_r, w.alpha_f, w.alpha_f_head)
    for p, q in zip(report.model.parameters(), without.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)
