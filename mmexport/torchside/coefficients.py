"""The depth-wise view of a merge (torch side): mean weight of source A per parameter, input to output."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mmexport import artifacts
from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.checkpoints import load_safetensors_with_metadata
from mmexport.errors import MMExportError
from mmexport.fileio import atomic_path
from mmexport.runs.manifest import RunDir
from mmexport.torchside.merge import mixing_weights
from mmexport.torchside.modelfile import unpack_metadata

SATURATION = (0.1, 0.9)  # σ beyond these is "saturated": one source all but switched off


def layer_coefficients(run: RunDir) -> list[dict[str, Any]]:
    """Mean weight of source A per merged parameter, input to output, from the checkpoint's logits alone.

    Each row: ``name``, ``layer`` (conv, norm or linear: the module type), ``mean`` and
    ``saturated`` (the fraction of the parameter's coefficients beyond 0.1/0.9).
    """
    path = run.checked_file(artifacts.filename("unmerged"))
    tensors, metadata = load_safetensors_with_metadata(path)
    metadata = unpack_metadata(metadata, str(path))
    num_sources = int(metadata.get("num_sources", "2"))
    with torch.device("meta"):
        template = get_backbone(metadata["arch"]).build(2)
    kinds = {name: _layer_kind(module) for name, module in template.named_modules()}
    rows = []
    low, high = SATURATION
    for key, logit in tensors.items():
        if key.startswith("logit/"):
            name = key.split("/", 1)[1]
            weight_a = mixing_weights(logit, num_sources)[0]
            saturated = float(((weight_a < low) | (weight_a > high)).float().mean())
            rows.append({"name": name, "layer": kinds.get(name.rpartition(".")[0], "other"), "mean": float(weight_a.mean()),
                         "saturated": saturated, "count": int(weight_a.numel())})
    order = {name: i for i, (name, _) in enumerate(template.named_parameters())}
    return sorted(rows, key=lambda row: order.get(row["name"], len(order)))


def saturation(rows: list[dict[str, Any]]) -> float:
    """The fraction of all merge coefficients beyond 0.1/0.9, weighted by count."""
    total = sum(r["count"] for r in rows)
    return sum(r["saturated"] * r["count"] for r in rows) / total if total else 0.0


def _layer_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, torch.nn.modules.batchnorm._NormBase):
        return "norm"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "other"


def plot_run_coefficients(run_path: str | os.PathLike[str], path: str | os.PathLike[str], *, all_layers: bool = False) -> Path:
    """Draw the run's depth-wise coefficient profile to ``path`` (PNG), atomically."""
    from mmexport.plots import plot_coefficients

    run = RunDir.open(run_path)
    if not run.has(artifacts.filename("unmerged")):
        method = run.manifest.get("training", {}).get("method", "?")
        raise MMExportError(f"{run.path}: method {method} has no merge coefficients to plot")
    target = Path(path).expanduser().absolute()
    if target.suffix.lower() != ".png":
        raise MMExportError(f"{target}: the plot is written as PNG; name the file *.png")
    run.refuse_overwrite(target)
    config = run.manifest.get("config", {})
    title = f"{config.get('arch', '?')} {config.get('method', 'medmerge')}: mean σ(λ) per layer (1 = source A)"
    with atomic_path(target) as tmp:
        plot_coefficients(layer_coefficients(run), tmp, title, arch=config.get("arch", ""),
                          layers="all" if all_layers else "conv")
    return target
