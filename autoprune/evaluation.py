"""Scoring a candidate policy inside a search: prune, recalibrate BatchNorm, measure.

Every searcher (the AMC environment, NetAdapt, the baselines) ranks policies by the
same signal: the pruned network's accuracy on a fixed subset of the validation split
held out from the training set, after BatchNorm statistics are re-estimated on a few
training batches (EagleEye's adaptive BN). The test set is never used here.

At budgets that remove most of a network, every candidate scores near chance after
recalibration alone, and a search steered by that score is steered by noise. There
`score_steps` SGD steps on a fixed set of training batches (the same for every
candidate) come first: cheap, and enough to tell a good allocation from a bad one. The
batches are augmented as the fine-tune's are (`score_augment`): steps on plain batches,
with BatchNorm recalibrated after them, favoured networks that fit those batches and then
fine-tuned worst (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from autoprune.costs import policy_channels
from autoprune.data import DataBundle
from autoprune.devices import model_device
from autoprune.errors import AutopruneError, SettingError
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
    score_steps: int = 0  # SGD steps on fixed training batches before a candidate is scored (0: none)
    score_lr: float = 0.01  # learning rate of those steps (cosine to 0)
    score_batch_size: int = 64  # images per step
    score_augment: bool = True  # those batches randomly cropped (and flipped where valid), as fine-tuning trains
    device: str = "cpu"  # where candidates are fine-tuned, recalibrated and scored (pruning runs on the CPU)


# a candidate scoring below this share of the unpruned network's accuracy after recalibration
# alone is near chance: `auto` scoring then fine-tunes candidates briefly before scoring them
INFORMATIVE_SHARE = 0.5
AUTO_SCORE_STEPS = 20

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
            raise SettingError("val_size", "the search needs a validation split; hold out more than 0 images")
        self.data = data
        batches = criterion_batches(data, self.config.criterion, self.config.seed)
        self.pruner = ChannelPruner(model, data.input_shape, criterion=self.config.criterion, batches=batches,
                                    channel_multiple=self.config.channel_multiple, seed=self.config.seed)
        self.description = self.pruner.description
        self._cache: dict[tuple, float] = {}
        self.evaluations = 0
        self.seconds = 0.0  # spent pruning, recalibrating and measuring
        self.timings = {"prune": 0.0, "bn_recalibration": 0.0, "validation": 0.0}  # the same, split
        if self.config.score_steps < 0:
            raise AutopruneError(f"score steps must be 0 or more, not {self.config.score_steps}")
        self._score_batches: list | None = None

    def prune(self, policy: Mapping[str, float], *, inference_only: bool = False) -> nn.Module:
        """The pruned network with recalibrated BatchNorm (not fine-tuned).

        `inference_only` lays the weights out channels-last, which runs the forward pass
        faster on CPU; such a copy is for scoring only and is never trained (the CPU
        backward of some channels-last convolutions is unreliable in current PyTorch).
        """
        started = time.perf_counter()
        model = self.pruner.prune(policy).to(self.config.device)
        if self.config.score_steps > 0 and inference_only:
            tuned = time.perf_counter()
            self.short_finetune(model)
            self.timings["short_finetune"] = self.timings.get("short_finetune", 0.0) + time.perf_counter() - tuned
            started += time.perf_counter() - tuned  # counted apart from the pruning
        if inference_only and model_device(model).type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        pruned = time.perf_counter()
        recalibrate_bn(model, self.data, num_batches=self.config.bn_batches, batch_size=self.config.bn_batch_size,
                       seed=self.config.seed)
        self.timings["prune"] += pruned - started
        self.timings["bn_recalibration"] += time.perf_counter() - pruned
        return model

    def short_finetune(self, model: nn.Module) -> nn.Module:
        """`score_steps` SGD steps (Nesterov momentum, cosine learning rate) on the same fixed
        training batches for every candidate, augmented once (`score_augment`) as the
        fine-tune augments its batches. Draws only from its own generator: a search's other
        random streams are untouched."""
        steps, batch_size = self.config.score_steps, self.config.score_batch_size
        if self._score_batches is None:
            generator = torch.Generator().manual_seed(self.config.seed + 1)
            self._score_batches = list(self.data.batches("train", batch_size, shuffle=True, generator=generator,
                                                         augment=self.config.score_augment,
                                                         limit=steps * batch_size))
        optimizer = torch.optim.SGD(model.parameters(), lr=self.config.score_lr, momentum=0.9, nesterov=True)
        model.train()
        for step, (x, y) in enumerate(self._score_batches):
            for group in optimizer.param_groups:
                group["lr"] = self.config.score_lr * 0.5 * (1 + math.cos(math.pi * step / len(self._score_batches)))
            x, y = x.to(self.config.device), y.to(self.config.device)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        return model

    def accuracy(self, policy: Mapping[str, float]) -> float:
        """Validation accuracy (fraction) of `policy` after BN recalibration."""
        key = (self.config.score_steps, self.config.score_augment, self.config.val_images,
               *policy_channels(self.description, policy, self.config.channel_multiple).values())
        if key not in self._cache:
            started = time.perf_counter()
            model = self.prune(policy, inference_only=True)
            measured = time.perf_counter()
            self._cache[key] = evaluate(model, self.data, "val", limit=self.config.val_images)["accuracy"]
            self.timings["validation"] += time.perf_counter() - measured
            self.evaluations += 1
            self.seconds += time.perf_counter() - started
        return self._cache[key]

    def rescore(self, policies: list[Mapping[str, float]], steps: int) -> list[float]:
        """Each policy's validation accuracy on the whole validation split after `steps` SGD
        steps (the score's batches, more of them): a closer look at a search's best few,
        whose scores differ by less than the plain score's noise. The evaluator's own
        settings are put back afterwards."""
        saved = (self.config.score_steps, self.config.val_images, self._score_batches)
        self.config.score_steps, self.config.val_images, self._score_batches = steps, len(self.data.val), None
        try:
            return [self.accuracy(policy) for policy in policies]
        finally:
            self.config.score_steps, self.config.val_images, self._score_batches = saved


def resolve_score_steps(evaluator: PolicyEvaluator, uniform_policy: Mapping[str, float]) -> tuple[int, dict]:
    """`auto` scoring: 0 steps when the uniform policy at the budget keeps at least
    INFORMATIVE_SHARE of the unpruned network's accuracy after recalibration alone (the
    plain score separates candidates), else AUTO_SCORE_STEPS. Returns the steps and the
    measurements behind the choice, for the run's record."""
    saved = evaluator.config.score_steps
    counters = (evaluator.evaluations, evaluator.seconds, dict(evaluator.timings))
    started = time.perf_counter()
    evaluator.config.score_steps = 0
    try:
        base = evaluator.accuracy({g.name: 1.0 for g in evaluator.description.groups})
        uniform = evaluator.accuracy(uniform_policy)
    finally:
        evaluator.config.score_steps = saved
        # a set-up step, not the search's candidates: the counters report the search alone
        evaluator.evaluations, evaluator.seconds, evaluator.timings = counters
    steps = 0 if uniform >= INFORMATIVE_SHARE * base else AUTO_SCORE_STEPS
    return steps, {"unpruned_accuracy": base, "uniform_accuracy": uniform, "score_steps": steps,
                   "seconds": round(time.perf_counter() - started, 2)}
