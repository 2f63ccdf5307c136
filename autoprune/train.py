"""Training, evaluation and BatchNorm recalibration.

`train` runs SGD with a cosine learning-rate schedule, checkpoints its full state after
every epoch and resumes from that state when it finds one, so a killed run loses at
most one epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from autoprune.data import DataBundle
from autoprune.devices import model_device
from autoprune.errors import AutopruneError, SettingError
from autoprune.io import atomic_torch_save

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch from one number; returns a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@dataclass
class TrainConfig:
    """Optimisation settings for `train` (and the long-term fine-tune after a search)."""

    epochs: int = 30  # passes over the training split
    batch_size: int = 256  # images per SGD step
    lr: float = 0.1  # peak learning rate; decays to 0 by a cosine
    momentum: float = 0.9  # SGD momentum (Nesterov)
    weight_decay: float = 5e-4  # L2 penalty on all parameters
    augment: bool = True  # random crop and (where valid) horizontal flip
    seed: int = 0  # drives initialisation order of batches and augmentation
    max_steps_per_epoch: int | None = None  # cap steps per epoch (quick runs and tests)
    amp: bool = False  # mixed precision (float16 autocast with loss scaling); CUDA only


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put `model` in eval mode for the block and restore its mode afterwards.

    Programs loaded with torch.export are fixed in eval mode and refuse `.eval()`.
    """
    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        was_training = None
    try:
        yield model
    finally:
        if was_training:
            model.train()


def check_output(result, batch: int) -> None:
    """A classifier returns one (batch, classes) tensor; say what else a model returned."""
    if isinstance(result, torch.Tensor):
        if result.dim() == 2 and result.shape[0] == batch:
            return
        what = f"a tensor of shape {tuple(result.shape)}"
    elif isinstance(result, Mapping):
        what = f"a {type(result).__name__} with keys {', '.join(map(repr, list(result)[:5]))}"
    elif isinstance(result, (tuple, list)):
        what = f"a {type(result).__name__} of {len(result)} items"
    else:
        what = f"a {type(result).__name__}"
    raise AutopruneError(f"the model's forward returned {what} for a batch of {batch}; autoprune works on "
                         "classifiers whose forward returns one tensor of shape (batch, classes) "
                         "(wrap the model so that it does)")


def check_model_fits(model: nn.Module, data: DataBundle) -> None:
    """Raise a clear AutopruneError when `model` cannot classify `data`'s images."""
    x, _ = next(data.batches("val" if len(data.val) else "train", 2))
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x.to(model_device(model)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise AutopruneError(f"the model does not accept {data.name} images of shape {tuple(x.shape[1:])}: "
                             f"{first}; pick a model built for this input") from None
    check_output(out, x.shape[0])
    if out.shape[1] != data.num_classes:
        raise AutopruneError(f"the model outputs shape {tuple(out.shape[1:])} but {data.name} has "
                             f"{data.num_classes} classes")


@torch.no_grad()
def evaluate(model: nn.Module, data: DataBundle, split: str = "test", *, batch_size: int = 128,
             limit: int | None = None) -> dict[str, float]:
    """Accuracy (fraction correct) and mean cross-entropy of `model` on a split."""
    correct, total, loss_sum = 0, 0, 0.0
    device = model_device(model)
    with eval_mode(model):
        for x, y in data.batches(split, batch_size, limit=limit):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    if total == 0:
        raise AutopruneError(f"the {split} split is empty")
    return {"accuracy": correct / total, "loss": loss_sum / total, "images": total}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: DataBundle, *, num_batches: int = 20, batch_size: int = 64,
                   seed: int = 0) -> nn.Module:
    """Re-estimate BatchNorm running statistics on a few training batches (adaptive BN).

    After channels are removed the stored statistics no longer describe the activations;
    a few forward passes in train mode with a cumulative average fix that without any
    gradient step (Li et al., EagleEye, 2020). The batches are drawn with a fixed seed so
    that the same model always gets the same statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved_momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches seen
    was_training = model.training
    model.train()
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    for x, _ in data.batches("train", batch_size, shuffle=True, generator=generator,
                             limit=num_batches * batch_size):
        model(x.to(device))
    for bn, momentum in zip(bns, saved_momentum):
        bn.momentum = momentum
    model.train(was_training)
    return model


def recalibration_note(model: nn.Module) -> str | None:
    """What BatchNorm recalibration leaves alone in this model (normalisation without running
    statistics: GroupNorm, LayerNorm, InstanceNorm), as one sentence; None if nothing."""
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm))})
    if not kinds:
        return None
    return (f"{', '.join(kinds)} keep no running statistics: BN recalibration does nothing for them "
            "(they normalise each input by itself)")


def _make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))
    return optimizer, scheduler


def epoch_steps(config: TrainConfig, train_images: int) -> int:
    """SGD steps `train` takes per epoch with `config` on `train_images` training images."""
    steps = math.ceil(train_images / config.batch_size)
    return min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps


def _load_training_state(path) -> dict | None:
    """A saved training state, or None where there is none. A damaged one (cut by a full disk,
    overwritten) is set aside with a warning: training starts again from its beginning,
    which gives what the lost state would have led to."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"config", "epoch", "model"} <= set(state):
            raise ValueError("not a training state")
        return state
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        log.warning("%s is damaged (%s); training starts again from its beginning", path, type(exc).__name__)
        Path(path).unlink(missing_ok=True)
        return None


def train(model: nn.Module, data: DataBundle, config: TrainConfig, *, state_path: str | os.PathLike | None = None,
          progress: bool = True, eval_split: str = "val") -> list[dict]:
    """Train `model` in place; returns one record per epoch (loss, accuracy, seconds).

    When `state_path` is given, the full training state (weights, optimiser, schedule,
    random generators, history) is written there atomically after every epoch, and a run
    that finds a state file for the same settings resumes from it.
    """
    check_model_fits(model, data)
    device = model_device(model)
    if config.amp and device.type != "cuda":
        raise SettingError("amp", f"mixed precision runs on a CUDA device only; this model is on {device}")
    generator = seed_everything(config.seed)
    steps_per_epoch = epoch_steps(config, len(data.train))
    optimizer, scheduler = _make_optimizer(model, config, steps_per_epoch * config.epochs)
    scaler = torch.amp.GradScaler("cuda") if config.amp else None
    history: list[dict] = []
    start_epoch = 0

    state = _load_training_state(state_path)
    if state is not None:
        if {"amp": False, **(state.get("config") or {})} != asdict(config):  # states from before `amp` lack it
            raise AutopruneError(f"{state_path} holds a run with other settings; delete it to start over "
                                 "or repeat the original command to resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start_epoch = state["epoch"]
        log.info("resuming from %s at epoch %d", state_path, start_epoch)

    loss_fn = nn.CrossEntropyLoss()
    # channels_last would be ~20 % faster here, but PyTorch 2.13's CPU backward of a strided
    # 1x1 convolution with few input channels corrupts memory in that layout, and pruned
    # ResNet shortcuts are exactly such layers; so the default layout is kept.
    for epoch in range(start_epoch, config.epochs):
        model.train()
        started = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = data.batches("train", config.batch_size, shuffle=True, augment=config.augment,
                               generator=generator, limit=steps_per_epoch * config.batch_size)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False, unit="step")
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                logits = model(x)
                loss = loss_fn(logits, y)
                loss.backward()
                optimizer.step()
            else:
                with torch.autocast(device.type, dtype=torch.float16):
                    logits = model(x)
                    loss = loss_fn(logits, y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            loss_sum += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "seconds": time.perf_counter() - started}
        if eval_split and len(getattr(data, eval_split)):
            record[f"{eval_split}_accuracy"] = evaluate(model, data, eval_split)["accuracy"]
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, record)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if state_path is not None:
            atomic_torch_save({"config": asdict(config), "epoch": epoch + 1, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                               "scaler": scaler.state_dict() if scaler is not None else None,
                               "history": history}, state_path)
    model.eval()
    return history
