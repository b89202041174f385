"""CCA attention ops (DESIGN.md 1.1 step 9): registration, validation, fake kernels, autograd and typed wrappers.

Ops (schemas in csrc/zaya_ops.cpp):
  zaya::cca_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale?, causal, window) -> (out, lse)
  zaya::cca_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale?, causal, window)
      -> (dq, dk, dv)                                                            (used by the autograd of the above)
  zaya::cca_attention_decode(q, k_cache, v_cache, seq_lens, block_table?, softmax_scale?, window, max_seqlen?,
                             seq_starts?) -> out
      (q [B, Hq, D], or [B, Q, Hq, D] for Q tokens per sequence: speculative decoding)
Backends: reference (zaya_kernels.reference.attention), triton (zaya_kernels.triton.attention).

Argument values (cu_seqlens, seq_lens, seq_starts, block_table contents) are checked whenever reading them is free: on CPU
tensors, and on GPU tensors only with ZAYA_KERNELS_CHECK_VALUES=1, because reading device values forces a host
synchronisation that the decode path must not have. Shapes, dtypes, devices and head counts are always checked.
"""
from __future__ import annotations

import math
import os

import torch

from zaya_kernels import backend as _backend
from zaya_kernels.ops import _validate as check
from zaya_kernels.ops._registry import call, register_op
from zaya_kernels.reference import attention as ref

_OP = "cca_attention"
_BWD = "cca_attention_backward"
_DECODE = "cca_attention_decode"
MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 256


# ---------------------------------------------------------------- validation
def _values_readable(t: torch.Tensor) -> bool:
    """Whether the contents of `t` may be read now without a device sync (or the user asked for the checks)."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t) or t.device.type == "meta":
        return False
    return t.device.type == "cpu" or os.environ.get("ZAYA_KERNELS_CHECK_VALUES", "0") == "1"


def _check_heads_and_dim(op, num_q_heads, num_kv_heads, head_dim, kv_name):
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"zaya::{op}: the query head count ({num_q_heads}) must be a multiple of the kv head count "
                         f"of `{kv_name}` ({num_kv_heads})")
    if head_dim <= 0 or head_dim % 16 != 0 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"zaya::{op}: `head_dim` (the last dimension of q) must be a positive multiple of 16 up to "
                         f"{MAX_HEAD_DIM}, got {head_dim}")


def _check_scale_and_window(op, softmax_scale, causal, window):
    if softmax_scale is not None and not (isinstance(softmax_scale, float) and math.isfinite(softmax_scale)):
        raise ValueError(f"zaya::{op}: `softmax_scale` must be a finite float or None, got {softmax_scale!r}")
    if not isinstance(window, int) or isinstance(window, bool):
        raise TypeError(f"zaya::{op}: `window` must be an int (<= 0: no sliding window), got {window!r}")
    if window > 0 and not causal:
        raise ValueError(f"zaya::{op}: a sliding `window` ({window}) needs causal=True")


def _validate_prefill_args(op, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window):
    check.tensor(op, "q", q, ndim=3, dtypes=check.FLOAT_DTYPES, contiguous=True)
    dev = q.device
    check.tensor(op, "k", k, ndim=3, dtypes=(q.dtype,), device=dev, contiguous=True)
    total, num_q_heads, head_dim = q.shape
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"zaya::{op}: `k` must have shape ({total}, num_kv_heads, {head_dim}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    check.tensor(op, "v", v, dtypes=(q.dtype,), shape=k.shape, device=dev, contiguous=True)
    _check_heads_and_dim(op, num_q_heads, k.shape[1], head_dim, "k")
    check.tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=dev, contiguous=True)
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"zaya::{op}: `cu_seqlens` must have B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"zaya::{op}: `max_seqlen` must be a non-negative int, got {max_seqlen!r}")
    _check_scale_and_window(op, softmax_scale, causal, window)
    if _values_readable(cu_seqlens):
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != total or any(n < 0 for n in lengths):
            raise ValueError(f"zaya::{op}: `cu_seqlens` must start at 0, never decrease and end at the token count "
                             f"{total}, got {bounds}")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(f"zaya::{op}: `max_seqlen` ({max_seqlen}) is smaller than the longest sequence in "
                             f"cu_seqlens ({max(lengths)})")


def _validate_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, window=-1):
    _validate_prefill_args(_OP, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window)


def _validate_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, window=-1):
    _validate_prefill_args(_BWD, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window)
    check.tensor(_BWD, "grad_out", grad_out, dtypes=(q.dtype,), shape=q.shape, device=q.device, contiguous=True)
    check.tensor(_BWD, "out", out, dtypes=(q.dtype,), shape=q.shape, device=q.device, contiguous=True)
    check.tensor(_BWD, "lse", lse, dtypes=(torch.float32,), shape=(q.shape[1], q.shape[0]), device=q.device,
                 contiguous=True)


def _validate_decode(q, k_cache, v_cache, seq_lens, block_table=None, softmax_scale=None, window=-1,
                     max_seqlen=None, seq_starts=None):
    op = _DECODE
    check.tensor(op, "q", q, dtypes=check.FLOAT_DTYPES, contiguous=True)
    if q.dim() not in (3, 4):
        raise ValueError(f"zaya::{op}: `q` must be [B, Hq, D] or [B, Q, Hq, D], got shape {tuple(q.shape)}")
    dev = q.device
    batch, num_q_heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    check.tensor(op, "k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    check.tensor(op, "v_cache", v_cache, dtypes=(q.dtype,), shape=k_cache.shape, device=dev)
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"zaya::{op}: the last dimension of `k_cache` ({k_cache.shape[3]}) must equal q's head_dim "
                         f"({head_dim})")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(3) != 1:
            raise ValueError(f"zaya::{op}: `{name}` must be contiguous in its last (head_dim) dimension; got strides "
                             f"{cache.stride()}")
    if any(stride % 16 for stride in k_cache.stride()[:3]):
        raise ValueError(f"zaya::{op}: the strides of `k_cache` in its first three dimensions must be multiples of "
                         f"16 elements (rows of head_dim), got {k_cache.stride()}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"zaya::{op}: `k_cache` and `v_cache` must have the same strides, got {k_cache.stride()} "
                         f"and {v_cache.stride()}")
    _check_heads_and_dim(op, num_q_heads, k_cache.shape[2], head_dim, "k_cache")
    check.tensor(op, "seq_lens", seq_lens, dtypes=(torch.int32,), shape=(batch,), device=dev, contiguous=True)
    if seq_starts is not None:
        check.tensor(op, "seq_starts", seq_starts, dtypes=(torch.int32,), shape=(batch,), device=dev,
                     contiguous=True)
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"zaya::{op}: a contiguous `k_cache` [B, S_max, Hkv, D] must have B = {batch} (q's "
                             f"batch), got shape {tuple(k_cache.shape)}")
        capacity = k_cache.shape[1]
    else:
        check.tensor(op, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev)
        if block_table.shape[0] != batch:
            raise ValueError(f"zaya::{op}: `block_table` must have shape ({batch}, max_blocks), got "
                             f"{tuple(block_table.shape)}")
        if block_table.stride(1) != 1:
            raise ValueError(f"zaya::{op}: `block_table` rows must be contiguous; got strides {block_table.stride()}")
        block_size = k_cache.shape[1]
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"zaya::{op}: the paged cache block size (dimension 1 of `k_cache`) must be in "
                             f"1..{MAX_BLOCK_SIZE}, got {block_size}")
        capacity = block_table.shape[1] * block_size
    _check_scale_and_window(op, softmax_scale, True, window)
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"zaya::{op}: `max_seqlen` must be None or a non-negative int, got {max_seqlen!r}")
    if _values_readable(seq_lens):
        lengths = seq_lens.tolist()
        if lengths and (min(lengths) < 0 or max(lengths) > capacity):
            where = ("the cache length S_max" if block_table is None
                     else "max_blocks * block_size of `block_table` (the block table is too short)")
            raise ValueError(f"zaya::{op}: `seq_lens` must be in 0..{capacity} ({where}), got {lengths}")
        if seq_starts is not None and _values_readable(seq_starts):
            starts = seq_starts.tolist()
            if any(not 0 <= s <= n for s, n in zip(starts, lengths)):
                raise ValueError(f"zaya::{op}: `seq_starts` must be in 0..seq_lens[b] for every sequence, got "
                                 f"seq_starts {starts} for seq_lens {lengths}")
        if block_table is not None and batch > 0:
            used = [block_table[b, : -(-n // k_cache.shape[1])] for b, n in enumerate(lengths)]
            used = torch.cat(used) if used else block_table.new_empty(0)
            if used.numel() and (used.min().item() < 0 or used.max().item() >= k_cache.shape[0]):
                raise ValueError(f"zaya::{op}: `block_table` entries used by seq_lens must be in "
                                 f"0..{k_cache.shape[0] - 1} (num_blocks), got values {used.min().item()}.."
                                 f"{used.max().item()}")


# ---------------------------------------------------------------- fake kernels (shapes only)
def _fake_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, window=-1):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, window=-1):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fake_decode(q, k_cache, v_cache, seq_lens, block_table=None, softmax_scale=None, window=-1, max_seqlen=None,
                 seq_starts=None):
    return torch.empty_like(q)


# ---------------------------------------------------------------- Triton implementations
def _triton_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, window=-1):
    from zaya_kernels.triton import attention as tri

    scale = ref.default_scale(q.shape[2], softmax_scale)
    return tri.attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, causal, window)


def _triton_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, window=-1):
    from zaya_kernels.triton import attention as tri

    scale = ref.default_scale(q.shape[2], softmax_scale)
    return tri.attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, window)


def _triton_decode(q, k_cache, v_cache, seq_lens, block_table=None, softmax_scale=None, window=-1, max_seqlen=None,
                   seq_starts=None):
    from zaya_kernels.triton import attention as tri

    scale = ref.default_scale(q.shape[-1], softmax_scale)
    return tri.attention_decode(q, k_cache, v_cache, seq_lens, block_table, scale, window, max_seqlen, seq_starts)


# ---------------------------------------------------------------- autograd
def _setup_fwd(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window = inputs
    out, lse = output
    # lse is the softmax statistic the backward reuses, not a differentiable result.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.softmax_scale, ctx.causal, ctx.window = max_seqlen, softmax_scale, causal, window
    ctx.backend = _backend.requested_backend()  # backward runs outside any use_backend block: keep the choice


def _backward_fwd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    with _backend.use_backend(ctx.backend):
        dq, dk, dv = torch.ops.zaya.cca_attention_backward(
            grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale, ctx.causal, ctx.window)
    return dq, dk, dv, None, None, None, None, None


def _reference_decode(q, k_cache, v_cache, seq_lens, block_table=None, softmax_scale=None, window=-1,
                      max_seqlen=None, seq_starts=None):
    return ref.cca_attention_decode(q, k_cache, v_cache, seq_lens, block_table, softmax_scale, window, seq_starts)


register_op(_OP, impls={"reference": ref.cca_attention, "triton": _triton_fwd}, auto_order=("triton",),
            fake=_fake_fwd, validate=_validate_fwd, backward=_backward_fwd, setup_context=_setup_fwd)
register_op(_BWD, impls={"reference": ref.cca_attention_backward, "triton": _triton_bwd}, auto_order=("triton",),
            fake=_fake_bwd, validate=_validate_bwd)
register_op(_DECODE, impls={"reference": _reference_decode, "triton": _triton_decode}, auto_order=("triton",),
            fake=_fake_decode, validate=_validate_decode)


# ---------------------------------------------------------------- typed wrappers
def cca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int = -1,
    return_lse: bool = False,
):
    """Packed varlen GQA attention (CCA's attention step), differentiable in q, k, v.

    For each sequence b (tokens cu_seqlens[b] <= t < cu_seqlens[b+1], positions i, j from its start) and query head h
    (kv head h // (Hq / Hkv)):
        out_i = sum_j softmax_j(softmax_scale * q_i . k_j) v_j  over the visible j:
        j <= i when causal, and i - j < window when window > 0 (transformers' sliding window).

    Parameters
    ----------
    q : [T, Hq, D] float32 / float16 / bfloat16; D a multiple of 16 up to 256
    k, v : [T, Hkv, D] q's dtype; Hq a multiple of Hkv
    cu_seqlens : [B + 1] int32 on q's device, cumulative sequence lengths (0, ..., T)
    max_seqlen : int, at least the longest sequence (sizes the kernel grid: see Notes)
    softmax_scale : float or None (1 / sqrt(D))
    causal : bool
    window : int, sliding window length (<= 0: none; needs causal)
    return_lse : also return the log-sum-exp of the scaled scores (not differentiable, like flash-attn's
        softmax_lse: no gradient flows back through it, and it has requires_grad False)

    Returns
    -------
    out : [T, Hq, D] q's dtype (and lse : [Hq, T] float32 with return_lse)

    Raises
    ------
    ValueError
        on a bad shape, dtype, device, head count or argument; and where the values of cu_seqlens are read (CPU
        tensors, or GPU tensors with ZAYA_KERNELS_CHECK_VALUES=1): cu_seqlens not 0, non-decreasing, ..., T, or
        `max_seqlen` smaller than the longest sequence ("`max_seqlen` (m) is smaller than the longest sequence").

    Notes
    -----
    On a GPU the values of cu_seqlens are not read (no host synchronisation), so a too-small `max_seqlen` is not
    detected there: the Triton grid covers only the first max_seqlen tokens of each sequence, and the rows of
    `out` and `lse` past them are left unwritten (uninitialised memory, torch.empty), as are those rows of dq in
    the backward, while dk / dv miss their contributions. Pass the true maximum (or an upper bound), or set
    ZAYA_KERNELS_CHECK_VALUES=1 while debugging to have it checked.
    The Triton kernels (prefill and decode) take scaled logits |softmax_scale q.k| below 1e29: always so for fp16
    inputs and CCA's normalised q, k (see zaya_kernels/triton/attention.py); the reference takes any finite input.
    """
    out, lse = call(torch.ops.zaya.cca_attention, q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens,
                    int(max_seqlen), None if softmax_scale is None else float(softmax_scale),
                    bool(causal), int(window))
    return (out, lse) if return_lse else out


def cca_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window: int = -1,
    max_seqlen: int | None = None,
    seq_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the newest token(s) of each sequence over its KV cache (split-K flash decoding, no host sync).

    The token of sequence b sits at position seq_lens[b] - 1 and sees cached positions 0 <= p < seq_lens[b]
    (with window > 0: p > seq_lens[b] - 1 - window). With Q tokens per sequence (speculative decoding, their K/V
    already in the cache) token i sits at position seq_lens[b] - Q + i and sees the positions up to its own.
    With seq_starts, sequence b sees only positions p >= seq_starts[b]: a left-padded batch (transformers' layout,
    the pads first) keeps its pads in the cache and passes their count. A token that sees no position
    (seq_lens[b] = 0, a token at a negative position or before seq_starts[b]) gets a zero output.

    Parameters
    ----------
    q : [B, Hq, D] or [B, Q, Hq, D], float32 / float16 / bfloat16; D a multiple of 16 up to 256
    k_cache, v_cache : q's dtype, same shape and strides, last dimension contiguous; either
        contiguous [B, S_max, Hkv, D] (position p of sequence b at [b, p]) or
        paged [num_blocks, block_size, Hkv, D], block_size 1..256 (position p at
        [block_table[b, p // block_size], p % block_size], vLLM's layout)
    seq_lens : [B] int32, cached tokens per sequence including the new one (at most the cache capacity)
    block_table : [B, max_blocks] int32 for a paged cache, else None
    softmax_scale : float or None (1 / sqrt(D))
    window : int, sliding window length (<= 0: none)
    max_seqlen : int or None, an upper bound of seq_lens the caller knows: sizes the splits when the cache capacity
        is much larger than the sequences (a smaller value than a real length only costs speed)
    seq_starts : [B] int32 or None (0), the first visible position of each sequence, 0 <= seq_starts[b] <= seq_lens[b]

    Returns
    -------
    out : shaped like q ([B, Hq, D] or [B, Q, Hq, D]), q's dtype
    """
    return call(torch.ops.zaya.cca_attention_decode,
                q.contiguous(), k_cache, v_cache, seq_lens, block_table,
                None if softmax_scale is None else float(softmax_scale), int(window),
                None if max_seqlen is None else int(max_seqlen), seq_starts)
