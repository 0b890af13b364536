"""Run-level ONNX export and verification (`mmexport fold RUN --to onnx`, `verify --backend onnx`)."""

import json
import shutil
import subprocess
import sys

import onnx
import pytest

from mmexport.errors import RunDirError, VerificationError
from mmexport.fileio import sha256_file
from mmexport.torchside.train import train
from mmexport import artifacts
from mmexport.runs.verify import verify_artifacts
from mmexport.runs.manifest import RunDir
from mmexport.torchside.operations import export_comparison, export_onnx_run

ONNX_FILES = {p: artifacts.onnx_artifact(p).filename for p in artifacts.PRECISIONS}
from tests.torchside.test_train import config


@pytest.fixture(scope="module")
def run(tmp_path_factory, resnet18_sources):
    # lpft-a learns a usable classifier in one epoch, which int8's accuracy policy needs
    return train(config(resnet18_sources, tmp_path_factory.mktemp("export") / "run", finetune_epochs=1, merge_epochs=2))


@pytest.fixture()
def run_copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_fp32_and_fp16_exports_are_verified_and_recorded(run_copy):
    # The run's reference holds 16 held-out images: fp32 (every sample must agree) passes; fp16's 99 % floor is
    # judged by the 95 % Wilson lower bound, which 16 of 16 (85.5 %) cannot clear -- the honest verdict is a
    # failure naming the N it needs, published only with --allow-unverified.
    with pytest.raises(VerificationError, match=r"N=16 labelled images cannot show ≥ 99.0% .* judge on ≥ 268"):
        export_onnx_run(run_copy, "fp16", samples=8)
    assert not (run_copy / ONNX_FILES["fp16"]).exists()
    results = export_onnx_run(run_copy, "fp16", samples=8, allow_unverified=True)
    assert set(results) == {"fp16"}  # the fp32 export, made first by the refused call, is reused
    manifest = json.loads((run_copy / "manifest.json").read_text())
    for precision in ("fp32", "fp16"):
        name = ONNX_FILES[precision]
        entry = manifest["outputs"][name]
        assert entry["sha256"] == sha256_file(run_copy / name) and entry["precision"] == precision
    assert manifest["outputs"][ONNX_FILES["fp32"]]["verified"] is True
    assert manifest["outputs"][ONNX_FILES["fp16"]]["verified"] is False
    report = results["fp16"].report
    names = [s.name for s in report.input_sets]
    assert "random (fp16 arithmetic emulated)" in names  # the CPU provider alone never computes in fp16
    for input_set in report.input_sets:  # only the N of the labelled sets failed; the numbers themselves passed
        stats = input_set.outputs["logits"]
        assert stats.top1_rule == ("bound" if input_set.name.startswith("data:") else "observed")
        assert stats.passed == (stats.top1_rule == "observed"), stats.failures
        assert stats.elements_out_of_tolerance == 0 and stats.top1_agreed == stats.n_samples
    checks = [v for v in manifest["verification"] if v["artifact"] in ONNX_FILES.values()]
    assert {c["tolerance"]["name"] for c in checks} == {"fp32", "fp16"}
    assert any(s["name"].startswith("data:") for c in checks for s in c["input_sets"])
    metadata = {p.key: p.value for p in onnx.load(run_copy / "model.onnx").metadata_props}
    assert metadata["weights_sha256"] == manifest["outputs"]["model.safetensors"]["sha256"]
    assert not list(run_copy.glob(".*.tmp"))


def test_int8_export_calibrates_and_is_judged_on_labelled_data(run_copy):
    # 16 held-out images cannot show int8's 99 % floor at 95 % confidence: refused, nothing published, and the
    # accuracy-aware search does not run (no choice of float layers changes N). Passing int8 on enough
    # images: tests/convert/test_export_onnx.py.
    with pytest.raises(VerificationError, match=r"N=16 labelled images cannot show .* judge on ≥ 268") as refused:
        export_onnx_run(run_copy, "int8", samples=8, calib_images=32)
    assert "too few to show" in str(refused.value)  # the search's reason, as the hint
    assert not (run_copy / "model.int8.onnx").exists()
    results = export_onnx_run(run_copy, "int8", samples=8, calib_images=32, allow_unverified=True)
    report = results["int8"].report
    assert report.tolerance.name == "int8" and all(s.name.startswith("data:") for s in report.input_sets)
    assert [s.outputs["logits"].top1_rule for s in report.input_sets] == ["bound"]
    model = onnx.load(run_copy / "model.int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    recipe = json.loads({p.key: p.value for p in model.metadata_props}["int8_recipe"])
    assert recipe["float_nodes"] == [] and recipe["calibration"] == "minmax"
    assert len(results["int8"].facts.int8_search.attempts) == 1  # judged once, not searched


def test_failed_verification_publishes_nothing(run_copy, monkeypatch):
    import mmexport.runtime.tolerances as onnx_module
    from mmexport.runtime.tolerances import Tolerance

    strict = Tolerance("fp32", "impossible", 0.0, 0.0, 1.0)
    monkeypatch.setitem(onnx_module.TOLERANCES, "fp32", strict)
    with pytest.raises(VerificationError, match="nothing published"):
        export_onnx_run(run_copy, "fp32", samples=4)
    assert not (run_copy / "model.onnx").exists() and not list(run_copy.glob(".*.tmp"))
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert "model.onnx" not in manifest["outputs"] and manifest["verification"][-1]["passed"] is False


def test_altered_onnx_is_refused_by_verify(run_copy):
    export_onnx_run(run_copy, "fp32", samples=4)
    path = run_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match="altered"):
        verify_artifacts(run_copy, "onnx", ["fp32"])


def test_calibration_needs_images_not_labels(run_copy):
    # calibration data from a task with other classes is accepted: only its images are used
    try:
        results = export_onnx_run(run_copy, "int8", calib_data="synthetic:pigment?n_train=16&n_val=8", calib_images=16)
    except VerificationError as exc:
        assert "calibration" not in str(exc)  # judged (and possibly refused) by the policy, not refused as data
        return
    metadata = {p.key: p.value for p in onnx.load(results["int8"].path).metadata_props}
    assert metadata["calibration_count"] == "16"


def test_comparison_models_have_two_backbones_and_are_verified(run_copy):
    run = RunDir.open(run_copy)
    made = {kind: export_comparison(run, kind, "fp32") for kind in ("unmerged", "dual")}
    folded = export_onnx_run(run_copy, "fp32", samples=4)["fp32"]
    assert 1.8 < made["unmerged"].size_bytes / folded.size_bytes < 2.3
    assert 1.8 < made["dual"].size_bytes / folded.size_bytes < 2.2
    manifest = json.loads((run_copy / "manifest.json").read_text())
    for kind, artifact in made.items():
        assert artifact.report is not None and artifact.report.passed
        assert manifest["outputs"][artifact.name]["verified"] is True
        assert any(v["artifact"] == artifact.name and v["passed"] for v in manifest["verification"])


def test_cli_fold_to_onnx_and_verify(run_copy):
    env_cmd = [sys.executable, "-m", "mmexport"]
    result = subprocess.run(env_cmd + ["fold", str(run_copy), "--to", "onnx"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pass" in result.stdout
    result = subprocess.run(env_cmd + ["verify", str(run_copy), "--backend", "torch", "--backend", "onnx"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verification passed" in result.stdout
    result = subprocess.run(env_cmd + ["verify", str(run_copy), "--backend", "trt"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "trt" in result.stderr


def test_allow_unverified_publishes_marked_and_loaders_refuse_it(run_copy, monkeypatch, tmp_path):
    import mmexport.runtime.tolerances as policy
    from mmexport import runtime
    from mmexport.errors import CheckpointError, MMExportError
    from mmexport.runtime.tolerances import Tolerance

    monkeypatch.setitem(policy.TOLERANCES, "fp32", Tolerance("fp32", "impossible", 0.0, 0.0, 1.0))
    result = export_onnx_run(run_copy, "fp32", samples=4, allow_unverified=True)["fp32"]
    assert not result.report.passed and result.path.exists()
    entry = json.loads((run_copy / "manifest.json").read_text())["outputs"]["model.onnx"]
    assert entry["verified"] is False and "exceed" in entry["unverified_reason"]
    assert entry["published_unverified_by"].endswith("--allow-unverified")
    metadata = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert "exceed" in metadata["mmexport_unverified"]
    assert entry["sha256"] == sha256_file(result.path)  # the hash is of the marked file
    with pytest.raises(CheckpointError, match="without passing its verification"):
        runtime.load(result.path)
    with runtime.load(result.path, allow_unverified=True) as predictor:
        assert predictor.info.arch == "resnet18"
    from mmexport.serving.triton import export_repository

    with pytest.raises(MMExportError, match="verified"):
        export_repository(run_copy, tmp_path / "repo", backend="onnxruntime")
