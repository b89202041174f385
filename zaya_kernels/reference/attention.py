"""Reference math of CCA attention (DESIGN.md 1.1 step 9) in plain PyTorch: prefill, its backward, and decode.

This is the CPU fallback and the oracle the kernels are tested against. It is written for reading, not speed:
one sequence at a time, the full score matrix materialised.

Prefill (packed varlen). Sequence b owns the tokens cu_seqlens[b] <= t < cu_seqlens[b+1]; positions i, j count from
the sequence start. GQA with contiguous groups: with g = Hq / Hkv, query head h reads kv head h // g. For each
sequence and query head:

    S[i, j]  = softmax_scale * q_i . k_j                        (softmax_scale defaults to 1 / sqrt(D))
    visible  = (not causal or j <= i) and (window <= 0 or i - j < window)
    lse[i]   = log sum_{visible j} exp(S[i, j])
    out_i    = sum_{visible j} exp(S[i, j] - lse[i]) v_j

`window` is transformers' sliding window (a query sees itself and the window - 1 tokens before it); it needs causal.

Backward, with P = exp(S - lse) on the visible entries (0 elsewhere) and dO the gradient of out:

    delta_i = sum_d dO[i, d] out[i, d]
    dP      = dO V^T,    dS = P * (dP - delta),
    dq      = softmax_scale * dS K,   dk = softmax_scale * dS^T Q,   dv = P^T dO      (summed over the group's heads)

Decode: one new query token per sequence b that sits at position seq_lens[b] - 1 and sees the cached keys
0 <= p < seq_lens[b] (with a window: p > seq_lens[b] - 1 - window); with Q tokens per sequence (speculative
decoding) token i sits at position seq_lens[b] - Q + i and sees the keys up to its own position. The cache is
contiguous [B, S_max, Hkv, D] (position p of sequence b at [b, p]) or paged [num_blocks, block_size, Hkv, D] with
block_table [B, max_blocks] (position p of sequence b at [block_table[b, p // block_size], p % block_size]: vLLM's
layout). With seq_starts, sequence b sees only the positions p >= seq_starts[b] (a left-padded batch: the pads
sit before seq_starts[b]). A token that sees no position (seq_lens[b] = 0, or a token before seq_starts[b]) gets a
zero output.

Everything is computed in fp32 (fp64 when the inputs are fp64, which the tests use as the exact oracle); outputs are
returned in the input dtype, lse in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    """softmax_scale, or 1 / sqrt(head_dim) when it is None (transformers' `scaling = head_dim ** -0.5`)."""
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def visible_mask(num_queries: int, num_keys: int, causal: bool, window: int, device=None) -> torch.Tensor:
    """bool [num_queries, num_keys]: query i (position num_keys - num_queries + i) may see key j.

    Queries are the last num_queries positions of the sequence, so a prefill (num_queries == num_keys) gives the
    usual lower triangle and a single decode query sees every key.
    """
    rows = torch.arange(num_queries, device=device)[:, None] + (num_keys - num_queries)
    cols = torch.arange(num_keys, device=device)[None, :]
    mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    if causal:
        mask &= cols <= rows
    if window > 0:
        mask &= rows - cols < window
    return mask


def _expand_kv(kv: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[S, Hkv, D] -> [S, Hq, D]: kv head h // g serves query head h (contiguous GQA groups)."""
    return kv.repeat_interleave(num_q_heads // kv.shape[1], dim=1)


def _sequence_attention(q, k, v, scale, causal, window):
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hq, D] (already expanded), in the compute dtype.

    Returns (out [Sq, Hq, D], lse [Hq, Sq])."""
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    mask = visible_mask(q.shape[0], k.shape[0], causal, window, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Sq]; -inf for a query that sees nothing
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(scores.dtype).min)).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", probs, v), lse


def cca_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, window=-1):
    """Packed varlen GQA attention.

    q [T, Hq, D], k and v [T, Hkv, D], cu_seqlens int32 [B+1] (0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T),
    max_seqlen int (unused here: the kernels size their grid with it). Returns (out [T, Hq, D] q.dtype,
    lse [Hq, T] fp32 natural-log log-sum-exp of the scaled scores).
    """
    cdt = _compute_dtype(q.dtype)
    T, Hq, D = q.shape
    scale = default_scale(D, softmax_scale)
    out = torch.zeros(T, Hq, D, dtype=cdt, device=q.device)
    lse = torch.full((Hq, T), float("-inf"), dtype=cdt, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        o, l = _sequence_attention(q[start:end].to(cdt), _expand_kv(k[start:end].to(cdt), Hq),
                                   _expand_kv(v[start:end].to(cdt), Hq), scale, causal, window)
        out[start:end] = o
        lse[:, start:end] = l
    return out.to(q.dtype), lse


def cca_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale=None, causal=True,
                           window=-1):
    """Gradients of `cca_attention` from the saved out and lse (formulas in the module docstring).

    grad_out, out [T, Hq, D]; lse [Hq, T]. Returns (dq [T, Hq, D], dk [T, Hkv, D], dv [T, Hkv, D]) in q.dtype.
    """
    cdt = _compute_dtype(q.dtype)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = default_scale(D, softmax_scale)
    dq = torch.zeros(T, Hq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(T, Hkv, D, dtype=cdt, device=q.device)
    dv = torch.zeros(T, Hkv, D, dtype=cdt, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, dos, os_ = (x[start:end].to(cdt) for x in (q, grad_out, out))
        ks, vs = _expand_kv(k[start:end].to(cdt), Hq), _expand_kv(v[start:end].to(cdt), Hq)
        mask = visible_mask(end - start, end - start, causal, window, device=q.device)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        probs = torch.where(mask, torch.exp(scores - lse[:, start:end, None].to(cdt)), 0.0)
        delta = (dos * os_).sum(-1).transpose(0, 1)  # [Hq, S]
        dprobs = torch.einsum("ihd,jhd->hij", dos, vs)
        dscores = probs * (dprobs - delta[..., None])
        dq[start:end] = scale * torch.einsum("hij,jhd->ihd", dscores, ks)
        # per query head, then summed over the heads of each kv group
        dk_heads = scale * torch.einsum("hij,ihd->jhd", dscores, qs)
        dv_heads = torch.einsum("hij,ihd->jhd", probs, dos)
        dk[start:end] = dk_heads.reshape(end - start, Hkv, group, D).sum(2)
        dv[start:end] = dv_heads.reshape(end - start, Hkv, group, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def gather_cache(cache, seq_len, batch_index, block_table=None):
    """The first seq_len cached positions of sequence `batch_index`: [seq_len, Hkv, D].

    cache is contiguous [B, S_max, Hkv, D] (block_table None) or paged [num_blocks, block_size, Hkv, D].
    """
    if block_table is None:
        return cache[batch_index, :seq_len]
    block_size = cache.shape[1]
    positions = torch.arange(seq_len, device=cache.device)
    blocks = block_table[batch_index].long()[positions // block_size]
    return cache[blocks, positions % block_size]


def cca_attention_decode(q, k_cache, v_cache, seq_lens, block_table=None, softmax_scale=None, window=-1,
                         seq_starts=None):
    """The newest token(s) of each sequence against its KV cache.

    q [B, Hq, D] (one token per sequence) or [B, Q, Hq, D] (the last Q tokens, e.g. speculative decoding: token i
    sits at position seq_lens[b] - Q + i and sees the cached positions up to its own); k_cache, v_cache
    [B, S_max, Hkv, D] (contiguous) or [num_blocks, block_size, Hkv, D] with block_table int32 [B, max_blocks];
    seq_lens int32 [B]; seq_starts int32 [B] or None: sequence b sees positions seq_starts[b] <= p only.
    Returns out shaped like q, in q.dtype (0 for a token that sees no position).
    """
    cdt = _compute_dtype(q.dtype)
    queries = q if q.dim() == 4 else q[:, None]
    B, Q, Hq, D = queries.shape
    scale = default_scale(D, softmax_scale)
    out = torch.zeros(B, Q, Hq, D, dtype=cdt, device=q.device)
    starts = [0] * B if seq_starts is None else seq_starts.tolist()
    for b, (seq_len, start) in enumerate(zip(seq_lens.tolist(), starts)):
        if seq_len <= start:
            continue
        # Dropping the positions before `start` shifts queries and keys alike: the causal and window tests only
        # compare differences of positions, and a query before `start` sees no key (a negative row in visible_mask).
        ks = _expand_kv(gather_cache(k_cache, seq_len, b, block_table)[start:].to(cdt), Hq)
        vs = _expand_kv(gather_cache(v_cache, seq_len, b, block_table)[start:].to(cdt), Hq)
        out[b], _ = _sequence_attention(queries[b].to(cdt), ks, vs, scale, True, window)
    return (out if q.dim() == 4 else out[:, 0]).to(q.dtype)
