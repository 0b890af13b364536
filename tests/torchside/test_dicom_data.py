"""DICOM datasets for training: detection by content, the recorded policy, refusals, and the accuracy proof.

The synthetic DICOM writer and the naive conversion live in benchmarks/dicom_accuracy.py (the
benchmark runs the same proof on more images and seeds; its numbers are in
benchmarks/results/dicom-accuracy.json and docs/dicom.md).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom", reason="the DICOM dataset tests need the [dicom] extra (the test extra installs it)")

from mmexport import runtime
from mmexport.config import TrainConfig, parse_dicom_voi
from mmexport.errors import DataError, MMExportError
from mmexport.runtime.preprocess import DicomPixels, read_rgb
from mmexport.torchside.data import load_task
from mmexport.torchside.data.formats import scan_image

_spec = importlib.util.spec_from_file_location(
    "dicom_accuracy", Path(__file__).resolve().parents[2] / "benchmarks" / "dicom_accuracy.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

from tests.serving.test_triton import triton  # noqa: E402,F401  (module fixture: the tritonserver installation)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory) -> Path:
    return bench.write_dicom_dataset(tmp_path_factory.mktemp("dicom") / "data", per_class=12)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_every_encoding_decodes_to_the_same_display_values(tmp_path):
    """Each encoding stores the same display values: under voi none they decode alike, naive ones do not."""
    rng = np.random.default_rng(3)
    u = bench.display_image(rng, 0, 48)
    expected = np.rint(u * 255).astype(np.uint8)
    prep = bench_prep()
    for index, encoding in enumerate(bench.ENCODINGS):
        path = tmp_path / f"{encoding}.dcm"
        bench._dataset(encoding, u, index, "1.2.3").save_as(path, enforce_file_format=True)
        pixels = np.asarray(read_rgb(path, prep))
        assert np.abs(pixels.astype(int) - expected[..., None]).max() <= 1, encoding
        naive = bench.naive_rgb(path)
        if encoding.endswith("mono1"):  # inverted: the lesion that was bright is dark
            assert np.corrcoef(naive[..., 0].ravel(), expected.ravel())[0, 1] < -0.5


def bench_prep():
    from mmexport.runtime.preprocess import Preprocessing
    return Preprocessing.center_crop(32, (0.5,) * 3, (0.25,) * 3).with_dicom(DicomPixels.full_range())


def test_dicom_tree_records_none_by_default(dicom_tree):
    task = load_task(f"{dicom_tree}?val=0.25&test=0.25", image_size=32)
    assert task.preprocessing.dicom == DicomPixels.full_range()
    assert task.description["pixels"] == "DICOM"
    assert task.description["dicom"]["voi"] == "none"
    assert sum(task.description["counts"].values()) == 24
    # the evaluation transform is the runtime's: the dataset's pixels are the block's pixels of the file
    from mmexport.runtime.preprocess import model_pixels
    dataset = task.dataset("test")
    pixels, _ = dataset.pixels(0)
    assert np.array_equal(pixels, model_pixels(dataset.samples[0][0], task.preprocessing))


def test_dicom_found_by_content_whatever_the_name(tmp_path, dicom_tree):
    root = tmp_path / "tree"
    for folder in dicom_tree.iterdir():
        (root / folder.name).mkdir(parents=True)
        for index, file in enumerate(sorted(folder.iterdir())):
            (root / folder.name / f"IM{index:04d}").write_bytes(file.read_bytes())  # no extension
    (root / folder.name / "notes.txt").write_text("not an image")
    task = load_task(f"{root}?val=0.25", image_size=32, dicom=DicomPixels.fixed_window(0.5, 2.0, "linear_exact"))
    assert sum(task.description["counts"].values()) == 24
    assert task.preprocessing.dicom.voi == "window"


def test_csv_pointing_at_dicom_files(tmp_path, dicom_tree):
    rows = ["image_id,dx"] + [f"{f.parent.name}/{f.name},{f.parent.name}" for f in sorted(dicom_tree.rglob("*.dcm"))]
    csv = dicom_tree / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    try:
        task = load_task(f"{csv}?val=0.25", image_size=32)
    finally:
        csv.unlink()
    assert task.preprocessing.dicom is not None and sum(task.description["counts"].values()) == 24


def test_mixed_dicom_and_png_refused(tmp_path, dicom_tree):
    root = tmp_path / "mixed"
    for folder in dicom_tree.iterdir():
        (root / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir()):
            (root / folder.name / file.name).write_bytes(file.read_bytes())
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "hypodense" / "extra.png")
    with pytest.raises(DataError) as exc:
        load_task(str(root), image_size=32)
    assert "mixes 24 DICOM file(s) with 1 other image file(s)" in _one_line(exc)


def test_dicom_option_on_image_dataset_refused(image_folder):
    with pytest.raises(DataError) as exc:
        load_task(str(image_folder), image_size=32, dicom=DicomPixels.full_range())
    assert "holds no DICOM files" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        load_task("synthetic:target", dicom=DicomPixels.full_range())
    assert "holds no DICOM files" in _one_line(exc)


def test_file_window_refuses_files_without_one(dicom_tree):
    """``file`` is refused for files without a window (the sc8 encoding has none): skipped, over max_bad."""
    with pytest.raises(DataError) as exc:
        load_task(str(dicom_tree), image_size=32, dicom=DicomPixels.file_window())
    assert "unreadable" in _one_line(exc)


def test_scan_decodes_dicom_once(dicom_tree, monkeypatch):
    from mmexport.torchside.data import formats
    calls = []
    real = formats.read_dicom
    monkeypatch.setattr(formats, "read_dicom", lambda *a, **k: calls.append(1) or real(*a, **k))
    file = next(dicom_tree.rglob("*.dcm"))
    assert scan_image(file, bench_prep())[0] is None
    assert len(calls) == 1
    reason, _ = scan_image(file, None)  # a block without a DICOM section refuses it, in one line
    assert "no dicom section" in reason


@pytest.mark.parametrize(("text", "expected"), [
    ("none", {"voi": "none", "window_center": None, "window_width": None, "window_function": None}),
    ("file", {"voi": "file", "window_center": None, "window_width": None, "window_function": None}),
    ("window:-600,1500", {"voi": "window", "window_center": -600.0, "window_width": 1500.0, "window_function": "linear"}),
    ("window:40,0.5:sigmoid", {"voi": "window", "window_center": 40.0, "window_width": 0.5, "window_function": "sigmoid"}),
])
def test_parse_dicom_voi(text, expected):
    assert parse_dicom_voi(text) == expected
    DicomPixels(**expected)  # what config accepts, the runtime accepts


@pytest.mark.parametrize("text", ["window", "window:1", "window:a,b", "window:0,0.5", "window:0,10:cubic", "auto",
                                  "window:nan,10", "window:0,1e9", "file:1"])
def test_parse_dicom_voi_refusals(text):
    with pytest.raises(MMExportError) as exc:
        parse_dicom_voi(text)
    assert _one_line(exc).startswith("--dicom-voi")


def test_config_policy():
    config = TrainConfig(arch="resnet18", source_a="a", source_b="b", data="d", out="o")
    assert config.dicom_policy() is None
    config.dicom_frame = 2
    assert config.dicom_policy()["multiframe"] == "frame" and config.dicom_policy()["voi"] == "none"
    assert DicomPixels(**config.dicom_policy()) == DicomPixels.full_range(2)
    config.dicom_frame = -1
    with pytest.raises(MMExportError) as exc:
        config.validate()
    assert "--dicom-frame" in _one_line(exc)


def test_cli_refuses_bad_dicom_voi(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mmexport", "train", "--arch", "resnet18", "--source-a", "a",
                           "--source-b", "b", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                           "--dicom-voi", "window:1"], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 1
    assert "--dicom-voi 'window:1': the window must be two numbers" in done.stderr
    assert "Traceback" not in done.stderr


def test_accuracy_through_runtime_predict_and_triton_equals_the_manifest(tmp_path, resnet18_sources, triton):  # noqa: F811
    """Train on DICOMs, export ONNX; runtime, `mmexport predict` and a real Triton server (DICOM bytes) reproduce
    the test accuracy; naive pixels do not."""
    # the benchmark's seed-0 configuration with half its images (~15 s on 2 cores)
    data = bench.write_dicom_dataset(tmp_path / "data", per_class=48, seed=0)
    run = bench.train_run(data, tmp_path / "run", tuple(str(s) for s in resnet18_sources), seed=0)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["preprocessing"]["dicom"]["voi"] == "none"
    result = bench.measure(run, data, 32, tmp_path / "measure")
    assert result["test_images"] == manifest["training"]["final"]["test"]["num_samples"] == 24
    assert result["runtime_accuracy"] == result["manifest_test_accuracy"]
    assert result["cli_accuracy"] == result["manifest_test_accuracy"]
    # benchmarks/results/dicom-accuracy.json: recorded 0.96-1.0, naive 0.56-0.65 over 3 seeds; the
    # MONOCHROME1 files alone flip (naive 0-0.14), so the gap holds on 24 images too
    assert result["naive_accuracy"] < result["manifest_test_accuracy"] - 0.15

    # the same .dcm files as bytes through Triton's image_bytes (python backend, --preprocess): the server's answer
    from mmexport.serving.server import TritonServer
    from mmexport.serving.triton import export_repository
    from tests.serving.test_serve_hostile import _bytes_request, _infer

    files, truth = bench.split_files(data, 32)
    export_repository(run, tmp_path / "repo", backend="python", name="dicom", preprocess=True)
    with TritonServer(tmp_path / "repo", ready_timeout=120, installation=triton, log_file=tmp_path / "server.log") as server:
        status, answer = _infer(server.http_port, "dicom", *_bytes_request([Path(f).read_bytes() for f in files]))
    assert status == 200, answer
    logits = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(len(files), -1)
    labels = [manifest["model"]["classes"][i] for i in logits.argmax(axis=1)]
    assert bench.accuracy(labels, truth) == result["manifest_test_accuracy"]

    # and the answer out as DICOM, end to end: `predict --sr-out` on the trained run's .dcm files
    out = tmp_path / "sr"
    chosen = files[:3]
    done = subprocess.run([sys.executable, "-m", "mmexport", "predict", str(run), *chosen, "--sr-out", str(out)],
                          capture_output=True, text=True, cwd=REPO, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from mmexport.runtime.report import read_classification_sr

    with runtime.load(run / "model.onnx") as predictor:
        predicted = predictor.predict(chosen)
    for file, label, probabilities in zip(chosen, predicted.labels, predicted.probabilities):
        source = pydicom.dcmread(file, stop_before_pixels=True)
        said = read_classification_sr(out / f"{source.SOPInstanceUID}.sr.dcm")
        assert said["label"] == label and said["sources"][0] == source.SOPInstanceUID
        assert said["study"] == source.StudyInstanceUID
        assert abs(said["probability"] - float(probabilities.max())) < 1e-3


def test_verify_and_calibration_load_a_dataset_with_the_runs_own_dicom_policy(dicom_tree):
    """Before: `verify --data` and int8 calibration loaded DICOMs under `none` whatever the run recorded."""
    from mmexport.runtime.modelinfo import ModelInfo
    from mmexport.runtime.preprocess import Preprocessing
    from mmexport.torchside.operations import task_for

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    policy = DicomPixels.fixed_window(0.5, 2.0, "linear_exact")
    classes = load_task(str(dicom_tree), image_size=32).classes
    info = ModelInfo("resnet18", classes, 32, mean, std, preprocessing=Preprocessing.exact(32, mean, std).with_dicom(policy))
    task = task_for(str(dicom_tree), info, "--data")
    assert task.preprocessing.dicom == policy
