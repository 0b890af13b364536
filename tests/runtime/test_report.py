"""The DICOM Structured Report of a classification (:mod:`mmexport.runtime.report`), on real pydicom-data files.

Each SR is read back twice -- with pydicom (the attributes as stored) and with highdicom (the TID 1500
content tree) -- and must name the source instance, the class and its probability, the algorithm, and
say it is not for clinical use. Bad inputs are one line each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from mmexport.errors import DataError, MissingDependencyError, MMExportError
from mmexport.runtime.report import (
    CLASS_SCHEME,
    NOT_FOR_CLINICAL_USE,
    read_classification_sr,
    sr_filename,
    write_classification_sr,
)

SHA = "0123456789abcdef" * 4
PROBABILITIES = {"benign": 0.125, "malignant keratosis-like lesion": 0.75, "nevus": 0.125}
SOURCES = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "US1_UNCR.dcm"]  # CT, MR, CR MONOCHROME1, US RGB
PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                     "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def write(source, out: Path, label: str = "malignant keratosis-like lesion", probabilities=None, **kwargs) -> Path:
    options = {"algorithm_name": "ham-medmerge", "algorithm_version": SHA,
               "verification": "verified: model.onnx passed `fold --to onnx`", "out_dir": out}
    options.update(kwargs)
    return write_classification_sr(source, label, PROBABILITIES if probabilities is None else probabilities, **options)


@pytest.mark.parametrize("name", SOURCES)
def test_sr_reads_back_with_pydicom_and_highdicom(name, tmp_path):
    path = get_testdata_file(name)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    written = write(path, tmp_path)
    assert written == tmp_path / sr_filename(source.SOPInstanceUID)

    sr = pydicom.dcmread(written)  # the attributes as stored
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert sr.Modality == "SR"
    for keyword in PATIENT_AND_STUDY:  # the patient and study modules are the source's
        assert str(sr.get(keyword, "")) == str(source.get(keyword, "")), keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID  # its own series in the source's study
    assert sr.SeriesDescription == NOT_FOR_CLINICAL_USE
    assert sr.VerificationFlag == "UNVERIFIED"  # nobody signed it
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (referenced.ReferencedSOPInstanceUID, referenced.ReferencedSOPClassUID) == (source.SOPInstanceUID,
                                                                                      source.SOPClassUID)

    report = hd.sr.srread(written)  # the TID 1500 content tree
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    result, *per_class = report.content.get_image_measurement_groups()
    (evaluation,) = result.get_qualitative_evaluations(name=codes.SCT.Classification)
    assert evaluation.value.meaning == "malignant keratosis-like lesion"
    assert (evaluation.value.value, evaluation.value.scheme_designator) == ("1", CLASS_SCHEME)  # index in class order
    (probability,) = result.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.75)
    assert [s.referenced_sop_instance_uid for s in result.source_images] == [source.SOPInstanceUID]
    assert {g.finding_type.meaning: g.get_measurements()[0].value for g in per_class} == PROBABILITIES

    found = read_classification_sr(written)
    assert found["label"] == "malignant keratosis-like lesion" and found["probability"] == pytest.approx(0.75)
    assert found["algorithm_name"] == "ham-medmerge" and found["algorithm_version"] == SHA
    assert "verification: verified: model.onnx passed `fold --to onnx`" in found["algorithm_parameters"]
    assert found["comments"] == [NOT_FOR_CLINICAL_USE]
    assert set(found["sources"]) == set(found["evidence"]) == {source.SOPInstanceUID}


def test_a_dataset_source_and_a_shared_series(tmp_path):
    """A pydicom Dataset (header only) is a source too; SRs of one call can share a series, numbered."""
    series = pydicom.uid.generate_uid()
    first = write(pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True), tmp_path,
                  series_instance_uid=series, instance_number=1)
    second = write(get_testdata_file("MR_small.dcm"), tmp_path, series_instance_uid=series, instance_number=2)
    a, b = pydicom.dcmread(first), pydicom.dcmread(second)
    assert a.SeriesInstanceUID == b.SeriesInstanceUID == series and (a.InstanceNumber, b.InstanceNumber) == (1, 2)


def test_a_frame_of_a_multi_frame_source_is_referenced(tmp_path):
    written = write(get_testdata_file("emri_small.dcm"), tmp_path, frame=3)
    result = hd.sr.srread(written).content.get_image_measurement_groups()[0]
    assert result.source_images[0].referenced_frame_numbers == [3]


def test_an_existing_sr_is_never_replaced(tmp_path):
    first = write(get_testdata_file("CT_small.dcm"), tmp_path)
    before = first.read_bytes()
    with pytest.raises(MMExportError, match="exists already") as caught:
        write(get_testdata_file("CT_small.dcm"), tmp_path, label="nevus")
    assert "\n" not in str(caught.value)
    assert first.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temporary left behind


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("probabilities, label, fragment", [
    ({"benign": float("nan"), "nevus": 0.5}, "nevus", "not a finite number in [0, 1]"),
    ({"benign": float("inf"), "nevus": 0.5}, "nevus", "not a finite number in [0, 1]"),
    ({"benign": 1.5, "nevus": 0.5}, "nevus", "not a finite number in [0, 1]"),
    ({"benign": "high", "nevus": 0.5}, "nevus", "not a number"),
    ({"benign": 0.5, "nevus": 0.5}, "melanoma", "is not one of the classes"),
    ({}, "nevus", "no class probabilities"),
])
def test_bad_probabilities_are_one_line(probabilities, label, fragment, tmp_path):
    with pytest.raises(DataError) as caught:
        write(get_testdata_file("CT_small.dcm"), tmp_path, label=label, probabilities=probabilities)
    assert fragment in _one_line(caught)
    assert not list(tmp_path.iterdir())


def test_bad_sources_are_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    png = tmp_path / "lesion.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    with pytest.raises(DataError) as caught:
        write(png, out)
    assert "not a DICOM file" in _one_line(caught)

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")  # says DICM, then garbage
    with pytest.raises(DataError) as caught:
        write(broken, out)
    assert "does not parse" in _one_line(caught) or "has no" in _one_line(caught)

    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
        delattr(dataset, keyword)
        with pytest.raises(DataError) as caught:
            write(dataset, out)
        assert f"has no {keyword}" in _one_line(caught)

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    dataset.SOPInstanceUID = "../../escaped"  # the SR's file name is made from it: must stay a plain UID
    with pytest.raises(DataError) as caught:
        write(dataset, out)
    assert "is not a valid DICOM UID" in _one_line(caught)

    with pytest.raises(DataError) as caught:  # an object with no image: nothing was classified in it
        write(get_testdata_file("rtplan.dcm"), out)
    assert "not an image" in _one_line(caught)
    assert not list(out.iterdir())


def test_bad_output_directories_are_one_line(tmp_path):
    source = get_testdata_file("CT_small.dcm")
    with pytest.raises(MMExportError) as caught:
        write(source, tmp_path / "missing")
    assert "does not exist" in _one_line(caught)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(MMExportError) as caught:
        write(source, a_file)
    assert "is not a directory" in _one_line(caught)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(MMExportError) as caught:
            write(source, locked)
        assert "not writable" in _one_line(caught)


def test_without_highdicom_one_line_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom now fails as where it is not installed
    with pytest.raises(MissingDependencyError) as caught:
        write(get_testdata_file("CT_small.dcm"), tmp_path)
    assert "pip install 'mmexport[dicom]'" in _one_line(caught)


def test_the_writer_imports_no_torch():
    import subprocess

    code = ("import sys; import mmexport.runtime.report; "
            "sys.exit(1 if {'torch', 'torchvision', 'highdicom', 'pydicom'} & set(sys.modules) else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr  # nor pydicom/highdicom until an SR is written
