import pytest
import torch

import autoprune.train as train_module
from autoprune.errors import AutopruneError
from autoprune.models import build_model
from autoprune.train import TrainConfig, evaluate, train

CONFIG = TrainConfig(epochs=3, batch_size=64, lr=0.05, max_steps_per_epoch=4, seed=1)


def test_training_learns_the_synthetic_set(synthetic_data, trained_tiny):
    assert evaluate(trained_tiny, synthetic_data, "test")["accuracy"] > 0.5  # chance is 0.1


def test_killed_run_resumes_to_the_same_weights(synthetic_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = build_model("resnet20", width_mult=0.25)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    train(reference, synthetic_data, CONFIG, progress=False)

    state = tmp_path / "run.state"
    real_save = train_module.atomic_torch_save
    calls = {"n": 0}

    def save_then_die(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed right after the second epoch was saved

    monkeypatch.setattr(train_module, "atomic_torch_save", save_then_die)
    model = build_model("resnet20", width_mult=0.25)
    model.load_state_dict(start)
    with pytest.raises(KeyboardInterrupt):
        train(model, synthetic_data, CONFIG, state_path=state, progress=False)
    monkeypatch.setattr(train_module, "atomic_torch_save", real_save)

    resumed = build_model("resnet20", width_mult=0.25)
    history = train(resumed, synthetic_data, CONFIG, state_path=state, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    ref, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.allclose(ref[k].float(), got[k].float(), atol=1e-6) for k in ref)


def test_state_from_other_settings_is_refused(synthetic_data, tmp_path):
    state = tmp_path / "run.state"
    train(build_model("resnet20", width_mult=0.25), synthetic_data,
          TrainConfig(epochs=1, max_steps_per_epoch=1), state_path=state, progress=False)
    with pytest.raises(AutopruneError, match="other settings"):
        train(build_model("resnet20", width_mult=0.25), synthetic_data,
              TrainConfig(epochs=2, max_steps_per_epoch=1), state_path=state, progress=False)


def test_model_that_does_not_fit_the_images(synthetic_data):
    model = build_model("resnet20", in_channels=3)
    with pytest.raises(AutopruneError, match="does not accept"):
        train(model, synthetic_data, CONFIG, progress=False)
    with pytest.raises(AutopruneError, match="classes"):
        train(build_model("resnet20", num_classes=7), synthetic_data, CONFIG, progress=False)
