"""The answer out as DICOM: one Structured Report per classified instance (IHE AI Results).

:func:`write_classification_sr` writes a Comprehensive 3D SR whose content is TID 1500
(Measurement Report) with highdicom:

* the root container ``Imaging Measurement Report`` (DCM 126000), the device observer
  (mmexport, the run) and an Image Library naming the source instance;
* a measurement group (TID 1501) "mmexport classification": a qualitative evaluation
  ``Classification`` (SCT 278201002) = the top class, a ``Probability`` (DCM 122157) measurement of it,
  the algorithm identification (name = the run, version = the model's sha256; the manifest's
  verification status and the intended use as algorithm parameters) and the source image;
* one group per class "class probability: <class>": finding type (TID 1501's ``Finding``,
  DCM 121071) = the class, its probability;
* a TEXT ``Comment`` (DCM 121106) "Not for clinical use ..." at the root, and the same words as
  the Series Description -- the marker MONAI Deploy's SR writer apps put there.

The SR lives in the source's study (the patient and study modules are copied from the source by
highdicom, which takes them from the evidence) in a series of its own, and references the source
Study / Series / SOP Instance UIDs in its evidence and in every group. Class names are free text,
so they are coded in a local coding scheme (see :data:`CLASS_SCHEME`).

pydicom and highdicom are optional (``pip install 'mmexport[dicom]'``) and imported here only when
an SR is written. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmexport import __version__
from mmexport.errors import DataError, MissingDependencyError, MMExportError
from mmexport.fileio import make_temporary_file

# A coding scheme designator beginning with "99" is private/local by the standard's convention
# (PS3.16 §8.2): a model's class names are free text chosen at training, no public terminology
# (SNOMED, RadLex) can be assumed to name them, and inventing SCT-looking codes would claim a
# meaning the class does not have. The code value is the class index (Code Value is SH, at most
# 16 characters, while class names may be longer), the meaning the class name (LO, 64 characters),
# and the scheme version the model's sha256 prefix: "class 2 of the model with this hash".
CLASS_SCHEME = "99MMEXPORT"
NOT_FOR_CLINICAL_USE = "Not for clinical use. The result is for research use only."  # MONAI Deploy's words
SR_SUFFIX = ".sr.dcm"
SERIES_NUMBER = 9901  # a series number unlikely to collide with the modality's own series
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_LO = 64  # Long String: the most characters a Code Meaning or a Manufacturer's Model Name may hold


def _dicom_modules() -> tuple[Any, Any]:
    try:
        import highdicom
        import pydicom
    except ImportError as exc:
        raise MissingDependencyError(
            f"writing a DICOM Structured Report needs pydicom and highdicom ({exc.name or 'one'} is missing): "
            "pip install 'mmexport[dicom]'") from None
    return pydicom, highdicom


def read_source(source: Any) -> tuple[Any, str]:
    """The header of a DICOM path or ``pydicom.Dataset`` (pixels not read) and how to name it in an error."""
    pydicom, _ = _dicom_modules()
    if isinstance(source, pydicom.Dataset):
        return source, f"the dataset {getattr(source, 'SOPInstanceUID', '(no SOP Instance UID)')}"
    path = Path(source)
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
            handle.seek(0)
            if head[128:132] != b"DICM":
                raise DataError(f"{path}: not a DICOM file (no DICM preamble); an SR reports on a DICOM instance")
            dataset = pydicom.dcmread(handle, stop_before_pixels=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except MMExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged file; each is one line here
        raise DataError(f"{path}: says DICM but does not parse ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    return dataset, str(path)


def _uid(dataset: Any, keyword: str, where: str) -> str:
    value = str(getattr(dataset, keyword, "") or "").strip()
    if not value:
        raise DataError(f"{where}: has no {keyword}; an SR must reference the source's study, series and instance")
    if len(value) > 64 or not _UID.match(value):  # also keeps the SR's file name, made from it, a plain name
        raise DataError(f"{where}: {keyword} {value[:70]!r} is not a valid DICOM UID")
    return value


def check_probabilities(label: str, probabilities: Mapping[str, float]) -> dict[str, float]:
    """``probabilities`` (class -> probability, in the model's class order) checked: finite, in [0, 1], naming ``label``."""
    checked: dict[str, float] = {}
    for name, value in probabilities.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(f"the probability of {name!r} is not a number ({value!r})") from None
        if not math.isfinite(number) or not 0.0 <= number <= 1.0:
            raise DataError(f"the probability of {name!r} is {number}, not a finite number in [0, 1]")
        checked[str(name)] = number
    if not checked:
        raise DataError("no class probabilities given")
    if label not in checked:
        raise DataError(f"the label {label!r} is not one of the classes {list(checked)[:10]}")
    return checked


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.is_dir():
        what = "is not a directory" if out_dir.exists() else "does not exist"
        raise MMExportError(f"{out_dir}: the SR output directory {what}")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise MMExportError(f"{out_dir}: the SR output directory is not writable")


def _publish_new(data: bytes, target: Path) -> None:
    """Write ``target`` atomically and never over an existing file: a hard link of a complete temporary
    file fails if the name exists (os.replace would silently replace it)."""
    try:
        tmp = make_temporary_file(target.parent, target.name)
    except OSError as exc:
        raise MMExportError(f"{target.parent}: cannot write here ({exc.strerror or exc})") from None
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise MMExportError(f"{target}: exists already (an SR of this instance); refusing to overwrite it") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # a file system without hard links: the existence check and the rename are then two steps
            if target.exists():
                raise MMExportError(f"{target}: exists already (an SR of this instance); refusing to overwrite it") from None
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sr_filename(sop_instance_uid: str) -> str:
    """The SR file of a classified instance: its source's SOP Instance UID (a UID is digits and dots)."""
    return sop_instance_uid + SR_SUFFIX


def write_classification_sr(
    source: Any,
    label: str,
    probabilities: Mapping[str, float],
    *,
    algorithm_name: str,
    algorithm_version: str,
    verification: str,
    out_dir: str | os.PathLike[str],
    frame: int | None = None,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
) -> Path:
    """Write one Comprehensive 3D SR (TID 1500) reporting ``label`` for the DICOM instance ``source``.

    ``source``: a DICOM path or a ``pydicom.Dataset`` (its header is enough: pixels are not read).
    ``probabilities``: class -> probability in the model's class order (e.g. a row of
    :attr:`mmexport.runtime.Prediction.probabilities` with its ``classes``). ``algorithm_name``:
    the run; ``algorithm_version``: the model's sha256 (or its prefix); ``verification``: the run
    manifest's verification status, one line. ``frame``: the frame classified, for a multi-frame
    source (referenced in the groups). ``series_instance_uid``/``instance_number``: to put several
    SRs of one call into one series of the study (default: a new series per SR).

    Returns ``out_dir / "<source SOP Instance UID>.sr.dcm"``, written atomically; an existing file
    is never replaced. Every bad input is one :class:`~mmexport.errors.MMExportError` line.
    """
    _, hd = _dicom_modules()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    dataset, where = read_source(source)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        _uid(dataset, keyword, where)  # the SR's evidence and the study it joins
    sop = _uid(dataset, "SOPInstanceUID", where)
    if str(dataset.SOPClassUID) in _SR_AND_NON_IMAGE:
        raise DataError(f"{where}: is a {dataset.SOPClassUID.name} object, not an image; an SR reports on a classified image")
    checked = check_probabilities(label, probabilities)
    if series_instance_uid is not None and not _UID.match(series_instance_uid):
        raise MMExportError(f"series_instance_uid {series_instance_uid!r} is not a valid DICOM UID")
    if not algorithm_name.strip() or not algorithm_version.strip():
        raise MMExportError("an SR identifies its algorithm: give algorithm_name (the run) and algorithm_version (the model's sha256)")
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    target = out / sr_filename(sop)
    if target.exists():
        raise MMExportError(f"{target}: exists already (an SR of this instance); refusing to overwrite it")

    model_hash = algorithm_version.strip()[:16]
    classes = list(checked)

    def class_code(name: str) -> Any:
        return hd.sr.CodedConcept(value=str(classes.index(name)), scheme_designator=CLASS_SCHEME,
                                  meaning=name[:_LO] or "(unnamed class)", scheme_version=model_hash)

    # the verification status and the intended use travel with the algorithm: a reader of any group sees them
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name, version=algorithm_version,
        parameters=[f"verification: {' '.join(verification.split())}", f"intended use: {NOT_FOR_CLINICAL_USE}"])
    frames = [int(frame)] if frame is not None else None
    try:
        def source_image() -> Any:
            return hd.sr.SourceImageForMeasurementGroup.from_source_image(dataset, referenced_frame_numbers=frames)

        def probability(value: float) -> Any:
            # a probability is a dimensionless ratio: UCUM "1" (no units)
            return hd.sr.Measurement(name=codes.DCM.Probability, value=value, unit=codes.UCUM.NoUnits)

        result = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="mmexport classification"),
            algorithm_id=algorithm,
            # not DCM "Finding": TID 1501 already uses that concept for a group's finding type (the per-class
            # groups below), and a reader (highdicom) would take this evaluation for one
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.SCT.Classification, class_code(label))],
            measurements=[probability(checked[label])],
            source_images=[source_image()],
        )
        per_class = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                             identifier=f"class probability: {name}"[:_LO]),
                finding_type=class_code(name), algorithm_id=algorithm, measurements=[probability(value)],
                source_images=[source_image()])
            for name, value in checked.items()
        ]
        observer = hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(), name="mmexport", manufacturer_name="mmexport",
                model_name=algorithm_name[:_LO]))
        def measurement_report(library: list[Any] | None) -> Any:
            return hd.sr.MeasurementReport(
                observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure"),
                imaging_measurements=[result, *per_class], referenced_images=library)

        try:
            report = measurement_report([dataset])
        except AttributeError:
            # highdicom's Image Library entry describes the image (e.g. ImagerPixelSpacing of a CR) and fails
            # on a real radiograph without it; the library is then left empty -- the evidence and every
            # group's source image still reference the instance
            report = measurement_report(None)
        # TID 1500 has no row for free text at the root; a CONTAINS TEXT Comment is what readers
        # (OHIF, dcmdump, highdicom's tree) show, so the marker is there as well as in the Series Description.
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(codes.DCM.Comment, NOT_FOR_CLINICAL_USE, relationship_type="CONTAINS"))
        sr = hd.sr.Comprehensive3DSR(
            evidence=[dataset], content=report[0],
            series_instance_uid=series_instance_uid or generate_uid(), series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=int(instance_number),
            manufacturer="mmexport", manufacturer_model_name=algorithm_name[:_LO],
            software_versions=f"mmexport {__version__}", series_description=NOT_FOR_CLINICAL_USE,
            is_complete=True,  # the report says everything the algorithm found; it is not verified by a person
        )
    except AttributeError as exc:  # highdicom reads an attribute the source lacks (e.g. Modality, for the image library)
        missing = getattr(exc, "name", None)
        if missing and missing[:1].isupper():
            raise DataError(f"{where}: has no {missing}, which an SR's reference to its source needs") from None
        raise DataError(f"{where}: cannot be reported on in an SR (AttributeError: {' '.join(str(exc).split())[:200]})") from None
    except (ValueError, TypeError, KeyError) as exc:
        # highdicom validates the source's modules (e.g. a patient or study attribute of the wrong form)
        raise DataError(f"{where}: cannot be reported on in an SR ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    from io import BytesIO

    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    _publish_new(buffer.getvalue(), target)
    return target


# SOP classes that carry no image to classify: SR documents, RT structure sets and plans, segmentations,
# key object selections, presentation states, encapsulated documents.
_SR_AND_NON_IMAGE = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.35", "1.2.840.10008.5.1.4.1.1.88.40",
    "1.2.840.10008.5.1.4.1.1.88.50", "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.88.65",
    "1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.68", "1.2.840.10008.5.1.4.1.1.88.69",
    "1.2.840.10008.5.1.4.1.1.88.70", "1.2.840.10008.5.1.4.1.1.88.71", "1.2.840.10008.5.1.4.1.1.88.72",
    "1.2.840.10008.5.1.4.1.1.88.73", "1.2.840.10008.5.1.4.1.1.88.74", "1.2.840.10008.5.1.4.1.1.88.75",
    "1.2.840.10008.5.1.4.1.1.88.76",
    "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.11.1",
})


def read_classification_sr(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What an SR written by :func:`write_classification_sr` says, read back with highdicom:
    source UIDs, label, probability, per-class probabilities, algorithm name/version/parameters, comments."""
    _, hd = _dicom_modules()
    from pydicom.sr.codedict import codes

    try:
        sr = hd.sr.srread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom and highdicom raise many kinds for a foreign or damaged file
        raise DataError(f"{path}: not a DICOM SR highdicom can read ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    groups = sr.content.get_image_measurement_groups()
    if not groups:
        raise DataError(f"{path}: has no measurement group")
    found: dict[str, Any] = {"probabilities": {}, "sources": [], "comments": []}
    for group in groups:
        for reference in group.source_images or []:
            found["sources"].append(reference.referenced_sop_instance_uid)
        measurements = {m.name: m for m in group.get_measurements()}
        probability = measurements.get(codes.DCM.Probability)
        evaluations = group.get_qualitative_evaluations(name=codes.SCT.Classification)
        if evaluations:
            found["label"] = evaluations[0].value.meaning
            found["probability"] = probability.value if probability is not None else None
            found.update(_algorithm(group))
        elif group.finding_type is not None and probability is not None:
            found["probabilities"][group.finding_type.meaning] = probability.value
    for item in sr.ContentSequence:  # the root's own items
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Comment.value:
            found["comments"].append(str(item.TextValue))
    found.update(study=str(sr.StudyInstanceUID), series_description=str(getattr(sr, "SeriesDescription", "")),
                 evidence=[str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                           for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence])
    return found


def _algorithm(group: Any) -> dict[str, Any]:
    """The Algorithm Name / Version / Parameters TEXT items of a group (highdicom's parsed group has no accessor)."""
    wanted = {"111001": "algorithm_name", "111003": "algorithm_version", "111002": "algorithm_parameters"}
    found: dict[str, Any] = {"algorithm_parameters": []}
    for item in group[0].ContentSequence:
        key = wanted.get(item.ConceptNameCodeSequence[0].CodeValue) if item.ValueType == "TEXT" else None
        if key == "algorithm_parameters":
            found[key].append(str(item.TextValue))
        elif key is not None:
            found[key] = str(item.TextValue)
    return found


__all__ = ["CLASS_SCHEME", "NOT_FOR_CLINICAL_USE", "SR_SUFFIX", "check_probabilities", "read_classification_sr", "read_source",
           "sr_filename", "write_classification_sr"]
