"""Shared fixtures: small data and models that make the suite fast on two CPU cores."""

from __future__ import annotations

import pytest
import torch

from autoprune.data import load_data
from autoprune.models import build_model
from autoprune.train import TrainConfig, train

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_data():
    """The generated data set: 2000 training images (400 held out), 500 test images, 1×28×28."""
    return load_data("synthetic", val_size=400)


@pytest.fixture(scope="session")
def trained_tiny(synthetic_data):
    """A narrow ResNet-20 trained briefly on the synthetic set (well above chance)."""
    torch.manual_seed(0)
    model = build_model("resnet20", width_mult=0.5)
    train(model, synthetic_data, TrainConfig(epochs=3, batch_size=64, lr=0.05), progress=False)
    return model


@pytest.fixture(scope="session")
def formula_lut(trained_tiny):
    """A latency table for `trained_tiny` filled from a formula (10 µs per layer + 1 ns per MAC),
    so latency tests do not depend on how busy the machine is."""
    from autoprune.costs import layer_cost
    from autoprune.latency import LatencyTable, model_fingerprint, plan_grid
    from autoprune.pruning import describe_network

    description = describe_network(trained_tiny, (1, 28, 28))
    entries = {}
    for key, item in plan_grid(description, channel_step=4).items():
        layer = item["layer"]
        ins = item["in"] if layer.kind != "dwconv" else [0]

        def ms(cin, cout, layer=layer):
            return 0.01 + 1e-6 * layer_cost(layer, cout if layer.kind == "dwconv" else cin, cout).flops

        entries[key] = {"in": ins, "out": item["out"], "ms": [[ms(i, o) for o in item["out"]] for i in ins]}
    data = {"format": "autoprune-latency-lut", "version": 1, "complete": True,
            "model": {"name": "tiny", "fingerprint": model_fingerprint(description)},
            "runtime": {"backend": "formula", "threads": 1, "batch": 1}, "protocol": {},
            "call_overhead_ms": {}, "calibration": {"scale": 1.0, "offset_ms": 0.05}, "entries": entries}
    return LatencyTable(data, "formula")
