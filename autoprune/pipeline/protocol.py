"""What a searcher is: one small protocol, one result type.

A searcher turns (evaluator, constraint, settings) into a policy. The pipeline calls
`check(settings)` before anything is loaded, `prepare(context)` once the model, data and
constraint exist but before the run directory does (everything that can refuse the
settings goes there), and `run(run)` to search into the run directory, resuming what an
earlier, killed `run` left there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch.nn as nn

    from autoprune.budgets import Constraint
    from autoprune.evaluation import PolicyEvaluator
    from autoprune.runs import Run
    from autoprune.pipeline.settings import SearchSettings


@dataclass
class SearchContext:
    """Everything a searcher may read: built by the pipeline, shared, never changed by it."""

    evaluator: PolicyEvaluator
    constraint: Constraint
    settings: SearchSettings
    progress: bool = True
    saved_config: dict | None = None  # the searcher's own config.json entry, when a run resumes

    @property
    def description(self):
        return self.evaluator.description

    @property
    def lut(self):
        return self.constraint.lut


@dataclass
class OwnSizes:
    """A searcher's own network at other sizes, so that a latency fit may grow it as well as
    shrink it: `at(size)` is (network, channels kept per group); size 1 is the network the
    search found, larger sizes keep more, up to `largest`."""

    at: Callable[[float], tuple[nn.Module, dict[str, int]]]
    largest: float


@dataclass
class SearcherResult:
    """What every searcher returns."""

    policy: dict[str, float]  # group -> keep ratio of the best policy
    channels: dict[str, int]  # group -> channels kept
    score: float  # the best policy's validation score as the searcher measured it
    cost_ratio: float  # its value of the budget's resource over the unpruned network's
    evaluations: int  # candidates scored in all, across every session of a resumed search
    seconds: dict[str, float] = field(default_factory=dict)  # its phases (prune, ...); the pipeline adds "agent"
    model: nn.Module | None = None  # the searcher's own network, already pruned (and maybe trained), if any
    details: dict[str, Any] = field(default_factory=dict)  # its own figures: iterations, stop reason, threshold...
    training_steps: int = 0  # SGD steps the searcher gave `model` after pruning (equal training counts them)
    training_batch_size: int | None = None
    sizes: OwnSizes | None = None  # `model` at other sizes, when the searcher can make them (else it can only shrink)


@runtime_checkable
class Searcher(Protocol):
    """A search method. Instances are made with no arguments by the registry."""

    name: ClassVar[str]
    settings_read: ClassVar[tuple[str, ...]]  # the SearchSettings fields of its own it reads (its config)
    default_criterion: ClassVar[str]  # channel selection when the settings name none
    ranks_candidates: ClassVar[bool]  # scores many candidates with the evaluator (so `score_steps` applies)

    def check(self, settings: SearchSettings) -> None:
        """Refuse settings this searcher cannot run with (AutopruneError); no model loaded yet."""

    def floor_channels(self, description, settings: SearchSettings) -> dict[str, int]:
        """The fewest channels per group this searcher may keep (for the reachability check)."""

    def prepare(self, context: SearchContext) -> dict | None:
        """Build what the search needs and refuse what does not fit; returns the searcher's own
        configuration for config.json (None: nothing beyond the settings)."""

    def run(self, run: Run) -> SearcherResult:
        """Search into `run` (resuming what is there); the best policy and its figures."""


class BaseSearcher:
    """Defaults for the protocol's optional parts; a searcher subclasses it and writes `run`."""

    settings_read: ClassVar[tuple[str, ...]] = ()
    default_criterion: ClassVar[str] = "l1"
    ranks_candidates: ClassVar[bool] = False

    def __init__(self) -> None:
        self.context: SearchContext | None = None

    def check(self, settings: SearchSettings) -> None:
        return None

    def floor_channels(self, description, settings: SearchSettings) -> dict[str, int]:
        from autoprune.costs import policy_channels, uniform_policy

        return policy_channels(description, uniform_policy(description, settings.lower_bound),
                               settings.channel_multiple)

    def prepare(self, context: SearchContext) -> dict | None:
        self.context = context
        return None

    def run(self, run: Run) -> SearcherResult:
        raise NotImplementedError

    def with_phases(self, search, run: Run) -> tuple[dict, dict]:
        """(what `search(run)` returns, the evaluator's time per phase over the whole search:
        prune, BN recalibration, scoring...); the pipeline times the search itself and adds
        the agent's share."""
        found = search(run)
        return found, dict(self.context.evaluator.timings)

    def result(self, found: dict, seconds: dict, *, evaluations: int | None = None) -> SearcherResult:
        """A SearcherResult from a search function's dict (policy, accuracy, cost_ratio, ...)."""
        context = self.context
        policy = found["policy"]
        channels = found.get("channels") or context.constraint.channels(policy)
        details = {key: value for key, value in found.items()
                   if key not in ("policy", "channels", "model", "sizes", "accuracy", "cost_ratio")
                   and (isinstance(value, (str, int, float, bool)) or value is None)}
        return SearcherResult(policy=policy, channels=dict(channels), score=float(found["accuracy"]),
                              cost_ratio=float(found["cost_ratio"]),
                              evaluations=context.evaluator.evaluations if evaluations is None else evaluations,
                              seconds=seconds, model=found.get("model"), details=details,
                              training_steps=int(found.get("training_steps") or 0),
                              training_batch_size=found.get("training_batch_size"), sizes=found.get("sizes"))
