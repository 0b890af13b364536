"""``mmexport predict``: classify files with a run's deployable artifact, as a server would, before deploying it.

:func:`resolve_model` picks the file (a run's verified ``model.onnx`` by default, or a given
``.onnx``/``.plan``), :func:`open_predictor` loads it through :func:`mmexport.runtime.load` --
the code a server runs -- after checking that the description it carries is the run's, and
:func:`predict_files` classifies each file through the model's recorded preprocessing (PNG/JPEG
today; DICOM wherever the runtime's pixel pipeline accepts it) and, on request, writes a DICOM
Structured Report per classified DICOM instance (:mod:`mmexport.runtime.report`).

Why not :func:`mmexport.serving.triton.resolve_artifact`: it lies a layer above (serving), it
always refuses an artifact published unverified, which ``predict --allow-unverified`` exists to
look at, and it reads the ONNX signature into Triton's types, which predicting does not need
(:func:`mmexport.runtime.load` checks the input itself). The run-level checks it is built from
are the ones used here: the registry row, the manifest entry's ``verified``, the hash
(:meth:`RunDir.checked_file`) and :func:`describes_run`.

A bad file is one row with its one-line error; the others are still classified (a user checking
a folder wants every failure at once), and the caller decides the exit status from
:attr:`PredictReport.failed`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmexport import __version__, artifacts
from mmexport.config import check_int
from mmexport.errors import MMExportError, RunDirError, one_line
from mmexport.fileio import sha256_file, write_json_atomic
from mmexport.runs.manifest import MANIFEST_NAME, RunDir
from mmexport.runs.verify import describes_run
from mmexport.runtime.engine import EngineSidecar, sidecar_path
from mmexport.runtime.preprocess import is_dicom

BACKENDS = ("onnxruntime", "tensorrt")
PREDICTIONS_FORMAT = "mmexport-predictions/1"
DEFAULT_TOP = 3


@dataclass(frozen=True)
class PredictModel:
    """The artifact ``predict`` runs and what an SR says about it."""
    path: Path
    kind: str  # "onnx" or "plan"
    sha256: str
    verified: bool | None  # None: a file outside any run (its verification cannot be known)
    verification: str  # the manifest's verification status, one line
    run_path: Path | None = None
    name: str = ""  # the run-relative file name

    @property
    def algorithm_name(self) -> str:
        """The run's name (the SR's Algorithm Name), or the file's name for a file outside a run."""
        return self.run_path.name if self.run_path is not None else self.path.name

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "run": str(self.run_path) if self.run_path else None, "artifact": self.name,
                "kind": self.kind, "sha256": self.sha256, "verified": self.verified, "verification": self.verification}


def _status(run: RunDir, name: str, entry: dict[str, Any]) -> str:
    """The manifest's verdict on ``name`` with its latest check, one line."""
    if entry.get("verified") is not True:
        why = entry.get("unverified_reason") or "the manifest records no passed verification"
        return f"UNVERIFIED: {' '.join(str(why).split())[:300]}"
    records = [r for r in run.manifest.get("verification", []) if isinstance(r, dict) and r.get("artifact") == name]
    latest = next((r for r in reversed(records) if r.get("passed") is True), None)
    if latest is None:
        return "verified (the manifest records verified: true)"
    tolerance = latest.get("tolerance", {}).get("name", "?") if isinstance(latest.get("tolerance"), dict) else "?"
    return (f"verified: {name} passed `{latest.get('command', '?')}` against {latest.get('reference', '?')} "
            f"({tolerance} tolerance, {latest.get('created', '?')})")


def _from_run(run: RunDir, name: str, allow_unverified: bool) -> PredictModel:
    row = artifacts.by_filename(name)
    if row is None or not row.deployable or row.runner not in BACKENDS:
        raise MMExportError(f"{run.path / name}: not a deployable artifact of the run (deployable: "
                            f"{', '.join(r.filename for r in artifacts.deployable() if r.runner in BACKENDS)})")
    entry = run.manifest.get("outputs", {}).get(name)
    if entry is None:
        raise RunDirError(f"{run.path}: has no {name}; make it with `{row.made_by.replace('RUN', str(run.path))}`")
    if entry.get("verified") is not True and not allow_unverified:
        why = entry.get("unverified_reason") or "the manifest records no passed verification"
        raise RunDirError(f"{run.path / name}: not verified ({' '.join(str(why).split())[:300]}); "
                          "pass --allow-unverified to classify with it anyway")
    path = run.checked_file(name)  # the bytes the manifest recorded, or one line
    return PredictModel(path=path, kind=row.format, sha256=entry["sha256"], verified=entry.get("verified") is True,
                        verification=_status(run, name, entry), run_path=run.path, name=name)


def resolve_model(target: str | os.PathLike[str], *, backend: str = "onnxruntime", precision: str = "fp32",
                  allow_unverified: bool = False) -> PredictModel:
    """A run directory's verified artifact (``model[.<precision>].onnx``; the engine for ``tensorrt``), or a
    model file: inside a run it must be one the manifest records (and is hash-checked); outside any run its
    verification cannot be known and it is taken only with ``allow_unverified``."""
    if backend not in BACKENDS:
        raise MMExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(target).expanduser().absolute()
    if path.is_dir():
        run = RunDir.open(path)
        row = artifacts.engine_artifact(precision) if backend == "tensorrt" else artifacts.onnx_artifact(precision)
        found = _from_run(run, row.filename, allow_unverified)
    elif path.is_file():
        if (path.parent / MANIFEST_NAME).is_file():
            run = RunDir.open(path.parent)
            if path.name not in run.manifest.get("outputs", {}):
                raise RunDirError(f"{path}: not recorded in the manifest of the run {run.path} (refusing an untracked file)")
            found = _from_run(run, path.name, allow_unverified)
        else:
            if not allow_unverified:
                raise RunDirError(f"{path}: not inside a run directory, so its verification cannot be checked; "
                                  "classify with the run (or pass --allow-unverified to take the file as it is)")
            suffix = path.suffix.lower()
            if suffix not in (".onnx", ".plan", ".engine"):
                raise MMExportError(f"{path}: not a deployable model (expected .onnx, or a TensorRT .plan with its sidecar)")
            found = PredictModel(path=path, kind="onnx" if suffix == ".onnx" else "plan", sha256=sha256_file(path),
                                 verified=None, verification="untracked: not part of a run, verification unknown")
    else:
        raise MMExportError(f"{path}: no such run directory or model file")
    wanted = "plan" if backend == "tensorrt" else "onnx"
    if found.kind != wanted:
        raise MMExportError(f"{found.path}: the {backend} backend runs "
                            f"{'TensorRT engines (.plan)' if wanted == 'plan' else 'ONNX files'}, not this file")
    return found


def open_predictor(model: PredictModel, *, threads: int | None = None, batch_size: int | None = None) -> Any:
    """:func:`mmexport.runtime.load` of the artifact (TensorRT for an engine), after checking that the
    model description it carries -- classes, size, the whole preprocessing block -- is the run's."""
    from mmexport.runtime.predictor import load

    if model.run_path is not None and model.kind == "plan":
        # judged before the engine is deserialised, so a foreign sidecar is refused without TensorRT too
        describes_run(RunDir.open(model.run_path), model.name, EngineSidecar.read(sidecar_path(model.path)).model_metadata)
    predictor = load(model.path, device="cuda" if model.kind == "plan" else "cpu", threads=threads,
                     batch_size=batch_size, allow_unverified=model.verified is not True)
    try:
        if model.run_path is not None and model.kind == "onnx":
            describes_run(RunDir.open(model.run_path), model.name, predictor.runner.metadata())
    except BaseException:
        predictor.close()
        raise
    return predictor


@dataclass
class PredictRow:
    """One file's answer, or its one-line error."""
    file: str
    label: str | None = None
    probability: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    sr: str | None = None  # the SR written for it
    note: str | None = None  # e.g. why no SR was written for a classified file

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "label": self.label, "probability": self.probability,
                "top": [{"label": label, "probability": p} for label, p in self.top],
                "probabilities": self.probabilities, "error": self.error, "sr": self.sr, "note": self.note}


@dataclass
class PredictReport:
    model: PredictModel
    classes: tuple[str, ...]
    top: int
    rows: list[PredictRow]
    sr_out: Path | None = None

    @property
    def failed(self) -> list[PredictRow]:
        return [row for row in self.rows if row.error is not None]

    def as_dict(self) -> dict[str, Any]:
        return {"format": PREDICTIONS_FORMAT, "mmexport_version": __version__, "model": self.model.as_dict(),
                "classes": list(self.classes), "top": self.top, "sr_out": str(self.sr_out) if self.sr_out else None,
                "results": [row.as_dict() for row in self.rows]}


def check_outputs(model: PredictModel, *, json_path: str | os.PathLike[str] | None = None,
                  sr_out: str | os.PathLike[str] | None = None) -> None:
    """Before anything is classified: ``--json`` may not replace a file of the run, and ``--sr-out`` may not
    lie inside the run (its files would be read as unlisted parts of it by ``verify --manifest``)."""
    run = RunDir.open(model.run_path) if model.run_path is not None else None
    if json_path is not None:
        target = Path(json_path).expanduser()
        if target.is_dir():
            raise MMExportError(f"{target}: --json names a directory; give a file path")
        if run is not None:
            run.refuse_overwrite(target)
    if sr_out is not None and run is not None:
        out = Path(sr_out).expanduser().resolve()
        if out == run.path.resolve() or run.path.resolve() in out.parents:
            raise RunDirError(f"{sr_out}: inside the run {run.path.name}; write the SRs outside the run directory")




def _write_sr(row: PredictRow, file: str, model: PredictModel, sr_out: Path, series: dict[str, str],
              counter: list[int]) -> None:
    from mmexport.runtime.report import read_source, write_classification_sr

    if not is_dicom(file):
        row.note = "no SR: not a DICOM file (an SR reports into a DICOM study)"
        return
    try:
        dataset, _ = read_source(file)
        from pydicom.uid import generate_uid

        # one new series per study and call: the SRs of one run of predict stay together in each study
        study = str(getattr(dataset, "StudyInstanceUID", ""))
        series_uid = series.setdefault(study, generate_uid())
        counter[0] += 1
        path = write_classification_sr(dataset, row.label or "", row.probabilities, algorithm_name=model.algorithm_name,
                                       algorithm_version=model.sha256, verification=model.verification, out_dir=sr_out,
                                       series_instance_uid=series_uid, instance_number=counter[0])
        row.sr = str(path)
    except MMExportError as exc:
        row.error = f"classified, but no SR written: {one_line(exc)}"


def predict_files(predictor: Any, model: PredictModel, files: Sequence[str | os.PathLike[str]], *, top: int = DEFAULT_TOP,
                  sr_out: str | os.PathLike[str] | None = None) -> PredictReport:
    """Classify each of ``files`` with ``predictor`` (see :func:`open_predictor`); with ``sr_out``, one SR per
    classified DICOM file there (the directory is created if missing). A file that cannot be read or
    preprocessed is a row with its one-line error; the others are classified in batches."""
    check_int(top, "--top", low=1)
    if not files:
        raise MMExportError("no files given to classify")
    classes = tuple(predictor.info.classes)
    k = min(top, len(classes))
    out = None
    if sr_out is not None:
        out = Path(sr_out).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MMExportError(f"{out}: cannot create the SR output directory ({exc.strerror or exc})") from None
    rows = [PredictRow(file=str(f)) for f in files]
    series: dict[str, str] = {}
    counter = [0]
    for start in range(0, len(rows), predictor.batch_size):
        chunk = rows[start : start + predictor.batch_size]
        ready: list[tuple[PredictRow, np.ndarray]] = []
        for row in chunk:
            try:
                ready.append((row, predictor.preprocess([row.file])))
            except (MMExportError, OSError) as exc:  # one bad file is its row's error, not the end of the call
                row.error = one_line(exc)
        if not ready:
            continue
        prediction = predictor.predict(np.concatenate([batch for _, batch in ready]))
        best = prediction.top(k)
        for i, (row, _) in enumerate(ready):
            row.label = prediction.labels[i]
            row.probabilities = {c: float(p) for c, p in zip(classes, prediction.probabilities[i])}
            row.probability = row.probabilities[row.label]
            row.top = best[i]
            if out is not None:
                _write_sr(row, row.file, model, out, series, counter)
    return PredictReport(model=model, classes=classes, top=k, rows=rows, sr_out=out)


def write_predictions(report: PredictReport, path: str | os.PathLike[str]) -> Path:
    """The report as JSON (:data:`PREDICTIONS_FORMAT`), written atomically."""
    target = Path(path).expanduser()
    write_json_atomic(target, report.as_dict())
    return target


__all__ = ["BACKENDS", "DEFAULT_TOP", "PREDICTIONS_FORMAT", "PredictModel", "PredictReport", "PredictRow",
           "check_outputs", "open_predictor", "predict_files", "resolve_model", "write_predictions"]
