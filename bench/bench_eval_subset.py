"""How few images can score a candidate policy without changing the ranking?

Scores random policies (keep ratios uniform in [0.2, 1], the environment's range) with
a reference evaluator (BN recalibrated on 20 batches of 64, the whole 5,000-image
validation split) and with cheaper settings, and reports Spearman's rank correlation
with the reference, whether the reference's top 3 stay the top 3, and seconds per
candidate. The search's defaults (`EvaluatorConfig`) come from this table.

    python bench/bench_eval_subset.py --policies 16 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

from autoprune.data import load_data
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.latency import cpu_model, spearman
from autoprune.models import DEFAULT_CHECKPOINT, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import write_section  # noqa: E402

SETTINGS = ((20, 5000), (20, 2000), (10, 2000), (10, 1000), (5, 1000))  # (BN batches, validation images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(str(DEFAULT_CHECKPOINT))
    data = load_data("fashion-mnist")
    evaluators = {s: PolicyEvaluator(model, data, EvaluatorConfig(bn_batches=s[0], val_images=s[1])) for s in SETTINGS}
    groups = evaluators[SETTINGS[0]].description.groups
    rng = np.random.default_rng(args.seed)
    scores: dict[tuple, list[float]] = {s: [] for s in SETTINGS}
    for _ in range(args.policies):
        policy = {g.name: float(rng.uniform(0.2, 1.0)) for g in groups}
        for setting, evaluator in evaluators.items():
            scores[setting].append(evaluator.accuracy(policy))
    reference = scores[SETTINGS[0]]
    top = set(np.argsort(reference)[-3:].tolist())
    lines = [
        "## Scoring a candidate: how many images",
        "",
        f"`python bench/bench_eval_subset.py {' '.join(sys.argv[1:])}` on {cpu_model()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {datetime.date.today().isoformat()}. {args.policies} random policies of the "
        "default model (keep ratios uniform in [0.2, 1]); reference: BN recalibrated on 20 batches of 64 training "
        "images, accuracy on the whole 5,000-image validation split. Reference accuracies ranged "
        f"{100 * min(reference):.1f}–{100 * max(reference):.1f} %.",
        "",
        "| BN batches | validation images | Spearman vs reference | reference top 3 kept | s / candidate |",
        "|---:|---:|---:|---:|---:|",
    ]
    for setting, evaluator in evaluators.items():
        kept = len(top & set(np.argsort(scores[setting])[-3:].tolist()))
        lines.append(f"| {setting[0]} | {setting[1]} | {spearman(reference, scores[setting]):.3f} | {kept} of 3 | "
                     f"{evaluator.seconds / max(1, evaluator.evaluations):.2f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("bench_eval_subset", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
