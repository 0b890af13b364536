"""``fold --to monai-bundle``: a MONAI Bundle checked with MONAI's own tools, on one trained run.

The run is trained on PNG files of varied, non-square sizes (so the recorded resize and crop
matter); MONAI's ``verify_metadata`` runs against the schema file the MONAI project publishes
(``tests/data/monai/``, see its README: it cannot be downloaded here), ``verify_net_in_out`` on
the written configs, and the bundle's own inference workflow through ``monai.bundle.run``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import one_line, tree_hashes
from tests.runtime.test_preprocessing import _image_folder

monai = pytest.importorskip("monai", reason="the monai extra (pip install 'mmexport[monai]') is not installed")

from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.bundle import run as monai_run

from mmexport.errors import MMExportError, RunDirError
from mmexport.runs.provenance import verify_manifest
from mmexport.torchside import monai_bundle
from mmexport.torchside.monai_bundle import export_monai_bundle

SCHEMA = Path(__file__).parents[1] / "data" / "monai" / "meta_schema_20240725.json"
TREE = {"LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
        "models/model.onnx", "docs/README.md"}
REQUIRED = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
            "description", "authors", "copyright", "changelog")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, resnet18_sources):
    """One merged run trained on image files, its fp32 ONNX, and one bundle folder outside the run."""
    from mmexport.config import TrainConfig
    from mmexport.torchside.operations import export_onnx_run
    from mmexport.torchside.train import train

    root = tmp_path_factory.mktemp("monai")
    data = _image_folder(root / "data")
    run = Path(train(TrainConfig(arch="resnet18", source_a=str(resnet18_sources[0]),
                                 source_b=str(resnet18_sources[1]), data=str(data), out=str(root / "run"),
                                 merge_epochs=1, finetune_epochs=1, batch_size=8, image_size=32, device="cpu",
                                 verify_samples=8, lr_head=1e-2)))
    export_onnx_run(run, "fp32")
    license_file = root / "LICENSE.txt"
    license_file.write_text("Apache License 2.0 (test)\n")
    bundle = root / "out" / "bundle"
    bundle.parent.mkdir()
    result = export_monai_bundle(run, bundle, license_file, authors="mmexport tests")
    return run, data, bundle, license_file, result


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_the_bundle_tree_and_metadata_pass_monais_verify_metadata(exported):
    run, _, bundle, license_file, result = exported
    assert set(tree_hashes(bundle)) == TREE
    assert (bundle / "LICENSE").read_bytes() == license_file.read_bytes()
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["schema"].endswith("/" + SCHEMA.name)  # the metadata names the schema shipped here
    schema_sha = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    # MONAI's own check; with the schema in place (and its hash given) download_url reads the local file
    verify_metadata(meta_file=str(bundle / "configs/metadata.json"), filepath=str(SCHEMA), hash_val=schema_sha,
                    hash_type="sha256")
    for key in REQUIRED:
        assert meta[key], key
    manifest = _manifest(run)
    classes = manifest["model"]["classes"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["type"], image["format"], image["num_channels"], image["dtype"]) == ("image", "magnitude", 3, "float32")
    assert image["spatial_shape"] == [32, 32] and "modality" in image and len(image["value_range"]) == 2
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (pred["type"], pred["format"], pred["num_channels"]) == ("probabilities", "classes", len(classes))
    assert pred["channel_def"] == {str(i): name for i, name in enumerate(classes)}
    assert any("2403.11646" in ref and "Almakky" in ref for ref in meta["references"])
    assert meta["intended_use"] and meta["data_source"] and meta["authors"] == "mmexport tests"
    recorded = meta["mmexport"]
    for name in ("model.safetensors", "model.onnx", "reference.npz"):
        assert recorded["run_files"][name] == manifest["outputs"][name]["sha256"]
    for name in ("models/model.pt", "models/model.ts", "models/model.onnx"):
        assert recorded["files"][name] == tree_hashes(bundle)[name]
        assert recorded["verification"][name]["passed"] is True
    assert recorded["monai_verify_net_in_out"] == "passed"
    # the ONNX is the run's verified file, byte for byte
    assert tree_hashes(bundle)["models/model.onnx"] == manifest["outputs"]["model.onnx"]["sha256"]
    assert all(report.passed for report in result.reports.values()) and len(result.reports) == 3
    card = (bundle / "docs/README.md").read_text()
    assert card.strip() and classes[0] in card


def test_verify_net_in_out_and_network_def_is_stock_torchvision(exported):
    import torchvision

    run, _, bundle, _, _ = exported
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
                      config_file=str(bundle / "configs/inference.json"), device="cpu")
    config = json.loads((bundle / "configs/inference.json").read_text())
    manifest = _manifest(run)
    assert config["network_def"] == f"$torchvision.models.resnet18(num_classes={len(manifest['model']['classes'])})"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    network = parser.get_parsed_content("network_def")
    assert type(network) is torchvision.models.ResNet
    state = torch.load(bundle / "models/model.pt", map_location="cpu", weights_only=True)
    assert set(state) == set(network.state_dict())
    network.load_state_dict(state, strict=True)


def test_the_configs_preprocessing_equals_mmexport_runtimes_on_the_image_files(exported):
    from mmexport.runtime.preprocess import Preprocessing, preprocess_image

    run, data, bundle, _, _ = exported
    prep = Preprocessing.from_dict(_manifest(run)["model"]["preprocessing"])
    assert (prep.resize, prep.crop) == ("shorter_side", "center")  # resize and crop are exercised
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    preprocessing = parser.get_parsed_content("preprocessing")
    files = sorted(data.glob("*/*/*.png"))
    assert len(files) == 87 and len({_image_size(f) for f in files}) > 20  # varied, non-square sizes
    for path in files:
        ours = preprocessing({"image": str(path)})["image"]
        assert ours.dtype == torch.float32
        np.testing.assert_array_equal(np.asarray(ours), preprocess_image(str(path), prep))  # exactly equal
    # in-memory pixels (what MONAI Deploy hands over) take the same path
    from PIL import Image

    pixels = np.asarray(Image.open(files[0]).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(preprocessing({"image": pixels})["image"]),
                                  preprocess_image(str(files[0]), prep))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_monai_bundle_run_gives_the_manifests_test_accuracy(exported, tmp_path):
    from mmexport import runtime

    run, data, bundle, _, _ = exported
    manifest = _manifest(run)
    classes = manifest["model"]["classes"]
    files = [str(p) for p in sorted((data / "test").glob("*/*.png"))]
    output = tmp_path / "predictions.csv"
    monai_run(config_file=str(bundle / "configs/inference.json"), meta_file=str(bundle / "configs/metadata.json"),
              bundle_root=str(bundle), input_files=files, output_file=str(output))
    rows = list(csv.DictReader(output.open()))
    assert [row["file"] for row in rows] == files
    predicted = [int(row["class_index"]) for row in rows]
    truth = [classes.index(Path(f).parent.name) for f in files]
    accuracy = float(np.mean(np.asarray(predicted) == np.asarray(truth)))
    assert accuracy == manifest["training"]["final"]["test"]["accuracy"]
    assert len(files) == manifest["training"]["final"]["test"]["num_samples"]
    with runtime.load(run / "model.onnx") as predictor:  # the same predictions, image by image
        assert predicted == predictor.predict(files).indices.tolist()
    probabilities = np.asarray([[float(row[c]) for c in classes] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_model_ts_carries_both_configs_where_monai_deploy_reads_them(exported):
    _, _, bundle, _, _ = exported
    with zipfile.ZipFile(bundle / "models/model.ts") as archive:
        names = archive.namelist()
        meta = json.loads(archive.read(next(n for n in names if n.endswith("extra/metadata.json"))))
        inference = archive.read(next(n for n in names if n.endswith("extra/inference.json")))
    assert inference == (bundle / "configs/inference.json").read_bytes()
    on_disk = json.loads((bundle / "configs/metadata.json").read_text())
    on_disk.pop("mmexport")  # the hashes of the model files: only in configs/metadata.json (model.ts is one of them)
    assert meta == on_disk


def test_an_outside_bundle_is_recorded_with_every_files_hash(exported):
    run, _, bundle, _, result = exported
    entries = _manifest(run)["monai_bundles"]
    entry = next(e for e in entries if e["bundle"] == str(bundle))
    assert entry["path"] == str(bundle) and entry["files"] == tree_hashes(bundle) and entry["verified"] is True
    assert result.inside_run is False and result.recorded_as == [f"monai_bundles: {bundle}"]
    # verify --manifest re-hashes the bundle where it was written, and names an edited file
    states = {target: state for target, state, _ in verify_manifest(run).repositories}
    assert all(states[str(bundle / name)] == "intact" for name in entry["files"])
    card = bundle / "docs" / "README.md"
    original = card.read_bytes()
    try:
        card.write_bytes(original + b"edited\n")
        report = verify_manifest(run)
        assert not report.passed and ((str(card), "altered") in {(t, s) for t, s, _ in report.repositories})
    finally:
        card.write_bytes(original)


def test_a_zip_inside_the_run_is_an_output_verify_manifest_rehashes(exported, tmp_path):
    run, _, _, license_file, _ = exported
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = export_monai_bundle(copy, copy / "bundle.zip", license_file)
    entry = _manifest(copy)["outputs"]["bundle.zip"]
    assert entry["kind"] == "monai-bundle" and entry["verified"] is True and result.zipped and result.inside_run
    with zipfile.ZipFile(copy / "bundle.zip") as archive:
        assert {n.split("/", 1)[1] for n in archive.namelist()} == TREE and {n.split("/")[0] for n in archive.namelist()} == {"bundle"}
        assert hashlib.sha256(archive.read("bundle/models/model.onnx")).hexdigest() == \
            _manifest(copy)["outputs"]["model.onnx"]["sha256"]
    report = verify_manifest(copy)
    assert report.passed and any(f.name == "bundle.zip" and f.state == "intact" for f in report.files)
    with (copy / "bundle.zip").open("ab") as handle:
        handle.write(b"x")
    altered = verify_manifest(copy)
    assert not altered.passed and any(f.name == "bundle.zip" and f.state == "altered" for f in altered.files)


def test_refusals_leave_nothing_behind(exported, tmp_path):
    run, _, bundle, license_file, _ = exported
    before = tree_hashes(bundle)
    with pytest.raises(MMExportError) as no_license:
        export_monai_bundle(run, tmp_path / "a", None)
    assert "--license" in one_line(no_license) and "MONAI Bundle specification" in one_line(no_license)
    with pytest.raises(RunDirError) as unknown:
        export_monai_bundle(tmp_path / "no-such-run", tmp_path / "b", license_file)
    assert "no such run" in one_line(unknown)
    with pytest.raises(RunDirError) as exists:
        export_monai_bundle(run, bundle, license_file)
    assert "exists" in one_line(exists) and tree_hashes(bundle) == before
    copy = tmp_path / "tampered"
    shutil.copytree(run, copy)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(RunDirError) as tampered:
        export_monai_bundle(copy, tmp_path / "c", license_file)
    assert "model.safetensors" in one_line(tampered) and "differs from the manifest" in one_line(tampered)
    # no bundle, no staging folder: only the run copy and its lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tampered.lock", "tampered"]
    assert _manifest(copy)["monai_bundles"] == _manifest(run)["monai_bundles"]  # nothing recorded


def test_without_monai_the_cli_names_the_extra(exported, tmp_path):
    run, _, _, license_file, _ = exported
    code = ("import sys, runpy; sys.modules['monai'] = None; "
            f"sys.argv = ['mmexport', 'fold', {str(run)!r}, '--to', 'monai-bundle', '--out', {str(tmp_path / 'b')!r}, "
            f"'--license', {str(license_file)!r}]; runpy.run_module('mmexport', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "MMEXPORT_DEBUG"}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and lines == [f"error: --to monai-bundle needs MONAI: {monai_bundle.MONAI_INSTALL}"], \
        done.stderr
    assert not (tmp_path / "b").exists()
