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
MEDIAN_TARGET = 0.02  # a median is "pinned" when its 95 % interval is within ±2 % (the advice of a noisy row)
RATIO_HALF_WIDTH = 0.05  # a headline ratio is settled when its rounds put it within ±5 % at 95 %
MAX_ADVISED_ROUNDS = 50  # beyond this the advice is "measure on a quieter machine", not "wait longer"

# Student's t, two-sided 95 % (0.975 quantile), for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The two-sided 95 % Student-t quantile for ``df`` degrees of freedom (normal approximation above 30)."""
    if df < 1:
        raise ValueError("at least 1 degree of freedom")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def iterations_for_median(cv: float, target: float = MEDIAN_TARGET) -> int:
    """Timed iterations for a median within ±``target`` (relative, 95 %) at coefficient of variation ``cv``.

    The median of n samples has a standard error of about 1.2533·σ/√n (normal samples), so
    n = (1.96 · 1.2533 · cv / target)². Heavier tails than normal need more: a floor, not a promise.
    """
    return max(1, math.ceil((1.96 * 1.2533 * max(cv, 0.0) / target) ** 2))


@dataclass
class RatioAgreement:
    """Whether the rounds of a side-by-side measurement agree on a latency ratio, and what to do if not.

    Each round times every model back to back, so each round gives one ratio; their spread
    is the ratio's own noise (drift of a busy machine hits both models of a round alike).
    ``half_width``: the 95 % confidence half-width of the mean round ratio, relative to it
    (Student's t over the rounds); ``settled`` when it is within :data:`RATIO_HALF_WIDTH`.
    """

    round_ratios: list[float]
    mean: float
    half_width: float  # relative; inf with one round
    settled: bool
    rounds_needed: int | None  # for RATIO_HALF_WIDTH at the observed spread; None when settled
    advice: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def ratio_agreement(round_ratios: list[float], *, duration_s: float | None = None, iterations: int | None = None,
                    target: float = RATIO_HALF_WIDTH) -> RatioAgreement:
    """Judge the per-round ``round_ratios`` of one headline ratio (pure; see :class:`RatioAgreement`).

    ``duration_s`` / ``iterations``: the run's settings, so the advice keeps each round as long
    as it was and says which ``--rounds`` and ``--duration`` (or ``--iterations``) to pass.
    """
    values = [float(r) for r in round_ratios if math.isfinite(r) and r > 0]
    rounds = len(values)
    if rounds == 0:
        return RatioAgreement([], float("nan"), math.inf, False, None, "no round measured this ratio")
    mean = statistics.fmean(values)
    if rounds == 1:
        return RatioAgreement(values, mean, math.inf, False, 3,
                              "one round cannot show how much the ratio moves: rerun with --rounds 3 or more")
    spread = statistics.stdev(values) / mean
    half_width = t975(rounds - 1) * spread / math.sqrt(rounds)
    if half_width <= target:
        return RatioAgreement(values, mean, half_width, True, None, None)
    needed = max(rounds + 1, math.ceil((1.96 * spread / target) ** 2))
    observed = f"its {rounds} rounds give {min(values):.3f}–{max(values):.3f} (±{half_width:.0%} at 95 %, limit ±{target:.0%})"
    if needed > MAX_ADVISED_ROUNDS:
        advice = (f"{observed}; pinning it would take ~{needed} rounds: the machine is too noisy for this ratio — "
                  "measure on an idle machine (or fewer --threads than cores)")
    else:
        longer = ""
        if duration_s is not None:
            longer = f" --duration {math.ceil(duration_s / rounds * needed)}"
        elif iterations is not None:
            longer = f" --iterations {math.ceil(iterations / rounds) * needed}"
        advice = f"{observed}; rerun with --rounds {needed}{longer} (same time per round) or on an idle machine"
    return RatioAgreement(values, mean, half_width, False, needed, advice)


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
    round_medians_ms: list[float] = field(default_factory=list)  # median latency of each interleaving round

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
            rounds_taken: dict[str, list[list[float]]] = {m.name: [] for m in models}
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
                    rounds_taken[model.name].append(taken)
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
                needed = iterations_for_median(stats.cv)
                seconds = math.ceil(needed * stats.mean_ms / 1e3)
                warnings.append(
                    f"unstable: coefficient of variation {stats.cv:.1%} > {UNSTABLE_CV:.0%} "
                    "(busy machine, thermal or frequency scaling); trust medians and ratios, rerun for absolutes"
                    f": a median within ±{MEDIAN_TARGET:.0%} needs ~{needed} iterations at this spread "
                    f"(--duration {seconds} at this rate; {stats.iterations} were timed)"
                )
            if stats.iterations < 10:
                warnings.append(f"only {stats.iterations} timed iterations: increase --duration or --iterations")
            graphs = bool(getattr(runners.get(model.name), "cuda_graphs", False))
            results.append(BenchResult(
                model=model.name, engine=model.engine, precision=model.precision, batch_size=batch_size, latency=stats,
                load_s=load_times[model.name], artifact_bytes=model.artifact_bytes, peak_rss_bytes=peaks[model.name],
                gpu_peak_bytes=gpu_peaks[model.name], warnings=warnings, verified=model.verified, note=model.note,
                device=_device_summary(device[model.name], batch_size, taken, graphs),
                round_medians_ms=[float(np.median(r)) * 1e3 for r in rounds_taken[model.name] if r],
            ))
    return results


def ratio_table(results: list[BenchResult], numerator: str = "folded", settings: BenchSettings | None = None) -> list[dict]:
    """Median-latency ratios numerator ÷ every other model, per (engine, precision, batch).

    Each row also says whether the interleaving rounds agree on it (:func:`ratio_agreement`
    over the per-round ratios of median latencies): ``settled``, ``half_width`` and, when the
    rounds disagree beyond :data:`RATIO_HALF_WIDTH`, the ``advice`` to rerun (a headline
    that is not settled is printed as its range, not as a number).
    """
    rows = []
    keyed = {(r.engine, r.precision, r.batch_size, r.model): r for r in results}
    for (engine, precision, batch, model), result in keyed.items():
        if model != numerator:
            continue
        for (e2, p2, b2, other), other_result in keyed.items():
            if (e2, p2, b2) == (engine, precision, batch) and other != numerator:
                per_round = [a / b for a, b in zip(result.round_medians_ms, other_result.round_medians_ms) if b > 0]
                agreement = ratio_agreement(per_round, duration_s=settings.duration_s if settings else None,
                                            iterations=settings.iterations if settings else None)
                rows.append({
                    "engine": engine, "precision": precision, "batch_size": batch, "ratio": f"{numerator} ÷ {other}",
                    "median_ratio": result.latency.median_ms / other_result.latency.median_ms,
                    "mean_ratio": result.latency.mean_ms / other_result.latency.mean_ms,
                    "round_ratios": agreement.round_ratios, "half_width": agreement.half_width,
                    "settled": agreement.settled, "rounds_needed": agreement.rounds_needed, "advice": agreement.advice,
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
