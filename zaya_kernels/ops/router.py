"""ZAYA router ops (DESIGN.md 1.3, 1.5): registration, backends, autograd and typed wrappers.

Ops (schemas in csrc/zaya_ops.cpp, "router family"):
  zaya::zaya_router(x, r_prev?, gamma?, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias,
                    eps, return_logits=False) -> (expert_index int32 [T], routing_weight fp32 [T], r [T, R], logits?)
  zaya::zaya_router_backward(...)  the gradients, used by autograd
  zaya::router_balance_update(counts, balance_bias!, state!, step!, controller, include_skip, lr, beta1, beta2, adam_eps,
                              kp, ki, kd) -> (loads, error)
Backends:
  zaya_router: reference (zaya_kernels.reference.router), triton (zaya_kernels.triton.router; one launch, R <= 512;
    decode launches split the down projection over H), hip (kernels/router.cuh via csrc/router.cu: one block per
    token, built for decode, T <= 64; needs a GPU build of the extension). `auto` on a GPU picks triton; the hip
    kernel runs when asked for (ZAYA_KERNELS_BACKEND=hip) until it has been timed against the Triton one on a GPU.
  zaya_router_backward: the reference's explicit chain rule only (dense torch GEMMs, which run on any device),
    registered reference_only: it runs whatever backend is requested and last_backend reports "reference".
  router_balance_update: reference_only too (a few [E+1]-element torch ops on the bias's device).
"""
from __future__ import annotations

import torch

from zaya_kernels.ops import _validate as check
from zaya_kernels.ops._registry import call, register_op
from zaya_kernels.ops.attention import _values_readable
from zaya_kernels.reference import router as ref

_OP = "zaya_router"
_BWD = "zaya_router_backward"
_BAL = "router_balance_update"
BALANCE_MODES = {"adamw": ref.BALANCE_ADAMW, "pid": ref.BALANCE_PID}


def _vec(param):
    return None if param is None else param.contiguous()


# ---------------------------------------------------------------- validation
def _validate_router_args(op, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                          balance_bias, eps):
    check.tensor(op, "x", x, ndim=2, dtypes=check.FLOAT_DTYPES, contiguous=True)
    t, h = x.shape
    dev = x.device
    check.tensor(op, "down_w", down_w, ndim=2, dtypes=check.FLOAT_DTYPES, device=dev, contiguous=True)
    r = down_w.shape[0]
    if down_w.shape[1] != h:
        raise ValueError(f"zaya::{op}: `down_w` must have shape (R, H) = (R, {h}) to match x [T, H], "
                         f"got {tuple(down_w.shape)}")
    if r == 0:
        raise ValueError(f"zaya::{op}: `down_w` has zero rows: the router hidden size R must be positive")
    wdt = (down_w.dtype,)
    check.tensor(op, "fc1_w", fc1_w, dtypes=wdt, shape=(r, r), device=dev, contiguous=True)
    check.tensor(op, "fc2_w", fc2_w, dtypes=wdt, shape=(r, r), device=dev, contiguous=True)
    check.tensor(op, "out_w", out_w, ndim=2, dtypes=wdt, device=dev, contiguous=True)
    num_classes = out_w.shape[0]
    if out_w.shape[1] != r:
        raise ValueError(f"zaya::{op}: `out_w` must have shape (E+1, R) = (E+1, {r}), got {tuple(out_w.shape)}")
    if num_classes < 2:
        raise ValueError(f"zaya::{op}: `out_w` must have E+1 >= 2 rows (at least one expert and the skip class), "
                         f"got {num_classes}")
    for name, vec in (("down_b", down_b), ("norm_w", norm_w), ("fc1_b", fc1_b), ("fc2_b", fc2_b)):
        check.tensor(op, name, vec, dtypes=check.FLOAT_DTYPES, shape=(r,), device=dev)
    if balance_bias is not None:  # the backward has none
        check.tensor(op, "balance_bias", balance_bias, ndim=1, dtypes=(torch.float32,), device=dev)
        if balance_bias.shape[0] != num_classes:
            raise ValueError(f"zaya::{op}: expert count mismatch: `balance_bias` has {balance_bias.shape[0]} classes "
                             f"but `out_w` has {num_classes} outputs (E experts + 1 skip class each)")
    check.optional_together(op, "EDA (layers >= 1) needs both r_prev and gamma", [("r_prev", r_prev), ("gamma", gamma)])
    if r_prev is not None:
        check.tensor(op, "r_prev", r_prev, ndim=2, dtypes=(x.dtype,), device=dev, contiguous=True)
        if r_prev.shape[0] != t:
            raise ValueError(f"zaya::{op}: token count mismatch: `r_prev` has {r_prev.shape[0]} rows but `x` has {t}")
        if r_prev.shape[1] != r:
            raise ValueError(f"zaya::{op}: `r_prev` must have R = {r} columns (down_w rows), got {r_prev.shape[1]}")
        check.tensor(op, "gamma", gamma, dtypes=check.FLOAT_DTYPES, shape=(r,), device=dev)
    check.eps(op, eps)


def _validate_fwd(x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, eps,
                  return_logits=False):
    _validate_router_args(_OP, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                          balance_bias, eps)


def _validate_bwd(grad_weight, grad_r, grad_logits, expert_index, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w,
                  fc1_b, fc2_w, fc2_b, out_w, eps):
    t, dev = x.shape[0] if x.dim() == 2 else 0, x.device
    _validate_router_args(_BWD, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                          None, eps)
    check.tensor(_BWD, "grad_weight", grad_weight, dtypes=check.FLOAT_DTYPES, shape=(t,), device=dev)
    check.tensor(_BWD, "expert_index", expert_index, dtypes=(torch.int32,), shape=(t,), device=dev)
    if grad_r is not None:
        check.tensor(_BWD, "grad_r", grad_r, dtypes=check.FLOAT_DTYPES, shape=(t, down_w.shape[0]), device=dev)
    if grad_logits is not None:
        check.tensor(_BWD, "grad_logits", grad_logits, dtypes=check.FLOAT_DTYPES, shape=(t, out_w.shape[0]),
                     device=dev)


def _validate_balance(counts, balance_bias, state, step, controller, include_skip, lr, beta1, beta2, adam_eps, kp, ki, kd):
    check.tensor(_BAL, "balance_bias", balance_bias, ndim=1, dtypes=(torch.float32,), contiguous=True)
    c, dev = balance_bias.shape[0], balance_bias.device
    if c < 2:
        raise ValueError(f"zaya::{_BAL}: `balance_bias` must have E+1 >= 2 classes, got {c}")
    check.tensor(_BAL, "counts", counts, ndim=1, device=dev)
    if counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"zaya::{_BAL}: `counts` must be an integer or real tensor, got {counts.dtype}")
    if counts.shape[0] != c:
        raise ValueError(f"zaya::{_BAL}: expert count mismatch: `counts` has {counts.shape[0]} classes but "
                         f"`balance_bias` has {c}")
    check.tensor(_BAL, "state", state, dtypes=(torch.float32,), shape=(2, c), device=dev, contiguous=True)
    check.tensor(_BAL, "step", step, dtypes=(torch.int64,), shape=(1,), device=dev)
    if controller not in (ref.BALANCE_ADAMW, ref.BALANCE_PID):
        raise ValueError(f"zaya::{_BAL}: `controller` must be 0 (adamw) or 1 (pid), got {controller}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"zaya::{_BAL}: betas must lie in [0, 1), got ({beta1}, {beta2})")
    if not adam_eps > 0.0:
        raise ValueError(f"zaya::{_BAL}: `adam_eps` must be positive, got {adam_eps}")


# ---------------------------------------------------------------- fake kernels (shapes only)
def _fake_fwd(x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, eps,
              return_logits=False):
    t, c = x.shape[0], out_w.shape[0]
    logits = x.new_empty(t, c, dtype=torch.float32) if return_logits else None
    return (x.new_empty(t, dtype=torch.int32), x.new_empty(t, dtype=torch.float32),
            x.new_empty(t, down_w.shape[0]), logits)


def _fake_bwd(grad_weight, grad_r, grad_logits, expert_index, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w,
              fc1_b, fc2_w, fc2_b, out_w, eps):
    def f32(p):
        return torch.empty_like(p, dtype=torch.float32)

    return (torch.empty_like(x), None if r_prev is None else torch.empty_like(r_prev),
            None if gamma is None else f32(gamma), f32(down_w), f32(down_b), f32(norm_w), f32(fc1_w), f32(fc1_b),
            f32(fc2_w), f32(fc2_b), f32(out_w))


def _fake_balance(counts, balance_bias, state, step, *args):
    return torch.empty_like(balance_bias), torch.empty_like(balance_bias)


# ---------------------------------------------------------------- Triton and HIP implementations
def _outputs(x, down_w, out_w, return_logits):
    """(expert_index int32 [T], routing_weight fp32 [T], r [T, R] x.dtype, logits fp32 [T, E+1] or None)."""
    t = x.shape[0]
    index = torch.empty(t, dtype=torch.int32, device=x.device)
    weight = torch.empty(t, dtype=torch.float32, device=x.device)
    r = torch.empty(t, down_w.shape[0], dtype=x.dtype, device=x.device)
    logits = torch.empty(t, out_w.shape[0], dtype=torch.float32, device=x.device) if return_logits else None
    return index, weight, r, logits


def _triton_fwd(x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, eps,
                return_logits=False):
    from zaya_kernels.triton import router as tri

    index, weight, r, logits = _outputs(x, down_w, out_w, return_logits)
    # [R] vectors go in their own dtype (the kernel loads them as fp32): no extra launches on the decode path
    tri.zaya_router_fwd(x, r_prev, _vec(gamma), down_w, _vec(down_b), _vec(norm_w), fc1_w, _vec(fc1_b), fc2_w,
                        _vec(fc2_b), out_w, balance_bias.contiguous(), eps, index, weight, r, logits)
    return index, weight, r, logits


def _hip_fwd(x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, eps,
             return_logits=False):
    from zaya_kernels import _C

    if x.dtype != down_w.dtype:
        raise ValueError(f"zaya::{_OP}: the HIP kernel needs x and the weights in one dtype, got x {x.dtype} and "
                         f"weights {down_w.dtype}; use the triton or reference backend")
    index, weight, r, logits = _outputs(x, down_w, out_w, return_logits)
    # [R] vectors go in their own dtype (fp32 / fp16 / bf16: the kernel reads each as it is), as on the Triton path:
    # the decode router stays one launch when a bf16 model keeps its biases and norm weight in bf16
    _C.zaya_router_decode(x, r_prev, _vec(gamma), down_w, _vec(down_b), _vec(norm_w), fc1_w, _vec(fc1_b), fc2_w,
                          _vec(fc2_b), out_w, balance_bias.contiguous(), eps, index, weight, r, logits)
    return index, weight, r, logits


# ---------------------------------------------------------------- autograd
_DIFF_INPUTS = 11  # x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w


def _setup_fwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_DIFF_INPUTS], output[0])
    ctx.eps = inputs[12]
    ctx.mark_non_differentiable(output[0])


def _backward_fwd(ctx, grad_index, grad_weight, grad_r, grad_logits):
    *inputs, index = ctx.saved_tensors
    x = inputs[0]
    if grad_weight is None:
        grad_weight = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    grads = torch.ops.zaya.zaya_router_backward(  # reference_only: the same code whatever backend is requested
        grad_weight.contiguous(), None if grad_r is None else grad_r.contiguous(),
        None if grad_logits is None else grad_logits.contiguous(), index, *inputs, ctx.eps)
    return tuple(None if g is None else g.to(inp.dtype) for g, inp in zip(grads, inputs)) + (None, None, None)


register_op(_OP, impls={"reference": ref.zaya_router, "triton": _triton_fwd, "hip": _hip_fwd},
            auto_order=("triton", "hip"),
            fake=_fake_fwd, validate=_validate_fwd, backward=_backward_fwd, setup_context=_setup_fwd)
register_op(_BWD, impls={"reference": ref.zaya_router_backward}, reference_only=True,
            fake=_fake_bwd, validate=_validate_bwd)
register_op(_BAL, impls={"reference": ref.router_balance_update}, reference_only=True,
            fake=_fake_balance, validate=_validate_balance)


# ---------------------------------------------------------------- typed wrappers
def zaya_router(
    x: torch.Tensor,
    r_prev: torch.Tensor | None,
    gamma: torch.Tensor | None,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    norm_w: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor,
    out_w: torch.Tensor,
    balance_bias: torch.Tensor,
    eps: float = 1e-5,
    return_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The ZAYA router of one layer: down projection, EDA, router MLP, softmax and biased top-1 with a skip class.

    r = x down_w^T + down_b (+ gamma * r_prev);  u = norm_w * RMSNorm(r);  a = GELU(fc2(GELU(fc1(u))));
    logits = a out_w^T;  p = softmax(logits) (fp32);  e* = argmax(p + balance_bias) (ties: lowest index);  w = p[e*].
    GELU is the exact erf form. Gradients reach x, r_prev, gamma and every weight through w (and r, logits); the
    choice e* is not differentiable, balance_bias gets no gradient.

    Parameters
    ----------
    x : [..., H] float32 / float16 / bfloat16, contiguous
        The router input, RMSNorm2(R) (the same tensor the experts get).
    r_prev : [..., R] x.dtype or None
        The previous layer's r (None on layer 0, where gamma must be None too).
    gamma : [R] any float dtype or None
        EDA scale of this layer (transformers' `router_states_scale`).
    down_w : [R, H]; down_b : [R]
        Down projection; down_w's dtype is the weight dtype W, shared by fc1_w, fc2_w and out_w.
    norm_w : [R]
        RMSNorm weight of the router MLP.
    fc1_w, fc2_w : [R, R] W;  fc1_b, fc2_b : [R]
    out_w : [E+1, R] W
        Output projection (no bias); row E is the skip class.
    balance_bias : [E+1] float32
        Balancing biases beta (change the choice only).
    eps : float
        RMSNorm epsilon (config.rms_norm_eps).
    return_logits : bool
        Also return the fp32 logits (for auxiliary losses and analysis).

    Returns
    -------
    expert_index : [...] int32, in [0, E]; E means the skip class
    routing_weight : [...] float32, p[e*] (unbiased, not renormalised)
    r : [..., R] x.dtype, the state for the next layer (before its norm)
    logits : [..., E+1] float32, or None unless return_logits
    """
    check.tensor(_OP, "x", x, contiguous=True, min_ndim=1)
    lead, h = x.shape[:-1], x.shape[-1]
    if r_prev is not None and (r_prev.dim() < 1 or r_prev.shape[:-1] != lead):
        raise ValueError(f"zaya::{_OP}: `r_prev` must be [..., R] with x's leading shape {tuple(lead)} (one state "
                         f"per token), got {tuple(r_prev.shape)}")
    index, weight, r, logits = call(
        torch.ops.zaya.zaya_router,
        x.reshape(-1, h), None if r_prev is None else r_prev.reshape(-1, r_prev.shape[-1]), gamma, down_w, down_b,
        norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balance_bias, float(eps), bool(return_logits))
    check.remember_valid(index, ("expert_index", out_w.shape[0] - 1))  # 0..E by construction: moe skips its check
    return (index.view(lead), weight.view(lead), r.view(*lead, r.shape[-1]),
            None if logits is None else logits.view(*lead, logits.shape[-1]))


def new_balance_state(num_classes: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh controller state for `router_balance_update`: (state fp32 [2, num_classes] zeros, step int64 [1] zero)."""
    return (torch.zeros(2, num_classes, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int64, device=device))


def expert_class_counts(expert_index: torch.Tensor, num_classes: int, check_range: bool = False) -> torch.Tensor:
    """Tokens per class, int64 [num_classes], of the choices expert_index [...] (int, values 0..num_classes-1).

    No host synchronisation (a scatter-add, not torch.bincount, whose output size depends on the values), so
    training forwards can add up their counts as they go. check_range=True first checks the values (a
    device->host copy; skipped during CUDA graph capture)."""
    if expert_index.dtype.is_floating_point or expert_index.dtype == torch.bool:
        raise TypeError(f"zaya::{_BAL}: `expert_index` must be an integer tensor, got {expert_index.dtype}")
    flat = expert_index.reshape(-1).long()
    capturing = flat.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_range and flat.numel() and not capturing:
        low, high = torch.stack([flat.min(), flat.max()]).tolist()  # one device->host copy
        if low < 0 or high >= num_classes:
            raise ValueError(f"zaya::{_BAL}: `expert_index` values must lie in [0, {num_classes - 1}] "
                             f"(E+1 = {num_classes} classes from balance_bias), got [{low}, {high}]")
    counts = torch.zeros(num_classes, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def router_balance_update(
    expert_index: torch.Tensor | None,
    balance_bias: torch.Tensor,
    state: torch.Tensor,
    step: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
    mode: str = "adamw",
    include_skip: bool = True,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    kp: float = 0.1,
    ki: float = 0.01,
    kd: float = 0.0,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the balancing biases toward equal expert load (DESIGN.md 1.5), in place, from this step's choices.

    counts = histogram of expert_index over the E+1 classes, summed over `group` with torch.distributed.all_reduce
    when a group is given (pass torch.distributed.group.WORLD for all ranks); then one controller step (see
    zaya_kernels.reference.router.router_balance_update for the exact rules):
    error_c = f_c - 1/n (f: load fraction; n = E+1 with include_skip, else E with the skip class frozen), and
    mode "adamw": bias -= lr * AdamW-normalised error (bias-corrected, no weight decay; the published rule), or
    mode "pid":   bias -= kp err + ki sum(err) + kd (err - previous err).

    Parameters
    ----------
    expert_index : [...] int (any integer dtype), values in [0, E], or None with `counts`
        This step's choices (all layers' choices of one router; call once per layer).
    counts : [E+1] int64 or None
        Instead of expert_index: the tokens per class already counted (e.g. summed over micro-batches with
        `expert_class_counts`, so no choices have to be kept); >= 0 (checked where reading it is free: CPU).
    balance_bias : [E+1] float32, updated in place
    state : [2, E+1] float32, updated in place (AdamW: exp_avg, exp_avg_sq; PID: integral, previous error)
    step : [1] int64, updated in place (steps with tokens so far)
        Create state and step with `new_balance_state(E + 1, device)`; use one state per mode.
    mode : "adamw" or "pid"
    include_skip : bool
        True: the skip class is balanced like an expert; False: its bias stays frozen.
    lr, betas, eps : AdamW hyper-parameters (defaults 1e-3, (0.9, 0.999), 1e-8)
    kp, ki, kd : PID gains
    group : torch.distributed process group or None

    Returns
    -------
    counts : [E+1] int64, the (summed) tokens per class
    loads : [E+1] float32, counts / total
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"zaya::{_BAL}: `mode` must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    num_classes = balance_bias.shape[0]
    if (expert_index is None) == (counts is None):
        raise ValueError(f"zaya::{_BAL}: pass exactly one of `expert_index` and `counts`")
    if counts is None:
        counts = expert_class_counts(expert_index, num_classes, check_range=True).to(balance_bias.device)
    elif counts.shape != (num_classes,) or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"zaya::{_BAL}: `counts` must be an integer tensor of shape ({num_classes},) (E+1 classes "
                         f"from balance_bias), got {counts.dtype} {tuple(counts.shape)}")
    else:
        if _values_readable(counts) and counts.numel() and int(counts.min()) < 0:
            raise ValueError(f"zaya::{_BAL}: `counts` must be >= 0 (tokens per class), got {counts.tolist()}")
        counts = counts.to(device=balance_bias.device, dtype=torch.int64, copy=True)  # all_reduce works in place
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    loads, _ = torch.ops.zaya.router_balance_update(counts, balance_bias, state, step, BALANCE_MODES[mode],
                                                    bool(include_skip), float(lr), float(betas[0]), float(betas[1]),
                                                    float(eps), float(kp), float(ki), float(kd))
    return counts, loads
