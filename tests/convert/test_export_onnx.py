"""ONNX export (fp32, unmerged, dual), precision transforms (fp16, int8 QDQ) and their verification."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import backbone_state
from mmexport.torchside.backbones import get_backbone
from mmexport.errors import ArchitectureError, DataError, MMExportError
from mmexport.torchside.merge import MergedModel
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.tolerances import FP32
from mmexport.runtime.compare import verify_runners

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

from mmexport.torchside.data import load_task  # noqa: E402
from mmexport.convert.onnxfile import onnx_model_info, read_onnx_metadata  # noqa: E402
from mmexport.convert.precision import convert_fp16, quantize_int8  # noqa: E402
from mmexport.torchside.onnx_export import DualBackbone, export_dual_onnx, export_onnx, export_unmerged_onnx  # noqa: E402
from mmexport.torchside.reference import verify_onnx_artifact  # noqa: E402
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from mmexport.torchside.torch_runner import TorchRunner  # noqa: E402

SIZE = 32
SHA = "5e" * 32
TASK = "synthetic:pigment?n_train=256&n_val=384"


def _one_line(exc: BaseException) -> str:
    assert "\n" not in str(exc), str(exc)
    return str(exc)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """resnet18 trained briefly at 32 px on a synthetic task (confident enough for int8 to be judged)."""
    from mmexport.torchside.train import train_plain

    torch.manual_seed(0)
    task = load_task(TASK, image_size=SIZE)
    model = get_backbone("resnet18").build(task.num_classes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same weights on every machine, and no thread spinning on a busy one (~4 s)
    try:
        result = train_plain(model, task, epochs=4, lr=2e-3, batch_size=32, seed=0, device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert result.best_metrics["accuracy"] > 0.9, result.history  # the int8 tests need a confident model
    model.eval()
    info = ModelInfo("resnet18", tuple(task.classes), SIZE, tuple(task.mean), tuple(task.std))
    root = tmp_path_factory.mktemp("export")
    path = root / "model.onnx"
    facts = export_onnx(model, info, path, weights_sha256=SHA, extra_metadata={"run": "test"})
    val = task.arrays("val")
    return {
        "model": model, "info": info, "path": path, "facts": facts, "root": root,
        "val": val, "confident_val": _confident(model, val), "train": task.arrays("train"),
    }


def _confident(model, arrays, min_margin: float = 0.2):
    """The images whose fp32 top-1 leads the runner-up by at least ``min_margin`` of the logit range.

    The int8 and fp16 policies (the 95 % Wilson lower bound of top-1 agreement >= 99 %) need at
    least 268 images that all agree, and pass or fail by one image near a decision boundary: ONNX Runtime's int8 kernels differ between CPUs, and one flip more
    failed a fresh clone elsewhere. Int8 moves these logits by at most ~4 % of their range
    (measured), so no image with a 20 % margin can flip on any CPU: the verdict is deterministic.
    """
    images, labels = arrays
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    ordered = np.sort(logits, axis=1)
    keep = (ordered[:, -1] - ordered[:, -2]) >= min_margin * (ordered[:, -1] - ordered[:, 0])
    assert keep.sum() >= 300, keep.sum()  # enough images for the bound to clear 99 % (268 perfect agreements)
    return images[keep], labels[keep]


@pytest.fixture(scope="module")
def fp16(trained):
    path = trained["root"] / "model.fp16.onnx"
    return path, convert_fp16(trained["path"], path)


@pytest.fixture(scope="module")
def int8(trained):
    path = trained["root"] / "model.int8.onnx"
    return path, quantize_int8(trained["path"], path, trained["train"][0])


# -- fp32 -------------------------------------------------------------------------------------


def test_fp32_export_facts_and_graph(trained):
    facts, path = trained["facts"], trained["path"]
    k = trained["info"].num_classes
    assert facts.exporter == "torch.onnx.export(dynamo=True)" and facts.opset == 18
    assert facts.inputs == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, SIZE, SIZE]}]
    assert facts.outputs == [{"name": "logits", "dtype": "float32", "shape": ["batch", k]}]
    assert facts.size_bytes == path.stat().st_size and facts.nodes > 0
    assert "BatchNormalization" not in facts.op_counts  # folded into Conv by the exporter
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert model.producer_name == "mmexport" and "resnet18" in model.doc_string
    assert not _leftovers(trained["root"])


def test_fp32_dynamic_batch_matches_torch(trained):
    rng = np.random.default_rng(3)
    with OnnxRuntimeRunner(trained["path"], threads=1) as runner:
        for batch in (1, 3, 8):
            images = rng.standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
            logits = runner.infer(images)["logits"]
            with torch.no_grad():
                expected = trained["model"](torch.from_numpy(images)).numpy()
            assert logits.shape == expected.shape == (batch, trained["info"].num_classes)
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_metadata_round_trips(trained):
    info, path = trained["info"], trained["path"]
    assert onnx_model_info(path) == replace(info, weights_sha256=SHA)
    metadata = read_onnx_metadata(path)
    assert metadata["precision"] == "fp32" and metadata["weights_sha256"] == SHA
    assert metadata["model_kind"] == "folded" and metadata["run"] == "test"
    assert json.loads(metadata["classes"]) == list(info.classes)
    preprocessing = json.loads(metadata["preprocessing"])
    assert preprocessing["format"] == "mmexport-preprocessing/1"
    assert preprocessing["mean"] == list(info.mean) and preprocessing["std"] == list(info.std)
    assert preprocessing["resize"] == "exact" and preprocessing["resize_size"] == [SIZE, SIZE]
    assert (preprocessing["layout"], preprocessing["dtype"], preprocessing["scale"]) == ("NCHW", "float32", 255.0)
    assert metadata["exporter"].startswith("torch.onnx") and metadata["mmexport_version"]


def test_fp32_verification_passes(trained):
    report = verify_onnx_artifact(trained["model"], trained["path"], trained["info"], "fp32",
                                  data_arrays=trained["confident_val"], samples=16, threads=1)
    assert report.passed, report.failures()
    assert [s.name for s in report.input_sets] == ["random", "data"]
    assert report.tolerance.name == "fp32"


def test_perturbed_initializer_fails_verification(trained, tmp_path):
    model = onnx.load(str(trained["path"]))
    weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0, :] += 0.05
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    report = verify_onnx_artifact(trained["model"], tampered, trained["info"], "fp32", samples=16, threads=1)
    assert not report.passed
    assert any("exceed the bound" in failure for failure in report.failures()), report.failures()


def test_export_refuses_what_it_cannot_describe(trained, tmp_path):
    info = trained["info"]
    with pytest.raises(ArchitectureError):
        export_onnx(get_backbone("resnet18").build(info.num_classes + 1), info, tmp_path / "x.onnx", weights_sha256=SHA)
    with pytest.raises(MMExportError) as error:
        export_onnx(trained["model"], info, tmp_path / "x.onnx", weights_sha256=SHA, extra_metadata={"precision": "int8"})
    assert "precision" in _one_line(error.value)
    with pytest.raises(MMExportError):
        export_onnx(trained["model"], info, tmp_path / "x.onnx", weights_sha256="")
    with pytest.raises(MMExportError):
        export_onnx(trained["model"], info, tmp_path / "x.onnx", weights_sha256=SHA, opset=9)
    with pytest.raises(MMExportError):  # the fp32 file verified as int8
        verify_onnx_artifact(trained["model"], trained["path"], info, "int8")
    assert not list(tmp_path.iterdir())


# -- atomicity --------------------------------------------------------------------------------


def test_failure_midway_leaves_previous_file_and_no_temp(trained, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous artifact")

    def broken_check(*args, **kwargs):
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the temporary file exists by now
        raise RuntimeError("exporter crashed midway")

    monkeypatch.setattr(onnx.checker, "check_model", broken_check)
    with pytest.raises(RuntimeError, match="midway"):
        export_onnx(trained["model"], trained["info"], target, weights_sha256=SHA)
    assert target.read_bytes() == b"previous artifact"
    assert _leftovers(tmp_path) == []

    monkeypatch.undo()
    fresh = tmp_path / "fresh.onnx"
    import mmexport.convert.onnxfile as onnxfile

    monkeypatch.setattr(onnxfile, "_smoke_run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        onnxfile.write_onnx_checked(onnx.load(str(trained["path"])), fresh, trained["info"])
    assert not fresh.exists() and _leftovers(tmp_path) == []


def test_exporter_error_is_one_line_and_writes_nothing(trained, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::frobnicate\nlong traceback text")

    monkeypatch.setattr(torch.onnx, "export", explode)
    with pytest.raises(MMExportError) as error:
        export_onnx(trained["model"], trained["info"], tmp_path / "m.onnx", weights_sha256=SHA)
    assert "frobnicate" in _one_line(error.value)
    assert list(tmp_path.iterdir()) == []


# -- comparison models ------------------------------------------------------------------------


def test_unmerged_export_keeps_the_blend_and_matches(tmp_path):
    merged = MergedModel("resnet18", [backbone_state("resnet18", 1), backbone_state("resnet18", 2)], 5)
    torch.manual_seed(4)
    with torch.no_grad():
        for logit in merged.logits.parameters():
            logit.normal_()
    merged.eval()
    info = ModelInfo("resnet18", tuple("abcde"), SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    path = tmp_path / "unmerged.onnx"
    facts = export_unmerged_onnx(merged, info, path, weights_sha256=SHA)
    assert facts.model_kind == "unmerged"
    assert facts.op_counts["Sigmoid"] == len(merged.merge_names)  # every blend is in the graph
    assert read_onnx_metadata(path)["num_sources"] == "2"
    from mmexport.runtime.compare import random_inputs

    images = random_inputs(8, SIZE, info.mean, info.std, seed=1)
    with TorchRunner(merged, "unmerged torch") as ref, OnnxRuntimeRunner(path, threads=1) as cand:
        report = verify_runners(ref, cand, {"random": (images, None)}, FP32, batch_size=4)
    assert report.passed, report.failures()
    with pytest.raises(MMExportError):
        export_onnx(merged, info, tmp_path / "x.onnx", weights_sha256=SHA)


def test_dual_backbone_export_matches(tmp_path):
    torch.manual_seed(5)
    first, second = (get_backbone("resnet18").build(3).eval() for _ in range(2))
    dual = DualBackbone(first, second).eval()
    info = ModelInfo("resnet18", ("x", "y", "z"), SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    path = tmp_path / "dual.onnx"
    facts = export_dual_onnx(dual, info, path, weights_sha256=f"{SHA}+{SHA}")
    assert facts.model_kind == "dual" and facts.op_counts["Conv"] == 40
    report = verify_onnx_artifact(dual, path, info, "fp32", samples=8, threads=1)
    assert report.passed, report.failures()
    with torch.no_grad():
        images = torch.randn(2, 3, SIZE, SIZE)
        assert torch.allclose(dual(images), (first(images) + second(images)) / 2)


# -- fp16 -------------------------------------------------------------------------------------


def test_fp16_passes_policy_with_float32_io(trained, fp16):
    path, facts = fp16
    assert facts.precision == "fp16"
    assert 0.4 < facts.size_bytes / trained["facts"].size_bytes < 0.6
    assert facts.inputs[0]["dtype"] == "float32" and facts.outputs[0]["dtype"] == "float32"
    model = onnx.load(str(path))
    conv_weight = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    assert conv_weight.data_type == onnx.TensorProto.FLOAT16
    metadata = read_onnx_metadata(path)
    assert metadata["precision"] == "fp16" and metadata["weights_sha256"] == SHA
    assert onnx_model_info(path) == replace(trained["info"], precision="fp16", weights_sha256=SHA)
    report = verify_onnx_artifact(trained["model"], path, trained["info"], "fp16", data_arrays=trained["confident_val"], samples=32, threads=1)
    assert report.passed, report.failures()
    with pytest.raises(MMExportError):  # fp16 -> fp16 is refused
        convert_fp16(path, trained["root"] / "twice.onnx")


# -- int8 -------------------------------------------------------------------------------------


def test_int8_graph_is_qdq_with_per_channel_weights(trained, int8):
    path, facts = int8
    ops = facts.op_counts
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    per_channel = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            weight = initializers[node.input[0]]
            if len(weight.dims) == 4:  # a conv kernel
                assert weight.data_type == onnx.TensorProto.INT8
                assert list(initializers[node.input[1]].dims) == [weight.dims[0]]  # one scale per output channel
                per_channel += 1
    assert per_channel == trained["facts"].op_counts["Conv"]
    assert facts.inputs[0]["dtype"] == "float32" and facts.outputs[0]["dtype"] == "float32"
    metadata = read_onnx_metadata(path)
    assert metadata["precision"] == "int8" and metadata["weights_sha256"] == SHA
    assert metadata["calibration_count"] == str(len(trained["train"][0]))
    assert metadata["calibration_method"] == "minmax" and len(metadata["calibration_sha256"]) == 64
    assert facts.calibration.sha256 == metadata["calibration_sha256"]
    assert facts.size_bytes < 0.3 * trained["facts"].size_bytes


def test_int8_passes_policy_on_labelled_data(trained, int8):
    path, _ = int8
    report = verify_onnx_artifact(trained["model"], path, trained["info"], "int8", data_arrays=trained["confident_val"],
                                  threads=1)
    assert report.passed, report.failures()
    assert [s.name for s in report.input_sets] == ["data"]
    stats = report.input_sets[0].outputs["logits"]
    assert stats.top1_agreement >= 0.99 and stats.candidate_macro_f1 is not None


def test_int8_without_labelled_data_fails(trained, int8):
    path, _ = int8
    report = verify_onnx_artifact(trained["model"], path, trained["info"], "int8", samples=16, threads=1)
    assert not report.passed
    assert any("labelled held-out" in failure for failure in report.failures())
    unlabelled = (trained["val"][0], None)
    report = verify_onnx_artifact(trained["model"], path, trained["info"], "int8", data_arrays=unlabelled, samples=16, threads=1)
    assert not report.passed


def test_int8_tensorrt_target_is_symmetric(trained):
    path = trained["root"] / "model.int8-trt.onnx"
    facts = quantize_int8(trained["path"], path, trained["train"][0], target="tensorrt", max_images=64)
    assert facts.calibration.count == 64
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points
    for zp in zero_points:
        assert zp.data_type == onnx.TensorProto.INT8  # TensorRT: int8 only, zero point 0
        assert not onnx.numpy_helper.to_array(zp).any()
    assert read_onnx_metadata(path)["int8_target"] == "tensorrt"
    report = verify_onnx_artifact(trained["model"], path, trained["info"], "int8", data_arrays=trained["confident_val"],
                                  threads=1)
    assert report.passed, report.failures()


@pytest.mark.parametrize(
    "shape, fragment",
    [((4, 3, SIZE // 2, SIZE // 2), "16 x 16"), ((4, 1, SIZE, SIZE), "1 channels"), ((0, 3, SIZE, SIZE), "at least 1"),
     ((3, SIZE, SIZE), "NCHW")],
)
def test_bad_calibration_data_is_a_data_error(trained, tmp_path, shape, fragment):
    target = tmp_path / "bad.int8.onnx"
    with pytest.raises(DataError) as error:
        quantize_int8(trained["path"], target, np.zeros(shape, np.float32))
    assert fragment in _one_line(error.value)
    assert list(tmp_path.iterdir()) == []


def test_nan_calibration_and_bad_options(trained, tmp_path):
    images = np.zeros((2, 3, SIZE, SIZE), np.float32)
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError):
        quantize_int8(trained["path"], tmp_path / "q.onnx", images)
    with pytest.raises(MMExportError):
        quantize_int8(trained["path"], tmp_path / "q.onnx", images[1:], method="kl")
    with pytest.raises(MMExportError):
        quantize_int8(trained["path"], tmp_path / "q.onnx", images[1:], target="openvino")
    assert list(tmp_path.iterdir()) == []


def test_quantizer_leaves_no_temp_files(trained, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "q.onnx"
    facts = quantize_int8(trained["path"], out, trained["train"][0][:8], method="percentile")
    assert out.is_file() and facts.calibration.count == 8 and facts.calibration.method == "percentile"
    assert list(scratch.iterdir()) == []
    assert _leftovers(tmp_path) == []


def test_convert_package_import_is_cheap():
    import subprocess

    code = "import sys, mmexport.convert, mmexport.convert.onnxfile, mmexport.convert.precision; assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the precision policy keeps refusing real faults -------------------------------------------


def _edited(path, out, edit):
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    edit(initializers)
    onnx.save(model, str(out))
    return out


def _scaled(initializers, name, factor=None, add=None, index=None):
    tensor = initializers[name]
    array = onnx.numpy_helper.to_array(tensor).copy()
    if factor is not None:
        array = (array.astype(np.float32) * factor).astype(array.dtype)
    if add is not None:
        array[index] = array[index] + np.asarray(add, dtype=array.dtype)
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))


def test_fp16_policy_refuses_an_overflowing_layer(trained, fp16, tmp_path):
    path, _ = fp16
    # the stem's kernels x 3000 in float16: activations leave float16's range (±65504) within a few layers
    broken = _edited(path, tmp_path / "overflow.onnx", lambda t: _scaled(t, "conv1.weight", factor=3000.0))
    report = verify_onnx_artifact(trained["model"], broken, trained["info"], "fp16", data_arrays=trained["val"],
                                  samples=16, threads=1)
    assert not report.passed
    assert any("NaN" in f or "Inf" in f or "exceed the bound" in f for f in report.failures()), report.failures()


def test_fp16_policy_refuses_a_wrong_constant(trained, fp16, tmp_path):
    path, _ = fp16
    with torch.no_grad():
        logits = trained["model"](torch.from_numpy(trained["val"][0])).numpy()
    spread = float(np.median(logits.max(1) - logits.min(1)))
    # one class's bias off by 5 % of the typical logit range: top-1 barely moves, the element bound catches it
    broken = _edited(path, tmp_path / "bias.onnx", lambda t: _scaled(t, "fc.bias", add=0.05 * spread, index=1))
    report = verify_onnx_artifact(trained["model"], broken, trained["info"], "fp16", data_arrays=trained["val"],
                                  samples=16, threads=1)
    assert not report.passed
    assert any("exceed the bound" in f for f in report.failures()), report.failures()
    good = verify_onnx_artifact(trained["model"], path, trained["info"], "fp16", data_arrays=trained["confident_val"], samples=16,
                                threads=1)
    assert good.passed, good.failures()  # the same check on the unedited file: the fault alone made the difference


def test_int8_accuracy_aware_search_keeps_the_most_sensitive_layers(trained, tmp_path):
    """Mechanics of the search, with a judge that passes only once 3 weight layers stay in float."""
    from types import SimpleNamespace

    from mmexport.convert.precision import quantizable_nodes

    def float_weight_layers(path):
        model = onnx.load(str(path))
        dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] not in dequantized]

    judged = []

    def judge(path):
        floats = float_weight_layers(path)
        judged.append(len(floats))
        passed = len(floats) >= 3
        stats = SimpleNamespace(top1_agreement=1.0 if passed else 0.9, macro_f1_drop=0.0)
        return SimpleNamespace(passed=passed, stats=lambda: {"data": stats})

    out = tmp_path / "aware.int8.onnx"
    facts = quantize_int8(trained["path"], out, trained["train"][0][:32], max_images=32, judge=judge)
    search = facts.int8_search
    ranked = [name for name, _ in sorted(search.sensitivity, key=lambda item: -item[1])]
    assert len(search.sensitivity) == len(quantizable_nodes(onnx.load(str(trained["path"]))))
    assert facts.float_nodes == ranked[:3] and search.passed
    assert sorted(float_weight_layers(out)) == sorted(ranked[:3])  # the written file is the chosen candidate
    assert judged == [0, 1, 2, 4, 3]  # all int8, then 1, 2, 4 most sensitive in float, then bisected to 3
    recipe = json.loads(read_onnx_metadata(out)["int8_recipe"])
    assert recipe["accuracy_aware"] and recipe["float_nodes"] == ranked[:3]
