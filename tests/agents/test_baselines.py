import json

import numpy as np
import pytest

from autoprune.agents.baselines import (choose_threshold, policy_for_threshold, run_random, run_sensitivity, run_uniform,
                              sensitivity_grid)
from autoprune.budgets import check_budget, parse_budget
from autoprune.costs import channels_to_keep, uniform_policy
from autoprune.errors import AutopruneError
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.runs import Run

FAST = EvaluatorConfig(bn_batches=2, bn_batch_size=32, val_images=64)
BUDGET = parse_budget("50%flops")


@pytest.fixture(scope="module")
def evaluator(trained_tiny, synthetic_data):
    return PolicyEvaluator(trained_tiny, synthetic_data, FAST)


def new_run(path) -> Run:
    return Run.create(path, {"agent": "test"})


class Interrupt(Exception):
    """Stands in for a kill in the middle of a search."""


def interrupt_after(monkeypatch, evaluator, calls: int) -> list:
    """Make evaluator.accuracy raise on call `calls` + 1; returns the list of policies it was asked for."""
    seen = []
    original = type(evaluator).accuracy

    def accuracy(policy):
        if len(seen) >= calls:
            raise Interrupt
        seen.append(dict(policy))
        return original(evaluator, policy)

    monkeypatch.setattr(evaluator, "accuracy", accuracy)
    return seen


def rows_without_time(run: Run) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in run.read_history()]


def test_uniform_meets_the_budget_with_the_least_slack_of_any_uniform_ratio(evaluator, tmp_path):
    run = new_run(tmp_path / "uniform")
    result = run_uniform(run, evaluator, BUDGET, progress=False)
    description = evaluator.description
    chosen = check_budget(BUDGET, description, result["policy"])
    assert chosen.ok and set(result["policy"].values()) == {result["keep_ratio"]}
    for ratio in np.linspace(0.01, 1.0, 500):
        check = check_budget(BUDGET, description, uniform_policy(description, float(ratio)))
        if check.ok:
            assert check.value <= chosen.value
    assert len(run.read_history()) == 1
    assert run.read_best_policy()["policy"] == result["policy"]
    assert result["accuracy"] == evaluator.accuracy(result["policy"])


def test_random_policies_stay_inside_the_budget_and_the_best_is_the_most_accurate(evaluator, tmp_path):
    run = new_run(tmp_path / "random")
    result = run_random(run, evaluator, BUDGET, samples=5, lower_bound=0.3, seed=3, progress=False)
    history = run.read_history()
    assert [int(row["candidate"]) for row in history] == [1, 2, 3, 4, 5]
    assert all(float(row["cost_ratio"]) <= 0.5 + 1e-9 for row in history)
    assert all(float(row["flops_ratio"]) <= 0.5 + 1e-9 for row in history)
    assert result["accuracy"] == max(float(row["accuracy"]) for row in history)
    assert check_budget(BUDGET, evaluator.description, result["policy"]).ok
    for g in evaluator.description.groups:  # the environment's lower bound holds
        assert round(result["policy"][g.name] * g.channels) >= channels_to_keep(g.channels, 0.3)
    assert run.read_best_policy()["policy"] == result["policy"]


def test_random_search_resumes_after_a_kill_with_the_same_draws(evaluator, tmp_path, monkeypatch):
    whole = new_run(tmp_path / "whole")
    expected = run_random(whole, evaluator, BUDGET, samples=5, seed=11, progress=False)

    killed = new_run(tmp_path / "killed")
    interrupt_after(monkeypatch, evaluator, 2)
    with pytest.raises(Interrupt):
        run_random(killed, evaluator, BUDGET, samples=5, seed=11, progress=False)
    assert len(killed.read_history()) == 2
    monkeypatch.undo()
    seen = interrupt_after(monkeypatch, evaluator, 100)
    resumed = run_random(killed, evaluator, BUDGET, samples=5, seed=11, progress=False)
    assert len(seen) == 3  # only the samples not finished before the kill
    assert rows_without_time(killed) == rows_without_time(whole)
    assert resumed["policy"] == expected["policy"] and resumed["accuracy"] == expected["accuracy"]


def test_random_search_refuses_an_unreachable_budget(evaluator, tmp_path):
    with pytest.raises(AutopruneError, match="unreachable"):
        run_random(new_run(tmp_path / "r"), evaluator, parse_budget("2%flops"), samples=2, progress=False)


def test_sensitivity_grid_includes_the_lower_bound_and_nothing_below():
    assert sensitivity_grid(0.2, 0.1) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert sensitivity_grid(0.15, 0.1) == pytest.approx([0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert sensitivity_grid(0.1, 0.3) == pytest.approx([0.1, 0.3, 0.6, 0.9])
    with pytest.raises(AutopruneError):
        sensitivity_grid(0.2, 1.5)


def test_the_smallest_threshold_that_fits_is_chosen():
    curves = {"a": {0.25: 0.50, 0.5: 0.88, 0.75: 0.90},
              "b": {0.25: 0.80, 0.5: 0.85, 0.75: 0.89},
              "c": {0.25: 0.86, 0.5: 0.90, 0.75: 0.90}}
    base = 0.90
    assert policy_for_threshold(curves, base, 0.0) == {"a": 0.75, "b": 1.0, "c": 0.5}
    assert policy_for_threshold(curves, base, 0.05) == {"a": 0.5, "b": 0.5, "c": 0.25}

    def fits_below(limit):
        return lambda policy: sum(policy.values()) <= limit

    threshold, policy = choose_threshold(curves, base, fits_below(1.9))
    assert policy == {"a": 0.5, "b": 0.75, "c": 0.5} and threshold == pytest.approx(0.02)
    # the measured drops below it (0 and 0.01) give policies over the limit
    assert sum(policy_for_threshold(curves, base, 0.0).values()) > 1.9
    assert sum(policy_for_threshold(curves, base, 0.0101).values()) > 1.9
    threshold, policy = choose_threshold(curves, base, fits_below(10.0))
    assert threshold == 0.0
    with pytest.raises(AutopruneError, match="unreachable on the sensitivity grid"):
        choose_threshold(curves, base, fits_below(0.5))


def test_sensitivity_meets_the_budget_saves_its_curves_and_resumes(evaluator, tmp_path, monkeypatch):
    groups = len(evaluator.description.groups)
    run = new_run(tmp_path / "sensitivity")
    interrupt_after(monkeypatch, evaluator, 1 + 5)  # the unpruned model, then five curve points
    with pytest.raises(Interrupt):
        run_sensitivity(run, evaluator, BUDGET, lower_bound=0.5, step=0.5, progress=False)
    saved = json.loads((run.path / "sensitivity.json").read_text())
    assert len(saved["points"]) == 5 and len(run.read_history()) == 5
    monkeypatch.undo()

    seen = interrupt_after(monkeypatch, evaluator, 1000)
    result = run_sensitivity(run, evaluator, BUDGET, lower_bound=0.5, step=0.5, progress=False)
    assert len(seen) == 1 + (groups - 5) + 1  # the unpruned model, the missing points, the final policy
    assert check_budget(BUDGET, evaluator.description, result["policy"]).ok
    assert set(result["policy"].values()) <= {0.5, 1.0}
    saved = json.loads((run.path / "sensitivity.json").read_text())
    assert set(saved["curves"]) == {g.name for g in evaluator.description.groups}
    assert saved["threshold"] == result["threshold"] and saved["policy"] == result["policy"]
    history = run.read_history()
    assert len(history) == groups and {row["group"] for row in history} == set(saved["curves"])
    # no smaller measured drop meets the budget: the threshold leaves the least slack it can
    drops = sorted({max(0.0, float(row["accuracy_drop"])) for row in history} | {0.0})
    curves = {g: {r: a for r, a in points} for g, points in saved["curves"].items()}
    for drop in (d for d in drops if d < result["threshold"]):
        smaller = policy_for_threshold(curves, saved["base_accuracy"], drop)
        assert not check_budget(BUDGET, evaluator.description, smaller).ok


def test_tp_global_meets_the_budget_with_torch_pruning_s_own_network(evaluator, tmp_path):
    from autoprune.agents.baselines import run_tp_global
    from autoprune.costs import count_cost, policy_channels
    from autoprune.pruning import describe_network

    run = new_run(tmp_path / "tp")
    result = run_tp_global(run, evaluator, BUDGET, lower_bound=0.2, progress=False)
    description = evaluator.description
    assert check_budget(BUDGET, description, result["policy"]).ok
    counted = count_cost(describe_network(result["model"], description.input_shape))
    assert counted == count_cost(description, policy_channels(description, result["policy"]))
    assert all(result["channels"][g.name] >= channels_to_keep(g.channels, 0.2) - 1 for g in description.groups)
    # the bisection's last step: a little less pruning breaks the budget
    rows = run.read_history()
    assert len(rows) > 3 and run.read_best_policy()["policy"] == result["policy"]
    assert any(float(r["cost_ratio"]) > 0.5 for r in rows)


def test_tp_global_refuses_a_budget_out_of_reach(evaluator, tmp_path):
    from autoprune.agents.baselines import run_tp_global

    with pytest.raises(AutopruneError, match="cannot meet"):
        run_tp_global(new_run(tmp_path / "tp"), evaluator, parse_budget("1%flops"), lower_bound=0.5, progress=False)


def test_tp_global_sizes_are_its_own_pruning_at_other_ratios(evaluator, tmp_path):
    from autoprune.agents.baselines import run_tp_global
    from autoprune.costs import count_cost
    from autoprune.pruning import describe_network

    result = run_tp_global(new_run(tmp_path / "tp"), evaluator, BUDGET, lower_bound=0.2, progress=False)
    sizes, description = result["sizes"], evaluator.description
    assert sizes.at(1.0)[1] == result["channels"]
    previous = None
    for size in (0.5, 1.0, 1.2, sizes.largest):
        model, kept = sizes.at(size)
        # the network is the plan it names (by its cost: a group cut to one channel is no group of it any
        # more), and a larger size never keeps fewer channels in any group
        assert count_cost(describe_network(model, description.input_shape)) == count_cost(description, kept)
        assert all(kept[g.name] >= channels_to_keep(g.channels, 0.2) - 1 for g in description.groups)
        if previous is not None:
            assert all(kept[name] >= previous[name] for name in kept)
        previous = kept
    assert previous == {g.name: g.channels for g in description.groups}  # the largest prunes nothing


def test_the_latency_fit_grows_tp_global_s_network_by_its_own_pruning(evaluator, formula_lut, tmp_path, monkeypatch):
    from autoprune.agents.baselines import run_tp_global
    from autoprune.budgets import Constraint
    from autoprune.costs import count_cost
    from autoprune.latency import LatencyTable, device_metadata
    from autoprune.pipeline import finish, fit
    from autoprune.pruning import describe_network

    description, shape = evaluator.description, evaluator.description.input_shape
    lut = LatencyTable({**formula_lut.data, "device": device_metadata()}, "formula")  # this machine's table
    budget = parse_budget("50%latency")

    class ByFlops:
        """Times a network as its FLOPs to the power 1.3: a pruned network runs faster than the
        table predicts (at half the unpruned time by the table, under 40 % here), so the fit
        has to grow it."""

        def __init__(self, *args):
            self.calls = 0

        def __call__(self, models):
            self.calls += 1
            return [(1e-6 * count_cost(describe_network(m, shape)).flops) ** 1.3 for m in models]

        def close(self):
            pass

    monkeypatch.setattr(fit, "LatencyWorker", ByFlops)
    found = run_tp_global(new_run(tmp_path / "tp"), evaluator, budget, lut, lower_bound=0.2, progress=False)
    start = dict(found["channels"])
    channels, record = finish._fit_latency(new_run(tmp_path / "fit"), evaluator, Constraint(budget, description, lut),
                                           start, found["model"], found["sizes"])
    assert record["fitted"] and channels != start and all(channels[k] >= v for k, v in start.items())
    assert channels == record["steps"][record["chosen"]]["channels"]
    grown = finish._own_size(found["sizes"], record["steps"][record["chosen"]]["factor"], channels)
    assert count_cost(describe_network(grown, shape)) == count_cost(description, channels)
    assert count_cost(describe_network(found["model"], shape)) == count_cost(description, start)  # left as found
    with pytest.raises(AutopruneError, match="other channels"):
        finish._own_size(found["sizes"], 1.0, channels)
