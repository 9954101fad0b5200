"""Statistics of every layer kind against independent computations."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_err
import deepunlearn
from deepunlearn import collect_statistics
from deepunlearn.ops.covariance import accumulate_conv_reference_
from deepunlearn.patches import ConvGeometry, conv_patches

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def identity_conv_patches(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Oracle: a conv with one-hot kernels outputs exactly the patches; ``(g, n, d_g)``."""
    g, c_in, k = conv.groups, conv.in_channels, conv.kernel_size
    d = c_in // g * math.prod(k)
    eye = conv.__class__(c_in, g * d, k, conv.stride, conv.padding, conv.dilation, g, bias=False, padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        eye.weight.copy_(torch.eye(d, dtype=torch.float64).repeat(g, 1).reshape(g * d, c_in // g, *k))
        out = eye(x.double())  # (N, g*d, *out)
    out = out.reshape(out.shape[0], g, d, -1).permute(1, 0, 3, 2)  # (g, N, positions, d)
    return out.reshape(g, -1, d)


CASES = [
    # nd, c_in, c_out, kernel, stride, padding, dilation, groups, padding_mode
    (1, 4, 6, 3, 1, 1, 1, 1, "zeros"),
    (1, 4, 4, 5, 2, 2, 2, 4, "reflect"),
    (1, 6, 4, 3, 1, "same", 1, 2, "circular"),
    (2, 3, 8, 3, 1, 1, 1, 1, "zeros"),
    (2, 4, 6, (3, 2), (2, 1), (1, 0), 1, 2, "zeros"),
    (2, 4, 8, 3, 2, 2, 2, 4, "reflect"),
    (2, 8, 8, 3, 1, 1, 1, 8, "replicate"),  # depthwise
    (2, 6, 6, 4, 1, "same", 1, 3, "circular"),  # even kernel, asymmetric 'same'
    (2, 4, 4, 3, 1, "valid", 1, 1, "zeros"),
    (2, 4, 6, 1, 1, 0, 1, 2, "zeros"),  # pointwise grouped
    (3, 2, 4, 3, 1, 1, 1, 1, "zeros"),
    (3, 4, 4, (2, 3, 1), (1, 2, 1), (1, 1, 0), (2, 1, 1), 2, "replicate"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"conv{c[0]}d-{i}" for i, c in enumerate(CASES)])
def test_conv_statistics_equal_identity_kernel_oracle(case):
    nd, c_in, c_out, k, s, p, dil, g, mode = case
    conv = CONV[nd](c_in, c_out, k, s, p, dil, g, padding_mode=mode).double()
    shape = {1: (3, c_in, 11), 2: (3, c_in, 9, 8), 3: (2, c_in, 6, 7, 5)}[nd]
    x = torch.randn(shape, dtype=torch.float64)
    oracle = identity_conv_patches(conv, x)
    patches = conv_patches(x, ConvGeometry.of(conv))
    assert patches.shape == oracle.shape
    assert rel_err(patches, oracle) < 1e-14
    # the patches reproduce the layer's output with its flattened weight: ordering is right
    w = conv.weight.reshape(g, c_out // g, -1)
    out = torch.einsum("god,gnd->gno", w, patches)
    ref = (conv(x) - conv.bias.reshape(1, -1, *[1] * nd)).movedim(1, -1).reshape(-1, g, c_out // g).transpose(0, 1)
    assert rel_err(out, ref) < 1e-12
    # and the streamed statistics (through hooks, chunked) equal the oracle's second moment
    stats = collect_statistics(nn.Sequential(conv), x, batch_size=2)
    cov = stats.slots["0"].cov
    assert rel_err(cov, oracle.transpose(1, 2) @ oracle) < 1e-12
    assert stats.slots["0"].count == oracle.shape[1]


def test_conv2d_statistics_equal_unfold_statistics():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, dilation=2).double()
    x = torch.randn(4, 5, 13, 11, dtype=torch.float64)
    u = F.unfold(x, 3, dilation=2, padding=1, stride=2).transpose(1, 2).reshape(-1, 45)
    stats = collect_statistics(conv, x)
    assert rel_err(stats.slots[""].cov[0], u.T @ u) < 1e-12


def test_pure_conv_path_chunks_without_changing_the_result(monkeypatch):
    import deepunlearn.ops.covariance as cv

    geom = ConvGeometry.of(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(9, 3, 10, 10, dtype=torch.float64)
    one = accumulate_conv_reference_(torch.zeros(1, 27, 27, dtype=torch.float64), x, geom)
    monkeypatch.setattr(cv, "_PATCH_CHUNK_ELEMENTS", 27 * 100 * 2)  # two samples per chunk
    many = accumulate_conv_reference_(torch.zeros(1, 27, 27, dtype=torch.float64), x, geom)
    assert rel_err(many, one) < 1e-14


def test_linear_statistics_cover_every_leading_position():
    lin = nn.Linear(6, 3).double()
    x = torch.randn(4, 5, 2, 6, dtype=torch.float64)
    stats = collect_statistics(lin, x)
    rows = x.reshape(-1, 6)
    assert stats.slots[""].count == 40
    assert rel_err(stats.slots[""].cov[0], rows.T @ rows) < 1e-13


@pytest.mark.parametrize("split", [1, 3, 7, 64])
def test_streaming_in_any_split_equals_one_shot(split):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).double()
    x = torch.randn(20, 2, 6, 6, dtype=torch.float64)
    ref = collect_statistics(model, [x])
    got = collect_statistics(model, x, batch_size=split)
    # also as an uneven iterable of (x, y) batches
    parts = [(x[:5], None), (x[5:6], None), (x[6:], None)]
    got2 = collect_statistics(model, [(p, torch.zeros(len(p))) for p, _ in parts])
    for name in ref.slots:
        assert rel_err(got.slots[name].cov, ref.slots[name].cov) < 1e-13
        assert rel_err(got2.slots[name].cov, ref.slots[name].cov) < 1e-13
        assert got.slots[name].count == ref.slots[name].count
    assert got.samples == ref.samples == 20


def unrolled_attention(mha: nn.MultiheadAttention, q, k, v, attn_mask=None, key_padding_mask=None):
    """Independent multi-head attention in batch-first layout; returns the rows entering out_proj."""
    e, h = mha.embed_dim, mha.num_heads
    if mha.in_proj_weight is not None:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    Q, K, V = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    n, lq, lk, hd = q.shape[0], q.shape[1], k.shape[1], e // h
    Q = Q.reshape(n, lq, h, hd).transpose(1, 2)
    K = K.reshape(n, lk, h, hd).transpose(1, 2)
    V = V.reshape(n, lk, h, hd).transpose(1, 2)
    scores = Q @ K.transpose(-1, -2) / math.sqrt(hd)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, -1) @ V  # (n, h, lq, hd)
    return out.transpose(1, 2).reshape(-1, e)


class SelfAttn(nn.Module):
    def __init__(self, batch_first, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw)
        self.batch_first = batch_first

    def forward(self, x, mask=None, kpm=None):
        return self.attn(x, x, x, attn_mask=mask, key_padding_mask=kpm)[0]


@pytest.mark.parametrize("batch_first,masked", list(itertools.product([True, False], [False, True])))
def test_multihead_self_attention_statistics_equal_unrolled_attention(batch_first, masked):
    model = SelfAttn(batch_first).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)  # batch-first data
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1) if masked else None
    kpm = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2]) if masked else None
    inp = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        ref_out = unrolled_attention(model.attn, x, x, x, mask, kpm)
    stats = collect_statistics(with_masks(model, mask, kpm), [inp])  # sums are order-free
    tok = x.reshape(-1, 16)
    assert rel_err(stats.slots["m.attn.in_proj"].cov[0], tok.T @ tok) < 1e-13
    assert rel_err(stats.slots["m.attn.out_proj"].cov[0], ref_out.T @ ref_out) < 1e-12
    assert stats.slots["m.attn.out_proj"].count == 15


def with_masks(model, mask, kpm):
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x, mask, kpm)

    return Wrap()


def test_cross_attention_with_other_key_dims_gets_separate_slots():
    mha = nn.MultiheadAttention(16, 2, kdim=6, vdim=10, batch_first=True).double()

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = mha

        def forward(self, x):
            q, k, v = x[..., :16], x[..., 16:22], x[..., 22:]
            return self.a(q, k, v)[0]

    x = torch.randn(4, 3, 32, dtype=torch.float64)
    stats = collect_statistics(Cross(), x)
    q, k, v = x[..., :16], x[..., 16:22], x[..., 22:]
    for part, t in zip("qkv", (q, k, v)):
        rows = t.reshape(-1, t.shape[-1])
        assert rel_err(stats.slots[f"a.{part}"].cov[0], rows.T @ rows) < 1e-13
    with torch.no_grad():
        ref = unrolled_attention(mha, q, k, v)
    assert rel_err(stats.slots["a.out_proj"].cov[0], ref.T @ ref) < 1e-12
    assert "a.in_proj" not in stats.slots


def test_transformer_encoder_layers_are_collected_despite_fused_fast_path():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(80, 3)).double()
    x = torch.randn(6, 5, 16, dtype=torch.float64)
    stats = collect_statistics(model, x)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert {"0.layers.0.self_attn.in_proj", "0.layers.0.self_attn.out_proj", "0.layers.1.linear2", "2"} <= set(stats.slots)
    assert stats.slots["0.layers.0.self_attn.in_proj"].count == 30
    rows = x.reshape(-1, 16)
    assert rel_err(stats.slots["0.layers.0.self_attn.in_proj"].cov[0], rows.T @ rows) < 1e-13


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_runs_once_per_pass_and_later_layers_see_the_unedited_output(batch_first):
    """The output projection's input is captured inside the one forward pass (no replay), and the
    layer's output, computed from it, is what the model alone computes: the next layer's
    statistics match its inputs from a plain forward pass."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = mha, nn.Linear(12, 4).double()

        def forward(self, x):
            return self.head(self.a(x, x, x, need_weights=False)[0])

    model = Net()
    calls = []
    handle = mha.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(6, 5, 12, dtype=torch.float64) if batch_first else torch.randn(5, 6, 12, dtype=torch.float64)
    stats = collect_statistics(model, x, batch_size=3 if batch_first else 5)  # seq-first: the whole batch at once
    handle.remove()
    assert len(calls) == (2 if batch_first else 1)  # one call per forward pass
    with torch.no_grad():
        out = mha(x, x, x, need_weights=False)[0].reshape(-1, 12)
    assert rel_err(stats.slots["head"].cov[0], out.T @ out) < 1e-12
    assert stats.slots["a.out_proj"].count == 30 and stats.slots["a.in_proj"].count == 30


def test_linear_weights_applied_through_f_linear_are_collected_in_every_pass_and_edited():
    """A Linear layer whose weight the model applies with F.linear (its module never called) is
    collected from that call in every forward pass; a module called normally is counted once."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.relu(F.linear(x, self.inner.weight, self.inner.bias)))

    torch.manual_seed(0)
    model = Functional().double()
    x = torch.randn(7, 6, dtype=torch.float64)
    stats = collect_statistics(model, x, batch_size=3)  # three forward passes
    with torch.no_grad():
        h = torch.relu(F.linear(x, model.inner.weight, model.inner.bias))
    assert stats.slots["inner"].count == 7 and rel_err(stats.slots["inner"].cov[0], x.T @ x) < 1e-13
    assert stats.slots["head"].count == 7 and rel_err(stats.slots["head"].cov[0], h.T @ h) < 1e-13
    report = deepunlearn.unlearn(model, x[:3], x[3:], alpha_r=100, alpha_f=3, inplace=False)
    assert not report.skipped and {r.name for r in report.layers} == {"inner", "head"}
    assert all(r.relative_change > 0 for r in report.layers)


def test_conv_weights_applied_through_f_conv_are_collected_with_the_calls_geometry():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, groups=2)  # its own geometry is not the one used below
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1, groups=2)
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    model = Functional().double()
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64)
    stats = collect_statistics(model, x, batch_size=2)
    u = F.unfold(x, 3, padding=1, stride=2)  # (N, 4·9, 16): two groups of 18 rows
    rows = u.reshape(5, 2, 18, 16).permute(1, 0, 3, 2).reshape(2, -1, 18)
    assert stats.slots["conv"].count == 5 * 16
    assert rel_err(stats.slots["conv"].cov, rows.transpose(1, 2) @ rows) < 1e-13


@pytest.mark.parametrize("nd,kw", [
    (2, dict(stride=1, padding=1)),
    (2, dict(stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect")),
    (1, dict(stride=3, padding=0)),
    (3, dict(padding=1, groups=3, padding_mode="replicate")),
    (2, dict(padding="same", padding_mode="circular")),
])
def test_patch_sums_are_the_sums_of_the_unfolded_patches(nd, kw):
    """The first moment's conv path (one summed image unfolded) against every patch unfolded, in float64."""
    from deepunlearn.patches import patch_sums

    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd](6, 6, 3, **kw).double()
    x = torch.randn(4, 6, *([9] * nd), dtype=torch.float64) + 0.5
    geom = ConvGeometry.of(conv)
    ref = conv_patches(x, geom).sum(1)
    got = patch_sums(x, geom, torch.float64)
    assert got.shape == ref.shape == (conv.groups, 6 // conv.groups * 3 ** nd)
    assert rel_err(got, ref) < 1e-13
    assert rel_err(patch_sums(x, geom, torch.float32), ref) < 1e-6  # summed in the statistics' dtype
