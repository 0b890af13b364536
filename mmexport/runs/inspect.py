"""Inspect a run: what its manifest records, typed; each output's state (hash-checked); the latest verification of each artifact."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from mmexport import artifacts
from mmexport.errors import MMExportError
from mmexport.runs.manifest import RunDir
from mmexport.runs.model_card import MODEL_CARD_NAME, sources_check_lines
from mmexport.runtime.preprocess import Preprocessing


@dataclass(frozen=True)
class InputRecord:
    """One input of the run (a source checkpoint, the dataset): what the user gave and its sha256 (None: not a file).

    ``hashed``: what the sha256 is of -- ``file`` (a checkpoint, an ``.npz``), ``content`` (an image
    folder or CSV: the dataset's fingerprint over every split, class and image sha256), or
    ``generated`` (synthetic data: nothing to hash).
    """
    name: str
    spec: str
    sha256: str | None
    hashed: str = "file"


def _input_record(name: str, entry: dict[str, Any]) -> InputRecord:
    spec = str(entry.get("spec", entry.get("source", "")))
    if entry.get("sha256"):
        return InputRecord(name, spec, str(entry["sha256"]))
    fingerprint = entry.get("fingerprint")  # a dataset: "sha256:<hex>" (data.formats)
    if isinstance(fingerprint, str) and fingerprint.startswith("sha256:"):
        return InputRecord(name, spec, fingerprint[len("sha256:"):], "file" if entry.get("kind") == "npz" else "content")
    return InputRecord(name, spec, None, "generated" if entry.get("kind") == "synthetic" else "file")


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: float


@dataclass(frozen=True)
class SplitMetrics:
    """The final network's scores on one split (val, test)."""
    accuracy: float
    macro_f1: float
    per_class: list[ClassMetrics] | None = None  # None: not recorded


@dataclass(frozen=True)
class Score:
    mean: float
    std: float
    n_values: int


@dataclass(frozen=True)
class MethodScores:
    method: str
    scores: dict[str, Score]  # "test_macro_f1", "val_accuracy", ... (a key is absent where not scored)


@dataclass(frozen=True)
class ComparisonRecord:
    """The ``--compare`` table the run records: each method trained with the same budget and settings."""
    split: str  # "test", or "val" without a test split
    seeds: list[int]
    reference: str  # the run's own method
    methods: list[MethodScores]
    verdict: str
    kept: dict[str, Any] = field(default_factory=dict)  # what --keep-runs kept: policy, directory, best_single, runs
    sigma_agreement: dict[str, Any] | None = None  # r of the merge coefficients across seeds: seeds, overall, layers


@dataclass(frozen=True)
class TrainingReport:
    """What training recorded beyond the final scores: stage-1 diagnostics and the ``--compare`` table."""
    diagnostics: dict[str, Any] = field(default_factory=dict)  # free-form, as recorded
    sigma_saturation: float | None = None  # share of merge coefficients beyond 0.1/0.9 after stage 1
    stage1_val_macro_f1: float | None = None
    source_probes: dict[str, float] = field(default_factory=dict)  # source label -> head-only probe val macro-F1
    stage1_below_probe: list[str] = field(default_factory=list)  # sources whose probe beat stage 1
    comparison: ComparisonRecord | None = None
    sources_check: list[str] = field(default_factory=list)  # the lineage verdict and the alignment


@dataclass(frozen=True)
class TrainingOutcome:
    """A trained run's scores, read back from its manifest (what ``train`` reports when it is done)."""
    path: str
    classes: list[str]
    final_metrics: dict[str, SplitMetrics]
    training: TrainingReport


@dataclass
class OutputState:
    name: str
    kind: str
    size_bytes: int
    sha256: str
    state: str  # "intact" or why not
    registry: artifacts.Artifact | None
    verified: bool | None = None  # False: published although it failed its check (--allow-unverified)

    @property
    def intact(self) -> bool:
        return self.state == "intact"

    @property
    def deployable(self) -> bool:
        return self.registry is not None and self.registry.deployable


@dataclass(frozen=True)
class VerificationRecord:
    """The latest check of one published artifact, summarised over its input sets and outputs."""
    artifact: str
    policy: str  # the tolerance policy's name
    created: str
    max_abs_error: float | None  # None: no statistics recorded
    top1_agreement: float | None  # the worst over the input sets
    passed: bool


@dataclass
class RunSummary:
    path: str
    created: str | None
    command: str
    arch: str | None
    classes: list[str]
    image_size: int | None
    granularity: str | None
    seed: int | None
    preprocessing: Preprocessing | None
    inputs: list[InputRecord]
    final_metrics: dict[str, SplitMetrics]
    training: TrainingReport
    has_unmerged: bool  # the run holds the unmerged checkpoint (merge coefficients to show)
    outputs: list[OutputState]
    verifications: list[VerificationRecord]
    coefficients: list[dict[str, Any]] | None = None  # None: needs PyTorch, which is not installed
    warnings: list[str] = field(default_factory=list)
    model_card: str | None = None  # the run's model_card.md (None: the manifest lists none)


def inspect_run(run_path: str | os.PathLike[str], *,
                coefficients: Callable[[RunDir], list[dict[str, Any]]] | None = None) -> RunSummary:
    """The manifest, each output's state (hash-checked), the verifications of published artifacts,
    and, with ``coefficients`` (the torch side's per-layer reader, handed in where torch is
    installed), the per-layer merge coefficients."""
    run = RunDir.open(run_path)
    manifest = run.manifest
    outputs = []
    for name, entry in manifest.get("outputs", {}).items():
        try:
            run.checked_file(name)
            state = "intact"
        except MMExportError as exc:
            state = str(exc)
        outputs.append(OutputState(name, str(entry.get("kind")), entry.get("size_bytes", 0), str(entry.get("sha256", "")),
                                   state, artifacts.by_filename(name), entry.get("verified")))
    published = set(manifest.get("outputs", {}))
    # A failed check of a file that was never published is history, not a state of the run:
    # show the latest record of each artifact that exists, and failures only of files that exist.
    latest: dict[str, dict[str, Any]] = {}
    for record in manifest.get("verification", []):
        latest[record.get("artifact", "?")] = record
    verifications = [_verification(r) for name, r in latest.items() if name in published]
    rows = coefficients(run) if coefficients is not None and run.has(artifacts.filename("unmerged")) else None
    model = manifest.get("model", {})
    return RunSummary(
        path=str(run.path),
        created=manifest.get("created"),
        command=manifest.get("command", ""),
        arch=model.get("arch"),
        classes=list(model.get("classes", [])),
        image_size=model.get("image_size"),
        granularity=manifest.get("config", {}).get("granularity"),
        seed=manifest.get("seed"),
        preprocessing=Preprocessing.from_dict(model["preprocessing"]) if model.get("preprocessing") else None,
        inputs=[_input_record(key, value) for key, value in manifest.get("inputs", {}).items() if isinstance(value, dict)],
        final_metrics=_final_metrics(manifest),
        training=_training_report(manifest),
        has_unmerged=bool(manifest.get("outputs", {}).get(artifacts.filename("unmerged"))),
        outputs=outputs,
        verifications=verifications,
        coefficients=rows,
        model_card=str(run.file(MODEL_CARD_NAME)) if MODEL_CARD_NAME in manifest.get("outputs", {}) else None,
    )


def training_outcome(run_path: str | os.PathLike[str]) -> TrainingOutcome:
    """A trained run's final scores (per class too) and training report, from its manifest; no file is hashed."""
    run = RunDir.open(run_path)
    return TrainingOutcome(str(run.path), list(run.manifest.get("model", {}).get("classes", [])),
                           _final_metrics(run.manifest, per_class=True), _training_report(run.manifest))


def _final_metrics(manifest: dict[str, Any], per_class: bool = False) -> dict[str, SplitMetrics]:
    classes = manifest.get("model", {}).get("classes", [])
    final = manifest.get("training", {}).get("final", {})
    result = {}
    for split, metrics in final.items():
        rows = None
        if per_class and classes and "per_class" in metrics:
            table = metrics["per_class"]
            rows = [ClassMetrics(name, table["precision"][i], table["recall"][i], table["f1"][i], table["support"][i])
                    for i, name in enumerate(classes)]
        result[split] = SplitMetrics(metrics["accuracy"], metrics["macro_f1"], rows)
    return result


def _training_report(manifest: dict[str, Any]) -> TrainingReport:
    diagnostics = manifest.get("training", {}).get("diagnostics", {})
    probes = diagnostics.get("source_probes", {})
    comparison = manifest.get("comparison")
    return TrainingReport(
        diagnostics=diagnostics,
        sigma_saturation=diagnostics.get("sigma_saturation"),
        stage1_val_macro_f1=diagnostics.get("stage1_val_macro_f1"),
        source_probes={label: probe["val_macro_f1"] for label, probe in probes.items()},
        stage1_below_probe=list(diagnostics.get("stage1_below_probe") or []),
        comparison=_comparison(comparison) if comparison else None,
        sources_check=sources_check_lines(manifest.get("training", {}).get("compatibility")),
    )


def _comparison(record: dict[str, Any]) -> ComparisonRecord:
    methods = [MethodScores(row["method"], {key: Score(score["mean"], score["std"], len(score["values"]))
                                            for key, score in row["scores"].items() if score is not None})
               for row in record["methods"]]
    return ComparisonRecord(record["split"], list(record["seeds"]), record["reference"], methods, record["verdict"],
                            dict(record.get("kept") or {}), record.get("sigma_agreement"))


def _verification(record: dict[str, Any]) -> VerificationRecord:
    stats = [o for s in record.get("input_sets", []) for o in s.get("outputs", {}).values()]
    return VerificationRecord(
        artifact=str(record.get("artifact", "?")),
        policy=record.get("tolerance", {}).get("name", "?"),
        created=record.get("created", ""),
        max_abs_error=max(o["max_abs_error"] for o in stats) if stats else None,
        top1_agreement=min(o["top1_agreement"] for o in stats) if stats else None,
        passed=bool(record.get("passed")),
    )


__all__ = [
    "ClassMetrics", "ComparisonRecord", "InputRecord", "MethodScores", "OutputState", "RunSummary", "Score",
    "SplitMetrics", "TrainingOutcome", "TrainingReport", "VerificationRecord", "inspect_run", "training_outcome",
]
