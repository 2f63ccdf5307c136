"""Resource budgets: one parser for every form a user may write.

`50%flops` means the pruned model keeps at most 50 % of the original FLOPs (MACs), as
in AMC's "50% FLOPs". Relative budgets exist for `flops`, `params` and `latency`;
absolute ones are written with a unit: `20MFLOPs`, `150kparams`, `3.5ms`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from autoprune.errors import AutopruneError

METRICS = ("flops", "params", "latency")

ACCEPTED_FORMS = ("N%flops, N%params, N%latency (N in (0, 100]); "
                  "absolute: 20MFLOPs, 1.5GFLOPs, 800kFLOPs (MACs), 150kparams, 1.2Mparams, 3.5ms, 900us")

# share of the budget an episode of the AMC environment is steered to use (its lower action bound)
DEFAULT_FILL = 0.95
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_RELATIVE = re.compile(r"^(?P<num>\d+(\.\d*)?|\.\d+)%(?P<metric>flops|macs|params|latency)$")
_ABSOLUTE_COUNT = re.compile(r"^(?P<num>\d+(\.\d*)?|\.\d+)(?P<scale>[kmg]?)(?P<metric>flops|macs|params)$")
_ABSOLUTE_TIME = re.compile(r"^(?P<num>\d+(\.\d*)?|\.\d+)(?P<unit>ms|us|µs)$")


@dataclass(frozen=True)
class Budget:
    """A cap on one resource: relative to the unpruned model (`fraction`) or absolute (`amount`)."""

    metric: str  # "flops", "params" or "latency"
    fraction: float | None = None  # of the unpruned model's value, in (0, 1]
    amount: float | None = None  # FLOPs, parameters, or milliseconds
    text: str = ""  # what the user wrote

    def limit(self, base_value: float) -> float:
        """The largest allowed value, given the unpruned model's value."""
        return self.fraction * base_value if self.fraction is not None else float(self.amount)

    def ratio(self, base_value: float) -> float:
        """The allowed fraction of the unpruned model's value."""
        return self.limit(base_value) / base_value

    @property
    def tag(self) -> str:
        """Short form for directory names: 50pflops, 20MFLOPs, 3.5ms."""
        if self.fraction is not None:
            return f"{self.fraction * 100:g}p{self.metric}"
        return re.sub(r"[^0-9A-Za-z.]", "", self.text)

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}% {self.metric}"
        return self.text


def parse_budget(text: str) -> Budget:
    """Parse a budget string; raises AutopruneError listing every accepted form."""
    cleaned = str(text).strip().lower().replace(" ", "")
    match = _RELATIVE.match(cleaned)
    if match:
        percent = float(match["num"])
        metric = "flops" if match["metric"] == "macs" else match["metric"]
        if percent <= 0:
            raise AutopruneError(f"budget {text!r} must be above 0 %")
        if percent > 100:
            raise AutopruneError(f"budget {text!r} is above 100 %: a pruned model cannot cost more than the "
                                 "original; write e.g. 50%{metric}".replace("{metric}", metric))
        return Budget(metric=metric, fraction=percent / 100.0, text=str(text).strip())
    match = _ABSOLUTE_COUNT.match(cleaned)
    if match:
        amount = float(match["num"]) * _SCALE[match["scale"]]
        metric = "params" if match["metric"] == "params" else "flops"
        if amount <= 0:
            raise AutopruneError(f"budget {text!r} must be positive")
        return Budget(metric=metric, amount=amount, text=str(text).strip())
    match = _ABSOLUTE_TIME.match(cleaned)
    if match:
        ms = float(match["num"]) * (1.0 if match["unit"] == "ms" else 1e-3)
        if ms <= 0:
            raise AutopruneError(f"budget {text!r} must be positive")
        return Budget(metric="latency", amount=ms, text=str(text).strip())
    raise AutopruneError(f"cannot read budget {text!r}; accepted forms: {ACCEPTED_FORMS}")


TOLERANCE = 1e-9  # relative slack when a value is compared with a limit: a plan at the limit fits


@dataclass(frozen=True)
class BudgetCheck:
    """A policy's value of the budget's metric against the limit (units: FLOPs, params or ms)."""

    value: float
    limit: float
    base: float

    @property
    def ok(self) -> bool:
        return self.value <= self.limit * (1 + TOLERANCE)

    @property
    def ratio(self) -> float:
        return self.value / self.base


def resource_value(metric: str, description, kept, lut=None) -> float:
    """FLOPs, parameters (cost model) or latency in ms (LUT) of a network keeping `kept` channels."""
    from autoprune.costs import count_cost

    if metric == "latency":
        if lut is None:
            raise AutopruneError("a latency budget needs a latency table (build one with `autoprune lut build` "
                                 "on the target device)")
        return lut.predict_ms(description, kept)
    cost = count_cost(description, kept)
    return float(cost.flops if metric == "flops" else cost.params)


def cost_ratios(description, kept, lut=None) -> dict[str, float | None]:
    """FLOPs, parameter and (with a LUT) latency of a channel plan over the unpruned network's."""
    from autoprune.costs import count_cost

    base, cost = count_cost(description), count_cost(description, kept)
    latency = None if lut is None else lut.predict_ms(description, kept) / lut.predict_ms(description)
    return {"flops_ratio": cost.flops / base.flops, "params_ratio": cost.params / base.params,
            "latency_ratio": latency}


class Constraint:
    """A budget bound to one network description: the unpruned value, the limit, and the
    value, fit and cost ratios of any channel plan ({group: channels kept}; groups left
    out are kept whole). Every searcher, the environment and the reports measure a plan
    against the budget through one of these, with one tolerance (`TOLERANCE`).
    """

    def __init__(self, budget: Budget, description, lut=None, multiple: int = 1):
        if budget.metric == "latency" and lut is None:
            raise AutopruneError("a latency budget needs a latency table (build one with `autoprune lut build` "
                                 "on the target device)")
        if lut is not None:
            lut.check_model(description)
        self.budget, self.description, self.lut, self.multiple = budget, description, lut, multiple
        self.full = {g.name: g.channels for g in description.groups}
        self.base_value = self.value(self.full)
        self.limit = budget.limit(self.base_value)

    def value(self, kept: Mapping[str, int]) -> float:
        """The plan's value of the budget's resource (FLOPs, parameters or ms)."""
        return resource_value(self.budget.metric, self.description, {**self.full, **kept}, self.lut)

    def fits(self, kept: Mapping[str, int]) -> bool:
        return self.value(kept) <= self.limit * (1 + TOLERANCE)

    def ratio(self, kept: Mapping[str, int]) -> float:
        """The plan's value over the unpruned network's."""
        return self.value(kept) / self.base_value

    def channels(self, policy: Mapping[str, float]) -> dict[str, int]:
        """The channel plan of a policy ({group: keep ratio})."""
        from autoprune.costs import policy_channels

        return policy_channels(self.description, policy, self.multiple)

    def check(self, policy: Mapping[str, float]) -> BudgetCheck:
        return BudgetCheck(value=self.value(self.channels(policy)), limit=self.limit, base=self.base_value)

    def ratios(self, kept: Mapping[str, int]) -> dict[str, float | None]:
        """FLOPs, parameter and (with a LUT) latency of the plan over the unpruned network's."""
        return cost_ratios(self.description, {**self.full, **kept}, self.lut)

    def check_reachable(self, floor: Mapping[str, int], lower_bound: float | None = None) -> None:
        """Refuse a budget that no plan keeping at least `floor` channels per group meets."""
        value = self.value(floor)
        if value > self.limit * (1 + TOLERANCE):
            where = "its smallest size" if lower_bound is None else f"the lower bound {lower_bound:g}"
            raise AutopruneError(
                f"budget {self.budget} is unreachable: even with every group at {where} the model keeps "
                f"{100 * value / self.base_value:.1f} % of its {self.budget.metric}; lower the lower bound or "
                "loosen the budget")

    def uniform_ratio(self, tolerance: float = 1e-4) -> float:
        """The largest keep ratio that, applied to every group, meets the budget (bisection)."""
        from autoprune.costs import uniform_policy

        def fits(ratio: float) -> bool:
            return self.check(uniform_policy(self.description, ratio)).ok

        if fits(1.0):
            return 1.0
        low, high = 1e-6, 1.0
        if not fits(low):
            raise AutopruneError(f"budget {self.budget} is unreachable even keeping one channel per group")
        while high - low > tolerance:
            mid = (low + high) / 2
            if fits(mid):
                low = mid
            else:
                high = mid
        return low


def check_reachable(budget: Budget, description, floor: Mapping[str, int], lut=None,
                    lower_bound: float | None = None) -> None:
    """Refuse a budget that no policy keeping at least `floor` channels per group can meet."""
    Constraint(budget, description, lut).check_reachable(floor, lower_bound)


def check_budget(budget: Budget, description, policy, lut=None, multiple: int = 1) -> BudgetCheck:
    """Evaluate `policy` against `budget` through the cost model or the LUT."""
    return Constraint(budget, description, lut, multiple).check(policy)


def uniform_ratio_for_budget(budget: Budget, description, lut=None, multiple: int = 1,
                             tolerance: float = 1e-4) -> float:
    """The largest keep ratio that, applied to every group, meets `budget` (bisection)."""
    return Constraint(budget, description, lut, multiple).uniform_ratio(tolerance)
