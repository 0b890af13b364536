"""``mmexport bench``: the run's folded network against the unmerged model, a dual backbone and a stock one.

The point of folding is cost: the folded network should cost exactly one backbone
(``single``, the stock torchvision network of the same architecture: the floor),
the unmerged model carries two backbones and blends them on every call, and a
dual-backbone ensemble computes two. Every model is measured on the same engine
and precision, side by side (:mod:`mmexport.runtime.timing`), and the headline is the
ratio table folded ÷ each other model.

Only verified artifacts are measured as such: the folded model is the deployable
artifact ``fold --to onnx`` published (made here only for fp32), and each
comparison model goes through the same export-then-verify path
(:func:`mmexport.torchside.operations.export_comparison`), reused by hash once made. A
comparison model that failed its check is measured but its rows say so. With
``--engine onnx`` and the files already made, nothing here imports PyTorch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmexport import artifacts
from mmexport.artifacts import MODEL_KINDS
from mmexport.config import check_int
from mmexport.errors import MMExportError
from mmexport.fileio import atomic_path, write_json_atomic
from mmexport.progress import ProgressSink, sink
from mmexport.runs.engine_build import require_tensorrt
from mmexport.runs.lock import writing
from mmexport.runs.manifest import RunDir
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner
from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner
from mmexport.runtime.timing import BenchResult, BenchSettings, ModelUnderTest, benchmark, machine_info, ratio_table


@dataclass
class BenchRequest:
    engine: str = "onnx"
    precision: str = "fp32"
    models: tuple[str, ...] = MODEL_KINDS
    threads: int | None = None
    device: str = "auto"
    cuda_graphs: bool = False
    settings: BenchSettings = field(default_factory=BenchSettings)

    def validate(self) -> None:
        artifacts.check_engine(self.engine)
        artifacts.check_precision(self.precision)
        unknown = [m for m in self.models if m not in MODEL_KINDS]
        if unknown or not self.models:
            raise MMExportError(f"unknown model {unknown[0] if unknown else '(none)'}; choose from {', '.join(MODEL_KINDS)}")
        if self.engine == "trt":

            require_tensorrt("bench --engine trt")
        if self.engine == "torch" and self.precision != "fp32":
            raise MMExportError("--engine torch measures fp32 eager; fp16/int8 are ONNX artifacts (--engine onnx)")
        if self.engine != "torch":
            for kind in self.models:
                if kind != "folded":
                    artifacts.comparison_artifact(kind, self.precision)  # the unmerged model is fp32 only
        if self.settings.device_timing and self.engine == "onnx":
            raise MMExportError("--device-timing needs CUDA events: use --engine torch --device cuda or --engine trt")
        if self.threads is not None:
            check_int(self.threads, "--threads")
        self.settings.validate()


@dataclass
class BenchReport:
    run: str
    engine: str
    precision: str
    settings: dict[str, Any]
    machine: dict[str, Any]
    results: list[BenchResult]
    ratios: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "results": [r.as_dict() for r in self.results]}

    def warnings(self) -> list[str]:
        """One line per kind of warning, naming the rows it concerns (never one line per row)."""
        grouped: dict[str, tuple[str, list[str]]] = {}
        for result in self.results:
            row = f"{result.model}@{result.batch_size}"
            found = [(w.split(":")[0], w.split(";")[0]) for w in result.warnings]
            found += [("gpu " + w.split(",")[0], "GPU: " + w) for w in (result.device or {}).get("warnings", [])]
            for kind, text in found:
                grouped.setdefault(kind, (text, []))[1].append(row)
        lines = [f"{text} — in {len(rows)} of {len(self.results)} rows ({', '.join(rows)})"
                 for text, rows in grouped.values()]
        unsettled = [r for r in self.ratios if r.get("settled") is False and r.get("advice")]
        if unsettled:
            worst = max(unsettled, key=lambda r: r.get("rounds_needed") or 0)
            lines.append(f"headline not settled — the rounds disagree on {len(unsettled)} of {len(self.ratios)} ratios "
                         f"({', '.join(str(r['ratio']) + '@' + str(r['batch_size']) for r in unsettled)}); worst, "
                         f"{worst['ratio']}@{worst['batch_size']}: {worst['advice']}")
        unverified = sorted({r.model for r in self.results if r.verified is False})
        if unverified:
            lines.append(f"unverified (failed its check against the reference): {', '.join(unverified)}")
        return lines


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for the benchmark and restore them after (no process-wide side effect)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_models(run: RunDir, request: BenchRequest) -> list[ModelUnderTest]:
    from mmexport.torchside.operations import comparison_modules
    from mmexport.torchside.torch_runner import TorchRunner
    from mmexport.torchside.train import resolve_device

    modules, info = comparison_modules(run, request.models)
    device = resolve_device(request.device)
    timing = request.settings.device_timing is not None
    sizes = {"folded": artifacts.filename("model"), "unmerged": artifacts.filename("unmerged")}
    return [
        ModelUnderTest(
            kind, (lambda m=module, k=kind: TorchRunner(m, f"{k} (torch)", device, cuda_graphs=request.cuda_graphs,
                                                          device_timing=timing, image_size=info.image_size)),
            artifact_bytes=run.manifest["outputs"].get(sizes.get(kind, ""), {}).get("size_bytes"),
            image_size=info.image_size, engine="torch", verified=True if kind in ("folded", "unmerged") else None,
            note="eager fp32")
        for kind, module in modules.items()
    ]


def _artifact_models(run: RunDir, request: BenchRequest, progress: ProgressSink) -> list[ModelUnderTest]:

    image_size = int(run.manifest.get("model", {}).get("image_size", 224))
    models = []
    for kind in request.models:
        if kind == "folded":
            row = (artifacts.onnx_artifact if request.engine == "onnx" else artifacts.engine_artifact)(request.precision)
            if not run.has(row.filename):
                if request.engine == "onnx" and request.precision == "fp32":
                    from mmexport.torchside.operations import export_onnx_run

                    progress.message(f"the run has no {row.filename} yet: exporting and verifying it first")
                    export_onnx_run(run.path, "fp32", progress=progress)
                    run = RunDir.open(run.path)
                else:
                    raise MMExportError(f"{run.path}: no verified {row.filename} to benchmark; make it with `{row.made_by}`")
            path, verified, note = run.checked_file(row.filename), True, "deployable artifact"
        else:
            row = artifacts.comparison_artifact(kind, request.precision)
            if not run.has(row.filename):
                from mmexport.torchside.operations import export_comparison

                export_comparison(run, kind, request.precision, progress=progress)
                run = RunDir.open(run.path)
            path = run.checked_file(row.filename)
            verified = bool(run.manifest["outputs"][row.filename].get("verified"))
            note = "comparison model"
        models.append(_runner_model(kind, row, path, request, image_size, verified, note))
    return models


def _runner_model(kind: str, row: artifacts.Artifact, path: Path, request: BenchRequest, image_size: int,
                  verified: bool, note: str) -> ModelUnderTest:
    if row.runner == "onnxruntime":

        def make(p=path, k=kind):
            return OnnxRuntimeRunner(p, name=f"{k} (onnxruntime)", threads=request.threads)
        engine = "onnxruntime"
    else:

        def make(p=path, k=kind):
            return TensorRTRunner(EngineFromPath(p), name=f"{k} (tensorrt)", cuda_graphs=request.cuda_graphs)
        engine = "tensorrt"
    return ModelUnderTest(kind, make, artifact_bytes=path.stat().st_size, image_size=image_size, engine=engine,
                          precision=request.precision, verified=verified, note=note)


def bench_run(run_path: str | os.PathLike[str], request: BenchRequest,
              progress: ProgressSink | None = None, *, lock_wait: float | None = None) -> BenchReport:
    """Measure the models side by side and return the typed report.

    ``lock_wait``: seconds to wait for another command writing the run while comparison models are made.
    """
    request.validate()
    progress = sink(progress)
    run = RunDir.open(run_path)
    if request.engine == "torch":
        with _torch_threads(request.threads):
            models = _torch_models(run, request)
            results = benchmark(models, request.settings, progress.message)
    else:

        with writing(run.path, "bench", wait=lock_wait):  # only while comparison models may be made; measuring needs no lock
            models = _artifact_models(RunDir.open(run.path), request, progress)
        results = benchmark(models, request.settings, progress.message)
    return BenchReport(str(run.path), request.engine, request.precision, asdict(request.settings), machine_info(),
                       results, ratio_table(results, settings=request.settings))


def write_json(report: BenchReport, path: str | os.PathLike[str]) -> None:
    write_json_atomic(path, report.as_dict())


def plot(results: list[BenchResult], path: str | os.PathLike[str], title: str) -> None:
    """Latency (median, p90–p99 band) and throughput vs batch size, one line per model."""
    from mmexport.plots import plot_latency

    with atomic_path(Path(path)) as tmp:
        plot_latency(results, tmp, title)


__all__ = ["BenchReport", "BenchRequest", "bench_run", "plot", "write_json"]
