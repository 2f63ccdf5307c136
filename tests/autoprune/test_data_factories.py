"""Your own Datasets from the command line: --data package.module:factory."""

from __future__ import annotations

import json

import pytest
import torch

from autoprune.cli import main
from autoprune.data import load_data, load_data_factory
from autoprune.errors import SettingError

MODULE = "tests.autoprune.user_data"


def test_a_factory_gives_its_splits_as_they_are():
    data = load_data(f"{MODULE}:stripes")
    assert data.input_shape == (3, 16, 16) and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (96, 30, 30)
    assert data.meta["source"] == f"{MODULE}:stripes" and not data.meta["val_held_out"]
    x, _ = next(data.batches("val", 30))
    assert torch.equal(x[0], __import__(MODULE, fromlist=["Stripes"]).Stripes(30, 1)[0][0])  # float: used as given


def test_a_factory_without_val_has_it_held_out_with_the_fixed_seed():
    first = load_data_factory(f"{MODULE}:stripes_without_val", val_size=20)
    again = load_data_factory(f"{MODULE}:stripes_without_val", val_size=20)
    assert (len(first.train), len(first.val), len(first.test)) == (100, 20, 30)
    assert torch.equal(first.val.images, again.val.images) and first.meta["val_held_out"]
    no_test = load_data_factory(f"{MODULE}:stripes_train_val_only")
    assert len(no_test.test) == 0 and len(no_test.val) == 30


@pytest.mark.parametrize("factory, setting, message", [
    ("one_dataset", "data", "returned a Stripes; it must return (train, val, test)"),
    ("four_things", "data", "returned 4 items; it must return (train, val, test)"),
    ("no_train", "data", "returned no train set"),
    ("raises", "data", "raised FileNotFoundError: /data/my-images is not mounted"),
    ("vectors", "data", "images must all have one shape (channels, height, width)"),
    ("not_callable", "data", "has no callable 'not_callable'"),
    ("missing", "data", "has no callable 'missing'"),
])
def test_a_factory_that_returns_the_wrong_thing_is_one_error_naming_the_setting(factory, setting, message):
    with pytest.raises(SettingError) as info:
        load_data_factory(f"{MODULE}:{factory}")
    assert info.value.name == setting and message in str(info.value), str(info.value)


def test_a_module_that_does_not_import_is_one_error():
    with pytest.raises(SettingError, match="cannot import 'tests.autoprune.no_such_module'"):
        load_data("tests.autoprune.no_such_module:data")


@pytest.mark.parametrize("factory, message", [
    ("raises", "--data: tests.autoprune.user_data:raises raised FileNotFoundError: /data/my-images is not mounted"),
    ("one_dataset", "it must return (train, val, test)"),
])
def test_bad_factories_on_the_command_line_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, factory, message):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--model", "resnet20", "--data", f"{MODULE}:{factory}", "--epochs", "1",
                 "--out", "net.pt", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "net.pt").exists()
    code = main(["search", "--budget", "50%flops", "--agent", "uniform", "--data", f"{MODULE}:{factory}",
                 "--model", "resnet20", "--out", "run", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_then_search_on_a_factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = f"{MODULE}:stripes"
    assert main(["train", "--model", "resnet20", "--data", spec, "--epochs", "1", "--max-steps", "3",
                 "--batch-size", "16", "--out", "net.pt", "--quiet"]) == 0
    assert main(["search", "--model", "net.pt", "--budget", "50%flops", "--agent", "uniform", "--finetune-epochs",
                 "1", "--bn-batches", "1", "--no-onnx", "--out", "run", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["flops_ratio"] <= 0.5 and metrics["test_accuracy"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == spec
