"""The command line against bad input and damaged files, one row per case.

Every row prepares its files in a directory of its own, runs one command and checks the
exit code and what reached the user: a refused input is exit 2 and one line, never a
traceback, and leaves every file as it was (nothing half-written); a damaged run file
that the saved state can rebuild is rebuilt, and the run finishes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from autoprune.cli import main

MODULE = "tests.autoprune.user_model"
SEARCH = ["--val-size", "400", "--episodes", "3", "--warmup-episodes", "2", "--val-images", "100", "--bn-batches",
          "2", "--finetune-epochs", "0", "--no-onnx", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A checkpoint, a finished DDPG run of it, and a small LUT for it, made once."""
    root = tmp_path_factory.mktemp("world")
    checkpoint = root / "tiny.pt"
    assert main(["train", "--model", "resnet20", "--width", "0.5", "--data", "synthetic", "--val-size", "400",
                 "--epochs", "1", "--max-steps", "5", "--quiet", "--out", str(checkpoint)]) == 0
    finished = root / "run"
    assert main(["search", "--model", str(checkpoint), "--budget", "50%flops", "--out", str(finished), *SEARCH]) == 0
    lut = root / "lut.json"
    assert main(["lut", "build", "--model", str(checkpoint), "--runs", "1", "--warmup", "0", "--rounds", "1",
                 "--channel-step", "16", "--calibration-samples", "1", "--quiet", "--out", str(lut)]) == 0
    return {"checkpoint": checkpoint, "finished": finished, "lut": lut}


def unfinished(world, here: Path) -> Path:
    """A copy of the finished run as a search killed after its last episode leaves it."""
    run = here / "run"
    shutil.copytree(world["finished"], run)
    (run / "metrics.json").unlink()
    return run


def damaged_lut(world, here: Path, change: Callable[[dict], None]) -> Path:
    data = json.loads(world["lut"].read_text())
    change(data)
    path = here / "bad-lut.json"
    path.write_text(json.dumps(data))
    return path


def first_cell(data: dict) -> list:
    return data["entries"][next(iter(data["entries"]))]["ms"][0]


def cut_mid_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])


RANDOM = bytes(range(256)) * 8


@dataclass
class Case:
    """`prepare(world, here)` writes what the case needs under `here` and returns the argv."""

    prepare: Callable[[dict, Path], list[str]]
    code: int
    message: str = ""
    check: Callable[[Path], None] | None = None  # what must hold afterwards (for cases that succeed)
    unchanged: bool = field(default=True)  # a refused case leaves every file under `here` as it was


def history_rows(run: Path) -> list[list[str]]:
    return [line.split(",") for line in (run / "history.csv").read_text().strip().splitlines()[1:]]


def whole_history(run: Path) -> None:
    rows = history_rows(run)
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert all(all(cell != "" for cell in row[:5]) for row in rows)  # episode, reward, accuracy, ratios
    assert (run / "metrics.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["candidate_evaluations"] > 0


def search(*extra) -> Callable[[dict, Path], list[str]]:
    return lambda w, here: ["search", "--model", str(w["checkpoint"]), "--budget", "50%flops", *SEARCH,
                            "--out", str(here / "out"), *extra]


def resume_after(damage: Callable[[Path], None], *extra) -> Callable[[dict, Path], list[str]]:
    def prepare(w, here):
        run = unfinished(w, here)
        damage(run)
        return ["search", "--resume", str(run), "--quiet", *extra]
    return prepare


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return damage


def policy_file(content: str) -> Callable[[dict, Path], list[str]]:
    def prepare(w, here):
        (here / "policy.json").write_text(content)
        return ["prune", "--model", str(w["checkpoint"]), "--val-size", "400", "--policy", str(here / "policy.json"),
                "--out", str(here / "pruned.pt2")]
    return prepare


def lut_with(change: Callable[[dict], None]) -> Callable[[dict, Path], list[str]]:
    return lambda w, here: ["info", "--model", str(w["checkpoint"]), "--lut", str(damaged_lut(w, here, change))]


def an_existing_file(w, here):
    (here / "taken").write_text("mine")
    return search()(w, here)[:-1] + [str(here / "taken")]


def compare_damaged(name: str, content: bytes):
    def prepare(w, here):
        run = here / "run"
        shutil.copytree(w["finished"], run)
        (run / name).write_bytes(content)
        return ["compare", str(w["finished"]), str(run), "--out", str(here / "cmp")]
    return prepare


def locked(w, here):
    from autoprune.io import WriterLock

    run = unfinished(w, here)
    holder = WriterLock(run / ".lock", "run directory")  # as a process writing the run holds it
    locked.holders.append(holder)
    return ["search", "--resume", str(run), "--quiet"]


locked.holders = []


CASES: dict[str, Case] = {
    # --- damaged run files: what the saved state holds is rebuilt, the rest refused
    "history cut mid-line, resumed": Case(resume_after(lambda run: cut_mid_line(run / "history.csv")),
                                          0, check=lambda here: whole_history(here / "run"), unchanged=False),
    "history deleted, resumed": Case(resume_after(lambda run: (run / "history.csv").unlink()), 0,
                                     check=lambda here: whole_history(here / "run"), unchanged=False),
    "history random bytes, resumed": Case(resume_after(write("history.csv", RANDOM)), 0,
                                          check=lambda here: whole_history(here / "run"), unchanged=False),
    "best policy deleted, resumed": Case(resume_after(lambda run: (run / "best_policy.json").unlink()), 0,
                                         check=lambda here: whole_history(here / "run"), unchanged=False),
    "search time record random bytes, resumed": Case(resume_after(write("state/search_seconds.json", RANDOM)), 0,
                                                     check=lambda here: whole_history(here / "run"), unchanged=False),
    "fine-tune state random bytes, resumed": Case(resume_after(write("state/finetune.state", RANDOM)), 0,
                                                  check=lambda here: whole_history(here / "run"), unchanged=False),
    "agent state empty": Case(resume_after(write("state/ddpg_state.pt", b"")), 2, "damaged"),
    "agent state random bytes": Case(resume_after(write("state/ddpg_state.pt", RANDOM)), 2, "damaged"),
    "config random bytes, resumed": Case(resume_after(write("config.json", RANDOM)), 2, "config.json"),
    "config not an object, resumed": Case(resume_after(write("config.json", "[1, 2]")), 2, "config.json"),
    # compare reads settings and results only: a damaged history is no reason to refuse
    "history random bytes, compared": Case(compare_damaged("history.csv", RANDOM), 0,
                                           check=lambda here: (here / "cmp" / "comparison.md").is_file() or
                                           pytest.fail("no comparison written"), unchanged=False),
    "config random bytes, compared": Case(compare_damaged("config.json", RANDOM), 2, "config.json"),
    "metrics random bytes, compared": Case(compare_damaged("metrics.json", RANDOM), 2, "metrics.json"),
    "run directory held by another process": Case(locked, 2, f"PID {os.getpid()}"),
    "resume of a directory that is no run": Case(lambda w, here: ["search", "--resume", str(here), "--quiet"], 2,
                                                 "config.json"),
    "resume with another budget": Case(resume_after(lambda run: None, "--budget", "30%flops"), 2,
                                       "--budget 30%flops (saved: 50%flops)"),
    "resume with fewer episodes": Case(resume_after(lambda run: None, "--episodes", "2"), 2,
                                       "--episodes 2 (saved: 3; it may only be raised)"),
    # --- models and weights
    "factory that raises": Case(lambda w, here: ["info", "--model", f"{MODULE}:raises"], 2,
                                "raised RuntimeError: the weights server is unreachable"),
    "factory that is missing": Case(lambda w, here: ["info", "--model", f"{MODULE}:nothing"], 2,
                                    "has no callable 'nothing'"),
    "garbage weights for a LUT": Case(lambda w, here: ((here / "g.pt").write_bytes(RANDOM),
                                                       ["lut", "build", "--model", "resnet20", "--weights",
                                                        str(here / "g.pt"), "--out", str(here / "l.json")])[1],
                                      2, "cannot load"),
    "missing weights": Case(lambda w, here: ["info", "--model", "resnet20", "--weights", str(here / "none.pt")], 2,
                            "not found"),
    "garbage weights": Case(lambda w, here: ((here / "g.pt").write_bytes(RANDOM),
                                             ["info", "--model", "resnet20", "--weights", str(here / "g.pt")])[1],
                            2, "cannot load"),
    # autoprune's exported program cannot be pruned again: one line names the file that can
    "a pruned .pt2 given to info": Case(lambda w, here: ["info", "--model", str(w["finished"] / "model.pt2")], 2,
                                        "use model.pt from the same run directory"),
    "a pruned .pt2 given to prune": Case(
        lambda w, here: ["prune", "--model", str(w["finished"] / "model.pt2"), "--data", "synthetic", "--val-size",
                         "400", "--policy", "uniform:0.5", "--out", str(here / "again.pt2")], 2,
        "use model.pt from the same run directory"),
    "the run's trainable model given to info": Case(lambda w, here: ["info", "--model", str(w["finished"] / "model.pt"),
                                                                     "--data", "synthetic"], 0),
    # --- policies
    "policy with a boolean": Case(policy_file('{"conv1": true}'), 2, "conv1"),
    "policy that is no JSON": Case(policy_file("{conv1: 0.5"), 2, "policy"),
    # --- latency tables
    "LUT cell NaN": Case(lut_with(lambda d: first_cell(d).__setitem__(0, "NaN")), 2, "not a finite number"),
    "LUT latency negative": Case(lut_with(lambda d: first_cell(d).__setitem__(0, -0.5)), 2, "non-negative"),
    "LUT scale negative": Case(lut_with(lambda d: d["calibration"].__setitem__("scale", -1.0)), 2, "must be positive"),
    "LUT random bytes": Case(lambda w, here: ((here / "l.json").write_bytes(RANDOM),
                                              ["info", "--model", str(w["checkpoint"]), "--lut", str(here / "l.json")])[1],
                             2, "l.json"),
    "LUT backend not known": Case(lambda w, here: ["lut", "build", "--model", str(w["checkpoint"]), "--backend", "tvm",
                                                   "--out", str(here / "x.json")], 2, "unknown backend"),
    "LUT keep range outside (0, 1]": Case(lambda w, here: ["lut", "validate", "--lut", str(w["lut"]), "--model",
                                                           str(w["checkpoint"]), "--keep-range", "0.5,2"], 2,
                                          "--keep-range"),
    # --- numbers out of range
    "lut build --channel-step 0": Case(lambda w, here: ["lut", "build", "--channel-step", "0"], 2, "--channel-step"),
    "lut build --threads 0": Case(lambda w, here: ["lut", "build", "--threads", "0"], 2, "--threads"),
    "lut build --batch 0": Case(lambda w, here: ["lut", "build", "--batch", "0"], 2, "--batch"),
    "train --lr -1": Case(lambda w, here: ["train", "--lr", "-1", "--out", str(here / "n.pt")], 2, "--lr"),
    "train --epochs 0": Case(lambda w, here: ["train", "--epochs", "0", "--out", str(here / "n.pt")], 2, "--epochs"),
    "train --epochs -2": Case(lambda w, here: ["train", "--epochs", "-2", "--out", str(here / "n.pt")], 2,
                              "--epochs"),
    "search --val-images -5": Case(search("--val-images", "-5"), 2, "--val-images"),
    "search --val-images 0": Case(search("--val-images", "0"), 2, "--val-images"),
    "search --bn-batches -1": Case(search("--bn-batches", "-1"), 2, "--bn-batches"),
    "search --finetune-lr nan": Case(search("--finetune-lr", "nan"), 2, "--finetune-lr"),
    "search budget malformed": Case(search("--budget", "half"), 2, "accepted forms"),
    "search budget unreachable": Case(search("--budget", "1%flops"), 2, "unreachable"),
    # --- where things go
    "search --out an existing file": Case(an_existing_file, 2, "is not a directory"),
    "search --out unwritable": Case(lambda w, here: search()(w, here)[:-1] + ["/proc/autoprune-run"], 2,
                                    "cannot write"),
    "train --out unwritable": Case(lambda w, here: ["train", "--data", "synthetic", "--epochs", "1", "--out",
                                                    "/proc/autoprune/net.pt"], 2, "cannot write"),
    "train --out a directory": Case(lambda w, here: ["train", "--data", "synthetic", "--epochs", "1", "--out",
                                                     str(here)], 2, "is a directory"),
    "prune --out unwritable": Case(lambda w, here: ["prune", "--model", str(w["checkpoint"]), "--val-size", "400",
                                                    "--policy", "uniform:0.5", "--out", "/proc/autoprune/p.pt2"], 2,
                                   "cannot write"),
    "lut build --out unwritable": Case(lambda w, here: ["lut", "build", "--model", str(w["checkpoint"]), "--out",
                                                        "/proc/autoprune/lut.json"], 2, "cannot write"),
    "compare --out unwritable": Case(lambda w, here: ["compare", str(w["finished"]), "--out", "/proc/autoprune/cmp"],
                                     2, "cannot write"),
    "compare --out an existing file": Case(lambda w, here: ((here / "taken").write_text("mine"),
                                                            ["compare", str(w["finished"]), "--out",
                                                             str(here / "taken")])[1], 2, "is not a directory"),
    "lut validate --out unwritable": Case(lambda w, here: ["lut", "validate", "--lut", str(w["lut"]), "--model",
                                                           str(w["checkpoint"]), "--out", "/proc/autoprune/v.json"],
                                          2, "cannot write"),
    # --- data and devices
    "data factory that returns a number": Case(
        lambda w, here: ["train", "--data", "tests.autoprune.user_data:not_callable", "--out", str(here / "n.pt")], 2,
        "--data"),
    "image folder without images": Case(
        lambda w, here: ((here / "imgs" / "train" / "a").mkdir(parents=True),
                         ["train", "--data", str(here / "imgs"), "--out", str(here / "n.pt")])[1], 2, "holds no images"),
    "a device this machine lacks": Case(search("--device", "cuda:7"), 2, "--device"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_bad_input_is_one_line_and_leaves_nothing_half_written(name, world, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    here = tmp_path / "case"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("AUTOPRUNE_LOG_DIR", str(tmp_path / "crashes"))
    if name == "a device this machine lacks":
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    argv = case.prepare(world, here)
    before = snapshot(here)
    try:
        try:
            code = main(argv)
        except SystemExit as exited:  # argparse's own refusals
            code = exited.code
        after = snapshot(here)
    finally:
        for holder in locked.holders:
            holder.release()
        locked.holders.clear()
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "crashes").exists(), err
    assert code == case.code, (name, err)
    if case.code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and case.message in lines[0], (name, err)
    if case.code != 0 and case.unchanged:
        assert after == before, name
    if case.check is not None:
        case.check(here)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}
