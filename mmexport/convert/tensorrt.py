"""ONNX -> TensorRT engine through the TensorRT Python API, and the equivalent trtexec command.

Precision is a property of the ONNX graph (``model.onnx`` fp32, ``model.fp16.onnx`` fp16
with fp32 I/O, ``model.int8.onnx`` explicit symmetric Q/DQ): TensorRT 10.12 deprecated
and TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16/INT8/BF16``,
INT8 calibrators, ``platform_has_fast_fp16``, trtexec ``--fp16/--int8/--best``), and 11
builds every network strongly typed. So:

* the network is created strongly typed: ``1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)``
  on 10.x (the enum value is 1 there, 0 on 11 -- always take it from the enum); on 11.x
  no flag (the flag is deprecated and ignored, strong typing is always on);
* no precision flag is ever set, on either major; ``BuilderFlag.TF32`` (on by default)
  is cleared for fp32 engines so fp32 means fp32;
* one optimisation profile for the dynamic batch of input ``image`` (N x 3 x S x S);
  workspace limit (``MemoryPoolType.WORKSPACE``), builder optimisation level (0..5,
  default 3), optional hardware compatibility level and ``VERSION_COMPATIBLE``;
  ``ProfilingVerbosity.DETAILED`` so the engine inspector can report layer types;
* a persistent timing cache per TensorRT version and GPU (the file name says which, so
  an upgrade never reuses a stale cache), read and merged under an exclusive
  ``fcntl.flock`` on ``<cache>.lock``, merged with ``ITimingCache.combine`` as
  Polygraphy's ``EngineBytesFromNetwork`` does;
* after the build the engine is inspected and an fp16/int8 engine whose compute layers
  do not run in that precision is refused (:func:`mmexport.runtime.engine.precision_problems`);
* the engine is written under a temporary name, hashed, published, and its sidecar
  written last (a crash leaves an engine without a valid sidecar, which
  :func:`mmexport.runtime.engine.check_engine` refuses, never a wrong pair).

Everything decidable without TensorRT (flags per major and precision, the profile,
cache names, the sidecar, the trtexec line) is a pure function here, tested with a
fake ``tensorrt`` module. TensorRT is imported only inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmexport import __version__
from mmexport.artifacts import check_precision
from mmexport.config import check_int
from mmexport.errors import CheckpointError, MMExportError, VerificationError
from mmexport.fileio import atomic_path, sha256_file, write_json_atomic
from mmexport.progress import sink
from mmexport.runtime.engine import (
    GPU_INSTALL_HINT,
    HARDWARE_COMPATIBILITY,
    PRECISIONS,
    BatchProfile,
    BuildFlags,
    EngineEnvironment,
    EngineSidecar,
    LayerPrecisionSummary,
    PlanHeader,
    check_tensorrt_supported,
    current_environment,
    import_tensorrt,
    layer_precisions,
    precision_problems,
    read_plan_header,
    sidecar_path,
    tensorrt_version_tuple,
    utc_now,
)
from mmexport.runtime.runners.tensorrt import create, make_logger

log = logging.getLogger(__name__)

INPUT_NAME = "image"
CHANNELS = 3
MAX_OPTIMIZATION_LEVEL = 5
DEFAULT_OPTIMIZATION_LEVEL = 3


# --------------------------------------------------------------------------------------------
# pure decisions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildSettings:
    """The one settings object of an engine build (:func:`build_engine`, :func:`trtexec_command`): precision,
    batch profile, input size and builder options, validated before anything touches TensorRT."""
    precision: str
    profile: BatchProfile
    image_size: int
    workspace_bytes: int | None = None
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    hardware_compatibility: str = "none"
    version_compatible: bool = False

    @classmethod
    def of(cls, precision: str, *, min_batch: int, opt_batch: int, max_batch: int, image_size: int,
           **builder: Any) -> "BuildSettings":
        """Settings from plain keywords (``workspace_bytes``, ``optimization_level``, ``hardware_compatibility``,
        ``version_compatible`` as builder options); validated when a build or a trtexec line uses them."""
        return cls(precision, BatchProfile(min_batch, opt_batch, max_batch), image_size, **builder)

    def validate(self) -> "BuildSettings":
        check_precision(self.precision)
        self.profile.validate()
        check_int(self.image_size, "image size")
        if self.workspace_bytes is not None:
            check_int(self.workspace_bytes, "workspace (bytes)")
        check_int(self.optimization_level, "builder optimization level", low=0, high=MAX_OPTIMIZATION_LEVEL)
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise MMExportError(
                f"unknown hardware compatibility {self.hardware_compatibility!r}; use one of {', '.join(HARDWARE_COMPATIBILITY)}"
            )
        return self

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of input ``image``."""
        s = self.image_size
        return tuple((n, CHANNELS, s, s) for n in (self.profile.min, self.profile.opt, self.profile.max))  # type: ignore[return-value]

    def flags(self) -> BuildFlags:
        return BuildFlags(
            optimization_level=self.optimization_level,
            tf32=self.precision != "fp32",
            hardware_compatibility=self.hardware_compatibility,
            version_compatible=self.version_compatible,
            workspace_bytes=self.workspace_bytes,
            strongly_typed=True,
        )


def tensorrt_major(trt: Any) -> int:
    """The major version of an imported ``tensorrt`` module, checked to be supported (10.12+, 11.x)."""
    return check_tensorrt_supported(str(trt.__version__))


def network_flags(trt: Any, major: int) -> int:
    """``create_network`` flags: strongly typed on 10.x; nothing on 11.x (always strongly typed)."""
    if major >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


@dataclass(frozen=True)
class FlagPlan:
    """``BuilderFlag`` member names to set and to clear."""
    set: tuple[str, ...] = ()
    clear: tuple[str, ...] = ()


def builder_flag_plan(precision: str, major: int, *, version_compatible: bool = False) -> FlagPlan:
    """Which builder flags to touch. Never FP16/INT8/BF16 (deprecated in 10.12, gone in 11): the graph decides."""
    if precision not in PRECISIONS:
        raise MMExportError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    to_set: list[str] = []
    to_clear: list[str] = []
    if precision == "fp32":
        to_clear.append("TF32")  # on by default; an fp32 engine computes in fp32
    if version_compatible:
        to_set.append("VERSION_COMPATIBLE")
    return FlagPlan(tuple(to_set), tuple(to_clear))


def configure_builder(trt: Any, config: Any, settings: BuildSettings, major: int) -> FlagPlan:
    """Apply settings to an ``IBuilderConfig`` (flags, workspace, level, compatibility, verbosity)."""
    plan = builder_flag_plan(settings.precision, major, version_compatible=settings.version_compatible)
    for name in plan.clear:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    for name in plan.set:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    config.builder_optimization_level = int(settings.optimization_level)
    member = HARDWARE_COMPATIBILITY[settings.hardware_compatibility][0]
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return plan


def add_batch_profile(builder: Any, config: Any, settings: BuildSettings, input_name: str = INPUT_NAME) -> Any:
    profile = builder.create_optimization_profile()
    low, opt, high = settings.shapes()
    profile.set_shape(input_name, low, opt, high)
    index = config.add_optimization_profile(profile)
    if index is not None and int(index) < 0:
        raise MMExportError(f"TensorRT rejected the optimisation profile {low} / {opt} / {high} for input {input_name}")
    return profile


def check_network_input(network: Any, image_size: int) -> None:
    """The parsed network has one input ``image`` of shape (dynamic or N) x 3 x S x S."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in inputs]
    if INPUT_NAME not in names:
        raise CheckpointError(f"the ONNX model has inputs {names}, mmexport engines need one input named {INPUT_NAME!r}")
    shape = tuple(int(d) for d in inputs[names.index(INPUT_NAME)].shape)
    expected = (CHANNELS, image_size, image_size)
    if len(shape) != 4 or shape[1:] != expected:
        raise CheckpointError(f"input {INPUT_NAME} has shape {shape}, expected (N, {CHANNELS}, {image_size}, {image_size})")
    if shape[0] != -1:
        raise CheckpointError(f"input {INPUT_NAME} has a fixed batch {shape[0]}; export the ONNX with a dynamic batch")


def parser_errors(parser: Any) -> list[str]:
    """Every ONNX parser error, each naming its node: ``node 3 (/conv1/Conv, Conv): <desc>``."""
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = _safe(error, "node")
        name = _safe(error, "node_name")
        op = _safe(error, "node_operator")
        desc = " ".join(str(_safe(error, "desc") or "").split())
        where = f"node {node}" if node is not None and int(node) >= 0 else "model"
        detail = ", ".join(str(x) for x in (name, op) if x)
        errors.append(f"{where}{f' ({detail})' if detail else ''}: {desc or 'no description'}")
    return errors


def _safe(obj: Any, method: str) -> Any:
    try:
        value = getattr(obj, method)
        return value() if callable(value) else value
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# timing cache
# --------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def timing_cache_filename(tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int]) -> str:
    """One cache file per TensorRT version and GPU: ``timing-trt10.16.1.11-nvidia-h100-80gb-hbm3-sm90.cache``."""
    version = ".".join(str(p) for p in tensorrt_version_tuple(tensorrt_version))
    major, minor = compute_capability
    return f"timing-trt{version}-{_slug(gpu_name)}-sm{major}{minor}.cache"


def timing_cache_path(cache_dir: str | os.PathLike[str], environment: EngineEnvironment) -> Path:
    if environment.tensorrt_version is None:
        raise MMExportError("the timing cache name needs the TensorRT version")
    return Path(cache_dir) / timing_cache_filename(
        environment.tensorrt_version, environment.gpu_name, environment.compute_capability
    )


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``<path>.lock`` (the lock file stays; the lock goes with the process)."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_timing_cache(config: Any, path: Path) -> Any:
    """Create the build's timing cache from the file (under the lock), or an empty one, and attach it."""
    data = b""
    if path.is_file():
        with locked(path):
            data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a truncated or foreign file
        cache = None
    if cache is None and data:
        log.warning("timing cache %s is unreadable; starting an empty one", path)
        cache = config.create_timing_cache(b"")
    if cache is None:
        raise MMExportError("TensorRT could not create a timing cache")
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def save_timing_cache(config: Any, path: Path) -> bool:
    """Merge what is on disk into this build's cache and write it, all under the lock (Polygraphy's order).

    Returns whether the previous file was merged (False: there was none, or ``combine``
    refused it -- then this build's cache replaces it).
    """
    cache = config.get_timing_cache()
    if cache is None:
        return False
    merged = False
    with locked(path):
        if path.is_file():
            try:
                previous = config.create_timing_cache(path.read_bytes())
            except Exception:
                previous = None
            if previous is not None:
                merged = bool(cache.combine(previous, False))
                if not merged:
                    log.warning("could not merge the timing cache %s into this build's; replacing it", path)
        data = bytes(memoryview(cache.serialize()))
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return merged


# --------------------------------------------------------------------------------------------
# sidecar, trtexec, status
# --------------------------------------------------------------------------------------------
def assemble_sidecar(
    *,
    settings: BuildSettings,
    environment: EngineEnvironment,
    header: PlanHeader,
    summary: LayerPrecisionSummary,
    onnx_sha256: str,
    engine_sha256: str,
    model_metadata: dict[str, str],
    created: str | None = None,
) -> EngineSidecar:
    if environment.tensorrt_version is None:
        raise MMExportError("the sidecar needs the TensorRT version")
    sidecar = EngineSidecar(
        tensorrt_version=environment.tensorrt_version,
        plan_tensorrt_version=header.tensorrt_version_text,
        plan_layout=header.layout,
        plan_archive_version=header.archive_version,
        gpu_name=environment.gpu_name,
        compute_capability=tuple(environment.compute_capability),  # type: ignore[arg-type]
        cuda_runtime_version=environment.cuda_runtime_version,
        cuda_driver_version=environment.cuda_driver_version,
        precision=settings.precision,
        layer_precisions=summary.to_sidecar(settings.precision),
        batch_profile=settings.profile,
        image_size=settings.image_size,
        input_name=INPUT_NAME,
        build_flags=settings.flags(),
        onnx_sha256=onnx_sha256,
        engine_sha256=engine_sha256,
        model_metadata=dict(model_metadata),
        created=created or utc_now(),
        mmexport_version=__version__,
    )
    # read back through the reader's validator: a build never writes a sidecar a loader would refuse
    return EngineSidecar.from_dict(sidecar.to_dict(), "new engine sidecar")


def _mem_pool_text(nbytes: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return f"{nbytes}B"


def trtexec_command(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    settings: BuildSettings,
    *,
    tensorrt_major: int,
    timing_cache: str | os.PathLike[str] | None = None,
    executable: str = "trtexec",
) -> list[str]:
    """The trtexec command line that builds the same engine inside a TensorRT container.

    No precision flag on either major (the ONNX graph carries the precision);
    ``--stronglyTyped`` on 10.x (a deprecated no-op on 11.x, so omitted); ``--noTF32``
    for fp32. ``timing_cache`` is the cache *file* (see :func:`timing_cache_filename`).
    The engine is built only (``--skipInference``) with detailed profiling verbosity,
    as :func:`build_engine` does. Note: trtexec writes no mmexport sidecar; an engine
    built this way is loaded by mmexport only with a sidecar made for it.
    """
    if tensorrt_major not in (10, 11):
        raise MMExportError(f"trtexec lines are known for TensorRT 10 and 11, not {tensorrt_major}")
    settings = settings.validate()
    size = settings.image_size
    shape = lambda n: f"{INPUT_NAME}:{n}x{CHANNELS}x{size}x{size}"  # noqa: E731
    cmd = [
        executable,
        f"--onnx={os.fspath(onnx_path)}",
        f"--saveEngine={os.fspath(engine_path)}",
        f"--minShapes={shape(settings.profile.min)}",
        f"--optShapes={shape(settings.profile.opt)}",
        f"--maxShapes={shape(settings.profile.max)}",
        f"--builderOptimizationLevel={settings.optimization_level}",
        "--profilingVerbosity=detailed",
    ]
    if tensorrt_major == 10:
        cmd.append("--stronglyTyped")
    if settings.precision == "fp32":
        cmd.append("--noTF32")
    if settings.workspace_bytes is not None:
        cmd.append(f"--memPoolSize=workspace:{_mem_pool_text(settings.workspace_bytes)}")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={os.fspath(timing_cache)}")
    if settings.hardware_compatibility != "none":
        cmd.append(f"--hardwareCompatibilityLevel={HARDWARE_COMPATIBILITY[settings.hardware_compatibility][1]}")
    if settings.version_compatible:
        cmd.append("--versionCompatible")
    cmd.append("--skipInference")
    return cmd


def tensorrt_status() -> tuple[bool, str]:
    """For ``mmexport doctor``: (usable?, one line: the version and GPU, or what is missing)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, f"TensorRT is not installed: {GPU_INSTALL_HINT}"
    try:
        trt = import_tensorrt()
        check_tensorrt_supported(str(trt.__version__))
        environment = current_environment()
    except MMExportError as exc:
        return False, str(exc)
    return True, (
        f"TensorRT {environment.tensorrt_version} on {environment.gpu_name} "
        f"(compute capability {environment.compute_capability[0]}.{environment.compute_capability[1]})"
    )


# --------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineBuildResult:
    engine_path: Path
    sidecar_path: Path
    sidecar: EngineSidecar
    build_seconds: float
    timing_cache_path: Path | None
    timing_cache_merged: bool
    tensorrt_major: int
    flags: FlagPlan
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable ONNX model ({text})") from None
    return {prop.key: prop.value for prop in model.metadata_props}


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    settings: BuildSettings,
    *,
    timing_cache: str | os.PathLike[str] | None = None,
    progress: Any = None,
    model_metadata: dict[str, str] | None = None,
) -> EngineBuildResult:
    """Build ``engine_path`` (and its sidecar) from ``onnx_path`` with the TensorRT Python API.

    ``timing_cache``: a directory holding the persistent timing caches (one file per
    TensorRT version and GPU, :func:`timing_cache_filename`). ``progress``: a
    :class:`mmexport.progress.ProgressSink` (messages only). ``model_metadata``: the
    flat model description for the sidecar (default: the ONNX file's ``metadata_props``).

    Raises :class:`MissingDependencyError` (no TensorRT / GPU), :class:`CheckpointError`
    (unparsable ONNX, every parser error by node; wrong input), :class:`MMExportError`
    (invalid options, a failed build) and :class:`VerificationError` (an fp16/int8 engine
    whose layers do not run in that precision); nothing is written then.
    """

    say = sink(progress).message
    settings = settings.validate()
    precision, image_size = settings.precision, settings.image_size
    onnx_file, engine_file = Path(onnx_path), Path(engine_path)
    if not onnx_file.is_file():
        raise CheckpointError(f"{onnx_file}: no such ONNX file")
    metadata = dict(model_metadata) if model_metadata is not None else _onnx_metadata(onnx_file)
    onnx_sha256 = sha256_file(onnx_file)

    trt = import_tensorrt()
    major = tensorrt_major(trt)
    environment = current_environment()

    logger = make_logger(trt)
    builder = create(trt.Builder, logger, "builder")
    network = builder.create_network(network_flags(trt, major))
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_file.name} (TensorRT {trt.__version__})")
    if not parser.parse_from_file(str(onnx_file)):
        errors = parser_errors(parser) or [logger.last_error()]
        raise CheckpointError(f"{onnx_file}: TensorRT cannot parse it: " + "; ".join(errors))
    check_network_input(network, image_size)

    config = builder.create_builder_config()
    plan = configure_builder(trt, config, settings, major)
    add_batch_profile(builder, config, settings)
    cache_file = None
    if timing_cache is not None:
        cache_file = timing_cache_path(timing_cache, environment)
        load_timing_cache(config, cache_file)

    say(f"building the {precision} engine (batch {settings.profile.text()}, {image_size}x{image_size}, "
        f"optimisation level {settings.optimization_level})")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise MMExportError(f"TensorRT could not build the engine: {logger.last_error()}")
    data = bytes(memoryview(serialized))
    merged = save_timing_cache(config, cache_file) if cache_file is not None else False
    header = read_plan_header(data)

    say("inspecting the engine's layer precisions")
    summary = _inspect(trt, logger, data, version_compatible=settings.version_compatible)
    problems = precision_problems(summary, precision)
    if problems:
        raise VerificationError(
            f"the {precision} engine built from {onnx_file.name} does not run in {precision}: {'; '.join(problems)}; "
            "nothing was written"
        )

    side = sidecar_path(engine_file)
    with atomic_path(engine_file) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        engine_sha256 = sha256_file(tmp)
        sidecar = assemble_sidecar(
            settings=settings, environment=environment, header=header, summary=summary,
            onnx_sha256=onnx_sha256, engine_sha256=engine_sha256, model_metadata=metadata,
        )
    write_json_atomic(side, sidecar.to_dict())
    say(f"wrote {engine_file.name} ({len(data) / 2**20:.1f} MiB) and {side.name}")
    return EngineBuildResult(engine_file, side, sidecar, seconds, cache_file, merged, major, plan, tuple(logger.warnings))


def _inspect(trt: Any, logger: Any, data: bytes, *, version_compatible: bool = False) -> LayerPrecisionSummary:

    runtime = create(trt.Runtime, logger, "runtime")
    if version_compatible:
        runtime.engine_host_code_allowed = True  # our own plan, with its embedded lean runtime
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise MMExportError(f"TensorRT could not load the engine it just built: {logger.last_error()}")
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    del inspector, engine, runtime
    return layer_precisions(info)


__all__ = [
    "BuildSettings",
    "EngineBuildResult",
    "FlagPlan",
    "INPUT_NAME",
    "add_batch_profile",
    "assemble_sidecar",
    "build_engine",
    "builder_flag_plan",
    "check_network_input",
    "configure_builder",
    "load_timing_cache",
    "locked",
    "network_flags",
    "parser_errors",
    "save_timing_cache",
    "tensorrt_major",
    "tensorrt_status",
    "timing_cache_filename",
    "timing_cache_path",
    "trtexec_command",
]
