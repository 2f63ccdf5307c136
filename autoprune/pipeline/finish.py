"""The finishing stage of every search: the best policy becomes a network you can keep.

Prune the base model by the best policy (or take the searcher's own network), recalibrate
BatchNorm, fine-tune, measure accuracy and latency, export (a trainable `model.pt`, the
inference program `model.pt2`, `model.onnx` checked against torch), and write the
metrics, the keep-ratio plot and the report into the run directory.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch.nn as nn

from autoprune.budgets import Constraint
from autoprune.costs import count_cost, group_keep
from autoprune.errors import AutopruneError
from autoprune.evaluation import PolicyEvaluator
from autoprune.export import check_onnx, export_onnx, save_pruned_model, save_trainable
from autoprune.latency import PAIR_TIMINGS, measure_pair
from autoprune.report import write_report
from autoprune.runs import Run
from autoprune.pipeline.protocol import OwnSizes, SearcherResult
from autoprune.train import TrainConfig, epoch_steps, evaluate, recalibrate_bn, recalibration_note, train

log = logging.getLogger(__name__)

TRAINABLE_FILE, PROGRAM_FILE, ONNX_FILE = "model.pt", "model.pt2", "model.onnx"
ONNX_TOLERANCE = 1e-3  # largest |ONNX Runtime - torch| on the logits for the export to count as checked

EXTRA_BATCH_SIZE = 64  # equal training's extra steps: the batch size of NetAdapt's short-term fine-tunes
# where equal training's extra steps go: before the long-term fine-tune, as NetAdapt's short-term
# steps do (runs without this key in `training` appended them after it, at a restarted learning rate)
EQUAL_ORDER = "extra steps, then the fine-tune"


def finetune_steps(config: TrainConfig, train_images: int) -> int:
    """SGD steps `train` takes with `config` on a training split of `train_images` images."""
    return config.epochs * epoch_steps(config, train_images)


def _accuracy(model: nn.Module, data, split: str) -> float | None:
    """Accuracy on a split, None when the split is empty (a search given no test set)."""
    return evaluate(model, data, split)["accuracy"] if len(getattr(data, split)) else None


def finish_run(run: Run, evaluator: PolicyEvaluator, result: SearcherResult, constraint: Constraint, *,
               finetune: TrainConfig, equal_steps: int = 0, search_seconds: float = 0.0,
               progress: bool = True, onnx: bool = True, fit_latency: bool = False, stages: int = 1,
               stage_steps: int = 0) -> tuple[dict, nn.Module]:
    """Finish a search whose best policy is `result.policy`; returns (metrics, the network).

    `result.model`, when given, is the pruned network the search already built (NetAdapt's,
    short-term fine-tuned; Torch-Pruning's): it is long-term fine-tuned instead of pruning
    the base model again; its BN statistics are still recalibrated before the "before
    fine-tuning" accuracy is measured. `result.seconds` splits `search_seconds` (prune,
    BN recalibration, validation, agent); `result.details` (the searcher's own figures)
    goes into the metrics under "search".

    Equal training: the network's SGD steps since pruning are recorded ("training": those
    the search gave it, `result.training_steps`, plus the fine-tune's). With `equal_steps`
    above that total, a copy of the pruned network is fine-tuned and measured ("as run"),
    and the network itself is first trained for the missing steps (batch EXTRA_BATCH_SIZE,
    cosine from the fine-tune's learning rate), then given the same fine-tune and measured
    again: runs of different searchers compare at the same amount of training, each ending
    with the fine-tune's annealed schedule, as NetAdapt's network does after its short-term
    steps. (Steps appended after the fine-tune restart its learning rate: 40 of them took
    a network from 91.5 % to 90.4 %, BENCHMARKS.md.)

    `fit_latency`: on a latency budget, time the network on this machine and scale it
    until it measures within the budget's window (`autoprune.pipeline.fit`); the network
    fine-tuned is the one that fits, and "latency_fit" in the metrics says how it was found.

    `stages` > 1 (networks pruned from the base model): cut towards the plan in that many
    steps, `stage_steps` SGD steps (batch EXTRA_BATCH_SIZE) after each cut but the last,
    as NetAdapt does; those steps count as the search's in equal training.
    """
    from autoprune.pruning import describe_network

    data, description, lut = evaluator.data, evaluator.description, constraint.lut
    shape = data.input_shape
    base_model = evaluator.pruner.model
    policy, model, budget = result.policy, result.model, constraint.budget
    channels = dict(result.channels) or constraint.channels(policy)
    fit = None
    if fit_latency and budget.metric == "latency":
        channels, fit = _fit_latency(run, evaluator, constraint, channels, model, result.sizes)
        if fit.get("fitted") and channels != fit["steps"][0]["channels"]:
            policy = {g.name: channels[g.name] / g.channels for g in description.groups}
            if result.sizes is not None:
                model = _own_size(result.sizes, fit["steps"][fit["chosen"]]["factor"], channels)
            elif model is not None:
                model = _shrink(model, shape, fit["steps"][0]["channels"], channels)
    base_cost, cost = count_cost(description), count_cost(description, channels)

    staged = 0
    if model is None and stages > 1:
        pruned = _staged_prune(evaluator, channels, stages, stage_steps, finetune)
        staged = (stages - 1) * stage_steps
    elif model is None:
        pruned = evaluator.prune(policy)
    else:
        pruned = model.to(evaluator.config.device)
        recalibrate_bn(pruned, data, num_batches=evaluator.config.bn_batches,
                       batch_size=evaluator.config.bn_batch_size, seed=evaluator.config.seed)
    counted = count_cost(describe_network(copy.deepcopy(pruned).cpu(), shape))
    if counted != cost:
        # a searcher's own network may have chosen other channels of a group than the criterion
        # ranks first, which costs differently where the group spans branches of different cost
        (log.info if model is not None else log.warning)(
            "the pruned network counts %d FLOPs and %d params, the policy's accounting %d and %d; reporting the "
            "counted figures", counted.flops, counted.params, cost.flops, cost.params)
        cost = counted
    val_before = evaluate(pruned, data, "val")["accuracy"]
    test_before = _accuracy(pruned, data, "test")
    search_steps = int(result.training_steps) + staged
    training = {"search_steps": search_steps, "search_batch_size": result.training_batch_size,
                "stages": stages if staged else 1, "stage_steps": staged,
                "finetune_steps": finetune_steps(finetune, len(data.train)), "finetune_batch_size": finetune.batch_size,
                "extra_steps": 0, "extra_batch_size": EXTRA_BATCH_SIZE, "equal_steps": equal_steps,
                "order": EQUAL_ORDER}
    missing = equal_steps - search_steps - training["finetune_steps"]
    started = time.perf_counter()
    if equal_steps and missing > 0:
        # as run: the fine-tune alone, on a copy; at equal training: the missing steps first, then
        # the same fine-tune, so that every network ends with the fine-tune's annealed schedule
        # after the same number of steps, as NetAdapt's ends after its short-term steps
        as_run_model = copy.deepcopy(pruned)
        history_as_run = train(as_run_model, data, finetune, state_path=run.state_dir / "finetune.state",
                               progress=progress)
        as_run = {"val_accuracy": evaluate(as_run_model, data, "val")["accuracy"],
                  "test_accuracy": _accuracy(as_run_model, data, "test")}
        del as_run_model
        epochs = math.ceil(missing / math.ceil(len(data.train) / EXTRA_BATCH_SIZE))
        extra = TrainConfig(epochs=epochs, batch_size=EXTRA_BATCH_SIZE, lr=finetune.lr, seed=finetune.seed + 1,
                            max_steps_per_epoch=math.ceil(missing / epochs), amp=finetune.amp)
        history = train(pruned, data, extra, state_path=run.state_dir / "extra_first.state", progress=progress)
        history += train(pruned, data, finetune, state_path=run.state_dir / "finetune_equal.state",
                         progress=progress)
        training["extra_steps"] = finetune_steps(extra, len(data.train))
        final = {"val_accuracy": evaluate(pruned, data, "val")["accuracy"],
                 "test_accuracy": _accuracy(pruned, data, "test")}
    else:
        history = history_as_run = train(pruned, data, finetune, state_path=run.state_dir / "finetune.state",
                                         progress=progress)
        final = as_run = {"val_accuracy": evaluate(pruned, data, "val")["accuracy"],
                          "test_accuracy": _accuracy(pruned, data, "test")}
    finetune_seconds = time.perf_counter() - started
    training["total_steps"] = search_steps + training["finetune_steps"] + training["extra_steps"]
    pruned = pruned.cpu()  # timed and exported on the CPU
    # under a latency budget the network's latency is the result, and timed as the fit times it
    latency = measure_pair(base_model, pruned, shape, lut, times=PAIR_TIMINGS if budget.metric == "latency" else 1)
    evaluations = result.evaluations
    metrics = {
        "agent": run.config.get("agent"), "budget": str(budget), "budget_metric": budget.metric,
        "base_flops": base_cost.flops, "flops": cost.flops, "flops_ratio": cost.flops / base_cost.flops,
        "base_params": base_cost.params, "params": cost.params, "params_ratio": cost.params / base_cost.params,
        "base_val_accuracy": evaluate(base_model, data, "val")["accuracy"],
        "base_test_accuracy": _accuracy(base_model, data, "test"),
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
        "measured_latency_timings": latency["timings"],
        "policy": policy, "channels": channels, "finetune_history": history,
    }
    if history_as_run is not history:
        metrics["finetune_history_as_run"] = history_as_run
    if fit is not None:
        metrics["latency_fit"] = fit
    if result.seconds:
        metrics["search_breakdown_seconds"] = {key: round(value, 1) for key, value in result.seconds.items()}
    metrics["search"] = {"accuracy": result.score, "cost_ratio": result.cost_ratio, **result.details}
    if result.training_steps:
        metrics["search"].update(training_steps=result.training_steps,
                                 training_batch_size=result.training_batch_size)
    if lut is not None:
        metrics["lut_latency_ms_base"] = lut.predict_ms(description)
        metrics["lut_latency_ms"] = lut.predict_ms(description, channels)
        metrics["lut_latency_ratio"] = metrics["lut_latency_ms"] / metrics["lut_latency_ms_base"]
    meta = {k: v for k, v in metrics.items() if not k.startswith("finetune_history")}
    metrics["outputs"] = _export(run, pruned, shape, meta, onnx)
    run.write_metrics(metrics)
    score = metrics["test_accuracy"] if metrics["test_accuracy"] is not None else metrics["val_accuracy"]
    run.plot_keep_ratios(policy, channels, f"{run.config.get('agent', '')} at {budget}: "
                                           f"{100 * metrics['flops_ratio']:.1f} % FLOPs, "
                                           f"{'test' if metrics['test_accuracy'] is not None else 'val'} "
                                           f"{100 * score:.2f} %")
    write_report(run, metrics)
    return metrics, pruned


def _staged_prune(evaluator: PolicyEvaluator, target: dict[str, int], stages: int, steps: int,
                  finetune: TrainConfig) -> nn.Module:
    """The base model cut to `target` in `stages` cuts of equal share per group, trained for
    `steps` SGD steps after every cut but the last; each cut after the first drops the
    weakest channels (L1) of the network as trained so far. BatchNorm is recalibrated
    after every cut."""
    from autoprune.pruning import ChannelPruner, _segments, cut_group

    config, data, base = evaluator.config, evaluator.data, evaluator.description
    full = {g.name: g.channels for g in base.groups}
    # which channels a group spanning concatenated branches keeps decides what it costs:
    # such a group keeps the base model's ranking at every cut, so it ends at the plan's cost
    branching = {g.name: g for g in base.groups if _segments(base, g.name)}
    model, current = None, dict(full)
    for stage in range(1, stages + 1):
        plan = {name: round(full[name] - (full[name] - target[name]) * stage / stages) for name in full}
        if model is None:
            model = evaluator.prune({name: plan[name] / full[name] for name in full})
        else:
            pruner = ChannelPruner(model, data.input_shape)
            # a grouped layer keeps whole channel groups, so a cut may already be below the next plan
            model = pruner.prune({g.name: 1.0 if g.name in branching else min(plan[g.name], current[g.name])
                                  / current[g.name] for g in pruner.description.groups})
            for name, group in branching.items():
                count = group_keep(group, min(plan[name], current[name]) / group.channels)
                if count < current[name]:
                    model = cut_group(model, data.input_shape, group, current[name], count)
            model = model.to(config.device)
            recalibrate_bn(model, data, num_batches=config.bn_batches, batch_size=config.bn_batch_size,
                           seed=config.seed)
        current = _widths(model, base)
        if stage < stages and steps > 0:
            train(model, data, TrainConfig(epochs=1, batch_size=EXTRA_BATCH_SIZE, lr=finetune.lr,
                                           seed=finetune.seed + 100 + stage, max_steps_per_epoch=steps,
                                           amp=finetune.amp), progress=False)
    return model


def _widths(model: nn.Module, description) -> dict[str, int]:
    """Channels each group of `description` has in `model` (a pruned copy of its network),
    read from the group's root layer."""
    from autoprune.pruning import _side_width

    modules = dict(model.named_modules())
    return {g.name: _side_width(modules[g.root or g.name], True) for g in description.groups}


def _shrink(model: nn.Module, shape: tuple[int, int, int], kept: dict[str, int], target: dict[str, int]) -> nn.Module:
    """The searcher's own network with every group cut from `kept` to `target` channels
    (the weakest channels by the L1 norm go)."""
    from autoprune.pruning import ChannelPruner

    pruner = ChannelPruner(model, shape)
    return pruner.prune({g.name: target.get(g.name, kept.get(g.name, g.channels)) / g.channels
                         for g in pruner.description.groups})


def _own_size(sizes: OwnSizes, size: float, channels: dict[str, int]) -> nn.Module:
    """The searcher's own network at `size`, which the latency fit chose as `channels`."""
    model, kept = sizes.at(size)
    if {name: int(v) for name, v in kept.items()} != channels:
        raise AutopruneError(f"the searcher's network at size {size:g} keeps other channels than the latency fit "
                             "chose (its pruning is not repeatable); search again into a new run directory")
    return model


def _fit_latency(run: Run, evaluator: PolicyEvaluator, constraint: Constraint, channels: dict[str, int],
                 model: nn.Module | None, sizes: OwnSizes | None = None) -> tuple[dict[str, int], dict]:
    """`fit_measured_latency` for the network a search produced: pruned from the base model
    or made by the searcher at other sizes (either may grow back), else the search's own
    (which can only shrink)."""
    from autoprune.pipeline.fit import fit_measured_latency

    description, shape = constraint.description, evaluator.data.input_shape
    family = None
    if model is None:
        def build(plan: dict[str, int]) -> nn.Module:
            return evaluator.pruner.prune({g.name: plan[g.name] / g.channels for g in description.groups}).cpu()
    else:
        own = copy.deepcopy(model).cpu().eval()
        # read from the layers: a group cut to its minimum may no longer be described as one
        try:
            widths = _widths(own, description)
        except (KeyError, AttributeError):  # not the base network's layers
            widths = None
        if widths != {g.name: channels.get(g.name, g.channels) for g in description.groups}:
            return channels, {"fitted": False, "reason": "the search's own network does not match its channel plan"}
        if sizes is None:
            def build(plan: dict[str, int]) -> nn.Module:
                return _shrink(own, shape, channels, plan)
        else:
            size_of: dict[tuple, float] = {}  # plan -> the size that made it

            def plan_for(size: float) -> dict[str, int]:
                plan = {name: int(v) for name, v in sizes.at(size)[1].items()}
                size_of.setdefault(tuple(sorted(plan.items())), size)
                return plan

            def build(plan: dict[str, int]) -> nn.Module:
                if plan == channels:
                    return own
                return sizes.at(size_of[tuple(sorted(plan.items()))])[0].cpu().eval()
            family = (plan_for, sizes.largest)
    return fit_measured_latency(constraint, channels, build, evaluator.pruner.model, shape,
                                grow=model is None, sizes=family, state_dir=run.state_dir)


def _export(run: Run, pruned: nn.Module, shape: tuple[int, int, int], meta: dict, onnx: bool) -> dict:
    """Write the network in its three forms; returns what was written (for the metrics)."""
    outputs = {"trainable": TRAINABLE_FILE, "trainable_kind": save_trainable(pruned, run.path / TRAINABLE_FILE,
                                                                              shape, meta),
               "program": PROGRAM_FILE}
    save_pruned_model(pruned, run.path / PROGRAM_FILE, shape, meta=meta)
    if not onnx:
        outputs["onnx"] = None
        return outputs
    try:
        export_onnx(pruned, run.path / ONNX_FILE, shape)
        difference = check_onnx(pruned, run.path / ONNX_FILE, shape)
    except AutopruneError as exc:
        log.warning("no ONNX export: %s", exc)
        (run.path / ONNX_FILE).unlink(missing_ok=True)
        outputs.update(onnx=None, onnx_note=str(exc))
        return outputs
    outputs.update(onnx=ONNX_FILE, onnx_max_abs_difference=difference)
    if difference > ONNX_TOLERANCE:
        log.warning("model.onnx differs from the torch network by up to %.3g on the logits", difference)
    return outputs


