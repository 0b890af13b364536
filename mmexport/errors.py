"""The errors mmexport raises on purpose.

Every error a user can cause (bad file, bad option, failed check) is an
``MMExportError``: the CLI prints its message as one line and exits 1. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MMExportError(Exception):
    """Base class: a problem with the user's input or a failed check."""


class ArchitectureError(MMExportError):
    """Unknown architecture, or weights that do not fit the architecture."""


class CheckpointError(MMExportError):
    """A checkpoint that cannot be read safely or has bad contents."""


class DataError(MMExportError):
    """A dataset that is missing, empty or inconsistent."""


class RunDirError(MMExportError):
    """A run directory that is missing, not empty, or inconsistent with its manifest."""


class VerificationError(MMExportError):
    """An artifact failed its numerical check against the reference."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class MissingDependencyError(MMExportError):
    """An optional package (TensorRT, onnxruntime-gpu, ...) is needed but not installed."""
