"""Runners: one small interface, one file per backend (after Polygraphy's backend runners).

A runner is a context manager with ``infer(batch) -> logits`` over numpy arrays and
a ``name``. ``verify`` and ``bench`` take any runner, so a new backend is one new file.
"""

from mmexport.runners.base import Runner
from mmexport.runners.torch_runner import TorchRunner

__all__ = ["Runner", "TorchRunner"]
