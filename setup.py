"""Builds zaya_kernels._C with torch.utils.cpp_extension.

- CPU torch (or ZAYA_KERNELS_CPU_ONLY=1): a C++-only extension holding the op schemas.
- CUDA torch: csrc/*.cu compiled by nvcc for TORCH_CUDA_ARCH_LIST (default "9.0").
- ROCm torch: the same sources, hipified by torch, compiled for PYTORCH_ROCM_ARCH (default "gfx942;gfx950").
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, ROCM_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _gpu_flavour():
    if os.environ.get("ZAYA_KERNELS_CPU_ONLY", "0") == "1":
        return None
    if torch.version.hip is not None and ROCM_HOME is not None:
        return "rocm"
    if torch.version.cuda is not None and CUDA_HOME is not None:
        return "cuda"
    return None


def _extension():
    flavour = _gpu_flavour()
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for (C++20 from torch 2.14)
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    sources = ["csrc/zaya_ops.cpp"]
    if flavour is None:
        print("zaya_kernels: building the CPU-only extension (op schemas; kernels come from Triton/reference)")
        return CppExtension("zaya_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})
    sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    if flavour == "rocm":
        os.environ.setdefault("PYTORCH_ROCM_ARCH", "gfx942;gfx950")
        device_flags = ["-O3", "-DZAYA_WITH_GPU"]
        print(f"zaya_kernels: building for ROCm {os.environ['PYTORCH_ROCM_ARCH']}")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        # 3189: torch headers use `module` as an identifier, which nvcc warns about under C++20
        device_flags = ["-O3", "-DZAYA_WITH_GPU", "--expt-relaxed-constexpr", "-diag-suppress", "3189"]
        print(f"zaya_kernels: building for CUDA arch {os.environ['TORCH_CUDA_ARCH_LIST']}")
    return CUDAExtension(
        "zaya_kernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DZAYA_WITH_GPU"], "nvcc": device_flags},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
