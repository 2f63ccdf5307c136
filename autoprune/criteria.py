"""Channel-selection criteria: which channels of a group to keep.

A criterion is a small callable `criterion(evidence) -> scores`: it receives a
`GroupEvidence` (the weights, gradients, BatchNorm scales and activation statistics of
the layers producing a group's channels) and returns one score per channel; the
highest-scoring channels are kept. Criteria that need data (Taylor, APoZ) declare it
with `needs`, and `collect_evidence` runs the batches once.

Per-layer scores are divided by their mean before they are summed over a group's
producers, so that in a residual stage no single layer dominates the choice.

Selection beyond ranking (ThiNet's greedy reconstruction, least-squares refitting of
the next layer) belongs in `select_channels`'s place: a function from evidence and a
channel count to kept indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from autoprune.costs import NetworkDescription
from autoprune.errors import AutopruneError


@dataclass
class GroupEvidence:
    """What a criterion may look at for one group; every tensor has the group's channels first."""

    weights: list[torch.Tensor] = field(default_factory=list)  # producer weights, out-channel first
    grads: list[torch.Tensor] = field(default_factory=list)  # their accumulated gradients (Taylor)
    bn_scales: list[torch.Tensor] = field(default_factory=list)  # BatchNorm gammas of the channels
    zero_fractions: list[torch.Tensor] = field(default_factory=list)  # post-ReLU zero fraction (APoZ)
    channels: int = 0


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _combine(parts: Iterable[torch.Tensor], channels: int, name: str) -> torch.Tensor:
    total = torch.zeros(channels, dtype=torch.float64)
    used = 0
    for part in parts:
        part = part.detach().double()
        mean = part.abs().mean()
        total += part / mean if mean > 0 else part
        used += 1
    if used == 0:
        raise AutopruneError(f"criterion {name} has nothing to score for this group")
    return total


def l1(evidence: GroupEvidence) -> torch.Tensor:
    """Sum of absolute filter weights (Li et al., 2017)."""
    return _combine((_per_channel(w).abs().sum(1) for w in evidence.weights), evidence.channels, "l1")


def l2(evidence: GroupEvidence) -> torch.Tensor:
    """Euclidean norm of each filter (the criterion NetAdapt uses)."""
    return _combine((_per_channel(w).norm(dim=1) for w in evidence.weights), evidence.channels, "l2")


def bn_scale(evidence: GroupEvidence) -> torch.Tensor:
    """|gamma| of the BatchNorm after the channel (network slimming, Liu et al., 2017)."""
    if not evidence.bn_scales:
        raise AutopruneError("criterion bn_scale needs a BatchNorm after every pruned layer; use l1")
    return _combine((s.abs() for s in evidence.bn_scales), evidence.channels, "bn_scale")


def taylor(evidence: GroupEvidence) -> torch.Tensor:
    """|Σ weight × gradient| per filter: first-order loss change on removal (Molchanov et al., 2019)."""
    if not evidence.grads:
        raise AutopruneError("criterion taylor needs training batches")
    parts = (_per_channel(w * g).sum(1).abs() for w, g in zip(evidence.weights, evidence.grads))
    return _combine(parts, evidence.channels, "taylor")


def apoz(evidence: GroupEvidence) -> torch.Tensor:
    """1 − average percentage of zeros after the activation (Hu et al., 2016)."""
    if not evidence.zero_fractions:
        raise AutopruneError("criterion apoz needs training batches")
    return _combine((1.0 - z for z in evidence.zero_fractions), evidence.channels, "apoz")


class RandomCriterion:
    """Random scores from a seeded generator: the control every criterion should beat."""

    needs: frozenset[str] = frozenset()

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, evidence: GroupEvidence) -> torch.Tensor:
        return torch.rand(evidence.channels, generator=self.generator, dtype=torch.float64)


taylor.needs = frozenset({"grads"})  # type: ignore[attr-defined]
apoz.needs = frozenset({"activations"})  # type: ignore[attr-defined]

CRITERIA: dict[str, Callable[..., Callable[[GroupEvidence], torch.Tensor]]] = {
    "l1": lambda seed=0: l1,
    "l2": lambda seed=0: l2,
    "bn_scale": lambda seed=0: bn_scale,
    "taylor": lambda seed=0: taylor,
    "apoz": lambda seed=0: apoz,
    "random": lambda seed=0: RandomCriterion(seed),
}


def get_criterion(name: str, seed: int = 0) -> Callable[[GroupEvidence], torch.Tensor]:
    """A criterion by name (l1, l2, bn_scale, taylor, apoz, random)."""
    if name not in CRITERIA:
        raise AutopruneError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name](seed)


def needs_of(criterion: Callable) -> frozenset[str]:
    return getattr(criterion, "needs", frozenset())


def collect_evidence(model: nn.Module, description: NetworkDescription, *, needs: frozenset[str] = frozenset(),
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, GroupEvidence]:
    """Gather each group's evidence from `model` (not modified), running `batches` if needed."""
    modules = dict(model.named_modules())
    evidence = {g.name: GroupEvidence(channels=g.channels) for g in description.groups}
    bns = {layer.name: layer.out_group for layer in description.layers
           if layer.kind == "bn" and layer.out_group is not None}
    grads: dict[str, torch.Tensor] = {}
    zero_counts: dict[str, torch.Tensor] = {}

    if needs:
        if batches is None:
            raise AutopruneError("this criterion needs training batches (taylor, apoz); pass data")
        producers = {p for g in description.groups for p in g.producers}
        was_training = model.training
        model.eval()
        handles = []
        seen: dict[str, int] = {}
        if "activations" in needs:
            # statistics at the BatchNorm outputs (or the producers when a group has none)
            watch = dict(bns) if bns else {p: g.name for g in description.groups for p in g.producers}

            def hook_for(name: str):
                def hook(_module, _inputs, output):
                    zeros = (output.detach() <= 0).float()
                    per_channel = zeros.transpose(0, 1).reshape(zeros.shape[1], -1).sum(1)
                    zero_counts[name] = zero_counts.get(name, 0) + per_channel
                    seen[name] = seen.get(name, 0) + zeros.numel() // zeros.shape[1]
                return hook

            handles = [modules[name].register_forward_hook(hook_for(name)) for name in watch]
        try:
            model.zero_grad(set_to_none=True)
            for x, y in batches:
                with torch.set_grad_enabled("grads" in needs):
                    loss = nn.functional.cross_entropy(model(x), y)
                    if "grads" in needs:
                        loss.backward()
            if "grads" in needs:
                for name in producers:
                    weight = modules[name].weight
                    if weight.grad is None:
                        raise AutopruneError(f"layer {name} got no gradient; is it used in forward()?")
                    grads[name] = weight.grad.detach().clone()
        finally:
            for handle in handles:
                handle.remove()
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        zero_fractions = {name: count / max(1, seen[name]) for name, count in zero_counts.items()}
    else:
        zero_fractions = {}

    for g in description.groups:
        ev = evidence[g.name]
        for name in g.producers:
            ev.weights.append(modules[name].weight.detach())
            if name in grads:
                ev.grads.append(grads[name])
            if name in zero_fractions:
                ev.zero_fractions.append(zero_fractions[name])
    for name, group in bns.items():
        bn = modules[name]
        if getattr(bn, "weight", None) is not None:
            evidence[group].bn_scales.append(bn.weight.detach())
        if name in zero_fractions:
            evidence[group].zero_fractions.append(zero_fractions[name])
    return evidence


def select_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest-scoring channels, ascending (ties: lower index wins)."""
    order = torch.argsort(-scores, stable=True)
    return torch.sort(order[:keep]).values
