"""One writer at a time: two real processes writing the same run, and a run replaced under a writer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmexport.errors import RunDirError
from mmexport.runs.lock import lock_path, writing
from mmexport.runs.manifest import RunDir


def _run(tmp_path: Path) -> Path:
    run = RunDir.create(tmp_path / "run", command="test")
    run.write_output("a.bin", lambda p: p.write_bytes(b"1"), "x")
    return run.publish()


HOLD = textwrap.dedent(
    """
    import sys, time
    from mmexport.runs.lock import writing
    with writing(sys.argv[1], "holder (test)"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _hold(run: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_writer_gets_one_line_naming_the_holder(tmp_path):
    run = _run(tmp_path)
    holder = _hold(run, 30)
    try:
        with pytest.raises(RunDirError) as info, writing(run, "second"):
            pass
        message = str(info.value)
        assert "another command is writing this run" in message and "holder (test)" in message
        assert f"pid {holder.pid}" in message and "\n" not in message
        # the CLI gives the same line and exit 1
        result = subprocess.run([sys.executable, "-m", "mmexport", "verify", str(run), "--backend", "onnx"],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 1 and "another command is writing this run" in result.stderr
        assert result.stderr.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()
    with writing(run, "after"):  # the lock died with its holder (flock is released by the kernel)
        pass


def test_waiting_writer_gets_the_lock_when_the_holder_finishes(tmp_path):
    run = _run(tmp_path)
    holder = _hold(run, 1.0)
    try:
        start = time.monotonic()
        with writing(run, "patient", wait=30):
            waited = time.monotonic() - start
        assert holder.wait(timeout=30) == 0
        assert waited > 0.3  # it really waited for the holder
    finally:
        holder.kill()


def test_concurrent_writers_lose_no_manifest_update(tmp_path):
    run = _run(tmp_path)
    script = textwrap.dedent(
        """
        import sys
        from mmexport.runs.manifest import RunDir
        from mmexport.runs.lock import writing
        for index in range(15):
            with writing(sys.argv[1], "writer " + sys.argv[2], wait=60):
                opened = RunDir.open(sys.argv[1])
                opened.add_verification({"artifact": "a.bin", "writer": sys.argv[2], "index": index, "passed": True,
                                         "tolerance": {"name": "fp32"}, "input_sets": []})
        """
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(run), str(n)]) for n in range(3)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0, 0]
    records = json.loads((run / "manifest.json").read_text())["verification"]
    assert sorted((r["writer"], r["index"]) for r in records) == sorted((str(w), i) for w in range(3) for i in range(15))


def test_a_run_replaced_under_a_writer_is_not_overwritten_with_the_old_manifest(tmp_path):
    run = _run(tmp_path)
    opened = RunDir.open(run)  # e.g. a verify that opened the run ...
    replacement = RunDir.create(tmp_path / "run", force=True, command="train --force")  # ... then train --force
    replacement.publish()
    new_id = json.loads((run / "manifest.json").read_text())["run_id"]
    with pytest.raises(RunDirError, match="replaced while this command ran"):
        opened.add_verification({"artifact": "a.bin", "passed": True, "tolerance": {"name": "fp32"}, "input_sets": []})
    assert json.loads((run / "manifest.json").read_text())["run_id"] == new_id


def test_lock_file_lives_beside_the_run(tmp_path):
    run = _run(tmp_path)
    assert lock_path(run) == tmp_path / ".run.lock"
    with writing(run, "x"), writing(run, "nested"):  # re-entrant in one process
        assert lock_path(run).exists()
        with writing(run, "nested again"):
            pass
        assert lock_path(run).exists()  # only the outermost release removes it
    assert not (run / ".run.lock").exists()


def test_a_finished_writer_removes_its_lock_file_and_a_failed_one_leaves_its_record(tmp_path):
    run = _run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # publishing took the lock and removed it
    with writing(run, "finishes"):
        assert json.loads(lock_path(run).read_text())["command"] == "finishes"
    assert not lock_path(run).exists()
    with pytest.raises(ValueError), writing(run, "fails"):
        raise ValueError("a writer that fails")
    # the record of a writer that did not finish stays for the next one (it removes that writer's temporaries)
    assert json.loads(lock_path(run).read_text())["command"] == "fails"
    with writing(run, "next"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


COUNT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mmexport.runs.lock import writing
    counter = Path(sys.argv[1]) / "counter.txt"
    for _ in range(int(sys.argv[2])):
        with writing(sys.argv[1], "counter", wait=120):
            value = int(counter.read_text())  # read, pause, write: two holders at once would lose an update
            time.sleep(0.002)
            counter.write_text(str(value + 1))
    """
)


def test_removing_the_lock_file_on_release_never_lets_two_writers_in(tmp_path):
    """Waiters blocked on a file its holder removes re-lock the name's new file: no update is lost."""
    run = _run(tmp_path)
    (run / "counter.txt").write_text("0")
    processes = [subprocess.Popen([sys.executable, "-c", COUNT, str(run), "40"]) for _ in range(4)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0, 0, 0]
    assert (run / "counter.txt").read_text() == "160"
    assert not lock_path(run).exists()
