"""Build slimstack and its native extension ``slimstack._C``.

The C++ CPU kernels (csrc/cpu) are always built. The CUDA kernels (csrc/cuda) are built
only when nvcc and a CUDA build of torch are both present. Override with
``SLIMSTACK_BUILD_CUDA=0|1``; ``SLIMSTACK_BUILD_EXT=0`` skips the extension altogether
(the package then runs on its pure-PyTorch fallbacks).

Install with ``pip install torch==2.13.0 ninja nvidia-cutlass==4.2.0.0`` then
``pip install --no-build-isolation .``: an isolated build would pull a multi-GB CUDA torch
into its temporary environment, and without isolation pip installs no build requirements,
so the CUTLASS headers (for the CUDA kernels) come first; ninja compiles in parallel.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _cutlass_include() -> str | None:
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(path) else None


def _find_cuda_home() -> bool:
    """Point CUDA_HOME at a toolkit that has the headers, before torch guesses it; False if
    none is found (and none was given).

    torch takes CUDA_HOME as the parent of the nvcc on PATH; where that nvcc is a wrapper
    script (/usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) the guess,
    /usr/local, has no cuda_runtime.h and the C++ glue fails to compile.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return True
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return True
    return False


def _extensions() -> tuple[list, dict]:
    if _flag("SLIMSTACK_BUILD_EXT") is False:
        print("slimstack: SLIMSTACK_BUILD_EXT=0, skipping the native extension", file=sys.stderr)
        return [], {}
    have_cuda_headers = _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "slimstack: torch is not importable at build time; building without the native "
            "extension (install torch==2.13.0 first and use --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )
    have_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    have_cuda_torch = torch.version.cuda is not None
    want_cuda = _flag("SLIMSTACK_BUILD_CUDA")
    build_cuda = (have_nvcc and have_cuda_torch) if want_cuda is None else want_cuda
    if want_cuda and not (have_nvcc and have_cuda_torch):
        raise RuntimeError(
            "SLIMSTACK_BUILD_CUDA=1 but "
            + (
                "nvcc was not found"
                if not have_nvcc
                else f"torch {torch.__version__} is a CPU build"
            )
        )

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        if not have_cuda_headers:
            raise RuntimeError(
                "building the CUDA kernels needs the CUDA toolkit headers (cuda_runtime.h): "
                "none beside the nvcc on PATH or in /usr/local/cuda; set CUDA_HOME"
            )
        cutlass = _cutlass_include()
        if cutlass is None:
            raise RuntimeError(
                "building the CUDA kernels needs the CUTLASS headers: pip install "
                "nvidia-cutlass==4.2.0.0 first (a --no-build-isolation build installs no build "
                "requirements), or set SLIMSTACK_BUILD_CUDA=0 to build the CPU kernels only"
            )
        include_dirs.append(cutlass)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        print(
            f"slimstack: building CPU + CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}",
            file=sys.stderr,
        )
        ext = cpp_extension.CUDAExtension(
            "slimstack._C",
            ["csrc/bindings.cpp", *cpu_sources, *cuda_sources],
            include_dirs=include_dirs,
            define_macros=[("SLIMSTACK_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        reason = (
            "forced off"
            if want_cuda is False
            else ("nvcc not found" if not have_nvcc else f"torch {torch.__version__} has no CUDA")
        )
        print(f"slimstack: building CPU kernels only ({reason})", file=sys.stderr)
        ext = cpp_extension.CppExtension(
            "slimstack._C",
            ["csrc/bindings.cpp", *cpu_sources],
            include_dirs=include_dirs,
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    # ninja compiles the sources in parallel (all cores); without it they build one by one
    use_ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()

setup(
    name="slimstack",
    version="0.1.0",
    description="Sparse inference for pruned LLMs: pruning, depth slicing, 2:4 kernels, engine",
    python_requires=">=3.10",
    package_dir={"slimstack": "python/slimstack", "slimstack.kernels": "kernels"},
    packages=[
        "slimstack",
        "slimstack.kernels",
        "slimstack.prune",
        "slimstack.depth",
        "slimstack.formats",
        "slimstack.ops",
        "slimstack.engine",
    ],
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "numpy",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        # nvidia-cutlass ships the CUTLASS C++ headers the CUDA kernels compile against
        "dev": ["pytest", "pytest-benchmark", "ruff", "nvidia-cutlass==4.2.0.0"],
    },
    package_data={"slimstack.ops": ["*.json"]},  # a benchmark-refreshed dispatch table
    entry_points={"console_scripts": ["slimstack=slimstack.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
