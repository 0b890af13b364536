"""The task types every dataset becomes: :class:`TaskData`, the augmentation presets, array-backed images.

Everything downstream sees a :class:`TaskData`: datasets per split yielding
normalised float tensors, the ordered class names, and the preprocessing
(image size, mean, std) that the exported model's metadata records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmexport.config import AUGMENTATIONS, DEFAULT_AUGMENTATION
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
FOLDER_IMAGE_SIZE = 224



def _sample_indices(size: int, limit: int | None, spread: bool) -> list[int]:
    """The first ``limit`` of ``size`` indices, or with ``spread`` ``limit`` evenly spaced ones."""
    count = size if limit is None else min(limit, size)
    if spread and count < size:
        return np.linspace(0, size - 1, count).round().astype(int).tolist()
    return list(range(count))

@dataclass
class TaskData:
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: dict[str, Any]
    _factory: Callable[[str, "AugmentationPreset | None"], Dataset] = field(repr=False)
    splits: tuple[str, ...] = ("train", "val")
    # The evaluation pipeline, exactly: recorded in every artifact and applied by the runtime.
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.preprocessing is None:
            self.preprocessing = Preprocessing.exact(self.image_size, self.mean, self.std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset(self, split: str, *, augment: bool | str | None = False) -> Dataset:
        """``split``'s images; ``augment`` names a training augmentation preset (see :data:`PRESETS`).

        ``False``/``None``/``"none"`` give the evaluation transform; ``True`` the default preset.
        """
        if split not in self.splits:
            raise DataError(f"{self.description.get('source', 'dataset')}: has no {split!r} split (has {', '.join(self.splits)})")
        preset = augmentation_preset(augment)
        return self._factory(split, preset if preset.name != "none" else None)

    def loader(self, split: str, batch_size: int, *, shuffle: bool = False, augment: bool | str | None = False,
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
        indices = _sample_indices(len(dataset), limit, spread)
        images, labels = zip(*(dataset[i] for i in indices))
        return torch.stack(images).numpy(), np.asarray(labels, dtype=np.int64)

    def pixels(self, split: str, limit: int | None = None, *, spread: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`arrays`, but the uint8 N x S x S x 3 pixels before scaling and normalisation.

        ``normalize(pixels, self.preprocessing)`` gives exactly what :meth:`arrays` gives.
        """
        dataset = self.dataset(split, augment=False)
        indices = _sample_indices(len(dataset), limit, spread)
        if not indices:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8), np.zeros((0,), np.int64)
        samples = [dataset.pixels(i) for i in indices]
        return np.stack([p for p, _ in samples]), np.asarray([label for _, label in samples], dtype=np.int64)


@dataclass(frozen=True)
class AugmentationPreset:
    """One named training augmentation. Geometry first, then colour; normalisation is the recorded one.

    ``crop_scale``: random resized crop to the model's size from this fraction of the image's
    area (aspect ratio within ``crop_ratio``); ``None`` keeps the evaluation geometry.
    ``jitter``: (brightness, contrast, saturation, hue) of torchvision's ColorJitter.
    """

    name: str
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    jitter: tuple[float, float, float, float] | None = None
    legacy_arrays: bool = False  # arrays: the old flips-only path, draw for draw

    @property
    def description(self) -> str:
        return AUGMENTATIONS[self.name]

    @property
    def changes_orientation(self) -> bool:
        return self.hflip or self.vflip or self.rot90

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "crop_scale": list(self.crop_scale) if self.crop_scale else None,
                "crop_ratio": list(self.crop_ratio) if self.crop_scale else None, "hflip": self.hflip,
                "vflip": self.vflip, "rot90": self.rot90, "jitter": list(self.jitter) if self.jitter else None}

    def pil_transform(self, size: int, *, crop: bool) -> Callable | None:
        """The transform of a PIL image at the model's size (torchvision v2 on PIL: Pillow does the pixel work).

        ``crop=False`` leaves the geometry to the caller (image files crop from the original).
        Pillow, not tensor kernels: per-image tensor ops on small images are dominated by
        thread start-up and were 20-50x slower on a busy 2-core machine. Random draws come
        from torch's generator, so each epoch's seed fixes them.
        """
        from torchvision.transforms import v2

        steps: list[Any] = []
        if crop and self.crop_scale is not None:
            steps.append(v2.RandomResizedCrop(size, scale=self.crop_scale, ratio=self.crop_ratio, antialias=True))
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.vflip:
            steps.append(v2.RandomVerticalFlip())
        if self.rot90:
            steps.append(_RandomRot90())
        if self.jitter is not None:
            brightness, contrast, saturation, hue = self.jitter
            steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
        return v2.Compose(steps) if steps else None


class _RandomRot90:
    """Rotate a square PIL image by 0, 90, 180 or 270 degrees, uniformly."""

    _TURNS = (None, "ROTATE_90", "ROTATE_180", "ROTATE_270")

    def __call__(self, image):
        from PIL import Image

        turn = self._TURNS[int(torch.randint(4, ()))]
        return image.transpose(getattr(Image.Transpose, turn)) if turn else image


_JITTER = (0.1, 0.1, 0.1, 0.0)
PRESETS: dict[str, AugmentationPreset] = {
    "none": AugmentationPreset("none"),
    "light": AugmentationPreset("light", crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1 / 0.9), jitter=_JITTER),
    "orientation-free": AugmentationPreset("orientation-free", crop_scale=(0.6, 1.0), hflip=True, vflip=True,
                                           rot90=True, jitter=(0.1, 0.1, 0.1, 0.02)),
    "legacy": AugmentationPreset("legacy", crop_scale=(0.6, 1.0), hflip=True, vflip=True,
                                 jitter=(0.1, 0.1, 0.1, 0.02), legacy_arrays=True),
}
assert set(PRESETS) == set(AUGMENTATIONS) and DEFAULT_AUGMENTATION in PRESETS


def augmentation_preset(augment: bool | str | None | AugmentationPreset) -> AugmentationPreset:
    """A preset by name; ``True`` is the default preset, ``False``/``None`` none."""
    if isinstance(augment, AugmentationPreset):
        return augment
    if augment is None or augment is False:
        return PRESETS["none"]
    if augment is True:
        return PRESETS[DEFAULT_AUGMENTATION]
    try:
        return PRESETS[augment]
    except (KeyError, TypeError):
        raise DataError(f"unknown augmentation {augment!r}; choose one of {', '.join(PRESETS)}") from None


class _ArrayImages(Dataset):
    """uint8 NHWC images in memory (already at the model's size) -> normalised float CHW tensors.

    With an augmentation preset, the preset's transform runs on the uint8 pixels and the
    recorded normalisation follows, so augmented and evaluation images differ only by it.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing,
                 augment: bool | str | None | AugmentationPreset) -> None:
        self.images = images
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.preprocessing = preprocessing
        self.preset = augmentation_preset(augment)
        self.augment = self.preset.name != "none"
        size = int(images.shape[1]) if images.ndim == 4 else 0
        self.transform = None if self.preset.legacy_arrays else self.preset.pil_transform(size, crop=True)

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.images[index]), int(self.labels[index])

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment and self.preset.legacy_arrays:  # the pre-preset behaviour, draw for draw
            if torch.rand(()) < 0.5:
                image = image[:, ::-1]
            if torch.rand(()) < 0.5:
                image = image[::-1]
        elif self.transform is not None:
            from PIL import Image

            image = np.asarray(self.transform(Image.fromarray(np.ascontiguousarray(image))), dtype=np.uint8)
        # The same function the runtime and the reference set use: evaluation is the recorded pipeline.
        return torch.from_numpy(normalize(np.ascontiguousarray(image), self.preprocessing)), int(self.labels[index])
