"""Saving pruned models so that they load without the Python class that built them.

A pruned network no longer matches its class's constructor. Three forms:
- `model.pt`: a trainable module (`save_trainable`: traced by torch.fx, so it unpickles
  with PyTorch alone), for training further;
- `model.pt2`: a `torch.export` program for inference (`torch.export.load(path).module()`);
- `model.onnx`: through PyTorch's exporter, for runtimes such as ONNX Runtime.
`autoprune eval --model FILE` reads each of the first two.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from autoprune.errors import AutopruneError
from autoprune.io import atomic_write_bytes

log = logging.getLogger(__name__)

META_FILE = "autoprune.json"


def save_pruned_model(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int],
                      meta: dict | None = None) -> None:
    """Write `model` as a torch.export program (atomically), with JSON metadata inside."""
    model = model.eval()
    example = (torch.zeros(2, *input_shape),)  # batch 2: an example of 1 fixes the batch size
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
        except Exception:  # noqa: BLE001 - fall back to a fixed batch size of 1
            program = torch.export.export(model, (example[0][:1],))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta or {})})
    atomic_write_bytes(path, buffer.getvalue())


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a `.pt2` written by `save_pruned_model`: (callable module, metadata)."""
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad archives
        raise AutopruneError(f"cannot load exported model {path}: {exc}") from None
    meta = json.loads(extra[META_FILE]) if extra.get(META_FILE) else {}
    module = program.module()
    module.autoprune_inference_only = str(path)  # runs and evaluates, but cannot be traced for pruning
    return module, meta


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int],
                dynamic_batch: bool = True) -> None:
    """Export `model` to ONNX (opset chosen by PyTorch), written atomically."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise AutopruneError("ONNX export needs the onnx and onnxscript packages: "
                             "pip install 'autoprune[onnx]'") from None
    model = model.eval()
    example = (torch.zeros(2 if dynamic_batch else 1, *input_shape),)
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},)} if dynamic_batch else {}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    sink = io.StringIO()
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # it warns about torchvision operators it cannot register
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, str(tmp), input_names=["input"], output_names=["logits"],
                              external_data=False, **kwargs)
        os.replace(tmp, target)
    except Exception as exc:  # noqa: BLE001
        raise AutopruneError(f"ONNX export to {path} failed: {str(exc).splitlines()[0]}") from None
    finally:
        onnx_log.setLevel(level)
        tmp.unlink(missing_ok=True)


TRAINABLE_FORMAT = "autoprune-trainable-model"


def trainable_module(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Module, str]:
    """A copy of `model` that unpickles without the Python class that built it, and how.

    torch.fx traces the network down to PyTorch's own layers: the result is an ordinary
    `nn.Module` (a GraphModule) with the same parameters and buffers, trainable, whose
    pickle holds the generated code rather than a reference to the original class. A
    network fx cannot trace (data-dependent control flow) is kept as it is: loading it
    then needs its class importable, and the returned kind says so.
    """
    import copy

    import torch.fx

    source = copy.deepcopy(model).cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.fx.symbolic_trace(source)
        for node in traced.graph.nodes:
            node.type = None  # string annotations (`from __future__ import annotations`) do not pickle
        traced.recompile()
        traced.train(model.training)
        example = torch.randn(2, *input_shape)
        with torch.no_grad():
            source.eval(), traced.eval()
            same = torch.allclose(source(example), traced(example), rtol=1e-4, atol=1e-5)
        traced.train(model.training)
        if same:
            return traced, "torch.fx GraphModule"
        log.warning("the traced network differs from the original; saving the module itself")
    except Exception as exc:  # noqa: BLE001 - fx raises many types on code it cannot trace
        log.info("torch.fx cannot trace the network (%s); saving the module itself", type(exc).__name__)
    source.train(model.training)
    return source, f"module of class {type(model).__module__}.{type(model).__qualname__}"


def save_trainable(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int],
                   meta: dict | None = None) -> str:
    """Write `model` so that `load_trainable(path)` (or `torch.load(path, weights_only=False)["model"]`)
    gives back a trainable `nn.Module`; returns how it was saved (see `trainable_module`)."""
    from autoprune.io import atomic_torch_save

    module, kind = trainable_module(model, input_shape)
    atomic_torch_save({"format": TRAINABLE_FORMAT, "version": 1, "model": module, "kind": kind,
                       "input_shape": list(input_shape), "meta": meta or {}}, path)
    return kind


def load_trainable(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """(trainable module, metadata) from a file written by `save_trainable`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AutopruneError(f"cannot load {path}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != TRAINABLE_FORMAT:
        raise AutopruneError(f"{path} is not a network saved by autoprune.save_trainable")
    return payload["model"], {**payload.get("meta", {}), "input_shape": payload.get("input_shape")}


def check_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int],
               batch: int = 2, seed: int = 0) -> float:
    """Largest absolute difference between ONNX Runtime's outputs for `path` and `model`'s
    on one random batch (raises AutopruneError when ONNX Runtime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise AutopruneError("checking an ONNX export needs onnxruntime: pip install 'autoprune[onnx]'") from None
    example = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(example).numpy()
    model.train(was_training)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    return float(abs(got - expected).max())
