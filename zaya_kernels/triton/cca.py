"""Triton kernels for ZAYA's CCA projection (DESIGN.md 1.1 steps 3-8): packed varlen prefill, decode, and the
prefill's backward (four kernels, described at the start of the backward section below).

Math and precision model: zaya_kernels.reference.cca (fp32 arithmetic; the depthwise output Y and the grouped conv
weights are rounded to the activation dtype A before the grouped conv, which accumulates in fp32).

cca_prepare_kernel (prefill) and cca_decode_kernel (decode), grid (cdiv(rows, BLOCK_T), n_q + n_kv): one program
owns BLOCK_T rows of one head (the conv groups are the heads, so a head's channels never mix with another's). Both
run the same @triton.jit parts: _value_rows (kv heads), then _project_head (the conv and epilogue below).
- Prefill: rows are packed tokens; a tile may span several sequences. Every token finds its sequence by a binary
  search in cu_seqlens, and its conv inputs X_{t-s} (s = 0 .. k0 + k1 - 2: the halo) come from the packed X when
  t - s is in the same sequence, else from that sequence's initial conv state, else 0.
- Decode: every row is a one-token sequence whose history is slot state_indices[row] of the state tensors; the
  program then stores Vd into the value-state elements it read (kv heads) and shifts its own head's channels of
  those conv-state slots, each after a barrier. No two programs touch one state element (rows must not share a
  slot). Rows with a negative or >= slots index get zero outputs and leave the states untouched. Decode batches
  share each weight tile across DECODE_BLOCK_ROWS rows, so weights are read once per 16 rows, not once per row.
  A kernel of its own: it carries none of the prefill's arguments (cu_seqlens, has_initial_state, ...).
The output dims of a head are computed in three column blocks: lo = [0, R/2) and hi = [R/2, R) of the rotary part
(R = rotary_dim) and the untouched rest [R, D), so NeoX rotate_half pairs lo with hi element by element (no
cross-lane shuffle, no duplicated work). For each chunk of BLOCK_I input channels and each grouped-conv tap j1 the
program builds the Y tile [BLOCK_T, BLOCK_I] from k0 shifted X tiles, rounds it to A, and accumulates
Z_block += Y @ W1[block, chunk, j1]^T with tl.dot (MFMA / wgmma for bf16; IEEE fp32 for fp32). Z starts as
b1 + the mean-coupling residual; the epilogue normalises, applies the key temperature and RoPE, and stores.
kv-head programs write the shifted values before the conv (what only they need is then not held across the conv
loop: on AMD the scalar register file is the limit of these kernels).
Paged KV cache (WRITE_CACHE, a constexpr: without it every cache argument is None and the kernels are the ones
without the feature): kv-head programs also store their k rows (epilogue) and v rows (_value_rows) into
k_cache / v_cache [num_blocks, block_size, n_kv, D] at slot_mapping[row] (block slot // CACHE_BLOCK, offset
slot % CACHE_BLOCK; element strides passed in, last dim contiguous). Rows with a negative or >= CACHE_SLOTS slot,
and padded decode rows, write nothing.

cca_final_states_kernel, grid (B, cdiv(C, BLOCK_C)): every sequence's final conv state (its last K raw X columns)
and value state after a prefill.

The exactly equivalent folded (k0 + k1 - 1)-tap conv of DESIGN.md 1.1 is not used: folding needs the weights
preprocessed outside the op (per call it would cost as much as it saves).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zaya_kernels.reference.cca import rope_inv_freq
from zaya_kernels.triton._aot import NO_PIPELINING, PIPELINED, AotConfig, register_aot


@triton.jit
def _coupling_residual(qk_ptr, row_offsets, row_mask, dims, dmask, head, NUM_Q, HEAD_DIM, GROUP):
    """Mean-coupling residual of head `head` for the rows [R, BLOCK_D]: (Q0[h] + K0[h // g]) / 2 for a q head,
    mean_m (Q0[g j + m] + K0[j]) / 2 for kv head j (a q head is a group of one: the same loop covers both)."""
    is_q = head < NUM_Q
    kv_head = tl.where(is_q, head // GROUP, head - NUM_Q)
    first_q = tl.where(is_q, head, kv_head * GROUP)
    count = tl.where(is_q, 1, GROUP)
    mask = row_mask[:, None] & dmask[None, :]
    k_part = tl.load(qk_ptr + row_offsets[:, None] + (NUM_Q + kv_head) * HEAD_DIM + dims[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    total = tl.zeros(k_part.shape, dtype=tl.float32)
    for m in range(0, count):
        q_part = tl.load(qk_ptr + row_offsets[:, None] + (first_q + m) * HEAD_DIM + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        total += (q_part + k_part) * 0.5
    return total / count


@triton.jit
def _conv_start(b1_ptr, qk_ptr, row_offsets, row_mask, dims, dmask, head, NUM_Q, HEAD_DIM, GROUP):
    """The terms of Q/K that do not need the convolution, for output dims `dims` of one head: b1 + coupling."""
    bias = tl.load(b1_ptr + head * HEAD_DIM + dims, mask=dmask, other=0.0).to(tl.float32)
    return bias[None, :] + _coupling_residual(qk_ptr, row_offsets, row_mask, dims, dmask, head, NUM_Q, HEAD_DIM, GROUP)


@triton.jit
def _dot_acc(a, b, acc, IEEE_DOT: tl.constexpr):
    """acc + a @ b: IEEE fp32 products for the fp32 path, the matrix units' default otherwise."""
    if IEEE_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _conv_tap(acc, y, w1_ptr, head, inputs, imask, outs, omask, j1, HEAD_DIM, K1: tl.constexpr,
              IEEE_DOT: tl.constexpr):
    """acc [R, O] += y [R, I] @ W1[head D + outs, inputs, j1]^T (the weight tile read transposed, [I, O])."""
    offs = (head * HEAD_DIM + outs[None, :]) * (HEAD_DIM * K1) + inputs[:, None] * K1 + j1  # int32: C D k1 < 2^31
    w = tl.load(w1_ptr + offs, mask=imask[:, None] & omask[None, :], other=0.0).to(y.dtype)
    return _dot_acc(y, w, acc, IEEE_DOT)


@triton.jit
def _conv_tap_pair(acc, y_older, y_newer, w1_ptr, head, i0, outs, omask, HEAD_DIM, BLOCK_I: tl.constexpr,
                   IEEE_DOT: tl.constexpr):
    """k1 = 2: acc [R, O] += y_older [R, I] @ W1[head D + outs, i0 + i, 0]^T + y_newer @ W1[.., 1]^T. Both taps of
    an output channel's BLOCK_I inputs are 2 BLOCK_I adjacent elements of W1 [C, D, 2], read as one [O, 2 I] tile
    (16-byte vector loads; a tile per tap reads every other element, 2 bytes at a time) and split in registers."""
    flat = i0 * 2 + tl.arange(0, 2 * BLOCK_I)  # input i, tap j at 2 i + j
    offs = (head * HEAD_DIM + outs[:, None]) * (HEAD_DIM * 2) + flat[None, :]  # int32: C D k1 < 2^31
    w = tl.load(w1_ptr + offs, mask=omask[:, None] & (flat < HEAD_DIM * 2)[None, :], other=0.0)
    w_older, w_newer = tl.split(tl.reshape(w, (outs.shape[0], BLOCK_I, 2)))
    acc = _dot_acc(y_older, tl.trans(w_older).to(y_older.dtype), acc, IEEE_DOT)
    return _dot_acc(y_newer, tl.trans(w_newer).to(y_newer.dtype), acc, IEEE_DOT)


@triton.jit
def _store_head(out, dims, dmask, rows, row_mask, out_ptr, row_stride):
    """Store out [R, O] at dims `dims` of rows `rows` of the head whose first element is at out_ptr."""
    offs = rows.to(tl.int64)[:, None] * row_stride + dims[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])


@triton.jit
def _sequence_of(cu_ptr, tokens, NUM_SEQS, SEARCH_STEPS):
    """Largest b with cu_seqlens[b] <= t for each token (vectorised binary search; empty sequences skipped)."""
    lo = tl.zeros(tokens.shape, dtype=tl.int32)
    hi = tl.zeros(tokens.shape, dtype=tl.int32) + NUM_SEQS
    for _ in range(0, SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        start = tl.load(cu_ptr + mid, mask=lo < hi, other=0)
        go_right = (start <= tokens) & (lo < hi)
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right | (lo >= hi), hi, mid - 1)
    return lo


@triton.jit
def _shifted_x(qk_ptr, conv_state_ptr, tokens, token_mask, seq, seq_start, has_state, channels, dmask, shift, C,
               QK_STRIDE, STATE_LEN: tl.constexpr, HAS_STATE: tl.constexpr):
    """X_{t - shift} [BLOCK_T, channels] for the given channels: packed X (row stride QK_STRIDE) inside the sequence,
    else the sequence's conv state column STATE_LEN - (seq_start - (t - shift)), else 0 (a fresh sequence)."""
    src = tokens - shift
    inside = src >= seq_start
    mask = token_mask[:, None] & dmask[None, :]
    x = tl.load(qk_ptr + src.to(tl.int64)[:, None] * QK_STRIDE + channels[None, :], mask=mask & inside[:, None],
                other=0.0).to(tl.float32)
    if HAS_STATE:
        col = STATE_LEN + src - seq_start
        from_state = mask & (~inside & has_state)[:, None]
        state = tl.load(conv_state_ptr + (seq.to(tl.int64)[:, None] * C + channels[None, :]) * STATE_LEN + col[:, None],
                        mask=from_state, other=0.0).to(tl.float32)
        x = tl.where(inside[:, None], x, state)
    return x


@triton.jit
def _cache_rows(slot_ptr, rows, row_valid, CACHE_SLOTS, CACHE_BLOCK, STRIDE_BLOCK, STRIDE_SLOT):
    """(int64 element offset of each row's cache slot [block, offset, 0, 0] in a [num_blocks, block_size, n_kv, D]
    cache, whether the row is written: row_valid and 0 <= slot_mapping[row] < CACHE_SLOTS). CACHE_SLOTS < 2^31
    (checked by the launcher), so the block / offset split is a 32-bit division (a 64-bit one costs registers)."""
    # the address of a masked row clamped to row 0: not the rows' own offsets, which the kernels already compute for
    # other loads (sharing them kept one live across the conv loop: ptxas spilled it on sm_90)
    slot = tl.load(slot_ptr + tl.where(row_valid, rows, 0), mask=row_valid, other=-1)
    keep = row_valid & (slot >= 0) & (slot < CACHE_SLOTS)
    slot = tl.where(keep, slot, 0).to(tl.int32)
    block = slot // CACHE_BLOCK
    return block.to(tl.int64) * STRIDE_BLOCK + (slot - block * CACHE_BLOCK).to(tl.int64) * STRIDE_SLOT, keep


@triton.jit
def _store_cache(out, dims, dmask, cache_rows, keep, cache_ptr):
    """Store out [R, O] at dims `dims` of the cache rows `cache_rows` (element offsets of one head) that `keep`."""
    offs = cache_rows[:, None] + dims[None, :]
    tl.store(cache_ptr + offs, out.to(cache_ptr.dtype.element_ty), mask=keep[:, None] & dmask[None, :])


@triton.jit
def _value_rows(vc_ptr, vd_ptr, value_state_ptr, v_ptr, head, tokens, token_mask, row_valid, seq, seq_start,
                has_state, slot_ptr, v_cache_ptr, CACHE_SLOTS, CACHE_BLOCK, V_STRIDE_BLOCK, V_STRIDE_SLOT,
                V_STRIDE_HEAD, VC_STRIDE, VD_STRIDE, NUM_Q, NUM_KV, HEAD_DIM, HAS_STATE: tl.constexpr,
                DECODE: tl.constexpr, WRITE_CACHE: tl.constexpr):
    """v rows [BLOCK_T, D] of kv head j = head - n_q. Flat value index f = j D + d (value_dim = n_kv D / 2):
    f < value_dim is Vc_t[f]; the rest is Vd_{t-1}[f - value_dim] of the previous token of the sequence, else of
    the sequence's value state seq, else 0. Rows that are not row_valid get zeros.
    DECODE (every row its own sequence, seq = its slot): the delayed part is the slot's value state, which the
    row's Vd_t then replaces, after a barrier (other threads of the program may still be reading it).
    v_current / v_delayed rows are VC_STRIDE / VD_STRIDE elements apart (row-strided views).
    WRITE_CACHE: the rows also go to v_cache at slot_mapping (valid rows with a slot in range only)."""
    value_dim = NUM_KV * HEAD_DIM // 2
    state_rows = seq.to(tl.int64)[:, None] * value_dim
    if WRITE_CACHE:
        cache_rows, cache_keep = _cache_rows(slot_ptr, tokens, row_valid, CACHE_SLOTS, CACHE_BLOCK, V_STRIDE_BLOCK,
                                             V_STRIDE_SLOT)
        cache_head = v_cache_ptr + (head - NUM_Q) * V_STRIDE_HEAD
    # 32 dims at a time: a [BLOCK_T, 128] tile can give each wave 8 whole rows, and every such row's masks and
    # offsets then take scalar registers of their own (past AMD's SGPR file); a [BLOCK_T, 32] one spreads the rows
    # over the lanes.
    for d0 in tl.static_range(0, HEAD_DIM, 32):
        dims = d0 + tl.arange(0, 32)
        flat = (head - NUM_Q) * HEAD_DIM + dims
        mask = token_mask[:, None] & (dims < HEAD_DIM)[None, :]
        is_current = flat < value_dim
        current = tl.load(vc_ptr + tokens.to(tl.int64)[:, None] * VC_STRIDE + flat[None, :],
                          mask=mask & is_current[None, :], other=0.0).to(tl.float32)
        delayed_col = flat - value_dim
        delayed_mask = mask & (~is_current)[None, :]
        state_offs = state_rows + delayed_col[None, :]
        if DECODE:
            from_state = delayed_mask & row_valid[:, None]
            delayed = tl.load(value_state_ptr + state_offs, mask=from_state, other=0.0).to(tl.float32)
            newest = tl.load(vd_ptr + tokens.to(tl.int64)[:, None] * VD_STRIDE + delayed_col[None, :],
                             mask=from_state, other=0.0)
        else:
            prev = tokens - 1
            prev_inside = prev >= seq_start
            delayed = tl.load(vd_ptr + prev.to(tl.int64)[:, None] * VD_STRIDE + delayed_col[None, :],
                              mask=delayed_mask & prev_inside[:, None], other=0.0).to(tl.float32)
            if HAS_STATE:
                from_state = delayed_mask & (~prev_inside & has_state)[:, None]
                state = tl.load(value_state_ptr + state_offs, mask=from_state, other=0.0).to(tl.float32)
                delayed = tl.where(prev_inside[:, None], delayed, state)
        value = tl.where(is_current[None, :] & row_valid[:, None], current, delayed)
        offs = tokens.to(tl.int64)[:, None] * (NUM_KV * HEAD_DIM) + flat[None, :]
        tl.store(v_ptr + offs, value.to(v_ptr.dtype.element_ty), mask=mask)
        if WRITE_CACHE:
            _store_cache(value, dims, dims < HEAD_DIM, cache_rows, cache_keep, cache_head)
        if DECODE:
            tl.debug_barrier()
            tl.store(value_state_ptr + state_offs, newest.to(value_state_ptr.dtype.element_ty), mask=from_state)


@triton.jit
def _conv_input(qk_ptr, w0_ptr, state_ptr, b0, tokens, token_mask, seq, seq_start, has_state, in_channels, imask,
                lag, C, QK_STRIDE, STATE_LEN, K0: tl.constexpr, HAS_STATE: tl.constexpr):
    """Y_{t - lag} [BLOCK_T, BLOCK_I] of the given input channels: the depthwise conv of the X halo (its bias b0
    included even before the sequence start), rounded to A like transformers' conv output."""
    act_dtype = qk_ptr.dtype.element_ty
    y = tl.zeros((tokens.shape[0], in_channels.shape[0]), dtype=tl.float32) + b0[None, :]
    for j0 in tl.static_range(K0):
        w0 = tl.load(w0_ptr + in_channels * K0 + j0, mask=imask, other=0.0).to(tl.float32)
        y += w0[None, :] * _shifted_x(qk_ptr, state_ptr, tokens, token_mask, seq, seq_start, has_state, in_channels,
                                      imask, lag + (K0 - 1 - j0), C, QK_STRIDE, STATE_LEN, HAS_STATE)
    return y.to(act_dtype)


@triton.jit
def _pre_norm_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, state_ptr, head, tokens, token_mask, seq, seq_start,
                   has_state, lo, lo_mask, rest, rest_mask, half, C, QK_STRIDE, NUM_Q, HEAD_DIM, GROUP, STATE_LEN,
                   K0: tl.constexpr, K1: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_I: tl.constexpr, IEEE_DOT: tl.constexpr):
    """U = b1 + coupling residual + sum_j1 Y_{t - (k1 - 1 - j1)} @ W1[head, :, :, j1]^T for BLOCK_T tokens of one
    head (the pre-norm q or k), in the column blocks lo [BLOCK_T, BLOCK_HALF], hi (= lo + half) and rest, zero
    outside their masks. Y comes from the X halo of _shifted_x (conv state row `seq`), rounded to A. The forward
    and the backward (which recomputes U) share this, so they see the same numbers. qk rows are QK_STRIDE apart
    (the backward passes C: it reads a contiguous copy)."""
    row_offsets = tokens.to(tl.int64) * QK_STRIDE
    u_lo = _conv_start(b1_ptr, qk_ptr, row_offsets, token_mask, lo, lo_mask, head, NUM_Q, HEAD_DIM, GROUP)
    u_hi = _conv_start(b1_ptr, qk_ptr, row_offsets, token_mask, lo + half, lo_mask, head, NUM_Q, HEAD_DIM, GROUP)
    u_rest = _conv_start(b1_ptr, qk_ptr, row_offsets, token_mask, rest, rest_mask, head, NUM_Q, HEAD_DIM, GROUP)
    for i0 in tl.range(0, HEAD_DIM, BLOCK_I, loop_unroll_factor=1):  # unrolling only costs scalar registers
        inputs = i0 + tl.arange(0, BLOCK_I)
        imask = inputs < HEAD_DIM
        in_channels = head * HEAD_DIM + inputs
        b0 = tl.load(b0_ptr + in_channels, mask=imask, other=0.0).to(tl.float32)
        if K1 == 2:  # ZAYA1: both taps' weights in one vector-loaded tile per column block
            y_older = _conv_input(qk_ptr, w0_ptr, state_ptr, b0, tokens, token_mask, seq, seq_start, has_state,
                                  in_channels, imask, 1, C, QK_STRIDE, STATE_LEN, K0, HAS_STATE)
            y_newer = _conv_input(qk_ptr, w0_ptr, state_ptr, b0, tokens, token_mask, seq, seq_start, has_state,
                                  in_channels, imask, 0, C, QK_STRIDE, STATE_LEN, K0, HAS_STATE)
            u_lo = _conv_tap_pair(u_lo, y_older, y_newer, w1_ptr, head, i0, lo, lo_mask, HEAD_DIM, BLOCK_I, IEEE_DOT)
            u_hi = _conv_tap_pair(u_hi, y_older, y_newer, w1_ptr, head, i0, lo + half, lo_mask, HEAD_DIM, BLOCK_I,
                                  IEEE_DOT)
            u_rest = _conv_tap_pair(u_rest, y_older, y_newer, w1_ptr, head, i0, rest, rest_mask, HEAD_DIM, BLOCK_I,
                                    IEEE_DOT)
        else:
            for j1 in tl.static_range(K1):
                y = _conv_input(qk_ptr, w0_ptr, state_ptr, b0, tokens, token_mask, seq, seq_start, has_state,
                                in_channels, imask, K1 - 1 - j1, C, QK_STRIDE, STATE_LEN, K0, HAS_STATE)
                u_lo = _conv_tap(u_lo, y, w1_ptr, head, inputs, imask, lo, lo_mask, j1, HEAD_DIM, K1, IEEE_DOT)
                u_hi = _conv_tap(u_hi, y, w1_ptr, head, inputs, imask, lo + half, lo_mask, j1, HEAD_DIM, K1,
                                 IEEE_DOT)
                u_rest = _conv_tap(u_rest, y, w1_ptr, head, inputs, imask, rest, rest_mask, j1, HEAD_DIM, K1,
                                   IEEE_DOT)
    u_lo = tl.where(lo_mask[None, :], u_lo, 0.0)
    u_hi = tl.where(lo_mask[None, :], u_hi, 0.0)
    u_rest = tl.where(rest_mask[None, :], u_rest, 0.0)
    return u_lo, u_hi, u_rest


@triton.jit
def _project_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, conv_state_ptr, temp_ptr, pos_ptr, inv_freq_ptr, q_ptr,
                  k_ptr, head, tokens, token_mask, row_valid, seq, seq_start, has_state, slot_ptr, k_cache_ptr,
                  CACHE_SLOTS, CACHE_BLOCK, K_STRIDE_BLOCK, K_STRIDE_SLOT, K_STRIDE_HEAD, QK_STRIDE, EPS: tl.constexpr,
                  HEAD_SCALE: tl.constexpr, NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                  ROTARY_DIM: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, HAS_STATE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                  IEEE_DOT: tl.constexpr, WRITE_CACHE: tl.constexpr):
    """Q rows (head < n_q, into q [T, n_q, D]) or K rows (into k [T, n_kv, D]) [BLOCK_T, D] of head `head`:
    Z = b1 + coupling residual + sum_j1 Y_{t - (k1 - 1 - j1)} @ W1[head, :, :, j1]^T, the Y computed from the X
    halo of _shifted_x (conv state row `seq`); then QK norm (keys times their temperature) and NeoX RoPE. Rows that
    are not row_valid get zeros. WRITE_CACHE: K rows also go to k_cache at slot_mapping (valid rows, slot in
    range)."""
    STATE_LEN: tl.constexpr = K0 + K1 - 2
    C: tl.constexpr = (NUM_Q + NUM_KV) * HEAD_DIM
    GROUP: tl.constexpr = NUM_Q // NUM_KV
    # Output dims in three column blocks: lo = [0, R/2) and hi = [R/2, R) of the rotary part (R = ROTARY_DIM), which
    # rotate_half pairs element by element, and the untouched rest [R, D). Each starts as b1 + coupling residual.
    half: tl.constexpr = ROTARY_DIM // 2
    lo = tl.arange(0, BLOCK_HALF)
    lo_mask = lo < half
    rest = ROTARY_DIM + tl.arange(0, BLOCK_REST)
    rest_mask = rest < HEAD_DIM
    z_lo, z_hi, z_rest = _pre_norm_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, conv_state_ptr, head, tokens,
                                        token_mask, seq, seq_start, has_state, lo, lo_mask, rest, rest_mask, half, C,
                                        QK_STRIDE, NUM_Q, HEAD_DIM, GROUP, STATE_LEN, K0, K1, HAS_STATE, BLOCK_T,
                                        BLOCK_I, IEEE_DOT)

    # QK norm (keys times their temperature), then NeoX RoPE: lo' = lo cos - hi sin, hi' = hi cos + lo sin.
    sum_sq = tl.sum(z_lo * z_lo, axis=1) + tl.sum(z_hi * z_hi, axis=1) + tl.sum(z_rest * z_rest, axis=1)
    scale = HEAD_SCALE / tl.maximum(tl.sqrt(sum_sq), EPS)
    if head >= NUM_Q:
        scale = scale * tl.load(temp_ptr + head - NUM_Q).to(tl.float32)
    scale = tl.where(row_valid, scale, 0.0)  # padded decode rows: zero outputs
    pos = tl.load(pos_ptr + tokens, mask=token_mask, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + lo, mask=lo_mask, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    # q heads go to q [T, n_q, D], kv heads to k [T, n_kv, D]: select the base pointer once (no branches)
    is_q = head < NUM_Q
    out_ptr = tl.where(is_q, q_ptr + head * HEAD_DIM, k_ptr + (head - NUM_Q) * HEAD_DIM)
    row_stride = tl.where(is_q, NUM_Q * HEAD_DIM, NUM_KV * HEAD_DIM)
    out_lo = (z_lo * cos - z_hi * sin) * scale[:, None]
    out_hi = (z_hi * cos + z_lo * sin) * scale[:, None]
    out_rest = z_rest * scale[:, None]
    _store_head(out_lo, lo, lo_mask, tokens, token_mask, out_ptr, row_stride)
    _store_head(out_hi, lo + half, lo_mask, tokens, token_mask, out_ptr, row_stride)
    _store_head(out_rest, rest, rest_mask, tokens, token_mask, out_ptr, row_stride)
    if WRITE_CACHE:
        if head >= NUM_Q:
            cache_rows, keep = _cache_rows(slot_ptr, tokens, row_valid, CACHE_SLOTS, CACHE_BLOCK, K_STRIDE_BLOCK,
                                           K_STRIDE_SLOT)
            cache_head = k_cache_ptr + (head - NUM_Q) * K_STRIDE_HEAD
            _store_cache(out_lo, lo, lo_mask, cache_rows, keep, cache_head)
            _store_cache(out_hi, lo + half, lo_mask, cache_rows, keep, cache_head)
            _store_cache(out_rest, rest, rest_mask, cache_rows, keep, cache_head)


@triton.jit
def _prefill_rows(cu_ptr, has_init_ptr, T, NUM_SEQS, SEARCH_STEPS, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's prefill rows: (token, token < T, its sequence b, cu_seqlens[b], sequence b has an initial
    state)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    seq = _sequence_of(cu_ptr, tokens, NUM_SEQS, SEARCH_STEPS)
    seq_start = tl.load(cu_ptr + seq, mask=token_mask, other=0)
    if HAS_INIT:
        has_init = tl.load(has_init_ptr + seq, mask=token_mask, other=0) != 0
    else:
        has_init = tokens < 0
    return tokens, token_mask, seq, seq_start, has_init


@triton.jit
def cca_prepare_kernel(
    qk_ptr, vc_ptr, vd_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, temp_ptr, pos_ptr, cu_ptr, inv_freq_ptr,
    init_conv_ptr, init_value_ptr, has_init_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    T, NUM_SEQS, SEARCH_STEPS, CACHE_SLOTS, CACHE_BLOCK, K_STRIDE_BLOCK, K_STRIDE_SLOT, K_STRIDE_HEAD,
    V_STRIDE_BLOCK, V_STRIDE_SLOT, V_STRIDE_HEAD, QK_STRIDE, VC_STRIDE, VD_STRIDE, EPS: tl.constexpr,
    HEAD_SCALE: tl.constexpr,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, K0: tl.constexpr,
    K1: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, IEEE_DOT: tl.constexpr, WRITE_CACHE: tl.constexpr,
):
    """Prefill of BLOCK_T packed tokens for one head (a tile may span several sequences). The initial-state
    pointers are None without HAS_INIT; the paged-cache arguments (slot_ptr .. V_STRIDE_HEAD) None without
    WRITE_CACHE. QK_STRIDE, VC_STRIDE, VD_STRIDE: the row strides of qk, v_current, v_delayed (row-strided views)."""
    # Model sizes are constexpr (one specialisation per model: fewer scalar registers, constant index arithmetic).
    # Values first: what only they use is then dead before the conv loop instead of held across it. Each part
    # finds its rows' sequences itself (a few cached loads of cu_seqlens): with one shared set, ptxas capped the
    # sm_90 kernel at 128 registers and spilled (measured with aot-report).
    head = tl.program_id(1)
    if head >= NUM_Q:
        tokens, token_mask, seq, seq_start, has_init = _prefill_rows(cu_ptr, has_init_ptr, T, NUM_SEQS, SEARCH_STEPS,
                                                                     HAS_INIT, BLOCK_T)
        _value_rows(vc_ptr, vd_ptr, init_value_ptr, v_ptr, head, tokens, token_mask, token_mask, seq, seq_start,
                    has_init, slot_ptr, v_cache_ptr, CACHE_SLOTS, CACHE_BLOCK, V_STRIDE_BLOCK, V_STRIDE_SLOT,
                    V_STRIDE_HEAD, VC_STRIDE, VD_STRIDE, NUM_Q, NUM_KV, HEAD_DIM, HAS_INIT, False, WRITE_CACHE)
    tokens, token_mask, seq, seq_start, has_init = _prefill_rows(cu_ptr, has_init_ptr, T, NUM_SEQS, SEARCH_STEPS,
                                                                 HAS_INIT, BLOCK_T)
    _project_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, init_conv_ptr, temp_ptr, pos_ptr, inv_freq_ptr, q_ptr, k_ptr,
                  head, tokens, token_mask, token_mask, seq, seq_start, has_init, slot_ptr, k_cache_ptr, CACHE_SLOTS,
                  CACHE_BLOCK, K_STRIDE_BLOCK, K_STRIDE_SLOT, K_STRIDE_HEAD, QK_STRIDE, EPS, HEAD_SCALE, NUM_Q,
                  NUM_KV, HEAD_DIM, ROTARY_DIM, K0, K1, HAS_INIT, BLOCK_T, BLOCK_I, BLOCK_HALF, BLOCK_REST, IEEE_DOT,
                  WRITE_CACHE)


@triton.jit
def _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T: tl.constexpr):
    """This program's decode rows: (row, row < ROWS, row has a slot (0 <= index < slots), slot or 0 without one)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < ROWS
    index = tl.load(state_index_ptr + rows, mask=row_mask, other=-1)
    row_valid = (index >= 0) & (index < NUM_SLOTS)  # negative / out of range: padded row
    return rows, row_mask, row_valid, tl.where(row_valid, index, 0)


@triton.jit
def _shift_conv_state(qk_ptr, conv_state_ptr, rows, row_valid, slot, head, QK_STRIDE, C: tl.constexpr,
                      HEAD_DIM: tl.constexpr, STATE_LEN: tl.constexpr, BLOCK_D: tl.constexpr):
    """Shift this head's conv-state channels of each valid row's slot by one column (the newest is the row's X, qk
    rows QK_STRIDE apart).
    Nothing is stored before a barrier: other threads of the program may still be reading the old columns (the
    conv). After it, each thread moves its own elements column by column (the same [rows, D] layout every time, so
    a column is read before the same thread overwrites it): one [rows, D] tile live at a time, where the whole
    [rows, D, STATE_LEN] state at once spilled 2.6 KB on sm_90 at k0 = k1 = 4."""
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    channels = head * HEAD_DIM + dims
    mask2 = row_valid[:, None] & dmask[None, :]  # row_valid implies rows < ROWS
    base2 = (slot.to(tl.int64)[:, None] * C + channels[None, :]) * STATE_LEN
    # ZAYA's k0 = k1 = 2 (STATE_LEN 2): both loads before the barrier, so their latency overlaps it
    newest = tl.load(qk_ptr + rows.to(tl.int64)[:, None] * QK_STRIDE + channels[None, :], mask=mask2, other=0.0)
    if STATE_LEN == 2:
        older = tl.load(conv_state_ptr + base2 + 1, mask=mask2, other=0.0)
    tl.debug_barrier()
    if STATE_LEN == 2:
        tl.store(conv_state_ptr + base2, older, mask=mask2)
    if STATE_LEN > 2:
        for col in tl.static_range(STATE_LEN - 1):
            column = tl.load(conv_state_ptr + base2 + col + 1, mask=mask2, other=0.0)
            tl.store(conv_state_ptr + base2 + col, column, mask=mask2)
    if STATE_LEN > 0:
        tl.store(conv_state_ptr + base2 + STATE_LEN - 1, newest.to(conv_state_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def cca_decode_kernel(
    qk_ptr, vc_ptr, vd_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, temp_ptr, pos_ptr, inv_freq_ptr,
    conv_state_ptr, value_state_ptr, state_index_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    ROWS, NUM_SLOTS, CACHE_SLOTS, CACHE_BLOCK, K_STRIDE_BLOCK, K_STRIDE_SLOT, K_STRIDE_HEAD, V_STRIDE_BLOCK,
    V_STRIDE_SLOT, V_STRIDE_HEAD, QK_STRIDE, VC_STRIDE, VD_STRIDE, EPS: tl.constexpr, HEAD_SCALE: tl.constexpr,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, K0: tl.constexpr,
    K1: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, IEEE_DOT: tl.constexpr, WRITE_CACHE: tl.constexpr,
):
    """Decode of BLOCK_T rows for one head: row t is a one-token sequence whose history is slot state_index[t] of
    conv_state [slots, C, K] and value_state [slots, n_kv D / 2]; this program then updates its own head's
    elements of those slots in place. WRITE_CACHE: kv heads also store k / v of the rows that have a state slot
    into the paged caches (the cache arguments are None without it). QK_STRIDE, VC_STRIDE, VD_STRIDE: the row
    strides of qk, v_current, v_delayed (row-strided views)."""
    head = tl.program_id(1)
    # Each part loads its row values itself rather than keeping one set: where a tile gives a wave whole rows they
    # are scalars, one set per row, and kept they would be held across the conv loop (gfx942: 89 SGPRs, not 76).
    if head >= NUM_Q:
        rows, row_mask, row_valid, slot = _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T)
        _value_rows(vc_ptr, vd_ptr, value_state_ptr, v_ptr, head, rows, row_mask, row_valid, slot, rows,
                    row_valid, slot_ptr, v_cache_ptr, CACHE_SLOTS, CACHE_BLOCK, V_STRIDE_BLOCK, V_STRIDE_SLOT,
                    V_STRIDE_HEAD, VC_STRIDE, VD_STRIDE, NUM_Q, NUM_KV, HEAD_DIM, True, True, WRITE_CACHE)
    # seq_start = the row itself: the conv halo before it comes from the slot's conv state
    rows, row_mask, row_valid, slot = _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T)
    _project_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, conv_state_ptr, temp_ptr, pos_ptr, inv_freq_ptr, q_ptr,
                  k_ptr, head, rows, row_mask, row_valid, slot, rows, row_valid, slot_ptr, k_cache_ptr, CACHE_SLOTS,
                  CACHE_BLOCK, K_STRIDE_BLOCK, K_STRIDE_SLOT, K_STRIDE_HEAD, QK_STRIDE, EPS, HEAD_SCALE, NUM_Q,
                  NUM_KV, HEAD_DIM, ROTARY_DIM, K0, K1, True, BLOCK_T, BLOCK_I, BLOCK_HALF, BLOCK_REST, IEEE_DOT,
                  WRITE_CACHE)
    rows, row_mask, row_valid, slot = _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T)
    _shift_conv_state(qk_ptr, conv_state_ptr, rows, row_valid, slot, head, QK_STRIDE, (NUM_Q + NUM_KV) * HEAD_DIM,
                      HEAD_DIM, K0 + K1 - 2, BLOCK_D)


@triton.jit
def cca_final_states_kernel(
    qk_ptr, vd_ptr, cu_ptr, init_conv_ptr, init_value_ptr, has_init_ptr, final_conv_ptr, final_value_ptr,
    C, VALUE_DIM, QK_STRIDE, VD_STRIDE,
    STATE_LEN: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Final states of sequence b: conv columns X_{end - K + i} (i < K; from X, the initial state or 0) and
    Vd_{end - 1} (qk / v_delayed rows QK_STRIDE / VD_STRIDE apart)."""
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if HAS_INIT:  # as blocks: the interpreter rejects scalar-masked loads
        has_init = (tl.zeros_like(channels) + tl.load(has_init_ptr + seq)) != 0
    else:
        has_init = channels < 0
    cmask = channels < C
    if STATE_LEN > 0:
        cols = tl.arange(0, BLOCK_K)
        src = end - STATE_LEN + cols
        inside = src >= start
        mask = cmask[:, None] & (cols < STATE_LEN)[None, :]
        x = tl.load(qk_ptr + src.to(tl.int64)[None, :] * QK_STRIDE + channels[:, None], mask=mask & inside[None, :],
                    other=0.0).to(tl.float32)
        if HAS_INIT:
            state_col = STATE_LEN + src - start
            state = tl.load(init_conv_ptr + (seq.to(tl.int64) * C + channels[:, None]) * STATE_LEN + state_col[None, :],
                            mask=mask & (~inside)[None, :] & has_init[:, None], other=0.0).to(tl.float32)
            x = tl.where(inside[None, :], x, state)
        tl.store(final_conv_ptr + (seq.to(tl.int64) * C + channels[:, None]) * STATE_LEN + cols[None, :], x, mask=mask)
    vmask = channels < VALUE_DIM
    nonempty = (tl.zeros_like(channels) + end) > start  # as a block: the interpreter rejects scalar-masked loads
    last = tl.load(vd_ptr + (end - 1).to(tl.int64) * VD_STRIDE + channels, mask=vmask & nonempty,
                   other=0.0).to(tl.float32)
    if HAS_INIT:
        state = tl.load(init_value_ptr + seq.to(tl.int64) * VALUE_DIM + channels, mask=vmask & ~nonempty & has_init,
                        other=0.0).to(tl.float32)
        last = tl.where(nonempty, last, state)
    tl.store(final_value_ptr + seq.to(tl.int64) * VALUE_DIM + channels, last, mask=vmask)


# ---------------------------------------------------------------- launchers
BLOCK_T = 16  # rows per prefill program: 32 and 64 spill (scalar registers on gfx942/gfx950, vector ones on sm_90)
CONV_BLOCK_I = 16  # input channels per grouped-conv step: [16, D] weight tiles (32 spills on sm_90)
NUM_WARPS = 4  # the backward kernels (but grad_z in fp32: backward_num_warps); the forward ones: forward_num_warps
DECODE_BLOCK_ROWS = 16  # the smallest tile tl.dot takes; decode batches share each weight tile
FINAL_BLOCK_C = 128
_inv_freq_cache: dict = {}


def forward_num_warps(head_dim: int, k0: int, k1: int, decode: bool) -> int:
    """Warps per forward program, from the AOT report (Triton 3.9, every variant: unspecialised and
    `--divisible pointers|all`; gfx942 and gfx950 spill at neither count).
    Decode: 4 up to D 128 with k0 + k1 <= 4 -- at ZAYA1's shape (D 128, k0 = k1 = 2) each [32, 2 x 16] tile of the
    grouped conv weight then loads as one 16-byte vector per thread (8 warps: 4 bytes; AMD stays at 4 waves per
    SIMD), and with 8 the aligned paged variant spilled 8 B on sm_90, at D 64 the aligned one 16 B; 8 at D 256 and
    k0 = k1 = 4 (4 spill 16-24 B on sm_90 there).
    Prefill: 4 at ZAYA1's shape, 8 elsewhere (with 4, sm_90 spills at D 64 and 96, at D 256 (8 B in bf16 with
    aligned arguments), and when k0 + k1 > 4)."""
    if decode:
        return 4 if head_dim <= 128 and k0 + k1 <= 4 else 8
    return 4 if (head_dim, k0, k1) == (128, 2, 2) else 8


def forward_num_stages(head_dim: int, k0: int, k1: int) -> int:
    """Pipeline stages of the forward programs' grouped-conv loop: 2 at ZAYA1's shape (the next [BLOCK_I, D]
    weight tiles load while the current ones multiply; Triton's own default on AMD), spill-free there in every
    variant on gfx942, gfx950 and sm_90 (AOT report); 1 elsewhere (2 spill 16-120 B on sm_90 at D 64 and at
    k0 = k1 = 4)."""
    return PIPELINED if (head_dim, k0, k1) == (128, 2, 2) else NO_PIPELINING


def _inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """1 / theta^(2i / rotary_dim) fp32, computed once per (rotary_dim, theta, device) as transformers does; kept so
    decode launches one kernel (and stays graph-capturable after the first call)."""
    key = (rotary_dim, theta, str(device))
    if key not in _inv_freq_cache:
        freq = rope_inv_freq(rotary_dim, theta, device)
        _inv_freq_cache[key] = freq if freq.numel() else torch.zeros(1, device=device)
    return _inv_freq_cache[key]


def _blocks(head_dim: int, rotary_dim: int, decode: bool) -> dict:
    """Block sizes (constexprs) for a head of D dims with R rotary dims; tl.dot needs every dimension >= 16.
    BLOCK_D (whole head) is for the decode kernel's conv-state shift."""
    def block(n):
        return max(16, triton.next_power_of_2(max(1, n)))

    blocks = {"BLOCK_I": min(CONV_BLOCK_I, block(head_dim)), "BLOCK_HALF": block(rotary_dim // 2),
              "BLOCK_REST": block(head_dim - rotary_dim)}
    if decode:
        blocks.update(BLOCK_D=block(head_dim))
    return blocks


def _fp32(t):
    return t if t.dtype == torch.float32 else t.float()


ROW_STRIDE_NAMES = ("QK_STRIDE", "VC_STRIDE", "VD_STRIDE")
CACHE_ARG_NAMES = ("slot_ptr", "k_cache_ptr", "v_cache_ptr", "CACHE_SLOTS", "CACHE_BLOCK", "K_STRIDE_BLOCK",
                   "K_STRIDE_SLOT", "K_STRIDE_HEAD", "V_STRIDE_BLOCK", "V_STRIDE_SLOT", "V_STRIDE_HEAD")


def _cache_args(cache) -> dict:
    """The kernels' paged-cache arguments for cache = (slot_mapping, k_cache, v_cache) or None (then all None, and
    WRITE_CACHE False: the kernel without the feature)."""
    if cache is None:
        return {**dict.fromkeys(CACHE_ARG_NAMES), "WRITE_CACHE": False}
    slot_mapping, k_cache, v_cache = cache
    num_blocks, block_size = k_cache.shape[:2]
    return {"slot_ptr": slot_mapping, "k_cache_ptr": k_cache, "v_cache_ptr": v_cache,
            "CACHE_SLOTS": num_blocks * block_size, "CACHE_BLOCK": block_size,
            "K_STRIDE_BLOCK": k_cache.stride(0), "K_STRIDE_SLOT": k_cache.stride(1), "K_STRIDE_HEAD": k_cache.stride(2),
            "V_STRIDE_BLOCK": v_cache.stride(0), "V_STRIDE_SLOT": v_cache.stride(1), "V_STRIDE_HEAD": v_cache.stride(2),
            "WRITE_CACHE": True}


def _row_strides(qk, v_current, v_delayed) -> dict:
    """The kernels' row strides of the three projection inputs (row-strided views, last dim contiguous: checked by
    zaya_kernels.ops.cca)."""
    return {"QK_STRIDE": qk.stride(0), "VC_STRIDE": v_current.stride(0), "VD_STRIDE": v_delayed.stride(0)}


def cca_prepare_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                    positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state,
                    initial_value_state, has_initial_state, q, k, v, final_conv_state, final_value_state, cache=None):
    """Launch the prefill into preallocated outputs (shapes as in zaya_kernels.ops.cca.cca_prepare); with
    cache = (slot_mapping [T], k_cache, v_cache [num_blocks, block_size, n_kv, D]) k and v also go to the cache."""
    tokens, channels = qk.shape
    head_dim, k1 = conv1_weight.shape[1], conv1_weight.shape[2]
    k0 = conv0_weight.shape[1]
    num_seqs = cu_seqlens.shape[0] - 1
    has_init = initial_conv_state is not None
    inv_freq = _inv_freq(rotary_dim, rope_theta, qk.device)
    eps = torch.finfo(qk.dtype).eps
    if has_init and has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.to(torch.int32)
    init_args = (initial_conv_state, initial_value_state, has_initial_state) if has_init else (None, None, None)
    if tokens > 0:
        cca_prepare_kernel[(triton.cdiv(tokens, BLOCK_T), num_q_heads + num_kv_heads)](
            qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
            cu_seqlens, inv_freq, *init_args, q, k, v, T=tokens, NUM_SEQS=num_seqs,
            SEARCH_STEPS=max(1, num_seqs).bit_length(), **_cache_args(cache), **_row_strides(qk, v_current, v_delayed),
            EPS=eps, HEAD_SCALE=head_dim**0.5,
            NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, K0=k0, K1=k1,
            HAS_INIT=has_init, BLOCK_T=BLOCK_T, **_blocks(head_dim, rotary_dim, decode=False),
            IEEE_DOT=qk.dtype == torch.float32,
            num_warps=forward_num_warps(head_dim, k0, k1, decode=False),
            num_stages=forward_num_stages(head_dim, k0, k1),
        )
    if num_seqs > 0:
        state_len = k0 + k1 - 2
        cca_final_states_kernel[(num_seqs, triton.cdiv(channels, FINAL_BLOCK_C))](
            qk, v_delayed, cu_seqlens, *init_args, final_conv_state, final_value_state, channels, v_current.shape[1],
            qk.stride(0), v_delayed.stride(0), STATE_LEN=state_len, HAS_INIT=has_init, BLOCK_C=FINAL_BLOCK_C,
            BLOCK_K=triton.next_power_of_2(max(1, state_len)), num_warps=4, num_stages=NO_PIPELINING,
        )


def cca_prepare_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                       positions, conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim,
                       rope_theta, q, k, v, cache=None):
    """Launch the decode step (one kernel) into preallocated q, k, v; updates conv_state and value_state in place;
    with cache = (slot_mapping [B], k_cache, v_cache) k and v of the rows with a state slot also go to the cache."""
    rows = qk.shape[0]
    if rows == 0:
        return
    head_dim, k1 = conv1_weight.shape[1], conv1_weight.shape[2]
    k0 = conv0_weight.shape[1]
    cca_decode_kernel[(triton.cdiv(rows, DECODE_BLOCK_ROWS), num_q_heads + num_kv_heads)](
        qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
        _inv_freq(rotary_dim, rope_theta, qk.device), conv_state, value_state, state_indices, q, k, v,
        ROWS=rows, NUM_SLOTS=conv_state.shape[0], **_cache_args(cache), **_row_strides(qk, v_current, v_delayed),
        EPS=torch.finfo(qk.dtype).eps,
        HEAD_SCALE=head_dim**0.5,
        NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, K0=k0, K1=k1,
        BLOCK_T=DECODE_BLOCK_ROWS, **_blocks(head_dim, rotary_dim, decode=True),
        IEEE_DOT=qk.dtype == torch.float32,
        num_warps=forward_num_warps(head_dim, k0, k1, decode=True),
        num_stages=forward_num_stages(head_dim, k0, k1),
    )


def _aot_configs(head_dim=128, rotary_dim=64, k0=2, k1=2, variants=None):
    """The configurations ZAYA1 runs: D = 128 (BLOCK_D 128), k0 = k1 = 2, bf16 activations (and fp32 for the IEEE
    prefill path), prefill with and without initial states, decode with fp32 and bf16 states; the paged KV-cache
    write (WRITE_CACHE) once per kernel: bf16 chunked prefill (initial states) and bf16 decode with fp32 states,
    int64 slot_mapping as vLLM passes it. Other model shapes (head_dim, rotary_dim, k0, k1) with a subset of the
    variants: see _OTHER_SHAPES."""
    state_len = k0 + k1 - 2
    prefill_args = ("qk_ptr", "vc_ptr", "vd_ptr", "w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr", "temp_ptr", "pos_ptr",
                    "cu_ptr", "inv_freq_ptr", "init_conv_ptr", "init_value_ptr", "has_init_ptr", "q_ptr", "k_ptr",
                    "v_ptr", "slot_ptr", "k_cache_ptr", "v_cache_ptr", "T", "NUM_SEQS", "SEARCH_STEPS",
                    *CACHE_ARG_NAMES[3:], *ROW_STRIDE_NAMES)
    decode_args = ("qk_ptr", "vc_ptr", "vd_ptr", "w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr", "temp_ptr", "pos_ptr",
                   "inv_freq_ptr", "conv_state_ptr", "value_state_ptr", "state_index_ptr", "q_ptr", "k_ptr", "v_ptr",
                   "slot_ptr", "k_cache_ptr", "v_cache_ptr", "ROWS", "NUM_SLOTS", *CACHE_ARG_NAMES[3:],
                   *ROW_STRIDE_NAMES)
    # (activation dtype, state dtype, HAS_INIT, DECODE, WRITE_CACHE)
    variants = variants or (("bf16", "fp32", False, False, False), ("bf16", "fp32", True, False, False),
                ("fp32", "fp32", False, False, False), ("bf16", "fp32", True, True, False),
                ("bf16", "bf16", True, True, False), ("bf16", "fp32", True, False, True),
                ("bf16", "fp32", True, True, True))
    prefill, decode_configs, final = [], [], []
    for act, state, has_init, decode, write_cache in variants:
        types = {name: f"*{act}" for name in ("qk_ptr", "vc_ptr", "vd_ptr", "q_ptr", "k_ptr", "v_ptr")}
        types.update({name: "*bf16" if act == "bf16" else "*fp32"
                      for name in ("w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr", "temp_ptr")})
        types.update({name: f"*{state}" for name in ("init_conv_ptr", "init_value_ptr", "conv_state_ptr",
                                                      "value_state_ptr")})
        types.update({"inv_freq_ptr": "*fp32", "pos_ptr": "*i64", "cu_ptr": "*i32", "has_init_ptr": "*i32",
                      "state_index_ptr": "*i32", "T": "i32", "NUM_SEQS": "i32", "SEARCH_STEPS": "i32", "ROWS": "i32",
                      "NUM_SLOTS": "i32", "slot_ptr": "*i64", "k_cache_ptr": f"*{act}", "v_cache_ptr": f"*{act}"})
        types.update({name: "i32" for name in (*CACHE_ARG_NAMES[3:], *ROW_STRIDE_NAMES)})
        block_t = DECODE_BLOCK_ROWS if decode else BLOCK_T
        consts = {"EPS": torch.finfo(torch.bfloat16 if act == "bf16" else torch.float32).eps,
                  "HEAD_SCALE": head_dim**0.5, "NUM_Q": 8, "NUM_KV": 2, "HEAD_DIM": head_dim,
                  "ROTARY_DIM": rotary_dim, "K0": k0, "K1": k1, "BLOCK_T": block_t,
                  **_blocks(head_dim, rotary_dim, decode), "IEEE_DOT": act == "fp32",
                  "WRITE_CACHE": write_cache}
        if not write_cache:  # passed as None
            consts.update(dict.fromkeys(CACHE_ARG_NAMES))
        if not decode:
            consts["HAS_INIT"] = has_init
            if not has_init:  # passed as None
                consts.update(init_conv_ptr=None, init_value_ptr=None, has_init_ptr=None)
        signature = {name: "constexpr" if name in consts else types[name]
                     for name in (decode_args if decode else prefill_args)}
        signature.update({name: "constexpr" for name in consts})
        mode = f"decode,state={state}" if decode else f"prefill,init={int(has_init)}"
        label = (f"{mode},{act},D={head_dim},R={rotary_dim},k0={k0},k1={k1},BLOCK_T={block_t}"
                 + (",paged_cache" if write_cache else ""))
        (decode_configs if decode else prefill).append(
            AotConfig(label=label, signature=signature, constexprs=consts,
                      num_warps=forward_num_warps(head_dim, k0, k1, decode),
                      num_stages=forward_num_stages(head_dim, k0, k1),
                      matrix_expected=act == "bf16"))
        if not decode and not write_cache:  # the final-states kernel has no cache variant
            final_consts = {"STATE_LEN": state_len, "HAS_INIT": has_init, "BLOCK_C": FINAL_BLOCK_C,
                            "BLOCK_K": triton.next_power_of_2(max(1, state_len))}
            final_sig = {"qk_ptr": f"*{act}", "vd_ptr": f"*{act}", "cu_ptr": "*i32", "init_conv_ptr": "*fp32",
                         "init_value_ptr": "*fp32", "has_init_ptr": "*i32", "final_conv_ptr": "*fp32",
                         "final_value_ptr": "*fp32", "C": "i32", "VALUE_DIM": "i32", "QK_STRIDE": "i32",
                         "VD_STRIDE": "i32"}
            final_sig.update({name: "constexpr" for name in final_consts})
            final.append(AotConfig(label=f"{act},K={state_len},init={int(has_init)}", signature=final_sig,
                                   constexprs=final_consts, num_warps=4))
    return prefill, decode_configs, final


# Model shapes other than ZAYA1's that the kernels take (D a multiple of 16 up to 256, k0 and k1 up to 4): the bf16
# chunked prefill, the fp32 prefill and the bf16 decode. Not every shape is spill-free on sm_90. A sweep under
# Triton 3.9 (D 16..256 in steps of 16 up to 128 then 160, 192, 256; (k0, k1) in (1,1) (2,2) (3,3) (4,4) (1,4)
# (4,1); these three variants; 198 configs) found 45 that spill 8-204 B. Mostly ptxas holding a 256-thread program
# to 128 (prefill) or 64 (decode) registers for occupancy: maxnreg=255 removes 28 of them; the other 17 (D >= 160
# with k1 = 4 or k0 = k1 = 3, and D 32 fp32 at k = 4) need more than 255. Left as measured: trading the spills
# for half the occupancy wants timing on the GPU. AMD spills at none of the shapes measured.
_OTHER_SHAPES = ((64, 32, 2, 2), (256, 128, 2, 2), (128, 64, 4, 4))
_OTHER_VARIANTS = (("bf16", "fp32", True, False, False), ("fp32", "fp32", False, False, False),
                   ("bf16", "fp32", True, True, False))
_prefill_configs, _decode_configs, _final_configs = _aot_configs()
for _shape in _OTHER_SHAPES:
    for _all, _more in zip((_prefill_configs, _decode_configs, _final_configs),
                           _aot_configs(*_shape, variants=_OTHER_VARIANTS)):
        _labels = {config.label for config in _all}
        _all.extend(config for config in _more if config.label not in _labels)  # final states: by K only
register_aot("cca_prepare", cca_prepare_kernel, _prefill_configs)
register_aot("cca_prepare_decode", cca_decode_kernel, _decode_configs)
register_aot("cca_final_states", cca_final_states_kernel, _final_configs)


# ================================================================ backward (zaya::cca_prepare_backward)
# Triton backward of ZAYA's CCA projection prefill (`zaya::cca_prepare_backward`, DESIGN.md 1.1 steps 3-8).
#
# Math (per packed sequence of L tokens; zaya_kernels.reference.cca has the forward): n_q query heads, n_kv kv heads
# (g = n_q / n_kv), head dim D, C = (n_q + n_kv) D channels, kernels k0 (depthwise) and k1 (grouped),
# K = k0 + k1 - 2 conv-state columns, X_t the raw qk row (history or 0 for t < 0), A the activation dtype.
# Forward: Y_s = b0 + sum_j0 w0[:, j0] X_{s-(k0-1-j0)} (s >= -(k1-1), rounded to A: Yr),
# Z_t = b1 + sum_j1 W1[:, :, j1] Yr_{t-(k1-1-j1)} (per head, W1 rounded to A), U = Z + coupling residual,
# n = c U / max(||U||, eps) with c = sqrt(D) (q heads) or sqrt(D) temp_j (kv head j), out = RoPE(n).
# Backward, given G = dL/dout (grad_q [T, n_q, D], grad_k [T, n_kv, D]):
#   1. RoPE is a rotation: dn = R^T G (lo' = lo cos + hi sin, hi' = hi cos - lo sin, the rest unchanged).
#   2. QK norm: dU = c/m (dn - [||U|| >= eps] (dn . U) U / m^2), m = max(||U||, eps);
#      dtemp_j = sum_t sqrt(D) (dn . U) / m over kv head j's rows.
#   3. dZ = dU. Coupling: dX[Q0 of head h] = dU_h / 2 + dU_{kv h//g} / (2g); dX[K0 of kv j] = dU_kv_j / 2 +
#      sum_m dU_{g j + m} / 2.
#   4. Grouped conv: P_j1,t = dZ_t @ W1[:, :, j1] (per head, [D] -> [D]); dYr_s = sum_j1 P_j1,{s + k1-1-j1} (t < L);
#      dW1[o, i, j1] = sum_t dZ_t[o] Yr_{t-(k1-1-j1)}[i]; db1 = sum_t dZ_t. The rounding Y -> Yr is straight-through.
#   5. Depthwise conv, with m = (k0-1-j0) + (k1-1-j1):
#      dX_u += sum_{j0, j1} w0[:, j0] P_j1,{u+m} (u + m < L: the convs restart at every sequence boundary);
#      dw0[:, j0] = sum_{j1} sum_t P_j1,t X_{t-m} (X_{<0}: the initial conv state or 0; this includes Y_{-1..-(k1-1)},
#      which exist even for a fresh sequence: Y_{-1} = b0); db0 = sum_{j1} sum_t P_j1,t.
#   6. final_conv_state = the last K columns of [history | X]: dX_u += grad_final_conv_state[:, K - (L - u)] for the
#      last K tokens (columns from the initial state: their gradient is zaya_kernels.ops.cca's, not this kernel's).
#   7. Values (torch indexing in the launcher): dVc_t = grad_v[t] first half; dVd_t = grad_v[t + 1] second half when
#      t + 1 is in the same sequence, plus grad_final_value_state at the sequence's last token.
#
# Kernels (all fp32 arithmetic; nothing from the forward is saved: each recomputes what it needs from X):
# - cca_bwd_grad_z_kernel, grid (cdiv(T, 16), n_q + n_kv): one program owns 16 tokens of one head. It recomputes U
#   exactly as cca_prepare_kernel does (the same @triton.jit parts of zaya_kernels.triton.cca: lo / hi / rest column
#   blocks, a k0 + k1 - 2 halo from X or the initial state, tl.dot per tap), does steps 1-2 and stores dZ [T, C]
#   (an fp32 workspace) and its kv head's temperature partial [tiles, n_kv].
# - cca_bwd_conv_input_kernel, grid (cdiv(T, 32), n_q + n_kv, k1 cdiv(D, 32)): P_j1 = dZ @ W1[:, :, j1] for 32 tokens,
#   one tap and 32 input dims of one head (tl.dot over 32-dim slices of the head's outputs) -> P [k1, T, C] fp32.
# - cca_bwd_weights_kernel, grid (chunks <= 32, n_q + n_kv, k1 cdiv(D, 32)): one program owns one tap j1 and 32 input
#   dims of one head (all D outputs) and walks the 16-token tiles of its chunk of tokens: it recomputes
#   Yr_{t-(k1-1-j1)} [16, 32] from the X halo and accumulates dZ^T @ Yr -> dW1 partial [D, 32] (tl.dot over tokens);
#   the (tap 0, first block) program also sums dZ -> db1 partial. Partials [chunks, C, D, k1] / [chunks, C].
# - cca_bwd_grad_x_kernel, grid (cdiv(T, 32), n_q + n_kv, cdiv(D, 32)): elementwise on [32 tokens, 32 channels] of one
#   head: step 3's coupling from dZ, step 5's dX from P at later tokens of the same sequence, step 6; stores dX in A;
#   and the tile's dw0 / db0 partials [tiles, C, k0] / [tiles, C].
# Weight, bias and temperature gradients are per-program partial sums (no atomics) finished by a torch sum: the
# result is deterministic. Heads mix only through the coupling (read from the dZ workspace). Workspaces: dZ and P,
# (1 + k1) T C fp32. bf16 / fp16 activations: the dots take dZ rounded to A (MFMA / wgmma) and accumulate in fp32;
# fp32 activations use IEEE fp32 dots.



@triton.jit
def _bwd_rows(cu_ptr, has_init_ptr, first, T, NUM_SEQS, SEARCH_STEPS, HAS_INIT: tl.constexpr,
              BLOCK_T: tl.constexpr):
    """Tokens first .. first + BLOCK_T - 1: (token, token < T, its sequence b, cu_seqlens[b], cu_seqlens[b + 1],
    sequence b has an initial state)."""
    tokens = first + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    seq = _sequence_of(cu_ptr, tokens, NUM_SEQS, SEARCH_STEPS)
    seq_start = tl.load(cu_ptr + seq, mask=token_mask, other=0)
    seq_end = tl.load(cu_ptr + seq + 1, mask=token_mask, other=0)
    if HAS_INIT:
        has_init = tl.load(has_init_ptr + seq, mask=token_mask, other=0) != 0
    else:
        has_init = tokens < 0
    return tokens, token_mask, seq, seq_start, seq_end, has_init


@triton.jit
def _load_out_grad(g_ptr, tokens, token_mask, dims, dmask, head_in_out, HEAD_DIM, HEADS_OUT,
                   HAS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """Incoming gradient [BLOCK_T, BLOCK] fp32 of dims `dims` of head head_in_out of an output [T, HEADS_OUT, D];
    zeros when that output has no gradient (g_ptr is then unused)."""
    g = tl.zeros((BLOCK_T, BLOCK), dtype=tl.float32)
    if HAS_GRAD:
        offs = tokens.to(tl.int64)[:, None] * (HEADS_OUT * HEAD_DIM) + head_in_out * HEAD_DIM + dims[None, :]
        g = tl.load(g_ptr + offs, mask=token_mask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    return g


@triton.jit
def _store_cols(val, ptr, tokens, token_mask, cols, cmask, row_stride):
    """Store val [R, B] at columns `cols` of rows `tokens` of a [T, row_stride] array."""
    offs = tokens.to(tl.int64)[:, None] * row_stride + cols[None, :]
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=token_mask[:, None] & cmask[None, :])


@triton.jit
def cca_bwd_grad_z_kernel(
    qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, temp_ptr, pos_ptr, cu_ptr, inv_freq_ptr, init_conv_ptr, has_init_ptr,
    gq_ptr, gk_ptr, gz_ptr, temp_part_ptr,
    T, NUM_SEQS, SEARCH_STEPS, EPS: tl.constexpr, HEAD_SCALE: tl.constexpr,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, K0: tl.constexpr,
    K1: tl.constexpr, HAS_INIT: tl.constexpr, HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """Steps 1-2 for BLOCK_T tokens of one head: dZ -> gz [T, C] fp32 and the tile's sum of sqrt(D) (dn . U) / m
    -> temp_part [tiles, n_kv] (kv heads only)."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    STATE_LEN: tl.constexpr = K0 + K1 - 2
    C: tl.constexpr = (NUM_Q + NUM_KV) * HEAD_DIM
    GROUP: tl.constexpr = NUM_Q // NUM_KV
    tokens, token_mask, seq, seq_start, seq_end, has_init = _bwd_rows(cu_ptr, has_init_ptr, tile * BLOCK_T, T,
                                                                      NUM_SEQS, SEARCH_STEPS, HAS_INIT, BLOCK_T)
    half: tl.constexpr = ROTARY_DIM // 2
    lo = tl.arange(0, BLOCK_HALF)
    lo_mask = lo < half
    rest = ROTARY_DIM + tl.arange(0, BLOCK_REST)
    rest_mask = rest < HEAD_DIM

    # Forward recompute of U (pre-norm q / k of this head): the forward's own code.
    u_lo, u_hi, u_rest = _pre_norm_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, init_conv_ptr, head, tokens,
                                        token_mask, seq, seq_start, has_init, lo, lo_mask, rest, rest_mask, half, C,
                                        C, NUM_Q, HEAD_DIM, GROUP, STATE_LEN, K0, K1, HAS_INIT, BLOCK_T, BLOCK_I,
                                        IEEE_DOT)
    norm = tl.sqrt(tl.sum(u_lo * u_lo, axis=1) + tl.sum(u_hi * u_hi, axis=1) + tl.sum(u_rest * u_rest, axis=1))
    denom = tl.maximum(norm, EPS)

    # Step 1: un-rotate the incoming gradient (q heads read grad_q, kv heads grad_k).
    is_q = head < NUM_Q
    if is_q:
        g_lo = _load_out_grad(gq_ptr, tokens, token_mask, lo, lo_mask, head, HEAD_DIM, NUM_Q, HAS_GQ, BLOCK_T,
                              BLOCK_HALF)
        g_hi = _load_out_grad(gq_ptr, tokens, token_mask, lo + half, lo_mask, head, HEAD_DIM, NUM_Q, HAS_GQ,
                              BLOCK_T, BLOCK_HALF)
        g_rest = _load_out_grad(gq_ptr, tokens, token_mask, rest, rest_mask, head, HEAD_DIM, NUM_Q, HAS_GQ,
                                BLOCK_T, BLOCK_REST)
    else:
        g_lo = _load_out_grad(gk_ptr, tokens, token_mask, lo, lo_mask, head - NUM_Q, HEAD_DIM, NUM_KV, HAS_GK,
                              BLOCK_T, BLOCK_HALF)
        g_hi = _load_out_grad(gk_ptr, tokens, token_mask, lo + half, lo_mask, head - NUM_Q, HEAD_DIM, NUM_KV,
                              HAS_GK, BLOCK_T, BLOCK_HALF)
        g_rest = _load_out_grad(gk_ptr, tokens, token_mask, rest, rest_mask, head - NUM_Q, HEAD_DIM, NUM_KV,
                                HAS_GK, BLOCK_T, BLOCK_REST)
    pos = tl.load(pos_ptr + tokens, mask=token_mask, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + lo, mask=lo_mask, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    n_lo = g_lo * cos + g_hi * sin
    n_hi = g_hi * cos - g_lo * sin

    # Step 2: the sqrt(D)-scaled L2 norm (keys times their temperature). The clamp passes no gradient through
    # the norm when ||U|| < eps (torch's clamp_min passes it at equality: >=).
    dot = tl.sum(n_lo * u_lo, axis=1) + tl.sum(n_hi * u_hi, axis=1) + tl.sum(g_rest * u_rest, axis=1)
    temp = tl.load(temp_ptr + tl.where(is_q, 0, head - NUM_Q)).to(tl.float32)
    temp = tl.where(is_q, 1.0, temp)
    coef = HEAD_SCALE * temp / denom
    proj = tl.where(norm >= EPS, dot / (denom * denom), 0.0)
    gz_lo = coef[:, None] * (n_lo - proj[:, None] * u_lo)
    gz_hi = coef[:, None] * (n_hi - proj[:, None] * u_hi)
    gz_rest = coef[:, None] * (g_rest - proj[:, None] * u_rest)
    if head >= NUM_Q:
        part = tl.sum(tl.where(token_mask, HEAD_SCALE * dot / denom, 0.0), axis=0)
        tl.store(temp_part_ptr + tile * NUM_KV + head - NUM_Q, part)
    gz_head = gz_ptr + head * HEAD_DIM
    _store_cols(gz_lo, gz_head, tokens, token_mask, lo, lo_mask, C)
    _store_cols(gz_hi, gz_head, tokens, token_mask, lo + half, lo_mask, C)
    _store_cols(gz_rest, gz_head, tokens, token_mask, rest, rest_mask, C)


@triton.jit
def cca_bwd_conv_input_kernel(
    qk_ptr, w1_ptr, gz_ptr, p_ptr, T,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, K1: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """P_j1[t, head D + inputs] = sum_o dZ[t, head D + o] W1[head D + o, inputs, j1] for BLOCK_T tokens, one tap j1
    (both taps with k1 = 2: dZ read once, W1 in [O, 2 I] tiles as in _conv_tap_pair) and BLOCK_I input dims of one
    head -> p [k1, T, C] fp32. W1 is rounded to the activation dtype A (qk_ptr's element type; qk itself is not
    read) as in the forward; so is dZ on the MFMA / wgmma path (not IEEE_DOT)."""
    act_dtype = qk_ptr.dtype.element_ty
    head = tl.program_id(1)
    PAIR: tl.constexpr = K1 == 2
    i_block = tl.program_id(2) if PAIR else tl.program_id(2) // K1
    j1 = 0 if PAIR else tl.program_id(2) % K1
    C: tl.constexpr = (NUM_Q + NUM_KV) * HEAD_DIM
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    inputs = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = inputs < HEAD_DIM
    acc = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_newer = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)  # tap 1 (PAIR only)
    for o0 in tl.range(0, HEAD_DIM, BLOCK_O, loop_unroll_factor=1):
        outs = o0 + tl.arange(0, BLOCK_O)
        omask = outs < HEAD_DIM
        gz = tl.load(gz_ptr + tokens.to(tl.int64)[:, None] * C + head * HEAD_DIM + outs[None, :],
                     mask=token_mask[:, None] & omask[None, :], other=0.0)
        if not IEEE_DOT:
            gz = gz.to(act_dtype)
        if PAIR:
            flat = i_block * BLOCK_I * 2 + tl.arange(0, 2 * BLOCK_I)
            w = tl.load(w1_ptr + (head * HEAD_DIM + outs[:, None]) * (HEAD_DIM * 2) + flat[None, :],
                        mask=omask[:, None] & (flat < HEAD_DIM * 2)[None, :], other=0.0)
            w_older, w_newer = tl.split(tl.reshape(w, (BLOCK_O, BLOCK_I, 2)))
            acc = _dot_acc(gz, w_older.to(act_dtype), acc, IEEE_DOT)
            acc_newer = _dot_acc(gz, w_newer.to(act_dtype), acc_newer, IEEE_DOT)
        else:
            offs = (head * HEAD_DIM + outs[:, None]) * (HEAD_DIM * K1) + inputs[None, :] * K1 + j1
            w = tl.load(w1_ptr + offs, mask=omask[:, None] & imask[None, :], other=0.0)
            acc = _dot_acc(gz, w.to(act_dtype), acc, IEEE_DOT)
    _store_cols(acc, p_ptr + head * HEAD_DIM, tokens + j1 * T, token_mask, inputs, imask, C)  # row j1 T + t
    if PAIR:
        _store_cols(acc_newer, p_ptr + head * HEAD_DIM, tokens + T, token_mask, inputs, imask, C)


@triton.jit
def cca_bwd_weights_kernel(
    qk_ptr, w0_ptr, b0_ptr, cu_ptr, init_conv_ptr, has_init_ptr, gz_ptr, gw1_part_ptr, gb1_part_ptr,
    T, NUM_SEQS, SEARCH_STEPS, TILES_PER_CHUNK,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
    HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """dW1[head D + :, inputs, j1] partial = sum over the chunk's tokens of dZ[t, head]^T Yr_{t-(k1-1-j1)}[inputs]
    -> gw1_part [chunks, C, D, k1]; the (tap 0, first input block) program also sums dZ -> gb1_part [chunks, C].
    A program owns all D output dims and BLOCK_I input dims, so no Y element is recomputed twice per tap. (Both
    taps of k1 = 2 in one program, as the conv-input kernel does, read dZ once but hold two [D, BLOCK_I]
    accumulators: AMD occupancy fell from 7 to 4 waves and fp32 spilled on sm_90.)"""
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    i_block = tl.program_id(2) // K1
    j1 = tl.program_id(2) % K1
    act_dtype = qk_ptr.dtype.element_ty
    STATE_LEN: tl.constexpr = K0 + K1 - 2
    C: tl.constexpr = (NUM_Q + NUM_KV) * HEAD_DIM
    outs = tl.arange(0, BLOCK_D)
    omask = outs < HEAD_DIM
    inputs = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = inputs < HEAD_DIM
    in_channels = head * HEAD_DIM + inputs
    b0 = tl.load(b0_ptr + in_channels, mask=imask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D, BLOCK_I), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(0, TILES_PER_CHUNK):
        tokens, token_mask, seq, seq_start, seq_end, has_init = _bwd_rows(
            cu_ptr, has_init_ptr, (chunk * TILES_PER_CHUNK + tile) * BLOCK_T, T, NUM_SEQS, SEARCH_STEPS, HAS_INIT,
            BLOCK_T)
        gz = tl.load(gz_ptr + tokens.to(tl.int64)[:, None] * C + head * HEAD_DIM + outs[None, :],
                     mask=token_mask[:, None] & omask[None, :], other=0.0)
        bias_acc += tl.sum(gz, axis=0)
        # Yr_{t-(k1-1-j1)} of these input channels: rows past T give b0 but meet dZ = 0
        y = _conv_input(qk_ptr, w0_ptr, init_conv_ptr, b0, tokens, token_mask, seq, seq_start, has_init,
                        in_channels, imask, K1 - 1 - j1, C, C, STATE_LEN, K0, HAS_INIT)
        acc = _dot_acc(tl.trans(gz if IEEE_DOT else gz.to(act_dtype)), y, acc, IEEE_DOT)
    offs = ((chunk.to(tl.int64) * C + head * HEAD_DIM + outs[:, None]) * HEAD_DIM + inputs[None, :]) * K1 + j1
    tl.store(gw1_part_ptr + offs, acc, mask=omask[:, None] & imask[None, :])
    first = (tl.zeros_like(outs) + tl.program_id(2)) == 0  # as a block: the interpreter rejects scalar masks
    tl.store(gb1_part_ptr + chunk.to(tl.int64) * C + head * HEAD_DIM + outs, bias_acc, mask=omask & first)


@triton.jit
def cca_bwd_grad_x_kernel(
    qk_ptr, w0_ptr, cu_ptr, init_conv_ptr, has_init_ptr, gz_ptr, p_ptr, gconv_ptr, gqk_ptr, gw0_part_ptr,
    gb0_part_ptr, T, NUM_SEQS, SEARCH_STEPS,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_GCONV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Steps 3, 5 and 6 for BLOCK_T tokens and BLOCK_D channels of one head: dX -> gqk [T, C] (A); the depthwise
    partials sum_{j1, t} P_j1,t X_{t-m} -> gw0_part [tiles, C, k0] and sum_{j1, t} P_j1,t -> gb0_part [tiles, C].
    Elementwise: [BLOCK_T, BLOCK_D] tiles small enough that their 64-bit addresses fit in registers."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    STATE_LEN: tl.constexpr = K0 + K1 - 2
    C: tl.constexpr = (NUM_Q + NUM_KV) * HEAD_DIM
    GROUP: tl.constexpr = NUM_Q // NUM_KV
    tokens, token_mask, seq, seq_start, seq_end, has_init = _bwd_rows(cu_ptr, has_init_ptr, tile * BLOCK_T, T,
                                                                      NUM_SEQS, SEARCH_STEPS, HAS_INIT, BLOCK_T)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    channels = head * HEAD_DIM + dims
    mask = token_mask[:, None] & dmask[None, :]
    rows = tokens.to(tl.int64)[:, None] * C

    # Step 3: the mean coupling (dU = dZ of this head and of its partner heads).
    own = tl.load(gz_ptr + rows + channels[None, :], mask=mask, other=0.0)
    if head < NUM_Q:
        partner = tl.load(gz_ptr + rows + (NUM_Q + head // GROUP) * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        gx = (own + partner / GROUP) * 0.5
    else:
        total = own
        for m in range(0, GROUP):
            total += tl.load(gz_ptr + rows + ((head - NUM_Q) * GROUP + m) * HEAD_DIM + dims[None, :], mask=mask,
                             other=0.0)
        gx = total * 0.5

    # Step 5: both convs transposed, P at later tokens of the same sequence.
    for j0 in tl.static_range(K0):
        w0 = tl.load(w0_ptr + channels * K0 + j0, mask=dmask, other=0.0).to(tl.float32)
        for j1 in tl.static_range(K1):
            src = tokens + (K0 - 1 - j0) + (K1 - 1 - j1)
            p = tl.load(p_ptr + (src + j1 * T).to(tl.int64)[:, None] * C + channels[None, :],
                        mask=mask & (src < seq_end)[:, None], other=0.0)
            gx += w0[None, :] * p

    # Step 6: the last K tokens' X are the final conv state's newest columns.
    if HAS_GCONV:
        col = STATE_LEN - (seq_end - tokens)
        g = tl.load(gconv_ptr + (seq.to(tl.int64)[:, None] * C + channels[None, :]) * STATE_LEN + col[:, None],
                    mask=mask & (col >= 0)[:, None], other=0.0)
        gx += g.to(tl.float32)
    tl.store(gqk_ptr + rows + channels[None, :], gx.to(gqk_ptr.dtype.element_ty), mask=mask)

    # Depthwise weight / bias partials of this tile (X before the sequence: the initial state or 0).
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j1 in tl.static_range(K1):
        p = tl.load(p_ptr + (tokens + j1 * T).to(tl.int64)[:, None] * C + channels[None, :], mask=mask, other=0.0)
        bias += tl.sum(p, axis=0)
    tl.store(gb0_part_ptr + tile.to(tl.int64) * C + channels, bias, mask=dmask)
    for j0 in tl.static_range(K0):
        weight = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j1 in tl.static_range(K1):
            p = tl.load(p_ptr + (tokens + j1 * T).to(tl.int64)[:, None] * C + channels[None, :], mask=mask,
                        other=0.0)
            x = _shifted_x(qk_ptr, init_conv_ptr, tokens, token_mask, seq, seq_start, has_init, channels, dmask,
                           (K0 - 1 - j0) + (K1 - 1 - j1), C, C, STATE_LEN, HAS_INIT)
            weight += tl.sum(p * x, axis=0)
        tl.store(gw0_part_ptr + (tile.to(tl.int64) * C + channels) * K0 + j0, weight, mask=dmask)


# ---------------------------------------------------------------- launcher
GRAD_Z_BLOCK_T = 16  # as the forward's prefill tile (the same conv recompute)
CONV_INPUT_BLOCK_T = 32  # P = dZ @ W1: [32, 32] output tiles, 32-wide reduction steps
CONV_INPUT_BLOCK_I = 32
CONV_INPUT_BLOCK_O = 32
WEIGHT_BLOCK_T = 16  # tokens per tl.dot step of the weight gradient (the dot's reduction dim)
WEIGHT_BLOCK_I = 32  # input dims per weight program: accumulator [D, 32] fp32
MAX_WEIGHT_CHUNKS = 32  # token chunks of the weight gradient: bounds its partial buffer to 32 C D k1 floats
GRAD_X_BLOCK_T = 32
GRAD_X_BLOCK_D = 32


def backward_num_warps(kernel: str, ieee: bool) -> int:
    """Warps of a backward program: NUM_WARPS, but 8 for grad_z on the fp32 IEEE-dot path (with 4 it spilled
    20-28 B on sm_90 with aligned arguments; AOT report, every variant)."""
    return 8 if kernel == "cca_backward_grad_z" and ieee else NUM_WARPS


def backward_num_stages(head_dim: int, k0: int, k1: int, ieee: bool) -> int:
    """Pipeline stages of the four backward kernels: 2 at ZAYA1's shape in bf16 / fp16 (training's dtypes; spill-free
    in every variant on gfx942, gfx950 and sm_90), 1 for the fp32 IEEE-dot path (2 spill 24-40 B on sm_90) and at
    other shapes (not registered with the AOT report)."""
    return PIPELINED if (head_dim, k0, k1) == (128, 2, 2) and not ieee else NO_PIPELINING


def _block(n: int) -> int:
    """tl.dot and tl.arange need powers of two >= 16."""
    return max(16, triton.next_power_of_2(max(1, n)))


def _grad_z_blocks(head_dim: int, rotary_dim: int) -> dict:
    """The forward's prefill blocks: 16 input dims per conv step, lo / hi halves of the rotary dims, the rest."""
    return {"BLOCK_I": min(16, _block(head_dim)), "BLOCK_HALF": _block(rotary_dim // 2),
            "BLOCK_REST": _block(head_dim - rotary_dim)}


def _conv_input_blocks(head_dim: int) -> dict:
    """Input dims per P program (BLOCK_I) and output dims per reduction step (BLOCK_O)."""
    return {"BLOCK_I": min(CONV_INPUT_BLOCK_I, _block(head_dim)), "BLOCK_O": min(CONV_INPUT_BLOCK_O, _block(head_dim))}


def _tap_programs(k1: int) -> int:
    """Programs per input block of the conv-input kernel: one for both taps at k1 = 2 (ZAYA1), else one a tap."""
    return 1 if k1 == 2 else k1


def _weight_chunks(tokens: int) -> tuple[int, int]:
    """(tiles per chunk, chunks) of WEIGHT_BLOCK_T-token tiles covering `tokens`."""
    tiles = triton.cdiv(tokens, WEIGHT_BLOCK_T)
    per_chunk = triton.cdiv(tiles, MAX_WEIGHT_CHUNKS)
    return per_chunk, triton.cdiv(tiles, per_chunk)


def _value_grads(grad_v, grad_final_value_state, cu_seqlens, tokens, value_dim, device):
    """(dVc, dVd) fp32 [T, value_dim] by indexing: v[t] = concat(Vc_t, Vd_{t-1}) within a sequence and the final
    value state is Vd of the sequence's last token. Gathers only (deterministic on GPU)."""
    token_ids = torch.arange(tokens, device=device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:], token_ids, right=True)  # b with cu[b] <= t < cu[b + 1]
    is_last = (token_ids + 1 == cu_seqlens[seq + 1])[:, None]
    g_vd = torch.zeros(tokens, value_dim, device=device, dtype=torch.float32)
    if grad_v is None:
        g_vc = torch.zeros(tokens, value_dim, device=device, dtype=torch.float32)
    else:
        flat = grad_v.reshape(tokens, 2 * value_dim).float()
        g_vc = flat[:, :value_dim].clone()  # never a view of grad_v (fp32: .float() copies nothing): outputs own memory
        g_vd[:-1] = flat[1:, value_dim:]
        g_vd = torch.where(is_last, 0.0, g_vd)  # t + 1 starts another sequence
    if grad_final_value_state is not None:
        g_vd = g_vd + torch.where(is_last, grad_final_value_state.float()[seq], 0.0)
    return g_vc, g_vd


def cca_prepare_bwd(grad_q, grad_k, grad_v, grad_final_conv_state, grad_final_value_state, qk, v_current, v_delayed,
                    conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions, cu_seqlens,
                    num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state=None,
                    initial_value_state=None, has_initial_state=None):
    """Gradients of cca_prepare (shapes as zaya_kernels.ops.cca.cca_prepare; incoming gradients may be None).

    Returns (grad_qk [T, C], grad_v_current, grad_v_delayed [T, n_kv D / 2], grad_conv0_weight [C, k0],
    grad_conv0_bias [C], grad_conv1_weight [C, D, k1], grad_conv1_bias [C], grad_temperature [n_kv]), each in its
    input's dtype. The initial states' gradients are computed by zaya_kernels.ops.cca, not here.
    """
    tokens, channels = qk.shape
    head_dim, k1 = conv1_weight.shape[1], conv1_weight.shape[2]
    k0 = conv0_weight.shape[1]
    state_len = k0 + k1 - 2
    heads = num_q_heads + num_kv_heads
    value_dim = v_current.shape[1]
    num_seqs = cu_seqlens.shape[0] - 1
    device = qk.device
    f32 = torch.float32
    g_vc, g_vd = _value_grads(grad_v, grad_final_value_state, cu_seqlens, tokens, value_dim, device)
    if tokens == 0:
        zeros = tuple(torch.zeros_like(t) for t in (qk, conv0_weight, conv0_bias, conv1_weight, conv1_bias,
                                                     temperature))
        return (zeros[0], g_vc.to(v_current.dtype), g_vd.to(v_delayed.dtype)) + zeros[1:]

    has_init = initial_conv_state is not None
    if has_init and has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.to(torch.int32)
    init_conv, has_init_flags = (initial_conv_state, has_initial_state) if has_init else (None, None)
    grad_q = None if grad_q is None else grad_q.contiguous()
    grad_k = None if grad_k is None else grad_k.contiguous()
    has_gconv = grad_final_conv_state is not None and state_len > 0
    grad_conv = grad_final_conv_state.contiguous() if has_gconv else None
    search_steps = max(1, num_seqs).bit_length()
    ieee = qk.dtype == f32
    stages = backward_num_stages(head_dim, k0, k1, ieee)

    gz = torch.empty(tokens, channels, device=device, dtype=f32)
    z_tiles = triton.cdiv(tokens, GRAD_Z_BLOCK_T)
    temp_part = torch.empty(z_tiles, num_kv_heads, device=device, dtype=f32)
    cca_bwd_grad_z_kernel[(z_tiles, heads)](
        qk, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions, cu_seqlens,
        _inv_freq(rotary_dim, rope_theta, device), init_conv, has_init_flags, grad_q, grad_k, gz, temp_part,
        tokens, num_seqs, search_steps, EPS=torch.finfo(qk.dtype).eps, HEAD_SCALE=head_dim**0.5,
        NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, K0=k0, K1=k1,
        HAS_INIT=has_init, HAS_GQ=grad_q is not None, HAS_GK=grad_k is not None, BLOCK_T=GRAD_Z_BLOCK_T,
        **_grad_z_blocks(head_dim, rotary_dim), IEEE_DOT=ieee,
        num_warps=backward_num_warps("cca_backward_grad_z", ieee), num_stages=stages,
    )

    block_d = _block(head_dim)
    p = torch.empty(k1, tokens, channels, device=device, dtype=f32)
    blocks = _conv_input_blocks(head_dim)
    cca_bwd_conv_input_kernel[(triton.cdiv(tokens, CONV_INPUT_BLOCK_T), heads,
                               _tap_programs(k1) * triton.cdiv(head_dim, blocks["BLOCK_I"]))](
        qk, conv1_weight, gz, p, tokens, NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, K1=k1,
        BLOCK_T=CONV_INPUT_BLOCK_T, **blocks, IEEE_DOT=ieee, num_warps=NUM_WARPS, num_stages=stages,
    )

    per_chunk, chunks = _weight_chunks(tokens)
    block_i = min(WEIGHT_BLOCK_I, block_d)
    gw1_part = torch.empty(chunks, channels, head_dim, k1, device=device, dtype=f32)
    gb1_part = torch.empty(chunks, channels, device=device, dtype=f32)
    cca_bwd_weights_kernel[(chunks, heads, k1 * triton.cdiv(head_dim, block_i))](
        qk, conv0_weight, conv0_bias, cu_seqlens, init_conv, has_init_flags, gz, gw1_part, gb1_part,
        tokens, num_seqs, search_steps, per_chunk, NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim,
        K0=k0, K1=k1, HAS_INIT=has_init, BLOCK_T=WEIGHT_BLOCK_T, BLOCK_I=block_i, BLOCK_D=block_d, IEEE_DOT=ieee,
        num_warps=NUM_WARPS, num_stages=stages,
    )

    x_tiles = triton.cdiv(tokens, GRAD_X_BLOCK_T)
    grad_qk = torch.empty_like(qk)
    gw0_part = torch.empty(x_tiles, channels, k0, device=device, dtype=f32)
    gb0_part = torch.empty(x_tiles, channels, device=device, dtype=f32)
    block_x = min(GRAD_X_BLOCK_D, block_d)
    cca_bwd_grad_x_kernel[(x_tiles, heads, triton.cdiv(head_dim, block_x))](
        qk, conv0_weight, cu_seqlens, init_conv, has_init_flags, gz, p, grad_conv, grad_qk, gw0_part, gb0_part,
        tokens, num_seqs, search_steps, NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, K0=k0, K1=k1,
        HAS_INIT=has_init, HAS_GCONV=has_gconv, BLOCK_T=GRAD_X_BLOCK_T, BLOCK_D=block_x, num_warps=NUM_WARPS,
        num_stages=stages,
    )
    return (grad_qk, g_vc.to(v_current.dtype), g_vd.to(v_delayed.dtype),
            gw0_part.sum(0).to(conv0_weight.dtype), gb0_part.sum(0).to(conv0_bias.dtype),
            gw1_part.sum(0).to(conv1_weight.dtype), gb1_part.sum(0).to(conv1_bias.dtype),
            temp_part.sum(0).to(temperature.dtype))


# ---------------------------------------------------------------- ahead-of-time configurations
_AOT_KERNELS = {"cca_backward_grad_z": cca_bwd_grad_z_kernel, "cca_backward_conv_input": cca_bwd_conv_input_kernel,
                "cca_backward_weights": cca_bwd_weights_kernel, "cca_backward_grad_x": cca_bwd_grad_x_kernel}


def _backward_aot_configs():
    """ZAYA1: n_q 8, n_kv 2, D 128, rotary 64, k0 = k1 = 2; bf16 activations, weights and incoming gradients, with
    and without initial states, and the fp32 (IEEE dot) path. The workspaces and partials are fp32."""
    head_dim, rotary_dim, k0, k1, num_q, num_kv = 128, 64, 2, 2, 8, 2
    grad_z_args = ("qk_ptr", "w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr", "temp_ptr", "pos_ptr", "cu_ptr", "inv_freq_ptr",
                   "init_conv_ptr", "has_init_ptr", "gq_ptr", "gk_ptr", "gz_ptr", "temp_part_ptr", "T", "NUM_SEQS",
                   "SEARCH_STEPS")
    conv_input_args = ("qk_ptr", "w1_ptr", "gz_ptr", "p_ptr", "T")
    weight_args = ("qk_ptr", "w0_ptr", "b0_ptr", "cu_ptr", "init_conv_ptr", "has_init_ptr", "gz_ptr", "gw1_part_ptr",
                   "gb1_part_ptr", "T", "NUM_SEQS", "SEARCH_STEPS", "TILES_PER_CHUNK")
    grad_x_args = ("qk_ptr", "w0_ptr", "cu_ptr", "init_conv_ptr", "has_init_ptr", "gz_ptr", "p_ptr", "gconv_ptr",
                   "gqk_ptr", "gw0_part_ptr", "gb0_part_ptr", "T", "NUM_SEQS", "SEARCH_STEPS")
    configs = {name: [] for name in _AOT_KERNELS}
    for act, has_init in (("bf16", False), ("bf16", True), ("fp32", False)):
        types = {name: f"*{act}" for name in ("qk_ptr", "gq_ptr", "gk_ptr", "gqk_ptr", "w0_ptr", "b0_ptr", "w1_ptr",
                                              "b1_ptr", "temp_ptr")}
        types.update({name: "*fp32" for name in ("inv_freq_ptr", "init_conv_ptr", "gz_ptr", "p_ptr", "temp_part_ptr",
                                                 "gw1_part_ptr", "gb1_part_ptr", "gw0_part_ptr", "gb0_part_ptr",
                                                 "gconv_ptr")})
        types.update({"pos_ptr": "*i64", "cu_ptr": "*i32", "has_init_ptr": "*i32", "T": "i32", "NUM_SEQS": "i32",
                      "SEARCH_STEPS": "i32", "TILES_PER_CHUNK": "i32"})
        common = {"NUM_Q": num_q, "NUM_KV": num_kv, "HEAD_DIM": head_dim, "K0": k0, "K1": k1, "HAS_INIT": has_init}
        if not has_init:  # passed as None
            common.update(init_conv_ptr=None, has_init_ptr=None)
        ieee = act == "fp32"
        label = f"{act},init={int(has_init)},D={head_dim},R={rotary_dim},k0={k0},k1={k1}"
        variants = (
            ("cca_backward_grad_z", grad_z_args,
             {**common, "EPS": torch.finfo(torch.bfloat16 if act == "bf16" else torch.float32).eps,
              "HEAD_SCALE": head_dim**0.5, "ROTARY_DIM": rotary_dim, "HAS_GQ": True, "HAS_GK": True,
              "BLOCK_T": GRAD_Z_BLOCK_T, **_grad_z_blocks(head_dim, rotary_dim), "IEEE_DOT": ieee}),
            ("cca_backward_conv_input", conv_input_args,
             {"NUM_Q": num_q, "NUM_KV": num_kv, "HEAD_DIM": head_dim, "K1": k1, "BLOCK_T": CONV_INPUT_BLOCK_T,
              **_conv_input_blocks(head_dim), "IEEE_DOT": ieee}),
            ("cca_backward_weights", weight_args,
             {**common, "BLOCK_T": WEIGHT_BLOCK_T, "BLOCK_I": WEIGHT_BLOCK_I, "BLOCK_D": _block(head_dim),
              "IEEE_DOT": ieee}),
            ("cca_backward_grad_x", grad_x_args,
             {**common, "HAS_GCONV": True, "BLOCK_T": GRAD_X_BLOCK_T, "BLOCK_D": GRAD_X_BLOCK_D}),
        )
        for name, args, consts in variants:
            if name == "cca_backward_conv_input" and has_init:
                continue  # no initial-state argument: one config per dtype
            signature = {arg: "constexpr" if arg in consts else types[arg] for arg in args}
            signature.update({key: "constexpr" for key in consts})
            config_label = f"{act},D={head_dim},k1={k1}" if name == "cca_backward_conv_input" else label
            configs[name].append(AotConfig(label=f"{config_label},BLOCK_T={consts['BLOCK_T']}", signature=signature,
                                           constexprs=consts, num_warps=backward_num_warps(name, ieee),
                                           num_stages=backward_num_stages(head_dim, k0, k1, ieee),
                                           matrix_expected=name != "cca_backward_grad_x" and not ieee))
    return configs


for _name, _configs in _backward_aot_configs().items():
    register_aot(_name, _AOT_KERNELS[_name], _configs)
