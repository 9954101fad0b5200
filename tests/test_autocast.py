"""Collection under torch.autocast: statistics of the reduced-precision inputs, accumulated in float32."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepunlearn
from deepunlearn import collect_statistics
from deepunlearn.layers import find_targets

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from models_for_tests import fixture_data, fixture_model  # noqa: E402

from conftest import rel_err  # noqa: E402

FIXED = {"alpha_r": 100.0, "alpha_f": 3.0}  # the fixed-α edit (the default call would choose α)


def independent_moments(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Second moments of what each Linear/Conv2d multiplies under CPU autocast, from plain hooks."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            def hook(mod, args, name=name):
                a = args[0].detach().to(dtype).double()  # autocast casts the input of linear and conv
                if isinstance(mod, nn.Conv2d):
                    cols = F.unfold(a, mod.kernel_size, padding=mod.padding, stride=mod.stride)  # (N, C*k*k, L)
                    g = mod.groups
                    cols = cols.view(a.shape[0], g, -1, cols.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, cols.shape[1] // g)
                    c = cols.transpose(1, 2) @ cols
                else:
                    r = a.reshape(-1, a.shape[-1])
                    c = (r.T @ r)[None]
                out[name] = out.get(name, 0) + c
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        for xb in x.split(4):
            model(xb)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_are_those_of_the_autocast_inputs_accumulated_in_float32(dtype):
    model = fixture_model().float()
    _, x = fixture_data()
    x = x.float()
    stats = collect_statistics(model, x, batch_size=4, dtype=torch.float32, autocast=dtype)
    full = collect_statistics(model, x, batch_size=4, dtype=torch.float32)
    ref = independent_moments(model, x, dtype)
    checked = 0
    for t in find_targets(model)[0]:
        cov, _ = stats.covariance(t)
        assert cov.dtype == torch.float32
        if t.name in ref:
            assert rel_err(cov, ref[t.name]) < 1e-5, t.name
            checked += 1
        # reduced precision moves every statistic a little, never far
        err = rel_err(cov, full.covariance(t)[0])
        assert 1e-7 < err < 3e-2, (t.name, err)
    assert checked == 5  # conv, grouped, query (key shares its slot), key, head


def test_unlearning_under_autocast_stays_close_to_full_precision():
    model = fixture_model().float()
    xf, xr = (t.float() for t in fixture_data())
    a = deepunlearn.unlearn(model, xf, xr, inplace=False, dtype=torch.float32, autocast=torch.bfloat16, **FIXED).model
    b = deepunlearn.unlearn(model, xf, xr, inplace=False, dtype=torch.float32, **FIXED).model
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        assert rel_err(wa, wb) < 5e-2, name


def test_autocast_dtype_is_checked():
    model = fixture_model()
    with pytest.raises(ValueError, match="autocast must be torch.bfloat16, torch.float16 or None"):
        collect_statistics(model, fixture_data()[1], autocast=torch.float64)
