"""``mmexport doctor`` with the serving rows: the Triton server, its Python backend, the stub's Python.

:func:`mmexport.runs.engine_build.doctor` probes what the runs layer knows (torch, ONNX
Runtime, TensorRT, the CUDA layer, the GPU); this module adds what ``serve`` and
``fold --to triton`` need and the runs layer may not import:

* ``tritonserver``: the binary :func:`~mmexport.serving.server.find_tritonserver` would
  start (``$MMEXPORT_TRITONSERVER``, the nvidia-pytriton wheel, or ``PATH``) and its
  version as far as it can be known without starting it (the wheel's version, or an NGC
  install's ``TRITON_VERSION`` file);
* ``triton python backend``: ``libtriton_python.so`` and the stub that runs ``model.py``;
* ``triton stub python``: the Python the stub will run -- this interpreter as it is, the
  prepared numpy<2 environment (``mmexport prepare-serving``), or ``$MMEXPORT_TRITON_PYTHON``
  -- and whether it is ready. Nothing is prepared, installed or started here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmexport.errors import MMExportError
from mmexport.runs.engine_build import Capability, DoctorReport
from mmexport.runs.engine_build import doctor as machine_doctor
from mmexport.serving.server import (
    ENV_PYTHON,
    TritonInstallation,
    find_tritonserver,
    stub_python_bin,
    stub_requirements,
)

SERVER_ROW = "tritonserver"
BACKEND_ROW = "triton python backend"
STUB_ROW = "triton stub python"


def _server_version(installation: TritonInstallation) -> str:
    """What can be known without starting the server: the wheel's version, else an NGC install's TRITON_VERSION."""
    if installation.source.startswith("nvidia-pytriton"):
        return installation.source
    try:  # an NGC install: /opt/tritonserver/{bin/tritonserver,TRITON_VERSION}
        text = (installation.binary.resolve().parent.parent / "TRITON_VERSION").read_text(errors="replace").strip()[:40]
    except OSError:
        text = ""
    if text and text.isprintable():
        return f"{installation.source}, Triton {text}"
    if os.environ.get("TRITON_SERVER_VERSION", "").strip():  # set in NVIDIA's containers
        return f"{installation.source}, Triton {os.environ['TRITON_SERVER_VERSION'].strip()[:40]}"
    return f"{installation.source}, version unknown until it starts (GET /v2)"


def _backend_row(installation: TritonInstallation) -> Capability:
    library = installation.backends / "python" / "libtriton_python.so"
    stub = installation.stub or installation.backends / "python" / "triton_python_backend_stub"
    missing = [str(path) for path in (library, stub) if not path.is_file()]
    if missing:
        return Capability(BACKEND_ROW, False, f"missing {', '.join(missing)}")
    return Capability(BACKEND_ROW, True, f"{library.parent}; stub {stub}")


def _stub_row(installation: TritonInstallation) -> Capability:
    try:
        requirements = stub_requirements(installation)
        bin_dir = stub_python_bin(installation)  # prepare=False: only says where, or why it is not ready
    except MMExportError as exc:
        return Capability(STUB_ROW, False, str(exc))
    except Exception as exc:  # noqa: BLE001 -- a probe: whatever breaks is the row's answer, not a crash of doctor
        return Capability(STUB_ROW, False, f"cannot tell ({type(exc).__name__}: {exc})")
    if os.environ.get(ENV_PYTHON):
        return Capability(STUB_ROW, True, f"${ENV_PYTHON}: {bin_dir / 'python3'} (used as is)")
    if requirements:
        return Capability(STUB_ROW, True, f"prepared ({', '.join(requirements)}): {Path(bin_dir).parent}")
    return Capability(STUB_ROW, True, f"this interpreter as it is ({Path(bin_dir) / 'python3'}; nothing to prepare)")


def triton_capabilities() -> list[Capability]:
    """The serving rows of ``doctor``: server binary (where, version), Python backend, the stub's Python."""
    try:
        installation = find_tritonserver()
    except MMExportError as exc:
        return [Capability(SERVER_ROW, False, str(exc)),
                Capability(BACKEND_ROW, False, "no tritonserver found (see above)"),
                Capability(STUB_ROW, False, "no tritonserver found (see above)")]
    server = Capability(SERVER_ROW, True, f"{installation.binary} ({_server_version(installation)})")
    return [server, _backend_row(installation), _stub_row(installation)]


def doctor(run_path: str | os.PathLike[str] | None = None) -> DoctorReport:
    """:func:`mmexport.runs.engine_build.doctor` and the Triton rows (:func:`triton_capabilities`)."""
    report = machine_doctor(run_path)
    report.capabilities.extend(triton_capabilities())
    return report


__all__ = ["BACKEND_ROW", "SERVER_ROW", "STUB_ROW", "doctor", "triton_capabilities"]
