"""The network described once as data, and its cost under any pruning policy.

A `NetworkDescription` lists every layer that has parameters or multiply-accumulates
(kind, channels, kernel, stride, groups, input and output size) and says which prunable
group controls its output and input channels. FLOPs and parameters of a policy are pure
arithmetic over that description: no model, no hooks, no torch. The search calls these
functions thousands of times.

FLOPs means multiply-accumulates (MACs) of convolution and linear layers, plus one per
output element for a bias, exactly as Torch-Pruning's counter counts these layers.
BatchNorm, activations, pooling and adds are not counted (BatchNorm folds into the
convolution at deployment; the rest are memory-bound and belong to the latency model).
Parameters are all trainable parameters, BatchNorm's scale and shift included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from autoprune.errors import AutopruneError

LAYER_KINDS = ("conv", "dwconv", "linear", "bn", "other")


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the network, as far as cost is concerned."""

    name: str  # module name in the model
    kind: str  # one of LAYER_KINDS; "dwconv" has groups == in == out channels
    in_channels: int  # of the unpruned model
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    groups: int = 1
    in_size: tuple[int, int] = (1, 1)  # input height, width
    out_size: tuple[int, int] = (1, 1)  # output height, width
    bias: bool = False
    out_group: str | None = None  # group whose channels are this layer's outputs (None: fixed)
    in_groups: tuple[tuple[str, int], ...] = ()  # (group, input features per group channel)
    in_fixed: int = 0  # input features that no group controls (image channels, ...)
    fixed_params: int = 0  # parameters of an "other" layer that pruning never touches
    post: tuple[str, ...] = ()  # what runs right after it: "bn", then "relu" / "relu6"


@dataclass(frozen=True)
class GroupSpec:
    """A set of channels that must be pruned together; agents act on groups."""

    name: str  # the first layer (in forward order) producing these channels
    channels: int  # channels in the unpruned model
    producers: tuple[str, ...]  # layers whose outputs are these channels
    consumers: tuple[str, ...]  # layers whose inputs are these channels


@dataclass(frozen=True)
class NetworkDescription:
    """Layers and prunable groups of a network for one input shape (batch 1)."""

    input_shape: tuple[int, int, int]  # channels, height, width
    layers: tuple[LayerSpec, ...]
    groups: tuple[GroupSpec, ...]  # in forward order
    _group_index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self._group_index.update({g.name: g for g in self.groups})

    def group(self, name: str) -> GroupSpec:
        try:
            return self._group_index[name]
        except KeyError:
            raise AutopruneError(f"no prunable group {name!r}; groups are {', '.join(self.group_names)}") from None

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape),
                "layers": [asdict(layer) for layer in self.layers],
                "groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, data: dict) -> NetworkDescription:
        def layer(d: dict) -> LayerSpec:
            d = dict(d)
            for key in ("kernel", "stride", "in_size", "out_size"):
                d[key] = tuple(d[key])
            d["in_groups"] = tuple((g, int(m)) for g, m in d["in_groups"])
            d["post"] = tuple(d.get("post", ()))
            return LayerSpec(**d)

        return cls(input_shape=tuple(data["input_shape"]),
                   layers=tuple(layer(d) for d in data["layers"]),
                   groups=tuple(GroupSpec(name=g["name"], channels=g["channels"], producers=tuple(g["producers"]),
                                          consumers=tuple(g["consumers"])) for g in data["groups"]))


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


def check_policy(description: NetworkDescription, policy: Mapping[str, float]) -> dict[str, float]:
    """Validate a policy against the groups of a network; missing groups keep everything."""
    unknown = [name for name in policy if name not in description._group_index]
    if unknown:
        raise AutopruneError(f"policy names unknown group(s) {', '.join(unknown)}; this model's groups are "
                             f"{', '.join(description.group_names)} (see `autoprune info`)")
    full = {}
    for g in description.groups:
        ratio = float(policy.get(g.name, 1.0))
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise AutopruneError(f"keep ratio {ratio} for group {g.name} is outside (0, 1]")
        full[g.name] = ratio
    return full


def policy_channels(description: NetworkDescription, policy: Mapping[str, float],
                    multiple: int = 1) -> dict[str, int]:
    """Channels kept per group under a policy (group name -> count)."""
    full = check_policy(description, policy)
    return {g.name: channels_to_keep(g.channels, full[g.name], multiple) for g in description.groups}


def uniform_policy(description: NetworkDescription, keep_ratio: float) -> dict[str, float]:
    """The same keep ratio for every group."""
    return {g.name: float(keep_ratio) for g in description.groups}


# ---------------------------------------------------------------- counting

def layer_channels(layer: LayerSpec, kept: Mapping[str, int]) -> tuple[int, int]:
    """(input, output) channels of a layer when groups keep `kept` channels."""
    out = kept[layer.out_group] if layer.out_group is not None else layer.out_channels
    if layer.kind == "dwconv":
        return out, out
    cin = layer.in_fixed + sum(kept[g] * per for g, per in layer.in_groups)
    return cin, out


def layer_cost(layer: LayerSpec, kept: Mapping[str, int]) -> Cost:
    """FLOPs (MACs, plus bias adds) and parameters of one layer."""
    cin, cout = layer_channels(layer, kept)
    if layer.kind in ("conv", "dwconv"):
        kh, kw = layer.kernel
        groups = cout if layer.kind == "dwconv" else layer.groups
        weights = kh * kw * (cin // groups) * cout
        positions = layer.out_size[0] * layer.out_size[1]
        bias = cout if layer.bias else 0
        return Cost(flops=(weights + bias) * positions, params=weights + bias)
    if layer.kind == "linear":
        bias = cout if layer.bias else 0
        return Cost(flops=cin * cout + bias, params=cin * cout + bias)
    if layer.kind == "bn":
        return Cost(flops=0, params=2 * cout)
    return Cost(flops=0, params=layer.fixed_params)


def count_cost(description: NetworkDescription, kept: Mapping[str, int] | None = None) -> Cost:
    """Total cost with groups keeping `kept` channels (None: the unpruned network)."""
    if kept is None:
        kept = {g.name: g.channels for g in description.groups}
    flops = params = 0
    for layer in description.layers:
        c = layer_cost(layer, kept)
        flops += c.flops
        params += c.params
    return Cost(flops=flops, params=params)


def policy_cost(description: NetworkDescription, policy: Mapping[str, float], multiple: int = 1) -> Cost:
    """Cost of the network pruned by `policy` (group name -> keep ratio)."""
    return count_cost(description, policy_channels(description, policy, multiple))


def group_costs(description: NetworkDescription) -> dict[str, Cost]:
    """Cost of the layers whose outputs each group controls (how `info` shares out the total)."""
    kept = {g.name: g.channels for g in description.groups}
    shares: dict[str, list[int]] = {g.name: [0, 0] for g in description.groups}
    for layer in description.layers:
        if layer.out_group is not None:
            c = layer_cost(layer, kept)
            shares[layer.out_group][0] += c.flops
            shares[layer.out_group][1] += c.params
    return {name: Cost(flops=f, params=p) for name, (f, p) in shares.items()}


def format_count(value: float, unit: str = "") -> str:
    """12345678 -> '12.35M' (k, M, G)."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"
