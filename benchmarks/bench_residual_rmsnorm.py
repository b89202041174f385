"""Benchmark cases for residual scaling + RMSNorm: ZAYA1-8B width (H 2048) on GPU, small shapes on CPU.

Providers: the reference (zaya_kernels.reference), torch's own ops (F.rms_norm after the elementwise scaling, and
torch.compile of the same on GPU), and every zaya backend available here. Bytes are the minimum traffic:
read branch + residual, write R (fp32) + normed; parameters are negligible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zaya_kernels.reference import residual_rmsnorm as ref

EPS = 1e-5


def _torch_ops(branch, residual, hs, hb, rs, rb, w):
    new_residual = (branch.float() + hb) * hs + (residual + rb) * rs
    return new_residual, F.rms_norm(new_residual.to(branch.dtype), (branch.shape[1],), w.to(branch.dtype), EPS)


def cases(device: str):
    """Yield (name, shape dict, bytes moved, {provider: callable})."""
    import zaya_kernels
    from zaya_kernels import backend

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    token_counts = (1, 64, 4096, 32768) if on_gpu else (1, 64)
    hidden = 2048 if on_gpu else 256
    compiled = torch.compile(_torch_ops) if on_gpu else None
    zaya_backends = [b for b in ("hip", "triton")
                     if backend.unavailable_reason(b, device, ("hip", "triton")) is None]
    for tokens in token_counts:
        gen = torch.Generator().manual_seed(tokens)
        branch = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
        residual = torch.randn(tokens, hidden, generator=gen).to(device)
        hs, hb, rs, rb, w = (torch.rand(hidden, generator=gen).to(device) + 0.5 for _ in range(5))
        args = (branch, residual, hs, hb, rs, rb, w)
        providers = {
            "reference": lambda a=args: ref.residual_scale_rmsnorm(*a, EPS),
            "torch": lambda a=args: _torch_ops(*a),
        }
        if compiled is not None:
            providers["torch.compile"] = lambda a=args: compiled(*a)
        for name in zaya_backends:
            def run(a=args, name=name):
                with zaya_kernels.use_backend(name):
                    return torch.ops.zaya.residual_scale_rmsnorm(*a, EPS)
            providers[f"zaya-{name}"] = run
        bytes_moved = tokens * hidden * (2 * branch.element_size() + 8)
        shape = {"tokens": tokens, "hidden": hidden, "dtype": str(dtype).replace("torch.", "")}
        yield "residual_scale_rmsnorm", shape, bytes_moved, providers

        # backward: read dy, dR, branch, residual, R; write d branch, d residual (parameter sums are [H])
        new_residual, normed = ref.residual_scale_rmsnorm(*args, EPS)
        grad_normed, grad_residual = torch.randn_like(normed), torch.randn_like(new_residual)
        bwd_args = (grad_normed, grad_residual, branch, residual, hs, hb, rs, rb, w, new_residual, EPS)
        bwd = {"reference": lambda a=bwd_args: ref.residual_scale_rmsnorm_backward(*a)}
        for name in zaya_backends:
            def run_bwd(a=bwd_args, name=name):
                with zaya_kernels.use_backend(name):
                    return torch.ops.zaya.residual_scale_rmsnorm_backward(*a)
            bwd[f"zaya-{name}"] = run_bwd
        bwd_bytes = tokens * hidden * (3 * branch.element_size() + 4 * 4)
        yield "residual_scale_rmsnorm_backward", shape, bwd_bytes, bwd
