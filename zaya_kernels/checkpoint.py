"""Checkpoint loading for ZAYA models: transformers' safetensors checkpoints and Zyphra's legacy 80-layer layout.

Names. Every function here returns, and every loader expects, transformers' ZAYA parameter names: the keys of
`transformers.ZayaForCausalLM(config).state_dict()` (`model.embed_tokens.weight`,
`model.layers.{k}.self_attn.qkv_proj.q_proj.weight`, `model.layers.{k}.mlp.experts.gate_up_proj`, ...,
`lm_head.weight`). A `ZayaModel` (or any module with the same names under no `model.` prefix) is handled by
`load_checkpoint`, which adds or strips the `model.` prefix as the target module needs.

Formats read (`load_state_dict`):
- a directory with `model.safetensors` (what `save_pretrained` writes for a small model);
- a directory with `model.safetensors.index.json` + the shards it names (`save_pretrained(max_shard_size=...)`);
- a single `.safetensors` file, or an index `.json` file, given by path.
`save_pretrained` leaves `lm_head.weight` out when the embeddings are tied; `load_state_dict` puts it back as the
same tensor as `model.embed_tokens.weight` when `config.json` next to the weights says `tie_word_embeddings`
(ZAYA's default, True, when there is no config.json or it does not say), so the result has exactly the keys of
`model.state_dict()`.

Legacy layout. The checkpoints Zyphra first published (Zyphra/ZAYA1-8B before the transformers port, the
"ZAYA1-8B-legacy" / ZAYA1-base exports) and Zyphra's transformers fork store 2L half-layers instead of L decoder
layers: legacy layer 2k is the attention half of transformers layer k, legacy layer 2k+1 its MoE half, each with
its own `input_norm` and a `res_scale` (ResidualScaling) applied at the *entry* of the half-layer that consumes
the previous half-layer's output, plus a model-level `res_scale` before `final_norm`. transformers attaches the
same affine merges at the *exit* of the producing sub-layer, so every residual-scale block moves one half-layer
earlier. `convert_legacy_state_dict` implements the table in `LEGACY_LAYER_TABLE` / `LEGACY_MODEL_TABLE` and the
docstring of `convert_legacy_state_dict`; `load_state_dict` applies it whenever `is_legacy_state_dict` says so.

Sources of the legacy names and of the residual-scale placement (read, not copied):
- Zyphra/transformers, src/transformers/models/zaya/modeling_zaya.py (commit 2d6c3a269c97b649c5946b4247251173c044ceb7):
  the legacy module tree itself. `ZayaModel` builds `layers[n]` as `ZayaDecoderATTLayer` (n even: `self_attn` with
  `o_proj` and `qkv` = CCA: `linear_q`, `linear_k`, `val_proj1`, `val_proj2`, `conv_qk` = Sequential(depthwise
  Conv1d, grouped Conv1d), `temp`; `input_norm`; `res_scale`) or `ZayaDecoderMLPLayer` (n odd: `zaya_block.router`
  with `down_proj`, `rmsnorm_eda`, `router_states_scale` (absent at layer_number 1), `router_mlp` =
  Sequential(Linear, GELU, Linear, GELU, Linear) -> indices 0, 2, 4, buffer `balancing_biases`;
  `zaya_block.experts.local_experts.{e}.linear_fc1/linear_fc2` (SwiGLU: fc1 rows [gate; up]); `input_norm`;
  `res_scale`), then `res_scale` (layer_n = num_hidden_layers) and `final_norm`. `ResidualScaling(layer_n=0)` has
  no `residual_scale`/`residual_bias`; every decoder layer and the model call `res_scale(residual, hidden)` first,
  then `residual = hidden + residual`, then `input_norm(residual)`.
- Zyphra/vllm, vllm/model_executor/models/zaya.py and transformers 5.24 models/zaya/modeling_zaya.py: the target
  (transformers) names and semantics: `input_hidden_states_{scale,bias}` on the embeddings,
  `post_attention_residual_scale` / `post_mlp_residual_scale` after each sub-layer, `mlp.gate.router_mlp.{norm,
  fc1,fc2,out_proj}`, `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I].
- sgl-project/sglang, python/sglang/srt/models/zaya.py (`load_weights`: `local_experts.<i>.linear_fc1` split
  into gate = first half, up = second half) and its CPU loading test for the native format, which pins the same
  name table (layer k -> 2k / 2k+1, post-attention scale -> res_scale of 2k+1, post-MLP scale -> res_scale of
  2k+2, the last layer's post-MLP scale -> model.res_scale, model input scale -> layers.0.res_scale).
transformers 5.24 itself ships no converter for this layout (nothing ZAYA-specific in conversion_mapping.py).

Configs (`load_config`). A checkpoint directory's config.json is either transformers' ZayaConfig format (read by
`ZayaConfig.from_dict` unchanged) or the legacy format of Zyphra's transformers fork, which the first ZAYA1 exports
ship with the legacy tensors (same `"model_type": "zaya"`, so `is_legacy_config` tells them apart by the fields only
the legacy format has). `convert_legacy_config` converts the legacy one field by field through
`LEGACY_CONFIG_TABLE` (rules in `LegacyConfigField`):
  num_hidden_layers (half-layers, 80)  -> num_hidden_layers / 2 (40); or zaya_layers ['a', E]*L -> L, num_experts E
  ffn_hidden_size / ffn_hidden_size_list (fused gate+up, 4096) -> moe_intermediate_size / 2 (2048)
  zaya_mlp_expansion (scalar or per-half-layer list) -> router_hidden_size
  cca_num_q_heads / num_attention_heads, num_query_groups(_list) / num_key_value_heads, kv_channels / head_dim
                                       -> num_attention_heads (query heads), num_key_value_heads, head_dim
  rope_theta, partial_rotary_factor, rope_scaling -> rope_parameters["hybrid"], layer_types ["hybrid"] * L
  norm_epsilon -> rms_norm_eps; moe_router_topk (must be 1) -> num_experts_per_tok; activation_func "swiglu" ->
  hidden_act "silu"; vocab_size, hidden_size, num_experts, max_position_embeddings, cca_time0/1, attention_bias,
  lm_head_bias, tie_word_embeddings, token ids, initializer_range, attention_dropout, use_cache: copied
  required (else CheckpointError): cca, zaya_use_mod, zaya_use_eda, scale_residual_merge, gated_linear_unit true;
  add_bias_linear, clamp_temp false; normalization "RMSNorm"; sliding_window / swa_layers null or 0
  informational (dropped, listed in LoadedConfig.dropped): residual_in_fp32, zaya_high_prec, fused_add_norm,
  apply_rope_fusion, bias_activation_fusion, activation_func_fp8_input_store, _attn_implementation, auto_map,
  swa_rotary_base and the generic PretrainedConfig fields (transformers_version, _name_or_path, generation
  defaults, ...); torch_dtype -> dtype and architectures are carried
  anything else: CheckpointError naming the field (an unknown field may change the math).
Sources of the legacy config fields (read, not copied):
- Zyphra/transformers, src/transformers/models/zaya/configuration_zaya.py at 2d6c3a269c97b649c5946b4247251173c044ceb7
  (the field set and the defaults used for absent fields: cca, cca_num_q_heads, num_query_groups, ffn_hidden_size,
  num_hidden_layers=80, num_attention_heads=16 with kv_channels = hidden_size / num_attention_heads, activation_func,
  norm_epsilon, rope_theta, moe_router_topk, normalization, zaya_mlp_expansion, zaya_use_mod/eda/high_prec,
  add_bias_linear, gated_linear_unit, scale_residual_merge, residual_in_fp32, the fusion switches, sliding_window,
  rope_scaling, partial_rotary_factor, num_key_value_heads), at f0ab5bef9e23b79a9b32f50500d0b52f273a9baf (+ clamp_temp,
  cca_time0, cca_time1) and at 00f929ecce7aed3871133539e0baea6c178a78ee (the per-half-layer form: zaya_layers,
  cca_num_q_heads and zaya_mlp_expansion as lists, num_query_groups_list, ffn_hidden_size_list);
  modeling_zaya.py at 2d6c3a2 for what each field does: the attention views the CCA output as
  num_attention_heads // 2 query heads of hidden_size // num_attention_heads, CCA takes cca_num_q_heads query and
  num_query_groups key heads, the experts' linear_fc1 is ffn_hidden_size wide and chunked into gate / up when
  gated_linear_unit, ZayaRouter has num_experts + 1 classes when zaya_use_mod and router_states_scale when
  zaya_use_eda, res_scale exists when scale_residual_merge, the rotary embedding reads rope_theta,
  partial_rotary_factor and rope_scaling's rope_type, a non-null sliding_window masks every layer.
- sgl-project/sglang, python/sglang/srt/configs/zaya.py (commit c730352a89edf59562da38be51766f3eec3d0b51), which
  "mirrors the field set used by Zyphra/ZAYA1-base/config.json": the other head convention (num_attention_heads =
  query heads with an explicit head_dim / kv_channels), per-layer lists reduced to their one non-zero value,
  zaya_layers overriding num_hidden_layers, num_query_groups == num_key_value_heads, swa_layers / swa_rotary_base.
- vllm-project/vllm, vllm/transformers_utils/configs/zaya.py (commit 15aac33e172a30601f7ae261dd292bb1ab49f4cd): the
  legacy aliases of a transformers-format config, i.e. the legacy values transformers' ZAYA corresponds to
  (ffn_hidden_size = 2 * moe_intermediate_size, zaya_mlp_expansion = router_hidden_size, norm_epsilon =
  rms_norm_eps, moe_router_topk = num_experts_per_tok, cca / zaya_use_mod / zaya_use_eda / gated_linear_unit /
  scale_residual_merge / residual_in_fp32 true, add_bias_linear / clamp_temp false, activation_func "swiglu").
- Zyphra/vllm, vllm/model_executor/layers/mamba/cca.py (commit 0b109c6bbd0941ad318efa253c8fd57b0f08e3e8): clamp_temp
  makes the key scale exp(clamp(temp, 1e-7, 2)) instead of temp.
- transformers 5.24 models/zaya/configuration_zaya.py and modeling_zaya.py: the target fields (always a skip expert,
  EDA from the second layer, residual scaling, SwiGLU experts, residual stream kept in fp32).
The published Zyphra/ZAYA1-8B config.json itself is not in the searched corpus; its field values (80 layers,
ffn_hidden_size 4096, num_attention_heads 8 with head_dim 128, rope_theta 5e6, zaya_mlp_expansion 256, ...) come from
third-party tests that embed it, and agree with the conversion (tests/test_checkpoint.py checks them).

Not covered: the ZAYA1-VL checkpoints (vision LoRA tensors, `mlp.zaya_block` nesting) and quantized exports
(`weight_scale` tensors); their keys are reported as unknown. Legacy experts with biases (`add_bias_linear`)
have no transformers counterpart and are rejected.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

__all__ = [
    "CheckpointError",
    "LoadResult",
    "LEGACY_LAYER_TABLE",
    "LEGACY_MODEL_TABLE",
    "load_state_dict",
    "load_checkpoint",
    "is_legacy_state_dict",
    "convert_legacy_state_dict",
    "LEGACY_CONFIG_TABLE",
    "LegacyConfigField",
    "LoadedConfig",
    "load_config",
    "convert_config",
    "convert_legacy_config",
    "is_legacy_config",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Tensors that stay fp32 whatever `dtype` load_state_dict is asked for: transformers creates the router's balancing
# biases as an fp32 buffer and adds them to fp32 probabilities.
_KEEP_FP32_SUFFIXES = (".balancing_biases",)

_MAX_LISTED = 25  # keys listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint that does not fit: missing / unexpected keys, shape mismatches, or an unreadable layout.
    The message lists the offending key names."""


class LoadResult(NamedTuple):
    """What `load_checkpoint` did not load: keys of the module with no tensor in the checkpoint, and checkpoint
    keys with no place in the module (both empty after a strict load)."""
    missing_keys: list[str]
    unexpected_keys: list[str]


# ----------------------------------------------------------------------------------------------------------------
# Legacy (Zyphra 2L half-layer) name table
# ----------------------------------------------------------------------------------------------------------------

# Per half-layer: (legacy suffix under `model.layers.{n}.`, parity of n, transformers suffix under
# `model.layers.{n // 2}.`). `.weight`/`.bias` pairs are listed for linear layers that may carry a bias
# (attention_bias); the router's down_proj / fc1 / fc2 always have one, out_proj never.
LEGACY_LAYER_TABLE: tuple[tuple[str, str, str], ...] = (
    # even n: attention half-layer (ZayaDecoderATTLayer)
    ("input_norm.weight", "attn", "input_layernorm.weight"),
    ("self_attn.o_proj.weight", "attn", "self_attn.o_proj.weight"),
    ("self_attn.o_proj.bias", "attn", "self_attn.o_proj.bias"),
    ("self_attn.qkv.linear_q.weight", "attn", "self_attn.qkv_proj.q_proj.weight"),
    ("self_attn.qkv.linear_q.bias", "attn", "self_attn.qkv_proj.q_proj.bias"),
    ("self_attn.qkv.linear_k.weight", "attn", "self_attn.qkv_proj.k_proj.weight"),
    ("self_attn.qkv.linear_k.bias", "attn", "self_attn.qkv_proj.k_proj.bias"),
    ("self_attn.qkv.val_proj1.weight", "attn", "self_attn.qkv_proj.v_proj_current.weight"),
    ("self_attn.qkv.val_proj1.bias", "attn", "self_attn.qkv_proj.v_proj_current.bias"),
    ("self_attn.qkv.val_proj2.weight", "attn", "self_attn.qkv_proj.v_proj_delayed.weight"),
    ("self_attn.qkv.val_proj2.bias", "attn", "self_attn.qkv_proj.v_proj_delayed.bias"),
    ("self_attn.qkv.conv_qk.0.weight", "attn", "self_attn.qkv_proj.conv_qk_depthwise.weight"),
    ("self_attn.qkv.conv_qk.0.bias", "attn", "self_attn.qkv_proj.conv_qk_depthwise.bias"),
    ("self_attn.qkv.conv_qk.1.weight", "attn", "self_attn.qkv_proj.conv_qk_grouped.weight"),
    ("self_attn.qkv.conv_qk.1.bias", "attn", "self_attn.qkv_proj.conv_qk_grouped.bias"),
    ("self_attn.qkv.temp", "attn", "self_attn.qk_norm.temp"),
    # odd n: MoE half-layer (ZayaDecoderMLPLayer)
    ("input_norm.weight", "moe", "post_attention_layernorm.weight"),
    ("zaya_block.router.down_proj.weight", "moe", "mlp.gate.down_proj.weight"),
    ("zaya_block.router.down_proj.bias", "moe", "mlp.gate.down_proj.bias"),
    ("zaya_block.router.router_states_scale", "moe", "mlp.gate.router_states_scale"),
    ("zaya_block.router.rmsnorm_eda.weight", "moe", "mlp.gate.router_mlp.norm.weight"),
    ("zaya_block.router.router_mlp.0.weight", "moe", "mlp.gate.router_mlp.fc1.weight"),
    ("zaya_block.router.router_mlp.0.bias", "moe", "mlp.gate.router_mlp.fc1.bias"),
    ("zaya_block.router.router_mlp.2.weight", "moe", "mlp.gate.router_mlp.fc2.weight"),
    ("zaya_block.router.router_mlp.2.bias", "moe", "mlp.gate.router_mlp.fc2.bias"),
    ("zaya_block.router.router_mlp.4.weight", "moe", "mlp.gate.router_mlp.out_proj.weight"),
    ("zaya_block.router.balancing_biases", "moe", "mlp.gate.balancing_biases"),
    # the merge of the attention output into the residual, applied at the entry of the MoE half-layer
    ("res_scale.hidden_states_scale", "moe", "post_attention_residual_scale.hidden_states_scale"),
    ("res_scale.hidden_states_bias", "moe", "post_attention_residual_scale.hidden_states_bias"),
    ("res_scale.residual_scale", "moe", "post_attention_residual_scale.residual_scale"),
    ("res_scale.residual_bias", "moe", "post_attention_residual_scale.residual_bias"),
)
# Not in the table because they are not a rename within one layer:
# - `model.layers.{2k}.res_scale.*` (k >= 1) merges the MoE output of layer k-1: it becomes
#   `model.layers.{k-1}.post_mlp_residual_scale.*`; `model.layers.0.res_scale.hidden_states_{scale,bias}` scales
#   the embeddings: `model.input_hidden_states_{scale,bias}` (layer 0 has no residual_{scale,bias});
# - `model.layers.{2k+1}.zaya_block.experts.local_experts.{e}.linear_fc1.weight` [2I, H] (rows: gate, then up)
#   for e = 0..E-1, stacked: `model.layers.{k}.mlp.experts.gate_up_proj` [E, 2I, H];
#   `...linear_fc2.weight` [H, I], stacked: `model.layers.{k}.mlp.experts.down_proj` [E, H, I].

# Model-level keys: legacy name -> transformers name. `{last}` is the last transformers layer, L - 1.
LEGACY_MODEL_TABLE: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.final_norm.weight", "model.norm.weight"),
    ("model.res_scale.hidden_states_scale", "model.layers.{last}.post_mlp_residual_scale.hidden_states_scale"),
    ("model.res_scale.hidden_states_bias", "model.layers.{last}.post_mlp_residual_scale.hidden_states_bias"),
    ("model.res_scale.residual_scale", "model.layers.{last}.post_mlp_residual_scale.residual_scale"),
    ("model.res_scale.residual_bias", "model.layers.{last}.post_mlp_residual_scale.residual_bias"),
    ("lm_head.weight", "lm_head.weight"),
    ("lm_head.bias", "lm_head.bias"),
)

_RES_FIELDS = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^zaya_block\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|bias)$")
# A key is legacy if it has one of these pieces (none occurs in a transformers ZAYA name) ...
_LEGACY_MARKERS = re.compile(
    r"(^model\.final_norm\.|^model\.res_scale\.|\.zaya_block\.|\.res_scale\.|\.input_norm\.|\.self_attn\.qkv\.)")
# ... and a transformers name if it has one of these (none occurs in a legacy name).
_TRANSFORMERS_MARKERS = re.compile(
    r"(^model\.norm\.|^model\.input_hidden_states_|\.input_layernorm\.|\.post_attention_layernorm\.|"
    r"_residual_scale\.|\.self_attn\.qkv_proj\.|\.mlp\.gate\.|\.mlp\.experts\.)")

_LAYER_TABLE = {(legacy, kind): new for legacy, kind, new in LEGACY_LAYER_TABLE}
_MODEL_TABLE = dict(LEGACY_MODEL_TABLE)


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def is_legacy_state_dict(state_dict: Mapping[str, object] | Iterable[str]) -> bool:
    """True if the keys (a state dict or an iterable of names) are in Zyphra's legacy 2L half-layer layout, False
    if they are in transformers' layout (or hold no ZAYA-specific name at all, e.g. only embeddings).

    Legacy keys are recognised by pieces no transformers ZAYA name has: `zaya_block`, `res_scale`, `input_norm`,
    `self_attn.qkv.` and `model.final_norm`. Raises CheckpointError if the keys mix both layouts.
    """
    keys = list(state_dict.keys() if isinstance(state_dict, Mapping) else state_dict)
    legacy = [k for k in keys if _LEGACY_MARKERS.search(k)]
    if not legacy:
        return False
    current = [k for k in keys if _TRANSFORMERS_MARKERS.search(k)]
    if current:
        raise CheckpointError(
            "checkpoint mixes Zyphra's legacy layout and transformers' ZAYA names: legacy keys "
            f"[{_listing(legacy)}] next to transformers keys [{_listing(current)}]")
    return True


def _config_value(config, name: str):
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def convert_legacy_state_dict(state_dict: Mapping[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """Rename (and restack) a legacy Zyphra ZAYA1 state dict into transformers' ZAYA names.

    state_dict: legacy names, 2L half-layers (`model.layers.{n}.*`, n even = attention, n odd = MoE), e.g. the
      2,483 tensors of the original Zyphra/ZAYA1-8B (80 half-layers, 16 experts).
    config: optional; a transformers ZayaConfig, or any object / mapping with `num_hidden_layers` (L, transformers
      decoder layers) and `num_experts`, to check the checkpoint against. None: L and E come from the tensors.

    Mapping (k = n // 2, L = number of transformers layers = number of legacy half-layers / 2):
    - per half-layer renames: `LEGACY_LAYER_TABLE` (input_norm of 2k -> input_layernorm of k, of 2k+1 ->
      post_attention_layernorm of k; CCA: linear_q/linear_k -> q_proj/k_proj, val_proj1/val_proj2 ->
      v_proj_current/v_proj_delayed, conv_qk.0/conv_qk.1 -> conv_qk_depthwise/conv_qk_grouped, qkv.temp ->
      qk_norm.temp; router: rmsnorm_eda -> router_mlp.norm, router_mlp.0/2/4 -> router_mlp.fc1/fc2/out_proj;
      res_scale of 2k+1 -> post_attention_residual_scale of k);
    - residual-scale shift: res_scale of 2k (k >= 1) -> post_mlp_residual_scale of k-1, model.res_scale ->
      post_mlp_residual_scale of L-1, layers.0.res_scale.hidden_states_{scale,bias} ->
      model.input_hidden_states_{scale,bias};
    - experts: local_experts.{e}.linear_fc1.weight [2I, H] stacked over e -> mlp.experts.gate_up_proj [E, 2I, H]
      (the fused rows are already [gate; up], the order transformers' `chunk(2)` reads); linear_fc2.weight [H, I]
      -> mlp.experts.down_proj [E, H, I];
    - model level: `LEGACY_MODEL_TABLE` (final_norm -> norm; embed_tokens and lm_head unchanged).
    Tensors are not copied except where experts are stacked; dtypes and devices are kept.

    Raises CheckpointError naming the keys for: keys the table does not know, attention keys on an odd layer or
    MoE keys on an even one, an odd number of half-layers, missing or inconsistent experts, expert biases, and a
    layer / expert count that disagrees with `config`.
    """
    layer_keys: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    model_level: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        match = _LAYER_RE.match(key)
        if match:
            layer_keys.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        elif key in _MODEL_TABLE:
            model_level[key] = tensor
        else:
            unknown.append(key)
    if not layer_keys:
        raise CheckpointError("legacy ZAYA checkpoint has no `model.layers.{n}.*` tensors")
    num_half = max(layer_keys) + 1
    absent = sorted(set(range(num_half)) - set(layer_keys))
    if absent:
        raise CheckpointError(f"legacy ZAYA checkpoint has no tensors for half-layers {absent} (of 0..{num_half - 1})")
    if num_half % 2:
        raise CheckpointError(
            f"legacy ZAYA checkpoint has {num_half} half-layers; the layout alternates attention (even) and MoE "
            "(odd) half-layers, so the count must be even")
    num_layers = num_half // 2
    want_layers = _config_value(config, "num_hidden_layers")
    if want_layers is not None and want_layers != num_layers:
        raise CheckpointError(f"legacy ZAYA checkpoint has {num_half} half-layers = {num_layers} decoder layers, "
                              f"config says num_hidden_layers={want_layers}")
    want_experts = _config_value(config, "num_experts")

    misplaced: list[str] = []
    expert_count: int | None = None
    for n in range(num_half):
        k, is_moe = n // 2, n % 2 == 1
        kind = "moe" if is_moe else "attn"
        experts: dict[str, dict[int, torch.Tensor]] = {"linear_fc1": {}, "linear_fc2": {}}
        for suffix, tensor in layer_keys[n].items():
            full = f"model.layers.{n}.{suffix}"
            if (suffix, kind) in _LAYER_TABLE:
                out[f"model.layers.{k}.{_LAYER_TABLE[(suffix, kind)]}"] = tensor
                continue
            if not is_moe and suffix.startswith("res_scale."):
                field = suffix[len("res_scale."):]
                if field not in _RES_FIELDS:
                    unknown.append(full)
                elif n == 0:
                    if field.startswith("residual_"):  # layer 0 has no incoming residual: no such parameter
                        unknown.append(full)
                    else:
                        out[f"model.input_{field}"] = tensor
                else:
                    out[f"model.layers.{k - 1}.post_mlp_residual_scale.{field}"] = tensor
                continue
            expert = _EXPERT_RE.match(suffix)
            if expert and is_moe:
                if expert.group(3) == "bias":
                    raise CheckpointError(
                        f"legacy expert bias {full}: transformers' ZAYA experts have no biases (add_bias_linear)")
                experts[expert.group(2)][int(expert.group(1))] = tensor
                continue
            if (suffix, "attn" if is_moe else "moe") in _LAYER_TABLE or expert:
                misplaced.append(full)
            else:
                unknown.append(full)
        if is_moe:
            out.update(_stack_experts(n, k, experts, expert_count))
            expert_count = len(experts["linear_fc1"]) or expert_count
    if misplaced:
        raise CheckpointError(
            "legacy ZAYA checkpoint has attention tensors on an odd (MoE) half-layer or MoE tensors on an even "
            f"(attention) half-layer: {_listing(misplaced)}")
    if unknown:
        raise CheckpointError(f"legacy ZAYA checkpoint has keys the legacy name table does not know: "
                              f"{_listing(unknown)}")
    if want_experts is not None and expert_count is not None and want_experts != expert_count:
        raise CheckpointError(f"legacy ZAYA checkpoint has {expert_count} experts per layer, config says "
                              f"num_experts={want_experts}")
    last = num_layers - 1
    for key, tensor in model_level.items():
        out[_MODEL_TABLE[key].format(last=last)] = tensor
    return out


def _stack_experts(n: int, k: int, experts: dict[str, dict[int, torch.Tensor]], expected: int | None):
    """{gate_up_proj [E, 2I, H], down_proj [E, H, I]} of transformers layer k from legacy half-layer n's experts."""
    fc1, fc2 = experts["linear_fc1"], experts["linear_fc2"]
    if not fc1 and not fc2:
        raise CheckpointError(f"legacy MoE half-layer {n} has no zaya_block.experts.local_experts.*.linear_fc1/"
                              "linear_fc2 weights")
    count = max(max(fc1, default=-1), max(fc2, default=-1)) + 1
    prefix = f"model.layers.{n}.zaya_block.experts.local_experts"
    missing = [f"{prefix}.{e}.{name}.weight" for e in range(count) for name, got in (("linear_fc1", fc1),
                                                                                      ("linear_fc2", fc2))
               if e not in got]
    if missing:
        raise CheckpointError(f"legacy MoE half-layer {n} is missing expert weights: {_listing(missing)}")
    if expected is not None and count != expected:
        raise CheckpointError(f"legacy MoE half-layer {n} has {count} experts, earlier MoE half-layers have "
                              f"{expected}")
    for name, got in (("linear_fc1", fc1), ("linear_fc2", fc2)):
        shapes = {tuple(t.shape) for t in got.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise CheckpointError(f"legacy MoE half-layer {n}: {prefix}.*.{name}.weight have shapes "
                                  f"{sorted(shapes)}; expected one 2-D shape for all experts")
    gate_up = torch.stack([fc1[e] for e in range(count)])
    down = torch.stack([fc2[e] for e in range(count)])
    if gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
        raise CheckpointError(
            f"legacy MoE half-layer {n}: linear_fc1 {tuple(gate_up.shape[1:])} and linear_fc2 "
            f"{tuple(down.shape[1:])} do not form a SwiGLU expert ([2I, H] and [H, I])")
    return {f"model.layers.{k}.mlp.experts.gate_up_proj": gate_up,
            f"model.layers.{k}.mlp.experts.down_proj": down}


# ----------------------------------------------------------------------------------------------------------------
# Reading safetensors checkpoints
# ----------------------------------------------------------------------------------------------------------------

def _resolve(path) -> tuple[str, list[str] | None, str]:
    """(kind, files, directory): kind "single" (files = [one .safetensors]) or "index" (files = [index.json])."""
    path = os.fspath(path)
    if os.path.isdir(path):
        index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(path, SAFE_WEIGHTS_NAME)
        if os.path.isfile(index):
            return "index", [index], path
        if os.path.isfile(single):
            return "single", [single], path
        present = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"{path} is not a ZAYA safetensors checkpoint directory: it has neither {SAFE_WEIGHTS_NAME} nor "
            f"{SAFE_WEIGHTS_INDEX_NAME} (it holds: {present[:20] if present else 'nothing'}). Save checkpoints with "
            "save_pretrained(..., safe_serialization=True).")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "single", [path], os.path.dirname(path)
        if path.endswith(".json"):
            return "index", [path], os.path.dirname(path)
        raise FileNotFoundError(f"{path} is neither a .safetensors file, a safetensors index .json, nor a directory")
    raise FileNotFoundError(f"no checkpoint at {path}: no such file or directory")


def _read_index(index_path: str) -> dict[str, list[str]]:
    """shard path -> the tensor names the index assigns to it."""
    try:
        with open(index_path) as handle:
            weight_map = json.load(handle)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a safetensors index (expected a JSON object with a "
                              f"'weight_map' of tensor name -> shard file): {exc}") from exc
    directory = os.path.dirname(index_path)
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(os.path.join(directory, shard), []).append(name)
    missing = sorted(os.path.basename(s) for s in shards if not os.path.isfile(s))
    if missing:
        raise FileNotFoundError(f"{index_path} names shards that are not in {directory}: {missing}")
    return shards


def _read_safetensors(file: str, names: list[str] | None, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt", device=str(torch.device(device))) as handle:
            present = set(handle.keys())
            if names is None:
                names = sorted(present)
            absent = [n for n in names if n not in present]
            if absent:
                raise CheckpointError(f"the index assigns tensors to {os.path.basename(file)} that it does not "
                                      f"hold: {_listing(absent)}")
            return {name: handle.get_tensor(name) for name in names}
    except SafetensorError as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc


def _tied_embeddings(directory: str, tie_word_embeddings: bool | None) -> bool:
    if tie_word_embeddings is not None:
        return tie_word_embeddings
    config_path = os.path.join(directory, CONFIG_NAME)
    if os.path.isfile(config_path):
        with open(config_path) as handle:
            config = json.load(handle)
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        return bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)))
    return True  # ZayaConfig's default, and the released ZAYA1 models tie


def load_state_dict(path, *, device="cpu", dtype: torch.dtype | None = None,
                    tie_word_embeddings: bool | None = None) -> dict[str, torch.Tensor]:
    """Read a ZAYA checkpoint into a dict of transformers' ZAYA parameter names -> tensors.

    path: a directory with `model.safetensors`, or with `model.safetensors.index.json` and its shards (the index
      is preferred when both exist); or the path of one `.safetensors` file or of an index `.json`. The index is
      the list of tensors: a shard's tensors that its weight_map does not name are not read.
    device: where the tensors are created (safetensors reads them straight there).
    dtype: cast every floating tensor to it (the router's `balancing_biases` stay fp32, as transformers keeps
      them); None keeps the stored dtypes.
    tie_word_embeddings: whether `lm_head.weight` is the input embedding; None reads it from `config.json` next to
      the weights (default True). When tied and the checkpoint has no `lm_head.weight`, the result maps it to the
      same tensor as `model.embed_tokens.weight`.

    The legacy Zyphra layout is detected (`is_legacy_state_dict`) and converted (`convert_legacy_state_dict`).
    Returns the keys of `ZayaForCausalLM.state_dict()` for a ZayaForCausalLM checkpoint, or the unprefixed names
    for a checkpoint saved from a ZayaModel. Raises FileNotFoundError when `path` holds no safetensors checkpoint
    and CheckpointError for an unreadable file, an inconsistent index, or a legacy layout it cannot convert.
    """
    kind, files, directory = _resolve(path)
    if kind == "single":
        state = _read_safetensors(files[0], None, device)
    else:
        state = {}
        for shard, names in _read_index(files[0]).items():
            state.update(_read_safetensors(shard, names, device))
    if is_legacy_state_dict(state):
        state = convert_legacy_state_dict(state)
    if dtype is not None:
        state = {name: (t.to(dtype) if t.is_floating_point() and not name.endswith(_KEEP_FP32_SUFFIXES) else t)
                 for name, t in state.items()}
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state and \
            _tied_embeddings(directory, tie_word_embeddings):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


# ----------------------------------------------------------------------------------------------------------------
# Loading into a module
# ----------------------------------------------------------------------------------------------------------------

def _align_prefix(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's names as the module spells them: unchanged, with `model.` added (a ZayaModel checkpoint
    into a ZayaForCausalLM), or with `model.` stripped (a ZayaForCausalLM checkpoint into a ZayaModel; then the
    head's `lm_head.*` tensors, which a base model has no place for, are dropped). Picks the spelling that matches
    the most module keys."""
    def added(key):
        return key if key.startswith("lm_head.") or key.startswith("model.") else "model." + key

    def stripped(key):
        return key[len("model."):] if key.startswith("model.") else key

    options = [dict(state), {added(k): v for k, v in state.items()}]
    if not any(k.startswith("lm_head.") for k in model_keys):
        options.append({stripped(k): v for k, v in state.items() if not k.startswith("lm_head.")})
    else:
        options.append({stripped(k): v for k, v in state.items()})
    return max(options, key=lambda option: len(model_keys & option.keys()))  # first (unchanged) wins ties


def load_checkpoint(model: torch.nn.Module, path, *, strict: bool = True) -> LoadResult:
    """Load a ZAYA checkpoint into `model` in place (under torch.no_grad) and return what was not loaded.

    model: any torch.nn.Module whose state_dict keys are transformers' ZAYA names: a transformers
      ZayaForCausalLM or ZayaModel, one after `zaya_kernels.integrations.transformers.kernelize`, or a
      zaya_kernels module with the same names. The `model.` prefix is added or stripped as the module needs.
    path: anything `load_state_dict` reads (transformers or legacy layout), or an already loaded state dict
      (transformers or legacy names).
    strict: raise CheckpointError if a module key has no tensor in the checkpoint or a checkpoint key has no place
      in the module; False loads what matches and returns the rest in the LoadResult.

    Tensors are copied into the existing parameters and buffers, converted to their dtype and device. Tied
    parameters (lm_head.weight and model.embed_tokens.weight as one tensor) need only one of their names in the
    checkpoint; a checkpoint giving both with different values is an error. Shape mismatches always raise, listing
    each key with the checkpoint's and the module's shape.
    """
    model_state = model.state_dict(keep_vars=True)
    if not model_state:
        raise CheckpointError(f"{type(model).__name__} has no parameters or buffers to load")
    first = next(iter(model_state.values()))
    if isinstance(path, Mapping):
        state = dict(path)
        if is_legacy_state_dict(state):
            state = convert_legacy_state_dict(state)
    else:
        # no config.json next to the weights: the module says whether a missing lm_head.weight is the embedding
        # (tied: one tensor under both names, filled from either), not the tied default, so an untied module
        # missing its head is reported rather than given the embedding
        has_config = os.path.isfile(os.path.join(_resolve(path)[2], CONFIG_NAME))
        module_ties = model_state.get("lm_head.weight") is model_state.get("model.embed_tokens.weight", False)
        state = load_state_dict(path, device=first.device, tie_word_embeddings=None if has_config else module_ties)
    state = _align_prefix(state, set(model_state))

    aliases: dict[int, list[str]] = {}
    for name, tensor in model_state.items():
        aliases.setdefault(id(tensor), []).append(name)
    missing, mismatched, conflicts = [], [], []
    for names in aliases.values():
        given = [n for n in names if n in state]
        if not given:
            missing.extend(names)
            continue
        for name in given:
            if tuple(state[name].shape) != tuple(model_state[name].shape):
                mismatched.append(f"{name}: checkpoint {tuple(state[name].shape)} vs module "
                                  f"{tuple(model_state[name].shape)}")
        if len(given) > 1 and not mismatched and any(
                not torch.equal(state[given[0]], state[n].to(state[given[0]].device)) for n in given[1:]):
            conflicts.append(" / ".join(given))
    unexpected = sorted(set(state) - set(model_state))
    missing.sort()

    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if conflicts:
        problems.append(f"tensors the module ties together but the checkpoint gives different values: "
                        f"{_listing(conflicts)}")
    if strict and missing:
        problems.append(f"missing keys (in the module, not in the checkpoint): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the module): {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"cannot load the checkpoint into {type(model).__name__}: " + "; ".join(problems))

    with torch.no_grad():
        for name, target in model_state.items():
            if name in state:
                target.copy_(state[name])
    return LoadResult(missing, unexpected)


# ----------------------------------------------------------------------------------------------------------------
# config.json: transformers' ZayaConfig and the legacy (Zyphra fork) config
# ----------------------------------------------------------------------------------------------------------------

class LegacyConfigField(NamedTuple):
    """One row of `LEGACY_CONFIG_TABLE`.

    name: the legacy config.json field. target: the transformers ZayaConfig field it feeds (None: none).
    rule: how it converts:
      "copy"        the value is copied to `target` unchanged;
      "half_layers" `target` = value / 2 (the legacy config counts half-layers; must be even);
      "fused_ffn"   `target` = value / 2 (linear_fc1 holds [gate; up], so the fused width is 2 * intermediate);
      "per_layer"   a scalar, or a per-half-layer list (the fork's later form): the entries of the half-layers of
                    the kind the field is about (attention: even, MoE: odd) must all be equal; that value goes to
                    `target` (through "fused_ffn" for ffn_hidden_size_list);
      "heads"       resolved together with the other head fields (see `convert_legacy_config`);
      "rope"        goes into `rope_parameters["hybrid"]`;
      "layers"      `zaya_layers` = ['a', E] * L: L layers of E experts;
      "require"     transformers' ZAYA implements exactly one value, `default`; any other raises;
      "disabled"    must be absent, null, 0 or all 0 (a feature transformers' ZAYA does not have); else raises;
      "info"        does not change the forward math (precision, kernel fusion, training or bookkeeping
                    switches): dropped, and listed in `LoadedConfig.dropped`.
    default: the value the fork's ZayaConfig uses when the field is absent (for "require": the one accepted).
    """
    name: str
    target: str | None
    rule: str
    default: object


_MISSING = object()

# Legacy config.json field -> transformers ZayaConfig field. Defaults are Zyphra/transformers' configuration_zaya.py
# (commit 2d6c3a269c97b649c5946b4247251173c044ceb7; clamp_temp / cca_time0 / cca_time1 from f0ab5bef9e23...; the
# per-half-layer lists from 00f929ecce7a...; swa_layers / swa_rotary_base from sglang's ZayaConfig).
LEGACY_CONFIG_TABLE: tuple[LegacyConfigField, ...] = (
    # sizes
    LegacyConfigField("vocab_size", "vocab_size", "copy", 262272),
    LegacyConfigField("hidden_size", "hidden_size", "copy", 2048),
    LegacyConfigField("num_hidden_layers", "num_hidden_layers", "half_layers", 80),
    LegacyConfigField("zaya_layers", "num_hidden_layers", "layers", None),
    LegacyConfigField("num_experts", "num_experts", "copy", 16),
    LegacyConfigField("ffn_hidden_size", "moe_intermediate_size", "fused_ffn", 4096),
    LegacyConfigField("ffn_hidden_size_list", "moe_intermediate_size", "per_layer", None),
    LegacyConfigField("zaya_mlp_expansion", "router_hidden_size", "per_layer", 256),
    LegacyConfigField("max_position_embeddings", "max_position_embeddings", "copy", 4096),
    # attention heads (CCA)
    LegacyConfigField("num_attention_heads", "num_attention_heads", "heads", 16),
    LegacyConfigField("cca_num_q_heads", "num_attention_heads", "heads", 8),
    LegacyConfigField("num_query_groups", "num_key_value_heads", "heads", 2),
    LegacyConfigField("num_query_groups_list", "num_key_value_heads", "heads", None),
    LegacyConfigField("num_key_value_heads", "num_key_value_heads", "heads", 2),
    LegacyConfigField("kv_channels", "head_dim", "heads", None),
    LegacyConfigField("head_dim", "head_dim", "heads", None),
    LegacyConfigField("cca_time0", "cca_time0", "copy", 2),
    LegacyConfigField("cca_time1", "cca_time1", "copy", 2),
    LegacyConfigField("attention_bias", "attention_bias", "copy", False),
    LegacyConfigField("attention_dropout", "attention_dropout", "copy", 0.0),
    # rotary embedding
    LegacyConfigField("rope_theta", "rope_parameters", "rope", 10000),
    LegacyConfigField("partial_rotary_factor", "rope_parameters", "rope", 0.5),
    LegacyConfigField("rope_scaling", "rope_parameters", "rope", None),
    # norms, router, experts, head
    LegacyConfigField("norm_epsilon", "rms_norm_eps", "copy", 1e-5),
    LegacyConfigField("moe_router_topk", "num_experts_per_tok", "require", 1),
    LegacyConfigField("lm_head_bias", "lm_head_bias", "copy", False),
    LegacyConfigField("tie_word_embeddings", "tie_word_embeddings", "copy", True),
    LegacyConfigField("pad_token_id", "pad_token_id", "copy", 0),
    LegacyConfigField("bos_token_id", "bos_token_id", "copy", 2),
    LegacyConfigField("eos_token_id", "eos_token_id", "copy", 1),
    LegacyConfigField("initializer_range", "initializer_range", "copy", _MISSING),
    LegacyConfigField("use_cache", "use_cache", "copy", True),
    # architecture switches: transformers' ZAYA is the one setting listed
    LegacyConfigField("cca", None, "require", True),                      # CCA attention (False: plain MHA)
    LegacyConfigField("zaya_use_mod", None, "require", True),             # the router's extra skip expert
    LegacyConfigField("zaya_use_eda", None, "require", True),             # router_states_scale from MoE 2 on
    LegacyConfigField("scale_residual_merge", None, "require", True),     # the res_scale blocks
    LegacyConfigField("gated_linear_unit", None, "require", True),        # SwiGLU experts (fc1 = [gate; up])
    LegacyConfigField("activation_func", "hidden_act", "require", "swiglu"),
    LegacyConfigField("normalization", None, "require", "RMSNorm"),
    LegacyConfigField("add_bias_linear", None, "require", False),         # expert biases
    LegacyConfigField("clamp_temp", None, "require", False),              # key temp = exp(clamp(temp)) when True
    LegacyConfigField("sliding_window", "sliding_window", "disabled", None),
    LegacyConfigField("swa_layers", None, "disabled", None),
    # no effect on the forward math
    LegacyConfigField("residual_in_fp32", None, "info", False),  # precision only; transformers keeps it in fp32
    LegacyConfigField("zaya_high_prec", None, "info", True),     # router precision
    LegacyConfigField("fused_add_norm", None, "info", False),
    LegacyConfigField("apply_rope_fusion", None, "info", True),
    LegacyConfigField("bias_activation_fusion", None, "info", True),
    LegacyConfigField("activation_func_fp8_input_store", None, "info", False),
    LegacyConfigField("_attn_implementation", None, "info", "eager"),
    LegacyConfigField("auto_map", None, "info", None),  # the fork's remote code, wrong for transformers' classes
    LegacyConfigField("swa_rotary_base", None, "info", None),  # rope base of swa_layers' windows (which must be 0)
)

# Fields every transformers PretrainedConfig may write (4.x and 5.x): carried over where ZayaConfig has them with
# the same meaning (`_CARRIED_GENERIC`), else dropped as informational. They never change ZAYA's forward math.
_CARRIED_GENERIC = {"architectures": "architectures", "torch_dtype": "dtype", "dtype": "dtype",
                    "output_router_logits": "output_router_logits"}
_GENERIC_CONFIG_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "_attn_implementation_internal",
    "transformers_version", "model_type", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "num_labels", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type", "keys_to_ignore_at_inference",
    "quantization_config",
} | set(_CARRIED_GENERIC))

_LEGACY_CONFIG_FIELDS = {field.name: field for field in LEGACY_CONFIG_TABLE}
# Fields only the legacy config has / only transformers' ZayaConfig writes (`is_legacy_config`).
_LEGACY_ONLY_CONFIG_KEYS = frozenset({
    "ffn_hidden_size", "ffn_hidden_size_list", "zaya_mlp_expansion", "norm_epsilon", "moe_router_topk",
    "cca_num_q_heads", "num_query_groups", "num_query_groups_list", "zaya_layers", "kv_channels", "cca",
    "zaya_use_mod", "zaya_use_eda", "zaya_high_prec", "scale_residual_merge", "residual_in_fp32", "activation_func",
    "gated_linear_unit", "add_bias_linear", "normalization", "clamp_temp", "swa_layers", "swa_rotary_base",
    "fused_add_norm", "apply_rope_fusion", "bias_activation_fusion", "activation_func_fp8_input_store"})
_TRANSFORMERS_ONLY_CONFIG_KEYS = frozenset({
    "moe_intermediate_size", "router_hidden_size", "rms_norm_eps", "num_experts_per_tok", "rope_parameters",
    "layer_types", "hidden_act"})


class LoadedConfig(NamedTuple):
    """What `load_config(..., with_report=True)` / `convert_config` return.

    config: the transformers ZayaConfig.
    legacy: whether the file was a legacy config (converted through `LEGACY_CONFIG_TABLE`).
    dropped: legacy fields present in the file and not carried over because they do not change the forward math
      (rule "info", the generic PretrainedConfig bookkeeping fields, `num_hidden_layers` when `zaya_layers` gives
      the layers, `num_attention_heads` when `cca_num_q_heads` gives the query heads, the required switches once
      checked): name -> value. Empty for a transformers config.
    defaulted: legacy fields absent from the file whose fork default (`LegacyConfigField.default`) was used:
      name -> value. Empty for a transformers config.
    """
    config: object
    legacy: bool
    dropped: dict
    defaulted: dict


def is_legacy_config(config: Mapping[str, object]) -> bool:
    """True if a config.json dict is in the legacy format of Zyphra's transformers fork (the config of the first
    ZAYA1 exports: `num_hidden_layers` counting half-layers, `ffn_hidden_size`, `zaya_mlp_expansion`,
    `norm_epsilon`, `cca_num_q_heads`, ...), False if it is transformers' ZayaConfig format or holds no
    ZAYA-specific field at all (e.g. `{"model_type": "zaya"}`).

    Both formats say `"model_type": "zaya"`; the legacy one is recognised by fields only it has
    (`_LEGACY_ONLY_CONFIG_KEYS`). Raises CheckpointError if the dict has fields only the legacy format has next to
    fields only transformers' has (`moe_intermediate_size`, `router_hidden_size`, `rms_norm_eps`, `layer_types`, ...).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"is_legacy_config takes a config.json dict, not {type(config).__name__}")
    legacy = sorted(_LEGACY_ONLY_CONFIG_KEYS & set(config))
    if not legacy:
        return False
    current = sorted(_TRANSFORMERS_ONLY_CONFIG_KEYS & set(config))
    if current:
        raise CheckpointError(
            f"config mixes the legacy ZAYA fields {legacy} with transformers' ZayaConfig fields {current}; it is "
            "neither format, so which value wins is unknown")
    return True


def _fail(message: str):
    raise CheckpointError(f"legacy ZAYA config: {message}")


def _per_half_layer(name: str, value, half_layers: int, parity: int) -> int:
    """The one value of a per-layer field: a scalar, or a list over half-layers whose entries at `parity` (0:
    attention half-layers, 1: MoE half-layers) among the first `half_layers` must all be equal (lists may be longer:
    released configs pad them)."""
    if not isinstance(value, (list, tuple)):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"{name}={value!r} is neither an integer nor a per-half-layer list of integers")
        return value
    if len(value) < half_layers:
        _fail(f"{name} lists {len(value)} entries for {half_layers} half-layers")
    entries = set(value[parity:half_layers:2])
    if len(entries) != 1 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entries):
        kind = "attention (even)" if parity == 0 else "MoE (odd)"
        _fail(f"{name} has the entries {sorted(entries, key=str)} on the {kind} half-layers; transformers' ZAYA has "
              "one value for all layers")
    return entries.pop()


def convert_legacy_config(legacy: Mapping[str, object]) -> LoadedConfig:
    """Convert a legacy config.json dict (Zyphra's transformers fork) into a transformers ZayaConfig.

    Every field of `legacy` must be in `LEGACY_CONFIG_TABLE` or be a generic PretrainedConfig field; any other raises
    CheckpointError naming it (an unknown field may change the math, so it is never ignored silently). Fields whose
    value transformers' ZAYA does not implement (rules "require" and "disabled", e.g. `clamp_temp: true`,
    `zaya_use_mod: false`, a `sliding_window`) raise naming the field and the value.

    Layers: L = num_hidden_layers / 2 (half-layers), or, when `zaya_layers` is given (the fork's later per-layer
    form, ['a', E, 'a', E, ...]), L = len(zaya_layers) / 2 and num_experts = E (the list wins over a disagreeing
    `num_hidden_layers`, as in sglang's ZayaConfig).

    Heads. Two conventions exist for `num_attention_heads`:
    - the fork's modeling (2d6c3a2): head size = hidden_size / num_attention_heads, query heads =
      num_attention_heads / 2 (its attention views the CCA output as `num_attention_heads // 2` heads; ZAYA1-8B:
      16 -> 8 query heads of 128), `cca_num_q_heads` the same number;
    - sglang's ZayaConfig and the published ZAYA1 config.json: `num_attention_heads` = query heads, with an explicit
      `head_dim` (or `kv_channels`).
    With an explicit head size (`head_dim` / `kv_channels`, equal when both are given): query heads =
    `cca_num_q_heads` if given, else `num_attention_heads`; `num_attention_heads` must be the query heads or twice
    them. Without: the fork's rule. KV heads: `num_query_groups` (CCA's key heads) or `num_query_groups_list`, which
    must equal `num_key_value_heads` when both are given. Per-half-layer lists (`cca_num_q_heads`,
    `num_query_groups_list`, `ffn_hidden_size_list`, `zaya_mlp_expansion`) must be uniform over their layers.

    RoPE: `rope_parameters = {"hybrid": {"rope_type": rope_scaling's type or "default", **rope_scaling's other
    keys, "rope_theta": rope_theta, "partial_rotary_factor": partial_rotary_factor}}`, `layer_types = ["hybrid"] * L`.

    Returns a LoadedConfig (config, legacy=True, dropped, defaulted).
    """
    from transformers import ZayaConfig

    if not isinstance(legacy, Mapping):
        raise TypeError(f"convert_legacy_config takes a config.json dict, not {type(legacy).__name__}")
    is_legacy_config(legacy)  # raises on a mix of both formats
    if legacy.get("model_type", "zaya") != "zaya":
        _fail(f"model_type is {legacy.get('model_type')!r}, not 'zaya'")
    nested = sorted(k for k in ("text_config", "vision_config") if k in legacy)
    if nested:
        _fail(f"{nested}: multimodal (ZAYA1-VL) configs are not supported")
    unknown = sorted(k for k in legacy if k not in _LEGACY_CONFIG_FIELDS and k not in _GENERIC_CONFIG_KEYS)
    if unknown:
        _fail(f"fields the conversion table (LEGACY_CONFIG_TABLE) does not know: {unknown}. They may change the "
              "model's math, so the config is not converted; add them to the table once their meaning is known")

    dropped: dict[str, object] = {}
    defaulted: dict[str, object] = {}
    out: dict[str, object] = {}

    def get(name):
        if name in legacy:
            return legacy[name]
        default = _LEGACY_CONFIG_FIELDS[name].default
        if default is not _MISSING and default is not None:
            defaulted[name] = default
        return default

    # generic PretrainedConfig fields
    for name in sorted(set(legacy) & _GENERIC_CONFIG_KEYS):
        if name in _CARRIED_GENERIC:
            out[_CARRIED_GENERIC[name]] = legacy[name]
        elif name != "model_type":
            dropped[name] = legacy[name]

    # switches transformers' ZAYA implements one way only
    for field in LEGACY_CONFIG_TABLE:
        if field.rule == "require":
            value = get(field.name)
            if value != field.default or type(value) is not type(field.default):
                _fail(f"{field.name}={value!r} is not supported: transformers' ZAYA implements only "
                      f"{field.name}={field.default!r}")
            if field.name in legacy and field.target is None:
                dropped[field.name] = value
        elif field.rule == "disabled":
            value = legacy.get(field.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v not in (None, 0, False) for v in values):
                _fail(f"{field.name}={value!r} is not supported: sliding-window attention in legacy configs "
                      "(the fork's global window, Megatron's per-layer swa_layers) is not converted; only a null / "
                      "0 window is")
            if field.name in legacy and field.target is None:
                dropped[field.name] = value
        elif field.rule == "info" and field.name in legacy:
            dropped[field.name] = legacy[field.name]
        elif field.rule == "copy":
            value = get(field.name)
            if value is not _MISSING:
                out[field.target] = value
    out["num_experts_per_tok"] = 1
    out["hidden_act"] = "silu"  # activation_func "swiglu" = SiLU gate, gated (checked above)
    out["sliding_window"] = None

    # layers and experts
    if legacy.get("zaya_layers"):
        layers = list(legacy["zaya_layers"])
        attn, moe = layers[0::2], layers[1::2]
        if len(layers) % 2 or any(a != "a" for a in attn) or len(set(map(str, moe))) != 1 or \
                not all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in moe):
            _fail(f"zaya_layers={layers[:8]}{' ...' if len(layers) > 8 else ''} is not an alternation "
                  "['a', E, 'a', E, ...] of attention and E-expert MoE half-layers")
        half_layers, experts = len(layers), moe[0]
        if "num_experts" in legacy and legacy["num_experts"] != experts:
            _fail(f"zaya_layers has {experts}-expert MoE layers, num_experts says {legacy['num_experts']}")
        out["num_experts"] = experts
        defaulted.pop("num_experts", None)
        if "num_hidden_layers" in legacy:
            dropped["num_hidden_layers"] = legacy["num_hidden_layers"]
    else:
        half_layers = get("num_hidden_layers")
        if isinstance(half_layers, bool) or not isinstance(half_layers, int) or half_layers <= 0 or half_layers % 2:
            _fail(f"num_hidden_layers={half_layers!r} must count half-layers (attention + MoE), so be even and "
                  "positive (ZAYA1-8B: 80 for 40 decoder layers)")
    num_layers = half_layers // 2
    out["num_hidden_layers"] = num_layers
    out["layer_types"] = ["hybrid"] * num_layers

    # experts and router
    if "ffn_hidden_size_list" in legacy:
        fused = _per_half_layer("ffn_hidden_size_list", legacy["ffn_hidden_size_list"], half_layers, 1)
        if "ffn_hidden_size" in legacy and legacy["ffn_hidden_size"] != fused:
            _fail(f"ffn_hidden_size={legacy['ffn_hidden_size']} disagrees with ffn_hidden_size_list ({fused})")
        ffn_name = "ffn_hidden_size_list"
    else:
        fused = _per_half_layer("ffn_hidden_size", get("ffn_hidden_size"), half_layers, 1)
        ffn_name = "ffn_hidden_size"
    if fused % 2:
        _fail(f"{ffn_name}={fused} is odd; with gated_linear_unit the expert's linear_fc1 holds gate and up halves")
    out["moe_intermediate_size"] = fused // 2
    out["router_hidden_size"] = _per_half_layer("zaya_mlp_expansion", get("zaya_mlp_expansion"), half_layers, 1)

    # heads
    hidden = out["hidden_size"]
    heads = legacy.get("num_attention_heads")
    explicit = {name: legacy[name] for name in ("head_dim", "kv_channels") if legacy.get(name) is not None}
    if len(set(explicit.values())) > 1:
        _fail(f"head_dim={explicit['head_dim']} and kv_channels={explicit['kv_channels']} disagree")
    q_heads = (_per_half_layer("cca_num_q_heads", legacy["cca_num_q_heads"], half_layers, 0)
               if legacy.get("cca_num_q_heads") is not None else None)
    if explicit:
        head_dim = next(iter(explicit.values()))
        if q_heads is None:
            q_heads = heads if heads is not None else get("cca_num_q_heads")
        if heads is not None and heads not in (q_heads, 2 * q_heads):
            _fail(f"num_attention_heads={heads} is neither the query heads ({q_heads}) nor twice them (the fork's "
                  "convention)")
        if heads == 2 * q_heads and hidden % heads == 0 and hidden // heads != head_dim:
            _fail(f"num_attention_heads={heads} = 2 x cca_num_q_heads follows the fork's convention, whose head "
                  f"size is hidden_size / num_attention_heads = {hidden // heads}, but the config says {head_dim}")
    else:  # the fork's modeling: head size from hidden_size / num_attention_heads, num_attention_heads / 2 queries
        heads = get("num_attention_heads") if heads is None else heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or heads % 2 or hidden % heads:
            _fail(f"num_attention_heads={heads!r}: without head_dim / kv_channels the fork's rule (head size = "
                  "hidden_size / num_attention_heads, num_attention_heads / 2 query heads) needs an even divisor "
                  f"of hidden_size={hidden}")
        head_dim = hidden // heads
        if q_heads is not None and q_heads != heads // 2:
            _fail(f"cca_num_q_heads={q_heads} but the fork's attention uses num_attention_heads / 2 = {heads // 2} "
                  "query heads")
        q_heads = heads // 2
    if heads is not None and heads != q_heads:
        dropped["num_attention_heads"] = heads
    groups = None
    for name in ("num_query_groups_list", "num_query_groups"):
        if legacy.get(name) is not None:
            value = _per_half_layer(name, legacy[name], half_layers, 0)
            if groups is not None and value != groups:
                _fail(f"num_query_groups_list and num_query_groups disagree ({groups} vs {value})")
            groups = value
    if groups is None:
        kv_heads = get("num_key_value_heads")
    else:
        kv_heads = legacy.get("num_key_value_heads", groups)
        if kv_heads != groups:
            _fail(f"num_query_groups={groups} (CCA's key heads) disagrees with num_key_value_heads={kv_heads} (the "
                  "attention's)")
    out.update(num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim)

    # rotary embedding
    scaling = legacy.get("rope_scaling")
    rope = {"rope_type": "default"}
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            _fail(f"rope_scaling={scaling!r} is not a dict")
        rope.update({k: v for k, v in scaling.items() if k != "type"})
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    rope["rope_theta"] = float(get("rope_theta"))
    rope["partial_rotary_factor"] = get("partial_rotary_factor")
    out["rope_parameters"] = {"hybrid": rope}

    try:
        config = ZayaConfig(**out)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"legacy ZAYA config converts to ZayaConfig fields transformers rejects: {exc}") from exc
    return LoadedConfig(config, True, dropped, defaulted)


def convert_config(config_dict: Mapping[str, object]) -> LoadedConfig:
    """A config.json dict in either format -> LoadedConfig. transformers' format goes through
    `ZayaConfig.from_dict` unchanged (legacy=False, nothing dropped); the legacy one through
    `convert_legacy_config`."""
    from transformers import ZayaConfig

    if is_legacy_config(config_dict):
        return convert_legacy_config(config_dict)
    model_type = config_dict.get("model_type", "zaya")
    if model_type != "zaya":
        raise CheckpointError(f"config.json has model_type {model_type!r}, not 'zaya'")
    return LoadedConfig(ZayaConfig.from_dict(dict(config_dict)), False, {}, {})


def load_config(path, *, with_report: bool = False):
    """Read a ZAYA config.json into a transformers ZayaConfig, converting Zyphra's legacy format.

    path: a checkpoint directory (its `config.json` is read) or the path of a `.json` config file.
    with_report: return a `LoadedConfig` (config, legacy, dropped, defaulted) instead of the ZayaConfig alone, to
      see which legacy fields were dropped as informational and which fork defaults were filled in.

    A transformers-format config goes through ZayaConfig unchanged; a legacy one (`is_legacy_config`) is converted
    field by field through `LEGACY_CONFIG_TABLE` (`convert_legacy_config`). Raises FileNotFoundError when there is
    no config file, CheckpointError for an unreadable file, unknown legacy fields, or legacy settings transformers'
    ZAYA does not implement.
    """
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no ZAYA config at {path}: "
                                + (f"the directory has no {CONFIG_NAME}" if os.path.isdir(path) else "no such file"))
    try:
        with open(file) as handle:
            config_dict = json.load(handle)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{file} holds a JSON {type(config_dict).__name__}, not a config object")
    loaded = convert_config(config_dict)
    return loaded if with_report else loaded.config
