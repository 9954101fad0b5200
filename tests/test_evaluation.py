import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepunlearn.evaluation import accuracy, class_accuracies, svc_mia


def test_svc_mia_separates_confident_members_from_unsure_non_members():
    rng = np.random.default_rng(0)
    members = rng.uniform(0.9, 1.0, 500)
    non_members = rng.uniform(0.0, 0.6, 500)
    assert svc_mia(members, non_members, rng.uniform(0.92, 1.0, 100)) < 5  # look like members
    assert svc_mia(members, non_members, rng.uniform(0.0, 0.5, 100)) > 95  # look unseen


def test_svc_mia_needs_samples():
    with pytest.raises(ValueError, match="member"):
        svc_mia(np.array([]), np.array([0.5]), np.array([0.5]))


def test_class_accuracies_split_retain_and_forget():
    probs = torch.eye(4)[[0, 1, 2, 3, 0, 0]]
    labels = torch.tensor([0, 1, 2, 3, 1, 3])
    r, f = class_accuracies(probs, labels, [3])
    assert r == pytest.approx(100 * 3 / 4) and f == pytest.approx(50.0)


def test_accuracy_on_a_dataset():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert accuracy(model, TensorDataset(x, torch.tensor([0, 1, 1]))) == pytest.approx(200 / 3)


def test_measure_sees_time_and_a_large_allocation():
    # a fresh process: RSS growth depends on what the allocator already holds from earlier tests
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from deepunlearn.evaluation import measure\n"
        "with measure('cpu') as m:\n"
        "    big = torch.ones(64 * 2**20 // 4)\n"
        "    big += 1\n"
        "print(m.seconds, m.peak_bytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    seconds, peak = float(out[0]), int(out[1])
    assert seconds > 0
    assert peak > 32 * 2**20


def test_measure_counts_memory_the_process_freed_before():
    """The heap's bytes in use, not the resident set: a block that reuses freed memory still counts."""
    import time

    from deepunlearn.evaluation import _HEAP_BYTES, measure

    if _HEAP_BYTES is None:
        pytest.skip("the C library has no mallinfo2")
    size = 32 * 2**20
    for _ in range(2):  # the second allocation reuses what the first freed
        block = torch.ones(size // 4)
        del block
    with measure("cpu", interval=0.001) as m:
        block = torch.ones(size // 4)
        block += 1
        time.sleep(0.02)
    assert 0.95 * size <= m.peak_bytes <= 1.5 * size, m.peak_bytes
