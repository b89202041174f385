"""`kernelize(model)`: run a transformers ZayaForCausalLM / ZayaModel on torch.ops.zaya, in place.

What is swapped (with transformers' own cache objects, masks and rotary embeddings kept):
- the residual stream: the model-input scaling fused with layer 0's input norm, and every residual update fused with
  the norm that follows it (post-attention update + post-attention norm; post-MoE update + the next layer's input
  norm, or the final norm after the last layer): `zaya::residual_scale_rmsnorm`;
- the router: `zaya::zaya_router` (down projection, EDA, MLP, fp32 softmax, biased top-1 with the skip class);
- the experts: `zaya::moe_dispatch` + `zaya::moe_experts` (top-1 grouped GEMMs, skip_mode 0), for SiLU experts.
- the CCA projection: `zaya::cca_prepare` (both convolutions, mean coupling, value shift, QK norm, partial RoPE),
  reading and writing the conv and value states of transformers' cache; for one new token per row after a cached
  prefix (decode, no gradient wanted) `zaya::cca_prepare_decode`, which updates those state tensors in place;
- the attention: `zaya::cca_attention` for a prefill from an empty cache (or no cache) and
  `zaya::cca_attention_decode` for new tokens after a cached prefix (decode, or a chunk of Q tokens per sequence,
  causal among themselves), reading the keys and values straight from transformers' dynamic cache (full and
  sliding-window layers). A left-padded batch (generate's layout: a 2D mask of zeros then ones per row) prefills
  in eval mode with each row's pads and tokens as two varlen sequences (no copy: the tokens attend to their own
  row's tokens only, as transformers' mask makes them) and decodes with the pads left in the cache and each row's
  pad count as `seq_starts`. The pad positions' own outputs are then not transformers' (those are
  implementation-defined: transformers' eager and sdpa attention already disagree there); no token's output reads
  them (attention masks them, the convolutions see zeros), so every token's logits and the greedy tokens match.
transformers' own attention interface (eager / sdpa / flash, with its masks) still runs where the zaya attention
ops do not apply: a padded batch's prefill in training mode (the pad positions' expert choices count in the
balancing), any other padding pattern, a static cache, attention dropout in training, and new tokens after a cached
prefix when gradients are wanted (the decode kernels have no backward).
`attention_paths(model)` tells which path each layer took last.
What always runs as transformers' code: the o linear layer and, by default, the q/k/v linear layers (their
modules' own forwards, so adapters such as LoRA and in-place weight edits such as PEFT's merge act as in
transformers), the embeddings, the LM head, the cache objects. `kernelize(model, stack_projections=True)` (for
serving) runs the four q/k/v projections of each layer as one GEMM over a stacked copy of their weights in inference
forwards, as zaya_kernels.modules does (`cca_projections`: four launches and a cat fewer per layer; the copy is
rebuilt when a weight is replaced or changed through autograd-visible ops, but not after an edit through `.data`:
then call `zaya_kernels.modules.forget_stacked_projections(model)`).

Training: after each optimizer step, `update_balancing_biases(model)` moves every layer's balancing biases toward
equal load with `zaya::router_balance_update` (DESIGN.md 1.5), from the choices the training forwards made; the
controllers' state goes into a training checkpoint with `balancing_state_dict` / `load_balancing_state_dict`.

Outputs: `last_hidden_state` and `cache`. Not supported, and refused with a ValueError rather than
silently skipped: `output_hidden_states`, `output_attentions`, `output_router_logits` (transformers records them
with hooks on the layer modules, whose forwards the fused layer loop does not call; forward hooks registered on
decoder layers or attention blocks do not fire either), a RoPE type other than the default with cca=True, and a
cache recording its past (assisted generation: its conv states grow, which transformers' own ZAYA attention
cannot read either).
Activation checkpointing (`activation_checkpointing_enable()`) checkpoints the decoder layers it marks (every n-th
with every_n_layers=n), without a cache as in transformers; the expert choices it recomputes are not counted twice
for the balancing. Sequences packed into rows by restarting position_ids (no mask, no cache) attend
block-diagonally, as in transformers.
Numerics: the kernelized model computes the residual update, router softmax and selection in fp32 (DESIGN.md);
transformers rounds some of these to the model dtype, so bf16 models agree to bf16 rounding, fp32 models exactly
up to fp32 rounding.
"""
from __future__ import annotations

import functools
import types

import torch

from zaya_kernels import ops as zaya_ops
from zaya_kernels.backend import use_backend
from zaya_kernels.ops._registry import call, grad_wanted
from zaya_kernels.modules import cca_projections, conv_state_len, record_expert_choices, rope_settings
from zaya_kernels.ops.router import BALANCE_MODES


def _zaya_classes():
    from transformers.models.zaya import modeling_zaya

    return modeling_zaya


def _residual_params(scaling):
    return (scaling.hidden_states_scale, scaling.hidden_states_bias, scaling.residual_scale, scaling.residual_bias)


def _norm_eps(norm) -> float:
    return float(norm.variance_epsilon)


def _fused_residual_norm(branch, residual, scaling, norm):
    """(new residual fp32, normed in the norm weight's dtype) for [B, S, H] tensors."""
    shape = branch.shape
    h = shape[-1]
    new_residual, normed = call(
        torch.ops.zaya.residual_scale_rmsnorm, branch.to(norm.weight.dtype).reshape(-1, h).contiguous(),
        residual.reshape(-1, h).contiguous(), *_residual_params(scaling), norm.weight, _norm_eps(norm))
    return new_residual.view(shape), normed.view(shape)


def moe_block_forward(block, hidden_states, prev_router_hidden_states=None):
    """ZayaSparseMoeBlock.forward with the router as one zaya op. hidden_states [B, S, H]; returns (y, r [B, S, R])."""
    gate, mlp = block.gate, block.gate.router_mlp
    batch, seq, hidden = hidden_states.shape
    x = hidden_states.reshape(-1, hidden).contiguous()
    use_eda = gate.use_eda and prev_router_hidden_states is not None
    r_prev = prev_router_hidden_states.reshape(x.shape[0], -1).contiguous() if use_eda else None
    index, weight, router_state, _ = zaya_ops.zaya_router(
        x, r_prev, gate.router_states_scale if use_eda else None, gate.down_proj.weight, gate.down_proj.bias,
        mlp.norm.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.out_proj.weight,
        gate.balancing_biases.float(), _norm_eps(mlp.norm))  # a model cast with .to(bf16) has bf16 biases
    experts = block.experts
    if block.zaya_silu_experts:
        # skip_mode 0: a skipped token's expert output is zero, as in transformers
        y = zaya_ops.moe(x, experts.gate_up_proj, experts.down_proj, index, weight, skip_mode=0,
                         index_from_router=True)
    else:  # an expert activation the zaya kernels do not implement: transformers' experts, skip as expert 0, w 0
        skipped = index == gate.num_experts
        y = experts(x, index.masked_fill(skipped, 0).long().unsqueeze(-1),
                    weight.masked_fill(skipped, 0.0).to(x.dtype).unsqueeze(-1))
    if block.training:  # the choices of this step feed update_balancing_biases (micro-batches accumulate)
        record_expert_choices(block, index, gate.num_experts + 1)
    return y.view(batch, seq, hidden), router_state.view(batch, seq, -1)


def attention_forward(attn, hidden_states, attention_mask, cache, config, batch_layout, **kwargs):
    """ZayaAttention.forward with the CCA projection (convolutions, mean coupling, value shift, QK norm, partial
    RoPE) as one `zaya::cca_prepare` op and the attention as `zaya::cca_attention` / `zaya::cca_attention_decode`
    where they apply (see the module docstring; transformers' attention interface otherwise); transformers' cache
    objects keep the conv, value and KV states.

    hidden_states [B, S, H] (RMSNorm1 output); batch_layout: a `_BatchLayout` (the token positions among it), made once
    per forward and shared by every layer; returns (attn_out [B, S, H], None).
    """
    mz = _zaya_classes()
    proj = attn.qkv_proj
    batch, seq, _ = hidden_states.shape
    conv_mask = attention_mask.get("conv")
    if conv_mask is not None:  # padding tokens are zero before the projections, as in transformers
        hidden_states = hidden_states * conv_mask[:, :, None].to(hidden_states.dtype)
    # by default the projection modules' own forwards: a stacked weight copy could miss a user's edit through
    # `.data` (see cca_projections); kernelize(stack_projections=True) opts in
    qk, v_current, v_delayed = cca_projections(proj, hidden_states.reshape(batch * seq, -1),
                                               stacked=getattr(attn, "_zaya_stack_projections", False))
    conv_state = cache.get_conv_state(attn.layer_idx, state_idx=0) if cache is not None else None
    value_state = cache.get_recurrent_state(attn.layer_idx, state_idx=0) if cache is not None else None
    rotary_dim, rope_theta = rope_settings(config, attn.layer_type)
    if _states_updatable_in_place(attn, cache, conv_state, value_state, seq, config, (qk, v_current, v_delayed)):
        # one new token per row after a cached prefix: `zaya::cca_prepare_decode` reads and updates the cache's
        # state tensors in place (row b is slot b): one launch instead of cca_prepare's two, the cache's cat and
        # its two copies
        q, k, v = zaya_ops.cca_prepare_decode(
            qk, v_current, v_delayed, proj.conv_qk_depthwise.weight.squeeze(1), proj.conv_qk_depthwise.bias,
            proj.conv_qk_grouped.weight, proj.conv_qk_grouped.bias, attn.qk_norm.temp,
            batch_layout.positions, conv_state, value_state, batch_layout.rows,
            config.num_attention_heads, config.num_key_value_heads, rotary_dim, rope_theta)
    else:
        q, k, v = _prepare_with_states(attn, proj, config, qk, v_current, v_delayed, conv_state, value_state, cache,
                                       batch, rotary_dim, rope_theta, batch_layout)
    path = _zaya_attention_path(attn, cache, batch_layout)
    attn._zaya_attention_path = path
    window = attn.sliding_window or -1
    query = q.view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    key = k.view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    value = v.view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    if path == "zaya::cca_attention":  # fresh sequences (rows, or the sequences packed in them): varlen attention
        if cache is not None:
            cache.update(key, value, attn.layer_idx, kwargs=kwargs)
        out = zaya_ops.cca_attention(q, k, v, batch_layout.attention_cu_seqlens, batch_layout.attention_max_seqlen,
                                     softmax_scale=attn.scaling, window=window)
        return attn.o_proj(out.reshape(batch, seq, -1)), None
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx, kwargs=kwargs)
    if path == "zaya::cca_attention_decode":  # new tokens over the cache's [B, Hkv, L, D] storage (theirs included)
        # a sliding-window layer returns its kept window plus the new tokens: positions relative to that tensor
        # differ from the absolute ones by a shift, which the window test (a difference of positions) ignores
        length = key.shape[2]
        seq_lens, seq_starts = batch_layout.lengths_and_starts(length)
        queries = q.view(batch, -1, attn.head_dim) if seq == 1 else q.view(batch, seq, -1, attn.head_dim)
        out = zaya_ops.cca_attention_decode(queries, key.transpose(1, 2), value.transpose(1, 2), seq_lens,
                                            softmax_scale=attn.scaling, window=window, max_seqlen=length,
                                            seq_starts=seq_starts)
        return attn.o_proj(out.reshape(batch, seq, -1)), None
    interface = mz.ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, mz.eager_attention_forward)
    out, _ = interface(attn, query, key, value, attention_mask.get("causal"),
                       dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling,
                       sliding_window=attn.sliding_window, **kwargs)
    return attn.o_proj(out.reshape(batch, seq, -1)), None


def _states_updatable_in_place(attn, cache, conv_state, value_state, seq, config, inputs) -> bool:
    """Whether this layer's CCA preparation can run as `zaya::cca_prepare_decode` on the cache's own state
    tensors: one new token per row after a cached prefix, the states at their fixed width (not grown by
    transformers' past recording for assisted generation), and no gradient wanted (the decode op has none)."""
    if cache is None or seq != 1 or conv_state is None or value_state is None:
        return False
    if getattr(cache.layers[attn.layer_idx], "record_past", False):
        return False
    return (conv_state.shape[-1] == conv_state_len(config) and conv_state.is_contiguous()
            and value_state.is_contiguous() and not grad_wanted((*inputs, *attn.parameters())))


def _prepare_with_states(attn, proj, config, qk, v_current, v_delayed, conv_state, value_state, cache, batch,
                         rotary_dim, rope_theta, batch_layout):
    """`zaya::cca_prepare` over B rows of S tokens from transformers' conv and value states (None before the first
    forward: a fresh sequence), the cache's states then updated through its own methods (a prefill, a chunk of
    several tokens, gradients wanted, or recorded past states). Returns q, k, v [B * S, heads, D]."""
    width = conv_state_len(config)
    if conv_state is not None and conv_state.shape[-1] != width:
        # transformers' past recording (assisted generation, deferred stop checks) keeps every step's conv window;
        # its own ZAYA attention fails on such a state too (a view error), and rolling one back is not defined
        raise ValueError(f"kernelize: layer {attn.layer_idx}'s conv state holds {conv_state.shape[-1]} columns, not "
                         f"the {width} the CCA convolutions read: a cache recording its past (assisted generation) "
                         "is not supported for ZAYA")
    cu_seqlens, every_row = batch_layout.cu_seqlens, batch_layout.every_row
    has_state = None
    delayed_bias = proj.v_proj_delayed.bias
    if conv_state is None and delayed_bias is not None:  # a fresh sequence: zero conv columns, and see below
        conv_state = qk.new_zeros(batch, qk.shape[-1], width)
    if conv_state is not None:
        has_state = every_row
        if value_state is None:  # transformers' Vd_{-1} = v_proj_delayed(0): its bias (differentiable), or 0
            value_state = (delayed_bias.expand(batch, -1) if delayed_bias is not None else
                           torch.zeros(batch, v_delayed.shape[-1], dtype=qk.dtype, device=qk.device))
    q, k, v, final_conv, final_value = zaya_ops.cca_prepare(
        qk, v_current, v_delayed, proj.conv_qk_depthwise.weight.squeeze(1),
        proj.conv_qk_depthwise.bias, proj.conv_qk_grouped.weight, proj.conv_qk_grouped.bias, attn.qk_norm.temp,
        batch_layout.positions, cu_seqlens,
        config.num_attention_heads, config.num_key_value_heads, rotary_dim, rope_theta,
        *(None if state is None else (state.clone() if torch.is_grad_enabled() else state.contiguous())
          for state in (conv_state, value_state)),  # a copy for autograd: the cache updates its own in place
        has_state)
    if cache is not None:
        cache.update_conv_state(final_conv.to(qk.dtype), attn.layer_idx)
        cache.update_recurrent_state(final_value.to(qk.dtype), attn.layer_idx)
    return q, k, v


class _BatchLayout:
    """What every layer's attention needs to know about the batch, made once per forward.

    positions int [B * S]: every token's RoPE position, row by row (position_ids [1 or B, S] expanded once);
    cu_seqlens int32 [B+1] (B rows of S tokens) and every_row int32 [B] (ones) for cca_prepare; unpadded: no
    padding at all; seq_starts int32 [B] or None: the pad count of each row of a left-padded batch, whose 2D mask
    covers mask_len positions (past and new tokens); packed: (cu_seqlens int32, max length) of the sequences packed
    into the rows (position_ids restarting, no mask, no cache: transformers then masks attention block-diagonally,
    while its convolutions run across the boundaries), which zaya::cca_attention attends over instead of the rows.
    A left-padded prefill (the mask covers the new tokens only) attends over 2B sequences: each row's pads, then
    its tokens (cu_seqlens int32 [2B+1], built on the device from the pad counts).
    """

    def __init__(self, batch, seq, device, position_ids, unpadded, seq_starts=None, mask_len=0, packed=None):
        self.cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * seq
        # one copy per forward, not per layer (position_ids is often [1, S], expanded over the rows)
        self.positions = position_ids.expand(batch, seq).reshape(-1).contiguous()
        self.every_row = torch.ones(batch, dtype=torch.int32, device=device)
        self._batch, self._device, self._rows = batch, device, None
        self.unpadded, self.seq_starts, self.mask_len = unpadded, seq_starts, mask_len
        self.attention_cu_seqlens, self.attention_max_seqlen = packed if packed is not None else (self.cu_seqlens, seq)
        self.padded_prefill = seq_starts is not None and mask_len == seq
        if self.padded_prefill:
            bounds = torch.empty(2 * batch + 1, dtype=torch.int32, device=device)
            bounds[0:2 * batch:2] = self.cu_seqlens[:-1]
            bounds[1:2 * batch:2] = self.cu_seqlens[:-1] + seq_starts
            bounds[-1] = batch * seq
            self.attention_cu_seqlens = bounds
        self._per_length = {}

    @property
    def rows(self):
        """int32 [B] 0..B-1: each row's slot in transformers' conv and value state tensors (made on first use)."""
        if self._rows is None:
            self._rows = torch.arange(self._batch, dtype=torch.int32, device=self._device)
        return self._rows

    def lengths_and_starts(self, length):
        """(seq_lens int32 [B], seq_starts int32 [B] or None) for a layer whose cache tensor holds `length`
        positions: a sliding-window layer keeps the last ones only, so its pads start `mask_len - length` earlier
        (clamped at 0). Built once per length and forward, shared by the layers."""
        if length not in self._per_length:
            seq_lens = torch.full_like(self.every_row, length)
            starts = self.seq_starts
            if starts is not None:
                starts = (starts - (self.mask_len - length)).clamp_min(0).to(torch.int32)
            self._per_length[length] = (seq_lens, starts)
        return self._per_length[length]


def _left_pad_counts(attention_mask, batch):
    """int32 [B] pad counts when `attention_mask` is a 2D left-padding mask (per row zeros, then ones, the last
    position a token), else None. One host synchronisation per forward."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        return None
    mask = attention_mask.to(torch.int32)
    ones_after_zeros = bool(((mask == 0) | (mask == 1)).all() & (mask[:, 1:] >= mask[:, :-1]).all()
                            & (mask[:, -1] == 1).all())
    return (mask.shape[1] - mask.sum(1)).to(torch.int32) if ones_after_zeros else None


def _packed_sequences(position_ids, batch, device):
    """(cu_seqlens int32 [N+1], longest length) of the sequences packed into the rows of a batch whose positions
    restart (transformers' find_packed_sequence_indices: a new sequence wherever the position does not grow by 1),
    or None when every row is one sequence. One host synchronisation."""
    positions = position_ids.expand(batch, -1)
    first = torch.ones_like(positions, dtype=torch.bool)
    first[:, 1:] = (positions[:, 1:] - positions[:, :-1]) != 1
    starts = first.reshape(-1).nonzero().flatten().tolist()  # the one device->host copy
    if len(starts) == batch:  # only the row starts: one sequence per row
        return None
    starts.append(positions.numel())
    longest = max(b - a for a, b in zip(starts[:-1], starts[1:]))
    return torch.tensor(starts, dtype=torch.int32, device=device), longest


def _zaya_attention_path(attn, cache, layout) -> str:
    """Which attention runs for this layer: a zaya op, or transformers' interface with the reason."""
    from transformers.cache_utils import DynamicLayer

    if attn.training and attn.attention_dropout > 0.0:
        return "transformers (attention dropout)"
    if cache is not None and not isinstance(cache.layers[attn.layer_idx], DynamicLayer):
        return f"transformers ({type(cache.layers[attn.layer_idx]).__name__})"
    fresh = cache is None or cache.get_seq_length(attn.layer_idx) == 0
    if not fresh and grad_wanted(attn.parameters()):
        return "transformers (gradients through a cached prefix: the decode kernels have no backward)"
    if layout.unpadded:
        return "zaya::cca_attention" if fresh else "zaya::cca_attention_decode"
    if layout.seq_starts is None:
        return "transformers (padding that is not left padding, or a prepared mask mapping)"
    if not fresh:
        return "zaya::cca_attention_decode"
    if attn.training:
        return "transformers (prefill of a padded batch in training)"
    return "zaya::cca_attention" if layout.padded_prefill else "transformers (a padding mask longer than the input)"


def attention_paths(model) -> list:
    """Per layer of a kernelize'd model: the attention that ran last ("zaya::cca_attention",
    "zaya::cca_attention_decode", or "transformers (<why>)"), None for a layer that has not run."""
    base = model.model if hasattr(model, "lm_head") else model
    return [getattr(layer.self_attn, "_zaya_attention_path", None) for layer in base.layers]


def _integer_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids of another dtype as int64 (the CCA ops index RoPE with int32 / int64): transformers' rotary
    embedding takes any integer dtype and whole-valued floats, so those are converted; fractional positions raise."""
    if position_ids.is_floating_point() and not torch.equal(position_ids, position_ids.round()):
        raise ValueError(f"zaya kernelize: position_ids must hold whole numbers (the CCA ops apply RoPE at integer "
                         f"positions), got fractional values of dtype {position_ids.dtype}")
    if position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError(f"zaya kernelize: position_ids must be an integer tensor, got {position_ids.dtype}")
    return position_ids.to(torch.int64)


def model_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                  use_cache=None, **kwargs):
    """ZayaModel.forward on zaya ops (see the module docstring); same arguments and cache behaviour."""
    mz = _zaya_classes()
    kwargs.pop("past_key_values", None) if cache is not None else None
    cache = kwargs.pop("past_key_values", cache)
    for unrecorded in ("output_attentions", "output_hidden_states", "output_router_logits"):
        # transformers records these with hooks on the layer modules, whose forwards the fused loop below does
        # not call: refused rather than returned as None
        if kwargs.pop(unrecorded, None) or getattr(self.config, unrecorded, False):
            raise ValueError(f"kernelize: {unrecorded}=True is not supported by the kernelized forward; "
                             "run the unmodified model for it")
    kwargs.pop("return_dict", None)
    checkpointing = self.gradient_checkpointing and self.training
    if checkpointing:  # a recomputed layer would write its cache states twice: no cache while checkpointing
        use_cache, cache = False, None
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if use_cache and cache is None:
        cache = mz.DynamicCache(config=self.config)
    given_positions = position_ids is not None
    if given_positions and position_ids.dtype not in (torch.int32, torch.int64):
        position_ids = _integer_positions(position_ids)
    if position_ids is None:
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens)[None]
    if not isinstance(mask_mapping := attention_mask, dict):
        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                       "cache": cache, "position_ids": position_ids}
        makers = {"hybrid": mz.create_causal_mask, "hybrid_sliding": mz.create_sliding_window_causal_mask}
        mask_mapping = {kind: makers[kind](**mask_kwargs) for kind in set(self.config.layer_types)}
        mask_mapping["conv"] = mz.create_recurrent_attention_mask(**mask_kwargs)
    # transformers' rotary tables: only its own CCA projection reads them (cca_prepare computes RoPE in-kernel)
    position_embeddings = {} if self._zaya_cca else {kind: self.rotary_emb(inputs_embeds, position_ids, kind)
                                                     for kind in set(self.config.layer_types)}

    with use_backend(self._zaya_backend):
        layers = self.layers
        batch, seq, hidden = inputs_embeds.shape
        first_norm = layers[0].input_layernorm if len(layers) else self.norm
        residual, normed = call(
            torch.ops.zaya.residual_scale_rmsnorm,
            inputs_embeds.to(first_norm.weight.dtype).reshape(-1, hidden).contiguous(), None,
            self.input_hidden_states_scale, self.input_hidden_states_bias, None, None, first_norm.weight,
            _norm_eps(first_norm))
        residual, normed = residual.view(batch, seq, hidden), normed.view(batch, seq, hidden)
        router_state = None
        # the zaya attention ops need an unpadded or left-padded batch; a prepared mask mapping cannot be checked
        unpadded = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and bool(attention_mask.all()))
        seq_starts = None if unpadded else _left_pad_counts(attention_mask, batch)
        # as transformers' masks: sequences packed into rows only without a mask and without a cache
        packed = (_packed_sequences(position_ids, batch, inputs_embeds.device)
                  if given_positions and attention_mask is None and cache is None else None)
        batch_layout = _BatchLayout(batch, seq, inputs_embeds.device, position_ids, unpadded, seq_starts,
                                    attention_mask.shape[-1] if seq_starts is not None else 0, packed)

        def layer_step(idx, residual, normed, router_state):
            layer = layers[idx]
            kind = self.config.layer_types[idx]
            layer_masks = {"causal": mask_mapping[kind], "conv": mask_mapping.get("conv")}
            if self._zaya_cca:
                attn_out, _ = attention_forward(layer.self_attn, normed, layer_masks, cache,
                                                self.config, batch_layout, **kwargs)
            else:
                attn_out, _ = layer.self_attn(hidden_states=normed, attention_mask=layer_masks, cache=cache,
                                              position_embeddings=position_embeddings[kind], **kwargs)
            residual, normed = _fused_residual_norm(attn_out, residual, layer.post_attention_residual_scale,
                                                    layer.post_attention_layernorm)
            moe_out, router_state = layer.mlp(normed, router_state)
            next_norm = layers[idx + 1].input_layernorm if idx + 1 < len(layers) else self.norm
            residual, normed = _fused_residual_norm(moe_out, residual, layer.post_mlp_residual_scale, next_norm)
            return residual, normed, router_state

        for idx in range(len(layers)):
            # transformers' activation checkpointing function, one decoder layer per segment, on the layers it
            # marked (activation_checkpointing_enable(every_n_layers=n) marks every n-th)
            if checkpointing and getattr(layers[idx], "gradient_checkpointing", True):
                residual, normed, router_state = self._gradient_checkpointing_func(
                    functools.partial(layer_step, idx), residual, normed, router_state)
            else:
                residual, normed, router_state = layer_step(idx, residual, normed, router_state)
    return mz.MoeModelOutputWithPast(last_hidden_state=normed, cache=cache if use_cache else None)


def kernelize(model, backend: str = "auto", cca: bool = True, stack_projections: bool = False):
    """Swap the zaya ops into a transformers ZayaForCausalLM or ZayaModel in place and return it.

    backend: the zaya backend the model's ops use (auto, triton, hip or reference), whatever the global setting.
    cca: run the CCA projection on `zaya::cca_prepare` (False keeps transformers' projection module).
    stack_projections: in inference forwards (no gradient wanted), one GEMM over a stacked copy of each layer's
    q/k/v projection weights instead of their four modules (see the module docstring: an edit of those weights
    through `.data` then needs `forget_stacked_projections(model)`; adapters such as LoRA still run their own
    forwards). Only with cca=True.
    Call it once; calling it again only changes these settings.
    """
    mz = _zaya_classes()
    base = model.model if isinstance(model, mz.ZayaForCausalLM) else model
    if not isinstance(base, mz.ZayaModel):
        raise TypeError(f"kernelize: expected a transformers ZayaForCausalLM or ZayaModel, got {type(model).__name__}")
    with use_backend(backend):  # validates the name now rather than at the first forward
        pass
    if stack_projections and not cca:
        raise ValueError("kernelize: stack_projections=True needs cca=True (with cca=False transformers' own "
                         "projection module runs)")
    if cca:  # a RoPE variant cca_prepare does not implement fails now, not with wrong logits later
        for layer_type in set(base.config.layer_types):
            rope_settings(base.config, layer_type)
    base._zaya_backend = backend
    base._zaya_cca = cca
    for layer in base.layers:
        layer.self_attn._zaya_stack_projections = stack_projections
    base.forward = types.MethodType(model_forward, base)
    for layer in base.layers:
        gate = layer.mlp.gate
        if gate.balancing_biases.dtype != torch.float32:  # cast with the model: same values, fp32 as the ops need
            gate.balancing_biases = gate.balancing_biases.float()
        layer.mlp.zaya_silu_experts = base.config.hidden_act == "silu"  # the activation the MoE kernels implement
        layer.mlp.forward = types.MethodType(moe_block_forward, layer.mlp)
    return model


def update_balancing_biases(model, *, mode: str = "adamw", include_skip: bool = True, group=None, **controller):
    """One balancing step per layer from the expert choices of the training forwards since the last call.

    model: a kernelize'd transformers ZAYA model, or a zaya_kernels.modules ZayaForCausalLM / ZayaModel.

    mode, include_skip, group and the controller settings (lr, betas, eps for "adamw"; kp, ki, kd for "pid") are
    those of `zaya_kernels.ops.router_balance_update`; each router keeps its controller state between calls.
    Returns the per-layer loads fp32 [layers, E+1] (fraction of tokens per class), or None if no training forward
    ran since the last call (without a group). With a group every rank joins every layer's count reduction, a rank
    that ran no training forward with zero counts (skipping it would pair its peers' reduction with whatever
    collective it runs next).
    """
    from zaya_kernels.ops import new_balance_state, router_balance_update

    loads = []
    for layer in _decoder_layers(model):
        counts = getattr(layer.mlp, "_zaya_class_counts", None)
        gate = layer.mlp.gate
        biases = gate.balancing_biases
        if counts is None:
            if group is None:
                continue
            counts = torch.zeros(biases.shape[0], dtype=torch.int64, device=biases.device)
        key = f"_zaya_balance_state_{mode}"
        if not hasattr(gate, key):
            setattr(gate, key, new_balance_state(biases.shape[0], biases.device))
        elif getattr(gate, key)[0].device != biases.device:  # the model moved since (model.to(device))
            setattr(gate, key, tuple(t.to(biases.device) for t in getattr(gate, key)))
        _, layer_loads = router_balance_update(None, biases, *getattr(gate, key), counts=counts,
                                               mode=mode, include_skip=include_skip, group=group, **controller)
        layer.mlp._zaya_class_counts = None
        loads.append(layer_loads)
    return torch.stack(loads) if loads else None


def _decoder_layers(model):
    base = model.model if hasattr(model, "lm_head") else model  # a causal LM (transformers' or zaya_kernels.modules')
    return base.layers


def balancing_state_dict(model) -> dict:
    """The balancing controllers' state, for a training checkpoint (it is not in the model's state_dict, which stays
    transformers'): {"layers.<i>.<mode>": {"state": fp32 [2, E+1], "step": int64 [1]}} for every layer and mode
    `update_balancing_biases` has run. Restore with `load_balancing_state_dict` to continue the same trajectory
    (AdamW's moments and step count, the PID integral and previous error)."""
    out = {}
    for i, layer in enumerate(_decoder_layers(model)):
        for mode in BALANCE_MODES:
            saved = getattr(layer.mlp.gate, f"_zaya_balance_state_{mode}", None)
            if saved is not None:
                out[f"layers.{i}.{mode}"] = {"state": saved[0].detach().clone(), "step": saved[1].detach().clone()}
    return out


def load_balancing_state_dict(model, state_dict: dict) -> None:
    """Restore what `balancing_state_dict` returned (onto each layer's balancing-bias device)."""
    layers = _decoder_layers(model)
    for key, value in state_dict.items():
        _, index, mode = key.split(".")
        if mode not in BALANCE_MODES or not 0 <= int(index) < len(layers):
            raise ValueError(f"load_balancing_state_dict: unknown entry {key!r} for a model of {len(layers)} layers")
        gate = layers[int(index)].mlp.gate
        device = gate.balancing_biases.device
        setattr(gate, f"_zaya_balance_state_{mode}", (value["state"].to(device, torch.float32).clone(),
                                                      value["step"].to(device, torch.int64).clone()))
