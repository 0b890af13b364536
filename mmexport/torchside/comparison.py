"""Did the merge pay? Train the single-source fine-tunes with the same budget and seeds, and compare.

:func:`compare_methods` trains the run's method (normally ``medmerge``) into
``config.out`` and every comparison method for every seed with exactly the same
settings (data, epochs, learning rates, augmentation), then writes a
:class:`ComparisonTable` into the run: ``comparison.json`` and the manifest's
``comparison`` entry. The table has, per method, val and test accuracy and macro F1
(mean ± std over seeds), and the reference method's gap to the best single source
on test macro F1 (val where the data has no test split), with a verdict that never
calls a difference inside the seed spread a win.

What happens to the other runs is a policy (``keep_runs``): ``best`` (the default) keeps
the best single-source run -- the method the verdict names, at its best seed -- as a
complete run (manifest, ``model.safetensors``, ``reference.npz``: what ``train`` makes,
so ``fold``, ``verify``, ``serve`` and ``inspect`` take it like any run), ``all`` keeps
every one, ``none`` removes them. Kept runs go to ``runs_dir`` (default ``RUN.compare``
beside the run) as ``METHOD-seedN``; where they are is recorded in the table (``kept``).
Every run is trained in a fresh folder of this call's own and published from there (the
same lock and replacement rules as ``train --force``); only that folder is ever removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mmexport import artifacts
from mmexport.config import METHOD_SOURCES, METHODS, TrainConfig, check_seed
from mmexport.errors import MMExportError
from mmexport.fileio import write_json_atomic
from mmexport.progress import OnceProgress, ProgressSink, SilentProgress
from mmexport.runs.manifest import RunDir, check_replaceable

COMPARISON_FILE = artifacts.filename("comparison")
COMPARISON_FORMAT = "mmexport-comparison/1"
DEFAULT_METHODS = ("finetune-a", "finetune-b")
SINGLE_SOURCE = ("finetune-a", "finetune-b", "lpft-a", "lpft-b")
METRICS = ("accuracy", "macro_f1")
KEEP_POLICIES = ("best", "all", "none")
DEFAULT_KEEP = "best"

__all__ = ["COMPARISON_FILE", "DEFAULT_KEEP", "KEEP_POLICIES", "ComparisonTable", "MethodScores", "Score",
           "compare_methods", "default_runs_dir", "table_from_runs"]


@dataclass(frozen=True)
class Score:
    """One metric over seeds."""

    mean: float
    std: float  # sample standard deviation; 0 for one seed
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Score:
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
    # what --keep-runs kept: {"policy", "directory" (None: nothing kept), "best_single": {"method", "seed",
    # "path" (None: not kept), "<split>_macro_f1"} or None, "runs": [every kept run's path]}
    kept: dict[str, Any] = field(default_factory=dict)
    # the reference method's merge coefficients across its seeds (coefficients.seed_agreement); None: one seed
    sigma_agreement: dict[str, Any] | None = None

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


def judge_gap(gap: float, gap_std: float | None) -> str:
    """The verdict rule of ``--compare`` on a paired gap (reference − best single, std over seeds).

    ``one seed`` (no spread to judge by), ``inside the seed spread`` (|gap| ≤ std), ``paid`` or
    ``did not pay``. The merge study applies the same rule to every regime.
    """
    if gap_std is None:
        return "one seed"
    if abs(gap) <= gap_std:
        return "inside the seed spread"
    return "paid" if gap > 0 else "did not pay"


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
    kind = judge_gap(table.gap, table.gap_std)
    if kind == "one seed":
        table.verdict = (f"{table.reference} {table.gap:+.3f} {where} vs {best.method} on one seed: no spread to judge "
                         "by; run more seeds (--seeds 0,1,2)")
    elif kind == "inside the seed spread":
        table.verdict = (f"{table.reference} {table.gap:+.3f} ± {table.gap_std:.3f} {where} vs {best.method}: inside the "
                         "seed spread, no evidence that the merge paid")
    elif kind == "paid":
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


def default_runs_dir(out: str | os.PathLike[str]) -> Path:
    """Where ``compare_methods`` keeps runs unless told: ``RUN.compare`` beside the run."""
    out = Path(out).expanduser().absolute()
    return out.parent / f"{out.name}.compare"


def _keep_policy(keep_runs: Any, runs_dir: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """(policy, folder given or None). The 0.2 forms still work: a path object is "keep all, in that folder",
    None is "keep none"."""
    if keep_runs is None and runs_dir is None:
        return "none", None
    if isinstance(keep_runs, os.PathLike):
        if runs_dir is not None:
            raise MMExportError("--keep-runs: give the policy (best, all or none) and the folder as --runs-dir")
        return "all", Path(keep_runs)
    if keep_runs not in KEEP_POLICIES:
        raise MMExportError(f"--keep-runs must be one of {', '.join(KEEP_POLICIES)} (the folder is --runs-dir), "
                            f"got {str(keep_runs)[:80]!r}")
    if keep_runs == "none" and runs_dir is not None:
        raise MMExportError("--runs-dir is where --keep-runs best|all keeps runs; --keep-runs none keeps none")
    return keep_runs, None if runs_dir is None else Path(runs_dir)


def _run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _check_runs_dir(folder: Path, out: Path, names: Sequence[str]) -> None:
    """Refused before anything is trained: a folder inside the run, a file, a kept name that is the run itself,
    or a kept name holding something ``--force`` would not replace."""
    if folder == out or out in folder.parents:
        raise MMExportError(f"--runs-dir {folder}: is inside the run {out} (a run holds only its own files); "
                            "choose a folder beside it")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise MMExportError(f"--runs-dir {folder}: is not a directory")
    for name in names:
        target = folder / name
        if target == out:
            raise MMExportError(f"--runs-dir {folder}: a kept run would be named {name}, which is this run; "
                                "choose another --runs-dir or --out")
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise MMExportError(f"{target}: exists and is not a run directory; move it or choose another --runs-dir")
        if target.is_dir() and any(target.iterdir()):
            check_replaceable(target)  # a previous kept run is replaced; anything else is refused now, not after training


def _best_seed(table: ComparisonTable, method: str) -> tuple[int, float]:
    """The seed of ``method`` with the highest macro-F1 on the judged split (the lowest such seed on a tie)."""
    row = table.method(method)
    values = row.scores[f"{table.split}_macro_f1"].values
    best = max(range(len(values)), key=lambda i: (values[i], -row.seeds[i]))
    return row.seeds[best], values[best]


def _publish_kept(source: Path, target: Path, lock_wait: float | None) -> Path:
    """Move a finished run from this call's folder to ``target``, as ``train`` publishes: under ``target``'s lock,
    replacing only a previous run holding nothing but its own files."""
    run = RunDir.open(source)
    run.manifest.setdefault("config", {})["out"] = str(target)  # where the run lives, not the folder it was trained in
    return RunDir(run.path, run.manifest, final_path=target).publish(lock_wait=lock_wait)


def compare_methods(
    config: TrainConfig, methods: Sequence[str] = DEFAULT_METHODS, seeds: Sequence[int] | None = None,
    progress: ProgressSink | None = None, *, command: str = "", keep_runs: str | None = DEFAULT_KEEP,
    runs_dir: str | os.PathLike[str] | None = None, lock_wait: float | None = None,
) -> ComparisonTable:
    """Train ``config`` into ``config.out`` and ``methods`` × ``seeds`` alike; write the table into the run.

    The run in ``config.out`` uses ``config.seed``, which is added to ``seeds`` if missing.
    Every other run is trained in a fresh hidden folder of this call's own; ``keep_runs``
    says which of them are kept, as complete runs in ``runs_dir`` (default
    :func:`default_runs_dir`: ``RUN.compare`` beside the run) named ``METHOD-seedN``:
    ``best`` the best single-source method (the one the verdict names) at its best seed,
    ``all`` every one, ``none`` none. The rest, and the folder, are removed. Returns the
    table also written to the run's ``comparison.json`` and the manifest's ``comparison``
    entry (``kept`` says what was kept where). ``lock_wait``: seconds to wait for another
    command writing the run.
    """
    from mmexport.torchside.coefficients import seed_agreement  # lazy: torch
    from mmexport.torchside.train import train

    progress = OnceProgress(progress or SilentProgress())  # every run describes the same data and sources: once
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MMExportError("--compare trains several runs one after another: run it without torchrun")
    policy, given_dir = _keep_policy(keep_runs, runs_dir)
    config.validate()
    seeds = tuple(dict.fromkeys([config.seed, *(check_seed(s, "--seeds") for s in (seeds or ()))]))
    others = _check_methods(config, methods)
    out = Path(config.out).expanduser().absolute()
    jobs = [(config.method, s) for s in seeds[1:]] + [(m, s) for m in others for s in seeds]
    keep_dir = None
    if policy != "none":
        keep_dir = (given_dir.expanduser().absolute() if given_dir is not None else default_runs_dir(out))
        candidates = [_run_name(m, s) for m, s in jobs if policy == "all" or m in SINGLE_SOURCE]
        _check_runs_dir(keep_dir, out, candidates)
    progress.message(f"compare: {config.method} against {', '.join(others) or 'nothing'} on seeds "
                     f"{', '.join(map(str, seeds))} ({1 + len(jobs)} runs, same budget and settings)")
    main = train(config, progress, command=command, lock_wait=lock_wait)
    runs: dict[str, dict[int, Path]] = {config.method: {config.seed: main}}
    # The other runs are trained in a fresh folder of this call's own (never one found by name: a fixed
    # name could be a user's folder, or a link), inside the folder that keeps them, so keeping one is a rename.
    made_keep_dir = False
    if keep_dir is not None and not keep_dir.exists():
        try:
            keep_dir.mkdir(parents=True)
        except OSError as exc:
            raise MMExportError(f"--runs-dir {keep_dir}: cannot create it ({exc.strerror or exc})") from None
        made_keep_dir = True
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.compare-", dir=keep_dir or out.parent))
    kept: dict[str, Any] = {"policy": policy, "directory": None, "best_single": None, "runs": []}
    try:
        for index, (method, seed) in enumerate(jobs, start=2):
            progress.message(f"compare: run {index}/{1 + len(jobs)}: {method}, seed {seed}")
            # the run's own method on its other seeds keeps its alignment; the baselines are the paper's: single
            # sources and the plain average, as stored
            job = replace(config, method=method, seed=seed, out=str(work / _run_name(method, seed)), force=True,
                          resume=False, align=config.align if method == config.method else "none")
            runs.setdefault(method, {})[seed] = train(job, progress, command=f"{command} (compare: {method} seed {seed})",
                                                      lock_wait=lock_wait)
        settings = {"merge_epochs": config.merge_epochs, "finetune_epochs": config.finetune_epochs,
                    "augmentation": config.augmentation, "data": config.data, "arch": config.arch}
        table = table_from_runs(runs, config.method, settings, keep_paths=False)
        table.method(config.method).runs = [str(main)]
        if len(runs[config.method]) > 1:  # before the other seeds' runs go: do they choose the same kernels?
            table.sigma_agreement = seed_agreement({seed: RunDir.open(path) for seed, path in runs[config.method].items()})
        best = None
        if table.best_single is not None:
            seed, score = _best_seed(table, table.best_single)
            best = {"method": table.best_single, "seed": seed, f"{table.split}_macro_f1": score, "path": None}
        chosen = [] if keep_dir is None else (
            list(jobs) if policy == "all" else [(best["method"], best["seed"])] if best else [])
        for method, seed in chosen:
            if (method, seed) == (config.method, config.seed):  # the run itself (--method finetune-a): it stays
                target = main
            else:
                target = _publish_kept(runs[method][seed], keep_dir / _run_name(method, seed), lock_wait)
                table.method(method).runs.append(str(target))
                kept["runs"].append(str(target))
            if best is not None and (method, seed) == (best["method"], best["seed"]):
                best["path"] = str(target)
        kept.update(directory=str(keep_dir) if kept["runs"] else None, best_single=best)
        table.kept = kept
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made_keep_dir and keep_dir is not None and not kept["runs"]:
            with contextlib.suppress(OSError):
                keep_dir.rmdir()  # only if empty: it was made for this call and nothing was kept in it
    data = table.as_dict()
    with RunDir.writer(main, f"{command or 'compare_methods'} (comparison table)", lock_wait) as run:
        run.write_output(COMPARISON_FILE, lambda p: write_json_atomic(p, data), "comparison",
                         methods=[r.method for r in table.methods], seeds=list(table.seeds))
        run.manifest["comparison"] = {k: v for k, v in data.items() if k != "format"}
        run.save()
    progress.message(f"compare: {table.verdict}")
    if best is not None and best["path"]:
        progress.message(f"compare: kept the best single source, {best['method']} seed {best['seed']} "
                         f"({table.split} macro-F1 {best[f'{table.split}_macro_f1']:.3f}), as a complete run: {best['path']}")
    if len(kept["runs"]) > (1 if best is not None and best["path"] else 0):
        progress.message(f"compare: kept {len(kept['runs'])} runs in {keep_dir}")
    return table


def read_comparison(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The comparison entry of a run's manifest ({} if the run was not compared)."""
    return json.loads((Path(path) / "manifest.json").read_text()).get("comparison", {})
