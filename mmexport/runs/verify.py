"""Verify a run's deployed artifacts against the stored reference (no PyTorch needed).

A GPU host with TensorRT and no torch runs ``mmexport verify RUN --backend trt``
through here: every artifact is hash-checked against the manifest, run on the
reference inputs of ``reference.npz``, and judged by
:func:`mmexport.runtime.compare.compare_sets` under its registry row's tolerance.

Each artifact is also judged *as deployed*: the model description it carries (classes,
input size, the whole preprocessing block, read the way the runtime reads it) must be
the one the run recorded (:func:`run_model_info`), field for field
(:func:`mmexport.runtime.check.check_model_info`). The stored reference inputs are
already preprocessed, so an altered ``std`` or class list would pass the numbers and
still make a server normalise differently and name another class.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from mmexport import artifacts
from mmexport.convert.fp16_recipe import fp16_emulation_graph
from mmexport.convert.onnxfile import load_onnx, read_onnx_metadata
from mmexport.errors import MMExportError, RunDirError, VerificationError
from mmexport.jsonread import parse_json_object
from mmexport.runs.lock import writes_run
from mmexport.runs.manifest import RunDir
from mmexport.runtime.check import check_model_info, check_runner
from mmexport.runtime.compare import InputSetReport, VerificationReport
from mmexport.runtime.engine import EngineSidecar, check_engine, sidecar_path
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import Preprocessing
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


def _safetensors_metadata(path) -> dict[str, str]:
    """The ``str -> str`` metadata of a safetensors file, read from its header (no torch; tensors untouched)."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable safetensors header ({type(exc).__name__})") from None
    packed = metadata.get("mmexport")  # the model files pack their description as one JSON entry
    if packed is None:
        return metadata
    fields = parse_json_object(packed, f"{path}: metadata", error=RunDirError)
    return {str(k): str(v) for k, v in fields.items()}


def _manifest_model_info(block: Any, where: str) -> ModelInfo:
    """The manifest's ``model`` block (``ModelInfo.as_dict()``, written at training) as a :class:`ModelInfo`."""
    try:
        return ModelInfo(
            arch=block["arch"], classes=tuple(block["classes"]), image_size=int(block["image_size"]),
            mean=tuple(block["mean"]), std=tuple(block["std"]), channel_order=block.get("channel_order", "RGB"),
            layout=block.get("layout", "NCHW"),
            preprocessing=Preprocessing.from_dict(block["preprocessing"]) if block.get("preprocessing") else None,
        )
    except MMExportError as exc:
        raise RunDirError(f"{where}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RunDirError(f"{where}: malformed model description ({type(exc).__name__}: {exc})") from None


def run_model_info(run: RunDir) -> ModelInfo:
    """The model description the run recorded: the one in its final weights file (hash-checked against the
    manifest, the file its reference outputs were computed from), which must also be the manifest's
    ``model`` block (what ``inspect`` shows)."""
    name = artifacts.filename("model")
    path = run.checked_file(name)
    recorded = ModelInfo.from_metadata(_safetensors_metadata(path), str(path))
    block = run.manifest.get("model")
    if block is not None:
        where = f"{run.path / 'manifest.json'} (model)"
        check_model_info(_manifest_model_info(block, where), recorded, where)
    return recorded


def describes_run(run: RunDir, filename: str, metadata: Mapping[str, str], *,
                  recorded: ModelInfo | None = None) -> ModelInfo:
    """The :class:`ModelInfo` a deployable artifact of ``run`` carries (``metadata``: its map as the runtime
    reads it), after checking it is the run's own, every field (:func:`~mmexport.runtime.check.check_model_info`).

    Raises :class:`VerificationError` naming the fields that differ. What exports an artifact of a run
    (an engine, a Triton repository) calls this before it trusts the description the file carries.
    """
    row = artifacts.by_filename(filename)
    deployed = ModelInfo.from_metadata(metadata, filename)
    weights = run.manifest["outputs"].get(artifacts.filename("model"), {}).get("sha256")
    check_model_info(deployed, recorded if recorded is not None else run_model_info(run), filename,
                     precision=row.precision if row is not None else None, weights_sha256=weights)
    return deployed


def _description_failed(label: str, precision: str, message: str) -> VerificationReport:
    """A failed report for an artifact whose own description is not the run's: nothing is run."""
    return VerificationReport("the run's model description", f"{label} as deployed", for_precision(precision), [],
                              notes=[message])


def _merge_reports(first: VerificationReport, second: VerificationReport, label: str) -> VerificationReport:
    """One report judging both: ``second``'s input sets are added with ``label`` in their names."""
    from dataclasses import replace

    extra = [InputSetReport(f"{s.name} ({label})", s.outputs) for s in second.input_sets]
    return replace(first, input_sets=first.input_sets + extra, notes=first.notes + second.notes)


def check_onnx_file(path, reference, precision: str, label: str, samples: int | None = None,
                    device: str = "cpu", *, describes: Callable[[Mapping[str, str]], object] | None = None,
                    ) -> VerificationReport:
    """An ONNX artifact run on the stored reference and judged by its precision's row.

    ``describes(metadata)``: judges the model description the file carries, as ONNX Runtime
    reads it (what the runtime deploys); a :class:`VerificationError` it raises fails the
    report without running the numbers (e.g. ``functools.partial(describes_run, run, name)``).

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
        if describes is not None:
            try:
                describes(runner.metadata())
            except VerificationError as exc:
                return _description_failed(label, precision, str(exc))
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
        raise MMExportError(f"--samples must be >= 0, got {samples}")  # 0: a failed check (zero samples prove nothing)
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
    recorded = run_model_info(run)
    reference = reference_from(run) if reference_from is not None else run.reference()
    reports = []
    for row in present:
        path = run.checked_file(row.filename)

        def describes(metadata: Mapping[str, str], name: str = row.filename) -> ModelInfo:
            return describes_run(run, name, metadata, recorded=recorded)
        if row.runner == "onnxruntime":
            refuse_external_data(path)
            report = check_onnx_file(path, reference, row.precision, row.filename, samples, device, describes=describes)
        else:
            # the sidecar carries the engine's description (hash-checked where the run records it, as
            # every writer does); judged before the engine is loaded, so it holds without TensorRT too
            sidecar = run.checked_file(row.sidecar) if row.sidecar and run.has(row.sidecar) else sidecar_path(path)
            try:
                describes(EngineSidecar.read(sidecar).model_metadata)
            except VerificationError as exc:
                report = _description_failed(row.filename, row.precision, str(exc))
            else:
                with _runner_for(row, path, device) as runner:
                    report = check_runner(runner, reference, for_precision(row.precision), random_limit=samples)
        run.add_verification({"artifact": row.filename, "command": "verify", **report.as_dict()})
        reports.append(report)
    return reports


__all__ = ["check_deployables_intact", "check_onnx_file", "describes_run", "refuse_external_data", "run_model_info",
           "verify_artifacts"]
