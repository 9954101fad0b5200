"""How well a model forgot: accuracy on retain and forget classes, the SVC membership-inference
attack, and wall time / peak memory of a piece of work."""
from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._batches import DataLike, iter_labelled
from .extras import require
from .collect import eval_no_grad, output_logits
from .inputs import call_model
from .statistics import model_device

if TYPE_CHECKING:
    import numpy as np


def predictions(model: nn.Module, data: DataLike, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ``(N, classes)`` (float32, CPU) and labels ``(N,)`` over labelled ``data``."""
    device = model_device(model)
    probs, labels = [], []
    with eval_no_grad(model):
        for x, y in iter_labelled(data, batch_size):
            probs.append(torch.softmax(output_logits(call_model(model, x.to(device))).float(), dim=-1).cpu())
            labels.append(y.cpu())
    if not probs:
        raise ValueError("no labelled samples to evaluate")
    return torch.cat(probs), torch.cat(labels).long()


def accuracy(model: nn.Module, data: DataLike, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent on labelled ``data``."""
    p, y = predictions(model, data, batch_size)
    return 100.0 * float((p.argmax(1) == y).float().mean())


def class_accuracies(probs: torch.Tensor, labels: torch.Tensor, forget: Sequence[int]) -> tuple[float, float]:
    """``(retain_acc, forget_acc)`` in percent from predictions; NaN where a side has no sample."""
    is_f = torch.isin(labels, torch.as_tensor(list(forget)))
    hit = probs.argmax(1) == labels
    r = 100.0 * float(hit[~is_f].float().mean()) if (~is_f).any() else float("nan")
    f = 100.0 * float(hit[is_f].float().mean()) if is_f.any() else float("nan")
    return r, f


def true_class_confidence(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Probability the model gives each sample's true class, ``(N,)``, as a float64 array."""
    return probs.gather(1, labels[:, None]).squeeze(1).double().numpy()


def svc_mia(member_conf: np.ndarray, nonmember_conf: np.ndarray, target_conf: np.ndarray, seed: int = 0) -> float:
    """SVC membership-inference attack of the sparse-unlearning / SalUn line of work.

    An RBF SVC (``C=3, gamma='auto'``) is trained on the true-class confidence of members
    (retain training samples, label 1) against non-members (test samples, label 0), balanced
    by subsampling the larger side; it then classifies the target (forget) samples.

    Returns:
        MIA efficacy in percent: the share of target samples the attack calls *non-members*.
        Higher means the model treats them as unseen; compare with a model retrained without them.
    """
    np = require("numpy", "metrics", "the membership-inference attack")
    svm = require("sklearn.svm", "metrics", "the membership-inference attack")

    rng = np.random.default_rng(seed)
    n = min(len(member_conf), len(nonmember_conf))
    if n == 0 or len(target_conf) == 0:
        raise ValueError("the MIA needs member, non-member and target samples")
    mem = rng.choice(member_conf, n, replace=False)
    non = rng.choice(nonmember_conf, n, replace=False)
    x = np.concatenate([mem, non])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    clf = svm.SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return 100.0 * float(1.0 - clf.predict(np.asarray(target_conf)[:, None]).mean())


@dataclass
class Measurement:
    """Filled in by :func:`measure`: ``seconds`` of wall time and ``peak_bytes`` above the start."""

    seconds: float = 0.0
    peak_bytes: int = 0


def exact_rss_peaks() -> None:
    """From now on, let :func:`measure` see every large CPU buffer in the RSS.

    glibc's adaptive mmap threshold recycles freed large buffers inside the heap, so a later
    peak does not raise the RSS; a fixed 1 MiB threshold maps and unmaps each of them. It makes
    allocation-heavy code slower (page faults), so time measurements belong before this call.
    Irreversible for the process; a no-op where glibc's ``mallopt`` is unavailable.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_counter():
    """Bytes the C heap holds in use (glibc's ``mallinfo2``: small blocks plus mmap'd ones, where
    torch's CPU tensors live), or None where that is not available. Unlike the resident set size,
    it falls when memory is freed, so a block that reuses freed memory still counts."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def used() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return used


_HEAP_BYTES = _heap_counter()


@contextmanager
def measure(device: torch.device | str = "cpu", interval: float = 0.002) -> Iterator[Measurement]:
    """Time a block (synchronising CUDA) and record its peak extra memory.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` above the allocation at entry; on
    the CPU it is the C heap's bytes in use (glibc's ``mallinfo2``, which includes torch's CPU
    tensors that tracemalloc does not see), sampled every ``interval`` seconds, above the bytes in
    use at entry; without ``mallinfo2``, the resident set size the same way (which misses blocks
    that reuse memory freed earlier in the process).
    """
    device = torch.device(device)
    m = Measurement()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        try:
            yield m
        finally:
            torch.cuda.synchronize(device)
            m.seconds = time.perf_counter() - t0
            m.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        return
    in_use = _HEAP_BYTES or _rss_bytes
    base = in_use()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], in_use())
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.seconds = time.perf_counter() - t0
        stop.set()
        th.join()
        peak[0] = max(peak[0], in_use())
        m.peak_bytes = peak[0] - base


def evaluate_forgetting(model: nn.Module, train: DataLike, test: DataLike, forget: Sequence[int], batch_size: int = 512, seed: int = 0) -> dict[str, float]:
    """Accuracy on retain and forget classes (train and test splits, percent) and SVC-MIA efficacy.

    The attack's members are the retain-class training samples, its non-members the retain-class
    test samples, and its targets the forget-class training samples.

    Returns:
        ``retain_train``, ``forget_train``, ``retain_test``, ``forget_test``, ``mia`` (all percent).
    """
    p_tr, y_tr = predictions(model, train, batch_size)
    p_te, y_te = predictions(model, test, batch_size)
    out = {}
    out["retain_train"], out["forget_train"] = class_accuracies(p_tr, y_tr, forget)
    out["retain_test"], out["forget_test"] = class_accuracies(p_te, y_te, forget)
    f = torch.as_tensor(list(forget))
    f_tr, f_te = torch.isin(y_tr, f), torch.isin(y_te, f)
    conf_tr, conf_te = true_class_confidence(p_tr, y_tr), true_class_confidence(p_te, y_te)
    out["mia"] = svc_mia(conf_tr[~f_tr.numpy()], conf_te[~f_te.numpy()], conf_tr[f_tr.numpy()], seed)
    return out
