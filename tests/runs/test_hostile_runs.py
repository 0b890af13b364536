"""A writer changes no file outside its run, and no user's file inside it (issue 18, first group).

The lock beside the run is never followed to another file; a writer removes only the
temporary files of a writer whose token was recorded, never files that merely look
temporary; a manifest naming a path out of the run is refused; a staging path that is a
link or a file is refused, never followed; ``doctor`` says torch-side files need PyTorch
where it cannot be imported. Each case: one line, no traceback, other files byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmexport.errors import RunDirError
from mmexport.fileio import atomic_path, is_temporary_of, writer_token
from mmexport.runs.lock import lock_path, writes_run, writing
from mmexport.runs.manifest import MANIFEST_NAME, RunDir, is_run_relative_name, validate_manifest
from tests.conftest import one_line, tree_hashes


def _run(root: Path, name: str = "run") -> Path:
    run = RunDir.create(root / name, command="test")
    run.write_output("a.bin", lambda p: p.write_bytes(b"1"), "x")
    return run.publish()


def _untouched(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256, but the run locks: a writer owns its lock's holder record."""
    return {name: sha for name, sha in tree_hashes(root).items() if not name.endswith(".lock")}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "MMEXPORT_DEBUG"}
    return subprocess.run([sys.executable, "-m", "mmexport", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300, check=False)


def _assert_one_line_failure(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def _plant_user_files(run: Path) -> None:
    """Files of a user inside the run that look like temporaries of the old pattern rule (`.*.tmp`, `.trt-build-*`)."""
    (run / ".notes.tmp").write_text("n\n")
    (run / "sub").mkdir()
    (run / "sub" / ".x.tmp").write_text("x\n")
    (run / ".trt-build-mine").mkdir()
    (run / ".trt-build-mine" / "engine.plan").write_bytes(b"mine")
    (run / ".a.bin.abc12345.tmp").write_text("the old temporary shape, but the user's\n")


# -- the lock: never followed, never another file's name ------------------------------------------------------


def test_cli_writer_refuses_a_lock_symlinked_to_a_user_file(tmp_path):
    """The issue's case: `.RUN.lock` -> a user file; `verify RUN` truncated it to 0 bytes."""
    run = _run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    assert not lock_path(run).exists()  # a writer that finished removed its lock file
    lock_path(run).symlink_to(victim)
    before = tree_hashes(tmp_path)
    stderr = _assert_one_line_failure(_cli("verify", str(run), "--backend", "onnx", cwd=tmp_path))
    assert str(lock_path(run)) in stderr and "symbolic link" in stderr
    assert tree_hashes(tmp_path) == before and victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["symlink to a file", "dangling symlink", "hard link", "fifo", "directory"])
def test_lock_that_is_not_a_plain_file_of_its_own_is_refused(tmp_path, kind):
    run = _run(tmp_path)
    lock = lock_path(run)
    assert not lock.exists()  # a writer that finished removed its lock file
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if kind == "symlink to a file":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(tmp_path / "created-by-the-lock")
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    before = tree_hashes(tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunDirError) as info, writing(run, "test"):
        pytest.fail("the lock was taken")
    assert str(lock) in one_line(info)
    assert tree_hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    assert not (tmp_path / "created-by-the-lock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_lock_owned_by_a_third_user_is_refused(tmp_path):
    run = _run(tmp_path)
    lock_path(run).touch()  # a lock file of a writer still at work, or one killed
    os.chown(lock_path(run), 54321, 54321)  # neither this user nor the run's owner
    with pytest.raises(RunDirError, match="belongs to user 54321") as info, writing(run, "test"):
        pytest.fail("the lock was taken")
    one_line(info)
    os.chown(run, 54321, 54321)  # ... the run's owner: a shared run's lock is shared
    with writing(run, "test"):
        pass


@pytest.mark.parametrize("what", ["a file", "missing"])
def test_no_lock_file_is_made_beside_what_is_not_a_run(tmp_path, what):
    target = tmp_path / "notes.txt"
    if what == "a file":
        target.write_text("mine\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    @writes_run("test")
    def write(run):
        pytest.fail("ran without a run")

    for attempt in (lambda: writing(target, "test").__enter__(), lambda: write(target)):
        with pytest.raises(RunDirError) as info:
            attempt()
        assert str(target) in one_line(info)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .notes.txt.lock


@pytest.mark.parametrize("record", [
    "[" * 100000 + "]" * 100000,  # nesting that overflows json's recursion (and more than a record's size)
    '{"token": 1e400}', '{"token": "*"}', '{"token": "../.."}', '{"token": ""}', '["not", "a", "record"]',
    '{"token": "0123456789abcdef"}',  # a well-formed token: it names no file here
], ids=["deep", "overflow", "glob", "dotdot", "empty", "list", "other-token"])
def test_a_forged_lock_record_neither_breaks_the_writer_nor_deletes_user_files(tmp_path, record):
    run = _run(tmp_path)
    _plant_user_files(run)
    lock_path(run).write_text(record)
    before = tree_hashes(run)
    with writing(run, "test"):
        RunDir.open(run)
    assert tree_hashes(run) == before


def test_the_busy_line_escapes_a_forged_holder_record(tmp_path):
    import fcntl

    run = _run(tmp_path)
    lock_path(run).write_text(json.dumps({"pid": "1\n2", "command": "\x1b]0;owned\x07\x1b[2J", "since": "\u2028"}))
    holder = os.open(lock_path(run), os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: the writer below finds the run busy
        with pytest.raises(RunDirError, match="another command is writing this run") as info, writing(run, "test"):
            pytest.fail("the lock was taken")
        message = one_line(info)
        assert not any(ord(c) < 32 or c == "\u2028" for c in message), repr(message)
    finally:
        os.close(holder)


# -- cleanup: only what a recorded writer made -------------------------------------------------------------------


def test_cli_writer_keeps_user_files_that_look_temporary(tmp_path):
    """The issue's case: `echo n > RUN/.notes.tmp; mmexport verify RUN` deleted it."""
    run = _run(tmp_path)
    _plant_user_files(run)
    before = _untouched(tmp_path)
    _assert_one_line_failure(_cli("verify", str(run), "--backend", "onnx", cwd=tmp_path))  # (no ONNX in this run)
    assert _untouched(tmp_path) == before


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from mmexport.fileio import atomic_path, make_temporary_directory
    from mmexport.runs.lock import writing
    from mmexport.runs.manifest import RunDir

    run_path = Path(sys.argv[1])
    with writing(run_path, "killed writer"):
        run = RunDir.open(run_path)
        build = make_temporary_directory(run.path, "trt-build")  # an engine build's folder
        (build / "model.plan").write_bytes(b"half an engine")
        with atomic_path(run.file("model.onnx")) as tmp:
            with atomic_path(tmp) as nested:  # what a writer handed the temporary name does (ONNX, npz)
                nested.write_bytes(b"inner")
                tmp.write_bytes(b"half a model")
                run.stage("model.onnx", tmp, "onnx", {})
                print(tmp.name, nested.name, build.name, flush=True)
                os._exit(9)  # killed: no rename, no settle, no cleanup
    """
)


def test_a_killed_writers_temporaries_are_removed_by_the_next_writer_and_user_files_kept(tmp_path):
    run = _run(tmp_path)
    _plant_user_files(run)
    user_files = tree_hashes(run)
    manifest_before = json.loads((run / MANIFEST_NAME).read_text())
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(run)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert killed.returncode == 9, killed.stderr[-2000:]
    leftovers = killed.stdout.split()
    assert len(leftovers) == 3 and all((run / name).exists() for name in leftovers)
    assert "model.onnx" in json.loads((run / MANIFEST_NAME).read_text())["pending"]
    assert RunDir.open(run).manifest.get("pending")  # a reader settles nothing and removes nothing
    assert all((run / name).exists() for name in leftovers)

    with writing(run, "next writer"):
        settled = RunDir.open(run).manifest
    assert "pending" not in settled and settled["outputs"] == manifest_before["outputs"]
    assert not any((run / name).exists() for name in leftovers)
    assert tree_hashes(run) == user_files  # the user's look-alikes, byte for byte, and nothing of the killed writer


def test_a_killed_trainers_temporaries_are_removed_on_resume_and_not_published(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from mmexport.fileio import atomic_path
        from mmexport.runs.manifest import RunDir
        run = RunDir.create(sys.argv[1], command="train")
        run.write_output("a.bin", lambda p: p.write_bytes(b"1"), "x")
        with atomic_path(run.file("checkpoint.resume")) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            print(tmp.name, flush=True)
            os._exit(9)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert killed.returncode == 9, killed.stderr[-2000:]
    staging = tmp_path / ".run.partial"
    leftover = staging / killed.stdout.strip()
    assert leftover.is_file()
    (staging / ".notes.tmp").write_text("mine\n")
    resumed = RunDir.resume(tmp_path / "run")
    assert not leftover.exists() and (staging / ".notes.tmp").read_text() == "mine\n"
    assert resumed.manifest["staging_writers"] == [writer_token()]
    final = resumed.publish()
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    assert "staging_writers" not in manifest and set(manifest["outputs"]) == {"a.bin"}


def test_temporary_names_carry_the_writer_token(tmp_path):
    with atomic_path(tmp_path / "x.bin") as tmp:
        assert is_temporary_of(tmp.name, [writer_token()])
        assert not is_temporary_of(tmp.name, ["0" * 16])
        tmp.write_bytes(b"1")
    for name in (".notes.tmp", ".x.bin.abc12345.tmp", ".trt-build-mine", f"{writer_token()}.tmp",
                 f".x.{writer_token()}-a.txt"):
        assert not is_temporary_of(name, [writer_token()]), name


# -- names in the manifest: inside the run, or the manifest is refused -------------------------------------------


def _forge(run: Path, section: str, name: str, victim: Path) -> None:
    manifest = json.loads((run / MANIFEST_NAME).read_text())
    sha = hashlib.sha256(victim.read_bytes()).hexdigest()
    if section == "pending":
        manifest["pending"] = {name: {"sha256": sha, "size_bytes": victim.stat().st_size, "kind": "model", "entry": {},
                                      "verification": None}}
    else:
        manifest["outputs"][name] = {"kind": "model", "sha256": sha, "size_bytes": victim.stat().st_size,
                                     "created": "2025-01-01T00:00:00+00:00"}
    (run / MANIFEST_NAME).write_text(json.dumps(manifest))


OUT_OF_RUN = ["../victim.txt", "{victim}", "sub/../../victim.txt"]


@pytest.mark.parametrize("section", ["pending", "outputs"])
@pytest.mark.parametrize("name", OUT_OF_RUN, ids=["dotdot", "absolute", "dotdot-inside"])
def test_a_manifest_naming_a_file_outside_the_run_is_refused(tmp_path, section, name):
    run = _run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("victim data\n")
    name = name.format(victim=victim)
    _forge(run, section, name, victim)
    before = _untouched(tmp_path)
    for attempt in (lambda: RunDir.open(run), lambda: RunDir.writer(run, "next writer").__enter__()):
        with pytest.raises(RunDirError, match="not a relative path inside the run") as info:
            attempt()
        assert section in one_line(info)
    assert _untouched(tmp_path) == before  # nothing committed, nothing written


def test_cli_verify_manifest_refuses_a_forged_pending_name(tmp_path):
    """The issue's case: the next writer committed `../victim.txt` and `verify --manifest` called it intact."""
    run = _run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("victim data\n")
    _forge(run, "pending", "../victim.txt", victim)
    before = _untouched(tmp_path)
    for command in (["verify", str(run), "--backend", "onnx"], ["verify", str(run), "--manifest"]):
        stderr = _assert_one_line_failure(_cli(*command, cwd=tmp_path))
        assert "../victim.txt" in stderr and "intact" not in stderr
    assert _untouched(tmp_path) == before


@pytest.mark.parametrize("name", ["a//b", "a/", "./a", "a\\b", "a\x1b[2J", "a.bin\n", "a\u2028b", "", "."])
def test_malformed_names_are_refused_in_one_line(tmp_path, name):
    run = _run(tmp_path)
    manifest = json.loads((run / MANIFEST_NAME).read_text())
    manifest["outputs"][name] = manifest["outputs"]["a.bin"]
    with pytest.raises(RunDirError) as info:
        validate_manifest(manifest)
    message = one_line(info)
    assert "\x1b" not in message and "\u2028" not in message


def test_the_schema_refuses_the_same_names(tmp_path):
    """The published schema alone (other readers of manifest.json use it) refuses a path out of the run."""
    import jsonschema

    from mmexport.runs.manifest import manifest_schema

    run = _run(tmp_path)
    manifest = json.loads((run / MANIFEST_NAME).read_text())
    validator = jsonschema.Draft202012Validator(manifest_schema())
    assert validator.is_valid(manifest)
    for name in ("../victim.txt", "/etc/passwd", "a/../../b", "a.bin\n"):
        assert not validator.is_valid({**manifest, "outputs": {name: manifest["outputs"]["a.bin"]}}), name


def _oracle(name: str) -> bool:
    """An independent statement of the rule: a relative POSIX path, every segment a plain name."""
    if not name or "\\" in name or any(ord(c) < 32 or 127 <= ord(c) <= 159 or c in "\u2028\u2029" for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", ".", "..", "", "b.onnx", "\\", "\n", "\x85", "é", " ", "\u2028"]), max_size=6)
       .map("/".join) | st.text(max_size=12))
def test_the_name_rule_matches_its_statement(name):
    assert is_run_relative_name(name) == _oracle(name)


def test_a_pending_file_through_a_linked_folder_is_not_committed(tmp_path):
    run = _run(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("victim data\n")
    (run / "sub").symlink_to(outside)
    _forge(run, "pending", "sub/victim.txt", victim)
    before = tree_hashes(outside)
    with RunDir.writer(run, "next writer") as opened:
        assert "sub/victim.txt" not in opened.manifest["outputs"] and "pending" not in opened.manifest
        with pytest.raises(RunDirError, match="leads out of the run") as info:
            opened.write_output("sub/new.bin", lambda p: p.write_bytes(b"x"), "x")
        one_line(info)
    assert tree_hashes(outside) == before and sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_an_output_replaced_by_a_link_out_of_the_run_is_not_intact(tmp_path):
    run = _run(tmp_path)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"1")  # the recorded content, outside the run
    (run / "a.bin").unlink()
    (run / "a.bin").symlink_to(copy)
    with pytest.raises(RunDirError, match="leads out of the run") as info:
        RunDir.open(run).checked_file("a.bin")
    one_line(info)


# -- staging: a link or a file in its place is refused, never followed -------------------------------------------


@pytest.mark.parametrize("kind", ["symlink to a directory", "dangling symlink", "file"])
def test_a_staging_path_mmexport_did_not_make_is_refused(tmp_path, kind):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep\n")
    staging = tmp_path / ".run.partial"
    if kind == "symlink to a directory":
        staging.symlink_to(elsewhere)
    elif kind == "dangling symlink":
        staging.symlink_to(tmp_path / "created-through-the-link")
    else:
        staging.write_text("not a directory\n")
    before = tree_hashes(tmp_path)
    for attempt in (lambda: RunDir.create(tmp_path / "run"), lambda: RunDir.create(tmp_path / "run", force=True),
                    lambda: RunDir.resume(tmp_path / "run")):
        with pytest.raises(RunDirError) as info:
            attempt()
        message = one_line(info)
        assert str(staging) in message and ("symbolic link" in message or "not a directory" in message)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "created-through-the-link").exists()
    assert staging.is_symlink() or staging.is_file()


def test_cli_train_with_a_symlinked_staging_path_is_one_line(tmp_path):
    """The issue's case: `.RUN.partial` as a symlink gave "error: a file: OSError"."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep\n")
    (tmp_path / ".run.partial").symlink_to(elsewhere)
    before = tree_hashes(tmp_path)
    stderr = _assert_one_line_failure(_cli("train", "--arch", "resnet18", "--source-a", "scratch", "--source-b", "scratch",
                                           "--data", "synthetic:target?n_train=8&n_val=8&n_test=0", "--out", "run",
                                           "--force", cwd=tmp_path))
    assert ".run.partial" in stderr and "symbolic link" in stderr
    assert tree_hashes(tmp_path) == before and not (tmp_path / "run").exists()


def test_publish_and_abandon_do_not_follow_a_staging_path_replaced_by_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep\n")
    run = RunDir.create(tmp_path / "run")
    run.write_output("a.bin", lambda p: p.write_bytes(b"1"), "x")
    moved = tmp_path / "moved-away"
    os.rename(run.path, moved)
    run.path.symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="symbolic link") as info:
        run.publish()
    assert ".run.partial" in one_line(info)
    run.abandon()
    assert (elsewhere / "keep.txt").read_text() == "keep\n" and not (tmp_path / "run").exists()


def test_a_symlinked_destination_is_refused(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "run").symlink_to(target)
    with pytest.raises(RunDirError, match="symbolic link") as info:
        RunDir.create(tmp_path / "run")
    one_line(info)
    assert list(target.iterdir()) == [] and not (tmp_path / ".run.partial").exists()


# -- doctor where torch cannot be imported -----------------------------------------------------------------------


def test_doctor_says_torch_side_files_need_pytorch_when_it_cannot_be_imported(tmp_path, monkeypatch):
    from mmexport.runs.engine_build import doctor

    run = RunDir.create(tmp_path / "run")
    for name in ("folded.safetensors", "model.safetensors"):
        run.write_output(name, lambda p: p.write_bytes(b"weights"), "model")
    run.publish()
    assert {name: ok for name, ok, _ in doctor(tmp_path / "run").artifacts} == \
        {"folded.safetensors": True, "model.safetensors": True}  # here, with torch
    monkeypatch.setitem(sys.modules, "torch", None)  # installed, but `import torch` fails (a torch-free host)
    report = doctor(tmp_path / "run")
    torch_cap = next(c for c in report.capabilities if c.name == "torch")
    assert not torch_cap.available
    rows = {name: (ok, why) for name, ok, why in report.artifacts}
    for name in ("folded.safetensors", "model.safetensors"):
        ok, why = rows[name]
        assert ok is False and "needs PyTorch" in why and "pip install 'mmexport[torch]'" in why
