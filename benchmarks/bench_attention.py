"""Benchmark cases for CCA attention: ZAYA1-8B shapes (Hq 8, Hkv 2, D 128, bf16) on GPU, tiny shapes on CPU.

Decode first (one query token per sequence, paged cache with 16-token blocks in a shuffled pool, built on the device):
zaya's split-K kernel against SDPA over a contiguous cache with enable_gqa; bytes are the K and V cache rows read.
Caches up to ~35% of the device memory per copy (the paged pool and the contiguous cache both live): on a 141 GB H200
every batch x context of the grid fits (the largest, batch 256 x 128k context, is 34 GB per copy).
Prefill (one causal sequence of T tokens, forward and forward+backward, both timed whole: the backward cases run the
forward and the backward inside every timed call): zaya's Triton kernels against torch's scaled_dot_product_attention
with the KV heads expanded to Hq, and the reference on CPU. FLOPs count the causal half: forward 4 * T^2 / 2 * Hq * D,
forward + backward 3.5x that (the "flop" key of the shape dict: run.py reports TFLOP/s and the fraction of peak).

SDPA runs under torch.nn.attention.sdpa_kernel with the flash backend, else the memory-efficient one, else torch's
own choice; the shape dict's "sdpa_backend" says which one ran (probed once per case).

    python benchmarks/bench_attention.py      # = python benchmarks/run.py --only attention
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F

from zaya_kernels.reference import attention as ref

HQ, HKV, D = 8, 2, 128


def _zaya(op_name, *args):
    import zaya_kernels

    with zaya_kernels.use_backend("triton"):
        return getattr(torch.ops.zaya, op_name)(*args)


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return [("default", contextlib.nullcontext)]
    return [("flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
            ("efficient", lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
            ("default", contextlib.nullcontext)]


def _pick_sdpa(fn, *args):
    """(name, context factory) of the first backend, flash then efficient then torch's choice, that runs fn(*args)."""
    for name, context in _sdpa_backends():
        try:
            with context():
                fn(*args)
            return name, context
        except RuntimeError:
            continue
    return "default", contextlib.nullcontext


def _sdpa_prefill(q, k, v):
    """torch SDPA on [1, H, T, D] with the KV heads expanded (repeat_interleave: kv head h // g)."""
    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)[None]
    kt = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    vt = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


def _sdpa_decode(q, k_cont, v_cont):
    """q [B, Hq, D], caches [B, S, Hkv, D] (flash's layout, seen as [B, Hkv, S, D])."""
    return F.scaled_dot_product_attention(q[:, :, None], k_cont.transpose(1, 2), v_cont.transpose(1, 2),
                                          enable_gqa=True)


def prefill_flops(tokens: int, backward: bool) -> float:
    forward = 4.0 * tokens * tokens / 2 * HQ * D
    return forward * (3.5 if backward else 1.0)


def _prefill_cases(device, dtype, token_counts, zaya_ok):
    for tokens in token_counts:
        gen = torch.Generator(device=device).manual_seed(tokens)
        q, k, v = (torch.randn(tokens, h, D, generator=gen, device=device, dtype=dtype).requires_grad_()
                   for h in (HQ, HKV, HKV))
        cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
        grad = torch.randn(tokens, HQ, D, generator=gen, device=device, dtype=dtype)
        grad_sdpa = grad.transpose(0, 1)[None]
        bytes_moved = (2 * tokens * HQ * D + 2 * tokens * HKV * D) * q.element_size()
        sdpa_name, sdpa_context = _pick_sdpa(lambda: _sdpa_prefill(q.detach(), k.detach(), v.detach()))
        for backward in (False, True):
            providers = {}
            if not backward:
                if device == "cpu":
                    providers["reference"] = lambda a=(q, k, v, cu, tokens): ref.cca_attention(
                        *(x.detach() if torch.is_tensor(x) else x for x in a))

                def sdpa_fwd(a=(q, k, v)):
                    with sdpa_context(), torch.no_grad():
                        return _sdpa_prefill(*a)
                providers["torch-sdpa"] = sdpa_fwd
                if zaya_ok:
                    def zaya_fwd(a=(q, k, v, cu, tokens)):
                        with torch.no_grad():
                            return _zaya("cca_attention", *a)
                    providers["zaya-triton"] = zaya_fwd
            else:
                def sdpa_fwd_bwd(a=(q, k, v), g=grad_sdpa):  # forward and backward, both in the timed call
                    with sdpa_context():
                        out = _sdpa_prefill(*a)
                    return torch.autograd.grad(out, a, g)
                providers["torch-sdpa"] = sdpa_fwd_bwd
                if zaya_ok:
                    def zaya_fwd_bwd(a=(q, k, v), g=grad, c=cu, t=tokens):
                        out, _ = _zaya("cca_attention", *a, c, t)
                        return torch.autograd.grad(out, a, g)
                    providers["zaya-triton"] = zaya_fwd_bwd
            shape = {"tokens": tokens, "hq": HQ, "hkv": HKV, "d": D, "dtype": str(dtype).replace("torch.", ""),
                     "pass": "fwd+bwd" if backward else "fwd", "sdpa_backend": sdpa_name,
                     "flop": int(prefill_flops(tokens, backward))}
            yield ("cca_attention_backward" if backward else "cca_attention"), shape, bytes_moved, providers
            del providers
        del q, k, v, grad, grad_sdpa


def _decode_cases(device, dtype, batches, contexts, zaya_ok, block_size=16, max_cache_bytes=None):
    if max_cache_bytes is None:  # one copy of K + V; two copies live (paged pool + contiguous)
        max_cache_bytes = 0.35 * torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 1e9
    for batch in batches:
        for context in contexts:
            kv_bytes = 2 * batch * context * HKV * D * torch.finfo(dtype).bits // 8
            if kv_bytes > max_cache_bytes:
                print(f"bench_attention: skipping decode batch {batch} context {context}: {kv_bytes / 1e9:.1f} GB of "
                      f"cache > {max_cache_bytes / 1e9:.1f} GB")
                continue
            gen = torch.Generator(device=device).manual_seed(batch * 7919 + context)
            q = torch.randn(batch, HQ, D, generator=gen, device=device, dtype=dtype)
            blocks = batch * (context // block_size)
            # the paged pool on the device; block table[b, j] holds positions j*bs..(j+1)*bs-1 of sequence b
            k_paged = torch.randn(blocks, block_size, HKV, D, generator=gen, device=device, dtype=dtype)
            v_paged = torch.randn(blocks, block_size, HKV, D, generator=gen, device=device, dtype=dtype)
            table = torch.randperm(blocks, generator=gen, device=device).view(batch, context // block_size)
            # the same rows, contiguous per sequence, for SDPA: [B, S, Hkv, D] (one gather each)
            k_cont = k_paged[table].view(batch, context, HKV, D)
            v_cont = v_paged[table].view(batch, context, HKV, D)
            table = table.to(torch.int32)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            sdpa_name, sdpa_context = _pick_sdpa(_sdpa_decode, q, k_cont, v_cont)
            providers = {}
            if device == "cpu":
                providers["reference"] = lambda a=(q, k_paged, v_paged, seq_lens, table): ref.cca_attention_decode(*a)

            def sdpa(a=(q, k_cont, v_cont)):
                with sdpa_context():
                    return _sdpa_decode(*a)
            providers["torch-sdpa"] = sdpa
            if zaya_ok:
                providers["zaya-triton"] = lambda a=(q, k_paged, v_paged, seq_lens, table): _zaya(
                    "cca_attention_decode", *a)
            shape = {"batch": batch, "context": context, "block_size": block_size,
                     "dtype": str(dtype).replace("torch.", ""), "sdpa_backend": sdpa_name}
            yield "cca_attention_decode", shape, kv_bytes, providers
            del providers, sdpa, q, k_paged, v_paged, k_cont, v_cont, table, seq_lens  # before the next cache


def cases(device: str):
    """Yield (name, shape dict, bytes moved, {provider: callable}); decode first (the cheaper, time-boxed half)."""
    from zaya_kernels import backend

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    zaya_ok = backend.unavailable_reason("triton", device, ("triton",)) is None
    yield from _decode_cases(device, dtype, (1, 8, 64, 256) if on_gpu else (1, 2),
                             (1024, 8192, 32768, 131072) if on_gpu else (32, 64), zaya_ok)
    yield from _prefill_cases(device, dtype, (1024, 8192, 32768, 131072) if on_gpu else (16, 64), zaya_ok)


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import run

    return run.main(["--only", "attention", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
