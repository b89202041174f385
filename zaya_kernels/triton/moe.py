"""Triton kernels for ZAYA's top-1 MoE (DESIGN.md 1.4): dispatch and the two grouped expert GEMMs, with launchers.

Dispatch (`moe_dispatch_kernel`, one program): classes c = 0..E (E = skip) are columns of a one-hot
[CHUNK, C_PAD] tile. Pass 1 sums the one-hots into counts; tl.cumsum turns them into offsets. Pass 2 gives each token
the position offsets[c] + (tokens of c in earlier chunks) + (exclusive rank of the token among its class in this
chunk, a tl.cumsum down the chunk): a stable counting sort, O(T * C_PAD) work in registers, no atomics, no host
synchronisation. The tile map comes from the per-class tile counts cdiv(count, BLOCK_M) the same way. Above
SINGLE_PROGRAM_MAX_TOKENS the same steps run as three launches (count per chunk, one-program scan over the chunks,
place per chunk), so the O(T) work is spread over T / CHUNK programs.

Grouped GEMMs walk the tile map: grid (cdiv(T, BLOCK_M) + E tiles, column blocks); a tile is BLOCK_M consecutive
sorted rows of one class, so only the experts some token uses are ever read (the decode path streams just those
weights) and padding is at most one partial tile per class.
  GEMM 1 (`moe_gate_up_kernel`): gathers x rows by token id, multiplies by gate and up rows of gate_up[e]
      (two fp32 accumulators for the same BLOCK_N columns n and I + n) and stores a = SiLU(g) * u, rounded to the
      activation dtype, at the sorted rows of a [T, I] buffer. Unused tiles exit at once; the programs of a skip
      tile write its tokens' y rows (0 or w x, `_skip_rows`) and exit: no launch of their own. An earlier skip
      branch in the GEMMs made AMD spill SGPRs; this one costs none of the AOT configs a spill, a parked SGPR or
      occupancy (gfx942: 51 -> 86 SGPRs at most, of 102).
  GEMM 2 (`moe_down_kernel`): a [rows, I] x down[e]^T, times the routing weight in fp32, stored straight into y at
      the token's row (top-1: one writer per row, no reduction, no atomics).
By token (`moe_experts_by_token`, a few tokens at decode): no dispatch and no tile map. Two GEMVs,
  `moe_gate_up_by_token_kernel` (grid T x column blocks of I) and `moe_down_by_token_kernel` (T x column blocks of
  H): program (t, j) reads token t's class from expert_index and streams BLOCK_N rows of that expert's weights.
  No matrix instructions: one token fills one row of a 16-row tile; narrow column blocks instead give enough
  programs to stream the weights from every CU (256 per token at ZAYA1's sizes and BLOCK_N 8).
Backward (`moe_experts_backward`): bwd_act (g, u recomputed with q = dy down[e] in one K loop; writes [dg, du], a
and the routing-weight partials), bwd_dx (grad_x = [dg, du] gate_up[e]), moe_skip_bwd_kernel (w dy, <dy, x>) and
moe_wgrad_kernel twice (grad_gate_up[e] = [dg, du]_e^T x_e, grad_down[e] = (w dy)_e^T a_e, K = the expert's tokens).
Launch configurations (block sizes, warps, stages) come from zaya_kernels/configs/moe.json, per target (gfx942,
gfx950, sm_90, and the CPU interpreter) and token-count bucket; the bucket also fixes BLOCK_M, which the dispatch
tile map and both GEMMs must share. The by-token GEMVs have one entry per target ("by_token").
"""
from __future__ import annotations

from pathlib import Path

import torch
import triton
import triton.language as tl

from zaya_kernels.triton._aot import NO_PIPELINING, AotConfig, register_aot
from zaya_kernels.triton._target import ConfigTable, device_target

CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "moe.json"
# fp32 inputs multiply in full fp32 (not TF32) so they match the reference; bf16/fp16 inputs are unaffected.
DOT_PRECISION: tl.constexpr = tl.constexpr("ieee")


# ---------------------------------------------------------------- dispatch
@triton.jit
def _chunk_onehot(index_ptr, start, T, CHUNK: tl.constexpr, C_PAD: tl.constexpr):
    """(tokens, valid, one-hot [CHUNK, C_PAD] int32) of one chunk; padding rows get class C_PAD (no column)."""
    tokens = start + tl.arange(0, CHUNK)
    valid = tokens < T
    cls = tl.load(index_ptr + tokens, mask=valid, other=C_PAD)
    return tokens, valid, (cls[:, None] == tl.arange(0, C_PAD)[None, :]).to(tl.int32)


@triton.jit
def _place_chunk(index_ptr, sorted_ptr, inverse_ptr, start, base, T, CHUNK: tl.constexpr, C_PAD: tl.constexpr):
    """Stable positions of one chunk: base[c] (the sorted position of this chunk's first token of class c) plus the
    token's exclusive rank among its class in the chunk (a cumsum down the chunk)."""
    tokens, valid, onehot = _chunk_onehot(index_ptr, start, T, CHUNK, C_PAD)
    rank = tl.cumsum(onehot, axis=0) - onehot
    position = tl.sum(onehot * (rank + base[None, :]), axis=1)
    tl.store(sorted_ptr + position, tokens, mask=valid)
    tl.store(inverse_ptr + tokens, position, mask=valid)
    return tl.sum(onehot, axis=0)


@triton.jit
def _write_offsets_and_tiles(counts, counts_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, E, num_tiles,
                             BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, C_PAD: tl.constexpr):
    """counts, offsets and the tile map from the per-class counts; returns the class start positions."""
    classes = tl.arange(0, C_PAD)
    starts = tl.cumsum(counts, axis=0) - counts  # C_PAD >= E + 2, so starts[E + 1] = T
    tl.store(counts_ptr + classes, counts, mask=classes < E + 1)
    tl.store(offsets_ptr + classes, starts, mask=classes < E + 2)
    # class c owns tiles tiles_end[c] - class_tiles[c] .. tiles_end[c] - 1
    class_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(class_tiles, axis=0)
    tiles_first = tiles_end - class_tiles
    used_tiles = tl.sum(class_tiles, axis=0)
    for start in range(0, num_tiles, CHUNK):
        tiles = start + tl.arange(0, CHUNK)
        tile_class = tl.sum((tiles_end[None, :] <= tiles[:, None]).to(tl.int32), axis=1)
        select = classes[None, :] == tile_class[:, None]
        first = tl.sum(tl.where(select, tiles_first[None, :], 0), axis=1)
        row0 = tl.sum(tl.where(select, starts[None, :], 0), axis=1)
        used = tiles < used_tiles
        tl.store(tile_expert_ptr + tiles, tl.where(used, tile_class, -1), mask=tiles < num_tiles)
        tl.store(tile_start_ptr + tiles, tl.where(used, row0 + (tiles - first) * BLOCK_M, 0), mask=tiles < num_tiles)
    return starts


@triton.jit
def moe_dispatch_kernel(
    index_ptr, counts_ptr, offsets_ptr, sorted_ptr, inverse_ptr, tile_expert_ptr, tile_start_ptr,
    T, E, num_tiles,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, C_PAD: tl.constexpr,
):
    """The whole dispatch in one program (small T: one launch, decode)."""
    counts = tl.zeros((C_PAD,), dtype=tl.int32)
    for start in range(0, T, CHUNK):
        counts += tl.sum(_chunk_onehot(index_ptr, start, T, CHUNK, C_PAD)[2], axis=0)
    starts = _write_offsets_and_tiles(counts, counts_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, E, num_tiles,
                                      BLOCK_M, CHUNK, C_PAD)
    placed = starts  # tokens of each class already placed by earlier chunks, plus the class start
    for start in range(0, T, CHUNK):
        placed += _place_chunk(index_ptr, sorted_ptr, inverse_ptr, start, placed, T, CHUNK, C_PAD)


@triton.jit
def moe_dispatch_count_kernel(index_ptr, chunk_counts_ptr, T, CHUNK: tl.constexpr, C_PAD: tl.constexpr):
    """Large T, step 1 of 3 (one program per chunk): chunk_counts[chunk, c] = tokens of class c in the chunk."""
    chunk = tl.program_id(0)
    counts = tl.sum(_chunk_onehot(index_ptr, chunk * CHUNK, T, CHUNK, C_PAD)[2], axis=0)
    tl.store(chunk_counts_ptr + chunk * C_PAD + tl.arange(0, C_PAD), counts)


@triton.jit
def moe_dispatch_scan_kernel(
    chunk_counts_ptr, counts_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr,
    num_chunks, E, num_tiles,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, C_PAD: tl.constexpr,
):
    """Step 2 (one program): per-class totals, offsets and tile map; chunk_counts becomes, in place, each chunk's
    base position per class (class start + tokens of that class in earlier chunks)."""
    classes = tl.arange(0, C_PAD)
    counts = tl.zeros((C_PAD,), dtype=tl.int32)
    for chunk in range(0, num_chunks):
        counts += tl.load(chunk_counts_ptr + chunk * C_PAD + classes)
    starts = _write_offsets_and_tiles(counts, counts_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, E, num_tiles,
                                      BLOCK_M, CHUNK, C_PAD)
    base = starts
    for chunk in range(0, num_chunks):
        row = chunk_counts_ptr + chunk * C_PAD + classes
        in_chunk = tl.load(row)
        tl.store(row, base)
        base += in_chunk


@triton.jit
def moe_dispatch_place_kernel(
    index_ptr, chunk_base_ptr, sorted_ptr, inverse_ptr, T,
    CHUNK: tl.constexpr, C_PAD: tl.constexpr,
):
    """Step 3 (one program per chunk): the stable positions of the chunk's tokens."""
    chunk = tl.program_id(0)
    base = tl.load(chunk_base_ptr + chunk * C_PAD + tl.arange(0, C_PAD))
    _place_chunk(index_ptr, sorted_ptr, inverse_ptr, chunk * CHUNK, base, T, CHUNK, C_PAD)


# ---------------------------------------------------------------- grouped GEMM 1: gather, gate/up, SiLU * up
@triton.jit
def _tile_rows(tile_start_ptr, offsets_ptr, sorted_ptr, expert, BLOCK_M: tl.constexpr):
    """(rows, row_mask, tokens) of this program's tile of class `expert` (>= 0): BLOCK_M consecutive sorted rows
    from tile_start[tile], up to offsets[expert + 1], and their tokens."""
    rows = tl.load(tile_start_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(offsets_ptr + expert + 1)
    tokens = tl.load(sorted_ptr + rows, mask=row_mask, other=0)
    return rows, row_mask, tokens


@triton.jit
def _skip_rows(x_ptr, weight_ptr, y_ptr, tokens, row_mask, H, SKIP_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """y rows of skipped tokens (`tokens` where row_mask): 0 or w x, over the columns pid(1) * BLOCK_N +
    j * num_programs(1) * BLOCK_N (the program's share of all H columns)."""
    if SKIP_MODE == 1:
        w = tl.load(weight_ptr + tokens, mask=row_mask, other=0.0).to(tl.float32)
    for c0 in range(tl.program_id(1) * BLOCK_N, H, tl.num_programs(1) * BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < H)[None, :]
        offs = tokens[:, None] * H + cols[None, :]
        if SKIP_MODE == 1:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs, (w[:, None] * x).to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(y_ptr + offs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_gate_up_kernel(
    x_ptr, gate_up_ptr, act_ptr, weight_ptr, y_ptr, sorted_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr,
    H, I, E,
    SKIP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (tiles, cdiv(I, BLOCK_N))."""
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    if (expert < 0) | (expert > E):  # unused tile
        return
    if expert == E:  # skipped tokens: their y rows (0 or w x), here rather than in a launch of their own
        rows, row_mask, tokens = _tile_rows(tile_start_ptr, offsets_ptr, sorted_ptr, expert, BLOCK_M)
        _skip_rows(x_ptr, weight_ptr, y_ptr, tokens, row_mask, H, SKIP_MODE, BLOCK_M, BLOCK_N)
        return
    rows, row_mask, tokens = _tile_rows(tile_start_ptr, offsets_ptr, sorted_ptr, expert, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)
    # 32-bit offsets from scalar bases (the launcher checks the sizes): fewer registers, AMD buffer loads.
    a_offs = tokens[:, None] * H + ks[None, :]
    gate_base = gate_up_ptr + expert.to(tl.int64) * 2 * I * H
    up_base = gate_base + I.to(tl.int64) * H
    # gate rows n and up rows I + n of gate_up[expert], read as [BLOCK_K, BLOCK_N] (k fastest in memory)
    b_offs = tl.where(col_mask, cols, 0)[None, :] * H + ks[:, None]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        # Rows past the tile's class read token 0 and columns past I read column 0 (both discarded at the store):
        # only the K tail is masked, which keeps the loop free of 2D masks (they cost SGPRs on AMD).
        k_mask = (k0 + ks) < H
        a = tl.load(x_ptr + (a_offs + k0), mask=k_mask[None, :], other=0.0)
        gate = tl.load(gate_base + (b_offs + k0), mask=k_mask[:, None], other=0.0)
        up = tl.load(up_base + (b_offs + k0), mask=k_mask[:, None], other=0.0)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, up, acc_up, input_precision=DOT_PRECISION)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = act_ptr + rows[:, None] * I + cols[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------- grouped GEMM 2: down, routing weight, scatter
@triton.jit
def moe_down_kernel(
    act_ptr, down_ptr, weight_ptr, y_ptr, sorted_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, H, I, E,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (tiles, cdiv(H, BLOCK_N)), as moe_gate_up_kernel."""
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    if (expert < 0) | (expert >= E):  # unused tile or skipped tokens (moe_gate_up_kernel writes those rows)
        return
    rows, row_mask, tokens = _tile_rows(tile_start_ptr, offsets_ptr, sorted_ptr, expert, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    out_mask = row_mask[:, None] & col_mask[None, :]
    out_offs = tokens[:, None] * H + cols[None, :]
    w = tl.load(weight_ptr + tokens, mask=row_mask, other=0.0).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    a_rows = tl.where(row_mask, rows, rows - tl.arange(0, BLOCK_M))  # masked lanes read the tile's first row
    a_offs = a_rows[:, None] * I + ks[None, :]
    # down[expert] rows n (output columns), read as [BLOCK_K, BLOCK_N]
    b_base = down_ptr + expert.to(tl.int64) * H * I
    b_offs = tl.where(col_mask, cols, 0)[None, :] * I + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_mask = (k0 + ks) < I  # the only mask in the loop (see moe_gate_up_kernel)
        a = tl.load(act_ptr + (a_offs + k0), mask=k_mask[None, :], other=0.0)
        b = tl.load(b_base + (b_offs + k0), mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tl.store(y_ptr + out_offs, (acc * w[:, None]).to(y_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------- decode: both GEMMs by token, as GEMVs
@triton.jit
def moe_gate_up_by_token_kernel(
    x_ptr, gate_up_ptr, act_ptr, weight_ptr, y_ptr, index_ptr, H, I, E,
    SKIP_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (T, cdiv(I, BLOCK_N)): token t = pid(0), its class read from expert_index (no dispatch), columns n of I.
    act[t, n] = SiLU(g) * u with g = gate_up[e, n] . x_t and u = gate_up[e, I + n] . x_t, as a GEMV: one token is
    one row, which no matrix instruction tile fills (a 16-row tile would be 1/16 used), and narrow column blocks
    give many programs: ZAYA1's I = 2048 at BLOCK_N 8 is 256 programs per token, against 64 for the dispatch path's
    16 x 32 tiles, nearer gfx942's 304 CUs. Products accumulate elementwise in a [BLOCK_N, BLOCK_K] fp32 tile,
    summed across K once after the loop. A skipped token's programs write its y row (0 or w x) instead."""
    t = tl.program_id(0)
    expert = tl.load(index_ptr + t)
    if expert == E:
        lane = tl.arange(0, 1)
        _skip_rows(x_ptr, weight_ptr, y_ptr, t + lane, lane == 0, H, SKIP_MODE, 1, BLOCK_N)
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t * H
    gate_base = gate_up_ptr + expert.to(tl.int64) * 2 * I * H
    up_base = gate_base + I.to(tl.int64) * H
    # rows n of gate and up as [BLOCK_N, BLOCK_K], k fastest: each row a contiguous run; columns past I read row 0
    b_offs = tl.where(col_mask, cols, 0)[:, None] * H + ks[None, :]
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + ks) < H
        a = tl.load(x_row + (k0 + ks), mask=k_mask, other=0.0).to(tl.float32)[None, :]
        gate = tl.load(gate_base + (b_offs + k0), mask=k_mask[None, :], other=0.0)
        up = tl.load(up_base + (b_offs + k0), mask=k_mask[None, :], other=0.0)
        acc_gate += gate.to(tl.float32) * a
        acc_up += up.to(tl.float32) * a
    g = tl.sum(acc_gate, axis=1)
    u = tl.sum(acc_up, axis=1)
    tl.store(act_ptr + t * I + cols, (g * tl.sigmoid(g) * u).to(act_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def moe_down_by_token_kernel(
    act_ptr, down_ptr, weight_ptr, y_ptr, index_ptr, H, I, E,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (T, cdiv(H, BLOCK_N)): y[t, n] = w_t * down[e, n] . act_t, a GEMV as moe_gate_up_by_token_kernel (a
    skipped token's row is that kernel's)."""
    t = tl.program_id(0)
    expert = tl.load(index_ptr + t)
    if expert >= E:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    ks = tl.arange(0, BLOCK_K)
    act_row = act_ptr + t * I
    b_base = down_ptr + expert.to(tl.int64) * H * I
    b_offs = tl.where(col_mask, cols, 0)[:, None] * I + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_mask = (k0 + ks) < I
        a = tl.load(act_row + (k0 + ks), mask=k_mask, other=0.0).to(tl.float32)[None, :]
        b = tl.load(b_base + (b_offs + k0), mask=k_mask[None, :], other=0.0)
        acc += b.to(tl.float32) * a
    w = tl.load(weight_ptr + t).to(tl.float32)
    tl.store(y_ptr + t * H + cols, (tl.sum(acc, axis=1) * w).to(y_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------- backward
@triton.jit
def moe_bwd_act_kernel(
    grad_y_ptr, x_ptr, gate_up_ptr, down_ptr, weight_ptr, dgu_ptr, act_ptr, wpart_ptr,
    sorted_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr,
    T, H, I, E,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per [BLOCK_M sorted rows, BLOCK_N columns n of I]: three GEMMs sharing K = H in one loop,
    g = x gate^T, u = x up^T (recomputed, nothing saved by the forward) and q = dy down[e]; then
    a = SiLU(g) * u (rounded as in the forward), the routing-weight partial <q, a> over these columns,
    da = w q, dg = da u SiLU'(g), du = da SiLU(g). Stores [dg, du] and a at the sorted rows (activation dtype)."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if (expert < 0) | (expert >= E):
        return
    row0 = tl.load(tile_start_ptr + tile)
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(sorted_ptr + rows, mask=row_mask, other=0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)
    act_dtype = act_ptr.dtype.element_ty
    a_offs = tokens[:, None] * H + ks[None, :]
    gate_base = gate_up_ptr + expert.to(tl.int64) * 2 * I * H
    up_base = gate_base + I.to(tl.int64) * H
    gate_offs = tl.where(col_mask, cols, 0)[None, :] * H + ks[:, None]
    down_base = down_ptr + expert.to(tl.int64) * H * I
    # down^T is read along its columns (contiguous): masked there rather than clamped, which would hide the
    # contiguity from the compiler and cost the 16-byte vector loads
    down_offs = ks[:, None] * I + cols[None, :]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_q = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + ks) < H
        x = tl.load(x_ptr + (a_offs + k0), mask=k_mask[None, :], other=0.0)
        dy = tl.load(grad_y_ptr + (a_offs + k0), mask=k_mask[None, :], other=0.0).to(act_dtype)
        gate = tl.load(gate_base + (gate_offs + k0), mask=k_mask[:, None], other=0.0)
        up = tl.load(up_base + (gate_offs + k0), mask=k_mask[:, None], other=0.0)
        down_t = tl.load(down_base + (down_offs + k0 * I), mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc_gate = tl.dot(x, gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, up, acc_up, input_precision=DOT_PRECISION)
        acc_q = tl.dot(dy, down_t, acc_q, input_precision=DOT_PRECISION)
    sig = tl.sigmoid(acc_gate)
    act = (acc_gate * sig * acc_up).to(act_dtype)
    # columns past I (gate and up read column 0 there, down reads 0) must not enter the row sum
    w_terms = tl.where(col_mask[None, :], acc_q * act.to(tl.float32), 0.0)
    tl.store(wpart_ptr + pid_n * T + rows, tl.sum(w_terms, axis=1), mask=row_mask)
    w = tl.load(weight_ptr + tokens, mask=row_mask, other=0.0).to(tl.float32)
    d_act = w[:, None] * acc_q
    d_gate = d_act * acc_up * sig * (1.0 + acc_gate * (1.0 - sig))
    d_up = d_act * acc_gate * sig
    out_mask = row_mask[:, None] & col_mask[None, :]
    dgu_ptrs = dgu_ptr + rows[:, None] * 2 * I + cols[None, :]
    tl.store(dgu_ptrs, d_gate.to(act_dtype), mask=out_mask)
    tl.store(dgu_ptrs + I, d_up.to(act_dtype), mask=out_mask)
    tl.store(act_ptr + rows[:, None] * I + cols[None, :], act, mask=out_mask)


@triton.jit
def moe_bwd_dx_kernel(
    dgu_ptr, gate_up_ptr, grad_x_ptr, sorted_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr,
    H, I, E,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x[token] = [dg, du] gate_up[e] (K = 2I), stored at the token's row (skipped tokens: moe_skip_bwd_kernel)."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if (expert < 0) | (expert >= E):
        return
    row0 = tl.load(tile_start_ptr + tile)
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(sorted_ptr + rows, mask=row_mask, other=0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    out_mask = row_mask[:, None] & col_mask[None, :]
    out_offs = tokens[:, None] * H + cols[None, :]
    ks = tl.arange(0, BLOCK_K)
    two_i = 2 * I
    a_offs = tl.where(row_mask, rows, row0)[:, None] * two_i + ks[None, :]
    b_base = gate_up_ptr + expert.to(tl.int64) * two_i * H
    b_offs = ks[:, None] * H + cols[None, :]  # contiguous along the columns: masked, not clamped (moe_bwd_act)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, two_i, BLOCK_K):
        k_mask = (k0 + ks) < two_i
        a = tl.load(dgu_ptr + (a_offs + k0), mask=k_mask[None, :], other=0.0)
        b = tl.load(b_base + (b_offs + k0 * H), mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tl.store(grad_x_ptr + out_offs, acc.to(grad_x_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def moe_wgrad_kernel(
    a_ptr, b_ptr, weight_ptr, out_ptr, sorted_ptr, offsets_ptr,
    M, N, lda, ldb,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, A_SCALE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[e] [M, N] = sum over the sorted rows p of expert e of A[r_a(p), :M]^T B[r_b(p), :N] (K = the expert's
    tokens), r = the token id (GATHER) or p itself; A_SCALE_W multiplies A's row by the token's routing weight.
    Experts with no token get zeros. grad_gate_up: A = [dg, du] (sorted), B = x (gathered);
    grad_down: A = w dy (gathered), B = a (sorted)."""
    expert = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    ps = tl.arange(0, BLOCK_K)
    operand_dtype = b_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        rows = p0 + ps
        p_mask = rows < end
        tokens = tl.load(sorted_ptr + rows, mask=p_mask, other=0)
        if A_GATHER:
            a_rows = tokens
        else:
            a_rows = rows
        if B_GATHER:
            b_rows = tokens
        else:
            b_rows = rows
        # Both operands are contiguous along m / n: masked there, not clamped (see moe_bwd_act_kernel)
        a_t = tl.load(a_ptr + (a_rows[None, :] * lda + ms[:, None]), mask=p_mask[None, :] & m_mask[:, None],
                      other=0.0)
        if A_SCALE_W:
            w = tl.load(weight_ptr + tokens, mask=p_mask, other=0.0).to(tl.float32)
            a_t = a_t.to(tl.float32) * w[None, :]
        b = tl.load(b_ptr + (b_rows[:, None] * ldb + ns[None, :]), mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a_t.to(operand_dtype), b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * M * N + (ms[:, None] * N + ns[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------- skipped tokens
@triton.jit
def moe_skip_bwd_kernel(
    grad_y_ptr, x_ptr, weight_ptr, grad_x_ptr, wpart_ptr, sorted_ptr, offsets_ptr,
    T, H, E,
    SKIP_MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward rows of the skipped tokens (sorted positions offsets[E] .. T-1), kept out of the backward GEMM
    kernels (a branch there costs their loops registers): grad_x = w dy (skip_mode 1) or 0, and with skip_mode 1
    the routing-weight partial <dy, x> of these columns into wpart[column block, sorted row]."""
    first = tl.load(offsets_ptr + E)
    rows = first + tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if first + tl.program_id(0) * BLOCK_T >= T:
        return
    row_mask = rows < T
    tokens = tl.load(sorted_ptr + rows, mask=row_mask, other=0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = row_mask[:, None] & (cols < H)[None, :]
    offs = tokens[:, None] * H + cols[None, :]
    if SKIP_MODE == 1:
        w = tl.load(weight_ptr + tokens, mask=row_mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + offs, (w[:, None] * dy).to(grad_x_ptr.dtype.element_ty), mask=mask)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(wpart_ptr + pid_h * T + rows, tl.sum(dy * x, axis=1), mask=row_mask)
    else:
        tl.store(grad_x_ptr + offs, tl.zeros((BLOCK_T, BLOCK_H), dtype=grad_x_ptr.dtype.element_ty), mask=mask)


SKIP_BLOCK_T, SKIP_BLOCK_H = 16, 256


# ---------------------------------------------------------------- expert parallelism: row gather / scatter-back
# Grid (row blocks, column blocks) of BLOCK_R rows x BLOCK_H columns; the backward loops over the columns inside one
# program so each skipped row's <dy, x> is summed in one fixed order. sorted_token_ids is a permutation of 0..T-1
# (checked by zaya_kernels/ops/moe.py), so every output row has one writer.
@triton.jit
def moe_permute_rows_kernel(x_ptr, sorted_ptr, out_ptr, num_rows, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[i, :] = x[sorted[i], :] for i < num_rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    tokens = tl.load(sorted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = row_mask[:, None] & (cols < H)[None, :]
    values = tl.load(x_ptr + tokens[:, None] * H + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], values, mask=mask)


@triton.jit
def moe_unpermute_rows_kernel(rows_ptr, sorted_ptr, x_ptr, weight_ptr, y_ptr, T, num_rows, H,
                              SKIP_MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[sorted[i], :] = rows[i, :] (i < num_rows); the other sorted positions: 0 or w x (SKIP_MODE 1)."""
    pos = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pos_mask = pos < T
    routed = pos < num_rows
    tokens = tl.load(sorted_ptr + pos, mask=pos_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = pos_mask[:, None] & (cols < H)[None, :]
    out = tl.load(rows_ptr + pos.to(tl.int64)[:, None] * H + cols[None, :], mask=mask & routed[:, None], other=0.0)
    if SKIP_MODE == 1:
        skipped = pos_mask & (pos >= num_rows)
        w = tl.load(weight_ptr + tokens, mask=skipped, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + tokens[:, None] * H + cols[None, :], mask=mask & skipped[:, None], other=0.0)
        scaled = (w[:, None] * x.to(tl.float32)).to(y_ptr.dtype.element_ty)
        out = tl.where(routed[:, None], out, scaled)
    tl.store(y_ptr + tokens[:, None] * H + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_unpermute_rows_bwd_kernel(dy_ptr, sorted_ptr, x_ptr, weight_ptr, grad_rows_ptr, grad_x_ptr, grad_w_ptr,
                                  T, num_rows, H, SKIP_MODE: tl.constexpr, BLOCK_R: tl.constexpr,
                                  BLOCK_H: tl.constexpr):
    """grad_rows[i, :] = dy[sorted[i], :] (i < num_rows); SKIP_MODE 1, over all T sorted positions: grad_x[t] = w dy
    and grad_w[t] = <dy, x> (fp32) for the skipped tokens, 0 for the routed ones. T = num_rows with SKIP_MODE 0."""
    pos = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pos_mask = pos < T
    routed = pos < num_rows
    skipped = pos_mask & (pos >= num_rows)
    tokens = tl.load(sorted_ptr + pos, mask=pos_mask, other=0).to(tl.int64)
    if SKIP_MODE == 1:
        w = tl.load(weight_ptr + tokens, mask=skipped, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = pos_mask[:, None] & (cols < H)[None, :]
        token_offs = tokens[:, None] * H + cols[None, :]
        dy = tl.load(dy_ptr + token_offs, mask=mask, other=0.0)
        tl.store(grad_rows_ptr + pos.to(tl.int64)[:, None] * H + cols[None, :], dy, mask=mask & routed[:, None])
        if SKIP_MODE == 1:
            dyf = dy.to(tl.float32)
            grad_x = tl.where(skipped[:, None], w[:, None] * dyf, 0.0)
            tl.store(grad_x_ptr + token_offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
            x = tl.load(x_ptr + token_offs, mask=mask & skipped[:, None], other=0.0).to(tl.float32)
            dot += tl.sum(tl.where(skipped[:, None], dyf * x, 0.0), axis=1)
    if SKIP_MODE == 1:
        tl.store(grad_w_ptr + tokens, dot, mask=pos_mask)


ROW_BLOCK_H, ROW_BLOCK_ELEMS = 256, 2048
# The scatter-back's backward keeps dy, x and grad_x tiles and their 64-bit addresses live: 8 warps (with 4, the
# skip_mode 1 kernel spilled 16 B on sm_90 with aligned arguments; AOT report, every variant). The others take 4.
ROW_BWD_WARPS = 8


def row_blocks(H: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_H) of the row kernels: BLOCK_H columns up to 256, rows filling 2048 elements a program (so the
    routing-weight rows [T, 1] move 2048 tokens a program; 16 x 256 bf16 tiles spilled on sm_90)."""
    block_h = min(ROW_BLOCK_H, triton.next_power_of_2(max(H, 1)))
    return ROW_BLOCK_ELEMS // block_h, block_h


def moe_permute_rows(x, sorted_token_ids, num_rows, out):
    """Launch the gather into out [num_rows, H] (x [T, H], sorted_token_ids int32 [T]); no host synchronisation."""
    H = x.shape[1]
    if num_rows == 0 or H == 0:
        return
    block_r, block_h = row_blocks(H)
    moe_permute_rows_kernel[(triton.cdiv(num_rows, block_r), triton.cdiv(H, block_h))](
        x, sorted_token_ids, out, num_rows, H, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4,
        num_stages=NO_PIPELINING)


def moe_unpermute_rows(rows, sorted_token_ids, x, routing_weight, skip_mode, y):
    """Launch the scatter-back into y [T, H] (rows [N, H]; x [T, H] and routing_weight [T] read with skip_mode 1)."""
    T, H = y.shape
    if T == 0 or H == 0:
        return
    block_r, block_h = row_blocks(H)
    scaled = skip_mode == 1
    moe_unpermute_rows_kernel[(triton.cdiv(T, block_r), triton.cdiv(H, block_h))](
        rows, sorted_token_ids, x if scaled else rows, routing_weight if scaled else sorted_token_ids, y,
        T, rows.shape[0], H, SKIP_MODE=1 if scaled else 0, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4,
        num_stages=NO_PIPELINING)


def moe_unpermute_rows_backward(grad_y, sorted_token_ids, x, routing_weight, num_rows, skip_mode):
    """(grad_rows [N, H], grad_x [T, H] or None, grad_routing_weight [T] or None) of moe_unpermute_rows, one launch."""
    T, H = grad_y.shape
    grad_rows = grad_y.new_empty(num_rows, H)
    scaled = skip_mode == 1
    grad_x = torch.empty_like(x) if scaled else None
    grad_w = torch.empty(T, dtype=torch.float32, device=grad_y.device) if scaled else None
    positions = T if scaled else num_rows
    if positions > 0:
        block_r, block_h = row_blocks(H)
        block_r = min(block_r, 64)  # the column loop keeps BLOCK_R x BLOCK_H tiles of dy, x and grad_x live
        moe_unpermute_rows_bwd_kernel[(triton.cdiv(positions, block_r),)](
            grad_y, sorted_token_ids, x if scaled else grad_y, routing_weight if scaled else sorted_token_ids,
            grad_rows, grad_x if scaled else grad_rows, grad_w if scaled else sorted_token_ids,
            positions, num_rows, H, SKIP_MODE=1 if scaled else 0, BLOCK_R=block_r, BLOCK_H=block_h,
            num_warps=ROW_BWD_WARPS, num_stages=NO_PIPELINING)
    return grad_rows, grad_x, None if grad_w is None else grad_w.to(routing_weight.dtype)


# ---------------------------------------------------------------- configurations
# The parsed zaya_kernels/configs/moe.json
load_config_table = ConfigTable(__name__)


def pick_block_m(num_tokens: int, target: str) -> int:
    """BLOCK_M of the dispatch tile map for `num_tokens` tokens on `target` (the T bucket of the table)."""
    entry = load_config_table()["targets"][target]
    for max_tokens, block_m in entry["block_m_by_tokens"]:
        if num_tokens <= max_tokens:
            return block_m
    return entry["block_m_by_tokens"][-1][1]


def gemm_config(target: str, block_m: int, gemm: str) -> dict:
    """Launch parameters of `gemm` ('gate_up', 'down', 'bwd_act', 'bwd_dx': BLOCK_N, BLOCK_K, num_warps, num_stages;
    'wgrad': BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for this target and dispatch BLOCK_M."""
    configs = load_config_table()["targets"][target]["gemm"]
    key = str(block_m)
    if key not in configs:
        shipped = ", ".join(sorted(configs, key=int))
        raise ValueError(f"zaya::moe_experts: no Triton configuration for block_m={block_m} on {target} "
                         f"(shipped: {shipped}); dispatch with the block_m of zaya_kernels.ops.moe_block_m")
    return configs[key][gemm]


# ---------------------------------------------------------------- launchers
def class_pad(num_experts: int) -> int:
    return triton.next_power_of_2(num_experts + 2)


def dispatch_chunk(num_experts: int) -> int:
    """Tokens per chunk: the one-hot tile [CHUNK, C_PAD] stays at <= 4096 entries (registers of one program)."""
    return max(16, min(256, 4096 // class_pad(num_experts)))


# Up to this many tokens the single-program dispatch runs (one launch; its serial chunk loop is short); above it the
# three-launch chunked dispatch spreads the counting and placing over one program per chunk.
SINGLE_PROGRAM_MAX_TOKENS = 4096


def moe_dispatch(expert_index, num_experts, block_m, counts, offsets, sorted_token_ids, inverse, tile_expert,
                 tile_start, single_program=None):
    """Launch the dispatch into preallocated int32 outputs (shapes as in zaya::moe_dispatch); no host sync.

    single_program: force the one-program (True) or the chunked (False) path; default by T.
    """
    T = expert_index.shape[0]
    c_pad = class_pad(num_experts)
    chunk = dispatch_chunk(num_experts)
    num_tiles = tile_expert.shape[0]
    if single_program is None:
        single_program = T <= SINGLE_PROGRAM_MAX_TOKENS
    single_program = single_program or T == 0  # the chunked path would launch zero programs
    if single_program:
        moe_dispatch_kernel[(1,)](
            expert_index, counts, offsets, sorted_token_ids, inverse, tile_expert, tile_start,
            T, num_experts, num_tiles,
            BLOCK_M=block_m, CHUNK=chunk, C_PAD=c_pad, num_warps=4, num_stages=NO_PIPELINING,
        )
        return
    num_chunks = triton.cdiv(T, chunk)
    chunk_counts = torch.empty(num_chunks, c_pad, dtype=torch.int32, device=expert_index.device)
    moe_dispatch_count_kernel[(num_chunks,)](expert_index, chunk_counts, T, CHUNK=chunk, C_PAD=c_pad, num_warps=4,
                                              num_stages=NO_PIPELINING)
    moe_dispatch_scan_kernel[(1,)](
        chunk_counts, counts, offsets, tile_expert, tile_start, num_chunks, num_experts, num_tiles,
        BLOCK_M=block_m, CHUNK=chunk, C_PAD=c_pad, num_warps=4, num_stages=NO_PIPELINING,
    )
    moe_dispatch_place_kernel[(num_chunks,)](
        expert_index, chunk_counts, sorted_token_ids, inverse, T, CHUNK=chunk, C_PAD=c_pad, num_warps=4,
        num_stages=NO_PIPELINING,
    )


_INT32_MAX = 2**31 - 1


def check_index_range(op: str, T: int, H: int, I: int) -> None:
    """The kernels index activations [T, max(H, 2I)] and one expert's weights [2I, H] with 32-bit offsets."""
    if T * max(H, 2 * I) > _INT32_MAX or 2 * I * H > _INT32_MAX:
        raise ValueError(f"zaya::{op}: the Triton kernels use 32-bit offsets; T * max(H, 2I) = {T * max(H, 2 * I)} "
                         f"and 2I * H = {2 * I * H} must stay below 2**31 (split the tokens into smaller batches)")


def moe_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                skip_mode, y):
    """Launch GEMM 1 then GEMM 2 into y [T, H] over the dispatch's tiles; every row of y is written (expert, skip or
    nothing to skip)."""
    tiles = tile_expert.shape[0]
    if x.shape[0] == 0 or tiles == 0:
        return
    _launch_gemms(x, gate_up, down, routing_weight, y, tiles, block_m, skip_mode,
                  (sorted_token_ids, offsets, tile_expert, tile_start))


def by_token_config(target: str, gemm: str) -> dict:
    """Launch parameters (BLOCK_N, BLOCK_K, num_warps, num_stages) of the by-token GEMV `gemm` ('gate_up' or
    'down') for this target: the table's "by_token" entry."""
    return load_config_table()["targets"][target]["by_token"][gemm]


def moe_experts_by_token(x, gate_up, down, expert_index, routing_weight, skip_mode, y):
    """Launch the two by-token GEMVs into y [T, H] (no dispatch: the programs read expert_index themselves); every
    row of y is written."""
    T, H = x.shape
    if T == 0:
        return
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    check_index_range("moe_experts_by_token", T, H, I)
    target = device_target(x.device)
    act = torch.empty(T, I, dtype=x.dtype, device=x.device)  # SiLU(g) * u, row t for token t
    cfg1 = by_token_config(target, "gate_up")
    moe_gate_up_by_token_kernel[(T, triton.cdiv(I, cfg1["BLOCK_N"]))](
        x, gate_up, act, routing_weight, y, expert_index, H, I, E,
        SKIP_MODE=skip_mode, BLOCK_N=cfg1["BLOCK_N"], BLOCK_K=cfg1["BLOCK_K"], num_warps=cfg1["num_warps"],
        num_stages=cfg1["num_stages"],
    )
    cfg2 = by_token_config(target, "down")
    moe_down_by_token_kernel[(T, triton.cdiv(H, cfg2["BLOCK_N"]))](
        act, down, routing_weight, y, expert_index, H, I, E,
        BLOCK_N=cfg2["BLOCK_N"], BLOCK_K=cfg2["BLOCK_K"], num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"],
    )


def _launch_gemms(x, gate_up, down, routing_weight, y, tiles, block_m, skip_mode, dispatch):
    """Both grouped GEMMs over the dispatch's tiles."""
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    check_index_range("moe_experts", T, H, I)
    target = device_target(x.device)
    act = torch.empty(T, I, dtype=x.dtype, device=x.device)  # SiLU(g) * u at sorted rows
    cfg1 = gemm_config(target, block_m, "gate_up")
    moe_gate_up_kernel[(tiles, triton.cdiv(I, cfg1["BLOCK_N"]))](
        x, gate_up, act, routing_weight, y, *dispatch, H, I, E,
        SKIP_MODE=skip_mode, BLOCK_M=block_m, BLOCK_N=cfg1["BLOCK_N"], BLOCK_K=cfg1["BLOCK_K"],
        num_warps=cfg1["num_warps"], num_stages=cfg1["num_stages"],
    )
    cfg2 = gemm_config(target, block_m, "down")
    moe_down_kernel[(tiles, triton.cdiv(H, cfg2["BLOCK_N"]))](
        act, down, routing_weight, y, *dispatch, H, I, E,
        BLOCK_M=block_m, BLOCK_N=cfg2["BLOCK_N"], BLOCK_K=cfg2["BLOCK_K"],
        num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"],
    )


def moe_experts_backward(grad_y, x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert,
                         tile_start, block_m, skip_mode):
    """Gradients of moe_experts with four grouped GEMM launches (no host synchronisation):
    bwd_act ([dg, du], a and the routing-weight partials), bwd_dx (grad_x, skip rows too), and the weight
    gradients grad_gate_up[e] = [dg, du]_e^T x_e and grad_down[e] = (w dy)_e^T a_e. The routing-weight
    partials (one slot per column block, sorted rows) are summed with torch and scattered to token order."""
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    grad_x = torch.empty_like(x)
    grad_gate_up = torch.empty_like(gate_up)
    grad_down = torch.empty_like(down)
    if T == 0:
        return grad_x, grad_gate_up.zero_(), grad_down.zero_(), torch.empty_like(routing_weight)
    check_index_range("moe_experts_backward", T, H, I)
    target = device_target(x.device)
    cfg_act = gemm_config(target, block_m, "bwd_act")
    cfg_dx = gemm_config(target, block_m, "bwd_dx")
    cfg_w = gemm_config(target, block_m, "wgrad")
    tiles = tile_expert.shape[0]
    dgu = torch.empty(T, two_i, dtype=x.dtype, device=x.device)  # [dg, du] at sorted rows
    act = torch.empty(T, I, dtype=x.dtype, device=x.device)  # SiLU(g) * u at sorted rows
    blocks_i = triton.cdiv(I, cfg_act["BLOCK_N"])  # routing-weight partial slots of bwd_act
    blocks_h = triton.cdiv(H, min(SKIP_BLOCK_H, triton.next_power_of_2(H)))  # and of the skip kernel
    wpart = torch.zeros(max(blocks_i, blocks_h), T, dtype=torch.float32, device=x.device)
    index_args = (sorted_token_ids, offsets, tile_expert, tile_start)
    moe_bwd_act_kernel[(tiles, blocks_i)](
        grad_y, x, gate_up, down, routing_weight, dgu, act, wpart, *index_args, T, H, I, E,
        BLOCK_M=block_m, BLOCK_N=cfg_act["BLOCK_N"], BLOCK_K=cfg_act["BLOCK_K"],
        num_warps=cfg_act["num_warps"], num_stages=cfg_act["num_stages"],
    )
    moe_bwd_dx_kernel[(tiles, triton.cdiv(H, cfg_dx["BLOCK_N"]))](
        dgu, gate_up, grad_x, *index_args, H, I, E,
        BLOCK_M=block_m, BLOCK_N=cfg_dx["BLOCK_N"], BLOCK_K=cfg_dx["BLOCK_K"],
        num_warps=cfg_dx["num_warps"], num_stages=cfg_dx["num_stages"],
    )
    block_h = min(SKIP_BLOCK_H, triton.next_power_of_2(H))
    moe_skip_bwd_kernel[(triton.cdiv(T, SKIP_BLOCK_T), triton.cdiv(H, block_h))](
        grad_y, x, routing_weight, grad_x, wpart, sorted_token_ids, offsets, T, H, E,
        SKIP_MODE=skip_mode, BLOCK_T=SKIP_BLOCK_T, BLOCK_H=block_h, num_warps=4, num_stages=NO_PIPELINING,
    )
    wgrad = dict(BLOCK_M=cfg_w["BLOCK_M"], BLOCK_N=cfg_w["BLOCK_N"], BLOCK_K=cfg_w["BLOCK_K"],
                 num_warps=cfg_w["num_warps"], num_stages=cfg_w["num_stages"])
    moe_wgrad_kernel[(E, triton.cdiv(two_i, cfg_w["BLOCK_M"]), triton.cdiv(H, cfg_w["BLOCK_N"]))](
        dgu, x, routing_weight, grad_gate_up, sorted_token_ids, offsets, two_i, H, two_i, H,
        A_GATHER=False, B_GATHER=True, A_SCALE_W=False, **wgrad,
    )
    moe_wgrad_kernel[(E, triton.cdiv(H, cfg_w["BLOCK_M"]), triton.cdiv(I, cfg_w["BLOCK_N"]))](
        grad_y, act, routing_weight, grad_down, sorted_token_ids, offsets, H, I, H, I,
        A_GATHER=True, B_GATHER=False, A_SCALE_W=True, **wgrad,
    )
    grad_w_sorted = wpart.sum(0)
    grad_w = torch.empty(T, dtype=torch.float32, device=x.device).scatter_(0, sorted_token_ids.long(), grad_w_sorted)
    return grad_x, grad_gate_up, grad_down, grad_w.to(routing_weight.dtype)


# ---------------------------------------------------------------- ahead-of-time registry: every shipped config
_INDEX_ARGS = ("sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr")


def _gemm_signature(kernel_name: str) -> tuple[dict, dict]:
    """(pointer/int arguments -> Triton type, fixed constexprs) of a grouped GEMM kernel, bf16 activations."""
    ints = {"H": "i32", "I": "i32", "E": "i32"}
    index = {a: "*i32" for a in _INDEX_ARGS}
    if kernel_name == "gate_up":
        return {"x_ptr": "*bf16", "gate_up_ptr": "*bf16", "act_ptr": "*bf16", "weight_ptr": "*fp32", "y_ptr": "*bf16",
                **index, **ints}, {}
    if kernel_name == "down":
        return {"act_ptr": "*bf16", "down_ptr": "*bf16", "weight_ptr": "*fp32", "y_ptr": "*bf16", **index, **ints}, {}
    if kernel_name == "gate_up_by_token":
        return {"x_ptr": "*bf16", "gate_up_ptr": "*bf16", "act_ptr": "*bf16", "weight_ptr": "*fp32", "y_ptr": "*bf16",
                "index_ptr": "*i32", **ints}, {}
    if kernel_name == "down_by_token":
        return {"act_ptr": "*bf16", "down_ptr": "*bf16", "weight_ptr": "*fp32", "y_ptr": "*bf16", "index_ptr": "*i32",
                **ints}, {}
    if kernel_name == "bwd_act":
        return ({"grad_y_ptr": "*bf16", "x_ptr": "*bf16", "gate_up_ptr": "*bf16", "down_ptr": "*bf16",
                 "weight_ptr": "*fp32", "dgu_ptr": "*bf16", "act_ptr": "*bf16", "wpart_ptr": "*fp32", **index,
                 "T": "i32", **ints}, {})
    if kernel_name == "bwd_dx":
        return {"dgu_ptr": "*bf16", "gate_up_ptr": "*bf16", "grad_x_ptr": "*bf16", **index, **ints}, {}
    raise ValueError(kernel_name)


_WGRAD_SIGNATURE = {"a_ptr": "*bf16", "b_ptr": "*bf16", "weight_ptr": "*fp32", "out_ptr": "*bf16",
                    "sorted_ptr": "*i32", "offsets_ptr": "*i32", "M": "i32", "N": "i32", "lda": "i32", "ldb": "i32"}
# (A_GATHER, B_GATHER, A_SCALE_W): grad_gate_up, then grad_down
_WGRAD_MODES = ((False, True, False), (True, False, True))


def _forward_modes(name: str) -> list[dict]:
    """The constexpr modes each forward config compiles in: gate_up (tiled or by token) with both skip modes (it
    writes the skipped rows)."""
    return [{"SKIP_MODE": skip} for skip in (0, 1)] if name.startswith("gate_up") else [{}]


def _aot_configs() -> dict:
    """Kernel name -> the AotConfigs of every configuration the tables of gfx942, gfx950 and sm_90 can launch."""
    table = load_config_table()["targets"]
    out = {name: [] for name in ("moe_dispatch", "moe_dispatch_count", "moe_dispatch_scan", "moe_dispatch_place",
                                 "moe_gate_up", "moe_down", "moe_gate_up_by_token", "moe_down_by_token",
                                 "moe_bwd_act", "moe_bwd_dx", "moe_wgrad", "moe_skip_bwd")}
    for skip_mode in (0, 1):
        out["moe_skip_bwd"].append(AotConfig(
            label=f"SKIP_MODE={skip_mode},BLOCK_T={SKIP_BLOCK_T},BLOCK_H={SKIP_BLOCK_H}",
            signature={"grad_y_ptr": "*bf16", "x_ptr": "*bf16", "weight_ptr": "*fp32", "grad_x_ptr": "*bf16",
                       "wpart_ptr": "*fp32", "sorted_ptr": "*i32", "offsets_ptr": "*i32", "T": "i32", "H": "i32",
                       "E": "i32", "SKIP_MODE": "constexpr", "BLOCK_T": "constexpr", "BLOCK_H": "constexpr"},
            constexprs={"SKIP_MODE": skip_mode, "BLOCK_T": SKIP_BLOCK_T, "BLOCK_H": SKIP_BLOCK_H},
            num_warps=4))
    out.update({name: [] for name in ("moe_permute_rows", "moe_unpermute_rows", "moe_unpermute_rows_bwd")})
    # Row gather / scatter-back: ZAYA's bf16 hidden rows (H >= 256) and the narrow rows the gather also moves (fp32
    # routing weights and int32 expert ids, H = 1).
    for dtype, H in (("bf16", 2048), ("fp32", 1), ("i32", 1)):
        block_r, block_h = row_blocks(H)
        out["moe_permute_rows"].append(AotConfig(
            label=f"{dtype},BLOCK_R={block_r},BLOCK_H={block_h}",
            signature={"x_ptr": f"*{dtype}", "sorted_ptr": "*i32", "out_ptr": f"*{dtype}", "num_rows": "i32",
                       "H": "i32", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"},
            constexprs={"BLOCK_R": block_r, "BLOCK_H": block_h}, num_warps=4))
    block_r, block_h = row_blocks(2048)
    for skip_mode in (0, 1):
        out["moe_unpermute_rows"].append(AotConfig(
            label=f"SKIP_MODE={skip_mode},BLOCK_R={block_r},BLOCK_H={block_h}",
            signature={"rows_ptr": "*bf16", "sorted_ptr": "*i32", "x_ptr": "*bf16", "weight_ptr": "*fp32",
                       "y_ptr": "*bf16", "T": "i32", "num_rows": "i32", "H": "i32", "SKIP_MODE": "constexpr",
                       "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"},
            constexprs={"SKIP_MODE": skip_mode, "BLOCK_R": block_r, "BLOCK_H": block_h}, num_warps=4))
        out["moe_unpermute_rows_bwd"].append(AotConfig(
            label=f"SKIP_MODE={skip_mode},BLOCK_R={min(block_r, 64)},BLOCK_H={block_h}",
            signature={"dy_ptr": "*bf16", "sorted_ptr": "*i32", "x_ptr": "*bf16", "weight_ptr": "*fp32",
                       "grad_rows_ptr": "*bf16", "grad_x_ptr": "*bf16", "grad_w_ptr": "*fp32", "T": "i32",
                       "num_rows": "i32", "H": "i32", "SKIP_MODE": "constexpr", "BLOCK_R": "constexpr",
                       "BLOCK_H": "constexpr"},
            constexprs={"SKIP_MODE": skip_mode, "BLOCK_R": min(block_r, 64), "BLOCK_H": block_h},
            num_warps=ROW_BWD_WARPS))
    seen = set()
    for target in ("gfx942", "gfx950", "sm_90"):
        for block_m_str, gemms in table[target]["gemm"].items():
            block_m = int(block_m_str)
            for num_experts in (16, 64):  # ZAYA1 and the largest E the tests draw
                if ("dispatch", block_m, num_experts) in seen:
                    continue
                seen.add(("dispatch", block_m, num_experts))
                out["moe_dispatch"].append(AotConfig(
                    label=f"BLOCK_M={block_m},E={num_experts}",
                    signature={"index_ptr": "*i32", "counts_ptr": "*i32", "offsets_ptr": "*i32", "sorted_ptr": "*i32",
                               "inverse_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_start_ptr": "*i32", "T": "i32",
                               "E": "i32", "num_tiles": "i32", "BLOCK_M": "constexpr", "CHUNK": "constexpr",
                               "C_PAD": "constexpr"},
                    constexprs={"BLOCK_M": block_m, "CHUNK": dispatch_chunk(num_experts),
                                "C_PAD": class_pad(num_experts)},
                    num_warps=4))
                chunk_consts = {"CHUNK": dispatch_chunk(num_experts), "C_PAD": class_pad(num_experts)}
                out["moe_dispatch_scan"].append(AotConfig(
                    label=f"BLOCK_M={block_m},E={num_experts}",
                    signature={"chunk_counts_ptr": "*i32", "counts_ptr": "*i32", "offsets_ptr": "*i32",
                               "tile_expert_ptr": "*i32", "tile_start_ptr": "*i32", "num_chunks": "i32", "E": "i32",
                               "num_tiles": "i32", "BLOCK_M": "constexpr", "CHUNK": "constexpr", "C_PAD": "constexpr"},
                    constexprs={"BLOCK_M": block_m, **chunk_consts}, num_warps=4))
                if ("dispatch_chunked", num_experts) not in seen:
                    seen.add(("dispatch_chunked", num_experts))
                    out["moe_dispatch_count"].append(AotConfig(
                        label=f"E={num_experts}",
                        signature={"index_ptr": "*i32", "chunk_counts_ptr": "*i32", "T": "i32", "CHUNK": "constexpr",
                                   "C_PAD": "constexpr"},
                        constexprs=chunk_consts, num_warps=4))
                    out["moe_dispatch_place"].append(AotConfig(
                        label=f"E={num_experts}",
                        signature={"index_ptr": "*i32", "chunk_base_ptr": "*i32", "sorted_ptr": "*i32",
                                   "inverse_ptr": "*i32", "T": "i32", "CHUNK": "constexpr", "C_PAD": "constexpr"},
                        constexprs=chunk_consts, num_warps=4))
            for name in ("gate_up", "down", "bwd_act", "bwd_dx", "wgrad"):
                cfg = gemms[name]
                key = (name, block_m if name != "wgrad" else 0, tuple(sorted(cfg.items())))
                if key in seen:
                    continue
                seen.add(key)
                tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cfg}
                label = ",".join(f"{k}={v}" for k, v in tiles.items())
                label += f",warps={cfg['num_warps']},stages={cfg['num_stages']}"
                if name == "wgrad":
                    for a_gather, b_gather, scale_w in _WGRAD_MODES:
                        consts = {"A_GATHER": a_gather, "B_GATHER": b_gather, "A_SCALE_W": scale_w, **tiles}
                        which = "grad_down" if scale_w else "grad_gate_up"
                        out["moe_wgrad"].append(AotConfig(
                            label=f"{which},{label}",
                            signature={**_WGRAD_SIGNATURE, **{c: "constexpr" for c in consts}}, constexprs=consts,
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], matrix_expected=True))
                    continue
                signature, consts = _gemm_signature(name)
                for mode in _forward_modes(name):
                    all_consts = {**consts, **mode, "BLOCK_M": block_m, **tiles}
                    mode_label = ",".join(f"{k}={int(v)}" for k, v in mode.items())
                    out[f"moe_{name}"].append(AotConfig(
                        label=(mode_label + "," if mode else "") + f"BLOCK_M={block_m},{label}",
                        signature={**signature, **{c: "constexpr" for c in all_consts}},
                        constexprs=all_consts, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        matrix_expected=True))
        for name, cfg in table[target]["by_token"].items():
            tiles = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_K")}
            key = (f"{name}_by_token", tuple(sorted(cfg.items())))
            if key in seen:
                continue
            seen.add(key)
            signature, _ = _gemm_signature(f"{name}_by_token")
            for mode in _forward_modes(name):
                consts = {**mode, **tiles}
                out[f"moe_{name}_by_token"].append(AotConfig(
                    label=",".join(f"{k}={v}" for k, v in consts.items()) + f",warps={cfg['num_warps']},"
                          f"stages={cfg['num_stages']}",
                    signature={**signature, **{c: "constexpr" for c in consts}}, constexprs=consts,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    matrix_expected=False))  # GEMVs: one token per program (see moe_gate_up_by_token_kernel)
    return out


_KERNELS = {"moe_dispatch": moe_dispatch_kernel, "moe_dispatch_count": moe_dispatch_count_kernel,
            "moe_dispatch_scan": moe_dispatch_scan_kernel, "moe_dispatch_place": moe_dispatch_place_kernel,
            "moe_gate_up": moe_gate_up_kernel, "moe_down": moe_down_kernel,
            "moe_gate_up_by_token": moe_gate_up_by_token_kernel, "moe_down_by_token": moe_down_by_token_kernel,
            "moe_bwd_act": moe_bwd_act_kernel, "moe_bwd_dx": moe_bwd_dx_kernel, "moe_wgrad": moe_wgrad_kernel,
            "moe_skip_bwd": moe_skip_bwd_kernel, "moe_permute_rows": moe_permute_rows_kernel,
            "moe_unpermute_rows": moe_unpermute_rows_kernel, "moe_unpermute_rows_bwd": moe_unpermute_rows_bwd_kernel}
for _name, _configs in _aot_configs().items():
    register_aot(_name, _KERNELS[_name], _configs)
