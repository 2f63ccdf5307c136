"""The AMC search as a resumable run: DDPG on the pruning environment, one row per episode.

After every episode the best policy so far, the history and the agent's full state
(networks, optimisers, replay buffer, noise, counters, random generators) are written
atomically into the run directory, in that order, so a killed search continues from its
last finished episode and ends exactly as it would have without the interruption. The
writes run on a background thread while the next episode is scored (each ends in an
fsync); the agent's state is a snapshot (`agent_state` copies it), so later updates cannot
leak into it.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from agents.ddpg import AMCConfig, EpisodeTracker, agent_state, make_agent, restore_agent_state
from autoprune.errors import AutopruneError
from autoprune.io import BackgroundWriter, atomic_torch_save
from autoprune.runs import Run

STATE_FILE = "ddpg_state.pt"
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


def run_amc(run: Run, env, config: AMCConfig, seed: int = 0, progress: bool = True) -> dict:
    """Search with AMC's DDPG for `config.episodes` episodes (continuing a killed run)."""
    history = run.read_history()
    groups = len(env.unwrapped.groups)
    state = run.state_dir
    agent, noise = make_agent(env, config, seed)
    tracker = EpisodeTracker(noise, config.warmup_episodes)
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
    return tracker.best
