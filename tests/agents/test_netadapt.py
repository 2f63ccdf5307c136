import csv
from dataclasses import replace

import pytest
import torch

import autoprune.agents.netadapt as netadapt
from autoprune.agents.netadapt import HISTORY_COLUMNS, NetAdaptConfig, minimum_channels, run_netadapt
from autoprune.budgets import parse_budget
from autoprune.costs import count_cost
from autoprune.errors import AutopruneError
from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
from autoprune.pruning import describe_network
from autoprune.latency import LatencyWorker
from autoprune.runs import Run
from autoprune.train import evaluate

FAST = EvaluatorConfig(bn_batches=2, bn_batch_size=32, val_images=64)
SMALL = NetAdaptConfig(initial_reduction=0.2, short_term_steps=2, short_term_batch_size=32)
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def evaluator(trained_tiny, synthetic_data):
    return PolicyEvaluator(trained_tiny, synthetic_data, FAST)


def new_run(tmp_path, name="run"):
    return Run.create(tmp_path / name, {"agent": "netadapt"})


def search(tmp_path, evaluator, budget="50%flops", name="run", **kwargs):
    run = new_run(tmp_path, name)
    kwargs.setdefault("config", SMALL)
    return run, run_netadapt(run, evaluator, parse_budget(budget), seed=kwargs.pop("seed", 3), progress=False,
                             **kwargs)


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def flops_search(evaluator, tmp_path_factory):
    return search(tmp_path_factory.mktemp("netadapt"), evaluator)


def test_final_network_meets_the_budget_as_counted(flops_search, evaluator):
    run, result = flops_search
    description = evaluator.description
    base = count_cost(description)
    counted = count_cost(describe_network(result["model"], SHAPE))
    assert counted == count_cost(description, result["channels"])
    assert counted.flops <= 0.5 * base.flops
    assert result["cost_ratio"] == pytest.approx(counted.flops / base.flops)
    assert result["stop_reason"] == "budget met"
    assert result["policy"] == {g.name: result["channels"][g.name] / g.channels for g in description.groups}
    assert result["model"].autoprune_policy == result["policy"]
    assert min(result["policy"].values()) < 1.0
    assert run.read_best_policy()["policy"] == result["policy"]
    # the reported accuracy is the returned (recalibrated) network's on the search's validation subset
    assert evaluate(result["model"], evaluator.data, "val", limit=FAST.val_images)["accuracy"] == result["accuracy"]
    assert evaluator.pruner.model is not result["model"]


def test_history_has_one_row_per_iteration_and_follows_the_schedule(flops_search, evaluator):
    run, result = flops_search
    with open(run.path / "history.csv", newline="") as fh:
        assert tuple(csv.DictReader(fh).fieldnames) == HISTORY_COLUMNS
    rows = run.read_history()
    assert len(rows) == result["iterations"] >= 3
    assert [int(r["iteration"]) for r in rows] == list(range(1, len(rows) + 1))
    targets = [float(r["target_ratio"]) for r in rows]
    assert all(a > b for a, b in zip(targets, targets[1:]))  # the target shrinks
    assert targets[-1] == pytest.approx(0.5)  # and the last one is the budget itself
    channels = {g.name: g.channels for g in evaluator.description.groups}
    previous = 1.0
    for i, row in enumerate(rows):
        # target = previous cost - scheduled step (possibly halved), never below the budget
        steps = [SMALL.initial_reduction * 0.96 ** i / 2 ** h for h in range(SMALL.max_halvings + 1)]
        assert any(float(row["target_ratio"]) == pytest.approx(max(previous - s, 0.5)) for s in steps)
        assert float(row["cost_ratio"]) <= float(row["target_ratio"]) + 1e-9
        assert int(row["channels_before"]) == channels[row["group"]] > int(row["channels_after"])
        assert float(row["cost_ratio"]) == pytest.approx(float(row["flops_ratio"])) and row["latency_ratio"] == ""
        assert 1 <= int(row["proposals"]) <= len(channels)
        channels[row["group"]] = int(row["channels_after"])
        previous = float(row["cost_ratio"])
    assert channels == result["channels"]
    assert float(rows[-1]["accuracy"]) == result["accuracy"]


def test_same_seed_same_result_through_any_executor(flops_search, evaluator, tmp_path):
    class RecordingExecutor:
        """Maps in this process and counts the proposals it was given."""

        def __init__(self):
            self.calls = 0

        def map(self, fn, *iterables):
            results = list(map(fn, *iterables))
            self.calls += len(results)
            return iter(results)

    run, result = flops_search
    executor = RecordingExecutor()
    again_run, again = search(tmp_path, evaluator, executor=executor)
    assert again["policy"] == result["policy"] and again["accuracy"] == result["accuracy"]
    assert same_weights(again["model"], result["model"])
    assert without_seconds(again_run.read_history()) == without_seconds(run.read_history())
    assert executor.calls == sum(int(r["proposals"]) for r in run.read_history())


def test_resume_after_interruptions_equals_an_uninterrupted_search(flops_search, evaluator, tmp_path, monkeypatch):
    reference_run, reference = flops_search
    run = new_run(tmp_path)
    budget = parse_budget("50%flops")
    # 1) a bound on iterations stops the search with advice, keeping what was done
    with pytest.raises(AutopruneError, match="max_iterations"):
        run_netadapt(run, evaluator, budget, config=replace(SMALL, max_iterations=1), seed=3, progress=False)
    assert len(run.read_history()) == 1

    # 2) killed in the middle of the third iteration, after scoring one of its proposals
    original = netadapt.evaluate_proposal
    third_iteration_calls = []

    def killed_in_third_iteration(task, data):
        if len(run.read_history()) >= 2:
            third_iteration_calls.append(task.group)
            if len(third_iteration_calls) == 2:
                raise KeyboardInterrupt
        return original(task, data)

    monkeypatch.setattr(netadapt, "evaluate_proposal", killed_in_third_iteration)
    with pytest.raises(KeyboardInterrupt):
        run_netadapt(run, evaluator, budget, config=SMALL, seed=3, progress=False)
    monkeypatch.setattr(netadapt, "evaluate_proposal", original)
    rows = run.read_history()
    assert len(rows) == 2 and len(third_iteration_calls) == 2
    run.write_history(rows + [dict(rows[-1], iteration="3")])  # a row written after the last saved state

    # 3) resumed: the stale row is dropped and the result is the uninterrupted one
    resumed = run_netadapt(run, evaluator, budget, config=SMALL, seed=3, progress=False)
    assert resumed["policy"] == reference["policy"] and resumed["accuracy"] == reference["accuracy"]
    assert resumed["iterations"] == reference["iterations"]
    assert same_weights(resumed["model"], reference["model"])
    assert without_seconds(run.read_history()) == without_seconds(reference_run.read_history())

    # 4) a finished search resumes to its result without scoring anything; other settings are refused
    def never(task, data):
        raise AssertionError("a finished search scored a proposal")

    monkeypatch.setattr(netadapt, "evaluate_proposal", never)
    finished = run_netadapt(run, evaluator, budget, config=SMALL, seed=3, progress=False)
    assert finished["policy"] == reference["policy"] and same_weights(finished["model"], reference["model"])
    # ... and reports the time its proposals took in the sessions that scored them
    assert finished["proposal_seconds"] == resumed["proposal_seconds"]
    assert finished["proposal_seconds"]["short_term_finetune"] > 0
    with pytest.raises(AutopruneError, match="other settings"):
        run_netadapt(run, evaluator, budget, config=SMALL, seed=4, progress=False)


@pytest.mark.parametrize("spoil", [lambda p: p.unlink(), lambda p: p.write_text(p.read_text()[:-25]),
                                   lambda p: p.write_bytes(bytes(range(256)))], ids=["deleted", "cut", "random"])
def test_a_damaged_history_is_rebuilt_from_the_state(flops_search, evaluator, tmp_path, spoil):
    reference_run, reference = flops_search
    run = new_run(tmp_path)
    budget = parse_budget("50%flops")
    with pytest.raises(AutopruneError, match="max_iterations"):
        run_netadapt(run, evaluator, budget, config=replace(SMALL, max_iterations=2), seed=3, progress=False)
    spoil(run.path / "history.csv")
    resumed = run_netadapt(run, evaluator, budget, config=SMALL, seed=3, progress=False)
    assert resumed["policy"] == reference["policy"]
    assert without_seconds(run.read_history()) == without_seconds(reference_run.read_history())


@pytest.mark.parametrize("budget, lower_bound", [("0.5%flops", 0.0), ("50%flops", 0.8), ("0.2%params", 0.0)])
def test_unreachable_budget_raises_before_writing_anything(evaluator, tmp_path, budget, lower_bound):
    run = new_run(tmp_path)
    with pytest.raises(AutopruneError, match="unreachable.*(loosen the budget|lower bound)"):
        run_netadapt(run, evaluator, parse_budget(budget), config=replace(SMALL, lower_bound=lower_bound),
                     progress=False)
    assert run.read_history() == [] and not run.state_dir.exists() and run.read_best_policy() is None


def test_latency_budget_through_a_formula_lut(evaluator, formula_lut, tmp_path):
    run, result = search(tmp_path, evaluator, "60%latency", lut=formula_lut)
    description = evaluator.description
    base_ms = formula_lut.predict_ms(description)
    assert result["cost_ratio"] == pytest.approx(formula_lut.predict_ms(description, result["channels"]) / base_ms)
    assert result["cost_ratio"] <= 0.6 + 1e-9
    counted = count_cost(describe_network(result["model"], SHAPE))
    assert counted == count_cost(description, result["channels"])
    rows = run.read_history()
    assert all(float(r["latency_ratio"]) == pytest.approx(float(r["cost_ratio"])) for r in rows)
    with pytest.raises(AutopruneError, match="needs a latency table"):
        run_netadapt(new_run(tmp_path, "no-lut"), evaluator, parse_budget("60%latency"), config=SMALL, progress=False)


def device_ms(evaluator):
    """A stand-in for timing on a device whose latency falls faster than MACs (pruned
    networks run faster than their LUT sum says, as small real ones do)."""
    base = count_cost(evaluator.description).flops
    return lambda model: 10.0 * (count_cost(describe_network(model, SHAPE)).flops / base) ** 1.5


def device_meter(evaluator):
    one = device_ms(evaluator)
    return lambda models: [one(m) for m in models]


def test_measured_latency_decides_when_the_budget_is_met(evaluator, formula_lut, tmp_path):
    meter = device_ms(evaluator)
    run, result = search(tmp_path, evaluator, "60%latency", lut=formula_lut, meter=device_meter(evaluator))
    base_ms = meter(evaluator.pruner.model)
    assert result["measured_base_ms"] == pytest.approx(base_ms) and result["stop_reason"] == "budget met"
    ratio = meter(result["model"]) / base_ms
    assert result["measured_ms"] == pytest.approx(meter(result["model"])) and ratio <= 0.6 + 1e-9
    # the search stopped on the measurement, where the LUT alone would have gone on
    assert result["cost_ratio"] > 0.65
    rows = run.read_history()
    assert len(rows) == result["iterations"] and float(rows[-1]["measured_ratio"]) == pytest.approx(ratio)
    assert all(float(r["measured_ratio"]) > 0.6 for r in rows[:-1])


@pytest.mark.slow
def test_latency_worker_times_networks_in_another_process_and_ranks_them(trained_tiny, formula_lut):
    from autoprune.costs import uniform_policy
    from autoprune.pruning import ChannelPruner

    small = ChannelPruner(trained_tiny, SHAPE).prune(uniform_policy(describe_network(trained_tiny, SHAPE), 0.25))
    meter = netadapt.latency_meter(parse_budget("50%latency"), formula_lut, replace(SMALL, measure_latency="auto"),
                                   SHAPE)
    assert meter is None  # the formula table was not measured on this CPU
    meter = LatencyWorker(SHAPE, formula_lut)
    try:
        base_ms, small_ms = meter([trained_tiny, small])
        again = meter([trained_tiny])  # the same worker serves later calls
    finally:
        meter.close()
    assert meter._pool is None
    assert 0 < small_ms < base_ms and len(again) == 1 and again[0] > 0


def test_measuring_against_a_lut_from_another_device_is_refused(evaluator, formula_lut, tmp_path):
    run = new_run(tmp_path)
    with pytest.raises(AutopruneError, match="cannot measure latency against LUT"):
        run_netadapt(run, evaluator, parse_budget("60%latency"), lut=formula_lut,
                     config=replace(SMALL, measure_latency="on"), progress=False)
    assert run.read_history() == [] and not run.state_dir.exists()


def test_base_model_inside_the_budget_needs_no_iteration(evaluator, tmp_path):
    run, result = search(tmp_path, evaluator, "100%flops")
    assert result["iterations"] == 0 and result["stop_reason"] == "budget met"
    assert set(result["policy"].values()) == {1.0} and result["cost_ratio"] == 1.0
    assert result["model"] is not evaluator.pruner.model  # the base model is never modified
    assert result["accuracy"] == evaluate(result["model"], evaluator.data, "val", limit=FAST.val_images)["accuracy"]
    assert run.read_history() == []


def test_channel_multiple_and_lower_bound_are_respected(trained_tiny, synthetic_data, tmp_path):
    evaluator = PolicyEvaluator(trained_tiny, synthetic_data, EvaluatorConfig(
        bn_batches=2, bn_batch_size=32, val_images=64, channel_multiple=4))
    config = replace(SMALL, lower_bound=0.3, initial_reduction=0.3)
    _, result = search(tmp_path, evaluator, "60%flops", config=config)
    for g in evaluator.description.groups:
        kept = result["channels"][g.name]
        assert kept == g.channels or kept % 4 == 0
        assert kept >= minimum_channels(g.channels, 0.3, 4) >= 0.3 * g.channels
    assert count_cost(describe_network(result["model"], SHAPE)) == count_cost(evaluator.description,
                                                                               result["channels"])


def test_minimum_channels():
    assert minimum_channels(16, 0.0, 1) == 1
    assert minimum_channels(16, 0.0, 4) == 4
    assert minimum_channels(16, 0.3, 4) == 8  # 4.8 rounded up to a multiple of 4
    assert minimum_channels(3, 0.0, 4) == 3  # never more than the group has
    assert minimum_channels(10, 1.0, 1) == 10


@pytest.mark.slow
def test_two_worker_processes_give_the_single_process_result(evaluator, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers run one thread each; float sums depend on the thread count
    try:
        _, inline = search(tmp_path, evaluator, name="inline")
    finally:
        torch.set_num_threads(threads)
    _, pooled = search(tmp_path, evaluator, name="pooled", config=replace(SMALL, workers=2))
    assert pooled["policy"] == inline["policy"] and pooled["accuracy"] == inline["accuracy"]
    assert same_weights(pooled["model"], inline["model"])


@pytest.mark.parametrize("seed", range(12))
def test_the_floor_checked_for_reachability_is_a_count_each_group_can_keep(seed):
    """Grouped layers keep whole channel groups, concatenated branches a channel each, and
    some groups cannot be cut at all: the floor NetAdapt's budget is checked at is one of
    the counts its search may choose, so a latency table is never asked for another."""
    from autoprune.costs import group_choices
    from autoprune.pipeline.registry import make_searcher
    from autoprune.pipeline.settings import SearchSettings
    from tests.archs import random_net

    description = describe_network(random_net(seed).eval(), (1, 16, 16))
    settings = SearchSettings.from_dict({"agent": "netadapt", "lower_bound": 0.1})
    floors = make_searcher("netadapt").floor_channels(description, settings)
    for g in description.groups:
        assert floors[g.name] in group_choices(g) and floors[g.name] >= 0.1 * g.channels, g.name
