"""``load(path) -> Predictor``: a deployed artifact plus the preprocessing recorded in it.

The predictor takes decoded images (uint8 HWC arrays, PIL images), encoded ones
(paths, bytes -- PNG/JPEG/..., or DICOM recognised by its content, and ``pydicom.Dataset``
objects, through the block's DICOM pipeline, :mod:`mmexport.runtime.dicom`) or an
already-normalised float32 NCHW batch, applies exactly the
preprocessing block the file records (:mod:`mmexport.runtime.preprocess`), runs
batches within the model's batch limits, and returns logits, probabilities and
labels. Batched and one-image calls give the same numbers: every image is
preprocessed on its own and the network has no cross-sample state in inference.
A malformed input -- an empty batch, non-finite values, an image over the pixel budget
(:func:`mmexport.runtime.preprocess.check_pixel_budget`), undecodable bytes -- is one
:class:`~mmexport.errors.DataError` line, never another exception.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmexport.errors import CheckpointError, DataError, MMExportError
from mmexport.runtime.engine import check_engine
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import preprocess_image
from mmexport.runtime.runners.base import BaseRunner
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner
from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner

DEFAULT_BATCH = 32  # images per inference call when the model's batch dimension is unbounded
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine")


@dataclass
class Prediction:
    """Logits, softmax probabilities and predicted labels of a batch (row i = input i)."""
    logits: np.ndarray
    probabilities: np.ndarray
    indices: np.ndarray
    labels: list[str]
    classes: tuple[str, ...]

    def top(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per input, the ``k`` most probable classes as (label, probability)."""
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(self.probabilities[i, j])) for j in row] for i, row in enumerate(order)]

    def __len__(self) -> int:
        return len(self.indices)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class Predictor:
    """A runner (activated on construction) plus the :class:`ModelInfo` of the file it runs."""
    def __init__(self, runner: BaseRunner, info: ModelInfo, *, path: str = "", batch_size: int | None = None) -> None:
        self.runner = runner
        self.info = info
        self.path = path
        if not runner.is_active:
            runner.activate()
        metadata = runner.input_metadata()
        if len(metadata) != 1:
            raise CheckpointError(f"{path}: expected one image input, the model has {len(metadata)}")
        self.input_name, meta = next(iter(metadata.items()))
        size = info.image_size
        expected = (3, size, size)
        if len(meta.shape) != 4 or any(d is not None and d != e for d, e in zip(meta.shape[1:], expected)):
            raise CheckpointError(f"{path}: the model takes {meta.shape_text()}, its metadata says N x 3 x {size} x {size}")
        limit = runner.max_batch or meta.shape[0]
        self.max_batch = int(limit) if limit else None
        chosen = batch_size or self.max_batch or DEFAULT_BATCH
        if self.max_batch is not None:
            chosen = min(chosen, self.max_batch)
        if chosen < 1:
            raise MMExportError(f"batch size must be positive, got {chosen}")
        self.batch_size = chosen

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inputs --------------------------------------------------------------------------------
    def preprocess(self, images: Any) -> np.ndarray:
        """Any accepted input -> the float32 N x 3 x S x S batch the network takes."""
        size = self.info.image_size
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            batch = images[None] if images.ndim == 3 else images
            if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
                raise DataError(
                    f"a float array is taken as an already-normalised batch N x 3 x {size} x {size}, got shape {images.shape}"
                )
            if len(batch) == 0:
                raise DataError(f"no images given (an empty batch of shape {images.shape})")
            if not np.isfinite(batch).all():
                raise DataError("the input batch contains NaN or Inf values")
            return np.ascontiguousarray(batch, dtype=np.float32)
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
            items: Sequence[Any] = list(images)
        elif isinstance(images, (list, tuple)):
            items = images
        else:
            items = [images]
        if not items:
            raise DataError("no images given")
        return np.stack([preprocess_image(item, self.info.preprocessing) for item in items])

    # -- inference -----------------------------------------------------------------------------
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits of an already-normalised batch, run in chunks of at most ``batch_size``.

        An empty batch is refused (:class:`DataError`), as every entry point here refuses it: a
        zero-size input is not a request for nothing but a malformed one (ONNX Runtime and TensorRT
        reject it with errors of their own).
        """
        batch = np.asarray(batch)
        if batch.ndim == 0 or len(batch) == 0:
            raise DataError(f"no images given (an empty batch of shape {batch.shape})")
        chunks = []
        for start in range(0, len(batch), self.batch_size):
            outputs = self.runner.infer({self.input_name: batch[start : start + self.batch_size]})
            chunks.append(next(iter(outputs.values())))
        return np.concatenate(chunks)

    def predict(self, images: Any) -> Prediction:
        logits = self.logits(self.preprocess(images))
        if logits.ndim != 2 or logits.shape[1] != self.info.num_classes:
            raise CheckpointError(f"{self.path}: the model gives {logits.shape}, its metadata names {self.info.num_classes} classes")
        probabilities = softmax(logits)
        indices = logits.argmax(axis=1)
        return Prediction(logits, probabilities, indices, [self.info.classes[i] for i in indices], self.info.classes)

    __call__ = predict


def _refuse_unverified(metadata: dict[str, str], path: Path, allowed: bool) -> None:
    reason = metadata.get("mmexport_unverified")
    if reason and not allowed:
        raise CheckpointError(f"{path}: published without passing its verification ({reason.split(';')[0]}); "
                              "load it with allow_unverified=True only if you accept that")


def load(
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    providers: str | Sequence[str] | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
    allow_unverified: bool = False,
) -> Predictor:
    """Open a deployable artifact: an ONNX file (ONNX Runtime) or a TensorRT engine with its sidecar.

    ``device`` picks the execution: ``cpu`` (ONNX Runtime's CPU provider) or
    ``cuda``/``cuda:N`` (ONNX Runtime's CUDA provider for ONNX files; TensorRT for
    engines). ``providers`` overrides ONNX Runtime's provider list (``cpu``, ``cuda``,
    ``tensorrt`` or full provider names). A file that was published without passing its
    verification (``fold --allow-unverified``) is refused unless ``allow_unverified``.
    """
    target = Path(path).expanduser()
    if not target.is_file():
        raise CheckpointError(f"{target}: no such model file")
    suffix = target.suffix.lower()
    if suffix in ONNX_SUFFIXES:

        if providers is None:
            providers = "cuda" if device.startswith("cuda") else "cpu"
        runner = OnnxRuntimeRunner(target, providers=providers, threads=threads)
        runner.activate()
        try:
            metadata = runner.metadata()
            _refuse_unverified(metadata, target, allow_unverified)
            info = ModelInfo.from_metadata(metadata, str(target))
            return Predictor(runner, info, path=str(target), batch_size=batch_size)
        except BaseException:
            runner.deactivate()
            raise
    if suffix in ENGINE_SUFFIXES:

        sidecar = check_engine(target)
        _refuse_unverified(sidecar.model_metadata, target, allow_unverified)
        info = ModelInfo.from_metadata(sidecar.model_metadata, str(target))
        runner = TensorRTRunner(EngineFromPath(target), name=f"tensorrt ({target.name})")
        runner.activate()
        try:
            return Predictor(runner, info, path=str(target), batch_size=batch_size)
        except BaseException:
            runner.deactivate()
            raise
    raise CheckpointError(f"{target}: not a deployable model (expected .onnx, or a TensorRT .plan/.engine with its sidecar)")


__all__ = ["DEFAULT_BATCH", "Prediction", "Predictor", "load", "softmax"]
