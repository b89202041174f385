"""Test setup: CPU machines run the Triton kernels under the interpreter (set before Triton is imported).

The interpreter is not bf16-faithful, so Triton tests on CPU use fp32 / fp16: `tl.dot` on bf16 operands returns
garbage, and an fp32 -> bf16 conversion inside a kernel truncates instead of rounding to nearest (measured: 49% of
values differ from torch's rounding, all equal truncation), which puts e.g. the norm kernel's bf16 outputs ~5 ulps
from the reference. GPU runs (the `gpu` tests) cover bf16.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "zaya", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("zaya")

HAS_GPU = torch.cuda.is_available()
GPU_REASON = "needs a CUDA or ROCm GPU; this machine has none"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason=GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
