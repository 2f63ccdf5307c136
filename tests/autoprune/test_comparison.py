import json
import math
import os
import shutil

import pandas as pd
import pytest

from autoprune.agents.baselines import run_random, run_uniform
from autoprune.budgets import Constraint, parse_budget
from autoprune.comparison import COLUMNS, load_runs, notes, pareto_front, to_markdown, write_comparison
from autoprune.errors import AutopruneError
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.pipeline.finish import finish_run
from autoprune.pipeline.protocol import SearcherResult
from autoprune.runs import Run
from autoprune.train import TrainConfig

FAST = EvaluatorConfig(bn_batches=2, bn_batch_size=32, val_images=64)
FINETUNE = TrainConfig(epochs=1, batch_size=64, lr=0.01, max_steps_per_epoch=2)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, trained_tiny, synthetic_data):
    """Two real runs on the tiny model: uniform at 50 % FLOPs, random at 70 % FLOPs."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for agent, budget_text, search in (
            ("uniform", "50%flops", lambda run, ev, budget: run_uniform(run, ev, budget, progress=False)),
            ("random", "70%flops", lambda run, ev, budget: run_random(run, ev, budget, samples=2, progress=False))):
        evaluator = PolicyEvaluator(trained_tiny, synthetic_data, FAST)
        budget = parse_budget(budget_text)
        run = Run.create(root / agent, {"agent": agent, "budget": budget_text, "model": "tiny", "weights": None,
                                        "data": synthetic_data.name, "seed": 0,
                                        "groups": [g.name for g in evaluator.description.groups]})
        found = search(run, evaluator, budget)
        constraint = Constraint(budget, evaluator.description)
        result = SearcherResult(policy=found["policy"], channels=constraint.channels(found["policy"]),
                                score=found["accuracy"], cost_ratio=found["cost_ratio"],
                                evaluations=evaluator.evaluations)
        finish_run(run, evaluator, result, constraint, finetune=FINETUNE, progress=False, search_seconds=1.0,
                   onnx=False)
        paths.append(run.path)
    return paths


def test_finished_runs_carry_agent_and_measured_latency(finished_runs):
    for path in finished_runs:
        metrics = json.loads((path / "metrics.json").read_text())
        assert metrics["agent"] == path.name
        assert metrics["measured_latency_ms"] > 0 and metrics["measured_latency_ms_base"] > 0
        settings = metrics["measured_latency_settings"]
        assert (settings["backend"], settings["threads"], settings["batch"]) == ("torch", 1, 1)
        assert settings["on_lut_device"] is None and metrics["measured_on"]


def test_compare_writes_table_and_plots_with_one_row_per_run(finished_runs, tmp_path):
    records = load_runs(finished_runs)
    table, markdown, written = write_comparison(records, tmp_path / "out")
    assert {p.name for p in written} == {"comparison.csv", "comparison.md", "accuracy_vs_flops.png",
                                         "accuracy_vs_latency.png", "keep_ratios.png"}
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    for name in ("accuracy_vs_flops.png", "accuracy_vs_latency.png", "keep_ratios.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert list(csv.columns) == list(COLUMNS)
    assert list(csv["run"]) == ["uniform", "random"] and list(csv["agent"]) == ["uniform", "random"]
    assert list(csv["budget"]) == ["50% flops", "70% flops"]
    for path, (_, row) in zip(finished_runs, csv.iterrows()):
        metrics = json.loads((path / "metrics.json").read_text())
        assert row["FLOPs (% of base)"] == pytest.approx(100 * metrics["flops_ratio"], abs=0.01)
        assert row["test acc after FT (%)"] == pytest.approx(100 * metrics["test_accuracy"], abs=0.01)
        assert row["measured latency (ms)"] == pytest.approx(metrics["measured_latency_ms"], abs=1e-3)
        assert math.isnan(row["LUT latency (ms)"])
    lines = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("| uniform |") or line.startswith("| random |")) == 2
    assert "MACs" in markdown


def test_compare_refuses_runs_of_different_data_sets(finished_runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished_runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["data"] = "fashion-mnist"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(AutopruneError, match="differ in data") as info:
        load_runs([finished_runs[0], other])
    assert "other" in str(info.value) and "uniform" in str(info.value)


def test_compare_refuses_an_unfinished_run(finished_runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_runs[0], unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(AutopruneError, match="not finished; resume it with autoprune search --resume"):
        load_runs([finished_runs[1], unfinished])


@pytest.mark.parametrize("name", ["config.json", "metrics.json"])
@pytest.mark.parametrize("content", [bytes(range(256)), b"[1, 2]"], ids=["random bytes", "not an object"])
def test_compare_refuses_a_damaged_run_file_naming_it(finished_runs, tmp_path, name, content):
    damaged = tmp_path / "damaged"
    shutil.copytree(finished_runs[0], damaged)
    (damaged / name).write_bytes(content)
    with pytest.raises(AutopruneError, match="damaged") as info:
        load_runs([finished_runs[1], damaged])
    assert str(damaged / name) in str(info.value)


def test_pareto_front_keeps_the_runs_nothing_beats():
    costs = [50.0, 30.0, 70.0, 50.0, math.nan]
    accuracies = [90.0, 85.0, 89.0, 91.0, 99.0]
    assert pareto_front(costs, accuracies) == [False, True, False, True, False]


def test_markdown_table_leaves_missing_values_empty():
    table = pd.DataFrame({"run": ["a|b"], "ms": [math.nan], "acc": [91.5]})
    lines = to_markdown(table).splitlines()
    assert lines[0] == "| run | ms | acc |" and lines[1] == "|---|---:|---:|"
    assert lines[2] == "| a\\|b |  | 91.5 |"



def test_measured_latency_uses_the_lut_runtime_and_says_when_the_device_differs(trained_tiny):
    import torch

    from autoprune.latency import LatencyTable, cpu_id, cpu_model, this_device
    from autoprune.latency import measure_latency

    threads = torch.get_num_threads()
    cpus = os.sched_getaffinity(0)
    phone = LatencyTable({"runtime": {"backend": "torch", "threads": 1, "batch": 2},
                          "device": {"cpu": "Some Phone SoC"}}, "phone.json")
    result = measure_latency([trained_tiny], (1, 28, 28), phone)
    settings = result["settings"]
    assert result["ms"][0] > 0 and settings["batch"] == 2 and settings["backend"] == "torch"
    assert settings["measured_on"] == this_device()
    assert settings["lut_device"] == "Some Phone SoC"
    assert settings["on_lut_device"] is False
    here = LatencyTable({"runtime": {"backend": "formula", "threads": 1, "batch": 1},
                         "device": {"cpu": cpu_model(), "cpu_id": cpu_id()}}, "formula.json")
    settings = measure_latency([trained_tiny], (1, 28, 28), here)["settings"]
    assert settings["backend"] == "torch" and "not usable here" in settings["note"] and settings["on_lut_device"]
    assert torch.get_num_threads() == threads
    assert os.sched_getaffinity(0) == cpus  # pinned only while timing


def test_compare_notes_say_which_latencies_were_not_measured_on_the_lut_device(finished_runs):
    records = load_runs(finished_runs)
    records[1].metrics["measured_latency_settings"] = {**records[1].metrics["measured_latency_settings"],
                                                       "on_lut_device": False, "lut_device": "Some Phone SoC"}
    lines = notes(records)
    assert any(line.startswith("random: latency measured on") and "not on the LUT's device (Some Phone SoC)" in line
               for line in lines)


def test_latency_is_timed_in_a_fresh_process_unless_the_model_cannot_travel(caplog):
    import torch.nn as nn

    from autoprune.latency import measure_latency

    class Local(nn.Module):  # defined in a function: cannot be pickled for another process
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x)

    travelling = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    assert measure_latency([travelling], (1, 28, 28))["settings"]["process"] == "a fresh one"
    with caplog.at_level("WARNING", logger="autoprune.latency"):
        result = measure_latency([Local()], (1, 28, 28))
    assert result["ms"][0] > 0 and result["settings"]["process"].startswith("this one")
    assert "timing in this process instead" in caplog.text


def test_a_timing_process_that_does_not_answer_is_ended_and_the_timing_done_here(monkeypatch, caplog):
    import multiprocessing

    import torch.nn as nn

    from autoprune import latency

    monkeypatch.setattr(latency, "WORKER_TIMEOUT_S", 0.05)  # the worker cannot even start in that time
    with caplog.at_level("WARNING", logger="autoprune.latency"):
        result = latency.measure_latency([nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())], (1, 28, 28))
    assert result["ms"][0] > 0
    assert result["settings"]["process"].startswith("this one (timing in a separate process failed: TimeoutError")
    assert "timing in this process instead" in caplog.text
    assert not multiprocessing.active_children()  # the worker was ended, not left behind


def test_a_pair_is_timed_several_times_and_a_failed_worker_is_not_started_again(monkeypatch, caplog):
    from concurrent.futures.process import BrokenProcessPool

    import torch.nn as nn

    from autoprune import latency

    started = []

    class Broken:
        """A process pool whose process dies at once (as a spawned worker of an unguarded script does)."""

        def __init__(self, *args, **kwargs):
            started.append(self)

        def submit(self, *args, **kwargs):
            raise BrokenProcessPool("the worker died")

        def shutdown(self, *args, **kwargs):
            pass

    monkeypatch.setattr(latency, "ProcessPoolExecutor", Broken)
    base, pruned = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()), nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with caplog.at_level("WARNING", logger="autoprune.latency"):
        result = latency.measure_pair(base, pruned, (1, 28, 28), times=3)
    assert len(started) == 1 and caplog.text.count("timing in this process instead") == 1
    assert len(result["timings"]) == 3 and result["settings"]["timings"] == 3
    assert result["ms"] in result["timings"] and result["settings"]["process"].startswith("this one")
    ratios = sorted(ms / b for b, ms in result["timings"])
    assert result["ms"][1] / result["ms"][0] == ratios[1]


@pytest.mark.slow
def test_a_script_without_a_main_guard_still_gets_its_latency(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("import torch.nn as nn\n"
                      "from autoprune.latency import measure_latency\n"
                      "result = measure_latency([nn.Sequential(nn.Conv2d(1, 2, 3))], (1, 8, 8))\n"
                      "print('ms', result['ms'][0] > 0, result['settings']['process'][:8])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ms True this one" in done.stdout  # the worker could not start: timed in the script's own process
