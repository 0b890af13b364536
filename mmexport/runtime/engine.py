"""TensorRT engines as artifacts: the sidecar, the plan header, compatibility and precision checks.

A serialized TensorRT engine (a *plan*) only runs under the TensorRT version and on
the GPU architecture it was built for, unless it was built version- or
hardware-compatible. Loading a plan anywhere else fails deep inside TensorRT with
messages such as "The engine plan file is generated on an incompatible device,
expecting compute X got compute Y" or "Serialization assertion stdVersionRead ==
kSERIALIZATION_VERSION failed". So every engine travels with a *sidecar*
(``model.fp16.plan`` -> ``model.fp16.plan.json``) recording where and how it was
built, and :func:`check_engine` compares it with the current machine *before*
anything is deserialised, refusing in one line that names the difference and the
command that rebuilds the engine.

This module is pure Python: TensorRT, the CUDA bindings and torch are imported only
inside :func:`current_environment`, on first use.

Layer precisions
----------------
On TensorRT 11 every network is strongly typed and the fp16/int8 builder flags are
gone (they were deprecated in 10.12): precision comes from the ONNX graph. An
exporter that forgets that builds an fp32 engine while believing it built an fp16
one. The builder therefore inspects every engine it builds (``IEngineInspector``,
JSON, built with ``ProfilingVerbosity.DETAILED``) and :func:`precision_problems`
refuses an engine whose layers do not run in the requested precision. The rule
(:data:`PRECISION_RULE`) is stated once, below.

The inspector's JSON changed in TensorRT 11 (NVIDIA's "Migrating IEngineInspector
Usage from TensorRT 10.x to 11.x"): the engine-level ``Bindings`` list of names was
replaced by ``I/O Tensors``, a list of objects (``Name``, ``IOMode``, ``DataType``,
``Dimensions``, ``Location``, ``IsShapeInferenceIO``, ``ProfileInfo`` with
``MinShape``/``OptShape``/``MaxShape``/``Format``), and the combined per-tensor
``Format/Datatype`` string was split into separate data type and format fields (the
11.0 migration index says "the split of the Format/DataType field"; NVIDIA's own
``trt-perf-analysis`` schema in the TensorRT 11.1 repository names the layer tensor
fields ``Datatype``, ``Format``, ``Dimensions``, ``StrideOrder``, ``Strides``).
:func:`layer_precisions` reads both layouts.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from collections import Counter
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from mmexport import __version__
from mmexport.artifacts import PRECISIONS, check_precision, engine_artifact
from mmexport.config import MAX_BATCH_SIZE, check_int
from mmexport.errors import CheckpointError, MissingDependencyError, MMExportError, one_line
from mmexport.fileio import is_sha256_hex, sha256_file
from mmexport.jsonread import parse_json, parse_json_object, read_json_object

SIDECAR_FORMAT = "mmexport-engine/1"
ENGINE_SUFFIX = ".plan"
SUPPORTED_TENSORRT_MAJORS: tuple[int, ...] = (10, 11)
MIN_TENSORRT = (10, 12)  # the first release that deprecated the weak-typing precision flags

GPU_INSTALL_HINT = "pip install 'mmexport[gpu]'"
CUDA_PYTHON_HINT = "pip install cuda-python"

# Hardware compatibility levels, as mmexport names them; values are the
# ``trt.HardwareCompatibilityLevel`` member names and trtexec's spelling.
HARDWARE_COMPATIBILITY: dict[str, tuple[str, str]] = {
    "none": ("NONE", "none"),
    "ampere+": ("AMPERE_PLUS", "ampere+"),
    "same-compute-capability": ("SAME_COMPUTE_CAPABILITY", "sameComputeCapability"),
}


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------
def engine_filename(precision: str) -> str:
    """``model.plan`` (fp32), ``model.fp16.plan``, ``model.int8.plan`` (the registry's names)."""
    check_precision(precision)
    return engine_artifact(precision).filename


def sidecar_path(engine_path: str | Path) -> Path:
    """The sidecar of an engine: the engine's file name + ``.json`` (``model.fp16.plan.json``)."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def rebuild_command(engine_path: str | Path, precision: str) -> str:
    """The command that rebuilds an engine of a run directory (the engine's folder)."""
    run_dir = Path(engine_path).parent
    return f"mmexport fold {shlex.quote(str(run_dir))} --to trt --precision {precision}"


# --------------------------------------------------------------------------------------------
# the plan header
# --------------------------------------------------------------------------------------------
PLAN_TAG = 0x74727466  # little-endian uint32 at offset 0, i.e. the bytes b"ftrt"
PLAN_HEADER_BYTES = 28


@dataclass(frozen=True)
class PlanHeader:
    """What the first bytes of a serialized engine say, without deserialising it.

    ``layout`` is the uint32 at offset 4 (trtexec calls it the serialization version
    and reads the TensorRT version only when it is 0). ``tensorrt_version`` is
    (major, minor, patch, build) from bytes 24..27, ``None`` for an unknown layout.
    ``archive_version`` is the uint32 at offset 8: reported on TensorRT 8.x as the
    "Serialized Engine Version" of the ``stdVersionRead == kSERIALIZATION_VERSION``
    assertion (NVIDIA/TensorRT issue #3073: 205 for 8.2.1, 213 for 8.4.3, 232 for
    8.5.3); this is a community observation, not documented, and not confirmed for
    TensorRT 10/11 -- it is recorded for diagnosis and never used to decide anything.
    """

    layout: int
    tensorrt_version: tuple[int, int, int, int] | None
    archive_version: int

    @property
    def tensorrt_version_text(self) -> str | None:
        return None if self.tensorrt_version is None else ".".join(str(p) for p in self.tensorrt_version)


def read_plan_header(data: bytes) -> PlanHeader:
    """Read a plan's header the way ``trtexec --loadEngine=F --getPlanVersionOnly`` does.

    Source: ``printPlanVersion`` in NVIDIA/TensorRT ``samples/common/sampleEngines.cpp``
    (identical in the v9.3, v10.0, v10.8, v10.16, v11.0 and v11.1 tags, and trtexec's
    help says it works "for engines created with 8.6 and forward"): the first 28
    bytes are read as little-endian uint32 words; word 0 must be the plan tag
    ``0x74727466`` (bytes ``b"ftrt"``); when word 1 is 0, bytes 24, 25, 26 and 27 are
    the TensorRT major, minor, patch and build numbers of the builder. Any other
    word-1 value is a layout trtexec does not know ("Serialization version is not
    supported"); it is returned with ``tensorrt_version=None``.

    Raises :class:`CheckpointError` (one line) for data too short or without the tag,
    e.g. an ONNX file or a plan wrapped in someone else's header.
    """
    if len(data) < PLAN_HEADER_BYTES:
        raise CheckpointError(f"not a TensorRT plan: {len(data)} bytes, the header alone is {PLAN_HEADER_BYTES}")
    tag, layout, archive = struct.unpack_from("<III", data, 0)
    if tag != PLAN_TAG:
        raise CheckpointError(
            f"not a TensorRT plan: it starts with {bytes(data[:4])!r}, a plan starts with b'ftrt' (tag 0x{PLAN_TAG:08x})"
        )
    version = tuple(data[24:28]) if layout == 0 else None
    return PlanHeader(layout=layout, tensorrt_version=version, archive_version=archive)  # type: ignore[arg-type]


def read_plan_header_file(path: str | Path) -> PlanHeader:
    with open(path, "rb") as handle:
        head = handle.read(PLAN_HEADER_BYTES)
    try:
        return read_plan_header(head)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# the sidecar
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the dynamic batch dimension of input ``image``."""
    min: int
    opt: int
    max: int

    def validate(self) -> "BatchProfile":
        values = (self.min, self.opt, self.max)
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            raise MMExportError(f"batch profile must be integers, got min={self.min!r} opt={self.opt!r} max={self.max!r}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise MMExportError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )
        # The maximum becomes Triton's max_batch_size and a TensorRT dimension: bounded, never an int32 overflow.
        check_int(self.max, "batch profile max", high=MAX_PROFILE_BATCH)
        return self

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def text(self) -> str:
        return f"{self.min}..{self.max} (opt {self.opt})"


@dataclass(frozen=True)
class BuildFlags:
    """The builder settings that change what an engine is or where it runs."""
    optimization_level: int = 3
    tf32: bool = False
    hardware_compatibility: str = "none"  # a key of HARDWARE_COMPATIBILITY
    version_compatible: bool = False
    workspace_bytes: int | None = None
    strongly_typed: bool = True


@dataclass(frozen=True)
class PrecisionSummary:
    """The sidecar's record of the built engine's layer precisions (see :class:`LayerPrecisionSummary`)."""
    layout: str  # "10.x", "11.x" or "unknown": the inspector JSON layout that was read
    counts: dict[str, int]  # layers per precision (all layers)
    compute_counts: dict[str, int]  # layers per precision, compute layers only
    unexpected: tuple[str, ...] = ()  # "layer name (type): precision", for the requested precision


@dataclass(frozen=True)
class EngineSidecar:
    """Everything needed to decide, without TensorRT, whether an engine may be loaded here."""
    tensorrt_version: str  # trt.__version__ of the builder, e.g. "10.16.1.11"
    plan_tensorrt_version: str | None  # what the plan header says (see read_plan_header)
    plan_layout: int
    plan_archive_version: int
    gpu_name: str
    compute_capability: tuple[int, int]
    cuda_runtime_version: int | None  # cudaRuntimeGetVersion(), e.g. 13050 for 13.5
    cuda_driver_version: int | None  # cudaDriverGetVersion()
    precision: str
    layer_precisions: PrecisionSummary
    batch_profile: BatchProfile
    image_size: int
    input_name: str
    build_flags: BuildFlags
    onnx_sha256: str
    engine_sha256: str
    model_metadata: dict[str, str]
    created: str
    mmexport_version: str = __version__
    format: str = SIDECAR_FORMAT

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        data["layer_precisions"]["unexpected"] = list(self.layer_precisions.unexpected)
        ordered = {"format": data.pop("format")}
        ordered.update(data)
        return ordered

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "sidecar") -> "EngineSidecar":
        """A sidecar from its JSON object, every field checked (:class:`_SidecarFields`); one-line :class:`CheckpointError`.

        A sidecar travels beside the engine and anyone who can replace the engine can edit it:
        its values reach ``config.pbtxt`` (the batch profile), file names (the compute
        capability) and the load decision (hashes, versions, build flags), so each is refused
        unless it has the type and range the builder writes.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: not an mmexport engine sidecar (a JSON object is expected)")
        fmt = data.get("format")
        if fmt != SIDECAR_FORMAT:
            shown = fmt if isinstance(fmt, (str, int, float, type(None))) else type(fmt).__name__
            raise CheckpointError(f"{source}: engine sidecar format {str(shown)[:80]!r} is not {SIDECAR_FORMAT!r}")
        fields = _SidecarFields(source)
        lp = fields.mapping(data, "layer_precisions", ("layout", "counts", "compute_counts"), ("unexpected",))
        bp = fields.mapping(data, "batch_profile", ("min", "opt", "max"))
        # a flag an older sidecar does not record takes the builder's default, as before
        defaults = {f.name: f.default for f in dataclass_fields(BuildFlags)}
        flags = {**defaults, **fields.mapping(data, "build_flags", (), tuple(defaults))}
        profile = BatchProfile(*(fields.integer(bp, f"batch_profile.{key}", key, low=1, high=MAX_PROFILE_BATCH)
                                 for key in ("min", "opt", "max")))
        try:
            profile.validate()
        except MMExportError as exc:
            raise CheckpointError(f"{source}: engine sidecar field batch_profile: {exc}") from None
        layout = fields.text(lp, "layer_precisions.layout", "layout")
        if layout not in INSPECTOR_LAYOUTS:
            raise CheckpointError(f"{source}: engine sidecar field layer_precisions.layout must be one of "
                                  f"{', '.join(INSPECTOR_LAYOUTS)}, got {layout[:40]!r}")
        precisions = PrecisionSummary(
            layout=layout,
            counts=fields.counts(lp, "layer_precisions.counts", "counts"),
            compute_counts=fields.counts(lp, "layer_precisions.compute_counts", "compute_counts"),
            unexpected=tuple(fields.text_list(lp, "layer_precisions.unexpected", "unexpected")) if "unexpected" in lp else (),
        )
        cc = fields.value(data, "compute_capability")
        if not isinstance(cc, list) or len(cc) != 2:
            raise CheckpointError(f"{source}: engine sidecar field compute_capability must be [major, minor], got "
                                  f"{_shown(cc)}")
        # minor is one digit: Triton's cc keys ("8.6") and the per-GPU plan names (model.sm86.plan) assume it
        compute_capability = (fields.integer(cc, "compute_capability[0]", 0, low=1, high=99),
                              fields.integer(cc, "compute_capability[1]", 1, low=0, high=9))
        build_flags = BuildFlags(
            optimization_level=fields.integer(flags, "build_flags.optimization_level", "optimization_level", low=0,
                                              high=MAX_OPTIMIZATION_LEVEL),
            tf32=fields.boolean(flags, "build_flags.tf32", "tf32"),
            hardware_compatibility=fields.text(flags, "build_flags.hardware_compatibility", "hardware_compatibility"),
            version_compatible=fields.boolean(flags, "build_flags.version_compatible", "version_compatible"),
            workspace_bytes=fields.integer(flags, "build_flags.workspace_bytes", "workspace_bytes", low=1,
                                           high=MAX_WORKSPACE_BYTES, optional=True),
            strongly_typed=fields.boolean(flags, "build_flags.strongly_typed", "strongly_typed"),
        )
        if build_flags.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise CheckpointError(
                f"{source}: engine sidecar has unknown hardware compatibility {build_flags.hardware_compatibility[:40]!r}"
            )
        sidecar = cls(
            tensorrt_version=fields.version(data, "tensorrt_version"),
            plan_tensorrt_version=fields.version(data, "plan_tensorrt_version", optional=True),
            plan_layout=fields.integer(data, "plan_layout", low=0, high=UINT32_MAX),
            plan_archive_version=fields.integer(data, "plan_archive_version", low=0, high=UINT32_MAX),
            gpu_name=fields.text(data, "gpu_name"),
            compute_capability=compute_capability,
            cuda_runtime_version=fields.integer(data, "cuda_runtime_version", low=0, high=MAX_CUDA_VERSION, optional=True),
            cuda_driver_version=fields.integer(data, "cuda_driver_version", low=0, high=MAX_CUDA_VERSION, optional=True),
            precision=fields.text(data, "precision"),
            layer_precisions=precisions,
            batch_profile=profile,
            image_size=fields.integer(data, "image_size", low=1, high=MAX_IMAGE_SIDE),
            input_name=fields.text(data, "input_name"),
            build_flags=build_flags,
            onnx_sha256=fields.sha256(data, "onnx_sha256"),
            engine_sha256=fields.sha256(data, "engine_sha256"),
            model_metadata=fields.string_map(data, "model_metadata"),
            created=fields.text(data, "created"),
            mmexport_version=fields.text(data, "mmexport_version"),
            format=SIDECAR_FORMAT,
        )
        check_precision(sidecar.precision, f"{source}: engine sidecar", CheckpointError)
        return sidecar

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "sidecar") -> "EngineSidecar":
        return cls.from_dict(parse_json_object(text, f"{source}: engine sidecar", error=CheckpointError), source)

    @classmethod
    def read(cls, path: str | Path) -> "EngineSidecar":
        path = Path(path)
        data = read_json_object(path, "engine sidecar", max_bytes=MAX_SIDECAR_BYTES,
                                missing=f"{path}: engine sidecar not found")
        return cls.from_dict(data, str(path))


# Bounds of the sidecar's fields: what a real build can write, with room to spare.
MAX_PROFILE_BATCH = MAX_BATCH_SIZE  # the largest batch profile mmexport builds or accepts (Triton's limit is int32)
MAX_OPTIMIZATION_LEVEL = 5  # TensorRT's builder optimization levels are 0-5
MAX_WORKSPACE_BYTES = 2**50
MAX_IMAGE_SIDE = 2**16
MAX_CUDA_VERSION = 999_999  # cudaRuntimeGetVersion's encoding, 1000 * major + 10 * minor
UINT32_MAX = 2**32 - 1
MAX_SIDECAR_BYTES = 4 * 2**20  # a real sidecar is about 2 kB
MAX_SIDECAR_TEXT = 65536  # characters of one text field (fused TensorRT layer names are long)
MAX_SIDECAR_ITEMS = 100_000  # entries of one list or map
INSPECTOR_LAYOUTS = ("10.x", "11.x", "unknown")
_VERSION_TEXT = re.compile(r"^[0-9]+(\.[0-9A-Za-z]+){0,5}$")  # TensorRT "10.16.1.11", "10.0.0b6"


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


class _SidecarFields:
    """Typed reads of a sidecar's fields; each refusal is one line naming the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, name: str, wanted: str, value: Any, *, shown: str | None = None) -> CheckpointError:
        return CheckpointError(f"{self.source}: engine sidecar field {name} must be {wanted}, "
                               f"got {shown or _shown(value)}")

    def value(self, data: Any, name: str, key: str | int | None = None) -> Any:
        key = name if key is None else key
        try:
            return data[key]
        except (KeyError, IndexError):
            raise CheckpointError(f"{self.source}: engine sidecar is missing {name!r}") from None

    def mapping(self, data: Mapping[str, Any], name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
                ) -> Mapping[str, Any]:
        value = self.value(data, name)
        if not isinstance(value, Mapping):
            raise self.fail(name, "an object", value)
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            raise CheckpointError(f"{self.source}: engine sidecar field {name} has unknown key {unknown[0][:40]!r}")
        for key in required:
            self.value(value, f"{name}.{key}", key)
        return value

    def integer(self, data: Any, name: str, key: str | int | None = None, *, low: int, high: int,
                optional: bool = False) -> int | None:
        value = self.value(data, name, key)
        if value is None and optional:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            raise self.fail(name, f"an integer from {low} to {high}", value, shown=f"an integer of {len(str(value))} digits")
        return check_int(value, f"{self.source}: engine sidecar field {name}", low=low, high=high, error=CheckpointError)

    def boolean(self, data: Any, name: str, key: str) -> bool:
        value = self.value(data, name, key)
        if not isinstance(value, bool):
            raise self.fail(name, "true or false", value)
        return value

    def text(self, data: Any, name: str, key: str | None = None) -> str:
        value = self.value(data, name, key)
        if not isinstance(value, str) or not value or len(value) > MAX_SIDECAR_TEXT or not value.isprintable():
            raise self.fail(name, f"1-{MAX_SIDECAR_TEXT} printable characters", value)
        return value

    def version(self, data: Any, name: str, *, optional: bool = False) -> str | None:
        value = self.value(data, name)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not _VERSION_TEXT.match(value):
            raise self.fail(name, "a version such as \"10.16.1.11\"", value)
        return value

    def sha256(self, data: Any, name: str) -> str:
        value = self.value(data, name)
        if not is_sha256_hex(value):
            raise self.fail(name, "64 lowercase hex digits (a sha256)", value)
        return value

    def text_list(self, data: Any, name: str, key: str) -> list[str]:
        """A list of bounded texts; TensorRT's own layer names are kept as they are (shown escaped, never parsed)."""
        value = self.value(data, name, key)
        if not isinstance(value, list) or len(value) > MAX_SIDECAR_ITEMS:
            raise self.fail(name, "a list of texts", value)
        for index, item in enumerate(value):
            if not isinstance(item, str) or len(item) > MAX_SIDECAR_TEXT:
                raise self.fail(f"{name}[{index}]", f"a text of at most {MAX_SIDECAR_TEXT} characters", item)
        return list(value)

    def counts(self, data: Any, name: str, key: str) -> dict[str, int]:
        value = self.value(data, name, key)
        if not isinstance(value, Mapping) or len(value) > MAX_SIDECAR_ITEMS:
            raise self.fail(name, "an object of layer counts", value)
        return {self.key(name, k): self.integer(value, f"{name}.{k}", k, low=0, high=UINT32_MAX) for k in value}

    def key(self, name: str, key: str) -> str:
        if not key or len(key) > MAX_SIDECAR_TEXT or not key.isprintable():
            raise self.fail(f"{name} (a key)", f"1-{MAX_SIDECAR_TEXT} printable characters", key)
        return key

    def string_map(self, data: Any, name: str) -> dict[str, str]:
        value = self.value(data, name)
        if not isinstance(value, Mapping) or len(value) > MAX_SIDECAR_ITEMS:
            raise self.fail(name, "an object of texts", value)
        result = {}
        for key, item in value.items():
            if not isinstance(item, str):
                raise self.fail(f"{name}.{key[:40]}", "a text", item)
            result[self.key(name, key)] = item
        return result




def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# the environment
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineEnvironment:
    """The TensorRT/CUDA/GPU this process would load an engine with."""
    tensorrt_version: str | None
    cuda_runtime_version: int | None
    cuda_driver_version: int | None
    gpu_name: str
    compute_capability: tuple[int, int]


def cuda_version_text(version: int | None) -> str:
    """13050 -> "13.5" (the encoding of cudaRuntimeGetVersion/cudaDriverGetVersion)."""
    if version is None:
        return "unknown"
    if version <= 0:
        return "none"
    return f"{version // 1000}.{(version % 1000) // 10}"


def import_tensorrt():
    """``import tensorrt`` or one line saying what to install (also used by the builder and runner)."""
    import importlib

    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        if getattr(exc, "name", None) == "tensorrt":
            raise MissingDependencyError(f"TensorRT is not installed: {GPU_INSTALL_HINT}") from None
        raise MissingDependencyError(
            f"TensorRT is installed but cannot be imported ({one_line(exc)}); reinstall it: {GPU_INSTALL_HINT}"
        ) from None
    except OSError as exc:  # a missing libnvinfer.so and friends
        raise MissingDependencyError(
            f"TensorRT is installed but its libraries cannot be loaded ({one_line(exc)}); reinstall it: {GPU_INSTALL_HINT}"
        ) from None


def tensorrt_version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    if not parts:
        raise MMExportError(f"cannot read the TensorRT version {version!r}")
    return tuple(parts)


def check_tensorrt_supported(version: str) -> int:
    """The major version when mmexport supports it (10.12+ and 11.x); one line otherwise."""
    parts = tensorrt_version_tuple(version)
    major = parts[0]
    if major not in SUPPORTED_TENSORRT_MAJORS or tuple(parts[:2]) < MIN_TENSORRT:
        raise MissingDependencyError(
            f"TensorRT {version} is not supported; mmexport needs TensorRT >= 10.12 or 11.x: {GPU_INSTALL_HINT}"
        )
    return major


def current_environment(device: int = 0, *, require_tensorrt: bool = True) -> EngineEnvironment:
    """Read the TensorRT version, CUDA runtime/driver versions and GPU of this process.

    CUDA facts come from ``cuda.bindings.runtime`` (cuda-python); torch's CUDA is the
    fallback. Raises :class:`MissingDependencyError` with one line when TensorRT, a
    CUDA binding or a GPU is missing.
    """
    trt_version = None
    if require_tensorrt:
        trt_version = str(import_tensorrt().__version__)
    import importlib

    try:
        runtime = importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        runtime = None
    first_error: MissingDependencyError | None = None
    if runtime is not None:
        try:
            return _environment_from_cuda_bindings(runtime, device, trt_version)
        except MissingDependencyError as exc:  # e.g. cuda-bindings 13 on a CUDA 12 driver: torch may still see the GPU
            first_error = exc
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        if first_error is not None:
            raise first_error from None
        raise MissingDependencyError(f"no CUDA Python binding found (cuda.bindings or torch): {CUDA_PYTHON_HINT}") from None
    if not torch.cuda.is_available():
        if first_error is not None:
            raise first_error from None
        raise MissingDependencyError("no NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")
    props = torch.cuda.get_device_properties(device)
    cuda = getattr(torch.version, "cuda", None)
    runtime_version = None
    if cuda:
        major, _, minor = cuda.partition(".")
        runtime_version = int(major) * 1000 + int(minor or 0) * 10
    driver = None
    get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get_driver is not None:
        try:
            driver = int(get_driver())
        except Exception:  # pragma: no cover - private API
            driver = None
    return EngineEnvironment(trt_version, runtime_version, driver, str(props.name), (int(props.major), int(props.minor)))


def _environment_from_cuda_bindings(runtime: Any, device: int, trt_version: str | None) -> EngineEnvironment:
    def call(name: str, *args: Any) -> Any:
        result = getattr(runtime, name)(*args)
        err, values = result[0], result[1:]
        if int(err) != 0:
            label = getattr(err, "name", str(int(err)))
            raise MissingDependencyError(f"no usable NVIDIA GPU: {name} failed with {label}")
        return values[0] if len(values) == 1 else values

    runtime_version = int(call("cudaRuntimeGetVersion"))
    driver_version = int(call("cudaDriverGetVersion"))
    if driver_version == 0:
        raise MissingDependencyError("no NVIDIA driver found (cudaDriverGetVersion returned 0); TensorRT needs a GPU")
    count = int(call("cudaGetDeviceCount"))
    if count <= device:
        raise MissingDependencyError(f"no NVIDIA GPU {device} visible ({count} device(s))")
    props = call("cudaGetDeviceProperties", device)
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    cc = (int(props.major), int(props.minor))
    return EngineEnvironment(trt_version, runtime_version, driver_version, str(name).strip(), cc)


# --------------------------------------------------------------------------------------------
# compatibility
# --------------------------------------------------------------------------------------------
def _cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def version_compatible_allows(built: str, running: str) -> bool:
    """TensorRT's rule for version-compatible engines (TensorRT 11.4.1 support matrix, "Engine Portability").

    A ``VERSION_COMPATIBLE`` engine runs on the same or a newer runtime of the same
    major version; across majors only 10 -> 11 (and 8 -> 10) are supported; never on
    an older runtime.
    """
    b, r = tensorrt_version_tuple(built), tensorrt_version_tuple(running)
    if r < b:
        return False
    return b[0] == r[0] or (b[0], r[0]) in {(10, 11), (8, 10)}


def compatibility_problems(
    sidecar: EngineSidecar, environment: EngineEnvironment, *, engine_sha256: str | None = None
) -> list[str]:
    """What makes loading this engine here unsafe or wrong (empty when it may be loaded).

    * the engine file's sha256 differs from the sidecar's (the engine was replaced or
      altered after the build, or the sidecar belongs to another engine);
    * the TensorRT version differs (any part: major.minor.patch.build) -- unless the
      engine is version-compatible and :func:`version_compatible_allows` the pair;
    * the compute capability differs -- unless the engine was built with hardware
      compatibility ``ampere+`` and this GPU is Ampere or newer (sm 8.0+). A
      ``same-compute-capability`` engine needs the same compute capability (another
      GPU model of that capability is fine).

    A different GPU model with the same compute capability is not a problem (see
    :func:`compatibility_warnings`).
    """
    problems: list[str] = []
    if engine_sha256 is not None and engine_sha256 != sidecar.engine_sha256:
        problems.append(
            f"the engine's sha256 {engine_sha256[:12]} is not the {sidecar.engine_sha256[:12]} recorded at build time "
            "(the file was changed after it was built)"
        )
    running = environment.tensorrt_version
    if running is not None and running != sidecar.tensorrt_version:
        if sidecar.build_flags.version_compatible:
            if not version_compatible_allows(sidecar.tensorrt_version, running):
                problems.append(
                    f"it was built version-compatible with TensorRT {sidecar.tensorrt_version}, which TensorRT {running} "
                    "cannot load (only the same or a newer runtime of the same major, or 10 -> 11)"
                )
        else:
            problems.append(f"it was built with TensorRT {sidecar.tensorrt_version}, this is TensorRT {running}")
    built_cc, here_cc = tuple(sidecar.compute_capability), tuple(environment.compute_capability)
    level = sidecar.build_flags.hardware_compatibility
    if level == "ampere+":
        if here_cc < (8, 0):
            problems.append(
                f"it was built for Ampere and newer GPUs (ampere+) and this GPU ({environment.gpu_name}) "
                f"has compute capability {_cc(here_cc)}"  # type: ignore[arg-type]
            )
    elif built_cc != here_cc:
        problems.append(
            f"it was built for compute capability {_cc(built_cc)} ({sidecar.gpu_name}), this GPU "  # type: ignore[arg-type]
            f"({environment.gpu_name}) has {_cc(here_cc)}"  # type: ignore[arg-type]
        )
    return problems


def compatibility_warnings(sidecar: EngineSidecar, environment: EngineEnvironment) -> list[str]:
    """Differences that do not stop loading but may cost speed: another GPU model, another CUDA major."""
    warnings: list[str] = []
    if environment.gpu_name != sidecar.gpu_name and tuple(environment.compute_capability) == tuple(sidecar.compute_capability):
        warnings.append(
            f"the engine was tuned on {sidecar.gpu_name} and runs on {environment.gpu_name} (same compute capability "
            f"{_cc(sidecar.compute_capability)}); rebuild it here for the best kernels"
        )
    built, here = sidecar.cuda_runtime_version, environment.cuda_runtime_version
    if built and here and built // 1000 != here // 1000:
        warnings.append(
            f"the engine was built with CUDA {cuda_version_text(built)}, this process uses CUDA {cuda_version_text(here)}"
        )
    return warnings


def check_engine(
    engine_path: str | Path, *, environment: EngineEnvironment | None = None, data: bytes | None = None
) -> EngineSidecar:
    """Read the sidecar, hash the engine and compare both with this machine, before any deserialisation.

    ``data``: the engine's bytes when the caller already read them (the loader does, so
    that what is checked is exactly what is deserialised). ``environment``: this
    machine (default :func:`current_environment`). Returns the sidecar. Raises
    :class:`CheckpointError` with one line naming every difference and the command that
    rebuilds the engine.
    """
    import hashlib

    path = Path(engine_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: engine not found")
    side = sidecar_path(path)
    if not side.is_file():
        guess = _precision_from_name(path.name)
        raise CheckpointError(
            f"{path}: its sidecar {side.name} is missing, so nothing says where it can run; rebuild it: "
            f"{rebuild_command(path, guess)}"
        )
    sidecar = EngineSidecar.read(side)
    if data is None:
        header = read_plan_header_file(path)
        digest = sha256_file(path)
    else:
        try:
            header = read_plan_header(data)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
    problems = plan_header_problems(header, sidecar)
    env = environment if environment is not None else current_environment()
    problems += compatibility_problems(sidecar, env, engine_sha256=digest)
    if problems:
        raise CheckpointError(
            f"{path}: cannot be loaded here: {'; '.join(problems)}; rebuild it: {rebuild_command(path, sidecar.precision)}"
        )
    return sidecar


def plan_header_problems(header: PlanHeader, sidecar: EngineSidecar) -> list[str]:
    """Where a plan's header contradicts its sidecar (empty when it does not): the check of the bytes themselves.

    A sidecar's ``engine_sha256`` only proves the sidecar was written for these bytes; the
    header proves they are a TensorRT plan of the version the sidecar names. Used by
    :func:`check_engine` (before loading) and by everything that publishes an engine
    without loading it (the Triton export), so both refuse the same files.
    """
    recorded = sidecar.plan_tensorrt_version
    if header.tensorrt_version is not None and recorded is not None and header.tensorrt_version_text != recorded:
        return [f"its plan header says TensorRT {header.tensorrt_version_text}, the sidecar says {recorded}"]
    return []


def check_plan_file(path: str | Path, sidecar: EngineSidecar) -> PlanHeader:
    """``path``'s plan header, checked to be a plan's and to agree with ``sidecar``; one-line :class:`CheckpointError`."""
    try:
        header = read_plan_header_file(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or one_line(exc)})") from None
    problems = plan_header_problems(header, sidecar)
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; rebuild it: {rebuild_command(path, sidecar.precision)}")
    return header


def _precision_from_name(name: str) -> str:
    for precision in ("fp16", "int8"):
        if f".{precision}." in name:
            return precision
    return "fp32"


# --------------------------------------------------------------------------------------------
# engine inspector JSON -> layer precisions
# --------------------------------------------------------------------------------------------
PRECISION_RULE = """\
A layer's precision is the data type of its first input that is not a network input
(TREx, NVIDIA's trt-engine-explorer, uses the first input; skipping network inputs
keeps a cast fused into the first compute layer from counting as fp32), else of its
first output that is not a network output, else of its first tensor.
Exempt layers: data movement (Reformat, NoOp, Shuffle, Cast, Identity, Constant,
Shape, Slice, Concatenation, Gather, Squeeze, Unsqueeze, and TensorRT's
"Reformatting CopyNode" layers) -- these are the I/O reformats and casts an fp16 or
int8 engine with fp32 inputs and outputs needs -- and layers whose precision is not
a floating-point or int8 type (int32/int64/bool shape arithmetic).
Every other layer is a compute layer. fp32 and fp16 engines: every compute layer
must run in fp32 resp. fp16. int8 engines: every convolution / matrix-multiply layer
(LayerType or ParameterType naming Convolution, Gemm, MatrixMultiply,
FullyConnected, or a gemm/conv tactic) must run in int8, and the other compute
layers may run in int8, fp16 or fp32 (explicit Q/DQ graphs keep the ops they do not
quantize in floating point). An engine with no compute layer, or built without
detailed profiling verbosity (no tensor types), is refused: nothing confirms its
precision.
"""

_DTYPE_TOKENS: dict[str, str] = {
    "fp32": "fp32", "float": "fp32", "float32": "fp32",
    "fp16": "fp16", "half": "fp16", "float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "int8": "int8", "uint8": "uint8", "int4": "int4",
    "int32": "int32", "int64": "int64", "bool": "bool",
    "fp8": "fp8", "fp4": "fp4", "fp4e2m1": "fp4", "e8m0": "e8m0",
    "double": "fp64", "fp64": "fp64", "int16": "int16", "uint16": "uint16",
}
FLOAT_PRECISIONS = frozenset({"fp32", "fp16", "bf16", "fp8", "fp4", "fp64", "int8", "int4"})
_DATA_MOVEMENT = frozenset(
    t.lower()
    for t in ("Reformat", "NoOp", "Shuffle", "Cast", "Identity", "Constant", "Shape", "Slice", "Concatenation",
              "Gather", "Squeeze", "Unsqueeze")
)
_HEAVY = re.compile(r"convolution|gemm|matrixmultiply|fullyconnected", re.IGNORECASE)
_HEAVY_TACTIC = re.compile(r"gemm|conv|fprop", re.IGNORECASE)


def dtype_from_text(text: Any) -> str | None:
    """fp32/fp16/bf16/int8/... from an inspector type or format string ("Row major linear FP32", "Half")."""
    if not isinstance(text, str):
        return None
    for token in re.split(r"[^0-9A-Za-z]+", text):
        found = _DTYPE_TOKENS.get(token.lower())
        if found:
            return found
    return None


@dataclass(frozen=True)
class LayerRecord:
    name: str
    layer_type: str
    precision: str | None
    category: str  # "compute", "data-movement", "shape"
    heavy: bool  # convolution / matrix multiply


@dataclass(frozen=True)
class LayerPrecisionSummary:
    layout: str  # "10.x", "11.x", "unknown"
    detailed: bool  # False when the engine was built without ProfilingVerbosity.DETAILED
    layers: tuple[LayerRecord, ...]
    io_tensors: tuple[str, ...]

    def counts(self, *, compute_only: bool = False) -> dict[str, int]:
        counter = Counter(
            layer.precision or "unknown" for layer in self.layers if not compute_only or layer.category == "compute"
        )
        return dict(sorted(counter.items()))

    def unexpected(self, requested: str) -> list[LayerRecord]:
        """Compute layers that do not run in the requested precision (the rule: :data:`PRECISION_RULE`)."""
        check_precision(requested)
        bad: list[LayerRecord] = []
        for layer in self.layers:
            if layer.category != "compute":
                continue
            if requested == "int8":
                if layer.heavy and layer.precision != "int8":
                    bad.append(layer)
                elif not layer.heavy and layer.precision not in ("int8", "fp16", "fp32"):
                    bad.append(layer)
            elif layer.precision != requested:
                bad.append(layer)
        return bad

    def to_sidecar(self, requested: str) -> PrecisionSummary:
        return PrecisionSummary(
            layout=self.layout,
            counts=self.counts(),
            compute_counts=self.counts(compute_only=True),
            unexpected=tuple(f"{layer.name} ({layer.layer_type}): {layer.precision or 'unknown'}"
                             for layer in self.unexpected(requested)),
        )


def _tensor_dtype(tensor: Any) -> str | None:
    if not isinstance(tensor, Mapping):
        return None
    for key in ("Datatype", "DataType", "Data Type"):
        if key in tensor:
            found = dtype_from_text(tensor[key])
            if found:
                return found
    return dtype_from_text(tensor.get("Format/Datatype"))


def _tensors(layer: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = layer.get(key)
    return [t for t in value if isinstance(t, Mapping)] if isinstance(value, list) else []


def _layer_precision(layer: Mapping[str, Any], io_names: set[str]) -> str | None:
    inputs, outputs = _tensors(layer, "Inputs"), _tensors(layer, "Outputs")
    for group in ([t for t in inputs if t.get("Name") not in io_names], [t for t in outputs if t.get("Name") not in io_names],
                  inputs, outputs):
        for tensor in group:
            found = _tensor_dtype(tensor)
            if found:
                return found
    return None


def _layer_category(layer: Mapping[str, Any], precision: str | None) -> str:
    name = str(layer.get("Name", ""))
    types = {str(layer.get("LayerType", "")).lower(), str(layer.get("ParameterType", "")).lower()}
    if types & _DATA_MOVEMENT or name.startswith("Reformatting CopyNode"):
        return "data-movement"
    if precision is not None and precision not in FLOAT_PRECISIONS:
        return "shape"
    return "compute"


def _is_heavy(layer: Mapping[str, Any]) -> bool:
    kinds = f"{layer.get('LayerType', '')} {layer.get('ParameterType', '')}"
    if _HEAVY.search(kinds):
        return True
    return bool(_HEAVY_TACTIC.search(str(layer.get("TacticName", ""))))


def layer_precisions(inspector_json: str) -> LayerPrecisionSummary:
    """Per-layer precisions from ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    Reads the TensorRT 10.x layout (``{"Layers": [...], "Bindings": [names]}``, tensors
    with ``Format/Datatype``) and the 11.x one (``{"Layers": [...], "I/O Tensors":
    [objects]}``, tensors with separate ``Datatype``/``Format``), and a bare list of
    layers. Layers given as plain strings (an engine built without
    ``ProfilingVerbosity.DETAILED``) give ``detailed=False``.
    """
    data = parse_json(inspector_json, "engine inspector output", error=MMExportError)
    io_names: list[str] = []
    layout = "unknown"
    if isinstance(data, Mapping):
        layers = data.get("Layers")
        if isinstance(data.get("I/O Tensors"), list):
            layout = "11.x"
            io_names = [str(t.get("Name")) for t in data["I/O Tensors"] if isinstance(t, Mapping)]
        elif isinstance(data.get("Bindings"), list):
            layout = "10.x"
            io_names = [str(name) for name in data["Bindings"]]
    else:
        layers = data
    if not isinstance(layers, list):
        raise MMExportError("engine inspector output has no layer list")
    records: list[LayerRecord] = []
    detailed = bool(layers) and all(isinstance(layer, Mapping) for layer in layers)
    io_set = set(io_names)
    for index, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            records.append(LayerRecord(str(layer), "unknown", None, "compute", False))
            continue
        if layout == "unknown":
            tensors = _tensors(layer, "Inputs") + _tensors(layer, "Outputs")
            if any("Format/Datatype" in t for t in tensors):
                layout = "10.x"
            elif any(("Datatype" in t or "DataType" in t) for t in tensors):
                layout = "11.x"
        precision = _layer_precision(layer, io_set)
        records.append(
            LayerRecord(
                name=str(layer.get("Name", f"layer {index}")),
                layer_type=str(layer.get("LayerType") or layer.get("ParameterType") or "unknown"),
                precision=precision,
                category=_layer_category(layer, precision),
                heavy=_is_heavy(layer),
            )
        )
    if detailed and not any(r.precision for r in records):
        detailed = False
    return LayerPrecisionSummary(layout=layout, detailed=detailed, layers=tuple(records), io_tensors=tuple(io_names))


def precision_problems(summary: LayerPrecisionSummary, requested_precision: str) -> list[str]:
    """Why an engine does not run in the requested precision (empty when it does); the rule is :data:`PRECISION_RULE`."""
    check_precision(requested_precision)
    if not summary.detailed:
        return [
            "the engine has no per-layer types (built without ProfilingVerbosity.DETAILED), "
            f"so nothing confirms it runs in {requested_precision}"
        ]
    compute = [layer for layer in summary.layers if layer.category == "compute"]
    if not compute:
        return [f"the engine has no compute layer to confirm it runs in {requested_precision}"]
    bad = summary.unexpected(requested_precision)
    if not bad:
        return []
    found = Counter(layer.precision or "unknown" for layer in bad)
    found_text = ", ".join(f"{n} in {p}" for p, n in sorted(found.items()))
    examples = ", ".join(f"{layer.name} ({layer.precision or 'unknown'})" for layer in bad[:3])
    what = "convolution/matrix-multiply layers" if requested_precision == "int8" else "compute layers"
    return [
        f"{len(bad)} of {len(compute)} compute layers do not run in {requested_precision} ({found_text}; e.g. {examples}); "
        f"the {what} of {_article(requested_precision)} {requested_precision} engine must run in {requested_precision}"
    ]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" or word.startswith(("fp", "int8")) else "a"


__all__ = [
    "BatchProfile",
    "BuildFlags",
    "EngineEnvironment",
    "EngineSidecar",
    "HARDWARE_COMPATIBILITY",
    "LayerPrecisionSummary",
    "LayerRecord",
    "PRECISIONS",
    "PRECISION_RULE",
    "PlanHeader",
    "PrecisionSummary",
    "SIDECAR_FORMAT",
    "check_engine",
    "check_plan_file",
    "check_tensorrt_supported",
    "compatibility_problems",
    "compatibility_warnings",
    "current_environment",
    "cuda_version_text",
    "dtype_from_text",
    "engine_filename",
    "import_tensorrt",
    "layer_precisions",
    "plan_header_problems",
    "precision_problems",
    "read_plan_header",
    "read_plan_header_file",
    "rebuild_command",
    "sidecar_path",
    "utc_now",
    "version_compatible_allows",
]
