"""Every agent at one budget, side by side, over seeds: the RL-vs-NetAdapt comparison.

Runs `autoprune sweep` over the agents, the budget and the seeds (each run resumable; a
repeated command skips finished runs), then summarises test accuracy after the same
long-term fine-tune and validation accuracy before it, per agent: mean, spread
(max − min) and the number of seeds finished, and the test-accuracy margin over the
uniform policy fine-tuned with the same seed. The sweep's comparison table and plots
are copied to bench/results/compare-BUDGET/; BENCHMARKS.md (between the
`bench_compare` markers) names them.

    python bench/bench_compare.py --budget 50%flops --seeds 0,1,2 --finetune-epochs 1

Options it does not know go to `autoprune sweep` as they are (`--model`, `--data`,
`--episodes`, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

from autoprune.cli import main as autoprune_main
from autoprune.latency import this_device

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import write_section  # noqa: E402

AGENTS = "ddpg,netadapt,uniform,random,sensitivity"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default=AGENTS)
    parser.add_argument("--budget", default="50%flops")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--out", default="runs/bench-compare")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="only summarise the finished runs under --out (no sweep)")
    args, passthrough = parser.parse_known_args()  # other `autoprune sweep` options, e.g. --model, --data

    code = 0 if args.report else autoprune_main(
        ["sweep", "--agents", args.agents, "--budgets", args.budget, "--seeds", args.seeds,
         "--finetune-epochs", str(args.finetune_epochs), "--out", args.out, "--quiet", *passthrough])
    results: dict[str, list[dict]] = {}
    seeds: dict[str, list[str]] = {}
    for metrics_file in sorted(Path(args.out).glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        agent = metrics.get("agent", metrics_file.parent.name.split("-")[0])
        results.setdefault(agent, []).append(metrics)
        seeds.setdefault(agent, []).append(metrics_file.parent.name.rsplit("-s", 1)[-1])
    if not results:
        return code or 1
    uniform_test = dict(zip(seeds.get("uniform", []), (m["test_accuracy"] for m in results.get("uniform", []))))
    kept = ROOT / "bench" / "results" / f"compare-{args.budget.replace('%', 'p')}"
    comparison = Path(args.out) / "comparison"
    if comparison.is_dir() and not args.no_write:
        kept.mkdir(parents=True, exist_ok=True)
        for path in comparison.iterdir():
            shutil.copyfile(path, kept / path.name)

    def summary(values: list[float]) -> str:
        spread = max(values) - min(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread / 2:.2f}"

    lines = [
        f"## All agents at {args.budget}",
        "",
        f"`python bench/bench_compare.py --agents {args.agents} --budget {args.budget} --seeds {args.seeds} "
        f"--finetune-epochs {args.finetune_epochs}` on {this_device()}, "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}: `autoprune sweep` over the agents at "
        f"{args.budget}, each best policy fine-tuned for {args.finetune_epochs} epoch(s) (SGD, lr 0.01, cosine). "
        "Mean ± half the range over the seeds finished (listed). *vs uniform*: test accuracy after fine-tuning "
        "minus that of the uniform policy fine-tuned with the same seed, mean (min to max) over the seeds. "
        f"Per-run table and plots: `{kept.relative_to(ROOT)}/` (comparison.md, accuracy_vs_flops.png, "
        "accuracy_vs_latency.png, keep_ratios.png).",
        "",
        "| agent | seeds finished | FLOPs kept | val acc before FT (%) | test acc after FT (%) | vs uniform (pp) "
        "| search (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for agent in args.agents.split(","):
        runs = results.get(agent, [])
        if not runs:
            lines.append(f"| {agent} | 0 | | | | | |")
            continue
        margins = [100 * (m["test_accuracy"] - uniform_test[seed]) for m, seed in zip(runs, seeds[agent])
                   if seed in uniform_test]
        versus = (f"{statistics.mean(margins):+.2f} ({min(margins):+.2f} to {max(margins):+.2f})"
                  if margins and agent != "uniform" else "")
        lines.append(f"| {agent} | {len(runs)} ({', '.join(seeds[agent])}) | {summary([m['flops_ratio'] for m in runs])} % | "
                     f"{summary([m['val_accuracy_before_finetune'] for m in runs])} | "
                     f"{summary([m['test_accuracy'] for m in runs])} | {versus} | "
                     f"{statistics.mean(m['search_seconds'] for m in runs):.0f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("bench_compare", body)
    return code


if __name__ == "__main__":
    sys.exit(main())
