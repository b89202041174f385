"""Benchmark cases for CCA attention: ZAYA1-8B shapes (Hq 8, Hkv 2, D 128, bf16) on GPU, tiny shapes on CPU.

Prefill (one causal sequence of T tokens, forward and forward+backward): zaya's Triton kernels against torch's
scaled_dot_product_attention with the KV heads expanded to Hq (the flash backend where torch has one), and the
reference on CPU. FLOPs count the causal half: forward 4 * T^2 / 2 * Hq * D, backward 2.5x that.
Decode (one query token per sequence, paged cache with 16-token blocks in a shuffled pool): zaya's split-K kernel
against SDPA over a contiguous cache with enable_gqa; bytes are the K and V cache rows read.

`cases(device)` feeds benchmarks/run.py (GB/s columns); run this file directly for TFLOP/s of the prefill cases:

    python benchmarks/bench_attention.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from zaya_kernels.reference import attention as ref

HQ, HKV, D = 8, 2, 128
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "MI300X": 1307e12, "MI355X": 2500e12}


def _zaya(op_name, *args):
    import zaya_kernels

    with zaya_kernels.use_backend("triton"):
        return getattr(torch.ops.zaya, op_name)(*args)


def _sdpa_prefill(q, k, v):
    """torch SDPA on [1, H, T, D] with the KV heads expanded (repeat_interleave: kv head h // g)."""
    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)[None]
    kt = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    vt = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


def prefill_flops(tokens: int, backward: bool) -> float:
    forward = 4.0 * tokens * tokens / 2 * HQ * D
    return forward * (3.5 if backward else 1.0)


def _prefill_cases(device, dtype, token_counts, zaya_ok):
    for tokens in token_counts:
        gen = torch.Generator().manual_seed(tokens)
        q, k, v = (torch.randn(tokens, h, D, generator=gen).to(dtype).to(device).requires_grad_()
                   for h in (HQ, HKV, HKV))
        cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
        grad = torch.randn(tokens, HQ, D, generator=gen).to(dtype).to(device)
        bytes_moved = (2 * tokens * HQ * D + 2 * tokens * HKV * D) * q.element_size()
        for backward in (False, True):
            providers = {}
            if device == "cpu":
                providers["reference"] = (
                    lambda a=(q, k, v, cu, tokens): ref.cca_attention(*(x.detach() if torch.is_tensor(x) else x
                                                                          for x in a)))
            if not backward:
                providers["torch-sdpa"] = lambda a=(q, k, v): _sdpa_prefill(*(x.detach() for x in a))
                if zaya_ok:
                    providers["zaya-triton"] = lambda a=(q, k, v, cu, tokens): _zaya("cca_attention", *a)
            else:
                sdpa_out = _sdpa_prefill(q, k, v)
                providers["torch-sdpa"] = lambda o=sdpa_out, a=(q, k, v), g=grad: torch.autograd.grad(
                    o, a, g.transpose(0, 1)[None], retain_graph=True)
                if zaya_ok:
                    import zaya_kernels

                    with zaya_kernels.use_backend("triton"):
                        zaya_out, _ = torch.ops.zaya.cca_attention(q, k, v, cu, tokens)
                    providers["zaya-triton"] = lambda o=zaya_out, a=(q, k, v), g=grad: torch.autograd.grad(
                        o, a, g, retain_graph=True)
                providers.pop("reference", None)
            shape = {"tokens": tokens, "hq": HQ, "hkv": HKV, "d": D, "dtype": str(dtype), "pass": "fwd+bwd"
                     if backward else "fwd", "flop": int(prefill_flops(tokens, backward))}
            yield ("cca_attention_backward" if backward else "cca_attention"), shape, bytes_moved, providers


def _decode_cases(device, dtype, batches, contexts, zaya_ok, block_size=16, max_cache_bytes=16e9):
    for batch in batches:
        for context in contexts:
            kv_bytes = 2 * batch * context * HKV * D * torch.finfo(dtype).bits // 8
            if kv_bytes > max_cache_bytes:
                continue
            gen = torch.Generator().manual_seed(batch * 7919 + context)
            q = torch.randn(batch, HQ, D, generator=gen).to(dtype).to(device)
            k_cont = torch.randn(batch, context, HKV, D, generator=gen).to(dtype).to(device)
            v_cont = torch.randn(batch, context, HKV, D, generator=gen).to(dtype).to(device)
            blocks = batch * (context // block_size)
            perm = torch.randperm(blocks, generator=gen).to(device)
            table = perm.view(batch, context // block_size).to(torch.int32)
            # scatter the contiguous rows into the shuffled pool: block table[b, j] holds positions j*bs..(j+1)*bs-1
            k_paged = torch.empty(blocks, block_size, HKV, D, dtype=dtype, device=device)
            v_paged = torch.empty_like(k_paged)
            k_paged[table.long().flatten()] = k_cont.view(blocks, block_size, HKV, D)
            v_paged[table.long().flatten()] = v_cont.view(blocks, block_size, HKV, D)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            providers = {}
            if device == "cpu":
                providers["reference"] = lambda a=(q, k_paged, v_paged, seq_lens, table): ref.cca_attention_decode(*a)
            providers["torch-sdpa"] = lambda a=(q, k_cont, v_cont): F.scaled_dot_product_attention(
                a[0][:, :, None], a[1].transpose(1, 2), a[2].transpose(1, 2), enable_gqa=True)
            if zaya_ok:
                providers["zaya-triton"] = lambda a=(q, k_paged, v_paged, seq_lens, table): _zaya(
                    "cca_attention_decode", *a)
            shape = {"batch": batch, "context": context, "block_size": block_size, "dtype": str(dtype)}
            yield "cca_attention_decode", shape, kv_bytes, providers


def cases(device: str):
    """Yield (name, shape dict, bytes moved, {provider: callable})."""
    from zaya_kernels import backend

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    zaya_ok = backend.unavailable_reason("triton", device, ("triton",)) is None
    yield from _prefill_cases(device, dtype, (1024, 8192, 32768, 131072) if on_gpu else (16, 64), zaya_ok)
    yield from _decode_cases(device, dtype, (1, 8, 64, 256) if on_gpu else (1, 2),
                             (1024, 8192, 32768, 131072) if on_gpu else (32, 64), zaya_ok)


def main():
    """Prefill TFLOP/s and decode GB/s, with the fraction of peak, for every case."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run import peak_bandwidth

    from zaya_kernels.tools.timing import median_seconds as time_call

    import zaya_kernels  # noqa: F401  (registers the ops)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    peak_bw = peak_bandwidth(name)
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    print(f"device: {name}")
    for op, shape, bytes_moved, providers in cases(device):
        for provider, fn in providers.items():
            if interpreter and device == "cpu" and provider.startswith("zaya"):
                continue
            seconds = time_call(fn, device, 20 if device == "cuda" else 2)
            if op == "cca_attention_decode":
                rate = bytes_moved / seconds
                frac = f"{100 * rate / peak_bw:5.1f}% of peak HBM" if peak_bw else ""
                print(f"{op:<24} {shape} {provider:<12} {seconds * 1e6:10.1f} us {rate / 1e9:8.1f} GB/s {frac}")
            else:
                rate = shape["flop"] / seconds
                frac = f"{100 * rate / peak_flops:5.1f}% of peak bf16" if peak_flops else ""
                print(f"{op:<24} {shape} {provider:<12} {seconds * 1e6:10.1f} us {rate / 1e12:8.2f} TFLOP/s {frac}")


if __name__ == "__main__":
    main()
