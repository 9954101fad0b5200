"""Max pooling by elementwise maxima in this package's forward passes: the values of ``F.max_pool2d``."""
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deepunlearn
from deepunlearn import collect
from deepunlearn.collect import eval_no_grad
from deepunlearn.experiments.models import ResNet18, SmallCNN, SmallViT
from deepunlearn.pooling import FastPooling, fast_max_pool2d, pools_faster


def poisoned(shape, dtype, seed=0):
    """Random values with NaN and -inf among them: both must come out where torch puts them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    x.view(-1)[::7] = float("nan")
    x.view(-1)[3::11] = float("-inf")
    return x


def same_values(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
            and torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)))


CASES = [(shape, k, s, p) for shape, k, s, p in itertools.product(
    [(2, 3, 7, 7), (2, 3, 8, 8), (3, 5, 9), (2, 3, 5, 9), (2, 3, 2, 2), (2, 3, 1, 4), (1, 1, 28, 28)],
    [1, 2, 3, (2, 3), 5], [None, 1, 2, (1, 2), 3], [0, 1, (0, 1), 2])
    if all(2 * pp < kk for pp, kk in zip(*(v if isinstance(v, tuple) else (v, v) for v in (p, k))))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equals_torch_on_every_window_stride_and_padding(dtype):
    checked = 0
    for shape, k, s, p in CASES:
        x = poisoned(shape, dtype)
        try:
            want = F.max_pool2d(x, k, s, p)
        except RuntimeError:  # an output of no elements: torch refuses it, so must the caller
            continue
        got = fast_max_pool2d(x, k, s, p)
        assert got is not None, (shape, k, s, p)
        assert same_values(got, want), (shape, k, s, p)
        checked += 1
    assert checked > 300


def test_leaves_its_input_as_it_was():
    x = poisoned((2, 3, 9, 9), torch.float32)
    before = x.clone()
    for k, p in [(1, 0), (2, 0), (3, 1)]:
        fast_max_pool2d(x, k, 2, p)
        assert torch.equal(x.nan_to_num(0.0), before.nan_to_num(0.0)) and torch.equal(x.isnan(), before.isnan())
    assert fast_max_pool2d(x, 1, 1).data_ptr() != x.data_ptr()  # a new tensor, as torch gives


@pytest.mark.parametrize("call", [
    dict(kernel_size=2, return_indices=True), dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=2, dilation=2), dict(kernel_size=2, padding=1)])
def test_what_it_does_not_compute_is_left_to_torch(call):
    assert fast_max_pool2d(poisoned((2, 3, 8, 8), torch.float32), **call) is None


def test_channels_last_and_five_dimensional_inputs_are_left_to_torch():
    x = poisoned((2, 3, 8, 8), torch.float32).contiguous(memory_format=torch.channels_last)
    assert fast_max_pool2d(x, 2) is None  # torch's own kernel is fast on this layout
    assert fast_max_pool2d(poisoned((1, 2, 3, 8, 8), torch.float32), 2) is None


def test_the_mode_pools_by_maxima_and_hands_the_rest_to_torch(monkeypatch):
    x = poisoned((2, 3, 8, 8), torch.float32)
    want = nn.MaxPool2d(2)(x)
    want_ceil = nn.MaxPool2d(3, 2, ceil_mode=True)(x)

    def refused(*args, **kwargs):
        raise AssertionError("torch's max_pool2d ran")

    monkeypatch.setattr(torch, "max_pool2d", refused)
    with FastPooling():
        assert same_values(nn.MaxPool2d(2)(x), want)  # by maxima: torch's kernel never ran
        with pytest.raises(AssertionError, match="torch's max_pool2d ran"):
            nn.MaxPool2d(3, 2, ceil_mode=True)(x)  # not its case: torch's kernel
    monkeypatch.undo()
    with FastPooling():
        assert same_values(nn.MaxPool2d(3, 2, ceil_mode=True)(x), want_ceil)


def test_models_with_max_pooling_and_no_attention_run_it():
    assert pools_faster(SmallCNN())
    assert not pools_faster(ResNet18())  # no max pooling
    assert not pools_faster(SmallViT())  # attention's fused path would be switched off
    assert not pools_faster(nn.Sequential(nn.MaxPool2d(2), nn.MultiheadAttention(4, 2)))


def test_our_forward_passes_pool_by_maxima(monkeypatch):
    model = SmallCNN().eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    monkeypatch.setattr(torch, "max_pool2d", lambda *a, **k: pytest.fail("torch's max_pool2d ran"))
    with eval_no_grad(model):
        assert torch.equal(model(x), want)


def test_the_unlearned_model_is_the_same_bit_for_bit(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    forget, retain = torch.randn(40, 1, 28, 28), torch.randn(60, 1, 28, 28)
    fast = deepunlearn.unlearn(model, forget, retain, alpha_r=30, alpha_f=3, inplace=False).model
    monkeypatch.setattr(collect, "pools_faster", lambda model: False)
    plain = deepunlearn.unlearn(model, forget, retain, alpha_r=30, alpha_f=3, inplace=False).model
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
