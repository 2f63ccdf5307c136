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

import logging
import time

import torch
from tqdm.auto import tqdm

from autoprune.agents.ddpg import AMCConfig, EpisodeTracker, agent_state, make_agent, restore_agent_state
from autoprune.errors import AutopruneError
from autoprune.io import BackgroundWriter, atomic_torch_save, atomic_write_json
from autoprune.runs import BEST_POLICY, Run
from autoprune.pipeline.protocol import BaseSearcher, SearcherResult

log = logging.getLogger(__name__)

STATE_FILE = "ddpg_state.pt"
FINALISTS = "finalists.json"  # the search's best few, scored again (--finalists)
# per-episode diagnostics of the agent (EpisodeTracker.diagnostics), one column each in history.csv
TRACE_COLUMNS = ("actor_action", "actor_spread", "sampled_action", "effective_action", "critic_q_first")
OLD_STATE_FILE = "ddpg.zip"  # SB3 archive of earlier versions, without the random generators


def _save_state(run: Run, state: dict) -> None:
    run.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, run.state_dir / STATE_FILE)


def _write_best(run: Run, best: dict) -> None:
    run.write_best_policy(best["policy"], episode=best["episode"], reward=best["reward"],
                          accuracy=best["accuracy"], cost_ratio=best["cost_ratio"])


def _write_episode(run: Run, best: dict | None, history: list[dict], state: dict) -> None:
    """One finished episode's files; the state last, since it marks the episode as done. The
    state holds the history too: it is the source of truth the other files are rebuilt from."""
    if best is not None:
        _write_best(run, best)
    run.write_history(history)
    _save_state(run, {**state, "history": history})


def _check_files(run: Run, saved: dict, tracker: EpisodeTracker) -> list[dict]:
    """The history of the episodes the saved state has finished; history.csv and
    best_policy.json are rebuilt from the state where they are missing, cut or corrupt."""
    history = run.restore_history(saved["history"][:tracker.episode])
    best = tracker.best
    try:
        on_disk_best = run.read_best_policy()
    except AutopruneError:
        on_disk_best = None
    if best is not None and (on_disk_best is None or on_disk_best.get("policy") != best["policy"]):
        log.warning("%s does not match the saved search state; rebuilt it from the state", run.path / BEST_POLICY)
        _write_best(run, best)
    return history


def _load_state(path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, zip errors: all mean a damaged file
        raise AutopruneError(f"the search state {path} is damaged ({type(exc).__name__}); delete {path.parent} "
                             "to restart the search from scratch, keeping the other files for reference") from None
    if not isinstance(state, dict) or "tracker" not in state:
        raise AutopruneError(f"{path} is not an autoprune search state; delete {path.parent} to restart the search")
    return state


def _ledger(evaluator, agent_seconds: float, search_seconds: float) -> dict:
    """The search's running totals at the end of an episode (saved with the state, so that a
    resumed search reports the whole search, not only its last session)."""
    return {"evaluations": evaluator.evaluations, "timings": dict(evaluator.timings),
            "evaluator_seconds": evaluator.seconds, "agent_seconds": agent_seconds, "search_seconds": search_seconds}


def _restore_ledger(run: Run, evaluator, ledger: dict) -> None:
    evaluator.evaluations = int(ledger["evaluations"])
    evaluator.timings.update(ledger["timings"])
    evaluator.seconds = float(ledger["evaluator_seconds"])
    run.raise_search_seconds(float(ledger["search_seconds"]))


def run_amc(run: Run, env, config: AMCConfig, seed: int = 0, progress: bool = True,
            restored: dict | None = None) -> dict:
    """Search with AMC's DDPG for `config.episodes` episodes (continuing a killed run).

    On resume the evaluator's counters are put back to the saved totals; `restored`, if
    given, receives the agent's own seconds of the earlier sessions ("agent_seconds") and
    the `config.leaders` best distinct episodes of the whole search ("leaders", best first).
    """
    history: list[dict] = []
    groups = len(env.unwrapped.groups)
    evaluator = env.unwrapped.evaluator
    before = {"agent_seconds": 0.0, "search_seconds": 0.0}
    state = run.state_dir
    agent, noise = make_agent(env, config, seed)
    tracker = EpisodeTracker(noise, config.warmup_episodes, leaders=config.leaders)
    if (state / OLD_STATE_FILE).is_file() and not (state / STATE_FILE).is_file():
        raise AutopruneError(f"{run.path} was written by an earlier autoprune whose AMC state cannot be resumed "
                             "exactly; start a new search")
    if (state / STATE_FILE).is_file():
        saved = _load_state(state / STATE_FILE)
        dims = saved["buffer"]["observations"].shape[-1]
        if dims != env.observation_space.shape[0]:
            raise AutopruneError(f"{run.path} was searched with {dims} state features, this environment has "
                                 f"{env.observation_space.shape[0]} (an earlier version); start a new search")
        restore_agent_state(agent, tracker, saved)
        if "history" in saved:
            history = _check_files(run, saved, tracker)
        else:  # a state written before it held the history: the file must hold every finished episode
            history = run.complete_history(tracker.episode, ("episode", "reward", "accuracy", "cost_ratio"))
        if "ledger" in saved:
            _restore_ledger(run, evaluator, saved["ledger"])
            before = {key: float(saved["ledger"][key]) for key in before}
    if restored is not None:
        restored.update(agent_seconds=before["agent_seconds"])
    # rows written after the last saved state (or before the first) are redone
    history = history[:tracker.episode]
    remaining = config.episodes - tracker.episode
    bar = tqdm(total=config.episodes, initial=tracker.episode, desc="AMC search", unit="episode",
               disable=not progress)
    started = [time.perf_counter()]
    session_start, env_seconds_start = started[0], env.unwrapped.seconds
    base = env.unwrapped.base_costs()
    writer = BackgroundWriter()

    def on_episode(record: dict) -> None:
        now = time.perf_counter()
        ratios = {"flops_ratio": record["flops"] / base["flops"], "params_ratio": record["params"] / base["params"],
                  "latency_ratio": (record["latency_ms"] / base["latency_ms"]
                                    if record["latency_ms"] is not None else None)}
        history.append({key: record[key] for key in ("episode", "reward", "accuracy")} | ratios
                       | {key: record[key] for key in ("cost_ratio", "noise_sigma", "warmup")}
                       | {key: record.get(key) for key in TRACE_COLUMNS}
                       | {"seconds": round(now - started[0], 3)})
        started[0] = now
        improved = tracker.best is record  # the tracker made this episode the best before calling here
        session = now - session_start
        agent_seconds = before["agent_seconds"] + max(0.0, session - (env.unwrapped.seconds - env_seconds_start))
        ledger = _ledger(evaluator, agent_seconds, before["search_seconds"] + session)
        writer.submit(_write_episode, run, record if improved else None, list(history),
                      {**agent_state(agent, tracker), "ledger": ledger})
        bar.update(1)
        best = tracker.best or record
        bar.set_postfix(best_reward=f"{best['reward']:.4f}", best_acc=f"{best['accuracy']:.4f}")

    tracker.on_episode = on_episode
    with writer:
        if remaining > 0:
            agent.learn(total_timesteps=remaining * groups, callback=tracker, reset_num_timesteps=False)
    bar.close()
    if restored is not None:
        restored.update(leaders=list(tracker.leaders))
    return tracker.best


def pick_finalist(run: Run, evaluator, leaders: list[dict], steps: int) -> dict:
    """The leader with the highest validation accuracy after `steps` SGD steps (on the whole
    validation split; ties go to the search's order). Writes `finalists.json`: each
    leader's episode, search score and this score, and which was kept."""
    scores = evaluator.rescore([leader["policy"] for leader in leaders], steps)
    chosen = max(range(len(leaders)), key=lambda i: (scores[i], -i))
    atomic_write_json(run.path / FINALISTS, {
        "steps": steps, "chosen_episode": leaders[chosen]["episode"],
        "finalists": [{"episode": leader["episode"], "search_accuracy": leader["accuracy"], "reward": leader["reward"],
                       "accuracy": score, "cost_ratio": leader["cost_ratio"], "policy": leader["policy"]}
                      for leader, score in zip(leaders, scores)]})
    log.info("finalists after %d steps: %s; kept episode %d", steps,
             ", ".join(f"episode {leader['episode']} {score:.4f}" for leader, score in zip(leaders, scores)),
             leaders[chosen]["episode"])
    return {**leaders[chosen], "accuracy": scores[chosen], "search_accuracy": leaders[chosen]["accuracy"]}


class DDPGSearcher(BaseSearcher):
    """AMC: DDPG on the channel-pruning environment (`run_amc`)."""

    name = "ddpg"
    settings_read = ("episodes", "warmup_episodes", "reward", "fill", "action_mapping", "actor_penalty", "finalists",
                     "finalist_steps")
    ranks_candidates = True

    def check(self, settings) -> None:
        from autoprune.envs.channel_pruning import REWARDS

        if settings.reward not in REWARDS:
            raise AutopruneError(f"unknown reward {settings.reward!r}; choose one of {', '.join(REWARDS)}")

    def prepare(self, context) -> dict | None:
        from autoprune.envs.channel_pruning import ChannelPruningEnv

        super().prepare(context)
        s = context.settings
        self.env = ChannelPruningEnv(context.evaluator, context.constraint.budget, lut=context.lut,
                                     lower_bound=s.lower_bound, reward=s.reward, fill=s.fill,
                                     action_mapping=s.action_mapping)
        self.config = AMCConfig(episodes=s.episodes, warmup_episodes=s.warmup_episodes, actor_penalty=s.actor_penalty,
                                leaders=max(1, s.finalists), device=context.evaluator.config.device)
        return None

    def run(self, run: Run) -> SearcherResult:
        restored: dict = {}
        c = self.context
        evaluator = c.evaluator
        best = run_amc(run, self.env, self.config, seed=c.settings.seed, progress=c.progress, restored=restored)
        if len(restored["leaders"]) > 1:
            best = pick_finalist(run, evaluator, restored["leaders"], c.settings.finalist_steps)
        return self.result(best, dict(evaluator.timings))
