"""Timing harness over runners: latency distribution, throughput, load time, memory.

Modelled on trtexec / onnxruntime_perf_test: warm-up by time, then a timed phase
by duration or iteration count, inputs rotating among several random batches (no
single-buffer cache effects), percentiles and the coefficient of variation with a
warning when it is high. Models are measured *side by side*: their timed phases are
interleaved in rounds, so drift of a shared, noisy machine hits every model alike
and the ratios between them stay trustworthy.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from mmexport.config import check_int
from mmexport.environment import environment_info
from mmexport.errors import MMExportError
from mmexport.runtime.runners.base import BaseRunner
from mmexport.runtime.trt_stats import trtexec_summary

UNSTABLE_CV = 0.10  # host wall clock on a shared CPU; TensorRT runs use trtexec's own 2.5 % of GPU compute (trt_stats)


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup_s: float = 1.0
    duration_s: float | None = 5.0
    iterations: int | None = None
    rounds: int = 5  # interleaving rounds per batch size
    distinct_batches: int = 4
    seed: int = 0
    # GPU: time on the device with CUDA events (runners whose ``last_inference_timings()``
    # reports them); "compute" excludes the host<->device copies, "total" includes them.
    # None: host wall clock.
    device_timing: str | None = None

    def validate(self) -> None:
        if not self.batch_sizes:
            raise MMExportError("give at least one batch size")
        for batch in self.batch_sizes:
            check_int(batch, "batch size")
        if (self.duration_s is None) == (self.iterations is None):
            raise MMExportError("give exactly one of --duration and --iterations")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise MMExportError(f"--duration must be a positive number of seconds, got {self.duration_s}")
        if self.iterations is not None:
            check_int(self.iterations, "--iterations")
        if self.device_timing not in (None, "compute", "total"):
            raise MMExportError(f"device timing must be compute or total, got {self.device_timing!r}")
        if not math.isfinite(self.warmup_s):
            raise MMExportError(f"--warmup must be a finite number of seconds, got {self.warmup_s}")
        if self.warmup_s < 0 or self.rounds < 1 or self.distinct_batches < 1:
            raise MMExportError("--warmup must be >= 0; rounds and distinct batches >= 1")


@dataclass
class LatencyStats:
    iterations: int
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    std_ms: float
    cv: float
    throughput_ips: float  # images per second at this batch size (batch / mean latency)

    @classmethod
    def from_samples(cls, seconds: list[float], batch_size: int) -> "LatencyStats":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
        return cls(
            iterations=len(ms), min_ms=float(ms.min()), mean_ms=mean, median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)), p95_ms=float(np.percentile(ms, 95)),
            p99_ms=float(np.percentile(ms, 99)), max_ms=float(ms.max()), std_ms=std, cv=std / mean if mean else 0.0,
            throughput_ips=batch_size / (mean / 1e3) if mean else 0.0,
        )


@dataclass
class BenchResult:
    model: str
    engine: str
    precision: str
    batch_size: int
    latency: LatencyStats
    load_s: float
    artifact_bytes: int | None
    peak_rss_bytes: int | None  # process RSS high-water mark during load + warm-up, minus RSS before the load
    gpu_peak_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    verified: bool | None = None  # whether the artifact measured passed its verification (None: not applicable)
    note: str = ""  # what the row measures, where it is not obvious
    device: dict | None = None  # GPU runners: trtexec's statistics of H2D / compute / D2H / enqueue (trt_stats)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelUnderTest:
    """A named model and how to make its runner (a fresh one per batch size)."""
    name: str
    make_runner: Callable[[], BaseRunner]
    artifact_bytes: int | None = None
    image_size: int = 224
    engine: str = "torch"
    precision: str = "fp32"
    verified: bool | None = None
    note: str = ""


def _reset_peak_rss() -> bool:
    # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) so each model gets its own peak.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _current_rss_bytes() -> int | None:
    return _proc_status_bytes("VmRSS")


def _peak_rss_bytes() -> int | None:
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _gpu_peak(reset: bool = False) -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return int(torch.cuda.max_memory_allocated())


@dataclass
class _DeviceSamples:
    h2d: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    d2h: list[float] = field(default_factory=list)
    enqueue: list[float] = field(default_factory=list)

    def add(self, runner: BaseRunner) -> None:
        parts = runner.last_inference_timings()
        if parts is None:
            return
        self.h2d.append(parts["h2d"])
        self.compute.append(parts["compute"])
        self.d2h.append(parts["d2h"])
        enqueue = runner.last_enqueue_time()
        self.enqueue.append(enqueue if enqueue is not None else float("nan"))


def _timed_calls(runner: BaseRunner, batches: list[np.ndarray], start_index: int, seconds: float | None,
                 count: int | None, device_timing: str | None = None,
                 device: _DeviceSamples | None = None) -> tuple[list[float], int]:
    samples: list[float] = []
    index = start_index
    deadline = time.perf_counter() + seconds if seconds is not None else None
    while True:
        batch = batches[index % len(batches)]
        if device_timing is not None:
            runner.infer(batch, check_inputs=False)
            parts = runner.last_inference_timings()
            if parts is None:
                raise MMExportError(f"{runner.name}: this runner does not time on the device; drop --device-timing")
            milliseconds = parts["compute"] if device_timing == "compute" else sum(parts.values())
            samples.append(milliseconds / 1e3)
        else:
            begin = time.perf_counter()
            runner.infer(batch, check_inputs=False)
            samples.append(time.perf_counter() - begin)
        if device is not None:
            device.add(runner)
        index += 1
        if count is not None and len(samples) >= count:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            break
    return samples, index


def _device_summary(device: _DeviceSamples, batch_size: int, seconds: list[float], cuda_graphs: bool) -> dict | None:
    """trtexec's statistics when every timed call reported device timings (GPU runners), else None."""
    n = len(seconds)
    if not n or len(device.compute) < n:
        return None

    enqueue = device.enqueue[:n] if all(v == v for v in device.enqueue[:n]) else device.compute[:n]
    summary = trtexec_summary(device.h2d[:n], device.compute[:n], device.d2h[:n], enqueue, batch_size=batch_size,
                              cuda_graphs=cuda_graphs, data_transfers_included=True, walltime_s=sum(seconds))
    return summary.as_dict()


def benchmark(
    models: list[ModelUnderTest], settings: BenchSettings, on_progress: Callable[[str], None] | None = None
) -> list[BenchResult]:
    """Measure every model at every batch size, models interleaved round by round."""
    settings.validate()
    notify = on_progress or (lambda message: None)
    rng = np.random.default_rng(settings.seed)
    results: list[BenchResult] = []
    for batch_size in settings.batch_sizes:
        runners, load_times, peaks, gpu_peaks, batches = {}, {}, {}, {}, {}
        try:
            for model in models:
                notify(f"loading {model.name} ({model.engine} {model.precision}) for batch {batch_size}")
                _reset_peak_rss()
                _gpu_peak(reset=True)
                rss_before = _current_rss_bytes()
                begin = time.perf_counter()
                runner = model.make_runner()
                runner.__enter__()
                runners[model.name] = runner
                load_times[model.name] = time.perf_counter() - begin
                shape = (batch_size, 3, model.image_size, model.image_size)
                batches[model.name] = [rng.standard_normal(shape, dtype=np.float32) for _ in range(settings.distinct_batches)]
                _timed_calls(runner, batches[model.name], 0, settings.warmup_s, 1 if settings.warmup_s == 0 else None)
                peak = _peak_rss_bytes()
                # memory this model added at its peak (load + warm-up), not the whole process's
                peaks[model.name] = peak - rss_before if peak is not None and rss_before is not None else peak
                gpu_peaks[model.name] = _gpu_peak()
            samples = {m.name: [] for m in models}
            device = {m.name: _DeviceSamples() for m in models}
            cursor = {m.name: 0 for m in models}
            per_round_s = settings.duration_s / settings.rounds if settings.duration_s is not None else None
            per_round_n = None
            if settings.iterations is not None:
                per_round_n = max(1, -(-settings.iterations // settings.rounds))
            for round_index in range(settings.rounds):
                notify(f"batch {batch_size}: round {round_index + 1}/{settings.rounds}")
                for model in models:
                    taken, cursor[model.name] = _timed_calls(
                        runners[model.name], batches[model.name], cursor[model.name], per_round_s, per_round_n,
                        settings.device_timing, device[model.name],
                    )
                    samples[model.name].extend(taken)
        finally:
            for runner in runners.values():
                runner.__exit__(None, None, None)
        for model in models:
            taken = samples[model.name]
            if settings.iterations is not None:
                taken = taken[: settings.iterations]
            stats = LatencyStats.from_samples(taken, batch_size)
            warnings = []
            if stats.cv > UNSTABLE_CV:
                warnings.append(
                    f"unstable: coefficient of variation {stats.cv:.1%} > {UNSTABLE_CV:.0%} "
                    "(busy machine, thermal or frequency scaling); trust medians and ratios, rerun for absolutes"
                )
            if stats.iterations < 10:
                warnings.append(f"only {stats.iterations} timed iterations: increase --duration or --iterations")
            graphs = bool(getattr(runners.get(model.name), "cuda_graphs", False))
            results.append(BenchResult(
                model=model.name, engine=model.engine, precision=model.precision, batch_size=batch_size, latency=stats,
                load_s=load_times[model.name], artifact_bytes=model.artifact_bytes, peak_rss_bytes=peaks[model.name],
                gpu_peak_bytes=gpu_peaks[model.name], warnings=warnings, verified=model.verified, note=model.note,
                device=_device_summary(device[model.name], batch_size, taken, graphs),
            ))
    return results


def ratio_table(results: list[BenchResult], numerator: str = "folded") -> list[dict]:
    """Median-latency ratios numerator ÷ every other model, per (engine, precision, batch)."""
    rows = []
    keyed = {(r.engine, r.precision, r.batch_size, r.model): r for r in results}
    for (engine, precision, batch, model), result in keyed.items():
        if model != numerator:
            continue
        for (e2, p2, b2, other), other_result in keyed.items():
            if (e2, p2, b2) == (engine, precision, batch) and other != numerator:
                rows.append({
                    "engine": engine, "precision": precision, "batch_size": batch, "ratio": f"{numerator} ÷ {other}",
                    "median_ratio": result.latency.median_ms / other_result.latency.median_ms,
                    "mean_ratio": result.latency.mean_ms / other_result.latency.mean_ms,
                })
    return rows


def machine_info() -> dict:
    """What the numbers were measured on."""
    import platform

    info = {**environment_info(), "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
