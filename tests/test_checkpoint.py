"""zaya_kernels.checkpoint: transformers safetensors checkpoints (single file, sharded) and Zyphra's legacy 2L
half-layer layout load into transformers' ZAYA names, into plain and kernelize'd models, with clear errors."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from helpers import perturb_zaya_parameters

transformers = pytest.importorskip("transformers", reason="the checkpoint tests need transformers >= 5.8")
from safetensors.torch import save_file  # noqa: E402
from transformers import ZayaConfig, ZayaForCausalLM, ZayaModel  # noqa: E402

from zaya_kernels.checkpoint import (  # noqa: E402
    CheckpointError,
    convert_config,
    convert_legacy_state_dict,
    is_legacy_config,
    is_legacy_state_dict,
    load_checkpoint,
    load_config,
    load_state_dict,
)
from zaya_kernels.integrations.transformers import kernelize  # noqa: E402

RES_FIELDS = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")


def tiny_config(layers=3, experts=4, tie=True, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=48, num_hidden_layers=layers, moe_intermediate_size=40,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts,
                  router_hidden_size=32, tie_word_embeddings=tie)
    kwargs.update(overrides)
    return ZayaConfig(**kwargs)


def tiny_model(seed=0, **config_kwargs):
    """A random tiny ZAYA model (the approach of test_transformers_integration.py): every ZAYA-specific parameter
    away from its init value, so a tensor landing on the wrong name changes the output."""
    torch.manual_seed(seed)
    return perturb_zaya_parameters(ZayaForCausalLM(tiny_config(**config_kwargs)).eval())


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits(model):
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny model saved by save_pretrained as a single file and as small shards."""
    model = tiny_model()
    root = tmp_path_factory.mktemp("zaya_ckpt")
    model.save_pretrained(root / "single", safe_serialization=True)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="20KB")
    return model, root


# ---------------------------------------------------------------------------------------------------------------
# transformers layout
# ---------------------------------------------------------------------------------------------------------------

def test_single_file_round_trip(saved):
    model, root = saved
    assert sorted(os.listdir(root / "single")) == ["config.json", "generation_config.json", "model.safetensors"]
    expected = model.state_dict()
    state = load_state_dict(root / "single")
    assert_same_state(state, expected)
    # save_pretrained drops the tied head; it comes back as the embedding tensor itself
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert_same_state(load_state_dict(root / "single" / "model.safetensors"), expected)


def test_sharded_round_trip(saved):
    model, root = saved
    shards = [f for f in os.listdir(root / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors.index.json" in os.listdir(root / "sharded")
    assert_same_state(load_state_dict(root / "sharded"), model.state_dict())
    assert_same_state(load_state_dict(root / "sharded" / "model.safetensors.index.json"), model.state_dict())


def test_untied_head_round_trip(tmp_path):
    model = tiny_model(seed=3, tie=False, lm_head_bias=True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = load_state_dict(tmp_path)
    assert_same_state(state, model.state_dict())
    assert state["lm_head.weight"] is not state["model.embed_tokens.weight"]


def test_dtype_keeps_balancing_biases_fp32(saved):
    model, root = saved
    state = load_state_dict(root / "sharded", dtype=torch.bfloat16)
    assert state["model.layers.0.self_attn.qkv_proj.q_proj.weight"].dtype == torch.bfloat16
    assert state["model.layers.2.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    biases = state["model.layers.1.mlp.gate.balancing_biases"]
    assert biases.dtype == torch.float32
    assert torch.equal(biases, model.model.layers[1].mlp.gate.balancing_biases)


def test_load_checkpoint_into_fresh_model_gives_the_same_logits(saved):
    model, root = saved
    expected = logits(model)
    fresh = tiny_model(seed=7)
    assert not torch.allclose(logits(fresh), expected)
    result = load_checkpoint(fresh, root / "single")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(fresh), expected)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # the tie survives the load


def test_load_checkpoint_into_kernelized_model(saved):
    model, root = saved
    expected = logits(model)
    fresh = kernelize(tiny_model(seed=11), backend="reference")
    load_checkpoint(fresh, root / "sharded")
    assert relative_error(logits(fresh), expected) < 5e-5


def test_model_prefix_both_ways(saved, tmp_path):
    model, root = saved
    ids, mask = batch()
    with torch.no_grad():
        expected = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    # a ZayaForCausalLM checkpoint into a ZayaModel: `model.` stripped, the head ignored
    base = ZayaModel(tiny_config()).eval()
    assert load_checkpoint(base, root / "single") == ([], [])
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=mask).last_hidden_state, expected)
    # a ZayaModel checkpoint into a ZayaForCausalLM: `model.` added, the tied head comes with the embeddings
    base.save_pretrained(tmp_path, safe_serialization=True)
    assert "model.embed_tokens.weight" not in load_state_dict(tmp_path)
    full = tiny_model(seed=5)
    load_checkpoint(full, tmp_path)
    assert torch.equal(logits(full), logits(model))


def test_headless_checkpoint_without_config_follows_the_module(tmp_path):
    """Weights without lm_head.weight and without config.json: a tied module takes the embedding as its head; an
    untied one reports the head missing (strict) instead of silently getting the embedding."""
    from safetensors.torch import load_file

    tiny_model(seed=8, tie=False).save_pretrained(tmp_path / "full")
    state = load_file(tmp_path / "full" / "model.safetensors")
    del state["lm_head.weight"]
    (tmp_path / "headless").mkdir()
    save_file(state, tmp_path / "headless" / "model.safetensors")
    tied = tiny_model(seed=9)
    assert load_checkpoint(tied, tmp_path / "headless") == ([], [])
    assert torch.equal(tied.lm_head.weight, state["model.embed_tokens.weight"])
    untied = tiny_model(seed=9, tie=False)
    with pytest.raises(CheckpointError, match=r"missing keys.*lm_head\.weight"):
        load_checkpoint(untied, tmp_path / "headless")
    head = untied.lm_head.weight.clone()
    assert load_checkpoint(untied, tmp_path / "headless", strict=False).missing_keys == ["lm_head.weight"]
    assert torch.equal(untied.lm_head.weight, head)


def test_load_into_zaya_kernels_modules(saved, tmp_path):
    """zaya_kernels.modules keeps transformers' names: both layouts load into its causal LM and its base model."""
    modules = pytest.importorskip("zaya_kernels.modules")
    model, root = saved
    expected = model.state_dict()
    ours = modules.ZayaForCausalLM(tiny_config())
    assert load_checkpoint(ours, root / "sharded") == ([], [])
    assert_same_state(ours.state_dict(), expected)
    save_legacy(tmp_path, to_legacy(expected, 3))
    base = modules.ZayaModel(tiny_config())
    load_checkpoint(base, tmp_path)
    assert_same_state({"model." + k: v for k, v in base.state_dict().items()},
                      {k: v for k, v in expected.items() if k != "lm_head.weight"})


# ---------------------------------------------------------------------------------------------------------------
# legacy layout
# ---------------------------------------------------------------------------------------------------------------

def to_legacy(state, num_layers, tied=True):
    """transformers ZAYA names -> Zyphra's legacy 2L half-layer names, written out from the sources cited in
    zaya_kernels/checkpoint.py (Zyphra/transformers' fork modeling_zaya.py module tree; sglang's native-format
    loading test for the residual-scale placement), independently of the module's table."""
    attn = {
        "input_layernorm.weight": "input_norm.weight",
        "self_attn.o_proj.weight": "self_attn.o_proj.weight",
        "self_attn.qkv_proj.q_proj.weight": "self_attn.qkv.linear_q.weight",
        "self_attn.qkv_proj.k_proj.weight": "self_attn.qkv.linear_k.weight",
        "self_attn.qkv_proj.v_proj_current.weight": "self_attn.qkv.val_proj1.weight",
        "self_attn.qkv_proj.v_proj_delayed.weight": "self_attn.qkv.val_proj2.weight",
        "self_attn.qkv_proj.conv_qk_depthwise.weight": "self_attn.qkv.conv_qk.0.weight",
        "self_attn.qkv_proj.conv_qk_depthwise.bias": "self_attn.qkv.conv_qk.0.bias",
        "self_attn.qkv_proj.conv_qk_grouped.weight": "self_attn.qkv.conv_qk.1.weight",
        "self_attn.qkv_proj.conv_qk_grouped.bias": "self_attn.qkv.conv_qk.1.bias",
        "self_attn.qk_norm.temp": "self_attn.qkv.temp",
    }
    moe = {
        "post_attention_layernorm.weight": "input_norm.weight",
        "mlp.gate.down_proj.weight": "zaya_block.router.down_proj.weight",
        "mlp.gate.down_proj.bias": "zaya_block.router.down_proj.bias",
        "mlp.gate.router_mlp.norm.weight": "zaya_block.router.rmsnorm_eda.weight",
        "mlp.gate.router_mlp.fc1.weight": "zaya_block.router.router_mlp.0.weight",
        "mlp.gate.router_mlp.fc1.bias": "zaya_block.router.router_mlp.0.bias",
        "mlp.gate.router_mlp.fc2.weight": "zaya_block.router.router_mlp.2.weight",
        "mlp.gate.router_mlp.fc2.bias": "zaya_block.router.router_mlp.2.bias",
        "mlp.gate.router_mlp.out_proj.weight": "zaya_block.router.router_mlp.4.weight",
        "mlp.gate.balancing_biases": "zaya_block.router.balancing_biases",
    }
    used = set()

    def take(name):
        used.add(name)
        return state[name].detach().clone()

    legacy = {
        "model.embed_tokens.weight": take("model.embed_tokens.weight"),
        "model.final_norm.weight": take("model.norm.weight"),
        "model.layers.0.res_scale.hidden_states_scale": take("model.input_hidden_states_scale"),
        "model.layers.0.res_scale.hidden_states_bias": take("model.input_hidden_states_bias"),
    }
    for k in range(num_layers):
        src = f"model.layers.{k}."
        for new, old in attn.items():
            legacy[f"model.layers.{2 * k}.{old}"] = take(src + new)
        for new, old in moe.items():
            legacy[f"model.layers.{2 * k + 1}.{old}"] = take(src + new)
        if k:
            legacy[f"model.layers.{2 * k + 1}.zaya_block.router.router_states_scale"] = take(
                src + "mlp.gate.router_states_scale")
        for field in RES_FIELDS:
            legacy[f"model.layers.{2 * k + 1}.res_scale.{field}"] = take(f"{src}post_attention_residual_scale.{field}")
            last = k + 1 == num_layers
            after_mlp = f"model.res_scale.{field}" if last else f"model.layers.{2 * k + 2}.res_scale.{field}"
            legacy[after_mlp] = take(f"{src}post_mlp_residual_scale.{field}")
        gate_up, down = take(src + "mlp.experts.gate_up_proj"), take(src + "mlp.experts.down_proj")
        for e in range(gate_up.shape[0]):
            experts = f"model.layers.{2 * k + 1}.zaya_block.experts.local_experts.{e}"
            legacy[f"{experts}.linear_fc1.weight"] = gate_up[e].clone()
            legacy[f"{experts}.linear_fc2.weight"] = down[e].clone()
    if not tied:
        for name in ("lm_head.weight", "lm_head.bias"):
            if name in state:
                legacy[name] = take(name)
    assert used == set(state) - ({"lm_head.weight"} if tied else set()), sorted(set(state) - used)
    return legacy


def save_legacy(directory, legacy, tied=True):
    os.makedirs(directory, exist_ok=True)
    save_file(legacy, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as handle:  # the legacy config's relevant field
        json.dump({"model_type": "zaya", "tie_word_embeddings": tied}, handle)


def test_legacy_key_count_matches_the_published_inventory():
    """Zyphra/ZAYA1-8B's legacy index holds 2,483 tensors for 40 layers x 16 experts: 6 model-level, 13 + 15 (L-1)
    attention and (14 + 2E) + (15 + 2E)(L-1) MoE half-layer tensors; the same formula holds for a tiny model."""
    layers, experts = 3, 4
    legacy = to_legacy(tiny_model(layers=layers, experts=experts).state_dict(), layers)

    def count(layers, experts):
        return 6 + 13 + 15 * (layers - 1) + (14 + 2 * experts) + (15 + 2 * experts) * (layers - 1)

    assert count(40, 16) == 2483
    assert len(legacy) == count(layers, experts)
    assert max(int(k.split(".")[2]) for k in legacy if k.startswith("model.layers.")) == 2 * layers - 1
    assert is_legacy_state_dict(legacy) and not is_legacy_state_dict(tiny_model().state_dict())


@pytest.mark.parametrize("tied", [True, False])
def test_legacy_round_trip(tmp_path, tied):
    model = tiny_model(seed=2, tie=tied)
    expected = model.state_dict()
    save_legacy(tmp_path, to_legacy(expected, 3, tied=tied), tied=tied)
    assert_same_state(load_state_dict(tmp_path), expected)
    fresh = tiny_model(seed=9, tie=tied)
    load_checkpoint(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(model))


def test_legacy_sharded_into_kernelized_model(tmp_path):
    model = tiny_model(seed=4)
    legacy = to_legacy(model.state_dict(), 3)
    names = sorted(legacy)
    weight_map = {}
    for part in range(3):  # three shards, keys dealt round-robin
        shard = f"legacy-{part}.safetensors"
        save_file({n: legacy[n] for n in names[part::3]}, os.path.join(tmp_path, shard))
        weight_map.update({n: shard for n in names[part::3]})
    with open(os.path.join(tmp_path, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    fresh = kernelize(tiny_model(seed=13), backend="reference")
    load_checkpoint(fresh, tmp_path)
    assert relative_error(logits(fresh), logits(model)) < 5e-5


def test_legacy_name_table_pins_the_residual_scale_shift():
    """Named pairs from the sources (sglang's native-format loading test, the published ZAYA1-8B inventory)."""
    layers = 2
    marked = {name: torch.full_like(t, float(i)) for i, (name, t) in
              enumerate(tiny_model(layers=layers, experts=2).state_dict().items())}
    legacy = to_legacy(marked, layers)
    legacy["model.layers.3.zaya_block.experts.local_experts.1.linear_fc1.weight"] = torch.arange(
        80 * 48, dtype=torch.float32).view(80, 48)
    converted = convert_legacy_state_dict(legacy, tiny_config(layers=layers, experts=2))
    pairs = {
        "model.layers.0.res_scale.hidden_states_scale": "model.input_hidden_states_scale",
        "model.layers.0.input_norm.weight": "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.qkv.linear_q.weight": "model.layers.0.self_attn.qkv_proj.q_proj.weight",
        "model.layers.1.res_scale.residual_scale": "model.layers.0.post_attention_residual_scale.residual_scale",
        "model.layers.1.input_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.zaya_block.router.rmsnorm_eda.weight": "model.layers.0.mlp.gate.router_mlp.norm.weight",
        "model.layers.1.zaya_block.router.router_mlp.4.weight": "model.layers.0.mlp.gate.router_mlp.out_proj.weight",
        "model.layers.2.res_scale.residual_bias": "model.layers.0.post_mlp_residual_scale.residual_bias",
        "model.layers.2.input_norm.weight": "model.layers.1.input_layernorm.weight",
        "model.layers.3.zaya_block.router.router_states_scale": "model.layers.1.mlp.gate.router_states_scale",
        "model.res_scale.hidden_states_bias": "model.layers.1.post_mlp_residual_scale.hidden_states_bias",
        "model.final_norm.weight": "model.norm.weight",
    }
    for old, new in pairs.items():
        assert torch.equal(converted[new], legacy[old]), (old, new)
    assert "model.layers.1.zaya_block.router.router_states_scale" not in legacy  # EDA starts at the second MoE
    gate_up = converted["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (2, 80, 48)  # [E, 2I, H]; linear_fc1 rows [gate; up] kept in order
    assert torch.equal(gate_up[1], legacy["model.layers.3.zaya_block.experts.local_experts.1.linear_fc1.weight"])
    assert converted["model.layers.1.mlp.experts.down_proj"].shape == (2, 48, 40)  # [E, H, I]


def _rms(x, weight, eps):
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_legacy_residual_chain_matches_the_transformers_forward(tmp_path):
    """Run the legacy half-layer forward of Zyphra's fork (each half-layer: res_scale(residual, hidden) at entry,
    residual = hidden + residual, input_norm; then model.res_scale and final_norm) on the legacy tensors, with
    the attention and MoE mixers of the model loaded from them, and compare with transformers' forward. This
    checks the residual-scale shift numerically. Skip-expert routing is disabled: the fork passes a skipped token
    through scaled by its router probability, transformers outputs zero for it."""
    layers = 3
    model = tiny_model(seed=6, layers=layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.balancing_biases[-1] = -10.0
    legacy = to_legacy(model.state_dict(), layers)
    save_legacy(tmp_path, legacy)
    loaded = tiny_model(seed=8, layers=layers)
    load_checkpoint(loaded, tmp_path)
    ids = batch()[0]
    eps = loaded.config.rms_norm_eps

    def res_scale(prefix, residual, hidden):
        hidden = (hidden + legacy[prefix + "hidden_states_bias"]) * legacy[prefix + "hidden_states_scale"]
        if residual is not None:
            residual = (residual + legacy[prefix + "residual_bias"]) * legacy[prefix + "residual_scale"]
        return residual, hidden

    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
        hidden = torch.nn.functional.embedding(ids, legacy["model.embed_tokens.weight"])
        position_ids = torch.arange(ids.shape[1])[None]
        causal = transformers.masking_utils.create_causal_mask(
            config=loaded.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
        rope = loaded.model.rotary_emb(hidden, position_ids, "hybrid")
        residual, router_state = None, None
        for n in range(2 * layers):
            residual, hidden = res_scale(f"model.layers.{n}.res_scale.", residual, hidden)
            residual = hidden if residual is None else hidden + residual
            normed = _rms(residual, legacy[f"model.layers.{n}.input_norm.weight"], eps)
            layer = loaded.model.layers[n // 2]
            if n % 2 == 0:
                hidden, _ = layer.self_attn(hidden_states=normed, attention_mask={"causal": causal, "conv": None},
                                            cache=None, position_embeddings=rope)
            else:
                hidden, router_state = layer.mlp(normed, router_state)
        residual, hidden = res_scale("model.res_scale.", residual, hidden)
        actual = _rms(hidden + residual, legacy["model.final_norm.weight"], eps)
    assert relative_error(actual, expected) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------

def _write(directory, state, tied=True):
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
              os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump({"model_type": "zaya", "tie_word_embeddings": tied}, handle)


def test_missing_key(saved, tmp_path):
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del state["model.layers.1.mlp.gate.down_proj.bias"]
    _write(tmp_path, state)
    fresh = tiny_model(seed=3)
    with pytest.raises(CheckpointError, match=r"missing keys.*model\.layers\.1\.mlp\.gate\.down_proj\.bias"):
        load_checkpoint(fresh, tmp_path)
    result = load_checkpoint(fresh, tmp_path, strict=False)
    assert result.missing_keys == ["model.layers.1.mlp.gate.down_proj.bias"] and result.unexpected_keys == []
    assert torch.equal(fresh.model.layers[1].mlp.gate.down_proj.weight, model.model.layers[1].mlp.gate.down_proj.weight)


def test_unexpected_key(saved):
    model, _ = saved
    state = dict(model.state_dict())
    state["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(3)
    fresh = tiny_model(seed=3)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*model\.layers\.0\.mlp\.shared_expert\.weight"):
        load_checkpoint(fresh, state)
    assert load_checkpoint(fresh, state, strict=False).unexpected_keys == ["model.layers.0.mlp.shared_expert.weight"]


def test_wrong_shape(saved, tmp_path):
    _, root = saved
    other = tiny_model(experts=3)  # a checkpoint with 3 experts into a 4-expert model
    other.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: checkpoint "
                                              r"\(3, 80, 48\) vs module \(4, 80, 48\)"):
        load_checkpoint(tiny_model(), tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint \(47,\) vs module \(48,\)"):
        load_checkpoint(tiny_model(), {**load_state_dict(root / "single"), "model.norm.weight": torch.ones(47)},
                        strict=False)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_state_dict(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_checkpoint(tiny_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_state_dict(tmp_path / "absent")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(tmp_path)


def test_sharded_index_naming_an_absent_shard(saved, tmp_path):
    _, root = saved
    target = tmp_path / "sharded"
    target.mkdir()
    for name in os.listdir(root / "sharded"):
        if name != "model-00002-of-00019.safetensors":
            (target / name).write_bytes((root / "sharded" / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="model-00002-of-00019.safetensors"):
        load_state_dict(target)


def test_tied_weights_with_different_values(saved):
    model, _ = saved
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match=r"ties together.*lm_head\.weight"):
        load_checkpoint(tiny_model(), state)


def test_legacy_errors():
    legacy = to_legacy(tiny_model().state_dict(), 3)
    broken = dict(legacy)
    del broken["model.layers.3.zaya_block.experts.local_experts.2.linear_fc2.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.zaya_block\.experts\.local_experts\.2\.linear_fc2"):
        convert_legacy_state_dict(broken)
    with pytest.raises(CheckpointError, match=r"does not know.*model\.layers\.2\.self_attn\.qkv\.lora_q\.weight"):
        convert_legacy_state_dict({**legacy, "model.layers.2.self_attn.qkv.lora_q.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"odd \(MoE\) half-layer.*model\.layers\.1\.self_attn\.qkv\.temp"):
        convert_legacy_state_dict({**legacy, "model.layers.1.self_attn.qkv.temp": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="num_hidden_layers=4"):
        convert_legacy_state_dict(legacy, tiny_config(layers=4))
    with pytest.raises(CheckpointError, match=r"mixes.*model\.norm\.weight"):
        is_legacy_state_dict({**legacy, "model.norm.weight": torch.ones(48)})
    model = tiny_model(seed=5)
    load_checkpoint(model, copy.deepcopy(legacy))  # a legacy state dict passed in memory converts too
    assert torch.equal(model.model.norm.weight, legacy["model.final_norm.weight"])


# ---------------------------------------------------------------------------------------------------------------
# config.json: transformers format and the legacy (Zyphra fork) format
# ---------------------------------------------------------------------------------------------------------------

# ZayaConfig fields that decide the model's shapes and math
CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "router_hidden_size",
                 "rms_norm_eps", "hidden_act", "layer_types", "sliding_window", "cca_time0", "cca_time1",
                 "attention_bias", "lm_head_bias", "tie_word_embeddings", "max_position_embeddings", "pad_token_id",
                 "bos_token_id", "eos_token_id")


def assert_same_config(actual, expected):
    for name in CONFIG_FIELDS:
        assert getattr(actual, name) == getattr(expected, name), name
    assert actual.rope_parameters["hybrid"] == expected.rope_parameters["hybrid"]


def legacy_config(layers=3, experts=4, tie=True, **overrides):
    """tiny_config() written with the legacy field names of Zyphra's transformers fork (configuration_zaya.py at
    2d6c3a2 / f0ab5be: what its save_pretrained writes), independently of zaya_kernels.checkpoint's table: 2L
    half-layers, the fused gate+up width, the router width as zaya_mlp_expansion, CCA head fields, norm_epsilon,
    rope_theta / partial_rotary_factor, and the architecture switches at the values transformers' ZAYA implements."""
    config = {
        "architectures": ["ZayaForCausalLM"], "model_type": "zaya", "transformers_version": "4.57.1",
        "torch_dtype": "bfloat16", "_attn_implementation": "eager",
        "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 2 * layers, "num_experts": experts,
        "ffn_hidden_size": 80, "zaya_mlp_expansion": 32, "max_position_embeddings": 256,
        "cca": True, "num_attention_heads": 4, "cca_num_q_heads": 4, "num_query_groups": 2, "num_key_value_heads": 2,
        "head_dim": 16, "kv_channels": 16, "cca_time0": 2, "cca_time1": 2, "clamp_temp": False,
        "attention_bias": False, "attention_dropout": 0.0, "sliding_window": None,
        "rope_theta": 5000000, "partial_rotary_factor": 0.5, "rope_scaling": None,
        "norm_epsilon": 1e-05, "normalization": "RMSNorm", "moe_router_topk": 1, "activation_func": "swiglu",
        "gated_linear_unit": True, "add_bias_linear": False, "zaya_use_mod": True, "zaya_use_eda": True,
        "zaya_high_prec": True, "scale_residual_merge": True, "residual_in_fp32": True, "fused_add_norm": False,
        "apply_rope_fusion": True, "bias_activation_fusion": True, "activation_func_fp8_input_store": False,
        "lm_head_bias": False, "tie_word_embeddings": tie, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "initializer_range": 0.2, "use_cache": True,
    }
    config.update(overrides)
    return config


def test_legacy_config_converts_to_the_transformers_config():
    loaded = convert_config(legacy_config())
    assert loaded.legacy and is_legacy_config(legacy_config())
    assert_same_config(loaded.config, tiny_config())
    assert loaded.config.num_hidden_layers == 3  # 6 half-layers
    assert loaded.config.moe_intermediate_size == 40  # fused gate+up width 80
    # informational fields are dropped and reported; the math-relevant ones are all carried
    assert {"residual_in_fp32", "zaya_high_prec", "bias_activation_fusion", "apply_rope_fusion", "fused_add_norm",
            "activation_func_fp8_input_store", "_attn_implementation", "transformers_version"} <= set(loaded.dropped)
    assert not {"ffn_hidden_size", "norm_epsilon", "zaya_mlp_expansion", "rope_theta", "head_dim"} & set(loaded.dropped)
    assert loaded.defaulted == {}
    # the per-half-layer form of the fork's later configs (zaya_layers and lists, 0 on the other half-layer kind,
    # padded lists, a disagreeing num_hidden_layers) gives the same config
    per_layer = legacy_config(zaya_layers=["a", 4] * 3, cca_num_q_heads=[4, 0] * 3, num_query_groups_list=[2, 0] * 3,
                              ffn_hidden_size_list=[0, 80] * 4, zaya_mlp_expansion=[0, 32] * 3, num_hidden_layers=9)
    for name in ("num_query_groups", "ffn_hidden_size", "num_experts"):
        del per_layer[name]
    loaded = convert_config(per_layer)
    assert_same_config(loaded.config, tiny_config())
    assert loaded.dropped["num_hidden_layers"] == 9
    with pytest.raises(CheckpointError, match=r"zaya_mlp_expansion has the entries \[16, 32\]"):
        convert_config({**per_layer, "zaya_mlp_expansion": [0, 32, 0, 16, 0, 32]})


@pytest.mark.parametrize("convention", ["fork", "published"])
def test_legacy_zaya1_8b_config_gives_transformers_zaya1_8b(convention):
    """ZAYA1-8B in both head conventions: the fork's save_pretrained (num_attention_heads 16 = twice the query heads,
    kv_channels = hidden / 16) and the published config.json (num_attention_heads 8 = query heads, head_dim 128);
    transformers' ZayaConfig() defaults are ZAYA1-8B."""
    if convention == "fork":
        legacy = {"model_type": "zaya", "num_hidden_layers": 80, "num_attention_heads": 16, "cca_num_q_heads": 8,
                  "num_query_groups": 2, "kv_channels": 128, "ffn_hidden_size": 4096, "zaya_mlp_expansion": 256}
    else:
        legacy = {"model_type": "zaya", "num_hidden_layers": 80, "num_attention_heads": 8, "head_dim": 128,
                  "num_key_value_heads": 2, "ffn_hidden_size": 4096, "zaya_mlp_expansion": 256, "norm_epsilon": 1e-05,
                  "moe_router_topk": 1}
    legacy.update(vocab_size=262272, hidden_size=2048, num_experts=16, rope_theta=5000000, partial_rotary_factor=0.5,
                  max_position_embeddings=131072, eos_token_id=106, sliding_window=None)
    loaded = convert_config(legacy)
    assert_same_config(loaded.config, transformers.ZayaConfig())
    assert loaded.defaulted["zaya_use_mod"] is True and loaded.defaulted["cca_time0"] == 2
    if convention == "fork":  # head size from the fork's rule, no explicit head_dim needed
        del legacy["kv_channels"]
        assert convert_config(legacy).config.head_dim == 128


@pytest.mark.parametrize("tied", [True, False])
def test_legacy_directory_loads_end_to_end(tmp_path, tied):
    """A legacy checkpoint directory (legacy config.json + legacy-named safetensors): load_config + load_checkpoint
    rebuild the transformers model with the same logits."""
    model = tiny_model(seed=12, tie=tied)
    save_legacy(tmp_path, to_legacy(model.state_dict(), 3, tied=tied), tied=tied)
    with open(tmp_path / "config.json", "w") as handle:
        json.dump(legacy_config(tie=tied), handle)
    config = load_config(tmp_path)
    assert isinstance(config, ZayaConfig)
    torch.manual_seed(3)
    fresh = ZayaForCausalLM(config).eval()
    assert load_checkpoint(fresh, tmp_path) == ([], [])
    assert relative_error(logits(fresh), logits(model)) < 5e-5
    report = load_config(tmp_path / "config.json", with_report=True)
    assert report.legacy and "residual_in_fp32" in report.dropped


def test_transformers_config_round_trips_unchanged(saved, tmp_path):
    model, root = saved
    loaded = load_config(root / "single", with_report=True)
    assert not loaded.legacy and loaded.dropped == {} and loaded.defaulted == {}
    assert loaded.config.to_dict() == model.config.to_dict()
    assert not is_legacy_config(json.loads((root / "single" / "config.json").read_text()))
    assert not is_legacy_config({"model_type": "zaya", "tie_word_embeddings": True})
    sliding = tiny_config(layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=5)
    sliding.save_pretrained(tmp_path)
    assert load_config(tmp_path / "config.json").to_dict() == sliding.to_dict()


def test_legacy_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"clamp_temp=True is not supported"):
        convert_config(legacy_config(clamp_temp=True))
    with pytest.raises(CheckpointError, match=r"zaya_use_mod=False is not supported"):
        convert_config(legacy_config(zaya_use_mod=False))
    with pytest.raises(CheckpointError, match=r"moe_router_topk=2"):
        convert_config(legacy_config(moe_router_topk=2))
    with pytest.raises(CheckpointError, match=r"sliding_window=4096 is not supported"):
        convert_config(legacy_config(sliding_window=4096))
    with pytest.raises(CheckpointError, match=r"does not know: \['zaya_new_thing'\]"):
        convert_config(legacy_config(zaya_new_thing=3))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=5 must count half-layers"):
        convert_config(legacy_config(num_hidden_layers=5))
    with pytest.raises(CheckpointError, match=r"num_query_groups=2 .* disagrees with num_key_value_heads=4"):
        convert_config(legacy_config(num_key_value_heads=4))
    with pytest.raises(CheckpointError,
                       match=r"mixes the legacy ZAYA fields \[.*'ffn_hidden_size'.*\['moe_intermediate_size'\]"):
        is_legacy_config({**legacy_config(), "moe_intermediate_size": 40})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)


def test_demo_runs_a_legacy_directory(tmp_path, capsys):
    """`python -m zaya_kernels demo --model PATH` on a legacy directory: config and tensors converted, the
    kernelized and zaya_kernels.modules runs agree with transformers'."""
    from zaya_kernels.demo import run_model_demo

    model = tiny_model(seed=14)
    save_legacy(tmp_path, to_legacy(model.state_dict(), 3))
    with open(tmp_path / "config.json", "w") as handle:
        json.dump(legacy_config(), handle)
    assert run_model_demo(model_path=str(tmp_path), new_tokens=2) == 0
    out = capsys.readouterr().out
    assert f"model: {tmp_path}; 3 layers" in out
    assert "DIFFER" not in out and out.count("generated tokens identical") == 2
