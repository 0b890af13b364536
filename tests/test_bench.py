"""Benchmarking: the interleaved timing harness (mmexport.runtime.timing) and `mmexport bench` on a run (mmexport.bench)."""

import json

import numpy as np
import pytest

from mmexport.runtime.timing import BenchSettings, LatencyStats, ModelUnderTest, benchmark, ratio_table
from mmexport.bench import BenchRequest, bench_run
from tests.conftest import FunctionRunner
from mmexport.errors import MissingDependencyError, MMExportError


def SleepRunner(name, seconds):
    """A runner whose latency is known: it sleeps ``seconds`` per call and records the batches it saw."""

    def run(batch):
        import time

        time.sleep(seconds)
        return np.zeros((len(batch), 2), dtype=np.float32)

    return FunctionRunner(name, run)


def test_latency_statistics():
    stats = LatencyStats.from_samples([0.001, 0.002, 0.003, 0.004], batch_size=8)
    assert stats.min_ms == pytest.approx(1) and stats.max_ms == pytest.approx(4)
    assert stats.mean_ms == pytest.approx(2.5) and stats.median_ms == pytest.approx(2.5)
    assert stats.throughput_ips == pytest.approx(8 / 0.0025)
    assert stats.cv == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2.5)


def test_interleaved_benchmark_ranks_models_by_their_real_cost():
    runners = {}

    def make(name, seconds):
        def factory():
            runners[name] = SleepRunner(name, seconds)
            return runners[name]
        return factory

    models = [ModelUnderTest("folded", make("folded", 0.002), image_size=8),
              ModelUnderTest("dual", make("dual", 0.004), image_size=8)]
    settings = BenchSettings(batch_sizes=(2,), warmup_s=0.0, duration_s=None, iterations=12, rounds=3, distinct_batches=3)
    results = benchmark(models, settings)
    assert [r.latency.iterations for r in results] == [12, 12]
    ratio = ratio_table(results)[0]
    assert ratio["ratio"] == "folded ÷ dual" and 0.35 < ratio["median_ratio"] < 0.65
    # inputs rotate among distinct batches of the requested shape
    seen = runners["folded"].seen
    assert seen[0].shape == (2, 3, 8, 8) and not np.array_equal(seen[1], seen[2])


@pytest.mark.parametrize(
    "settings,message",
    [
        (BenchSettings(batch_sizes=(0,)), "batch size must be a positive integer"),
        (BenchSettings(duration_s=1.0, iterations=5), "exactly one"),
        (BenchSettings(duration_s=None, iterations=None), "exactly one"),
        (BenchSettings(duration_s=-1.0), "positive"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(MMExportError, match=message):
        settings.validate()


def test_trt_engine_is_one_clear_error():
    with pytest.raises(MissingDependencyError, match="TensorRT") as info:
        BenchRequest(engine="trt").validate()
    assert "pip install" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MMExportError, match="unknown model"):
        BenchRequest(models=("folded", "triple")).validate()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, resnet18_sources):
    from tests.torchside.test_train import config
    from mmexport.torchside.train import train

    return train(config(resnet18_sources, tmp_path_factory.mktemp("bench") / "run", finetune_epochs=0))


def test_torch_bench_on_a_run_folded_costs_one_backbone(tiny_run):
    settings = BenchSettings(batch_sizes=(2,), warmup_s=0.0, duration_s=None, iterations=6, rounds=2)
    report = bench_run(tiny_run, BenchRequest(engine="torch", device="cpu", settings=settings))
    models = {r.model for r in report.results}
    assert models == {"folded", "unmerged", "dual", "single"}
    ratios = {r["ratio"]: r["median_ratio"] for r in report.ratios}
    # two backbones cost clearly more than one, even on a noisy machine
    assert ratios["folded ÷ dual"] < 0.9
    assert ratios["folded ÷ unmerged"] < 1.0
    assert report.machine["packages"]["torch"]


def test_onnx_bench_exports_and_records_comparison_models(tiny_run):
    pytest.importorskip("onnxruntime", reason="ONNX engine needs onnxruntime")
    settings = BenchSettings(batch_sizes=(1,), warmup_s=0.0, duration_s=None, iterations=4, rounds=2)
    report = bench_run(tiny_run, BenchRequest(engine="onnx", models=("folded", "dual"), settings=settings))
    assert {r.model for r in report.results} == {"folded", "dual"}
    assert all(r.verified for r in report.results)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert "bench/dual.onnx" in manifest["outputs"]
    sizes = {r.model: r.artifact_bytes for r in report.results}
    assert 1.8 < sizes["dual"] / sizes["folded"] < 2.2


def test_gpu_only_options_are_refused_on_cpu():
    from mmexport.torchside.torch_runner import TorchRunner
    import torch

    with pytest.raises(MMExportError, match="CUDA"):
        TorchRunner(torch.nn.Identity(), cuda_graphs=True)
    with pytest.raises(MMExportError, match="compute or total"):
        BenchSettings(device_timing="wall").validate()
    with pytest.raises(MMExportError, match="engine torch"):
        BenchRequest(engine="onnx", settings=BenchSettings(device_timing="compute")).validate()


def test_device_timing_needs_a_runner_that_times_on_the_device():
    settings = BenchSettings(batch_sizes=(1,), warmup_s=0.0, duration_s=None, iterations=3, rounds=1, device_timing="total")
    with pytest.raises(MMExportError, match="does not time on the device"):
        benchmark([ModelUnderTest("s", lambda: SleepRunner("s", 0.001), image_size=4)], settings)


class _DeviceTimedRunner(FunctionRunner):
    """A stand-in for a GPU runner: reports fixed device-side timings and enqueue time for every call."""

    def infer_impl(self, feed):
        out = super().infer_impl(feed)
        self._last_timings = {"h2d": 0.1, "compute": 1.0 + 0.1 * (len(self.seen) % 2), "d2h": 0.05}
        self._last_enqueue_ms = 0.2
        return out


def test_gpu_runners_get_trtexec_statistics_and_one_line_per_warning():
    settings = BenchSettings(batch_sizes=(2,), warmup_s=0.0, duration_s=None, iterations=6, rounds=2)
    models = [ModelUnderTest("folded", lambda: _DeviceTimedRunner("f", lambda b: np.zeros((len(b), 2))), image_size=4,
                             engine="tensorrt"),
              ModelUnderTest("dual", lambda: SleepRunner("d", 0.0), image_size=4, verified=False)]
    results = benchmark(models, settings)
    device = {r.model: r.device for r in results}
    assert device["dual"] is None  # a CPU runner has no device timings
    gpu = device["folded"]
    assert gpu["queries"] == 6 and gpu["batch_size"] == 2 and gpu["data_transfers_included"] is True
    assert gpu["latency"]["min"] == pytest.approx(0.1 + 1.0 + 0.05) and gpu["enqueue"]["median"] == pytest.approx(0.2)
    assert gpu["unstable"] is True  # compute alternates 1.0 / 1.1 ms: CV ≈ 4.8 % > trtexec's 2.5 %
    from mmexport.bench import BenchReport

    report = BenchReport("run", "trt", "fp32", {}, {}, results, ratio_table(results))
    lines = report.warnings()
    assert sum(line.startswith("GPU: ") for line in lines) == 1 and any("unverified" in line and "dual" in line for line in lines)


# -- what a noisy measurement should do (pure logic of runtime.timing) ---------------------------------


def test_rounds_that_agree_settle_the_headline():
    from mmexport.runtime.timing import ratio_agreement

    agreement = ratio_agreement([0.49, 0.50, 0.51, 0.50, 0.49], duration_s=5.0)
    assert agreement.settled and agreement.advice is None and agreement.half_width < 0.05
    assert agreement.mean == pytest.approx(0.498)


def test_rounds_that_disagree_refuse_the_headline_and_say_how_many_rounds():
    from mmexport.runtime.timing import RATIO_HALF_WIDTH, ratio_agreement, t975

    rounds = [0.40, 0.55, 0.48, 0.62, 0.45]
    agreement = ratio_agreement(rounds, duration_s=5.0)
    spread = np.std(rounds, ddof=1) / np.mean(rounds)
    assert agreement.half_width == pytest.approx(t975(4) * spread / np.sqrt(5))
    assert not agreement.settled and agreement.half_width > RATIO_HALF_WIDTH
    needed = int(np.ceil((1.96 * spread / RATIO_HALF_WIDTH) ** 2))
    assert agreement.rounds_needed == needed
    # same time per round: 5 s over 5 rounds -> 1 s per round
    assert f"--rounds {needed} --duration {needed}" in agreement.advice
    more = ratio_agreement(rounds, iterations=50)
    assert f"--iterations {10 * needed}" in more.advice


def test_a_machine_too_noisy_for_the_ratio_is_told_so_and_one_round_shows_no_spread():
    from mmexport.runtime.timing import MAX_ADVISED_ROUNDS, ratio_agreement

    wild = ratio_agreement([0.2, 0.9, 0.4, 1.3], duration_s=4.0)
    assert wild.rounds_needed > MAX_ADVISED_ROUNDS and "idle machine" in wild.advice and "--rounds" not in wild.advice
    single = ratio_agreement([0.5])
    assert not single.settled and "--rounds 3" in single.advice


def test_iterations_for_a_pinned_median_grow_with_the_spread():
    from mmexport.runtime.timing import iterations_for_median

    assert iterations_for_median(0.0) == 1
    assert iterations_for_median(0.5) == int(np.ceil((1.96 * 1.2533 * 0.5 / 0.02) ** 2))
    assert iterations_for_median(0.34) < iterations_for_median(0.68)


def test_ratio_rows_carry_the_round_verdict():
    models = [ModelUnderTest("folded", lambda: SleepRunner("folded", 0.002), image_size=8),
              ModelUnderTest("dual", lambda: SleepRunner("dual", 0.004), image_size=8)]
    settings = BenchSettings(batch_sizes=(1,), warmup_s=0.0, duration_s=None, iterations=9, rounds=3, distinct_batches=2)
    results = benchmark(models, settings)
    assert all(len(r.round_medians_ms) == 3 for r in results)
    row = ratio_table(results, settings=settings)[0]
    assert len(row["round_ratios"]) == 3 and isinstance(row["settled"], bool)
    assert row["settled"] == (row["half_width"] <= 0.05) and (row["advice"] is None) == row["settled"]
