"""Every agent at a latency budget on this CPU, at equal training, over seeds.

One `autoprune search` per agent and seed into `--out` (resumable: a repeated command
resumes unfinished runs and skips finished ones). NetAdapt runs first for each seed: its
network carries the SGD steps of its short-term fine-tunes, and every other agent of
that seed is then fine-tuned with `--equal-steps` set to NetAdapt's total, so all agents
of a seed have had the same number of SGD steps after pruning. The report gives, per
agent, mean ± sd over the seeds of the FLOPs kept, the LUT's and the measured latency
(in a fresh process on this CPU, as a share of the unpruned network's), validation
accuracy before fine-tuning, test accuracy as run and at equal training, and the margins
over uniform and over Torch-Pruning's global pruning with the same seed; and a plot of
test accuracy against measured latency with every seed.

    taskset -c 0 python bench/bench_latency_budget.py --lut latency_luts/FILE.json &
    taskset -c 1 python bench/bench_latency_budget.py --lut latency_luts/FILE.json &
    python bench/bench_latency_budget.py --lut latency_luts/FILE.json --measure --report

`--measure` times every finished run's network again, all of them and the unpruned one
in one process, in rounds (each network back to back within a round, the order rotating,
the fastest round kept), and all that `--passes` times over, each network's ratio to the
unpruned one being the median of its passes': run it with nothing else on the machine. The
runs' own measurements are taken as each run ends, while the other worker trains on the
other core; on a shared virtual machine those are not worth much (BENCHMARKS.md).

`--record DIR` keeps what the report and `--measure` need of every finished run (its
config.json and metrics.json) and the quiet measurement in DIR, a directory under version
control, and brings recorded runs back into `--out` when they are missing there: run
directories hold checkpoints and are not kept, so without a record a fresh clone starts
the bench over. Finished runs are recorded as they end; a run cut short is searched again.

Options it does not know go to `autoprune search` as they are (`--model`, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from autoprune.io import atomic_write_bytes, atomic_write_text
from autoprune.latency import describe_device, device_slug, load_lut, same_device, slug, this_device

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import write_section  # noqa: E402

AGENTS = "netadapt,ddpg,uniform,tp_global,random"


def run_dir(out: Path, agent: str, seed: int) -> Path:
    return out / f"{agent}-s{seed}"


def finished(path: Path) -> bool:
    return (path / "metrics.json").is_file()


RECORDED = ("config.json", "metrics.json")  # all the report and --measure read of a run
QUIET = "measured.json"


def copy_file(source: Path, target: Path) -> None:
    """Copy a file so that a reader never sees half of it (two workers may copy at once)."""
    atomic_write_bytes(target, source.read_bytes())


def copy_finished_runs(source: Path, target: Path) -> list[str]:
    """Copy the recorded files of every run finished in `source` but not in `target`;
    returns the names of the runs copied."""
    copied = []
    for run in sorted(p.parent for p in source.glob("*/metrics.json")):
        if not finished(target / run.name):
            for name in RECORDED:
                copy_file(run / name, target / run.name / name)
            copied.append(run.name)
    return copied


def sync_record(out: Path, record: Path | None) -> None:
    """Copy every finished run of `out` the record lacks into it, and every recorded run
    `out` lacks (or holds unfinished) into `out`; likewise the quiet measurement, the newer
    file winning."""
    if record is None:
        return
    copy_finished_runs(out, record)
    for name in copy_finished_runs(record, out):
        print(f"{name}: restored from {record}", file=sys.stderr)
    mine, kept = out / QUIET, record / QUIET
    if mine.is_file() and (not kept.is_file() or mine.stat().st_mtime > kept.stat().st_mtime):
        copy_file(mine, kept)
    elif kept.is_file() and not mine.is_file():
        copy_file(kept, mine)


def labelled(entry: str) -> tuple[str, str]:
    """(label, agent) of an `--agents` entry: `LABEL=AGENT` names a variant (its run
    directories and its row), a bare agent is its own label."""
    label, _, agent = entry.rpartition("=")
    return label or agent, agent


def search(args, passthrough: list[str], entry: str, seed: int, equal_steps: int) -> None:
    label, agent = labelled(entry)
    path = run_dir(Path(args.out), label, seed)
    if finished(path):
        return
    if path.is_dir():
        command = ["search", "--resume", str(path), "--quiet"]
    else:
        command = ["search", "--agent", agent, "--budget", args.budget, "--lut", args.lut, "--seed", str(seed),
                   "--finetune-epochs", str(args.finetune_epochs), "--equal-steps", str(equal_steps),
                   "--out", str(path), "--quiet", *passthrough]
    # one process per run: its threads are pinned, and a crash in one run leaves the others alone
    env_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = subprocess.call([sys.executable, "-m", "autoprune.cli", *command], env={**os.environ, **env_threads})
    if code != 0:
        print(f"{label} seed {seed}: exit {code}", file=sys.stderr)


def equal_steps_of(out: Path, seed: int, wait: bool) -> int | None:
    """NetAdapt's total SGD steps since pruning for this seed (waits for its run if asked)."""
    metrics = run_dir(out, "netadapt", seed) / "metrics.json"
    while not metrics.is_file():
        if not wait:
            return None
        time.sleep(10)
    return int(json.loads(metrics.read_text())["training"]["total_steps"])


def claim(out: Path, agent: str, seed: int) -> bool:
    """Take a job for this process: True when no live process holds it (a claim left by a
    process that has ended is taken over)."""
    claims = out / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{agent}-s{seed}"
    # the claim appears with its PID already in it (written aside, then linked into place,
    # which fails when the name exists), so a claim is never seen half-written
    aside = claims / f".{agent}-s{seed}.{os.getpid()}"
    aside.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(aside, path)
                return True
            except FileExistsError:
                try:
                    holder = int(path.read_text())
                    os.kill(holder, 0)
                    return holder == os.getpid()
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # its process has ended: take it over
        return False
    finally:
        aside.unlink(missing_ok=True)


def work(args, passthrough: list[str]) -> None:
    """Run the jobs in order, each by whichever worker (a process running this command) gets
    to it first; `OUT/claims` says which process holds which job."""
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    agents = args.agents.split(",")
    # NetAdapt first, every seed (the others need its steps); then seed by seed, so that a
    # bench cut short has whole seeds to compare rather than every seed of a few agents
    first = [entry for entry in agents if labelled(entry)[1] == "netadapt"]
    jobs = [(entry, seed) for entry in first for seed in seeds]
    jobs += [(entry, seed) for seed in seeds for entry in agents if entry not in first]
    for entry, seed in jobs:
        label, agent = labelled(entry)
        if finished(run_dir(out, label, seed)) or not claim(out, label, seed):
            continue
        steps = 0 if agent == "netadapt" else equal_steps_of(out, seed, wait=True)
        search(args, passthrough, entry, seed, steps)
        sync_record(out, args.record)


def check_device(table) -> None:
    """Searching, timing or reporting on another CPU than the table's would put two CPUs'
    latencies in one comparison (the runs' own timings, the latency fit, the quiet pass) or
    name the wrong CPU over it: refuse."""
    if not same_device(table.data.get("device")):
        raise SystemExit(f"the LUT was measured on {describe_device(table.data.get('device'))} and this machine is "
                         f"{this_device()}: run, measure and report this bench on the LUT's CPU")


def mean_sd(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


BASE_KEYS = ("model", "weights", "data", "image_size", "data_dir", "val_size")


def base_inputs(paths: list[Path]):
    """The unpruned model and data the runs under one output directory were searched from
    (they must all name the same: one table, one base)."""
    from autoprune.pipeline.settings import settings_from_saved
    from autoprune.pipeline.stages import load_inputs

    configs = {p.name: json.loads((p / "config.json").read_text()) for p in paths}
    first, *_ = configs.values()
    for name, config in configs.items():
        differ = [k for k in BASE_KEYS if config.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{name} was searched from another base ({', '.join(differ)} differ); "
                             "give each model its own --out")
    return load_inputs(settings_from_saved(first), download=False)


def runtime_words(runtime: dict) -> str:
    """'torch eager, 1 thread, batch 1' for a table's runtime record."""
    name = {"torch": "torch eager", "torch-cuda": "torch eager on the GPU"}.get(runtime["backend"], runtime["backend"])
    threads = runtime["threads"]
    return f"{name}, {threads} thread{'s' if threads != 1 else ''}, batch {runtime.get('batch', 1)}"


def measure(args, table) -> None:
    """Time every finished run's network (the base model cut to its channel counts: latency
    depends on the counts alone) in turn with the unpruned one; writes OUT/measured.json."""
    from autoprune.latency import backend_for, measure_networks, median_timing, timing_conditions
    from autoprune.pruning import ChannelPruner

    out = Path(args.out)
    paths = sorted(p.parent for p in out.glob("*/metrics.json"))
    if not paths:
        raise SystemExit(f"no finished runs under {out}")
    inputs = base_inputs(paths)
    shape = inputs.data.input_shape
    pruner = ChannelPruner(inputs.model, shape)
    networks = [inputs.model] + [pruner.prune(json.loads((p / "metrics.json").read_text())["policy"]) for p in paths]
    runtime = table.runtime  # the table's own runtime, threads and batch
    passes = []
    with timing_conditions(runtime["threads"]):
        for _ in range(args.passes):
            passes.append(measure_networks(backend_for(runtime), networks, shape, runtime.get("batch", 1), warmup=20,
                                           runs=100, rounds=5))
    # per network, the pass with the median ratio to that pass's unpruned time (as the runs' own timings count)
    chosen = [median_timing([[ms[0], ms[i]] for ms in passes]) for i in range(1, len(networks))]
    base_ms = statistics.median(ms[0] for ms in passes)
    result = {"device": this_device(), "date": datetime.date.today().isoformat(), "base_ms": base_ms,
              "protocol": f"{runtime_words(runtime)}, pinned; each network back to back within a round (20 "
                          "untimed and 100 timed calls), the order rotating, minimum over 5 rounds of the per-round "
                          f"median; {args.passes} such passes, each network's ratio the median of its passes'",
              "passes": [list(ms) for ms in passes],
              "runs": {p.name: {"ms": m, "ratio": m / b} for p, (b, m) in zip(paths, chosen)}}
    atomic_write_text(out / QUIET, json.dumps(result, indent=2) + "\n")
    sync_record(out, args.record)
    print(f"unpruned {base_ms:.3f} ms; " + ", ".join(f"{p.name} {m / b:.3f}" for p, (b, m) in zip(paths, chosen)))


def report(args, passthrough: list[str], table) -> int:
    out = Path(args.out)
    runs: dict[str, dict[int, dict]] = {}
    quiet = json.loads((out / QUIET).read_text()) if (out / QUIET).is_file() else None
    labels = [labelled(entry)[0] for entry in args.agents.split(",")]
    for agent in labels:
        for seed in (int(s) for s in args.seeds.split(",")):
            path = run_dir(out, agent, seed)
            if finished(path):
                metrics = json.loads((path / "metrics.json").read_text())
                if quiet is not None and path.name in quiet["runs"]:
                    metrics["quiet_latency_ratio"] = quiet["runs"][path.name]["ratio"]
                runs.setdefault(agent, {})[seed] = metrics
    if not runs:
        print("no finished runs under", out, file=sys.stderr)
        return 1
    budget_ratio = float(args.budget.split("%")[0]) / 100
    latency_budget = args.budget.lower().endswith("latency")
    config = json.loads((run_dir(out, *next((a, s) for a, d in runs.items() for s in d)) / "config.json").read_text())
    options = "".join(f" {o}" for o in ([f"--agents {args.agents}"] if args.agents != AGENTS else []) + passthrough)
    base_name = f"Model: {config.get('model_name') or config.get('model')}, data: {config.get('data')}"
    # the default model goes unnamed in the section's key (as it always did); any other model
    # names it, so that its table never replaces the default model's at the same budget
    model_tag = "" if not config.get("model") else slug(Path(str(config["model"])).stem)

    def margin(agent: str, other: str, key: str) -> str:
        pairs = [100 * (m[key] - runs[other][s][key]) for s, m in runs.get(agent, {}).items()
                 if s in runs.get(other, {})]
        if not pairs or agent == other:
            return ""
        return f"{statistics.mean(pairs):+.2f} ({min(pairs):+.2f} to {max(pairs):+.2f})"

    lines = [
        f"## Every agent at {args.budget}, equal training, on {this_device()}"
        + (f", {model_tag}" if model_tag else "") + (f" ({args.tag})" if args.tag else ""),
        "",
        f"`python bench/bench_latency_budget.py --lut {args.lut} --budget {args.budget} --seeds {args.seeds} "
        f"--finetune-epochs {args.finetune_epochs}{options}` (two workers, one thread each) on {this_device()}, torch "
        f"{torch.__version__}, {datetime.date.today().isoformat()}. LUT built on "
        f"{describe_device(table.data.get('device'))}. {base_name}. Each network is "
        f"BN-recalibrated and fine-tuned for {args.finetune_epochs} epoch(s) (SGD, lr 0.01, cosine, batch 256); "
        "at equal training every network but NetAdapt's is first trained for as many SGD steps (batch 64, cosine) "
        "as NetAdapt's short-term fine-tunes gave its network with the same seed, then given the same fine-tune: "
        "every agent of a seed has had the same number of SGD steps after pruning and ends with the same "
        "annealed fine-tune; *as run* is the fine-tune alone. Mean ± sd over the seeds. Latency as a share of the unpruned network's; measured: timed in a "
        f"fresh process on this CPU, {runtime_words(table.runtime)}, pruned and unpruned in turn. Margins: test "
        "accuracy at equal training minus that of uniform / Torch-Pruning global with the same seed, mean (min "
        "to max).",
        "",
        "*Measured, quiet*: every network timed again afterwards, all in turn in one process with nothing else "
        "running (`--measure`"
        + (f", {quiet['date']} on {quiet['device']}, unpruned {quiet['base_ms']:.3f} ms" if quiet else ", not run")
        + (f", each ratio the median of {len(quiet['passes'])} passes" if quiet and "passes" in quiet else "")
        + "); *measured at run end*: timed as each run ended, while the other worker trained.",
        "",
        "| agent | seeds | FLOPs kept (%) | LUT latency (%) | measured, quiet (%) | measured at run end (%) "
        "| val before FT (%) | test as run (%) | test, equal training (%) | SGD steps | vs uniform (pp) "
        "| vs TP global (pp) | search (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for agent in labels:
        done = runs.get(agent, {})
        if not done:
            lines.append(f"| {agent} | 0 | | | | | | | | | | | |")
            continue
        ms = list(done.values())
        lines.append(
            f"| {agent} | {len(ms)} | {mean_sd([m['flops_ratio'] for m in ms], digits=1)} | "
            f"{mean_sd([m['lut_latency_ratio'] for m in ms], digits=1)} | "
            f"{mean_sd([m['quiet_latency_ratio'] for m in ms if 'quiet_latency_ratio' in m], digits=1)} | "
            f"{mean_sd([m['measured_latency_ratio'] for m in ms], digits=1)} | "
            f"{mean_sd([m['val_accuracy_before_finetune'] for m in ms])} | "
            f"{mean_sd([m['test_accuracy_as_run'] for m in ms])} | {mean_sd([m['test_accuracy'] for m in ms])} | "
            f"{', '.join(str(m['training']['total_steps']) for m in ms)} | "
            f"{margin(agent, 'uniform', 'test_accuracy')} | {margin(agent, 'tp_global', 'test_accuracy')} | "
            f"{statistics.mean(m['search_seconds'] for m in ms):.0f} |")
    key = "quiet_latency_ratio" if quiet else "measured_latency_ratio"
    ratios = [m[key] for done in runs.values() for m in done.values() if key in m]
    if latency_budget:
        within = [abs(r - budget_ratio) / budget_ratio <= 0.03 for r in ratios]
        window = [budget_ratio - 0.03 <= r <= budget_ratio for r in ratios]
        lines += ["", f"Measured latency ({'quiet' if quiet else 'at run end'}) within 3 % of the budget: "
                      f"{sum(within)} of {len(within)} networks; in [budget - 3 points, budget]: {sum(window)} of "
                      f"{len(window)} (range {100 * min(ratios):.1f}-{100 * max(ratios):.1f} %)."]
    else:
        metric = args.budget.split("%")[1].lower()
        kept = [m[f"{metric}_ratio"] for done in runs.values() for m in done.values() if f"{metric}_ratio" in m]
        within = [abs(r - budget_ratio) / budget_ratio <= 0.03 for r in kept]
        resource = {"flops": "FLOPs", "params": "Parameters"}.get(metric, metric)
        lines += ["", f"{resource} kept within 3 % of the budget: {sum(within)} of {len(within)} networks (range "
                      f"{100 * min(kept):.1f}-{100 * max(kept):.1f} %); measured latency "
                      f"({'quiet' if quiet else 'at run end'}) {100 * min(ratios):.1f}-{100 * max(ratios):.1f} % "
                      "of the unpruned network's."]
    body = "\n".join(lines)
    print(body)
    plot(runs, out / "accuracy_vs_measured_latency.png", budget_ratio if latency_budget else None)
    if not args.no_write:
        # one section and plot per budget, CPU and model: figures from two CPUs never share a table
        tag = (f"{args.budget.replace('%', 'p')}-{device_slug()}" + (f"-{model_tag}" if model_tag else "")
               + (f"-{slug(args.tag)}" if args.tag else ""))
        write_section(f"bench_latency_budget_{tag}", body)
        target = ROOT / "bench" / "results" / f"latency-budget-{tag}.png"
        target.write_bytes((out / "accuracy_vs_measured_latency.png").read_bytes())
    return 0


def plot(runs: dict[str, dict[int, dict]], path: Path, budget_ratio: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for agent, done in runs.items():
        x = [100 * m.get("quiet_latency_ratio", m["measured_latency_ratio"]) for m in done.values()]
        y = [100 * m["test_accuracy"] for m in done.values()]
        ax.scatter(x, y, label=agent, alpha=0.8)
    if budget_ratio is not None:  # a latency budget: where the networks should land
        ax.axvline(100 * budget_ratio, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("measured latency, % of the unpruned network")
    ax.set_ylabel("test accuracy at equal training, %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lut", required=True)
    parser.add_argument("--agents", default=AGENTS, help="comma-separated; LABEL=AGENT runs a variant (options "
                                                        "after the known ones go to its searches) under its own label")
    parser.add_argument("--budget", default="50%latency")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--out", default="runs/bench-latency-budget")
    parser.add_argument("--report", action="store_true", help="only summarise the finished runs")
    parser.add_argument("--measure", action="store_true",
                        help="time every finished run's network again first (nothing else may run)")
    parser.add_argument("--passes", type=int, default=3,
                        help="with --measure: timing passes over all networks; each network's ratio is the median")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--record", type=Path, default=None,
                        help="keep every finished run's config.json and metrics.json and the quiet measurement "
                             "here (a directory under version control), and restore recorded runs into --out")
    parser.add_argument("--tag", default="", help="suffix of the BENCHMARKS section and plot, for a variant of "
                                                  "the protocol")
    args, passthrough = parser.parse_known_args()
    sync_record(Path(args.out), args.record)
    table = load_lut(args.lut)
    check_device(table)
    if not args.report and not args.measure:
        work(args, passthrough)
    if args.measure:
        measure(args, table)
    return report(args, passthrough, table)


if __name__ == "__main__":
    sys.exit(main())
