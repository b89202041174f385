"""Typed Python wrappers of every torch.ops.zaya op (importing this registers their implementations)."""
from zaya_kernels.ops.residual_rmsnorm import residual_scale_rmsnorm, rmsnorm

__all__ = ["residual_scale_rmsnorm", "rmsnorm"]
