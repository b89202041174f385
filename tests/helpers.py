"""The one place that decides test tolerances, and small shared test utilities."""
from __future__ import annotations

import collections
import contextlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def tolerance(dtype: torch.dtype, reduction: int = 1) -> float:
    """Relative tolerance for a result stored in `dtype` that came out of fp32 sums of `reduction` terms.

    Two roundings of the stored result (the kernel and the reference may land on neighbouring values) plus the
    fp32 accumulation error, which grows like sqrt(reduction) for the blocked/tree sums both sides use.
    """
    fp32_sum = 8 * _UNIT_ROUNDOFF[torch.float32] * math.sqrt(max(1, reduction))
    return 4 * _UNIT_ROUNDOFF[dtype] + fp32_sum


def assert_close(actual, expected, *, dtype=None, reduction: int = 1, scale: float = 0.0, what: str = ""):
    """|actual - expected| <= tol * (|expected| + max(max|expected|, scale)) elementwise, tol from `tolerance`.

    The second term makes the bound absolute at the tensor's scale. `scale` raises it for results that are the
    difference of larger terms (a cancelling gradient is only as accurate as the terms it came from).
    """
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one side is None"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dtype = dtype or expected.dtype
    tol = tolerance(dtype, reduction)
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(e.abs().max().item(), scale)
    err = (a - e).abs()
    bound = tol * (e.abs() + scale)
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: max error {err.max().item():.3e} (tol {tol:.2e}, scale {scale:.3e}); worst element "
        f"{a.flatten()[worst].item()} vs {e.flatten()[worst].item()}"
    )


# The warp sizes the emulation runs the HIP/CUDA kernels with: NVIDIA's 32 and AMD CDNA's 64 (gfx942, gfx950).
EMULATED_WARP_SIZES = (32, 64)


def compile_host_emulation(driver_source: str, tmp_dir, warp_size: int = 32):
    """Build kernels/*.cuh device code for the host (kernels/compat.cuh's ZAYA_HOST_EMULATION runs each block on CPU
    threads, in warps of `warp_size` threads) together with a test's extern "C" driver, and load it with ctypes.

    Skips when no C++20 host compiler exists, unless ZAYA_REQUIRE_TOOLCHAINS=1 (CI), where that fails.
    """
    import ctypes
    import os
    import subprocess
    from pathlib import Path

    import pytest

    from zaya_kernels.tools import gpu_compile_check

    source, library = Path(tmp_dir) / "emu.cpp", Path(tmp_dir) / "emu.so"
    source.write_text(driver_source)
    try:
        cmd = gpu_compile_check.host_emulation_command(source, library, warp_size)
    except gpu_compile_check.ToolchainMissing as exc:
        if os.environ.get("ZAYA_REQUIRE_TOOLCHAINS", "0") == "1":
            pytest.fail(f"{exc} and ZAYA_REQUIRE_TOOLCHAINS=1")
        pytest.skip(str(exc))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(library))


def perturb_zaya_parameters(model):
    """Move every ZAYA-specific parameter of a transformers-named ZAYA model away from its init value (biases,
    scales, temperatures, norms, balancing biases) so that a wrong formula or a tensor on the wrong name changes the
    output; raise the skip class's balancing bias on odd layers so that some tokens choose it. In place, no grad."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
            elif any(k in name for k in ("scale", "temp", "norm", "layernorm")):
                p.uniform_(0.5, 1.5)
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate.balancing_biases.uniform_(-0.2, 0.2)
            layer.mlp.gate.balancing_biases[-1] = 0.3 if i % 2 else -0.2
    return model


def random_paged_caches(num_blocks, block_size, num_kv, head_dim, dtype, layout, gen, device="cpu"):
    """Random k / v caches [num_blocks, block_size, n_kv, D] in vLLM's layout: "nhd" contiguous, or "hnd" allocated
    [num_blocks, n_kv, block_size, D] and transposed (other strides, the last dim still contiguous)."""
    def one():
        if layout == "hnd":
            hnd = torch.randn(num_blocks, num_kv, block_size, head_dim, generator=gen)
            return hnd.to(dtype).to(device).transpose(1, 2)
        return torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(dtype).to(device)

    return one(), one()


def stacked_row_views(tensors, pad: int = 0):
    """The 2D `tensors` [rows, width_i] copied into column slices of one [rows, sum(width_i) + pad] buffer (the layout
    of zaya_kernels.modules' stacked q/k/v projection output), with `pad` NaN columns after them: row-strided views,
    so a kernel that ignores the row stride reads NaN or another slice."""
    widths = [t.shape[1] for t in tensors]
    first = tensors[0]
    buf = torch.full((first.shape[0], sum(widths) + pad), float("nan"), dtype=first.dtype, device=first.device)
    views = buf[:, :sum(widths)].split(widths, dim=-1)
    for view, value in zip(views, tensors):
        view.copy_(value)
    return views


class _AtenWork(TorchDispatchMode):
    """Counts the aten ops that do work dispatched inside it, by op name ("mm", "cat", "copy_"); views and
    reshapes are not work, and zaya ops are left to the Triton count (their kernels)."""

    NOT_WORK = {"_unsafe_view", "lift_fresh"}  # reshape's copy-free result and a constant's wrapping

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace != "zaya" and not func.is_view and name not in self.NOT_WORK:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _interpreter_launch_hook(on_launch, run_them: bool):
    """Inside the `with`: on_launch(kernel, {argument name: value}) for every Triton launch through the interpreter
    (TRITON_INTERPRET=1, as the tests run; warm-up compiles are not launches), which then runs or, with run_them
    False, does not (its outputs stay unwritten). The launch options the launcher passed (num_warps, num_stages) are
    among the arguments, one left to Triton's default is absent; `kernel` is the object the AOT registry holds."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def hooked_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            on_launch(self, {**dict(zip(self.arg_names, args)), **kwargs})
        if run_them:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    interpreter.InterpretedFunction.run = hooked_run
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run


@contextlib.contextmanager
def recorded_launches():
    """Inside the `with`: a list of (kernel, {argument name: value}) for every Triton launch, recorded instead of
    run (see _interpreter_launch_hook)."""
    launches = []
    with _interpreter_launch_hook(lambda kernel, args: launches.append((kernel, args)), run_them=False):
        yield launches


@contextlib.contextmanager
def counted_launches():
    """Inside the `with`: (Triton kernel launches by kernel name, aten ops that are not views by op name), two
    Counters filled as the code runs (the launches run; see _interpreter_launch_hook)."""
    triton_launches = collections.Counter()

    def count(kernel, args):
        triton_launches[kernel.fn.__name__] += 1

    with _interpreter_launch_hook(count, run_them=True), _AtenWork() as aten:
        yield triton_launches, aten.ops
