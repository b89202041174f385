"""ZAYA1 building blocks on torch.ops.zaya: a decoder layer and a causal LM that load transformers' state dicts.

Every module here keeps transformers' parameter names and shapes (`transformers.models.zaya.modeling_zaya`), so
`module.load_state_dict(hf_model.state_dict())` (or `zaya_kernels.checkpoint.load_checkpoint`) works unchanged, and
takes a transformers `ZayaConfig` (or any object with the same attributes). Tokens are packed: activations are
[T, H] for the T tokens of B sequences laid out one after the other (`cu_seqlens` [B+1] marks the boundaries).

    embeddings -> (x + b_in) * s_in = R_0 ---------------------------------------------------- residual stream (fp32)
    per layer:  RMSNorm1 -> CCAAttention -> ResidualScaleNorm (+ RMSNorm2) -> ZayaMoE (router + experts)
                -> ResidualScaleNorm (+ the next layer's RMSNorm1, or the final norm)
    final norm -> lm_head

The ops that run (backend chosen by `zaya_kernels.backend`: auto, triton, hip or reference):
- `CCAAttention`: q/k/v linear layers (torch), `zaya::cca_prepare` (prefill, a chunk of a chunked prefill) or
  `zaya::cca_prepare_decode` (one token per sequence), then `zaya::cca_attention` (fresh sequences) or
  `zaya::cca_attention_decode` over the KV cache (decode, chunks), then o_proj (torch);
- `ZayaMoE`: `zaya::zaya_router` then `zaya::moe_dispatch` + `zaya::moe_experts`, or for a few tokens without
  gradients (decode) `zaya::moe_experts_by_token` (skip class: zero output);
- `ResidualScaleNorm`: `zaya::residual_scale_rmsnorm`, every residual update fused with the norm after it;
  `RMSNorm`: `zaya::rmsnorm`.

Inference state lives in a `ZayaCache` (per layer: the conv state [B, C, k0+k1-2] and value state [B, n_kv D / 2]
in fp32, and a contiguous KV cache [B, S_max, n_kv, D]; slot b belongs to sequence b). Sequence lengths are
tracked on the host from the input shapes, so a forward never reads device values.

Training: the modules are differentiable through the ops' autograd (no cache); the expert choices of training
forwards feed `zaya_kernels.integrations.transformers.update_balancing_biases(model)`, which works on these
modules too (same attribute names).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zaya_kernels import ops as zaya_ops
from zaya_kernels.ops._registry import grad_wanted


# ---------------------------------------------------------------- norms and residual scaling
class RMSNorm(nn.Module):
    """transformers' ZayaRMSNorm: weight * RMSNorm(x.to(weight.dtype)). Parameter: weight [H]."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] any float dtype -> [T, H] weight's dtype."""
        return zaya_ops.rmsnorm(x.contiguous(), self.weight, self.variance_epsilon, out_dtype=self.weight.dtype)


class ResidualScaleNorm(nn.Module):
    """ZAYA's learned residual scaling (transformers' ZayaResidualScaling parameters), fused with the next norm.

        R'     = (branch + hidden_states_bias) * hidden_states_scale + (R + residual_bias) * residual_scale
        normed = norm(R')            (norm: the RMSNorm that follows this update in the model)

    Parameters: hidden_states_scale, hidden_states_bias, residual_scale, residual_bias, each [H].
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden_size))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden_size))
        self.residual_scale = nn.Parameter(torch.ones(hidden_size))
        self.residual_bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, branch: torch.Tensor, residual: torch.Tensor, norm: RMSNorm):
        """branch [T, H] (attention or MoE output), residual [T, H] fp32 -> (R' [T, H] fp32, normed [T, H] in the
        norm weight's dtype)."""
        return zaya_ops.residual_scale_rmsnorm(
            branch.to(norm.weight.dtype).contiguous(), residual.contiguous(), self.hidden_states_scale,
            self.hidden_states_bias, self.residual_scale, self.residual_bias, norm.weight, norm.variance_epsilon)


# ---------------------------------------------------------------- batch layout and cache
@dataclass
class ForwardBatch:
    """Where the T tokens of one forward sit: built once per forward and shared by every layer.

    new_lens / start_lens : per sequence, tokens in this forward / tokens already in the cache before it (host ints)
    cu_seqlens : [B+1] int32, boundaries of the packed new tokens
    positions : [T] int32, position of every token in its sequence (start_lens[b] + i)
    seq_lens_after : [B] int32, cached tokens per sequence after this forward (None without a cache)
    cache_rows : [T] int32 (int64 on the device-driven path), the row of each token in a [B * S_max] view of the
        KV cache, i.e. its slot when the cache is read as a paged pool of B blocks of S_max (None without a cache)
    max_total : int, an upper bound of seq_lens_after (sizes the decode attention's splits)
    state_slots : [B] int32, the cache's conv/value state slot of each sequence (slot b = sequence b)
    has_state : [B] int32, 1 where the sequence has cached tokens (its states are read), else 0
    on_device : positions come from the cache's device-side lengths (`decode_on_device`): no host data, so the
        forward can be captured in a CUDA/HIP graph and replayed
    """

    new_lens: list
    start_lens: list
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    seq_lens_after: torch.Tensor | None
    cache_rows: torch.Tensor | None
    max_total: int
    state_slots: torch.Tensor
    has_state: torch.Tensor
    on_device: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.new_lens)

    @property
    def max_new(self) -> int:
        return max(self.new_lens, default=0)

    @property
    def fresh(self) -> bool:
        """No sequence has cached tokens: plain varlen prefill."""
        return not any(self.start_lens)

    @property
    def decode(self) -> bool:
        """Exactly one new token per sequence, each continuing a cached sequence (cca_prepare_decode reads every
        sequence's states as its history: a fresh one, e.g. a 1-token prompt or a reused slot, goes through
        cca_prepare, which starts it from zero / the value bias)."""
        return all(n == 1 for n in self.new_lens) and (self.on_device or all(s > 0 for s in self.start_lens))

    @staticmethod
    def build(new_lens, device, cache: "ZayaCache | None" = None) -> "ForwardBatch":
        """From host lengths: new_lens[b] tokens of sequence b (after cache.lengths[b] cached ones)."""
        new_lens = [int(n) for n in new_lens]
        if any(n < 0 for n in new_lens):
            raise ValueError(f"zaya modules: sequence lengths must be >= 0, got {new_lens}")
        start_lens = list(cache.lengths) if cache is not None else [0] * len(new_lens)
        if cache is not None:
            cache.check_room(new_lens)
        bounds = [0]
        positions, rows = [], []
        for b, (start, n) in enumerate(zip(start_lens, new_lens)):
            bounds.append(bounds[-1] + n)
            positions.extend(range(start, start + n))
            if cache is not None:
                rows.extend(range(b * cache.max_seq_len + start, b * cache.max_seq_len + start + n))

        # every index tensor in one host buffer and one host-to-device copy (six separate copies cost more than the
        # decode step's small kernels on a GPU)
        fields = {"cu_seqlens": bounds, "positions": positions,
                  "seq_lens_after": [s + n for s, n in zip(start_lens, new_lens)],
                  "state_slots": list(range(len(new_lens))), "has_state": [int(s > 0) for s in start_lens],
                  "cache_rows": rows}
        packed = torch.tensor([v for values in fields.values() for v in values], dtype=torch.int32)
        packed = packed.to(device, non_blocking=True)
        views, offset = {}, 0
        for name, values in fields.items():
            views[name] = packed[offset:offset + len(values)]
            offset += len(values)
        return ForwardBatch(
            new_lens=new_lens, start_lens=start_lens, cu_seqlens=views["cu_seqlens"], positions=views["positions"],
            seq_lens_after=None if cache is None else views["seq_lens_after"],
            cache_rows=None if cache is None else views["cache_rows"],
            max_total=max([0] + [s + n for s, n in zip(start_lens, new_lens)]),
            state_slots=views["state_slots"], has_state=views["has_state"])

    @staticmethod
    def decode_on_device(cache: "ZayaCache") -> "ForwardBatch":
        """One new token per sequence at the positions cache.device_lengths holds (device tensors only)."""
        if not all(cache.lengths):
            raise ValueError(f"zaya modules: device_decode continues cached sequences, but sequences "
                             f"{[b for b, n in enumerate(cache.lengths) if n == 0]} of the cache are empty: prefill "
                             "them first (a host-driven forward)")
        cache.check_room([1] * cache.batch_size)
        positions = cache.device_lengths.clone()
        slots = torch.arange(cache.batch_size, dtype=torch.int64, device=positions.device)
        return ForwardBatch(
            new_lens=[1] * cache.batch_size, start_lens=list(cache.lengths),
            cu_seqlens=torch.arange(cache.batch_size + 1, dtype=torch.int32, device=positions.device),
            positions=positions, seq_lens_after=positions + 1, cache_rows=slots * cache.max_seq_len + positions,
            max_total=cache.max_seq_len, state_slots=slots.to(torch.int32),
            has_state=torch.ones(cache.batch_size, dtype=torch.int32, device=positions.device), on_device=True)


class ZayaCache:
    """Inference state of a batch of B sequences for `ZayaForCausalLM` / `ZayaModel` of these modules.

    Per layer: conv_state [B, C, k0+k1-2] and value_state [B, n_kv * D / 2] (state_dtype, default fp32),
    k_cache / v_cache [B, max_seq_len, n_kv, D] (the activation dtype). The cached tokens of every sequence are
    kept on the host (`lengths`) and on the device (`device_lengths` int32 [B], what a graph-captured decode step
    reads and advances). Slot b is sequence b of every forward.
    """

    def __init__(self, config, batch_size: int, max_seq_len: int, device=None, dtype=torch.float32,
                 state_dtype=torch.float32):
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"ZayaCache: batch_size and max_seq_len must be positive, got {batch_size}, "
                             f"{max_seq_len}")
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        channels = (heads + kv_heads) * head_dim
        state_len = conv_state_len(config)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.lengths = [0] * batch_size
        self.device_lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        layers = config.num_hidden_layers
        self.conv_state = [torch.zeros(batch_size, channels, state_len, dtype=state_dtype, device=device)
                           for _ in range(layers)]
        self.value_state = [torch.zeros(batch_size, kv_heads * head_dim // 2, dtype=state_dtype, device=device)
                            for _ in range(layers)]
        self.k_cache = [torch.zeros(batch_size, max_seq_len, kv_heads, head_dim, dtype=dtype, device=device)
                        for _ in range(layers)]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]

    def check_room(self, new_lens) -> None:
        if len(new_lens) != self.batch_size:
            raise ValueError(f"zaya modules: the cache holds {self.batch_size} sequences, the input has "
                             f"{len(new_lens)}")
        too_long = [b for b, (s, n) in enumerate(zip(self.lengths, new_lens)) if s + n > self.max_seq_len]
        if too_long:
            raise ValueError(f"zaya modules: sequences {too_long} would exceed the cache capacity {self.max_seq_len}")

    def advance(self, batch: ForwardBatch) -> None:
        """Record the tokens of a finished forward (on the device too: in place, so a captured step replays it)."""
        self.lengths = [s + n for s, n in zip(batch.start_lens, batch.new_lens)]
        if batch.on_device:
            self.device_lengths.add_(1)
        else:
            self.device_lengths.copy_(batch.seq_lens_after)

    def reset(self, sequences=None) -> None:
        """Make sequences (indices; default all) empty, so their slots take new sequences: their next forward starts
        from zero states, whatever the slots held."""
        for b in range(self.batch_size) if sequences is None else sequences:
            self.lengths[b] = 0
        self.device_lengths.copy_(torch.tensor(self.lengths, dtype=torch.int32))

    def snapshot(self):
        """Copies of the recurrent states and lengths (the KV rows past `lengths` need none: they are rewritten)."""
        return ([t.clone() for t in self.conv_state], [t.clone() for t in self.value_state],
                self.device_lengths.clone(), list(self.lengths))

    def restore(self, snapshot) -> None:
        conv, value, device_lengths, lengths = snapshot
        for dst, src in zip(self.conv_state + self.value_state, conv + value):
            dst.copy_(src)
        self.device_lengths.copy_(device_lengths)
        self.lengths = list(lengths)


# ---------------------------------------------------------------- attention
class CCAProjection(nn.Module):
    """transformers' ZayaCCAProjection parameters: q_proj [n_q D, H], k_proj [n_kv D, H], v_proj_current and
    v_proj_delayed [n_kv D / 2, H] (biases with config.attention_bias), conv_qk_depthwise (Conv1d weight [C, 1, k0],
    bias [C]) and conv_qk_grouped (weight [C, D, k1], bias [C]), C = (n_q + n_kv) D. The computation is in
    `CCAAttention` (one zaya op for the convolutions, coupling, value shift, norm and RoPE)."""

    def __init__(self, config):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, q_size, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_size, bias=bias)
        self.v_proj_current = nn.Linear(hidden, kv_size // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(hidden, kv_size // 2, bias=bias)
        channels = q_size + kv_size
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, config.cca_time0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, config.cca_time1,
                                         groups=config.num_attention_heads + config.num_key_value_heads)

    def project(self, x: torch.Tensor):
        """x [T, H] -> (qk [T, C] = [Q0 | K0], v_current, v_delayed [T, n_kv D / 2]): see `cca_projections`."""
        return cca_projections(self, x)


def cca_projections(proj: nn.Module, x: torch.Tensor, stacked: bool = True):
    """The four CCA input projections of `proj` (q_proj, k_proj, v_proj_current, v_proj_delayed: nn.Linear, ours or
    transformers' ZayaCCAProjection) -> (qk [T, C] = [Q0 | K0], v_current, v_delayed [T, n_kv D / 2]), each with a
    contiguous last dim; stacked, they are column slices of one [T, C + n_kv D] output (row stride C + n_kv D), which
    the CCA preparation ops take as they are (row-strided inputs), so no copy is made.

    stacked (inference): one GEMM over the four weights stacked, kept on `proj`: one launch instead of four plus a
    cat, and no copies of the three slices (the kernels read them with their row strides). It costs one extra copy
    of these weights in memory, and is rebuilt whenever a weight or bias is replaced or changed in place through
    autograd-visible ops (its version counter); an in-place edit through `.data` bypasses that counter and is NOT
    seen (call `forget_stacked_projections(model)` after one). Used only where nothing else can be bypassed: all
    four are plain nn.Linear (an adapter wrapping one, e.g. LoRA, runs its own forward), no parameter needs a
    gradient (so bias-only training gets its gradients), none is an inference-mode tensor (no version counter) and
    torch.compile is not tracing (it cannot compare data pointers). Otherwise, and with stacked=False (what
    `kernelize` uses: a transformers model's weights are the user's to edit, e.g. by PEFT's merge), the four
    modules' own forwards run.
    """
    linears = (proj.q_proj, proj.k_proj, proj.v_proj_current, proj.v_proj_delayed)
    params = [p for lin in linears for p in (getattr(lin, "weight", None), getattr(lin, "bias", None))
              if p is not None]
    if not (stacked and _stackable(linears, params)):
        qk = torch.cat([proj.q_proj(x), proj.k_proj(x)], dim=-1)
        return qk, proj.v_proj_current(x).contiguous(), proj.v_proj_delayed(x).contiguous()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = getattr(proj, "_zaya_stacked_qkv", None)
    if cached is None or cached[0] != key:
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = torch.cat([lin.bias.detach() for lin in linears]) if proj.q_proj.bias is not None else None
        cached = proj._zaya_stacked_qkv = (key, weight, bias)
    out = nn.functional.linear(x, cached[1], cached[2])
    sizes = [lin.out_features for lin in linears]
    # views, not copies: zaya::cca_prepare / _decode / _paged read row-strided inputs (the three copies were three
    # extra launches per layer and a read + write of every projection output at T > 1)
    qk, v_current, v_delayed = out.split([sizes[0] + sizes[1], sizes[2], sizes[3]], dim=-1)
    return qk, v_current, v_delayed


def _stackable(linears, params) -> bool:
    """Whether the stacked copy computes what the four modules would (see cca_projections)."""
    if torch.compiler.is_compiling():
        return False
    plain = all(type(lin) is nn.Linear and not lin._forward_hooks and not lin._forward_pre_hooks for lin in linears)
    return plain and not grad_wanted(params) and not any(p.is_inference() for p in params)


def forget_stacked_projections(model: nn.Module) -> None:
    """Drop every stacked q/k/v weight copy `cca_projections` keeps in `model` (rebuilt at the next inference
    forward): needed only after editing those weights in place through `.data`."""
    for module in model.modules():
        module.__dict__.pop("_zaya_stacked_qkv", None)


def conv_state_len(config) -> int:
    """Raw X columns a sequence's conv state keeps: k0 + k1 - 2 (the depthwise then the grouped causal conv)."""
    return config.cca_time0 + config.cca_time1 - 2


def rope_settings(config, layer_type: str) -> tuple[int, float]:
    """(rotary_dim, rope_theta) of a layer type's rope_parameters: the plain NeoX RoPE the CCA kernels apply
    (inv_freq_i = theta^(-2i / rotary_dim)) on the first head_dim * partial_rotary_factor dims. A scaled rope_type
    (linear, dynamic, yarn, llama3, longrope, ...) changes the frequencies or the attention scale: refused here,
    rather than computed as the default one."""
    rope = config.rope_parameters[layer_type]
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"zaya_kernels: rope_type {rope_type!r} (layer type {layer_type!r}) is not implemented by the CCA "
            "kernels, which apply the default NeoX RoPE; with kernelize(model, cca=False) transformers' own CCA "
            "projection and rotary embedding run instead")
    return int(config.head_dim * rope.get("partial_rotary_factor", 1.0)), float(rope["rope_theta"])


class QKNorm(nn.Module):
    """transformers' ZayaQKNorm parameter: temp [n_kv], the linear key temperature."""

    def __init__(self, config):
        super().__init__()
        self.temp = nn.Parameter(torch.zeros(config.num_key_value_heads))


class CCAAttention(nn.Module):
    """Compressed Convolutional Attention of one layer (DESIGN.md 1.1), transformers' ZayaAttention parameters
    (qkv_proj.*, qk_norm.temp, o_proj).

    forward(x [T, H], batch, cache) -> [T, H]:
        Q0 = x Wq^T, K0 = x Wk^T, Vc = x Wvc^T, Vd = x Wvd^T            (torch: one GEMM in inference)
        q [T, n_q, D], k, v [T, n_kv, D] = CCA preparation (convolutions with the conv state, coupling, value
            shift with the value state, QK norm with temperature, partial NeoX RoPE at batch.positions)
        o = causal GQA softmax attention (scale 1/sqrt(D), sliding window on "hybrid_sliding" layers) over the
            sequence's cached and new keys;   out = o Wo^T
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        layer_type = config.layer_types[layer_idx]
        self.rotary_dim, self.rope_theta = rope_settings(config, layer_type)
        sliding = layer_type == "hybrid_sliding" and config.sliding_window
        self.window = int(config.sliding_window) if sliding else -1
        self.conv_state_len = conv_state_len(config)
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.qkv_proj = CCAProjection(config)
        self.qk_norm = QKNorm(config)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def _conv_args(self):
        proj = self.qkv_proj
        return (proj.conv_qk_depthwise.weight.squeeze(1), proj.conv_qk_depthwise.bias, proj.conv_qk_grouped.weight,
                proj.conv_qk_grouped.bias, self.qk_norm.temp)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: ZayaCache | None = None) -> torch.Tensor:
        if self.training and self.attention_dropout > 0.0:
            raise ValueError(f"zaya modules: attention dropout ({self.attention_dropout}) is not implemented "
                             "by the zaya attention ops; train with attention_dropout=0 or kernelize "
                             "transformers' model (its attention runs there with dropout)")
        if cache is not None and not batch.fresh and grad_wanted(self.parameters()):
            raise ValueError("zaya modules: gradients through a cached prefix are not implemented (the decode "
                             "kernels have no backward): train without a cache, or run the forward under "
                             "torch.no_grad()")
        proj = self.qkv_proj
        qk, v_current, v_delayed = proj.project(x)
        heads = (self.num_heads, self.num_kv_heads, self.rotary_dim, self.rope_theta)
        layer = self.layer_idx
        kv_write = {}
        if cache is not None:
            k_cache, v_cache = cache.k_cache[layer], cache.v_cache[layer]
            # The preparation kernels store k / v straight into the cache, read as a paged pool of B blocks of S_max
            # slots (slot = cache row). Autograd (a training forward with a cache) and a cache of another dtype copy
            # them afterwards instead: the paged write has no autograd formula.
            if not torch.is_grad_enabled() and k_cache.dtype == qk.dtype:
                kv_write = dict(slot_mapping=batch.cache_rows, k_cache=k_cache, v_cache=v_cache)
        if cache is not None and batch.decode:
            # one token per sequence: states read and updated in place, slot b = sequence b
            q, k, v = zaya_ops.cca_prepare_decode(qk, v_current, v_delayed, *self._conv_args(), batch.positions,
                                                  cache.conv_state[layer], cache.value_state[layer],
                                                  batch.state_slots, *heads, **kv_write)
        else:
            states = {}
            if cache is not None:
                states = dict(initial_conv_state=cache.conv_state[layer], initial_value_state=cache.value_state[layer],
                              has_initial_state=batch.has_state)
            if proj.v_proj_delayed.bias is not None:
                states = self._states_with_value_bias(states, batch, qk)
            q, k, v, final_conv, final_value = zaya_ops.cca_prepare(
                qk, v_current, v_delayed, *self._conv_args(), batch.positions, batch.cu_seqlens, *heads, **states,
                **kv_write)
            if cache is not None:
                cache.conv_state[layer].copy_(final_conv)
                cache.value_state[layer].copy_(final_value)
        attend_cache = cache is not None and (batch.decode or not batch.fresh)
        if not attend_cache:  # no cache, or a prefill of fresh sequences: varlen attention over the new tokens
            out = zaya_ops.cca_attention(q, k, v, batch.cu_seqlens, batch.max_new, window=self.window)
        if cache is not None:
            if not kv_write:
                rows = batch.cache_rows.long()
                k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, rows, k.to(k_cache.dtype))
                v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, rows, v.to(v_cache.dtype))
            if attend_cache:
                out = self._attend_cache(q, k_cache, v_cache, batch)
        return self.o_proj(out.flatten(1).to(x.dtype))

    def _states_with_value_bias(self, states: dict, batch: ForwardBatch, qk: torch.Tensor) -> dict:
        """With attention_bias, a fresh sequence's delayed value Vd_{-1} is v_proj_delayed(0) = its bias, not 0 (as
        transformers computes it): every sequence gets an initial state, the fresh ones zero conv columns and the
        bias (differentiable: cca_prepare's backward gives the initial value state its gradient)."""
        bias = self.qkv_proj.v_proj_delayed.bias
        num_seqs = batch.num_seqs
        if not states:
            return dict(initial_conv_state=qk.new_zeros(num_seqs, qk.shape[1], self.conv_state_len,
                                                        dtype=torch.float32),
                        initial_value_state=bias.expand(num_seqs, -1).contiguous(),
                        has_initial_state=torch.ones(num_seqs, dtype=torch.int32, device=qk.device))
        continuing = (states["has_initial_state"] != 0)
        # fp32 initial states whatever the pool's dtype: the bias of a fresh sequence is not rounded to a bf16 pool
        value = torch.where(continuing[:, None], states["initial_value_state"].float(), bias.float())
        conv = states["initial_conv_state"].float() * continuing[:, None, None]
        return dict(initial_conv_state=conv, initial_value_state=value,
                    has_initial_state=torch.ones_like(states["has_initial_state"]))

    def _attend_cache(self, q, k_cache, v_cache, batch: ForwardBatch) -> torch.Tensor:
        """Attention of new tokens over their cached sequences (their own K/V already written)."""
        lens = batch.new_lens
        if batch.decode or len(set(lens)) == 1:  # Q tokens per sequence: one launch (speculative-decoding form)
            queries = q if batch.decode else q.view(batch.num_seqs, lens[0], *q.shape[1:])
            out = zaya_ops.cca_attention_decode(queries, k_cache, v_cache, batch.seq_lens_after, window=self.window,
                                                max_seqlen=batch.max_total)
            return out.reshape(q.shape)
        # chunks of different lengths: one launch per sequence that has new tokens
        outs = []
        for b, (start, n) in enumerate(zip(batch.start_lens, lens)):
            if n == 0:
                continue
            first = sum(lens[:b])
            outs.append(zaya_ops.cca_attention_decode(
                q[None, first:first + n], k_cache[b:b + 1], v_cache[b:b + 1], batch.seq_lens_after[b:b + 1],
                window=self.window, max_seqlen=start + n)[0])
        return torch.cat(outs) if outs else q.new_zeros(q.shape)


# ---------------------------------------------------------------- router and experts
def record_expert_choices(block, index, num_classes: int) -> None:
    """Add a training forward's expert choices to `block`'s per-class token counts (int64 [E+1], on the device, no
    host synchronisation), which `update_balancing_biases` consumes: a count vector, not the choices, so memory
    stays constant however many forwards run between updates. Not counted again when activation checkpointing
    recomputes the forward during backward."""
    # inside autograd's backward: a checkpoint recomputation (torch.compile traces forwards only: no such case)
    if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        return
    counts = zaya_ops.expert_class_counts(index.detach(), num_classes)
    previous = getattr(block, "_zaya_class_counts", None)
    block._zaya_class_counts = counts if previous is None else previous + counts


class RouterMLP(nn.Module):
    """transformers' ZayaRouterMLP parameters: norm.weight [R], fc1 / fc2 [R, R] (+ bias), out_proj [E+1, R]."""

    def __init__(self, router_hidden: int, num_classes: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(router_hidden, eps)
        self.fc1 = nn.Linear(router_hidden, router_hidden)
        self.fc2 = nn.Linear(router_hidden, router_hidden)
        self.out_proj = nn.Linear(router_hidden, num_classes, bias=False)


class ZayaRouter(nn.Module):
    """The ZAYA router of one layer (DESIGN.md 1.3), transformers' ZayaRouter parameters: down_proj [R, H] (+ bias),
    router_states_scale [R] (layers > 0: EDA), router_mlp.*, and the buffer balancing_biases fp32 [E+1].

    forward(x [T, H], r_prev [T, R] or None) -> (expert_index int32 [T] (E = skip), routing_weight fp32 [T],
    r [T, R] for the next layer): one `zaya::zaya_router` op.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        router_hidden = config.router_hidden_size
        self.down_proj = nn.Linear(config.hidden_size, router_hidden)
        self.use_eda = layer_idx != 0
        if self.use_eda:
            self.router_states_scale = nn.Parameter(torch.ones(router_hidden))
        self.router_mlp = RouterMLP(router_hidden, config.num_experts + 1, config.rms_norm_eps)
        self.register_buffer("balancing_biases", torch.zeros(config.num_experts + 1, dtype=torch.float32))
        self.balancing_biases[-1] = -1.0  # the skip class starts disfavoured, as in transformers (DESIGN.md 1.3)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() move the balancing biases but keep them fp32: they are added to fp32
        # probabilities and updated in place by router_balance_update in fp32 (DESIGN.md 1.3, 1.5)
        biases = self.balancing_biases
        super()._apply(fn, recurse)
        self.balancing_biases = biases.to(self.balancing_biases.device)
        return self

    def forward(self, x: torch.Tensor, r_prev: torch.Tensor | None = None):
        mlp = self.router_mlp
        eda = self.use_eda and r_prev is not None
        index, weight, r, _ = zaya_ops.zaya_router(
            x.contiguous(), r_prev.contiguous() if eda else None, self.router_states_scale if eda else None,
            self.down_proj.weight, self.down_proj.bias, mlp.norm.weight, mlp.fc1.weight, mlp.fc1.bias,
            mlp.fc2.weight, mlp.fc2.bias, mlp.out_proj.weight, self.balancing_biases.float(),
            mlp.norm.variance_epsilon)
        return index, weight, r


class Experts(nn.Module):
    """transformers' ZayaExperts parameters: gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I]."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"zaya modules: the expert kernels implement SiLU (SwiGLU) experts, the config asks for "
                             f"hidden_act={config.hidden_act!r}")
        experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))
        nn.init.normal_(self.gate_up_proj, std=config.initializer_range)
        nn.init.normal_(self.down_proj, std=config.initializer_range)


class ZayaMoE(nn.Module):
    """Router + top-1 SwiGLU experts of one layer (transformers' ZayaSparseMoeBlock parameters: gate.*, experts.*).

    forward(x [T, H], r_prev [T, R] or None) -> (y [T, H] x.dtype, r [T, R]):
        e*, w, r = router(x, r_prev);  y_t = w_t down[e*] (SiLU(gate[e*] x_t) * up[e*] x_t);
        a skipped token (e* = E) gives 0 (skip_mode 0: transformers) or w_t x_t (skip_mode 1: Zyphra's original
        code, the semantics of legacy checkpoints).
    In training mode the expert choices are kept for `update_balancing_biases`.
    """

    def __init__(self, config, layer_idx: int, skip_mode: int = 0):
        super().__init__()
        if skip_mode not in (0, 1):
            raise ValueError(f"zaya modules: skip_mode must be 0 or 1, got {skip_mode!r}")
        self.skip_mode = skip_mode
        self.gate = ZayaRouter(config, layer_idx)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor, r_prev: torch.Tensor | None = None):
        index, weight, r = self.gate(x, r_prev)
        y = zaya_ops.moe(x.contiguous(), self.experts.gate_up_proj, self.experts.down_proj, index, weight,
                         skip_mode=self.skip_mode, index_from_router=True)
        if self.training:  # micro-batches accumulate until the next balancing step
            record_expert_choices(self, index, self.gate.num_experts + 1)
        return y, r


# ---------------------------------------------------------------- decoder layer and model
class ZayaDecoderLayer(nn.Module):
    """One ZAYA decoder layer with transformers' ZayaDecoderLayer parameters (self_attn, mlp, input_layernorm,
    post_attention_layernorm, post_attention_residual_scale, post_mlp_residual_scale).

    forward(residual [T, H] fp32, normed [T, H] (= input_layernorm(residual)), router_state [T, R] or None, batch,
    cache, next_norm) -> (residual', next_normed, router_state'):
        a = attention(normed);  R1, n1 = post_attention_residual_scale(a, R, post_attention_layernorm)
        m, r = mlp(n1, router_state);  R2, n2 = post_mlp_residual_scale(m, R1, next_norm)
    next_norm is the next layer's input_layernorm (the model's final norm after the last layer): each residual
    update runs fused with the norm that follows it.
    """

    def __init__(self, config, layer_idx: int, skip_mode: int = 0):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = CCAAttention(config, layer_idx)
        self.mlp = ZayaMoE(config, layer_idx, skip_mode)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.post_attention_residual_scale = ResidualScaleNorm(hidden)
        self.post_mlp_residual_scale = ResidualScaleNorm(hidden)

    def forward(self, residual, normed, router_state, batch: ForwardBatch, cache: ZayaCache | None,
                next_norm: RMSNorm):
        attn_out = self.self_attn(normed, batch, cache)
        residual, normed = self.post_attention_residual_scale(attn_out, residual, self.post_attention_layernorm)
        moe_out, router_state = self.mlp(normed, router_state)
        residual, normed = self.post_mlp_residual_scale(moe_out, residual, next_norm)
        return residual, normed, router_state


class ZayaModel(nn.Module):
    """The ZAYA decoder stack with transformers' ZayaModel parameters (embed_tokens, layers.*, norm,
    input_hidden_states_scale, input_hidden_states_bias).

    forward(input_ids, seq_lens=None, cache=None, device_decode=False) -> final-normed hidden states [T, H]
    (packed) or [B, S, H]:
        input_ids [B, S] (B sequences of S tokens each) or packed [T] with seq_lens (host ints, sum T);
        cache: a ZayaCache to read and extend (prefill, chunked prefill, decode), or None (training, scoring);
        device_decode: one token per sequence ([B, 1]) at the positions the cache holds on the device, with no
            host-to-device data (what `DecodeGraph` captures).
    skip_mode: what the skip class outputs (see ZayaMoE): 0 as transformers, 1 for Zyphra's legacy checkpoints.
    """

    def __init__(self, config, skip_mode: int = 0):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(ZayaDecoderLayer(config, i, skip_mode) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(config.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, input_ids: torch.Tensor, seq_lens=None, cache: ZayaCache | None = None,
                device_decode: bool = False) -> torch.Tensor:
        batched = input_ids.dim() == 2
        if batched:
            if seq_lens is not None:
                raise ValueError("zaya modules: seq_lens goes with packed input_ids [T], not [B, S]")
            seq_lens = [input_ids.shape[1]] * input_ids.shape[0]
        elif input_ids.dim() != 1 or seq_lens is None or sum(int(n) for n in seq_lens) != input_ids.shape[0]:
            raise ValueError(f"zaya modules: input_ids must be [B, S], or packed [T] with seq_lens summing to T; got "
                             f"shape {tuple(input_ids.shape)} and seq_lens {seq_lens}")
        if device_decode:
            if cache is None or tuple(input_ids.shape) != (cache.batch_size, 1):
                raise ValueError(f"zaya modules: device_decode takes [B, 1] input_ids with a cache of B sequences, "
                                 f"got shape {tuple(input_ids.shape)}")
            batch = ForwardBatch.decode_on_device(cache)
        else:
            batch = ForwardBatch.build(seq_lens, input_ids.device, cache)
        embeds = self.embed_tokens(input_ids.reshape(-1))
        first_norm = self.layers[0].input_layernorm if len(self.layers) else self.norm
        residual, normed = zaya_ops.residual_scale_rmsnorm(
            embeds.to(first_norm.weight.dtype).contiguous(), None, self.input_hidden_states_scale,
            self.input_hidden_states_bias, None, None, first_norm.weight, first_norm.variance_epsilon)
        router_state = None
        for idx, layer in enumerate(self.layers):
            next_norm = self.layers[idx + 1].input_layernorm if idx + 1 < len(self.layers) else self.norm
            residual, normed, router_state = layer(residual, normed, router_state, batch, cache, next_norm)
        if cache is not None:
            cache.advance(batch)
        return normed.view(*input_ids.shape, normed.shape[-1])


class ZayaForCausalLM(nn.Module):
    """ZayaModel + lm_head with transformers' ZayaForCausalLM parameter names (model.*, lm_head.weight; tied to the
    embeddings when config.tie_word_embeddings).

    forward(input_ids, seq_lens=None, cache=None, device_decode=False) -> logits [..., vocab] (shaped like
    input_ids + vocab); see ZayaModel.
    skip_mode: 0 (transformers' semantics, default) or 1 (Zyphra's legacy checkpoints), see ZayaMoE.
    """

    def __init__(self, config, skip_mode: int = 0):
        super().__init__()
        self.config = config
        self.model = ZayaModel(config, skip_mode)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=getattr(config, "lm_head_bias", False))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, seq_lens=None, cache: ZayaCache | None = None,
                device_decode: bool = False) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, seq_lens, cache, device_decode))

    def new_cache(self, batch_size: int, max_seq_len: int, state_dtype=torch.float32) -> ZayaCache:
        """An empty ZayaCache for batch_size sequences of up to max_seq_len tokens, on the model's device/dtype."""
        weight = self.lm_head.weight
        return ZayaCache(self.config, batch_size, max_seq_len, device=weight.device,
                         dtype=self.model.norm.weight.dtype, state_dtype=state_dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, cache: ZayaCache | None = None,
                 on_token=None, cuda_graph: bool = False) -> torch.Tensor:
        """Greedy decoding. input_ids [B, S] (equal-length prompts) -> [B, S + max_new_tokens].

        One prefill forward, then one decode forward per new token over a ZayaCache (created when not given; it
        ends holding the prompt and all new tokens but the last, which no forward has read: to continue, feed it);
        cuda_graph: replay the decode step as a captured CUDA/HIP graph (`DecodeGraph`; GPU only);
        on_token(step) is called after every new token (progress bars, timing)."""
        batch_size, prompt_len = input_ids.shape
        if cache is None:
            cache = self.new_cache(batch_size, prompt_len + max_new_tokens)
        tokens = [input_ids]
        logits = self(input_ids, cache=cache)[:, -1]
        decode_step = DecodeGraph(self, cache).step if cuda_graph and max_new_tokens > 1 else (
            lambda token: self(token, cache=cache)[:, -1])
        for step in range(max_new_tokens):
            next_token = logits.argmax(-1, keepdim=True)
            tokens.append(next_token)
            if on_token is not None:
                on_token(step)
            if step + 1 < max_new_tokens:
                logits = decode_step(next_token)
        return torch.cat(tokens, dim=1)


class DecodeGraph:
    """One decode step of a `ZayaForCausalLM` over a `ZayaCache`, captured once as a CUDA (or HIP) graph and replayed
    per token: every layer's kernels go out in one graph launch, so small-batch decode is not bound by Python and
    per-kernel launch latency.

    step(tokens [B, 1] int64) -> logits [B, vocab] (a static buffer: the next step overwrites it); every sequence of
    the cache gains one token per step, at the positions cache.device_lengths holds. GPU only (CUDA or ROCm torch).
    Construction runs the step once on a side stream (kernel compilation, allocator warm-up) with the cache's states
    saved and restored, then captures it; the cache is unchanged by construction.
    """

    def __init__(self, model: ZayaForCausalLM, cache: ZayaCache):
        device = cache.device_lengths.device
        if device.type != "cuda":
            raise RuntimeError(f"DecodeGraph: CUDA/HIP graphs need the model and cache on a GPU, the cache is on "
                               f"{device}")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        saved = cache.snapshot()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            model(self.tokens, cache=cache, device_decode=True)
        torch.cuda.current_stream(device).wait_stream(side)
        cache.restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache=cache, device_decode=True)[:, -1]
        cache.restore(saved)  # capturing ran nothing on the device; the host-side lengths moved: put them back

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.check_room([1] * self.cache.batch_size)
        self.tokens.copy_(tokens.view(self.tokens.shape))
        self.graph.replay()
        self.cache.lengths = [n + 1 for n in self.cache.lengths]
        return self.logits
