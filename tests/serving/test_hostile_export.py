"""Hostile Triton exports (mmexport.serving.triton): forged engines, batch sizes, odd --repo paths, labels, records.

Each refusal is one line naming the path or field, nothing is written into the repository
(or anywhere else), and the run is byte-identical. The TensorRT engines are stand-ins (a
plan header and a complete sidecar, see tests/serving/test_triton.py), the export's checks
being the subject; no Triton server is started here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from mmexport.errors import CheckpointError, MMExportError, RunDirError
from mmexport.fileio import sha256_file
from mmexport.runs.manifest import RunDir
from mmexport.serving.triton import (
    MAX_TRITON_BATCH,
    check_model_folder,
    check_version_files,
    export_repository,
    read_version_record,
    triton_label_lines,
)
from tests.conftest import one_line, train_exported_run, tree_hashes
from tests.serving.test_triton import _fake_engine


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, resnet18_sources) -> Path:
    return train_exported_run(tmp_path_factory.mktemp("hostile-export") / "run", resnet18_sources)


def _untouched(root: Path) -> dict[str, str]:
    """Every file under ``root`` but a run's lock, which a writing command owns."""
    return {name: digest for name, digest in tree_hashes(root).items() if not name.endswith(".lock")}


def _refused(error: type[Exception], call, *roots: Path) -> str:
    """``call()`` raises ``error`` with one line and leaves every file under ``roots`` as it was; returns the line."""
    before = [_untouched(root) for root in roots]
    listing = [sorted(p.name for p in root.iterdir()) for root in roots]
    with pytest.raises(error) as excinfo:
        call()
    assert [_untouched(root) for root in roots] == before
    assert [sorted(p.name for p in root.iterdir()) for root in roots] == listing  # no folder, link or file added
    return one_line(excinfo)


def _re_record(folder: Path, name: str, **details) -> None:
    """Re-record a changed file of a stand-in engine run, as anyone with write access can (a forged run)."""
    run = RunDir.open(folder)
    run.record_output(name, **details)


def _forge_plan(folder: Path, data: bytes, name: str = "model.plan") -> None:
    """Replace the engine with ``data`` and rewrite its sidecar's hash and the manifest to match."""
    (folder / name).write_bytes(data)
    sidecar = json.loads((folder / f"{name}.json").read_text())
    sidecar["engine_sha256"] = sha256_file(folder / name)
    (folder / f"{name}.json").write_text(json.dumps(sidecar, indent=2))
    _re_record(folder, f"{name}.json", kind="engine-sidecar", engine=name)
    _re_record(folder, name, kind="engine", precision="fp32", verified=True, compute_capability=sidecar["compute_capability"])


# --------------------------------------------------------------------------------------------
# engines: the plan header is checked on every engine the export copies
# --------------------------------------------------------------------------------------------
def test_random_bytes_with_a_matching_sidecar_hash_are_not_exported_as_a_plan(run_dir, tmp_path):
    """Before: exported (exit 0) -- only the sidecar's hash was compared, the header never read."""
    engine = _fake_engine(run_dir, tmp_path / "h100", (9, 0), 16)
    _forge_plan(engine, os.urandom(4096))
    message = _refused(CheckpointError, lambda: export_repository(engine, tmp_path / "repo", backend="tensorrt"),
                       tmp_path)
    assert message.startswith(f"{engine / 'model.plan'}: not a TensorRT plan")
    assert not (tmp_path / "repo").exists()


def test_a_forged_engine_for_another_gpu_is_refused_too(run_dir, tmp_path):
    h100 = _fake_engine(run_dir, tmp_path / "h100", (9, 0), 16)
    a100 = _fake_engine(run_dir, tmp_path / "a100", (8, 0), 16)
    _forge_plan(a100, b"\x08\x09\x12\x07pytorch" + bytes(64))  # an ONNX file's start, renamed to .plan
    message = _refused(CheckpointError, lambda: export_repository(
        h100, tmp_path / "repo", backend="tensorrt", engines=[a100 / "model.plan"]), tmp_path)
    assert message.startswith(f"{a100 / 'model.plan'}: not a TensorRT plan")


def test_a_plan_whose_header_names_another_tensorrt_than_its_sidecar_is_refused(run_dir, tmp_path):
    engine = _fake_engine(run_dir, tmp_path / "h100", (9, 0), 16)
    _forge_plan(engine, b"ftrt" + bytes(20) + bytes((10, 8, 0, 43)) + b"an engine of TensorRT 10.8")
    message = _refused(CheckpointError, lambda: export_repository(engine, tmp_path / "repo", backend="tensorrt"),
                       tmp_path)
    assert "plan header says TensorRT 10.8.0.43, the sidecar says 10.16.1.11" in message


def test_the_python_backend_checks_the_header_of_the_engine_it_serves(run_dir, tmp_path):
    engine = _fake_engine(run_dir, tmp_path / "h100", (9, 0), 16)
    _forge_plan(engine, b"junk" * 64)
    message = _refused(CheckpointError, lambda: export_repository(engine / "model.plan", tmp_path / "repo",
                                                                  backend="python"), tmp_path)
    assert "not a TensorRT plan" in message


# --------------------------------------------------------------------------------------------
# max_batch_size: bounded in the library, never written beyond what Triton accepts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [2**31, MAX_TRITON_BATCH + 1, 0, -1, True, 8.0])
def test_max_batch_outside_1_to_the_cap_is_refused(run_dir, tmp_path, max_batch):
    """Before: --max-batch 2147483648 was written into config.pbtxt (Triton then refused the model), exit 0."""
    message = _refused(MMExportError, lambda: export_repository(run_dir, tmp_path / "repo", max_batch=max_batch),
                       tmp_path, run_dir)
    assert message == f"max batch must be an integer from 1 to {MAX_TRITON_BATCH}, got {max_batch!r}"
    assert not (tmp_path / "repo").exists()


def test_a_sidecar_batch_maximum_of_10_to_the_400_is_refused(run_dir, tmp_path):
    engine = _fake_engine(run_dir, tmp_path / "h100", (9, 0), 16)
    sidecar = json.loads((engine / "model.plan.json").read_text())
    sidecar["batch_profile"]["max"] = 10**400
    (engine / "model.plan.json").write_text(json.dumps(sidecar))
    _re_record(engine, "model.plan.json", kind="engine-sidecar", engine="model.plan")
    message = _refused(CheckpointError, lambda: export_repository(engine, tmp_path / "repo", backend="tensorrt"),
                       tmp_path)
    assert "batch_profile.max must be an integer from 1 to 65536, got an integer of 401 digits" in message


def test_the_cli_refuses_a_max_batch_over_int32_with_exit_1_and_writes_nothing(run_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG", "COLUMNS")}
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "400", "NO_COLOR": "1"})
    before = _untouched(run_dir)
    result = subprocess.run([sys.executable, "-m", "mmexport", "fold", str(run_dir), "--to", "triton", "--repo",
                             str(tmp_path / "repo"), "--max-batch", "2147483648"],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "max batch must be an integer from 1 to 65536, got 2147483648" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "repo").exists() and _untouched(run_dir) == before


# --------------------------------------------------------------------------------------------
# odd --repo paths: one line naming the path and the cause, nothing written anywhere
# --------------------------------------------------------------------------------------------
def test_a_dangling_symlink_repo_is_named_and_its_target_not_created(run_dir, tmp_path):
    """Before: "…: cannot create it (File exists)"."""
    (tmp_path / "repo").symlink_to(tmp_path / "elsewhere" / "models")
    message = _refused(RunDirError, lambda: export_repository(run_dir, tmp_path / "repo"), tmp_path, run_dir)
    assert message == (f"{tmp_path / 'repo'}: is a symbolic link to {tmp_path / 'elsewhere' / 'models'}, which does not "
                       "exist; give an existing directory or a new path")
    assert not (tmp_path / "elsewhere").exists()


def test_a_repo_that_is_a_file_or_a_link_to_one_is_left_alone(run_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    (tmp_path / "link").symlink_to(notes)
    message = _refused(RunDirError, lambda: export_repository(run_dir, tmp_path / "link"), tmp_path, run_dir)
    assert message == f"{tmp_path / 'link'}: is a symbolic link to the file {notes}, not a directory (a model repository is a directory)"
    message = _refused(RunDirError, lambda: export_repository(run_dir, notes), tmp_path, run_dir)
    assert message == f"{notes}: is a file, not a directory (a model repository is a directory)"
    message = _refused(RunDirError, lambda: export_repository(run_dir, notes / "repo"), tmp_path, run_dir)
    assert message == f"{notes / 'repo'}: cannot be created: its parent {notes} is not a directory"
    assert notes.read_text() == "mine\n"


def test_a_model_folder_linked_out_of_the_repository_is_not_written_through(run_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model").symlink_to(outside)
    message = _refused(RunDirError, lambda: export_repository(run_dir, repo, name="model"), tmp_path, run_dir)
    assert message == f"{repo / 'model'}: is a symbolic link (to {outside}); refusing to write through it"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_an_unwritable_repo_is_refused_before_anything_is_written(run_dir, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    repo.chmod(0o555)
    try:
        message = _refused(RunDirError, lambda: export_repository(run_dir, repo), tmp_path, run_dir)
    finally:
        repo.chmod(0o755)
    assert message == f"{repo}: directory is not writable"


# --------------------------------------------------------------------------------------------
# labels: one rule for class names, and the folder check reads labels.txt as Triton does
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("odd", ["\u2028", "\x85", "\v", "\f"])
def test_class_names_with_other_line_breaks_are_not_exported(run_dir, tmp_path, odd):
    model = onnx.load(str(run_dir / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "classes":
            classes = json.loads(prop.value)
            classes[1] = f"mel{odd}anoma"
            prop.value = json.dumps(classes)
    loose = tmp_path / "loose" / "classifier.onnx"
    loose.parent.mkdir()
    onnx.save(model, str(loose))
    message = _refused(CheckpointError, lambda: export_repository(loose, tmp_path / "repo", allow_untracked=True),
                       tmp_path)
    assert "class 1" in message and str(loose) in message


def test_triton_label_lines_split_on_newline_only():
    assert triton_label_lines("a\nb\u2028c\nd\x85e\n") == ["a", "b\u2028c", "d\x85e"]
    assert triton_label_lines("a\r\nb") == ["a\r", "b"] and triton_label_lines("") == []


def test_the_folder_check_counts_labels_as_triton_does(run_dir, tmp_path):
    result = export_repository(run_dir, tmp_path / "repo", name="m")
    labels = result.model_dir / "labels.txt"
    classes = labels.read_text().split("\n")[:-1]
    assert check_model_folder(result.model_dir) == []
    # CRLF: Python's splitlines sees the same names, Triton reads "nevus\r" -- a problem, before reported as none
    labels.write_bytes("\r\n".join(classes).encode() + b"\r\n")
    assert any("labels.txt line 1 is 'nevus\\r'" in p for p in check_model_folder(result.model_dir))
    # a U+2028 inside a line: one line for Triton (before: counted as two, a false count mismatch)
    labels.write_text("\n".join([classes[0] + "\u2028x", *classes[1:]]) + "\n")
    problems = check_model_folder(result.model_dir)
    assert not any("lines" in p for p in problems) and any("line 1 is" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# the version record: validated when read; check_version_files for the Python model
# --------------------------------------------------------------------------------------------
def test_the_record_holds_the_sha256_of_every_file_the_version_serves(run_dir, tmp_path):
    h100 = _fake_engine(run_dir, tmp_path / "h100", (9, 0), 16)
    a100 = _fake_engine(run_dir, tmp_path / "a100", (8, 0), 16)
    multi = export_repository(h100, tmp_path / "repo", backend="tensorrt", name="multi", engines=[a100 / "model.plan"])
    record = read_version_record(multi.version_dir)
    assert set(record["files"]) == {"model.sm90.plan", "model.sm90.plan.json", "model.sm80.plan", "model.sm80.plan.json",
                                    "model_card.md"}  # the run's model card travels with the version, hashed too
    assert all(sha256_file(multi.version_dir / name) == digest for name, digest in record["files"].items())
    assert check_version_files(multi.version_dir) == []
    with open(multi.version_dir / "model.sm80.plan", "ab") as handle:
        handle.write(b"\0")
    altered = sha256_file(multi.version_dir / "model.sm80.plan")[:12]
    assert check_version_files(multi.version_dir) == [
        (f"{multi.version_dir / 'model.sm80.plan'} differs from the sha256 recorded in mmexport.json "
         f"({altered}…, recorded {record['files']['model.sm80.plan'][:12]}…: altered after export)")]

    python = export_repository(run_dir, tmp_path / "repo", backend="python", name="py")
    assert set(read_version_record(python.version_dir)["files"]) == {"model.onnx", "model.py", "model_card.md"}
    (python.version_dir / "model.onnx").unlink()
    (python.version_dir / "model.onnx").symlink_to(run_dir / "model.onnx")  # same bytes, but not the version's own file
    assert check_version_files(python.version_dir) == [f"{python.version_dir / 'model.onnx'} is not a regular file"]


RECORD_CASES = {
    "served artifact up the tree": (lambda r: r.update(served_artifact="../../run/model.onnx"),
                                    "field served_artifact must be a plain file name"),
    "served artifact absolute": (lambda r: r.update(served_artifact="/etc/passwd"), "field served_artifact must be"),
    "served artifact not hashed": (lambda r: r["files"].pop("model.onnx"), "whose sha256 the record does not hold"),
    "file name with a slash": (lambda r: r["files"].update({"sub/x": "0" * 64}), "not a plain file name"),
    "sha256 not hex": (lambda r: r["files"].update({"model.onnx": "z" * 64}), "must be a sha256"),
    "no files": (lambda r: r.pop("files"), "field files must be an object"),
    "classes a string": (lambda r: r["interface"].update(classes="abcde"), "classes must be a list of names"),
    "format": (lambda r: r.update(format="mmexport-triton/0"), "not an mmexport Triton record"),
}


@pytest.mark.parametrize("case", RECORD_CASES)
def test_forged_version_records_are_refused_in_one_line(run_dir, tmp_path, case):
    edit, fragment = RECORD_CASES[case]
    result = export_repository(run_dir, tmp_path / "repo", backend="python", name="m")
    path = result.version_dir / "mmexport.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as excinfo:
        read_version_record(result.version_dir)
    assert one_line(excinfo).startswith(f"{path}: ") and fragment in str(excinfo.value), str(excinfo.value)
    problems = check_version_files(result.version_dir)  # the Python model's check: a problem, not a traceback
    assert problems == [str(excinfo.value)]
    # the next export of the same model reads the record too: refused, nothing changed
    _refused(CheckpointError, lambda: export_repository(run_dir, tmp_path / "repo", backend="python", name="m"),
             tmp_path / "repo")


@pytest.mark.parametrize("text", ["[" * 10000 + "]" * 10000, '{"format": "mmexport-triton/1", "x": NaN}', "\xff"])
def test_records_that_are_not_bounded_json_are_one_line(run_dir, tmp_path, text):
    result = export_repository(run_dir, tmp_path / "repo", backend="python", name="m")
    (result.version_dir / "mmexport.json").write_bytes(text.encode("latin-1") if text == "\xff" else text.encode())
    with pytest.raises(CheckpointError) as excinfo:
        read_version_record(result.version_dir)
    assert "malformed JSON" in one_line(excinfo)


def test_check_version_files_imports_neither_torch_nor_onnx(run_dir, tmp_path):
    """The Triton Python model runs where torch and onnx are absent: the helper must work there."""
    result = export_repository(run_dir, tmp_path / "repo", backend="python", name="m")
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'tritonclient'):\n"
        "    sys.modules[name] = None  # import fails\n"
        "from mmexport.serving.version_record import check_version_files  # what the Python model imports\n"
        f"assert check_version_files({str(result.version_dir)!r}) == []\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_copied_repository_still_passes(run_dir, tmp_path):  # the checks hold for a valid export moved elsewhere
    result = export_repository(run_dir, tmp_path / "repo", backend="python", name="m")
    shutil.copytree(tmp_path / "repo", tmp_path / "moved")
    assert check_version_files(tmp_path / "moved" / "m" / "1") == [] and check_model_folder(tmp_path / "moved" / "m") == []
    assert result.max_batch_size == 32
