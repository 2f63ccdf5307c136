import json
import pickle

import numpy as np
import pytest
import torch

from autoprune.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    assert main(["train", "--model", "resnet20", "--width", "0.5", "--data", "synthetic", "--val-size", "400",
                 "--epochs", "1", "--max-steps", "5", "--quiet", "--out", str(path)]) == 0
    return path


def test_train_writes_a_checkpoint_and_removes_its_state(checkpoint):
    assert checkpoint.is_file() and not checkpoint.with_name(checkpoint.name + ".state").exists()
    payload = torch.load(checkpoint, weights_only=False)
    assert payload["data"] == "synthetic" and 0 <= payload["test_accuracy"] <= 1
    assert payload["command"].startswith("autoprune train")


def test_info_prune_eval_round_trip(checkpoint, tmp_path, capsys):
    code, out, _ = run(capsys, "info", "--model", str(checkpoint))
    assert code == 0 and "prunable groups" in out and "layer3.0.conv2" in out
    code, out, _ = run(capsys, "info", "--model", str(checkpoint), "--json")
    info = json.loads(out)
    assert info["flops"] > 0 and len(info["groups"]) == 12

    pruned = tmp_path / "p.pt2"
    code, out, err = run(capsys, "prune", "--model", str(checkpoint), "--val-size", "400", "--policy", "uniform:0.5",
                         "--out", str(pruned), "--onnx", str(tmp_path / "p.onnx"))
    assert code == 0, err
    assert pruned.is_file() and (tmp_path / "p.onnx").is_file()
    metrics = json.loads(pruned.with_suffix(".metrics.json").read_text())
    assert metrics["flops"] == metrics["predicted_flops"] < metrics["base_flops"]
    policy = json.loads(pruned.with_suffix(".policy.json").read_text())
    assert set(policy.values()) == {0.5}

    code, out, err = run(capsys, "eval", "--model", str(pruned), "--val-size", "400")
    assert code == 0, err
    assert f"accuracy {metrics['test_accuracy_recalibrated']:.4f}" in out

    # a policy file replays to the same network
    again = tmp_path / "again.pt2"
    code, _, err = run(capsys, "prune", "--model", str(checkpoint), "--val-size", "400",
                       "--policy", str(pruned.with_suffix(".policy.json")), "--out", str(again))
    assert code == 0, err
    assert json.loads(again.with_suffix(".metrics.json").read_text())["flops"] == metrics["flops"]


def write_fake_cifar(root):
    batch_dir = root / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(batch_dir / name, "wb") as fh:
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}, fh)


def bad_inputs(tmp_path, checkpoint):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    write_fake_cifar(tmp_path / "cifar")
    return {
        "missing data dir": (["eval", "--model", str(checkpoint), "--data", "mnist", "--data-dir",
                              str(tmp_path / "nowhere"), "--no-download"], "does not exist"),
        "corrupt checkpoint": (["eval", "--model", str(corrupt), "--data", "synthetic"], "cannot load"),
        "unknown model": (["info", "--model", "resnet9000"], "neither a zoo model"),
        "wrong image shape": (["eval", "--model", str(checkpoint), "--data", "cifar10", "--data-dir",
                               str(tmp_path / "cifar"), "--val-size", "2", "--no-download"], "does not accept"),
        "bad policy": (["prune", "--model", str(checkpoint), "--val-size", "400", "--policy", "uniform:2"],
                       "outside"),
        "unknown group": (["prune", "--model", str(checkpoint), "--val-size", "400", "--policy",
                           str(tmp_path / "policy.json")], "unknown group"),
        "bad input shape": (["info", "--model", "vgg", "--input-shape", "3x32x32"], "C,H,W"),
    }


def test_bad_inputs_give_one_line_and_nonzero_exit(checkpoint, tmp_path, capsys):
    (tmp_path / "policy.json").write_text(json.dumps({"no.such.layer": 0.5}))
    for label, (argv, message) in bad_inputs(tmp_path, checkpoint).items():
        code, out, err = run(capsys, *argv)
        assert code == 2, label
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("autoprune: error:") and message in lines[0], (label, err)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "info", "prune"):
        assert command in out


def test_lut_commands_and_latency_in_prune(checkpoint, tmp_path, capsys):
    lut = tmp_path / "lut.json"
    code, out, err = run(capsys, "lut", "build", "--model", str(checkpoint), "--runs", "2", "--warmup", "1",
                         "--rounds", "1", "--channel-step", "8", "--calibration-samples", "2", "--quiet",
                         "--out", str(lut))
    assert code == 0, err
    assert "layer signatures" in out and json.loads(lut.read_text())["complete"]
    code, out, err = run(capsys, "lut", "validate", "--lut", str(lut), "--model", str(checkpoint), "--samples", "3",
                         "--rounds", "1", "--quiet", "--out", str(tmp_path / "v.json"))
    assert code == 0, err
    assert "median absolute error" in out and len(json.loads((tmp_path / "v.json").read_text())["rows"]) == 3
    code, out, err = run(capsys, "info", "--model", str(checkpoint), "--lut", str(lut))
    assert code == 0 and "ms predicted" in out
    code, out, err = run(capsys, "prune", "--model", str(checkpoint), "--val-size", "400", "--policy", "uniform:0.5",
                         "--lut", str(lut), "--budget", "1000ms", "--out", str(tmp_path / "p.pt2"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["lut_latency_ms"] > 0 and metrics["lut_latency_ms_base"] > 0
    assert metrics["budget"]["met"] is True and "budget 1000ms: met" in out


def test_lut_bad_inputs(checkpoint, tmp_path, capsys):
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"format": "autoprune-latency-lut", "version": 1, "entries": {"conv|k3')
    other = tmp_path / "other.json"
    assert main(["lut", "build", "--model", "vgg", "--runs", "1", "--warmup", "0", "--rounds", "1",
                 "--channel-step", "64", "--calibration-samples", "1", "--quiet", "--out", str(other)]) == 0
    capsys.readouterr()
    cases = {
        "truncated LUT": (["info", "--model", str(checkpoint), "--lut", str(truncated)], "corrupt or truncated"),
        "LUT of another model": (["lut", "validate", "--lut", str(other), "--model", str(checkpoint)],
                                 "was built for model 'vgg'"),
        "unknown backend": (["lut", "build", "--model", "vgg", "--backend", "tflite"], "unknown backend"),
        "unknown budget unit": (["prune", "--model", str(checkpoint), "--val-size", "400", "--policy", "uniform:0.5",
                                 "--budget", "50%watts"], "accepted forms"),
        "latency budget without LUT": (["prune", "--model", str(checkpoint), "--val-size", "400", "--policy",
                                        "uniform:0.5", "--budget", "3ms"], "needs a latency table"),
    }
    for label, (argv, message) in cases.items():
        code, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (label, err)


SEARCH_FAST = ["--val-size", "400", "--episodes", "3", "--warmup-episodes", "2", "--val-images", "100",
               "--bn-batches", "2", "--finetune-epochs", "1", "--quiet"]


def test_search_writes_a_complete_run_directory_and_resumes(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "search", "--model", str(checkpoint), "--budget", "50%flops", "--out", str(out),
                            *SEARCH_FAST)
    assert code == 0, err
    for name in ("config.json", "history.csv", "best_policy.json", "model.pt2", "metrics.json", "keep_ratios.png",
                 "report.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["flops_ratio"] <= 0.5 and "MACs" in (out / "report.md").read_text()
    breakdown = metrics["search_breakdown_seconds"]
    assert set(breakdown) == {"prune", "bn_recalibration", "validation", "agent"}
    assert 0 < sum(breakdown.values()) <= metrics["search_seconds"] + 0.5  # parts of the search, rounded
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 3
    code, _, err = run(capsys, "search", "--resume", str(out), "--quiet")
    assert code == 0, err
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 3


def test_search_bad_inputs_leave_no_run_directory(checkpoint, tmp_path, capsys):
    (tmp_path / "flat.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        cases = {
            "unreachable": (["--model", str(checkpoint), "--budget", "2%flops"], "unreachable"),
            "above 100": (["--model", str(checkpoint), "--budget", "150%flops"], "above 100"),
            "malformed": (["--model", str(checkpoint), "--budget", "fifty"], "accepted forms"),
            "no prunable layer": (["--model", "flat:make", "--data", "synthetic", "--budget", "50%flops"],
                                  "no prunable layer"),
            "latency without LUT": (["--model", str(checkpoint), "--budget", "50%latency"], "needs a latency table"),
        }
        for label, (argv, message) in cases.items():
            out = tmp_path / label.replace(" ", "_")
            code, _, err = run(capsys, "search", *argv, "--out", str(out), *SEARCH_FAST)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and message in lines[0], (label, err)
            assert not out.exists(), label
    finally:
        sys.path.remove(str(tmp_path))
