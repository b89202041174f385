"""The launch-latency floor on this device, timed the way benchmarks/run.py times every provider (median_seconds):
an empty Triton kernel (one program, one pointer argument; GPU only) and one trivial torch op (a 1-element add, one
native kernel). A decode op's "x floor" ratio is its time over these: the router's target is one launch at <= 2x.

Provider names start with "floor:"; run.py keeps them out of the speedup baselines and reports every other provider
of the case as a multiple of each floor.
"""
from __future__ import annotations

import torch

_EMPTY = None


def _empty_kernel():
    global _EMPTY
    if _EMPTY is None:
        import triton

        @triton.jit
        def empty(ptr):
            pass

        _EMPTY = empty
    return _EMPTY


def floor_providers(device: str) -> dict:
    """{"floor:torch-add": ..., "floor:triton-empty": ... (CUDA/HIP with Triton)} for one case."""
    buf = torch.zeros(1, device=device)
    out = torch.empty_like(buf)
    providers = {"floor:torch-add": lambda: torch.add(buf, 1.0, out=out)}
    if device == "cuda":
        try:
            kernel = _empty_kernel()
        except ImportError:
            kernel = None
        if kernel is not None:
            providers["floor:triton-empty"] = lambda: kernel[(1,)](buf)
    return providers
