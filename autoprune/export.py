"""Saving pruned models so that they load without the Python class that built them.

A pruned network no longer matches its class's constructor, so it is saved as a
`torch.export` program (`.pt2`): plain PyTorch loads it with
`torch.export.load(path).module()`, and `autoprune eval --model file.pt2` reads it too.
ONNX export goes through PyTorch's exporter for runtimes such as ONNX Runtime.
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
