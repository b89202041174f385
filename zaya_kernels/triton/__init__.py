"""Triton kernels and launchers, one module per op family (imported lazily: Triton is optional on CPU)."""
