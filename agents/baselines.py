"""Baseline searchers: what AMC and NetAdapt have to beat.

- `run_uniform`: one keep ratio for every group, the largest that meets the budget.
- `run_random`: random policies inside the budget, drawn through the AMC environment
  with uniformly random actions (so they obey the same action bound as DDPG), the best
  by validation accuracy.
- `run_sensitivity`: prune each group alone over a grid of keep ratios, then give every
  group the smallest ratio whose accuracy drop stays under one threshold, the smallest
  threshold that meets the budget (Li et al., "Pruning Filters for Efficient ConvNets").
- `run_tp_global`: Torch-Pruning's own global magnitude pruning (a peer, not ours), its
  global pruning ratio bisected until the network meets the budget by the cost model or
  the LUT; its network goes on to the same recalibration and fine-tune as every other.

Each takes a run directory, a `PolicyEvaluator`, a `Budget` and an optional latency
table, writes one history row per candidate and the best policy into the run directory,
and returns at least {"policy", "accuracy", "cost_ratio"}. Random and sensitivity
searches resume after a kill: finished candidates are never evaluated again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from autoprune.budgets import DEFAULT_FILL, Budget, Constraint, check_budget, cost_ratios, uniform_ratio_for_budget
from autoprune.costs import policy_channels, uniform_policy
from autoprune.errors import AutopruneError
from autoprune.evaluation import PolicyEvaluator
from autoprune.io import atomic_write_json
from autoprune.runs import Run
from autoprune.pipeline.protocol import BaseSearcher, OwnSizes, SearcherResult
from autoprune.train import evaluate, recalibrate_bn

log = logging.getLogger(__name__)

RANDOM_STATE = "random.json"  # in the run's state directory
SENSITIVITY_FILE = "sensitivity.json"  # in the run directory: the curves, the threshold, the policy


def _cost_ratios(evaluator: PolicyEvaluator, kept: Mapping[str, int], lut=None) -> dict:
    """FLOPs, parameter and (with a LUT) latency ratios of a channel plan to the unpruned network."""
    return cost_ratios(evaluator.description, kept, lut)


def _budget_ratio(evaluator: PolicyEvaluator, budget: Budget, policy: Mapping[str, float], lut=None) -> float:
    """The policy's value of the budget's resource over the unpruned network's."""
    return Constraint(budget, evaluator.description, lut, evaluator.config.channel_multiple).check(policy).ratio


# ---------------------------------------------------------------- uniform

def run_uniform(run: Run, evaluator: PolicyEvaluator, budget: Budget, lut=None, *, seed: int = 0,
                progress: bool = True) -> dict:
    """The largest keep ratio that, given to every group, meets `budget`; one evaluation.

    `seed` and `progress` are accepted for a signature shared with the other searchers;
    the result does not depend on them.
    """
    description, multiple = evaluator.description, evaluator.config.channel_multiple
    started = time.perf_counter()
    keep_ratio = uniform_ratio_for_budget(budget, description, lut, multiple)
    policy = uniform_policy(description, keep_ratio)
    accuracy = evaluator.accuracy(policy)
    kept = policy_channels(description, policy, multiple)
    cost_ratio = _budget_ratio(evaluator, budget, policy, lut)
    run.write_history([{"candidate": 1, "keep_ratio": keep_ratio, "accuracy": accuracy,
                        **_cost_ratios(evaluator, kept, lut), "cost_ratio": cost_ratio,
                        "seconds": round(time.perf_counter() - started, 3)}])
    run.write_best_policy(policy, keep_ratio=keep_ratio, accuracy=accuracy, cost_ratio=cost_ratio)
    log.info("uniform keep ratio %.4f: accuracy %.4f at %.4f of the budget's resource", keep_ratio, accuracy,
             cost_ratio)
    return {"policy": policy, "accuracy": accuracy, "cost_ratio": cost_ratio, "keep_ratio": keep_ratio,
            "channels": kept}


# ---------------------------------------------------------------- Torch-Pruning global

def run_tp_global(run: Run, evaluator: PolicyEvaluator, budget: Budget, lut=None, *, lower_bound: float = 0.2,
                  seed: int = 0, progress: bool = True, tolerance: float = 1e-3) -> dict:
    """Torch-Pruning's global magnitude pruning at the smallest global ratio that meets `budget`.

    No group keeps fewer channels than the other agents keep at `lower_bound` (see
    `global_magnitude_prune`), and a larger ratio never keeps more. Returns Torch-Pruning's network as
    "model" (its channels, not the criterion's), with its BN-recalibrated accuracy, and
    as "sizes" the same pruning at other global ratios: size s prunes 1 - s(1 - r) of the
    channels where r is the ratio found (so a latency fit grows or shrinks the network by
    Torch-Pruning's own ranking, as the other agents' networks are grown or shrunk by
    theirs).
    """
    from autoprune.pruning import global_magnitude_prune

    description, multiple = evaluator.description, evaluator.config.channel_multiple
    base_model = evaluator.pruner.model
    started = time.perf_counter()
    history: list[dict] = []

    def attempt(ratio: float):
        model, kept, ranked = global_magnitude_prune(base_model, description, ratio, lower_bound=lower_bound)
        check = check_budget(budget, ranked, {g.name: kept[g.name] / g.channels for g in ranked.groups}, lut,
                             multiple)
        history.append({"candidate": len(history) + 1, "global_ratio": ratio, **cost_ratios(ranked, kept, lut),
                        "cost_ratio": check.ratio, "seconds": round(time.perf_counter() - started, 3)})
        return model, kept, check

    low, high = 0.0, 1.0 - lower_bound  # pruning `high` of every group meets any reachable budget
    best = attempt(high)
    if not best[2].ok:
        raise AutopruneError(f"Torch-Pruning's global pruning cannot meet {budget} with every group at the lower "
                             f"bound {lower_bound:g} or above (it reaches {best[2].ratio:.1%})")
    bar = tqdm(total=math.ceil(math.log2(max(high, tolerance) / tolerance)), desc="tp_global bisection",
               unit="step", disable=not progress)
    while high - low > tolerance:
        mid = (low + high) / 2
        found = attempt(mid)
        if found[2].ok:
            high, best = mid, found
        else:
            low = mid
        bar.update(1)
    bar.close()
    model, kept, check = best
    policy = {g.name: kept[g.name] / g.channels for g in description.groups}
    recalibrate_bn(model, evaluator.data, num_batches=evaluator.config.bn_batches,
                   batch_size=evaluator.config.bn_batch_size, seed=evaluator.config.seed)
    accuracy = evaluate(model, evaluator.data, "val", limit=evaluator.config.val_images)["accuracy"]
    run.write_history(history)
    run.write_best_policy(policy, global_ratio=high, accuracy=accuracy, cost_ratio=check.ratio, channels=kept)
    log.info("Torch-Pruning global ratio %.4f: accuracy %.4f at %.4f of the budget's resource", high, accuracy,
             check.ratio)
    found = high

    def at(size: float):
        ratio = min(1.0 - lower_bound, max(0.0, 1.0 - size * (1.0 - found)))
        return global_magnitude_prune(base_model, description, ratio, lower_bound=lower_bound)[:2]

    return {"policy": policy, "channels": kept, "accuracy": accuracy, "cost_ratio": check.ratio,
            "global_ratio": high, "model": model, "sizes": OwnSizes(at, 1.0 / (1.0 - found) if found < 1.0 else 1.0)}


# ---------------------------------------------------------------- random

def run_random(run: Run, evaluator: PolicyEvaluator, budget: Budget, lut=None, *, samples: int = 100,
               lower_bound: float = 0.2, fill: float = DEFAULT_FILL, action_mapping: str = "feasible", seed: int = 0,
               progress: bool = True) -> dict:
    """`samples` random policies inside the budget; the best by validation accuracy.

    Each policy is one episode of the AMC environment driven by actions drawn uniformly
    from [-1, 1] by `numpy.random.default_rng(seed)`, so it meets the same action bounds
    as the DDPG agent's (the budget, `fill` of it, and the lower bound). After every
    sample the history, the best policy and the state (samples done, generator state,
    best) are written atomically; a killed search continues with the next sample and
    draws what it would have drawn.
    """
    from autoprune.envs.channel_pruning import ChannelPruningEnv

    if samples < 1:
        raise AutopruneError(f"the random search needs at least one sample, got {samples}")
    env = ChannelPruningEnv(evaluator, budget, lut=lut, lower_bound=lower_bound, fill=fill,
                            action_mapping=action_mapping)
    rng = np.random.default_rng(seed)
    state_path = run.state_dir / RANDOM_STATE
    done, best, history = 0, None, []
    if state_path.is_file():
        try:
            saved = json.loads(state_path.read_text(encoding="utf-8"))
            done, best = saved["samples_done"], saved["best"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise AutopruneError(f"the search state {state_path} is damaged; delete {run.state_dir} to restart the "
                                 "search from scratch") from None
        rng.bit_generator.state = saved["rng"]
        # rows written after the last saved state are redone; the state's own copy rebuilds a damaged file
        history = (run.restore_history(saved["history"][:done]) if "history" in saved
                   else run.complete_history(done, ("candidate", "accuracy")))
        log.info("random search: resuming after sample %d", done)
    bar = tqdm(total=max(samples, done), initial=done, desc="random search", unit="policy", disable=not progress)
    for sample in range(done + 1, samples + 1):
        started = time.perf_counter()
        env.reset()
        actions = rng.uniform(-1.0, 1.0, size=len(env.groups))
        for action in actions:  # one step per group; the last one scores the policy
            _, _, _, _, info = env.step(np.array([action], dtype=np.float32))
        history.append({"candidate": sample, "accuracy": info["accuracy"],
                        **_cost_ratios(evaluator, info["channels"], lut), "cost_ratio": info["cost_ratio"],
                        "seconds": round(time.perf_counter() - started, 3)})
        if best is None or info["accuracy"] > best["accuracy"]:
            best = {"candidate": sample, "policy": info["policy"], "channels": info["channels"],
                    "accuracy": info["accuracy"], "cost_ratio": info["cost_ratio"]}
            run.write_best_policy(best["policy"], candidate=sample, accuracy=best["accuracy"],
                                  cost_ratio=best["cost_ratio"])
        run.write_history(history)
        atomic_write_json(state_path, {"samples_done": sample, "rng": rng.bit_generator.state, "best": best,
                                       "history": history})
        bar.update(1)
        bar.set_postfix(best_acc=f"{best['accuracy']:.4f}")
    bar.close()
    return {**best, "samples": max(samples, done)}


# ---------------------------------------------------------------- sensitivity

def sensitivity_grid(lower_bound: float = 0.2, step: float = 0.1) -> list[float]:
    """Keep ratios step, 2·step, … below 1 that are not under `lower_bound`, plus `lower_bound`."""
    if not 0.0 < step < 1.0:
        raise AutopruneError(f"sensitivity grid step {step} must be in (0, 1)")
    if not 0.0 < lower_bound <= 1.0:
        raise AutopruneError(f"lower bound {lower_bound} must be in (0, 1]")
    points = {round(lower_bound, 6)} if lower_bound < 1.0 else set()
    k = 1
    while k * step < 1.0 - 1e-9:
        if k * step >= lower_bound - 1e-9:
            points.add(round(k * step, 6))
        k += 1
    return sorted(points)


def policy_for_threshold(curves: Mapping[str, Mapping[float, float]], base_accuracy: float,
                         threshold: float) -> dict[str, float]:
    """Each group at the smallest keep ratio whose accuracy drop is at most `threshold`
    (1.0 when no ratio on its curve qualifies)."""
    policy = {}
    for group, curve in curves.items():
        eligible = [ratio for ratio, accuracy in curve.items() if base_accuracy - accuracy <= threshold + 1e-12]
        policy[group] = min(eligible) if eligible else 1.0
    return policy


def choose_threshold(curves: Mapping[str, Mapping[float, float]], base_accuracy: float,
                     fits: Callable[[dict[str, float]], bool]) -> tuple[float, dict[str, float]]:
    """The smallest accuracy-drop threshold whose policy `fits` the budget, and that policy.

    The policy changes only where the threshold crosses a measured drop, so the distinct
    drops (and 0) are every threshold worth trying. They are tried from the smallest up:
    the first that fits allows the least accuracy loss and leaves the least slack, since
    a larger threshold can only lower keep ratios. Raises AutopruneError when even the
    largest (every group at the bottom of its curve) does not fit.
    """
    drops = {max(0.0, base_accuracy - accuracy) for curve in curves.values() for accuracy in curve.values()}
    for threshold in sorted(drops | {0.0}):
        policy = policy_for_threshold(curves, base_accuracy, threshold)
        if fits(policy):
            return threshold, policy
    lowest = min((min(curve) for curve in curves.values() if curve), default=1.0)
    raise AutopruneError(f"the budget is unreachable on the sensitivity grid: even with every group at keep ratio "
                         f"{lowest:g} it is exceeded; lower the lower bound or loosen the budget")


def run_sensitivity(run: Run, evaluator: PolicyEvaluator, budget: Budget, lut=None, *, lower_bound: float = 0.2,
                    step: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Per-group sensitivity curves, then one accuracy-drop threshold for all groups.

    A curve point is the validation accuracy with one group at a keep ratio of
    `sensitivity_grid(lower_bound, step)` and every other group whole. The curves go to
    `sensitivity.json` in the run directory after every point, with one history row per
    point; a resumed search evaluates only the points it is missing. `seed` is accepted
    for the shared signature (the evaluator's seed drives BN recalibration).
    """
    description, multiple = evaluator.description, evaluator.config.channel_multiple
    grid = sensitivity_grid(lower_bound, step)
    path = run.path / SENSITIVITY_FILE
    points: list[dict] = []
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("grid") == grid:
            points = saved["points"]
            log.info("sensitivity: %d curve points already measured", len(points))
    measured = {(p["group"], p["keep_ratio"]): p for p in points}
    full = uniform_policy(description, 1.0)
    base_accuracy = evaluator.accuracy(full)

    def save(extra: dict | None = None) -> None:
        curves = {g.name: [[p["keep_ratio"], p["accuracy"]] for p in points if p["group"] == g.name]
                  for g in description.groups}
        atomic_write_json(path, {"base_accuracy": base_accuracy, "grid": grid, "curves": curves, "points": points,
                                 **(extra or {})})
        run.write_history(points)

    todo = [(g.name, ratio) for g in description.groups for ratio in grid if (g.name, ratio) not in measured]
    bar = tqdm(total=len(description.groups) * len(grid), initial=len(points), desc="sensitivity", unit="point",
               disable=not progress)
    for group, ratio in todo:
        started = time.perf_counter()
        policy = {**full, group: ratio}
        accuracy = evaluator.accuracy(policy)
        kept = policy_channels(description, policy, multiple)
        point = {"point": len(points) + 1, "group": group, "keep_ratio": ratio, "channels": kept[group],
                 "accuracy": accuracy, "accuracy_drop": base_accuracy - accuracy,
                 **_cost_ratios(evaluator, kept, lut), "seconds": round(time.perf_counter() - started, 3)}
        points.append(point)
        measured[(group, ratio)] = point
        save()
        bar.update(1)
    bar.close()

    curves = {g.name: {ratio: measured[(g.name, ratio)]["accuracy"] for ratio in grid} for g in description.groups}

    def fits(policy: dict[str, float]) -> bool:
        return check_budget(budget, description, policy, lut, multiple).ok

    threshold, policy = choose_threshold(curves, base_accuracy, fits)
    accuracy = evaluator.accuracy(policy)
    cost_ratio = _budget_ratio(evaluator, budget, policy, lut)
    save({"threshold": threshold, "policy": policy, "accuracy": accuracy, "cost_ratio": cost_ratio})
    run.write_best_policy(policy, threshold=threshold, accuracy=accuracy, cost_ratio=cost_ratio)
    log.info("sensitivity: threshold %.4f, accuracy %.4f at %.4f of the budget's resource", threshold, accuracy,
             cost_ratio)
    return {"policy": policy, "channels": policy_channels(description, policy, multiple), "accuracy": accuracy,
            "cost_ratio": cost_ratio, "threshold": threshold, "base_accuracy": base_accuracy,
            "curve_points": len(points)}


# ---------------------------------------------------------------- the searchers (autoprune.pipeline.protocol)

class UniformSearcher(BaseSearcher):
    """One keep ratio for every group (`run_uniform`)."""

    name = "uniform"

    def run(self, run: Run) -> SearcherResult:
        c = self.context
        return self.result(*self.with_phases(lambda r: run_uniform(r, c.evaluator, c.constraint.budget, c.lut,
                                                                   seed=c.settings.seed, progress=c.progress), run))


class TPGlobalSearcher(BaseSearcher):
    """Torch-Pruning's global magnitude pruning bisected to the budget (`run_tp_global`)."""

    name = "tp_global"

    def run(self, run: Run) -> SearcherResult:
        c = self.context
        return self.result(*self.with_phases(lambda r: run_tp_global(
            r, c.evaluator, c.constraint.budget, c.lut, lower_bound=c.settings.lower_bound, seed=c.settings.seed,
            progress=c.progress), run))


class RandomSearcher(BaseSearcher):
    """Random policies through AMC's environment (`run_random`)."""

    name = "random"
    settings_read = ("samples", "fill", "action_mapping")
    ranks_candidates = True

    def prepare(self, context) -> dict | None:
        from autoprune.envs.channel_pruning import ChannelPruningEnv

        s = context.settings  # the environment refuses bad bounds now, before the run directory exists
        ChannelPruningEnv(context.evaluator, context.constraint.budget, lut=context.lut, lower_bound=s.lower_bound,
                          fill=s.fill, action_mapping=s.action_mapping)
        return super().prepare(context)

    def run(self, run: Run) -> SearcherResult:
        c, s = self.context, self.context.settings
        return self.result(*self.with_phases(lambda r: run_random(
            r, c.evaluator, c.constraint.budget, c.lut, samples=s.samples, lower_bound=s.lower_bound, fill=s.fill,
            action_mapping=s.action_mapping, seed=s.seed, progress=c.progress), run))


class SensitivitySearcher(BaseSearcher):
    """Per-group sensitivity curves and one accuracy-drop threshold (`run_sensitivity`)."""

    name = "sensitivity"
    settings_read = ("sensitivity_step",)
    ranks_candidates = True

    def check(self, settings) -> None:
        sensitivity_grid(settings.lower_bound, settings.sensitivity_step)

    def run(self, run: Run) -> SearcherResult:
        c, s = self.context, self.context.settings
        return self.result(*self.with_phases(lambda r: run_sensitivity(
            r, c.evaluator, c.constraint.budget, c.lut, lower_bound=s.lower_bound, step=s.sensitivity_step,
            seed=s.seed, progress=c.progress), run))
