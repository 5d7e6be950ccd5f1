"""Build of the optional compiled ops (``ctm_kernels._C``); metadata lives in pyproject.toml.

The extension registers ``torch.ops.ctm_kernels.jacobi_eigh`` (csrc/): a batched cyclic
Jacobi eigensolver, C++ for the CPU and, with a CUDA build of torch and nvcc, CUDA for
the GPU. The package works without it, so every way this build can fail (no torch in the
build environment, no compiler, a compile error) ends in a warning and a pure-Python
install, never in a failed install.

    pip install -e . --no-build-isolation      # builds against the torch already installed
    CTM_KERNELS_NO_EXT=1 pip install -e .       # skips the extension
    CTM_KERNELS_NO_CUDA=1 ...                   # CPU part only, even with a CUDA torch

Build isolation would install a second torch into a throw-away environment just to
compile against it, and the binary must match the torch it runs with, hence
``--no-build-isolation``. With isolation and no torch among the build requirements the
extension is skipped with a warning.
"""
from __future__ import annotations

import os
import warnings

from setuptools import setup

SOURCES = ["csrc/ops.cpp", "csrc/jacobi_cpu.cpp"]
CUDA_SOURCES = ["csrc/jacobi_cuda.cu"]


def _skip(reason: str):
    warnings.warn(f"ctm_kernels: not building the compiled ops ({reason}); the torch code paths are used")
    return {}


def _extension_kwargs() -> dict:
    if os.environ.get("CTM_KERNELS_NO_EXT") == "1":
        return _skip("CTM_KERNELS_NO_EXT=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable in the build environment; use --no-build-isolation")

    class OptionalBuildExt(BuildExtension):
        """build_ext that turns a failed compile into a warning (the extension is optional)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure leaves a working package
                _skip(f"build failed: {exc}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                _skip(f"build of {ext.name} failed: {exc}")

    # -O3 -fopenmp-simd -fno-math-errno for the lane loops (sqrt included) to vectorise;
    # no -ffast-math: the Jacobi convergence test relies on exact IEEE comparisons (x + g == x).
    cxx = ["-O3", "-fopenmp-simd", "-fno-math-errno"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("CTM_KERNELS_NO_CUDA") != "1"
    if with_cuda:
        ext = CUDAExtension(
            "ctm_kernels._C",
            SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        )
    else:
        ext = CppExtension("ctm_kernels._C", SOURCES, extra_compile_args={"cxx": cxx})
    # ninja (parallel compiles, MAX_JOBS) when installed; BuildExtension falls back without it
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(**_extension_kwargs())
