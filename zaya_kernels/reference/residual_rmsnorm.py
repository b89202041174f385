"""Reference math of ZAYA's residual scaling and RMSNorm (DESIGN.md 1.2), in plain PyTorch.

This is the CPU fallback and the oracle the kernels are tested against. It follows transformers' ZAYA exactly
where that matters for the result:

    R      = (branch + hidden_bias) * hidden_scale + (residual + residual_bias) * residual_scale   (fp32)
    normed = norm_weight * RMSNorm(R.to(A)).to(A)                                                  (dtype A)

where A is the activation dtype (branch.dtype) and RMSNorm(x) = x / sqrt(mean(x^2) + eps) computed in fp32.
transformers casts the fp32 residual to the norm weight's (the activation) dtype before its RMSNorm, so the norm
sees R rounded to A. The branch term is computed in fp32 here; transformers rounds (branch + hidden_bias) and its
product with hidden_scale to A when the model runs in bf16 (a difference within one bf16 rounding).
"""
from __future__ import annotations

import torch


def _rmsnorm_fp32(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ZayaRMSNorm of `x.to(out_dtype)`: weight * (x / rms(x)).to(out_dtype), in out_dtype (default x.dtype).

    x [N, H] any float dtype, weight [H]. Returns [N, H] out_dtype.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    normed = _rmsnorm_fp32(x.to(out_dtype), eps).to(out_dtype)
    return (weight.float() * normed.float()).to(out_dtype)


def residual_scale(
    branch: torch.Tensor,
    residual: torch.Tensor | None,
    hidden_scale: torch.Tensor,
    hidden_bias: torch.Tensor,
    residual_scale: torch.Tensor | None,
    residual_bias: torch.Tensor | None,
) -> torch.Tensor:
    """R = (branch + hb) * hs + (residual + rb) * rs in fp32; without a residual R = (branch + hb) * hs."""
    new_residual = (branch.float() + hidden_bias.float()) * hidden_scale.float()
    if residual is not None:
        new_residual = new_residual + (residual.float() + residual_bias.float()) * residual_scale.float()
    return new_residual


def residual_scale_rmsnorm(
    branch: torch.Tensor,
    residual: torch.Tensor | None,
    hidden_scale: torch.Tensor,
    hidden_bias: torch.Tensor,
    residual_scale_: torch.Tensor | None,
    residual_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R fp32 [N, H], normed [N, H] in branch.dtype); see the module docstring."""
    new_residual = residual_scale(branch, residual, hidden_scale, hidden_bias, residual_scale_, residual_bias)
    return new_residual, rmsnorm(new_residual, norm_weight, eps, out_dtype=branch.dtype)


def _rmsnorm_input_grad(grad_normed, norm_input, norm_weight, eps):
    """(g, S_w): d loss / d norm_input (fp32, rounding treated as identity) and the per-row dw terms."""
    xr = norm_input.float()
    rstd = torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + eps)
    nh = xr * rstd
    dn = grad_normed.float() * norm_weight.float()
    c = (dn * nh).mean(-1, keepdim=True)
    grad_input = rstd * (dn - nh * c)
    grad_weight = (grad_normed.float() * nh.to(grad_normed.dtype).float()).sum(0)
    return grad_input, grad_weight


def rmsnorm_backward(grad_out, x, weight, eps):
    """Gradients of `rmsnorm(x, weight, eps, grad_out.dtype)`: (grad_x [N, H] x.dtype, grad_weight [H] fp32)."""
    grad_x, grad_weight = _rmsnorm_input_grad(grad_out, x.to(grad_out.dtype), weight, eps)
    return grad_x.to(x.dtype), grad_weight


def residual_scale_rmsnorm_backward(
    grad_normed, grad_new_residual, branch, residual, hidden_scale, hidden_bias, residual_scale_, residual_bias,
    norm_weight, new_residual, eps,
):
    """Gradients of `residual_scale_rmsnorm` given d loss / d normed and (optionally) d loss / d R.

    With g = dR + d(normed)/dR^T grad_normed (fp32 [N, H]):
      grad_branch = g * hs, grad_residual = g * rs,
      grad_hs = sum_n g (branch + hb), grad_hb = hs sum_n g, grad_rs = sum_n g (residual + rb), grad_rb = rs sum_n g,
      grad_norm_weight = sum_n grad_normed * normalised R.
    Returns (grad_branch [N,H] branch.dtype, grad_residual [N,H] fp32 or None, grad_hs, grad_hb, grad_rs or None,
    grad_rb or None, grad_norm_weight), parameter gradients fp32 [H].
    """
    g, grad_norm_weight = _rmsnorm_input_grad(grad_normed, new_residual.to(branch.dtype), norm_weight, eps)
    if grad_new_residual is not None:
        g = g + grad_new_residual.float()
    sum_g = g.sum(0)
    hs, hb = hidden_scale.float(), hidden_bias.float()
    grad_branch = (g * hs).to(branch.dtype)
    grad_hs = (g * branch.float()).sum(0) + hb * sum_g
    grad_hb = hs * sum_g
    if residual is None:
        return grad_branch, None, grad_hs, grad_hb, None, None, grad_norm_weight
    rs, rb = residual_scale_.float(), residual_bias.float()
    grad_residual = g * rs
    grad_rs = (g * residual.float()).sum(0) + rb * sum_g
    grad_rb = rs * sum_g
    return grad_branch, grad_residual, grad_hs, grad_hb, grad_rs, grad_rb, grad_norm_weight
