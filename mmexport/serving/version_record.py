"""A Triton model version's ``mmexport.json``: read, validated, and its files checked against it.

One module for every reader of the record -- the export (the next version), the folder
check (``check_model_folder``) and the Triton Python model when it loads -- so they apply
one rule. It imports only the standard library, the ground modules and
:mod:`mmexport.runtime` (the server's Python has no torch and no onnx).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mmexport.errors import CheckpointError, MMExportError
from mmexport.fileio import is_sha256_hex, sha256_file
from mmexport.jsonread import read_json_object
from mmexport.runtime.modelinfo import check_class_names

VERSION_RECORD = "mmexport.json"
RECORD_FORMAT = "mmexport-triton/1"


def read_version_record(version_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A version's ``mmexport.json``, checked: one-line :class:`CheckpointError` for a missing or malformed one.

    The record is read back by :func:`check_model_folder`, the next export and the Python
    model at load, and anyone with write access to the repository can edit it, so the
    fields they use are validated (:func:`_check_version_record`): ``served_artifact`` and
    every name in ``files`` a plain file name of the version folder, every sha256 64 hex
    digits, the classes of ``interface`` valid class names.
    """
    path = Path(version_dir) / VERSION_RECORD
    data = read_json_object(path, "mmexport Triton record", max_bytes=MAX_RECORD_BYTES,
                            missing=f"{path.parent}: no {VERSION_RECORD}: not a version mmexport wrote")
    if data.get("format") != RECORD_FORMAT:
        found = data.get("format")
        shown = found[:80] if isinstance(found, str) else type(found).__name__ if found is not None else None
        raise CheckpointError(f"{path}: not an mmexport Triton record (format {shown!r})")
    _check_version_record(data, str(path))
    return data


MAX_RECORD_BYTES = 64 * 2**20  # the record embeds the run's verification records: generous, still bounded


def _is_plain_file_name(name: object) -> bool:
    """A file directly inside the version folder: no directory part, no '..', not hidden (staging folders are)."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".") and "/" not in name
            and "\\" not in name and name.isprintable())


def _check_version_record(data: Mapping[str, Any], where: str) -> None:
    """The fields of a version record that readers act on (see :func:`read_version_record`)."""
    def fail(field_name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: field {field_name} {problem}")

    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise fail("files", "must be an object of file name -> sha256 (the version's files)")
    for name, digest in files.items():
        if not _is_plain_file_name(name):
            raise fail("files", f"names {name[:80]!r}, which is not a plain file name of the version folder")
        if not is_sha256_hex(digest):
            raise fail(f"files[{name!r}]", "must be a sha256 (64 lowercase hex digits)")
    served = data.get("served_artifact")
    if not _is_plain_file_name(served):
        shown = served[:80] if isinstance(served, str) else type(served).__name__
        raise fail("served_artifact", f"must be a plain file name of the version folder (no '/', not hidden), "
                                      f"got {shown!r}")
    if served not in files:
        raise fail("served_artifact", f"names {served!r}, whose sha256 the record does not hold in files")
    if str(served).endswith(".plan") and f"{served}.json" not in files:
        raise fail("files", f"has no sha256 of {served}.json, the sidecar of the served engine")
    engines = data.get("engines", [])
    if not isinstance(engines, list):
        raise fail("engines", "must be a list")
    for index, engine in enumerate(engines):
        if not isinstance(engine, dict) or engine.get("file") not in files or not isinstance(engine.get("sha256"), str) \
                or files[engine["file"]] != engine["sha256"]:
            raise fail(f"engines[{index}]", "must name a file of files with the same sha256")
    interface = data.get("interface")
    if not isinstance(interface, dict):
        raise fail("interface", "must be an object (backend, inputs, outputs, classes)")
    check_class_names(interface.get("classes"), f"{where}: field interface.classes")


def check_version_files(version_dir: str | os.PathLike[str]) -> list[str]:
    """What is wrong with the files of one exported version (empty when nothing is); reads no model, imports no torch.

    Every file the version's ``mmexport.json`` records in ``files`` (the served artifact,
    an engine's sidecar, the per-GPU engines, ``model.py``) must be a regular file in the
    version folder with the recorded sha256. A missing or malformed record is one problem.
    The Triton Python model calls this when it loads, and refuses to serve on any problem.
    """
    folder = Path(version_dir)
    try:
        record = read_version_record(folder)
    except MMExportError as exc:
        return [str(exc)]
    return recorded_file_problems(folder, record)


def recorded_file_problems(version_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> list[str]:
    """:func:`check_version_files` for a record already read with :func:`read_version_record`."""
    folder = Path(version_dir)
    problems = []
    for filename, digest in record["files"].items():
        path = folder / filename
        if path.is_symlink() or not path.is_file():
            problems.append(f"{path} is {'not a regular file' if path.exists() or path.is_symlink() else 'missing'}")
            continue
        try:
            actual = sha256_file(path)
        except OSError as exc:
            problems.append(f"{path} cannot be read ({exc.strerror or exc})")
            continue
        if actual != digest:
            problems.append(f"{path} differs from the sha256 recorded in {VERSION_RECORD} "
                            f"({actual[:12]}…, recorded {digest[:12]}…: altered after export)")
    return problems


__all__ = ["MAX_RECORD_BYTES", "RECORD_FORMAT", "VERSION_RECORD", "check_version_files", "read_version_record",
           "recorded_file_problems"]
