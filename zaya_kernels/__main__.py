"""Command line: `python -m zaya_kernels {info,demo,aot-report,tune}` (benchmarks: `python benchmarks/run.py`)."""
from __future__ import annotations

import argparse
import os
import sys


def _info(_args) -> int:
    import torch

    import zaya_kernels
    from zaya_kernels import backend
    from zaya_kernels.ops._registry import backend_table

    ok, why = backend.triton_available()
    if ok:
        import triton

        triton_line = f"{triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)" if backend.triton_interpreter() else "")
    else:
        triton_line = f"unavailable: {why}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    runtime = f"ROCm {torch.version.hip}" if torch.version.hip else (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU")
    print(f"zaya_kernels {zaya_kernels.__version__}")
    print(f"torch        {torch.__version__} ({runtime})")
    print(f"triton       {triton_line}")
    print(f"GPU          {gpu}")
    print(f"extension    GPU kernels: {backend.hip_build()}")
    print(f"backend      requested: {backend.requested_backend()} (ZAYA_KERNELS_BACKEND)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = backend_table(device)
    width = max(len(r[0]) for r in rows)
    print(f"\nops on {device} tensors:")
    print(f"  {'op'.ljust(width)}  {'backends'.ljust(24)}  runs now")
    for name, impls, chosen in rows:
        print(f"  {name.ljust(width)}  {impls.ljust(24)}  {chosen}")
    return 0


def _aot_report(rest) -> int:
    from zaya_kernels.tools.aot_report import main

    return main(rest)


def _tune(rest) -> int:
    from zaya_kernels.tools.tune import main

    return main(rest)


def _demo(args) -> int:
    import torch

    if not torch.cuda.is_available():  # on CPU the Triton kernels run in the interpreter (set before they load)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from zaya_kernels.demo import run_demo

    return run_demo(tokens=args.tokens, layers=args.layers, repeats=args.repeats, model_path=args.model,
                    new_tokens=args.new_tokens, batch=args.batch)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _checkpoint_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory (a ZAYA checkpoint directory with config.json)")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} has no config.json (expected a ZAYA checkpoint directory)")
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "aot-report":  # its own argparse, so `aot-report --help` shows its options
        return _aot_report(argv[1:])
    if argv and argv[0] == "tune":  # its own argparse too (`tune moe --help`)
        return _tune(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m zaya_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and the backend each op would use")
    demo = sub.add_parser("demo", help="run the ops and a kernelized ZAYA model on ZAYA1-8B shapes (GPU) or a tiny "
                                       "configuration (CPU), checked against the reference and transformers")
    demo.add_argument("--model", type=_checkpoint_dir, default=None,
                      help="a ZAYA checkpoint directory, transformers' or Zyphra's legacy layout (default: random weights)")
    demo.add_argument("--tokens", type=_positive_int, default=None, dest="new_tokens",
                      help="tokens to generate (default 32 on GPU, 8 on CPU)")
    demo.add_argument("--batch", type=_positive_int, default=1, help="sequences generated together (default 1)")
    demo.add_argument("--op-tokens", type=_positive_int, default=None, dest="tokens",
                      help="tokens in the op check (default 4096 on GPU, 64 on CPU)")
    demo.add_argument("--layers", type=_positive_int, default=None, help="layers in the op check (default 40 on GPU, 3 on CPU)")
    demo.add_argument("--repeats", type=_positive_int, default=None, help="timed repeats in the op check (default 20 GPU, 2 CPU)")
    sub.add_parser("aot-report", help="compile every Triton kernel config for gfx942/gfx950/sm_90 (see --help)")
    sub.add_parser("tune", help="time Triton launch configs on this GPU and write the fastest valid ones into "
                                "configs/{moe,attention}.json (see tune --help)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
