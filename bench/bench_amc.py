"""AMC search benchmark: speed, and quality against uniform pruning at the same budget.

For each model checkpoint, budget and seed it runs the DDPG search through the pipeline
`autoprune search` runs (`autoprune.pipeline.stages.run_search`), and the uniform agent at
the same budget, and compares them:
- validation accuracy before fine-tuning (BN recalibrated, the whole validation split),
- test accuracy after the same fine-tune,
- search wall time, and the share spent outside the environment (the agent's own work).
Every measured row is appended to bench/results/amc_rows.jsonl, so an interrupted benchmark skips what
it has measured, and invocations on separate cores (one budget each) share one table.
Writes BENCHMARKS.md between the `bench_amc` markers.

    python bench/bench_amc.py --budgets 50%flops,25%flops --seeds 0,1,2
    taskset -c 1 python bench/bench_amc.py --budgets 25%flops --threads 1 &   # in parallel
    python bench/bench_amc.py --report                                        # table only
    python bench/bench_amc.py --checkpoint resnet56=checkpoints/resnet56-fashion-mnist.pt --budgets 50%flops
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from autoprune.budgets import DEFAULT_FILL
from autoprune.latency import this_device
from autoprune.models import DEFAULT_CHECKPOINT
from autoprune.pipeline.settings import SearchSettings
from autoprune.pipeline.stages import resume_search, run_search
from autoprune.runs import CONFIG, Run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import read_rows, write_section  # noqa: E402


def parse_tag(budget_text: str) -> str:
    from autoprune.budgets import parse_budget

    return parse_budget(budget_text).tag


def _fill(row: dict) -> float:
    return row.get("fill", 0.0)  # rows measured before the fill bound existed ran without it


def _device(row: dict) -> str:
    """The CPU a row was measured on (rows from before it was recorded: the earlier machine)."""
    return row.get("device", "AMD EPYC (family/model not recorded)")


def searched(settings: SearchSettings, path: Path) -> dict:
    """The metrics of the pipeline's search into `path` (resumed if it was killed, read if finished)."""
    if (path / CONFIG).is_file():
        return resume_search(path).metrics
    return run_search(settings, out=path).metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH (default: the shipped model)")
    parser.add_argument("--budgets", default="50%flops,25%flops")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--warmup-episodes", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=1000, help="validation images per candidate")
    parser.add_argument("--bn-batches", type=int, default=10, help="BN recalibration batches per candidate")
    parser.add_argument("--fill", type=float, default=DEFAULT_FILL,
                        help="share of the budget each episode is steered to use (the environment's lower bound)")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--score-steps", default="auto", help="as `autoprune search --score-steps`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-amc", help="run directories of the searches")
    parser.add_argument("--rows", default=str(ROOT / "bench" / "results" / "amc_rows.jsonl"),
                        help="measured rows (kept in the repository, so the table can be rebuilt)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the rows file")
    args = parser.parse_args()
    args.score_steps = args.score_steps if args.score_steps == "auto" else int(args.score_steps)
    torch.set_num_threads(args.threads)
    rows_file = Path(args.rows)
    rows_file.parent.mkdir(parents=True, exist_ok=True)

    checkpoints = dict(item.split("=", 1) for item in args.checkpoint) or {"resnet20": str(DEFAULT_CHECKPOINT)}
    rows = read_rows(rows_file)
    device = this_device()
    done = {(_device(r), r["model"], r["budget"], _fill(r), r["seed"]) for r in rows}
    for name, path in ([] if args.report else checkpoints.items()):
        for budget_text in args.budgets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                if (device, name, budget_text, args.fill, seed) in done:
                    continue  # measured by an earlier (or parallel) invocation
                # the same pipeline as `autoprune search`: AMC's search, then uniform's at the same budget,
                # each finished by the same fine-tune
                common = dict(model=path, budget=budget_text, seed=seed, val_images=args.val_images,
                              bn_batches=args.bn_batches, finetune_epochs=args.finetune_epochs, onnx=False)
                stem = f"{name}-{parse_tag(budget_text)}-fill{args.fill:g}-seed{seed}-{datetime.date.today().isoformat()}"
                amc = searched(SearchSettings(agent="ddpg", episodes=args.episodes, score_steps=args.score_steps,
                                              warmup_episodes=args.warmup_episodes, fill=args.fill, **common),
                               Path(args.out) / stem)
                uniform = searched(SearchSettings(agent="uniform", **common), Path(args.out) / f"{stem}-uniform")
                history = Run(Path(args.out) / stem).read_history()
                warmup_best = max((float(r["accuracy"]) for r in history if str(r["warmup"]) == "True"), default=0.0)
                search_s, parts = amc["search_seconds"], amc["search_breakdown_seconds"]
                row = {
                    "device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                    "model": name, "budget": budget_text, "fill": args.fill, "seed": seed, "search_s": search_s,
                    "episodes": args.episodes, "warmup_episodes": args.warmup_episodes,
                    "val_images": args.val_images, "bn_batches": args.bn_batches, "threads": args.threads,
                    "finetune_epochs": args.finetune_epochs, "score_steps": args.score_steps,
                    "command": "python bench/bench_amc.py " + " ".join(sys.argv[1:]),
                    "evaluations": amc["candidate_evaluations"],
                    "agent_share": parts["agent"] / search_s,
                    "prune_share": parts["prune"] / search_s, "bn_share": parts["bn_recalibration"] / search_s,
                    "val_share": parts["validation"] / search_s,
                    "best_episode": amc["search"]["episode"], "best_search_acc": amc["search"]["accuracy"],
                    "warmup_best_acc": warmup_best,
                    "amc_flops": amc["flops_ratio"], "uniform_flops": uniform["flops_ratio"],
                    "amc_val": amc["val_accuracy_before_finetune"], "uniform_val": uniform["val_accuracy_before_finetune"],
                    "amc_test_ft": amc["test_accuracy"], "uniform_test_ft": uniform["test_accuracy"],
                }
                rows.append(row)
                with open(rows_file, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(row, flush=True)
    if rows_file.is_file():  # rows measured by parallel invocations count too
        rows = read_rows(rows_file)
    rows.sort(key=lambda r: (r.get("date", ""), _device(r), r["model"], r["budget"], _fill(r), r["seed"]))

    commands = sorted({r["command"] for r in rows})
    lines = [
        "## AMC search (DDPG) against uniform pruning",
        "",
        "By " + "; ".join(f"`{c}`" for c in commands) + f"; torch {torch.__version__}. The CPU and date of each "
        "row are in its *CPU* column (rows without a date were measured on 2026-11-23). FLOPs are MACs.",
        "",
        "- *val*: accuracy on the whole held-out validation split (5,000 images) after BN recalibration, before any "
        "fine-tuning. The search itself scores policies on a fixed subset of it (`--val-images`, 1,000 unless the "
        "command says otherwise) after recalibrating BN on `--bn-batches` batches of 64 training images (10).",
        "- *warm-up best*: the best search-subset accuracy among the random warm-up episodes; *best ep.*: the episode "
        "that produced the best policy (after the warm-up means the learning phase found it).",
        "- *test (FT)*: test accuracy after `--finetune-epochs` epochs of fine-tuning (SGD, lr 0.01, cosine), the "
        "same for both policies of a row.",
        "- Time: *agent* is everything outside the environment (DDPG updates, bookkeeping, writing the run "
        "directory); *prune*, *BN* and *val* are the evaluator's channel removal, BatchNorm recalibration and "
        "validation pass, as shares of the search's wall time.",
        "- *fill*: the share of the budget every episode is steered to use (the environment's lower action bound, "
        "`--fill`); 0 is AMC's upper bound alone.",
        "",
        "| CPU | model | budget | fill | seed | episodes (warm-up) | search (s) | agent | prune | BN | val | evaluated | AMC FLOPs | uniform FLOPs | "
        "AMC val | uniform val | margin (pp) | warm-up best | best ep. | AMC test (FT) | uniform test (FT) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {_device(r)}{', ' + r['date'] if 'date' in r else ''} | {r['model']} | {r['budget']} | {_fill(r):g} | {r['seed']} | {r['episodes']} ({r['warmup_episodes']}) | "
            f"{r['search_s']:.0f} | {100 * r['agent_share']:.1f} % | "
            f"{100 * r['prune_share']:.1f} % | {100 * r['bn_share']:.1f} % | {100 * r['val_share']:.1f} % | "
            f"{r['evaluations']} | {100 * r['amc_flops']:.1f} % | {100 * r['uniform_flops']:.1f} % | "
            f"{100 * r['amc_val']:.2f} | {100 * r['uniform_val']:.2f} | {100 * (r['amc_val'] - r['uniform_val']):+.2f} | "
            f"{100 * r['warmup_best_acc']:.2f} | {r['best_episode']} | {100 * r['amc_test_ft']:.2f} | "
            f"{100 * r['uniform_test_ft']:.2f} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((_device(r), r["model"], r["budget"], _fill(r)), []).append(r)
    lines += ["", "| CPU | model | budget | fill | seeds | val margin, mean ± sd (pp) | min | test margin after FT, mean ± sd (pp) (FT "
              "epochs; 0: no fine-tune) | "
              "mean search (s) | mean agent share |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):+.2f} ± {sd:.2f}"

    for (cpu, model, budget, fill), rs in groups.items():
        margins = [100 * (r["amc_val"] - r["uniform_val"]) for r in rs]
        test_margins = [100 * (r["amc_test_ft"] - r["uniform_test_ft"]) for r in rs]
        lines.append(f"| {cpu} | {model} | {budget} | {fill:g} | {len(rs)} | {spread(margins)} | {min(margins):+.2f} | "
                     f"{spread(test_margins)} ({'/'.join(sorted({str(r['finetune_epochs']) for r in rs}))} epochs) | "
                     f"{statistics.mean(r['search_s'] for r in rs):.0f} | "
                     f"{100 * statistics.mean(r['agent_share'] for r in rs):.1f} % |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("bench_amc", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
