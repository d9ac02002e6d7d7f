"""Build of solo_fast's native library, ``solo_fast._C``.

The C++ CPU kernels are always compiled. CUDA kernels are compiled according to ``SOLO_FAST_CUDA``:

* ``auto`` (default): when a CUDA toolkit (nvcc and libcudart) is found;
* ``1``: always (the build fails if no toolkit is found);
* ``0``: never.

The decision never depends on ``torch.cuda.is_available()``: a build machine without a GPU must
still produce CUDA kernels. ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0". ptxas reports registers,
spills and local memory for every kernel; ``SOLO_FAST_STRICT_PTXAS=1`` (set by the test script and
CI) turns any spill or local-memory use into a build error.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _is_toolkit(folder: Path) -> bool:
    has_nvcc = (folder / "bin" / "nvcc").is_file()
    has_cudart = any(
        (folder / lib / "libcudart.so").exists()
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    )
    return has_nvcc and has_cudart


def _nvcc_wrapper_target(nvcc: Path) -> Path | None:
    # Some machines put a shell wrapper named nvcc in a generic bin folder (`exec /real/nvcc "$@"`);
    # torch would take that folder's parent as the CUDA home and fail to link libcudart.
    try:
        text = nvcc.read_text(errors="ignore")[:4096]
    except OSError:
        return None
    for token in text.split():
        token = token.strip("\"'")
        if token.endswith("/nvcc") and Path(token).is_file():
            return Path(token)
    return None


def find_cuda_home() -> Path | None:
    """The CUDA toolkit folder: the first candidate that really holds bin/nvcc and libcudart."""
    candidates: list[Path] = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append(Path(os.environ[variable]))
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        resolved = Path(nvcc_on_path).resolve()
        candidates.append(resolved.parent.parent)
        wrapped = _nvcc_wrapper_target(resolved)
        if wrapped is not None:
            candidates.append(wrapped.resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for candidate in candidates:
        if _is_toolkit(candidate):
            return candidate.resolve()
    return None


def _nvidia_wheel_includes() -> list[str]:
    # The cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes are absent from a bare
    # toolkit; torch's CUDA wheels bring them as nvidia-* packages in site-packages.
    found = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cublas/include", "nvidia/cusparse/include"):
            folder = Path(site) / sub
            if folder.is_dir() and str(folder) not in found:
                found.append(str(folder))
    return found


def _cuda_mode() -> str:
    mode = os.environ.get("SOLO_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SOLO_FAST_CUDA must be one of auto, 0, 1; got {mode!r}")
    return mode


def extensions():
    mode = _cuda_mode()
    cuda_home = find_cuda_home() if mode != "0" else None
    if mode == "1" and cuda_home is None:
        raise SystemExit(
            "SOLO_FAST_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder whose "
            "bin/ holds nvcc and whose lib64/ holds libcudart.so"
        )
    with_cuda = cuda_home is not None
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = str(cuda_home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    # -fopenmp: ATen's at::parallel_for is an inline template that runs its body in an OpenMP
    # region; compiled without it, every CPU kernel silently runs on one thread. The extension
    # then needs libgomp.so.1, which the loader resolves to the copy torch has already loaded.
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp"]
    link_flags = ["-fopenmp"]
    define_macros = []
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
        ptxas = "-Xptxas=-v,-warn-spills,-warn-lmem-usage"
        if os.environ.get("SOLO_FAST_STRICT_PTXAS", "0") == "1":
            ptxas += ",-Werror"
        nvcc_flags = ["-O3", "-std=c++20", ptxas, "-lineinfo"]
        define_macros.append(("SOLO_FAST_WITH_CUDA", None))
        extension = CUDAExtension(
            name="solo_fast._C",
            sources=sources,
            include_dirs=[str(CSRC)] + _nvidia_wheel_includes(),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            name="solo_fast._C",
            sources=sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"solo_fast: CUDA kernels {'ON (' + str(cuda_home) + ')' if with_cuda else 'OFF'}")
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["solo_fast", "solo_fast.*"]) + ["solo_fast.kernels"],
    package_dir={"solo_fast": "solo_fast", "solo_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
