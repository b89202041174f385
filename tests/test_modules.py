"""zaya_kernels.modules: a ZAYA model built from the zaya ops loads transformers' state dict unchanged and gives the
transformers model's logits, greedy tokens and gradients; its cache paths (decode, chunked prefill, packed varlen)
equal a plain prefill."""
from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close, counted_launches
from zaya_kernels.backend import use_backend
from zaya_kernels.integrations.transformers import kernelize, update_balancing_biases
from zaya_kernels.modules import DecodeGraph, ZayaCache, ZayaForCausalLM, forget_stacked_projections

pytest.importorskip("transformers", reason="the module parity tests need transformers >= 5.8")
from test_transformers_integration import ARCHITECTURES, drawn_model, relative_error, tiny_model  # noqa: E402

SLIDING = dict(layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=4)


def pair(name, seed=0):
    """(transformers model, zaya_kernels.modules model with the same state dict), fp32, eval mode. "sliding" is the
    gqa2 configuration with a sliding-window middle layer."""
    return pair_of(tiny_model("gqa2", seed, **SLIDING) if name == "sliding" else tiny_model(name, seed))


def pair_of(hf):
    """(hf with eager attention, a zaya_kernels.modules model holding a copy of its state dict)."""
    hf.config._attn_implementation = "eager"
    ours = ZayaForCausalLM(hf.config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def check_logits_and_tokens(hf, ours, ids, backend, new_tokens):
    """ours' prefill logits (relative error < 5e-5) and greedy tokens (identical) against hf's."""
    with torch.no_grad():
        expected = hf(ids).logits
        expected_tokens = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
        with use_backend(backend):
            logits = ours(ids)
            tokens = ours.generate(ids, new_tokens)
    assert relative_error(logits, expected) < 5e-5
    assert torch.equal(tokens, expected_tokens)


def random_ids(batch, seq, seed=3):
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_state_dict_names_equal_transformers():
    hf, ours = pair("gqa2")
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    # freshly built buffers equal transformers' initial ones (the skip class's balancing bias starts at -1)
    from transformers import ZayaForCausalLM as TransformersZaya

    expected = {n: b for n, b in TransformersZaya(hf.config).named_buffers() if n.endswith("balancing_biases")}
    actual = {n: b for n, b in ZayaForCausalLM(hf.config).named_buffers() if n.endswith("balancing_biases")}
    assert sorted(actual) == sorted(expected) and len(expected) == hf.config.num_hidden_layers
    for name, bias in expected.items():
        assert torch.equal(actual[name], bias) and bias[-1] == -1.0, name


@pytest.mark.parametrize("backend,name", [("reference", "gqa2"), ("reference", "mha"), ("reference", "gqa4-odd"),
                                          ("reference", "sliding"), ("reference", "biased"), ("triton", "gqa2"),
                                          ("triton", "sliding")])
def test_logits_and_greedy_tokens_match_transformers(backend, name):
    hf, ours = pair(name)
    check_logits_and_tokens(hf, ours, random_ids(2, 9), backend, 5)


@settings(max_examples=6)
@given(arch=ARCHITECTURES, backend=st.sampled_from(["reference", "triton"]), seed=st.integers(0, 2**16))
def test_drawn_architectures_match_transformers(arch, backend, seed):
    """zaya_kernels.modules with a drawn architecture's transformers state dict: logits and greedy tokens (decode
    through ZayaCache) equal the transformers model's."""
    hf, ours = pair_of(drawn_model(arch, seed))
    check_logits_and_tokens(hf, ours, random_ids(2, 7, seed), backend, 4)


def test_decode_step_kernel_launches():
    """The Triton kernels one decode step launches (interpreter launches counted by kernel), per layer: the CCA
    preparation in one launch (issue 3), the router in one (issue 5), the attention in one (here one split per
    sequence; a long context on a GPU with idle SMs adds the split-K reduction, tested in test_attention), the MoE's
    two expert GEMMs by token (moe_experts_by_token: 2 tokens, no dispatch launch; the first GEMM also writes the
    skipped tokens' rows), two fused residual norms; plus the model-input norm. Of aten work, only the
    projections' GEMMs (stacked q/k/v and o) per layer. A new launch on this path must show up here."""
    _, ours = pair("gqa2")
    layers = len(ours.model.layers)
    cache = ours.new_cache(2, 16)
    with torch.no_grad(), use_backend("triton"):
        ours(random_ids(2, 5), cache=cache)
        step = random_ids(2, 1)
        with counted_launches() as (launches, aten):
            ours(step, cache=cache)
    per_layer = {"cca_decode_kernel": 1, "attention_decode_split_kernel": 1,
                 "zaya_router_fwd_kernel": 1, "moe_gate_up_by_token_kernel": 1, "moe_down_by_token_kernel": 1,
                 "residual_rmsnorm_fwd_kernel": 2}  # skipped tokens' rows: in moe_gate_up_by_token_kernel
    expected = collections.Counter({name: n * layers for name, n in per_layer.items()})
    expected["residual_rmsnorm_fwd_kernel"] += 1  # the model input's scaling fused with layer 0's norm
    assert launches == expected
    assert aten["mm"] == 2 * layers + 1  # + the LM head
    # per step, not per layer: the embedding and the copy of the cache's sequence lengths to the device
    assert aten - collections.Counter(mm=aten["mm"]) == collections.Counter(embedding=1, copy_=1)


def test_cache_written_by_the_kernels_equals_the_autograd_path():
    """In inference cca_prepare(_paged/_decode) write k / v straight into the cache (paged-pool view); a prefill
    with autograd copies them afterwards: both give the same cache and logits, and the decode after either (no
    gradients through a cached prefix: test_cache_and_input_errors)."""
    _, ours = pair("gqa2")
    ids = random_ids(2, 6)
    results = []
    for grad in (False, True):
        cache = ours.new_cache(2, 12)
        with torch.set_grad_enabled(grad):
            prefill = ours(ids[:, :5], cache=cache)
        with torch.no_grad():
            step = ours(ids[:, 5:], cache=cache)
        results.append((prefill.detach(), step.detach(), [k.clone() for k in cache.k_cache + cache.v_cache]))
    (p0, s0, c0), (p1, s1, c1) = results
    assert_close(p0, p1, dtype=torch.float32, reduction=64)
    assert_close(s0, s1, dtype=torch.float32, reduction=64)
    for a, b in zip(c0, c1):
        assert_close(a, b, dtype=torch.float32, reduction=64)
    assert any(k[:, :6].abs().sum() > 0 for k in c0)


def test_inference_projection_follows_weight_updates():
    """Inference runs the four CCA projections as one GEMM over a stacked copy of their weights: the copy follows
    in-place updates and replaced parameters, and equals the training path (four GEMMs)."""
    hf, ours = pair("gqa2")
    ids = random_ids(2, 5)
    attn = ours.model.layers[1].self_attn.qkv_proj
    with torch.no_grad():
        ours(ids)
        first = attn._zaya_stacked_qkv[1]
        attn.k_proj.weight.mul_(1.5)  # an in-place update (as an optimizer step does)
        hf.model.layers[1].self_attn.qkv_proj.k_proj.weight.mul_(1.5)
        updated = ours(ids)
        assert attn._zaya_stacked_qkv[1] is not first
        attn.v_proj_delayed.weight = torch.nn.Parameter(attn.v_proj_delayed.weight * 0.5)  # a replaced parameter
        hf.model.layers[1].self_attn.qkv_proj.v_proj_delayed.weight.mul_(0.5)
        replaced = ours(ids)
        expected = hf(ids).logits
    with torch.enable_grad():
        trained_path = ours(ids)  # parameters require grad: the four separate GEMMs
    assert relative_error(replaced, expected) < 5e-5
    assert relative_error(trained_path.detach(), expected) < 5e-5
    assert relative_error(updated, replaced) > 1e-3  # the second update changed the logits
    with torch.no_grad():
        attn.q_proj.weight.data.mul_(0.8)  # through .data: no version bump, the copy cannot see it ...
        hf.model.layers[1].self_attn.qkv_proj.q_proj.weight.mul_(0.8)
        forget_stacked_projections(ours)  # ... until it is dropped
        assert relative_error(ours(ids), hf(ids).logits) < 5e-5
    with torch.inference_mode():  # tensors made here (the router's expert index, the cache) have no version counter
        assert relative_error(ours(ids), hf(ids).logits) < 5e-5
        assert torch.equal(ours.generate(ids, 3), hf.generate(ids, max_new_tokens=3, do_sample=False,
                                                              eos_token_id=None, pad_token_id=0))


def test_inference_mode_generation_reads_back_no_expert_index(monkeypatch):
    """Under torch.inference_mode the router's expert index has no version counter to be remembered valid by: the
    modules and the kernelized model hand it to moe as the router's (index_from_router), so a GPU generation does not
    copy it to the host in every layer (here: every MoE value check is skipped, prefill and decode)."""
    import importlib

    moe_ops = importlib.import_module("zaya_kernels.ops.moe")
    checks = []
    real = moe_ops._skip_value_check
    monkeypatch.setattr(moe_ops, "_skip_value_check", lambda t, what: checks.append(real(t, what)) or checks[-1])
    hf, ours = pair("gqa2")
    kernelized = kernelize(hf, backend="reference")
    ids = random_ids(2, 6)
    with torch.inference_mode():
        ours.generate(ids, 3)
        kernelized.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert len(checks) >= 2 * 3 * 3 and all(checks)  # 2 generations x 3 forwards x 3 layers at least


@pytest.mark.parametrize("backend,name", [("reference", "gqa4-odd"), ("reference", "sliding"), ("triton", "mha")])
def test_decode_token_by_token_equals_prefill(backend, name):
    _, ours = pair(name)
    ids = random_ids(3, 7)
    with torch.no_grad(), use_backend(backend):
        full = ours(ids)
        cache = ours.new_cache(3, 8)
        steps = [ours(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])]
    assert cache.lengths == [7, 7, 7]
    assert_close(torch.cat(steps, dim=1), full, scale=4.0)


def test_inference_passes_the_stacked_projection_slices_to_the_cca_ops_uncopied(monkeypatch):
    """Inference runs the four CCA projections as one GEMM and hands its three column slices to zaya::cca_prepare /
    zaya::cca_prepare_decode as row-strided views: at a batch-2 decode step and a prefill, qk, v_current and
    v_delayed are views of one storage with the GEMM output's row stride (no copy kernels per layer)."""
    from zaya_kernels import ops as zaya_ops

    _, ours = pair("gqa2")
    config = ours.config
    head_dim = config.head_dim
    width = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim  # [Q0 | K0 | Vc | Vd]
    seen = []

    def recording(name):
        original = getattr(zaya_ops, name)

        def call(qk, v_current, v_delayed, *args, **kwargs):
            seen.append((name, qk, v_current, v_delayed))
            return original(qk, v_current, v_delayed, *args, **kwargs)
        return call

    for name in ("cca_prepare", "cca_prepare_decode"):
        monkeypatch.setattr(zaya_ops, name, recording(name))
    cache = ours.new_cache(2, 8)
    with torch.no_grad(), use_backend("reference"):
        ours(random_ids(2, 5), cache=cache)
        ours(random_ids(2, 1, seed=4), cache=cache)
    names = [name for name, *_ in seen]
    assert names == ["cca_prepare"] * len(ours.model.layers) + ["cca_prepare_decode"] * len(ours.model.layers)
    for name, qk, v_current, v_delayed in seen:
        assert qk.shape[0] == v_current.shape[0] > 1
        storages = {t.untyped_storage().data_ptr() for t in (qk, v_current, v_delayed)}
        assert len(storages) == 1, f"{name}: the projection slices were copied"
        assert qk.stride() == v_current.stride() == v_delayed.stride() == (width, 1), name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_varlen_and_chunked_prefill_equal_whole_sequences(backend):
    _, ours = pair("gqa2")
    lens = [5, 1, 8]
    seqs = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    with torch.no_grad(), use_backend(backend):
        whole = [ours(s[None])[0] for s in seqs]
        packed = ours(torch.cat(seqs), seq_lens=lens)
        # uneven chunks (one attention launch per sequence), then equal chunks (one launch), then decode
        cache = ours.new_cache(3, 8)
        first = [2, 1, 3]
        chunk1 = ours(torch.cat([s[:n] for s, n in zip(seqs, first)]), seq_lens=first, cache=cache)
        chunk2 = ours(torch.cat([seqs[0][2:4], seqs[2][3:5]]), seq_lens=[2, 0, 2], cache=cache)
        assert cache.lengths == [4, 1, 5]
        rest = ours(torch.cat([seqs[0][4:5], seqs[2][5:6]]), seq_lens=[1, 0, 1], cache=cache)
    assert_close(packed, torch.cat(whole), scale=4.0)
    assert_close(chunk1, torch.cat([w[:n] for w, n in zip(whole, first)]), scale=4.0)
    assert_close(chunk2, torch.cat([whole[0][2:4], whole[2][3:5]]), scale=4.0)
    assert_close(rest, torch.cat([whole[0][4:5], whole[2][5:6]]), scale=4.0)


@pytest.mark.parametrize("backend,name", [("reference", "gqa2"), ("triton", "gqa2"), ("reference", "biased")])
def test_training_loss_gradients_and_balancing_match_transformers(backend, name):
    hf, ours = pair(name)
    hf.train()
    ours.train()
    ids = random_ids(2, 8)
    labels = ids.roll(-1, dims=1)
    expected_loss = torch.nn.functional.cross_entropy(hf(ids).logits.flatten(0, 1), labels.flatten())
    expected_loss.backward()
    chosen = []  # every layer's expert choices, as the routers made them
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[0]))
             for layer in ours.model.layers]
    with use_backend(backend):
        loss = torch.nn.functional.cross_entropy(ours(ids).flatten(0, 1), labels.flatten())
        loss.backward()
    for hook in hooks:
        hook.remove()
    assert abs(loss.item() - expected_loss.item()) < 5e-5 * abs(expected_loss.item())
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        expected = hf_params[name].grad
        assert param.grad is not None, name
        # fp32 sums over every token and feature that reach the parameter, in a different order than transformers
        assert_close(param.grad, expected, reduction=4096, what=name)
    classes = hf.config.num_experts + 1
    before = torch.stack([layer.mlp.gate.balancing_biases.clone() for layer in ours.model.layers])
    loads = update_balancing_biases(ours, mode="adamw", lr=0.1)
    after = torch.stack([layer.mlp.gate.balancing_biases for layer in ours.model.layers])
    expected_loads = torch.stack([torch.bincount(c.long(), minlength=classes) / c.numel() for c in chosen])
    assert loads.shape == (3, classes)
    assert_close(loads, expected_loads)
    # the first AdamW step (bias-corrected) moves each bias by lr against the sign of its load error
    error = expected_loads - 1.0 / classes
    step = after - before
    moved = error.abs() > 1e-6
    assert moved.any()
    assert (step[moved] + 0.1 * error.sign()[moved]).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_runs_are_bitwise_deterministic(backend):
    """Two identical prefill + decode runs (and two training backwards) give bitwise equal logits and gradients:
    top-1 combine is a scatter, and no kernel accumulates with atomics."""
    _, ours = pair("gqa2")
    ids = random_ids(2, 6)

    def run():
        with torch.no_grad(), use_backend(backend):
            cache = ours.new_cache(2, 8)
            prefill = ours(ids, cache=cache)
            return prefill, ours(ids[:, -1:], cache=cache)

    def grads():
        ours.zero_grad()
        with use_backend(backend):
            ours.train()(ids).float().square().mean().backward()
        ours.eval()
        return [p.grad.clone() for p in ours.parameters()]

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)
    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_traces_training_and_prefill_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) traces the model: the zaya ops are opaque custom ops with fake kernels and
    registered autograd, and nothing in the layer code (config tables, device targets, expert-choice counting) stops
    dynamo. AOT autograd ("aot_eager": fake-tensor tracing of forward and backward, no code generation) gives
    eager's loss, gradients and balancing counts. The cached decode path keeps host-side lengths and is replayed
    with DecodeGraph instead."""
    _, ours = pair("gqa2")
    ids = random_ids(2, 6)

    def loss_fn(tokens):
        return ours(tokens).float().square().mean()

    def train_step(step_fn):
        ours.zero_grad()
        for layer in ours.model.layers:
            layer.mlp.__dict__.pop("_zaya_class_counts", None)
        with use_backend(backend):
            loss = step_fn(ids)
            loss.backward()
        counts = [layer.mlp._zaya_class_counts.clone() for layer in ours.model.layers]
        return loss.detach(), [p.grad.clone() for p in ours.parameters()], counts

    ours.train()
    eager = train_step(loss_fn)
    compiled = train_step(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    assert_close(compiled[0], eager[0], what="loss")
    for name_param, got, expected in zip(ours.named_parameters(), compiled[1], eager[1]):
        assert_close(got, expected, reduction=64, what=name_param[0])
    for got, expected in zip(compiled[2], eager[2]):
        assert torch.equal(got, expected)
    ours.eval()
    with torch.no_grad(), use_backend(backend):
        assert_close(torch.compile(ours, fullgraph=True, backend="aot_eager")(ids), ours(ids))


def test_cache_and_input_errors():
    _, ours = pair("gqa2")
    ids = random_ids(2, 6)
    cache = ours.new_cache(2, 8)
    with torch.no_grad():
        ours(ids[:, :4], cache=cache)
    with pytest.raises(ValueError, match="gradients through a cached prefix are not implemented"):
        ours(ids[:, 4:], cache=cache)  # grad mode on, parameters require grad
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        ours(ids, cache=ours.new_cache(2, 5))
    with pytest.raises(ValueError, match="holds 3 sequences"):
        ours(ids, cache=ours.new_cache(3, 8))
    with pytest.raises(ValueError, match="seq_lens summing to T"):
        ours(ids.flatten(), seq_lens=[5, 5])
    with pytest.raises(ValueError, match="positive"):
        ZayaCache(ours.config, 0, 4)
    dropout = ZayaForCausalLM(ours.config.__class__(**{**ours.config.to_dict(), "attention_dropout": 0.1}))
    with pytest.raises(ValueError, match="attention dropout"):
        dropout.train()(ids)
    config = ours.config.__class__(**{**ours.config.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="SiLU"):
        ZayaForCausalLM(config)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fresh_one_token_sequences_and_reused_slots_start_from_zero_states(backend):
    """A forward in which every sequence brings one token is a decode step only when every sequence continues a
    cached one: a 1-token prompt (with attention_bias its delayed value starts at the bias) and a slot reused after
    `cache.reset` start fresh. A bf16 state pool does not round a fresh sequence's value bias."""
    hf, ours = pair("biased")
    ids = random_ids(2, 7)
    with torch.no_grad(), use_backend(backend):
        expected = hf.generate(ids[:, :1], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:, :1], 4), expected)
        cache = ours.new_cache(2, 8)
        ours(ids[:, :6], cache=cache)
        cache.reset([1])  # sequence 1's slot takes a new sequence; sequence 0 goes on
        assert cache.lengths == [6, 0] and cache.device_lengths.tolist() == [6, 0]
        with pytest.raises(ValueError, match=r"sequences \[1\] of the cache are empty"):
            ours(ids[:, :1], cache=cache, device_decode=True)
        mixed = ours(torch.stack([ids[0, 6:7], ids[1, :1]]), cache=cache)
        assert relative_error(mixed[0, 0], hf(ids[:1]).logits[0, -1]) < 5e-5
        assert relative_error(mixed[1, 0], hf(ids[1:, :1]).logits[0, 0]) < 5e-5
        cache.reset()
        fresh = ours(ids[:, 2:3], cache=cache)
        assert cache.lengths == [1, 1]
        assert relative_error(fresh, hf(ids[:, 2:3]).logits) < 5e-5
        no_cache = ours(ids)
        assert torch.equal(ours(ids, cache=ours.new_cache(2, 8, state_dtype=torch.bfloat16)), no_cache)
        assert ours(ids[:, :0]).shape == (2, 0, hf.config.vocab_size)  # and an empty batch gives empty logits
        assert ours(ids.flatten()[:0], seq_lens=[0, 0]).shape == (0, hf.config.vocab_size)


def test_skip_mode_one_passes_skipped_tokens_through_scaled():
    """skip_mode 1 (Zyphra's legacy semantics): a skipped token's MoE output is w x; routed tokens are unchanged."""
    hf, _ = pair("gqa2")
    ours = ZayaForCausalLM(hf.config, skip_mode=1).eval()
    ours.load_state_dict(hf.state_dict())
    moe = ours.model.layers[1].mlp  # layer 1 has its skip class favoured (tiny_model)
    x = torch.randn(16, hf.config.hidden_size, generator=torch.Generator().manual_seed(5))
    r_prev = torch.randn(16, hf.config.router_hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), use_backend("reference"):
        index, weight, _ = moe.gate(x, r_prev)
        y, _ = moe(x, r_prev)
        moe.skip_mode = 0
        y0, _ = moe(x, r_prev)
    skipped = index == hf.config.num_experts
    assert skipped.any() and (~skipped).any()
    assert_close(y[skipped], weight[skipped, None] * x[skipped])
    assert torch.equal(y[~skipped], y0[~skipped])
    assert (y0[skipped] == 0).all()
    with pytest.raises(ValueError, match="skip_mode"):
        ZayaForCausalLM(hf.config, skip_mode=2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_device_driven_decode_equals_host_driven_decode(backend):
    """The decode step a DecodeGraph captures (positions from cache.device_lengths, no host data) gives the host
    path's logits and leaves the cache in the same state; snapshot/restore undo a step."""
    _, ours = pair("sliding")
    ids = random_ids(2, 6)
    with torch.no_grad(), use_backend(backend):
        host_cache, device_cache = ours.new_cache(2, 9), ours.new_cache(2, 9)
        ours(ids[:, :3], cache=host_cache)
        ours(ids[:, :3], cache=device_cache)
        saved = device_cache.snapshot()
        ours(ids[:, 3:4], cache=device_cache, device_decode=True)
        device_cache.restore(saved)
        for t in range(3, 6):
            expected = ours(ids[:, t:t + 1], cache=host_cache)
            got = ours(ids[:, t:t + 1], cache=device_cache, device_decode=True)
            assert torch.equal(got, expected)
    assert device_cache.lengths == host_cache.lengths == [6, 6]
    assert device_cache.device_lengths.tolist() == [6, 6]
    for a, b in zip(device_cache.conv_state + device_cache.k_cache, host_cache.conv_state + host_cache.k_cache):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="device_decode takes"):
        ours(ids[:, :2], cache=device_cache, device_decode=True)
    with pytest.raises(RuntimeError, match="need the model and cache on a GPU"):
        DecodeGraph(ours, device_cache)


@pytest.mark.gpu
def test_gpu_decode_graph_replays_the_eager_decode():
    _, ours = pair("gqa2")
    ours = ours.cuda()
    ids = random_ids(2, 12).cuda()
    eager = ours.generate(ids, 8)
    graphed = ours.generate(ids, 8, cuda_graph=True)
    assert torch.equal(graphed, eager)
    cache = ours.new_cache(2, 20)
    with torch.no_grad():
        ours(ids, cache=cache)
    graph = DecodeGraph(ours, cache)
    assert cache.lengths == [12, 12]
    logits = graph.step(eager[:, 12:13]).clone()
    with torch.no_grad():
        expected = ours(eager[:, :13])[:, -1]
    assert relative_error(logits, expected) < 1e-4
    assert cache.lengths == [13, 13] and cache.device_lengths.tolist() == [13, 13]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_modules_match_transformers_and_decode_equals_prefill(dtype):
    """On a GPU with the auto backend (Triton / HIP kernels): logits near transformers', decode equals prefill."""
    hf, ours = pair("sliding")
    hf, ours = hf.to("cuda", dtype), ours.to("cuda", dtype)
    ids = random_ids(3, 40).cuda()
    with torch.no_grad():
        expected = hf(ids).logits.float()
        logits = ours(ids).float()
        cache = ours.new_cache(3, 48)
        prefix = ours(ids[:, :30], cache=cache)
        steps = [ours(ids[:, t:t + 1], cache=cache) for t in range(30, 40)]
    limit = 5e-5 if dtype == torch.float32 else 5e-2  # bf16: transformers rounds some steps to bf16, we keep fp32
    # bf16 also flips the router's choice of a token or two at a near-tie (another expert: a large, local change in
    # that token's logits, from transformers and between prefill and decode alike): 95% of the tokens must be close
    needed = 1.0 if dtype == torch.float32 else 0.95

    def close_tokens(actual, wanted):  # fraction of tokens with max |actual - wanted| < limit * max |wanted|
        return ((actual - wanted).abs().amax(-1) < limit * wanted.abs().max()).float().mean().item()

    assert close_tokens(logits, expected) >= needed
    assert close_tokens(torch.cat([prefix] + steps, dim=1).float(), logits) >= needed


def test_casting_keeps_balancing_biases_fp32_and_kernelize_accepts_a_cast_model():
    hf, ours = pair("gqa2")
    ours = ours.to(torch.bfloat16)
    assert ours.model.layers[0].mlp.gate.balancing_biases.dtype == torch.float32
    assert ours.model.layers[0].mlp.gate.down_proj.weight.dtype == torch.bfloat16
    hf = hf.to(torch.bfloat16)  # transformers casts the buffer with the model
    ids = random_ids(1, 5)
    with torch.no_grad(), use_backend("reference"):
        expected = hf(ids).logits.float()
        logits = kernelize(hf, backend="reference")(ids).logits.float()
        ours_logits = ours(ids).float()
    assert hf.model.layers[0].mlp.gate.balancing_biases.dtype == torch.float32
    assert relative_error(logits, expected) < 5e-2
    assert relative_error(ours_logits, expected) < 5e-2
