import pytest

from autoprune.budgets import parse_budget
from autoprune.errors import AutopruneError


@pytest.mark.parametrize("text,metric,fraction,amount", [
    ("50%flops", "flops", 0.5, None), ("25%FLOPs", "flops", 0.25, None), ("50%macs", "flops", 0.5, None),
    ("70%params", "params", 0.7, None), ("50%latency", "latency", 0.5, None), ("100%flops", "flops", 1.0, None),
    ("12.5%flops", "flops", 0.125, None), ("20MFLOPs", "flops", None, 20e6), ("1.5GFLOPs", "flops", None, 1.5e9),
    ("800kflops", "flops", None, 800e3), ("150kparams", "params", None, 150e3), ("3.5ms", "latency", None, 3.5),
    ("900us", "latency", None, 0.9), (" 50 % flops ", "flops", 0.5, None),
])
def test_accepted_forms(text, metric, fraction, amount):
    budget = parse_budget(text)
    assert budget.metric == metric
    assert budget.fraction == pytest.approx(fraction) if fraction is not None else budget.fraction is None
    assert budget.amount == pytest.approx(amount) if amount is not None else budget.amount is None


def test_limit_and_ratio():
    assert parse_budget("50%flops").limit(1000) == 500
    assert parse_budget("20MFLOPs").ratio(40e6) == pytest.approx(0.5)


@pytest.mark.parametrize("text,message", [
    ("150%flops", "above 100"), ("0%flops", "above 0"), ("50%", "accepted forms"), ("half", "accepted forms"),
    ("50%watts", "accepted forms"), ("12.5s", "accepted forms"), ("0ms", "positive"), ("", "accepted forms"),
])
def test_bad_budgets_have_one_clear_message(text, message):
    with pytest.raises(AutopruneError, match=message) as info:
        parse_budget(text)
    assert "\n" not in str(info.value)


def test_error_lists_every_form():
    with pytest.raises(AutopruneError) as info:
        parse_budget("fifty")
    for form in ("%flops", "%params", "%latency", "MFLOPs", "params", "ms"):
        assert form in str(info.value)


def test_uniform_ratio_meets_the_budget_as_closely_as_rounding_allows():
    from autoprune.budgets import check_budget, uniform_ratio_for_budget
    from autoprune.costs import uniform_policy
    from autoprune.models import build_model
    from autoprune.pruning import describe_network

    description = describe_network(build_model("resnet20"), (1, 28, 28))
    for text in ("50%flops", "25%flops", "60%params"):
        budget = parse_budget(text)
        ratio = uniform_ratio_for_budget(budget, description)
        assert check_budget(budget, description, uniform_policy(description, ratio)).ok
        assert not check_budget(budget, description, uniform_policy(description, min(1.0, ratio + 0.07))).ok  # +1 channel in every group
    assert uniform_ratio_for_budget(parse_budget("100%flops"), description) == 1.0
