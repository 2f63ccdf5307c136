"""The Python API as a user calls it from a notebook: their own module, their own data."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.cli import main
from autoprune.costs import count_cost
from autoprune.pruning import describe_network

SHAPE = (3, 16, 16)
QUICK = {"finetune_epochs": 1, "val_images": 64, "bn_batches": 2, "progress": False}


class UserNet(nn.Module):
    """A small network of the user's own, not from the zoo."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _user_data(n: int, seed: int) -> TensorDataset:
    """Float images, normalised by the user (zero mean), whose class is the brightest channel."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randn(n, *SHAPE, generator=g) * 0.5
    images[torch.arange(n), labels] += 1.0
    return TensorDataset(images, labels)


@pytest.fixture(scope="module")
def user_setup():
    torch.manual_seed(0)
    model = UserNet()
    train = _user_data(384, 0)
    autoprune.finetune(model, train, epochs=3, lr=0.05, batch_size=32, progress=False)
    return model, train, _user_data(128, 1), _user_data(128, 2)


def _trains_one_step(model: nn.Module) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, *SHAPE)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("agent, extra", [("uniform", {}), ("ddpg", {"episodes": 3, "warmup_episodes": 2})])
def test_search_on_a_user_module_and_datasets(user_setup, tmp_path, agent, extra):
    model, train, val, test = user_setup
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = autoprune.search(model, train, val, test, budget="50%flops", agent=agent, out=tmp_path / agent,
                              **QUICK, **extra)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # the caller's model untouched
    assert result.run_dir == tmp_path / agent and (result.run_dir / "metrics.json").is_file()
    assert set(result.policy) == {g.name for g in describe_network(model, SHAPE).groups}
    # the network returned has the FLOPs the search predicted, and they meet the budget
    counted = count_cost(describe_network(result.model, SHAPE))
    assert counted.flops == result.metrics["flops"] <= 0.5 * result.metrics["base_flops"]
    assert result.metrics["test_accuracy"] is not None
    # ONNX Runtime agrees with torch on the fine-tuned network
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    x = torch.randn(2, *SHAPE)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(x).numpy()
    session = ort.InferenceSession(str(result.run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-3
    # the saved trainable network is the same network, and loads without UserNet
    reloaded = autoprune.load_model(result.run_dir)
    assert type(reloaded).__name__ != "UserNet"
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(x), result.model(x), atol=1e-5)
    _trains_one_step(result.model)
    _trains_one_step(reloaded)


def test_loaders_and_uint8_images_work_too(user_setup, tmp_path):
    model, _, _, _ = user_setup
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (96, *SHAPE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (96,), generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    result = autoprune.search(model, loader, loader, budget="70%params", agent="uniform", out=tmp_path / "u8",
                              onnx=False, **{**QUICK, "finetune_epochs": 0})
    assert result.metrics["params_ratio"] <= 0.7 and result.metrics["test_accuracy"] is None
    assert "no test set" in (result.run_dir / "report.md").read_text()


def test_describe_prune_and_compare(user_setup, tmp_path):
    model, train, val, _ = user_setup
    groups = autoprune.describe(model, torch.zeros(1, *SHAPE))
    assert [g["group"] for g in groups] and all(g["flops"] > 0 for g in groups)
    assert abs(sum(g["flops_share"] for g in groups) - 1.0) < 0.05
    pruned = autoprune.prune(model, {g["group"]: 0.5 for g in groups}, SHAPE)
    kept = {g.name: g.channels for g in describe_network(pruned, SHAPE).groups}
    assert all(kept[g["group"]] == g["channels"] // 2 for g in groups)
    runs = [autoprune.search(model, train, val, budget=b, agent="uniform", out=tmp_path / b.replace("%", "p"),
                             onnx=False, **{**QUICK, "finetune_epochs": 0}).run_dir for b in ("50%flops", "80%flops")]
    table = autoprune.compare(runs)
    assert list(table["run"]) == [p.name for p in runs]
    assert table["FLOPs (% of base)"].iloc[0] < table["FLOPs (% of base)"].iloc[1]


class WrongShape(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(16, 16), 0  # no channel dimension


class TwoOutputs(UserNet):
    def forward(self, x):
        out = super().forward(x)
        return out, out


@pytest.mark.parametrize("case, match", [
    ("shape", "channels, height, width"),
    ("labels", "labels outside"),
    ("output", "one tensor of shape"),
    ("empty", "no batches"),
    ("unknown setting", "unknown setting"),
    ("wrong type", "setting episodes: must be an integer"),
    ("range", "setting lower_bound"),
    ("agent", "unknown agent"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(user_setup, tmp_path, case, match):
    model, train, val, _ = user_setup
    kwargs = {"budget": "50%flops", "agent": "uniform", "out": tmp_path / "run", **QUICK}
    if case == "shape":
        train = WrongShape()
    elif case == "labels":
        train = TensorDataset(train.tensors[0][:16], torch.full((16,), 7))
    elif case == "output":
        model = TwoOutputs()
    elif case == "empty":
        train = DataLoader(TensorDataset(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long)), batch_size=4)
    elif case == "unknown setting":
        kwargs["episode"] = 3
    elif case == "wrong type":
        kwargs["episodes"] = "ten"
    elif case == "range":
        kwargs["lower_bound"] = 1.5
    elif case == "agent":
        kwargs["agent"] = "dqn"
    with pytest.raises(autoprune.AutopruneError, match=match):
        autoprune.search(model, train, val, **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_same_seed_same_result_through_the_cli_and_the_api(trained_tiny, synthetic_data, tmp_path):
    from autoprune.models import load_model, save_checkpoint

    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, trained_tiny, data="synthetic")
    settings = ["--agent", "ddpg", "--episodes", "4", "--warmup-episodes", "2", "--budget", "50%flops",
                "--finetune-epochs", "1", "--val-images", "64", "--bn-batches", "2", "--seed", "3", "--no-onnx"]
    assert main(["search", "--model", str(checkpoint), "--data", "synthetic", "--val-size", "400", *settings,
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())

    def normalised(split):  # the user's own float tensors, normalised as the built-in set does it
        return TensorDataset(synthetic_data.normalize(split.images), split.labels)

    model, _ = load_model(str(checkpoint))
    result = autoprune.search(model, normalised(synthetic_data.train), normalised(synthetic_data.val),
                              normalised(synthetic_data.test), budget="50%flops", agent="ddpg", episodes=4,
                              warmup_episodes=2, finetune_epochs=1, val_images=64, bn_batches=2, seed=3, onnx=False,
                              out=tmp_path / "api", progress=False)
    assert result.policy == cli["policy"]
    for key in ("val_accuracy_before_finetune", "test_accuracy", "flops"):
        assert result.metrics[key] == cli[key], key


TOY = '''
from autoprune.pipeline.protocol import BaseSearcher


class ToySearcher(BaseSearcher):
    """Every group at the same keep ratio, the largest that meets the budget."""

    name = "toy"

    def run(self, run):
        c = self.context
        ratio = c.constraint.uniform_ratio()
        policy = {g.name: ratio for g in c.description.groups}
        accuracy = c.evaluator.accuracy(policy)
        run.write_best_policy(policy, accuracy=accuracy)
        return self.result({"policy": policy, "accuracy": accuracy,
                            "cost_ratio": c.constraint.check(policy).ratio, "toy_ratio": ratio}, {})
'''


def test_a_new_searcher_is_one_module_and_one_registry_line(user_setup, tmp_path, monkeypatch, trained_tiny):
    from autoprune.models import save_checkpoint
    from autoprune.pipeline import registry

    (tmp_path / "toy_searcher.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    autoprune.register_searcher("toy", "toy_searcher:ToySearcher")
    try:
        model, train, val, _ = user_setup
        result = autoprune.search(model, train, val, budget="60%flops", agent="toy", out=tmp_path / "api",
                                  onnx=False, **{**QUICK, "finetune_epochs": 0})
        assert result.metrics["search"]["toy_ratio"] > 0 and result.metrics["flops_ratio"] <= 0.6
        checkpoint = tmp_path / "tiny.pt"
        save_checkpoint(checkpoint, trained_tiny, data="synthetic")
        assert main(["search", "--agent", "toy", "--budget", "60%flops", "--model", str(checkpoint), "--data",
                     "synthetic", "--val-size", "400", "--finetune-epochs", "0", "--val-images", "64", "--no-onnx",
                     "--out", str(tmp_path / "cli"), "--quiet"]) == 0
        assert json.loads((tmp_path / "cli" / "config.json").read_text())["agent"] == "toy"
    finally:
        registry.unregister("toy")
        sys.modules.pop("toy_searcher", None)


def test_build_lut_measures_a_table_for_a_user_module(user_setup, tmp_path):
    model, _, _, _ = user_setup
    table = autoprune.build_lut(model, torch.zeros(1, *SHAPE), out=tmp_path / "lut.json", channel_step=8,
                                warmup=1, runs=3, rounds=1, calibration_samples=2, progress=False)
    description = describe_network(model, SHAPE)
    table.check_model(description)  # the table is this model's
    half = {g.name: max(1, g.channels // 2) for g in description.groups}
    assert (tmp_path / "lut.json").is_file() and table.predict_ms(description) > 0
    assert table.predict_ms(description, half) > 0


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_its_search_once(tmp_path):
    """The finish times the network in a spawned process, which imports the calling script
    again: a script calling autoprune.search at its top level must not start a second search
    there (it exits at once, and the latency is timed in the script's own process)."""
    import subprocess

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import torch\n"
        "import torch.nn as nn\n"
        "from torch.utils.data import TensorDataset\n"
        "import autoprune\n"
        "torch.manual_seed(0)\n"
        "x, y = torch.randn(192, 1, 8, 8), torch.randint(0, 4, (192,))\n"
        "model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n"
        "result = autoprune.search(model, TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:]),\n"
        "                          budget='50%flops', agent='uniform', finetune_epochs=0, bn_batches=1,\n"
        "                          onnx=False, progress=False)\n"
        "print('latency measured in', result.metrics['measured_latency_settings']['process'][:8])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 1  # no second run directory from the worker
    assert "if __name__ == \"__main__\":" in done.stderr  # the worker said why it stopped
    assert "latency measured in this one" in done.stdout
