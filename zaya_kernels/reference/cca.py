"""Reference math of ZAYA's Compressed Convolutional Attention projection (DESIGN.md 1.1 steps 3-8), in plain PyTorch.

This is the CPU fallback and the oracle the kernels are tested against. It follows transformers'
`ZayaCCAProjection` + `ZayaQKNorm` + `apply_rotary_pos_emb` (models/zaya/modeling_zaya.py) for one layer.
Names: n_q query heads, n_kv key/value heads (g = n_q / n_kv), head_dim D, C = (n_q + n_kv) D conv channels,
depthwise kernel k0 (cca_time0), grouped kernel k1 (cca_time1), K = (k0 - 1) + (k1 - 1) conv-state columns.

Per sequence, with X_t = [Q0_t | K0_t] in R^C the q/k projection outputs of token t and X_t = 0 for t < 0
(a fresh sequence) or X_t = the cached columns (chunked prefill / decode):

    Y_t = b0 + sum_{j<k0} w0[:, j] X_{t-k0+1+j}                        depthwise causal conv    [C]
    Z_t = b1 + sum_{j<k1} W1[:, :, j] Y_{t-k1+1+j}   (per head, D x D)   grouped causal conv      [C]
      (Y at t < 0 is computed from the zero/cached X, so Y_{-1} = b0 for a fresh sequence, not 0:
       transformers pads X with K zeros and runs both convolutions without padding.)
    Q_t[h] = Z_t[h]       + (Q0_t[h] + K0_t[h // g]) / 2                 mean coupling, contiguous GQA groups
    K_t[j] = Z_t[n_q + j] + mean_{m<g} (Q0_t[g j + m] + K0_t[j]) / 2
    V_t    = concat(Vc_t, Vd_{t-1}) viewed [n_kv, D]                      value shift, Vd_{-1} = 0 or the state
    Qhat   = sqrt(D) Q / max(||Q||, eps),  Khat_j = temp_j sqrt(D) K_j / max(||K_j||, eps)   eps = finfo(A).eps
    RoPE (NeoX rotate_half) on the first rotary_dim dims of Qhat and Khat at each token's position:
      inv_freq_i = 1 / theta^(2i / rotary_dim), angle = position * inv_freq (fp32), cos/sin of cat(angle, angle).

Precision model (the Triton kernels do the same): all arithmetic in fp32 from the inputs; the depthwise output Y
is rounded to the activation dtype A = qk.dtype before the grouped conv (transformers' bf16 Conv1d stores Y in
bf16 too), the grouped conv accumulates in fp32 with the weights rounded to A; outputs are rounded to A once.
With fp32 inputs this is plain fp32 math. transformers additionally rounds Z, Q, the norm and cos/sin to A in a
bf16 model (differences within a few bf16 roundings).

States: the conv state of a sequence is its last K raw X columns [C, K] (oldest first), the value state its last
Vd row [n_kv D / 2]; both are zero for a fresh sequence. Final states are returned in fp32 (they are copies of
inputs: lossless). With attention_bias=True a fresh sequence's Vd_{-1} is v_proj_delayed's bias, not 0: pass it
as an initial value state with zero conv state and has_initial_state = 1.

Paged KV cache (optional, vLLM's layout): k_cache, v_cache [num_blocks, block_size, n_kv, D] in A receive the
returned k and v rows: token t goes to block slot_mapping[t] // block_size, offset slot_mapping[t] % block_size;
a negative slot (vLLM's padding) is not written, nor is a padded decode row. Every other cache element is untouched.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def rope_inv_freq(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """fp32 [rotary_dim / 2]: 1 / theta^(2i / rotary_dim), computed exactly as transformers does."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim
    return 1.0 / (theta ** exponent)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_partial_rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """NeoX RoPE on the first rotary_dim dims of x [L, heads, D] (fp32) at positions [L]; the rest untouched."""
    if rotary_dim == 0:
        return x
    angle = positions.float()[:, None] * rope_inv_freq(rotary_dim, theta, x.device)  # [L, rotary_dim / 2], fp32
    angle = angle.to(x.dtype)
    emb = torch.cat((angle, angle), dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def qk_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(D) x / max(||x||_2, eps) over the last dim (fp32), as ZayaQKNorm."""
    d = x.shape[-1]
    return x * (d**0.5 / x.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))


def prepare_sequence(x, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                     positions, num_q_heads, num_kv_heads, rotary_dim, rope_theta, conv_history, value_history):
    """One sequence of L tokens (L >= 0).

    x [L, C] activation dtype A; v_current, v_delayed [L, n_kv D / 2]; conv0_weight [C, k0]; conv0_bias [C];
    conv1_weight [C, D, k1]; conv1_bias [C]; temperature [n_kv]; positions [L] int; conv_history [C, K] fp32
    (zeros for a fresh sequence); value_history [n_kv D / 2] fp32 (zeros for a fresh sequence).
    Returns q [L, n_q, D], k [L, n_kv, D], v [L, n_kv, D] (fp32, not yet rounded), final conv state [C, K] fp32 and
    final value state [n_kv D / 2] fp32.
    """
    act_dtype = x.dtype
    length, channels = x.shape
    head_dim = conv1_weight.shape[1]
    k0, k1 = conv0_weight.shape[1], conv1_weight.shape[2]
    state_len = (k0 - 1) + (k1 - 1)
    group = num_q_heads // num_kv_heads
    q_channels = num_q_heads * head_dim

    compute = torch.float64 if act_dtype == torch.float64 else torch.float32  # float64 only for gradcheck
    x32 = x.to(compute)
    # Raw X with its K history columns in front: [C, K + L]; the convolutions below need no further padding.
    x_ext = torch.cat((conv_history.to(compute), x32.t()), dim=1)
    final_conv_state = x_ext[:, x_ext.shape[1] - state_len:].clone()  # never x_ext[:, -0:] (the whole tensor)

    if length > 0:
        # depthwise: [1, C, L + k1 - 1] (Y from t = -(k1 - 1) on), rounded to A as transformers' conv output is
        y = F.conv1d(x_ext[None], conv0_weight.to(compute)[:, None, :], conv0_bias.to(compute), groups=channels)
        y = y.to(act_dtype).to(compute)
        z = F.conv1d(y, conv1_weight.to(act_dtype).to(compute), conv1_bias.to(compute),
                     groups=num_q_heads + num_kv_heads)
        z = z[0].t()  # [L, C]
    else:
        z = x32.new_zeros(0, channels)

    q0 = x32[:, :q_channels].view(length, num_q_heads, head_dim)
    k0_heads = x32[:, q_channels:].view(length, num_kv_heads, head_dim)
    query_residual = (q0 + k0_heads.repeat_interleave(group, dim=1)) * 0.5
    key_residual = query_residual.view(length, num_kv_heads, group, head_dim).mean(dim=2)
    q = z[:, :q_channels].view(length, num_q_heads, head_dim) + query_residual
    k = z[:, q_channels:].view(length, num_kv_heads, head_dim) + key_residual

    eps = torch.finfo(act_dtype).eps
    q = qk_norm(q, eps)
    k = qk_norm(k, eps) * temperature.to(compute)[None, :, None]
    q = apply_partial_rope(q, positions, rotary_dim, rope_theta)
    k = apply_partial_rope(k, positions, rotary_dim, rope_theta)

    vd = v_delayed.to(compute)
    previous = torch.cat((value_history.to(compute)[None], vd[:-1]), dim=0) if length > 0 else vd
    v = torch.cat((v_current.to(compute), previous), dim=-1).view(length, num_kv_heads, head_dim)
    final_value_state = vd[-1].clone() if length > 0 else value_history.to(compute).clone()
    return q, k, v, final_conv_state, final_value_state


def _histories(b, initial_conv_state, initial_value_state, has_initial_state, channels, state_len, value_dim, device):
    if initial_conv_state is not None and bool(has_initial_state[b]):
        return initial_conv_state[b].float(), initial_value_state[b].float()
    return (torch.zeros(channels, state_len, device=device), torch.zeros(value_dim, device=device))


def cca_prepare(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
                cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state=None,
                initial_value_state=None, has_initial_state=None):
    """Packed varlen prefill (optionally one chunk of a longer prompt) of B sequences, T tokens in all.

    qk [T, C] A; v_current, v_delayed [T, n_kv D / 2] A; positions [T] int32/int64; cu_seqlens [B + 1] int32;
    initial_conv_state [B, C, K], initial_value_state [B, n_kv D / 2] (any float dtype) and has_initial_state [B]
    (bool/int: 0 = fresh sequence, the states are ignored) are given together or not at all.
    Returns q [T, n_q, D] A, k [T, n_kv, D] A, v [T, n_kv, D] A, final_conv_state [B, C, K] fp32,
    final_value_state [B, n_kv D / 2] fp32.
    """
    act_dtype = qk.dtype
    total, channels = qk.shape
    head_dim = conv1_weight.shape[1]
    state_len = conv0_weight.shape[1] + conv1_weight.shape[2] - 2
    value_dim = v_current.shape[1]
    device = qk.device
    bounds = cu_seqlens.tolist()
    num_seqs = len(bounds) - 1
    q = qk.new_empty(total, num_q_heads, head_dim)
    k = qk.new_empty(total, num_kv_heads, head_dim)
    v = qk.new_empty(total, num_kv_heads, head_dim)
    final_conv_state = torch.empty(num_seqs, channels, state_len, device=device)
    final_value_state = torch.empty(num_seqs, value_dim, device=device)
    for b in range(num_seqs):
        start, end = bounds[b], bounds[b + 1]
        conv_history, value_history = _histories(b, initial_conv_state, initial_value_state, has_initial_state,
                                                 channels, state_len, value_dim, device)
        qs, ks, vs, final_conv_state[b], final_value_state[b] = prepare_sequence(
            qk[start:end], v_current[start:end], v_delayed[start:end], conv0_weight, conv0_bias, conv1_weight,
            conv1_bias, temperature, positions[start:end], num_q_heads, num_kv_heads, rotary_dim, rope_theta,
            conv_history, value_history)
        q[start:end], k[start:end], v[start:end] = qs.to(act_dtype), ks.to(act_dtype), vs.to(act_dtype)
    return q, k, v, final_conv_state, final_value_state


def write_paged_cache(k, v, slot_mapping, k_cache, v_cache, rows_valid=None):
    """k_cache[s // bs, s % bs] = k[t] and v_cache[...] = v[t] for s = slot_mapping[t] >= 0 (and rows_valid[t]).

    k, v [N, n_kv, D]; slot_mapping [N] int; caches [num_blocks, bs, n_kv, D] (any strides: indexed by block and
    offset, not viewed as rows); rows_valid [N] bool or None. Two kept tokens must not share a slot.
    """
    keep = slot_mapping >= 0
    if rows_valid is not None:
        keep = keep & rows_valid
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def cca_prepare_paged(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                      positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, slot_mapping, k_cache,
                      v_cache, initial_conv_state=None, initial_value_state=None, has_initial_state=None):
    """`cca_prepare`, then k and v written into the paged caches at slot_mapping [T] (negative: not written)."""
    outputs = cca_prepare(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                          positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta,
                          initial_conv_state, initial_value_state, has_initial_state)
    write_paged_cache(outputs[1], outputs[2], slot_mapping, k_cache, v_cache)
    return outputs


def cca_prepare_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                       positions, conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim,
                       rope_theta, slot_mapping=None, k_cache=None, v_cache=None):
    """One new token for each of B sequences; the states of slot state_indices[b] are read and updated in place.

    qk [B, C] A; v_current, v_delayed [B, n_kv D / 2] A; positions [B] int; conv_state [slots, C, K] and
    value_state [slots, n_kv D / 2] (fp32 or A); state_indices [B] int32 (negative = padded row: zero outputs,
    no state touched). Returns q [B, n_q, D], k [B, n_kv, D], v [B, n_kv, D] in A.
    With slot_mapping [B] and k_cache, v_cache [num_blocks, block_size, n_kv, D]: row b's k and v also go to cache
    slot slot_mapping[b], unless that slot is negative or the row is padded.
    """
    act_dtype = qk.dtype
    num_rows = qk.shape[0]
    head_dim = conv1_weight.shape[1]
    q = qk.new_zeros(num_rows, num_q_heads, head_dim)
    k = qk.new_zeros(num_rows, num_kv_heads, head_dim)
    v = qk.new_zeros(num_rows, num_kv_heads, head_dim)
    for b, slot in enumerate(state_indices.tolist()):
        if slot < 0:
            continue
        qs, ks, vs, new_conv, new_value = prepare_sequence(
            qk[b:b + 1], v_current[b:b + 1], v_delayed[b:b + 1], conv0_weight, conv0_bias, conv1_weight, conv1_bias,
            temperature, positions[b:b + 1], num_q_heads, num_kv_heads, rotary_dim, rope_theta, conv_state[slot],
            value_state[slot])
        q[b], k[b], v[b] = qs[0].to(act_dtype), ks[0].to(act_dtype), vs[0].to(act_dtype)
        conv_state[slot] = new_conv.to(conv_state.dtype)
        value_state[slot] = new_value.to(value_state.dtype)
    if k_cache is not None:
        write_paged_cache(k, v, slot_mapping, k_cache, v_cache, rows_valid=state_indices >= 0)
    return q, k, v


@contextlib.contextmanager
def _autograd_dispatch_enabled():
    """Re-enable autograd recording inside an op kernel.

    A custom op's kernel is called below the Autograd dispatch keys (they are in the thread's exclude set), so
    torch ops inside it record no graph; the backward op differentiates the reference forward with autograd, so it
    lifts that exclusion for its own body only.
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.ADInplaceOrView):
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        yield


def cca_prepare_backward(grad_q, grad_k, grad_v, grad_final_conv_state, grad_final_value_state, qk, v_current,
                         v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
                         cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state=None,
                         initial_value_state=None, has_initial_state=None):
    """Gradients of `cca_prepare` by autograd through the forward above (the rounding of Y to A is treated as the
    identity by autograd's straight-through `.to`). Incoming gradients may be None (no loss on that output).

    Returns (grad_qk [T, C], grad_v_current, grad_v_delayed [T, n_kv D / 2], grad_conv0_weight [C, k0],
    grad_conv0_bias [C], grad_conv1_weight [C, D, k1], grad_conv1_bias [C], grad_temperature [n_kv]), each in the
    dtype of its input. The initial states' gradients are not computed here (zaya_kernels.ops.cca adds them:
    training across chunks).
    """
    differentiable = [t.detach().requires_grad_(True) for t in
                      (qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature)]
    with torch.enable_grad(), _autograd_dispatch_enabled():
        outputs = cca_prepare(*differentiable, positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim,
                              rope_theta, initial_conv_state, initial_value_state, has_initial_state)
        loss = qk.new_zeros((), dtype=torch.float32)
        for out, grad in zip(outputs, (grad_q, grad_k, grad_v, grad_final_conv_state, grad_final_value_state)):
            if grad is not None:
                loss = loss + (out.float() * grad.float()).sum()
        if not loss.requires_grad:  # no token and no state gradient: every gradient is zero
            return tuple(torch.zeros_like(t) for t in differentiable)
        grads = torch.autograd.grad(loss, differentiable, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, differentiable))
