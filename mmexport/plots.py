"""Figures (matplotlib, headless): the depth-wise merge-coefficient profile, benchmark curves.

matplotlib is part of the ``torch`` and ``plot`` extras, not of the core installation: it is imported
when a figure is drawn, and its absence is one :class:`~mmexport.errors.MissingDependencyError` line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mmexport.environment import PLOT_EXTRA_INSTALL
from mmexport.errors import MissingDependencyError


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend, or one line naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(f"drawing figures needs matplotlib: {PLOT_EXTRA_INSTALL}") from None
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _stage_of(name: str) -> str:
    # resnet: layer1..layer4; densenet: features.denseblockN / transitionN; else the stem
    parts = name.split(".")
    for part in parts:
        if part.startswith(("layer", "denseblock", "transition")):
            return part
    return "stem"


def plot_coefficients(
    rows: Sequence[Any], path: str | os.PathLike[str], title: str, *, arch: str = "", layers: str = "conv"
) -> None:
    """Mean σ(λ) (the weight of source A) per layer, input to output: the paper's Figure 3 view.

    ``rows`` are ``(name, mean)`` pairs (as ``MergedModel.layer_coefficients``) or dicts with
    ``name``/``mean``/``layer`` keys. By default only conv weights are drawn (one point per
    conv layer, as in the paper); blocks are shaded so depth is readable.
    """
    points = []
    for row in rows:
        name, mean, kind = (row["name"], row["mean"], row.get("layer")) if isinstance(row, dict) else (row[0], row[1], None)
        if layers == "all" or (name.endswith("weight") and (kind == "conv" if kind else _looks_like_conv(name))):
            points.append((name, float(mean)))
    if not points:
        points = [(r["name"], r["mean"]) if isinstance(r, dict) else (r[0], r[1]) for r in rows]
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(max(6.0, 0.12 * len(points) + 3), 3.6), dpi=120)
    xs = range(len(points))
    axis.plot(xs, [p[1] for p in points], marker="o", markersize=3, linewidth=1.2, color="#1f6f8b")
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="σ = 0.5 (start)")
    start = 0
    for index in range(1, len(points) + 1):
        if index == len(points) or _stage_of(points[index][0]) != _stage_of(points[start][0]):
            if _stage_of(points[start][0]) != "stem" and (len({_stage_of(p[0]) for p in points[:start]}) % 2):
                axis.axvspan(start - 0.5, index - 0.5, color="#eeeeee", zorder=0)
            axis.text((start + index - 1) / 2, 1.02, _stage_of(points[start][0]), ha="center", va="bottom", fontsize=7,
                      transform=axis.get_xaxis_transform())
            start = index
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylim(0, 1)
    axis.set_xlim(-0.5, len(points) - 0.5)
    axis.set_xlabel(f"{'conv ' if layers == 'conv' else ''}layer, input → output{f' ({arch})' if arch else ''}")
    axis.set_ylabel("mean σ(λ)  (1 = source A)")
    axis.set_title(title, fontsize=9, pad=14)
    axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _looks_like_conv(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return module.startswith("conv") or module == "0" and "downsample" in name


def plot_latency(results: Sequence[Any], path: str | os.PathLike[str], title: str) -> None:
    """Median latency (with the p90–p99 band) and throughput vs batch size, one line per model."""
    plt = pyplot()
    figure, (latency_axis, throughput_axis) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for model in dict.fromkeys(r.model for r in results):
        rows = sorted((r for r in results if r.model == model), key=lambda r: r.batch_size)
        batches = [r.batch_size for r in rows]
        latency_axis.plot(batches, [r.latency.median_ms for r in rows], marker="o", label=model)
        latency_axis.fill_between(batches, [r.latency.p90_ms for r in rows], [r.latency.p99_ms for r in rows], alpha=0.15)
        throughput_axis.plot(batches, [r.latency.throughput_ips for r in rows], marker="o", label=model)
    sizes = sorted({r.batch_size for r in results})
    for axis, label in ((latency_axis, "latency per batch, median (ms)"), (throughput_axis, "throughput (images/s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(b) for b in sizes])
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    latency_axis.set_yscale("log")
    throughput_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
