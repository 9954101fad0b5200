"""What was built, the switch that turns it off, and the ops under opcheck and torch.compile."""
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import rel_err
from deepunlearn import ops as extension
from ext_cases import DEVICES, device_or_skip, needs_ext, sym_poison

import deepunlearn
from ext_cases import PURE_BUILD, windows_overlap

FIXED = {"alpha_r": 100.0, "alpha_f": 3.0}  # the fixed-α edit (the default call would choose α)


def cuda_build_expected() -> bool:
    """What setup.py does: CUDA kernels whenever torch is a CUDA build and a toolkit is present."""
    if os.environ.get("DEEPUNLEARN_CUDA") == "0" or torch.version.cuda is None:
        return False
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return any(h and (Path(h) / "bin" / "nvcc").exists() for h in homes)


def elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (enough to find .nv_fatbin)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def section(i):
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    strtab_off = section(shstrndx)[4]
    names = set()
    for i in range(shnum):
        name_off = section(i)[0]
        end = data.index(b"\0", strtab_off + name_off)
        names.add(data[strtab_off + name_off : end].decode())
    return names


@pytest.mark.skipif(PURE_BUILD, reason="pure-Python build requested")
def test_extension_is_built_and_loaded():
    info = deepunlearn.extension_info()
    assert info["extension_loaded"], info
    assert info["built_with_torch"].split("+")[0] == torch.__version__.split("+")[0]
    for op in ("linear_cov_accumulate_", "conv_cov_accumulate_", "projected_edit", "symmetric_eigh"):
        assert extension.has_op(op, torch.device("cpu")), op


@pytest.mark.skipif(PURE_BUILD or not cuda_build_expected(), reason="no CUDA toolkit or CPU-only torch: CPU-only build")
def test_cuda_kernels_are_really_in_the_binary():
    info = deepunlearn.extension_info()
    assert info["cuda_kernels"] and info["built_with_cuda"] == torch.version.cuda, info
    for op in ("linear_cov_accumulate_", "conv_cov_accumulate_", "projected_edit", "symmetric_eigh"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deepunlearn::{op}", "CUDA"), op
    from deepunlearn import _C

    binary = Path(_C.__file__)
    assert ".nv_fatbin" in elf_section_names(binary), "no device code in the extension"
    code = binary.read_bytes()
    for kernel in (b"gather_patches_colmajor", b"mirror_lower_to_upper_tiles"):  # csrc/cuda/*_kernels.cu
        assert kernel in code, f"the kernel {kernel.decode()} is not in {binary.name}"


def test_the_sdist_holds_every_source_and_header_of_the_extension(tmp_path):
    """An sdist builds on its own only if it carries csrc/ whole (headers and the CUDA sources too,
    whatever the machine that makes it); made from a copy of the files the build reads."""
    import shutil
    import subprocess
    import sys
    import tarfile

    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    shutil.copytree(root / "csrc", tree / "csrc")
    shutil.copytree(root / "deepunlearn", tree / "deepunlearn", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(root / name, tree / name)
    env = dict(os.environ, DEEPUNLEARN_CUDA="0")  # as on a machine without a toolkit
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        packed = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    sources = {p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu")}
    assert any(s.endswith(".h") for s in sources) and any(s.endswith(".cu") for s in sources)
    assert sources <= packed, sorted(sources - packed)


def test_disable_switch_forces_the_pure_path(monkeypatch):
    import subprocess
    import sys

    code = "import deepunlearn, json; print(json.dumps(deepunlearn.extension_info()))"
    env = dict(os.environ, DEEPUNLEARN_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert '"extension_loaded": false' in out and "DEEPUNLEARN_DISABLE_EXT" in out


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dev = device_or_skip(device)
    ops = extension.library()
    d = 12
    torch.library.opcheck(ops.linear_cov_accumulate_.default, (sym_poison(d, torch.float32, dev), torch.randn(5, d, device=dev)))
    for form in ("auto", "direct", "shifted"):  # the form is an argument like any other
        torch.library.opcheck(
            ops.conv_cov_accumulate_.default,
            (torch.stack([sym_poison(18, torch.float32, dev)] * 2), torch.randn(2, 4, 5, 5, device=dev), [3, 3], [1, 1],
             [1, 1, 1, 1], [1, 1], form, 100),
        )
    torch.library.opcheck(
        ops.projected_edit.default,
        (torch.randn(2, 3, d, device=dev), torch.randn(2, d, d, device=dev), torch.randn(2, d, d, device=dev)),
    )
    spd = torch.randn(3, d, 2 * d, device=dev)
    torch.library.opcheck(ops.symmetric_eigh.default, (spd @ spd.transpose(1, 2),))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_compile_in_one_graph(device, backend):
    # fullgraph: any graph break (an op dynamo or the fake kernels cannot trace) is an error; the
    # in-place ops must still write their inputs once functionalised, as in eager mode
    dev = device_or_skip(device)
    ops = extension.library()

    def step(cov, conv_cov, x, images, w, m_r, m_f):
        ops.linear_cov_accumulate_(cov, 2.0 * x)
        ops.conv_cov_accumulate_(conv_cov, images.relu(), [3, 3], [2, 1], [1, 0, 1, 1], [1, 2])
        return ops.projected_edit(w, m_r, m_f) + 1.0

    d = 12
    args = (sym_poison(d, torch.float32, dev), torch.stack([sym_poison(18, torch.float32, dev)] * 2),
            torch.randn(9, d, device=dev), torch.randn(3, 4, 7, 8, device=dev), torch.randn(2, 5, d, device=dev),
            torch.randn(2, d, d, device=dev), torch.randn(2, d, d, device=dev))
    eager_args = tuple(a.clone() for a in args)
    starts = tuple(a.clone() for a in args[:2])
    torch._dynamo.reset()
    # no cached graph: inductor compares the real outputs with the fake kernels' only when it compiles
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(step, fullgraph=True, backend=backend)(*args)
    expected = step(*eager_args)
    assert rel_err(out, expected) < 1e-6
    for got, want, start in zip(args[:2], eager_args[:2], starts):
        assert rel_err(got, want) < 1e-6 and rel_err(got, start) > 0.1  # written, as in eager mode


@needs_ext
def test_ops_compile_once_for_every_size():
    # dynamic shapes: the fake kernels hold for symbolic sizes, so new sizes reuse the one graph
    ops = extension.library()

    def step(cov, conv_cov, x, images, w, m_r, m_f):
        ops.linear_cov_accumulate_(cov, x)
        ops.conv_cov_accumulate_(conv_cov, images, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "shifted")
        return ops.projected_edit(w, m_r, m_f)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    # no two sizes equal within a call: dynamo would take them for one symbol and recompile when they part
    for n, d, hw in ((5, 7, 9), (11, 13, 15), (17, 19, 21)):
        args = (sym_poison(d, torch.float64, "cpu"), torch.stack([sym_poison(18, torch.float64, "cpu")] * 2),
                torch.randn(n, d, dtype=torch.float64), torch.randn(n, 4, hw, hw + 1, dtype=torch.float64),
                torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, d, d, dtype=torch.float64),
                torch.randn(2, d, d, dtype=torch.float64))
        eager = tuple(a.clone() for a in args)
        assert rel_err(compiled(*args), step(*eager)) < 1e-12
        assert rel_err(args[0], eager[0]) < 1e-12 and rel_err(args[1], eager[1]) < 1e-12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def forced_form(geom, forms: str) -> str:
    """The form a conv of ``geom`` is forced to: the shifted family's member for its geometry, or
    the weight-gradient form for stride-1, undilated convs ("auto" elsewhere)."""
    unit, undilated = all(s == 1 for s in geom.stride), all(d == 1 for d in geom.dilation)
    if forms == "wgrad":
        return "wgrad" if unit and undilated else "auto"
    if unit:
        return "shifted" if undilated else "residues"
    return "phases" if undilated and windows_overlap(geom.kernel, geom.stride) else "auto"


@needs_ext
@pytest.mark.parametrize("forms", ["chosen", "forced", "wgrad"])
def test_unlearning_gives_the_same_model_with_and_without_the_extension(monkeypatch, forms):
    # "forced": the shifted, residue and phase forms wherever the geometry allows them; "wgrad": the
    # weight-gradient form for the stride-1, undilated convs
    from deepunlearn import hooks
    from deepunlearn.ops.covariance import accumulate_conv_

    if forms != "chosen":
        monkeypatch.setattr(hooks, "accumulate_conv_",
                            lambda cov, x, geom: accumulate_conv_(cov, x, geom, form=forced_form(geom, forms)))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect"),
        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 9, 40), nn.ReLU(), nn.Linear(40, 5),
    ).double()
    x = torch.randn(20, 3, 6, 6, dtype=torch.float64)
    with_ext = deepunlearn.unlearn(model, x[:8], x[8:], inplace=False, **FIXED).model
    with extension.pure_path():
        without = deepunlearn.unlearn(model, x[:8], x[8:], inplace=False, **FIXED).model
    for (n, p), (_, q) in zip(with_ext.named_parameters(), without.named_parameters()):
        assert rel_err(p, q) < 1e-10, n


@needs_ext
@pytest.mark.cuda
def test_unlearning_on_cuda_matches_the_cpu():
    dev = device_or_skip("cuda")
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 36, 40), nn.ReLU(), nn.Linear(40, 5),
    ).double()
    x = torch.randn(20, 3, 6, 6, dtype=torch.float64)
    on_cpu = deepunlearn.unlearn(model, x[:8], x[8:], inplace=False, **FIXED).model
    kw = {"inplace": False, "dtype": torch.float64, **FIXED}  # the GPU's default statistics are float32
    on_gpu = deepunlearn.unlearn(model.to(dev), x[:8].to(dev), x[8:].to(dev), **kw).model
    for (n, p), (_, q) in zip(on_gpu.named_parameters(), on_cpu.named_parameters()):
        assert p.device.type == "cuda" and rel_err(p.cpu(), q) < 1e-10, n
    # float32 statistics (the GPU default) of a float64 model: float64 inputs rounded, then the same edit
    on_gpu32 = deepunlearn.unlearn(model.to(dev), x[:8].to(dev), x[8:].to(dev), inplace=False, **FIXED).model
    for (n, p), (_, q) in zip(on_gpu32.named_parameters(), on_cpu.named_parameters()):
        assert rel_err(p.cpu(), q) < 1e-5, n
