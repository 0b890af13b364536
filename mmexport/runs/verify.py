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
from mmexport.runlock import writes_run
from mmexport.runtime.check import check_runner
from mmexport.runtime.compare import VerificationReport
from mmexport.runtime.tolerances import for_precision


def refuse_external_data(path) -> None:
    """mmexport writes every ONNX file self-contained; a run artifact that points at external data files
    (which the manifest does not hash) has been altered and is refused before anything reads those files."""
    from onnx.external_data_helper import uses_external_data

    from mmexport.export.onnxfile import load_onnx

    model = load_onnx(path)
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if external:
        raise MMExportError(f"{path}: refers to external data files ({len(external)} tensors, e.g. {external[0]}) "
                            "that the manifest does not cover; mmexport never writes those, so the file was altered")


def _merge_reports(first: VerificationReport, second: VerificationReport, label: str) -> VerificationReport:
    """One report judging both: ``second``'s input sets are added with ``label`` in their names."""
    from dataclasses import replace

    from mmexport.runtime.compare import InputSetReport

    extra = [InputSetReport(f"{s.name} ({label})", s.outputs) for s in second.input_sets]
    return replace(first, input_sets=first.input_sets + extra, notes=first.notes + second.notes)


def check_onnx_file(path, reference, precision: str, label: str, samples: int | None = None,
                    device: str = "cpu") -> VerificationReport:
    """An ONNX artifact run on the stored reference and judged by its precision's row.

    On a CPU two precisions need more than one ONNX Runtime run to be judged honestly
    (measured in ``benchmarks/results/precision``):

    * fp16: ONNX Runtime's x86 CPU provider has no float16 kernels for these ops and
      runs a float16 graph in float32, so the plain run sees only the weights' rounding.
      The file is also run as :func:`~mmexport.export.fp16_recipe.fp16_emulation_graph`
      (float16 storage, float32 accumulation, as GPU kernels compute; overflow is Inf)
      with graph optimisation off, and both runs must pass.
    * int8 for TensorRT (symmetric Q/DQ): ONNX Runtime's optimised CPU graph differs
      from the Q/DQ arithmetic by 0.2–1 point, so it is judged with graph optimisation
      off — the arithmetic TensorRT implements.
    """
    from pathlib import Path

    from mmexport.export.onnxfile import read_onnx_metadata
    from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner, SessionFromOnnx

    tolerance = for_precision(precision)
    metadata = read_onnx_metadata(path)
    providers = "cuda" if device.startswith("cuda") else "cpu"
    level = "disable" if precision == "int8" and metadata.get("int8_target") == "tensorrt" else "all"
    name = f"onnxruntime {precision} ({label})" + (" [Q/DQ arithmetic: graph optimisation off]" if level == "disable" else "")
    with OnnxRuntimeRunner(SessionFromOnnx(Path(path), providers=providers, graph_optimization_level=level),
                           name=name) as runner:
        report = check_runner(runner, reference, tolerance, random_limit=samples)
    if precision == "fp16" and providers == "cpu":
        from mmexport.export.fp16_recipe import fp16_emulation_graph
        from mmexport.export.onnxfile import load_onnx

        emulated = fp16_emulation_graph(load_onnx(path)).SerializeToString()
        with OnnxRuntimeRunner(SessionFromOnnx(emulated, providers="cpu", graph_optimization_level="disable"),
                               name=f"fp16 arithmetic emulated ({label})") as runner:
            second = check_runner(runner, reference, tolerance, random_limit=samples)
        report = _merge_reports(report, second, "fp16 arithmetic emulated")
    return report


def _runner_for(row: artifacts.Artifact, path, device: str = "cpu"):
    if row.runner == "onnxruntime":
        refuse_external_data(path)
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


@writes_run("verify")
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
        if row.runner == "onnxruntime":
            refuse_external_data(path)
            report = check_onnx_file(path, reference, row.precision, row.filename, samples, device)
        else:
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


# -- provenance ------------------------------------------------------------------------------------------------


@dataclass
class FileState:
    name: str
    kind: str
    state: str  # intact, altered, missing
    expected_sha256: str
    actual_sha256: str | None
    verified: bool | None  # the latest check of this file passed (None: never checked)


@dataclass
class ProvenanceReport:
    run: str
    files: list[FileState]
    inputs: list[tuple[str, str, str]]  # (input, sha256 recorded, state now: unchanged / changed / not reachable here)
    chains: list[list[str]]  # per deployable artifact: itself, what it was made from, ... down to the sources
    repositories: list[tuple[str, str, str]] = field(default_factory=list)  # (repository file, state, detail)
    untracked: list[str] = field(default_factory=list)  # files in the run the manifest does not list

    @property
    def passed(self) -> bool:
        return all(f.state == "intact" for f in self.files) and all(state == "intact" for _, state, _ in self.repositories)


def _latest_verification(manifest: dict[str, Any]) -> dict[str, bool]:
    latest: dict[str, bool] = {}
    for record in manifest.get("verification", []):
        latest[record.get("artifact", "?")] = bool(record.get("passed"))
    return latest


def _chain(manifest: dict[str, Any], name: str) -> list[str]:
    """``name`` and everything it was made from, by the manifest's ``source`` fields and the registry's rows."""
    outputs = manifest.get("outputs", {})
    chain, seen = [], set()
    current: str | None = name
    while current and current not in seen:
        seen.add(current)
        chain.append(current)
        entry = outputs.get(current, {})
        row = artifacts.by_filename(current)
        parent = entry.get("source")
        if parent is None and row is not None:
            made_from = [artifacts.REGISTRY[key].filename for key in row.made_from if key in artifacts.REGISTRY]
            parent = next((f for f in made_from if f in outputs and f != artifacts.filename("reference")), None)
            if parent is None and any(key.startswith("source") for key in row.made_from):
                chain.append("sources: " + ", ".join(
                    f"{k} {str(manifest.get('inputs', {}).get(k, {}).get('sha256') or '?')[:12]}"
                    for k in ("source_a", "source_b") if k in manifest.get("inputs", {})))
        current = parent
    return chain


def _input_state(entry: dict[str, Any]) -> str:
    from pathlib import Path

    from mmexport.fileio import sha256_file

    spec, recorded = entry.get("path") or entry.get("spec"), entry.get("sha256")
    if not recorded or not spec or not Path(str(spec)).is_file():
        return "not reachable here"
    return "unchanged" if sha256_file(spec) == recorded else "CHANGED since the run was trained"


def verify_manifest(run_path: str | os.PathLike[str]) -> ProvenanceReport:
    """Re-hash every file the manifest lists (and every Triton repository the run exported) and trace each
    deployable artifact back to the source checkpoints. Reads only; nothing is written."""
    from pathlib import Path

    from mmexport.fileio import sha256_file
    from mmexport.manifest import MANIFEST_NAME

    run = RunDir.open(run_path)
    manifest = run.manifest
    latest = _latest_verification(manifest)
    files = []
    for name, entry in manifest["outputs"].items():
        path = run.file(name)
        actual = sha256_file(path) if path.is_file() else None
        state = "missing" if actual is None else ("intact" if actual == entry["sha256"] else "altered")
        files.append(FileState(name, entry.get("kind", "?"), state, entry["sha256"], actual, latest.get(name)))
    listed = set(manifest["outputs"]) | {MANIFEST_NAME}
    untracked = sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*")
                       if p.is_file() and str(p.relative_to(run.path)) not in listed)
    inputs = [(key, str(value.get("sha256") or "—"), _input_state(value))
              for key, value in manifest.get("inputs", {}).items() if isinstance(value, dict) and "sha256" in value]
    chains = [_chain(manifest, row.filename) for row in artifacts.deployable() if row.filename in manifest["outputs"]]
    repositories = []
    for repo in manifest.get("triton_repositories", []):
        base = Path(repo["path"]) / repo["model"]  # files are recorded relative to the model folder
        for relative, expected in repo["files"].items():
            target = base / relative
            if not target.is_file():
                repositories.append((str(target), "missing", ""))
            else:
                ok = sha256_file(target) == expected
                repositories.append((str(target), "intact" if ok else "altered", "" if ok else f"expected {expected[:12]}…"))
    return ProvenanceReport(str(run.path), files, inputs, chains, repositories, untracked)


__all__ += ["FileState", "ProvenanceReport", "verify_manifest"]
