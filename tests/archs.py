"""Small networks assembled from everyday CNN blocks, fixed or drawn at random.

The cost model must be exact on any architecture Torch-Pruning can prune, not only on
the zoo: these blocks are the shapes users bring (concatenated branches, grouped and
depthwise convolutions, squeeze-excitation, flatten into linear heads, normalisation
other than BatchNorm, assorted activations, ConvNeXt's channels-last blocks with layer
scale and its reference code's own LayerNorm, efficient channel attention's Conv1d along
the channels, CBAM's attention over the channels and over the positions, GCNet's context
block).
`random_net(seed)` draws a network from them for the property tests.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU}
NORMS = ("bn", "gn", "in", "ln", "none")


def norm(kind: str, channels: int) -> nn.Module:
    """A normalisation layer over `channels` feature maps."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(2 if channels % 2 == 0 else 1, channels)
    if kind == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "ln":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W), as CNNs write it
    return nn.Identity()


def conv_unit(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, norm_kind: str = "bn",
              act: str = "relu", bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias),
                         norm(norm_kind, cout), ACTIVATIONS[act]())


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, act: str = "relu"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = ACTIVATIONS[act]()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class ECA(nn.Module):
    """Efficient channel attention (Wang et al., CVPR 2020): a one-channel Conv1d slides along the
    pooled channels and gates them."""

    def __init__(self, kernel: int = 3, bias: bool = False):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel, padding=kernel // 2, bias=bias)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        y = self.pool(x).squeeze(-1).transpose(-1, -2)  # (N, 1, C): the channels as a sequence
        return x * self.gate(self.conv(y).transpose(-1, -2).unsqueeze(-1))


class ConcatBlock(nn.Module):
    """Two branches of `split` and `channels - split` maps, concatenated, optionally
    squeeze-excited, added to the block's input."""

    def __init__(self, channels: int, split: int, norm_kind: str, act: str, se: bool):
        super().__init__()
        self.a = conv_unit(channels, split, 3, norm_kind=norm_kind, act=act)
        self.b = conv_unit(channels, channels - split, 1, norm_kind=norm_kind, act=act)
        self.se = SqueezeExcite(channels, max(2, channels // 4), act) if se else nn.Identity()

    def forward(self, x):
        return x + self.se(torch.cat([self.a(x), self.b(x)], dim=1))


class GroupedBlock(nn.Module):
    """ResNeXt's bottleneck: 1×1, grouped 3×3, 1×1, residual add."""

    def __init__(self, channels: int, width: int, groups: int, norm_kind: str, act: str):
        super().__init__()
        self.reduce = conv_unit(channels, width, 1, norm_kind=norm_kind, act=act)
        self.grouped = conv_unit(width, width, 3, groups=groups, norm_kind=norm_kind, act=act)
        self.expand = nn.Sequential(nn.Conv2d(width, channels, 1, bias=False), norm(norm_kind, channels))
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        return self.act(x + self.expand(self.grouped(self.reduce(x))))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm_kind: str, act: str):
        super().__init__()
        self.body = nn.Sequential(conv_unit(channels, channels, 3, norm_kind=norm_kind, act=act),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm(norm_kind, channels))
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        return self.act(x + self.body(x))


class SeparableDown(nn.Module):
    """Depthwise (optionally with a channel multiplier) then pointwise, stride 2."""

    def __init__(self, cin: int, cout: int, multiplier: int, norm_kind: str, act: str):
        super().__init__()
        self.depthwise = conv_unit(cin, cin * multiplier, 3, 2, groups=cin, norm_kind=norm_kind, act=act)
        self.pointwise = conv_unit(cin * multiplier, cout, 1, norm_kind=norm_kind, act=act)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class ChannelNorm(nn.Module):
    """A LayerNorm over the channels written in the model's own code, as ConvNeXt's reference
    implementation has it: by hand on (N, C, H, W) maps (mean and variance over dim 1, then a
    per-channel scale and shift), or through `F.layer_norm` on channels-last input, with the
    width kept in `normalized_shape`."""

    def __init__(self, channels: int, channels_last: bool = False, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.normalized_shape = (channels,)
        self.channels_last, self.eps = channels_last, eps

    def forward(self, x):
        if self.channels_last:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7×7, then channels last for a LayerNorm and two linear
    layers run at every position, scaled per channel by a bare parameter (layer scale).
    `own_norm`: the LayerNorm is a `ChannelNorm`."""

    def __init__(self, channels: int, act: str = "gelu", own_norm: bool = False):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = ChannelNorm(channels, channels_last=True) if own_norm else nn.LayerNorm(channels)
        self.expand = nn.Linear(channels, 4 * channels)
        self.act = ACTIVATIONS[act]()
        self.project = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x):
        y = self.norm(self.depthwise(x).permute(0, 2, 3, 1))
        y = self.project(self.act(self.expand(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ScaledResidual(nn.Module):
    """A residual branch scaled per channel by a (1, C, 1, 1) parameter before the add."""

    def __init__(self, channels: int, norm_kind: str, act: str):
        super().__init__()
        self.body = nn.Sequential(conv_unit(channels, channels, 3, norm_kind=norm_kind, act=act),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.scale = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))

    def forward(self, x):
        return x + self.body(x) * self.scale


class Net(nn.Module):
    """stem → blocks → head; `head` is "pool" (global pooling, one linear), "mlp" (pooling, a
    hidden linear with LayerNorm and dropout) or "flatten" (flatten into two linears)."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], features: int, head: str, spatial: int,
                 num_classes: int = 10, act: str = "relu"):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        if head == "pool":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, num_classes))
        elif head == "mlp":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, 24),
                                      nn.LayerNorm(24), ACTIVATIONS[act](), nn.Dropout(0.1),
                                      nn.Linear(24, num_classes))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(spatial), nn.Flatten(),
                                      nn.Linear(features * spatial * spatial, 32), ACTIVATIONS[act](),
                                      nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def concat_se_net(in_channels: int = 1) -> Net:
    """The shape of the issue's user model: a stem, concatenating blocks with SE added to the input,
    a depthwise + pointwise downsampling, a linear head."""
    blocks = [ConcatBlock(16, 8, "bn", "relu", se=True), ConcatBlock(16, 8, "bn", "relu", se=True),
              SeparableDown(16, 32, 1, "bn", "relu"), ConcatBlock(32, 12, "bn", "relu", se=True)]
    return Net(conv_unit(in_channels, 16, 3), blocks, 32, "pool", 1)


def resnext_net(in_channels: int = 1) -> Net:
    blocks = [GroupedBlock(32, 16, 4, "bn", "relu"), GroupedBlock(32, 16, 4, "bn", "relu")]
    return Net(conv_unit(in_channels, 32, 3, 2), blocks, 32, "pool", 1)


def groupnorm_net(in_channels: int = 1) -> Net:
    blocks = [ResidualBlock(16, "gn", "silu"), SeparableDown(16, 24, 1, "gn", "silu"),
              ConcatBlock(24, 10, "gn", "silu", se=False)]
    return Net(conv_unit(in_channels, 16, 3, norm_kind="gn", act="silu"), blocks, 24, "mlp", 1, act="silu")


def multiplier_net(in_channels: int = 1) -> Net:
    """A depthwise stem with a channel multiplier of 2 (groups = input channels)."""
    blocks = [SeparableDown(8, 16, 2, "bn", "hardswish"), ResidualBlock(16, "in", "hardswish")]
    return Net(conv_unit(in_channels, 8, 3, act="hardswish"), blocks, 16, "flatten", 2, act="hardswish")


def separable_first_net(in_channels: int = 1) -> Net:
    """A depthwise-separable first layer (depthwise on the image, then pointwise), a VGG-style
    flatten into two linear layers."""
    stem = SeparableDown(in_channels, 16, 1, "bn", "relu6")
    blocks = [ResidualBlock(16, "bn", "relu6"), SeparableDown(16, 24, 1, "bn", "relu6")]
    return Net(stem, blocks, 24, "flatten", 2, act="relu6")


class Fire(nn.Module):
    """SqueezeNet's module: a 1×1 squeeze, then 1×1 and 3×3 expansions concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1(x)), torch.relu(self.expand3(x))], 1)


class FireNet(nn.Module):
    """SqueezeNet's shape: functional activations and pooling, a 1×1 convolution as the
    classifier, and a forward that ends in functional operations (pooling, flatten)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, stride=2)
        self.fire1 = Fire(16, 4, 8)
        self.fire2 = Fire(16, 6, 12)
        self.classifier = nn.Conv2d(24, num_classes, 1)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2, ceil_mode=True)
        x = self.fire2(self.fire1(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.classifier(x)), 1), 1)


def fire_net(in_channels: int = 1) -> FireNet:
    return FireNet(in_channels)


class SharedAttention(nn.Module):
    """CBAM's channel attention: one MLP (two linear layers) run on the average and on the
    maximum over the positions, each call the same shape."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)

    def mlp(self, v: torch.Tensor) -> torch.Tensor:
        return self.expand(torch.relu(self.reduce(v)))

    def forward(self, x):
        weight = torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))
        return x * weight[:, :, None, None]


def shared_net(in_channels: int = 1) -> Net:
    """Residual blocks with shared-MLP channel attention between them."""
    blocks = [ResidualBlock(16, "bn", "relu"), SharedAttention(16, 6), SeparableDown(16, 24, 1, "bn", "relu"),
              SharedAttention(24, 8)]
    return Net(conv_unit(in_channels, 16, 3), blocks, 24, "pool", 1)


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: the mean and the maximum over the channels, a convolution from
    those two maps to one, and that one map gating every channel."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


def cbam_net(in_channels: int = 1) -> Net:
    """CBAM blocks (channel, then spatial attention) after a residual block and a downsampling one."""
    blocks = [ResidualBlock(16, "bn", "relu"), SharedAttention(16, 6), SpatialAttention(7),
              SeparableDown(16, 24, 1, "bn", "relu"), SpatialAttention(3)]
    return Net(conv_unit(in_channels, 16, 3), blocks, 24, "flatten", 2)


class TwoScales(nn.Module):
    """One convolution run on the map and on its pooled half: two shapes for one layer."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        full, half = self.shared(x), self.shared(nn.functional.avg_pool2d(x, 2))
        return self.head(torch.cat([full.mean((2, 3)), half.mean((2, 3))], 1))


def two_scales_net() -> nn.Module:
    return TwoScales()


class DecoderNet(nn.Module):
    """An encoder, a transposed convolution back up, the skip concatenated (a U-Net's shape):
    autoprune does not prune a transposed convolution, so the channels around it stay."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.encode = conv_unit(in_channels, 8, 3)
        self.down = conv_unit(8, 16, 3, 2)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.decode = conv_unit(16, 12, 3)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        skip = self.encode(x)
        x = self.decode(torch.cat([skip, self.up(self.down(skip))], 1))
        return self.head(x.mean((2, 3)))


def decoder_net(in_channels: int = 1) -> DecoderNet:
    return DecoderNet(in_channels)


def eca_net(in_channels: int = 1) -> Net:
    """Residual blocks gated by efficient channel attention, one of them on concatenated branches."""
    blocks = [nn.Sequential(ResidualBlock(16, "bn", "relu"), ECA(3)), ConcatBlock(16, 6, "bn", "relu", se=False),
              ECA(5, bias=True), SeparableDown(16, 24, 1, "bn", "relu"), ECA(3)]
    return Net(conv_unit(in_channels, 16, 3), blocks, 24, "pool", 1)


def convnext_net(in_channels: int = 1) -> Net:
    """A patchify stem, ConvNeXt blocks (layer scale, linear layers on channels-last maps), a
    residual branch with its own per-channel scale."""
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 4, stride=4), nn.GroupNorm(1, 16))
    blocks = [ConvNeXtBlock(16), ConvNeXtBlock(16), ScaledResidual(16, "bn", "gelu")]
    return Net(stem, blocks, 16, "mlp", 1, act="gelu")


def convnext_own_norm_net(in_channels: int = 1) -> Net:
    """ConvNeXt as its reference code writes it: its own LayerNorm after the stem, before the
    downsampling convolution and in the blocks."""
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 4, stride=4), ChannelNorm(16))
    blocks = [ConvNeXtBlock(16, own_norm=True), ChannelNorm(16), nn.Conv2d(16, 24, 2, stride=2),
              ConvNeXtBlock(24, own_norm=True)]
    return Net(stem, blocks, 24, "pool", 1)


class GlobalContext(nn.Module):
    """GCNet's context block (Cao et al. 2019): attention pooling (a one-channel 1×1 convolution,
    softmax over the positions), then a bottleneck transform (1×1 convolution, LayerNorm over
    (C/r, 1, 1), ReLU, 1×1 convolution), added to every position. `reference`: pooled as the
    paper's code does (x.view(n, 1, c, h * w), a matrix product, a view back); otherwise
    channel-wise ((x * weights).sum), the same function. `group_norm`: GroupNorm(1, C/r) in
    place of the LayerNorm."""

    def __init__(self, channels: int, ratio: float = 0.25, reference: bool = False, group_norm: bool = False):
        super().__init__()
        hidden, self.reference = max(2, int(channels * ratio)), reference
        self.mask = nn.Conv2d(channels, 1, 1)
        normal = nn.GroupNorm(1, hidden) if group_norm else nn.LayerNorm([hidden, 1, 1])  # the same function
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, 1), normal, nn.ReLU(),
                                       nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        if self.reference:
            weights = self.mask(x).view(n, 1, h * w).softmax(dim=2).unsqueeze(-1)
            context = torch.matmul(x.view(n, 1, c, h * w), weights).view(n, c, 1, 1)
        else:
            weights = self.mask(x).flatten(2).softmax(dim=2).view(n, 1, h, w)
            context = (x * weights).sum((2, 3), keepdim=True)
        return x + self.transform(context)


def gcnet_net(in_channels: int = 1, reference: bool = False) -> Net:
    """Residual blocks followed by GCNet's context block, one after a downsampling."""
    blocks = [ResidualBlock(16, "bn", "relu"), GlobalContext(16, reference=reference),
              SeparableDown(16, 24, 1, "bn", "relu"), GlobalContext(24, 1 / 8, reference=reference)]
    return Net(conv_unit(in_channels, 16, 3), blocks, 24, "pool", 1)


FIXED = {"concat_se": concat_se_net, "resnext": resnext_net, "groupnorm": groupnorm_net,
         "multiplier": multiplier_net, "separable_first": separable_first_net, "convnext": convnext_net,
         "fire": fire_net, "decoder": decoder_net, "shared": shared_net, "eca": eca_net, "cbam": cbam_net,
         "convnext_own_norm": convnext_own_norm_net, "gcnet": gcnet_net}


def random_net(seed: int, in_channels: int = 1) -> Net:
    """A network of two to four random blocks, random widths, norms, activations and head."""
    rng = random.Random(seed)
    act = rng.choice(list(ACTIVATIONS))
    norm_kind = rng.choice(NORMS)
    width = rng.choice([8, 12, 16])
    stem = conv_unit(in_channels, width, 3, rng.choice([1, 2]), norm_kind=norm_kind, act=act)
    blocks: list[nn.Module] = []
    downs = 0
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(["residual", "concat", "grouped", "separable", "convnext", "scaled", "eca", "spatial"])
        if kind == "residual":
            blocks.append(ResidualBlock(width, norm_kind, act))
        elif kind == "eca":
            blocks.append(nn.Sequential(ResidualBlock(width, norm_kind, act), ECA(rng.choice([3, 5]))))
        elif kind == "spatial":
            blocks.append(nn.Sequential(ResidualBlock(width, norm_kind, act), SpatialAttention(rng.choice([3, 7]))))
        elif kind == "convnext":
            blocks.append(ConvNeXtBlock(width, act, own_norm=rng.random() < 0.5))
        elif kind == "scaled":
            blocks.append(ScaledResidual(width, norm_kind, act))
        elif kind == "concat":
            blocks.append(ConcatBlock(width, rng.randint(2, width - 2), norm_kind, act, se=rng.random() < 0.5))
        elif kind == "grouped":
            groups = rng.choice([2, 4])
            blocks.append(GroupedBlock(width, groups * rng.choice([2, 3, 4]), groups, norm_kind, act))
        elif downs < 2:
            out = width + rng.choice([4, 8])
            blocks.append(SeparableDown(width, out, rng.choice([1, 1, 2]), norm_kind, act))
            width, downs = out, downs + 1
        else:
            blocks.append(ResidualBlock(width, norm_kind, act))
    head = rng.choice(["pool", "mlp", "flatten"])
    # GCNet's block (channel-wise) at the end of a third of the nets, drawn from a stream of its
    # own so that the draws above stay what they were for every seed
    extra = random.Random(seed ^ 0x6C0)
    if extra.random() < 1 / 3:
        blocks.append(GlobalContext(width, extra.choice([0.25, 0.5]), group_norm=extra.random() < 0.5))
    return Net(stem, blocks, width, head, 2, act=act)


def mixed_net(in_channels: int = 1) -> Net:
    """Concatenated branches and grouped convolutions in one network (the searches' test model)."""
    blocks = [ConcatBlock(16, 6, "bn", "relu", se=False), GroupedBlock(16, 16, 4, "bn", "relu"),
              SeparableDown(16, 24, 1, "bn", "relu"), ConcatBlock(24, 10, "gn", "silu", se=True)]
    return Net(conv_unit(in_channels, 16, 3), blocks, 24, "pool", 1)


class DictOutput(nn.Module):
    """Returns {"logits": ...}, as detection-style code does."""

    def __init__(self):
        super().__init__()
        self.net = concat_se_net()

    def forward(self, x):
        return {"logits": self.net(x)}


def dict_output_net() -> nn.Module:
    return DictOutput()


def raising_factory() -> nn.Module:
    raise ValueError("width must be positive")


def flat_net() -> nn.Module:
    """No prunable layer: a single linear classifier."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


class PositionBias(nn.Module):
    """A learned bias per channel and position: a bare parameter with more than one value per
    channel, which pruning cannot follow."""

    def __init__(self, channels: int, size: int = 28):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, size, size))

    def forward(self, x):
        return x + self.bias


def unknown_layer_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), PositionBias(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def transposed_count(model: nn.Module, shape: tuple[int, int, int]) -> int:
    """MACs and bias adds of the transposed convolutions, from the shapes they see: every input
    element meets out_channels / groups · kh · kw weights."""
    found = []

    def hook(module, inputs, output):
        per_input = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        found.append(inputs[0][0].numel() * per_input + (output[0].numel() if module.bias is not None else 0))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for handle in handles:
        handle.remove()
    return sum(found)


def counted_cost(model: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int]:
    """An independent count of a network: Torch-Pruning's counter over its convolutions (Conv1d
    too) and linear layers, its count of a transposed convolution (at the output positions)
    replaced by the count at the input positions, and the parameter sum."""
    _, _, layer_flops, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *shape), layer_wise=True)
    flops = sum(v for m, v in layer_flops.items() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) and v)
    return int(flops) + transposed_count(model, shape), sum(p.numel() for p in model.parameters())


def fail_cuts_of(monkeypatch, model: nn.Module, shape: tuple[int, int, int], group: str) -> None:
    """Make Torch-Pruning's cut of `group` in `model` fail, as a network it cannot prune
    consistently does: the pruned network "no longer runs (a stand-in failure)"."""
    from autoprune import pruning
    from autoprune.errors import AutopruneError

    root = pruning.describe_network(model, shape).group(group).root or group
    original = pruning.remove_channels

    def failing(network, input_shape, removals):
        if removals.get(root):
            raise AutopruneError("the pruned network no longer runs (a stand-in failure)")
        return original(network, input_shape, removals)

    monkeypatch.setattr(pruning, "remove_channels", failing)
