"""The one registration path: every op's schema is in csrc/zaya_ops.cpp; this module attaches, for each op,

- one dispatching kernel for CPU and CUDA/ROCm tensors: validate the arguments, pick the backend with
  `zaya_kernels.backend.select`, call that backend's implementation;
- the fake (meta) kernel torch.compile traces with (it validates too, so bad shapes fail at trace time);
- the autograd formula, where the op is used in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from zaya_kernels import backend as _backend


@dataclass
class OpSpec:
    name: str
    impls: dict[str, Callable]
    auto_order: tuple[str, ...]
    has_autograd: bool


OPS: dict[str, OpSpec] = {}


def _device_type(args) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    raise TypeError("a zaya op was called without any tensor argument")


def register_op(
    name: str,
    *,
    impls: dict[str, Callable],
    fake: Callable,
    validate: Callable,
    auto_order: tuple[str, ...] = ("hip", "triton"),
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> None:
    """Attach implementations, fake kernel and autograd to the C++-defined schema `zaya::<name>`.

    impls maps backend name ('reference', 'triton', 'hip') to a function with the op's signature. `validate` raises
    a ValueError/TypeError naming the bad argument; it runs before every backend and in the fake kernel.
    """
    qualname = f"zaya::{name}"
    if "reference" not in impls:
        raise ValueError(f"{qualname}: every op needs a reference implementation")
    op_backends = tuple(impls)

    def dispatching_kernel(*args):
        validate(*args)
        choice = _backend.select(name, _device_type(args), op_backends, auto_order)
        return impls[choice](*args)

    def validated_fake(*args):
        validate(*args)
        return fake(*args)

    torch.library.register_kernel(qualname, ("cpu", "cuda"), dispatching_kernel)
    torch.library.register_fake(qualname, validated_fake)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    OPS[name] = OpSpec(name=name, impls=dict(impls), auto_order=auto_order, has_autograd=backward is not None)


def backend_table(device_type: str) -> list[tuple[str, str, str]]:
    """(op, backends it has, what would run now on `device_type`) for every registered op."""
    rows = []
    for spec in OPS.values():
        try:
            chosen = _backend.select(spec.name, device_type, tuple(spec.impls), spec.auto_order)
        except _backend.BackendUnavailableError as exc:
            chosen = f"unavailable ({exc})"
        rows.append((spec.name, ",".join(spec.impls), chosen))
    return rows
