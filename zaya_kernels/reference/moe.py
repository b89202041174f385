"""Reference math of ZAYA's top-1 mixture of experts (DESIGN.md 1.4), in plain PyTorch.

This is the CPU fallback and the oracle the kernels are tested against. T tokens, hidden H, E experts of
intermediate size I, plus the skip class (expert index E). For a token t routed to expert e = expert_index[t] < E
with routing weight w = routing_weight[t]:

    g = gate_up[e, :I] x_t,   u = gate_up[e, I:] x_t          [I]   (gate_up [E, 2I, H]: rows 0..I-1 gate, I..2I-1 up)
    a = SiLU(g) * u                                            [I]
    y_t = w * down[e] a                                        [H]   (down [E, H, I]; the weight comes after down)

and for a skipped token (e = E): y_t = 0 (skip_mode 0, transformers' ZayaRouter + ZayaExperts) or y_t = w * x_t
(skip_mode 1, older Zyphra code). Top-1: each output row has one writer, so the combine is a scatter.

Precision model (the Triton kernels do the same): the GEMMs read x and the weights in their dtype A and accumulate in
fp32; SiLU(g) * u is computed in fp32 and rounded to A (the second GEMM reads it in A); the routing weight is applied
to the fp32 accumulator and y is rounded to A once. With fp32 tensors this is plain fp32 math. transformers rounds
g, u, SiLU(g), the product and down's output to A separately in a bf16 model: within a few A roundings of this.

Dispatch (the grouping the grouped GEMMs walk), for a tile size block_m:
    counts[c]            tokens of class c, c = 0..E (counts[E] = skipped tokens)          int32 [E+1]
    offsets[c]           exclusive prefix sum of counts (offsets[E+1] = T)                  int32 [E+2]
    sorted_token_ids[p]  the token at sorted position p: a stable sort by class, skip last  int32 [T]
    inverse[t]           the sorted position of token t (sorted_token_ids[inverse[t]] = t)  int32 [T]
    tile_expert[j]       class of row tile j (block_m sorted rows of one class), -1 unused  int32 [cdiv(T, block_m) + E]
    tile_start[j]        first sorted position of tile j (0 for unused tiles)               int32 [cdiv(T, block_m) + E]
Tiles of class c cover sorted positions offsets[c] .. offsets[c+1]-1 in order; the skip class has tiles too (so
a consumer can walk every row by tile), the expert GEMMs ignore them.
sum_c cdiv(counts[c], block_m) <= cdiv(T, block_m) + E, so the tile map has a size known without reading the counts
(no host synchronisation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SKIP_ZERO, SKIP_SCALED_IDENTITY = 0, 1


def num_tiles(num_tokens: int, num_experts: int, block_m: int) -> int:
    """Length of the tile map: an upper bound of sum over the E+1 classes of cdiv(count, block_m)."""
    return -(-num_tokens // block_m) + num_experts


def empty_dispatch(expert_index: torch.Tensor, num_experts: int, block_m: int):
    """Uninitialised int32 (counts [E+1], offsets [E+2], sorted_token_ids [T], inverse [T], tile_expert,
    tile_start [num_tiles]) on expert_index's device: the output buffers of a dispatch kernel (and the fake
    kernel's shapes)."""
    T = expert_index.shape[0]
    tiles = num_tiles(T, num_experts, block_m)
    return tuple(expert_index.new_empty(n, dtype=torch.int32)
                 for n in (num_experts + 1, num_experts + 2, T, T, tiles, tiles))


# ---------------------------------------------------------------- dispatch
def moe_dispatch(expert_index: torch.Tensor, num_experts: int, block_m: int):
    """(counts, offsets, sorted_token_ids, inverse, tile_expert, tile_start), see the module docstring.

    expert_index: int32 [T] with values in 0..num_experts (num_experts = skip). O(T log T) here (a stable sort),
    with no host synchronisation.
    """
    device = expert_index.device
    T = expert_index.shape[0]
    E = num_experts
    index = expert_index.long()
    counts = torch.bincount(index, minlength=E + 1)[: E + 1]
    offsets = torch.zeros(E + 2, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_token_ids = torch.sort(index, stable=True).indices
    inverse = torch.empty_like(sorted_token_ids)
    inverse[sorted_token_ids] = torch.arange(T, device=device)
    tile_expert, tile_start = tile_map(offsets, T, block_m)
    as_int = lambda t: t.to(torch.int32)  # noqa: E731
    return (as_int(counts), as_int(offsets), as_int(sorted_token_ids), as_int(inverse), as_int(tile_expert),
            as_int(tile_start))


def tile_map(offsets: torch.Tensor, num_tokens: int, block_m: int):
    """(tile_expert, tile_start) int64 [cdiv(T, block_m) + E] of the class offsets [E+2] of T = num_tokens tokens
    (see the module docstring); no host synchronisation."""
    E = offsets.shape[0] - 2
    offsets = offsets.long()
    counts = offsets[1:] - offsets[:-1]
    class_tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(class_tiles, 0)  # tiles of class c: tiles_end[c] - class_tiles[c] .. tiles_end[c] - 1
    tile = torch.arange(num_tiles(num_tokens, E, block_m), device=offsets.device)
    tile_class = torch.searchsorted(tiles_end, tile, right=True).clamp(max=E)
    first_tile = tiles_end[tile_class] - class_tiles[tile_class]
    used = tile < tiles_end[-1]
    return torch.where(used, tile_class, -1), torch.where(used, offsets[tile_class] + (tile - first_tile) * block_m, 0)


def _class_tokens(sorted_token_ids, offsets, c):
    """The tokens of class c in sorted (stable, token) order, as int64 indices (reads offsets: host sync)."""
    start, end = int(offsets[c]), int(offsets[c + 1])
    return sorted_token_ids[start:end].long()


# ---------------------------------------------------------------- the readable oracle: one token at a time
def moe_per_token(x, gate_up, down, expert_index, routing_weight, skip_mode: int = SKIP_ZERO):
    """y [T, H] in x.dtype, computed token by token (the math of the module docstring, nothing fused).

    x [T, H]; gate_up [E, 2I, H]; down [E, H, I]; expert_index int [T] in 0..E; routing_weight [T].
    Differentiable with autograd (the rounding of SiLU(g) * u to x.dtype passes gradients through).
    """
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    rows = []
    for t in range(T):
        e = int(expert_index[t])
        w = routing_weight[t].float()
        if e == E:
            rows.append(w * x[t].float() if skip_mode == SKIP_SCALED_IDENTITY else x.new_zeros(H, dtype=torch.float32))
            continue
        gate_up_t = gate_up[e].float() @ x[t].float()
        a = (F.silu(gate_up_t[:I]) * gate_up_t[I:]).to(x.dtype).float()
        rows.append(w * (down[e].float() @ a))
    if not rows:
        return x.new_zeros(0, H)
    return torch.stack(rows).to(x.dtype)


# ---------------------------------------------------------------- the op: one expert at a time
def moe_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start, block_m,
                skip_mode):
    """y [T, H] in x.dtype from the dispatch of `moe_dispatch` (the tile map is not needed here)."""
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    w = routing_weight.float()
    for e in range(E):
        tokens = _class_tokens(sorted_token_ids, offsets, e)
        if tokens.numel() == 0:
            continue
        gate_up_out = x[tokens].float() @ gate_up[e].float().t()
        a = (F.silu(gate_up_out[:, :I]) * gate_up_out[:, I:]).to(x.dtype).float()
        y[tokens] = w[tokens, None] * (a @ down[e].float().t())
    if skip_mode == SKIP_SCALED_IDENTITY:
        skipped = _class_tokens(sorted_token_ids, offsets, E)
        y[skipped] = w[skipped, None] * x[skipped].float()
    return y.to(x.dtype)


def moe_experts_by_token(x, gate_up, down, expert_index, routing_weight, skip_mode):
    """y [T, H] in x.dtype straight from expert_index int32 [T] (the op without a dispatch): moe_experts over the
    reference dispatch, so both ops give the same numbers."""
    counts, offsets, sorted_token_ids, *_ = moe_dispatch(expert_index, gate_up.shape[0], 16)
    return moe_experts(x, gate_up, down, routing_weight, sorted_token_ids, offsets, None, None, 16, skip_mode)


def moe_experts_backward(grad_y, x, gate_up, down, routing_weight, sorted_token_ids, offsets, tile_expert, tile_start,
                         block_m, skip_mode):
    """Gradients of `moe_experts`: (grad_x [T, H], grad_gate_up [E, 2I, H], grad_down [E, H, I], grad_w [T]).

    Per routed token (g, u recomputed from x; a = SiLU(g) * u rounded to A as in the forward; dy = grad_y[t]):
        q      = down[e]^T dy                         [I]
        grad_w = <q, a>                               (= <dy, down[e] a>)
        da     = w q;  dg = da * u * SiLU'(g);  du = da * SiLU(g),  SiLU'(g) = s (1 + g (1 - s)), s = sigmoid(g)
        grad_x = gate_up[e]^T [dg; du];  grad_gate_up[e] += [dg; du] x^T;  grad_down[e] += (w dy) a^T
    Skipped tokens: skip_mode 0 gives zeros; skip_mode 1 gives grad_x = w dy, grad_w = <dy, x>.
    Each gradient has the dtype of its input; sums are fp32.
    """
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    dy_all = grad_y.float()
    w_all = routing_weight.float()
    grad_x = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    grad_w = torch.zeros(T, dtype=torch.float32, device=x.device)
    grad_gate_up = torch.zeros(gate_up.shape, dtype=torch.float32, device=x.device)
    grad_down = torch.zeros(down.shape, dtype=torch.float32, device=x.device)
    for e in range(E):
        tokens = _class_tokens(sorted_token_ids, offsets, e)
        if tokens.numel() == 0:
            continue
        xe, dy, w = x[tokens].float(), dy_all[tokens], w_all[tokens, None]
        gate_up_out = xe @ gate_up[e].float().t()
        g, u = gate_up_out[:, :I], gate_up_out[:, I:]
        s = torch.sigmoid(g)
        a = (g * s * u).to(x.dtype).float()
        q = dy @ down[e].float()
        grad_w[tokens] = (q * a).sum(1)
        da = w * q
        d_gate_up_out = torch.cat([da * u * s * (1 + g * (1 - s)), da * g * s], dim=1)
        grad_x[tokens] = d_gate_up_out @ gate_up[e].float()
        grad_gate_up[e] = d_gate_up_out.t() @ xe
        grad_down[e] = (w * dy).t() @ a
    if skip_mode == SKIP_SCALED_IDENTITY:
        skipped = _class_tokens(sorted_token_ids, offsets, E)
        grad_x[skipped] = w_all[skipped, None] * dy_all[skipped]
        grad_w[skipped] = (dy_all[skipped] * x[skipped].float()).sum(1)
    return (grad_x.to(x.dtype), grad_gate_up.to(gate_up.dtype), grad_down.to(down.dtype),
            grad_w.to(routing_weight.dtype))


# ---------------------------------------------------------------- expert parallelism: row gather and scatter-back
# The rows a rank sends to the expert ranks are a prefix of the dispatch's sorted order (sorted_token_ids, every
# routed token before the skipped ones), so the gather before the all-to-all and the scatter-back after it only need
# sorted_token_ids and the number of rows N that travel (N = offsets[E], the routed tokens). Top-1: every token is at
# one sorted position, so the scatter has one writer per output row.
def moe_permute_rows(x, sorted_token_ids, num_rows: int):
    """rows [num_rows, H] with rows[i] = x[sorted_token_ids[i]] (the first num_rows tokens of the sorted order).

    x [T, H] (any dtype); sorted_token_ids int32 [T], a permutation of 0..T-1; 0 <= num_rows <= T.
    """
    return x[sorted_token_ids[:num_rows].long()]


def moe_unpermute_rows(rows, sorted_token_ids, x, routing_weight, skip_mode: int):
    """y [T, H] in rows.dtype: y[sorted_token_ids[i]] = rows[i] for i < N = rows.shape[0]; every other token t (the
    skipped ones, sorted positions N..T-1) gets 0 (skip_mode 0) or w_t * x_t computed in fp32 and rounded once
    (skip_mode 1).

    rows [N, H]; sorted_token_ids int32 [T], a permutation of 0..T-1, N <= T; x [T, H] rows.dtype and routing_weight
    [T] float (read with skip_mode 1 only; may be None with skip_mode 0). Differentiable with autograd.
    """
    T = sorted_token_ids.shape[0]
    N, H = rows.shape
    ids = sorted_token_ids.long()
    y = rows.new_zeros(T, H)
    y[ids[:N]] = rows
    if skip_mode == SKIP_SCALED_IDENTITY:
        skipped = ids[N:]
        y[skipped] = (routing_weight[skipped, None].float() * x[skipped].float()).to(rows.dtype)
    return y


def moe_unpermute_rows_backward(grad_y, sorted_token_ids, x, routing_weight, num_rows: int, skip_mode: int):
    """Gradients of `moe_unpermute_rows`: (grad_rows [N, H], grad_x [T, H] or None, grad_routing_weight [T] or None).

        grad_rows[i] = grad_y[sorted_token_ids[i]]                 i < N  (the gather: the scatter's adjoint)
    skip_mode 1, for a skipped token t (sorted position >= N); routed tokens get 0:
        grad_x[t] = w_t grad_y[t]   (fp32 product rounded to x.dtype)
        grad_w[t] = <grad_y[t], x_t>   (fp32 sum, rounded to routing_weight.dtype)
    skip_mode 0: x and routing_weight do not enter y, their gradients are None.
    """
    ids = sorted_token_ids.long()
    grad_rows = grad_y[ids[:num_rows]]
    if skip_mode != SKIP_SCALED_IDENTITY:
        return grad_rows, None, None
    T = ids.shape[0]
    skipped = ids[num_rows:]
    dy = grad_y[skipped].float()
    grad_x = torch.zeros_like(x)
    grad_x[skipped] = (routing_weight[skipped, None].float() * dy).to(x.dtype)
    grad_w = torch.zeros(T, dtype=torch.float32, device=x.device)
    grad_w[skipped] = (dy * x[skipped].float()).sum(1)
    return grad_rows, grad_x, grad_w.to(routing_weight.dtype)
