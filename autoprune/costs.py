"""The network described once as data, and its cost under any pruning policy.

A `NetworkDescription` lists every layer that has parameters or multiply-accumulates
(kind, channels, kernel, stride, groups, input and output size) and says, through
`Link`s, which prunable groups carry its output and input channels. FLOPs and
parameters of a policy are pure arithmetic over that description: no model, no hooks,
no torch. The search calls these functions thousands of times.

A group's channels are ranked once (by the pruning criterion, on the base model;
`GroupSpec.order`), and keeping k channels keeps the first k of that ranking. Where
a layer carries only some of a group's channels (one branch of a concatenation), the
ranking says how many of them survive, so prediction stays exact and pure. A group
whose channels feed a grouped convolution or a GroupNorm keeps whole classes of
`multiple` channels (the same channels in every part, as Torch-Pruning needs).

FLOPs means multiply-accumulates (MACs) of convolution and linear layers, plus one per
output element for a bias, exactly as Torch-Pruning's counter counts these layers.
Normalisation, activations, pooling and adds are not counted (BatchNorm folds into the
convolution at deployment; the rest are memory-bound and belong to the latency model).
Parameters are all trainable parameters, those of normalisation layers included.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from autoprune.errors import AutopruneError

LAYER_KINDS = ("conv", "dwconv", "linear", "bn", "norm", "param", "channel_conv", "other")


@dataclass(frozen=True)
class Link:
    """Features of one side of a layer that follow a prunable group."""

    group: str
    per: int = 1  # features of the layer per channel of the group (h·w after a flatten)
    channels: tuple[int, ...] | None = None  # the group's channels this side carries (None: all)
    rows: tuple[int, ...] | None = None  # outputs: the layer's channel for each of `channels` (None: same index)


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the network, as far as cost is concerned."""

    name: str  # module name in the model
    kind: str  # one of LAYER_KINDS; "dwconv" has groups == in == out channels; "norm": GroupNorm, LayerNorm, ...;
    # "param": a per-channel parameter used outside any layer (a layer scale), named by the parameter;
    # "channel_conv": a one-channel Conv1d sliding along the channels (ECA's attention): its length is a group's
    # channels, so in_channels/out_channels hold its input and output lengths
    in_channels: int  # of the unpruned model
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    groups: int = 1
    in_size: tuple[int, int] = (1, 1)  # input height, width (linear: the positions it runs at, (1, 1) for a vector)
    out_size: tuple[int, int] = (1, 1)  # output height, width
    bias: bool = False  # conv/linear: a bias; bn/norm: a shift next to the scale
    out_links: tuple[Link, ...] = ()  # groups carrying its output channels
    out_fixed: int = 0  # output channels no group controls
    in_links: tuple[Link, ...] = ()  # groups carrying its input features (conv, linear)
    in_fixed: int = 0  # input features that no group controls (image channels, ...)
    fixed_params: int = 0  # parameters of an "other" layer that pruning never touches
    fixed_flops: int = 0  # and its FLOPs (a transposed convolution's; 0 for layers of unknown work)
    post: tuple[str, ...] = ()  # what runs right after it: "bn", then "relu" / "relu6"
    calls: int = 1  # conv, linear: runs per forward pass (a shared layer: more than one), each at in_size

    @property
    def out_group(self) -> str | None:
        """The group carrying (most of) this layer's outputs, None when pruning never touches them."""
        return self.out_links[0].group if self.out_links else None


@dataclass(frozen=True)
class GroupSpec:
    """A set of channels that must be pruned together; agents act on groups."""

    name: str  # the first layer (in forward order) producing these channels
    channels: int  # channels in the unpruned model
    producers: tuple[str, ...]  # layers whose outputs are (some of) these channels
    consumers: tuple[str, ...]  # layers whose inputs are (some of) these channels
    root: str = ""  # the layer Torch-Pruning prunes the group through (default: name)
    multiple: int = 1  # kept channels are a multiple of this (grouped convolutions, GroupNorm)
    min_keep: int = 1  # never fewer: one channel for each concatenated branch, so none is emptied
    classes: tuple[tuple[int, ...], ...] | None = None  # channels kept or removed together (size `multiple`)
    order: tuple[int, ...] | None = None  # channel ranking, best first (None: index order)

    def ranked(self) -> tuple[int, ...]:
        return self.order if self.order is not None else tuple(range(self.channels))


@dataclass(frozen=True)
class NetworkDescription:
    """Layers and prunable groups of a network for one input shape (batch 1)."""

    input_shape: tuple[int, int, int]  # channels, height, width
    layers: tuple[LayerSpec, ...]
    groups: tuple[GroupSpec, ...]  # in forward order
    _group_index: dict = field(default_factory=dict, compare=False, repr=False)
    _positions: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self._group_index.update({g.name: g for g in self.groups})
        # where the channels of each partial link sit in their group's ranking
        rank = {g.name: {c: i for i, c in enumerate(g.ranked())} for g in self.groups}
        for layer in self.layers:
            for link in layer.out_links + layer.in_links:
                if link.channels is not None:
                    self._positions[id(link)] = sorted(rank[link.group][c] for c in link.channels)

    def group(self, name: str) -> GroupSpec:
        try:
            return self._group_index[name]
        except KeyError:
            raise AutopruneError(f"no prunable group {name!r}; groups are {', '.join(self.group_names)}") from None

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def link_kept(self, link: Link, kept: Mapping[str, int]) -> int:
        """Features a link carries when its group keeps `kept[group]` channels."""
        k = kept[link.group]
        if link.channels is None:
            return link.per * k
        return link.per * bisect.bisect_left(self._positions[id(link)], k)

    def layer_channels(self, layer: LayerSpec, kept: Mapping[str, int]) -> tuple[int, int]:
        """(input, output) channels of a layer when groups keep `kept` channels."""
        out = layer.out_fixed + sum(self.link_kept(link, kept) for link in layer.out_links)
        if layer.kind == "dwconv":
            return out, out
        return layer.in_fixed + sum(self.link_kept(link, kept) for link in layer.in_links), out

    def with_orders(self, orders: Mapping[str, tuple[int, ...]]) -> NetworkDescription:
        """The same network with groups ranked by `orders` (group name -> channel ranking)."""
        groups = tuple(GroupSpec(**{**asdict(g), "order": tuple(int(c) for c in orders[g.name])})
                       if g.name in orders else g for g in self.groups)
        return NetworkDescription(self.input_shape, self.layers, groups)

    def without_groups(self, names: set[str]) -> NetworkDescription:
        """The same network with the groups `names` kept whole (their channels become fixed)."""
        full = {g.name: g.channels for g in self.groups}

        def split(links: tuple[Link, ...], fixed: int) -> tuple[tuple[Link, ...], int]:
            gone = [link for link in links if link.group in names]
            return (tuple(link for link in links if link.group not in names),
                    fixed + sum(self.link_kept(link, full) for link in gone))

        layers = []
        for layer in self.layers:
            outs, out_fixed = split(layer.out_links, layer.out_fixed)
            ins, in_fixed = split(layer.in_links, layer.in_fixed)
            layers.append(LayerSpec(**{**{f: getattr(layer, f) for f in layer.__dataclass_fields__},
                                       "out_links": outs, "out_fixed": out_fixed, "in_links": ins,
                                       "in_fixed": in_fixed}))
        return NetworkDescription(self.input_shape, tuple(layers), tuple(g for g in self.groups if g.name not in names))

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape),
                "layers": [asdict(layer) for layer in self.layers],
                "groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, data: dict) -> NetworkDescription:
        def opt(v):
            return None if v is None else tuple(int(x) for x in v)

        def links(items) -> tuple[Link, ...]:
            return tuple(Link(group=d["group"], per=int(d["per"]), channels=opt(d["channels"]), rows=opt(d["rows"]))
                         for d in items)

        def layer(d: dict) -> LayerSpec:
            d = dict(d)
            for key in ("kernel", "stride", "in_size", "out_size"):
                d[key] = tuple(d[key])
            d["out_links"], d["in_links"] = links(d["out_links"]), links(d["in_links"])
            d["post"] = tuple(d.get("post", ()))
            return LayerSpec(**d)

        def group(d: dict) -> GroupSpec:
            classes = d.get("classes")
            return GroupSpec(**{**d, "producers": tuple(d["producers"]), "consumers": tuple(d["consumers"]),
                                "order": opt(d.get("order")),
                                "classes": None if classes is None else tuple(opt(c) for c in classes)})

        return cls(input_shape=tuple(data["input_shape"]), layers=tuple(layer(d) for d in data["layers"]),
                   groups=tuple(group(d) for d in data["groups"]))


@dataclass(frozen=True)
class Cost:
    """FLOPs (MACs) and parameters of a network."""

    flops: int
    params: int


# ---------------------------------------------------------------- policies

def channels_to_keep(channels: int, keep_ratio: float, multiple: int = 1) -> int:
    """Channels kept when a group of `channels` is pruned to `keep_ratio`.

    Rounded to the nearest multiple of `multiple`, never fewer than one multiple (a group
    is never emptied) and never more than `channels`.
    """
    if not 0.0 < keep_ratio <= 1.0 or math.isnan(keep_ratio):
        raise AutopruneError(f"keep ratio {keep_ratio} is outside (0, 1]")
    if multiple < 1:
        raise AutopruneError(f"channel multiple must be at least 1, got {multiple}")
    kept = int(math.floor(keep_ratio * channels / multiple + 0.5)) * multiple
    return max(min(multiple, channels), min(channels, kept))


def group_multiple(group: GroupSpec, multiple: int = 1) -> int:
    """The step of a group's kept counts: its own structural multiple and the user's, together."""
    return math.lcm(group.multiple, multiple)


def _group_floor(group: GroupSpec, step: int) -> int:
    return min(group.channels, -(-max(group.min_keep, 1) // step) * step)


def group_keep(group: GroupSpec, keep_ratio: float, multiple: int = 1) -> int:
    """Channels a group keeps at `keep_ratio`: the nearest count its structure allows."""
    step = group_multiple(group, multiple)
    return max(_group_floor(group, step), channels_to_keep(group.channels, keep_ratio, step))


def group_choices(group: GroupSpec, multiple: int = 1) -> list[int]:
    """Every channel count a group can keep, ascending."""
    step = group_multiple(group, multiple)
    floor = _group_floor(group, step)
    return sorted({floor, *range(step, group.channels + 1, step), group.channels} - set(range(floor)))


def check_policy(description: NetworkDescription, policy: Mapping[str, float]) -> dict[str, float]:
    """Validate a policy against the groups of a network; missing groups keep everything."""
    unknown = [name for name in policy if name not in description._group_index]
    if unknown:
        raise AutopruneError(f"policy names unknown group(s) {', '.join(unknown)}; this model's groups are "
                             f"{', '.join(description.group_names)} (see `autoprune info`)")
    full = {}
    for g in description.groups:
        ratio = policy.get(g.name, 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise AutopruneError(f"keep ratio {ratio!r} for group {g.name} is not a number")
        ratio = float(ratio)
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise AutopruneError(f"keep ratio {ratio} for group {g.name} is outside (0, 1]")
        full[g.name] = ratio
    return full


def policy_channels(description: NetworkDescription, policy: Mapping[str, float],
                    multiple: int = 1) -> dict[str, int]:
    """Channels kept per group under a policy (group name -> count)."""
    full = check_policy(description, policy)
    return {g.name: group_keep(g, full[g.name], multiple) for g in description.groups}


def policy_rounding(description: NetworkDescription, policy: Mapping[str, float],
                    multiple: int = 1) -> dict[str, dict]:
    """Groups whose structure moved a keep ratio to another count than the nearest whole channel.

    A grouped convolution keeps the same channels in each of its groups, and a group
    shared by concatenated branches keeps at least one channel per branch, so a ratio may
    not be met exactly; this says what was asked and what is kept.
    """
    full = check_policy(description, policy)
    moved = {}
    for g in description.groups:
        kept = group_keep(g, full[g.name], multiple)
        if kept != channels_to_keep(g.channels, full[g.name], multiple):
            step = group_multiple(g, multiple)
            moved[g.name] = {"keep_ratio": full[g.name], "kept": kept, "channels": g.channels, "multiple": step,
                             "minimum": _group_floor(g, step)}
    return moved


def uniform_policy(description: NetworkDescription, keep_ratio: float) -> dict[str, float]:
    """The same keep ratio for every group."""
    return {g.name: float(keep_ratio) for g in description.groups}


# ---------------------------------------------------------------- counting

def layer_cost(layer: LayerSpec, cin: int, cout: int) -> Cost:
    """FLOPs (MACs, plus bias adds) and parameters of one layer at `cin` -> `cout` channels."""
    if layer.kind in ("conv", "dwconv"):
        kh, kw = layer.kernel
        groups = cout if layer.kind == "dwconv" else layer.groups
        weights = kh * kw * (cin // groups) * cout
        positions = layer.out_size[0] * layer.out_size[1]
        bias = cout if layer.bias else 0
        return Cost(flops=(weights + bias) * positions * layer.calls, params=weights + bias)
    if layer.kind == "linear":
        bias = cout if layer.bias else 0
        positions = layer.out_size[0] * layer.out_size[1]  # 1, or where it runs on every position of a map
        # the bias counted once, as Torch-Pruning's counter does, so that the two figures compare
        return Cost(flops=(cin * cout * positions + bias) * layer.calls, params=cin * cout + bias)
    if layer.kind in ("bn", "norm"):
        return Cost(flops=0, params=(1 + int(layer.bias)) * cout)
    if layer.kind == "param":
        return Cost(flops=0, params=cout)
    if layer.kind == "channel_conv":
        # one weight per tap at every output position (the length follows the pruned channels)
        per_position = layer.kernel[0] * layer.kernel[1] + int(layer.bias)
        return Cost(flops=per_position * cout * layer.calls, params=layer.fixed_params)
    return Cost(flops=layer.fixed_flops, params=layer.fixed_params)


def count_cost(description: NetworkDescription, kept: Mapping[str, int] | None = None) -> Cost:
    """Total cost with groups keeping `kept` channels (None: the unpruned network)."""
    if kept is None:
        kept = {g.name: g.channels for g in description.groups}
    flops = params = 0
    for layer in description.layers:
        c = layer_cost(layer, *description.layer_channels(layer, kept))
        flops += c.flops
        params += c.params
    return Cost(flops=flops, params=params)


def policy_cost(description: NetworkDescription, policy: Mapping[str, float], multiple: int = 1) -> Cost:
    """Cost of the network pruned by `policy` (group name -> keep ratio)."""
    return count_cost(description, policy_channels(description, policy, multiple))


def group_costs(description: NetworkDescription) -> dict[str, Cost]:
    """Cost of the layers whose outputs each group carries (how `info` shares out the total).

    A layer whose outputs several groups carry is shared out by channel count.
    """
    kept = {g.name: g.channels for g in description.groups}
    shares: dict[str, list[float]] = {g.name: [0.0, 0.0] for g in description.groups}
    for layer in description.layers:
        if not layer.out_links:
            continue
        cin, cout = description.layer_channels(layer, kept)
        c = layer_cost(layer, cin, cout)
        for link in layer.out_links:
            share = description.link_kept(link, kept) / max(1, cout)
            shares[link.group][0] += c.flops * share
            shares[link.group][1] += c.params * share
    return {name: Cost(flops=round(f), params=round(p)) for name, (f, p) in shares.items()}


def format_count(value: float, unit: str = "") -> str:
    """12345678 -> '12.35M' (k, M, G)."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"
