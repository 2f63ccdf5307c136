"""Run directories: everything a search produces, written so that a crash loses nothing.

    runs/<time>-<agent>-<budget>/
        config.json        what was asked for (model, data, budget, agent settings, seed)
        history.csv        one row per episode / iteration (rewritten atomically)
        best_policy.json   group -> keep ratio of the best candidate so far
        state/             the searcher's resume state (and the search time of past sessions)
        model.pt2          the pruned, fine-tuned network (loads without its class)
        metrics.json       final figures
        keep_ratios.png    per-group keep ratios of the best policy
        report.md          a short human-readable report
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import time
from pathlib import Path

from autoprune.errors import AutopruneError
from autoprune.io import WriterLock, atomic_write_bytes, atomic_write_json, atomic_write_text, check_output_dir

log = logging.getLogger(__name__)

CONFIG = "config.json"
HISTORY = "history.csv"
BEST_POLICY = "best_policy.json"
METRICS = "metrics.json"
SEARCH_TIME = "search_seconds.json"  # in state/
LOCK = ".lock"  # held by the process writing the run


def new_run_dir(root: str | os.PathLike, agent: str, budget_tag: str) -> Path:
    """A fresh directory name runs/<UTC time>-<agent>-<budget> (not yet created)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{stamp}-{agent}-{budget_tag}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{stamp}-{agent}-{budget_tag}-{suffix}"
    return path


def check_new_run_dir(path: Path) -> None:
    """Refuse a new run's directory that is a file, holds another run, or cannot be written
    (checked before any work is done, and again when the run is created)."""
    if path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        raise AutopruneError(f"{path} already exists and is not empty; resume the search there, or choose another "
                              "output directory")
    check_output_dir(path)


class Run:
    """One run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock: WriterLock | None = None
        self._clock: dict | None = None  # the search session being timed (start_search_clock)

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict) -> Run:
        """A new run directory, locked for this process."""
        run = cls(path)
        check_new_run_dir(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.lock = WriterLock(run.path / LOCK, f"run directory {run.path}")
        atomic_write_json(run.path / CONFIG, config)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike, *, write: bool = False) -> Run:
        """An existing run directory; `write` locks it for this process (to resume it)."""
        run = cls(path)
        if not (run.path / CONFIG).is_file():
            raise AutopruneError(f"{run.path} is not a run directory (no {CONFIG})")
        if write:
            run.lock = WriterLock(run.path / LOCK, f"run directory {run.path}")
        return run

    def release(self) -> None:
        """Give up the lock, if this process holds it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def config(self) -> dict:
        path = self.path / CONFIG
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AutopruneError(f"cannot read {path}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") \
                from None
        missing = [key for key in ("agent", "budget") if not isinstance(data, dict) or key not in data]
        if missing:
            raise AutopruneError(f"{path} is damaged: it holds no {' and no '.join(missing)}; a run directory's "
                                 "settings cannot be rebuilt, start a new search")
        return data

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def read_history(self) -> list[dict]:
        path = self.path / HISTORY
        if not path.is_file():
            return []
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise AutopruneError(f"{path} is not readable CSV ({type(exc).__name__})") from None

    def write_history(self, rows: list[dict]) -> None:
        if not rows:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / HISTORY, buffer.getvalue())
        self.tick_search_clock()

    def restore_history(self, saved: list[dict]) -> list[dict]:
        """The rows a searcher's saved state holds (the source of truth), with history.csv
        rebuilt from them when it is missing, cut, corrupt or different; rows on disk after
        them (written after the last saved state) are left to be redone."""
        rows = [dict(row) for row in saved]
        as_text = [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]
        try:
            on_disk = self.read_history()
        except AutopruneError:
            on_disk = None
        if on_disk is None or len(on_disk) < len(rows) or \
                [{k: row.get(k) for k in text} for row, text in zip(on_disk, as_text)] != as_text:
            log.warning("%s does not match the saved search state (missing, cut or changed); rebuilt it from the "
                        "state", self.path / HISTORY)
            self.write_history(rows)
        return rows

    def complete_history(self, count: int, required: tuple[str, ...]) -> list[dict]:
        """The first `count` rows of history.csv, for a state that does not hold them itself;
        refused if the file lacks or cuts any of them."""
        rows = self.read_history()
        bad = [i + 1 for i, row in enumerate(rows[:count]) if any(not row.get(k) for k in required)]
        if len(rows) < count or bad:
            raise AutopruneError(f"{self.path / HISTORY} lacks or cuts rows of the {count} the saved state has "
                                 f"finished{f' (row {bad[0]})' if bad else ''}, and this state cannot rebuild them; "
                                 "restore the file or start a new search")
        return rows[:count]

    def write_best_policy(self, policy: dict, **extra) -> None:
        atomic_write_json(self.path / BEST_POLICY, {"policy": policy, **extra})

    def read_best_policy(self) -> dict | None:
        path = self.path / BEST_POLICY
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AutopruneError(f"{path} is not readable JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or not isinstance(data.get("policy"), dict):
            raise AutopruneError(f"{path} holds no policy")
        return data

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.path / METRICS, metrics)

    @property
    def finished(self) -> bool:
        """True once the metrics are written, the last thing a search does."""
        return (self.path / METRICS).is_file()

    def read_metrics(self) -> dict | None:
        path = self.path / METRICS
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AutopruneError(f"cannot read {path}: {type(exc).__name__}") from None

    def start_search_clock(self, evaluator=None) -> float:
        """Start timing a search session and return the search time of the earlier ones.

        While the clock runs, every history write records the total so far (the earlier
        sessions' and this one's) with the evaluator's counters (evaluations, seconds and
        their split), so that a search killed and resumed reports its whole time and what it
        was spent on, not only its last session's: as far as the last row written, whatever
        the searcher saves of its own. The earlier sessions' counters are added to the
        evaluator's."""
        saved = self._read_search_time(self.state_dir / SEARCH_TIME)
        if evaluator is not None and isinstance(saved.get("evaluator"), dict):
            earlier = saved["evaluator"]
            try:
                evaluations, seconds = int(earlier["evaluations"]), float(earlier["seconds"])
                timings = {str(k): float(v) for k, v in earlier["timings"].items()}
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("the evaluator's counters in %s are damaged; they count this session only",
                            self.state_dir / SEARCH_TIME)
            else:
                evaluator.evaluations += evaluations
                evaluator.seconds += seconds
                for key, value in timings.items():
                    evaluator.timings[key] = evaluator.timings.get(key, 0.0) + value
        self._clock = {"started": time.perf_counter(), "before": float(saved.get("seconds", 0.0)),
                       "evaluator": evaluator}
        return self._clock["before"]

    def tick_search_clock(self) -> float | None:
        """Record the running search's total time so far (None when no clock runs)."""
        clock = self._clock
        if clock is None:
            return None
        total = clock["before"] + time.perf_counter() - clock["started"]
        record: dict = {"seconds": total}
        evaluator = clock["evaluator"]
        if evaluator is not None:
            record["evaluator"] = {"evaluations": evaluator.evaluations, "seconds": evaluator.seconds,
                                   "timings": dict(evaluator.timings)}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_dir / SEARCH_TIME, record)
        return total

    def stop_search_clock(self) -> float:
        """Stop the clock; the search's total time, all sessions."""
        total = self.tick_search_clock()
        self._clock = None
        return 0.0 if total is None else total

    def raise_search_seconds(self, seconds: float) -> None:
        """Make the run's search time at least `seconds` (what a searcher's saved state says
        its earlier sessions spent, killed ones included)."""
        if self._clock is not None:
            elapsed = time.perf_counter() - self._clock["started"]
            self._clock["before"] = max(self._clock["before"], seconds - elapsed)
            self.tick_search_clock()
            return
        path = self.state_dir / SEARCH_TIME
        saved = self._read_search_time(path)
        if seconds > float(saved.get("seconds", 0.0)):
            atomic_write_json(path, {**saved, "seconds": seconds})

    @staticmethod
    def _read_search_time(path: Path) -> dict:
        """The search time recorded so far ({"seconds": 0} where none is). A damaged record
        counts as none: the searchers' saved states carry their own time, which raises it
        again."""
        if not path.is_file():
            return {"seconds": 0.0}
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return {**saved, "seconds": float(saved["seconds"])}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is damaged (%s); the search time is taken from the searcher's saved state", path,
                        type(exc).__name__)
            return {"seconds": 0.0}

    def plot_keep_ratios(self, policy: dict, channels: dict[str, int], title: str) -> Path:
        """Bar chart of the keep ratio of every group (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(policy)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.6))
        ax.bar(range(len(names)), [policy[n] for n in names], color="#4c72b0")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{n} ({channels[n]})" for n in names], rotation=75, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("keep ratio")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=120, format="png")
        plt.close(fig)
        path = self.path / "keep_ratios.png"
        atomic_write_bytes(path, buffer.getvalue())
        return path
