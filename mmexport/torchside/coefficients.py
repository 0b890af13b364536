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
OFF_CENTRE = 0.1  # |σ - 0.5| beyond this (σ outside 0.4/0.6): a coefficient that leans to one source


def layer_coefficients(run: RunDir) -> list[dict[str, Any]]:
    """Mean weight of source A per merged parameter, input to output, from the checkpoint's logits alone.

    Each row: ``name``, ``layer`` (conv, norm or linear: the module type), ``mean``, ``std``
    (the spread of the parameter's coefficients: a mean of 0.5 may be all 0.5 or half 0 and
    half 1), ``off_centre`` (the fraction beyond 0.4/0.6: kernels that lean to one source),
    ``saturated`` (the fraction beyond 0.1/0.9) and ``count``.
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
    for name, weight_a in _source_a_weights(tensors, num_sources).items():
        saturated = float(((weight_a < low) | (weight_a > high)).float().mean())
        off_centre = float(((weight_a - 0.5).abs() > OFF_CENTRE).float().mean())
        rows.append({"name": name, "layer": kinds.get(name.rpartition(".")[0], "other"), "mean": float(weight_a.mean()),
                     "std": float(weight_a.std(correction=0)), "off_centre": off_centre, "saturated": saturated,
                     "count": int(weight_a.numel())})
    order = {name: i for i, (name, _) in enumerate(template.named_parameters())}
    return sorted(rows, key=lambda row: order.get(row["name"], len(order)))


def _source_a_weights(tensors: dict[str, torch.Tensor], num_sources: int) -> dict[str, torch.Tensor]:
    """Per merged parameter, source A's weight σ of every coefficient, flattened."""
    return {key.split("/", 1)[1]: mixing_weights(logit, num_sources)[0].detach().flatten()
            for key, logit in tensors.items() if key.startswith("logit/")}


def _read_weights(run: RunDir) -> dict[str, torch.Tensor]:
    path = run.checked_file(artifacts.filename("unmerged"))
    tensors, metadata = load_safetensors_with_metadata(path)
    metadata = unpack_metadata(metadata, str(path))
    return _source_a_weights(tensors, int(metadata.get("num_sources", "2")))


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson's r of two equally long vectors (None: fewer than 2 values, or one of them constant)."""
    if x.numel() < 2:
        return None
    x, y = x.double(), y.double()
    x, y = x - x.mean(), y - y.mean()
    scale = float(x.norm() * y.norm())
    return float((x * y).sum()) / scale if scale > 0 else None


def seed_agreement(runs: dict[int, RunDir]) -> dict[str, Any] | None:
    """Do runs of one merge method on several seeds choose the same sources for the same kernels?

    Pearson's r of the per-coefficient σ of every pair of seeds, averaged over the pairs:
    ``overall`` over every coefficient of the network, and per merged parameter (``layers``).
    1 = the same choices, 0 = unrelated ones (a coefficient still at its initial 0.5 in
    every seed is no evidence either way, hence r, not a distance). None: fewer than two
    runs with merge coefficients, or runs whose coefficients do not line up.
    """
    weights = {seed: _read_weights(run) for seed, run in sorted(runs.items()) if run.has(artifacts.filename("unmerged"))}
    if len(weights) < 2:
        return None
    names = list(next(iter(weights.values())))
    if any(list(w) != names or any(w[n].shape != weights[min(weights)][n].shape for n in names) for w in weights.values()):
        return None
    seeds = list(weights)
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]

    def mean_r(vectors: dict[int, torch.Tensor]) -> float | None:
        values = [_correlation(vectors[a], vectors[b]) for a, b in pairs]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    layers = {name: mean_r({seed: weights[seed][name] for seed in seeds}) for name in names}
    overall = mean_r({seed: torch.cat([weights[seed][name] for name in names]) for seed in seeds})
    return {"seeds": seeds, "overall": overall, "layers": layers}


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
