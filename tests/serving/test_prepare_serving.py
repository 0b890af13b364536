"""Serving without the network: ``prepare-serving`` is the installation step, ``serve`` never runs pip.

* ``serve`` on a host whose Triton Python-backend stub needs the numpy<2 environment and does not
  have it stops with one line naming ``mmexport prepare-serving`` before anything is written (no
  repository version, no cache folder, no pip run);
* ``prepare-serving --wheels DIR`` installs from that folder only (``--no-index``): a folder
  without the wheel fails in one line and publishes no environment, a missing folder is named;
* ``--preprocess`` has one default: on for the Python backend in ``serve`` and in
  ``fold --to triton`` (off, and refused, for Triton's native backends).

The full route (a folder of wheels, the prepared environment, a real server, an image over HTTP)
runs in a fresh torch-free virtual environment in ``tests/test_torch_free_install.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmexport.errors import MissingDependencyError, MMExportError
from tests.conftest import train_exported_run, tree_hashes


def _stub_needs_an_environment() -> None:
    """Skip (with the reason) where this host's Triton stub runs on this Python as it is."""
    from mmexport.serving.server import find_tritonserver, stub_requirements

    try:
        installation = find_tritonserver()
    except MissingDependencyError as exc:
        if os.environ.get("MMEXPORT_REQUIRE_TRITON") == "1":
            pytest.fail(f"MMEXPORT_REQUIRE_TRITON=1 but: {exc}")
        pytest.skip(str(exc))
    if not stub_requirements(installation):
        pytest.skip(f"{installation.source} runs on this Python as it is (numpy < 2): no environment to prepare")


def _cli(args: list[str], cwd: Path, **env_changes: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG", "MMEXPORT_TRITON_PYTHON", "COLUMNS")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="400", NO_COLOR="1", **env_changes)
    return subprocess.run([sys.executable, "-m", "mmexport", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300, check=False)


def _one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, resnet18_sources) -> Path:
    return train_exported_run(tmp_path_factory.mktemp("prepare") / "run", resnet18_sources, image_size=32)


def test_serve_without_the_prepared_environment_says_so_before_anything(run_dir, tmp_path):
    _stub_needs_an_environment()
    cache = tmp_path / "cache"  # an empty cache: nothing prepared on this "host"
    before = tree_hashes(run_dir)
    result = _cli(["serve", str(run_dir), "--repo", str(tmp_path / "repo")], tmp_path, XDG_CACHE_HOME=str(cache))
    line = _one_line(result, "needs numpy>=1.24,<2", "mmexport prepare-serving", "--wheels DIR")
    assert "MMEXPORT_TRITON_PYTHON" in line
    assert not (tmp_path / "repo").exists() and not cache.exists()  # no repository version, no pip, no cache folder
    assert tree_hashes(run_dir) == before


def test_prepare_serving_with_a_wheel_folder_uses_no_index(tmp_path, monkeypatch):
    from mmexport.serving.server import (
        STUB_NUMPY,
        prepare_serving,
        python_environment_path,
    )

    _stub_needs_an_environment()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MMEXPORT_TRITON_PYTHON", raising=False)
    with pytest.raises(MMExportError) as missing:
        prepare_serving(wheels=tmp_path / "nowhere")
    assert str(missing.value).startswith(f"{tmp_path / 'nowhere'}: no such folder of wheels")
    assert f"pip download '{STUB_NUMPY}'" in str(missing.value)
    empty = tmp_path / "wheels"
    empty.mkdir()
    with pytest.raises(MissingDependencyError) as failed:
        prepare_serving(wheels=empty)  # --no-index: pip finds nothing rather than reaching any index
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"could not install {STUB_NUMPY} for Triton's Python backend")
    target = python_environment_path((STUB_NUMPY,))
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_prepare_serving_with_mmexport_triton_python_uses_it_as_is(tmp_path, monkeypatch):
    from mmexport.serving.server import prepare_serving

    _stub_needs_an_environment()
    monkeypatch.setenv("MMEXPORT_TRITON_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(MissingDependencyError, match="no bin/python3 there"):
        prepare_serving()
    monkeypatch.setenv("MMEXPORT_TRITON_PYTHON", str(Path(sys.executable).parent.parent))
    prepared = prepare_serving()
    assert prepared.configured == str(Path(sys.executable).parent.parent) and prepared.environment is None


def test_preprocess_has_one_default_for_the_python_backend(run_dir, tmp_path):
    import typer
    from mmexport.cli.app import app
    from typer.testing import CliRunner

    commands = typer.main.get_command(app).commands
    serve_default = next(p.default for p in commands["serve"].params if p.name == "preprocess")
    fold_default = next(p.default for p in commands["fold"].params if p.name == "preprocess")
    assert serve_default is True and fold_default is None  # None: decided by --backend, below

    repo = tmp_path / "repo"

    def fold(*args: str):
        return CliRunner().invoke(app, ["fold", str(run_dir), "--to", "triton", "--repo", str(repo), *args])

    python = fold("--backend", "python", "--name", "py")
    assert python.exit_code == 0, python.output
    assert "image_bytes" in (repo / "py" / "config.pbtxt").read_text()  # as `serve`: encoded images accepted
    native = fold("--name", "ort")
    assert native.exit_code == 0, native.output
    assert "image_bytes" not in (repo / "ort" / "config.pbtxt").read_text()
    refused = fold("--name", "ort", "--preprocess")
    assert isinstance(refused.exception, MMExportError) and "needs backend python" in str(refused.exception)
    plain = fold("--backend", "python", "--name", "plain", "--no-preprocess")
    assert plain.exit_code == 0 and "image_bytes" not in (repo / "plain" / "config.pbtxt").read_text()
