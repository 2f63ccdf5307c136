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
