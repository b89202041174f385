"""Pure-PyTorch reference math of every op: the CPU fallback and the oracle the kernels are tested against."""
from zaya_kernels.reference import residual_rmsnorm

__all__ = ["residual_rmsnorm"]
