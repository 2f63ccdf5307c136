"""Core benchmark: how long describing a network, applying a policy and counting its cost take.

Times, for resnet20 and resnet56 on 1x28x28 input:
- `describe_network` (one forward trace plus Torch-Pruning's dependency graph),
- `ChannelPruner.prune` for random policies (copy + physical channel removal),
- `policy_cost` (the analytic cost model the search calls thousands of times),
and reads the shipped default checkpoint's accuracy. Results go to BENCHMARKS.md
between the `bench_core` markers.

    python bench/bench_core.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from autoprune.costs import count_cost, policy_cost
from autoprune.latency import cpu_model
from autoprune.models import DEFAULT_CHECKPOINT, build_model, load_model
from autoprune.pruning import ChannelPruner, describe_network

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before = text.split(start)[0]
        after = text.split(end, 1)[1]
        return before + block + after
    return text.rstrip() + "\n\n" + block + "\n"


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines results file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def write_section(name: str, body: str) -> None:
    """Put `body` into BENCHMARKS.md between the markers of section `name`."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else \
        "# Benchmarks\n\nMeasured figures; each section names the command that produced it.\n"
    BENCHMARKS.write_text(replace_section(text, name, body))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in ("resnet20", "resnet56"):
        shape = (1, 28, 28)
        model = build_model(name)
        describe_s = timed(lambda: describe_network(model, shape), max(3, args.repeats // 4))
        pruner = ChannelPruner(model, shape)
        rng = random.Random(0)
        policies = [{g.name: rng.uniform(0.2, 1.0) for g in pruner.groups} for _ in range(args.repeats)]
        it = iter(policies)
        prune_s = timed(lambda: pruner.prune(next(it)), args.repeats)
        it = iter(policies * 50)
        cost_s = timed(lambda: policy_cost(pruner.description, next(it)), args.repeats * 50)
        rows.append({
            "model": name, "groups": len(pruner.groups), "flops": count_cost(pruner.description).flops,
            "describe_ms": 1e3 * statistics.median(describe_s), "prune_ms": 1e3 * statistics.median(prune_s),
            "prune_p90_ms": 1e3 * sorted(prune_s)[int(0.9 * (len(prune_s) - 1))],
            "cost_us": 1e6 * statistics.median(cost_s),
        })

    checkpoint_line = "default checkpoint: missing"
    if DEFAULT_CHECKPOINT.is_file():
        _, meta = load_model(None)
        checkpoint_line = (f"Default checkpoint `{DEFAULT_CHECKPOINT.relative_to(ROOT)}`: test accuracy "
                           f"{meta['test_accuracy']:.4f}, validation accuracy {meta['val_accuracy']:.4f}, made by "
                           f"`{meta['command']}`.")

    lines = [
        "## Core: policy application and cost model",
        "",
        f"`python bench/bench_core.py --threads {args.threads} --repeats {args.repeats}` on {cpu_model()}, "
        f"torch {torch.__version__}, {args.threads} thread(s), Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}. FLOPs are MACs at 1x28x28, batch 1.",
        "",
        checkpoint_line,
        "",
        "| model | groups | FLOPs | describe_network (ms) | apply policy, median (ms) | apply policy, p90 (ms) "
        "| policy_cost (µs) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['groups']} | {r['flops'] / 1e6:.2f}M | {r['describe_ms']:.1f} | "
                     f"{r['prune_ms']:.1f} | {r['prune_p90_ms']:.1f} | {r['cost_us']:.1f} |")
    lines += ["", "Applying a policy copies the base model, rebuilds Torch-Pruning's dependency graph on the "
              "copy and removes the channels; `policy_cost` is pure arithmetic over the network description."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("bench_core", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
