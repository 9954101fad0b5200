"""projected_edit against float64."""
import pytest
import torch

from conftest import rel_err
from deepunlearn import ops as extension
from ext_cases import DEVICES, device_or_skip, needs_ext
from deepunlearn.ops.edit import edited_weight_reference


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("g,o,d", [(1, 10, 7), (4, 3, 18), (1, 64, 600)])
def test_projected_edit_matches_float64_reference(device, dtype, g, o, d):
    dev = device_or_skip(device)
    w = torch.randn(g, o, d, dtype=torch.float64)
    m_r, m_f = (torch.linalg.qr(torch.randn(g, d, d, dtype=torch.float64))[0] for _ in range(2))
    m_r, m_f = m_r @ m_r.transpose(1, 2) * 0.5, m_f @ m_f.transpose(1, 2) * 0.3  # symmetric, non-trivial
    ref = edited_weight_reference(w, m_r, m_f)
    got = extension.library().projected_edit(w.to(dev, dtype), m_r.to(dev, dtype), m_f.to(dev, dtype))
    assert got.shape == w.shape and got.dtype == dtype
    tol = 1e-13 if dtype == torch.float64 else (1e-5 if dev.type == "cpu" else 2e-3)
    assert rel_err(got.cpu(), ref) < tol


@needs_ext
def test_projected_edit_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="shapes do not match"):
        extension.library().projected_edit(torch.randn(1, 3, 4), torch.randn(1, 5, 5), torch.randn(1, 5, 5))
    with pytest.raises(RuntimeError, match="share a dtype"):
        extension.library().projected_edit(torch.randn(1, 3, 4), torch.randn(1, 4, 4, dtype=torch.float64), torch.randn(1, 4, 4))
