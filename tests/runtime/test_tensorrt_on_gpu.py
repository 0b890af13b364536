"""TensorRT end to end: build tiny engines, run them, compare with ONNX Runtime, refuse bad engines.

Needs the ``tensorrt`` package and an NVIDIA GPU (marker ``tensorrt``; tests/conftest.py
skips otherwise, and MMEXPORT_REQUIRE_GPU=1 turns the skip into a failure). The model
is a torchvision ResNet-18 with 5 classes at 64 px, exported with
``torch.onnx.export(dynamo=True)`` (input ``image``, dynamic batch) and converted to fp16
with fp32 I/O by onnxconverter-common, as the project's exporter does.

Set MMEXPORT_RECORD_INSPECTOR=DIR to keep the real engine-inspector JSON of the built
engines (to replace the constructed TensorRT 11 sample in tests/data/trt_inspector).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from mmexport.errors import CheckpointError, DataError
from mmexport.runtime.engine import (
    EngineSidecar,
    check_engine,
    current_environment,
    engine_filename,
    layer_precisions,
    read_plan_header_file,
    sidecar_path,
)

pytestmark = pytest.mark.tensorrt

IMAGE_SIZE = 64
CLASSES = 5
PROFILE = dict(min_batch=1, opt_batch=4, max_batch=8)


def export_tiny_onnx(directory: Path) -> tuple[Path, Path]:
    """model.onnx (fp32) and model.fp16.onnx (fp16, fp32 I/O) of a seeded ResNet-18."""
    import onnx
    import torch
    import torchvision
    from onnxconverter_common import float16

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=CLASSES).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    example = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), None, input_names=["image"], output_names=["logits"], opset_version=18, dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
        )
    fp32 = program.model_proto
    metadata = {"model_info_format": "test", "arch": "resnet18", "image_size": str(IMAGE_SIZE)}
    for key, value in metadata.items():
        fp32.metadata_props.add(key=key, value=value)
    fp32_path = directory / "model.onnx"
    onnx.save(fp32, str(fp32_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": expected for fp16
        fp16 = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    fp16_path = directory / "model.fp16.onnx"
    onnx.save(fp16, str(fp16_path))
    return fp32_path, fp16_path


def onnxruntime_logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images})[0]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mmexport.convert.tensorrt import BuildSettings, build_engine

    directory = tmp_path_factory.mktemp("trt")
    fp32_onnx, fp16_onnx = export_tiny_onnx(directory)
    results = {}
    for precision, onnx_path in (("fp32", fp32_onnx), ("fp16", fp16_onnx)):
        settings = BuildSettings.of(precision, image_size=IMAGE_SIZE, workspace_bytes=1 << 30, **PROFILE)
        results[precision] = build_engine(onnx_path, directory / engine_filename(precision), settings,
                                          timing_cache=directory / "timing")
    return directory, {"fp32": fp32_onnx, "fp16": fp16_onnx}, results


def test_environment_and_status():
    import tensorrt as trt

    from mmexport.convert.tensorrt import tensorrt_status

    env = current_environment()
    assert env.tensorrt_version == trt.__version__ and env.compute_capability >= (7, 0)
    ok, text = tensorrt_status()
    assert ok and text.startswith(f"TensorRT {trt.__version__} on ")


def test_plan_header_and_sidecar_of_real_engines(built):
    import tensorrt as trt

    directory, _, results = built
    for precision, result in results.items():
        header = read_plan_header_file(result.engine_path)
        # The plan header layout read from trtexec's --getPlanVersionOnly, confirmed on a real plan.
        assert header.layout == 0 and header.tensorrt_version_text == trt.__version__
        sidecar = EngineSidecar.read(sidecar_path(result.engine_path))
        assert sidecar == result.sidecar and sidecar.plan_tensorrt_version == trt.__version__
        assert check_engine(result.engine_path) == sidecar
        assert result.timing_cache_path is not None and result.timing_cache_path.is_file()
    assert results["fp16"].timing_cache_merged  # the second build merged the first one's cache


def test_inspector_layout_matches_the_major(built):
    """The real inspector JSON: the layout the parser expects for this major, and the precisions."""
    import tensorrt as trt

    from mmexport.runtime.runners.tensorrt import EngineFromPath

    directory, _, results = built
    major = int(trt.__version__.split(".")[0])
    record = os.environ.get("MMEXPORT_RECORD_INSPECTOR")
    for precision, result in results.items():
        loaded = EngineFromPath(result.engine_path)()
        info = loaded.engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        if record:
            Path(record).mkdir(parents=True, exist_ok=True)
            (Path(record) / f"trt{trt.__version__}_resnet18_{precision}.json").write_text(info)
        summary = layer_precisions(info)
        assert summary.layout == ("11.x" if major >= 11 else "10.x"), json.dumps(json.loads(info))[:2000]
        assert summary.detailed and "image" in summary.io_tensors
        assert set(summary.counts(compute_only=True)) == {precision}, summary.counts(compute_only=True)
        assert result.sidecar.layer_precisions.unexpected == ()


def test_fp32_engine_matches_onnxruntime(built):
    from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner

    directory, onnx_paths, results = built
    with TensorRTRunner(EngineFromPath(results["fp32"].engine_path)) as runner:
        for n in (1, 3, 8, 2):
            x = images(n, seed=n)
            got = runner.infer(x)["logits"]
            expected = onnxruntime_logits(onnx_paths["fp32"], x)
            assert got.shape == (n, CLASSES) and got.dtype == np.float32
            assert np.abs(got - expected).max() <= 1e-4 + 1e-4 * np.abs(expected).max()
            timings = runner.last_inference_timings()
            assert set(timings) == {"h2d", "compute", "d2h"} and all(t >= 0 for t in timings.values())


def test_fp16_engine_agrees_with_onnxruntime(built):
    from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner

    directory, onnx_paths, results = built
    x = images(8, seed=3)
    with TensorRTRunner(EngineFromPath(results["fp16"].engine_path)) as runner:
        got = runner.infer(x)["logits"]
    expected = onnxruntime_logits(onnx_paths["fp32"], x)
    assert np.abs(got - expected).max() <= 2e-2 * max(1.0, np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.75


def test_cuda_graphs_replay_the_same_results(built):
    from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner

    directory, _, results = built
    path = results["fp32"].engine_path
    with TensorRTRunner(EngineFromPath(path)) as eager, TensorRTRunner(EngineFromPath(path), cuda_graphs=True) as graphed:
        for n in (4, 4, 2):
            x = images(n, seed=10 + n)
            np.testing.assert_allclose(graphed.infer(x)["logits"], eager.infer(x)["logits"], rtol=1e-5, atol=1e-5)
        assert graphed.cuda_graphs_active


def test_batch_outside_the_profile_is_refused(built):
    from mmexport.runtime.runners.tensorrt import EngineFromPath, TensorRTRunner

    _, _, results = built
    with TensorRTRunner(EngineFromPath(results["fp32"].engine_path)) as runner:
        with pytest.raises(DataError) as excinfo:
            runner.infer(images(9))
    assert "batch 9 is outside the engine's profile 1..8" in str(excinfo.value)


def test_tampered_engine_is_refused_before_deserialisation(built, tmp_path):
    from mmexport.runtime.runners.tensorrt import EngineFromPath

    _, _, results = built
    engine = tmp_path / "model.plan"
    shutil.copy(results["fp32"].engine_path, engine)
    shutil.copy(sidecar_path(results["fp32"].engine_path), sidecar_path(engine))
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as excinfo:
        EngineFromPath(engine)()
    assert "the engine's sha256" in str(excinfo.value) and "--to trt --precision fp32" in str(excinfo.value)


def test_wrong_gpu_sidecar_is_refused(built, tmp_path):
    _, _, results = built
    engine = tmp_path / "model.fp16.plan"
    shutil.copy(results["fp16"].engine_path, engine)
    data = json.loads(sidecar_path(results["fp16"].engine_path).read_text())
    here = tuple(data["compute_capability"])
    data["compute_capability"] = [7, 5] if here != (7, 5) else [8, 6]
    data["gpu_name"] = "Some Other GPU"
    sidecar_path(engine).write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(engine)
    message = str(excinfo.value)
    assert f"it was built for compute capability {data['compute_capability'][0]}.{data['compute_capability'][1]}" in message
    assert "\n" not in message
