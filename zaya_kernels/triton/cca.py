"""Triton kernels for ZAYA's CCA projection (DESIGN.md 1.1 steps 3-8): packed varlen prefill and decode.

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
from zaya_kernels.triton._aot import AotConfig, register_aot


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
def _conv_tap(acc, y, w1_ptr, head, inputs, imask, outs, omask, j1, HEAD_DIM, K1: tl.constexpr,
              IEEE_DOT: tl.constexpr):
    """acc [R, O] += y [R, I] @ W1[head D + outs, inputs, j1]^T (the weight tile read transposed, [I, O])."""
    offs = (head * HEAD_DIM + outs[None, :]) * (HEAD_DIM * K1) + inputs[:, None] * K1 + j1  # int32: C D k1 < 2^31
    w = tl.load(w1_ptr + offs, mask=imask[:, None] & omask[None, :], other=0.0).to(y.dtype)
    if IEEE_DOT:
        return tl.dot(y, w, acc, input_precision="ieee")
    return tl.dot(y, w, acc)


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
               STATE_LEN: tl.constexpr, HAS_STATE: tl.constexpr):
    """X_{t - shift} [BLOCK_T, channels] for the given channels: packed X inside the sequence, else the sequence's
    conv state column STATE_LEN - (seq_start - (t - shift)), else 0 (a fresh sequence)."""
    src = tokens - shift
    inside = src >= seq_start
    mask = token_mask[:, None] & dmask[None, :]
    x = tl.load(qk_ptr + src.to(tl.int64)[:, None] * C + channels[None, :], mask=mask & inside[:, None],
                other=0.0).to(tl.float32)
    if HAS_STATE:
        col = STATE_LEN + src - seq_start
        from_state = mask & (~inside & has_state)[:, None]
        state = tl.load(conv_state_ptr + (seq.to(tl.int64)[:, None] * C + channels[None, :]) * STATE_LEN + col[:, None],
                        mask=from_state, other=0.0).to(tl.float32)
        x = tl.where(inside[:, None], x, state)
    return x


@triton.jit
def _value_rows(vc_ptr, vd_ptr, value_state_ptr, v_ptr, head, tokens, token_mask, row_valid, seq, seq_start,
                has_state, NUM_Q, NUM_KV, HEAD_DIM, HAS_STATE: tl.constexpr, DECODE: tl.constexpr):
    """v rows [BLOCK_T, D] of kv head j = head - n_q. Flat value index f = j D + d (value_dim = n_kv D / 2):
    f < value_dim is Vc_t[f]; the rest is Vd_{t-1}[f - value_dim] of the previous token of the sequence, else of
    the sequence's value state seq, else 0. Rows that are not row_valid get zeros.
    DECODE (every row its own sequence, seq = its slot): the delayed part is the slot's value state, which the
    row's Vd_t then replaces, after a barrier (other threads of the program may still be reading it)."""
    value_dim = NUM_KV * HEAD_DIM // 2
    state_rows = seq.to(tl.int64)[:, None] * value_dim
    # 32 dims at a time: a [BLOCK_T, 128] tile can give each wave 8 whole rows, and every such row's masks and
    # offsets then take scalar registers of their own (past AMD's SGPR file); a [BLOCK_T, 32] one spreads the rows
    # over the lanes.
    for d0 in tl.static_range(0, HEAD_DIM, 32):
        dims = d0 + tl.arange(0, 32)
        flat = (head - NUM_Q) * HEAD_DIM + dims
        mask = token_mask[:, None] & (dims < HEAD_DIM)[None, :]
        is_current = flat < value_dim
        current = tl.load(vc_ptr + tokens.to(tl.int64)[:, None] * value_dim + flat[None, :],
                          mask=mask & is_current[None, :], other=0.0).to(tl.float32)
        delayed_col = flat - value_dim
        delayed_mask = mask & (~is_current)[None, :]
        state_offs = state_rows + delayed_col[None, :]
        if DECODE:
            from_state = delayed_mask & row_valid[:, None]
            delayed = tl.load(value_state_ptr + state_offs, mask=from_state, other=0.0).to(tl.float32)
            newest = tl.load(vd_ptr + tokens.to(tl.int64)[:, None] * value_dim + delayed_col[None, :],
                             mask=from_state, other=0.0)
        else:
            prev = tokens - 1
            prev_inside = prev >= seq_start
            delayed = tl.load(vd_ptr + prev.to(tl.int64)[:, None] * value_dim + delayed_col[None, :],
                              mask=delayed_mask & prev_inside[:, None], other=0.0).to(tl.float32)
            if HAS_STATE:
                from_state = delayed_mask & (~prev_inside & has_state)[:, None]
                state = tl.load(value_state_ptr + state_offs, mask=from_state, other=0.0).to(tl.float32)
                delayed = tl.where(prev_inside[:, None], delayed, state)
        value = tl.where(is_current[None, :] & row_valid[:, None], current, delayed)
        offs = tokens.to(tl.int64)[:, None] * (NUM_KV * HEAD_DIM) + flat[None, :]
        tl.store(v_ptr + offs, value.to(v_ptr.dtype.element_ty), mask=mask)
        if DECODE:
            tl.debug_barrier()
            tl.store(value_state_ptr + state_offs, newest.to(value_state_ptr.dtype.element_ty), mask=from_state)


@triton.jit
def _project_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, conv_state_ptr, temp_ptr, pos_ptr, inv_freq_ptr, q_ptr,
                  k_ptr, head, tokens, token_mask, row_valid, seq, seq_start, has_state, EPS: tl.constexpr,
                  HEAD_SCALE: tl.constexpr, NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                  ROTARY_DIM: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, HAS_STATE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                  IEEE_DOT: tl.constexpr):
    """Q rows (head < n_q, into q [T, n_q, D]) or K rows (into k [T, n_kv, D]) [BLOCK_T, D] of head `head`:
    Z = b1 + coupling residual + sum_j1 Y_{t - (k1 - 1 - j1)} @ W1[head, :, :, j1]^T, the Y computed from the X
    halo of _shifted_x (conv state row `seq`); then QK norm (keys times their temperature) and NeoX RoPE. Rows that
    are not row_valid get zeros."""
    act_dtype = qk_ptr.dtype.element_ty
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
    row_offsets = tokens.to(tl.int64) * C
    z_lo = _conv_start(b1_ptr, qk_ptr, row_offsets, token_mask, lo, lo_mask, head, NUM_Q, HEAD_DIM, GROUP)
    z_hi = _conv_start(b1_ptr, qk_ptr, row_offsets, token_mask, lo + half, lo_mask, head, NUM_Q, HEAD_DIM, GROUP)
    z_rest = _conv_start(b1_ptr, qk_ptr, row_offsets, token_mask, rest, rest_mask, head, NUM_Q, HEAD_DIM, GROUP)
    for i0 in tl.range(0, HEAD_DIM, BLOCK_I, loop_unroll_factor=1):  # unrolling only costs scalar registers
        inputs = i0 + tl.arange(0, BLOCK_I)
        imask = inputs < HEAD_DIM
        in_channels = head * HEAD_DIM + inputs
        b0 = tl.load(b0_ptr + in_channels, mask=imask, other=0.0).to(tl.float32)
        for j1 in tl.static_range(K1):
            # Y_{t - (K1 - 1 - j1)} of these input channels: the depthwise conv of the X halo (its bias included even
            # before the sequence start), rounded to A like transformers' conv output
            y = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32) + b0[None, :]
            for j0 in tl.static_range(K0):
                shift = (K1 - 1 - j1) + (K0 - 1 - j0)
                w0 = tl.load(w0_ptr + in_channels * K0 + j0, mask=imask, other=0.0).to(tl.float32)
                y += w0[None, :] * _shifted_x(qk_ptr, conv_state_ptr, tokens, token_mask, seq, seq_start, has_state,
                                              in_channels, imask, shift, C, STATE_LEN, HAS_STATE)
            y = y.to(act_dtype)
            z_lo = _conv_tap(z_lo, y, w1_ptr, head, inputs, imask, lo, lo_mask, j1, HEAD_DIM, K1, IEEE_DOT)
            z_hi = _conv_tap(z_hi, y, w1_ptr, head, inputs, imask, lo + half, lo_mask, j1, HEAD_DIM, K1, IEEE_DOT)
            z_rest = _conv_tap(z_rest, y, w1_ptr, head, inputs, imask, rest, rest_mask, j1, HEAD_DIM, K1, IEEE_DOT)

    # QK norm (keys times their temperature), then NeoX RoPE: lo' = lo cos - hi sin, hi' = hi cos + lo sin.
    z_lo = tl.where(lo_mask[None, :], z_lo, 0.0)
    z_hi = tl.where(lo_mask[None, :], z_hi, 0.0)
    z_rest = tl.where(rest_mask[None, :], z_rest, 0.0)
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
    _store_head((z_lo * cos - z_hi * sin) * scale[:, None], lo, lo_mask, tokens, token_mask, out_ptr, row_stride)
    _store_head((z_hi * cos + z_lo * sin) * scale[:, None], lo + half, lo_mask, tokens, token_mask, out_ptr,
                row_stride)
    _store_head(z_rest * scale[:, None], rest, rest_mask, tokens, token_mask, out_ptr, row_stride)


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
    init_conv_ptr, init_value_ptr, has_init_ptr, q_ptr, k_ptr, v_ptr,
    T, NUM_SEQS, SEARCH_STEPS, EPS: tl.constexpr, HEAD_SCALE: tl.constexpr,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, K0: tl.constexpr,
    K1: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """Prefill of BLOCK_T packed tokens for one head (a tile may span several sequences). The initial-state
    pointers are None without HAS_INIT."""
    # Model sizes are constexpr (one specialisation per model: fewer scalar registers, constant index arithmetic).
    # Values first: what only they use is then dead before the conv loop instead of held across it. Each part
    # finds its rows' sequences itself (a few cached loads of cu_seqlens): with one shared set, ptxas capped the
    # sm_90 kernel at 128 registers and spilled (measured with aot-report).
    head = tl.program_id(1)
    if head >= NUM_Q:
        tokens, token_mask, seq, seq_start, has_init = _prefill_rows(cu_ptr, has_init_ptr, T, NUM_SEQS, SEARCH_STEPS,
                                                                     HAS_INIT, BLOCK_T)
        _value_rows(vc_ptr, vd_ptr, init_value_ptr, v_ptr, head, tokens, token_mask, token_mask, seq, seq_start,
                    has_init, NUM_Q, NUM_KV, HEAD_DIM, HAS_INIT, False)
    tokens, token_mask, seq, seq_start, has_init = _prefill_rows(cu_ptr, has_init_ptr, T, NUM_SEQS, SEARCH_STEPS,
                                                                 HAS_INIT, BLOCK_T)
    _project_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, init_conv_ptr, temp_ptr, pos_ptr, inv_freq_ptr, q_ptr, k_ptr,
                  head, tokens, token_mask, token_mask, seq, seq_start, has_init, EPS, HEAD_SCALE, NUM_Q, NUM_KV,
                  HEAD_DIM, ROTARY_DIM, K0, K1, HAS_INIT, BLOCK_T, BLOCK_I, BLOCK_HALF, BLOCK_REST, IEEE_DOT)


@triton.jit
def _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T: tl.constexpr):
    """This program's decode rows: (row, row < ROWS, row has a slot (0 <= index < slots), slot or 0 without one)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < ROWS
    index = tl.load(state_index_ptr + rows, mask=row_mask, other=-1)
    row_valid = (index >= 0) & (index < NUM_SLOTS)  # negative / out of range: padded row
    return rows, row_mask, row_valid, tl.where(row_valid, index, 0)


@triton.jit
def _shift_conv_state(qk_ptr, conv_state_ptr, rows, row_valid, slot, head, C: tl.constexpr, HEAD_DIM: tl.constexpr,
                      STATE_LEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Shift this head's conv-state channels of each valid row's slot by one column (the newest is the row's X).
    Everything is loaded before a barrier and stored after it: other threads of the program may still be reading
    the old columns."""
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    channels = head * HEAD_DIM + dims
    mask2 = row_valid[:, None] & dmask[None, :]  # row_valid implies rows < ROWS
    base2 = (slot.to(tl.int64)[:, None] * C + channels[None, :]) * STATE_LEN
    if STATE_LEN <= 2:  # ZAYA's k0 = k1 = 2: two [rows, D] tiles instead of the general 3D one (fewer registers)
        newest2 = tl.load(qk_ptr + rows.to(tl.int64)[:, None] * C + channels[None, :], mask=mask2, other=0.0)
        if STATE_LEN == 2:
            older2 = tl.load(conv_state_ptr + base2 + 1, mask=mask2, other=0.0)
    else:
        cols = tl.arange(0, BLOCK_K)
        col3 = cols[None, None, :]
        mask3 = mask2[:, :, None] & (col3 < STATE_LEN)
        state_offs = base2[:, :, None] + col3
        older = tl.load(conv_state_ptr + state_offs + 1, mask=mask3 & (col3 + 1 < STATE_LEN), other=0.0)
        newest = tl.load(qk_ptr + rows.to(tl.int64)[:, None] * C + channels[None, :], mask=mask2, other=0.0)
        new_state = tl.where(col3 + 1 < STATE_LEN, older.to(tl.float32), newest.to(tl.float32)[:, :, None])
    tl.debug_barrier()
    if STATE_LEN == 2:
        tl.store(conv_state_ptr + base2, older2.to(conv_state_ptr.dtype.element_ty), mask=mask2)
    if STATE_LEN <= 2 and STATE_LEN > 0:
        tl.store(conv_state_ptr + base2 + STATE_LEN - 1, newest2.to(conv_state_ptr.dtype.element_ty), mask=mask2)
    if STATE_LEN > 2:
        tl.store(conv_state_ptr + state_offs, new_state.to(conv_state_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def cca_decode_kernel(
    qk_ptr, vc_ptr, vd_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, temp_ptr, pos_ptr, inv_freq_ptr,
    conv_state_ptr, value_state_ptr, state_index_ptr, q_ptr, k_ptr, v_ptr,
    ROWS, NUM_SLOTS, EPS: tl.constexpr, HEAD_SCALE: tl.constexpr,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, K0: tl.constexpr,
    K1: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """Decode of BLOCK_T rows for one head: row t is a one-token sequence whose history is slot state_index[t] of
    conv_state [slots, C, K] and value_state [slots, n_kv D / 2]; this program then updates its own head's
    elements of those slots in place."""
    head = tl.program_id(1)
    # Each part loads its row values itself rather than keeping one set: where a tile gives a wave whole rows they
    # are scalars, one set per row, and kept they would be held across the conv loop (gfx942: 89 SGPRs, not 76).
    if head >= NUM_Q:
        rows, row_mask, row_valid, slot = _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T)
        _value_rows(vc_ptr, vd_ptr, value_state_ptr, v_ptr, head, rows, row_mask, row_valid, slot, rows,
                    row_valid, NUM_Q, NUM_KV, HEAD_DIM, True, True)
    # seq_start = the row itself: the conv halo before it comes from the slot's conv state
    rows, row_mask, row_valid, slot = _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T)
    _project_head(qk_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, conv_state_ptr, temp_ptr, pos_ptr, inv_freq_ptr, q_ptr,
                  k_ptr, head, rows, row_mask, row_valid, slot, rows, row_valid, EPS, HEAD_SCALE, NUM_Q, NUM_KV,
                  HEAD_DIM, ROTARY_DIM, K0, K1, True, BLOCK_T, BLOCK_I, BLOCK_HALF, BLOCK_REST, IEEE_DOT)
    rows, row_mask, row_valid, slot = _decode_rows(state_index_ptr, ROWS, NUM_SLOTS, BLOCK_T)
    _shift_conv_state(qk_ptr, conv_state_ptr, rows, row_valid, slot, head, (NUM_Q + NUM_KV) * HEAD_DIM, HEAD_DIM,
                      K0 + K1 - 2, BLOCK_D, BLOCK_K)


@triton.jit
def cca_final_states_kernel(
    qk_ptr, vd_ptr, cu_ptr, init_conv_ptr, init_value_ptr, has_init_ptr, final_conv_ptr, final_value_ptr,
    C, VALUE_DIM,
    STATE_LEN: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Final states of sequence b: conv columns X_{end - K + i} (i < K; from X, the initial state or 0) and
    Vd_{end - 1}."""
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
        x = tl.load(qk_ptr + src.to(tl.int64)[None, :] * C + channels[:, None], mask=mask & inside[None, :],
                    other=0.0).to(tl.float32)
        if HAS_INIT:
            state_col = STATE_LEN + src - start
            state = tl.load(init_conv_ptr + (seq.to(tl.int64) * C + channels[:, None]) * STATE_LEN + state_col[None, :],
                            mask=mask & (~inside)[None, :] & has_init[:, None], other=0.0).to(tl.float32)
            x = tl.where(inside[None, :], x, state)
        tl.store(final_conv_ptr + (seq.to(tl.int64) * C + channels[:, None]) * STATE_LEN + cols[None, :], x, mask=mask)
    vmask = channels < VALUE_DIM
    nonempty = (tl.zeros_like(channels) + end) > start  # as a block: the interpreter rejects scalar-masked loads
    last = tl.load(vd_ptr + (end - 1).to(tl.int64) * VALUE_DIM + channels, mask=vmask & nonempty,
                   other=0.0).to(tl.float32)
    if HAS_INIT:
        state = tl.load(init_value_ptr + seq.to(tl.int64) * VALUE_DIM + channels, mask=vmask & ~nonempty & has_init,
                        other=0.0).to(tl.float32)
        last = tl.where(nonempty, last, state)
    tl.store(final_value_ptr + seq.to(tl.int64) * VALUE_DIM + channels, last, mask=vmask)


# ---------------------------------------------------------------- launchers
BLOCK_T = 16  # rows per prefill program: 32 and 64 spill (scalar registers on gfx942/gfx950, vector ones on sm_90)
CONV_BLOCK_I = 16  # input channels per grouped-conv step: [16, D] weight tiles (32 spills on sm_90)
NUM_WARPS = 4
DECODE_BLOCK_ROWS = 16  # the smallest tile tl.dot takes; decode batches share each weight tile
FINAL_BLOCK_C = 128
_inv_freq_cache: dict = {}


def _inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """1 / theta^(2i / rotary_dim) fp32, computed once per (rotary_dim, theta, device) as transformers does; kept so
    decode launches one kernel (and stays graph-capturable after the first call)."""
    key = (rotary_dim, theta, str(device))
    if key not in _inv_freq_cache:
        freq = rope_inv_freq(rotary_dim, theta, device)
        _inv_freq_cache[key] = freq if freq.numel() else torch.zeros(1, device=device)
    return _inv_freq_cache[key]


def _blocks(head_dim: int, rotary_dim: int, decode: bool, k0: int = 0, k1: int = 0) -> dict:
    """Block sizes (constexprs) for a head of D dims with R rotary dims; tl.dot needs every dimension >= 16.
    BLOCK_D (whole head) and BLOCK_K (conv-state columns) are for the decode kernel's conv-state shift."""
    def block(n):
        return max(16, triton.next_power_of_2(max(1, n)))

    blocks = {"BLOCK_I": min(CONV_BLOCK_I, block(head_dim)), "BLOCK_HALF": block(rotary_dim // 2),
              "BLOCK_REST": block(head_dim - rotary_dim)}
    if decode:
        blocks.update(BLOCK_D=block(head_dim), BLOCK_K=triton.next_power_of_2(max(1, k0 + k1 - 2)))
    return blocks


def _fp32(t):
    return t if t.dtype == torch.float32 else t.float()


def cca_prepare_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                    positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state,
                    initial_value_state, has_initial_state, q, k, v, final_conv_state, final_value_state):
    """Launch the prefill into preallocated outputs (shapes as in zaya_kernels.ops.cca.cca_prepare)."""
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
            cu_seqlens, inv_freq, *init_args, q, k, v,
            tokens, num_seqs, max(1, num_seqs).bit_length(), EPS=eps, HEAD_SCALE=head_dim**0.5,
            NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, K0=k0, K1=k1,
            HAS_INIT=has_init, BLOCK_T=BLOCK_T, **_blocks(head_dim, rotary_dim, decode=False),
            IEEE_DOT=qk.dtype == torch.float32, num_warps=NUM_WARPS,
        )
    if num_seqs > 0:
        state_len = k0 + k1 - 2
        cca_final_states_kernel[(num_seqs, triton.cdiv(channels, FINAL_BLOCK_C))](
            qk, v_delayed, cu_seqlens, *init_args, final_conv_state, final_value_state, channels, v_current.shape[1],
            STATE_LEN=state_len, HAS_INIT=has_init, BLOCK_C=FINAL_BLOCK_C,
            BLOCK_K=triton.next_power_of_2(max(1, state_len)), num_warps=4,
        )


def cca_prepare_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                       positions, conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim,
                       rope_theta, q, k, v):
    """Launch the decode step (one kernel) into preallocated q, k, v; updates conv_state and value_state in place."""
    rows = qk.shape[0]
    if rows == 0:
        return
    head_dim, k1 = conv1_weight.shape[1], conv1_weight.shape[2]
    k0 = conv0_weight.shape[1]
    cca_decode_kernel[(triton.cdiv(rows, DECODE_BLOCK_ROWS), num_q_heads + num_kv_heads)](
        qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
        _inv_freq(rotary_dim, rope_theta, qk.device), conv_state, value_state, state_indices, q, k, v,
        rows, conv_state.shape[0], EPS=torch.finfo(qk.dtype).eps, HEAD_SCALE=head_dim**0.5,
        NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, K0=k0, K1=k1,
        BLOCK_T=DECODE_BLOCK_ROWS, **_blocks(head_dim, rotary_dim, decode=True, k0=k0, k1=k1),
        IEEE_DOT=qk.dtype == torch.float32, num_warps=NUM_WARPS,
    )


def _aot_configs():
    """The configurations ZAYA1 runs: D = 128 (BLOCK_D 128), k0 = k1 = 2, bf16 activations (and fp32 for the IEEE
    prefill path), prefill with and without initial states, decode with fp32 and bf16 states."""
    head_dim, rotary_dim, k0, k1 = 128, 64, 2, 2
    state_len = k0 + k1 - 2
    prefill_args = ("qk_ptr", "vc_ptr", "vd_ptr", "w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr", "temp_ptr", "pos_ptr",
                    "cu_ptr", "inv_freq_ptr", "init_conv_ptr", "init_value_ptr", "has_init_ptr", "q_ptr", "k_ptr",
                    "v_ptr", "T", "NUM_SEQS", "SEARCH_STEPS")
    decode_args = ("qk_ptr", "vc_ptr", "vd_ptr", "w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr", "temp_ptr", "pos_ptr",
                   "inv_freq_ptr", "conv_state_ptr", "value_state_ptr", "state_index_ptr", "q_ptr", "k_ptr", "v_ptr",
                   "ROWS", "NUM_SLOTS")
    # (activation dtype, state dtype, HAS_INIT, DECODE)
    variants = (("bf16", "fp32", False, False), ("bf16", "fp32", True, False), ("fp32", "fp32", False, False),
                ("bf16", "fp32", True, True), ("bf16", "bf16", True, True))
    prefill, decode_configs, final = [], [], []
    for act, state, has_init, decode in variants:
        types = {name: f"*{act}" for name in ("qk_ptr", "vc_ptr", "vd_ptr", "q_ptr", "k_ptr", "v_ptr")}
        types.update({name: "*bf16" if act == "bf16" else "*fp32"
                      for name in ("w0_ptr", "b0_ptr", "w1_ptr", "b1_ptr", "temp_ptr")})
        types.update({name: f"*{state}" for name in ("init_conv_ptr", "init_value_ptr", "conv_state_ptr",
                                                      "value_state_ptr")})
        types.update({"inv_freq_ptr": "*fp32", "pos_ptr": "*i64", "cu_ptr": "*i32", "has_init_ptr": "*i32",
                      "state_index_ptr": "*i32", "T": "i32", "NUM_SEQS": "i32", "SEARCH_STEPS": "i32", "ROWS": "i32",
                      "NUM_SLOTS": "i32"})
        block_t = DECODE_BLOCK_ROWS if decode else BLOCK_T
        consts = {"EPS": torch.finfo(torch.bfloat16 if act == "bf16" else torch.float32).eps,
                  "HEAD_SCALE": head_dim**0.5, "NUM_Q": 8, "NUM_KV": 2, "HEAD_DIM": head_dim,
                  "ROTARY_DIM": rotary_dim, "K0": k0, "K1": k1, "BLOCK_T": block_t,
                  **_blocks(head_dim, rotary_dim, decode, k0, k1), "IEEE_DOT": act == "fp32"}
        if not decode:
            consts["HAS_INIT"] = has_init
            if not has_init:  # passed as None
                consts.update(init_conv_ptr=None, init_value_ptr=None, has_init_ptr=None)
        signature = {name: "constexpr" if name in consts else types[name]
                     for name in (decode_args if decode else prefill_args)}
        signature.update({name: "constexpr" for name in consts})
        mode = f"decode,state={state}" if decode else f"prefill,init={int(has_init)}"
        label = f"{mode},{act},D={head_dim},R={rotary_dim},k0={k0},k1={k1},BLOCK_T={block_t}"
        (decode_configs if decode else prefill).append(
            AotConfig(label=label, signature=signature, constexprs=consts, num_warps=NUM_WARPS,
                      matrix_expected=act == "bf16"))
        if not decode:
            final_consts = {"STATE_LEN": state_len, "HAS_INIT": has_init, "BLOCK_C": FINAL_BLOCK_C, "BLOCK_K": 2}
            final_sig = {"qk_ptr": f"*{act}", "vd_ptr": f"*{act}", "cu_ptr": "*i32", "init_conv_ptr": "*fp32",
                         "init_value_ptr": "*fp32", "has_init_ptr": "*i32", "final_conv_ptr": "*fp32",
                         "final_value_ptr": "*fp32", "C": "i32", "VALUE_DIM": "i32"}
            final_sig.update({name: "constexpr" for name in final_consts})
            final.append(AotConfig(label=f"{act},K={state_len},init={int(has_init)}", signature=final_sig,
                                   constexprs=final_consts, num_warps=4))
    return prefill, decode_configs, final


_prefill_configs, _decode_configs, _final_configs = _aot_configs()
register_aot("cca_prepare", cca_prepare_kernel, _prefill_configs)
register_aot("cca_prepare_decode", cca_decode_kernel, _decode_configs)
register_aot("cca_final_states", cca_final_states_kernel, _final_configs)
