"""A small model touching every layer kind, and fixed data, shared by tests and their subprocesses."""
import torch
from torch import nn


class EveryKind(nn.Module):
    """Conv2d, grouped Conv2d, MultiheadAttention and separate q/k/v-style Linear layers, and a head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.query, self.key = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.conv(x))))  # (N, 8, 3, 3)
        t = h.flatten(2).transpose(1, 2)  # (N, 9, 8)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + torch.tanh(self.query(t)) * self.key(t)
        return self.head(t.mean(1))


def fixture_model() -> nn.Module:
    torch.manual_seed(0)
    return EveryKind().double()


def fixture_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64) + 0.5
    xr = torch.randn(20, 3, 8, 8, generator=g, dtype=torch.float64)
    return xf, xr
