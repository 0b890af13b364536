"""The ONNX Runtime runner: session lifetime, options, providers and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmexport.torchside.backbones import get_backbone
from mmexport.errors import CheckpointError, DataError, MissingDependencyError, MMExportError
from mmexport.runtime.modelinfo import ModelInfo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mmexport.torchside.onnx_export import export_onnx  # noqa: E402
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner, resolve_providers  # noqa: E402

SIZE = 32
CLASSES = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def model_and_file(tmp_path_factory):
    torch.manual_seed(0)
    model = get_backbone("resnet18").build(len(CLASSES)).eval()
    info = ModelInfo("resnet18", CLASSES, SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    path = tmp_path_factory.mktemp("runner") / "model.onnx"
    export_onnx(model, info, path, weights_sha256="ab" * 32)
    return model, path


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_runs_on_cpu_and_matches_torch(model_and_file):
    model, path = model_and_file
    images = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)
    with OnnxRuntimeRunner(path) as runner:
        assert runner.providers == ["CPUExecutionProvider"]
        meta = runner.input_metadata()
        assert list(meta) == ["image"] and meta["image"].shape == (None, 3, SIZE, SIZE)
        assert meta["image"].dtype == np.float32 and runner.output_names == ["logits"]
        assert runner.load_seconds > 0
        assert runner.metadata()["arch"] == "resnet18"
        logits = runner.infer(images)["logits"]
        assert runner.last_inference_time() > 0
    assert runner.session is None  # released on exit
    assert logits.dtype == np.float32 and logits.shape == (3, len(CLASSES))
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_options_reach_the_session(model_and_file):
    _, path = model_and_file
    # (ONNX Runtime itself turns parallel mode with one inter-op thread into sequential.)
    with OnnxRuntimeRunner(path, threads=1, inter_op_threads=2, graph_optimization_level="basic", sequential=False) as runner:
        options = runner.session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.inter_op_num_threads == 2
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    with OnnxRuntimeRunner(path, threads=2, graph_optimization_level="disable") as runner:
        options = runner.session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


@pytest.mark.parametrize(
    "kwargs", [{"graph_optimization_level": "max"}, {"threads": 0}, {"threads": 1.5}, {"inter_op_threads": -1}]
)
def test_bad_options_are_one_line_errors(model_and_file, kwargs):
    _, path = model_and_file
    with pytest.raises(MMExportError) as info:
        OnnxRuntimeRunner(path, **kwargs)
    _one_line(info.value)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt", "CUDAExecutionProvider"])
def test_unavailable_gpu_provider_names_the_extra(model_and_file, provider):
    _, path = model_and_file
    available = ort.get_available_providers()
    wanted = "TensorrtExecutionProvider" if provider == "tensorrt" else "CUDAExecutionProvider"
    if wanted in available:
        pytest.skip(f"{wanted} is available here")
    with pytest.raises(MissingDependencyError) as info:
        OnnxRuntimeRunner(path, providers=provider)
    message = _one_line(info.value)
    assert wanted in message and "pip install onnxruntime-gpu" in message and "uninstall" in message


def test_provider_shorthands():
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, available) == ["CPUExecutionProvider"]
    assert resolve_providers("cuda", available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("tensorrt", available) == available
    assert resolve_providers("tensorrt", ["TensorrtExecutionProvider", "CPUExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CPUExecutionProvider"
    ]
    with pytest.raises(MissingDependencyError):
        resolve_providers("NoSuchExecutionProvider", available)
    with pytest.raises(MMExportError):
        resolve_providers([], available)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    runner = OnnxRuntimeRunner(tmp_path / "absent.onnx")
    with pytest.raises(CheckpointError) as info:
        runner.__enter__()
    assert "no such ONNX file" in _one_line(info.value)


def test_corrupted_file_is_a_checkpoint_error(model_and_file, tmp_path):
    _, path = model_and_file
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:5000])  # a truncated download
    with pytest.raises(CheckpointError) as info:
        with OnnxRuntimeRunner(broken):
            pass
    assert "cannot load" in _one_line(info.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError) as info:
        with OnnxRuntimeRunner(garbage):
            pass
    _one_line(info.value)


def test_wrong_input_shape_and_use_outside_with(model_and_file):
    _, path = model_and_file
    runner = OnnxRuntimeRunner(path)
    with pytest.raises(MMExportError):
        runner.infer(np.zeros((1, 3, SIZE, SIZE), np.float32))
    with runner:
        with pytest.raises(DataError) as info:
            runner.infer(np.zeros((1, 3, SIZE + 1, SIZE), np.float32))
        _one_line(info.value)
        with pytest.raises(DataError):
            runner.infer(np.zeros((3, SIZE, SIZE), np.float32))


def test_float32_in_and_out_whatever_the_graph_type(tmp_path):
    """A graph with float16 I/O still takes float32 batches and returns float32 logits."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["logits"], axes=[2, 3], keepdims=0)],
        "half",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "half.onnx"
    onnx.save(model, str(path))
    images = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    with OnnxRuntimeRunner(path) as runner:
        assert runner.input_metadata()["image"].dtype == np.float16
        out = runner.infer(images)["logits"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, images.mean(axis=(2, 3)), atol=2e-3)


def test_missing_onnxruntime_is_a_one_line_error(model_and_file, monkeypatch):
    _, path = model_and_file
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(MissingDependencyError) as info:
        OnnxRuntimeRunner(path)
    assert "pip install" in _one_line(info.value)


def test_onnxruntime_is_imported_lazily():
    code = (
        "import sys, mmexport.runtime, mmexport.runtime.runners.onnxruntime, mmexport.convert; "
        "bad = [m for m in ('onnxruntime', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
def test_cuda_provider_when_present(model_and_file):
    _, path = model_and_file
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        if os.environ.get("MMEXPORT_REQUIRE_GPU") == "1":
            pytest.fail("MMEXPORT_REQUIRE_GPU=1 but onnxruntime has no CUDAExecutionProvider")
        pytest.skip("onnxruntime-gpu with CUDAExecutionProvider is not installed")
    model, _ = model_and_file
    images = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    with OnnxRuntimeRunner(path, providers="cuda") as runner:
        assert runner.providers[0] == "CUDAExecutionProvider"
        logits = runner.infer(images)["logits"]
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
