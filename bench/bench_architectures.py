"""Architectures benchmark: is the cost model exact beyond the zoo, and how much can be pruned?

For the fixed test architectures (tests/archs.py: concatenated branches with squeeze-
excitation, ResNeXt blocks, GroupNorm, a depthwise convolution with a channel
multiplier, ConvNeXt blocks, SqueezeNet's fire modules, shared-MLP attention, a transposed
convolution, efficient channel attention, CBAM, ConvNeXt with its own LayerNorm, and a
mix of them) and the zoo, it prints predicted and counted FLOPs and parameters, unpruned
and after `uniform:0.5`. Then it draws `--seeds` random networks from the same blocks
(the long variant of the property test) and, for each, several random policies: the
prediction must equal Torch-Pruning's conv, Conv1d and linear counter and the parameter
sum of the physically pruned network, whose output shape must be unchanged. It also
counts the groups kept whole (those Torch-Pruning cannot prune consistently). Results go
to BENCHMARKS.md between the `bench_architectures` markers.

    python bench/bench_architectures.py [--seeds 300] [--policies 4]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test architectures live in tests/archs.py
sys.path.insert(0, str(ROOT / "bench"))

from autoprune.costs import count_cost, policy_cost, uniform_policy  # noqa: E402
from autoprune.latency import this_device  # noqa: E402
from autoprune.models import build_model  # noqa: E402
from autoprune.pruning import ChannelPruner, describe_network  # noqa: E402
from bench_core import write_section  # noqa: E402
from tests.archs import FIXED, counted_cost, mixed_net, random_net  # noqa: E402

SHAPE = (1, 28, 28)


class WholeGroups(logging.Handler):
    """Counts the groups a pruner keeps whole (it says so in a warning)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "kept whole" in record.getMessage():
            self.count += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=300, help="random networks to draw")
    parser.add_argument("--policies", type=int, default=4, help="random policies per network")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    whole = WholeGroups()
    logging.getLogger("autoprune.pruning").addHandler(whole)

    table = ["| architecture | groups | unpruned: predicted | counted | uniform:0.5: predicted | counted |",
             "|---|---:|---|---|---|---|"]
    models = {**{name: factory for name, factory in FIXED.items()}, "mixed": mixed_net,
              "resnet20": lambda: build_model("resnet20"), "mobilenetv2": lambda: build_model("mobilenetv2")}
    for name, factory in models.items():
        torch.manual_seed(0)
        model = factory().eval()
        base = count_cost(describe_network(model, SHAPE))
        pruner = ChannelPruner(model, SHAPE)
        policy = uniform_policy(pruner.description, 0.5)
        predicted = policy_cost(pruner.description, policy)
        flops, params = counted_cost(pruner.prune(policy), SHAPE)
        base_flops, base_params = counted_cost(model, SHAPE)
        table.append(f"| {name} | {len(pruner.groups)} | {base.flops:,} FLOPs / {base.params:,} params | "
                     f"{base_flops:,} / {base_params:,} | {predicted.flops:,} / {predicted.params:,} | "
                     f"{flops:,} / {params:,} |")

    started = time.perf_counter()
    checked = exact = 0
    failures: list[str] = []
    groups = 0
    whole.count = 0
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = random_net(seed).eval()
        try:
            base = count_cost(describe_network(model, SHAPE))
            if (base.flops, base.params) != counted_cost(model, SHAPE):
                failures.append(f"seed {seed}: unpruned count differs")
                continue
            pruner = ChannelPruner(model, SHAPE, criterion="random", seed=seed)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
            failures.append(f"seed {seed}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        groups += len(pruner.groups)
        rng = random.Random(seed)
        for _ in range(args.policies):
            policy = {g.name: rng.uniform(0.05, 1.0) for g in pruner.groups}
            checked += 1
            try:
                pruned = pruner.prune(policy)
                predicted = policy_cost(pruner.description, policy)
                ok = (predicted.flops, predicted.params) == counted_cost(pruned, SHAPE) and \
                    tuple(pruned(torch.randn(2, *SHAPE)).shape) == (2, 10)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"seed {seed}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            exact += ok
            if not ok:
                failures.append(f"seed {seed}: prediction differs from the count")
    seconds = time.perf_counter() - started

    lines = [
        "## Architectures beyond the zoo: exact costs",
        "",
        f"`python bench/bench_architectures.py --seeds {args.seeds} --policies {args.policies}` on {this_device()}, "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}. FLOPs are MACs at 1x28x28, batch 1; "
        "*counted* is Torch-Pruning's conv, Conv1d and linear counter (a transposed convolution at its input positions) and the parameter sum of the network itself (for "
        "uniform:0.5, of the physically pruned one, l1 criterion).",
        "",
        *table,
        "",
        f"Random networks (tests/archs.py `random_net`, seeds 0-{args.seeds - 1}; two to four blocks of residual, "
        "concatenating (half with squeeze-excitation), ResNeXt, depthwise-separable, ConvNeXt (layer scale, "
        "channels-last linear layers, half with the reference code's own LayerNorm), per-channel-scaled "
        "residual, ECA-gated and CBAM-gated residual kinds, with a random norm among BatchNorm, GroupNorm, "
        "InstanceNorm, GroupNorm(1) and none, a random activation and head, and GCNet's context block written "
        "channel-wise at the end of a third of them): "
        f"{exact} of {checked} random policies predicted exactly, {len(failures)} failures, {groups} prunable "
        f"groups in all, {whole.count} kept whole by the pruner's own check; {seconds:.0f} s.",
    ]
    lines += [f"- {failure}" for failure in failures[:20]]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("bench_architectures", body)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
