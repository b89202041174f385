"""GPU tests of the HIP/CUDA launchers in zaya_kernels._C (csrc/residual_rmsnorm.cu), called directly.

Compared against an inline fp64 computation of DESIGN.md 1.2 (and the lead's reference for the forward). The new
residual is elementwise fp32 with no FMA contraction, so it must match PyTorch's fp32 result bit for bit.
Skipped without a GPU (conftest) or when the extension was built without GPU launchers.
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 2047: odd; 8200: beyond the register-cached columns of both kernels (8 * 1024 fwd, 8 * 512 bwd); 65536: large.
SHAPES = [(1, 1), (3, 7), (5, 64), (37, 2047), (16, 2048), (4, 8200), (3, 65536)]
EPS = 1e-5


def _C():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA or ROCm GPU; this machine has none")
    import zaya_kernels

    C = zaya_kernels._C
    if getattr(C, "gpu_build", "none") == "none" or not hasattr(C, "residual_scale_rmsnorm_fwd"):
        pytest.skip("zaya_kernels._C was built without the GPU launchers (CPU-only build)")
    return C


def _inputs(N, H, dtype, with_residual, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, dt=torch.float32, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale + offset).to(dt)

    x = rnd(N, H, dt=dtype, scale=2.0)
    r = rnd(N, H, scale=3.0) if with_residual else None
    hs, hb = rnd(H, scale=0.5, offset=1.0), rnd(H, scale=0.1)
    rs, rb = (rnd(H, scale=0.5, offset=1.0), rnd(H, scale=0.1)) if with_residual else (None, None)
    w = rnd(H, dt=torch.bfloat16, scale=0.3, offset=1.0).float()  # bf16-valued weights, as the model has
    return x, r, hs, hb, rs, rb, w


def _fwd64(x, r, hs, hb, rs, rb, w, dtype):
    R = (x.float() + hb) * hs
    if r is not None:
        R = R + (r + rb) * rs  # fp32, op by op: the kernel must equal this bitwise
    xr = R.to(dtype).double()
    rstd = torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + EPS)
    nhat = (xr * rstd).to(dtype).double()
    normed = w.double() * nhat
    return R, xr, rstd, normed


def _run_fwd(C, x, r, hs, hb, rs, rb, w):
    R = torch.empty(x.shape, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    C.residual_scale_rmsnorm_fwd(x, r, hs, hb, rs, rb, w, EPS, R, y)
    return R, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_residual_scale_rmsnorm_fwd(dtype, N, H, with_residual):
    C = _C()
    x, r, hs, hb, rs, rb, w = _inputs(N, H, dtype, with_residual)
    R, y = _run_fwd(C, x, r, hs, hb, rs, rb, w)
    R_ref, _, _, y_ref = _fwd64(x, r, hs, hb, rs, rb, w, dtype)
    assert torch.equal(R, R_ref), f"new residual differs from PyTorch fp32: max {(R - R_ref).abs().max().item()}"
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype=dtype, reduction=H, what="normed")


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_scale_rmsnorm_fwd_matches_reference(dtype):
    C = _C()
    from zaya_kernels.reference.residual_rmsnorm import residual_scale_rmsnorm

    x, r, hs, hb, rs, rb, w = _inputs(64, 2048, dtype, True, seed=3)
    R, y = _run_fwd(C, x, r, hs, hb, rs, rb, w)
    R_ref, y_ref = residual_scale_rmsnorm(x, r, hs, hb, rs, rb, w.to(dtype), EPS)
    assert torch.equal(R, R_ref)
    assert_close(y, y_ref, dtype=dtype, reduction=2048, what="normed vs reference")


def _bwd64(dy, dR, x, r, hs, rs, w, R, dtype):
    xr = R.to(dtype).double()
    rstd = torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + EPS)
    nh = xr * rstd
    dn = dy.double() * w.double()
    c = (dn * nh).mean(-1, keepdim=True)
    g = rstd * (dn - nh * c)
    if dR is not None:
        g = g + dR.double()
    nhat = (xr.float() * rstd.float()).to(dtype).double()
    parts = torch.stack(
        [
            g.sum(0),
            (g * x.double()).sum(0),
            (g * r.double()).sum(0) if r is not None else torch.zeros_like(g[0]),
            (dy.double() * nhat).sum(0),
        ]
    )
    grad_r = g * rs.double() if rs is not None else g
    return g * hs.double(), grad_r, parts, (dn.abs() * rstd).max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_residual_scale_rmsnorm_bwd(dtype, N, H, with_residual):
    C = _C()
    x, r, hs, hb, rs, rb, w = _inputs(N, H, dtype, with_residual, seed=1)
    R, _ = _run_fwd(C, x, r, hs, hb, rs, rb, w)
    gen = torch.Generator(device="cuda").manual_seed(2)
    dy = torch.randn(N, H, generator=gen, device="cuda").to(dtype)
    dR = torch.randn(N, H, generator=gen, device="cuda") if with_residual else None
    P = C.residual_rmsnorm_bwd_num_partials(N, H)
    gx = torch.empty_like(x)
    gr = torch.empty(N, H, device="cuda") if with_residual else None
    parts = torch.zeros(P, 4, H, device="cuda")
    C.residual_scale_rmsnorm_bwd(dy, dR, x, r, hs, hb, rs, rb, w, R, EPS, gx, gr, parts)
    gx_ref, gr_ref, parts_ref, scale = _bwd64(dy, dR, x, r, hs, rs, w, R, dtype)
    # scale: g is a cancelling difference of terms of size rstd * |dy * w|; its fp32 error is relative to those.
    assert_close(gx, gx_ref, dtype=dtype, reduction=H, scale=4 * scale * hs.abs().max().item(), what="grad_branch")
    if with_residual:
        assert_close(gr, gr_ref, dtype=torch.float32, reduction=H, scale=4 * scale * rs.abs().max().item(), what="grad_residual")
    total = parts.sum(0)
    assert_close(total[0], parts_ref[0], dtype=torch.float32, reduction=N * H, scale=scale * N, what="sum g")
    assert_close(total[1], parts_ref[1], dtype=torch.float32, reduction=N * H, scale=scale * N * 8, what="sum g*x")
    assert_close(total[2], parts_ref[2], dtype=torch.float32, reduction=N * H, scale=scale * N * 12, what="sum g*r")
    assert_close(total[3], parts_ref[3], dtype=dtype, reduction=N, scale=float(N), what="grad norm_weight")
    # Deterministic: a second run gives the same bits.
    parts2 = torch.zeros_like(parts)
    gx2 = torch.empty_like(gx)
    C.residual_scale_rmsnorm_bwd(dy, dR, x, r, hs, hb, rs, rb, w, R, EPS, gx2, gr, parts2)
    assert torch.equal(parts, parts2) and torch.equal(gx, gx2)


@pytest.mark.parametrize("in_dtype,out_dtype", [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("N,H", SHAPES)
def test_rmsnorm_fwd_bwd(in_dtype, out_dtype, N, H):
    C = _C()
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = (torch.randn(N, H, generator=gen, device="cuda") * 3).to(in_dtype)
    w = (torch.randn(H, generator=gen, device="cuda") * 0.3 + 1).to(torch.bfloat16).float()
    out = torch.empty(N, H, device="cuda", dtype=out_dtype)
    C.rmsnorm_fwd(x, w, EPS, out)
    xr = x.to(out_dtype).double()
    rstd = torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + EPS)
    assert_close(out, w.double() * (xr * rstd).to(out_dtype).double(), dtype=out_dtype, reduction=H, what="rmsnorm")

    dy = torch.randn(N, H, generator=gen, device="cuda").to(out_dtype)
    P = C.residual_rmsnorm_bwd_num_partials(N, H)
    gx = torch.empty_like(x)
    parts = torch.zeros(P, 1, H, device="cuda")
    C.rmsnorm_bwd(dy, x, w, EPS, gx, parts)
    nh = xr * rstd
    dn = dy.double() * w.double()
    gx_ref = rstd * (dn - nh * (dn * nh).mean(-1, keepdim=True))
    scale = (dn.abs() * rstd).max().item() if N else 1.0
    assert_close(gx, gx_ref, dtype=in_dtype, reduction=H, scale=4 * scale, what="grad_x")
    nhat = (xr.float() * rstd.float()).to(out_dtype).double()
    assert_close(parts.sum((0, 1)), (dy.double() * nhat).sum(0), dtype=out_dtype, reduction=N, scale=float(N), what="grad weight")


def test_empty_rows_launch_nothing():
    C = _C()
    x, r, hs, hb, rs, rb, w = _inputs(0, 32, torch.bfloat16, True)
    R, y = _run_fwd(C, x, r, hs, hb, rs, rb, w)
    assert R.shape == (0, 32) and y.shape == (0, 32)
    parts = torch.zeros(C.residual_rmsnorm_bwd_num_partials(0, 32), 4, 32, device="cuda")
    C.residual_scale_rmsnorm_bwd(y, R, x, r, hs, hb, rs, rb, w, R, EPS, torch.empty_like(x), torch.empty_like(R), parts)
    assert not parts.any()


def test_bad_arguments_name_the_argument():
    C = _C()
    x, r, hs, hb, rs, rb, w = _inputs(4, 64, torch.bfloat16, True)
    R = torch.empty(4, 64, device="cuda")
    y = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="residual"):
        C.residual_scale_rmsnorm_fwd(x, r.to(torch.bfloat16), hs, hb, rs, rb, w, EPS, R, y)
    with pytest.raises(RuntimeError, match="hidden_scale"):
        C.residual_scale_rmsnorm_fwd(x, r, hs[:32], hb, rs, rb, w, EPS, R, y)
    with pytest.raises(RuntimeError, match="norm_weight"):
        C.residual_scale_rmsnorm_fwd(x, r, hs, hb, rs, rb, w.cpu(), EPS, R, y)
    with pytest.raises(RuntimeError, match="branch"):
        C.residual_scale_rmsnorm_fwd(x.t(), r, hs, hb, rs, rb, w, EPS, R, y)
    with pytest.raises(RuntimeError, match="normed_out"):
        C.residual_scale_rmsnorm_fwd(x, r, hs, hb, rs, rb, w, EPS, R, y.float())
    with pytest.raises(RuntimeError, match="x"):
        C.rmsnorm_fwd(x, w, EPS, torch.empty(4, 64, device="cuda", dtype=torch.float16))
