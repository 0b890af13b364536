"""Run directories (mmexport.runs.manifest): staged then published, --force, resume, altered outputs, atomic writes."""

import json

import pytest

from mmexport.errors import RunDirError
from mmexport.fileio import atomic_path, sha256_file, write_bytes_atomic
from mmexport.runs.manifest import MANIFEST_NAME, RunDir


def test_run_is_staged_then_published(tmp_path):
    run = RunDir.create(tmp_path / "run", command="test")
    assert not (tmp_path / "run").exists() and run.path.name == ".run.partial"
    run.write_output("weights.bin", lambda p: p.write_bytes(b"abc"), "model", stage="x")
    final = run.publish()
    assert final == tmp_path / "run" and (final / "weights.bin").read_bytes() == b"abc"
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    entry = manifest["outputs"]["weights.bin"]
    assert entry["sha256"] == sha256_file(final / "weights.bin") and entry["size_bytes"] == 3 and entry["stage"] == "x"
    assert manifest["environment"]["packages"]["torch"] and manifest["command"] == "test"
    # the run alone: the lock file that serialised its publishing went with the writer that finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_abandoned_run_leaves_nothing(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.write_output("a.bin", lambda p: p.write_bytes(b"1"), "x")
    run.abandon()
    assert list(tmp_path.iterdir()) == []


def test_existing_run_needs_force_and_only_runs_are_replaced(tmp_path):
    first = RunDir.create(tmp_path / "run")
    first.write_output("old.bin", lambda p: p.write_bytes(b"old"), "x")
    first.publish()
    with pytest.raises(RunDirError, match="not empty.*--force"):
        RunDir.create(tmp_path / "run")
    second = RunDir.create(tmp_path / "run", force=True)
    assert (tmp_path / "run" / "old.bin").exists()  # the old run survives until the new one is complete
    second.publish()
    assert not (tmp_path / "run" / "old.bin").exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(RunDirError, match="not an mmexport run"):
        RunDir.create(other, force=True)
    assert (other / "keep.jpg").exists()


def test_empty_existing_directory_is_accepted(tmp_path):
    (tmp_path / "run").mkdir()
    RunDir.create(tmp_path / "run").publish()
    assert (tmp_path / "run" / MANIFEST_NAME).exists()


def test_altered_output_is_detected(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.write_output("m.bin", lambda p: p.write_bytes(b"weights"), "model")
    run.publish()
    reopened = RunDir.open(tmp_path / "run")
    assert reopened.checked_file("m.bin").read_bytes() == b"weights"
    (tmp_path / "run" / "m.bin").write_bytes(b"weighTs")
    with pytest.raises(RunDirError, match="altered"):
        reopened.checked_file("m.bin")
    with pytest.raises(RunDirError, match="records no"):
        reopened.checked_file("other.bin")


def test_open_rejects_non_runs(tmp_path):
    with pytest.raises(RunDirError, match="no such run"):
        RunDir.open(tmp_path / "missing")
    with pytest.raises(RunDirError, match="no manifest.json"):
        RunDir.open(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable"):
        RunDir.open(tmp_path)


def test_atomic_write_keeps_previous_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    write_bytes_atomic(target, b"v1")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"v1"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_into_unwritable_directory_is_a_clear_error(tmp_path, monkeypatch):
    # chmod cannot make a directory read-only for root (CI runs as root), so simulate
    # what a read-only file system does: creating the temporary file fails.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(RunDirError, match="cannot write here"):
        write_bytes_atomic(tmp_path / "x", b"1")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_can_be_resumed_or_discarded(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.write_output("a.bin", lambda p: p.write_bytes(b"1"), "x")
    (run.path / "checkpoint.resume").write_bytes(b"checkpoint")
    with pytest.raises(RunDirError, match="--resume"):
        RunDir.create(tmp_path / "run")
    resumed = RunDir.resume(tmp_path / "run")
    assert "a.bin" in resumed.manifest["outputs"] and resumed.manifest["resumed"]
    final = resumed.publish()
    assert (final / "a.bin").exists() and not (final / "checkpoint.resume").exists()
    with pytest.raises(RunDirError, match="no interrupted run"):
        RunDir.resume(tmp_path / "run")
    RunDir.create(tmp_path / "other")
    RunDir.create(tmp_path / "other", force=True).publish()  # --force discards the interrupted one
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["other", "run"]
