"""Registry of the Triton kernel configurations this package ships, for the ahead-of-time compile report.

Every Triton launcher picks its launch configuration from a finite table. The same table is registered here, so
`python -m zaya_kernels aot-report` compiles exactly what can run, for every target, with no GPU present.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AotConfig:
    """One compilable specialisation of a Triton kernel.

    signature: every kernel argument name -> Triton type ("*fp32", "*bf16", "i32", "fp32", ..., or "constexpr").
    constexprs: the value of every constexpr argument.
    label: a short human-readable name of the configuration (block sizes, dtype, mode).
    matrix_expected: True for GEMM-like kernels, whose inner loop must use v_mfma / wgmma.
    """

    label: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 1
    matrix_expected: bool = False


@dataclass
class AotEntry:
    kernel: object  # triton.runtime.jit.JITFunction
    configs: list = field(default_factory=list)


AOT_REGISTRY: dict[str, AotEntry] = {}


def register_aot(name: str, kernel, configs) -> None:
    """Record the shipped configurations of `kernel` under `name` (re-registering replaces)."""
    AOT_REGISTRY[name] = AotEntry(kernel=kernel, configs=list(configs))
