"""Prunable groups and physical channel removal.

This is the only module that talks to Torch-Pruning (Fang et al., DepGraph, CVPR 2023):
its dependency graph finds the channels that must go together (a residual stage's add,
a depthwise conv and its producer) and removes them from the real layers. Everything
else in autoprune speaks in groups (named by their first producing layer) and policies
(group name -> keep ratio).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from autoprune.costs import (GroupSpec, LayerSpec, NetworkDescription, channels_to_keep, check_policy,
                             uniform_policy)
from autoprune.criteria import collect_evidence, get_criterion, needs_of, select_channels
from autoprune.errors import AutopruneError

log = logging.getLogger(__name__)

_CONV = (nn.Conv2d,)
_LINEAR = (nn.Linear,)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # type: ignore[return-value]


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


@dataclass
class _Trace:
    order: dict[str, int]  # leaf module name -> first execution index
    in_size: dict[str, tuple[int, int]]
    out_size: dict[str, tuple[int, int]]
    classifier: str | None


def _trace(model: nn.Module, example: torch.Tensor) -> _Trace:
    """Run one forward pass, recording execution order and spatial sizes of leaf layers."""
    names = {m: n for n, m in model.named_modules()}
    order: dict[str, int] = {}
    in_size: dict[str, tuple[int, int]] = {}
    out_size: dict[str, tuple[int, int]] = {}
    outputs: dict[int, str] = {}
    calls: dict[str, int] = {}

    def hook(module, inputs, output):
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        order.setdefault(name, len(order))
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            in_size[name] = (x.shape[2], x.shape[3])
        if isinstance(output, torch.Tensor):
            if output.dim() == 4:
                out_size[name] = (output.shape[2], output.shape[3])
            outputs[id(output)] = name

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = model(example)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise AutopruneError(f"the model does not accept input of shape {tuple(example.shape[1:])}: {first}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    reused = [n for n, c in calls.items() if c > 1 and any(True for _ in dict(model.named_modules())[n].parameters())]
    if reused:
        raise AutopruneError(f"layer(s) {', '.join(reused)} run more than once per forward pass; "
                             "weight sharing is not supported")
    classifier = outputs.get(id(result)) if isinstance(result, torch.Tensor) else None
    if classifier is None:
        modules = dict(model.named_modules())
        heads = [n for n in order if isinstance(modules[n], _CONV + _LINEAR)]
        classifier = heads[-1] if heads else None
    return _Trace(order, in_size, out_size, classifier)


def _build_graph(model: nn.Module, example: torch.Tensor):
    # the classifier is excluded when groups are listed (describe_network), not while
    # tracing: ignoring it here breaks Torch-Pruning's index mapping through the flatten
    return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def _example(input_shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.zeros(1, *input_shape)


def describe_network(model: nn.Module, input_shape: tuple[int, int, int]) -> NetworkDescription:
    """Describe `model` as data: its layers, and its prunable groups in forward order.

    Prunable groups are found by Torch-Pruning's dependency graph. The classifier (the
    layer producing the model's output) is never pruned.
    """
    example = _example(input_shape)
    trace = _trace(model, example)
    graph = _build_graph(model, example)
    ignored = [dict(model.named_modules())[trace.classifier]] if trace.classifier else []
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())

    raw_groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=_CONV + _LINEAR):
        producers, consumers, bns = [], {}, []
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, nn.Parameter):
                raise AutopruneError("a prunable group touches a bare nn.Parameter; such models are not supported")
            if module not in names:
                continue  # Torch-Pruning's own nodes for adds, reshapes and concatenations
            name = names[module]
            if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, _CONV + _LINEAR + _BN):
                raise AutopruneError(f"layer {name} ({type(module).__name__}) has parameters in a prunable group; "
                                     "only Conv2d, Linear and BatchNorm layers are supported")
            if isinstance(module, _CONV) and module.groups > 1 and not _is_depthwise(module):
                raise AutopruneError(f"layer {name} is a grouped convolution (groups={module.groups}); only "
                                     "depthwise and ordinary convolutions can be pruned")
            if graph.is_out_channel_pruning_fn(dep.handler):
                if isinstance(module, _CONV + _LINEAR):
                    producers.append(name)
                elif isinstance(module, _BN):
                    bns.append(name)
            elif graph.is_in_channel_pruning_fn(dep.handler) and isinstance(module, _CONV + _LINEAR):
                consumers[name] = len(idxs)
        channels = len(group[0].idxs)
        producers = sorted(set(producers), key=lambda n: trace.order.get(n, 1 << 30))
        if not producers:
            continue
        raw_groups.append((producers, consumers, bns, channels))
    raw_groups.sort(key=lambda g: trace.order.get(g[0][0], 1 << 30))

    out_group: dict[str, str] = {}
    in_groups: dict[str, list[tuple[str, int]]] = {}
    groups = []
    for producers, consumers, bns, channels in raw_groups:
        gname = producers[0]
        for name in producers + bns:
            out_group[name] = gname
        for name, width in consumers.items():
            if width % channels:
                raise AutopruneError(f"layer {name} takes {width} inputs from group {gname} of {channels} channels; "
                                     "this layout is not supported")
            in_groups.setdefault(name, []).append((gname, width // channels))
        groups.append(GroupSpec(name=gname, channels=channels, producers=tuple(producers),
                                consumers=tuple(sorted(consumers, key=lambda n: trace.order.get(n, 1 << 30)))))

    executed = sorted(trace.order, key=trace.order.get)

    def post_ops(name: str) -> tuple[str, ...]:
        """BatchNorm and activation executed right after a layer (what a latency unit includes)."""
        ops: list[str] = []
        i = executed.index(name) + 1
        if i < len(executed) and isinstance(modules[executed[i]], _BN) and \
                modules[executed[i]].num_features == modules[name].weight.shape[0]:
            ops.append("bn")
            i += 1
        if i < len(executed):
            nxt = modules[executed[i]]
            if isinstance(nxt, nn.ReLU6):
                ops.append("relu6")
            elif isinstance(nxt, nn.ReLU):
                ops.append("relu")
        return tuple(ops)

    layers = []
    for name in sorted(modules, key=lambda n: trace.order.get(n, 1 << 30)):
        m = modules[name]
        if list(m.children()):
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, _CONV):
            if name not in trace.order:
                raise AutopruneError(f"layer {name} is not used in forward(); remove it before pruning")
            kind = "dwconv" if _is_depthwise(m) else "conv"
            ins = in_groups.get(name, [])
            in_fixed = m.in_channels - sum(_group_channels(groups, g) * per for g, per in ins)
            layers.append(LayerSpec(
                name=name, kind=kind, in_channels=m.in_channels, out_channels=m.out_channels,
                kernel=_pair(m.kernel_size), stride=_pair(m.stride), groups=m.groups,
                in_size=trace.in_size[name], out_size=trace.out_size[name], bias=m.bias is not None,
                out_group=out_group.get(name), in_groups=tuple(ins) if kind == "conv" else (),
                in_fixed=in_fixed if kind == "conv" else 0, post=post_ops(name)))
        elif isinstance(m, _LINEAR):
            ins = in_groups.get(name, [])
            in_fixed = m.in_features - sum(_group_channels(groups, g) * per for g, per in ins)
            layers.append(LayerSpec(
                name=name, kind="linear", in_channels=m.in_features, out_channels=m.out_features,
                bias=m.bias is not None, out_group=out_group.get(name), in_groups=tuple(ins), in_fixed=in_fixed,
                post=post_ops(name) if name in trace.order else ()))
        elif isinstance(m, _BN) and m.affine:
            layers.append(LayerSpec(name=name, kind="bn", in_channels=m.num_features, out_channels=m.num_features,
                                    out_group=out_group.get(name)))
        elif params:
            layers.append(LayerSpec(name=name, kind="other", in_channels=0, out_channels=0, fixed_params=params))
    return NetworkDescription(input_shape=tuple(input_shape), layers=tuple(layers), groups=tuple(groups))


def _group_channels(groups: list[GroupSpec], name: str) -> int:
    for g in groups:
        if g.name == name:
            return g.channels
    raise KeyError(name)


class ChannelPruner:
    """Prunes copies of one base model by policies.

    Channel scores are computed once, on the base model, so a policy always removes the
    same channels whatever else was pruned before (replaying a policy gives the same
    network) and the search pays for scoring only once.

    Args:
        model: the trained base model (never modified).
        input_shape: (channels, height, width) of one input image.
        criterion: channel-selection criterion name (see `autoprune.criteria`).
        batches: training batches for data-driven criteria (taylor, apoz).
        channel_multiple: kept channels are rounded to a multiple of this.
        seed: seed of the random criterion.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], *, criterion: str = "l1",
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None, channel_multiple: int = 1,
                 seed: int = 0):
        self.model = model
        self.input_shape = tuple(input_shape)
        self.criterion = criterion
        self.channel_multiple = channel_multiple
        self.description = describe_network(model, self.input_shape)
        score = get_criterion(criterion, seed)
        evidence = collect_evidence(copy.deepcopy(model), self.description, needs=needs_of(score), batches=batches)
        self.scores = {name: score(ev) for name, ev in evidence.items()}

    @property
    def groups(self) -> tuple[GroupSpec, ...]:
        return self.description.groups

    def kept_indices(self, policy: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Indices of the channels each group keeps under `policy`."""
        full = check_policy(self.description, policy)
        return {g.name: select_channels(self.scores[g.name], channels_to_keep(g.channels, full[g.name],
                                                                              self.channel_multiple))
                for g in self.description.groups}

    def prune(self, policy: Mapping[str, float]) -> nn.Module:
        """A physically smaller copy of the base model with `policy` applied."""
        kept = self.kept_indices(policy)
        model = copy.deepcopy(self.model)
        model.eval()
        graph = _build_graph(model, _example(self.input_shape))
        modules = dict(model.named_modules())
        for g in self.description.groups:
            keep = set(kept[g.name].tolist())
            remove = [i for i in range(g.channels) if i not in keep]
            if not remove:
                continue
            root = modules[g.name]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            group = graph.get_pruning_group(root, handler, remove)
            group.prune(record_history=False)
        model.autoprune_policy = {k: float(v) for k, v in check_policy(self.description, policy).items()}
        if hasattr(model, "autoprune_config"):
            del model.autoprune_config  # the zoo constructor no longer describes this network
        return model


def apply_policy(model: nn.Module, policy: Mapping[str, float], input_shape: tuple[int, int, int], *,
                 criterion: str = "l1", batches=None, channel_multiple: int = 1, seed: int = 0) -> nn.Module:
    """Prune a copy of `model` by `policy` (group name -> keep ratio) in one call."""
    pruner = ChannelPruner(model, input_shape, criterion=criterion, batches=batches,
                           channel_multiple=channel_multiple, seed=seed)
    return pruner.prune(policy)


def parse_policy(text: str, description: NetworkDescription) -> dict[str, float]:
    """`uniform:0.5`, or a JSON file holding {group: keep_ratio} (optionally under "policy")."""
    import json
    from pathlib import Path

    if text.startswith("uniform:"):
        try:
            ratio = float(text.split(":", 1)[1])
        except ValueError:
            raise AutopruneError(f"bad policy {text!r}; write uniform:RATIO with RATIO in (0, 1]") from None
        return check_policy(description, uniform_policy(description, ratio))
    path = Path(text)
    if not path.is_file():
        raise AutopruneError(f"policy {text!r} is neither uniform:RATIO nor an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AutopruneError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("policy"), dict):
        data = data["policy"]
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise AutopruneError(f"{path} must map group names to keep ratios, e.g. {{\"conv1\": 0.5}}")
    return check_policy(description, data)
