"""Training-based unlearning baselines, with the call shape of :func:`deepunlearn.unlearn`.

Each function takes ``(model, forget, retain, **options)`` where ``forget`` and ``retain`` are
*labelled* data (a Dataset or an iterable of ``(x, y)`` batches), edits a copy of the model
(or the model itself with ``inplace=True``), and returns a :class:`BaselineReport` whose
``seconds["total"]`` is its wall time. Defaults follow the methods' papers and official code,
scaled where noted to a CPU budget; every one is an option.

* :func:`retrain`: from scratch on the retain data (the gold standard).
* :func:`finetune`: more epochs on the retain data only.
* :func:`neggrad`: gradient ascent on the forget data; :func:`neggrad_plus`: ascent on forget
  plus descent on retain.
* :func:`random_labels`: forget samples relabelled at random, then fine-tuning on both.
* :func:`unsir`: error-maximising noise for the forget classes, impair, repair (Tarun et al.).
* :func:`ssd`: selective synaptic dampening with diagonal Fisher importances (Foster et al.).
"""
from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from .._batches import DataLike, iter_labelled
from ..statistics import model_device


@dataclass
class BaselineReport:
    """Result of a baseline: the unlearned model, its wall time and the options it ran with."""

    method: str
    model: nn.Module
    seconds: dict[str, float]
    options: dict = field(default_factory=dict)


def _loader(data: DataLike, batch_size: int, shuffle: bool, seed: int) -> DataLoader | DataLike:
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))
    return data


def _labels_of(data: DataLike) -> torch.Tensor:
    return torch.cat([y for _, y in iter_labelled(data)]).long()


def _start(model: nn.Module, inplace: bool) -> tuple[nn.Module, torch.device, float]:
    device = model_device(model)
    return (model if inplace else copy.deepcopy(model)), device, time.perf_counter()


def _done(method: str, model: nn.Module, device: torch.device, t0: float, **options) -> BaselineReport:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return BaselineReport(method, model.eval(), {"total": time.perf_counter() - t0}, options)


def _sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _train_epochs(model: nn.Module, data: DataLike, epochs: int, opt: torch.optim.Optimizer, device: torch.device,
                  batch_size: int, seed: int, sign: float = 1.0, clip: float | None = None) -> None:
    model.train()
    for epoch in range(epochs):
        for x, y in iter_labelled(_loader(data, batch_size, True, seed + epoch)):
            opt.zero_grad(set_to_none=True)
            loss = sign * F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Fresh weights for every module that can reset them (same architecture, new initialisation)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def retrain(model: nn.Module, forget: DataLike, retain: DataLike, *, epochs: int = 4, lr: float = 2e-3,
            batch_size: int = 128, seed: int = 0, inplace: bool = False) -> BaselineReport:
    """Train the same architecture from scratch on ``retain`` only (Adam, one-cycle schedule, as the demo's original)."""
    from .training import train_classifier

    model, device, t0 = _start(model, inplace)
    reinitialise(model, seed)
    train_classifier(model, retain, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return _done("retrain", model, device, t0, epochs=epochs, lr=lr)


def finetune(model: nn.Module, forget: DataLike, retain: DataLike, *, epochs: int = 2, lr: float = 0.01,
             batch_size: int = 128, seed: int = 0, inplace: bool = False) -> BaselineReport:
    """Fine-tune on ``retain`` with SGD (catastrophic forgetting of the rest; SalUn's FT baseline, fewer epochs)."""
    model, device, t0 = _start(model, inplace)
    _train_epochs(model, retain, epochs, _sgd(model, lr), device, batch_size, seed)
    return _done("finetune", model, device, t0, epochs=epochs, lr=lr)


def neggrad(model: nn.Module, forget: DataLike, retain: DataLike, *, epochs: int = 2, lr: float = 1e-3,
            batch_size: int = 128, seed: int = 0, inplace: bool = False) -> BaselineReport:
    """Gradient ascent on the forget data (NegGrad / GA), gradients clipped to norm 5 for stability."""
    model, device, t0 = _start(model, inplace)
    _train_epochs(model, forget, epochs, _sgd(model, lr, weight_decay=0.0), device, batch_size, seed, sign=-1.0, clip=5.0)
    return _done("neggrad", model, device, t0, epochs=epochs, lr=lr)


def neggrad_plus(model: nn.Module, forget: DataLike, retain: DataLike, *, epochs: int = 2, lr: float = 0.01,
                 retain_weight: float = 0.9, batch_size: int = 128, seed: int = 0, inplace: bool = False) -> BaselineReport:
    """NegGrad+ (Kurmanji et al.): ``w·CE(retain) − (1−w)·CE(forget)`` on paired batches, one pass over ``retain`` per epoch."""
    model, device, t0 = _start(model, inplace)
    opt = _sgd(model, lr)
    model.train()
    for epoch in range(epochs):
        f_iter = itertools.cycle(list(iter_labelled(_loader(forget, batch_size, True, seed + epoch))))
        for (xr, yr), (xf, yf) in zip(iter_labelled(_loader(retain, batch_size, True, seed + epoch)), f_iter):
            opt.zero_grad(set_to_none=True)
            loss = retain_weight * F.cross_entropy(model(xr.to(device)), yr.to(device)) - (1 - retain_weight) * F.cross_entropy(
                model(xf.to(device)), yf.to(device))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
    return _done("neggrad+", model, device, t0, epochs=epochs, lr=lr, retain_weight=retain_weight)


def random_labels(model: nn.Module, forget: DataLike, retain: DataLike, *, epochs: int = 2, lr: float = 0.01,
                  num_classes: int | None = None, batch_size: int = 128, seed: int = 0, inplace: bool = False) -> BaselineReport:
    """Relabel every forget sample with a random other class, then fine-tune on forget ∪ retain (SalUn's RL baseline)."""
    model, device, t0 = _start(model, inplace)
    xs, ys = zip(*[(x, y) for x, y in iter_labelled(forget)])
    x_f, y_f = torch.cat(xs), torch.cat(ys).long()
    k = num_classes or int(max(y_f.max(), _labels_of(retain).max())) + 1
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, k, y_f.shape, generator=g)  # never the true label
    relabelled = TensorDataset(x_f, (y_f + shift) % k)
    data = ConcatDataset([relabelled, retain]) if isinstance(retain, Dataset) else relabelled
    _train_epochs(model, data, epochs, _sgd(model, lr), device, batch_size, seed)
    return _done("random-labels", model, device, t0, epochs=epochs, lr=lr)


def unsir(model: nn.Module, forget: DataLike, retain: DataLike, *, noise_batch: int = 64, noise_steps: int = 100,
          noise_lr: float = 0.1, impair_lr: float = 0.02, repair_lr: float = 0.01, batch_size: int = 128,
          seed: int = 0, inplace: bool = False) -> BaselineReport:
    """UNSIR (Tarun et al.): learn error-maximising noise per forget class, impair, then repair.

    The noise minimises ``−CE(model(noise), forget label) + 0.1·mean(noise²)``; impair is one
    epoch over retain samples mixed with the noise (labelled with its forget class) at a high
    learning rate; repair is one epoch over the retain samples alone.
    """
    model, device, t0 = _start(model, inplace)
    x0, _ = next(iter(iter_labelled(forget)))
    forget_classes = _labels_of(forget).unique().tolist()
    g = torch.Generator().manual_seed(seed)
    noises = []
    model.eval()
    for c in forget_classes:
        noise = torch.randn((noise_batch, *x0.shape[1:]), generator=g).to(device).requires_grad_(True)
        opt = torch.optim.Adam([noise], lr=noise_lr)
        target = torch.full((noise_batch,), c, device=device)
        for _ in range(noise_steps):
            opt.zero_grad(set_to_none=True)
            loss = -F.cross_entropy(model(noise), target) + 0.1 * noise.pow(2).mean()
            loss.backward()
            opt.step()
        noises.append(TensorDataset(noise.detach().cpu(), target.cpu()))
    noise_set = ConcatDataset(noises)
    impair = ConcatDataset([retain, noise_set]) if isinstance(retain, Dataset) else noise_set
    _train_epochs(model, impair, 1, _sgd(model, impair_lr), device, batch_size, seed)
    _train_epochs(model, retain, 1, _sgd(model, repair_lr), device, batch_size, seed + 1)
    return _done("unsir", model, device, t0, noise_batch=noise_batch, noise_steps=noise_steps, impair_lr=impair_lr, repair_lr=repair_lr)


def _fisher_diagonal(model: nn.Module, data: DataLike, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """Mean over batches of the squared gradient of the cross-entropy, per parameter."""
    imp = [torch.zeros_like(p) for p in model.parameters()]
    n = 0
    model.eval()
    for x, y in iter_labelled(_loader(data, batch_size, False, 0)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        for acc, p in zip(imp, model.parameters()):
            if p.grad is not None:
                acc += p.grad.detach().pow(2)
        n += 1
    return [i / max(n, 1) for i in imp]


def ssd(model: nn.Module, forget: DataLike, retain: DataLike, *, alpha: float = 10.0, lam: float = 1.0,
        batch_size: int = 128, seed: int = 0, inplace: bool = False) -> BaselineReport:
    """Selective synaptic dampening (Foster et al.): scale down parameters specialised to the forget data.

    With diagonal Fisher importances ``I_f`` (forget data) and ``I_d`` (all data: forget ∪
    retain), every parameter with ``I_f > alpha · I_d`` is multiplied by ``min(lam · I_d / I_f, 1)``.
    """
    model, device, t0 = _start(model, inplace)
    all_data = ConcatDataset([forget, retain]) if isinstance(forget, Dataset) and isinstance(retain, Dataset) else retain
    imp_d = _fisher_diagonal(model, all_data, device, batch_size)
    imp_f = _fisher_diagonal(model, forget, device, batch_size)
    with torch.no_grad():
        for p, i_d, i_f in zip(model.parameters(), imp_d, imp_f):
            mask = i_f > alpha * i_d
            beta = torch.clamp(lam * i_d / i_f.clamp_min(1e-30), max=1.0)
            p.mul_(torch.where(mask, beta, torch.ones_like(beta)))
    model.zero_grad(set_to_none=True)
    return _done("ssd", model, device, t0, alpha=alpha, lam=lam)


BASELINES: dict[str, Callable[..., BaselineReport]] = {
    "retrain": retrain,
    "finetune": finetune,
    "neggrad": neggrad,
    "neggrad+": neggrad_plus,
    "random-labels": random_labels,
    "unsir": unsir,
    "ssd": ssd,
}
