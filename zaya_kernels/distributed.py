"""Expert parallelism for ZAYA's top-1 MoE over a torch.distributed process group (NCCL, RCCL or gloo).

The E experts are sharded in contiguous blocks: rank r of a group of size R holds experts r * E/R .. (r+1) * E/R - 1
(gate_up [E/R, 2I, H], down [E/R, H, I]). Each rank brings its own tokens. One forward:

1. dispatch locally (torch.ops.zaya.moe_dispatch): tokens sorted by expert, skipped tokens last, so the rows for rank d
   are one contiguous block of the sorted order;
2. exchange the per-rank row counts (all_to_all_single on R integers; the only host synchronisation, needed because
   the collective takes its split sizes on the host);
3. gather the routed rows in sorted order (torch.ops.zaya.moe_permute_rows: token rows, their expert ids and
   routing weights) and send them with all_to_all_single;
4. run the local experts on the received rows with the same kernels (zaya_kernels.ops.moe);
5. send the results back (all_to_all_single with the reverse split) and scatter each row to its token's place
   (torch.ops.zaya.moe_unpermute_rows); skipped tokens never leave their rank (0 or w x, skip_mode).
The gather and the scatter-back run on the backend the selector picks (HIP, Triton or the reference).

Autograd: the exchanges are torch.distributed.nn.functional.all_to_all_single (differentiable), the local experts,
the gather and the scatter-back use their ops' autograd (the gather's backward is the scatter and vice versa), so
x, the routing weight and the local expert weights get the gradients one process would give them (each rank's weight
gradient is the full gradient of its own experts). No home-made transport.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from zaya_kernels.ops.moe import moe, moe_dispatch, moe_permute_rows, moe_unpermute_rows


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """[first, last + 1) of the experts rank `rank` holds; num_experts must be a multiple of world_size."""
    if num_experts % world_size != 0:
        raise ValueError(f"expert parallelism: num_experts = {num_experts} must be a multiple of the group size "
                         f"{world_size}")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def shard_experts(gate_up: torch.Tensor, down: torch.Tensor, rank: int, world_size: int):
    """This rank's slice (gate_up [E/R, 2I, H], down [E/R, H, I]) of the full expert weights."""
    first, end = expert_range(gate_up.shape[0], rank, world_size)
    return gate_up[first:end], down[first:end]


def moe_expert_parallel(x: torch.Tensor, local_gate_up: torch.Tensor, local_down: torch.Tensor,
                        expert_index: torch.Tensor, routing_weight: torch.Tensor, num_experts: int,
                        skip_mode: int = 0, group=None) -> torch.Tensor:
    """The top-1 expert layer with the experts sharded over `group` (default: the world).

    Parameters
    ----------
    x : [T, H] this rank's tokens, float32 / float16 / bfloat16 (dtype A), contiguous
    local_gate_up : [E/R, 2I, H] dtype A, the experts of this rank (see `shard_experts`)
    local_down : [E/R, H, I] dtype A
    expert_index : [T] int32, global expert ids 0..E (E = skip)
    routing_weight : [T] float
    num_experts : E (all ranks together)
    skip_mode : 0 (skipped tokens give 0) or 1 (w x)

    Returns
    -------
    y : [T, H] dtype A, equal to the single-process `zaya_kernels.ops.moe` on the same tokens with all the experts.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    first, end = expert_range(num_experts, rank, world_size)
    if local_gate_up.shape[0] != end - first or local_down.shape[0] != end - first:
        raise ValueError(f"expert parallelism: rank {rank} must hold {end - first} experts ({first}..{end - 1}), got "
                         f"local_gate_up {tuple(local_gate_up.shape)}, local_down {tuple(local_down.shape)}")
    T, H = x.shape
    per_rank = num_experts // world_size
    counts, offsets, sorted_ids, _, _, _ = moe_dispatch(expert_index, num_experts)
    # rows for each destination rank: the sorted block of its experts
    send_counts = counts[:num_experts].view(world_size, per_rank).sum(1)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    routed = sum(send_splits)  # = offsets[E]: the routed tokens are the first `routed` sorted positions

    def exchange(t, splits_out, splits_in):
        out = t.new_empty((sum(splits_out),) + tuple(t.shape[1:]))
        return dist_fn.all_to_all_single(out, t.contiguous(), splits_out, splits_in, group=group)

    routing_weight = routing_weight.contiguous()
    recv_x = exchange(moe_permute_rows(x, sorted_ids, routed), recv_splits, send_splits)
    send_w = moe_permute_rows(routing_weight.view(T, 1), sorted_ids, routed).view(routed)
    recv_w = exchange(send_w, recv_splits, send_splits)
    # expert ids carry no gradient: the plain collective is enough
    send_index = moe_permute_rows(expert_index.contiguous().view(T, 1), sorted_ids, routed).view(routed)
    recv_index = expert_index.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv_index, send_index, recv_splits, send_splits, group=group)
    local_y = moe(recv_x, local_gate_up, local_down, recv_index - first, recv_w, skip_mode)
    back = exchange(local_y, send_splits, recv_splits)
    # even with no routed token here, y stays connected to the exchanges (back has 0 rows): every rank must join
    # their backward
    return moe_unpermute_rows(back, sorted_ids, x, routing_weight, skip_mode)
