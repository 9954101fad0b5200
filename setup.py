"""Build deepunlearn and, when sources exist, its torch extension ``deepunlearn._C``.

The CUDA kernels are compiled whenever a CUDA toolkit and a CUDA build of torch are present;
no GPU is needed (``torch.cuda.is_available()`` is never asked). Switches:

* ``DEEPUNLEARN_CUDA=1`` / ``=0`` forces the CUDA kernels on / off;
* ``DEEPUNLEARN_NO_EXT=1`` builds the pure-Python package only;
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``8.0;9.0``).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or nvcc's real location.

    On some machines ``nvcc`` on PATH is a wrapper script in /usr/local/bin, from which torch
    would guess CUDA_HOME=/usr/local and fail to link; a toolkit must hold bin/nvcc and lib64.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and ((Path(c) / "lib64").exists() or (Path(c) / "lib").exists()):
            return c
    return None


def cuda_library_flags(cuda_home: str) -> tuple[list[str], list[str]]:
    """Include dirs and link flags for cuBLAS and cuSOLVER.

    A full toolkit has them under CUDA_HOME; a minimal one (compiler and runtime only) relies on
    the headers and libraries of the nvidia-* wheels that a CUDA build of torch installs.
    """
    wanted = {"cublas": "cublas_v2.h", "cusolver": "cusolverDn.h"}
    if all((Path(cuda_home) / "include" / header).exists() for header in wanted.values()):
        return [], [f"-l{name}" for name in wanted]
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        roots = [Path(p) for p in nvidia.__path__]
    except ImportError:
        roots = []
    include_dirs, link = [], []
    for name, header in wanted.items():
        found = [(inc, libs[0]) for root in roots for inc in sorted(root.glob(f"*/include/{header}"))
                 if (libs := sorted(inc.parent.parent.glob(f"lib/lib{name}.so*")))]
        if not found:
            sys.exit(f"deepunlearn: no {name} headers under {cuda_home} nor in the nvidia wheels; "
                     "set DEEPUNLEARN_CUDA=0 to skip CUDA")
        inc, lib = found[0]
        include_dirs += [str(inc.parent)] if str(inc.parent) not in include_dirs else []
        link += [f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]
    return include_dirs, link


def extensions():
    if os.environ.get("DEEPUNLEARN_NO_EXT", "0") not in ("", "0"):
        return [], {}
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/conv/*.cpp")
                         + glob.glob("csrc/conv/cpu/*.cpp"))
    if not cpu_sources:
        return [], {}
    import torch

    want_cuda = os.environ.get("DEEPUNLEARN_CUDA")
    cuda_home = find_cuda_home()
    use_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "1" and not use_cuda:
        sys.exit(f"DEEPUNLEARN_CUDA=1 but no CUDA toolkit ({cuda_home=}) or CPU-only torch (torch.version.cuda={torch.version.cuda})")
    if want_cuda == "0":
        use_cuda = False
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home if use_cuda else cpp_extension.CUDA_HOME
    # torch's C++ ABI, stated rather than left to the compiler's default (a GCC configured for the
    # old ABI would build an extension that crashes when an op's error crosses into torch).
    abi = ("_GLIBCXX_USE_CXX11_ABI", str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
    define = [("DEEPUNLEARN_TORCH_VERSION", f'"{torch.__version__}"'), ("Py_LIMITED_API", "0x030A0000"), abi]
    # -g0 overrides the -g of Python's own CFLAGS: debug information for torch's headers doubled
    # every file's compile time. The C++ standard is the one torch asks for (C++20 from torch 2.13).
    cxx = ["-O3", "-g0", "-fopenmp"]
    sources = list(cpu_sources)
    if use_cuda:
        # the ops' host code (.cpp) is compiled once by the C++ compiler; only the kernels (.cu, no
        # torch header) go through nvcc, which parses a file once more per GPU architecture
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        define += [("DEEPUNLEARN_WITH_CUDA", "1"), ("DEEPUNLEARN_CUDA_VERSION", f'"{torch.version.cuda}"')]
        include_dirs, link = cuda_library_flags(cuda_home)
        ext = cpp_extension.CUDAExtension(
            "deepunlearn._C", sources, define_macros=define, py_limited_api=True, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=[*link, "-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "deepunlearn._C", sources, define_macros=define, py_limited_api=True,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    print(f"deepunlearn: building the extension {'with' if use_cuda else 'without'} CUDA kernels"
          + (f" (CUDA_HOME={cuda_home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if use_cuda else ""))
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
