"""The search settings: one dataclass is the command line, the API's settings and config.json."""

from __future__ import annotations

import dataclasses

import pytest

from autoprune.cli import build_parser, main
from autoprune.errors import AutopruneError, SettingError
from autoprune.pipeline.settings import AUTO_FINISH_STAGES, RESUMABLE, SearchSettings, settings_from_saved


def test_every_setting_is_a_flag_of_search_with_the_dataclass_default():
    args = vars(build_parser().parse_args(["search"]))
    for f in dataclasses.fields(SearchSettings):
        assert f.name in args, f.name
        assert args[f.name] == f.default, f.name


@pytest.mark.parametrize("values, name, message", [
    ({"lower_bound": 0.0}, "lower_bound", "above 0"),
    ({"lower_bound": 1.5}, "lower_bound", "at most 1"),
    ({"episodes": "ten"}, "episodes", "an integer"),
    ({"episodes": 2.5}, "episodes", "an integer"),
    ({"episodes": True}, "episodes", "an integer"),
    ({"finetune_lr": float("nan")}, "finetune_lr", "finite"),
    ({"score_steps": -1}, "score_steps", "at least 0"),
    ({"score_steps": "sometimes"}, "score_steps", "or 'auto'"),
    ({"action_mapping": "relative"}, "action_mapping", "feasible, centred, absolute"),
    ({"criterion": "l3"}, "criterion", "l1"),
    ({"allow_other_device": "yes"}, "allow_other_device", "True or False"),
    ({"seed": None}, "seed", "may not be None"),
    ({"episodes": 10, "warmup_episodes": 20}, "warmup_episodes", "more than the 10 episodes"),
])
def test_a_bad_value_names_its_setting(values, name, message):
    with pytest.raises(SettingError, match=message) as info:
        SearchSettings.from_dict(values)
    assert info.value.name == name


def test_unknown_names_are_listed_and_numbers_are_coerced():
    with pytest.raises(AutopruneError, match="unknown setting.*episode, lowerbound"):
        SearchSettings.from_dict({"episode": 3, "lowerbound": 0.2})
    settings = SearchSettings.from_dict({"finetune_lr": 1, "score_steps": "AUTO", "workers": None})
    assert settings.finetune_lr == 1.0 and isinstance(settings.finetune_lr, float) and settings.score_steps == "auto"
    assert settings.given() == {"finetune_lr": 1.0}


def test_a_run_written_before_a_setting_existed_resumes_with_what_it_was_searched_with():
    saved = {"budget": "50%flops", "agent": "ddpg", "episodes": 300, "model_name": "x", "groups": ["a"]}
    settings = settings_from_saved(saved)
    assert settings.episodes == 300 and settings.fill == 0.0 and settings.action_mapping == "absolute" and settings.actor_penalty == 0.0
    assert settings.score_steps == 0 and settings.score_augment is False and settings.equal_steps == 0
    assert SearchSettings().score_augment is True
    assert set(RESUMABLE) == {"workers", "max_iterations", "episodes"}
    assert settings.finish_stages_value() == 1  # searched before the staged finish was the default


def test_the_staged_finish_is_the_default_when_there_is_a_fine_tune():
    assert SearchSettings().finish_stages_value() == AUTO_FINISH_STAGES > 1
    assert SearchSettings(finetune_epochs=0).finish_stages_value() == 1
    assert SearchSettings.from_dict({"finish_stages": 3, "finetune_epochs": 0}).finish_stages_value() == 3
    with pytest.raises(AutopruneError, match="finish_stages"):
        SearchSettings.from_dict({"finish_stages": 0})


@pytest.mark.parametrize("argv, flag", [
    (["--lower-bound", "1.5"], "--lower-bound: must be at most 1"),
    (["--action-mapping", "relative"], "--action-mapping"),
    (["--episodes", "5", "--warmup-episodes", "9"], "--warmup-episodes: 9 is more than the 5 episodes"),
    (["--agent", "ddpg", "--reward", "accuracy"], "unknown reward 'accuracy'"),
])
def test_the_cli_names_the_flag_in_one_line(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["search", "--budget", "50%flops", *argv, "--out", str(tmp_path / "run"), "--quiet"])
    except SystemExit as exc:  # argparse's own check of the value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "run").exists()
