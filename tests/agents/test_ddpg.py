import json

import numpy as np
import pytest

from agents.ddpg import AMCConfig, EpisodeRewardBuffer, TruncatedNormalNoise, make_agent, search_policy
from autoprune.budgets import parse_budget
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from envs.channel_pruning import ChannelPruningEnv

FAST = EvaluatorConfig(bn_batches=2, bn_batch_size=32, val_images=64)
SMALL = AMCConfig(episodes=6, warmup_episodes=3, finalists=3, finalist_steps=5)


@pytest.fixture(scope="module")
def env(trained_tiny, synthetic_data):
    return ChannelPruningEnv(PolicyEvaluator(trained_tiny, synthetic_data, FAST), parse_budget("50%flops"))


def test_configured_as_amc(env):
    agent, noise = make_agent(env, AMCConfig())
    assert agent.gamma == 1.0 and agent.tau == 0.01 and agent.batch_size == 64
    assert agent.learning_starts == 100 * len(env.groups)
    assert agent.replay_buffer.buffer_size == 100 * len(env.groups)  # the last 100 episodes
    sizes = [m.out_features for m in agent.actor.mu if hasattr(m, "out_features")]
    assert sizes[:2] == [300, 300]
    assert isinstance(agent.replay_buffer, EpisodeRewardBuffer) and noise.sigma == 0.5


def test_same_seed_same_best_policy(env):
    records = []
    first = search_policy(env, SMALL, seed=7, on_episode=records.append)
    second = search_policy(env, SMALL, seed=7)
    assert first["policy"] == second["policy"] and first["reward"] == second["reward"]
    assert [r["episode"] for r in records] == list(range(1, 7))
    assert [r["warmup"] for r in records] == [True] * 3 + [False] * 3
    sigmas = [r["noise_sigma"] for r in records[3:]]
    assert sigmas == pytest.approx([0.5, 0.5 * 0.95, 0.5 * 0.95 ** 2])
    assert all(r["cost_ratio"] <= 0.5 + 1e-9 for r in records)
    assert first["reward"] == max(r["reward"] for r in records)


def test_truncated_noise_stays_in_bounds():
    noise = TruncatedNormalNoise(0.5, 0.95, seed=0)
    draws = np.array([noise.sample_around(np.array([0.9]))[0] for _ in range(2000)])
    assert draws.min() >= -1 and draws.max() <= 1
    assert 0.2 < draws.mean() < 0.9  # pulled inwards by the bound, centred near the action


def test_final_reward_is_credited_to_every_step_and_the_baseline_is_subtracted_when_sampled(env):
    agent, _ = make_agent(env, SMALL)
    buffer = agent.replay_buffer
    obs = np.zeros((1, 11), np.float32)
    for episode_reward in (2.0, 4.0):
        for step in range(3):
            done = step == 2
            buffer.add(obs, obs, np.zeros((1, 1), np.float32), np.array([episode_reward if done else 0.0]),
                       np.array([done]), [{"effective_action": -0.5}])
    assert buffer.rewards[:buffer.pos, 0].tolist() == [2.0] * 3 + [4.0] * 3  # stored as the episode ended
    assert buffer.actions[:buffer.pos, 0, 0].tolist() == [-0.5] * 6  # the action that took effect
    first = buffer.sample(64)
    mean = float(first.rewards.mean()) + buffer.baseline  # the raw batch mean
    assert buffer.baseline == pytest.approx(mean)  # the first batch sets the baseline
    second = buffer.sample(64)
    raw = second.rewards + buffer.baseline
    assert buffer.baseline == pytest.approx(0.5 * mean + 0.5 * float(raw.mean()))
    assert set(raw.flatten().tolist()) <= {2.0, 4.0}


def test_killed_search_resumes_from_its_last_episode(env, tmp_path, monkeypatch):
    import agents.amc as amc
    from autoprune.runs import Run

    reference = Run.create(tmp_path / "ref", {"agent": "ddpg"})
    amc.run_amc(reference, env, SMALL, seed=3, progress=False)

    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    real_save = amc._save_state
    calls = {"n": 0}

    def save_then_die(*args):
        real_save(*args)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(amc, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        amc.run_amc(run, env, SMALL, seed=3, progress=False)
    assert [int(r["episode"]) for r in run.read_history()] == [1, 2, 3, 4]
    monkeypatch.setattr(amc, "_save_state", real_save)
    best = amc.run_amc(run, env, SMALL, seed=3, progress=False)
    rows = run.read_history()
    assert [int(r["episode"]) for r in rows] == list(range(1, 7))
    # the resumed search is the uninterrupted one, learning episodes included
    expected = reference.read_history()
    for key in ("reward", "accuracy", "noise_sigma"):
        assert [r[key] for r in rows] == [r[key] for r in expected]
    assert best["policy"] == reference.read_best_policy()["policy"]
    assert run.read_best_policy()["policy"] == best["policy"]


def test_final_selection_keeps_the_best_finalist_after_fine_tuning_and_resumes(env, tmp_path, monkeypatch):
    import agents.amc as amc
    from autoprune.runs import Run

    reference = Run.create(tmp_path / "ref", {"agent": "ddpg"})
    best = amc.run_amc(reference, env, SMALL, seed=5, progress=False)
    rows = best["finalists"]
    # three distinct policies, best search reward first; the chosen one scored best after tuning
    assert len(rows) == 3 and len({r["episode"] for r in rows}) == 3
    assert [r["reward"] for r in rows] == sorted((r["reward"] for r in rows), reverse=True)
    assert rows[0]["episode"] == best["search_best_episode"]
    assert best["tuned_accuracy"] == max(r["tuned_accuracy"] for r in rows)
    assert reference.read_best_policy()["episode"] == best["episode"]

    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    real_train = amc.train
    calls = {"n": 0}

    def train_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second finalist
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(amc, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        amc.run_amc(run, env, SMALL, seed=5, progress=False)
    assert len(json.loads((run.state_dir / amc.FINALISTS_FILE).read_text())["rows"]) == 1
    tuned = []
    monkeypatch.setattr(amc, "train", lambda *args, **kwargs: tuned.append(1) or real_train(*args, **kwargs))
    resumed = amc.run_amc(run, env, SMALL, seed=5, progress=False)
    assert len(tuned) == 2  # the finished finalist is not tuned again
    assert resumed["finalists"] == [{**r, "seconds": s["seconds"]} for r, s in zip(rows, resumed["finalists"])]
    assert resumed["policy"] == best["policy"]


def test_tracker_keeps_the_best_distinct_policies():
    from agents.ddpg import EpisodeTracker

    tracker = EpisodeTracker(TruncatedNormalNoise(0.5, 0.95), warmup_episodes=0, keep=2)
    for episode, (reward, policy) in enumerate([(0.1, "a"), (0.3, "b"), (0.3, "b"), (0.2, "c"), (0.3, "d")], 1):
        tracker._keep_top({"episode": episode, "reward": reward, "policy": {"g": policy}})
    # the repeat of "b" is not a second finalist; of equal rewards the earlier episode comes first
    assert [r["episode"] for r in tracker.top] == [2, 5]
