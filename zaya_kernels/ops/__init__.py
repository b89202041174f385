"""Typed Python wrappers of every torch.ops.zaya op (importing this registers their implementations)."""
from zaya_kernels.ops.attention import cca_attention, cca_attention_decode
from zaya_kernels.ops.cca import cca_prepare, cca_prepare_batched, cca_prepare_decode, cca_prepare_paged
from zaya_kernels.ops.moe import moe, moe_block_m, moe_dispatch
from zaya_kernels.ops.residual_rmsnorm import residual_scale_rmsnorm, rmsnorm
from zaya_kernels.ops.router import expert_class_counts, new_balance_state, router_balance_update, zaya_router

__all__ = ["cca_attention", "cca_attention_decode", "cca_prepare", "cca_prepare_batched", "cca_prepare_decode",
           "cca_prepare_paged", "moe", "moe_block_m", "moe_dispatch", "residual_scale_rmsnorm", "rmsnorm", "zaya_router",
           "router_balance_update", "new_balance_state", "expert_class_counts"]
