"""Operations on an existing run that need PyTorch: fold, the fold check, ONNX export, comparison models.

Every file name, precision and model kind comes from :mod:`mmexport.artifacts`.
Every artifact is written under a hidden temporary name, verified against the
run's stored reference outputs (``reference.npz``) under the tolerance row of its
registry entry, and only then published and hashed into the manifest
(:meth:`RunDir.publish_verified`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from mmexport import artifacts
from mmexport.artifacts import COMPARISON_KINDS
from mmexport.config import check_int
from mmexport.convert.onnxfile import get_metadata, load_onnx, set_metadata, stamp_metadata
from mmexport.convert.precision import DEFAULT_CALIBRATION_IMAGES, convert_fp16, quantize_int8
from mmexport.errors import DataError, MMExportError, VerificationError
from mmexport.fileio import write_bytes_atomic
from mmexport.progress import ProgressSink, sink
from mmexport.runs.lock import writes_run
from mmexport.runs.manifest import PublishedArtifact, RunDir, published
from mmexport.runs.provenance import artifact_provenance, verification_metadata
from mmexport.runs.verify import check_deployables_intact, check_onnx_file, describes_run
from mmexport.runtime.check import check_model_info
from mmexport.runtime.compare import VerificationReport
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.reference import ReferenceData
from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.data import TaskData, check_recorded_data, load_task, recorded_spec
from mmexport.torchside.fold import fold
from mmexport.torchside.merge import MergedModel
from mmexport.torchside.modelfile import load_model, load_unmerged, save_model
from mmexport.torchside.reference import make_reference, verify_fold, with_outputs
from mmexport.torchside.train import resolve_device

FOLD_FORMATS = ("safetensors", "pt")


# -- fold ------------------------------------------------------------------------------------------------------


def _save_pt(path: Path, model: torch.nn.Module, info: ModelInfo) -> None:
    # A plain dict of tensors and strings: loadable with torch.load(weights_only=True).
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "mmexport": {**info.to_metadata(), "stage": "folded"}}, path)


def merge_run(run_path: str | os.PathLike[str]) -> RunDir:
    """Open a run that has a merge to fold or verify (baseline methods have none)."""
    run = RunDir.open(run_path)
    if not run.has(artifacts.filename("unmerged")):
        method = run.manifest.get("training", {}).get("method", "?")
        raise MMExportError(f"{run.path}: a {method} run has no unmerged model to fold or verify against")
    return run


@writes_run("fold")
def fold_run(run_path: str | os.PathLike[str], to: str = "safetensors", samples: int = 32) -> PublishedArtifact:
    """Re-fold the run's unmerged checkpoint, verify it, and write ``folded.<to>`` into the run."""
    if to not in FOLD_FORMATS:
        raise MMExportError(f"unknown fold format {to!r}; choose one of {', '.join(artifacts.FOLD_TARGETS)}")
    run = merge_run(run_path)
    merged, info = load_unmerged(run.checked_file(artifacts.filename("unmerged")))
    folded = fold(merged)
    key = "folded" if to == "safetensors" else "folded-pt"
    name = artifacts.filename(key)
    previous = run.manifest["outputs"].get(name, {}).get("sha256")

    def write(tmp: Path) -> None:
        if to == "safetensors":
            save_model(tmp, folded, info, "folded")
        else:
            _save_pt(tmp, folded, info)

    details = {"stage": "folded"} if to == "safetensors" else {"stage": "folded", "format": "torch-state-dict"}
    return run.publish_verified(
        name, write, lambda tmp: verify_fold(merged, folded, None, info, samples, seed=0, device=torch.device("cpu")),
        "model", details, command="fold", previous_sha256=previous)


@writes_run("verify")
def verify_run(
    run_path: str | os.PathLike[str], data: str | None = None, samples: int = 64, seed: int = 0, device: str = "cpu"
) -> VerificationReport:
    """Unmerged vs folded of a run, on random inputs and optionally real images; recorded in the manifest."""
    # refused before anything is loaded: zero random inputs would compare nothing and report no reason
    check_int(samples, "--samples", low=1)
    run = merge_run(run_path)
    check_deployables_intact(run)  # every verify hash-checks every deployable artifact, whatever it compares
    unmerged_name, folded_name = artifacts.filename("unmerged"), artifacts.filename("folded")
    merged, info = load_unmerged(run.checked_file(unmerged_name))
    folded, folded_info = load_model(run.checked_file(folded_name))
    check_model_info(folded_info, info, f"{run.path / folded_name} (against {unmerged_name})")
    task = task_for(data, info, "--data", run=run) if data is not None else None
    report = verify_fold(merged, folded, task, info, samples, seed, resolve_device(device))
    run.add_verification({"artifact": folded_name, "command": "verify", **report.as_dict()})
    if not report.passed:
        raise VerificationError(f"{folded_name}: verification failed: " + "; ".join(report.failures()), report)
    return report


# -- datasets ------------------------------------------------------------------------------------------------


def task_for(spec: str, info: ModelInfo, what: str, *, same_classes: bool = True, run: RunDir | None = None) -> TaskData:
    """Load ``spec`` for ``info``'s model. With ``run``: refuse it where it names the run's own dataset
    (its path as given at training) but now resolves elsewhere or its content changed."""
    # the run's own DICOM pixel policy: evaluating with another would judge other pixels without an error
    task = load_task(spec, image_size=info.image_size, dicom=info.preprocessing.dicom)
    if same_classes and list(task.classes) != list(info.classes):
        raise DataError(f"{what} {spec}: classes {task.classes} differ from the model's {list(info.classes)}")
    if run is not None:
        check_recorded_data(spec, task, run.manifest.get("inputs", {}).get("data"),
                            run_spec=run.manifest.get("config", {}).get("data"), what=what)
    return task


def run_data_spec(run: RunDir) -> str | None:
    """The run's training dataset, with the absolute path recorded at training (never re-resolved against the cwd)."""
    spec = run.manifest.get("config", {}).get("data")
    return recorded_spec(spec, run.manifest.get("inputs", {}).get("data")) if spec else None


def _reference_for(run: RunDir, model: nn.Module, info: ModelInfo, data: str | None, samples: int | None) -> ReferenceData:
    """The stored reference, or (with ``--data``) a fresh one on that dataset's held-out images."""
    if data is None:
        return run.reference()
    task = task_for(data, info, "--data", run=run)
    return make_reference(model, task, info, run.manifest["outputs"][artifacts.filename("model")]["sha256"],
                          random_count=samples if samples is not None else 64)


def reference_on_data(run: RunDir, data: str, samples: int | None) -> ReferenceData:
    """A fresh reference on ``data``'s held-out images, computed by the run's final network (``verify --data``)."""
    model, info = load_model(run.checked_file(artifacts.filename("model")))
    return _reference_for(run, model, info, data, samples)


def _check_onnx(path: Path, reference: ReferenceData, precision: str, label: str, samples: int | None,
                run: RunDir | None = None, info: ModelInfo | None = None) -> VerificationReport:
    """``path`` on the reference; with ``run`` and ``info`` (a deployable artifact) also its embedded description
    against the run's, as :func:`mmexport.runs.verify.verify_artifacts` judges it later."""
    describes = functools.partial(describes_run, run, label, recorded=info) if run is not None else None
    return check_onnx_file(path, reference, precision, label, samples, describes=describes)


# -- ONNX export ---------------------------------------------------------------------------------------------


@writes_run("export")
def export_onnx_run(
    run_path: str | os.PathLike[str], precision: str = "fp32", *, calib_data: str | None = None,
    calib_images: int | None = None, data: str | None = None, int8_target: str = "onnxruntime",
    calib_method: str = "minmax", samples: int | None = None, progress: ProgressSink | None = None,
    allow_unverified: bool = False, accuracy_aware: bool = True, int8_max_float: float = 0.5,
) -> dict[str, PublishedArtifact]:
    """Export the run's final network to ONNX at ``precision``, verify it against the stored reference, publish it.

    fp16 and int8 are made from the fp32 export (which is made first when missing). int8
    is calibrated on ``calib_data`` (default: the run's training split; any images of the
    model's size will do, labels are not used) and judged on the labelled held-out
    images of the reference (or of ``data``). With ``accuracy_aware`` (default) an int8
    graph that fails the policy keeps its most sensitive layers in float until it holds
    (:func:`mmexport.convert.precision.quantize_int8`). ``allow_unverified`` publishes an
    artifact that failed its check, marked unverified in its metadata and the manifest.
    """
    from mmexport.torchside.onnx_export import export_onnx

    artifacts.check_precision(precision)
    progress = sink(progress)
    run = RunDir.open(run_path)
    model_name = artifacts.filename("model")
    model, info = load_model(run.checked_file(model_name))
    reference = _reference_for(run, model, info, data, samples)
    weights_sha = run.manifest["outputs"][model_name]["sha256"]
    results: dict[str, PublishedArtifact] = {}
    mark = mark_onnx_unverified if allow_unverified else None
    provenance = artifact_provenance(run.manifest)
    stamp = functools.partial(stamp_onnx_provenance, provenance=provenance, reference=_reference_record(run, data))

    fp32 = artifacts.onnx_artifact("fp32")
    if precision == "fp32" or not run.has(fp32.filename):
        progress.message(f"exporting {fp32.filename} (torch.onnx, dynamo)")
        results["fp32"] = run.publish_verified(
            fp32.filename, lambda tmp: export_onnx(model, info, tmp, weights_sha256=weights_sha,
                                                   kind=provenance["model_kind"], provenance=provenance),
            lambda tmp: _check_onnx(tmp, reference, "fp32", fp32.filename, samples, run, info),
            "onnx", {"precision": "fp32", "source": model_name}, command="export", mark_unverified=mark, stamp=stamp)
    fp32_path = run.checked_file(fp32.filename)

    if precision == "fp16":
        target = artifacts.onnx_artifact("fp16")
        progress.message(f"converting to fp16: {target.filename}")
        results["fp16"] = run.publish_verified(
            target.filename, lambda tmp: convert_fp16(fp32_path, tmp),
            lambda tmp: _check_onnx(tmp, reference, "fp16", target.filename, samples, run, info),
            "onnx", {"precision": "fp16", "source": fp32.filename}, command="export", mark_unverified=mark, stamp=stamp)
    elif precision == "int8":
        target = artifacts.onnx_artifact("int8")
        calib_spec = calib_data or run_data_spec(run)
        if not calib_spec:
            raise DataError("int8 needs calibration images: pass --calib-data")
        limit = DEFAULT_CALIBRATION_IMAGES if calib_images is None else calib_images
        check_int(limit, "--calib-images")
        calib_task = task_for(calib_spec, info, "--calib-data", same_classes=False, run=run)
        calibration, _ = calib_task.arrays("train", limit=limit, spread=True)
        if reference.labelled_set is None:
            raise DataError("int8 is judged on labelled held-out data and the reference has none: pass --data")

        def judge(path: Path) -> VerificationReport:
            return _check_onnx(path, reference, "int8", target.filename, samples)
        results["int8"] = run.publish_verified(
            target.filename,
            lambda tmp: quantize_int8(fp32_path, tmp, calibration, target=int8_target, method=calib_method,
                                      max_images=limit, progress=progress, judge=judge if accuracy_aware else None,
                                      max_float_fraction=int8_max_float),
            lambda tmp: _check_onnx(tmp, reference, "int8", target.filename, samples, run, info),
            "onnx", {"precision": "int8", "source": fp32.filename, "calibration_data": calib_spec}, command="export",
            mark_unverified=mark, stamp=stamp)
    return results


def _reference_record(run: RunDir, data: str | None) -> dict[str, object]:
    """What a deployable ONNX file is judged against, as its embedded verification names it."""
    if data is not None:
        return {"file": None, "sha256": None, "note": "a fresh reference on --data, computed by the run's final network"}
    name = artifacts.filename("reference")
    return {"file": name, "sha256": run.manifest["outputs"][name]["sha256"]}


def stamp_onnx_provenance(path: Path, record: dict, *, provenance: dict[str, str],
                          reference: dict[str, object]) -> dict[str, object]:
    """Write the run's provenance and the file's own check (``record``, as the manifest keeps it) into the checked
    ONNX file's metadata, graph untouched (:func:`mmexport.convert.onnxfile.stamp_metadata`). A file converted from
    another (fp16, int8) inherits that one's fields and gets its own ``verification`` here."""
    from mmexport.convert.onnxfile import graph_sha256

    graph = graph_sha256(load_onnx(path))
    fields = {**provenance, **verification_metadata(record, graph_sha256=graph, reference=reference)}
    stamped = stamp_metadata(path, fields)
    return {"graph_sha256": stamped, "provenance_embedded": True}


def mark_onnx_unverified(path: Path, reason: str) -> None:
    """Write the failed check into the ONNX file itself (``mmexport_unverified``), so no copy of it looks verified."""
    model = load_onnx(path)
    set_metadata(model, {**get_metadata(model), "mmexport_unverified": reason[:2000]})
    write_bytes_atomic(path, model.SerializeToString())


# -- comparison models (benchmark baselines) -----------------------------------------------------------------


def dual_from_merged(merged: MergedModel) -> nn.Module:
    """Sources A and B side by side, each with the run's head, logits averaged (an ensemble's cost)."""
    from mmexport.torchside.onnx_export import DualBackbone

    template_state = merged.template.state_dict()
    members = []
    for bag in merged.sources:
        member = get_backbone(merged.arch).build(merged.num_classes)
        state = {name: bag.get(name) for name in merged.merge_names}
        state.update({k: template_state[k] for k in merged.head_names + merged.buffer_names})
        member.load_state_dict(state, strict=True)
        members.append(member.eval())
    return DualBackbone(*members)


def stock_network(arch: str, num_classes: int) -> nn.Module:
    """The stock torchvision network with a fixed initialisation, built without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_backbone(arch).build(num_classes).eval()


def comparison_modules(run: RunDir, kinds: tuple[str, ...]) -> tuple[dict[str, nn.Module], ModelInfo]:
    """The torch modules of ``kinds`` (folded, unmerged, dual, single) for a run."""
    folded, info = load_model(run.checked_file(artifacts.filename("model")))
    modules: dict[str, nn.Module] = {}
    merged = None
    if {"unmerged", "dual"} & set(kinds):
        if not run.has(artifacts.filename("unmerged")):
            raise MMExportError(f"{run.path}: a run without a merge has no unmerged/dual model; use --models folded,single")
        merged, _ = load_unmerged(run.checked_file(artifacts.filename("unmerged")))
    for kind in kinds:
        if kind == "folded":
            modules[kind] = folded
        elif kind == "unmerged":
            modules[kind] = merged.eval()
        elif kind == "dual":
            modules[kind] = dual_from_merged(merged).eval()
        else:
            modules[kind] = stock_network(info.arch, info.num_classes)
    return modules, info


@writes_run("export comparisons")
def export_comparison(run: RunDir, kind: str, precision: str, *, progress: ProgressSink | None = None) -> PublishedArtifact:
    """Make (or reuse, by hash) the ONNX comparison model ``kind`` at ``precision``, verified like every artifact.

    The reference is the torch fp32 model of the same kind on the run's stored inputs.
    A comparison model that fails its check is still written (it is not deployable) but
    recorded as unverified, and the benchmark labels its rows so.
    """
    from mmexport.torchside.onnx_export import export_dual_onnx, export_onnx, export_unmerged_onnx

    progress = sink(progress)
    row = artifacts.comparison_artifact(kind, precision)
    if run.has(row.filename):
        run.checked_file(row.filename)
        return published(run, row.filename, None)
    modules, info = comparison_modules(run, (kind,))
    module = modules[kind]
    reference = with_outputs(module, run.reference(), name=f"{kind} torch fp32")
    weights_sha = run.manifest["outputs"][artifacts.filename("unmerged" if kind != "single" else "model")]["sha256"]
    if precision == "fp32":
        exporter = {"single": lambda m, i, p, **kw: export_onnx(m, i, p, kind="single", **kw),
                    "unmerged": export_unmerged_onnx, "dual": export_dual_onnx}[kind]
        progress.message(f"exporting the {kind} comparison model to ONNX ({row.filename})")
        write = lambda tmp: exporter(module, info, tmp, weights_sha256=weights_sha)  # noqa: E731
    else:
        source = export_comparison(run, kind, "fp32", progress=progress).path
        if precision == "fp16":
            progress.message(f"converting the {kind} comparison model to fp16 ({row.filename})")
            write = lambda tmp: convert_fp16(source, tmp)  # noqa: E731
        else:
            calib = load_task(run_data_spec(run), image_size=info.image_size,
                              dicom=info.preprocessing.dicom).arrays("train", limit=64, spread=True)[0]
            write = lambda tmp: quantize_int8(source, tmp, calib, max_images=64, progress=progress)  # noqa: E731
    details = {"precision": precision, "model_kind": kind, "note": "benchmark comparison model, not deployable"}
    try:
        return run.publish_verified(
            row.filename, write, lambda tmp: _check_onnx(tmp, reference, precision, row.filename, None), "bench-model",
            details, command="bench")
    except VerificationError as exc:
        progress.message(f"the {kind} {precision} comparison model failed its check; its rows are marked unverified")
        run.write_output(row.filename, write, "bench-model", **details, verified=False)
        return published(run, row.filename, exc.report)


__all__ = [
    "COMPARISON_KINDS", "FOLD_FORMATS", "PublishedArtifact", "comparison_modules", "dual_from_merged", "export_comparison",
    "export_onnx_run", "fold_run", "merge_run", "stamp_onnx_provenance", "stock_network", "task_for", "verify_run",
]
