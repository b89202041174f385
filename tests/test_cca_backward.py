"""The Triton backward of zaya::cca_prepare (zaya_kernels/triton/cca.py, backward section) against the reference backward
(autograd through the reference forward, itself gradchecked in float64 in test_cca.py): called directly, and through
the autograd of torch.ops.zaya.cca_prepare under the triton backend. On CPU the kernels run under the Triton
interpreter in fp32 (and fp16 for the rounded-operand dot path); on a GPU at ZAYA1-8B shapes in bf16 and fp32."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zaya_kernels
from zaya_kernels.reference import cca as ref

from helpers import assert_close
from test_cca import Case

GRAD_NAMES = ("qk", "v_current", "v_delayed", "conv0_weight", "conv0_bias", "conv1_weight", "conv1_bias",
              "temperature")
OUTPUT_NAMES = ("q", "k", "v", "final_conv_state", "final_value_state")


def _output_grads(case, present, seed):
    """Random incoming gradients for the five outputs of cca_prepare; None where present[i] is False."""
    shapes = ((case.num_q, case.head_dim), (case.num_kv, case.head_dim), (case.num_kv, case.head_dim))
    tokens, num_seqs = sum(case.lengths), len(case.lengths)
    all_shapes = [(tokens, *s) for s in shapes] + [(num_seqs, case.channels, case.state_len),
                                                    (num_seqs, case.value_dim)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(case.device) if keep else None
            for shape, keep in zip(all_shapes, present)]


def _reduction(case):
    """The longest fp32 sum behind a gradient: the weight gradients sum k0 k1 D-term products over all tokens."""
    return case.reduction() * max(1, sum(case.lengths))


def _check_backward(case, present, seed, dtype=None):
    grads = _output_grads(case, present, seed)
    with zaya_kernels.use_backend("triton"):
        actual = torch.ops.zaya.cca_prepare_backward(*grads, *case.prefill_args())
    assert zaya_kernels.last_backend("cca_prepare_backward") == "triton"
    expected = ref.cca_prepare_backward(*grads, *case.prefill_args())
    for name, a, e, inp in zip(GRAD_NAMES, actual, expected, case.prefill_args()[:8]):
        assert a.dtype == inp.dtype and a.shape == inp.shape, name
        scale = _temperature_grad_scale(case, grads[1]) if name == "temperature" else 0.0
        assert_close(a, e, dtype=dtype, reduction=_reduction(case), what=f"triton backward grad {name}", scale=scale)
    return actual


def _temperature_grad_scale(case, grad_k):
    """The root-sum-square of the terms a kv head's temperature gradient adds up, grad_k * k / temp over its tokens
    and dims (RoPE rotates both alike), largest over heads: the gradient is one number per head, which can be a small
    remainder of those terms, so its own size is no scale for its rounding (a fuzzed draw: 0.227 of terms whose
    rounding left 1.7e-5 relative)."""
    if grad_k is None or not sum(case.lengths):
        return 0.0
    args = list(case.prefill_args())
    args[7] = torch.ones_like(args[7])  # temperature 1: k / temp
    unit_k = ref.cca_prepare(*args)[1]
    return (grad_k.double() * unit_k.double()).pow(2).sum((0, 2)).sqrt().max().item()


# (num_q, num_kv): GQA ratios 1, 2 and 4
heads_st = st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2), (4, 1)])
kernel_st = st.integers(1, 4)
# 33 tokens cross the grad-z (16) and grad-x (32) tiles; 0 is an empty sequence between others
lengths_st = st.lists(st.sampled_from([0, 1, 2, 3, 33]), min_size=1, max_size=3).filter(lambda ls: sum(ls) <= 40)


@settings(max_examples=6)
@given(heads=heads_st, head_dim=st.sampled_from([16, 32]), k0=kernel_st, k1=kernel_st, lengths=lengths_st,
       rotary=st.sampled_from(["zero", "half", "full"]), with_init=st.booleans(),
       present=st.lists(st.booleans(), min_size=5, max_size=5), seed=st.integers(0, 2**16))
# ZAYA's kernels, a long sequence behind two short ones, every gradient given
@example(heads=(4, 2), head_dim=16, k0=2, k1=2, lengths=[1, 2, 33], rotary="half", with_init=True,
         present=[True] * 5, seed=0)
# the widest halo, rotary over the whole head, no token gradient for q and no final conv-state gradient
@example(heads=(4, 1), head_dim=32, k0=4, k1=4, lengths=[3, 0, 2], rotary="full", with_init=True,
         present=[False, True, True, False, True], seed=1)
# no halo at all, no rotary, only the state gradients
@example(heads=(2, 2), head_dim=16, k0=1, k1=1, lengths=[2, 1], rotary="zero", with_init=False,
         present=[False, False, False, True, True], seed=2)
# GQA 8: eight query heads share one kv head (and 16 on 2), every gradient given
@example(heads=(8, 1), head_dim=16, k0=2, k1=2, lengths=[3, 33], rotary="half", with_init=True, present=[True] * 5,
         seed=3)
@example(heads=(16, 2), head_dim=16, k0=4, k1=4, lengths=[2, 5], rotary="full", with_init=True, present=[True] * 5,
         seed=4)
# one kv head whose temperature gradient is a remainder of its 192 terms (found by a run with other draws)
@example(heads=(4, 1), head_dim=32, k0=1, k1=1, lengths=[3, 3], rotary="zero", with_init=False,
         present=[True, True, False, False, False], seed=0)
def test_triton_backward_matches_reference(heads, head_dim, k0, k1, lengths, rotary, with_init, present, seed):
    rotary_dim = {"zero": 0, "half": head_dim // 2, "full": head_dim}[rotary]
    case = Case(*heads, head_dim, k0, k1, lengths, seed=seed, rotary_dim=rotary_dim, with_init=with_init)
    _check_backward(case, present, seed)


def test_triton_backward_fp16_rounded_dot_path():
    """fp16 activations: Y, W1 and dZ enter the dots rounded to fp16 (the MFMA / wgmma path on GPU)."""
    case = Case(2, 1, 16, 2, 2, [5, 1, 3], dtype=torch.float16, seed=4, with_init=True)
    _check_backward(case, [True] * 5, 4, dtype=torch.float16)


def test_triton_backward_with_no_gradient_is_zero_and_empty_batches_work():
    case = Case(2, 1, 16, 3, 2, [2, 3], seed=5, with_init=True)
    for grad in _check_backward(case, [False] * 5, 5):
        assert not grad.any()
    # no tokens at all: only zero gradients (the final states are the initial ones, which get none)
    empty = Case(2, 1, 16, 2, 2, [0, 0], seed=6, with_init=True)
    for grad in _check_backward(empty, [True] * 5, 6):
        assert grad.numel() == 0 or not grad.any()


@pytest.mark.parametrize("with_init", [False, True])
def test_autograd_through_the_op_runs_the_triton_backward(with_init):
    """gradcheck-style: gradients of a loss over all five outputs of torch.ops.zaya.cca_prepare (triton forward and
    backward) equal autograd through the reference forward. The loss takes q and k through .sum(), whose incoming
    gradients are expanded (stride-0) tensors."""
    case = Case(4, 2, 16, 2, 3, [5, 1, 18], seed=7, with_init=with_init)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(shape, generator=gen) for shape in ((sum(case.lengths), case.num_kv, case.head_dim),
                                                             (len(case.lengths), case.channels, case.state_len),
                                                             (len(case.lengths), case.value_dim))]

    def grads(fn):
        inputs = [t.detach().clone().requires_grad_(True) for t in case.prefill_args()[:8]]
        q, k, v, conv_state, value_state = fn(*inputs, *case.prefill_args()[8:])
        loss = (q.sum() + 0.5 * k.float().sum() + (v.float() * weights[0]).sum() + (conv_state * weights[1]).sum()
                + (value_state * weights[2]).sum())
        return torch.autograd.grad(loss, inputs)

    with zaya_kernels.use_backend("triton"):
        actual = grads(torch.ops.zaya.cca_prepare)
    assert zaya_kernels.last_backend("cca_prepare") == "triton"
    assert zaya_kernels.last_backend("cca_prepare_backward") == "triton"  # chosen at forward time, run outside
    expected = grads(ref.cca_prepare)
    for name, a, e in zip(GRAD_NAMES, actual, expected):
        assert_close(a, e, reduction=_reduction(case), what=f"autograd grad {name}")


def test_reference_forward_keeps_the_reference_backward():
    case = Case(2, 1, 16, 2, 2, [3], seed=8)
    qk = case.qk.clone().requires_grad_(True)
    with zaya_kernels.use_backend("reference"):
        q = torch.ops.zaya.cca_prepare(qk, *case.prefill_args()[1:])[0]
    with zaya_kernels.use_backend("triton"):  # the request at backward time does not matter: the forward's does
        q.sum().backward()
    assert zaya_kernels.last_backend("cca_prepare_backward") == "reference"


def test_backward_kernels_are_registered_for_the_aot_report():
    import importlib

    from zaya_kernels.triton import _aot

    importlib.import_module("zaya_kernels.triton.cca")  # registers its configurations at import
    for name in ("cca_backward_grad_z", "cca_backward_weights", "cca_backward_grad_x"):
        configs = _aot.AOT_REGISTRY[name].configs
        assert {c.constexprs["HEAD_DIM"] for c in configs} == {128}
        assert {(c.constexprs["NUM_Q"], c.constexprs["NUM_KV"], c.constexprs["K0"], c.constexprs["K1"])
                for c in configs} == {(8, 2, 2, 2)}
        assert any(c.signature["qk_ptr"] == "*bf16" for c in configs)


# ---------------------------------------------------------------- GPU: ZAYA1-8B shapes (n_q 8, n_kv 2, D 128)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lengths,with_init", [([1], False), ([3, 0, 700, 64], True), ([2048], False)])
def test_gpu_triton_backward_matches_reference_and_is_deterministic(dtype, lengths, with_init, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the reference's fp32 convs: no TF32
    case = Case(8, 2, 128, 2, 2, lengths, dtype=dtype, seed=len(lengths), rotary_dim=64, with_init=with_init,
                device="cuda")
    present = [True, True, True, with_init, True]
    actual = _check_backward(case, present, len(lengths), dtype=dtype)
    grads = _output_grads(case, present, len(lengths))
    with zaya_kernels.use_backend("triton"):
        again = torch.ops.zaya.cca_prepare_backward(*grads, *case.prefill_args())
    for name, a, b in zip(GRAD_NAMES, actual, again):
        assert torch.equal(a, b), f"{name}: two runs differ (the partial sums must be deterministic)"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("k0, k1", [(2, 2), (3, 2), (1, 3)])
@pytest.mark.parametrize("lengths", [[3, 0, 1, 4, 2], [0, 0, 0]])
def test_initial_states_get_their_gradients(backend, k0, k1, lengths):
    """Training across chunks: both initial states are differentiable. The value state is Vd_{-1} of each sequence
    that has one (its gradient the delayed half of v's first row, the final value state itself for an empty
    sequence; with attention_bias the modules pass v_proj_delayed's bias here). The conv state is the K raw X
    columns before the chunk: read by the first K tokens, and by the final conv state of a sequence of at most K
    tokens. Nothing for a sequence without has_initial_state (its slot may hold NaN). Against autograd through the
    reference with the states as leaves (fp64), every output with an upstream gradient; also a chunk of no tokens
    (the final states only)."""
    case = Case(4, 2, 8, k0, k1, lengths, seed=3)
    num_seqs = len(case.lengths)
    gen = torch.Generator().manual_seed(4)
    conv = torch.randn(num_seqs, case.channels, case.state_len, generator=gen)
    value = torch.randn(num_seqs, case.value_dim, generator=gen)
    has = torch.tensor([1, 1, 0, 1, 1][:num_seqs], dtype=torch.int32)
    conv[2], value[2] = float("nan"), float("nan")  # a sequence without a state: whatever its slot holds is unused
    args = case.prefill_args()[:14]  # up to rope_theta: the states are given below
    grads = _output_grads(case, (True, True, True, True, True), seed=5)
    leaves = conv.clone().requires_grad_(), value.clone().requires_grad_()
    with zaya_kernels.use_backend(backend):
        outputs = torch.ops.zaya.cca_prepare(*args, *leaves, has)
    loss = sum((o * g).sum() for o, g in zip(outputs, grads) if g is not None)
    actual = torch.autograd.grad(loss, leaves)
    leaves64 = conv.double().requires_grad_(), value.double().requires_grad_()
    with torch.enable_grad():
        expected_outputs = ref.cca_prepare(*[t.double() if t.is_floating_point() else t for t in args[:9]],
                                           *args[9:], *leaves64, has)
        expected_loss = sum((o * g.double()).sum() for o, g in zip(expected_outputs, grads) if g is not None)
        expected = torch.autograd.grad(expected_loss, leaves64)
    for name, a, e in zip(("initial_conv_state", "initial_value_state"), actual, expected):
        assert e[2].abs().max() == 0 and e.abs().max() > 0  # no initial state: no gradient
        assert_close(a, e.float(), reduction=case.reduction(), what=f"{backend} grad {name}")


def test_initial_state_gradients_trace_under_torch_compile():
    """The initial-state gradients need no host read of cu_seqlens: a chunked training step with states that
    require grad compiles fullgraph (AOT autograd traces the backward) and gives eager's gradients."""
    case = Case(2, 1, 8, 2, 2, [3, 1, 0], seed=0, with_init=True)
    args = case.prefill_args()
    leaves = tuple(t.float().clone().requires_grad_() for t in args[14:16])

    def loss(conv, value):
        q, k, v, final_conv, final_value = torch.ops.zaya.cca_prepare(*args[:14], conv, value, args[16])
        return q.sum() + k.square().sum() + v.sum() + final_conv.sum() + final_value.sum()

    expected = torch.autograd.grad(loss(*leaves), leaves)
    actual = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, e in zip(actual, expected):
        assert e.abs().max() > 0 and torch.equal(a, e)
