"""trtexec's performance summary, computed the way trtexec computes it (for ``bench --engine trt``).

Source: ``samples/common/sampleReporting.cpp`` of NVIDIA/TensorRT (``getPerformanceResult``,
``findPercentile``, ``findMedian``, ``findCoeffOfVariance``, ``printEpilog``; unchanged
in the 10.16 and 11.x tags except for the wording of the advice):

* per query, ``latency = H2D + GPU compute + D2H`` (``InferenceTime::latency``);
* min / max / mean / median, and percentile p = the element at index
  ``max(n - 1 - int((1 - p/100) * n), 0)`` of the ascending values (trtexec reports
  p90, p95 and p99);
* coefficient of variance = population standard deviation / mean * 100 %;
* throughput = batch * queries / total host walltime (trtexec counts a query of an
  explicit-batch engine as one; here ``images_per_s`` multiplies by the batch size
  and ``queries_per_s`` does not);
* warnings: GPU compute CV > 2.5 % (unstable), enqueue median > 0.8 x compute median
  (enqueue-bound), H2D or D2H median >= compute median (transfer-bound).

trtexec 11 runs with CUDA graphs and without data transfers by default (``--noCudaGraph``,
``--includeDataTransfers``); the summary records which applied to the measurement.
Pure Python: no numpy, no GPU.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Sequence

from mmexport.config import check_int
from mmexport.errors import MMExportError

PERCENTILES: tuple[float, ...] = (90.0, 95.0, 99.0)
UNSTABLE_CV_PERCENT = 2.5  # kUNSTABLE_PERF_REPORTING_THRESHOLD
ENQUEUE_BOUND_RATIO = 0.8  # kENQUEUE_BOUND_REPORTING_THRESHOLD


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """trtexec's ``findPercentile`` on ascending values (no interpolation)."""
    if not 0.0 <= p <= 100.0:
        raise MMExportError(f"percentile must be in [0, 100], got {p}")
    n = len(sorted_values)
    if n == 0:
        return math.inf
    # trtexec computes int32_t((1 - percentile / 100) * all) in float32; doing it in float64
    # would differ on exact boundaries (p90 of 10 values: 1.0000002f -> 1, but 0.99999999 -> 0).
    exclude = int(_f32(_f32(1 - _f32(_f32(p) / 100)) * _f32(n)))
    return float(sorted_values[max(n - 1 - exclude, 0)])


def _f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    if n == 0:
        return math.inf
    m = n // 2
    return float(sorted_values[m]) if n % 2 else (sorted_values[m - 1] + sorted_values[m]) / 2


@dataclass(frozen=True)
class Stat:
    """One metric over the timed queries, in milliseconds."""

    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    cv_percent: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        if not values:
            raise MMExportError("no timings to summarise")
        data = sorted(float(v) for v in values)
        if any(not math.isfinite(v) or v < 0 for v in data):
            raise MMExportError("timings must be finite, non-negative milliseconds")
        mean = sum(data) / len(data)
        if mean == 0:
            cv = 0.0 if all(v == 0 for v in data) else math.inf
        else:
            variance = sum((v - mean) ** 2 for v in data) / len(data)
            cv = math.sqrt(variance) / mean * 100
        p90, p95, p99 = (percentile(data, p) for p in PERCENTILES)
        return cls(data[0], mean, median(data), p90, p95, p99, data[-1], cv)

    def text(self) -> str:
        return (
            f"min = {self.min:.5g} ms, max = {self.max:.5g} ms, mean = {self.mean:.5g} ms, median = {self.median:.5g} ms, "
            f"percentile(90%) = {self.p90:.5g} ms, percentile(95%) = {self.p95:.5g} ms, percentile(99%) = {self.p99:.5g} ms"
        )


@dataclass(frozen=True)
class TrtexecSummary:
    batch_size: int
    queries: int
    latency: Stat  # H2D + GPU compute + D2H, per query
    enqueue: Stat
    h2d: Stat
    compute: Stat
    d2h: Stat
    walltime_s: float
    walltime_measured: bool  # False: walltime is the sum of latencies (queries back to back, no overlap)
    queries_per_s: float
    images_per_s: float
    total_gpu_compute_s: float
    cuda_graphs: bool
    data_transfers_included: bool
    unstable: bool  # GPU compute CV above 2.5 %
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["warnings"] = list(self.warnings)
        return data

    def lines(self) -> list[str]:
        """trtexec's "=== Performance summary ===" block, then its warnings."""
        out = [
            f"Throughput: {self.queries_per_s:.5g} qps ({self.images_per_s:.5g} images/s at batch {self.batch_size})",
            f"Latency: {self.latency.text()}",
            f"Enqueue Time: {self.enqueue.text()}",
            f"H2D Latency: {self.h2d.text()}",
            f"GPU Compute Time: {self.compute.text()}",
            f"D2H Latency: {self.d2h.text()}",
            f"Total Host Walltime: {self.walltime_s:.5g} s" + ("" if self.walltime_measured else " (sum of latencies)"),
            f"Total GPU Compute Time: {self.total_gpu_compute_s:.5g} s",
            f"CUDA graphs: {'on' if self.cuda_graphs else 'off'}; data transfers: "
            f"{'included' if self.data_transfers_included else 'excluded'}",
        ]
        return out + [f"* {w}" for w in self.warnings]


def trtexec_summary(
    h2d_ms: Sequence[float],
    compute_ms: Sequence[float],
    d2h_ms: Sequence[float],
    enqueue_ms: Sequence[float],
    *,
    batch_size: int,
    cuda_graphs: bool,
    data_transfers_included: bool = True,
    walltime_s: float | None = None,
) -> TrtexecSummary:
    """trtexec's statistics from per-query device timings (ms) and host enqueue times (ms).

    ``walltime_s``: the host time from the first enqueue to the last completion; when not
    given, the queries are taken to have run back to back and the walltime is the sum of
    their latencies (said so in ``walltime_measured``). With ``data_transfers_included``
    False the H2D/D2H columns are reported but the latency is GPU compute only, as
    trtexec reports it without ``--includeDataTransfers``.
    """
    n = len(compute_ms)
    if n == 0:
        raise MMExportError("no timed queries")
    if not (len(h2d_ms) == len(d2h_ms) == len(enqueue_ms) == n):
        raise MMExportError(
            "one H2D, compute, D2H and enqueue time per query is needed, "
            f"got {len(h2d_ms)}, {n}, {len(d2h_ms)}, {len(enqueue_ms)}"
        )
    check_int(batch_size, "batch size")
    if data_transfers_included:
        latencies = [a + b + c for a, b, c in zip(h2d_ms, compute_ms, d2h_ms)]
    else:
        latencies = [float(b) for b in compute_ms]
    latency, enqueue = Stat.of(latencies), Stat.of(enqueue_ms)
    h2d, compute, d2h = Stat.of(h2d_ms), Stat.of(compute_ms), Stat.of(d2h_ms)
    measured = walltime_s is not None
    if walltime_s is None:
        walltime_s = sum(latencies) / 1000
    if not (math.isfinite(walltime_s) and walltime_s > 0):
        raise MMExportError(f"walltime must be a positive number of seconds, got {walltime_s}")
    queries_per_s = n / walltime_s
    warnings: list[str] = []
    if enqueue.median > ENQUEUE_BOUND_RATIO * compute.median:
        warnings.append(
            "Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be under-utilized"
            + ("" if cuda_graphs else "; CUDA graphs may increase the throughput")
        )
    if data_transfers_included and h2d.median >= compute.median:
        warnings.append("Throughput may be bound by host-to-device transfers for the inputs rather than GPU Compute")
    if data_transfers_included and d2h.median >= compute.median:
        warnings.append("Throughput may be bound by device-to-host transfers for the outputs rather than GPU Compute")
    unstable = compute.cv_percent > UNSTABLE_CV_PERCENT
    if unstable:
        warnings.append(
            f"GPU compute time is unstable, with coefficient of variance = {compute.cv_percent:.3g}%; "
            "locking the GPU clock frequency may improve the stability"
        )
    return TrtexecSummary(
        batch_size=batch_size,
        queries=n,
        latency=latency,
        enqueue=enqueue,
        h2d=h2d,
        compute=compute,
        d2h=d2h,
        walltime_s=walltime_s,
        walltime_measured=measured,
        queries_per_s=queries_per_s,
        images_per_s=queries_per_s * batch_size,
        total_gpu_compute_s=compute.mean * n / 1000,
        cuda_graphs=cuda_graphs,
        data_transfers_included=data_transfers_included,
        unstable=unstable,
        warnings=tuple(warnings),
    )


__all__ = ["ENQUEUE_BOUND_RATIO", "PERCENTILES", "Stat", "TrtexecSummary", "UNSTABLE_CV_PERCENT", "median", "percentile",
           "trtexec_summary"]
