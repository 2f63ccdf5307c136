import pytest
import torch.nn as nn

from autoprune.costs import (Cost, NetworkDescription, channels_to_keep, check_policy, count_cost, policy_channels,
                             policy_cost, uniform_policy)
from autoprune.errors import AutopruneError
from autoprune.pruning import describe_network


class TwoConvNet(nn.Module):
    """conv(1->8, 3x3, pad 1) -> BN -> ReLU -> conv(8->4, 3x3, stride 2, pad 1) -> BN -> pool -> fc(4->3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        return self.fc(self.pool(x).flatten(1))


def test_hand_computed_flops_and_params():
    d = describe_network(TwoConvNet(), (1, 10, 10))
    # conv1: 3*3*1*8 weights at 10x10 outputs; conv2: (3*3*8*4 + 4 bias) at 5x5; fc: 4*3 + 3
    flops = 72 * 100 + (288 + 4) * 25 + 12 + 3
    params = 72 + 16 + (288 + 4) + 8 + (12 + 3)
    assert count_cost(d) == Cost(flops=flops, params=params)
    assert [g.name for g in d.groups] == ["conv1", "conv2"]

    # keep 4 of conv1's 8 channels and 2 of conv2's 4
    kept = {"conv1": 4, "conv2": 2}
    flops_half = 9 * 4 * 100 + (9 * 4 * 2 + 2) * 25 + 2 * 3 + 3
    params_half = 36 + 8 + (72 + 2) + 4 + (6 + 3)
    assert count_cost(d, kept) == Cost(flops=flops_half, params=params_half)
    assert policy_cost(d, {"conv1": 0.5, "conv2": 0.5}) == Cost(flops=flops_half, params=params_half)


@pytest.mark.parametrize("channels,ratio,multiple,expected", [
    (16, 0.5, 1, 8), (16, 0.01, 1, 1), (16, 1.0, 1, 16), (10, 0.25, 1, 3), (10, 0.24, 1, 2), (10, 0.35, 1, 4),
    (64, 0.3, 8, 16), (64, 0.01, 8, 8), (6, 0.1, 8, 6), (3, 0.5, 1, 2),
])
def test_channels_to_keep_rounds_and_never_empties(channels, ratio, multiple, expected):
    # nearest multiple, halves rounding up; at least one multiple (or all channels if fewer)
    assert channels_to_keep(channels, ratio, multiple) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_keep_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(AutopruneError, match="outside"):
        channels_to_keep(16, ratio)


def test_policy_validation_names_the_groups():
    d = describe_network(TwoConvNet(), (1, 10, 10))
    with pytest.raises(AutopruneError, match="conv1, conv2"):
        check_policy(d, {"nope": 0.5})
    assert check_policy(d, {"conv2": 0.5}) == {"conv1": 1.0, "conv2": 0.5}
    assert policy_channels(d, uniform_policy(d, 0.5)) == {"conv1": 4, "conv2": 2}


def test_description_round_trips_through_a_dict():
    d = describe_network(TwoConvNet(), (1, 10, 10))
    again = NetworkDescription.from_dict(d.to_dict())
    assert again.layers == d.layers and again.groups == d.groups
    assert count_cost(again, {"conv1": 3, "conv2": 1}) == count_cost(d, {"conv1": 3, "conv2": 1})


@pytest.mark.parametrize("value", [True, "0.5", None])
def test_a_keep_ratio_that_is_not_a_number_is_refused(value):
    d = describe_network(TwoConvNet(), (1, 10, 10))
    with pytest.raises(AutopruneError, match="not a number"):
        check_policy(d, {"conv1": value})
