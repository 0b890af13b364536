"""Target and source datasets: ImageFolder trees and the embedded synthetic tasks.

Everything downstream sees a :class:`TaskData`: datasets per split yielding
normalised float tensors, the ordered class names, and the preprocessing
(image size, mean, std) that the exported model's metadata records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmexport.errors import DataError
from mmexport.runtime.preprocess import Preprocessing, normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")

# Synthetic defaults: sources get plenty of labels, the target few (the MedMerge setting).
SYNTHETIC_DEFAULTS = {
    "pigment": {"n_train": 2000, "n_val": 400, "n_test": 0},
    "border": {"n_train": 2000, "n_val": 400, "n_test": 0},
    "target": {"n_train": 300, "n_val": 300, "n_test": 300},
}
SYNTHETIC_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 16  # below this the torchvision backbones' downsampling runs out of pixels
FOLDER_IMAGE_SIZE = 224


@dataclass
class TaskData:
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: dict[str, Any]
    _factory: Callable[[str, bool], Dataset] = field(repr=False)
    splits: tuple[str, ...] = ("train", "val")
    # The evaluation pipeline, exactly: recorded in every artifact and applied by the runtime.
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.preprocessing is None:
            self.preprocessing = Preprocessing.exact(self.image_size, self.mean, self.std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset(self, split: str, *, augment: bool = False) -> Dataset:
        if split not in self.splits:
            raise DataError(f"{self.description.get('source', 'dataset')}: has no {split!r} split (has {', '.join(self.splits)})")
        return self._factory(split, augment)

    def loader(self, split: str, batch_size: int, *, shuffle: bool = False, augment: bool = False,
               seed: int = 0, sampler=None, num_workers: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            self.dataset(split, augment=augment), batch_size=batch_size, shuffle=shuffle and sampler is None,
            sampler=sampler, generator=generator, num_workers=num_workers, drop_last=False,
        )

    def labels(self, split: str) -> np.ndarray:
        """Class index of every sample of ``split``, in dataset order (no image is decoded)."""
        dataset = self.dataset(split, augment=False)
        if isinstance(dataset, _ArrayImages):
            return dataset.labels.numpy()
        return np.asarray(dataset.targets, dtype=np.int64)  # torchvision ImageFolder

    def arrays(self, split: str, limit: int | None = None, *, spread: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``limit`` preprocessed (eval-transform) images and labels of ``split`` as numpy.

        The first ``limit`` samples, or with ``spread`` evenly spaced ones over the whole
        split (for calibration, where a sorted split's first images would be one class).
        """
        dataset = self.dataset(split, augment=False)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        if spread and count < len(dataset):
            indices = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
        else:
            indices = list(range(count))
        images, labels = zip(*(dataset[i] for i in indices))
        return torch.stack(images).numpy(), np.asarray(labels, dtype=np.int64)

    def pixels(self, split: str, limit: int | None = None, *, spread: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`arrays`, but the uint8 N x S x S x 3 pixels before scaling and normalisation.

        ``normalize(pixels, self.preprocessing)`` gives exactly what :meth:`arrays` gives.
        """
        dataset = self.dataset(split, augment=False)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        if spread and count < len(dataset):
            indices = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
        else:
            indices = list(range(count))
        if not indices:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8), np.zeros((0,), np.int64)
        samples = [dataset.pixels(i) for i in indices]
        return np.stack([p for p, _ in samples]), np.asarray([label for _, label in samples], dtype=np.int64)


class _ArrayImages(Dataset):
    """uint8 NHWC images in memory (already at the model's size) -> normalised float CHW tensors, optional flips."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing, augment: bool) -> None:
        self.images = images
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.preprocessing = preprocessing
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.images[index]), int(self.labels[index])

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment:  # lesions have no preferred orientation
            if torch.rand(()) < 0.5:
                image = image[:, ::-1]
            if torch.rand(()) < 0.5:
                image = image[::-1]
        # The same function the runtime and the reference set use: evaluation is the recorded pipeline.
        return torch.from_numpy(normalize(np.ascontiguousarray(image), self.preprocessing)), int(self.labels[index])


def load_task(spec: str, *, image_size: int | None = None) -> TaskData:
    """``synthetic:<task>[?...]`` or ``PATH[?key=value&...]``: an image folder, a CSV or a MedMNIST .npz.

    File formats and their options are in :mod:`mmexport.formats`.
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE):
        raise DataError(f"{spec}: image size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if spec.startswith("synthetic:"):
        return _synthetic_task(spec, image_size)
    from mmexport.formats import load_file_task  # lazy: formats imports this module

    return load_file_task(spec, image_size)


def _synthetic_task(spec: str, image_size: int | None) -> TaskData:
    from mmexport import synthetic

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

    def factory(split: str, augment: bool) -> Dataset:
        if split not in cache:
            cache[split] = synthetic.generate(task, options[f"n_{split}"], image_size=size, seed=options["seed"], split=split)
        images, labels = cache[split]
        return _ArrayImages(images, labels, preprocessing, augment)

    description = {"source": spec, "kind": "synthetic", "task": task, **options, "image_size": size, "classes": names}
    return TaskData(names, size, IMAGENET_MEAN, IMAGENET_STD, description, factory, splits, preprocessing)
