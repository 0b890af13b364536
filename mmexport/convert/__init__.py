"""Export: the folded network to ONNX (fp32), precision transforms (fp16, int8 QDQ), verification.

Names are loaded on first use, so ``import mmexport.export`` costs nothing until an
export actually runs (torch.onnx and onnxruntime are heavy imports).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "DEFAULT_OPSET": "mmexport.export.onnx",
    "DualBackbone": "mmexport.export.onnx",
    "export_onnx": "mmexport.export.onnx",
    "export_unmerged_onnx": "mmexport.export.onnx",
    "export_dual_onnx": "mmexport.export.onnx",
    "read_onnx_metadata": "mmexport.export.onnxfile",
    "onnx_model_info": "mmexport.export.onnxfile",
    "verify_onnx_artifact": "mmexport.verification",
    "convert_fp16": "mmexport.export.precision",
    "quantize_int8": "mmexport.export.precision",
    "DEFAULT_CALIBRATION_IMAGES": "mmexport.export.precision",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'mmexport.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
