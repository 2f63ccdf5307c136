"""The AMC search as a resumable run: DDPG on the pruning environment, one row per episode.

After every episode the history, the best policy so far and the agent's full state
(networks, optimisers, replay buffer, noise, episode count) are written atomically
into the run directory, so a killed search continues from its last finished episode.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from agents.ddpg import AMCConfig, AMCDDPG, EpisodeTracker, make_agent
from autoprune.io import atomic_write_json
from autoprune.runs import Run

AGENT_FILE = "ddpg.zip"
BUFFER_FILE = "replay_buffer.pkl"
TRACKER_FILE = "tracker.json"


def _save_state(run: Run, agent: AMCDDPG, tracker: EpisodeTracker) -> None:
    state = run.state_dir
    state.mkdir(parents=True, exist_ok=True)
    for name, save in ((AGENT_FILE, agent.save), (BUFFER_FILE, agent.save_replay_buffer)):
        tmp = state / f".{name}.tmp"
        save(str(tmp))
        produced = tmp if tmp.exists() else Path(str(tmp) + (".zip" if name.endswith(".zip") else ".pkl"))
        os.replace(produced, state / name)
    atomic_write_json(state / TRACKER_FILE, {"episode": tracker.episode, "best": tracker.best,
                                             "noise_sigma": tracker.noise.sigma,
                                             "noise_rng": tracker.noise.rng.bit_generator.state,
                                             "buffer_baseline": agent.replay_buffer.baseline})


def run_amc(run: Run, env, config: AMCConfig, seed: int = 0, progress: bool = True) -> dict:
    """Search with AMC's DDPG for `config.episodes` episodes (continuing a killed run)."""
    history = run.read_history()
    groups = len(env.unwrapped.groups)
    state = run.state_dir
    agent, noise = make_agent(env, config, seed)
    tracker = EpisodeTracker(noise, config.warmup_episodes)
    if (state / TRACKER_FILE).is_file() and (state / AGENT_FILE).is_file():
        saved = json.loads((state / TRACKER_FILE).read_text())
        agent = AMCDDPG.load(str(state / AGENT_FILE), env=env, device="cpu")
        agent.load_replay_buffer(str(state / BUFFER_FILE))
        agent.replay_buffer.baseline = saved["buffer_baseline"]
        agent.action_noise = noise
        noise.sigma = saved["noise_sigma"]
        noise.rng.bit_generator.state = saved["noise_rng"]
        tracker.episode, tracker.best = saved["episode"], saved["best"]
        history = history[:tracker.episode]  # rows written after the last saved state are redone
    remaining = config.episodes - tracker.episode
    bar = tqdm(total=config.episodes, initial=tracker.episode, desc="AMC search", unit="episode",
               disable=not progress)
    started = [time.perf_counter()]
    base = env.unwrapped.base_costs()

    def on_episode(record: dict) -> None:
        now = time.perf_counter()
        ratios = {"flops_ratio": record["flops"] / base["flops"], "params_ratio": record["params"] / base["params"],
                  "latency_ratio": (record["latency_ms"] / base["latency_ms"]
                                    if record["latency_ms"] is not None else None)}
        history.append({key: record[key] for key in ("episode", "reward", "accuracy")} | ratios
                       | {key: record[key] for key in ("cost_ratio", "noise_sigma", "warmup")}
                       | {"seconds": round(now - started[0], 3)})
        started[0] = now
        run.write_history(history)
        _save_state(run, agent, tracker)
        bar.update(1)
        best = tracker.best or record
        bar.set_postfix(best_reward=f"{best['reward']:.4f}", best_acc=f"{best['accuracy']:.4f}")

    def on_best(record: dict) -> None:
        run.write_best_policy(record["policy"], episode=record["episode"], reward=record["reward"],
                              accuracy=record["accuracy"], cost_ratio=record["cost_ratio"])

    tracker.on_episode, tracker.on_best = on_episode, on_best
    if remaining > 0:
        agent.learn(total_timesteps=remaining * groups, callback=tracker, reset_num_timesteps=False)
    bar.close()
    return tracker.best
