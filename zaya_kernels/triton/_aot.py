"""Registry of the Triton kernel configurations this package ships, for the ahead-of-time compile report.

Every Triton launcher picks its launch configuration from a finite table. The same table is registered here, so
`python -m zaya_kernels aot-report` compiles exactly what can run, for every target, with no GPU present.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The software-pipelining depth of every launch whose configuration table names none (num_stages 1: no pipelining).
# Launchers pass it explicitly: left out, Triton takes its backend's default (2 on AMD, 3 on NVIDIA under Triton 3.9),
# another compile than the one registered here, so the report would check a variant that never runs (at those
# defaults 9 of the registered records spill, among them ZAYA1's chunked prefill and decode CCA kernels on sm_90).
NO_PIPELINING = 1
# The depth a launcher chooses where the AOT report shows two stages spill-free on every target and variant (the next
# loop iteration's tiles load while the current ones multiply; Triton's own default on AMD).
PIPELINED = 2


@dataclass(frozen=True)
class AotConfig:
    """One compilable specialisation of a Triton kernel.

    signature: every kernel argument name -> Triton type ("*fp32", "*bf16", "i32", "fp32", ..., or "constexpr").
    constexprs: the value of every constexpr argument.
    label: a short human-readable name of the configuration (block sizes, dtype, mode).
    matrix_expected: True for GEMM-like kernels, whose inner loop must use v_mfma / wgmma.
    num_warps, num_stages: the launch options, as the launcher passes them (tests/test_aot_report.py checks that
    every launch at ZAYA1's sizes is a registered configuration).
    """

    label: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = NO_PIPELINING
    matrix_expected: bool = False


@dataclass
class AotEntry:
    kernel: object  # triton.runtime.jit.JITFunction
    configs: list = field(default_factory=list)


AOT_REGISTRY: dict[str, AotEntry] = {}


def register_aot(name: str, kernel, configs) -> None:
    """Record the shipped configurations of `kernel` under `name` (re-registering replaces)."""
    AOT_REGISTRY[name] = AotEntry(kernel=kernel, configs=list(configs))
