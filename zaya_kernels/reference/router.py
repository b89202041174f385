"""Reference math of the ZAYA router (DESIGN.md 1.3) and its bias balancing (DESIGN.md 1.5), in plain PyTorch.

This is the CPU fallback and the oracle the kernels are tested against. It follows transformers' `ZayaRouter`
(models/zaya/modeling_zaya.py) for one layer, T tokens, hidden H, router hidden R, E real experts + 1 skip class:

    d      = x Wd^T + bd                                   [T, R]   down projection
    r      = d + gamma * r_prev   (layer >= 1, EDA)         [T, R]   state for the next layer (before its norm)
    u      = norm_w * RMSNorm(r)                            [T, R]
    a1     = GELU_erf(u W1^T + b1)                          [T, R]
    a2     = GELU_erf(a1 W2^T + b2)                         [T, R]
    logits = a2 W3^T                                        [T, E+1] (no bias)
    p      = softmax(logits) in fp32
    e*     = argmax(p + beta), ties to the lowest index     [T] int32 (e* = E is the skip class)
    w      = p[e*]  (unbiased, not renormalised)            [T] fp32

Precision model (the Triton kernel does the same): every GEMM takes its input rounded to the weight dtype and
accumulates in fp32; everything between GEMMs is fp32; r is returned in x.dtype and the norm reads that rounded
value (what the next layer reads too). With fp32 weights this is plain fp32 math.

Differences from transformers that do not change fp32 results: transformers computes the softmax in the model dtype
(bf16 in a bf16 model) and rounds every intermediate to it; this reference keeps fp32. transformers picks with
`torch.topk` (ties unspecified) and then, for the skip class, zeroes the weight and rewrites the index to 0; this
reference returns e* = E and w = p[E], and leaves the meaning of the skip class to the caller (`skip_mode`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BALANCE_ADAMW, BALANCE_PID = 0, 1


# ---------------------------------------------------------------- forward
def _linear(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 result of inp rounded to weight.dtype times weight^T (+ bias)."""
    out = inp.to(weight.dtype).float() @ weight.float().t()
    return out if bias is None else out + bias.float()


def _gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))


def router_state(x, r_prev, gamma, down_w, down_b):
    """r = x Wd^T + bd (+ gamma * r_prev), fp32 [T, R] (before rounding to x.dtype)."""
    r = _linear(x, down_w, down_b)
    if r_prev is not None:
        r = r + gamma.float() * r_prev.float()
    return r


def router_logits_from_state(r, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, eps):
    """fp32 logits [T, E+1] from the (rounded) router state r."""
    rf = r.float()
    u = norm_w.float() * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps))
    a1 = _gelu(_linear(u, fc1_w, fc1_b))
    a2 = _gelu(_linear(a1, fc2_w, fc2_b))
    return _linear(a2, out_w, None)


def select(probs: torch.Tensor, balance_bias: torch.Tensor) -> torch.Tensor:
    """argmax(probs + bias) over the last dim, ties to the lowest index; int32 [T]."""
    biased = probs.float() + balance_bias.float()
    best = biased.max(-1, keepdim=True).values
    cls = torch.arange(biased.shape[-1], device=biased.device)
    index = torch.where(biased == best, cls, biased.shape[-1]).min(-1).values
    # a row with a NaN score matches nothing and takes the skip class (index E; the weight p[e*] is then NaN where p
    # is, not silently finite): every backend chooses the same
    return index.clamp(max=biased.shape[-1] - 1).to(torch.int32)


def zaya_router(x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, eps,
                return_logits=False):
    """(expert_index int32 [T], routing_weight fp32 [T], r [T, R] x.dtype, logits fp32 [T, E+1] or None)."""
    r = router_state(x, r_prev, gamma, down_w, down_b).to(x.dtype)
    logits = router_logits_from_state(r, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, eps)
    probs = torch.softmax(logits, dim=-1)
    index = select(probs, balance_bias)
    weight = probs.gather(-1, index.long()[:, None]).squeeze(-1)
    return index, weight, r, (logits if return_logits else None)


# ---------------------------------------------------------------- backward
def _gelu_and_grad(z):
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return z * cdf, cdf + z * pdf


def zaya_router_backward(grad_weight, grad_r, grad_logits, expert_index, x, r_prev, gamma, down_w, down_b, norm_w,
                         fc1_w, fc1_b, fc2_w, fc2_b, out_w, eps):
    """Gradients of `zaya_router` (explicit chain rule, fp32; roundings to x.dtype / weight dtype count as identity).

    grad_weight fp32 [T] (d loss / d w), grad_r [T, R] or None, grad_logits [T, E+1] or None; expert_index is the
    forward's choice (the choice itself is not differentiable: d w / d logits = p_e* (onehot(e*) - p)).
    Recomputes the forward intermediates from the inputs. Returns
    (grad_x, grad_r_prev or None, grad_gamma or None, grad_down_w, grad_down_b, grad_norm_w, grad_fc1_w, grad_fc1_b,
    grad_fc2_w, grad_fc2_b, grad_out_w): activations in their input dtypes, parameters fp32.
    """
    r = router_state(x, r_prev, gamma, down_w, down_b).to(x.dtype).float()
    rstd = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    nh = r * rstd
    u = norm_w.float() * nh
    u_in = u.to(fc1_w.dtype).float()
    a1, da1 = _gelu_and_grad(_linear(u, fc1_w, fc1_b))
    a1_in = a1.to(fc2_w.dtype).float()
    a2, da2 = _gelu_and_grad(_linear(a1, fc2_w, fc2_b))
    a2_in = a2.to(out_w.dtype).float()
    probs = torch.softmax(a2_in @ out_w.float().t(), dim=-1)

    # d w / d logits_j = p_e* (delta_{j e*} - p_j)
    onehot = F.one_hot(expert_index.long(), probs.shape[-1]).float()
    p_sel = (probs * onehot).sum(-1, keepdim=True)
    g_logits = grad_weight.float()[:, None] * p_sel * (onehot - probs)
    if grad_logits is not None:
        g_logits = g_logits + grad_logits.float()

    g_out_w = g_logits.t() @ a2_in
    g_z2 = (g_logits @ out_w.float()) * da2
    g_fc2_w, g_fc2_b = g_z2.t() @ a1_in, g_z2.sum(0)
    g_z1 = (g_z2 @ fc2_w.float()) * da1
    g_fc1_w, g_fc1_b = g_z1.t() @ u_in, g_z1.sum(0)
    g_u = g_z1 @ fc1_w.float()
    g_norm_w = (g_u * nh).sum(0)
    g_nh = g_u * norm_w.float()
    g_r = rstd * (g_nh - nh * (g_nh * nh).mean(-1, keepdim=True))
    if grad_r is not None:
        g_r = g_r + grad_r.float()

    g_down_w, g_down_b = g_r.t() @ x.to(down_w.dtype).float(), g_r.sum(0)
    g_x = (g_r @ down_w.float()).to(x.dtype)
    if r_prev is None:
        g_r_prev = g_gamma = None
    else:
        g_r_prev = (g_r * gamma.float()).to(r_prev.dtype)
        g_gamma = (g_r * r_prev.float()).sum(0)
    return (g_x, g_r_prev, g_gamma, g_down_w, g_down_b, g_norm_w, g_fc1_w, g_fc1_b, g_fc2_w, g_fc2_b, g_out_w)


# ---------------------------------------------------------------- bias balancing
def expert_counts(expert_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Histogram of the expert index over `num_classes` classes, int64 [num_classes]."""
    return torch.bincount(expert_index.reshape(-1).long(), minlength=num_classes)[:num_classes]


def router_balance_update(counts, bias, state, step, controller, include_skip, lr, beta1, beta2, adam_eps, kp, ki, kd):
    """One step of the balancing controller; updates bias [C] fp32, state [2, C] fp32 and step [1] int64 in place.

    C = E + 1 classes, the last one the skip class. counts [C] (any real/int dtype): this step's tokens per class,
    already summed over ranks. With include_skip the load of class c is f_c = counts_c / sum(counts) over all C
    classes and the target is 1 / C; otherwise the skip class is frozen (its bias, state and error stay 0 / untouched)
    and f_e = counts_e / sum over the E real experts, target 1 / E. error = f - target (positive: overloaded).

    controller 0 (AdamW on the error, no weight decay, bias correction; state = (exp_avg, exp_avg_sq)):
        m = b1 m + (1 - b1) err;  v = b2 v + (1 - b2) err^2;  t += 1
        bias -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    controller 1 (PID; state = (integral, previous error)):
        integral += err;  bias -= kp err + ki integral + kd (err - prev) [derivative 0 on the first step];  prev = err
    A step with no tokens changes nothing (not even the step count). Returns (loads fp32 [C] = counts / total over all
    classes, error fp32 [C]).
    """
    num_classes = bias.shape[0]
    c = counts.to(device=bias.device, dtype=torch.float32)
    total_all = c.sum()
    loads = c / total_all.clamp(min=1.0)
    active = torch.ones(num_classes, dtype=torch.bool, device=bias.device)
    if not include_skip:
        active[-1] = False
    n_active = num_classes if include_skip else num_classes - 1
    total = (c * active).sum()
    has_tokens = total > 0
    frac = c / total.clamp(min=1.0)
    error = torch.where(active & has_tokens, frac - 1.0 / max(n_active, 1), torch.zeros_like(frac))
    upd = active & has_tokens  # where anything changes

    if controller == BALANCE_ADAMW:
        t = (step.to(torch.float64) + has_tokens.to(torch.float64)).clamp(min=1.0)
        m = torch.where(upd, beta1 * state[0] + (1.0 - beta1) * error, state[0])
        v = torch.where(upd, beta2 * state[1] + (1.0 - beta2) * error * error, state[1])
        # bias corrections in fp64: 1 - 0.999^t loses 5 digits in fp32
        m_hat = m / (1.0 - torch.full_like(t, beta1) ** t).float()
        v_hat = v / (1.0 - torch.full_like(t, beta2) ** t).float()
        delta = lr * m_hat / (v_hat.sqrt() + adam_eps)
        new_state = torch.stack([m, v])
    elif controller == BALANCE_PID:
        integral = torch.where(upd, state[0] + error, state[0])
        deriv = torch.where(step > 0, error - state[1], torch.zeros_like(error))
        delta = kp * error + ki * integral + kd * deriv
        new_state = torch.stack([integral, torch.where(upd, error, state[1])])
    else:
        raise ValueError(f"zaya::router_balance_update: `controller` must be 0 (adamw) or 1 (pid), got {controller}")
    bias.copy_(torch.where(upd, bias - delta, bias))
    state.copy_(new_state)
    step.add_(has_tokens.to(step.dtype))
    return loads, error
