"""residual_scale_rmsnorm and rmsnorm: every backend against the reference, forward and backward."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zaya_kernels
from zaya_kernels.backend import BackendUnavailableError
from zaya_kernels.reference import residual_rmsnorm as ref

from helpers import assert_close

FORMS = ("residual", "input", "rmsnorm")


def make_inputs(form, n, h, dtype, scale, seed, device="cpu", requires_grad=False, param_dtype=torch.float32):
    """Random inputs of one form; parameters (param_dtype) are drawn away from their init values (1 and 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=torch.float32, lo=-1.0, hi=1.0):
        t = (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(dt).to(device)
        return t.requires_grad_(requires_grad)

    branch = rand(n, h, dt=dtype, lo=-scale, hi=scale)
    residual = rand(n, h, lo=-scale, hi=scale)
    hs, hb = rand(h, dt=param_dtype, lo=0.5, hi=1.5), rand(h, dt=param_dtype)
    rs, rb = rand(h, dt=param_dtype, lo=0.5, hi=1.5), rand(h, dt=param_dtype)
    weight = rand(h, dt=param_dtype, lo=0.5, hi=1.5)
    if form == "residual":
        return (branch, residual, hs, hb, rs, rb, weight, 1e-5)
    if form == "input":
        return (branch, None, hs, hb, None, None, weight, 1e-5)
    return (residual, weight, 1e-5, dtype)


def run_op(form, args):
    if form == "rmsnorm":
        return (torch.ops.zaya.rmsnorm(*args),)
    return torch.ops.zaya.residual_scale_rmsnorm(*args)


def run_reference(form, args):
    if form == "rmsnorm":
        return (ref.rmsnorm(*args),)
    return ref.residual_scale_rmsnorm(*args)


def grads_through(fn, form, args, seed):
    """Gradients of a random linear function of every output, w.r.t. every tensor input that requires grad."""
    outputs = fn(form, args)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return inputs, torch.autograd.grad(loss, inputs)


def norm_grad_scale(form, args):
    """Size of the terms the norm-input gradient rstd * (dy w - nh c) cancels: max rstd * 3 |w| * (|hs| + |rs|).

    (Upstream gradients are standard normal: 3 bounds them in practice.) When the row has one element or the
    norm saturates, the gradient is a near-total cancellation and only this scale says how accurate it can be.
    """
    if form == "rmsnorm":
        x, weight = args[0], args[1]
        gain = 1.0
    else:
        x = ref.residual_scale(*args[:6])
        weight = args[6]
        gain = args[2].detach().abs().max().item() + (0.0 if args[4] is None else args[4].detach().abs().max().item())
    if x.numel() == 0:
        return 0.0
    xr = x.detach().float()
    rstd = torch.rsqrt(xr.pow(2).mean(-1) + 1e-5).max().item()
    return 3.0 * rstd * weight.detach().abs().max().item() * gain


shapes = st.tuples(st.integers(0, 300), st.integers(1, 5120))
small_shapes = st.one_of(
    # wide rows, including the chunked paths (H > 2048 backward, > 4096 forward)
    st.tuples(st.integers(0, 9), st.integers(1, 5120)),
    st.tuples(st.integers(0, 70), st.integers(1, 600)),  # many rows, several row tiles per program
)


# ---------------------------------------------------------------- the reference itself
@settings(max_examples=60)
@given(shape=shapes, form=st.sampled_from(FORMS), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_reference_backward_formula_matches_autograd(shape, form, dtype, scale, seed):
    """The explicit backward formulas equal autograd through the reference forward (fp32 math both sides)."""
    n, h = shape
    args = make_inputs(form, n, h, torch.float32, scale, seed, requires_grad=True)
    inputs, expected = grads_through(run_reference, form, args, seed)
    outputs = run_reference(form, args)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(o.shape, generator=gen) for o in outputs]
    if form == "rmsnorm":
        actual = ref.rmsnorm_backward(upstream[0], *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:3]])
    else:
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        grads = ref.residual_scale_rmsnorm_backward(upstream[1], upstream[0], *plain[:7], outputs[0].detach(), plain[7])
        actual = [g for g in grads if g is not None]
    scale = norm_grad_scale(form, args)
    for a, e in zip(actual, expected):
        rows = n if a.dim() == 1 else 1
        assert_close(a, e, dtype=torch.float32, reduction=max(n, h), scale=scale * rows, what=f"{form} grad")


def test_reference_matches_transformers_modules():
    """The reference equals transformers' ZayaResidualScaling + ZayaRMSNorm (fp32: to rounding; bf16: one ulp)."""
    from transformers.models.zaya.modeling_zaya import ZayaResidualScaling, ZayaRMSNorm

    torch.manual_seed(0)
    n, h = 7, 96
    scaling, norm = ZayaResidualScaling(h), ZayaRMSNorm(h, eps=1e-5)
    with torch.no_grad():
        for p in list(scaling.parameters()) + list(norm.parameters()):
            p.uniform_(0.5, 1.5)
    branch, residual = torch.randn(n, h), torch.randn(n, h)
    expected_residual = scaling(branch, residual)
    expected_normed = norm(expected_residual.to(norm.weight.dtype))
    new_residual, normed = ref.residual_scale_rmsnorm(
        branch, residual, scaling.hidden_states_scale, scaling.hidden_states_bias, scaling.residual_scale,
        scaling.residual_bias, norm.weight, 1e-5)
    assert_close(new_residual, expected_residual, what="R")
    assert_close(normed, expected_normed, reduction=h, what="normed")
    # bf16 model: transformers rounds the branch arithmetic to bf16, the reference keeps it in fp32.
    scaling.to(torch.bfloat16), norm.to(torch.bfloat16)
    branch16 = branch.bfloat16()
    expected_residual = scaling(branch16, residual)
    expected_normed = norm(expected_residual.to(torch.bfloat16))
    new_residual, normed = ref.residual_scale_rmsnorm(
        branch16, residual, scaling.hidden_states_scale, scaling.hidden_states_bias, scaling.residual_scale,
        scaling.residual_bias, norm.weight, 1e-5)
    assert_close(new_residual, expected_residual.float(), dtype=torch.bfloat16, what="R bf16")
    assert_close(normed, expected_normed, dtype=torch.bfloat16, reduction=h, what="normed bf16")
    # the final norm: fp32 residual in, bf16 out
    assert_close(ref.rmsnorm(residual, norm.weight, 1e-5, torch.bfloat16), norm(residual.to(torch.bfloat16)),
                 what="final norm")


# ---------------------------------------------------------------- the op (auto backend on CPU = reference)
@settings(max_examples=40)
@given(shape=shapes, form=st.sampled_from(FORMS), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_op_auto_backend_is_reference_on_cpu(shape, form, dtype, seed):
    n, h = shape
    args = make_inputs(form, n, h, dtype, 1.0, seed)
    for actual, expected in zip(run_op(form, args), run_reference(form, args)):
        assert torch.equal(actual, expected)
    assert zaya_kernels.last_backend("rmsnorm" if form == "rmsnorm" else "residual_scale_rmsnorm") == "reference"


# ---------------------------------------------------------------- Triton (interpreter on CPU, compiled on GPU)
@settings(max_examples=30)
@given(shape=small_shapes, form=st.sampled_from(FORMS), dtype=st.sampled_from([torch.float32, torch.float16]),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16),
       param_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_triton_forward_matches_reference(shape, form, dtype, scale, seed, param_dtype):
    n, h = shape
    args = make_inputs(form, n, h, dtype, scale, seed, param_dtype=param_dtype)
    with zaya_kernels.use_backend("triton"):
        actual = run_op(form, args)
    assert zaya_kernels.last_backend("rmsnorm" if form == "rmsnorm" else "residual_scale_rmsnorm") == "triton"
    for a, e in zip(actual, run_reference(form, args)):
        assert a.dtype == e.dtype
        assert_close(a, e, dtype=e.dtype, reduction=h, what=f"{form} forward")


@pytest.mark.parametrize("h", [4100, 2048])
def test_triton_eps_counts_in_both_row_paths(h):
    """Rows whose mean square (~3e-7) is below eps = 1e-5: eps decides the scale, in the one-chunk path (H <= 4096)
    and in the two-pass path of wider rows. The random tests rarely draw a row that wide at that scale."""
    args = make_inputs("rmsnorm", 3, h, torch.float32, 1e-3, 0)
    with zaya_kernels.use_backend("triton"):
        (actual,) = run_op("rmsnorm", args)
    (expected,) = run_reference("rmsnorm", args)
    assert expected.abs().max() < 1.0, "eps must dominate these rows (unit-RMS rows reach ~2.6)"
    assert_close(actual, expected, dtype=torch.float32, reduction=h, what=f"H={h}")


@pytest.mark.parametrize("form", ["rmsnorm", "residual"])
@pytest.mark.parametrize("n, h", [(64, 200), (4, 4100)])
def test_triton_fp16_rounds_at_the_reference_steps(form, n, h):
    """fp16: the normalised value is rounded to the activation dtype before the weight multiply (transformers'
    RMSNorm), so nearly every output is bit-identical to the reference (a few differ where the two fp32 rstd values
    are an ulp apart); rounding once, after the multiply, changes ~25% of them by an ulp: inside assert_close's
    tolerance, so only a bit-level count sees it."""
    args = make_inputs(form, n, h, torch.float16, 1.0, 1)
    with zaya_kernels.use_backend("triton"):
        actual = run_op(form, args)[-1]
    expected = run_reference(form, args)[-1]
    assert_close(actual, expected, dtype=torch.float16, reduction=h, what=form)
    differ = (actual != expected).float().mean().item()
    assert differ < 0.01, f"{form}: {differ:.1%} of the outputs differ from the reference's bits"


@settings(max_examples=30)
@given(shape=small_shapes, form=st.sampled_from(FORMS), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
def test_triton_backward_matches_reference(shape, form, dtype, seed):
    n, h = shape
    args = make_inputs(form, n, h, dtype, 1.0, seed, requires_grad=True)
    with zaya_kernels.use_backend("triton"):
        _, actual = grads_through(lambda f, a: run_op(f, a), form, args, seed)
    with zaya_kernels.use_backend("reference"):
        inputs, expected = grads_through(lambda f, a: run_op(f, a), form, args, seed)
    scale = norm_grad_scale(form, args)
    for inp, a, e in zip(inputs, actual, expected):
        assert a.dtype == inp.dtype
        rows = n if inp.dim() == 1 else 1  # parameter gradients sum over rows
        assert_close(a, e, dtype=inp.dtype, reduction=max(n, h), scale=scale * rows, what=f"{form} grad {tuple(inp.shape)}")


def test_triton_backward_is_deterministic():
    args = make_inputs("residual", 37, 4500, torch.float32, 1.0, 3, requires_grad=True)
    with zaya_kernels.use_backend("triton"):
        _, first = grads_through(run_op, "residual", args, 3)
        _, second = grads_through(run_op, "residual", args, 3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_backward_only_through_new_residual():
    """A loss on R alone (grad_normed None) still reaches every input that R depends on."""
    args = make_inputs("residual", 5, 33, torch.float32, 1.0, 1, requires_grad=True)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend):
            new_residual, _ = run_op("residual", args)
            grads = torch.autograd.grad(new_residual.sum(), args[:6])
        assert_close(grads[0], args[2].detach().expand(5, 33), what=f"{backend} d branch")
        assert_close(grads[2], (args[0] + args[3]).detach().sum(0), reduction=5, what=f"{backend} d hs")


# ---------------------------------------------------------------- torch.library integration
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("form", FORMS)
def test_opcheck(backend, form):
    args = make_inputs(form, 6, 40, torch.float32, 1.0, 0, requires_grad=True)
    op = torch.ops.zaya.rmsnorm.default if form == "rmsnorm" else torch.ops.zaya.residual_scale_rmsnorm.default
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    args = make_inputs("residual", 4, 24, torch.float32, 1.0, 0)
    new_residual, normed = ref.residual_scale_rmsnorm(*args)
    torch.library.opcheck(torch.ops.zaya.residual_scale_rmsnorm_backward.default,
                          (torch.randn_like(normed), torch.randn_like(new_residual), *args[:7], new_residual, 1e-5))
    torch.library.opcheck(torch.ops.zaya.rmsnorm_backward.default,
                          (torch.randn(4, 24), args[1], args[6], 1e-5))


def test_torch_compile_fullgraph():
    args = make_inputs("residual", 5, 64, torch.float32, 1.0, 0)

    def layer_tail(branch, residual, hs, hb, rs, rb, weight):
        new_residual, normed = torch.ops.zaya.residual_scale_rmsnorm(branch, residual, hs, hb, rs, rb, weight, 1e-5)
        return torch.ops.zaya.rmsnorm(new_residual, weight, 1e-5, None) + normed

    compiled = torch.compile(layer_tail, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args[:7]), layer_tail(*args[:7]))


# ---------------------------------------------------------------- bad input
def _residual_args():
    return list(make_inputs("residual", 4, 16, torch.float32, 1.0, 0))


@pytest.mark.parametrize(
    "mutate, exc, message",
    [
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "`branch` must have dtype"),
        (lambda a: a.__setitem__(1, a[1].half()), TypeError, "`residual` must have dtype"),
        (lambda a: a.__setitem__(6, torch.ones(15)), ValueError, "`norm_weight` must have shape"),
        (lambda a: a.__setitem__(1, torch.zeros(4, 17)), ValueError, "`residual` must have shape"),
        (lambda a: a.__setitem__(0, torch.zeros(16, 4).t()), ValueError, "`branch` must be contiguous"),
        (lambda a: a.__setitem__(0, torch.zeros(2, 4, 16)), ValueError, "`branch` must have 2 dimensions"),
        (lambda a: a.__setitem__(1, None), ValueError, "residual_scale, residual_bias given but residual missing"),
        (lambda a: a.__setitem__(7, -1.0), ValueError, "`eps` must be a non-negative float"),
        (lambda a: a.__setitem__(2, torch.ones(16, device="meta")), ValueError, "`hidden_scale` is on meta"),
    ],
)
def test_bad_input_raises_clear_error(mutate, exc, message):
    args = _residual_args()
    mutate(args)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.residual_scale_rmsnorm(*args)


def test_rmsnorm_bad_out_dtype():
    with pytest.raises(TypeError, match="out_dtype"):
        torch.ops.zaya.rmsnorm(torch.ones(2, 3), torch.ones(3), 1e-5, torch.int32)


def test_typed_wrappers_refuse_a_0_dim_input():
    from zaya_kernels.ops import residual_scale_rmsnorm, rmsnorm

    with pytest.raises(ValueError, match="`x` must have at least 1 dimensions"):
        rmsnorm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="`branch` must have at least 1 dimensions"):
        residual_scale_rmsnorm(torch.tensor(1.0), None, torch.ones(1), torch.zeros(1), None, None, torch.ones(1))


def test_backend_errors_name_the_reason(monkeypatch):
    args = _residual_args()
    with zaya_kernels.use_backend("hip"), pytest.raises(BackendUnavailableError, match="GPU tensors"):
        torch.ops.zaya.residual_scale_rmsnorm(*args)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with zaya_kernels.use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        torch.ops.zaya.residual_scale_rmsnorm(*args)
    monkeypatch.setenv("ZAYA_KERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="unknown zaya_kernels backend"):
        torch.ops.zaya.residual_scale_rmsnorm(*args)
    monkeypatch.setenv("ZAYA_KERNELS_BACKEND", "reference")
    torch.ops.zaya.residual_scale_rmsnorm(*args)
    assert zaya_kernels.last_backend("residual_scale_rmsnorm") == "reference"


def test_typed_wrappers_take_leading_dims():
    branch, residual, hs, hb, rs, rb, weight, eps = make_inputs("residual", 6, 8, torch.float32, 1.0, 0)
    new_residual, normed = zaya_kernels.ops.residual_scale_rmsnorm(
        branch.view(2, 3, 8), residual.view(2, 3, 8), hs, hb, rs, rb, weight, eps)
    expected = ref.residual_scale_rmsnorm(branch, residual, hs, hb, rs, rb, weight, eps)
    assert new_residual.shape == (2, 3, 8) and torch.equal(normed.view(6, 8), expected[1])
    assert torch.equal(zaya_kernels.ops.rmsnorm(residual.view(2, 3, 8), weight).view(6, 8),
                       ref.rmsnorm(residual, weight, 1e-5))


# ---------------------------------------------------------------- GPU: every GPU backend at ZAYA1-8B width
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "hip"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,h", [(1, 2048), (257, 2048), (33, 2047), (8, 5120), (0, 64), (3, 9000)])
def test_gpu_backends_match_reference(backend, form, dtype, n, h):
    args = make_inputs(form, n, h, dtype, 1.0, n + h, device="cuda", requires_grad=True, param_dtype=dtype)
    with zaya_kernels.use_backend(backend):
        actual = run_op(form, args)
        _, actual_grads = grads_through(run_op, form, args, 0)
    assert zaya_kernels.last_backend("rmsnorm" if form == "rmsnorm" else "residual_scale_rmsnorm") == backend
    with zaya_kernels.use_backend("reference"):
        expected = run_op(form, args)
        inputs, expected_grads = grads_through(run_op, form, args, 0)
    for a, e in zip(actual, expected):
        assert_close(a, e, dtype=e.dtype, reduction=h, what=f"{backend} {form} forward")
    scale = norm_grad_scale(form, args)
    for inp, a, e in zip(inputs, actual_grads, expected_grads):
        rows = n if inp.dim() == 1 else 1
        assert_close(a, e, dtype=inp.dtype, reduction=max(n, h), scale=scale * rows, what=f"{backend} {form} grad")
