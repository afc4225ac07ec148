"""Builds specmoe_ext._C: the CUDA extension where torch has CUDA and nvcc is found, else CPU-only.

torch is deliberately not an install or build requirement (it would pull a multi-GB CUDA wheel);
install it first, then build with `pip install --no-build-isolation --no-deps -e .`.
Environment: TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS, SPECMOE_FORCE_CPU=1 (skip the CUDA build).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pip's default isolated build environment has no torch
    sys.exit(f"specmoe-ext: building needs torch importable in the build environment, and it is not ({e}).\n"
             "pip builds in an isolated environment unless told otherwise: install torch first, then build "
             "against it:\n"
             "    pip install torch==2.13.0 ninja   # or the torch you want (CPU build: add "
             "--index-url https://download.pytorch.org/whl/cpu)\n"
             "    pip install --no-build-isolation -e .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("SPECMOE_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


cpu_sources = [s for s in _sources("csrc/ops/*.cpp") if not s.endswith("_cuda.cpp")]
cxx_flags = ["-O3", "-g0", "-std=c++17"]

if _want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    ext = cpp_extension.CUDAExtension(
        "specmoe_ext._C",
        cpu_sources + _sources("csrc/ops/*_cuda.cpp") + _sources("csrc/ops/*_cuda.cu")
        + _sources("csrc/kernels/*.cu"),
        define_macros=[("SPECMOE_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            # No flag here may contain 'arch' (torch then drops its own -gencode flags).
            "nvcc": ["-O3", "-std=c++17", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
else:
    ext = cpp_extension.CppExtension("specmoe_ext._C", cpu_sources,
                                     extra_compile_args={"cxx": cxx_flags})

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
