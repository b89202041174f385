"""Benchmark cases for the CCA projection: ZAYA1-8B shapes (n_q 8, n_kv 2, D 128, C 1280, k0 = k1 = 2, RoPE on 64 dims)
on GPU: prefill T = 1k, 8k, 32k (one sequence) and decode batch 1, 8, 64, 256; tiny shapes on CPU.

Providers: the reference (zaya_kernels.reference: a Python loop over sequences), "transformers" (transformers' own
modules on the same random weights: ZayaCCAProjection (its q/k/v linear layers stand-ins that return the projections
computed before the timing, as the op starts after them) + ZayaQKNorm + apply_rotary_pos_emb, with the cos/sin tables
of ZayaRotaryEmbedding computed once outside the timing, as the model does once per forward for every layer; batched
[1, T] for prefill, and a DynamicCache holding the rows' conv and value states for decode), "transformers-ops" (a local
rewrite of the same op sequence, with per-row cached states gathered and scattered by slot for decode; its
torch.compile on GPU), and every zaya backend available. Bytes are the minimum traffic: read X, both value projections, the conv weights and (decode) both
states; write q, k, v and (decode) the states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zaya_kernels.reference import cca as ref

THETA = 5_000_000.0


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _transformers_ops(qk, v_current, v_delayed, w0, b0, w1, b1, temp, positions, num_q, num_kv, rotary_dim,
                      conv_history=None, value_history=None):
    """transformers' math from the projections on: qk [N, S, C] (N sequences of S tokens), histories [N, C, K] and
    [N, n_kv D / 2] (decode) or None (fresh prefill). Returns q [N, S, n_q, D], k, v [N, S, n_kv, D]."""
    n, s, channels = qk.shape
    head_dim = w1.shape[1]
    group = num_q // num_kv
    state_len = w0.shape[1] + w1.shape[2] - 2
    q0 = qk[..., :num_q * head_dim].view(n, s, num_q, head_dim)
    k0 = qk[..., num_q * head_dim:].view(n, s, num_kv, head_dim)
    query_residual = (q0 + k0.repeat_interleave(group, dim=2)) * 0.5
    key_residual = query_residual.view(n, s, num_kv, group, head_dim).mean(dim=-2)
    x = qk.transpose(1, 2)
    x = torch.cat([conv_history.to(x.dtype), x], -1) if conv_history is not None else F.pad(x, (state_len, 0))
    y = F.conv1d(x, w0[:, None, :], b0, groups=channels)
    z = F.conv1d(y, w1, b1, groups=num_q + num_kv).transpose(1, 2)
    q = z[..., :num_q * head_dim].reshape(n, s, num_q, head_dim) + query_residual
    k = z[..., num_q * head_dim:].reshape(n, s, num_kv, head_dim) + key_residual
    eps = torch.finfo(qk.dtype).eps
    q = q * (head_dim**0.5 / q.norm(dim=-1, keepdim=True).clamp_min(eps))
    k = k * (head_dim**0.5 / k.norm(dim=-1, keepdim=True).clamp_min(eps)) * temp[None, None, :, None]
    freqs = positions.view(n, s, 1).float() * ref.rope_inv_freq(rotary_dim, THETA, qk.device)
    emb = torch.cat((freqs, freqs), -1)[:, :, None, :]
    cos, sin = emb.cos().to(qk.dtype), emb.sin().to(qk.dtype)
    q = torch.cat([q[..., :rotary_dim] * cos + _rotate_half(q[..., :rotary_dim]) * sin, q[..., rotary_dim:]], -1)
    k = torch.cat([k[..., :rotary_dim] * cos + _rotate_half(k[..., :rotary_dim]) * sin, k[..., rotary_dim:]], -1)
    previous = value_history[:, None].to(qk.dtype) if value_history is not None else v_delayed.new_zeros(n, 1,
                                                                                                   v_delayed.shape[-1])
    v = torch.cat([v_current, torch.cat([previous, v_delayed[:, :-1]], 1)], -1).view(n, s, num_kv, head_dim)
    return q, k, v


class _Given(torch.nn.Module):
    """Stands in for one of ZayaCCAProjection's bias-free linear layers: returns `value`, the projection computed before
    the timing; the projection of zeros (the module asks for it as the first token's delayed value) gives zeros."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, hidden):
        if hidden.shape[:-1] == self.value.shape[:-1]:
            return self.value
        return hidden.new_zeros(*hidden.shape[:-1], self.value.shape[-1])


def _transformers_modules(num_q, num_kv, head_dim, k0, k1, weights, dtype, device):
    """(config, projection, norm, rotary) of transformers' ZAYA holding `weights`, or None without transformers."""
    try:
        from transformers.models.zaya.configuration_zaya import ZayaConfig
        from transformers.models.zaya.modeling_zaya import ZayaCCAProjection, ZayaQKNorm, ZayaRotaryEmbedding
    except ImportError:
        return None
    config = ZayaConfig(hidden_size=8, num_attention_heads=num_q, num_key_value_heads=num_kv, head_dim=head_dim,
                        cca_time0=k0, cca_time1=k1, num_hidden_layers=1)
    assert config.rope_parameters["hybrid"]["rope_theta"] == THETA
    projection, norm, rotary = ZayaCCAProjection(config, 0), ZayaQKNorm(config), ZayaRotaryEmbedding(config)
    for name in ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed"):
        setattr(projection, name, _Given())
    w0, b0, w1, b1, temp = weights
    projection.to(device=device, dtype=dtype)
    norm.to(device=device, dtype=dtype)
    with torch.no_grad():
        projection.conv_qk_depthwise.weight.copy_(w0[:, None, :])
        projection.conv_qk_depthwise.bias.copy_(b0)
        projection.conv_qk_grouped.weight.copy_(w1)
        projection.conv_qk_grouped.bias.copy_(b1)
        norm.temp.copy_(temp)
    return config, projection, norm, rotary.to(device)


def _transformers_step(projection, norm, given, hidden, cache, cos, sin):
    """ZayaAttention.forward up to the RoPE'd q, k and v (no KV-cache append, no attention): `given` are the q, k,
    v_current, v_delayed projections [N, S, *]."""
    from transformers.models.zaya.modeling_zaya import apply_rotary_pos_emb

    for name, value in zip(("q_proj", "k_proj", "v_proj_current", "v_proj_delayed"), given):
        getattr(projection, name).value = value
    with torch.no_grad():
        q, k, v = projection(hidden, cache)
        q, k = norm(q, k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v.transpose(1, 2)


def cases(device: str):
    """Yield (name, shape dict, bytes moved, {provider: callable})."""
    import zaya_kernels
    from zaya_kernels import backend

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    num_q, num_kv, head_dim, k0, k1 = (8, 2, 128, 2, 2) if on_gpu else (4, 2, 32, 2, 2)
    rotary_dim = head_dim // 2
    channels = (num_q + num_kv) * head_dim
    value_dim = num_kv * head_dim // 2
    state_len = k0 + k1 - 2
    from zaya_kernels.ops._registry import OPS

    def zaya_backends_of(op):  # the GPU backends this op has and that can run here (prefill: Triton; decode: + HIP)
        have = tuple(OPS[op].impls)
        return [b for b in ("hip", "triton") if backend.unavailable_reason(b, device, have) is None]

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    weights = (rand(channels, k0, scale=0.5), rand(channels, scale=0.5), rand(channels, head_dim, k1,
                                                                              scale=head_dim**-0.5),
               rand(channels, scale=0.5), rand(num_kv) + 1)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    heads = (num_q, num_kv, rotary_dim, THETA)
    size = torch.tensor([], dtype=dtype).element_size()
    compiled = torch.compile(_transformers_ops) if on_gpu else None
    hf = _transformers_modules(num_q, num_kv, head_dim, k0, k1, weights, dtype, device)

    def hf_given(qk, v_current, v_delayed):  # [N, S, *] projections, each contiguous as a linear layer writes it
        return (qk[..., :num_q * head_dim].contiguous(), qk[..., num_q * head_dim:].contiguous(), v_current, v_delayed)

    for tokens in ((1024, 8192, 32768) if on_gpu else (16, 64)):
        qk, v_current, v_delayed = rand(tokens, channels), rand(tokens, value_dim), rand(tokens, value_dim)
        positions = torch.arange(tokens, device=device)
        cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32, device=device)
        args = (qk, v_current, v_delayed, *weights, positions, cu_seqlens, *heads)
        hf_args = (qk[None], v_current[None], v_delayed[None], *weights, positions, num_q, num_kv, rotary_dim)
        providers = {"reference": lambda a=args: ref.cca_prepare(*a),
                     "transformers-ops": lambda a=hf_args: _transformers_ops(*a)}
        if hf is not None:
            config, projection, norm, rotary = hf
            hidden = torch.empty(1, tokens, config.hidden_size, device=device, dtype=dtype)  # shapes only
            cos, sin = rotary(hidden, positions[None], "hybrid")
            given = hf_given(qk[None], v_current[None], v_delayed[None])
            providers["transformers"] = lambda g=given, h=hidden, cs=(cos, sin): _transformers_step(
                projection, norm, g, h, None, *cs)
        if compiled is not None:
            providers["transformers-ops.compile"] = lambda a=hf_args: compiled(*a)
        for name in zaya_backends_of("cca_prepare"):
            def run(a=args, name=name):
                with zaya_kernels.use_backend(name):
                    return torch.ops.zaya.cca_prepare(*a)
            providers[f"zaya-{name}"] = run
        bytes_moved = tokens * (channels + 2 * value_dim + (num_q + 2 * num_kv) * head_dim) * size + weight_bytes
        shape = {"tokens": tokens, "C": channels, "dtype": str(dtype).replace("torch.", "")}
        yield "cca_prepare", shape, bytes_moved, providers

    for rows in ((1, 8, 64, 256) if on_gpu else (1, 8)):
        slots = rows + 8
        qk, v_current, v_delayed = rand(rows, channels), rand(rows, value_dim), rand(rows, value_dim)
        positions = torch.arange(rows, device=device) + 100
        conv_state = torch.randn(slots, channels, state_len, generator=gen).to(device)
        value_state = torch.randn(slots, value_dim, generator=gen).to(device)
        indices = torch.randperm(slots, generator=gen)[:rows].to(torch.int32).to(device)
        args = (qk, v_current, v_delayed, *weights, positions, conv_state, value_state, indices, *heads)
        long_indices = indices.long()
        hf_args = (qk[:, None], v_current[:, None], v_delayed[:, None], *weights, positions, num_q, num_kv,
                   rotary_dim)

        def transformers_decode(a=hf_args, fn=_transformers_ops):
            # gather the rows' states, run the math, write the new states back (as a serving engine would)
            q, k, v = fn(*a, conv_history=conv_state[long_indices], value_history=value_state[long_indices])
            conv_state[long_indices] = torch.cat([conv_state[long_indices][..., 1:], a[0].transpose(1, 2).float()], -1)
            value_state[long_indices] = a[2][:, 0].float()
            return q, k, v

        providers = {"reference": lambda a=args: ref.cca_prepare_decode(*a),
                     "transformers-ops": transformers_decode}
        if hf is not None:
            from transformers.cache_utils import DynamicCache

            config, projection, norm, rotary = hf
            hidden = torch.empty(rows, 1, config.hidden_size, device=device, dtype=dtype)  # shapes only
            cos, sin = rotary(hidden, positions[:, None], "hybrid")
            given = hf_given(qk[:, None], v_current[:, None], v_delayed[:, None])
            hf_cache = DynamicCache(config=config)
            _transformers_step(projection, norm, given, hidden, hf_cache, cos, sin)  # a first token: states exist
            providers["transformers"] = lambda g=given, h=hidden, c=hf_cache, cs=(cos, sin): _transformers_step(
                projection, norm, g, h, c, *cs)
        if compiled is not None:
            providers["transformers-ops.compile"] = lambda: transformers_decode(fn=compiled)
        for name in zaya_backends_of("cca_prepare_decode"):
            def run_decode(a=args, name=name):
                with zaya_kernels.use_backend(name):
                    return torch.ops.zaya.cca_prepare_decode(*a)
            providers[f"zaya-{name}"] = run_decode
        bytes_moved = (rows * (channels + 2 * value_dim + (num_q + 2 * num_kv) * head_dim) * size + weight_bytes
                       + 2 * rows * (channels * state_len + value_dim) * 4)
        shape = {"rows": rows, "C": channels, "dtype": str(dtype).replace("torch.", "")}
        yield "cca_prepare_decode", shape, bytes_moved, providers
