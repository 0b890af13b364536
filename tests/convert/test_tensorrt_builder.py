"""The TensorRT builder (mmexport.convert.tensorrt) through a FAKE ``tensorrt`` module, majors 10 and 11.

trtexec lines; version dispatch of network and builder flags; the timing cache (naming,
locking, merging); the whole build, its sidecar and every refusal; ``tensorrt_status``.
"""

from __future__ import annotations

import fcntl
import sys
import types

import pytest

from mmexport.convert import tensorrt as et
from mmexport.errors import (
    CheckpointError,
    MissingDependencyError,
    MMExportError,
    VerificationError,
)
from mmexport.runtime.engine import (
    BatchProfile,
    BuildFlags,
    EngineEnvironment,
    EngineSidecar,
    PrecisionSummary,
    check_engine,
    engine_filename,
    sidecar_path,
)
from tests.conftest import one_line
from tests.tensorrt_fakes import H100, INSPECTOR, fake_tensorrt


# ------------------------------------------------------------------------------------------------
# trtexec lines
# ------------------------------------------------------------------------------------------------
def _trtexec(onnx_path, engine_path, *, tensorrt_major, timing_cache=None, precision, min_batch, opt_batch, max_batch,
             image_size, **builder):
    settings = et.BuildSettings.of(precision, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                   image_size=image_size, **builder)
    return et.trtexec_command(onnx_path, engine_path, settings, tensorrt_major=tensorrt_major, timing_cache=timing_cache)


def test_trtexec_line_for_tensorrt_10_fp32():
    cmd = _trtexec("run/model.onnx", "run/model.plan", precision="fp32", min_batch=1, opt_batch=8, max_batch=32,
                             image_size=224, tensorrt_major=10, timing_cache="cache/t.cache", workspace_bytes=2 << 30)
    assert cmd == [
        "trtexec", "--onnx=run/model.onnx", "--saveEngine=run/model.plan",
        "--minShapes=image:1x3x224x224", "--optShapes=image:8x3x224x224", "--maxShapes=image:32x3x224x224",
        "--builderOptimizationLevel=3", "--profilingVerbosity=detailed", "--stronglyTyped", "--noTF32",
        "--memPoolSize=workspace:2G", "--timingCacheFile=cache/t.cache", "--skipInference",
    ]


def test_trtexec_line_for_tensorrt_11_fp16_with_compatibility():
    cmd = _trtexec("m.fp16.onnx", "m.fp16.plan", precision="fp16", min_batch=2, opt_batch=4, max_batch=4,
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
    cmd = _trtexec("m.onnx", "m.plan", precision=precision, min_batch=1, opt_batch=1, max_batch=1,
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
        ({"optimization_level": 6}, "builder optimization level must be an integer from 0 to 5, got 6"),
        ({"precision": "bf16"}, "unknown precision 'bf16'; choose one of fp32, fp16, int8"),
        ({"hardware_compatibility": "turing"},
         "unknown hardware compatibility 'turing'; use one of none, ampere+, same-compute-capability"),
        ({"workspace_bytes": 0}, "workspace (bytes) must be a positive integer, got 0"),
    ],
)
def test_build_options_are_validated_in_one_line(kwargs, message):
    options = dict(precision="fp16", min_batch=1, opt_batch=2, max_batch=8, image_size=64, tensorrt_major=10)
    options.update(kwargs)
    with pytest.raises(MMExportError) as excinfo:
        _trtexec("m.onnx", "m.plan", **options)
    assert one_line(excinfo) == message



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
    call = {key: kwargs.pop(key) for key in ("progress", "timing_cache") if key in kwargs}
    settings = et.BuildSettings.of(precision, min_batch=1, opt_batch=4, max_batch=8, image_size=64, **kwargs)
    return et.build_engine(onnx_path, engine_path, settings, model_metadata=METADATA, **call), engine_path


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

