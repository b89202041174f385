"""Argument checks shared by every op: each raises ValueError/TypeError naming the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=None, shape=None, device=None,
           contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"zaya::{op}: `{name}` must be a tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"zaya::{op}: `{name}` must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"zaya::{op}: `{name}` must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"zaya::{op}: `{name}` must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"zaya::{op}: `{name}` is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"zaya::{op}: `{name}` must be contiguous (row-major); got strides {t.stride()}")


def optional_together(op: str, present: str, names_and_values) -> None:
    """Arguments that exist only with `present`: all given or all None."""
    given = [n for n, v in names_and_values if v is not None]
    if given and len(given) != len(names_and_values):
        missing = [n for n, v in names_and_values if v is None]
        raise ValueError(f"zaya::{op}: {', '.join(given)} given but {', '.join(missing)} missing ({present})")


def eps(op: str, value) -> None:
    if not (isinstance(value, float) and value >= 0.0):
        raise ValueError(f"zaya::{op}: `eps` must be a non-negative float, got {value!r}")
