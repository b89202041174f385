"""`python -m zaya_kernels demo`: run the implemented ops on ZAYA1-8B shapes (GPU) or a tiny configuration (CPU),
check every backend against the reference, and print times and errors.

What it runs now: the residual stream of a ZAYA decoder stack through the fused residual-scaling + RMSNorm ops
(model input -> 2 residual updates per layer -> final norm), with stand-in branch outputs (a fixed random linear
map) in place of attention and MoE, whose ops land with their own issues. It grows as ops land.
"""
from __future__ import annotations

import time

import torch

import zaya_kernels
from zaya_kernels import backend as _backend
from zaya_kernels.reference import residual_rmsnorm as ref

ZAYA1_8B_HIDDEN = 2048
EPS = 1e-5


def _gpu_backends() -> list[str]:
    names = []
    if _backend.hip_build() != "none" and torch.cuda.is_available():
        names.append("hip")
    if _backend.triton_available()[0]:
        names.append("triton")
    return names


class _Stack:
    """Parameters of a residual stream with `layers` decoder layers, drawn away from their init values."""

    def __init__(self, hidden, layers, dtype, device, seed=0):
        gen = torch.Generator().manual_seed(seed)

        def vec(lo, hi):
            return (torch.rand(hidden, generator=gen) * (hi - lo) + lo).to(device)

        self.input = (vec(0.8, 1.2), vec(-0.1, 0.1))
        # per residual update: hs, hb, rs, rb, and the weight of the norm that follows it
        self.updates = [(vec(0.5, 1.5), vec(-0.1, 0.1), vec(0.8, 1.2), vec(-0.1, 0.1), vec(0.5, 1.5))
                        for _ in range(2 * layers)]
        self.first_norm = vec(0.5, 1.5)
        self.final_norm = vec(0.5, 1.5)
        self.branch_map = (torch.randn(hidden, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)

    def run(self, embeddings, residual_fn, norm_fn):
        """The stack's residual stream; returns (final residual fp32, final normed)."""
        new_residual, normed = residual_fn(embeddings, None, *self.input, None, None, self.first_norm, EPS)
        for hs, hb, rs, rb, w in self.updates:
            branch = normed @ self.branch_map  # stand-in for attention / MoE
            new_residual, normed = residual_fn(branch, new_residual, hs, hb, rs, rb, w, EPS)
        return new_residual, norm_fn(new_residual, self.final_norm, EPS, embeddings.dtype)


def _time(fn, repeats, device) -> float:
    """Median seconds per call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_demo(tokens=None, layers=None, repeats=None) -> int:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    hidden = ZAYA1_8B_HIDDEN if on_gpu else 96
    tokens = tokens or (4096 if on_gpu else 64)
    layers = layers or (40 if on_gpu else 3)
    repeats = repeats or (20 if on_gpu else 2)
    dtype = torch.bfloat16 if on_gpu else torch.float16  # bf16 tl.dot is unusable in the CPU interpreter
    backends = _gpu_backends() if on_gpu else (["triton"] if _backend.triton_available()[0] else [])
    where = torch.cuda.get_device_name(0) if on_gpu else "CPU (Triton interpreter)"
    print(f"zaya_kernels {zaya_kernels.__version__} demo on {where}: hidden {hidden}, {tokens} tokens, "
          f"{layers} layers, {str(dtype).replace('torch.', '')}")
    print("residual stream: model input + 2 fused residual-scale/RMSNorm per layer + final norm "
          "(attention and MoE are stand-ins until their ops land)\n")

    stack = _Stack(hidden, layers, dtype, device)
    embeddings = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    expected_residual, expected_out = stack.run(embeddings, ref.residual_scale_rmsnorm, ref.rmsnorm)

    branch = torch.randn(tokens, hidden, device=device).to(dtype)
    residual = torch.randn(tokens, hidden, device=device)
    hs, hb, rs, rb, w = stack.updates[0]
    bytes_moved = tokens * hidden * (2 * branch.element_size() + 8)
    ref_time = _time(lambda: ref.residual_scale_rmsnorm(branch, residual, hs, hb, rs, rb, w, EPS), repeats, device)

    header = f"{'backend':<10} {'final-norm max err':>19} {'residual rel err':>17} {'us/call':>10} {'GB/s':>8} {'vs ref':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'reference':<10} {'-':>19} {'-':>17} {ref_time * 1e6:10.1f} {bytes_moved / ref_time / 1e9:8.1f} {'1.00x':>8}")
    failures = 0
    for name in backends:
        with zaya_kernels.use_backend(name):
            got_residual, got_out = stack.run(embeddings, torch.ops.zaya.residual_scale_rmsnorm, torch.ops.zaya.rmsnorm)
            seconds = _time(lambda: torch.ops.zaya.residual_scale_rmsnorm(branch, residual, hs, hb, rs, rb, w, EPS),
                            repeats, device)
        out_err = (got_out.float() - expected_out.float()).abs().max().item()
        res_err = ((got_residual - expected_residual).abs().max() / expected_residual.abs().max()).item()
        # one output rounding per layer can flip; the stack must stay within a few ulps of the activation dtype
        ok = out_err <= 8 * torch.finfo(dtype).eps * expected_out.float().abs().max().item() and res_err < 1e-2
        failures += not ok
        print(f"{name:<10} {out_err:19.3e} {res_err:17.3e} {seconds * 1e6:10.1f} "
              f"{bytes_moved / seconds / 1e9:8.1f} {ref_time / seconds:7.2f}x {'' if ok else '  MISMATCH'}")
    if not backends:
        print("no kernel backend available here (install triton); only the reference ran")
    if not on_gpu:
        print("(on CPU the Triton interpreter checks correctness; its times say nothing about GPU speed)")
    print("\nbackends that ran:", ", ".join(sorted({_backend.last_backend(op) or "-" for op in
                                                     ("residual_scale_rmsnorm", "rmsnorm")})))
    print("agreement:", "all backends match the reference" if failures == 0 else f"{failures} backend(s) MISMATCH")
    return 1 if failures else 0
