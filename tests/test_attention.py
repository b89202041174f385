"""cca_attention (varlen causal GQA prefill, forward + backward) and cca_attention_decode (contiguous and paged caches):
the reference against transformers' attention, every backend against the reference in fp64, bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zaya_kernels
from zaya_kernels.reference import attention as ref

from helpers import assert_close

# ---------------------------------------------------------------- inputs
# Sequence lengths around the interpreter's tile sizes (16 keys, 16 / heads query tokens) and the GPU ones (64, 128).
lengths = st.one_of(st.sampled_from([1, 2, 3, 4, 15, 16, 17, 31, 32, 33]), st.integers(1, 40))
batches = st.lists(lengths, min_size=1, max_size=4)
head_layouts = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 1), (8, 2), (6, 3), (5, 5), (8, 1), (16, 2)])  # (Hq, Hkv)


def cu_seqlens_of(lens, device="cpu"):
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def make_prefill(lens, hq, hkv, d, dtype, seed, magnitude=1.0, device="cpu", requires_grad=False):
    """q, k, v [T, H, D] standard normal (q scaled by `magnitude`: large logits test the running max)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)

    def rand(h, scale=1.0):
        t = (torch.randn(total, h, d, generator=gen) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    return rand(hq, magnitude), rand(hkv), rand(hkv), cu_seqlens_of(lens, device)


def fp64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def output_scale(v):
    """Outputs are convex combinations of value rows: max |v| bounds them, and the rounding of P scales with it."""
    return v.detach().abs().max().item() if v.numel() else 0.0


def grad_scale(q, k, v, grad_out, softmax_scale):
    """Size of the terms the attention gradients cancel: dS = P (dP - delta) with |dP|, |delta| <= sqrt(D) |dO| |v|,
    then multiplied by softmax_scale |k| (dq) or |q| (dk); dv sums P dO."""
    d = q.shape[-1]
    big = lambda t: t.detach().abs().max().item() if t.numel() else 0.0  # noqa: E731
    return 2 * math.sqrt(d) * big(grad_out) * big(v) * softmax_scale * max(big(q), big(k), 1.0) + big(grad_out)


def reference_grads(q, k, v, cu, max_seqlen, causal, window, grad_out, scale=None):
    """Gradients by autograd through the fp64 reference forward."""
    q64, k64, v64 = fp64(q, k, v)
    out, _ = ref.cca_attention(q64, k64, v64, cu, max_seqlen, scale, causal, window)
    return torch.autograd.grad(out, (q64, k64, v64), grad_out.double())


# ---------------------------------------------------------------- the reference itself
def _transformers_attention(q, k, v, lens, causal, window):
    """transformers' ZAYA eager attention (repeat_kv GQA, additive mask) per sequence, on [S, H, D] slices."""
    from types import SimpleNamespace

    from transformers.masking_utils import causal_mask_function, sliding_window_overlay
    from transformers.models.zaya.modeling_zaya import eager_attention_forward

    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    module = SimpleNamespace(num_key_value_groups=hq // hkv, training=False)
    in_window = sliding_window_overlay(window) if window > 0 else (lambda b, h, i, j: True)

    def mask_fn(b, h, i, j):
        return (not causal or causal_mask_function(b, h, i, j)) and in_window(b, h, i, j)
    outs, start = [], 0
    for n in lens:
        allowed = torch.tensor([[bool(mask_fn(0, 0, i, j)) for j in range(n)] for i in range(n)])
        additive = torch.zeros(n, n, dtype=q.dtype).masked_fill(~allowed, float("-inf"))[None, None]
        sl = slice(start, start + n)
        out, _ = eager_attention_forward(module, q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                         v[sl].transpose(0, 1)[None], additive, scaling=d**-0.5)
        outs.append(out[0])
        start += n
    return torch.cat(outs)


@settings(max_examples=25)
@given(lens=batches, heads=head_layouts, d=st.sampled_from([16, 32, 48]), causal=st.booleans(),
       window=st.sampled_from([-1, 1, 3, 20]), seed=st.integers(0, 2**16))
def test_reference_matches_transformers_eager_attention(lens, heads, d, causal, window, seed):
    if window > 0 and not causal:
        window = -1
    q, k, v, cu = make_prefill(lens, *heads, d, torch.float64, seed)
    out, lse = ref.cca_attention(q, k, v, cu, max(lens), None, causal, window)
    expected = _transformers_attention(q, k, v, lens, causal, window)
    assert_close(out, expected, dtype=torch.float64, what="reference vs transformers")
    # lse is the log of the softmax denominator: logsumexp over the visible keys of the scaled scores
    assert lse.shape == (heads[0], sum(lens))
    assert_close(lse, _lse_oracle(q, k, lens, d**-0.5, causal, window), dtype=torch.float64, what="lse")


def _lse_oracle(q, k, lens, scale, causal, window):
    """fp64 logsumexp_j(scale q_i . k_j + mask_ij) per sequence, query head and token: [Hq, T]."""
    group = q.shape[1] // k.shape[1]
    rows, start = [], 0
    for n in lens:
        qs, ks = q[start:start + n].double(), k[start:start + n].double().repeat_interleave(group, dim=1)
        scores = scale * torch.einsum("ihd,jhd->hij", qs, ks)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        visible = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
        if window > 0:
            visible &= i - j < window
        rows.append(torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1))
        start += n
    return torch.cat(rows, dim=1) if rows else q.new_zeros(q.shape[1], 0, dtype=torch.float64)


@settings(max_examples=25)
@given(lens=batches, heads=head_layouts, d=st.sampled_from([16, 32]), causal=st.booleans(),
       window=st.sampled_from([-1, 2, 9]), seed=st.integers(0, 2**16))
def test_reference_backward_formula_matches_autograd(lens, heads, d, causal, window, seed):
    if window > 0 and not causal:
        window = -1
    q, k, v, cu = make_prefill(lens, *heads, d, torch.float64, seed)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out, lse = ref.cca_attention(q, k, v, cu, max(lens), 0.3, causal, window)
    actual = ref.cca_attention_backward(grad_out, q, k, v, out, lse, cu, max(lens), 0.3, causal, window)
    expected = reference_grads(q, k, v, cu, max(lens), causal, window, grad_out, 0.3)
    scale = grad_scale(q, k, v, grad_out, 0.3)
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, dtype=torch.float64, reduction=sum(lens), scale=scale, what=f"d{name}")


@settings(max_examples=20)
@given(lens=st.lists(st.integers(0, 30), min_size=1, max_size=4), heads=head_layouts, block_size=st.integers(1, 9),
       window=st.sampled_from([-1, 1, 5]), seed=st.integers(0, 2**16))
def test_reference_decode_equals_last_prefill_row(lens, heads, block_size, window, seed):
    """Decode of the last token of each sequence = the last row of the causal prefill, contiguous and paged."""
    hq, hkv = heads
    d = 16
    contiguous, paged, table, q_last, k_seq, v_seq = _caches_from_prefill(lens, hq, hkv, d, block_size,
                                                                           torch.float64, seed)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    expected = _last_rows_of_prefill(q_last, k_seq, v_seq, lens, window)
    assert_close(ref.cca_attention_decode(q_last, *contiguous, seq_lens, None, None, window), expected,
                 dtype=torch.float64, what="contiguous")
    assert_close(ref.cca_attention_decode(q_last, *paged, seq_lens, table, None, window), expected,
                 dtype=torch.float64, what="paged")


def _caches_from_prefill(lens, hq, hkv, d, block_size, dtype, seed, device="cpu"):
    """Random per-sequence K/V written both into a contiguous cache (S_max = max(lens) + 3) and into a paged cache
    whose blocks are a random permutation of the pool (plus spare blocks), and the last query token of each."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    s_max = max(lens) + 3
    k_cont = torch.randn(batch, s_max, hkv, d, generator=gen, dtype=torch.float64)
    v_cont = torch.randn(batch, s_max, hkv, d, generator=gen, dtype=torch.float64)
    q_last = torch.randn(batch, hq, d, generator=gen, dtype=torch.float64)
    max_blocks = -(-s_max // block_size) + 1
    num_blocks = batch * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen)
    table = perm[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    k_paged = torch.randn(num_blocks, block_size, hkv, d, generator=gen, dtype=torch.float64)
    v_paged = torch.randn(num_blocks, block_size, hkv, d, generator=gen, dtype=torch.float64)
    for b in range(batch):
        for p in range(s_max):
            blk, off = table[b, p // block_size], p % block_size
            k_paged[blk, off] = k_cont[b, p]
            v_paged[blk, off] = v_cont[b, p]
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    k_seq = [cast(k_cont[b, : lens[b]]) for b in range(batch)]
    v_seq = [cast(v_cont[b, : lens[b]]) for b in range(batch)]
    return ((cast(k_cont), cast(v_cont)), (cast(k_paged), cast(v_paged)), table.to(device), cast(q_last), k_seq,
            v_seq)


def _last_rows_of_prefill(q_last, k_seq, v_seq, lens, window):
    """Run the fp64 reference prefill of every non-empty sequence (queries: random, except the last = q_last)."""
    hq, d = q_last.shape[1], q_last.shape[2]
    rows = []
    for b, n in enumerate(lens):
        if n == 0:
            rows.append(torch.zeros(hq, d, dtype=torch.float64, device=q_last.device))
            continue
        q = torch.randn(n, hq, d, dtype=torch.float64, device=q_last.device)
        q[-1] = q_last[b].double()
        out, _ = ref.cca_attention(q, k_seq[b].double(), v_seq[b].double(), cu_seqlens_of([n], q.device), n, None,
                                   True, window)
        rows.append(out[-1])
    return torch.stack(rows)


# ---------------------------------------------------------------- the op (auto backend on CPU = reference)
def test_op_auto_backend_is_reference_on_cpu():
    q, k, v, cu = make_prefill([3, 5], 4, 2, 16, torch.float32, 0)
    out, lse = torch.ops.zaya.cca_attention(q, k, v, cu, 5)
    expected, expected_lse = ref.cca_attention(q, k, v, cu, 5)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    assert zaya_kernels.last_backend("cca_attention") == "reference"


# ---------------------------------------------------------------- Triton (interpreter on CPU, compiled on GPU)
@settings(max_examples=14)
@given(lens=batches, heads=head_layouts, d=st.sampled_from([16, 32, 48]), dtype=st.sampled_from([torch.float32,
       torch.float16]), causal=st.booleans(), window=st.sampled_from([-1, -1, 1, 6]),
       magnitude=st.sampled_from([1.0, 12.0]), seed=st.integers(0, 2**16))
# ZAYA's grouping (8, 2) with a sliding window, and 8 query heads on one kv head, across the 16-key tiles
@example(lens=[33, 5], heads=(8, 2), d=32, dtype=torch.float32, causal=True, window=4, magnitude=12.0, seed=1)
@example(lens=[17, 31], heads=(8, 1), d=16, dtype=torch.float16, causal=True, window=-1, magnitude=1.0, seed=2)
@example(lens=[20], heads=(16, 2), d=16, dtype=torch.float32, causal=True, window=6, magnitude=1.0, seed=3)
def test_triton_forward_matches_fp64_reference(lens, heads, d, dtype, causal, window, magnitude, seed):
    if window > 0 and not causal:
        window = -1
    q, k, v, cu = make_prefill(lens, *heads, d, dtype, seed, magnitude)
    with zaya_kernels.use_backend("triton"):
        out, lse = torch.ops.zaya.cca_attention(q, k, v, cu, max(lens), None, causal, window)
    assert zaya_kernels.last_backend("cca_attention") == "triton"
    expected, expected_lse = ref.cca_attention(*fp64(q, k, v), cu, max(lens), None, causal, window)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, expected.detach(), dtype=dtype, reduction=max(lens) * d, scale=output_scale(v), what="out")
    assert_close(lse, expected_lse.detach(), dtype=torch.float32, reduction=max(lens) * d,
                 scale=magnitude * math.sqrt(d), what="lse")


@settings(max_examples=8)
@given(lens=batches, heads=head_layouts, d=st.sampled_from([16, 32]), causal=st.booleans(),
       window=st.sampled_from([-1, -1, 4]), seed=st.integers(0, 2**16))
# ZAYA's grouping (8, 2) causal with a sliding window (several query heads accumulate into one dk / dv), and (8, 1)
@example(lens=[21, 5], heads=(8, 2), d=16, causal=True, window=4, seed=1)
@example(lens=[17, 3], heads=(8, 1), d=16, causal=True, window=4, seed=2)
def test_triton_backward_matches_autograd_of_reference(lens, heads, d, causal, window, seed):
    if window > 0 and not causal:
        window = -1
    q, k, v, cu = make_prefill(lens, *heads, d, torch.float32, seed, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    with zaya_kernels.use_backend("triton"):
        out, _ = torch.ops.zaya.cca_attention(q, k, v, cu, max(lens), None, causal, window)
        actual = torch.autograd.grad(out, (q, k, v), grad_out)
    assert zaya_kernels.last_backend("cca_attention_backward") == "triton"
    expected = reference_grads(q, k, v, cu, max(lens), causal, window, grad_out)
    scale = grad_scale(q, k, v, grad_out, d**-0.5)
    group = heads[0] // heads[1]
    for name, a, e in zip("qkv", actual, expected):
        assert a.dtype == torch.float32
        assert_close(a, e, dtype=torch.float32, reduction=max(lens) * d * group, scale=scale, what=f"d{name}")


def test_triton_sliding_window_edge_at_every_key_block_offset():
    """Every window 1..17 against the fp64 reference (forward and gradients), two query heads per kv head: some
    tile then sits exactly on a window edge (interpreter BLOCK_N 16, BLOCK_M 8): the forward's first key of a query
    tile's window is the last key of a 16-key block (windows 2 and 10), and the backward's last query that sees a
    key block starts a query tile (windows 2 and 10); a range one off there skips a whole block. The random
    windows of the tests above rarely hit these."""
    q, k, v, cu = make_prefill([40], 2, 1, 16, torch.float32, 11, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    scale = grad_scale(q, k, v, grad_out, 16**-0.5)
    for window in range(1, 18):
        with zaya_kernels.use_backend("triton"):
            out, lse = torch.ops.zaya.cca_attention(q, k, v, cu, 40, None, True, window)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        expected, expected_lse = ref.cca_attention(*fp64(q, k, v), cu, 40, None, True, window)
        assert_close(out, expected.detach(), dtype=torch.float32, reduction=40 * 16, scale=output_scale(v),
                     what=f"out window={window}")
        assert_close(lse, expected_lse.detach(), dtype=torch.float32, reduction=40 * 16, what=f"lse window={window}")
        for name, a, e in zip("qkv", grads, reference_grads(q, k, v, cu, 40, True, window, grad_out)):
            assert_close(a, e, dtype=torch.float32, reduction=40 * 16 * 2, scale=scale, what=f"d{name} window={window}")


def test_triton_backward_is_deterministic():
    """Two runs give the same bits, and those equal (within rounding) autograd through the fp64 reference."""
    q, k, v, cu = make_prefill([19, 33, 7], 4, 2, 32, torch.float32, 5, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    results = []
    with zaya_kernels.use_backend("triton"):
        for _ in range(2):
            out, _ = torch.ops.zaya.cca_attention(q, k, v, cu, 33)
            results.append(torch.autograd.grad(out, (q, k, v), grad_out))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    expected = reference_grads(q, k, v, cu, 33, True, -1, grad_out)
    scale = grad_scale(q, k, v, grad_out, 32**-0.5)
    for name, a, e in zip("qkv", results[0], expected):
        assert_close(a, e, dtype=torch.float32, reduction=33 * 32 * 2, scale=scale, what=f"d{name}")


def test_triton_softmax_scale_and_empty_sequences():
    """An explicit softmax_scale, empty sequences inside the batch, and a max_seqlen larger than any sequence."""
    q, k, v, cu = make_prefill([0, 5, 0, 18, 0], 4, 1, 32, torch.float32, 7)
    with zaya_kernels.use_backend("triton"):
        out, lse = torch.ops.zaya.cca_attention(q, k, v, cu, 40, 0.7, True, -1)
    expected, expected_lse = ref.cca_attention(*fp64(q, k, v), cu, 40, 0.7, True, -1)
    assert_close(out, expected.detach(), dtype=torch.float32, reduction=18 * 32, scale=output_scale(v))
    assert_close(lse, expected_lse.detach(), dtype=torch.float32, reduction=18 * 32)


def _decode_case(lens, heads, d, block_size, dtype, seed, device="cpu"):
    hq, hkv = heads
    contiguous, paged, table, q_last, k_seq, v_seq = _caches_from_prefill(lens, hq, hkv, d, block_size, dtype, seed,
                                                                           device)
    return contiguous, paged, table, q_last, torch.tensor(lens, dtype=torch.int32, device=device), k_seq, v_seq


@settings(max_examples=14)
@given(lens=st.lists(st.integers(0, 45), min_size=1, max_size=4), heads=head_layouts, d=st.sampled_from([16, 32, 48]),
       block_size=st.sampled_from([1, 3, 16, 17, 64]), dtype=st.sampled_from([torch.float32, torch.float16]),
       window=st.sampled_from([-1, -1, 1, 7]), paged=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_decode_matches_fp64_reference(lens, heads, d, block_size, dtype, window, paged, seed):
    contiguous, paged_cache, table, q, seq_lens, _, _ = _decode_case(lens, heads, d, block_size, dtype, seed)
    caches, block_table = (paged_cache, table) if paged else (contiguous, None)
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens, block_table, None, window)
    assert zaya_kernels.last_backend("cca_attention_decode") == "triton"
    expected = ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens, block_table, None, window)
    assert out.dtype == dtype
    assert_close(out, expected, dtype=dtype, reduction=max(lens) * d + 1, scale=output_scale(caches[1]),
                 what="decode")


def _multi_token_expected(q, k_seq, v_seq, lens, window):
    """Rows of the fp64 reference prefill for the last Q tokens of each sequence (0 for negative positions)."""
    batch, num_queries, hq, d = q.shape
    expected = torch.zeros(batch, num_queries, hq, d, dtype=torch.float64)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        queries = torch.randn(n, hq, d, dtype=torch.float64)
        first = max(0, num_queries - n)  # tokens before the sequence start see nothing
        queries[n - (num_queries - first):] = q[b, first:].double()
        out, _ = ref.cca_attention(queries, k_seq[b].double(), v_seq[b].double(), cu_seqlens_of([n]), n, None, True,
                                   window)
        expected[b, first:] = out[n - (num_queries - first):]
    return expected


@settings(max_examples=10)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=3), heads=head_layouts,
       num_queries=st.integers(1, 5), block_size=st.sampled_from([1, 4, 16]), window=st.sampled_from([-1, 3]),
       paged=st.booleans(), seed=st.integers(0, 2**16))
def test_multi_token_decode_equals_prefill_rows(lens, heads, num_queries, block_size, window, paged, seed):
    """Speculative decoding: Q query tokens per sequence = the last Q rows of the causal prefill (reference and
    Triton, fp64 oracle)."""
    contiguous, paged_cache, table, _, seq_lens, k_seq, v_seq = _decode_case(lens, heads, 16, block_size,
                                                                             torch.float32, seed)
    q = torch.randn(len(lens), num_queries, heads[0], 16, generator=torch.Generator().manual_seed(seed))
    caches, block_table = (paged_cache, table) if paged else (contiguous, None)
    expected = _multi_token_expected(q, k_seq, v_seq, lens, window)
    assert_close(ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens, block_table, None,
                                          window), expected, dtype=torch.float64, what="reference")
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens, block_table, None, window)
    assert out.shape == q.shape
    assert_close(out, expected, dtype=torch.float32, reduction=max(lens) * 16 + 1, scale=output_scale(caches[1]),
                 what="triton")


@settings(max_examples=12)
@given(lens=st.lists(st.integers(0, 30), min_size=1, max_size=3), pads=st.lists(st.integers(0, 20), min_size=3,
       max_size=3), heads=head_layouts, num_queries=st.integers(1, 3), block_size=st.sampled_from([1, 5, 16]),
       window=st.sampled_from([-1, 4]), paged=st.booleans(), seed=st.integers(0, 2**16))
def test_left_padded_decode_equals_unpadded(lens, pads, heads, num_queries, block_size, window, paged, seed):
    """seq_starts: a left-padded cache (pads first, random K/V there) gives the unpadded sequence's prefill rows
    (fp64 oracle), for the reference and Triton; queries on pad positions see nothing (zero)."""
    pads = pads[: len(lens)]
    padded_lens = [p + n for p, n in zip(pads, lens)]
    contiguous, paged_cache, table, _, seq_lens, k_pad, v_pad = _decode_case(padded_lens, heads, 16, block_size,
                                                                             torch.float32, seed)
    k_seq = [k[p:] for k, p in zip(k_pad, pads)]
    v_seq = [v[p:] for v, p in zip(v_pad, pads)]
    q = torch.randn(len(lens), num_queries, heads[0], 16, generator=torch.Generator().manual_seed(seed))
    seq_starts = torch.tensor(pads, dtype=torch.int32)
    caches, block_table = (paged_cache, table) if paged else (contiguous, None)
    expected = _multi_token_expected(q, k_seq, v_seq, lens, window)
    assert_close(ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens, block_table, None,
                                          window, seq_starts), expected, dtype=torch.float64, what="reference")
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens, block_table, None, window, None, seq_starts)
        one_token = zaya_kernels.ops.cca_attention_decode(q[:, -1].contiguous(), *caches, seq_lens, block_table,
                                                          window=window, seq_starts=seq_starts)
    scale = output_scale(caches[1])
    assert_close(out, expected, dtype=torch.float32, reduction=max(padded_lens) * 16 + 1, scale=scale, what="triton")
    assert_close(one_token, expected[:, -1], dtype=torch.float32, reduction=max(padded_lens) * 16 + 1, scale=scale,
                 what="triton, one token")


@pytest.mark.parametrize("max_seqlen, num_queries", [(None, 1), (5, 1), (200, 1), (None, 3)])
def test_triton_decode_split_k_reduction(monkeypatch, max_seqlen, num_queries):
    """Many splits (as on a GPU with idle SMs), including empty splits and a max_seqlen hint that is too small."""
    from zaya_kernels.triton import attention as tri

    monkeypatch.setattr(tri, "_target_programs", lambda device: 64)
    lens = [150, 1, 0, 97]
    contiguous, paged, table, q, seq_lens, _, _ = _decode_case(lens, (4, 2), 16, 7, torch.float32, 11)
    if num_queries > 1:
        q = torch.randn(len(lens), num_queries, 4, 16, generator=torch.Generator().manual_seed(12))
    splits, _ = tri.decode_splits(len(lens), 2, max_seqlen or 160, 16, q.device)
    assert splits > 1 or max_seqlen == 5
    for caches, block_table in ((contiguous, None), (paged, table)):
        with zaya_kernels.use_backend("triton"):
            out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens, block_table, None, -1, max_seqlen)
        expected = ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens, block_table)
        assert_close(out, expected, dtype=torch.float32, reduction=150 * 16, scale=output_scale(caches[1]),
                     what=f"paged={block_table is not None}")


def test_triton_decode_splits_a_long_sequence_past_64_ways(monkeypatch):
    """One long sequence at batch 1 on an MI300X-sized device (608 programs wanted): 130 splits of 4 key tiles (the
    reduce's SPLITS tile 256) over 2 kv heads, equal to the reference."""
    from zaya_kernels.triton import attention as tri

    monkeypatch.setattr(tri, "_target_programs", lambda device: 2 * 304)
    gen = torch.Generator().manual_seed(5)
    seq_len, head_dim = 130 * 4 * 16 - 7, 16  # the interpreter's key tiles are 16 long
    caches = [torch.randn(1, seq_len + 7, 2, head_dim, generator=gen) for _ in range(2)]
    q, seq_lens = torch.randn(1, 8, head_dim, generator=gen), torch.tensor([seq_len], dtype=torch.int32)
    assert tri.decode_splits(1, 2, seq_len + 7, 16, q.device)[0] == 130
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens)
    expected = ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens)
    assert_close(out, expected, dtype=torch.float32, reduction=seq_len, scale=output_scale(caches[1]))


@pytest.mark.parametrize("target_programs, launches_reduce", [(1, False), (64, True)])
def test_triton_decode_one_split_writes_the_output_directly(monkeypatch, target_programs, launches_reduce):
    """When one split per sequence fills the device (large batches), the split kernel writes the output in q's
    dtype itself and no reduce kernel is launched; with several splits the reduce runs. Both equal the reference."""
    from zaya_kernels.triton import attention as tri

    monkeypatch.setattr(tri, "_target_programs", lambda device: target_programs)
    reduce_launches = []
    reduce_kernel = tri.attention_decode_reduce_kernel

    class CountingReduce:
        def __getitem__(self, grid):
            reduce_launches.append(grid)
            return reduce_kernel[grid]

    monkeypatch.setattr(tri, "attention_decode_reduce_kernel", CountingReduce())
    lens = [150, 1, 0, 97]
    contiguous, paged, table, q, seq_lens, _, _ = _decode_case(lens, (4, 2), 16, 7, torch.float16, 11)
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, *paged, seq_lens, table)
    assert bool(reduce_launches) == launches_reduce
    expected = ref.cca_attention_decode(q.double(), *(c.double() for c in paged), seq_lens, table)
    assert out.dtype == torch.float16
    assert_close(out, expected, dtype=torch.float16, reduction=150 * 16, scale=output_scale(paged[1]))


def test_triton_decode_last_token_equals_last_prefill_row():
    """The decode kernel on a cache filled from a prefill = the prefill kernel's last row of every sequence."""
    lens, hq, hkv, d, block_size = [1, 16, 37], 8, 2, 32, 5
    q, k, v, cu = make_prefill(lens, hq, hkv, d, torch.float32, 13)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = len(lens) * max_blocks
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).view(len(lens), max_blocks).int()
    k_paged = torch.zeros(num_blocks, block_size, hkv, d)
    v_paged = torch.zeros(num_blocks, block_size, hkv, d)
    bounds = cu.tolist()
    for b, n in enumerate(lens):
        for p in range(n):
            k_paged[table[b, p // block_size], p % block_size] = k[bounds[b] + p]
            v_paged[table[b, p // block_size], p % block_size] = v[bounds[b] + p]
    last = torch.tensor(bounds[1:]) - 1
    with zaya_kernels.use_backend("triton"):
        prefill, _ = torch.ops.zaya.cca_attention(q, k, v, cu, max(lens))
        decode = torch.ops.zaya.cca_attention_decode(q[last].contiguous(), k_paged, v_paged,
                                                     torch.tensor(lens, dtype=torch.int32), table)
    assert_close(decode, prefill[last], dtype=torch.float32, reduction=max(lens) * d, scale=output_scale(v))


@pytest.mark.parametrize("misaligned", ["k", "v"])
@pytest.mark.parametrize("paged,dtype", [(False, torch.float32), (True, torch.float16)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_decode_with_one_cache_not_16_byte_aligned(misaligned, paged, dtype, device):
    """Caches that are non-dense views (a D-wide slice of a wider buffer) with equal strides, one of them starting
    off a 16-byte boundary: read in place (no copy: the kernel variant without the wide-load hints), announced with
    a RuntimeWarning (a slow path is never silent)."""
    lens, hq, hkv, d, block_size = [5, 8], 2, 1, 16, 4
    _, paged_cache, table, q, seq_lens, _, _ = _decode_case(lens, (hq, hkv), d, block_size, dtype, 7, device=device)
    contiguous = _decode_case(lens, (hq, hkv), d, block_size, dtype, 7, device=device)[0]
    seq_lens, table = seq_lens.to(device), table.to(device)
    caches = list(paged_cache if paged else contiguous)
    for i, name in enumerate("kv"):
        offset = 1 if name == misaligned else 0  # one element: 4 (fp32) or 2 (fp16) bytes off
        wide = torch.zeros(offset + 2 * caches[i].numel(), dtype=dtype, device=device)
        view = wide[offset:].view(*caches[i].shape[:-1], 2 * d)[..., :d]
        view.copy_(caches[i])
        caches[i] = view
    assert (caches[0].data_ptr() % 16 != 0) == (misaligned == "k") and caches[0].stride() == caches[1].stride()
    block_table = table if paged else None
    clone = torch.Tensor.clone
    copies = []
    with zaya_kernels.use_backend("triton"), pytest.warns(RuntimeWarning, match="without wide vector loads"), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "clone", lambda t, *a, **k: copies.append(t.numel()) or clone(t, *a, **k))
        out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens, block_table)
    assert not [n for n in copies if n >= caches[0].numel()], "a cache was copied"
    expected = ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens, block_table)
    assert_close(out, expected, dtype=dtype, reduction=max(lens) * d, scale=output_scale(caches[1]))


# ---------------------------------------------------------------- torch.library integration
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    q, k, v, cu = make_prefill([3, 6], 4, 2, 16, torch.float32, 0, requires_grad=True)
    contiguous, paged, table, qd, seq_lens, _, _ = _decode_case([3, 6], (4, 2), 16, 4, torch.float32, 1)
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.cca_attention.default, (q, k, v, cu, 6, None, True, -1))
        out, lse = ref.cca_attention(q.detach(), k.detach(), v.detach(), cu, 6)
        torch.library.opcheck(torch.ops.zaya.cca_attention_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, 6, 0.25,
                               True, 2))
        torch.library.opcheck(torch.ops.zaya.cca_attention_decode.default, (qd, *contiguous, seq_lens))
        torch.library.opcheck(torch.ops.zaya.cca_attention_decode.default, (qd, *paged, seq_lens, table, 0.3, 4, 8))
        torch.library.opcheck(torch.ops.zaya.cca_attention_decode.default,
                              (torch.randn(2, 3, 4, 16), *paged, seq_lens, table))


def test_torch_compile_fullgraph():
    q, k, v, cu = make_prefill([4, 9], 4, 2, 16, torch.float32, 2)
    contiguous, _, _, qd, seq_lens, _, _ = _decode_case([4, 9], (4, 2), 16, 4, torch.float32, 3)

    def step(q, k, v, cu, qd, kc, vc, seq_lens):
        out, _ = torch.ops.zaya.cca_attention(q, k, v, cu, 9)
        return out.sum() + torch.ops.zaya.cca_attention_decode(qd, kc, vc, seq_lens).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (q, k, v, cu, qd, *contiguous, seq_lens)
    assert torch.equal(compiled(*args), step(*args))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ops_without_backward_refuse_inputs_that_require_grad(backend):
    """An inference op (no autograd formula) given inputs that require grad raises on every backend, rather than
    silently giving no gradient (a Triton kernel's output has no history) or one only the reference has."""
    contiguous, _, _, q, seq_lens, _, _ = _decode_case([3, 5], (4, 2), 16, 4, torch.float32, 0)
    with zaya_kernels.use_backend(backend):
        with pytest.raises(RuntimeError, match="zaya::cca_attention_decode has no backward"):
            torch.ops.zaya.cca_attention_decode(q.requires_grad_(), *contiguous, seq_lens)
        with torch.no_grad():
            torch.ops.zaya.cca_attention_decode(q, *contiguous, seq_lens)
        q, k, v, cu = make_prefill([3, 5], 4, 2, 16, torch.float32, 1, requires_grad=True)
        out, _ = torch.ops.zaya.cca_attention(q, k, v, cu, 5)
        with pytest.raises(RuntimeError, match="zaya::cca_attention_backward has no backward"):
            torch.autograd.grad(out.sum(), q, create_graph=True)  # double backward


def test_typed_wrappers():
    q, k, v, cu = make_prefill([5, 2], 4, 2, 16, torch.float32, 4)
    out, lse = zaya_kernels.ops.cca_attention(q, k, v, cu, 5, return_lse=True)
    expected, expected_lse = ref.cca_attention(q, k, v, cu, 5)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    assert torch.equal(zaya_kernels.ops.cca_attention(q, k, v, cu, 5, window=2), ref.cca_attention(q, k, v, cu, 5,
                                                                                                     None, True, 2)[0])
    contiguous, _, _, qd, seq_lens, _, _ = _decode_case([5, 2], (4, 2), 16, 4, torch.float32, 5)
    assert torch.equal(zaya_kernels.ops.cca_attention_decode(qd, *contiguous, seq_lens),
                       ref.cca_attention_decode(qd, *contiguous, seq_lens))


# ---------------------------------------------------------------- bad input
def _set_qkv(args, hq, hkv, d):
    args[0], args[1], args[2] = torch.zeros(8, hq, d), torch.zeros(8, hkv, d), torch.zeros(8, hkv, d)


def _prefill_args():
    q, k, v, cu = make_prefill([3, 5], 4, 2, 16, torch.float32, 0)
    return [q, k, v, cu, 5, None, True, -1]


@pytest.mark.parametrize(
    "mutate, exc, message",
    [
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "`q` must have dtype"),
        (lambda a: a.__setitem__(1, a[1].half()), TypeError, "`k` must have dtype"),
        (lambda a: _set_qkv(a, 4, 3, 16), ValueError, "multiple of the kv head count"),
        (lambda a: _set_qkv(a, 4, 2, 24), ValueError, "`head_dim`.*multiple of 16"),
        (lambda a: _set_qkv(a, 4, 2, 272), ValueError, "up to 256"),
        (lambda a: a.__setitem__(2, torch.zeros(8, 2, 32)), ValueError, "`v` must have shape"),
        (lambda a: a.__setitem__(1, torch.zeros(7, 2, 16)), ValueError, "`k` must have shape"),
        (lambda a: a.__setitem__(3, a[3].long()), TypeError, "`cu_seqlens` must have dtype"),
        (lambda a: a.__setitem__(3, torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError, "end at the token count"),
        (lambda a: a.__setitem__(3, torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "never decrease"),
        (lambda a: a.__setitem__(4, 4), ValueError, "`max_seqlen` \\(4\\) is smaller"),
        (lambda a: a.__setitem__(7, 3) or a.__setitem__(6, False), ValueError, "needs causal=True"),
        (lambda a: a.__setitem__(5, float("nan")), ValueError, "`softmax_scale` must be a finite float"),
        (lambda a: a.__setitem__(0, torch.zeros(4, 8, 16).transpose(0, 1)), ValueError, "`q` must be contiguous"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), ValueError, "`k` is on meta"),
    ],
)
def test_prefill_bad_input_raises_clear_error(mutate, exc, message):
    args = _prefill_args()
    mutate(args)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.cca_attention(*args)


def test_backward_too_small_max_seqlen_raises_clear_error():
    """The backward op checks max_seqlen against cu_seqlens too (unchecked on GPU, its grid would skip rows)."""
    q, k, v, cu = make_prefill([3, 5], 4, 2, 16, torch.float32, 0)
    out, lse = ref.cca_attention(q, k, v, cu, 5)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(ValueError, match="`max_seqlen` \\(4\\) is smaller "
                                                                              "than the longest sequence"):
            torch.ops.zaya.cca_attention_backward(torch.ones_like(out), q, k, v, out, lse, cu, 4)


@pytest.mark.gpu
def test_gpu_too_small_max_seqlen_raises_with_check_values(monkeypatch):
    """On GPU tensors max_seqlen is checked against cu_seqlens only with ZAYA_KERNELS_CHECK_VALUES=1 (otherwise the
    grid would leave rows of out unwritten: see the cca_attention docstring)."""
    monkeypatch.setenv("ZAYA_KERNELS_CHECK_VALUES", "1")
    q, k, v, cu = make_prefill([3, 5], 4, 2, 16, torch.float32, 0, device="cuda")
    with zaya_kernels.use_backend("triton"), pytest.raises(ValueError, match="`max_seqlen` \\(4\\) is smaller"):
        torch.ops.zaya.cca_attention(q, k, v, cu, 4)


def _decode_args(paged):
    contiguous, paged_cache, table, q, seq_lens, _, _ = _decode_case([3, 9], (4, 2), 16, 4, torch.float32, 0)
    return [q, *paged_cache, seq_lens, table] if paged else [q, *contiguous, seq_lens, None]


@pytest.mark.parametrize(
    "paged, mutate, exc, message",
    [
        (False, lambda a: a.__setitem__(3, torch.tensor([3, 13], dtype=torch.int32)), ValueError,
         "`seq_lens` must be in 0..12 \\(the cache length S_max\\)"),
        (False, lambda a: a.__setitem__(3, torch.tensor([-1, 2], dtype=torch.int32)), ValueError, "`seq_lens` must be"),
        (True, lambda a: a.__setitem__(4, a[4][:, :2].contiguous()), ValueError, "the block table is too short"),
        (True, lambda a: a[4].__setitem__((1, 0), 99), ValueError, "`block_table` entries"),
        (True, lambda a: a.__setitem__(4, a[4][:1]), ValueError, "`block_table` must have shape"),
        (True, lambda a: a.__setitem__(4, a[4].long()), TypeError, "`block_table` must have dtype"),
        (False, lambda a: a.__setitem__(1, torch.zeros(2, 12, 3, 16)), ValueError, "`v_cache` must have shape"),
        (False, lambda a: (a.__setitem__(1, torch.zeros(2, 12, 3, 16)), a.__setitem__(2, torch.zeros(2, 12, 3, 16))),
         ValueError, "multiple of the kv head count"),
        (False, lambda a: (a.__setitem__(1, torch.zeros(3, 12, 2, 16)), a.__setitem__(2, torch.zeros(3, 12, 2, 16))),
         ValueError, "must have B = 2"),
        (True, lambda a: (a.__setitem__(1, torch.zeros(30, 4, 2, 16)[:, :, :, :8]),
                          a.__setitem__(2, torch.zeros(30, 4, 2, 16)[:, :, :, :8])), ValueError, "last dimension of"),
        (False, lambda a: a.__setitem__(3, a[3].long()), TypeError, "`seq_lens` must have dtype"),
        (False, lambda a: a.extend([None, -1, None, torch.tensor([0, 10], dtype=torch.int32)]), ValueError,
         "`seq_starts` must be in 0..seq_lens"),
        (False, lambda a: a.extend([None, -1, None, torch.tensor([0, 1])]), TypeError, "`seq_starts` must have dtype"),
        (True, lambda a: a.extend([None, -1, None, torch.tensor([0], dtype=torch.int32)]), ValueError,
         "`seq_starts` must have shape"),
        (False, lambda a: a.__setitem__(0, torch.zeros(2, 1, 1, 4, 16)), ValueError, "or \\[B, Q, Hq, D\\]"),
        (False, lambda a: a.__setitem__(0, torch.zeros(2, 4, 40)), ValueError, "`head_dim`|last dimension"),
        (False, lambda a: a.__setitem__(1, torch.zeros(2, 12, 16, 2).transpose(2, 3)), ValueError,
         "contiguous in its last"),
        (True, lambda a: (a.__setitem__(1, torch.zeros(4, 300, 2, 16)), a.__setitem__(2, torch.zeros(4, 300, 2, 16))),
         ValueError, "block size"),
    ],
)
def test_decode_bad_input_raises_clear_error(paged, mutate, exc, message):
    args = _decode_args(paged)
    mutate(args)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.cca_attention_decode(*args)


def test_config_table_covers_every_target_and_head_dim():
    from zaya_kernels.triton import attention as tri

    table = tri.load_config_table()
    for target in ("gfx942", "gfx950", "sm_90", "interpreter"):
        for kernel in tri.KERNELS:
            for head_dim in range(16, 257, 16):
                assert str(tri.block_d_for(head_dim)) in table[target][kernel], (target, kernel, head_dim)
    assert tri.device_target(torch.device("cpu")) == "interpreter"


# ---------------------------------------------------------------- GPU: ZAYA1-8B shapes, bf16/fp16
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens", [[1], [127, 1, 300], [1000, 64, 2048]])
@pytest.mark.parametrize("window", [-1, 100])
def test_gpu_prefill_matches_reference(dtype, lens, window):
    q, k, v, cu = make_prefill(lens, 8, 2, 128, dtype, sum(lens), device="cuda", requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()
    with zaya_kernels.use_backend("triton"):
        out, lse = torch.ops.zaya.cca_attention(q, k, v, cu, max(lens), None, True, window)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected, expected_lse = ref.cca_attention(*fp64(q, k, v), cu, max(lens), None, True, window)
    assert_close(out, expected.detach(), dtype=dtype, reduction=max(lens) * 128, scale=output_scale(v))
    assert_close(lse, expected_lse.detach(), dtype=torch.float32, reduction=max(lens) * 128, scale=math.sqrt(128))
    expected_grads = reference_grads(q, k, v, cu, max(lens), True, window, grad_out)
    scale = grad_scale(q, k, v, grad_out, 128**-0.5)
    for name, a, e in zip("qkv", grads, expected_grads):
        assert_close(a, e, dtype=dtype, reduction=max(lens) * 128 * 4, scale=scale, what=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [1, 16, 256, None])
@pytest.mark.parametrize("lens", [[1, 4000, 0], [700] * 9])
@pytest.mark.parametrize("num_queries", [None, 4])
def test_gpu_decode_matches_reference(dtype, block_size, lens, num_queries):
    contiguous, paged, table, q, seq_lens, _, _ = _decode_case(lens, (8, 2), 128, block_size or 16, dtype, len(lens),
                                                               device="cuda")
    seq_lens = seq_lens.cuda()
    if num_queries is not None:
        q = torch.randn(len(lens), num_queries, 8, 128, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    caches, block_table = (contiguous, None) if block_size is None else (paged, table)
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens, block_table)
    expected = ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens, block_table)
    assert_close(out, expected, dtype=dtype, reduction=max(lens) * 128, scale=output_scale(caches[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, None])
@pytest.mark.parametrize("window", [-1, 100])
def test_gpu_left_padded_decode_matches_reference(block_size, window):
    """seq_starts on the GPU (bf16, ZAYA1 heads): a left-padded batch as kernelize passes transformers' cache."""
    lens = [1, 900, 300, 2048]
    contiguous, paged, table, q, seq_lens, _, _ = _decode_case(lens, (8, 2), 128, block_size or 16, torch.bfloat16,
                                                               5, device="cuda")
    seq_starts = torch.tensor([0, 899, 17, 1000], dtype=torch.int32, device="cuda")
    caches, block_table = (contiguous, None) if block_size is None else (paged, table)
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, *caches, seq_lens, block_table, None, window, None, seq_starts)
    expected = ref.cca_attention_decode(q.double(), *(c.double() for c in caches), seq_lens, block_table, None,
                                        window, seq_starts)
    assert_close(out, expected, dtype=torch.bfloat16, reduction=max(lens) * 128, scale=output_scale(caches[1]))
