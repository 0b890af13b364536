"""doctor's Triton rows: the server binary (where, which version), its Python backend, the stub's Python -- as they are."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

import pytest

from mmexport.serving import server
from mmexport.serving.diagnose import (
    BACKEND_ROW,
    SERVER_ROW,
    STUB_ROW,
    doctor,
    triton_capabilities,
)

HAS_PYTRITON = importlib.util.find_spec("pytriton") is not None


def _rows():
    return {cap.name: cap for cap in triton_capabilities()}


@pytest.fixture()
def no_configuration(monkeypatch, tmp_path):
    for name in (server.ENV_BINARY, server.ENV_PYTHON, "TRITON_SERVER_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no prepared stub environment here


@pytest.mark.skipif(not HAS_PYTRITON, reason="needs the nvidia-pytriton wheel (the test extra's serving step)")
def test_rows_of_the_installed_wheel(no_configuration, tmp_path, monkeypatch):
    rows = _rows()
    installation = server.find_tritonserver()
    version = importlib.metadata.version("nvidia-pytriton")
    assert rows[SERVER_ROW].available and rows[SERVER_ROW].detail == f"{installation.binary} (nvidia-pytriton {version})"
    assert rows[BACKEND_ROW].available and str(installation.stub) in rows[BACKEND_ROW].detail
    assert (installation.backends / "python" / "libtriton_python.so").is_file()
    requirements = server.stub_requirements(installation)
    stub = rows[STUB_ROW]
    if requirements:  # numpy 2 here: the stub needs its numpy<2 environment, which this empty cache lacks
        assert not stub.available and "prepare-serving" in stub.detail and "\n" not in stub.detail
        # prepared (what `mmexport prepare-serving` leaves): the row says so, and where
        ready = server.python_environment_path(requirements)
        (ready / "bin").mkdir(parents=True)
        (ready / "bin" / "python3").symlink_to(sys.executable)
        (ready / "mmexport-ready").write_text("{}\n")
        stub = _rows()[STUB_ROW]
        assert stub.available and str(ready) in stub.detail and requirements[0] in stub.detail
    else:
        assert stub.available and "this interpreter" in stub.detail
    # $MMEXPORT_TRITON_PYTHON is used as is
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").symlink_to(sys.executable)
    monkeypatch.setenv(server.ENV_PYTHON, str(venv))
    stub = _rows()[STUB_ROW]
    assert stub.available and str(venv / "bin" / "python3") in stub.detail and server.ENV_PYTHON in stub.detail


def test_rows_when_no_server_is_installed(no_configuration, monkeypatch, tmp_path):
    monkeypatch.setattr(server, "_from_pytriton", lambda: None)  # as if the wheel were not installed
    monkeypatch.setenv("PATH", str(tmp_path))  # and no tritonserver on PATH
    rows = _rows()
    assert [rows[name].available for name in (SERVER_ROW, BACKEND_ROW, STUB_ROW)] == [False, False, False]
    assert "no Triton Inference Server found" in rows[SERVER_ROW].detail and "nvidia-pytriton" in rows[SERVER_ROW].detail


def test_rows_of_a_configured_binary(no_configuration, monkeypatch, tmp_path):
    monkeypatch.setenv(server.ENV_BINARY, str(tmp_path / "missing" / "tritonserver"))
    rows = _rows()
    assert not rows[SERVER_ROW].available and "not an executable tritonserver" in rows[SERVER_ROW].detail
    # an NGC-style install: bin/tritonserver, backends/python, TRITON_VERSION
    root = tmp_path / "opt" / "tritonserver"
    (root / "bin").mkdir(parents=True)
    binary = root / "bin" / "tritonserver"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "triton_python_backend_stub").write_text("")
    (root / "TRITON_VERSION").write_text("2.51.0\n")
    monkeypatch.setenv(server.ENV_BINARY, str(binary))
    rows = _rows()
    assert rows[SERVER_ROW].available and rows[SERVER_ROW].detail == f"{binary} (${server.ENV_BINARY}, Triton 2.51.0)"
    assert not rows[BACKEND_ROW].available and "libtriton_python.so" in rows[BACKEND_ROW].detail
    (root / "backends" / "python" / "libtriton_python.so").write_text("")
    (root / "TRITON_VERSION").unlink()
    rows = _rows()
    assert rows[BACKEND_ROW].available and "version unknown until it starts" in rows[SERVER_ROW].detail


def test_doctor_report_and_cli_carry_the_rows(no_configuration):
    from mmexport.cli.app import app
    from typer.testing import CliRunner

    names = [cap.name for cap in doctor().capabilities]
    assert names[-3:] == [SERVER_ROW, BACKEND_ROW, STUB_ROW] and "onnxruntime" in names
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in (SERVER_ROW, BACKEND_ROW, STUB_ROW)), result.output
    assert os.environ.get(server.ENV_BINARY) is None
