"""Hostile run artifacts read by the torch-free runtime: ``reference.npz`` and TensorRT engine sidecars.

A forged or damaged file must fail in one line naming the field -- never load as a smaller,
still passing reference (a labelled set dropped, labels ignored), never a traceback
(``RecursionError``, ``TypeError`` on a non-scalar seed), never a value that travels on
into a Triton config (a batch maximum of NaN or 10**400). The readers are called in
process; one case goes through ``mmexport verify`` for the exit code and the untouched run.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mmexport.errors import CheckpointError, MMExportError
from mmexport.runtime.engine import EngineSidecar, check_engine, layer_precisions
from mmexport.runtime.preprocess import Preprocessing
from mmexport.runtime.reference import RANDOM_SET, ReferenceData, StoredSet
from tests.conftest import one_line, train_exported_run, tree_hashes
from tests.tensorrt_fakes import DATA, H100, write_engine

CLASSES = ("nevus", "melanoma", "keratosis")
SIZE = 16


# ------------------------------------------------------------------------------------------------
# reference.npz
# ------------------------------------------------------------------------------------------------
def _reference() -> ReferenceData:
    rng = np.random.default_rng(0)
    data = ReferenceData(CLASSES, Preprocessing.exact(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), "ab" * 32, 7)
    data.sets[RANDOM_SET] = StoredSet(rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8),
                                      {"logits": rng.standard_normal((4, 3)).astype(np.float32)})
    data.sets["data:test"] = StoredSet(rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8),
                                       {"logits": rng.standard_normal((6, 3)).astype(np.float32)},
                                       np.array([0, 1, 2, 2, 1, 0]))
    return data


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _forged(tmp_path: Path, edit) -> Path:
    """A valid reference file, re-saved after ``edit(arrays)`` changed its arrays."""
    path = tmp_path / "reference.npz"
    _reference().save(path)
    arrays = _arrays(path)
    edit(arrays)
    np.savez(path, **arrays)
    return path


def _set(arrays: dict, key: str, value) -> None:
    arrays[key] = value


REFERENCE_CASES = {
    # the cases: each used to load with the labelled set dropped, labels ignored or a traceback
    "2-D sets": (lambda a: _set(a, "sets", a["sets"].reshape(1, 2)), "'sets' must be a 1-D array of set names"),
    "float labels": (lambda a: _set(a, "set1/labels", a["set1/labels"] + 0.5), "'set1/labels' must be integer class"),
    "non-scalar seed": (lambda a: _set(a, "seed", np.array([1, 2])), "'seed' must be one integer, got shape (2,)"),
    "float seed": (lambda a: _set(a, "seed", np.array(1.5)), "'seed' must be one integer, got dtype float64"),
    "negative seed": (lambda a: _set(a, "seed", np.array(-1)), "'seed' must be an integer from 0 to 4294967295"),
    "labels out of range": (lambda a: _set(a, "set1/labels", np.array([0, 1, 2, 3, 1, 0])),
                            "'set1/labels' holds class indices outside 0..2"),
    "boolean labels": (lambda a: _set(a, "set1/labels", a["set1/labels"] > 0), "'set1/labels' must be integer"),
    "labels of another length": (lambda a: _set(a, "set1/labels", a["set1/labels"][:5]), "got shape (5,)"),
    "labelled set without labels": (lambda a: a.pop("set1/labels"), "'set1/labels' is missing"),
    "a set the list does not name": (lambda a: _set(a, "sets", a["sets"][:1]), "'set1/labels' is not part of"),
    "a set named twice": (lambda a: _set(a, "sets", np.array([RANDOM_SET, RANDOM_SET])), "names a set name twice"),
    "no random set": (lambda a: _set(a, "sets", np.array(["data:test", "data:val"])), "does not name the 'random' set"),
    "integer set names": (lambda a: _set(a, "sets", np.array([0, 1])), "got dtype int64"),
    "float pixels": (lambda a: _set(a, "set0/pixels", a["set0/pixels"].astype(np.float32)), "got dtype float32"),
    "pixels of another size": (lambda a: _set(a, "set0/pixels", np.zeros((4, 8, 8, 3), np.uint8)),
                               "'set0/pixels' must be uint8 pixels N x 16 x 16 x 3"),
    "outputs of another class count": (lambda a: _set(a, "set0/output0", np.zeros((4, 2), np.float32)), "got shape (4, 2)"),
    "outputs of another count": (lambda a: _set(a, "set1/output0", np.zeros((5, 3), np.float32)), "got shape (5, 3)"),
    "NaN outputs": (lambda a: _set(a, "set0/output0", np.full((4, 3), np.nan, np.float32)), "not finite"),
    "no outputs": (lambda a: _set(a, "set0/output_names", np.array([], dtype=np.str_)), "has no reference outputs"),
    "2-D classes": (lambda a: _set(a, "classes", a["classes"].reshape(3, 1)), "'classes' must be a 1-D array"),
    "class name with a line break": (lambda a: _set(a, "classes", np.array(["a", "b\u2028c", "d"])), "class 1"),
    "model sha256 not hex": (lambda a: _set(a, "model_sha256", np.array("x" * 64)), "'model_sha256' must be 64"),
    "format as an array": (lambda a: _set(a, "format", np.array(["mmexport-reference/1"])), "'format' must be one string"),
    "missing pixels": (lambda a: a.pop("set0/pixels"), "'set0/pixels' is missing"),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_malformed_reference_files_are_refused_in_one_line_naming_the_field(tmp_path, case):
    edit, fragment = REFERENCE_CASES[case]
    path = _forged(tmp_path, edit)
    with pytest.raises(CheckpointError) as excinfo:
        ReferenceData.load(path)
    message = one_line(excinfo)
    assert message.startswith(f"{path}: ") and fragment in message, message


def test_the_reference_written_by_save_loads_back_whole(tmp_path):
    path = tmp_path / "reference.npz"
    _reference().save(path)
    loaded = ReferenceData.load(path)
    assert loaded.counts() == {RANDOM_SET: 4, "data:test": 6} and loaded.labelled_set == "data:test"
    assert loaded.seed == 7 and loaded.classes == CLASSES
    assert loaded.sets["data:test"].labels.tolist() == [0, 1, 2, 2, 1, 0]


def _npy_header_only(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(64)


def test_a_header_claiming_terabytes_is_refused_before_anything_is_allocated(tmp_path):
    """A few hundred bytes whose pixel header says 10**7 images: refused from the header, at once."""
    path = _forged(tmp_path, lambda a: None)
    with zipfile.ZipFile(path) as source:
        members = {name: source.read(name) for name in source.namelist()}
    members["set0/pixels.npy"] = _npy_header_only((10**7, SIZE, SIZE, 3))
    members["set0/output0.npy"] = _npy_header_only((10**7, 3), "<f4")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in members.items():
            target.writestr(name, data)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as excinfo:
        ReferenceData.load(path)
    assert "'set0/pixels' holds 10000000 entries" in one_line(excinfo)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04" + bytes(40)])
def test_a_file_that_is_not_an_archive_is_one_line(tmp_path, content):
    path = tmp_path / "reference.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as excinfo:
        ReferenceData.load(path)
    assert one_line(excinfo).startswith(f"{path}: ")


def test_pickled_arrays_are_never_loaded(tmp_path):
    path = _forged(tmp_path, lambda a: _set(a, "classes", np.array(["a", None, "c"], dtype=object)))
    with pytest.raises(CheckpointError) as excinfo:
        ReferenceData.load(path)
    assert "'classes'" in one_line(excinfo) and "object" in str(excinfo.value)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, resnet18_sources) -> Path:
    return train_exported_run(tmp_path_factory.mktemp("hostile-artifacts") / "run", resnet18_sources)


def _rewrite_manifest_hash(run: Path, name: str) -> None:
    """What anyone with write access to a run can do: re-record a changed file's sha256."""
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["outputs"][name]
    entry["sha256"] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    if "size_bytes" in entry:
        entry["size_bytes"] = (run / name).stat().st_size
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _untouched(root: Path) -> dict[str, str]:
    """Every file under ``root`` but the run's lock, which the command owns (it may leave it behind)."""
    return {name: digest for name, digest in tree_hashes(root).items() if not name.endswith(".lock")}


def _mmexport(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG", "COLUMNS")}
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "400", "NO_COLOR": "1"})
    return subprocess.run([sys.executable, "-m", "mmexport", *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def test_verify_fails_on_a_forged_reference_instead_of_passing_on_random_inputs(run_dir, tmp_path):
    """Before: 2-D ``sets`` dropped the labelled set and ``verify --backend onnx`` passed on random inputs alone."""
    import shutil

    run = tmp_path / "forged"
    shutil.copytree(run_dir, run)
    arrays = _arrays(run / "reference.npz")
    arrays["sets"] = arrays["sets"].reshape(1, -1)
    np.savez(run / "reference.npz", **arrays)
    _rewrite_manifest_hash(run, "reference.npz")
    before = _untouched(tmp_path)
    result = _mmexport("verify", str(run), "--backend", "onnx")
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "reference field 'sets' must be a 1-D array" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout and "passed" not in result.stdout
    assert _untouched(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# engine sidecars
# ------------------------------------------------------------------------------------------------
def _sidecar_text(edit=None) -> str:
    data = json.loads((DATA / "engine" / "model.fp16.plan.json").read_text())
    if edit is not None:
        edit(data)
    return json.dumps(data)


SIDECAR_CASES = {
    "NaN batch maximum": (lambda: _sidecar_text().replace('"max": 32', '"max": NaN'), "malformed JSON (NaN"),
    "batch maximum 10**400": (lambda: _sidecar_text(lambda d: d["batch_profile"].update(max=10**400)),
                              "batch_profile.max must be an integer from 1 to 65536, got an integer of 401 digits"),
    "batch maximum over int32": (lambda: _sidecar_text(lambda d: d["batch_profile"].update(max=2**31)),
                                 "batch_profile.max must be an integer from 1 to 65536"),
    "float batch maximum": (lambda: _sidecar_text(lambda d: d["batch_profile"].update(max=32.0)), "got 32.0"),
    "min above opt": (lambda: _sidecar_text(lambda d: d["batch_profile"].update(min=16)), "1 <= min <= opt <= max"),
    "unknown profile key": (lambda: _sidecar_text(lambda d: d["batch_profile"].update(step=2)), "unknown key 'step'"),
    "nested 100000 deep": (lambda: '{"format": "mmexport-engine/1", "x": ' + "[" * 100000 + "]" * 100000 + "}",
                           "malformed JSON (nested too deeply)"),
    "compute capability as text": (lambda: _sidecar_text(lambda d: d.update(compute_capability=["9", "0"])),
                                   "compute_capability[0] must be an integer from 1 to 99"),
    "two-digit minor": (lambda: _sidecar_text(lambda d: d.update(compute_capability=[1, 10])),
                        "compute_capability[1] must be an integer from 0 to 9"),
    "engine sha256 not hex": (lambda: _sidecar_text(lambda d: d.update(engine_sha256="../" * 20)),
                              "engine_sha256 must be 64 lowercase hex digits"),
    "version_compatible as text": (lambda: _sidecar_text(lambda d: d["build_flags"].update(version_compatible="false")),
                                   "build_flags.version_compatible must be true or false"),
    "input name with a newline": (lambda: _sidecar_text(lambda d: d.update(input_name="image\nx")),
                                  "input_name must be 1-65536 printable characters"),
    "nested metadata value": (lambda: _sidecar_text(lambda d: d["model_metadata"].update(arch={"a": 1})),
                              "model_metadata.arch must be a text"),
    "image size of a bool": (lambda: _sidecar_text(lambda d: d.update(image_size=True)), "image_size must be an integer"),
    "CUDA version as text": (lambda: _sidecar_text(lambda d: d.update(cuda_runtime_version="13000")),
                             "cuda_runtime_version must be an integer"),
    "a list": (lambda: "[1, 2]", "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", SIDECAR_CASES)
def test_malformed_sidecars_are_refused_in_one_line_naming_the_field(case):
    make, fragment = SIDECAR_CASES[case]
    with pytest.raises(CheckpointError) as excinfo:
        EngineSidecar.from_json(make(), "x.plan.json")
    message = one_line(excinfo)
    assert message.startswith("x.plan.json: engine sidecar") and fragment in message, message
    assert len(message) < 400


def test_check_engine_refuses_a_forged_sidecar_before_anything_is_loaded(tmp_path):
    path = write_engine(tmp_path)
    sidecar = tmp_path / "model.fp16.plan.json"
    sidecar.write_text(sidecar.read_text().replace('"max": 32', '"max": NaN'))
    with pytest.raises(CheckpointError) as excinfo:
        check_engine(path, environment=H100)
    assert one_line(excinfo).startswith(f"{sidecar}: engine sidecar: malformed JSON")
    sidecar.unlink()
    sidecar.mkdir()  # a directory where the sidecar should be
    with pytest.raises(CheckpointError) as excinfo:
        EngineSidecar.read(sidecar)
    assert one_line(excinfo).startswith(f"{sidecar}: engine sidecar cannot be read")
    sidecar.rmdir()
    sidecar.write_bytes(b"\xff\xfe" + bytes(100))
    with pytest.raises(CheckpointError) as excinfo:
        EngineSidecar.read(sidecar)
    assert "not UTF-8" in one_line(excinfo)


def test_a_sidecar_that_round_trips_is_accepted_and_a_large_valid_profile_too():
    text = _sidecar_text(lambda d: d["batch_profile"].update(min=1, opt=256, max=65536))
    assert EngineSidecar.from_json(text, "x").batch_profile.max == 65536
    assert EngineSidecar.from_json(EngineSidecar.from_json(text, "x").to_json(), "x") == EngineSidecar.from_json(text, "x")


def test_engine_inspector_json_is_read_with_the_bounded_parser():
    deep = '{"Layers": ' + "[" * 50000 + "]" * 50000 + "}"
    with pytest.raises(MMExportError) as excinfo:
        layer_precisions(deep)
    assert one_line(excinfo).startswith("engine inspector output: malformed JSON")
    with pytest.raises(MMExportError) as excinfo:
        layer_precisions('{"Layers": [], "x": NaN}')
    assert "NaN" in one_line(excinfo)


def test_sidecar_edits_are_independent():  # the cases above edit copies, never the shared example file
    before = (DATA / "engine" / "model.fp16.plan.json").read_text()
    for make, _ in copy.copy(SIDECAR_CASES).values():
        make()
    assert (DATA / "engine" / "model.fp16.plan.json").read_text() == before
