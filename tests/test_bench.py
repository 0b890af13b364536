import json

import numpy as np
import pytest

from mmexport.bench import BenchSettings, LatencyStats, ModelUnderTest, benchmark, ratio_table
from mmexport.benchrun import BenchRequest, bench_run
from mmexport.errors import MissingDependencyError, MMExportError


class SleepRunner:
    """A runner whose latency is known: it sleeps ``seconds`` per call and counts the batches it saw."""

    def __init__(self, name, seconds):
        self.name, self.seconds, self.seen = name, seconds, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def infer(self, batch):
        import time

        self.seen.append(batch)
        time.sleep(self.seconds)
        return np.zeros((len(batch), 2), dtype=np.float32)


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
        (BenchSettings(batch_sizes=(0,)), "batch sizes"),
        (BenchSettings(duration_s=1.0, iterations=5), "exactly one"),
        (BenchSettings(duration_s=None, iterations=None), "exactly one"),
        (BenchSettings(duration_s=-1.0), "positive"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(MMExportError, match=message):
        settings.validate()


def test_trt_engine_is_one_clear_error():
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        BenchRequest(engine="trt").validate()
    with pytest.raises(MMExportError, match="unknown model"):
        BenchRequest(models=("folded", "triple")).validate()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, resnet18_sources):
    from tests.test_train import config
    from mmexport.train import train

    return train(config(resnet18_sources, tmp_path_factory.mktemp("bench") / "run", finetune_epochs=0))


def test_torch_bench_on_a_run_folded_costs_one_backbone(tiny_run):
    settings = BenchSettings(batch_sizes=(2,), warmup_s=0.0, duration_s=None, iterations=6, rounds=2)
    report = bench_run(tiny_run, BenchRequest(engine="torch", device="cpu", settings=settings))
    models = {r.model for r in report["results"]}
    assert models == {"folded", "unmerged", "dual", "single"}
    ratios = {r["ratio"]: r["median_ratio"] for r in report["ratios"]}
    # two backbones cost clearly more than one, even on a noisy machine
    assert ratios["folded ÷ dual"] < 0.9
    assert ratios["folded ÷ unmerged"] < 1.0
    assert report["machine"]["packages"]["torch"]


def test_onnx_bench_exports_and_records_comparison_models(tiny_run):
    pytest.importorskip("onnxruntime", reason="ONNX engine needs onnxruntime")
    settings = BenchSettings(batch_sizes=(1,), warmup_s=0.0, duration_s=None, iterations=4, rounds=2)
    report = bench_run(tiny_run, BenchRequest(engine="onnx", models=("folded", "dual"), settings=settings))
    assert {r.model for r in report["results"]} == {"folded", "dual"}
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert "bench/dual.onnx" in manifest["outputs"]
    sizes = {r.model: r.artifact_bytes for r in report["results"]}
    assert 1.8 < sizes["dual"] / sizes["folded"] < 2.2


def test_gpu_only_options_are_refused_on_cpu():
    from mmexport.runners import TorchRunner
    import torch

    with pytest.raises(MMExportError, match="CUDA"):
        TorchRunner(torch.nn.Identity(), cuda_graphs=True)
    with pytest.raises(MMExportError, match="compute or total"):
        BenchSettings(device_timing="wall").validate()
    with pytest.raises(MMExportError, match="engine torch"):
        BenchRequest(engine="onnx", settings=BenchSettings(device_timing="compute")).validate()


def test_device_timing_falls_back_to_wall_clock_for_runners_without_it():
    settings = BenchSettings(batch_sizes=(1,), warmup_s=0.0, duration_s=None, iterations=3, rounds=1, device_timing="total")
    result = benchmark([ModelUnderTest("s", lambda: SleepRunner("s", 0.001), image_size=4)], settings)[0]
    assert result.latency.iterations == 3 and result.latency.min_ms >= 1.0
