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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from mmexport import __version__
from mmexport.errors import CheckpointError
from mmexport.runtime.preprocess import Preprocessing

MODEL_INFO_FORMAT = "mmexport-model-info/2"
MAX_CLASS_NAME = 256  # characters of one class name


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
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.preprocessing is None:
            object.__setattr__(self, "preprocessing", Preprocessing.exact(self.image_size, self.mean, self.std))
        if self.preprocessing.output_size != (self.image_size, self.image_size):
            raise CheckpointError(
                f"preprocessing produces {self.preprocessing.output_size}, but the model takes {self.image_size} px"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_precision(self, precision: str, **extra: str) -> "ModelInfo":
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
    def from_metadata(cls, metadata: Mapping[str, str], source: str) -> "ModelInfo":
        """Read the layout back; a file from mmexport 0.1 (no complete preprocessing) is refused in one line."""
        version = metadata.get("model_info_format")
        if version != MODEL_INFO_FORMAT:
            made_by = metadata.get("mmexport_version", "an unknown version")
            if version is None and "arch" in metadata:
                raise CheckpointError(
                    f"{source}: made by mmexport {made_by}, whose metadata does not record the complete preprocessing; "
                    f"re-export it with mmexport {__version__}"
                )
            raise CheckpointError(f"{source}: no mmexport model description (model_info_format {version!r}, "
                                  f"expected {MODEL_INFO_FORMAT!r})")
        try:
            preprocessing = Preprocessing.from_json(metadata["preprocessing"])
            return cls(
                arch=metadata["arch"],
                classes=tuple(json.loads(metadata["classes"])),
                image_size=int(metadata["image_size"]),
                mean=tuple(json.loads(metadata["mean"])),
                std=tuple(json.loads(metadata["std"])),
                channel_order=metadata.get("channel_order", "RGB"),
                layout=metadata.get("layout", "NCHW"),
                preprocessing=preprocessing,
                precision=metadata.get("precision", "fp32"),
                weights_sha256=metadata.get("weights_sha256"),
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: missing or malformed model metadata ({exc!r})") from None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["extra"] = dict(self.extra)
        return data


__all__ = ["MODEL_INFO_FORMAT", "ModelInfo"]
