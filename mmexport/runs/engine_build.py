"""TensorRT engines of a run (torch-free): build from the verified ONNX, verify against the stored reference, publish.

The TensorRT API itself lives in :mod:`mmexport.convert.tensorrt` (build) and
:mod:`mmexport.runtime.runners.tensorrt` (run); engine sidecars and every
compatibility decision in :mod:`mmexport.runtime.engine`. This module is the
run-level glue that ``mmexport fold RUN --to trt`` and ``mmexport doctor`` call.

An engine is built from the run's *verified* ONNX of the same precision (fp16 and
int8 precision live in the graph: TensorRT 10 deprecated and 11 removed the
builder's precision flags), in a hidden build directory inside the run, then run
on the stored reference inputs and judged by the precision's tolerance row; only
an engine that passes is moved into place (engine, then its sidecar) and hashed
into the manifest with the sidecar.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mmexport import artifacts
from mmexport.artifacts import ArtifactFacts
from mmexport.convert.onnxfile import read_onnx_metadata
from mmexport.convert.tensorrt import BuildSettings, build_engine, tensorrt_status, trtexec_command
from mmexport.errors import MissingDependencyError, MMExportError, VerificationError
from mmexport.fileio import make_temporary_directory
from mmexport.progress import ProgressSink, sink
from mmexport.runs.lock import writes_run
from mmexport.runs.manifest import PublishedArtifact, RunDir, published
from mmexport.runs.verify import describes_run
from mmexport.runtime.check import check_runner
from mmexport.runtime.engine import BatchProfile, check_engine, current_environment, import_tensorrt, sidecar_path
from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner
from mmexport.runtime.tolerances import for_precision
from mmexport.environment import TORCH_EXTRA_INSTALL

INSTALL_HINT = "pip install 'mmexport[gpu]' on a machine with an NVIDIA GPU and driver"
TORCH_INSTALL = TORCH_EXTRA_INSTALL  # the torch side is an extra: the runtime alone runs without it
TORCH_HINT = f"needs PyTorch: {TORCH_INSTALL}"
DEFAULT_TIMING_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmexport" / "tensorrt-timing"


def require_tensorrt(what: str) -> None:
    """One line naming what is missing (the tensorrt package, or a GPU) and what to install."""
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingDependencyError(f"{what} needs TensorRT, which is not installed: {INSTALL_HINT}")

    available, reason = tensorrt_status()
    if not available:
        raise MissingDependencyError(f"{what} cannot run here: {reason}")


@dataclass(frozen=True)
class EngineOptions:
    """What shapes and how hard TensorRT builds (``fold --to trt`` options)."""
    min_batch: int = 1
    opt_batch: int | None = None  # None: 8, or max_batch when smaller
    max_batch: int = 32
    workspace_bytes: int | None = None
    optimization_level: int = 3
    timing_cache: Path | None = field(default=DEFAULT_TIMING_CACHE)
    hardware_compatibility: str | None = None
    version_compatible: bool = False

    def batches(self) -> tuple[int, int, int]:
        opt = self.opt_batch if self.opt_batch is not None else min(8, self.max_batch)
        if not (1 <= self.min_batch <= opt <= self.max_batch):
            raise MMExportError(
                f"the batch profile must satisfy 1 <= min ({self.min_batch}) <= opt ({opt}) <= max ({self.max_batch})"
            )
        return self.min_batch, opt, self.max_batch

    def settings(self, precision: str, image_size: int) -> BuildSettings:
        """These options as the builder's settings for one precision and input size."""
        low, opt, high = self.batches()
        return BuildSettings(precision, BatchProfile(low, opt, high), image_size, self.workspace_bytes,
                             self.optimization_level, self.hardware_compatibility or "none", self.version_compatible)


def _source_onnx(run: RunDir, precision: str) -> tuple[artifacts.Artifact, Path, dict[str, str]]:
    """The verified ONNX the engine is built from, with its metadata; int8 must be the symmetric TensorRT flavour."""
    onnx_row = artifacts.onnx_artifact(precision)
    if not run.has(onnx_row.filename):
        raise MMExportError(
            f"{run.path}: no verified {onnx_row.filename} to build from; make it first with `{onnx_row.made_by}`"
            + (" --int8-target tensorrt" if precision == "int8" else "")
        )
    path = run.checked_file(onnx_row.filename)
    metadata = read_onnx_metadata(path)
    describes_run(run, onnx_row.filename, metadata)  # the engine's sidecar copies this description: it must be the run's
    if precision == "int8" and metadata.get("int8_target") != "tensorrt":
        raise MMExportError(
            f"{onnx_row.filename} is the {metadata.get('int8_target', '?')} int8 flavour (asymmetric activations); "
            "TensorRT takes symmetric Q/DQ only: re-export it with `mmexport fold RUN --to onnx --precision int8 "
            "--int8-target tensorrt`"
        )
    return onnx_row, path, metadata


def trtexec_line(run_path: str | os.PathLike[str], precision: str, options: EngineOptions | None = None, *,
                 tensorrt_major: int | None = None) -> str:
    """The trtexec command that builds the same engine inside a TensorRT container (no sidecar: use fold --to trt)."""
    options = options or EngineOptions()
    run = RunDir.open(run_path)
    _, onnx_path, metadata = _source_onnx(run, precision)
    if tensorrt_major is None:
        tensorrt_major = 11
        if importlib.util.find_spec("tensorrt") is not None:

            tensorrt_major = int(str(import_tensorrt().__version__).split(".")[0])
    engine = run.file(artifacts.engine_artifact(precision).filename)
    command = trtexec_command(
        onnx_path, engine, options.settings(precision, int(metadata["image_size"])), tensorrt_major=tensorrt_major,
        timing_cache=(options.timing_cache / "trtexec.cache") if options.timing_cache else None,
    )
    return shlex.join(command)


@writes_run("fold --to trt")
def build_engine_run(
    run_path: str | os.PathLike[str], precision: str = "fp32", options: EngineOptions | None = None, *,
    samples: int | None = None, progress: ProgressSink | None = None,
) -> PublishedArtifact:
    """Build, verify and publish ``model[.<precision>].plan`` with its sidecar."""
    artifacts.check_precision(precision)
    require_tensorrt("fold --to trt")
    options = options or EngineOptions()
    progress = sink(progress)
    low, opt, high = options.batches()
    run = RunDir.open(run_path)
    _, onnx_path, metadata = _source_onnx(run, precision)
    reference = run.reference()
    row = artifacts.engine_artifact(precision)
    target = run.file(row.filename)
    # named with this process's token, recorded in the lock file: a killed build's folder is the next writer's to remove
    workdir = make_temporary_directory(run.path, "trt-build")
    try:
        built = workdir / row.filename
        result = build_engine(onnx_path, built, options.settings(precision, int(metadata["image_size"])),
                              timing_cache=options.timing_cache, progress=progress, model_metadata=metadata)
        progress.message(f"verifying {row.filename} against the stored reference ({precision} policy)")
        with TensorRTRunner(EngineFromPath(built), name=f"tensorrt {precision} ({row.filename})") as runner:
            report = check_runner(runner, reference, for_precision(precision), random_limit=samples)
        record = {"artifact": row.filename, "command": "export", **report.as_dict()}
        if not report.passed:
            run.add_verification(record)  # the failed check is history; nothing is published
            raise VerificationError(f"{row.filename}: verification failed, nothing published: " + "; ".join(report.failures()),
                                    report)
        sidecar, sidecar_name = result.sidecar, row.sidecar or sidecar_path(target).name
        # Staged before the renames and settled after them (RunDir.stage): a process killed in
        # between leaves the run's outputs and verifications as they were.
        run.stage(sidecar_name, sidecar_path(built), "engine-sidecar", {"engine": row.filename})
        run.stage(row.filename, built, "engine", {
            "precision": precision, "source": artifacts.onnx_artifact(precision).filename, "verified": True,
            "tensorrt_version": sidecar.tensorrt_version, "gpu": sidecar.gpu_name,
            "compute_capability": list(sidecar.compute_capability), "batch_profile": [low, opt, high],
            "build_seconds": round(result.build_seconds, 3)}, verification=record)
        os.replace(built, target)  # the engine first: an engine without its sidecar is refused by every loader
        os.replace(sidecar_path(built), sidecar_path(target))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    run.settle_pending(sidecar_name, renamed=True)
    run.settle_pending(row.filename, renamed=True)
    return published(run, row.filename, report, EngineBuild(warnings=list(result.warnings)))


@dataclass(frozen=True, kw_only=True)
class EngineBuild(ArtifactFacts):
    """What building an engine established beyond its sidecar: the builder's warnings."""

    warnings: list[str]


# -- doctor ------------------------------------------------------------------------------------------------------


@dataclass
class Capability:
    name: str
    available: bool
    detail: str


@dataclass
class DoctorReport:
    capabilities: list[Capability]
    artifacts: list[tuple[str, bool, str]] = field(default_factory=list)  # (file, can run here, why / how)


def _package(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def doctor(run_path: str | os.PathLike[str] | None = None) -> DoctorReport:
    """What this machine can run (torch and CUDA, ONNX Runtime providers, TensorRT, CUDA layer), and for a run,
    which of its artifacts can run here and why not. Imports what it probes, lazily, and survives any of it missing."""
    caps: list[Capability] = []
    torch_version = _package("torch")
    torch_ok = False  # importable here, not merely installed: what the torch-side files need
    torch_missing = TORCH_HINT
    if torch_version is None:
        caps.append(Capability("torch", False, "not installed (training, fold and ONNX export need it; the runtime does not)"))
        cuda_ok = False
    else:
        try:
            import torch

            torch_ok = True
            cuda_ok = bool(torch.cuda.is_available())
            detail = f"{torch.__version__}; CUDA {'available: ' + torch.cuda.get_device_name(0) if cuda_ok else 'not available'}"
            caps.append(Capability("torch", True, detail))
        except ImportError as exc:
            cuda_ok = False
            reason = " ".join(str(exc).split())[:200]
            caps.append(Capability("torch", False, f"installed but cannot be imported ({reason})"))
            torch_missing = f"needs PyTorch, which is installed but cannot be imported here ({reason}): {TORCH_INSTALL}"
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        caps.append(Capability("onnxruntime", True, f"{ort.__version__}; providers {', '.join(providers)}"))
    except ImportError:
        providers = []
        caps.append(Capability("onnxruntime", False, "not installed: pip install onnxruntime (or onnxruntime-gpu)"))
    if importlib.util.find_spec("tensorrt") is None:
        trt_ok, trt_detail = False, f"not installed: {INSTALL_HINT}"
    else:

        trt_ok, trt_detail = tensorrt_status()
    caps.append(Capability("tensorrt", trt_ok, trt_detail))
    for package, module in (("cuda-python", "cuda.bindings.runtime"), ("pycuda", "pycuda")):
        version = _package(package) or (_package("cuda-bindings") if package == "cuda-python" else None)
        present = version is not None and importlib.util.find_spec(module.split(".")[0]) is not None
        caps.append(Capability(package, present, version or "not installed"))
    try:

        environment = current_environment(require_tensorrt=False)
        cc = environment.compute_capability
        caps.append(Capability("gpu", True, f"{environment.gpu_name}, compute capability {cc[0]}.{cc[1]}, "
                                             f"driver {environment.cuda_driver_version}"))
        gpu_ok = True
    except MMExportError as exc:
        gpu_ok = cuda_ok
        caps.append(Capability("gpu", gpu_ok, str(exc) if not gpu_ok else "CUDA through torch"))
    report = DoctorReport(caps)
    if run_path is not None:
        run = RunDir.open(run_path)
        for row in artifacts.REGISTRY.values():
            if not row.is_model or not run.has(row.filename):
                continue
            if row.runner == "torch":
                report.artifacts.append((row.filename, torch_ok, "torch" if torch_ok else torch_missing))
            elif row.runner == "onnxruntime":
                report.artifacts.append((row.filename, bool(providers),
                                         "onnxruntime (" + ", ".join(providers) + ")" if providers else "needs onnxruntime"))
            elif row.runner == "tensorrt":
                if not trt_ok:
                    report.artifacts.append((row.filename, False, trt_detail))
                    continue

                try:
                    check_engine(run.file(row.filename))
                    report.artifacts.append((row.filename, True, "engine matches this GPU and TensorRT"))
                except MMExportError as exc:
                    report.artifacts.append((row.filename, False, str(exc)))
    del gpu_ok
    return report


__all__ = ["Capability", "DoctorReport", "EngineOptions", "build_engine_run", "doctor", "require_tensorrt", "trtexec_line"]
