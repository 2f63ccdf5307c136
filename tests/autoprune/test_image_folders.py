"""Your own images from the command line: DIR/train/<class>/*.png, any size and channel count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from autoprune.cli import main
from autoprune.costs import count_cost, policy_channels
from autoprune.data import load_image_folder
from autoprune.models import ZOO, build_model
from autoprune.pruning import apply_policy, describe_network


def make_folder(root, classes=("cat", "dog", "fox"), per_class=12, size=(64, 64), mode="RGB", splits=("train",),
                seed=0):
    """Generated PNGs whose class is the channel (or brightness) that stands out."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 90, size=(size[1], size[0], 3), dtype=np.uint8)
                pixels[:, :, k % 3] += 120
                image = Image.fromarray(pixels, "RGB").convert(mode)
                image.save(root / split / name / f"{i}.png")
    return root


def test_a_folder_loads_with_its_classes_sizes_and_a_held_out_split(tmp_path):
    data = load_image_folder(make_folder(tmp_path / "rgb", splits=("train", "test")), val_size=100)
    assert data.input_shape == (3, 64, 64) and data.num_classes == 3 and data.meta["classes"] == ["cat", "dog", "fox"]
    assert len(data.val) == 36 // 5 and len(data.train) == 36 - 36 // 5 and len(data.test) == 36
    x, y = next(data.batches("train", 8))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.5  # normalised with the train split's statistics
    grey = load_image_folder(make_folder(tmp_path / "grey", mode="L", size=(40, 30)), image_size=24)
    assert grey.input_shape == (1, 24, 24)


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("name", ZOO)
def test_the_cost_model_stays_exact_at_other_sizes(name, size):
    model = build_model(name, in_channels=3, num_classes=3, input_size=size).eval()
    description = describe_network(model, (3, size, size))
    policy = {g.name: 0.5 for g in description.groups}
    pruned = apply_policy(model, policy, (3, size, size))
    kept = policy_channels(description, policy)
    assert count_cost(describe_network(pruned, (3, size, size))) == count_cost(description, kept)
    assert pruned(torch.zeros(2, 3, size, size)).shape == (2, 3)


@pytest.mark.slow
def test_train_then_search_then_compare_on_an_image_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_folder(tmp_path / "images", splits=("train", "val", "test"), per_class=8)
    assert main(["train", "--model", "resnet20", "--data", str(folder), "--epochs", "1", "--max-steps", "2",
                 "--batch-size", "16", "--out", "net.pt", "--quiet"]) == 0
    runs = []
    for agent in ("uniform", "random"):
        out = tmp_path / agent
        assert main(["search", "--model", "net.pt", "--budget", "50%flops", "--agent", agent, "--samples", "2",
                     "--finetune-epochs", "1", "--bn-batches", "1", "--val-images", "24", "--no-onnx",
                     "--out", str(out), "--quiet"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["flops_ratio"] <= 0.5 and metrics["test_accuracy"] is not None
        assert json.loads((out / "config.json").read_text())["data"] == str(folder.resolve())
        runs.append(str(out))
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    assert "uniform" in capsys.readouterr().out


def _unreadable(root):
    make_folder(root)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")


def _mixed(root):
    make_folder(root)
    Image.new("RGB", (50, 50)).save(root / "train" / "dog" / "odd.png")


@pytest.mark.parametrize("build, message", [
    (lambda root: (root / "train" / "cat").mkdir(parents=True), "holds no images"),
    (lambda root: root.mkdir(), "no train/ directory"),
    (_unreadable, "broken.png"),
    (_mixed, "different sizes"),
    (lambda root: (make_folder(root), make_folder(root, classes=("cat", "cow"), splits=("val",))), "differ from"),
])
def test_bad_folders_are_one_line_and_exit_2(tmp_path, capsys, build, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "images"
    build(root)
    code = main(["train", "--model", "resnet20", "--data", str(root), "--epochs", "1", "--out", "net.pt", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "net.pt").exists()
