"""autoprune from Python: the same pipeline as the command line, on your own objects.

    import autoprune
    result = autoprune.search(model, train_set, val_set, budget="50%flops", agent="uniform")
    result.model      # the pruned, fine-tuned network: an ordinary, trainable nn.Module
    result.policy     # group -> keep ratio
    result.metrics    # what the run measured (metrics.json)
    result.run_dir    # where everything was written

Data may be `Dataset`s or `DataLoader`s of (image, label) pairs, float (normalised as you
like) or uint8, or a built-in data set's name. Errors are `autoprune.AutopruneError`.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autoprune.devices import model_device
from autoprune.errors import AutopruneError

if TYPE_CHECKING:
    import pandas as pd
    import torch.nn as nn

    from autoprune.latency import LatencyTable


@dataclass
class SearchResult:
    """A finished search."""

    model: nn.Module  # the pruned, fine-tuned network, trainable, on the device of the model given
    policy: dict[str, float]  # group -> keep ratio
    metrics: dict  # the run's metrics.json
    run_dir: Path  # the run directory (config, history, model.pt / .pt2 / .onnx, report)


def _stop_if_reimported(what: str) -> None:
    """End a worker process that is running the calling script again.

    Whole networks are timed, and NetAdapt's proposals trained, in spawned processes, and a
    spawned process first imports the calling script's main module again. A script that calls
    autoprune at its top level, without an `if __name__ == "__main__":` guard, would start all
    its work over in there. Such a worker stops here instead; the timing falls back to the
    calling process (and says so), NetAdapt's pool fails with the reason.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # multiprocessing's own test
        sys.stderr.write(f"autoprune: a worker process is importing the calling script again, which calls "
                         f"autoprune.{what} at its top level; the worker stops. Put the script's work under "
                         f"`if __name__ == \"__main__\":` to let such workers start.\n")
        raise SystemExit(1)


def _shape(example_input) -> tuple[int, int, int]:
    """(channels, height, width) from an example batch or a shape."""
    import torch

    shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise AutopruneError(f"example_input must be a batch (N, C, H, W) or a shape (C, H, W); got {shape}")
    return shape  # type: ignore[return-value]


def _inputs(model, train, val, test, settings: dict):
    """The pipeline's inputs for objects given from Python (None: load what the settings name)."""
    import torch.nn as nn

    from autoprune.data import DATASET_NAMES, bundle_from_datasets, is_data_factory, is_image_folder
    from autoprune.pipeline.stages import Inputs
    from autoprune.train import check_model_fits

    if model is not None and not isinstance(model, (nn.Module, str)):
        raise AutopruneError(f"model must be a torch.nn.Module or a name the command line takes, not "
                             f"{type(model).__name__}")
    if isinstance(model, str):
        settings["model"] = model
        model = None
    if isinstance(train, (str, os.PathLike)):
        train = str(train)
        if train not in DATASET_NAMES and not is_image_folder(train) and not is_data_factory(train):
            raise AutopruneError(f"unknown data set {train!r}; give Datasets, an image folder, "
                                 f"package.module:factory, or one of {', '.join(DATASET_NAMES)}")
        if val is not None or test is not None:
            raise AutopruneError("with a data set's name or folder, its own validation and test splits are used; "
                                 "leave val and test out")
        settings["data"] = train
        train = None
    if model is None and train is None:
        return None  # everything by name: the pipeline loads it
    from autoprune.pipeline.stages import load_inputs
    from autoprune.pipeline.settings import SearchSettings

    if model is None or train is None:  # one side by name, the other given
        named = load_inputs(SearchSettings.from_dict({k: v for k, v in settings.items()
                                                      if k in ("model", "weights", "data", "data_dir", "val_size")}))
        if model is None:
            model = named.model
        if train is None:
            data = named.data
    if train is not None:
        if val is None:
            raise AutopruneError("a validation set is needed: candidates are scored on it (never on the test set)")
        data = bundle_from_datasets(train, val, test, num_classes=_classes(model, train))
    base = copy.deepcopy(model).cpu().eval()
    check_model_fits(base, data)
    return Inputs(model=base, data=data, meta={}, model_name=type(model).__name__, from_python=True)


def _classes(model, train) -> int | None:
    """The number of classes the model outputs, from one forward pass on a training image."""
    import torch

    from autoprune.train import check_output, eval_mode

    from torch.utils.data import DataLoader

    try:
        loader = train if isinstance(train, DataLoader) else DataLoader(train, batch_size=1)
        batch = next(iter(loader), None)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AutopruneError(f"cannot read the train set as (image, label) pairs: {first}") from None
    if batch is None:
        raise AutopruneError("the train set yielded no batches")
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise AutopruneError(f"the train set must yield (image, label) pairs; it yielded {type(batch).__name__}")
    x = torch.as_tensor(batch[0])[:1]
    if x.dim() != 4:
        raise AutopruneError(f"the train set's images must be (channels, height, width) tensors; one has shape "
                             f"{tuple(x.shape[1:])}")
    probe = copy.deepcopy(model).cpu()
    try:
        with torch.no_grad(), eval_mode(probe):
            out = probe(x.float())
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise AutopruneError(f"the model does not accept the train set's images of shape {tuple(x.shape[1:])}: "
                             f"{first}") from None
    check_output(out, 1)
    return int(out.shape[1])


def search(model=None, train=None, val=None, test=None, *, budget: str = "50%flops", agent: str = "ddpg",
           out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None, progress: bool = True,
           **settings) -> SearchResult:
    """Search for a pruning policy under `budget`, prune, fine-tune, measure and report.

    `model` is an `nn.Module` (or a name the command line's `--model` takes; None: the
    shipped ResNet-20); `train`/`val`/`test` are `Dataset`s or `DataLoader`s of (image,
    label), or `train` is a built-in data set's name. `**settings` are the fields of
    `autoprune.SearchSettings` (episodes, lut, finetune_epochs, seed, ...). The run goes
    to `out` (default runs/TIME-AGENT-BUDGET); `resume` continues a killed run directory
    with the same objects. Same seed, same result as `autoprune search` on the command line.
    """
    _stop_if_reimported("search")
    from autoprune.pipeline.stages import resume_search, run_search
    from autoprune.pipeline.settings import SearchSettings

    values = {"budget": budget, "agent": agent, **settings}
    SearchSettings.from_dict(values)  # unknown names and wrong types are refused before anything is loaded
    inputs = _inputs(model, train, val, test, values)
    if resume is not None:
        outcome = resume_search(resume, changes=values, inputs=inputs, progress=progress)
    else:
        outcome = run_search(SearchSettings.from_dict(values), out=out, inputs=inputs, progress=progress,
                             command="autoprune.search(...)")
    pruned = outcome.model
    if pruned is not None and hasattr(model, "parameters"):  # back on the device of the caller's model
        pruned = pruned.to(model_device(model))
    return SearchResult(model=pruned, policy=dict(outcome.metrics["policy"]), metrics=outcome.metrics,
                        run_dir=Path(outcome.run.path))


def prune(model: nn.Module, policy: dict[str, float] | float, example_input, *, criterion: str = "l1",
          channel_multiple: int = 1, seed: int = 0) -> nn.Module:
    """A copy of `model` with the channels `policy` removes gone for real.

    `policy` maps group names (see `describe`) to keep ratios, or is one keep ratio for
    every group. BatchNorm statistics are left as they were: recalibrate or fine-tune.
    """
    _stop_if_reimported("prune")
    from autoprune.costs import uniform_policy
    from autoprune.pruning import apply_policy, describe_network

    shape = _shape(example_input)
    base = copy.deepcopy(model).cpu().eval()
    if isinstance(policy, (int, float)):
        policy = uniform_policy(describe_network(base, shape), float(policy))
    pruned = apply_policy(base, policy, shape, criterion=criterion, channel_multiple=channel_multiple, seed=seed)
    return pruned.to(model_device(model))


def finetune(model: nn.Module, train, val=None, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 256,
             seed: int = 0, amp: bool = False, progress: bool = True) -> nn.Module:
    """Train `model` in place, on its own device, on `train` (SGD with Nesterov momentum, cosine
    learning rate) and return it; `val` defaults to `train` and is only used for the reported
    accuracy. `amp`: mixed precision, on a CUDA device only."""
    _stop_if_reimported("finetune")
    from autoprune.data import bundle_from_datasets
    from autoprune.train import TrainConfig, train as run_training

    data = bundle_from_datasets(train, val if val is not None else train, num_classes=_classes(model, train))
    run_training(model, data, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment=False,
                                          amp=amp), progress=progress)
    return model


def describe(model: nn.Module, example_input) -> list[dict]:
    """The prunable groups of `model`: one dict per group (name, channels, layers, FLOPs and
    parameters it accounts for, share of the total). FLOPs are multiply-accumulates."""
    _stop_if_reimported("describe")
    from autoprune.costs import count_cost, group_costs
    from autoprune.pruning import describe_network

    description = describe_network(copy.deepcopy(model).cpu().eval(), _shape(example_input))
    costs, total = group_costs(description), count_cost(description)
    return [{"group": g.name, "channels": g.channels, "producers": list(g.producers),
             "flops": costs[g.name].flops, "params": costs[g.name].params,
             "flops_share": costs[g.name].flops / max(1, total.flops),
             "params_share": costs[g.name].params / max(1, total.params)} for g in description.groups]


def build_lut(model: nn.Module, example_input, *, backend: str = "torch", threads: int = 1, batch: int | None = None,
              out: str | os.PathLike | None = None, channel_step: int = 4, progress: bool = True,
              **options) -> LatencyTable:
    """Measure a latency lookup table for `model` on this machine (run it on the target device);
    written to `out` (default latency_luts/DEVICE-BACKEND-tT-bB-MODEL.json). `backend` is
    torch, onnxruntime, openvino or torch-cuda; `batch` defaults to the backend's (1 on the
    CPU, 64 on a GPU)."""
    _stop_if_reimported("build_lut")
    from autoprune.latency import build_lut as measure, default_lut_path, get_backend
    from autoprune.pruning import describe_network

    base = copy.deepcopy(model).cpu().eval()
    description = describe_network(base, _shape(example_input))
    if not description.groups:
        raise AutopruneError("the model has no prunable layer (no Conv2d/Linear feeding another layer)")
    runtime = get_backend(backend, threads)
    batch = batch or runtime.default_batch
    path = Path(out) if out else default_lut_path(runtime, batch, type(model).__name__.lower())
    return measure(base, description, runtime, path, model_name=type(model).__name__, batch=batch,
                   channel_step=channel_step, progress=progress, **options)


def compare(run_dirs, *, out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Finished runs side by side, one row per run; with `out`, also the CSV, Markdown and plots."""
    _stop_if_reimported("compare")
    from autoprune.comparison import comparison_table, load_runs, write_comparison

    records = load_runs([str(p) for p in run_dirs])
    if out is not None:
        return write_comparison(records, out)[0]
    return comparison_table(records)


def load_model(path: str | os.PathLike) -> nn.Module:
    """The fine-tuned pruned network of a run directory (or its `model.pt`), trainable."""
    from autoprune.export import load_trainable
    from autoprune.pipeline.finish import TRAINABLE_FILE

    path = Path(path)
    file = path / TRAINABLE_FILE if path.is_dir() else path
    if not file.is_file():
        raise AutopruneError(f"{file} not found; is {path} a finished run directory?")
    return load_trainable(file)[0]
