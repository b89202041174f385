"""zaya_router, zaya_router_backward and router_balance_update: reference vs transformers, Triton vs reference,
the HIP kernel on the host emulation, exact ties, gradients, torch.library integration, bad input, bias balancing
(both modes) and gloo count summation."""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import zaya_kernels
from zaya_kernels.integrations.transformers import update_balancing_biases
from zaya_kernels.ops import new_balance_state, router_balance_update, zaya_router
from zaya_kernels.reference import router as ref

from helpers import EMULATED_WARP_SIZES, assert_close, compile_host_emulation


def make_router_args(t, h, r, c, *, prev=True, dtype=torch.float32, seed=0, requires_grad=False, device="cpu"):
    """Random router inputs in the op's argument order (without return_logits); weights at Linear-init scale,
    norm weight and gamma away from 1, biases and balancing biases non-zero."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=torch.float32):
        out = (torch.randn(*shape, generator=gen) * scale).to(dt).to(device)
        return out.requires_grad_(requires_grad) if dt.is_floating_point else out

    def uniform(*shape, lo, hi):
        out = (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(device)
        return out.requires_grad_(requires_grad)

    x = randn(t, h, dt=dtype)
    r_prev = randn(t, r, dt=dtype) if prev else None
    gamma = uniform(r, lo=0.5, hi=1.5) if prev else None
    args = (x, r_prev, gamma,
            randn(r, h, scale=h ** -0.5, dt=dtype), randn(r, scale=0.1), uniform(r, lo=0.5, hi=1.5),
            randn(r, r, scale=2 * r ** -0.5, dt=dtype), randn(r, scale=0.1),
            randn(r, r, scale=2 * r ** -0.5, dt=dtype), randn(r, scale=0.1),
            randn(c, r, scale=2 * r ** -0.5, dt=dtype),
            (torch.randn(c, generator=gen) * 0.05).to(device), 1e-5)
    return args


def check_choice(index, weight, probs, balance_bias, what, dtype=torch.float32, tie_tol=1e-5):
    """index is a valid biased top-1 of the reference probabilities (up to near-ties within tie_tol), and
    weight = p[index] (to the tolerance of `dtype`)."""
    biased = probs.double() + balance_bias.double()
    picked = biased.gather(-1, index.long()[:, None]).squeeze(-1)
    assert (picked >= biased.max(-1).values - tie_tol).all(), f"{what}: a choice is not the biased argmax"
    assert_close(weight, probs.gather(-1, index.long()[:, None]).squeeze(-1), dtype=dtype,
                 reduction=probs.shape[-1] * 4, what=f"{what} weight")


# ---------------------------------------------------------------- the reference vs transformers
def _hf_routers(h, r, num_experts, layers, seed):
    from transformers.models.zaya.modeling_zaya import ZayaRouter

    config = SimpleNamespace(hidden_size=h, num_experts=num_experts, num_experts_per_tok=1, router_hidden_size=r,
                             rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    routers = [ZayaRouter(config, layer) for layer in range(layers)]
    with torch.no_grad():
        for router in routers:
            for name, p in router.named_parameters():
                if "norm" in name or "router_states_scale" in name:
                    p.uniform_(0.5, 1.5)  # RMSNorm weight and gamma away from 1
                elif p.dim() == 1:
                    p.normal_(0, 0.1)
                else:
                    p.normal_(0, 2 * p.shape[1] ** -0.5)
            router.balancing_biases.normal_(0, 0.3)
    return routers


def _args_of(router, x, r_prev):
    mlp = router.router_mlp
    gamma = router.router_states_scale if router.use_eda else None
    return (x, r_prev, gamma, router.down_proj.weight, router.down_proj.bias, mlp.norm.weight, mlp.fc1.weight,
            mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.out_proj.weight, router.balancing_biases,
            mlp.norm.variance_epsilon)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matches_transformers_router_eda_chain(backend):
    """Three layers of transformers' ZayaRouter (EDA state carried, gamma != 1, non-zero balancing biases) against
    the op, fp32. transformers reports the skip class as index 0 with weight 0; the op as index E with w = p[E]."""
    b, s, h, r, num_experts = 2, 7, 48, 24, 6
    routers = _hf_routers(h, r, num_experts, 3, seed=1)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(b, s, h, generator=gen) for _ in routers]
    hf_state, op_state, differs = None, None, 0
    with torch.no_grad(), zaya_kernels.use_backend(backend):
        for layer, (router, x) in enumerate(zip(routers, xs)):
            hf_logits, hf_w, hf_index, hf_state = router(x, router_states=hf_state)
            index, weight, op_state, logits = zaya_router(*_args_of(router, x, op_state), return_logits=True)
            what = f"{backend} layer {layer}"
            assert_close(logits.view(-1, num_experts + 1), hf_logits, reduction=h, what=f"{what} logits")
            assert_close(op_state, hf_state, reduction=h, what=f"{what} r")
            index, weight = index.view(-1), weight.view(-1)
            skip = index == num_experts
            assert torch.equal(torch.where(skip, 0, index), hf_index.view(-1).int()), what
            assert_close(torch.where(skip, 0.0, weight), hf_w.view(-1), reduction=num_experts, what=f"{what} w")
            probs = torch.softmax(hf_logits, -1)
            differs += int((probs.argmax(-1).int() != index).sum())
    assert differs > 0, "no token had a biased choice different from the unbiased one: the test lost its bite"
    assert op_state.shape == (b, s, r)


def test_reference_ties_go_to_lowest_index_and_skip_is_e():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    bias = torch.tensor([0.0, 0.0, 0.1, -1.0])
    assert ref.select(probs, bias).tolist() == [2, 2, 0]
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5])
    assert ref.select(probs, bias).tolist() == [3, 3, 3]
    assert ref.select(probs, torch.zeros(4)).dtype == torch.int32
    assert ref.select(probs[:1], torch.zeros(4)).tolist() == [0]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inside the interpreter
def test_nan_scores_choose_the_skip_class_on_every_backend(router_emulation):
    """A NaN in a token's input (every probability NaN) or in one class's balancing bias: the reference, the Triton
    kernel and the HIP kernel (emulated) all choose the skip class for the affected rows; the weight is NaN where
    the probabilities are."""
    args = list(make_router_args(3, 8, 6, 4, prev=False, seed=0))
    args[0] = args[0].clone()
    args[0][1, 2] = float("nan")
    nan_bias = list(args)
    nan_bias[0], nan_bias[11] = make_router_args(3, 8, 6, 4, prev=False, seed=0)[0], args[11].clone()
    nan_bias[11][1] = float("nan")
    expected_free = ref.zaya_router(*args, False)[0]
    for backend in ("reference", "triton", "hip-emulated"):
        for case, rows in ((args, [1]), (nan_bias, [0, 1, 2])):
            if backend == "hip-emulated":
                index, weight, _, _ = _emulated_router(router_emulation, tuple(case))
            else:
                with zaya_kernels.use_backend(backend):
                    index, weight, _, _ = torch.ops.zaya.zaya_router(*case, False)
            assert index[rows].tolist() == [3] * len(rows), (backend, index)
            if case is args:
                assert torch.isnan(weight[1]) and torch.isfinite(weight[[0, 2]]).all(), backend
                assert index[[0, 2]].tolist() == expected_free[[0, 2]].tolist(), backend
            else:
                assert torch.isfinite(weight).all(), backend


# ---------------------------------------------------------------- Triton (interpreter on CPU) vs the reference
@settings(max_examples=25)
@given(t=st.sampled_from([0, 1, 2, 5, 16, 17, 33, 40, 70]), h=st.integers(1, 80), r=st.integers(1, 40),
       c=st.integers(2, 20), prev=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       return_logits=st.booleans(), split_chunk=st.sampled_from([256, 16]), seed=st.integers(0, 2**16))
@example(t=0, h=7, r=5, c=3, prev=True, dtype=torch.float32, return_logits=True, split_chunk=16, seed=0)
@example(t=1, h=33, r=17, c=17, prev=True, dtype=torch.float32, return_logits=True, split_chunk=16, seed=1)
@example(t=1, h=1, r=1, c=2, prev=False, dtype=torch.float32, return_logits=False, split_chunk=256, seed=2)
@example(t=17, h=65, r=31, c=9, prev=True, dtype=torch.float16, return_logits=True, split_chunk=16, seed=3)
@example(t=40, h=80, r=40, c=20, prev=False, dtype=torch.float32, return_logits=True, split_chunk=256, seed=4)
@example(t=70, h=48, r=24, c=5, prev=True, dtype=torch.float16, return_logits=False, split_chunk=16, seed=7)  # prefill
@example(t=5, h=24, r=16, c=65, prev=True, dtype=torch.float32, return_logits=True, split_chunk=16, seed=5)  # BLOCK_E 128
# BLOCK_R 512 (R past 256): BLOCK_T and BLOCK_K capped at 16: three token tiles, three K steps over H
@example(t=40, h=40, r=300, c=17, prev=True, dtype=torch.float32, return_logits=True, split_chunk=256, seed=6)
def test_triton_forward_matches_reference(t, h, r, c, prev, dtype, return_logits, split_chunk, seed):
    """split_chunk 16 makes decode launches (T <= 64) split the down projection over H even at these small H."""
    from zaya_kernels.triton import router as tri

    args = make_router_args(t, h, r, c, prev=prev, dtype=dtype, seed=seed)
    saved, tri.SPLIT_CHUNK_H = tri.SPLIT_CHUNK_H, split_chunk
    try:
        with zaya_kernels.use_backend("triton"):
            index, weight, r_out, logits = torch.ops.zaya.zaya_router(*args, return_logits)
    finally:
        tri.SPLIT_CHUNK_H = saved
    if t:
        counters = tri._COUNTERS.get(torch.device("cpu"))
        assert counters is None or counters.abs().max() == 0, "split decode left an arrival counter non-zero"
    assert zaya_kernels.last_backend("zaya_router") == "triton"
    e_index, e_weight, e_r, e_logits = ref.zaya_router(*args, True)
    assert index.dtype == torch.int32 and weight.dtype == torch.float32 and r_out.dtype == dtype
    assert (logits is None) == (not return_logits)
    assert_close(r_out, e_r, dtype=dtype, reduction=h, what="r")
    if t == 0:
        assert index.shape == (0,) and r_out.shape == (0, r)
        return
    # fp16: an r element may round to the neighbouring fp16 value, which then feeds the MLP
    tol_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    if return_logits:
        assert_close(logits, e_logits, dtype=tol_dtype, reduction=max(h, r), scale=1.0, what="logits")
    fp32 = dtype == torch.float32
    check_choice(index, weight, torch.softmax(e_logits, -1), args[11], what=f"triton T={t} H={h} R={r} C={c}",
                 dtype=tol_dtype, tie_tol=1e-5 if fp32 else 1e-2)


def test_triton_norm_reads_r_rounded_to_the_activation_dtype():
    """The router state r is rounded to x.dtype and the RMSNorm reads that rounded r (the reference's precision
    model; transformers stores r in the activation dtype too). fp16 x with fp32 weights, fc1 = A * I with the
    bias -A * u_ref: the reference's z1 is ~0, and the unrounded r would move it by A * (r's fp16 rounding), ~1."""
    amp, h = 1.0e4, 16
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, h, generator=gen).half()
        down_w = torch.randn(h, h, generator=gen) * h ** -0.5
        zeros = torch.zeros(h)
        r_ref = ref.router_state(x, None, None, down_w, zeros).half().float()
        assert not torch.equal(r_ref, ref.router_state(x, None, None, down_w, zeros)), "r must need rounding"
        u_ref = r_ref * torch.rsqrt(r_ref.pow(2).mean(-1, keepdim=True) + 1e-5)
        out_w = torch.randn(3, h, generator=gen)
        args = (x, None, None, down_w, zeros, torch.ones(h), amp * torch.eye(h), -amp * u_ref[0], torch.eye(h), zeros,
                out_w, torch.zeros(3), 1e-5)
        with zaya_kernels.use_backend("triton"):
            _, _, _, logits = torch.ops.zaya.zaya_router(*args, True)
        _, _, _, e_logits = ref.zaya_router(*args, True)
        assert_close(logits, e_logits, dtype=torch.float32, reduction=h, scale=amp, what=f"seed {seed}")


# ---------------------------------------------------------------- gradients
def _loss(outputs, seed):
    index, weight, r, logits = outputs
    gen = torch.Generator().manual_seed(seed)
    loss = (weight * torch.randn(weight.shape, generator=gen)).sum() + (r.float() * torch.randn(r.shape, generator=gen)).sum()
    if logits is not None:
        loss = loss + (logits * torch.randn(logits.shape, generator=gen)).sum()
    return loss


def _reference_at(args, index, return_logits):
    """ref.zaya_router's outputs with the choice fixed to `index` (autograd runs through them): the gradient flows
    through w = p[e*] at the choice the op made, so a near-tie the op broke differently in bf16 does not matter."""
    x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, _, eps = args
    r = ref.router_state(x, r_prev, gamma, down_w, down_b).to(x.dtype)
    logits = ref.router_logits_from_state(r, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, eps)
    weight = torch.softmax(logits, -1).gather(-1, index.long()[:, None]).squeeze(-1)
    return index, weight, r, (logits if return_logits else None)


@settings(max_examples=16)
@given(t=st.sampled_from([0, 1, 2, 5, 9, 17]), h=st.integers(1, 40), r=st.integers(2, 24), c=st.integers(2, 65),
       prev=st.booleans(), return_logits=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       backend=st.sampled_from(["reference", "triton"]), seed=st.integers(0, 2**16))
@example(t=9, h=24, r=12, c=5, prev=True, return_logits=True, dtype=torch.float32, backend="triton", seed=3)
@example(t=9, h=24, r=12, c=5, prev=False, return_logits=False, dtype=torch.float32, backend="reference", seed=3)
@example(t=5, h=33, r=16, c=65, prev=True, return_logits=False, dtype=torch.bfloat16, backend="triton", seed=1)
@example(t=0, h=8, r=4, c=3, prev=True, return_logits=True, dtype=torch.bfloat16, backend="reference", seed=2)
def test_gradients_match_autograd_through_reference(t, h, r, c, prev, return_logits, dtype, backend, seed):
    """The op's backward (zaya_router_backward's explicit chain rule, fp32) against autograd through the reference,
    at the op's choice. Tolerance: helpers.tolerance of the input dtype (bf16: autograd rounds the gradient to bf16
    at every cast of the forward, the backward keeps fp32) over the longest reduction, at the scale of the terms:
    parameter gradients sum over the T tokens (x T), and d w / d logits = w (onehot - p) cancels to 1 - w of its
    terms on a confident token (x 1 / (1 - max w), both sides compute that difference their own way)."""
    args = make_router_args(t, h, r, c, prev=prev, dtype=dtype, seed=seed, requires_grad=True)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with zaya_kernels.use_backend(backend):
        outputs = torch.ops.zaya.zaya_router(*args, return_logits)
        actual = torch.autograd.grad(_loss(outputs, seed + 1), inputs)
    assert zaya_kernels.last_backend("zaya_router_backward") == "reference"
    expected = torch.autograd.grad(_loss(_reference_at(args, outputs[0], return_logits), seed + 1), inputs)
    confidence = 1.0 / max(1.0 - (outputs[1].max().item() if t else 0.0), 1e-3)
    for inp, a, e in zip(inputs, actual, expected):
        assert a.dtype == inp.dtype and a.shape == inp.shape
        rows = 1 if inp is args[0] or inp is args[1] else max(t, 1)  # parameter gradients sum over the tokens
        scale = (e.abs().max().item() if e.numel() else 0.0) * rows * confidence
        assert_close(a, e, dtype=dtype, reduction=max(t, h, r, c), scale=scale,
                     what=f"{backend} {dtype} T={t} H={h} R={r} C={c}: grad {tuple(inp.shape)}")


def test_gradients_through_weight_only():
    """w = p[e*]: the only path when r and logits are unused; a nonzero gradient reaches the first layer."""
    args = make_router_args(4, 8, 6, 3, prev=True, seed=5, requires_grad=True)
    _, weight, _, _ = torch.ops.zaya.zaya_router(*args, False)
    grads = torch.autograd.grad(weight.sum(), [args[0], args[3], args[10]])
    expected = torch.autograd.grad(ref.zaya_router(*args)[1].sum(), [args[0], args[3], args[10]])
    for a, e in zip(grads, expected):
        assert e.abs().max() > 0
        assert_close(a, e, reduction=32, scale=e.abs().max().item() * 4, what="grad via w")


# ---------------------------------------------------------------- torch.library integration
# opcheck runs every check but test_aot_dispatch_dynamic here: that check's harness (torch.testing._internal.optests.
# aot_autograd, call_forwards_backwards) sums the op's outputs into one accumulator `sm = 0; sm += out.sum().abs()`
# in output order, and the schema's first output is the int32 expert index, so `sm` becomes an int64 tensor and the
# next, fp32 output fails the in-place add ("result type Float can't be cast to the desired output type Long") inside
# opcheck, before anything of the op is compared. The schema's output order is the contract, so
# test_aot_dispatch_dynamic_index_last runs that same check (aot_autograd_check, dynamic shapes, gradients compared)
# on the op with its outputs reordered to put the index last.
_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("prev,return_logits", [(True, True), (False, False)])
def test_opcheck(backend, prev, return_logits):
    args = make_router_args(5, 20, 16, 4, prev=prev, seed=0, requires_grad=True)
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.zaya_router.default, (*args, return_logits), test_utils=_OPCHECK_UTILS)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("prev,return_logits", [(True, True), (False, False)])
def test_aot_dispatch_dynamic_index_last(backend, prev, return_logits):
    """opcheck's test_aot_dispatch_dynamic (see above), on the op with the int32 index moved to the last output."""
    from torch.testing._internal.optests.aot_autograd import aot_autograd_check

    def index_last(*a):
        a = [x.clone() if isinstance(x, torch.Tensor) else x for x in a]  # as opcheck's wrapper: no input mutation
        index, weight, r, logits = torch.ops.zaya.zaya_router.default(*a)
        return weight, r, logits, index

    args = make_router_args(5, 20, 16, 4, prev=prev, seed=0, requires_grad=True)
    with zaya_kernels.use_backend(backend):
        aot_autograd_check(index_last, (*args, return_logits), {}, dynamic=True, check_gradients="auto",
                           assert_equals_fn=torch.testing.assert_close)


def test_opcheck_backward_and_balance_ops():
    args = make_router_args(5, 20, 16, 4, prev=True, seed=0)
    index, weight, r, logits = ref.zaya_router(*args, True)
    torch.library.opcheck(torch.ops.zaya.zaya_router_backward.default,
                          (torch.randn(5), torch.randn(5, 16), torch.randn(5, 4), index, *args[:11], 1e-5))
    state, step = new_balance_state(4)
    torch.library.opcheck(torch.ops.zaya.router_balance_update.default,
                          (torch.tensor([3, 1, 0, 1]), torch.zeros(4), state, step, 0, True, 1e-3, 0.9, 0.999, 1e-8,
                           0.1, 0.01, 0.0))


def test_torch_compile_forward_backward():
    args = make_router_args(6, 16, 8, 5, prev=True, seed=0, requires_grad=True)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def route(*a):
        index, weight, r, logits = torch.ops.zaya.zaya_router(*a, True)
        return index, (weight * 2).sum() + r.pow(2).sum() + logits.sin().sum()

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    (index, loss), (e_index, e_loss) = compiled(*args), route(*args)
    assert torch.equal(index, e_index) and torch.equal(loss, e_loss)
    for a, e in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(e_loss, inputs)):
        assert torch.equal(a, e)


def test_typed_wrapper_takes_leading_dims():
    args = list(make_router_args(6, 16, 8, 5, prev=True, seed=0))
    flat = ref.zaya_router(*args, True)
    args[0], args[1] = args[0].view(2, 3, 16), args[1].view(2, 3, 8)
    index, weight, r, logits = zaya_router(*args, return_logits=True)
    assert index.shape == (2, 3) and r.shape == (2, 3, 8) and logits.shape == (2, 3, 5)
    assert torch.equal(index.view(-1), flat[0]) and torch.equal(logits.view(6, 5), flat[3])


# ---------------------------------------------------------------- bad input
def _bad(i, value):
    def mutate(a):
        a[i] = value(a) if callable(value) else value
    return mutate


@pytest.mark.parametrize(
    "mutate, exc, message",
    [
        (_bad(11, torch.zeros(6)), ValueError, "expert count mismatch: `balance_bias` has 6 classes but `out_w` has 5"),
        (_bad(11, torch.zeros(5, dtype=torch.bfloat16)), TypeError, "`balance_bias` must have dtype"),
        (_bad(0, lambda a: a[0].to(torch.int32)), TypeError, "`x` must have dtype"),
        (_bad(6, lambda a: a[6].half()), TypeError, "`fc1_w` must have dtype"),
        (_bad(1, lambda a: a[1].half()), TypeError, "`r_prev` must have dtype"),
        (_bad(1, torch.zeros(3, 8)), ValueError, "token count mismatch: `r_prev` has 3 rows but `x` has 4"),
        (_bad(2, None), ValueError, "r_prev given but gamma missing"),
        (_bad(3, torch.zeros(8, 15)), ValueError, "`down_w` must have shape"),
        (_bad(10, torch.zeros(5, 7)), ValueError, "`out_w` must have shape"),
        (_bad(10, torch.zeros(1, 8)), ValueError, "E\\+1 >= 2"),
        (_bad(0, lambda a: torch.zeros(16, 4).t()), ValueError, "`x` must be contiguous"),
        (_bad(12, -1.0), ValueError, "`eps` must be a non-negative float"),
    ],
)
def test_bad_input_raises_clear_error(mutate, exc, message):
    args = list(make_router_args(4, 16, 8, 5, prev=True, seed=0))
    mutate(args)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.zaya_router(*args, False)


def test_balance_bad_input():
    state, step = new_balance_state(5)
    with pytest.raises(ValueError, match="`expert_index` values must lie in \\[0, 4\\]"):
        router_balance_update(torch.tensor([0, 5]), torch.zeros(5), state, step)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        router_balance_update(torch.tensor([0]), torch.zeros(5), state, step, mode="sgd")
    with pytest.raises(ValueError, match="expert count mismatch: `counts` has 4 classes"):
        torch.ops.zaya.router_balance_update(torch.zeros(4), torch.zeros(5), state, step, 0, True, 1e-3, 0.9,
                                             0.999, 1e-8, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError, match="`state` must have dtype"):
        router_balance_update(torch.tensor([0]), torch.zeros(5), state.double(), step)
    bias = torch.zeros(5)
    with pytest.raises(ValueError, match="`counts` must be >= 0"):
        router_balance_update(None, bias, state, step, counts=torch.tensor([-3, 1, 1, 1, 1]))
    assert bias.abs().max() == 0


def test_router_wrapper_pairs_r_prev_with_x_token_by_token():
    x, r_prev, gamma, *weights = make_router_args(6, 16, 8, 5, prev=True, seed=0)[:13]
    with pytest.raises(ValueError, match=r"`r_prev` must be \[..., R\] with x's leading shape \(2, 3\)"):
        zaya_router(x.view(2, 3, 16), r_prev.view(3, 2, 8), gamma, *weights)
    index, *_ = zaya_router(x.view(2, 3, 16), r_prev.view(2, 3, 8), gamma, *weights)
    assert index.shape == (2, 3)


# ---------------------------------------------------------------- bias balancing
def _skewed_probs(t, num_experts, seed):
    """Router probabilities whose logits favour the first few experts; the skip class starts rarely chosen."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, num_experts + 1, generator=gen)
    logits[:, :3] += torch.tensor([2.0, 1.5, 1.0])
    return torch.softmax(logits, -1)


def _imbalance(index, num_experts):
    counts = torch.bincount(index.long(), minlength=num_experts + 1)[:num_experts].float()
    return (counts.max() / counts.mean()).item()


@pytest.mark.parametrize("mode,include_skip,kwargs", [
    ("adamw", True, dict(lr=5e-3)),
    ("adamw", False, dict(lr=5e-3)),
    ("pid", True, dict(kp=0.2, ki=0.02, kd=0.05)),
    ("pid", False, dict(kp=0.2, ki=0.02, kd=0.05)),
])
def test_balancing_brings_load_imbalance_below_1_1(mode, include_skip, kwargs):
    num_experts, t, max_steps = 8, 2048, 300
    probs = _skewed_probs(t, num_experts, seed=0)
    bias = torch.zeros(num_experts + 1)
    bias[-1] = -1.0
    state, step = new_balance_state(num_experts + 1)
    start = _imbalance(ref.select(probs, bias), num_experts)
    assert start > 2.0
    history = []
    for _ in range(max_steps):
        index = ref.select(probs, bias)
        history.append(_imbalance(index, num_experts))
        counts, loads = router_balance_update(index, bias, state, step, mode=mode, include_skip=include_skip, **kwargs)
        assert counts.sum() == t and torch.allclose(loads.sum(), torch.tensor(1.0))
        if len(history) >= 10 and max(history[-10:]) < 1.1:
            break
    assert max(history[-10:]) < 1.1, f"{mode}: imbalance {history[0]:.2f} -> {history[-10:]} after {len(history)} steps"
    assert step.item() == len(history)
    if not include_skip:
        assert bias[-1].item() == -1.0 and state[:, -1].abs().max() == 0  # frozen skip class


def test_balance_step_without_tokens_changes_nothing():
    state, step = new_balance_state(4)
    bias = torch.tensor([0.1, 0.0, -0.1, -1.0])
    before = bias.clone()
    counts, loads = router_balance_update(torch.zeros(0, dtype=torch.int32), bias, state, step)
    assert torch.equal(bias, before) and step.item() == 0 and counts.sum() == 0 and loads.abs().max() == 0


@pytest.mark.parametrize("mode", ["adamw", "pid"])
def test_balance_from_accumulated_counts_equals_from_the_choices(mode):
    """Counts summed over micro-batches with expert_class_counts (what training keeps instead of every choice) give
    the update of the concatenated choices; exactly one of expert_index / counts is accepted."""
    from zaya_kernels.ops import expert_class_counts

    chunks = [torch.tensor([0, 4, 4, 2]), torch.tensor([], dtype=torch.int64), torch.tensor([1, 4, 0, 0, 3])]
    counts = sum(expert_class_counts(c, 5) for c in chunks)
    assert counts.tolist() == [3, 1, 1, 1, 3]
    results = []
    for kwargs in (dict(expert_index=torch.cat(chunks)), dict(expert_index=None, counts=counts)):
        state, step = new_balance_state(5)
        bias = torch.linspace(-0.2, 0.2, 5)
        index = kwargs.pop("expert_index")
        results.append((*router_balance_update(index, bias, state, step, mode=mode, **kwargs), bias, state))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    state, step = new_balance_state(5)
    with pytest.raises(ValueError, match="exactly one of `expert_index` and `counts`"):
        router_balance_update(None, torch.zeros(5), state, step)
    with pytest.raises(ValueError, match="`counts` must be an integer tensor of shape \\(5,\\)"):
        router_balance_update(None, torch.zeros(5), state, step, counts=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="values must lie in \\[0, 4\\]"):
        expert_class_counts(torch.tensor([0, 5]), 5, check_range=True)


def test_balance_adamw_first_step_is_lr_sign():
    """Bias-corrected AdamW's first step is lr * sign(error) (up to eps): overloaded classes go down by lr."""
    state, step = new_balance_state(4)
    bias = torch.zeros(4)
    router_balance_update(torch.tensor([0, 0, 0, 1, 2, 3, 0, 1]), bias, state, step, lr=1e-3)
    # loads 4/8, 2/8, 1/8, 1/8 vs target 1/4
    assert_close(bias, torch.tensor([-1e-3, 0.0, 1e-3, 1e-3]), scale=1e-3)


def test_balance_pid_steps_follow_the_formula():
    """Two PID steps against the rule written out in fp64: no derivative term on the first step, the second's
    derivative is err2 - err1 (the stored previous error); with include_skip=False the skip class stays frozen and
    the target is 1/E. (The convergence tests cannot tell a wrong derivative from the right one.)"""
    kp, ki, kd = 0.1, 0.01, 0.5
    for include_skip in (True, False):
        state, step = new_balance_state(4)
        bias = torch.zeros(4)
        counts = ([4, 2, 1, 1], [1, 1, 1, 5])
        errors = []
        for c in counts:
            router_balance_update(None, bias, state, step, counts=torch.tensor(c), mode="pid",
                                  include_skip=include_skip, kp=kp, ki=ki, kd=kd)
            n = 4 if include_skip else 3
            total = sum(c) if include_skip else sum(c[:3])
            errors.append([c[i] / total - 1.0 / n if (include_skip or i < 3) else 0.0 for i in range(4)])
        e1, e2 = errors
        expected = [-((kp + ki) * e1[i]) - (kp * e2[i] + ki * (e1[i] + e2[i]) + kd * (e2[i] - e1[i]))
                    for i in range(4)]
        assert_close(bias, torch.tensor(expected, dtype=torch.float64), dtype=torch.float32, scale=0.1,
                     what=f"include_skip={include_skip}")
        assert step.item() == 2


def test_balance_adamw_two_steps_follow_the_formula():
    """Two AdamW steps against the rule written out in fp64: the second step's bias corrections use t = 2 (the
    first step alone cannot tell t = 1 from t = 2)."""
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    state, step = new_balance_state(4)
    bias = torch.zeros(4)
    m, v, expected = [0.0] * 4, [0.0] * 4, [0.0] * 4
    for t, c in enumerate(([4, 2, 1, 1], [1, 1, 1, 5]), start=1):
        router_balance_update(None, bias, state, step, counts=torch.tensor(c), lr=lr, betas=(b1, b2), eps=eps)
        for i in range(4):
            err = c[i] / sum(c) - 0.25
            m[i] = b1 * m[i] + (1 - b1) * err
            v[i] = b2 * v[i] + (1 - b2) * err * err
            expected[i] -= lr * (m[i] / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
    assert_close(bias, torch.tensor(expected, dtype=torch.float64), dtype=torch.float32, scale=lr)
    assert step.item() == 2


def _fake_balanced_model(num_layers, num_classes):
    """What update_balancing_biases reads of a model: layers[i].mlp.gate.balancing_biases and the recorded counts."""
    return SimpleNamespace(layers=[SimpleNamespace(mlp=SimpleNamespace(
        gate=SimpleNamespace(balancing_biases=torch.zeros(num_classes)), _zaya_class_counts=None))
        for _ in range(num_layers)])


@pytest.mark.parametrize("mode", ["adamw", "pid"])
def test_balancing_state_dict_resumes_the_same_trajectory(mode):
    """A training checkpoint with balancing_state_dict continues the controllers exactly (AdamW moments and step
    count, PID integral); restarting them from zero would not."""
    from zaya_kernels.integrations.transformers import balancing_state_dict, load_balancing_state_dict

    gen = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 9, (2, 5), generator=gen) for _ in range(4)]
    controller = dict(lr=0.1) if mode == "adamw" else dict(kp=0.5, ki=0.2, kd=0.1)

    def step(model, counts):
        for layer, c in zip(model.layers, counts):
            layer.mlp._zaya_class_counts = c
        update_balancing_biases(model, mode=mode, **controller)

    original, resumed, restarted = (_fake_balanced_model(2, 5) for _ in range(3))
    for counts in steps[:3]:
        step(original, counts)
    checkpoint = balancing_state_dict(original)
    assert sorted(checkpoint) == [f"layers.0.{mode}", f"layers.1.{mode}"]
    for model in (resumed, restarted):
        for layer, source in zip(model.layers, original.layers):
            layer.mlp.gate.balancing_biases.copy_(source.mlp.gate.balancing_biases)
    load_balancing_state_dict(resumed, checkpoint)
    for model in (original, resumed, restarted):
        step(model, steps[3])
    for a, b, c in zip(original.layers, resumed.layers, restarted.layers):
        assert torch.equal(a.mlp.gate.balancing_biases, b.mlp.gate.balancing_biases)
        assert not torch.equal(a.mlp.gate.balancing_biases, c.mlp.gate.balancing_biases)
    with pytest.raises(ValueError, match="unknown entry 'layers.7.adamw'"):
        load_balancing_state_dict(resumed, {"layers.7.adamw": checkpoint[f"layers.0.{mode}"]})


# ---------------------------------------------------------------- torch.distributed: counts summed over ranks
def _gloo_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        index = torch.tensor([0, 0, 1] if rank == 0 else [2, 2, 2, 3], dtype=torch.int32)
        state, step = new_balance_state(4)
        bias = torch.zeros(4)
        counts, loads = router_balance_update(index, bias, state, step, group=dist.group.WORLD)
        # update_balancing_biases where only rank 0 ran a training forward: every rank must join the reduction
        layer = SimpleNamespace(mlp=SimpleNamespace(gate=SimpleNamespace(balancing_biases=torch.zeros(4)),
                                                    _zaya_class_counts=torch.tensor([1, 2, 0, 1]) if rank == 0
                                                    else None))
        model_loads = update_balancing_biases(SimpleNamespace(layers=[layer]), group=dist.group.WORLD)
        torch.save({"counts": counts, "loads": loads, "bias": bias, "model_loads": model_loads,
                    "model_bias": layer.mlp.gate.balancing_biases}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gloo_counts_are_summed_across_ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children inherit the imported torch and zaya_kernels (spawn re-imports them: ~10 s more)
        ctx = mp.start_processes(_gloo_worker, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2, join=False,
                                 start_method="fork")
        deadline = time.monotonic() + 60
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("gloo workers did not finish within 60 s")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for res in results:
        assert res["counts"].tolist() == [2, 1, 3, 1]
        assert_close(res["loads"], torch.tensor([2, 1, 3, 1]) / 7.0)
        assert_close(res["model_loads"], torch.tensor([[1, 2, 0, 1]]) / 4.0)
    assert torch.equal(results[0]["bias"], results[1]["bias"])
    assert torch.equal(results[0]["model_bias"], results[1]["model_bias"]) and results[0]["model_bias"].abs().max() > 0


# ---------------------------------------------------------------- HIP decode kernel (kernels/router.cuh), host emulation
_EMU_DRIVER = r"""
#define ZAYA_HOST_EMULATION 1
#include "router.cuh"
using namespace zaya::kernels;
using zaya::dev::bf16_t;
using zaya::dev::half_t;

template <typename T>
static void run(const void* x, const void* rp, const void* g, const void* dw, const void* db, const void* nw,
                const void* w1, const void* b1, const void* w2, const void* b2, const void* w3, const float* beta,
                int* idx, float* wt, void* r, float* lg, int T_, int H, int R, int C, float eps, int vec_dtypes) {
  zaya_emu_launch(T_, kRouterThreads, [&] {
    zaya_router_decode_kernel<T, T>((const T*)x, (const T*)rp, g, (const T*)dw, db, nw, (const T*)w1, b1,
                                    (const T*)w2, b2, (const T*)w3, beta, idx, wt, (T*)r, lg, H, R, C, eps,
                                    vec_dtypes); });
}

// dt: x / weights dtype, vdt[5]: gamma, down_b, norm_w, fc1_b, fc2_b dtypes (0 fp32, 1 fp16, 2 bf16)
extern "C" int zaya_emu_router_decode(int dt, const int* vdt, const void* x, const void* rp, const void* g,
    const void* dw, const void* db, const void* nw, const void* w1, const void* b1, const void* w2, const void* b2,
    const void* w3, const float* beta, int* idx, float* wt, void* r, float* lg, int T_, int H, int R, int C,
    float eps) {
  const int vd = router_vec_dtypes(vdt[0], vdt[1], vdt[2], vdt[3], vdt[4]);
  if (dt == 0) run<float>(x, rp, g, dw, db, nw, w1, b1, w2, b2, w3, beta, idx, wt, r, lg, T_, H, R, C, eps, vd);
  else if (dt == 1) run<half_t>(x, rp, g, dw, db, nw, w1, b1, w2, b2, w3, beta, idx, wt, r, lg, T_, H, R, C, eps, vd);
  else if (dt == 2) run<bf16_t>(x, rp, g, dw, db, nw, w1, b1, w2, b2, w3, beta, idx, wt, r, lg, T_, H, R, C, eps, vd);
  else return 1;
  return 0;
}
"""
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module", params=EMULATED_WARP_SIZES, ids=lambda w: f"warp{w}")
def router_emulation(request, tmp_path_factory):
    return compile_host_emulation(_EMU_DRIVER, tmp_path_factory.mktemp(f"router_emu{request.param}"), request.param)


def _ptr(tensor):
    import ctypes

    return ctypes.c_void_p(0 if tensor is None else tensor.data_ptr())


def _emulated_launch(lib, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                     balance_bias, eps, index_out, weight_out, r_out, logits_out):
    """kernels/router.cuh on CPU threads with csrc/router.cu's argument list; the [R] vectors in their own dtypes."""
    import ctypes

    vecs = (gamma, down_b, norm_w, fc1_b, fc2_b)
    codes = (ctypes.c_int * 5)(*[0 if v is None else _DTYPE_CODES[v.dtype] for v in vecs])
    rc = lib.zaya_emu_router_decode(
        _DTYPE_CODES[x.dtype], codes, _ptr(x), _ptr(r_prev), _ptr(gamma), _ptr(down_w), _ptr(down_b), _ptr(norm_w),
        _ptr(fc1_w), _ptr(fc1_b), _ptr(fc2_w), _ptr(fc2_b), _ptr(out_w), _ptr(balance_bias), _ptr(index_out),
        _ptr(weight_out), _ptr(r_out), _ptr(logits_out), x.shape[0], x.shape[1], down_w.shape[0], out_w.shape[0],
        ctypes.c_float(eps))
    assert rc == 0


def _emulated_router(lib, args):
    """(index, weight, r, logits) of the emulated kernel for the op's arguments."""
    x, down_w, out_w = args[0], args[3], args[10]
    t, r, c = x.shape[0], down_w.shape[0], out_w.shape[0]
    out = (torch.empty(t, dtype=torch.int32), torch.empty(t), torch.empty(t, r, dtype=x.dtype), torch.empty(t, c))
    if t:
        _emulated_launch(lib, *args, *out)
    return out


def _with_vector_dtype(args, dtype):
    """The op's arguments with the [R] vectors (gamma, down_b, norm_w, fc1_b, fc2_b) stored in `dtype`."""
    return tuple(a.to(dtype) if i in (2, 4, 5, 7, 9) and a is not None else a for i, a in enumerate(args))


_EMU_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16)]
_EMU_SHAPES = [(3, 64, 32, 17, True), (2, 37, 21, 5, False), (2, 40, 24, 65, True)]
_ZAYA1_8B = (1, 2048, 256, 17, True)  # in fp32 and all-bf16 only (test time)


@pytest.mark.parametrize("dtype,vec_dtype,t,h,r,c,prev",
                         [(*d, *shape) for shape in _EMU_SHAPES for d in _EMU_DTYPES]
                         + [(*d, *_ZAYA1_8B) for d in (_EMU_DTYPES[0], _EMU_DTYPES[2])])
def test_hip_decode_kernel_emulated_matches_reference(router_emulation, dtype, vec_dtype, t, h, r, c, prev):
    """kernels/router.cuh run on CPU threads (compat.cuh's host emulation, warps of 32 and 64 threads) against the
    reference; the [R] vectors read in their own dtype (fp32, or the model's bf16 / fp16); C = 65 has 64 experts +
    skip."""
    args = _with_vector_dtype(make_router_args(t, h, r, c, prev=prev, dtype=dtype, seed=t + h), vec_dtype)
    index, weight, r_out, logits = _emulated_router(router_emulation, args)
    e_index, e_weight, e_r, e_logits = ref.zaya_router(*args, True)
    assert_close(r_out, e_r, dtype=dtype, reduction=h, what="r")
    tol_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert_close(logits, e_logits, dtype=tol_dtype, reduction=max(h, r), scale=1.0, what="logits")
    check_choice(index, weight, torch.softmax(e_logits, -1), args[11], what="hip emulated", dtype=tol_dtype,
                 tie_tol=1e-5 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------- ops/router.py's hip implementation, emulated
class _EmulatedLauncher:
    """Stands in for zaya_kernels._C: `zaya_router_decode` with csrc/router.cu's argument list (the pybind names, in
    order), running the emulated kernel; the dtype and layout rules the launcher enforces are asserted here. Counts
    its launches; `on_launch` (if set) brackets each one."""

    def __init__(self, lib):
        self.lib, self.launches, self.on_launch = lib, 0, None

    def zaya_router_decode(self, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                           balance_bias, eps, index_out, weight_out, r_out, logits_out):
        for w in (down_w, fc1_w, fc2_w, out_w, r_out) + (() if r_prev is None else (r_prev,)):
            assert w.dtype == x.dtype and w.is_contiguous()
        for v in (gamma, down_b, norm_w, fc1_b, fc2_b):
            assert v is None or (v.dtype in _DTYPE_CODES and v.is_contiguous() and v.shape == (down_w.shape[0],))
        assert balance_bias.dtype == torch.float32 and index_out.dtype == torch.int32
        assert weight_out.dtype == torch.float32 and (logits_out is None or logits_out.dtype == torch.float32)
        self.launches += 1
        with self.on_launch() if self.on_launch else contextlib.nullcontext():
            if x.shape[0]:
                _emulated_launch(self.lib, x, r_prev, gamma, down_w, down_b, norm_w, fc1_w, fc1_b, fc2_w, fc2_b,
                                 out_w, balance_bias, eps, index_out, weight_out, r_out, logits_out)


class _AtenOps(TorchDispatchMode):
    """Records the aten ops run on tensors (a copy or a fill is a kernel launch on a GPU), except inside `paused()`."""

    def __init__(self):
        super().__init__()
        self.ops, self._paused = [], 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _half_model_args(t, h, r, c, dtype, seed):
    """A transformers bf16 / fp16 model's router: activations, weights and the [R] vectors in `dtype`, balancing
    bias fp32."""
    return _with_vector_dtype(make_router_args(t, h, r, c, prev=True, dtype=dtype, seed=seed), dtype)


# Triton in fp16 only: Triton 3.9's interpreter computes tl.dot of bf16 operands wrong (a bf16 [16, 16] product comes
# out ~1e10 off on CPU), so bf16 Triton is checked on GPUs only (test_gpu_backends_match_reference).
@pytest.mark.parametrize("backend,dtype", [("hip", torch.bfloat16), ("hip", torch.float16),
                                           ("triton", torch.float16)])
def test_decode_router_is_one_launch_with_half_vectors(router_emulation, monkeypatch, backend, dtype):
    """ops/router.py's hip and triton implementations on a bf16 / fp16 model's router (the [R] vectors too): the
    result matches the reference, and the only work outside the one kernel launch is output allocation (aten empty):
    no conversion copies of the vectors (each would be one more launch per layer on a GPU)."""
    from zaya_kernels.ops import router as router_ops
    from zaya_kernels.triton import router as tri

    mode = _AtenOps()
    if backend == "hip":
        launcher = _EmulatedLauncher(router_emulation)
        launcher.on_launch = mode.paused
        monkeypatch.setattr(zaya_kernels, "_C", launcher)
        impl = router_ops._hip_fwd
    else:
        kernel, launches = tri.zaya_router_fwd_kernel, []

        class CountingKernel:
            def __getitem__(self, grid):
                def launch(*a, **k):
                    launches.append(grid)
                    with mode.paused():
                        return kernel[grid](*a, **k)
                return launch

        monkeypatch.setattr(tri, "zaya_router_fwd_kernel", CountingKernel())
        monkeypatch.setattr(tri, "SPLIT_CHUNK_H", 16)  # the split decode launch (the arrival counters are cached)
        impl = router_ops._triton_fwd
    args = _half_model_args(2, 48, 16, 9, dtype, seed=11)
    impl(*args, True)  # warm-up: Triton's arrival counters are allocated once per device
    with mode:
        index, weight, r, logits = impl(*args, True)
    assert (launcher.launches if backend == "hip" else len(launches)) == 2
    assert set(mode.ops) <= {"aten.empty.memory_format"}, f"work outside the router launch: {mode.ops}"
    e_index, e_weight, e_r, e_logits = ref.zaya_router(*args, True)
    assert r.dtype == dtype
    assert_close(r, e_r, dtype=dtype, reduction=48, what=f"{backend} r")
    assert_close(logits, e_logits, dtype=dtype, reduction=48, scale=1.0, what=f"{backend} logits")
    check_choice(index, weight, torch.softmax(e_logits, -1), args[11], what=backend, dtype=dtype, tie_tol=1e-2)


# ---------------------------------------------------------------- exact ties: the lowest index, in every kernel
def _tie_cases(c):
    """(balance_bias, expected index) with out_w = 0, so every p is exactly 1 / C and the biases alone decide."""
    mid = c // 2
    two = torch.zeros(c)
    two[[mid, c - 1]] = 0.5  # an expert ties with the skip class
    tail = torch.zeros(c)
    tail[mid:] = 0.25  # every class from mid on ties
    return [(torch.zeros(c), 0), (two, mid), (tail, mid), (torch.full((c,), -0.5), 0)]  # -0.5: padding must not win


@pytest.mark.parametrize("c", [3, 17, 65])
@pytest.mark.parametrize("backend", ["triton", "hip-emulated"])
def test_kernels_break_exact_ties_to_the_lowest_index(router_emulation, backend, c):
    t = 3
    args = list(make_router_args(t, 16, 8, c, prev=True, seed=c))
    args[10] = torch.zeros_like(args[10])
    for bias, expected in _tie_cases(c):
        args[11] = bias
        if backend == "triton":
            with zaya_kernels.use_backend("triton"):
                index, weight, _, logits = torch.ops.zaya.zaya_router(*args, True)
        else:
            index, weight, _, logits = _emulated_router(router_emulation, args)
        assert torch.equal(logits, torch.zeros(t, c)), backend
        assert index.tolist() == [expected] * t, f"{backend} C={c} bias {bias.tolist()}: {index.tolist()}"
        assert torch.equal(ref.select(torch.softmax(logits, -1), bias), index)
        assert_close(weight, torch.full((t,), 1.0 / c), what=f"{backend} weight")


# ---------------------------------------------------------------- GPU: every GPU backend at ZAYA1-8B shape
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "hip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 8, 64, 1000])
def test_gpu_backends_match_reference(backend, dtype, t):
    from zaya_kernels.ops._registry import OPS

    if backend not in OPS["zaya_router"].impls:
        pytest.skip("the extension was built without the router's HIP/CUDA launcher (csrc/router.cu not bound)")
    args = make_router_args(t, 2048, 256, 17, prev=True, dtype=dtype, seed=t, device="cuda")
    with zaya_kernels.use_backend(backend):
        index, weight, r, logits = torch.ops.zaya.zaya_router(*args, True)
    assert zaya_kernels.last_backend("zaya_router") == backend
    e_index, e_weight, e_r, e_logits = ref.zaya_router(*args, True)
    assert_close(r, e_r, dtype=dtype, reduction=2048, what="r")
    assert_close(logits, e_logits, dtype=dtype, reduction=2048, scale=1.0, what="logits")
    if dtype == torch.float32:
        check_choice(index, weight, torch.softmax(e_logits, -1), args[11], what="gpu")
    assert (index == e_index).float().mean() >= 0.95
