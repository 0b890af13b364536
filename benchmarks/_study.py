"""Shared machinery of the accuracy benchmarks: synthetic sources, resumable result log, tables."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmexport.demo import train_synthetic_sources
from mmexport.config import TrainConfig
from mmexport.train import train

ARCH = "resnet18"
SOURCE_EPOCHS = 8
SOURCE_DATA = "?n_train=2000&n_val=400"
TASKS = {
    # the demo's target: 300 labelled images, imbalanced 45/25/15/10/5 %
    "target-300": "synthetic:target?n_train=300&n_val=300&n_test=600&seed=0",
    # fewer labels, other images
    "target-150": "synthetic:target?n_train=150&n_val=300&n_test=600&seed=1",
}


SOURCES: dict[str, Path] | None = None  # set to use given checkpoints instead of the synthetic sources


def sources(work: Path) -> dict[str, Path]:
    """Train (once; cached in ``work``) the two synthetic source backbones."""
    if SOURCES is not None:
        return SOURCES
    marker = work / "sources" / "done.json"
    paths = {"A": work / "sources" / "pigment.safetensors", "B": work / "sources" / "border.safetensors"}
    if marker.is_file():
        return paths
    trained, summary = train_synthetic_sources(work / "sources", arch=ARCH, epochs=SOURCE_EPOCHS, data_options=SOURCE_DATA)
    marker.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in summary.items()}, indent=2))
    return trained


def effective_config(task: str, seed: int, overrides: dict[str, Any]) -> str:
    """What a run trains, as a canonical string: runs with equal strings give equal results."""
    config = TrainConfig(arch=ARCH, source_a="A", source_b="B", data=TASKS[task], out="", seed=seed, **overrides)
    ignored = {"out", "force", "resume", "device", "num_workers"}
    if config.method != "medmerge":  # σ is fixed (average) or absent: the logit settings do nothing
        ignored |= {"lr_logits", "granularity", "initial_logit"}
    if config.method not in ("medmerge", "average"):  # no blended BatchNorm statistics to initialise
        ignored |= {"bn_init"}
    fields = {k: v for k, v in asdict(config).items() if k not in ignored}
    return json.dumps(fields, sort_keys=True)


def run_one(work: Path, log: Path, name: str, task: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one (config, task, seed) unless an equal run is cached; append the result to the log.

    The cache (``work/cache.jsonl``) is shared by every script using ``work``, so the
    accuracy table reuses the study's runs whose effective configuration is identical.
    """
    key = f"{name}|{task}|{seed}"
    effective = effective_config(task, seed, overrides)
    for line in log.read_text().splitlines() if log.exists() else []:
        record = json.loads(line)
        if record["key"] == key and record.get("effective", effective) == effective:
            return record
    cache = work / "cache.jsonl"
    for line in cache.read_text().splitlines() if cache.exists() else []:
        record = json.loads(line)
        if record["effective"] == effective:
            record = {**record, "key": key, "config": name, "reused_from": record["key"]}
            with log.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            return record
    paths = sources(work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    config = TrainConfig(arch=ARCH, source_a=str(paths["A"]), source_b=str(paths["B"]), data=TASKS[task],
                         out=str(work / "runs" / key.replace("|", "_")), seed=seed, force=True, device="cpu",
                         verify_samples=16, **overrides)
    start = time.perf_counter()
    run = train(config)
    manifest = json.loads((run / "manifest.json").read_text())
    final = manifest["training"]["final"]
    record = {
        "key": key, "effective": effective, "config": name, "task": task, "seed": seed, "overrides": overrides,
        "seconds": time.perf_counter() - start,
        "val_macro_f1": final["val"]["macro_f1"], "val_accuracy": final["val"]["accuracy"],
        "test_macro_f1": final["test"]["macro_f1"], "test_accuracy": final["test"]["accuracy"],
        "stage1_val_macro_f1": next(iter(manifest["training"]["stages"].values()))["best_metrics"].get("macro_f1"),
        "mean_sigma": _mean_sigma(manifest),
    }
    for path in (log, cache):
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    return record


def _mean_sigma(manifest: dict) -> float | None:
    rows = manifest["training"].get("layer_coefficients")
    return statistics.fmean(r[1] for r in rows) if rows else None


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(records: list[dict], rows: list[str], tasks: list[str], title: str, note: str) -> str:
    lines = [f"# {title}", "", note, ""]
    header = "| config | " + " | ".join(f"{t} test macro-F1 | {t} test acc | {t} val macro-F1" for t in tasks) + " | n |"
    lines += [header, "|" + " --- |" * (1 + 3 * len(tasks) + 1)]
    for row in rows:
        cells, count = [], 0
        for task in tasks:
            chosen = [r for r in records if r["config"] == row and r["task"] == task]
            count = max(count, len(chosen))
            if not chosen:
                cells += ["—", "—", "—"]
                continue
            cells += [mean_std([r["test_macro_f1"] for r in chosen]), mean_std([r["test_accuracy"] for r in chosen]),
                      mean_std([r["val_macro_f1"] for r in chosen])]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {count} |")
    return "\n".join(lines) + "\n"
