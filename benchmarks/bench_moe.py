"""Benchmark cases for the top-1 MoE: dispatch, the expert layer forward, and forward + backward.

GPU: ZAYA1-8B shapes (E 16, H 2048, I 2048, bf16), T = 1, 8, 64, 512, 4k, 16k, 64k tokens, balanced routing and
skewed routing (half the tokens on expert 0, 10% skipped). CPU: tiny shapes so the runner itself cannot rot (the
interpreter is not timed). Providers, forward and forward + backward alike: the reference (per-expert loop of torch
matmuls), transformers' ZayaExperts (eager; forward under no_grad), torch._grouped_mm (sort + two grouped GEMMs +
scatter, where this torch runs it: probed once on tiny tensors) and every zaya backend available here (the dispatch
also with the one-block HIP kernel).

The expert index is remembered valid (`_validate.remember_valid`, as zaya_router does for the index it returns), so
the timed zaya calls skip the expert-index value check, a device->host copy per call: the dispatch is timed as the
model runs it. Forward + backward calls run the forward inside the timed call too.

Bytes are the minimum traffic: the weights of the experts in use, x read and y written (forward; the backward adds
reading them again and writing the gradients). The shape dict carries the GEMM FLOPs ("gflop": run.py reports TFLOP/s
and the fraction of peak): forward 6 H I per routed token, forward + backward 3x that plus the recomputed gate/up GEMM
(4 H I per routed token). Transformers also multiplies the skipped tokens (its router sends them to expert 0 with
weight 0), work the count leaves out.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from zaya_kernels.ops import _validate as check
from zaya_kernels.reference import moe as ref


def _routing(T, E, skewed, gen):
    if not skewed:
        return torch.randint(0, E, (T,), generator=gen, dtype=torch.int32)
    draw = torch.rand(T, generator=gen)
    index = torch.randint(1, E, (T,), generator=gen, dtype=torch.int32)
    index[draw < 0.5] = 0
    index[draw > 0.9] = E
    return index


def _transformers_experts(gate_up, down):
    from transformers.models.zaya.configuration_zaya import ZayaConfig
    from transformers.models.zaya.modeling_zaya import ZayaExperts

    E, two_i, H = gate_up.shape
    config = ZayaConfig(hidden_size=H, moe_intermediate_size=two_i // 2, num_experts=E)
    config._experts_implementation = "eager"
    experts = ZayaExperts(config).to(device=gate_up.device, dtype=gate_up.dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    return experts


def _grouped_mm_moe(x, gate_up, down, index, weight):
    """Sort by expert, torch._grouped_mm for both projections, scatter back (skip tokens give 0)."""
    E = gate_up.shape[0]
    I = gate_up.shape[1] // 2
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index.long(), minlength=E + 1)[:E]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    routed_mask = (index[order] < E)[:, None]
    # rows past offs[-1] (the skipped tokens, sorted last) are left out of the grouped GEMMs, whose outputs and input
    # gradients there are undefined: `where` (not a product: 0 * garbage may be NaN) keeps them out of y and grad x
    xs = torch.where(routed_mask, x[order], 0)
    gate_up_out = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    act = F.silu(gate_up_out[:, :I]) * gate_up_out[:, I:]
    out = torch._grouped_mm(act, down.transpose(1, 2), offs=offs)
    y = torch.zeros_like(x)
    y[order] = torch.where(routed_mask, out * weight[order, None].to(out.dtype), 0)
    return y


def _grouped_mm_runs(device, dtype) -> bool:
    """torch._grouped_mm forward + backward on tiny tensors of this device and dtype (16-byte aligned strides)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        E, H, I, T = 2, 16, 16, 8
        leaves = [torch.randn(*s, device=device).to(dtype).requires_grad_() for s in ((T, H), (E, 2 * I, H),
                                                                                     (E, H, I))]
        weight = torch.rand(T, device=device, requires_grad=True)
        index = torch.arange(T, device=device, dtype=torch.int32) % (E + 1)
        y = _grouped_mm_moe(*leaves, index, weight)
        torch.autograd.grad(y, [*leaves, weight], torch.ones_like(y))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def cases(device: str):
    """Yield (name, shape dict, bytes moved, {provider: callable})."""
    import zaya_kernels
    from zaya_kernels import backend
    from zaya_kernels.ops import moe, moe_block_m
    from zaya_kernels.ops.moe import BY_TOKEN_MAX_TOKENS

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    E, H, I = (16, 2048, 2048) if on_gpu else (4, 64, 64)
    token_counts = (1, 8, 64, 512, 4096, 16384, 65536) if on_gpu else (1, 64)
    zaya_backends = [b for b in ("triton",) if backend.unavailable_reason(b, device, ("reference", "triton")) is None]
    dispatch_backends = [b for b in ("triton", "hip")
                         if backend.unavailable_reason(b, device, ("reference", "triton", "hip")) is None]
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5).to(dtype).to(device)
    down = (torch.randn(E, H, I, generator=gen) * I ** -0.5).to(dtype).to(device)
    hf_experts = _transformers_experts(gate_up, down)
    has_grouped_mm = _grouped_mm_runs(device, dtype)
    elt = gate_up.element_size()
    for tokens in token_counts:
        for skewed in (False, True):
            x = torch.randn(tokens, H, generator=gen).to(dtype).to(device)
            index = _routing(tokens, E, skewed, gen).to(device)
            # valid by construction (0..E): as for zaya_router's index, the ops skip the value check (a device->host
            # copy per call). Re-marked if the tensor were replaced; nothing below modifies it.
            check.remember_valid(index, ("expert_index", E))
            weight = torch.rand(tokens, generator=gen).to(device)
            routed = int((index < E).sum())
            experts_used = int(torch.unique(index[index < E]).numel())
            shape = {"T": tokens, "E": E, "H": H, "I": I, "routing": "skewed" if skewed else "balanced",
                     "dtype": str(dtype).replace("torch.", "")}
            block_m = moe_block_m(tokens, device)

            # dispatch
            providers = {"reference": lambda i=index, b=block_m: ref.moe_dispatch(i, E, b)}
            for name in dispatch_backends:
                def run_dispatch(i=index, b=block_m, name=name):
                    with zaya_kernels.use_backend(name):
                        return torch.ops.zaya.moe_dispatch(i, E, b)
                providers[f"zaya-{name}"] = run_dispatch
            yield "moe_dispatch", dict(shape), tokens * 4 * 3, providers

            # forward
            weight_bytes = experts_used * 3 * I * H * elt
            fwd_bytes = weight_bytes + 2 * tokens * H * elt
            hf_index = index.masked_fill(index == E, 0).long()[:, None]
            hf_weight = weight.masked_fill(index == E, 0.0).to(dtype)[:, None]

            def hf_forward(a=(x, hf_index, hf_weight)):
                with torch.no_grad():
                    return hf_experts(*a)

            providers = {
                "reference": lambda a=(x, gate_up, down, index, weight): ref.moe_experts(
                    a[0], a[1], a[2], a[4], *_dispatch_for(a[3], E)),
                "transformers": hf_forward,
            }
            if has_grouped_mm:
                providers["torch._grouped_mm"] = lambda a=(x, gate_up, down, index, weight): _grouped_mm_moe(*a)
            for name in zaya_backends:
                def run_forward(a=(x, gate_up, down, index, weight), name=name, **kwargs):
                    with zaya_kernels.use_backend(name):
                        return moe(*a, **kwargs)
                providers[f"zaya-{name}"] = run_forward
                if tokens <= BY_TOKEN_MAX_TOKENS:  # `moe` ran moe_experts_by_token: the dispatch path alongside
                    providers[f"zaya-{name}-dispatch"] = functools.partial(run_forward, block_m=block_m)
            yield "moe_experts", {**shape, "gflop": 6 * routed * H * I / 1e9}, fwd_bytes, providers

            # forward + backward (both inside the timed call)
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down, weight)]
            grad_y = torch.randn(tokens, H, generator=gen).to(dtype).to(device)

            def forward_backward(name, a=leaves, i=index, g=grad_y):
                with zaya_kernels.use_backend(name):
                    y = moe(a[0], a[1], a[2], i, a[3])
                    return torch.autograd.grad(y, a, g, allow_unused=True)

            hf_leaves = [x.detach().clone().requires_grad_(True), hf_experts.gate_up_proj, hf_experts.down_proj,
                         hf_weight.detach().clone().requires_grad_(True)]

            def hf_forward_backward(a=hf_leaves, i=hf_index, g=grad_y):
                y = hf_experts(a[0], i, a[3])
                return torch.autograd.grad(y, a, g, allow_unused=True)

            providers = {"reference": lambda: forward_backward("reference"), "transformers": hf_forward_backward}
            if has_grouped_mm:
                def grouped_forward_backward(a=leaves, i=index, g=grad_y):
                    y = _grouped_mm_moe(a[0], a[1], a[2], i, a[3])
                    return torch.autograd.grad(y, a, g, allow_unused=True)
                providers["torch._grouped_mm"] = grouped_forward_backward
            for name in zaya_backends:
                providers[f"zaya-{name}"] = lambda name=name: forward_backward(name)
            yield "moe_experts_fwd_bwd", {**shape, "gflop": 22 * routed * H * I / 1e9}, 3 * fwd_bytes, providers
            # free this case's activations before the next T's (64k tokens: ~1 GB of inputs and gradients)
            del providers, leaves, hf_leaves, grad_y, x, index, weight, hf_index, hf_weight
            del forward_backward, hf_forward_backward, hf_forward
            if has_grouped_mm:
                del grouped_forward_backward


def _dispatch_for(index, E):
    """(routing weight excluded) the dispatch arguments moe_experts takes after x, gate_up, down, routing_weight."""
    counts, offsets, sorted_ids, inverse, tile_expert, tile_start = ref.moe_dispatch(index, E, 16)
    return sorted_ids, offsets, tile_expert, tile_start, 16, 0
