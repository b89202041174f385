"""Tests for `python -m zaya_kernels tune` (zaya_kernels/tools/tune.py).

On CPU the tuner runs the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on the "interpreter" table:
timings mean nothing there, so these tests check the mechanism (what is compiled-checked, validated, picked and
written) with tiny shapes, a fake timer and a private copy of the table; the repository's JSON files are never written.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import zaya_kernels
from helpers import assert_close
from zaya_kernels.reference import moe as ref_moe
from zaya_kernels.tools import tune

TINY_MOE = ["--hidden", "32", "--intermediate", "32", "--experts", "4"]
# The mechanism tests tune the "interpreter" table, which only a machine without a GPU uses.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(),
                                      reason="tunes the CPU interpreter's table; a GPU machine tunes its own target")
OTHER_TARGETS = ("gfx942", "gfx950", "sm_90")


@pytest.fixture(autouse=True)
def shipped_tables_afterwards():
    """After each test, once monkeypatch has put CONFIG_PATH back (this fixture is set up first, so torn down
    last), the launchers read the shipped tables again."""
    from zaya_kernels.triton import attention, moe

    shipped = (attention.CONFIG_PATH, moe.CONFIG_PATH)
    yield
    assert (attention.CONFIG_PATH, moe.CONFIG_PATH) == shipped
    attention.load_config_table.reload()
    moe.load_config_table.reload()


@pytest.fixture
def tri():
    from zaya_kernels.triton import moe

    return moe


@pytest.fixture
def moe_table(tri, tmp_path, monkeypatch):
    """A private copy of moe.json as the launchers' table file."""
    path = tmp_path / "moe.json"
    shutil.copy(tri.CONFIG_PATH, path)
    monkeypatch.setattr(tri, "CONFIG_PATH", path)
    tri.load_config_table.reload()
    yield path


def _use_table(monkeypatch, module, path):
    monkeypatch.setattr(module, "CONFIG_PATH", path)
    module.load_config_table.reload()


def _other_targets_unchanged(before: str, after: str, targets=OTHER_TARGETS):
    for target in targets:
        old, new = tune.value_span(before, ["targets", target]), tune.value_span(after, ["targets", target])
        assert before[old[0]:old[1]] == after[new[0]:new[1]], target
    doc = tune.value_span(before, ["_doc"])
    assert after.startswith(before[:doc[1]])  # the header and _doc too


class CorruptGateUp:
    """Wraps moe_gate_up_kernel: a launch with BLOCK_N == 16 gives a wrong activation (the injected bad candidate)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.corrupted = 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            launch(*args, **kwargs)
            if kwargs["BLOCK_N"] == 16:
                args[2].add_(1.0)  # act_ptr
                self.corrupted += 1

        return run


def fake_timer(fn, info):
    """Deterministic 'times' that make the broken candidates the fastest: the tuner must still never pick them."""
    if "by_token" in info:  # the by-token GEMVs: narrowest fastest
        return 1e-6 * (info["by_token"]["gate_up"]["BLOCK_N"] + info["by_token"]["down"]["BLOCK_N"])
    return 1e-6 * (info["gate_up"]["BLOCK_N"] + info["down"]["BLOCK_N"]) + (0.0 if info["block_m"] == 32 else 5e-6)


def reject_narrow_down(kind, cfg, context):
    return "spills (test hook)" if kind == "down" and cfg["BLOCK_N"] == 16 else None


@interpreter_only
def test_moe_tuner_validates_picks_and_writes_only_its_target(tri, moe_table, tmp_path, monkeypatch):
    before = moe_table.read_text()
    out = tmp_path / "proposed.json"
    corrupt = CorruptGateUp(tri.moe_gate_up_kernel)
    monkeypatch.setattr(tri, "moe_gate_up_kernel", corrupt)
    args = tune.parse_args(["moe", "--tokens", "3,40", *TINY_MOE, "--block-m", "16,32", "--block-n", "16,32",
                            "--block-k", "32", "--out", str(out)])
    logs = []
    result = tune.run(args, timer=fake_timer, compile_check=reject_narrow_down, log=logs.append)
    monkeypatch.setattr(tri, "moe_gate_up_kernel", corrupt.kernel)

    assert result["target"] == "interpreter" and result["paths"] == [out]
    assert moe_table.read_text() == before  # no --write: the table file is untouched
    rejected = dict(result["rejected"])
    assert corrupt.corrupted and any("gate_up[N16" in k and v.startswith("wrong result") for k, v in rejected.items())
    assert any("down[N16" in k and v.startswith("compile") for k, v in rejected.items())

    old = json.loads(before)["targets"]["interpreter"]
    candidates = {"gate_up": [], "down": []}
    for gemm in old["gemm"].values():
        for kind in candidates:
            candidates[kind].append(gemm[kind])
    for n in (16, 32):
        for kind in candidates:
            candidates[kind].append({"BLOCK_N": n, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1})
    entry = result["entry"]
    bucket_rows = [row for row in result["rows"] if not row["bucket"].startswith("by token")]  # T = 3: by token too
    for (_, block_m), row in zip(entry["block_m_by_tokens"], bucket_rows, strict=True):
        chosen = row["chosen"]
        assert block_m == chosen["block_m"] in (16, 32)
        for kind in candidates:
            assert chosen[kind] in candidates[kind]
            assert chosen[kind]["BLOCK_N"] != 16  # the wrong-result and the compile-rejected candidates
            assert entry["gemm"][str(block_m)][kind] == chosen[kind]
        assert chosen["us"]
    # bucket T <= 32 keeps BLOCK_M 16 (BLOCK_M 32 is the other bucket's key, whose entry is broken); the open bucket
    # replaces its broken entry with the fastest valid one
    assert [m for _, m in entry["block_m_by_tokens"]] == [16, 32]
    assert entry["gemm"]["32"]["gate_up"] == {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    assert bucket_rows[1]["previous"]["us"] is None  # the shipped interpreter entry gives a wrong result here

    text = out.read_text()
    _other_targets_unchanged(before, text)
    table = json.loads(text)
    assert table["targets"]["interpreter"] == entry
    record = table["_tuned"]["interpreter"]
    for key in ("date", "gpu", "torch", "triton", "shapes", "results"):
        assert key in record
    assert record["shapes"]["H"] == 32 and set(record["results"]) == {"T<=32", "T<=1073741824", "by token T<=4"}
    assert record["results"]["T<=32"]["previous"]["us"] and record["results"]["T<=32"]["chosen"]["us"]

    # the launchers and the AOT registry read the written file unchanged, and the op still matches the reference
    _use_table(monkeypatch, tri, out)
    assert tri.pick_block_m(3, "interpreter") == 16 and tri.pick_block_m(40, "interpreter") == 32
    assert tri.gemm_config("interpreter", 32, "down") == entry["gemm"]["32"]["down"]
    assert tri._aot_configs()["moe_gate_up"]
    gen = torch.Generator().manual_seed(0)
    x, index = torch.randn(40, 32, generator=gen), torch.randint(0, 5, (40,), generator=gen, dtype=torch.int32)
    gate_up, down = torch.randn(4, 64, 32, generator=gen) / 6, torch.randn(4, 32, 32, generator=gen) / 6
    weight = torch.rand(40, generator=gen)
    with zaya_kernels.use_backend("triton"):
        y = zaya_kernels.ops.moe(x, gate_up, down, index, weight)
    assert zaya_kernels.last_backend("moe_experts") == "triton"
    assert_close(y, ref_moe.moe_per_token(x, gate_up, down, index, weight), reduction=32)


@interpreter_only
def test_moe_tuner_sweeps_the_by_token_gemvs(tri, moe_table, tmp_path, monkeypatch):
    """T <= 4 (moe_experts_by_token): the GEMVs' own entry is swept, gate_up then down; a wrong result (gate_up at
    BLOCK_N 4, made the fastest) and a compile failure (down at BLOCK_N 4) are never picked."""
    corrupt = CorruptLaunch(tri.moe_gate_up_by_token_kernel, 2)  # act_ptr
    monkeypatch.setattr(tri, "moe_gate_up_by_token_kernel", CorruptNarrow(corrupt, tri.moe_gate_up_by_token_kernel))
    args = tune.parse_args(["moe", "--tokens", "1,3", *TINY_MOE, "--block-n", "4,8,16", "--block-k", "16",
                            "--out", str(tmp_path / "out.json")])
    result = tune.run(args, timer=fake_timer, log=lambda *_: None,
                      compile_check=lambda kind, cfg, _: "spills (test hook)" if kind == "down_by_token" and
                      cfg["BLOCK_N"] == 4 else None)
    rejected = dict(result["rejected"])
    assert any(k.startswith("by token gate_up[N4") and v.startswith("wrong result") for k, v in rejected.items())
    assert any("down[N4" in k and v.startswith("compile") for k, v in rejected.items())
    row = result["rows"][0]
    assert row["bucket"] == "by token T<=4" and row["tokens"] == [1, 3] and row["chosen"]["us"]
    want = {"BLOCK_N": 8, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    chosen = {k: row["chosen"][k] for k in ("gate_up", "down")}
    assert result["entry"]["by_token"] == {"gate_up": want, "down": want} == chosen
    assert [r["bucket"] for r in result["rows"]] == ["by token T<=4", "T<=32"]  # then the dispatch path's bucket


class CorruptNarrow:
    """Launches `corrupt` for BLOCK_N == 4 and `kernel` otherwise."""

    def __init__(self, corrupt, kernel):
        self.corrupt, self.kernel = corrupt, kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            return (self.corrupt if kwargs["BLOCK_N"] == 4 else self.kernel)[grid](*args, **kwargs)

        return run


@interpreter_only
def test_moe_write_updates_the_table_in_place_and_keeps_earlier_results(tri, moe_table, capsys):
    before = moe_table.read_text()
    common = [*TINY_MOE, "--block-m", "16", "--block-n", "32", "--block-k", "16,32", "--write"]
    assert tune.main(["moe", "--tokens", "5", *common]) == 0  # the real (CPU) timer
    first = moe_table.read_text()
    assert first != before
    _other_targets_unchanged(before, first)
    assert "wrote" in capsys.readouterr().out
    tri.load_config_table.reload()
    assert tri.pick_block_m(5, "interpreter") == 16  # the launcher reads the rewritten file
    assert tri.gemm_config("interpreter", 16, "gate_up")["BLOCK_N"] == 32
    assert tune.main(["moe", "--tokens", "40", *common]) == 0
    second = json.loads(moe_table.read_text())
    assert set(second["_tuned"]["interpreter"]["results"]) == {"T<=32", "T<=1073741824"}
    _other_targets_unchanged(before, moe_table.read_text())


class CorruptLaunch:
    """Wraps a kernel: every launch then adds 1 to its positional argument `index` (a wrong result)."""

    def __init__(self, kernel, index):
        self.kernel, self.index = kernel, index

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            launch(*args, **kwargs)
            args[self.index].add_(1.0)

        return run


@interpreter_only
@pytest.mark.parametrize("broken_backward", [False, True])
def test_new_block_m_key_needs_a_correct_backward(tri, moe_table, tmp_path, monkeypatch, broken_backward):
    if broken_backward:
        monkeypatch.setattr(tri, "moe_bwd_dx_kernel", CorruptLaunch(tri.moe_bwd_dx_kernel, 2))  # grad_x
    args = tune.parse_args(["moe", "--tokens", "40", *TINY_MOE, "--block-m", "64", "--block-n", "32", "--block-k",
                            "32", "--out", str(tmp_path / "out.json")])
    result = tune.run(args, timer=lambda fn, info: 1e-6 if info["block_m"] == 64 else 2e-6, log=lambda *_: None)
    entry = result["entry"]
    if broken_backward:  # the fastest BLOCK_M is refused: its (copied) backward tiles give wrong gradients
        assert any("not written: backward" in why for _, why in result["rejected"])
        assert entry["block_m_by_tokens"][1][1] == 32 and "64" not in entry["gemm"]
    else:
        assert entry["block_m_by_tokens"][1][1] == 64
        old = json.loads(moe_table.read_text())["targets"]["interpreter"]["gemm"]["32"]
        assert {k: entry["gemm"]["64"][k] for k in ("bwd_act", "bwd_dx", "wgrad")} == \
            {k: old[k] for k in ("bwd_act", "bwd_dx", "wgrad")}


@interpreter_only
def test_budget_stops_the_sweep_and_keeps_the_table(tri, moe_table, tmp_path):
    out = tmp_path / "out.json"
    logs = []
    result = tune.run(tune.parse_args(["moe", "--tokens", "3", *TINY_MOE, "--budget", "0", "--out", str(out)]),
                      timer=fake_timer, log=logs.append)
    assert result["skipped"] and result["record"]["evaluated"] == 0
    assert any("not evaluated" in line for line in logs) and any(line.startswith("  skipped ") for line in logs)
    before = json.loads(moe_table.read_text())
    assert json.loads(out.read_text())["targets"] == before["targets"]


@interpreter_only
def test_attention_tuner_writes_a_table_the_launchers_read(tmp_path, monkeypatch):
    from zaya_kernels.triton import attention as att

    path = tmp_path / "attention.json"
    shutil.copy(att.CONFIG_PATH, path)
    _use_table(monkeypatch, att, str(path))
    before = path.read_text()
    out = tmp_path / "proposed.json"
    args = tune.parse_args(["attention", "--heads", "4,2", "--head-dim", "16", "--prefill-tokens", "24",
                            "--decode-batch", "2", "--decode-context", "40", "--block-rows", "16,32", "--block-n",
                            "16,32", "--out", str(out)])
    result = tune.run(args, timer=lambda fn, info: 1e-6 * sum(info["cfg"].values()), log=lambda *_: None)
    text = out.read_text()
    _other_targets_unchanged(before, text)
    fwd, decode = result["entry"]["fwd"]["16"], result["entry"]["decode"]["16"]
    assert fwd["block_rows"] == 16 and decode["block_n"] == 16  # the smallest fake time
    old, new = json.loads(before)["targets"]["interpreter"], json.loads(text)["targets"]["interpreter"]
    assert new["bwd_dq"] == old["bwd_dq"] and new["fwd"]["128"] == old["fwd"]["128"]
    _use_table(monkeypatch, att, str(out))
    assert att.pick_config("decode", 16, torch.device("cpu")) == decode


def test_json_splice_keeps_the_shipped_formatting():
    from zaya_kernels.triton import attention as att
    from zaya_kernels.triton import moe

    for path in (moe.CONFIG_PATH, att.CONFIG_PATH):
        text = open(path).read()
        table = json.loads(text)
        for target, entry in table["targets"].items():
            assert tune.splice(text, ["targets", target], entry) == text  # the formatter reproduces the file
        new = tune.splice(text, ["_tuned", "sm_90", "x"], [1, 2])
        assert new.startswith(text.rstrip()[:-1].rstrip()) and json.loads(new)["_tuned"] == {"sm_90": {"x": [1, 2]}}


def test_cli_dispatch_shows_the_tuner_options(capsys):
    from zaya_kernels.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "moe", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--budget", "--write", "--out", "--tokens"):
        assert option in help_text


def test_standalone_script_runs_without_the_package_init():
    """`python zaya_kernels/tools/tune.py` (a GPU machine before the extension is built) reaches the tuner's CLI."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(tune.__file__)
    code = ("import runpy, sys; sys.modules['zaya_kernels._C'] = None; sys.argv = [sys.argv[1], 'attention', '--help'];"
            " runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(tool)], capture_output=True, text=True, timeout=120,
                          cwd=tool.parent)
    assert proc.returncode == 0, proc.stderr
    assert "--decode-context" in proc.stdout and "without the package __init__" in proc.stderr


def test_compile_checker_passes_the_shipped_gemv_and_names_a_failing_candidate():
    """The tuner's real compile gate (the other tests inject one): the shipped by-token GEMV compiles cleanly for
    sm_90, a candidate that cannot compile (BLOCK_N 3: tl.arange needs a power of two) is refused with the reason.
    In a child process without TRITON_INTERPRET, where the kernels compile."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import copy, json
from zaya_kernels.tools import tune
from zaya_kernels.triton import moe
entry = moe.load_config_table()["targets"]["sm_90"]
def table(gate_up):
    one = {**copy.deepcopy(entry), "by_token": {**entry["by_token"], "gate_up": gate_up}}
    return {"targets": {t: copy.deepcopy(one) for t in ("gfx942", "gfx950", "sm_90")}}
checker = tune.CompileChecker("sm_90", log=lambda *a: None)
names = [("moe_gate_up_by_token", "moe_gate_up_by_token")]
shipped = entry["by_token"]["gate_up"]
print(json.dumps([checker.check(moe, table(shipped), names, ["sm_90"]),
                  checker.check(moe, table({**shipped, "BLOCK_N": 3}), names, ["sm_90"])]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(tune.__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped, refused = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shipped is None
    assert refused.startswith("sm_90 moe_gate_up_by_token[") and "BLOCK_N=3" in refused and " FAIL: " in refused


@pytest.mark.gpu
def test_gpu_tunes_one_moe_bucket_within_budget(tmp_path):
    from zaya_kernels.triton import moe

    out = tmp_path / "moe.json"
    result = tune.run(tune.parse_args(["moe", "--tokens", "1", "--budget", "20", "--out", str(out)]))
    assert result["target"] in ("sm_90", "gfx942", "gfx950")
    before = moe.CONFIG_PATH.read_text()
    _other_targets_unchanged(before, out.read_text(), [t for t in OTHER_TARGETS + ("interpreter",)
                                                       if t != result["target"]])
    row = result["rows"][0]
    assert row["previous"]["us"] and row["chosen"]["us"]
    table = json.loads(out.read_text())
    assert table["_tuned"][result["target"]]["gpu"]
