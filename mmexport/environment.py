"""The software and machine a number was made on: recorded in every manifest and benchmark result."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

from mmexport import __version__

# What a torch-free installation (``pip install mmexport``) lacks and how to add it: the `torch` extra
# (PyTorch, torchvision, onnxscript for torch.onnx's exporter, onnxconverter-common for the fp16 recipe,
# matplotlib for the figures). Import names, as an ImportError reports them.
TORCH_EXTRA_INSTALL = "pip install 'mmexport[torch]'"
TORCH_EXTRA_MODULES = ("torch", "torchvision", "onnxscript", "onnxconverter_common")
PLOT_EXTRA_INSTALL = "pip install 'mmexport[plot]'"

_VERSIONED_PACKAGES = ("torch", "torchvision", "numpy", "safetensors", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def environment_info() -> dict[str, Any]:
    """Versions of everything that shapes the numbers (read from metadata, nothing imported)."""
    versions: dict[str, str | None] = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    torch = sys.modules.get("torch")  # imported by then in every command that writes a manifest
    build = {}
    if torch is not None:
        build = {"torch_build": torch.__version__, "cuda_runtime": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available()}
    return {
        "mmexport": __version__,
        "python": sys.version.split()[0],
        **build,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
    }
