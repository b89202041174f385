"""Argument checks shared by every op: each raises ValueError/TypeError naming the argument and what was expected."""
from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(op: str, name: str, t, *, ndim: int | None = None, min_ndim: int = 0, dtypes=None, shape=None,
           device=None, contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"zaya::{op}: `{name}` must be a tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"zaya::{op}: `{name}` must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"zaya::{op}: `{name}` must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"zaya::{op}: `{name}` must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"zaya::{op}: `{name}` must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"zaya::{op}: `{name}` is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"zaya::{op}: `{name}` must be contiguous (row-major); got strides {t.stride()}")


def is_row_strided(t) -> bool:
    """A 2D [rows, width] tensor the kernels can read row by row with a runtime row stride: unit stride along the row
    and rows that do not overlap (stride(0) >= width; any stride with at most one row, or zero width): e.g. a column
    slice of a wider [rows, width + pad] buffer, such as one output of a stacked projection GEMM split without a
    copy."""
    rows, width = t.shape
    return not ((rows > 1 and width > 0 and t.stride(0) < width) or (width > 1 and t.stride(1) != 1))


def row_strided(op: str, name: str, t) -> None:
    """Raise unless `is_row_strided(t)`."""
    if not is_row_strided(t):
        width = t.shape[1]
        raise ValueError(f"zaya::{op}: `{name}` must have a contiguous last dim (stride 1) and a row stride >= its "
                         f"width {width} (rows may be padded, not overlapping); got shape {tuple(t.shape)} and strides "
                         f"{t.stride()}")


def optional_together(op: str, present: str, names_and_values) -> None:
    """Arguments that exist only with `present`: all given or all None."""
    given = [n for n, v in names_and_values if v is not None]
    if given and len(given) != len(names_and_values):
        missing = [n for n, v in names_and_values if v is None]
        raise ValueError(f"zaya::{op}: {', '.join(given)} given but {', '.join(missing)} missing ({present})")


def eps(op: str, value) -> None:
    if not (isinstance(value, float) and value >= 0.0):
        raise ValueError(f"zaya::{op}: `eps` must be a non-negative float, got {value!r}")


# Index tensors our own ops produced (valid by construction: the router's expert index, the dispatch permutation),
# keyed by their base tensor and remembered while unmodified: the value checks that would read them back (a
# device->host copy per call on a GPU) are skipped for them.
_KNOWN_VALID: dict = {}
# (memory span, what) pairs vouched for by the code running now (`vouched`): valid whatever their version counter
# says. By span, not by base tensor: a view of an inference-mode tensor does not record its base.
_VOUCHED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("zaya_vouched_values", default=frozenset())


def root(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage t views (t itself if not a view)."""
    return t if t._base is None else t._base


def remember_valid(t: torch.Tensor, what) -> None:
    """Record that t's values satisfy `what` (a hashable description) until t or its base is modified."""
    if torch.compiler.is_compiling():  # fake tensors while tracing: nothing to remember
        return
    base = root(t)
    if base.is_inference():  # no version counter to see modifications by: such tensors are checked every time
        return
    key = (id(base), what)
    _KNOWN_VALID[key] = (weakref.ref(base, lambda _: _KNOWN_VALID.pop(key, None)), base._version)


def _span(t: torch.Tensor):
    """The memory t's elements occupy (the same for t and any view of t over all of them, e.g. a reshape)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype


@contextlib.contextmanager
def vouched(*pairs):
    """Within the block, each (t, what) of `pairs` is known valid (`known_valid`), also where remember_valid cannot
    follow t: an inference-mode tensor has no version counter, so outside such a block it is checked at every use.
    For code that made t with one of our ops and hands it straight to the next, with nothing in between that could
    modify it (ops.moe: dispatch -> experts; a model's router -> moe). Not for torch.compile'd code (callers pass a
    nullcontext there: the fake tensors have no values to check anyway)."""
    token = _VOUCHED.set(_VOUCHED.get() | {(_span(t), what) for t, what in pairs})
    try:
        yield
    finally:
        _VOUCHED.reset(token)


def known_valid(t: torch.Tensor, what) -> bool:
    """True if t (or a full-size view of it) was remembered for `what` and not modified since, or is vouched for
    `what` by the code running now."""
    if torch.compiler.is_compiling():
        return False
    vouched_now = _VOUCHED.get()
    if vouched_now and (_span(t), what) in vouched_now:
        return True
    base = root(t)
    if base.is_inference() or t.numel() != base.numel():
        return False
    entry = _KNOWN_VALID.get((id(base), what))
    return entry is not None and entry[0]() is base and entry[1] == base._version
