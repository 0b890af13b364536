"""The registry: every file a run directory can hold, in one table.

Each row says what the file is, what it is made from, which command makes it, which
runner runs it, which tolerance row judges it and whether it is deployable. The
commands (``fold``, export, ``verify``, ``bench``, ``inspect``, the demo) look files,
precisions and engines up here; nothing else names them. A new artifact (a TensorRT
engine, a Triton repository) is a new row, not a new code path.

This module is torch-free: servers and the runtime read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from mmexport.errors import MMExportError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
ENGINES: tuple[str, ...] = ("torch", "onnx", "trt")  # bench --engine / verify --backend names
MODEL_KINDS: tuple[str, ...] = ("folded", "unmerged", "dual", "single")
COMPARISON_KINDS: tuple[str, ...] = ("unmerged", "dual", "single")
FOLD_TARGETS: tuple[str, ...] = ("safetensors", "pt", "onnx", "trt", "triton")
BENCH_DIR = "bench"
RUNNER_OF_ENGINE = {"torch": "torch", "onnx": "onnxruntime", "trt": "tensorrt"}


@dataclass(frozen=True, kw_only=True)
class ArtifactFacts:
    """What making an artifact established, as typed fields; each maker's result extends it.

    ``as_record()`` is what the manifest records beside the file's sha256 and size (which the
    manifest entry holds itself); ``hint`` is advice for a user whose artifact failed its check.
    """

    hint: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in ("hint", "sha256", "size_bytes")}


def _plain(value: Any) -> Any:
    """A field as JSON data: nested results by their own ``as_dict``, else their fields."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


@dataclass(frozen=True)
class Artifact:
    key: str
    filename: str  # relative to the run directory
    format: str  # safetensors, pt, onnx, plan, npz, png, json, checkpoint
    description: str
    made_from: tuple[str, ...]  # registry keys
    made_by: str  # the command that writes it
    runner: str | None = None  # torch, onnxruntime, tensorrt: what runs it
    tolerance: str | None = None  # the row of mmexport.runtime.tolerances that judges it
    deployable: bool = False
    precision: str | None = None
    model_kind: str | None = None  # folded, unmerged, dual, single
    transient: bool = False  # removed when the run is published (resume state)
    sidecar: str | None = None  # a file that must travel with it (TensorRT engines)

    @property
    def is_model(self) -> bool:
        return self.runner is not None


def _suffix(precision: str) -> str:
    return "" if precision == "fp32" else f".{precision}"


def _rows() -> list[Artifact]:
    train = "mmexport train"
    rows = [
        Artifact("unmerged", "unmerged.safetensors", "safetensors",
                 "stage-1 merge: both sources, the merge logits, head and BN statistics", ("source_a", "source_b"), train,
                 runner="torch", model_kind="unmerged"),
        Artifact("folded", "folded.safetensors", "safetensors", "the fold of the stage-1 merge (a stock torchvision network)",
                 ("unmerged",), f"{train} / mmexport fold RUN", runner="torch", tolerance="fold", model_kind="folded"),
        Artifact("folded-pt", "folded.pt", "pt", "the fold as a torch state dict (torch.load(weights_only=True))",
                 ("unmerged",), "mmexport fold RUN --to pt", runner="torch", tolerance="fold", model_kind="folded"),
        Artifact("model", "model.safetensors", "safetensors", "the run's final network (after stage 2): stock torchvision",
                 ("folded",), train, runner="torch", deployable=True, precision="fp32", model_kind="folded"),
        Artifact("reference", "reference.npz", "npz",
                 "reference inputs (random and held-out images) and the final network's torch fp32 outputs",
                 ("model",), train),
        Artifact("figure", "coefficients.png", "png", "per-layer mean merge coefficient, input to output", ("unmerged",), train),
        Artifact("comparison", "comparison.json", "json",
                 "did the merge pay: every --compare method's val/test scores over seeds, the gap to the best single source",
                 ("model",), f"{train} --compare"),
        Artifact("checkpoint", "checkpoint.resume", "checkpoint", "per-epoch state for --resume", (), train, transient=True),
    ]
    for precision in PRECISIONS:
        source = ("model", "reference") if precision == "fp32" else ("onnx-fp32", "reference")
        rows.append(Artifact(
            f"onnx-{precision}", f"model{_suffix(precision)}.onnx", "onnx", f"the final network as ONNX, {precision}",
            source, f"mmexport fold RUN --to onnx --precision {precision}", runner="onnxruntime", tolerance=precision,
            deployable=True, precision=precision, model_kind="folded"))
    for precision in PRECISIONS:
        name = f"model{_suffix(precision)}.plan"
        rows.append(Artifact(
            f"trt-{precision}", name, "plan", f"TensorRT engine of the {precision} ONNX (tied to one TensorRT and GPU)",
            (f"onnx-{precision}", "reference"), f"mmexport fold RUN --to trt --precision {precision}", runner="tensorrt",
            tolerance=precision, deployable=True, precision=precision, model_kind="folded", sidecar=f"{name}.json"))
    for kind in COMPARISON_KINDS:
        for precision in PRECISIONS:
            if kind == "unmerged" and precision != "fp32":
                continue  # a training-time fp32 construct: nobody deploys it quantized
            rows.append(Artifact(
                f"bench-{kind}-{precision}", f"{BENCH_DIR}/{kind}{_suffix(precision)}.onnx", "onnx",
                f"benchmark comparison model ({kind}), {precision}; not deployable",
                ("unmerged",) if kind != "single" else (), "mmexport bench RUN / mmexport fold RUN --to onnx --comparisons",
                runner="onnxruntime", tolerance=precision, precision=precision, model_kind=kind))
    return rows


REGISTRY: dict[str, Artifact] = {row.key: row for row in _rows()}
_BY_FILENAME = {row.filename: row for row in REGISTRY.values()}


def artifact(key: str) -> Artifact:
    try:
        return REGISTRY[key]
    except KeyError:
        raise MMExportError(f"unknown artifact {key!r}") from None


def filename(key: str) -> str:
    return artifact(key).filename


def by_filename(name: str) -> Artifact | None:
    """The registry row of a run-relative file name (sidecars map to their engine's row)."""
    if name in _BY_FILENAME:
        return _BY_FILENAME[name]
    if name.endswith(".json") and name[: -len(".json")] in _BY_FILENAME:
        return _BY_FILENAME[name[: -len(".json")]]
    return None


def check_precision(precision: str, where: str = "", error: type[MMExportError] = MMExportError) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else one line (prefixed with ``where``, e.g. a file).

    The one precision check of the package: the registry, the tolerance policy, engine
    sidecars and the TensorRT builder all call it.
    """
    if precision not in PRECISIONS:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def check_engine(engine: str, what: str = "engine") -> str:
    if engine not in ENGINES:
        raise MMExportError(f"unknown {what} {engine!r}; choose one of {', '.join(ENGINES)}")
    return engine


def onnx_artifact(precision: str) -> Artifact:
    return REGISTRY[f"onnx-{check_precision(precision)}"]


def engine_artifact(precision: str) -> Artifact:
    return REGISTRY[f"trt-{check_precision(precision)}"]


def comparison_artifact(kind: str, precision: str) -> Artifact:
    key = f"bench-{kind}-{check_precision(precision)}"
    if key not in REGISTRY:
        raise MMExportError(
            f"the {kind} model is a training-time fp32 construct and is benchmarked at fp32 only "
            f"(its {precision} graph would quantize the blend itself, which no one deploys)"
        )
    return REGISTRY[key]


def deployable(runner: str | None = None) -> list[Artifact]:
    return [row for row in REGISTRY.values() if row.deployable and (runner is None or row.runner == runner)]


__all__ = [
    "Artifact", "BENCH_DIR", "COMPARISON_KINDS", "ENGINES", "FOLD_TARGETS", "MODEL_KINDS", "PRECISIONS", "REGISTRY",
    "RUNNER_OF_ENGINE", "artifact", "by_filename", "check_engine", "check_precision", "comparison_artifact",
    "deployable", "engine_artifact", "filename", "onnx_artifact",
]
