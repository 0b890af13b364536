"""The embedded end-to-end demo: two synthetic source backbones -> MedMerge -> fold -> verify.

Source A learns lesion pigment, source B lesion border; the synthetic target
needs both. Everything runs on a CPU in a few minutes and is written into one
directory a user can inspect.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmexport.bench import BenchReport, BenchRequest, bench_run
from mmexport.config import TrainConfig
from mmexport.errors import MMExportError, RunDirError, VerificationError
from mmexport.jsonread import parse_json
from mmexport.fileio import compare_tree, sha256_file, write_json_atomic
from mmexport.progress import ProgressSink, SilentProgress
from mmexport.runtime.compare import OutputStats
from mmexport.runtime.timing import BenchSettings
from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.checkpoints import save_state_dict
from mmexport.torchside.data import load_task
from mmexport.torchside.modelfile import pack_metadata
from mmexport.torchside.operations import export_onnx_run, fold_run, verify_run
from mmexport.torchside.train import resolve_device, seed_everything, train, train_plain

DEMO_MARKER = "demo.json"


@dataclass
class DemoConfig:
    out: str = "mmexport-demo"
    arch: str = "resnet18"
    source_epochs: int = 5
    merge_epochs: int = 6
    finetune_epochs: int = 4
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    force: bool = False
    compare: bool = True  # also fine-tune each source alone (the comparison MedMerge must win)
    export: bool = True  # ONNX fp32 and int8, each verified
    bench_seconds: float = 3.0  # ONNX Runtime: folded vs unmerged vs dual at batch 1; 0 skips
    # smaller sets keep the demo inside its time budget on a 2-core CPU
    source_data: str = "?n_train=1200&n_val=300"
    target_data: str = "?n_train=300&n_val=300&n_test=300"


class DemoLedger:
    """What a demo made, in ``demo.json``: every file by sha256, and the directories it created.

    A later demo into the same directory deletes exactly those files (hash-checked) and
    refuses to touch anything else, so a directory that merely contains a ``demo.json``
    is never wiped. A demo that was interrupted mid-step also left files it had not
    recorded yet; they lie in directories the demo created (``claimed``), and ``--force``
    deletes those too.
    """

    STEP_DIRS = ("sources", "run", "baselines", ".run.partial", ".run.lock")

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        self.out = out
        self.config = config
        self.files: dict[str, str] = {}
        self.claimed: list[str] = []
        self.status = "running"

    def claim(self, *relative: str) -> None:
        """Directories (or lock files) a step is about to create; only ones that do not exist yet are claimed."""
        for name in relative:
            if not (self.out / name).exists() and name not in self.claimed:
                self.claimed.append(name)
        self.save()

    def record(self) -> None:
        """Hash everything under ``out`` (which was empty when the demo started) as made by the demo."""

        for path in sorted(self.out.rglob("*")):
            relative = path.relative_to(self.out).as_posix()
            if path.is_file() and not path.is_symlink() and relative != DEMO_MARKER:
                self.files[relative] = sha256_file(path)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.out / DEMO_MARKER, {"format": "mmexport-demo/2", "status": self.status,
                                                   "config": self.config, "claimed": self.claimed, "files": self.files})


def _prepare(out: Path, force: bool) -> None:
    """Make ``out`` an empty directory, deleting only what an earlier demo provably made."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        out.mkdir(parents=True, exist_ok=True)
        return
    if not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a directory")
    marker = out / DEMO_MARKER
    try:
        ledger = parse_json(marker.read_bytes(), str(marker)) if marker.is_file() else None
    except (OSError, MMExportError):
        ledger = None
    if not isinstance(ledger, dict) or ledger.get("format") != "mmexport-demo/2" or not isinstance(ledger.get("files"), dict):
        raise RunDirError(f"{out}: is not empty and holds no demo ledger ({DEMO_MARKER}) of this mmexport; "
                          "nothing is deleted: choose an empty or new --out")
    recorded: dict[str, str] = {str(k): str(v) for k, v in ledger["files"].items()}
    claimed = [str(c) for c in ledger.get("claimed", [])]
    delete, changed, unlisted = compare_tree(out, recorded, DEMO_MARKER)
    foreign = []
    for relative in unlisted:  # left by an interrupted step inside a directory the demo claimed: --force
        if any(relative == c or relative.startswith(c.rstrip("/") + "/") for c in claimed):
            (delete if force else changed).append(out / relative if force else relative)
        else:
            foreign.append(relative)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunDirError(f"{out}: holds files an earlier demo did not make ({shown}); nothing is deleted: "
                          "move them or choose another --out")
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise RunDirError(f"{out}: files of an earlier demo were changed since, or were left by an interrupted demo "
                          f"({shown}); pass --force to delete them too")
    for path in delete:
        path.unlink()
    for directory in sorted((p for p in out.rglob("*") if p.is_dir() and not p.is_symlink()),
                            key=lambda p: len(p.parts), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    marker.unlink()
    if any(out.iterdir()):  # only directories the demo made and emptied can remain; anything else is foreign
        raise RunDirError(f"{out}: could not empty it of the earlier demo's files; nothing else was touched")


def train_synthetic_sources(
    directory: Path, *, arch: str, epochs: int, batch_size: int = 32, seed: int = 0, device: torch.device | None = None,
    data_options: str = "", progress: ProgressSink | None = None, image_size: int | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Train source A on ``synthetic:pigment`` and source B on ``synthetic:border`` from scratch.

    Returns the two checkpoint paths (``{"A": ..., "B": ...}``) and a summary of their val scores.
    """
    directory.mkdir(parents=True, exist_ok=True)
    device = device or resolve_device("auto")
    paths, summary = {}, {}
    for label, task_name in (("A", "pigment"), ("B", "border")):
        start = time.perf_counter()
        seed_everything(seed)
        task = load_task(f"synthetic:{task_name}{data_options}", image_size=image_size)
        model = get_backbone(arch).build(task.num_classes)
        result = train_plain(
            model, task, epochs=epochs, lr=1e-3, batch_size=batch_size, seed=seed, device=device,
            progress=progress, stage=f"source {label} ({task_name})",
        )
        path = directory / f"{task_name}.safetensors"
        save_state_dict(path, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        pack_metadata({"task": f"synthetic:{task_name}{data_options}", "arch": arch, "seed": str(seed)}))
        paths[label] = path
        summary[f"source_{label}"] = {"task": task_name, "path": str(path), "seconds": time.perf_counter() - start,
                                      "val_accuracy": result.best_metrics["accuracy"],
                                      "val_macro_f1": result.best_metrics["macro_f1"]}
    return paths, summary


@dataclass
class ExportOutcome:
    precision: str
    stats: dict[str, OutputStats]  # input set -> logits statistics
    path: str | None = None
    size_bytes: int | None = None
    refused: str | None = None  # the policy refused it: nothing was published


@dataclass
class DemoSummary:
    out: str
    device: str
    arch: str
    sources: dict[str, dict[str, Any]]  # "A"/"B" -> task, path, seconds, val scores
    run: str = ""
    merge_best: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # method -> split -> metrics
    fold_reproduced: bool | None = None
    fold_stats: dict[str, OutputStats] = field(default_factory=dict)
    exports: list[ExportOutcome] = field(default_factory=list)
    bench: BenchReport | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def merge_gap(self) -> tuple[str, float] | None:
        """(best single-source method, MedMerge's test macro-F1 minus its own), or None without a comparison."""
        def score(method: str) -> float:
            metrics = self.comparison[method]
            return metrics.get("test", metrics["val"])["macro_f1"]

        singles = [m for m in ("finetune-a", "finetune-b") if m in self.comparison]
        if "medmerge" not in self.comparison or not singles:
            return None
        best = max(singles, key=score)
        return best, score("medmerge") - score(best)


def run_demo(config: DemoConfig, progress: ProgressSink | None = None) -> DemoSummary:
    progress = progress or SilentProgress()
    out = Path(config.out).expanduser().absolute()
    _prepare(out, config.force)
    ledger = DemoLedger(out, dict(config.__dict__))
    ledger.claim("sources")
    device = resolve_device(config.device)
    timings: dict[str, float] = {}

    sources, source_summary = train_synthetic_sources(
        out / "sources", arch=config.arch, epochs=config.source_epochs, batch_size=config.batch_size,
        seed=config.seed, device=device, data_options=config.source_data, progress=progress,
    )
    summary = DemoSummary(str(out), str(device), config.arch,
                          {label: source_summary[f"source_{label}"] for label in ("A", "B")}, timings=timings)
    timings.update({f"source_{label}": summary.sources[label]["seconds"] for label in ("A", "B")})

    ledger.record()
    target = f"synthetic:target{config.target_data}"

    def train_method(method: str, out_dir: Path) -> Path:
        return train(
            TrainConfig(
                arch=config.arch, source_a=str(sources["A"]), source_b=str(sources["B"]), data=target,
                out=str(out_dir), method=method, merge_epochs=config.merge_epochs,
                finetune_epochs=config.finetune_epochs, batch_size=config.batch_size, seed=config.seed,
                device=config.device, force=True,
            ),
            progress,
            command=f"mmexport demo ({method})",
        )

    start = time.perf_counter()
    ledger.claim("run", ".run.partial", ".run.lock")
    run_dir = train_method("medmerge", out / "run")
    ledger.record()
    timings["train"] = time.perf_counter() - start
    summary.run = str(run_dir)

    start = time.perf_counter()
    folded = fold_run(run_dir, "safetensors")
    report = verify_run(run_dir, data=target)
    timings["fold_verify"] = time.perf_counter() - start
    summary.fold_reproduced = folded.reproduced
    summary.fold_stats = report.stats()

    # What the merge is for: MedMerge against each source fine-tuned alone, same epoch budget.
    summary.comparison = {"medmerge": _final_metrics(run_dir)}
    if config.compare:
        start = time.perf_counter()
        ledger.claim("baselines")
        (out / "baselines").mkdir(exist_ok=True)
        for method in ("finetune-a", "finetune-b"):
            summary.comparison[method] = _final_metrics(train_method(method, out / "baselines" / method))
            ledger.record()
        timings["baselines"] = time.perf_counter() - start

    if config.export:
        start = time.perf_counter()
        for precision in ("fp32", "int8"):
            try:
                result = export_onnx_run(run_dir, precision, progress=progress)[precision]
            except VerificationError as exc:
                # The policy refused the artifact (nothing was published): a result the demo
                # reports, not a crash of the demo. fp32 must pass, so only int8 is tolerated.
                if precision != "int8" or exc.report is None:
                    raise
                summary.exports.append(ExportOutcome(precision, exc.report.stats(), refused=str(exc)))
                continue
            summary.exports.append(ExportOutcome(precision, result.report.stats(), str(result.path), result.size_bytes))
        timings["export"] = time.perf_counter() - start

    if config.bench_seconds > 0:
        start = time.perf_counter()
        settings = BenchSettings(batch_sizes=(1,), warmup_s=0.5, duration_s=config.bench_seconds, rounds=4)
        summary.bench = bench_run(run_dir, BenchRequest(engine="onnx", models=("folded", "unmerged", "dual"),
                                                        settings=settings), progress)
        timings["bench"] = time.perf_counter() - start

    training = json.loads((run_dir / "manifest.json").read_text())["training"]
    merge = training["stages"]["merge"]
    summary.merge_best = {"epoch": merge["best_epoch"], "val_accuracy": merge["best_metrics"]["accuracy"],
                          "val_macro_f1": merge["best_metrics"]["macro_f1"]}
    ledger.status = "complete"
    ledger.record()
    return summary


def _final_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    final = json.loads((run_dir / "manifest.json").read_text())["training"]["final"]
    return {split: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for split, m in final.items()}


__all__ = ["DemoConfig", "DemoSummary", "ExportOutcome", "run_demo", "train_synthetic_sources"]
