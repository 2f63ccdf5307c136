import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import autoprune.envs
from autoprune.budgets import parse_budget
from autoprune.costs import count_cost
from autoprune.errors import AutopruneError
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.pruning import describe_network
from autoprune.envs.channel_pruning import OBSERVATION_FEATURES, REWARDS, ChannelPruningEnv

FAST = EvaluatorConfig(bn_batches=2, bn_batch_size=32, val_images=64)


@pytest.fixture(scope="module")
def evaluator(trained_tiny, synthetic_data):
    return PolicyEvaluator(trained_tiny, synthetic_data, FAST)


def run_episode(env, actions):
    obs, _ = env.reset(seed=0)
    for t in range(len(env.groups)):
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(np.array([actions[t]], dtype=np.float32))
        assert not truncated and terminated == (t == len(env.groups) - 1)
    return reward, info


def test_passes_gymnasium_and_sb3_checkers_without_warnings(evaluator):
    env = ChannelPruningEnv(evaluator, parse_budget("50%flops"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=True)


def test_registered_with_a_versioned_id(evaluator):
    env = gym.make(autoprune.envs.ENV_ID, evaluator=evaluator, budget=parse_budget("50%flops"))
    assert isinstance(env.unwrapped, ChannelPruningEnv)
    assert env.observation_space.shape == (len(OBSERVATION_FEATURES),) == (13,)


def adversarial_sequences(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.ones(n), -np.ones(n), np.r_[np.ones(n // 2), -np.ones(n - n // 2)],
            np.r_[-np.ones(n // 2), np.ones(n - n // 2)], *(rng.uniform(-1, 1, n) for _ in range(4))]


@pytest.mark.parametrize("budget", ["30%flops", "50%flops", "40%params"])
def test_every_episode_ends_inside_the_budget(evaluator, budget):
    env = ChannelPruningEnv(evaluator, parse_budget(budget))
    for actions in adversarial_sequences(len(env.groups)):
        _, info = run_episode(env, actions)
        assert info["cost_ratio"] <= parse_budget(budget).fraction + 1e-9
        # the environment's accounting equals what is counted on the physically pruned network
        pruned = evaluator.pruner.prune(info["policy"])
        counted = count_cost(describe_network(pruned, (1, 28, 28)))
        assert (counted.flops, counted.params) == (info["flops"], info["params"])


@pytest.mark.parametrize("budget", ["30%flops", "50%flops", "40%params"])
def test_every_episode_uses_at_least_fill_of_the_budget(evaluator, budget):
    fraction = parse_budget(budget).fraction
    env = ChannelPruningEnv(evaluator, parse_budget(budget), fill=0.9)
    for actions in adversarial_sequences(len(env.groups)):
        _, info = run_episode(env, actions)
        assert 0.9 * fraction - 1e-9 <= info["cost_ratio"] <= fraction + 1e-9, actions
    # without the bound, pruning every group hardest keeps far less than the budget allows
    _, info = run_episode(ChannelPruningEnv(evaluator, parse_budget(budget), fill=0.0), -np.ones(len(env.groups)))
    assert info["cost_ratio"] < 0.9 * fraction


def test_fill_bound_yields_to_the_budget(evaluator):
    # fill 1 asks for the exact budget, which channel steps rarely allow: the budget still holds
    env = ChannelPruningEnv(evaluator, parse_budget("50%flops"), fill=1.0)
    for actions in adversarial_sequences(len(env.groups), seed=1):
        _, info = run_episode(env, actions)
        assert info["cost_ratio"] <= 0.5 + 1e-9


def test_latency_budget_is_met_through_the_lut(evaluator, formula_lut):
    env = ChannelPruningEnv(evaluator, parse_budget("60%latency"), lut=formula_lut, reward="acc_latency")
    for actions in (np.ones(len(env.groups)), np.random.default_rng(1).uniform(-1, 1, len(env.groups))):
        reward, info = run_episode(env, actions)
        assert info["cost_ratio"] <= 0.6 + 1e-9
        assert info["latency_ms"] == pytest.approx(formula_lut.predict_ms(env.description, info["channels"]))
        assert info["cost_ratio"] == pytest.approx(info["latency_ms"] / env.base_value)
        assert reward == pytest.approx(REWARDS["acc_latency"](env_result(info)))


def env_result(info):
    from autoprune.envs.channel_pruning import EpisodeResult

    return EpisodeResult(accuracy=info["accuracy"], flops=info["flops"], params=info["params"],
                         latency_ms=info["latency_ms"])


def test_same_seed_same_episode(evaluator):
    env = ChannelPruningEnv(evaluator, parse_budget("50%flops"), reward="acc_flops")
    actions = np.random.default_rng(3).uniform(-1, 1, len(env.groups))
    first, second = run_episode(env, actions), run_episode(env, actions)
    assert first == second


def test_unreachable_budget_and_bad_arguments(evaluator):
    with pytest.raises(AutopruneError, match="unreachable"):
        ChannelPruningEnv(evaluator, parse_budget("3%flops"))
    with pytest.raises(AutopruneError, match="unknown reward"):
        ChannelPruningEnv(evaluator, parse_budget("50%flops"), reward="speed")
    with pytest.raises(AutopruneError, match="needs a latency table"):
        ChannelPruningEnv(evaluator, parse_budget("50%latency"))
    with pytest.raises(AutopruneError, match="fill -0.1 must be in"):
        ChannelPruningEnv(evaluator, parse_budget("50%flops"), fill=-0.1)


def test_under_a_latency_budget_the_shares_are_of_latency_not_flops(evaluator, formula_lut):
    """v1: the group's share, the removed share and the rest are the budget's own resource."""
    flops_env = ChannelPruningEnv(evaluator, parse_budget("50%flops"), lut=formula_lut)
    latency_env = ChannelPruningEnv(evaluator, parse_budget("60%latency"), lut=formula_lut)
    share = OBSERVATION_FEATURES.index("cost")
    base = latency_env.base_value
    for t, group in enumerate(latency_env.groups):
        floor = latency_env._floor[t]
        saved = base - formula_lut.predict_ms(latency_env.description, {**latency_env._full, group.name: floor})
        assert latency_env._static[t, share] == pytest.approx(saved / base)
    # the formula LUT charges a fixed 10 µs per layer: latency shares differ from FLOPs shares
    assert not np.allclose(latency_env._static[:, share], flops_env._static[:, share])
    obs, _ = latency_env.reset(seed=0)
    rest = OBSERVATION_FEATURES.index("rest")
    assert obs[rest] == pytest.approx(min(1.0, latency_env._static[1:, share].sum()), rel=1e-5)


def test_feasible_mapping_spends_the_whole_action_range_between_the_bounds(evaluator, formula_lut):
    env = ChannelPruningEnv(evaluator, parse_budget("45%latency"), lut=formula_lut, lower_bound=0.1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        env.reset(seed=0)
        for t in range(len(env.groups)):
            low, high = env.count_range(t)
            assert low <= high
            assert env.action_to_count(t, -1.0) == low and env.action_to_count(t, 1.0) == high
            counts = [env.action_to_count(t, a) for a in np.linspace(-1, 1, 9)]
            assert counts == sorted(counts) and all(low <= c <= high for c in counts)
            obs, _, _, _, info = env.step(np.array([rng.uniform(-1, 1)], dtype=np.float32))
            kept = env._kept[env.groups[t].name]
            if high > low:  # the effective action gives back the count it took effect as
                assert env.action_to_count(t, info["effective_action"]) == kept
    # absolute (AMC's) mapping: at a tight budget most of the range is clipped to one count
    absolute = ChannelPruningEnv(evaluator, parse_budget("45%latency"), lut=formula_lut, lower_bound=0.1,
                                 action_mapping="absolute")
    absolute.reset(seed=0)
    env.reset(seed=0)
    assert env.count_range(0) == absolute.count_range(0)
    feasible_counts = {env.action_to_count(0, a) for a in np.linspace(-1, 1, 21)}
    absolute_counts = {absolute.action_to_count(0, a) for a in np.linspace(-1, 1, 21)}
    assert len(feasible_counts) >= len(absolute_counts)
    with pytest.raises(AutopruneError, match="action mapping"):
        ChannelPruningEnv(evaluator, parse_budget("50%flops"), action_mapping="sideways")


def test_centred_mapping_where_the_budget_no_longer_holds_takes_the_fewest_channels(evaluator, formula_lut):
    """A latency table that is not monotone can leave an episode where even every later group
    at its floor misses the budget; the centred mapping's centre is then the group's floor
    instead of an error (a search stopped on "keep ratio 0.0 is outside (0, 1]")."""
    env = ChannelPruningEnv(evaluator, parse_budget("45%latency"), lut=formula_lut, lower_bound=0.1,
                            action_mapping="centred")
    env.reset(seed=0)
    env.constraint.fits = lambda kept: False
    low, high = env.count_range(0)
    assert env.even_count(0) == low == env._floor[0]
    assert env.action_to_count(0, 0.0) == low and env.action_to_count(0, 1.0) == high


@pytest.mark.parametrize("budget", ["50%flops", "45%latency"])
def test_centred_mapping_puts_action_zero_at_the_uniform_policy(evaluator, formula_lut, budget):
    from autoprune.budgets import Constraint
    from autoprune.costs import group_keep

    env = ChannelPruningEnv(evaluator, parse_budget(budget), lut=formula_lut, lower_bound=0.1,
                            action_mapping="centred")
    for actions in adversarial_sequences(len(env.groups))[1:4]:  # inside the budget and the fill bound, whatever it does
        _, info = run_episode(env, actions)
        assert 0.95 * parse_budget(budget).fraction - 1e-9 <= info["cost_ratio"] <= parse_budget(budget).fraction + 1e-9
    env.reset(seed=0)
    for t in range(len(env.groups)):
        low, high = env.count_range(t)
        counts = [env.action_to_count(t, a) for a in np.linspace(-1, 1, 9)]
        assert counts[0] == low and counts[-1] == high and counts == sorted(counts)
        assert env.action_to_count(t, 0.0) == min(max(env.even_count(t), low), high)
        _, _, _, _, info = env.step(np.array([0.0], dtype=np.float32))
        assert info["effective_action"] == 0.0 or high == low or \
            env._kept[env.groups[t].name] != min(max(env.even_count(t), low), high)
    # all zeros: the uniform policy at the budget, but for the rounding that earlier groups pass on
    ratio = Constraint(parse_budget(budget), evaluator.description, formula_lut).uniform_ratio()
    for g in env.groups:
        uniform = max(group_keep(g, ratio), group_keep(g, 0.1))
        assert abs(env._kept[g.name] - uniform) <= max(2, 0.1 * g.channels), (g.name, env._kept[g.name], uniform)
