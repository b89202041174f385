"""Top-1 MoE ops (DESIGN.md 1.4): registration, validation, fake kernels, autograd and typed wrappers.

Ops (schemas in csrc/zaya_ops.cpp):
  zaya::moe_dispatch(expert_index, num_experts, block_m)
      -> (counts, offsets, sorted_token_ids, inverse, tile_expert, tile_start)
  zaya::moe_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                    skip_mode) -> y
  zaya::moe_experts_backward(grad_y, <the moe_experts arguments>) -> (grad_x, grad_gate_up, grad_down, grad_weight)
Backends: reference (zaya_kernels.reference.moe: vectorised dispatch, per-expert loops of torch matmuls that read
the offsets on the host) and triton (zaya_kernels.triton.moe: dispatch kernels, grouped GEMMs forward and backward,
no host synchronisation); moe_dispatch also has hip (kernels/moe.cuh via csrc/moe.cu: one block, for small T; runs
when asked for, `auto` picks triton). Autograd calls moe_experts_backward with the backend that ran the forward.

`zaya_kernels.ops.moe(x, gate_up, down, expert_index, routing_weight, skip_mode)` is the whole MoE expert part:
dispatch with the BLOCK_M of the tuned table for this T and device, then the experts.
"""
from __future__ import annotations

import os

import torch

from zaya_kernels import backend as _backend
from zaya_kernels.ops import _validate as check
from zaya_kernels.ops._registry import register_op
from zaya_kernels.reference import moe as ref

_INDEX_DTYPES = (torch.int32,)
BLOCK_M_CHOICES = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------- validation
def _check_expert_values(expert_index, num_experts):
    """Every index in 0..num_experts. Reads the values (one device->host copy on a GPU): skipped while a CUDA graph is
    captured (no synchronisation is allowed there) and when ZAYA_KERNELS_MOE_TRUST_INDEX=1."""
    if expert_index.numel() == 0 or expert_index.device.type == "meta":
        return
    if os.environ.get("ZAYA_KERNELS_MOE_TRUST_INDEX", "0") == "1":
        return
    if expert_index.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if isinstance(expert_index, torch._subclasses.FakeTensor):
        return
    low, high = int(expert_index.min()), int(expert_index.max())
    if low < 0:
        raise ValueError(f"zaya::moe_dispatch: `expert_index` has a negative value ({low}); expected 0..{num_experts} "
                         f"({num_experts} = skip)")
    if high > num_experts:
        raise ValueError(f"zaya::moe_dispatch: `expert_index` has value {high} > num_experts = {num_experts} "
                         f"(expected 0..{num_experts}, {num_experts} = skip)")


def _check_dispatch_args(op, num_experts, block_m):
    if not isinstance(num_experts, (int, torch.SymInt)) or num_experts < 1:
        raise ValueError(f"zaya::{op}: `num_experts` must be a positive int, got {num_experts!r}")
    if block_m not in BLOCK_M_CHOICES:
        raise ValueError(f"zaya::{op}: `block_m` must be one of {BLOCK_M_CHOICES}, got {block_m!r}")


def _validate_dispatch(expert_index, num_experts, block_m):
    check.tensor("moe_dispatch", "expert_index", expert_index, ndim=1, dtypes=_INDEX_DTYPES, contiguous=True)
    _check_dispatch_args("moe_dispatch", num_experts, block_m)
    _check_expert_values(expert_index, num_experts)


def _validate_experts_args(op, x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start,
                           block_m, skip_mode):
    check.tensor(op, "x", x, ndim=2, dtypes=check.FLOAT_DTYPES, contiguous=True)
    T, H = x.shape
    dev = x.device
    check.tensor(op, "gate_up", gate_up, ndim=3, dtypes=(x.dtype,), device=dev, contiguous=True)
    E, two_i, gate_up_h = gate_up.shape
    if E < 1 or two_i % 2 != 0 or two_i == 0:
        raise ValueError(f"zaya::{op}: `gate_up` must have shape [E, 2I, H] with E >= 1 and an even, non-zero 2I, "
                         f"got {tuple(gate_up.shape)}")
    if gate_up_h != H:
        raise ValueError(f"zaya::{op}: `gate_up` has hidden size {gate_up_h} but `x` has {H} "
                         f"(gate_up must be [E, 2I, H] = [{E}, {two_i}, {H}])")
    I = two_i // 2
    check.tensor(op, "down", down, dtypes=(x.dtype,), shape=(E, H, I), device=dev, contiguous=True)
    check.tensor(op, "routing_weight", routing_weight, dtypes=check.FLOAT_DTYPES, shape=(T,), device=dev,
                 contiguous=True)
    _check_dispatch_args(op, E, block_m)
    tiles = ref.num_tiles(T, E, block_m)
    check.tensor(op, "sorted_token_ids", sorted_token_ids, dtypes=_INDEX_DTYPES, shape=(T,), device=dev,
                 contiguous=True)
    check.tensor(op, "offsets", offsets, dtypes=_INDEX_DTYPES, shape=(E + 2,), device=dev, contiguous=True)
    for name, t in (("tile_expert", tile_expert), ("tile_start", tile_start)):
        check.tensor(op, name, t, dtypes=_INDEX_DTYPES, shape=(tiles,), device=dev, contiguous=True)
    if skip_mode not in (ref.SKIP_ZERO, ref.SKIP_SCALED_IDENTITY):
        raise ValueError(f"zaya::{op}: `skip_mode` must be 0 (skipped tokens give 0) or 1 (they give w * x), "
                         f"got {skip_mode!r}")


def _validate_experts(*args):
    _validate_experts_args("moe_experts", *args)


def _validate_experts_bwd(grad_y, x, *rest):
    _validate_experts_args("moe_experts_backward", x, *rest)
    check.tensor("moe_experts_backward", "grad_y", grad_y, dtypes=check.FLOAT_DTYPES, shape=x.shape, device=x.device,
                 contiguous=True)


# ---------------------------------------------------------------- fake kernels (shapes only)
def _fake_dispatch(expert_index, num_experts, block_m):
    T = expert_index.shape[0]
    tiles = ref.num_tiles(T, num_experts, block_m)

    def new(n):
        return expert_index.new_empty(n, dtype=torch.int32)

    return new(num_experts + 1), new(num_experts + 2), new(T), new(T), new(tiles), new(tiles)


def _fake_experts(x, *rest):
    return torch.empty_like(x)


def _fake_experts_bwd(grad_y, x, gate_up, down, routing_weight, *rest):
    return torch.empty_like(x), torch.empty_like(gate_up), torch.empty_like(down), torch.empty_like(routing_weight)


# ---------------------------------------------------------------- Triton implementations
def _dispatch_outputs(expert_index, num_experts, block_m):
    T = expert_index.shape[0]
    tiles = ref.num_tiles(T, num_experts, block_m)

    def new(n):
        return torch.empty(n, dtype=torch.int32, device=expert_index.device)

    return new(num_experts + 1), new(num_experts + 2), new(T), new(T), new(tiles), new(tiles)


def _triton_dispatch(expert_index, num_experts, block_m):
    from zaya_kernels.triton import moe as tri

    outputs = _dispatch_outputs(expert_index, num_experts, block_m)
    tri.moe_dispatch(expert_index, num_experts, block_m, *outputs)
    return outputs


def _hip_dispatch(expert_index, num_experts, block_m):
    from zaya_kernels import _C

    outputs = _dispatch_outputs(expert_index, num_experts, block_m)
    _C.moe_dispatch(expert_index, num_experts, block_m, *outputs)
    return outputs


def _triton_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                    skip_mode):
    from zaya_kernels.triton import moe as tri

    y = torch.empty_like(x)
    tri.moe_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                    skip_mode, y)
    return y


def _triton_experts_bwd(grad_y, x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start,
                        block_m, skip_mode):
    from zaya_kernels.triton import moe as tri

    return tri.moe_experts_backward(grad_y, x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert,
                                    tile_start, block_m, skip_mode)


# ---------------------------------------------------------------- autograd
def _setup_experts(ctx, inputs, output):
    x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m, skip_mode = inputs
    ctx.save_for_backward(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start)
    ctx.block_m, ctx.skip_mode = block_m, skip_mode
    ctx.backend = _backend.requested_backend()  # backward runs outside any use_backend block: keep the choice


def _backward_experts(ctx, grad_y):
    saved = ctx.saved_tensors
    with _backend.use_backend(ctx.backend):
        grad_x, grad_gate_up, grad_down, grad_w = torch.ops.zaya.moe_experts_backward(
            grad_y.contiguous(), *saved, ctx.block_m, ctx.skip_mode)
    return grad_x, grad_gate_up, grad_down, grad_w, None, None, None, None, None, None


register_op("moe_dispatch", impls={"reference": ref.moe_dispatch, "triton": _triton_dispatch, "hip": _hip_dispatch},
            fake=_fake_dispatch, validate=_validate_dispatch, auto_order=("triton", "hip"))
register_op("moe_experts", impls={"reference": ref.moe_experts, "triton": _triton_experts},
            fake=_fake_experts, validate=_validate_experts, auto_order=("triton",),
            backward=_backward_experts, setup_context=_setup_experts)
register_op("moe_experts_backward", impls={"reference": ref.moe_experts_backward, "triton": _triton_experts_bwd},
            fake=_fake_experts_bwd, validate=_validate_experts_bwd, auto_order=("triton",))


# ---------------------------------------------------------------- typed wrappers
def moe_block_m(num_tokens: int, device: torch.device | str = "cpu") -> int:
    """BLOCK_M (rows per tile of the dispatch map) the tuned table gives `num_tokens` tokens on `device`."""
    from zaya_kernels.triton import moe as tri

    return tri.pick_block_m(num_tokens, tri.target_of(torch.device(device)))


def moe_dispatch(expert_index: torch.Tensor, num_experts: int, block_m: int | None = None):
    """Group tokens by expert for the grouped GEMMs, with no host synchronisation.

    Parameters
    ----------
    expert_index : [T] int32, values 0..num_experts (num_experts = the skip class), contiguous
    num_experts : int, E
    block_m : rows per tile, one of 16, 32, 64, 128, 256 (default: `moe_block_m(T, device)`)

    Returns
    -------
    counts : [E+1] int32, tokens per class (counts[E] = skipped tokens)
    offsets : [E+2] int32, exclusive prefix sum of counts (offsets[E] = routed tokens, offsets[E+1] = T)
    sorted_token_ids : [T] int32, token at each sorted position (stable sort by class, skipped tokens last)
    inverse : [T] int32, sorted position of each token
    tile_expert : [cdiv(T, block_m) + E] int32, class of each tile of block_m sorted rows (-1: unused tile)
    tile_start : [cdiv(T, block_m) + E] int32, first sorted position of each tile (0: unused tile)

    Raises
    ------
    ValueError for an index outside 0..E. That check reads the values (one device-to-host copy on a GPU); it is
    skipped while a CUDA graph is captured and when the environment sets ZAYA_KERNELS_MOE_TRUST_INDEX=1; an
    out-of-range index that reaches the kernels unchecked gives undefined dispatch results.
    """
    if block_m is None:
        block_m = moe_block_m(expert_index.shape[0], expert_index.device)
    return torch.ops.zaya.moe_dispatch(expert_index, num_experts, block_m)


def moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_index: torch.Tensor,
        routing_weight: torch.Tensor, skip_mode: int = 0, block_m: int | None = None) -> torch.Tensor:
    """ZAYA's top-1 expert layer: y_t = w_t * down[e] (SiLU(gate_up[e, :I] x_t) * gate_up[e, I:] x_t), e = e*_t.

    Skipped tokens (e*_t = E) give 0 (skip_mode 0, transformers) or w_t * x_t (skip_mode 1, older Zyphra code).
    Differentiable with respect to x, gate_up, down and routing_weight.

    Parameters
    ----------
    x : [..., H] float32 / float16 / bfloat16 (dtype A), contiguous
    gate_up : [E, 2I, H] dtype A (rows 0..I-1 gate, I..2I-1 up), contiguous
    down : [E, H, I] dtype A, contiguous
    expert_index : [...] int32, values 0..E (E = skip)
    routing_weight : [...] any float dtype (the router's fp32 probability p[e*])
    skip_mode : 0 or 1
    block_m : dispatch tile rows (default: the tuned table's choice for T on this device)

    Returns
    -------
    y : [..., H] dtype A
    """
    check.tensor("moe_experts", "x", x, contiguous=True)
    H = x.shape[-1]
    flat_x = x.reshape(-1, H)
    if block_m is None:
        block_m = moe_block_m(flat_x.shape[0], x.device)
    dispatch = torch.ops.zaya.moe_dispatch(expert_index.reshape(-1), gate_up.shape[0], block_m)
    counts, offsets, sorted_token_ids, inverse, tile_expert, tile_start = dispatch
    y = torch.ops.zaya.moe_experts(flat_x, gate_up, down, routing_weight.reshape(-1), sorted_token_ids, offsets,
                                   tile_expert, tile_start, block_m, skip_mode)
    return y.view(x.shape)
