"""Triton kernels for residual scaling + RMSNorm (DESIGN.md 1.2): forward and backward, launchers and configs.

MODE (constexpr) selects the form:
  0 plain RMSNorm         normed = w * rmsnorm(x.to(A)).to(A)                 (the final norm; no residual output)
  1 model input           R = (x + hb) * hs;                normed as above on R
  2 residual scaling      R = (x + hb) * hs + (r + rb) * rs; normed as above on R
A is the activation (output) dtype. All arithmetic is fp32. One program owns BLOCK_N rows at a time and walks the
row tiles pid, pid + P, ...; when a row fits one BLOCK_H chunk (H <= 4096 forward, <= 2048 backward; ZAYA's 2048
included) the row is read once and kept in registers (SINGLE_CHUNK); wider rows take two passes over BLOCK_H chunks
(statistics, then outputs), recomputing R from the inputs rather than reading back what this program wrote.

Backward: per row g = dR + rstd * (dn - nh * mean(dn * nh)) with nh = xr * rstd, dn = dy * w. Parameter gradients
are column sums over rows: each program accumulates its rows into its own slot of a partial buffer
[P, 4, H] = (sum g, sum g * x, sum g * r, sum dy * nhat), and the launcher sums the P slots with torch
(deterministic: no atomics).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from zaya_kernels.triton._aot import NO_PIPELINING, AotConfig, register_aot

MODE_RMSNORM, MODE_INPUT, MODE_RESIDUAL = 0, 1, 2


@triton.jit
def _norm_input(x_ptr, r_ptr, hs_ptr, hb_ptr, rs_ptr, rb_ptr, offs, cols, mask, col_mask, MODE: tl.constexpr):
    """The fp32 pre-norm value of a [BLOCK_N, BLOCK_H] tile: R (MODE 1, 2) or x itself (MODE 0)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        return x
    hs = tl.load(hs_ptr + cols, mask=col_mask, other=0.0)
    hb = tl.load(hb_ptr + cols, mask=col_mask, other=0.0)
    value = (x + hb[None, :]) * hs[None, :]
    if MODE == 2:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        rs = tl.load(rs_ptr + cols, mask=col_mask, other=0.0)
        rb = tl.load(rb_ptr + cols, mask=col_mask, other=0.0)
        value += (r + rb[None, :]) * rs[None, :]
    return value


@triton.jit
def residual_rmsnorm_fwd_kernel(
    x_ptr, r_ptr, hs_ptr, hb_ptr, rs_ptr, rb_ptr, w_ptr, new_residual_ptr, normed_ptr,
    N, H, eps,
    MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
):
    act_dtype = normed_ptr.dtype.element_ty
    num_tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        row_start = rows.to(tl.int64)[:, None] * H
        if SINGLE_CHUNK:
            cols = tl.arange(0, BLOCK_H)
            col_mask = cols < H
            mask = row_mask[:, None] & col_mask[None, :]
            offs = row_start + cols[None, :]
            value = _norm_input(x_ptr, r_ptr, hs_ptr, hb_ptr, rs_ptr, rb_ptr, offs, cols, mask, col_mask, MODE)
            if MODE != 0:
                tl.store(new_residual_ptr + offs, value, mask=mask)
            xr = value.to(act_dtype).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(xr * xr, axis=1) / H + eps)
            nhat = (xr * rstd[:, None]).to(act_dtype).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
            tl.store(normed_ptr + offs, (w[None, :] * nhat).to(act_dtype), mask=mask)
        else:
            sum_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for start in range(0, H, BLOCK_H):
                cols = start + tl.arange(0, BLOCK_H)
                col_mask = cols < H
                mask = row_mask[:, None] & col_mask[None, :]
                offs = row_start + cols[None, :]
                value = _norm_input(x_ptr, r_ptr, hs_ptr, hb_ptr, rs_ptr, rb_ptr, offs, cols, mask, col_mask, MODE)
                if MODE != 0:
                    tl.store(new_residual_ptr + offs, value, mask=mask)
                xr = value.to(act_dtype).to(tl.float32)
                sum_sq += tl.sum(xr * xr, axis=1)
            rstd = tl.rsqrt(sum_sq / H + eps)
            for start in range(0, H, BLOCK_H):
                cols = start + tl.arange(0, BLOCK_H)
                col_mask = cols < H
                mask = row_mask[:, None] & col_mask[None, :]
                offs = row_start + cols[None, :]
                value = _norm_input(x_ptr, r_ptr, hs_ptr, hb_ptr, rs_ptr, rb_ptr, offs, cols, mask, col_mask, MODE)
                nhat = (value.to(act_dtype).to(tl.float32) * rstd[:, None]).to(act_dtype).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
                tl.store(normed_ptr + offs, (w[None, :] * nhat).to(act_dtype), mask=mask)


@triton.jit
def _bwd_row_terms(dy_ptr, w_ptr, offs, cols, mask, col_mask, xr, rstd, c, act_dtype):
    """(g_norm, dy * nhat) for one tile: the norm-input gradient and the norm-weight gradient terms."""
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    nh = xr * rstd[:, None]
    grad_input = rstd[:, None] * (dy * w[None, :] - nh * c[:, None])
    return grad_input, dy * nh.to(act_dtype).to(tl.float32)


@triton.jit
def residual_rmsnorm_bwd_kernel(
    dy_ptr, d_new_residual_ptr, x_ptr, r_ptr, hs_ptr, rs_ptr, w_ptr, norm_input_ptr,
    grad_x_ptr, grad_r_ptr, partial_ptr,
    N, H, eps,
    MODE: tl.constexpr, HAS_DR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    # partial_ptr: fp32 [P, 4, H] (MODE 1, 2: sum g, sum g x, sum g r, sum dy nhat) or [P, 1, H] (MODE 0: sum dy nhat)
    act_dtype = dy_ptr.dtype.element_ty
    pid = tl.program_id(0)
    NUM_PARTIALS: tl.constexpr = 1 if MODE == 0 else 4
    W_SLOT: tl.constexpr = 0 if MODE == 0 else 3
    partial_row = partial_ptr + pid.to(tl.int64) * NUM_PARTIALS * H
    num_tiles = tl.cdiv(N, BLOCK_N)
    if SINGLE_CHUNK:
        cols = tl.arange(0, BLOCK_H)
        col_mask = cols < H
        acc_g = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc_gx = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc_gr = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc_w = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        row_start = rows.to(tl.int64)[:, None] * H
        # Pass 1: the row statistics rstd and c = mean(dn * nh) = rstd * mean(dy * w * xr).
        sum_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sum_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            cols_c = start + tl.arange(0, BLOCK_H)
            cmask_c = cols_c < H
            mask_c = row_mask[:, None] & cmask_c[None, :]
            offs_c = row_start + cols_c[None, :]
            xr_c = tl.load(norm_input_ptr + offs_c, mask=mask_c, other=0.0).to(act_dtype).to(tl.float32)
            dy_c = tl.load(dy_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            w_c = tl.load(w_ptr + cols_c, mask=cmask_c, other=0.0)
            sum_sq += tl.sum(xr_c * xr_c, axis=1)
            sum_dot += tl.sum(dy_c * w_c[None, :] * xr_c, axis=1)
        rstd = tl.rsqrt(sum_sq / H + eps)
        c = sum_dot * rstd / H
        # Pass 2: gradients; with SINGLE_CHUNK the tile is still in cache and the sums stay in registers.
        for start in range(0, H, BLOCK_H):
            cols_c = start + tl.arange(0, BLOCK_H)
            cmask_c = cols_c < H
            mask_c = row_mask[:, None] & cmask_c[None, :]
            offs_c = row_start + cols_c[None, :]
            xr_c = tl.load(norm_input_ptr + offs_c, mask=mask_c, other=0.0).to(act_dtype).to(tl.float32)
            g, dw_terms = _bwd_row_terms(dy_ptr, w_ptr, offs_c, cols_c, mask_c, cmask_c, xr_c, rstd, c, act_dtype)
            if MODE == 0:
                tl.store(grad_x_ptr + offs_c, g.to(grad_x_ptr.dtype.element_ty), mask=mask_c)
            else:
                if HAS_DR:
                    g += tl.load(d_new_residual_ptr + offs_c, mask=mask_c, other=0.0)
                hs = tl.load(hs_ptr + cols_c, mask=cmask_c, other=0.0)
                x = tl.load(x_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                tl.store(grad_x_ptr + offs_c, (g * hs[None, :]).to(grad_x_ptr.dtype.element_ty), mask=mask_c)
                if MODE == 2:
                    rs = tl.load(rs_ptr + cols_c, mask=cmask_c, other=0.0)
                    r = tl.load(r_ptr + offs_c, mask=mask_c, other=0.0)
                    tl.store(grad_r_ptr + offs_c, g * rs[None, :], mask=mask_c)
            if SINGLE_CHUNK:
                acc_w += tl.sum(dw_terms, axis=0)
                if MODE != 0:
                    acc_g += tl.sum(g, axis=0)
                    acc_gx += tl.sum(g * x, axis=0)
                    if MODE == 2:
                        acc_gr += tl.sum(g * r, axis=0)
            else:
                # Each program owns its partial row: a read-modify-write with no other writer.
                slot = partial_row + cols_c
                tl.store(slot + W_SLOT * H, tl.load(slot + W_SLOT * H, mask=cmask_c) + tl.sum(dw_terms, axis=0),
                         mask=cmask_c)
                if MODE != 0:
                    tl.store(slot, tl.load(slot, mask=cmask_c) + tl.sum(g, axis=0), mask=cmask_c)
                    tl.store(slot + H, tl.load(slot + H, mask=cmask_c) + tl.sum(g * x, axis=0), mask=cmask_c)
                    if MODE == 2:
                        tl.store(slot + 2 * H, tl.load(slot + 2 * H, mask=cmask_c) + tl.sum(g * r, axis=0),
                                 mask=cmask_c)
    if SINGLE_CHUNK:
        slot = partial_row + cols
        tl.store(slot + W_SLOT * H, acc_w, mask=col_mask)
        if MODE != 0:
            tl.store(slot, acc_g, mask=col_mask)
            tl.store(slot + H, acc_gx, mask=col_mask)
            if MODE == 2:
                tl.store(slot + 2 * H, acc_gr, mask=col_mask)


# ---- launch configurations by row width, per direction: (max H, BLOCK_N, BLOCK_H, warps); wider rows take the
# chunked config (BLOCK_N, BLOCK_H, warps). The AOT report compiles each one. A 4096-wide row in registers takes
# 16 warps in the forward (8 spill with Triton 3.6 on sm_90, whose register budget there is 128). The backward keeps
# four column sums per row besides the row itself: at 4096 its MODE 2 spills on sm_90 with 8 warps (255 registers)
# and with 16 (128) once Triton vectorises the loads of aligned pointers, so its rows stay in registers only up to
# 2048 and wider ones walk 2048-wide chunks. Per thread and chunk the chunked passes hold 8 elements (forward) and
# 4 (backward, beside its column sums): with 16 and 8 (4096 x 8 warps, 2048 x 8) they spilled 8-16 B on sm_90 with
# aligned arguments.
_FWD_CONFIGS = ((256, 8, 256, 4), (1024, 2, 1024, 4), (2048, 1, 2048, 8), (4096, 1, 4096, 16))
_FWD_CHUNKED = (1, 2048, 8)
_BWD_CONFIGS = ((256, 8, 256, 4), (1024, 2, 1024, 4), (2048, 1, 2048, 8))
_BWD_CHUNKED = (1, 2048, 16)


def _launch_table(backward: bool) -> list[tuple[int | None, int, int, int, bool]]:
    """(max H or None for any wider row, BLOCK_N, BLOCK_H, num_warps, SINGLE_CHUNK) of the forward or the backward."""
    configs, chunked = (_BWD_CONFIGS, _BWD_CHUNKED) if backward else (_FWD_CONFIGS, _FWD_CHUNKED)
    return [(*config, True) for config in configs] + [(None, *chunked, False)]


def pick_config(H: int, backward: bool = False) -> tuple[int, int, int, bool]:
    """(BLOCK_N, BLOCK_H, num_warps, SINGLE_CHUNK) for rows of width H, for the forward or the backward kernel."""
    for max_h, *config in _launch_table(backward):
        if max_h is None or H <= max_h:
            return tuple(config)
    raise AssertionError("the launch table ends with the chunked config")


@functools.lru_cache(maxsize=None)
def _num_programs_cap(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few programs, more rows each


def _grid(N: int, block_n: int, device: torch.device) -> int:
    return max(1, min(triton.cdiv(N, block_n), _num_programs_cap(device)))


def residual_rmsnorm_fwd(x, residual, hs, hb, rs, rb, weight, eps, new_residual, normed, mode):
    """Launch the forward into preallocated outputs. x [N, H]; residual [N, H] fp32 or None; hs, hb, rs, rb,
    weight [H] contiguous, any float dtype (loaded as fp32); new_residual [N, H] fp32 (ignored in MODE 0);
    normed [N, H] activation dtype."""
    N, H = x.shape
    if N == 0:
        return
    block_n, block_h, num_warps, single = pick_config(H)
    dummy = x  # pointer for arguments a MODE does not read
    residual_rmsnorm_fwd_kernel[(_grid(N, block_n, x.device),)](
        x, residual if residual is not None else dummy, hs if hs is not None else dummy,
        hb if hb is not None else dummy, rs if rs is not None else dummy, rb if rb is not None else dummy,
        weight, new_residual if new_residual is not None else normed, normed, N, H, eps,
        MODE=mode, BLOCK_N=block_n, BLOCK_H=block_h, SINGLE_CHUNK=single, num_warps=num_warps,
        num_stages=NO_PIPELINING,
    )


def residual_rmsnorm_bwd(dy, d_new_residual, x, residual, hs, rs, weight, eps, norm_input, grad_x, grad_r, mode):
    """Launch the backward; returns the summed parameter partials fp32 [4, H] (MODE 1, 2) or [1, H] (MODE 0).

    norm_input is the tensor the norm read (R, or x in MODE 0); grad_x [N, H] x.dtype, grad_r [N, H] fp32 (MODE 2).
    """
    N, H = x.shape
    num_partials = 1 if mode == MODE_RMSNORM else 4
    if N == 0:
        return torch.zeros(num_partials, H, dtype=torch.float32, device=x.device)
    block_n, block_h, num_warps, single = pick_config(H, backward=True)
    programs = _grid(N, block_n, x.device)
    alloc = torch.empty if single else torch.zeros  # the chunked path accumulates into its slots
    partials = alloc(programs, num_partials, H, dtype=torch.float32, device=x.device)
    dummy = x
    residual_rmsnorm_bwd_kernel[(programs,)](
        dy, d_new_residual if d_new_residual is not None else dummy, x,
        residual if residual is not None else dummy, hs if hs is not None else dummy,
        rs if rs is not None else dummy, weight, norm_input, grad_x, grad_r if grad_r is not None else grad_x,
        partials, N, H, eps,
        MODE=mode, HAS_DR=d_new_residual is not None, BLOCK_N=block_n, BLOCK_H=block_h, SINGLE_CHUNK=single,
        num_warps=num_warps, num_stages=NO_PIPELINING,
    )
    return partials.sum(0)


def _aot_configs(backward: bool) -> list:
    """Every (config, mode) the launcher of one direction can pick, with the dtypes of a bf16 ZAYA model: bf16
    activations and forward parameters, the fp32 residual (which the final norm, MODE 0, reads); the backward takes
    fp32 parameters."""
    out = []
    for _, block_n, block_h, num_warps, single in _launch_table(backward):
        for mode in (MODE_RMSNORM, MODE_INPUT, MODE_RESIDUAL):
            x_type = "*fp32" if mode == MODE_RMSNORM else "*bf16"  # the final norm reads the fp32 residual
            label = f"mode={mode},BLOCK_N={block_n},BLOCK_H={block_h},single={int(single)},warps={num_warps}"
            consts = {"MODE": mode, "BLOCK_N": block_n, "BLOCK_H": block_h, "SINGLE_CHUNK": single}
            if backward:
                label += ",dR=1"
                consts["HAS_DR"] = mode != MODE_RMSNORM
                pointers = {"dy_ptr": "*bf16", "d_new_residual_ptr": "*fp32", "x_ptr": x_type, "r_ptr": "*fp32",
                            "hs_ptr": "*fp32", "rs_ptr": "*fp32", "w_ptr": "*fp32", "norm_input_ptr": "*fp32",
                            "grad_x_ptr": x_type, "grad_r_ptr": "*fp32", "partial_ptr": "*fp32"}
            else:
                pointers = {"x_ptr": x_type, "r_ptr": "*fp32", "hs_ptr": "*bf16", "hb_ptr": "*bf16", "rs_ptr": "*bf16",
                            "rb_ptr": "*bf16", "w_ptr": "*bf16", "new_residual_ptr": "*fp32", "normed_ptr": "*bf16"}
            signature = {**pointers, "N": "i32", "H": "i32", "eps": "fp32", "MODE": "constexpr",
                         **({"HAS_DR": "constexpr"} if backward else {}), "BLOCK_N": "constexpr",
                         "BLOCK_H": "constexpr", "SINGLE_CHUNK": "constexpr"}
            out.append(AotConfig(label=label, signature=signature, constexprs=consts, num_warps=num_warps))
    return out


register_aot("residual_rmsnorm_fwd", residual_rmsnorm_fwd_kernel, _aot_configs(backward=False))
register_aot("residual_rmsnorm_bwd", residual_rmsnorm_bwd_kernel, _aot_configs(backward=True))
