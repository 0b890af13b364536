"""The runner contract every backend implements (after Polygraphy's ``backend/base/runner.py``).

A runner owns one loaded model between :meth:`BaseRunner.activate` and
:meth:`BaseRunner.deactivate` (or a ``with`` block). Loading is kept apart from
running: a runner is handed a *loader* (a zero-argument callable that returns the
session/engine), so the same runner serves a file, a bytes buffer or an object
built in memory, and the expensive part is done once, on activation.

The contract, stated once so ``verify``, ``bench`` and the predictor never probe
for optional methods:

* ``input_metadata()`` -- name -> :class:`TensorMetadata` (numpy dtype and shape,
  ``None`` for a dynamic dimension), available while active.
* ``infer(feed)`` -- ``feed`` maps input names to numpy arrays (a bare array is
  accepted for single-input models); inputs are checked against the metadata
  -- names, ranks, static dimensions, dtypes, and no empty input: a zero-size
  array is a :class:`~mmexport.errors.DataError` -- (``check_inputs=False`` skips that); returns a dict of float32 numpy outputs,
  in the model's output order.
* ``last_inference_time()`` -- host wall-clock seconds of the last ``infer``.
* ``last_inference_timings()`` -- device-side milliseconds of the last ``infer``
  split into ``h2d``, ``compute`` and ``d2h`` (``None`` where the runner does not
  time on the device). ``mmexport bench --device-timing`` requires it.
* ``last_enqueue_time()`` -- host milliseconds spent enqueueing the work (GPU
  runners; trtexec's "enqueue time"), else ``None``.
* ``max_batch`` -- the largest batch the loaded model takes beyond what its input
  shape says (a TensorRT optimisation profile's max), else ``None``; callers cap
  their batch size with it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmexport.errors import DataError, MMExportError


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output: numpy dtype and shape (``None`` marks a dynamic dimension)."""

    dtype: np.dtype
    shape: tuple[int | None, ...]

    def shape_text(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self.shape) + ")"


class BaseRunner:
    """Activate/deactivate with an is-active guard, checked inputs, and the time of the last inference.

    Subclasses implement ``activate_impl``, ``deactivate_impl``, ``input_metadata_impl``
    and ``infer_impl`` (which receives checked, contiguous arrays of the input dtypes).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False
        self._last_inference_time: float | None = None
        self._last_timings: dict[str, float] | None = None
        self._last_enqueue_ms: float | None = None
        self._input_metadata: dict[str, TensorMetadata] | None = None

    # -- lifetime ----------------------------------------------------------------------------
    def activate(self) -> "BaseRunner":
        if self.is_active:
            raise MMExportError(f"{self.name}: runner is already active; deactivate it before activating it again")
        self.activate_impl()
        self.is_active = True
        self._input_metadata = None
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False
            self._input_metadata = None

    def __enter__(self) -> "BaseRunner":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- what subclasses provide -------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def input_metadata_impl(self) -> dict[str, TensorMetadata]:
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- the contract ------------------------------------------------------------------------
    def _require_active(self) -> None:
        if not self.is_active:
            raise MMExportError(f"{self.name}: activate the runner first (use it inside a 'with' block)")

    @property
    def max_batch(self) -> int | None:
        """The largest batch the model takes, where the runner knows a limit the input shape does not show.

        ``None`` means no limit beyond the input metadata (a dynamic batch dimension, or
        a static one the caller reads from :meth:`input_metadata`). The base has no such
        limit; a runner whose engine fixes one (TensorRT's optimisation profile) overrides this.
        """
        return None

    def input_metadata(self) -> dict[str, TensorMetadata]:
        self._require_active()
        if self._input_metadata is None:
            self._input_metadata = self.input_metadata_impl()
        return self._input_metadata

    def _as_feed(self, feed: Mapping[str, Any] | np.ndarray) -> dict[str, Any]:
        if isinstance(feed, Mapping):
            return dict(feed)
        names = list(self.input_metadata())
        if len(names) != 1:
            raise DataError(f"{self.name}: the model has inputs {', '.join(names)}; pass a dict of arrays")
        return {names[0]: feed}

    def check_feed(self, feed: dict[str, Any]) -> dict[str, np.ndarray]:
        """Arrays of the right names, ranks, static dimensions and dtypes (cast where numeric)."""
        metadata = self.input_metadata()
        missing = [name for name in metadata if name not in feed]
        extra = [name for name in feed if name not in metadata]
        if missing or extra:
            raise DataError(
                f"{self.name}: inputs {sorted(feed)} do not match the model's {list(metadata)}"
                + (f" (missing {', '.join(missing)})" if missing else "")
            )
        checked: dict[str, np.ndarray] = {}
        for name, meta in metadata.items():
            array = np.asarray(feed[name])
            if array.ndim != len(meta.shape):
                raise DataError(
                    f"{self.name}: input {name} must have {len(meta.shape)} dimensions {meta.shape_text()}, got shape {array.shape}"
                )
            if array.size == 0:  # ONNX Runtime and TensorRT refuse it with errors of their own, or misbehave
                raise DataError(f"{self.name}: input {name} is empty (shape {array.shape}): nothing to run")
            for expected, actual in zip(meta.shape, array.shape):
                if expected is not None and expected != actual:
                    raise DataError(f"{self.name}: input {name} has shape {array.shape}, the model takes {meta.shape_text()}")
            if array.dtype.kind not in "fiub":
                raise DataError(f"{self.name}: input {name} has dtype {array.dtype}, the model takes {meta.dtype}")
            checked[name] = np.ascontiguousarray(array, dtype=meta.dtype)
        return checked

    def infer(self, feed: Mapping[str, Any] | np.ndarray, *, check_inputs: bool = True) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name as a float32 numpy array."""
        self._require_active()
        named = self._as_feed(feed)
        arrays = self.check_feed(named) if check_inputs else {k: np.ascontiguousarray(v) for k, v in named.items()}
        self._last_timings = None
        self._last_enqueue_ms = None
        start = time.perf_counter()
        outputs = self.infer_impl(arrays)
        self._last_inference_time = time.perf_counter() - start
        return outputs

    def last_inference_time(self) -> float | None:
        """Host wall-clock seconds of the last :meth:`infer` (None before the first)."""
        return self._last_inference_time

    def last_inference_timings(self) -> dict[str, float] | None:
        """Device-side milliseconds (``h2d``, ``compute``, ``d2h``) of the last :meth:`infer`, where measured."""
        return self._last_timings

    def last_enqueue_time(self) -> float | None:
        """Host milliseconds the last :meth:`infer` spent enqueueing the network's work (GPU runners), else None."""
        return self._last_enqueue_ms
