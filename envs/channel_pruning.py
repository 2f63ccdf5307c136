"""AMC's channel-pruning environment (He et al., ECCV 2018) over autoprune's core."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from autoprune.budgets import DEFAULT_FILL, Budget, Constraint
from autoprune.costs import count_cost, group_choices, group_costs, group_keep
from autoprune.errors import AutopruneError, SettingError
from autoprune.evaluation import PolicyEvaluator

OBSERVATION_FEATURES = ("index", "layer_type", "in_channels", "out_channels", "stride", "kernel", "feature_size",
                        "cost", "reduced", "rest", "previous_action", "lowest_keep", "highest_keep")
ACTION_MAPPINGS = ("feasible", "centred", "absolute")


@dataclass(frozen=True)
class EpisodeResult:
    """What a finished episode produced; every value is JSON-safe."""

    accuracy: float
    flops: int
    params: int
    latency_ms: float | None


def _error(result: EpisodeResult) -> float:
    return 1.0 - result.accuracy


REWARDS: dict[str, Callable[[EpisodeResult], float]] = {
    # AMC's R_err: minus the validation error
    "acc": lambda r: -_error(r),
    # AMC's R_FLOPs: error weighted by log FLOPs, rewarding cheaper networks a little
    "acc_flops": lambda r: -_error(r) * math.log(max(r.flops, 1)),
    "acc_params": lambda r: -_error(r) * math.log(max(r.params, 1)),
    # latency in microseconds, so that the logarithm stays positive
    "acc_latency": lambda r: -_error(r) * math.log(max(1000.0 * (r.latency_ms or 0.0), 1.0)),
}


class ChannelPruningEnv(gym.Env):
    """Decide, group by group in network order, how many channels to keep.

    ## Action Space
    `Box(-1, 1, (1,), float32)`. Two bounds limit the channels a group may keep. From above,
    AMC's action bound: the budget must stay reachable if every later group goes to the
    lower bound, so every episode ends inside the budget, whatever the agent does. From
    below, the fill bound: `fill` of the budget must stay reachable if every later group is
    kept whole, so an episode uses at least that share of the budget unless the groups'
    channel steps are too coarse for it (the budget wins then). Without it nothing steers
    a policy towards its budget, and at tight budgets a search can settle on a policy that
    keeps far less than it may. With `action_mapping="feasible"` (the default) the action
    is mapped linearly onto the keep ratios between the two bounds, then rounded to a
    channel count: every action takes effect, and the agent's whole action range is spent
    where the budget leaves a choice. With `"absolute"` (AMC's, and v0's) it maps onto
    `[lower_bound, 1]` and is then clipped to the bounds; at a budget that removes most of
    the network nearly all of that range lies outside them and every action there has the
    same effect. (Measured at 50 % latency: with `absolute` the actor settled at "keep
    everything", the bounds doing all the allocating; with `feasible` it settled at the
    other edge, every group at its lowest allowed count. Neither mapping keeps DDPG's
    actor off the edges; BENCHMARKS.md.) With `"centred"` the same range is split at the
    count the uniform policy over the groups still to decide would give (`even_count`):
    actions in [−1, 0] map linearly onto the counts from the lower end of the range up to
    that count, actions in [0, 1] onto the counts from it up to the action bound, so an
    actor that outputs 0 everywhere reproduces the uniform policy.

    ## Observation Space
    `Box(0, 1, (11,), float32)`, AMC's layer embedding, each feature scaled to [0, 1]:
    index of the group, layer type (0 conv, 0.5 depthwise, 1 linear), input channels and
    output channels of its first layer (over the network's largest), stride, kernel,
    input feature-map size (over the image size), the group's share of the budget's
    resource, the share already removed by earlier decisions, the share of the groups
    still to come, the previous keep ratio, and the lowest and highest keep ratio the
    bounds allow this group (`Box(0, 1, (13,), float32)`).

    ## Rewards
    Zero until the last step. At the last step the policy is applied (channels removed for
    real), BatchNorm is recalibrated on a few training batches, and accuracy is measured on
    a fixed validation subset held out from the training set. The reward comes from
    `REWARDS[reward]`: `acc` (−error, AMC's R_err), `acc_flops` (−error·log FLOPs),
    `acc_params` (−error·log params), `acc_latency` (−error·log latency in µs, LUT).

    ## Episode End
    Terminates after one step per prunable group; never truncates. Every `info` holds
    `effective_action`: the action that took effect after rounding and the action bound.
    The final `info` also holds `policy` (group → keep ratio), `channels`, `cost_ratio`,
    `flops`, `params`, `latency_ms`, `accuracy` and `reward`.

    ## Arguments
    - `evaluator`: a `PolicyEvaluator` (base model, data, criterion, BN recalibration).
    - `budget`: a `Budget` (`parse_budget("50%flops")`).
    - `lut`: a `LatencyTable`, needed for latency budgets and the `acc_latency` reward.
    - `lower_bound`: smallest keep ratio an action maps to (default 0.2).
    - `reward`: a key of `REWARDS` (default `acc`).
    - `fill`: share of the budget every episode is steered to use, in [0, 1] (default
      0.95; 0 turns the bound off, as in AMC).
    - `action_mapping`: `feasible` (default), `centred` or `absolute` (see Action Space).

    ## Version History
    - v1: the group's, removed and remaining shares are of the budget's resource (latency
      from the LUT, parameters), not always FLOPs; the action maps onto the keep ratios
      the bounds allow, which the observation now carries (13 features); candidates may be
      fine-tuned for a few steps before they are scored (`EvaluatorConfig.score_steps`).
    - v0: first version.
    """

    metadata = {"render_modes": []}

    def __init__(self, evaluator: PolicyEvaluator, budget: Budget, lut=None, lower_bound: float = 0.2,
                 reward: str = "acc", fill: float = DEFAULT_FILL, action_mapping: str = "feasible"):
        super().__init__()
        if action_mapping not in ACTION_MAPPINGS:
            raise AutopruneError(f"unknown action mapping {action_mapping!r}; choose one of {', '.join(ACTION_MAPPINGS)}")
        self.action_mapping = action_mapping
        if reward not in REWARDS:
            raise AutopruneError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        if not 0.0 < lower_bound <= 1.0:
            raise AutopruneError(f"lower bound {lower_bound} must be in (0, 1]")
        if not 0.0 <= fill <= 1.0:
            raise AutopruneError(f"fill {fill} must be in [0, 1]")
        if (budget.metric == "latency" or reward == "acc_latency") and lut is None:
            raise SettingError("lut", "a latency budget or reward needs a latency table")
        self.evaluator = evaluator
        self.description = evaluator.description
        if not self.description.groups:
            raise AutopruneError("the model has no prunable layer; nothing to search")
        self.budget, self.lut, self.lower_bound, self.reward_name = budget, lut, lower_bound, reward
        self.groups = self.description.groups
        multiple = evaluator.config.channel_multiple
        self._choices = [group_choices(g, multiple) for g in self.groups]
        self._floor = [group_keep(g, lower_bound, multiple) for g in self.groups]
        self._full = {g.name: g.channels for g in self.groups}
        self.constraint = Constraint(budget, self.description, lut, multiple)
        self.base_value, self.limit = self.constraint.base_value, self.constraint.limit
        self.fill = fill
        self.target = fill * self.limit  # what every episode is steered to use at least
        self.constraint.check_reachable({g.name: c for g, c in zip(self.groups, self._floor)}, lower_bound)
        self._static = self._static_features()
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)
        self._kept: dict[str, int] = {}
        self._t = 0
        self._previous = 1.0
        self.seconds = 0.0  # wall time spent inside reset() and step(), for profiling searches

    # ------------------------------------------------------------ helpers

    def base_costs(self) -> dict:
        """FLOPs, parameters and (with a LUT) latency of the unpruned network."""
        cost = count_cost(self.description)
        latency = self.lut.predict_ms(self.description) if self.lut is not None else None
        return {"flops": cost.flops, "params": cost.params, "latency_ms": latency}

    def _value(self, kept: dict[str, int]) -> float:
        return self.constraint.value(kept)

    def _resource_shares(self) -> list[float]:
        """Each group's share of the budget's resource (see Observation Space)."""
        if self.budget.metric == "latency":
            return [(self.base_value - self._value({**self._full, g.name: floor})) / self.base_value
                    for g, floor in zip(self.groups, self._floor)]
        shares = group_costs(self.description)
        total = count_cost(self.description)
        if self.budget.metric == "params":
            return [shares[g.name].params / max(1, total.params) for g in self.groups]
        return [shares[g.name].flops / max(1, total.flops) for g in self.groups]

    def _static_features(self) -> np.ndarray:
        layers = {layer.name: layer for layer in self.description.layers}
        resource = self._resource_shares()
        firsts = [layers[g.producers[0]] for g in self.groups]
        max_in = max(max(layer.in_channels for layer in firsts), 1)
        max_out = max(g.channels for g in self.groups)
        max_stride = max(max(layer.stride) for layer in firsts)
        max_kernel = max(max(layer.kernel) for layer in firsts)
        image = max(self.description.input_shape[1], 1)
        rows = []
        for t, (g, first) in enumerate(zip(self.groups, firsts)):
            kind = 1.0 if first.kind == "linear" else 0.5 if any(
                layers[p].kind == "dwconv" for p in g.producers) else 0.0
            rows.append([t / max(1, len(self.groups) - 1), kind, first.in_channels / max_in, g.channels / max_out,
                         max(first.stride) / max_stride, max(first.kernel) / max_kernel,
                         first.in_size[0] / image, resource[t]])
        return np.asarray(rows, dtype=np.float64)

    def _observation(self) -> np.ndarray:
        t = min(self._t, len(self.groups) - 1)
        current = {**self._full, **self._kept}
        reduced = (self.base_value - self._value(current)) / self.base_value
        rest = sum(self._static[i, 7] for i in range(t + 1, len(self.groups)))
        low, high = self.count_range(t)
        channels = self.groups[t].channels
        obs = np.concatenate([self._static[t], [reduced, rest, self._previous, low / channels, high / channels]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def count_range(self, t: int) -> tuple[int, int]:
        """The fewest and the most channels group t may keep, given the decisions so far:
        (lower bound and fill bound, action bound); the budget wins where they cross."""
        high = self.max_feasible(t)
        low = min(max(self._floor[t], self.min_to_fill(t)), high)
        return low, high

    def max_feasible(self, t: int) -> int:
        """Largest count for group t such that the budget holds with later groups at the lower bound."""
        later = {g.name: self._floor[i] for i, g in enumerate(self.groups) if i > t}
        choices = self._choices[t]

        def fits(count: int) -> bool:
            return self.constraint.fits({**self._kept, **later, self.groups[t].name: count})

        lo, hi = choices.index(self._floor[t]), len(choices) - 1
        while lo < hi:  # the cost grows with the count: binary search, then check
            mid = (lo + hi + 1) // 2
            if fits(choices[mid]):
                lo = mid
            else:
                hi = mid - 1
        while lo > 0 and not fits(choices[lo]):
            lo -= 1  # a latency table need not be monotone everywhere
        return choices[lo]

    def min_to_fill(self, t: int) -> int:
        """Smallest count for group t such that `fill` of the budget can still be used with
        later groups kept whole (the whole group if even that falls short)."""
        choices = self._choices[t]
        if self.target <= 0:
            return choices[0]
        name = self.groups[t].name

        def reaches(count: int) -> bool:
            return self._value({**self._full, **self._kept, name: count}) >= self.target

        lo, hi = 0, len(choices) - 1
        while lo < hi:  # the cost grows with the count: the first count that reaches the target
            mid = (lo + hi) // 2
            if reaches(choices[mid]):
                hi = mid
            else:
                lo = mid + 1
        return choices[lo]

    def even_count(self, t: int) -> int:
        """The count group t keeps when it and every later group keep one keep ratio, the
        largest with which the budget holds (each group at least at its lower bound): the
        uniform policy over what is left to decide."""
        rest = self.groups[t:]
        multiple = self.evaluator.config.channel_multiple

        def kept(ratio: float) -> dict[str, int]:
            return {**self._kept, **{g.name: max(self._floor[t + i], group_keep(g, ratio, multiple))
                                     for i, g in enumerate(rest)}}

        if self.constraint.fits(kept(1.0)):
            return self.groups[t].channels
        low, high = 0.0, 1.0
        for _ in range(14):  # bisection to 1e-4 in keep ratio, finer than one channel of any group here
            mid = (low + high) / 2
            if self.constraint.fits(kept(mid)):
                low = mid
            else:
                high = mid
        # nothing fits, not even every later group at its floor (a latency table that is not
        # monotone everywhere can leave an episode there): the fewest channels
        return kept(max(low, 1e-9))[self.groups[t].name]

    def action_to_count(self, t: int, action: float) -> int:
        """The channel count an action gives group t (see Action Space)."""
        return self._act(t, action)[0]

    def _act(self, t: int, action: float) -> tuple[int, float]:
        """(channel count, the action that took effect once the count is rounded and bounded)."""
        action = float(np.clip(action, -1.0, 1.0))
        g = self.groups[t]
        multiple = self.evaluator.config.channel_multiple
        low, high = self.count_range(t)
        if self.action_mapping == "absolute":
            ratio = self.lower_bound + (action + 1.0) / 2.0 * (1.0 - self.lower_bound)
            count = int(min(max(group_keep(g, ratio, multiple), low), high))
            kept = count / g.channels
            effective = float(np.clip(2.0 * (kept - self.lower_bound) / (1.0 - self.lower_bound) - 1.0, -1, 1)) \
                if self.lower_bound < 1.0 else 1.0
            return count, effective
        if high <= low:
            return low, action  # one count only: every action has the same effect
        choices = [c for c in self._choices[t] if low <= c <= high] or [low]
        if self.action_mapping == "centred":
            centre = min(max(self.even_count(t), low), high)
            wanted = centre + action * ((centre - low) if action < 0 else (high - centre))
            count = min(choices, key=lambda c: (abs(c - wanted), c))
            if count == centre:
                return int(count), 0.0
            span = (centre - low) if count < centre else (high - centre)
            return int(count), float(np.clip((count - centre) / span, -1.0, 1.0))
        wanted = low + (action + 1.0) / 2.0 * (high - low)
        count = min(choices, key=lambda c: (abs(c - wanted), c))
        return int(count), float(2.0 * (count - low) / (high - low) - 1.0)

    # ------------------------------------------------------------ Gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        started = time.perf_counter()
        super().reset(seed=seed)
        self._kept, self._t, self._previous = {}, 0, 1.0
        observation = self._observation()
        self.seconds += time.perf_counter() - started
        return observation, {}

    def step(self, action):
        started = time.perf_counter()
        try:
            return self._step(action)
        finally:
            self.seconds += time.perf_counter() - started

    def _step(self, action):
        if self._t >= len(self.groups):
            raise RuntimeError("step() called after the episode ended; call reset()")
        t = self._t
        g = self.groups[t]
        count, effective = self._act(t, float(np.asarray(action, dtype=np.float64).reshape(-1)[0]))
        self._kept[g.name] = count
        self._previous = count / g.channels
        self._t += 1
        if self._t < len(self.groups):
            return self._observation(), 0.0, False, False, {"effective_action": effective}
        policy = {gg.name: self._kept[gg.name] / gg.channels for gg in self.groups}
        accuracy = self.evaluator.accuracy(policy)
        cost = count_cost(self.description, self._kept)
        latency = self.lut.predict_ms(self.description, self._kept) if self.lut is not None else None
        result = EpisodeResult(accuracy=accuracy, flops=cost.flops, params=cost.params, latency_ms=latency)
        reward = float(REWARDS[self.reward_name](result))
        value = self._value(self._kept)
        info = {"policy": policy, "channels": dict(self._kept), "cost_ratio": value / self.base_value,
                "accuracy": accuracy, "flops": cost.flops, "params": cost.params, "latency_ms": latency,
                "reward": reward, "effective_action": effective}
        return self._observation(), reward, True, False, info
