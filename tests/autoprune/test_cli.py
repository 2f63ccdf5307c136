import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exited:  # argparse refuses malformed flags before any command runs
        code = exited.code
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
    for command in (["info"], ["prune", "--val-size", "400", "--policy", "uniform:0.5", "--out",
                                str(tmp_path / "twice.pt2")]):
        code, _, err = run(capsys, command[0], "--model", str(pruned), *command[1:])
        assert code == 2 and "inference-only" in err and len(err.strip().splitlines()) == 1, err

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
    code, out, err = run(capsys, "lut", "validate", "--lut", str(lut), "--model", str(checkpoint), "--samples", "2",
                         "--keep-range", "0.05,0.3", "--rounds", "1", "--quiet", "--out", str(tmp_path / "small.json"))
    assert code == 0, err
    small = json.loads((tmp_path / "small.json").read_text())
    assert small["keep_range"] == [0.05, 0.3] and small["flops_ratio_range"][1] < 0.2
    assert all(0.05 <= r <= 0.3 for row in small["rows"] for r in row["policy"].values())
    for bad in ("0,0.5", "0.5,0.2", "half"):
        code, _, err = run(capsys, "lut", "validate", "--lut", str(lut), "--model", str(checkpoint), "--keep-range", bad)
        assert code == 2 and "--keep-range" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "info", "--model", str(checkpoint), "--lut", str(lut))
    assert code == 0 and "ms predicted" in out
    code, out, err = run(capsys, "prune", "--model", str(checkpoint), "--val-size", "400", "--policy", "uniform:0.5",
                         "--lut", str(lut), "--budget", "1000ms", "--out", str(tmp_path / "p.pt2"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["lut_latency_ms"] > 0 and metrics["lut_latency_ms_base"] > 0
    assert metrics["budget"]["met"] is True and "budget 1000ms: met" in out

    # a latency budget bounds the latency of the LUT's CPU: another CPU's LUT is refused unless allowed
    # (entries from a formula, so that a timing of the tiny model's layers by a busy machine cannot make the
    # table non-monotone and the budget unreachable)
    data = json.loads(lut.read_text())
    for entry in data["entries"].values():
        entry["ms"] = [[0.01 + 1e-4 * i * o for o in entry["out"]] for i in entry["in"]]
    data["calibration"] = {"scale": 1.0, "offset_ms": 0.05}
    lut.write_text(json.dumps(data))
    foreign = tmp_path / "other-cpu.json"
    foreign.write_text(json.dumps({**data, "device": {"cpu": "Some Other CPU", "cpu_id": "family 1 model 2"}}))
    search = ["search", "--model", str(checkpoint), "--agent", "uniform", "--budget", "90%latency", *BASELINE_FAST]
    code, _, err = run(capsys, *search, "--lut", str(foreign), "--out", str(tmp_path / "refused"))
    assert code == 2 and "Some Other CPU" in one_error_line(err) and "--allow-other-device" in err
    assert not (tmp_path / "refused").exists()
    code, _, err = run(capsys, *search, "--lut", str(foreign), "--allow-other-device", "--out", str(tmp_path / "ok"))
    assert code == 0, err
    code, _, err = run(capsys, *search, "--lut", str(lut), "--no-fit-latency", "--out", str(tmp_path / "here"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "here" / "metrics.json").read_text())
    assert metrics["lut_latency_ratio"] <= 0.9 + 1e-9 and "latency_fit" not in metrics
    # on the LUT's own CPU the network is timed and scaled to the budget; the one fine-tuned is the one chosen
    code, _, err = run(capsys, *search, "--lut", str(lut), "--out", str(tmp_path / "fitted"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "fitted" / "metrics.json").read_text())
    fit = metrics["latency_fit"]
    assert fit["fitted"] and 1 <= len(fit["steps"]) <= 5
    assert metrics["channels"] == fit["steps"][fit["chosen"]]["channels"]
    # each network timed three times, and the run's own latency too: its figures are one of the timings
    assert all(len(step["timings"]) == 3 for step in fit["steps"])
    timings = metrics["measured_latency_timings"]
    assert len(timings) == 3 and [metrics["measured_latency_ms_base"], metrics["measured_latency_ms"]] in timings
    # Torch-Pruning's network is fitted by its own pruning at other global ratios: the network it fine-tunes
    # and reports is the plan chosen (the FLOPs reported are counted on the network itself)
    tp_search = [arg if arg != "uniform" else "tp_global" for arg in search]
    code, _, err = run(capsys, *tp_search, "--lut", str(lut), "--out", str(tmp_path / "tp"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "tp" / "metrics.json").read_text())
    fit = metrics["latency_fit"]
    assert fit["fitted"] and metrics["channels"] == fit["steps"][fit["chosen"]]["channels"]
    from autoprune.costs import count_cost
    from autoprune.models import load_model
    from autoprune.pruning import describe_network

    model, _ = load_model(str(checkpoint))
    assert metrics["flops"] == count_cost(describe_network(model, (1, 28, 28)), metrics["channels"]).flops


def test_equal_training_adds_the_missing_steps_and_compare_checks_it(checkpoint, tmp_path, capsys, monkeypatch):
    from autoprune.pipeline import finish

    calls, real_train = [], finish.train

    def recording_train(model, data, config, **kwargs):
        calls.append((id(model), config.batch_size, Path(kwargs.get("state_path") or "-").name))
        return real_train(model, data, config, **kwargs)

    monkeypatch.setattr(finish, "train", recording_train)
    search = ["search", "--model", str(checkpoint), "--agent", "uniform", "--budget", "60%flops", *BASELINE_FAST]
    code, _, err = run(capsys, *search, "--equal-steps", "7", "--out", str(tmp_path / "equal"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "equal" / "metrics.json").read_text())
    assert metrics["training"]["extra_steps"] == metrics["training"]["total_steps"] == 7
    # as run: the fine-tune on a copy; equal training: the extra steps, then the same fine-tune
    (as_run, *equal) = calls
    assert as_run[2] == "finetune.state" and [c[2] for c in equal] == ["extra_first.state", "finetune_equal.state"]
    assert as_run[0] != equal[0][0] == equal[1][0] and equal[0][1] == 64
    assert metrics["training"]["order"] == "extra steps, then the fine-tune"
    assert metrics["test_accuracy_as_run"] == metrics["test_accuracy_before_finetune"]  # no fine-tune epochs
    # cut in three steps with two SGD steps after each but the last: those four count, three are added
    code, _, err = run(capsys, *search, "--equal-steps", "7", "--finish-stages", "3", "--stage-steps", "2",
                       "--out", str(tmp_path / "staged"))
    assert code == 0, err
    staged = json.loads((tmp_path / "staged" / "metrics.json").read_text())
    assert staged["training"]["stage_steps"] == 4 and staged["training"]["search_steps"] == 4
    assert staged["training"]["extra_steps"] == 3 and staged["training"]["total_steps"] == 7
    assert staged["channels"] == metrics["channels"] and staged["flops"] == metrics["flops"]
    assert "pruned before fine-tuning (cut in 3 stages, 4 SGD steps in all between them)" in \
        (tmp_path / "staged" / "report.md").read_text()
    assert "(BN recalibrated)" in (tmp_path / "equal" / "report.md").read_text()  # no fine-tune: one cut
    code, _, err = run(capsys, *search, "--out", str(tmp_path / "as-run"))
    assert code == 0, err
    code, out, err = run(capsys, "compare", str(tmp_path / "equal"), str(tmp_path / "as-run"),
                         "--out", str(tmp_path / "cmp"))
    assert code == 0 and "SGD steps since pruning" in out and "test acc as run" in out, err
    code, _, err = run(capsys, "compare", str(tmp_path / "equal"), str(tmp_path / "as-run"), "--equal-training",
                       "--out", str(tmp_path / "cmp2"))
    assert code == 2 and "--equal-steps 7" in one_error_line(err)
    old = json.loads((tmp_path / "as-run" / "metrics.json").read_text())
    del old["training"]
    (tmp_path / "as-run" / "metrics.json").write_text(json.dumps(old))
    code, _, err = run(capsys, "compare", str(tmp_path / "equal"), str(tmp_path / "as-run"), "--equal-training",
                       "--out", str(tmp_path / "cmp3"))
    assert code == 2 and "do not record their SGD steps since pruning (written before autoprune counted them): as-run;" in one_error_line(err)
    # extra steps after the fine-tune (an older autoprune) do not compare with extra steps before it
    appended = json.loads((tmp_path / "staged" / "metrics.json").read_text())
    del appended["training"]["order"]
    (tmp_path / "staged" / "metrics.json").write_text(json.dumps(appended))
    code, _, err = run(capsys, "compare", str(tmp_path / "equal"), str(tmp_path / "staged"), "--equal-training",
                       "--out", str(tmp_path / "cmp4"))
    assert code == 2 and "after the fine-tune, at a restarted learning rate" in one_error_line(err)
    assert "the others before it: staged;" in one_error_line(err)


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
    for name in ("config.json", "history.csv", "best_policy.json", "model.pt", "model.pt2", "model.onnx",
                 "metrics.json", "keep_ratios.png", "report.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["outputs"]["onnx_max_abs_difference"] < 1e-3  # ONNX Runtime agrees with torch
    assert metrics["flops_ratio"] <= 0.5 and "MACs" in (out / "report.md").read_text()
    breakdown = metrics["search_breakdown_seconds"]
    assert set(breakdown) == {"prune", "bn_recalibration", "validation", "agent"}
    assert 0 < sum(breakdown.values()) <= metrics["search_seconds"] + 0.5  # parts of the search, rounded
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 3
    code, _, err = run(capsys, "search", "--resume", str(out), "--quiet")
    assert code == 0, err
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 3
    # a run directory another process is writing is refused, naming that process
    import os

    from autoprune.io import WriterLock

    (out / "metrics.json").unlink()
    with WriterLock(out / ".lock", "run directory"):
        code, _, err = run(capsys, "search", "--resume", str(out), "--quiet")
    assert code == 2 and f"PID {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    # flags that contradict the saved settings are refused, naming them
    code, _, err = run(capsys, "search", "--resume", str(out), "--budget", "30%flops", "--episodes", "2", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--budget 30%flops (saved: 50%flops)" in err and "--episodes 2 (saved: 3; it may only be raised)" in err
    # an output directory that is a file, or that cannot be written, is refused before any work
    (tmp_path / "a_file").write_text("x")
    for target, message in ((tmp_path / "a_file", "is not a directory"), ("/proc/autoprune-run", "cannot write")):
        code, _, err = run(capsys, "search", "--model", str(checkpoint), "--budget", "50%flops", "--out",
                           str(target), *SEARCH_FAST)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    # resumed after a kill in fine-tuning (metrics.json not yet written), it reports the whole search
    code, _, err = run(capsys, "search", "--resume", str(out), "--quiet")
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    assert again["candidate_evaluations"] == metrics["candidate_evaluations"] > 0
    assert again["search_seconds"] >= metrics["search_seconds"]
    assert again["search_breakdown_seconds"]["validation"] == pytest.approx(breakdown["validation"])


def test_a_resumed_search_may_run_more_episodes(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "search", "--model", str(checkpoint), "--budget", "50%flops", "--out", str(out),
                       *SEARCH_FAST, "--finetune-epochs", "0", "--no-onnx")
    assert code == 0, err
    (out / "metrics.json").unlink()  # as if killed after the search
    code, _, err = run(capsys, "search", "--resume", str(out), "--episodes", "5", "--quiet")
    assert code == 0, err
    rows = (out / "history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert json.loads((out / "config.json").read_text())["episodes"] == 5
    assert json.loads((out / "metrics.json").read_text())["candidate_evaluations"] >= 5
    # resumed again without the flag, it keeps the raised count
    (out / "metrics.json").unlink()
    code, _, err = run(capsys, "search", "--resume", str(out), "--quiet")
    assert code == 0, err
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 5


def test_finalists_are_scored_again_and_the_best_of_them_is_fine_tuned(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "search", "--model", str(checkpoint), "--budget", "50%flops", "--out", str(out),
                       *SEARCH_FAST, "--episodes", "6", "--finalists", "3", "--finalist-steps", "2",
                       "--finetune-epochs", "0", "--no-onnx")
    assert code == 0, err
    finalists = json.loads((out / "finalists.json").read_text())
    scores = [f["accuracy"] for f in finalists["finalists"]]
    policies = [f["policy"] for f in finalists["finalists"]]
    assert finalists["steps"] == 2 and 2 <= len(scores) <= 3 and len({json.dumps(p) for p in policies}) == len(scores)
    search_scores = [f["reward"] for f in finalists["finalists"]]
    assert search_scores == sorted(search_scores, reverse=True)  # the search's best first
    assert policies[0] == json.loads((out / "best_policy.json").read_text())["policy"]
    chosen = next(f for f in finalists["finalists"] if f["episode"] == finalists["chosen_episode"])
    assert chosen["accuracy"] == max(scores)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["policy"] == chosen["policy"] and metrics["val_accuracy_before_finetune"] is not None


def test_search_resumes_a_run_written_before_the_fill_bound_without_it(checkpoint, tmp_path, capsys, monkeypatch):
    from autoprune.envs.channel_pruning import ChannelPruningEnv

    out = tmp_path / "old"
    code, _, err = run(capsys, "search", "--model", str(checkpoint), "--budget", "50%flops", "--out", str(out),
                       *SEARCH_FAST)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["fill"] == 0.95
    del config["fill"]  # as an earlier autoprune wrote it
    (out / "config.json").write_text(json.dumps(config))
    (out / "metrics.json").unlink()  # unfinished
    fills = []
    real_init = ChannelPruningEnv.__init__

    def recording_init(self, *args, **kwargs):
        fills.append(kwargs.get("fill"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ChannelPruningEnv, "__init__", recording_init)
    code, _, err = run(capsys, "search", "--resume", str(out), "--quiet")
    assert code == 0, err
    assert fills == [0.0] and (out / "metrics.json").is_file()


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


BASELINE_FAST = ["--val-size", "400", "--val-images", "100", "--bn-batches", "2", "--finetune-epochs", "0", "--no-onnx",
                 "--quiet"]
RUN_FILES = ("config.json", "history.csv", "best_policy.json", "model.pt2", "metrics.json", "keep_ratios.png",
             "report.md")


@pytest.mark.parametrize("agent, flags", [
    ("uniform", []),
    ("random", ["--samples", "3"]),
    ("sensitivity", ["--lower-bound", "0.5", "--sensitivity-step", "0.5"]),
])
def test_search_with_a_baseline_agent_writes_a_complete_run_directory(checkpoint, tmp_path, capsys, agent, flags):
    out = tmp_path / agent
    code, stdout, err = run(capsys, "search", "--model", str(checkpoint), "--budget", "60%flops", "--agent", agent,
                            "--out", str(out), *flags, *BASELINE_FAST)
    assert code == 0, err
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert metrics["agent"] == config["agent"] == agent and config["criterion"] == "l1"
    assert metrics["flops_ratio"] <= 0.6 and metrics["measured_latency_ms"] > 0
    assert len(metrics["measured_latency_timings"]) == 1  # timed once: the budget is not a latency
    assert json.loads((out / "best_policy.json").read_text())["policy"] == metrics["policy"]
    rows = (out / "history.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == {"uniform": 1, "random": 3, "sensitivity": 12}[agent]
    assert f"# {agent} at 60% flops" in stdout and str(out) in stdout


def test_search_with_netadapt_fine_tunes_the_model_it_returns(checkpoint, tmp_path, capsys):
    pytest.importorskip("autoprune.agents.netadapt")
    out = tmp_path / "netadapt"
    code, _, err = run(capsys, "search", "--model", str(checkpoint), "--budget", "80%flops", "--agent", "netadapt",
                       "--out", str(out), "--initial-reduction", "0.3", "--max-iterations", "2",
                       "--short-term-steps", "1", "--workers", "1", *BASELINE_FAST)
    assert code == 0, err
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["criterion"] == "l2" and config["agent_config"]["criterion"] == "l2"
    assert config["agent_config"]["max_iterations"] == 2 and metrics["agent"] == "netadapt"
    assert metrics["flops_ratio"] <= 0.8 + 1e-9 and metrics["search"]["stop_reason"] == "budget met"
    with open(out / "history.csv", newline="") as fh:
        assert metrics["candidate_evaluations"] == sum(int(row["proposals"]) for row in csv.DictReader(fh))
    # killed after the search (metrics.json not yet written), it resumes and finishes the same network
    (out / "metrics.json").unlink()
    code, _, err = run(capsys, "search", "--resume", str(out), "--quiet")
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    assert again["channels"] == metrics["channels"] and again["candidate_evaluations"] == metrics["candidate_evaluations"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error:"), err
    return lines[0]


def test_search_refuses_bad_agent_settings_before_creating_the_run(checkpoint, tmp_path, capsys):
    foreign = tmp_path / "foreign-lut.json"
    foreign.write_text(json.dumps({"format": "autoprune-latency-lut", "version": 1, "complete": True,
                                   "model": {"name": "someone-else", "fingerprint": "0123456789abcdef"},
                                   "runtime": {"backend": "torch", "threads": 1, "batch": 1},
                                   "entries": {"linear|bias=1|post=none": {"in": [1], "out": [1], "ms": [[0.01]]}}}))
    cases = {
        "unknown agent": (["--agent", "genetic", "--budget", "50%flops"],
                          "unknown agent 'genetic'; choose one of ddpg, netadapt, uniform, random, sensitivity, tp_global"),
        "latency budget without a LUT": (["--agent", "uniform", "--budget", "40%latency"], "needs a latency table"),
        "LUT of another model": (["--agent", "random", "--budget", "50%flops", "--lut", str(foreign)],
                                 "was built for model 'someone-else'"),
        "uniform, unreachable": (["--agent", "uniform", "--budget", "2%flops"], "unreachable"),
        "random, unreachable": (["--agent", "random", "--budget", "2%flops"], "unreachable"),
        "sensitivity, unreachable": (["--agent", "sensitivity", "--budget", "10%flops", "--lower-bound", "0.5"],
                                     "unreachable"),
        "no samples": (["--agent", "random", "--budget", "50%flops", "--samples", "0"], "--samples"),
        "fill above 1": (["--agent", "random", "--budget", "50%flops", "--fill", "1.5"], "--fill: must be at most 1"),
    }
    try:
        import autoprune.agents.netadapt  # noqa: F401

        cases["netadapt, unreachable"] = (["--agent", "netadapt", "--budget", "2%flops"], "unreachable")
    except ImportError:
        cases["netadapt missing"] = (["--agent", "netadapt", "--budget", "50%flops"], "not available")
    for label, (argv, message) in cases.items():
        out = tmp_path / label.replace(" ", "_").replace(",", "")
        code, _, err = run(capsys, "search", "--model", str(checkpoint), *argv, "--out", str(out), *BASELINE_FAST)
        assert code == 2 and message in one_error_line(err), (label, err)
        assert not out.exists(), label


@pytest.fixture(scope="module")
def sweep(checkpoint, tmp_path_factory):
    """A finished sweep of two baseline agents at one budget."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    argv = ["sweep", "--model", str(checkpoint), "--agents", "uniform,random", "--budgets", "60%flops",
            "--samples", "2", "--out", str(out), *BASELINE_FAST]
    assert main(argv) == 0
    return out, argv


def test_sweep_runs_every_agent_and_compares_them(sweep):
    out, _ = sweep
    for name in ("uniform-60pflops-s0", "random-60pflops-s0"):
        assert (out / name / "metrics.json").is_file(), name
        assert json.loads((out / name / "config.json").read_text())["sweep"] == str(out)
    csv = (out / "comparison" / "comparison.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 and csv[1].startswith("uniform-60pflops-s0,uniform,60% flops,0,")
    assert (out / "comparison" / "accuracy_vs_flops.png").is_file()


def test_sweep_skips_finished_runs_and_resumes_unfinished_ones(sweep, capsys):
    out, argv = sweep
    finished = out / "uniform-60pflops-s0" / "metrics.json"
    before = finished.stat().st_mtime_ns
    (out / "random-60pflops-s0" / "metrics.json").unlink()  # as if killed while fine-tuning
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "[1/2] uniform at 60%flops, seed 0: finished, skipped" in stdout
    assert "[2/2] random at 60%flops, seed 0: resuming" in stdout
    assert finished.stat().st_mtime_ns == before
    assert (out / "random-60pflops-s0" / "metrics.json").is_file()
    history = (out / "random-60pflops-s0" / "history.csv").read_text().strip().splitlines()
    assert len(history) == 1 + 2  # the two samples were not drawn again
    code, stdout, err = run(capsys, *argv)
    assert code == 0 and stdout.count("finished, skipped") == 2


def test_sweep_gives_every_agent_netadapt_s_training(checkpoint, tmp_path, capsys):
    pytest.importorskip("autoprune.agents.netadapt")
    out = tmp_path / "equal"
    code, stdout, err = run(capsys, "sweep", "--model", str(checkpoint), "--agents", "uniform,netadapt",
                            "--budgets", "80%flops", "--out", str(out), "--initial-reduction", "0.3",
                            "--max-iterations", "2", "--short-term-steps", "3", "--workers", "1", *BASELINE_FAST)
    assert code == 0, err
    assert "[1/2] netadapt" in stdout and "[2/2] uniform" in stdout  # NetAdapt first
    netadapt = json.loads((out / "netadapt-80pflops-s0" / "metrics.json").read_text())["training"]
    uniform = json.loads((out / "uniform-80pflops-s0" / "metrics.json").read_text())["training"]
    assert netadapt["search_steps"] > 0 and netadapt["search_steps"] % 3 == 0  # 3 steps per iteration
    assert uniform["total_steps"] == uniform["extra_steps"] == netadapt["total_steps"]
    code, stdout, err = run(capsys, "compare", str(out / "netadapt-80pflops-s0"), str(out / "uniform-80pflops-s0"),
                            "--equal-training", "--out", str(tmp_path / "cmp"))
    assert code == 0 and f"every run had {netadapt['total_steps']} SGD steps" in stdout, err


def test_sweep_reports_every_bad_agent_and_budget_before_running(checkpoint, tmp_path, capsys):
    out = tmp_path / "bad"
    code, _, err = run(capsys, "sweep", "--model", str(checkpoint), "--agents", "uniform,genetic,annealing",
                       "--budgets", "50%flops,fifty,3watts", "--out", str(out), *BASELINE_FAST)
    line = one_error_line(err)
    assert code == 2 and all(word in line for word in ("genetic", "annealing", "fifty", "3watts"))
    assert not out.exists()
    code, _, err = run(capsys, "sweep", "--model", str(checkpoint), "--agents", "uniform", "--budgets",
                       "50%flops,2%flops", "--out", str(out), *BASELINE_FAST)
    assert code == 2 and "2%flops" in one_error_line(err) and not out.exists()


def test_compare_command_writes_its_files_and_refuses_mismatched_or_unfinished_runs(sweep, tmp_path, capsys):
    out, _ = sweep
    runs = [out / "uniform-60pflops-s0", out / "random-60pflops-s0"]
    code, stdout, err = run(capsys, "compare", *map(str, runs), "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    for name in ("comparison.csv", "comparison.md", "accuracy_vs_flops.png", "accuracy_vs_latency.png",
                 "keep_ratios.png"):
        assert (tmp_path / "cmp" / name).is_file(), name
    assert "| uniform-60pflops-s0 | uniform |" in stdout and "| random-60pflops-s0 | random |" in stdout

    other = tmp_path / "other-data"
    shutil.copytree(runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["data"] = "mnist"
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "compare", str(runs[0]), str(other))
    assert code == 2 and "differ in data" in one_error_line(err)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs[0], unfinished)
    (unfinished / "metrics.json").unlink()
    code, _, err = run(capsys, "compare", str(runs[1]), str(unfinished))
    assert code == 2 and f"run {unfinished} is not finished; resume it with autoprune search --resume" in \
        one_error_line(err)


def test_search_scores_candidates_with_the_evaluator_defaults():
    from autoprune.cli import build_parser
    from autoprune.evaluation import EvaluatorConfig

    for command in (["search", "--budget", "50%flops"], ["sweep", "--agents", "uniform", "--budgets", "50%flops"]):
        args = build_parser().parse_args(command)
        assert (args.val_images, args.bn_batches) == (EvaluatorConfig().val_images, EvaluatorConfig().bn_batches)


def test_train_with_the_same_seed_gives_the_same_weights(tmp_path, capsys):
    paths = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever state the process is in, the seed decides
        path = tmp_path / f"run{i}.pt"
        assert main(["train", "--model", "resnet20", "--width", "0.25", "--data", "synthetic", "--val-size", "400",
                     "--epochs", "1", "--max-steps", "3", "--seed", "0", "--quiet", "--out", str(path)]) == 0
        paths.append(path)
    first, second = (torch.load(p, weights_only=False)["state_dict"] for p in paths)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("argv,message", [
    (["train", "--lr", "-1"], "--lr: must be above 0.0"),
    (["train", "--epochs", "0"], "--epochs: must be at least 1"),
    (["train", "--epochs", "-2"], "--epochs: must be at least 1"),
    (["lut", "build", "--channel-step", "0"], "--channel-step: must be at least 1"),
    (["lut", "build", "--threads", "0"], "--threads: must be at least 1"),
    (["lut", "build", "--batch", "0"], "--batch: must be at least 1"),
    (["search", "--val-images", "-5"], "--val-images: must be at least 1"),
    (["search", "--val-images", "0"], "--val-images: must be at least 1"),
    (["search", "--bn-batches", "-1"], "--bn-batches: must be at least 0"),
    (["search", "--episodes", "ten"], "'ten' is not an integer"),
    (["search", "--finetune-lr", "nan"], "--finetune-lr: must be finite"),
])
def test_out_of_range_numbers_are_refused_in_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_info_reads_the_weights_it_is_given(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(200))
    for weights, message in ((tmp_path / "missing.pt", "not found"), (garbage, "cannot load")):
        code, _, err = run(capsys, "info", "--model", "resnet20", "--weights", str(weights))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_internal_error_is_one_line_and_a_traceback_file(tmp_path, capsys, monkeypatch):
    import autoprune.cli as cli

    def broken(args):
        raise RuntimeError("something inside went wrong\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", broken)
    monkeypatch.setenv("AUTOPRUNE_LOG_DIR", str(tmp_path))
    code, _, err = run(capsys, "info")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "RuntimeError: something inside went wrong" in lines[0]
    written = list(tmp_path.glob("crash-*.txt"))
    assert len(written) == 1 and str(written[0]) in lines[0]
    assert "Traceback" in written[0].read_text() and "broken" in written[0].read_text()
