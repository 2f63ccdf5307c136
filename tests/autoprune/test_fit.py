"""Landing a latency budget by measurement (autoprune.pipeline.fit), with a stand-in timer."""

from __future__ import annotations

import json
import random

import pytest
import torch.nn as nn

from autoprune.budgets import Constraint, parse_budget
from autoprune.costs import _group_floor, group_choices, group_multiple
from autoprune.latency import PAIR_TIMINGS, LatencyTable, device_metadata, median_timing
from autoprune.pipeline.fit import FIT_FILE, ROUNDS, WINDOW, factor_for, fit_measured_latency, scaled_channels
from autoprune.pruning import describe_network


@pytest.fixture(scope="module")
def description(trained_tiny):
    return describe_network(trained_tiny, (1, 28, 28))


def here_lut(formula_lut, device=None) -> LatencyTable:
    return LatencyTable({**formula_lut.data, "device": device or device_metadata()}, "formula")


class Plan(nn.Module):
    """What `build` makes here: a network that only remembers its channel plan."""

    def __init__(self, plan):
        super().__init__()
        self.plan = dict(plan)


class Timer:
    """Times a plan as the table predicts it, `slower` times over for any pruned one, with
    a little noise: the under-prediction the fit exists for."""

    def __init__(self, lut, description, slower: float, noise: float = 0.005, seed: int = 0):
        self.lut, self.description, self.slower, self.noise = lut, description, slower, noise
        self.rng = random.Random(seed)
        self.calls = 0

    def __call__(self, models):
        self.calls += 1
        base, network = models
        jitter = 1 + self.rng.uniform(-self.noise, self.noise)
        return [self.lut.predict_ms(self.description), jitter * self.slower * self.lut.predict_ms(
            self.description, network.plan)]


def test_scaled_plans_keep_every_group_inside_what_it_allows(description):
    rng = random.Random(3)
    for _ in range(50):
        factor, multiple = rng.uniform(0.05, 3.0), rng.choice([1, 2, 4])
        kept = {g.name: rng.choice(group_choices(g, multiple)) for g in description.groups}
        for grow in (True, False):
            plan = scaled_channels(description, kept, factor, multiple, grow)
            for g in description.groups:
                step = group_multiple(g, multiple)
                assert _group_floor(g, step) <= plan[g.name] <= g.channels
                assert plan[g.name] % step == 0 or plan[g.name] in (g.channels, _group_floor(g, step))
                if not grow:
                    assert plan[g.name] <= kept[g.name]


def test_the_factor_found_is_the_largest_the_table_allows(description, formula_lut):
    kept = {g.name: max(1, g.channels // 2) for g in description.groups}

    def predict(plan):
        return formula_lut.predict_ms(description, plan)

    target = 0.8 * predict(kept)
    def plan_for(factor):
        return scaled_channels(description, kept, factor, grow=False)

    plan = plan_for(factor_for(predict, plan_for, 1.0, target))
    assert predict(plan) <= target
    # no plan of the family under the target is larger
    family = [scaled_channels(description, kept, i / 500, grow=False) for i in range(1, 501)]
    assert max(predict(p) for p in family if predict(p) <= target) == predict(plan)


@pytest.mark.parametrize("slower, grow", [(1.15, True), (1.15, False), (0.85, True)])
def test_the_fit_lands_in_the_window_by_measurement(description, formula_lut, tmp_path, slower, grow):
    lut = here_lut(formula_lut)
    constraint = Constraint(parse_budget("50%latency"), description, lut)
    full = {g.name: g.channels for g in description.groups}
    start = scaled_channels(description, full, factor_for(lambda p: lut.predict_ms(description, p),
                                                         lambda f: scaled_channels(description, full, f), 1.0,
                                                         0.5 * constraint.base_value))
    timer = Timer(lut, description, slower)
    plan, record = fit_measured_latency(constraint, start, Plan, nn.Identity(), (1, 28, 28), grow=grow,
                                        state_dir=tmp_path, worker=timer)
    chosen = record["steps"][record["chosen"]]
    assert record["fitted"] and chosen["channels"] == plan and len(record["steps"]) <= ROUNDS + 1
    assert timer.calls == PAIR_TIMINGS * len(record["steps"])
    assert all(len(step["timings"]) == PAIR_TIMINGS for step in record["steps"])
    if slower > 1 or grow:  # too slow: shrink; too fast: grow where allowed
        assert record["met"] and 0.5 - WINDOW <= chosen["measured_ratio"] <= 0.5
        assert len(record["steps"]) > 1
    else:  # too fast and the network may not grow: left as it was
        assert plan == record["steps"][0]["channels"] and len(record["steps"]) == 1
    if not grow:
        assert all(plan[k] <= v for k, v in start.items())
    # the result is kept: a resumed run fine-tunes the same network without timing again
    again, saved = fit_measured_latency(constraint, start, Plan, nn.Identity(), (1, 28, 28), grow=grow,
                                        state_dir=tmp_path, worker=lambda models: pytest.fail("timed again"))
    assert again == plan and saved == json.loads((tmp_path / FIT_FILE).read_text())["record"]


class Outlier(Timer):
    """Times as the table predicts, except that the first timing of every network comes out
    `outlier` times over: as when the unpruned network happens to run fast in one timing."""

    def __init__(self, lut, description, outlier: float):
        super().__init__(lut, description, 1.0, noise=0.0)
        self.outlier, self.seen = outlier, set()

    def __call__(self, models):
        base, network = super().__call__(models)
        key = tuple(sorted(models[1].plan.items()))
        first = key not in self.seen
        self.seen.add(key)
        return [base, network * (self.outlier if first else 1.0)]


def test_one_outlying_timing_does_not_move_a_network_inside_the_window(description, formula_lut, tmp_path):
    lut = here_lut(formula_lut)
    constraint = Constraint(parse_budget("50%latency"), description, lut)
    full = {g.name: g.channels for g in description.groups}
    start = scaled_channels(description, full, factor_for(lambda p: lut.predict_ms(description, p),
                                                         lambda f: scaled_channels(description, full, f), 1.0,
                                                         (0.5 - WINDOW / 2) * constraint.base_value))
    ratio = lut.predict_ms(description, start) / constraint.base_value
    assert 0.5 - WINDOW <= ratio <= 0.5 < 1.06 * ratio  # inside the window, and over it when timed 6 % slow
    timer = Outlier(lut, description, 1.06)
    plan, record = fit_measured_latency(constraint, start, Plan, nn.Identity(), (1, 28, 28), grow=True,
                                        worker=timer)
    assert plan == start and record["met"] and len(record["steps"]) == 1
    step = record["steps"][0]
    assert step["measured_ratio"] == pytest.approx(ratio)
    assert max(ms / base for base, ms in step["timings"]) == pytest.approx(1.06 * ratio)


def test_the_median_timing_is_one_timing_with_the_median_ratio():
    timings = [[2.0, 1.2], [1.0, 0.5], [4.0, 1.0], [1.6, 0.9]]  # ratios 0.6, 0.5, 0.25, 0.5625
    assert median_timing(timings) == [1.0, 0.5]
    assert median_timing(timings[:3]) == [1.0, 0.5]
    assert median_timing(timings, key=lambda pair: pair[1]) == [1.6, 0.9]  # by the milliseconds alone
    assert median_timing([[3.0, 1.0]]) == [3.0, 1.0]
    with pytest.raises(ValueError):
        median_timing([])


def test_no_fit_on_another_cpu_or_without_a_latency_budget(description, formula_lut):
    start = {g.name: g.channels // 2 or 1 for g in description.groups}
    never = lambda models: pytest.fail("timed")  # noqa: E731
    other = here_lut(formula_lut, {"cpu": "Some Other CPU", "cpu_id": "family 1 model 2"})
    plan, record = fit_measured_latency(Constraint(parse_budget("50%latency"), description, other), start, Plan,
                                        nn.Identity(), (1, 28, 28), grow=True, worker=never)
    assert plan == start and not record["fitted"] and "Some Other CPU" in record["reason"]
    plan, record = fit_measured_latency(Constraint(parse_budget("50%flops"), description), start, Plan,
                                        nn.Identity(), (1, 28, 28), grow=True, worker=never)
    assert plan == start and not record["fitted"]


def test_when_nothing_fits_the_fastest_network_is_kept(description, formula_lut, tmp_path):
    lut = here_lut(formula_lut)
    start = {g.name: g.channels for g in description.groups}
    floor = scaled_channels(description, start, 0.0)
    reachable = lut.predict_ms(description, floor) / lut.predict_ms(description)
    constraint = Constraint(parse_budget(f"{50 * reachable:.3f}%latency"), description, lut)
    plan, record = fit_measured_latency(constraint, start, Plan, nn.Identity(), (1, 28, 28), grow=False,
                                        worker=Timer(lut, description, 1.0))
    assert not record["met"]
    assert record["steps"][record["chosen"]]["measured_ms"] == min(s["measured_ms"] for s in record["steps"])


def test_a_family_of_the_searcher_s_own_grows_a_network_that_runs_too_fast(description, formula_lut, tmp_path):
    # a family unlike scaled_channels: the first half of the groups moves, the rest stays put
    lut = here_lut(formula_lut)
    constraint = Constraint(parse_budget("50%latency"), description, lut)
    moving = {g.name for g in description.groups[: len(description.groups) // 2]}

    def plan_for(size):
        return {g.name: max(1, min(g.channels, round(g.channels * (0.5 * size if g.name in moving else 0.4))))
                for g in description.groups}

    start = plan_for(1.0)
    timer = Timer(lut, description, 0.8)
    plan, record = fit_measured_latency(constraint, start, Plan, nn.Identity(), (1, 28, 28), grow=False,
                                        sizes=(plan_for, 2.0), state_dir=tmp_path, worker=timer)
    assert record["fitted"] and len(record["steps"]) > 1
    # every network timed is one of the family's, and the one chosen grew from the start (`grow` is the family's)
    assert all(plan_for(step["factor"]) == step["channels"] for step in record["steps"])
    assert plan == record["steps"][record["chosen"]]["channels"]
    assert any(plan[name] > start[name] for name in moving)
    chosen = record["steps"][record["chosen"]]
    assert chosen["measured_ms"] <= chosen["limit_ms"]


def test_a_saved_fit_is_read_back_only_for_plans_made_the_same_way(description, formula_lut, tmp_path):
    lut = here_lut(formula_lut)
    constraint = Constraint(parse_budget("50%latency"), description, lut)

    def plan_for(size):
        return {g.name: max(1, min(g.channels, round(g.channels * 0.45 * size))) for g in description.groups}

    start = plan_for(1.0)
    args = (constraint, start, Plan, nn.Identity(), (1, 28, 28))
    # a fit by scaling that could only shrink, saved as an older version wrote it (no "how")
    scaled, _ = fit_measured_latency(*args, grow=False, state_dir=tmp_path, worker=Timer(lut, description, 0.8))
    saved = json.loads((tmp_path / FIT_FILE).read_text())
    assert saved["how"] == "scaled, shrink only"
    del saved["how"]
    (tmp_path / FIT_FILE).write_text(json.dumps(saved))
    # read back for a scaled fit, as before
    again, _ = fit_measured_latency(*args, grow=False, state_dir=tmp_path,
                                    worker=lambda models: pytest.fail("timed again"))
    assert again == scaled
    # not for the searcher's own family: that fit is made again, and may grow the network
    timer = Timer(lut, description, 0.8)
    own, record = fit_measured_latency(*args, grow=False, sizes=(plan_for, 2.0), state_dir=tmp_path, worker=timer)
    assert timer.calls == PAIR_TIMINGS * len(record["steps"]) and len(record["steps"]) > 1
    assert any(own[k] > start[k] for k in start)
    assert json.loads((tmp_path / FIT_FILE).read_text())["how"] == "own sizes"
    # nor is the family's fit read back for a fit by scaling
    timer = Timer(lut, description, 0.8)
    fit_measured_latency(*args, grow=False, state_dir=tmp_path, worker=timer)
    assert timer.calls >= 1
