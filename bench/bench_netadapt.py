"""NetAdapt to a latency budget on a shipped torch LUT: search time and measured latency.

Runs `autoprune search --agent netadapt --budget 50%latency --lut LUT` on the default
model (LUT: this machine's torch table in latency_luts/, built by bench/bench_lut.py),
then times the unpruned model and the final pruned model whole (torch eager, 1 thread,
batch 1, as the LUT was built; the minimum over passes of the median of many calls, in
a fresh process pinned to one CPU) and reports how far the measured
latency ratio lands from the budget. `--measure-latency` is passed to the search (off, the
default: the LUT alone; on: NetAdapt also times the network after every iteration and
stops on the measured latency). Each measured row is appended to
bench/results/netadapt_rows.jsonl and BENCHMARKS.md between the `bench_netadapt` markers
shows them all; the run directory stays under `--out` (resumable: run the command again).

    python bench/bench_netadapt.py --budget 50%latency --workers 1
    python bench/bench_netadapt.py --budget 50%latency --measure-latency on
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from autoprune.cli import main as autoprune_main
from autoprune.latency import TorchBackend, default_lut_path, load_lut, this_device
from autoprune.models import DEFAULT_CHECKPOINT, load_model
from autoprune.latency import measure_latency

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import write_section  # noqa: E402

DEFAULT_LUT = ROOT / default_lut_path(TorchBackend(1), 1, "resnet20-fashion-mnist")  # this machine's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="50%latency")
    parser.add_argument("--lut", default=str(DEFAULT_LUT))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-latency", choices=("auto", "on", "off"), default="off")
    parser.add_argument("--out", default="runs/bench-netadapt")
    parser.add_argument("--rows", default=str(ROOT / "bench" / "results" / "netadapt_rows.jsonl"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the rows file")
    args = parser.parse_args()
    rows_file = Path(args.rows)
    if args.report:
        return report(rows_file, args.no_write)

    run_dir = Path(args.out) / f"netadapt-{args.budget.replace('%', 'p')}-s{args.seed}-measure-{args.measure_latency}"
    argv = ["search", "--agent", "netadapt", "--budget", args.budget, "--lut", args.lut, "--workers",
            str(args.workers), "--finetune-epochs", str(args.finetune_epochs), "--seed", str(args.seed),
            "--measure-latency", args.measure_latency, "--quiet"]
    argv = ["search", "--resume", str(run_dir), "--quiet"] if (run_dir / "config.json").is_file() \
        else argv + ["--out", str(run_dir)]
    code = autoprune_main(argv)
    if code != 0:
        return code
    metrics = json.loads((run_dir / "metrics.json").read_text())

    # NetAdapt's own network (before the long-term fine-tune, same layers) and the base, timed in a fresh
    # process: this one has just fine-tuned, and timings taken in such a process are off
    base, _ = load_model(str(DEFAULT_CHECKPOINT))
    pruned = torch.load(run_dir / "state" / "netadapt_model.pt", map_location="cpu", weights_only=False).eval()
    timed = measure_latency([base.eval(), pruned], (1, 28, 28), load_lut(args.lut))
    base_ms, pruned_ms = timed["ms"]
    ratio = pruned_ms / base_ms
    fraction = float(args.budget.split("%")[0]) / 100
    search = metrics.get("search", {})
    row = {"command": "python bench/bench_netadapt.py " + " ".join(sys.argv[1:]), "date": datetime.date.today().isoformat(),
           "cpu": this_device(), "lut": Path(args.lut).name,
           "torch": torch.__version__, "budget": args.budget, "workers": args.workers,
           "measured_in_search": search.get("measured_base_ms") is not None, "search_meter": "separate process",
           "iterations": search.get("iterations"), "proposals": search.get("proposals"),
           "search_s": metrics["search_seconds"], "lut_ratio": metrics["lut_latency_ratio"],
           "base_ms": base_ms, "pruned_ms": pruned_ms, "ratio": ratio, "off_budget": (ratio - fraction) / fraction,
           "flops_ratio": metrics["flops_ratio"], "val_before_ft": metrics["val_accuracy_before_finetune"],
           "test_after_ft": metrics["test_accuracy"], "finetune_epochs": args.finetune_epochs,
           "timed_in": "fresh process", "timing_runs": timed["settings"]["runs"], "timing_rounds": timed["settings"]["rounds"]}
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    with open(rows_file, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return report(rows_file, args.no_write)


def report(rows_file: Path, no_write: bool) -> int:
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    lines = [
        "## NetAdapt to a latency budget",
        "",
        "On the default model with a shipped torch LUT built on the CPU the row ran on (*LUT*): "
        "`autoprune search --agent netadapt --budget B --lut LUT --measure-latency M`, then the unpruned and the "
        "searched network timed whole with the LUT's runtime settings (torch eager, 1 thread, batch 1), the thread "
        "pinned to one CPU, minimum over the passes of the median of up to 200 calls. *timed in*: a fresh process, "
        "or (earlier rows) the benchmark's own process, which had just run the search and the fine-tune. "
        "*measured in search*: whether NetAdapt timed the network after every iteration and stopped on that "
        "(`--measure-latency on`; in the search process itself in earlier versions, in a separate one now) or "
        "followed the LUT alone (off, the default).",
        "",
        "| command | date | CPU | LUT | budget | timed in | measured in search | workers | iterations | proposals | search (s) | "
        "LUT latency | measured latency (ms) | measured ratio | off the budget | FLOPs | val before FT | test after FT |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['command']}` | {r['date']} | {r['cpu']} | `{r.get('lut', 'amd-epyc-torch-t1-b1-resnet20-fashion-mnist.json')}` | {r['budget']} | {r.get('timed_in', 'benchmark process')} | "
            f"{'yes, in the ' + r.get('search_meter', 'separate process') if r['measured_in_search'] else 'no'} | "
            f"{r['workers']} | {r['iterations']} | {r['proposals']} | {r['search_s']:.0f} | "
            f"{100 * r['lut_ratio']:.1f} % | {r['base_ms']:.3f} → {r['pruned_ms']:.3f} | {100 * r['ratio']:.1f} % | "
            f"{100 * r['off_budget']:+.1f} % | {100 * r['flops_ratio']:.1f} % | {100 * r['val_before_ft']:.2f} | "
            f"{100 * r['test_after_ft']:.2f} |")
    lines += [
        "",
        "*off the budget*: (measured ratio − budget) / budget. Search time includes the short-term fine-tunes "
        "(and, when measuring, the timing after each iteration); the long-term fine-tune (`--finetune-epochs`, 1 by default) is not part of it.",
    ]
    body = "\n".join(lines)
    print(body)
    if not no_write:
        write_section("bench_netadapt", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
