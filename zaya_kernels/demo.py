"""`python -m zaya_kernels demo`: the package's main job.

1. Ops: the residual stream of a ZAYA decoder stack through the fused residual-scaling + RMSNorm ops (model input ->
   2 residual updates per layer -> final norm, with stand-in branch outputs), every backend checked against the
   reference, with times.
2. Model: a transformers ZAYA model (random weights: ZAYA1-8B shapes on a GPU, a tiny configuration on CPU; or a
   checkpoint directory with --model) runs prefill and greedy decode unmodified, kernelized, and as
   zaya_kernels.modules (the same weights on the zaya ops end to end, attention included, with a ZayaCache), and
   the demo prints agreement (max logit error, identical tokens), prefill and decode tokens/s, the speedups and
   the share of decode time per op family.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import torch

import zaya_kernels
from zaya_kernels import backend as _backend
from zaya_kernels.reference import residual_rmsnorm as ref
from zaya_kernels.tools.timing import median_seconds

ZAYA1_8B_HIDDEN = 2048
EPS = 1e-5


def _gpu_backends() -> list[str]:
    names = []
    if _backend.hip_build() != "none" and torch.cuda.is_available():
        names.append("hip")
    if _backend.triton_available()[0]:
        names.append("triton")
    return names


class _Stack:
    """Parameters of a residual stream with `layers` decoder layers, drawn away from their init values."""

    def __init__(self, hidden, layers, dtype, device, seed=0):
        gen = torch.Generator().manual_seed(seed)

        def vec(lo, hi):
            return (torch.rand(hidden, generator=gen) * (hi - lo) + lo).to(device)

        self.input = (vec(0.8, 1.2), vec(-0.1, 0.1))
        # per residual update: hs, hb, rs, rb, and the weight of the norm that follows it
        self.updates = [(vec(0.5, 1.5), vec(-0.1, 0.1), vec(0.8, 1.2), vec(-0.1, 0.1), vec(0.5, 1.5))
                        for _ in range(2 * layers)]
        self.first_norm = vec(0.5, 1.5)
        self.final_norm = vec(0.5, 1.5)
        self.branch_map = (torch.randn(hidden, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)

    def run(self, embeddings, residual_fn, norm_fn):
        """The stack's residual stream; returns (final residual fp32, final normed)."""
        new_residual, normed = residual_fn(embeddings, None, *self.input, None, None, self.first_norm, EPS)
        for hs, hb, rs, rb, w in self.updates:
            branch = normed @ self.branch_map  # stand-in for attention / MoE
            new_residual, normed = residual_fn(branch, new_residual, hs, hb, rs, rb, w, EPS)
        return new_residual, norm_fn(new_residual, self.final_norm, EPS, embeddings.dtype)


def run_demo(tokens=None, layers=None, repeats=None, model_path=None, new_tokens=None, batch=1) -> int:
    """Both parts of the demo; returns the process exit code (1 if anything disagrees with its reference)."""
    failures = run_ops_demo(tokens=tokens, layers=layers, repeats=repeats)
    print()
    failures += run_model_demo(model_path=model_path, new_tokens=new_tokens, batch=batch)
    return 1 if failures else 0


def run_ops_demo(tokens=None, layers=None, repeats=None) -> int:
    """Part 1; returns the number of backends that disagree with the reference."""
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    hidden = ZAYA1_8B_HIDDEN if on_gpu else 96
    tokens = tokens or (4096 if on_gpu else 64)
    layers = layers or (40 if on_gpu else 3)
    repeats = repeats or (20 if on_gpu else 2)
    dtype = torch.bfloat16 if on_gpu else torch.float16  # bf16 tl.dot is unusable in the CPU interpreter
    backends = _gpu_backends() if on_gpu else (["triton"] if _backend.triton_available()[0] else [])
    where = torch.cuda.get_device_name(0) if on_gpu else "CPU (Triton interpreter)"
    print(f"zaya_kernels {zaya_kernels.__version__} demo on {where}: hidden {hidden}, {tokens} tokens, "
          f"{layers} layers, {str(dtype).replace('torch.', '')}")
    print("residual stream: model input + 2 fused residual-scale/RMSNorm per layer + final norm "
          "(a matmul stands in for attention and MoE here; part 2 runs the whole model)\n")

    stack = _Stack(hidden, layers, dtype, device)
    embeddings = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    expected_residual, expected_out = stack.run(embeddings, ref.residual_scale_rmsnorm, ref.rmsnorm)

    branch = torch.randn(tokens, hidden, device=device).to(dtype)
    residual = torch.randn(tokens, hidden, device=device)
    hs, hb, rs, rb, w = stack.updates[0]
    bytes_moved = tokens * hidden * (2 * branch.element_size() + 8)
    ref_time = median_seconds(lambda: ref.residual_scale_rmsnorm(branch, residual, hs, hb, rs, rb, w, EPS), device, repeats)

    header = f"{'backend':<10} {'final-norm max err':>19} {'residual rel err':>17} {'us/call':>10} {'GB/s':>8} {'vs ref':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'reference':<10} {'-':>19} {'-':>17} {ref_time * 1e6:10.1f} {bytes_moved / ref_time / 1e9:8.1f} {'1.00x':>8}")
    failures = 0
    for name in backends:
        with zaya_kernels.use_backend(name):
            got_residual, got_out = stack.run(embeddings, torch.ops.zaya.residual_scale_rmsnorm, torch.ops.zaya.rmsnorm)
            seconds = median_seconds(lambda: torch.ops.zaya.residual_scale_rmsnorm(branch, residual, hs, hb, rs, rb, w, EPS),
                                     device, repeats)
        out_err = (got_out.float() - expected_out.float()).abs().max().item()
        res_err = ((got_residual - expected_residual).abs().max() / expected_residual.abs().max()).item()
        # one output rounding per layer can flip; the stack must stay within a few ulps of the activation dtype
        ok = out_err <= 8 * torch.finfo(dtype).eps * expected_out.float().abs().max().item() and res_err < 1e-2
        failures += not ok
        print(f"{name:<10} {out_err:19.3e} {res_err:17.3e} {seconds * 1e6:10.1f} "
              f"{bytes_moved / seconds / 1e9:8.1f} {ref_time / seconds:7.2f}x {'' if ok else '  MISMATCH'}")
    if not backends:
        print("no kernel backend available here (install triton); only the reference ran")
    if not on_gpu:
        print("(on CPU the Triton interpreter checks correctness; its times say nothing about GPU speed)")
    print("\nbackends that ran:", ", ".join(sorted({_backend.last_backend(op) or "-" for op in
                                                     ("residual_scale_rmsnorm", "rmsnorm")})))
    print("agreement:", "all backends match the reference" if failures == 0 else f"{failures} backend(s) MISMATCH")
    return failures


# ---------------------------------------------------------------- part 2: a transformers ZAYA model, kernelized
def _tiny_config():
    from transformers import ZayaConfig

    return ZayaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, moe_intermediate_size=64, num_experts=4, router_hidden_size=32,
                      max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                      initializer_range=0.2)


class _Progress:
    """A generate() streamer that draws a progress bar and timestamps every generated token."""

    def __init__(self, total, label):
        self.total, self.label, self.count, self.stamps = total, label, -1, []

    def put(self, value):
        self.stamps.append(time.perf_counter())
        self.count += 1  # the first put is the prompt
        if self.count > 0:
            done = int(30 * self.count / self.total)
            print(f"\r  {self.label:<12} [{'#' * done}{'.' * (30 - done)}] {self.count}/{self.total} tokens",
                  end="", flush=True)

    def end(self):
        print()


def _generate(model, ids, new_tokens, device, label):
    """(last-position prefill logits, generated tokens, prefill seconds, median seconds per decode step).

    Prefill = generate() start to the first new token; decode = the median gap between later tokens (streamer
    timestamps: generate() synchronises every step for its stopping criteria).
    """
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1].float()  # also the warm-up (kernel compilation, allocator)
        if device == "cuda":
            torch.cuda.synchronize()
        progress = _Progress(new_tokens, label)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             streamer=progress)
    stamps = progress.stamps[1:]  # drop the prompt's put
    prefill = stamps[0] - start
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:])) or [prefill]
    return logits, out[:, ids.shape[1]:], prefill, gaps[len(gaps) // 2]


def run_model_demo(model_path=None, new_tokens=None, batch=1) -> int:
    """Part 2; returns 1 if the kernelized model disagrees with transformers, else 0."""
    import copy

    try:
        from transformers import ZayaConfig, ZayaForCausalLM
    except ImportError as exc:  # the main job cannot run: a failure, not a skip
        print(f"model demo FAILED: transformers with ZAYA support (>= 5.8) is not installed ({exc}); "
              "pip install 'zaya-kernels[demo]'")
        return 1
    from zaya_kernels.integrations.transformers import attention_paths, kernelize

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)
    if model_path:
        # zaya_kernels.checkpoint reads transformers' layout and Zyphra's legacy one (config.json and tensors), and
        # fails loudly on a missing or misnamed tensor (from_pretrained would leave it randomly initialised with a
        # warning) or a legacy config field it cannot convert
        from zaya_kernels.checkpoint import load_checkpoint, load_config

        dtype = torch.bfloat16 if on_gpu else torch.float32
        loaded = load_config(model_path, with_report=True)
        with torch.device(device):
            model = ZayaForCausalLM(loaded.config).to(dtype)
        load_checkpoint(model, model_path)
        what = model_path
        if loaded.legacy:
            print("note: a legacy Zyphra checkpoint. Zyphra's original code passed a skipped token through as w * x "
                  "(skip_mode 1); transformers' ZAYA, and so both models compared here, output 0 for it (skip_mode "
                  "0). zaya_kernels.modules.ZayaForCausalLM(config, skip_mode=1) reproduces the original.")
    elif on_gpu:
        with torch.device(device):
            model = ZayaForCausalLM(ZayaConfig(max_position_embeddings=4096)).to(torch.bfloat16)
        what = "ZAYA1-8B shapes, random weights, bf16"
    else:
        model = ZayaForCausalLM(_tiny_config())
        what = "tiny ZAYA, random weights, fp32"
    model = model.to(device).eval()
    new_tokens = new_tokens or (32 if on_gpu else 8)
    prompt_len = 1024 if on_gpu else 12
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    print(f"model: {what}; {model.config.num_hidden_layers} layers, batch {batch}, prompt {prompt_len} tokens, "
          f"{new_tokens} new tokens on {device}")
    base_logits, base_tokens, base_prefill, base_decode = _generate(model, ids, new_tokens, device, "transformers")
    kernelized = kernelize(copy.deepcopy(model) if not on_gpu or model_path is None else model, backend="auto",
                           stack_projections=True)  # serving: one q/k/v GEMM per layer
    k_logits, k_tokens, k_prefill, k_decode = _generate(kernelized, ids, new_tokens, device, "kernelized")
    k_backends = {op: _backend.last_backend(op) for op in ("cca_prepare", "cca_prepare_decode", "cca_attention_decode",
                                                            "zaya_router", "moe_experts", "moe_experts_by_token",
                                                            "residual_scale_rmsnorm")}
    k_paths = sorted(set(attention_paths(kernelized)))
    m_logits, m_tokens, m_prefill, m_decode, shares = _generate_modules(model, ids, new_tokens, device)
    rows = [("transformers", base_prefill, base_decode), ("kernelized", k_prefill, k_decode),
            ("zaya modules", m_prefill, m_decode)]
    outputs = [("kernelized", k_logits, k_tokens), ("zaya modules", m_logits, m_tokens)]
    if on_gpu:  # the decode step replayed as one CUDA/HIP graph
        g_logits, g_tokens, g_prefill, g_decode, _ = _generate_modules(model, ids, new_tokens, device, graph=True)
        rows.append(("+ graph", g_prefill, g_decode))
        outputs.append(("zaya modules + graph", g_logits, g_tokens))
    print(f"{'':<13} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill x':>10} {'decode x':>9}")
    for label, prefill, decode in rows:
        print(f"{label:<13} {batch * prompt_len / prefill:14.1f} {batch / decode:13.1f} "
              f"{base_prefill / prefill:9.2f}x {base_decode / decode:8.2f}x")
    print("(kernelized: transformers' model and caches with the residual/norm chain, CCA projection, attention, router "
          "and experts on zaya ops; zaya modules: the model on zaya ops with a preallocated ZayaCache)")
    if not on_gpu:
        print("(on CPU every zaya op runs its pure-PyTorch reference, the oracle the kernels are tested against, "
              "written to be read (one sequence at a time, fp32), not to be fast: these times check that the paths "
              "run and agree, and say nothing about the GPU kernels)")
    print("kernelized backends: " + ", ".join(f"{op} {name}" for op, name in k_backends.items())
          + f"; attention (last step): {', '.join(str(p) for p in k_paths)}")
    print("decode time per op family (zaya modules, profiler): "
          + ", ".join(f"{family} {share:.0%}" for family, share in shares))
    dtype_ok = 5e-5 if next(model.parameters()).dtype == torch.float32 else 5e-2
    failures = 0
    for label, logits, tokens in outputs:
        err = (logits - base_logits).abs().max().item()
        rel = err / base_logits.abs().max().item()
        same = torch.equal(tokens, base_tokens)
        print(f"agreement ({label}): max logit error {err:.3e} (relative {rel:.1e}), generated tokens "
              f"{'identical' if same else 'DIFFER'}")
        failures += not (rel <= dtype_ok and (same or next(model.parameters()).dtype != torch.float32))
    return 1 if failures else 0


_OP_FAMILIES = (("attention", ("zaya::cca_attention",)), ("CCA preparation", ("zaya::cca_prepare",)),
                ("router", ("zaya::zaya_router",)), ("experts", ("zaya::moe",)),
                ("norms", ("zaya::residual_scale_rmsnorm", "zaya::rmsnorm")),
                ("linear layers", ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm")))


@contextlib.contextmanager
def _without_profiler_chatter():
    """Keep the profiler's own start/stop lines (torch 2.13's C++ code prints "USDT:... SyncActivityProfilerHandler
    ... profiler_start" on stderr) out of the demo's output; anything else written to stderr meanwhile still shows."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if "SyncActivityProfilerHandler" not in line:
                    sys.stderr.write(line)


def _decode_shares(step, device):
    """Fractions of one decode step's time per op family: the profiler's top-level ops (a zaya op or a linear
    layer, with the kernels they launch), device time on a GPU, CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with _without_profiler_chatter(), profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        seconds = event.device_time_total if device == "cuda" else event.cpu_time_total
        family = next((f for f, prefixes in _OP_FAMILIES if event.name.startswith(prefixes)), "other")
        totals[family] = totals.get(family, 0.0) + seconds
    whole = sum(totals.values()) or 1.0
    return sorted(((f, t / whole) for f, t in totals.items()), key=lambda item: -item[1])


def _generate_modules(model, ids, new_tokens, device, graph=False):
    """The transformers model's weights in zaya_kernels.modules (shared tensors, no copy): (last-position prefill
    logits, generated tokens, prefill seconds, median seconds per decode step, decode time shares). graph: decode
    steps replayed as a captured CUDA/HIP graph (its capture counts in the prefill time)."""
    from zaya_kernels.modules import ZayaForCausalLM

    with torch.device("meta"):
        ours = ZayaForCausalLM(model.config)
    ours.load_state_dict(model.state_dict(), assign=True)
    ours.eval()
    batch, prompt_len = ids.shape

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        logits = ours(ids)[:, -1].float()  # warm-up (kernel compilation) and the agreement check
        ours(ids[:, :1], cache=ours.new_cache(batch, 2))  # warm-up of the decode kernels
        sync()
        cache = ours.new_cache(batch, prompt_len + new_tokens + 1)
        progress = _Progress(new_tokens, "+ graph" if graph else "zaya modules")
        start = time.perf_counter()
        progress.put(None)

        def on_token(_step):
            sync()  # per-token timestamps, as transformers' generate() gives them
            progress.put(None)

        out = ours.generate(ids, new_tokens, cache=cache, on_token=on_token, cuda_graph=graph)
        progress.end()
        shares = _decode_shares(lambda: ours(out[:, -1:], cache=cache), device)
    stamps = progress.stamps[1:]
    prefill = stamps[0] - start
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:])) or [prefill]
    return logits, out[:, prompt_len:], prefill, gaps[len(gaps) // 2], shares
