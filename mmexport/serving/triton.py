"""Triton Inference Server model repositories of a run's deployable artifacts.

:func:`export_repository` writes one model folder of a Triton model repository::

    DIR/
      <name>/
        config.pbtxt          # Triton's model configuration (this module writes the text)
        labels.txt            # one class per line, wired to the logits output (label_filename)
        1/                    # a version: every export adds one (1, 2, ...), nothing is overwritten
          model.onnx          # onnxruntime backend; model.plan (+ model.plan.json) for tensorrt;
          mmexport.json       #   model.py + the artifact for the python backend
          model_card.md       # the run's model card as it was at export (hashed in mmexport.json)
        2/ ...

``mmexport.json`` in each version is the provenance excerpt of what the version holds:
the run and artifact it came from, the sha256 of every copied file, the artifact's
manifest entry and verification records, and the model's metadata (the flat layout of
:meth:`mmexport.runtime.ModelInfo.to_metadata`). Only artifacts whose run manifest
records ``verified: true`` are exported.

Backends:

* ``onnxruntime`` -- ``platform: "onnxruntime_onnx"``, ``KIND_CPU`` by default;
* ``tensorrt`` -- ``platform: "tensorrt_plan"``, ``KIND_GPU``; ``max_batch_size`` is the
  engine's optimisation-profile maximum (Triton refuses a larger one); engines for
  several GPUs are mapped with ``cc_model_filenames`` (compute capability -> plan);
* ``python`` -- Triton's Python backend running ``model.py``
  (:mod:`mmexport.serving.python_model`), which serves the artifact through
  :mod:`mmexport.runtime` (ONNX Runtime, or TensorRT for an engine). With
  ``preprocess=True`` the same model also takes encoded PNG/JPEG bytes and applies the
  model's own recorded preprocessing on the server.

Why one Python model with two optional inputs rather than an ensemble
(preprocessing model -> classifier): the preprocessing block and the network run in
the same process through the same :class:`~mmexport.runtime.Predictor` that the
run's verification used, so there is one hop, no tensor copy between models, one
version to roll, and the exact pipeline that produced the reported accuracy; an
ensemble would only pay off with a native GPU classifier behind a CPU
preprocessing step, which the ``tensorrt`` repository plus client-side (or a custom)
preprocessing already covers.

Each version is built in a hidden folder inside ``DIR/<name>/`` and renamed into place
when complete, so Triton never sees half a version. ``config.pbtxt`` and ``labels.txt``
belong to the model, not to a version: a new export whose interface (backend, inputs,
outputs, classes) differs from the versions already there is refused -- export it under
another name. Triton's default version policy serves the newest version.

This module needs neither PyTorch nor Triton: ``onnx`` reads the model's signature.
:func:`parse_config` (Triton's own schema) needs ``tritonclient[grpc]``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmexport import __version__, artifacts
from mmexport.config import MAX_BATCH_SIZE, check_int
from mmexport.convert.onnxfile import OUTPUT_NAME, get_metadata, load_onnx
from mmexport.errors import CheckpointError, MissingDependencyError, MMExportError, RunDirError
from mmexport.fileio import sha256_file, write_bytes_atomic
from mmexport.progress import ProgressSink, sink
from mmexport.runs.lock import writing
from mmexport.runs.manifest import MANIFEST_NAME, RunDir, _now
from mmexport.runs.model_card import MODEL_CARD_NAME
from mmexport.runs.verify import describes_run
from mmexport.runtime.engine import EngineSidecar, check_plan_file
from mmexport.runtime.modelinfo import ModelInfo, check_class_names
from mmexport.serving.version_record import RECORD_FORMAT, VERSION_RECORD, check_version_files, read_version_record

BACKENDS: tuple[str, ...] = ("onnxruntime", "tensorrt", "python")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "python": None}
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
DEFAULT_MAX_BATCH = 32  # max_batch_size of a dynamic-batch ONNX unless the user gives one (= runtime.DEFAULT_BATCH)
# The largest max_batch_size written into a config (Triton's own field is an int32; a larger value makes the
# server refuse the model after the export "succeeded"). Also the cap of an engine's batch profile.
MAX_TRITON_BATCH = MAX_BATCH_SIZE
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
PYTHON_MODEL_FILE = "model.py"
PYTHON_MODEL_SOURCE = Path(__file__).with_name("python_model.py")
IMAGE_INPUT = "image"
BYTES_INPUT = "image_bytes"
OUTPUT = "logits"
ONNX_FILE = "model.onnx"  # Triton's default model file names
PLAN_FILE = "model.plan"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_PARTIAL_PREFIX = ".mmexport-partial-"

# ONNX TensorProto element types -> Triton data types (the ones an image classifier's I/O can have).
_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------
def sanitize_name(text: str) -> str:
    """A valid model name from any text (a run directory's name): other characters become ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("._-")[:128]
    return cleaned or "model"


def check_name(name: str) -> str:
    """A user-given model name: letters, digits, ``_ . -``, starting with a letter or digit (it is a folder and a URL part)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise MMExportError(
            f"invalid Triton model name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


# --------------------------------------------------------------------------------------------
# the config text
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model config; ``dims`` exclude the batch dimension when max_batch_size > 0."""
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False
    label_filename: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims), "optional": self.optional,
                "label_filename": self.label_filename}


@dataclass(frozen=True)
class ModelConfigSpec:
    """Everything :func:`config_text` writes; a plain value, easy to compare and test."""
    name: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instance_kind: str = "KIND_CPU"
    instance_count: int = 1
    default_model_filename: str | None = None
    cc_model_filenames: Mapping[str, str] = field(default_factory=dict)
    dynamic_batching: bool = True
    parameters: Mapping[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> str | None:
        return PLATFORMS[self.backend]


def _quote(text: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise MMExportError(f"cannot write {text!r} into a model config (control characters)")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_text(tensor: TensorSpec) -> str:
    parts = [f"name: {_quote(tensor.name)}", f"data_type: {tensor.data_type}",
             "dims: [ " + ", ".join(str(d) for d in tensor.dims) + " ]"]
    if tensor.optional:
        parts.append("optional: true")
    if tensor.label_filename:
        parts.append(f"label_filename: {_quote(tensor.label_filename)}")
    return "  {\n" + "".join(f"    {p}\n" for p in parts) + "  }"


def config_text(spec: ModelConfigSpec) -> str:
    """The ``config.pbtxt`` of ``spec`` (protobuf text format of Triton's ``ModelConfig``)."""
    if spec.backend not in BACKENDS:
        raise MMExportError(f"unknown Triton backend {spec.backend!r}; choose one of {', '.join(BACKENDS)}")
    lines = [f"name: {_quote(spec.name)}"]
    if spec.platform:
        lines.append(f"platform: {_quote(spec.platform)}")
    else:
        lines.append(f"backend: {_quote(spec.backend)}")
    lines.append(f"max_batch_size: {int(spec.max_batch_size)}")
    if spec.default_model_filename:
        lines.append(f"default_model_filename: {_quote(spec.default_model_filename)}")
    for cc, filename in sorted(spec.cc_model_filenames.items()):
        lines.append(f"cc_model_filenames {{ key: {_quote(cc)} value: {_quote(filename)} }}")
    lines.append("input [\n" + ",\n".join(_tensor_text(t) for t in spec.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_text(t) for t in spec.outputs) + "\n]")
    if spec.dynamic_batching and spec.max_batch_size > 0:
        lines.append("dynamic_batching { }")
    lines.append(f"instance_group [\n  {{\n    count: {int(spec.instance_count)}\n    kind: {spec.instance_kind}\n  }}\n]")
    for key, value in sorted(spec.parameters.items()):
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(str(value))} }} }}")
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> Any:
    """Parse config text with Triton's own schema: a ``tritonclient.grpc.model_config_pb2.ModelConfig``.

    Raises :class:`MMExportError` (one line) for text the schema rejects, and
    :class:`MissingDependencyError` without ``tritonclient[grpc]``.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingDependencyError("reading Triton model configs needs tritonclient: pip install 'tritonclient[grpc]'") from None
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise MMExportError(f"not a valid Triton model config ({' '.join(str(exc).split())})") from None
    return config


# --------------------------------------------------------------------------------------------
# the artifact to export
# --------------------------------------------------------------------------------------------
@dataclass
class SourceArtifact:
    """A deployable file, what it takes and gives, and where its verification is recorded."""
    path: Path
    kind: str  # "onnx" or "plan"
    sha256: str
    info: ModelInfo
    metadata: dict[str, str]
    input_name: str
    input_type: str  # Triton data type
    output_name: str
    output_type: str
    fixed_batch: int | None  # a static batch dimension (None: dynamic)
    batch_limit: int | None  # the most images one call takes (engine profile max, fixed batch), None: unbounded
    run: RunDir | None = None
    name: str = ""  # the run-relative file name
    registry_key: str | None = None
    entry: dict[str, Any] | None = None  # the run manifest's record of the file
    verification: list[dict[str, Any]] = field(default_factory=list)
    sidecar: Path | None = None
    engine: Any = None  # EngineSidecar
    verified: bool | None = None  # None: a file outside any run (allow_untracked)

    @property
    def compute_capability(self) -> str | None:
        if self.engine is None:
            return None
        major, minor = self.engine.compute_capability
        return f"{major}.{minor}"

    def describe(self) -> str:
        return f"{self.run.path.name}/{self.name}" if self.run is not None else str(self.path)


def _onnx_signature(path: Path) -> tuple[dict[str, str], tuple, tuple]:

    model = load_onnx(path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise CheckpointError(f"{path}: expected one image input and one logits output, the graph has "
                              f"{len(inputs)} input(s) and {len(outputs)} output(s)")

    def describe(value) -> tuple[str, int, tuple]:
        tensor = value.type.tensor_type
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return value.name, int(tensor.elem_type), dims

    return get_metadata(model), describe(inputs[0]), describe(outputs[0])


def _triton_type(elem_type: int, path: Path) -> str:
    try:
        return _ONNX_TO_TRITON[elem_type]
    except KeyError:
        raise CheckpointError(f"{path}: unsupported ONNX tensor type {elem_type} for a Triton model") from None


def _refuse_marked(metadata: Mapping[str, str], path: Path) -> None:
    reason = metadata.get("mmexport_unverified")
    if reason:
        raise RunDirError(f"{path}: published without passing its verification ({reason.split(';')[0]}); refusing to export it")


def _read_onnx(path: Path) -> dict[str, Any]:
    metadata, (in_name, in_type, in_dims), (out_name, out_type, out_dims) = _onnx_signature(path)
    _refuse_marked(metadata, path)
    info = ModelInfo.from_metadata(metadata, str(path))
    size = info.image_size
    if len(in_dims) != 4 or tuple(in_dims[1:]) != (3, size, size):
        shown = " x ".join("N" if d is None else str(d) for d in in_dims)
        raise CheckpointError(f"{path}: the model takes {shown}, its metadata says N x 3 x {size} x {size}")
    if len(out_dims) != 2 or (out_dims[1] is not None and out_dims[1] != info.num_classes):
        raise CheckpointError(f"{path}: the output {out_name} has shape {list(out_dims)}, "
                              f"the metadata names {info.num_classes} classes")
    fixed = in_dims[0] if in_dims[0] is not None and in_dims[0] > 0 else None
    return dict(kind="onnx", info=info, metadata=metadata, input_name=in_name, input_type=_triton_type(in_type, path),
                output_name=out_name, output_type=_triton_type(out_type, path), fixed_batch=fixed, batch_limit=fixed)


def _read_plan(path: Path, sidecar_file: Path, sha: str) -> dict[str, Any]:

    sidecar = EngineSidecar.read(sidecar_file)
    if sidecar.engine_sha256 != sha:
        raise CheckpointError(f"{path}: its sidecar {sidecar_file.name} describes another engine (sha256 differs)")
    # A matching hash only ties the sidecar to these bytes; the header says they are a plan at all
    # (the check `verify` makes before loading), so random bytes are not exported as an engine.
    check_plan_file(path, sidecar)
    _refuse_marked(sidecar.model_metadata, path)
    info = ModelInfo.from_metadata(sidecar.model_metadata, str(path))
    if sidecar.image_size != info.image_size:
        raise CheckpointError(f"{path}: the sidecar says {sidecar.image_size} px, the model metadata {info.image_size} px")
    # Engines are built from mmexport's ONNX export: fp32 I/O (fp16/int8 compute inside), output "logits".
    return dict(kind="plan", info=info, metadata=dict(sidecar.model_metadata), input_name=sidecar.input_name,
                input_type="TYPE_FP32", output_name=OUTPUT_NAME, output_type="TYPE_FP32", fixed_batch=None,
                batch_limit=sidecar.batch_profile.max, engine=sidecar, sidecar=sidecar_file)


def _run_containing(path: Path) -> RunDir | None:
    if not (path.parent / MANIFEST_NAME).is_file():
        return None
    return RunDir.open(path.parent)


def _from_run(run: RunDir, name: str) -> SourceArtifact:
    row = artifacts.by_filename(name)
    if row is None or not row.deployable or row.runner not in ("onnxruntime", "tensorrt") or name != row.filename:
        raise MMExportError(f"{run.path / name}: not a deployable artifact of the run (deployable: "
                            f"{', '.join(r.filename for r in artifacts.deployable() if r.runner != 'torch')})")
    entry = run.manifest.get("outputs", {}).get(name)
    if entry is None:
        raise RunDirError(f"{run.path}: has no {name}; make it with `{row.made_by.replace('RUN', str(run.path))}`")
    if entry.get("verified") is not True:
        why = entry.get("unverified_reason") or "the manifest records no passed verification"
        raise RunDirError(f"{run.path / name}: not verified ({' '.join(str(why).split())[:300]}); "
                          "only artifacts whose manifest entry says verified: true are exported")
    path = run.checked_file(name)
    sha = entry["sha256"]
    if row.format == "onnx":
        facts = _read_onnx(path)
    else:
        sidecar_name = row.sidecar or f"{name}.json"
        facts = _read_plan(path, run.checked_file(sidecar_name), sha)
    # labels.txt and the preprocessing a repository serves come from the file: it must describe the run's model
    describes_run(run, name, facts["metadata"])
    records = [dict(r) for r in run.manifest.get("verification", []) if r.get("artifact") == name]
    return SourceArtifact(path=path, sha256=sha, run=run, name=name, registry_key=row.key, entry=dict(entry),
                          verification=records, verified=True, **facts)


def _from_file(path: Path, allow_untracked: bool) -> SourceArtifact:
    run = _run_containing(path)
    if run is not None:
        if path.name not in run.manifest.get("outputs", {}):
            raise RunDirError(f"{path}: not recorded in the manifest of the run {run.path} (refusing an untracked file)")
        return _from_run(run, path.name)
    if not allow_untracked:
        raise RunDirError(f"{path}: not inside a run directory, so its verification cannot be checked; "
                          "export from the run (or pass allow_untracked / --allow-untracked to accept it as it is)")
    sha = sha256_file(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        facts = _read_onnx(path)
    elif suffix in (".plan", ".engine"):
        facts = _read_plan(path, path.with_name(path.name + ".json"), sha)
    else:
        raise CheckpointError(f"{path}: not a deployable model (expected .onnx, or a TensorRT .plan with its sidecar)")
    return SourceArtifact(path=path, sha256=sha, name=path.name, verified=None, **facts)


def resolve_artifact(source: str | os.PathLike[str], *, backend: str = "onnxruntime", precision: str = "fp32",
                     artifact: str | None = None, allow_untracked: bool = False) -> SourceArtifact:
    """The artifact to export: a run directory's ``onnx-<precision>`` (``trt-<precision>`` for ``tensorrt``), a run's
    artifact named by registry key (``artifact="trt-fp16"``), or a file (inside a run: checked against its manifest)."""
    _check_backend(backend)
    target = Path(source).expanduser().absolute()
    if target.is_dir():
        run = RunDir.open(target)
        if artifact is None:
            artifact = (artifacts.engine_artifact(precision) if backend == "tensorrt" else artifacts.onnx_artifact(precision)).key
        found = _from_run(run, artifacts.artifact(artifact).filename)
    elif target.is_file():
        if artifact is not None:
            raise MMExportError("artifact= picks a file of a run directory; pass the run directory, not a file")
        found = _from_file(target, allow_untracked)
    else:
        raise MMExportError(f"{target}: no such run directory or model file")
    if backend == "onnxruntime" and found.kind != "onnx":
        raise MMExportError(f"{found.describe()}: the onnxruntime backend serves ONNX files, not TensorRT engines")
    if backend == "tensorrt" and found.kind != "plan":
        raise MMExportError(f"{found.describe()}: the tensorrt backend serves TensorRT engines (.plan); "
                            "build one with `mmexport fold RUN --to trt`")
    return found


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise MMExportError(f"unknown Triton backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


# --------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepositoryResult:
    """One exported model version: where it is, what it serves, and the files it holds (path -> sha256)."""
    repository: Path
    name: str
    version: int
    model_dir: Path
    version_dir: Path
    config_path: Path
    labels_path: Path
    record_path: Path
    backend: str
    platform: str | None
    max_batch_size: int
    preprocess: bool
    source: Path
    run: Path | None
    artifact: str  # the run-relative (or file) name of what was exported
    verified: bool | None  # None: an untracked file (allow_untracked)
    files: dict[str, str]  # relative to model_dir -> sha256
    config_text: str
    config_changed: bool  # config.pbtxt was created or its text changed
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    compute_capabilities: dict[str, str] = field(default_factory=dict)  # "8.6" -> plan file (tensorrt)


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"))


def _interface(backend: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], classes: Sequence[str]) -> dict:
    return {"backend": backend, "inputs": [t.as_dict() for t in inputs], "outputs": [t.as_dict() for t in outputs],
            "classes": list(classes)}


def _instance_kind(instance_kind: str | None, backend: str, source: SourceArtifact) -> str:
    if instance_kind is None:
        return "KIND_GPU" if backend == "tensorrt" or source.kind == "plan" else "KIND_CPU"
    key = instance_kind.lower().removeprefix("kind_")
    if key not in INSTANCE_KINDS:
        raise MMExportError(f"unknown instance kind {instance_kind!r}; choose cpu or gpu")
    kind = INSTANCE_KINDS[key]
    if kind == "KIND_CPU" and source.kind == "plan":
        raise MMExportError("a TensorRT engine runs on a GPU: its instance kind must be gpu")
    return kind


def _max_batch(source: SourceArtifact, engines: Sequence[SourceArtifact], max_batch: int | None, backend: str) -> int:
    """The config's max_batch_size: ``max_batch`` (1..MAX_TRITON_BATCH, within the artifact's own limit) or the default."""
    if max_batch is not None:
        check_int(max_batch, "max batch", low=1, high=MAX_TRITON_BATCH)
    if source.fixed_batch is not None and backend != "python":
        if max_batch is not None:
            raise MMExportError(f"{source.describe()} has a fixed batch of {source.fixed_batch}: "
                                "Triton serves it with max_batch_size 0 (no max batch to choose)")
        return 0
    limits = [s.batch_limit for s in (source, *engines) if s.batch_limit is not None]
    limit = min(limits) if limits else None
    if max_batch is None:
        # an artifact's limit above the cap (a fixed batch of 10**6 served by model.py) is served in smaller batches
        return min(limit, MAX_TRITON_BATCH) if limit is not None else DEFAULT_MAX_BATCH
    if limit is not None and max_batch > limit:
        what = "engine's optimisation profile allows" if source.kind == "plan" else "model takes"
        raise MMExportError(f"max batch {max_batch} exceeds the {limit} images the {what} "
                            "(Triton refuses a config whose max_batch_size exceeds the engine's)")
    return max_batch


def _engine_set(source: SourceArtifact, engines: Sequence[str | os.PathLike[str]], allow_untracked: bool
                ) -> list[SourceArtifact]:
    """The extra engines (one per GPU architecture), checked to be the same model as ``source``."""
    found = []
    for item in engines:
        other = _from_file(Path(item).expanduser().absolute(), allow_untracked)
        if other.kind != "plan":
            raise MMExportError(f"{other.describe()}: engines= takes TensorRT engines (.plan)")
        if other.path == source.path:
            continue
        same = (other.info.classes == source.info.classes and other.info.image_size == source.info.image_size
                and other.engine.input_name == source.engine.input_name
                and other.info.weights_sha256 == source.info.weights_sha256
                and other.engine.precision == source.engine.precision)
        if not same:
            raise MMExportError(f"{other.describe()}: not an engine of the same model and precision as {source.describe()}")
        found.append(other)
    ccs = [s.compute_capability for s in (source, *found)]
    duplicates = sorted({cc for cc in ccs if ccs.count(cc) > 1})
    if duplicates:
        raise MMExportError(f"two engines for compute capability {', '.join(duplicates)}: keep one engine per GPU architecture")
    return found


def _plan_name(cc: str) -> str:
    return f"model.sm{cc.replace('.', '')}.plan"


# --------------------------------------------------------------------------------------------
# the plan: every check of an export, before anything is written
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendLayout:
    """What one backend puts into a version folder, and the config fields that name it."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    copies: Mapping[str, Path]  # version-relative file name -> the file copied there, in copy order
    served: str  # the copy of the source artifact (hashed against the manifest's sha256 once copied)
    default_model_filename: str | None = None
    cc_model_filenames: Mapping[str, str] = field(default_factory=dict)  # "8.6" -> plan file (tensorrt)
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFolder:
    """Where the new version goes: the repository, the model's folder in it and the versions already there."""
    repository: Path
    model_dir: Path
    existing_versions: tuple[int, ...]

    @property
    def next_version(self) -> int:
        """The first version number to try (the rename moves past one another export took meanwhile)."""
        return (self.existing_versions[-1] if self.existing_versions else 0) + 1


@dataclass(frozen=True)
class RepositoryPlan:
    """A checked export: the config, labels and files of the new version, computed without writing anything."""
    source: SourceArtifact
    engines: tuple[SourceArtifact, ...]  # engines of the same model for other GPUs (tensorrt)
    spec: ModelConfigSpec
    layout: BackendLayout
    preprocess: bool
    config_text: str
    labels_text: str
    interface: dict[str, Any]  # what every version of the model shares (compared with the newest version's record)
    folder: ModelFolder

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def backend(self) -> str:
        return self.spec.backend


def plan_repository(
    source: str | os.PathLike[str],
    repo_dir: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    backend: str = "onnxruntime",
    name: str | None = None,
    preprocess: bool = False,
    max_batch: int | None = None,
    instance_kind: str | None = None,
    instance_count: int = 1,
    artifact: str | None = None,
    engines: Sequence[str | os.PathLike[str]] = (),
    threads: int | None = None,
    allow_untracked: bool = False,
) -> RepositoryPlan:
    """What :func:`export_repository` would write, after every check it makes; writes nothing.

    Takes :func:`export_repository`'s arguments (less ``progress``); raises
    :class:`MMExportError` (one line) for an export it would refuse.
    """
    _check_options(backend, preprocess=preprocess, engines=engines, instance_count=instance_count, threads=threads)
    found = resolve_artifact(source, backend=backend, precision=precision, artifact=artifact, allow_untracked=allow_untracked)
    extra = tuple(_engine_set(found, engines, allow_untracked)) if engines else ()
    name = check_name(name if name is not None else _default_name(found))
    kind = _instance_kind(instance_kind, backend, found)
    batch = _max_batch(found, extra, max_batch, backend)
    _check_labels(found.info.classes, found.describe())
    layout = _with_model_card(found, _LAYOUTS[backend](found, extra, batch, preprocess=preprocess, threads=threads))
    spec = ModelConfigSpec(
        name=name, backend=backend, max_batch_size=batch, inputs=layout.inputs, outputs=layout.outputs,
        instance_kind=kind, instance_count=instance_count, default_model_filename=layout.default_model_filename,
        cc_model_filenames=dict(layout.cc_model_filenames), dynamic_batching=True, parameters=dict(layout.parameters),
    )
    text = config_text(spec)
    interface = _interface(backend, layout.inputs, layout.outputs, found.info.classes)
    folder = _model_folder(repo_dir, name, interface)
    return RepositoryPlan(
        source=found, engines=extra, spec=spec, layout=layout, preprocess=preprocess, config_text=text,
        labels_text="".join(f"{label}\n" for label in found.info.classes), interface=interface, folder=folder,
    )


def _check_options(backend: str, *, preprocess: bool, engines: Sequence[Any], instance_count: Any, threads: Any) -> None:
    """The options checkable on their own, refused before any file is read."""
    _check_backend(backend)
    if preprocess and backend != "python":
        raise MMExportError("preprocess (encoded images in, preprocessing on the server) needs backend python")
    if engines and backend != "tensorrt":
        raise MMExportError("engines for several GPUs (cc_model_filenames) need backend tensorrt")
    if isinstance(instance_count, bool) or not isinstance(instance_count, int) or instance_count < 1:
        raise MMExportError(f"instance count must be a positive integer, got {instance_count!r}")
    if threads is not None and (backend != "python" or isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MMExportError("threads is a positive integer, for the python backend only")


def _default_name(found: SourceArtifact) -> str:
    return sanitize_name(found.run.path.name if found.run is not None else found.path.stem)


def _check_labels(classes: Sequence[str], where: str) -> None:
    # Triton maps output index i to line i of labels.txt (split on "\n" only); a name with another line
    # break (\v, \f, \x85, \u2028 ...) would be one line for Triton and several for other readers.
    check_class_names(list(classes), f"{where}: {LABELS_FILE}")


def triton_label_lines(text: str) -> list[str]:
    """The labels Triton reads from a ``labels.txt``: lines split on ``"\\n"`` only, a final newline ending the last one."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


# -- per backend: the tensors the config declares and the files the version holds ----------
def _artifact_tensors(found: SourceArtifact, batch: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The artifact's own input and output (native backends); with max_batch_size 0 the dims keep the fixed batch."""
    size = found.info.image_size
    lead = (found.fixed_batch,) if batch == 0 else ()
    inputs = (TensorSpec(found.input_name, found.input_type, (*lead, 3, size, size)),)
    outputs = (TensorSpec(found.output_name, found.output_type, (*lead, found.info.num_classes), label_filename=LABELS_FILE),)
    return inputs, outputs


def _single_artifact_copies(found: SourceArtifact) -> dict[str, Path]:
    """The artifact under Triton's default file name (an engine with its sidecar, which check_model_folder reads)."""
    if found.kind == "onnx":
        return {ONNX_FILE: found.path}
    return {PLAN_FILE: found.path, PLAN_FILE + ".json": found.sidecar}


def _served_name(found: SourceArtifact) -> str:
    return ONNX_FILE if found.kind == "onnx" else PLAN_FILE


def _onnxruntime_layout(found: SourceArtifact, engines: Sequence[SourceArtifact], batch: int, *,
                        preprocess: bool, threads: int | None) -> BackendLayout:
    inputs, outputs = _artifact_tensors(found, batch)
    return BackendLayout(inputs, outputs, _single_artifact_copies(found), _served_name(found))


def _tensorrt_layout(found: SourceArtifact, engines: Sequence[SourceArtifact], batch: int, *,
                     preprocess: bool, threads: int | None) -> BackendLayout:
    inputs, outputs = _artifact_tensors(found, batch)
    if not engines:
        return BackendLayout(inputs, outputs, _single_artifact_copies(found), _served_name(found))
    # An engine only runs on the GPU architecture it was built for: one plan per compute capability,
    # mapped by cc_model_filenames; the source's own plan is the default for any other GPU.
    copies: dict[str, Path] = {}
    cc_files: dict[str, str] = {}
    for engine in (found, *engines):
        filename = _plan_name(engine.compute_capability)
        copies[filename] = engine.path
        copies[filename + ".json"] = engine.sidecar
        cc_files[engine.compute_capability] = filename
    served = cc_files[found.compute_capability]
    return BackendLayout(inputs, outputs, copies, served, default_model_filename=served, cc_model_filenames=cc_files)


def _python_layout(found: SourceArtifact, engines: Sequence[SourceArtifact], batch: int, *,
                   preprocess: bool, threads: int | None) -> BackendLayout:
    """model.py's interface (FP32 images, logits), whatever the artifact's own tensor names, plus the artifact."""
    size = found.info.image_size
    # With preprocess a request carries either decoded images or encoded bytes, so both inputs are optional.
    inputs = [TensorSpec(IMAGE_INPUT, "TYPE_FP32", (3, size, size), optional=preprocess)]
    if preprocess:
        inputs.append(TensorSpec(BYTES_INPUT, "TYPE_STRING", (1,), optional=True))
    outputs = (TensorSpec(OUTPUT, "TYPE_FP32", (found.info.num_classes,), label_filename=LABELS_FILE),)
    copies = {**_single_artifact_copies(found), PYTHON_MODEL_FILE: PYTHON_MODEL_SOURCE}
    return BackendLayout(tuple(inputs), outputs, copies, _served_name(found),
                         parameters={"threads": str(threads)} if threads else {})


_LAYOUTS = {"onnxruntime": _onnxruntime_layout, "tensorrt": _tensorrt_layout, "python": _python_layout}


def _with_model_card(found: SourceArtifact, layout: BackendLayout) -> BackendLayout:
    """The run's ``model_card.md`` travels into the version, hash-checked against the run's manifest first;
    like every copied file its sha256 is in the version's ``mmexport.json`` (a run without a card: nothing)."""
    if found.run is None or MODEL_CARD_NAME not in found.run.manifest.get("outputs", {}):
        return layout
    return replace(layout, copies={**layout.copies, MODEL_CARD_NAME: found.run.checked_file(MODEL_CARD_NAME)})


# -- the destination -------------------------------------------------------------------------
def _model_folder(repo_dir: str | os.PathLike[str], name: str, interface: dict[str, Any]) -> ModelFolder:
    """The model's folder, checked to take a new version of this interface (read only: nothing is created yet)."""
    repo = Path(repo_dir).expanduser().absolute()
    _check_repository_path(repo)
    model_dir = repo / name
    if model_dir.is_symlink():  # versions written through it would land outside the repository
        raise RunDirError(f"{model_dir}: is a symbolic link (to {os.readlink(model_dir)}); refusing to write through it")
    existing = _versions(model_dir)
    if model_dir.exists():
        if not model_dir.is_dir():
            raise RunDirError(f"{model_dir}: exists and is not a directory")
        if not os.access(model_dir, os.W_OK | os.X_OK):
            raise RunDirError(f"{model_dir}: directory is not writable")
        if existing or (model_dir / CONFIG_FILE).exists():
            _check_same_interface(model_dir, existing, interface)
    return ModelFolder(repository=repo, model_dir=model_dir, existing_versions=tuple(existing))


def _check_repository_path(repo: Path) -> None:
    """``repo`` is a directory this process can write in, or a new folder in one; one line naming the path otherwise."""
    if repo.is_symlink() and not repo.exists():
        raise RunDirError(f"{repo}: is a symbolic link to {os.readlink(repo)}, which does not exist; "
                          "give an existing directory or a new path")
    if repo.exists():
        if not repo.is_dir():
            what = f"a symbolic link to the file {os.path.realpath(repo)}" if repo.is_symlink() else "a file"
            raise RunDirError(f"{repo}: is {what}, not a directory (a model repository is a directory)")
        if not os.access(repo, os.W_OK | os.X_OK):
            raise RunDirError(f"{repo}: directory is not writable")
        return
    parent = repo.parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else (
            "is a symbolic link to a missing target" if parent.is_symlink() else "does not exist")
        raise RunDirError(f"{repo}: cannot be created: its parent {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"{repo}: cannot be created: its parent {parent} is not writable")


def _check_same_interface(model_dir: Path, existing: Sequence[int], interface: dict[str, Any]) -> None:
    # config.pbtxt and labels.txt belong to the model, not to a version: every version must fit them.
    if not existing:
        raise RunDirError(f"{model_dir}: has a {CONFIG_FILE} but no version mmexport wrote; refusing to change it")
    latest = read_version_record(model_dir / str(existing[-1]))
    if latest.get("interface") != interface:
        raise MMExportError(f"{model_dir}: version {existing[-1]} has another interface (backend, inputs, outputs "
                            f"or classes) than this export; the config is shared by all versions: use another name")


# --------------------------------------------------------------------------------------------
# the write: stage the version, then rename it into place
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WrittenVersion:
    """A version in place: its number and folder, the sha256 of the files copied into it, and whether the config changed."""
    version: int
    version_dir: Path
    copied: dict[str, str]  # version-relative file name -> sha256
    config_changed: bool  # config.pbtxt was created or its text changed


def _write_version(plan: RepositoryPlan, progress: ProgressSink) -> WrittenVersion:
    model_dir = plan.folder.model_dir
    _make_model_dir(model_dir)
    # Built in a hidden folder and renamed into place when complete, so Triton never sees half a version;
    # a failure anywhere removes the staging folder and leaves the model folder as it was found.
    staging = model_dir / f"{_PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        staging.mkdir()
        copied = _copy_files(plan, staging, progress)
        record = _version_record(plan, copied)
        write_bytes_atomic(staging / VERSION_RECORD, (json.dumps(record, indent=2) + "\n").encode())
        config_changed = _write_model_files(plan)
        version = _rename_into_place(staging, model_dir, plan.folder.next_version)
    except OSError as exc:  # a full disk, a permission taken away meanwhile: one line naming the file
        shutil.rmtree(staging, ignore_errors=True)
        where = exc.filename or model_dir
        raise RunDirError(f"{where}: cannot write the new version ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return WrittenVersion(version=version, version_dir=model_dir / str(version), copied=copied,
                          config_changed=config_changed)


def _make_model_dir(model_dir: Path) -> None:
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{model_dir}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(model_dir, os.W_OK):
        raise RunDirError(f"{model_dir}: directory is not writable")


def _copy_files(plan: RepositoryPlan, staging: Path, progress: ProgressSink) -> dict[str, str]:
    """Copy the version's files into ``staging``; returns their sha256, checked against the manifest's."""
    hashes: dict[str, str] = {}
    for filename, origin in plan.layout.copies.items():
        progress.message(f"copying {origin.name} -> {plan.name}/<version>/{filename} ({origin.stat().st_size / 1e6:.1f} MB)")
        shutil.copyfile(origin, staging / filename)
        hashes[filename] = sha256_file(staging / filename)
    # The copies are hashed, not the originals: what Triton loads must be the bytes that were verified.
    if hashes.get(plan.layout.served) != plan.source.sha256:
        raise RunDirError(f"{plan.source.path}: changed while it was copied (sha256 differs from the manifest's)")
    for engine in plan.engines:
        if hashes[plan.layout.cc_model_filenames[engine.compute_capability]] != engine.sha256:
            raise RunDirError(f"{engine.path}: changed while it was copied")
    if plan.source.kind == "plan":  # what Triton loads: every copied engine's own header, against its sidecar
        for engine in (plan.source, *plan.engines):
            filename = plan.layout.cc_model_filenames.get(engine.compute_capability, PLAN_FILE)
            check_plan_file(staging / filename, engine.engine)
    return hashes


def _write_model_files(plan: RepositoryPlan) -> bool:
    """Write labels.txt and config.pbtxt (only when its text changed); returns whether the config changed."""
    # The model-level files first (same interface as every version there), then the version appears at once.
    config_path = plan.folder.model_dir / CONFIG_FILE
    previous = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    write_bytes_atomic(plan.folder.model_dir / LABELS_FILE, plan.labels_text.encode("utf-8"))
    if previous != plan.config_text:
        write_bytes_atomic(config_path, plan.config_text.encode("utf-8"))
    return previous != plan.config_text


def _rename_into_place(staging: Path, model_dir: Path, first: int) -> int:
    """Rename ``staging`` to the first free version number from ``first``; returns the number taken."""
    version = first
    while True:
        target = model_dir / str(version)
        if not target.exists():
            try:
                os.rename(staging, target)
                return version
            except OSError:
                # Another export renamed its version to this number first: try the next one.
                if not target.exists():
                    raise
        version += 1


# --------------------------------------------------------------------------------------------
# the records: the version's mmexport.json, the result, the run manifest's entry
# --------------------------------------------------------------------------------------------
def _version_record(plan: RepositoryPlan, copied: Mapping[str, str]) -> dict[str, Any]:
    """The content of the version's ``mmexport.json``: where it came from and what it holds."""
    return {
        "format": RECORD_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mmexport_version": __version__,
        "model_name": plan.name,
        "backend": plan.backend,
        "platform": plan.spec.platform,
        "preprocess": plan.preprocess,
        "served_artifact": plan.layout.served,
        "source": _source_record(plan.source),
        "verification": plan.source.verification,
        "engines": _engine_records(plan),
        "files": copied,
        "model_files": {CONFIG_FILE: _sha_text(plan.config_text), LABELS_FILE: _sha_text(plan.labels_text)},
        "interface": plan.interface,
        "max_batch_size": plan.spec.max_batch_size,
        "model_metadata": dict(plan.source.metadata),
        "config_pbtxt": plan.config_text,
    }


def _source_record(found: SourceArtifact) -> dict[str, Any]:
    return {
        "run": str(found.run.path) if found.run is not None else None,
        "artifact": found.name,
        "registry_key": found.registry_key,
        "path": str(found.path),
        "sha256": found.sha256,
        "verified": found.verified,
        "manifest_entry": found.entry,
    }


def _engine_records(plan: RepositoryPlan) -> list[dict[str, Any]]:
    """One entry per TensorRT engine in the version (none for an ONNX artifact)."""
    if plan.source.kind != "plan":
        return []
    cc_files = plan.layout.cc_model_filenames
    single_file = PLAN_FILE if not plan.engines else None
    return [
        {"file": cc_files.get(e.compute_capability, single_file), "source": str(e.path),
         "run": str(e.run.path) if e.run is not None else None, "sha256": e.sha256, "verified": e.verified,
         "compute_capability": e.compute_capability, "gpu": e.engine.gpu_name,
         "tensorrt_version": e.engine.tensorrt_version, "batch_profile": [e.engine.batch_profile.min,
         e.engine.batch_profile.opt, e.engine.batch_profile.max],
         "verification": e.verification}
        for e in (plan.source, *plan.engines)
    ]


def _result(plan: RepositoryPlan, written: WrittenVersion) -> RepositoryResult:
    model_dir, version, version_dir = plan.folder.model_dir, written.version, written.version_dir
    files = {f"{version}/{k}": v for k, v in written.copied.items()}
    files[f"{version}/{VERSION_RECORD}"] = sha256_file(version_dir / VERSION_RECORD)
    files[CONFIG_FILE] = _sha_text(plan.config_text)
    files[LABELS_FILE] = _sha_text(plan.labels_text)
    found = plan.source
    return RepositoryResult(
        repository=plan.folder.repository, name=plan.name, version=version, model_dir=model_dir, version_dir=version_dir,
        config_path=model_dir / CONFIG_FILE, labels_path=model_dir / LABELS_FILE, record_path=version_dir / VERSION_RECORD,
        backend=plan.backend, platform=plan.spec.platform, max_batch_size=plan.spec.max_batch_size,
        preprocess=plan.preprocess, source=found.path, run=found.run.path if found.run is not None else None,
        artifact=found.name, verified=found.verified, files=files, config_text=plan.config_text,
        config_changed=written.config_changed, inputs=plan.spec.inputs, outputs=plan.spec.outputs,
        compute_capabilities=dict(plan.layout.cc_model_filenames),
    )


def record_in_run(result: RepositoryResult, *, lock_wait: float | None = None) -> None:
    """Write the exported version into the run's manifest (``triton_repositories``): ``verify --manifest``
    then re-hashes the repository's files with the run's own, completing the chain sources → engine → repository.

    ``lock_wait``: seconds to wait for another command writing the run."""
    if result.run is None:
        return

    with writing(result.run, "fold --to triton", wait=lock_wait):
        run = RunDir.open(result.run)
        run.manifest.setdefault("triton_repositories", []).append(_manifest_entry(result))
        run.save()


def _manifest_entry(result: RepositoryResult) -> dict[str, Any]:
    return {
        "path": str(Path(result.repository).absolute()), "model": result.name, "version": result.version,
        "backend": result.backend, "artifact": result.artifact, "preprocess": result.preprocess,
        "max_batch_size": result.max_batch_size, "files": dict(result.files), "created": _now(),
    }


# --------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------
def export_repository(
    source: str | os.PathLike[str],
    repo_dir: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    backend: str = "onnxruntime",
    name: str | None = None,
    preprocess: bool = False,
    max_batch: int | None = None,
    instance_kind: str | None = None,
    instance_count: int = 1,
    artifact: str | None = None,
    engines: Sequence[str | os.PathLike[str]] = (),
    threads: int | None = None,
    allow_untracked: bool = False,
    progress: ProgressSink | None = None,
) -> RepositoryResult:
    """Write a run's verified artifact into the Triton model repository ``repo_dir`` as a new version of ``name``.

    ``source`` is a run directory (its ``model[.<precision>].onnx``, or ``.plan`` for
    ``backend="tensorrt"``; ``artifact`` names another registry key, e.g. ``trt-fp16``
    for the python backend) or an artifact file of a run. ``name`` defaults to the run
    directory's name made valid. ``max_batch`` defaults to the engine's profile maximum,
    or :data:`DEFAULT_MAX_BATCH` for a dynamic-batch ONNX. ``engines`` adds TensorRT
    engines of the same model built for other GPUs (``cc_model_filenames``).
    ``preprocess`` (python backend only) adds the encoded-image input ``image_bytes``.
    ``threads`` (python backend) is ONNX Runtime's intra-op thread count per instance.
    Returns the written version; raises :class:`MMExportError` (one line) otherwise.
    The run's manifest is not touched: :func:`record_in_run` records the result there.
    """
    progress = sink(progress)
    plan = plan_repository(
        source, repo_dir, precision=precision, backend=backend, name=name, preprocess=preprocess, max_batch=max_batch,
        instance_kind=instance_kind, instance_count=instance_count, artifact=artifact, engines=engines, threads=threads,
        allow_untracked=allow_untracked,
    )
    return _result(plan, _write_version(plan, progress))


def _sha_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# checking a model folder
# --------------------------------------------------------------------------------------------
def check_model_folder(model_dir: str | os.PathLike[str]) -> list[str]:
    """What is wrong with an exported model folder (empty when nothing is).

    Beyond what Triton's schema parses (:func:`parse_config`): the config's name is the
    folder's, the labels file has one line per class, every version's files still have
    the sha256 its ``mmexport.json`` records, and the newest version's model file takes
    and gives what the config says (dims without the batch dimension, data types) within
    its batch limit (an engine's profile maximum).
    """
    folder = Path(model_dir)
    problems: list[str] = []
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return [f"{folder}: no {CONFIG_FILE}"]
    config = parse_config(config_path.read_text(encoding="utf-8"))
    if config.name != folder.name:
        problems.append(f"config name {config.name!r} is not the folder's {folder.name!r}")
    versions = _versions(folder)
    if not versions:
        return problems + [f"{folder}: no version folder"]
    labels, label_problem = _read_labels(folder / LABELS_FILE)
    if label_problem:
        problems.append(label_problem)
    problems += _version_file_problems(folder, versions)
    record = read_version_record(folder / str(versions[-1]))
    classes = record["interface"]["classes"]
    problems += _label_problems(config, labels, classes)
    version_dir = folder / str(versions[-1])
    served = version_dir / record["served_artifact"]
    batch = config.max_batch_size
    try:
        model_inputs, model_outputs, limit = _model_io(served, version_dir, config, classes, problems)
    except MMExportError as exc:
        return problems + [f"version {versions[-1]}: {exc}"]
    if config.backend == "python":  # model.py takes FP32 images (and bytes); the artifact's own I/O is checked above
        model_inputs = {IMAGE_INPUT: ("TYPE_FP32", (None, *next(iter(model_inputs.values()))[1][1:]))}
        model_outputs = {OUTPUT: ("TYPE_FP32", (None, len(classes)))}
    if batch > 0 and limit is not None and batch > limit:
        problems.append(f"max_batch_size {batch} exceeds the model's batch limit {limit}")
    for kind, declared, actual in (("input", config.input, model_inputs), ("output", config.output, model_outputs)):
        for tensor in declared:
            if tensor.name == BYTES_INPUT and config.backend == "python":
                continue  # encoded bytes are model.py's own input: the model file has no counterpart
            problems += _tensor_problems(kind, tensor, actual, batch)
    return problems


def _version_file_problems(folder: Path, versions: Sequence[int]) -> list[str]:
    """Every version's files against the sha256 its ``mmexport.json`` records."""
    problems: list[str] = []
    for version in versions:
        for problem in check_version_files(folder / str(version)):
            problems.append(f"version {version}: {problem}")
    return problems


def _read_labels(path: Path) -> tuple[list[str] | None, str | None]:
    """``labels.txt`` as Triton reads it (:func:`triton_label_lines`), or a problem; ``None`` when it is absent."""
    if not path.is_file():
        return None, None
    try:
        return triton_label_lines(path.read_bytes().decode("utf-8")), None
    except UnicodeDecodeError:
        return [], f"{LABELS_FILE} is not UTF-8 text"
    except OSError as exc:
        return [], f"{LABELS_FILE} cannot be read ({exc.strerror or exc})"


def _label_problems(config: Any, labels: list[str] | None, classes: Sequence[str]) -> list[str]:
    """Each labelled output against the labels file and the model's classes (one line, one logit per class)."""
    problems: list[str] = []
    for output in config.output:
        if output.label_filename:
            if labels is None:
                problems.append(f"output {output.name}: label file {output.label_filename} is missing")
            elif len(labels) != len(classes):
                problems.append(f"{LABELS_FILE} has {len(labels)} lines (as Triton reads it), the model {len(classes)} classes")
            elif labels != list(classes):
                index = next(i for i, (a, b) in enumerate(zip(labels, classes)) if a != b)
                problems.append(f"{LABELS_FILE} line {index + 1} is {labels[index][:80]!r}, the model's class {index} "
                                f"is {classes[index][:80]!r}")
            if list(output.dims)[-1:] != [len(classes)]:
                problems.append(f"output {output.name} dims {list(output.dims)} do not end in the {len(classes)} classes")
    return problems


def _tensor_problems(kind: str, tensor: Any, actual: Mapping[str, tuple], batch: int) -> list[str]:
    """One declared tensor against the model file's: present, same dims (without the batch when batching), same type."""
    if tensor.name not in actual:
        return [f"{kind} {tensor.name}: the model has no such {kind} (it has {', '.join(actual)})"]
    problems: list[str] = []
    dtype, shape = actual[tensor.name]
    expected = list(shape[1:]) if batch > 0 else list(shape)
    if batch > 0 and shape and shape[0] is not None and shape[0] > 0:
        problems.append(f"{kind} {tensor.name}: max_batch_size {batch} but the model's batch is fixed at {shape[0]}")
    dims = list(tensor.dims)
    if len(dims) != len(expected) or any(e is not None and d != e for d, e in zip(dims, expected)):
        problems.append(f"{kind} {tensor.name}: dims {dims}, the model file has {expected}")
    wanted = _type_name(tensor.data_type)
    if dtype is not None and wanted != dtype:
        problems.append(f"{kind} {tensor.name}: data type {wanted}, the model file has {dtype}")
    return problems


def _model_io(served: Path, version_dir: Path, config: Any, classes: Sequence[str], problems: list[str]):
    """What the served file takes and gives: name -> (Triton type, shape with batch), and its batch limit."""
    if served.suffix == ".onnx":
        _, (in_name, in_type, in_dims), (out_name, out_type, out_dims) = _onnx_signature(served)
        model_inputs = {in_name: (_ONNX_TO_TRITON.get(in_type), in_dims)}
        model_outputs = {out_name: (_ONNX_TO_TRITON.get(out_type), out_dims)}
        limit = in_dims[0] if in_dims[0] is not None else None
    else:
        sidecar = EngineSidecar.read(served.with_name(served.name + ".json"))
        size = sidecar.image_size
        model_inputs = {sidecar.input_name: ("TYPE_FP32", (None, 3, size, size))}
        model_outputs = {OUTPUT: ("TYPE_FP32", (None, len(classes)))}
        limit = sidecar.batch_profile.max
        for cc, filename in config.cc_model_filenames.items():
            if not (version_dir / filename).is_file():
                problems.append(f"cc_model_filenames {cc}: {filename} is missing")
            else:
                other = EngineSidecar.read(version_dir / (filename + ".json"))
                if f"{other.compute_capability[0]}.{other.compute_capability[1]}" != cc:
                    problems.append(f"cc_model_filenames {cc}: {filename} was built for {other.compute_capability}")
                limit = min(limit, other.batch_profile.max)
    return model_inputs, model_outputs, limit


def _type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


__all__ = [
    "BACKENDS", "BYTES_INPUT", "CONFIG_FILE", "DEFAULT_MAX_BATCH", "IMAGE_INPUT", "LABELS_FILE", "ModelConfigSpec",
    "OUTPUT", "RECORD_FORMAT", "RepositoryPlan", "RepositoryResult", "SourceArtifact", "TensorSpec", "VERSION_RECORD",
    "MAX_TRITON_BATCH", "check_model_folder", "check_name", "check_version_files", "config_text", "export_repository",
    "parse_config", "plan_repository", "read_version_record", "record_in_run", "resolve_artifact", "sanitize_name",
    "triton_label_lines",
]

