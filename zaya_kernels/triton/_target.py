"""The one place that maps a device to the name of the launch-configuration table its Triton kernels use."""
from __future__ import annotations

import json

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


class ConfigTable:
    """A module's launch-configuration JSON file (its CONFIG_PATH), parsed once at import and kept as an attribute
    rather than behind lru_cache: torch.compile traces through an lru_cache'd function (and stops at its open()),
    while an object's attribute is a constant to it. table() -> the parsed dict (or its `key` entry);
    reload() reads CONFIG_PATH again (after the tuner rewrote it, or with CONFIG_PATH pointed elsewhere)."""

    def __init__(self, module_name: str, key: str | None = None):
        self._module_name, self._key = module_name, key
        self.reload()

    def reload(self) -> dict:
        import sys

        with open(sys.modules[self._module_name].CONFIG_PATH) as f:
            table = json.load(f)
        self.table = table if self._key is None else table[self._key]
        return self.table

    def __call__(self) -> dict:
        return self.table
