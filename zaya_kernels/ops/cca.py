"""CCA projection ops (DESIGN.md 1.1 steps 3-8): registration, validation, fake kernels, autograd, typed wrappers.

Ops (schemas in csrc/zaya_ops.cpp):
  zaya::cca_prepare(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                    positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta,
                    initial_conv_state?, initial_value_state?, has_initial_state?)
      -> (q, k, v, final_conv_state, final_value_state)                         packed varlen / chunked prefill
  zaya::cca_prepare_backward(grad_q?, grad_k?, grad_v?, grad_final_conv_state?, grad_final_value_state?, <forward
                    arguments>) -> gradients of the 8 differentiable forward inputs
  zaya::cca_prepare_paged(<cca_prepare's arguments up to rope_theta>, slot_mapping, k_cache!, v_cache!,
                    initial_conv_state?, initial_value_state?, has_initial_state?) -> as cca_prepare
      cca_prepare that also writes k and v into a paged KV cache (vLLM layout), so attention reads them from there
  zaya::cca_prepare_decode(qk, v_current, v_delayed, conv weights/biases, temperature, positions, conv_state!,
                    value_state!, state_indices, num_q_heads, num_kv_heads, rotary_dim, rope_theta,
                    slot_mapping?, k_cache!?, v_cache!?) -> (q, k, v)
Backends: reference (zaya_kernels.reference.cca) and triton (zaya_kernels.triton.cca) for all four;
cca_prepare_decode also has hip (kernels/cca.cuh via csrc/cca.cu: the whole decode step in one launch; available
when the extension was built with GPU kernels, as zaya_kernels.backend checks; needs qk, v_current and v_delayed
in one dtype, the states in fp32 or that dtype; it runs when asked for, `auto` picks triton until the two have been
timed on a GPU).
The reference backward is autograd through the reference forward. The autograd of cca_prepare calls
cca_prepare_backward under the backend that was requested when the forward ran (kept on the autograd context, as
the backward runs outside any use_backend block): a triton forward gets the triton backward, `auto` picks triton on
GPU and the reference on CPU for both.

Paged KV-cache write: k_cache, v_cache [num_blocks, block_size, n_kv, D] (qk's dtype, last dim contiguous, any other
strides), slot_mapping [T] / [B] int64 or int32; token t goes to block slot // block_size, offset slot % block_size;
a negative slot (vLLM's padding) and a padded decode row write nothing. The kernels store k and v into the cache
where they store the outputs (a WRITE_CACHE constexpr / template flag: without a cache the kernels are the same as
before). Why prefill has an op of its own: torch.library.register_autograd refuses a schema with mutable arguments
(torch 2.13: "Cannot register autograd formula for non-functional operator"), so optional caches on cca_prepare
itself would cost it its autograd (training). cca_prepare_paged shares the launcher and kernel and has no autograd
(serving only); cca_prepare_decode has no autograd and takes the caches as optional arguments. The typed wrapper
`cca_prepare` picks cca_prepare_paged when it is given a cache.
"""
from __future__ import annotations

import torch

from zaya_kernels import backend as _backend
from zaya_kernels.ops import _validate as check
from zaya_kernels.ops._registry import call, register_op
# The one rule for reading index values back (CPU tensors, or any real tensor with ZAYA_KERNELS_CHECK_VALUES=1;
# never fake / meta ones), shared with the attention ops.
from zaya_kernels.ops.attention import _values_readable
from zaya_kernels.reference import cca as ref

_OP = "cca_prepare"
_DECODE_OP = "cca_prepare_decode"
_PAGED_OP = "cca_prepare_paged"
MAX_KERNEL_SIZE = 4
INDEX_DTYPES = (torch.int32, torch.int64)
FLAG_DTYPES = (torch.bool, torch.int32, torch.int64)


# ---------------------------------------------------------------- validation
def _validate_common(op, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                     positions, num_q_heads, num_kv_heads, rotary_dim, rope_theta):
    """Checks shared by every CCA op; returns (T, C, D, k0, k1, value_dim)."""
    # qk, v_current and v_delayed may be row-strided views (the kernels take their row strides): the modules split
    # one stacked projection GEMM's output into them without a copy
    check.tensor(op, "qk", qk, ndim=2, dtypes=check.FLOAT_DTYPES)
    check.row_strided(op, "qk", qk)
    tokens, channels = qk.shape
    dev = qk.device
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"zaya::{op}: `{name}` must be a positive int, got {value!r}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"zaya::{op}: `num_q_heads` ({num_q_heads}) must be a multiple of `num_kv_heads` "
                         f"({num_kv_heads})")
    check.tensor(op, "conv1_weight", conv1_weight, ndim=3, dtypes=check.FLOAT_DTYPES, device=dev, contiguous=True)
    head_dim = conv1_weight.shape[1]
    heads = num_q_heads + num_kv_heads
    if channels != heads * head_dim:
        raise ValueError(f"zaya::{op}: `qk` has C = {channels} channels but (num_q_heads + num_kv_heads) * head_dim = "
                         f"({num_q_heads} + {num_kv_heads}) * {head_dim} = {heads * head_dim} (head_dim is "
                         f"conv1_weight.shape[1])")
    k1 = conv1_weight.shape[2]
    check.tensor(op, "conv1_weight", conv1_weight, shape=(channels, head_dim, k1))
    check.tensor(op, "conv0_weight", conv0_weight, ndim=2, dtypes=check.FLOAT_DTYPES, device=dev, contiguous=True)
    k0 = conv0_weight.shape[1]
    check.tensor(op, "conv0_weight", conv0_weight, shape=(channels, k0))
    for name, size in (("conv0_weight", k0), ("conv1_weight", k1)):
        if not 1 <= size <= MAX_KERNEL_SIZE:
            raise ValueError(f"zaya::{op}: `{name}` kernel size must be in 1..{MAX_KERNEL_SIZE}, got {size}")
    for name, bias in (("conv0_bias", conv0_bias), ("conv1_bias", conv1_bias)):
        check.tensor(op, name, bias, dtypes=check.FLOAT_DTYPES, shape=(channels,), device=dev, contiguous=True)
    check.tensor(op, "temperature", temperature, dtypes=check.FLOAT_DTYPES, shape=(num_kv_heads,), device=dev,
                 contiguous=True)
    if (num_kv_heads * head_dim) % 2:
        raise ValueError(f"zaya::{op}: num_kv_heads * head_dim = {num_kv_heads * head_dim} must be even (half the "
                         "value channels are current-token, half previous-token)")
    value_dim = num_kv_heads * head_dim // 2
    for name, t in (("v_current", v_current), ("v_delayed", v_delayed)):
        check.tensor(op, name, t, dtypes=check.FLOAT_DTYPES, shape=(tokens, value_dim), device=dev)
        check.row_strided(op, name, t)
    check.tensor(op, "positions", positions, dtypes=INDEX_DTYPES, shape=(tokens,), device=dev, contiguous=True)
    if not isinstance(rotary_dim, int) or rotary_dim < 0 or rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"zaya::{op}: `rotary_dim` must be an even int in 0..head_dim={head_dim}, got {rotary_dim!r}")
    if not isinstance(rope_theta, float) or not rope_theta > 0.0:
        raise ValueError(f"zaya::{op}: `rope_theta` must be a positive float, got {rope_theta!r}")
    return tokens, channels, head_dim, k0, k1, value_dim


def _validate_prefill_args(op, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias,
                           temperature, positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta,
                           initial_conv_state=None, initial_value_state=None, has_initial_state=None):
    tokens, channels, _, k0, k1, value_dim = _validate_common(
        op, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
        num_q_heads, num_kv_heads, rotary_dim, rope_theta)
    check.tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=qk.device, contiguous=True)
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"zaya::{op}: `cu_seqlens` must have B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    num_seqs = cu_seqlens.shape[0] - 1
    if _values_readable(cu_seqlens):
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != tokens or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"zaya::{op}: `cu_seqlens` must start at 0, never decrease and end at T = {tokens}; got "
                             f"{bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    check.optional_together(op, "chunked prefill needs all three state arguments",
                            [("initial_conv_state", initial_conv_state), ("initial_value_state", initial_value_state),
                             ("has_initial_state", has_initial_state)])
    if initial_conv_state is not None:
        state_len = k0 + k1 - 2
        check.tensor(op, "initial_conv_state", initial_conv_state, dtypes=check.FLOAT_DTYPES,
                     shape=(num_seqs, channels, state_len), device=qk.device, contiguous=True)
        check.tensor(op, "initial_value_state", initial_value_state, dtypes=check.FLOAT_DTYPES,
                     shape=(num_seqs, value_dim), device=qk.device, contiguous=True)
        check.tensor(op, "has_initial_state", has_initial_state, dtypes=FLAG_DTYPES, shape=(num_seqs,),
                     device=qk.device, contiguous=True)


def _validate_fwd(*args):
    _validate_prefill_args(_OP, *args)


def _validate_bwd(grad_q, grad_k, grad_v, grad_conv, grad_value, *fwd_args):
    op = _OP + "_backward"
    _validate_prefill_args(op, *fwd_args)
    qk, conv1_weight, cu_seqlens, num_q_heads, num_kv_heads = (fwd_args[0], fwd_args[5], fwd_args[9], fwd_args[10],
                                                               fwd_args[11])
    tokens, head_dim = qk.shape[0], conv1_weight.shape[1]
    num_seqs = cu_seqlens.shape[0] - 1
    state_len = fwd_args[3].shape[1] + conv1_weight.shape[2] - 2
    for name, grad, shape in (("grad_q", grad_q, (tokens, num_q_heads, head_dim)),
                              ("grad_k", grad_k, (tokens, num_kv_heads, head_dim)),
                              ("grad_v", grad_v, (tokens, num_kv_heads, head_dim)),
                              ("grad_final_conv_state", grad_conv, (num_seqs, qk.shape[1], state_len)),
                              ("grad_final_value_state", grad_value, (num_seqs, num_kv_heads * head_dim // 2))):
        if grad is not None:
            check.tensor(op, name, grad, dtypes=check.FLOAT_DTYPES, shape=shape, device=qk.device)


def _validate_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                     positions, conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim,
                     rope_theta, slot_mapping=None, k_cache=None, v_cache=None):
    op = _DECODE_OP
    _, channels, _, k0, k1, value_dim = _validate_common(
        op, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
        num_q_heads, num_kv_heads, rotary_dim, rope_theta)
    check.tensor(op, "conv_state", conv_state, ndim=3, dtypes=check.FLOAT_DTYPES, device=qk.device, contiguous=True)
    slots = conv_state.shape[0]
    check.tensor(op, "conv_state", conv_state, shape=(slots, channels, k0 + k1 - 2))
    check.tensor(op, "value_state", value_state, dtypes=check.FLOAT_DTYPES, shape=(slots, value_dim),
                 device=qk.device, contiguous=True)
    check.tensor(op, "state_indices", state_indices, dtypes=INDEX_DTYPES, shape=(qk.shape[0],), device=qk.device,
                 contiguous=True)
    if _values_readable(state_indices) and state_indices.numel():
        _check_state_index_values(op, state_indices, slots)
    check.optional_together(op, "the paged KV-cache write needs slot_mapping, k_cache and v_cache",
                            [("slot_mapping", slot_mapping), ("k_cache", k_cache), ("v_cache", v_cache)])
    if k_cache is not None:
        writing = state_indices >= 0 if _values_readable(state_indices) else None
        _validate_cache(op, "row", qk, num_kv_heads, conv1_weight.shape[1], slot_mapping, k_cache, v_cache, writing)


def _check_state_index_values(op, state_indices, slots):
    """Every state index < slots (negative: a padded row), and no slot used by two rows: the kernels update each
    row's slot in place, so two rows on one slot would race (read-modify-write of the same state)."""
    used = state_indices[state_indices >= 0]
    if not used.numel():
        return
    values, counts = used.unique(return_counts=True)
    high, most = torch.stack([values.max().long(), counts.max()]).tolist()  # one device->host copy
    if high >= slots:
        raise ValueError(f"zaya::{op}: `state_indices` has index {high} but the states have only {slots} slots "
                         "(negative indices mark padded rows)")
    if most > 1:
        shared = values[counts > 1].tolist()
        raise ValueError(f"zaya::{op}: `state_indices` gives slot {shared[0]} to more than one row (shared slots: "
                         f"{shared[:8]}); each row updates its slot in place, so two rows must not share a slot "
                         "(negative indices mark padded rows)")


def _validate_cache(op, rows_name, qk, num_kv_heads, head_dim, slot_mapping, k_cache, v_cache, writing=None):
    """The optional paged KV-cache arguments: all three or none (checked by the caller), then shapes, dtypes,
    devices, and (where reading them is free) the slot values of the rows that write (`writing` [rows] bool or
    None: all; decode's padded rows write nothing, whatever their slot)."""
    rows = qk.shape[0]
    check.tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=qk.device, contiguous=True)
    if slot_mapping.shape[0] != rows:
        raise ValueError(f"zaya::{op}: `slot_mapping` must have one slot per {rows_name} (shape ({rows},)), got "
                         f"shape {tuple(slot_mapping.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check.tensor(op, name, cache, ndim=4, device=qk.device)
        if cache.dtype != qk.dtype:
            raise TypeError(f"zaya::{op}: `{name}` must have qk's dtype {str(qk.dtype).replace('torch.', '')} (the "
                            f"dtype of the k / v outputs), got {str(cache.dtype).replace('torch.', '')}")
    num_blocks, block_size = k_cache.shape[:2]
    expected = (num_blocks, block_size, num_kv_heads, head_dim)
    if tuple(k_cache.shape) != expected:
        raise ValueError(f"zaya::{op}: `k_cache` must have shape [num_blocks, block_size, num_kv_heads, head_dim] = "
                         f"[{num_blocks}, {block_size}, {num_kv_heads}, {head_dim}], got {tuple(k_cache.shape)}")
    if block_size < 1:
        raise ValueError(f"zaya::{op}: `k_cache` must have block_size >= 1, got shape {tuple(k_cache.shape)}")
    if num_blocks * block_size >= 2**31:  # the kernels split slots into block and offset in 32 bits
        raise ValueError(f"zaya::{op}: the cache must have num_blocks * block_size < 2^31 slots, got "
                         f"{num_blocks} * {block_size}")
    check.tensor(op, "v_cache", v_cache, shape=expected)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if head_dim > 1 and cache.stride(-1) != 1:
            raise ValueError(f"zaya::{op}: `{name}` must have a contiguous last dim (stride 1), got strides "
                             f"{cache.stride()}")
    if (type(k_cache) is torch.Tensor and type(v_cache) is torch.Tensor and k_cache.numel()
            and k_cache.data_ptr() == v_cache.data_ptr()):
        raise ValueError(f"zaya::{op}: `k_cache` and `v_cache` are the same memory; they must be separate tensors")
    if _values_readable(slot_mapping) and rows:
        used = slot_mapping[(slot_mapping >= 0) if writing is None else (slot_mapping >= 0) & writing]
        capacity = num_blocks * block_size
        if used.numel() and int(used.max()) >= capacity:
            raise ValueError(f"zaya::{op}: `slot_mapping` has slot {int(used.max())} but the cache holds only "
                             f"num_blocks * block_size = {num_blocks} * {block_size} = {capacity} slots (negative "
                             "slots are skipped)")
        if used.numel() != used.unique().numel():
            raise ValueError(f"zaya::{op}: `slot_mapping` maps two tokens to one cache slot")


def _validate_paged(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                    positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, slot_mapping, k_cache,
                    v_cache, initial_conv_state=None, initial_value_state=None, has_initial_state=None):
    _validate_prefill_args(_PAGED_OP, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias,
                           temperature, positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta,
                           initial_conv_state, initial_value_state, has_initial_state)
    _validate_cache(_PAGED_OP, "token", qk, num_kv_heads, conv1_weight.shape[1], slot_mapping, k_cache, v_cache)


# ---------------------------------------------------------------- fake kernels (shapes only)
def _fake_outputs(qk, conv1_weight, num_q_heads, num_kv_heads):
    tokens, head_dim = qk.shape[0], conv1_weight.shape[1]
    return (qk.new_empty(tokens, num_q_heads, head_dim), qk.new_empty(tokens, num_kv_heads, head_dim),
            qk.new_empty(tokens, num_kv_heads, head_dim))


def _fake_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
              cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state=None,
              initial_value_state=None, has_initial_state=None):
    num_seqs = cu_seqlens.shape[0] - 1
    state_len = conv0_weight.shape[1] + conv1_weight.shape[2] - 2
    return _fake_outputs(qk, conv1_weight, num_q_heads, num_kv_heads) + (
        qk.new_empty(num_seqs, qk.shape[1], state_len, dtype=torch.float32),
        qk.new_empty(num_seqs, v_current.shape[1], dtype=torch.float32))


def _fake_paged(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
                cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, slot_mapping, k_cache, v_cache,
                initial_conv_state=None, initial_value_state=None, has_initial_state=None):
    return _fake_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                     positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta)


def _fake_bwd(grad_q, grad_k, grad_v, grad_conv, grad_value, *fwd_args):
    return tuple(torch.empty_like(t) for t in fwd_args[:8])


def _fake_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
                 conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim, rope_theta,
                 slot_mapping=None, k_cache=None, v_cache=None):
    return _fake_outputs(qk, conv1_weight, num_q_heads, num_kv_heads)


# ---------------------------------------------------------------- Triton implementations
def _triton_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
                cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state=None,
                initial_value_state=None, has_initial_state=None, cache=None):
    from zaya_kernels.triton import cca as tri

    q, k, v = _fake_outputs(qk, conv1_weight, num_q_heads, num_kv_heads)
    final_conv_state, final_value_state = _fake_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight,
                                                    conv1_bias, temperature, positions, cu_seqlens, num_q_heads,
                                                    num_kv_heads, rotary_dim, rope_theta)[3:]
    tri.cca_prepare_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                        positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state,
                        initial_value_state, has_initial_state, q, k, v, final_conv_state, final_value_state,
                        cache=cache)
    return q, k, v, final_conv_state, final_value_state


def _triton_paged(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                  positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, slot_mapping, k_cache,
                  v_cache, initial_conv_state=None, initial_value_state=None, has_initial_state=None):
    return _triton_fwd(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                       positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv_state,
                       initial_value_state, has_initial_state, cache=(slot_mapping, k_cache, v_cache))


def _triton_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                   positions, conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim,
                   rope_theta, slot_mapping=None, k_cache=None, v_cache=None):
    from zaya_kernels.triton import cca as tri

    q, k, v = _fake_outputs(qk, conv1_weight, num_q_heads, num_kv_heads)
    cache = None if k_cache is None else (slot_mapping, k_cache, v_cache)
    tri.cca_prepare_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                           positions, conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim,
                           rope_theta, q, k, v, cache=cache)
    return q, k, v


def _triton_bwd(grad_q, grad_k, grad_v, grad_conv, grad_value, *fwd_args):
    from zaya_kernels.triton import cca as tri_bwd

    # The backward kernels read qk with row stride C: a row-strided qk (a slice of the stacked projection output,
    # which the forward takes as is) is copied here. One [T, C] copy per backward, small next to the backward's own
    # [T, C] fp32 workspaces; the value projections are only indexed by torch (any strides).
    fwd_args = (fwd_args[0].contiguous(),) + fwd_args[1:]
    return tri_bwd.cca_prepare_bwd(grad_q, grad_k, grad_v, grad_conv, grad_value, *fwd_args)


# ---------------------------------------------------------------- HIP/CUDA implementation (csrc/cca.cu)
_hip_inv_freq_cache: dict = {}


def _hip_inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """fp32 [max(1, rotary_dim / 2)] RoPE table, computed once per (rotary_dim, theta, device) exactly as the
    reference does, so a decode step is one launch (and graph-capturable after the first call)."""
    key = (rotary_dim, theta, str(device))
    if key not in _hip_inv_freq_cache:
        freq = ref.rope_inv_freq(rotary_dim, theta, device)
        _hip_inv_freq_cache[key] = freq if freq.numel() else torch.zeros(1, device=device)
    return _hip_inv_freq_cache[key]


def _hip_decode(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature,
                positions, conv_state, value_state, state_indices, num_q_heads, num_kv_heads, rotary_dim,
                rope_theta, slot_mapping=None, k_cache=None, v_cache=None):
    from zaya_kernels import _C

    act = qk.dtype
    for name, t in (("v_current", v_current), ("v_delayed", v_delayed)):
        if t.dtype != act:
            raise ValueError(f"zaya::{_DECODE_OP}: the HIP kernel needs `{name}` in qk's dtype {act}, got {t.dtype}; "
                             "use the triton or reference backend")
    if conv_state.dtype not in (torch.float32, act) or value_state.dtype != conv_state.dtype:
        raise ValueError(f"zaya::{_DECODE_OP}: the HIP kernel needs `conv_state` and `value_state` in one dtype, "
                         f"float32 or qk's dtype {act}; got {conv_state.dtype} and {value_state.dtype}; use the "
                         "triton or reference backend")
    weights = (conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature)
    if conv1_weight.dtype not in (torch.float32, act) or any(w.dtype != conv1_weight.dtype for w in weights):
        weights = tuple(w.float() for w in weights)  # lossless; the kernel rounds conv1_weight to A as the reference
    q, k, v = _fake_outputs(qk, conv1_weight, num_q_heads, num_kv_heads)
    cache = () if k_cache is None else (slot_mapping, k_cache, v_cache)  # the launcher's optional trailing arguments
    _C.cca_prepare_decode(qk, v_current, v_delayed, *weights, positions,
                          _hip_inv_freq(rotary_dim, rope_theta, qk.device), conv_state, value_state, state_indices,
                          num_q_heads, num_kv_heads, rotary_dim, q, k, v, *cache)
    return q, k, v


# ---------------------------------------------------------------- autograd
_NUM_DIFFERENTIABLE = 8  # qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature
_NUM_FWD_INPUTS = 17
_CU_SEQLENS, _INITIAL_CONV_STATE, _INITIAL_VALUE_STATE, _HAS_INITIAL_STATE = 9, 14, 15, 16  # schema positions


def _setup_fwd(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.tensor_slots = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    ctx.plain_args = {i: t for i, t in enumerate(inputs) if not isinstance(t, torch.Tensor)}
    ctx.backend = _backend.requested_backend()  # backward runs outside any use_backend block: keep the choice


def _backward_fwd(ctx, grad_q, grad_k, grad_v, grad_conv, grad_value):
    inputs = [None] * _NUM_FWD_INPUTS
    for slot, tensor in zip(ctx.tensor_slots, ctx.saved_tensors):
        inputs[slot] = tensor
    for slot, value in ctx.plain_args.items():
        inputs[slot] = value
    with _backend.use_backend(ctx.backend):
        grads = torch.ops.zaya.cca_prepare_backward(grad_q, grad_k, grad_v, grad_conv, grad_value, *inputs)
    out = list(grads) + [None] * (_NUM_FWD_INPUTS - _NUM_DIFFERENTIABLE)  # positions, ints and flags: none
    needs = ctx.needs_input_grad
    if len(needs) > _INITIAL_VALUE_STATE and needs[_INITIAL_VALUE_STATE]:
        out[_INITIAL_VALUE_STATE] = _initial_value_state_grad(grad_v, grad_value, inputs[_CU_SEQLENS],
                                                              inputs[_INITIAL_VALUE_STATE], inputs[_HAS_INITIAL_STATE])
    if len(needs) > _INITIAL_CONV_STATE and needs[_INITIAL_CONV_STATE]:
        out[_INITIAL_CONV_STATE] = _initial_conv_state_grad(grad_q, grad_k, grad_conv, inputs)
    return tuple(out)


def _initial_conv_state_grad(grad_q, grad_k, grad_final_conv, inputs):
    """Gradient of the initial conv state [B, C, K] (K = k0 + k1 - 2 raw X columns of an earlier chunk). Output
    token t reads X back to t - K, so only a sequence's first K tokens read the history: every sequence's first K
    rows (rows past its end get no upstream gradient) are recomputed with the reference math (the function the
    forward's reference runs per sequence), vmapped over the sequences, and differentiated with respect to the
    history. A sequence of L < K tokens also keeps history columns L.. in its final conv state: their gradient is a
    shifted copy of the final state's. Training across chunks only (a state that requires grad); no host
    synchronisation."""
    (qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature, positions,
     cu_seqlens, num_q_heads, num_kv_heads, rotary_dim, rope_theta, initial_conv, initial_value, has_state) = inputs
    num_seqs, _, state_len = initial_conv.shape
    compute = torch.float64 if qk.dtype == torch.float64 else torch.float32
    grad = initial_conv.new_zeros(initial_conv.shape, dtype=compute)
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    column = torch.arange(state_len, device=initial_conv.device)
    if grad_final_conv is not None:  # final column i of an L-token sequence is history column L + i while < K
        shifted = (column[None, :] - lengths[:, None]).clamp(min=0)[:, None, :].expand_as(grad)
        from_final = grad_final_conv.to(compute).gather(2, shifted)
        grad = grad + torch.where((column[None, :] >= lengths[:, None])[:, None, :], from_final, 0.0)
    num_tokens = qk.shape[0]
    if state_len > 0 and num_tokens > 0 and (grad_q is not None or grad_k is not None):
        rows = (starts[:, None] + column[None, :]).clamp(max=num_tokens - 1)  # [B, K]
        in_sequence = (column[None, :] < lengths[:, None])[:, :, None, None]

        def upstream(g, heads):
            if g is None:
                return torch.zeros(num_seqs, state_len, heads, conv1_weight.shape[1], dtype=compute,
                                   device=qk.device)
            return torch.where(in_sequence, g[rows].to(compute), 0.0)

        weights = [w.detach() for w in (conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature)]

        def history_grad(x, current, delayed, pos, history, value_history, g_q, g_k):
            def queries_keys(hist):
                q, k, *_ = ref.prepare_sequence(x, current, delayed, *weights, pos, num_q_heads, num_kv_heads,
                                                rotary_dim, rope_theta, hist, value_history)
                return q, k
            _, pullback = torch.func.vjp(queries_keys, history)
            return pullback((g_q, g_k))[0]

        grad = grad + torch.func.vmap(history_grad)(
            qk[rows].detach(), v_current[rows].detach(), v_delayed[rows].detach(), positions[rows],
            initial_conv.detach().to(compute), initial_value.detach().to(compute),
            upstream(grad_q, num_q_heads), upstream(grad_k, num_kv_heads))
    grad = torch.where((has_state != 0)[:, None, None], grad, 0.0)  # not grad * flag: an unused state may hold NaN
    return grad.to(initial_conv.dtype)


def _initial_value_state_grad(grad_v, grad_final_value, cu_seqlens, initial_value_state, has_initial_state):
    """Gradient of the initial value state [B, n_kv D / 2]: it is Vd_{-1}, the delayed half (flat columns
    n_kv D / 2 ..) of v's first row of each sequence that has an initial state, and the final value state itself
    for an empty one. (With attention_bias, a fresh sequence's Vd_{-1} is v_proj_delayed's bias, which the modules
    pass here, so the bias gets its gradient through this.) No host synchronisation."""
    value_dim = initial_value_state.shape[1]
    grad = initial_value_state.new_zeros(initial_value_state.shape, dtype=torch.float32)
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    if grad_v is not None and grad_v.shape[0] > 0:
        first_rows = grad_v.reshape(grad_v.shape[0], -1)[starts.clamp(max=grad_v.shape[0] - 1), value_dim:]
        grad = grad + torch.where(lengths[:, None] > 0, first_rows.float(), 0.0)
    if grad_final_value is not None:
        grad = grad + torch.where(lengths[:, None] == 0, grad_final_value.float(), 0.0)
    grad = grad * (has_initial_state != 0)[:, None]
    return grad.to(initial_value_state.dtype)


register_op(_OP, impls={"reference": ref.cca_prepare, "triton": _triton_fwd}, fake=_fake_fwd, validate=_validate_fwd,
            auto_order=("triton",), backward=_backward_fwd, setup_context=_setup_fwd)
register_op(_OP + "_backward", impls={"reference": ref.cca_prepare_backward, "triton": _triton_bwd}, fake=_fake_bwd,
            validate=_validate_bwd, auto_order=("triton",))
register_op(_DECODE_OP, impls={"reference": ref.cca_prepare_decode, "triton": _triton_decode, "hip": _hip_decode},
            fake=_fake_decode, validate=_validate_decode, auto_order=("triton", "hip"))
# No autograd: torch.library refuses it on a schema with mutable arguments (the caches); serving only.
register_op(_PAGED_OP, impls={"reference": ref.cca_prepare_paged, "triton": _triton_paged}, fake=_fake_paged,
            validate=_validate_paged, auto_order=("triton",))


# ---------------------------------------------------------------- typed wrappers
def cca_prepare(
    qk: torch.Tensor,
    v_current: torch.Tensor,
    v_delayed: torch.Tensor,
    conv0_weight: torch.Tensor,
    conv0_bias: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    temperature: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    rotary_dim: int,
    rope_theta: float,
    initial_conv_state: torch.Tensor | None = None,
    initial_value_state: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    value_state: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
):
    """ZAYA's CCA projection for packed variable-length sequences (prefill, or one chunk of a chunked prefill).

    Per sequence (see zaya_kernels.reference.cca for the full math): Y = depthwise causal conv(X) with X zero (or the
    initial conv state) before the sequence start, Z = grouped causal conv(Y), Q = Z_q + (Q0 + K0[h // g]) / 2,
    K = Z_k + mean_m (Q0[g j + m] + K0[j]) / 2, V = concat(Vc_t, Vd_{t-1}), Qhat = sqrt(D) Q / ||Q||,
    Khat = temp sqrt(D) K / ||K||, then NeoX RoPE on the first rotary_dim dims.

    Parameters
    ----------
    qk : [T, C] float32 / float16 / bfloat16 (activation dtype A), last dim contiguous, row stride >= C
        X = [Q0 | K0]: all q heads then all k heads, C = (num_q_heads + num_kv_heads) * D. Rows may be padded
        (a column slice of a wider buffer, e.g. of one stacked projection GEMM's output): no copy is made.
    v_current, v_delayed : [T, num_kv_heads * D / 2], any float dtype, last dim contiguous, row stride >= the width
        The current- and delayed-value projections (transformers' v_proj_current / v_proj_delayed outputs); row
        strides as qk's (each its own).
    conv0_weight : [C, k0]   depthwise conv weight (transformers' conv_qk_depthwise.weight[:, 0]), 1 <= k0 <= 4
    conv0_bias : [C]
    conv1_weight : [C, D, k1]  grouped conv weight (conv_qk_grouped.weight; groups = heads), 1 <= k1 <= 4
    conv1_bias : [C]
    temperature : [num_kv_heads]  the linear key temperature (ZayaQKNorm.temp)
    positions : [T] int32 / int64   RoPE position of every token
    cu_seqlens : [B + 1] int32   sequence b is tokens cu_seqlens[b] : cu_seqlens[b + 1]; from 0, non-decreasing,
        ending at T (checked where reading the values is free: CPU tensors, or GPU ones with
        ZAYA_KERNELS_CHECK_VALUES=1)
    num_q_heads, num_kv_heads : int (num_q_heads % num_kv_heads == 0)
    rotary_dim : even int <= D (D * partial_rotary_factor)
    rope_theta : float
    initial_conv_state : [B, C, k0 + k1 - 2] float or None   last raw X columns before this chunk (oldest first)
    initial_value_state : [B, num_kv_heads * D / 2] float or None   Vd of the token before this chunk
    has_initial_state : [B] bool / int or None   0: a fresh sequence, the state rows are ignored
    slot_mapping : [T] int64 / int32 or None   paged KV-cache slot of every token (block * block_size + offset);
        negative: the token is not written (vLLM's padding). Given with k_cache and v_cache or not at all.
    k_cache, v_cache : [num_blocks, block_size, num_kv_heads, D] A or None, written in place
        The last dim contiguous, any other strides (vLLM's layout). With them the op is zaya::cca_prepare_paged:
        k and v are also stored at their slots (every other cache element is untouched), and there is no autograd
        (torch.library has none for ops with mutable arguments): serving only.
    conv_state : [slots, C, k0 + k1 - 2] float or None, updated in place
    value_state : [slots, num_kv_heads * D / 2] float or None, updated in place
    state_indices : [B] int32 / int64 or None
        The state pools cca_prepare_decode reads (continuous batching), instead of initial_conv_state /
        initial_value_state: sequence b starts from slot state_indices[b] where has_initial_state[b] (required
        with the pools), and its final states are written back there (cast to the pools' dtype), so a chunk of a
        prompt and the decode steps after it share one state pool. Every index in [0, slots) and no slot twice
        (checked where reading the values is free). Serving only: no gradient flows through the pools.

    Returns
    -------
    q : [T, num_q_heads, D] A
    k : [T, num_kv_heads, D] A
    v : [T, num_kv_heads, D] A
    final_conv_state : [B, C, k0 + k1 - 2] float32
    final_value_state : [B, num_kv_heads * D / 2] float32

    Differentiable with respect to qk, both value projections, the conv weights and biases, the temperature and both
    initial states (training across chunks: the final states of one chunk feed the next), through the Triton or
    reference backward; the initial conv state's gradient recomputes each sequence's first k0 + k1 - 2 tokens with
    the reference math (one host read of cu_seqlens), the only tokens that read it.
    """
    check.optional_together(_OP, "the paged KV-cache write needs slot_mapping, k_cache and v_cache",
                            [("slot_mapping", slot_mapping), ("k_cache", k_cache), ("v_cache", v_cache)])
    check.optional_together(_OP, "state pools need conv_state, value_state and state_indices",
                            [("conv_state", conv_state), ("value_state", value_state),
                             ("state_indices", state_indices)])
    if state_indices is not None:
        initial_conv_state, initial_value_state = _gather_state_pools(
            qk, cu_seqlens, conv_state, value_state, state_indices, initial_conv_state, initial_value_state,
            has_initial_state)
    if k_cache is not None:
        outputs = cca_prepare_paged(qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias,
                                    temperature, positions, cu_seqlens, num_q_heads, num_kv_heads, rotary_dim,
                                    rope_theta, slot_mapping, k_cache, v_cache, initial_conv_state,
                                    initial_value_state, has_initial_state)
    else:
        outputs = call(torch.ops.zaya.cca_prepare, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight,
                       conv1_bias, temperature, positions, cu_seqlens, int(num_q_heads),
                       int(num_kv_heads), int(rotary_dim), float(rope_theta),
                       initial_conv_state, initial_value_state, has_initial_state)
    if state_indices is not None:
        rows = state_indices.long()
        with torch.no_grad():
            conv_state.index_copy_(0, rows, outputs[3].to(conv_state.dtype))
            value_state.index_copy_(0, rows, outputs[4].to(value_state.dtype))
    return outputs


def _gather_state_pools(qk, cu_seqlens, conv_state, value_state, state_indices, initial_conv_state,
                        initial_value_state, has_initial_state):
    """Check the state-pool arguments of `cca_prepare` and return each sequence's initial states from its slot."""
    if initial_conv_state is not None or initial_value_state is not None:
        raise ValueError(f"zaya::{_OP}: pass either the state pools (conv_state, value_state, state_indices) or "
                         "initial_conv_state / initial_value_state, not both")
    num_seqs = cu_seqlens.shape[0] - 1
    if has_initial_state is None:
        raise ValueError(f"zaya::{_OP}: the state pools need has_initial_state [B] (0: a fresh sequence whose slot "
                         "is only written)")
    check.tensor(_OP, "state_indices", state_indices, dtypes=INDEX_DTYPES, shape=(num_seqs,), device=qk.device,
                 contiguous=True)
    for name, pool in (("conv_state", conv_state), ("value_state", value_state)):
        check.tensor(_OP, name, pool, dtypes=check.FLOAT_DTYPES, device=qk.device, contiguous=True)
    if conv_state.dim() != 3 or value_state.dim() != 2 or conv_state.shape[0] != value_state.shape[0]:
        raise ValueError(f"zaya::{_OP}: `conv_state` must be [slots, C, k0 + k1 - 2] and `value_state` "
                         f"[slots, num_kv_heads * D / 2] with the same slots, got {tuple(conv_state.shape)} and "
                         f"{tuple(value_state.shape)}")
    if _values_readable(state_indices) and state_indices.numel():
        if int(state_indices.min()) < 0:
            raise ValueError(f"zaya::{_OP}: `state_indices` must be >= 0 with the state pools (every sequence of a "
                             f"prefill chunk has a slot), got {state_indices.tolist()[:8]}")
        _check_state_index_values(_OP, state_indices, conv_state.shape[0])
    rows = state_indices.long()
    return conv_state.index_select(0, rows), value_state.index_select(0, rows)


def cca_prepare_paged(
    qk: torch.Tensor,
    v_current: torch.Tensor,
    v_delayed: torch.Tensor,
    conv0_weight: torch.Tensor,
    conv0_bias: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    temperature: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    rotary_dim: int,
    rope_theta: float,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    initial_conv_state: torch.Tensor | None = None,
    initial_value_state: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
):
    """`cca_prepare` that also writes k and v into a paged KV cache (zaya::cca_prepare_paged; no autograd).

    A separate op, not optional arguments of zaya::cca_prepare: torch.library.register_autograd refuses schemas with
    mutable arguments, and cca_prepare keeps its autograd for training. Same kernel and launcher as cca_prepare.

    Parameters
    ----------
    qk ... rope_theta, initial_conv_state, initial_value_state, has_initial_state : as in `cca_prepare`
    slot_mapping : [T] int64 / int32   cache slot of token t = block * block_size + offset; negative: not written.
        Two tokens must not share a slot (checked with the range where reading the values is free: CPU tensors,
        or GPU tensors with ZAYA_KERNELS_CHECK_VALUES=1).
    k_cache, v_cache : [num_blocks, block_size, num_kv_heads, D] in qk's dtype, last dim contiguous, updated in
        place: k_cache[s // block_size, s % block_size] = k[t] (v likewise) for s = slot_mapping[t] >= 0; every
        other element is untouched. On GPU a slot >= num_blocks * block_size is skipped, not checked.

    Returns
    -------
    q, k, v, final_conv_state, final_value_state : as in `cca_prepare`
    """
    return call(torch.ops.zaya.cca_prepare_paged, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight,
                conv1_bias, temperature, positions, cu_seqlens, int(num_q_heads),
                int(num_kv_heads), int(rotary_dim), float(rope_theta), slot_mapping,
                k_cache, v_cache, initial_conv_state, initial_value_state,
                has_initial_state)


def cca_prepare_decode(
    qk: torch.Tensor,
    v_current: torch.Tensor,
    v_delayed: torch.Tensor,
    conv0_weight: torch.Tensor,
    conv0_bias: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    temperature: torch.Tensor,
    positions: torch.Tensor,
    conv_state: torch.Tensor,
    value_state: torch.Tensor,
    state_indices: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    rotary_dim: int,
    rope_theta: float,
    slot_mapping: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
):
    """ZAYA's CCA projection for one new token of each of B sequences, with per-slot states updated in place.

    Same math as `cca_prepare` with the conv and value states of slot state_indices[b] as the history. A zeroed
    slot is a fresh sequence. No host synchronisation (CUDA/HIP-graph safe): the values of state_indices (and
    slot_mapping) are checked only where reading them is free, on CPU tensors, or on GPU tensors with
    ZAYA_KERNELS_CHECK_VALUES=1 (a host synchronisation per call; not under graph capture), as the attention ops
    do. Unchecked on GPU, the Triton and HIP kernels treat an index >= slots like a negative one, and two rows on
    one slot race (which row's state update survives is undefined).

    Parameters
    ----------
    qk : [B, C] A, last dim contiguous, row stride >= C (rows may be padded: a column slice of a wider buffer)
    v_current, v_delayed : [B, num_kv_heads * D / 2], last dim contiguous, row strides >= the width (as qk)
    conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature : as in `cca_prepare`
    positions : [B] int32 / int64
    conv_state : [slots, C, k0 + k1 - 2] float32 / bfloat16 / float16, updated in place
    value_state : [slots, num_kv_heads * D / 2] float32 / bfloat16 / float16, updated in place
    state_indices : [B] int32 / int64   slot of each row; negative = padded row (zero outputs, no state change).
        Two rows must not share a slot (checked with the range, where the values are read: ValueError).
    num_q_heads, num_kv_heads, rotary_dim, rope_theta : as in `cca_prepare`
    slot_mapping : [B] int64 / int32 or None   paged KV-cache slot of each row (block * block_size + offset);
        negative: not written. Given with k_cache and v_cache or not at all.
    k_cache, v_cache : [num_blocks, block_size, num_kv_heads, D] A or None, updated in place (last dim contiguous):
        row b's k and v go to slot slot_mapping[b] unless it is negative or the row is padded (negative
        state index); every other element is untouched. All backends (reference, triton, hip).

    Returns
    -------
    q : [B, num_q_heads, D] A
    k : [B, num_kv_heads, D] A
    v : [B, num_kv_heads, D] A
    """
    return call(torch.ops.zaya.cca_prepare_decode, qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight,
                conv1_bias, temperature, positions, conv_state, value_state,
                state_indices, int(num_q_heads), int(num_kv_heads), int(rotary_dim),
                float(rope_theta), slot_mapping, k_cache, v_cache)


def cca_prepare_batched(
    qk: torch.Tensor,
    v_current: torch.Tensor,
    v_delayed: torch.Tensor,
    conv0_weight: torch.Tensor,
    conv0_bias: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    temperature: torch.Tensor,
    positions: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    rotary_dim: int,
    rope_theta: float,
    attention_mask: torch.Tensor | None = None,
):
    """`cca_prepare` for the batched padded layout transformers uses: B sequences of S tokens (fresh, no cache).

    transformers multiplies the hidden states by the 2D mask before the projections, so with attention_bias=False
    (ZAYA1) a padding token has X = 0 and zero value projections; this wrapper zeroes those rows the same way and
    runs the packed op with every row as one sequence. Left padding is then exact: zeros before a sequence are what
    a fresh sequence sees anyway (X_{t<0} = 0, Y_{-1} = b0, Vd_{-1} = 0), so a left-padded row equals its unpadded
    sequence. Outputs at padding positions are defined (what transformers computes there) but meaningless.

    Parameters
    ----------
    qk : [B, S, C] A;  v_current, v_delayed : [B, S, num_kv_heads * D / 2];  positions : [B, S] int32 / int64
    attention_mask : [B, S] bool / int / float (1 = token, 0 = padding) or None
    the weights, num_q_heads, num_kv_heads, rotary_dim, rope_theta : as in `cca_prepare`

    Returns
    -------
    q : [B, S, num_q_heads, D] A;  k, v : [B, S, num_kv_heads, D] A
    """
    check.tensor(_OP, "qk", qk, ndim=3)
    batch, seq = qk.shape[:2]
    if attention_mask is not None:
        check.tensor(_OP, "attention_mask", attention_mask, shape=(batch, seq), device=qk.device)
        keep = attention_mask[..., None]
        qk, v_current, v_delayed = (t * keep.to(t.dtype) for t in (qk, v_current, v_delayed))
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=qk.device) * seq
    rows = batch * seq  # reshapes with the last size given: an empty batch (B or S = 0) has no -1 to infer

    def as_rows(t):  # [rows, width], a view where one does (row-strided slices of a stacked GEMM), else a copy
        t = t.reshape(rows, t.shape[-1])
        return t if check.is_row_strided(t) else t.contiguous()

    q, k, v, _, _ = cca_prepare(
        as_rows(qk), as_rows(v_current), as_rows(v_delayed), conv0_weight, conv0_bias, conv1_weight, conv1_bias,
        temperature, positions.reshape(-1).contiguous(), cu_seqlens, num_q_heads, num_kv_heads, rotary_dim,
        rope_theta)
    return q.view(batch, seq, *q.shape[1:]), k.view(batch, seq, *k.shape[1:]), v.view(batch, seq, *v.shape[1:])
