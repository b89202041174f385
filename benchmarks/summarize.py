"""Print the targets' numbers from the JSON files benchmarks/run.py wrote under a folder (device_check.sh runs it last):
model tokens/s and decode time shares, the router's decode time over the launch floor, the MoE dispatch time, and
the best TFLOP/s (fraction of peak) of every FLOP-counted case.

    python benchmarks/summarize.py device_out/results
"""
from __future__ import annotations

import glob
import json
import os
import sys


def _shape(rec):
    return ",".join(f"{k}={v}" for k, v in rec["shape"].items() if k not in ("flop", "gflop", "tokens_per_call"))


def main(argv=None):
    root = (argv or sys.argv[1:] or ["benchmarks/results"])[0]
    records = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True)):
        with open(path) as f:
            data = json.load(f)
        records += [r for r in data.get("records", []) if "seconds" in r]
    if not records:
        print(f"no benchmark records under {root}")
        return 0
    print("== tokens/s (model)")
    for r in records:
        if "tokens_per_s" in r:
            shares = r.get("decode_time_shares")
            share_text = ("  shares " + " ".join(f"{k}={100 * v:.0f}%" for k, v in shares.items())) if shares else ""
            print(f"{r['op']:<20} {_shape(r):<28} {r['provider']:<20} {r['tokens_per_s']:12.1f} tok/s{share_text}")
    print("== decode router vs launch floor (target <= 2x)")
    for r in records:
        if r["op"] == "zaya_router" and "vs_launch_floor" in r and r["provider"].startswith("zaya"):
            ratios = " ".join(f"{f}={x:.2f}x" for f, x in r["vs_launch_floor"].items())
            print(f"{_shape(r):<50} {r['provider']:<12} {r['seconds'] * 1e6:8.1f} us  {ratios}")
    print("== moe_dispatch (target < 10 us)")
    for r in records:
        if r["op"] == "moe_dispatch" and r["provider"].startswith("zaya"):
            print(f"{_shape(r):<50} {r['provider']:<12} {r['seconds'] * 1e6:8.1f} us")
    print("== TFLOP/s (fraction of peak bf16)")
    for r in records:
        if "tflop_per_s" in r and r["provider"] != "reference":
            frac = r.get("fraction_of_peak_flops")
            print(f"{r['op']:<24} {_shape(r):<60} {r['provider']:<20} {r['tflop_per_s']:8.1f}"
                  + (f" ({100 * frac:.1f}%)" if frac is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
