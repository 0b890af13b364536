"""ONNX Runtime backend: one ``InferenceSession`` per ``with`` block.

``onnxruntime`` is imported here, lazily, so ``import mmexport.runners`` and the
CLI's help work without it. The same class serves the CPU package
(``onnxruntime``) and the GPU one (``onnxruntime-gpu``, which provides the CUDA
and TensorRT execution providers under the same module name; the two packages
must never be installed together).

Whatever precision the graph computes in (fp32, fp16 with fp32 I/O, int8 QDQ),
``infer`` takes and returns float32: the batch is cast to the graph's input type
and the logits back to float32.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmexport.errors import CheckpointError, DataError, MissingDependencyError, MMExportError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# Shorthand -> the provider list handed to ONNX Runtime (first = the one asked for, the
# rest = fallbacks for nodes the first cannot run, as ONNX Runtime recommends).
PROVIDER_SHORTHANDS: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),
    "tensorrt": (TENSORRT, CUDA, CPU),
    "trt": (TENSORRT, CUDA, CPU),
}
_GPU_HINT = (
    "pip install 'mmexport[gpu]' (it brings onnxruntime-gpu; uninstall onnxruntime first: "
    "the two packages must not be installed together)"
)
GRAPH_OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disable")

# numpy dtypes of the ONNX tensor types a graph input may have.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime (or 'mmexport[gpu]' for GPUs)") from None
    return onnxruntime


def resolve_providers(providers: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Expand shorthands (``cpu``, ``cuda``, ``tensorrt``) and check the first choice is available.

    Raises :class:`MissingDependencyError` (one line, naming the extra to install) when a
    requested provider is not in ``available``.
    """
    if providers is None:
        providers = "cpu"
    requested = [providers] if isinstance(providers, str) else list(providers)
    if not requested:
        raise MMExportError("no ONNX Runtime execution provider given; use cpu, cuda or tensorrt")
    expanded: list[str] = []
    for item in requested:
        key = str(item).strip()
        names = PROVIDER_SHORTHANDS.get(key.lower(), (key,))
        for name in names:
            if name not in expanded:
                expanded.append(name)
    # Every provider named explicitly must exist; implied fallbacks (CPU, CUDA under TensorRT)
    # only need to exist if they are all that is left.
    explicit = [PROVIDER_SHORTHANDS.get(str(p).strip().lower(), (str(p).strip(),))[0] for p in requested]
    for name in explicit:
        if name not in available:
            have = ", ".join(available) or "none"
            if name in (CUDA, TENSORRT):
                raise MissingDependencyError(
                    f"ONNX Runtime execution provider {name} is not available (this onnxruntime has {have}): {_GPU_HINT}"
                )
            raise MissingDependencyError(f"ONNX Runtime execution provider {name} is not available (this onnxruntime has {have})")
    return [name for name in expanded if name in available]


class OnnxRuntimeRunner:
    """Runs an ONNX file in ONNX Runtime; the session lives between ``__enter__`` and ``__exit__``.

    ``threads`` is ONNX Runtime's intra-op thread count (None: its default, one per
    physical core); ``inter_op_threads`` matters only with ``sequential=False``.
    ``graph_optimization_level`` is one of ``all`` (default), ``extended``, ``basic``,
    ``disable``. After ``__enter__``: ``session``, ``input_name``, ``input_shape``
    (dynamic dimensions are ``None``), ``input_dtype``, ``output_names``,
    ``providers`` (as the session reports them) and ``load_seconds``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        sequential: bool = True,
    ) -> None:
        self.path = Path(path)
        self.name = name or f"onnxruntime ({self.path.name})"
        if graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise MMExportError(
                f"unknown graph optimisation level {graph_optimization_level!r}; "
                f"choose one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}"
            )
        for label, value in (("threads", threads), ("inter-op threads", inter_op_threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MMExportError(f"{label} must be a positive integer, got {value!r}")
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization_level = graph_optimization_level
        self.sequential = sequential
        ort = _import_onnxruntime()
        self.requested_providers = resolve_providers(providers, ort.get_available_providers())
        self.session: Any = None
        self.input_name: str = ""
        self.input_shape: tuple[int | None, ...] = ()
        self.input_dtype: np.dtype = np.dtype(np.float32)
        self.output_names: list[str] = []
        self.providers: list[str] = []
        self.load_seconds: float = float("nan")

    # -- session lifetime -------------------------------------------------------------------
    def _session_options(self, ort):
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.graph_optimization_level]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if self.sequential else ort.ExecutionMode.ORT_PARALLEL
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = self.inter_op_threads
        # ONNX Runtime's own warnings would break the CLI's output; a silent fall-back to the
        # CPU is detected below instead.
        options.log_severity_level = 3
        return options

    def __enter__(self) -> "OnnxRuntimeRunner":
        ort = _import_onnxruntime()
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        options = self._session_options(ort)
        start = time.perf_counter()
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.requested_providers)
        except Exception as exc:  # onnxruntime raises its own (pybind) exception types
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load this model ({detail})") from None
        self.load_seconds = time.perf_counter() - start
        active = session.get_providers()
        first = self.requested_providers[0]
        if first not in active:  # e.g. onnxruntime-gpu without the CUDA/cuDNN libraries it needs
            raise MissingDependencyError(
                f"ONNX Runtime could not start {first} (running on {', '.join(active)}); "
                "check the CUDA/cuDNN/TensorRT libraries that onnxruntime-gpu needs"
            )
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise CheckpointError(f"{self.path}: expected one image input, the model has {len(inputs)}")
        graph_input = inputs[0]
        if graph_input.type not in _ORT_TYPES:
            raise CheckpointError(f"{self.path}: unsupported input type {graph_input.type}")
        self.session = session
        self.providers = list(active)
        self.input_name = graph_input.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape)
        self.input_dtype = np.dtype(_ORT_TYPES[graph_input.type])
        self.output_names = [o.name for o in session.get_outputs()]
        return self

    def __exit__(self, *exc: object) -> None:
        self.session = None
        return None

    # -- inference --------------------------------------------------------------------------
    def _check_batch(self, batch: np.ndarray) -> None:
        if batch.ndim != len(self.input_shape):
            raise DataError(
                f"{self.name}: input must have {len(self.input_shape)} dimensions {self._shape_text()}, got shape {batch.shape}"
            )
        for axis, (expected, actual) in enumerate(zip(self.input_shape, batch.shape)):
            if expected is not None and expected != actual:
                raise DataError(f"{self.name}: input shape {batch.shape} does not fit the model's {self._shape_text()}")

    def _shape_text(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self.input_shape) + ")"

    def infer(self, batch: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """float32 logits for a float32 NCHW batch (a dict if the graph has several outputs)."""
        if self.session is None:
            raise MMExportError(f"{self.name}: use the runner inside a 'with' block")
        array = np.asarray(batch)
        self._check_batch(array)
        feed = {self.input_name: np.ascontiguousarray(array, dtype=self.input_dtype)}
        outputs = self.session.run(None, feed)
        results = [np.asarray(o, dtype=np.float32) for o in outputs]
        if len(results) == 1:
            return results[0]
        return dict(zip(self.output_names, results))

    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` as ONNX Runtime reads them."""
        if self.session is None:
            raise MMExportError(f"{self.name}: use the runner inside a 'with' block")
        return dict(self.session.get_modelmeta().custom_metadata_map)
