"""``mmexport bench``: the run's folded network against the unmerged model, a dual backbone and a stock one.

The point of folding is cost: the folded network should cost exactly one backbone
(``single``, the stock torchvision network of the same architecture: the floor),
the unmerged model carries two backbones and blends them on every call, and a
dual-backbone ensemble computes two. Every model is measured on the same engine
and precision, side by side (``mmexport.bench``), and the headline is the ratio
table folded ÷ each other model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mmexport.backbones import get_backbone
from mmexport.bench import BenchResult, BenchSettings, ModelUnderTest, benchmark, machine_info, ratio_table
from mmexport.errors import MissingDependencyError, MMExportError
from mmexport.fileio import atomic_path, write_json_atomic
from mmexport.manifest import RunDir
from mmexport.merge import MergedModel
from mmexport.modelfile import ModelInfo, load_model, load_unmerged
from mmexport.runners.torch_runner import TorchRunner
from mmexport.train import MODEL_FILE, UNMERGED_FILE, resolve_device

ENGINES = ("torch", "onnx", "trt")
MODEL_KINDS = ("folded", "unmerged", "dual", "single")
BENCH_DIR = "bench"


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
        if self.engine not in ENGINES:
            raise MMExportError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "trt":
            raise MissingDependencyError(
                "--engine trt needs the TensorRT runner, which is not part of this version yet; "
                "use --engine onnx or --engine torch"
            )
        unknown = [m for m in self.models if m not in MODEL_KINDS]
        if unknown or not self.models:
            raise MMExportError(f"unknown model {unknown[0] if unknown else '(none)'}; choose from {', '.join(MODEL_KINDS)}")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise MMExportError(f"unknown precision {self.precision!r}; choose fp32, fp16 or int8")
        if self.settings.device_timing and self.engine != "torch":
            raise MMExportError("--device-timing uses CUDA events of the torch runner: use --engine torch --device cuda")
        if self.engine == "torch" and self.precision != "fp32":
            raise MMExportError("--engine torch measures fp32 eager; fp16/int8 are ONNX artifacts (--engine onnx)")
        if self.threads is not None and self.threads < 1:
            raise MMExportError("--threads must be at least 1")
        self.settings.validate()


def dual_from_merged(merged: MergedModel) -> nn.Module:
    """Sources A and B side by side, each with the run's head, logits averaged (an ensemble's cost)."""
    from mmexport.export.onnx import DualBackbone

    template_state = merged.template.state_dict()
    members = []
    for bag in merged.sources:
        member = get_backbone(merged.arch).build(merged.num_classes)
        state = {name: bag.get(name) for name in merged.merge_names}
        state.update({k: template_state[k] for k in merged.head_names + merged.buffer_names})
        member.load_state_dict(state, strict=True)
        members.append(member.eval())
    return DualBackbone(*members)


def _torch_modules(run: RunDir, kinds: tuple[str, ...]) -> tuple[dict[str, nn.Module], ModelInfo]:
    folded, info = load_model(run.checked_file(MODEL_FILE))
    modules: dict[str, nn.Module] = {}
    needs_merge = {"unmerged", "dual"} & set(kinds)
    merged = None
    if needs_merge:
        if UNMERGED_FILE not in run.manifest["outputs"]:
            raise MMExportError(f"{run.path}: a run without a merge has no unmerged/dual model; use --models folded,single")
        merged, _ = load_unmerged(run.checked_file(UNMERGED_FILE))
    for kind in kinds:
        if kind == "folded":
            modules[kind] = folded
        elif kind == "unmerged":
            modules[kind] = merged.eval()
        elif kind == "dual":
            modules[kind] = dual_from_merged(merged).eval()
        else:
            torch.manual_seed(0)
            modules[kind] = get_backbone(info.arch).build(info.num_classes).eval()
    return modules, info


def _onnx_artifact(run: RunDir, kind: str, module: nn.Module, info: ModelInfo, precision: str,
                   calibration: Callable[[], Any]) -> Path:
    """The ONNX file of ``kind`` at ``precision``, made (and recorded) on first use."""
    from mmexport.export import convert_fp16, export_dual_onnx, export_onnx, export_unmerged_onnx, quantize_int8

    suffix = "" if precision == "fp32" else f".{precision}"
    name = f"{BENCH_DIR}/{kind}{suffix}.onnx"
    if name in run.manifest["outputs"]:
        return run.checked_file(name)
    run.file(BENCH_DIR).mkdir(exist_ok=True)
    if precision != "fp32":
        source = _onnx_artifact(run, kind, module, info, "fp32", calibration)
        with atomic_path(run.file(name)) as tmp:
            if precision == "fp16":
                convert_fp16(source, tmp)
            else:
                quantize_int8(source, tmp, calibration(), max_images=64)
    else:
        sha = run.manifest["outputs"].get(MODEL_FILE, {}).get("sha256", "0" * 64)
        exporter = {"folded": export_onnx, "single": export_onnx, "unmerged": export_unmerged_onnx,
                    "dual": export_dual_onnx}[kind]
        with atomic_path(run.file(name)) as tmp:
            exporter(module, info, tmp, weights_sha256=sha)
    run.record_output(name, "bench-model", model_kind=kind, precision=precision,
                      note="benchmark/comparison artifact, not a deployable model")
    return run.file(name)


def build_models(run: RunDir, request: BenchRequest) -> list[ModelUnderTest]:
    modules, info = _torch_modules(run, request.models)
    if request.engine == "torch":
        device = resolve_device(request.device)
        if request.threads and device.type == "cpu":
            torch.set_num_threads(request.threads)
        return [
            ModelUnderTest(kind, (lambda m=module, k=kind: TorchRunner(m, f"{k} (torch)", device,
                                                                      cuda_graphs=request.cuda_graphs)),
                           artifact_bytes=_torch_bytes(run, kind), image_size=info.image_size, engine="torch")
            for kind, module in modules.items()
        ]
    from mmexport.runners.onnxruntime_runner import OnnxRuntimeRunner

    cache: dict[str, Any] = {}

    def calibration():
        if "images" not in cache:
            from mmexport.data import load_task

            spec = run.manifest.get("config", {}).get("data")
            cache["images"] = load_task(spec, image_size=info.image_size).arrays("train", limit=64)[0]
        return cache["images"]

    from mmexport.workflows import ONNX_FILES

    deployable = ONNX_FILES[request.precision]  # the verified artifact `fold --to onnx` published, if any
    models = []
    for kind, module in modules.items():
        path = (run.checked_file(deployable) if kind == "folded" and deployable in run.manifest["outputs"]
                else _onnx_artifact(run, kind, module, info, request.precision, calibration))
        models.append(ModelUnderTest(
            kind, (lambda p=path, k=kind: OnnxRuntimeRunner(p, name=f"{k} (onnxruntime)", threads=request.threads)),
            artifact_bytes=path.stat().st_size, image_size=info.image_size, engine="onnxruntime",
            precision=request.precision,
        ))
    return models


def _torch_bytes(run: RunDir, kind: str) -> int | None:
    entry = run.manifest["outputs"].get({"folded": MODEL_FILE, "unmerged": UNMERGED_FILE}.get(kind, ""))
    return entry["size_bytes"] if entry else None


def bench_run(run_path: str | os.PathLike[str], request: BenchRequest,
              on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure, and return results, ratios and machine info (JSON-serialisable but for BenchResult objects)."""
    request.validate()
    run = RunDir.open(run_path)
    models = build_models(run, request)
    results = benchmark(models, request.settings, on_progress)
    return {
        "run": str(run.path),
        "engine": request.engine,
        "precision": request.precision,
        "settings": request.settings.__dict__,
        "machine": machine_info(),
        "results": results,
        "ratios": ratio_table(results),
    }


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    payload = {**report, "results": [r.as_dict() for r in report["results"]]}
    write_json_atomic(path, payload)


def plot(results: list[BenchResult], path: str | os.PathLike[str], title: str) -> None:
    """Latency (median, p90–p99 band) and throughput vs batch size, one line per model."""
    from mmexport.plots import plot_latency

    with atomic_path(Path(path)) as tmp:
        plot_latency(results, tmp, title)
