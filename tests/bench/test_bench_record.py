"""The latency-budget bench's record: what survives a fresh clone of the repository."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_latency_budget", BENCH / "bench_latency_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(path: Path, accuracy: float | None) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"agent": path.name}))
    (path / "state.pt").write_bytes(b"not recorded")
    if accuracy is not None:
        (path / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy}))


def test_finished_runs_are_recorded_and_recorded_runs_come_back(tmp_path):
    bench = load_bench()
    out, record = tmp_path / "runs", tmp_path / "record"
    write_run(out / "uniform-s0", 0.91)
    write_run(out / "ddpg-s0", None)  # cut short: searched again, never recorded
    write_run(record / "netadapt-s0", 0.92)
    write_run(record / "ddpg-s1", 0.93)
    (out / "ddpg-s1").mkdir()  # begun here, finished in the record
    (out / "measured.json").write_text('{"base_ms": 1.9}')

    bench.sync_record(out, record)

    assert sorted(p.name for p in record.iterdir()) == ["ddpg-s1", "measured.json", "netadapt-s0", "uniform-s0"]
    assert sorted(p.name for p in (record / "uniform-s0").iterdir()) == ["config.json", "metrics.json"]
    assert json.loads((out / "netadapt-s0" / "metrics.json").read_text()) == {"test_accuracy": 0.92}
    assert bench.finished(out / "ddpg-s1") and not bench.finished(out / "ddpg-s0")
    assert json.loads((record / "measured.json").read_text()) == {"base_ms": 1.9}
    assert not list(tmp_path.rglob("*.tmp"))

    # a fresh clone: the runs are gone, the record brings back every finished one
    fresh = tmp_path / "fresh"
    bench.sync_record(fresh, record)
    assert sorted(p.parent.name for p in fresh.glob("*/metrics.json")) == ["ddpg-s1", "netadapt-s0", "uniform-s0"]
    assert (fresh / "measured.json").is_file()


def test_without_a_record_nothing_is_copied(tmp_path):
    bench = load_bench()
    write_run(tmp_path / "runs" / "uniform-s0", 0.91)
    bench.sync_record(tmp_path / "runs", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_the_bench_refuses_another_cpu():
    from autoprune.latency import cpu_id, cpu_model

    bench = load_bench()

    class Table:
        data = {"device": {"cpu": "Some Other CPU", "cpu_id": "family 1 model 2 stepping 3"}}

    with pytest.raises(SystemExit, match="Some Other CPU"):
        bench.check_device(Table())
    Table.data = {"device": {"cpu": cpu_model(), "cpu_id": cpu_id()}}
    bench.check_device(Table())  # this machine's table: nothing to refuse


def test_a_job_is_claimed_once_and_a_dead_workers_claim_is_taken_over(tmp_path):
    bench = load_bench()
    assert bench.claim(tmp_path, "ddpg", 0)
    assert bench.claim(tmp_path, "ddpg", 0)  # this process holds it already
    claims = tmp_path / "claims"
    assert sorted(p.name for p in claims.iterdir()) == ["ddpg-s0"]  # nothing left aside
    assert (claims / "ddpg-s0").read_text() == str(os.getpid())
    (claims / "uniform-s0").write_text("1")  # held by a live process (init)
    assert not bench.claim(tmp_path, "uniform", 0)
    (claims / "random-s0").write_text("999999999")  # its process has ended
    assert bench.claim(tmp_path, "random", 0)
