"""Benchmark runner: times every op family's cases on the available device, prints a table (time, GB/s, fraction of
peak HBM bandwidth, speedup against the reference: the provider named "reference", else a case's first provider,
e.g. unmodified transformers in bench_model) and writes JSON + a PNG plot to benchmarks/results/.

    python benchmarks/run.py [--only residual_rmsnorm] [--out benchmarks/results] [--repeats N]

On a CPU machine it runs small shapes (the Triton interpreter, when TRITON_INTERPRET=1, is far too slow to time:
interpreter providers are skipped there) so that the runner itself cannot rot.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys

import torch

from zaya_kernels.tools.timing import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = sorted(f[len("bench_"):-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))
# peak HBM bandwidth in bytes/s, by a substring of the device name (shared/PEERS.md)
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "MI300X": 5.3e12, "MI355X": 8.0e12, "MI325X": 6.0e12}


def peak_bandwidth(device_name: str):
    for key, value in PEAK_BANDWIDTH.items():
        if key in device_name:
            return value
    return None


def run(families, out_dir, repeats):
    import zaya_kernels  # noqa: F401  (registers the ops)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak = peak_bandwidth(device_name)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    records = []
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device_name,
            "torch": torch.__version__, "triton": triton_version, "peak_bandwidth_bytes_per_s": peak}
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{meta['date'][:10]}-{device_name.replace(' ', '_').replace('/', '_')}"
    json_path = os.path.join(out_dir, f"{stem}.json")

    def write_json():
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)

    print(f"device: {device_name}  torch {torch.__version__}  triton {triton_version}  peak HBM "
          f"{'%.1f TB/s' % (peak / 1e12) if peak else 'unknown'}")
    header = f"{'op':<32} {'shape':<40} {'provider':<14} {'us':>10} {'GB/s':>9} {'%peak':>6} {'vs ref':>7}"
    print(header)
    print("-" * len(header))
    for family in families:
        module = importlib.import_module(f"bench_{family}")
        family_repeats = min(repeats, getattr(module, "REPEATS", repeats))  # whole-model cases time fewer calls
        for op, shape, bytes_moved, providers in module.cases(device):
            ref_seconds = None
            baseline = "reference" if "reference" in providers else next(iter(providers))
            for provider, fn in providers.items():
                if interpreter and provider == "zaya-triton" and device == "cpu":
                    continue  # interpreter timings say nothing about kernels
                seconds = median_seconds(fn, device, family_repeats)
                ref_seconds = seconds if provider == baseline else ref_seconds
                gbps = bytes_moved / seconds / 1e9
                rec = {"op": op, "shape": shape, "provider": provider, "seconds": seconds, "gb_per_s": gbps,
                       "fraction_of_peak_bandwidth": (bytes_moved / seconds / peak) if peak else None,
                       "speedup_vs_reference": (ref_seconds / seconds) if ref_seconds else None}
                records.append(rec)
                frac = f"{100 * rec['fraction_of_peak_bandwidth']:5.1f}%" if peak else "    - "
                speed = f"{rec['speedup_vs_reference']:6.2f}x" if rec["speedup_vs_reference"] else "     - "
                shape_text = ",".join(f"{k}={v}" for k, v in shape.items())
                print(f"{op:<32} {shape_text:<40} {provider:<14} {seconds * 1e6:10.1f} {gbps:9.1f} {frac} {speed}")
        write_json()  # after every family: a run cut short by a time limit keeps what it measured
    png_path = _plot(records, meta, os.path.join(out_dir, f"{stem}.png"))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else " (no matplotlib: no plot)"))
    return records


def _plot(records, meta, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(r["op"], json.dumps(r["shape"], sort_keys=True)) for r in records})
    providers = sorted({r["provider"] for r in records})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        values = []
        for op, shape in groups:
            match = [r["gb_per_s"] for r in records if r["provider"] == provider and r["op"] == op
                     and json.dumps(r["shape"], sort_keys=True) == shape]
            values.append(match[0] if match else 0.0)
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=provider)
    if meta["peak_bandwidth_bytes_per_s"]:
        ax.axhline(meta["peak_bandwidth_bytes_per_s"] / 1e9, color="k", linestyle="--", linewidth=0.8, label="peak HBM")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{op}\n" + ",".join(f"{v}" for v in json.loads(shape).values()) for op, shape in groups],
                       fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title(f"zaya_kernels on {meta['device']} ({meta['date'][:10]}, torch {meta['torch']}, triton {meta['triton']})",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=FAMILIES, help="op families to run (default all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    repeats = args.repeats or (50 if torch.cuda.is_available() else 3)
    run(args.only or FAMILIES, args.out, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
