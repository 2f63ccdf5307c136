"""Finished runs side by side: one table (CSV and Markdown) and three plots.

`autoprune compare RUN_DIR...` reads each run's config.json and metrics.json, refuses
runs that pruned different models or used different data sets, and writes

    comparison.csv, comparison.md    one row per run
    accuracy_vs_flops.png            test accuracy after fine-tuning vs FLOPs kept
    accuracy_vs_latency.png          the same vs measured latency (when measured)
    keep_ratios.png                  every run's per-group keep ratios in one chart

The Pareto front (no other run is both cheaper and more accurate) is marked in both
accuracy plots.

Training counts: NetAdapt's network carries the SGD steps of its short-term fine-tunes,
which other searchers' networks lack. Each run records its SGD steps since pruning; "test
acc as run" is the accuracy after the run's own fine-tune, "test acc after FT" the final
one (with `--equal-steps`' extra steps before the fine-tune, where given).
`check_equal_training` refuses a set of runs whose final figures rest on different amounts
of training, or on extra steps placed differently.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from autoprune.errors import AutopruneError
from autoprune.io import atomic_write_bytes, atomic_write_text
from autoprune.runs import CONFIG, METRICS

COLUMNS = ("run", "agent", "budget", "seed", "FLOPs (% of base)", "params (% of base)", "LUT latency (ms)",
           "measured latency (ms)", "val acc before FT (%)", "SGD steps since pruning", "test acc as run (%)",
           "test acc after FT (%)", "search (s)", "fine-tune (s)")


@dataclass
class RunRecord:
    """One finished run as compare sees it."""

    path: Path
    name: str  # how the run is labelled in tables and plots
    config: dict
    metrics: dict

    @property
    def agent(self) -> str:
        return str(self.metrics.get("agent") or self.config.get("agent") or "?")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutopruneError(f"cannot read {path} ({type(exc).__name__}): the file is damaged") from None
    if not isinstance(data, dict):
        raise AutopruneError(f"{path} does not hold a JSON object: the file is damaged")
    return data


def load_runs(paths: Iterable[str | os.PathLike]) -> list[RunRecord]:
    """Read finished runs; AutopruneError naming the run that is missing or unfinished,
    or the runs that differ in model or data."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise AutopruneError("name at least one run directory to compare")
    records = []
    for path in paths:
        if not (path / CONFIG).is_file():
            raise AutopruneError(f"{path} is not a run directory (no {CONFIG})")
        if not (path / METRICS).is_file():
            raise AutopruneError(f"run {path} is not finished; resume it with autoprune search --resume {path}")
        records.append(RunRecord(path=path, name=path.name, config=_read_json(path / CONFIG),
                                 metrics=_read_json(path / METRICS)))
    names = [r.name for r in records]
    for record in records:
        if names.count(record.name) > 1:
            record.name = str(record.path)
    check_comparable(records)
    return records


def _identity(record: RunRecord) -> dict[str, str]:
    config = record.config
    return {"model": str(config.get("model") or config.get("model_name") or "default"),
            "weights": str(config.get("weights") or "-"),
            "data": str(config.get("data")),
            "base FLOPs": str(record.metrics.get("base_flops"))}


def check_comparable(records: list[RunRecord]) -> None:
    """Refuse runs of different models or data sets, naming which runs differ in what."""
    problems = []
    for key in ("model", "weights", "data", "base FLOPs"):
        values: dict[str, list[str]] = {}
        for record in records:
            values.setdefault(_identity(record)[key], []).append(record.name)
        if len(values) > 1:
            problems.append(f"{key}: " + "; ".join(f"{value} ({', '.join(names)})" for value, names in values.items()))
    if problems:
        raise AutopruneError("these runs did not prune the same model on the same data, so they do not compare; "
                             "they differ in " + " | ".join(problems))


def check_equal_training(records: list[RunRecord]) -> int:
    """The SGD steps since pruning that every run had; AutopruneError naming the runs that do
    not record them, or the runs whose counts differ."""
    missing = [r.name for r in records if not isinstance(r.metrics.get("training"), dict)]
    if missing:
        raise AutopruneError(f"equal training cannot be checked: these runs do not record their SGD steps since "
                             f"pruning (written before autoprune counted them): {', '.join(missing)}; run those "
                             "searches again")
    totals: dict[int, list[str]] = {}
    for r in records:
        totals.setdefault(int(r.metrics["training"]["total_steps"]), []).append(r.name)
    if len(totals) > 1:
        largest = max(totals)
        raise AutopruneError("these runs had different amounts of training after pruning: " + "; ".join(
            f"{steps} SGD steps ({', '.join(names)})" for steps, names in sorted(totals.items())) +
            f"; search again with --equal-steps {largest} for equal training")
    extended = [r for r in records if r.metrics["training"].get("extra_steps")]
    appended = [r.name for r in extended if not r.metrics["training"].get("order")]
    if appended and len(appended) < len(extended):
        raise AutopruneError("these runs trained their extra steps after the fine-tune, at a restarted learning "
                             f"rate (written by an older autoprune), the others before it: {', '.join(appended)}; "
                             "delete their metrics.json and resume them to finish them again")
    return next(iter(totals))


def _pct(value) -> float:
    return round(100.0 * value, 2) if value is not None else math.nan


def _round(value, digits: int) -> float:
    return round(float(value), digits) if value is not None else math.nan


def comparison_table(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run, in the order given, with the columns of `COLUMNS`."""
    rows = []
    for r in records:
        m = r.metrics
        rows.append({
            "run": r.name, "agent": r.agent, "budget": m.get("budget", r.config.get("budget")),
            "seed": r.config.get("seed"),
            "FLOPs (% of base)": _pct(m.get("flops_ratio")), "params (% of base)": _pct(m.get("params_ratio")),
            "LUT latency (ms)": _round(m.get("lut_latency_ms"), 3),
            "measured latency (ms)": _round(m.get("measured_latency_ms"), 3),
            "val acc before FT (%)": _pct(m.get("val_accuracy_before_finetune")),
            "SGD steps since pruning": (m.get("training") or {}).get("total_steps"),
            "test acc as run (%)": _pct(m.get("test_accuracy_as_run", m.get("test_accuracy"))),
            "test acc after FT (%)": _pct(m.get("test_accuracy")),
            "search (s)": _round(m.get("search_seconds"), 1), "fine-tune (s)": _round(m.get("finetune_seconds"), 1),
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).replace("|", "\\|")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table, numbers right-aligned, missing values empty."""
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in table.columns]
    lines = ["| " + " | ".join(str(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def notes(records: list[RunRecord]) -> list[str]:
    """What a reader must know to read the table right."""
    m0 = records[0].metrics
    lines = ["FLOPs are multiply-accumulates (MACs) of convolution and linear layers."]
    base = f"unpruned model: test accuracy {_pct(m0.get('base_test_accuracy'))} %"
    if m0.get("measured_latency_ms_base") is not None:
        base += f", measured latency {m0['measured_latency_ms_base']:.3f} ms"
    if m0.get("lut_latency_ms_base") is not None:
        base += f", LUT latency {m0['lut_latency_ms_base']:.3f} ms"
    lines.append(base + ".")
    epochs = {r.metrics.get("finetune_epochs") for r in records}
    if len(epochs) > 1:
        lines.append("the runs were fine-tuned for different numbers of epochs: "
                     + ", ".join(f"{r.name} {r.metrics.get('finetune_epochs')}" for r in records) + ".")
    devices = {r.metrics.get("measured_on") for r in records if r.metrics.get("measured_latency_ms") is not None}
    if len(devices) > 1:
        lines.append("measured latencies come from different CPUs (" + ", ".join(sorted(map(str, devices)))
                     + ") and do not compare with each other.")
    settings = {json.dumps({k: v for k, v in (r.metrics.get("measured_latency_settings") or {}).items()
                            if k in ("backend", "threads", "batch")}, sort_keys=True)
                for r in records if r.metrics.get("measured_latency_ms") is not None}
    if len(settings) > 1:
        lines.append("measured latencies were taken with different runtimes or settings.")
    for r in records:
        s = r.metrics.get("measured_latency_settings") or {}
        if s.get("on_lut_device") is False:
            lines.append(f"{r.name}: latency measured on {s.get('measured_on')}, not on the LUT's device "
                         f"({s.get('lut_device')}); the LUT column is the one for the target.")
    missing = [r.name for r in records if r.metrics.get("measured_latency_ms") is None]
    if missing:
        lines.append("no measured latency (run finished by an older autoprune): " + ", ".join(missing) + ".")
    return lines


def pareto_front(costs: list[float], accuracies: list[float]) -> list[bool]:
    """For each point, whether no other point is at most as costly and at least as accurate,
    and strictly better in one of the two. Points with a missing value are never on it."""
    valid = [not (math.isnan(c) or math.isnan(a)) for c, a in zip(costs, accuracies)]
    front = []
    for i, (c, a) in enumerate(zip(costs, accuracies)):
        if not valid[i]:
            front.append(False)
            continue
        dominated = any(valid[j] and costs[j] <= c and accuracies[j] >= a and (costs[j] < c or accuracies[j] > a)
                        for j in range(len(costs)) if j != i)
        front.append(not dominated)
    return front


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(table: pd.DataFrame, cost_column: str, path: str | os.PathLike, *, xlabel: str,
                reference: tuple[float, float] | None = None) -> Path:
    """Test accuracy after fine-tuning against a cost column, one colour per agent, the
    Pareto front drawn as a line through its runs; `reference` is the unpruned model."""
    plt = _pyplot()
    costs = [float(v) for v in table[cost_column]]
    accuracies = [float(v) for v in table["test acc after FT (%)"]]
    front = pareto_front(costs, accuracies)
    agents = list(dict.fromkeys(table["agent"]))
    colours = {agent: f"C{i % 10}" for i, agent in enumerate(agents)}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for agent in agents:
        idx = [i for i, a in enumerate(table["agent"]) if a == agent]
        ax.scatter([costs[i] for i in idx], [accuracies[i] for i in idx], color=colours[agent], label=agent, s=36,
                   zorder=3)
    on_front = sorted((costs[i], accuracies[i]) for i in range(len(costs)) if front[i])
    if on_front:
        ax.plot([c for c, _ in on_front], [a for _, a in on_front], color="black", linewidth=1, linestyle="--",
                zorder=2, label="Pareto front")
        ax.scatter([c for c, _ in on_front], [a for _, a in on_front], facecolors="none", edgecolors="black",
                   s=110, zorder=4)
    for i, label in enumerate(table["budget"]):
        if not (math.isnan(costs[i]) or math.isnan(accuracies[i])):
            ax.annotate(f"{table['agent'][i]} {label}", (costs[i], accuracies[i]), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")
    if reference is not None and not any(math.isnan(v) for v in reference):
        ax.scatter([reference[0]], [reference[1]], marker="*", s=140, color="grey", label="unpruned", zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy after fine-tuning (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    _save_figure(fig, path)
    return path


def plot_keep_ratios(records: list[RunRecord], path: str | os.PathLike) -> Path:
    """Per-group keep ratios of every run, overlaid (groups in network order)."""
    plt = _pyplot()
    groups = list(records[0].config.get("groups") or records[0].metrics.get("policy", {}))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.4 * len(groups)), 4.2))
    for i, r in enumerate(records):
        policy = r.metrics.get("policy", {})
        ax.plot(range(len(groups)), [policy.get(g, 1.0) for g in groups], marker="o", markersize=3, linewidth=1,
                color=f"C{i % 10}", label=f"{r.name} ({r.agent}, {r.metrics.get('budget')})")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=75, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("keep ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    _save_figure(fig, path)
    return path


def new_comparison_dir(root: str | os.PathLike = "comparisons") -> Path:
    """comparisons/<UTC time>/ (not yet created; a suffix keeps it new)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{stamp}-{suffix}"
    return path


def write_comparison(records: list[RunRecord], out: str | os.PathLike) -> tuple[pd.DataFrame, str, list[Path]]:
    """Write the table (CSV, Markdown) and the plots into `out`; returns the table, the
    Markdown text and the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(records)
    markdown = "\n".join(["# Comparison", "", to_markdown(table)] + [f"- {line}" for line in notes(records)]) + "\n"
    written = [out / "comparison.csv", out / "comparison.md"]
    atomic_write_text(written[0], table.to_csv(index=False))
    atomic_write_text(written[1], markdown)
    m0 = records[0].metrics
    base_accuracy = _pct(m0.get("base_test_accuracy"))
    written.append(plot_pareto(table, "FLOPs (% of base)", out / "accuracy_vs_flops.png",
                               xlabel="FLOPs (MACs) kept (% of the unpruned model)",
                               reference=(100.0, base_accuracy)))
    if table["measured latency (ms)"].notna().any():
        base_ms = m0.get("measured_latency_ms_base")
        written.append(plot_pareto(table, "measured latency (ms)", out / "accuracy_vs_latency.png",
                                   xlabel="measured latency (ms)",
                                   reference=(base_ms if base_ms is not None else math.nan, base_accuracy)))
    written.append(plot_keep_ratios(records, out / "keep_ratios.png"))
    return table, markdown, written
