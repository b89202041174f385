"""Benchmark cases for the ZAYA router: decode latency (T = 1, 8, 64) and prefill (8k, 64k tokens) at ZAYA1-8B shapes
(H 2048, R 256, 16 experts + skip) on GPU, tiny shapes on CPU.

Providers: the reference (op by op in torch), transformers' ZayaRouter (same weights; forward under no_grad), and
every zaya backend available; forward, and forward + backward (`zaya_router_train`: gradients to x and every weight
through w and r; transformers' module too, its parameters and inputs requiring gradients).
Bytes are the weights read once plus x and the outputs: decode is a weight-streaming problem. FLOPs ("flop": run.py
reports TFLOP/s) are the four GEMMs, 2 (H R + 2 R^2 + R (E + 1)) per token forward, 3x that forward + backward.

Decode cases (T <= 64) also time the launch-latency floor the same way (benchmarks/launch_floor.py: an empty Triton
kernel and a 1-element torch add); run.py reports each provider as a multiple of the floor ("vs_launch_floor"). The
target: the decode router in one launch at no more than 2x that floor on the same GPU.
"""
from __future__ import annotations

import torch

from launch_floor import floor_providers
from zaya_kernels.reference import router as ref

EPS = 1e-5


def _weights(hidden, router_hidden, experts, dtype, device, gen):
    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=gen) / cols**0.5).to(dtype).to(device)

    def vec(n, lo=-0.1, hi=0.1):
        return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)

    bias = torch.zeros(experts + 1, device=device)
    bias[-1] = -1.0
    return dict(down_w=mat(router_hidden, hidden), down_b=vec(router_hidden), norm_w=vec(router_hidden, 0.5, 1.5),
                fc1_w=mat(router_hidden, router_hidden), fc1_b=vec(router_hidden),
                fc2_w=mat(router_hidden, router_hidden), fc2_b=vec(router_hidden), out_w=mat(experts + 1, router_hidden),
                balance_bias=bias, gamma=vec(router_hidden, 0.5, 1.5))


def _transformers_router(w, hidden, router_hidden, experts, dtype, device):
    """transformers' ZayaRouter (an EDA layer) holding the same weights, or None without transformers."""
    try:
        from transformers import ZayaConfig
        from transformers.models.zaya.modeling_zaya import ZayaRouter
    except ImportError:
        return None
    cfg = ZayaConfig(hidden_size=hidden, router_hidden_size=router_hidden, num_experts=experts, num_hidden_layers=2)
    router = ZayaRouter(cfg, layer_idx=1).to(device=device, dtype=dtype)
    with torch.no_grad():
        router.down_proj.weight.copy_(w["down_w"]), router.down_proj.bias.copy_(w["down_b"])
        router.router_states_scale.copy_(w["gamma"])
        mlp = router.router_mlp
        mlp.norm.weight.copy_(w["norm_w"]), mlp.fc1.weight.copy_(w["fc1_w"]), mlp.fc1.bias.copy_(w["fc1_b"])
        mlp.fc2.weight.copy_(w["fc2_w"]), mlp.fc2.bias.copy_(w["fc2_b"]), mlp.out_proj.weight.copy_(w["out_w"])
        router.balancing_biases.copy_(w["balance_bias"])
    return router


def cases(device: str):
    import zaya_kernels
    from zaya_kernels import backend

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hidden, router_hidden, experts = (2048, 256, 16) if on_gpu else (128, 32, 4)
    token_counts = (1, 8, 64, 8192, 65536) if on_gpu else (1, 8, 64)
    gen = torch.Generator().manual_seed(0)
    w = _weights(hidden, router_hidden, experts, dtype, device, gen)
    zaya_backends = [b for b in ("triton", "hip") if backend.unavailable_reason(b, device, ("hip", "triton")) is None]
    weight_bytes = sum(t.numel() * t.element_size() for t in w.values())
    hf_router = _transformers_router(w, hidden, router_hidden, experts, dtype, device)
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
        r_prev = torch.randn(tokens, router_hidden, generator=gen).to(dtype).to(device)
        args = (x, r_prev, w["gamma"], w["down_w"], w["down_b"], w["norm_w"], w["fc1_w"], w["fc1_b"], w["fc2_w"],
                w["fc2_b"], w["out_w"], w["balance_bias"], EPS)
        providers = {"reference": lambda a=args: ref.zaya_router(*a)}
        if hf_router is not None:
            def hf_forward(x=x, r=r_prev):
                with torch.no_grad():
                    return hf_router(x[None], r[None])
            providers["transformers"] = hf_forward
        for name in zaya_backends:
            if name == "hip" and tokens > 64:
                continue  # the HIP kernel is the decode path
            def run(a=args, name=name):
                with zaya_kernels.use_backend(name):
                    return torch.ops.zaya.zaya_router(*a)
            providers[f"zaya-{name}"] = run
        decode = tokens <= 64
        if decode:
            providers.update(floor_providers(device))
        io_bytes = tokens * (hidden + 2 * router_hidden) * x.element_size() + tokens * 8
        flop = 2 * tokens * (hidden * router_hidden + 2 * router_hidden**2 + router_hidden * (experts + 1))
        shape = {"tokens": tokens, "hidden": hidden, "router_hidden": router_hidden, "experts": experts}
        yield "zaya_router", {**shape, "flop": flop}, weight_bytes + io_bytes, providers

        # training step: forward + backward through the routing weight and the EDA state
        train_args = tuple(a.detach().requires_grad_(a.is_floating_point() and a is not w["balance_bias"])
                           if isinstance(a, torch.Tensor) else a for a in args)

        def train(backend, a=train_args):
            with zaya_kernels.use_backend(backend):
                _, weight, r, _ = torch.ops.zaya.zaya_router(*a)
            (weight.sum() + r.float().sum()).backward()

        train_providers = {"reference": lambda: train("reference")}
        if hf_router is not None:
            hf_inputs = (x.detach()[None].requires_grad_(), r_prev.detach()[None].requires_grad_())

            def hf_train(a=hf_inputs):  # the same loss: the routing weight of the chosen class and the next EDA state
                _, probs, _, r_next = hf_router(*a)
                (probs.float().sum() + r_next.float().sum()).backward()
            train_providers["transformers"] = hf_train
        for name in zaya_backends:
            if name == "triton":
                train_providers["zaya-triton"] = lambda: train("triton")
        yield "zaya_router_train", {**shape, "flop": 3 * flop}, 2 * weight_bytes + 2 * io_bytes, train_providers
