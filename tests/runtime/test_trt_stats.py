"""trtexec-style statistics (mmexport.runtime.trt_stats): percentiles, the latency summary and its warnings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmexport.errors import MMExportError
from mmexport.runtime.trt_stats import Stat, percentile, trtexec_summary
from tests.conftest import one_line


# ------------------------------------------------------------------------------------------------
# trtexec statistics
# ------------------------------------------------------------------------------------------------
def test_trtexec_percentiles_and_median():
    values = [float(v) for v in range(1, 11)]
    assert [percentile(values, p) for p in (90, 95, 99, 50, 0, 100)] == [9.0, 10.0, 10.0, 5.0, 1.0, 10.0]
    stat = Stat.of(list(reversed(values)))
    assert (stat.min, stat.max, stat.mean, stat.median, stat.p90, stat.p95, stat.p99) == (1, 10, 5.5, 5.5, 9, 10, 10)
    assert stat.cv_percent == pytest.approx(math.sqrt(8.25) / 5.5 * 100)
    assert percentile([], 90) == math.inf
    with pytest.raises(MMExportError):
        percentile(values, 101)


def test_trtexec_summary_latency_throughput_and_flags():
    n = 100
    h2d, compute, d2h = [0.5] * n, [2.0] * n, [0.25] * n
    enqueue = [0.1] * n
    summary = trtexec_summary(h2d, compute, d2h, enqueue, batch_size=8, cuda_graphs=True, walltime_s=0.5)
    assert summary.latency.mean == pytest.approx(2.75) and summary.latency.p99 == pytest.approx(2.75)
    assert summary.queries_per_s == pytest.approx(200.0) and summary.images_per_s == pytest.approx(1600.0)
    assert summary.total_gpu_compute_s == pytest.approx(0.2)
    assert summary.cuda_graphs and summary.data_transfers_included and summary.walltime_measured
    assert not summary.unstable and summary.warnings == ()
    assert summary.as_dict()["compute"]["median"] == 2.0
    assert summary.lines()[0] == "Throughput: 200 qps (1600 images/s at batch 8)"
    no_wall = trtexec_summary(h2d, compute, d2h, enqueue, batch_size=1, cuda_graphs=False)
    assert not no_wall.walltime_measured and no_wall.walltime_s == pytest.approx(0.275)
    compute_only = trtexec_summary(h2d, compute, d2h, enqueue, batch_size=1, cuda_graphs=True, data_transfers_included=False)
    assert compute_only.latency.mean == 2.0 and compute_only.h2d.mean == 0.5


def test_trtexec_summary_warnings():
    rng = np.random.default_rng(0)
    compute = list(2.0 + rng.uniform(-0.3, 0.3, 50))  # CV ~ 8.7 %: unstable
    summary = trtexec_summary([3.0] * 50, compute, [0.1] * 50, [1.9] * 50, batch_size=4, cuda_graphs=False)
    assert summary.unstable and summary.compute.cv_percent > 2.5
    text = " | ".join(summary.warnings)
    assert "bound by Enqueue Time" in text and "CUDA graphs may increase the throughput" in text
    assert "host-to-device transfers" in text and "device-to-host" not in text
    assert "GPU compute time is unstable, with coefficient of variance = " in text
    stable = trtexec_summary([0.1] * 50, [2.0] * 49 + [2.01], [0.1] * 50, [0.2] * 50, batch_size=1, cuda_graphs=True)
    assert not stable.unstable and stable.warnings == ()


@pytest.mark.parametrize("kwargs, message", [
    ({"h2d": [1.0]}, "one H2D, compute, D2H and enqueue time per query is needed, got 1, 2, 2, 2"),
    ({"batch_size": 0}, "batch size must be a positive integer, got 0"),
    ({"compute": []}, "no timed queries"),
    ({"compute": [1.0, float("nan")]}, "timings must be finite, non-negative milliseconds"),
    ({"walltime_s": 0.0}, "walltime must be a positive number of seconds, got 0.0"),
])
def test_trtexec_summary_input_checks(kwargs, message):
    args = {"h2d": [1.0, 1.0], "compute": [1.0, 1.0], "d2h": [1.0, 1.0], "enqueue": [1.0, 1.0]}
    options = {"batch_size": 1, "cuda_graphs": False}
    for key in list(kwargs):
        (args if key in args else options)[key] = kwargs[key]
    with pytest.raises(MMExportError) as excinfo:
        trtexec_summary(args["h2d"], args["compute"], args["d2h"], args["enqueue"], **options)
    assert one_line(excinfo) == message
