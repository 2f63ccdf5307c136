"""NetAdapt to a latency budget on the shipped torch LUT: search time and measured latency.

Runs `autoprune search --agent netadapt --budget 50%latency --lut <shipped torch LUT>` on
the default model, then times the unpruned model and the final pruned model whole
(torch eager, 1 thread, batch 1, as the LUT was built; the minimum over rounds of the
median of many calls, the process pinned to one CPU) and reports how far the measured
latency ratio lands from the budget. Writes BENCHMARKS.md between the `bench_netadapt`
markers; the run directory stays under `--out` (resumable: run the command again).

    python bench/bench_netadapt.py --budget 50%latency --workers 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from autoprune.cli import main as autoprune_main
from autoprune.latency import cpu_model, get_backend, load_lut, measure_networks, pin_process
from autoprune.models import DEFAULT_CHECKPOINT, load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import write_section  # noqa: E402

DEFAULT_LUT = ROOT / "latency_luts" / "amd-epyc-torch-t1-b1-resnet20-fashion-mnist.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="50%latency")
    parser.add_argument("--lut", default=str(DEFAULT_LUT))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="timing passes over both networks")
    parser.add_argument("--out", default="runs/bench-netadapt")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    run_dir = Path(args.out) / f"netadapt-{args.budget.replace('%', 'p')}-s{args.seed}"
    argv = ["search", "--agent", "netadapt", "--budget", args.budget, "--lut", args.lut, "--workers",
            str(args.workers), "--finetune-epochs", str(args.finetune_epochs), "--seed", str(args.seed), "--quiet"]
    argv = ["search", "--resume", str(run_dir), "--quiet"] if (run_dir / "config.json").is_file() \
        else argv + ["--out", str(run_dir)]
    code = autoprune_main(argv)
    if code != 0:
        return code
    metrics = json.loads((run_dir / "metrics.json").read_text())

    table = load_lut(args.lut)
    runtime = table.runtime
    pin_process(runtime["threads"])
    backend = get_backend(runtime["backend"], runtime["threads"])
    base, _ = load_model(str(DEFAULT_CHECKPOINT))
    # NetAdapt's own network (before the long-term fine-tune, same layers): eager, like the base
    pruned = torch.load(run_dir / "state" / "netadapt_model.pt", map_location="cpu", weights_only=False).eval()
    base_ms, pruned_ms = measure_networks(backend, [base.eval(), pruned], (1, 28, 28), runtime["batch"],
                                          warmup=20, runs=200, rounds=args.rounds)
    ratio = pruned_ms / base_ms
    fraction = float(args.budget.split("%")[0]) / 100
    search = metrics.get("search", {})
    lines = [
        "## NetAdapt to a latency budget",
        "",
        f"`python bench/bench_netadapt.py {' '.join(sys.argv[1:])}` on {cpu_model()}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}: `autoprune {' '.join(argv)}` on the default model with the shipped "
        f"torch LUT (`{Path(args.lut).name}`), then both networks timed whole (torch eager, "
        f"{runtime['threads']} thread, batch {runtime['batch']}, minimum over {args.rounds} passes of the median of "
        "200 calls).",
        "",
        "| budget | workers | iterations | proposals | search (s) | LUT latency | measured latency (ms) | "
        "measured ratio | off the budget | FLOPs | val before FT | test after FT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.budget} | {args.workers} | {search.get('iterations', '')} | {search.get('proposals', '')} | "
        f"{metrics['search_seconds']:.0f} | {100 * metrics['lut_latency_ratio']:.1f} % | "
        f"{base_ms:.3f} → {pruned_ms:.3f} | {100 * ratio:.1f} % | {100 * (ratio - fraction) / fraction:+.1f} % | "
        f"{100 * metrics['flops_ratio']:.1f} % | {100 * metrics['val_accuracy_before_finetune']:.2f} | "
        f"{100 * metrics['test_accuracy']:.2f} |",
        "",
        f"*off the budget*: (measured ratio − {fraction:g}) / {fraction:g}. Search time includes the short-term "
        f"fine-tunes; the long-term fine-tune ({args.finetune_epochs} epoch) is not part of it.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("bench_netadapt", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
