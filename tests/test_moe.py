"""Top-1 MoE: dispatch and experts, every backend against the per-token reference loop, forward and backward."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zaya_kernels
from zaya_kernels.ops import moe, moe_dispatch
from zaya_kernels.reference import moe as ref

from helpers import EMULATED_WARP_SIZES, assert_close, compile_host_emulation

ROUTINGS = ("random", "one_expert", "some_experts_empty", "all_skipped", "none_skipped")


def draw_index(routing, T, E, gen):
    """int32 [T] expert indices in 0..E (E = skip) following a routing pattern."""
    if routing == "one_expert":
        return torch.full((T,), int(torch.randint(0, E, (1,), generator=gen)), dtype=torch.int32)
    if routing == "all_skipped":
        return torch.full((T,), E, dtype=torch.int32)
    if routing == "none_skipped":
        return torch.randint(0, E, (T,), generator=gen, dtype=torch.int32)
    if routing == "some_experts_empty":
        used = torch.tensor([0, E - 1, E]) if E > 1 else torch.tensor([E])
        return used[torch.randint(0, len(used), (T,), generator=gen)].to(torch.int32)
    return torch.randint(0, E + 1, (T,), generator=gen, dtype=torch.int32)


def make_inputs(T, E, H, I, dtype, routing, seed, device="cpu", requires_grad=False):
    """(x, gate_up, down, expert_index, routing_weight); weights scaled so y stays O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    x = rand(T, H)
    gate_up = rand(E, 2 * I, H, scale=H ** -0.5)
    down = rand(E, H, I, scale=I ** -0.5)
    index = draw_index(routing, T, E, gen).to(device)
    weight = (torch.rand(T, generator=gen) * 0.9 + 0.1).to(device).requires_grad_(requires_grad)
    return x, gate_up, down, index, weight


def grads_through(fn, inputs, seed):
    """(y, gradients of the random linear function <y, dy> w.r.t. x, gate_up, down, routing_weight, dy)."""
    x, gate_up, down, index, weight = inputs
    y = fn(x, gate_up, down, index, weight)
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=gen).to(y.device)
    if not y.requires_grad:  # every token skipped with skip_mode 0: y is the constant 0
        return y, (None, None, None, None), dy
    loss = (y.float() * dy).sum()
    return y, torch.autograd.grad(loss, (x, gate_up, down, weight), allow_unused=True), dy


def gradient_scales(inputs, dy, skip_mode):
    """{gradient name: the largest error scale among its elements}, the tolerance scales of check_grads.

    A rounded sum's error follows its terms, not its value: one token's x or routing-weight gradient can be a small
    remainder of large terms, which a scale taken from the result (assert_close's default) does not allow for, and
    so can an intermediate (a gate pre-activation, an expert output row) whose rounding the later steps carry. A
    first-order running error analysis of the per-token math in float64, one expert at a time: a quantity's error
    scale S (its rounding error is about the unit roundoff times S) is |v| for an input; for a product p q,
    S(p) |q| + |p| S(q); for f(v), |f(v)| + |f'(v)| S(v); for a sum, the root-sum-square of its terms' scales (the
    size of a sum of random signs). Where nothing cancels, S stays at the result's own size and the bound as tight."""
    x, gate_up, down, index, weight = (t.detach().double() if t.is_floating_point() else t for t in inputs)
    dy = dy.double()
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    square = {"x": torch.zeros_like(x), "gate_up": torch.zeros_like(gate_up), "down": torch.zeros_like(down),
              "routing_weight": torch.zeros_like(weight)}  # squared error scales
    skipped = index == E
    if skip_mode == 1:  # y = w x
        square["x"][skipped] = (weight[skipped, None] * dy[skipped]) ** 2
        square["routing_weight"][skipped] = ((dy[skipped] * x[skipped]) ** 2).sum(-1)
    for e in range(E):
        rows = index == e
        xe, dye, we = x[rows], dy[rows], weight[rows, None]
        gate, up = gate_up[e, :I], gate_up[e, I:]
        g, u = xe @ gate.T, xe @ up.T
        s_g, s_u = (xe ** 2 @ gate.T ** 2).sqrt(), (xe ** 2 @ up.T ** 2).sqrt()
        sig = torch.sigmoid(g)
        silu, dsilu = g * sig, sig * (1 + g * (1 - sig))
        ddsilu = sig * (1 - sig) * (2 + g * (1 - 2 * sig))  # SiLU''
        s_silu, s_dsilu = silu.abs() + dsilu.abs() * s_g, dsilu.abs() + ddsilu.abs() * s_g
        s_a = s_silu * u.abs() + silu.abs() * s_u
        s_ybar = (s_a ** 2 @ down[e].T ** 2).sqrt()  # the expert's output row before the weight
        square["routing_weight"][rows] = ((dye * s_ybar) ** 2).sum(-1)
        square["down"][e] = (we * dye).T ** 2 @ s_a ** 2
        s_da = we.abs() * (dye ** 2 @ down[e] ** 2).sqrt()
        s_dg = s_da * (s_u * dsilu.abs() + u.abs() * s_dsilu)  # d g = d a u SiLU'(g)
        s_du = s_da * s_silu  # d u = d a SiLU(g)
        square["gate_up"][e] = torch.cat([s_dg.T ** 2 @ xe ** 2, s_du.T ** 2 @ xe ** 2])
        square["x"][rows] = s_dg ** 2 @ gate ** 2 + s_du ** 2 @ up ** 2
    return {name: m.max().sqrt().item() if m.numel() else 0.0 for name, m in square.items()}


def check_grads(actual, expected, inputs, reduction, what, scales):
    """The four gradients against the expected ones, each at its `gradient_scales` scale."""
    for name, a, e, inp in zip(("x", "gate_up", "down", "routing_weight"), actual, expected,
                               (inputs[0], inputs[1], inputs[2], inputs[4])):
        e = torch.zeros_like(inp) if e is None else e  # autograd: unused input (no token reached it)
        a = torch.zeros_like(inp) if a is None else a
        assert a.dtype == inp.dtype, f"{what} grad {name} dtype"
        assert_close(a, e, dtype=inp.dtype, reduction=reduction, what=f"{what} grad {name}", scale=scales[name])


# ---------------------------------------------------------------- the reference itself
def _zaya_config(H, I, E):
    from transformers.models.zaya.configuration_zaya import ZayaConfig

    config = ZayaConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, router_hidden_size=16,
                        num_hidden_layers=2)
    config._experts_implementation = "eager"
    return config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers_experts(dtype):
    """ZayaExperts gets the router's masked form (skip -> index 0, weight 0); the reference: index E, skip_mode 0."""
    from transformers.models.zaya.modeling_zaya import ZayaExperts

    T, H, I, E = 29, 40, 24, 5
    torch.manual_seed(0)
    experts = ZayaExperts(_zaya_config(H, I, E))
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, H ** -0.5)
        experts.down_proj.normal_(0, I ** -0.5)
    experts.to(dtype)
    x = torch.randn(T, H).to(dtype)
    index = torch.randint(0, E + 1, (T,), dtype=torch.int32)
    index[:3] = E  # some skipped tokens for sure
    weight = torch.rand(T)
    skipped = index == E
    hf_index = index.masked_fill(skipped, 0).long()[:, None]
    hf_weight = weight.masked_fill(skipped, 0.0).to(dtype)[:, None]
    expected = experts(x, hf_index, hf_weight)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    per_token = ref.moe_per_token(x, gate_up, down, index, weight, ref.SKIP_ZERO)
    op = moe(x, gate_up, down, index, weight)
    # transformers rounds g, u, SiLU(g), the product and down's output to the dtype; the reference keeps fp32 there.
    slack = 1 if dtype == torch.float32 else 4
    scale = slack * expected.abs().max().item()
    assert_close(per_token, expected, dtype=dtype, reduction=max(H, I) * slack, scale=scale, what="per-token vs HF")
    assert_close(op, expected, dtype=dtype, reduction=max(H, I) * slack, scale=scale, what="op vs ZayaExperts")
    assert torch.equal(op[skipped], torch.zeros_like(op[skipped]))


def test_reference_matches_transformers_sparse_moe_block():
    """The expert part of ZayaSparseMoeBlock: route with its own router, recover e* = argmax(p + beta) (skip = E)."""
    from transformers.models.zaya.modeling_zaya import ZayaSparseMoeBlock

    B, S, H, I, E = 2, 9, 32, 24, 4
    torch.manual_seed(1)
    block = ZayaSparseMoeBlock(_zaya_config(H, I, E), layer_idx=0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.balancing_biases.copy_(torch.linspace(-0.05, 0.1, E + 1))  # the skip class gets picked too
    x = torch.randn(B, S, H)
    expected, _ = block(x)
    logits = block.gate(x)[0]
    probs = torch.softmax(logits.float(), dim=-1)
    index = torch.argmax(probs + block.gate.balancing_biases, dim=-1).to(torch.int32)
    weight = probs.gather(1, index.long()[:, None])[:, 0]
    assert (index == E).any() and (index < E).any()
    y = moe(x, block.experts.gate_up_proj.detach(), block.experts.down_proj.detach(), index.view(B, S),
            weight.view(B, S))
    assert_close(y, expected.detach(), reduction=max(H, I), what="op vs ZayaSparseMoeBlock")


@settings(max_examples=30)
@given(T=st.integers(0, 24), E=st.integers(1, 64), H=st.integers(1, 24), I=st.integers(1, 24),
       routing=st.sampled_from(ROUTINGS), skip_mode=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_reference_backward_formula_matches_autograd(T, E, H, I, routing, skip_mode, seed):
    inputs = make_inputs(T, E, H, I, torch.float32, routing, seed, requires_grad=True)
    if T == 0:
        return
    _, expected, dy = grads_through(lambda *a: ref.moe_per_token(*a, skip_mode), inputs, seed)
    x, gate_up, down, index, weight = inputs
    dispatch = ref.moe_dispatch(index, E, 16)
    actual = ref.moe_experts_backward(dy, x.detach(), gate_up.detach(), down.detach(), weight.detach(),
                                      dispatch[2], dispatch[1], dispatch[4], dispatch[5], 16, skip_mode)
    check_grads(actual, expected, inputs, max(H, I, T), "reference formula", gradient_scales(inputs, dy, skip_mode))


# ---------------------------------------------------------------- dispatch
@settings(max_examples=25)
@given(T=st.integers(0, 600), E=st.integers(1, 64), block_m=st.sampled_from([16, 32, 64]),
       routing=st.sampled_from(ROUTINGS), seed=st.integers(0, 2**16))
# E = 64: 66 classes pad to C_PAD = 128 (chunks of 32 tokens, 19 of them in the chunked path)
@example(T=600, E=64, block_m=16, routing="random", seed=3)
@example(T=97, E=64, block_m=64, routing="some_experts_empty", seed=4)
@example(T=0, E=64, block_m=32, routing="random", seed=5)
def test_dispatch_properties_and_triton(T, E, block_m, routing, seed):
    index = draw_index(routing, T, E, torch.Generator().manual_seed(seed))
    counts, offsets, sorted_ids, inverse, tile_expert, tile_start = ref.moe_dispatch(index, E, block_m)
    # the definition: a stable sort by class, skip (E) last, and its inverse
    assert torch.equal(counts.long(), torch.bincount(index.long(), minlength=E + 1))
    assert offsets[0] == 0 and torch.equal(offsets[1:].long(), torch.cumsum(counts.long(), 0))
    expected_order = sorted(range(T), key=lambda t: (int(index[t]), t))
    assert sorted_ids.tolist() == expected_order
    assert torch.equal(sorted_ids[inverse.long()], torch.arange(T, dtype=torch.int32))
    # the tile map covers every sorted row of every class exactly once, in order, block_m rows a tile
    covered = []
    for e, start in zip(tile_expert.tolist(), tile_start.tolist()):
        if e < 0:
            continue
        end = min(start + block_m, int(offsets[e + 1]))
        assert int(offsets[e]) <= start < end
        covered.extend(range(start, end))
    assert covered == list(range(T))
    assert tile_expert.shape[0] == ref.num_tiles(T, E, block_m)
    with zaya_kernels.use_backend("triton"):
        actual = moe_dispatch(index, E, block_m)
    assert zaya_kernels.last_backend("moe_dispatch") == "triton"
    # the chunked (large-T) path, forced at these sizes
    from zaya_kernels.triton import moe as tri

    chunked = [torch.full_like(t, -7) for t in actual]
    tri.moe_dispatch(index, E, block_m, *chunked, single_program=False)
    names = ("counts", "offsets", "sorted_token_ids", "inverse", "tile_expert", "tile_start")
    for a, c, e, name in zip(actual, chunked, (counts, offsets, sorted_ids, inverse, tile_expert, tile_start), names):
        assert a.dtype == torch.int32 and torch.equal(a, e), name
        assert torch.equal(c, e), f"chunked {name}"


# ---------------------------------------------------------------- the op on the reference backend (CPU auto)
@settings(max_examples=40)
@given(T=st.integers(0, 40), E=st.integers(1, 64), H=st.integers(1, 40), I=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), routing=st.sampled_from(ROUTINGS),
       skip_mode=st.sampled_from([0, 1]), block_m=st.sampled_from([16, 32, 128]), seed=st.integers(0, 2**16))
def test_op_matches_per_token_loop(T, E, H, I, dtype, routing, skip_mode, block_m, seed):
    x, gate_up, down, index, weight = make_inputs(T, E, H, I, dtype, routing, seed)
    expected = ref.moe_per_token(x, gate_up, down, index, weight, skip_mode)
    actual = moe(x, gate_up, down, index, weight, skip_mode, block_m=block_m)
    assert zaya_kernels.last_backend("moe_experts") == "reference"
    assert actual.dtype == dtype and actual.shape == (T, H)
    assert_close(actual, expected, dtype=dtype, reduction=max(H, I), what="reference op")


# ---------------------------------------------------------------- Triton (interpreter on CPU, compiled on GPU)
@settings(max_examples=25)
@given(T=st.integers(0, 40), E=st.integers(1, 8), H=st.integers(1, 40), I=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float16]), routing=st.sampled_from(ROUTINGS),
       skip_mode=st.sampled_from([0, 1]), block_m=st.sampled_from([16, 32]), seed=st.integers(0, 2**16))
# H, I > 64: several K iterations and column blocks of both GEMMs (interpreter tiles 16 / 32), masked edges
@example(T=40, E=2, H=72, I=80, dtype=torch.float32, routing="random", skip_mode=1, block_m=32, seed=11)
@example(T=20, E=3, H=260, I=20, dtype=torch.float16, routing="some_experts_empty", skip_mode=1, block_m=16,
         seed=12)  # H > 256: two column blocks of the skip kernel
@example(T=29, E=64, H=16, I=24, dtype=torch.float32, routing="random", skip_mode=1, block_m=16, seed=13)
@example(T=0, E=4, H=70, I=70, dtype=torch.float32, routing="random", skip_mode=1, block_m=16, seed=14)
@example(T=33, E=4, H=70, I=70, dtype=torch.float32, routing="all_skipped", skip_mode=1, block_m=32, seed=15)
def test_triton_forward_matches_per_token_loop(T, E, H, I, dtype, routing, skip_mode, block_m, seed):
    x, gate_up, down, index, weight = make_inputs(T, E, H, I, dtype, routing, seed)
    expected = ref.moe_per_token(x, gate_up, down, index, weight, skip_mode)
    with zaya_kernels.use_backend("triton"):
        actual = moe(x, gate_up, down, index, weight, skip_mode, block_m=block_m)
    assert zaya_kernels.last_backend("moe_experts") == "triton"
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype=dtype, reduction=max(H, I), what="triton forward")


@pytest.mark.parametrize("T, E", [(40, 3), (70, 64)])
def test_triton_dispatch_picks_the_chunked_path_above_the_threshold(monkeypatch, T, E):
    """The op's own choice of path (T > SINGLE_PROGRAM_MAX_TOKENS: the three-launch chunked dispatch), with the
    threshold lowered so that a small T crosses it; both sides of it equal the reference."""
    from zaya_kernels.triton import moe as tri

    index = draw_index("random", T, E, torch.Generator().manual_seed(T))
    expected = ref.moe_dispatch(index, E, 16)
    launched = []
    for name in ("moe_dispatch_kernel", "moe_dispatch_count_kernel"):
        kernel = getattr(tri, name)
        monkeypatch.setattr(tri, name, type("Spy", (), {"__getitem__": lambda self, grid, k=kernel, n=name: (
            launched.append(n), k[grid])[1]})())
    for threshold, path in ((T, "moe_dispatch_kernel"), (T - 1, "moe_dispatch_count_kernel")):
        monkeypatch.setattr(tri, "SINGLE_PROGRAM_MAX_TOKENS", threshold)
        launched.clear()
        with zaya_kernels.use_backend("triton"):
            actual = moe_dispatch(index, E, 16)
        assert launched == [path], (threshold, launched)
        for a, e in zip(actual, expected):
            assert torch.equal(a, e), path


@pytest.mark.parametrize("skip_mode", [0, 1])
@pytest.mark.parametrize("routing", ["random", "all_skipped"])
def test_triton_forward_writes_every_row_of_a_poisoned_output(skip_mode, routing):
    """The launcher writes every row of y (experts' rows in moe_down_kernel, skipped tokens' rows in the skip tiles
    of moe_gate_up_kernel): y starts as NaN, not torch.empty's leftovers. H = 100 > I = 12: a skip-tile program
    loops over several column blocks (the gate_up grid has one column block of 16 or 32)."""
    from zaya_kernels.triton import moe as tri

    T, E, H, I = 37, 3, 100, 12
    x, gate_up, down, index, weight = make_inputs(T, E, H, I, torch.float32, routing, 21)
    assert (index == E).any()
    expected = ref.moe_per_token(x, gate_up, down, index, weight, skip_mode)
    for block_m in (16, 32):
        _, offsets, sorted_ids, _, tile_expert, tile_start = ref.moe_dispatch(index, E, block_m)
        y = torch.full_like(x, float("nan"))
        tri.moe_experts(x, gate_up, down, weight, sorted_ids, offsets, tile_expert, tile_start, block_m, skip_mode, y)
        assert_close(y, expected, reduction=max(H, I), what=f"triton forward, block_m {block_m}")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's NaN warning: a read of unwritten memory
@settings(max_examples=20)
@given(T=st.integers(0, 7), E=st.integers(1, 8), H=st.integers(1, 40), I=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float16]), routing=st.sampled_from(ROUTINGS),
       skip_mode=st.sampled_from([0, 1]), backend=st.sampled_from(["reference", "triton"]),
       seed=st.integers(0, 2**16))
# H > the gate_up grid's columns (a skipped token's program loops over H); several K steps of both GEMMs
@example(T=3, E=2, H=100, I=12, dtype=torch.float32, routing="random", skip_mode=1, backend="triton", seed=1)
@example(T=4, E=3, H=70, I=72, dtype=torch.float16, routing="one_expert", skip_mode=0, backend="triton", seed=2)
@example(T=1, E=16, H=48, I=40, dtype=torch.float32, routing="none_skipped", skip_mode=0, backend="triton", seed=3)
@example(T=2, E=4, H=33, I=20, dtype=torch.float32, routing="all_skipped", skip_mode=0, backend="triton", seed=4)
@example(T=0, E=4, H=16, I=16, dtype=torch.float32, routing="random", skip_mode=1, backend="triton", seed=5)
def test_experts_by_token_matches_per_token_loop(T, E, H, I, dtype, routing, skip_mode, backend, seed):
    """zaya::moe_experts_by_token (no dispatch: the kernels read expert_index) against the per-token loop; the
    Triton launcher writes into a NaN-poisoned y, so a row it leaves unwritten fails."""
    from zaya_kernels.triton import moe as tri

    x, gate_up, down, index, weight = make_inputs(T, E, H, I, dtype, routing, seed)
    expected = ref.moe_per_token(x, gate_up, down, index, weight, skip_mode)
    with zaya_kernels.use_backend(backend):
        actual = torch.ops.zaya.moe_experts_by_token(x, gate_up, down, index, weight, skip_mode)
    assert zaya_kernels.last_backend("moe_experts_by_token") == backend
    assert actual.dtype == dtype and actual.shape == x.shape
    assert_close(actual, expected, dtype=dtype, reduction=max(H, I), what=f"{backend} by token")
    if backend == "triton":
        poisoned = torch.full_like(x, float("nan"))
        tri.moe_experts_by_token(x, gate_up, down, index, weight, skip_mode, poisoned)
        assert_close(poisoned, expected, dtype=dtype, reduction=max(H, I), what="triton by token, poisoned y")


def test_moe_runs_by_token_for_a_few_tokens_without_gradients(monkeypatch):
    """zaya_kernels.ops.moe: at most BY_TOKEN_MAX_TOKENS tokens and no gradient wanted -> moe_experts_by_token (no
    dispatch); more tokens, a gradient wanted or an explicit block_m -> moe_dispatch + moe_experts. Same results."""
    from zaya_kernels import backend as _backend
    from zaya_kernels.ops.moe import BY_TOKEN_MAX_TOKENS

    def ran(T, requires_grad=False, **kwargs):
        monkeypatch.setattr(_backend, "_last_backend", {})
        x, gate_up, down, index, weight = make_inputs(T, 3, 16, 8, torch.float32, "random", T,
                                                      requires_grad=requires_grad)
        with zaya_kernels.use_backend("triton"):
            y = moe(x, gate_up, down, index, weight, 1, **kwargs)
        assert_close(y, ref.moe_per_token(x, gate_up, down, index, weight, 1), reduction=16, what=f"T={T}")
        return {op for op in ("moe_experts_by_token", "moe_dispatch", "moe_experts") if _backend.last_backend(op)}

    assert ran(1) == ran(BY_TOKEN_MAX_TOKENS) == {"moe_experts_by_token"}
    assert ran(BY_TOKEN_MAX_TOKENS + 1) == {"moe_dispatch", "moe_experts"}
    assert ran(2, requires_grad=True) == {"moe_dispatch", "moe_experts"}
    assert ran(2, block_m=16) == {"moe_dispatch", "moe_experts"}
    with torch.no_grad():
        assert ran(2, requires_grad=True) == {"moe_experts_by_token"}


def test_triton_forward_many_experts():
    """E = 64 (the dispatch's one-hot is 128 classes wide) with most experts empty."""
    x, gate_up, down, index, weight = make_inputs(30, 64, 16, 16, torch.float32, "random", 5)
    expected = ref.moe_per_token(x, gate_up, down, index, weight, 1)
    with zaya_kernels.use_backend("triton"):
        actual = moe(x, gate_up, down, index, weight, 1)
    assert_close(actual, expected, reduction=16, what="triton E=64")


# ---------------------------------------------------------------- gradients
@settings(max_examples=25)
@given(T=st.integers(1, 30), E=st.integers(1, 6), H=st.integers(1, 33), I=st.integers(1, 33),
       routing=st.sampled_from(ROUTINGS), skip_mode=st.sampled_from([0, 1]), backend=st.sampled_from(["reference",
                                                                                                      "triton"]),
       seed=st.integers(0, 2**16))
# H, I > 64 (interpreter tiles 32): several K iterations and column blocks in bwd_act (the routing-weight partials
# of 3 column blocks summed), bwd_dx and both weight-gradient GEMMs (M / N tiles, > 16 tokens per expert: several
# token iterations), masked edges everywhere
@example(T=40, E=2, H=72, I=80, routing="none_skipped", skip_mode=1, backend="triton", seed=11)
@example(T=20, E=2, H=260, I=20, routing="random", skip_mode=1, backend="triton", seed=12)  # 2 skip column blocks
@example(T=29, E=64, H=8, I=8, routing="random", skip_mode=1, backend="triton", seed=13)  # most experts empty
@example(T=0, E=3, H=70, I=70, routing="random", skip_mode=1, backend="triton", seed=14)
@example(T=24, E=4, H=70, I=70, routing="all_skipped", skip_mode=1, backend="triton", seed=15)
@example(T=24, E=4, H=70, I=70, routing="all_skipped", skip_mode=0, backend="triton", seed=16)
# cancellations found by runs with other hypothesis draws: one token's routing-weight gradient, 1.4e-4, the remainder
# of three terms summing 2.1e-2 in magnitude; an x gradient cancelling over 2 I = 64 terms; a routing-weight
# gradient of H = 1 whose expert output cancelled over I = 27 terms
@example(T=1, E=1, H=3, I=1, routing="one_expert", skip_mode=0, backend="reference", seed=1)
@example(T=1, E=1, H=1, I=32, routing="random", skip_mode=0, backend="reference", seed=32)
@example(T=1, E=1, H=1, I=27, routing="random", skip_mode=0, backend="triton", seed=1)
def test_gradients_match_autograd_through_per_token_loop(T, E, H, I, routing, skip_mode, backend, seed):
    inputs = make_inputs(T, E, H, I, torch.float32, routing, seed, requires_grad=True)
    _, expected, dy = grads_through(lambda *a: ref.moe_per_token(*a, skip_mode), inputs, seed)
    with zaya_kernels.use_backend(backend):
        _, actual, _ = grads_through(lambda *a: moe(*a, skip_mode), inputs, seed)
    check_grads(actual, expected, inputs, max(H, I, T), f"{backend}", gradient_scales(inputs, dy, skip_mode))


# ---------------------------------------------------------------- torch.library integration
def _experts_args(T=7, E=3, H=12, I=8, skip_mode=1, requires_grad=False):
    x, gate_up, down, index, weight = make_inputs(T, E, H, I, torch.float32, "random", 0, requires_grad=requires_grad)
    dispatch = ref.moe_dispatch(index, E, 16)
    return (x, gate_up, down, weight, dispatch[2], dispatch[1], dispatch[4], dispatch[5], 16, skip_mode), index


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    args, index = _experts_args(requires_grad=True)
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.moe_dispatch.default, (index, 3, 16))
        torch.library.opcheck(torch.ops.zaya.moe_experts.default, args)
        x, gate_up, down, weight = (t.detach() for t in (args[0], args[1], args[2], args[3]))
        torch.library.opcheck(torch.ops.zaya.moe_experts_by_token.default, (x, gate_up, down, index, weight, 1))


def test_opcheck_backward_op():
    args, _ = _experts_args()
    torch.library.opcheck(torch.ops.zaya.moe_experts_backward.default, (torch.randn(7, 12), *args))


def test_torch_compile_fullgraph():
    x, gate_up, down, index, weight = make_inputs(9, 3, 16, 8, torch.float32, "random", 2)
    compiled = torch.compile(lambda *a: moe(*a, 1, block_m=16), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, gate_up, down, index, weight), moe(x, gate_up, down, index, weight, 1, block_m=16))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad, message", [(4, "value 4 > num_experts = 3"), (-1, "negative value")])
def test_bad_expert_index_value(backend, bad, message):
    index = torch.tensor([0, 1, bad, 3], dtype=torch.int32)
    with zaya_kernels.use_backend(backend), pytest.raises(ValueError, match=message):
        torch.ops.zaya.moe_dispatch(index, 3, 16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_experts_by_token_arguments(backend):
    x, gate_up, down, index, weight = make_inputs(4, 3, 16, 8, torch.float32, "random", 2)
    op = torch.ops.zaya.moe_experts_by_token
    with zaya_kernels.use_backend(backend):
        for bad, message in ((4, "value 4 > num_experts = 3"), (-1, "negative value")):
            with pytest.raises(ValueError, match=f"zaya::moe_experts_by_token: `expert_index` has .*{message}"):
                op(x, gate_up, down, torch.tensor([0, 1, bad, 3], dtype=torch.int32), weight, 0)
        with pytest.raises(TypeError, match="`expert_index` must have dtype"):
            op(x, gate_up, down, index.long(), weight, 0)
        with pytest.raises(ValueError, match=r"`expert_index` must have shape \(4,\)"):
            op(x, gate_up, down, index[:3], weight, 0)
        with pytest.raises(ValueError, match="`skip_mode` must be 0"):
            op(x, gate_up, down, index, weight, 2)
        with pytest.raises(ValueError, match="`gate_up` has hidden size"):
            op(x[:, :8].contiguous(), gate_up, down, index, weight, 0)
        with pytest.raises(RuntimeError, match="moe_experts_by_token has no backward"):
            op(x.requires_grad_(), gate_up, down, index, weight, 0)


def test_moe_wrapper_names_a_token_count_mismatch():
    x, gate_up, down, index, weight = make_inputs(20, 3, 16, 8, torch.float32, "random", 2)
    with pytest.raises(ValueError, match=r"`expert_index` must have shape \(20,\), got \(19,\)"):
        moe(x, gate_up, down, index[:19], weight)
    with pytest.raises(ValueError, match=r"`routing_weight` must have shape \(20,\)"):
        moe(x, gate_up, down, index, weight[:19])
    with pytest.raises(ValueError, match="`x` must have at least 1 dimensions"):
        moe(x[0, 0], gate_up, down, index, weight)


@pytest.mark.parametrize(
    "args, exc, message",
    [
        ((torch.zeros(4, dtype=torch.int64), 3, 16), TypeError, "`expert_index` must have dtype"),
        ((torch.zeros(2, 2, dtype=torch.int32), 3, 16), ValueError, "`expert_index` must have 1 dimensions"),
        ((torch.zeros(4, dtype=torch.int32), 0, 16), ValueError, "`num_experts` must be a positive int"),
        ((torch.zeros(4, dtype=torch.int32), 3, 24), ValueError, "`block_m` must be one of"),
    ],
)
def test_bad_dispatch_arguments(args, exc, message):
    with pytest.raises(exc, match=message):
        torch.ops.zaya.moe_dispatch(*args)


@pytest.mark.parametrize(
    "position, value, exc, message",
    [
        (1, torch.zeros(3, 16, 11), ValueError, "`gate_up` has hidden size 11 but `x` has 12"),
        (1, torch.zeros(3, 15, 12), ValueError, "`gate_up` must have shape \\[E, 2I, H\\]"),
        (2, torch.zeros(3, 12, 9), ValueError, "`down` must have shape \\(3, 12, 8\\)"),
        (2, torch.zeros(2, 12, 8), ValueError, "`down` must have shape \\(3, 12, 8\\)"),
        (2, torch.zeros(3, 12, 8, dtype=torch.float16), TypeError, "`down` must have dtype"),
        (3, torch.zeros(6), ValueError, "`routing_weight` must have shape \\(7,\\)"),
        (5, torch.zeros(4, dtype=torch.int32), ValueError, "`offsets` must have shape \\(5,\\)"),
        (6, torch.zeros(2, dtype=torch.int32), ValueError, "`tile_expert` must have shape \\(4,\\)"),
        (8, 24, ValueError, "`block_m` must be one of"),
        (9, 2, ValueError, "`skip_mode` must be 0"),
        (0, torch.zeros(12, 7).t(), ValueError, "`x` must be contiguous"),
    ],
)
def test_bad_experts_arguments(position, value, exc, message):
    args, _ = _experts_args()
    args = list(args)
    args[position] = value
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            torch.ops.zaya.moe_experts(*args)


def test_tile_map_of_another_block_m_is_rejected():
    args, _ = _experts_args(T=20)
    args = list(args)
    args[8] = 32  # the tile map was built for block_m = 16: cdiv(20, 16) + 3 = 5 tiles, block_m = 32 needs 4
    with pytest.raises(ValueError, match="`tile_expert` must have shape \\(4,\\)"):
        torch.ops.zaya.moe_experts(*args)


def _offsets_not_ending_at_t(offsets):
    offsets[-1] -= 1


def _tile_of_another_class(tile_expert):
    tile_expert[0] = (tile_expert[0] + 1) % 3


def _token_out_of_range(sorted_token_ids):
    sorted_token_ids[0] = 1000


@pytest.mark.parametrize("position, corrupt, message", [
    (4, _token_out_of_range, "`sorted_token_ids` has value 1000 >= T = 7"),
    (5, _offsets_not_ending_at_t, "`offsets` must be the class offsets of moe_dispatch"),
    (6, _tile_of_another_class, "not the tile map of `offsets` for block_m = 16"),
])
def test_experts_reject_dispatch_values_moe_dispatch_cannot_give(position, corrupt, message):
    """The kernels index x and y through the dispatch arguments unchecked: values moe_dispatch cannot produce (an
    out-of-range token would be an out-of-bounds store) raise, on every backend; dispatch outputs are read back only
    once modified."""
    args, index = _experts_args()
    args = list(args)
    args[4:8] = [torch.ops.zaya.moe_dispatch(index, 3, 16)[i] for i in (2, 1, 4, 5)]
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend):
            torch.ops.zaya.moe_experts(*args)  # unmodified: trusted
    corrupt(args[position])
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend), pytest.raises(ValueError, match=message):
            torch.ops.zaya.moe_experts(*args)
        with zaya_kernels.use_backend(backend), pytest.raises(ValueError, match=message):
            torch.ops.zaya.moe_experts_backward(torch.randn(7, 12), *args)


def test_experts_check_dispatch_outputs_of_two_calls_mixed_together():
    """Outputs of one moe_dispatch call are trusted together only: another call's offsets and tile map (here T = 20
    against this call's T = 17, with the same tile count) are read back and refused, not trusted (they would
    read sorted_token_ids past its end)."""
    gen = torch.Generator().manual_seed(0)
    E, H, inter, block_m = 3, 16, 16, 16
    this_call = torch.ops.zaya.moe_dispatch(torch.randint(0, E + 1, (17,), dtype=torch.int32, generator=gen), E,
                                            block_m)
    other_call = torch.ops.zaya.moe_dispatch(torch.randint(0, E + 1, (20,), dtype=torch.int32, generator=gen), E,
                                             block_m)
    assert this_call[4].shape == other_call[4].shape  # the shapes alone cannot tell them apart
    x, weight = torch.randn(17, H, generator=gen), torch.rand(17, generator=gen)
    gate_up, down = torch.randn(E, 2 * inter, H, generator=gen), torch.randn(E, H, inter, generator=gen)
    for backend in ("reference", "triton"):
        with zaya_kernels.use_backend(backend):
            torch.ops.zaya.moe_experts(x, gate_up, down, weight, this_call[2], this_call[1], this_call[4],
                                       this_call[5], block_m, 0)
            with pytest.raises(ValueError, match="from 0 to T = 17"):
                torch.ops.zaya.moe_experts(x, gate_up, down, weight, this_call[2], other_call[1], other_call[4],
                                           other_call[5], block_m, 0)


# ---------------------------------------------------------------- GPU: ZAYA1-8B-like shapes, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64, 700, 5000])
@pytest.mark.parametrize("skip_mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_matches_reference(T, skip_mode, dtype):
    E, H, I = 16, 2048, 1024
    inputs = make_inputs(T, E, H, I, dtype, "random", T, device="cuda", requires_grad=True)
    with zaya_kernels.use_backend("triton"):
        y, grads, _ = grads_through(lambda *a: moe(*a, skip_mode), inputs, 0)
        dispatch = moe_dispatch(inputs[3], E)
    assert zaya_kernels.last_backend("moe_experts") == "triton"
    with zaya_kernels.use_backend("hip"):
        dispatch_hip = moe_dispatch(inputs[3], E)
    with zaya_kernels.use_backend("reference"):
        y_ref, grads_ref, dy = grads_through(lambda *a: moe(*a, skip_mode), inputs, 0)
        dispatch_ref = moe_dispatch(inputs[3], E)
    for a, h, e in zip(dispatch, dispatch_hip, dispatch_ref):
        assert torch.equal(a, e) and torch.equal(h, e)
    assert_close(y, y_ref, dtype=dtype, reduction=max(H, I), what="gpu triton forward")
    check_grads(grads, grads_ref, inputs, max(H, I, T), "gpu triton", gradient_scales(inputs, dy, skip_mode))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("skip_mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_experts_by_token_matches_reference_and_captures(T, skip_mode, dtype):
    """The decode path (moe_experts_by_token, what `moe` runs for T <= 4 without gradients) at ZAYA1-8B's sizes,
    against the per-token reference loop, into a NaN-poisoned output, and replayed in a CUDA graph
    with new routing (no host synchronisation: the expert index is read on the device)."""
    from zaya_kernels.triton import moe as tri

    E, H, I = 16, 2048, 2048
    x, gate_up, down, index, weight = make_inputs(T, E, H, I, dtype, "random", T, device="cuda")
    index[0] = E  # one skipped token
    expected = ref.moe_per_token(x, gate_up, down, index, weight, skip_mode)
    y = torch.full_like(x, float("nan"))
    tri.moe_experts_by_token(x, gate_up, down, index, weight, skip_mode, y)
    assert_close(y, expected, dtype=dtype, reduction=max(H, I), what=f"by token T={T}")
    with torch.no_grad(), zaya_kernels.use_backend("triton"):
        moe(x, gate_up, down, index, weight, skip_mode)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = moe(x, gate_up, down, index, weight, skip_mode)
        assert zaya_kernels.last_backend("moe_experts_by_token") == "triton"
        index.copy_(draw_index("random", T, E, torch.Generator().manual_seed(11)).cuda())
        graph.replay()
    expected = ref.moe_per_token(x, gate_up, down, index, weight, skip_mode)
    assert_close(y, expected, dtype=dtype, reduction=max(H, I), what=f"by token T={T}, graph replay")


@pytest.mark.gpu
def test_gpu_dispatch_and_experts_capture_in_a_cuda_graph():
    """No host synchronisation: dispatch + experts record into a CUDA graph and replay with new routing."""
    T, E, H, I = 64, 16, 256, 128
    x, gate_up, down, index, weight = make_inputs(T, E, H, I, torch.bfloat16, "random", 3, device="cuda")
    with zaya_kernels.use_backend("triton"):
        moe(x, gate_up, down, index, weight)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = moe(x, gate_up, down, index, weight)
        index.copy_(draw_index("random", T, E, torch.Generator().manual_seed(9)).cuda())
        graph.replay()
    expected = ref.moe_per_token(x, gate_up, down, index, weight, 0)
    assert_close(y, expected, dtype=torch.bfloat16, reduction=max(H, I), what="graph replay")


def test_triton_rejects_sizes_past_32_bit_offsets():
    from zaya_kernels.triton import moe as tri

    with pytest.raises(ValueError, match="32-bit offsets"):
        tri.check_index_range("moe_experts", 2**20, 4096, 2048)
    tri.check_index_range("moe_experts", 65536, 2048, 2048)  # ZAYA1-8B at 64k tokens fits


# ---------------------------------------------------------------- expert parallelism (gloo, CPU processes)
def _expert_parallel_worker(rank, world_size, port, token_splits, backend="auto"):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        with zaya_kernels.use_backend(backend):
            _expert_parallel_check(rank, world_size, token_splits)
        # the gather and the scatter-back are the zaya row ops, on the backend the selector picked
        expected_backend = "reference" if backend == "auto" else backend
        for op in ("moe_permute_rows", "moe_unpermute_rows", "moe_unpermute_rows_backward"):
            assert zaya_kernels.last_backend(op) == expected_backend, (op, zaya_kernels.last_backend(op))
    finally:
        dist.destroy_process_group()


def _expert_parallel_check(rank, world_size, token_splits):
    """Each rank's y and gradients equal the single-process op's on its tokens and experts."""
    from zaya_kernels import distributed as ep

    E, H, I = 4, 24, 16
    T = sum(token_splits)
    start = sum(token_splits[:rank])
    rows = slice(start, start + token_splits[rank])
    for skip_mode in (0, 1):
        inputs = make_inputs(T, E, H, I, torch.float32, "random", 11, requires_grad=True)
        x, gate_up, down, index, weight = inputs
        gen = torch.Generator().manual_seed(12)
        grad_y = torch.randn(T, H, generator=gen)
        # one process with every token and every expert
        y_full = moe(x, gate_up, down, index, weight, skip_mode)
        expected = torch.autograd.grad((y_full * grad_y).sum(), (x, gate_up, down, weight))
        # this rank: its tokens, its experts
        local_x = x.detach()[rows].clone().requires_grad_(True)
        local_w = weight.detach()[rows].clone().requires_grad_(True)
        local_gate_up, local_down = (t.detach().clone().requires_grad_(True)
                                     for t in ep.shard_experts(gate_up, down, rank, world_size))
        y = ep.moe_expert_parallel(local_x, local_gate_up, local_down, index[rows], local_w, E, skip_mode)
        grads = torch.autograd.grad((y * grad_y[rows]).sum(), (local_x, local_gate_up, local_down, local_w),
                                    allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g
                 for g, t in zip(grads, (local_x, local_gate_up, local_down, local_w))]
        first, end = ep.expert_range(E, rank, world_size)
        assert_close(y, y_full.detach()[rows], reduction=max(H, I), what=f"rank {rank} y skip_mode {skip_mode}")
        mine = (expected[0][rows], expected[1][first:end], expected[2][first:end], expected[3][rows])
        for name, a, e in zip(("x", "gate_up", "down", "weight"), grads, mine):
            assert_close(a, e, reduction=max(H, I, T), what=f"rank {rank} grad {name} skip_mode {skip_mode}")


@pytest.mark.parametrize("world_size, token_splits, backend", [(2, (13, 6), "auto"), (4, (5, 0, 9, 3), "auto"),
                                                               (2, (7, 12), "triton")])
def test_expert_parallel_gloo_equals_one_process(world_size, token_splits, backend):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_expert_parallel_worker, args=(world_size, port, token_splits, backend), nprocs=world_size, join=True)


# ---------------------------------------------------------------- HIP dispatch kernel (kernels/moe.cuh), host emulation
_EMU_DRIVER = r"""
#define ZAYA_HOST_EMULATION 1
#include "moe.cuh"
using namespace zaya::kernels;

extern "C" int zaya_emu_moe_dispatch(const int32_t* index, int T, int E, int block_m, int num_tiles, int32_t* counts,
                                     int32_t* offsets, int32_t* sorted, int32_t* inverse, int32_t* tile_expert,
                                     int32_t* tile_start) {
  zaya_emu_launch(1, kMoeDispatchThreads, [&] {
    moe_dispatch_kernel<kMoeDispatchThreads>(index, T, E, block_m, num_tiles, counts, offsets, sorted, inverse,
                                             tile_expert, tile_start); });
  return 0;
}
"""


@pytest.fixture(scope="module", params=EMULATED_WARP_SIZES, ids=lambda w: f"warp{w}")
def moe_emulation(request, tmp_path_factory):
    return compile_host_emulation(_EMU_DRIVER, tmp_path_factory.mktemp(f"moe_emu{request.param}"), request.param)


@pytest.mark.parametrize("T, E, block_m, routing", [(0, 4, 16, "random"), (1, 1, 16, "random"), (37, 5, 16, "random"),
                                                    (300, 16, 64, "some_experts_empty"), (257, 64, 16, "random"),
                                                    (90, 3, 32, "all_skipped"), (70, 8, 16, "one_expert")])
def test_hip_dispatch_kernel_emulated_matches_reference(moe_emulation, T, E, block_m, routing):
    """kernels/moe.cuh run on CPU threads (compat.cuh's host emulation) against the reference dispatch."""
    import ctypes

    index = draw_index(routing, T, E, torch.Generator().manual_seed(T + E))
    expected = ref.moe_dispatch(index, E, block_m)
    actual = [torch.full_like(e, -7) for e in expected]

    def ptr(tensor):
        return ctypes.c_void_p(tensor.data_ptr())

    rc = moe_emulation.zaya_emu_moe_dispatch(ptr(index), T, E, block_m, ref.num_tiles(T, E, block_m),
                                             *[ptr(a) for a in actual])
    assert rc == 0
    names = ("counts", "offsets", "sorted_token_ids", "inverse", "tile_expert", "tile_start")
    for a, e, name in zip(actual, expected, names):
        assert torch.equal(a, e), name


# ---------------------------------------------------------------- expert parallelism: row gather / scatter-back
from zaya_kernels.ops.moe import moe_permute_rows, moe_unpermute_rows  # noqa: E402

ROW_BACKENDS = ("reference", "triton")


def _row_inputs(T, H, dtype, routing, seed, device="cpu", requires_grad=False, E=3):
    """(x [T, H], routing_weight [T], sorted_token_ids int32 [T], N = routed tokens) from a dispatch of `routing`."""
    gen = torch.Generator().manual_seed(seed)
    index = draw_index(routing, T, E, gen)
    _, offsets, sorted_ids, *_ = ref.moe_dispatch(index, E, 16)
    x = torch.randn(T, H, generator=gen).to(dtype).to(device).requires_grad_(requires_grad)
    weight = (torch.rand(T, generator=gen) * 0.9 + 0.1).to(device).requires_grad_(requires_grad)
    return x, weight, sorted_ids.to(device), int(offsets[E])


def _permute_loop(x, sorted_ids, num_rows):
    """The definition, one row at a time (independent of the reference module; differentiable)."""
    rows = [x[t] for t in sorted_ids[:num_rows].tolist()]
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def _unpermute_loop(rows, sorted_ids, x, weight, skip_mode):
    position = {t: i for i, t in enumerate(sorted_ids.tolist())}
    N, H = rows.shape
    out = []
    for t in range(sorted_ids.shape[0]):
        i = position[t]
        if i < N:
            out.append(rows[i])
        elif skip_mode == 1:
            out.append((weight[t].float() * x[t].float()).to(rows.dtype))
        else:
            out.append(rows.new_zeros(H))
    return torch.stack(out) if out else rows.new_zeros(0, H)


@settings(max_examples=30)
@given(T=st.sampled_from([0, 1, 2, 7, 13, 31]), H=st.integers(1, 40), dtype=st.sampled_from([torch.float32,
                                                                                             torch.float16]),
       routing=st.sampled_from(ROUTINGS), skip_mode=st.sampled_from([0, 1]), backend=st.sampled_from(ROW_BACKENDS),
       any_n=st.booleans(), seed=st.integers(0, 2**16))
def test_row_ops_match_definition(T, H, dtype, routing, skip_mode, backend, any_n, seed):
    """Gather and scatter-back against the per-row definition: bit-exact (copies, one fp32 product rounded once)."""
    x, weight, sorted_ids, N = _row_inputs(T, H, dtype, routing, seed)
    if any_n:  # the ops take any prefix of the sorted order, not only the routed tokens
        N = int(torch.randint(0, T + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    rows_in = torch.randn(N, H, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with zaya_kernels.use_backend(backend):
        rows = moe_permute_rows(x, sorted_ids, N)
        y = moe_unpermute_rows(rows_in, sorted_ids, x, weight, skip_mode)
        ids = moe_permute_rows(torch.arange(T, dtype=torch.int32).view(T, 1), sorted_ids, N)
    assert zaya_kernels.last_backend("moe_permute_rows") == backend
    assert zaya_kernels.last_backend("moe_unpermute_rows") == backend
    assert rows.dtype == dtype and rows.shape == (N, H) and y.dtype == dtype and y.shape == (T, H)
    assert torch.equal(rows, _permute_loop(x, sorted_ids, N))
    assert torch.equal(y, _unpermute_loop(rows_in, sorted_ids, x, weight, skip_mode))
    assert torch.equal(ids.view(N), sorted_ids[:N])
    if routing == "all_skipped":
        assert N == 0 or any_n
    # gather then scatter-back of every row is the identity
    with zaya_kernels.use_backend(backend):
        assert torch.equal(moe_unpermute_rows(moe_permute_rows(x, sorted_ids, T), sorted_ids), x)


@settings(max_examples=25)
@given(T=st.sampled_from([0, 1, 5, 12, 23]), H=st.integers(1, 33), dtype=st.sampled_from([torch.float32,
                                                                                          torch.float16]),
       routing=st.sampled_from(ROUTINGS), skip_mode=st.sampled_from([0, 1]), backend=st.sampled_from(ROW_BACKENDS),
       seed=st.integers(0, 2**16))
def test_row_ops_gradients_match_autograd_through_definition(T, H, dtype, routing, skip_mode, backend, seed):
    """Gradients to x, routing_weight (skip_mode 1) and the scattered rows, against autograd through the loops."""
    x, weight, sorted_ids, N = _row_inputs(T, H, dtype, routing, seed, requires_grad=True)
    gen = torch.Generator().manual_seed(seed + 2)
    rows_in = torch.randn(N, H, generator=gen).to(dtype).requires_grad_(True)
    grad_rows, grad_y = torch.randn(N, H, generator=gen), torch.randn(T, H, generator=gen)

    def grads(permute, unpermute):
        rows = permute(x, sorted_ids, N)
        y = unpermute(rows_in, sorted_ids, x, weight, skip_mode)
        loss = (rows.float() * grad_rows).sum() + (y.float() * grad_y).sum()
        loss = loss + 0 * (x.float().sum() + weight.sum() + rows_in.float().sum())  # a graph even when T = 0
        out = torch.autograd.grad(loss, (x, weight, rows_in), allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(out, (x, weight, rows_in))]

    expected = grads(_permute_loop, _unpermute_loop)
    with zaya_kernels.use_backend(backend):
        actual = grads(moe_permute_rows, moe_unpermute_rows)
    if T > 0:
        assert zaya_kernels.last_backend("moe_unpermute_rows_backward") == backend
    for name, a, e in zip(("x", "routing_weight", "rows"), actual, expected):
        assert a.dtype == e.dtype, name
        assert_close(a, e, dtype=a.dtype, reduction=H, what=f"{backend} grad {name} skip_mode {skip_mode}")
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[2], expected[2])  # copies and one product


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("skip_mode", [0, 1])
@pytest.mark.parametrize("routing", ["random", "all_skipped"])
def test_row_ops_opcheck(backend, skip_mode, routing):
    x, weight, sorted_ids, N = _row_inputs(11, 6, torch.float32, routing, 3, requires_grad=True)
    rows = torch.randn(N, 6, requires_grad=True)
    with zaya_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.zaya.moe_permute_rows.default, (x, sorted_ids, N))
        torch.library.opcheck(torch.ops.zaya.moe_unpermute_rows.default, (rows, sorted_ids, x, weight, skip_mode))
        torch.library.opcheck(torch.ops.zaya.moe_unpermute_rows_backward.default,
                              (torch.randn(11, 6), sorted_ids, x.detach(), weight.detach(), N, skip_mode))
    torch.library.opcheck(torch.ops.zaya.moe_unpermute_rows.default, (rows, sorted_ids, None, None, 0))


def test_row_ops_torch_compile_fullgraph():
    x, weight, sorted_ids, N = _row_inputs(9, 8, torch.float32, "random", 4)

    def f(x, weight, sorted_ids):
        return moe_unpermute_rows(moe_permute_rows(x, sorted_ids, N) * 2, sorted_ids, x, weight, 1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, weight, sorted_ids), f(x, weight, sorted_ids))


def _bad_row_call(op, **changes):
    """A call of `op` with valid T = 5, H = 3, N = 2 arguments, some replaced."""
    x, weight, sorted_ids, _ = _row_inputs(5, 3, torch.float32, "random", 0)
    args = {
        "moe_permute_rows": dict(x=x, sorted_token_ids=sorted_ids, num_rows=2),
        "moe_unpermute_rows": dict(rows=torch.zeros(2, 3), sorted_token_ids=sorted_ids, x=x, routing_weight=weight,
                                   skip_mode=1),
        "moe_unpermute_rows_backward": dict(grad_y=torch.zeros(5, 3), sorted_token_ids=sorted_ids, x=x,
                                            routing_weight=weight, num_rows=2, skip_mode=1),
    }[op]
    args.update(changes)
    return lambda: getattr(torch.ops.zaya, op)(*args.values())


@pytest.mark.parametrize("op", ["moe_permute_rows", "moe_unpermute_rows", "moe_unpermute_rows_backward"])
@pytest.mark.parametrize("ids, message", [([0, 1, 5, 2, 3], "value 5 >= T = 5: index out of range"),
                                          ([0, 1, -2, 2, 3], "negative value \\(-2\\): index out of range"),
                                          ([0, 1, 1, 2, 3], "holds token 1 more than once")])
def test_row_ops_reject_bad_token_ids(op, ids, message):
    call = _bad_row_call(op, sorted_token_ids=torch.tensor(ids, dtype=torch.int32))
    for backend in ROW_BACKENDS:
        with zaya_kernels.use_backend(backend), pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(
    "op, changes, exc, message",
    [
        ("moe_permute_rows", dict(x=torch.zeros(4, 3)), ValueError, "`sorted_token_ids` must have shape \\(4,\\)"),
        ("moe_permute_rows", dict(num_rows=6), ValueError, "`num_rows` = 6 outside \\[0, T = 5\\]"),
        ("moe_permute_rows", dict(num_rows=-1), ValueError, "`num_rows` = -1 outside"),
        ("moe_permute_rows", dict(x=torch.zeros(5)), ValueError, "`x` must have 2 dimensions"),
        ("moe_permute_rows", dict(x=torch.zeros(5, 3, dtype=torch.int64)), TypeError, "`x` must have dtype"),
        ("moe_permute_rows", dict(x=torch.zeros(3, 5).t()), ValueError, "`x` must be contiguous"),
        ("moe_permute_rows", dict(sorted_token_ids=torch.arange(5)), TypeError, "`sorted_token_ids` must have dtype"),
        ("moe_unpermute_rows", dict(rows=torch.zeros(6, 3)), ValueError, "`rows` has 6 rows but `sorted_token_ids` "
                                                                         "only 5"),
        ("moe_unpermute_rows", dict(rows=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "`rows` must have dtype"),
        ("moe_unpermute_rows", dict(x=None), ValueError, "skip_mode 1 .* needs `x` and `routing_weight`"),
        ("moe_unpermute_rows", dict(routing_weight=None), ValueError, "needs `x` and `routing_weight`"),
        ("moe_unpermute_rows", dict(x=torch.zeros(5, 4)), ValueError, "`x` must have shape \\(5, 3\\)"),
        ("moe_unpermute_rows", dict(x=torch.zeros(5, 3, dtype=torch.float16)), TypeError, "`x` must have dtype"),
        ("moe_unpermute_rows", dict(routing_weight=torch.zeros(4)), ValueError,
         "`routing_weight` must have shape \\(5,\\)"),
        ("moe_unpermute_rows", dict(skip_mode=2), ValueError, "`skip_mode` must be 0"),
        ("moe_unpermute_rows_backward", dict(grad_y=torch.zeros(4, 3)), ValueError,
         "`sorted_token_ids` must have shape \\(4,\\)"),
        ("moe_unpermute_rows_backward", dict(num_rows=9), ValueError, "`num_rows` = 9 outside"),
        ("moe_unpermute_rows_backward", dict(x=torch.zeros(5, 2)), ValueError, "`x` must have shape \\(5, 3\\)"),
    ],
)
def test_row_ops_reject_bad_arguments(op, changes, exc, message):
    call = _bad_row_call(op, **changes)
    for backend in ROW_BACKENDS:
        with zaya_kernels.use_backend(backend), pytest.raises(exc, match=message):
            call()


def test_row_ops_hip_backend_needs_gpu_kernels():
    """CPU tensors (or a CPU-only build): asking for hip raises, naming the op, instead of running something else."""
    x, _, sorted_ids, N = _row_inputs(5, 3, torch.float32, "random", 0)
    from zaya_kernels.backend import BackendUnavailableError

    with zaya_kernels.use_backend("hip"), pytest.raises(BackendUnavailableError, match="moe_permute_rows"):
        moe_permute_rows(x, sorted_ids, N)


# ---------------------------------------------------------------- the row kernels of kernels/moe.cuh, host emulation
_ROW_EMU_DRIVER = r"""
#define ZAYA_HOST_EMULATION 1
#include "moe.cuh"
using namespace zaya::kernels;
using zaya::dev::bf16_t;
using zaya::dev::half_t;

template <bool kAllowInt, typename F>
static int row_by_dtype(int code, F&& f) {  // 0 float32, 1 float16, 2 bfloat16, 3 int32 (gather only)
  switch (code) {
    case 0: f(float{}); return 0;
    case 1: f(half_t{}); return 0;
    case 2: f(bf16_t{}); return 0;
    case 3: if constexpr (kAllowInt) { f(int32_t{}); return 0; }
  }
  return 1;
}

static unsigned row_grid(int64_t rows, int lanes_log2) {
  const int64_t per_block = kMoeRowThreads >> lanes_log2;
  return static_cast<unsigned>((rows + per_block - 1) / per_block);
}

extern "C" int zaya_emu_moe_permute_rows(int dt, int vec, const void* x, const int32_t* sorted, int64_t num_rows,
                                         int64_t H, int lanes_log2, void* out) {
  return row_by_dtype<true>(dt, [&](auto tag) {
    using A = decltype(tag);
    constexpr int V = 16 / sizeof(A);
    zaya_emu_launch(row_grid(num_rows, lanes_log2), kMoeRowThreads, [&] {
      if (vec == 1) moe_permute_rows_kernel<A, 1>((const A*)x, sorted, num_rows, H, lanes_log2, (A*)out);
      else moe_permute_rows_kernel<A, V>((const A*)x, sorted, num_rows, H, lanes_log2, (A*)out); });
  });
}

extern "C" int zaya_emu_moe_unpermute_rows(int dt, int vec, const void* rows, const int32_t* sorted, const void* x,
                                           const float* w, int64_t T, int64_t num_rows, int64_t H, int skip_mode,
                                           int lanes_log2, void* y) {
  return row_by_dtype<false>(dt, [&](auto tag) {
    using A = decltype(tag);
    constexpr int V = 16 / sizeof(A);
    zaya_emu_launch(row_grid(T, lanes_log2), kMoeRowThreads, [&] {
      if (vec == 1) moe_unpermute_rows_kernel<A, 1>((const A*)rows, sorted, (const A*)x, w, T, num_rows, H,
                                                     skip_mode, lanes_log2, (A*)y);
      else moe_unpermute_rows_kernel<A, V>((const A*)rows, sorted, (const A*)x, w, T, num_rows, H, skip_mode,
                                           lanes_log2, (A*)y); });
  });
}

extern "C" int zaya_emu_moe_unpermute_rows_bwd(int dt, int vec, const void* dy, const int32_t* sorted, const void* x,
                                               const float* w, int64_t T, int64_t num_rows, int64_t H, int skip_mode,
                                               void* grad_rows, void* grad_x, float* grad_w) {
  return row_by_dtype<false>(dt, [&](auto tag) {
    using A = decltype(tag);
    constexpr int V = 16 / sizeof(A);
    zaya_emu_launch(skip_mode == 1 ? T : num_rows, kMoeRowThreads, [&] {
      if (vec == 1) moe_unpermute_rows_bwd_kernel<A, 1>((const A*)dy, sorted, (const A*)x, w, num_rows, H, skip_mode,
                                                         (A*)grad_rows, (A*)grad_x, grad_w);
      else moe_unpermute_rows_bwd_kernel<A, V>((const A*)dy, sorted, (const A*)x, w, num_rows, H, skip_mode,
                                               (A*)grad_rows, (A*)grad_x, grad_w); });
  });
}
"""

_EMU_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3}


@pytest.fixture(scope="module", params=EMULATED_WARP_SIZES, ids=lambda w: f"warp{w}")
def row_emulation(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"moe_row_emu{request.param}")
    return compile_host_emulation(_ROW_EMU_DRIVER, folder, request.param)


def _lanes_log2(packs):
    """The launcher's choice (csrc/moe.cu row_lanes_log2): a power of two covering the row, at most the block."""
    lg = 0
    while (1 << lg) < packs and (1 << lg) < 256:
        lg += 1
    return lg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "T, H, routing, skip_mode, vec, lanes",
    [(0, 8, "random", 1, 1, None), (1, 3, "random", 1, 1, None), (13, 16, "random", 1, 16, None),
     (13, 16, "random", 0, 16, 0), (21, 40, "all_skipped", 1, 1, 2), (9, 7, "none_skipped", 1, 1, None),
     (17, 48, "some_experts_empty", 0, 16, None), (11, 600, "random", 1, 16, None)],
)
def test_hip_row_kernels_emulated_match_reference(row_emulation, dtype, T, H, routing, skip_mode, vec, lanes):
    """kernels/moe.cuh row gather / scatter-back / backward on CPU threads vs the reference; vec 16 = 16-byte packs,
    lanes = threads per row (log2; None: the launcher's choice; smaller values exercise the strided row loop)."""
    import ctypes

    vec = 1 if vec == 1 else 16 // dtype.itemsize
    assert H % vec == 0
    x, weight, sorted_ids, N = _row_inputs(T, H, dtype, routing, T * 100 + H)
    gen = torch.Generator().manual_seed(H)
    rows_in = torch.randn(N, H, generator=gen).to(dtype)
    grad_y = torch.randn(T, H, generator=gen).to(dtype)
    lg = _lanes_log2(H // vec) if lanes is None else lanes

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)

    code = _EMU_CODES[dtype]
    rows = torch.full((N, H), 7.0).to(dtype)
    assert row_emulation.zaya_emu_moe_permute_rows(code, vec, ptr(x), ptr(sorted_ids), ctypes.c_int64(N),
                                                   ctypes.c_int64(H), lg, ptr(rows)) == 0
    assert torch.equal(rows, ref.moe_permute_rows(x, sorted_ids, N))
    if H % 4 == 0:  # int32 rows (expert ids, vectorised like float)
        xi = torch.randint(-9, 9, (T, H), dtype=torch.int32, generator=gen)
        ri = torch.full((N, H), 77, dtype=torch.int32)
        assert row_emulation.zaya_emu_moe_permute_rows(3, 1 if vec == 1 else 4, ptr(xi), ptr(sorted_ids),
                                                       ctypes.c_int64(N), ctypes.c_int64(H), lg, ptr(ri)) == 0
        assert torch.equal(ri, ref.moe_permute_rows(xi, sorted_ids, N))

    y = torch.full((T, H), 7.0).to(dtype)
    assert row_emulation.zaya_emu_moe_unpermute_rows(
        code, vec, ptr(rows_in), ptr(sorted_ids), ptr(x if skip_mode else None), ptr(weight if skip_mode else None),
        ctypes.c_int64(T), ctypes.c_int64(N), ctypes.c_int64(H), skip_mode, lg, ptr(y)) == 0
    assert torch.equal(y, ref.moe_unpermute_rows(rows_in, sorted_ids, x, weight, skip_mode))

    grad_rows = torch.full((N, H), 7.0).to(dtype)
    grad_x = torch.full((T, H), 7.0).to(dtype) if skip_mode else None
    grad_w = torch.full((T,), 7.0) if skip_mode else None
    assert row_emulation.zaya_emu_moe_unpermute_rows_bwd(
        code, vec, ptr(grad_y), ptr(sorted_ids), ptr(x if skip_mode else None), ptr(weight if skip_mode else None),
        ctypes.c_int64(T), ctypes.c_int64(N), ctypes.c_int64(H), skip_mode, ptr(grad_rows), ptr(grad_x),
        ptr(grad_w)) == 0
    expected = ref.moe_unpermute_rows_backward(grad_y, sorted_ids, x, weight, N, skip_mode)
    assert torch.equal(grad_rows, expected[0])
    if skip_mode:
        assert torch.equal(grad_x, expected[1])
        assert_close(grad_w, expected[2], reduction=H, what="emulated grad_w")


# ---------------------------------------------------------------- GPU: the HIP/CUDA row kernels vs the reference
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T, H", [(0, 2048), (1, 2048), (37, 2048), (5000, 2048), (301, 77), (64, 1)])
@pytest.mark.parametrize("skip_mode", [0, 1])
def test_gpu_hip_row_ops_match_reference(dtype, T, H, skip_mode):
    x, weight, sorted_ids, N = _row_inputs(T, H, dtype, "random", T + H, device="cuda", requires_grad=True, E=16)
    gen = torch.Generator().manual_seed(T)
    rows_in = torch.randn(N, H, generator=gen).to(dtype).cuda().requires_grad_(True)
    grad_rows, grad_y = torch.randn(N, H, generator=gen).cuda(), torch.randn(T, H, generator=gen).cuda()

    def run():
        rows = moe_permute_rows(x, sorted_ids, N)
        y = moe_unpermute_rows(rows_in, sorted_ids, x, weight, skip_mode)
        loss = (rows.float() * grad_rows).sum() + (y.float() * grad_y).sum()
        grads = torch.autograd.grad(loss, (x, weight, rows_in), allow_unused=True)
        return [rows, y] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, weight, rows_in))]

    with zaya_kernels.use_backend("hip"):
        actual = run()
        ids = moe_permute_rows(sorted_ids.view(T, 1), sorted_ids, N)  # int32 rows
    assert zaya_kernels.last_backend("moe_permute_rows") == "hip"
    if T > 0:
        assert zaya_kernels.last_backend("moe_unpermute_rows_backward") == "hip"
    with zaya_kernels.use_backend("reference"):
        expected = run()
    assert torch.equal(ids.view(N), sorted_ids[sorted_ids[:N].long()])
    for name, a, e in zip(("rows", "y", "grad x", "grad routing_weight", "grad rows"), actual, expected):
        if name == "grad routing_weight":
            assert_close(a, e, reduction=H, what=f"hip {name}")
        else:
            assert torch.equal(a, e), name


def test_row_ops_check_a_dispatch_permutation_again_once_it_is_modified():
    """The permutation moe_dispatch returned is trusted (no value check) only while unmodified."""
    _, _, sorted_ids, _, _, _ = moe_dispatch(torch.tensor([1, 0, 1, 2], dtype=torch.int32), 2)
    x = torch.randn(4, 3)
    assert torch.equal(moe_permute_rows(x, sorted_ids, 4), x[sorted_ids.long()])
    sorted_ids[0] = sorted_ids[1]
    with pytest.raises(ValueError, match="more than once"):
        moe_permute_rows(x, sorted_ids, 4)


def test_row_ops_check_a_part_of_a_dispatch_permutation():
    """Only the whole permutation moe_dispatch returned is trusted: a slice of it is not a permutation of its own
    0..T-1 (here [3, 0, 1] for T = 3) and must be checked, not read out of range."""
    _, _, sorted_ids, _, _, _ = moe_dispatch(torch.tensor([1, 1, 1, 0], dtype=torch.int32), 2)
    assert sorted_ids.tolist() == [3, 0, 1, 2]
    for backend in ROW_BACKENDS:
        with zaya_kernels.use_backend(backend), pytest.raises(ValueError, match="value 3 >= T = 3"):
            moe_permute_rows(torch.randn(3, 2), sorted_ids[:3], 3)

def test_moe_skips_the_value_check_only_for_an_unmodified_router_index():
    """zaya_router's expert index is valid by construction (moe reads no values back for it); once modified it is
    checked again."""
    from zaya_kernels.ops import _validate as check
    from zaya_kernels.ops import zaya_router

    gen = torch.Generator().manual_seed(0)
    hidden, router_hidden, experts, inter = 8, 4, 3, 6

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    index, weight, _, _ = zaya_router(rand(5, hidden), None, None, rand(router_hidden, hidden), rand(router_hidden),
                                      rand(router_hidden), rand(router_hidden, router_hidden), rand(router_hidden),
                                      rand(router_hidden, router_hidden), rand(router_hidden),
                                      rand(experts + 1, router_hidden), torch.zeros(experts + 1))
    assert check.known_valid(index, ("expert_index", experts)) and check.known_valid(index.view(-1),
                                                                                      ("expert_index", experts))
    assert not check.known_valid(index, ("expert_index", experts + 1))
    x, gate_up, down = rand(5, hidden), rand(experts, 2 * inter, hidden), rand(experts, hidden, inter)
    moe(x, gate_up, down, index, weight)
    index[0] = experts + 4
    assert not check.known_valid(index, ("expert_index", experts))
    with pytest.raises(ValueError, match="num_experts"):
        moe(x, gate_up, down, index, weight)


@pytest.mark.parametrize("tokens", [2, 7])  # moe_experts_by_token, and moe_dispatch + moe_experts
def test_moe_reads_back_no_values_it_vouches_for_in_inference_mode(monkeypatch, tokens):
    """Under torch.inference_mode no tensor has a version counter, so remember_valid cannot follow the router's
    index or the dispatch outputs: moe still reads back none of its own dispatch outputs, nor the expert index when
    the caller says it is the router's (index_from_router=True); any other index is read back (checked: one read)
    and a bad one raises. Reads counted as value checks that were not skipped."""
    moe_ops = importlib.import_module("zaya_kernels.ops.moe")  # zaya_kernels.ops.moe is the function
    checks = []
    real = moe_ops._skip_value_check

    def recording(t, what):
        skipped = real(t, what)
        checks.append(skipped)
        return skipped

    monkeypatch.setattr(moe_ops, "_skip_value_check", recording)
    E = 3
    with torch.inference_mode():
        x, gate_up, down, index, weight = make_inputs(tokens, E, 8, 6, torch.float32, "random", seed=tokens)
        expected = ref.moe_per_token(x, gate_up, down, index, weight)
        for from_router, reads in ((True, 0), (False, 1)):
            checks.clear()
            assert_close(moe(x, gate_up, down, index, weight, index_from_router=from_router), expected, reduction=8)
            assert checks and checks.count(False) == reads, (from_router, checks)
        with pytest.raises(ValueError, match="num_experts"):
            moe(x, gate_up, down, index.clone().fill_(E + 3), weight)
