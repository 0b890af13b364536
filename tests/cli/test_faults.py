"""kill -9 inside every kind of write: the previous state survives and the next command works.

Each case runs a real ``mmexport`` process whose ``os.replace`` is patched to SIGKILL the
process at the moment it would publish one file (the temporary file beside it fully
written, so the kill lands inside the write). Afterwards the run directory must be
byte-identical to before (file list and sha256) except for the orphaned temporary
files, and the same command, run again normally, must succeed, publish the file,
and leave no temporary file behind (the next writer removes orphans under the run's
lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmexport.config import TrainConfig
from mmexport.torchside.train import train
from tests.conftest import tree_hashes

TIMEOUT = 300

# Runs the CLI with os.replace killing the process just before it publishes KILL_AT.
CHILD = r"""
import os, signal, sys
target = os.environ["KILL_AT"]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == target:
        with open(os.environ["KILL_NOTE"], "w") as note:
            note.write(os.fspath(src))
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from mmexport.cli.app import main
sys.argv = ["mmexport", *sys.argv[1:]]
main()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG",)}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _snapshot(root: Path, *, skip_temporary: bool = False) -> dict[str, str]:
    return {name: digest for name, digest in tree_hashes(root).items()
            if not (skip_temporary and _temporary(root / name))}


def _temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    return train(TrainConfig(arch="resnet18", source_a="scratch", source_b="scratch", data="synthetic:target?n_train=16&n_val=8&n_test=0",
                             out=str(root / "run"), merge_epochs=1, finetune_epochs=0, batch_size=8, device="cpu",
                             verify_samples=8, image_size=32))


# (id, command after the run path, the file whose publication is killed)
WRITES = [
    ("safetensors (fold)", ["fold", "{run}", "--to", "safetensors"], "folded.safetensors"),
    ("onnx (fold --to onnx)", ["fold", "{run}", "--to", "onnx"], "model.onnx"),
    ("manifest (verify records its result)", ["verify", "{run}", "--samples", "4"], "manifest.json"),
]


@pytest.mark.parametrize("command, target", [(c, t) for _, c, t in WRITES], ids=[w[0] for w in WRITES])
def test_kill_during_write_keeps_the_previous_state_and_the_next_command_works(base_run, tmp_path, command, target):
    run = Path(shutil.copytree(base_run, tmp_path / "run"))
    args = [a.format(run=run) for a in command]
    before = _snapshot(run)
    manifest_before = json.loads((run / "manifest.json").read_text())
    note = tmp_path / "killed-while-publishing"

    killed = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=TIMEOUT,
                            env={**_env(), "KILL_AT": target, "KILL_NOTE": str(note)})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    temporary = Path(note.read_text())
    assert temporary.parent == run and _temporary(temporary) and temporary.stat().st_size > 0  # inside the write
    survived = _snapshot(run, skip_temporary=True)
    # Every file but the manifest as it was, byte for byte; the manifest's outputs too.
    assert {k: v for k, v in survived.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    manifest_killed = json.loads((run / "manifest.json").read_text())
    # Outputs and verifications exactly as they were: the interrupted write is at most a pending
    # record (made just before the rename), which the next writer settles.
    pending = manifest_killed.pop("pending", {})
    assert manifest_killed == manifest_before
    assert set(pending) <= {target}
    orphans = [p for p in run.rglob("*") if _temporary(p)]
    assert orphans == [temporary]

    again = subprocess.run([sys.executable, "-m", "mmexport", *args], capture_output=True, text=True, timeout=TIMEOUT,
                           env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    assert not [p for p in run.rglob("*") if _temporary(p)], "orphaned temporary files were not removed"
    after = _snapshot(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert "pending" not in manifest
    if target == "manifest.json":
        assert len(manifest["verification"]) == len(manifest_before["verification"]) + 1
        assert manifest["verification"][-1]["passed"] is True
    else:
        assert target in manifest["outputs"] and manifest["outputs"][target]["sha256"] == after[target]
    # nothing else the run had was touched by the recovery (the model card is the manifest's render: it follows it)
    derived = (target, "manifest.json", "model_card.md")
    assert {k: v for k, v in after.items() if k not in derived} == {k: v for k, v in before.items() if k not in derived}
    assert manifest["outputs"]["model_card.md"]["sha256"] == after["model_card.md"]
    checked = subprocess.run([sys.executable, "-m", "mmexport", "verify", str(run), "--manifest"], capture_output=True,
                             text=True, timeout=TIMEOUT, env=_env())
    assert checked.returncode == 0, (checked.stdout[-2000:], checked.stderr[-2000:])


@pytest.mark.parametrize("renamed", [True, False], ids=["killed after the rename", "killed before the rename"])
def test_the_next_writer_settles_a_pending_write(base_run, tmp_path, renamed):
    from mmexport.runs.manifest import RunDir
    from mmexport.runs.lock import writing

    run_path = Path(shutil.copytree(base_run, tmp_path / "run"))
    before = json.loads((run_path / "manifest.json").read_text())
    with writing(run_path, "killed writer"):
        run = RunDir.open(run_path)
        tmp = run_path / ".extra.bin.x1y2.tmp"
        tmp.write_bytes(b"payload")
        run.stage("extra.bin", tmp, "test", {}, verification={"artifact": "extra.bin", "passed": True})
        if renamed:
            os.replace(tmp, run_path / "extra.bin")
        # ... and the process dies here: no settle
    readers_view = RunDir.open(run_path).manifest  # a reader without the lock changes nothing
    assert "extra.bin" in readers_view["pending"] and "extra.bin" not in readers_view["outputs"]
    with writing(run_path, "next writer"):
        settled = RunDir.open(run_path).manifest
    assert "pending" not in settled and settled == json.loads((run_path / "manifest.json").read_text())
    if renamed:
        assert settled["outputs"]["extra.bin"]["sha256"] == hashlib.sha256(b"payload").hexdigest()
        assert settled["verification"][-1] == {"artifact": "extra.bin", "passed": True}
    else:
        assert settled["outputs"] == before["outputs"] and settled["verification"] == before["verification"]
        # named by hand, by no recorded writer: kept; a killed writer's own temporaries are removed
        # (test_kill_during_write_*, tests/runs/test_hostile_runs.py)
        assert tmp.exists()
