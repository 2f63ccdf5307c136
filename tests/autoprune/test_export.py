import subprocess
import sys

import numpy as np
import pytest
import torch

from autoprune.costs import uniform_policy
from autoprune.export import export_onnx, load_exported, save_pruned_model
from autoprune.models import build_model, load_model
from autoprune.pruning import apply_policy, describe_network


@pytest.fixture(scope="module")
def pruned():
    model = build_model("resnet20")
    return apply_policy(model, uniform_policy(describe_network(model, (1, 28, 28)), 0.4), (1, 28, 28)).eval()


def test_pruned_model_loads_in_plain_torch_without_autoprune(pruned, tmp_path):
    path = tmp_path / "pruned.pt2"
    save_pruned_model(pruned, path, (1, 28, 28), meta={"policy": "uniform:0.4"})
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    expected = pruned(x)
    script = (
        "import sys, torch\n"
        "sys.modules['autoprune'] = None  # any import of autoprune would fail\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5)
    module, meta = load_exported(path)
    assert meta == {"policy": "uniform:0.4"}
    loaded, _ = load_model(str(path))
    assert torch.allclose(loaded(x[:1]), expected[:1], atol=1e-5)


def test_onnx_export_runs_in_onnx_runtime(pruned, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "pruned.onnx"
    export_onnx(pruned, path, (1, 28, 28))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 1, 28, 28)
    (got,) = session.run(None, {"input": x.numpy()})
    assert np.allclose(got, pruned(x).detach().numpy(), atol=1e-4)
