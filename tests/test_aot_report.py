"""Tests for `python -m zaya_kernels aot-report` (zaya_kernels/tools/aot_report.py).

Everything that compiles runs in a child process with TRITON_INTERPRET removed: the test session may set
TRITON_INTERPRET=1 (tests/conftest.py), and kernels defined under it are interpreter functions that cannot be compiled.
The launch tests at the end record the interpreter's launches at ZAYA1's sizes in this process (compiling nothing
there); one of them then compiles those launches in a child process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

import zaya_kernels
from helpers import recorded_launches

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "zaya_kernels" / "tools" / "aot_report.py"
TARGETS = ("gfx942", "gfx950", "sm_90")
# LDS per workgroup on MI300X / MI355X and shared memory per block on H100/H200 (shared/PEERS.md)
LDS_LIMIT_BYTES = {"gfx942": 64 * 1024, "gfx950": 160 * 1024, "sm_90": 227 * 1024}

# Loads the tool by file path, like its own TRITON_INTERPRET re-run, so the package __init__ is not required.
_LOAD_TOOL = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_zaya_aot_report", {str(TOOL)!r})
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
"""

FIXTURE_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def vec_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def small_dot(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def one_dot(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))
'''

DRIVER = _LOAD_TOOL + """
tool._ensure_package_importable()
from zaya_kernels.triton._aot import AotConfig
sys.path.insert(0, sys.argv[1])
import aot_fixture_kernels as k

add_cfg = AotConfig("BLOCK=1024", {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                                   "BLOCK": "constexpr"}, {"BLOCK": 1024}, num_warps=4)
dot_sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
dot_cfg = AotConfig("64x64x32", dot_sig, {"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=2,
                    matrix_expected=True)
# One product and no loop: matrix instructions, but none in a loop, which a GEMM-like kernel must have.
one_cfg = AotConfig("64x64x32", {k: v for k, v in dot_sig.items() if k != "K"}, {"BM": 64, "BN": 64, "BK": 32},
                    num_warps=4, matrix_expected=True)
# A signature that names only one of the arguments cannot compile: the record must say so, not raise.
bad_cfg = AotConfig("bad-signature", {"a_ptr": "*fp16"}, {}, matrix_expected=True)
records = []
for target in %r:
    records.append(tool.compile_record("vec_add", k.vec_add, add_cfg, target))
    records.append(tool.compile_record("small_dot", k.small_dot, dot_cfg, target))
    records.append(tool.compile_record("small_dot", k.small_dot, bad_cfg, target))
    records.append(tool.compile_record("one_dot", k.one_dot, one_cfg, target))
print(json.dumps(records))
""" % (TARGETS,)


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _run(args, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_clean_env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def _registry() -> dict:
    """{kernel name: [config labels]} as the report sees it, after importing every zaya_kernels.triton module."""
    code = _LOAD_TOOL + """
registry, failures = tool.load_registry()
print(json.dumps({"kernels": {n: [c.label for c in e.configs] for n, e in registry.items()},
                  "failures": failures}))
"""
    proc = _run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["failures"], "kernel modules failed to import:\n" + "\n".join(e for _, e in out["failures"])
    return out["kernels"]


def test_compile_record_fixture_kernels(tmp_path):
    from zaya_kernels.tools.aot_report import record_problem

    (tmp_path / "aot_fixture_kernels.py").write_text(textwrap.dedent(FIXTURE_KERNELS))
    proc = _run([sys.executable, "-c", DRIVER, str(tmp_path)], timeout=180)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(records) == 4 * len(TARGETS)

    by_key = {(r["kernel"], r["config"], r["target"]): r for r in records}
    for target in TARGETS:
        for name, label in (("vec_add", "BLOCK=1024"), ("small_dot", "64x64x32")):
            rec = by_key[(name, label, target)]
            assert rec["ok"], rec["error"]
            assert rec["error"] is None
            assert rec["spills"] == 0, rec
            assert rec["vgpr"] > 0, rec
            assert rec["num_warps"] == 4
            assert rec["lds_bytes"] is not None and rec["lds_bytes"] >= 0
            if target == "sm_90":
                assert rec["sgpr"] is None and rec["occupancy"] is None
            else:
                assert rec["sgpr"] > 0 and rec["occupancy"] > 0, rec
        assert by_key[("vec_add", "BLOCK=1024", target)]["matrix_instructions"] == 0
        dot = by_key[("small_dot", "64x64x32", target)]
        assert dot["matrix_expected"] is True
        assert dot["matrix_instructions"] > 0, dot  # v_mfma on gfx942/gfx950, wgmma (or mma) on sm_90
        assert 0 < dot["matrix_in_loops"] <= dot["matrix_instructions"], dot  # in the K loop
        assert dot["lds_bytes"] > 0, dot  # the operands are staged through shared memory / LDS

        one = by_key[("one_dot", "64x64x32", target)]
        assert one["ok"] and one["matrix_instructions"] > 0 and one["matrix_in_loops"] == 0, one
        assert record_problem(one) == "NO-MMA" and record_problem(dot) is None

        bad = by_key[("small_dot", "bad-signature", target)]
        assert bad["ok"] is False and bad["error"], bad
        assert bad["vgpr"] is None and bad["spills"] is None


@pytest.mark.slow
def test_cli_json_covers_every_registered_config():
    registry = _registry()
    assert registry, "no Triton kernel registered an AOT configuration (register_aot in zaya_kernels/triton/*.py)"

    proc = _run([sys.executable, "-m", "zaya_kernels.tools.aot_report", "--json"], timeout=1500)
    records = json.loads(proc.stdout)
    problems = [r for r in records if not r["ok"] or r["spills"] != 0
                or r["lds_bytes"] > LDS_LIMIT_BYTES[r["target"]]
                or (r["matrix_expected"] and not r["matrix_in_loops"])]
    assert not problems, json.dumps(problems, indent=1)
    assert proc.returncode == 0, proc.stderr

    seen = Counter((r["kernel"], r["config"], r["target"]) for r in records)
    for name, labels in registry.items():
        for target in TARGETS:
            assert any(k[0] == name and k[2] == target for k in seen), (name, target)
        for label, count in Counter(labels).items():
            for target in TARGETS:
                assert seen[(name, label, target)] >= count, (name, label, target)


def test_cli_reruns_itself_outside_the_interpreter():
    """With TRITON_INTERPRET=1 the CLI must still compile (it re-runs itself without the variable)."""
    registry = _registry()
    name = min(registry, key=lambda n: len(registry[n]))  # the kernel with the fewest configs keeps this quick
    proc = _run([sys.executable, "-m", "zaya_kernels.tools.aot_report", "--json", "--arch", "gfx942",
                 "--kernel", name], TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    records = json.loads(proc.stdout)
    assert records and all(r["ok"] and r["target"] == "gfx942" for r in records)
    assert {r["kernel"] for r in records} >= {name}


def test_table_output_and_bad_arch():
    proc = _run([sys.executable, "-m", "zaya_kernels.tools.aot_report", "--kernel", "__no_such_kernel__"],
                timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no registered kernel configurations" in proc.stdout

    proc = _run([sys.executable, "-m", "zaya_kernels.tools.aot_report", "--arch", "gfx90a"], timeout=120)
    assert proc.returncode == 2 and "unknown --arch" in proc.stderr
    proc = _run([sys.executable, "-m", "zaya_kernels.tools.aot_report", "--launches", "launches.json", "--divisible",
                 "all"], timeout=120)
    assert proc.returncode == 2 and "no --kernel or --divisible" in proc.stderr


def test_divisible_variants_hint_pointers_then_integers():
    """--divisible compiles what Triton's launcher builds for 16-divisible arguments: "pointers" puts tt.divisibility
    16 on each pointer argument (and nothing else), "all" on the integers too (never on floats or constexprs)."""
    code = _LOAD_TOOL + """
from zaya_kernels.triton._aot import AotConfig
cfg = AotConfig("x", {"x_ptr": "*bf16", "n": "i32", "y_ptr": "*fp32", "eps": "fp32", "m": "i64", "B": "constexpr"},
                {"B": 16})
print(json.dumps({d: sorted(k[0] for k in tool._divisibility_hints(cfg, d)) for d in ("pointers", "all")}))
"""
    proc = _run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"pointers": [0, 2], "all": [0, 1, 2, 4]}


# ---------------------------------------------------------------- the registry covers what the launchers launch
def _launch_every_op_at_zaya_sizes():
    """Every Triton launch path of the ops at ZAYA1-8B's sizes (H = I = 2048, R 256, 16 experts, n_q 8, n_kv 2,
    D 128, k0 = k1 = 2, bf16): norms, router (decode and prefill), MoE (the three dispatch tile sizes, both skip
    modes, the by-token GEMVs, the backward, the row permutations), CCA preparation (prefill with and without
    states, into a paged cache, decode with fp32 and bf16 states, backward) and attention (prefill with and without
    a window, its backward, decode in 1, 2, 8 and 64 splits with their reduce, over contiguous, paged and left-padded
    caches, with 4 speculative tokens). Meant to run with launches
    recorded, not run: whatever a kernel would have written is never read by another launch, the inputs of each
    op are made here (the dispatch by the reference)."""
    z = torch.ops.zaya
    gen = torch.Generator().manual_seed(0)
    H, R, E, I, D, nq, nkv, k0, k1, T = 2048, 256, 16, 2048, 128, 8, 2, 2, 2, 80
    C, value_dim = (nq + nkv) * D, nkv * D // 2

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(dtype)

    x, residual = randn(T, H), randn(T, H, dtype=torch.float32)
    scales = [randn(H) for _ in range(5)]
    new_residual, normed = z.residual_scale_rmsnorm(x, residual, *scales, 1e-5)
    z.residual_scale_rmsnorm(x, None, scales[0], scales[1], None, None, scales[4], 1e-5)
    z.residual_scale_rmsnorm_backward(normed, new_residual, x, residual, *(s.float() for s in scales), new_residual,
                                      1e-5)
    z.rmsnorm(residual, scales[4], 1e-5, torch.bfloat16)
    z.rmsnorm_backward(normed, residual, scales[4].float(), 1e-5)

    router = (randn(R, H), randn(R), randn(R), randn(R, R), randn(R), randn(R, R), randn(R), randn(E + 1, R))
    for tokens in (1, 8, T):  # split decode, and the prefill kernel past 64 tokens
        z.zaya_router(x[:tokens], None, None, *router, torch.zeros(E + 1), 1e-5, True)
        z.zaya_router(x[:tokens], randn(tokens, R), randn(R), *router, torch.zeros(E + 1), 1e-5, False)

    index = torch.randint(0, E + 1, (T,), generator=gen, dtype=torch.int32)
    weight = torch.rand(T, generator=gen)
    gate_up, down = randn(E, 2 * I, H), randn(E, H, I)
    for skip_mode in (0, 1):
        for tokens in (1, 4):
            z.moe_experts_by_token(x[:tokens], gate_up, down, index[:tokens], weight[:tokens], skip_mode)
    for block_m in (16, 64, 128):
        z.moe_dispatch(index, E, block_m)
        with zaya_kernels.use_backend("reference"):
            _, offsets, sorted_ids, _, tile_expert, tile_start = z.moe_dispatch(index, E, block_m)
        for skip_mode in (0, 1):
            args = (weight, sorted_ids, offsets, tile_expert, tile_start, block_m, skip_mode)
            z.moe_experts(x, gate_up, down, *args)
            z.moe_experts_backward(x, x, gate_up, down, *args)
    z.moe_dispatch(torch.randint(0, E + 1, (5000,), generator=gen, dtype=torch.int32), E, 128)  # chunked: > 4096
    rows = z.moe_permute_rows(x, sorted_ids, T)
    for skip_mode in (0, 1):
        z.moe_unpermute_rows(rows, sorted_ids, x, weight, skip_mode)
        z.moe_unpermute_rows_backward(x, sorted_ids, x, weight, T, skip_mode)

    qk, v_current, v_delayed = randn(T, C), randn(T, value_dim), randn(T, value_dim)
    conv = (randn(C, k0), randn(C), randn(C, D, k1), randn(C), randn(nkv))
    positions, cu_seqlens = torch.arange(T), torch.tensor([0, 30, T], dtype=torch.int32)
    heads = (nq, nkv, D // 2, 1e4)
    states = (torch.zeros(2, C, k0 + k1 - 2), torch.zeros(2, value_dim), torch.ones(2, dtype=torch.int32))
    q, k, v, conv_state, value_state = z.cca_prepare(qk, v_current, v_delayed, *conv, positions, cu_seqlens, *heads)
    z.cca_prepare(qk, v_current, v_delayed, *conv, positions, cu_seqlens, *heads, *states)
    z.cca_prepare_backward(q, k, v, conv_state, value_state, qk, v_current, v_delayed, *conv, positions, cu_seqlens,
                           *heads)
    z.cca_prepare_backward(q, k, v, conv_state, value_state, qk, v_current, v_delayed, *conv, positions, cu_seqlens,
                           *heads, *states)
    k_cache, v_cache = randn(8, 16, nkv, D), randn(8, 16, nkv, D)
    z.cca_prepare_paged(qk, v_current, v_delayed, *conv, positions, cu_seqlens, *heads, torch.arange(T),
                        k_cache, v_cache, *states)
    for state_dtype in (torch.float32, torch.bfloat16):
        z.cca_prepare_decode(qk[:2], v_current[:2], v_delayed[:2], *conv, positions[:2],
                             states[0].to(state_dtype), states[1].to(state_dtype), torch.arange(2, dtype=torch.int32),
                             *heads)

    q, k, v = randn(T, nq, D), randn(T, nkv, D), randn(T, nkv, D)
    for window in (-1, 16):
        out, lse = z.cca_attention(q, k, v, cu_seqlens, 50, None, True, window)
        z.cca_attention_backward(out, q, k, v, out, lse, cu_seqlens, 50, None, True, window)
    seq_lens = torch.tensor([5, 100], dtype=torch.int32)
    for capacity in (128, 512, 2048, 16384):  # one split (written in place), then 2, 8 and 64 with their reduce
        contiguous = (torch.zeros(2, capacity, nkv, D, dtype=torch.bfloat16),) * 2
        z.cca_attention_decode(randn(2, nq, D), *contiguous, seq_lens)
    z.cca_attention_decode(randn(2, nq, D), *contiguous, seq_lens, None, None, -1, None,
                           torch.tensor([2, 0], dtype=torch.int32))
    z.cca_attention_decode(randn(2, 4, nq, D), *contiguous, seq_lens)  # 4 speculative tokens
    block_table = (torch.arange(16, dtype=torch.int32) % 8).reshape(2, 8)
    z.cca_attention_decode(randn(2, nq, D), k_cache, v_cache, seq_lens, block_table)


COMPUTE_UNITS = {"gfx942": 304, "gfx950": 256, "sm_90": 132}


def _zaya_launches(target, monkeypatch) -> list:
    """[(kernel, {argument name: value})]: every Triton launch of _launch_every_op_at_zaya_sizes with `target`'s launch
    tables (and its decode split counts), recorded on CPU tensors, not run."""
    from zaya_kernels.triton import _target, attention

    monkeypatch.setitem(_target._TARGETS, torch.device("cpu"), target)  # CPU tensors take `target`'s tables
    # decode split counts as on the GPU: two programs per CU / SM of an MI300X, MI355X or H200
    monkeypatch.setattr(attention, "_target_programs", lambda device: 2 * COMPUTE_UNITS[target])
    with recorded_launches() as launches, zaya_kernels.use_backend("triton"), torch.no_grad():
        _launch_every_op_at_zaya_sizes()
    return launches


@pytest.mark.parametrize("target", TARGETS)
def test_every_launch_at_zaya_sizes_is_a_registered_configuration(target, monkeypatch):
    """The report compiles what runs: each Triton launch the ops make at ZAYA1-8B's sizes with `target`'s launch
    tables is a registered configuration of its kernel, with the same constexprs, num_warps and num_stages (a
    launcher that left num_stages to Triton would get its backend's default, 2 on AMD or 3 on NVIDIA: another
    compile). The launches are recorded on CPU tensors, not run."""
    from zaya_kernels.tools import aot_report

    registry, failures = aot_report.load_registry()
    assert not failures
    configs_of = {}
    for name, entry in registry.items():
        configs_of.setdefault(id(entry.kernel), []).extend(entry.configs)
    launches = _zaya_launches(target, monkeypatch)

    unregistered = set()
    for kernel, args in launches:
        options = (args.get("num_warps"), args.get("num_stages"))
        configs = configs_of.get(id(kernel), [])
        if not any(aot_report.launch_matches(config, args) for config in configs):
            names = configs[0].constexprs if configs else {}
            unregistered.add((kernel.__name__, options, str({key: args.get(key) for key in names})))
    launched = {kernel.__name__ for kernel, _ in launches}
    every_kernel = {entry.kernel.__name__ for entry in registry.values()}
    assert launched == every_kernel, f"registered, never launched here: {sorted(every_kernel - launched)}"
    assert not unregistered, sorted(unregistered)


STREAMING_KERNELS = ("moe_gate_up_by_token", "moe_down_by_token", "attention_decode", "cca_prepare_decode",
                     "router_fwd", "moe_bwd_act", "moe_bwd_dx", "moe_wgrad")


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_launches_at_zaya_sizes_compile_specialised_without_spills(target, monkeypatch, tmp_path):
    """The variants that run: each launch at ZAYA1-8B's sizes with `target`'s tables, compiled for `target` the way
    Triton's JIT specialises it there (pointers and sizes divisible by 16, T = 1 as a constant), has no spill, no
    failed compile, LDS within the target's limit, and matrix instructions where the config expects them (the
    registry's unspecialised compile never sees these variants; their vector loads change register use). That
    they sit in the K loops is checked on the registered configs: a specialisation may fold a constant-trip loop.
    The streaming kernels load 16 bytes at a time."""
    from zaya_kernels.tools import aot_report

    launches = _zaya_launches(target, monkeypatch)
    path = tmp_path / "launches.json"
    path.write_text(json.dumps([aot_report.describe_launch(kernel, args) for kernel, args in launches]))
    proc = _run([sys.executable, "-m", "zaya_kernels.tools.aot_report", "--launches", str(path), "--arch", target,
                 "--json"], timeout=900)
    records = json.loads(proc.stdout)
    problems = [r for r in records if aot_report.record_is_bad(r, loops=False)]  # loops: the registry's check
    assert not problems, json.dumps(problems, indent=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["target"] for r in records} == {target}
    assert {r["kernel"] for r in records} == set(aot_report.load_registry()[0])  # every kernel, by registry name
    # the specialisations were applied: ZAYA1's sizes as multiples of 16, the router's decode T = 1 as a constant
    assert all("| 16:" in r["config"] for r in records if r["kernel"] == "moe_gate_up")
    assert any("=1:T" in r["config"] for r in records if r["kernel"] == "router_fwd")
    # the bandwidth-bound decode kernels and the MoE backward GEMMs (whose column-contiguous operands once lost
    # their vector loads to clamped indices) move their big operands with 16-byte loads (global_load_dwordx4 /
    # ld.global.v4 / 16-byte cp.async): a change that falls back to 2- or 4-byte loads multiplies their loads
    narrow = [(r["kernel"], r["config"]) for r in records if r["kernel"] in STREAMING_KERNELS and not r["vector_loads"]]
    assert not narrow, narrow
