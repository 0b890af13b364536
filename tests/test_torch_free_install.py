"""``pip install mmexport`` without PyTorch, proven in a real, fresh virtual environment.

The project is copied, built into a wheel with the parent's setuptools (what a user gets from an
index) and installed, core only, into a new ``python -m venv``: pip resolves the core
dependencies from the configured index (here PyPI and this machine's wheel cache). In that
environment ``import torch`` fails, and its own ``mmexport``:

* classifies PNG files of a run exported in the parent environment (``predict`` and
  ``mmexport.runtime.load``) with the parent's labels and logits;
* runs ``--help``, ``verify --backend onnx``, ``inspect`` and ``bench --engine onnx``, and refuses a torch-side command
  (``train``) with the one line naming the extra;
* serves the run through the real Triton server (nvidia-pytriton installed ``--no-deps``, as
  ``.ci/run`` does): ``serve`` first refuses in one line because the stub's numpy<2
  environment is not prepared, ``prepare-serving --wheels DIR`` prepares it from a folder of
  wheels with no index (the air-gapped route), and one image is classified over HTTP on
  127.0.0.1.

The sizes of both environments' site-packages and the runtime's import time in each are printed
(``pytest -s``). Slow (about a minute and a half on the 2-core machine); it skips only where a
virtual environment cannot be made, and never under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmexport import runtime
from mmexport.runtime.compare import compare_outputs
from mmexport.runtime.tolerances import FP32
from tests.conftest import train_exported_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "mmexport", "cli")
TORCH_EXTRA = ("torch", "torchvision", "onnxscript", "onnxconverter-common", "matplotlib", "scipy")
PIP_QUIET = ["--disable-pip-version-check", "--no-input", "-q"]


def _run(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _import_seconds(python: str | Path, env: dict[str, str] | None = None, repeats: int = 3) -> float:
    """The fastest of ``repeats`` fresh interpreters importing ``mmexport.runtime`` (interpreter start-up included)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        done = _run([str(python), "-c", "import mmexport.runtime"], timeout=120, env=env, cwd="/")
        assert done.returncode == 0, done.stderr[-2000:]
        best = min(best, time.perf_counter() - started)
    return best


@pytest.fixture(scope="module")
def core_env(tmp_path_factory):
    """A fresh virtual environment with ``pip install mmexport`` (the wheel of a copy of this checkout, core only)."""
    root = tmp_path_factory.mktemp("torchfree-install")
    source = root / "src"
    source.mkdir()
    for name in PROJECT_FILES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif item.is_file():
            shutil.copy2(item, source / name)
    built = _run([sys.executable, "-m", "pip", "wheel", *PIP_QUIET, "--no-deps", "--no-build-isolation",
                  "-w", str(root / "dist"), str(source)], timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("mmexport-*.whl"))
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    if made.returncode != 0:
        reason = f"cannot create a virtual environment here: {' '.join(made.stderr.split())[-300:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    python = venv / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", *PIP_QUIET, str(wheel)], timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # the environment as the venv's own commands see it: no parent packages, no debug tracebacks, a private cache
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMEXPORT_DEBUG", "MMEXPORT_TRITON_PYTHON",
                                                            "MMEXPORT_TRITONSERVER", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", COLUMNS="200", OMP_NUM_THREADS="1",
               XDG_CACHE_HOME=str(root / "cache"))
    return {"root": root, "venv": venv, "python": python, "mmexport": venv / "bin" / "mmexport", "site": site,
            "env": env, "core_size": _size(site)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, resnet18_sources):
    """A run trained and exported in the parent environment (with torch), and two real PNG files."""
    root = tmp_path_factory.mktemp("torchfree-run")
    run = train_exported_run(root / "run", resnet18_sources, image_size=32)
    rng = np.random.default_rng(5)
    pngs = []
    for index, (height, width) in enumerate(((90, 70), (64, 64))):
        path = root / f"lesion{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        pngs.append(path)
    return run, pngs


def _mmexport(core_env, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([str(core_env["mmexport"]), *args], timeout=timeout, cwd=cwd, env=core_env["env"])


def _one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_the_core_install_has_no_torch_and_is_small(core_env):
    python, site = core_env["python"], core_env["site"]
    blocked = _run([str(python), "-c", "import torch"], env=core_env["env"])
    assert blocked.returncode != 0 and "No module named 'torch'" in blocked.stderr
    listed = json.loads(_run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                             env=core_env["env"]).stdout)
    names = {row["name"].lower() for row in listed}
    assert "mmexport" in names and not names & set(TORCH_EXTRA), sorted(names & set(TORCH_EXTRA))
    assert {"numpy", "onnx", "onnxruntime", "pillow", "safetensors", "jsonschema", "typer", "rich"} <= names
    # the package itself is the wheel, not this checkout
    where = _run([str(python), "-c", "import mmexport; print(mmexport.__file__)"], env=core_env["env"], cwd="/")
    assert where.stdout.strip().startswith(str(site)), where.stdout
    parent_site = Path(sysconfig.get_path("purelib"))
    torch_side = sum(_size(parent_site / name) for name in ("torch", "torchvision", "nvidia", "triton")
                     if (parent_site / name).is_dir())
    core_time, parent_time = _import_seconds(python, core_env["env"]), _import_seconds(sys.executable)
    print(f"\ncore venv site-packages: {_mib(core_env['core_size'])}; the parent's torch, torchvision, nvidia and "
          f"triton packages: {_mib(torch_side)}; `import mmexport.runtime` (fresh interpreter): core venv "
          f"{core_time:.2f} s, parent {parent_time:.2f} s")
    assert core_env["core_size"] < 600 * 2**20  # PyTorch alone is over 700 MiB (CPU wheel), 4 GiB with CUDA


def test_predict_and_the_runtime_classify_pngs_as_the_parent_does(core_env, exported):
    run, pngs = exported
    with runtime.load(run / "model.onnx") as predictor:  # the parent's answer (torch installed there)
        expected = predictor.predict([str(p) for p in pngs])
    script = ("import json, sys; from mmexport import runtime\n"
              "with runtime.load(sys.argv[1]) as p:\n"
              "    r = p.predict(sys.argv[2:])\n"
              "print(json.dumps({'labels': list(r.labels), 'logits': r.logits.tolist(),"
              " 'torch': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))}))\n")
    done = _run([str(core_env["python"]), "-c", script, str(run / "model.onnx"), *map(str, pngs)],
                env=core_env["env"], cwd=run.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["torch"] == [] and answer["labels"] == list(expected.labels)
    assert compare_outputs(np.asarray(answer["logits"], dtype=np.float32), expected.logits, FP32).passed

    predicted = _mmexport(core_env, ["predict", str(run), *map(str, pngs), "--json", str(run.parent / "p.json"),
                                     "--top", "1"], run.parent)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = json.loads((run.parent / "p.json").read_text())
    text = json.dumps(rows)
    for png, label in zip(pngs, expected.labels):
        assert png.name in text and label in predicted.stdout
    assert predicted.stdout.count(expected.labels[0]) >= 1


def test_verify_inspect_help_and_a_torch_side_command(core_env, exported, tmp_path):
    run, _ = exported
    helped = _mmexport(core_env, ["--help"], tmp_path)
    assert helped.returncode == 0 and "prepare-serving" in helped.stdout and "train" in helped.stdout
    verified = _mmexport(core_env, ["verify", str(run), "--backend", "onnx"], run.parent)
    assert verified.returncode == 0 and "verification passed" in verified.stdout, verified.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["verification"][-1]["command"] == "verify" and manifest["verification"][-1]["passed"]
    inspected = _mmexport(core_env, ["inspect", str(run)], run.parent)
    assert inspected.returncode == 0 and "resnet18" in inspected.stdout, inspected.stderr[-3000:]
    benched = _mmexport(core_env, ["bench", str(run), "--engine", "onnx", "--models", "folded", "--batch-sizes", "1",
                                   "--iterations", "3", "--rounds", "1", "--warmup", "0",
                                   "--json", str(tmp_path / "bench.json")], run.parent)
    assert benched.returncode == 0, benched.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert "folded" in json.dumps(results) and "onnx" in json.dumps(results)
    for args, command in ((["train", "--arch", "resnet18", "--data", "synthetic:target", "--out", str(tmp_path / "t"),
                            "--source-a", "scratch", "--source-b", "scratch"], "train"),
                          (["fold", str(run), "--to", "onnx"], "fold"), (["demo", "--out", str(tmp_path / "d")], "demo")):
        _one_error_line(_mmexport(core_env, args, tmp_path), f"mmexport {command} needs PyTorch: pip install 'mmexport[torch]'")
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()


def _classify_over_http(port: int, model: str, png: bytes) -> np.ndarray:
    """One encoded image to ``model`` (input image_bytes) with Triton's binary-data extension; the logits back."""
    header = json.dumps({"inputs": [{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(png) + 4}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                     data=header + struct.pack("<I", len(png)) + png, method="POST",
                                     headers={"Content-Type": "application/octet-stream",
                                              "Inference-Header-Content-Length": str(len(header))})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    output = answer["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def _model_ready(port: int, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_serve_needs_the_prepared_environment_then_classifies_over_http(core_env, exported, tmp_path):
    from mmexport.serving.server import STUB_NUMPY, free_ports

    run, pngs = exported
    python, env = core_env["python"], core_env["env"]
    added = _run([str(python), "-m", "pip", "install", *PIP_QUIET, "--no-deps", "nvidia-pytriton==0.7.0"], timeout=600,
                 env=env)
    assert added.returncode == 0, added.stderr[-3000:]
    print(f"\ncore venv site-packages with nvidia-pytriton: {_mib(_size(core_env['site']))}")

    # serve before the installation step: one line naming it, before any repository or pip run
    repository = tmp_path / "repo"
    refused = _mmexport(core_env, ["serve", str(run), "--repo", str(repository)], tmp_path)
    _one_error_line(refused, "numpy", "mmexport prepare-serving")
    assert not repository.exists() and not (core_env["root"] / "cache" / "mmexport" / "triton-python").exists()

    # the air-gapped route: a folder of wheels made where an index is reachable, installed with no index
    wheels = tmp_path / "wheels"
    fetched = _run([sys.executable, "-m", "pip", "download", *PIP_QUIET, STUB_NUMPY, "--only-binary", ":all:",
                    "-d", str(wheels)], timeout=600)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    prepared = _mmexport(core_env, ["prepare-serving", "--wheels", str(wheels)], tmp_path, timeout=600)
    assert prepared.returncode == 0 and "created in" in prepared.stdout, prepared.stdout + prepared.stderr[-3000:]
    again = _mmexport(core_env, ["prepare-serving", "--wheels", str(wheels)], tmp_path)
    assert again.returncode == 0 and "already prepared" in again.stdout, again.stderr[-2000:]

    http, grpc, metrics = free_ports(3)
    server = subprocess.Popen([str(core_env["mmexport"]), "serve", str(run), "--name", "lesions", "--http-port", str(http),
                               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--ready-timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not _model_ready(http, "lesions"):
            assert server.poll() is None, server.communicate(timeout=30)[1][-3000:]
            assert time.monotonic() < deadline, "mmexport serve was not ready within 150 s"
            time.sleep(0.5)
        logits = _classify_over_http(http, "lesions", pngs[0].read_bytes())
        with runtime.load(run / "model.onnx") as predictor:
            expected = predictor.predict([str(pngs[0])])
        assert int(np.argmax(logits[0])) == int(np.argmax(expected.logits[0]))
        assert compare_outputs(logits, expected.logits, FP32).passed
        server.send_signal(signal.SIGINT)  # Ctrl-C: the CLI stops tritonserver and exits
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0 and "tritonserver stopped" in out, (out[-2000:], err[-2000:])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
