"""Hazards that CI's tiny interpreter shapes cannot show and a GPU shows at ZAYA1-8B serving shapes (H 2048, 8 query /
2 kv heads of 128 dims, router hidden 256, 16 experts + skip; decode caches of tens of GB, 64k-token prefills):

- grid limits: CUDA / HIP grids take 65535 programs on axes 1 and 2, the prefill attention kernels put the sequence
  on axis 1 (a launch per 65532 sequences now);
- 64-bit offsets: paged and contiguous decode caches with more than 2^31 (2^32) elements;
- shared memory bounds of launch configurations the AOT report never compiles (router classes, decode query tiles);
- the router's split-H decode: the arrival counter per stream and per captured launch, and every wave's partial
  stores complete before the arrival (AMD's bare s_barrier does not wait for them).

CPU tests use the launchers' grid computation, the interpreter on a virtual (untouched) 8 GiB cache, the AOT
compiler's gfx942 assembly, and monkeypatched launch limits; the `gpu` tests run the triggering shapes on a GPU and
compare a subset of the outputs with the reference (each fits in a few GB and runs in seconds).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zaya_kernels
from zaya_kernels.reference import attention as ref_att
from zaya_kernels.reference import router as ref_router
from zaya_kernels.triton import attention as tri_att
from zaya_kernels.triton import router as tri_router

from helpers import assert_close
from test_router import check_choice, make_router_args

REPO = Path(__file__).resolve().parent.parent
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535
GPU = "cuda"


# ---------------------------------------------------------------- prefill attention: sequences on grid axis 1
class _GridRecorder:
    """Stands in for a Triton kernel: records (grid, first sequence of the launch) instead of launching."""

    def __init__(self, cu_seqlens):
        self.cu_seqlens, self.launches = cu_seqlens, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cu = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int32
                  and a.untyped_storage().data_ptr() == self.cu_seqlens.untyped_storage().data_ptr()]
            assert len(cu) == 1, "the launch must pass (a slice of) cu_seqlens"
            self.launches.append((tuple(grid), (cu[0].data_ptr() - self.cu_seqlens.data_ptr()) // 4))
        return launch


def _check_launches(launches, batch, what):
    for grid, _ in launches:
        assert grid[0] <= GRID_X_MAX and max(grid[1:]) <= GRID_YZ_MAX, f"{what}: grid {grid} past the CUDA limits"
    # the launches cover every sequence once, in order
    first = 0
    for grid, start in launches:
        assert start == first, f"{what}: a launch starts at sequence {start}, expected {first}"
        first += grid[1]
    assert first == batch, f"{what}: the launches cover {first} of {batch} sequences"


def test_prefill_grid_axes_stay_within_cuda_limits_at_131k_sequences(monkeypatch):
    """131080 one-token sequences (three launches' worth): every prefill launch (forward, dq, dk/dv) keeps its
    sequence axis <= 65535 and the launches cover each sequence once. Before: one grid (1, 131080, 1), which CUDA
    and HIP reject at launch."""
    batch = 2 * 65535 + 10
    q = torch.zeros(batch, 2, 16)
    k = torch.zeros(batch, 1, 16)
    cu = torch.arange(batch + 1, dtype=torch.int32)
    recorders = {name: _GridRecorder(cu) for name in ("attention_fwd_kernel", "attention_bwd_dq_kernel",
                                                       "attention_bwd_dkdv_kernel")}
    for name, rec in recorders.items():
        monkeypatch.setattr(tri_att, name, rec)
    out, lse = tri_att.attention_fwd(q, k, k, cu, 1, 0.25, True, -1)
    tri_att.attention_bwd(q, q, k, k, out, lse, cu, 1, 0.25, True, -1)
    for name, rec in recorders.items():
        assert len(rec.launches) >= 3, name
        _check_launches(rec.launches, batch, name)


def test_prefill_split_into_several_launches_matches_reference(monkeypatch):
    """The chunked launch is exact: with at most 2 sequences per launch, forward and backward of 5 varlen sequences
    (group of 2, a sliding window too) match the fp64 reference."""
    monkeypatch.setattr(tri_att, "MAX_SEQS_PER_LAUNCH", 2)
    gen = torch.Generator().manual_seed(5)
    lens = [3, 1, 6, 2, 4]
    T, hq, hkv, d = sum(lens), 4, 2, 16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(T, h, d, generator=gen) for h in (hq, hkv, hkv))
    grad_out = torch.randn(T, hq, d, generator=gen)
    for window in (-1, 2):
        with zaya_kernels.use_backend("triton"):
            out, lse = torch.ops.zaya.cca_attention(q, k, v, cu, max(lens), None, True, window)
            grads = torch.ops.zaya.cca_attention_backward(grad_out, q, k, v, out, lse, cu, max(lens), None, True,
                                                          window)
        e_out, e_lse = ref_att.cca_attention(q.double(), k.double(), v.double(), cu, max(lens), None, True, window)
        e_grads = ref_att.cca_attention_backward(grad_out.double(), q.double(), k.double(), v.double(), e_out, e_lse,
                                                 cu, max(lens), None, True, window)
        assert_close(out, e_out, dtype=torch.float32, reduction=max(lens), what=f"out window={window}")
        assert_close(lse, e_lse, dtype=torch.float32, reduction=max(lens), what=f"lse window={window}")
        for name, got, exp in zip(("dq", "dk", "dv"), grads, e_grads):
            assert_close(got, exp, dtype=torch.float32, reduction=4 * max(lens), scale=1.0,
                         what=f"{name} window={window}")


def test_prefill_rejects_sequences_past_32_bit_row_offsets(monkeypatch):
    """Row offsets inside a sequence are 32-bit (token * Hq * D): a 2M-token sequence at ZAYA1's 8 x 128 would wrap
    them, so the launchers raise; 2M - 1 tokens still launch (kernels recorded, not run)."""
    q, k = torch.zeros(1, 8, 128), torch.zeros(1, 2, 128)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    for name in ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel"):
        monkeypatch.setattr(tri_att, name, _GridRecorder(cu))
    out, lse = tri_att.attention_fwd(q, k, k, cu, 2**21 - 1, 0.1, True, -1)
    tri_att.attention_bwd(q, q, k, k, out, lse, cu, 2**21 - 1, 0.1, True, -1)
    with pytest.raises(ValueError, match="32-bit offsets"):
        tri_att.attention_fwd(q, k, k, cu, 2**21, 0.1, True, -1)
    with pytest.raises(ValueError, match="32-bit offsets"):
        tri_att.attention_bwd(q, q, k, k, out, lse, cu, 2**21, 0.1, True, -1)


@pytest.mark.gpu
def test_prefill_with_70k_sequences_on_gpu():
    """70000 one-token sequences at ZAYA1's heads (bf16): forward and backward launch (two chunks each) and match the
    reference on the first and last sequences of each chunk."""
    batch, hq, hkv, d = 70000, 8, 2, 128
    gen = torch.Generator(device=GPU).manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, h, d, generator=gen, device=GPU, dtype=torch.bfloat16)
                         for h in (hq, hkv, hkv, hq))
    cu = torch.arange(batch + 1, dtype=torch.int32, device=GPU)
    with zaya_kernels.use_backend("triton"):
        out, lse = torch.ops.zaya.cca_attention(q, k, v, cu, 1, None, True, -1)
        dq, dk, dv = torch.ops.zaya.cca_attention_backward(grad_out, q, k, v, out, lse, cu, 1, None, True, -1)
    torch.cuda.synchronize()
    rows = torch.tensor([0, 1, 65531, 65532, 65533, batch - 1], device=GPU)
    one = torch.tensor([0, 1], dtype=torch.int32, device=GPU)
    for t in rows.tolist():
        sl = slice(t, t + 1)
        e_out, e_lse = ref_att.cca_attention(q[sl].double(), k[sl].double(), v[sl].double(), one, 1)
        e_dq, e_dk, e_dv = ref_att.cca_attention_backward(grad_out[sl].double(), q[sl].double(), k[sl].double(),
                                                          v[sl].double(), e_out, e_lse, one, 1)
        assert_close(out[sl], e_out, dtype=torch.bfloat16, what=f"out of token {t}")
        assert_close(lse[:, sl], e_lse, dtype=torch.float32, reduction=d, scale=1.0, what=f"lse of token {t}")
        assert_close(dv[sl], e_dv, dtype=torch.bfloat16, reduction=4, what=f"dv of token {t}")
        # one key: dq = dk = 0 up to the fp32 rounding of dO.v - delta (~1e-5)
        assert_close(dq[sl], e_dq, dtype=torch.bfloat16, reduction=d, scale=1.0, what=f"dq of token {t}")
        assert_close(dk[sl], e_dk, dtype=torch.bfloat16, reduction=d, scale=1.0, what=f"dk of token {t}")


# ---------------------------------------------------------------- decode attention: caches past 2^31 elements
def _decode_reference_rows(q, k_cache, v_cache, seq_lens, block_table, rows):
    """fp64 reference output of the decode rows `rows`, from small contiguous copies of just their cache positions
    (the reference never touches the rest of a huge cache)."""
    out = []
    for b in rows:
        n = int(seq_lens[b])
        if block_table is None:
            k, v = k_cache[b, :n], v_cache[b, :n]
        else:
            bs = k_cache.shape[1]
            blocks = block_table[b, : -(-n // bs)].long()
            k, v = (c[blocks].flatten(0, 1)[:n] for c in (k_cache, v_cache))
        lens = torch.tensor([n], dtype=torch.int32, device=q.device)
        out.append(ref_att.cca_attention_decode(q[b:b + 1].double(), k[None].double(), v[None].double(), lens)[0])
    return torch.stack(out)


def test_paged_decode_reads_blocks_past_2_32_elements_in_the_interpreter(tmp_path):
    """A paged fp16 cache of 2^32 + 16384 elements (8 GiB mapped from a sparse file: no memory is committed and only
    the three used blocks are ever written, so any machine runs it): block ids whose element offset
    block * block_stride is past 2^32 must be read there. A 32-bit product wraps (numpy in the interpreter as on a
    GPU): block 2^20 + 3 would read block 3, which holds other keys."""
    d, hkv, hq, bs = 16, 1, 4, 256
    num_blocks = 2**32 // (bs * hkv * d) + 4
    cache = torch.from_file(str(tmp_path / "paged_cache.bin"), shared=True, size=num_blocks * bs * hkv * d,
                            dtype=torch.float16).view(num_blocks, bs, hkv, d)
    gen = torch.Generator().manual_seed(3)
    high, low = num_blocks - 1, 3  # element offsets 2^32 + 12288 and 12288: the same block in 32 bits
    for b in (high, low, num_blocks - 3):
        cache[b] = (torch.randn(bs, hkv, d, generator=gen) * 0.5).half()
    seq_lens = torch.tensor([300, 200], dtype=torch.int32)
    block_table = torch.tensor([[high, num_blocks - 3], [low, high]], dtype=torch.int32)
    q = torch.randn(2, hq, d, generator=gen).half()
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, cache, cache, seq_lens, block_table)
    expected = _decode_reference_rows(q, cache, cache, seq_lens, block_table, [0, 1])
    assert_close(out, expected, dtype=torch.float16, reduction=300, what="paged decode past 2^32 elements")


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [True, False])
def test_decode_with_caches_past_2_31_elements_on_gpu(paged):
    """ZAYA1 decode (8 / 2 heads of 128, bf16) on caches of more than 2^31 elements each (4.3 GB paged: block ids
    past 524288 of 16 positions; 5.4 GB contiguous [80, 131072, 2, 128]: sequence 79 starts at element 2.6e9)."""
    hq, hkv, d = 8, 2, 128
    gen = torch.Generator(device=GPU).manual_seed(1)

    def fill(t):
        return t.copy_(torch.randn(t.shape, generator=gen, device=GPU, dtype=torch.float32).to(t.dtype))

    if paged:
        bs = 16
        num_blocks = 2**31 // (bs * hkv * d) + 64
        k_cache = torch.empty(num_blocks, bs, hkv, d, dtype=torch.bfloat16, device=GPU)
        v_cache = torch.empty_like(k_cache)
        batch, max_blocks = 4, 24
        block_table = torch.randint(num_blocks - 200, num_blocks, (batch, max_blocks), generator=gen, device=GPU,
                                    dtype=torch.int32)
        block_table[1] = torch.arange(max_blocks, device=GPU, dtype=torch.int32)  # low blocks next to high ones
        used = block_table.flatten().long().unique()
        for cache in (k_cache, v_cache):
            cache[used] = torch.randn(used.numel(), bs, hkv, d, generator=gen, device=GPU).to(torch.bfloat16)
        seq_lens = torch.tensor([300, 384, 17, 1], dtype=torch.int32, device=GPU)
    else:
        batch, capacity = 80, 131072
        k_cache = torch.empty(batch, capacity, hkv, d, dtype=torch.bfloat16, device=GPU)
        v_cache = torch.empty_like(k_cache)
        seq_lens = torch.ones(batch, dtype=torch.int32, device=GPU)
        seq_lens[0], seq_lens[-1], seq_lens[-2] = 300, 1000, 4096
        block_table = None
        for cache in (k_cache, v_cache):
            fill(cache[:, 0])
            for b in (0, batch - 2, batch - 1):
                fill(cache[b, :int(seq_lens[b])])
    q = torch.randn(batch, hq, d, generator=gen, device=GPU).to(torch.bfloat16)
    with zaya_kernels.use_backend("triton"):
        out = torch.ops.zaya.cca_attention_decode(q, k_cache, v_cache, seq_lens, block_table)
    rows = list(range(batch)) if paged else [0, 1, batch - 2, batch - 1]
    expected = _decode_reference_rows(q, k_cache, v_cache, seq_lens, block_table, rows)
    assert_close(out[rows], expected, dtype=torch.bfloat16, reduction=4096, what=f"decode paged={paged}")


def test_decode_rejects_query_tiles_past_shared_memory():
    """256 speculative tokens x 4 query heads x 128 dims needs 256 KB of LDS for the query tile alone: a launch
    failure on a GPU, so the launcher raises. ZAYA1's decode tile (4 tokens x 4 heads) stays far below."""
    q = torch.zeros(1, 256, 4, 128)
    cache = torch.zeros(1, 256, 1, 128)
    seq_lens = torch.tensor([256], dtype=torch.int32)
    with pytest.raises(ValueError, match="query tile"):
        tri_att.attention_decode(q, cache, cache, seq_lens, None, 0.1, -1)


# ---------------------------------------------------------------- router: shared memory of the class tile
def test_router_rejects_class_tiles_past_shared_memory():
    """C = 129 classes at R = 256 (BLOCK_E 256) compiles to 128 KB of LDS on gfx942 (64 KB per workgroup) and 139 KB
    on sm_90 with spills; C = 257 to 256 KB, past every target: the launcher raises instead of a failed launch.
    ZAYA1's C = 17 and the widest accepted tiles (C = 128 at R = 256; C = 64 at R = 512: 64 KB) pass. T = 0: no
    launch."""
    def call(r, c):
        x = torch.zeros(0, 16)
        w = torch.zeros(r)
        tri_router.zaya_router_fwd(
            x, None, None, torch.zeros(r, 16), w, w, torch.zeros(r, r), w, torch.zeros(r, r), w, torch.zeros(c, r),
            torch.zeros(c), 1e-5, torch.zeros(0, dtype=torch.int32), torch.zeros(0), torch.zeros(0, r), None)

    for r, c in ((256, 17), (256, 128), (512, 64)):
        call(r, c)
    for r, c in ((256, 129), (512, 65), (16, 257)):
        with pytest.raises(ValueError, match="router classes"):
            call(r, c)


# ---------------------------------------------------------------- router: split-H decode arrival counters
def _route(args, return_logits=True):
    with zaya_kernels.use_backend("triton"):
        return torch.ops.zaya.zaya_router(*args, return_logits)


def _check_route(result, args, dtype, what):
    index, weight, r, logits = result
    e_index, e_weight, e_r, e_logits = ref_router.zaya_router(*args, True)
    h = args[0].shape[1]
    assert_close(r, e_r, dtype=dtype, reduction=h, what=f"{what} r")
    assert_close(logits, e_logits, dtype=dtype, reduction=h, scale=1.0, what=f"{what} logits")
    check_choice(index, weight, torch.softmax(e_logits, -1), args[11], what=what, dtype=dtype, tie_tol=1e-2)


def test_router_split_decode_counters_are_per_stream(monkeypatch):
    """A split decode launch on one stream while another stream's launch is in flight (its counters mid-count: here
    poisoned to 1) must count in its own buffer. Before: one buffer per device, so this launch's arrivals started
    at 1, the second-to-last program summed the partials with one missing, and r / logits came out wrong."""
    monkeypatch.setattr(tri_router, "SPLIT_CHUNK_H", 16)  # split decode at this small H
    monkeypatch.setattr(tri_router, "_COUNTERS", {})
    stream = ["A"]
    monkeypatch.setattr(tri_router, "_stream_key", lambda device: (device, stream[0]))
    warm = make_router_args(3, 64, 16, 5, prev=True, seed=1)
    _check_route(_route(warm), warm, torch.float32, "stream A")
    in_flight = list(tri_router._COUNTERS.values())
    for buf in in_flight:
        buf.fill_(1)  # stream A's launch has had one arrival
    stream[0] = "B"
    args = make_router_args(3, 64, 16, 5, prev=True, seed=2)  # other inputs: a stale partial would show
    _check_route(_route(args), args, torch.float32, "stream B")
    assert all(int(buf.abs().max()) == 1 for buf in in_flight), "stream B's launch touched stream A's counters"


_ISA_DRIVER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_zaya_aot_report", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
tool._ensure_package_importable()
import triton
from triton.compiler import ASTSource
from zaya_kernels.triton import router
config = next(c for c in router._aot_configs() if c.constexprs["SPLIT_H"] > 1)
src = ASTSource(fn=tool._jit_function(router.zaya_router_fwd_kernel), signature=dict(config.signature),
                constexprs=dict(config.constexprs))
compiled = triton.compile(src, target=tool._gpu_target("gfx942"),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
sys.stdout.write(compiled.asm["amdgcn"])
"""


def _stores_complete_before_arrival(asm: str) -> bool:
    """In gfx942 assembly of the split decode: between the last global / buffer store before the arrival and the
    s_barrier in front of it, every wave waits for its stores (s_waitcnt vmcnt(0)). The arrival is the
    acquire-release atomic: buffer_wbl2 (release) just before it and buffer_inv (acquire) just after; the partials'
    release atomics have no buffer_inv after them (Triton 3.9) or no buffer_wbl2 before them (Triton 3.6)."""
    lines = [line.strip() for line in asm.splitlines()]

    def near(i, prefix, before, after):
        return any(lines[j].startswith(prefix) for j in range(max(0, i - before), min(len(lines), i + after + 1)))

    arrival = next(i for i, line in enumerate(lines)
                   if "_atomic_add" in line and near(i, "buffer_wbl2", 2, 0) and near(i, "buffer_inv", 0, 3))
    barrier = max(i for i in range(arrival) if lines[i] == "s_barrier")
    last_store = max(i for i in range(barrier) if re.match(r"\s*(buffer|global)_store", lines[i]))
    return any("s_waitcnt vmcnt(0)" in line for line in lines[last_store:barrier])


def test_router_split_decode_partials_complete_before_the_arrival_on_gfx942():
    """The last program to arrive sums every program's partial, so each program's partial stores must be complete
    before its arrival atomic. gfx942's s_barrier does not wait for memory and the atomic's release waits only for its
    own wave: compile the shipped split config for gfx942 (no GPU needed) and check each wave waits for its stores
    before the barrier. Before: stores, s_barrier, then the atomic of one wave: the other waves' stores in flight."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    tool = REPO / "zaya_kernels" / "tools" / "aot_report.py"
    done = subprocess.run([sys.executable, "-c", _ISA_DRIVER, str(tool)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _stores_complete_before_arrival(done.stdout), "a wave can arrive before its partial stores complete"


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64])
def test_router_split_decode_under_repeated_launches_on_gpu(monkeypatch, t):
    """ZAYA1's router (H 2048, R 256, 17 classes, bf16) in split decode, 30 launches with fresh inputs each (a
    partial read before its stores land would be the previous launch's): every result matches the reference."""
    monkeypatch.setattr(tri_router, "_COUNTERS", {})  # fresh counters, whatever ran before
    for seed in range(30):
        args = make_router_args(t, 2048, 256, 17, prev=True, dtype=torch.bfloat16, seed=seed, device=GPU)
        _check_route(_route(args), args, torch.bfloat16, f"seed {seed}")


@pytest.mark.gpu
def test_router_split_decode_on_two_streams_on_gpu(monkeypatch):
    """A launch on a second stream while the first stream's counters are mid-count (poisoned to 1, as an in-flight
    launch leaves them) is correct; before, both streams counted in one per-device buffer."""
    monkeypatch.setattr(tri_router, "_COUNTERS", {})
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    warm = make_router_args(4, 2048, 256, 17, prev=True, dtype=torch.bfloat16, seed=3, device=GPU)
    args = make_router_args(4, 2048, 256, 17, prev=True, dtype=torch.bfloat16, seed=4, device=GPU)
    first.wait_stream(torch.cuda.current_stream())  # the inputs are ready
    second.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(first):
        _route(warm)
    torch.cuda.synchronize()
    for buf in tri_router._COUNTERS.values():
        buf.fill_(1)
    torch.cuda.synchronize()
    with torch.cuda.stream(second):
        result = _route(args)
    torch.cuda.synchronize()
    _check_route(result, args, torch.bfloat16, "second stream")


@pytest.mark.gpu
def test_router_split_decode_in_a_cuda_graph_on_gpu(monkeypatch):
    """A split decode launch captured into a CUDA graph owns its counters: a replay is right even when every cached
    (eager) counter buffer is mid-count, and an eager launch after the capture is right too (before: the capture
    used the per-device buffer, shared with eager launches and with every other graph)."""
    monkeypatch.setattr(tri_router, "_COUNTERS", {})
    args = make_router_args(2, 2048, 256, 17, prev=True, dtype=torch.bfloat16, seed=5, device=GPU)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _route(args)  # warm-up (Triton compile) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _route(args)
    torch.cuda.synchronize()
    for buf in tri_router._COUNTERS.values():
        buf.fill_(1)
    graph.replay()
    torch.cuda.synchronize()
    _check_route(captured, args, torch.bfloat16, "graph replay")
    for buf in tri_router._COUNTERS.values():
        buf.zero_()
    eager = make_router_args(2, 2048, 256, 17, prev=True, dtype=torch.bfloat16, seed=6, device=GPU)
    _check_route(_route(eager), eager, torch.bfloat16, "eager after capture")
