"""Verification judges an artifact *as deployed*: the model description it carries must be the run's.

A "forged run" below is what anyone with write access to a run can make: a file altered and its
sha256 rewritten in ``manifest.json``, so every hash check passes. The stored reference inputs are
already preprocessed, so an altered ``std`` or class list passes the numbers; only comparing the
description the runtime reads from the file with the run's record catches it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest

from mmexport.errors import CheckpointError, MMExportError, VerificationError
from mmexport.runs.manifest import RunDir
from mmexport.runs.verify import describes_run, run_model_info, verify_artifacts
from mmexport.runtime.check import check_model_info, model_info_differences
from mmexport.runtime.modelinfo import ModelInfo
from tests.conftest import one_line, train_exported_run, tree_hashes


@pytest.fixture(scope="module")
def run(tmp_path_factory, resnet18_sources):
    root = tmp_path_factory.mktemp("deployed")
    return train_exported_run(root / "run", resnet18_sources, image_size=32)


@pytest.fixture()
def copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


def rewrite_hash(run: Path, name: str) -> None:
    """Forge the run: record the altered file's sha256 and size, as an attacker with write access can."""
    manifest = json.loads((run / "manifest.json").read_text())
    data = (run / name).read_bytes()
    manifest["outputs"][name].update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    (run / "manifest.json").write_text(json.dumps(manifest))


def forge_onnx(run: Path, edit, name: str = "model.onnx") -> None:
    """Edit ``name``'s metadata_props (a dict of str -> str) with ``edit``, then forge its hash."""
    model = onnx.load(str(run / name))
    props = {p.key: p.value for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(run / name))
    rewrite_hash(run, name)


def _set_json(key: str, value) -> callable:
    return lambda props: props.__setitem__(key, json.dumps(value))


def _preprocessing(**changes) -> callable:
    def edit(props):
        block = json.loads(props["preprocessing"])
        block.update(changes)
        props["preprocessing"] = json.dumps(block)
    return edit


def _both(*edits) -> callable:
    def edit(props):
        for one in edits:
            one(props)
    return edit


FORGERIES = {
    # field the failure must name -> how the file's description is altered
    "classes": lambda p: p.__setitem__("classes", json.dumps(list(reversed(json.loads(p["classes"]))))),
    "preprocessing.std": _both(_preprocessing(std=[0.5, 0.5, 0.5]), _set_json("std", [0.5, 0.5, 0.5])),
    "preprocessing.mean": _both(_preprocessing(mean=[0.0, 0.0, 0.0]), _set_json("mean", [0.0, 0.0, 0.0])),
    "preprocessing.scale": _preprocessing(scale=1.0),
    "preprocessing.resize": _preprocessing(resize="shorter_side", resize_size=[37], crop="center", crop_size=[32, 32]),
    "arch": lambda p: p.__setitem__("arch", "resnet50"),
    "weights_sha256": lambda p: p.__setitem__("weights_sha256", "0" * 64),
    "precision": lambda p: p.__setitem__("precision", "fp16"),
}


@pytest.mark.parametrize("field", list(FORGERIES))
def test_forged_description_in_model_onnx_fails_naming_the_field(copy, field):
    forge_onnx(copy, FORGERIES[field])
    before = tree_hashes(copy)
    reports = verify_artifacts(copy, "onnx")
    assert len(reports) == 1 and not reports[0].passed
    reason = "; ".join(reports[0].failures())
    assert f"embedded {field} " in reason and "differs from the run's" in reason, reason
    assert "\n" not in reason
    # the failed check is recorded (a later `inspect` shows model.onnx FAILED, and so does the model card, which
    # follows the manifest); nothing else changes
    after = tree_hashes(copy)
    assert {k for k in before if before[k] != after.get(k)} == {"manifest.json", "model_card.md"}
    assert "| `model.onnx` |" in (card := (copy / "model_card.md").read_text()) and "**FAILED**" in card
    record = json.loads((copy / "manifest.json").read_text())["verification"][-1]
    assert record["artifact"] == "model.onnx" and record["passed"] is False and field in " ".join(record["notes"])


def test_the_reported_values_are_the_forged_and_the_recorded_ones(copy):
    forge_onnx(copy, FORGERIES["preprocessing.std"])
    reason = verify_artifacts(copy, "onnx")[0].failures()[0]
    assert "model.onnx: embedded std [0.5, 0.5, 0.5] differs from the run's [0.229, 0.224, 0.225]" in reason
    assert "embedded preprocessing.std [0.5, 0.5, 0.5] differs from the run's [0.229, 0.224, 0.225]" in reason


def test_an_unforged_run_passes_and_reads_the_runs_record(run):
    run_dir = RunDir.open(run)
    recorded = run_model_info(run_dir)
    assert recorded.classes and recorded.image_size == 32
    metadata = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert describes_run(run_dir, "model.onnx", metadata).classes == recorded.classes


@pytest.mark.parametrize("key, value", [("image_size", "not a number"), ("channel_order", "BGR"),
                                        ("classes", '"abcde"'), ("preprocessing", "[" * 100 + "]" * 100)])
def test_a_malformed_embedded_description_is_one_line_not_a_pass(copy, key, value):
    forge_onnx(copy, lambda p: p.__setitem__(key, value))
    with pytest.raises(CheckpointError) as info:
        verify_artifacts(copy, "onnx")
    assert "model.onnx" in one_line(info)


def test_manifest_model_block_that_disagrees_with_the_weights_file_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["classes"] = list(reversed(manifest["model"]["classes"]))  # what inspect would show
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = tree_hashes(copy)
    with pytest.raises(VerificationError) as info:
        verify_artifacts(copy, "onnx")
    message = one_line(info)
    assert "manifest.json (model)" in message and "classes" in message
    assert tree_hashes(copy) == before


def _record_output(run: Path, name: str, kind: str) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    template = dict(manifest["outputs"]["model.onnx"])
    data = (run / name).read_bytes()
    template.update(kind=kind, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    manifest["outputs"][name] = template
    (run / "manifest.json").write_text(json.dumps(manifest))


def test_engine_sidecar_description_is_judged_by_the_same_function(copy):
    """A TensorRT engine carries its description in the sidecar: a forged one fails before any engine is
    loaded (so this holds on a host without TensorRT); the run's own passes that check and only then
    meets the loader (which, without TensorRT here, refuses in one line)."""
    from tests.tensorrt_fakes import write_engine

    embedded = {p.key: p.value for p in onnx.load(str(copy / "model.onnx")).metadata_props}
    own = {**embedded, "precision": "fp16"}
    forged = {**own, "classes": json.dumps(list(reversed(json.loads(own["classes"]))))}
    write_engine(copy, model_metadata=forged, image_size=32)
    _record_output(copy, "model.fp16.plan", "engine")
    _record_output(copy, "model.fp16.plan.json", "engine-sidecar")
    reports = verify_artifacts(copy, "trt")
    assert not reports[0].passed and "model.fp16.plan: embedded classes" in reports[0].failures()[0]

    write_engine(copy, model_metadata=own, image_size=32)
    _record_output(copy, "model.fp16.plan", "engine")
    _record_output(copy, "model.fp16.plan.json", "engine-sidecar")
    with pytest.raises(MMExportError) as info:  # past the description: the engine loader's own refusal
        verify_artifacts(copy, "trt")
    assert "embedded" not in one_line(info)


def test_fp16_export_from_a_forged_fp32_file_is_not_published(copy):
    """Export paths call the same check: fp16 is converted from model.onnx, so a forged model.onnx
    would carry its description into model.fp16.onnx; the export refuses and publishes nothing."""
    from mmexport.torchside.operations import export_onnx_run

    forge_onnx(copy, FORGERIES["classes"])
    with pytest.raises(VerificationError) as info:
        export_onnx_run(copy, "fp16")
    assert "embedded classes" in one_line(info)
    assert not (copy / "model.fp16.onnx").exists()
    assert "model.fp16.onnx" not in json.loads((copy / "manifest.json").read_text())["outputs"]


def _info(**changes) -> ModelInfo:
    base = {"arch": "resnet18", "classes": ("a", "b"), "image_size": 16, "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25)}
    return ModelInfo(**{**base, **changes})


def test_model_info_comparison_is_pure_and_complete():
    assert model_info_differences(_info(), _info()) == []
    check_model_info(_info(), _info(), "x")  # equal: no error
    fields = [name for name, _, _ in model_info_differences(_info(classes=("b", "a"), std=(0.5, 0.5, 0.5)), _info())]
    assert fields == ["classes", "std", "preprocessing.std"]
    assert [n for n, _, _ in model_info_differences(_info(), _info(), precision="int8")] == ["precision"]
    # weights_sha256 is judged only where the artifact records one
    assert model_info_differences(_info(), _info(), weights_sha256="f" * 64) == []
    assert model_info_differences(_info(weights_sha256="e" * 64), _info(), weights_sha256="f" * 64)[0][0] == "weights_sha256"


def test_model_info_failure_is_one_line_whatever_the_values():
    forged = _info()
    object.__setattr__(forged, "classes", ("x\n\x1b[2Jfake line", "y\u202e" * 200))  # past any validation
    with pytest.raises(VerificationError) as info:
        check_model_info(forged, _info(), "model.onnx")
    message = one_line(info)
    assert "\x1b" not in message and "\u202e" not in message and len(message) < 600


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_triton_export_of_a_forged_description_is_refused_and_writes_nothing(copy, tmp_path, backend):
    """Before: `fold --to triton` wrote labels.txt from the file's (reversed) classes."""
    from mmexport.serving.triton import export_repository

    forge_onnx(copy, FORGERIES["classes"])
    before = tree_hashes(copy)
    with pytest.raises(VerificationError) as excinfo:
        export_repository(copy, tmp_path / "repo", backend=backend, name="m", preprocess=backend == "python")
    assert "model.onnx: embedded classes" in one_line(excinfo) and "differs from the run's" in one_line(excinfo)
    assert not (tmp_path / "repo" / "m").exists() and tree_hashes(copy) == before
