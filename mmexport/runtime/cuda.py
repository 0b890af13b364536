"""The few CUDA operations the TensorRT runner needs, behind one small interface.

Device memory, page-locked host memory, asynchronous host<->device copies, streams,
events (device-side timing), CUDA-graph capture/replay and device properties.
Three implementations, chosen by :func:`get_cuda`:

* ``cuda-bindings`` (default): NVIDIA's cuda-python, ``cuda.bindings.runtime`` --
  what NVIDIA's TensorRT samples use since 10.14 (they replaced pycuda;
  ``samples/python/common_runtime.py``). From cuda-bindings 13 the import path is
  ``cuda.bindings.runtime`` (the old ``cuda.cudart`` trampolines are gone). Every
  call returns a ``cudaError_t`` first; each one is checked and a failure becomes a
  one-line :class:`CudaError` naming the call.
* ``torch``: memory as torch CUDA tensors and torch streams/events (for callers that
  already hold torch tensors, as torch-tensorrt does). torch is imported only here.
* ``pycuda``: optional, for hosts that have it (it has no binary wheels). It works in
  the device's *primary* context, the one the CUDA runtime and TensorRT use.

Nothing is imported at module import time. Buffers are owned by a :class:`BufferPool`:
allocated once per name, reused, and grown only when a larger request arrives.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mmexport.errors import MissingDependencyError, MMExportError, one_line

BACKENDS: tuple[str, ...] = ("cuda-bindings", "torch", "pycuda")
_ALIASES = {"cuda-bindings": "cuda-bindings", "cuda-python": "cuda-bindings", "cudart": "cuda-bindings",
            "cuda_bindings": "cuda-bindings", "torch": "torch", "pycuda": "pycuda"}
_INSTALL = {
    "cuda-bindings": "pip install cuda-python",
    "torch": "pip install torch (a CUDA build)",
    "pycuda": "pip install pycuda (builds from source against the CUDA toolkit)",
}


class CudaError(MMExportError):
    """A CUDA call failed; the message names the call and CUDA's error."""


class BindingNotInstalled(MissingDependencyError):
    """The Python package of a backend is not installed (``auto`` then tries the next one)."""




@dataclass(frozen=True)
class DeviceProperties:
    name: str
    compute_capability: tuple[int, int]
    total_memory: int | None = None
    multiprocessors: int | None = None


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int
    handle: Any = None  # what keeps the allocation alive in the backend (tensor, DeviceAllocation)


@dataclass
class HostBuffer:
    """Page-locked host memory; ``array`` is a writable uint8 numpy view of all of it."""

    ptr: int
    nbytes: int
    array: np.ndarray
    handle: Any = None

    def view(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape)`` elements as an array of ``dtype`` (no copy)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        need = count * dtype.itemsize
        if need > self.nbytes:
            raise MMExportError(f"host buffer of {self.nbytes} bytes cannot hold {shape} {dtype} ({need} bytes)")
        return self.array[:need].view(dtype).reshape(shape)


class CudaBackend:
    """The interface; see the module docstring. Streams and events are opaque backend objects."""

    name = "abstract"
    supports_graphs = False

    # -- device ----------------------------------------------------------------------------------
    def device_count(self) -> int:
        raise NotImplementedError

    def device_properties(self, device: int = 0) -> DeviceProperties:
        raise NotImplementedError

    def versions(self) -> tuple[int | None, int | None]:
        """(CUDA runtime, CUDA driver) versions as CUDA encodes them (13050 = 13.5); None where unknown."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend itself holds (a pushed context); buffers are freed by their owner."""

    # -- memory ----------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> DeviceBuffer:
        raise NotImplementedError

    def free(self, buffer: DeviceBuffer) -> None:
        raise NotImplementedError

    def malloc_host(self, nbytes: int) -> HostBuffer:
        raise NotImplementedError

    def free_host(self, buffer: HostBuffer) -> None:
        raise NotImplementedError

    def copy_htod(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int, stream: Any) -> None:
        raise NotImplementedError

    def copy_dtoh(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int, stream: Any) -> None:
        raise NotImplementedError

    # -- streams and events ----------------------------------------------------------------------
    def stream_create(self) -> Any:
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        """The raw ``cudaStream_t`` as an int (what ``IExecutionContext.execute_async_v3`` takes)."""
        raise NotImplementedError

    def stream_synchronize(self, stream: Any) -> None:
        raise NotImplementedError

    def stream_destroy(self, stream: Any) -> None:
        raise NotImplementedError

    def event_create(self) -> Any:
        raise NotImplementedError

    def event_record(self, event: Any, stream: Any) -> None:
        raise NotImplementedError

    def event_synchronize(self, event: Any) -> None:
        raise NotImplementedError

    def elapsed_ms(self, start: Any, end: Any) -> float:
        raise NotImplementedError

    def event_destroy(self, event: Any) -> None:
        raise NotImplementedError

    # -- CUDA graphs -----------------------------------------------------------------------------
    def graph_begin_capture(self, stream: Any) -> None:
        raise MMExportError(f"CUDA graphs need the cuda-bindings backend (this is {self.name}): pip install cuda-python")

    def graph_end_capture(self, stream: Any) -> Any:
        raise MMExportError(f"CUDA graphs need the cuda-bindings backend (this is {self.name})")

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        raise MMExportError(f"CUDA graphs need the cuda-bindings backend (this is {self.name})")

    def graph_destroy(self, graph_exec: Any) -> None:
        raise MMExportError(f"CUDA graphs need the cuda-bindings backend (this is {self.name})")


def _host_array(ptr: int, nbytes: int) -> np.ndarray:
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))


# ------------------------------------------------------------------------------------------------
# cuda-bindings (cuda-python)
# ------------------------------------------------------------------------------------------------
class CudaBindingsBackend(CudaBackend):
    """``cuda.bindings.runtime``; ``runtime`` may be given (tests pass a fake module)."""

    name = "cuda-bindings"
    supports_graphs = True

    def __init__(self, device: int = 0, runtime: Any = None) -> None:
        if runtime is None:
            try:
                runtime = importlib.import_module("cuda.bindings.runtime")
            except ImportError:
                raise BindingNotInstalled(f"cuda-python is not installed: {_INSTALL['cuda-bindings']}") from None
        self.rt = runtime
        self.device = device
        count = self.device_count()
        if count <= device:
            raise MissingDependencyError(f"no NVIDIA GPU {device} visible to CUDA ({count} device(s))")
        self._call("cudaSetDevice", device)

    def _error_text(self, err: Any) -> str:
        name = getattr(err, "name", None) or f"error {int(err)}"
        try:
            ok, desc = self.rt.cudaGetErrorString(err)[:2]
            if int(ok) == 0 and desc:
                desc = desc.decode() if isinstance(desc, (bytes, bytearray)) else str(desc)
                return f"{name} ({desc})"
        except Exception:
            pass
        return str(name)

    def _call(self, name: str, *args: Any) -> Any:
        """Call ``runtime.<name>``, check its cudaError_t, return the outputs (None, one value or a tuple)."""
        result = getattr(self.rt, name)(*args)
        if isinstance(result, tuple):
            err, values = result[0], result[1:]
        else:
            err, values = result, ()
        if int(err) != 0:
            raise CudaError(f"CUDA call {name} failed: {self._error_text(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def device_count(self) -> int:
        try:
            return int(self._call("cudaGetDeviceCount"))
        except CudaError as exc:
            raise MissingDependencyError(f"no usable NVIDIA GPU: {exc}") from None

    def device_properties(self, device: int | None = None) -> DeviceProperties:
        props = self._call("cudaGetDeviceProperties", self.device if device is None else device)
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
        return DeviceProperties(
            name=str(name).strip(),
            compute_capability=(int(props.major), int(props.minor)),
            total_memory=int(getattr(props, "totalGlobalMem", 0)) or None,
            multiprocessors=int(getattr(props, "multiProcessorCount", 0)) or None,
        )

    def versions(self) -> tuple[int | None, int | None]:
        return int(self._call("cudaRuntimeGetVersion")), int(self._call("cudaDriverGetVersion"))

    def malloc(self, nbytes: int) -> DeviceBuffer:
        return DeviceBuffer(int(self._call("cudaMalloc", nbytes)), nbytes)

    def free(self, buffer: DeviceBuffer) -> None:
        if buffer.ptr:
            self._call("cudaFree", buffer.ptr)
            buffer.ptr = 0

    def malloc_host(self, nbytes: int) -> HostBuffer:
        ptr = int(self._call("cudaMallocHost", nbytes))
        return HostBuffer(ptr, nbytes, _host_array(ptr, nbytes))

    def free_host(self, buffer: HostBuffer) -> None:
        if buffer.ptr:
            self._call("cudaFreeHost", buffer.ptr)
            buffer.ptr = 0
            buffer.array = np.zeros(0, dtype=np.uint8)

    def copy_htod(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, kind, stream)

    def copy_dtoh(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, kind, stream)

    def stream_create(self) -> Any:
        # A non-blocking stream: no implicit synchronisation with the legacy default stream,
        # which TensorRT asks for ("use non-default stream") in execute_async_v3's docs.
        return self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", stream)

    def event_create(self) -> Any:
        return self._call("cudaEventCreate")

    def event_record(self, event: Any, stream: Any) -> None:
        self._call("cudaEventRecord", event, stream)

    def event_synchronize(self, event: Any) -> None:
        self._call("cudaEventSynchronize", event)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._call("cudaEventElapsedTime", start, end))

    def event_destroy(self, event: Any) -> None:
        self._call("cudaEventDestroy", event)

    def graph_begin_capture(self, stream: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", stream, mode)

    def graph_end_capture(self, stream: Any) -> Any:
        graph = self._call("cudaStreamEndCapture", stream)
        try:
            return self._call("cudaGraphInstantiate", graph, 0)
        finally:
            self._call("cudaGraphDestroy", graph)

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        self._call("cudaGraphLaunch", graph_exec, stream)

    def graph_destroy(self, graph_exec: Any) -> None:
        self._call("cudaGraphExecDestroy", graph_exec)


# ------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------
class TorchBackend(CudaBackend):
    """Buffers are torch uint8 tensors (device / pinned host); streams and events are torch's."""

    name = "torch"

    def __init__(self, device: int = 0, torch_module: Any = None) -> None:
        if torch_module is None:
            try:
                torch_module = importlib.import_module("torch")
            except ImportError:
                raise BindingNotInstalled(f"torch is not installed: {_INSTALL['torch']}") from None
        self.torch = torch_module
        if not self.torch.cuda.is_available():
            raise MissingDependencyError("no NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")
        count = self.device_count()
        if count <= device:
            raise MissingDependencyError(f"no NVIDIA GPU {device} visible to torch ({count} device(s))")
        self.device = self.torch.device("cuda", device)

    def _guard(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            raise CudaError(f"torch CUDA call {name} failed: {one_line(exc)}") from None

    def device_count(self) -> int:
        return int(self.torch.cuda.device_count())

    def device_properties(self, device: int | None = None) -> DeviceProperties:
        props = self.torch.cuda.get_device_properties(self.device.index if device is None else device)
        return DeviceProperties(str(props.name), (int(props.major), int(props.minor)), int(props.total_memory),
                                int(getattr(props, "multi_processor_count", 0)) or None)

    def versions(self) -> tuple[int | None, int | None]:
        runtime = None
        cuda = getattr(self.torch.version, "cuda", None)
        if cuda:
            major, _, rest = cuda.partition(".")
            runtime = int(major) * 1000 + int((rest.split(".")[0] or 0)) * 10
        driver = None
        get_driver = getattr(self.torch._C, "_cuda_getDriverVersion", None)
        if get_driver is not None:
            try:
                driver = int(get_driver())
            except Exception:
                driver = None
        return runtime, driver

    def malloc(self, nbytes: int) -> DeviceBuffer:
        tensor = self._guard("empty(device)", self.torch.empty, max(nbytes, 1), dtype=self.torch.uint8, device=self.device)
        return DeviceBuffer(int(tensor.data_ptr()), nbytes, tensor)

    def free(self, buffer: DeviceBuffer) -> None:
        buffer.handle = None  # the caching allocator takes it back
        buffer.ptr = 0

    def malloc_host(self, nbytes: int) -> HostBuffer:
        tensor = self._guard("empty(pin_memory=True)", self.torch.empty, max(nbytes, 1), dtype=self.torch.uint8,
                             pin_memory=True)
        return HostBuffer(int(tensor.data_ptr()), nbytes, tensor.numpy()[:nbytes], tensor)

    def free_host(self, buffer: HostBuffer) -> None:
        buffer.handle = None
        buffer.ptr = 0
        buffer.array = np.zeros(0, dtype=np.uint8)

    def copy_htod(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self._guard("copy_(host->device)", dst.handle[:nbytes].copy_, src.handle[:nbytes], non_blocking=True)

    def copy_dtoh(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self._guard("copy_(device->host)", dst.handle[:nbytes].copy_, src.handle[:nbytes], non_blocking=True)

    def stream_create(self) -> Any:
        return self._guard("Stream", self.torch.cuda.Stream, device=self.device)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def stream_synchronize(self, stream: Any) -> None:
        self._guard("Stream.synchronize", stream.synchronize)

    def stream_destroy(self, stream: Any) -> None:
        pass  # torch destroys a stream with its last reference

    def event_create(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True)

    def event_record(self, event: Any, stream: Any) -> None:
        self._guard("Event.record", event.record, stream)

    def event_synchronize(self, event: Any) -> None:
        self._guard("Event.synchronize", event.synchronize)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._guard("Event.elapsed_time", start.elapsed_time, end))

    def event_destroy(self, event: Any) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# pycuda
# ------------------------------------------------------------------------------------------------
class PycudaBackend(CudaBackend):
    """pycuda in the device's primary context (shared with the CUDA runtime and TensorRT)."""

    name = "pycuda"

    def __init__(self, device: int = 0, driver: Any = None) -> None:
        if driver is None:
            try:
                driver = importlib.import_module("pycuda.driver")
            except ImportError:
                raise BindingNotInstalled(f"pycuda is not installed: {_INSTALL['pycuda']}") from None
        self.cuda = driver
        self._guard("init", self.cuda.init)
        count = self.device_count()
        if count <= device:
            raise MissingDependencyError(f"no NVIDIA GPU {device} visible to pycuda ({count} device(s))")
        self._device = self.cuda.Device(device)
        self._context = self._guard("retain_primary_context", self._device.retain_primary_context)
        self._guard("Context.push", self._context.push)
        self._pushed = True

    def _guard(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, MMExportError):
                raise
            raise CudaError(f"pycuda call {name} failed: {one_line(exc)}") from None

    def close(self) -> None:
        if self._pushed:
            self._pushed = False
            self._guard("Context.pop", self.cuda.Context.pop)

    def device_count(self) -> int:
        return int(self._guard("Device.count", self.cuda.Device.count))

    def device_properties(self, device: int | None = None) -> DeviceProperties:
        dev = self._device if device is None else self.cuda.Device(device)
        major, minor = dev.compute_capability()
        return DeviceProperties(str(dev.name()), (int(major), int(minor)), int(dev.total_memory()), None)

    def versions(self) -> tuple[int | None, int | None]:
        toolkit = self._guard("get_version", self.cuda.get_version)  # (major, minor, patch) pycuda was built with
        runtime = int(toolkit[0]) * 1000 + int(toolkit[1]) * 10 if toolkit else None
        return runtime, int(self._guard("get_driver_version", self.cuda.get_driver_version))

    def malloc(self, nbytes: int) -> DeviceBuffer:
        allocation = self._guard("mem_alloc", self.cuda.mem_alloc, max(nbytes, 1))
        return DeviceBuffer(int(allocation), nbytes, allocation)

    def free(self, buffer: DeviceBuffer) -> None:
        if buffer.handle is not None:
            self._guard("DeviceAllocation.free", buffer.handle.free)
            buffer.handle = None
            buffer.ptr = 0

    def malloc_host(self, nbytes: int) -> HostBuffer:
        array = self._guard("pagelocked_empty", self.cuda.pagelocked_empty, max(nbytes, 1), np.uint8)
        return HostBuffer(int(array.ctypes.data), nbytes, array[:nbytes], array)

    def free_host(self, buffer: HostBuffer) -> None:
        if buffer.handle is not None:
            base = getattr(buffer.handle, "base", None)
            if base is not None and hasattr(base, "free"):
                self._guard("HostAllocation.free", base.free)
            buffer.handle = None
            buffer.ptr = 0
            buffer.array = np.zeros(0, dtype=np.uint8)

    def copy_htod(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int, stream: Any) -> None:
        self._guard("memcpy_htod_async", self.cuda.memcpy_htod_async, dst.ptr, src.array[:nbytes], stream)

    def copy_dtoh(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int, stream: Any) -> None:
        self._guard("memcpy_dtoh_async", self.cuda.memcpy_dtoh_async, dst.array[:nbytes], src.ptr, stream)

    def stream_create(self) -> Any:
        return self._guard("Stream", self.cuda.Stream)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_synchronize(self, stream: Any) -> None:
        self._guard("Stream.synchronize", stream.synchronize)

    def stream_destroy(self, stream: Any) -> None:
        pass

    def event_create(self) -> Any:
        return self._guard("Event", self.cuda.Event)

    def event_record(self, event: Any, stream: Any) -> None:
        self._guard("Event.record", event.record, stream)

    def event_synchronize(self, event: Any) -> None:
        self._guard("Event.synchronize", event.synchronize)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._guard("Event.time_till", start.time_till, end))

    def event_destroy(self, event: Any) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------
_FACTORIES: dict[str, Callable[[int], CudaBackend]] = {
    "cuda-bindings": lambda device: CudaBindingsBackend(device),
    "torch": lambda device: TorchBackend(device),
    "pycuda": lambda device: PycudaBackend(device),
}


def get_cuda(backend: str = "auto", *, device: int = 0) -> CudaBackend:
    """A ready backend for ``device``: ``auto`` (cuda-bindings, then torch, then pycuda), or one by name.

    ``auto`` moves on when a binding is missing *or* cannot use the GPU (cuda-bindings
    13 needs a CUDA 13 driver; a CUDA 12 torch may still work there). Raises
    :class:`MissingDependencyError` with one line naming what to install, or why no GPU
    is usable.
    """
    key = backend.strip().lower()
    if key != "auto":
        name = _ALIASES.get(key)
        if name is None:
            raise MMExportError(f"unknown CUDA backend {backend!r}; use auto, {', '.join(BACKENDS)}")
        return _FACTORIES[name](device)
    missing: list[str] = []
    unusable: list[str] = []
    for name in BACKENDS:
        try:
            return _FACTORIES[name](device)
        except BindingNotInstalled as exc:
            missing.append(f"{name}: {exc}")
        except MissingDependencyError as exc:
            unusable.append(f"{name}: {exc}")
    if unusable:
        raise MissingDependencyError("no usable CUDA backend: " + "; ".join(unusable))
    raise MissingDependencyError(f"no CUDA Python binding is installed: {_INSTALL['cuda-bindings']}")


# ------------------------------------------------------------------------------------------------
# buffers
# ------------------------------------------------------------------------------------------------
@dataclass
class BufferPool:
    """Named device and page-locked host buffers, allocated once and grown only on demand.

    ``device(name, n)`` returns the buffer called ``name`` if it holds at least ``n``
    bytes; otherwise it frees it and allocates ``n`` bytes. ``generation`` counts
    reallocations, so a caller that baked addresses into something (tensor addresses
    of an execution context, a captured CUDA graph) knows when to redo it.
    """

    cuda: CudaBackend
    device_buffers: dict[str, DeviceBuffer] = field(default_factory=dict)
    host_buffers: dict[str, HostBuffer] = field(default_factory=dict)
    allocations: int = 0
    generation: int = 0

    def device(self, name: str, nbytes: int) -> DeviceBuffer:
        buffer = self.device_buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                del self.device_buffers[name]
                self.cuda.free(buffer)
            buffer = self.cuda.malloc(nbytes)
            self.device_buffers[name] = buffer
            self.allocations += 1
            self.generation += 1
        return buffer

    def host(self, name: str, nbytes: int) -> HostBuffer:
        buffer = self.host_buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                del self.host_buffers[name]
                self.cuda.free_host(buffer)
            buffer = self.cuda.malloc_host(nbytes)
            self.host_buffers[name] = buffer
            self.allocations += 1
            self.generation += 1
        return buffer

    def close(self) -> None:
        """Free everything; every buffer is attempted, the first failure is raised afterwards."""
        first: BaseException | None = None
        for name in list(self.device_buffers):
            buffer = self.device_buffers.pop(name)
            try:
                self.cuda.free(buffer)
            except Exception as exc:  # keep freeing the rest
                first = first or exc
        for name in list(self.host_buffers):
            buffer = self.host_buffers.pop(name)
            try:
                self.cuda.free_host(buffer)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


@dataclass
class EventTimer:
    """Four events around H2D, compute and D2H on one stream -> device milliseconds of each phase."""

    cuda: CudaBackend
    events: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        created: list[Any] = []
        try:
            for _ in range(4):
                created.append(self.cuda.event_create())
        except BaseException:
            for event in created:
                self.cuda.event_destroy(event)
            raise
        self.events = created

    def mark(self, index: int, stream: Any) -> None:
        self.cuda.event_record(self.events[index], stream)

    def timings(self) -> dict[str, float]:
        """Call after the stream is synchronised."""
        e = self.events
        return {
            "h2d": self.cuda.elapsed_ms(e[0], e[1]),
            "compute": self.cuda.elapsed_ms(e[1], e[2]),
            "d2h": self.cuda.elapsed_ms(e[2], e[3]),
        }

    def close(self) -> None:
        events, self.events = self.events, []
        for event in events:
            self.cuda.event_destroy(event)


__all__ = [
    "BACKENDS",
    "BindingNotInstalled",
    "BufferPool",
    "CudaBackend",
    "CudaBindingsBackend",
    "CudaError",
    "DeviceBuffer",
    "DeviceProperties",
    "EventTimer",
    "HostBuffer",
    "PycudaBackend",
    "TorchBackend",
    "get_cuda",
]
