"""kernelize(model): a transformers ZAYA model on zaya ops gives the unmodified model's logits, tokens and gradients."""
from __future__ import annotations

import copy

import pytest
import torch

import zaya_kernels
from helpers import perturb_zaya_parameters
from zaya_kernels.integrations.transformers import attention_paths, kernelize

transformers = pytest.importorskip("transformers", reason="the integration tests need transformers >= 5.8")
from transformers import ZayaConfig, ZayaForCausalLM, ZayaModel  # noqa: E402
from transformers.models.zaya.modeling_zaya import DynamicCache  # noqa: E402

CONFIGS = {
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, router_hidden_size=32),
    "mha": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32, num_experts=3, router_hidden_size=24),
    "gqa4-odd": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_experts=5, router_hidden_size=20),
}


def tiny_model(name, seed=0, layers=3, **overrides):
    """A random tiny ZAYA model with every ZAYA-specific parameter away from its init value and the skip class
    reachable (its balancing bias raised for half of the layers); overrides: more ZayaConfig arguments."""
    torch.manual_seed(seed)
    cfg = ZayaConfig(vocab_size=97, hidden_size=48, num_hidden_layers=layers, moe_intermediate_size=40,
                     max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                     initializer_range=0.2, **{**CONFIGS[name], **overrides})
    return perturb_zaya_parameters(ZayaForCausalLM(cfg).eval())


def left_padded_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_tokens_match(name, backend):
    model = tiny_model(name)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=mask).logits
        expected_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        kernelize(model, backend=backend)
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert zaya_kernels.last_backend("zaya_router") == backend
    assert zaya_kernels.last_backend("residual_scale_rmsnorm") == backend
    assert zaya_kernels.last_backend("cca_prepare") == backend
    assert zaya_kernels.last_backend("moe_experts") == backend
    assert relative_error(logits, expected_logits) < 5e-5
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unpadded_batch_runs_the_zaya_attention_ops(backend):
    """Without padding the kernelized model attends with zaya::cca_attention (prefill) and
    zaya::cca_attention_decode (over transformers' dynamic cache, sliding-window layer included)."""
    sliding = dict(layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=4)
    model = tiny_model("gqa2", **sliding)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected_logits = model(input_ids=ids).logits
        expected_tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        kernelize(model, backend=backend)
        logits = model(input_ids=ids).logits
        assert attention_paths(model) == ["zaya::cca_attention"] * 3
        tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert attention_paths(model) == ["zaya::cca_attention_decode"] * 3
        cache = DynamicCache(config=model.config)  # a chunked prefill: 4 tokens, then 5 after them
        model(input_ids=ids[:, :4], cache=cache)
        chunk_logits = model(input_ids=ids[:, 4:], cache=cache).logits
        assert attention_paths(model) == ["zaya::cca_attention_decode"] * 3
    assert zaya_kernels.last_backend("cca_attention_decode") == backend
    assert relative_error(logits, expected_logits) < 5e-5
    assert relative_error(chunk_logits, expected_logits[:, 4:]) < 5e-5
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_left_padded_batch_decodes_with_the_zaya_attention_op(backend):
    """A left-padded batch (pads of 4, 0 and 7 tokens; a sliding window of 4 shorter than the longest pad run):
    its prefill takes transformers' attention, every decode step zaya::cca_attention_decode with the pad counts as
    seq_starts; each step's logits and the greedy tokens equal the unmodified model's. Any other padding pattern
    keeps transformers' attention and says so."""
    sliding = dict(layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=4)
    model = tiny_model("gqa2", **sliding)
    ids, mask = left_padded_batch()
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)

    def greedy_steps(m, steps=3):
        cache = DynamicCache(config=m.config)
        out = m(input_ids=ids, attention_mask=mask, cache=cache)
        step_logits, tokens, step_mask = [out.logits[:, -1]], [], mask
        for _ in range(steps):
            tokens.append(step_logits[-1].argmax(-1, keepdim=True))
            step_mask = torch.cat([step_mask, torch.ones_like(tokens[-1])], dim=1)
            positions = (step_mask.cumsum(1) - 1).clamp_min(0)[:, -1:]
            out = m(input_ids=tokens[-1], attention_mask=step_mask, cache=cache, position_ids=positions)
            step_logits.append(out.logits[:, -1])
        return torch.stack(step_logits, 1), torch.cat(tokens, 1)

    with torch.no_grad():
        expected_logits, expected_tokens = greedy_steps(model)
        expected_generate = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                           eos_token_id=None)
        kernelize(model, backend=backend)
        model(input_ids=ids, attention_mask=mask)
        assert attention_paths(model) == ["transformers (prefill of a padded batch)"] * 3
        logits, tokens = greedy_steps(model)
        assert attention_paths(model) == ["zaya::cca_attention_decode"] * 3
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                   eos_token_id=None)
        holed = mask.clone()
        holed[1, 3] = 0  # a pad in the middle of a row: not left padding
        model(input_ids=ids, attention_mask=holed)
        assert all(path.startswith("transformers (padding that is not left") for path in attention_paths(model))
    assert zaya_kernels.last_backend("cca_attention_decode") == backend
    assert relative_error(logits, expected_logits) < 5e-5
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(generated, expected_generate)


def test_skip_class_is_chosen_in_the_parity_model():
    """The parity tests exercise the skip expert: some tokens route to it."""
    model = tiny_model("gqa2")
    ids, mask = left_padded_batch()
    routing_weights = []
    # transformers rewrites the skip class to expert 0 with weight 0: a zero routing weight marks a skipped token
    handle = model.model.layers[1].mlp.gate.register_forward_hook(lambda mod, inp, out: routing_weights.append(out[1]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert (routing_weights[0] == 0).any() and (routing_weights[0] > 0).any()


def test_training_loss_and_every_gradient_match():
    model = tiny_model("gqa2", layers=2).train()
    kernelized = kernelize(copy.deepcopy(model), backend="reference")
    ids, _ = left_padded_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    k_loss = kernelized(input_ids=ids, labels=ids).loss
    k_loss.backward()
    assert relative_error(k_loss.detach(), loss.detach()) < 1e-5
    grads = dict(model.named_parameters())
    for pname, p in kernelized.named_parameters():
        expected = grads[pname].grad
        if expected is None:
            assert p.grad is None or not p.grad.any(), pname
            continue
        assert p.grad is not None, pname
        scale = expected.abs().max().item()
        assert (p.grad - expected).abs().max().item() <= 1e-4 * max(scale, 1e-6), pname


def test_kernelize_zaya_model_and_bad_input():
    model = tiny_model("mha")
    base = copy.deepcopy(model.model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).last_hidden_state
        assert isinstance(kernelize(base), ZayaModel)
        actual = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert relative_error(actual, expected) < 5e-5
    with pytest.raises(TypeError, match="ZayaForCausalLM or ZayaModel"):
        kernelize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown zaya_kernels backend"):
        kernelize(model, backend="cuda")


def test_sharded_checkpoint_round_trip_into_a_kernelized_model(tmp_path):
    """A tiny checkpoint written by transformers' save_pretrained (sharded safetensors + index, no network) loads
    into a model that is then kernelized, and gives the logits of the same checkpoint loaded unmodified.

    (transformers 5.24's loader re-initialises the skip class's balancing bias to -1 after loading, so the
    reference here is the unmodified model loaded from the same files, not the model that wrote them.)
    """
    model = tiny_model("gqa2", layers=2)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    plain = ZayaForCausalLM.from_pretrained(tmp_path).eval()
    loaded = kernelize(ZayaForCausalLM.from_pretrained(tmp_path).eval(), backend="reference")
    for (name, p), (_, q) in zip(plain.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name  # every weight made the round trip
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        actual = loaded(input_ids=ids, attention_mask=mask).logits
    assert relative_error(actual, expected) < 5e-5


def test_training_updates_balancing_biases_toward_equal_load():
    from zaya_kernels.integrations.transformers import update_balancing_biases

    model = kernelize(tiny_model("gqa2", layers=2).train(), backend="reference")
    ids, _ = left_padded_batch()
    assert update_balancing_biases(model) is None  # no training forward yet
    before = [layer.mlp.gate.balancing_biases.clone() for layer in model.model.layers]
    model(input_ids=ids, labels=ids).loss.backward()
    loads = update_balancing_biases(model, lr=1e-2)
    assert loads.shape == (2, 5) and torch.allclose(loads.sum(-1), torch.ones(2))
    for layer, old, load in zip(model.model.layers, before, loads):
        step = layer.mlp.gate.balancing_biases - old
        # AdamW's first step moves every class by ~lr against the sign of its load error
        overloaded, underloaded = load > 1 / 5, load < 1 / 5
        assert (step[overloaded] < 0).all() and (step[underloaded] > 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_kernelized_model_matches_transformers(padded):
    """On a GPU with the auto backend (HIP / Triton kernels, fp32): the kernelized model's logits and greedy tokens
    equal the unmodified model's, unpadded (zaya attention for prefill and decode) and left-padded (zaya decode
    attention with seq_starts), a sliding-window layer included."""
    sliding = dict(layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=4)
    model = tiny_model("gqa2", **sliding).cuda()
    ids, mask = left_padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=mask).logits
        expected_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         eos_token_id=None)
        kernelize(model)
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                eos_token_id=None)
        assert attention_paths(model) == ["zaya::cca_attention_decode"] * 3
    assert relative_error(logits, expected_logits) < 5e-5
    assert torch.equal(tokens, expected_tokens)
