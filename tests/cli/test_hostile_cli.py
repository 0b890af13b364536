"""Hostile and careless use of the deployment commands: one line, a non-zero exit, no traceback, nothing changed.

One tiny run is trained and exported once; every case gets its own copy of it, runs one
``python -m mmexport`` command against it, and checks that the command failed with one
line on stderr (exit 1) or a usage error (exit 2), printed no traceback, and left the run
directory byte-identical (file list and sha256 of every file) — except where recording a
failed check in the manifest is the correct outcome (``records``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import train_exported_run, tree_hashes

TIMEOUT = 300


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # run copy -> command arguments
    expect: str  # a fragment the one-line error must contain
    prepare: Callable[[Path], None] = lambda run: None
    records: bool = False  # the manifest may gain a (failed) verification record
    exit_codes: tuple[int, ...] = (1,)
    limit_file_size: int | None = None
    outcome: dict = field(default_factory=dict)


def _tamper(name: str) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        data = bytearray((run / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (run / name).write_bytes(bytes(data))
    return prepare


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        path = run / "manifest.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return prepare


def _text(content: str) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        (run / "manifest.json").write_text(content)
    return prepare


def _readonly(run: Path) -> None:
    for path in [run, *run.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


CASES = [
    # fold
    Case("fold to an unknown format", lambda r: ["fold", str(r), "--to", "ONNX"], "choose one of safetensors, pt, onnx, trt, triton"),
    Case("fold unknown precision", lambda r: ["fold", str(r), "--to", "onnx", "--precision", "fp64"], "unknown precision"),
    Case("negative calibration count", lambda r: ["fold", str(r), "--to", "onnx", "--precision", "int8", "--calib-images", "-5"], "--calib-images must be a positive integer"),
    Case("zero calibration images", lambda r: ["fold", str(r), "--to", "onnx", "--precision", "int8", "--calib-images", "0"], "--calib-images must be a positive integer"),
    Case("unknown calibration method", lambda r: ["fold", str(r), "--to", "onnx", "--precision", "int8", "--calib-method", "mean"], "calibration method"),
    Case("unknown int8 target", lambda r: ["fold", str(r), "--to", "onnx", "--precision", "int8", "--int8-target", "gpu"], "int8 target"),
    Case("int8 search budget nan", lambda r: ["fold", str(r), "--to", "onnx", "--precision", "int8", "--int8-max-float", "nan"], "max_float_fraction"),
    Case("tensorrt without tensorrt", lambda r: ["fold", str(r), "--to", "trt"], "TensorRT"),
    Case("engine profile of zero", lambda r: ["fold", str(r), "--to", "trt", "--max-batch", "0"], "--max-batch must be at least 1"),
    Case("triton without a repository", lambda r: ["fold", str(r), "--to", "triton"], "--repo"),
    Case("triton unknown backend", lambda r: ["fold", str(r), "--to", "triton", "--repo", str(r.parent / "repo"), "--backend", "gpu"], "backend"),
    Case("fold a folder that is no run", lambda r: ["fold", str(r.parent)], "not an mmexport run directory"),
    Case("fold a missing run", lambda r: ["fold", str(r / "nope")], "no such run directory"),
    # verify
    Case("negative samples", lambda r: ["verify", str(r), "--samples", "-3"], "--samples must be a positive integer"),
    Case("zero samples on the torch backend", lambda r: ["verify", str(r), "--samples", "0"], "--samples must be a positive integer, got 0"),
    Case("unknown backend", lambda r: ["verify", str(r), "--backend", "gpu"], "unknown backend"),
    Case("unknown verify precision", lambda r: ["verify", str(r), "--backend", "onnx", "--precision", "fp64"], "unknown precision"),
    Case("no engine to verify", lambda r: ["verify", str(r), "--backend", "trt"], "no trt artifact"),
    Case("zero samples are refused up front", lambda r: ["verify", str(r), "--backend", "onnx", "--samples", "0"], "--samples must be a positive integer"),
    Case("tampered final weights", lambda r: ["verify", str(r)], "altered", prepare=_tamper("model.safetensors")),
    Case("tampered reference", lambda r: ["verify", str(r), "--backend", "onnx"], "altered", prepare=_tamper("reference.npz")),
    Case("tampered onnx", lambda r: ["verify", str(r), "--backend", "onnx"], "altered", prepare=_tamper("model.onnx")),
    Case("missing reference", lambda r: ["verify", str(r), "--backend", "onnx"], "missing", prepare=lambda r: (r / "reference.npz").unlink()),
    Case("altered file named by verify --manifest", lambda r: ["verify", str(r), "--manifest"], "differ from the manifest", prepare=_tamper("coefficients.png")),
    # bench
    Case("duration nan", lambda r: ["bench", str(r), "--duration", "nan"], "--duration"),
    Case("warm-up inf", lambda r: ["bench", str(r), "--warmup", "inf"], "--warmup"),
    Case("batch sizes not numbers", lambda r: ["bench", str(r), "--batch-sizes", "1,x"], "--batch-sizes"),
    Case("batch size zero", lambda r: ["bench", str(r), "--batch-sizes", "0"], "batch size must be a positive integer"),
    Case("bench tensorrt without tensorrt", lambda r: ["bench", str(r), "--engine", "trt"], "TensorRT"),
    Case("unknown bench model", lambda r: ["bench", str(r), "--models", "folded,triple"], "unknown model"),
    Case("bench json onto the manifest", lambda r: ["bench", str(r), "--json", str(r / "manifest.json")], "refusing to overwrite"),
    Case("bench plot onto the model", lambda r: ["bench", str(r), "--plot", str(r / "model.safetensors")], "refusing to overwrite"),
    Case("zero threads", lambda r: ["bench", str(r), "--threads", "0"], "--threads"),
    Case("unmerged at int8", lambda r: ["bench", str(r), "--precision", "int8", "--models", "unmerged"], "fp32 only"),
    Case("zero iterations", lambda r: ["bench", str(r), "--iterations", "0"], "--iterations"),
    Case("int8 bench without the int8 artifact", lambda r: ["bench", str(r), "--precision", "int8", "--models", "folded"], "make it with"),
    # inspect
    Case("inspect plot onto the manifest", lambda r: ["inspect", str(r), "--plot", str(r / "manifest.json")], "PNG"),
    Case("inspect plot onto a tracked png", lambda r: ["inspect", str(r), "--plot", str(r / "coefficients.png")], "refusing to overwrite"),
    # run directories
    Case("manifest is a list", lambda r: ["inspect", str(r)], "expected a JSON object, got list", prepare=_text("[1, 2]")),
    Case("manifest is a string", lambda r: ["verify", str(r)], "expected a JSON object, got str", prepare=_text('"run"')),
    Case("manifest nested too deeply", lambda r: ["fold", str(r)], "manifest", prepare=_text("[" * 100000 + "]" * 100000)),
    Case("manifest not json", lambda r: ["bench", str(r)], "unreadable manifest", prepare=_text("{not json")),
    Case("output entry without sha256", lambda r: ["inspect", str(r)], "sha256",
         prepare=_manifest(lambda m: {**m, "outputs": {**m["outputs"], "model.onnx": {"kind": "onnx", "size_bytes": 1, "created": ""}}})),
    Case("verification list missing", lambda r: ["verify", str(r), "--backend", "onnx"], "verification",
         prepare=_manifest(lambda m: {k: v for k, v in m.items() if k != "verification"})),
    Case("run of mmexport 0.1", lambda r: ["inspect", str(r)], "mmexport 0.1.0 (manifest format mmexport-run/1)",
         prepare=_manifest(lambda m: {**m, "format": "mmexport-run/1", "environment": {**m["environment"], "mmexport": "0.1.0"}})),
    Case("read-only run", lambda r: ["fold", str(r), "--to", "pt"], "", prepare=_readonly),
    Case("lock wait nan", lambda r: ["--lock-wait", "nan", "inspect", str(r)], "--lock-wait", exit_codes=(2,)),
    Case("file size limit during export", lambda r: ["fold", str(r), "--to", "onnx", "--precision", "fp16"], "file size limit",
         limit_file_size=2_000_000, records=True),
    # doctor / serve
    Case("doctor of a missing run", lambda r: ["doctor", str(r / "nope")], "no such run directory"),
    Case("serve a missing run", lambda r: ["serve", str(r / "nope")], "nope"),
    Case("serve an unknown precision", lambda r: ["serve", str(r), "--precision", "fp64"], "precision"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, resnet18_sources):
    root = tmp_path_factory.mktemp("hostile")
    return train_exported_run(root / "run", resnet18_sources, image_size=32)


def _execute(case: Case, base: Path, workdir: Path) -> Case:
    run = shutil.copytree(base, workdir / "run")
    case.prepare(run)
    before = tree_hashes(run)
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG", "COLUMNS")}
    env["OMP_NUM_THREADS"] = "1"

    def limits() -> None:
        if case.limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.limit_file_size, case.limit_file_size))

    result = subprocess.run([sys.executable, "-m", "mmexport", *case.args(run)], capture_output=True, text=True,
                            env=env, timeout=TIMEOUT, preexec_fn=limits)
    if case.prepare is _readonly:
        for path in [run, *run.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    after = tree_hashes(run)
    try:  # some cases plant manifests that are not JSON, or nested too deeply to parse
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        manifest = None
    case.outcome = {"code": result.returncode, "stderr": result.stderr, "stdout": result.stdout,
                    "before": before, "after": after, "manifest": manifest,
                    "leftovers": [str(p) for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".trt-build")]}
    shutil.rmtree(run)  # ~270 MB per copy: 50 copies would hold >13 GB until pytest prunes its temp dirs
    return case


@pytest.fixture(scope="module")
def outcomes(exported, tmp_path_factory):
    workdirs = [tmp_path_factory.mktemp(f"case{i}") for i in range(len(CASES))]
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda pair: _execute(pair[0], exported, pair[1]), zip(CASES, workdirs)))
    return {case.name: case for case in done}


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(outcomes, name):
    if name == "read-only run" and os.geteuid() == 0:
        pytest.skip("running as root: file modes do not stop root's writes, so no read-only run can be made")
    case = outcomes[name]
    out = case.outcome
    stderr = out["stderr"]
    assert out["code"] in case.exit_codes, (out["code"], stderr[-2000:], out["stdout"][-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    if out["code"] == 1:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-2000:]
        assert case.expect in lines[0], lines[0]
    else:
        assert case.expect in stderr, stderr[-2000:]
    if case.records:
        changed = {k for k in set(out["before"]) | set(out["after"]) if out["before"].get(k) != out["after"].get(k)}
        assert changed <= {"manifest.json"}, changed  # only the failed check was recorded
        if out["after"].get("manifest.json") != out["before"].get("manifest.json"):
            assert out["manifest"]["verification"][-1]["passed"] is False
    else:
        assert out["after"] == out["before"]
    assert not out["leftovers"]
