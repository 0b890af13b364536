"""Target and source datasets: the spec a user gives (``synthetic:<task>`` or ``PATH[?key=value&...]``)
turned into a :class:`~mmexport.torchside.data.tasks.TaskData`.

The task types live in :mod:`.tasks`, the file formats (image folders, CSV, MedMNIST .npz)
in :mod:`.formats`, the embedded synthetic tasks in :mod:`.synthetic`.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from torch.utils.data import Dataset

from mmexport.config import MIN_IMAGE_SIZE, check_int
from mmexport.errors import DataError
from mmexport.runtime.preprocess import DicomPixels, Preprocessing
from mmexport.torchside.data import synthetic
from mmexport.torchside.data.formats import load_file_task, no_dicom_files
from mmexport.torchside.data.tasks import (
    FOLDER_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    SYNTHETIC_DEFAULTS,
    SYNTHETIC_IMAGE_SIZE,
    AugmentationPreset,
    TaskData,
    _ArrayImages,
    augmentation_preset,
)

__all__ = [
    "FOLDER_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS", "AugmentationPreset", "TaskData", "augmentation_preset",
    "check_recorded_data", "load_task", "recorded_spec",
]

def load_task(spec: str, *, image_size: int | None = None, dicom: DicomPixels | None = None) -> TaskData:
    """``synthetic:<task>[?...]`` or ``PATH[?key=value&...]``: an image folder, a CSV or a MedMNIST .npz.

    File formats and their options are in :mod:`mmexport.torchside.data.formats`. ``dicom``: the
    DICOM pixel policy for a dataset of DICOM files (default: ``DicomPixels.full_range()``);
    refused for a dataset without DICOM files.
    """
    if image_size is not None:
        check_int(image_size, f"{spec}: image size", low=MIN_IMAGE_SIZE, error=DataError)
    if spec.startswith("synthetic:"):
        if dicom is not None:
            raise DataError(no_dicom_files(spec))
        return _synthetic_task(spec, image_size)
    return load_file_task(spec, image_size, dicom)


def _spec_path(spec: str) -> str:
    return spec if spec.startswith("synthetic:") else spec.partition("?")[0]


def recorded_spec(spec: str, recorded: dict[str, Any] | None) -> str:
    """The run's dataset ``spec`` with its path replaced by the absolute one recorded at training.

    A relative ``--data`` re-read from another directory would name another dataset; the
    recorded absolute path does not. Synthetic specs and records without a path are unchanged.
    """
    if not recorded or spec.startswith("synthetic:") or not recorded.get("path"):
        return spec
    _, mark, query = spec.partition("?")
    return str(recorded["path"]) + (mark + query if mark else "")


def check_recorded_data(spec: str, task: TaskData, recorded: dict[str, Any] | None, *,
                        run_spec: str | None = None, what: str = "--data") -> None:
    """Refuse ``task`` (loaded from ``spec``) where it claims to be the run's dataset but is not.

    It claims to be when ``spec`` names the same path the run was trained on (``run_spec``, as
    given then, or the recorded absolute path). Refused when it now resolves to another place,
    or its content fingerprint differs from the one recorded (files added, removed, changed or
    relabelled). A deliberately different dataset (another path) is not this check's business.
    """
    if not recorded or spec.startswith("synthetic:") or task.description.get("kind") == "synthetic":
        return
    given = _spec_path(spec)
    claims = given == _spec_path(run_spec) if run_spec else False
    recorded_path = recorded.get("path") or recorded.get("source")
    now_path = task.description.get("path") or task.description.get("source")
    if recorded_path and now_path and os.path.realpath(given) == os.path.realpath(str(recorded_path)):
        claims = True
    if not claims:
        return
    old, new = recorded.get("fingerprint"), task.description.get("fingerprint")
    moved = bool(recorded_path and now_path and str(now_path) != str(recorded_path))
    if old and new:
        if old == new:
            return  # the same labelled images, wherever they lie now
        where = (f"the run was trained on {recorded_path}, but {given!r} now resolves to {now_path} "
                 "(a relative path read from another directory?)" if moved else
                 f"the dataset at {now_path} changed since the run was trained (images added, removed, altered "
                 "or relabelled)")
        raise DataError(f"{what} {given}: {where}: content fingerprint {str(new)[7:19]}… differs from the recorded "
                        f"{str(old)[7:19]}…; pass the intended dataset's absolute path")
    if moved:
        raise DataError(
            f"{what} {given}: the run was trained on {recorded_path}, but {given!r} now resolves to {now_path} "
            "(a relative path read from another directory?); pass the intended dataset's absolute path"
        )


def _synthetic_task(spec: str, image_size: int | None) -> TaskData:
    body = spec.split(":", 1)[1]
    task, _, query = body.partition("?")
    names = synthetic.class_names(task)  # raises DataError for an unknown task
    options = dict(SYNTHETIC_DEFAULTS[task], seed=0)
    seen: set[str] = set()
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise DataError(f"{spec}: unknown option {key!r}; known: {', '.join(options)}")
        if key in seen:
            raise DataError(f"{spec}: option {key} given twice")
        seen.add(key)
        try:
            options[key] = int(value)
        except ValueError:
            raise DataError(f"{spec}: option {key} must be an integer, got {value!r}") from None
        if options[key] < 0:
            raise DataError(f"{spec}: option {key} must be >= 0, got {options[key]}")
    size = image_size or SYNTHETIC_IMAGE_SIZE
    splits = tuple(s for s in SPLITS if options[f"n_{s}"] > 0)
    if "train" not in splits or "val" not in splits:
        raise DataError(f"{spec}: n_train and n_val must be positive")
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    preprocessing = Preprocessing.exact(size, IMAGENET_MEAN, IMAGENET_STD)

    def factory(split: str, augment: AugmentationPreset | None) -> Dataset:
        if split not in cache:
            cache[split] = synthetic.generate(task, options[f"n_{split}"], image_size=size, seed=options["seed"], split=split)
        images, labels = cache[split]
        return _ArrayImages(images, labels, preprocessing, augment)

    description = {"source": spec, "kind": "synthetic", "task": task, **options, "image_size": size, "classes": names}
    return TaskData(names, size, IMAGENET_MEAN, IMAGENET_STD, description, factory, splits, preprocessing)
