"""Exact costs and working pruning on architectures beyond the zoo (see tests/archs.py)."""

import copy
import os
import random

import pytest
import torch
import torch.nn as nn

from autoprune.costs import count_cost, group_choices, group_keep, policy_cost, uniform_policy
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.pipeline.finish import _staged_prune, _widths
from autoprune.pruning import ChannelPruner, describe_network, global_magnitude_prune
from autoprune.train import TrainConfig
from tests.archs import (ECA, FIXED, GlobalContext, Net, ScaledResidual, cbam_net, conv_unit, convnext_own_norm_net,
                         counted_cost, eca_net, fail_cuts_of, fire_net, gcnet_net, mixed_net, random_net)

SHAPE = (1, 16, 16)


def random_policy(description, rng: random.Random) -> dict[str, float]:
    return {g.name: rng.uniform(0.05, 1.0) for g in description.groups}


def check_exact(model: nn.Module, pruner: ChannelPruner, policy: dict[str, float]) -> nn.Module:
    """Prediction = count on the physically pruned network, and its output shape is unchanged."""
    pruned = pruner.prune(policy)
    predicted = policy_cost(pruner.description, policy)
    assert (predicted.flops, predicted.params) == counted_cost(pruned, SHAPE)
    assert count_cost(describe_network(pruned, SHAPE)) == predicted
    assert pruned.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)
    return pruned


def check_architecture(model: nn.Module, seed: int, policies: int = 3) -> None:
    model.eval()
    description = describe_network(model, SHAPE)
    cost = count_cost(description)
    assert (cost.flops, cost.params) == counted_cost(model, SHAPE)
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


@pytest.mark.parametrize("seed", range(12))
def test_torch_pruning_global_keeps_each_group_s_floor_and_shrinks_as_the_ratio_grows(seed):
    """Torch-Pruning's global pruning, as the tp_global peer runs it, leaves every group at
    least what the other agents keep at the lower bound, never keeps more at a larger
    ratio, and costs what the ranking it returns predicts."""
    torch.manual_seed(seed)
    model = random_net(seed).eval()
    description = ChannelPruner(model, SHAPE).description  # the groups Torch-Pruning prunes consistently
    floors = {g.name: group_keep(g, 0.2) for g in description.groups}
    before = {g.name: g.channels for g in description.groups}
    for ratio in [i / 10 for i in range(1, 10)]:
        pruned, kept, ranked = global_magnitude_prune(model, description, ratio, lower_bound=0.2)
        assert {n: k for n, k in kept.items() if k < floors[n]} == {}, ratio
        assert {n: (before[n], k) for n, k in kept.items() if k > before[n]} == {}, ratio
        policy = {g.name: kept[g.name] / g.channels for g in description.groups}
        assert count_cost(describe_network(pruned, SHAPE)) == policy_cost(ranked, policy)
        assert pruned(torch.randn(2, *SHAPE)).shape == (2, 10)
        before = kept
    assert sum(kept.values()) < sum(g.channels for g in description.groups)


@pytest.mark.parametrize("seed", range(4))
def test_a_staged_cut_ends_at_the_plan_on_grouped_and_concatenated_layers(synthetic_data, seed):
    """Cutting in stages works through counts a grouped layer cannot keep (it keeps whole
    channel groups, so one cut may land below the next stage's share) and ends at the
    plan's channels and cost."""
    torch.manual_seed(seed)
    evaluator = PolicyEvaluator(mixed_net(), synthetic_data, EvaluatorConfig(bn_batches=1, bn_batch_size=32))
    steps = 2  # trained between cuts, so that later cuts rank channels differently from the first
    rng = random.Random(seed)
    target = {g.name: rng.choice(group_choices(g)) for g in evaluator.description.groups}
    pruned = _staged_prune(evaluator, target, 4, steps, TrainConfig(epochs=1, lr=0.05))
    assert _widths(pruned, evaluator.description) == target
    assert pruned.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # a concatenated group keeps as many channels of each branch as the plan: the same cost
    assert count_cost(describe_network(pruned, (1, 28, 28))) == count_cost(evaluator.description, target)


def test_a_network_cut_to_its_floor_is_read_from_its_layers():
    """A group cut to the fewest channels it may keep is no longer a prunable group of the
    pruned network; the finish (latency fit, staged cuts) reads its channels from the
    group's root layer instead, so a searcher's own network still matches its plan."""
    torch.manual_seed(0)
    pruner = ChannelPruner(FIXED["groupnorm"]().eval(), SHAPE)
    plan = {g.name: group_choices(g)[0] for g in pruner.description.groups}
    pruned = pruner.prune({g.name: plan[g.name] / g.channels for g in pruner.description.groups})
    assert len(describe_network(pruned, SHAPE).groups) < len(plan)
    assert _widths(pruned, pruner.description) == plan


@pytest.mark.parametrize("shape", [(1, 16, 16), (1, 28, 28), (3, 28, 28), (3, 32, 32)])
def test_the_classifier_is_found_when_the_forward_ends_in_functional_operations(shape):
    """SqueezeNet's shape: the output is no layer's own output, so the classifier is the last
    convolution that ran; a tensor freed during the forward (whose id Python may hand to the
    output) must not pass for it, which would leave the classifier prunable and an expansion
    layer unpruned."""
    model = fire_net(shape[0]).eval()
    description = describe_network(model, shape)
    assert "classifier" not in description.group_names
    assert {"fire1.expand1", "fire1.expand3"} <= {p for g in description.groups for p in g.producers}
    pruned = ChannelPruner(model, shape).prune(uniform_policy(describe_network(model, shape), 0.5))
    assert pruned.eval()(torch.zeros(2, *shape)).shape == (2, 10)


def test_a_transposed_convolution_keeps_its_channels_and_the_rest_is_pruned():
    """The group feeding a transposed convolution stays whole, the other groups are pruned,
    and the transposed convolution's own work is counted at its input positions."""
    model = FIXED["decoder"]().eval()
    description = describe_network(model, SHAPE)
    assert description.group_names == ["encode.0", "decode.0"]  # not "down.0", which feeds it
    up = next(layer for layer in description.layers if layer.name == "up")
    assert (up.fixed_flops, up.fixed_params) == (16 * 8 * 2 * 2 * 8 * 8 + 8 * 16 * 16, 16 * 8 * 4 + 8)


def test_a_network_with_sync_batchnorm_is_costed_and_pruned():
    """A network trained across GPUs keeps SyncBatchNorm layers; on one CPU they are BatchNorm."""
    torch.manual_seed(0)
    plain = FIXED["concat_se"]().eval()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert describe_network(model, SHAPE) == describe_network(plain, SHAPE)  # the same groups, the same costs
    check_architecture(model, seed=0)


@pytest.mark.parametrize("factory", [eca_net, cbam_net])
def test_attention_gates_leave_the_channels_they_gate_prunable(factory):
    """ECA slides a one-channel Conv1d along the pooled channels; CBAM reduces over the channels
    and gates every channel with one map. Neither ties the gated channels to a single channel:
    the groups under them are pruned, and the attention's own convolutions keep their weights."""
    model = factory()
    pruner = ChannelPruner(model, SHAPE)
    assert {"stem.0", "blocks.3.pointwise.0"} <= {g.name for g in pruner.groups}
    pruned = check_exact(model, pruner, random_policy(pruner.description, random.Random(0)))
    gates = [m for m in pruned.modules() if isinstance(m, nn.Conv1d) or getattr(m, "out_channels", 0) == 1]
    originals = [m for m in model.modules() if isinstance(m, nn.Conv1d) or getattr(m, "out_channels", 0) == 1]
    assert gates and [g.weight.shape for g in gates] == [o.weight.shape for o in originals]


class _BatchDims(nn.Module):
    """A network that notes the number of dimensions of every input it is called with."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []
        self.body = nn.Sequential(conv_unit(1, 8, 3), nn.Conv2d(8, 8, 3, padding=1))
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        self.seen.append(x.dim())
        return self.head((self.body(x) * self.scale).mean((-2, -1)))


def test_the_dependency_graph_is_traced_on_a_batch_not_on_one_unbatched_image():
    """Torch-Pruning unpacks a tensor given as its example along the batch dimension; handed
    a batch of one, it ran the network on a single unbatched image, which a network with a
    per-channel parameter broadcasts back to four dimensions, so that every layer's node in its
    graph was the squeeze around an unbatched convolution."""
    model = _BatchDims().eval()
    pruner = ChannelPruner(model, SHAPE)
    assert model.seen and set(model.seen) == {4}
    assert pruner.groups and check_exact(model, pruner, uniform_policy(pruner.description, 0.5)) is not None


def test_an_eca_gate_before_a_layer_scaled_residual_leaves_its_channels_prunable():
    """ECA's one-channel Conv1d is found in the gated group's dependencies; with a per-channel
    layer scale further on, the graph traced on an unbatched image lost it, and the group was
    kept whole (its channel convolution counted at full length)."""
    torch.manual_seed(0)
    model = Net(conv_unit(1, 16, 3, 2, norm_kind="in"), [ECA(), ScaledResidual(16, "in", "relu")], 16, "pool", 1)
    pruner = ChannelPruner(model.eval(), SHAPE)
    assert "stem.0" in {g.name for g in pruner.groups}
    pruned = check_exact(model, pruner, {"stem.0": 0.25})
    assert pruned.blocks[0].conv.weight.shape == model.blocks[0].conv.weight.shape


def test_gcnet_s_reshaped_attention_pooling_is_refused_at_once_and_its_channel_wise_form_pruned(tmp_path):
    """GCNet's code pools with x.view(n, 1, c, h * w) and a matrix product: Torch-Pruning reads
    each view as a flatten, and its index lists multiplied until 17 GB of memory were gone.
    It is refused with a clear message, in a child process held to 3 GB so that a
    regression fails here instead of taking the machine. The same block written
    channel-wise is pruned, its costs exact, the bottleneck behind its LayerNorm over
    (C/r, 1, 1) too (Torch-Pruning's own pruner would cut that LayerNorm's last, size-1
    dimension)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "gcnet.py"
    script.write_text(
        "import resource, time\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from autoprune.errors import AutopruneError\n"
        "from autoprune.pruning import ChannelPruner\n"
        "from tests.archs import gcnet_net\n"
        "started = time.perf_counter()\n"
        "try:\n"
        "    ChannelPruner(gcnet_net(reference=True).eval(), (1, 32, 32))\n"
        "except AutopruneError as exc:\n"
        "    print('refused', round(time.perf_counter() - started), exc)\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("refused") and "x.view(n, 1, c, h * w)" in done.stdout
    assert int(done.stdout.split()[1]) < 15  # seconds: refused, not ground through (0.3 s here)

    model = gcnet_net().eval()
    pruner = ChannelPruner(model, SHAPE)
    assert pruner.description.group_names == describe_network(model, SHAPE).group_names  # none kept whole
    assert {"stem.0", "blocks.0.body.0.0", "blocks.1.transform.0", "blocks.2.pointwise.0",
            "blocks.3.transform.0"} <= set(pruner.description.group_names)
    pruned = check_exact(model, pruner, random_policy(pruner.description, random.Random(1)))
    transforms = [m.transform for m in pruned.modules() if hasattr(m, "transform")]
    assert len(transforms) == 2
    for conv, norm, _, _ in transforms:
        assert norm.normalized_shape == tuple(norm.weight.shape) == (conv.out_channels, 1, 1)
    # with GroupNorm(1, C/r) on the pooled 1×1 maps the bottleneck keeps at least two channels
    # (GroupNorm cannot normalise a single value), and is pruned down to them
    model = Net(conv_unit(1, 16, 3), [GlobalContext(16, 0.5, group_norm=True)], 16, "pool", 1).eval()
    pruner = ChannelPruner(model, SHAPE)
    assert "blocks.0.transform.0" in pruner.description.group_names
    assert pruner.description.group("blocks.0.transform.0").min_keep == 2
    pruned = check_exact(model, pruner, {g.name: 1e-9 for g in pruner.description.groups})
    assert pruned.blocks[0].transform[0].out_channels == 2


def test_a_group_kept_whole_is_logged_with_the_reason(caplog, monkeypatch):
    """The pruner's own check says why it keeps a group whole: here, the pruned network's
    error (a stand-in: Torch-Pruning's cut of the stem group is made to fail)."""
    model = random_net(0).eval()
    fail_cuts_of(monkeypatch, model, SHAPE, "stem.0")
    with caplog.at_level("WARNING", logger="autoprune.pruning"):
        pruner = ChannelPruner(model, SHAPE)
    kept = [r.getMessage() for r in caplog.records if "kept whole" in r.getMessage()]
    assert "stem.0" not in pruner.description.group_names and pruner.groups
    assert len(kept) == 1 and "group stem.0 is kept whole" in kept[0] and "(a stand-in failure)" in kept[0]


class _Concatenation(nn.Module):
    """Two branches of 10 and 6 maps, concatenated (and added to the input, with `add`)."""

    def __init__(self, add: bool):
        super().__init__()
        self.a, self.b, self.add = conv_unit(16, 10, 3), conv_unit(16, 6, 1), add

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return x + y if self.add else y


@pytest.mark.parametrize("add", [False, True])
def test_a_concatenation_flattened_into_a_linear_layer_is_pruned_branch_by_branch(add):
    """Torch-Pruning checks a concatenation's channels against the next layer's inputs; a
    flatten into a linear layer (four features per channel here) failed that check, and the
    branches were cut at the same indices: the group broke the network and was kept whole."""
    torch.manual_seed(0)
    model = Net(conv_unit(1, 16, 3), [_Concatenation(add)], 16, "flatten", 2).eval()
    pruner = ChannelPruner(model, SHAPE)
    expected = {"stem.0"} if add else {"stem.0", "blocks.0.a.0", "blocks.0.b.0"}
    assert expected <= set(pruner.description.group_names)
    check_architecture(model, seed=0, policies=4)


def test_a_flatten_into_a_linear_layer_with_more_inputs_than_the_reshape_bound_is_pruned(monkeypatch):
    """The bound on indices through a reshape (GCNet's guard) is at least the inputs of the
    model's largest linear layer: a plain flatten into it is not mistaken for a blow-up."""
    from autoprune import pruning

    monkeypatch.setattr(pruning, "INDEX_LIMIT", 1000)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()  # 1,024 inputs
    pruner = ChannelPruner(model, SHAPE)
    assert pruner.description.group_names == ["0", "2"]
    check_exact(model, pruner, uniform_policy(pruner.description, 0.5))


def test_the_reshape_bound_of_one_thread_does_not_reach_another(monkeypatch):
    """Two networks described side by side keep their own bounds: a small one held open in
    another thread (bound 1,000) does not refuse a flatten into 1,024 inputs here."""
    import threading

    from autoprune import pruning

    monkeypatch.setattr(pruning, "INDEX_LIMIT", 1000)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with pruning._bounded_reshapes(nn.Sequential(nn.Conv2d(1, 4, 3))):
            entered.set()
            release.wait(30)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert entered.wait(30)
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                              nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
        assert ChannelPruner(model, SHAPE).description.group_names == ["0", "2"]
    finally:
        release.set()
        other.join(30)


def test_convnext_with_its_own_layer_norm_prunes_every_group():
    """The reference code's LayerNorm normalises by hand over dim 1 (Torch-Pruning takes the
    mean for a channel-for-channel step) and keeps its width in `normalized_shape` (which
    Torch-Pruning does not update): every group is still pruned, exactly costed."""
    model = convnext_own_norm_net()
    pruner = ChannelPruner(model, SHAPE)
    assert pruner.description.group_names == describe_network(model, SHAPE).group_names  # none kept whole
    assert {"stem.0", "blocks.2"} <= set(pruner.description.group_names)
    pruned = check_exact(model, pruner, uniform_policy(pruner.description, 0.5))
    norms = [m for m in pruned.modules() if type(m).__name__ == "ChannelNorm"]
    assert norms and all(m.normalized_shape == tuple(m.weight.shape) for m in norms)
