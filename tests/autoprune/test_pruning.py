import json
import random

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from autoprune.costs import count_cost, policy_channels, policy_cost, uniform_policy
from autoprune.errors import AutopruneError
from autoprune.models import ZOO, build_model
from autoprune.pruning import ChannelPruner, apply_policy, describe_network, parse_policy
from autoprune.train import evaluate, recalibrate_bn

SHAPES = [(1, 28, 28), (3, 32, 32)]


def random_policy(description, seed):
    rng = random.Random(seed)
    return {g.name: rng.uniform(0.05, 1.0) for g in description.groups}


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("shape", SHAPES, ids=["28px", "32px"])
def test_cost_model_agrees_with_torch_pruning_counter(name, shape):
    model = build_model(name, in_channels=shape[0], input_size=shape[1])
    description = describe_network(model, shape)
    _, tp_params, layer_flops, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *shape), layer_wise=True)
    tp_conv_linear = sum(v for m, v in layer_flops.items() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) and v)
    cost = count_cost(description)
    assert cost.flops == tp_conv_linear
    assert cost.params == tp_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(ZOO))
def test_predicted_cost_equals_counted_cost_after_real_pruning(name):
    shape = (1, 28, 28) if name != "resnet56" else (3, 32, 32)
    model = build_model(name, in_channels=shape[0], input_size=shape[1])
    pruner = ChannelPruner(model, shape)
    for seed in range(2):
        policy = random_policy(pruner.description, seed)
        pruned = pruner.prune(policy)
        counted = count_cost(describe_network(pruned, shape))
        assert policy_cost(pruner.description, policy) == counted
        assert counted.params == sum(p.numel() for p in pruned.parameters())
        assert counted.flops < count_cost(pruner.description).flops
        out = pruned.eval()(torch.randn(3, *shape))
        assert out.shape == (3, 10)


def test_residual_stage_is_one_group_and_classifier_is_never_pruned():
    model = build_model("resnet20")
    d = describe_network(model, (1, 28, 28))
    stage1 = d.group("conv1")
    assert set(stage1.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    stage3 = d.group("layer3.0.conv2")
    assert "layer3.0.shortcut.0" in stage3.producers and "fc" in stage3.consumers
    assert all("fc" not in g.producers for g in d.groups)
    assert len(d.groups) == 12  # 3 stages + 9 inner block convs
    pruned = ChannelPruner(model, (1, 28, 28)).prune(uniform_policy(d, 0.25))
    assert pruned.fc.out_features == 10 and pruned.fc.in_features == 16
    assert pruned.layer1[0].conv2.out_channels == pruned.conv1.out_channels == 4


def test_depthwise_conv_follows_its_producer():
    model = build_model("mobilenetv2")
    d = describe_network(model, (1, 28, 28))
    dw = [layer for layer in d.layers if layer.kind == "dwconv"]
    assert dw, "MobileNetV2 has depthwise convolutions"
    for layer in dw:
        group = d.group(layer.out_group)
        assert layer.name in group.producers and len(group.producers) == 2  # expand conv + depthwise
    pruned = apply_policy(model, uniform_policy(d, 0.5), (1, 28, 28))
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels


def test_policy_replay_equals_direct_pruning(tmp_path):
    model = build_model("resnet20")
    pruner = ChannelPruner(model, (1, 28, 28))
    policy = random_policy(pruner.description, 3)
    direct = pruner.prune(policy)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    replayed = apply_policy(model, parse_policy(str(path), pruner.description), (1, 28, 28))
    a, b = direct.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_base_model_is_left_untouched():
    model = build_model("vgg")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ChannelPruner(model, (1, 28, 28)).prune(uniform_policy(describe_network(model, (1, 28, 28)), 0.3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_channel_multiple_and_no_empty_group():
    model = build_model("vgg")
    d = describe_network(model, (1, 28, 28))
    pruned = ChannelPruner(model, (1, 28, 28), channel_multiple=8).prune(uniform_policy(d, 0.01))
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels == 8 for c in convs)
    assert policy_channels(d, uniform_policy(d, 0.3), multiple=8) == {g.name: max(8, round(0.3 * g.channels / 8) * 8)
                                                                       for g in d.groups}


def test_l1_keeps_the_largest_filters():
    model = build_model("vgg")
    conv = model.features[0]
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.weight[[3, 7, 11]] *= 1000.0  # make three filters stand out
    d = describe_network(model, (1, 28, 28))
    pruner = ChannelPruner(model, (1, 28, 28), criterion="l1")
    kept = pruner.kept_indices({"features.0": 3 / 32})
    assert kept["features.0"].tolist() == [3, 7, 11]
    assert len(d.groups) == 7


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "apoz", "random"])
def test_every_criterion_prunes_to_the_same_cost(criterion, synthetic_data, trained_tiny):
    batches = list(synthetic_data.batches("train", 32, limit=64))
    pruner = ChannelPruner(trained_tiny, (1, 28, 28), criterion=criterion, batches=batches)
    policy = uniform_policy(pruner.description, 0.5)
    pruned = pruner.prune(policy)
    assert count_cost(describe_network(pruned, (1, 28, 28))) == policy_cost(pruner.description, policy)
    assert evaluate(pruned, synthetic_data, "val")["images"] == len(synthetic_data.val)


def test_criteria_disagree_somewhere(trained_tiny, synthetic_data):
    batches = list(synthetic_data.batches("train", 32, limit=64))
    kept = {c: ChannelPruner(trained_tiny, (1, 28, 28), criterion=c, batches=batches)
            .kept_indices(uniform_policy(describe_network(trained_tiny, (1, 28, 28)), 0.5)) for c in ("l1", "random")}
    assert any(not torch.equal(kept["l1"][g], kept["random"][g]) for g in kept["l1"])


def test_data_criteria_need_batches():
    model = build_model("resnet20")
    with pytest.raises(AutopruneError, match="batches"):
        ChannelPruner(model, (1, 28, 28), criterion="taylor")
    with pytest.raises(AutopruneError, match="unknown criterion"):
        ChannelPruner(model, (1, 28, 28), criterion="magic")


def test_bn_recalibration_restores_accuracy(trained_tiny, synthetic_data):
    d = describe_network(trained_tiny, (1, 28, 28))
    pruned = apply_policy(trained_tiny, uniform_policy(d, 0.5), (1, 28, 28))
    stale = evaluate(pruned, synthetic_data, "val")["accuracy"]
    recalibrate_bn(pruned, synthetic_data, num_batches=10)
    fresh = evaluate(pruned, synthetic_data, "val")["accuracy"]
    assert fresh >= stale
    again = apply_policy(trained_tiny, uniform_policy(d, 0.5), (1, 28, 28))
    recalibrate_bn(again, synthetic_data, num_batches=10)
    assert evaluate(again, synthetic_data, "val")["accuracy"] == fresh  # deterministic


def test_model_without_prunable_layers_has_no_groups():
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    assert describe_network(model, (1, 28, 28)).groups == ()


def test_parse_policy_errors(tmp_path):
    d = describe_network(build_model("resnet20"), (1, 28, 28))
    with pytest.raises(AutopruneError, match="uniform:RATIO"):
        parse_policy("uniform:half", d)
    with pytest.raises(AutopruneError, match="neither"):
        parse_policy(str(tmp_path / "missing.json"), d)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AutopruneError, match="not valid JSON"):
        parse_policy(str(bad), d)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"policy": {"conv1": 0.5}}))
    assert parse_policy(str(wrapped), d)["conv1"] == 0.5


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "apoz", "random"])
@pytest.mark.parametrize("name", ["convnext", "shared", "decoder"])
def test_every_criterion_ranks_channels_last_shared_and_transposed_layers(criterion, name):
    """A LayerNorm and linear layers on channels-last maps (their channels are the last
    dimension), a layer run twice, a transposed convolution: every criterion ranks every
    group's channels and the pruned network costs what was predicted."""
    from tests.archs import FIXED

    torch.manual_seed(0)
    model = FIXED[name]().eval()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    pruner = ChannelPruner(model, (1, 28, 28), criterion=criterion, batches=batches)
    assert all(len(pruner.scores[g.name]) == g.channels for g in pruner.groups)
    policy = uniform_policy(pruner.description, 0.5)
    pruned = pruner.prune(policy)
    assert count_cost(describe_network(pruned, (1, 28, 28))) == policy_cost(pruner.description, policy)
    assert pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
