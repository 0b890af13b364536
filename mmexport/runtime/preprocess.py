"""The evaluation preprocessing, as one versioned block and one implementation (Pillow + numpy, no torch).

The block (:class:`Preprocessing`, serialised as JSON under the ``preprocessing``
metadata key of every artifact) states each step a server must apply to a decoded
image, in this order:

1. **colour** (``rgb-v1``): convert to 8-bit RGB. 16-bit greyscale (``I;16``, ``I``)
   is scaled by 255/65535 and rounded (Pillow's own conversion clips it at 255);
   palette images with transparency go through RGBA; alpha is dropped (not
   composited); everything else uses Pillow's ``convert("RGB")``.
2. **resize**: ``shorter_side`` -- the shorter side becomes ``resize_size[0]`` and
   the longer one ``int(size * long / short)`` (torchvision's rule for an int size);
   ``exact`` -- to ``resize_size`` = (height, width) whatever the aspect ratio;
   ``none``. Interpolation is Pillow's bilinear filter on the 8-bit image, which is
   antialiased when shrinking (``antialias: true``); the result is rounded to 8 bits.
   An image already at the target size is left untouched.
3. **crop**: ``center`` to ``crop_size`` (height, width), the offset being
   ``int(round((H − h) / 2))`` (torchvision's ``center_crop``), or ``none``.
4. **scale and normalise**: ``x / scale`` (255) then ``(x − mean) / std`` per
   channel, in float32.
5. **layout**: HWC -> CHW, batched as NCHW float32.

:func:`pil_pipeline` runs steps 1-3 (a PIL image, 8-bit RGB, at the model's size);
:func:`normalize` runs 4-5. The training side's evaluation transform calls exactly
these two functions, so the accuracy a run reports is the accuracy of this block.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmexport.errors import CheckpointError, DataError, MissingDependencyError

PREPROCESSING_FORMAT = "mmexport-preprocessing/1"
RESIZE_MODES = ("shorter_side", "exact", "none")
CROP_MODES = ("center", "none")
COLOR_RULES = ("rgb-v1",)
CENTER_CROP_FRACTION = 0.875  # evaluation of image files: resize to S / 0.875, centre-crop S (the ImageNet recipe)


@dataclass(frozen=True)
class Preprocessing:
    resize: str
    resize_size: tuple[int, ...]
    crop: str
    crop_size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True
    color: str = "rgb-v1"
    scale: float = 255.0
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize_size", tuple(int(v) for v in self.resize_size))
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", tuple(int(v) for v in self.crop_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize {self.resize!r} (known: {', '.join(RESIZE_MODES)})")
        expected = {"shorter_side": 1, "exact": 2, "none": 0}.get(self.resize)
        if expected is not None and len(self.resize_size) != expected:
            problems.append(f"resize_size {list(self.resize_size)} for resize {self.resize}")
        if any(v < 1 for v in self.resize_size):
            problems.append(f"resize_size {list(self.resize_size)}")
        if self.crop not in CROP_MODES:
            problems.append(f"crop {self.crop!r} (known: {', '.join(CROP_MODES)})")
        if (self.crop == "center") != (self.crop_size is not None and len(self.crop_size) == 2):
            problems.append(f"crop_size {self.crop_size} for crop {self.crop}")
        if self.crop == "none" and self.resize != "exact":
            problems.append("without a crop the resize must be exact (the model takes a fixed size)")
        if self.interpolation != "bilinear" or self.color not in COLOR_RULES or self.layout != "NCHW" or self.dtype != "float32":
            problems.append(f"unsupported interpolation/colour/layout/dtype "
                            f"({self.interpolation}, {self.color}, {self.layout}, {self.dtype})")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std) or not self.scale > 0:
            problems.append("mean/std must have 3 values, std and scale positive")
        if problems:
            raise CheckpointError("invalid preprocessing block: " + "; ".join(problems))

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def exact(cls, size: int, mean: Sequence[float], std: Sequence[float]) -> "Preprocessing":
        """Resize to size x size (a no-op for images already that size): arrays and synthetic images."""
        return cls("exact", (size, size), "none", None, tuple(mean), tuple(std))

    @classmethod
    def center_crop(cls, size: int, mean: Sequence[float], std: Sequence[float],
                    fraction: float = CENTER_CROP_FRACTION) -> "Preprocessing":
        """Shorter side to round(size / fraction), centre crop size x size: image files."""
        return cls("shorter_side", (int(round(size / fraction)),), "center", (size, size), tuple(mean), tuple(std))

    # -- serialisation -----------------------------------------------------------------------
    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop == "center":
            return tuple(self.crop_size)  # type: ignore[return-value]
        return tuple(self.resize_size)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["resize_size"] = list(self.resize_size)
        data["crop_size"] = list(self.crop_size) if self.crop_size is not None else None
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return {"format": PREPROCESSING_FORMAT, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        if not isinstance(data, dict) or data.get("format") != PREPROCESSING_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"unknown preprocessing block {found!r} (expected {PREPROCESSING_FORMAT})")
        fields = {k: v for k, v in data.items() if k != "format"}
        try:
            crop_size = fields.pop("crop_size", None)
            return cls(crop_size=tuple(crop_size) if crop_size is not None else None, **fields)
        except TypeError as exc:
            raise CheckpointError(f"malformed preprocessing block ({exc})") from None

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        try:
            data = json.loads(text)
        except ValueError:
            raise CheckpointError("malformed preprocessing block (not JSON)") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line, for reports and the README."""
        steps = ["RGB"]
        if self.resize == "shorter_side":
            steps.append(f"shorter side → {self.resize_size[0]} ({self.interpolation}, antialiased)")
        elif self.resize == "exact":
            steps.append(f"resize → {self.resize_size[0]}×{self.resize_size[1]} ({self.interpolation}, antialiased)")
        if self.crop == "center":
            steps.append(f"centre crop {self.crop_size[0]}×{self.crop_size[1]}")
        steps.append(f"/{self.scale:g}, mean {list(self.mean)}, std {list(self.std)}, {self.layout} {self.dtype}")
        return "; ".join(steps)


# -- steps 1-3: Pillow ------------------------------------------------------------------------------


def _pil():
    try:
        from PIL import Image
    except ImportError:

        raise MissingDependencyError("decoding images needs Pillow: pip install pillow") from None
    return Image


def to_rgb(image: Any) -> Any:
    """Step 1 (``rgb-v1``): an 8-bit RGB copy of a PIL image."""
    Image = _pil()
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def read_rgb(source: str | os.PathLike[str] | bytes) -> Any:
    """Decode a file (path) or encoded bytes (PNG, JPEG, ...) to an 8-bit RGB PIL image."""
    Image = _pil()
    handle: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(handle) as image:
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb  # closing the file destroys the opened image's pixels
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's UnidentifiedImageError is an OSError
        where = "image bytes" if handle is not source else str(source)
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


def resized_size(width: int, height: int, prep: Preprocessing) -> tuple[int, int]:
    """(width, height) after the resize step."""
    if prep.resize == "exact":
        return prep.resize_size[1], prep.resize_size[0]
    if prep.resize == "shorter_side":
        size = prep.resize_size[0]
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size
    return width, height


def pil_pipeline(image: Any, prep: Preprocessing) -> Any:
    """Steps 1-3: colour, resize, crop. Returns an 8-bit RGB PIL image of the model's size."""
    Image = _pil()
    image = to_rgb(image)
    target = resized_size(image.width, image.height, prep)
    if target != (image.width, image.height):
        image = image.resize(target, Image.BILINEAR)
    if prep.crop == "center":
        crop_h, crop_w = prep.crop_size
        if image.width < crop_w or image.height < crop_h:
            raise DataError(f"image of {image.width}x{image.height} is smaller than the {crop_w}x{crop_h} crop")
        top = int(round((image.height - crop_h) / 2.0))
        left = int(round((image.width - crop_w) / 2.0))
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return image


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Steps 4-5: uint8 HWC (or NHWC) RGB -> float32 CHW (or NCHW), scaled and normalised."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise DataError(f"expected uint8 RGB pixels (H, W, 3) or (N, H, W, 3), got {array.dtype} {array.shape}")
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    scaled = array.astype(np.float32) / np.float32(prep.scale)
    normalised = (scaled - mean) / std
    order = (2, 0, 1) if array.ndim == 3 else (0, 3, 1, 2)
    return np.ascontiguousarray(normalised.transpose(order), dtype=np.float32)


def preprocess_image(image: Any, prep: Preprocessing) -> np.ndarray:
    """One image (path, bytes, PIL image, or uint8 HWC/HW array) -> float32 CHW, exactly as evaluation did."""
    Image = _pil()
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        pil = read_rgb(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(f"an image array must be uint8 HWC/HW pixels, got {image.dtype}; "
                            "pass normalised float batches as N x 3 x H x W")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise DataError(f"an image array must be H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), got {image.shape}")
        pil = Image.fromarray(image)
    elif hasattr(image, "mode") and hasattr(image, "resize"):
        pil = image
    else:
        raise DataError(f"cannot read an image from {type(image).__name__}: pass a path, bytes, a PIL image or a uint8 array")
    return normalize(np.asarray(pil_pipeline(pil, prep)), prep)


def model_pixels(path: str | os.PathLike[str] | Path, prep: Preprocessing) -> np.ndarray:
    """A file after steps 1-3 as uint8 HWC: what reference sets store."""
    return np.asarray(pil_pipeline(read_rgb(path), prep), dtype=np.uint8)


__all__ = [
    "CENTER_CROP_FRACTION", "PREPROCESSING_FORMAT", "Preprocessing", "model_pixels", "normalize", "pil_pipeline",
    "preprocess_image", "read_rgb", "resized_size", "to_rgb",
]
