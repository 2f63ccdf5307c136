"""Channel-selection criteria: which channels of a group to keep.

A criterion is a small callable `criterion(evidence) -> scores`: it receives a
`GroupEvidence` (the weights, gradients, BatchNorm scales and activation statistics of
the layers producing a group's channels) and returns one score per channel; the
highest-scoring channels are kept. Criteria that need data (Taylor, APoZ) declare it
with `needs`, and `collect_evidence` runs the batches once.

Per-layer scores are divided by their mean before they are summed over a group's
producers, so that in a residual stage no single layer dominates the choice.

A group's scores rank its channels once (`autoprune.pruning.rank_channels`); keeping k
channels keeps the best k of that ranking, which is what makes a policy's cost known
before anything is pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from autoprune.costs import LayerSpec, NetworkDescription
from autoprune.errors import AutopruneError


@dataclass
class GroupEvidence:
    """What a criterion may look at for one group.

    Each tensor belongs to one layer and has that layer's rows first; the `*_at` list
    beside it says which of the group's channels each row is (a branch of a
    concatenation holds only some of them).
    """

    weights: list[torch.Tensor] = field(default_factory=list)  # producer weights, out-channel first
    grads: list[torch.Tensor] = field(default_factory=list)  # their accumulated gradients (Taylor)
    weights_at: list[torch.Tensor] = field(default_factory=list)  # group channel of each weight row
    bn_scales: list[torch.Tensor] = field(default_factory=list)  # normalisation scales (gamma) of the channels
    bn_scales_at: list[torch.Tensor] = field(default_factory=list)
    zero_fractions: list[torch.Tensor] = field(default_factory=list)  # post-activation zero fraction (APoZ)
    zero_fractions_at: list[torch.Tensor] = field(default_factory=list)
    channels: int = 0


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _combine(parts: Iterable[torch.Tensor], where: Iterable[torch.Tensor], channels: int, name: str) -> torch.Tensor:
    """Sum per-layer scores (each divided by its mean) into the group's channels."""
    total = torch.zeros(channels, dtype=torch.float64)
    used = 0
    for part, at in zip(parts, where):
        part = part.detach().double()
        mean = part.abs().mean()
        total.index_add_(0, at, part / mean if mean > 0 else part)
        used += 1
    if used == 0:
        raise AutopruneError(f"criterion {name} has nothing to score for this group")
    return total


def l1(evidence: GroupEvidence) -> torch.Tensor:
    """Sum of absolute filter weights (Li et al., 2017)."""
    return _combine((_per_channel(w).abs().sum(1) for w in evidence.weights), evidence.weights_at,
                    evidence.channels, "l1")


def l2(evidence: GroupEvidence) -> torch.Tensor:
    """Euclidean norm of each filter (the criterion NetAdapt uses)."""
    return _combine((_per_channel(w).norm(dim=1) for w in evidence.weights), evidence.weights_at,
                    evidence.channels, "l2")


def bn_scale(evidence: GroupEvidence) -> torch.Tensor:
    """|gamma| of the normalisation after the channel (network slimming, Liu et al., 2017).

    A group some of whose channels no normalisation scales (a squeeze-excitation's
    reduction, a hidden linear layer) is ranked by L1 instead.
    """
    covered = set(torch.cat(evidence.bn_scales_at).tolist()) if evidence.bn_scales_at else set()
    if len(covered) < evidence.channels:
        return l1(evidence)
    return _combine((s.abs() for s in evidence.bn_scales), evidence.bn_scales_at, evidence.channels, "bn_scale")


def taylor(evidence: GroupEvidence) -> torch.Tensor:
    """|Σ weight × gradient| per filter: first-order loss change on removal (Molchanov et al., 2019)."""
    if not evidence.grads:
        raise AutopruneError("criterion taylor needs training batches")
    parts = (_per_channel(w * g).sum(1).abs() for w, g in zip(evidence.weights, evidence.grads))
    return _combine(parts, evidence.weights_at, evidence.channels, "taylor")


def apoz(evidence: GroupEvidence) -> torch.Tensor:
    """1 − average percentage of zeros after the activation (Hu et al., 2016)."""
    if not evidence.zero_fractions:
        raise AutopruneError("criterion apoz needs training batches")
    return _combine((1.0 - z for z in evidence.zero_fractions), evidence.zero_fractions_at, evidence.channels,
                    "apoz")


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


def _row_links(description: NetworkDescription, layer: LayerSpec) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(group, the layer's rows, the group channel of each row) for each output link of a layer."""
    found = []
    for link in layer.out_links:
        if link.per != 1:
            continue
        channels = link.channels if link.channels is not None else range(description.group(link.group).channels)
        rows = link.rows if link.rows is not None else channels
        found.append((link.group, torch.tensor(list(rows), dtype=torch.long),
                      torch.tensor(list(channels), dtype=torch.long)))
    return found


def collect_evidence(model: nn.Module, description: NetworkDescription, *, needs: frozenset[str] = frozenset(),
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, GroupEvidence]:
    """Gather each group's evidence from `model` (not modified), running `batches` if needed."""
    modules = dict(model.named_modules())
    evidence = {g.name: GroupEvidence(channels=g.channels) for g in description.groups}
    producers = [layer for layer in description.layers if layer.kind in ("conv", "dwconv", "linear")
                 and layer.out_links]
    norms = [layer for layer in description.layers if layer.kind in ("bn", "norm") and layer.out_links]
    grads: dict[str, torch.Tensor] = {}
    zero_counts: dict[str, torch.Tensor] = {}

    if needs:
        if batches is None:
            raise AutopruneError("this criterion needs training batches (taylor, apoz); pass data")
        was_training = model.training
        model.eval()
        handles = []
        seen: dict[str, int] = {}
        if "activations" in needs:
            # statistics at the normalisation outputs, or at the producers of a group without one
            watch = [layer.name for layer in norms + producers]

            def hook_for(name: str):
                # channels on dim 1, but last for a linear layer or a LayerNorm (on a channels-last map)
                axis = -1 if isinstance(modules[name], (nn.Linear, nn.LayerNorm)) else 1

                def hook(_module, _inputs, output):
                    zeros = (output.detach() <= 0).float().movedim(axis, 0)
                    per_channel = zeros.reshape(zeros.shape[0], -1).sum(1)
                    zero_counts[name] = zero_counts.get(name, 0) + per_channel
                    seen[name] = seen.get(name, 0) + zeros.numel() // zeros.shape[0]
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
                for layer in producers:
                    weight = modules[layer.name].weight
                    if weight.grad is None:
                        raise AutopruneError(f"layer {layer.name} got no gradient; is it used in forward()?")
                    grads[layer.name] = weight.grad.detach().clone()
        finally:
            for handle in handles:
                handle.remove()
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        zero_fractions = {name: count / max(1, seen[name]) for name, count in zero_counts.items()}
    else:
        zero_fractions = {}

    for layer in producers:
        weight = modules[layer.name].weight.detach()
        for group, rows, at in _row_links(description, layer):
            ev = evidence[group]
            ev.weights.append(weight[rows])
            ev.weights_at.append(at)
            if layer.name in grads:
                ev.grads.append(grads[layer.name][rows])
    for layer in norms:
        scale = getattr(modules[layer.name], "weight", None)
        for group, rows, at in _row_links(description, layer):
            ev = evidence[group]
            if scale is not None:
                ev.bn_scales.append(scale.detach().reshape(-1)[rows])
                ev.bn_scales_at.append(at)
            if layer.name in zero_fractions:
                ev.zero_fractions.append(zero_fractions[layer.name][rows])
                ev.zero_fractions_at.append(at)
    normalised = {name for name, ev in evidence.items() if ev.zero_fractions}
    for layer in producers:
        for group, rows, at in _row_links(description, layer):
            if group not in normalised and layer.name in zero_fractions:
                evidence[group].zero_fractions.append(zero_fractions[layer.name][rows])
                evidence[group].zero_fractions_at.append(at)
    return evidence
