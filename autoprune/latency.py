"""Latency lookup tables (LUTs) measured on the target device, and latency predictions.

Building a table (`build_lut`) measures, on the machine it runs on, every layer the
search can produce: for each layer signature (kind, kernel, stride, input size, what
follows it: BatchNorm, activation) a grid of input × output channel counts. Each entry
is the median of many timed runs after a warm-up, with a fixed thread count. Layers
with the same signature share one table.

What a per-layer sum misses (adds, pooling, the classifier's glue, framework overhead,
and the difference between a layer timed alone and inside a network) is measured too:
the builder times the whole network at a few random policies and fits
`measured ≈ scale × Σ layers + offset`, stored in the file as `calibration`.

A table is plain JSON, readable and usable on any machine; this module needs only
torch, numpy and the chosen runtime (no gymnasium, no stable-baselines3), so a target
board with Python and the runtime can build one alone.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from autoprune.costs import LayerSpec, Link, NetworkDescription, count_cost, group_choices, policy_channels
from autoprune.errors import AutopruneError
from autoprune.io import WriterLock, atomic_write_json, model_from_bytes, model_to_bytes

log = logging.getLogger(__name__)

LUT_FORMAT = "autoprune-latency-lut"
LUT_VERSION = 1
TIMED_KINDS = ("conv", "dwconv", "linear")
WRITE_EVERY_S = 2.0  # how often an unfinished build is flushed to disk


# ---------------------------------------------------------------- signatures

def signature_key(layer: LayerSpec) -> str:
    """The part of a layer's identity that is not its channel counts, as a readable key."""
    kh, kw = layer.kernel
    sh, sw = layer.stride
    h, w = layer.in_size
    post = "+".join(layer.post) or "none"
    if layer.kind == "linear":
        at = "" if layer.in_size == (1, 1) else f"|in{h}x{w}"  # run at every position of a map
        return f"linear{at}|bias={int(layer.bias)}|post={post}"
    # a grouped convolution is timed as one (its group count is kept when it is pruned)
    groups = f"|g{layer.groups}" if layer.kind == "conv" and layer.groups > 1 else ""
    pad = _padding(layer)
    padded = "" if pad == (kh // 2, kw // 2) else f"|p{pad[0]}x{pad[1]}"  # not the usual "same" padding
    return f"{layer.kind}|k{kh}x{kw}|s{sh}x{sw}{groups}{padded}|in{h}x{w}|bias={int(layer.bias)}|post={post}"


def model_fingerprint(description: NetworkDescription) -> str:
    """Hash of what makes two networks' latency tables interchangeable (shapes, not names)."""
    parts = [(signature_key(layer), layer.in_channels, layer.out_channels, *([layer.calls] if layer.calls > 1 else []))
             for layer in description.layers if layer.kind in TIMED_KINDS]
    return hashlib.sha256(json.dumps([description.input_shape, parts]).encode()).hexdigest()[:16]


def _channel_grid(maximum: int, step: int) -> list[int]:
    """Every count up to 2·step, then step, 3·step, …, maximum: every count from 1 to maximum
    lies between two points, densest where few channels are left (there a channel is a large
    share of a layer's work and the time is least linear in it)."""
    points = {maximum, *range(1, min(2 * step, maximum) + 1), *range(step, maximum + 1, step)}
    return sorted(p for p in points if 1 <= p <= maximum)


def _link_grid(link: Link, grids: Mapping[str, list[int]], step: int) -> list[int]:
    """Features a link can carry: its group's grid, or for a branch holding only some of the
    group's channels every count from 1 to all of them (how many survive depends on the
    criterion's ranking, which a table must not assume)."""
    if link.channels is None:
        return [link.per * c for c in grids[link.group]]
    return [link.per * c for c in _channel_grid(len(link.channels), step)]


def _reachable(fixed: int, links: tuple[Link, ...], full: int, grids: Mapping[str, list[int]], step: int) -> list[int]:
    """Channel counts one side of a layer can have under any policy (a grid, when several groups meet)."""
    if not links:
        return [full]
    if len(links) == 1:
        return sorted({fixed + c for c in _link_grid(links[0], grids, step)})
    low = fixed + sum(min(_link_grid(link, grids, step)) for link in links)
    spacing = max(1, (full - low) // 16)
    return sorted({*range(low, full + 1, spacing), full})


def plan_grid(description: NetworkDescription, channel_step: int = 4) -> dict[str, dict]:
    """Signature key -> {"layer": one representative LayerSpec, "in": [...], "out": [...]}."""
    grids = {g.name: sorted({min(group_choices(g)), *(c for c in _channel_grid(g.channels, channel_step)
                                                       if c % g.multiple == 0 and c >= g.min_keep)})
             for g in description.groups}
    plan: dict[str, dict] = {}
    for layer in description.layers:
        if layer.kind not in TIMED_KINDS:
            continue
        key = signature_key(layer)
        outs = _reachable(layer.out_fixed, layer.out_links, layer.out_channels, grids, channel_step)
        # a depthwise conv's inputs are its outputs: its grid has the single input axis point 0
        ins = (_reachable(layer.in_fixed, layer.in_links, layer.in_channels, grids, channel_step)
               if layer.kind != "dwconv" else [0])
        entry = plan.setdefault(key, {"layer": layer, "in": set(), "out": set()})
        entry["in"].update(ins)
        entry["out"].update(outs)
    return {k: {"layer": v["layer"], "in": sorted(v["in"]), "out": sorted(v["out"])} for k, v in plan.items()}


def _padding(layer: LayerSpec) -> tuple[int, int]:
    """The padding that gives the layer its traced output size (a patchify stem, 4×4 at stride 4,
    has none; a 3×3 has 1)."""
    return tuple(max(0, -(-((o - 1) * s + k - i) // 2))  # type: ignore[return-value]
                 for i, o, s, k in zip(layer.in_size, layer.out_size, layer.stride, layer.kernel))


def unit_module(layer: LayerSpec, cin: int, cout: int) -> nn.Module:
    """The layer as it runs inside the network: conv/linear, then its BatchNorm and activation."""
    if layer.kind == "linear":
        core: nn.Module = nn.Linear(cin, cout, bias=layer.bias)
    else:
        groups = cout if layer.kind == "dwconv" else layer.groups
        cin = cout if layer.kind == "dwconv" else cin
        core = nn.Conv2d(cin, cout, layer.kernel, layer.stride, _padding(layer), groups=groups, bias=layer.bias)
    parts = [core]
    for op in layer.post:
        if op == "bn":
            parts.append(nn.BatchNorm2d(cout) if layer.kind != "linear" else nn.BatchNorm1d(cout))
        elif op == "relu":
            parts.append(nn.ReLU(inplace=True))
        elif op == "relu6":
            parts.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*parts).eval()


def shape_key(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


def unit_input_shape(layer: LayerSpec, cin: int, cout: int, batch: int) -> tuple[int, ...]:
    if layer.kind == "linear":
        return (batch, cin) if layer.in_size == (1, 1) else (batch, *layer.in_size, cin)
    channels = cout if layer.kind == "dwconv" else cin
    return (batch, channels, *layer.in_size)


# ---------------------------------------------------------------- backends

def wall_ns(run: Callable[[], object]) -> int:
    """Wall time of one call, in nanoseconds."""
    start = time.perf_counter_ns()
    run()
    return time.perf_counter_ns() - start


def time_runs(run: Callable[[], object], warmup: int, runs: int, clock: Callable[[Callable], int] = wall_ns) -> float:
    """Median time of `runs` calls after `warmup` calls, in milliseconds; `clock` times one
    call in nanoseconds (wall time by default, a backend's own clock otherwise)."""
    for _ in range(warmup):
        run()
    samples = [clock(run) for _ in range(runs)]
    return statistics.median(samples) / 1e6


class LatencyBackend:
    """A runtime that executes a model on this machine. Subclass it to add one.

    `runner(module, input_shape)` returns a zero-argument callable that runs one
    inference; the same path times single layers and whole networks.
    """

    name = "base"
    default_batch = 1  # the batch a table is built for unless the user names one

    def __init__(self, threads: int = 1):
        self.threads = threads

    def version(self) -> str:
        raise NotImplementedError

    def clock(self, run: Callable[[], object]) -> int:
        """Nanoseconds one call of `run` takes on this runtime (wall time unless overridden)."""
        return wall_ns(run)

    def device(self) -> dict:
        """The device a table built with this backend belongs to (recorded in its `device`)."""
        return device_metadata()

    def device_tag(self) -> str:
        """The device as a file-name fragment, for default LUT paths."""
        return device_slug()

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], object]:
        raise NotImplementedError

    def null_runner(self, input_shape: tuple[int, ...]) -> Callable[[], object]:
        """One call that does no work on an input of this shape: the runtime's per-call overhead."""
        unit = nn.Sequential(nn.Identity()).eval()
        unit._autoprune_unit = True
        return self.runner(unit, input_shape)

    def metadata(self) -> dict:
        return {"backend": self.name, "backend_version": self.version(), "threads": self.threads,
                "dtype": "float32"}


class TorchBackend(LatencyBackend):
    """PyTorch eager mode on the CPU, in inference mode."""

    name = "torch"

    def version(self) -> str:
        return torch.__version__

    def runner(self, module, input_shape):
        x = torch.randn(*input_shape)
        module = module.eval()

        def run():
            with torch.inference_mode():
                return module(x)

        return run


class OnnxRuntimeBackend(LatencyBackend):
    """ONNX Runtime's CPU execution provider with fixed intra-op threads.

    `optimization="extended"` (default) applies ONNX Runtime's basic and extended graph
    fusions (Conv+BatchNorm+activation, ...) but not its NCHWc layout transformation.
    That transformation ("all") speeds up networks whose channel counts are multiples of
    8, but pruned layers with other counts fall out of it, so that per-layer
    latencies no longer add up to the network's; with "all", prune to
    `--channel-multiple 8`. Single layers are written as ONNX graphs directly (fast);
    whole networks go through PyTorch's ONNX exporter.
    """

    name = "onnxruntime"
    LEVELS = ("basic", "extended", "all")

    def __init__(self, threads: int = 1, optimization: str = "extended"):
        super().__init__(threads)
        if optimization not in self.LEVELS:
            raise AutopruneError(f"unknown ONNX Runtime optimization level {optimization!r}; "
                                 f"choose one of {', '.join(self.LEVELS)}")
        self.optimization = optimization
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise AutopruneError("backend onnxruntime is not installed: pip install onnxruntime "
                                 "(or pip install 'autoprune[onnx]')") from None

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def metadata(self) -> dict:
        return {**super().metadata(), "graph_optimization": self.optimization}

    def _session(self, model_bytes: bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[self.optimization]
        options.log_severity_level = 3
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def runner(self, module, input_shape):
        model_bytes = _unit_to_onnx(module, input_shape) if getattr(module, "_autoprune_unit", False) \
            else _network_to_onnx(module, input_shape)
        session = self._session(model_bytes)
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        return lambda: session.run(None, {name: x})


class OpenVINOBackend(LatencyBackend):
    """Intel OpenVINO's CPU plugin: the same ONNX graphs as ONNX Runtime (single layers
    written directly, whole networks through PyTorch's exporter), compiled for the CPU
    with a fixed number of inference threads, one stream, the latency hint and float32
    inference (OpenVINO would otherwise run bf16 on CPUs that have it)."""

    name = "openvino"

    def __init__(self, threads: int = 1):
        super().__init__(threads)
        try:
            import onnx  # noqa: F401
            import openvino  # noqa: F401
        except ImportError as exc:
            raise AutopruneError(f"backend openvino is not installed ({exc.name} is missing): pip install openvino "
                                 "onnx (or pip install 'autoprune[openvino]')") from None
        self._core = None

    def version(self) -> str:
        import openvino

        return openvino.__version__

    def metadata(self) -> dict:
        return {**super().metadata(), "performance_hint": "LATENCY", "streams": 1}

    def runner(self, module, input_shape):
        import openvino

        if self._core is None:
            self._core = openvino.Core()
        model_bytes = _unit_to_onnx(module, input_shape) if getattr(module, "_autoprune_unit", False) \
            else _network_to_onnx(module, input_shape)
        compiled = self._core.compile_model(self._core.read_model(model_bytes), "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        request.set_input_tensor(openvino.Tensor(x))
        return request.infer


class TorchCudaBackend(LatencyBackend):
    """PyTorch eager on a CUDA GPU, in inference mode, timed with CUDA events around each
    call and synchronised after it (the GPU's time for the call, not the host's). cuDNN
    picks its fastest algorithm per shape during the warm-up. The default batch (64) keeps
    the GPU busy; build for the batch you serve with `--batch`. `threads` sets the host's
    intra-op threads, which matter little here."""

    name = "torch-cuda"
    default_batch = 64

    def __init__(self, threads: int = 1, device: str = "cuda"):
        super().__init__(threads)
        if not torch.cuda.is_available():
            raise AutopruneError("backend torch-cuda needs a CUDA GPU and none is visible here "
                                 "(torch.cuda.is_available() is False)")
        self.cuda = torch.device(device)
        if self.cuda.type != "cuda":
            raise AutopruneError(f"backend torch-cuda runs on a CUDA device, not {device!r}")
        if self.cuda.index is not None and self.cuda.index >= torch.cuda.device_count():
            raise AutopruneError(f"there is no {device} (this machine has {torch.cuda.device_count()} CUDA device(s))")
        torch.backends.cudnn.benchmark = True

    def version(self) -> str:
        return f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"

    def metadata(self) -> dict:
        return {**super().metadata(), "cuda_device": str(self.cuda)}

    def device(self) -> dict:
        props = torch.cuda.get_device_properties(self.cuda)
        return {**device_metadata(), "gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                "gpu_memory_gb": round(props.total_memory / 2**30, 1)}

    def device_tag(self) -> str:
        return slug(torch.cuda.get_device_properties(self.cuda).name)

    def clock(self, run):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return int(start.elapsed_time(end) * 1e6)

    def runner(self, module, input_shape):
        module = module.to(self.cuda).eval()
        x = torch.randn(*input_shape, device=self.cuda)

        def run():
            with torch.inference_mode():
                return module(x)

        return run


def _network_to_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    import tempfile

    from autoprune.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(module, path, tuple(input_shape[1:]), dynamic_batch=input_shape[0] != 1)
        return path.read_bytes()


def _unit_to_onnx(module: nn.Sequential, input_shape: tuple[int, ...]) -> bytes:
    """A conv/linear + BatchNorm + activation unit as a small ONNX graph."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def weighted_inputs(part: nn.Module, i: int) -> list[str]:
        inits.append(numpy_helper.from_array(part.weight.detach().numpy(), f"w{i}"))
        if part.bias is None:
            return [current, f"w{i}"]
        inits.append(numpy_helper.from_array(part.bias.detach().numpy(), f"b{i}"))
        return [current, f"w{i}", f"b{i}"]

    current = "x"
    for i, part in enumerate(module):
        out = f"t{i}"
        if isinstance(part, nn.Conv2d):
            inputs = weighted_inputs(part, i)
            pads = [part.padding[0], part.padding[1], part.padding[0], part.padding[1]]
            nodes.append(helper.make_node("Conv", inputs, [out], kernel_shape=list(part.kernel_size),
                                          strides=list(part.stride), pads=pads, group=part.groups))
        elif isinstance(part, nn.Linear) and len(input_shape) > 2:  # at every position of a map: MatMul, Add
            inits.append(numpy_helper.from_array(part.weight.detach().numpy().T.copy(), f"w{i}"))
            product = out if part.bias is None else f"p{i}"
            nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [product]))
            if part.bias is not None:
                inits.append(numpy_helper.from_array(part.bias.detach().numpy(), f"b{i}"))
                nodes.append(helper.make_node("Add", [product, f"b{i}"], [out]))
        elif isinstance(part, nn.Linear):
            nodes.append(helper.make_node("Gemm", weighted_inputs(part, i), [out], transB=1))
        elif isinstance(part, nn.modules.batchnorm._BatchNorm):
            for tag, value in (("s", part.weight), ("o", part.bias), ("m", part.running_mean),
                               ("v", part.running_var)):
                inits.append(numpy_helper.from_array(value.detach().numpy().astype(np.float32), f"{tag}{i}"))
            nodes.append(helper.make_node("BatchNormalization", [current, f"s{i}", f"o{i}", f"m{i}", f"v{i}"],
                                          [out], epsilon=part.eps))
        elif isinstance(part, nn.ReLU6):
            inits += [numpy_helper.from_array(np.array(0, np.float32), f"lo{i}"),
                      numpy_helper.from_array(np.array(6, np.float32), f"hi{i}")]
            nodes.append(helper.make_node("Clip", [current, f"lo{i}", f"hi{i}"], [out]))
        elif isinstance(part, nn.ReLU):
            nodes.append(helper.make_node("Relu", [current], [out]))
        elif isinstance(part, nn.Identity):
            nodes.append(helper.make_node("Identity", [current], [out]))
        else:
            raise AutopruneError(f"no ONNX form for {type(part).__name__}")
        current = out
    graph = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def backend_for(runtime: dict) -> LatencyBackend:
    """The backend a table's `runtime` record was measured with, with the same options."""
    options = {}
    if "graph_optimization" in runtime:
        options["optimization"] = runtime["graph_optimization"]
    if "cuda_device" in runtime:
        options["device"] = runtime["cuda_device"]
    return get_backend(runtime["backend"], runtime["threads"], **options)


BACKENDS: dict[str, type[LatencyBackend]] = {"torch": TorchBackend, "onnxruntime": OnnxRuntimeBackend,
                                             "openvino": OpenVINOBackend, "torch-cuda": TorchCudaBackend}


def get_backend(name: str, threads: int = 1, **options) -> LatencyBackend:
    """A backend by name (torch, onnxruntime, openvino, torch-cuda) with its options (e.g.
    optimization="all" for onnxruntime, device="cuda:1" for torch-cuda)."""
    name = {"onnx": "onnxruntime", "ov": "openvino", "cuda": "torch-cuda"}.get(name, name)
    if name not in BACKENDS:
        raise AutopruneError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name](threads, **{k: v for k, v in options.items() if v is not None})


# ---------------------------------------------------------------- device facts

def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's marketing name ('AMD EPYC 7B13'); under a hypervisor often only a family name."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


# instruction-set extensions that change which kernels a runtime picks, hence its latency
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "asimd", "sve", "sve2")


def cpu_id() -> str:
    """A finer identity than the name: 'family 26 model 2 stepping 1' on x86, the part
    number on ARM; empty when the system does not say.

    Virtual machines often show a bare 'AMD EPYC' for very different processors (two such
    machines here ran the same network at 2.97 and 1.40 ms), so a LUT records this too.
    """
    info = _cpuinfo()
    if "cpu family" in info:
        return f"family {info['cpu family']} model {info.get('model', '?')} stepping {info.get('stepping', '?')}"
    if "CPU part" in info:
        return (f"implementer {info.get('CPU implementer', '?')} part {info['CPU part']} "
                f"variant {info.get('CPU variant', '?')}")
    return ""


def cpu_isa() -> list[str]:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [flag for flag in ISA_FLAGS if flag in flags]


def slug(text: str) -> str:
    """'Intel(R) Xeon(R)' -> 'intel-r-xeon-r': a name for files and keys."""
    name = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in name:
        name = name.replace("--", "-")
    return name


def device_slug() -> str:
    """The CPU as a file-name fragment: 'AMD EPYC 7B13' (family 25 model 1) -> 'amd-epyc-7b13-f25m1'."""
    name = cpu_model()
    info = _cpuinfo()
    if "cpu family" in info:
        name += f"-f{info['cpu family']}m{info.get('model', '')}"
    return slug(name)


def default_lut_path(backend: LatencyBackend, batch: int, model_tag: str) -> Path:
    """latency_luts/DEVICE-BACKEND-tTHREADS-bBATCH-MODEL.json"""
    return Path("latency_luts") / f"{backend.device_tag()}-{backend.name}-t{backend.threads}-b{batch}-{model_tag}.json"


def device_metadata() -> dict:
    return {"cpu": cpu_model(), "cpu_id": cpu_id(), "isa": cpu_isa(), "machine": platform.machine(),
            "system": platform.system(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "hostname": platform.node()}


def describe_device(device: dict | None) -> str:
    """'AMD EPYC (family 26 model 2 stepping 1)', or the GPU's name for a GPU table, for messages."""
    device = device or {}
    if device.get("gpu"):
        return f"{device['gpu']} (compute capability {device.get('gpu_capability', '?')})"
    name = device.get("cpu") or "an unknown device"
    return f"{name} ({device['cpu_id']})" if device.get("cpu_id") else name


def this_device() -> str:
    """This machine's CPU as `describe_device` words it."""
    return describe_device({"cpu": cpu_model(), "cpu_id": cpu_id()})


def same_device(device: dict | None) -> bool:
    """Whether a LUT's `device` record is this machine's CPU: the same name and, where this
    machine reports one, the same `cpu_id`. A record without `cpu_id` (tables built before
    it was recorded) cannot be confirmed and counts as another device."""
    device = device or {}
    if device.get("gpu"):  # a GPU's table: that GPU must be here
        return torch.cuda.is_available() and any(
            torch.cuda.get_device_name(i) == device["gpu"] for i in range(torch.cuda.device_count()))
    if device.get("cpu") != cpu_model():
        return False
    here = cpu_id()
    return not here or device.get("cpu_id") == here


def pin_process(threads: int) -> list[int] | None:
    """Pin this process to the first `threads` CPUs it may use (Linux); returns them."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cpus = allowed[:max(1, threads)]
    os.sched_setaffinity(0, cpus)
    return cpus


@contextmanager
def timing_conditions(threads: int, pin: bool = True):
    """While the body runs, torch computes on `threads` threads and (with `pin`, on Linux)
    this process is held to its first `threads` CPUs; both are put back after, so timing a
    network from Python leaves the caller's process as it was. Yields the CPUs pinned to,
    or None."""
    saved_threads = torch.get_num_threads()
    saved_cpus = os.sched_getaffinity(0) if pin and hasattr(os, "sched_setaffinity") else None
    torch.set_num_threads(threads)
    try:
        yield pin_process(threads) if saved_cpus is not None else None
    finally:
        torch.set_num_threads(saved_threads)
        if saved_cpus is not None:
            os.sched_setaffinity(0, saved_cpus)


# ---------------------------------------------------------------- the table

@dataclass
class LatencyTable:
    """A loaded LUT: per-signature grids of milliseconds, plus whole-model calibration."""

    data: dict
    path: str = ""
    _net_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def runtime(self) -> dict:
        return self.data["runtime"]

    @property
    def calibration(self) -> dict:
        return self.data.get("calibration") or {"scale": 1.0, "offset_ms": 0.0}

    def check_model(self, description: NetworkDescription) -> None:
        """Refuse a network this table was not built for."""
        fingerprint = model_fingerprint(description)
        if self.data["model"]["fingerprint"] != fingerprint:
            raise AutopruneError(
                f"LUT {self.path or ''} was built for model {self.data['model'].get('name')!r} "
                f"(fingerprint {self.data['model']['fingerprint']}), not this one ({fingerprint}); "
                "build one with `autoprune lut build --model ...`")

    def layer_ms(self, layer: LayerSpec, cin: int, cout: int) -> float:
        """Interpolated latency of one layer unit at the given channel counts."""
        key = signature_key(layer)
        table = self.data["entries"].get(key)
        if table is None:
            raise AutopruneError(f"LUT {self.path} has no entry for layer signature {key} ({layer.name}); "
                                 "it was built for another model")
        ins, outs = table["in"], table["out"]
        ms = self._net_grid(key, layer, table)
        x = 0 if layer.kind == "dwconv" else cin
        if not (ins[0] <= x <= ins[-1]) or not (outs[0] <= cout <= outs[-1]):
            raise AutopruneError(f"LUT {self.path}: layer signature {key} ({layer.name}) at {cin} -> {cout} "
                                 f"channels is outside the measured grid (in {ins[0]}..{ins[-1]}, "
                                 f"out {outs[0]}..{outs[-1]})")
        return _bilinear(ins, outs, ms, x, cout, key)

    def _net_grid(self, key: str, layer: LayerSpec, table: dict) -> list[list[float | None]]:
        """Entry grid minus the runtime's per-call overhead (paid once per network, not per layer)."""
        cache = self._net_cache
        if key not in cache:
            overhead = self.data.get("call_overhead_ms", {})
            batch = self.runtime.get("batch", 1)
            grid = []
            for cin, row in zip(table["in"], table["ms"]):
                grid.append([None if v is None else
                             max(0.0, v - overhead.get(shape_key(unit_input_shape(layer, cin, cout, batch)), 0.0))
                             for cout, v in zip(table["out"], row)])
            cache[key] = grid
        return cache[key]

    def raw_sum_ms(self, description: NetworkDescription, kept: Mapping[str, int]) -> float:
        total = 0.0
        for layer in description.layers:
            if layer.kind in TIMED_KINDS:
                cin, cout = description.layer_channels(layer, kept)
                total += self.layer_ms(layer, cin, cout) * layer.calls
        return total

    def predict_ms(self, description: NetworkDescription, kept: Mapping[str, int] | None = None) -> float:
        """Whole-network latency estimate: calibrated sum of layer entries."""
        if kept is None:
            kept = {g.name: g.channels for g in description.groups}
        c = self.calibration
        return c["scale"] * self.raw_sum_ms(description, kept) + c["offset_ms"]

    def predict_policy_ms(self, description: NetworkDescription, policy: Mapping[str, float],
                          multiple: int = 1) -> float:
        return self.predict_ms(description, policy_channels(description, policy, multiple))


def _bilinear(ins: list[int], outs: list[int], ms: list[list[float | None]], x: int, y: int, key: str) -> float:
    def bracket(grid: list[int], v: int) -> tuple[int, int, float]:
        j = int(np.searchsorted(grid, v))
        if j < len(grid) and grid[j] == v:
            return j, j, 0.0
        lo, hi = j - 1, j
        return lo, hi, (v - grid[lo]) / (grid[hi] - grid[lo])

    i0, i1, ti = bracket(ins, x)
    j0, j1, tj = bracket(outs, y)
    corners = [ms[i0][j0], ms[i0][j1], ms[i1][j0], ms[i1][j1]]
    if any(c is None for c in corners):
        raise AutopruneError(f"LUT entry for {key} near {x} -> {y} channels was never measured; "
                             "finish the build with the same `autoprune lut build` command")
    a = corners[0] * (1 - tj) + corners[1] * tj
    b = corners[2] * (1 - tj) + corners[3] * tj
    return a * (1 - ti) + b * ti


def load_lut(path: str | os.PathLike) -> LatencyTable:
    """Read and check a LUT file; a clear AutopruneError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(f"LUT file {path} not found; build one with `autoprune lut build`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AutopruneError(f"LUT {path} is corrupt or truncated ({exc.__class__.__name__}: {exc}); "
                             "rebuild it with `autoprune lut build`") from None
    if not isinstance(data, dict) or data.get("format") != LUT_FORMAT:
        raise AutopruneError(f"{path} is not an autoprune latency LUT")
    if data.get("version") != LUT_VERSION:
        raise AutopruneError(f"LUT {path} has format version {data.get('version')}, this autoprune reads "
                             f"{LUT_VERSION}; rebuild it")
    try:
        _check_lut_schema(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AutopruneError(f"LUT {path} is corrupt ({exc}); rebuild it with `autoprune lut build`") from None
    if not data.get("complete"):
        raise AutopruneError(f"LUT {path} is unfinished; run the same `autoprune lut build` command again to "
                             "complete it")
    return LatencyTable(data, str(path))


def _finite(value, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{what} is {value}, must be {'positive' if positive else 'non-negative'}")
    return float(value)


def _check_lut_schema(data: dict) -> None:
    """Types and values of a finished table: counts are positive integers in ascending order,
    latencies finite and non-negative, the calibration's scale positive."""
    for key in ("backend", "threads", "batch"):
        data["runtime"][key]
    str(data["model"]["fingerprint"])
    if not isinstance(data["entries"], dict) or not data["entries"]:
        raise ValueError("it has no entries")
    for key, table in data["entries"].items():
        for axis in ("in", "out"):
            points = table[axis]
            if not points or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in points) or \
                    points != sorted(set(points)):
                raise ValueError(f"the {axis!r} axis of {key} is not ascending channel counts")
        if len(table["ms"]) != len(table["in"]) or any(len(row) != len(table["out"]) for row in table["ms"]):
            raise ValueError(f"grid of {key} has the wrong size")
        for row in table["ms"]:
            for v in row:
                if v is not None:  # a point that could not be measured
                    _finite(v, f"an entry of {key}")
    for shape, v in data.get("call_overhead_ms", {}).items():
        _finite(v, f"the call overhead of {shape}")
    calibration = data.get("calibration")
    if calibration is not None:
        _finite(calibration["scale"], "the calibration scale", positive=True)
        offset = calibration["offset_ms"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"the calibration offset is {offset!r}, not a finite number")


# ---------------------------------------------------------------- building

def random_policies(description: NetworkDescription, count: int, seed: int, low: float = 0.2,
                    high: float = 1.0) -> list[dict[str, float]]:
    """Seeded random policies with keep ratios uniform in [low, high]."""
    rng = random.Random(seed)
    return [{g.name: rng.uniform(low, high) for g in description.groups} for _ in range(count)]


def spread_policies(description: NetworkDescription, count: int, seed: int, low: float = 0.2,
                    spread: float = 0.15) -> list[dict[str, float]]:
    """Seeded random policies whose overall size spans [low, 1] evenly: the i-th policy's keep
    ratios scatter ±`spread` around a level stepping from `low` to 1. Random policies drawn
    uniformly in [low, 1] rarely come near the small networks a tight budget produces; a
    calibration fitted on them alone mispredicts exactly those."""
    rng = random.Random(seed)
    policies = []
    for i in range(count):
        level = low + (1.0 - low) * (i + 0.5) / count
        policies.append({g.name: min(1.0, max(low, rng.uniform(level - spread, level + spread)))
                         for g in description.groups})
    return policies


def measure_networks(backend: LatencyBackend, models: list[nn.Module], input_shape: tuple[int, int, int],
                     batch: int, warmup: int, runs: int, rounds: int, progress=None) -> list[float]:
    """Latency of whole networks in ms: per network, the minimum over `rounds` passes of the
    median of its `runs` timed calls in that pass.

    Within a pass each network runs `warmup` untimed calls and then its `runs` timed calls
    back to back, as a deployed network runs, and the order of the networks rotates from
    pass to pass; over passes the minimum is kept, since interference only adds time. (An
    earlier protocol let the networks take turns call by call. That finds every network
    with cold caches: under OpenVINO the unpruned ResNet-20 took 0.43 ms alone and 0.50 ms
    in turn with 15 pruned ones, a pruned one 0.23 and 0.30 ms, and the smaller the network
    the larger the share, so tables calibrated that way over-predicted small networks.)"""
    runners = [backend.runner(m, (batch, *input_shape)) for m in models]
    best = [float("inf")] * len(models)
    n = len(runners)
    with timing_conditions(backend.threads, pin=False):
        for round_index in range(rounds):
            for j in range(n):
                i = (j + round_index) % n
                best[i] = min(best[i], time_runs(runners[i], warmup, runs, backend.clock))
                if progress is not None:
                    progress.update(1)
    return best


def _same_settings(old: dict, model_info: dict, runtime: dict, protocol: dict) -> bool:
    keys = ("warmup", "runs", "rounds", "channel_step", "calibration_samples", "calibration_seed")
    return (old.get("format") == LUT_FORMAT and old.get("model", {}).get("fingerprint") == model_info["fingerprint"]
            and all(old.get("runtime", {}).get(k) == runtime[k] for k in ("backend", "threads", "batch"))
            and all(old.get("protocol", {}).get(k) == protocol[k] for k in keys))


def build_lut(model: nn.Module, description: NetworkDescription, backend: LatencyBackend, out: str | os.PathLike,
              *, model_name: str = "", batch: int = 1, channel_step: int = 4, warmup: int = 10, runs: int = 50,
              rounds: int = 3, calibration_samples: int = 16, seed: int = 0, progress: bool = True,
              pin: bool = True) -> LatencyTable:
    """Measure a LUT for `description` on this machine and write it to `out`.

    Every entry is measured in `rounds` passes over the whole grid and keeps the minimum
    of its per-pass medians. Passes are written as they go (atomically, every couple of
    seconds); a build that finds an unfinished file for the same model and settings
    continues where it stopped.
    """
    from tqdm.auto import tqdm

    from autoprune.pruning import ChannelPruner

    out = Path(out)
    lock = WriterLock(out.with_name(f".{out.name}.lock"), f"LUT {out}")  # held until the build returns
    with timing_conditions(backend.threads, pin) as cpus:
        plan = plan_grid(description, channel_step)
        runtime = {**backend.metadata(), "batch": batch}
        protocol = {"warmup": warmup, "runs": runs, "rounds": rounds,
                    "statistic": "minimum over rounds of the median of runs", "channel_step": channel_step,
                    "whole_networks": "each back to back within a round, the order rotating",
                    "pinned_cpus": cpus, "unit": "conv/linear + following BatchNorm and activation",
                    "calibration_samples": calibration_samples, "calibration_seed": seed}
        model_info = {"name": model_name, "fingerprint": model_fingerprint(description),
                      "input_shape": list(description.input_shape)}
        data = None
        if out.is_file():
            try:
                old = json.loads(out.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if isinstance(old, dict) and old.get("complete"):
                raise AutopruneError(f"{out} already holds a finished LUT; choose another --out or delete it")
            if isinstance(old, dict) and _same_settings(old, model_info, runtime, protocol):
                data = old
                log.info("continuing unfinished LUT %s", out)
            else:
                raise AutopruneError(f"{out} exists and is not an unfinished LUT for this model and settings; "
                                     "choose another --out or delete it")
        if data is None:
            data = {"format": LUT_FORMAT, "version": LUT_VERSION, "complete": False, "model": model_info,
                    "device": backend.device(), "runtime": runtime, "protocol": protocol,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "calibration": None, "call_overhead_ms": {}, "entries": {}}
            for key, entry in plan.items():
                ins = entry["in"]
                data["entries"][key] = {"in": ins, "out": entry["out"],
                                        "ms": [[None] * len(entry["out"]) for _ in ins],
                                        "rounds_done": [[0] * len(entry["out"]) for _ in ins]}
        grid_total = rounds * sum(len(e["in"]) * len(e["out"]) for e in data["entries"].values())
        done = sum(n for e in data["entries"].values() for row in e.get("rounds_done", []) for n in row)
        bar = tqdm(total=grid_total + rounds * (calibration_samples + 1), initial=done, desc="LUT", unit="run",
                   disable=not progress)
        started = time.perf_counter()
        last_write = time.monotonic()
        shapes = sorted({unit_input_shape(plan[key]["layer"], cin, cout, batch)
                         for key, table in data["entries"].items() for cin in table["in"] for cout in table["out"]})
        overhead_rounds = data.setdefault("call_overhead_rounds", 0)
        for round_index in range(rounds):
            if overhead_rounds <= round_index:
                for shape in shapes:
                    value = round(time_runs(backend.null_runner(shape), warmup, runs, backend.clock), 6)
                    old_value = data["call_overhead_ms"].get(shape_key(shape))
                    data["call_overhead_ms"][shape_key(shape)] = value if old_value is None else min(old_value, value)
                data["call_overhead_rounds"] = overhead_rounds = round_index + 1
            for key, table in data["entries"].items():
                layer = plan[key]["layer"]
                for i, cin in enumerate(table["in"]):
                    for j, cout in enumerate(table["out"]):
                        if table["rounds_done"][i][j] > round_index:
                            continue
                        unit = unit_module(layer, cin, cout)
                        unit._autoprune_unit = True
                        run = backend.runner(unit, unit_input_shape(layer, cin, cout, batch))
                        value = round(time_runs(run, warmup, runs, backend.clock), 6)
                        old_value = table["ms"][i][j]
                        table["ms"][i][j] = value if old_value is None else min(old_value, value)
                        table["rounds_done"][i][j] = round_index + 1
                        bar.update(1)
                        if time.monotonic() - last_write >= WRITE_EVERY_S:
                            atomic_write_json(out, data)
                            last_write = time.monotonic()
        atomic_write_json(out, data)

        # whole-network calibration: the base model plus a few random policies
        table = LatencyTable({**data, "calibration": None}, str(out))
        pruner = ChannelPruner(model, description.input_shape)
        ranked = pruner.description  # which branch keeps which channels follows the pruner's ranking;
        # groups Torch-Pruning cannot prune consistently in this model are not in it
        policies = spread_policies(ranked, calibration_samples, seed)
        networks = [model] + [pruner.prune(p) for p in policies]
        measured = measure_networks(backend, networks, description.input_shape, batch, warmup, runs, rounds, bar)
        full = {g.name: g.channels for g in ranked.groups}
        kept = [full] + [policy_channels(ranked, p) for p in policies]
        points = [{"sum_ms": round(table.raw_sum_ms(ranked, k), 6), "measured_ms": round(m, 6)}
                  for k, m in zip(kept, measured)]
        bar.close()
        for entry in data["entries"].values():
            entry.pop("rounds_done", None)
        data.pop("call_overhead_rounds", None)
        data["calibration"] = fit_calibration(points)
        data["build_seconds"] = round(time.perf_counter() - started, 1)
        data["complete"] = True
        atomic_write_json(out, data)
        lock.release()
        return LatencyTable(data, str(out))


def fit_calibration(points: list[dict]) -> dict:
    """`measured = scale × sum + offset`, fitted to minimise the *relative* error (least squares
    weighted by 1/measured), so small networks count as much as large ones; falls back to a
    pure offset if ill-posed."""
    x = np.array([p["sum_ms"] for p in points])
    y = np.array([p["measured_ms"] for p in points])
    scale, offset = 1.0, float(np.mean(y - x))
    if len(points) >= 3 and np.ptp(x) > 1e-9:
        a, b = np.polyfit(x, y, 1, w=1.0 / np.maximum(y, 1e-9))
        if a > 0:
            scale, offset = float(a), float(b)
    return {"scale": round(scale, 6), "offset_ms": round(offset, 6), "points": points,
            "method": "least squares of the relative error of whole-network median latency on the layer sum, "
                      "networks spanning 20-100 % keep ratios"}


# ---------------------------------------------------------------- validation

def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        values = np.asarray(v)
        for value in np.unique(values):
            mask = values == value
            r[mask] = r[mask].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def validate_lut(table: LatencyTable, model: nn.Module, description: NetworkDescription, *, samples: int = 30,
                 seed: int = 1, warmup: int | None = None, runs: int | None = None, rounds: int | None = None,
                 keep_range: tuple[float, float] = (0.2, 1.0), progress: bool = True) -> dict:
    """Predicted vs measured whole-network latency for random policies (keep ratios uniform in
    `keep_range`; a low range draws the small networks that tight budgets produce)."""
    from tqdm.auto import tqdm

    from autoprune.pruning import ChannelPruner

    table.check_model(description)
    rt, protocol = table.runtime, table.data["protocol"]
    backend = backend_for(rt)
    warmup = protocol["warmup"] if warmup is None else warmup
    runs = protocol["runs"] if runs is None else runs
    rounds = max(5, protocol.get("rounds", 1)) if rounds is None else rounds
    pruner = ChannelPruner(model, description.input_shape)
    policies = random_policies(description, samples, seed, *keep_range)
    bar = tqdm(total=(samples + 1) * rounds, desc="validate", unit="run", disable=not progress)
    # the unpruned network is timed in turn with the others: a relative budget is a ratio to it
    with timing_conditions(rt["threads"]):
        measured = measure_networks(backend, [model] + [pruner.prune(p) for p in policies],
                                    description.input_shape, rt["batch"], warmup, runs, rounds, bar)
    bar.close()
    base_measured, measured = measured[0], measured[1:]
    base_predicted = table.predict_ms(pruner.description)
    rows = []
    base_flops = count_cost(pruner.description).flops
    for i, (policy, ms) in enumerate(zip(policies, measured)):
        predicted = table.predict_policy_ms(pruner.description, policy)
        cost = count_cost(pruner.description, policy_channels(pruner.description, policy))
        ratio_predicted, ratio_measured = predicted / base_predicted, ms / base_measured
        rows.append({"sample": i, "predicted_ms": predicted, "measured_ms": ms,
                     "error_pct": 100.0 * (predicted - ms) / ms, "flops_ratio": cost.flops / base_flops,
                     "predicted_ratio": ratio_predicted, "measured_ratio": ratio_measured,
                     "ratio_error_pct": 100.0 * (ratio_predicted - ratio_measured) / ratio_measured,
                     "policy": policy})
    abs_err = [abs(r["error_pct"]) for r in rows]
    ratio_err = [abs(r["ratio_error_pct"]) for r in rows]
    flops_ratios = [r["flops_ratio"] for r in rows]
    return {"rows": rows, "keep_range": list(keep_range), "flops_ratio_range": [min(flops_ratios), max(flops_ratios)],
            "median_abs_error_pct": float(np.median(abs_err)), "max_abs_error_pct": float(np.max(abs_err)),
            "median_abs_ratio_error_pct": float(np.median(ratio_err)),
            "max_abs_ratio_error_pct": float(np.max(ratio_err)),
            "base_predicted_ms": base_predicted, "base_measured_ms": base_measured,
            "spearman": spearman([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]),
            "backend": rt["backend"], "threads": rt["threads"], "batch": rt["batch"], "samples": samples,
            "seed": seed, "rounds": rounds}


# ---------------------------------------------------------------- whole networks, timed in a fresh process

LATENCY_TARGET_MS = 300.0  # timed calls per network and pass are sized to take about this long
LATENCY_RUNS = (20, 200)  # fewest and most timed calls per network and pass
LATENCY_WARMUP = 20  # untimed calls per network before each pass
LATENCY_ROUNDS = 5  # passes over the networks; each keeps its fastest
WORKER_TIMEOUT_S = 900.0  # a timing process that has not answered by then is ended, and timing done here
# a pruned network against the unpruned one is timed this many times, and the timing with the median
# ratio counts: one timing's ratio moves by about half a point on a machine with other work on it, and
# by 2.5 points once (the unpruned network timed 10 % faster than usual), enough to move a network
# across a latency budget's window
PAIR_TIMINGS = 3


def measure_latency(models: list[nn.Module], input_shape: tuple[int, int, int], lut=None) -> dict:
    """Whole-network latency (ms) of each model on this machine, timed in a fresh process.

    See `measure_latency_here` for the protocol and the result; `LatencyWorker` for why
    a separate process.
    """
    with LatencyWorker(input_shape, lut) as worker:
        return worker.measure(models)


def median_timing(timings: list[list[float]], key: Callable[[list[float]], float] | None = None) -> list[float]:
    """Of several timings of the same [unpruned, pruned] pair, the one whose `key` (by
    default the ratio pruned / unpruned) is the median; with an even count, the lower of
    the middle two. A timing, not an average, so that its two figures belong together."""
    if not timings:
        raise ValueError("no timings")
    key = key or (lambda pair: pair[1] / pair[0])
    ordered = sorted(timings, key=key)
    return list(ordered[(len(ordered) - 1) // 2])


def measure_pair(base: nn.Module, network: nn.Module, input_shape: tuple[int, int, int], lut=None,
                 times: int = PAIR_TIMINGS) -> dict:
    """`measure_latency` of [base, network], `times` over in one fresh process; "ms" is the
    timing with the median ratio (`median_timing`) and "timings" all of them."""
    with LatencyWorker(input_shape, lut) as worker:
        first = worker.measure([base, network])
        timings = [[float(v) for v in first["ms"]]] + [worker([base, network]) for _ in range(times - 1)]
    settings = {**first["settings"], "timings": len(timings),
                "statistic": f"{first['settings']['statistic']}; of {len(timings)} timings, the median ratio"}
    return {"ms": median_timing(timings), "timings": timings, "settings": settings}


def _measure_in_worker(payload: list[bytes], input_shape: tuple[int, int, int], lut) -> dict:
    return measure_latency_here([model_from_bytes(data).eval() for data in payload], input_shape, lut)


class LatencyWorker:
    """Times whole networks in a spawned process that does nothing else.

    A process that has been training times networks wrongly: after NetAdapt's short-term
    fine-tunes the unpruned ResNet-20 timed there at 3.30 ms and a pruned one at 1.35 ms,
    against 1.45 and 0.96 ms in a fresh process; after one epoch of fine-tuning a network
    timed 0.79 ms in place and 0.76 ms fresh. A fresh worker, started once and reused
    (calling the object gives the milliseconds, as a NetAdapt meter), avoids that. A model
    whose class the worker cannot import is timed in this process instead, and the
    settings say so.
    """

    def __init__(self, input_shape: tuple[int, int, int], lut=None):
        self.input_shape, self.lut = tuple(input_shape), lut
        self._pool = None
        self._failed: str | None = None  # why timing in a separate process failed: later calls time here

    def measure(self, models: list[nn.Module]) -> dict:
        if self._failed is not None:
            result = measure_latency_here(models, self.input_shape, self.lut)
            result["settings"]["process"] = self._failed
            return result
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            payload = [model_to_bytes(model) for model in models]
            future = self._pool.submit(_measure_in_worker, payload, self.input_shape, self.lut)
            result = future.result(timeout=WORKER_TIMEOUT_S)
        except (pickle.PicklingError, AttributeError, ImportError, TypeError, BrokenProcessPool,
                FutureTimeout) as exc:
            # the model does not travel, the worker cannot start (e.g. a calling script without a
            # `if __name__ == "__main__":` guard), or it never answers: a search must not wait forever
            if isinstance(exc, FutureTimeout):
                exc = FutureTimeout(f"no answer in {WORKER_TIMEOUT_S:.0f} s")
                self.kill()
            self.close()
            log.warning("timing in a separate process failed (%s); timing in this process instead, where "
                        "earlier training or other work on the same cores can slow the networks down",
                        type(exc).__name__)
            self._failed = f"this one (timing in a separate process failed: {type(exc).__name__}: {exc})"
            result = measure_latency_here(models, self.input_shape, self.lut)
            result["settings"]["process"] = self._failed
            return result
        result["settings"]["process"] = "a fresh one"
        return result

    def __call__(self, models: list[nn.Module]) -> list[float]:
        return [float(ms) for ms in self.measure(models)["ms"]]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def kill(self) -> None:
        """End the worker process at once, and drop the pool."""
        if self._pool is not None:
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LatencyWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_latency_here(models: list[nn.Module], input_shape: tuple[int, int, int], lut=None) -> dict:
    """Whole-network latency (ms) of each model, timed in this process, in a few seconds.

    With a LUT, the networks run on its runtime with its threads and batch size; without
    one, or when this machine lacks that runtime, under torch eager with 1 thread and
    batch 1. The calling thread is pinned to as many CPUs as the runtime has threads
    while it times (and unpinned after), and the passes go over all networks in turn, so
    networks timed in one call are compared under the same conditions. Returns
    {"ms": [...], "settings": {...}}; the settings say what was used and on which CPU,
    and whether that CPU is the one the LUT was measured on.
    """
    backend_name, threads, batch, options, note = "torch", 1, 1, {}, None
    runtime: dict = {"backend": "torch", "threads": 1}
    if lut is not None:
        runtime = lut.runtime
        backend_name, threads, batch = runtime["backend"], runtime["threads"], runtime.get("batch", 1)
        options = {key: runtime[key] for key in ("graph_optimization", "cuda_device") if key in runtime}
    try:
        backend = backend_for(runtime)
    except AutopruneError as exc:
        note = f"the LUT's runtime is not usable here ({exc}); measured under torch eager instead"
        log.warning(note)
        backend_name, threads, batch, options = "torch", 1, 1, {}
        backend = get_backend("torch", 1)
    shape = (batch, *input_shape)
    with timing_conditions(threads) as pinned:
        probe_ms = time_runs(backend.runner(models[0], shape), 2, 3, backend.clock)
        runs = int(min(LATENCY_RUNS[1], max(LATENCY_RUNS[0], LATENCY_TARGET_MS / max(probe_ms, 1e-3))))
        measured = measure_networks(backend, models, input_shape, batch, warmup=LATENCY_WARMUP, runs=runs,
                                    rounds=LATENCY_ROUNDS)
    lut_device = (lut.data.get("device") or {}) if lut is not None else None
    settings = {"backend": backend_name, "threads": threads, "batch": batch, **options, "warmup": LATENCY_WARMUP,
                "runs": runs, "rounds": LATENCY_ROUNDS, "pinned": pinned is not None,
                "statistic": "minimum over rounds of the median of runs",
                "measured_on": this_device(),
                "lut_device": None if lut is None else describe_device(lut_device),
                "on_lut_device": None if lut is None else same_device(lut_device)}
    if note:
        settings["note"] = note
    return {"ms": measured, "settings": settings}
