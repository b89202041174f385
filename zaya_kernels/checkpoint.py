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
      is preferred when both exist); or the path of one `.safetensors` file or of an index `.json`.
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
        state = load_state_dict(path, device=first.device)
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
