"""The end of every search: prune by the best policy, fine-tune, measure, report."""

from __future__ import annotations

import time

from autoprune.costs import count_cost, format_count, policy_channels
from autoprune.evaluation import PolicyEvaluator
from autoprune.export import save_pruned_model
from autoprune.io import atomic_write_text
from autoprune.runs import Run
from autoprune.train import TrainConfig, evaluate, train


def finish_run(run: Run, evaluator: PolicyEvaluator, policy: dict, *, finetune: TrainConfig, budget, lut=None,
               search_seconds: float = 0.0, search_breakdown: dict | None = None, progress: bool = True) -> dict:
    """Apply `policy` to the base model, recalibrate BN, fine-tune, evaluate, and write the
    model, metrics, keep-ratio plot and report into the run directory.

    `search_breakdown` splits `search_seconds` (e.g. prune, BN recalibration, validation,
    agent); it is reported as given."""
    data, description = evaluator.data, evaluator.description
    shape = data.input_shape
    base_model = evaluator.pruner.model
    channels = policy_channels(description, policy, evaluator.config.channel_multiple)
    base_cost, cost = count_cost(description), count_cost(description, channels)

    pruned = evaluator.prune(policy)
    val_before = evaluate(pruned, data, "val")["accuracy"]
    test_before = evaluate(pruned, data, "test")["accuracy"]
    started = time.perf_counter()
    history = train(pruned, data, finetune, state_path=run.state_dir / "finetune.state", progress=progress)
    finetune_seconds = time.perf_counter() - started
    metrics = {
        "budget": str(budget), "budget_metric": budget.metric,
        "base_flops": base_cost.flops, "flops": cost.flops, "flops_ratio": cost.flops / base_cost.flops,
        "base_params": base_cost.params, "params": cost.params, "params_ratio": cost.params / base_cost.params,
        "base_val_accuracy": evaluate(base_model, data, "val")["accuracy"],
        "base_test_accuracy": evaluate(base_model, data, "test")["accuracy"],
        "val_accuracy_before_finetune": val_before, "test_accuracy_before_finetune": test_before,
        "val_accuracy": evaluate(pruned, data, "val")["accuracy"],
        "test_accuracy": evaluate(pruned, data, "test")["accuracy"],
        "finetune_epochs": finetune.epochs, "finetune_seconds": round(finetune_seconds, 1),
        "search_seconds": round(search_seconds, 1), "candidate_evaluations": evaluator.evaluations,
        "policy": policy, "channels": channels, "finetune_history": history,
    }
    if search_breakdown:
        metrics["search_breakdown_seconds"] = {key: round(value, 1) for key, value in search_breakdown.items()}
    if lut is not None:
        metrics["lut_latency_ms_base"] = lut.predict_ms(description)
        metrics["lut_latency_ms"] = lut.predict_ms(description, channels)
        metrics["lut_latency_ratio"] = metrics["lut_latency_ms"] / metrics["lut_latency_ms_base"]
    save_pruned_model(pruned, run.path / "model.pt2", shape, meta={k: v for k, v in metrics.items()
                                                                   if k != "finetune_history"})
    run.write_metrics(metrics)
    run.plot_keep_ratios(policy, channels, f"{run.config.get('agent', '')} at {budget}: "
                                           f"{100 * metrics['flops_ratio']:.1f} % FLOPs, test "
                                           f"{100 * metrics['test_accuracy']:.2f} %")
    atomic_write_text(run.path / "report.md", _report(run, metrics))
    return metrics


def _report(run: Run, m: dict) -> str:
    config = run.config
    lines = [
        f"# {config.get('agent', 'search')} at {m['budget']}",
        "",
        "FLOPs are multiply-accumulates (MACs) of convolution and linear layers.",
        "",
        f"- model: {config.get('model_name', '')}, data: {config.get('data', '')}, seed {config.get('seed', '')}",
        f"- FLOPs: {format_count(m['base_flops'])} -> {format_count(m['flops'])} ({100 * m['flops_ratio']:.1f} %)",
        f"- params: {format_count(m['base_params'])} -> {format_count(m['params'])} "
        f"({100 * m['params_ratio']:.1f} %)",
    ]
    if "lut_latency_ms" in m:
        lines.append(f"- latency (LUT): {m['lut_latency_ms_base']:.3f} ms -> {m['lut_latency_ms']:.3f} ms "
                     f"({100 * m['lut_latency_ratio']:.1f} %)")
    lines += [
        f"- validation accuracy: unpruned {100 * m['base_val_accuracy']:.2f} %, pruned before fine-tuning "
        f"(BN recalibrated) {100 * m['val_accuracy_before_finetune']:.2f} %, after "
        f"{100 * m['val_accuracy']:.2f} %",
        f"- test accuracy: unpruned {100 * m['base_test_accuracy']:.2f} %, pruned after {m['finetune_epochs']} "
        f"fine-tuning epoch(s) {100 * m['test_accuracy']:.2f} %",
        f"- search {m['search_seconds']:.0f} s ({m['candidate_evaluations']} candidates evaluated), "
        f"fine-tuning {m['finetune_seconds']:.0f} s",
    ]
    if "search_breakdown_seconds" in m:
        lines.append("- search time: " + ", ".join(f"{key.replace('_', ' ')} {value:.0f} s"
                                                 for key, value in m["search_breakdown_seconds"].items()))
    lines += [
        "",
        "Files: `model.pt2` (the pruned network; `torch.export.load(path).module()`), `best_policy.json`, "
        "`history.csv`, `metrics.json`, `keep_ratios.png`.",
        "",
    ]
    return "\n".join(lines)
