
import pytest
import torch

from autoprune.errors import AutopruneError
from autoprune.models import ZOO, build_model, load_model, save_checkpoint


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 28, 28)])
def test_zoo_models_fit_small_images_of_any_channel_count(name, shape):
    model = build_model(name, in_channels=shape[0], input_size=shape[1], num_classes=7).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_checkpoint_round_trip(tmp_path):
    model = build_model("vgg")
    path = tmp_path / "vgg.pt"
    save_checkpoint(path, model, data="fashion-mnist", test_accuracy=0.5)
    loaded, meta = load_model(str(path))
    assert meta["data"] == "fashion-mnist" and meta["test_accuracy"] == 0.5
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))


def test_factory_with_weights_and_whole_saved_model(tmp_path):
    model = build_model("resnet20")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(model, tmp_path / "whole.pt")
    a, _ = load_model("tests.autoprune.user_model:small_cnn")
    assert isinstance(a, torch.nn.Module)
    b, _ = load_model("resnet20", tmp_path / "weights.pt")
    c, _ = load_model(str(tmp_path / "whole.pt"))
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(b(x), c(x))


def test_bad_model_inputs(tmp_path):
    with pytest.raises(AutopruneError, match="neither a zoo model"):
        load_model("resnet1000")
    with pytest.raises(AutopruneError, match="cannot import"):
        load_model("no_such_package.mod:factory")
    with pytest.raises(AutopruneError, match="no callable"):
        load_model("tests.autoprune.user_model:missing")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(AutopruneError, match="cannot load"):
        load_model(str(corrupt))
    torch.save(build_model("vgg").state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(AutopruneError, match="does not fit model resnet20"):
        load_model("resnet20", tmp_path / "vgg.pt")
    with pytest.raises(AutopruneError, match="weights need a model"):
        load_model(None, tmp_path / "vgg.pt")


def test_default_checkpoint_is_shipped_and_accurate():
    from autoprune.models import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.fail(f"{DEFAULT_CHECKPOINT} is missing from the package")
    model, meta = load_model(None)
    assert meta["data"] == "fashion-mnist"
    assert meta["test_accuracy"] >= 0.93
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
