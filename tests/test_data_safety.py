"""Nothing lost: --force and the demo delete only what mmexport provably made; user output paths never replace run files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmexport.demo import DEMO_MARKER, DemoLedger, _prepare
from mmexport.errors import RunDirError
from mmexport.runs.manifest import MANIFEST_NAME, RunDir


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _demo_dir(tmp_path: Path) -> Path:
    out = tmp_path / "demo"
    out.mkdir()
    ledger = DemoLedger(out, {"arch": "resnet18"})
    ledger.claim("sources", "run")
    (out / "sources").mkdir()
    (out / "sources" / "pigment.safetensors").write_bytes(b"weights")
    (out / "run").mkdir()
    (out / "run" / "manifest.json").write_text("{}")
    ledger.record()
    return out


def test_a_folder_with_a_demo_json_is_not_wiped(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / DEMO_MARKER).write_text('{"status": "complete"}')
    (project / "important.txt").write_text("keep me")
    (project / "src" / "main.py").write_text("print()")
    before = _tree(project)
    for force in (False, True):
        with pytest.raises(RunDirError, match="no demo ledger"):
            _prepare(project, force)
        assert _tree(project) == before


def test_earlier_demo_is_removed_exactly(tmp_path):
    out = _demo_dir(tmp_path)
    _prepare(out, False)
    assert out.is_dir() and not any(out.iterdir())


def test_user_files_beside_a_demo_are_kept_and_refused(tmp_path):
    out = _demo_dir(tmp_path)
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    for force in (False, True):
        with pytest.raises(RunDirError, match="did not make"):
            _prepare(out, force)
        assert _tree(out) == before


def test_changed_or_interrupted_demo_files_need_force(tmp_path):
    out = _demo_dir(tmp_path)
    (out / "sources" / "pigment.safetensors").write_bytes(b"changed")
    (out / "run" / "half-written.tmp").write_bytes(b"interrupted step")  # inside a claimed directory
    with pytest.raises(RunDirError, match="--force"):
        _prepare(out, False)
    assert (out / "run" / "half-written.tmp").exists()
    with pytest.raises(RunDirError, match="changed since"):  # a changed *recorded* file is never deleted
        _prepare(out, True)
    (out / "sources" / "pigment.safetensors").write_bytes(b"weights")
    _prepare(out, True)
    assert not any(out.iterdir())


def _published_run(tmp_path: Path) -> Path:
    run = RunDir.create(tmp_path / "run", command="test")
    run.write_output("model.bin", lambda p: p.write_bytes(b"model"), "x")
    return run.publish()


def test_force_never_deletes_what_the_run_did_not_make(tmp_path):
    run = _published_run(tmp_path)
    (run / "notes").mkdir()
    (run / "notes" / "important.txt").write_text("thesis notes")
    before = _tree(run)
    with pytest.raises(RunDirError, match="did not make"):
        RunDir.create(run, force=True)
    assert _tree(run) == before
    (run / "notes" / "important.txt").unlink()
    (run / "notes").rmdir()
    (run / "model.bin").write_bytes(b"edited by hand")
    with pytest.raises(RunDirError, match="altered"):
        RunDir.create(run, force=True)


def test_force_does_not_trust_a_hand_written_manifest(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": "mmexport-run/2"}))  # 29 bytes, no run
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    before = _tree(folder)
    with pytest.raises(RunDirError, match="not a valid mmexport run"):
        RunDir.create(folder, force=True)
    assert _tree(folder) == before


def test_force_replaces_a_clean_run(tmp_path):
    run = _published_run(tmp_path)
    replacement = RunDir.create(run, force=True, command="again")
    replacement.write_output("other.bin", lambda p: p.write_bytes(b"new"), "x")
    replacement.publish()
    assert sorted(_tree(run)) == [MANIFEST_NAME, "other.bin"]


@pytest.mark.parametrize("name", [MANIFEST_NAME, "model.bin"])
def test_output_paths_may_not_replace_run_files(tmp_path, name):
    run = _published_run(tmp_path)
    with pytest.raises(RunDirError, match="refusing to overwrite"):
        RunDir.open(run).refuse_overwrite(run / name)
    RunDir.open(run).refuse_overwrite(run / "bench.json")  # a new file inside the run is fine
