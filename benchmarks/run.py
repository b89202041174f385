"""Benchmark runner: times every op family's cases on the available device, prints a table and writes JSON + a PNG
plot to benchmarks/results/.

Per provider: time, GB/s and the fraction of peak HBM bandwidth; TFLOP/s and the fraction of peak dense bf16 FLOP/s
where the case's shape dict gives "flop" (or "gflop"); tokens/s where it gives "tokens_per_call"; the speedup against
every baseline of the case (each provider that is not ours: "reference", transformers' modules, torch's ops; the
"vs base" column is the provider named "reference", else the case's first provider, e.g. unmodified transformers in
bench_model); and, for cases that carry launch-floor providers (named "floor:...", benchmarks/launch_floor.py), the
time as a multiple of each floor.

    python benchmarks/run.py [--only residual_rmsnorm] [--out benchmarks/results] [--repeats N]
    python benchmarks/run.py --plot RESULTS.json ...   # redraw the PNGs from JSON (e.g. fetched from a GPU machine)

A bench_*.py module yields (op, shape dict, bytes moved, {provider: callable}). A provider callable may carry a
`probe` attribute, a callable returning a dict: run once after the provider is timed, its dict merged into the
provider's record (e.g. bench_model's per-op-family decode time shares; `with_probe` sets it). A provider that raises
is recorded with its error and the run goes on. The JSON is rewritten after every case (a run cut short by a time limit, or by SIGINT, keeps what it
measured).

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
import traceback

import torch

from zaya_kernels.tools.timing import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = sorted(f[len("bench_"):-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))
# peaks by a substring of the device name (shared/PEERS.md): HBM bytes/s and dense bf16 FLOP/s (no sparsity)
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "MI300X": 5.3e12, "MI355X": 8.0e12, "MI325X": 6.0e12}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "MI300X": 1307e12, "MI355X": 2500e12, "MI325X": 1307e12}
FLOOR_PREFIX = "floor:"  # launch-floor providers: not baselines; every other provider is reported as a multiple
SHAPE_HIDDEN = ("flop", "gflop", "tokens_per_call")  # shape keys left out of the printed shape text


def _lookup(table, device_name: str):
    for key, value in table.items():
        if key in device_name:
            return value
    return None


def peak_bandwidth(device_name: str):
    return _lookup(PEAK_BANDWIDTH, device_name)


def peak_flops(device_name: str):
    return _lookup(PEAK_BF16_FLOPS, device_name)


def case_flop(shape: dict):
    if "flop" in shape:
        return float(shape["flop"])
    if "gflop" in shape:
        return float(shape["gflop"]) * 1e9
    return None


def is_baseline(provider: str) -> bool:
    return not provider.startswith(("zaya", FLOOR_PREFIX))


def _fmt_ratio(x):
    return f"{x:.2f}x" if x else "-"


def run(families, out_dir, repeats):
    import zaya_kernels  # noqa: F401  (registers the ops)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak = peak_bandwidth(device_name)
    peak_f = peak_flops(device_name)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    records = []
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device_name,
            "torch": torch.__version__, "triton": triton_version, "peak_bandwidth_bytes_per_s": peak,
            "peak_bf16_flop_per_s": peak_f, "families": list(families), "complete": False}
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{meta['date'][:10]}-{device_name.replace(' ', '_').replace('/', '_')}"
    json_path = os.path.join(out_dir, f"{stem}.json")

    def write_json():
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)

    print(f"device: {device_name}  torch {torch.__version__}  triton {triton_version}  peak HBM "
          f"{'%.1f TB/s' % (peak / 1e12) if peak else 'unknown'}  peak bf16 "
          f"{'%.0f TFLOP/s' % (peak_f / 1e12) if peak_f else 'unknown'}")
    header = (f"{'op':<30} {'shape':<38} {'provider':<24} {'us':>10} {'GB/s':>8} {'%BW':>5} {'TFLOP/s':>8} {'%FLOP':>5} "
              f"{'vs base':>7}  others")
    print(header)
    print("-" * len(header))
    try:
        for family in families:
            module = importlib.import_module(f"bench_{family}")
            family_repeats = min(repeats, getattr(module, "REPEATS", repeats))  # whole-model cases: fewer calls
            for op, shape, bytes_moved, providers in module.cases(device):
                case_records = _run_case(op, shape, bytes_moved, providers, device, interpreter, family_repeats, peak,
                                         peak_f)
                records.extend(case_records)
                _print_case(case_records)
                write_json()
                del providers  # the next case's tensors must not meet these (a decode cache is big)
                if device == "cuda" and torch.cuda.memory_reserved() > 16 * 2**30:
                    torch.cuda.empty_cache()
        meta["complete"] = True
    except KeyboardInterrupt:  # device_check's per-step timeout sends SIGINT: keep what was measured
        print("\ninterrupted: writing what was measured")
    write_json()
    png_path = _plot(records, meta, os.path.join(out_dir, f"{stem}.png"))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else " (no matplotlib: no plot)"))
    return records


def with_probe(fn, probe):
    """fn, carrying `probe` (a callable returning a dict of extra metrics for fn's record)."""
    fn.probe = probe
    return fn


def _run_case(op, shape, bytes_moved, providers, device, interpreter, repeats, peak, peak_f):
    flop = case_flop(shape)
    tokens = shape.get("tokens_per_call")
    timed = {}
    case_records = []
    for provider, fn in providers.items():
        if interpreter and device == "cpu" and provider.startswith("zaya"):
            continue  # interpreter timings say nothing about kernels
        rec = {"op": op, "shape": shape, "provider": provider}
        try:
            seconds = median_seconds(fn, device, repeats)
        except Exception as exc:  # noqa: BLE001  (one broken provider must not cost the family's other numbers)
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"  {op} {provider}: FAILED {rec['error']}")
            traceback.print_exc(limit=3)
            case_records.append(rec)
            continue
        timed[provider] = seconds
        if provider.startswith(FLOOR_PREFIX):  # a launch floor: its time only
            rec["seconds"] = seconds
            case_records.append(rec)
            continue
        rec.update({"seconds": seconds, "bytes": bytes_moved, "gb_per_s": bytes_moved / seconds / 1e9,
                    "fraction_of_peak_bandwidth": (bytes_moved / seconds / peak) if peak else None})
        if flop is not None:
            rec.update({"flop": flop, "tflop_per_s": flop / seconds / 1e12,
                        "fraction_of_peak_flops": (flop / seconds / peak_f) if peak_f else None})
        if tokens:
            rec["tokens_per_s"] = tokens / seconds
        probe = getattr(fn, "probe", None)
        if probe is not None:
            try:
                rec.update(probe())
            except Exception as exc:  # noqa: BLE001
                rec["probe_error"] = f"{type(exc).__name__}: {exc}"[:500]
        case_records.append(rec)
    baselines = [p for p in timed if is_baseline(p)]
    primary = "reference" if "reference" in baselines else (baselines[0] if baselines else None)
    floors = [p for p in timed if p.startswith(FLOOR_PREFIX)]
    for rec in case_records:
        seconds = rec.get("seconds")
        if seconds is None:
            continue
        if rec["provider"].startswith(FLOOR_PREFIX):
            continue
        rec["baseline"] = primary
        rec["speedup_vs_reference"] = (timed[primary] / seconds) if primary else None  # vs the primary baseline
        rec["speedups"] = {b: timed[b] / seconds for b in baselines if b != rec["provider"]}
        if floors and not rec["provider"].startswith(FLOOR_PREFIX):
            rec["vs_launch_floor"] = {f: seconds / timed[f] for f in floors}
    return case_records


def _print_case(case_records):
    for rec in case_records:
        if "seconds" not in rec:
            continue
        if rec["provider"].startswith(FLOOR_PREFIX):
            print(f"{rec['op']:<30} {'':<38} {rec['provider']:<24} {rec['seconds'] * 1e6:10.1f}  (launch floor)")
            continue
        shape_text = ",".join(f"{k}={v}" for k, v in rec["shape"].items() if k not in SHAPE_HIDDEN)
        bw = rec["fraction_of_peak_bandwidth"]
        bw_text = f"{100 * bw:5.1f}" if bw is not None else "    -"
        tf = f"{rec['tflop_per_s']:8.2f}" if "tflop_per_s" in rec else "       -"
        ff = rec.get("fraction_of_peak_flops")
        ff_text = f"{100 * ff:5.1f}" if ff is not None else "    -"
        others = [f"vs {b} {_fmt_ratio(x)}" for b, x in rec["speedups"].items() if b != rec["baseline"]]
        if "vs_launch_floor" in rec:
            others += [f"{r:.2f}x {f}" for f, r in rec["vs_launch_floor"].items()]
        if "tokens_per_s" in rec:
            others.append(f"{rec['tokens_per_s']:.1f} tok/s")
        if "decode_time_shares" in rec:
            others.append("shares " + " ".join(f"{k}={100 * v:.0f}%" for k, v in rec["decode_time_shares"].items()))
        print(f"{rec['op']:<30} {shape_text:<38} {rec['provider']:<24} {rec['seconds'] * 1e6:10.1f} "
              f"{rec['gb_per_s']:8.1f} {bw_text} {tf} {ff_text} {_fmt_ratio(rec['speedup_vs_reference']):>7}  "
              f"{'; '.join(others)}")


def _plot(records, meta, path):
    """Bar charts of GB/s (with the peak HBM line) and of tokens/s (whole-model cases), one bar per provider and
    case; None without matplotlib or without such records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # whole-model cases by tokens/s, every other case by GB/s
    panels = [("gb_per_s", "GB/s", [r for r in records if r.get("gb_per_s") and not r.get("tokens_per_s")]),
              ("tokens_per_s", "tokens/s", [r for r in records if r.get("tokens_per_s")])]
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        return None
    widest = max(len({(r["op"], json.dumps(r["shape"], sort_keys=True)) for r in rows}) for _, _, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.2 * widest), 4.5 * len(panels)), squeeze=False)
    colours = {p: f"C{i % 10}" for i, p in enumerate(sorted({r["provider"] for _, _, rows in panels for r in rows}))}
    for ax, (metric, label, rows) in zip(axes[:, 0], panels):
        groups = sorted({(r["op"], json.dumps(r["shape"], sort_keys=True)) for r in rows})
        providers = sorted({r["provider"] for r in rows})
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            values = []
            for op, shape in groups:
                match = [r[metric] for r in rows if r["provider"] == provider and r["op"] == op
                         and json.dumps(r["shape"], sort_keys=True) == shape]
                values.append(match[0] if match else 0.0)
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=provider,
                   color=colours[provider])
        if metric == "gb_per_s" and meta["peak_bandwidth_bytes_per_s"]:
            ax.axhline(meta["peak_bandwidth_bytes_per_s"] / 1e9, color="k", linestyle="--", linewidth=0.8,
                       label="peak HBM")
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{op}\n" + ",".join(f"{v}" for k, v in json.loads(shape).items() if k not in SHAPE_HIDDEN)
                            for op, shape in groups], fontsize=7, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(f"zaya_kernels on {meta['device']} ({meta['date'][:10]}, torch {meta['torch']}, "
                         f"triton {meta['triton']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=FAMILIES, help="op families to run (default all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--plot", nargs="+", metavar="JSON",
                        help="only draw the PNG of each JSON an earlier run wrote (next to it): for results fetched "
                             "from a GPU machine whose Python has no matplotlib")
    args = parser.parse_args(argv)
    if args.plot:
        for json_path in args.plot:
            with open(json_path) as f:
                data = json.load(f)
            png_path = _plot(data["records"], data["meta"], os.path.splitext(json_path)[0] + ".png")
            print(f"{json_path}: " + (f"wrote {png_path}" if png_path else "nothing to plot (no GB/s records, or no "
                                                                           "matplotlib)"))
        return 0
    sys.path.insert(0, HERE)
    repeats = args.repeats or (50 if torch.cuda.is_available() else 3)
    run(args.only or FAMILIES, args.out, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
