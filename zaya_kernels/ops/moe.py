"""Top-1 MoE ops (DESIGN.md 1.4): registration, validation, fake kernels, autograd and typed wrappers.

Ops (schemas in csrc/zaya_ops.cpp):
  zaya::moe_dispatch(expert_index, num_experts, block_m)
      -> (counts, offsets, sorted_token_ids, inverse, tile_expert, tile_start)
  zaya::moe_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                    skip_mode) -> y
  zaya::moe_experts_by_token(x, gate_up, down, expert_index, routing_weight, skip_mode) -> y
      (the same y for a few tokens, decode, without a dispatch; inference only)
  zaya::moe_experts_backward(grad_y, <the moe_experts arguments>) -> (grad_x, grad_gate_up, grad_down, grad_weight)
  zaya::moe_permute_rows(x, sorted_token_ids, num_rows) -> rows
  zaya::moe_unpermute_rows(rows, sorted_token_ids, x, routing_weight, skip_mode) -> y
  zaya::moe_unpermute_rows_backward(grad_y, sorted_token_ids, x, routing_weight, num_rows, skip_mode)
      -> (grad_rows, grad_x, grad_routing_weight)
Backends: reference (zaya_kernels.reference.moe: vectorised dispatch, per-expert loops of torch matmuls that read
the offsets on the host) and triton (zaya_kernels.triton.moe: dispatch kernels, grouped GEMMs forward and backward,
no host synchronisation); moe_dispatch also has hip (kernels/moe.cuh via csrc/moe.cu: one block, for small T; runs
when asked for, `auto` picks triton). Autograd calls moe_experts_backward with the backend that ran the forward.
The row gather / scatter-back of expert parallelism (moe_permute_rows, moe_unpermute_rows; zaya_kernels.distributed)
have reference, triton and hip (kernels/moe.cuh via csrc/moe.cu, available when the extension was built with GPU
kernels; `auto` prefers it) backends; each one's backward is the other (plus the skip_mode 1 terms of the scatter's
backward).

`zaya_kernels.ops.moe(x, gate_up, down, expert_index, routing_weight, skip_mode)` is the whole MoE expert part:
dispatch with the BLOCK_M of the tuned table for this T and device, then the experts; or, for at most
BY_TOKEN_MAX_TOKENS tokens when no gradient is wanted (decode), moe_experts_by_token: two launches instead of
three (on the Triton backend each token's programs read its expert index and stream that expert's weights).
"""
from __future__ import annotations

import contextlib
import os

import torch

from zaya_kernels import backend as _backend
from zaya_kernels.ops import _validate as check
from zaya_kernels.ops._registry import call, grad_wanted, register_op
from zaya_kernels.reference import moe as ref

_INDEX_DTYPES = (torch.int32,)
# Up to this many tokens (and no gradient wanted) `moe` runs moe_experts_by_token: decode, where the dispatch launch
# costs more than its tiles save (each token's programs then stream their own expert's weights, so tokens sharing an
# expert read it more than once, from cache). Its Triton kernels are GEMVs, one token per program.
BY_TOKEN_MAX_TOKENS = 4
BLOCK_M_CHOICES = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------- validation
def _skip_value_check(t, what) -> bool:
    """True where reading t's values back is not allowed or not needed: empty / meta / fake tensors, CUDA graph
    capture (no synchronisation there), ZAYA_KERNELS_MOE_TRUST_INDEX=1, and tensors one of our ops produced valid by
    construction and nobody modified since (check.remember_valid)."""
    if t.numel() == 0 or t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return True
    if check.known_valid(t, what) or os.environ.get("ZAYA_KERNELS_MOE_TRUST_INDEX", "0") == "1":
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_expert_values(expert_index, num_experts, op="moe_dispatch"):
    """Every index in 0..num_experts. Reads the values (one device->host copy on a GPU), except as
    `_skip_value_check` says (e.g. the unmodified expert index the `zaya_router` wrapper returned)."""
    if _skip_value_check(expert_index, ("expert_index", num_experts)):
        return
    low, high = torch.stack([expert_index.min(), expert_index.max()]).tolist()  # one device->host copy
    if low < 0:
        raise ValueError(f"zaya::{op}: `expert_index` has a negative value ({low}); expected 0..{num_experts} "
                         f"({num_experts} = skip)")
    if high > num_experts:
        raise ValueError(f"zaya::{op}: `expert_index` has value {high} > num_experts = {num_experts} "
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


def _validate_expert_weights(op, x, gate_up, down, routing_weight, skip_mode) -> int:
    """x [T, H], gate_up [E, 2I, H], down [E, H, I], routing_weight [T], skip_mode; returns E."""
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
    if skip_mode not in (ref.SKIP_ZERO, ref.SKIP_SCALED_IDENTITY):
        raise ValueError(f"zaya::{op}: `skip_mode` must be 0 (skipped tokens give 0) or 1 (they give w * x), "
                         f"got {skip_mode!r}")
    return E


def _validate_experts_args(op, x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start,
                           block_m, skip_mode):
    E = _validate_expert_weights(op, x, gate_up, down, routing_weight, skip_mode)
    T, dev = x.shape[0], x.device
    _check_dispatch_args(op, E, block_m)
    tiles = ref.num_tiles(T, E, block_m)
    check.tensor(op, "sorted_token_ids", sorted_token_ids, dtypes=_INDEX_DTYPES, shape=(T,), device=dev,
                 contiguous=True)
    check.tensor(op, "offsets", offsets, dtypes=_INDEX_DTYPES, shape=(E + 2,), device=dev, contiguous=True)
    for name, t in (("tile_expert", tile_expert), ("tile_start", tile_start)):
        check.tensor(op, name, t, dtypes=_INDEX_DTYPES, shape=(tiles,), device=dev, contiguous=True)
    _check_dispatch_values(op, sorted_token_ids, offsets, tile_expert, tile_start, E, block_m)


def _check_dispatch_values(op, sorted_token_ids, offsets, tile_expert, tile_start, num_experts, block_m):
    """The dispatch arguments must be what `moe_dispatch` gives for some expert index: the kernels index x and y
    through them unchecked, so anything else could read or write out of bounds. Reads the values (one or two
    device->host copies on a GPU), except as `_skip_value_check` says: the outputs of zaya::moe_dispatch for this
    E and block_m, unmodified and from one call (the one that gave this sorted_token_ids), are not read again."""
    what = _dispatch_call(sorted_token_ids, num_experts, block_m)
    _check_permutation(op, sorted_token_ids)
    if all(_skip_value_check(t, what) for t in (offsets, tile_expert, tile_start)):
        return
    T = sorted_token_ids.shape[0]
    wide = offsets.long()
    expected_expert, expected_start = ref.tile_map(wide, T, block_m)
    offsets_ok, tiles_ok = torch.stack([
        (wide[0] == 0) & (wide[-1] == T) & (wide[1:] >= wide[:-1]).all(),
        (tile_expert.long() == expected_expert).all() & (tile_start.long() == expected_start).all(),
    ]).tolist()  # one device->host copy
    if not offsets_ok:
        raise ValueError(f"zaya::{op}: `offsets` must be the class offsets of moe_dispatch: non-decreasing, from 0 "
                         f"to T = {T}, got {offsets.tolist()}")
    if not tiles_ok:
        raise ValueError(f"zaya::{op}: `tile_expert` / `tile_start` are not the tile map of `offsets` for "
                         f"block_m = {block_m}; pass moe_dispatch's outputs unchanged, with the same block_m")


def _dispatch_call(sorted_token_ids, num_experts, block_m):
    """What a dispatch call's offsets and tile map are remembered valid for: E, block_m and that call's own
    sorted_token_ids (its identity and T), so outputs of two calls mixed together are checked, not trusted."""
    return ("dispatch", num_experts, block_m, sorted_token_ids.shape[0], id(check.root(sorted_token_ids)))


def _remember_dispatch(dispatch_impl):
    """Wrap a dispatch implementation: its outputs are valid by construction, so moe_experts and the row ops need not
    read them back (check.remember_valid: until modified)."""

    def dispatch(expert_index, num_experts, block_m):
        outputs = dispatch_impl(expert_index, num_experts, block_m)
        counts, offsets, sorted_token_ids, inverse, tile_expert, tile_start = outputs
        check.remember_valid(sorted_token_ids, "permutation")
        for t in (offsets, tile_expert, tile_start):
            check.remember_valid(t, _dispatch_call(sorted_token_ids, num_experts, block_m))
        return outputs

    return dispatch


def _validate_experts(*args):
    _validate_experts_args("moe_experts", *args)


def _validate_experts_by_token(x, gate_up, down, expert_index, routing_weight, skip_mode):
    op = "moe_experts_by_token"
    E = _validate_expert_weights(op, x, gate_up, down, routing_weight, skip_mode)
    check.tensor(op, "expert_index", expert_index, dtypes=_INDEX_DTYPES, shape=(x.shape[0],), device=x.device,
                 contiguous=True)
    _check_expert_values(expert_index, E, op)


def _validate_experts_bwd(grad_y, x, *rest):
    _validate_experts_args("moe_experts_backward", x, *rest)
    check.tensor("moe_experts_backward", "grad_y", grad_y, dtypes=check.FLOAT_DTYPES, shape=x.shape, device=x.device,
                 contiguous=True)


# ---------------------------------------------------------------- fake kernels (shapes only)
def _fake_dispatch(expert_index, num_experts, block_m):
    return ref.empty_dispatch(expert_index, num_experts, block_m)


def _fake_experts(x, *rest):
    return torch.empty_like(x)


def _fake_experts_bwd(grad_y, x, gate_up, down, routing_weight, *rest):
    return torch.empty_like(x), torch.empty_like(gate_up), torch.empty_like(down), torch.empty_like(routing_weight)


# ---------------------------------------------------------------- Triton implementations
def _triton_dispatch(expert_index, num_experts, block_m):
    from zaya_kernels.triton import moe as tri

    outputs = ref.empty_dispatch(expert_index, num_experts, block_m)
    tri.moe_dispatch(expert_index, num_experts, block_m, *outputs)
    return outputs


def _hip_dispatch(expert_index, num_experts, block_m):
    from zaya_kernels import _C

    outputs = ref.empty_dispatch(expert_index, num_experts, block_m)
    _C.moe_dispatch(expert_index, num_experts, block_m, *outputs)
    return outputs


def _triton_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                    skip_mode):
    from zaya_kernels.triton import moe as tri

    y = torch.empty_like(x)
    tri.moe_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                    skip_mode, y)
    return y


def _triton_experts_by_token(x, gate_up, down, expert_index, routing_weight, skip_mode):
    from zaya_kernels.triton import moe as tri

    y = torch.empty_like(x)
    tri.moe_experts_by_token(x, gate_up, down, expert_index, routing_weight, skip_mode, y)
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


register_op("moe_dispatch", impls={name: _remember_dispatch(impl) for name, impl in
                                   (("reference", ref.moe_dispatch), ("triton", _triton_dispatch), ("hip", _hip_dispatch))},
            fake=_fake_dispatch, validate=_validate_dispatch, auto_order=("triton", "hip"))
register_op("moe_experts", impls={"reference": ref.moe_experts, "triton": _triton_experts},
            fake=_fake_experts, validate=_validate_experts, auto_order=("triton",),
            backward=_backward_experts, setup_context=_setup_experts)
register_op("moe_experts_by_token", impls={"reference": ref.moe_experts_by_token, "triton": _triton_experts_by_token},
            fake=_fake_experts, validate=_validate_experts_by_token, auto_order=("triton",))
register_op("moe_experts_backward", impls={"reference": ref.moe_experts_backward, "triton": _triton_experts_bwd},
            fake=_fake_experts_bwd, validate=_validate_experts_bwd, auto_order=("triton",))


# ---------------------------------------------------------------- row gather / scatter-back (expert parallelism)
_ROW_DTYPES = check.FLOAT_DTYPES + (torch.int32,)


def _check_permutation(op, sorted_token_ids):
    """sorted_token_ids must be a permutation of 0..T-1 (every token once: the scatter writes each row of y exactly
    once). Reads the values (one device->host copy on a GPU), except as `_skip_value_check` says (e.g. an unmodified
    permutation `moe_dispatch` returned)."""
    T = sorted_token_ids.shape[0]
    if _skip_value_check(sorted_token_ids, "permutation"):
        return
    ids = sorted_token_ids.long()
    seen = torch.bincount(ids.clamp(0, T - 1), minlength=T)  # clamped: out-of-range values are reported below
    low, high, most = torch.stack([ids.min(), ids.max(), seen.max()]).tolist()  # one device->host copy
    if low < 0:
        raise ValueError(f"zaya::{op}: `sorted_token_ids` has a negative value ({low}): index out of range, expected a "
                         f"permutation of 0..{T - 1}")
    if high >= T:
        raise ValueError(f"zaya::{op}: `sorted_token_ids` has value {high} >= T = {T}: index out of range, expected a "
                         f"permutation of 0..{T - 1}")
    if most > 1:
        repeated = int((seen > 1).nonzero()[0, 0])
        raise ValueError(f"zaya::{op}: `sorted_token_ids` holds token {repeated} more than once; expected a "
                         f"permutation of 0..{T - 1} (the sorted_token_ids of moe_dispatch)")


def _check_num_rows(op, num_rows, T):
    if not isinstance(num_rows, (int, torch.SymInt)) or isinstance(num_rows, bool):
        raise TypeError(f"zaya::{op}: `num_rows` must be an int, got {type(num_rows).__name__}")
    if num_rows < 0 or num_rows > T:
        raise ValueError(f"zaya::{op}: `num_rows` = {num_rows} outside [0, T = {T}]")


def _check_skip_args(op, x, routing_weight, skip_mode, T, H, dtype, device):
    if skip_mode not in (ref.SKIP_ZERO, ref.SKIP_SCALED_IDENTITY):
        raise ValueError(f"zaya::{op}: `skip_mode` must be 0 (skipped tokens give 0) or 1 (they give w * x), "
                         f"got {skip_mode!r}")
    if skip_mode == ref.SKIP_SCALED_IDENTITY and (x is None or routing_weight is None):
        raise ValueError(f"zaya::{op}: skip_mode 1 (skipped tokens give w * x) needs `x` and `routing_weight`")
    if x is not None:
        check.tensor(op, "x", x, dtypes=(dtype,), shape=(T, H), device=device, contiguous=True)
    if routing_weight is not None:
        check.tensor(op, "routing_weight", routing_weight, dtypes=check.FLOAT_DTYPES, shape=(T,), device=device,
                     contiguous=True)


def _validate_permute(x, sorted_token_ids, num_rows):
    op = "moe_permute_rows"
    check.tensor(op, "x", x, ndim=2, dtypes=_ROW_DTYPES, contiguous=True)
    T = x.shape[0]
    check.tensor(op, "sorted_token_ids", sorted_token_ids, dtypes=_INDEX_DTYPES, shape=(T,), device=x.device,
                 contiguous=True)
    _check_num_rows(op, num_rows, T)
    _check_permutation(op, sorted_token_ids)


def _validate_unpermute(rows, sorted_token_ids, x, routing_weight, skip_mode):
    op = "moe_unpermute_rows"
    check.tensor(op, "rows", rows, ndim=2, dtypes=check.FLOAT_DTYPES, contiguous=True)
    check.tensor(op, "sorted_token_ids", sorted_token_ids, ndim=1, dtypes=_INDEX_DTYPES, device=rows.device,
                 contiguous=True)
    N, H = rows.shape
    T = sorted_token_ids.shape[0]
    if N > T:
        raise ValueError(f"zaya::{op}: `rows` has {N} rows but `sorted_token_ids` only {T} tokens (rows must be "
                         f"[N, H] with N <= T)")
    _check_skip_args(op, x, routing_weight, skip_mode, T, H, rows.dtype, rows.device)
    _check_permutation(op, sorted_token_ids)


def _validate_unpermute_bwd(grad_y, sorted_token_ids, x, routing_weight, num_rows, skip_mode):
    op = "moe_unpermute_rows_backward"
    check.tensor(op, "grad_y", grad_y, ndim=2, dtypes=check.FLOAT_DTYPES, contiguous=True)
    T, H = grad_y.shape
    check.tensor(op, "sorted_token_ids", sorted_token_ids, dtypes=_INDEX_DTYPES, shape=(T,), device=grad_y.device,
                 contiguous=True)
    _check_num_rows(op, num_rows, T)
    _check_skip_args(op, x, routing_weight, skip_mode, T, H, grad_y.dtype, grad_y.device)
    _check_permutation(op, sorted_token_ids)


def _fake_permute(x, sorted_token_ids, num_rows):
    return x.new_empty(num_rows, x.shape[1])


def _fake_unpermute(rows, sorted_token_ids, x, routing_weight, skip_mode):
    return rows.new_empty(sorted_token_ids.shape[0], rows.shape[1])


def _fake_unpermute_bwd(grad_y, sorted_token_ids, x, routing_weight, num_rows, skip_mode):
    grad_rows = grad_y.new_empty(num_rows, grad_y.shape[1])
    if skip_mode != ref.SKIP_SCALED_IDENTITY:
        return grad_rows, None, None
    return grad_rows, torch.empty_like(x), torch.empty_like(routing_weight)


def _fp32(t):
    return None if t is None else t.float().contiguous()


def _triton_permute(x, sorted_token_ids, num_rows):
    from zaya_kernels.triton import moe as tri

    out = x.new_empty(num_rows, x.shape[1])
    tri.moe_permute_rows(x, sorted_token_ids, num_rows, out)
    return out


def _triton_unpermute(rows, sorted_token_ids, x, routing_weight, skip_mode):
    from zaya_kernels.triton import moe as tri

    y = rows.new_empty(sorted_token_ids.shape[0], rows.shape[1])
    tri.moe_unpermute_rows(rows, sorted_token_ids, x, routing_weight, skip_mode, y)
    return y


def _triton_unpermute_bwd(grad_y, sorted_token_ids, x, routing_weight, num_rows, skip_mode):
    from zaya_kernels.triton import moe as tri

    return tri.moe_unpermute_rows_backward(grad_y, sorted_token_ids, x, routing_weight, num_rows, skip_mode)


def _hip_permute(x, sorted_token_ids, num_rows):
    from zaya_kernels import _C

    out = x.new_empty(num_rows, x.shape[1])
    _C.moe_permute_rows(x, sorted_token_ids, num_rows, out)
    return out


def _hip_unpermute(rows, sorted_token_ids, x, routing_weight, skip_mode):
    from zaya_kernels import _C

    y = rows.new_empty(sorted_token_ids.shape[0], rows.shape[1])
    scaled = skip_mode == ref.SKIP_SCALED_IDENTITY
    _C.moe_unpermute_rows(rows, sorted_token_ids, x if scaled else None, _fp32(routing_weight) if scaled else None,
                          skip_mode, y)
    return y


def _hip_unpermute_bwd(grad_y, sorted_token_ids, x, routing_weight, num_rows, skip_mode):
    from zaya_kernels import _C

    grad_rows = grad_y.new_empty(num_rows, grad_y.shape[1])
    if skip_mode != ref.SKIP_SCALED_IDENTITY:
        _C.moe_unpermute_rows_backward(grad_y, sorted_token_ids, None, None, num_rows, skip_mode, grad_rows, None,
                                       None)
        return grad_rows, None, None
    grad_x = torch.empty_like(x)
    grad_w = torch.empty(grad_y.shape[0], dtype=torch.float32, device=grad_y.device)
    _C.moe_unpermute_rows_backward(grad_y, sorted_token_ids, x, _fp32(routing_weight), num_rows, skip_mode,
                                   grad_rows, grad_x, grad_w)
    return grad_rows, grad_x, grad_w.to(routing_weight.dtype)


def _setup_permute(ctx, inputs, output):
    x, sorted_token_ids, num_rows = inputs
    ctx.save_for_backward(sorted_token_ids)
    ctx.backend = _backend.requested_backend()


def _backward_permute(ctx, grad_rows):
    (sorted_token_ids,) = ctx.saved_tensors
    with _backend.use_backend(ctx.backend):  # the gather's adjoint: scatter into zeros
        grad_x = torch.ops.zaya.moe_unpermute_rows(grad_rows.contiguous(), sorted_token_ids, None, None,
                                                   ref.SKIP_ZERO)
    return grad_x, None, None


def _setup_unpermute(ctx, inputs, output):
    rows, sorted_token_ids, x, routing_weight, skip_mode = inputs
    ctx.save_for_backward(sorted_token_ids, x, routing_weight)
    ctx.num_rows, ctx.skip_mode = rows.shape[0], skip_mode
    ctx.backend = _backend.requested_backend()


def _backward_unpermute(ctx, grad_y):
    sorted_token_ids, x, routing_weight = ctx.saved_tensors
    if ctx.skip_mode != ref.SKIP_SCALED_IDENTITY:
        x = routing_weight = None  # they do not enter y
    with _backend.use_backend(ctx.backend):
        grad_rows, grad_x, grad_w = torch.ops.zaya.moe_unpermute_rows_backward(
            grad_y.contiguous(), sorted_token_ids, x, routing_weight, ctx.num_rows, ctx.skip_mode)
    return grad_rows, None, grad_x, grad_w, None


register_op("moe_permute_rows",
            impls={"reference": ref.moe_permute_rows, "triton": _triton_permute, "hip": _hip_permute},
            fake=_fake_permute, validate=_validate_permute, auto_order=("hip", "triton"),
            backward=_backward_permute, setup_context=_setup_permute)
register_op("moe_unpermute_rows",
            impls={"reference": ref.moe_unpermute_rows, "triton": _triton_unpermute, "hip": _hip_unpermute},
            fake=_fake_unpermute, validate=_validate_unpermute, auto_order=("hip", "triton"),
            backward=_backward_unpermute, setup_context=_setup_unpermute)
register_op("moe_unpermute_rows_backward",
            impls={"reference": ref.moe_unpermute_rows_backward, "triton": _triton_unpermute_bwd,
                   "hip": _hip_unpermute_bwd},
            fake=_fake_unpermute_bwd, validate=_validate_unpermute_bwd, auto_order=("hip", "triton"))


# ---------------------------------------------------------------- typed wrappers
def moe_block_m(num_tokens: int, device: torch.device | str = "cpu") -> int:
    """BLOCK_M (rows per tile of the dispatch map) the tuned table gives `num_tokens` tokens on `device`."""
    from zaya_kernels.triton import moe as tri

    return tri.pick_block_m(num_tokens, tri.device_target(torch.device(device)))


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
    return call(torch.ops.zaya.moe_dispatch, expert_index, num_experts, block_m)


def moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_index: torch.Tensor,
        routing_weight: torch.Tensor, skip_mode: int = 0, block_m: int | None = None, *,
        index_from_router: bool = False) -> torch.Tensor:
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
    block_m : dispatch tile rows (default: the tuned table's choice for T on this device; and with the default, at
        most BY_TOKEN_MAX_TOKENS tokens and no gradient wanted, `moe_experts_by_token` runs instead: no dispatch)
    index_from_router : the caller passes `zaya_router`'s expert index straight on, unmodified: its values are not
        read back to check them. An unmodified router index is recognised anyway, except an inference-mode tensor
        (no version counter to see a modification by), which is otherwise checked at every call: a device->host
        copy per layer on a GPU. The dispatch outputs this function makes for its own experts call are never read
        back.

    Returns
    -------
    y : [..., H] dtype A
    """
    check.tensor("moe_experts", "x", x, contiguous=True, min_ndim=1)
    for name, t in (("expert_index", expert_index), ("routing_weight", routing_weight)):
        check.tensor("moe_experts", name, t, shape=x.shape[:-1])  # one per token: x's leading shape
    H, E = x.shape[-1], gate_up.shape[0]
    flat_x = x.reshape(-1, H)
    compiling = torch.compiler.is_compiling()
    router_index = (check.vouched((expert_index, ("expert_index", E))) if index_from_router and not compiling
                    else contextlib.nullcontext())
    with router_index:
        if block_m is None and flat_x.shape[0] <= BY_TOKEN_MAX_TOKENS and not grad_wanted((x, gate_up, down,
                                                                                            routing_weight)):
            y = call(torch.ops.zaya.moe_experts_by_token, flat_x, gate_up, down, expert_index.reshape(-1),
                     routing_weight.reshape(-1), skip_mode)
            return y.view(x.shape)
        if block_m is None:
            block_m = moe_block_m(flat_x.shape[0], x.device)
        dispatch = call(torch.ops.zaya.moe_dispatch, expert_index.reshape(-1), E, block_m)
    counts, offsets, sorted_token_ids, inverse, tile_expert, tile_start = dispatch
    # (compiling: no identity to vouch by -- torch 2.11's dynamo cannot trace id() of a tensor it made)
    dispatch_outputs = (contextlib.nullcontext() if compiling else check.vouched(
        (sorted_token_ids, "permutation"),
        *((t, _dispatch_call(sorted_token_ids, E, block_m)) for t in (offsets, tile_expert, tile_start))))
    with dispatch_outputs:  # made just above: valid even where remember_valid cannot follow them (inference mode)
        y = call(torch.ops.zaya.moe_experts, flat_x, gate_up, down, routing_weight.reshape(-1), sorted_token_ids,
                 offsets, tile_expert, tile_start, block_m, skip_mode)
    return y.view(x.shape)


def moe_permute_rows(x: torch.Tensor, sorted_token_ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row gather before expert parallelism's all-to-all: rows[i] = x[sorted_token_ids[i]], i < num_rows.

    Differentiable with respect to x (the backward is `moe_unpermute_rows` with skip_mode 0: a scatter into zeros).
    Deterministic: a plain copy, one writer per output row.

    Parameters
    ----------
    x : [T, H] float32 / float16 / bfloat16 / int32 (int32 for expert ids, no gradient), contiguous
    sorted_token_ids : [T] int32, a permutation of 0..T-1 (`moe_dispatch`'s sorted_token_ids: tokens sorted by
        expert, skipped tokens last), contiguous, on x's device
    num_rows : int, 0 <= num_rows <= T, how many rows of the sorted order to gather (the routed tokens:
        offsets[E], or the sum of the per-rank send counts)

    Returns
    -------
    rows : [num_rows, H] x.dtype

    Raises
    ------
    ValueError / TypeError for a wrong dtype, shape or device, num_rows outside [0, T], or sorted_token_ids that is
    not a permutation of 0..T-1 (an index out of range or a repeated token; this check reads the values and is
    skipped under CUDA graph capture and with ZAYA_KERNELS_MOE_TRUST_INDEX=1).
    """
    return call(torch.ops.zaya.moe_permute_rows, x, sorted_token_ids, num_rows)


def moe_unpermute_rows(rows: torch.Tensor, sorted_token_ids: torch.Tensor, x: torch.Tensor | None = None,
                       routing_weight: torch.Tensor | None = None, skip_mode: int = 0) -> torch.Tensor:
    """Scatter-back after expert parallelism's all-to-all: y[sorted_token_ids[i]] = rows[i] for i < N, and the tokens
    at sorted positions N..T-1 (the skipped ones) get 0 (skip_mode 0) or w_t * x_t (skip_mode 1, fp32 product
    rounded once to rows.dtype). Every row of y is written once (top-1: no reduction, deterministic).

    Differentiable with respect to rows (the backward is the gather `moe_permute_rows` of grad_y) and, with
    skip_mode 1, x and routing_weight (grad_x = w grad_y and grad_w = <grad_y, x> on the skipped tokens, 0 elsewhere).

    Parameters
    ----------
    rows : [N, H] float32 / float16 / bfloat16 (dtype A), contiguous; N <= T
    sorted_token_ids : [T] int32, a permutation of 0..T-1 (`moe_dispatch`'s sorted_token_ids), contiguous
    x : [T, H] dtype A, contiguous; needed with skip_mode 1 (ignored, may be None, with skip_mode 0)
    routing_weight : [T] float32 / float16 / bfloat16, contiguous; needed with skip_mode 1 (ignored with 0)
    skip_mode : 0 or 1

    Returns
    -------
    y : [T, H] dtype A

    Raises
    ------
    ValueError / TypeError for wrong dtypes, shapes or devices, N > T, skip_mode 1 without x / routing_weight, or
    sorted_token_ids that is not a permutation of 0..T-1 (checked as in `moe_permute_rows`).
    """
    return call(torch.ops.zaya.moe_unpermute_rows, rows, sorted_token_ids, x, routing_weight, skip_mode)
