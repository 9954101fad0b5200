"""Plain supervised training, for the demo's model and for tests (not part of the method)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int = 3,
    lr: float = 2e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place with Adam, cross-entropy and a cosine schedule; returns it in eval mode."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"train epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, y in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()
