"""Which score of a candidate predicts its accuracy after fine-tuning?

The AMC search ranks policies by validation accuracy after BN recalibration, before any
fine-tuning. At tight budgets every candidate scores near chance that way. This
benchmark draws policies at one budget, the way the search does (random actions through
the environment, with its action bounds), adds the uniform policy and any policy files
given, and measures for each:
- its validation accuracy (whole split) after BN recalibration: the search's signal;
- its validation accuracy after 20, 50 and 200 SGD steps (batch 64, lr 0.01, cosine);
- its test accuracy after one epoch of fine-tuning (batch 256, lr 0.01), as bench_amc.py.
It reports Spearman's rank correlation of each score with the last, and where uniform
ranks. Rows go to bench/results/proxy_rows.jsonl (one per policy), so shards run in
parallel on separate cores share one table.

    taskset -c 0 python bench/bench_proxy.py --shard 0/2 --threads 1 &
    taskset -c 1 python bench/bench_proxy.py --shard 1/2 --threads 1 --policy amc=runs/X/best_policy.json &
    python bench/bench_proxy.py --report

A latency budget takes `--lut FILE`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from autoprune.budgets import DEFAULT_FILL, parse_budget, uniform_ratio_for_budget
from autoprune.costs import policy_cost, uniform_policy
from autoprune.data import load_data
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.latency import load_lut, spearman, this_device
from autoprune.models import DEFAULT_CHECKPOINT, load_model
from autoprune.train import TrainConfig, evaluate, train
from autoprune.envs.channel_pruning import ChannelPruningEnv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import read_rows, write_section  # noqa: E402

STEPS = (20, 50, 200)


def candidates(evaluator: PolicyEvaluator, budget_text: str, count: int, seed: int,
               files: list[str], lut=None) -> list[tuple[str, dict]]:
    """(label, policy): `count` random policies through the environment, uniform, then the files."""
    env = ChannelPruningEnv(evaluator, parse_budget(budget_text), lut=lut, fill=DEFAULT_FILL)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        env.reset()
        for action in rng.uniform(-1.0, 1.0, size=len(env.groups)):
            _, _, _, _, info = env.step(np.array([action], dtype=np.float32))
        out.append((f"random-{seed}-{i}", info["policy"]))
    description = evaluator.description
    out.append(("uniform", uniform_policy(description, uniform_ratio_for_budget(parse_budget(budget_text),
                                                                                description, lut))))
    for item in files:
        label, _, path = item.rpartition("=")
        out.append((label or path, json.loads(Path(path).read_text())["policy"]))
    return out


def finetuned_test_accuracy(evaluator: PolicyEvaluator, policy: dict, config: TrainConfig) -> float:
    """Test accuracy of the network `evaluator.prune` gives for `policy`, fine-tuned with `config`."""
    model = evaluator.prune(policy)
    train(model, evaluator.data, config, progress=False)
    return evaluate(model, evaluator.data, "test")["accuracy"]


def measure(evaluator: PolicyEvaluator, policy: dict, seed: int) -> dict:
    data = evaluator.data
    row = {"val_bn": evaluate(evaluator.prune(policy), data, "val")["accuracy"]}
    for steps in STEPS:
        model = evaluator.prune(policy)
        train(model, data, TrainConfig(epochs=1, batch_size=64, lr=0.01, seed=seed, max_steps_per_epoch=steps),
              progress=False, eval_split="")
        row[f"val_{steps}"] = evaluate(model, data, "val")["accuracy"]
    row["test_ft"] = finetuned_test_accuracy(evaluator, policy, TrainConfig(epochs=1, lr=0.01, seed=seed))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="25%flops")
    parser.add_argument("--policies", type=int, default=12, help="random policies drawn through the environment")
    parser.add_argument("--lut", default=None, help="latency table, for latency budgets")
    parser.add_argument("--policy", action="append", default=[], help="[LABEL=]best_policy.json to measure too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard", default="0/1", help="I/N: measure every N-th candidate from the I-th")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default=str(ROOT / "bench" / "results" / "proxy_rows.jsonl"))
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the rows file")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_file = Path(args.rows)
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    device = this_device()

    if not args.report:
        model, meta = load_model(str(DEFAULT_CHECKPOINT))
        data = load_data(meta.get("data", "fashion-mnist"))
        evaluator = PolicyEvaluator(model, data, EvaluatorConfig(seed=args.seed))
        base_flops = policy_cost(evaluator.description, {}).flops
        index, shards = (int(part) for part in args.shard.split("/"))
        done = {(r["device"], r["budget"], r["label"]) for r in read_rows(rows_file)}
        lut = load_lut(args.lut) if args.lut else None
        for label, policy in candidates(evaluator, args.budget, args.policies, args.seed, args.policy,
                                        lut)[index::shards]:
            if (device, args.budget, label) in done:
                continue
            row = {"device": device, "date": datetime.date.today().isoformat(), "budget": args.budget,
                   "label": label, "flops": policy_cost(evaluator.description, policy).flops / base_flops,
                   "threads": args.threads, **measure(evaluator, policy, args.seed)}
            with open(rows_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(row, flush=True)

    rows = read_rows(rows_file)
    lines = ["## Which score predicts accuracy after fine-tuning", "",
             "By `python bench/bench_proxy.py --shard I/2 --threads 1 --policy LABEL=FILE ...` (one shard per core; "
             "the *amc-seedN* policies are the best policies of the `bench_amc.py` searches at this budget with the "
             "fill bound, *-selected* one a fine-tuned re-ranking picked); torch " + torch.__version__ + ". For each "
             "policy: validation accuracy (whole split) after BN recalibration (*BN*, the search's signal), after "
             f"{', '.join(map(str, STEPS))} SGD steps of batch 64 (lr 0.01, cosine), and test accuracy after one "
             "epoch of fine-tuning (*test FT*, batch 256, lr 0.01). *ρ* is Spearman's rank correlation of a score "
             "with *test FT* over the policies of that budget and CPU.", ""]
    for (cpu, budget) in sorted({(r["device"], r["budget"]) for r in rows}):
        rs = sorted((r for r in rows if (r["device"], r["budget"]) == (cpu, budget)), key=lambda r: -r["test_ft"])
        scores = ["val_bn", *(f"val_{s}" for s in STEPS)]
        lines += [f"{cpu}, {budget}, {len(rs)} policies ({rs[0]['date']}):", "",
                  "| policy | FLOPs | BN | " + " | ".join(f"{s} steps" for s in STEPS) + " | test FT |",
                  "|---|---:|---:|" + "---:|" * len(STEPS) + "---:|"]
        for r in rs:
            lines.append(f"| {r['label']} | {100 * r['flops']:.1f} % | "
                         + " | ".join(f"{100 * r[s]:.2f}" for s in scores) + f" | {100 * r['test_ft']:.2f} |")
        final = [r["test_ft"] for r in rs]
        lines.append("| *ρ with test FT* | | " + " | ".join(f"{spearman([r[s] for r in rs], final):+.2f}"
                                                          for s in scores) + " | |")
        lines.append("")
    body = "\n".join(lines).rstrip()
    print(body)
    if not args.no_write:
        write_section("bench_proxy", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
