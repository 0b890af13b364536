"""The CUDA layer (mmexport.runtime.cuda): selection, error translation, buffer reuse; real GPU checks marked ``gpu``.

The CPU tests drive the real classes with stand-ins: a fake ``cuda.bindings.runtime``
module (every call returns a ``cudaError_t`` first, as cuda-python does) and
:class:`SimCuda`, a backend whose "device memory" is numpy arrays keyed by pointer
(also used by tests/runtime/test_tensorrt_runner.py to run the TensorRT runner without a GPU).
"""

from __future__ import annotations

import enum
import importlib
import sys
import types

import numpy as np
import pytest

from mmexport.errors import MissingDependencyError, MMExportError
from mmexport.runtime import cuda as cudamod
from mmexport.runtime.cuda import (
    BufferPool,
    CudaBackend,
    CudaBindingsBackend,
    CudaError,
    DeviceBuffer,
    EventTimer,
    HostBuffer,
    get_cuda,
)
from tests.conftest import one_line


# ------------------------------------------------------------------------------------------------
# stand-ins
# ------------------------------------------------------------------------------------------------
class FakeError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


def fake_runtime(*, devices: int = 1, fail: dict[str, FakeError] | None = None) -> types.SimpleNamespace:
    """A stand-in for cuda.bindings.runtime: host memory from numpy, calls logged, chosen calls failing."""
    fail = dict(fail or {})
    calls: list[str] = []
    memory: dict[int, np.ndarray] = {}
    counter = iter(range(0x10000, 1 << 40, 0x10000))

    def call(name, produce=lambda *a: ()):
        def function(*args):
            calls.append(name)
            if name in fail:
                return (fail[name],) + tuple(None for _ in range(1))
            out = produce(*args)
            return (FakeError.cudaSuccess,) + (out if isinstance(out, tuple) else (out,))

        return function

    def malloc(nbytes):
        array = np.zeros(max(nbytes, 1), dtype=np.uint8)
        memory[array.ctypes.data] = array
        return array.ctypes.data

    def memcpy(dst, src, count, kind, stream):
        ctypes_memmove(dst, src, count)
        return ()

    def props(device):
        return types.SimpleNamespace(name=b"Fake GPU 80GB\0\0\0", major=9, minor=0, totalGlobalMem=80 << 30,
                                     multiProcessorCount=132)

    rt = types.SimpleNamespace(
        cudaError_t=FakeError,
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
        cudaStreamNonBlocking=1,
        cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1),
        calls=calls,
        memory=memory,
    )
    rt.cudaGetErrorString = lambda err: (FakeError.cudaSuccess, f"description of {FakeError(err).name}".encode())
    rt.cudaGetDeviceCount = call("cudaGetDeviceCount", lambda: devices)
    rt.cudaSetDevice = call("cudaSetDevice")
    rt.cudaGetDeviceProperties = call("cudaGetDeviceProperties", props)
    rt.cudaRuntimeGetVersion = call("cudaRuntimeGetVersion", lambda: 13050)
    rt.cudaDriverGetVersion = call("cudaDriverGetVersion", lambda: 13050)
    rt.cudaMalloc = call("cudaMalloc", malloc)
    rt.cudaFree = call("cudaFree", lambda ptr: (memory.pop(ptr), ())[1])
    rt.cudaMallocHost = call("cudaMallocHost", malloc)
    rt.cudaFreeHost = call("cudaFreeHost", lambda ptr: (memory.pop(ptr), ())[1])
    rt.cudaMemcpyAsync = call("cudaMemcpyAsync", memcpy)
    rt.cudaStreamCreateWithFlags = call("cudaStreamCreateWithFlags", lambda flags: next(counter))
    rt.cudaStreamSynchronize = call("cudaStreamSynchronize")
    rt.cudaStreamDestroy = call("cudaStreamDestroy")
    rt.cudaEventCreate = call("cudaEventCreate", lambda: next(counter))
    rt.cudaEventRecord = call("cudaEventRecord")
    rt.cudaEventSynchronize = call("cudaEventSynchronize")
    rt.cudaEventElapsedTime = call("cudaEventElapsedTime", lambda a, b: 1.5)
    rt.cudaEventDestroy = call("cudaEventDestroy")
    rt.cudaStreamBeginCapture = call("cudaStreamBeginCapture")
    rt.cudaStreamEndCapture = call("cudaStreamEndCapture", lambda s: "graph")
    rt.cudaGraphInstantiate = call("cudaGraphInstantiate", lambda g, flags: "graph-exec")
    rt.cudaGraphDestroy = call("cudaGraphDestroy")
    rt.cudaGraphLaunch = call("cudaGraphLaunch")
    rt.cudaGraphExecDestroy = call("cudaGraphExecDestroy")
    return rt


def ctypes_memmove(dst: int, src: int, count: int) -> None:
    import ctypes

    ctypes.memmove(dst, src, count)


class SimCuda(CudaBackend):
    """A CUDA backend simulated on the host: device memory is numpy arrays keyed by fake pointers.

    Every phase advances a clock so event timings are deterministic: each copy takes
    ``copy_ms``, and whatever the engine stand-in reports through :meth:`advance`.
    CUDA-graph capture records the operations submitted while capturing and replays them.
    """

    name = "sim"
    supports_graphs = True

    def __init__(self, copy_ms: float = 0.25) -> None:
        self.device_memory: dict[int, np.ndarray] = {}
        self.host_live: set[int] = set()
        self._next = 0x7F0000000000
        self.clock = 0.0
        self.copy_ms = copy_ms
        self.log: list[str] = []
        self.capturing: list | None = None
        self.live_streams = 0
        self.live_events = 0
        self.live_graphs = 0
        self.closed = False

    def advance(self, ms: float) -> None:
        self.clock += ms

    def submit(self, op) -> None:
        """Run ``op`` now, or record it when a CUDA graph is being captured."""
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    def device_count(self) -> int:
        return 1

    def device_properties(self, device: int = 0):
        return cudamod.DeviceProperties("Sim GPU", (9, 0), 1 << 30, 1)

    def versions(self):
        return 13050, 13050

    def close(self) -> None:
        self.closed = True

    def malloc(self, nbytes: int) -> DeviceBuffer:
        ptr = self._next
        self._next += max(nbytes, 1) + 4096
        self.device_memory[ptr] = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.log.append(f"malloc {nbytes}")
        return DeviceBuffer(ptr, nbytes)

    def free(self, buffer: DeviceBuffer) -> None:
        del self.device_memory[buffer.ptr]
        self.log.append(f"free {buffer.nbytes}")
        buffer.ptr = 0

    def malloc_host(self, nbytes: int) -> HostBuffer:
        array = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.host_live.add(array.ctypes.data)
        self.log.append(f"malloc_host {nbytes}")
        return HostBuffer(array.ctypes.data, nbytes, array[:nbytes], array)

    def free_host(self, buffer: HostBuffer) -> None:
        self.host_live.remove(buffer.ptr)
        self.log.append(f"free_host {buffer.nbytes}")
        buffer.ptr = 0

    def copy_htod(self, dst, src, nbytes, stream) -> None:
        def op():
            self.device_memory[dst.ptr][:nbytes] = src.array[:nbytes]
            self.advance(self.copy_ms)

        self.submit(op)

    def copy_dtoh(self, dst, src, nbytes, stream) -> None:
        def op():
            dst.array[:nbytes] = self.device_memory[src.ptr][:nbytes]
            self.advance(self.copy_ms)

        self.submit(op)

    def stream_create(self):
        self.live_streams += 1
        return {"stream": self.live_streams}

    def stream_handle(self, stream) -> int:
        return 1000 + stream["stream"]

    def stream_synchronize(self, stream) -> None:
        pass

    def stream_destroy(self, stream) -> None:
        self.live_streams -= 1

    def event_create(self):
        self.live_events += 1
        return {"t": None}

    def event_record(self, event, stream) -> None:
        self.submit(lambda: event.__setitem__("t", self.clock))

    def event_synchronize(self, event) -> None:
        pass

    def elapsed_ms(self, start, end) -> float:
        return end["t"] - start["t"]

    def event_destroy(self, event) -> None:
        self.live_events -= 1

    def graph_begin_capture(self, stream) -> None:
        self.capturing = []

    def graph_end_capture(self, stream):
        ops, self.capturing = self.capturing, None
        self.live_graphs += 1
        return {"ops": ops}

    def graph_launch(self, graph_exec, stream) -> None:
        self.log.append("graph_launch")
        for op in graph_exec["ops"]:
            op()

    def graph_destroy(self, graph_exec) -> None:
        self.live_graphs -= 1

    def read(self, ptr: int, dtype, shape) -> np.ndarray:
        count = int(np.prod(shape))
        return self.device_memory[ptr][: count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def write(self, ptr: int, array: np.ndarray) -> None:
        raw = np.ascontiguousarray(array).view(np.uint8).ravel()
        self.device_memory[ptr][: raw.size] = raw


# ------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------
def test_auto_falls_through_missing_and_unusable_bindings(monkeypatch):
    tried = []

    def missing(device):
        tried.append("cuda-bindings")
        raise cudamod.BindingNotInstalled("cuda-python is not installed: pip install cuda-python")

    def unusable(device):
        tried.append("torch")
        raise MissingDependencyError("no NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")

    sim = SimCuda()
    monkeypatch.setattr(cudamod, "_FACTORIES", {"cuda-bindings": missing, "torch": unusable, "pycuda": lambda d: sim})
    assert get_cuda() is sim
    assert tried == ["cuda-bindings", "torch"]


def test_auto_reports_why_no_backend_is_usable(monkeypatch):
    def missing(name):
        def factory(device):
            raise cudamod.BindingNotInstalled(f"{name} is not installed")

        return factory

    monkeypatch.setattr(cudamod, "_FACTORIES", {n: missing(n) for n in cudamod.BACKENDS})
    with pytest.raises(MissingDependencyError) as excinfo:
        get_cuda()
    assert "pip install cuda-python" in one_line(excinfo)

    def no_gpu(device):
        raise MissingDependencyError("no NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")

    monkeypatch.setattr(cudamod, "_FACTORIES", {**{n: missing(n) for n in cudamod.BACKENDS}, "torch": no_gpu})
    with pytest.raises(MissingDependencyError) as excinfo:
        get_cuda("auto")
    message = one_line(excinfo)
    assert message.startswith("no usable CUDA backend") and "torch.cuda.is_available() is False" in message


def test_named_backends_and_aliases(monkeypatch):
    sim = SimCuda()
    monkeypatch.setattr(cudamod, "_FACTORIES", {"cuda-bindings": lambda d: sim, "torch": None, "pycuda": None})
    assert get_cuda("cuda-python") is sim and get_cuda("CUDA-BINDINGS") is sim and get_cuda("cudart") is sim
    with pytest.raises(MMExportError) as excinfo:
        get_cuda("opencl")
    assert "unknown CUDA backend 'opencl'" in one_line(excinfo)


def test_missing_packages_name_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(cudamod.BindingNotInstalled) as excinfo:
        CudaBindingsBackend()
    assert one_line(excinfo) == "cuda-python is not installed: pip install cuda-python"
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(cudamod.BindingNotInstalled) as excinfo:
        cudamod.PycudaBackend()
    assert "pip install pycuda" in one_line(excinfo)


def test_torch_backend_refuses_without_a_gpu():
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    with pytest.raises(MissingDependencyError) as excinfo:
        cudamod.TorchBackend(torch_module=fake_torch)
    assert "torch.cuda.is_available() is False" in one_line(excinfo)


def test_modules_import_without_cuda_tensorrt_or_torch(tmp_path):
    """The runtime's CUDA/TensorRT modules import with torch, tensorrt, cuda and pycuda all blocked."""
    import subprocess

    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'tensorrt', 'cuda', 'cuda.bindings', 'cuda.bindings.runtime', 'pycuda'):\n"
        "    sys.modules[name] = None\n"
        "import mmexport.runtime.cuda, mmexport.runtime.engine, mmexport.runtime.trt_stats\n"
        "import mmexport.runtime.runners.tensorrt\n"
        "import mmexport.convert.tensorrt\n"
        "from mmexport.runtime.cuda import get_cuda\n"
        "try:\n"
        "    get_cuda()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MissingDependencyError no CUDA Python binding is installed: pip install cuda-python"


# ------------------------------------------------------------------------------------------------
# cuda-bindings backend against a fake runtime: every cudaError_t is checked
# ------------------------------------------------------------------------------------------------
def test_cuda_bindings_backend_round_trip_on_fake_runtime():
    rt = fake_runtime()
    backend = CudaBindingsBackend(runtime=rt)
    assert rt.calls[:2] == ["cudaGetDeviceCount", "cudaSetDevice"]
    assert backend.device_properties() == cudamod.DeviceProperties("Fake GPU 80GB", (9, 0), 80 << 30, 132)
    assert backend.versions() == (13050, 13050)
    host = backend.malloc_host(64)
    device = backend.malloc(64)
    host.view(np.float32, (4, 4))[:] = np.arange(16, dtype=np.float32).reshape(4, 4)
    stream = backend.stream_create()
    backend.copy_htod(device, host, 64, stream)
    back = backend.malloc_host(64)
    backend.copy_dtoh(back, device, 64, stream)
    backend.stream_synchronize(stream)
    np.testing.assert_array_equal(back.view(np.float32, (16,)), np.arange(16, dtype=np.float32))
    assert backend.stream_handle(stream) == int(stream)
    start, end = backend.event_create(), backend.event_create()
    backend.event_record(start, stream)
    backend.event_record(end, stream)
    assert backend.elapsed_ms(start, end) == 1.5
    for buffer in (host, back):
        backend.free_host(buffer)
    backend.free(device)
    assert rt.memory == {} and device.ptr == 0
    backend.graph_begin_capture(stream)
    assert backend.graph_end_capture(stream) == "graph-exec"
    assert rt.calls[-3:] == ["cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphDestroy"]


@pytest.mark.parametrize(
    "call, action",
    [
        ("cudaMalloc", lambda b: b.malloc(16)),
        ("cudaMallocHost", lambda b: b.malloc_host(16)),
        ("cudaMemcpyAsync", lambda b: b.copy_htod(DeviceBuffer(1, 4), HostBuffer(2, 4, np.zeros(4, np.uint8)), 4, 0)),
        ("cudaStreamSynchronize", lambda b: b.stream_synchronize(5)),
        ("cudaEventElapsedTime", lambda b: b.elapsed_ms(1, 2)),
        ("cudaGraphLaunch", lambda b: b.graph_launch("exec", 5)),
    ],
)
def test_cuda_errors_become_one_line_naming_the_call(call, action):
    backend = CudaBindingsBackend(runtime=fake_runtime(fail={call: FakeError.cudaErrorMemoryAllocation}))
    with pytest.raises(CudaError) as excinfo:
        action(backend)
    assert one_line(excinfo) == (
        f"CUDA call {call} failed: cudaErrorMemoryAllocation (description of cudaErrorMemoryAllocation)"
    )


def test_no_device_is_a_missing_dependency():
    with pytest.raises(MissingDependencyError) as excinfo:
        CudaBindingsBackend(runtime=fake_runtime(fail={"cudaGetDeviceCount": FakeError.cudaErrorInsufficientDriver}))
    assert one_line(excinfo) == (
        "no usable NVIDIA GPU: CUDA call cudaGetDeviceCount failed: cudaErrorInsufficientDriver "
        "(description of cudaErrorInsufficientDriver)"
    )
    with pytest.raises(MissingDependencyError) as excinfo:
        CudaBindingsBackend(device=1, runtime=fake_runtime(devices=1))
    assert one_line(excinfo) == "no NVIDIA GPU 1 visible to CUDA (1 device(s))"


def test_real_cuda_bindings_error_translation_without_a_gpu():
    """On a machine without a usable driver, the real cuda-bindings report it in one line."""
    try:
        runtime = importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        pytest.skip("cuda-bindings is not installed")
    err, count = runtime.cudaGetDeviceCount()
    if int(err) == 0 and count > 0:
        pytest.skip("a GPU is usable here; the gpu-marked tests cover it")
    with pytest.raises(MissingDependencyError) as excinfo:
        CudaBindingsBackend()
    assert one_line(excinfo).startswith("no usable NVIDIA GPU: CUDA call cudaGetDeviceCount failed: cudaError")


# ------------------------------------------------------------------------------------------------
# buffers: allocated once, grown only when a larger request arrives
# ------------------------------------------------------------------------------------------------
def test_buffer_pool_reuses_and_grows_only_on_demand():
    sim = SimCuda()
    pool = BufferPool(sim)
    first = pool.device("image", 1000)
    assert pool.device("image", 1000) is first and pool.device("image", 10) is first
    assert (pool.allocations, pool.generation) == (1, 1)
    grown = pool.device("image", 4000)
    assert grown is not first and grown.nbytes == 4000 and first.ptr == 0  # the old one was freed
    assert pool.device("image", 2000) is grown
    host = pool.host("image", 4000)
    assert pool.host("image", 100) is host
    assert (pool.allocations, pool.generation) == (3, 3)
    assert sim.log == ["malloc 1000", "free 1000", "malloc 4000", "malloc_host 4000"]
    pool.close()
    assert sim.device_memory == {} and sim.host_live == set()
    assert pool.device_buffers == {} and pool.host_buffers == {}


def test_buffer_pool_close_frees_everything_even_when_one_free_fails():
    sim = SimCuda()
    pool = BufferPool(sim)
    pool.device("a", 10)
    pool.device("b", 20)
    pool.host("a", 10)
    original = sim.free

    def flaky(buffer):
        if buffer.nbytes == 10:
            raise CudaError("CUDA call cudaFree failed: cudaErrorInvalidValue")
        original(buffer)

    sim.free = flaky
    with pytest.raises(CudaError):
        pool.close()
    assert sim.host_live == set() and list(sim.device_memory) and len(sim.device_memory) == 1  # only the failed one left
    assert pool.device_buffers == {} and pool.host_buffers == {}


def test_host_buffer_view_checks_its_size():
    buffer = HostBuffer(0, 16, np.zeros(16, dtype=np.uint8))
    assert buffer.view(np.float32, (2, 2)).shape == (2, 2)
    with pytest.raises(MMExportError) as excinfo:
        buffer.view(np.float32, (2, 3))
    assert "cannot hold" in one_line(excinfo)


def test_event_timer_splits_the_three_phases():
    sim = SimCuda(copy_ms=0.5)
    timer = EventTimer(sim)
    stream = sim.stream_create()
    timer.mark(0, stream)
    sim.advance(0.5)
    timer.mark(1, stream)
    sim.advance(3.0)
    timer.mark(2, stream)
    sim.advance(0.25)
    timer.mark(3, stream)
    assert timer.timings() == {"h2d": 0.5, "compute": 3.0, "d2h": 0.25}
    timer.close()
    assert sim.live_events == 0


# ------------------------------------------------------------------------------------------------
# real GPU: every available backend allocates, copies through pinned memory, times and reuses
# ------------------------------------------------------------------------------------------------
def _available_backends() -> list[str]:
    names = []
    for name in cudamod.BACKENDS:
        try:
            backend = get_cuda(name)
        except MissingDependencyError:
            continue
        backend.close()
        names.append(name)
    return names


def standin_engine(backend: CudaBackend, src: DeviceBuffer, dst: DeviceBuffer, count: int, stream) -> str:
    """y = 2 x + 1 on the device, on ``stream``: CuPy if present, else torch, reading raw pointers."""

    class _Array:
        def __init__(self, ptr):
            self.__cuda_array_interface__ = {"shape": (count,), "typestr": "<f4", "data": (ptr, False), "version": 3,
                                             "strides": None, "stream": None}

    handle = backend.stream_handle(stream)
    try:
        import cupy

        with cupy.cuda.ExternalStream(handle):
            x, y = cupy.asarray(_Array(src.ptr)), cupy.asarray(_Array(dst.ptr))
            cupy.multiply(x, 2, out=y)
            cupy.add(y, 1, out=y)
        return "cupy"
    except ImportError:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(handle)):
            x, y = torch.as_tensor(_Array(src.ptr), device="cuda"), torch.as_tensor(_Array(dst.ptr), device="cuda")
            torch.add(x * 2, 1, out=y)
        return "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("name", cudamod.BACKENDS)
def test_backend_on_a_real_gpu(name):
    if name not in _available_backends():
        pytest.skip(f"the {name} CUDA backend is not installed or cannot use this GPU")
    backend = get_cuda(name)
    try:
        props = backend.device_properties()
        assert props.name and props.compute_capability >= (3, 0)
        runtime, driver = backend.versions()
        assert runtime is None or runtime >= 11000
        pool = BufferPool(backend)
        stream = backend.stream_create()
        timer = EventTimer(backend)
        for batch in (2, 8, 4):  # 4 after 8: reuses the larger buffers
            count = batch * 3 * 32 * 32
            data = np.random.default_rng(batch).standard_normal(count).astype(np.float32)
            h_in, h_out = pool.host("in", data.nbytes), pool.host("out", data.nbytes)
            d_in, d_out = pool.device("in", data.nbytes), pool.device("out", data.nbytes)
            h_in.view(np.float32, (count,))[:] = data
            timer.mark(0, stream)
            backend.copy_htod(d_in, h_in, data.nbytes, stream)
            timer.mark(1, stream)
            standin_engine(backend, d_in, d_out, count, stream)
            timer.mark(2, stream)
            backend.copy_dtoh(h_out, d_out, data.nbytes, stream)
            timer.mark(3, stream)
            backend.stream_synchronize(stream)
            np.testing.assert_allclose(h_out.view(np.float32, (count,)), 2 * data + 1, rtol=1e-6)
            times = timer.timings()
            assert set(times) == {"h2d", "compute", "d2h"} and all(0 <= t < 1000 for t in times.values())
        assert pool.allocations == 8  # 4 buffers at batch 2, 4 grown at batch 8, none at batch 4
        timer.close()
        pool.close()
        backend.stream_destroy(stream)
    finally:
        backend.close()


@pytest.mark.gpu
def test_cuda_graph_replay_on_a_real_gpu():
    try:
        backend = get_cuda("cuda-bindings")
    except MissingDependencyError as exc:
        pytest.skip(f"cuda-bindings cannot use this GPU: {exc}")
    pool = BufferPool(backend)
    stream = backend.stream_create()
    count = 4096
    d_in, d_out = pool.device("in", count * 4), pool.device("out", count * 4)
    h_in, h_out = pool.host("in", count * 4), pool.host("out", count * 4)
    h_in.view(np.float32, (count,))[:] = np.arange(count, dtype=np.float32)
    backend.copy_htod(d_in, h_in, count * 4, stream)
    standin_engine(backend, d_in, d_out, count, stream)  # warm-up (library init happens outside the capture)
    backend.stream_synchronize(stream)
    backend.graph_begin_capture(stream)
    standin_engine(backend, d_in, d_out, count, stream)
    graph = backend.graph_end_capture(stream)
    h_in.view(np.float32, (count,))[:] = 10.0
    backend.copy_htod(d_in, h_in, count * 4, stream)
    backend.graph_launch(graph, stream)
    backend.copy_dtoh(h_out, d_out, count * 4, stream)
    backend.stream_synchronize(stream)
    np.testing.assert_array_equal(h_out.view(np.float32, (count,)), np.full(count, 21.0, np.float32))
    backend.graph_destroy(graph)
    pool.close()
    backend.stream_destroy(stream)
