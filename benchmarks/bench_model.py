"""End-to-end ZAYA model benchmarks: a prefill forward and one greedy decode step, for transformers' unmodified
model (the baseline of the "vs ref" column), the same model kernelize'd, and zaya_kernels.modules holding the same
weights (eager, and on a GPU the decode step replayed as a CUDA/HIP graph).

ZAYA1-8B shapes with random bf16 weights on a GPU (prefill of 1k and 8k tokens; decode at batch 1 and 32 after a
1k-token prompt); a tiny fp32 model on CPU so that the runner cannot rot. Bytes: the weights the step must read
(every non-expert weight, plus the experts a batch of B tokens reaches per layer in expectation under uniform
routing) and, for decode, the KV cache; a prefill is compute-bound, so its GB/s is only a lower bound of traffic.
Decode steps extend their caches on every timed call (the timer decides how many calls), so the context grows a
little past the prompt during a measurement.

Throughput: the shape dicts carry "tokens_per_call" (the prompt for a prefill, the batch for a decode step), so
run.py writes tokens/s for every provider: prefill tokens/s at 1k and 8k prompts, decode tokens/s at batch 1 and 32,
kernelized and zaya modules against unmodified transformers. The kernelized model's and the modules' decode records
also carry "decode_time_shares": the fraction of one profiled decode step's time per op family (attention, CCA
preparation, router, experts, norms, linear layers, other; zaya_kernels.demo._decode_shares: device time on a GPU).
"""
from __future__ import annotations

import copy

import torch

from run import with_probe

REPEATS = 10  # whole-model steps: fewer timed calls than the per-op cases


def _models(device):
    from transformers import ZayaConfig, ZayaForCausalLM

    from zaya_kernels.integrations.transformers import kernelize
    from zaya_kernels.modules import ZayaForCausalLM as ZayaModules

    torch.manual_seed(0)
    if device == "cuda":
        with torch.device(device):
            hf = ZayaForCausalLM(ZayaConfig(max_position_embeddings=16384)).to(torch.bfloat16).eval()
    else:
        hf = ZayaForCausalLM(ZayaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=4,
                                        router_hidden_size=32, max_position_embeddings=512)).eval()
    kernelized = kernelize(copy.deepcopy(hf), backend="auto", stack_projections=True)  # serving: one q/k/v GEMM
    with torch.device("meta"):
        modules = ZayaModules(hf.config)
    modules.load_state_dict(hf.state_dict(), assign=True)  # shares hf's tensors
    return hf, kernelized, modules.eval()


def _weight_bytes(model, tokens: int) -> int:
    """Bytes of the weights a step over `tokens` tokens reads: all but the experts, plus the expected number of
    distinct experts per layer under uniform top-1 routing."""
    cfg = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = model.model.layers[0].mlp.experts
    per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * experts.gate_up_proj.element_size()
    all_experts = cfg.num_hidden_layers * cfg.num_experts * per_expert
    reached = cfg.num_experts * (1 - (1 - 1 / cfg.num_experts) ** tokens)
    return total - all_experts + int(cfg.num_hidden_layers * reached * per_expert)


def _kv_bytes(model, batch: int, context: int) -> int:
    cfg = model.config
    element = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * cfg.head_dim * element


def _graph_step(model, cache, token):
    from zaya_kernels.modules import DecodeGraph

    graph = DecodeGraph(model, cache)
    return lambda: graph.step(token)


def cases(device: str):
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.models.zaya.modeling_zaya import DynamicCache

    try:
        from zaya_kernels.demo import _decode_shares
    except ImportError:  # demo.py's helper renamed: time the steps without the shares
        _decode_shares = None

    on_gpu = device == "cuda"
    hf, kernelized, modules = _models(device)
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    inference = torch.no_grad()  # as a decorator: every provider runs without autograd

    for prompt in ((1024, 8192) if on_gpu else (16,)):
        ids = torch.randint(3, vocab, (1, prompt), generator=gen).to(device)
        providers = {"transformers": inference(lambda ids=ids: hf(input_ids=ids, use_cache=False)),
                     "kernelized": inference(lambda ids=ids: kernelized(input_ids=ids, use_cache=False)),
                     "zaya-modules": inference(lambda ids=ids: modules(ids))}
        shape = {"batch": 1, "tokens": prompt, "tokens_per_call": prompt}
        yield "model_prefill", shape, _weight_bytes(hf, prompt), providers

    context = 1024 if on_gpu else 16
    room = 4096 if on_gpu else 256  # the timer's calls each add a token
    for batch in ((1, 32) if on_gpu else (1, 2)):
        ids = torch.randint(3, vocab, (batch, context), generator=gen).to(device)
        token = ids[:, -1:].contiguous()
        providers = {}
        with torch.no_grad():
            for label, model in (("transformers", hf), ("kernelized", kernelized)):
                cache = DynamicCache(config=model.config)
                model(input_ids=ids, cache=cache, use_cache=True)
                providers[label] = inference(lambda model=model, cache=cache: model(
                    input_ids=token, cache=cache, use_cache=True))
            zaya_cache = modules.new_cache(batch, context + room)
            modules(ids, cache=zaya_cache)
            providers["zaya-modules"] = inference(lambda cache=zaya_cache: modules(token, cache=cache))
            for label in ("kernelized", "zaya-modules") if _decode_shares else ():  # one profiled step each
                providers[label] = with_probe(providers[label], lambda step=providers[label]: {
                    "decode_time_shares": dict(_decode_shares(step, device))})
            if on_gpu:  # the decode step as one captured graph
                graph_cache = modules.new_cache(batch, context + room)
                modules(ids, cache=graph_cache)
                providers["zaya-modules+graph"] = _graph_step(modules, graph_cache, token)
        moved = _weight_bytes(hf, batch) + _kv_bytes(hf, batch, context)
        yield "model_decode_step", {"batch": batch, "context": context, "tokens_per_call": batch}, moved, providers
