"""kernelize(model): a transformers ZAYA model on zaya ops gives the unmodified model's logits, tokens and gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zaya_kernels
from helpers import assert_close, counted_launches, perturb_zaya_parameters
from zaya_kernels.integrations.transformers import attention_paths, kernelize

transformers = pytest.importorskip("transformers", reason="the integration tests need transformers >= 5.8")
from transformers import ZayaConfig, ZayaForCausalLM, ZayaModel  # noqa: E402
from transformers.models.zaya.modeling_zaya import DynamicCache  # noqa: E402

CONFIGS = {
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, router_hidden_size=32),
    "mha": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32, num_experts=3, router_hidden_size=24),
    "gqa4-odd": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_experts=5, router_hidden_size=20),
    # attention_bias: a fresh sequence's delayed value is v_proj_delayed's bias, not 0
    "biased": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=3, router_hidden_size=16,
                   attention_bias=True),
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


@pytest.mark.parametrize("backend,name", [(backend, name) for backend in ("reference", "triton") for name in CONFIGS
                                          if (backend, name) != ("triton", "biased")])  # the bias: wrapper code
def test_logits_and_greedy_tokens_match(name, backend):
    model = tiny_model(name)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=mask).logits
        expected_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        kernelize(model, backend=backend)
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert attention_paths(model) == ["zaya::cca_attention"] * 3
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert zaya_kernels.last_backend("zaya_router") == backend
    assert zaya_kernels.last_backend("residual_scale_rmsnorm") == backend
    assert zaya_kernels.last_backend("cca_prepare") == backend
    assert zaya_kernels.last_backend("moe_experts") == backend
    assert zaya_kernels.last_backend("cca_attention") == backend
    # every token's logits; a pad position's are implementation-defined (see test_pad_positions_are_undefined)
    tokens_at = mask.bool()
    assert relative_error(logits[tokens_at], expected_logits[tokens_at]) < 5e-5
    assert torch.equal(tokens, expected_tokens)


# Architectures drawn for the parity tests: GQA ratio, head_dim, expert count (1 included), router width, both CCA
# convolution sizes (1..4), the rotary fraction, a sliding-window layer, q/k/v biases, tied or separate (biased) head.
ARCHITECTURES = st.fixed_dictionaries(dict(
    kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([16, 32]),
    experts=st.integers(1, 6), router_hidden=st.integers(4, 40), k0=st.integers(1, 4), k1=st.integers(1, 4),
    rotary=st.sampled_from([0.25, 0.5, 1.0]), window=st.sampled_from([None, 2, 5]), bias=st.booleans(),
    tie=st.booleans()))


def drawn_model(arch, seed):
    """tiny_model with 2 layers of the drawn architecture `arch` (an ARCHITECTURES example)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": arch["rotary"]}
    window = arch["window"]
    layers = dict(layer_types=["hybrid", "hybrid_sliding"], sliding_window=window) if window else {}
    return tiny_model("gqa2", seed=seed, layers=2, num_attention_heads=arch["kv_heads"] * arch["group"],
                      num_key_value_heads=arch["kv_heads"], head_dim=arch["head_dim"], num_experts=arch["experts"],
                      router_hidden_size=arch["router_hidden"], cca_time0=arch["k0"], cca_time1=arch["k1"],
                      attention_bias=arch["bias"], tie_word_embeddings=arch["tie"], lm_head_bias=not arch["tie"],
                      rope_parameters={"hybrid": rope, "hybrid_sliding": rope}, **layers)


@settings(max_examples=8)
@given(arch=ARCHITECTURES, backend=st.sampled_from(["reference", "triton"]), seed=st.integers(0, 2**16))
def test_drawn_architectures_match(arch, backend, seed):
    """Logits and greedy tokens of a left-padded batch on drawn architectures (ARCHITECTURES); the decode steps go
    through the cached path."""
    model = drawn_model(arch, seed)
    ids, mask = left_padded_batch(seed)
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=mask).logits
        expected_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        kernelize(model, backend=backend)
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert zaya_kernels.last_backend("cca_prepare_decode") == backend
    tokens_at = mask.bool()
    assert relative_error(logits[tokens_at], expected_logits[tokens_at]) < 5e-5
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


@pytest.mark.parametrize("backend,name", [("reference", "biased"), ("triton", "gqa2")])
def test_decode_updates_the_caches_conv_and_value_states_in_place(backend, name, monkeypatch):
    """A decode step (one new token per row, no gradient wanted) runs zaya::cca_prepare_decode on transformers'
    own conv and value state tensors: they keep their storage and hold the unmodified model's states after every
    step, and each step's logits match. A chunk of several new tokens keeps zaya::cca_prepare."""
    from zaya_kernels import ops as zaya_ops

    calls = {"cca_prepare": 0, "cca_prepare_decode": 0}
    for op in calls:
        def spy(*args, _op=op, _inner=getattr(zaya_ops, op), **kwargs):
            calls[_op] += 1
            return _inner(*args, **kwargs)
        monkeypatch.setattr(zaya_ops, op, spy)
    model = tiny_model(name)
    ours = kernelize(copy.deepcopy(model), backend=backend)
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(8))
    caches, step_logits = [], []
    with torch.no_grad():
        for m in (model, ours):
            cache = DynamicCache(config=m.config)
            logits = [m(input_ids=ids[:, :5], cache=cache).logits]
            storage = [(layer.conv_states[0].data_ptr(), layer.recurrent_states[0].data_ptr())
                       for layer in cache.layers]
            logits += [m(input_ids=ids[:, t:t + 1], cache=cache).logits for t in (5, 6)]
            assert storage == [(layer.conv_states[0].data_ptr(), layer.recurrent_states[0].data_ptr())
                               for layer in cache.layers]
            if m is ours:
                assert calls == {"cca_prepare": 3, "cca_prepare_decode": 6}  # 3 layers: the prefill, 2 steps
            logits.append(m(input_ids=ids[:, 7:], cache=cache).logits)  # two new tokens: cca_prepare again
            caches.append(cache)
            step_logits.append(torch.cat(logits, 1))
    assert calls == {"cca_prepare": 6, "cca_prepare_decode": 6}
    assert zaya_kernels.last_backend("cca_prepare_decode") == backend
    assert relative_error(step_logits[1], step_logits[0]) < 5e-5
    for expected, actual in zip(caches[0].layers, caches[1].layers):
        assert_close(actual.conv_states[0], expected.conv_states[0], reduction=48, what="conv state")
        assert_close(actual.recurrent_states[0], expected.recurrent_states[0], reduction=48, what="value state")


def test_decode_step_work_per_layer():
    """What a kernelized decode step does per decoder layer (the layer-count difference of two models, so the
    per-step work of transformers' own code does not enter): 7 Triton launches (the CCA preparation, attention,
    router and the two expert GEMMs in one each, two fused residual norms) and, of aten work, the two projection
    GEMMs (stacked q/k/v and o) and the two cats of transformers' dynamic KV cache: no state copies, casts or
    dispatch. A new launch on this path must show up here."""
    per_model = []
    for layers in (2, 3):
        model = kernelize(tiny_model("gqa2", layers=layers), backend="triton", stack_projections=True)
        ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(9))
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :5], cache=cache)
            with counted_launches() as (launches, aten):
                model(input_ids=ids[:, 5:], cache=cache)
        per_model.append((launches, aten))
    (launches2, aten2), (launches3, aten3) = per_model
    assert launches3 - launches2 == {"cca_decode_kernel": 1, "attention_decode_split_kernel": 1,
                                     "zaya_router_fwd_kernel": 1, "moe_gate_up_by_token_kernel": 1,
                                     "moe_down_by_token_kernel": 1, "residual_rmsnorm_fwd_kernel": 2}
    assert not launches2 - launches3  # a Counter difference keeps positive counts only: both ways
    assert aten3 - aten2 == {"mm": 2, "cat": 2} and not aten2 - aten3, (aten2, aten3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sequences_packed_by_position_ids(backend):
    """Padding-free batches: position_ids restarting inside a row, no mask, no cache. transformers then attends
    block-diagonally (its convolutions still run across the boundaries); the kernelized model attends over the packed
    sequences with zaya::cca_attention and gives the same logits, also with a sliding-window layer. With a cache
    transformers does not unpack, and neither does kernelize."""
    model = tiny_model("gqa2", layers=2, layer_types=["hybrid_sliding", "hybrid"], sliding_window=3)
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5, 6, 0]])
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        expected_cached = model(input_ids=ids, position_ids=positions).logits
        kernelize(model, backend=backend)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        assert attention_paths(model) == ["zaya::cca_attention"] * 2
        cached = model(input_ids=ids, position_ids=positions).logits
    assert relative_error(expected_cached, expected) > 1e-2  # the two layouts really differ
    assert relative_error(packed, expected) < 5e-5
    assert relative_error(cached, expected_cached) < 5e-5


def test_position_ids_of_other_dtypes():
    """transformers' rotary embedding takes position_ids of any integer dtype (and whole-valued floats); the
    kernelized model gives the same logits for them (the CCA ops index with int32 / int64) and refuses fractional
    positions, which the CCA ops cannot apply."""
    model = tiny_model("gqa2", layers=2)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(3, 10)[None].expand(2, -1)  # as a continuation would send them: not from 0
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions).logits
        kernelize(model, backend="reference")
        for dtype in (torch.int16, torch.uint8, torch.float32):
            actual = model(input_ids=ids, position_ids=positions.to(dtype)).logits
            assert relative_error(actual, expected) < 5e-5, dtype
        with pytest.raises(ValueError, match="whole numbers"):
            model(input_ids=ids, position_ids=positions.float() + 0.5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_left_padded_batch_decodes_with_the_zaya_attention_op(backend):
    """A left-padded batch (pads of 4, 0 and 7 tokens; a sliding window of 4 shorter than the longest pad run):
    its prefill takes zaya::cca_attention (pads and tokens of each row as two sequences), every decode step zaya::cca_attention_decode with the pad counts as
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
        assert attention_paths(model) == ["zaya::cca_attention"] * 3
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


def test_pad_positions_are_undefined_and_training_keeps_transformers_attention():
    """Why the padded-batch parity compares token positions only: transformers' own eager and sdpa attention give
    the same logits at every token of a left-padded batch and different ones at the pads (whose query rows are fully
    masked). In training mode the padded prefill keeps transformers' attention: the pads' expert choices count in
    the balancing, so their outputs must be transformers' too."""
    model = tiny_model("gqa2")
    ids, mask = left_padded_batch()
    tokens_at = mask.bool()
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        eager = model(input_ids=ids, attention_mask=mask).logits
        model.config._attn_implementation = "sdpa"
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    assert relative_error(sdpa[tokens_at], eager[tokens_at]) < 5e-5
    assert relative_error(sdpa[~tokens_at], eager[~tokens_at]) > 0.1
    kernelize(model, backend="reference").train()
    expected = tiny_model("gqa2").train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert attention_paths(model) == ["transformers (prefill of a padded batch in training)"] * 3
    assert abs(loss.item() - expected(input_ids=ids, attention_mask=mask, labels=ids).loss.item()) < 5e-5 * loss.item()


class _AdapterLinear(torch.nn.Module):
    """What PEFT's LoRA layer looks like from outside: the base nn.Linear's weight / bias / sizes, its own forward."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.2)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)
    out_features = property(lambda self: self.base_layer.out_features)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_qkv_projections_run_as_the_user_left_them():
    """The kernelized CCA projection calls the q/k/v modules themselves: an adapter wrapping q_proj (LoRA-like) is
    applied and trained, an in-place edit through .data (PEFT's merge) is seen, bias-only training (BitFit) gets
    every bias gradient, and torch.inference_mode runs."""
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    model = tiny_model("biased")
    torch.manual_seed(5)
    for layer in model.model.layers:
        layer.self_attn.qkv_proj.q_proj = _AdapterLinear(layer.self_attn.qkv_proj.q_proj)
    ours = kernelize(copy.deepcopy(model), backend="reference")
    for m in (model, ours):
        for name, param in m.named_parameters():  # adapters and the q/k/v biases train, the rest is frozen
            param.requires_grad_("lora_" in name or ("qkv_proj" in name and name.endswith("bias")))
    expected_loss = model(input_ids=ids, labels=ids).loss
    loss = ours(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - expected_loss.item()) < 5e-5 * expected_loss.item()
    expected_loss.backward()
    loss.backward()
    expected_grads = dict(model.named_parameters())
    trained = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == 3 * (2 + 6)  # per layer: lora_A, lora_B, the q, k, v, v_delayed and conv biases
    for name, param in trained:
        assert param.grad is not None, name
        assert_close(param.grad, expected_grads[name].grad, reduction=512, what=name)
    with torch.no_grad():
        for m in (model, ours):
            m.model.layers[1].self_attn.qkv_proj.k_proj.weight.data.mul_(1.7)  # no version counter bump
            ours(input_ids=ids)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        assert relative_error(ours(input_ids=ids).logits, expected) < 5e-5
        assert torch.equal(ours.generate(ids, max_new_tokens=3, do_sample=False),
                           model.generate(ids, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("backend,name", [("reference", "biased"), ("triton", "gqa2")])
def test_stacked_projections_match_and_follow_weight_edits(backend, name):
    """kernelize(stack_projections=True): one GEMM over each layer's stacked q/k/v weights in inference forwards
    gives the unmodified model's logits and greedy tokens; an in-place edit through autograd-visible ops is seen,
    one through .data after forget_stacked_projections; training forwards run the modules (gradients match)."""
    from zaya_kernels.modules import forget_stacked_projections

    model = tiny_model(name)
    ours = kernelize(copy.deepcopy(model), backend=backend, stack_projections=True)
    ids, mask = left_padded_batch()
    tokens_at = mask.bool()

    def check(what):
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            actual = ours(input_ids=ids, attention_mask=mask).logits
        assert relative_error(actual[tokens_at], expected[tokens_at]) < 5e-5, what

    check("stacked")
    assert all(hasattr(layer.self_attn.qkv_proj, "_zaya_stacked_qkv") for layer in ours.model.layers)
    with torch.no_grad():
        tokens = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(tokens, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                  do_sample=False))
        for m in (model, ours):
            m.model.layers[1].self_attn.qkv_proj.v_proj_delayed.weight.mul_(1.5)  # bumps the version counter
    check("after an in-place edit")
    for m in (model, ours):
        m.model.layers[2].self_attn.qkv_proj.q_proj.weight.data.mul_(0.5)  # no version counter bump
    forget_stacked_projections(ours)
    check("after a .data edit and forget_stacked_projections")
    ours.train()
    model.train()
    expected_loss = model(input_ids=ids, labels=ids).loss
    loss = ours(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - expected_loss.item()) < 5e-5 * expected_loss.item()
    expected_loss.backward()
    loss.backward()
    for layer, expected_layer in zip(ours.model.layers, model.model.layers):
        for lin in ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed"):
            assert_close(getattr(layer.self_attn.qkv_proj, lin).weight.grad,
                         getattr(expected_layer.self_attn.qkv_proj, lin).weight.grad, reduction=512, what=lin)
    with pytest.raises(ValueError, match="stack_projections=True needs cca=True"):
        kernelize(tiny_model(name), cca=False, stack_projections=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_through_a_cached_prefix_take_transformers_attention(backend):
    """A prompt cached under no_grad, then a continuation scored with gradients (RL-style): the new tokens attend
    with transformers' attention (the decode kernels have no backward) and every gradient equals the unmodified
    model's; without gradients the same continuation runs on zaya::cca_attention_decode."""
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    model = tiny_model("gqa2")
    ours = kernelize(copy.deepcopy(model), backend=backend)
    losses = []
    for m in (model, ours):
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=ids[:, :6], cache=cache)
        loss = m(input_ids=ids[:, 6:], cache=cache).logits.logsumexp(-1).sum()
        loss.backward()
        losses.append(loss.item())
    assert attention_paths(ours)[0].startswith("transformers (gradients through a cached prefix")
    assert abs(losses[1] - losses[0]) < 5e-5 * abs(losses[0])
    expected = dict(model.named_parameters())
    for name, param in ours.named_parameters():
        assert_close(param.grad, expected[name].grad, reduction=512, what=name)
    with torch.no_grad():
        cache = DynamicCache(config=ours.config)
        ours(input_ids=ids[:, :6], cache=cache)
        ours(input_ids=ids[:, 6:], cache=cache)
    assert attention_paths(ours) == ["zaya::cca_attention_decode"] * 3


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


@pytest.mark.parametrize("backend,name", [("reference", "gqa2"), ("triton", "gqa2"), ("reference", "biased")])
def test_training_loss_and_every_gradient_match(backend, name):
    model = tiny_model(name, layers=2).train()
    kernelized = kernelize(copy.deepcopy(model), backend=backend)
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


def test_activation_checkpointing_matches_and_counts_choices_once():
    """activation_checkpointing_enable(every_n_layers=2): the kernelized decoder layers transformers marks (0 and 2 of
    3) are checkpointed, one segment each; loss and gradients equal the unmodified model's with checkpointing, and
    the recomputed forward does not count the expert choices again."""
    from zaya_kernels.integrations.transformers import update_balancing_biases

    model = tiny_model("gqa2", layers=3).train()
    kernelized = kernelize(copy.deepcopy(model), backend="reference")
    plain = kernelize(copy.deepcopy(model), backend="reference")
    for m in (model, kernelized):
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name before
            m.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    marked = [getattr(layer, "gradient_checkpointing", True) for layer in kernelized.model.layers]
    segments = []
    checkpoint_func = kernelized.model._gradient_checkpointing_func
    kernelized.model._gradient_checkpointing_func = lambda fn, *a, **k: segments.append(fn) or checkpoint_func(
        fn, *a, **k)
    ids, _ = left_padded_batch()
    # use_cache=False: transformers' own checkpointed ZAYA layers would otherwise read the conv states their first
    # pass wrote into the cache when they are recomputed (the kernelized forward drops the cache itself)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    loss = kernelized(input_ids=ids, labels=ids).loss
    loss.backward()
    plain(input_ids=ids, labels=ids).loss.backward()
    assert relative_error(loss.detach(), plain(input_ids=ids, labels=ids).loss.detach()) < 1e-6
    grads = dict(model.named_parameters())
    for pname, p in kernelized.named_parameters():
        expected = grads[pname].grad
        if expected is None:
            continue
        assert (p.grad - expected).abs().max().item() <= 1e-4 * max(expected.abs().max().item(), 1e-6), pname
    for a, b in zip(kernelized.model.layers, plain.model.layers):
        assert torch.equal(a.mlp._zaya_class_counts, b.mlp._zaya_class_counts // 2)  # plain ran two forwards
    assert update_balancing_biases(kernelized) is not None
    assert len(segments) == sum(marked) and (marked == [True, False, True] or all(marked))


def test_kernelize_zaya_model_and_bad_input():
    model = tiny_model("mha")
    base = copy.deepcopy(model.model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).last_hidden_state
        assert isinstance(kernelize(base), ZayaModel)
        actual = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert relative_error(actual, expected) < 5e-5
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        base(input_ids=ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        base(input_ids=ids, output_router_logits=True)
    with pytest.raises(TypeError, match="ZayaForCausalLM or ZayaModel"):
        kernelize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown zaya_kernels backend"):
        kernelize(model, backend="cuda")
    # a cache recording its past (assisted generation) grows the conv states; transformers' own ZAYA fails on it too
    cache = DynamicCache(config=base.config)
    cache.activate_past_recording()
    with torch.no_grad():
        base(input_ids=ids[:, :4], cache=cache)
        base(input_ids=ids[:, 4:5], cache=cache)
        with pytest.raises(ValueError, match="conv state holds 4 columns, not the 2.*recording its past"):
            base(input_ids=ids[:, 5:6], cache=cache)


def test_scaled_rope_is_refused_by_the_cca_kernels_and_runs_with_cca_false():
    """cca_prepare applies the default NeoX RoPE: a model with a scaled rope_type is refused (by kernelize and by the
    modules) instead of giving wrong logits; kernelize(cca=False) keeps transformers' projection and rotary tables."""
    from zaya_kernels.modules import ZayaForCausalLM as ModulesModel

    rope = {"hybrid": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    model = tiny_model("gqa2", layers=2, rope_parameters=rope)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rope_type 'linear'.*cca=False"):
        kernelize(copy.deepcopy(model))
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        ModulesModel(model.config)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = kernelize(model, backend="reference", cca=False)(input_ids=ids).logits
    assert relative_error(actual, expected) < 5e-5


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


def test_load_checkpoint_gives_back_the_skip_bias_from_pretrained_overwrites(tmp_path):
    """transformers 5.24's from_pretrained writes -1 into every layer's skip-class balancing bias after loading
    (its _init_weights assigns it unconditionally); zaya_kernels.checkpoint.load_checkpoint on the loaded (and
    kernelized) model restores every tensor of the checkpoint, that bias included."""
    from zaya_kernels.checkpoint import load_checkpoint

    model = tiny_model("gqa2", layers=2)
    assert all(layer.mlp.gate.balancing_biases[-1] != -1.0 for layer in model.model.layers)
    model.save_pretrained(tmp_path)
    loaded = kernelize(ZayaForCausalLM.from_pretrained(tmp_path).eval(), backend="reference")
    load_checkpoint(loaded, tmp_path)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


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
@pytest.mark.parametrize("stack", [False, True])
def test_gpu_kernelized_model_matches_transformers(padded, stack, monkeypatch):
    """On a GPU with the auto backend (HIP / Triton kernels, fp32): the kernelized model's logits and greedy tokens
    equal the unmodified model's, unpadded (zaya attention for prefill and decode) and left-padded (zaya decode
    attention with seq_starts), a sliding-window layer included; with and without stacked q/k/v projections (the
    batch of 3 decodes through moe_experts_by_token, and through cca_prepare_decode on transformers' state
    tensors)."""
    from zaya_kernels import ops as zaya_ops

    decode_preparations = []
    prepare_decode = zaya_ops.cca_prepare_decode
    monkeypatch.setattr(zaya_ops, "cca_prepare_decode",
                        lambda *args: decode_preparations.append(1) or prepare_decode(*args))
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
        kernelize(model, stack_projections=stack)
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                eos_token_id=None)
        assert attention_paths(model) == ["zaya::cca_attention_decode"] * 3
        assert zaya_kernels.last_backend("moe_experts_by_token") is not None
        assert decode_preparations, "the decode steps did not run cca_prepare_decode on the cache's states"
    assert relative_error(logits, expected_logits) < 5e-5
    assert torch.equal(tokens, expected_tokens)
