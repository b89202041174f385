"""The one backend selector: which implementation (hip, triton, reference) runs an op.

The request comes from a `use_backend(...)` context manager if one is active, else from the environment variable
ZAYA_KERNELS_BACKEND (auto | triton | hip | reference; default auto).

- auto: on a GPU, the op's preferred GPU backend that is available (its `auto_order`, e.g. hip then triton);
  on CPU, the reference.
- triton / hip / reference: exactly that backend, or a `BackendUnavailableError` naming the op and the reason.
  Triton on CPU tensors is only available under the interpreter (TRITON_INTERPRET=1).

Nothing falls back silently: `last_backend(op)` tells which backend ran last, and ZAYA_KERNELS_LOG=1 prints the
backend of every op the first time each (op, backend, device type) combination runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys

BACKENDS = ("auto", "triton", "hip", "reference")
GPU_BACKENDS = ("hip", "triton")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("zaya_backend_override", default=None)
_last_backend: dict[str, str] = {}
_logged: set[tuple[str, str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these tensors."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown zaya_kernels backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the innermost `use_backend`, else $ZAYA_KERNELS_BACKEND, else 'auto'."""
    override = _override.get()
    if override is not None:
        return override
    return _check_name(os.environ.get("ZAYA_KERNELS_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block with backend `name` (auto, triton, hip or reference)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install should say why, not vanish
        return False, f"triton cannot be imported ({exc})"
    return True, ""


@functools.lru_cache(maxsize=None)
def hip_build() -> str:
    """'cuda', 'rocm' or 'none': which GPU launchers the compiled extension holds."""
    from zaya_kernels import _C

    return getattr(_C, "gpu_build", "none")


def unavailable_reason(backend: str, device_type: str, op_backends: tuple[str, ...]) -> str | None:
    """None if `backend` can run an op that has `op_backends` on `device_type` tensors, else the reason."""
    if backend not in op_backends:
        return f"the op has no {backend} implementation (it has: {', '.join(op_backends)})"
    if backend == "reference":
        return None
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            return why
        if device_type == "cpu" and not triton_interpreter():
            return "Triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return None
    if backend == "hip":
        if device_type != "cuda":
            return f"the HIP/CUDA kernels need GPU tensors, got {device_type} tensors"
        if hip_build() == "none":
            return "the extension was built without GPU kernels (CPU-only build)"
        return None
    return f"unknown backend {backend!r}"


def select(op: str, device_type: str, op_backends: tuple[str, ...], auto_order: tuple[str, ...]) -> str:
    """The backend that runs `op` on `device_type` tensors now; raises BackendUnavailableError if none can."""
    req = requested_backend()
    if req == "auto":
        if device_type == "cpu":
            choice = "reference"
        else:
            reasons = []
            choice = None
            for candidate in auto_order:
                why = unavailable_reason(candidate, device_type, op_backends)
                if why is None:
                    choice = candidate
                    break
                reasons.append(f"{candidate}: {why}")
            if choice is None:
                raise BackendUnavailableError(
                    f"zaya::{op}: no GPU backend can run on {device_type} tensors ({'; '.join(reasons)}); "
                    "use ZAYA_KERNELS_BACKEND=reference to run the pure-PyTorch reference deliberately"
                )
    else:
        why = unavailable_reason(req, device_type, op_backends)
        if why is not None:
            raise BackendUnavailableError(f"zaya::{op}: backend {req!r} requested but unavailable: {why}")
        choice = req
    note_ran(op, choice, device_type)
    return choice


def note_ran(op: str, backend: str, device_type: str) -> None:
    """Record (and with ZAYA_KERNELS_LOG=1 print, once per combination) which backend runs `op`."""
    _last_backend[op] = backend
    if os.environ.get("ZAYA_KERNELS_LOG", "0") == "1" and (op, backend, device_type) not in _logged:
        _logged.add((op, backend, device_type))
        print(f"[zaya_kernels] {op}: {backend} backend on {device_type}", file=sys.stderr)


def last_backend(op: str) -> str | None:
    """The backend that ran `op` most recently in this process (None if it has not run)."""
    return _last_backend.get(op)
