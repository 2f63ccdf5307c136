"""NetAdapt (Yang et al., ECCV 2018): shrink a trained network one group at a time.

Each iteration sets a resource target a little below the current network's value (the
step shrinks by a fixed factor every iteration, and the last target is the budget
itself). For every prunable group it makes one proposal: the current network with that
group cut to the largest channel count that alone meets the target, according to the
cost model or the latency table. Every proposal is pruned from the current network,
short-term fine-tuned, BatchNorm-recalibrated and scored on the validation subset; the
most accurate one becomes the current network. The loop stops when the budget is met.
The caller then long-term fine-tunes the returned network.

Proposals within an iteration are independent: `evaluate_proposal` is a pure function
of its task (the current network as bytes, the group, the new channel count, the
settings and a seed) and the data; an iteration maps it over the proposals through
any object with an `Executor.map`-like method. One worker maps in this process; more
use a process pool, and a distributed engine can supply its own `map`.

Resume: after each iteration the current network and a small JSON state are written
atomically into the run's state directory; a search that finds them continues from the
last finished iteration, and rows written after it are dropped from the history.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from itertools import repeat
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from autoprune.budgets import TOLERANCE, Budget, Constraint
from autoprune.costs import GroupSpec, count_cost, group_choices
from autoprune.data import DataBundle
from autoprune.errors import AutopruneError
from autoprune.evaluation import PolicyEvaluator
from autoprune.io import atomic_torch_save, atomic_write_json, model_from_bytes, model_to_bytes
from autoprune.pruning import cut_group, describe_network
from autoprune.latency import LatencyWorker
from autoprune.pipeline.protocol import BaseSearcher, SearcherResult
from autoprune.runs import Run
from autoprune.train import TrainConfig, evaluate, recalibrate_bn, train

log = logging.getLogger(__name__)

STATE_FILE = "netadapt.json"
MODEL_FILE = "netadapt_model.pt"
HISTORY_COLUMNS = ("iteration", "target", "target_ratio", "group", "channels_before", "channels_after",
                   "accuracy", "flops_ratio", "params_ratio", "latency_ratio", "cost_ratio", "measured_ratio",
                   "proposals", "seconds")


@dataclass
class NetAdaptConfig:
    """NetAdapt settings; the reduction schedule and criterion are the paper's."""

    initial_reduction: float = 0.05  # fraction of the base model's resource removed in the first iteration
    reduction_decay: float = 0.96  # the step is multiplied by this every iteration (the paper's 0.96)
    short_term_steps: int = 40  # SGD steps of the short-term fine-tune of each proposal
    short_term_batch_size: int = 64  # images per short-term SGD step
    short_term_lr: float = 0.01  # peak learning rate of the short-term fine-tune (cosine decay to 0)
    max_iterations: int = 100  # hard bound on iterations; the search fails if the budget is not met by then
    max_halvings: int = 10  # times an iteration may halve its step when no group can absorb it
    criterion: str = "l2"  # channel selection inside a group (the paper keeps the largest-L2 filters)
    workers: int = 1  # processes scoring proposals; 1 scores them in this process
    lower_bound: float = 0.0  # smallest keep ratio of a group, relative to the base (0: one channel multiple)
    # latency budgets: also time the current network on this machine, in a separate process, and stop on the
    # measured latency ("on"; "auto": on when the LUT was measured on this CPU; "off": the LUT alone, which is
    # repeatable to the channel)
    measure_latency: str = "off"


# ---------------------------------------------------------------- one proposal

@dataclass(frozen=True)
class ProposalSettings:
    """Everything besides the network and the group that scoring a proposal depends on."""

    input_shape: tuple[int, int, int]  # channels, height, width of one image
    criterion: str  # channel selection inside the group
    channel_multiple: int  # kept channels are multiples of this
    short_term_steps: int
    short_term_batch_size: int
    short_term_lr: float
    bn_batches: int  # BatchNorm recalibration batches
    bn_batch_size: int
    val_images: int  # validation images scored
    evaluator_seed: int  # recalibration batches and the random criterion
    device: str = "cpu"  # where a proposal is fine-tuned, recalibrated and scored (pruned on the CPU)


@dataclass(frozen=True)
class ProposalTask:
    """One proposal: cut `group` of the current network from `channels_before` to `channels_after`."""

    model: bytes  # the current network, saved whole with torch.save
    group: str
    channels_before: int
    channels_after: int
    spec: GroupSpec  # the group in the base model's description (its ranking decides which channels go)
    settings: ProposalSettings
    seed: int  # short-term fine-tune seed (the same for every proposal of an iteration)


@dataclass(frozen=True)
class ProposalResult:
    """A scored proposal: its validation accuracy and the fine-tuned network as bytes."""

    group: str
    channels_after: int
    accuracy: float
    model: bytes
    seconds: dict[str, float]  # wall time per phase: prune, short_term_finetune, bn_recalibration, validation


def prune_group(model: nn.Module, task: ProposalTask) -> nn.Module:
    """A copy of the current network with the task's group cut to exactly `channels_after` channels.

    The channels go in the order the group was ranked once on the base model, so the
    network is always the base model pruned by the search's channel counts and its cost
    is exactly what the search booked (also where branches share a group unevenly).
    """
    spec = task.spec
    if spec.name != task.group or not 0 < task.channels_after < task.channels_before <= spec.channels:
        raise AutopruneError(f"cannot cut group {task.group} from {task.channels_before} to "
                             f"{task.channels_after} channels")
    return cut_group(model, task.settings.input_shape, spec, task.channels_before, task.channels_after)


def evaluate_proposal(task: ProposalTask, data: DataBundle) -> ProposalResult:
    """Prune, short-term fine-tune, recalibrate BatchNorm and score one proposal.

    A pure function of its arguments: every random choice is seeded from the task, so any
    process (or machine) with the same torch thread count computes the same result.
    """
    settings = task.settings
    started = time.perf_counter()
    model = prune_group(model_from_bytes(task.model), task).to(settings.device)
    pruned = time.perf_counter()
    if settings.short_term_steps > 0:
        train(model, data, TrainConfig(epochs=1, batch_size=settings.short_term_batch_size, lr=settings.short_term_lr,
                                       seed=task.seed, max_steps_per_epoch=settings.short_term_steps),
              progress=False, eval_split="")
    tuned = time.perf_counter()
    recalibrate_bn(model, data, num_batches=settings.bn_batches, batch_size=settings.bn_batch_size,
                   seed=settings.evaluator_seed)
    model.eval()
    recalibrated = time.perf_counter()
    accuracy = evaluate(model, data, "val", limit=settings.val_images)["accuracy"]
    seconds = {"prune": pruned - started, "short_term_finetune": tuned - pruned,
               "bn_recalibration": recalibrated - tuned, "validation": time.perf_counter() - recalibrated}
    return ProposalResult(group=task.group, channels_after=task.channels_after, accuracy=accuracy,
                          model=model_to_bytes(model.cpu()), seconds=seconds)


# ---------------------------------------------------------------- executors

class ProposalExecutor(Protocol):
    """Anything with `concurrent.futures.Executor.map`'s calling convention (results in order)."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]: ...


class InlineExecutor:
    """Scores proposals one after another in this process."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        return map(fn, *iterables)


def _init_worker() -> None:
    torch.set_num_threads(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` fresh processes ("spawn"), each with one torch thread."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)


# ---------------------------------------------------------------- the search

def minimum_channels(channels: int, lower_bound: float, multiple: int) -> int:
    """Fewest channels a group of `channels` may keep: `lower_bound` of them rounded up to a multiple."""
    floor = math.ceil(lower_bound * channels / multiple - 1e-9) * multiple
    return min(channels, max(multiple, floor))


def count_choices(group: GroupSpec, lower_bound: float, multiple: int) -> list[int]:
    """The counts a group may keep in a NetAdapt search, from its floor up: those its
    structure and the channel multiple allow, at `lower_bound` of its channels or more."""
    return ([c for c in group_choices(group, multiple) if c >= minimum_channels(group.channels, lower_bound, 1)]
            or [group.channels])


def reduction_step(config: NetAdaptConfig, base_value: float, iteration: int) -> float:
    """Resource the schedule asks an iteration (0-based) to remove, before any halving."""
    return config.initial_reduction * base_value * config.reduction_decay ** iteration


def iteration_seed(seed: int, iteration: int) -> int:
    """Fine-tune seed of an iteration's proposals: all proposals see the same batches."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


def _fits(value: float, bound: float) -> bool:
    return value <= bound + TOLERANCE * abs(bound)


def _check_config(config: NetAdaptConfig) -> None:
    if not 0.0 < config.initial_reduction <= 1.0:
        raise AutopruneError(f"initial_reduction must be in (0, 1], got {config.initial_reduction}")
    if not 0.0 < config.reduction_decay <= 1.0:
        raise AutopruneError(f"reduction_decay must be in (0, 1], got {config.reduction_decay}")
    if not 0.0 <= config.lower_bound <= 1.0:
        raise AutopruneError(f"lower_bound must be in [0, 1], got {config.lower_bound}")
    if config.short_term_steps < 0 or config.short_term_batch_size < 1 or config.short_term_lr < 0:
        raise AutopruneError("short_term_steps must be >= 0, short_term_batch_size >= 1 and short_term_lr >= 0")
    if config.measure_latency not in ("auto", "on", "off"):
        raise AutopruneError(f"measure_latency must be auto, on or off, got {config.measure_latency!r}")
    if config.max_iterations < 1 or config.max_halvings < 0 or config.workers < 1:
        raise AutopruneError("max_iterations and workers must be at least 1, max_halvings at least 0")


class _Search:
    """Cost bookkeeping of one NetAdapt search over the base model's description."""

    def __init__(self, evaluator: PolicyEvaluator, budget: Budget, lut, config: NetAdaptConfig):
        self.description = evaluator.description
        self.budget, self.lut, self.config = budget, lut, config
        self.multiple = evaluator.config.channel_multiple
        self.constraint = Constraint(budget, self.description, lut, self.multiple)
        self.groups = self.description.group_names
        self.base_channels = {g.name: g.channels for g in self.description.groups}
        self.choices = {g.name: count_choices(g, config.lower_bound, self.multiple) for g in self.description.groups}
        self.floors = {name: choices[0] for name, choices in self.choices.items()}
        self.base_value, self.limit = self.constraint.base_value, self.constraint.limit

    def value(self, kept: Mapping[str, int]) -> float:
        """The budget's metric (FLOPs, params or ms) of the base network keeping `kept` channels."""
        return self.constraint.value(kept)

    def policy(self, kept: Mapping[str, int]) -> dict[str, float]:
        """Keep ratios relative to the base model."""
        return {name: kept[name] / self.base_channels[name] for name in self.groups}

    def ratios(self, kept: Mapping[str, int]) -> dict[str, float | str]:
        ratios = self.constraint.ratios(kept)
        return {**ratios, "latency_ratio": "" if ratios["latency_ratio"] is None else ratios["latency_ratio"]}

    def largest_count(self, kept: Mapping[str, int], group: str, target: float) -> tuple[int, float] | None:
        """The most channels `group` can keep (below its current count) so that the network meets
        `target`, and the resulting value; None if no count down to the group's floor does.

        A downward scan rather than a bisection: a measured latency table need not be
        monotone in the channel count, and the scan returns the largest fitting count anyway.
        """
        trial = dict(kept)
        for count in reversed([c for c in self.choices[group] if c < kept[group]]):
            trial[group] = count
            value = self.value(trial)
            if _fits(value, target):
                return count, value
        return None

    def proposals(self, kept: Mapping[str, int], target: float) -> list[tuple[str, int, float]]:
        """(group, new count, value) for every group that can meet `target` alone, in group order."""
        found = []
        for group in self.groups:
            hit = self.largest_count(kept, group, target)
            if hit is not None:
                found.append((group, *hit))
        return found

    def next_target(self, kept: Mapping[str, int], value: float, iteration: int, limit: float | None = None
                    ) -> tuple[float, float, list[tuple[str, int, float]]] | None:
        """(target, step, proposals) of an iteration; None when no group can absorb even the
        step halved `max_halvings` times.

        The step follows the schedule; when no group can meet the target alone it is halved
        and the target recomputed, a bounded number of times. The target never goes below
        `limit` (default: the budget's), so the last iteration lands on the budget.
        """
        limit = self.limit if limit is None else limit
        step = reduction_step(self.config, self.base_value, iteration)
        for halvings in range(self.config.max_halvings + 1):
            target = max(value - step, limit)
            found = self.proposals(kept, target)
            if found:
                if halvings:
                    log.info("iteration %d: step halved %d time(s)", iteration + 1, halvings)
                return target, step, found
            step /= 2
        return None

    def fingerprint(self, evaluator: PolicyEvaluator, seed: int) -> dict:
        """What a saved state must agree with to be resumed (workers and max_iterations may change)."""
        settings = {key: value for key, value in asdict(self.config).items()
                    if key not in ("workers", "max_iterations")}
        return json.loads(json.dumps({"budget": str(self.budget), "metric": self.budget.metric, "limit": self.limit,
                                      "base_value": self.base_value, "base_channels": self.base_channels,
                                      "seed": seed, "netadapt": settings, "evaluator": asdict(evaluator.config)}))


LatencyMeter = Callable[[list[nn.Module]], list[float]]


def latency_meter(budget: Budget, lut, config: NetAdaptConfig, input_shape: tuple[int, int, int]
                  ) -> LatencyWorker | None:
    """A meter timing whole networks on this machine with the LUT's runtime settings
    (milliseconds, one per network), when the search should check its latency budget by
    measurement. Networks timed in one call share the machine's state: their passes are
    interleaved, so a busy spell slows all of them rather than one.

    A LUT adds up layers timed alone; the network as a whole runs faster or slower than
    that sum, more so the further it is pruned (fixed per-layer costs weigh more in a
    small network). Timing the current network after each iteration and stopping on the
    measured latency lands on the budget the user means. Only possible on the LUT's own
    device: with `measure_latency="auto"` a LUT from another CPU falls back to the table
    alone; with `"on"` that is an error. The timing runs in a separate process
    (`LatencyWorker`): timed inside the search process, after its fine-tunes, the
    unpruned network came out 2.3× too slow.
    """
    from autoprune.latency import describe_device, same_device, this_device

    if budget.metric != "latency" or lut is None or config.measure_latency == "off":
        return None
    lut_device = lut.data.get("device") or {}
    if not same_device(lut_device):
        here = this_device()
        if config.measure_latency == "on":
            raise AutopruneError(f"cannot measure latency against LUT {lut.path}: it was measured on "
                                 f"{describe_device(lut_device)}, this machine is {here}; "
                                 "use measure_latency auto or off here, or build a LUT on this machine")
        log.info("LUT from %s, this machine is %s: NetAdapt follows the LUT alone", describe_device(lut_device), here)
        return None
    return LatencyWorker(input_shape, lut)


def _settings(evaluator: PolicyEvaluator, config: NetAdaptConfig) -> ProposalSettings:
    ec = evaluator.config
    return ProposalSettings(input_shape=tuple(evaluator.data.input_shape), criterion=config.criterion,
                            channel_multiple=ec.channel_multiple, short_term_steps=config.short_term_steps,
                            short_term_batch_size=config.short_term_batch_size, short_term_lr=config.short_term_lr,
                            bn_batches=ec.bn_batches, bn_batch_size=ec.bn_batch_size, val_images=ec.val_images,
                            evaluator_seed=ec.seed, device=str(ec.device))


def _load_state(run: Run, fingerprint: dict) -> dict | None:
    path = run.state_dir / STATE_FILE
    if not path.is_file() or not (run.state_dir / MODEL_FILE).is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AutopruneError(f"cannot read the NetAdapt state {path}: {exc}; delete it to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise AutopruneError(f"{path} was written by a NetAdapt search with other settings (budget, seed, model "
                             "or NetAdapt options); repeat the original command to resume, or delete "
                             f"{run.state_dir} to start over")
    return state


def _resumed_history(run: Run, state: dict) -> list[dict]:
    """The iterations the saved state has finished; history.csv is rebuilt from the state when
    it is missing, cut or corrupt (a state without the history needs a complete file)."""
    rows = int(state["rows"])
    if "history" in state:
        return run.restore_history(state["history"][:rows])
    return run.complete_history(rows, ("iteration", "accuracy"))


def _save_state(run: Run, model: nn.Module, state: dict) -> None:
    run.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model, run.state_dir / MODEL_FILE)  # the model first: a state always has its model
    atomic_write_json(run.state_dir / STATE_FILE, state)


def _score(executor: ProposalExecutor, tasks: list[ProposalTask], data: DataBundle, label: str,
           progress: bool) -> list[ProposalResult]:
    """Map `evaluate_proposal` over an iteration's tasks (results in task order)."""
    results = []
    bar = tqdm(total=len(tasks), desc=f"{label} proposals", unit="proposal", leave=False, disable=not progress)
    try:
        for result in executor.map(evaluate_proposal, tasks, repeat(data)):
            results.append(result)
            bar.update(1)
    except BrokenProcessPool as exc:
        raise AutopruneError(
            "a NetAdapt worker process died; run with one worker, or, when calling run_netadapt from a script, "
            "put the call under `if __name__ == \"__main__\":` (workers are started by spawning)") from exc
    finally:
        bar.close()
    return results


def _best(results: list[ProposalResult], candidates: list[tuple[str, int, float]],
          groups: list[str]) -> ProposalResult:
    """The most accurate proposal; ties go to the lower cost, then to the earlier group."""
    values = {group: value for group, _, value in candidates}
    order = {group: i for i, group in enumerate(groups)}
    return min(results, key=lambda r: (-r.accuracy, values[r.group], order[r.group]))


def _estimated_iterations(config: NetAdaptConfig, base_value: float, limit: float) -> int:
    """Iterations the schedule needs from the base to the limit (for the progress bar)."""
    remaining, iteration = base_value - limit, 0
    while remaining > 0 and iteration < config.max_iterations:
        remaining -= reduction_step(config, base_value, iteration)
        iteration += 1
    return max(1, iteration)


def run_netadapt(run: Run, evaluator: PolicyEvaluator, budget: Budget, *, lut=None,
                 config: NetAdaptConfig | None = None, seed: int = 0, progress: bool = True,
                 executor: ProposalExecutor | None = None, meter: LatencyMeter | None = None) -> dict:
    """Search with NetAdapt until `budget` is met, continuing a killed search from `run.state_dir`.

    Returns the final network (pruned and short-term fine-tuned, ready for the long-term
    fine-tune) with its policy (keep ratios relative to the base model), kept channels,
    validation accuracy, cost ratio, iteration count and stop reason; also the number of
    proposals scored over the whole search and the time this call spent scoring them, by
    phase (summed over workers). `executor` overrides `config.workers` with any object
    that has an `Executor.map`-like method.

    Latency budgets are checked by timing when `latency_meter` says so (or with `meter`,
    any function of a list of networks giving their milliseconds): the search starts and
    every iteration ends by timing the current network together with the unpruned one,
    stops once the current one meets the budget (a share of the unpruned network's
    latency timed alongside, or the absolute milliseconds), and caps each target, in LUT
    terms, at the budget rescaled by the current network's measured-to-predicted ratio.
    Such a search depends on the timings, so it is not repeatable to the channel.

    Results do not depend on the executor, only on the seed and the torch thread count of
    the process scoring each proposal (float sums are split differently across threads):
    worker processes use one thread, so `workers=2` reproduces `workers=1` run with
    `torch.set_num_threads(1)`.

    Raises AutopruneError, before writing anything, when the network with every group at
    its floor still exceeds the budget, and at the end when the budget was not reached.
    """
    config = config or NetAdaptConfig()
    _check_config(config)
    search = _Search(evaluator, budget, lut, config)
    search.constraint.check_reachable(search.floors, config.lower_bound)

    fingerprint = search.fingerprint(evaluator, seed)
    own_meter = None
    if meter is None:
        meter = own_meter = latency_meter(budget, lut, config, tuple(evaluator.data.input_shape))
    try:
        return _search(run, evaluator, budget, search, config, seed, fingerprint, meter, executor, progress)
    finally:
        if own_meter is not None:
            own_meter.close()


def _search(run: Run, evaluator: PolicyEvaluator, budget: Budget, search: _Search, config: NetAdaptConfig,
            seed: int, fingerprint: dict, meter: LatencyMeter | None, executor: ProposalExecutor | None,
            progress: bool) -> dict:
    """The body of `run_netadapt`, once the settings are checked and the meter is chosen."""
    state = _load_state(run, fingerprint)
    if state is not None:
        model = torch.load(run.state_dir / MODEL_FILE, map_location="cpu", weights_only=False)
        kept = {name: int(state["kept"][name]) for name in search.groups}
        if count_cost(describe_network(model, evaluator.data.input_shape)) != count_cost(search.description, kept):
            raise AutopruneError(f"the network saved in {run.state_dir} is not the base model cut to the state's "
                                 "channel counts (an earlier autoprune chose channels another way); delete "
                                 f"{run.state_dir} to start over")
        iteration, accuracy = int(state["iteration"]), state["accuracy"]
        history = _resumed_history(run, state)
        measured_base, measured = state.get("measured_base_ms"), state.get("measured_ms")
        log.info("resuming NetAdapt after iteration %d", iteration)
    else:
        model = copy.deepcopy(evaluator.pruner.model)
        kept, iteration, accuracy, history = dict(search.base_channels), 0, None, []
        measured_base = measured = None
    base_model = evaluator.pruner.model
    if meter is not None and measured_base is None:
        measured_base, measured = meter([base_model, model])

    settings = _settings(evaluator, config)
    value = search.value(kept)
    seconds = {"prune": 0.0, "short_term_finetune": 0.0, "bn_recalibration": 0.0, "validation": 0.0}
    if state is not None:  # the earlier sessions' share (a state written before it was kept has none)
        for phase, spent in (state.get("proposal_seconds") or {}).items():
            if phase in seconds and isinstance(spent, (int, float)):
                seconds[phase] = float(spent)
    stop_reason = None
    bar = tqdm(total=_estimated_iterations(config, search.base_value, search.limit),
               initial=iteration, desc="NetAdapt", unit="iteration", disable=not progress)
    own_pool = None
    if executor is None:
        own_pool = process_pool(config.workers) if config.workers > 1 else None
        executor = own_pool or InlineExecutor()
    try:
        while True:
            if _fits(value, search.limit) if meter is None else _fits(measured, budget.limit(measured_base)):
                stop_reason = "budget met"
                break
            if iteration >= config.max_iterations:
                stop_reason = f"max_iterations ({config.max_iterations}) reached"
                break
            started = time.perf_counter()
            # measuring: the LUT value that corresponds to the budget, by the current network's ratio
            limit = None if meter is None else budget.limit(measured_base) * value / measured
            planned = search.next_target(kept, value, iteration, limit)
            if planned is None:
                stop_reason = f"no group can absorb a reduction even after halving the step {config.max_halvings} times"
                break
            target, step, candidates = planned
            current, fine_tune_seed = model_to_bytes(model), iteration_seed(seed, iteration)
            tasks = [ProposalTask(model=current, group=group, channels_before=kept[group], channels_after=count,
                                  spec=search.description.group(group), settings=settings, seed=fine_tune_seed)
                     for group, count, _ in candidates]
            results = _score(executor, tasks, evaluator.data, f"iteration {iteration + 1}", progress)
            for result in results:
                for phase, spent in result.seconds.items():
                    seconds[phase] += spent
            best = _best(results, candidates, search.groups)
            before = kept[best.group]
            model = model_from_bytes(best.model)
            kept[best.group] = best.channels_after
            value, accuracy = search.value(kept), best.accuracy
            iteration += 1
            if meter is not None:
                measured_base, measured = meter([base_model, model])

            history.append({"iteration": iteration, "target": target, "target_ratio": target / search.base_value,
                            "group": best.group, "channels_before": before, "channels_after": best.channels_after,
                            "accuracy": accuracy, **search.ratios(kept), "cost_ratio": value / search.base_value,
                            "measured_ratio": "" if meter is None else measured / measured_base,
                            "proposals": len(results), "seconds": round(time.perf_counter() - started, 3)})
            run.write_history(history)
            policy = search.policy(kept)
            run.write_best_policy(policy, iteration=iteration, accuracy=accuracy,
                                  cost_ratio=value / search.base_value, channels=dict(kept))
            _save_state(run, model, {"iteration": iteration, "kept": kept, "step": step, "accuracy": accuracy,
                                     "rows": len(history), "history": history, "measured_base_ms": measured_base,
                                     "measured_ms": measured, "proposal_seconds": dict(seconds),
                                     "fingerprint": fingerprint})
            log.info("iteration %d: %s %d -> %d channels, accuracy %.4f, %s at %.1f%% of base", iteration,
                     best.group, before, best.channels_after, accuracy, budget.metric,
                     100 * value / search.base_value)
            bar.update(1)
            bar.set_postfix(target=f"{target / search.base_value:.3f}", cost=f"{value / search.base_value:.3f}",
                            acc=f"{accuracy:.4f}", **({} if meter is None else
                                                     {"measured": f"{measured / measured_base:.3f}"}))
    finally:
        bar.close()
        if own_pool is not None:
            own_pool.shutdown(cancel_futures=True)

    if stop_reason != "budget met":
        reached = value / search.base_value if meter is None else measured / measured_base
        raise AutopruneError(
            f"NetAdapt stopped at {reached:.1%} of the base {budget.metric}"
            f"{'' if meter is None else ' (measured)'}, above the budget "
            f"{budget}: {stop_reason}; raise max_iterations or initial_reduction, lower the lower bound, "
            "or loosen the budget")
    if accuracy is None:  # the base model already meets the budget
        model.eval()
        recalibrate_bn(model, evaluator.data, num_batches=settings.bn_batches, batch_size=settings.bn_batch_size,
                       seed=settings.evaluator_seed)
        accuracy = evaluate(model, evaluator.data, "val", limit=settings.val_images)["accuracy"]
        run.write_best_policy(search.policy(kept), iteration=0, accuracy=accuracy, cost_ratio=1.0,
                              channels=dict(kept))
    policy = search.policy(kept)
    model.autoprune_policy = dict(policy)
    return {"policy": policy, "channels": dict(kept), "accuracy": accuracy,
            "cost_ratio": value / search.base_value, "model": model, "iterations": iteration,
            "stop_reason": stop_reason, "proposals": sum(int(row["proposals"]) for row in history),
            # SGD steps the returned network carries: each accepted proposal's short-term fine-tune
            "training_steps": len(history) * config.short_term_steps,
            "training_batch_size": config.short_term_batch_size,
            "measured_base_ms": measured_base, "measured_ms": measured,
            "proposal_seconds": {phase: round(spent, 3) for phase, spent in seconds.items()}}


# ---------------------------------------------------------------- the searcher (autoprune.pipeline.protocol)

class NetAdaptSearcher(BaseSearcher):
    """NetAdapt (`run_netadapt`): its network carries its short-term fine-tunes into the finish."""

    name = "netadapt"
    settings_read = ("workers", "short_term_steps", "initial_reduction", "reduction_decay", "max_iterations",
                     "measure_latency")
    default_criterion = "l2"  # the paper keeps the filters of largest L2 norm

    def floor_channels(self, description, settings) -> dict[str, int]:
        return {g.name: count_choices(g, settings.lower_bound, settings.channel_multiple)[0]
                for g in description.groups}

    def prepare(self, context) -> dict:
        """NetAdapt's settings: its defaults overridden by the settings given; on resume the saved
        ones, of which the settings may raise those a resumed search may change."""
        from dataclasses import asdict

        from autoprune.pipeline.settings import RESUMABLE

        super().prepare(context)
        s = context.settings
        if context.saved_config:
            resumable = {key: getattr(s, key) for key in RESUMABLE
                         if key in self.settings_read and getattr(s, key) is not None}
            self.config = NetAdaptConfig(**{**context.saved_config, **resumable})
        else:
            given = {key: getattr(s, key) for key in self.settings_read if getattr(s, key) is not None}
            self.config = NetAdaptConfig(**given, criterion=s.criterion or self.default_criterion,
                                         lower_bound=s.lower_bound)
        return asdict(self.config)

    def run(self, run: Run) -> SearcherResult:
        c = self.context
        found = run_netadapt(run, c.evaluator, c.constraint.budget, lut=c.lut, config=self.config,
                             seed=c.settings.seed, progress=c.progress)
        seconds = dict(found.get("proposal_seconds") or {})
        # NetAdapt scores its proposals itself, besides what its evaluator scores
        return self.result(found, seconds, evaluations=c.evaluator.evaluations + int(found.get("proposals") or 0))
