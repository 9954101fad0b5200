import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from conftest import rel_err
from deepunlearn import unlearn
from deepunlearn.class_statistics import ClassStatistics

FIXED = {"alpha_r": 100.0, "alpha_f": 3.0}  # the fixed-α edit (the default call would choose α)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    x = torch.randn(200, 2, 6, 6, dtype=torch.float64)
    y = torch.arange(200) % 4
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4)).double()
    return model, TensorDataset(x, y)


def test_answers_any_request_from_stored_sums_equal_to_a_fresh_computation(setup, tmp_path):
    model, ds = setup
    cs = ClassStatistics.collect(model, ds, per_class=20)
    path = tmp_path / "cs.pt"
    cs.save(path)
    cs = ClassStatistics.load(path)
    assert cs.classes == [0, 1, 2, 3]
    for forget in ([1], [0, 3]):
        keep = [c for c in cs.classes if c not in forget]
        f_idx = sorted(i for c in forget for i in cs.indices[c])
        r_idx = sorted(i for c in keep for i in cs.indices[c])
        stored = unlearn(model, cs.forget(forget), cs.retain(forget), inplace=False, **FIXED).model
        fresh = unlearn(model, Subset(ds, f_idx), Subset(ds, r_idx), inplace=False, **FIXED).model
        for (n, p), (_, q) in zip(stored.named_parameters(), fresh.named_parameters()):
            assert rel_err(p, q) < 1e-10, n
        assert cs.retain(forget).samples == 20 * len(keep)


def test_bad_requests_and_files(setup, tmp_path):
    model, ds = setup
    cs = ClassStatistics.collect(model, ds, per_class=5)
    with pytest.raises(ValueError, match=r"class\(es\) \[9\] have no stored statistics"):
        cs.retain([9])
    with pytest.raises(ValueError, match="nothing to retain"):
        cs.forget([0, 1, 2, 3])
    path = tmp_path / "cs.pt"
    cs.save(path)
    blob = torch.load(path, weights_only=True)
    blob["classes"][2]["slots"]["3"]["rows"] *= 1.0001  # the head saw 5 < 144 vectors: kept as vectors
    torch.save(blob, path)
    with pytest.raises(ValueError, match=r"class 2\) is corrupted"):
        ClassStatistics.load(path)
    other = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4)).double()
    with pytest.raises(ValueError, match="do not match the model"):
        unlearn(other, cs.forget([1]), cs.retain([1]), **FIXED)
