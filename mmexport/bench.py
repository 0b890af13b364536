"""Timing harness over runners: latency distribution, throughput, load time, memory.

Modelled on trtexec / onnxruntime_perf_test: warm-up by time, then a timed phase
by duration or iteration count, inputs rotating among several random batches (no
single-buffer cache effects), percentiles and the coefficient of variation with a
warning when it is high. Models are measured *side by side*: their timed phases are
interleaved in rounds, so drift of a shared, noisy machine hits every model alike
and the ratios between them stay trustworthy.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from mmexport.errors import MMExportError
from mmexport.runners.base import Runner

UNSTABLE_CV = 0.10  # trtexec warns when the coefficient of variation exceeds 10 %


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup_s: float = 1.0
    duration_s: float | None = 5.0
    iterations: int | None = None
    rounds: int = 5  # interleaving rounds per batch size
    distinct_batches: int = 4
    seed: int = 0
    # GPU: time on the device with CUDA events (runners with ``timed_infer``); "compute"
    # excludes the host<->device copies, "total" includes them. None: host wall clock.
    device_timing: str | None = None

    def validate(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise MMExportError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if (self.duration_s is None) == (self.iterations is None):
            raise MMExportError("give exactly one of --duration and --iterations")
        if self.duration_s is not None and self.duration_s <= 0:
            raise MMExportError("--duration must be positive")
        if self.iterations is not None and self.iterations < 1:
            raise MMExportError("--iterations must be at least 1")
        if self.device_timing not in (None, "compute", "total"):
            raise MMExportError(f"device timing must be compute or total, got {self.device_timing!r}")
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

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelUnderTest:
    """A named model and how to make its runner (a fresh one per batch size)."""

    name: str
    make_runner: Callable[[], Runner]
    artifact_bytes: int | None = None
    image_size: int = 224
    engine: str = "torch"
    precision: str = "fp32"


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


def _timed_calls(runner: Runner, batches: list[np.ndarray], start_index: int, seconds: float | None,
                 count: int | None, device_timing: str | None = None) -> tuple[list[float], int]:
    samples: list[float] = []
    index = start_index
    deadline = time.perf_counter() + seconds if seconds is not None else None
    timed = device_timing is not None and hasattr(runner, "timed_infer")
    while True:
        batch = batches[index % len(batches)]
        if timed:
            _, parts = runner.timed_infer(batch)
            milliseconds = parts["compute"] if device_timing == "compute" else sum(parts.values())
            samples.append(milliseconds / 1e3)
        else:
            begin = time.perf_counter()
            runner.infer(batch)
            samples.append(time.perf_counter() - begin)
        index += 1
        if count is not None and len(samples) >= count:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            break
    return samples, index


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
                        settings.device_timing,
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
            results.append(BenchResult(
                model=model.name, engine=model.engine, precision=model.precision, batch_size=batch_size, latency=stats,
                load_s=load_times[model.name], artifact_bytes=model.artifact_bytes, peak_rss_bytes=peaks[model.name],
                gpu_peak_bytes=gpu_peaks[model.name], warnings=warnings,
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

    from mmexport.manifest import environment_info

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
