"""The HIP/CUDA CCA decode kernel (kernels/cca.cuh via csrc/cca.cu, backend "hip" of zaya::cca_prepare_decode).

On CPU machines the kernel runs through compat.cuh's host emulation (one std::thread per GPU thread, in warps of
32 threads as on NVIDIA and of 64 as on AMD's gfx942 / gfx950) against zaya_kernels.reference.cca: hypothesis-drawn shapes, several decode steps so the states carry, padded rows,
then decode token by token against the reference prefill. On a GPU the op itself runs with backend "hip".
"""
from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zaya_kernels
from zaya_kernels.reference import cca as ref

from helpers import (EMULATED_WARP_SIZES, assert_close, compile_host_emulation, random_paged_caches,
                     stacked_row_views)

THETA = 10_000.0
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_EMU_DRIVER = r"""
#define ZAYA_HOST_EMULATION 1
#include <type_traits>
#include "cca.cuh"
using namespace zaya::kernels;
using zaya::dev::bf16_t;
using zaya::dev::half_t;

// The paged KV cache (cca.cuh's kWriteCache instantiation when slot_mapping is not null).
struct EmuCache {
  const void* slot_mapping;
  void* k_cache;
  void* v_cache;
  const long long* strides;  // k: block, slot, head; v: block, slot, head (elements)
  long long num_cache_slots;
  int block_size, slot64;
};

template <typename TA, typename TW, typename TS>
static void run(const void* qk, const void* vc, const void* vd, const void* w0, const void* b0, const void* w1,
                const void* b1, const void* temp, const void* pos, const float* inv_freq, void* conv_state,
                void* value_state, const void* idx, void* q, void* k, void* v, int B, int slots, int nq, int nkv,
                int D, int k0, int k1, int rot, int pos64, int idx64, int threads, const long long* row_strides,
                const EmuCache& ec) {
  const int tiles = (B + kCcaRows - 1) / kCcaRows;
  CcaPagedCache<TA> cache;
  if (ec.slot_mapping != nullptr) {
    cache.slot_mapping = ec.slot_mapping;
    cache.k_cache = (TA*)ec.k_cache;
    cache.v_cache = (TA*)ec.v_cache;
    cache.k_stride_block = ec.strides[0], cache.k_stride_slot = ec.strides[1], cache.k_stride_head = ec.strides[2];
    cache.v_stride_block = ec.strides[3], cache.v_stride_slot = ec.strides[4], cache.v_stride_head = ec.strides[5];
    cache.num_cache_slots = ec.num_cache_slots;
    cache.block_size = ec.block_size;
    cache.slot_int64 = ec.slot64;
  }
  auto launch = [&](auto paged) {
    zaya_emu_launch((nq + nkv) * tiles, threads, [&] {
      cca_prepare_decode_kernel<TA, TW, TS, decltype(paged)::value>((const TA*)qk, (const TA*)vc, (const TA*)vd,
          (const TW*)w0, (const TW*)b0, (const TW*)w1, (const TW*)b1, (const TW*)temp, pos, inv_freq,
          (TS*)conv_state, (TS*)value_state, idx, (TA*)q, (TA*)k, (TA*)v, B, slots, nq, nkv, D, k0, k1, rot, pos64,
          idx64, (int)row_strides[0], (int)row_strides[1], (int)row_strides[2], cache); });
  };
  if (ec.slot_mapping != nullptr) launch(std::true_type{});
  else launch(std::false_type{});
}

// dt: activation dtype code (0 fp32, 1 fp16, 2 bf16); wf / sf: weights / states in fp32 (1) or in the activation
// dtype (0). row_strides: the row strides of qk, v_current, v_delayed. slot_mapping null: no cache (the kernel
// without kWriteCache).
extern "C" int zaya_emu_cca_decode(int dt, int wf, int sf, const void* qk, const void* vc, const void* vd,
    const void* w0, const void* b0, const void* w1, const void* b1, const void* temp, const void* pos,
    const float* inv_freq, void* conv_state, void* value_state, const void* idx, void* q, void* k, void* v, int B,
    int slots, int nq, int nkv, int D, int k0, int k1, int rot, int pos64, int idx64, int threads,
    const long long* row_strides, const void* slot_mapping, void* k_cache, void* v_cache,
    const long long* cache_strides, long long num_cache_slots, int block_size, int slot64) {
  const EmuCache ec{slot_mapping, k_cache, v_cache, cache_strides, num_cache_slots, block_size, slot64};
#define ZAYA_EMU_RUN(TA, TW, TS) run<TA, TW, TS>(qk, vc, vd, w0, b0, w1, b1, temp, pos, inv_freq, conv_state, \
    value_state, idx, q, k, v, B, slots, nq, nkv, D, k0, k1, rot, pos64, idx64, threads, row_strides, ec)
  if (dt == 0) { ZAYA_EMU_RUN(float, float, float); return 0; }
  if (dt == 1) {
    if (wf && sf) ZAYA_EMU_RUN(half_t, float, float);
    else if (wf) ZAYA_EMU_RUN(half_t, float, half_t);
    else if (sf) ZAYA_EMU_RUN(half_t, half_t, float);
    else ZAYA_EMU_RUN(half_t, half_t, half_t);
    return 0;
  }
  if (dt == 2) {
    if (wf && sf) ZAYA_EMU_RUN(bf16_t, float, float);
    else if (wf) ZAYA_EMU_RUN(bf16_t, float, bf16_t);
    else if (sf) ZAYA_EMU_RUN(bf16_t, bf16_t, float);
    else ZAYA_EMU_RUN(bf16_t, bf16_t, bf16_t);
    return 0;
  }
  return 1;
#undef ZAYA_EMU_RUN
}
"""


@pytest.fixture(scope="module", params=EMULATED_WARP_SIZES, ids=lambda w: f"warp{w}")
def cca_emulation(request, tmp_path_factory):
    return compile_host_emulation(_EMU_DRIVER, tmp_path_factory.mktemp(f"cca_emu{request.param}"), request.param)


class Weights:
    """Random CCA weights (non-zero biases and temperatures), in `dtype`."""

    def __init__(self, num_q, num_kv, head_dim, k0, k1, rotary_dim, dtype=torch.float32, seed=0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.num_q, self.num_kv, self.head_dim, self.k0, self.k1 = num_q, num_kv, head_dim, k0, k1
        self.rotary_dim = rotary_dim
        self.channels = (num_q + num_kv) * head_dim
        self.state_len = k0 + k1 - 2
        self.value_dim = num_kv * head_dim // 2
        self.gen, self.device = gen, device

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

        self.conv0_weight = rand(self.channels, k0, scale=0.5)
        self.conv0_bias = rand(self.channels, scale=0.5)
        self.conv1_weight = rand(self.channels, head_dim, k1, scale=head_dim**-0.5)
        self.conv1_bias = rand(self.channels, scale=0.5)
        self.temperature = (torch.randn(num_kv, generator=gen) + 1.0).to(dtype).to(device)

    def tuple(self):
        return (self.conv0_weight, self.conv0_bias, self.conv1_weight, self.conv1_bias, self.temperature)

    def heads(self):
        return (self.num_q, self.num_kv, self.rotary_dim, THETA)

    def tokens(self, rows, dtype):
        """qk [rows, C], v_current, v_delayed [rows, Vh] in the activation dtype."""
        def rand(*shape):
            return torch.randn(*shape, generator=self.gen).to(dtype).to(self.device)

        return rand(rows, self.channels), rand(rows, self.value_dim), rand(rows, self.value_dim)

    def reduction(self):
        return self.k0 * self.k1 * self.head_dim


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _row_strides(qk, v_current, v_delayed):
    """The driver's row strides of the three row-strided inputs (csrc/cca.cu passes qk.stride(0) etc.)."""
    return (ctypes.c_longlong * 3)(qk.stride(0), v_current.stride(0), v_delayed.stride(0))


def _cache_args(cache):
    """The driver's trailing paged-cache arguments for cache = (slot_mapping, k_cache, v_cache) or None."""
    if cache is None:
        return (None, None, None, None, ctypes.c_longlong(0), 0, 0)
    slot_mapping, k_cache, v_cache = cache
    strides = (ctypes.c_longlong * 6)(*k_cache.stride()[:3], *v_cache.stride()[:3])
    return (_ptr(slot_mapping), _ptr(k_cache), _ptr(v_cache), strides,
            ctypes.c_longlong(k_cache.shape[0] * k_cache.shape[1]), k_cache.shape[1],
            int(slot_mapping.dtype == torch.int64))


def emulated_decode(lib, w, qk, v_current, v_delayed, positions, conv_state, value_state, state_indices,
                    threads=256, cache=None):
    """One decode step through the emulated kernel; updates the states (and the paged caches of
    cache = (slot_mapping, k_cache, v_cache)) in place, returns (q, k, v)."""
    rows = qk.shape[0]
    act = qk.dtype
    q = torch.full((rows, w.num_q, w.head_dim), 7.0, dtype=act)  # garbage: the kernel must write every element
    k = torch.full((rows, w.num_kv, w.head_dim), 7.0, dtype=act)
    v = torch.full((rows, w.num_kv, w.head_dim), 7.0, dtype=act)
    inv_freq = ref.rope_inv_freq(w.rotary_dim, THETA) if w.rotary_dim else torch.zeros(1)
    weights = w.tuple()
    assert len({t.dtype for t in weights}) == 1 and weights[0].dtype in (torch.float32, act)
    assert conv_state.dtype == value_state.dtype and conv_state.dtype in (torch.float32, act)
    rc = lib.zaya_emu_cca_decode(
        _DTYPE_CODES[act], int(weights[0].dtype == torch.float32), int(conv_state.dtype == torch.float32),
        _ptr(qk), _ptr(v_current), _ptr(v_delayed), *[_ptr(t) for t in weights], _ptr(positions), _ptr(inv_freq),
        _ptr(conv_state), _ptr(value_state), _ptr(state_indices), _ptr(q), _ptr(k), _ptr(v), rows,
        conv_state.shape[0], w.num_q, w.num_kv, w.head_dim, w.k0, w.k1, w.rotary_dim,
        int(positions.dtype == torch.int64), int(state_indices.dtype == torch.int64), threads,
        _row_strides(qk, v_current, v_delayed), *_cache_args(cache))
    assert rc == 0
    return q, k, v


# ---------------------------------------------------------------- host emulation against the reference
@settings(max_examples=14)
@given(heads=st.sampled_from([(2, 2), (4, 2), (4, 1), (2, 1), (8, 2)]), head_dim=st.sampled_from([16, 32]),
       kernels=st.tuples(st.integers(1, 4), st.integers(1, 4)), rotary=st.sampled_from(["zero", "half", "full"]),
       rows=st.integers(1, 10), act=st.sampled_from([torch.float32, torch.float16]),
       weights_fp32=st.booleans(), index_int64=st.booleans(), seed=st.integers(0, 2**16))
def test_emulated_decode_steps_match_reference(cca_emulation, heads, head_dim, kernels, rotary, rows, act,
                                               weights_fp32, index_int64, seed):
    """Three decode steps with random states, padded rows (negative and out-of-range indices) and rows in a
    permuted slot order; outputs and the states after every step against the reference."""
    rotary_dim = {"zero": 0, "half": head_dim // 2, "full": head_dim}[rotary]
    wdt = torch.float32 if (weights_fp32 or act == torch.float32) else act
    w = Weights(*heads, head_dim, *kernels, rotary_dim, dtype=wdt, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    slots = rows + 2
    conv_state = torch.randn(slots, w.channels, w.state_len, generator=gen)
    value_state = torch.randn(slots, w.value_dim, generator=gen)
    expected_states = (conv_state.clone(), value_state.clone())
    index_dtype = torch.int64 if index_int64 else torch.int32
    for step in range(3):
        indices = torch.randperm(slots, generator=gen)[:rows].to(index_dtype)
        if rows > 1:
            indices[step % rows] = -1 - step  # a padded row
        if rows > 2 and step == 1:
            indices[(step + 1) % rows] = slots + 3  # out of range: the GPU kernel treats it as padding
        qk, v_current, v_delayed = w.tokens(rows, act)
        positions = torch.randint(0, 5000, (rows,), generator=gen, dtype=torch.int64 if step % 2 else torch.int32)
        actual = emulated_decode(cca_emulation, w, qk, v_current, v_delayed, positions, conv_state, value_state,
                                 indices)
        ref_indices = torch.where(indices >= slots, -1, indices)  # the reference rejects them; same meaning
        expected = ref.cca_prepare_decode(qk, v_current, v_delayed, *w.tuple(), positions, *expected_states,
                                          ref_indices, *w.heads())
        for name, a, e in zip("qkv", actual, expected):
            assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"step {step} {name}")
        padded = ref_indices < 0
        for a in actual:
            assert not a[padded].any(), "padded rows must have zero outputs"
        assert torch.equal(conv_state, expected_states[0]), f"step {step}: conv state"
        assert torch.equal(value_state, expected_states[1]), f"step {step}: value state"


def _slot_states(w, state_dtype, rows, gen, padded=(), slots=14):
    """Random conv / value states of `slots` slots and `rows` distinct random state indices, -1 at `padded` rows."""
    conv_state = torch.randn(slots, w.channels, w.state_len, generator=gen).to(state_dtype)
    value_state = torch.randn(slots, w.value_dim, generator=gen).to(state_dtype)
    indices = torch.randperm(slots, generator=gen)[:rows].to(torch.int32)
    indices[list(padded)] = -1
    return conv_state, value_state, indices


@pytest.mark.parametrize("act,wdt,sdt,threads", [(torch.float16, torch.float16, torch.float16, 256),
                                                  (torch.bfloat16, torch.float32, torch.bfloat16, 64),
                                                  (torch.bfloat16, torch.bfloat16, torch.float32, 128),
                                                  (torch.float32, torch.float32, torch.float32, 64)])
def test_emulated_decode_other_dtypes_and_block_sizes(cca_emulation, act, wdt, sdt, threads):
    """16-bit weights and states, bf16 activations, and block sizes other than kCcaThreads (the kernel loops over
    whatever blockDim it gets); more rows than one tile (kCcaRows = 8)."""
    w = Weights(4, 2, 16, 2, 3, 8, dtype=wdt, seed=threads)
    gen = torch.Generator().manual_seed(3)
    rows = 11
    conv_state, value_state, indices = _slot_states(w, sdt, rows, gen, padded=(4,))
    expected_states = (conv_state.clone(), value_state.clone())
    qk, v_current, v_delayed = w.tokens(rows, act)
    positions = torch.arange(rows) * 37
    actual = emulated_decode(cca_emulation, w, qk, v_current, v_delayed, positions, conv_state, value_state, indices,
                             threads=threads)
    expected = ref.cca_prepare_decode(qk, v_current, v_delayed, *w.tuple(), positions, *expected_states, indices,
                                      *w.heads())
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=name)
    assert torch.equal(conv_state, expected_states[0]) and torch.equal(value_state, expected_states[1])


@pytest.mark.parametrize("act", [torch.float32, torch.float16])
def test_emulated_decode_token_by_token_equals_reference_prefill(cca_emulation, act):
    """Sequences of different lengths fed one token per step (finished ones padded with -1) from zeroed slots
    through the emulated kernel equal the reference prefill of the whole sequences (the b0 subtlety included:
    a fresh sequence's first Y inputs are b0, not 0), and the final states equal the prefill's."""
    w = Weights(4, 2, 16, 2, 2, 8, dtype=torch.float32, seed=11)
    lengths = [3, 1, 4]
    tokens = sum(lengths)
    qk, v_current, v_delayed = w.tokens(tokens, act)
    positions = torch.cat([torch.arange(n) + 5 * i for i, n in enumerate(lengths)])
    cu_seqlens = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    expected = ref.cca_prepare(qk, v_current, v_delayed, *w.tuple(), positions, cu_seqlens, *w.heads())

    slot_of = [2, 0, 3]
    conv_state = torch.zeros(4, w.channels, w.state_len)
    value_state = torch.zeros(4, w.value_dim)
    q = torch.zeros(tokens, w.num_q, w.head_dim, dtype=act)
    k = torch.zeros(tokens, w.num_kv, w.head_dim, dtype=act)
    v = torch.zeros(tokens, w.num_kv, w.head_dim, dtype=act)
    starts = cu_seqlens[:-1].tolist()
    for step in range(max(lengths)):
        active = [b for b in range(3) if step < lengths[b]]
        rows = torch.tensor([starts[b] + step if b in active else 0 for b in range(3)])
        indices = torch.tensor([slot_of[b] if b in active else -1 for b in range(3)], dtype=torch.int32)
        outs = emulated_decode(cca_emulation, w, qk[rows].contiguous(), v_current[rows].contiguous(),
                               v_delayed[rows].contiguous(), positions[rows].contiguous(), conv_state, value_state,
                               indices)
        for out, full in zip(outs, (q, k, v)):
            for b in active:
                full[starts[b] + step] = out[b]
    actual = (q, k, v, conv_state[slot_of], value_state[slot_of])
    for name, a, e in zip(("q", "k", "v", "conv state", "value state"), actual, expected):
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"decode vs prefill {name}")


# ---------------------------------------------------------------- ops/cca.py's hip implementation, on the emulation
class _EmulatedLauncher:
    """Stands in for zaya_kernels._C: `cca_prepare_decode` with csrc/cca.cu's argument list (the pybind names, in
    order), running the emulated kernel; the dtype rules the launcher enforces are asserted here."""

    def __init__(self, lib):
        self.lib = lib

    def cca_prepare_decode(self, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias,
                           temperature, positions, inv_freq, conv_state, value_state, state_indices, num_q_heads,
                           num_kv_heads, rotary_dim, q, k, v, slot_mapping=None, k_cache=None, v_cache=None):
        weights = (conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature)
        act = qk.dtype
        assert v_current.dtype == v_delayed.dtype == q.dtype == k.dtype == v.dtype == act
        assert len({t.dtype for t in weights}) == 1 and conv1_weight.dtype in (torch.float32, act)
        assert conv_state.dtype == value_state.dtype and conv_state.dtype in (torch.float32, act)
        assert inv_freq.dtype == torch.float32 and inv_freq.numel() == max(1, rotary_dim // 2)
        rows, head_dim = qk.shape[0], conv1_weight.shape[1]
        assert q.shape == (rows, num_q_heads, head_dim) and k.shape == v.shape == (rows, num_kv_heads, head_dim)
        assert (slot_mapping is None) == (k_cache is None) == (v_cache is None)
        for t in (qk, v_current, v_delayed):  # the launcher's layout rule for its row-strided inputs
            assert t.shape[1] <= 1 or t.stride(1) == 1
            assert t.shape[0] <= 1 or t.shape[1] == 0 or t.stride(0) >= t.shape[1]
        if k_cache is not None:
            assert k_cache.dtype == v_cache.dtype == act and slot_mapping.dtype in (torch.int32, torch.int64)
            assert k_cache.stride(-1) == v_cache.stride(-1) == 1 and slot_mapping.shape == (rows,)
        rc = self.lib.zaya_emu_cca_decode(
            _DTYPE_CODES[act], int(conv1_weight.dtype == torch.float32), int(conv_state.dtype == torch.float32),
            _ptr(qk), _ptr(v_current), _ptr(v_delayed), *[_ptr(t) for t in weights], _ptr(positions), _ptr(inv_freq),
            _ptr(conv_state), _ptr(value_state), _ptr(state_indices), _ptr(q), _ptr(k), _ptr(v), rows,
            conv_state.shape[0], num_q_heads, num_kv_heads, head_dim, conv0_weight.shape[1], conv1_weight.shape[2],
            rotary_dim, int(positions.dtype == torch.int64), int(state_indices.dtype == torch.int64), 256,
            _row_strides(qk, v_current, v_delayed),
            *_cache_args(None if k_cache is None else (slot_mapping, k_cache, v_cache)))
        assert rc == 0


@pytest.mark.parametrize("act,wdt,sdt", [(torch.float16, torch.float16, torch.float32),
                                         (torch.float16, torch.bfloat16, torch.float16),
                                         (torch.float32, torch.float32, torch.float32)])
def test_hip_impl_through_emulated_launcher(cca_emulation, monkeypatch, act, wdt, sdt):
    """zaya_kernels.ops.cca._hip_decode (output allocation, weight conversion, RoPE table, launcher argument order)
    with the emulated kernel in place of the compiled launcher; weights in a third dtype are converted to fp32."""
    from zaya_kernels.ops import cca as cca_ops

    monkeypatch.setattr(zaya_kernels, "_C", _EmulatedLauncher(cca_emulation))
    w = Weights(2, 1, 16, 3, 2, 6, dtype=wdt, seed=7)
    gen = torch.Generator().manual_seed(8)
    conv_state = torch.randn(5, w.channels, w.state_len, generator=gen).to(sdt)
    value_state = torch.randn(5, w.value_dim, generator=gen).to(sdt)
    expected_states = (conv_state.clone(), value_state.clone())
    indices = torch.tensor([3, -1, 0], dtype=torch.int64)
    qk, v_current, v_delayed = w.tokens(3, act)
    positions = torch.tensor([4, 0, 17], dtype=torch.int32)
    args = (qk, v_current, v_delayed, *w.tuple(), positions)
    actual = cca_ops._hip_decode(*args, conv_state, value_state, indices, *w.heads())
    expected = ref.cca_prepare_decode(*args, *expected_states, indices, *w.heads())
    for name, a, e in zip("qkv", actual, expected):
        assert a.dtype == act
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=name)
    assert torch.equal(conv_state, expected_states[0]) and torch.equal(value_state, expected_states[1])


def test_hip_impl_rejects_dtypes_the_kernel_lacks(monkeypatch):
    from zaya_kernels.ops import cca as cca_ops

    monkeypatch.setattr(zaya_kernels, "_C", None)  # never reached: the checks come first
    w = Weights(2, 1, 16, 2, 2, 8, seed=1)
    qk, v_current, v_delayed = w.tokens(2, torch.bfloat16)
    state = (torch.zeros(2, w.channels, 2), torch.zeros(2, w.value_dim))
    tail = (torch.arange(2), *state, torch.arange(2, dtype=torch.int32), *w.heads())
    with pytest.raises(ValueError, match="v_delayed"):
        cca_ops._hip_decode(qk, v_current, v_delayed.float(), *w.tuple(), *tail)
    with pytest.raises(ValueError, match="conv_state"):
        cca_ops._hip_decode(qk, v_current, v_delayed, *w.tuple(), torch.arange(2), state[0].half(), state[1].half(),
                            *tail[3:])


# ---------------------------------------------------------------- the paged KV-cache write (kWriteCache), emulated
def _expected_caches(before, slots, rows_valid, k, v):
    """The caches after writing k / v rows at the kept slots (slot >= 0, row valid, slot inside the pool)."""
    k_cache, v_cache = before[0].clone(), before[1].clone()
    num_blocks, block_size = k_cache.shape[:2]
    for t, s in enumerate(slots.tolist()):
        if 0 <= s < num_blocks * block_size and bool(rows_valid[t]):
            k_cache[s // block_size, s % block_size] = k[t]
            v_cache[s // block_size, s % block_size] = v[t]
    return k_cache, v_cache


@pytest.mark.parametrize("act,wdt,sdt,block_size,layout,slot_dtype", [
    (torch.float32, torch.float32, torch.float32, 1, "nhd", torch.int64),
    (torch.float16, torch.float16, torch.float32, 3, "hnd", torch.int32),
    (torch.bfloat16, torch.float32, torch.bfloat16, 16, "nhd", torch.int64),
])
def test_emulated_decode_writes_paged_cache(cca_emulation, act, wdt, sdt, block_size, layout, slot_dtype):
    """The kWriteCache kernel: the same outputs and states as the kernel without it, and k / v rows in the caches
    at their slots exactly, nothing else touched: padded rows (negative state index), negative slots and slots past
    the pool (not checked on GPU: the kernel skips them) write nothing. 11 rows: two row tiles."""
    w = Weights(4, 2, 16, 2, 2, 8, dtype=wdt, seed=block_size)
    gen = torch.Generator().manual_seed(block_size)
    rows = 11
    conv_state, value_state, indices = _slot_states(w, sdt, rows, gen, padded=(2, 9))
    indices[9] = -4  # any negative index is a padded row
    states = (conv_state.clone(), value_state.clone())
    num_blocks = rows // block_size + 2
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:rows].to(slot_dtype)
    slot_mapping[5] = -1
    slot_mapping[7] = num_blocks * block_size + 3  # past the pool
    k_cache, v_cache = random_paged_caches(num_blocks, block_size, 2, 16, act, layout, gen)
    before = (k_cache.clone(), v_cache.clone())
    qk, v_current, v_delayed = w.tokens(rows, act)
    positions = torch.arange(rows) * 11
    expected = emulated_decode(cca_emulation, w, qk, v_current, v_delayed, positions, *states, indices, threads=64)
    actual = emulated_decode(cca_emulation, w, qk, v_current, v_delayed, positions, conv_state, value_state, indices,
                             threads=64, cache=(slot_mapping, k_cache, v_cache))
    for name, a, e in zip("qkv", actual, expected):
        assert torch.equal(a, e), f"{name} differs from the kernel without a cache"
    assert torch.equal(conv_state, states[0]) and torch.equal(value_state, states[1])
    expected_k, expected_v = _expected_caches(before, slot_mapping, indices >= 0, actual[1], actual[2])
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert not torch.equal(k_cache, before[0])  # something was written


def test_hip_impl_passes_the_cache_to_the_launcher(cca_emulation, monkeypatch):
    """ops/cca.py's _hip_decode with a cache: the launcher gets slot_mapping, k_cache, v_cache as its trailing
    arguments; the result equals the reference decode with the same cache."""
    from zaya_kernels.ops import cca as cca_ops

    monkeypatch.setattr(zaya_kernels, "_C", _EmulatedLauncher(cca_emulation))
    w = Weights(2, 1, 16, 2, 2, 8, dtype=torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    conv_state = torch.randn(4, w.channels, w.state_len, generator=gen)
    value_state = torch.randn(4, w.value_dim, generator=gen)
    ref_states = (conv_state.clone(), value_state.clone())
    k_cache, v_cache = random_paged_caches(3, 2, 1, 16, torch.float32, "hnd", gen)
    ref_caches = (k_cache.clone(), v_cache.clone())
    indices, slot_mapping = torch.tensor([3, -1, 0], dtype=torch.int32), torch.tensor([5, 0, 1])
    qk, v_current, v_delayed = w.tokens(3, torch.float32)
    args = (qk, v_current, v_delayed, *w.tuple(), torch.tensor([4, 0, 17]))
    actual = cca_ops._hip_decode(*args, conv_state, value_state, indices, *w.heads(), slot_mapping, k_cache, v_cache)
    expected = ref.cca_prepare_decode(*args, *ref_states, indices, *w.heads(), slot_mapping, *ref_caches)
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, reduction=w.reduction(), what=name)
    assert_close(k_cache, ref_caches[0], reduction=w.reduction(), what="k cache")
    assert torch.equal(v_cache, ref_caches[1])
    assert torch.equal(k_cache[2, 1], actual[1][0]) and torch.equal(k_cache[0, 1], actual[1][2])


@pytest.mark.parametrize("act,rows,pad,with_cache", [(torch.float32, 3, 0, False), (torch.float16, 11, 5, True),
                                                     (torch.bfloat16, 1, 2, True), (torch.float32, 0, 1, False)])
def test_hip_impl_reads_row_strided_inputs(cca_emulation, monkeypatch, act, rows, pad, with_cache):
    """_hip_decode with qk, v_current, v_delayed as row-strided slices of one buffer (the launcher passes their row
    strides to the kernel; NaN padding between rows must not be read): the reference's outputs, state updates and
    cache writes on contiguous copies. 11 rows: two row tiles."""
    from zaya_kernels.ops import cca as cca_ops

    monkeypatch.setattr(zaya_kernels, "_C", _EmulatedLauncher(cca_emulation))
    w = Weights(4, 2, 16, 2, 2, 8, dtype=act, seed=rows + pad)
    gen = torch.Generator().manual_seed(rows)
    conv_state, value_state, indices = _slot_states(w, torch.float32, rows, gen, padded=(1,) if rows > 1 else ())
    ref_states = (conv_state.clone(), value_state.clone())
    qk, v_current, v_delayed = w.tokens(rows, act)
    positions = torch.arange(rows) * 5
    cache, ref_cache = (), ()
    if with_cache:
        k_cache, v_cache = random_paged_caches(rows + 2, 2, 2, 16, act, "hnd", gen)
        slot_mapping = torch.randperm(2 * (rows + 2), generator=gen)[:rows]
        cache, ref_cache = (slot_mapping, k_cache, v_cache), (slot_mapping, k_cache.clone(), v_cache.clone())
    views = stacked_row_views((qk, v_current, v_delayed), pad)
    if rows > 1:
        assert not any(t.is_contiguous() for t in views)
    actual = cca_ops._hip_decode(*views, *w.tuple(), positions, conv_state, value_state, indices, *w.heads(), *cache)
    expected = ref.cca_prepare_decode(qk, v_current, v_delayed, *w.tuple(), positions, *ref_states, indices,
                                      *w.heads(), *ref_cache)
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"strided {name}")
    assert torch.equal(conv_state, ref_states[0]) and torch.equal(value_state, ref_states[1])
    for name, a, e in zip(("k cache", "v cache"), cache[1:], ref_cache[1:]):
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"strided {name}")


# ---------------------------------------------------------------- the op with backend "hip" (needs a GPU build)
@pytest.mark.gpu
@pytest.mark.parametrize("act,wdt,sdt", [(torch.bfloat16, torch.bfloat16, torch.float32),
                                         (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                         (torch.float32, torch.float32, torch.float32),
                                         (torch.float16, torch.float32, torch.float16)])
@pytest.mark.parametrize("rows", [1, 8, 61])
def test_gpu_hip_decode_matches_reference(act, wdt, sdt, rows):
    """ZAYA1-8B shapes (n_q 8, n_kv 2, D 128, k0 = k1 = 2, rotary 64) on the GPU, two steps so the states carry."""
    w = Weights(8, 2, 128, 2, 2, 64, dtype=wdt, seed=rows, device="cuda")
    gen = torch.Generator().manual_seed(rows)
    slots = rows + 4
    conv_state = torch.randn(slots, w.channels, 2, generator=gen).to(sdt).cuda()
    value_state = torch.randn(slots, w.value_dim, generator=gen).to(sdt).cuda()
    expected_states = (conv_state.clone(), value_state.clone())
    for step in range(2):
        indices = torch.randperm(slots, generator=gen)[:rows].to(torch.int32).cuda()
        if rows > 1:
            indices[rows // 2] = -1
        qk, v_current, v_delayed = w.tokens(rows, act)
        positions = torch.randint(0, 100_000, (rows,), generator=gen).cuda()
        with zaya_kernels.use_backend("hip"):
            actual = torch.ops.zaya.cca_prepare_decode(qk, v_current, v_delayed, *w.tuple(), positions, conv_state,
                                                       value_state, indices, *w.heads())
        assert zaya_kernels.last_backend("cca_prepare_decode") == "hip"
        expected = ref.cca_prepare_decode(qk, v_current, v_delayed, *w.tuple(), positions, *expected_states,
                                          indices, *w.heads())
        for name, a, e in zip("qkv", actual, expected):
            assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"gpu hip decode step {step} {name}")
        assert torch.equal(conv_state, expected_states[0]) and torch.equal(value_state, expected_states[1])


@pytest.mark.gpu
def test_gpu_hip_decode_is_graph_capturable():
    w = Weights(8, 2, 128, 2, 2, 64, dtype=torch.bfloat16, seed=0, device="cuda")
    qk, v_current, v_delayed = w.tokens(2, torch.bfloat16)
    positions = torch.tensor([3, 9], device="cuda")
    indices = torch.tensor([1, 2], dtype=torch.int32, device="cuda")
    conv_state = torch.zeros(4, w.channels, 2, device="cuda")
    value_state = torch.zeros(4, w.value_dim, device="cuda")
    args = (qk, v_current, v_delayed, *w.tuple(), positions, conv_state, value_state, indices, *w.heads())
    with zaya_kernels.use_backend("hip"):
        torch.ops.zaya.cca_prepare_decode(*args)  # warm up (the inv_freq table) outside the capture
        states = (conv_state.clone(), value_state.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = torch.ops.zaya.cca_prepare_decode(*args)
    conv_state.copy_(states[0])
    value_state.copy_(states[1])
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.cca_prepare_decode(qk, v_current, v_delayed, *w.tuple(), positions, *states, indices,
                                      *w.heads())
    for name, a, e in zip("qkv", outs, expected):
        assert_close(a, e, dtype=torch.bfloat16, reduction=w.reduction(), what=f"graph replay {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("act,sdt", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_gpu_hip_decode_writes_paged_cache(act, sdt, block_size):
    """ZAYA1-8B shapes with vLLM-style caches: outputs as the reference, cache rows equal the returned k / v exactly
    (padded rows, negative and past-the-pool slots untouched), and the same launch graph-captured."""
    w = Weights(8, 2, 128, 2, 2, 64, dtype=act, seed=block_size, device="cuda")
    gen = torch.Generator().manual_seed(block_size)
    rows, slots = 37, 40
    conv_state = torch.randn(slots, w.channels, 2, generator=gen).to(sdt).cuda()
    value_state = torch.randn(slots, w.value_dim, generator=gen).to(sdt).cuda()
    states = (conv_state.clone(), value_state.clone())
    indices = torch.randperm(slots, generator=gen)[:rows].to(torch.int32)
    indices[3] = -1
    num_blocks = rows // block_size + 3
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:rows]
    slot_mapping[5] = -1
    slot_mapping[8] = num_blocks * block_size  # past the pool: skipped by the kernel (not checked on GPU)
    k_cache, v_cache = random_paged_caches(num_blocks, block_size, 2, 128, act, "nhd", gen, device="cuda")
    before = (k_cache.clone(), v_cache.clone())
    qk, v_current, v_delayed = w.tokens(rows, act)
    positions = torch.randint(0, 100_000, (rows,), generator=gen).cuda()
    indices, slot_mapping = indices.cuda(), slot_mapping.cuda()
    args = (qk, v_current, v_delayed, *w.tuple(), positions)
    with zaya_kernels.use_backend("hip"):
        actual = torch.ops.zaya.cca_prepare_decode(*args, conv_state, value_state, indices, *w.heads(), slot_mapping,
                                                   k_cache, v_cache)
    assert zaya_kernels.last_backend("cca_prepare_decode") == "hip"
    ref_slots = torch.where(slot_mapping >= num_blocks * block_size, -1, slot_mapping)
    expected = ref.cca_prepare_decode(*args, states[0].clone(), states[1].clone(), indices, *w.heads())
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"gpu hip paged decode {name}")
    expected_k, expected_v = _expected_caches((before[0].cpu(), before[1].cpu()), ref_slots.cpu(),
                                              indices.cpu() >= 0, actual[1].cpu(), actual[2].cpu())
    assert torch.equal(k_cache.cpu(), expected_k) and torch.equal(v_cache.cpu(), expected_v)

    k_cache.copy_(before[0])
    v_cache.copy_(before[1])
    conv_state.copy_(states[0])
    value_state.copy_(states[1])
    graph = torch.cuda.CUDAGraph()
    with zaya_kernels.use_backend("hip"), torch.cuda.graph(graph):
        torch.ops.zaya.cca_prepare_decode(*args, conv_state, value_state, indices, *w.heads(), slot_mapping,
                                          k_cache, v_cache)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k_cache.cpu(), expected_k) and torch.equal(v_cache.cpu(), expected_v)


@pytest.mark.gpu
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,pad", [(8, 0), (61, 24), (1, 3)])
def test_gpu_hip_decode_reads_row_strided_inputs(act, rows, pad):
    """The compiled launcher with qk, v_current, v_delayed as row-strided slices of one buffer (ZAYA1-8B shapes, the
    stacked-projection layout and a padded one), with the paged write: the reference on contiguous copies."""
    w = Weights(8, 2, 128, 2, 2, 64, dtype=act, seed=rows, device="cuda")
    gen = torch.Generator().manual_seed(rows)
    conv_state = torch.randn(rows + 4, w.channels, 2, generator=gen).cuda()
    value_state = torch.randn(rows + 4, w.value_dim, generator=gen).cuda()
    indices = torch.randperm(rows + 4, generator=gen)[:rows].to(torch.int32).cuda()
    ref_states = (conv_state.clone(), value_state.clone())
    qk, v_current, v_delayed = w.tokens(rows, act)
    positions = (torch.arange(rows) * 7).cuda()
    k_cache, v_cache = random_paged_caches(rows + 1, 16, 2, 128, act, "hnd", gen, device="cuda")
    slot_mapping = torch.randperm((rows + 1) * 16, generator=gen)[:rows].cuda()
    ref_cache = (slot_mapping, k_cache.clone(), v_cache.clone())
    with zaya_kernels.use_backend("hip"):
        actual = torch.ops.zaya.cca_prepare_decode(*stacked_row_views((qk, v_current, v_delayed), pad), *w.tuple(),
                                                   positions, conv_state, value_state, indices, *w.heads(),
                                                   slot_mapping, k_cache, v_cache)
    assert zaya_kernels.last_backend("cca_prepare_decode") == "hip"
    expected = ref.cca_prepare_decode(qk, v_current, v_delayed, *w.tuple(), positions, *ref_states, indices,
                                      *w.heads(), *ref_cache)
    for name, a, e in zip("qkv", actual, expected):
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"strided {name}")
    assert_close(conv_state, ref_states[0], what="conv state")
    assert_close(value_state, ref_states[1], what="value state")
    for name, a, e in zip(("k cache", "v cache"), (k_cache, v_cache), ref_cache[1:]):
        assert_close(a, e, dtype=act, reduction=w.reduction(), what=f"strided {name}")
