"""Verify a run's deployed artifacts against the stored reference (no PyTorch needed).

A GPU host with TensorRT and no torch runs ``mmexport verify RUN --backend trt``
through here: every artifact is hash-checked against the manifest, run on the
reference inputs of ``reference.npz``, and judged by
:func:`mmexport.runtime.compare.compare_sets` under its registry row's tolerance.
"""

from __future__ import annotations

import os
from typing import Callable

from mmexport import artifacts
from mmexport.convert.fp16_recipe import fp16_emulation_graph
from mmexport.convert.onnxfile import load_onnx, read_onnx_metadata
from mmexport.errors import MMExportError
from mmexport.runs.lock import writes_run
from mmexport.runs.manifest import RunDir
from mmexport.runtime.check import check_runner
from mmexport.runtime.compare import InputSetReport, VerificationReport
from mmexport.runtime.engine import check_engine
from mmexport.runtime.reference import ReferenceData
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner, SessionFromOnnx
from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner
from mmexport.runtime.tolerances import for_precision


def refuse_external_data(path) -> None:
    """mmexport writes every ONNX file self-contained; a run artifact that points at external data files
    (which the manifest does not hash) has been altered and is refused before anything reads those files."""
    from onnx.external_data_helper import uses_external_data

    model = load_onnx(path)
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if external:
        raise MMExportError(f"{path}: refers to external data files ({len(external)} tensors, e.g. {external[0]}) "
                            "that the manifest does not cover; mmexport never writes those, so the file was altered")


def _merge_reports(first: VerificationReport, second: VerificationReport, label: str) -> VerificationReport:
    """One report judging both: ``second``'s input sets are added with ``label`` in their names."""
    from dataclasses import replace

    extra = [InputSetReport(f"{s.name} ({label})", s.outputs) for s in second.input_sets]
    return replace(first, input_sets=first.input_sets + extra, notes=first.notes + second.notes)


def check_onnx_file(path, reference, precision: str, label: str, samples: int | None = None,
                    device: str = "cpu") -> VerificationReport:
    """An ONNX artifact run on the stored reference and judged by its precision's row.

    On a CPU two precisions need more than one ONNX Runtime run to be judged honestly
    (measured in ``benchmarks/results/precision``):

    * fp16: ONNX Runtime's x86 CPU provider has no float16 kernels for these ops and
      runs a float16 graph in float32, so the plain run sees only the weights' rounding.
      The file is also run as :func:`~mmexport.convert.fp16_recipe.fp16_emulation_graph`
      (float16 storage, float32 accumulation, as GPU kernels compute; overflow is Inf)
      with graph optimisation off, and both runs must pass.
    * int8 for TensorRT (symmetric Q/DQ): ONNX Runtime's optimised CPU graph differs
      from the Q/DQ arithmetic by 0.2–1 point, so it is judged with graph optimisation
      off — the arithmetic TensorRT implements.
    """
    from pathlib import Path

    tolerance = for_precision(precision)
    metadata = read_onnx_metadata(path)
    providers = "cuda" if device.startswith("cuda") else "cpu"
    level = "disable" if precision == "int8" and metadata.get("int8_target") == "tensorrt" else "all"
    name = f"onnxruntime {precision} ({label})" + (" [Q/DQ arithmetic: graph optimisation off]" if level == "disable" else "")
    with OnnxRuntimeRunner(SessionFromOnnx(Path(path), providers=providers, graph_optimization_level=level),
                           name=name) as runner:
        report = check_runner(runner, reference, tolerance, random_limit=samples)
    if precision == "fp16" and providers == "cpu":

        emulated = fp16_emulation_graph(load_onnx(path)).SerializeToString()
        with OnnxRuntimeRunner(SessionFromOnnx(emulated, providers="cpu", graph_optimization_level="disable"),
                               name=f"fp16 arithmetic emulated ({label})") as runner:
            second = check_runner(runner, reference, tolerance, random_limit=samples)
        report = _merge_reports(report, second, "fp16 arithmetic emulated")
    return report


def _runner_for(row: artifacts.Artifact, path, device: str = "cpu"):
    if row.runner == "onnxruntime":
        refuse_external_data(path)

        return OnnxRuntimeRunner(path, name=f"onnxruntime {row.precision} ({row.filename})",
                                 providers="cuda" if device.startswith("cuda") else "cpu")
    if row.runner == "tensorrt":

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


@writes_run("verify")
def verify_artifacts(
    run_path: str | os.PathLike[str], backend: str, precisions: list[str] | None = None, *,
    reference_from: Callable[[RunDir], ReferenceData] | None = None, samples: int | None = None, device: str = "cpu",
) -> list[VerificationReport]:
    """Each published artifact of ``backend`` (onnx, trt) at ``precisions`` against the stored reference.

    ``reference_from(run)`` replaces the stored reference (the CLI's ``--data`` hands in the torch
    side's :func:`mmexport.torchside.operations.reference_on_data`); it is called only once the run
    and its artifacts have passed their checks. Without it nothing here imports torch.
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
    reference = reference_from(run) if reference_from is not None else run.reference()
    reports = []
    for row in present:
        path = run.checked_file(row.filename)
        if row.runner == "onnxruntime":
            refuse_external_data(path)
            report = check_onnx_file(path, reference, row.precision, row.filename, samples, device)
        else:
            with _runner_for(row, path, device) as runner:
                report = check_runner(runner, reference, for_precision(row.precision), random_limit=samples)
        run.add_verification({"artifact": row.filename, "command": "verify", **report.as_dict()})
        reports.append(report)
    return reports


__all__ = ["check_deployables_intact", "check_onnx_file", "refuse_external_data", "verify_artifacts"]
