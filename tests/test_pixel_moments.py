"""Patch sums of convs on maps no larger than their kernel, from the maps' own second moment."""
import math

import pytest
import torch
from torch import nn

from conftest import rel_err
from ext_cases import DEVICES, device_or_skip
from deepunlearn import collect_statistics
from deepunlearn import hooks
from deepunlearn.ops.covariance import accumulate_conv_reference_
from deepunlearn.patches import ConvGeometry
from deepunlearn.pixel_moments import accumulate_pixels_, add_patch_moment_, pixels_pay

# (conv, input map): maps no larger than the kernel, with padding low and high, stride, dilation, groups
CASES = [
    (nn.Conv2d(6, 4, 3, padding=1), (2, 2)),  # VGG's last layers at 32×32
    (nn.Conv2d(96, 4, 3, padding=1), (2, 2)),  # blocks of 96² channels: added per pair of taps (PAIR_BLOCK_ELEMENTS)
    (nn.Conv2d(6, 4, 3, padding=1), (1, 1)),
    (nn.Conv2d(6, 4, 3, padding=1), (3, 3)),
    (nn.Conv2d(6, 4, 3, padding=1), (2, 3)),
    (nn.Conv2d(6, 4, 3, padding=1, stride=2), (3, 3)),
    (nn.Conv2d(6, 4, 3, padding=2, dilation=2), (2, 2)),
    (nn.Conv2d(6, 4, (2, 3), padding="same"), (2, 2)),  # uneven padding
    (nn.Conv2d(6, 4, 3, padding=1, groups=2), (2, 2)),
    (nn.Conv2d(6, 4, 3), (3, 3)),  # no padding: one position
    (nn.Conv1d(6, 4, 3, padding=1), (3,)),
    (nn.Conv2d(6, 6, 7, padding=3, groups=6), (7, 7)),  # ConvNeXt's depthwise convs on its last stage's maps
    (nn.Conv2d(6, 6, 7, padding=3, groups=6), (3, 3)),
    (nn.Conv2d(4, 4, 5, padding=2, groups=4), (2, 3)),  # MobileNetV3's
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv, spatial", CASES, ids=[f"{c}-{s}" for c, s in CASES])
def test_patch_sum_from_the_maps_equals_the_patches_own(conv, spatial, device):
    dev = device_or_skip(device)
    geom = ConvGeometry.of(conv)
    assert pixels_pay(geom, spatial)
    g, d = conv.groups, conv.weight[0].numel()
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(g, d, d, generator=gen, dtype=torch.float64)  # added to, not overwritten
    want = start.clone()
    start = start.to(dev)
    width = conv.in_channels // g * math.prod(spatial)
    moment = torch.zeros(g, width, width, dtype=torch.float64, device=dev)
    for _ in range(3):  # batches
        x = torch.randn(5, conv.in_channels, *spatial, generator=gen, dtype=torch.float64) + 0.5
        accumulate_conv_reference_(want, x, geom)
        accumulate_pixels_(moment, x.to(dev), g)
    got = add_patch_moment_(start, moment, geom, spatial)
    assert got is start
    assert rel_err(got.cpu(), want) < 1e-12


def test_only_maps_no_larger_than_the_kernel_with_zero_padding_are_summed_whole():
    assert not pixels_pay(ConvGeometry.of(nn.Conv2d(2, 2, 3, padding=1)), (4, 4))
    assert not pixels_pay(ConvGeometry.of(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), (2, 2))
    assert not pixels_pay(ConvGeometry.of(nn.Conv3d(2, 2, 3, padding=1)), (1, 1, 1))
    assert not pixels_pay(ConvGeometry.of(nn.Conv2d(2, 2, 1)), (2, 2))


class TinyMaps(nn.Module):
    """Convs on 8×8, 4×4 (streamed by the op) and 2×2 maps (summed whole), and a head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep_vectors", [False, True])
def test_collected_statistics_match_the_streamed_ones(monkeypatch, keep_vectors, device):
    dev = device_or_skip(device)
    torch.manual_seed(0)
    model = TinyMaps().eval().to(dev)
    x = torch.randn(120, 3, 8, 8, device=dev)
    summed = collect_statistics(model, x, batch_size=25, keep_vectors=keep_vectors)
    monkeypatch.setattr(hooks, "pixels_pay", lambda geom, spatial: False)
    streamed = collect_statistics(model, x, batch_size=25, keep_vectors=keep_vectors)
    assert summed.slots.keys() == streamed.slots.keys()
    for name, s in streamed.slots.items():
        assert summed.slots[name].count == s.count
        assert rel_err(summed.slots[name].stored, s.stored) < 1e-6, name


def test_maps_of_another_size_are_added_before_they_are_summed():
    """A fully convolutional model fed images of two sizes: 2×2 maps, then 1×1 maps."""
    conv = nn.Conv2d(4, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, 4, 2, 2, generator=gen), torch.randn(6, 4, 1, 1, generator=gen), torch.randn(6, 4, 2, 2, generator=gen)]
    stats = collect_statistics(model, batches)
    want = torch.zeros(1, 36, 36, dtype=torch.float64)
    for b in batches:
        accumulate_conv_reference_(want, b.double(), ConvGeometry.of(conv))
    (slot,) = stats.slots.values()
    assert rel_err(slot.stored, want) < 1e-6


class InPlaceAfterConv(nn.Module):
    """A wide conv on a 4×4 map whose input the model then overwrites in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        y = self.conv(x)
        x.mul_(0.0)  # the activation the conv read is gone once the pass ends
        return self.head(y.flatten(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batches", [[2] * 7, [3, 1, 5, 4, 2, 6]])
def test_inputs_held_back_until_they_reach_the_width_give_the_same_sum(monkeypatch, batches, device):
    """The conv sees 16 patches an image against a width of 72: inputs wait for four or more
    images, summed by one op call; in uneven batches, and whatever the model does to them after."""
    dev = device_or_skip(device)
    torch.manual_seed(0)
    model = InPlaceAfterConv().eval().to(dev)
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(n, 8, 4, 4, generator=gen) for n in batches]
    want = torch.zeros(1, 72, 72, dtype=torch.float64)
    for b in data:
        accumulate_conv_reference_(want, b.double(), ConvGeometry.of(model.conv))
    calls = []
    real = hooks.accumulate_conv_
    monkeypatch.setattr(hooks, "accumulate_conv_", lambda cov, x, geom: calls.append(x.shape[0]) or real(cov, x, geom))
    stats = collect_statistics(model, [b.to(dev) for b in data], keep_vectors=False)
    assert rel_err(stats.slots["conv"].stored.cpu(), want) < 1e-6
    assert sum(calls) == sum(batches) and len(calls) < len(batches)
    assert all(n * 16 >= 72 for n in calls[:-1])  # each call but the last has reached the width


def test_inputs_that_reach_the_width_alone_are_summed_at_once(monkeypatch):
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.Flatten()).eval()
    calls = []
    real = hooks.accumulate_conv_
    monkeypatch.setattr(hooks, "accumulate_conv_", lambda cov, x, geom: calls.append(x.shape[0]) or real(cov, x, geom))
    collect_statistics(model, torch.randn(12, 2, 4, 4), batch_size=4, keep_vectors=False)  # 64 patches a batch, width 18
    assert calls == [4, 4, 4]
