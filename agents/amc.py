"""The AMC search as a resumable run: DDPG on the pruning environment, one row per episode.

After every episode the best policy so far, the history and the agent's full state
(networks, optimisers, replay buffer, noise, counters, random generators) are written
atomically into the run directory, in that order, so a killed search continues from its
last finished episode and ends exactly as it would have without the interruption. The
writes run on a background thread while the next episode is scored (each ends in an
fsync); the agent's state is a snapshot (`agent_state` copies it), so later updates cannot
leak into it.

After the episodes, the final selection (not AMC's) fine-tunes the few best distinct
policies briefly and keeps the one that scores best afterwards: before fine-tuning, at
tight budgets, every candidate scores near chance and the search's own ranking says
little about what fine-tuning will recover. Each finalist's score is written as it
finishes, so a killed selection resumes with the next finalist.
"""

from __future__ import annotations

import json
import time

import torch
from tqdm.auto import tqdm

from agents.ddpg import AMCConfig, EpisodeTracker, agent_state, make_agent, restore_agent_state
from autoprune.errors import AutopruneError
from autoprune.evaluation import PolicyEvaluator
from autoprune.io import BackgroundWriter, atomic_torch_save, atomic_write_json
from autoprune.runs import Run
from autoprune.train import TrainConfig, evaluate, train

STATE_FILE = "ddpg_state.pt"
FINALISTS_FILE = "finalists.json"
OLD_STATE_FILE = "ddpg.zip"  # SB3 archive of earlier versions, without the random generators


def _save_state(run: Run, state: dict) -> None:
    run.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, run.state_dir / STATE_FILE)


def _write_episode(run: Run, best: dict | None, history: list[dict], state: dict) -> None:
    """One finished episode's files; the state last, since it marks the episode as done."""
    if best is not None:
        run.write_best_policy(best["policy"], episode=best["episode"], reward=best["reward"],
                              accuracy=best["accuracy"], cost_ratio=best["cost_ratio"])
    run.write_history(history)
    _save_state(run, state)


def final_selection(run: Run, evaluator: PolicyEvaluator, finalists: list[dict], config: AMCConfig, seed: int = 0,
                    progress: bool = True) -> list[dict]:
    """Fine-tune each finalist for `config.finalist_steps` SGD steps and score it on the
    whole validation split; returns one row per finalist, in the order given.

    Every finalist sees the same batches (one seed), so they differ only in their
    channels. The rows go to `state/finalists.json` after each finalist.
    """
    path = run.state_dir / FINALISTS_FILE
    episodes = [finalist["episode"] for finalist in finalists]
    rows: list[dict] = []
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("episodes") == episodes and saved.get("steps") == config.finalist_steps:
            rows = saved["rows"]
    tuning = TrainConfig(epochs=1, batch_size=64, lr=config.finalist_lr, seed=seed,
                         max_steps_per_epoch=config.finalist_steps)
    bar = tqdm(total=len(finalists), initial=len(rows), desc="final selection", unit="policy", disable=not progress)
    for finalist in finalists[len(rows):]:
        started = time.perf_counter()
        model = evaluator.pruner.prune(finalist["policy"])
        train(model, evaluator.data, tuning, progress=False, eval_split="")
        accuracy = evaluate(model, evaluator.data, "val")["accuracy"]
        rows.append({"episode": finalist["episode"], "reward": finalist["reward"],
                     "search_accuracy": finalist["accuracy"], "tuned_accuracy": accuracy,
                     "seconds": round(time.perf_counter() - started, 3)})
        run.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"episodes": episodes, "steps": config.finalist_steps, "rows": rows})
        bar.update(1)
        bar.set_postfix(best_tuned=f"{max(row['tuned_accuracy'] for row in rows):.4f}")
    bar.close()
    return rows


def run_amc(run: Run, env, config: AMCConfig, seed: int = 0, progress: bool = True) -> dict:
    """Search with AMC's DDPG for `config.episodes` episodes (continuing a killed run), then
    pick among the finalists (`config.finalists`); returns the chosen episode's record,
    with the finalists' rows and the selection's seconds when there was a selection."""
    history = run.read_history()
    groups = len(env.unwrapped.groups)
    state = run.state_dir
    agent, noise = make_agent(env, config, seed)
    tracker = EpisodeTracker(noise, config.warmup_episodes, keep=max(1, config.finalists))
    if (state / OLD_STATE_FILE).is_file() and not (state / STATE_FILE).is_file():
        raise AutopruneError(f"{run.path} was written by an earlier autoprune whose AMC state cannot be resumed "
                             "exactly; start a new search")
    if (state / STATE_FILE).is_file():
        restore_agent_state(agent, tracker, torch.load(state / STATE_FILE, map_location="cpu", weights_only=False))
    # rows written after the last saved state (or before the first) are redone
    history = history[:tracker.episode]
    remaining = config.episodes - tracker.episode
    bar = tqdm(total=config.episodes, initial=tracker.episode, desc="AMC search", unit="episode",
               disable=not progress)
    started = [time.perf_counter()]
    base = env.unwrapped.base_costs()
    writer = BackgroundWriter()

    def on_episode(record: dict) -> None:
        now = time.perf_counter()
        ratios = {"flops_ratio": record["flops"] / base["flops"], "params_ratio": record["params"] / base["params"],
                  "latency_ratio": (record["latency_ms"] / base["latency_ms"]
                                    if record["latency_ms"] is not None else None)}
        history.append({key: record[key] for key in ("episode", "reward", "accuracy")} | ratios
                       | {key: record[key] for key in ("cost_ratio", "noise_sigma", "warmup")}
                       | {"seconds": round(now - started[0], 3)})
        started[0] = now
        improved = tracker.best is record  # the tracker made this episode the best before calling here
        writer.submit(_write_episode, run, record if improved else None, list(history),
                      agent_state(agent, tracker))
        bar.update(1)
        best = tracker.best or record
        bar.set_postfix(best_reward=f"{best['reward']:.4f}", best_acc=f"{best['accuracy']:.4f}")

    tracker.on_episode = on_episode
    with writer:
        if remaining > 0:
            agent.learn(total_timesteps=remaining * groups, callback=tracker, reset_num_timesteps=False)
    bar.close()
    if len(tracker.top) < 2:
        return tracker.best
    started = time.perf_counter()
    rows = final_selection(run, env.unwrapped.evaluator, tracker.top, config, seed=seed, progress=progress)
    # the first of equals wins, and the finalists come best reward first
    chosen_row = max(rows, key=lambda row: row["tuned_accuracy"])
    chosen = next(finalist for finalist in tracker.top if finalist["episode"] == chosen_row["episode"])
    run.write_best_policy(chosen["policy"], episode=chosen["episode"], reward=chosen["reward"],
                          accuracy=chosen["accuracy"], cost_ratio=chosen["cost_ratio"],
                          tuned_accuracy=chosen_row["tuned_accuracy"], finalist_steps=config.finalist_steps,
                          search_best_episode=tracker.best["episode"])
    return {**chosen, "tuned_accuracy": chosen_row["tuned_accuracy"], "search_best_episode": tracker.best["episode"],
            "finalists": rows, "selection_seconds": time.perf_counter() - started}
