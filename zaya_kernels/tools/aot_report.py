"""Ahead-of-time compile report for every registered Triton kernel configuration.

    python -m zaya_kernels aot-report [--arch gfx942,gfx950,sm_90] [--json] [--kernel SUBSTR]
                                      [--divisible pointers|all] [--launches FILE]
    python -m zaya_kernels.tools.aot_report ...          (same, standalone)

Each configuration registered in `zaya_kernels.triton._aot.AOT_REGISTRY` is compiled with `triton.compile` for each
requested target; no GPU is needed. By default the unspecialised variant; --divisible compiles the one Triton's
launcher builds when the pointers (or the pointers and the integers) are divisible by 16, as at ZAYA1's sizes.
The report shows register use, spills, shared memory (LDS), the number of matrix instructions (v_mfma / wgmma /
mma) and, on AMD, the occupancy the compiler expects.

With --launches FILE it compiles recorded launches instead (`describe_launch`; tests/test_aot_report.py records
every launch the ops make at ZAYA1's sizes): each exactly as Triton's JIT would specialise it on each target.

Exit status: 1 if any record failed to compile, spills, overflows LDS, or is a GEMM-like config with no matrix
instruction in a loop; else 0.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

# Triton warns on every compile when this is unset; the default (fusion on) is what the launchers use anyway.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

TARGET_NAMES = ("gfx942", "gfx950", "sm_90")

# Record fields, in table order. Every record returned by `compile_record` has exactly these keys.
RECORD_FIELDS = (
    "kernel",  # registry name of the kernel
    "config",  # AotConfig.label
    "target",  # "gfx942", "gfx950" or "sm_90"
    "ok",  # True when the compile succeeded (all other numbers are None when it did not)
    "error",  # compile error text, None when ok
    "vgpr",  # AMD: VGPRs per lane (arch VGPRs + AGPRs); NVIDIA: registers per thread (ptxas "Used N registers")
    "sgpr",  # AMD: SGPRs per wave (.sgpr_count); NVIDIA: None
    "spills",  # values spilled to memory. AMD: VGPR spills (+ SGPR spills when scratch is used); NVIDIA: spill store +
    # spill load bytes (ptxas -v)
    "sgpr_lane_spills",  # AMD: SGPRs parked in VGPR lanes (v_writelane: no memory traffic, not a failure); else None
    "lds_bytes",  # shared memory / LDS bytes per workgroup (see _amd_lds_bytes for AMD)
    "matrix_instructions",  # AMD: lines with v_mfma / v_smfmac; NVIDIA: lines with wgmma.mma_async or mma.sync
    "matrix_in_loops",  # those of them inside a loop body (between a label and a later branch back to it): a
    # GEMM-like kernel must multiply in its K loop, not only in a prologue or epilogue
    "matrix_expected",  # AotConfig.matrix_expected: the config is GEMM-like and must use matrix instructions
    "vector_loads",  # global loads of 16 bytes per lane (AMD: global/buffer_load_dwordx4, incl. to LDS; NVIDIA:
    # ld.global .v4.b32 / .v2.b64 and 16-byte cp.async): how a bandwidth-bound kernel should stream its data
    "occupancy",  # AMD: waves per SIMD from the "; Occupancy: N" line; NVIDIA: None
    "num_warps",  # AotConfig.num_warps
)

_TRUE_WORDS = ("1", "true", "yes", "on", "y")


def _gpu_target(target: str):
    from triton.backends.compiler import GPUTarget

    if target == "gfx942":
        return GPUTarget("hip", "gfx942", 64)
    if target == "gfx950":
        return GPUTarget("hip", "gfx950", 64)
    if target == "sm_90":
        return GPUTarget("cuda", 90, 32)
    raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGET_NAMES)}")


def _jit_function(kernel):
    """The JITFunction under any @triton.autotune / @triton.heuristics wrappers (they keep it in `.fn`)."""
    from triton.runtime.jit import JITFunction

    inner = kernel
    for _ in range(8):
        if isinstance(inner, JITFunction):
            return inner
        inner = getattr(inner, "fn", None)
    # Under TRITON_INTERPRET=1, @triton.jit builds an InterpretedFunction, which has no compiler front end.
    raise TypeError(f"{kernel!r} is not a triton JITFunction (was it defined with TRITON_INTERPRET=1 set?)")


# ---------------------------------------------------------------------------------------------------------------
# AMD: everything is in the amdgcn assembly text.

def _int_after(pattern: str, text: str):
    m = re.search(pattern, text, flags=re.MULTILINE)
    return int(m.group(1)) if m else None


def _amd_lds_bytes(asm: str, metadata_shared) -> int:
    """LDS per workgroup: the largest of the static LDS in the asm and Triton's shared-memory size.

    Triton's AMD backend allocates its LDS dynamically at launch (`metadata.shared`), so the asm's "; LDSByteSize"
    and `.group_segment_fixed_size` read 0 for kernels that do use LDS; the max covers both kinds.
    """
    values = [
        _int_after(r"^\s*;\s*LDSByteSize:\s*(\d+)", asm),
        _int_after(r"^\s*(?:-\s+)?\.group_segment_fixed_size:\s*(\d+)", asm),
        int(metadata_shared) if metadata_shared is not None else None,
    ]
    return max(v for v in values if v is not None) if any(v is not None for v in values) else 0


# 16-byte global loads (see RECORD_FIELDS "vector_loads")
_AMD_VECTOR_LOAD = re.compile(r"^\s*(?:global|buffer)_load_(?:lds_)?dwordx4\b", re.MULTILINE)
_PTX_VECTOR_LOAD = re.compile(r"\bld\.global\S*\.(?:v4\.[bfu]32|v2\.[bfu]64)\b"
                              r"|\bcp\.async\.c[ag]\.\S*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(?:16|0x10)\b")


_AMD_MATRIX = re.compile(r"^\s*v_(?:mfma|smfmac)\w*")
_AMD_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_AMD_BRANCH = re.compile(r"^\s*s_(?:cbranch_\w+|branch)\s+(\.LBB\d+_\d+)")
_PTX_MATRIX = re.compile(r"\bwgmma\.mma_async|\bmma\.sync")
_PTX_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")


def _matrix_counts(text: str, matrix, label, branch) -> tuple[int, int]:
    """(lines with a matrix instruction, those inside a loop body: from a label to a later branch back to it)."""
    lines = text.splitlines()
    label_line, in_loop = {}, set()
    for i, line in enumerate(lines):
        m = label.match(line)
        if m:
            label_line[m.group(1)] = i
        m = branch.search(line)
        if m and m.group(1) in label_line:  # a backward branch closes a loop
            in_loop.update(range(label_line[m.group(1)], i + 1))
    hits = [i for i, line in enumerate(lines) if matrix.search(line)]
    return len(hits), sum(1 for i in hits if i in in_loop)


def _amd_fields(compiled) -> dict:
    asm = compiled.asm["amdgcn"]
    # "; TotalNumVgprs" counts arch VGPRs + AGPRs (one register file on CDNA3/4); .vgpr_count is the fallback.
    vgpr = _int_after(r"^\s*;\s*TotalNumVgprs:\s*(\d+)", asm)
    if vgpr is None:
        vgpr = _int_after(r"^\s*(?:-\s+)?\.vgpr_count:\s*(\d+)", asm)
    # Spills that reach memory: VGPR spills always do; SGPR spills first park in VGPR lanes (v_writelane, no memory
    # traffic) and reach scratch only when the kernel has scratch memory. Lane-parked SGPRs are reported apart.
    vgpr_spills = _int_after(r"^\s*(?:-\s+)?\.vgpr_spill_count:\s*(\d+)", asm) or 0
    sgpr_spills = _int_after(r"^\s*(?:-\s+)?\.sgpr_spill_count:\s*(\d+)", asm) or 0
    scratch = _int_after(r"^\s*;\s*ScratchSize:\s*(\d+)", asm) or 0
    matrix, matrix_in_loops = _matrix_counts(asm, _AMD_MATRIX, _AMD_LABEL, _AMD_BRANCH)
    return {
        "vgpr": vgpr,
        "sgpr": _int_after(r"^\s*(?:-\s+)?\.sgpr_count:\s*(\d+)", asm),
        "spills": vgpr_spills + (sgpr_spills if scratch else 0),
        "sgpr_lane_spills": 0 if scratch else sgpr_spills,
        "lds_bytes": _amd_lds_bytes(asm, getattr(compiled.metadata, "shared", None)),
        "matrix_instructions": matrix,
        "matrix_in_loops": matrix_in_loops,
        "vector_loads": len(_AMD_VECTOR_LOAD.findall(asm)),
        "occupancy": _int_after(r"^\s*;\s*Occupancy:\s*(\d+)", asm),
    }


# ---------------------------------------------------------------------------------------------------------------
# NVIDIA: register and spill counts are only known to ptxas (the driver reports them at load time, needing a GPU),
# so run the ptxas that Triton ships on the PTX again with -v.

def _find_ptxas(capability: int = 90) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(capability).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older/newer Triton layouts; fall through to the PATH
        pass
    for candidate in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError("ptxas not found (Triton's bundled one, PATH, /usr/local/cuda/bin)")


def _triton_ptxas_flags() -> list[str]:
    """The register-allocation flag Triton adds to its ptxas call: 3.9 passes --regAllocOptLevel=2 (a ptxas 13
    workaround), 3.6 does not; the flag moves register counts and spills, so follow the installed Triton."""
    try:
        import inspect

        from triton.backends.nvidia.compiler import CUDABackend

        source = inspect.getsource(CUDABackend.make_cubin)
    except Exception:  # noqa: BLE001 - no NVIDIA backend source: assume the newer behaviour
        return ["--regAllocOptLevel=2"]
    return ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in source else []


def _ptxas_usage(ptx: str, gpu_name: str = "sm_90a") -> tuple[int, int]:
    """(registers per thread, spill store + spill load bytes) from `ptxas -v` on `ptx`."""
    with tempfile.TemporaryDirectory(prefix="zaya_aot_") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Same flags as the installed Triton's own cubin step, so the counts match what ships.
        cmd = [_find_ptxas(), "-lineinfo", "-v", *_triton_ptxas_flags(), f"--gpu-name={gpu_name}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log}")
    regs = _int_after(r"Used\s+(\d+)\s+registers", log)
    m = re.search(r"(\d+)\s+bytes spill stores,\s*(\d+)\s+bytes spill loads", log)
    if regs is None or m is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return regs, int(m.group(1)) + int(m.group(2))


def _nvidia_fields(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_usage(ptx)
    matrix, matrix_in_loops = _matrix_counts(ptx, _PTX_MATRIX, _PTX_LABEL, _PTX_BRANCH)
    return {
        "vgpr": regs,
        "sgpr": None,
        "spills": spills,
        "lds_bytes": int(getattr(compiled.metadata, "shared", 0) or 0),
        "matrix_instructions": matrix,
        "matrix_in_loops": matrix_in_loops,
        "vector_loads": len(_PTX_VECTOR_LOAD.findall(ptx)),
        "occupancy": None,
    }


# ---------------------------------------------------------------------------------------------------------------

DIVISIBLE_CHOICES = ("pointers", "all")


def _divisibility_hints(config, divisible: str) -> dict:
    """The attributes Triton's launcher gives a launch whose arguments are 16-divisible: every pointer 16-byte aligned
    (divisible "pointers": torch allocates at 256-byte boundaries and ZAYA1's row strides keep views aligned), and
    with divisible "all" every integer argument a multiple of 16 too (ZAYA1's sizes are: H = I = 2048, R 256, D 128,
    and so is any T or stride that is). tt.divisibility 16 turns on vector loads and wider software pipelining, which
    can change register and LDS use."""
    if divisible not in DIVISIBLE_CHOICES:
        raise ValueError(f"divisible must be one of {DIVISIBLE_CHOICES}, got {divisible!r}")
    integers = ("i32", "i64", "u32", "u64") if divisible == "all" else ()
    return {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(config.signature.values())
            if kind.startswith("*") or kind in integers}


def _failed_record(kernel: str, config: str, target: str, error: str | None) -> dict:
    record = {k: None for k in RECORD_FIELDS}
    record.update(kernel=kernel, config=config, target=target, ok=False, error=error, matrix_expected=False)
    return record


def _record(name: str, label: str, target: str, matrix_expected: bool, num_warps: int, build) -> dict:
    """The record (fields: RECORD_FIELDS) of `build(gpu_target)`, a triton.compile; ok=False and the error text when
    it raises (a failing compile is a result to report, not a crash)."""
    record = _failed_record(name, label, target, None)
    record.update(matrix_expected=bool(matrix_expected), num_warps=num_warps)
    try:
        gpu = _gpu_target(target)
        compiled = build(gpu)
        record.update(_amd_fields(compiled) if gpu.backend == "hip" else _nvidia_fields(compiled))
        record["ok"] = True
    except Exception as exc:  # noqa: BLE001
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def compile_record(name: str, kernel, config, target: str, divisible: str | None = None) -> dict:
    """Compile one AotConfig of `kernel` for `target` ("gfx942", "gfx950" or "sm_90") and describe the result.

    Never raises for a compile problem: the record then has ok=False and the error text (fields: RECORD_FIELDS).
    divisible ("pointers" or "all"): compile the variant Triton's launcher builds for 16-divisible arguments
    (`_divisibility_hints`) instead of the unspecialised one.
    """
    def build(gpu):
        import triton
        from triton.compiler import ASTSource

        src = ASTSource(fn=_jit_function(kernel), signature=dict(config.signature),
                        constexprs=dict(config.constexprs),
                        attrs=_divisibility_hints(config, divisible) if divisible else None)
        return triton.compile(src, target=gpu, options={"num_warps": config.num_warps,
                                                        "num_stages": config.num_stages})

    return _record(name, config.label, target, config.matrix_expected, config.num_warps, build)


# ---------------------------------------------------------------------------------------------------------------
# Recorded launches: what Triton's JIT builds for a given launch, compiled for any target.

def describe_launch(kernel, args: dict) -> dict:
    """A Triton launch as JSON data for `compile_launches`: {"kernel": the kernel function's name, "args": {argument
    name: value}} with the launch options (num_warps, num_stages) among the arguments and every tensor replaced by
    {"tensor": dtype name, "aligned": data_ptr() % 16 == 0}, all that Triton's specialisation reads of it."""
    def value(v):
        if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
            return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
        return v

    return {"kernel": getattr(kernel, "__name__", None) or kernel.fn.__name__,
            "args": {name: value(v) for name, v in args.items()}}


class _LaunchTensor:
    """A tensor argument of a described launch: the dtype and an address as aligned as the real one was."""

    def __init__(self, dtype: str, aligned: bool):
        import torch

        self.dtype = getattr(torch, dtype)
        self.aligned = aligned

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


def _launch_source(jit, args: dict, gpu):
    """(ASTSource, options) that Triton's JITFunction.run builds for a launch with `args` on `gpu`: its own argument
    binder and specialisation (16-divisible pointers and integers, integers equal to 1 as constants, None
    arguments as constexprs) and option parsing. Triton internals (create_function_from_signature, _pack_args) as
    of the version in scripts/constraints.txt."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(gpu)
    kwargs = {name: _LaunchTensor(v["tensor"], v["aligned"]) if isinstance(v, dict) else v
              for name, v in args.items()}
    kwargs["debug"] = bool(jit.debug)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs), options


def launch_matches(config, args: dict) -> bool:
    """True when a launch with `args` ({argument name: value}, num_warps and num_stages among them) is `config`:
    the same constexprs, num_warps and num_stages (a launch that leaves num_stages to Triton gets its backend's
    default, another compile)."""
    return ((config.num_warps, config.num_stages) == (args.get("num_warps"), args.get("num_stages"))
            and all(args.get(key, "absent") == value for key, value in config.constexprs.items()))


def compile_launches(launches: list[dict], archs) -> list[dict]:
    """Compile each distinct described launch (`describe_launch`) for every target in `archs`, as Triton's JIT would
    on that GPU: one record per (launch specialisation, target). A record's config is the registered configuration
    the launch matches (same constexprs, num_warps and num_stages) with the arguments Triton specialised (16: divisible
    by 16, =1: the constant 1); a launch that matches none is a failed record ("not a registered configuration")."""
    import triton

    registry, _ = load_registry()
    entries = {}  # kernel function name -> [(registry name, AotConfig)]
    for name in sorted(registry):
        jit = _jit_function(registry[name].kernel)
        entries.setdefault(jit.__name__, (jit, []))[1].extend((name, c) for c in registry[name].configs)
    records, seen = [], set()
    for target in archs:
        gpu = _gpu_target(target)
        for launch in launches:
            jit, configs = entries.get(launch["kernel"], (None, []))
            args = launch["args"]
            matches = [(name, c) for name, c in configs if launch_matches(c, args)]
            if not matches:
                records.append(_failed_record(launch["kernel"], "-", target,
                                              "not a registered configuration: " + json.dumps(args)[:2000]))
                continue
            try:
                src, options = _launch_source(jit, args, gpu)
            except Exception as exc:  # noqa: BLE001 - reported as a failed record
                records.append(_failed_record(matches[0][0], matches[0][1].label, target,
                                              f"{type(exc).__name__}: {exc}"))
                continue
            # the label of the registered config with the launch's pointer dtypes too, where one has them
            same_dtypes = [(name, c) for name, c in matches
                           if all(src.signature.get(a, t) == t for a, t in c.signature.items() if t[0] == "*"
                                  and src.signature.get(a, "")[:1] == "*")]
            name, config = (same_dtypes or matches)[0]
            key = (target, name, json.dumps(src.signature, sort_keys=True), repr(sorted(src.constants.items())),
                   repr(sorted(src.attrs.items())), options.num_warps, options.num_stages)
            if key in seen:
                continue
            seen.add(key)
            names = list(src.signature)
            special = [f"16:{names[path[0]]}" for path, attr in src.attrs.items()
                       if attr and src.signature[names[path[0]]][0] != "*"]  # constexprs have empty attrs
            special += [f"=1:{names[path[0]]}" for path, v in src.constants.items()
                        if type(v) is int and v == 1 and names[path[0]] not in config.constexprs]
            label = config.label + ("" if same_dtypes else " (other dtypes)") + \
                (" | " + " ".join(special) if special else "")
            records.append(_record(name, label, target, config.matrix_expected, options.num_warps,
                                   lambda gpu, src=src, options=options: triton.compile(
                                       src, target=gpu, options=options.__dict__)))
    return records


# Shared memory one workgroup / block may use: a config over it compiles but cannot launch.
LDS_LIMIT_BYTES = {"gfx942": 64 * 1024, "gfx950": 160 * 1024, "sm_90": 227 * 1024}


def record_problem(record: dict, loops: bool = True) -> str | None:
    """What is wrong with a record, or None: "FAIL" (the compile failed), "SPILL" (any spill), "LDS>MAX" (shared
    memory over the target's limit) or "NO-MMA" (a GEMM-like config without matrix instructions in a loop; with
    loops=False, without any: a launch's specialisation may fold a loop with a constant trip count away, e.g. one
    tile per chunk, or a two-step loop peeled by the pipeliner, while the registered config keeps it)."""
    if not record["ok"]:
        return "FAIL"
    if (record["spills"] or 0) > 0:
        return "SPILL"
    if (record["lds_bytes"] or 0) > LDS_LIMIT_BYTES.get(record["target"], float("inf")):
        return "LDS>MAX"
    if record["matrix_expected"] and not record["matrix_in_loops" if loops else "matrix_instructions"]:
        return "NO-MMA"
    return None


def record_is_bad(record: dict, loops: bool = True) -> bool:
    """True for a failed compile, any spill, LDS/shared memory over the target's limit, or a GEMM-like config
    without matrix instructions (in a loop, unless loops=False; see record_problem)."""
    return record_problem(record, loops) is not None


# ---------------------------------------------------------------------------------------------------------------
# Loading the registry.

_PKG_DIR = Path(__file__).resolve().parent.parent  # .../zaya_kernels


def _ensure_package_importable() -> None:
    """Make `zaya_kernels.triton.*` importable even if the top-level package's __init__ cannot run here.

    The report needs only the Triton modules. If `import zaya_kernels` fails (e.g. the compiled extension is not
    built), a bare package object pointing at the same folder stands in for it, so its __init__ is skipped.
    """
    if str(_PKG_DIR.parent) not in sys.path:
        sys.path.insert(0, str(_PKG_DIR.parent))
    try:
        importlib.import_module("zaya_kernels")
        return
    except Exception as exc:  # noqa: BLE001
        print(f"aot-report: `import zaya_kernels` failed ({type(exc).__name__}: {exc}); "
              "loading zaya_kernels.triton without the package __init__", file=sys.stderr)
    stub = types.ModuleType("zaya_kernels")
    stub.__path__ = [str(_PKG_DIR)]
    stub.__file__ = None
    stub.__spec__ = importlib.util.spec_from_loader("zaya_kernels", loader=None, is_package=True)
    stub.__spec__.submodule_search_locations = [str(_PKG_DIR)]
    sys.modules["zaya_kernels"] = stub


def load_registry() -> tuple[dict, list[tuple[str, str]]]:
    """Import every public module of zaya_kernels.triton (they register at import time).

    Returns (AOT_REGISTRY, [(module name, error text) for modules that failed to import]).
    """
    _ensure_package_importable()
    aot = importlib.import_module("zaya_kernels.triton._aot")
    failures = []
    for info in sorted(pkgutil.iter_modules([str(_PKG_DIR / "triton")]), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        modname = f"zaya_kernels.triton.{info.name}"
        try:
            importlib.import_module(modname)
        except Exception:  # noqa: BLE001 - reported as a failed record
            failures.append((modname, traceback.format_exc()))
    return aot.AOT_REGISTRY, failures


def run_report(archs, kernel_filter: str | None = None, divisible: str | None = None) -> list[dict]:
    """Compile every registered config whose kernel name contains `kernel_filter`, for every target in `archs`
    (divisible: the variant for 16-divisible pointers or all arguments, see compile_record).

    A kernel module that fails to import yields one ok=False record per target (kernel "<import MODULE>").
    """
    archs = list(archs)
    for a in archs:
        _gpu_target(a)  # reject unknown names before compiling anything
    registry, failures = load_registry()
    records = []
    for modname, err in failures:
        if kernel_filter and kernel_filter not in modname:
            continue
        records.extend(_failed_record(f"<import {modname}>", "-", target, err) for target in archs)
    keys = [(name, index, target) for name in sorted(registry) if not (kernel_filter and kernel_filter not in name)
            for index in range(len(registry[name].configs)) for target in archs]
    records.extend(compile_record(name, registry[name].kernel, registry[name].configs[index], target, divisible)
                   for name, index, target in keys)
    return records


# ---------------------------------------------------------------------------------------------------------------
# CLI.

def format_table(records: list[dict], loops: bool = True) -> str:
    """Aligned text table, one row per record (status: record_problem with `loops`); errors follow the table."""
    headers = ("kernel", "config", "target", "status", "vgpr", "sgpr", "spills", "lane", "lds", "mma", "vec16", "occ",
               "warps")

    def cell(v):
        return "-" if v is None else str(v)

    def mma(r):
        return ("-" if not r["ok"] else f"{r['matrix_in_loops']}/{r['matrix_instructions']}") + \
            ("*" if r["matrix_expected"] else "")

    rows = [(r["kernel"], r["config"], r["target"], record_problem(r, loops) or "ok", cell(r["vgpr"]), cell(r["sgpr"]),
             cell(r["spills"]), cell(r["sgpr_lane_spills"]), cell(r["lds_bytes"]), mma(r), cell(r["vector_loads"]),
             cell(r["occupancy"]), cell(r["num_warps"])) for r in records]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    numeric = set(range(4, len(headers)))

    def line(vals):
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(vals, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows]
    out.append("(mma: matrix instructions in loops / in all, * where expected; vgpr on sm_90 = registers/thread; "
               "spills = spills to memory; lane = SGPRs parked in VGPR lanes on AMD; lds in bytes; vec16 = 16-byte "
               "global loads; occ = waves/SIMD on AMD)")
    for r in records:
        if r["error"]:
            out.append(f"\n{r['kernel']} [{r['config']}] on {r['target']}:\n  " + r["error"].replace("\n", "\n  "))
    return "\n".join(out)


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_WORDS


def _rerun_without_interpreter(argv: list[str]) -> int:
    # Under TRITON_INTERPRET=1 @triton.jit builds interpreter functions, which triton.compile cannot take:
    # run the report again in a clean child process and pass its output and status through.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    pythonpath = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(_PKG_DIR.parent) + (os.pathsep + pythonpath if pythonpath else "")
    # Load this file by path rather than `-m zaya_kernels.tools.aot_report`, so a package __init__ that cannot
    # import here (extension not built) does not stop the report; see _ensure_package_importable.
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('_zaya_aot_report', sys.argv[1]); "
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
            "sys.exit(mod.main(sys.argv[2:]))")
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve()), *argv], env=env).returncode


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m zaya_kernels aot-report",
                                     description="Compile every registered Triton config ahead of time and report "
                                                 "registers, spills, LDS and matrix instructions.")
    parser.add_argument("--arch", default=",".join(TARGET_NAMES),
                        help=f"comma-separated targets (default: {','.join(TARGET_NAMES)})")
    parser.add_argument("--json", action="store_true", help="print the records as a JSON list")
    parser.add_argument("--kernel", default=None, help="only kernels whose registry name contains this substring")
    parser.add_argument("--divisible", choices=DIVISIBLE_CHOICES, default=None,
                        help="compile the variant Triton builds when every pointer ('pointers'), or every pointer "
                             "and integer ('all'), is divisible by 16: what launches with torch tensors at ZAYA1's "
                             "sizes run (CI checks the unspecialised one, and every ZAYA1-size launch exactly "
                             "with --launches)")
    parser.add_argument("--launches", default=None, metavar="FILE",
                        help="instead of the registry, compile the launches described in FILE (a JSON list of "
                             "describe_launch records) as Triton's JIT would specialise them on each target")
    args = parser.parse_args(argv)
    if args.launches and (args.kernel or args.divisible):
        parser.error("--launches compiles the described launches as they are: no --kernel or --divisible")
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in TARGET_NAMES]
    if unknown or not archs:
        parser.error(f"unknown --arch {','.join(unknown) or '(empty)'}; choose from {','.join(TARGET_NAMES)}")

    if _interpret_mode():
        return _rerun_without_interpreter(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    start = time.perf_counter()
    if args.launches:
        with open(args.launches) as f:
            records = compile_launches(json.load(f), archs)
    else:
        records = run_report(archs, args.kernel, args.divisible)
    elapsed = time.perf_counter() - start
    loops = not args.launches  # matrix instructions in loops: checked on the registered configs (record_problem)
    bad = [r for r in records if record_is_bad(r, loops)]
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        if records:
            print(format_table(records, loops))
        else:
            print("no registered kernel configurations" + (f" match {args.kernel!r}" if args.kernel else ""))
        print(f"\n{len(records)} records in {elapsed:.1f} s; {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
