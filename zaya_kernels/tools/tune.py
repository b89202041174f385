"""Tune the Triton launch tables (zaya_kernels/configs/{moe,attention}.json) on the current GPU.

    python -m zaya_kernels tune moe [--tokens 1,8,64] [--budget SECONDS] [--write] [--out FILE] [...]
    python -m zaya_kernels tune attention [--kernels fwd,decode] [--budget SECONDS] [--write] [--out FILE] [...]
    python zaya_kernels/tools/tune.py ...      (same; works before the compiled extension is built)

Only the current device's table target is tuned (zaya_kernels.triton._target.device_target: "sm_90" on an NVIDIA
GPU, "gfx942"/"gfx950" on ROCm; CPU tensors under TRITON_INTERPRET=1 give "interpreter", for the tests: timings
there are meaningless). Every candidate launch configuration must

  (a) compile for the current target with no spills, LDS within the limit and matrix instructions
      (zaya_kernels.tools.aot_report.compile_record / record_is_bad on the AotConfig the module's own AOT registry
      builds from a one-entry table; skipped for "interpreter", whose kernels cannot be compiled);
  (b) give the package reference's result (zaya_kernels.reference) within the tests' tolerance
      (tests/helpers.py assert_close, the same bound the GPU tests use);
  (c) be timed with zaya_kernels.tools.timing.median_seconds (triton.testing.do_bench on a GPU: CUDA events,
      L2 flushed between calls), through the launchers themselves with the candidate table in place.

The fastest valid candidate (geometric mean over the representative shapes) wins; a candidate that failed (a) or
(b) is never picked. Before a winner is written it is compiled for every ahead-of-time target too (gfx942, gfx950,
sm_90: `python -m zaya_kernels aot-report` compiles every table entry for every target and CI requires zero spills),
and the next best is taken if it fails there. --budget caps the sweep (the winners' cross-target compiles and a new
BLOCK_M key's backward check run after it, a few seconds each); what was not evaluated is printed.

MoE: per T bucket of `block_m_by_tokens`, BLOCK_M (neighbours of the current one) x the gate_up and down tiles
(BLOCK_N, BLOCK_K, num_warps, num_stages), gate_up swept first with the current down, then down with the best
gate_up; timed = dispatch + both GEMMs (the skipped tokens' rows written by gate_up's skip tiles) at representative
T (1, 8, 64 / 512, 2048 / 8192 for the shipped buckets); the BLOCK_M 16 bucket sweeps narrower and deeper tiles too
(moe_default_space). A BLOCK_M key shared by several buckets has one entry: a bucket can take a BLOCK_M another bucket
uses only with that entry, unchanged (so every written entry was timed by every bucket that uses it). A new BLOCK_M key
gets the backward tiles of the bucket's previous key, compile-checked and checked against the reference backward.
Before the buckets, the by-token GEMVs (`moe_experts_by_token`, what `moe` runs for T <= 4 without gradients): their
"by_token" entry swept the same way (gate_up, then down; moe_by_token_space) at T = 1 and 4 (or the --tokens up to 4).
Attention: fwd (causal prefill, default 8k tokens) and decode (batch 1/64 x context 8k/32k, contiguous cache) at the
head-dimension block of --head-dim (ZAYA1: 128).

--write rewrites only this target's entries of the package's JSON (and a "_tuned" record per target at the top
level: date, GPU, torch/triton versions, shapes, the chosen and the previous configuration's times); every other
byte of the file stays as it was. Without --write the proposed JSON goes to --out (default ./tune_out/).
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import copy
import datetime
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent.parent
HUGE_TOKENS = 1 << 30
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ==================================================================================================== JSON text
# The tables are hand-formatted; --write must keep every other target byte for byte, so the new values are spliced
# into the file's text at the spans of the values they replace, formatted in the file's own style.

def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _members(text: str, open_idx: int):
    """([(key, key_start, value_start, value_end)], index of the closing brace) of the object at text[open_idx]."""
    assert text[open_idx] == "{", text[open_idx:open_idx + 20]
    decoder = json.JSONDecoder()
    out, i = [], _skip_ws(text, open_idx + 1)
    if text[i] == "}":
        return out, i
    while True:
        key, key_end = decoder.raw_decode(text, i)
        colon = _skip_ws(text, key_end)
        assert text[colon] == ":"
        value_start = _skip_ws(text, colon + 1)
        _, value_end = decoder.raw_decode(text, value_start)
        out.append((key, i, value_start, value_end))
        i = _skip_ws(text, value_end)
        if text[i] == "}":
            return out, i
        assert text[i] == ","
        i = _skip_ws(text, i + 1)


def _line_indent(text: str, idx: int) -> int:
    return idx - (text.rfind("\n", 0, idx) + 1)


def value_span(text: str, path) -> tuple[int, int] | None:
    """(start, end) of the value at the key path (e.g. ["targets", "sm_90"]) in the JSON text, None if absent."""
    start = _skip_ws(text, 0)
    end = None
    for key in path:
        if text[start] != "{":
            return None
        members, _ = _members(text, start)
        found = [m for m in members if m[0] == key]
        if not found:
            return None
        _, _, start, end = found[0]
    return start, end


def compact_style(text: str) -> bool:
    """True when the file writes objects of plain values on one line (moe.json), False when fully expanded."""
    return re.search(r'\{"[^\n{}]*\}', text) is not None


def format_value(value, indent: int, compact: bool) -> str:
    """JSON of `value` whose key sits on a line indented by `indent` spaces: objects expanded one space per level
    (objects of plain values on one line when `compact`), lists on one line."""
    if not isinstance(value, dict) or not value or (compact and not any(isinstance(v, dict) for v in value.values())):
        return json.dumps(value)
    inner = " " * (indent + 1)
    items = [f"{inner}{json.dumps(k)}: {format_value(v, indent + 1, compact)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def splice(text: str, path, value) -> str:
    """`text` with the value at key path `path` replaced by `value` (created, with any missing parent objects, at
    the end of the innermost existing object); nothing else of the text changes."""
    compact = compact_style(text)
    for depth in range(len(path), 0, -1):
        span = value_span(text, path[:depth - 1]) if depth > 1 else (_skip_ws(text, 0), None)
        if span is None:
            continue
        parent_start = span[0]
        members, close = _members(text, parent_start)
        sub = value
        for key in reversed(path[depth:]):
            sub = {key: sub}
        key = path[depth - 1]
        found = [m for m in members if m[0] == key]
        if found:
            _, key_start, start, end = found[0]
            if depth < len(path):  # the object exists but lacks a deeper key: recurse into it
                continue
            return text[:start] + format_value(sub, _line_indent(text, key_start), compact) + text[end:]
        if members:
            _, key_start, _, end = members[-1]
            indent = _line_indent(text, key_start)
            return (text[:end] + f",\n{' ' * indent}{json.dumps(key)}: " + format_value(sub, indent, compact)
                    + text[end:])
        indent = _line_indent(text, parent_start) + 1
        return (text[:parent_start + 1] + f"\n{' ' * indent}{json.dumps(key)}: " + format_value(sub, indent, compact)
                + "\n" + " " * (indent - 1) + text[close:])
    raise ValueError(f"no JSON object at the top of the text for {path}")


def write_tuned_table(source_text: str, target: str, target_entry: dict, record: dict) -> str:
    """The table text with targets[target] replaced and "_tuned"[target] set; checked to parse to exactly that."""
    target_entry, record = json.loads(json.dumps(target_entry)), json.loads(json.dumps(record))  # tuples -> lists
    expected = json.loads(source_text)
    expected["targets"][target] = target_entry
    expected.setdefault("_tuned", {})[target] = record
    text = splice(source_text, ["targets", target], target_entry)
    text = splice(text, ["_tuned", target], record)
    if json.loads(text) != expected:
        raise AssertionError("internal error: the spliced table does not parse to the intended one")
    return text


# ==================================================================================================== shared pieces
def _assert_close():
    """tests/helpers.py assert_close, the tolerance the tests use (loaded by path: the tool runs from a checkout)."""
    path = _REPO / "tests" / "helpers.py"
    if not path.exists():
        raise SystemExit(f"tune: {path} not found; the tuner checks results with the tests' tolerance and runs from "
                         "a source checkout")
    spec = importlib.util.spec_from_file_location("_zaya_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.assert_close


@contextlib.contextmanager
def table_override(module, table):
    """Make `module.load_config_table()` return `table` (what the launchers read) for the duration."""
    saved = module.load_config_table
    module.load_config_table = lambda: table
    try:
        yield
    finally:
        module.load_config_table = saved


def _cfg_key(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


def _cfg_text(cfg: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "num_warps": "w", "num_stages": "s", "block_rows": "rows",
             "block_n": "n", "max_heads": "heads"}
    return ",".join(f"{short.get(k, k)}{v}" for k, v in cfg.items())


def candidate_grid(baseline: dict, space: dict, limit: int | None = None) -> list[dict]:
    """The baseline, then every combination of `space` (keys missing from it keep the baseline's value), nearest
    to the baseline first (fewest changed fields), so a budget cuts the farthest ones; at most `limit`."""
    keys = list(baseline)
    values = [space.get(k, [baseline[k]]) for k in keys]
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    grid = [baseline] + [c for c in grid if c != baseline]
    order = sorted(range(len(grid)), key=lambda i: (sum(grid[i][k] != baseline[k] for k in keys), i))
    grid = [grid[i] for i in order]
    return grid[:limit] if limit else grid


def _geomean(values) -> float:
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))


class Budget:
    def __init__(self, seconds: float | None):
        self.start = time.perf_counter()
        self.seconds = seconds
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


class CompileChecker:
    """(a): compile a candidate with aot_report.compile_record, from the AotConfigs the kernel module's own
    `_aot_configs` builds for a table holding just that candidate (no signature is written twice)."""

    def __init__(self, target: str, log=print):
        self.target = target
        self.log = log
        self.cache: dict = {}
        self.last_record = None  # the record behind the last failure

    def check(self, module, table, names, targets, label_filter=None) -> str | None:
        """None when every config of the registry kernels `names` (keys of module._aot_configs()) that `table`
        yields compiles cleanly for every target in `targets`; else why not."""
        from zaya_kernels.tools import aot_report
        from zaya_kernels.triton._aot import AOT_REGISTRY

        with table_override(module, table):
            configs = module._aot_configs()
        for config_key, registry_name in names:
            kernel = AOT_REGISTRY[registry_name].kernel
            for cfg in configs[config_key]:
                if label_filter is not None and not label_filter(cfg.label):
                    continue
                for target in targets:
                    key = (registry_name, cfg.label, cfg.num_warps, cfg.num_stages, target)
                    if key not in self.cache:
                        self.cache[key] = aot_report.compile_record(registry_name, kernel, cfg, target)
                    record = self.cache[key]
                    why = aot_report.record_problem(record)
                    if why:
                        self.last_record = record
                        if record["error"]:
                            why += ": " + record["error"].splitlines()[0][:200]
                        elif why == "SPILL":
                            why += f" ({record['spills']})"
                        return f"{target} {registry_name}[{cfg.label}] {why}"
        return None


def _environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - the tuner needs Triton
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton_version,
    }


def _us(seconds) -> list:
    return [round(s * 1e6, 2) for s in seconds]


# ==================================================================================================== base tuner
class _Tuner(abc.ABC):
    """Shared evaluation: compile check, reference check, timing, budget, and the final cross-target check."""

    module_name = ""

    def __init__(self, args, device, target, *, timer=None, compile_check=None, log=print):
        import importlib

        self.args = args
        self.device = device
        self.target = target
        self.log = log
        self.module = importlib.import_module(self.module_name)
        self.budget = Budget(args.budget)
        self.assert_close = _assert_close()
        self.checker = CompileChecker(target, log)
        self.compile_check = compile_check
        self.interpreter = target == "interpreter"
        if timer is None:
            from zaya_kernels.tools.timing import median_seconds

            kind = "cuda" if device.type == "cuda" else "cpu"
            repeats = args.repeats or (20 if kind == "cuda" else 1)
            timer = lambda fn, info: median_seconds(fn, kind, repeats)  # noqa: E731
        self.timer = timer
        self._usable: dict = {}
        self.dtype = _DTYPES[args.dtype]
        # the tuned table file the result is spliced into, this target's entry as shipped and as being tuned
        self.file_table = json.loads(Path(self.module.CONFIG_PATH).read_text())
        self.old_entry = copy.deepcopy(self.file_table["targets"][target])
        self.entry = copy.deepcopy(self.old_entry)
        self.results: dict = {}
        self.evaluated = 0
        self.rejected: list[tuple[str, str]] = []

    # (a) for the current target; the cross-target check of winners uses the same checker
    def _compile_reason(self, kind, cfg, context, targets=None, full=False) -> str | None:
        if self.compile_check is not None:
            reason = self.compile_check(kind, cfg, context)
            if reason:
                return reason
        if self.interpreter:
            return None  # interpreter kernels cannot be compiled; the reference check still runs
        return self._aot_check(kind, cfg, context, targets or [self.target], full)

    @abc.abstractmethod
    def _aot_check(self, kind, cfg, context, targets, full):  # pragma: no cover - per tuner
        ...

    def cross_check(self, kind, cfg, context) -> str | None:
        """Compile for every ahead-of-time target (what aot-report and CI do with every table entry)."""
        if self.interpreter or self.args.no_cross_check:
            return None
        return self._aot_check(kind, cfg, context, self._usable_targets(kind, context), True)

    def _usable_targets(self, kind, context) -> list[str]:
        """The AOT targets this machine's Triton compiles for: a target where the shipped entry itself fails to
        compile (not a spill: a missing backend or tool) is left out of the cross-check, with a warning."""
        from zaya_kernels.tools.aot_report import TARGET_NAMES

        key = (kind, self._shipped(kind, context)[1])
        if key not in self._usable:
            cfg, shipped_context = self._shipped(kind, context)
            usable = []
            for target in TARGET_NAMES:
                reason = self._aot_check(kind, cfg, shipped_context, [target], True)
                if reason and not self.checker.last_record["ok"]:
                    self.log(f"  warning: the shipped {kind} entry does not compile for {target} here ({reason}); "
                             f"{target} is left out of the cross-check (run aot-report on the result)")
                    continue
                usable.append(target)
            self._usable[key] = usable
        return self._usable[key]

    @abc.abstractmethod
    def _shipped(self, kind, context):  # pragma: no cover - per tuner
        ...

    def measure(self, label: str, cases, run_case, info) -> list[float] | None:
        """(b) then (c) for every case; None (and a rejection) when a case fails; [] when the budget ran out."""
        if self.budget.exhausted():
            self.budget.skipped.append(label)
            return []
        self.evaluated += 1
        times = []
        for case in cases:
            try:
                fn, check = run_case(case)
                with self._active(info):
                    result = fn()
                    check(result)
                    times.append(self.timer(fn, {**info, "case": case}))
            except AssertionError as exc:
                self._reject(label, "wrong result: " + str(exc).splitlines()[0][:200])
                return None
            except Exception as exc:  # noqa: BLE001 - a launch failure rejects the candidate, not the run
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                self._reject(label, f"failed: {type(exc).__name__}: {first_line}")
                return None
        self.log(f"  {label}: " + ", ".join(f"{t * 1e6:.1f}" for t in times) + " us")
        return times

    def _reject(self, label, why):
        self.rejected.append((label, why))
        self.log(f"  {label}: REJECTED ({why})")

    @abc.abstractmethod
    def _active(self, info):  # pragma: no cover - per tuner
        ...


# ==================================================================================================== MoE
MOE_GEMMS = ("gate_up", "down")
MOE_BY_TOKEN = {"gate_up_by_token": "gate_up", "down_by_token": "down"}  # tuner kind -> "by_token" entry key
BY_TOKEN_TOKENS = (1, 4)  # moe_experts_by_token's range (ops.moe.BY_TOKEN_MAX_TOKENS = 4)


def moe_default_tokens(buckets) -> dict[int, list[int]]:
    """Representative T per bucket index: (0, hi] -> 1, 8, hi; a finite (lo, hi] -> hi/4, hi; the open last bucket
    -> 4 lo (the shipped buckets give 1, 8, 64 / 512, 2048 / 8192)."""
    out, lo = {}, 0
    for i, (hi, _) in enumerate(buckets):
        if hi >= HUGE_TOKENS:
            tokens = [max(4 * lo, lo + 1)]
        elif lo == 0:
            tokens = sorted({1, min(8, hi), hi})
        else:
            tokens = sorted({t for t in (hi // 4, hi) if t > lo})
        out[i] = tokens
        lo = hi
    return out


def moe_default_space(target: str, block_m: int | None = None) -> dict:
    """The (BLOCK_N, BLOCK_K, num_warps, num_stages) values swept around a bucket's shipped entry. At BLOCK_M 16
    (the smallest tiles: few tokens, e.g. decode with gradients) narrower and deeper tiles too: one tile's GEMMs at
    ZAYA1's H = I = 2048 give only cdiv(2048, BLOCK_N) programs (64 at BLOCK_N 32, fewer than gfx942's 304 CUs or
    sm_90's 132 SMs), so weight streaming may want BLOCK_N 16 (twice the programs) or BLOCK_K 256 (more bytes in
    flight)."""
    if target == "interpreter":
        return {"BLOCK_N": [16, 32], "BLOCK_K": [16, 32], "num_warps": [4], "num_stages": [1]}
    stages = [3, 4] if target == "sm_90" else [1, 2]
    if block_m == 16:
        return {"BLOCK_N": [16, 32, 64], "BLOCK_K": [64, 128, 256], "num_warps": [4, 8], "num_stages": stages}
    return {"BLOCK_N": [32, 64, 128], "BLOCK_K": [64, 128], "num_warps": [4, 8], "num_stages": stages}


def moe_by_token_space(target: str) -> dict:
    """The (BLOCK_N, BLOCK_K, num_warps, num_stages) values swept for the by-token GEMVs: BLOCK_N sets the programs
    per token (ZAYA1: 2048 / BLOCK_N against 304 CUs on gfx942, 256 on gfx950, 132 SMs on sm_90), BLOCK_K the bytes
    each program has in flight."""
    if target == "interpreter":
        return {"BLOCK_N": [4, 8], "BLOCK_K": [16, 32], "num_warps": [4], "num_stages": [1]}
    stages = [1, 2, 3] if target == "sm_90" else [1, 2]
    return {"BLOCK_N": [4, 8, 16], "BLOCK_K": [256, 512, 1024], "num_warps": [2, 4, 8], "num_stages": stages}


class MoeTuner(_Tuner):
    module_name = "zaya_kernels.triton.moe"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        args = self.args
        self.H, self.I, self.E = args.hidden, args.intermediate, args.experts
        self.skip_mode = args.skip_mode
        self._inputs: dict = {}
        self._weights = None
        self._candidate = None

    # ------------------------------------------------------------ inputs and the reference
    def weights(self):
        if self._weights is None:
            gen = torch.Generator(self.device).manual_seed(1234)
            H, I, E = self.H, self.I, self.E
            gate_up = (torch.randn(E, 2 * I, H, generator=gen, device=self.device) * H ** -0.5).to(self.dtype)
            down = (torch.randn(E, H, I, generator=gen, device=self.device) * I ** -0.5).to(self.dtype)
            self._weights = gate_up, down
        return self._weights

    def inputs(self, T: int):
        if T not in self._inputs:
            from zaya_kernels.reference import moe as ref

            gen = torch.Generator(self.device).manual_seed(T)
            x = torch.randn(T, self.H, generator=gen, device=self.device).to(self.dtype)
            index = torch.randint(0, self.E + 1, (T,), generator=gen, device=self.device, dtype=torch.int32)
            weight = torch.rand(T, generator=gen, device=self.device) * 0.9 + 0.1
            gate_up, down = self.weights()
            dispatch = ref.moe_dispatch(index, self.E, 16)
            expected = ref.moe_experts(x, gate_up, down, weight, dispatch[2], dispatch[1], dispatch[4], dispatch[5], 16,
                                       self.skip_mode)
            self._inputs[T] = x, index, weight, expected
        return self._inputs[T]

    def _active(self, info):
        table = copy.deepcopy(self.file_table)
        entry = copy.deepcopy(self.entry)
        if "by_token" in info:
            entry["by_token"] = info["by_token"]
        else:
            block_m = info["block_m"]
            base = entry["gemm"].get(str(block_m)) or self._bwd_source(info["bucket"])
            entry["gemm"][str(block_m)] = {**base, "gate_up": info["gate_up"], "down": info["down"]}
        table["targets"][self.target] = entry
        return table_override(self.module, table)

    def _bwd_source(self, bucket: int) -> dict:
        """The gemm entry of the bucket's previous BLOCK_M: a new BLOCK_M key takes its backward tiles."""
        return copy.deepcopy(self.old_entry["gemm"][str(self.old_entry["block_m_by_tokens"][bucket][1])])

    def _aot_table(self, block_m: int, gemm_entry: dict, by_token: dict | None = None) -> dict:
        from zaya_kernels.tools.aot_report import TARGET_NAMES

        one = {"block_m_by_tokens": [[HUGE_TOKENS, block_m]], "by_token": by_token or self.entry["by_token"],
               "gemm": {str(block_m): gemm_entry}}
        return {"targets": {t: copy.deepcopy(one) for t in TARGET_NAMES}}

    def _shipped(self, kind, context):
        if kind in MOE_BY_TOKEN:
            return self.old_entry["by_token"][MOE_BY_TOKEN[kind]], context
        bucket = context[1]
        old_m = self.old_entry["block_m_by_tokens"][bucket][1]
        return self.old_entry["gemm"][str(old_m)][kind], (old_m, bucket)

    def _aot_check(self, kind, cfg, context, targets, full):
        if kind in MOE_BY_TOKEN:  # context: None
            block_m = self.entry["block_m_by_tokens"][0][1]
            by_token = {**self.entry["by_token"], MOE_BY_TOKEN[kind]: cfg}
            table = self._aot_table(block_m, self.entry["gemm"][str(block_m)], by_token)
            return self.checker.check(self.module, table, [(f"moe_{kind}", f"moe_{kind}")], targets)
        block_m, bucket = context
        gemm_entry = {**(self.entry["gemm"].get(str(block_m)) or self._bwd_source(bucket))}
        if kind in MOE_GEMMS:
            gemm_entry[kind] = cfg
        names = [(f"moe_{kind}", f"moe_{kind}")]
        return self.checker.check(self.module, self._aot_table(block_m, gemm_entry), names, targets)

    # ------------------------------------------------------------ one (BLOCK_M, gate_up, down) combination
    def _evaluate(self, label, key, compiles, context, tokens, run_case, info) -> list[float] | None:
        """Times of one candidate (cached under `key`): None if a (kind, cfg) of `compiles` fails its compile
        check or a case fails, [] when the budget ran out."""
        if key in self.results:
            return self.results[key]
        if self.budget.exhausted():
            self.budget.skipped.append(label)
            return []
        for kind, cfg in compiles:
            reason = self._compile_reason(kind, cfg, context)
            if reason:
                self._reject(label, f"compile: {reason}")
                self.results[key] = None
                return None
        times = self.measure(label, tokens, run_case, info)
        if times != []:
            self.results[key] = times
        return times

    def evaluate(self, bucket, tokens, block_m, gate_up, down) -> list[float] | None:
        label = f"T<={self._max_tokens(bucket)} BLOCK_M={block_m} gate_up[{_cfg_text(gate_up)}] down[{_cfg_text(down)}]"
        info = {"bucket": bucket, "block_m": block_m, "gate_up": gate_up, "down": down}
        return self._evaluate(label, (bucket, block_m, _cfg_key(gate_up), _cfg_key(down)),
                              (("gate_up", gate_up), ("down", down)), (block_m, bucket), tokens,
                              lambda T: self._run_case(T, block_m), info)

    def _run_case(self, T, block_m):
        from zaya_kernels.reference import moe as ref

        tri = self.module
        x, index, weight, expected = self.inputs(T)
        gate_up, down = self.weights()
        outs = ref.empty_dispatch(index, self.E, block_m)
        y = torch.full_like(x, float("nan"))

        def fn():
            tri.moe_dispatch(index, self.E, block_m, *outs)
            tri.moe_experts(x, gate_up, down, weight, outs[2], outs[1], outs[4], outs[5], block_m, self.skip_mode, y)
            return y

        def check(result):
            self.assert_close(result, expected, dtype=self.dtype, reduction=max(self.H, self.I),
                              what=f"moe forward T={T}")

        return fn, check

    def check_backward(self, bucket, tokens, block_m, gate_up, down) -> str | None:
        """A new BLOCK_M key: its backward tiles (copied) must compile here and match the reference backward."""
        if not self.interpreter:
            for kind in ("bwd_act", "bwd_dx"):
                reason = self._aot_check(kind, None, (block_m, bucket), [self.target], False)
                if reason:
                    return f"backward compile: {reason}"
        from zaya_kernels.reference import moe as ref

        T = max(tokens)
        x, index, weight, _ = self.inputs(T)
        gate_up_w, down_w = self.weights()
        grad_y = torch.randn(x.shape, generator=torch.Generator(self.device).manual_seed(7), device=self.device)
        grad_y = grad_y.to(self.dtype)
        outs = ref.empty_dispatch(index, self.E, block_m)
        info = {"bucket": bucket, "block_m": block_m, "gate_up": gate_up, "down": down}
        try:
            with self._active(info):
                self.module.moe_dispatch(index, self.E, block_m, *outs)
                got = self.module.moe_experts_backward(grad_y, x, gate_up_w, down_w, weight, outs[2], outs[1],
                                                       outs[4], outs[5], block_m, self.skip_mode)
            want = ref.moe_experts_backward(grad_y, x, gate_up_w, down_w, weight, outs[2], outs[1], outs[4], outs[5],
                                            block_m, self.skip_mode)
            for name, a, e in zip(("grad_x", "grad_gate_up", "grad_down", "grad_w"), got, want):
                self.assert_close(a, e, dtype=a.dtype, reduction=max(self.H, self.I, T), what=f"backward {name}")
        except AssertionError as exc:
            return "backward: " + str(exc).splitlines()[0][:200]
        return None

    # ------------------------------------------------------------ the sweep
    def _max_tokens(self, bucket):
        return self.old_entry["block_m_by_tokens"][bucket][0]

    def block_m_candidates(self, bucket, tokens) -> list[int]:
        old = self.old_entry["block_m_by_tokens"][bucket][1]
        if self.args.block_m:
            return [old] + [m for m in self.args.block_m if m != old]
        top = max(16, 1 << max(tokens).bit_length()) if bucket == 0 else 128  # no tile wider than the small bucket
        return [old] + [m for m in (old // 2, old * 2) if 16 <= m <= min(128, top) and m != old]

    def space(self, block_m: int | None = None, by_token: bool = False) -> dict:
        """The swept values (the bucket tiles' or, by_token, the GEMVs'), with the command line's overrides."""
        space = moe_by_token_space(self.target) if by_token else moe_default_space(self.target, block_m)
        for key, flag in (("BLOCK_N", "block_n"), ("BLOCK_K", "block_k"), ("num_warps", "warps"),
                          ("num_stages", "stages")):
            if getattr(self.args, flag):
                space[key] = getattr(self.args, flag)
        return space

    def sweep_pair(self, base_gate_up, base_down, space, down_kind, context, evaluate) -> list[tuple]:
        """gate_up swept with base_down (or, if that fails its compile check, the nearest down that passes), then
        down with the best gate_up; evaluate(gate_up, down) -> times. Returns the (gate_up, down) pairs tried."""
        limit = self.args.max_candidates
        if self._compile_reason(down_kind, base_down, context):
            base_down = next((c for c in candidate_grid(base_down, space, limit)
                              if not self._compile_reason(down_kind, c, context)), base_down)
        pairs, best = [], None
        for gate_up in candidate_grid(base_gate_up, space, limit):
            pairs.append((gate_up, base_down))
            times = evaluate(gate_up, base_down)
            if times and (best is None or _geomean(times) < best[0]):
                best = (_geomean(times), gate_up)
        best_gate_up = best[1] if best else base_gate_up
        for down in candidate_grid(base_down, space, limit):
            pairs.append((best_gate_up, down))
            evaluate(best_gate_up, down)
        return pairs

    def run(self):
        buckets = self.old_entry["block_m_by_tokens"]
        defaults = moe_default_tokens(buckets)
        if self.args.tokens:
            per_bucket: dict[int, list[int]] = {}
            for T in self.args.tokens:
                index = next((i for i, (hi, _) in enumerate(buckets) if T <= hi), len(buckets) - 1)
                per_bucket.setdefault(index, []).append(T)
        else:
            per_bucket = defaults
        # the by-token GEMVs first: they are decode's path (T <= 4 without gradients), so a budget reaches them
        by_token = sorted(T for T in (self.args.tokens or BY_TOKEN_TOKENS) if 1 <= T <= BY_TOKEN_TOKENS[-1])
        rows = [self.tune_by_token(by_token)] if by_token else []
        return rows + [self.tune_bucket(bucket, sorted(per_bucket[bucket])) for bucket in sorted(per_bucket)]

    # ------------------------------------------------------------ the by-token GEMVs (decode, T <= 4)
    def _run_by_token(self, T):
        tri = self.module
        x, index, weight, expected = self.inputs(T)
        gate_up, down = self.weights()
        y = torch.full_like(x, float("nan"))

        def fn():
            tri.moe_experts_by_token(x, gate_up, down, index, weight, self.skip_mode, y)
            return y

        def check(result):
            self.assert_close(result, expected, dtype=self.dtype, reduction=max(self.H, self.I),
                              what=f"moe by token T={T}")

        return fn, check

    def evaluate_by_token(self, tokens, gate_up, down) -> list[float] | None:
        return self._evaluate(f"by token gate_up[{_cfg_text(gate_up)}] down[{_cfg_text(down)}]",
                              ("by_token", _cfg_key(gate_up), _cfg_key(down)),
                              (("gate_up_by_token", gate_up), ("down_by_token", down)), None, tokens,
                              self._run_by_token, {"by_token": {"gate_up": gate_up, "down": down}})

    def tune_by_token(self, tokens):
        """gate_up swept with the current down, then down with the best gate_up; the fastest valid pair that
        compiles cleanly for every AOT target is written."""
        old = self.old_entry["by_token"]
        self.log(f"\nMoE by token (moe_experts_by_token; tokens {tokens}, H={self.H}, I={self.I}, E={self.E}, "
                 f"{self.args.dtype}) on {self.target}")
        previous_times = self.evaluate_by_token(tokens, old["gate_up"], old["down"])
        pairs = self.sweep_pair(old["gate_up"], old["down"], self.space(by_token=True), "down_by_token", None,
                                lambda gate_up, down: self.evaluate_by_token(tokens, gate_up, down))
        scored = []
        for gate_up, down in pairs:
            times = self.results.get(("by_token", _cfg_key(gate_up), _cfg_key(down)))
            if times and len(times) == len(tokens):
                scored.append((_geomean(times), gate_up, down, times))
        scored.sort(key=lambda item: item[0])
        chosen = None
        for _, gate_up, down, times in scored:
            if (gate_up, down) != (old["gate_up"], old["down"]):
                reason = (self.cross_check("gate_up_by_token", gate_up, None)
                          or self.cross_check("down_by_token", down, None))
                if reason:
                    self._reject(f"by token gate_up[{_cfg_text(gate_up)}] down[{_cfg_text(down)}]",
                                 f"not written: {reason}")
                    continue
            chosen = (gate_up, down, times)
            break
        if chosen is None:
            self.log("  no valid measured by-token candidate: the entry stays")
            chosen = (old["gate_up"], old["down"], previous_times or [])
        gate_up, down, times = chosen
        self.entry["by_token"] = {"gate_up": gate_up, "down": down}
        row = {"bucket": f"by token T<={BY_TOKEN_TOKENS[-1]}", "tokens": tokens,
               "previous": {**old, "us": _us(previous_times) if previous_times else None},
               "chosen": {"gate_up": gate_up, "down": down, "us": _us(times) if times else None}}
        if previous_times and times:
            row["speedup"] = round(_geomean(previous_times) / _geomean(times), 3)
        return row

    def tune_bucket(self, bucket, tokens):
        max_tokens = self._max_tokens(bucket)
        old_m = self.old_entry["block_m_by_tokens"][bucket][1]
        old_gemm = self.old_entry["gemm"][str(old_m)]
        self.log(f"\nMoE bucket T <= {max_tokens} (tokens {tokens}, H={self.H}, I={self.I}, E={self.E}, "
                 f"{self.args.dtype}) on {self.target}")
        previous = {"block_m": old_m, "gate_up": old_gemm["gate_up"], "down": old_gemm["down"]}
        previous_times = self.evaluate(bucket, tokens, old_m, old_gemm["gate_up"], old_gemm["down"])
        # A BLOCK_M key another bucket uses keeps its entry (so every written entry was timed by every bucket on it)
        owned = {m for i, (_, m) in enumerate(self.entry["block_m_by_tokens"]) if i != bucket}
        combos = []  # (block_m, gate_up, down) evaluated for this bucket
        for block_m in self.block_m_candidates(bucket, tokens):
            fixed = self.entry["gemm"].get(str(block_m)) if block_m in owned else None
            if fixed is not None:  # another bucket's key: only its entry
                combos.append((block_m, fixed["gate_up"], fixed["down"]))
                self.evaluate(bucket, tokens, block_m, fixed["gate_up"], fixed["down"])
                continue
            base = self.entry["gemm"].get(str(block_m)) or old_gemm
            pairs = self.sweep_pair(base["gate_up"], base["down"], self.space(block_m), "down", (block_m, bucket),
                                    lambda gate_up, down, m=block_m: self.evaluate(bucket, tokens, m, gate_up, down))
            combos.extend((block_m, gate_up, down) for gate_up, down in pairs)
        # choose: fastest valid, fully measured, consistent with owned keys, clean on every AOT target
        scored = []
        for block_m, gate_up, down in combos:
            times = self.results.get((bucket, block_m, _cfg_key(gate_up), _cfg_key(down)))
            if times and len(times) == len(tokens):
                scored.append((_geomean(times), block_m, gate_up, down, times))
        scored.sort(key=lambda s: s[0])
        chosen = None
        for score, block_m, gate_up, down, times in scored:
            label = f"BLOCK_M={block_m} gate_up[{_cfg_text(gate_up)}] down[{_cfg_text(down)}]"
            fixed = self.entry["gemm"].get(str(block_m)) if block_m in owned else None
            if fixed is not None and (fixed["gate_up"], fixed["down"]) != (gate_up, down):
                continue
            if (block_m, gate_up, down) != (old_m, old_gemm["gate_up"], old_gemm["down"]):
                reason = None
                for kind, cfg in (("gate_up", gate_up), ("down", down)):
                    reason = reason or self.cross_check(kind, cfg, (block_m, bucket))
                new_key = str(block_m) not in self.entry["gemm"]
                if new_key and not reason:
                    if not self.interpreter and not self.args.no_cross_check:
                        for kind in ("bwd_act", "bwd_dx"):
                            reason = reason or self._aot_check(kind, None, (block_m, bucket),
                                                               self._usable_targets(kind, (block_m, bucket)), True)
                    reason = reason or self.check_backward(bucket, tokens, block_m, gate_up, down)
                    if not reason:
                        self.log(f"  new BLOCK_M={block_m} key: the backward tiles of BLOCK_M={old_m} compile and "
                                 "match the reference backward")
                if reason:
                    self._reject(label, f"not written: {reason}")
                    continue
            chosen = (block_m, gate_up, down, times)
            break
        if chosen is None:
            self.log(f"  no valid measured candidate for T <= {max_tokens}: the bucket keeps its entry")
            chosen = (old_m, old_gemm["gate_up"], old_gemm["down"], previous_times or [])
        block_m, gate_up, down, times = chosen
        gemm = self.entry["gemm"]
        entry = gemm.get(str(block_m)) or self._bwd_source(bucket)
        gemm[str(block_m)] = {**entry, "gate_up": gate_up, "down": down}
        self.entry["gemm"] = {k: gemm[k] for k in sorted(gemm, key=int)}
        self.entry["block_m_by_tokens"][bucket][1] = block_m
        row = {"bucket": f"T<={max_tokens}", "tokens": tokens,
               "previous": {**previous, "us": _us(previous_times) if previous_times else None},
               "chosen": {"block_m": block_m, "gate_up": gate_up, "down": down, "us": _us(times) if times else None}}
        if previous_times and times:
            row["speedup"] = round(_geomean(previous_times) / _geomean(times), 3)
        return row

    def shapes(self) -> dict:
        return {"H": self.H, "I": self.I, "E": self.E, "dtype": self.args.dtype, "skip_mode": self.skip_mode}


# ==================================================================================================== attention
ATTENTION_KERNELS = ("fwd", "decode")


def attention_default_space(kernel: str, target: str) -> dict:
    if target == "interpreter":
        return ({"block_rows": [16, 32], "block_n": [16]} if kernel == "fwd" else {"block_n": [16, 32]})
    stages = [1, 2, 3] if target == "sm_90" else [1, 2]
    if kernel == "fwd":
        return {"block_rows": [64, 128], "block_n": [32, 64, 128], "num_warps": [4, 8], "num_stages": stages}
    return {"block_n": [32, 64, 128, 256], "num_warps": [2, 4, 8],
            "num_stages": stages + ([4] if target == "sm_90" else [])}


class AttentionTuner(_Tuner):
    module_name = "zaya_kernels.triton.attention"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        args = self.args
        self.hq, self.hkv = args.heads
        self.D = args.head_dim
        self.block_d = str(self.module.block_d_for(self.D))
        self._cases: dict = {}

    def _active(self, info):
        table = copy.deepcopy(self.file_table["targets"])
        table[self.target] = copy.deepcopy(self.entry)
        table[self.target][info["kernel"]][self.block_d] = info["cfg"]
        return table_override(self.module, table)

    def _shipped(self, kind, context):
        return self.old_entry[kind][self.block_d], None

    def _aot_check(self, kind, cfg, context, targets, full):
        from zaya_kernels.tools.aot_report import TARGET_NAMES

        one = {k: ({self.block_d: cfg} if k == kind else {}) for k in self.module.KERNELS}
        table = {t: copy.deepcopy(one) for t in TARGET_NAMES}
        # candidates: the variant that is timed; winners (full): every variant aot-report compiles
        timed = ("window=0,",) if kind == "fwd" else ("paged=0,window=0,start=0,queries=1,",)
        label_filter = None if full else (lambda label: label.startswith(timed))
        return self.checker.check(self.module, table, [(kind, f"attention_{kind}")], targets, label_filter)

    def cases(self, kernel):
        if kernel == "fwd":
            return list(self.args.prefill_tokens)
        return [(b, c) for b in self.args.decode_batch for c in self.args.decode_context]

    def _tensors(self, kernel, case):
        key = (kernel, case)
        if key not in self._cases:
            from zaya_kernels.reference import attention as ref

            gen = torch.Generator(self.device).manual_seed(5)
            dev, D = self.device, self.D

            def rand(*shape):
                return torch.randn(*shape, generator=gen, device=dev).to(self.dtype)

            if kernel == "fwd":
                T = case
                q, k, v = rand(T, self.hq, D), rand(T, self.hkv, D), rand(T, self.hkv, D)
                cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
                expected = ref.cca_attention(q, k, v, cu, T, None, True, -1)[0]
                self._cases[key] = (q, k, v, cu, expected, T * D, v)
            else:
                B, ctx = case
                q, kc, vc = rand(B, self.hq, D), rand(B, ctx, self.hkv, D), rand(B, ctx, self.hkv, D)
                seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
                expected = ref.cca_attention_decode(q, kc, vc, seq_lens, None, None, -1)
                self._cases[key] = (q, kc, vc, seq_lens, expected, ctx * D + 1, vc)
        return self._cases[key]

    def _run_case(self, kernel, case):
        tri = self.module
        a, b, c, d, expected, reduction, values = self._tensors(kernel, case)
        scale = self.D ** -0.5
        if kernel == "fwd":
            fn = lambda: tri.attention_fwd(a, b, c, d, case, scale, True, -1)[0]  # noqa: E731
        else:
            fn = lambda: tri.attention_decode(a, b, c, d, None, scale, -1)  # noqa: E731
        bound = values.abs().max().item()

        def check(result):
            self.assert_close(result, expected, dtype=self.dtype, reduction=reduction, scale=bound,
                              what=f"attention {kernel} {case}")

        return fn, check

    def evaluate(self, kernel, cfg):
        label = f"{kernel} D{self.block_d} [{_cfg_text(cfg)}]"
        key = (kernel, _cfg_key(cfg))
        if key in self.results:
            return self.results[key]
        if self.budget.exhausted():
            self.budget.skipped.append(label)
            return []
        reason = self._compile_reason(kernel, cfg, None)
        if reason:
            self._reject(label, f"compile: {reason}")
            self.results[key] = None
            return None
        times = self.measure(label, self.cases(kernel), lambda case: self._run_case(kernel, case),
                             {"kernel": kernel, "cfg": cfg})
        if times != []:
            self.results[key] = times
        return times

    def space(self, kernel) -> dict:
        space = attention_default_space(kernel, self.target)
        for key, flag in (("block_rows", "block_rows"), ("block_n", "block_n"), ("num_warps", "warps"),
                          ("num_stages", "stages")):
            if getattr(self.args, flag) and (key != "block_rows" or kernel == "fwd"):
                space[key] = getattr(self.args, flag)
        return space

    def run(self):
        rows = []
        for kernel in self.args.kernels:
            old = self.old_entry[kernel][self.block_d]
            cases = self.cases(kernel)
            self.log(f"\nattention {kernel}, head-dim block {self.block_d} (heads {self.hq}/{self.hkv}, "
                     f"cases {cases}, {self.args.dtype}) on {self.target}")
            previous_times = self.evaluate(kernel, old)
            grid = candidate_grid(old, self.space(kernel), self.args.max_candidates)
            for cfg in grid:
                self.evaluate(kernel, cfg)
            scored = sorted(((_geomean(t), i, cfg, t) for i, cfg in enumerate(grid)
                             for t in [self.results.get((kernel, _cfg_key(cfg)))] if t and len(t) == len(cases)),
                            key=lambda s: s[:2])
            chosen = None
            for _, _, cfg, times in scored:
                reason = None if cfg == old else self.cross_check(kernel, cfg, None)
                if reason:
                    self._reject(f"{kernel} [{_cfg_text(cfg)}]", f"not written: {reason}")
                    continue
                chosen = (cfg, times)
                break
            if chosen is None:
                self.log(f"  no valid measured candidate for {kernel}: its entry stays")
                chosen = (old, previous_times or [])
            cfg, times = chosen
            self.entry[kernel][self.block_d] = cfg
            row = {"bucket": f"{kernel}/{self.block_d}", "tokens": cases,
                   "previous": {**old, "us": _us(previous_times) if previous_times else None},
                   "chosen": {**cfg, "us": _us(times) if times else None}}
            if previous_times and times:
                row["speedup"] = round(_geomean(previous_times) / _geomean(times), 3)
            rows.append(row)
        return rows

    def shapes(self) -> dict:
        return {"q_heads": self.hq, "kv_heads": self.hkv, "head_dim": self.D, "dtype": self.args.dtype,
                "prefill_tokens": list(self.args.prefill_tokens),
                "decode": [list(c) for c in self.cases("decode")] if "decode" in self.args.kernels else []}


# ==================================================================================================== CLI
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _kernels(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ATTENTION_KERNELS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"--kernels takes {','.join(ATTENTION_KERNELS)}, got {text!r}")
    return values


def _heads(text: str) -> tuple[int, int]:
    values = _int_list(text)
    if len(values) != 2 or values[0] % values[1]:
        raise argparse.ArgumentTypeError(f"--heads takes Q,KV with Q a multiple of KV, got {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zaya_kernels tune",
                                     description="Time candidate Triton launch configurations on this GPU and write "
                                                 "the fastest valid ones into the target's table.")
    sub = parser.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--write", action="store_true",
                        help="update this target's entries of the package's configs/*.json (plus its _tuned record)")
    common.add_argument("--out", default=None, help="also/instead write the proposed JSON here "
                                                    "(default without --write: ./tune_out/<kind>_<target>.json)")
    common.add_argument("--budget", type=float, default=None,
                        help="total seconds; the sweep stops there, keeps the best so far and prints what it skipped")
    common.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="activation dtype (default bf16 on a GPU, fp32 in the interpreter)")
    common.add_argument("--repeats", type=int, default=None, help="timer repeats (default: do_bench 20 ms on a GPU)")
    common.add_argument("--max-candidates", type=int, default=None, help="at most this many per sweep")
    common.add_argument("--no-cross-check", action="store_true",
                        help="do not compile winners for gfx942/gfx950/sm_90 (aot-report and CI still do)")
    common.add_argument("--block-n", type=_int_list, default=None, help="candidate BLOCK_N / block_n values")
    common.add_argument("--warps", type=_int_list, default=None, help="candidate num_warps values")
    common.add_argument("--stages", type=_int_list, default=None, help="candidate num_stages values")
    moe = sub.add_parser("moe", parents=[common], help="MoE grouped GEMMs, per T bucket")
    moe.add_argument("--tokens", type=_int_list, default=None,
                     help="T values to time; only their buckets are tuned (default: 1,8,64 / 512,2048 / 8192)")
    moe.add_argument("--hidden", type=int, default=2048, help="H (default 2048, ZAYA1-8B)")
    moe.add_argument("--intermediate", type=int, default=2048, help="I (default 2048)")
    moe.add_argument("--experts", type=int, default=16, help="E (default 16)")
    moe.add_argument("--skip-mode", type=int, choices=(0, 1), default=0)
    moe.add_argument("--block-m", type=_int_list, default=None,
                     help="candidate BLOCK_M values for every tuned bucket (default: the bucket's and its neighbours)")
    moe.add_argument("--block-k", type=_int_list, default=None, help="candidate BLOCK_K values")
    att = sub.add_parser("attention", parents=[common], help="CCA attention prefill forward and decode")
    att.add_argument("--kernels", type=_kernels, default=list(ATTENTION_KERNELS), help="fwd,decode (default both)")
    att.add_argument("--heads", type=_heads, default=(8, 2), help="query,kv heads (default 8,2)")
    att.add_argument("--head-dim", type=int, default=128, help="head dim (default 128); its block's entry is tuned")
    att.add_argument("--prefill-tokens", type=_int_list, default=[8192], help="fwd: tokens of one sequence")
    att.add_argument("--decode-batch", type=_int_list, default=[1, 64], help="decode: batch sizes")
    att.add_argument("--decode-context", type=_int_list, default=[8192, 32768], help="decode: cached positions")
    att.add_argument("--block-rows", type=_int_list, default=None, help="fwd: candidate block_rows values")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def _format_rows(rows) -> str:
    lines = []
    for row in rows:
        prev, chosen = row["previous"], row["chosen"]

        def cfg(c):
            return _cfg_text({k: v for k, v in c.items() if k != "us" and not isinstance(v, dict)}) + "".join(
                f" {k}[{_cfg_text(v)}]" for k, v in c.items() if isinstance(v, dict))

        def times(c):
            return "not measured" if not c["us"] else ", ".join(f"{t:.1f}" for t in c["us"]) + " us"

        speed = f"  x{row['speedup']:.3f}" if "speedup" in row else ""
        lines.append(f"{row['bucket']:<14} {row['tokens']}{speed}\n  previous: {cfg(prev)}: {times(prev)}"
                     f"\n  chosen:   {cfg(chosen)}: {times(chosen)}")
    return "\n".join(lines)


def run(args, *, timer=None, compile_check=None, log=print) -> dict:
    """Tune per `args` (parse_args); returns {"target", "entry", "record", "rows", "text", "paths"}."""
    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    from zaya_kernels.triton._target import device_target

    target = device_target(device)
    if target == "interpreter":
        log("tune: no GPU, tuning the 'interpreter' table under TRITON_INTERPRET=1 (timings are meaningless; tests)")
    tuner_cls = MoeTuner if args.kind == "moe" else AttentionTuner
    tuner = tuner_cls(args, device, target, timer=timer, compile_check=compile_check, log=log)
    rows = tuner.run()
    budget = tuner.budget
    record = {**_environment(device), "shapes": tuner.shapes(), "budget_s": args.budget,
              "elapsed_s": round(budget.elapsed(), 1), "evaluated": tuner.evaluated, "rejected": len(tuner.rejected),
              "skipped_by_budget": len(budget.skipped), "results": {r["bucket"]: r for r in rows}}
    config_path = Path(tuner.module.CONFIG_PATH)
    source_text = config_path.read_text()
    old_record = json.loads(source_text).get("_tuned", {}).get(target)
    if old_record and isinstance(old_record.get("results"), dict):  # keep earlier results of buckets not tuned now
        record["results"] = {**old_record["results"], **record["results"]}
    text = write_tuned_table(source_text, target, tuner.entry, record)
    log("\n" + _format_rows(rows))
    log(f"\n{tuner.evaluated} candidates evaluated, {len(tuner.rejected)} rejected, in {budget.elapsed():.1f} s")
    if budget.skipped:
        log(f"budget of {args.budget} s reached: {len(budget.skipped)} candidates not evaluated:")
        for label in budget.skipped:
            log(f"  skipped {label}")
    paths = []
    if args.write:
        paths.append(config_path)
    if args.out or not args.write:
        paths.append(Path(args.out) if args.out else Path("tune_out") / f"{args.kind}_{target}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        log(f"wrote {path}")
    return {"target": target, "entry": tuner.entry, "record": record, "rows": rows, "text": text, "paths": paths,
            "rejected": tuner.rejected, "skipped": budget.skipped}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():  # CPU: the kernels run in the interpreter (set before Triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run(args)
    return 0


if __name__ == "__main__":
    # `python zaya_kernels/tools/tune.py ...` also works before the compiled extension is built (a fresh GPU machine):
    # the tuner needs only zaya_kernels.triton, .reference and .tools, which aot-report's loader provides without the
    # package __init__ when `import zaya_kernels` fails.
    sys.path.insert(0, str(_REPO))
    _tool = Path(__file__).resolve().parent / "aot_report.py"
    _spec = importlib.util.spec_from_file_location("_zaya_aot_report", _tool)
    _aot_report = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_aot_report)
    _aot_report._ensure_package_importable()
    from zaya_kernels.tools.tune import main as _main

    sys.exit(_main())
