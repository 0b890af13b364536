"""Run-level checks that need no PyTorch: verify deployed artifacts against the stored reference, inspect a run.

A GPU host with TensorRT and no torch runs ``mmexport verify RUN --backend trt``
through here: every artifact is hash-checked against the manifest, run on the
reference inputs of ``reference.npz``, and judged by
:func:`mmexport.runtime.compare.compare_sets` under its registry row's tolerance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mmexport import artifacts
from mmexport.errors import MMExportError
from mmexport.manifest import RunDir
from mmexport.runtime.check import check_runner
from mmexport.runtime.compare import VerificationReport
from mmexport.runtime.tolerances import for_precision


def _runner_for(row: artifacts.Artifact, path, device: str = "cpu"):
    if row.runner == "onnxruntime":
        from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, name=f"onnxruntime {row.precision} ({row.filename})",
                                 providers="cuda" if device.startswith("cuda") else "cpu")
    if row.runner == "tensorrt":
        from mmexport.runtime.engine import check_engine
        from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner

        check_engine(path)
        return TensorRTRunner(EngineFromPath(path), name=f"tensorrt {row.precision} ({row.filename})")
    raise MMExportError(f"{row.filename}: no runtime runner for {row.runner}")


def check_deployables_intact(run: RunDir) -> list[str]:
    """Hash-check every deployable artifact the run records (raises on the first altered file)."""
    checked = []
    for row in artifacts.deployable():
        if run.has(row.filename):
            run.checked_file(row.filename)
            checked.append(row.filename)
    return checked


def verify_artifacts(
    run_path: str | os.PathLike[str], backend: str, precisions: list[str] | None = None, *, data: str | None = None,
    samples: int | None = None, device: str = "cpu",
) -> list[VerificationReport]:
    """Each published artifact of ``backend`` (onnx, trt) at ``precisions`` against the stored reference.

    With ``data``, the reference is recomputed on that dataset's held-out images by the
    run's torch model (which needs PyTorch); without it nothing here imports torch.
    """
    if samples is not None and samples < 0:
        raise MMExportError(f"--samples must be >= 0, got {samples}")
    runner_name = {"onnx": "onnxruntime", "trt": "tensorrt"}.get(backend)
    if runner_name is None:
        raise MMExportError(f"unknown backend {backend!r} for deployed artifacts; choose onnx or trt")
    run = RunDir.open(run_path)
    check_deployables_intact(run)
    rows = [row for row in artifacts.deployable(runner_name) if precisions is None or row.precision in precisions]
    for precision in precisions or []:
        artifacts.check_precision(precision)
    present = [row for row in rows if run.has(row.filename)]
    if precisions is not None:
        missing = [row for row in rows if not run.has(row.filename)]
        if missing:
            row = missing[0]
            raise MMExportError(f"{run.path}: no {row.precision} {backend} artifact ({row.filename}); make it with `{row.made_by}`")
    if not present:
        command = "mmexport fold RUN --to onnx" if backend == "onnx" else "mmexport fold RUN --to trt"
        raise MMExportError(f"{run.path}: no {backend} artifact yet; make one with `{command}`")
    if data is not None:
        from mmexport.workflows import _reference_for  # torch side: recompute the reference on --data
        from mmexport.modelfile import load_model

        model, info = load_model(run.checked_file(artifacts.filename("model")))
        reference = _reference_for(run, model, info, data, samples)
    else:
        reference = run.reference()
    reports = []
    for row in present:
        path = run.checked_file(row.filename)
        with _runner_for(row, path, device) as runner:
            report = check_runner(runner, reference, for_precision(row.precision), random_limit=samples)
        run.add_verification({"artifact": row.filename, "command": "verify", **report.as_dict()})
        reports.append(report)
    return reports


@dataclass
class OutputState:
    name: str
    entry: dict[str, Any]
    state: str  # "intact" or why not
    registry: artifacts.Artifact | None


@dataclass
class RunSummary:
    path: str
    manifest: dict[str, Any]
    outputs: list[OutputState]
    verifications: list[dict[str, Any]]
    coefficients: list[dict[str, Any]] | None = None  # None: needs PyTorch, which is not installed
    warnings: list[str] = field(default_factory=list)


def inspect_run(run_path: str | os.PathLike[str], *, coefficients: bool = True) -> RunSummary:
    """The manifest, each output's state (hash-checked), the verifications of published artifacts,
    and the per-layer merge coefficients (when torch is installed)."""
    run = RunDir.open(run_path)
    outputs = []
    for name, entry in run.manifest.get("outputs", {}).items():
        try:
            run.checked_file(name)
            state = "intact"
        except MMExportError as exc:
            state = str(exc)
        outputs.append(OutputState(name, entry, state, artifacts.by_filename(name)))
    published = set(run.manifest.get("outputs", {}))
    # A failed check of a file that was never published is history, not a state of the run:
    # show the latest record of each artifact that exists, and failures only of files that exist.
    latest: dict[str, dict[str, Any]] = {}
    for record in run.manifest.get("verification", []):
        latest[record.get("artifact", "?")] = record
    verifications = [r for name, r in latest.items() if name in published]
    rows = None
    if coefficients and run.has(artifacts.filename("unmerged")):
        try:
            from mmexport.coefficients import layer_coefficients
        except ImportError:
            rows = None
        else:
            rows = layer_coefficients(run)
    return RunSummary(str(run.path), run.manifest, outputs, verifications, rows)


__all__ = ["OutputState", "RunSummary", "check_deployables_intact", "inspect_run", "verify_artifacts"]
