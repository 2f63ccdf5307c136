"""The run directory's search clock: a search killed and resumed reports its whole time."""

import json

import pytest

import autoprune.runs as runs
from autoprune.runs import SEARCH_TIME, Run


class Counters:
    """What the clock reads of a PolicyEvaluator."""

    def __init__(self):
        self.evaluations, self.seconds = 0, 0.0
        self.timings = {"prune": 0.0, "validation": 0.0}

    def evaluate(self, seconds: float):
        self.evaluations += 1
        self.seconds += seconds
        self.timings["validation"] += seconds


@pytest.fixture
def clock(monkeypatch):
    """time.perf_counter as seen by autoprune.runs, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(runs.time, "perf_counter", lambda: now[0])
    return now


def test_a_killed_session_counts_up_to_its_last_history_row(tmp_path, clock):
    run = Run.create(tmp_path / "run", {"agent": "random"})
    first = Counters()
    assert run.start_search_clock(first) == 0.0
    clock[0] += 30
    first.evaluate(20.0)
    run.write_history([{"sample": 1}])
    clock[0] += 50  # killed before the next row: these seconds are lost
    second, again = Counters(), Run(run.path)
    assert again.start_search_clock(second) == pytest.approx(30.0)
    assert second.evaluations == 1 and second.timings["validation"] == pytest.approx(20.0)
    clock[0] += 10
    second.evaluate(5.0)
    assert again.stop_search_clock() == pytest.approx(40.0)
    saved = json.loads((run.state_dir / SEARCH_TIME).read_text())
    assert saved["seconds"] == pytest.approx(40.0) and saved["evaluator"]["evaluations"] == 2
    assert again.tick_search_clock() is None  # stopped


def test_a_searchers_own_record_raises_the_total_of_a_running_clock(tmp_path, clock):
    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    run.start_search_clock()
    clock[0] += 5
    run.raise_search_seconds(100.0)  # a state saved by an earlier autoprune, before the clock
    clock[0] += 5
    assert run.stop_search_clock() == pytest.approx(105.0)
    run.raise_search_seconds(50.0)  # lower: no effect
    assert json.loads((run.state_dir / SEARCH_TIME).read_text())["seconds"] == pytest.approx(105.0)


@pytest.mark.parametrize("record", [b"\x00\xff", b'{"seconds": 7, "evaluator": {"evaluations": "x"}}', b"[1]"],
                         ids=["bytes", "bad counters", "a list"])
def test_a_damaged_record_counts_as_none(tmp_path, clock, record):
    run = Run.create(tmp_path / "run", {"agent": "random"})
    run.state_dir.mkdir(parents=True, exist_ok=True)
    (run.state_dir / SEARCH_TIME).write_bytes(record)
    counters = Counters()
    before = run.start_search_clock(counters)
    assert before == (7.0 if b"seconds" in record else 0.0) and counters.evaluations == 0
    clock[0] += 3
    assert run.stop_search_clock() == pytest.approx(before + 3)
