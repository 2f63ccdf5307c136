"""The commands on user models beyond the zoo: concatenated branches, grouped convolutions, GroupNorm."""

import json

import pytest
import torch

from autoprune.cli import main
from autoprune.criteria import CRITERIA
from tests.archs import FIXED

MODEL = "tests.archs:mixed_net"
FAST = ["--data", "synthetic", "--val-size", "400", "--val-images", "100", "--bn-batches", "2",
        "--finetune-epochs", "0", "--no-onnx", "--quiet"]


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def exported_count(path) -> tuple[int, int]:
    """MACs (plus bias adds) of every convolution and linear op in a saved torch.export program,
    from the shapes its graph records, and its parameter count: an independent counter."""
    program = torch.export.load(path)
    weights = {**program.state_dict, **dict(program.constants)}
    names = program.graph_signature.inputs_to_parameters
    flops = 0
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.conv2d.default,
                                                             torch.ops.aten.conv1d.default,
                                                             torch.ops.aten.linear.default,
                                                             torch.ops.aten.conv_transpose2d.input):
            continue
        out = node.meta["val"].shape
        weight = weights[names[node.args[1].name]]
        has_bias = len(node.args) > 2 and node.args[2] is not None
        if node.target == torch.ops.aten.conv_transpose2d.input:  # weight: (in, out / groups, kh, kw)
            inputs = node.args[0].meta["val"].shape
            flops += weight[0].numel() * int(inputs[1:].numel()) + int(has_bias) * int(out[1:].numel())
        elif node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default):
            flops += (weight[0].numel() + int(has_bias)) * int(out[1:].numel())  # per example
        else:  # at every position it runs at; the bias once, as Torch-Pruning's counter has it
            flops += weight[0].numel() * int(out[1:].numel()) + int(has_bias) * int(out[-1])
    return flops, sum(program.state_dict[name].numel() for name in program.graph_signature.parameters)


def test_info_counts_a_concatenating_grouped_model_exactly(capsys):
    code, out, err = run(capsys, "info", "--model", MODEL, "--json")
    assert code == 0, err
    info = json.loads(out)
    from tests.archs import counted_cost, mixed_net

    assert (info["flops"], info["params"]) == counted_cost(mixed_net(), (1, 28, 28))


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_prune_with_every_criterion_predicts_the_counted_cost(criterion, tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    code, stdout, err = run(capsys, "prune", "--model", MODEL, "--policy", "uniform:0.5", "--criterion", criterion,
                            "--data", "synthetic", "--val-size", "400", "--bn-batches", "2", "--out", str(out))
    assert code == 0, err
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert (metrics["predicted_flops"], metrics["predicted_params"]) == (metrics["flops"], metrics["params"])
    assert metrics["flops"] < metrics["base_flops"]
    # the grouped conv's groups keep multiples of 4 channels: 0.5 of 16 is met, so nothing is rounded there
    assert all(r["kept"] % r["multiple"] == 0 for r in metrics["rounded"].values())
    assert "GroupNorm" in metrics["recalibration_note"] and "GroupNorm" in stdout


@pytest.mark.parametrize("name", list(FIXED))
def test_info_and_prune_on_each_block(name, tmp_path, capsys):
    model = f"tests.archs:{FIXED[name].__name__}"
    code, out, err = run(capsys, "info", "--model", model)
    assert code == 0 and "prunable groups" in out, err
    out_path = tmp_path / "pruned.pt"
    code, _, err = run(capsys, "prune", "--model", model, "--policy", "uniform:0.5", "--data", "synthetic",
                       "--val-size", "400", "--bn-batches", "1", "--out", str(out_path))
    assert code == 0, err
    metrics = json.loads(out_path.with_suffix(".metrics.json").read_text())
    assert (metrics["predicted_flops"], metrics["predicted_params"]) == (metrics["flops"], metrics["params"])
    assert exported_count(out_path) == (metrics["flops"], metrics["params"])
    assert metrics["flops"] < metrics["base_flops"]


def test_prune_rounds_a_grouped_group_and_says_so(tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    code, stdout, err = run(capsys, "prune", "--model", "tests.archs:resnext_net", "--policy", "uniform:0.3",
                            "--data", "synthetic", "--val-size", "400", "--bn-batches", "2", "--out", str(out))
    assert code == 0, err
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    grouped = metrics["rounded"]["blocks.0.reduce.0"]
    assert grouped == {"keep_ratio": 0.3, "kept": 4, "channels": 16, "multiple": 4, "minimum": 4}  # 4.8 -> 4, not 5
    assert "rounded to 4 of 16" in stdout
    assert (metrics["predicted_flops"], metrics["predicted_params"]) == (metrics["flops"], metrics["params"])


@pytest.mark.parametrize("agent,extra", [
    ("ddpg", ["--episodes", "4", "--warmup-episodes", "2"]),
    ("uniform", []),
    ("tp_global", []),
    ("netadapt", ["--initial-reduction", "0.15", "--max-iterations", "6", "--short-term-steps", "1",
                  "--workers", "1"]),
])
def test_searches_end_inside_the_budget_by_the_counted_cost(agent, extra, tmp_path, capsys):
    out = tmp_path / agent
    budget = "50%flops" if agent != "netadapt" else "75%flops"
    code, _, err = run(capsys, "search", "--model", MODEL, "--budget", budget, "--agent", agent, "--out", str(out),
                       *extra, *FAST)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert exported_count(out / "model.pt2") == (metrics["flops"], metrics["params"])
    limit = 0.5 if agent != "netadapt" else 0.75
    assert metrics["flops"] <= limit * metrics["base_flops"]


def test_lut_build_on_a_concatenating_grouped_model(tmp_path, capsys):
    lut = tmp_path / "lut.json"
    code, out, err = run(capsys, "lut", "build", "--model", MODEL, "--runs", "1", "--warmup", "0", "--rounds", "1",
                         "--channel-step", "8", "--calibration-samples", "2", "--quiet", "--out", str(lut))
    assert code == 0, err
    code, out, err = run(capsys, "info", "--model", MODEL, "--lut", str(lut))
    assert code == 0 and "ms predicted" in out, err
    # a policy's latency, with branches split by the criterion's ranking, lies inside the table's grid
    for criterion in ("l1", "random"):
        pruned = tmp_path / f"{criterion}.pt"
        code, _, err = run(capsys, "prune", "--model", MODEL, "--policy", "uniform:0.2", "--criterion", criterion,
                           "--lut", str(lut), "--data", "synthetic", "--val-size", "400", "--bn-batches", "1",
                           "--out", str(pruned))
        assert code == 0, err
        metrics = json.loads(pruned.with_suffix(".metrics.json").read_text())
        assert metrics["lut_latency_ms"] > 0  # answered from the grid (one timed run per entry: values are noisy)


@pytest.mark.parametrize("model,message", [
    ("tests.archs:dict_output_net", "returned a dict with keys 'logits'"),
    ("tests.archs:raising_factory", "model factory tests.archs:raising_factory raised ValueError: width must be"),
    ("tests.archs:flat_net", "no prunable layer"),
    ("tests.archs:two_scales_net", "layer(s) shared run more than once per forward pass on inputs of different"),
    ("tests.archs:unknown_layer_net", "layer 1 (tests.archs.PositionBias) uses its parameter 1.bias of shape (1, 8, 28, 28)"),
])
def test_unprunable_models_get_one_line(model, message, tmp_path, capsys):
    code, _, err = run(capsys, "prune", "--model", model, "--policy", "uniform:0.5", "--data", "synthetic",
                       "--val-size", "400", "--out", str(tmp_path / "p.pt"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
