"""The one place that maps a device to the name of the launch-configuration table its Triton kernels use."""
from __future__ import annotations

import torch


_TARGETS: dict = {}


# torch.compile calls it at trace time instead of tracing into it (and it would trace through an lru_cache)
@torch.compiler.assume_constant_result
def device_target(device: torch.device) -> str:
    """"gfx950" or "gfx942" on ROCm (gcnArchName gfx95* or anything else), "sm_90" on every NVIDIA GPU (no
    Hopper-only feature is requested), "interpreter" for CPU tensors. On CUDA builds torch fills gcnArchName with the
    device name ("NVIDIA H200"), so the vendor comes from torch.version.hip, never from that field."""
    if device not in _TARGETS:
        _TARGETS[device] = _read_target(device)
    return _TARGETS[device]


def _read_target(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpreter"
    if torch.version.hip is None:
        return "sm_90"
    arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or ""
    return "gfx950" if arch.startswith("gfx95") else "gfx942"
