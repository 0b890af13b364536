"""The engine file and its sidecar (mmexport.runtime.engine), with neither TensorRT nor a GPU.

Plan headers on crafted bytes; the sidecar and its example file; every compatibility
decision; engine-inspector JSON in the 10.x and 11.x layouts (tests/data/trt_inspector,
see its README for provenance) and the precision refusal; the environment probe through
a fake ``cuda.bindings.runtime`` (from tests/runtime/test_cuda_layer.py).
"""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest

from mmexport.errors import CheckpointError, MissingDependencyError, MMExportError
from mmexport.runtime import engine as eng
from mmexport.runtime.engine import (
    BatchProfile,
    EngineEnvironment,
    EngineSidecar,
    check_engine,
    compatibility_problems,
    compatibility_warnings,
    engine_filename,
    layer_precisions,
    precision_problems,
    read_plan_header,
    sidecar_path,
)
from tests.conftest import one_line
from tests.runtime.test_cuda_layer import FakeError, fake_runtime
from tests.tensorrt_fakes import (
    DATA,
    H100,
    INSPECTOR,
    fake_tensorrt,
    make_sidecar,
    plan_bytes,
    write_engine,
)


# ------------------------------------------------------------------------------------------------
# plan header
# ------------------------------------------------------------------------------------------------
def test_plan_tag_is_ftrt_little_endian():
    assert struct.pack("<I", eng.PLAN_TAG) == b"ftrt"


def test_read_plan_header_on_crafted_bytes():
    header = read_plan_header(plan_bytes((11, 4, 0, 106), archive=251))
    assert (header.layout, header.tensorrt_version, header.archive_version) == (0, (11, 4, 0, 106), 251)
    assert header.tensorrt_version_text == "11.4.0.106"
    assert read_plan_header(plan_bytes((10, 16, 1, 11))).tensorrt_version_text == "10.16.1.11"


def test_unknown_header_layout_gives_no_version():
    header = read_plan_header(plan_bytes(layout=3))
    assert header.layout == 3 and header.tensorrt_version is None and header.tensorrt_version_text is None


def test_read_plan_header_refuses_non_plans(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        read_plan_header(b"ftrt" + bytes(10))
    assert one_line(excinfo) == "not a TensorRT plan: 14 bytes, the header alone is 28"
    onnx_start = b"\x08\x09\x12\x07pytorch" + bytes(40)
    with pytest.raises(CheckpointError) as excinfo:
        read_plan_header(onnx_start)
    assert "a plan starts with b'ftrt'" in one_line(excinfo)
    path = tmp_path / "model.plan"
    path.write_bytes(onnx_start)
    with pytest.raises(CheckpointError) as excinfo:
        eng.read_plan_header_file(path)
    assert one_line(excinfo).startswith(f"{path}: not a TensorRT plan")


# ------------------------------------------------------------------------------------------------
# names and the sidecar
# ------------------------------------------------------------------------------------------------
def test_engine_and_sidecar_names():
    assert [engine_filename(p) for p in ("fp32", "fp16", "int8")] == ["model.plan", "model.fp16.plan", "model.int8.plan"]
    assert sidecar_path(Path("runs/x/model.fp16.plan")) == Path("runs/x/model.fp16.plan.json")
    assert sidecar_path("model.plan").name == "model.plan.json"
    with pytest.raises(MMExportError) as excinfo:
        engine_filename("fp8")
    assert one_line(excinfo) == "unknown precision 'fp8'; choose one of fp32, fp16, int8"


def test_sidecar_example_round_trips_exactly():
    text = (DATA / "engine" / "model.fp16.plan.json").read_text()
    sidecar = EngineSidecar.from_json(text, "example")
    assert sidecar.format == "mmexport-engine/1" and sidecar.precision == "fp16"
    assert sidecar.compute_capability == (9, 0) and sidecar.batch_profile == BatchProfile(1, 8, 32)
    assert sidecar.build_flags.strongly_typed and sidecar.layer_precisions.unexpected == ()
    assert sidecar.model_metadata["arch"] == "resnet18"
    assert sidecar.to_json() == text
    assert EngineSidecar.from_dict(sidecar.to_dict()) == sidecar


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("engine_sha256"), "example: engine sidecar is missing 'engine_sha256'"),
        (lambda d: d.update(format="mmexport-engine/0"),
         "example: engine sidecar format 'mmexport-engine/0' is not 'mmexport-engine/1'"),
        (lambda d: d.update(precision="fp8"), "example: engine sidecar: unknown precision 'fp8'; choose one of fp32, fp16, int8"),
        (lambda d: d.update(compute_capability=[9]),
         "example: engine sidecar field compute_capability must be [major, minor], got [9]"),
        (lambda d: d["build_flags"].update(hardware_compatibility="turing+"),
         "example: engine sidecar has unknown hardware compatibility 'turing+'"),
    ],
)
def test_bad_sidecars_are_refused_in_one_line(edit, expected):
    data = json.loads((DATA / "engine" / "model.fp16.plan.json").read_text())
    edit(data)
    with pytest.raises(CheckpointError) as excinfo:
        EngineSidecar.from_json(json.dumps(data), "example")
    assert one_line(excinfo) == expected


def test_sidecar_that_is_not_json():
    with pytest.raises(CheckpointError) as excinfo:
        EngineSidecar.from_json("{not json", "x.json")
    assert one_line(excinfo).startswith("x.json: engine sidecar: malformed JSON (")


# ------------------------------------------------------------------------------------------------
# compatibility decisions
# ------------------------------------------------------------------------------------------------
def test_same_machine_is_compatible():
    sidecar = make_sidecar()
    assert compatibility_problems(sidecar, H100, engine_sha256=sidecar.engine_sha256) == []
    assert compatibility_warnings(sidecar, H100) == []


def test_hash_mismatch_is_a_problem():
    problems = compatibility_problems(make_sidecar(), H100, engine_sha256="0" * 64)
    assert problems == ["the engine's sha256 000000000000 is not the 9a8b7c6d5e4f recorded at build time "
                        "(the file was changed after it was built)"]


@pytest.mark.parametrize("running", ["10.16.1.12", "10.16.0.72", "11.4.0.106", "10.15.1.29"])
def test_any_tensorrt_difference_refuses_a_plain_engine(running):
    env = EngineEnvironment(running, 13000, 13000, H100.gpu_name, (9, 0))
    assert compatibility_problems(make_sidecar(), env) == [f"it was built with TensorRT 10.16.1.11, this is TensorRT {running}"]


@pytest.mark.parametrize(
    "built, running, ok",
    [
        ("10.16.1.11", "10.16.1.11", True),
        ("10.13.0.35", "10.16.1.11", True),  # newer runtime, same major
        ("10.16.1.11", "11.4.0.106", True),  # 10 -> 11 is supported
        ("11.0.0.114", "11.4.0.106", True),
        ("11.4.0.106", "11.1.0.106", False),  # older runtime
        ("10.16.1.11", "10.12.0.36", False),
        ("11.4.0.106", "12.0.0.1", False),  # unknown major jump
    ],
)
def test_version_compatible_rule(built, running, ok):
    assert eng.version_compatible_allows(built, running) is ok
    sidecar = make_sidecar(tensorrt_version=built, build_flags={"version_compatible": True})
    env = EngineEnvironment(running, 13000, 13000, H100.gpu_name, (9, 0))
    problems = compatibility_problems(sidecar, env)
    assert (problems == []) is ok
    if not ok:
        assert problems[0].startswith(f"it was built version-compatible with TensorRT {built}, which TensorRT {running}")


def test_compute_capability_rules():
    l40s = EngineEnvironment("10.16.1.11", 13000, 13000, "NVIDIA L40S", (8, 9))
    t4 = EngineEnvironment("10.16.1.11", 13000, 13000, "Tesla T4", (7, 5))
    h200 = EngineEnvironment("10.16.1.11", 13000, 13000, "NVIDIA H200", (9, 0))
    plain = make_sidecar()
    assert compatibility_problems(plain, l40s) == [
        "it was built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU (NVIDIA L40S) has 8.9"
    ]
    # Same compute capability, another model: loads, with a warning only.
    assert compatibility_problems(plain, h200) == []
    assert compatibility_warnings(plain, h200) == [
        "the engine was tuned on NVIDIA H100 80GB HBM3 and runs on NVIDIA H200 (same compute capability 9.0); "
        "rebuild it here for the best kernels"
    ]
    same_cc = make_sidecar(build_flags={"hardware_compatibility": "same-compute-capability"})
    assert compatibility_problems(same_cc, h200) == [] and compatibility_problems(same_cc, l40s) != []
    ampere_plus = make_sidecar(build_flags={"hardware_compatibility": "ampere+"})
    assert compatibility_problems(ampere_plus, l40s) == []
    assert compatibility_problems(ampere_plus, t4) == [
        "it was built for Ampere and newer GPUs (ampere+) and this GPU (Tesla T4) has compute capability 7.5"
    ]


def test_problems_accumulate_and_cuda_major_only_warns():
    env = EngineEnvironment("11.4.0.106", 12080, 12080, "Tesla T4", (7, 5))
    sidecar = make_sidecar()
    assert len(compatibility_problems(sidecar, env, engine_sha256="f" * 64)) == 3
    assert compatibility_warnings(sidecar, env) == ["the engine was built with CUDA 13.0, this process uses CUDA 12.8"]
    assert compatibility_problems(sidecar, EngineEnvironment(None, None, None, H100.gpu_name, (9, 0))) == []



def test_check_engine_accepts_a_matching_engine(tmp_path):
    path = write_engine(tmp_path)
    sidecar = check_engine(path, environment=H100)
    assert sidecar.precision == "fp16" and sidecar == EngineSidecar.read(sidecar_path(path))
    assert check_engine(path, environment=H100, data=path.read_bytes()) == sidecar


def test_check_engine_refuses_a_tampered_engine(tmp_path):
    path = write_engine(tmp_path)
    path.write_bytes(path.read_bytes() + b"!")
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=H100)
    message = one_line(excinfo)
    assert message.startswith(f"{path}: cannot be loaded here: the engine's sha256 ")
    assert message.endswith(f"rebuild it: mmexport fold {tmp_path} --to trt --precision fp16")


def test_check_engine_refuses_a_wrong_gpu_and_tensorrt(tmp_path):
    path = write_engine(tmp_path)
    env = EngineEnvironment("11.4.0.106", 13000, 13000, "NVIDIA L4", (8, 9))
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=env)
    assert one_line(excinfo) == (
        f"{path}: cannot be loaded here: it was built with TensorRT 10.16.1.11, this is TensorRT 11.4.0.106; "
        "it was built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU (NVIDIA L4) has 8.9; "
        f"rebuild it: mmexport fold {tmp_path} --to trt --precision fp16"
    )


def test_check_engine_refuses_a_sidecar_of_another_build(tmp_path):
    path = write_engine(tmp_path, data=plan_bytes((10, 15, 1, 29)))
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=H100)
    assert "its plan header says TensorRT 10.15.1.29, the sidecar says 10.16.1.11" in one_line(excinfo)


def test_check_engine_without_sidecar_or_engine(tmp_path):
    path = tmp_path / "model.int8.plan"
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=H100)
    assert one_line(excinfo) == f"{path}: engine not found"
    path.write_bytes(plan_bytes())
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=H100)
    assert one_line(excinfo) == (
        f"{path}: its sidecar model.int8.plan.json is missing, so nothing says where it can run; "
        f"rebuild it: mmexport fold {tmp_path} --to trt --precision int8"
    )


# ------------------------------------------------------------------------------------------------
# engine inspector JSON (10.x recorded, 11.x constructed from the documented schema) and precision
# ------------------------------------------------------------------------------------------------
def test_inspector_10x_layout_fp16_engine():
    summary = layer_precisions((INSPECTOR / "trt10_layout_resnet_fp16.json").read_text())
    assert (summary.layout, summary.detailed, summary.io_tensors) == ("10.x", True, ("input.1", "191"))
    assert summary.counts() == {"fp16": 36}
    assert summary.counts(compute_only=True) == {"fp16": 23}
    first = summary.layers[0]
    assert (first.layer_type, first.category, first.precision) == ("Reformat", "data-movement", "fp16")
    assert precision_problems(summary, "fp16") == []
    (problem,) = precision_problems(summary, "fp32")
    assert problem.startswith("23 of 23 compute layers do not run in fp32 (23 in fp16; e.g. Conv_0 + Relu_1 (fp16)")


def test_inspector_11x_layout_reads_split_datatype_fields():
    text = (INSPECTOR / "trt11_layout_resnet_fp16.json").read_text()
    summary = layer_precisions(text)
    assert summary.layout == "11.x" and summary.io_tensors == ("input.1", "191")
    assert summary.counts() == {"fp16": 36} and summary.counts(compute_only=True) == {"fp16": 23}
    assert precision_problems(summary, "fp16") == []
    # The split fields decide: the 11.x Format strings carry no data type at all.
    doc = json.loads(text)
    assert all(dtype_free(t["Format"]) for layer in doc["Layers"] for t in layer["Inputs"] + layer["Outputs"])
    assert [layer.precision for layer in summary.layers] == [
        layer.precision for layer in layer_precisions((INSPECTOR / "trt10_layout_resnet_fp16.json").read_text()).layers
    ]


def dtype_free(text: str) -> bool:
    return eng.dtype_from_text(text) is None


def test_inspector_fp32_and_int8_engines():
    fp32 = layer_precisions((INSPECTOR / "trt10_layout_resnet_fp32.json").read_text())
    assert fp32.counts(compute_only=True) == {"fp32": 23}
    assert precision_problems(fp32, "fp32") == []
    assert precision_problems(fp32, "fp16")[0].startswith("23 of 23 compute layers do not run in fp16 (23 in fp32")
    qat = layer_precisions((INSPECTOR / "trt10_layout_resnet_qat_int8.json").read_text())
    assert qat.counts(compute_only=True) == {"fp16": 1, "fp32": 1, "int8": 21}
    assert sum(layer.heavy for layer in qat.layers) == 21
    assert precision_problems(qat, "int8") == []
    (problem,) = precision_problems(fp32, "int8")
    assert "21 of 23 compute layers do not run in int8" in problem
    assert "convolution/matrix-multiply layers of an int8 engine must run in int8" in problem


def test_silent_fp32_fallback_in_an_fp16_engine_is_refused():
    """The known TRT 11 pitfall: fp16 asked for, some compute layers built in fp32."""
    doc = json.loads((INSPECTOR / "trt11_layout_resnet_fp16.json").read_text())
    for layer in doc["Layers"]:
        if layer["Name"] in ("Conv_3 + Relu_4", "Gemm_48"):
            for tensor in layer["Inputs"] + layer["Outputs"]:
                tensor["Datatype"] = "Float"
    summary = layer_precisions(json.dumps(doc))
    (problem,) = precision_problems(summary, "fp16")
    assert problem.startswith(
        "2 of 23 compute layers do not run in fp16 (2 in fp32; e.g. Conv_3 + Relu_4 (fp32), Gemm_48 (fp32))"
    )
    assert summary.to_sidecar("fp16").unexpected == (
        "Conv_3 + Relu_4 (CaskConvolution): fp32", "Gemm_48 (CaskConvolution): fp32"
    )


def test_reformats_casts_and_shape_layers_are_exempt():
    layers = [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to conv", "LayerType": "Reformat",
         "Inputs": [{"Name": "image", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "r0", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "cast_out", "LayerType": "Cast", "Inputs": [{"Name": "c1", "Format/Datatype": "Half"}],
         "Outputs": [{"Name": "logits", "Format/Datatype": "Float"}]},
        {"Name": "shape_math", "LayerType": "kgen", "Inputs": [{"Name": "s", "Format/Datatype": "Int64"}],
         "Outputs": [{"Name": "s2", "Format/Datatype": "Int64"}]},
        {"Name": "conv", "LayerType": "CaskConvolution", "Inputs": [{"Name": "r0", "Format/Datatype": "Half"}],
         "Outputs": [{"Name": "c1", "Format/Datatype": "Half"}]},
    ]
    summary = layer_precisions(json.dumps({"Layers": layers, "Bindings": ["image", "logits"]}))
    assert [(l.category, l.precision) for l in summary.layers] == [
        ("data-movement", "fp16"), ("data-movement", "fp16"), ("shape", "int64"), ("compute", "fp16")
    ]
    assert precision_problems(summary, "fp16") == []


def test_a_cast_fused_into_the_first_compute_layer_counts_as_its_compute_type():
    layer = {"Name": "fused_cast_conv", "LayerType": "kgen", "TacticName": "sm90_xmma_fprop_f16f16",
             "Inputs": [{"Name": "image", "Datatype": "Float", "Format": "Row major linear format"}],
             "Outputs": [{"Name": "x", "Datatype": "Half", "Format": "Channel major format"}]}
    summary = layer_precisions(json.dumps({"Layers": [layer], "I/O Tensors": [{"Name": "image", "IOMode": "Input"}]}))
    assert summary.layers[0].precision == "fp16" and summary.layers[0].heavy
    assert precision_problems(summary, "fp16") == []


def test_engines_without_detailed_verbosity_cannot_be_confirmed():
    names_only = json.dumps({"Layers": ["conv1 + relu", "fc"], "Bindings": ["image", "logits"]})
    summary = layer_precisions(names_only)
    assert not summary.detailed
    assert precision_problems(summary, "fp16") == [
        "the engine has no per-layer types (built without ProfilingVerbosity.DETAILED), so nothing confirms it runs in fp16"
    ]
    reformats_only = json.dumps([{"Name": "r", "LayerType": "Reformat", "Inputs": [{"Name": "a", "Format/Datatype": "Half"}]}])
    assert precision_problems(layer_precisions(reformats_only), "fp16") == [
        "the engine has no compute layer to confirm it runs in fp16"
    ]
    with pytest.raises(MMExportError) as excinfo:
        layer_precisions("{oops")
    assert one_line(excinfo).startswith("engine inspector output: malformed JSON (")


@pytest.mark.parametrize(
    "text, dtype",
    [
        ("Row major linear FP32", "fp32"), ("Channel major FP16 format where channel % 8 == 0", "fp16"),
        ("Thirty-two wide channel vectorized row major Int8 format", "int8"), ("Half", "fp16"), ("Float", "fp32"),
        ("Row major linear BFloat16 format", "bf16"), ("Row major linear UInt8 format", "uint8"), ("Int32", "int32"),
        ("Row major linear FP32 format (kLINEAR)", "fp32"), ("Row major linear format (kLINEAR)", None), (None, None),
    ],
)
def test_dtype_from_inspector_strings(text, dtype):
    assert eng.dtype_from_text(text) == dtype



# ------------------------------------------------------------------------------------------------
# the environment, through a fake cuda.bindings.runtime
# ------------------------------------------------------------------------------------------------
def test_current_environment_from_cuda_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.106"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_runtime())
    env = eng.current_environment()
    assert env == EngineEnvironment("11.4.0.106", 13050, 13050, "Fake GPU 80GB", (9, 0))
    assert eng.cuda_version_text(env.cuda_runtime_version) == "13.5"


def test_current_environment_without_a_driver_or_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    runtime = fake_runtime()
    runtime.cudaDriverGetVersion = lambda: (0, 0)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    with pytest.raises(MissingDependencyError) as excinfo:
        eng.current_environment()
    assert one_line(excinfo) == "no NVIDIA driver found (cudaDriverGetVersion returned 0); TensorRT needs a GPU"
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as excinfo:
        eng.current_environment()
    assert one_line(excinfo) == "TensorRT is not installed: pip install 'mmexport[gpu]'"


def test_current_environment_falls_back_to_torch(monkeypatch):
    """cuda-bindings that cannot use the driver (13.x on a CUDA 12 driver) -> torch's view of the GPU."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.16.1.11"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime",
                        fake_runtime(fail={"cudaGetDeviceCount": FakeError.cudaErrorInsufficientDriver}))
    props = types.SimpleNamespace(name="NVIDIA L4", major=8, minor=9)
    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: True, get_device_properties=lambda device: props),
        version=types.SimpleNamespace(cuda="12.8"), _C=types.SimpleNamespace(_cuda_getDriverVersion=lambda: 12080),
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert eng.current_environment() == EngineEnvironment("10.16.1.11", 12080, 12080, "NVIDIA L4", (8, 9))
    fake_torch.cuda.is_available = lambda: False
    with pytest.raises(MissingDependencyError) as excinfo:
        eng.current_environment()
    assert one_line(excinfo) == "no usable NVIDIA GPU: cudaGetDeviceCount failed with cudaErrorInsufficientDriver"

