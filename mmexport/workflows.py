"""Operations on an existing run directory: fold, verify, inspect."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mmexport.data import load_task
from mmexport.errors import DataError, MMExportError, VerificationError
from mmexport.fold import fold
from mmexport.manifest import RunDir
from mmexport.modelfile import ModelInfo, load_model, load_unmerged, save_model, unpack_metadata
from mmexport.train import FOLDED_FILE, UNMERGED_FILE, resolve_device, verify_fold
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
    task = None
    if data is not None:
        task = load_task(data, image_size=info.image_size)
        if task.num_classes != info.num_classes:
            raise DataError(f"{data}: has {task.num_classes} classes, the model has {info.num_classes}")
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
            weight_a = torch.sigmoid(logit) if num_sources == 2 else torch.softmax(logit, dim=0)[0]
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
