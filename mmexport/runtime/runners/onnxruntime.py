"""ONNX Runtime backend: a session loader and a runner (kept apart, as in Polygraphy's ``backend/onnxrt``).

``onnxruntime`` is imported lazily, on first use, so ``import mmexport.runtime`` and
the CLI's help work without it. The same class serves the CPU package
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

from mmexport.config import check_int
from mmexport.errors import (
    CheckpointError,
    DataError,
    MissingDependencyError,
    MMExportError,
)
from mmexport.runtime.runners.base import BaseRunner, TensorMetadata

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
    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu "
    "(the two packages provide the same module and must not be installed together)"
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
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu on GPU hosts)") from None
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


class SessionFromOnnx:
    """Loader: a callable that builds an ``InferenceSession`` for an ONNX file (or serialized bytes).

    ``threads`` is ONNX Runtime's intra-op thread count (None: its default, one per
    physical core); ``inter_op_threads`` matters only with ``sequential=False``.
    ``graph_optimization_level`` is one of ``all`` (default), ``extended``, ``basic``,
    ``disable``. A requested execution provider that is missing is one error line
    naming what to install; a provider that fails to start (onnxruntime-gpu without
    its CUDA libraries) is an error, never a silent fall-back to the CPU.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        *,
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        sequential: bool = True,
    ) -> None:
        self.model = model if isinstance(model, bytes) else Path(model)
        if graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise MMExportError(
                f"unknown graph optimisation level {graph_optimization_level!r}; "
                f"choose one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}"
            )
        for label, value in (("threads", threads), ("inter-op threads", inter_op_threads)):
            if value is not None:
                check_int(value, label)
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization_level = graph_optimization_level
        self.sequential = sequential
        ort = _import_onnxruntime()
        self.providers = resolve_providers(providers, ort.get_available_providers())

    @property
    def label(self) -> str:
        return "ONNX bytes" if isinstance(self.model, bytes) else str(self.model)

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

    def __call__(self):
        ort = _import_onnxruntime()
        if isinstance(self.model, Path) and not self.model.is_file():
            raise CheckpointError(f"{self.model}: no such ONNX file")
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            session = ort.InferenceSession(source, sess_options=self._session_options(ort), providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own (pybind) exception types
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.label}: ONNX Runtime cannot load this model ({detail})") from None
        active = session.get_providers()
        if self.providers[0] not in active:  # e.g. onnxruntime-gpu without the CUDA/cuDNN libraries it needs
            raise MissingDependencyError(
                f"ONNX Runtime could not start {self.providers[0]} (running on {', '.join(active)}); "
                "check the CUDA/cuDNN/TensorRT libraries that onnxruntime-gpu needs"
            )
        return session


class OnnxRuntimeRunner(BaseRunner):
    """Runs an ONNX model in ONNX Runtime; the session lives while the runner is active.

    ``model`` is a :class:`SessionFromOnnx` loader, or a path (then the keyword
    arguments build the loader). Whatever precision the graph computes in (fp32, fp16
    with fp32 I/O, int8 QDQ), outputs come back as float32. After activation:
    ``session``, ``providers`` (as the session reports them), ``load_seconds``.
    """

    def __init__(self, model: SessionFromOnnx | str | os.PathLike[str], *, name: str | None = None, **loader_options) -> None:
        self.loader = model if isinstance(model, SessionFromOnnx) else SessionFromOnnx(model, **loader_options)
        super().__init__(name or f"onnxruntime ({Path(self.loader.label).name})")
        self.session: Any = None
        self.providers: list[str] = []
        self.load_seconds: float = float("nan")
        self.output_names: list[str] = []

    def activate_impl(self) -> None:
        start = time.perf_counter()
        session = self.loader()
        self.load_seconds = time.perf_counter() - start
        for graph_input in session.get_inputs():
            if graph_input.type not in _ORT_TYPES:
                raise CheckpointError(f"{self.loader.label}: unsupported input type {graph_input.type} of {graph_input.name}")
        self.session = session
        self.providers = list(session.get_providers())
        self.output_names = [o.name for o in session.get_outputs()]

    def deactivate_impl(self) -> None:
        self.session = None

    def input_metadata_impl(self) -> dict[str, TensorMetadata]:
        return {
            i.name: TensorMetadata(np.dtype(_ORT_TYPES[i.type]), tuple(d if isinstance(d, int) else None for d in i.shape))
            for i in self.session.get_inputs()
        }

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self.session.run(None, feed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own (pybind) types, multi-line messages
            kind = type(exc).__name__
            detail = " ".join(str(exc).split())[:300] or kind
            # InvalidArgument: the inputs (a caller that skipped check_inputs); anything else: the model or the runtime
            error = DataError if kind == "InvalidArgument" else MMExportError
            raise error(f"{self.name}: ONNX Runtime could not run this batch ({kind}: {detail})") from None
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.output_names, outputs)}

    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` as ONNX Runtime reads them."""
        self._require_active()
        return dict(self.session.get_modelmeta().custom_metadata_map)
