"""TensorRT backend: an engine loader and a runner, kept apart as in Polygraphy's ``backend/trt``.

:class:`EngineFromPath` checks the engine's sidecar, hash and the machine
(:func:`mmexport.runtime.engine.check_engine`) *before* deserialising, then
deserialises with ``trt.Runtime`` and turns a ``None`` engine into one clear error.
:class:`TensorRTRunner` runs it: I/O tensors discovered by name, mode, dtype, shape
and optimisation-profile range; input shapes set per batch and checked against the
profile; device and page-locked host buffers allocated once and grown only for a
larger batch; a non-default stream; ``execute_async_v3``; device-side H2D / compute /
D2H milliseconds from CUDA events in :meth:`last_inference_timings`; optional
CUDA-graph capture and replay of the engine launch; everything released through one
``contextlib.ExitStack`` on deactivation.

TensorRT is supported in majors 10 (>= 10.12) and 11; the few API differences are
dispatched here on the major version (``device_memory_size_v2`` vs
``device_memory_size``) and in :mod:`mmexport.convert.tensorrt` (network creation
flags, removed builder flags). Nothing here imports TensorRT, the CUDA bindings or
torch at module import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmexport.errors import CheckpointError, DataError, MMExportError
from mmexport.runtime.cuda import BufferPool, EventTimer, get_cuda
from mmexport.runtime.engine import check_engine, check_tensorrt_supported, import_tensorrt, rebuild_command
from mmexport.runtime.runners.base import BaseRunner, TensorMetadata

log = logging.getLogger(__name__)


def create(trt_class: Any, logger: Any, what: str) -> Any:
    """``trt.Builder(logger)`` / ``trt.Runtime(logger)``: a failed creation (pybind raises TypeError on a
    null factory result, older bindings return None) becomes one line with TensorRT's own error."""
    try:
        created = trt_class(logger)
    except TypeError:
        created = None
    if created is None:
        raise MMExportError(f"TensorRT could not create a {what} ({logger.last_error()}); is the NVIDIA GPU and driver usable?")
    return created


def make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that keeps TensorRT's errors (for one-line messages) and warnings, and logs both."""
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, level: Any, msg: str) -> None:
            try:  # called from inside TensorRT: must never raise
                text = " ".join(str(msg).split())
                if level in (severity.INTERNAL_ERROR, severity.ERROR):
                    self.errors.append(text)
                    log.error("TensorRT: %s", text)
                elif level == severity.WARNING:
                    if len(self.warnings) < 100:
                        self.warnings.append(text)
                    log.warning("TensorRT: %s", text)
                else:
                    log.debug("TensorRT: %s", text)
            except Exception:  # pragma: no cover
                pass

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no error message from TensorRT"

    return _Logger()


@dataclass
class LoadedEngine:
    """A deserialised engine with what must outlive it (the runtime, the logger)."""
    engine: Any
    runtime: Any
    logger: Any
    tensorrt_major: int
    sidecar: Any = None  # EngineSidecar, when loaded from a file with one
    path: Path | None = None


class EngineFromPath:
    """Loader: check (sidecar, sha256, TensorRT version, GPU), then deserialise an engine file."""
    def __init__(self, path: str | os.PathLike[str], *, check: bool = True, environment: Any = None) -> None:
        self.path = Path(path)
        self.check = check
        self.environment = environment

    def __call__(self) -> LoadedEngine:

        trt = import_tensorrt()
        major = check_tensorrt_supported(trt.__version__)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: engine not found")
        data = self.path.read_bytes()
        sidecar = check_engine(self.path, environment=self.environment, data=data) if self.check else None
        logger = make_logger(trt)
        runtime = create(trt.Runtime, logger, "runtime")
        if sidecar is not None and sidecar.build_flags.version_compatible:
            # Version-compatible plans carry a lean runtime (host code); TensorRT only runs it when allowed.
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            precision = sidecar.precision if sidecar is not None else "fp32"
            raise CheckpointError(
                f"{self.path}: TensorRT {trt.__version__} could not deserialize the engine ({logger.last_error()}); "
                f"rebuild it: {rebuild_command(self.path, precision)}"
            )
        return LoadedEngine(engine, runtime, logger, major, sidecar, self.path)


def device_memory_size(engine: Any, tensorrt_major: int) -> int:
    """Scratch memory the engine needs: ``device_memory_size_v2`` (10.1+, the only one in 11)."""
    if tensorrt_major >= 11 or hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


@dataclass(frozen=True)
class IOTensor:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 for dynamic dimensions
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None  # (min, opt, max), inputs only


def discover_io(engine: Any, trt: Any, profile_index: int = 0) -> list[IOTensor]:
    """Every I/O tensor by name, mode, numpy dtype, shape and (inputs) profile shapes, in engine order."""
    tensors: list[IOTensor] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        trt_dtype = engine.get_tensor_dtype(name)
        try:
            dtype = np.dtype(trt.nptype(trt_dtype))
        except TypeError:
            raise MMExportError(f"tensor {name} has TensorRT type {trt_dtype}, which numpy cannot hold") from None
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        profile = None
        if is_input:
            low, opt, high = engine.get_tensor_profile_shape(name, profile_index)
            profile = (tuple(int(d) for d in low), tuple(int(d) for d in opt), tuple(int(d) for d in high))
        tensors.append(IOTensor(name, is_input, dtype, shape, profile))
    return tensors


def check_against_profile(tensor: IOTensor, shape: tuple[int, ...]) -> None:
    """One-line DataError when a shape lies outside the tensor's optimisation profile."""
    if len(shape) != len(tensor.shape):
        raise DataError(f"input {tensor.name} must have {len(tensor.shape)} dimensions, got shape {shape}")
    if tensor.profile is None:
        return
    low, _, high = tensor.profile
    for axis, (size, lo, hi) in enumerate(zip(shape, low, high)):
        if not lo <= size <= hi:
            if axis == 0:
                raise DataError(
                    f"input {tensor.name}: batch {size} is outside the engine's profile {lo}..{hi}; "
                    f"split the batch or rebuild the engine with a larger --max-batch"
                )
            raise DataError(f"input {tensor.name}: dimension {axis} is {size}, the engine's profile allows {lo}..{hi}")


@dataclass
class _GraphState:
    key: tuple | None = None
    exec: Any = None


class TensorRTRunner(BaseRunner):
    """Runs a TensorRT engine on one GPU; float32 in, float32 out, whatever the engine computes in.

    ``engine`` is a loader (:class:`EngineFromPath`, or any zero-argument callable returning a
    :class:`LoadedEngine`) or a path. ``cuda`` picks the CUDA layer: a backend name for
    :func:`mmexport.runtime.cuda.get_cuda` (``auto``, ``cuda-bindings``, ``torch``, ``pycuda``)
    or a :class:`~mmexport.runtime.cuda.CudaBackend` the caller owns (and closes).
    ``cuda_graphs=True`` captures the engine launch into a CUDA graph per input shape and
    replays it (cuda-bindings backend); :attr:`cuda_graphs_active` says whether the last
    inference replayed a graph. Device timings of every inference are in
    :meth:`last_inference_timings` (``h2d``, ``compute``, ``d2h`` in ms).
    """

    def __init__(
        self,
        engine: Callable[[], LoadedEngine] | str | os.PathLike[str],
        *,
        name: str | None = None,
        cuda: Any = "auto",
        cuda_graphs: bool = False,
        device: int = 0,
    ) -> None:
        loader = engine if callable(engine) else EngineFromPath(engine)
        super().__init__(name or "tensorrt")
        self._loader = loader
        self.cuda_backend_name = cuda
        self.cuda_graphs = bool(cuda_graphs)
        self.cuda_graphs_active = False
        self.device = device
        self._stack: contextlib.ExitStack | None = None
        self._loaded: LoadedEngine | None = None
        self._context: Any = None
        self._cuda: Any = None
        self._stream: Any = None
        self._buffers: Any = None
        self._timer: Any = None
        self._io: list[IOTensor] = []
        self._graph = _GraphState()
        self._bound: tuple | None = None
        self.sidecar: Any = None

    # -- lifetime ----------------------------------------------------------------------------------
    def activate_impl(self) -> None:

        stack = contextlib.ExitStack()
        try:
            if isinstance(self.cuda_backend_name, str):
                cuda = get_cuda(self.cuda_backend_name, device=self.device)
                stack.callback(cuda.close)
            else:
                cuda = self.cuda_backend_name
            if self.cuda_graphs and not cuda.supports_graphs:
                raise MMExportError(f"{self.name}: CUDA graphs need the cuda-bindings backend, not {cuda.name}")
            loaded = self._loader()
            stack.callback(self._drop_engine)
            self._loaded = loaded
            trt = import_tensorrt()
            context = loaded.engine.create_execution_context()
            if context is None:
                raise MMExportError(
                    f"{self.name}: TensorRT could not create an execution context ({loaded.logger.last_error()}); "
                    f"the engine needs {device_memory_size(loaded.engine, loaded.tensorrt_major)} bytes of GPU memory"
                )
            self._context = context
            stream = cuda.stream_create()
            stack.callback(cuda.stream_destroy, stream)
            timer = EventTimer(cuda)
            stack.callback(timer.close)
            buffers = BufferPool(cuda)
            stack.callback(buffers.close)
            stack.callback(self._destroy_graph)
            stack.callback(cuda.stream_synchronize, stream)  # runs first: nothing may be in flight when freeing
            self._io = discover_io(loaded.engine, trt)
            if loaded.engine.num_optimization_profiles > 1:
                if not context.set_optimization_profile_async(0, cuda.stream_handle(stream)):
                    raise MMExportError(f"{self.name}: could not select optimisation profile 0")
        except BaseException:
            stack.close()
            raise
        self._stack, self._cuda, self._stream, self._timer, self._buffers = stack, cuda, stream, timer, buffers
        self.sidecar = loaded.sidecar
        self._bound = None
        self.cuda_graphs_active = False

    def deactivate_impl(self) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                stack.close()
        finally:
            self._cuda = self._stream = self._timer = self._buffers = None
            self._io = []
            self._bound = None
            self.cuda_graphs_active = False

    def _drop_engine(self) -> None:
        # Order matters: the execution context before the engine, the engine before the runtime.
        self._context = None
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            loaded.engine = None
            loaded.runtime = None

    def _destroy_graph(self) -> None:
        graph, self._graph = self._graph, _GraphState()
        if graph.exec is not None and self._cuda is not None:
            self._cuda.graph_destroy(graph.exec)

    # -- metadata ------------------------------------------------------------------------------------
    def input_metadata_impl(self) -> dict[str, TensorMetadata]:
        return {
            t.name: TensorMetadata(t.dtype, tuple(None if d < 0 else d for d in t.shape)) for t in self._io if t.is_input
        }

    def output_metadata(self) -> dict[str, TensorMetadata]:
        self._require_active()
        return {
            t.name: TensorMetadata(t.dtype, tuple(None if d < 0 else d for d in t.shape)) for t in self._io if not t.is_input
        }

    @property
    def max_batch(self) -> int | None:
        """The largest batch the engine's optimisation profile takes (None while inactive)."""
        if not self.is_active:
            return None
        return int(self.profile()[2][0])

    def profile(self, name: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of an input (the first input by default)."""
        self._require_active()
        for tensor in self._io:
            if tensor.is_input and (name is None or tensor.name == name):
                assert tensor.profile is not None
                return tensor.profile
        raise MMExportError(f"{self.name}: no input {name!r}")

    # -- inference ------------------------------------------------------------------------------------
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, stream, context, buffers = self._cuda, self._stream, self._context, self._buffers
        handle = cuda.stream_handle(stream)
        for tensor in self._io:
            if tensor.is_input:
                shape = tuple(int(d) for d in feed[tensor.name].shape)
                check_against_profile(tensor, shape)
                if not context.set_input_shape(tensor.name, shape):
                    raise DataError(f"{self.name}: TensorRT refused shape {shape} for input {tensor.name}")
        unresolved = context.infer_shapes()
        if unresolved:
            raise DataError(f"{self.name}: the shapes of {', '.join(unresolved)} are not specified")
        shapes = {t.name: tuple(int(d) for d in context.get_tensor_shape(t.name)) for t in self._io}
        device, host = {}, {}
        for tensor in self._io:
            nbytes = int(np.prod(shapes[tensor.name], dtype=np.int64)) * tensor.dtype.itemsize
            device[tensor.name] = buffers.device(tensor.name, nbytes)
            host[tensor.name] = buffers.host(tensor.name, nbytes)
        bound = (buffers.generation,)
        if bound != self._bound:
            for tensor in self._io:
                if not context.set_tensor_address(tensor.name, device[tensor.name].ptr):
                    raise MMExportError(f"{self.name}: could not set the address of tensor {tensor.name}")
            self._bound = bound
        for tensor in self._io:
            if tensor.is_input:
                np.copyto(host[tensor.name].view(tensor.dtype, shapes[tensor.name]), feed[tensor.name], casting="unsafe")
        timer = self._timer
        timer.mark(0, stream)
        for tensor in self._io:
            if tensor.is_input:
                cuda.copy_htod(device[tensor.name], host[tensor.name], _nbytes(tensor, shapes), stream)
        timer.mark(1, stream)
        enqueue_start = time.perf_counter()
        self._launch(handle, shapes)
        self._last_enqueue_ms = (time.perf_counter() - enqueue_start) * 1e3
        timer.mark(2, stream)
        for tensor in self._io:
            if not tensor.is_input:
                cuda.copy_dtoh(host[tensor.name], device[tensor.name], _nbytes(tensor, shapes), stream)
        timer.mark(3, stream)
        cuda.stream_synchronize(stream)
        self._last_timings = timer.timings()
        return {
            t.name: np.array(host[t.name].view(t.dtype, shapes[t.name]), dtype=np.float32, copy=True)
            for t in self._io
            if not t.is_input
        }

    def _launch(self, handle: int, shapes: dict[str, tuple[int, ...]]) -> None:
        context, cuda, stream = self._context, self._cuda, self._stream
        if not self.cuda_graphs:
            if not context.execute_async_v3(handle):
                raise MMExportError(f"{self.name}: execute_async_v3 failed ({self._loaded.logger.last_error()})")
            return
        key = (tuple(sorted(shapes.items())), self._buffers.generation)
        if self._graph.key != key:
            self._destroy_graph()
            # One ordinary launch first: TensorRT defers some work after a shape change to the
            # next enqueue, which must not be captured (TensorRT developer guide, CUDA graphs).
            if not context.execute_async_v3(handle):
                raise MMExportError(f"{self.name}: execute_async_v3 failed ({self._loaded.logger.last_error()})")
            cuda.stream_synchronize(stream)
            cuda.graph_begin_capture(stream)
            try:
                ok = bool(context.execute_async_v3(handle))
            except BaseException:
                with contextlib.suppress(Exception):
                    cuda.graph_destroy(cuda.graph_end_capture(stream))
                raise
            try:
                graph_exec = cuda.graph_end_capture(stream)
            except MMExportError as exc:
                raise MMExportError(f"{self.name}: the engine cannot be captured into a CUDA graph ({exc}); "
                                    "run without CUDA graphs") from None
            if not ok:
                cuda.graph_destroy(graph_exec)
                raise MMExportError(f"{self.name}: the engine cannot be captured into a CUDA graph "
                                    f"({self._loaded.logger.last_error()}); run without CUDA graphs")
            self._graph = _GraphState(key, graph_exec)
        cuda.graph_launch(self._graph.exec, stream)
        self.cuda_graphs_active = True


def _nbytes(tensor: IOTensor, shapes: dict[str, tuple[int, ...]]) -> int:
    return int(np.prod(shapes[tensor.name], dtype=np.int64)) * tensor.dtype.itemsize


__all__ = [
    "EngineFromPath",
    "IOTensor",
    "LoadedEngine",
    "TensorRTRunner",
    "check_against_profile",
    "device_memory_size",
    "discover_io",
    "make_logger",
]
