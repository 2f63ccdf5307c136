"""Exact costs and working pruning on architectures beyond the zoo (see tests/archs.py)."""

import random

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from autoprune.costs import count_cost, policy_cost, uniform_policy
from autoprune.pruning import ChannelPruner, describe_network
from tests.archs import FIXED, random_net

SHAPE = (1, 16, 16)


def independent_count(model: nn.Module, shape=SHAPE) -> tuple[int, int]:
    """Torch-Pruning's counter (conv and linear MACs) and the true parameter sum."""
    _, _, layer_flops, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *shape), layer_wise=True)
    flops = sum(v for m, v in layer_flops.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and v)
    return int(flops), sum(p.numel() for p in model.parameters())


def random_policy(description, rng: random.Random) -> dict[str, float]:
    return {g.name: rng.uniform(0.05, 1.0) for g in description.groups}


def check_exact(model: nn.Module, pruner: ChannelPruner, policy: dict[str, float]) -> nn.Module:
    """Prediction = count on the physically pruned network, and its output shape is unchanged."""
    pruned = pruner.prune(policy)
    predicted = policy_cost(pruner.description, policy)
    assert (predicted.flops, predicted.params) == independent_count(pruned)
    assert count_cost(describe_network(pruned, SHAPE)) == predicted
    assert pruned.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)
    return pruned


def check_architecture(model: nn.Module, seed: int, policies: int = 3) -> None:
    model.eval()
    description = describe_network(model, SHAPE)
    cost = count_cost(description)
    assert (cost.flops, cost.params) == independent_count(model)
    pruner = ChannelPruner(model, SHAPE, criterion="random", seed=seed)
    rng = random.Random(seed)
    check_exact(model, pruner, uniform_policy(pruner.description, 0.5))
    for _ in range(policies):
        check_exact(model, pruner, random_policy(pruner.description, rng))


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_architectures_are_costed_exactly(name):
    torch.manual_seed(0)
    check_architecture(FIXED[name](), seed=0)


@pytest.mark.parametrize("seed", range(12))
def test_random_architectures_are_costed_exactly(seed):
    torch.manual_seed(seed)
    check_architecture(random_net(seed), seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12, 60))
def test_more_random_architectures_are_costed_exactly(seed):
    torch.manual_seed(seed)
    check_architecture(random_net(seed), seed, policies=5)
