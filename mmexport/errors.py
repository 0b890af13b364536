"""The errors mmexport raises on purpose.

Every error a user can cause (bad file, bad option, failed check) is an
``MMExportError``: the CLI prints its message as one line and exits 1. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import numbers
from typing import Any


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


# -- rendering what goes into a one-line message ------------------------------------------------------


def one_line(value: object) -> str:
    """``str(value)`` with every run of whitespace (newlines included) made one space; an exception with
    no text gives its type name."""
    text = " ".join(str(value).split())
    return text or (type(value).__name__ if isinstance(value, BaseException) else "")


def shown_value(value: Any, limit: int = 60) -> str:
    """A short, one-line, ASCII rendering of a value read from a file (which may be huge, deep or hostile)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) >= 10**18:
        return f"an integer of {int(value).bit_length()} bits"
    try:
        text = ascii(value)
    except (ValueError, RecursionError):  # an integer beyond Python's str() limit, or nesting beyond the stack
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
