"""The core needs torch and tqdm only; a missing extra is named with its pip command."""
import subprocess
import sys
import textwrap

import pytest

from deepunlearn import cli
from deepunlearn.extras import EXTRAS, require

OPTIONAL = ("numpy", "sklearn", "matplotlib", "timm", "transformers", "safetensors")


def test_the_core_call_runs_with_every_optional_package_missing():
    code = textwrap.dedent(f"""
        import sys, warnings
        for m in {OPTIONAL!r}:
            sys.modules[m] = None  # import fails, as when the package is not installed
        warnings.simplefilter("ignore")  # torch warns that it runs without numpy
        import torch
        from torch import nn
        import deepunlearn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        fixed = deepunlearn.unlearn(model, torch.randn(12, 6), torch.randn(20, 6), alpha_r=100, alpha_f=3, inplace=False)
        chosen = deepunlearn.unlearn(model, torch.randn(12, 6), torch.randn(20, 6), classes=[0], inplace=False)
        assert all(r.relative_change > 0 for r in fixed.layers) and chosen.alpha_f > 0
        from deepunlearn.evaluation import svc_mia
        try:
            svc_mia([1.0], [1.0], [1.0])
        except ImportError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pip install 'deepunlearn[metrics]'" in done.stdout


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"--timm needs the optional package 'timm': pip install 'deepunlearn\[timm\]'"):
        require("timm", "timm", "--timm")
    with pytest.raises(ValueError, match="unknown extra"):
        require("math", "nope", "x")
    assert require("math", "metrics", "x").sqrt(4.0) == 2.0
    assert set(EXTRAS) == {"metrics", "timm", "hf", "safetensors"}


def test_a_safetensors_file_asks_for_safetensors_alone(monkeypatch, tmp_path):
    from deepunlearn.cli import model_files

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "w.safetensors").write_bytes(b"not read")
    with pytest.raises((ImportError, ValueError), match=r"pip install 'deepunlearn\[safetensors\]'"):
        model_files._read_weights(str(tmp_path / "w.safetensors"))


def test_command_line_reports_a_missing_extra_without_a_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)
    rc = cli.main(["evaluate", "--timm", "resnet18", "--num-classes", "3", "--data", str(tmp_path), "--forget", "0"])
    assert rc == 2
    assert "pip install 'deepunlearn[timm]'" in capsys.readouterr().err


def test_pyproject_extras_match_the_module():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert set(project["dependencies"]) == {"torch>=2.11", "tqdm"}
    extras = project["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        assert set(extras[extra]) == set(packages), extra
    assert set().union(*EXTRAS.values()) <= set(extras["all"])
