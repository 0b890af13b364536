"""The DICOM pixel pipeline: stored values -> 8-bit RGB, as one recorded policy and one implementation.

A DICOM file's stored values are not its image. A server that forgets the rescale, the
VOI window, MONOCHROME1's inversion or the YBR->RGB conversion feeds the network pixels
it was never trained on, and nothing fails: the accuracy is simply not the one the run
reported. So the policy a run was trained with (:class:`DicomPixels`) is recorded in the
preprocessing block (``mmexport-preprocessing/2``, :mod:`mmexport.runtime.preprocess`) and
applied here, torch-free, by :func:`dicom_to_rgb`, in the order PS3.3 C.11 and PS3.4 N.2 give:

1. **decode** one frame with pydicom (>= 3), un-processed (``raw=True``): native and
   RLE/deflated with pydicom itself, JPEG 2000 with pylibjpeg-openjpeg (or Pillow), JPEG
   baseline/extended with Pillow, JPEG-LS with pyjpegls. Multi-frame: ``refuse``, or
   ``frame`` (0-based ``frame_index``). Rows x Columns x frames (and samples x bytes) are
   checked against the runtime's budgets from the header, before any pixel is decoded.
2. **grey (MONOCHROME1/2)**, per frame (an enhanced multi-frame's shared or per-frame
   functional groups override the top-level values):
   a. *modality*: the Modality LUT Sequence, else Rescale Slope/Intercept, else identity;
   b. *VOI*, to [0, 1]: ``none`` -- the full modality range linearly: the range of stored
      values Bits Stored and Pixel Representation allow, through the rescale (or
      [0, 2^n - 1] for a modality LUT of n bits); ``window`` -- a fixed centre/width
      (``linear``, ``linear_exact`` or ``sigmoid``, PS3.3 C.11.2.1.2-3); ``file`` -- the
      file's first VOI LUT (a LUT of n bits is divided by 2^n - 1), else its first window
      with its VOI LUT Function; a file with neither is refused;
   c. *MONOCHROME1*: ``1 - v`` (after the VOI, as the standard does);
   d. the grey value is replicated to R, G and B.
3. **colour**: RGB as stored, divided by 2^Bits Stored - 1; YBR_FULL and YBR_FULL_422
   through PS3.3 C.7.6.3.1.2 (ITU-T T.871) in floating point; YBR_RCT and YBR_ICT are
   undone by the JPEG 2000 decoder itself (pydicom reports the frame as RGB); PALETTE
   COLOR through its palette (8- or 16-bit entries, divided by 255 or 65535). The VOI
   policy applies to grey images only (PS3.3 C.11.2: a VOI is a greyscale transform).
4. **8 bits**: ``rint(255 * clip(v, 0, 1))`` -- numpy's round half to even -- as uint8
   RGB. The block's resize, crop and normalisation then follow unchanged.

Each refusal is one :class:`~mmexport.errors.DataError` line naming the input (or a
:class:`~mmexport.errors.MissingDependencyError` naming the package to install). pydicom
is imported only when a DICOM is read: it is the optional extra ``mmexport[dicom]``.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from mmexport.config import DICOM_WINDOW_FUNCTIONS, MAX_DICOM_FRAME, MAX_DICOM_WINDOW
from mmexport.errors import (
    CheckpointError,
    DataError,
    MissingDependencyError,
    MMExportError,
    shown_value,
)

DICOM_PIPELINE = "dicom-v1"
VOI_POLICIES = ("none", "window", "file")
WINDOW_FUNCTIONS = DICOM_WINDOW_FUNCTIONS
MULTIFRAME_POLICIES = ("refuse", "frame")
# The bounds live in mmexport.config, below the runtime, so that `train --dicom-voi` checks the same ones.
MAX_WINDOW_VALUE = MAX_DICOM_WINDOW
MAX_FRAME_INDEX = MAX_DICOM_FRAME
PIXELS_EXTRA = "DICOM input needs pydicom: pip install 'mmexport[dicom]'"
PREAMBLE = 128  # PS3.10 7.1: a 128-byte preamble, then "DICM"
GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
# Objects with Pixel Data that is not an image to classify: masks and label maps.
NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
}
# What decodes each compressed transfer syntax, for the one line a missing decoder gives.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "Pillow (or pylibjpeg with pylibjpeg-libjpeg, GPLv3, or python-gdcm)",
    "1.2.840.10008.1.2.4.51": ("Pillow for 8-bit samples; for 12-bit, pylibjpeg with pylibjpeg-libjpeg (GPLv3, "
                               "not installed by mmexport) or python-gdcm"),
    "1.2.840.10008.1.2.4.57": "pylibjpeg with pylibjpeg-libjpeg (GPLv3, not installed by mmexport) or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg with pylibjpeg-libjpeg (GPLv3, not installed by mmexport) or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg with pylibjpeg-libjpeg, GPLv3, or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg with pylibjpeg-libjpeg, GPLv3, or python-gdcm)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg and pylibjpeg-openjpeg: pip install 'mmexport[dicom]'",
    "1.2.840.10008.1.2.4.91": "pylibjpeg and pylibjpeg-openjpeg: pip install 'mmexport[dicom]'",
    "1.2.840.10008.1.2.4.201": "pylibjpeg and pylibjpeg-openjpeg: pip install 'mmexport[dicom]'",
    "1.2.840.10008.1.2.4.202": "pylibjpeg and pylibjpeg-openjpeg: pip install 'mmexport[dicom]'",
    "1.2.840.10008.1.2.4.203": "pylibjpeg and pylibjpeg-openjpeg: pip install 'mmexport[dicom]'",
    "1.2.840.10008.1.2.5": "pylibjpeg with pylibjpeg-rle",
}




def _line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the recorded policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomPixels:
    """How a DICOM's stored values become the 8-bit RGB image the rest of the block takes (see the module)."""
    voi: str = "none"
    window_center: float | None = None
    window_width: float | None = None
    window_function: str | None = None
    multiframe: str = "refuse"
    frame_index: int | None = None
    pipeline: str = DICOM_PIPELINE

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("voi", "multiframe", "pipeline"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string, got {shown_value(getattr(self, name))}")
        if problems:
            raise CheckpointError("invalid DICOM pixel policy: " + "; ".join(problems))
        if self.pipeline != DICOM_PIPELINE:
            problems.append(f"pipeline {shown_value(self.pipeline)} (known: {DICOM_PIPELINE})")
        if self.voi not in VOI_POLICIES:
            problems.append(f"voi {shown_value(self.voi)} (known: {', '.join(VOI_POLICIES)})")
        window = (self.window_center, self.window_width, self.window_function)
        if self.voi == "window":
            center = _finite(self.window_center, "window_center", problems, -MAX_WINDOW_VALUE, MAX_WINDOW_VALUE)
            width = _finite(self.window_width, "window_width", problems, 0.0, MAX_WINDOW_VALUE)
            if self.window_function not in WINDOW_FUNCTIONS:
                problems.append(f"window_function {shown_value(self.window_function)} (known: {', '.join(WINDOW_FUNCTIONS)})")
            elif width is not None and (width < 1 if self.window_function == "linear" else width <= 0):
                bound = "at least 1" if self.window_function == "linear" else "above 0"
                problems.append(f"window_width must be {bound} for a {self.window_function} window, got {shown_value(width)}")
            if center is not None and width is not None:
                object.__setattr__(self, "window_center", center)
                object.__setattr__(self, "window_width", width)
        elif window != (None, None, None):
            problems.append(f"window_center/window_width/window_function must be null for voi {shown_value(self.voi)}, "
                            f"got {shown_value(list(window))}")
        if self.multiframe not in MULTIFRAME_POLICIES:
            problems.append(f"multiframe {shown_value(self.multiframe)} (known: {', '.join(MULTIFRAME_POLICIES)})")
        elif self.multiframe == "frame":
            index = self.frame_index
            if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index <= MAX_FRAME_INDEX:
                problems.append(f"frame_index must be an integer from 0 to {MAX_FRAME_INDEX} for multiframe frame, "
                                f"got {shown_value(index)}")
            else:
                object.__setattr__(self, "frame_index", int(index))
        elif self.frame_index is not None:
            problems.append(f"frame_index must be null for multiframe refuse, got {shown_value(self.frame_index)}")
        if problems:
            raise CheckpointError("invalid DICOM pixel policy: " + "; ".join(problems))

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def full_range(cls, frame: int | None = None) -> DicomPixels:
        """VOI ``none``: the full modality range to [0, 1]; ``frame`` takes that frame of multi-frame files."""
        return cls("none", **_frames(frame))

    @classmethod
    def fixed_window(cls, center: float, width: float, function: str = "linear", frame: int | None = None) -> DicomPixels:
        """VOI ``window``: a fixed window in modality units (e.g. CT lung: centre -600, width 1500)."""
        return cls("window", center, width, function, **_frames(frame))

    @classmethod
    def file_window(cls, frame: int | None = None) -> DicomPixels:
        """VOI ``file``: each file's first VOI LUT, else its first window; files without either are refused."""
        return cls("file", **_frames(frame))

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> DicomPixels:
        """Exactly the fields :meth:`to_dict` writes, each validated (one :class:`CheckpointError` line if not)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"invalid DICOM pixel policy: must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [key for key in data if key not in names]
        missing = [name for name in names if name not in data]
        if unknown or missing:
            found = ([f"unknown field(s) {', '.join(shown_value(k, 30) for k in unknown[:5])}"] if unknown else []) + (
                [f"missing field(s) {', '.join(missing)}"] if missing else [])
            raise CheckpointError("invalid DICOM pixel policy: " + "; ".join(found))
        return cls(**{name: data[name] for name in names})

    def describe(self) -> str:
        """The DICOM steps, in one line."""
        if self.voi == "window":
            voi = f"fixed window centre {self.window_center:g} width {self.window_width:g} ({self.window_function})"
        elif self.voi == "file":
            voi = "the file's first VOI LUT or window"
        else:
            voi = "full modality range"
        frames = ("multi-frame refused" if self.multiframe == "refuse" else f"frame index {self.frame_index}")
        return (f"DICOM ({self.pipeline}): modality LUT/rescale, VOI {voi} → [0, 1], MONOCHROME1 inverted, "
                f"YBR/palette → RGB, grey ×3, 8-bit (round half to even), {frames}")


def _frames(frame: int | None) -> dict[str, Any]:
    return {"multiframe": "refuse"} if frame is None else {"multiframe": "frame", "frame_index": frame}


def _finite(value: Any, name: str, problems: list[str], low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        problems.append(f"{name} must be a number, got {shown_value(value)}")
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        number = math.inf
    if not math.isfinite(number) or not low <= number <= high:
        problems.append(f"{name} must be finite and from {low:g} to {high:g}, got {shown_value(value)}")
        return None
    return number


# -- reading ---------------------------------------------------------------------------------------


def pydicom_module() -> Any:
    """pydicom (>= 3), or one :class:`MissingDependencyError` line saying how to install it."""
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise MissingDependencyError(PIXELS_EXTRA) from None
    if int(pydicom.__version__.split(".")[0]) < 3:
        raise MissingDependencyError(f"DICOM input needs pydicom >= 3 (found {pydicom.__version__}): "
                                     "pip install 'mmexport[dicom]'")
    return pydicom


def is_dataset(value: Any) -> bool:
    """Whether ``value`` is a ``pydicom.Dataset`` (without importing pydicom: one can exist only if it was)."""
    pydicom = sys.modules.get("pydicom")
    return pydicom is not None and isinstance(value, getattr(pydicom, "Dataset", ()))


def source_name(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "DICOM bytes"
    if is_dataset(source):
        uid = source.get("SOPInstanceUID", None) if hasattr(source, "get") else None
        return f"DICOM dataset {_line(uid, 80)}" if uid else "DICOM dataset"
    try:
        return os.fsdecode(source).replace("\r", "\\r").replace("\n", "\\n")
    except (TypeError, ValueError):
        return type(source).__name__


def _read(source: Any, where: str) -> Any:
    """The dataset of a path, bytes or Dataset; Pixel Data of a path is left on disk until it is decoded."""
    pydicom = pydicom_module()
    if is_dataset(source):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        handle: Any = io.BytesIO(data)
        head = data[: PREAMBLE + 4]
    else:
        try:
            with open(source, "rb") as file:
                head = file.read(PREAMBLE + 4)
        except (OSError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: cannot read ({_line(getattr(exc, 'strerror', None) or exc)})") from None
        handle = source
    if head[PREAMBLE:] != b"DICM":
        raise DataError(f"{where}: not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble)")
    try:
        # defer_size: large values (Pixel Data) of a file are read only when used, after the budget check
        ds = pydicom.dcmread(handle, defer_size="64 KB")
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is the input's fault
        raise DataError(f"{where}: says DICM but does not parse ({type(exc).__name__}: {_line(exc, 200)})") from None
    if len(ds) == 0:  # pydicom gives up quietly on some broken data sets: nothing after the file meta
        raise DataError(f"{where}: says DICM but does not parse (no data element could be read after the file meta)")
    return ds


def _get(ds: Any, keyword: str, where: str) -> Any:
    try:
        return ds.get(keyword, None)
    except Exception as exc:  # noqa: BLE001 - a malformed value raises on access
        raise DataError(f"{where}: unreadable {keyword} ({type(exc).__name__}: {_line(exc, 120)})") from None


def _int(ds: Any, keyword: str, where: str, low: int, high: int, default: int | None = None) -> int:
    value = _get(ds, keyword, where)
    if value is None or value == "":
        if default is not None:
            return default
        raise DataError(f"{where}: missing {keyword}, which an image needs")
    try:
        number = int(value)
        exact = number == float(value)
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact or not low <= number <= high:
        raise DataError(f"{where}: {keyword} {shown_value(value)} is not an integer from {low} to {high}")
    return number


def _float(value: Any, keyword: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{where}: {keyword} {shown_value(value)} is not a finite number")
    return number


def _first(value: Any) -> Any:
    """The first value of a multi-valued element (Window Center may list several views)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


@dataclass(frozen=True)
class _Header:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    transfer_syntax: Any


def _header(ds: Any, where: str) -> _Header:
    """Everything needed to size and decode the pixels, checked before any pixel is touched."""
    sop = str(_get(ds, "SOPClassUID", where) or "")
    modality = _get(ds, "Modality", where)
    kind = f"{getattr(_get(ds, 'SOPClassUID', where), 'name', sop) or 'unknown SOP class'}"
    if modality:
        kind = f"{_line(modality, 16)}, {kind}"
    if sop in NOT_IMAGES:
        raise DataError(f"{where}: a {NOT_IMAGES[sop]} object ({kind}): its pixels are a mask, not an image to classify")
    if "PixelData" not in ds:
        other = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
        if other:
            raise DataError(f"{where}: {other} (floating-point pixels, {kind}) is not supported")
        raise DataError(f"{where}: a DICOM object with no image ({kind}): it has no Pixel Data")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID", None) if meta is not None else None
    if not syntax:
        raise DataError(f"{where}: no Transfer Syntax UID in its file meta information; cannot decode Pixel Data")
    photometric = str(_get(ds, "PhotometricInterpretation", where) or "").strip()
    if not photometric:
        raise DataError(f"{where}: missing PhotometricInterpretation, which an image needs")
    if photometric not in GREY + COLOUR:
        raise DataError(f"{where}: unsupported photometric interpretation {shown_value(photometric)} "
                        f"(supported: {', '.join(GREY + COLOUR)})")
    samples = _int(ds, "SamplesPerPixel", where, 1, 3)
    if samples != (1 if photometric in GREY + ("PALETTE COLOR",) else 3):
        raise DataError(f"{where}: {samples} sample(s) per pixel for {photometric}")
    bits_allocated = _int(ds, "BitsAllocated", where, 1, 32)
    if bits_allocated not in (1, 8, 16, 32):
        raise DataError(f"{where}: Bits Allocated {bits_allocated} is not supported (1, 8, 16 or 32)")
    bits_stored = _int(ds, "BitsStored", where, 1, bits_allocated)
    signed = _int(ds, "PixelRepresentation", where, 0, 1) == 1
    frames = _int(ds, "NumberOfFrames", where, 1, 2**31 - 1, default=1)
    header = _Header(_int(ds, "Rows", where, 1, 65535), _int(ds, "Columns", where, 1, 65535), frames, samples,
                     bits_allocated, bits_stored, signed, photometric, syntax)
    if photometric in ("YBR_RCT", "YBR_ICT") and not str(syntax).startswith("1.2.840.10008.1.2.4.9"):
        raise DataError(f"{where}: {photometric} outside JPEG 2000 ({_syntax_name(syntax)}) is not supported")
    return header


def _syntax_name(uid: Any) -> str:
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else f"transfer syntax {_line(uid, 70)}"


def _decoder(syntax: Any, where: str) -> Any:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError):
        raise DataError(f"{where}: unsupported transfer syntax {_syntax_name(syntax)}: no pydicom decoder for it") from None
    if not decoder.is_available:
        packages = _DECODER_PACKAGES.get(str(syntax), "a pydicom decoding plugin")
        raise MissingDependencyError(f"{where}: decoding {_syntax_name(syntax)} needs {packages}")
    return decoder


def _frame_view(ds: Any, index: int) -> Any:
    """The modality and VOI attributes that hold for frame ``index`` (functional groups override the top level)."""
    from pydicom import Dataset

    view = Dataset()
    view.file_meta = ds.file_meta  # LUT data in OW needs the byte order
    for keyword in ("BitsStored", "PixelRepresentation", "PhotometricInterpretation", "ModalityLUTSequence",
                    "RescaleSlope", "RescaleIntercept", "VOILUTSequence", "WindowCenter", "WindowWidth",
                    "VOILUTFunction"):
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups = []
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        sequence = ds.get(name, None)
        position = 0 if name.startswith("Shared") else index
        if sequence and len(sequence) > position:
            groups.append(sequence[position])
    for group in groups:
        for macro, keywords in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
                                ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
            items = group.get(macro, None)
            if items:
                for keyword in keywords:
                    if keyword in items[0]:
                        view[keyword] = items[0][keyword]
    return view


# -- the grey and colour steps ---------------------------------------------------------------------


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The stored values Bits Stored and Pixel Representation allow."""
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (linear), C.11.2.1.3.2 (linear_exact), C.11.2.1.3.1 (sigmoid), with output [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    if function == "sigmoid":
        with np.errstate(over="ignore"):  # exp overflows to inf far below the centre: 1 / inf = 0, as it should
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "linear":
        center, width = center - 0.5, width - 1.0
    low, high = center - width / 2.0, center + width / 2.0
    if width <= 0:  # a linear window of width 1: a threshold at centre - 0.5
        return (values > high).astype(np.float64)
    out = (values - center) / width + 0.5
    out[values <= low] = 0.0
    out[values > high] = 1.0
    return out


def _lut(item: Any, ds: Any, where: str, what: str) -> tuple[np.ndarray, int, int]:
    """(LUT data, first stored value mapped, bits per entry) of a Modality or VOI LUT Sequence item."""
    descriptor = item.get("LUTDescriptor", None)
    if descriptor is None or len(descriptor) != 3 or "LUTData" not in item:
        raise DataError(f"{where}: {what} without a valid LUT Descriptor and LUT Data")
    entries, first, bits = (int(v) for v in descriptor)
    entries = entries or 65536  # PS3.3 C.11.1.1.1: 0 means 2^16 entries
    if not 8 <= bits <= 16:
        raise DataError(f"{where}: {what} of {bits} bits per entry is not supported (8-16)")
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the data set's byte order
        little = ds.file_meta._tsyntax_encoding[1] is not False
        lut = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2")
    else:
        lut = np.asarray(data if isinstance(data, (list, tuple)) or type(data).__name__ == "MultiValue" else [data],
                         dtype=np.int64)
    if len(lut) < entries:
        raise DataError(f"{where}: {what} has {len(lut)} entries, its descriptor says {entries}")
    return lut[:entries].astype(np.float64), first, bits


def _apply_lut(values: np.ndarray, lut: np.ndarray, first: int) -> np.ndarray:
    """A LUT on (possibly non-integer) input: below the first entry -> the first, beyond the last -> the last."""
    index = np.clip(np.floor(values) - first, 0, len(lut) - 1).astype(np.int64)
    return lut[index]


def grey_unit(stored: np.ndarray, view: Any, header: _Header, policy: DicomPixels, where: str) -> np.ndarray:
    """Modality, VOI and MONOCHROME1 steps: stored values -> float64 in [0, 1] (white = 1)."""
    low, high = stored_range(header.bits_stored, header.signed)
    values = stored.astype(np.float64)
    modality_lut = view.get("ModalityLUTSequence", None)
    if modality_lut:
        lut, first, bits = _lut(modality_lut[0], view, where, "Modality LUT")
        values = _apply_lut(values, lut, first)
        low, high = 0.0, float(2**bits - 1)
    elif "RescaleSlope" in view and "RescaleIntercept" in view:
        slope = _float(view.RescaleSlope, "Rescale Slope", where)
        intercept = _float(view.RescaleIntercept, "Rescale Intercept", where)
        if slope == 0:
            raise DataError(f"{where}: Rescale Slope 0 maps every stored value to {intercept:g}")
        values = values * slope + intercept
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    if policy.voi == "window":
        unit = window(values, policy.window_center, policy.window_width, policy.window_function)
    elif policy.voi == "file":
        unit = _file_voi(values, view, where)
    else:
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if header.photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _file_voi(values: np.ndarray, view: Any, where: str) -> np.ndarray:
    """The file's first VOI LUT (as pydicom's apply_voi_lut prefers it), else its first window."""
    voi_lut = view.get("VOILUTSequence", None)
    if voi_lut and voi_lut[0].get("LUTDescriptor", None) is not None and "LUTData" in voi_lut[0]:
        lut, first, bits = _lut(voi_lut[0], view, where, "VOI LUT")
        return _apply_lut(values, lut, first) / float(2**bits - 1)
    center, width = _first(view.get("WindowCenter", None)), _first(view.get("WindowWidth", None))
    if center is None or width is None or center == "" or width == "":
        raise DataError(f"{where}: no VOI window or VOI LUT in the file, but the model's recorded DICOM pipeline "
                        "takes the file's own (voi: file)")
    center, width = _float(center, "Window Center", where), _float(width, "Window Width", where)
    function = str(view.get("VOILUTFunction", "") or "LINEAR").strip().lower()
    if function not in WINDOW_FUNCTIONS:
        raise DataError(f"{where}: unsupported VOI LUT Function {shown_value(function.upper())} "
                        "(LINEAR, LINEAR_EXACT, SIGMOID)")
    if width < 1 if function == "linear" else width <= 0:
        raise DataError(f"{where}: Window Width {width:g} is invalid for a {function.upper()} window")
    return window(values, center, width, function)


def ybr_full_to_rgb(ybr: np.ndarray, bits: int) -> np.ndarray:
    """PS3.3 C.7.6.3.1.2 (ITU-T T.871) in float64, clipped to the stored range; no rounding."""
    half, top = 2.0 ** (bits - 1), 2.0**bits - 1
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    cb, cr = cb - half, cr - half
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(rgb, 0.0, top)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """The output rule: ``rint(255 * clip(v, 0, 1))`` (round half to even) as uint8."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


# -- the pipeline ----------------------------------------------------------------------------------

# check_size(columns, rows, frames, bytes of all frames as decoded): raises DataError beyond the budgets
SizeCheck = Callable[[int, int, int, int], None]


def dicom_to_rgb(source: Any, policy: DicomPixels, *, check_size: SizeCheck, where: str | None = None) -> Any:
    """A DICOM (path, bytes or ``pydicom.Dataset``) -> an 8-bit RGB PIL image under ``policy``.

    ``check_size`` gets the header's size before any pixel is decoded (the runtime passes its
    pixel budgets: :func:`mmexport.runtime.preprocess.read_dicom`). Every refusal is one line.
    """
    if not isinstance(policy, DicomPixels):
        raise TypeError(f"policy must be a DicomPixels, got {type(policy).__name__}")
    where = _line(where) if where is not None else source_name(source)
    pydicom_module()
    ds = _read(source, where)
    try:
        header = _header(ds, where)
        sample_bytes = header.bits_allocated / 8
        check_size(header.columns, header.rows, header.frames,
                   math.ceil(header.rows * header.columns * header.frames * header.samples * sample_bytes))
        if header.frames > 1 and policy.multiframe == "refuse":
            raise DataError(f"{where}: a multi-frame DICOM ({header.frames} frames); the model's recorded DICOM "
                            "pipeline refuses multi-frame input (it records no frame to take)")
        index = policy.frame_index or 0
        if index >= header.frames:
            raise DataError(f"{where}: has {header.frames} frame(s); the model's recorded DICOM pipeline takes "
                            f"frame index {index}")
        decoder = _decoder(header.transfer_syntax, where)
        if decoder.is_native:
            from pydicom.pixels.utils import get_expected_length

            expected, found = get_expected_length(ds, "bytes"), len(ds.PixelData or b"")
            if found < expected:
                raise DataError(f"{where}: Pixel Data is truncated ({found} of {expected} bytes)")
        elif not ds.PixelData:
            raise DataError(f"{where}: Pixel Data is empty")
        try:
            stored, meta = decoder.as_array(ds, index=index, raw=True)
        except MMExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a decoder failure on untrusted bytes is the input's fault
            others = f"; other decoders for it: {_DECODER_PACKAGES[str(header.transfer_syntax)]}" if (
                decoder.missing_dependencies and str(header.transfer_syntax) in _DECODER_PACKAGES) else ""
            raise DataError(f"{where}: cannot decode Pixel Data ({_syntax_name(header.transfer_syntax)}; "
                            f"{type(exc).__name__}: {_line(exc, 200)}){others}") from None
        rgb = _to_rgb8(stored, meta, ds, header, policy, index, where)
    except MMExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed element met on the way (pydicom raises many kinds)
        raise DataError(f"{where}: cannot read the image ({type(exc).__name__}: {_line(exc, 200)})") from None
    from PIL import Image

    return Image.fromarray(rgb)  # uint8 H x W x 3: RGB


def _to_rgb8(stored: np.ndarray, meta: dict[str, Any], ds: Any, header: _Header, policy: DicomPixels,
             index: int, where: str) -> np.ndarray:
    expected = (header.rows, header.columns) + ((3,) if header.samples == 3 else ())
    if stored.shape != expected:
        raise DataError(f"{where}: decoded to shape {stored.shape}, the header says {expected}")
    photometric = str(meta.get("photometric_interpretation", header.photometric))
    if header.photometric in GREY:
        unit = grey_unit(stored, _frame_view(ds, index), header, policy, where)
        grey = to_uint8(unit)
        return np.repeat(grey[..., None], 3, axis=-1)
    top = 2.0**header.bits_stored - 1
    if header.photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(stored, ds)[..., :3]  # alpha, if any, is dropped
        return to_uint8(rgb / (255.0 if rgb.dtype == np.uint8 else 65535.0))
    if photometric == "RGB":  # also YBR_RCT/YBR_ICT, which the JPEG 2000 decoder turns back into RGB
        return to_uint8(stored / top)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # 422: pydicom has already undone the subsampling
        return to_uint8(ybr_full_to_rgb(stored, header.bits_stored) / top)
    raise DataError(f"{where}: decoded as {shown_value(photometric)} ({header.photometric} in "
                    f"{_syntax_name(header.transfer_syntax)}), which is not converted to RGB here")


__all__ = [
    "DICOM_PIPELINE",
    "MULTIFRAME_POLICIES",
    "PIXELS_EXTRA",
    "VOI_POLICIES",
    "WINDOW_FUNCTIONS",
    "DicomPixels",
    "dicom_to_rgb",
    "is_dataset",
    "pydicom_module",
    "stored_range",
    "to_uint8",
    "window",
    "ybr_full_to_rgb",
]
