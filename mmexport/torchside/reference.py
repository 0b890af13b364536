"""Verification on the torch side: the stored reference set, and the fold check (unmerged vs folded).

The reference set (``reference.npz``) is computed here once, when a run's final
network is written: seeded random images and labelled held-out images, and the
torch fp32 outputs for both. Every artifact made later is judged against it by
the torch-free :func:`mmexport.runtime.check.check_runner`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmexport.artifacts import check_precision
from mmexport.convert.onnxfile import read_onnx_metadata
from mmexport.errors import DataError, MMExportError
from mmexport.runtime.compare import VerificationReport, random_images, run_batched, verify_runners
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import normalize
from mmexport.runtime.reference import HELD_OUT_BUDGET_BYTES, RANDOM_SET, ReferenceData, StoredSet, held_out_limit
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner
from mmexport.runtime.tolerances import FOLD, for_precision
from mmexport.torchside.data import TaskData
from mmexport.torchside.merge import MergedModel
from mmexport.torchside.torch_runner import TorchRunner

DEFAULT_RANDOM_SAMPLES = 64
# Held-out images kept in a new reference: all of the split, up to HELD_OUT_BUDGET_BYTES (256 MiB) of uint8
# pixels (held_out_limit: 1,783 at 224 px). fp16 and int8 are judged on them by a confidence bound that
# needs N: 268 perfect agreements to show a 99 % floor (mmexport.runtime.tolerances).
DEFAULT_DATA_BUDGET_BYTES = HELD_OUT_BUDGET_BYTES
BATCH = 16


def held_out_split(task: TaskData) -> str:
    """Labelled images not trained on: the test split when there is one, else val."""
    return "test" if "test" in task.splits else "val"


def make_reference(
    model: nn.Module, task: TaskData | None, info: ModelInfo, model_sha256: str, *, random_count: int = DEFAULT_RANDOM_SAMPLES,
    data_limit: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
) -> ReferenceData:
    """Random and held-out inputs of ``task`` (spread over the split) and ``model``'s fp32 outputs for them.

    ``data_limit``: held-out images kept; default every image of the split up to
    :data:`DEFAULT_DATA_BUDGET_BYTES` of pixels (:func:`mmexport.runtime.reference.held_out_limit`).
    """
    reference = ReferenceData(info.classes, info.preprocessing, model_sha256, seed)
    reference.sets[RANDOM_SET] = StoredSet(random_images(random_count, info.image_size, seed=seed), {})
    if task is not None:
        split = held_out_split(task)
        limit = held_out_limit(info.image_size, DEFAULT_DATA_BUDGET_BYTES) if data_limit is None else data_limit
        pixels, labels = task.pixels(split, limit=limit, spread=True)
        reference.sets[f"data:{split}"] = StoredSet(pixels, {}, labels)
    return with_outputs(model, reference, device=device)


def with_outputs(module: nn.Module, reference: ReferenceData, *, device: str | torch.device = "cpu",
                 name: str = "torch fp32") -> ReferenceData:
    """The same inputs with ``module``'s outputs (the reference of a comparison model)."""
    result = ReferenceData(reference.classes, reference.preprocessing, reference.model_sha256, reference.seed)
    with TorchRunner(module, name, device, image_size=reference.preprocessing.output_size[0]) as runner:
        for set_name, stored in reference.sets.items():
            inputs = reference.input_view(set_name)  # normalised batch by batch: 4x the pixels never at once
            outputs = run_batched(runner, inputs, BATCH) if len(inputs) else {"logits": np.zeros((0, len(reference.classes)), np.float32)}
            result.sets[set_name] = StoredSet(stored.pixels, outputs, stored.labels)
    return result


def verify_fold(
    merged: MergedModel, folded: nn.Module, task: TaskData | None, info: ModelInfo, samples: int, seed: int,
    device: torch.device,
) -> VerificationReport:
    """Unmerged vs folded, eval mode, on seeded random inputs and (when given) real val images."""
    input_sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        RANDOM_SET: (normalize(random_images(samples, info.image_size, seed=seed), info.preprocessing), None)
    }
    if task is not None:
        pixels, labels = task.pixels("val", limit=max(samples, 1))
        input_sets["data:val"] = (normalize(pixels, info.preprocessing), labels)
    size = info.image_size
    with TorchRunner(merged, "unmerged (torch fp32)", device, image_size=size) as ref, \
            TorchRunner(folded, "folded (torch fp32)", device, image_size=size) as cand:
        return verify_runners(ref, cand, input_sets, FOLD)


__all__ = ["DEFAULT_DATA_BUDGET_BYTES", "DEFAULT_RANDOM_SAMPLES", "held_out_split", "make_reference", "verify_fold",
           "with_outputs"]


def verify_onnx_artifact(
    torch_model: nn.Module, onnx_path, info: ModelInfo, precision: str, *,
    data_arrays: tuple[np.ndarray, np.ndarray | None] | None = None, samples: int = DEFAULT_RANDOM_SAMPLES,
    seed: int = 0, batch_size: int = BATCH, threads: int | None = None, data_name: str = "data",
    torch_device: str = "cpu",
) -> VerificationReport:
    """An ONNX file in ONNX Runtime (CPU) against a torch model, outside any run (both run here, then compared).

    ``data_arrays``: ``(images, labels)`` already normalised (N x 3 x S x S); reported as
    the input set ``data_name``. The row of ``precision`` judges (int8: labelled data only).
    """
    from pathlib import Path

    check_precision(precision)
    stated = read_onnx_metadata(onnx_path).get("precision")
    if stated is not None and stated != precision:
        raise MMExportError(f"{onnx_path}: the file is {stated}, not {precision}")
    if samples < 0:
        raise MMExportError(f"samples must be >= 0, got {samples}")
    input_sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        RANDOM_SET: (normalize(random_images(samples, info.image_size, seed=seed), info.preprocessing), None)}
    if data_arrays is not None:
        images, labels = data_arrays
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, info.image_size, info.image_size) or not len(images):
            raise DataError(f"verification images must be N x 3 x {info.image_size} x {info.image_size} with N >= 1, "
                            f"got shape {images.shape}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(images),) or (labels.size and (labels.min() < 0 or labels.max() >= info.num_classes)):
                raise DataError(f"verification labels must have shape ({len(images)},) and lie in 0..{info.num_classes - 1}")
        input_sets[data_name] = (images, labels)
    reference = TorchRunner(torch_model, "torch fp32 (reference)", torch_device, image_size=info.image_size)
    candidate = OnnxRuntimeRunner(onnx_path, name=f"onnxruntime {precision} ({Path(onnx_path).name})", threads=threads)
    with reference as ref, candidate as cand:
        return verify_runners(ref, cand, input_sets, for_precision(precision), batch_size=batch_size)


__all__ += ["verify_onnx_artifact"]
