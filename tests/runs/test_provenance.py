"""Provenance anyone can re-check: the manifest's published schema, `verify --manifest`, hash-checked deployables."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

from mmexport.runs.provenance import verify_manifest
from mmexport.runs.verify import verify_artifacts
from mmexport.errors import MMExportError, RunDirError
from mmexport.runs.manifest import RunDir, manifest_schema, validate_manifest
from mmexport.torchside.operations import verify_run
from tests.conftest import train_exported_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, resnet18_sources):
    root = tmp_path_factory.mktemp("provenance")
    return train_exported_run(root / "run", resnet18_sources, image_size=32)


@pytest.fixture()
def copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_manifest_follows_its_published_schema(run):
    manifest = json.loads((run / "manifest.json").read_text())
    jsonschema.Draft202012Validator(manifest_schema()).validate(manifest)
    assert manifest["outputs"]["model.onnx"]["verified"] is True and manifest["outputs"]["model.onnx"]["source"]


@pytest.mark.parametrize("mutate, fragment", [
    # mmexport.jsonread refuses a manifest that is not a JSON object; the format check names the others
    (lambda m: [m], "unknown manifest format|expected a JSON object, got list"),
    (lambda m: "a string", "unknown manifest format|expected a JSON object, got str"),
    (lambda m: {**m, "verification": None}, "verification"),
    (lambda m: {**m, "outputs": {**m["outputs"], "x.bin": {"kind": "x", "size_bytes": 1, "created": ""}}}, "sha256"),
    (lambda m: {k: v for k, v in m.items() if k != "run_id"}, "run_id"),
])
def test_malformed_manifests_are_refused_in_one_line(copy, mutate, fragment):
    path = copy / "manifest.json"
    path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    with pytest.raises(RunDirError, match=fragment) as info:
        RunDir.open(copy)
    assert "\n" not in str(info.value)


def test_deeply_nested_manifest_is_refused_not_a_crash(copy):
    (copy / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(RunDirError, match="nested too deeply|unknown manifest format"):
        RunDir.open(copy)


def test_verify_manifest_reports_exactly_what_changed(copy):
    report = verify_manifest(copy)
    assert report.passed and all(f.state == "intact" for f in report.files)
    chain = next(c for c in report.chains if c[0] == "model.onnx")
    assert chain[:2] == ["model.onnx", "model.safetensors"] and any(step.startswith("sources:") for step in chain)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    (copy / "coefficients.png").unlink()
    (copy / "notes.txt").write_text("added")
    report = verify_manifest(copy)
    states = {f.name: f.state for f in report.files}
    assert not report.passed
    assert states["model.onnx"] == "altered" and states["coefficients.png"] == "missing"
    assert [n for n, s in states.items() if s != "intact"] == ["coefficients.png", "model.onnx"] or \
        sorted(n for n, s in states.items() if s != "intact") == ["coefficients.png", "model.onnx"]
    assert [(u.name, u.read_by_mmexport) for u in report.untracked] == [("notes.txt", False)]


def test_every_verify_hash_checks_the_deployable_model(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RunDirError, match="altered"):
        verify_run(copy)  # compares unmerged vs folded, but refuses a run whose deployable weights changed
    with pytest.raises(RunDirError, match="altered"):
        verify_artifacts(copy, "onnx")


def test_onnx_with_external_data_is_refused(copy):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(copy / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="model.onnx.data")
    onnx.save(model, str(copy / "model.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    from mmexport.fileio import sha256_file

    manifest["outputs"]["model.onnx"]["sha256"] = sha256_file(copy / "model.onnx")  # even with a forged hash
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MMExportError, match="external data"):
        verify_artifacts(copy, "onnx")


def test_zero_random_samples_is_a_failure_not_a_pass(copy):
    reports = verify_artifacts(copy, "onnx", samples=0)
    assert not reports[0].passed
    assert any("zero samples" in f for f in reports[0].failures())


def test_validate_manifest_accepts_a_fresh_run_and_names_the_field(run):
    manifest = json.loads((run / "manifest.json").read_text())
    validate_manifest(manifest)
    manifest["outputs"]["model.onnx"]["size_bytes"] = -1
    with pytest.raises(RunDirError, match="outputs/model.onnx/size_bytes"):
        validate_manifest(manifest)


def test_verify_manifest_covers_the_triton_repositories_a_run_exported(copy, tmp_path):
    from mmexport.serving.triton import export_repository, record_in_run

    result = export_repository(copy, tmp_path / "repo", backend="onnxruntime", name="ham")
    record_in_run(result)
    report = verify_manifest(copy)
    assert report.passed and report.repositories and all(state == "intact" for _, state, _ in report.repositories)
    served = tmp_path / "repo" / "ham" / "1" / "model.onnx"
    data = bytearray(served.read_bytes())
    data[-3] ^= 0xFF
    served.write_bytes(bytes(data))
    report = verify_manifest(copy)
    assert not report.passed
    assert [state for target, state, _ in report.repositories if target.endswith("1/model.onnx")] == ["altered"]
