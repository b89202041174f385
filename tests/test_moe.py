"""Top-1 MoE: dispatch and experts, every backend against the per-token reference loop, forward and backward."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zaya_kernels
from zaya_kernels.ops import moe, moe_dispatch
from zaya_kernels.reference import moe as ref

from helpers import assert_close, compile_host_emulation

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
    """(y, gradients of a random linear function of y w.r.t. x, gate_up, down, routing_weight)."""
    x, gate_up, down, index, weight = inputs
    y = fn(x, gate_up, down, index, weight)
    if not y.requires_grad:  # every token skipped with skip_mode 0: y is the constant 0
        return y, (None, None, None, None)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = (y.float() * torch.randn(y.shape, generator=gen).to(y.device)).sum()
    return y, torch.autograd.grad(loss, (x, gate_up, down, weight), allow_unused=True)


def check_grads(actual, expected, inputs, reduction, what):
    for name, a, e, inp in zip(("x", "gate_up", "down", "routing_weight"), actual, expected,
                               (inputs[0], inputs[1], inputs[2], inputs[4])):
        e = torch.zeros_like(inp) if e is None else e  # autograd: unused input (no token reached it)
        a = torch.zeros_like(inp) if a is None else a
        assert a.dtype == inp.dtype, f"{what} grad {name} dtype"
        assert_close(a, e, dtype=inp.dtype, reduction=reduction, what=f"{what} grad {name}")


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
    y, expected = grads_through(lambda *a: ref.moe_per_token(*a, skip_mode), inputs, seed)
    x, gate_up, down, index, weight = inputs
    dispatch = ref.moe_dispatch(index, E, 16)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_y = torch.randn(y.shape, generator=gen)
    actual = ref.moe_experts_backward(grad_y, x.detach(), gate_up.detach(), down.detach(), weight.detach(),
                                      dispatch[2], dispatch[1], dispatch[4], dispatch[5], 16, skip_mode)
    check_grads(actual, expected, inputs, max(H, I, T), "reference formula")


# ---------------------------------------------------------------- dispatch
@settings(max_examples=25)
@given(T=st.integers(0, 600), E=st.integers(1, 64), block_m=st.sampled_from([16, 32, 64]),
       routing=st.sampled_from(ROUTINGS), seed=st.integers(0, 2**16))
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
def test_triton_forward_matches_per_token_loop(T, E, H, I, dtype, routing, skip_mode, block_m, seed):
    x, gate_up, down, index, weight = make_inputs(T, E, H, I, dtype, routing, seed)
    expected = ref.moe_per_token(x, gate_up, down, index, weight, skip_mode)
    with zaya_kernels.use_backend("triton"):
        actual = moe(x, gate_up, down, index, weight, skip_mode, block_m=block_m)
    assert zaya_kernels.last_backend("moe_experts") == "triton"
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype=dtype, reduction=max(H, I), what="triton forward")


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
def test_gradients_match_autograd_through_per_token_loop(T, E, H, I, routing, skip_mode, backend, seed):
    inputs = make_inputs(T, E, H, I, torch.float32, routing, seed, requires_grad=True)
    _, expected = grads_through(lambda *a: ref.moe_per_token(*a, skip_mode), inputs, seed)
    with zaya_kernels.use_backend(backend):
        _, actual = grads_through(lambda *a: moe(*a, skip_mode), inputs, seed)
    check_grads(actual, expected, inputs, max(H, I, T), f"{backend}")


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


# ---------------------------------------------------------------- GPU: ZAYA1-8B-like shapes, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64, 700, 5000])
@pytest.mark.parametrize("skip_mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_matches_reference(T, skip_mode, dtype):
    E, H, I = 16, 2048, 1024
    inputs = make_inputs(T, E, H, I, dtype, "random", T, device="cuda", requires_grad=True)
    with zaya_kernels.use_backend("triton"):
        y, grads = grads_through(lambda *a: moe(*a, skip_mode), inputs, 0)
        dispatch = moe_dispatch(inputs[3], E)
    assert zaya_kernels.last_backend("moe_experts") == "triton"
    with zaya_kernels.use_backend("hip"):
        dispatch_hip = moe_dispatch(inputs[3], E)
    with zaya_kernels.use_backend("reference"):
        y_ref, grads_ref = grads_through(lambda *a: moe(*a, skip_mode), inputs, 0)
        dispatch_ref = moe_dispatch(inputs[3], E)
    for a, h, e in zip(dispatch, dispatch_hip, dispatch_ref):
        assert torch.equal(a, e) and torch.equal(h, e)
    assert_close(y, y_ref, dtype=dtype, reduction=max(H, I), what="gpu triton forward")
    check_grads(grads, grads_ref, inputs, max(H, I, T), "gpu triton")


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
def _expert_parallel_worker(rank, world_size, port, token_splits):
    import torch.distributed as dist

    from zaya_kernels import distributed as ep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size, token_splits", [(2, (13, 6)), (4, (5, 0, 9, 3))])
def test_expert_parallel_gloo_equals_one_process(world_size, token_splits):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_expert_parallel_worker, args=(world_size, port, token_splits), nprocs=world_size, join=True)


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


@pytest.fixture(scope="module")
def moe_emulation(tmp_path_factory):
    return compile_host_emulation(_EMU_DRIVER, tmp_path_factory.mktemp("moe_emu"))


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
