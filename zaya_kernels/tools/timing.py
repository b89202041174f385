"""The one timing helper the demo and the benchmarks share."""
from __future__ import annotations

import time

import torch


def median_seconds(fn, device: str, repeats: int) -> float:
    """Median seconds per call of `fn` on `device` ("cuda" or "cpu"), after one warm-up call.

    On a GPU this is triton.testing.do_bench when Triton is there (it flushes the L2 cache between calls, so the
    numbers are HBM-bound like a model's), else CUDA-synchronised wall-clock samples.
    """
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=10, rep=max(20, repeats), return_mode="median") / 1e3
        except ImportError:
            pass
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]
