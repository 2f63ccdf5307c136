"""Scoring a candidate policy inside a search: prune, recalibrate BatchNorm, measure.

Every searcher (the AMC environment, NetAdapt, the baselines) ranks policies by the
same signal: the pruned network's accuracy on a fixed subset of the validation split
held out from the training set, after BatchNorm statistics are re-estimated on a few
training batches (EagleEye's adaptive BN). The test set is never used here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from autoprune.costs import policy_channels
from autoprune.data import DataBundle
from autoprune.errors import AutopruneError
from autoprune.pruning import ChannelPruner
from autoprune.train import evaluate, recalibrate_bn


@dataclass
class EvaluatorConfig:
    """How a candidate policy is scored."""

    criterion: str = "l1"  # channel selection inside a group
    channel_multiple: int = 1  # kept channels rounded to this multiple
    bn_batches: int = 10  # training batches for BatchNorm recalibration
    bn_batch_size: int = 64  # images per recalibration batch
    val_images: int = 1000  # validation images scored per candidate (a fixed subset)
    seed: int = 0  # recalibration batches and the random criterion


def criterion_batches(data: DataBundle, criterion: str, seed: int = 0) -> list | None:
    """The training batches a data-driven criterion (taylor, apoz) scores channels on; None otherwise."""
    if criterion not in ("taylor", "apoz"):
        return None

    generator = torch.Generator().manual_seed(seed)
    return list(data.batches("train", 64, shuffle=True, generator=generator, limit=64 * 8))


class PolicyEvaluator:
    """Validation accuracy of the base model pruned by a policy, cached per channel plan."""

    def __init__(self, model: nn.Module, data: DataBundle, config: EvaluatorConfig | None = None):
        self.config = config or EvaluatorConfig()
        if len(data.val) == 0:
            raise AutopruneError("the search needs a validation split; use --val-size > 0")
        self.data = data
        batches = criterion_batches(data, self.config.criterion, self.config.seed)
        self.pruner = ChannelPruner(model, data.input_shape, criterion=self.config.criterion, batches=batches,
                                    channel_multiple=self.config.channel_multiple, seed=self.config.seed)
        self.description = self.pruner.description
        self._cache: dict[tuple, float] = {}
        self.evaluations = 0
        self.seconds = 0.0  # spent pruning, recalibrating and measuring
        self.timings = {"prune": 0.0, "bn_recalibration": 0.0, "validation": 0.0}  # the same, split

    def prune(self, policy: Mapping[str, float], *, inference_only: bool = False) -> nn.Module:
        """The pruned network with recalibrated BatchNorm (not fine-tuned).

        `inference_only` lays the weights out channels-last, which runs the forward pass
        faster on CPU; such a copy is for scoring only and is never trained (the CPU
        backward of some channels-last convolutions is unreliable in current PyTorch).
        """
        started = time.perf_counter()
        model = self.pruner.prune(policy)
        if inference_only:
            model = model.to(memory_format=torch.channels_last)
        pruned = time.perf_counter()
        recalibrate_bn(model, self.data, num_batches=self.config.bn_batches, batch_size=self.config.bn_batch_size,
                       seed=self.config.seed)
        self.timings["prune"] += pruned - started
        self.timings["bn_recalibration"] += time.perf_counter() - pruned
        return model

    def accuracy(self, policy: Mapping[str, float]) -> float:
        """Validation accuracy (fraction) of `policy` after BN recalibration."""
        key = tuple(policy_channels(self.description, policy, self.config.channel_multiple).values())
        if key not in self._cache:
            started = time.perf_counter()
            model = self.prune(policy, inference_only=True)
            measured = time.perf_counter()
            self._cache[key] = evaluate(model, self.data, "val", limit=self.config.val_images)["accuracy"]
            self.timings["validation"] += time.perf_counter() - measured
            self.evaluations += 1
            self.seconds += time.perf_counter() - started
        return self._cache[key]
