"""Did the merge pay? Train the single-source fine-tunes with the same budget and seeds, and compare.

:func:`compare_methods` trains the run's method (normally ``medmerge``) into
``config.out`` and every comparison method for every seed with exactly the same
settings (data, epochs, learning rates, augmentation), then writes a
:class:`ComparisonTable` into the run: ``comparison.json`` and the manifest's
``comparison`` entry. The table has, per method, val and test accuracy and macro F1
(mean ± std over seeds), and the reference method's gap to the best single source
on test macro F1 (val where the data has no test split), with a verdict that never
calls a difference inside the seed spread a win.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from mmexport import artifacts
from mmexport.config import METHOD_SOURCES, METHODS, TrainConfig, check_seed
from mmexport.errors import MMExportError
from mmexport.fileio import write_json_atomic
from mmexport.runs.manifest import RunDir
from mmexport.progress import ProgressSink, SilentProgress

COMPARISON_FILE = artifacts.filename("comparison")
COMPARISON_FORMAT = "mmexport-comparison/1"
DEFAULT_METHODS = ("finetune-a", "finetune-b")
SINGLE_SOURCE = ("finetune-a", "finetune-b", "lpft-a", "lpft-b")
METRICS = ("accuracy", "macro_f1")

__all__ = ["COMPARISON_FILE", "ComparisonTable", "MethodScores", "Score", "compare_methods", "table_from_runs"]


@dataclass(frozen=True)
class Score:
    """One metric over seeds."""

    mean: float
    std: float  # sample standard deviation; 0 for one seed
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> "Score":
        values = tuple(float(v) for v in values)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if len(self.values) > 1 else f"{self.mean:.3f}"


@dataclass
class MethodScores:
    method: str
    seeds: tuple[int, ...]
    scores: dict[str, Score]  # "val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1"
    runs: list[str] = field(default_factory=list)  # run directories (empty when not kept)


@dataclass
class ComparisonTable:
    reference: str  # the method judged, normally "medmerge"
    seeds: tuple[int, ...]
    split: str  # the split the gap is judged on: "test", else "val"
    methods: list[MethodScores]
    best_single: str | None = None
    gap: float | None = None  # reference − best single, mean macro-F1 on ``split``
    gap_std: float | None = None  # std over seeds of the paired differences
    verdict: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def method(self, name: str) -> MethodScores:
        for row in self.methods:
            if row.method == name:
                return row
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row in data["methods"]:
            row["scores"] = {k: {"mean": v["mean"], "std": v["std"], "values": list(v["values"])}
                             for k, v in row["scores"].items()}
        return {"format": COMPARISON_FORMAT, **data, "seeds": list(self.seeds)}


def _judge(table: ComparisonTable, per_seed: dict[str, dict[int, float]]) -> None:
    """Fill best single source, gap, its spread and the verdict (in place)."""
    metric = f"{table.split}_macro_f1"
    singles = [row for row in table.methods if row.method in SINGLE_SOURCE and metric in row.scores]
    if not singles or table.reference not in per_seed:
        table.verdict = "no single-source method to compare with"
        return
    best = max(singles, key=lambda row: row.scores[metric].mean)
    table.best_single = best.method
    seeds = sorted(set(per_seed[table.reference]) & set(per_seed[best.method]))
    diffs = [per_seed[table.reference][s] - per_seed[best.method][s] for s in seeds]
    table.gap = statistics.fmean(diffs)
    table.gap_std = statistics.stdev(diffs) if len(diffs) > 1 else None
    where = f"{table.split} macro-F1"
    if table.gap_std is None:
        table.verdict = (f"{table.reference} {table.gap:+.3f} {where} vs {best.method} on one seed: no spread to judge "
                         "by; run more seeds (--seeds 0,1,2)")
    elif abs(table.gap) <= table.gap_std:
        table.verdict = (f"{table.reference} {table.gap:+.3f} ± {table.gap_std:.3f} {where} vs {best.method}: inside the "
                         "seed spread, no evidence that the merge paid")
    elif table.gap > 0:
        table.verdict = f"{table.reference} {table.gap:+.3f} ± {table.gap_std:.3f} {where} vs {best.method}: the merge paid"
    else:
        table.verdict = (f"{table.reference} {table.gap:+.3f} ± {table.gap_std:.3f} {where} vs {best.method}: the merge "
                         f"did not pay; use {best.method}")


def table_from_runs(runs: dict[str, dict[int, str | os.PathLike[str]]], reference: str = "medmerge",
                    settings: dict[str, Any] | None = None, keep_paths: bool = True) -> ComparisonTable:
    """A :class:`ComparisonTable` from finished runs: ``{method: {seed: run directory}}``."""
    finals = {method: {seed: RunDir.open(path).manifest["training"]["final"] for seed, path in sorted(by_seed.items())}
              for method, by_seed in runs.items()}
    common = set.intersection(*(set(f) for by_seed in finals.values() for f in by_seed.values()))
    split = "test" if "test" in common else "val"
    rows = []
    for method, by_seed in finals.items():
        scores = {f"{part}_{metric}": Score.of([f[part][metric] for f in by_seed.values()])
                  for part in ("val", "test") if part in common for metric in METRICS}
        paths = [str(Path(p).absolute()) for p in runs[method].values()] if keep_paths else []
        rows.append(MethodScores(method, tuple(by_seed), scores, paths))
    per_seed = {method: {seed: f[split]["macro_f1"] for seed, f in by_seed.items()} for method, by_seed in finals.items()}
    seeds = sorted({seed for by_seed in finals.values() for seed in by_seed})
    table = ComparisonTable(reference, tuple(seeds), split, rows, settings=dict(settings or {}))
    _judge(table, per_seed)
    return table


def _check_methods(config: TrainConfig, methods: Sequence[str]) -> list[str]:
    chosen = []
    for method in methods:
        if method not in METHODS:
            raise MMExportError(f"--compare: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method == config.method or method in chosen:
            continue
        missing = [label for label in METHOD_SOURCES[method] if not (config.source_a if label == "A" else config.source_b)]
        if missing:
            raise MMExportError(f"--compare: {method} needs --source-{missing[0].lower()}")
        chosen.append(method)
    return chosen


def compare_methods(
    config: TrainConfig, methods: Sequence[str] = DEFAULT_METHODS, seeds: Sequence[int] | None = None,
    progress: ProgressSink | None = None, *, command: str = "", keep_runs: str | os.PathLike[str] | None = None,
    lock_wait: float | None = None,
) -> ComparisonTable:
    """Train ``config`` into ``config.out`` and ``methods`` × ``seeds`` alike; write the table into the run.

    The run in ``config.out`` uses ``config.seed``, which is added to ``seeds`` if missing.
    Every other run is trained into ``keep_runs`` (kept) or a hidden sibling directory of
    ``config.out`` (removed afterwards). Returns the table also written to the run's
    ``comparison.json`` and the manifest's ``comparison`` entry. ``lock_wait``: seconds to wait for
    another command writing the run.
    """
    from mmexport.torchside.train import train  # lazy: torch

    progress = progress or SilentProgress()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MMExportError("--compare trains several runs one after another: run it without torchrun")
    config.validate()
    seeds = tuple(dict.fromkeys([config.seed, *(check_seed(s, "--seeds") for s in (seeds or ()))]))
    others = _check_methods(config, methods)
    out = Path(config.out).expanduser().absolute()
    jobs = [(config.method, s) for s in seeds[1:]] + [(m, s) for m in others for s in seeds]
    progress.message(f"compare: {config.method} against {', '.join(others) or 'nothing'} on seeds "
                     f"{', '.join(map(str, seeds))} ({1 + len(jobs)} runs, same budget and settings)")
    main = train(config, progress, command=command, lock_wait=lock_wait)
    runs: dict[str, dict[int, Path]] = {config.method: {config.seed: main}}
    # the other runs go to --keep-runs, or to a fresh folder of this call's own (never one found by name:
    # a fixed name beside the run could be a user's folder, or a link)
    work = Path(keep_runs).expanduser().absolute() if keep_runs is not None else \
        Path(tempfile.mkdtemp(prefix=f".{out.name}.compare-", dir=out.parent))
    try:
        for index, (method, seed) in enumerate(jobs, start=2):
            progress.message(f"compare: run {index}/{1 + len(jobs)}: {method}, seed {seed}")
            job = replace(config, method=method, seed=seed, out=str(work / f"{method}-seed{seed}"), force=True,
                          resume=False)
            runs.setdefault(method, {})[seed] = train(job, progress, command=f"{command} (compare: {method} seed {seed})",
                                                      lock_wait=lock_wait)
        settings = {"merge_epochs": config.merge_epochs, "finetune_epochs": config.finetune_epochs,
                    "augmentation": config.augmentation, "data": config.data, "arch": config.arch}
        table = table_from_runs(runs, config.method, settings, keep_paths=keep_runs is not None)
    finally:
        if keep_runs is None:
            shutil.rmtree(work, ignore_errors=True)
    if keep_runs is None:  # the main run stays, the others are gone
        table.method(config.method).runs = [str(main)]
    data = table.as_dict()
    with RunDir.writer(main, f"{command or 'compare_methods'} (comparison table)", lock_wait) as run:
        run.write_output(COMPARISON_FILE, lambda p: write_json_atomic(p, data), "comparison",
                         methods=[r.method for r in table.methods], seeds=list(table.seeds))
        run.manifest["comparison"] = {k: v for k, v in data.items() if k != "format"}
        run.save()
    progress.message(f"compare: {table.verdict}")
    return table


def read_comparison(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The comparison entry of a run's manifest ({} if the run was not compared)."""
    return json.loads((Path(path) / "manifest.json").read_text()).get("comparison", {})
