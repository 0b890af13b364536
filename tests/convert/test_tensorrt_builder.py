"""TensorRT logic that needs neither TensorRT nor a GPU.

Plan headers on crafted bytes; the sidecar and its example file; every compatibility
decision; engine-inspector JSON in the 10.x and 11.x layouts (tests/data/trt_inspector,
see its README for provenance); the precision refusal; trtexec lines; the builder's
version dispatch, timing cache and whole build flow through a FAKE ``tensorrt`` module
(a stand-in exposing the few attributes the code uses, for major 10 and 11); the
runner on the simulated CUDA backend of tests/test_cuda_layer.py; trtexec statistics.
"""

from __future__ import annotations

import enum
import fcntl
import json
import math
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mmexport.errors import CheckpointError, DataError, MissingDependencyError, MMExportError, VerificationError
from mmexport.export import tensorrt as et
from mmexport.runtime import engine as eng
from mmexport.runtime.engine import (
    BatchProfile,
    BuildFlags,
    EngineEnvironment,
    EngineSidecar,
    PrecisionSummary,
    check_engine,
    compatibility_problems,
    compatibility_warnings,
    engine_filename,
    layer_precisions,
    precision_problems,
    read_plan_header,
    sidecar_path,
)
from mmexport.runtime.runners import tensorrt as rtrt
from mmexport.runtime.runners.base import TensorMetadata
from mmexport.runtime.trt_stats import Stat, percentile, trtexec_summary
from tests.conftest import one_line
from tests.test_cuda_layer import FakeError, SimCuda, fake_runtime

DATA = Path(__file__).parent / "data"
INSPECTOR = DATA / "trt_inspector"
H100 = EngineEnvironment("10.16.1.11", 13000, 13000, "NVIDIA H100 80GB HBM3", (9, 0))


def plan_bytes(version=(10, 16, 1, 11), layout=0, archive=239, payload=b"engine weights and kernels") -> bytes:
    return b"ftrt" + struct.pack("<II", layout, archive) + bytes(12) + bytes(version) + payload


def make_sidecar(**changes) -> EngineSidecar:
    base = EngineSidecar.from_json((DATA / "engine" / "model.fp16.plan.json").read_text())
    flags = changes.pop("build_flags", None)
    if flags:
        changes["build_flags"] = BuildFlags(**{**base.build_flags.__dict__, **flags})
    return EngineSidecar(**{**base.__dict__, **changes})


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
    assert one_line(excinfo) == "unknown precision 'fp8'; use one of fp32, fp16, int8"


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
        (lambda d: d.update(precision="fp8"), "example: engine sidecar has unknown precision 'fp8'"),
        (lambda d: d.update(compute_capability=[9]),
         "example: engine sidecar is malformed (not enough values to unpack (expected 2, got 1))"),
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
    assert one_line(excinfo).startswith("x.json: engine sidecar is not valid JSON (")


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


def _write_engine(tmp_path, data=None, **changes) -> Path:
    import hashlib

    data = plan_bytes() if data is None else data
    path = tmp_path / "model.fp16.plan"
    path.write_bytes(data)
    sidecar = make_sidecar(engine_sha256=hashlib.sha256(data).hexdigest(), **changes)
    sidecar_path(path).write_text(sidecar.to_json())
    return path


def test_check_engine_accepts_a_matching_engine(tmp_path):
    path = _write_engine(tmp_path)
    sidecar = check_engine(path, environment=H100)
    assert sidecar.precision == "fp16" and sidecar == EngineSidecar.read(sidecar_path(path))
    assert check_engine(path, environment=H100, data=path.read_bytes()) == sidecar


def test_check_engine_refuses_a_tampered_engine(tmp_path):
    path = _write_engine(tmp_path)
    path.write_bytes(path.read_bytes() + b"!")
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=H100)
    message = one_line(excinfo)
    assert message.startswith(f"{path}: cannot be loaded here: the engine's sha256 ")
    assert message.endswith(f"rebuild it: mmexport fold {tmp_path} --to trt --precision fp16")


def test_check_engine_refuses_a_wrong_gpu_and_tensorrt(tmp_path):
    path = _write_engine(tmp_path)
    env = EngineEnvironment("11.4.0.106", 13000, 13000, "NVIDIA L4", (8, 9))
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=env)
    assert one_line(excinfo) == (
        f"{path}: cannot be loaded here: it was built with TensorRT 10.16.1.11, this is TensorRT 11.4.0.106; "
        "it was built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU (NVIDIA L4) has 8.9; "
        f"rebuild it: mmexport fold {tmp_path} --to trt --precision fp16"
    )


def test_check_engine_refuses_a_sidecar_of_another_build(tmp_path):
    path = _write_engine(tmp_path, data=plan_bytes((10, 15, 1, 29)))
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
    assert one_line(excinfo).startswith("engine inspector output is not JSON (")


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
# trtexec lines
# ------------------------------------------------------------------------------------------------
def test_trtexec_line_for_tensorrt_10_fp32():
    cmd = et.trtexec_command("run/model.onnx", "run/model.plan", precision="fp32", min_batch=1, opt_batch=8, max_batch=32,
                             image_size=224, tensorrt_major=10, timing_cache="cache/t.cache", workspace_bytes=2 << 30)
    assert cmd == [
        "trtexec", "--onnx=run/model.onnx", "--saveEngine=run/model.plan",
        "--minShapes=image:1x3x224x224", "--optShapes=image:8x3x224x224", "--maxShapes=image:32x3x224x224",
        "--builderOptimizationLevel=3", "--profilingVerbosity=detailed", "--stronglyTyped", "--noTF32",
        "--memPoolSize=workspace:2G", "--timingCacheFile=cache/t.cache", "--skipInference",
    ]


def test_trtexec_line_for_tensorrt_11_fp16_with_compatibility():
    cmd = et.trtexec_command("m.fp16.onnx", "m.fp16.plan", precision="fp16", min_batch=2, opt_batch=4, max_batch=4,
                             image_size=64, tensorrt_major=11, optimization_level=5, workspace_bytes=1536 << 10,
                             hardware_compatibility="same-compute-capability", version_compatible=True)
    assert cmd == [
        "trtexec", "--onnx=m.fp16.onnx", "--saveEngine=m.fp16.plan",
        "--minShapes=image:2x3x64x64", "--optShapes=image:4x3x64x64", "--maxShapes=image:4x3x64x64",
        "--builderOptimizationLevel=5", "--profilingVerbosity=detailed", "--memPoolSize=workspace:1536K",
        "--hardwareCompatibilityLevel=sameComputeCapability", "--versionCompatible", "--skipInference",
    ]


@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trtexec_never_gets_precision_flags(major, precision):
    cmd = et.trtexec_command("m.onnx", "m.plan", precision=precision, min_batch=1, opt_batch=1, max_batch=1,
                             image_size=32, tensorrt_major=major, hardware_compatibility="ampere+")
    assert not {"--fp16", "--int8", "--best", "--bf16", "--fp8"} & set(cmd)
    assert ("--stronglyTyped" in cmd) is (major == 10)
    assert ("--noTF32" in cmd) is (precision == "fp32")
    assert "--hardwareCompatibilityLevel=ampere+" in cmd


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tensorrt_major": 9}, "trtexec lines are known for TensorRT 10 and 11, not 9"),
        ({"min_batch": 4, "opt_batch": 2}, "batch profile must satisfy 1 <= min <= opt <= max, got min=4 opt=2 max=8"),
        ({"min_batch": 0}, "batch profile must satisfy 1 <= min <= opt <= max, got min=0 opt=2 max=8"),
        ({"optimization_level": 6}, "builder optimization level must be 0..5, got 6"),
        ({"precision": "bf16"}, "unknown precision 'bf16'; use one of fp32, fp16, int8"),
        ({"hardware_compatibility": "turing"},
         "unknown hardware compatibility 'turing'; use one of none, ampere+, same-compute-capability"),
        ({"workspace_bytes": 0}, "workspace must be a positive number of bytes, got 0"),
    ],
)
def test_build_options_are_validated_in_one_line(kwargs, message):
    options = dict(precision="fp16", min_batch=1, opt_batch=2, max_batch=8, image_size=64, tensorrt_major=10)
    options.update(kwargs)
    with pytest.raises(MMExportError) as excinfo:
        et.trtexec_command("m.onnx", "m.plan", **options)
    assert one_line(excinfo) == message


# ------------------------------------------------------------------------------------------------
# the fake tensorrt module
# ------------------------------------------------------------------------------------------------
def fake_tensorrt(version: str = "10.16.1.11", **behaviour) -> types.ModuleType:
    """A stand-in ``tensorrt`` exposing what mmexport uses; major 10 keeps the deprecated members, 11 drops them."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.behaviour = {
        "parse_ok": True, "parser_errors": [], "build_ok": True, "plan": plan_bytes(tuple(int(p) for p in version.split("."))),
        "inspector": (INSPECTOR / "trt10_layout_resnet_fp16.json").read_text(), "deserialize_ok": True, "combine_ok": True,
        "input": ("image", (-1, 3, 64, 64)),
    }
    trt.behaviour.update(behaviour)
    trt.log = []
    if major == 10:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
        )
        flags = ["FP16", "BF16", "INT8", "TF32", "VERSION_COMPATIBLE", "OBEY_PRECISION_CONSTRAINTS"]
    else:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        flags = ["TF32", "VERSION_COMPATIBLE"]
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"])
    trt.HardwareCompatibilityLevel = enum.IntEnum(
        "HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"]
    )
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "DETAILED", "NONE"])
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", ["ONELINE", "JSON"])
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.DataType = enum.IntEnum("DataType", ["FLOAT", "HALF", "BF16"])
    trt.nptype = lambda t: {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}[t] if t != trt.DataType.BF16 else (
        _ for _ in ()).throw(TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype."))

    class ILogger:
        Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

        def __init__(self):
            pass

    trt.ILogger = ILogger
    b = trt.behaviour

    class Cache:
        def __init__(self, data: bytes):
            if data.startswith(b"corrupt"):
                raise RuntimeError("timing cache is corrupt")
            self.entries = set(filter(None, data.decode().split(",")))

        def combine(self, other, ignore_mismatch):
            trt.log.append(("combine", sorted(other.entries), ignore_mismatch))
            if b["combine_ok"]:
                self.entries |= other.entries
            return b["combine_ok"]

        def serialize(self):
            return ",".join(sorted(self.entries)).encode()

    class Config:
        def __init__(self):
            self.cache = None

        def set_flag(self, flag):
            trt.log.append(("set_flag", flag.name))

        def clear_flag(self, flag):
            trt.log.append(("clear_flag", flag.name))

        def set_memory_pool_limit(self, pool, size):
            trt.log.append(("pool", pool.name, size))

        def __setattr__(self, name, value):
            if name != "cache":
                trt.log.append(("config", name, getattr(value, "name", value)))
            object.__setattr__(self, name, value)

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            trt.log.append(("set_timing_cache", sorted(cache.entries), ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            trt.log.append(("profile", profile.shapes))
            return 0

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, tuple(low), tuple(opt), tuple(high))

    class Network:
        def __init__(self, flags):
            self.flags = flags
            name, shape = b["input"]
            self.inputs = [types.SimpleNamespace(name=name, shape=shape)]

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            trt.log.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if config.cache is not None:
                config.cache.entries.add(f"tactic-{len(trt.log)}")
            if not b["build_ok"]:
                self.logger.log(ILogger.Severity.ERROR, "[network.cpp::validate] Error Code 4: out of   memory")
                return None
            return memoryview(b["plan"])

    class ParserError:
        def __init__(self, node, name, op, desc):
            self._values = (node, name, op, desc)

        def node(self):
            return self._values[0]

        def node_name(self):
            return self._values[1]

        def node_operator(self):
            return self._values[2]

        def desc(self):
            return self._values[3]

    class OnnxParser:
        def __init__(self, network, logger):
            self.errors = [ParserError(*e) for e in b["parser_errors"]]

        def parse_from_file(self, path):
            trt.log.append(("parse", Path(path).name))
            return b["parse_ok"]

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    class Engine:
        def create_engine_inspector(self):
            return types.SimpleNamespace(get_engine_information=lambda fmt: (trt.log.append(("inspect", fmt.name)),
                                                                             b["inspector"])[1])

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            self.engine_host_code_allowed = False
            trt.runtimes.append(self)

        def deserialize_cuda_engine(self, data):
            trt.log.append(("deserialize", len(bytes(data))))
            if not b["deserialize_ok"]:
                self.logger.log(ILogger.Severity.ERROR, "The engine plan file is generated on an incompatible device, "
                                                        "expecting compute 8.9 got compute 9.0, please rebuild.")
                return None
            return b.get("engine") or Engine()

    trt.runtimes = []
    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def install_trt(monkeypatch):
    def install(version="10.16.1.11", **behaviour):
        trt = fake_tensorrt(version, **behaviour)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        env = EngineEnvironment(version, 13000, 13000, "NVIDIA H100 80GB HBM3", (9, 0))
        monkeypatch.setattr(et, "current_environment", lambda *a, **k: env)
        return trt, env

    return install


# ------------------------------------------------------------------------------------------------
# version dispatch through the fake module
# ------------------------------------------------------------------------------------------------
def test_network_flags_follow_the_enum_of_each_major():
    assert et.network_flags(fake_tensorrt("10.16.1.11"), 10) == 1 << 1  # STRONGLY_TYPED is 1 on 10.x
    assert et.network_flags(fake_tensorrt("11.4.0.106"), 11) == 0  # always strongly typed; the flag is ignored


@pytest.mark.parametrize("version", ["10.16.1.11", "11.4.0.106"])
@pytest.mark.parametrize("precision, expected", [
    ("fp32", [("clear_flag", "TF32")]),
    ("fp16", []),
    ("int8", []),
])
def test_builder_flags_per_major_and_precision(version, precision, expected):
    trt = fake_tensorrt(version)
    major = et.tensorrt_major(trt)
    settings = et.BuildSettings(precision, BatchProfile(1, 4, 8), 64, 1 << 28, 4, "ampere+", False).validate()
    config = trt.Builder(None).create_builder_config()
    et.configure_builder(trt, config, settings, major)
    assert trt.log == expected + [
        ("pool", "WORKSPACE", 1 << 28),
        ("config", "builder_optimization_level", 4),
        ("config", "hardware_compatibility_level", "AMPERE_PLUS"),
        ("config", "profiling_verbosity", "DETAILED"),
    ]
    assert et.builder_flag_plan(precision, major, version_compatible=True).set == ("VERSION_COMPATIBLE",)


@pytest.mark.parametrize("version, ok", [("10.12.0.36", True), ("10.16.1.11", True), ("11.0.0.114", True),
                                         ("10.11.0.33", False), ("8.6.1", False), ("12.0.0", False)])
def test_supported_tensorrt_versions(version, ok):
    trt = fake_tensorrt(version if version.count(".") == 3 else version + ".0")
    if ok:
        assert et.tensorrt_major(trt) == int(version.split(".")[0])
    else:
        with pytest.raises(MissingDependencyError) as excinfo:
            et.tensorrt_major(trt)
        assert one_line(excinfo).startswith(
            f"TensorRT {trt.__version__} is not supported; mmexport needs TensorRT >= 10.12 or 11.x"
        )


def test_parser_errors_name_their_nodes():
    trt = fake_tensorrt(parser_errors=[(3, "/layer1/conv1/Conv", "Conv", "unsupported  pads\nattribute"),
                                       (-1, "", "", "model has no graph")])
    parser = trt.OnnxParser(None, None)
    assert et.parser_errors(parser) == ["node 3 (/layer1/conv1/Conv, Conv): unsupported pads attribute",
                                        "model: model has no graph"]


# ------------------------------------------------------------------------------------------------
# timing cache: naming, locking, merging
# ------------------------------------------------------------------------------------------------
def test_timing_cache_is_named_by_tensorrt_version_and_gpu(tmp_path):
    assert et.timing_cache_filename("10.16.1.11", "NVIDIA H100 80GB HBM3", (9, 0)) == \
        "timing-trt10.16.1.11-nvidia-h100-80gb-hbm3-sm90.cache"
    names = {
        et.timing_cache_filename(v, g, cc)
        for v, g, cc in [("10.16.1.11", "NVIDIA H100 80GB HBM3", (9, 0)), ("11.4.0.106", "NVIDIA H100 80GB HBM3", (9, 0)),
                         ("10.16.1.11", "NVIDIA H200", (9, 0)), ("10.16.1.11", "NVIDIA L4", (8, 9))]
    }
    assert len(names) == 4  # an upgrade or another GPU never reuses a cache
    assert et.timing_cache_path(tmp_path, H100) == tmp_path / "timing-trt10.16.1.11-nvidia-h100-80gb-hbm3-sm90.cache"


def test_timing_cache_lock_is_exclusive(tmp_path):
    cache = tmp_path / "t.cache"
    with et.locked(cache):
        with open(str(cache) + ".lock", "a+b") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(str(cache) + ".lock", "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)


def test_timing_cache_load_merge_and_replace(tmp_path, caplog):
    trt = fake_tensorrt()
    path = tmp_path / "t.cache"
    config = trt.Builder(None).create_builder_config()
    et.load_timing_cache(config, path)  # no file: an empty cache, strict mismatch checking
    assert trt.log[-1] == ("set_timing_cache", [], False)
    config.cache.entries |= {"a", "b"}
    assert et.save_timing_cache(config, path) is False  # nothing to merge yet
    assert path.read_bytes() == b"a,b"
    other = trt.Builder(None).create_builder_config()
    et.load_timing_cache(other, path)
    assert trt.log[-1] == ("set_timing_cache", ["a", "b"], False)
    other.cache.entries = {"c"}  # another build, started from an older file
    assert et.save_timing_cache(other, path) is True
    assert trt.log[-1] == ("combine", ["a", "b"], False)
    assert path.read_bytes() == b"a,b,c"
    trt.behaviour["combine_ok"] = False
    other.cache.entries = {"z"}
    assert et.save_timing_cache(other, path) is False
    assert path.read_bytes() == b"z" and "could not merge the timing cache" in caplog.text
    path.write_bytes(b"corrupt!")
    third = trt.Builder(None).create_builder_config()
    et.load_timing_cache(third, path)  # unreadable file: start empty instead of failing the build
    assert trt.log[-1] == ("set_timing_cache", [], False)


# ------------------------------------------------------------------------------------------------
# the whole build through the fake module
# ------------------------------------------------------------------------------------------------
METADATA = {"model_info_format": "mmexport-model/1", "arch": "resnet18", "precision": "fp16"}


def _build(tmp_path, precision="fp16", **kwargs):
    onnx_path = tmp_path / f"model{'' if precision == 'fp32' else '.' + precision}.onnx"
    if not onnx_path.exists():
        onnx_path.write_bytes(b"onnx bytes")
    engine_path = tmp_path / engine_filename(precision)
    options = dict(precision=precision, min_batch=1, opt_batch=4, max_batch=8, image_size=64, model_metadata=METADATA)
    options.update(kwargs)
    return et.build_engine(onnx_path, engine_path, **options), engine_path


@pytest.mark.parametrize("version, inspector, layout, flags", [
    ("10.16.1.11", "trt10_layout_resnet_fp16.json", "10.x", 2),
    ("11.4.0.106", "trt11_layout_resnet_fp16.json", "11.x", 0),
])
def test_build_engine_writes_engine_and_sidecar(tmp_path, install_trt, version, inspector, layout, flags):
    trt, env = install_trt(version, inspector=(INSPECTOR / inspector).read_text())
    messages = []
    progress = types.SimpleNamespace(message=messages.append)
    result, engine_path = _build(tmp_path, progress=progress, timing_cache=tmp_path / "caches", workspace_bytes=1 << 30)
    assert ("create_network", flags) in trt.log
    assert not [entry for entry in trt.log if entry[0] == "set_flag"]  # no FP16/INT8 flag, ever
    assert ("profile", ("image", (1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))) in trt.log
    assert ("config", "profiling_verbosity", "DETAILED") in trt.log and ("inspect", "JSON") in trt.log
    assert engine_path.read_bytes() == trt.behaviour["plan"]
    sidecar = EngineSidecar.read(sidecar_path(engine_path))
    assert sidecar == result.sidecar
    assert (sidecar.tensorrt_version, sidecar.plan_tensorrt_version) == (version, version)
    assert sidecar.layer_precisions == PrecisionSummary(layout, {"fp16": 36}, {"fp16": 23}, ())
    assert sidecar.build_flags == BuildFlags(3, True, "none", False, 1 << 30, True)
    assert sidecar.model_metadata == METADATA and sidecar.batch_profile == BatchProfile(1, 4, 8)
    assert sidecar.onnx_sha256 == __import__("hashlib").sha256(b"onnx bytes").hexdigest()
    assert result.timing_cache_path == tmp_path / "caches" / et.timing_cache_filename(version, env.gpu_name, (9, 0))
    assert result.timing_cache_path.is_file() and result.tensorrt_major == int(version[:2])
    assert check_engine(engine_path, environment=env) == sidecar  # what was written loads here
    assert messages[0].startswith("parsing model.fp16.onnx") and messages[-1].startswith("wrote model.fp16.plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caches", "model.fp16.onnx", "model.fp16.plan",
                                                          "model.fp16.plan.json"]


def test_second_build_merges_the_timing_cache(tmp_path, install_trt):
    trt, _ = install_trt()
    first, _ = _build(tmp_path, timing_cache=tmp_path)
    entries = set(first.timing_cache_path.read_bytes().decode().split(","))
    second, _ = _build(tmp_path, timing_cache=tmp_path, precision="fp16")
    assert first.timing_cache_merged is False and second.timing_cache_merged is True
    merged = set(second.timing_cache_path.read_bytes().decode().split(","))
    assert entries < merged


def test_fp16_request_that_built_fp32_is_refused_and_nothing_written(tmp_path, install_trt):
    install_trt(inspector=(INSPECTOR / "trt10_layout_resnet_fp32.json").read_text())
    with pytest.raises(VerificationError) as excinfo:
        _build(tmp_path)
    message = one_line(excinfo)
    assert message.startswith("the fp16 engine built from model.fp16.onnx does not run in fp16: 23 of 23 compute layers")
    assert message.endswith("nothing was written")
    assert not (tmp_path / "model.fp16.plan").exists() and not (tmp_path / "model.fp16.plan.json").exists()


def test_version_compatible_build_allows_host_code_when_inspecting(tmp_path, install_trt):
    trt, _ = install_trt("10.16.1.11")
    result, _ = _build(tmp_path, version_compatible=True, hardware_compatibility="ampere+")
    assert ("set_flag", "VERSION_COMPATIBLE") in trt.log
    assert trt.runtimes[-1].engine_host_code_allowed
    flags = result.sidecar.build_flags
    assert flags.version_compatible and flags.hardware_compatibility == "ampere+"


def test_int8_engine_from_a_qdq_graph_passes(tmp_path, install_trt):
    install_trt(inspector=(INSPECTOR / "trt10_layout_resnet_qat_int8.json").read_text())
    result, path = _build(tmp_path, precision="int8")
    assert result.sidecar.layer_precisions.compute_counts == {"fp16": 1, "fp32": 1, "int8": 21}
    assert path.name == "model.int8.plan"


def test_parse_failures_list_every_node(tmp_path, install_trt):
    install_trt(parse_ok=False, parser_errors=[(7, "/fc/Gemm", "Gemm", "bad transB"), (9, "/Flatten", "Flatten", "axis")])
    with pytest.raises(CheckpointError) as excinfo:
        _build(tmp_path)
    assert one_line(excinfo) == (f"{tmp_path / 'model.fp16.onnx'}: TensorRT cannot parse it: "
                                 "node 7 (/fc/Gemm, Gemm): bad transB; node 9 (/Flatten, Flatten): axis")


def test_a_failed_build_is_one_clear_error(tmp_path, install_trt):
    install_trt(build_ok=False)
    with pytest.raises(MMExportError) as excinfo:
        _build(tmp_path)
    assert one_line(excinfo) == "TensorRT could not build the engine: [network.cpp::validate] Error Code 4: out of memory"
    assert not (tmp_path / "model.fp16.plan").exists()


@pytest.mark.parametrize("name, shape, expected", [
    ("input", (-1, 3, 64, 64), "the ONNX model has inputs ['input'], mmexport engines need one input named 'image'"),
    ("image", (1, 3, 64, 64), "input image has a fixed batch 1; export the ONNX with a dynamic batch"),
    ("image", (-1, 3, 32, 32), "input image has shape (-1, 3, 32, 32), expected (N, 3, 64, 64)"),
])
def test_the_onnx_input_must_be_a_dynamic_batch_of_images(tmp_path, install_trt, name, shape, expected):
    install_trt(input=(name, shape))
    with pytest.raises(CheckpointError) as excinfo:
        _build(tmp_path)
    assert one_line(excinfo) == expected


def test_missing_tensorrt_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as excinfo:
        _build(tmp_path)
    assert one_line(excinfo) == "TensorRT is not installed: pip install 'mmexport[gpu]'"


def test_tensorrt_status(monkeypatch, install_trt):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real_find_spec(name, *a))
    assert et.tensorrt_status() == (False, "TensorRT is not installed: pip install 'mmexport[gpu]'")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.8.0.43"))
    ok, text = et.tensorrt_status()
    assert not ok and text.startswith("TensorRT 10.8.0.43 is not supported")
    install_trt("11.4.0.106")
    assert et.tensorrt_status() == (True, "TensorRT 11.4.0.106 on NVIDIA H100 80GB HBM3 (compute capability 9.0)")


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


# ------------------------------------------------------------------------------------------------
# loader and runner on the simulated CUDA backend
# ------------------------------------------------------------------------------------------------
S, CLASSES = 8, 5
WEIGHTS = np.random.default_rng(0).standard_normal((3, CLASSES)).astype(np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3)) @ WEIGHTS


class FakeEngine:
    """image (N,3,S,S) float32 -> logits (N,CLASSES) float32 = mean over pixels @ WEIGHTS; profile 1..8."""

    num_io_tensors = 2
    num_optimization_profiles = 1
    device_memory_size_v2 = 4096

    def __init__(self, trt, sim):
        self.trt, self.sim = trt, sim
        self.contexts = []

    def get_tensor_name(self, index):
        return ["image", "logits"][index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "image" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def get_tensor_shape(self, name):
        return (-1, 3, S, S) if name == "image" else (-1, CLASSES)

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 3, S, S), (4, 3, S, S), (8, 3, S, S)]

    def create_execution_context(self):
        context = FakeContext(self)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine):
        self.engine, self.sim = engine, engine.sim
        self.shape = None
        self.addresses = {}
        self.executions = 0

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def infer_shapes(self):
        return [] if self.shape else ["image"]

    def get_tensor_shape(self, name):
        return self.shape if name == "image" else (self.shape[0], CLASSES)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, handle):
        assert handle == 1001  # the runner's own (non-default) stream
        self.executions += 1
        shape, addresses = self.shape, dict(self.addresses)

        def op():
            x = self.sim.read(addresses["image"], np.float32, shape)
            self.sim.write(addresses["logits"], reference(x))
            self.sim.advance(2.0)

        self.sim.submit(op)
        return True


@pytest.fixture
def runner_setup(monkeypatch):
    trt = fake_tensorrt("11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    sim = SimCuda(copy_ms=0.25)
    engine = FakeEngine(trt, sim)
    logger = types.SimpleNamespace(last_error=lambda: "no error message from TensorRT")
    loader = lambda: rtrt.LoadedEngine(engine, object(), logger, 11)  # noqa: E731
    return sim, engine, loader


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, S, S)).astype(np.float32)


def test_runner_discovers_io_and_runs(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim, name="trt-test") as runner:
        assert runner.input_metadata() == {"image": TensorMetadata(np.dtype(np.float32), (None, 3, S, S))}
        assert runner.output_metadata() == {"logits": TensorMetadata(np.dtype(np.float32), (None, CLASSES))}
        assert runner.profile() == ((1, 3, S, S), (4, 3, S, S), (8, 3, S, S))
        x = batch(2)
        out = runner.infer(x)
        np.testing.assert_allclose(out["logits"], reference(x), rtol=1e-6)
        assert out["logits"].dtype == np.float32
        assert runner.last_inference_timings() == {"h2d": 0.25, "compute": 2.0, "d2h": 0.25}
        assert runner.last_inference_time() is not None and not runner.cuda_graphs_active
    assert sim.device_memory == {} and sim.host_live == set()
    assert (sim.live_streams, sim.live_events, sim.live_graphs, sim.closed) == (0, 0, 0, False)  # caller's backend stays open


def test_runner_buffers_grow_only_for_larger_batches(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim) as runner:
        for n in (2, 8, 3, 8, 1):
            x = batch(n, seed=n)
            np.testing.assert_allclose(runner.infer(x)["logits"], reference(x), rtol=1e-6)
        allocations = [entry for entry in sim.log if entry.startswith("malloc")]
        assert len(allocations) == 8  # 2 device + 2 host at batch 2, all four grown once at batch 8
        context = engine.contexts[0]
        assert context.executions == 5


def test_runner_refuses_batches_outside_the_profile(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim) as runner:
        with pytest.raises(DataError) as excinfo:
            runner.infer(batch(9))
        assert one_line(excinfo) == (
            "input image: batch 9 is outside the engine's profile 1..8; split the batch or rebuild the engine with a "
            "larger --max-batch"
        )
        with pytest.raises(DataError) as excinfo:
            runner.infer(np.zeros((2, 3, S + 1, S), np.float32))
        assert "has shape (2, 3, 9, 8), the model takes (N, 3, 8, 8)" in one_line(excinfo)


def test_runner_cuda_graphs_capture_once_per_shape_and_replay(runner_setup):
    sim, engine, loader = runner_setup
    with rtrt.TensorRTRunner(loader, cuda=sim, cuda_graphs=True) as runner:
        assert runner.cuda_graphs and not runner.cuda_graphs_active
        for n, seed in ((4, 1), (4, 2), (4, 3)):
            x = batch(n, seed)
            np.testing.assert_allclose(runner.infer(x)["logits"], reference(x), rtol=1e-6)
        context = engine.contexts[0]
        assert runner.cuda_graphs_active and sim.live_graphs == 1
        assert context.executions == 2  # one plain launch + one captured, then replays only
        assert sim.log.count("graph_launch") == 3
        assert runner.last_inference_timings()["compute"] == 2.0
        x = batch(6, 9)  # a new shape: re-captured
        np.testing.assert_allclose(runner.infer(x)["logits"], reference(x), rtol=1e-6)
        assert context.executions == 4 and sim.live_graphs == 1
    assert sim.live_graphs == 0 and sim.device_memory == {}


def test_runner_graphs_need_a_backend_that_has_them(runner_setup):
    sim, engine, loader = runner_setup
    sim.supports_graphs = False
    sim.name = "torch"
    runner = rtrt.TensorRTRunner(loader, cuda=sim, cuda_graphs=True, name="trt")
    with pytest.raises(MMExportError) as excinfo:
        runner.activate()
    assert one_line(excinfo) == "trt: CUDA graphs need the cuda-bindings backend, not torch"
    assert not runner.is_active


def test_runner_frees_everything_when_activation_fails(runner_setup, monkeypatch):
    sim, engine, loader = runner_setup
    monkeypatch.setattr(engine, "create_execution_context", lambda: None)
    runner = rtrt.TensorRTRunner(loader, cuda=sim, name="trt")
    with pytest.raises(MMExportError) as excinfo:
        runner.activate()
    assert one_line(excinfo) == ("trt: TensorRT could not create an execution context (no error message from TensorRT); "
                                 "the engine needs 4096 bytes of GPU memory")
    assert (sim.live_streams, sim.live_events) == (0, 0)


def test_failed_builder_or_runtime_creation_is_one_line():
    logger = types.SimpleNamespace(last_error=lambda: "CUDA initialization failure with error: 35")

    def null_factory(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    for factory in (null_factory, lambda logger: None):
        with pytest.raises(MMExportError) as excinfo:
            rtrt.create(factory, logger, "builder")
        assert one_line(excinfo) == ("TensorRT could not create a builder (CUDA initialization failure with error: 35); "
                                     "is the NVIDIA GPU and driver usable?")


def test_device_memory_size_dispatch():
    ten_zero = types.SimpleNamespace(device_memory_size=123)
    eleven = types.SimpleNamespace(device_memory_size_v2=456)
    assert rtrt.device_memory_size(ten_zero, 10) == 123
    assert rtrt.device_memory_size(eleven, 11) == 456
    assert rtrt.device_memory_size(types.SimpleNamespace(device_memory_size_v2=7, device_memory_size=8), 10) == 7


def test_unsupported_io_dtype_is_one_line(runner_setup, monkeypatch):
    sim, engine, loader = runner_setup
    monkeypatch.setattr(engine, "get_tensor_dtype", lambda name: engine.trt.DataType.BF16)
    with pytest.raises(MMExportError) as excinfo:
        rtrt.discover_io(engine, engine.trt)
    assert "tensor image has TensorRT type" in one_line(excinfo) and "which numpy cannot hold" in one_line(excinfo)


def test_engine_loader_checks_before_deserialising(tmp_path, monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = _write_engine(tmp_path, build_flags={"version_compatible": True})
    loaded = rtrt.EngineFromPath(path, environment=H100)()
    assert loaded.sidecar.precision == "fp16" and loaded.tensorrt_major == 10
    assert trt.runtimes[-1].engine_host_code_allowed  # version-compatible plans carry host code
    path.write_bytes(path.read_bytes()[:-1] + b"X")  # tampered
    deserialised = len([e for e in trt.log if e[0] == "deserialize"])
    with pytest.raises(CheckpointError) as excinfo:
        rtrt.EngineFromPath(path, environment=H100)()
    assert "the engine's sha256" in one_line(excinfo)
    assert len([e for e in trt.log if e[0] == "deserialize"]) == deserialised  # refused before TensorRT saw it


def test_engine_loader_turns_a_none_engine_into_one_error(tmp_path, monkeypatch):
    trt = fake_tensorrt(deserialize_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = _write_engine(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        rtrt.EngineFromPath(path, environment=H100)()
    assert one_line(excinfo) == (
        f"{path}: TensorRT 10.16.1.11 could not deserialize the engine (The engine plan file is generated on an "
        "incompatible device, expecting compute 8.9 got compute 9.0, please rebuild.); "
        f"rebuild it: mmexport fold {tmp_path} --to trt --precision fp16"
    )


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
