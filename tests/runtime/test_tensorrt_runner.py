"""The TensorRT runner and engine loader (mmexport.runtime.runners.tensorrt) with a fake engine, no GPU.

The runner runs on :class:`SimCuda`, the simulated CUDA backend of
tests/runtime/test_cuda_layer.py; the loader reads engines written by tests/tensorrt_fakes.py.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from mmexport.errors import CheckpointError, DataError, MMExportError
from mmexport.runtime.runners import tensorrt as rtrt
from mmexport.runtime.runners.base import TensorMetadata
from tests.conftest import one_line
from tests.runtime.test_cuda_layer import SimCuda
from tests.tensorrt_fakes import H100, fake_tensorrt, write_engine

# ------------------------------------------------------------------------------------------------
# loader and runner on the simulated CUDA backend
# ------------------------------------------------------------------------------------------------
S, CLASSES = 8, 5
WEIGHTS = np.random.default_rng(0).standard_normal((3, CLASSES)).astype(np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3)) @ WEIGHTS


class FakeEngine:
    """image (N,3,S,S) float32 -> logits (N,CLASSES) float32 = mean over pixels @ WEIGHTS; profile 1..8."""

    num_io_tensors = 2
    num_optimization_profiles = 1
    device_memory_size_v2 = 4096

    def __init__(self, trt, sim):
        self.trt, self.sim = trt, sim
        self.contexts = []

    def get_tensor_name(self, index):
        return ["image", "logits"][index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "image" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def get_tensor_shape(self, name):
        return (-1, 3, S, S) if name == "image" else (-1, CLASSES)

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 3, S, S), (4, 3, S, S), (8, 3, S, S)]

    def create_execution_context(self):
        context = FakeContext(self)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine):
        self.engine, self.sim = engine, engine.sim
        self.shape = None
        self.addresses = {}
        self.executions = 0

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def infer_shapes(self):
        return [] if self.shape else ["image"]

    def get_tensor_shape(self, name):
        return self.shape if name == "image" else (self.shape[0], CLASSES)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, handle):
        assert handle == 1001  # the runner's own (non-default) stream
        self.executions += 1
        shape, addresses = self.shape, dict(self.addresses)

        def op():
            x = self.sim.read(addresses["image"], np.float32, shape)
            self.sim.write(addresses["logits"], reference(x))
            self.sim.advance(2.0)

        self.sim.submit(op)
        return True


@pytest.fixture
def runner_setup(monkeypatch):
    trt = fake_tensorrt("11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    sim = SimCuda(copy_ms=0.25)
    engine = FakeEngine(trt, sim)
    logger = types.SimpleNamespace(last_error=lambda: "no error message from TensorRT")
    loader = lambda: rtrt.LoadedEngine(engine, object(), logger, 11)  # noqa: E731
    return sim, engine, loader


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, S, S)).astype(np.float32)


def test_runner_discovers_io_and_runs(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim, name="trt-test") as runner:
        assert runner.input_metadata() == {"image": TensorMetadata(np.dtype(np.float32), (None, 3, S, S))}
        assert runner.output_metadata() == {"logits": TensorMetadata(np.dtype(np.float32), (None, CLASSES))}
        assert runner.profile() == ((1, 3, S, S), (4, 3, S, S), (8, 3, S, S))
        x = batch(2)
        out = runner.infer(x)
        np.testing.assert_allclose(out["logits"], reference(x), rtol=1e-6)
        assert out["logits"].dtype == np.float32
        assert runner.last_inference_timings() == {"h2d": 0.25, "compute": 2.0, "d2h": 0.25}
        assert runner.last_inference_time() is not None and not runner.cuda_graphs_active
    assert sim.device_memory == {} and sim.host_live == set()
    assert (sim.live_streams, sim.live_events, sim.live_graphs, sim.closed) == (0, 0, 0, False)  # caller's backend stays open


def test_runner_buffers_grow_only_for_larger_batches(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim) as runner:
        for n in (2, 8, 3, 8, 1):
            x = batch(n, seed=n)
            np.testing.assert_allclose(runner.infer(x)["logits"], reference(x), rtol=1e-6)
        allocations = [entry for entry in sim.log if entry.startswith("malloc")]
        assert len(allocations) == 8  # 2 device + 2 host at batch 2, all four grown once at batch 8
        context = engine.contexts[0]
        assert context.executions == 5


def test_runner_refuses_batches_outside_the_profile(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim) as runner:
        with pytest.raises(DataError) as excinfo:
            runner.infer(batch(9))
        assert one_line(excinfo) == (
            "input image: batch 9 is outside the engine's profile 1..8; split the batch or rebuild the engine with a "
            "larger --max-batch"
        )
        with pytest.raises(DataError) as excinfo:
            runner.infer(np.zeros((2, 3, S + 1, S), np.float32))
        assert "has shape (2, 3, 9, 8), the model takes (N, 3, 8, 8)" in one_line(excinfo)


def test_runner_cuda_graphs_capture_once_per_shape_and_replay(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim, cuda_graphs=True) as runner:
        assert runner.cuda_graphs and not runner.cuda_graphs_active
        for n, seed in ((4, 1), (4, 2), (4, 3)):
            x = batch(n, seed)
            np.testing.assert_allclose(runner.infer(x)["logits"], reference(x), rtol=1e-6)
        context = engine.contexts[0]
        assert runner.cuda_graphs_active and sim.live_graphs == 1
        assert context.executions == 2  # one plain launch + one captured, then replays only
        assert sim.log.count("graph_launch") == 3
        assert runner.last_inference_timings()["compute"] == 2.0
        x = batch(6, 9)  # a new shape: re-captured
        np.testing.assert_allclose(runner.infer(x)["logits"], reference(x), rtol=1e-6)
        assert context.executions == 4 and sim.live_graphs == 1
    assert sim.live_graphs == 0 and sim.device_memory == {}


def test_runner_graphs_need_a_backend_that_has_them(runner_setup):
    sim, engine, loader = runner_setup
    sim.supports_graphs = False
    sim.name = "torch"
    runner = rtrt.TensorRTRunner(loader, cuda=sim, cuda_graphs=True, name="trt")
    with pytest.raises(MMExportError) as excinfo:
        runner.activate()
    assert one_line(excinfo) == "trt: CUDA graphs need the cuda-bindings backend, not torch"
    assert not runner.is_active


def test_runner_frees_everything_when_activation_fails(runner_setup, monkeypatch):
    sim, engine, loader = runner_setup
    monkeypatch.setattr(engine, "create_execution_context", lambda: None)
    runner = rtrt.TensorRTRunner(loader, cuda=sim, name="trt")
    with pytest.raises(MMExportError) as excinfo:
        runner.activate()
    assert one_line(excinfo) == ("trt: TensorRT could not create an execution context (no error message from TensorRT); "
                                 "the engine needs 4096 bytes of GPU memory")
    assert (sim.live_streams, sim.live_events) == (0, 0)


def test_failed_builder_or_runtime_creation_is_one_line():
    logger = types.SimpleNamespace(last_error=lambda: "CUDA initialization failure with error: 35")

    def null_factory(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    for factory in (null_factory, lambda logger: None):
        with pytest.raises(MMExportError) as excinfo:
            rtrt.create(factory, logger, "builder")
        assert one_line(excinfo) == ("TensorRT could not create a builder (CUDA initialization failure with error: 35); "
                                     "is the NVIDIA GPU and driver usable?")


def test_device_memory_size_dispatch():
    ten_zero = types.SimpleNamespace(device_memory_size=123)
    eleven = types.SimpleNamespace(device_memory_size_v2=456)
    assert rtrt.device_memory_size(ten_zero, 10) == 123
    assert rtrt.device_memory_size(eleven, 11) == 456
    assert rtrt.device_memory_size(types.SimpleNamespace(device_memory_size_v2=7, device_memory_size=8), 10) == 7


def test_unsupported_io_dtype_is_one_line(runner_setup, monkeypatch):
    sim, engine, loader = runner_setup
    monkeypatch.setattr(engine, "get_tensor_dtype", lambda name: engine.trt.DataType.BF16)
    with pytest.raises(MMExportError) as excinfo:
        rtrt.discover_io(engine, engine.trt)
    assert "tensor image has TensorRT type" in one_line(excinfo) and "which numpy cannot hold" in one_line(excinfo)


def test_engine_loader_checks_before_deserialising(tmp_path, monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = write_engine(tmp_path, build_flags={"version_compatible": True})
    loaded = rtrt.EngineFromPath(path, environment=H100)()
    assert loaded.sidecar.precision == "fp16" and loaded.tensorrt_major == 10
    assert trt.runtimes[-1].engine_host_code_allowed  # version-compatible plans carry host code
    path.write_bytes(path.read_bytes()[:-1] + b"X")  # tampered
    deserialised = len([e for e in trt.log if e[0] == "deserialize"])
    with pytest.raises(CheckpointError) as excinfo:
        rtrt.EngineFromPath(path, environment=H100)()
    assert "the engine's sha256" in one_line(excinfo)
    assert len([e for e in trt.log if e[0] == "deserialize"]) == deserialised  # refused before TensorRT saw it


def test_engine_loader_turns_a_none_engine_into_one_error(tmp_path, monkeypatch):
    trt = fake_tensorrt(deserialize_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = write_engine(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        rtrt.EngineFromPath(path, environment=H100)()
    assert one_line(excinfo) == (
        f"{path}: TensorRT 10.16.1.11 could not deserialize the engine (The engine plan file is generated on an "
        "incompatible device, expecting compute 8.9 got compute 9.0, please rebuild.); "
        f"rebuild it: mmexport fold {tmp_path} --to trt --precision fp16"
    )

