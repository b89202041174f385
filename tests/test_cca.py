"""CCA projection ops (cca_prepare, cca_prepare_decode, cca_prepare_backward): the reference against transformers,
the layouts against each other (decode vs prefill, chunked vs whole, varlen vs per sequence), Triton against the
reference, gradients, torch.library integration and bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zaya_kernels
from zaya_kernels.reference import cca as ref

from helpers import assert_close, random_paged_caches, stacked_row_views

THETA = 10_000.0


class Case:
    """Random CCA inputs: weights drawn away from zero (non-zero biases and temperatures), sequences `lengths`."""

    def __init__(self, num_q, num_kv, head_dim, k0, k1, lengths, dtype=torch.float32, seed=0, rotary_dim=None,
                 with_init=False, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.num_q, self.num_kv, self.head_dim, self.k0, self.k1 = num_q, num_kv, head_dim, k0, k1
        self.rotary_dim = head_dim // 2 if rotary_dim is None else rotary_dim
        self.channels = (num_q + num_kv) * head_dim
        self.state_len = k0 + k1 - 2
        self.value_dim = num_kv * head_dim // 2
        self.lengths = list(lengths)
        self.dtype, self.device = dtype, device
        tokens = sum(self.lengths)

        def rand(*shape, scale=1.0, dt=None):
            return (torch.randn(*shape, generator=gen) * scale).to(dt or dtype).to(device)

        self.qk = rand(tokens, self.channels)
        self.v_current, self.v_delayed = rand(tokens, self.value_dim), rand(tokens, self.value_dim)
        self.conv0_weight = rand(self.channels, k0, scale=0.5, dt=torch.float32)
        self.conv0_bias = rand(self.channels, scale=0.5, dt=torch.float32)
        self.conv1_weight = rand(self.channels, head_dim, k1, scale=head_dim**-0.5, dt=torch.float32)
        self.conv1_bias = rand(self.channels, scale=0.5, dt=torch.float32)
        self.temperature = rand(num_kv, dt=torch.float32) + 1.0
        self.positions = torch.cat([torch.arange(n) + 3 * i for i, n in enumerate(self.lengths)] or
                                   [torch.zeros(0, dtype=torch.int64)]).to(device)
        bounds = [0]
        for n in self.lengths:
            bounds.append(bounds[-1] + n)
        self.cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        num_seqs = len(self.lengths)
        if with_init:
            self.init = (rand(num_seqs, self.channels, self.state_len, dt=torch.float32),
                         rand(num_seqs, self.value_dim, dt=torch.float32),
                         (torch.arange(num_seqs) % 3 != 1).to(torch.int32).to(device))
        else:
            self.init = (None, None, None)

    def weights(self):
        return (self.conv0_weight, self.conv0_bias, self.conv1_weight, self.conv1_bias, self.temperature)

    def heads(self):
        return (self.num_q, self.num_kv, self.rotary_dim, THETA)

    def prefill_args(self):
        return (self.qk, self.v_current, self.v_delayed, *self.weights(), self.positions, self.cu_seqlens,
                *self.heads(), *self.init)

    def reduction(self):
        return self.k0 * self.k1 * self.head_dim


def prefill(case, backend="reference", args=None):
    with zaya_kernels.use_backend(backend):
        return torch.ops.zaya.cca_prepare(*(args or case.prefill_args()))


def decode(case, rows, conv_state, value_state, state_indices, backend="reference"):
    """Decode rows `rows` (indices into the case's tokens) with the given states."""
    with zaya_kernels.use_backend(backend):
        return torch.ops.zaya.cca_prepare_decode(
            case.qk[rows], case.v_current[rows], case.v_delayed[rows], *case.weights(), case.positions[rows],
            conv_state, value_state, state_indices, *case.heads())


def assert_outputs_close(actual, expected, case, what):
    for name, a, e in zip(("q", "k", "v", "final conv state", "final value state"), actual, expected):
        assert a.dtype == e.dtype, f"{what} {name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, dtype=case.dtype, reduction=case.reduction(), what=f"{what} {name}")


head_configs = st.sampled_from([(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (8, 2), (16, 2)])  # GQA 1, 2, 4, 8
kernel_sizes = st.tuples(st.integers(1, 4), st.integers(1, 4))
seq_lengths = st.lists(st.sampled_from([0, 1, 2, 3, 5, 17, 40]), min_size=0, max_size=4)


# ---------------------------------------------------------------- the reference against transformers
def _transformers_modules(num_q, num_kv, head_dim, k0, k1, seed):
    from transformers.models.zaya.configuration_zaya import ZayaConfig
    from transformers.models.zaya.modeling_zaya import ZayaCCAProjection, ZayaQKNorm, ZayaRotaryEmbedding

    torch.manual_seed(seed)
    config = ZayaConfig(hidden_size=40, num_attention_heads=num_q, num_key_value_heads=num_kv, head_dim=head_dim,
                        cca_time0=k0, cca_time1=k1, num_hidden_layers=1)
    projection, norm, rotary = ZayaCCAProjection(config, 0), ZayaQKNorm(config), ZayaRotaryEmbedding(config)
    with torch.no_grad():
        for p in list(projection.parameters()) + list(norm.parameters()):
            p.normal_(0.0, 0.3)  # conv biases and temperatures non-zero
    return config, projection, norm, rotary


def _transformers_forward(projection, norm, rotary, hidden, cache, positions):
    from transformers.models.zaya.modeling_zaya import apply_rotary_pos_emb

    q, k, v = projection(hidden, cache)
    q, k = norm(q, k)
    cos, sin = rotary(hidden, positions, "hybrid")
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v


@pytest.mark.parametrize("num_q,num_kv,head_dim,k0,k1", [(4, 2, 16, 2, 2), (8, 1, 8, 3, 1), (2, 2, 12, 1, 4),
                                                         (8, 2, 16, 4, 3)])
def test_reference_matches_transformers(num_q, num_kv, head_dim, k0, k1):
    """Whole sequences, then the same sequences in chunks and token by token through transformers' DynamicCache:
    the reference's outputs and final states equal ZayaCCAProjection + ZayaQKNorm + RoPE (fp32)."""
    from transformers.cache_utils import DynamicCache

    config, projection, norm, rotary = _transformers_modules(num_q, num_kv, head_dim, k0, k1, seed=num_q + k0)
    theta = config.rope_parameters["hybrid"]["rope_theta"]
    rotary_dim = int(head_dim * config.rope_parameters["hybrid"]["partial_rotary_factor"])
    batch, seq = 2, 7
    hidden = torch.randn(batch, seq, 40)
    positions = torch.arange(seq)[None].expand(batch, seq)
    with torch.no_grad():
        expected = _transformers_forward(projection, norm, rotary, hidden, None, positions)
        qk = torch.cat([projection.q_proj(hidden), projection.k_proj(hidden)], -1)
        v_current, v_delayed = projection.v_proj_current(hidden), projection.v_proj_delayed(hidden)
    weights = (projection.conv_qk_depthwise.weight[:, 0].detach(), projection.conv_qk_depthwise.bias.detach(),
               projection.conv_qk_grouped.weight.detach(), projection.conv_qk_grouped.bias.detach(), norm.temp.detach())
    heads = (num_q, num_kv, rotary_dim, theta)
    flat = lambda t: t.reshape(batch * seq, -1)  # noqa: E731
    cu_seqlens = torch.tensor([0, seq, 2 * seq], dtype=torch.int32)
    q, k, v, conv_state, value_state = ref.cca_prepare(flat(qk), flat(v_current), flat(v_delayed), *weights,
                                                       positions.reshape(-1), cu_seqlens, *heads)
    for name, a, e in (("q", q, expected[0]), ("k", k, expected[1]), ("v", v, expected[2])):
        assert_close(a, e.reshape(a.shape), reduction=k0 * k1 * head_dim, what=f"whole {name}")

    # Chunked prefill with a cache (chunks of 3, 1, 3 tokens): outputs and the cache's states after each chunk.
    cache = DynamicCache(config=config)
    init = (None, None, None)
    for start, end in ((0, 3), (3, 4), (4, 7)):
        with torch.no_grad():
            chunk_expected = _transformers_forward(projection, norm, rotary, hidden[:, start:end], cache,
                                                   positions[:, start:end])
        piece = lambda t: t[:, start:end].reshape(batch * (end - start), -1)  # noqa: E731
        chunk_cu = torch.tensor([0, end - start, 2 * (end - start)], dtype=torch.int32)
        outputs = ref.cca_prepare(piece(qk), piece(v_current), piece(v_delayed), *weights,
                                  positions[:, start:end].reshape(-1), chunk_cu, *heads, *init)
        for name, a, e in zip("qkv", outputs, chunk_expected):
            assert_close(a, e.reshape(a.shape), reduction=k0 * k1 * head_dim, what=f"chunk {start} {name}")
        layer = cache.layers[0]
        if outputs[3].shape[-1]:
            assert_close(outputs[3], layer.conv_states[0].float(), what="conv state")
        assert_close(outputs[4], layer.recurrent_states[0].float(), what="value state")
        init = (outputs[3], outputs[4], torch.ones(batch, dtype=torch.int32))


def test_batched_wrapper_matches_transformers_with_left_padding():
    """transformers' module with a 2D mask (conv_mask) on left-padded rows equals cca_prepare_batched, and a
    left-padded row equals its unpadded sequence run alone."""
    num_q, num_kv, head_dim = 4, 2, 16
    config, projection, norm, rotary = _transformers_modules(num_q, num_kv, head_dim, 2, 2, seed=7)
    theta = config.rope_parameters["hybrid"]["rope_theta"]
    batch, seq, pad = 2, 6, 2
    hidden = torch.randn(batch, seq, 40)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        masked = hidden * mask[..., None]
        from transformers.models.zaya.modeling_zaya import apply_rotary_pos_emb

        q_hf, k_hf, v_hf = projection(hidden, None, conv_mask=mask)
        q_hf, k_hf = norm(q_hf, k_hf)
        cos, sin = rotary(hidden, positions, "hybrid")
        q_hf, k_hf = apply_rotary_pos_emb(q_hf.transpose(1, 2), k_hf.transpose(1, 2), cos, sin)
        q_hf, k_hf = q_hf.transpose(1, 2), k_hf.transpose(1, 2)
        qk = torch.cat([projection.q_proj(hidden), projection.k_proj(hidden)], -1)
        v_current, v_delayed = projection.v_proj_current(hidden), projection.v_proj_delayed(hidden)
        assert torch.equal(projection.q_proj(masked)[1, :pad], torch.zeros(pad, num_q * head_dim))
    weights = (projection.conv_qk_depthwise.weight[:, 0].detach(), projection.conv_qk_depthwise.bias.detach(),
               projection.conv_qk_grouped.weight.detach(), projection.conv_qk_grouped.bias.detach(), norm.temp.detach())
    heads = (num_q, num_kv, head_dim // 2, theta)
    q, k, v = zaya_kernels.ops.cca_prepare_batched(qk, v_current, v_delayed, *weights, positions, *heads,
                                                   attention_mask=mask)
    for name, a, e in (("q", q, q_hf), ("k", k, k_hf), ("v", v, v_hf)):
        assert_close(a, e, reduction=4 * head_dim, what=f"batched {name}")
    alone = zaya_kernels.ops.cca_prepare_batched(qk[1:, pad:], v_current[1:, pad:], v_delayed[1:, pad:], *weights,
                                                 positions[1:, pad:], *heads)
    for name, a, e in zip("qkv", alone, (q, k, v)):
        assert_close(a[0], e[1, pad:], reduction=4 * head_dim, what=f"left padding {name}")


@settings(max_examples=6, deadline=None)
@given(data=st.data(), backend=st.sampled_from(["reference", "triton"]),
       mask_dtype=st.sampled_from([torch.bool, torch.int64, torch.float32]))
@example(data=None, backend="triton", mask_dtype=torch.bool)
def test_batched_left_padding_equals_packed_sequences(data, backend, mask_dtype):
    """cca_prepare_batched on left-padded rows (pads of 0..S-1 tokens, each row's positions counting its real tokens
    from 0) gives, at the real tokens, exactly what the packed varlen op gives the unpadded sequences."""
    if data is None:  # the fixed example: one row unpadded, one padded to a single token, one empty of padding 2
        batch, seq, pads = 3, 5, [0, 4, 2]
    else:
        batch = data.draw(st.integers(1, 3), label="batch")
        seq = data.draw(st.integers(1, 6), label="seq")
        pads = data.draw(st.lists(st.integers(0, seq - 1), min_size=batch, max_size=batch), label="pads")
    lengths = [seq - p for p in pads]
    case = Case(4, 2, 8, 2, 2, lengths, seed=11)
    rows = lambda t: torch.stack([torch.cat([t.new_full((p, *t.shape[1:]), 7), t[a:b]])  # noqa: E731 - pads: junk
                                  for p, a, b in zip(pads, case.cu_seqlens[:-1], case.cu_seqlens[1:])])
    mask = torch.stack([torch.arange(seq) >= p for p in pads]).to(mask_dtype)
    positions = torch.stack([(torch.arange(seq) - p).clamp_min(0) for p in pads])
    with zaya_kernels.use_backend(backend):
        q, k, v = zaya_kernels.ops.cca_prepare_batched(rows(case.qk), rows(case.v_current), rows(case.v_delayed),
                                                       *case.weights(), positions, *case.heads(),
                                                       attention_mask=mask)
        expected = torch.ops.zaya.cca_prepare(*case.prefill_args()[:8], torch.cat(
            [torch.arange(n) for n in lengths]), *case.prefill_args()[9:])[:3]
    for name, actual, packed in zip("qkv", (q, k, v), expected):
        for b, (p, a, e) in enumerate(zip(pads, case.cu_seqlens[:-1], case.cu_seqlens[1:])):
            assert_close(actual[b, p:], packed[a:e], reduction=case.reduction(), what=f"{backend} row {b} {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batched_takes_stacked_projection_slices_without_a_copy(backend, monkeypatch):
    """cca_prepare_batched on [B, S, width] column slices of one stacked [B, S, N] projection output (NaN padding
    after them) passes row-strided views to cca_prepare, no copies, and equals the contiguous inputs' result."""
    from zaya_kernels.ops import cca as ops_cca

    batch, seq = 2, 5
    case = Case(4, 2, 8, 2, 2, [seq] * batch, seed=13)
    views = [t.view(batch, seq, -1) for t in stacked_row_views([case.qk, case.v_current, case.v_delayed], pad=3)]
    positions = torch.arange(seq).repeat(batch, 1)
    seen_strides = []
    prepare = ops_cca.cca_prepare
    monkeypatch.setattr(ops_cca, "cca_prepare", lambda *a: seen_strides.append([t.stride(0) for t in a[:3]])
                        or prepare(*a))
    with zaya_kernels.use_backend(backend):
        actual = zaya_kernels.ops.cca_prepare_batched(*views, *case.weights(), positions, *case.heads())
        expected = zaya_kernels.ops.cca_prepare_batched(*(t.contiguous() for t in views), *case.weights(), positions,
                                                        *case.heads())
    width = case.qk.shape[1] + 2 * case.v_current.shape[1] + 3
    assert seen_strides[0] == [width] * 3, "the stacked slices were copied"
    for name, a, e in zip("qkv", actual, expected):
        assert torch.equal(a, e), name


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("batch, seq", [(0, 6), (2, 0)])
def test_batched_empty_batch_gives_empty_outputs(backend, batch, seq):
    case = Case(4, 2, 8, 2, 2, [3], seed=1)
    qk, v_current, v_delayed = (t.new_zeros(batch, seq, t.shape[-1]) for t in (case.qk, case.v_current,
                                                                              case.v_delayed))
    with zaya_kernels.use_backend(backend):
        q, k, v = zaya_kernels.ops.cca_prepare_batched(
            qk, v_current, v_delayed, *case.weights(), torch.zeros(batch, seq, dtype=torch.int32), *case.heads(),
            attention_mask=torch.ones(batch, seq, dtype=torch.bool))
    assert q.shape == (batch, seq, 4, 8) and k.shape == v.shape == (batch, seq, 2, 8)


# ---------------------------------------------------------------- layouts against each other (reference and Triton)
def _decode_token_by_token(case, backend, state_dtype=torch.float32):
    """Feed every sequence of the case token by token (all sequences in one batch per step, finished ones padded
    with index -1) through cca_prepare_decode from zeroed slots; returns prefill-shaped outputs and final states."""
    num_seqs = len(case.lengths)
    slots = num_seqs + 2
    conv_state = torch.zeros(slots, case.channels, case.state_len, dtype=state_dtype, device=case.device)
    value_state = torch.zeros(slots, case.value_dim, dtype=state_dtype, device=case.device)
    slot_of = torch.arange(num_seqs, device=case.device).flip(0) + 1  # not the identity: exercises the indirection
    tokens = sum(case.lengths)
    q = case.qk.new_zeros(tokens, case.num_q, case.head_dim)
    k = case.qk.new_zeros(tokens, case.num_kv, case.head_dim)
    v = case.qk.new_zeros(tokens, case.num_kv, case.head_dim)
    starts = case.cu_seqlens[:-1].tolist()
    for step in range(max(case.lengths, default=0)):
        active = [b for b in range(num_seqs) if step < case.lengths[b]]
        rows = torch.tensor([starts[b] + step if step < case.lengths[b] else 0 for b in range(num_seqs)])
        indices = torch.tensor([int(slot_of[b]) if b in active else -1 for b in range(num_seqs)], dtype=torch.int32)
        outs = decode(case, rows.to(case.device), conv_state, value_state, indices.to(case.device), backend)
        for out, full in zip(outs, (q, k, v)):
            for b in range(num_seqs):
                if b in active:
                    full[starts[b] + step] = out[b]
                else:
                    assert not out[b].any(), "a padded row must have zero outputs"
    return q, k, v, conv_state[slot_of].float(), value_state[slot_of].float()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16])
def test_prefill_chunk_into_state_pools_then_decode_equals_whole_prefill(backend, pool_dtype):
    """A serving engine's flow: the first chunk of every prompt through cca_prepare with the state pools (slots not
    in order, one sequence continuing from an earlier chunk), then token-by-token cca_prepare_decode from the same
    pools: the outputs equal one whole prefill, and the pools hold the final states."""
    case = Case(4, 2, 8, 2, 2, [5, 3, 6], seed=21)
    whole = prefill(case)
    slots, slot_of = 6, torch.tensor([4, 0, 2], dtype=torch.int32)
    conv_state = torch.randn(slots, case.channels, case.state_len).to(pool_dtype)  # junk: fresh slots ignore it
    value_state = torch.randn(slots, case.value_dim).to(pool_dtype)
    starts = case.cu_seqlens[:-1].tolist()
    # sequence 0 had its first token in an earlier chunk: put its state in its slot
    earlier = prefill(case, args=(case.qk[:1], case.v_current[:1], case.v_delayed[:1], *case.weights(),
                                  case.positions[:1], torch.tensor([0, 1], dtype=torch.int32), *case.heads()))
    conv_state[4], value_state[4] = earlier[3][0].to(pool_dtype), earlier[4][0].to(pool_dtype)
    done = [2, 2, 3]  # tokens of each sequence prefilled after this chunk: 1 (token 1 of seq 0), 2 and 3
    first = [1, 0, 0]
    rows = torch.cat([torch.arange(s + f, s + d) for s, f, d in zip(starts, first, done)])
    cu = torch.tensor([0, 1, 3, 6], dtype=torch.int32)
    with zaya_kernels.use_backend(backend):
        outputs = zaya_kernels.ops.cca_prepare(
            case.qk[rows], case.v_current[rows], case.v_delayed[rows], *case.weights(), case.positions[rows], cu,
            *case.heads(), has_initial_state=torch.tensor([1, 0, 0], dtype=torch.int32), conv_state=conv_state,
            value_state=value_state, state_indices=slot_of)
    assert torch.equal(conv_state[slot_of.long()], outputs[3].to(pool_dtype))
    assert torch.equal(value_state[slot_of.long()], outputs[4].to(pool_dtype))
    tol = dict(dtype=torch.float16 if pool_dtype == torch.float16 else case.dtype, reduction=case.reduction())
    for name, i in (("q", 0), ("k", 1), ("v", 2)):
        assert_close(outputs[i], whole[i][rows], what=f"chunk {name}", **tol)
    # then decode the rest of every sequence from the pools
    for step in range(max(n - d for n, d in zip(case.lengths, done))):
        live = [b for b in range(3) if done[b] + step < case.lengths[b]]
        token_rows = torch.tensor([starts[b] + done[b] + step if b in live else 0 for b in range(3)])
        indices = torch.tensor([int(slot_of[b]) if b in live else -1 for b in range(3)], dtype=torch.int32)
        out = decode(case, token_rows, conv_state, value_state, indices, backend)
        for b in live:
            for name, i in (("q", 0), ("k", 1), ("v", 2)):
                assert_close(out[i][b], whole[i][token_rows[b]], what=f"decode {name} seq {b}", **tol)
    with pytest.raises(ValueError, match="state pools need conv_state, value_state and state_indices"):
        zaya_kernels.ops.cca_prepare(*case.prefill_args()[:14], conv_state=conv_state)
    with pytest.raises(ValueError, match="must be >= 0 with the state pools"):
        zaya_kernels.ops.cca_prepare(*case.prefill_args()[:14], has_initial_state=torch.ones(3, dtype=torch.int32),
                                     conv_state=conv_state, value_state=value_state,
                                     state_indices=torch.tensor([0, -1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="gives slot 2 to more than one row"):
        zaya_kernels.ops.cca_prepare(*case.prefill_args()[:14], has_initial_state=torch.ones(3, dtype=torch.int32),
                                     conv_state=conv_state, value_state=value_state,
                                     state_indices=torch.tensor([2, 1, 2], dtype=torch.int32))


@settings(max_examples=25)
@given(heads=head_configs, kernels=kernel_sizes, lengths=seq_lengths, head_dim=st.sampled_from([4, 8, 16]),
       seed=st.integers(0, 2**16))
def test_reference_decode_equals_prefill(heads, kernels, lengths, head_dim, seed):
    case = Case(*heads, head_dim, *kernels, lengths, seed=seed)
    expected = prefill(case)
    actual = _decode_token_by_token(case, "reference")
    assert_outputs_close(actual, expected, case, "decode vs prefill")


@settings(max_examples=25)
@given(heads=head_configs, kernels=kernel_sizes, lengths=st.lists(st.integers(0, 12), min_size=1, max_size=3),
       split=st.integers(0, 12), head_dim=st.sampled_from([4, 16]), seed=st.integers(0, 2**16))
def test_reference_chunked_equals_whole_and_varlen_equals_per_sequence(heads, kernels, lengths, split, head_dim, seed):
    case = Case(*heads, head_dim, *kernels, lengths, seed=seed)
    whole = prefill(case)
    # Per sequence: each sequence alone equals its rows of the packed call.
    for b, (start, end) in enumerate(zip(case.cu_seqlens[:-1].tolist(), case.cu_seqlens[1:].tolist())):
        args = list(case.prefill_args())
        for i in (0, 1, 2, 8):
            args[i] = args[i][start:end]
        args[9] = torch.tensor([0, end - start], dtype=torch.int32)
        alone = prefill(case, args=tuple(args))
        for name, a, e in zip("qkv", alone[:3], whole[:3]):
            assert torch.equal(a, e[start:end]), f"sequence {b} {name}"
        assert torch.equal(alone[3][0], whole[3][b]) and torch.equal(alone[4][0], whole[4][b])
    # Chunked: every sequence split at min(split, length); the second chunk starts from the first's final states.
    cuts = [min(split, n) for n in case.lengths]
    firsts, seconds = [], []
    for (start, end), cut in zip(zip(case.cu_seqlens[:-1].tolist(), case.cu_seqlens[1:].tolist()), cuts):
        firsts.append(torch.arange(start, start + cut))
        seconds.append(torch.arange(start + cut, end))

    def run(rows, cut_lengths, init):
        rows = torch.cat(rows).long()
        args = list(case.prefill_args())
        for i in (0, 1, 2, 8):
            args[i] = args[i][rows]
        args[9] = torch.tensor([0] + torch.tensor(cut_lengths).cumsum(0).tolist(), dtype=torch.int32)
        args[14:17] = init
        return rows, prefill(case, args=tuple(args))

    rows1, first = run(firsts, cuts, (None, None, None))
    rows2, second = run(seconds, [n - c for n, c in zip(case.lengths, cuts)],
                        (first[3], first[4], torch.ones(len(lengths), dtype=torch.bool)))
    for i, name in enumerate("qkv"):
        stitched = torch.empty_like(whole[i])
        stitched[rows1], stitched[rows2] = first[i], second[i]
        assert_close(stitched, whole[i], reduction=case.reduction(), what=f"chunked {name}")
    assert torch.equal(second[3], whole[3]) and torch.equal(second[4], whole[4])


def test_reference_handles_single_tokens_and_empty_batches():
    for lengths in ([], [0], [1], [2], [3], [1, 0, 2]):
        case = Case(4, 2, 8, 2, 2, lengths)
        q, k, v, conv_state, value_state = prefill(case)
        assert q.shape == (sum(lengths), 4, 8) and conv_state.shape == (len(lengths), case.channels, 2)
        assert value_state.shape == (len(lengths), case.value_dim)
        if lengths and lengths[0] == 1:
            # a fresh one-token sequence: Y_{-1} = b0 (not 0), X_{-1} = 0, and the delayed values are zero
            assert torch.equal(v[0, 1], torch.zeros(8))


# ---------------------------------------------------------------- Triton (interpreter on CPU, compiled on GPU)
tiny_lengths = st.lists(st.sampled_from([0, 1, 2, 3, 9, 33, 70]), min_size=1, max_size=3)


ROTARY = {"zero": lambda d: 0, "half": lambda d: d // 2, "full": lambda d: d}  # rotary_dim of a head_dim


@settings(max_examples=10)
@given(heads=st.sampled_from([(1, 1), (2, 1), (4, 1), (8, 1), (4, 2), (2, 2), (8, 2)]), kernels=kernel_sizes,
       lengths=tiny_lengths, head_dim=st.sampled_from([16, 32, 24]), with_init=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), rotary=st.sampled_from(list(ROTARY)),
       seed=st.integers(0, 2**16))
# ZAYA's kernels (2, 2) and heads (8, 2), a long sequence between short ones
@example(heads=(8, 2), kernels=(2, 2), lengths=[1, 33, 2], head_dim=32, with_init=True, dtype=torch.float32,
         rotary="half", seed=1)
# the widest halo, rotary over the whole head
@example(heads=(4, 2), kernels=(4, 4), lengths=[9, 0, 3], head_dim=16, with_init=True, dtype=torch.float16,
         rotary="full", seed=2)
# no rotary at all, one sequence across several token tiles
@example(heads=(2, 2), kernels=(2, 2), lengths=[70], head_dim=24, with_init=False, dtype=torch.float32,
         rotary="zero", seed=3)
# an empty batch (no sequence, no token) and a batch of empty sequences
@example(heads=(4, 2), kernels=(2, 2), lengths=[], head_dim=16, with_init=True, dtype=torch.float32, rotary="half",
         seed=4)
@example(heads=(4, 2), kernels=(4, 4), lengths=[0, 0], head_dim=16, with_init=True, dtype=torch.float32,
         rotary="half", seed=5)
def test_triton_prefill_matches_reference(heads, kernels, lengths, head_dim, with_init, dtype, rotary, seed):
    case = Case(*heads, head_dim, *kernels, lengths, dtype=dtype, seed=seed, with_init=with_init,
                rotary_dim=ROTARY[rotary](head_dim))
    actual = prefill(case, "triton")
    assert zaya_kernels.last_backend("cca_prepare") == "triton"
    assert_outputs_close(actual, prefill(case), case, "triton prefill")


def test_triton_qk_norm_clamps_tiny_norms_like_the_reference():
    """Q/K whose norm is below eps (finfo(fp32).eps): the reference divides by max(||U||, eps) (ZayaQKNorm's
    clamp), so sqrt(D) U / eps, not sqrt(D) U / sqrt(||U||^2 + eps) nor a unit vector, and no gradient flows
    through the clamped norm. Zero conv biases and qk ~ 1e-9 put every row's ||U|| near 1e-8; normal rows cannot
    tell these apart."""
    case = Case(8, 2, 16, 2, 2, [5, 3], seed=7)
    case.qk = case.qk * 1e-9
    case.conv0_bias = torch.zeros_like(case.conv0_bias)
    case.conv1_bias = torch.zeros_like(case.conv1_bias)
    expected = prefill(case)
    norms = expected[0].norm(dim=-1)  # a normalised q row has norm sqrt(D) = 4
    assert 0.0 < norms.min() and norms.max() < 1.0, "the rows must be below the clamp"
    actual = prefill(case, "triton")
    assert zaya_kernels.last_backend("cca_prepare") == "triton"
    assert_outputs_close(actual, expected, case, "triton prefill, tiny norms")

    with zaya_kernels.use_backend("triton"):
        actual = _projection_grads(case, torch.ops.zaya.cca_prepare)
    expected = _projection_grads(case, ref.cca_prepare)
    for name, a, e in zip(GRAD_NAMES, actual, expected):
        assert_close(a, e, reduction=case.reduction() * 13, what=f"tiny norms grad {name}")


@settings(max_examples=10)
@given(heads=st.sampled_from([(2, 1), (4, 2), (8, 1), (8, 2)]), kernels=kernel_sizes,
       rows=st.integers(1, 5), head_dim=st.sampled_from([16, 32]), state_dtype=st.sampled_from([torch.float32,
                                                                                                 torch.float16]),
       rotary=st.sampled_from(list(ROTARY)), seed=st.integers(0, 2**16))
@example(heads=(8, 2), kernels=(2, 2), rows=4, head_dim=32, state_dtype=torch.float32, rotary="half", seed=1)
@example(heads=(4, 2), kernels=(4, 4), rows=3, head_dim=16, state_dtype=torch.float16, rotary="full", seed=2)
@example(heads=(8, 2), kernels=(2, 2), rows=2, head_dim=16, state_dtype=torch.float32, rotary="zero", seed=3)
@example(heads=(8, 2), kernels=(4, 4), rows=0, head_dim=16, state_dtype=torch.float32, rotary="half", seed=4)
def test_triton_decode_matches_reference(heads, kernels, rows, head_dim, state_dtype, rotary, seed):
    case = Case(*heads, head_dim, *kernels, [rows], seed=seed, rotary_dim=ROTARY[rotary](head_dim))
    gen = torch.Generator().manual_seed(seed)
    slots = rows + 3
    conv_state = torch.randn(slots, case.channels, case.state_len, generator=gen).to(state_dtype)
    value_state = torch.randn(slots, case.value_dim, generator=gen).to(state_dtype)
    indices = torch.randperm(slots, generator=gen)[:rows].to(torch.int32)
    if rows:
        indices[0] = -1  # a padded row
    expected_states = (conv_state.clone(), value_state.clone())
    expected = decode(case, torch.arange(rows), *expected_states, indices)
    actual = decode(case, torch.arange(rows), conv_state, value_state, indices, "triton")
    assert zaya_kernels.last_backend("cca_prepare_decode") == "triton"
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, reduction=case.reduction(), what=f"triton decode {name}")
    assert torch.equal(conv_state, expected_states[0]) and torch.equal(value_state, expected_states[1])


def test_triton_decode_equals_triton_prefill_token_by_token():
    case = Case(4, 2, 16, 2, 2, [3, 1, 2], seed=5)
    expected = prefill(case, "triton")
    actual = _decode_token_by_token(case, "triton")
    assert_outputs_close(actual, expected, case, "triton decode vs prefill")


def test_triton_decode_ignores_out_of_range_index_on_gpu_style_call():
    """The kernel itself (as on GPU, where values are not checked) treats an index >= slots as a padded row."""
    from zaya_kernels.triton import cca as tri

    case = Case(2, 1, 16, 2, 2, [2], seed=1)
    conv_state, value_state = torch.randn(2, case.channels, 2), torch.randn(2, case.value_dim)
    before = (conv_state.clone(), value_state.clone())
    q, k, v = (torch.full((2, h, 16), 7.0) for h in (2, 1, 1))
    with zaya_kernels.use_backend("triton"):
        tri.cca_prepare_decode(case.qk, case.v_current, case.v_delayed, *case.weights(), case.positions,
                               conv_state, value_state, torch.tensor([5, -3], dtype=torch.int32), *case.heads(),
                               q, k, v)
    assert not q.any() and not k.any() and not v.any()
    assert torch.equal(conv_state, before[0]) and torch.equal(value_state, before[1])


# ---------------------------------------------------------------- gradients
def _differentiable(case):
    return [t.detach().clone().requires_grad_(True) for t in (case.qk, case.v_current, case.v_delayed,
                                                              *case.weights())]


GRAD_NAMES = ("qk", "v_current", "v_delayed", "w0", "b0", "w1", "b1", "temp")


def _projection_grads(case, fn):
    """Gradients of GRAD_NAMES' inputs for a fixed random upstream gradient (seed 0) on every output of fn."""
    gen = torch.Generator().manual_seed(0)
    inputs = _differentiable(case)
    outputs = fn(*inputs, case.positions, case.cu_seqlens, *case.heads(), *case.init)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("k1", [2, 3])  # 2: the Triton conv kernels' paired-tap path (ZAYA1), 3: one tap at a time
def test_gradients_match_autograd_through_the_reference(backend, with_init, k1):
    case = Case(4, 2, 16, 2, k1, [5, 1, 7], seed=3, with_init=with_init)
    with zaya_kernels.use_backend(backend):
        actual = _projection_grads(case, torch.ops.zaya.cca_prepare)
    expected = _projection_grads(case, ref.cca_prepare)
    for name, a, e in zip(GRAD_NAMES, actual, expected):
        assert_close(a, e, reduction=case.reduction() * 13, what=f"{backend} grad {name}")


def test_reference_gradients_pass_gradcheck_in_float64():
    case = Case(2, 1, 4, 2, 2, [3, 1], dtype=torch.float64, seed=2)

    def fn(*inputs):
        return ref.cca_prepare(*inputs, case.positions, case.cu_seqlens, *case.heads())[:3]

    inputs = [t.double().requires_grad_(True) for t in _differentiable(case)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- torch.library integration
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_init", [False, True])
def test_opcheck_prefill(backend, with_init):
    case = Case(2, 1, 16, 2, 2, [3, 2], seed=0, with_init=with_init)
    args = list(case.prefill_args())
    args[0] = args[0].clone().requires_grad_(True)
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.cca_prepare.default, tuple(args))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_decode(backend):
    case = Case(2, 1, 16, 2, 2, [2], seed=0)
    conv_state, value_state = torch.randn(3, case.channels, 2), torch.randn(3, case.value_dim)
    args = (case.qk, case.v_current, case.v_delayed, *case.weights(), case.positions, conv_state, value_state,
            torch.tensor([2, -1], dtype=torch.int32), *case.heads())
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.cca_prepare_decode.default, args)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("triton", torch.float32),
                                            ("triton", torch.float16)])
def test_opcheck_backward(backend, dtype):
    case = Case(2, 1, 16, 2, 2, [3, 2], dtype=dtype, seed=0)
    q, k, v, conv_state, value_state = prefill(case)
    grads = (torch.randn_like(q), None, torch.randn_like(v), torch.randn_like(conv_state), None)
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.cca_prepare_backward.default, (*grads, *case.prefill_args()))
        # Called directly (below autograd, as a compiled graph calls it) it equals autograd through the reference.
        actual = torch.ops.zaya.cca_prepare_backward(*grads, *case.prefill_args())
    assert zaya_kernels.last_backend("cca_prepare_backward") == backend
    inputs = [t.float() for t in _differentiable(case)]
    outputs = ref.cca_prepare(*inputs, case.positions, case.cu_seqlens, *case.heads())
    loss = sum((o * g.float()).sum() for o, g in zip(outputs, grads) if g is not None)
    expected = [torch.zeros_like(t) if g is None else g
                for g, t in zip(torch.autograd.grad(loss, inputs, allow_unused=True), inputs)]
    assert actual[0].abs().max() > 0
    for name, a, e, inp in zip(("qk", "v_current", "v_delayed", "w0", "b0", "w1", "b1", "temp"), actual, expected,
                               case.prefill_args()):
        assert a.dtype == inp.dtype, name
        assert_close(a, e, dtype=dtype, reduction=case.reduction() * 5, what=f"{backend} backward {name}")


def test_triton_backward_outputs_do_not_alias_the_incoming_gradients():
    """fp32: grad_v_current was once returned as a view of grad_v (reshape().float() copies nothing), an alias the
    op's schema does not allow (opcheck's schema check, and wrong results if the caller later changes grad_v)."""
    case = Case(2, 1, 16, 2, 2, [3, 2], seed=0)
    grads = _output_grads_like(case)
    with zaya_kernels.use_backend("triton"):
        torch.library.opcheck(torch.ops.zaya.cca_prepare_backward.default, (*grads, *case.prefill_args()),
                              test_utils=("test_schema",))
        outputs = torch.ops.zaya.cca_prepare_backward(*grads, *case.prefill_args())
    inputs = [t for t in (*grads, *case.prefill_args()) if isinstance(t, torch.Tensor)]
    for i, out in enumerate(outputs):
        for t in inputs:
            assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), f"output {i} aliases an input"


def _output_grads_like(case):
    q, k, v, conv_state, value_state = prefill(case)
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(t.shape, generator=gen) for t in (q, k, v, conv_state, value_state))


def test_torch_compile_fullgraph():
    case = Case(2, 1, 8, 2, 2, [3, 2], seed=0)
    args = case.prefill_args()

    def attention_inputs(qk):
        q, k, v, _, _ = torch.ops.zaya.cca_prepare(qk, *args[1:])
        return q.sum() + k.sum() + v.sum()

    compiled = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(case.qk), attention_inputs(case.qk))


def test_typed_wrappers():
    case = Case(4, 2, 8, 2, 2, [3, 2], seed=0)
    expected = prefill(case)
    actual = zaya_kernels.ops.cca_prepare(*case.prefill_args())
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    conv_state, value_state = torch.zeros(2, case.channels, 2), torch.zeros(2, case.value_dim)
    q, k, v = zaya_kernels.ops.cca_prepare_decode(case.qk[:1], case.v_current[:1], case.v_delayed[:1], *case.weights(),
                                                  case.positions[:1], conv_state, value_state,
                                                  torch.tensor([1], dtype=torch.int32), *case.heads())
    assert torch.equal(q[0], expected[0][0]) and torch.equal(k[0], expected[1][0])


# ---------------------------------------------------------------- bad input
def _bad_prefill(index, value):
    args = list(Case(4, 2, 8, 2, 2, [3, 2], with_init=True).prefill_args())
    args[index] = value(args) if callable(value) else value
    return args


@pytest.mark.parametrize(
    "index, value, exc, message",
    [
        (10, 6, ValueError, r"`qk` has C = 48 channels but \(num_q_heads \+ num_kv_heads\) \* head_dim"),
        (11, 3, ValueError, "must be a multiple of `num_kv_heads`"),
        (0, lambda a: a[0].to(torch.int32), TypeError, "`qk` must have dtype"),
        (0, lambda a: a[0].t().contiguous().t(), ValueError, "`qk` must have a contiguous last dim"),
        (3, torch.zeros(48, 5), ValueError, "`conv0_weight` kernel size must be in 1..4"),
        (5, torch.zeros(48, 8, 2, 1), ValueError, "`conv1_weight` must have 3 dimensions"),
        (7, torch.ones(3), ValueError, "`temperature` must have shape"),
        (1, lambda a: a[1][:, :-1].contiguous(), ValueError, "`v_current` must have shape"),
        (8, lambda a: a[8].float(), TypeError, "`positions` must have dtype"),
        (9, torch.tensor([0, 3, 4], dtype=torch.int32), ValueError, "`cu_seqlens` must start at 0"),
        (9, torch.tensor([0, 3, 5], dtype=torch.int64), TypeError, "`cu_seqlens` must have dtype"),
        (12, 3, ValueError, "`rotary_dim` must be an even int"),
        (13, -1.0, ValueError, "`rope_theta` must be a positive float"),
        (14, lambda a: a[14][:, :, :1].contiguous(), ValueError, "`initial_conv_state` must have shape"),
        (15, lambda a: a[15].to(torch.int32), TypeError, "`initial_value_state` must have dtype"),
        (16, None, ValueError, "has_initial_state missing"),
    ],
)
def test_prefill_bad_input_raises_clear_error(index, value, exc, message):
    args = _bad_prefill(index, value)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.cca_prepare(*args)


def _bad_decode(index, value):
    case = Case(4, 2, 8, 2, 2, [2])
    args = [case.qk, case.v_current, case.v_delayed, *case.weights(), case.positions, torch.zeros(3, 48, 2),
            torch.zeros(3, case.value_dim), torch.tensor([0, -1], dtype=torch.int32), *case.heads()]
    args[index] = value(args) if callable(value) else value
    return args


@pytest.mark.parametrize(
    "index, value, exc, message",
    [
        (9, torch.zeros(3, 48, 2, dtype=torch.int32), TypeError, "`conv_state` must have dtype"),
        (9, torch.zeros(3, 48, 3), ValueError, "`conv_state` must have shape"),
        (10, torch.zeros(2, 8), ValueError, "`value_state` must have shape"),
        (10, torch.zeros(3, 8, dtype=torch.int64), TypeError, "`value_state` must have dtype"),
        (11, torch.tensor([0, 3], dtype=torch.int32), ValueError, "`state_indices` has index 3 but the states have "
                                                                   "only 3 slots"),
        (11, torch.tensor([0], dtype=torch.int32), ValueError, "`state_indices` must have shape"),
        (11, torch.tensor([2, 2], dtype=torch.int32), ValueError, "`state_indices` gives slot 2 to more than one row"),
        (11, torch.tensor([1, 1]), ValueError, "gives slot 1 to more than one row"),
        (12, 6, ValueError, "`qk` has C = 48 channels"),
    ],
)
def test_decode_bad_input_raises_clear_error(index, value, exc, message):
    args = _bad_decode(index, value)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.cca_prepare_decode(*args)


def test_decode_padded_rows_may_share_a_negative_index():
    """Only non-negative state indices must be distinct: every padded row may carry the same -1."""
    args = _bad_decode(11, torch.tensor([-1, -1], dtype=torch.int32))
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend):
            q, k, v = torch.ops.zaya.cca_prepare_decode(*args)
        assert not q.any() and not k.any() and not v.any()


def test_index_values_are_read_by_the_rule_of_the_attention_ops():
    """cca reads index values back under the attention ops' rule (one helper: CPU tensors, or any real tensor with
    ZAYA_KERNELS_CHECK_VALUES=1), and never those of a fake or meta tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zaya_kernels.ops import attention as attention_ops
    from zaya_kernels.ops import cca as cca_ops

    assert cca_ops._values_readable is attention_ops._values_readable
    assert cca_ops._values_readable(torch.zeros(2, dtype=torch.int32))
    assert not cca_ops._values_readable(torch.zeros(2, dtype=torch.int32, device="meta"))
    with FakeTensorMode():
        assert not cca_ops._values_readable(torch.zeros(2, dtype=torch.int32))


@pytest.mark.gpu
def test_gpu_index_values_are_checked_with_check_values(monkeypatch):
    """On GPU tensors the index values are read only with ZAYA_KERNELS_CHECK_VALUES=1 (as the attention ops)."""
    monkeypatch.setenv("ZAYA_KERNELS_CHECK_VALUES", "1")

    def cuda(args):
        return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]

    for index, message in ((torch.tensor([0, 3], dtype=torch.int32), "has index 3 but the states have only 3"),
                           (torch.tensor([2, 2], dtype=torch.int32), "gives slot 2 to more than one row")):
        with zaya_kernels.use_backend("triton"), pytest.raises(ValueError, match=message):
            torch.ops.zaya.cca_prepare_decode(*cuda(_bad_decode(11, index)))
    bad_cu = _bad_prefill(9, torch.tensor([0, 3, 4], dtype=torch.int32))
    with zaya_kernels.use_backend("triton"), pytest.raises(ValueError, match="`cu_seqlens` must start at 0"):
        torch.ops.zaya.cca_prepare(*cuda(bad_cu))


# ---------------------------------------------------------------- paged KV-cache write (cca_prepare_paged, decode)
def _slots(count, pool, gen, skip_every=0, dtype=torch.int64, device="cpu"):
    """`count` distinct random slots out of `pool` (a random permutation: not in token order), every
    `skip_every`-th one -1 (vLLM's padding)."""
    slots = torch.randperm(pool, generator=gen)[:count]
    if skip_every:
        slots[::skip_every] = -1
    return slots.to(dtype).to(device)


def assert_cache_written(k_cache, v_cache, before, slots, k, v, rows_valid=None, what=""):
    """Cache rows at the kept slots equal the returned k / v rows exactly; every other element is unchanged."""
    block_size = k_cache.shape[1]
    expected_k, expected_v = before[0].clone(), before[1].clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0 and (rows_valid is None or bool(rows_valid[t])):
            expected_k[s // block_size, s % block_size] = k[t]
            expected_v[s // block_size, s % block_size] = v[t]
    assert torch.equal(k_cache, expected_k), f"{what}: k cache"
    assert torch.equal(v_cache, expected_v), f"{what}: v cache"


def paged_prefill(case, slots, k_cache, v_cache, backend="reference"):
    args = case.prefill_args()
    with zaya_kernels.use_backend(backend):
        return torch.ops.zaya.cca_prepare_paged(*args[:14], slots, k_cache, v_cache, *args[14:])


@settings(max_examples=25)
@given(heads=head_configs, kernels=kernel_sizes, lengths=seq_lengths, block_size=st.sampled_from([1, 3, 5, 16]),
       layout=st.sampled_from(["nhd", "hnd"]), slot_dtype=st.sampled_from([torch.int32, torch.int64]),
       skip_every=st.sampled_from([0, 2, 3]), with_init=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_paged_prefill_writes_the_cache(heads, kernels, lengths, block_size, layout, slot_dtype, skip_every,
                                                  with_init, seed):
    case = Case(*heads, 8, *kernels, lengths, seed=seed, with_init=with_init)
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    num_blocks = (tokens + 2) // block_size + 2
    k_cache, v_cache = random_paged_caches(num_blocks, block_size, case.num_kv, 8, case.dtype, layout, gen)
    before = (k_cache.clone(), v_cache.clone())
    slots = _slots(tokens, num_blocks * block_size, gen, skip_every, slot_dtype)
    outputs = paged_prefill(case, slots, k_cache, v_cache)
    for name, a, e in zip(("q", "k", "v", "conv state", "value state"), outputs, prefill(case)):
        assert torch.equal(a, e), f"paged prefill {name} differs from cca_prepare"
    assert_cache_written(k_cache, v_cache, before, slots, outputs[1], outputs[2], what="reference prefill")


@settings(max_examples=6)
@given(heads=st.sampled_from([(2, 1), (4, 2), (2, 2)]), kernels=kernel_sizes,
       lengths=st.lists(st.sampled_from([0, 1, 2, 5, 19]), min_size=1, max_size=3),
       block_size=st.sampled_from([1, 3, 16]), layout=st.sampled_from(["nhd", "hnd"]),
       slot_dtype=st.sampled_from([torch.int32, torch.int64]), with_init=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_triton_paged_prefill_matches_reference(heads, kernels, lengths, block_size, layout, slot_dtype, with_init,
                                                dtype, seed):
    case = Case(*heads, 16, *kernels, lengths, dtype=dtype, seed=seed, with_init=with_init)
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    num_blocks = tokens // block_size + 2
    k_cache, v_cache = random_paged_caches(num_blocks, block_size, case.num_kv, 16, dtype, layout, gen)
    before = (k_cache.clone(), v_cache.clone())
    slots = _slots(tokens, num_blocks * block_size, gen, 3, slot_dtype)
    actual = paged_prefill(case, slots, k_cache, v_cache, "triton")
    assert zaya_kernels.last_backend("cca_prepare_paged") == "triton"
    assert_cache_written(k_cache, v_cache, before, slots, actual[1], actual[2], what="triton prefill")
    assert_outputs_close(actual, prefill(case), case, "triton paged prefill")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("block_size,layout,slot_dtype", [(1, "nhd", torch.int64), (3, "hnd", torch.int32),
                                                          (16, "nhd", torch.int32)])
def test_paged_decode_writes_the_cache(backend, block_size, layout, slot_dtype):
    """Rows with a negative state index (padded) and rows with a negative slot write nothing; the others write their
    k / v exactly; the q / k / v outputs and the states are those of the decode without a cache."""
    case = Case(4, 2, 16, 2, 2, [6], seed=block_size)
    gen = torch.Generator().manual_seed(block_size)
    rows = 6
    conv_state = torch.randn(8, case.channels, case.state_len, generator=gen)
    value_state = torch.randn(8, case.value_dim, generator=gen)
    indices = torch.randperm(8, generator=gen)[:rows].to(torch.int32)
    indices[1] = -1  # a padded row (its slot is valid: still no write)
    indices[4] = -3
    num_blocks = max(3, rows // block_size + 2)
    slots = _slots(rows, num_blocks * block_size, gen, 0, slot_dtype)
    slots[3] = -1  # vLLM's padding slot
    k_cache, v_cache = random_paged_caches(num_blocks, block_size, 2, 16, torch.float32, layout, gen)
    before = (k_cache.clone(), v_cache.clone())
    plain_states = (conv_state.clone(), value_state.clone())
    expected = decode(case, torch.arange(rows), *plain_states, indices, backend)
    with zaya_kernels.use_backend(backend):
        actual = torch.ops.zaya.cca_prepare_decode(case.qk, case.v_current, case.v_delayed, *case.weights(),
                                                   case.positions, conv_state, value_state, indices, *case.heads(),
                                                   slots, k_cache, v_cache)
    assert zaya_kernels.last_backend("cca_prepare_decode") == backend
    for name, a, e in zip("qkv", actual, expected):
        assert torch.equal(a, e), f"{backend} decode {name} differs from the decode without a cache"
    assert torch.equal(conv_state, plain_states[0]) and torch.equal(value_state, plain_states[1])
    assert_cache_written(k_cache, v_cache, before, slots, actual[1], actual[2], rows_valid=indices >= 0,
                         what=f"{backend} decode")


def test_triton_paged_decode_skips_out_of_range_slots_on_gpu_style_call():
    """The kernel itself (as on GPU, where values are not checked) skips a slot >= num_blocks * block_size."""
    from zaya_kernels.triton import cca as tri

    case = Case(2, 1, 16, 2, 2, [3], seed=1)
    conv_state, value_state = torch.randn(3, case.channels, 2), torch.randn(3, case.value_dim)
    k_cache, v_cache = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    before = (k_cache.clone(), v_cache.clone())
    slots = torch.tensor([4, 1, 400])
    q, k, v = (torch.empty(3, h, 16) for h in (2, 1, 1))
    tri.cca_prepare_decode(case.qk, case.v_current, case.v_delayed, *case.weights(), case.positions, conv_state,
                           value_state, torch.tensor([0, 1, 2], dtype=torch.int32), *case.heads(), q, k, v,
                           cache=(slots, k_cache, v_cache))
    assert_cache_written(k_cache, v_cache, before, torch.tensor([-1, 1, -1]), k, v, what="out-of-range slots")


def test_reference_paged_decode_token_by_token_fills_the_cache_as_paged_prefill():
    """Serving flow: a prompt prefilled into the cache then continued by decode steps leaves the same cache as the
    whole sequence prefilled (slots of one sequence consecutive within blocks of 4, as vLLM lays them out)."""
    case = Case(4, 2, 8, 2, 2, [7], seed=4)
    block_table = [5, 2]  # the sequence's blocks
    slots = torch.tensor([block_table[t // 4] * 4 + t % 4 for t in range(7)])
    whole_k, whole_v = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    paged_prefill(case, slots, whole_k, whole_v)
    k_cache, v_cache = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    args = list(case.prefill_args())
    for i in (0, 1, 2, 8):
        args[i] = args[i][:3]
    args[9] = torch.tensor([0, 3], dtype=torch.int32)
    _, _, _, conv, value = torch.ops.zaya.cca_prepare_paged(*args[:14], slots[:3], k_cache, v_cache, *args[14:])
    conv_state, value_state = conv.clone(), value.clone()
    for t in range(3, 7):
        zaya_kernels.ops.cca_prepare_decode(case.qk[t:t + 1], case.v_current[t:t + 1], case.v_delayed[t:t + 1],
                                            *case.weights(), case.positions[t:t + 1], conv_state, value_state,
                                            torch.tensor([0]), *case.heads(), slot_mapping=slots[t:t + 1],
                                            k_cache=k_cache, v_cache=v_cache)
    assert_close(k_cache, whole_k, reduction=case.reduction(), what="k cache")
    assert_close(v_cache, whole_v, what="v cache")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_paged(backend):
    case = Case(2, 1, 16, 2, 2, [3, 2], seed=0, with_init=True)
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = random_paged_caches(3, 2, 1, 16, torch.float32, "hnd", gen)
    args = case.prefill_args()
    paged_args = (*args[:14], torch.tensor([5, 0, -1, 2, 3]), k_cache, v_cache, *args[14:])
    decode_args = (case.qk[:2], case.v_current[:2], case.v_delayed[:2], *case.weights(), case.positions[:2],
                   torch.randn(3, case.channels, 2), torch.randn(3, case.value_dim),
                   torch.tensor([2, -1], dtype=torch.int32), *case.heads(), torch.tensor([1, 4], dtype=torch.int32),
                   k_cache, v_cache)
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.cca_prepare_paged.default, paged_args)
        torch.library.opcheck(torch.ops.zaya.cca_prepare_decode.default, decode_args)


def test_typed_wrapper_routes_a_cache_to_the_paged_op():
    case = Case(4, 2, 8, 2, 2, [3, 2], seed=0)
    k_cache, v_cache = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    slots = torch.tensor([7, 6, 5, 0, 1])
    q, k, v, _, _ = zaya_kernels.ops.cca_prepare(*case.prefill_args(), slot_mapping=slots, k_cache=k_cache,
                                                 v_cache=v_cache)
    assert zaya_kernels.last_backend("cca_prepare_paged") == "reference"
    assert torch.equal(k_cache[1, 3], k[0]) and torch.equal(v_cache[0, 1], v[4])
    with pytest.raises(ValueError, match="slot_mapping, k_cache given but v_cache missing"):
        zaya_kernels.ops.cca_prepare(*case.prefill_args(), slot_mapping=slots, k_cache=k_cache)


def test_paged_ops_compile_fullgraph():
    """The fake kernels and the mutable cache arguments (optional ones for decode) under torch.compile
    (functionalised, then written back)."""
    case = Case(2, 1, 8, 2, 2, [3, 2], seed=0)
    args = case.prefill_args()
    slots = torch.tensor([3, 0, 1, -1, 6])

    def step(qk, k_cache, v_cache):
        q, k, v, _, _ = torch.ops.zaya.cca_prepare_paged(qk, *args[1:14], slots, k_cache, v_cache, *args[14:])
        return q.sum()

    caches = [torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8)]
    expected_caches = [torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(case.qk, *caches), step(case.qk, *expected_caches))
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    assert caches[0].abs().sum() > 0

    def decode_step(qk, conv_state, value_state, k_cache, v_cache):
        q, k, v = torch.ops.zaya.cca_prepare_decode(qk, *args[1:9], conv_state, value_state,
                                                    torch.tensor([1, -1, 0, 2, 3]), *case.heads(), slots, k_cache,
                                                    v_cache)
        return k.sum()

    inputs = [torch.randn(4, case.channels, 2), torch.randn(4, case.value_dim), *caches]
    expected_inputs = [t.clone() for t in inputs]
    compiled = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(case.qk, *inputs), decode_step(case.qk, *expected_inputs))
    for a, e in zip(inputs, expected_inputs):
        assert torch.equal(a, e)


def _bad_cache_args(index, value):
    """cca_prepare_paged arguments with argument `index` replaced (14 slot_mapping, 15 k_cache, 16 v_cache)."""
    case = Case(4, 2, 8, 2, 2, [3, 2])
    args = list(case.prefill_args())
    args = args[:14] + [torch.tensor([0, 1, 2, 9, -1]), torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)] + args[14:]
    args[index] = value(args) if callable(value) else value
    return args


@pytest.mark.parametrize(
    "index, value, exc, message",
    [
        (14, torch.tensor([0, 1, 2, 3]), ValueError, r"`slot_mapping` must have one slot per token \(shape \(5,\)\)"),
        (14, torch.tensor([0, 1, 2, 3, 4.0]), TypeError, "`slot_mapping` must have dtype"),
        (14, torch.tensor([0, 1, 2, 12, -1]), ValueError, "`slot_mapping` has slot 12 but the cache holds only "
                                                          r"num_blocks \* block_size = 3 \* 4 = 12 slots"),
        (14, torch.tensor([0, 1, 2, 1, -1]), ValueError, "maps two tokens to one cache slot"),
        (15, torch.zeros(3, 4, 2, 8, dtype=torch.float16), TypeError, "`k_cache` must have qk's dtype float32"),
        (15, torch.zeros(3, 4, 1, 8), ValueError, r"`k_cache` must have shape \[num_blocks, block_size, "
                                                  r"num_kv_heads, head_dim\] = \[3, 4, 2, 8\]"),
        (15, torch.zeros(3, 4, 8), ValueError, "`k_cache` must have 4 dimensions"),
        (15, torch.zeros(3, 4, 2, 16)[..., ::2], ValueError, "`k_cache` must have a contiguous last dim"),
        (16, torch.zeros(3, 2, 2, 8), ValueError, r"`v_cache` must have shape \(3, 4, 2, 8\)"),
        (16, lambda a: a[15], ValueError, "`k_cache` and `v_cache` are the same memory"),
        (16, torch.zeros(3, 4, 2, 8, device="meta"), ValueError, "`v_cache` is on meta"),
    ],
)
def test_paged_bad_input_raises_clear_error(index, value, exc, message):
    args = _bad_cache_args(index, value)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.cca_prepare_paged(*args)


@pytest.mark.parametrize(
    "index, value, exc, message",
    [
        (18, None, ValueError, "slot_mapping, k_cache given but v_cache missing"),
        (17, None, ValueError, "slot_mapping, v_cache given but k_cache missing"),
        (16, None, ValueError, "k_cache, v_cache given but slot_mapping missing"),
        (16, torch.tensor([0]), ValueError, r"`slot_mapping` must have one slot per row \(shape \(2,\)\)"),
        (16, torch.tensor([12, 0]), ValueError, "`slot_mapping` has slot 12"),  # row 1 is padded: not checked
        (17, torch.zeros(3, 4, 2, 4), ValueError, "`k_cache` must have shape"),
    ],
)
def test_paged_decode_bad_input_raises_clear_error(index, value, exc, message):
    """Decode arguments 16-18: slot_mapping, k_cache, v_cache."""
    args = _bad_decode(0, lambda a: a[0]) + [torch.tensor([0, 5]), torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)]
    args[index] = value
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.cca_prepare_decode(*args)


# ---------------------------------------------------------------- GPU: Triton at ZAYA1-8B shapes (n_q 8, n_kv 2, D 128)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lengths,with_init", [([1], False), ([3, 0, 700, 64], True), ([2048], False)])
def test_gpu_triton_prefill_matches_reference(dtype, lengths, with_init):
    case = Case(8, 2, 128, 2, 2, lengths, dtype=dtype, seed=len(lengths), rotary_dim=64, with_init=with_init,
                device="cuda")
    actual = prefill(case, "triton")
    assert_outputs_close(actual, prefill(case), case, "gpu triton prefill")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32)])
@pytest.mark.parametrize("rows", [1, 8, 256])
def test_gpu_triton_decode_matches_reference(dtype, state_dtype, rows):
    case = Case(8, 2, 128, 2, 2, [rows], dtype=dtype, seed=rows, rotary_dim=64, device="cuda")
    slots = rows + 4
    conv_state = torch.randn(slots, case.channels, 2, device="cuda").to(state_dtype)
    value_state = torch.randn(slots, case.value_dim, device="cuda").to(state_dtype)
    indices = torch.randperm(slots, device="cuda")[:rows].to(torch.int32)
    indices[rows // 2] = -1
    expected_states = (conv_state.clone(), value_state.clone())
    expected = decode(case, torch.arange(rows, device="cuda"), *expected_states, indices)
    actual = decode(case, torch.arange(rows, device="cuda"), conv_state, value_state, indices, "triton")
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, dtype=dtype, reduction=case.reduction(), what=f"gpu decode {name}")
    assert torch.equal(conv_state, expected_states[0]) and torch.equal(value_state, expected_states[1])


@pytest.mark.gpu
def test_gpu_decode_equals_prefill_and_is_graph_capturable():
    case = Case(8, 2, 128, 2, 2, [5, 3], dtype=torch.bfloat16, seed=0, rotary_dim=64, device="cuda")
    expected = prefill(case, "triton")
    actual = _decode_token_by_token(case, "triton")
    assert_outputs_close(actual, expected, case, "gpu decode vs prefill")
    conv_state = torch.zeros(4, case.channels, 2, device="cuda")
    value_state = torch.zeros(4, case.value_dim, device="cuda")
    rows, indices = torch.tensor([0, 5], device="cuda"), torch.tensor([1, 2], dtype=torch.int32, device="cuda")
    conv_state.normal_()
    value_state.normal_()
    rows = torch.tensor([0, 5, 2], device="cuda")
    indices = torch.tensor([1, -1, 2], dtype=torch.int32, device="cuda")  # row 1 padded
    states = (conv_state.clone(), value_state.clone())
    expected_states = (conv_state.clone(), value_state.clone())
    expected = decode(case, rows, *expected_states, indices)  # the reference, on the same slots
    decode(case, rows, conv_state, value_state, indices, "triton")  # warm up (compile) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode(case, rows, conv_state, value_state, indices, "triton")
    conv_state.copy_(states[0])  # the warm-up advanced the slots: replay from the same states as the reference
    value_state.copy_(states[1])
    graph.replay()
    torch.cuda.synchronize()
    for name, a, e in zip("qkv", out, expected):
        assert_close(a, e, dtype=torch.bfloat16, reduction=case.reduction(), what=f"graph replay {name}")
    assert not out[0][1].any() and not out[1][1].any() and not out[2][1].any(), "padded row"
    assert_close(conv_state, expected_states[0], what="graph replay conv state")
    assert_close(value_state, expected_states[1], what="graph replay value state")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size,layout", [(16, "nhd"), (1, "hnd")])
def test_gpu_triton_paged_prefill_and_decode_write_the_cache(dtype, block_size, layout):
    """ZAYA1-8B shapes: chunked paged prefill (initial states) then a decode step with a cache, on CUDA tensors:
    outputs as the reference, cache rows equal the returned k / v exactly, nothing else touched; the decode launch
    graph-captured."""
    case = Case(8, 2, 128, 2, 2, [3, 0, 300, 64], dtype=dtype, seed=block_size, rotary_dim=64, with_init=True,
                device="cuda")
    gen = torch.Generator().manual_seed(block_size)
    tokens = sum(case.lengths)
    num_blocks = tokens // block_size + 4
    k_cache, v_cache = random_paged_caches(num_blocks, block_size, 2, 128, dtype, layout, gen, device="cuda")
    before = (k_cache.clone(), v_cache.clone())
    slots = _slots(tokens, num_blocks * block_size, gen, 7, device="cuda")
    actual = paged_prefill(case, slots, k_cache, v_cache, "triton")
    assert_outputs_close(actual, prefill(case), case, "gpu triton paged prefill")
    assert_cache_written(k_cache, v_cache, before, slots, actual[1], actual[2], what="gpu triton paged prefill")

    rows = 4
    conv_state = torch.randn(6, case.channels, 2, device="cuda")
    value_state = torch.randn(6, case.value_dim, device="cuda")
    indices = torch.tensor([4, -1, 0, 2], dtype=torch.int32, device="cuda")
    step_slots = torch.tensor([num_blocks * block_size - 1, 0, -1, 1], device="cuda")
    before = (k_cache.clone(), v_cache.clone())
    states = (conv_state.clone(), value_state.clone())
    expected = decode(case, torch.arange(rows, device="cuda"), states[0].clone(), states[1].clone(), indices)
    out = None
    for replay in (False, True):
        k_cache.copy_(before[0])
        v_cache.copy_(before[1])
        conv_state.copy_(states[0])
        value_state.copy_(states[1])
        args = (case.qk[:rows], case.v_current[:rows], case.v_delayed[:rows], *case.weights(), case.positions[:rows],
                conv_state, value_state, indices, *case.heads(), step_slots, k_cache, v_cache)
        with zaya_kernels.use_backend("triton"):
            if replay:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = torch.ops.zaya.cca_prepare_decode(*args)
                k_cache.copy_(before[0])
                v_cache.copy_(before[1])
                conv_state.copy_(states[0])
                value_state.copy_(states[1])
                graph.replay()
                torch.cuda.synchronize()
            else:
                out = torch.ops.zaya.cca_prepare_decode(*args)
        for name, a, e in zip("qkv", out, expected):
            assert_close(a, e, dtype=dtype, reduction=case.reduction(), what=f"gpu triton paged decode {name}")
        assert_cache_written(k_cache, v_cache, before, step_slots, out[1], out[2], rows_valid=indices >= 0,
                             what=f"gpu triton paged decode (graph replay: {replay})")


# ---------------------------------------------------------------- row-strided projection inputs (no copies)
# zaya_kernels.modules.cca_projections runs one GEMM over the stacked q / k / v_current / v_delayed weights and passes
# the three column slices of its [T, C + 2 Vh] output as they are: qk, v_current and v_delayed are row-strided views
# (last dim contiguous, row stride >= width). Every op reads them with their row strides; each test compares against
# the reference on contiguous copies. The padding columns are NaN: a kernel that read them would show it.
def _strided_args(case, pad):
    args = list(case.prefill_args())
    args[:3] = stacked_row_views((case.qk, case.v_current, case.v_delayed), pad)
    if args[0].shape[0] > 1:
        assert not any(t.is_contiguous() for t in args[:3])
    return args


strided_pads = st.sampled_from([0, 1, 3, 16])


@settings(max_examples=8, deadline=None)
@given(heads=st.sampled_from([(2, 1), (4, 2), (8, 2)]), kernels=kernel_sizes,
       lengths=st.lists(st.sampled_from([0, 1, 2, 5, 17]), min_size=1, max_size=3), pad=strided_pads,
       with_init=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
@example(heads=(8, 2), kernels=(2, 2), lengths=[2, 17, 1], pad=0, with_init=True, dtype=torch.float32, seed=1)
@example(heads=(4, 2), kernels=(4, 4), lengths=[1], pad=3, with_init=True, dtype=torch.float16, seed=2)  # T = 1
@example(heads=(2, 1), kernels=(2, 2), lengths=[0], pad=1, with_init=False, dtype=torch.float32, seed=3)  # T = 0
def test_strided_inputs_prefill_matches_reference(heads, kernels, lengths, pad, with_init, dtype, seed):
    """cca_prepare on row-strided qk / v_current / v_delayed (packed varlen, with initial states) equals the
    reference on contiguous copies, outputs and final states; the reference takes the views too."""
    case = Case(*heads, 16, *kernels, lengths, dtype=dtype, seed=seed, with_init=with_init)
    expected = prefill(case)
    args = _strided_args(case, pad)
    for backend in ("reference", "triton"):
        actual = prefill(case, backend, args)
        assert zaya_kernels.last_backend("cca_prepare") == backend
        assert_outputs_close(actual, expected, case, f"{backend} prefill, strided inputs")


@settings(max_examples=8, deadline=None)
@given(heads=st.sampled_from([(2, 1), (4, 2), (8, 2)]), kernels=kernel_sizes, rows=st.integers(0, 5),
       pad=strided_pads, state_dtype=st.sampled_from([torch.float32, torch.float16]),
       dtype=st.sampled_from([torch.float32, torch.float16]), with_cache=st.booleans(), seed=st.integers(0, 2**16))
@example(heads=(8, 2), kernels=(2, 2), rows=4, pad=0, state_dtype=torch.float32, dtype=torch.float32,
         with_cache=True, seed=1)
@example(heads=(4, 2), kernels=(4, 4), rows=1, pad=3, state_dtype=torch.float16, dtype=torch.float16,
         with_cache=False, seed=2)
@example(heads=(2, 1), kernels=(2, 2), rows=0, pad=1, state_dtype=torch.float32, dtype=torch.float32,
         with_cache=True, seed=3)
def test_strided_inputs_decode_matches_reference(heads, kernels, rows, pad, state_dtype, dtype, with_cache, seed):
    """cca_prepare_decode on row-strided inputs (a padded row, state pools, optionally the paged k / v write) gives
    the reference's outputs, state updates and cache writes on contiguous copies."""
    case = Case(*heads, 16, *kernels, [rows], dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    slots = rows + 3
    conv_state = torch.randn(slots, case.channels, case.state_len, generator=gen).to(state_dtype)
    value_state = torch.randn(slots, case.value_dim, generator=gen).to(state_dtype)
    indices = torch.randperm(slots, generator=gen)[:rows].to(torch.int32)
    if rows > 1:
        indices[1] = -1  # a padded row
    cache_args, caches = (), None
    if with_cache:
        num_blocks, block_size = rows + 2, 3
        caches = random_paged_caches(num_blocks, block_size, case.num_kv, 16, dtype, "hnd", gen)
        cache_slots = _slots(rows, num_blocks * block_size, gen)
        expected_caches = tuple(c.clone() for c in caches)
    expected_states = (conv_state.clone(), value_state.clone())
    if with_cache:
        cache_args = (cache_slots, *expected_caches)
    with zaya_kernels.use_backend("reference"):
        expected = torch.ops.zaya.cca_prepare_decode(case.qk, case.v_current, case.v_delayed, *case.weights(),
                                                     case.positions, *expected_states, indices, *case.heads(),
                                                     *cache_args)
    views = stacked_row_views((case.qk, case.v_current, case.v_delayed), pad)
    for backend in ("reference", "triton"):
        states = (conv_state.clone(), value_state.clone())
        cache_args = (cache_slots, *(c.clone() for c in caches)) if with_cache else ()
        with zaya_kernels.use_backend(backend):
            actual = torch.ops.zaya.cca_prepare_decode(*views, *case.weights(), case.positions, *states, indices,
                                                       *case.heads(), *cache_args)
        assert zaya_kernels.last_backend("cca_prepare_decode") == backend
        for name, a, e in zip("qkv", actual, expected):
            assert_close(a, e, dtype=dtype, reduction=case.reduction(), what=f"{backend} strided decode {name}")
        for name, a, e in zip(("conv state", "value state"), states, expected_states):
            assert_close(a, e, dtype=state_dtype, what=f"{backend} strided decode {name}")
        if with_cache:
            for name, a, e in zip(("k cache", "v cache"), cache_args[1:], expected_caches):
                assert_close(a, e, dtype=dtype, reduction=case.reduction(), what=f"{backend} strided decode {name}")


@settings(max_examples=6, deadline=None)
@given(heads=st.sampled_from([(2, 1), (4, 2), (8, 2)]), kernels=kernel_sizes,
       lengths=st.lists(st.sampled_from([0, 1, 3, 17]), min_size=1, max_size=3), pad=strided_pads,
       with_init=st.booleans(), seed=st.integers(0, 2**16))
@example(heads=(8, 2), kernels=(2, 2), lengths=[3, 17], pad=0, with_init=True, seed=1)
def test_strided_inputs_paged_prefill_matches_reference(heads, kernels, lengths, pad, with_init, seed):
    """cca_prepare_paged on row-strided inputs: outputs, final states and the k / v cache writes equal the
    reference's on contiguous copies."""
    case = Case(*heads, 16, *kernels, lengths, seed=seed, with_init=with_init)
    gen = torch.Generator().manual_seed(seed)
    tokens, block_size = sum(lengths), 4
    num_blocks = tokens // block_size + 2
    caches = random_paged_caches(num_blocks, block_size, case.num_kv, 16, torch.float32, "nhd", gen)
    slots = _slots(tokens, num_blocks * block_size, gen, skip_every=3)
    expected_caches = tuple(c.clone() for c in caches)
    expected = paged_prefill(case, slots, *expected_caches)
    args = _strided_args(case, pad)
    for backend in ("reference", "triton"):
        k_cache, v_cache = (c.clone() for c in caches)
        with zaya_kernels.use_backend(backend):
            actual = torch.ops.zaya.cca_prepare_paged(*args[:14], slots, k_cache, v_cache, *args[14:])
        assert zaya_kernels.last_backend("cca_prepare_paged") == backend
        assert_outputs_close(actual, expected, case, f"{backend} paged prefill, strided inputs")
        for name, a, e in zip(("k cache", "v cache"), (k_cache, v_cache), expected_caches):
            assert_close(a, e, reduction=case.reduction(), what=f"{backend} strided paged prefill {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("lengths,pad", [([5, 1, 7], 0), ([4, 0, 9], 3), ([1], 2)])
def test_strided_inputs_gradients_match_the_reference(backend, lengths, pad):
    """The gradients reaching row-strided qk / v_current / v_delayed (slices of one leaf buffer, as the stacked
    projection's output) equal the reference's for contiguous inputs; the padding columns get none."""
    case = Case(4, 2, 16, 2, 3, lengths, seed=5, with_init=True)
    gen = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**31, (1,), generator=gen).item()

    def loss_of(outputs):
        g = torch.Generator().manual_seed(seeds)
        return sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outputs)

    leaves = [t.detach().clone().requires_grad_(True) for t in (case.qk, case.v_current, case.v_delayed)]
    expected = torch.autograd.grad(loss_of(ref.cca_prepare(*leaves, *case.prefill_args()[3:])), leaves)
    width = case.channels + 2 * case.value_dim
    buf = torch.cat([case.qk, case.v_current, case.v_delayed, torch.zeros(case.qk.shape[0], pad)], dim=1)
    buf.requires_grad_(True)
    views = buf[:, :width].split([case.channels, case.value_dim, case.value_dim], dim=-1)
    with zaya_kernels.use_backend(backend):
        outputs = torch.ops.zaya.cca_prepare(*views, *case.prefill_args()[3:])
    (grad,) = torch.autograd.grad(loss_of(outputs), buf)
    actual = grad[:, :width].split([case.channels, case.value_dim, case.value_dim], dim=-1)
    for name, a, e in zip(("qk", "v_current", "v_delayed"), actual, expected):
        assert_close(a, e, reduction=case.reduction() * 13, what=f"{backend} strided grad {name}")
    assert torch.equal(grad[:, width:], torch.zeros_like(grad[:, width:]))


@pytest.mark.parametrize("name,index", [("qk", 0), ("v_current", 1), ("v_delayed", 2)])
@pytest.mark.parametrize("layout", ["overlapping rows", "strided last dim"])
def test_strided_inputs_bad_layouts_raise_clear_errors(name, index, layout):
    """Rows that overlap (row stride < width) or a last dim that is not contiguous are refused, naming the
    argument, for every op and backend (what the kernels' row-stride addressing cannot read)."""
    case = Case(4, 2, 8, 2, 2, [3, 2], with_init=True)
    t = case.prefill_args()[index]
    rows, width = t.shape
    if layout == "overlapping rows":
        bad = torch.as_strided(torch.randn(rows * width), (rows, width), (width - 1, 1))
    else:
        bad = torch.randn(rows, width, 2)[..., 0]
    message = rf"`{name}` must have a contiguous last dim \(stride 1\) and a row stride >= its width"
    args = list(case.prefill_args())
    args[index] = bad
    conv_state, value_state = torch.zeros(6, case.channels, case.state_len), torch.zeros(6, case.value_dim)
    decode_args = (*args[:9], conv_state, value_state, torch.arange(5, dtype=torch.int32), *case.heads())
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend):
            with pytest.raises(ValueError, match=message):
                torch.ops.zaya.cca_prepare(*args)
            with pytest.raises(ValueError, match=message):
                torch.ops.zaya.cca_prepare_decode(*decode_args)
