"""Prunable groups and physical channel removal.

This is the only module that talks to Torch-Pruning (Fang et al., DepGraph, CVPR 2023):
its dependency graph finds the channels that must go together (a residual stage's add,
a depthwise conv and its producer, concatenated branches, the parts of a grouped conv)
and removes them from the real layers. Everything
else in autoprune speaks in groups (named by their first producing layer) and policies
(group name -> keep ratio).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import weakref
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

from autoprune.costs import (GroupSpec, LayerSpec, Link, NetworkDescription, check_policy, count_cost, group_keep,
                             policy_channels, policy_cost, uniform_policy)
from autoprune.criteria import collect_evidence, get_criterion, needs_of
from autoprune.errors import AutopruneError
from autoprune.train import check_output

log = logging.getLogger(__name__)

_CONV = (nn.Conv2d,)
_LINEAR = (nn.Linear,)
_BN = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d, SyncBatchNorm (a network trained across GPUs)
_NORMS = _BN + (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # type: ignore[return-value]


def _channel_conv(m: nn.Module) -> bool:
    """A one-channel, stride-1 Conv1d, as ECA slides along a feature map's pooled channels: its
    length is a group's channels, which pruning shortens, and its weights stay as they are."""
    return isinstance(m, nn.Conv1d) and m.in_channels == m.out_channels == 1 and m.stride == (1,)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


@dataclass
class _Trace:
    order: dict[str, int]  # leaf module name -> first execution index
    in_size: dict[str, tuple[int, int]]
    out_size: dict[str, tuple[int, int]]
    classifier: str | None
    calls: dict[str, int]  # how often each layer ran (a shared layer: more than once)


def _trace(model: nn.Module, example: torch.Tensor) -> _Trace:
    """Run one forward pass, recording execution order and spatial sizes of leaf layers."""
    names = {m: n for n, m in model.named_modules()}
    order: dict[str, int] = {}
    in_size: dict[str, tuple[int, int]] = {}
    out_size: dict[str, tuple[int, int]] = {}
    outputs: dict[int, tuple[str, weakref.ref]] = {}  # id -> layer, and a weak reference to tell a reused id
    calls: dict[str, int] = {}
    seen: dict[str, set] = {}  # input shapes of each layer, over its calls

    def hook(module, inputs, output):
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        order.setdefault(name, len(order))
        x = inputs[0] if inputs else None
        seen.setdefault(name, set()).add(tuple(x.shape) if isinstance(x, torch.Tensor) else None)
        if isinstance(output, torch.Tensor):
            outputs[id(output)] = (name, weakref.ref(output))
        if isinstance(module, _LINEAR) and isinstance(x, torch.Tensor) and x.dim() > 2:
            # a linear layer applied at every position of a feature map (channels last), or of a sequence
            middle = tuple(x.shape[1:-1])
            in_size[name] = out_size[name] = (middle[0], math.prod(middle[1:])) if len(middle) > 1 else (middle[0], 1)
            return
        if _channel_conv(module) and isinstance(x, torch.Tensor) and x.dim() == 3:
            in_size[name], out_size[name] = (1, x.shape[-1]), (1, output.shape[-1])
            return
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            in_size[name] = (x.shape[2], x.shape[3])
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            out_size[name] = (output.shape[2], output.shape[3])

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
    # a shared layer (CBAM's channel MLP on two poolings) costs each of its calls; its calls
    # must see one input shape, or a single entry could not say what it costs
    uneven = [n for n, c in calls.items() if c > 1 and len(seen[n]) > 1
              and any(True for _ in dict(model.named_modules())[n].parameters())]
    if uneven:
        raise AutopruneError(f"layer(s) {', '.join(uneven)} run more than once per forward pass on inputs of "
                             "different shapes; a shared layer is supported when every call sees the same shape")
    check_output(result, example.shape[0])
    producer, ref = outputs.get(id(result), (None, None))
    # the layer whose output the model returns as it is (not a freed tensor whose id the
    # output took over); else (the model ends in functional operations: a pooling, a
    # flatten) the last convolution or linear layer that ran
    classifier = producer if ref is not None and ref() is result else None
    if classifier is None:
        modules = dict(model.named_modules())
        heads = [n for n in order if isinstance(modules[n], _CONV + _LINEAR)]
        classifier = heads[-1] if heads else None
    return _Trace(order, in_size, out_size, classifier, calls)


def _build_graph(model: nn.Module, example: torch.Tensor, channel_convs: dict | None = None):
    """Torch-Pruning's dependency graph of `model`.

    Channel convolutions (`_channel_conv`) are left out of its tracing, so that it passes
    channels through them as through an element-wise operation (it would otherwise take the
    channels they slide along for their one channel); `channel_convs`, when given, receives
    the autograd node of each of their outputs, which names them in the graph.
    """
    # the classifier is excluded when groups are listed (describe_network), not while
    # tracing: ignoring it here breaks Torch-Pruning's index mapping through the flatten
    convs = [m for m in model.modules() if _channel_conv(m)]
    handles = []
    if channel_convs is not None:
        names = {m: n for n, m in model.named_modules()}

        def hook(module, inputs, output):
            channel_convs[output.grad_fn] = names[module]

        handles = [m.register_forward_hook(hook) for m in convs]
    shapes = _OutputShapes()
    pruners = {nn.LayerNorm: _LayerNormPruner()} if any(_pooled_norm(m) for m in model.modules()) else None
    try:
        with shapes:
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example,), verbose=False,
                                                          ignored_layers=convs, customized_pruners=pruners)
    finally:
        for h in handles:
            h.remove()
    _cut_channel_free_steps(graph, shapes.by_node)
    _place_concatenated_channels(graph, shapes.by_node)
    return graph


class _OutputShapes(TorchFunctionMode):
    """Records the shape of every tensor a forward pass computes, by its autograd node."""

    def __init__(self):
        super().__init__()
        self.by_node: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.by_node.setdefault(t.grad_fn, tuple(t.shape))
        return out


# element-wise steps (to Torch-Pruning) that reduce over the channels, or broadcast one channel over many
_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod")
_BROADCASTS = ("mul", "add", "sub", "div", "maximum", "minimum", "where")


def _cut_channel_free_steps(graph, shapes: Mapping) -> None:
    """Unlink, in Torch-Pruning's graph, the inputs of a step whose channels do not follow them.

    Torch-Pruning takes any operation it does not know for element-wise, channel for
    channel. A reduction over the channels (CBAM's spatial attention pools `x.mean(1)` and
    `x.amax(1)`) and a product with a one-channel map broadcast over all channels (the
    attention map applied to `x`) are not: linked, a group's channels spread onto the
    one-channel side, its claims there cannot hold, and the group is dropped. Transposes
    and views stay linked (efficient channel attention relies on it). Where a link goes,
    the channel counts and index mappings that Torch-Pruning inferred along it (a flatten
    further on counts the channels of a product by its last input) are inferred again.
    """
    cut = False
    for node in list(graph.module2node.values()):
        if node.type != tp.ops.OPTYPE.ELEMENTWISE or node.grad_fn is None:
            continue
        op = node.grad_fn.name().lower().removesuffix("backward0").removesuffix("backward1")
        out = shapes.get(node.grad_fn)
        if out is None or len(out) < 2 or op not in _REDUCTIONS + _BROADCASTS:
            continue
        for source in list(node.inputs):
            shape = shapes.get(source.grad_fn)
            if shape is None or len(shape) < 2 or shape[1] == out[1]:
                continue
            # a broadcast input of another rank (a (C, 1, 1) scale on an (N, C, H, W) map) lines up
            # from the right, and which of its axes are the channels is not known: left linked
            if op in _BROADCASTS and (shape[1] != 1 or len(shape) != len(out)):
                continue
            node.dependencies = [d for d in node.dependencies if d.target is not source]
            source.dependencies = [d for d in source.dependencies if d.target is not node]
            node.inputs = [n for n in node.inputs if n is not source]
            source.outputs = [n for n in source.outputs if n is not node]
            cut = True
    if cut:  # inferred again from scratch, as building the graph did, on the graph without those links
        for node in graph.module2node.values():
            for dependency in node.dependencies:
                dependency.index_mapping = [None, None]
        tp.dependency.shape_infer.init_shape_information(graph)
        tp.dependency.index_mapping.update_index_mapping(graph)


def _place_concatenated_channels(graph, shapes: Mapping) -> None:
    """Record, for a concatenation along the channels that Torch-Pruning left without, how
    many channels each input brings. It checks a concatenation's channel count against the
    next layer's inputs, and a flatten into a linear layer there (h * w features per channel)
    fails that check; without the counts it removed the same indices from every branch, and
    the pruned network no longer ran. The counts come from the shapes the forward pass
    recorded; Torch-Pruning keeps them up to date as it prunes."""
    _follow_placed_concatenations()
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.CONCAT or node.module.offsets is not None or node.grad_fn is None:
            continue
        out = shapes.get(node.grad_fn)
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if out is None or len(out) < 2 or dim is None or dim % len(out) != 1:
            continue
        sizes = [shapes.get(source.grad_fn) for source in node.inputs]
        if any(size is None or len(size) != len(out) for size in sizes) or sum(s[1] for s in sizes) != out[1]:
            continue
        node.module.concat_sizes = [s[1] for s in sizes]
        node.module.autoprune_placed = True
    _map_placed_concatenations(graph)


def _map_placed_concatenations(graph) -> None:
    """Map each input's channels to their place in a concatenation `_place_concatenated_channels`
    recorded, from its current counts (after every pruning step, like Torch-Pruning's own)."""
    mapping = tp.dependency.index_mapping
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.CONCAT or not getattr(node.module, "autoprune_placed", False):
            continue
        offsets = [0]
        for size in node.module.concat_sizes:
            offsets.append(offsets[-1] + size)
        node.module.offsets = offsets
        if not node.enable_index_mapping:
            continue
        for i, source in enumerate(node.inputs):
            for dependency in node.dependencies:
                if dependency.target is source:
                    dependency.index_mapping[1] = mapping._ConcatIndexMapping(offset=offsets[i:i + 2], reverse=True)
                    break
            for dependency in source.dependencies:
                if dependency.target is node:
                    dependency.index_mapping[1] = mapping._ConcatIndexMapping(offset=offsets[i:i + 2], reverse=False)
                    break


def _follow_placed_concatenations() -> None:
    """Once per process: after Torch-Pruning updates a graph's index mappings (it does before
    every group it lists), update those of the concatenations autoprune placed."""
    module = tp.dependency.index_mapping
    if getattr(module.update_index_mapping, "autoprune_follows", False):
        return
    original = module.update_index_mapping

    def update(graph):
        original(graph)
        _map_placed_concatenations(graph)

    update.autoprune_follows = True
    module.update_index_mapping = update


def _example(input_shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.zeros(1, *input_shape)


def _tp_depthwise(m: nn.Module) -> bool:
    """Torch-Pruning's own test: groups == out_channels (it then prunes inputs and outputs together)."""
    return isinstance(m, _CONV) and m.groups == m.out_channels and m.out_channels > 1


def _pooled_norm(m: nn.Module) -> bool:
    """A LayerNorm over (C, 1, ..., 1): over the channels of pooled maps, as in GCNet's
    context block (Torch-Pruning's own pruner takes the last, size-1 dimension for them)."""
    shape = tuple(getattr(m, "normalized_shape", ()))
    return isinstance(m, nn.LayerNorm) and len(shape) > 1 and all(size == 1 for size in shape[1:])


class _LayerNormPruner(tp.pruner.function.LayernormPruner):
    """Torch-Pruning's LayerNorm pruner, except that a LayerNorm over (C, 1, ..., 1) is
    pruned along C. Torch-Pruning looks pruners up by class, so this one stands in for
    every LayerNorm of a model that has such a layer."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        if not _pooled_norm(layer):
            return super().prune_out_channels(layer, idxs)
        keep = sorted(set(range(layer.normalized_shape[0])) - {int(i) for i in idxs})
        if layer.elementwise_affine:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            if layer.bias is not None:
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.normalized_shape = (len(keep), *layer.normalized_shape[1:])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.normalized_shape[0] if _pooled_norm(layer) else super().get_out_channels(layer)

    get_in_channels = get_out_channels


def _norm_width(m: nn.Module) -> int:
    """Channels of a per-channel-parameter layer."""
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0 if _pooled_norm(m) else -1]
    if isinstance(m, nn.PReLU):
        return m.num_parameters
    return m.num_features


def _has_channel_params(m: nn.Module) -> bool:
    """A normalisation or PReLU layer whose parameters pruning shrinks."""
    if isinstance(m, nn.PReLU):
        return m.num_parameters > 1
    return isinstance(m, _NORMS) and any(True for _ in m.parameters(recurse=False))


def _channel_groups(m: nn.Module) -> int:
    """Into how many equal parts a layer splits the channels (they must stay equal when pruned)."""
    if isinstance(m, _CONV) and m.groups > 1 and not _tp_depthwise(m):
        return m.groups
    if isinstance(m, nn.GroupNorm):
        return m.num_groups
    return 1


# the most channel indices one reshape may hand on, unless a linear layer of the model takes more
# inputs (a flatten into it hands on at most that many): lists twice this long already took 22 s
# before GCNet's block was refused
INDEX_LIMIT = 1 << 18


_reshape_bound = threading.local()  # the bound of the grouping running in this thread (None: none)


def _bound_flatten_mapping() -> None:
    """Wrap Torch-Pruning's index mapping through a flatten, once per process, so that it
    checks the bound `_bounded_reshapes` set in the calling thread (and nothing elsewhere)."""
    mapping = tp.dependency.index_mapping._FlattenIndexMapping
    if getattr(mapping.__call__, "_autoprune_bounded", False):
        return
    original = mapping.__call__

    def bounded(self, idxs):
        limit = getattr(_reshape_bound, "limit", None)
        if limit is not None and not self.reverse and len(idxs) * self._stride > limit:
            raise AutopruneError(
                "the channels cannot be followed through the network's reshapes: one turns the channels into "
                "another dimension and back (as GCNet's attention pooling does with x.view(n, 1, c, h * w) and a "
                "matrix product); write that step channel-wise, e.g. (x * weights).sum((2, 3), keepdim=True) with "
                "softmax weights of shape (n, 1, h, w)")
        return original(self, idxs)

    bounded._autoprune_bounded = True
    mapping.__call__ = bounded


@contextmanager
def _bounded_reshapes(model: nn.Module):
    """While grouping in this thread, stop Torch-Pruning's index mapping through a reshape at
    more indices than INDEX_LIMIT and than any linear layer of `model` has inputs. Where a
    network reshapes maps so that the channels become another dimension and back (GCNet's
    attention pooling: x.view(n, 1, c, h * w), a matrix product, .view(n, c, 1, 1)),
    Torch-Pruning reads a flatten into h * w times the channels each time, and the index
    lists multiplied until memory ran out (17 GB on one small net). Each thread has its own
    bound, so that networks described side by side do not see each other's."""
    _bound_flatten_mapping()
    previous = getattr(_reshape_bound, "limit", None)
    _reshape_bound.limit = max([INDEX_LIMIT] + [m.in_features for m in model.modules() if isinstance(m, nn.Linear)])
    try:
        yield
    finally:
        _reshape_bound.limit = previous


def _prunable_member(name: str, m: nn.Module) -> bool:
    """Whether this layer of a group can be shrunk, its cost followed (False: keep the group whole)."""
    if isinstance(m, _CONV):
        # groups == out_channels < in_channels: Torch-Pruning takes it for depthwise and
        # would remove one input per output, so the group it sits in stays whole
        return not (_tp_depthwise(m) and m.in_channels != m.out_channels)
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) > 1 and m.elementwise_affine and not _pooled_norm(m):
        raise AutopruneError(f"layer {name} (LayerNorm over {tuple(m.normalized_shape)}) normalises several "
                             "dimensions; only a LayerNorm over the channel dimension can be pruned (use GroupNorm(1, C) "
                             "for a LayerNorm over channels, height and width)")
    if isinstance(m, _LINEAR + _NORMS + (nn.PReLU,)) or not any(True for _ in m.parameters(recurse=False)):
        return True
    # another layer type with weights (a transposed convolution, a custom layer): the channels
    # it reads and writes stay as they are, the rest of the network is pruned
    log.info("channels around layer %s (%s) are kept whole: autoprune prunes Conv2d, Linear, normalisation "
             "layers, PReLU and per-channel parameters", name, type(m).__name__)
    return False


def _transposed_flops(m: nn.Module, in_size: tuple[int, int] | None, out_size: tuple[int, int] | None) -> int:
    """MACs (plus bias adds) of a transposed convolution, whose channels are never pruned: each
    input position spreads a kernel over every output channel of its group. (Torch-Pruning's
    counter multiplies by the output positions instead: four times as many at stride 2.)"""
    if not isinstance(m, nn.ConvTranspose2d) or in_size is None or out_size is None:
        return 0
    weights = m.in_channels * (m.out_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    bias = m.out_channels * out_size[0] * out_size[1] if m.bias is not None else 0
    return weights * in_size[0] * in_size[1] + bias


def _links(group: str, channels: int, pairs: list[tuple[int, int]], outputs: bool) -> list[Link]:
    """Links of one layer side to one group, from (layer index, group channel) pairs."""
    per_channel: dict[int, list[int]] = {}
    for row, channel in pairs:
        per_channel.setdefault(channel, []).append(row)
    by_count: dict[int, list[int]] = {}
    for channel in sorted(per_channel):
        by_count.setdefault(len(per_channel[channel]), []).append(channel)
    links = []
    for per, covered in sorted(by_count.items()):
        rows = None
        if outputs and per == 1:
            rows = tuple(per_channel[c][0] for c in covered)
            rows = None if rows == tuple(covered) else rows
        links.append(Link(group=group, per=per, channels=None if len(covered) == channels else tuple(covered),
                          rows=rows))
    return links


def _link_size(link: Link, groups: Mapping[str, GroupSpec]) -> int:
    return link.per * (groups[link.group].channels if link.channels is None else len(link.channels))


def _channel_vector(parameter: nn.Parameter) -> bool:
    """A parameter with one value per channel (shape (C,), (C, 1, 1), (1, C, 1, 1), ...), as a
    layer scale or a learned per-channel shift: Torch-Pruning shrinks its one long dimension."""
    return sum(1 for s in parameter.shape if s > 1) == 1


def _bare_parameter_message(model: nn.Module, parameter: nn.Parameter) -> str:
    """Name the layer whose parameter a forward uses directly on a prunable group's channels."""
    pname = next((n for n, p in model.named_parameters() if p is parameter), "?")
    owner = pname.rpartition(".")[0]
    layer = dict(model.named_modules()).get(owner, model)
    return (f"layer {owner or '(the model itself)'} ({type(layer).__module__}.{type(layer).__name__}) uses its "
            f"parameter {pname} of shape {tuple(parameter.shape)} directly on the channels of a prunable group; "
            "such a parameter can be pruned when it holds one value per channel (one dimension longer than 1), "
            "and layers of these types otherwise: Conv2d, Linear, BatchNorm, GroupNorm, LayerNorm, InstanceNorm "
            "and PReLU")


def _side_width(m: nn.Module | nn.Parameter, outputs: bool) -> int:
    if isinstance(m, nn.Parameter):
        return max(m.shape)
    if isinstance(m, _CONV):
        return m.out_channels if outputs else m.in_channels
    if isinstance(m, _LINEAR):
        return m.out_features if outputs else m.in_features
    return _norm_width(m)


def _tied_classes(channels: int, tied: Mapping[tuple[str, bool], set[tuple[int, int]]],
                  modules: Mapping[str, nn.Module]) -> tuple[tuple[int, ...], ...] | None:
    """Channels of a group that must go together, all classes of one size (None: none tied).

    A grouped convolution or a GroupNorm splits a side into equal parts that must keep
    the same channels each; the group's channels behind one position in every part form
    a class. An empty tuple means no consistent split exists (a part lies outside this
    group, or the classes differ in size): the group stays whole.
    """
    if not tied:
        return None
    parent = list(range(channels))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for (name, outputs), pairs in tied.items():
        module = modules[name]
        parts = _channel_groups(module)
        size = _side_width(module, outputs) // parts
        channel_of = dict(pairs)
        for row, channel in pairs:
            for part in range(parts):
                other = channel_of.get(part * size + row % size)
                if other is None:
                    return ()
                parent[find(other)] = find(channel)
    members: dict[int, list[int]] = {}
    for c in range(channels):
        members.setdefault(find(c), []).append(c)
    classes = tuple(sorted(tuple(m) for m in members.values()))
    if len({len(m) for m in classes}) != 1:
        return ()
    return classes if len(classes[0]) > 1 else None


def _consistent(raw: list, modules: Mapping[str, nn.Module], lengths: Mapping[str, int]) -> list:
    """The groups that can be pruned: drop those marked whole, those whose claims on a layer
    cannot all hold (more channels than it has, a channel claimed twice: Torch-Pruning
    could not remove them consistently), and those sharing a grouped layer whose other
    channels stay whole in a count its groups do not divide. A channel convolution's
    width is its input length (`lengths`)."""
    raw = [r for r in raw if not r[-1]]
    while True:
        claimed: dict[tuple[str, bool], list[int]] = {}
        for i, (_, sides, *_rest) in enumerate(raw):
            for key in sides:
                claimed.setdefault(key, []).append(i)
        bad = set()
        for (name, outputs), owners in claimed.items():
            rows = [row for i in owners for row, _ in raw[i][1][(name, outputs)]]
            width = lengths[name] if name in lengths else _side_width(modules[name], outputs)
            if len(set(rows)) != len(rows) or any(not 0 <= r < width for r in rows):
                bad.update(owners)
                log.info("channels of %s are kept whole: Torch-Pruning's dependency groups for it do not add up",
                            name)
            elif (width - len(rows)) % _channel_groups(modules[name]):
                bad.update(owners)
        if not bad:
            return raw
        raw = [r for i, r in enumerate(raw) if i not in bad]


def describe_network(model: nn.Module, input_shape: tuple[int, int, int]) -> NetworkDescription:
    """Describe `model` as data: its layers, and its prunable groups in forward order.

    Prunable groups are Torch-Pruning's dependency groups; each layer's sides are linked
    to the groups (and to the very channels of them) that Torch-Pruning would remove.
    The classifier (the layer producing the model's output) is never pruned. Groups are
    ranked in index order; `ChannelPruner` ranks them by its criterion.
    """
    exported = getattr(model, "autoprune_inference_only", None)
    if exported:
        raise AutopruneError(f"{exported} is an inference-only torch.export program: it can be evaluated, not "
                             "described or pruned; to prune or train further, use model.pt from the same run "
                             "directory (the trainable network), or replay its best_policy.json on the base model")
    example = _example(input_shape)
    trace = _trace(model, example)
    channel_convs: dict = {}  # autograd node -> name of the channel convolution it came from
    graph = _build_graph(model, example, channel_convs)
    modules = dict(model.named_modules())
    ignored = [modules[trace.classifier]] if trace.classifier else []
    names = {m: n for n, m in model.named_modules()}
    # every parameter by its name: one used outside any layer (a layer scale) is a member of a group
    vectors = {p: n for n, p in model.named_parameters()}
    members: dict[str, nn.Module | nn.Parameter] = {**modules, **{n: p for p, n in vectors.items()}}
    order = trace.order

    def forward_key(name: str) -> int:
        return order.get(name, 1 << 30)

    raw = []
    with _bounded_reshapes(model):
        groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=_CONV + _LINEAR))
    for group in groups:
        root = group[0].dep.target.module
        channels = len(group[0].idxs)
        sides: dict[tuple[str, bool], set[tuple[int, int]]] = {}
        tied: dict[tuple[str, bool], set[tuple[int, int]]] = {}  # sides of layers with channel groups
        whole = False  # a layer of the group cannot be shrunk: keep all of its channels
        for item in group.items:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter):
                if not _channel_vector(module) or module not in vectors:
                    raise AutopruneError(_bare_parameter_message(model, module))
                name, outputs = vectors[module], True  # shrinks with the channels, like a norm's scale
            elif module not in names:
                name = channel_convs.get(getattr(item.dep.target, "grad_fn", None))
                if name is None:
                    continue  # Torch-Pruning's own nodes for adds, reshapes and concatenations
                outputs = True  # a channel convolution: the group's channels are the positions it runs at
            else:
                name = names[module]
                whole = whole or not _prunable_member(name, module)
                outputs = graph.is_out_channel_pruning_fn(item.dep.handler)
                if not outputs and not graph.is_in_channel_pruning_fn(item.dep.handler):
                    continue
            if item.root_idxs is None or any(r is None for r in item.root_idxs):
                raise AutopruneError(f"layer {name}: Torch-Pruning lost track of which channels it removes there")
            pairs = set(zip(item.idxs, item.root_idxs))
            if _channel_groups(module) > 1:
                tied.setdefault((name, outputs), set()).update(pairs)
            if isinstance(module, _NORMS + (nn.PReLU,)) and not _has_channel_params(module):
                continue
            sides.setdefault((name, outputs), set()).update(pairs)
        producers = sorted({n for (n, out) in sides if out and isinstance(members[n], _CONV + _LINEAR)},
                           key=forward_key)
        if not producers:
            continue
        classes = _tied_classes(channels, tied, members)
        multiple = 1 if classes is None else len(classes[0]) if classes else channels
        # kept whole: a layer Torch-Pruning cannot shrink, or a structure that allows keeping only all
        whole = whole or multiple >= channels
        raw.append((producers, sides, channels, classes if multiple > 1 else None, names[root], whole))
    raw.sort(key=lambda r: forward_key(r[0][0]))
    lengths = {name: trace.in_size[name][1] for name in set(channel_convs.values()) if name in trace.in_size}
    raw = _consistent(raw, members, lengths)

    groups: dict[str, GroupSpec] = {}
    out_links: dict[str, list[Link]] = {}
    in_links: dict[str, list[Link]] = {}
    for producers, sides, channels, classes, root, _ in raw:
        # named by its first producer; a layer whose outputs several groups share names the
        # first of them, the others take their next producer
        gname = next((p for p in producers if p not in groups), f"{producers[0]}/{len(groups)}")
        consumers = sorted({n for (n, out) in sides if not out and isinstance(members[n], _CONV + _LINEAR)},
                           key=forward_key)
        segments = set()
        for (name, outputs), pairs in sides.items():
            links = _links(gname, channels, sorted(pairs), outputs)
            (out_links if outputs else in_links).setdefault(name, []).extend(links)
            if outputs and name in producers:
                segments.update(link.channels for link in links if link.channels is not None)
        segments = sorted(segments)
        multiple = len(classes[0]) if classes else 1
        # a grouped conv cut to one output per group would pass for a depthwise one with
        # Torch-Pruning, which then prunes a network derived from it wrongly: keep two
        grouped = any(outputs and _channel_groups(members[name]) > 1 and isinstance(members[name], _CONV)
                      for name, outputs in sides)
        # a GroupNorm on 1×1 maps (after pooling) cannot normalise one channel per group: keep two
        pooled = any(isinstance(members[name], nn.GroupNorm) and trace.in_size.get(name) == (1, 1)
                     for name, _ in sides)
        min_keep = max(max(1, len(segments)) * multiple, 2 * multiple if grouped or pooled else 1)
        groups[gname] = GroupSpec(name=gname, channels=channels, producers=tuple(producers),
                                  consumers=tuple(consumers), root=root, multiple=multiple,
                                  min_keep=min(channels, min_keep), classes=classes,
                                  order=rank_channels(torch.zeros(channels), classes, segments)
                                  if segments or classes else None)

    executed = sorted(order, key=order.get)

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

    def fixed(name: str, width: int, links: dict[str, list[Link]]) -> tuple[tuple[Link, ...], int]:
        mine = tuple(links.get(name, ()))
        rest = width - sum(_link_size(link, groups) for link in mine)
        if rest < 0:
            raise AutopruneError(f"layer {name}: Torch-Pruning's groups claim more channels than it has")
        return mine, rest

    layers = []
    for name in sorted(modules, key=forward_key):
        m = modules[name]
        own = dict(m.named_parameters(recurse=False))
        if list(m.children()) and not own:
            continue
        # a per-channel parameter that pruning shrinks is a layer of its own
        full = {pname: f"{name}.{pname}" if name else pname for pname in own}
        for pname, parameter in own.items():
            if full[pname] in out_links:
                outs, out_fixed = fixed(full[pname], parameter.numel(), out_links)
                layers.append(LayerSpec(name=full[pname], kind="param", in_channels=parameter.numel(),
                                        out_channels=parameter.numel(), out_links=outs, out_fixed=out_fixed))
        params = sum(p.numel() for pname, p in own.items() if full[pname] not in out_links)
        if isinstance(m, _CONV):
            if name not in order:
                raise AutopruneError(f"layer {name} is not used in forward(); remove it before pruning")
            kind = "dwconv" if _is_depthwise(m) else "conv"
            outs, out_fixed = fixed(name, m.out_channels, out_links)
            ins, in_fixed = fixed(name, m.in_channels, in_links) if kind == "conv" else ((), 0)
            layers.append(LayerSpec(
                name=name, kind=kind, in_channels=m.in_channels, out_channels=m.out_channels,
                kernel=_pair(m.kernel_size), stride=_pair(m.stride), groups=m.groups,
                in_size=trace.in_size[name], out_size=trace.out_size[name], bias=m.bias is not None,
                out_links=outs, out_fixed=out_fixed, in_links=ins, in_fixed=in_fixed, post=post_ops(name),
                calls=trace.calls[name]))
        elif isinstance(m, _LINEAR):
            outs, out_fixed = fixed(name, m.out_features, out_links)
            ins, in_fixed = fixed(name, m.in_features, in_links)
            layers.append(LayerSpec(
                name=name, kind="linear", in_channels=m.in_features, out_channels=m.out_features,
                in_size=trace.in_size.get(name, (1, 1)), out_size=trace.out_size.get(name, (1, 1)),
                bias=m.bias is not None, out_links=outs, out_fixed=out_fixed, in_links=ins, in_fixed=in_fixed,
                post=post_ops(name) if name in order else (), calls=trace.calls.get(name, 1)))
        elif _channel_conv(m) and name in order:
            length, length_out = trace.in_size[name][1], trace.out_size[name][1]
            outs, out_fixed = fixed(name, length, out_links)
            layers.append(LayerSpec(
                name=name, kind="channel_conv", in_channels=length, out_channels=length_out,
                kernel=(1, m.kernel_size[0]), in_size=(1, length), out_size=(1, length_out), bias=m.bias is not None,
                out_links=outs, out_fixed=out_fixed + length_out - length, fixed_params=params,
                calls=trace.calls[name]))
        elif _has_channel_params(m) and params == (1 + int(getattr(m, "bias", None) is not None)) * _norm_width(m):
            width = _norm_width(m)
            outs, out_fixed = fixed(name, width, out_links)
            layers.append(LayerSpec(name=name, kind="bn" if isinstance(m, _BN) else "norm", in_channels=width,
                                    out_channels=width, bias=getattr(m, "bias", None) is not None,
                                    out_links=outs, out_fixed=out_fixed))
        elif params:
            if name in out_links:
                raise AutopruneError(f"layer {name} ({type(m).__name__}) has parameters of a shape that pruning "
                                     "cannot follow")
            layers.append(LayerSpec(name=name, kind="other", in_channels=0, out_channels=0, fixed_params=params,
                                    fixed_flops=_transposed_flops(m, trace.in_size.get(name),
                                                                    trace.out_size.get(name))))
    return NetworkDescription(input_shape=tuple(input_shape), layers=tuple(layers), groups=tuple(groups.values()))


def rank_channels(scores: torch.Tensor, classes: Iterable[tuple[int, ...]] | None = None,
                  segments: Iterable[Iterable[int]] = ()) -> tuple[int, ...]:
    """A group's channels, best first, whole classes at a time (channels a grouped layer ties
    together, `GroupSpec.classes`; None: every channel alone).

    A class scores the mean of its channels' scores, as Torch-Pruning's own pruners rank
    grouped layers; ties keep the lower index. The best class of each segment (the
    channels of one concatenated branch) comes first, so that keeping `GroupSpec.min_keep`
    channels or more never empties a branch.
    """
    classes = list(classes) if classes else [(c,) for c in range(scores.numel())]
    class_scores = torch.stack([scores[list(c)].double().mean() for c in classes])
    ranked = torch.argsort(-class_scores, stable=True).tolist()
    rank = {k: i for i, k in enumerate(ranked)}
    home = {c: k for k, members in enumerate(classes) for c in members}
    first: list[int] = []
    for segment in segments:
        touching = {home[c] for c in segment}
        if not touching & set(first):
            first.append(min(touching, key=rank.__getitem__))
    first.sort(key=rank.__getitem__)
    ranked = first + [k for k in ranked if k not in set(first)]
    return tuple(c for k in ranked for c in classes[k])


def _segments(description: NetworkDescription, group: str) -> list[tuple[int, ...]]:
    """The channels of a group that each of its partial producers carries."""
    found = set()
    for layer in description.layers:
        if layer.kind in ("conv", "dwconv", "linear"):
            found.update(link.channels for link in layer.out_links
                         if link.group == group and link.channels is not None)
    return sorted(found)


class ChannelPruner:
    """Prunes copies of one base model by policies.

    Channel scores are computed once, on the base model, and rank each group's channels
    (`description` carries that ranking), so a policy always removes the same channels
    whatever else was pruned before (replaying a policy gives the same network), the
    cost of a policy is known before pruning, and the search pays for scoring only once.

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
        description = describe_network(model, self.input_shape)
        if not description.groups:
            raise AutopruneError("this model has no prunable layer: every convolution and linear layer is the "
                                 "classifier, or its channels cannot be removed without breaking the network")
        score = get_criterion(criterion, seed)
        evidence = collect_evidence(copy.deepcopy(model), description, needs=needs_of(score), batches=batches)
        self.scores = {name: score(ev) for name, ev in evidence.items()}
        self.description = description.with_orders(
            {g.name: rank_channels(self.scores[g.name], g.classes, _segments(description, g.name))
             for g in description.groups})
        self._check_groups()

    def _check_groups(self) -> None:
        """Prune every group to its minimum once and compare with the prediction; a group that
        Torch-Pruning cannot remove consistently (the network breaks, or the count differs)
        is kept whole, and the log says which and why."""
        def problem(names: list[str]) -> str | None:
            """What goes wrong when these groups are pruned to their minimum; None: nothing."""
            policy = {name: 1e-9 for name in names}
            try:
                pruned = self.prune(policy)
            except AutopruneError as exc:
                return str(exc)
            predicted = policy_cost(self.description, policy, self.channel_multiple)
            counted = count_cost(describe_network(pruned, self.input_shape))
            if counted == predicted:
                return None
            return (f"pruned, it counts {counted.flops} FLOPs and {counted.params} parameters against "
                    f"{predicted.flops} and {predicted.params} predicted")

        names = self.description.group_names
        if problem(names) is None:
            return
        broken = {name: reason for name in names if (reason := problem([name])) is not None}
        for name in sorted(broken):
            log.warning("group %s is kept whole: Torch-Pruning cannot prune it consistently in this model (%s)",
                        name, broken[name])
        self.description = self.description.without_groups(broken)
        self.scores = {name: s for name, s in self.scores.items() if name not in broken}
        if not self.description.groups:
            raise AutopruneError("this model has no channels Torch-Pruning can prune consistently")

    @property
    def groups(self) -> tuple[GroupSpec, ...]:
        return self.description.groups

    def kept_indices(self, policy: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Indices of the channels each group keeps under `policy` (the best of its ranking)."""
        kept = policy_channels(self.description, policy, self.channel_multiple)
        return {g.name: torch.tensor(sorted(g.ranked()[:kept[g.name]]), dtype=torch.long)
                for g in self.description.groups}

    def prune(self, policy: Mapping[str, float]) -> nn.Module:
        """A physically smaller copy of the base model with `policy` applied."""
        kept = self.kept_indices(policy)
        removals = {}
        for g in self.description.groups:
            keep = set(kept[g.name].tolist())
            removals[g.root or g.name] = [i for i in range(g.channels) if i not in keep]
        model = remove_channels(self.model, self.input_shape, removals)
        model.autoprune_policy = {k: float(v) for k, v in check_policy(self.description, policy).items()}
        if hasattr(model, "autoprune_config"):
            del model.autoprune_config  # the zoo constructor no longer describes this network
        return model


def remove_channels(model: nn.Module, input_shape: tuple[int, int, int],
                    removals: Mapping[str, list[int]]) -> nn.Module:
    """A copy of `model` without the channels `removals` names (group root layer -> indices of
    its output channels), every coupled layer shrunk with it; checked to still run."""
    model = copy.deepcopy(model)
    model.eval()
    example = _example(input_shape)
    with torch.no_grad():
        expected = tuple(model(example).shape)
    graph = _build_graph(model, example)
    modules = dict(model.named_modules())
    for root_name, remove in removals.items():
        if not remove:
            continue
        root = modules[root_name]
        handler = graph.get_pruner_of_module(root).prune_out_channels
        graph.get_pruning_group(root, handler, list(remove)).prune(record_history=False)
    _follow_custom_norms(model)
    try:
        with torch.no_grad():
            got = tuple(model(example).shape)
    except (RuntimeError, ValueError) as exc:  # ValueError: e.g. a GroupNorm left one value per group
        first = str(exc).strip().splitlines()[0]
        raise AutopruneError(f"the pruned network no longer runs ({first}); Torch-Pruning cannot prune this "
                             "architecture consistently") from None
    if got != expected:
        raise AutopruneError(f"the pruned network returns shape {got}, the base model {expected}")
    return model


def _follow_custom_norms(model: nn.Module) -> None:
    """Update the width a normalisation layer of the model's own code keeps in `normalized_shape`.

    ConvNeXt's reference code defines its own LayerNorm: weight and bias parameters, and a
    `normalized_shape` tuple it hands to `F.layer_norm`. Torch-Pruning shrinks the parameters
    but does not know the tuple, and the pruned network fails on a width mismatch.
    """
    for m in model.modules():
        shape = getattr(m, "normalized_shape", None)
        weight = getattr(m, "weight", None)
        if isinstance(m, nn.LayerNorm) or not isinstance(shape, tuple) or not isinstance(weight, torch.Tensor):
            continue
        if len(shape) == 1 == weight.dim() and shape[0] != weight.shape[0]:
            m.normalized_shape = (weight.shape[0],)


def cut_group(model: nn.Module, input_shape: tuple[int, int, int], group: GroupSpec, channels_before: int,
              channels_after: int) -> nn.Module:
    """A copy of `model`, a network whose `group` the group's ranking already cut to
    `channels_before` channels (its other layers may have been trained since), cut further
    to `channels_after`: the same network as pruning the base model to `channels_after`."""
    ranked = group.ranked()
    current = sorted(ranked[:channels_before])  # the base channels still there, in their order
    keep = set(ranked[:channels_after])
    return remove_channels(model, input_shape,
                           {group.root or group.name: [i for i, c in enumerate(current) if c not in keep]})


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


def global_magnitude_prune(model: nn.Module, description: NetworkDescription, pruning_ratio: float, *,
                           lower_bound: float = 0.2, p: int = 2
                           ) -> tuple[nn.Module, dict[str, int], NetworkDescription]:
    """Torch-Pruning's global magnitude pruning of a copy of `model`.

    Every group of `description` is scored by Torch-Pruning's `MagnitudeImportance(p)` on
    its dependency group (the Lp norm of each channel over every coupled layer, divided
    by the group's mean), and the lowest `pruning_ratio` of all scored units goes under
    one threshold, as `MetaPruner(global_pruning=True)` ranks them. A unit is a channel,
    or a class of channels that must go together (a grouped convolution's or a
    GroupNorm's, see `GroupSpec.classes`), scored by its channels' mean. The thresholding
    is done here rather than by `MetaPruner.step`, because Torch-Pruning's own one-step
    global pruning has three faults: its `max_pruning_ratio` only stops a group from
    being pruned again in later iterative steps (a group may lose any share), a group
    whose every channel falls under the threshold is refused and left whole (so a larger
    ratio could keep more channels), and it pairs channels across concatenated branches
    that each have their own GroupNorm (the network no longer runs).

    No group keeps fewer channels than the other agents keep at `lower_bound`: its best
    units up to that count (the best of each concatenated branch first, as
    `rank_channels` orders them) are never ranked for removal, and more pruning never
    keeps more. The chosen channels are removed as every agent's are
    (`remove_channels`). Returns the pruned network, the channels each group kept and
    `description` ranked the way the channels were chosen (kept first), whose costs are
    the network's: which channels go matters where a group spans branches of different
    cost.
    """
    work = copy.deepcopy(model).eval()
    graph = _build_graph(work, _example(description.input_shape))
    modules = dict(work.named_modules())
    importance = tp.importance.MagnitudeImportance(p=p)
    units: list[tuple[float, str, tuple[int, ...]]] = []  # (score, group, its channels)
    protected = 0
    for g in description.groups:
        root = modules[g.root or g.name]
        dependency = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                                             list(range(g.channels)))
        scores = importance(dependency)
        if scores is None or scores.numel() != g.channels:
            log.warning("Torch-Pruning scores no channels of group %s; kept whole", g.name)
            continue
        scores = scores.detach().double().cpu()
        kept_best = set(rank_channels(scores, g.classes, _segments(description, g.name))[:group_keep(g, lower_bound)])
        for members in g.classes or tuple((c,) for c in range(g.channels)):
            if kept_best & set(members):
                protected += 1
            else:
                units.append((float(scores[list(members)].mean()), g.name, tuple(members)))
    total = len(units) + protected
    pruned_units = min(total - int(total * (1.0 - pruning_ratio)), len(units)) if total else 0
    removed: dict[str, list[int]] = {}
    if pruned_units > 0:
        threshold = sorted(score for score, _, _ in units)[pruned_units - 1]
        for score, name, members in units:
            if score <= threshold:
                removed.setdefault(name, []).extend(members)
    pruned = remove_channels(model, description.input_shape,
                             {g.root or g.name: sorted(removed[g.name]) for g in description.groups if g.name in removed})
    kept, orders = {}, {}
    for g in description.groups:
        gone = set(removed.get(g.name, ()))
        kept[g.name] = g.channels - len(gone)
        orders[g.name] = tuple(c for c in range(g.channels) if c not in gone) + tuple(sorted(gone))
    return pruned, kept, description.with_orders(orders)
