"""Operations on an existing run directory: fold, verify, inspect, ONNX export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from mmexport.data import load_task
from mmexport.errors import DataError, MMExportError, VerificationError
from mmexport.fold import fold
from mmexport.manifest import RunDir
from mmexport.modelfile import ModelInfo, load_model, load_unmerged, save_model, unpack_metadata
from mmexport.train import FOLDED_FILE, MODEL_FILE, UNMERGED_FILE, resolve_device, verify_fold
from mmexport.verify import VerificationReport

FOLD_FORMATS = ("safetensors", "pt")


def _save_pt(path: Path, model: torch.nn.Module, info: ModelInfo) -> None:
    # A plain dict of tensors and strings: loadable with torch.load(weights_only=True).
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "mmexport": {**info.to_metadata(), "stage": "folded"}}, path)


def _merge_run(run_path: str | os.PathLike[str]) -> RunDir:
    """Open a run that has a merge to fold or verify (baseline methods have none)."""
    run = RunDir.open(run_path)
    if UNMERGED_FILE not in run.manifest.get("outputs", {}):
        method = run.manifest.get("training", {}).get("method", "?")
        raise MMExportError(f"{run.path}: a {method} run has no unmerged model to fold or verify against")
    return run


def fold_run(run_path: str | os.PathLike[str], to: str = "safetensors", samples: int = 32) -> dict[str, Any]:
    """Re-fold the run's unmerged checkpoint, verify it, and write ``folded.<to>`` into the run."""
    if to not in FOLD_FORMATS:
        raise MMExportError(f"unknown fold format {to!r}; choose one of {', '.join(FOLD_FORMATS)}")
    run = _merge_run(run_path)
    merged, info = load_unmerged(run.checked_file(UNMERGED_FILE))
    folded = fold(merged)
    report = verify_fold(merged, folded, None, info, samples, seed=0, device=torch.device("cpu"))
    name = f"folded.{to}"
    run.add_verification({"artifact": name, "command": "fold", **report.as_dict()})
    if not report.passed:
        raise VerificationError(f"{name}: fold verification failed: " + "; ".join(report.failures()), report)
    previous = run.manifest["outputs"].get(name, {}).get("sha256")
    if to == "safetensors":
        run.write_output(name, lambda p: save_model(p, folded, info, "folded"), "model", stage="folded")
    else:
        run.write_output(name, lambda p: _save_pt(p, folded, info), "model", stage="folded", format="torch-state-dict")
    entry = run.manifest["outputs"][name]
    return {
        "path": str(run.file(name)),
        "sha256": entry["sha256"],
        "size_bytes": entry["size_bytes"],
        "reproduced": None if previous is None else previous == entry["sha256"],
        "report": report,
    }


def verify_run(
    run_path: str | os.PathLike[str], data: str | None = None, samples: int = 64, seed: int = 0, device: str = "cpu"
) -> VerificationReport:
    """Unmerged vs folded of a run, on random inputs and optionally real images; recorded in the manifest."""
    run = _merge_run(run_path)
    merged, info = load_unmerged(run.checked_file(UNMERGED_FILE))
    folded, folded_info = load_model(run.checked_file(FOLDED_FILE))
    if folded_info.classes != info.classes or folded_info.arch != info.arch:
        raise MMExportError(f"{run.path}: {FOLDED_FILE} and {UNMERGED_FILE} describe different models")
    task = _task_for(data, info, "--data") if data is not None else None
    report = verify_fold(merged, folded, task, info, samples, seed, resolve_device(device))
    run.add_verification({"artifact": FOLDED_FILE, "command": "verify", **report.as_dict()})
    if not report.passed:
        raise VerificationError(f"{FOLDED_FILE}: verification failed: " + "; ".join(report.failures()), report)
    return report


def layer_coefficients(run: RunDir) -> list[dict[str, Any]]:
    """Mean weight of source A per merged parameter, input to output, from the checkpoint's logits alone.

    Each row: ``name``, ``layer`` (conv, norm or linear: the module type) and ``mean``.
    """
    from mmexport.backbones import get_backbone
    from mmexport.checkpoints import load_safetensors_with_metadata
    from mmexport.merge import mixing_weights

    path = run.checked_file(UNMERGED_FILE)
    tensors, metadata = load_safetensors_with_metadata(path)
    metadata = unpack_metadata(metadata, str(path))
    num_sources = int(metadata.get("num_sources", "2"))
    with torch.device("meta"):
        template = get_backbone(metadata["arch"]).build(2)
    kinds = {name: _layer_kind(module) for name, module in template.named_modules()}
    rows = []
    for key, logit in tensors.items():
        if key.startswith("logit/"):
            name = key.split("/", 1)[1]
            weight_a = mixing_weights(logit, num_sources)[0]
            rows.append({"name": name, "layer": kinds.get(name.rpartition(".")[0], "other"), "mean": float(weight_a.mean())})
    order = {name: i for i, (name, _) in enumerate(template.named_parameters())}
    return sorted(rows, key=lambda row: order.get(row["name"], len(order)))


def _layer_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, torch.nn.modules.batchnorm._NormBase):
        return "norm"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "other"


def inspect_run(run_path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of the manifest plus the depth-wise coefficient profile."""
    run = RunDir.open(run_path)
    manifest = run.manifest
    outputs = {}
    for name, entry in manifest.get("outputs", {}).items():
        try:
            run.checked_file(name)
            state = "intact"
        except MMExportError as exc:
            state = str(exc)
        outputs[name] = {**entry, "state": state}
    return {
        "path": str(run.path),
        "manifest": manifest,
        "outputs": outputs,
        "coefficients": layer_coefficients(run) if UNMERGED_FILE in manifest.get("outputs", {}) else [],
    }


def plot_run_coefficients(run_path: str | os.PathLike[str], path: str | os.PathLike[str], *, all_layers: bool = False) -> Path:
    """Draw the run's depth-wise coefficient profile to ``path`` (PNG), atomically."""
    from mmexport.fileio import atomic_path
    from mmexport.plots import plot_coefficients

    run = RunDir.open(run_path)
    if UNMERGED_FILE not in run.manifest.get("outputs", {}):
        method = run.manifest.get("training", {}).get("method", "?")
        raise MMExportError(f"{run.path}: method {method} has no merge coefficients to plot")
    target = Path(path).expanduser().absolute()
    if target.suffix.lower() != ".png":
        raise MMExportError(f"{target}: the plot is written as PNG; name the file *.png")
    config = run.manifest.get("config", {})
    title = f"{config.get('arch', '?')} {config.get('method', 'medmerge')}: mean σ(λ) per layer (1 = source A)"
    with atomic_path(target) as tmp:
        plot_coefficients(layer_coefficients(run), tmp, title, arch=config.get("arch", ""),
                          layers="all" if all_layers else "conv")
    return target


# -- ONNX artifacts ------------------------------------------------------------------------------

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def _held_out(task, limit: int) -> tuple[str, tuple]:
    """Labelled images not trained on: the test split when there is one, else val."""
    split = "test" if "test" in task.splits else "val"
    return f"data:{split}", task.arrays(split, limit=limit, spread=True)


def _task_for(spec: str, info: ModelInfo, what: str):
    task = load_task(spec, image_size=info.image_size)
    if task.num_classes != info.num_classes:
        raise DataError(f"{what} {spec}: has {task.num_classes} classes, the model has {info.num_classes}")
    if list(task.classes) != list(info.classes):
        raise DataError(f"{what} {spec}: classes {task.classes} differ from the model's {list(info.classes)}")
    return task


def _publish_verified(run: RunDir, name: str, write: Callable[[Path], dict], check: Callable[[Path], VerificationReport],
                      kind: str, details: dict[str, Any]) -> tuple[dict[str, Any], VerificationReport]:
    """Write an artifact to a hidden temporary name in the run, verify it there, then publish it.

    A failed check removes the temporary file: nothing is published, the previous
    artifact (if any) stays, and the failed report is recorded in the manifest.
    """
    from mmexport.fileio import atomic_path

    with atomic_path(run.file(name)) as tmp:
        facts = write(tmp)
        report = check(tmp)
        run.add_verification({"artifact": name, "command": "export", **report.as_dict()})
        if not report.passed:
            raise VerificationError(f"{name}: verification failed, nothing published: " + "; ".join(report.failures()), report)
    recorded = {k: v for k, v in facts.items() if k not in ("sha256", "size_bytes")}
    run.record_output(name, kind, **{**recorded, **details})
    return facts, report


def export_onnx_run(
    run_path: str | os.PathLike[str], precision: str = "fp32", *, calib_data: str | None = None,
    calib_images: int | None = None, data: str | None = None, int8_target: str = "onnxruntime",
    calib_method: str = "minmax", samples: int = 64, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export the run's final network to ONNX at ``precision``, verify it against torch fp32, publish it.

    fp16 and int8 are made from the fp32 export (which is made first when missing). int8
    is calibrated on ``calib_data`` (default: the run's training split) and judged on
    labelled held-out images of ``data`` (default: the run's dataset; its test split
    when it has one, else val).
    """
    from mmexport.export import DEFAULT_CALIBRATION_IMAGES, convert_fp16, export_onnx, quantize_int8, verify_onnx_artifact
    from mmexport.export.onnx import PRECISIONS

    if precision not in PRECISIONS:
        raise MMExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    notify = progress or (lambda message: None)
    run = RunDir.open(run_path)
    model_path = run.checked_file(MODEL_FILE)
    model, info = load_model(model_path)
    data_spec = data or run.manifest.get("config", {}).get("data")
    task = _task_for(data_spec, info, "--data") if data_spec else None
    held_name, held = _held_out(task, limit=max(samples, 512)) if task is not None else ("data", None)
    results: dict[str, Any] = {}

    fp32_name = ONNX_FILES["fp32"]
    if precision == "fp32" or fp32_name not in run.manifest["outputs"]:
        notify(f"exporting {fp32_name}")
        facts, report = _publish_verified(
            run, fp32_name,
            lambda tmp: export_onnx(model, info, tmp, weights_sha256=run.manifest["outputs"][MODEL_FILE]["sha256"]),
            lambda tmp: verify_onnx_artifact(model, tmp, info, "fp32", data_arrays=held, samples=samples, data_name=held_name),
            "onnx", {"precision": "fp32", "source": MODEL_FILE},
        )
        results["fp32"] = {"path": str(run.file(fp32_name)), "facts": facts, "report": report}
    fp32_path = run.checked_file(fp32_name)

    if precision == "fp16":
        notify("converting to fp16")
        name = ONNX_FILES["fp16"]
        facts, report = _publish_verified(
            run, name, lambda tmp: convert_fp16(fp32_path, tmp),
            lambda tmp: verify_onnx_artifact(model, tmp, info, "fp16", data_arrays=held, samples=samples, data_name=held_name),
            "onnx", {"precision": "fp16", "source": fp32_name},
        )
        results["fp16"] = {"path": str(run.file(name)), "facts": facts, "report": report}
    elif precision == "int8":
        calib_spec = calib_data or run.manifest.get("config", {}).get("data")
        if not calib_spec:
            raise DataError("int8 needs calibration images: pass --calib-data")
        calib_task = _task_for(calib_spec, info, "--calib-data")
        limit = calib_images or DEFAULT_CALIBRATION_IMAGES
        calibration, _ = calib_task.arrays("train", limit=limit, spread=True)
        if held is None:
            raise DataError("int8 is judged on labelled held-out data: pass --data")
        notify(f"calibrating int8 on {len(calibration)} images of {calib_spec}")
        name = ONNX_FILES["int8"]
        facts, report = _publish_verified(
            run, name,
            lambda tmp: quantize_int8(fp32_path, tmp, calibration, target=int8_target, method=calib_method,
                                      max_images=limit),
            lambda tmp: verify_onnx_artifact(model, tmp, info, "int8", data_arrays=held, samples=samples, data_name=held_name),
            "onnx", {"precision": "int8", "source": fp32_name, "calibration_data": calib_spec},
        )
        results["int8"] = {"path": str(run.file(name)), "facts": facts, "report": report}
    return results


def export_comparison_onnx(run_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Export the unmerged model and the dual-backbone model of a merge run to ONNX (benchmark baselines).

    The files are the ones ``mmexport bench`` measures (``bench/unmerged.onnx``,
    ``bench/dual.onnx``), recorded in the manifest; returns ``{kind: {"path", "size_bytes"}}``.
    """
    from mmexport.benchrun import _onnx_artifact, _torch_modules

    run = _merge_run(run_path)
    modules, info = _torch_modules(run, ("unmerged", "dual"))
    results = {}
    for kind, module in modules.items():
        path = _onnx_artifact(run, kind, module, info, "fp32", calibration=lambda: None)
        results[kind] = {"path": str(path), "size_bytes": path.stat().st_size}
    return results


def verify_onnx_run(run_path: str | os.PathLike[str], precisions: list[str], *, data: str | None = None,
                    samples: int = 64, seed: int = 0) -> list[VerificationReport]:
    """Torch fp32 (the run's model) vs each published ONNX artifact, hash-checked first."""
    from mmexport.export import verify_onnx_artifact

    run = RunDir.open(run_path)
    model, info = load_model(run.checked_file(MODEL_FILE))
    task = _task_for(data, info, "--data") if data else None
    held_name, held = _held_out(task, limit=max(samples, 512)) if task is not None else ("data", None)
    reports = []
    for precision in precisions:
        name = ONNX_FILES.get(precision)
        if name is None:
            raise MMExportError(f"unknown precision {precision!r}; choose one of {', '.join(ONNX_FILES)}")
        if name not in run.manifest["outputs"]:
            raise MMExportError(f"{run.path}: no {precision} ONNX artifact; make it with `mmexport fold RUN --to onnx --precision {precision}`")
        path = run.checked_file(name)
        report = verify_onnx_artifact(model, path, info, precision, data_arrays=held, samples=samples, seed=seed,
                                      data_name=held_name)
        run.add_verification({"artifact": name, "command": "verify", **report.as_dict()})
        reports.append(report)
    return reports
