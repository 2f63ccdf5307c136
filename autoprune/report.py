"""The end of every search: prune by the best policy, fine-tune, measure, report."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import torch.nn as nn

from autoprune.costs import count_cost, format_count, policy_channels
from autoprune.errors import AutopruneError
from autoprune.evaluation import PolicyEvaluator
from autoprune.export import save_pruned_model
from autoprune.io import atomic_write_text, model_from_bytes, model_to_bytes
from autoprune.runs import Run
from autoprune.train import TrainConfig, epoch_steps, evaluate, recalibrate_bn, recalibration_note, train

log = logging.getLogger(__name__)

LATENCY_TARGET_MS = 300.0  # timed calls per network and pass are sized to take about this long
LATENCY_RUNS = (20, 200)  # fewest and most timed calls per network and pass
LATENCY_WARMUP = 20  # untimed calls per network before each pass
LATENCY_ROUNDS = 5  # passes over the networks; each keeps its fastest


def measure_latency(models: list[nn.Module], input_shape: tuple[int, int, int], lut=None) -> dict:
    """Whole-network latency (ms) of each model on this machine, timed in a fresh process.

    See `measure_latency_here` for the protocol and the result; `LatencyWorker` for why
    a separate process.
    """
    with LatencyWorker(input_shape, lut) as worker:
        return worker.measure(models)


def _measure_in_worker(payload: list[bytes], input_shape: tuple[int, int, int], lut) -> dict:
    return measure_latency_here([model_from_bytes(data).eval() for data in payload], input_shape, lut)


class LatencyWorker:
    """Times whole networks in a spawned process that does nothing else.

    A process that has been training times networks wrongly: after NetAdapt's short-term
    fine-tunes the unpruned ResNet-20 timed there at 3.30 ms and a pruned one at 1.35 ms,
    against 1.45 and 0.96 ms in a fresh process; after one epoch of fine-tuning a network
    timed 0.79 ms in place and 0.76 ms fresh. A fresh worker, started once and reused
    (calling the object gives the milliseconds, as a NetAdapt meter), avoids that. A model
    whose class the worker cannot import is timed in this process instead, and the
    settings say so.
    """

    def __init__(self, input_shape: tuple[int, int, int], lut=None):
        self.input_shape, self.lut = tuple(input_shape), lut
        self._pool = None

    def measure(self, models: list[nn.Module]) -> dict:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            payload = [model_to_bytes(model) for model in models]
            result = self._pool.submit(_measure_in_worker, payload, self.input_shape, self.lut).result()
        except (pickle.PicklingError, AttributeError, ImportError, TypeError, BrokenProcessPool) as exc:
            # the model does not travel, or the worker cannot start (e.g. a calling script without a
            # `if __name__ == "__main__":` guard)
            self.close()
            result = measure_latency_here(models, self.input_shape, self.lut)
            result["settings"]["process"] = (f"this one (timing in a separate process failed: "
                                             f"{type(exc).__name__}: {exc})")
            return result
        result["settings"]["process"] = "a fresh one"
        return result

    def __call__(self, models: list[nn.Module]) -> list[float]:
        return [float(ms) for ms in self.measure(models)["ms"]]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> LatencyWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_latency_here(models: list[nn.Module], input_shape: tuple[int, int, int], lut=None) -> dict:
    """Whole-network latency (ms) of each model, timed in this process, in a few seconds.

    With a LUT, the networks run on its runtime with its threads and batch size; without
    one, or when this machine lacks that runtime, under torch eager with 1 thread and
    batch 1. The calling thread is pinned to as many CPUs as the runtime has threads
    while it times (and unpinned after), and the passes go over all networks in turn, so
    networks timed in one call are compared under the same conditions. Returns
    {"ms": [...], "settings": {...}}; the settings say what was used and on which CPU,
    and whether that CPU is the one the LUT was measured on.
    """
    from autoprune.latency import (describe_device, get_backend, measure_networks, pin_process, same_device,
                                   this_device, time_runs)

    backend_name, threads, batch, options, note = "torch", 1, 1, {}, None
    if lut is not None:
        runtime = lut.runtime
        backend_name, threads, batch = runtime["backend"], runtime["threads"], runtime.get("batch", 1)
        if "graph_optimization" in runtime:
            options["optimization"] = runtime["graph_optimization"]
    saved_threads = torch.get_num_threads()
    saved_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        try:
            backend = get_backend(backend_name, threads, **options)
        except AutopruneError as exc:
            note = f"the LUT's runtime is not usable here ({exc}); measured under torch eager instead"
            log.warning(note)
            backend_name, threads, batch = "torch", 1, 1
            backend = get_backend("torch", 1)
        shape = (batch, *input_shape)
        pin_process(threads)
        probe_ms = time_runs(backend.runner(models[0], shape), 2, 3)
        runs = int(min(LATENCY_RUNS[1], max(LATENCY_RUNS[0], LATENCY_TARGET_MS / max(probe_ms, 1e-3))))
        measured = measure_networks(backend, models, input_shape, batch, warmup=LATENCY_WARMUP, runs=runs,
                                    rounds=LATENCY_ROUNDS)
    finally:
        torch.set_num_threads(saved_threads)
        if saved_cpus is not None:
            os.sched_setaffinity(0, saved_cpus)
    lut_device = (lut.data.get("device") or {}) if lut is not None else None
    settings = {"backend": backend_name, "threads": threads, "batch": batch, **options, "warmup": LATENCY_WARMUP,
                "runs": runs, "rounds": LATENCY_ROUNDS, "pinned": saved_cpus is not None,
                "statistic": "minimum over rounds of the median of runs",
                "measured_on": this_device(),
                "lut_device": None if lut is None else describe_device(lut_device),
                "on_lut_device": None if lut is None else same_device(lut_device)}
    if note:
        settings["note"] = note
    return {"ms": measured, "settings": settings}


def finish_run(run: Run, evaluator: PolicyEvaluator, policy: dict, *, finetune: TrainConfig, budget, lut=None,
               search_seconds: float = 0.0, search_breakdown: dict | None = None, progress: bool = True,
               model: nn.Module | None = None, search_result: dict | None = None,
               candidate_evaluations: int | None = None, equal_steps: int = 0) -> dict:
    """Apply `policy` to the base model, recalibrate BN, fine-tune, evaluate, time, and
    write the model, metrics, keep-ratio plot and report into the run directory.

    `model`, when given, is the pruned network the search already built (NetAdapt's,
    short-term fine-tuned): it is long-term fine-tuned instead of pruning the base model
    again; its BN statistics are still recalibrated before the "before fine-tuning"
    accuracy is measured. `search_breakdown` splits `search_seconds` (e.g. prune, BN
    recalibration, validation, agent); it is reported as given. `search_result` holds the
    searcher's own figures (threshold, iterations, stop reason, ...); its JSON-safe scalars
    go into the metrics under "search". `candidate_evaluations` defaults to the evaluator's
    count (a searcher that scores candidates itself, as NetAdapt does, passes its own).

    Equal training: the network's SGD steps since pruning are recorded ("training": those
    the search gave it, `search_result["training_steps"]`, plus the fine-tune's). With
    `equal_steps` above that total, the fine-tuned network is measured ("as run"), then
    trained on for the missing steps (batch EXTRA_BATCH_SIZE, cosine from the fine-tune's
    learning rate) and measured again, so that runs of different searchers compare at the
    same amount of training.
    """
    from autoprune.pruning import describe_network

    data, description = evaluator.data, evaluator.description
    shape = data.input_shape
    base_model = evaluator.pruner.model
    channels = policy_channels(description, policy, evaluator.config.channel_multiple)
    base_cost, cost = count_cost(description), count_cost(description, channels)

    if model is None:
        pruned = evaluator.prune(policy)
    else:
        pruned = model
        recalibrate_bn(pruned, data, num_batches=evaluator.config.bn_batches,
                       batch_size=evaluator.config.bn_batch_size, seed=evaluator.config.seed)
    counted = count_cost(describe_network(pruned, shape))
    if counted != cost:
        log.warning("the pruned network counts %d FLOPs and %d params, the policy's accounting %d and %d; "
                    "reporting the counted figures", counted.flops, counted.params, cost.flops, cost.params)
        cost = counted
    val_before = evaluate(pruned, data, "val")["accuracy"]
    test_before = evaluate(pruned, data, "test")["accuracy"]
    started = time.perf_counter()
    history = train(pruned, data, finetune, state_path=run.state_dir / "finetune.state", progress=progress)
    finetune_seconds = time.perf_counter() - started
    search_steps = int((search_result or {}).get("training_steps") or 0)
    training = {"search_steps": search_steps, "search_batch_size": (search_result or {}).get("training_batch_size"),
                "finetune_steps": finetune_steps(finetune, len(data.train)), "finetune_batch_size": finetune.batch_size,
                "extra_steps": 0, "extra_batch_size": EXTRA_BATCH_SIZE, "equal_steps": equal_steps}
    as_run = {"val_accuracy": evaluate(pruned, data, "val")["accuracy"],
              "test_accuracy": evaluate(pruned, data, "test")["accuracy"]}
    missing = equal_steps - search_steps - training["finetune_steps"]
    if equal_steps and missing > 0:
        epochs = math.ceil(missing / math.ceil(len(data.train) / EXTRA_BATCH_SIZE))
        extra = TrainConfig(epochs=epochs, batch_size=EXTRA_BATCH_SIZE, lr=finetune.lr, seed=finetune.seed + 1,
                            max_steps_per_epoch=math.ceil(missing / epochs))
        started_extra = time.perf_counter()
        history += train(pruned, data, extra, state_path=run.state_dir / "extra.state", progress=progress)
        finetune_seconds += time.perf_counter() - started_extra
        training["extra_steps"] = finetune_steps(extra, len(data.train))
    training["total_steps"] = search_steps + training["finetune_steps"] + training["extra_steps"]
    final = as_run if not training["extra_steps"] else {"val_accuracy": evaluate(pruned, data, "val")["accuracy"],
                                                          "test_accuracy": evaluate(pruned, data, "test")["accuracy"]}
    latency = measure_latency([base_model, pruned], shape, lut)
    evaluations = evaluator.evaluations if candidate_evaluations is None else candidate_evaluations
    metrics = {
        "agent": run.config.get("agent"), "budget": str(budget), "budget_metric": budget.metric,
        "base_flops": base_cost.flops, "flops": cost.flops, "flops_ratio": cost.flops / base_cost.flops,
        "base_params": base_cost.params, "params": cost.params, "params_ratio": cost.params / base_cost.params,
        "base_val_accuracy": evaluate(base_model, data, "val")["accuracy"],
        "base_test_accuracy": evaluate(base_model, data, "test")["accuracy"],
        "val_accuracy_before_finetune": val_before, "test_accuracy_before_finetune": test_before,
        "val_accuracy": final["val_accuracy"], "test_accuracy": final["test_accuracy"],
        "test_accuracy_as_run": as_run["test_accuracy"], "val_accuracy_as_run": as_run["val_accuracy"],
        "training": training,
        "recalibration_note": recalibration_note(pruned),
        "finetune_epochs": finetune.epochs, "finetune_seconds": round(finetune_seconds, 1),
        "search_seconds": round(search_seconds, 1), "candidate_evaluations": evaluations,
        "measured_latency_ms_base": latency["ms"][0], "measured_latency_ms": latency["ms"][1],
        "measured_latency_ratio": latency["ms"][1] / latency["ms"][0],
        "measured_latency_settings": latency["settings"], "measured_on": latency["settings"]["measured_on"],
        "policy": policy, "channels": channels, "finetune_history": history,
    }
    if search_breakdown:
        metrics["search_breakdown_seconds"] = {key: round(value, 1) for key, value in search_breakdown.items()}
    if search_result:
        metrics["search"] = {key: value for key, value in search_result.items()
                             if isinstance(value, (str, int, float, bool)) or value is None}
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


EXTRA_BATCH_SIZE = 64  # equal training's extra steps: the batch size of NetAdapt's short-term fine-tunes


def finetune_steps(config: TrainConfig, train_images: int) -> int:
    """SGD steps `train` takes with `config` on a training split of `train_images` images."""
    return config.epochs * epoch_steps(config, train_images)


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
        lines.append(f"- latency (measured here, {s['backend']}, {s['threads']} thread(s), batch {s['batch']}, "
                     f"on {where}): {m['measured_latency_ms_base']:.3f} ms -> {m['measured_latency_ms']:.3f} ms "
                     f"({100 * m['measured_latency_ratio']:.1f} %)")
    lines += [
        f"- validation accuracy: unpruned {100 * m['base_val_accuracy']:.2f} %, pruned before fine-tuning "
        f"(BN recalibrated) {100 * m['val_accuracy_before_finetune']:.2f} %, after "
        f"{100 * m['val_accuracy']:.2f} %",
        f"- test accuracy: unpruned {100 * m['base_test_accuracy']:.2f} %, pruned after {m['finetune_epochs']} "
        f"fine-tuning epoch(s) {100 * m.get('test_accuracy_as_run', m['test_accuracy']):.2f} %"
        + (f", after {m['training']['extra_steps']} more steps (equal training: {m['training']['total_steps']} "
           f"SGD steps since pruning) {100 * m['test_accuracy']:.2f} %"
           if m.get("training", {}).get("extra_steps") else ""),
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
        "Files: `model.pt2` (the pruned network; `torch.export.load(path).module()`), `best_policy.json`, "
        "`history.csv`, `metrics.json`, `keep_ratios.png`.",
        "",
    ]
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
