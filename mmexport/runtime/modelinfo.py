"""What a deployment needs to know beside the weights: one frozen description, one metadata layout.

:class:`ModelInfo` (after timm's ``PretrainedCfg``: a plain dataclass, no torch, the
one source of input size, preprocessing, mean/std and labels) is written into every
artifact a run makes -- the safetensors model files, every ONNX file
(``metadata_props``), TensorRT engine sidecars and Triton repositories -- as the same
flat ``str -> str`` map (:meth:`ModelInfo.to_metadata`), and read back from any of
them with :meth:`ModelInfo.from_metadata`.

The preprocessing is recorded *completely*, as one versioned block
(:class:`~mmexport.runtime.preprocess.Preprocessing`): colour conversion, resize rule
and size, interpolation and antialiasing, crop, scaling, mean/std, layout. It is the
exact pipeline that produced the accuracy a run reports: the training side's
evaluation transform *is* this block, applied by the same code the runtime's
predictor uses.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mmexport import __version__
from mmexport.config import check_int
from mmexport.errors import CheckpointError
from mmexport.jsonread import parse_json
from mmexport.runtime.preprocess import MAX_SIZE, Preprocessing, shown_value

MODEL_INFO_FORMAT = "mmexport-model-info/2"
MAX_CLASS_NAME = 256  # characters of one class name
MAX_NAME = 64  # characters of an architecture or precision name
_DECIMAL = re.compile(r"[1-9][0-9]{0,8}")  # image_size as written: a plain positive decimal, no sign or blanks


def _is_name(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable() and value == value.strip()


def _triple(value: object, name: str) -> tuple[float, float, float]:
    """Three finite numbers (R, G, B) as floats, or one line naming ``name``."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or any(
            isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
        raise CheckpointError(f"{name} must be a list of 3 numbers (R, G, B), got {shown_value(value)}")
    try:
        floats = tuple(float(v) for v in value)
    except (OverflowError, ValueError):
        floats = (math.inf,)
    if not all(math.isfinite(v) for v in floats):
        raise CheckpointError(f"{name} must be finite, got {shown_value(value)}")
    return floats  # type: ignore[return-value]


def check_class_names(classes: object, where: str) -> tuple[str, ...]:
    """``classes`` as a tuple of names, or one line saying why not.

    Each name must be a non-empty string of printable characters that is exactly one line
    for every reader (Triton's ``labels.txt`` splits on ``\\n`` only, Python's ``splitlines``
    also on ``\\v``, ``\\f``, ``\\x85``, ``\\u2028`` ...), without surrounding blanks,
    and the names distinct. A JSON string is not a list of classes (it would be one class per letter).
    """
    if not isinstance(classes, (list, tuple)):
        raise CheckpointError(f"{where}: classes must be a list of names, got {type(classes).__name__}")
    if not classes:
        raise CheckpointError(f"{where}: classes is empty")
    for index, name in enumerate(classes):
        if not isinstance(name, str):
            raise CheckpointError(f"{where}: class {index} must be a string, got {type(name).__name__}")
        if not name.strip() or name != name.strip() or not name.isprintable() or len(name) > MAX_CLASS_NAME:
            raise CheckpointError(f"{where}: class {index} ({name[:40]!r}) must be 1-{MAX_CLASS_NAME} printable "
                                  "characters on one line, without surrounding blanks")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{where}: class names repeat")
    return tuple(classes)


@dataclass(frozen=True)
class ModelInfo:
    """Architecture, classes, input and preprocessing of a model, plus its precision and provenance."""

    arch: str
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "RGB"
    layout: str = "NCHW"
    preprocessing: Preprocessing | None = None  # None: an exact resize to image_size (arrays, synthetic data)
    precision: str = "fp32"
    weights_sha256: str | None = None  # the model.safetensors an artifact was made from
    # Provenance an artifact adds when it is written (calibration, converter, ...); not read back:
    # the file's full metadata map stays available to whoever opened it.
    extra: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not _is_name(self.arch, MAX_NAME):
            raise CheckpointError(f"arch must be a non-empty name of at most {MAX_NAME} printable characters, "
                                  f"got {shown_value(self.arch)}")
        object.__setattr__(self, "classes", check_class_names(self.classes, "model description"))
        if isinstance(self.image_size, numbers.Integral) and abs(int(self.image_size)) > MAX_SIZE * 2:
            raise CheckpointError(f"image_size must be an integer from 1 to {MAX_SIZE}, got {shown_value(self.image_size)}")
        object.__setattr__(self, "image_size", check_int(self.image_size, "image_size", high=MAX_SIZE, error=CheckpointError))
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if self.channel_order != "RGB" or self.layout != "NCHW":
            raise CheckpointError(f"channel_order/layout must be RGB/NCHW (what the runtime feeds), got "
                                  f"{shown_value(self.channel_order)}/{shown_value(self.layout)}")
        if not _is_name(self.precision, MAX_NAME):
            raise CheckpointError(f"precision must be a short name, got {shown_value(self.precision)}")
        if self.weights_sha256 is not None and not _is_name(self.weights_sha256, 128):
            raise CheckpointError(f"weights_sha256 must be a digest, got {shown_value(self.weights_sha256)}")
        if self.preprocessing is None:
            # validates mean/std as the block does (finite, in range)
            object.__setattr__(self, "preprocessing", Preprocessing.exact(self.image_size, self.mean, self.std))
        if not isinstance(self.preprocessing, Preprocessing):
            raise CheckpointError(f"preprocessing must be a preprocessing block, got {type(self.preprocessing).__name__}")
        # mean and std duplicate the block's (older readers take them from here): they must be the block's
        for name in ("mean", "std"):
            if getattr(self, name) != getattr(self.preprocessing, name):
                raise CheckpointError(f"{name} {shown_value(list(getattr(self, name)))} differs from the preprocessing block's "
                                      f"{shown_value(list(getattr(self.preprocessing, name)))}")
        if self.preprocessing.output_size != (self.image_size, self.image_size):
            raise CheckpointError(
                f"preprocessing produces {self.preprocessing.output_size}, but the model takes {self.image_size} px"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_precision(self, precision: str, **extra: str) -> ModelInfo:
        return replace(self, precision=precision, extra={**self.extra, **extra})

    # -- the shared metadata layout -------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        fields = {
            "model_info_format": MODEL_INFO_FORMAT,
            "arch": self.arch,
            "classes": json.dumps(list(self.classes)),
            "image_size": str(self.image_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "channel_order": self.channel_order,
            "layout": self.layout,
            "preprocessing": self.preprocessing.to_json(),
            "precision": self.precision,
            "mmexport_version": __version__,
        }
        if self.weights_sha256:
            fields["weights_sha256"] = self.weights_sha256
        for key, value in self.extra.items():
            fields.setdefault(key, str(value))
        return fields

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str) -> ModelInfo:
        """Read the layout back, every field checked as content; refusals are one line naming ``source`` and the field.

        A file from mmexport 0.1 (no complete preprocessing) is refused in one line.
        """
        if not isinstance(metadata, Mapping):
            raise CheckpointError(f"{source}: model metadata must be a map of text fields, got {type(metadata).__name__}")
        version = metadata.get("model_info_format")
        if version != MODEL_INFO_FORMAT:
            made_by = metadata.get("mmexport_version", "an unknown version")
            if version is None and "arch" in metadata:
                raise CheckpointError(
                    f"{source}: made by mmexport {shown_value(made_by)}, whose metadata does not record the complete "
                    f"preprocessing; re-export it with mmexport {__version__}"
                )
            raise CheckpointError(f"{source}: no mmexport model description (model_info_format {shown_value(version)}, "
                                  f"expected {MODEL_INFO_FORMAT!r})")

        def text(name: str, default: str | None = None) -> str:
            value = metadata.get(name, default)
            if value is None:
                raise CheckpointError(f"{source}: model metadata has no field {name}")
            if not isinstance(value, str):
                raise CheckpointError(f"{source}: model metadata field {name} must be text, got {type(value).__name__}")
            return value

        def json_field(name: str) -> Any:
            return parse_json(text(name), f"{source}: model metadata field {name}", error=CheckpointError)

        try:
            preprocessing = Preprocessing.from_json(text("preprocessing"))
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: model metadata field preprocessing: {exc}") from None
        classes = check_class_names(json_field("classes"), f"{source}: model metadata field classes")
        size_text = text("image_size")
        if not _DECIMAL.fullmatch(size_text):
            raise CheckpointError(f"{source}: model metadata field image_size must be a decimal integer from 1 to "
                                  f"{MAX_SIZE}, got {shown_value(size_text)}")
        weights = metadata.get("weights_sha256")
        try:
            return cls(
                arch=text("arch"),
                classes=classes,
                image_size=int(size_text),
                mean=json_field("mean"),
                std=json_field("std"),
                channel_order=text("channel_order", "RGB"),
                layout=text("layout", "NCHW"),
                preprocessing=preprocessing,
                precision=text("precision", "fp32"),
                weights_sha256=None if weights is None else text("weights_sha256"),
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["extra"] = dict(self.extra)
        return data


__all__ = ["MODEL_INFO_FORMAT", "ModelInfo"]
