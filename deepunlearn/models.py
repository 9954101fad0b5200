"""Small reference networks for the demo and tests (28×28 single-channel inputs)."""
from __future__ import annotations

from torch import nn


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]


class SmallCNN(nn.Module):
    """Three conv/batch-norm/ReLU/max-pool blocks and a two-layer classifier; ~100k parameters.

    Input ``(N, 1, 28, 28)``; output logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(*_block(1, w), *_block(w, 2 * w), *_block(2 * w, 4 * w))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 3 * 3, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
