"""Triton kernels for CCA attention (DESIGN.md 1.1 step 9): varlen causal GQA prefill forward and backward, and
split-K decode over contiguous or paged KV caches. The math is in zaya_kernels.reference.attention.

Prefill forward (flash attention, online softmax). Program (query block, sequence, kv head x head chunk) owns
BLOCK_ROWS = BLOCK_M tokens x HEADS query heads of one kv group: row r is token m0 + r // HEADS and query head
kv_head * group + chunk * HEADS + r % HEADS. With HEADS >= group (ZAYA: group 4) every query head of the group is in
the tile, so each K/V tile is loaded once for the whole group and the QK^T and PV products run on BLOCK_ROWS rows.
The key loop is split in two: key blocks every row of the tile sees completely (no mask arithmetic), then the blocks
on the causal diagonal, the sequence end or the sliding window (masked).

Running maximum. CCA's logits are bounded (|q.k| <= |temp| D after the QK norm, so |scale * q.k| <= |temp| sqrt(D))
and a fixed offset could replace the running maximum, but only when |temp| sqrt(D) * log2(e) stays well below the
fp32 exp2 range (128) and the kernel cannot see temp or check that the caller applied the norm. These kernels keep
the running maximum (one extra rescale of the accumulator per key block). Their domain: scaled logits
|softmax_scale q.k| below 1e29 (the masks are penalties of -1e32 per step and the running maximum starts at -1e30,
see _mask_penalty). fp16 inputs always are (|q.k| <= D 65504^2), and so are CCA's normalised q and k; fp32 or bf16
inputs of magnitude ~1e14 and more, or an absurd softmax_scale, are outside it (the reference handles them).

Backward (deterministic: no atomics). `dq` kernel: the forward's program layout; computes delta = rowsum(dO * O)
for its rows (stored for the second kernel), recomputes P = exp(S - lse) per key block, dS = P (dO V^T - delta) and
accumulates dq = scale dS K. `dkdv` kernel: one program per (key block, sequence, kv head) walks every head chunk of
the group and every query block that sees its keys, accumulating dv = P^T dO and dk = scale dS^T Q over all the
group's query heads in registers: each dk/dv row has one writer.

Decode (flash-decoding). The split kernel: program (sequence, kv head x head chunk, split) takes every query head of
the group, times the Q query tokens of speculative decoding (Q = 1 normally), as rows of one tile (padded to at least
16 rows for the matrix instructions; ZAYA's group of 4 with Q = 4 fills 16 exactly), walks its split of the
sequence's cached positions in BLOCK_N tiles (paged caches: each position looks up its block in block_table, so any
block size 1..256 works) and writes a partial (normalised output, log2-sum-exp). The reduce kernel combines the
splits of each (sequence, query head). The number of splits comes from the cache capacity (or the caller's
max_seqlen hint), never from seq_lens values: no host synchronisation. The last split runs to seq_lens[b], so a
hint smaller than a real length costs speed, not correctness.

Masks and AMD registers. Query rows past the sequence or the group and key rows past the sequence read a real row
instead of using load masks, and causal / window / sequence-end masks are added to the scores as an integer-derived
penalty (_mask_penalty) instead of compare + select: both keep scalar-register pressure on gfx942/gfx950 below the
spill point (a [128, 64] tile of comparisons needs more than the 106 SGPRs). Tile loads carry 16-byte alignment
hints (the launchers guarantee them) so the ahead-of-time compile vectorises the loads like the JIT does.

Launch configurations come from zaya_kernels/configs/attention.json, per target (gfx942, gfx950, sm_90, and the
interpreter), per kernel, by the head-dimension block (16..256).
"""
from __future__ import annotations

import functools
import itertools
import os
import warnings

import torch
import triton
import triton.language as tl

from zaya_kernels.triton._aot import NO_PIPELINING, AotConfig, register_aot
from zaya_kernels.triton._target import ConfigTable, device_target

LOG2E = 1.4426950408889634
CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "attention.json")
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv", "decode")


# ==================================================================================================== prefill
@triton.jit
def _tile_rows(m0, chunk, kv_head, seq_len, group: tl.constexpr, num_q_heads: tl.constexpr,
               head_dim: tl.constexpr, HEADS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Rows of a query tile: (token position in the sequence, query head, row is real, row offset).

    Padding rows (past the sequence end, or past the group's heads) get the offset of a real row, so loads need no
    mask (fewer branches and scalar registers on AMD); their results are never stored, and the backward gives them
    zero weight through their lse (+inf) and delta (0).
    """
    rows = tl.arange(0, BLOCK_ROWS)
    token = m0 + rows // HEADS
    head_in_group = chunk * HEADS + rows % HEADS
    head = kv_head * group + head_in_group
    row_ok = (token < seq_len) & (head_in_group < group)
    safe_head = kv_head * group + tl.minimum(head_in_group, group - 1)
    row_offs = tl.minimum(token, seq_len - 1) * (num_q_heads * head_dim) + safe_head * head_dim
    return token, head, row_ok, row_offs


@triton.jit
def _load_rows(ptr, row_offs, head_dim: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr = True):
    """[len(row_offs), BLOCK_D] tile of rows at ptr + row_offs; columns past head_dim read as 0.

    ALIGNED: rows start 32-byte aligned (the launchers check the base pointers are 16-byte aligned; row strides are
    multiples of head_dim, a multiple of 16 elements): the hints let the compiler use wide vector loads even in
    the ahead-of-time compile, which knows nothing of the pointers. Without ALIGNED (a decode cache whose base is
    off a 16-byte boundary) no hint: narrower loads, still correct.
    """
    dims = tl.arange(0, BLOCK_D)
    ptrs = ptr + row_offs[:, None] + dims[None, :]
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [16, 16])
    if head_dim == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=dims[None, :] < head_dim, other=0.0)


@triton.jit
def _store_rows(ptr, row_offs, value, row_ok, head_dim: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    ptrs = tl.multiple_of(ptr + row_offs[:, None] + dims[None, :], [16, 16])  # see _load_rows
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (dims[None, :] < head_dim))


@triton.jit
def _mask_penalty(token, keys, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """fp32 [rows, keys]: 0 where the query token may see the key, <= -1e32 where it may not.

    Built from integer min() rather than comparisons + selects: on AMD each comparison of a wide tile lives in a
    pair of scalar registers, and a [128, 64] tile of them spills SGPRs. Every masked step is at least 1, so a
    penalised score is <= |score| - 1e32: below the running maximum's start value (-1e30) and exp2 of it is exactly
    0, even when a whole key block is invisible to a row. The steps are bounded by the tile sizes (the key loops
    start at the first block of the window), so the penalty stays finite; were it to overflow to -inf, exp2 would
    still give 0 because the running maximum is always finite.
    """
    if CAUSAL:
        # visible: key <= token (which also keeps the key inside the sequence for every real row)
        steps = tl.minimum(token[:, None] - keys[None, :], 0)
    else:
        steps = tl.minimum(seq_len - 1 - keys[None, :], 0) + tl.zeros_like(token)[:, None]
    if HAS_WINDOW:
        steps += tl.minimum(window - 1 - (token[:, None] - keys[None, :]), 0)
    return steps.to(tl.float32) * 1.0e32


@triton.jit
def _mask_penalty_t(keys, token, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """_mask_penalty transposed: fp32 [keys, rows] (the dk/dv kernel works on S^T)."""
    if CAUSAL:
        steps = tl.minimum(token[None, :] - keys[:, None], 0)
    else:
        steps = tl.minimum(seq_len - 1 - keys[:, None], 0) + tl.zeros_like(token)[None, :]
    if HAS_WINDOW:
        steps += tl.minimum(window - 1 - (token[None, :] - keys[:, None]), 0)
    return steps.to(tl.float32) * 1.0e32


@triton.jit
def _key_offsets(n_start, seq_len, MASKED: tl.constexpr, kv_stride: tl.constexpr, BLOCK_N: tl.constexpr):
    """(key positions, row offsets) of a key block; in a masked block positions past the end read the last key."""
    keys = n_start + tl.arange(0, BLOCK_N)
    if MASKED:
        return keys, tl.minimum(keys, seq_len - 1) * kv_stride
    else:
        return keys, keys * kv_stride


@triton.jit
def _dot(a, b, IEEE_FP32: tl.constexpr):
    """a @ b in fp32; fp32 operands use exact fp32 products (not TF32) so fp32 runs match the fp64 reference."""
    if IEEE_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_key_block(acc, row_sum, row_max, q, k_ptr, v_ptr, n_start, token, seq_len, window, scale_log2,
                   kv_stride: tl.constexpr, head_dim: tl.constexpr,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_FP32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One online-softmax step of the query tile against keys n_start .. n_start + BLOCK_N - 1."""
    keys, kv_offs = _key_offsets(n_start, seq_len, MASKED, kv_stride, BLOCK_N)
    k = _load_rows(k_ptr, kv_offs, head_dim, BLOCK_D)
    scores = _dot(q, tl.trans(k), IEEE_FP32) * scale_log2
    if MASKED:
        scores += _mask_penalty(token, keys, seq_len, window, CAUSAL, HAS_WINDOW)
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    rescale = tl.math.exp2(row_max - new_max)
    probs = tl.math.exp2(scores - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    v = _load_rows(v_ptr, kv_offs, head_dim, BLOCK_D)
    acc = acc * rescale[:, None] + _dot(probs.to(v.dtype), v, IEEE_FP32)
    return acc, row_sum, new_max


@triton.jit
def _query_key_range(m0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr):
    """(first key block start, end of the unmasked key blocks, end of all keys) for queries m0 .. m0 + BLOCK_M - 1."""
    if CAUSAL:
        key_end = tl.minimum(seq_len, m0 + BLOCK_M)
    else:
        key_end = seq_len
    if HAS_WINDOW:
        key_start = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_end = key_start  # the window edge moves with every row: mask every block
    else:
        key_start = 0
        if CAUSAL:
            full_end = (m0 // BLOCK_N) * BLOCK_N  # every row of the tile (token >= m0) sees keys < m0
        else:
            full_end = (seq_len // BLOCK_N) * BLOCK_N
    return key_start, full_end, key_end


@triton.jit
def _sequence_bounds(cu_seqlens_ptr, seq):
    seq_start = tl.load(cu_seqlens_ptr + seq)
    return seq_start, tl.load(cu_seqlens_ptr + seq + 1) - seq_start


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_ptr,
    total_tokens, scale_log2, window,
    num_q_heads: tl.constexpr, num_kv_heads: tl.constexpr, head_dim: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_FP32: tl.constexpr,
    HEADS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_ROWS // HEADS
    group: tl.constexpr = num_q_heads // num_kv_heads
    head_chunks: tl.constexpr = (group + HEADS - 1) // HEADS
    kv_stride: tl.constexpr = num_kv_heads * head_dim
    m0 = tl.program_id(0) * BLOCK_M
    seq_start, seq_len = _sequence_bounds(cu_seqlens_ptr, tl.program_id(1))
    if m0 >= seq_len:
        return
    kv_head = tl.program_id(2) // head_chunks
    chunk = tl.program_id(2) % head_chunks
    # 64-bit arithmetic once, on the scalar base pointers; offsets inside a sequence stay 32-bit.
    q_row0 = seq_start.to(tl.int64) * (num_q_heads * head_dim)
    kv_row0 = seq_start.to(tl.int64) * kv_stride + kv_head * head_dim
    token, head, row_ok, row_offs = _tile_rows(m0, chunk, kv_head, seq_len, group, num_q_heads, head_dim, HEADS,
                                               BLOCK_ROWS)
    q = _load_rows(q_ptr + q_row0, row_offs, head_dim, BLOCK_D)

    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    # A finite start: a row whose first key block is fully masked (window) gets exp2(-inf - start) = 0, not NaN.
    row_max = tl.full((BLOCK_ROWS,), -1.0e30, dtype=tl.float32)
    key_start, full_end, key_end = _query_key_range(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for n_start in range(key_start, full_end, BLOCK_N):
        acc, row_sum, row_max = _fwd_key_block(
            acc, row_sum, row_max, q, k_ptr + kv_row0, v_ptr + kv_row0, n_start, token, seq_len, window, scale_log2,
            kv_stride, head_dim, False, CAUSAL, HAS_WINDOW, IEEE_FP32, BLOCK_N, BLOCK_D)
    for n_start in range(full_end, key_end, BLOCK_N):
        acc, row_sum, row_max = _fwd_key_block(
            acc, row_sum, row_max, q, k_ptr + kv_row0, v_ptr + kv_row0, n_start, token, seq_len, window, scale_log2,
            kv_stride, head_dim, True, CAUSAL, HAS_WINDOW, IEEE_FP32, BLOCK_N, BLOCK_D)

    _store_rows(out_ptr + q_row0, row_offs, acc / row_sum[:, None], row_ok, head_dim, BLOCK_D)
    lse = (row_max + tl.math.log2(row_sum)) * 0.6931471805599453
    tl.store(lse_ptr + seq_start + head * total_tokens + token, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------- backward
@triton.jit
def _dq_key_block(dq, q, do, lse2, delta, k_ptr, v_ptr, n_start, token, seq_len, window, scale_log2,
                  kv_stride: tl.constexpr, head_dim: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_FP32: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq += dS K for one key block (dS = P (dO V^T - delta), P recomputed from the saved lse)."""
    keys, kv_offs = _key_offsets(n_start, seq_len, MASKED, kv_stride, BLOCK_N)
    k = _load_rows(k_ptr, kv_offs, head_dim, BLOCK_D)
    v = _load_rows(v_ptr, kv_offs, head_dim, BLOCK_D)
    scores = _dot(q, tl.trans(k), IEEE_FP32) * scale_log2
    if MASKED:
        scores += _mask_penalty(token, keys, seq_len, window, CAUSAL, HAS_WINDOW)
    probs = tl.math.exp2(scores - lse2[:, None])
    dscores = probs * (_dot(do, tl.trans(v), IEEE_FP32) - delta[:, None])
    return dq + _dot(dscores.to(k.dtype), k, IEEE_FP32)


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr,
    total_tokens, softmax_scale, scale_log2, window,
    num_q_heads: tl.constexpr, num_kv_heads: tl.constexpr, head_dim: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_FP32: tl.constexpr,
    HEADS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_ROWS // HEADS
    group: tl.constexpr = num_q_heads // num_kv_heads
    head_chunks: tl.constexpr = (group + HEADS - 1) // HEADS
    kv_stride: tl.constexpr = num_kv_heads * head_dim
    m0 = tl.program_id(0) * BLOCK_M
    seq_start, seq_len = _sequence_bounds(cu_seqlens_ptr, tl.program_id(1))
    if m0 >= seq_len:
        return
    kv_head = tl.program_id(2) // head_chunks
    chunk = tl.program_id(2) % head_chunks
    q_row0 = seq_start.to(tl.int64) * (num_q_heads * head_dim)
    kv_row0 = seq_start.to(tl.int64) * kv_stride + kv_head * head_dim
    token, head, row_ok, row_offs = _tile_rows(m0, chunk, kv_head, seq_len, group, num_q_heads, head_dim, HEADS,
                                               BLOCK_ROWS)
    q = _load_rows(q_ptr + q_row0, row_offs, head_dim, BLOCK_D)
    do = _load_rows(grad_out_ptr + q_row0, row_offs, head_dim, BLOCK_D)
    out = _load_rows(out_ptr + q_row0, row_offs, head_dim, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), axis=1)
    stat_offs = seq_start + head * total_tokens + token
    tl.store(delta_ptr + stat_offs, delta, mask=row_ok)
    lse2 = tl.load(lse_ptr + stat_offs, mask=row_ok, other=float("inf")) * 1.4426950408889634

    dq = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    key_start, full_end, key_end = _query_key_range(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for n_start in range(key_start, full_end, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse2, delta, k_ptr + kv_row0, v_ptr + kv_row0, n_start, token, seq_len, window,
                           scale_log2, kv_stride, head_dim, False, CAUSAL, HAS_WINDOW, IEEE_FP32, BLOCK_N, BLOCK_D)
    for n_start in range(full_end, key_end, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse2, delta, k_ptr + kv_row0, v_ptr + kv_row0, n_start, token, seq_len, window,
                           scale_log2, kv_stride, head_dim, True, CAUSAL, HAS_WINDOW, IEEE_FP32, BLOCK_N, BLOCK_D)
    _store_rows(dq_ptr + q_row0, row_offs, dq * softmax_scale, row_ok, head_dim, BLOCK_D)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, q_ptr, grad_out_ptr, lse_ptr, delta_ptr, m0, chunk, kv_head, keys, seq_len,
                      window, total_tokens, scale_log2,
                      group: tl.constexpr, num_q_heads: tl.constexpr, head_dim: tl.constexpr,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_FP32: tl.constexpr,
                      HEADS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q (unscaled) for one query tile against the program's key block.

    Padding rows load lse = +inf (P = 0) and delta = 0 (dS = 0): they add exactly nothing."""
    token, head, row_ok, row_offs = _tile_rows(m0, chunk, kv_head, seq_len, group, num_q_heads, head_dim, HEADS,
                                               BLOCK_ROWS)
    q = _load_rows(q_ptr, row_offs, head_dim, BLOCK_D)
    do = _load_rows(grad_out_ptr, row_offs, head_dim, BLOCK_D)
    stat_offs = head * total_tokens + token
    lse2 = tl.load(lse_ptr + stat_offs, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + stat_offs, mask=row_ok, other=0.0)
    scores_t = _dot(k, tl.trans(q), IEEE_FP32) * scale_log2  # [BLOCK_N, BLOCK_ROWS]
    if MASKED:
        scores_t += _mask_penalty_t(keys, token, seq_len, window, CAUSAL, HAS_WINDOW)
    probs_t = tl.math.exp2(scores_t - lse2[None, :])
    dscores_t = probs_t * (_dot(v, tl.trans(do), IEEE_FP32) - delta[None, :])
    dv += _dot(probs_t.to(do.dtype), do, IEEE_FP32)
    dk += _dot(dscores_t.to(q.dtype), q, IEEE_FP32)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr,
    total_tokens, softmax_scale, scale_log2, window,
    num_q_heads: tl.constexpr, num_kv_heads: tl.constexpr, head_dim: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_FP32: tl.constexpr,
    HEADS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_ROWS // HEADS
    group: tl.constexpr = num_q_heads // num_kv_heads
    head_chunks: tl.constexpr = (group + HEADS - 1) // HEADS
    kv_stride: tl.constexpr = num_kv_heads * head_dim
    n0 = tl.program_id(0) * BLOCK_N
    seq_start, seq_len = _sequence_bounds(cu_seqlens_ptr, tl.program_id(1))
    if n0 >= seq_len:
        return
    kv_head = tl.program_id(2)
    q_row0 = seq_start.to(tl.int64) * (num_q_heads * head_dim)
    kv_row0 = seq_start.to(tl.int64) * kv_stride + kv_head * head_dim
    keys, kv_offs = _key_offsets(n0, seq_len, True, kv_stride, BLOCK_N)
    k = _load_rows(k_ptr + kv_row0, kv_offs, head_dim, BLOCK_D)
    v = _load_rows(v_ptr + kv_row0, kv_offs, head_dim, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Query tiles that see these keys: causal from the tile holding token n0; a window ends them at
    # n0 + BLOCK_N - 1 + window - 1. Tiles on the diagonal are masked; later ones see every key of the block (key
    # rows past seq_len hold garbage there but are never stored).
    if CAUSAL:
        query_start = (n0 // BLOCK_M) * BLOCK_M
        masked_end = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, seq_len)
    else:
        query_start = 0
        masked_end = 0
    if HAS_WINDOW:
        masked_end = tl.minimum(seq_len, n0 + BLOCK_N - 1 + window)
    for chunk in range(0, head_chunks):
        for m0 in range(query_start, masked_end, BLOCK_M):
            dk, dv = _dkdv_query_block(
                dk, dv, k, v, q_ptr + q_row0, grad_out_ptr + q_row0, lse_ptr + seq_start, delta_ptr + seq_start, m0,
                chunk, kv_head, keys, seq_len, window, total_tokens, scale_log2, group, num_q_heads, head_dim,
                True, CAUSAL, HAS_WINDOW, IEEE_FP32, HEADS, BLOCK_ROWS, BLOCK_D)
        if not HAS_WINDOW:
            for m0 in range(masked_end, seq_len, BLOCK_M):
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, q_ptr + q_row0, grad_out_ptr + q_row0, lse_ptr + seq_start, delta_ptr + seq_start,
                    m0, chunk, kv_head, keys, seq_len, window, total_tokens, scale_log2, group, num_q_heads, head_dim,
                    False, CAUSAL, HAS_WINDOW, IEEE_FP32, HEADS, BLOCK_ROWS, BLOCK_D)
    key_ok = keys < seq_len
    _store_rows(dk_ptr + kv_row0, kv_offs, dk * softmax_scale, key_ok, head_dim, BLOCK_D)
    _store_rows(dv_ptr + kv_row0, kv_offs, dv, key_ok, head_dim, BLOCK_D)


# ==================================================================================================== decode
@triton.jit
def attention_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, seq_starts_ptr, block_table_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, window, num_splits, split_len, capacity,
    cache_stride_outer, cache_stride_pos, cache_stride_head, table_stride, block_size, num_blocks,
    num_q_heads: tl.constexpr, num_kv_heads: tl.constexpr, head_dim: tl.constexpr, num_queries: tl.constexpr,
    PAGED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_START: tl.constexpr, IEEE_FP32: tl.constexpr,
    HEADS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr,
    ALIGNED_CACHE: tl.constexpr = True,
):
    """Partial attention of one split of one sequence's cache, for the query heads of one kv group.

    Row r of the tile is query token r // HEADS (of num_queries, the last positions of the sequence: speculative
    decoding verifies several) and query head chunk * HEADS + r % HEADS of the group; ROWS >= 16 for the matrix
    instructions. part_out [B, Q, Hq, num_splits, D] fp32 (normalised within the split), part_lse [B, Q, Hq,
    num_splits] fp32 (log2). Positions are clamped to the cache capacity and block ids to the pool, so even
    unchecked bad seq_lens or block_table values cannot read outside the tensors. HAS_START: the sequence's keys
    begin at seq_starts[seq] (left padding); only the key range shrinks, as a query before it sees no key anyway.
    DIRECT (num_splits == 1, e.g. a large batch fills the device alone): the split is the whole sequence, so its
    normalised result is the output: part_out_ptr is out [B, Q, Hq, D] itself (the part row index is the out row
    when num_splits is 1), no log-sum-exp is stored and no reduce launch follows.
    """
    group: tl.constexpr = num_q_heads // num_kv_heads
    head_chunks: tl.constexpr = (group + HEADS - 1) // HEADS
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // head_chunks
    chunk = tl.program_id(1) % head_chunks
    split = tl.program_id(2)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), capacity)
    rows = tl.arange(0, ROWS)
    query = rows // HEADS
    head_in_group = chunk * HEADS + rows % HEADS
    head = kv_head * group + head_in_group
    row_ok = (head_in_group < group) & (query < num_queries)
    safe_head = kv_head * group + tl.minimum(head_in_group, group - 1)
    safe_query = tl.minimum(query, num_queries - 1)
    q_row = (seq * num_queries + safe_query) * num_q_heads + safe_head
    q = _load_rows(q_ptr, q_row * head_dim, head_dim, BLOCK_D)
    query_pos = seq_len - num_queries + query  # the position of each row's token: it sees keys <= query_pos

    pos_start = split * split_len
    pos_end = tl.where(split == num_splits - 1, seq_len, tl.minimum(pos_start + split_len, seq_len))
    if HAS_WINDOW:
        pos_start = tl.maximum(pos_start, seq_len - num_queries - window + 1)
    if HAS_START:
        pos_start = tl.maximum(pos_start, tl.load(seq_starts_ptr + seq))
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    row_sum = tl.zeros((ROWS,), dtype=tl.float32)
    row_max = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    if PAGED:
        k_base = k_cache_ptr + kv_head * cache_stride_head
        v_base = v_cache_ptr + kv_head * cache_stride_head
        table_row = block_table_ptr + seq.to(tl.int64) * table_stride
    else:
        k_base = k_cache_ptr + seq.to(tl.int64) * cache_stride_outer + kv_head * cache_stride_head
        v_base = v_cache_ptr + seq.to(tl.int64) * cache_stride_outer + kv_head * cache_stride_head
    for n_start in range(pos_start, pos_end, BLOCK_N):
        pos = n_start + tl.arange(0, BLOCK_N)
        # Positions past the split read its last key (no load mask) and, like keys after a row's own token or
        # before its window, get an exp2 weight of exactly 0 (see _mask_penalty).
        safe_pos = tl.minimum(pos, pos_end - 1)
        steps = tl.minimum(pos_end - 1 - pos, 0)[None, :] + tl.minimum(query_pos[:, None] - pos[None, :], 0)
        if HAS_WINDOW:
            steps += tl.minimum(window - 1 - (query_pos[:, None] - pos[None, :]), 0)
        if PAGED:
            block = tl.load(table_row + safe_pos // block_size)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1)
            offs = block.to(tl.int64) * cache_stride_outer + (safe_pos % block_size) * cache_stride_pos
        else:
            offs = safe_pos.to(tl.int64) * cache_stride_pos
        k = _load_rows(k_base, offs, head_dim, BLOCK_D, ALIGNED_CACHE)
        v = _load_rows(v_base, offs, head_dim, BLOCK_D, ALIGNED_CACHE)
        scores = _dot(q, tl.trans(k), IEEE_FP32) * scale_log2 + steps.to(tl.float32) * 1.0e32
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.math.exp2(row_max - new_max)
        probs = tl.math.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _dot(probs.to(v.dtype), v, IEEE_FP32)
        row_max = new_max
    # An empty split (past seq_len, or before the window) reports log2-sum-exp -inf: the reduce gives it weight 0.
    has_keys = row_sum > 0.0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    lse2 = tl.where(has_keys, row_max + tl.math.log2(safe_sum), float("-inf"))
    part_row = ((seq * num_queries + safe_query) * num_q_heads + head) * num_splits + split
    if not DIRECT:
        tl.store(part_lse_ptr + part_row, lse2, mask=row_ok)
    _store_rows(part_out_ptr, part_row * head_dim, acc / safe_sum[:, None], row_ok, head_dim, BLOCK_D)


@triton.jit
def attention_decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    num_q_heads: tl.constexpr, head_dim: tl.constexpr, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, h] = sum_s 2^(lse2_s - M) o_s / sum_s 2^(lse2_s - M), M = max_s lse2_s; no keys at all gives 0.

    The weights come from one vector load of the split statistics; the partial outputs are summed one split at a
    time (a [SPLITS, D] tile would hold 64 x 256 fp32 values per program)."""
    row = tl.program_id(0) * num_q_heads + tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    lse2 = tl.load(part_lse_ptr + row * num_splits + splits, mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse2, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.math.exp2(lse2 - top), axis=0)
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for split in range(0, num_splits):
        weight = tl.math.exp2(tl.load(part_lse_ptr + row * num_splits + split) - top)
        part = tl.load(part_out_ptr + (row * num_splits + split) * head_dim + dims, mask=dims < head_dim, other=0.0)
        acc += weight * part
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * head_dim + dims, out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


# ==================================================================================================== configurations
# The tuned launch configurations: {target: {kernel: {block_d: {...}}}} from configs/attention.json
load_config_table = ConfigTable(__name__, "targets")


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def pick_config(kernel: str, head_dim: int, device: torch.device) -> dict:
    """{block_rows | block_n | heads..., num_warps, num_stages} for `kernel` at this head dim on this device."""
    return dict(load_config_table()[device_target(device)][kernel][str(block_d_for(head_dim))])


def _tile_heads(group: int, block_rows: int) -> tuple[int, int]:
    """(HEADS per tile, head chunks per kv group): the whole group in one tile when it fits, with >= 1 token."""
    heads = min(triton.next_power_of_2(group), block_rows)
    return heads, triton.cdiv(group, heads)


def _ieee(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its data is 16-byte aligned (the kernels' vector-load hints assume it), else an aligned copy."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


# CUDA and HIP grids take 2^31 - 1 programs on axis 0 but only 65535 on axes 1 and 2. The prefill kernels put the
# sequence on axis 1 (the query block on axis 0 keeps a sequence's K/V tiles hot), so a batch of more sequences
# launches in chunks: each launch reads its own slice of cu_seqlens, whose values are the absolute token offsets the
# kernels index q, k, v and the statistics with. 65532, a multiple of 4: every slice of the int32 cu_seqlens stays
# 16-byte aligned, the specialisation the AOT report compiles.
MAX_SEQS_PER_LAUNCH = 65532


def _check_offsets(max_seqlen: int, total_tokens: int, num_q_heads: int, head_dim: int) -> None:
    """The prefill kernels index rows inside a sequence with 32-bit offsets (token * Hq * D; the sequence start is
    64-bit), and the [Hq, T] statistics with head * T + token: ZAYA1's 8 heads of 128 allow sequences of up to 2M
    tokens and batches of up to 268M."""
    if max_seqlen * num_q_heads * head_dim > 2**31 - 1 or num_q_heads * total_tokens > 2**31 - 1:
        raise ValueError(f"zaya::cca_attention: max_seqlen * Hq * D = {max_seqlen * num_q_heads * head_dim} and "
                         f"Hq * T = {num_q_heads * total_tokens} must stay below 2**31 (32-bit offsets); got "
                         f"max_seqlen = {max_seqlen}, T = {total_tokens} tokens")


def _sequence_chunks(cu_seqlens: torch.Tensor, batch: int):
    """(number of sequences, cu_seqlens from the chunk's first sequence on) per prefill launch."""
    for first in range(0, batch, MAX_SEQS_PER_LAUNCH):
        yield min(MAX_SEQS_PER_LAUNCH, batch - first), cu_seqlens[first:]


# ==================================================================================================== launchers
def attention_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window):
    """out [T, Hq, D] q.dtype, lse [Hq, T] fp32. q, k, v contiguous; cu_seqlens int32 [B+1] on q's device."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    out = torch.empty_like(q)
    lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    batch = cu_seqlens.shape[0] - 1
    if T == 0 or batch == 0 or max_seqlen <= 0:
        return out, lse
    _check_offsets(max_seqlen, T, Hq, D)
    cfg = pick_config("fwd", D, q.device)
    heads, chunks = _tile_heads(group, cfg["block_rows"])
    for seqs, cu_chunk in _sequence_chunks(cu_seqlens, batch):
        grid = (triton.cdiv(max_seqlen, cfg["block_rows"] // heads), seqs, Hkv * chunks)
        attention_fwd_kernel[grid](
            q, k, v, out, lse, cu_chunk, T, softmax_scale * LOG2E, max(window, 0),
            num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, CAUSAL=causal, HAS_WINDOW=window > 0, IEEE_FP32=_ieee(q),
            HEADS=heads, BLOCK_ROWS=cfg["block_rows"],
            BLOCK_N=cfg["block_n"], BLOCK_D=block_d_for(D), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, window):
    """(dq [T, Hq, D], dk, dv [T, Hkv, D]) in the input dtypes; every tensor contiguous."""
    grad_out, q, k, v, out = (_aligned(t) for t in (grad_out, q, k, v, out))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    batch = cu_seqlens.shape[0] - 1
    if T == 0 or batch == 0 or max_seqlen <= 0:
        return dq, dk, dv
    _check_offsets(max_seqlen, T, Hq, D)
    delta = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    common = dict(num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, CAUSAL=causal, HAS_WINDOW=window > 0,
                  IEEE_FP32=_ieee(q), BLOCK_D=block_d_for(D))
    cfg = pick_config("bwd_dq", D, q.device)
    heads, chunks = _tile_heads(group, cfg["block_rows"])
    for seqs, cu_chunk in _sequence_chunks(cu_seqlens, batch):
        grid = (triton.cdiv(max_seqlen, cfg["block_rows"] // heads), seqs, Hkv * chunks)
        attention_bwd_dq_kernel[grid](
            q, k, v, out, grad_out, lse, delta, dq, cu_chunk, T, softmax_scale,
            softmax_scale * LOG2E, max(window, 0), HEADS=heads, BLOCK_ROWS=cfg["block_rows"], BLOCK_N=cfg["block_n"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
    cfg = pick_config("bwd_dkdv", D, q.device)
    heads, chunks = _tile_heads(group, cfg["block_rows"])
    for seqs, cu_chunk in _sequence_chunks(cu_seqlens, batch):
        grid = (triton.cdiv(max_seqlen, cfg["block_n"]), seqs, Hkv)
        attention_bwd_dkdv_kernel[grid](
            q, k, v, grad_out, lse, delta, dk, dv, cu_chunk, T, softmax_scale,
            softmax_scale * LOG2E, max(window, 0), HEADS=heads, BLOCK_ROWS=cfg["block_rows"], BLOCK_N=cfg["block_n"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """How many decode programs keep the device busy: two per SM/CU (one in the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Up to 256 splits: a batch-1 decode at long context has ZAYA1's 2 kv heads x splits programs, and 64 splits would
# leave 128 of them for MI300X's 304 CUs (H200: 132 SMs); the partials stay small (Hq x splits x D fp32 per token).
MAX_SPLITS = 256
REDUCE_SPLITS = tuple(2**i for i in range(1, MAX_SPLITS.bit_length()))  # the reduce's SPLITS: next_pow2(num_splits)
# Elements of one decode query tile (rows = query tokens x query heads of a kv group, times BLOCK_D): 256 rows of
# head dim 128 take all 64 KB of a gfx942 workgroup's LDS (a bigger tile fails to launch there; sm_90 spills from
# 128 rows on). ZAYA1 decode: 16 rows (4 heads x Q <= 4).
MAX_DECODE_TILE = 256 * 128


def decode_splits(batch: int, kv_programs: int, capacity: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, split_len): enough splits that batch * kv_programs * splits fills the device, each split at
    least 4 key tiles long, computed from the cache capacity only (no device values read)."""
    capacity = max(capacity, 1)
    wanted = triton.cdiv(_target_programs(device), max(batch * kv_programs, 1))
    longest = triton.cdiv(capacity, 4 * block_n)
    splits = max(1, min(wanted, longest, MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    return triton.cdiv(capacity, split_len), split_len


def attention_decode(q, k_cache, v_cache, seq_lens, block_table, softmax_scale, window, max_seqlen=None,
                     seq_starts=None):
    """out like q. q [B, Hq, D] or [B, Q, Hq, D] (the last Q tokens of each sequence), contiguous; caches with
    16-element-aligned strides and a contiguous last dim; seq_lens int32 [B]; block_table int32 [B, max_blocks];
    seq_starts int32 [B] or None."""
    q = _aligned(q)
    aligned_cache = k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0
    if not aligned_cache:  # read in place without the wide-load hints: slower, never silent
        warnings.warn(f"zaya::cca_attention_decode (triton): k_cache / v_cache do not start on a 16-byte boundary "
                      f"(data_ptr % 16 = {k_cache.data_ptr() % 16} / {v_cache.data_ptr() % 16}), so the kernel reads "
                      f"them without wide vector loads (slower); allocate them aligned (e.g. not as a view at an odd "
                      f"element offset)", RuntimeWarning, stacklevel=2)
    B, Hq, D = q.shape[0], q.shape[-2], q.shape[-1]
    num_queries = q.shape[1] if q.dim() == 4 else 1
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    if B == 0 or num_queries == 0:
        return out
    cfg = pick_config("decode", D, q.device)
    heads = min(triton.next_power_of_2(group), cfg["max_heads"])
    rows = max(16, triton.next_power_of_2(num_queries) * heads)
    if rows * block_d_for(D) > MAX_DECODE_TILE:
        raise ValueError(f"zaya::cca_attention_decode: the Triton kernel's query tile (next_pow2(Q) x query heads per "
                         f"tile = {rows} rows of {block_d_for(D)} dims) must stay within {MAX_DECODE_TILE} elements; "
                         f"got Q = {num_queries} query tokens per sequence (q.shape[1]); use fewer per decode step")
    chunks = triton.cdiv(group, heads)
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    split_capacity = capacity if max_seqlen is None else min(capacity, max_seqlen)
    num_splits, split_len = decode_splits(B, Hkv * chunks, split_capacity, cfg["block_n"], q.device)
    direct = num_splits == 1  # one split per sequence: written straight into out, no reduce launch
    if direct:
        part_out, part_lse = out, seq_lens  # part_lse is not touched (DIRECT)
    else:
        part_out = torch.empty(B * num_queries * Hq, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B * num_queries * Hq, num_splits, dtype=torch.float32, device=q.device)
    grid = (B, Hkv * chunks, num_splits)
    attention_decode_split_kernel[grid](
        q, k_cache, v_cache, seq_lens, seq_lens if seq_starts is None else seq_starts,
        block_table if paged else seq_lens, part_out, part_lse,
        softmax_scale * LOG2E, max(window, 0), num_splits, split_len, capacity,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0) if paged else 0,
        k_cache.shape[1] if paged else 1, k_cache.shape[0],
        num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, num_queries=num_queries, PAGED=paged, HAS_WINDOW=window > 0,
        HAS_START=seq_starts is not None, IEEE_FP32=_ieee(q), HEADS=heads, ROWS=rows, BLOCK_N=cfg["block_n"],
        BLOCK_D=block_d_for(D), DIRECT=direct, ALIGNED_CACHE=aligned_cache, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    if direct:
        return out
    attention_decode_reduce_kernel[(B * num_queries, Hq)](
        part_out, part_lse, out, num_splits, num_q_heads=Hq, head_dim=D, SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_D=block_d_for(D), num_warps=1, num_stages=NO_PIPELINING)
    return out


# ==================================================================================================== AOT registry
_PREFILL_SIGNATURE_HEAD = {
    "fwd": ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "lse_ptr", "cu_seqlens_ptr"),
    "bwd_dq": ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "grad_out_ptr", "lse_ptr", "delta_ptr", "dq_ptr",
               "cu_seqlens_ptr"),
    "bwd_dkdv": ("q_ptr", "k_ptr", "v_ptr", "grad_out_ptr", "lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr",
                 "cu_seqlens_ptr"),
}
_FP32_POINTERS = ("lse_ptr", "delta_ptr")


def _prefill_signature(kernel: str) -> dict:
    sig = {}
    for name in _PREFILL_SIGNATURE_HEAD[kernel]:
        sig[name] = "*i32" if name == "cu_seqlens_ptr" else ("*fp32" if name in _FP32_POINTERS else "*bf16")
    sig["total_tokens"] = "i32"
    if kernel != "fwd":
        sig["softmax_scale"] = "fp32"
    sig["scale_log2"] = "fp32"
    sig["window"] = "i32"
    for name in ("num_q_heads", "num_kv_heads", "head_dim", "CAUSAL", "HAS_WINDOW", "IEEE_FP32", "HEADS",
                 "BLOCK_ROWS", "BLOCK_N", "BLOCK_D"):
        sig[name] = "constexpr"
    return sig


_DECODE_SIGNATURE = {
    "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "seq_lens_ptr": "*i32",
    "seq_starts_ptr": "*i32", "block_table_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
    "scale_log2": "fp32", "window": "i32", "num_splits": "i32", "split_len": "i32", "capacity": "i32",
    "cache_stride_outer": "i32", "cache_stride_pos": "i32", "cache_stride_head": "i32", "table_stride": "i32",
    "block_size": "i32", "num_blocks": "i32",
    "num_q_heads": "constexpr", "num_kv_heads": "constexpr", "head_dim": "constexpr", "num_queries": "constexpr",
    "PAGED": "constexpr", "HAS_WINDOW": "constexpr", "HAS_START": "constexpr", "IEEE_FP32": "constexpr",
    "HEADS": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "DIRECT": "constexpr",
    "ALIGNED_CACHE": "constexpr",
}
_REDUCE_SIGNATURE = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "num_splits": "i32",
                     "num_q_heads": "constexpr", "head_dim": "constexpr", "SPLITS": "constexpr",
                     "BLOCK_D": "constexpr"}

# The AOT report compiles the bf16 form of each shipped GPU configuration, with ZAYA1's group of 4 query heads per
# kv head (HEADS = 4), causal with and without a sliding window.
AOT_GROUP = 4


def _aot_configs() -> dict[str, list]:
    table = load_config_table()
    seen: dict[str, dict] = {name: {} for name in KERNELS + ("decode_reduce",)}
    for target in ("gfx942", "gfx950", "sm_90"):
        for kernel in KERNELS:
            for block_d, cfg in table[target][kernel].items():
                block_d = int(block_d)
                # The sliding-window variants add masks only: they are compiled at ZAYA1's head dim.
                for has_window in (False, True) if block_d == 128 else (False,):
                    if kernel == "decode":
                        heads = min(AOT_GROUP, cfg["max_heads"])
                        # speculative decoding (4 query tokens) at ZAYA1's head dim; left-padded starts (one
                        # more scalar load) only in the variant kernelize runs on transformers' contiguous cache
                        variants = itertools.product((1, 4) if block_d == 128 else (1,), (False, True), (False,))
                        if block_d == 128:
                            variants = [*variants, (1, False, True)]
                        # DIRECT (one split: the output written in place, bf16) for every variant; a cache off a
                        # 16-byte boundary (no wide-load hints) at ZAYA1's head dim, one query, no window
                        variants = [(*variant, direct, True) for variant in variants for direct in (False, True)]
                        if block_d == 128 and not has_window:
                            variants += [(1, paged, False, direct, False) for paged in (False, True)
                                         for direct in (False, True)]
                        for queries, paged, has_start, direct, aligned in variants:
                            rows = max(16, queries * heads)
                            consts = {"num_q_heads": 8, "num_kv_heads": 2, "head_dim": block_d,
                                      "num_queries": queries, "PAGED": paged, "HAS_WINDOW": has_window,
                                      "HAS_START": has_start, "IEEE_FP32": False, "HEADS": heads, "ROWS": rows,
                                      "BLOCK_N": cfg["block_n"], "BLOCK_D": block_d, "DIRECT": direct,
                                      "ALIGNED_CACHE": aligned}
                            label = (f"paged={int(paged)},window={int(has_window)},start={int(has_start)},"
                                     f"queries={queries},direct={int(direct)},"
                                     + ("" if aligned else "aligned_cache=0,") + f"HEADS={heads},"
                                     f"ROWS={rows},BLOCK_N={cfg['block_n']},BLOCK_D={block_d},"
                                     f"warps={cfg['num_warps']},stages={cfg['num_stages']}")
                            signature = dict(_DECODE_SIGNATURE)
                            if direct:
                                signature.update(part_out_ptr="*bf16", part_lse_ptr="*i32")
                            seen["decode"].setdefault(label, AotConfig(
                                label=label, signature=signature, constexprs=consts,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], matrix_expected=True))
                        continue
                    heads = min(AOT_GROUP, cfg["block_rows"])
                    consts = {"num_q_heads": 8, "num_kv_heads": 2, "head_dim": block_d,
                              "CAUSAL": True, "HAS_WINDOW": has_window, "IEEE_FP32": False, "HEADS": heads,
                              "BLOCK_ROWS": cfg["block_rows"], "BLOCK_N": cfg["block_n"], "BLOCK_D": block_d}
                    label = (f"window={int(has_window)},HEADS={heads},BLOCK_ROWS={cfg['block_rows']},"
                             f"BLOCK_N={cfg['block_n']},BLOCK_D={block_d},warps={cfg['num_warps']},"
                             f"stages={cfg['num_stages']}")
                    seen[kernel].setdefault(label, AotConfig(
                        label=label, signature=_prefill_signature(kernel), constexprs=consts,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], matrix_expected=True))
        for block_d in table[target]["decode"]:
            for splits in REDUCE_SPLITS:
                label = f"SPLITS={splits},BLOCK_D={block_d}"
                seen["decode_reduce"].setdefault(label, AotConfig(
                    label=label, signature=dict(_REDUCE_SIGNATURE),
                    constexprs={"num_q_heads": 8, "head_dim": int(block_d), "SPLITS": splits,
                                "BLOCK_D": int(block_d)}, num_warps=1))
    return {name: list(configs.values()) for name, configs in seen.items()}


_KERNEL_FUNCTIONS = {"fwd": attention_fwd_kernel, "bwd_dq": attention_bwd_dq_kernel,
                     "bwd_dkdv": attention_bwd_dkdv_kernel, "decode": attention_decode_split_kernel,
                     "decode_reduce": attention_decode_reduce_kernel}
for _name, _configs in _aot_configs().items():
    register_aot(f"attention_{_name}", _KERNEL_FUNCTIONS[_name], _configs)
