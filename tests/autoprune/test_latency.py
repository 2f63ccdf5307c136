import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import autoprune.latency as latency
from autoprune.budgets import check_budget, parse_budget
from autoprune.costs import uniform_policy
from autoprune.errors import AutopruneError
from autoprune.latency import (TorchBackend, build_lut, get_backend, load_lut, plan_grid, signature_key,
                               spearman, unit_module, validate_lut)
from autoprune.models import build_model
from autoprune.pruning import describe_network

SHAPE = (1, 12, 12)


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.fixture(scope="module")
def tiny_lut(tmp_path_factory):
    model = tiny_net().eval()
    description = describe_network(model, SHAPE)
    path = tmp_path_factory.mktemp("lut") / "tiny.json"
    table = build_lut(model, description, TorchBackend(1), path, model_name="tiny", channel_step=2, warmup=1,
                      runs=3, calibration_samples=3, progress=False, pin=False)
    return model, description, path, table


def test_same_signature_layers_share_one_table():
    d = describe_network(build_model("resnet20"), (1, 28, 28))
    plan = plan_grid(d, channel_step=4)
    timed = [layer for layer in d.layers if layer.kind in ("conv", "dwconv", "linear")]
    assert len(plan) < len(timed)
    inner = [layer for layer in timed if layer.name.startswith("layer1.") and layer.kind == "conv"]
    # six 3x3 convs of stage 1: conv1s are followed by BN+ReLU, conv2s by BN (then the add)
    assert len({signature_key(layer) for layer in inner}) == 2
    key = signature_key(inner[0])
    # every count up to 2 x step (where few channels are left), then every step
    grid = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]
    assert plan[key]["out"] == grid and plan[key]["in"] == grid


@pytest.mark.parametrize("seed", range(24))
def test_a_table_entry_times_layers_of_one_kind_only(seed):
    """A grouped convolution never shares an entry with a plain one of the same kernel and
    size: every layer of an entry has the representative's group count, and every grid
    point of the entry makes a unit that runs and gives the layer's own output size."""
    from tests.archs import random_net

    description = describe_network(random_net(seed, 3).eval(), (3, 16, 16))
    plan = plan_grid(description, channel_step=4)
    for layer in description.layers:
        if layer.kind in ("conv", "dwconv", "linear"):
            assert plan[signature_key(layer)]["layer"].groups == layer.groups, layer.name
    for entry in plan.values():
        layer = entry["layer"]
        for cin in entry["in"]:
            for cout in entry["out"]:
                unit = latency.unit_module(layer, cin, cout)
                out = unit(torch.zeros(latency.unit_input_shape(layer, cin, cout, 1)))
                if layer.kind != "linear":
                    assert tuple(out.shape[2:]) == layer.out_size, layer.name


def test_a_patchify_stem_is_timed_at_its_own_output_size():
    """ConvNeXt's 4×4 stride-4 stem has no padding: its unit gives 7×7 from 28×28 (not the 8×8
    a "same" padding would), and its entry says so."""
    from tests.archs import FIXED

    description = describe_network(FIXED["convnext"]().eval(), (1, 28, 28))
    stem = next(layer for layer in description.layers if layer.name == "stem.0")
    assert signature_key(stem) == "conv|k4x4|s4x4|p0x0|in28x28|bias=1|post=none"
    out = latency.unit_module(stem, 1, 16)(torch.zeros(latency.unit_input_shape(stem, 1, 16, 1)))
    assert tuple(out.shape) == (1, 16, 7, 7)


def test_a_table_builds_for_a_model_with_a_group_torch_pruning_cannot_prune(tmp_path, monkeypatch):
    """The calibration networks are pruned only in the groups the pruner keeps (here the stem
    group is dropped: Torch-Pruning's cut of it is made to fail)."""
    from autoprune.pruning import ChannelPruner
    from tests.archs import fail_cuts_of, random_net

    model, shape = random_net(0).eval(), (1, 16, 16)
    description = describe_network(model, shape)
    fail_cuts_of(monkeypatch, model, shape, "stem.0")
    assert len(ChannelPruner(model, shape).description.groups) == len(description.groups) - 1
    table = build_lut(model, description, TorchBackend(1), tmp_path / "lut.json", channel_step=8, warmup=0, runs=1,
                      rounds=1, calibration_samples=3, progress=False, pin=False)
    assert table.predict_ms(description) > 0


def test_built_table_is_complete_readable_and_described(tiny_lut):
    _, description, path, table = tiny_lut
    data = json.loads(path.read_text())
    assert data["complete"] and data["runtime"]["backend"] == "torch" and data["runtime"]["threads"] == 1
    for field in ("cpu", "machine"):
        assert data["device"][field]
    assert data["runtime"]["batch"] == 1 and data["runtime"]["dtype"] == "float32" and data["created"]
    assert all(v is not None and v > 0 for e in data["entries"].values() for row in e["ms"] for v in row)
    assert table.predict_ms(description) > 0
    assert load_lut(path).predict_ms(description) == pytest.approx(table.predict_ms(description))


def test_lookup_interpolates_between_grid_points_and_refuses_outside(tiny_lut):
    _, description, _, table = tiny_lut
    layer = next(layer for layer in description.layers if layer.kind == "conv" and layer.in_links)
    entry = table.data["entries"][signature_key(layer)]
    assert entry["in"] == [1, 2, 3, 4, 6, 8] and entry["out"] == [1, 2, 3, 4, 6, 8]
    ms = table._net_grid(signature_key(layer), layer, entry)  # entries less the per-call overhead
    overhead = table.data["call_overhead_ms"]["1x4x12x12"]
    assert ms[3][5] == pytest.approx(max(0.0, entry["ms"][3][5] - overhead))
    assert table.layer_ms(layer, 4, 8) == pytest.approx(ms[3][5])
    assert table.layer_ms(layer, 5, 8) == pytest.approx((ms[3][5] + ms[4][5]) / 2)
    assert table.layer_ms(layer, 5, 7) == pytest.approx((ms[3][4] + ms[3][5] + ms[4][4] + ms[4][5]) / 4)
    with pytest.raises(AutopruneError, match="outside the measured grid") as info:
        table.layer_ms(layer, 9, 8)
    assert signature_key(layer) in str(info.value)


def test_lut_of_another_model_is_refused(tiny_lut):
    _, _, _, table = tiny_lut
    other = describe_network(build_model("resnet20"), (1, 28, 28))
    with pytest.raises(AutopruneError, match="was built for model 'tiny'"):
        table.check_model(other)
    layer = next(layer for layer in other.layers if layer.kind == "conv")
    with pytest.raises(AutopruneError, match="no entry for layer signature"):
        table.layer_ms(layer, 1, 16)


@pytest.mark.parametrize("content,message", [
    ("{\"format\": \"autoprune-latency-lut\", \"version\": 1, \"entr", "corrupt or truncated"),
    ("[1, 2, 3]", "not an autoprune latency LUT"),
    ("{\"format\": \"autoprune-latency-lut\", \"version\": 99}", "format version 99"),
    ("{\"format\": \"autoprune-latency-lut\", \"version\": 1, \"entries\": {}}", "corrupt"),
])
def test_bad_lut_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(AutopruneError, match=message):
        load_lut(path)
    with pytest.raises(AutopruneError, match="not found"):
        load_lut(tmp_path / "missing.json")


def test_killed_build_resumes_without_losing_entries(tmp_path, monkeypatch):
    model = tiny_net().eval()
    description = describe_network(model, SHAPE)
    path = tmp_path / "lut.json"
    monkeypatch.setattr(latency, "WRITE_EVERY_S", 0.0)
    real = latency.time_runs
    calls = {"n": 0}

    def dies_after_thirty(run, warmup, runs, clock):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return real(run, warmup, runs, clock)

    monkeypatch.setattr(latency, "time_runs", dies_after_thirty)
    with pytest.raises(KeyboardInterrupt):
        build_lut(model, description, TorchBackend(1), path, warmup=1, runs=2, rounds=2, calibration_samples=2,
                  progress=False, pin=False)
    partial = json.loads(path.read_text())
    assert not partial["complete"]
    measured = sum(v is not None for e in partial["entries"].values() for row in e["ms"] for v in row)
    shapes = len(partial["call_overhead_ms"])  # each pass first times a no-op per input shape
    assert 0 < shapes < 30 and measured == 30 - shapes
    with pytest.raises(AutopruneError, match="unfinished"):
        load_lut(path)

    counted = {"n": 0}

    def counting(run, warmup, runs, clock):
        counted["n"] += 1
        return real(run, warmup, runs, clock)

    monkeypatch.setattr(latency, "time_runs", counting)
    table = build_lut(model, description, TorchBackend(1), path, warmup=1, runs=2, rounds=2, calibration_samples=2,
                      progress=False, pin=False)
    total = sum(len(e["in"]) * len(e["out"]) for e in table.data["entries"].values())
    # the rest of two passes over overheads and grid, then two passes over the three calibration
    # networks (the unpruned one and two policies), each timed through time_runs too
    assert counted["n"] == 2 * (shapes + total) - 30 + 2 * 3
    assert table.data["complete"]
    with pytest.raises(AutopruneError, match="already holds a finished LUT"):
        build_lut(model, description, TorchBackend(1), path, progress=False, pin=False)


def test_onnx_unit_graph_computes_what_the_torch_unit_computes():
    ort = pytest.importorskip("onnxruntime")
    description = describe_network(tiny_net(), SHAPE)
    for layer in description.layers:
        if layer.kind not in ("conv", "dwconv", "linear"):
            continue
        unit = unit_module(layer, 4 if layer.kind != "linear" else 8, 8)
        with torch.no_grad():
            for m in unit.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
        shape = latency.unit_input_shape(layer, 4 if layer.kind != "linear" else 8, 8, 2)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        session = ort.InferenceSession(latency._unit_to_onnx(unit, shape), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"x": x})
        with torch.no_grad():
            want = unit(torch.from_numpy(x)).numpy()
        assert np.allclose(got, want, atol=1e-4), layer.name


def test_timing_from_python_leaves_the_process_as_it_was(tmp_path):
    """A build and a validation set torch's threads to the table's and pin the process while
    they time, and put both back: a caller who builds a table and then trains keeps its cores."""
    affinity = hasattr(os, "sched_getaffinity")
    torch.set_num_threads(2)  # as the suite runs (conftest): not the table's one thread
    threads_before = torch.get_num_threads()
    cpus_before = os.sched_getaffinity(0) if affinity else None
    seen = []

    class Watched(TorchBackend):
        def runner(self, module, input_shape):
            run = super().runner(module, input_shape)

            def watched():
                seen.append((torch.get_num_threads(), os.sched_getaffinity(0) if affinity else None))
                return run()
            return watched

    model = tiny_net().eval()
    description = describe_network(model, SHAPE)
    table = build_lut(model, description, Watched(1), tmp_path / "t.json", channel_step=8, warmup=1, runs=2,
                      calibration_samples=2, progress=False, pin=True)
    assert torch.get_num_threads() == threads_before and (not affinity or os.sched_getaffinity(0) == cpus_before)
    validate_lut(table, model, description, samples=2, warmup=1, runs=2, rounds=1, progress=False)
    assert torch.get_num_threads() == threads_before and (not affinity or os.sched_getaffinity(0) == cpus_before)
    assert seen and all(threads == 1 for threads, _ in seen)
    if affinity:
        assert all(len(cpus) == 1 for _, cpus in seen)


def test_onnxruntime_lut_builds_and_validates(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_net().eval()
    description = describe_network(model, SHAPE)
    backend = get_backend("onnxruntime", 1)
    table = build_lut(model, description, backend, tmp_path / "ort.json", channel_step=8, warmup=1, runs=3,
                      calibration_samples=2, progress=False, pin=False)
    assert table.runtime["backend"] == "onnxruntime" and table.runtime["backend_version"]
    result = validate_lut(table, model, description, samples=3, warmup=1, runs=3, progress=False)
    assert len(result["rows"]) == 3 and all(r["measured_ms"] > 0 for r in result["rows"])


def test_openvino_unit_graph_computes_what_the_torch_unit_computes():
    pytest.importorskip("openvino")
    backend = get_backend("openvino", 1)
    description = describe_network(tiny_net(), SHAPE)
    for layer in description.layers:
        if layer.kind not in ("conv", "dwconv", "linear"):
            continue
        cin = 4 if layer.kind != "linear" else 8
        unit = unit_module(layer, cin, 8)
        unit._autoprune_unit = True
        with torch.no_grad():
            for m in unit.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
        shape = latency.unit_input_shape(layer, cin, 8, 2)
        got = backend.runner(unit, shape)()
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)  # the runner's input
        with torch.no_grad():
            want = unit(torch.from_numpy(x)).numpy()
        assert np.allclose(got[0], want, atol=1e-4), layer.name


def test_openvino_lut_builds_validates_and_times_whole_networks(tmp_path):
    pytest.importorskip("openvino")
    model = tiny_net().eval()
    description = describe_network(model, SHAPE)
    table = build_lut(model, description, get_backend("openvino", 1), tmp_path / "ov.json", channel_step=8,
                      warmup=1, runs=3, calibration_samples=2, progress=False, pin=False)
    assert table.runtime["backend"] == "openvino" and table.runtime["backend_version"]
    assert table.data["device"]["cpu"] == latency.cpu_model()
    result = validate_lut(table, model, description, samples=3, warmup=1, runs=3, progress=False)
    assert len(result["rows"]) == 3 and all(r["measured_ms"] > 0 for r in result["rows"])
    timed = latency.measure_latency_here([model], SHAPE, table)
    assert timed["settings"]["backend"] == "openvino" and "note" not in timed["settings"]


def test_a_backend_clock_times_every_call(tmp_path):
    """Whatever clock a backend brings (CUDA events on a GPU) is what the table stores."""

    class FixedClock(TorchBackend):
        name = "fixed"

        def clock(self, run):
            run()
            return 2_000_000  # 2 ms per call, whatever the call

    model = tiny_net().eval()
    description = describe_network(model, SHAPE)
    table = build_lut(model, description, FixedClock(1), tmp_path / "fixed.json", channel_step=8, warmup=1, runs=3,
                      calibration_samples=2, progress=False, pin=False)
    values = {v for e in table.data["entries"].values() for row in e["ms"] for v in row}
    assert values == {2.0} and set(table.data["call_overhead_ms"].values()) == {2.0}
    assert {p["measured_ms"] for p in table.calibration["points"]} == {2.0}


def test_torch_cuda_backend_without_a_gpu_is_one_clear_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(AutopruneError, match="backend torch-cuda needs a CUDA GPU and none is visible"):
        get_backend("torch-cuda", 1)
    from autoprune.cli import main
    code = main(["lut", "build", "--model", "tests.autoprune.user_model:small_cnn", "--input-shape", "1,8,8",
                 "--backend", "torch-cuda", "--out", str(tmp_path / "x.json")])
    assert code == 2 and not (tmp_path / "x.json").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "autoprune: error: backend torch-cuda needs a CUDA GPU and none is visible here "
        "(torch.cuda.is_available() is False)"]


@pytest.mark.cuda
def test_torch_cuda_lut_builds_with_cuda_events(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_net().eval()
    description = describe_network(model, SHAPE)
    backend = get_backend("torch-cuda", 1)
    assert backend.default_batch == 64
    table = build_lut(model, description, backend, tmp_path / "gpu.json", batch=backend.default_batch,
                      channel_step=8, warmup=2, runs=3, calibration_samples=2, progress=False, pin=False)
    assert table.data["device"]["gpu"] == torch.cuda.get_device_name(0)
    assert latency.same_device(table.data["device"])
    result = validate_lut(table, model, description, samples=3, warmup=1, runs=3, progress=False)
    assert all(r["measured_ms"] > 0 for r in result["rows"])


def test_a_gpu_table_belongs_to_its_gpu_only(monkeypatch):
    here = latency.device_metadata()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not latency.same_device({**here, "gpu": "NVIDIA A100-SXM4-40GB", "gpu_capability": "8.0"})
    assert latency.describe_device({**here, "gpu": "NVIDIA A100-SXM4-40GB", "gpu_capability": "8.0"}) == \
        "NVIDIA A100-SXM4-40GB (compute capability 8.0)"


def test_latency_budgets_go_through_the_lut(tiny_lut):
    _, description, _, table = tiny_lut
    policy = uniform_policy(description, 0.5)
    check = check_budget(parse_budget("50%latency"), description, policy, table)
    assert check.base == pytest.approx(table.predict_ms(description))
    assert check.value == pytest.approx(table.predict_policy_ms(description, policy))
    assert check.limit == pytest.approx(0.5 * check.base)
    absolute = check_budget(parse_budget(f"{max(check.value, 1e-3) * 1.01:.6f}ms"), description, policy, table)
    assert absolute.ok
    with pytest.raises(AutopruneError, match="needs a latency table"):
        check_budget(parse_budget("50%latency"), description, policy, None)
    flops = check_budget(parse_budget("50%flops"), description, policy)
    assert flops.ratio < 0.5 and flops.ok


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_builder_runs_without_the_search_dependencies(tmp_path):
    script = (
        "import sys\n"
        "for name in ('gymnasium', 'stable_baselines3', 'pandas', 'matplotlib'):\n"
        "    sys.modules[name] = None\n"
        "from autoprune.cli import main\n"
        f"sys.exit(main(['lut', 'build', '--model', 'tests.autoprune.user_model:small_cnn', '--input-shape', '1,8,8',"
        f" '--runs', '2', '--warmup', '1', '--channel-step', '8', '--calibration-samples', '1', '--quiet',"
        f" '--out', {str(tmp_path / 'lut.json')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_lut(tmp_path / "lut.json").data["complete"]


@pytest.mark.parametrize("module, backend, message", [
    ("onnxruntime", "onnxruntime", "backend onnxruntime is not installed: pip install onnxruntime "
                                   "(or pip install 'autoprune[onnx]')"),
    ("openvino", "openvino", "backend openvino is not installed (openvino is missing): pip install openvino onnx "
                             "(or pip install 'autoprune[openvino]')"),
])
def test_a_missing_runtime_is_one_clear_line(tmp_path, module, backend, message):
    script = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from autoprune.cli import main\n"
        "sys.exit(main(['lut', 'build', '--model', 'tests.autoprune.user_model:small_cnn', '--input-shape', '1,8,8',"
        f" '--backend', {backend!r}, '--out', {str(tmp_path / 'x.json')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"autoprune: error: {message}"]
    assert not (tmp_path / "x.json").exists()


def test_a_lut_counts_as_this_device_only_when_name_and_cpu_id_match(monkeypatch):
    monkeypatch.setattr(latency, "_cpuinfo", lambda: {"model name": "AMD EPYC", "cpu family": "26", "model": "2",
                                                      "stepping": "1", "flags": "fpu avx2 avx512f"})
    here = latency.device_metadata()
    assert here["cpu_id"] == "family 26 model 2 stepping 1" and here["isa"] == ["avx2", "avx512f"]
    assert latency.same_device(here)
    # same marketing name, another processor generation behind the hypervisor
    assert not latency.same_device({**here, "cpu_id": "family 25 model 1 stepping 1"})
    assert not latency.same_device({"cpu": "AMD EPYC"})  # recorded before cpu_id existed: cannot be confirmed
    assert not latency.same_device({"cpu": "Some Phone SoC", "cpu_id": here["cpu_id"]})
    assert latency.device_slug() == "amd-epyc-f26m2"
    assert latency.describe_device(here) == "AMD EPYC (family 26 model 2 stepping 1)"
    # a system that reports no finer identity compares by name
    monkeypatch.setattr(latency, "_cpuinfo", lambda: {})
    monkeypatch.setattr(latency.platform, "processor", lambda: "arm")
    assert latency.cpu_id() == "" and latency.same_device({"cpu": "arm"})


@pytest.mark.parametrize("change,message", [
    (lambda d: d["entries"][next(iter(d["entries"]))]["ms"][0].__setitem__(0, "NaN"), "not a finite number"),
    (lambda d: d["entries"][next(iter(d["entries"]))]["ms"][0].__setitem__(0, -0.5), "non-negative"),
    (lambda d: d["calibration"].__setitem__("scale", -1.0), "calibration scale is -1.0, must be positive"),
    (lambda d: d["calibration"].__setitem__("offset_ms", float("inf")), "calibration offset"),
    (lambda d: d["entries"][next(iter(d["entries"]))].__setitem__("in", [8, 4, 1]), "ascending channel counts"),
    (lambda d: d["runtime"].pop("threads"), "corrupt"),
])
def test_lut_values_are_checked_on_load(tiny_lut, tmp_path, change, message):
    data = json.loads(tiny_lut[2].read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AutopruneError, match=message):
        load_lut(path)


def test_a_linear_layer_on_a_channels_last_map_is_timed_at_every_position():
    """ConvNeXt's linear layers run on (N, H, W, C) maps: the table times them on such a map,
    under their own entry, not as one vector through a classifier-like layer."""
    from tests.archs import FIXED

    description = describe_network(FIXED["convnext"]().eval(), (1, 28, 28))
    layers = {layer.name: layer for layer in description.layers}
    expand, head = layers["blocks.0.expand"], layers["head.2"]
    assert expand.in_size == (7, 7) and head.in_size == (1, 1)
    assert signature_key(expand) == "linear|in7x7|bias=1|post=none"
    assert signature_key(head) == "linear|bias=1|post=none"
    assert latency.unit_input_shape(expand, 16, 64, 1) == (1, 7, 7, 16)
    assert latency.unit_module(expand, 16, 64)(torch.zeros(1, 7, 7, 16)).shape == (1, 7, 7, 64)


def test_a_shared_layer_costs_each_of_its_calls(tmp_path):
    """CBAM's channel MLP runs twice per forward pass: the table's estimate counts both calls,
    and the table knows a network whose layer runs once from one whose layer runs twice."""
    from dataclasses import replace

    from tests.archs import FIXED

    model = FIXED["shared"]().eval()
    description = describe_network(model, (1, 28, 28))
    shared = [layer for layer in description.layers if layer.calls > 1]
    assert {layer.name for layer in shared} == {"blocks.1.reduce", "blocks.1.expand", "blocks.3.reduce",
                                                  "blocks.3.expand"} and {layer.calls for layer in shared} == {2}
    once = replace(description, layers=tuple(replace(layer, calls=1) for layer in description.layers))
    assert latency.model_fingerprint(once) != latency.model_fingerprint(description)
    table = build_lut(model, description, TorchBackend(1), tmp_path / "lut.json", channel_step=8, warmup=0, runs=1,
                      rounds=1, calibration_samples=3, progress=False, pin=False)
    kept = {g.name: g.channels for g in description.groups}
    extra = sum(table.layer_ms(layer, *description.layer_channels(layer, kept)) for layer in shared)
    assert table.raw_sum_ms(description, kept) == pytest.approx(table.raw_sum_ms(once, kept) + extra)


def test_the_onnx_unit_of_a_linear_layer_on_a_channels_last_map_computes_the_layer():
    """ONNX's Gemm takes only matrices: a linear layer run at every position is timed as the
    MatMul and Add an exporter makes of it, and computes the same as the torch unit."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tests.archs import FIXED

    description = describe_network(FIXED["convnext"]().eval(), (1, 28, 28))
    layer = next(layer for layer in description.layers if layer.name == "blocks.0.expand")
    unit = latency.unit_module(layer, 16, 64)
    x = torch.randn(latency.unit_input_shape(layer, 16, 64, 1))
    session = ort.InferenceSession(latency._unit_to_onnx(unit, tuple(x.shape)), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    assert np.allclose(y, unit(x).detach().numpy(), atol=1e-5)
