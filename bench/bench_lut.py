"""Latency-LUT benchmark: build time and prediction quality for each backend.

For the default model (ResNet-20, 1x28x28, batch 1, one thread) and each backend
(PyTorch eager, ONNX Runtime), builds the LUT that ships in `latency_luts/`, then
validates it on random policies (keep ratios in [0.2, 1], a seed the build did not
calibrate on): median absolute percentage error and Spearman rank correlation between
predicted and measured whole-network latency. Writes BENCHMARKS.md between the
`bench_lut` markers. Run it on a quiet machine.

    python bench/bench_lut.py [--samples 30] [--backends torch,onnxruntime,openvino] [--keep] [--low-range 0.2,0.5]

It then times two networks under every runtime, one runtime after another: the unpruned
network and the uniformly pruned one at 50 % of the first backend's LUT latency, to say
which runtime is fastest here. It validates twice: over keep ratios in [0.2, 1] and over `--low-range`, the small
networks where tight latency budgets land, and reports both the error in milliseconds and
the error of the latency *ratio* to the unpruned network (timed in turn with it), which
is what a relative budget bounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from autoprune.latency import (build_lut, default_lut_path, device_slug, get_backend, load_lut, this_device,
                               validate_lut)
from autoprune.models import load_model
from autoprune.pruning import describe_network

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import read_rows, write_section  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--backends", default="torch,onnxruntime,openvino")
    parser.add_argument("--keep", action="store_true", help="validate existing LUTs instead of rebuilding them")
    parser.add_argument("--low-range", default="0.2,0.5", help="LO,HI keep ratios of the second validation")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--rows", default=str(ROOT / "bench" / "results" / "lut_rows.jsonl"),
                        help="measured rows of every device, one JSON object per line (this run's replace its "
                             "device's)")
    args = parser.parse_args()
    device = this_device()

    model, _ = load_model(None)
    description = describe_network(model, (1, 28, 28))
    rows = []
    for name in args.backends.split(","):
        backend = get_backend(name, 1)
        out = ROOT / default_lut_path(backend, 1, "resnet20-fashion-mnist")
        started = time.perf_counter()
        if args.keep and out.is_file():
            table = load_lut(out)
        else:
            out.unlink(missing_ok=True)
            table = build_lut(model, description, backend, out, model_name="resnet20 (default checkpoint)")
        build_s = time.perf_counter() - started
        result = validate_lut(table, model, description, samples=args.samples, seed=1)
        low_range = tuple(float(v) for v in args.low_range.split(","))
        low = validate_lut(table, model, description, samples=args.samples, seed=1, keep_range=low_range)
        result_path = ROOT / "bench" / "results" / f"lut-validate-{device_slug()}-{name}.json"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps({**result, "low_range": low}, indent=2) + "\n")
        entries = sum(len(e["in"]) * len(e["out"]) for e in table.data["entries"].values())
        rows.append({"device": device, "date": datetime.date.today().isoformat(), "samples": args.samples,
                     "backend": name, "version": table.runtime["backend_version"],
                     "options": table.runtime.get("graph_optimization", ""), "entries": entries,
                     "build_s": table.data.get("build_seconds", build_s),
                     "base_ms": table.calibration["points"][0]["measured_ms"],
                     "mape": result["median_abs_error_pct"], "max": result["max_abs_error_pct"],
                     "spearman": result["spearman"], "ratio_mape": result["median_abs_ratio_error_pct"],
                     "low_range": list(low_range), "low_flops": low["flops_ratio_range"],
                     "low_mape": low["median_abs_error_pct"], "low_ratio_mape": low["median_abs_ratio_error_pct"],
                     "low_ratio_max": low["max_abs_ratio_error_pct"], "lut": str(out.relative_to(ROOT)),
                     "result": str(result_path.relative_to(ROOT))})
        print(rows[-1])
    speed = compare_runtimes(model, description, args.backends.split(","))
    rows_file = Path(args.rows)
    kept = read_rows(rows_file)
    kept = [r for r in kept if (r["device"], r["backend"]) not in {(n["device"], n["backend"]) for n in rows}]
    rows = kept + rows
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    lines = [
        "## Latency lookup tables (default model, 1 thread, batch 1)",
        "",
        f"`python bench/bench_lut.py --samples N`, torch {torch.__version__}, Python "
        f"{platform.python_version()}, one row per device and runtime. Each table entry is a conv/linear "
        "layer with its BatchNorm and activation, timed alone: the minimum over 3 rounds of the median of 50 runs. "
        "Validation times N random pruned networks (keep ratios in [0.2, 1], seed 1; the build calibrates on "
        "seed 0) whole, the minimum over 5 rounds of the median of 50 runs, and compares with the LUT's "
        "prediction. Targets: median absolute error at most 10 %, Spearman at least 0.9. Rows from 2026-12-02 "
        "on also validate over small networks (keep ratios in the low range, the FLOPs share they span) and give "
        "the error of the latency ratio to the unpruned network, timed in turn with it (what a relative budget "
        "bounds); their tables calibrate on 16 networks spanning keep ratios 0.2-1 with a denser grid at small "
        "channel counts (latency_luts/README.md).",
        "",
        "| device | date | backend | version | samples | entries | build (s) | unpruned, measured (ms) | median abs. error | max abs. error "
        "| Spearman | median ratio error | low range: keep (FLOPs) | low: median abs. error | low: median / max ratio error "
        "| LUT | per-sample figures |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        backend = r["backend"] + (f" ({r['options']} optimisation)" if r["options"] else "")
        low = (f"{r['ratio_mape']:.1f} % | {r['low_range'][0]:g}-{r['low_range'][1]:g} "
               f"({100 * r['low_flops'][0]:.0f}-{100 * r['low_flops'][1]:.0f} %) | {r['low_mape']:.1f} % | "
               f"{r['low_ratio_mape']:.1f} / {r['low_ratio_max']:.1f} %" if "low_mape" in r else " | | | ")
        lines.append(f"| {r['device']} | {r['date']} | {backend} | {r['version']} | {r['samples']} | {r['entries']} | {r['build_s']:.0f} | {r['base_ms']:.3f} | "
                     f"{r['mape']:.1f} % | {r['max']:.1f} % | {r['spearman']:.3f} | {low} | `{r['lut']}` | `{r['result']}` |")
    lines += ["", f"Runtimes side by side on {device} ({datetime.date.today().isoformat()}): the unpruned network "
              f"and the uniform network at 50 % of the {speed['lut_backend']} LUT's latency (keep ratio "
              f"{speed['keep']:.3f}, {100 * speed['flops_ratio']:.1f} % of the FLOPs), each runtime timing both, 1 "
              "thread, batch 1, each network back to back within a pass (20 untimed, then 100 timed calls), the "
              "minimum over 5 passes of the median.", "",
              "| runtime | unpruned (ms) | 50 %-latency network (ms) | ratio |", "|---|---:|---:|---:|"]
    for name, (full, half) in speed["ms"].items():
        lines.append(f"| {name} | {full:.3f} | {half:.3f} | {half / full:.3f} |")
    fastest_full = min(speed["ms"], key=lambda n: speed["ms"][n][0])
    fastest_half = min(speed["ms"], key=lambda n: speed["ms"][n][1])
    lines += ["", f"Fastest here: {fastest_full} for the unpruned network, {fastest_half} for the pruned one."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("bench_lut", body)
    return 0


def compare_runtimes(model, description, backends: list[str]) -> dict:
    """Unpruned and 50 %-latency uniform network, timed under each runtime."""
    from autoprune.budgets import Constraint, parse_budget
    from autoprune.costs import count_cost, policy_channels, uniform_policy
    from autoprune.latency import measure_networks, timing_conditions
    from autoprune.pruning import ChannelPruner

    table = load_lut(ROOT / default_lut_path(get_backend(backends[0], 1), 1, "resnet20-fashion-mnist"))
    keep = Constraint(parse_budget("50%latency"), description, table).uniform_ratio()
    pruner = ChannelPruner(model, description.input_shape)
    policy = uniform_policy(description, keep)
    pruned = pruner.prune(policy)
    flops = count_cost(pruner.description, policy_channels(pruner.description, policy)).flops
    ms = {}
    with timing_conditions(1):
        for name in backends:
            ms[name] = measure_networks(get_backend(name, 1), [model, pruned], description.input_shape, 1,
                                        warmup=20, runs=100, rounds=5)
            print(name, ms[name])
    return {"lut_backend": backends[0], "keep": keep, "flops_ratio": flops / count_cost(pruner.description).flops,
            "ms": ms}


if __name__ == "__main__":
    sys.exit(main())
