"""One search, top to bottom: load -> check -> search -> finish.

The command line, the Python API, sweeps and the benchmarks all call `run_search` (or
`resume_search`). Every check that can refuse the settings runs before the run
directory is created; the run directory is locked while this process writes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from autoprune.budgets import Budget, Constraint, parse_budget
from autoprune.devices import resolve_device
from autoprune.errors import AutopruneError
from autoprune.pipeline.protocol import SearchContext
from autoprune.pipeline.registry import make_searcher
from autoprune.pipeline.settings import (FIELDS, RESUMABLE, ResumeMismatch, SearchSettings, SettingError,
                                         settings_from_saved)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default (resnet20 on fashion-mnist)"


@dataclass
class Inputs:
    """The base model and the data a search runs on."""

    model: nn.Module
    data: Any  # a DataBundle
    meta: dict  # what the model's file says about it (e.g. the data set it was trained on)
    model_name: str  # for the report
    from_python: bool = False  # given as objects through the API (a CLI resume cannot rebuild them)


@dataclass
class SearchOutcome:
    """A finished search: its run directory, its metrics and the fine-tuned pruned network."""

    run: Any  # a Run
    metrics: dict
    model: nn.Module | None


# ---------------------------------------------------------------- load

def load_inputs(settings: SearchSettings, *, download: bool = True) -> Inputs:
    """The model and data the settings name (the data first when the model is a zoo name:
    its shape depends on the data)."""
    from autoprune.data import load_data
    from autoprune.models import ZOO, load_model
    from autoprune.train import check_model_fits

    def data_for(meta: dict | None):
        name = settings.data or (meta or {}).get("data") or "fashion-mnist"
        size = settings.image_size or (meta or {}).get("image_size") if not settings.data else settings.image_size
        return load_data(name, settings.data_dir, val_size=settings.val_size, download=download, image_size=size)

    if settings.model in ZOO:
        data = data_for(None)
        c, h, _ = data.input_shape
        model, meta = load_model(settings.model, settings.weights, in_channels=c, num_classes=data.num_classes,
                                 input_size=h)
    else:
        model, meta = load_model(settings.model, settings.weights)
        data = data_for(meta)
    check_model_fits(model, data)
    return Inputs(model=model, data=data, meta=meta, model_name=settings.model or DEFAULT_MODEL_NAME)


# ---------------------------------------------------------------- check

def check_settings(settings: SearchSettings):
    """Every check that needs no model or data; returns (budget, searcher)."""
    settings.check()
    device = resolve_device(settings.device)  # a device this machine lacks is refused before anything is loaded
    if settings.amp and device.type != "cuda":
        raise SettingError("amp", f"mixed precision runs on a CUDA device only; this search runs on {device}")
    if settings.budget is None:
        raise SettingError("budget", "a budget is required, e.g. 50%flops")
    budget = parse_budget(settings.budget)
    searcher = make_searcher(settings.agent)
    searcher.check(settings)
    if budget.metric == "latency" and not settings.lut:
        raise SettingError("lut", "a latency budget needs a latency table (build one with `autoprune lut build` "
                                  "on the target device)")
    return budget, searcher


def check_lut_device(table, budget: Budget, allow_other_device: bool) -> None:
    """A latency budget bounds the latency of the CPU the LUT was measured on: refuse a LUT from
    another CPU unless the user says that device is the target."""
    from autoprune.latency import describe_device, same_device, this_device

    device = table.data.get("device")
    if budget.metric == "latency" and not allow_other_device and not same_device(device):
        raise SettingError("allow_other_device", f"LUT {table.path} was measured on {describe_device(device)}, "
                           f"not on this machine ({this_device()}); a latency budget on it bounds that device's "
                           "latency. Build a LUT here with `autoprune lut build`, or allow another device if that "
                           "device is your target")


def resolve_scoring(settings: SearchSettings, searcher, evaluator, constraint: Constraint) -> dict:
    """Set the evaluator's short fine-tune before scoring (`score_steps`, `auto` decided on the
    uniform policy at the budget); returns what was decided and why, for config.json."""
    from autoprune.costs import uniform_policy
    from autoprune.evaluation import resolve_score_steps

    if not searcher.ranks_candidates:
        return {"score_steps": 0, "reason": f"{settings.agent} does not rank candidates by the evaluator's score"}
    if settings.score_steps != "auto":
        evaluator.config.score_steps = int(settings.score_steps)
        return {"score_steps": int(settings.score_steps), "reason": "set by the settings"}
    try:
        ratio = constraint.uniform_ratio()
    except AutopruneError:  # a measured table need not fall monotonically to one channel: the floor meets it
        ratio = settings.lower_bound
    steps, info = resolve_score_steps(evaluator, uniform_policy(evaluator.description, ratio))
    evaluator.config.score_steps = steps
    log.info("scoring candidates after %d SGD steps (uniform policy at the budget: %.3f, unpruned %.3f)", steps,
             info["uniform_accuracy"], info["unpruned_accuracy"])
    return {**info, "reason": "auto"}


def _prepare(settings: SearchSettings, searcher, budget: Budget, inputs: Inputs, progress: bool,
             saved_config: dict | None):
    """Evaluator, constraint and the searcher made ready; everything that can refuse runs here."""
    from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
    from autoprune.latency import load_lut

    table = None
    if settings.lut:
        table = load_lut(settings.lut)
        check_lut_device(table, budget, settings.allow_other_device)
    evaluator = PolicyEvaluator(inputs.model, inputs.data, EvaluatorConfig(
        criterion=settings.criterion or searcher.default_criterion, channel_multiple=settings.channel_multiple,
        bn_batches=settings.bn_batches, val_images=settings.val_images, seed=settings.seed,
        score_augment=settings.score_augment, device=str(resolve_device(settings.device))))
    description = evaluator.description
    if not description.groups:
        raise AutopruneError("the model has no prunable layer (no Conv2d/Linear feeding another layer)")
    constraint = Constraint(budget, description, table, settings.channel_multiple)
    constraint.check_reachable(searcher.floor_channels(description, settings), settings.lower_bound)
    scoring = resolve_scoring(settings, searcher, evaluator, constraint)
    context = SearchContext(evaluator=evaluator, constraint=constraint, settings=settings, progress=progress,
                            saved_config=saved_config)
    agent_config = searcher.prepare(context)
    return evaluator, constraint, scoring, agent_config


# ---------------------------------------------------------------- search and finish

def run_search(settings: SearchSettings, *, out: str | Path | None = None, inputs: Inputs | None = None,
               progress: bool = True, command: str | None = None, sweep: str | None = None,
               download: bool = True) -> SearchOutcome:
    """Search with `settings` into a new run directory (`out`, default runs/TIME-AGENT-BUDGET),
    then finish: the best policy pruned, fine-tuned, measured, exported and reported.

    `inputs` are an already loaded model and data (the API's objects, or a sweep's shared
    load); by default they are loaded as the settings say (`download`: missing data files
    may be fetched).
    """
    from autoprune.runs import Run, check_new_run_dir, new_run_dir
    from autoprune.train import seed_everything

    budget, searcher = check_settings(settings)
    path = Path(out) if out else new_run_dir("runs", settings.agent, budget.tag)
    check_new_run_dir(path)  # where the run goes is checked before any work is done
    seed_everything(settings.seed)
    inputs = inputs if inputs is not None else load_inputs(settings, download=download)
    seed_everything(settings.seed)  # loading may draw (a zoo model's initial weights): the search starts here
    evaluator, constraint, scoring, agent_config = _prepare(settings, searcher, budget, inputs, progress, None)
    config = {**settings.to_dict(), "criterion": evaluator.config.criterion, "model_name": inputs.model_name,
              "data": inputs.data.name, "groups": [g.name for g in evaluator.description.groups],
              "model_from_python": inputs.from_python, "scoring": scoring}
    if command is not None:
        config["command"] = command
    if agent_config is not None:
        config["agent_config"] = agent_config
    if sweep:
        config["sweep"] = sweep
    run = Run.create(path, config)
    try:
        return _search_and_finish(run, settings, searcher, evaluator, constraint, progress)
    finally:
        run.release()


def resume_search(path: str | Path, *, changes: dict[str, Any] | None = None, inputs: Inputs | None = None,
                  progress: bool = True) -> SearchOutcome:
    """Continue the search in run directory `path` with the settings it was started with.

    `changes` are settings given now: those a resumed search may change (`RESUMABLE`) are
    taken, any other that differs from the saved value is refused with the list of
    differences. A finished run is returned as it is.
    """
    from autoprune.io import atomic_write_json
    from autoprune.runs import CONFIG, Run
    from autoprune.train import seed_everything

    run = Run.open(path, write=True)
    try:
        if run.finished:
            log.info("%s is already finished; nothing to resume", run.path)
            return SearchOutcome(run=run, metrics=run.read_metrics(), model=load_run_model(run.path))
        saved = run.config
        settings = settings_from_saved(saved)
        changes = dict(changes or {})
        differ = [(name, value, getattr(settings, name)) for name, value in changes.items()
                  if value != getattr(settings, name) and (
                      name not in RESUMABLE or (FIELDS[name].metadata["on_resume"] == "grow"
                                                and value is not None and value < getattr(settings, name)))]
        if differ:
            raise ResumeMismatch(run.path, differ)
        allowed = {name: value for name, value in changes.items()
                   if name in RESUMABLE and value is not None and value != getattr(settings, name)}
        settings = settings.replace(**allowed)
        budget, searcher = check_settings(settings)
        if saved.get("model_from_python") and inputs is None:
            raise AutopruneError(f"{run.path} searched a model given from Python; resume it from Python with the "
                                 "same model and data (autoprune.search(..., resume=PATH))")
        seed_everything(settings.seed)
        inputs = inputs if inputs is not None else load_inputs(settings, download=False)
        seed_everything(settings.seed)
        evaluator, constraint, _, agent_config = _prepare(settings, searcher, budget, inputs, progress,
                                                          saved.get("agent_config"))
        if allowed or (agent_config is not None and agent_config != saved.get("agent_config")):
            atomic_write_json(run.path / CONFIG, {**saved, **allowed,
                                                  **({"agent_config": agent_config,
                                                      **{key: agent_config[key] for key in RESUMABLE
                                                         if key in agent_config}} if agent_config is not None else {})})
        return _search_and_finish(run, settings, searcher, evaluator, constraint, progress)
    finally:
        run.release()


def _search_and_finish(run, settings: SearchSettings, searcher, evaluator, constraint, progress: bool) -> SearchOutcome:
    from autoprune.pipeline.finish import finish_run
    from autoprune.train import TrainConfig

    run.start_search_clock(evaluator)
    result = searcher.run(run)  # one that fails writes nothing more: a refused state stays as it was
    search_seconds = run.stop_search_clock()
    # the agent's own time is the rest: the phases are whole-search totals (the clock restores
    # the evaluator's, the searchers their own), and so is search_seconds
    phases = {key: value for key, value in result.seconds.items() if key != "agent"}
    result.seconds = {**phases, "agent": max(0.0, search_seconds - sum(phases.values()))}
    metrics, model = finish_run(run, evaluator, result, constraint, search_seconds=search_seconds,
                                progress=progress, equal_steps=settings.equal_steps, onnx=settings.onnx,
                                fit_latency=settings.fit_latency, stages=settings.finish_stages_value(),
                                stage_steps=settings.stage_steps,
                                finetune=TrainConfig(epochs=settings.finetune_epochs, lr=settings.finetune_lr,
                                                     seed=settings.seed, amp=settings.amp))
    return SearchOutcome(run=run, metrics=metrics, model=model)


def load_run_model(path: str | Path) -> nn.Module | None:
    """The fine-tuned pruned network of a finished run directory (trainable), if it has one."""
    from autoprune.export import load_trainable
    from autoprune.pipeline.finish import TRAINABLE_FILE

    file = Path(path) / TRAINABLE_FILE
    if not file.is_file():
        return None  # written by an earlier version: model.pt2 only
    return load_trainable(file)[0]
