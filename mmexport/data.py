"""Target and source datasets: ImageFolder trees and the embedded synthetic tasks.

Everything downstream sees a :class:`TaskData`: datasets per split yielding
normalised float tensors, the ordered class names, and the preprocessing
(image size, mean, std) that the exported model's metadata records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmexport.errors import DataError

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

    def arrays(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``limit`` preprocessed (eval-transform) images and labels of ``split`` as numpy."""
        dataset = self.dataset(split, augment=False)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        images, labels = zip(*(dataset[i] for i in range(count)))
        return torch.stack(images).numpy(), np.asarray(labels, dtype=np.int64)


class _ArrayImages(Dataset):
    """uint8 NHWC images in memory -> normalised float CHW tensors, optional flips."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, augment: bool) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255.0)
        if self.augment:  # lesions have no preferred orientation
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            if torch.rand(()) < 0.5:
                image = image.flip(-2)
        return (image - self.mean) / self.std, int(self.labels[index])


def load_task(spec: str, *, image_size: int | None = None) -> TaskData:
    """``synthetic:<task>[?n_train=..&n_val=..&n_test=..&seed=..]`` or an ImageFolder root with train/ and val/."""
    if spec.startswith("synthetic:"):
        return _synthetic_task(spec, image_size)
    return _imagefolder_task(spec, image_size)


def _synthetic_task(spec: str, image_size: int | None) -> TaskData:
    from mmexport import synthetic

    body = spec.split(":", 1)[1]
    task, _, query = body.partition("?")
    names = synthetic.class_names(task)  # raises DataError for an unknown task
    options = dict(SYNTHETIC_DEFAULTS[task], seed=0)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise DataError(f"{spec}: unknown option {key!r}; known: {', '.join(options)}")
        try:
            options[key] = int(value)
        except ValueError:
            raise DataError(f"{spec}: option {key} must be an integer, got {value!r}") from None
    size = image_size or SYNTHETIC_IMAGE_SIZE
    splits = tuple(s for s in SPLITS if options[f"n_{s}"] > 0)
    if "train" not in splits or "val" not in splits:
        raise DataError(f"{spec}: n_train and n_val must be positive")
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def factory(split: str, augment: bool) -> Dataset:
        if split not in cache:
            cache[split] = synthetic.generate(task, options[f"n_{split}"], image_size=size, seed=options["seed"], split=split)
        images, labels = cache[split]
        return _ArrayImages(images, labels, IMAGENET_MEAN, IMAGENET_STD, augment)

    description = {"source": spec, "kind": "synthetic", "task": task, **options, "image_size": size, "classes": names}
    return TaskData(names, size, IMAGENET_MEAN, IMAGENET_STD, description, factory, splits)


def _imagefolder_task(spec: str, image_size: int | None) -> TaskData:
    from torchvision import datasets
    from torchvision.transforms import v2

    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such dataset directory (or use synthetic:target)")
    if not root.is_dir():
        raise DataError(f"{root}: expected a directory with train/ and val/ subfolders")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in present or "val" not in present:
        raise DataError(f"{root}: expected train/ and val/ subfolders, found {', '.join(present) or 'neither'}")
    size = image_size or FOLDER_IMAGE_SIZE
    normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    eval_transform = v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size), *normalize])
    train_transform = v2.Compose(
        [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(), *normalize]
    )

    def open_split(split: str, transform) -> datasets.ImageFolder:
        try:
            return datasets.ImageFolder(str(root / split), transform=transform)
        except FileNotFoundError as exc:
            raise DataError(f"{root / split}: {str(exc).splitlines()[0]}") from None

    scanned = {split: open_split(split, None) for split in present}
    classes = scanned["train"].classes
    for split in present[1:]:
        other = scanned[split].classes
        missing = [c for c in classes if c not in other]
        unknown = [c for c in other if c not in classes]
        if missing:
            raise DataError(f"{root / split}: class(es) {', '.join(missing)} of train/ missing from {split}/")
        if unknown:
            raise DataError(f"{root / split}: class(es) {', '.join(unknown)} not in train/")
    if len(classes) < 2:
        raise DataError(f"{root / 'train'}: need at least 2 classes, found {len(classes)}")

    def factory(split: str, augment: bool) -> Dataset:
        return open_split(split, train_transform if augment else eval_transform)

    description = {
        "source": str(root.absolute()),
        "kind": "imagefolder",
        "image_size": size,
        "classes": classes,
        "counts": {s: len(scanned[s]) for s in present},
    }
    return TaskData(list(classes), size, IMAGENET_MEAN, IMAGENET_STD, description, factory, tuple(present))
