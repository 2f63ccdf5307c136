"""The model zoo (sized for 28×28 and 32×32 inputs) and loading of users' own models.

Zoo: `resnet20`, `resnet56` (CIFAR-style ResNets, He et al. 2016), `vgg` (a small VGG
with BatchNorm), `mobilenetv1`, `mobilenetv2` (strides adapted to small images, width
multiplier 0.5 by default so that a search stays affordable on a CPU).

Every zoo model takes a `ModelConfig`; `build_model(name, ...)` builds one by name.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from autoprune.errors import AutopruneError, SettingError

CHECKPOINT_FORMAT = "autoprune-checkpoint"
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "resnet20-fashion-mnist.pt"


@dataclass
class ModelConfig:
    """Shape of the data a zoo model is built for, and its width."""

    in_channels: int = 1  # image channels (1 for MNIST-style data, 3 for CIFAR)
    num_classes: int = 10  # classifier outputs
    input_size: int = 28  # image height = width
    width_mult: float = 1.0  # scales every layer's channel count
    extra: dict = field(default_factory=dict)  # model-specific options


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ---------------------------------------------------------------- ResNet (CIFAR style)

class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual add; a 1×1 conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for small images: three stages of n basic blocks (16, 32, 64 channels)."""

    def __init__(self, config: ModelConfig, depth: int = 20):
        super().__init__()
        if (depth - 2) % 6:
            raise AutopruneError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(w * config.width_mult)) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(config.in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- VGG (small, BN)

VGG_SMALL = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256)


class VGG(nn.Module):
    """A VGG-style stack of 3×3 conv-BN-ReLU with max pooling, global pool and one linear."""

    def __init__(self, config: ModelConfig, layout: tuple = VGG_SMALL):
        super().__init__()
        layers: list[nn.Module] = []
        cin = config.in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, round(int(item) * config.width_mult))
                layers += [*_conv_bn(cin, cout, 3), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------- MobileNet V1

MOBILENETV1_LAYOUT = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                      (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """Depthwise-separable convs (Howard et al. 2017); stem stride 1 for small images."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.width_mult
        stem = _make_divisible(32 * width)
        layers: list[nn.Module] = [*_conv_bn(config.in_channels, stem, 3), nn.ReLU(inplace=True)]
        cin = stem
        for channels, stride in MOBILENETV1_LAYOUT:
            cout = _make_divisible(channels * width)
            layers += [*_conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU(inplace=True),
                       *_conv_bn(cin, cout, 1), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------- MobileNet V2

MOBILENETV2_LAYOUT = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # expansion, channels, blocks, stride


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 linear projection, add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *_conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with CIFAR strides: stem and second stage at stride 1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.width_mult
        cin = _make_divisible(32 * width)
        layers: list[nn.Module] = [*_conv_bn(config.in_channels, cin, 3), nn.ReLU6(inplace=True)]
        for expansion, channels, blocks, stride in MOBILENETV2_LAYOUT:
            cout = _make_divisible(channels * width)
            for i in range(blocks):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        last = _make_divisible(1280 * width)
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------- registry and loading

ZOO: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "resnet20": lambda c: ResNetCifar(c, depth=20),
    "resnet56": lambda c: ResNetCifar(c, depth=56),
    "vgg": VGG,
    "mobilenetv1": MobileNetV1,
    "mobilenetv2": MobileNetV2,
}
DEFAULT_WIDTH = {"mobilenetv1": 0.5, "mobilenetv2": 0.5}


def build_model(name: str, *, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                width_mult: float | None = None) -> nn.Module:
    """Build a zoo model by name for images of the given channels and size."""
    if name not in ZOO:
        raise AutopruneError(f"unknown model {name!r}; the zoo has {', '.join(ZOO)}, "
                             "or pass package.module:factory or a saved model file")
    width = DEFAULT_WIDTH.get(name, 1.0) if width_mult is None else width_mult
    config = ModelConfig(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width_mult=width)
    model = ZOO[name](config)
    model.autoprune_config = {"name": name, **asdict(config)}  # type: ignore[assignment]
    return model


def import_factory(spec: str, setting: str = "model") -> Callable:
    """The callable `package.module:name` names, importable from the working directory;
    a failure is a `SettingError` of `setting`."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` would: the user's package from where they run
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it loads
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SettingError(setting, f"cannot import {module_name!r} for {spec}: {type(exc).__name__}: {first}") \
            from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SettingError(setting, f"{module_name} has no callable {attr!r} (from {spec})")
    return factory


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra) -> None:
    """Save a zoo model's weights with what is needed to rebuild it (atomically)."""
    from autoprune.io import atomic_torch_save

    config = getattr(model, "autoprune_config", None)
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "config": config,
               "state_dict": model.state_dict(), **extra}
    atomic_torch_save(payload, path)


def _load_file(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutopruneError(f"cannot load {path}: {first}; is it a model or checkpoint saved "
                             "by torch.save or autoprune?") from None


def load_model(model: str | None = None, weights: str | os.PathLike | None = None, *,
               in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> tuple[nn.Module, dict]:
    """Load a model from what a user names on the command line.

    - nothing: the shipped default (ResNet-20 trained on Fashion-MNIST);
    - a zoo name (`resnet20`), optionally with `weights` (an autoprune checkpoint or state dict);
    - `package.module:factory` with `weights`;
    - a path to an autoprune checkpoint, a whole saved model (torch.save), or a pruned
      model exported by autoprune (`.pt2`).

    Returns the model in eval mode and a dict of metadata (e.g. the data set it was trained on).
    """
    if model is None:
        if weights is not None:
            raise SettingError("weights", "weights need a model to load into (a zoo name or package.module:factory)")
        if not DEFAULT_CHECKPOINT.is_file():
            raise AutopruneError(f"the default checkpoint {DEFAULT_CHECKPOINT} is missing; reinstall autoprune "
                                 "or run `autoprune train --model resnet20`")
        model = str(DEFAULT_CHECKPOINT)

    meta: dict = {}
    if model in ZOO:
        net = build_model(model, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
    elif os.path.exists(model):
        net, meta = _from_file(Path(model))
    elif ":" in model:
        factory = import_factory(model)
        try:
            net = factory()
        except Exception as exc:  # the user's code: any failure is theirs to see, in one line
            first = (str(exc).strip().splitlines() or [""])[0]
            raise AutopruneError(f"model factory {model} raised {type(exc).__name__}: {first}") from None
        if not isinstance(net, nn.Module):
            raise AutopruneError(f"{model} returned {type(net).__name__}, not a torch.nn.Module")
    else:
        raise SettingError("model", f"{model!r} is neither a zoo model ({', '.join(ZOO)}), "
                             "an existing file, nor package.module:factory")

    if weights is not None:
        payload = _load_file(Path(weights)) if os.path.exists(weights) else None
        if payload is None:
            raise AutopruneError(f"weights file {weights} not found")
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
        if state is None:
            raise AutopruneError(f"{weights} holds no state dict")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise AutopruneError(f"{weights} does not fit model {model}: {first}") from None
        if isinstance(payload, dict):
            meta.update({k: v for k, v in payload.items() if k not in ("state_dict", "format", "version")})
    try:
        net.eval()
    except NotImplementedError:
        pass  # torch.export programs are already fixed in eval mode
    return net, meta


def _from_file(path: Path) -> tuple[nn.Module, dict]:
    if path.suffix == ".pt2":
        from autoprune.export import load_exported

        return load_exported(path)
    payload = _load_file(path)
    if isinstance(payload, nn.Module):
        return payload, {}
    from autoprune.export import TRAINABLE_FORMAT

    if isinstance(payload, dict) and payload.get("format") == TRAINABLE_FORMAT:
        return payload["model"], dict(payload.get("meta") or {})
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        config = payload.get("config") or {}
        name = config.get("name")
        if name not in ZOO:
            raise AutopruneError(f"{path} was made for model {name!r}, which this version does not know")
        net = build_model(name, in_channels=config["in_channels"], num_classes=config["num_classes"],
                          input_size=config["input_size"], width_mult=config["width_mult"])
        net.load_state_dict(payload["state_dict"])
        meta = {k: v for k, v in payload.items() if k not in ("state_dict", "format", "version", "config")}
        return net, meta
    raise AutopruneError(f"{path} is neither a model nor an autoprune checkpoint; a bare state dict "
                         "needs a model name and a weights file")
