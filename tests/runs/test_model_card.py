"""The run's model card: generated from the manifest on every save, hashed like every output, shipped to Triton."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from mmexport.errors import RunDirError
from mmexport.fileio import sha256_file
from mmexport.runs.inspect import inspect_run
from mmexport.runs.manifest import RunDir
from mmexport.runs.model_card import (
    MODEL_CARD_KIND,
    MODEL_CARD_NAME,
    render_model_card,
    write_model_card,
)
from mmexport.runs.provenance import verify_manifest
from mmexport.runtime.report import NOT_FOR_CLINICAL_USE
from tests.conftest import one_line, train_exported_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, resnet18_sources) -> Path:
    """One trained run with its fp32 ONNX, shared by the module; tests that change a run change a copy."""
    return train_exported_run(tmp_path_factory.mktemp("card") / "run", resnet18_sources)


def manifest_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def copy_run(run: Path, where: Path) -> Path:
    target = where / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("*.lock"))
    return target


def test_the_card_is_the_render_of_the_saved_manifest_and_is_hashed_like_every_output(trained):
    manifest = manifest_of(trained)
    card = (trained / MODEL_CARD_NAME).read_text(encoding="utf-8")
    entry = manifest["outputs"][MODEL_CARD_NAME]
    assert entry["kind"] == MODEL_CARD_KIND and entry["sha256"] == sha256_file(trained / MODEL_CARD_NAME)
    assert entry["size_bytes"] == (trained / MODEL_CARD_NAME).stat().st_size
    assert render_model_card(manifest, trained) == card  # generated, not written by hand
    assert entry["sha256"] not in card  # a card cannot hold its own hash


def test_the_card_names_the_runs_real_hashes_data_and_metrics(trained):
    manifest = manifest_of(trained)
    card = (trained / MODEL_CARD_NAME).read_text(encoding="utf-8")
    for key in ("source_a", "source_b"):
        assert manifest["inputs"][key]["sha256"] in card
    for name in ("model.safetensors", "model.onnx", "reference.npz", "unmerged.safetensors"):
        assert manifest["outputs"][name]["sha256"] in card
    assert manifest["inputs"]["data"]["source"] in card
    assert "Not for clinical use" in card and NOT_FOR_CLINICAL_USE in card  # no intended use was stated
    test = manifest["training"]["final"]["test"]
    assert f"test ({test['num_samples']} images): accuracy {test['accuracy']:.3f}" in card
    per_class = test["per_class"]
    for index, name in enumerate(manifest["model"]["classes"]):
        row = (f"| {name} | {per_class['precision'][index]:.3f} | {per_class['recall'][index]:.3f} | "
               f"{per_class['f1'][index]:.3f} | {int(per_class['support'][index])} |")
        assert row in card, row
    onnx_check = [r for r in manifest["verification"] if r["artifact"] == "model.onnx"][-1]
    assert onnx_check["passed"] and f"| `{onnx_check['tolerance']['name']}` | passed" in card
    assert "64×64 px" in card and str(manifest["model"]["preprocessing"]["mean"]) in card
    assert "The target data is synthetic" in card and "Small test set (16 images)" in card
    assert "## Comparison with single-source baselines\n\nNot run" in card
    assert inspect_run(trained).model_card == str(trained / MODEL_CARD_NAME)
    # the lineage check made before training, in the words train and inspect print
    verdict = manifest["training"]["compatibility"]["verdict"]
    assert f"What the sources share, checked before training (docs/lineage.md):\n\n- {verdict}" in card


def test_the_card_follows_the_run_is_rehashed_by_verify_and_a_hand_edit_is_caught(trained, tmp_path):
    from mmexport.torchside.operations import export_onnx_run

    run = copy_run(trained, tmp_path)
    before = (run / MODEL_CARD_NAME).read_text(encoding="utf-8")
    assert "model.fp16.onnx" not in before
    # a new artifact (published whatever its check says): the save that records it rewrites the card
    export_onnx_run(run, "fp16", allow_unverified=True)
    manifest = manifest_of(run)
    after = (run / MODEL_CARD_NAME).read_text(encoding="utf-8")
    fp16 = manifest["outputs"]["model.fp16.onnx"]
    assert fp16["sha256"] in after
    if fp16["verified"]:
        assert "| `fp16` | passed" in after
    else:  # 16 test images may be too few for the fp16 policy: the card says so, and warns against deploying it
        assert "| `fp16` | **FAILED**" in after and "published unverified" in after
        assert "`model.fp16.onnx` failed verification and was published anyway" in after
    assert manifest["outputs"][MODEL_CARD_NAME]["sha256"] == sha256_file(run / MODEL_CARD_NAME)
    assert render_model_card(manifest, run) == after

    report = verify_manifest(run)
    card_state = {f.name: f.state for f in report.files}[MODEL_CARD_NAME]
    assert card_state == "intact" and report.passed

    (run / MODEL_CARD_NAME).write_text(after.replace("Not for clinical use", "Cleared for clinical use"), encoding="utf-8")
    report = verify_manifest(run)
    assert {f.name: f.state for f in report.files}[MODEL_CARD_NAME] == "altered" and not report.passed

    with RunDir.writer(run, "test") as writer:  # the next save renders the card again from the manifest
        assert write_model_card(writer) == run / MODEL_CARD_NAME
    assert (run / MODEL_CARD_NAME).read_text(encoding="utf-8") == after and verify_manifest(run).passed


def test_the_card_travels_into_the_triton_version_and_is_hashed_there(trained, tmp_path):
    from mmexport.serving.triton import export_repository, record_in_run
    from mmexport.serving.version_record import check_version_files, read_version_record

    run = copy_run(trained, tmp_path)
    card_at_export = (run / MODEL_CARD_NAME).read_bytes()
    result = export_repository(run, tmp_path / "repo")
    shipped = result.version_dir / MODEL_CARD_NAME
    assert shipped.read_bytes() == card_at_export
    assert read_version_record(result.version_dir)["files"][MODEL_CARD_NAME] == sha256_file(shipped)
    assert check_version_files(result.version_dir) == []

    record_in_run(result)  # the run records the repository: the run's card now names it, the shipped copy stays
    manifest = manifest_of(run)
    assert f"{result.version}/{MODEL_CARD_NAME}" in manifest["triton_repositories"][-1]["files"]
    assert str(tmp_path / "repo") in (run / MODEL_CARD_NAME).read_text(encoding="utf-8")
    assert verify_manifest(run).passed

    shipped.write_text("edited\n", encoding="utf-8")
    assert any(MODEL_CARD_NAME in problem for problem in check_version_files(result.version_dir))
    states = {path: state for path, state, _ in verify_manifest(run).repositories}
    assert states[str(shipped)] == "altered"


def test_an_altered_card_in_the_run_is_not_exported(trained, tmp_path):
    from mmexport.serving.triton import export_repository

    run = copy_run(trained, tmp_path)
    (run / MODEL_CARD_NAME).write_text("hand written\n", encoding="utf-8")
    with pytest.raises(RunDirError) as caught:
        export_repository(run, tmp_path / "repo")
    assert MODEL_CARD_NAME in one_line(caught) and "altered" in one_line(caught)
    assert not (tmp_path / "repo" / "run").exists()


def _fake_runs(root: Path, method: str, test_f1: dict[int, float]) -> dict[int, Path]:
    runs = {}
    for seed, f1 in test_f1.items():
        run = RunDir.create(root / f"{method}-{seed}")
        run.manifest["training"] = {"method": method, "final": {"val": {"accuracy": 0.5, "macro_f1": 0.4},
                                                                  "test": {"accuracy": f1 + 0.1, "macro_f1": f1}}}
        run.save()
        runs[seed] = run.publish()
    return runs


def test_the_compare_table_and_its_verdict_become_the_cards_limitations(trained, tmp_path):
    from mmexport.torchside.comparison import table_from_runs

    table = table_from_runs({"medmerge": _fake_runs(tmp_path, "medmerge", {0: 0.70, 1: 0.60}),
                             "finetune-a": _fake_runs(tmp_path, "finetune-a", {0: 0.60, 1: 0.66}),
                             "finetune-b": _fake_runs(tmp_path, "finetune-b", {0: 0.40, 1: 0.42})})
    assert "inside the seed spread" in table.verdict
    manifest = manifest_of(trained)
    manifest["comparison"] = {k: v for k, v in table.as_dict().items() if k != "format"}
    card = render_model_card(manifest, trained)
    assert "| `medmerge` (this run) | 0.650 ± 0.071 |" in card
    assert "| `finetune-a` | 0.630 ± 0.042 |" in card
    assert f"Verdict: {table.verdict}" in card
    assert "The merge ties finetune-a on this data" in card

    worse = copy.deepcopy(manifest)
    worse["comparison"]["verdict"] = "medmerge -0.200 ± 0.010 test macro-F1 vs finetune-a: the merge did not pay; use finetune-a"
    assert "The merge scored below finetune-a on this data" in render_model_card(worse)


def test_per_class_scores_come_from_the_confusion_matrix_when_only_it_is_recorded(trained):
    manifest = manifest_of(trained)
    test = manifest["training"]["final"]["test"]
    recorded = test.pop("per_class")
    card = render_model_card(manifest)
    assert "Per class on test (computed from the recorded confusion matrix)" in card
    for index, name in enumerate(manifest["model"]["classes"]):
        assert f"| {name} | {recorded['precision'][index]:.3f} | {recorded['recall'][index]:.3f} |" in card
    test.pop("confusion_matrix")
    assert "Per-class precision and recall on test: not recorded." in render_model_card(manifest)


def test_a_refused_artifact_and_an_exported_bundle_are_named(trained):
    manifest = manifest_of(trained)
    assert "Checked and refused" not in render_model_card(manifest)
    refused = copy.deepcopy(manifest["verification"][-1])
    refused.update(artifact="model.int8.onnx", passed=False, tolerance={**refused["tolerance"], "name": "int8"})
    manifest["verification"].append(refused)
    manifest["monai_bundles"] = [{"path": "/srv/b", "bundle": "/srv/b", "format": "folder", "files": {}, "verified": True}]
    card = render_model_card(manifest)
    assert "- `model.int8.onnx`: failed the `int8` policy" in card
    assert "- `/srv/b` (folder), models verified: yes" in card
    manifest["verification"].append({**refused, "passed": True})  # a later check that passed: no longer refused
    assert "model.int8.onnx`: failed" not in render_model_card(manifest)


def test_a_stated_intended_use_replaces_the_default(trained):
    manifest = manifest_of(trained)
    manifest["config"]["intended_use"] = "Research on dermoscopy triage | second line"
    card = render_model_card(manifest)
    assert "Stated when the run was trained: Research on dermoscopy triage \\| second line" in card
    assert NOT_FOR_CLINICAL_USE not in card


def test_a_forged_manifest_renders_without_failing(trained):
    manifest = manifest_of(trained)
    forged = copy.deepcopy(manifest)
    forged["training"]["final"]["test"] = {"accuracy": "high", "macro_f1": None, "num_samples": -3,
                                           "per_class": {"precision": "x"}, "confusion_matrix": [[1, "a"]]}
    forged["model"]["classes"] = ["a\nb", "c|d`"]
    forged["model"]["preprocessing"] = {"format": "bogus"}
    forged["inputs"]["source_a"] = {"spec": "x\u2028y", "sha256": 7}
    forged["verification"] = [{"artifact": "model.onnx", "passed": True, "tolerance": {}, "input_sets": [{"outputs": 3}]}]
    forged["comparison"] = {"methods": [{"scores": {"test_macro_f1": {"mean": "?"}}}], "verdict": 5}
    card = render_model_card(forged)
    assert "2 classes: a\\\\nb, c\\|d\\`\n" in card  # escaped: no name can break a line, a table or code
    assert "test (? images): accuracy ?, macro-F1 ?" in card and "Per-class precision and recall on test: not recorded" in card
    assert "The recorded block is not readable" in card
    assert "\u2028" not in card


def test_a_file_in_the_way_of_the_card_is_never_overwritten(tmp_path):
    run = RunDir.create(tmp_path / "run")
    (run.path / MODEL_CARD_NAME).write_text("my notes\n", encoding="utf-8")
    run.manifest["model"] = {"arch": "resnet18", "classes": ["a", "b"]}
    with pytest.raises(RunDirError) as caught:
        run.save()
    assert "did not make" in one_line(caught)
    assert (run.path / MODEL_CARD_NAME).read_text(encoding="utf-8") == "my notes\n"
    (run.path / MODEL_CARD_NAME).unlink()
    run.save()
    assert run.manifest["outputs"][MODEL_CARD_NAME]["sha256"] == sha256_file(run.path / MODEL_CARD_NAME)
