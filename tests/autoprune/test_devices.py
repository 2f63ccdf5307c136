"""One device setting through the pipeline; the CPU path is what runs here."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from autoprune.cli import main
from autoprune.devices import resolve_device
from autoprune.errors import SettingError
from autoprune.models import save_checkpoint

HAS_CUDA = torch.cuda.is_available()
FAST = ["--data", "synthetic", "--val-size", "400", "--budget", "50%flops", "--agent", "ddpg", "--episodes", "3",
        "--warmup-episodes", "2", "--val-images", "64", "--bn-batches", "2", "--finetune-epochs", "0", "--no-onnx",
        "--quiet"]


def test_devices_resolve_and_missing_ones_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    for name, message in (("tpu", "not a device"), ("cuda:99", "CUDA"), ("meta", "not supported")):
        if name.startswith("cuda") and HAS_CUDA and torch.cuda.device_count() > 99:
            continue
        with pytest.raises(SettingError, match=message):
            resolve_device(name)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["search", *FAST], ["train", "--data", "synthetic", "--epochs", "1"]])
def test_asking_for_cuda_without_it_is_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([*command, "--device", "cuda", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--device: cuda: CUDA is not available" in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def checkpoint(trained_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, trained_tiny, data="synthetic")
    return path


@pytest.mark.slow
def test_device_cpu_gives_the_policy_of_the_default(checkpoint, tmp_path):
    policies = []
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        assert main(["search", "--model", str(checkpoint), *FAST, *extra, "--out", str(tmp_path / name)]) == 0
        policies.append(json.loads((tmp_path / name / "best_policy.json").read_text())["policy"])
    if not HAS_CUDA:  # the default is the CPU here
        assert policies[0] == policies[1]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_search_on_cuda_returns_the_network_on_cuda(trained_tiny, synthetic_data, tmp_path):
    import autoprune
    from torch.utils.data import TensorDataset

    def split(s):
        return TensorDataset(synthetic_data.normalize(s.images), s.labels)

    result = autoprune.search(copy.deepcopy(trained_tiny).cuda(), split(synthetic_data.train), split(synthetic_data.val),
                              budget="50%flops", agent="ddpg", episodes=3, warmup_episodes=2, finetune_epochs=1,
                              val_images=64, device="cuda", onnx=False, out=tmp_path / "run", progress=False)
    assert next(result.model.parameters()).is_cuda
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cuda"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["search", *FAST], ["train", "--data", "synthetic", "--epochs", "1"]])
def test_mixed_precision_off_cuda_is_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([*command, "--amp", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--amp: mixed precision runs on a CUDA device only" in err, err
    assert not (tmp_path / "out").exists()


def test_mixed_precision_in_the_library_refuses_a_cpu_model(trained_tiny, synthetic_data):
    from autoprune.train import TrainConfig, train

    model = copy.deepcopy(trained_tiny)
    with pytest.raises(SettingError, match="CUDA device only; this model is on cpu"):
        train(model, synthetic_data, TrainConfig(epochs=1, amp=True, max_steps_per_epoch=1), progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_mixed_precision_trains_on_cuda_and_resumes(trained_tiny, synthetic_data, tmp_path):
    from autoprune.train import TrainConfig, evaluate, train

    model = copy.deepcopy(trained_tiny).cuda()
    before = evaluate(model, synthetic_data, "val")["accuracy"]
    config = TrainConfig(epochs=2, amp=True, lr=0.01, batch_size=64, max_steps_per_epoch=5, augment=False)
    history = train(model, synthetic_data, config, state_path=tmp_path / "state", progress=False)
    assert len(history) == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    assert evaluate(model, synthetic_data, "val")["accuracy"] >= before - 0.05
    assert torch.load(tmp_path / "state", weights_only=False)["scaler"] is not None


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_netadapt_scores_its_proposals_on_the_device(checkpoint, tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--model", str(checkpoint), "--agent", "netadapt", "--budget", "70%flops", "--data",
                 "synthetic", "--val-size", "400", "--short-term-steps", "2", "--val-images", "64", "--bn-batches",
                 "2", "--finetune-epochs", "0", "--no-onnx", "--device", "cuda", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["device"] == "cuda"
    assert (out / "metrics.json").is_file()
