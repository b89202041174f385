"""Residual scaling + RMSNorm ops (DESIGN.md 1.2): registration, backends, autograd and typed wrappers.

Ops (schemas in csrc/zaya_ops.cpp):
  zaya::residual_scale_rmsnorm(branch, residual?, hs, hb, rs?, rb?, norm_weight, eps) -> (new_residual, normed)
  zaya::rmsnorm(x, weight, eps, out_dtype?) -> normed
and their *_backward ops, used by autograd. Backends: reference (zaya_kernels.reference.residual_rmsnorm),
triton (zaya_kernels.triton.residual_rmsnorm), hip (kernels/residual_rmsnorm.cuh via zaya_kernels._C).
"""
from __future__ import annotations

import torch

from zaya_kernels import backend as _backend
from zaya_kernels.ops import _validate as check
from zaya_kernels.ops._registry import call, register_op
from zaya_kernels.reference import residual_rmsnorm as ref

MODE_RMSNORM, MODE_INPUT, MODE_RESIDUAL = 0, 1, 2
_OP = "residual_scale_rmsnorm"


def _fp32(param):
    """Parameter vectors as contiguous fp32 (a [H] copy at most): what the HIP launchers and the backward math take."""
    return None if param is None else param.float().contiguous()


def _vec(param):
    """Parameter vectors as they are (the Triton kernels load any float dtype in fp32): no extra launch per call."""
    return None if param is None else param.contiguous()


# ---------------------------------------------------------------- validation
def _validate_residual_args(op, branch, residual, hs, hb, rs, rb, weight, eps):
    check.tensor(op, "branch", branch, ndim=2, dtypes=check.FLOAT_DTYPES, contiguous=True)
    n, h = branch.shape
    dev = branch.device
    if residual is not None:
        check.tensor(op, "residual", residual, dtypes=(torch.float32,), shape=(n, h), device=dev, contiguous=True)
    check.optional_together(op, "the residual form needs residual, residual_scale and residual_bias",
                            [("residual", residual), ("residual_scale", rs), ("residual_bias", rb)])
    for name, param in (("hidden_scale", hs), ("hidden_bias", hb), ("residual_scale", rs), ("residual_bias", rb),
                        ("norm_weight", weight)):
        if param is not None:
            check.tensor(op, name, param, dtypes=check.FLOAT_DTYPES, shape=(h,), device=dev)
    check.eps(op, eps)


def _validate_fwd(branch, residual, hs, hb, rs, rb, weight, eps):
    _validate_residual_args(_OP, branch, residual, hs, hb, rs, rb, weight, eps)


def _validate_bwd(dy, d_new_residual, branch, residual, hs, hb, rs, rb, weight, new_residual, eps):
    op = _OP + "_backward"
    _validate_residual_args(op, branch, residual, hs, hb, rs, rb, weight, eps)
    check.tensor(op, "grad_normed", dy, dtypes=(branch.dtype,), shape=branch.shape, device=branch.device,
                 contiguous=True)
    check.tensor(op, "new_residual", new_residual, dtypes=(torch.float32,), shape=branch.shape, device=branch.device,
                 contiguous=True)
    if d_new_residual is not None:
        check.tensor(op, "grad_new_residual", d_new_residual, dtypes=(torch.float32,), shape=branch.shape,
                     device=branch.device, contiguous=True)


def _validate_rmsnorm(x, weight, eps, out_dtype=None):
    check.tensor("rmsnorm", "x", x, ndim=2, dtypes=check.FLOAT_DTYPES, contiguous=True)
    check.tensor("rmsnorm", "weight", weight, dtypes=check.FLOAT_DTYPES, shape=(x.shape[1],), device=x.device)
    check.eps("rmsnorm", eps)
    if out_dtype is not None and out_dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"zaya::rmsnorm: `out_dtype` must be float32, float16 or bfloat16, got {out_dtype}")


def _validate_rmsnorm_bwd(dy, x, weight, eps):
    _validate_rmsnorm(x, weight, eps)
    check.tensor("rmsnorm_backward", "grad_out", dy, dtypes=check.FLOAT_DTYPES, shape=x.shape, device=x.device,
                 contiguous=True)


# ---------------------------------------------------------------- fake kernels (shapes only)
def _fake_fwd(branch, residual, hs, hb, rs, rb, weight, eps):
    return torch.empty_like(branch, dtype=torch.float32), torch.empty_like(branch)


def _fake_bwd(dy, d_new_residual, branch, residual, hs, hb, rs, rb, weight, new_residual, eps):
    def vec(p):
        return None if p is None else torch.empty_like(p, dtype=torch.float32)

    grad_residual = None if residual is None else torch.empty_like(residual)
    return (torch.empty_like(branch), grad_residual, vec(hs), vec(hb), vec(rs), vec(rb), vec(weight))


def _fake_rmsnorm(x, weight, eps, out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype or x.dtype)


def _fake_rmsnorm_bwd(dy, x, weight, eps):
    return torch.empty_like(x), torch.empty_like(weight, dtype=torch.float32)


# ---------------------------------------------------------------- GPU / Triton implementations
def _params_from_partials(partials, hs, hb, rs, rb, has_residual):
    """Parameter gradients from the column sums (sum g, sum g x, sum g r, sum dy nhat)."""
    sum_g, sum_gx, sum_gr, grad_w = partials[0], partials[1], partials[2], partials[3]
    grad_hs = sum_gx + hb * sum_g
    grad_hb = hs * sum_g
    if not has_residual:
        return grad_hs, grad_hb, None, None, grad_w
    return grad_hs, grad_hb, sum_gr + rb * sum_g, rs * sum_g, grad_w


def _fwd_outputs(branch):
    return torch.empty_like(branch, dtype=torch.float32), torch.empty_like(branch)


def _triton_fwd(branch, residual, hs, hb, rs, rb, weight, eps):
    from zaya_kernels.triton import residual_rmsnorm as tri

    new_residual, normed = _fwd_outputs(branch)
    mode = MODE_INPUT if residual is None else MODE_RESIDUAL
    tri.residual_rmsnorm_fwd(branch, residual, _vec(hs), _vec(hb), _vec(rs), _vec(rb), _vec(weight), eps,
                             new_residual, normed, mode)
    return new_residual, normed


def _triton_bwd(dy, d_new_residual, branch, residual, hs, hb, rs, rb, weight, new_residual, eps):
    from zaya_kernels.triton import residual_rmsnorm as tri

    hs32, hb32, rs32, rb32 = _fp32(hs), _fp32(hb), _fp32(rs), _fp32(rb)
    grad_branch = torch.empty_like(branch)
    grad_residual = None if residual is None else torch.empty_like(residual)
    mode = MODE_INPUT if residual is None else MODE_RESIDUAL
    partials = tri.residual_rmsnorm_bwd(dy, d_new_residual, branch, residual, hs32, rs32, _fp32(weight), eps,
                                        new_residual, grad_branch, grad_residual, mode)
    return (grad_branch, grad_residual) + _params_from_partials(partials, hs32, hb32, rs32, rb32, residual is not None)


def _hip_fwd(branch, residual, hs, hb, rs, rb, weight, eps):
    from zaya_kernels import _C

    new_residual, normed = _fwd_outputs(branch)
    _C.residual_scale_rmsnorm_fwd(branch, residual, _fp32(hs), _fp32(hb), _fp32(rs), _fp32(rb), _fp32(weight), eps,
                                  new_residual, normed)
    return new_residual, normed


def _hip_bwd(dy, d_new_residual, branch, residual, hs, hb, rs, rb, weight, new_residual, eps):
    from zaya_kernels import _C

    hs32, hb32, rs32, rb32 = _fp32(hs), _fp32(hb), _fp32(rs), _fp32(rb)
    n, h = branch.shape
    grad_branch = torch.empty_like(branch)
    grad_residual = None if residual is None else torch.empty_like(residual)
    partials = torch.zeros(_C.residual_rmsnorm_bwd_num_partials(n, h), 4, h, dtype=torch.float32, device=branch.device)
    _C.residual_scale_rmsnorm_bwd(dy, d_new_residual, branch, residual, hs32, hb32, rs32, rb32, _fp32(weight),
                                  new_residual, eps, grad_branch, grad_residual, partials)
    return (grad_branch, grad_residual) + _params_from_partials(partials.sum(0), hs32, hb32, rs32, rb32,
                                                                residual is not None)


def _triton_rmsnorm(x, weight, eps, out_dtype=None):
    from zaya_kernels.triton import residual_rmsnorm as tri

    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    tri.residual_rmsnorm_fwd(x, None, None, None, None, None, _vec(weight), eps, None, out, MODE_RMSNORM)
    return out


def _triton_rmsnorm_bwd(dy, x, weight, eps):
    from zaya_kernels.triton import residual_rmsnorm as tri

    grad_x = torch.empty_like(x)
    partials = tri.residual_rmsnorm_bwd(dy, None, x, None, None, None, _fp32(weight), eps, x, grad_x, None,
                                        MODE_RMSNORM)
    return grad_x, partials[0]


def _hip_rmsnorm(x, weight, eps, out_dtype=None):
    from zaya_kernels import _C

    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    _C.rmsnorm_fwd(x, _fp32(weight), eps, out)
    return out


def _hip_rmsnorm_bwd(dy, x, weight, eps):
    from zaya_kernels import _C

    n, h = x.shape
    grad_x = torch.empty_like(x)
    partials = torch.zeros(_C.residual_rmsnorm_bwd_num_partials(n, h), 1, h, dtype=torch.float32, device=x.device)
    _C.rmsnorm_bwd(dy, x, _fp32(weight), eps, grad_x, partials)
    return grad_x, partials.sum(0)[0]


# ---------------------------------------------------------------- autograd
_PARAM_INDICES = (2, 3, 4, 5, 6)  # hs, hb, rs, rb, norm_weight in the forward's inputs


def _setup_fwd(ctx, inputs, output):
    branch, residual, hs, hb, rs, rb, weight, eps = inputs
    ctx.save_for_backward(branch, residual, hs, hb, rs, rb, weight, output[0])
    ctx.eps = eps
    ctx.backend = _backend.requested_backend()  # backward runs outside any use_backend block: keep the choice


def _backward_fwd(ctx, grad_new_residual, grad_normed):
    branch, residual, hs, hb, rs, rb, weight, new_residual = ctx.saved_tensors
    if grad_normed is None:
        grad_normed = torch.zeros_like(branch)
    with _backend.use_backend(ctx.backend):
        grads = torch.ops.zaya.residual_scale_rmsnorm_backward(
            grad_normed.contiguous(), None if grad_new_residual is None else grad_new_residual.contiguous(),
            branch, residual, hs, hb, rs, rb, weight, new_residual, ctx.eps)
    inputs = (branch, residual, hs, hb, rs, rb, weight)
    return tuple(None if g is None else g.to(inp.dtype) for g, inp in zip(grads, inputs)) + (None,)


def _setup_rmsnorm(ctx, inputs, output):
    x, weight, eps = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.backend = _backend.requested_backend()


def _backward_rmsnorm(ctx, grad_out):
    x, weight = ctx.saved_tensors
    # The op normalises x rounded to the output dtype: the incoming gradient has that dtype.
    with _backend.use_backend(ctx.backend):
        grad_x, grad_weight = torch.ops.zaya.rmsnorm_backward(grad_out.contiguous(), x, weight, ctx.eps)
    return grad_x, grad_weight.to(weight.dtype), None, None


register_op(_OP, impls={"reference": ref.residual_scale_rmsnorm, "triton": _triton_fwd, "hip": _hip_fwd},
            fake=_fake_fwd, validate=_validate_fwd, backward=_backward_fwd, setup_context=_setup_fwd)
register_op(_OP + "_backward",
            impls={"reference": ref.residual_scale_rmsnorm_backward, "triton": _triton_bwd, "hip": _hip_bwd},
            fake=_fake_bwd, validate=_validate_bwd)
register_op("rmsnorm", impls={"reference": ref.rmsnorm, "triton": _triton_rmsnorm, "hip": _hip_rmsnorm},
            fake=_fake_rmsnorm, validate=_validate_rmsnorm, backward=_backward_rmsnorm, setup_context=_setup_rmsnorm)
register_op("rmsnorm_backward", impls={"reference": ref.rmsnorm_backward, "triton": _triton_rmsnorm_bwd,
                                       "hip": _hip_rmsnorm_bwd},
            fake=_fake_rmsnorm_bwd, validate=_validate_rmsnorm_bwd)


# ---------------------------------------------------------------- typed wrappers
def residual_scale_rmsnorm(
    branch: torch.Tensor,
    residual: torch.Tensor | None,
    hidden_scale: torch.Tensor,
    hidden_bias: torch.Tensor,
    residual_scale: torch.Tensor | None,
    residual_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZAYA's residual update fused with the next RMSNorm.

    R      = (branch + hidden_bias) * hidden_scale + (residual + residual_bias) * residual_scale
    normed = norm_weight * RMSNorm(R.to(A)).to(A),   RMSNorm(x) = x / sqrt(mean(x^2, -1) + eps) in fp32

    Parameters
    ----------
    branch : [..., H] float32 / float16 / bfloat16 (the activation dtype A), contiguous
        The attention or MoE branch output, or the token embeddings for the model-input form.
    residual : [..., H] float32 or None
        The residual stream. None selects the model-input form R = (branch + hidden_bias) * hidden_scale
        (then residual_scale and residual_bias must be None too).
    hidden_scale, hidden_bias, residual_scale, residual_bias, norm_weight : [H], any float dtype
    eps : float

    Returns
    -------
    new_residual : [..., H] float32
    normed : [..., H] dtype A
    """
    check.tensor(_OP, "branch", branch, contiguous=True, min_ndim=1)
    lead = branch.shape[:-1]
    h = branch.shape[-1]
    new_residual, normed = call(
        torch.ops.zaya.residual_scale_rmsnorm,
        branch.reshape(-1, h), None if residual is None else residual.reshape(-1, h), hidden_scale, hidden_bias,
        residual_scale, residual_bias, norm_weight, float(eps))
    return new_residual.view(*lead, h), normed.view(*lead, h)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ZayaRMSNorm of x.to(out_dtype): weight * (x / sqrt(mean(x^2, -1) + eps)).to(out_dtype).

    Parameters
    ----------
    x : [..., H] float32 / float16 / bfloat16, contiguous (e.g. the fp32 residual stream for the final norm)
    weight : [H]
    eps : float
    out_dtype : output dtype A (default x.dtype); x is rounded to A before the norm, as transformers does.

    Returns
    -------
    [..., H] out_dtype
    """
    check.tensor("rmsnorm", "x", x, contiguous=True, min_ndim=1)
    h = x.shape[-1]
    out = call(torch.ops.zaya.rmsnorm, x.reshape(-1, h), weight, float(eps), out_dtype)
    return out.view(*x.shape[:-1], h)
