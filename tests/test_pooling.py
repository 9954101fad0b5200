"""Max pooling by elementwise maxima in this package's forward passes: the values of ``F.max_pool2d``."""
import contextlib
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deepunlearn
from deepunlearn import collect
from deepunlearn.collect import eval_no_grad
from deepunlearn.experiments.models import SmallCNN
from deepunlearn.pooling import fast_max_pool2d, pooling_by_maxima


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


def refuse_torchs_pooling(monkeypatch):
    monkeypatch.setattr(torch, "max_pool2d", lambda *args, **kwargs: pytest.fail("torch's max_pool2d ran"))


def test_pooling_layers_pool_by_maxima_inside_and_as_before_after(monkeypatch):
    x = poisoned((2, 3, 8, 8), torch.float32)
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
    ceil = nn.Sequential(nn.MaxPool2d(3, 2, ceil_mode=True))
    want = model(x)
    refuse_torchs_pooling(monkeypatch)
    with pooling_by_maxima(model), pooling_by_maxima(ceil):
        assert same_values(model(x), want)  # by maxima: torch's kernel never ran
        with pytest.raises(pytest.fail.Exception, match="torch's max_pool2d ran"):
            ceil(x)  # not its case: the layer's own forward
    assert all("forward" not in m.__dict__ for m in [*model.modules(), *ceil.modules()])
    with pytest.raises(pytest.fail.Exception):
        model(x)  # the layer's own forward again


def test_forwards_replaced_already_are_kept_and_restored_even_on_error():
    pool = nn.MaxPool2d(2)
    stand_in = lambda x: x  # noqa: E731 (as the frozen prefix stands in for a module)
    pool.forward = stand_in
    other = nn.MaxPool2d(2)
    model = nn.Sequential(pool, other)
    with pytest.raises(RuntimeError, match="inside"):
        with pooling_by_maxima(model):
            assert pool.forward is stand_in and "forward" in other.__dict__
            raise RuntimeError("inside")
    assert pool.forward is stand_in and "forward" not in other.__dict__


def test_our_forward_passes_pool_by_maxima(monkeypatch):
    model = SmallCNN().eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    refuse_torchs_pooling(monkeypatch)
    with eval_no_grad(model):
        assert torch.equal(model(x), want)


def test_the_unlearned_model_is_the_same_bit_for_bit(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    forget, retain = torch.randn(40, 1, 28, 28), torch.randn(60, 1, 28, 28)
    fast = deepunlearn.unlearn(model, forget, retain, alpha_r=30, alpha_f=3, inplace=False).model
    monkeypatch.setattr(collect, "pooling_by_maxima", lambda model: contextlib.nullcontext())
    plain = deepunlearn.unlearn(model, forget, retain, alpha_r=30, alpha_f=3, inplace=False).model
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
