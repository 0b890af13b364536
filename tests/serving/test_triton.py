"""Triton model repositories (mmexport.serving.triton) and a real Triton server (mmexport.serving.server).

Repository tests parse every generated ``config.pbtxt`` with Triton's own schema
(``tritonclient.grpc.model_config_pb2.ModelConfig`` + ``text_format.Parse``) and make the
checks the parser does not: the name is the folder's, dims match the model file's
input/output shapes (read with ``onnx``, or the engine sidecar) without the batch
dimension, ``max_batch_size`` within the model's batch limit, one label per class.
The native ``onnxruntime_onnx``/``tensorrt_plan`` configs are checked this way only (the
nvidia-pytriton wheel's server has the Python backend alone); TensorRT engines are
stand-ins (a plan header and a complete sidecar), the config logic being the subject.

Server tests start the ``tritonserver`` of the nvidia-pytriton wheel on 127.0.0.1 with
Python-backend repositories of a tiny run, send the run's stored reference inputs over
HTTP and gRPC and judge the logits under the fp32 policy row, check the
classification extension's labels, bad requests and recovery, and that no server
process survives (also when the body raises). They skip without the wheel, tritonclient
or (numpy 2) the stub's numpy<2 environment; ``MMEXPORT_REQUIRE_TRITON=1`` turns those
skips into failures.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmexport import runtime
from mmexport.errors import MissingDependencyError, MMExportError, RunDirError
from mmexport.fileio import sha256_file, write_json_atomic
from mmexport.runs.manifest import RunDir
from mmexport.runtime.compare import compare_outputs
from mmexport.runtime.tolerances import FP32
from mmexport.serving.triton import (
    BYTES_INPUT, DEFAULT_MAX_BATCH, check_model_folder, check_name, export_repository, parse_config, read_version_record,
    sanitize_name,
)
from tests.conftest import one_line, train_exported_run

NETWORK_TIMEOUT = 30.0  # seconds, every client call


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("MMEXPORT_REQUIRE_TRITON") == "1":
        pytest.fail(f"MMEXPORT_REQUIRE_TRITON=1 but: {reason}")
    pytest.skip(reason)


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        _skip_or_fail("needs tritonclient[grpc] (Triton's model-config schema)")
    return model_config_pb2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, resnet18_sources) -> Path:
    root = tmp_path_factory.mktemp("triton")
    return train_exported_run(root / "lesion run#1", resnet18_sources)


# --------------------------------------------------------------------------------------------
# config generation, parsed with Triton's schema
# --------------------------------------------------------------------------------------------
def _onnx_io(path: Path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    return (inp.name, dims(inp)), (out.name, dims(out))


def _parsed(model_dir: Path):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    config = pb2.ModelConfig()
    text_format.Parse((model_dir / "config.pbtxt").read_text(), config)  # Triton's schema: unknown fields fail here
    return config, pb2


def _semantic_checks(model_dir: Path, classes: tuple[str, ...], image_size: int) -> object:
    """The checks the schema parser does not make, done here independently of mmexport.serving.triton."""
    config, pb2 = _parsed(model_dir)
    assert config.name == model_dir.name
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    latest = model_dir / str(versions[-1])
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == list(classes)
    (logits,) = config.output
    assert logits.label_filename == "labels.txt" and list(logits.dims) == [len(classes)] == [len(labels)]
    assert logits.data_type == pb2.TYPE_FP32
    image = next(i for i in config.input if i.name == "image")
    assert list(image.dims) == [3, image_size, image_size] and image.data_type == pb2.TYPE_FP32
    if (latest / "model.onnx").is_file():
        (in_name, in_dims), (out_name, out_dims) = _onnx_io(latest / "model.onnx")
        assert in_dims[0] is None and out_dims[0] is None  # dynamic batch: dims exclude it
        assert in_dims[1:] == list(image.dims) and out_dims[1:] == list(logits.dims)
        if config.backend != "python":
            assert (in_name, out_name) == (image.name, logits.name)
        assert 1 <= config.max_batch_size <= DEFAULT_MAX_BATCH
    assert config.HasField("dynamic_batching")
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
    assert check_model_folder(model_dir) == []
    return config


def test_onnxruntime_and_python_configs_parse_and_match_the_model(run_dir, tmp_path):
    pb2 = _model_config_pb2()
    info = runtime.load(run_dir / "model.onnx").info
    repo = tmp_path / "repo"
    native = export_repository(run_dir, repo)  # backend onnxruntime, default name from the run directory
    assert native.name == "lesion_run_1" == sanitize_name("lesion run#1") and native.version == 1
    config = _semantic_checks(native.model_dir, info.classes, info.image_size)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == DEFAULT_MAX_BATCH
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU

    python = export_repository(run_dir, repo, backend="python", name="plain", max_batch=8)
    config = _semantic_checks(python.model_dir, info.classes, info.image_size)
    assert config.backend == "python" and config.max_batch_size == 8 and [i.name for i in config.input] == ["image"]
    assert not config.input[0].optional
    assert (python.version_dir / "model.py").read_bytes() == (Path(runtime.__file__).parent.parent /
                                                                "serving" / "python_model.py").read_bytes()

    prep = export_repository(run_dir, repo, backend="python", name="prep", preprocess=True)
    config = _semantic_checks(prep.model_dir, info.classes, info.image_size)
    encoded = next(i for i in config.input if i.name == BYTES_INPUT)
    assert encoded.data_type == pb2.TYPE_STRING and list(encoded.dims) == [1]
    assert all(i.optional for i in config.input)

    # The version's provenance record: hashes of every copied file, the run's verification records.
    record = read_version_record(prep.version_dir)
    manifest = RunDir.open(run_dir).manifest
    assert record["source"]["verified"] is True and record["source"]["artifact"] == "model.onnx"
    assert record["source"]["sha256"] == manifest["outputs"]["model.onnx"]["sha256"] == record["files"]["model.onnx"]
    for filename, digest in record["files"].items():
        assert sha256_file(prep.version_dir / filename) == digest
    assert record["verification"] and all(r["artifact"] == "model.onnx" and r["passed"] for r in record["verification"])
    assert json.loads(record["model_metadata"]["classes"]) == list(info.classes)
    assert record["config_pbtxt"] == (prep.model_dir / "config.pbtxt").read_text()
    assert not [p for p in prep.model_dir.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_new_exports_add_versions_and_keep_the_interface(run_dir, tmp_path):
    repo = tmp_path / "repo"
    first = export_repository(run_dir, repo, backend="python", name="m", preprocess=True)
    before = sha256_file(first.version_dir / "mmexport.json")
    second = export_repository(run_dir, repo, backend="python", name="m", preprocess=True)
    assert (first.version, second.version) == (1, 2) and not second.config_changed
    assert sha256_file(first.version_dir / "mmexport.json") == before  # version 1 untouched
    with pytest.raises(MMExportError) as excinfo:  # another interface under the same name
        export_repository(run_dir, repo, backend="python", name="m", preprocess=False)
    assert "another interface" in one_line(excinfo)
    with pytest.raises(MMExportError) as excinfo:  # a bigger batch than the default needs saying; zero never
        export_repository(run_dir, repo, backend="python", name="m", preprocess=True, max_batch=0)
    assert "max batch" in one_line(excinfo)
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    for bad in ("", "../x", ".hidden", "a b", "x" * 129, "é"):
        with pytest.raises(MMExportError) as excinfo:
            check_name(bad)
        one_line(excinfo)
    with pytest.raises(MMExportError) as excinfo:
        export_repository(run_dir, repo, preprocess=True)
    assert "backend python" in one_line(excinfo)
    (repo / "foreign").mkdir()
    (repo / "foreign" / "config.pbtxt").write_text('name: "foreign"\n')
    with pytest.raises(RunDirError) as excinfo:
        export_repository(run_dir, repo, name="foreign")
    assert "refusing" in one_line(excinfo)


def _copy_run(run_dir: Path, destination: Path) -> Path:
    shutil.copytree(run_dir, destination)
    return destination


def test_unverified_missing_altered_or_untracked_artifacts_are_refused(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "copy")
    manifest = json.loads((run / "manifest.json").read_text())
    with pytest.raises(RunDirError) as excinfo:
        export_repository(run, tmp_path / "repo", precision="fp16")
    assert "model.fp16.onnx" in one_line(excinfo) and "--precision fp16" in str(excinfo.value)
    manifest["outputs"]["model.onnx"].update(verified=False, unverified_reason="3 of 40 elements exceed the bound")
    write_json_atomic(run / "manifest.json", manifest)
    with pytest.raises(RunDirError) as excinfo:
        export_repository(run, tmp_path / "repo", backend="python")
    assert "not verified" in one_line(excinfo) and "3 of 40 elements" in str(excinfo.value)
    del manifest["outputs"]["model.onnx"]["verified"]
    write_json_atomic(run / "manifest.json", manifest)
    with pytest.raises(RunDirError):
        export_repository(run / "model.onnx", tmp_path / "repo")
    manifest["outputs"]["model.onnx"]["verified"] = True
    write_json_atomic(run / "manifest.json", manifest)
    with open(run / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(RunDirError) as excinfo:
        export_repository(run, tmp_path / "repo")
    assert "altered" in one_line(excinfo)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("model.onnx"))

    loose = tmp_path / "loose" / "classifier.onnx"
    loose.parent.mkdir()
    shutil.copyfile(run_dir / "model.onnx", loose)
    with pytest.raises(RunDirError) as excinfo:
        export_repository(loose, tmp_path / "repo2")
    assert "allow_untracked" in one_line(excinfo)
    result = export_repository(loose, tmp_path / "repo2", allow_untracked=True)
    assert result.name == "classifier" and result.verified is None and result.run is None
    assert read_version_record(result.version_dir)["source"]["verified"] is None


def _fake_engine(run_dir: Path, folder: Path, cc: tuple[int, int], max_batch: int, *, precision: str = "fp32") -> Path:
    """A run folder holding a stand-in engine: plan header bytes, a complete sidecar, a manifest entry verified: true."""
    folder.mkdir(parents=True)
    name = "model.plan" if precision == "fp32" else f"model.{precision}.plan"
    plan = folder / name
    plan.write_bytes(b"ftrt" + bytes(20) + bytes((10, 16, 1, 11)) + f"engine for sm{cc[0]}{cc[1]}".encode())
    source = RunDir.open(run_dir)
    # an engine of another precision is built from that precision's ONNX, whose description says so
    metadata = {**runtime.load(run_dir / "model.onnx").runner.metadata(), "precision": precision}
    sidecar = {
        "format": "mmexport-engine/1", "tensorrt_version": "10.16.1.11", "plan_tensorrt_version": "10.16.1.11",
        "plan_layout": 0, "plan_archive_version": 239, "gpu_name": f"GPU sm{cc[0]}{cc[1]}", "compute_capability": list(cc),
        "cuda_runtime_version": 13000, "cuda_driver_version": 13000, "precision": precision,
        "layer_precisions": {"layout": "10.x", "counts": {precision: 30}, "compute_counts": {precision: 21}, "unexpected": []},
        "batch_profile": {"min": 1, "opt": min(8, max_batch), "max": max_batch}, "image_size": 64, "input_name": "image",
        "build_flags": {"optimization_level": 3, "tf32": False, "hardware_compatibility": "none",
                        "version_compatible": False, "workspace_bytes": None, "strongly_typed": True},
        "onnx_sha256": source.manifest["outputs"]["model.onnx"]["sha256"], "engine_sha256": sha256_file(plan),
        "model_metadata": metadata, "created": "2026-11-27T13:00:00+00:00", "mmexport_version": "0.1.0",
    }
    (folder / f"{name}.json").write_text(json.dumps(sidecar, indent=2))
    manifest = {**source.manifest, "outputs": {}, "verification": []}
    write_json_atomic(folder / "manifest.json", manifest)
    run = RunDir.open(folder)
    # the run's own weights: what an engine's embedded description is checked against on export
    shutil.copyfile(run_dir / "model.safetensors", folder / "model.safetensors")
    run.record_output("model.safetensors", source.manifest["outputs"]["model.safetensors"]["kind"])
    run.record_output(f"{name}.json", "engine-sidecar", engine=name)
    run.record_output(name, "engine", precision=precision, verified=True, compute_capability=list(cc))
    record = next(r for r in source.manifest["verification"] if r.get("artifact") == "model.onnx")
    run.add_verification({**record, "artifact": name, "command": "fold", "candidate": f"tensorrt ({name})"})
    return folder


def test_tensorrt_config_takes_the_engine_batch_limit_and_maps_compute_capabilities(run_dir, tmp_path):
    pb2 = _model_config_pb2()
    h100 = _fake_engine(run_dir, tmp_path / "h100", (9, 0), 16)
    a100 = _fake_engine(run_dir, tmp_path / "a100", (8, 0), 32)
    l4 = _fake_engine(run_dir, tmp_path / "l4", (8, 9), 8)
    repo = tmp_path / "repo"

    single = export_repository(h100, repo, backend="tensorrt", name="one")
    config, _ = _parsed(single.model_dir)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16  # the profile's max, not 32
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.input[0].dims) == [3, 64, 64] and list(config.output[0].dims) == [5]
    assert (single.version_dir / "model.plan").is_file() and (single.version_dir / "model.plan.json").is_file()
    assert check_model_folder(single.model_dir) == []
    with pytest.raises(MMExportError) as excinfo:
        export_repository(h100, repo, backend="tensorrt", name="one", max_batch=32)
    assert "exceeds" in one_line(excinfo) and "16" in str(excinfo.value)
    with pytest.raises(MMExportError) as excinfo:
        export_repository(h100, repo, backend="tensorrt", instance_kind="cpu")
    one_line(excinfo)

    multi = export_repository(h100 / "model.plan", repo, backend="tensorrt", name="multi",
                              engines=[a100 / "model.plan", l4 / "model.plan"])
    config, _ = _parsed(multi.model_dir)
    assert dict(config.cc_model_filenames) == {"9.0": "model.sm90.plan", "8.0": "model.sm80.plan", "8.9": "model.sm89.plan"}
    assert config.default_model_filename == "model.sm90.plan"
    assert config.max_batch_size == 8  # the smallest profile: every GPU must accept the config
    for cc, filename in config.cc_model_filenames.items():
        sidecar = json.loads((multi.version_dir / (filename + ".json")).read_text())
        assert ".".join(map(str, sidecar["compute_capability"])) == cc
        assert sha256_file(multi.version_dir / filename) == sidecar["engine_sha256"]
    record = read_version_record(multi.version_dir)
    assert sorted(e["compute_capability"] for e in record["engines"]) == ["8.0", "8.9", "9.0"]
    assert all(e["verified"] for e in record["engines"])
    assert check_model_folder(multi.model_dir) == []

    twin = _fake_engine(run_dir, tmp_path / "h100b", (9, 0), 16)
    with pytest.raises(MMExportError) as excinfo:
        export_repository(h100, repo, backend="tensorrt", name="dup", engines=[twin / "model.plan"])
    assert "compute capability 9.0" in one_line(excinfo)
    other = _fake_engine(run_dir, tmp_path / "fp16", (8, 6), 16, precision="fp16")
    with pytest.raises(MMExportError) as excinfo:
        export_repository(h100, repo, backend="tensorrt", name="mixed", engines=[other / "model.fp16.plan"])
    assert "same model and precision" in one_line(excinfo)
    with pytest.raises(MMExportError) as excinfo:
        export_repository(run_dir, repo, backend="tensorrt")
    assert "fold RUN --to trt" in one_line(excinfo) or "model.plan" in str(excinfo.value)


def test_check_model_folder_finds_tampering(run_dir, tmp_path):
    _model_config_pb2()
    result = export_repository(run_dir, tmp_path / "repo", backend="python", name="m")
    (result.model_dir / "labels.txt").write_text("only-one\n")
    with open(result.version_dir / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    problems = check_model_folder(result.model_dir)
    assert any("model.onnx differs" in p for p in problems) and any("labels.txt has 1 lines" in p for p in problems)
    assert any("not a readable ONNX model" in p for p in problems)
    shutil.copyfile(run_dir / "model.onnx", result.version_dir / "model.onnx")
    config = (result.model_dir / "config.pbtxt").read_text()
    (result.model_dir / "config.pbtxt").write_text(config.replace('name: "m"', 'name: "n"').replace("[ 3, 64, 64 ]", "[ 3, 32, 32 ]"))
    problems = check_model_folder(result.model_dir)
    assert any("not the folder" in p for p in problems) and any("dims [3, 32, 32]" in p for p in problems)
    with pytest.raises(MMExportError) as excinfo:
        parse_config('name: "x"\nmax_batch_size: 8\nno_such_field: 1\n')
    assert "no_such_field" in one_line(excinfo)


def test_python_model_imports_only_the_runtime_numpy_and_triton():
    source = (Path(runtime.__file__).parent.parent / "serving" / "python_model.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module if not node.names or node.module != "mmexport" else
                         "mmexport." + ".".join(a.name for a in node.names))
    # the server's Python has mmexport but no torch/onnx: the runtime and the torch-free ground modules below it
    ground = {"mmexport.errors", "mmexport.serving.version_record"}  # torch- and onnx-free (tested below)
    ours = {name for name in imported if name.startswith("mmexport")}
    assert "mmexport.runtime" in ours and ours - {"mmexport.runtime"} <= ground, ours
    third_party = {name for name in imported - ours if name.split(".")[0] not in sys.stdlib_module_names}
    assert third_party == {"numpy", "triton_python_backend_utils"}, imported


# --------------------------------------------------------------------------------------------
# the launcher, without a server
# --------------------------------------------------------------------------------------------
def test_server_environment_and_ports():
    from mmexport.serving.server import TritonInstallation, free_ports, python_library_dir, server_environment

    fake = TritonInstallation(Path("/opt/tritonserver/bin/tritonserver"), Path("/opt/tritonserver/backends"), None,
                              Path("/opt/libs"), "test")
    env = server_environment(fake, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/x"}, python_bin="/venv/bin")
    parts = env["LD_LIBRARY_PATH"].split(os.pathsep)
    libdir = python_library_dir()
    if libdir is not None and str(libdir) not in ("/usr/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"):
        assert parts[0] == str(libdir)  # this interpreter's libpython before the system's
    assert parts[-2:] == ["/opt/libs", "/x"]
    assert env["PATH"].split(os.pathsep)[0] == "/venv/bin"
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= p < 65536 for p in ports)


# --------------------------------------------------------------------------------------------
# a real Triton server
# --------------------------------------------------------------------------------------------
def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _assert_gone(pid: int, *, reaped: bool = True) -> None:
    """Nothing of the server's process group runs any more (and, when we were its parent, it was reaped)."""
    deadline = time.monotonic() + 30
    while _group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_members(pid) == [], f"tritonserver process group {pid} survived"
    if reaped:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def triton():
    from mmexport.serving.server import find_tritonserver, prepare_python_environment

    try:
        installation = find_tritonserver()
    except MissingDependencyError as exc:
        _skip_or_fail(str(exc))
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError:
        _skip_or_fail("needs tritonclient[http,grpc]")
    try:
        prepare_python_environment(installation)  # numpy<2 for the wheel's stub, cached (pip, once)
    except MissingDependencyError as exc:
        _skip_or_fail(str(exc))
    return installation


@pytest.fixture(scope="module")
def served(run_dir, triton, tmp_path_factory):
    """One server for the module: ``plain`` (FP32 images) and ``prep`` (FP32 images or encoded bytes), Python backend."""
    from mmexport.serving.server import TritonServer

    repo = tmp_path_factory.mktemp("repository")
    export_repository(run_dir, repo, backend="python", name="plain")
    export_repository(run_dir, repo, backend="python", name="prep", preprocess=True)
    server = TritonServer(repo, ready_timeout=120, installation=triton)
    started = time.perf_counter()
    server.start()
    pid = server.pid
    try:
        server.startup = time.perf_counter() - started
        yield server
    finally:
        server.stop()
        _assert_gone(pid)


def _http(server):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), connection_timeout=10,
                                            network_timeout=NETWORK_TIMEOUT)


def _grpc(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def _infer(client, model: str, name: str, array: np.ndarray, datatype: str, class_count: int = 0):
    """One request through ``client`` (tritonclient.http or .grpc); returns the logits output as numpy."""
    module = sys.modules[type(client).__module__.rsplit(".", 1)[0]]
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    output = module.InferRequestedOutput("logits", class_count=class_count)
    kwargs = {"client_timeout": NETWORK_TIMEOUT} if "grpc" in module.__name__ else {}
    return client.infer(model, [tensor], outputs=[output], **kwargs).as_numpy("logits")


def test_reference_outputs_over_http_and_grpc(served, run_dir):
    reference = RunDir.open(run_dir).reference()
    stats, requests = {}, 0
    for protocol, client in (("http", _http(served)), ("grpc", _grpc(served))):
        try:
            for model in ("plain", "prep"):
                for set_name, stored in reference.sets.items():
                    inputs = reference.inputs(set_name)
                    parts = []
                    for start in range(0, len(inputs), 4):  # batches of 4, the last may be smaller
                        parts.append(_infer(client, model, "image", inputs[start : start + 4], "FP32"))
                        requests += 1
                    result = compare_outputs(stored.outputs["logits"], np.concatenate(parts), FP32, stored.labels)
                    assert result.passed, (protocol, model, set_name, result.failures)
                    stats[f"{protocol}/{model}/{set_name}"] = result.max_abs_error
        finally:
            client.close()
    print(f"\n{requests} requests, max abs error vs the stored reference: {max(stats.values()):.3g}  {stats}")


def test_encoded_images_are_preprocessed_on_the_server(served, run_dir, tmp_path):
    reference = RunDir.open(run_dir).reference()
    set_name = reference.labelled_set
    stored = reference.sets[set_name]
    encoded = []
    for pixels in stored.pixels:  # already at the model's size: the recorded preprocessing leaves them as they are
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    rng = np.random.default_rng(5)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    with runtime.load(run_dir / "model.onnx") as predictor:
        expected_jpeg = predictor.predict([jpeg.getvalue()]).logits
    classes = reference.classes
    for client in (_http(served), _grpc(served)):
        try:
            parts = [_infer(client, "prep", BYTES_INPUT, np.array([[item] for item in encoded[i : i + 5]], dtype=np.object_),
                            "BYTES") for i in range(0, len(encoded), 5)]
            result = compare_outputs(stored.outputs["logits"], np.concatenate(parts), FP32, stored.labels)
            assert result.passed, result.failures
            got = _infer(client, "prep", BYTES_INPUT, np.array([[jpeg.getvalue()]], dtype=np.object_), "BYTES")
            assert compare_outputs(expected_jpeg, got, FP32).passed
            # Triton's classification extension: "score:index:label" through labels.txt.
            top = _infer(client, "prep", BYTES_INPUT, np.array([[b] for b in encoded[:4]], dtype=np.object_), "BYTES",
                         class_count=3)
            assert top.shape == (4, 3)
            for row, logits in zip(top, stored.outputs["logits"][:4]):
                score, index, label = row[0].decode().split(":", 2)
                assert int(index) == int(np.argmax(logits)) and label == classes[int(index)]
                assert abs(float(score) - float(logits.max())) < 1e-3
                assert [entry.decode().split(":", 2)[2] for entry in row] == [classes[i] for i in np.argsort(-logits)[:3]]
        finally:
            client.close()


def test_bad_requests_get_errors_and_the_server_keeps_serving(served, run_dir):
    from tritonclient.utils import InferenceServerException

    reference = RunDir.open(run_dir).reference()
    good = reference.inputs("random", limit=2)
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    for client in (_http(served), _grpc(served)):
        try:
            bad = [
                ("prep", "image", np.zeros((1, 3, 32, 32), np.float32), "FP32", "shape"),  # Triton's own checks
                ("plain", "image", good.astype(np.float64), "FP64", "data-type"),
                ("plain", "image", np.zeros((1, 3, 64), np.float32), "FP32", "shape"),
                ("prep", BYTES_INPUT, np.array([[b"not an image"]], dtype=np.object_), "BYTES", "cannot decode"),  # model.py
                ("plain", "image", nan, "FP32", "NaN"),
            ]
            for model, name, array, datatype, expected in bad:
                with pytest.raises(InferenceServerException) as excinfo:
                    _infer(client, model, name, array, datatype)
                assert expected.lower() in str(excinfo.value).lower(), str(excinfo.value)
            bounded = {"client_timeout": NETWORK_TIMEOUT} if "grpc" in type(client).__module__ else {}
            assert client.is_server_live(**bounded)
            assert client.is_model_ready("plain", **bounded) and client.is_model_ready("prep", **bounded)
            got = _infer(client, "plain", "image", good, "FP32")
            assert compare_outputs(reference.sets["random"].outputs["logits"][:2], got, FP32).passed
        finally:
            client.close()
    assert served.is_running


def test_concurrent_requests_are_batched_and_answered_separately(served, run_dir):
    """Dynamic batching hands model.py several requests at once: each gets its own rows, a bad one only its error."""
    import tritonclient.http as httpclient

    reference = RunDir.open(run_dir).reference()
    inputs = reference.inputs("data:test")
    expected = reference.sets["data:test"].outputs["logits"]
    client = httpclient.InferenceServerClient(served.http_url.removeprefix("http://"), concurrency=8,
                                              connection_timeout=10, network_timeout=NETWORK_TIMEOUT)
    try:
        pending = []
        for index in range(len(inputs)):
            array = inputs[index : index + 1].copy()
            if index == 3:
                array[0, 1, 2, 3] = np.inf
            tensor = httpclient.InferInput("image", list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            pending.append(client.async_infer("plain", [tensor]))
        for index, request in enumerate(pending):
            if index == 3:
                with pytest.raises(Exception, match="NaN or Inf"):
                    request.get_result(timeout=NETWORK_TIMEOUT)
                continue
            got = request.get_result(timeout=NETWORK_TIMEOUT).as_numpy("logits")
            assert compare_outputs(expected[index : index + 1], got, FP32).passed
        statistics = client.get_inference_statistics("plain")["model_stats"][0]["batch_stats"]
        assert max(int(entry["batch_size"]) for entry in statistics) > 1, statistics  # model.py did get several at once
    finally:
        client.close()


def _percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)), "n": len(samples)}


def test_latency_through_triton_and_in_process(served, run_dir):
    """Side by side, batch 1, the same inputs (figures, not a timed assertion)."""
    reference = RunDir.open(run_dir).reference()
    inputs = reference.inputs("random")
    rounds, warmup = 40, 5
    figures = {}
    with runtime.load(run_dir / "model.onnx") as predictor:
        samples = []
        for i in range(warmup + rounds):
            start = time.perf_counter()
            predictor.logits(inputs[i % len(inputs)][None])
            samples.append(time.perf_counter() - start)
        figures["in-process mmexport.runtime"] = _percentiles(samples[warmup:])
    for protocol, client in (("Triton HTTP", _http(served)), ("Triton gRPC", _grpc(served))):
        try:
            samples = []
            for i in range(warmup + rounds):
                start = time.perf_counter()
                _infer(client, "plain", "image", inputs[i % len(inputs)][None], "FP32")
                samples.append(time.perf_counter() - start)
            figures[protocol] = _percentiles(samples[warmup:])
        finally:
            client.close()
    print("\nbatch-1 latency (ms): " + "; ".join(f"{k}: p50 {v['p50_ms']:.2f}, p99 {v['p99_ms']:.2f}"
                                                 for k, v in figures.items()))
    print(f"server start to ready: {served.startup:.1f} s")
    assert all(v["n"] == rounds and v["p50_ms"] > 0 for v in figures.values())


def test_a_failing_model_is_reported_with_the_log_tail_and_nothing_survives(triton, tmp_path):
    from mmexport.serving.server import TritonServer

    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\noutput [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'instance_group [ { count: 1 kind: KIND_CPU } ]\n')
    (model / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('weights are missing here')\n")
    server = TritonServer(tmp_path / "repo", ready_timeout=60, installation=triton, log_file=tmp_path / "server.log")
    with pytest.raises(MMExportError) as excinfo:
        server.start()
    message = one_line(excinfo)
    assert "weights are missing here" in message and str(tmp_path / "server.log") in message
    assert server.process is None
    assert (tmp_path / "server.log").is_file()
    pids = [int(line.split()[2]) for line in (tmp_path / "server.log").read_text().splitlines()
            if line[:1] in "IEW" and len(line.split()) > 2 and line.split()[2].isdigit()]
    if pids:
        _assert_gone(pids[0])


def test_the_server_is_stopped_when_the_body_raises(triton, run_dir, tmp_path):
    from mmexport.serving.server import TritonServer

    repo = tmp_path / "repo"
    export_repository(run_dir, repo, backend="python", name="m")
    pid = None
    with pytest.raises(RuntimeError, match="the caller failed"):
        with TritonServer(repo, model_control_mode="explicit", load_models=["m"], installation=triton) as server:
            pid = server.pid
            assert server.model_ready("m") and _group_members(pid)  # the server and its Python-backend stub
            raise RuntimeError("the caller failed")
    assert pid is not None and not server.is_running
    _assert_gone(pid)


def test_serve_a_run_with_a_temporary_repository_and_the_curl_example(triton, run_dir, tmp_path):
    from mmexport.serving.server import serve

    png = tmp_path / "lesion.png"
    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)).save(png)
    with runtime.load(run_dir / "model.onnx") as predictor:
        expected = predictor.predict([str(png)])
    with serve(run_dir, name="lesions", ready_timeout=120) as session:
        pid = session.server.pid
        repository = session.repository
        assert session.http_url.startswith("http://127.0.0.1:") and session.grpc_url.startswith("127.0.0.1:")
        assert session.model == "lesions" and session.verified is True and session.preprocess
        assert (repository / "lesions" / "1" / "model.py").is_file()
        example = session.curl_example(str(png), top=2)
        if shutil.which("curl") and shutil.which("perl") and shutil.which("bash"):
            done = subprocess.run(["bash", "-c", example], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            top = answer["outputs"][0]["data"]
            assert answer["model_name"] == "lesions" and len(top) == 2
            assert top[0].split(":", 2)[2] == expected.labels[0]
            assert abs(float(top[0].split(":")[0]) - float(expected.logits[0].max())) < 1e-3
    assert not repository.exists()  # the temporary repository goes with the server
    _assert_gone(pid)


SERVE_SCRIPT = """
import json, sys
from mmexport.serving.server import serve
with serve(sys.argv[1], name="m", ready_timeout=120) as session:
    info = {"pid": session.server.pid, "repository": str(session.repository), "http": session.http_url,
            "log": str(session.server.log_path)}
    with open(sys.argv[2] + ".tmp", "w") as handle:
        json.dump(info, handle)
    import os
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    session.wait()
"""


def _serving_child(run_dir: Path, tmp_path: Path, tag: str):
    ready = tmp_path / f"{tag}.json"
    child = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(run_dir), str(ready)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ready.is_file():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate(timeout=30)
            pytest.fail(f"the serving process did not get ready: {err[-2000:]}")
        time.sleep(0.2)
    return child, json.loads(ready.read_text())


def test_a_terminated_or_killed_owner_takes_its_server_along(triton, run_dir, tmp_path):
    import signal

    child, info = _serving_child(run_dir, tmp_path, "term")
    try:
        assert _group_members(info["pid"])
        child.send_signal(signal.SIGTERM)  # e.g. systemd stopping `mmexport serve`: a clean stop
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
        _assert_gone(info["pid"])
        assert not Path(info["repository"]).exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    child, info = _serving_child(run_dir, tmp_path, "kill")
    try:
        child.kill()  # SIGKILL: no Python code runs; the kernel's parent-death signal stops the server
        child.wait(timeout=30)
        _assert_gone(info["pid"], reaped=False)  # an orphan's zombie is for PID 1 to reap
    finally:
        shutil.rmtree(info["repository"], ignore_errors=True)  # nothing could remove them
        shutil.rmtree(Path(info["log"]).parent, ignore_errors=True)
