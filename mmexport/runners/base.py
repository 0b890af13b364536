from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """What ``verify`` and ``bench`` need of a backend."""

    name: str

    def __enter__(self) -> "Runner": ...

    def __exit__(self, *exc: object) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one float32 NCHW batch; return float32 logits of shape (N, classes)."""
        ...
