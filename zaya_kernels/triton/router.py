"""Triton forward kernel of the ZAYA router (DESIGN.md 1.3): the whole router in one launch.

One program owns BLOCK_T tokens and computes, with every intermediate on chip:
  1. d = x Wd^T: a K-loop over H in BLOCK_K steps, Wd streamed through tl.dot, fp32 accumulator [BLOCK_T, BLOCK_R];
  2. r = d + bd (+ gamma * r_prev) (EDA), stored in the activation dtype; the rest reads that rounded r;
  3. u = norm_w * RMSNorm(r) over the R real columns;
  4. fc1 and fc2 fused: for each chunk c of BLOCK_C hidden units, a1_c = GELU(u W1[c]^T + b1[c]) [BLOCK_T, BLOCK_C]
     is immediately the K-chunk of fc2: z2 += a1_c W2[:, c]^T, so a1 never leaves registers;
  5. a2 = GELU(z2 + b2); logits = a2 W3^T [BLOCK_T, BLOCK_E] (no bias);
  6. fp32 softmax over the C = E + 1 real classes, e* = argmax(p + beta) with ties to the lowest index, w = p[e*].
Decode (T <= DECODE_MAX_T): step 1 is split over H across SPLIT_H programs per token block (grid [blocks, SPLIT_H]);
each writes an fp32 partial and bumps an arrival counter, and the last program to arrive sums the partials and runs
steps 2-6 (still one launch; the counter is left at zero for the next launch).
GEMM inputs are rounded to the weight dtype, accumulation is fp32 (the reference's precision model). H, R and
C are runtime sizes; BLOCK_R / BLOCK_E are the next powers of two (>= 16, tl.dot's minimum) and every load is masked.
fp32 weights use IEEE fp32 dot products (no TF32). Under TRITON_INTERPRET=1 run fp32 or fp16 only (bf16 tl.dot is
broken in the interpreter, Triton issue 11584).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zaya_kernels.triton._aot import NO_PIPELINING, PIPELINED, AotConfig, register_aot

MAX_R = 512  # BLOCK_R x BLOCK_T fp32 accumulators must stay in registers
# The output projection's W3^T tile [BLOCK_R, BLOCK_E] and its dot operands live in shared memory: BLOCK_R * BLOCK_E
# above 256 x 128 needs more than gfx942's 64 KB of LDS per workgroup (C = 129 at R = 256: 128 KB; C = 257: 256 KB,
# past sm_90's 227 KB too), a launch failure on the GPU that the interpreter never shows.
MAX_BLOCK_E = 128
MAX_RE_TILE = 256 * 128


@triton.jit
def _gelu_erf(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _router_tail(acc, rows, row_mask, rows64, rcols, rmask, r_prev_ptr, gamma_ptr, down_b_ptr, norm_w_ptr, fc1_w_ptr,
                 fc1_b_ptr, fc2_w_ptr, fc2_b_ptr, out_w_ptr, bias_ptr, index_ptr, weight_ptr, r_ptr, logits_ptr,
                 R, C, eps, w_dtype, HAS_PREV: tl.constexpr, STORE_LOGITS: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """Steps 2-6 from the down-projection accumulator acc [BLOCK_T, BLOCK_R] (fp32, without bias)."""
    act_dtype = r_ptr.dtype.element_ty
    # 2. bias + EDA; r leaves in the activation dtype and the norm reads that rounded value
    tile_mask = row_mask[:, None] & rmask[None, :]
    r_offs = rows64[:, None] * R + rcols[None, :]
    r = acc + tl.load(down_b_ptr + rcols, mask=rmask, other=0.0)[None, :]
    if HAS_PREV:
        r_prev = tl.load(r_prev_ptr + r_offs, mask=tile_mask, other=0.0).to(tl.float32)
        r += tl.load(gamma_ptr + rcols, mask=rmask, other=0.0)[None, :] * r_prev
    r_act = r.to(act_dtype)
    tl.store(r_ptr + r_offs, r_act, mask=tile_mask)
    r = tl.where(tile_mask, r_act.to(tl.float32), 0.0)

    # 3. RMSNorm over the R real columns
    rstd = tl.rsqrt(tl.sum(r * r, axis=1) / R + eps)
    u = r * rstd[:, None] * tl.load(norm_w_ptr + rcols, mask=rmask, other=0.0)[None, :]
    u_in = u.to(w_dtype)

    # 4. fc1 chunk -> GELU -> fc2 K-chunk
    acc2 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    cs = tl.arange(0, BLOCK_C)
    for c0 in range(0, R, BLOCK_C):
        cc = c0 + cs
        cmask = cc < R
        # W1[cc, :]^T  [BLOCK_R, BLOCK_C]
        w1t = tl.load(fc1_w_ptr + cc[None, :] * R + rcols[:, None], mask=cmask[None, :] & rmask[:, None], other=0.0)
        z1 = tl.dot(u_in, w1t, input_precision="ieee")
        a1 = _gelu_erf(z1 + tl.load(fc1_b_ptr + cc, mask=cmask, other=0.0)[None, :])
        # W2[:, cc]^T  [BLOCK_C, BLOCK_R]
        w2t = tl.load(fc2_w_ptr + rcols[None, :] * R + cc[:, None], mask=rmask[None, :] & cmask[:, None], other=0.0)
        acc2 = tl.dot(a1.to(w_dtype), w2t, acc2, input_precision="ieee")

    # 5. second GELU and the output projection
    a2 = _gelu_erf(acc2 + tl.load(fc2_b_ptr + rcols, mask=rmask, other=0.0)[None, :])
    ecols = tl.arange(0, BLOCK_E)
    emask = ecols < C
    w3t = tl.load(out_w_ptr + ecols[None, :] * R + rcols[:, None], mask=emask[None, :] & rmask[:, None], other=0.0)
    logits = tl.dot(a2.to(w_dtype), w3t, input_precision="ieee")
    if STORE_LOGITS:
        tl.store(logits_ptr + rows64[:, None] * C + ecols[None, :], logits,
                 mask=row_mask[:, None] & emask[None, :])

    # 6. softmax, biased top-1 (ties to the lowest index), unbiased weight
    logits = tl.where(emask[None, :], logits, float("-inf"))
    ex = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]
    biased = tl.where(emask[None, :], p + tl.load(bias_ptr + ecols, mask=emask, other=0.0)[None, :], float("-inf"))
    best = tl.max(biased, axis=1)
    index = tl.min(tl.where(biased == best[:, None], ecols[None, :], BLOCK_E), axis=1)
    # a row with a NaN score takes the skip class, as the reference (tl.max may pass over a NaN; its index is kept
    # in range either way); its weight is then NaN where p is
    has_nan = tl.max(tl.where(biased != biased, 1, 0), axis=1) > 0
    index = tl.where(has_nan, C - 1, tl.minimum(index, C - 1))
    weight = tl.sum(tl.where(ecols[None, :] == index[:, None], p, 0.0), axis=1)
    tl.store(index_ptr + rows, index.to(tl.int32), mask=row_mask)
    tl.store(weight_ptr + rows, weight, mask=row_mask)


@triton.jit
def zaya_router_fwd_kernel(
    x_ptr, r_prev_ptr, gamma_ptr, down_w_ptr, down_b_ptr, norm_w_ptr, fc1_w_ptr, fc1_b_ptr, fc2_w_ptr, fc2_b_ptr,
    out_w_ptr, bias_ptr, index_ptr, weight_ptr, r_ptr, logits_ptr, partial_ptr, counter_ptr,
    T, H, R, C, eps, H_PER_SPLIT,
    HAS_PREV: tl.constexpr, STORE_LOGITS: tl.constexpr, SPLIT_H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr, RELEASE_LANES: tl.constexpr,
):
    # grid (token blocks, SPLIT_H). SPLIT_H > 1 (decode): program (t, s) reduces x[:, s*H_PER_SPLIT : ...] only,
    # writes the real tokens' rows of its partial [BLOCK_T, BLOCK_R] to partial_ptr [SPLIT_H, num token blocks,
    # BLOCK_T, BLOCK_R] and bumps counter_ptr[t]; the last program of token block t to arrive sums the partials, runs
    # steps 2-6 and resets the counter to 0 for the next launch. The down projection then streams Wd through SPLIT_H
    # compute units at once.
    w_dtype = down_w_ptr.dtype.element_ty
    pid_t = tl.program_id(0)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    rcols = tl.arange(0, BLOCK_R)
    rmask = rcols < R

    # 1. down projection, K-loop over this program's part of H
    k_begin = tl.program_id(1) * H_PER_SPLIT
    k_end = tl.minimum(k_begin + H_PER_SPLIT, H)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + ks
        kmask = kk < k_end
        xt = tl.load(x_ptr + rows64[:, None] * H + kk[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        # Wd^T tile [BLOCK_K, BLOCK_R] of the row-major Wd [R, H]
        wt = tl.load(down_w_ptr + rcols[None, :].to(tl.int64) * H + kk[:, None],
                     mask=rmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(xt.to(w_dtype), wt, acc, input_precision="ieee")

    if SPLIT_H == 1:
        _router_tail(acc, rows, row_mask, rows64, rcols, rmask, r_prev_ptr, gamma_ptr, down_b_ptr, norm_w_ptr,
                     fc1_w_ptr, fc1_b_ptr, fc2_w_ptr, fc2_b_ptr, out_w_ptr, bias_ptr, index_ptr, weight_ptr, r_ptr,
                     logits_ptr, R, C, eps, w_dtype, HAS_PREV, STORE_LOGITS, BLOCK_T, BLOCK_R, BLOCK_C, BLOCK_E)
    else:
        tile = tl.arange(0, BLOCK_T)[:, None] * BLOCK_R + rcols[None, :]
        block_stride = tl.num_programs(0).to(tl.int64) * BLOCK_T * BLOCK_R
        my_partial = partial_ptr + tl.program_id(1) * block_stride + pid_t.to(tl.int64) * BLOCK_T * BLOCK_R
        # only the rows of real tokens: at T = 1 the last program then reads 1 / BLOCK_T of the partial tiles
        partial_mask = row_mask[:, None] & rmask[None, :]
        tl.store(my_partial + tile, acc, mask=partial_mask)
        # The barrier alone does not publish the other waves' stores: it orders the waves, but on AMD (gfx942) it
        # is a bare s_barrier and the arrival atomic's release waits only for its own wave's stores, so the last
        # program could sum a partial still in flight. A release atomic in every thread (adding integer 0 to its
        # own partial: no change) makes each wave wait for its stores before the barrier. RELEASE_LANES >= the
        # threads of the program, so every wave holds at least one of these atomics.
        lanes = tl.arange(0, RELEASE_LANES) % (BLOCK_T * BLOCK_R)
        tl.atomic_add(my_partial.to(tl.pointer_type(tl.int32)) + lanes, 0, sem="release")
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(counter_ptr + pid_t, 1, sem="acq_rel")
        if arrived == SPLIT_H - 1:
            total = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for s in range(0, SPLIT_H):
                total += tl.load(partial_ptr + s * block_stride + pid_t.to(tl.int64) * BLOCK_T * BLOCK_R + tile,
                                 mask=partial_mask, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + pid_t, 0)
            _router_tail(total, rows, row_mask, rows64, rcols, rmask, r_prev_ptr, gamma_ptr, down_b_ptr, norm_w_ptr,
                         fc1_w_ptr, fc1_b_ptr, fc2_w_ptr, fc2_b_ptr, out_w_ptr, bias_ptr, index_ptr, weight_ptr,
                         r_ptr, logits_ptr, R, C, eps, w_dtype, HAS_PREV, STORE_LOGITS, BLOCK_T, BLOCK_R, BLOCK_C,
                         BLOCK_E)


# ---- launch configurations: (max T, BLOCK_T, BLOCK_K, BLOCK_C, num_warps); the AOT report compiles each one ----
# Chosen for zero spills at the ZAYA1-8B shape (R 256) on gfx942, gfx950 and sm_90; BLOCK_T 64 spills there. Decode
# (T <= DECODE_MAX_T, split over H) takes BLOCK_T 16: with 32 its split kernel spilled 16-64 B on sm_90 in the
# variant Triton builds for aligned pointers, and more token blocks run the router tail on more compute units. Its
# tail (one program per token block, after the split down projection) walks fc1/fc2 in BLOCK_C 32 chunks: half the
# dependent load rounds of 16, spill-free in every variant on all three targets (64 spills 156-208 B on sm_90 and
# gfx950); the prefill's BLOCK_T 32 tiles spill with 32 (89 VGPRs on gfx942), so 16 there.
DECODE_MAX_T = 64
_CONFIGS = ((DECODE_MAX_T, 16, 32, 32, 8), (None, 32, 32, 16, 8))
# Wider routers keep the tiles of R 256: BLOCK_T x BLOCK_R (the fp32 accumulators), BLOCK_K x BLOCK_R (the Wd^T
# tile) and BLOCK_C x BLOCK_R (the W1 / W2 chunks) stay within 32 x 256 (at R 512, BLOCK_T 32 spilled 828 B on sm_90
# and 56 VGPRs on gfx942; BLOCK_T 16 with BLOCK_K 32 still 36 B on sm_90; BLOCK_T 16 with BLOCK_K 16 none; BLOCK_C 32
# 716-800 B on sm_90, measured with the AOT report).
MAX_R_TILE = 32 * 256
# Software pipelining of the K loops (the next Wd, W1 and W2 tiles load while the current one multiplies; Triton's
# own default on AMD) up to R 256, spill-free there in every variant on all three targets; at R 512 two stages
# spill 23-77 VGPRs on gfx942 / gfx950 (AOT report), so one.
PIPELINED_MAX_R = 256


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def pick_config(T: int, H: int, R: int, C: int) -> dict:
    """Block sizes, warps and stages for T tokens of width H, router hidden R, C = E + 1 classes."""
    for max_t, block_t, block_k, block_c, num_warps in _CONFIGS:
        if max_t is None or T <= max_t:
            break
    block_r = _pow2(R)
    block_t = max(16, min(block_t, MAX_R_TILE // block_r))
    block_k = max(16, min(block_k, MAX_R_TILE // block_r))
    block_c = min(block_c, block_r, MAX_R_TILE // block_r)
    # RELEASE_LANES: at least one lane per thread (64-wide AMD wavefronts) for the split decode's release atomics
    return dict(BLOCK_T=block_t, BLOCK_K=min(block_k, _pow2(H)), BLOCK_R=block_r, BLOCK_C=block_c,
                BLOCK_E=_pow2(C), RELEASE_LANES=64 * num_warps, num_warps=num_warps,
                num_stages=PIPELINED if block_r <= PIPELINED_MAX_R else NO_PIPELINING)


# Decode (T <= DECODE_MAX_T): the down projection is split over H across SPLIT_H programs per token block,
# about SPLIT_CHUNK_H columns each (at most MAX_SPLIT), so Wd streams through several compute units instead of one.
SPLIT_CHUNK_H = 256
MAX_SPLIT = 16
# Arrival counters, all zero between launches (the last program of each token block resets its own): one int32 [64]
# buffer per (device, stream) -- per device alone off CUDA -- so launches on two streams never count into one
# buffer. A launch captured into a CUDA graph gets a fresh zeroed buffer (see _counters).
_COUNTERS: dict = {}


def pick_split(T: int, H: int, block_t: int, block_k: int) -> tuple[int, int]:
    """(SPLIT_H, H_PER_SPLIT): how many programs share one token block's down projection, and their H range."""
    split = min(MAX_SPLIT, triton.cdiv(H, SPLIT_CHUNK_H)) if T <= DECODE_MAX_T else 1
    if split <= 1:
        return 1, H
    per = block_k * triton.cdiv(triton.cdiv(H, split), block_k)
    return triton.cdiv(H, per), per


def _stream_key(device: torch.device):
    """The _COUNTERS key of a launch on the current stream: (device, stream id) on CUDA, the device elsewhere."""
    if device.type == "cuda":
        return device, torch.cuda.current_stream(device).stream_id
    return device


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 [>= n] arrival counters, zero, that no launch running concurrently with this one uses.

    Kernels on one stream run one after another, and each leaves its counters at zero: one cached buffer per
    stream. Under CUDA graph capture a cached buffer is wrong twice over: torch.zeros would only be recorded (the
    buffer stays uninitialised for eager launches), and graphs replayed on different streams would share it. So a
    captured launch gets its own zeroed buffer, a memset node in front of it in the graph.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(max(64, n), dtype=torch.int32, device=device)
    key = _stream_key(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(64, n), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def zaya_router_fwd(x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, eps,
                    index, weight, r, logits):
    """Launch into preallocated outputs. x [T, H]; r_prev [T, R] or None; gamma, down_b, norm_w, fc1_b, fc2_b fp32
    vectors; weights row-major in one dtype; balance_bias fp32 [C]; index int32 [T]; weight fp32 [T]; r [T, R]
    x.dtype; logits fp32 [T, C] or None.

    Decode launches with SPLIT_H > 1 count arrivals in a per-stream counter buffer that every launch leaves at zero
    (a fresh one per launch under CUDA graph capture): launches on different streams may run concurrently.
    """
    T, H = x.shape
    R = down_w.shape[0]
    C = out_w.shape[0]
    if R > MAX_R:
        raise ValueError(f"zaya::zaya_router: the Triton kernel supports a router hidden size R <= {MAX_R}, got {R}; "
                         "use the reference backend for wider routers")
    if _pow2(C) > MAX_BLOCK_E or _pow2(R) * _pow2(C) > MAX_RE_TILE:
        raise ValueError(f"zaya::zaya_router: the Triton kernel supports C = E + 1 <= {MAX_BLOCK_E} router classes and "
                         f"pow2(R) * pow2(C) <= {MAX_RE_TILE} (shared memory), got C = {C} (out_w rows) with R = {R}; "
                         "use the reference backend for more experts")
    if T == 0:
        return
    cfg = pick_config(T, H, R, C)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    n_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    split, per = pick_split(T, H, cfg["BLOCK_T"], cfg["BLOCK_K"])
    if split > 1:
        partial = torch.empty(split, n_blocks, cfg["BLOCK_T"], cfg["BLOCK_R"], dtype=torch.float32, device=x.device)
        counter = _counters(x.device, n_blocks)
    else:
        partial, counter = weight, index  # not read
    dummy = x
    zaya_router_fwd_kernel[(n_blocks, split)](
        x, r_prev if r_prev is not None else dummy, gamma if gamma is not None else down_b, down_w, down_b, norm_w,
        fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, index, weight, r, logits if logits is not None else weight,
        partial, counter, T, H, R, C, eps, per,
        HAS_PREV=r_prev is not None, STORE_LOGITS=logits is not None, SPLIT_H=split,
        num_warps=num_warps, num_stages=num_stages, **cfg,
    )


def _aot_configs(H: int = 2048, R: int = 256, C: int = 17, token_counts=(1, 8192)):
    """ZAYA1-8B router (H 2048, R 256, 16 experts + skip), bf16 activations and parameters (fp32 balancing biases,
    as in a bf16 transformers model): every launch config the launcher picks, at T = 1 (split decode, the config of
    every T <= DECODE_MAX_T) and 8192 (prefill). Other shapes: see register_aot below."""
    configs = []
    for T in token_counts:
        cfg = pick_config(T, H, R, C)
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        split, _ = pick_split(T, H, cfg["BLOCK_T"], cfg["BLOCK_K"])
        for has_prev, store_logits in ((True, False), (False, True)):
            consts = dict(HAS_PREV=has_prev, STORE_LOGITS=store_logits, SPLIT_H=split, **cfg)
            label = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items()) + \
                f",warps={num_warps},stages={num_stages}"
            sig = {"x_ptr": "*bf16", "r_prev_ptr": "*bf16", "gamma_ptr": "*bf16", "down_w_ptr": "*bf16",
                   "down_b_ptr": "*bf16", "norm_w_ptr": "*bf16", "fc1_w_ptr": "*bf16", "fc1_b_ptr": "*bf16",
                   "fc2_w_ptr": "*bf16", "fc2_b_ptr": "*bf16", "out_w_ptr": "*bf16", "bias_ptr": "*fp32",
                   "index_ptr": "*i32", "weight_ptr": "*fp32", "r_ptr": "*bf16", "logits_ptr": "*fp32",
                   "partial_ptr": "*fp32", "counter_ptr": "*i32",
                   "T": "i32", "H": "i32", "R": "i32", "C": "i32", "eps": "fp32", "H_PER_SPLIT": "i32"}
            sig.update({k: "constexpr" for k in consts})
            configs.append(AotConfig(label=label, signature=sig, constexprs=consts, num_warps=num_warps,
                                     num_stages=num_stages, matrix_expected=True))
    return configs


# and the widest router the launcher takes (R 512), at decode and prefill
register_aot("router_fwd", zaya_router_fwd_kernel, _aot_configs() + _aot_configs(R=MAX_R, C=17, token_counts=(1, 8192)))
