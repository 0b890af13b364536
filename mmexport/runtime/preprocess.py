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

**DICOM.** A block may carry a DICOM section (:class:`~mmexport.runtime.dicom.DicomPixels`,
format ``mmexport-preprocessing/2``; a block without one is still written as ``/1``): the
pixel pipeline (modality LUT/rescale, VOI policy, MONOCHROME1 inversion, colour, frames) that
turns a DICOM into the 8-bit RGB image step 2 takes. A DICOM is recognised by its content
(:func:`is_dicom`) before any other decoder and goes through :func:`read_dicom`; a block
without the section refuses it in one line.

**Budgets.** Every image is sized before work is spent on it (:func:`check_pixel_budget`):
files and bytes are opened lazily (:func:`open_image`: Pillow reads only the header, in
one of :data:`DECODABLE_FORMATS`), and refused in one :class:`~mmexport.errors.DataError`
line before decoding when the decoded image would exceed :data:`MAX_DECODED_PIXELS`, its
sides differ by more than :data:`MAX_ASPECT_RATIO`, or the recorded resize would make it
larger than :data:`MAX_RESIZED_PIXELS`; arrays and PIL images get the same check before
resizing. Only the first frame of a multi-frame file is ever decoded. The block itself is
validated field by field on construction (types, finite values, ranges), so a forged
block is refused in one :class:`~mmexport.errors.CheckpointError` line before it is used.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmexport.errors import (
    CheckpointError,
    DataError,
    MissingDependencyError,
    MMExportError,
    one_line,
    shown_value,
)
from mmexport.jsonread import parse_json
from mmexport.runtime.dicom import DicomPixels, dicom_to_rgb, is_dataset
from mmexport.runtime.dicom import source_name as dicom_source_name

PREPROCESSING_FORMAT = "mmexport-preprocessing/1"  # a block without a DICOM section (written as before)
PREPROCESSING_FORMAT_DICOM = "mmexport-preprocessing/2"  # a block with one (``dicom``: the DICOM pixel pipeline)
PREPROCESSING_FORMATS = (PREPROCESSING_FORMAT, PREPROCESSING_FORMAT_DICOM)
RESIZE_MODES = ("shorter_side", "exact", "none")
CROP_MODES = ("center", "none")
COLOR_RULES = ("rgb-v1",)
CENTER_CROP_FRACTION = 0.875  # evaluation of image files: resize to S / 0.875, centre-crop S (the ImageNet recipe)

# -- budgets: what one image may cost ---------------------------------------------------------------
# The largest side a block may ask for (resize or crop). Classifiers take 224-1024 px; full-
# resolution mammography models ~2000-4000. 8192 leaves room above all of them, and one
# 8192x8192 image is already 805 MB as float32 CHW, the most one preprocessed image may cost.
MAX_SIZE = 8192
# Decoded pixels of one image (the header's width x height). Admits an 8192x8192 (67 Mpx)
# digital mammogram or radiograph and every dataset in docs/datasets.md (ISIC/HAM10000 are
# at most ~6000x4000 = 24 Mpx), and stays below Pillow's own bomb warning (89.5 Mpx), so
# Pillow never warns about an image admitted here. 80 Mpx is 240 MB as 8-bit RGB.
MAX_DECODED_PIXELS = 80_000_000
# Bytes of one DICOM's Pixel Data as decoded, all frames: the size of the largest 8-bit RGB image
# admitted (240 MB). An 80 Mpx 16-bit radiograph (160 MB) fits; an 80 Mpx 32-bit dose grid does not.
MAX_DICOM_BYTES = 3 * MAX_DECODED_PIXELS
# Pixels after the recorded resize: an exact MAX_SIZE x MAX_SIZE resize fits; a sliver whose
# shorter side is scaled up to the block's size (65000x1 -> 16.6 Mpx x 256) does not.
MAX_RESIZED_PIXELS = MAX_SIZE * MAX_SIZE
# Longer side / shorter side. Panoramic dental X-rays (~2.5:1), full-spine and full-leg
# radiographs (~3:1) and ECG rhythm strips (~10:1) fit; a 65000x1 "image" does not.
MAX_ASPECT_RATIO = 20
# What Pillow may open: the raster formats mmexport reads datasets in (see the dataset
# extensions) plus GIF and MPO (JPEG with extra frames). Not every plugin Pillow has: some
# (EPS) run external programs, and each one more is more parser for a hostile byte string.
DECODABLE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "PPM", "GIF")
# Plausible ranges of the normalisation: x / scale then (x - mean) / std. A scale of 1
# (raw 0-255 pixels, caffe-style means ~100) and of 65535 both fit; an std below MIN_STD
# would blow 8-bit inputs up beyond anything a network was trained on.
MAX_ABS_MEAN = 1000.0
MIN_STD, MAX_STD = 1e-6, 1000.0
MIN_SCALE, MAX_SCALE = 1e-3, 1e6


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
    dicom: DicomPixels | None = None  # the DICOM pixel pipeline (format /2); None: image files only (format /1)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("resize", "crop", "interpolation", "color", "layout", "dtype"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string, got {shown_value(getattr(self, name))}")
        if problems:  # the checks below compare these with strings
            raise CheckpointError("invalid preprocessing block: " + "; ".join(problems))
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize {shown_value(self.resize)} (known: {', '.join(RESIZE_MODES)})")
        if self.crop not in CROP_MODES:
            problems.append(f"crop {shown_value(self.crop)} (known: {', '.join(CROP_MODES)})")
        expected = {"shorter_side": 1, "exact": 2, "none": 0}.get(self.resize)
        resize_size = _sizes(self.resize_size, "resize_size", problems, expected)
        crop_size = None
        if self.crop_size is not None:
            crop_size = _sizes(self.crop_size, "crop_size", problems, 2)
        if self.crop == "center" and self.crop_size is None:
            problems.append("crop center needs a crop_size [height, width]")
        if self.crop == "none" and self.crop_size is not None:
            problems.append(f"crop_size {shown_value(self.crop_size)} for crop none")
        if self.crop == "none" and self.resize != "exact":
            problems.append("without a crop the resize must be exact (the model takes a fixed size)")
        if resize_size is not None and crop_size is not None and self.resize in ("exact", "shorter_side"):
            # shorter_side: the shorter side becomes R whatever the orientation, so both crop sides must fit in R
            room = resize_size if self.resize == "exact" else resize_size * 2
            if crop_size[0] > room[0] or crop_size[1] > room[1]:
                problems.append(f"crop_size {list(crop_size)} is larger than the resize output "
                                f"({self.resize} {list(resize_size)})")
        if self.interpolation != "bilinear":
            problems.append(f"unsupported interpolation {shown_value(self.interpolation)} (bilinear)")
        if self.antialias is not True:  # the implementation is Pillow's bilinear filter: always antialiased
            problems.append(f"antialias must be true (Pillow's bilinear filter always antialiases), "
                            f"got {shown_value(self.antialias)}")
        if self.color not in COLOR_RULES:
            problems.append(f"unsupported color {shown_value(self.color)} ({', '.join(COLOR_RULES)})")
        if self.layout != "NCHW" or self.dtype != "float32":
            problems.append(f"unsupported layout/dtype {shown_value(self.layout)}/{shown_value(self.dtype)} (NCHW/float32)")
        mean = _numbers(self.mean, "mean", problems, -MAX_ABS_MEAN, MAX_ABS_MEAN)
        std = _numbers(self.std, "std", problems, MIN_STD, MAX_STD)
        scale = _numbers((self.scale,), "scale", problems, MIN_SCALE, MAX_SCALE, single=True)
        if self.dicom is not None and not isinstance(self.dicom, DicomPixels):
            problems.append(f"dicom must be a DICOM pixel policy or null, got {shown_value(self.dicom)}")
        if problems:
            raise CheckpointError("invalid preprocessing block: " + "; ".join(problems))
        object.__setattr__(self, "resize_size", resize_size)
        object.__setattr__(self, "crop_size", crop_size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "scale", scale[0])

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def exact(cls, size: int, mean: Sequence[float], std: Sequence[float]) -> Preprocessing:
        """Resize to size x size (a no-op for images already that size): arrays and synthetic images."""
        return cls("exact", (size, size), "none", None, tuple(mean), tuple(std))

    @classmethod
    def center_crop(cls, size: int, mean: Sequence[float], std: Sequence[float],
                    fraction: float = CENTER_CROP_FRACTION) -> Preprocessing:
        """Shorter side to round(size / fraction), centre crop size x size: image files."""
        return cls("shorter_side", (int(round(size / fraction)),), "center", (size, size), tuple(mean), tuple(std))

    # -- serialisation -----------------------------------------------------------------------
    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop == "center":
            return tuple(self.crop_size)  # type: ignore[return-value]
        return tuple(self.resize_size)  # type: ignore[return-value]

    def with_dicom(self, dicom: DicomPixels | None) -> Preprocessing:
        """The same block with (or without) a DICOM pixel pipeline."""
        return replace(self, dicom=dicom)

    def to_dict(self) -> dict[str, Any]:
        """Version 1 without a DICOM section (byte for byte what earlier versions wrote), version 2 with one."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dicom"}
        data["resize_size"] = list(self.resize_size)
        data["crop_size"] = list(self.crop_size) if self.crop_size is not None else None
        data["mean"], data["std"] = list(self.mean), list(self.std)
        if self.dicom is None:
            return {"format": PREPROCESSING_FORMAT, **data}
        return {"format": PREPROCESSING_FORMAT_DICOM, **data, "dicom": self.dicom.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> Preprocessing:
        """A block read from a file: exactly the fields :meth:`to_dict` writes, each validated (one line if not)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"preprocessing block must be a JSON object, got {type(data).__name__}")
        version = data.get("format")
        if not isinstance(version, str) or version not in PREPROCESSING_FORMATS:
            raise CheckpointError(f"unknown preprocessing block {shown_value(version)} "
                                  f"(expected {' or '.join(PREPROCESSING_FORMATS)})")
        names = [f.name for f in fields(cls) if f.name != "dicom" or version == PREPROCESSING_FORMAT_DICOM]
        unknown = [key for key in data if key != "format" and key not in names]
        missing = [name for name in names if name not in data]
        if unknown or missing:
            found = ([f"unknown field(s) {', '.join(shown_value(k, 30) for k in unknown[:5])}"] if unknown else []) + (
                [f"missing field(s) {', '.join(missing)}"] if missing else [])
            raise CheckpointError("invalid preprocessing block: " + "; ".join(found))
        values = {name: data[name] for name in names}
        if version == PREPROCESSING_FORMAT_DICOM:
            if values["dicom"] is None:  # a block without DICOM is written as version 1: one form per meaning
                raise CheckpointError(f"invalid preprocessing block: {PREPROCESSING_FORMAT_DICOM} needs a dicom section")
            try:
                values["dicom"] = DicomPixels.from_dict(values["dicom"])
            except CheckpointError as exc:
                raise CheckpointError(f"invalid preprocessing block: dicom: {exc}") from None
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> Preprocessing:
        if not isinstance(text, (str, bytes, bytearray)):
            raise CheckpointError(f"preprocessing block must be JSON text, got {type(text).__name__}")
        return cls.from_dict(parse_json(text, "preprocessing block", error=CheckpointError))

    def describe(self) -> str:
        """One line, for reports and the README."""
        steps = [self.dicom.describe()] if self.dicom is not None else []
        steps.append("RGB")
        if self.resize == "shorter_side":
            steps.append(f"shorter side → {self.resize_size[0]} ({self.interpolation}, antialiased)")
        elif self.resize == "exact":
            steps.append(f"resize → {self.resize_size[0]}×{self.resize_size[1]} ({self.interpolation}, antialiased)")
        if self.crop == "center":
            steps.append(f"centre crop {self.crop_size[0]}×{self.crop_size[1]}")
        steps.append(f"/{self.scale:g}, mean {list(self.mean)}, std {list(self.std)}, {self.layout} {self.dtype}")
        return "; ".join(steps)


# -- validation of the block's fields -------------------------------------------------------------


def _sizes(value: Any, name: str, problems: list[str], count: int | None) -> tuple[int, ...] | None:
    """``value`` as a tuple of ``count`` integers from 1 to :data:`MAX_SIZE`, or None with the problem noted."""
    if not isinstance(value, (list, tuple)):
        problems.append(f"{name} must be a list of integers, got {shown_value(value)}")
        return None
    if count is not None and len(value) != count:
        problems.append(f"{name} must have {count} value(s) for this mode, got {shown_value(value)}")
        return None
    if count is None and len(value) > 2:
        problems.append(f"{name} must have at most 2 values, got {shown_value(value)}")
        return None
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or not 1 <= item <= MAX_SIZE:
            problems.append(f"{name} values must be integers from 1 to {MAX_SIZE}, got {shown_value(value)}")
            return None
    return tuple(int(item) for item in value)


def _numbers(value: Any, name: str, problems: list[str], low: float, high: float,
             single: bool = False) -> tuple[float, ...] | None:
    """``value`` (3 numbers, or one if ``single``) as finite floats in [low, high], or None with the problem noted."""
    wanted = "a number" if single else "a list of 3 numbers (R, G, B)"
    if not single and (not isinstance(value, (list, tuple)) or len(value) != 3):
        problems.append(f"{name} must be {wanted}, got {shown_value(value)}")
        return None
    shown = shown_value(value[0] if single else value)
    result = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            problems.append(f"{name} must be {wanted}, got {shown}")
            return None
        try:
            number = float(item)
        except (OverflowError, ValueError):  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number) or not low <= number <= high:
            problems.append(f"{name} must be finite and from {low:g} to {high:g}, got {shown}")
            return None
        result.append(number)
    return tuple(result)


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
        # round(v * 255 / 65535) in integers, 4 bytes a pixel (float64 took 8, several times over). The
        # exact quotient is never k + 0.5 (that needs v = 257k + 128.5), so this is numpy's rint exactly.
        wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        return Image.fromarray(wide.astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _one_line(text: object, limit: int = 300) -> str:
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_pixel_budget(width: int, height: int, prep: Preprocessing | None = None, where: str = "image") -> None:
    """Refuse (one :class:`DataError` line) an image of ``width`` x ``height`` beyond the budgets.

    Decoded pixels up to :data:`MAX_DECODED_PIXELS`, sides within :data:`MAX_ASPECT_RATIO`
    of each other and, given ``prep``, at most :data:`MAX_RESIZED_PIXELS` after its resize
    (:func:`resized_size`, the rule :func:`pil_pipeline` applies). Call it before decoding
    or resizing: it costs nothing, what it guards costs up to gigabytes.
    """
    where = _one_line(where)
    if width < 1 or height < 1:
        raise DataError(f"{where}: image of {width}x{height} px has no pixels")
    if width * height > MAX_DECODED_PIXELS:
        raise DataError(f"{where}: image of {width}x{height} px ({width * height / 1e6:.1f} Mpx) is over the "
                        f"decoding budget of {MAX_DECODED_PIXELS / 1e6:g} Mpx; refused before decoding")
    if prep is not None:
        resized_width, resized_height = resized_size(width, height, prep)
        if resized_width * resized_height > MAX_RESIZED_PIXELS:
            raise DataError(f"{where}: image of {width}x{height} px would be resized to {resized_width}x{resized_height} "
                            f"({resized_width * resized_height / 1e6:.1f} Mpx) by the recorded preprocessing, over the "
                            f"budget of {MAX_RESIZED_PIXELS / 1e6:.1f} Mpx; refused before resizing")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(f"{where}: image of {width}x{height} px has an aspect ratio of "
                        f"{max(width, height) / min(width, height):.0f}:1, over the bound of {MAX_ASPECT_RATIO}:1")


def _source_name(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image bytes"
    if is_dataset(source):
        return "DICOM dataset"
    try:
        return os.fsdecode(source).replace("\r", "\\r").replace("\n", "\\n")
    except (TypeError, ValueError):
        return type(source).__name__


DICOM_MAGIC_OFFSET = 128  # the DICOM file preamble (PS3.10 §7.1): 128 bytes, then "DICM"


def is_dicom(source: str | os.PathLike[str] | bytes) -> bool:
    """Whether a file (path) or bytes is a DICOM Part 10 file, by its content (never its extension)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[: DICOM_MAGIC_OFFSET + 4])
    else:
        try:
            with open(source, "rb") as handle:
                head = handle.read(DICOM_MAGIC_OFFSET + 4)
        except OSError:
            return False  # the image reader reports the unreadable file
    return head[DICOM_MAGIC_OFFSET:] == b"DICM"


def _no_dicom_pipeline(where: str) -> DataError:
    return DataError(f"{where}: a DICOM file, but this model was not trained with a recorded DICOM pipeline (rescale, "
                     "VOI window, MONOCHROME1 inversion, colour): its preprocessing block has no dicom section")


def dicom_budget(prep: Preprocessing | None, where: str) -> Any:
    """The budgets for a DICOM, checked from its header before decoding (see :func:`dicom_to_rgb`).

    One frame is held to :func:`check_pixel_budget` (decoded pixels, aspect ratio, size after the
    recorded resize); the whole object -- Rows x Columns x frames -- to :data:`MAX_DECODED_PIXELS`
    and, as decoded (samples x bits), to :data:`MAX_DICOM_BYTES`.
    """
    def check(columns: int, rows: int, frames: int, decoded_bytes: int) -> None:
        check_pixel_budget(columns, rows, prep, where)
        if columns * rows * frames > MAX_DECODED_PIXELS:
            raise DataError(f"{where}: {frames} frames of {columns}x{rows} px ({columns * rows * frames / 1e6:.1f} Mpx) "
                            f"are over the decoding budget of {MAX_DECODED_PIXELS / 1e6:g} Mpx; refused before decoding")
        if decoded_bytes > MAX_DICOM_BYTES:
            raise DataError(f"{where}: Pixel Data of {decoded_bytes / 1e6:.1f} MB as decoded ({frames} frame(s) of "
                            f"{columns}x{rows} px) is over the budget of {MAX_DICOM_BYTES / 1e6:g} MB; refused before decoding")
    return check


def read_dicom(source: Any, prep: Preprocessing, *, where: str | None = None) -> Any:
    """A DICOM (path, bytes or ``pydicom.Dataset``) -> 8-bit RGB PIL image, by the block's DICOM section.

    Sized from its header against the budgets (:func:`dicom_budget`) before any pixel is decoded.
    A block without a DICOM section refuses it in one line: its model never saw DICOM pixels.
    """
    where = _one_line(where) if where is not None else dicom_source_name(source)
    if prep is None or prep.dicom is None:
        raise _no_dicom_pipeline(where)
    return dicom_to_rgb(source, prep.dicom, check_size=dicom_budget(prep, where), where=where)


@contextmanager
def open_image(source: str | os.PathLike[str] | bytes, prep: Preprocessing | None = None, *,
               where: str | None = None) -> Iterator[Any]:
    """The bounded reader: a lazily opened PIL image whose size has passed :func:`check_pixel_budget`.

    Pillow reads only the header here (in one of :data:`DECODABLE_FORMATS`); the caller
    decodes (``load()``, ``verify()``) inside the ``with`` block. Every failure -- no image,
    an unknown format, over a budget, Pillow's own decompression-bomb refusal, a decoder
    error in the block -- is one :class:`DataError` line naming the source (or ``where``). No
    global Pillow or warnings state is changed.
    """
    Image = _pil()
    where = _one_line(where) if where is not None else _source_name(source)
    handle: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    if is_dicom(source):  # before any other decoder: a DICOM that is also a TIFF must not be read as a TIFF
        # the DICOM pipeline decodes (it has its own budgets); the caller gets its 8-bit RGB result
        yield read_dicom(source, prep, where=where)  # type: ignore[arg-type]
        return
    Image.init()  # registers every plugin, so the formats below can be looked up
    allowed = [name for name in DECODABLE_FORMATS if name in Image.OPEN]
    try:
        with Image.open(handle, formats=allowed) as image:
            check_pixel_budget(image.width, image.height, prep, where)
            yield image
    except MMExportError:
        raise
    except Image.UnidentifiedImageError:
        raise DataError(f"{where}: cannot decode image (not an image in a format read here: {', '.join(allowed)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning under "-W error"
        raise DataError(f"{where}: image over the decoding budget of {MAX_DECODED_PIXELS / 1e6:g} Mpx, "
                        f"refused before decoding ({type(exc).__name__}: {_one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's fault
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {_one_line(exc)})") from None


def read_rgb(source: str | os.PathLike[str] | bytes, prep: Preprocessing | None = None) -> Any:
    """Decode a file (path) or encoded bytes (PNG, JPEG, ...) to an 8-bit RGB PIL image, within the budgets.

    Given ``prep`` (the block it will go through), the size after its resize is bounded too.
    Only the first frame of a multi-frame file is decoded. A DICOM (recognised by its content,
    whatever its name) goes through the block's DICOM pipeline (:func:`read_dicom`), or is refused
    in one line when the block has none.
    """
    if is_dicom(source):
        return read_dicom(source, prep)  # type: ignore[arg-type]
    with open_image(source, prep) as image:
        image.load()
        if image.size[0] * image.size[1] > MAX_DECODED_PIXELS:  # no format read here grows on load; be sure
            raise DataError(f"{_source_name(source)}: decoded to {image.width}x{image.height} px, over the budget")
        rgb = to_rgb(image)
        return rgb.copy() if rgb is image else rgb  # closing the file destroys the opened image's pixels


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
    check_pixel_budget(image.width, image.height, prep)
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
    """One image (path, bytes, PIL image, or uint8 HWC/HW array) -> float32 CHW, exactly as evaluation did.

    Every kind of input is held to the same budgets (:func:`check_pixel_budget`) before it is decoded or resized.
    DICOM paths and bytes (by content) and ``pydicom.Dataset`` objects go through the block's DICOM pipeline.
    """
    Image = _pil()
    if is_dataset(image):
        pil = read_dicom(image, prep)
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        pil = read_rgb(image, prep)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(f"an image array must be uint8 HWC/HW pixels, got {image.dtype}; "
                            "pass normalised float batches as N x 3 x H x W")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise DataError(f"an image array must be H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), got {image.shape}")
        check_pixel_budget(image.shape[1], image.shape[0], prep, "image array")
        pil = Image.fromarray(image)
    elif hasattr(image, "mode") and hasattr(image, "resize") and hasattr(image, "width") and hasattr(image, "height"):
        pil = image
    else:
        raise DataError(f"cannot read an image from {type(image).__name__}: pass a path, bytes, a PIL image or a uint8 array")
    return normalize(np.asarray(pil_pipeline(pil, prep)), prep)


def model_pixels(path: str | os.PathLike[str] | Path, prep: Preprocessing) -> np.ndarray:
    """A file after steps 1-3 as uint8 HWC: what reference sets store."""
    return np.asarray(pil_pipeline(read_rgb(path, prep), prep), dtype=np.uint8)


__all__ = [
    "CENTER_CROP_FRACTION",
    "DECODABLE_FORMATS",
    "MAX_ASPECT_RATIO",
    "MAX_DECODED_PIXELS",
    "MAX_DICOM_BYTES",
    "MAX_RESIZED_PIXELS",
    "MAX_SIZE",
    "PREPROCESSING_FORMAT",
    "PREPROCESSING_FORMAT_DICOM",
    "DicomPixels",
    "Preprocessing",
    "check_pixel_budget",
    "dicom_budget",
    "is_dicom",
    "model_pixels",
    "normalize",
    "open_image",
    "pil_pipeline",
    "preprocess_image",
    "read_dicom",
    "read_rgb",
    "resized_size",
    "to_rgb",
]
