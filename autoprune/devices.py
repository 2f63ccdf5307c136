"""Which device the pipeline computes on: one setting (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`).

Channel removal (Torch-Pruning) and latency measurement always run on the CPU copy of a
network; training, BatchNorm recalibration, scoring and the agent's networks run on the
chosen device. Batches are moved to wherever the model's parameters are.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from autoprune.errors import SettingError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device `name` stands for; `auto` is CUDA when present, else the CPU. A device this
    machine lacks is a SettingError saying so."""
    if isinstance(name, torch.device):
        text = str(name)
    else:
        text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise SettingError("device", f"{name!r} is not a device; use {DEVICE_FORMS}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("device", f"{text}: CUDA is not available here (torch {torch.__version__}, "
                                         f"{'no CUDA build' if torch.version.cuda is None else 'no GPU found'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingError("device", f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SettingError("device", f"{text}: Apple's MPS is not available here")
    elif device.type != "cpu":
        raise SettingError("device", f"{text!r} is not supported; use {DEVICE_FORMS}")
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) are; the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
