"""Every deployable artifact says what it is and where it came from, read with nothing but onnx or safetensors."""

from __future__ import annotations

import hashlib
import json
import shutil

import onnx
import pytest
import safetensors

from mmexport.config import METHODS, TrainConfig
from mmexport.errors import MMExportError
from mmexport.runs.provenance import (
    embedded_differences,
    method_kind,
    read_embedded,
    verify_manifest,
)

DATA = "synthetic:target?n_train=16&n_val=8&n_test=8"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, resnet18_sources):
    """A MedMerge run and a plain fine-tune of source A, each with its fp32 ONNX (and the merge with fp16)."""
    from mmexport.torchside.operations import export_onnx_run
    from mmexport.torchside.train import train

    root = tmp_path_factory.mktemp("provenance")
    made = {}
    for method, source_b in (("medmerge", str(resnet18_sources[1])), ("finetune-a", "")):
        made[method] = run = train(TrainConfig(
            arch="resnet18", source_a=str(resnet18_sources[0]), source_b=source_b, data=DATA, out=str(root / method),
            method=method, merge_epochs=1, finetune_epochs=0, batch_size=8, image_size=32, device="cpu",
            verify_samples=4))
        export_onnx_run(run, "fp32")
    # fp16 judged on 8 held-out images may or may not hold its policy: published either way, its record embedded
    export_onnx_run(made["medmerge"], "fp16", allow_unverified=True)
    return made


def _onnx_metadata(path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}  # a plain onnx reader


def _safetensors_metadata(path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        return json.loads(handle.metadata()["mmexport"])  # the model file packs its fields as one JSON entry


def _manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_every_method_gets_a_true_kind_and_description():
    for method in METHODS:
        for finetune_epochs in (0, 3):
            name, kind, description = method_kind({"method": method, "arch": "resnet50", "finetune_epochs": finetune_epochs})
            assert name == method and "resnet50" in description
            assert ("MedMerge" in description.replace("not MedMerge", "")) == (method == "medmerge"), description
            if method in ("medmerge", "average"):
                assert kind == "folded" and "folded" in description
            else:
                assert "no merge" in description and "source " + method[-1].upper() in description
                assert kind == ("probed" if method.startswith("lpft") and not finetune_epochs else "finetuned")


def test_a_merged_runs_onnx_names_medmerge(runs):
    path = runs["medmerge"] / "model.onnx"
    metadata = _onnx_metadata(path)
    assert (metadata["method"], metadata["model_kind"]) == ("medmerge", "folded")
    assert metadata["model_description"].startswith("MedMerge merge of sources A and B")
    assert onnx.load(str(path)).doc_string.startswith("MedMerge merge")


def test_a_plain_finetune_says_what_it_is(runs):
    path = runs["finetune-a"] / "model.onnx"
    metadata = _onnx_metadata(path)
    assert (metadata["method"], metadata["model_kind"]) == ("finetune-a", "finetuned")
    for text in (metadata["model_description"], onnx.load(str(path)).doc_string, metadata["provenance"]):
        assert "MedMerge" not in text and "folded" not in text
    assert "from source A alone, fine-tuned (no merge)" in metadata["model_description"]
    assert list(json.loads(metadata["provenance"])["sources"]) == ["source_a"]  # B was never read
    safetensors_fields = _safetensors_metadata(runs["finetune-a"] / "model.safetensors")
    assert (safetensors_fields["method"], safetensors_fields["model_kind"]) == ("finetune-a", "finetuned")


@pytest.mark.parametrize("method", ["medmerge", "finetune-a"])
def test_every_artifacts_embedded_provenance_matches_its_manifest(runs, method):
    run = runs[method]
    manifest = _manifest(run)
    deployable = [name for name in ("model.safetensors", "model.onnx", "model.fp16.onnx") if name in manifest["outputs"]]
    assert deployable[:2] == ["model.safetensors", "model.onnx"]
    for name in deployable:
        metadata = _safetensors_metadata(run / name) if name.endswith(".safetensors") else _onnx_metadata(run / name)
        provenance, check = json.loads(metadata["provenance"]), json.loads(metadata["verification"])
        assert metadata["run_id"] == provenance["run_id"] == manifest["run_id"]
        assert provenance["method"] == metadata["method"] == manifest["training"]["method"] == method
        assert provenance["sources"] == {
            key: {"sha256": value["sha256"], "format": value["format"], "name": value["spec"].rsplit("/", 1)[-1]}
            for key, value in manifest["inputs"].items() if key.startswith("source_")}
        assert provenance["data"]["fingerprint"] == manifest["inputs"]["data"].get("fingerprint")
        assert provenance["data"]["spec"] == DATA  # synthetic data: its spec is its identity
        test = manifest["training"]["final"]["test"]
        assert provenance["metrics"]["test"] == {k: test[k] for k in ("accuracy", "macro_f1", "num_samples")}
        assert check["artifact"] == name and check["format"] == "mmexport-verification/1"
        if name.endswith(".onnx"):
            entry = manifest["outputs"][name]
            record = [r for r in manifest["verification"] if r["artifact"] == name][-1]
            assert check["passed"] is entry["verified"] is record["passed"]
            assert check["tolerance"]["name"] == record["tolerance"]["name"] == entry["precision"]
            assert check["reference"] == {"file": "reference.npz", "sha256": manifest["outputs"]["reference.npz"]["sha256"]}
            graph = hashlib.sha256(onnx.load(str(run / name)).graph.SerializeToString()).hexdigest()
            assert check["graph_sha256"] == entry["graph_sha256"] == graph  # the graph checked is the graph shipped
            assert [s["n_samples"] for s in check["input_sets"]] == [
                s["outputs"]["logits"]["n_samples"] for s in record["input_sets"]]
            assert metadata.get("mmexport_unverified") is None or not check["passed"]
        else:
            assert check["role"] == "reference"  # the network whose outputs every other artifact is judged against
    report = verify_manifest(run)
    assert report.passed and [state for _, state, _ in report.embedded] == ["matches"] * len(deployable)


def test_an_artifact_found_alone_is_traced_and_a_doctored_one_is_not(runs, tmp_path):
    manifest = _manifest(runs["medmerge"])
    alone = tmp_path / "model.onnx"
    shutil.copyfile(runs["medmerge"] / "model.onnx", alone)
    assert embedded_differences(read_embedded(alone), manifest, "model.onnx") == []
    # the same file against the other run: every identity differs
    other = embedded_differences(read_embedded(alone), _manifest(runs["finetune-a"]), "model.onnx")
    assert any("run_id" in p for p in other) and any("method" in p for p in other)
    # weights changed, metadata kept: the verification record names another graph
    model = onnx.load(str(alone))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = bytearray(weight.raw_data)
    data[0] ^= 1
    weight.raw_data = bytes(data)
    onnx.save(model, str(alone))
    assert any("graph_sha256" in p for p in embedded_differences(read_embedded(alone), manifest, "model.onnx"))


def test_user_metadata_may_not_forge_the_provenance():
    pytest.importorskip("torch")
    from mmexport.torchside.onnx_export import _merge_extra

    for key in ("run_id", "provenance", "verification", "method", "model_kind"):
        with pytest.raises(MMExportError, match=f"may not override {key}"):
            _merge_extra({}, {key: "forged"})
