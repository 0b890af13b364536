"""Runners: one small interface, one file per backend (after Polygraphy's backend runners).

A runner is a context manager with ``infer(batch) -> logits`` over numpy arrays and
a ``name``. ``verify`` and ``bench`` take any runner, so a new backend is one new file.
Backends with heavy optional imports (ONNX Runtime) load on first use.
"""

from typing import Any

from mmexport.runners.base import Runner
from mmexport.runners.torch_runner import TorchRunner

__all__ = ["Runner", "TorchRunner", "OnnxRuntimeRunner"]


def __getattr__(name: str) -> Any:
    if name == "OnnxRuntimeRunner":
        from mmexport.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner
    raise AttributeError(f"module 'mmexport.runners' has no attribute {name!r}")
