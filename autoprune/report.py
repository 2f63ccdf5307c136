"""The short human-readable report of a finished run (report.md)."""

from __future__ import annotations

from autoprune.costs import format_count
from autoprune.io import atomic_write_text
from autoprune.runs import Run


def write_report(run: Run, metrics: dict) -> str:
    """Write report.md into the run directory; returns its text."""
    text = _report(run, metrics)
    atomic_write_text(run.path / "report.md", text)
    return text


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
    if "measured_latency_ms" in m:
        s = m["measured_latency_settings"]
        where = s["measured_on"] + ("" if s.get("on_lut_device") in (None, True) else
                                    f", not the LUT's device ({s.get('lut_device')})")
        times = f"the median ratio of {s['timings']} timings, " if s.get("timings", 1) > 1 else ""
        lines.append(f"- latency (measured here, {s['backend']}, {s['threads']} thread(s), batch {s['batch']}, "
                     f"{times}on {where}): {m['measured_latency_ms_base']:.3f} ms -> {m['measured_latency_ms']:.3f} ms "
                     f"({100 * m['measured_latency_ratio']:.1f} %)")
    training = m.get("training", {})
    staged = training.get("stages", 1) > 1
    before = (f"cut in {training['stages']} stages, {training['stage_steps']} SGD steps in all between them"
              if staged else "BN recalibrated")
    lines += [
        f"- validation accuracy: unpruned {100 * m['base_val_accuracy']:.2f} %, pruned before fine-tuning "
        f"({before}) {100 * m['val_accuracy_before_finetune']:.2f} %, after "
        f"{100 * m['val_accuracy']:.2f} %",
        _test_line(m),
        *([f"- {m['recalibration_note']}"] if m.get("recalibration_note") else []),
        f"- search {m['search_seconds']:.0f} s ({m['candidate_evaluations']} candidates evaluated), "
        f"fine-tuning {m['finetune_seconds']:.0f} s",
    ]
    if m.get("search"):
        lines.append("- search result: " + ", ".join(f"{key.replace('_', ' ')} {_short(value)}"
                                                    for key, value in m["search"].items()))
    if "search_breakdown_seconds" in m:
        lines.append("- search time: " + ", ".join(f"{key.replace('_', ' ')} {value:.0f} s"
                                                 for key, value in m["search_breakdown_seconds"].items()))
    lines += [
        "",
        "Files: `model.pt` (the fine-tuned pruned network, trainable: `autoprune.load_model(path)`), `model.pt2` "
        "(for inference: `torch.export.load(path).module()`), `model.onnx` (when the onnx extra is installed), "
        "`best_policy.json`, `history.csv`, `metrics.json`, `keep_ratios.png`.",
        "",
    ]
    return "\n".join(lines)


def _test_line(m: dict) -> str:
    if m.get("test_accuracy") is None:
        return "- test accuracy: not measured (no test set given)"
    line = (f"- test accuracy: unpruned {100 * m['base_test_accuracy']:.2f} %, pruned after {m['finetune_epochs']} "
            f"fine-tuning epoch(s) {100 * m.get('test_accuracy_as_run', m['test_accuracy']):.2f} %")
    training = m.get("training", {})
    if training.get("extra_steps"):
        where = "before the fine-tune" if training.get("order") else "after the fine-tune"
        line += (f"; with {training['extra_steps']} more steps {where} (equal training: "
                 f"{training['total_steps']} SGD steps since pruning) {100 * m['test_accuracy']:.2f} %")
    return line


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
