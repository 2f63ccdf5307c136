"""Landing a latency budget by measurement: the searched network, timed, scaled to fit.

A LUT adds up layers timed alone. Inside a network the same layers run slower, and by
how much depends on the network's shape: on the family 6 model 167 Xeon, ResNet-20's
conv units run back to back took 6 % longer than alone at a uniform policy and 14-19 %
longer at the uneven policies NetAdapt and DDPG chose, so a table calibrated on whole
networks still under-predicted those by 5-16 % and they missed a 50 % budget by up to
7 points. A search ranks policies by the table; the finish then times the chosen network
in a fresh process against the unpruned one (PAIR_TIMINGS times, the median counting:
one timing under load once put a network quietly at 50.0-51.6 % at 52.5 %), and while it
lies outside the window [budget - WINDOW, budget] (WINDOW of the unpruned network's
latency) scales every group's kept channels by one factor, chosen on the table corrected
by the last measurement, and times again. A searcher that can make its own network at
other sizes (Torch-Pruning's global pruning, at other global ratios) is fitted along that
family instead, so that its network may grow as well as shrink and stays its own.

Only on the CPU the LUT was measured on (elsewhere the table is all there is). The
network found is written to the run's state before fine-tuning, so a resumed run
fine-tunes the same network although timings differ from one call to the next.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping

import torch.nn as nn

from autoprune.budgets import Constraint
from autoprune.costs import NetworkDescription, _group_floor, group_multiple
from autoprune.io import atomic_write_json
from autoprune.latency import PAIR_TIMINGS, LatencyWorker, describe_device, median_timing, same_device, this_device

log = logging.getLogger(__name__)

WINDOW = 0.03  # a latency budget is met when the network measures within this share of the unpruned latency below it
ROUNDS = 4  # networks timed after the first, at most
FIT_FILE = "latency_fit.json"


def scaled_channels(description: NetworkDescription, kept: Mapping[str, int], factor: float, multiple: int = 1,
                    grow: bool = True) -> dict[str, int]:
    """Every group's kept channels times `factor`, rounded to what the group allows, never
    below its floor nor above its size (nor above `kept` when not `grow`).

    Each group rounds at its own offset (the i-th of n at (i + ½)/n of a step), so that as
    the factor moves the groups change one at a time: the plans step by one group's step,
    not by every group's at once (at a few channels per group, one step of all of them
    moved a ResNet-20 by more than the whole window)."""
    out = {}
    n = len(description.groups)
    for i, g in enumerate(description.groups):
        step = group_multiple(g, multiple)
        count = math.floor(kept[g.name] * factor / step + (i + 0.5) / n) * step
        count = max(_group_floor(g, step), min(g.channels, count))
        out[g.name] = count if grow else min(count, kept[g.name])
    return out


def factor_for(predict: Callable[[dict[str, int]], float], plan_for: Callable[[float], dict[str, int]], top: float,
               target_ms: float, halvings: int = 40) -> float:
    """The largest factor in [0, `top`] whose plan `plan_for(factor)` the table predicts at
    or below `target_ms` (0 when none is: the smallest plan of the family). Plans grow with
    the factor."""
    low, high = 0.0, top
    if predict(plan_for(high)) <= target_ms:
        return high
    for _ in range(halvings):
        middle = (low + high) / 2
        if predict(plan_for(middle)) <= target_ms:
            low = middle
        else:
            high = middle
    return low


def _next_target(steps: list[dict], aim: float) -> float:
    """The table's value to aim at next: interpolated between the closest networks measured
    over and under the aim, else the last one's value corrected by its measurement."""
    over = [s for s in steps if s["measured_ratio"] > aim]
    under = [s for s in steps if s["measured_ratio"] <= aim]
    if over and under:
        a = max(under, key=lambda s: s["measured_ratio"])
        b = min(over, key=lambda s: s["measured_ratio"])
        if b["lut_ms"] > a["lut_ms"]:
            share = (aim - a["measured_ratio"]) / (b["measured_ratio"] - a["measured_ratio"])
            return a["lut_ms"] + share * (b["lut_ms"] - a["lut_ms"])
    last = steps[-1]
    return last["lut_ms"] * aim / last["measured_ratio"]


def fit_measured_latency(constraint: Constraint, kept: Mapping[str, int], build: Callable[[dict[str, int]], nn.Module],
                         base_model: nn.Module, input_shape: tuple[int, int, int], *, grow: bool,
                         sizes: tuple[Callable[[float], dict[str, int]], float] | None = None,
                         state_dir=None, worker: LatencyWorker | None = None) -> tuple[dict[str, int], dict]:
    """The channel plan that meets a latency budget as measured on this machine, and a record.

    The plans tried are `scaled_channels(kept, factor)`, or with `sizes` = (`plan_for`,
    `largest`) a family of the searcher's own, `plan_for(factor)` for factors up to
    `largest` (`plan_for(1)` being `kept`); `build(plan)` makes the network of one, which is
    timed against the unpruned one PAIR_TIMINGS times and judged by the timing with
    the median share of the limit (`median_timing`). `grow` allows plans larger than
    `kept` (False when the network is the search's own and can only lose channels; ignored
    with `sizes`). Returns (`kept` unchanged, a record saying why)
    when there is nothing to fit: not a latency budget, or a LUT from another CPU. With
    `state_dir` the result is kept in FIT_FILE there and read back on the next call.
    """
    budget, lut, description = constraint.budget, constraint.lut, constraint.description
    kept = {g.name: int(kept.get(g.name, g.channels)) for g in description.groups}
    if budget.metric != "latency" or lut is None:
        return kept, {"fitted": False, "reason": "not a latency budget"}
    lut_device = lut.data.get("device") or {}
    if not same_device(lut_device):
        reason = (f"the LUT was measured on {describe_device(lut_device)}, this machine is {this_device()}: "
                  "the table alone sets the network")
        log.info("latency fit skipped: %s", reason)
        return kept, {"fitted": False, "reason": reason}
    path = None if state_dir is None else state_dir / FIT_FILE
    # how the plans were made: a saved fit is read back only for the same start and the same way
    # (a file without it predates the searchers' own families and was made by scaling)
    how = "own sizes" if sizes is not None else "scaled" if grow else "scaled, shrink only"
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            saved_how = saved.get("how", how if sizes is None else "scaled")
            if saved.get("start") == kept and saved_how == how:
                return {name: int(v) for name, v in saved["channels"].items()}, saved["record"]
            other = "another starting network" if saved.get("start") != kept else f"plans made {saved_how}"
            log.warning("%s was written for %s; fitting again", path, other)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            log.warning("%s is unreadable; fitting again", path)

    def predict(plan: dict[str, int]) -> float:
        return lut.predict_ms(description, plan)

    if sizes is None:
        halvings = 40  # the plan changes in whole channels: 40 halvings are well past the last change
        top = max(1.0, *(g.channels / max(1, kept[g.name]) for g in description.groups)) if grow else 1.0

        def plan_for(factor: float) -> dict[str, int]:
            return scaled_channels(description, kept, factor, constraint.multiple, grow)
    else:
        # each of these plans is a pruning of the searcher's own: fewer halvings, each still
        # finer than the plan's smallest change over a range of a few units
        (plan_for, top), grow, halvings = sizes, True, 14

    own_worker = worker is None
    worker = worker or LatencyWorker(input_shape, lut)
    steps: list[dict] = []
    try:
        plan, factor = dict(kept), 1.0
        for round_index in range(ROUNDS + 1):
            network = build(plan)
            timings = [[float(v) for v in worker([base_model, network])] for _ in range(PAIR_TIMINGS)]
            base_ms, ms = median_timing(timings, key=lambda pair: pair[1] / budget.limit(pair[0]))
            limit = budget.limit(base_ms)
            low = limit - WINDOW * base_ms
            steps.append({"factor": factor, "channels": plan, "lut_ms": predict(plan),
                          "lut_ratio": predict(plan) / constraint.base_value, "measured_ms": ms,
                          "measured_base_ms": base_ms, "measured_ratio": ms / base_ms, "limit_ms": limit,
                          "window_low_ms": low, "timings": timings})
            if low <= ms <= limit or (ms < low and not grow and factor >= 1.0) or round_index == ROUNDS:
                break
            aim = (limit - WINDOW * base_ms / 2) / base_ms
            factor = factor_for(predict, plan_for, top, _next_target(steps, aim), halvings)
            candidate = plan_for(factor)
            if any(s["channels"] == candidate for s in steps):
                break  # the table cannot tell a plan between two already timed
            plan = candidate
    finally:
        if own_worker:
            worker.close()
    within = [i for i, s in enumerate(steps) if s["measured_ms"] <= s["limit_ms"]]
    # the slowest network under the limit, else the fastest; each compared with the limit of the
    # timing it had (the unpruned network's time, which sets a relative limit, varies a little)
    share = [s["measured_ms"] / s["limit_ms"] for s in steps]
    chosen = max(within, key=share.__getitem__) if within else min(range(len(steps)), key=share.__getitem__)
    last = steps[chosen]
    met = last["window_low_ms"] <= last["measured_ms"] <= last["limit_ms"]
    record = {"fitted": True, "met": met, "window": WINDOW, "chosen": chosen, "steps": steps,
              "measured_on": this_device()}
    if not met:
        log.warning("the network measures %.1f %% of the unpruned latency, outside [%.1f, %.1f] %% after %d timings",
                    100 * last["measured_ratio"], 100 * last["window_low_ms"] / last["measured_base_ms"],
                    100 * last["limit_ms"] / last["measured_base_ms"], len(steps))
    result = {name: int(v) for name, v in steps[chosen]["channels"].items()}
    if path is not None:
        atomic_write_json(path, {"start": kept, "how": how, "channels": result, "record": record})
    return result, record
