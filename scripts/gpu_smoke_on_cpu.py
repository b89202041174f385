"""Smoke the GPU-marked tests (and the benchmarks) on a CPU machine, to catch plain Python bugs before a GPU session.

The GPU tests have never run anywhere without a GPU: a wrong helper keyword, a misplaced op argument or a name that
does not exist would only show up in the rare GPU session. This pytest plugin runs them on CPU instead:

- `torch.cuda.is_available()` answers True (that is what tests/conftest.py's GPU skip reads, at import time: the
  plugin is loaded with -p, before the conftest), plus stand-ins for the torch.cuda calls the tests and the
  benchmarks make: synchronize (no-op), get_device_properties (H200-like fields), get_device_name, Event
  (time.perf_counter), is_current_stream_capturing (False), memory statistics, manual_seed.
- a `torch.overrides.TorchFunctionMode`, entered around every test's setup, call and teardown, rewrites a CUDA
  device ("cuda", "cuda:0", torch.device("cuda"), a device index) passed to any torch function (factories,
  `*_like`, `new_*`, `Tensor.to`, ...) to "cpu"; `Tensor.cuda()` / `Tensor.pin_memory()` return the tensor itself;
  `torch.Generator(device="cuda")` makes a CPU generator.
- TRITON_INTERPRET=1, so the Triton kernels run on the CPU tensors (slowly: hence a wall-clock budget per test,
  GPU_SMOKE_TIMEOUT seconds, default 60; a test past it fails as "timeout (too slow to smoke)", with where it was).
- two bf16 bugs of the Triton interpreter are patched (bf16 tl.dot on raw uint16 storage, truncating fp32 -> bf16
  casts; see patch_interpreter_bf16), or every bf16 Triton test would fail here for nothing.
- every failure is classified: `needs-gpu` (CUDA graphs, streams, the HIP/CUDA launchers of a CPU-only extension,
  a test that checks a tensor is on CUDA), `timeout`, or `BUG?` (everything else: read it). A per-file table is
  printed at the end and, with GPU_SMOKE_REPORT=path, written as JSON.

Run (one file at a time on a shared machine):

    TRITON_INTERPRET=1 PYTHONPATH=scripts python -m pytest tests/test_attention.py -m gpu -p gpu_smoke_on_cpu -q
    python scripts/gpu_smoke_on_cpu.py tests/test_attention.py            # the same (adds -m gpu -p ... itself)
    python scripts/gpu_smoke_on_cpu.py --bench [family ...]              # benchmarks/run.py's GPU path, see bench_main

Knobs (environment): GPU_SMOKE_TIMEOUT (seconds per test, 0 = none), GPU_SMOKE_REPORT (JSON path), GPU_SMOKE_LIVE
(a file that gets one line per finished test, for long runs),
GPU_SMOKE_SKIP_SIBLINGS_AFTER (after this many timeouts of one test function, skip its remaining parametrizations;
default 0 = never), GPU_SMOKE_NO_MODE=1 (only the torch.cuda stand-ins, no device remapping; for running a script),
GPU_SMOKE_BF16_FIX=0 (leave the interpreter's bf16 as it is), GPU_SMOKE_BENCH_CASES (--bench: cases per op, default 1).

Not a GPU: the library picks its CPU code paths from the tensors' device (the interpreter's tile configs, the
reference for auto: set the library's own ZAYA_KERNELS_BACKEND=triton to run Triton where a GPU's auto would), and
it reads index values to validate them on CPU tensors only (a test that passes an out-of-range slot on purpose, as
the GPU does not check, fails here with that ValueError: not a bug). Only the tests' and benchmarks' own Python is
exercised as on a GPU; the HIP/CUDA launchers and CUDA graphs are not (needs-gpu: read those tests by hand).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
import types

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

# ---------------------------------------------------------------------------------------------- torch.cuda stand-ins
_REAL = {name: getattr(torch.cuda, name, None) for name in (
    "is_available", "synchronize", "get_device_properties", "get_device_name", "get_device_capability", "Event",
    "current_device", "device_count", "is_current_stream_capturing", "manual_seed", "manual_seed_all", "empty_cache",
    "max_memory_allocated", "memory_allocated", "reset_peak_memory_stats", "mem_get_info", "set_device")}
_RealGenerator = torch.Generator

H200 = types.SimpleNamespace(
    name="NVIDIA H200", multi_processor_count=132, total_memory=150_754_820_096, major=9, minor=0,
    warp_size=32, max_threads_per_multi_processor=2048, L2_cache_size=50 * 1024 * 1024, is_integrated=False,
    is_multi_gpu_board=False, regs_per_multiprocessor=65536, gcnArchName="NVIDIA H200", uuid="GPU-smoke-on-cpu",
)


class _Event:
    """torch.cuda.Event stand-in: record() takes time.perf_counter, elapsed_time() is in milliseconds."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d == "cuda" or d.startswith("cuda:")
    return isinstance(d, int) and not isinstance(d, bool)


def _cpu_if_cuda(d):
    return "cpu" if d is not None and _is_cuda_device(d) else d


class _GeneratorMeta(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _RealGenerator)

    def __call__(cls, device="cpu"):
        return _RealGenerator(device=_cpu_if_cuda(device))


class _Generator(metaclass=_GeneratorMeta):
    """torch.Generator stand-in while a test runs: a CUDA generator is a CPU one."""


def install_cuda_standins():
    c = torch.cuda
    c.is_available = lambda: True
    c.synchronize = lambda device=None: None
    c.get_device_properties = lambda device=None: H200
    c.get_device_name = lambda device=None: H200.name
    c.get_device_capability = lambda device=None: (H200.major, H200.minor)
    c.Event = _Event
    c.current_device = lambda: 0
    c.device_count = lambda: 1
    c.set_device = lambda device: None
    c.is_current_stream_capturing = lambda: False
    c.manual_seed = lambda seed: None
    c.manual_seed_all = lambda seed: None
    c.empty_cache = lambda: None
    c.max_memory_allocated = lambda device=None: 0
    c.memory_allocated = lambda device=None: 0
    c.reset_peak_memory_stats = lambda device=None: None
    c.mem_get_info = lambda device=None: (H200.total_memory, H200.total_memory)


def patch_interpreter_bf16():
    """Two bf16 bugs of the Triton interpreter (3.x) that would make every bf16 GPU test fail here for nothing:

    - it stores bf16 as uint16 and its tl.dot multiplies those integers (1e10 errors on any bf16 tl.dot): bf16
      dot operands are converted to fp32 first (exact; a GPU accumulates bf16 products in fp32);
    - its fp32 -> bf16 cast truncates (about half of all values land one bf16 ulp off a GPU's round-to-nearest-
      even): that cast is done by torch instead (RNE, as on a GPU).

    Only the interpreter is patched, never zaya_kernels. GPU_SMOKE_BF16_FIX=0 leaves it as it is."""
    if os.environ.get("GPU_SMOKE_BF16_FIX", "1") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_smoke_patched", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, *rest):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, *rest)

    create_dot._smoke_patched = True
    builder.create_dot = create_dot

    import numpy as np

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(data.view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.cast_impl = cast_impl


# ---------------------------------------------------------------------------------------------- device remapping
_TO = {torch.Tensor.to}
_SELF = {torch.Tensor.cuda, torch.Tensor.pin_memory}


class CudaToCpu(TorchFunctionMode):
    """Rewrites every CUDA device argument of a torch function to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SELF:
            return args[0]
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func in _TO and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- classification
_NEEDS_GPU = [
    ("CUDA graph", ("CUDAGraph", "cuda.graph", "CUDA graphs", "_CudaStreamBase", "cuda.Stream", "current_stream",
                    "DecodeGraph", "graph capture", "needs a CUDA or ROCm device", "CUDA/HIP graph")),
    ("HIP/CUDA launchers (extension built without GPU kernels)", ("built without GPU kernels",
                                                                   "HIP/CUDA kernels need GPU tensors",
                                                                   "has no attribute 'residual_scale_rmsnorm",
                                                                   "gpu_build")),
    ("torch built without CUDA", ("Torch not compiled with CUDA", "Found no NVIDIA driver", "CUDA driver",
                                  "no CUDA GPUs", "torch._C._cuda")),
    ("test checks the tensors are on CUDA", ("device(type='cpu')", "is_cuda")),
]


class SmokeTimeout(BaseException):
    """Raised by the alarm (a BaseException so that `except Exception` in the code under test does not eat it)."""


def classify(excinfo) -> tuple[str, str]:
    if excinfo is None:
        return "passed", ""
    text = "".join(traceback.format_exception_only(excinfo.type, excinfo.value)).strip()
    if excinfo.errisinstance(SmokeTimeout):
        return "timeout", str(excinfo.value)
    full = text + "\n" + "".join(traceback.format_tb(excinfo.tb))
    for reason, needles in _NEEDS_GPU:
        if any(n in full for n in needles):
            return "needs-gpu", f"{reason}: {text.splitlines()[-1][:300]}"
    return "BUG?", text.splitlines()[-1][:400] if text else repr(excinfo.value)


def _where(frame) -> str:
    """Where a test was when its time ran out: its own innermost line in tests/, and the innermost kernel frame."""
    stack = traceback.extract_stack(frame)
    test_line = next((f"{os.path.relpath(f.filename)}:{f.lineno}" for f in reversed(stack)
                      if "/tests/" in f.filename or "/benchmarks/" in f.filename), "?")
    kernel = next((f"{os.path.relpath(f.filename)}:{f.lineno} ({f.name})" for f in reversed(stack)
                   if "zaya_kernels/" in f.filename), None)
    in_triton = any("/triton/" in f.filename for f in stack)
    what = f"at {test_line}"
    if kernel:
        what += f", in {kernel}" + (" (running a Triton kernel in the interpreter)" if in_triton else "")
    return what


# ---------------------------------------------------------------------------------------------- pytest hooks
_results: list[dict] = []
_timeouts_per_function: dict[str, int] = {}


def _timeout() -> int:
    return int(os.environ.get("GPU_SMOKE_TIMEOUT", "60"))


class _Entered:
    """The device-remapping mode and the Generator stand-in, around one test phase."""

    def __enter__(self):
        self.mode = None
        if os.environ.get("GPU_SMOKE_NO_MODE", "0") != "1":
            self.mode = CudaToCpu()
            self.mode.__enter__()
        torch.Generator = _Generator
        return self

    def __exit__(self, *exc):
        torch.Generator = _RealGenerator
        if self.mode is not None:
            self.mode.__exit__(*exc)
        return False


def pytest_configure(config):
    install_cuda_standins()
    patch_interpreter_bf16()
    config.addinivalue_line("markers", "gpu: needs a CUDA or ROCm GPU")


def _function_key(item) -> str:
    return f"{item.location[0]}::{getattr(item, 'originalname', item.name)}"


def pytest_runtest_setup(item):
    import pytest

    limit = int(os.environ.get("GPU_SMOKE_SKIP_SIBLINGS_AFTER", "0"))
    if limit and _timeouts_per_function.get(_function_key(item), 0) >= limit:
        pytest.skip(f"gpu-smoke: {limit} parametrization(s) of this test already timed out")


def _phase(item, run):
    timeout = _timeout()
    previous = None
    if timeout > 0 and hasattr(signal, "SIGALRM"):
        def on_alarm(signum, frame):
            raise SmokeTimeout(f"timeout (too slow to smoke, {timeout} s) {_where(frame)}")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(timeout)
    try:
        with _Entered():
            return (yield)
    finally:
        if previous is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


import pytest  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _phase(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    with _Entered():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    with _Entered():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "setup" and report.skipped:
        _results.append({"nodeid": item.nodeid, "file": item.location[0], "status": "skipped",
                         "detail": str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""})
        return
    if call.when == "call" or (call.when == "setup" and report.failed):
        if report.skipped:
            status, detail = "skipped", str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        else:
            status, detail = classify(call.excinfo)
            if status == "timeout":
                key = _function_key(item)
                _timeouts_per_function[key] = _timeouts_per_function.get(key, 0) + 1
        _results.append({"nodeid": item.nodeid, "file": item.location[0], "status": status, "detail": detail,
                         "seconds": round(call.duration, 1)})
        live = os.environ.get("GPU_SMOKE_LIVE")  # one line per test as it ends (long runs)
        if live:
            with open(live, "a") as fh:
                fh.write(f"{status:<9} {item.nodeid} [{call.duration:.1f} s] {detail}\n")


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    tr = terminalreporter
    tr.section("gpu smoke on CPU")
    files = sorted({r["file"] for r in _results})
    cols = ("passed", "BUG?", "needs-gpu", "timeout", "skipped")
    tr.write_line(f"{'file':<40} {'cases':>5} " + " ".join(f"{c:>9}" for c in cols))
    for f in files:
        rows = [r for r in _results if r["file"] == f]
        tr.write_line(f"{f:<40} {len(rows):>5} " + " ".join(f"{sum(r['status'] == c for r in rows):>9}" for c in cols))
    for status in ("BUG?", "needs-gpu", "timeout"):
        rows = [r for r in _results if r["status"] == status]
        if rows:
            tr.write_line(f"\n{status}:")
            for r in rows:
                tr.write_line(f"  {r['nodeid']}  [{r.get('seconds', '')} s]\n      {r['detail']}")
    path = os.environ.get("GPU_SMOKE_REPORT")
    if path:
        existing = []
        if os.path.exists(path):
            with open(path) as fh:
                existing = [r for r in json.load(fh) if r["file"] not in files]
        with open(path, "w") as fh:
            json.dump(existing + _results, fh, indent=1)


# torch.cuda.is_available must answer True before tests/conftest.py reads it (at its import).
install_cuda_standins()


def bench_main(families=None, per_call=None, cases_per_op=None) -> int:
    """Smoke benchmarks/run.py's GPU path (device "cuda", the ZAYA1-8B shapes) through the same stand-ins: every
    family's `cases("cuda")`, the first `cases_per_op` cases of each op (GPU_SMOKE_BENCH_CASES, default 1: the
    smallest shapes come first), each provider called once with GPU_SMOKE_TIMEOUT seconds (default 60). A provider
    that raises is recorded and the run goes on (on the GPU it would end benchmarks/run.py there)."""
    import importlib

    per_call = per_call or _timeout()
    cases_per_op = cases_per_op or int(os.environ.get("GPU_SMOKE_BENCH_CASES", "1"))
    install_cuda_standins()
    patch_interpreter_bf16()
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench_dir)
    import run as bench_run  # benchmarks/run.py

    outcomes = []

    def guarded(family, op, shape, provider, fn):
        def call():
            def on_alarm(signum, frame):
                raise SmokeTimeout(f"timeout (too slow to smoke, {per_call} s) {_where(frame)}")

            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(per_call)
            start = time.perf_counter()
            try:
                fn()
                status, detail = "passed", ""
            except SmokeTimeout as exc:
                status, detail = "timeout", str(exc)
            except Exception as exc:  # noqa: BLE001 (recorded and reported)
                status, detail = "BUG?", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                for reason, needles in _NEEDS_GPU:
                    full = detail + "".join(traceback.format_tb(exc.__traceback__))
                    if any(n in full for n in needles):
                        status, detail = "needs-gpu", f"{reason}: {detail}"
                        break
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
            outcomes.append(dict(family=family, op=op, shape=shape, provider=provider, status=status, detail=detail,
                                 seconds=round(time.perf_counter() - start, 1)))
            print(f"  {status:<9} {family}/{op} {provider} {shape} {detail}", flush=True)
        return call

    original_import = importlib.import_module

    def limited_import(name, *args, **kwargs):
        module = original_import(name, *args, **kwargs)
        if not name.startswith("bench_") or getattr(module, "_smoke_limited", False):
            return module
        family, cases = name[len("bench_"):], module.cases

        def limited(device):
            # Building a case can be slow here too (a case may run a kernel to set up its backward): the next case
            # gets GPU_SMOKE_TIMEOUT seconds to appear, else the family ends there (said so in the summary).
            seen = {}
            generator = cases(device)

            def on_alarm(signum, frame):
                raise SmokeTimeout(f"building the next case took over {per_call} s {_where(frame)}")

            try:
                while True:
                    previous = signal.signal(signal.SIGALRM, on_alarm)
                    signal.alarm(per_call)
                    try:
                        op, shape, bytes_moved, providers = next(generator)
                    except StopIteration:
                        return
                    except SmokeTimeout as exc:
                        outcomes.append(dict(family=family, op="cases()", shape={}, provider="-", status="timeout",
                                             detail=f"{exc}; the family's later cases were not reached", seconds=0))
                        print(f"  timeout   {family}: {exc}", flush=True)
                        return
                    finally:
                        signal.alarm(0)
                        signal.signal(signal.SIGALRM, previous)
                    seen[op] = seen.get(op, 0) + 1
                    if seen[op] > cases_per_op:
                        continue
                    yield op, shape, bytes_moved, {p: guarded(family, op, shape, p, fn) for p, fn in providers.items()}
            except Exception as exc:  # noqa: BLE001 (building the cases failed: as fatal on the GPU)
                outcomes.append(dict(family=family, op="cases()", shape={}, provider="-", status="BUG?",
                                     detail=f"{type(exc).__name__}: {exc}"[:400], seconds=0))
                print(f"  BUG?      {family}: cases() raised {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()

        module.cases, module._smoke_limited = limited, True
        return module

    bench_run.importlib.import_module = limited_import
    bench_run.median_seconds = lambda fn, device, repeats: (fn(), 1e-3)[1]
    out = os.environ.get("GPU_SMOKE_BENCH_OUT", "/tmp/gpu_smoke_bench")
    with _Entered():
        try:
            bench_run.main(sum((["--only", f] for f in (families or [])), []) + ["--out", out])
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            outcomes.append(dict(family="run.py", op="-", shape={}, provider="-", status="BUG?",
                                 detail=traceback.format_exc().splitlines()[-1], seconds=0))
    bench_run.importlib.import_module = original_import
    print("\nbenchmark smoke:")
    for status in ("passed", "BUG?", "needs-gpu", "timeout"):
        print(f"  {status}: {sum(o['status'] == status for o in outcomes)}")
    for o in outcomes:
        if o["status"] != "passed":
            print(f"  {o['status']:<9} {o['family']}/{o['op']} {o['provider']} {o['shape']}\n      {o['detail']}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--bench"]:
        return bench_main(argv[1:] or None)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    if "-m" not in argv:
        argv = ["-m", "gpu", *argv]
    return pytest.main(["-p", "gpu_smoke_on_cpu", "-p", "no:cacheprovider", *argv])


if __name__ == "__main__":
    sys.exit(main())
