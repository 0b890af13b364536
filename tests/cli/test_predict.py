"""``mmexport predict RUN FILES``: the run's verified model classifies files as a server would.

In-process for the numbers (the command's rows are exactly ``runtime.load(...).predict``), in a
subprocess for the exit codes: a bad file is one line in its row, the others are still classified,
and the command exits 1 at the end with one error line and no traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmexport import runtime
from mmexport.errors import MMExportError, RunDirError
from mmexport.runs import predict as predicting
from tests.cli.test_hostile_deploy import mmexport, one_error_line, terminal_safe
from tests.conftest import train_exported_run, tree_hashes


@pytest.fixture(scope="module")
def exported(tmp_path_factory, resnet18_sources):
    return train_exported_run(tmp_path_factory.mktemp("predict") / "run", resnet18_sources, image_size=32)


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(7)
    paths = []
    for index in range(3):
        path = tmp_path / f"lesion{index}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_rows_are_the_runtimes_predictions(exported, images):
    model = predicting.resolve_model(exported)
    assert model.path == exported / "model.onnx" and model.verified is True
    assert model.verification.startswith("verified: model.onnx passed")
    with predicting.open_predictor(model) as predictor:
        report = predicting.predict_files(predictor, model, [str(p) for p in images], top=2)
    with runtime.load(exported / "model.onnx") as predictor:
        expected = predictor.predict([str(p) for p in images])
    assert [row.label for row in report.rows] == expected.labels
    for i, row in enumerate(report.rows):
        assert row.error is None and len(row.top) == 2 and row.top[0][0] == row.label
        np.testing.assert_allclose([row.probabilities[c] for c in expected.classes], expected.probabilities[i], rtol=1e-6)
        assert row.probability == pytest.approx(float(expected.probabilities[i].max()))


def test_table_and_json(exported, images, tmp_path):
    out = tmp_path / "predictions.json"
    result = mmexport(["predict", str(exported), *map(str, images), "--top", "2", "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for image in images:
        assert image.name in result.stdout
    written = json.loads(out.read_text())
    assert written["format"] == "mmexport-predictions/1" and written["top"] == 2
    assert written["model"]["sha256"] == json.loads((exported / "manifest.json").read_text())["outputs"]["model.onnx"]["sha256"]
    assert written["model"]["verified"] is True
    with runtime.load(exported / "model.onnx") as predictor:
        expected = predictor.predict([str(p) for p in images])
    assert [r["label"] for r in written["results"]] == expected.labels
    for row in written["results"]:
        assert row["label"] in result.stdout and f"{row['probability']:.3f}" in result.stdout
        assert row["error"] is None and len(row["top"]) == 2


def test_a_bad_file_is_one_line_in_its_row_and_exit_1(exported, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing decodable
    missing = tmp_path / "missing.png"
    out = tmp_path / "predictions.json"
    before = tree_hashes(exported)
    result = mmexport(["predict", str(exported), str(images[0]), str(broken), str(missing), str(images[1]),
                       "--json", str(out)], tmp_path)
    line = one_error_line(result, "2 of 4 file(s) failed", "broken.png")
    assert "Traceback" not in result.stdout
    rows = json.loads(out.read_text())["results"]  # the results are still written: the good files have answers
    assert [r["error"] is None for r in rows] == [True, False, False, True]
    for row in rows[1:3]:
        assert row["label"] is None and "\n" not in row["error"] and Path(row["file"]).name in row["error"]
    assert rows[1]["error"] in line
    assert "broken.png" in result.stdout and "missing.png" in result.stdout  # in the table, each in its row
    assert tree_hashes(exported) == before  # predict never writes into the run


def test_outputs_that_would_touch_the_run_are_refused(exported, images, tmp_path):
    run = Path(shutil.copytree(exported, tmp_path / "run"))
    before = tree_hashes(run)
    result = mmexport(["predict", str(run), str(images[0]), "--json", str(run / "manifest.json")], tmp_path)
    one_error_line(result, "manifest.json", "refusing to overwrite")
    result = mmexport(["predict", str(run), str(images[0]), "--sr-out", str(run / "reports")], tmp_path)
    one_error_line(result, "inside the run")
    assert tree_hashes(run) == before and not (run / "reports").exists()


def test_a_file_outside_a_run_needs_allow_unverified(exported, images, tmp_path):
    loose = tmp_path / "elsewhere" / "model.onnx"
    loose.parent.mkdir()
    shutil.copy(exported / "model.onnx", loose)
    one_error_line(mmexport(["predict", str(loose), str(images[0])], tmp_path), "not inside a run directory")
    result = mmexport(["predict", str(loose), str(images[0]), "--allow-unverified"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "untracked" in result.stdout and terminal_safe(result.stdout)


def test_an_unverified_artifact_is_refused_unless_allowed(exported, images, tmp_path):
    run = Path(shutil.copytree(exported, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["outputs"]["model.onnx"].update(verified=False, unverified_reason="fp16 top-1 agreement 97%")
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="not verified .fp16 top-1 agreement 97%.; pass --allow-unverified"):
        predicting.resolve_model(run)
    model = predicting.resolve_model(run, allow_unverified=True)
    assert model.verified is False and model.verification == "UNVERIFIED: fp16 top-1 agreement 97%"


def test_bad_arguments_are_one_line(exported, images, tmp_path):
    with pytest.raises(MMExportError, match="no such run directory or model file"):
        predicting.resolve_model(tmp_path / "nothing")
    with pytest.raises(MMExportError, match="has no model.plan"):
        predicting.resolve_model(exported, backend="tensorrt")
    with pytest.raises(MMExportError, match="unknown backend"):
        predicting.resolve_model(exported, backend="torch")
    one_error_line(mmexport(["predict", str(exported), str(images[0]), "--top", "0"], tmp_path), "--top")


def test_sr_out_with_images_notes_that_no_sr_is_written(exported, images, tmp_path):
    reports = tmp_path / "reports"
    result = mmexport(["predict", str(exported), str(images[0]), "--sr-out", str(reports)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not a DICOM file" in result.stdout and "0 Structured Report(s)" in result.stdout
    assert reports.is_dir() and not list(reports.iterdir())


def test_dicom_files_get_one_sr_each_in_one_series_per_study(exported, tmp_path):
    """The SR path of predict on real DICOM files. The run was trained on PNGs (no DICOM pipeline in its
    preprocessing block), so the pixels are stood in for by a fixed normalised batch: what is under test is
    that each classified DICOM gets an SR naming it, with the row's class, probability and the model's hash."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from pydicom.data import get_testdata_file

    from mmexport.runtime.report import read_classification_sr

    sources = [get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm")]
    model = predicting.resolve_model(exported)
    with predicting.open_predictor(model) as predictor:
        size = predictor.info.image_size
        rng = np.random.default_rng(0)
        original = predictor.preprocess

        def stand_in(items):  # a file's pixels -> a fixed batch; an already-normalised batch goes through as before
            if isinstance(items, list):
                return rng.standard_normal((1, 3, size, size)).astype(np.float32)
            return original(items)
        predictor.preprocess = stand_in
        report = predicting.predict_files(predictor, model, sources, sr_out=tmp_path / "sr")
    assert all(row.error is None and row.sr for row in report.rows)
    for row, source in zip(report.rows, sources):
        header = pydicom.dcmread(source, stop_before_pixels=True)
        found = read_classification_sr(row.sr)
        assert found["evidence"] == [header.SOPInstanceUID] and found["study"] == header.StudyInstanceUID
        assert found["label"] == row.label and found["probability"] == pytest.approx(row.probability)
        assert found["algorithm_name"] == "run" and found["algorithm_version"] == model.sha256
        assert found["algorithm_parameters"][0] == f"verification: {model.verification}"
    series = {pydicom.dcmread(row.sr).SeriesInstanceUID for row in report.rows}
    studies = {pydicom.dcmread(s, stop_before_pixels=True).StudyInstanceUID for s in sources}
    assert len(series) == len(studies)  # one new series per study and call


def test_a_dicom_without_a_dicom_pipeline_is_one_line_in_its_row(exported, images):
    """Until a run records the DICOM pixel pipeline, its model refuses a DICOM in one line (never reads it as a TIFF)."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    model = predicting.resolve_model(exported)
    with predicting.open_predictor(model) as predictor:
        report = predicting.predict_files(predictor, model, [get_testdata_file("RG1_UNCR.dcm"), str(images[0])])
    bad, good = report.rows
    assert bad.label is None and "DICOM" in bad.error and "\n" not in bad.error
    assert good.error is None and good.label in report.classes
