"""Small reference networks for the demo and tests (28×28 single-channel inputs)."""
from __future__ import annotations

import torch
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


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock × [2, 2, 2, 2]) adapted to 28×28 single-channel images.

    3×3 stem without max-pool, as for CIFAR; ``width`` is the first stage's channel count
    (64 in the original; the default 8 keeps CPU training to about 30 s an epoch on two cores).
    Input ``(N, 1, 28, 28)``.
    """

    def __init__(self, num_classes: int = 10, width: int = 8, in_channels: int = 1):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        stages, c = [], w
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            stages += [_BasicBlock(c, w * mult, stride), _BasicBlock(w * mult, w * mult, 1)]
            c = w * mult
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class SmallViT(nn.Module):
    """A small vision transformer for 28×28 images: 7×7 patches (16 tokens + class token),
    ``depth`` pre-norm encoder layers built on ``nn.MultiheadAttention``, a linear head."""

    def __init__(self, num_classes: int = 10, dim: int = 64, depth: int = 4, heads: int = 4, patch: int = 7):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        tokens = (28 // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


ARCHITECTURES = {"smallcnn": SmallCNN, "resnet18": ResNet18, "vit": SmallViT}
