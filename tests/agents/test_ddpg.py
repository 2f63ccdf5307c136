import numpy as np
import pytest

from autoprune.agents.ddpg import AMCConfig, EpisodeRewardBuffer, TruncatedNormalNoise, make_agent, search_policy
from autoprune.budgets import parse_budget
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.envs.channel_pruning import ChannelPruningEnv

FAST = EvaluatorConfig(bn_batches=2, bn_batch_size=32, val_images=64)
SMALL = AMCConfig(episodes=6, warmup_episodes=3)


@pytest.fixture(scope="module")
def env(trained_tiny, synthetic_data):
    return ChannelPruningEnv(PolicyEvaluator(trained_tiny, synthetic_data, FAST), parse_budget("50%flops"))


def test_configured_as_amc(env):
    agent, noise = make_agent(env, AMCConfig(episodes=400, warmup_episodes=100))  # AMC's counts
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
    obs = np.zeros((1, env.observation_space.shape[0]), np.float32)
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


def kill_after_four_episodes(run, env, monkeypatch, config: AMCConfig = SMALL) -> None:
    """Run a search into `run` that is killed once its fourth episode is saved; the saving is
    restored afterwards, for the resume."""
    import autoprune.agents.amc as amc

    real_save, calls = amc._save_state, {"n": 0}

    def save_then_die(*args):
        real_save(*args)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(amc, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        amc.run_amc(run, env, config, seed=3, progress=False)
    monkeypatch.setattr(amc, "_save_state", real_save)


def test_killed_search_resumes_from_its_last_episode(env, tmp_path, monkeypatch):
    import autoprune.agents.amc as amc
    from autoprune.runs import Run

    reference = Run.create(tmp_path / "ref", {"agent": "ddpg"})
    amc.run_amc(reference, env, SMALL, seed=3, progress=False)

    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    kill_after_four_episodes(run, env, monkeypatch)
    assert [int(r["episode"]) for r in run.read_history()] == [1, 2, 3, 4]
    best = amc.run_amc(run, env, SMALL, seed=3, progress=False)
    rows = run.read_history()
    assert [int(r["episode"]) for r in rows] == list(range(1, 7))
    # the resumed search is the uninterrupted one, learning episodes included
    expected = reference.read_history()
    for key in ("reward", "accuracy", "noise_sigma"):
        assert [r[key] for r in rows] == [r[key] for r in expected]
    assert best["policy"] == reference.read_best_policy()["policy"]
    assert run.read_best_policy()["policy"] == best["policy"]


def test_the_search_keeps_its_best_distinct_policies_across_a_resume(env, tmp_path, monkeypatch):
    import dataclasses

    import autoprune.agents.amc as amc
    from autoprune.runs import Run

    config = dataclasses.replace(SMALL, leaders=3)
    records = []
    best = search_policy(env, config, seed=3, on_episode=records.append)
    reference = Run.create(tmp_path / "ref", {"agent": "ddpg"})
    whole: dict = {}
    assert amc.run_amc(reference, env, config, seed=3, progress=False, restored=whole)["policy"] == best["policy"]
    leaders = whole["leaders"]
    distinct = {}
    for record in records:  # the first record of each policy, as the tracker keeps them
        distinct.setdefault(tuple(sorted(record["policy"].items())), record)
    expected = sorted(distinct.values(), key=lambda r: (-r["reward"], r["episode"]))[:3]
    assert [r["episode"] for r in leaders] == [r["episode"] for r in expected]
    assert leaders[0]["policy"] == best["policy"] and len(leaders) == min(3, len(distinct))

    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    kill_after_four_episodes(run, env, monkeypatch, config)
    resumed: dict = {}
    amc.run_amc(run, env, config, seed=3, progress=False, restored=resumed)
    assert [r["episode"] for r in resumed["leaders"]] == [r["episode"] for r in leaders]


def _cut_mid_line(path):
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # row 3 cut in the middle


@pytest.mark.parametrize("damage", [
    ("history cut mid-line", "history.csv", _cut_mid_line),
    ("history deleted", "history.csv", lambda p: p.unlink()),
    ("history random bytes", "history.csv", lambda p: p.write_bytes(bytes(range(256)) * 4)),
    ("best policy deleted", "best_policy.json", lambda p: p.unlink()),
    ("best policy random bytes", "best_policy.json", lambda p: p.write_bytes(b"\xff\xfe" * 50)),
], ids=lambda d: d[0])
def test_resume_rebuilds_damaged_run_files_from_the_state(env, tmp_path, monkeypatch, damage):
    import autoprune.agents.amc as amc
    from autoprune.runs import Run

    _, name, spoil = damage
    reference = Run.create(tmp_path / "ref", {"agent": "ddpg"})
    amc.run_amc(reference, env, SMALL, seed=3, progress=False)

    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    kill_after_four_episodes(run, env, monkeypatch)
    spoil(run.path / name)
    amc.run_amc(run, env, SMALL, seed=3, progress=False)
    rows, expected = run.read_history(), reference.read_history()
    assert [int(r["episode"]) for r in rows] == list(range(1, 7))
    for key in ("reward", "accuracy", "cost_ratio", "noise_sigma"):
        assert [r[key] for r in rows] == [r[key] for r in expected]
    assert run.read_best_policy()["policy"] == reference.read_best_policy()["policy"]


@pytest.mark.parametrize("content", [b"", b"\x80\x03garbage" * 10], ids=["empty", "random bytes"])
def test_a_damaged_state_is_refused_in_one_line(env, tmp_path, content):
    import autoprune.agents.amc as amc
    from autoprune.errors import AutopruneError
    from autoprune.runs import Run

    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    run.state_dir.mkdir()
    (run.state_dir / amc.STATE_FILE).write_bytes(content)
    with pytest.raises(AutopruneError, match="damaged") as info:
        amc.run_amc(run, env, SMALL, seed=3, progress=False)
    assert "\n" not in str(info.value)


def test_a_resumed_search_counts_the_work_of_every_session(trained_tiny, synthetic_data, tmp_path, monkeypatch):
    import autoprune.agents.amc as amc
    from autoprune.runs import SEARCH_TIME, Run

    def fresh_env():  # a new process: nothing cached, nothing counted
        return ChannelPruningEnv(PolicyEvaluator(trained_tiny, synthetic_data, FAST), parse_budget("50%flops"))

    reference_env = fresh_env()
    amc.run_amc(Run.create(tmp_path / "ref", {"agent": "ddpg"}), reference_env, SMALL, seed=3, progress=False)
    reference = reference_env.evaluator.evaluations

    run = Run.create(tmp_path / "run", {"agent": "ddpg"})
    first = fresh_env()
    kill_after_four_episodes(run, first, monkeypatch)
    killed_session = first.evaluator.evaluations
    second, restored = fresh_env(), {}
    amc.run_amc(run, second, SMALL, seed=3, progress=False, restored=restored)
    # the resumed process reports the killed session's evaluations and time as well as its own
    assert second.evaluator.evaluations >= reference > second.evaluator.evaluations - killed_session
    assert second.evaluator.timings["validation"] > first.evaluator.timings["validation"] * 0.5
    assert restored["agent_seconds"] > 0
    import json

    assert json.loads((run.state_dir / SEARCH_TIME).read_text())["seconds"] > 0


def test_noise_decays_to_its_floor_and_no_further():
    noise = TruncatedNormalNoise(0.5, 0.5, seed=0, floor=0.1)
    for _ in range(10):
        noise.step()
    assert noise.sigma == 0.1
    amc = TruncatedNormalNoise(0.5, 0.5, seed=0)  # AMC's schedule: no floor
    for _ in range(10):
        amc.step()
    assert amc.sigma == pytest.approx(0.5 * 0.5 ** 10)


def test_the_pre_activation_penalty_adds_its_gradient_and_nothing_else():
    import torch

    from autoprune.agents.ddpg import PreActivationPenalty

    x = torch.tensor([[2.0], [-1.0], [0.5], [4.0]], requires_grad=True)
    penalty = PreActivationPenalty(0.3)
    out = penalty(x)
    assert torch.equal(out, x)
    torch.tanh(out).sum().backward()
    expected = (1 - torch.tanh(x.detach()) ** 2) + 0.3 * x.detach() / 4  # d/dx [Σ tanh + 0.3/2 · mean x²]
    assert torch.allclose(x.grad, expected)
    with torch.no_grad():  # targets and actions: no gradient, nothing changes
        assert torch.equal(penalty(x), x)


def test_an_actor_with_the_penalty_stays_off_the_ends_of_its_tanh(env):
    import torch

    from autoprune.agents.ddpg import PreActivationPenalty

    agent, _ = make_agent(env, AMCConfig(episodes=6, warmup_episodes=3, actor_penalty=0.5))
    modules = list(agent.actor.mu)
    assert isinstance(modules[-2], PreActivationPenalty) and isinstance(modules[-1], torch.nn.Tanh)
    plain, _ = make_agent(env, AMCConfig(episodes=6, warmup_episodes=3))
    assert not any(isinstance(m, PreActivationPenalty) for m in plain.actor.mu)
    assert agent.actor.state_dict().keys() == plain.actor.state_dict().keys()  # saved states stay compatible
    # a critic that always prefers lower actions: without the penalty the actor runs into -1
    obs = torch.rand(64, env.observation_space.shape[0])
    finals = []
    for actor in (plain.actor, agent.actor):
        optimizer = torch.optim.Adam(actor.parameters(), lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            (actor(obs).mean()).backward()  # loss = -Q with Q = -action
            optimizer.step()
        with torch.no_grad():
            finals.append(float(actor(obs).mean()))
    assert finals[0] < -0.99 and -0.99 < finals[1] < -0.5
