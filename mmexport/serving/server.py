"""A Triton Inference Server on this machine: the launcher, and ``serve`` (a run's artifact behind it).

:class:`TritonServer` starts ``tritonserver`` on a model repository and stops it again:

* the binary comes from the ``nvidia-pytriton`` wheel (``pytriton/tritonserver/bin``:
  Triton with the Python backend, runs on a CPU-only host), from ``$MMEXPORT_TRITONSERVER``
  or from ``tritonserver`` on ``PATH`` (an NGC container), see :func:`find_tritonserver`;
* HTTP, gRPC and metrics listen on loopback ports the code picks (or the caller's), on
  ``127.0.0.1`` unless told otherwise;
* requested ports are bind-checked before anything is written; readiness is polled on
  ``/v2/health/ready`` within a (finite, bounded) timeout and counts only when ``/v2``
  reports this launch's ``--id`` and the process started here listens on its ports; a
  server that exits or never gets ready is an :class:`~mmexport.errors.MMExportError`
  whose one line carries the tail of the server's log (:attr:`TritonServer.log_path`);
* stopping sends SIGTERM, then SIGKILL to the server's process group after a timeout
  (the Python backend's stub processes included); the context manager, a finaliser,
  ``atexit``, SIGTERM/SIGHUP/Ctrl-C unwinding the stack from the first step of
  :func:`serve` to the end, a guardian process that acts when the owner is SIGKILLed,
  and (Linux) a parent-death signal make sure neither the server nor the temporary
  folders outlive their owner; folders a dead owner still left (named after its pid and
  start time, with an owner record) are removed by the next start
  (:func:`remove_dead_owners_leftovers`).

The wheel's Python-backend stub (``triton_python_backend_stub``) links
``libpython3.X.so.1.0`` dynamically. Under an interpreter that is not the system's
(pyenv, a relocated build) the loader would pick the *system* libpython while the
stub imports the running interpreter's standard library and packages: two patch levels
of Python mixed in one process, which fails at model load (e.g. ``'_thread.RLock' object
has no attribute '_recursion_count'``). :func:`server_environment` therefore puts the
running interpreter's own ``LIBDIR`` first on ``LD_LIBRARY_PATH``. The stub's embedded
Python ignores ``PYTHONPATH``/``PYTHONHOME`` and finds its site-packages through the
``python3`` first on ``PATH``: that is the running interpreter's directory, or (the wheel's
stub being built for numpy 1.x, see :func:`stub_requirements`) a small cached virtual
environment with numpy<2 that sees every package of the running interpreter
(:func:`prepare_python_environment`).

:func:`serve` exports a run's verified artifact as a Python-backend repository
(:func:`mmexport.serving.triton.export_repository`; a temporary one unless ``repo`` is given)
and yields a :class:`ServingSession` with the endpoints while the server runs.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmexport.errors import MissingDependencyError, MMExportError
from mmexport.jsonread import parse_json_object
from mmexport.progress import ProgressSink, sink
from mmexport.serving.triton import export_repository, read_version_record

PYTRITON_HINT = "pip install nvidia-pytriton (it ships tritonserver with the Python backend, Linux x86-64/aarch64)"
ENV_BINARY = "MMEXPORT_TRITONSERVER"
DEFAULT_READY_TIMEOUT = 120.0
DEFAULT_STOP_TIMEOUT = 15.0
CONTROL_MODES = ("none", "poll", "explicit")
LOOPBACK = "127.0.0.1"
_STANDARD_LIBDIRS = {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                     "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu"}


# --------------------------------------------------------------------------------------------
# finding the server
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonInstallation:
    """Where the server binary, its backends and (for the pytriton wheel) the per-Python stubs and libraries are."""
    binary: Path
    backends: Path  # a directory with one folder per backend (python/ holds libtriton_python.so)
    stub: Path | None  # the Python-backend stub to use; None: backends/python/ already has one
    libraries: Path | None  # the wheel's bundled shared libraries (nvidia_pytriton.libs)
    source: str  # "nvidia-pytriton <version>", "$MMEXPORT_TRITONSERVER", "PATH"

    def describe(self) -> str:
        return f"{self.binary} ({self.source})"


def _python_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _from_pytriton() -> TritonInstallation | None:
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    stubs = root / "python_backend_stubs"
    stub = stubs / _python_version() / "triton_python_backend_stub"
    if not stub.is_file():
        have = ", ".join(sorted(p.name for p in stubs.iterdir())) if stubs.is_dir() else "none"
        raise MissingDependencyError(f"nvidia-pytriton has no Python-backend stub for Python {_python_version()} "
                                     f"(it has {have}); run mmexport under one of those")
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstallation(binary, root / "backends", stub, libs if libs.is_dir() else None, f"nvidia-pytriton {version}")


def _from_binary(binary: Path, source: str) -> TritonInstallation:
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise MissingDependencyError(f"{binary}: not an executable tritonserver ({source})")
    backends = binary.resolve().parent.parent / "backends"
    if not (backends / "python").is_dir():
        raise MissingDependencyError(f"{binary}: no Python backend beside it ({backends / 'python'} is missing)")
    if not (backends / "python" / "triton_python_backend_stub").is_file():
        raise MissingDependencyError(f"{binary}: the Python backend beside it has no triton_python_backend_stub")
    return TritonInstallation(binary, backends, None, None, source)


def find_tritonserver() -> TritonInstallation:
    """``$MMEXPORT_TRITONSERVER``, else the nvidia-pytriton wheel's server, else ``tritonserver`` on ``PATH``."""
    configured = os.environ.get(ENV_BINARY)
    if configured:
        return _from_binary(Path(configured).expanduser(), f"${ENV_BINARY}")
    found = _from_pytriton()
    if found is not None:
        return found
    on_path = shutil.which("tritonserver")
    if on_path:
        return _from_binary(Path(on_path), "PATH")
    raise MissingDependencyError(f"no Triton Inference Server found: {PYTRITON_HINT}, or set ${ENV_BINARY}")


def python_library_dir() -> Path | None:
    """The directory of the running interpreter's shared ``libpython`` (None: a static build or a system one)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not soname or not (Path(libdir) / soname).exists():
        return None
    return Path(libdir)


# -- the stub's Python ------------------------------------------------------------------------
# The stub embeds Python in isolated mode: PYTHONPATH and PYTHONHOME are ignored, and the
# interpreter finds its prefix (and so its site-packages) by looking for ``python3`` on PATH,
# as a shell would (a ``pyvenv.cfg`` beside it makes that prefix a virtual environment). The
# first directory on the server's PATH therefore chooses the packages model.py imports.
#
# The stub of nvidia-pytriton 0.7.0 (Triton 2.51) is built against numpy 1.x (pybind11's
# array interop): under numpy 2 every tensor it hands to Python reads as zeros and BYTES
# tensors fail to deserialise (measured; the wheel pins numpy<2 for this reason). When the
# running interpreter has numpy 2, the stub gets its own small virtual environment: numpy<2
# in its own site-packages, then, through a .pth file, every site directory of the running
# interpreter (mmexport, ONNX Runtime, Pillow, editable installs included).
STUB_NUMPY = "numpy>=1.24,<2"
ENV_PYTHON = "MMEXPORT_TRITON_PYTHON"


def _numpy_major() -> int:
    import numpy

    return int(numpy.__version__.split(".")[0])


def stub_requirements(installation: TritonInstallation) -> tuple[str, ...]:
    """Packages the stub's Python needs beyond the running interpreter's (empty: it can use this one as is)."""
    if installation.source.startswith("nvidia-pytriton") and _numpy_major() >= 2:
        return (STUB_NUMPY,)
    return ()


def _site_directories() -> list[str]:
    import site

    dirs = [p for p in sys.path if p and os.path.isdir(p) and Path(p).name in ("site-packages", "dist-packages")]
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user and os.path.isdir(user) and user not in dirs:
        dirs.append(user)
    return dirs


def python_path_entries() -> list[str]:
    """What the stub's Python must import from: the running interpreter's site directories, then mmexport's root."""
    import mmexport

    entries = _site_directories()
    root = str(Path(mmexport.__file__).resolve().parent.parent)
    if root not in entries:
        entries.append(root)
    return entries


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmexport" / "triton-python"


def python_environment_path(requirements: Sequence[str]) -> Path:
    """Where the stub's environment for this interpreter, these site directories and requirements lives."""
    import hashlib

    key = json.dumps([sys.executable, sys.version, python_path_entries(), sorted(requirements)])
    return _cache_root() / f"py{_python_version()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _environment_ready(path: Path) -> bool:
    return (path / "bin" / "python3").exists() and (path / "mmexport-ready").is_file()


def _wheel_args(wheels: str | os.PathLike[str] | None) -> list[str]:
    """pip's offline arguments for a folder of wheels (``--no-index --find-links DIR``); [] for None."""
    if wheels is None:
        return []
    folder = Path(wheels).expanduser().absolute()
    if not folder.is_dir():
        raise MMExportError(f"{folder}: no such folder of wheels (make one on a connected machine: "
                            f"pip download '{STUB_NUMPY}' --only-binary :all: -d DIR)")
    return ["--no-index", "--find-links", str(folder)]


def _check_stub_python(path: Path, requirements: Sequence[str]) -> None:
    """The prepared environment's python3 imports the pinned numpy first, then mmexport.runtime (the model's imports)."""
    code = ("import numpy, mmexport.runtime, sys; "
            "sys.exit(0 if int(numpy.__version__.split('.')[0]) < 2 else 'numpy ' + numpy.__version__ + ' comes first')")
    result = subprocess.run([str(path / "bin" / "python3"), "-c", code], capture_output=True, text=True, timeout=120,
                            check=False)
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split())[-300:]
        raise MissingDependencyError(f"the Python environment of Triton's Python backend ({', '.join(requirements)}) "
                                     f"does not work: {detail}")


def prepare_python_environment(installation: TritonInstallation | None = None, *, progress: ProgressSink | None = None,
                               pip_args: Sequence[str] = (),
                               wheels: str | os.PathLike[str] | None = None) -> Path | None:
    """Create (once; cached under ``~/.cache/mmexport/triton-python``) the stub's environment; None when none is needed.

    A virtual environment of the running interpreter without pip, whose own
    site-packages gets the stub's requirements (``pip install --target``, from the
    package index pip is configured for: ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, pip.conf;
    ``pip_args`` are passed on), and a ``.pth`` file that adds every site directory of the
    running interpreter after it. ``wheels``: a folder of wheels to install from with no
    index at all (an air-gapped host: ``pip download 'numpy>=1.24,<2' -d DIR`` on a
    connected machine of the same platform and Python). The environment is checked (its
    ``python3`` imports numpy<2 and ``mmexport.runtime``) before it is published.
    """
    progress = sink(progress)
    installation = installation or find_tritonserver()
    requirements = stub_requirements(installation)
    if not requirements:
        return None
    pip_args = [*_wheel_args(wheels), *pip_args]
    final = python_environment_path(requirements)
    if _environment_ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.{os.getpid()}.{os.urandom(3).hex()}"
    progress.message(f"preparing the Python of Triton's Python backend ({', '.join(requirements)}) in {final}")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(staging)], check=True, capture_output=True,
                       timeout=300)
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(staging), "platbase": str(staging)}))
        purelib.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet",
                                 "--disable-pip-version-check", "--target", str(purelib), *pip_args, *requirements],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            detail = " ".join((result.stderr or result.stdout).split())[-400:]
            raise MissingDependencyError(f"could not install {', '.join(requirements)} for Triton's Python backend: {detail}")
        lines = ["import site"] + [f"site.addsitedir({entry!r})" for entry in python_path_entries()]
        (purelib / "zz-mmexport-parent-sites.pth").write_text("; ".join(lines) + "\n", encoding="utf-8")
        _check_stub_python(staging, requirements)
        (staging / "mmexport-ready").write_text(json.dumps({"requirements": list(requirements),
                                                            "python": sys.executable}) + "\n", encoding="utf-8")
        try:
            os.rename(staging, final)
        except OSError:
            if not _environment_ready(final):  # not another process that finished first
                raise
    except subprocess.SubprocessError as exc:
        raise MissingDependencyError(f"could not create the Python environment of Triton's Python backend ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def stub_python_bin(installation: TritonInstallation, *, prepare: bool = False,
                    progress: ProgressSink | None = None) -> Path:
    """The directory whose ``python3`` the stub will run: ``$MMEXPORT_TRITON_PYTHON``, the prepared environment, or this one."""
    configured = os.environ.get(ENV_PYTHON)
    if configured:
        root = Path(configured).expanduser()
        bin_dir = root / "bin" if (root / "bin").is_dir() else root
        if not (bin_dir / "python3").exists():
            raise MissingDependencyError(f"${ENV_PYTHON}={configured}: no bin/python3 there")
        return bin_dir
    requirements = stub_requirements(installation)
    if requirements:
        path = python_environment_path(requirements)
        if not _environment_ready(path):
            if not prepare:
                raise MissingDependencyError(
                    f"Triton's Python-backend stub ({installation.source}) needs {', '.join(requirements)} and this Python "
                    f"has numpy {__import__('numpy').__version__}: prepare its environment once at installation with "
                    "`mmexport prepare-serving` (offline: --wheels DIR; or serve --prepare-python), "
                    f"or set ${ENV_PYTHON} to a virtual environment that has them"
                )
            path = prepare_python_environment(installation, progress=progress)
        return path / "bin"
    return Path(sys.executable).parent


@dataclass(frozen=True)
class ServingPreparation:
    """What :func:`prepare_serving` found or made: the server, and the stub's Python environment if it needs one."""
    installation: TritonInstallation
    requirements: tuple[str, ...]  # empty: the stub runs on this Python as it is
    environment: Path | None  # the prepared environment (None: none needed, or $MMEXPORT_TRITON_PYTHON)
    configured: str | None = None  # $MMEXPORT_TRITON_PYTHON when set (used as is, nothing prepared)
    created: bool = False  # False: it was already there


def prepare_serving(*, wheels: str | os.PathLike[str] | None = None, pip_args: Sequence[str] = (),
                    progress: ProgressSink | None = None) -> ServingPreparation:
    """The installation step of ``serve``: find the Triton server and prepare its Python-backend environment.

    Run once after installing (``mmexport prepare-serving``), where the package index (or a
    folder of wheels: ``wheels``) can be reached, so that ``serve`` itself never runs pip:
    an air-gapped server then serves with what is on its disk. Idempotent.
    """
    installation = find_tritonserver()
    configured = os.environ.get(ENV_PYTHON)
    if configured:
        stub_python_bin(installation)  # checks it has bin/python3
        return ServingPreparation(installation, (), None, configured=configured)
    requirements = stub_requirements(installation)
    if not requirements:
        return ServingPreparation(installation, (), None)
    existed = _environment_ready(python_environment_path(requirements))
    path = prepare_python_environment(installation, progress=progress, pip_args=pip_args, wheels=wheels)
    return ServingPreparation(installation, requirements, path, created=not existed)


def server_environment(installation: TritonInstallation, base: dict[str, str] | None = None,
                       python_bin: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The environment ``tritonserver`` (and the Python-backend stub it starts) runs with.

    ``LD_LIBRARY_PATH``: the running interpreter's ``LIBDIR`` first when it is not a
    system directory (so the stub loads *this* libpython, not the system's: two patch
    levels mixed fail at model load), then the wheel's bundled libraries, then what was
    there. ``PATH``: ``python_bin`` (default: the running interpreter's directory) first,
    which is how the stub's embedded Python finds its prefix and site-packages.
    """
    env = dict(os.environ if base is None else base)
    library_path: list[str] = []
    libdir = python_library_dir()
    if libdir is not None and str(libdir) not in _STANDARD_LIBDIRS:
        library_path.append(str(libdir))
    if installation.libraries is not None:
        library_path.append(str(installation.libraries))
    if env.get("LD_LIBRARY_PATH"):
        library_path.append(env["LD_LIBRARY_PATH"])
    if library_path:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
    first = str(python_bin) if python_bin is not None else str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([first] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != first])
    return env


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (held open together while they are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --------------------------------------------------------------------------------------------
# what a serving process owns: temporary folders, the server's process group, shared memory
# --------------------------------------------------------------------------------------------
# Every temporary folder is named mmexport-<kind>-<owner pid>-<owner start time>-<random> and holds
# an owner record (OWNER_RECORD): pid, start time (clock ticks since boot, /proc) and boot id. A
# folder is another process's leftover only when all of that holds, it is this user's, and its
# owner is dead (no such pid, or a pid reused by a later process, or another boot); a look-alike
# folder without a matching record is never touched.
OWNER_RECORD = ".mmexport-owner.json"
TEMP_KINDS = ("repo", "triton")
_TEMP_NAME = re.compile(r"^mmexport-(?P<kind>repo|triton)-(?P<pid>[1-9][0-9]{0,9})-(?P<start>[0-9]{1,20})-[a-z0-9_]{8}$")
_SHM_TAG = re.compile(r"^mmexport[0-9]+x[0-9a-f]+_$")


def _process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None: no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _owner_identity() -> dict[str, Any]:
    return {"pid": os.getpid(), "start_time": _process_start_time(os.getpid()) or 0, "boot_id": _boot_id()}


def owned_temporary_directory(kind: str, *, shm_tags: Sequence[str] = ()) -> Path:
    """A new temporary folder named after this process, with its owner record (see :func:`remove_dead_owners_leftovers`)."""
    assert kind in TEMP_KINDS
    owner = _owner_identity()
    path = Path(tempfile.mkdtemp(prefix=f"mmexport-{kind}-{owner['pid']}-{owner['start_time']}-"))
    _write_owner_record(path, shm_tags)
    _guardian().own("dir", str(path))
    return path


def _write_owner_record(folder: Path, shm_tags: Sequence[str] = ()) -> None:
    record = {**_owner_identity(), "shm_tags": list(shm_tags)}
    (folder / OWNER_RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")


def release_temporary_directory(path: Path, *, keep: bool = False) -> None:
    """Remove an owned folder (or, ``keep``, hand it to the user: its owner record goes, so no cleanup takes it)."""
    if keep:
        with contextlib.suppress(OSError):
            (path / OWNER_RECORD).unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
    _guardian().release("dir", str(path))


def _owner_is_dead(record: dict[str, Any], pid: int, start: int) -> bool:
    boot = _boot_id()
    if boot is None:  # no /proc: liveness cannot be told, so nothing is anybody's leftover
        return False
    if record.get("boot_id") != boot:
        return True  # another boot: its processes are all gone (a folder from /tmp that survived a reboot)
    return _process_start_time(pid) != start  # gone, or the pid now belongs to a later process


def _leftover_owner(path: Path) -> dict[str, Any] | None:
    """The owner record of ``path`` when it is a dead owner's temporary folder of this user, else None."""
    match = _TEMP_NAME.match(path.name)
    if match is None:
        return None
    try:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return None
        record_path = path / OWNER_RECORD
        record_info = record_path.lstat()
        if not stat.S_ISREG(record_info.st_mode) or record_info.st_uid != os.getuid() or record_info.st_size > 64 * 1024:
            return None
        record = parse_json_object(record_path.read_bytes(), str(record_path))
    except (OSError, MMExportError):
        return None
    pid, start = int(match["pid"]), int(match["start"])
    if record.get("pid") != pid or record.get("start_time") != start or not _owner_is_dead(record, pid, start):
        return None
    return record


_SERVER_PROGRAMS = ("tritonserver", "triton_python_backend_stub")


def _processes_working_in(folder: Path) -> list[int]:
    """This user's Triton processes working in ``folder`` or below (a dead owner's server and its stubs).

    Only a server or stub program is named: a user's shell that happens to be in the folder is not.
    """
    found = []
    target = str(folder)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            cwd = os.readlink(f"/proc/{entry}/cwd")
            program = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0", 1)[0].decode("utf-8", "replace")
        except OSError:
            continue
        if (cwd == target or cwd.startswith(target + "/")) and os.path.basename(program) in _SERVER_PROGRAMS:
            found.append(int(entry))
    return found


def remove_dead_owners_leftovers(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the temporary folders (and their servers, stubs, shared memory) of serving processes that died.

    Only folders named ``mmexport-repo|triton-<pid>-<start>-XXXXXXXX`` directly in
    ``directory`` (default: the temporary directory), owned by this user, holding an
    owner record that names the same pid and start time, and whose owner is dead. A
    server that outlived a killed owner (its working directory is that folder) is
    killed first. Returns the folders removed.
    """
    root = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    removed = []
    try:
        candidates = [root / name for name in os.listdir(root) if name.startswith("mmexport-")]
    except OSError:
        return removed
    for path in candidates:
        record = _leftover_owner(path)
        if record is None:
            continue
        for pid in _processes_working_in(path):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        tags = record.get("shm_tags")
        for tag in tags if isinstance(tags, list) else ():
            if isinstance(tag, str) and _SHM_TAG.match(tag):
                _remove_shared_memory(tag)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _remove_shared_memory(tag: str) -> None:
    """The Python backend's /dev/shm regions named with ``tag`` (left by a stub that was killed)."""
    shm = Path("/dev/shm")
    if tag and shm.is_dir():
        for region in shm.glob(f"{tag}*"):
            with contextlib.suppress(OSError):
                region.unlink()


# The guardian: a small process that outlives a killed owner. The owner tells it, over a pipe only
# the owner holds, what it owns (folders, the server's process group, shared-memory tags) and what it
# released. When the pipe closes without everything released -- the owner was SIGKILLed, or exited
# without running its cleanup -- the guardian kills the server's process group at once (its ports
# are free immediately, its Python-backend stubs die with it) and removes the folders and regions.
_GUARDIAN_CODE = r"""
import json, os, shutil, signal, sys
for name in ("SIGINT", "SIGHUP", "SIGTERM"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)  # it ends when its owner does, not before
owned = {"dir": {}, "group": {}, "shm": {}}
for line in sys.stdin.buffer:
    try:
        op, kind, value = json.loads(line)
    except ValueError:
        continue
    key = json.dumps(value)
    if op == "own":
        owned[kind][key] = value
    else:
        owned[kind].pop(key, None)
def started(pid):
    try:
        return int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
for pgid, start in owned["group"].values():
    now = started(pgid)
    if now is None or now == start:  # a live leader that started later is another process: leave it
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
for tag in owned["shm"].values():
    try:
        for name in os.listdir("/dev/shm"):
            if name.startswith(tag):
                os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass
for path in owned["dir"].values():
    shutil.rmtree(path, ignore_errors=True)
"""


class _Guardian:
    """The owner's end of the guardian's pipe (one guardian per process, started on first use)."""

    def __init__(self) -> None:
        import threading

        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._pipe = None
        self._process: subprocess.Popen | None = None
        read, write = os.pipe()
        try:
            self._process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARDIAN_CODE], stdin=read, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except OSError:
            os.close(write)  # no guardian: signal handlers, finalisers and the next start's cleanup remain
        else:
            self._pipe = os.fdopen(write, "wb", buffering=0)
        finally:
            os.close(read)

    def _send(self, *message: Any) -> None:
        with self._lock:
            if self._pipe is None:
                return
            try:
                self._pipe.write(json.dumps(message).encode() + b"\n")
            except OSError:  # the guardian is gone: nothing to tell
                self._pipe = None

    def own(self, kind: str, value: Any) -> None:
        self._send("own", kind, value)

    def release(self, kind: str, value: Any) -> None:
        self._send("release", kind, value)


_GUARDIAN: _Guardian | None = None


def _guardian() -> _Guardian:
    global _GUARDIAN
    if _GUARDIAN is None or _GUARDIAN.pid != os.getpid():  # a forked child needs its own
        _GUARDIAN = _Guardian()
    return _GUARDIAN


# --------------------------------------------------------------------------------------------
# signals: SIGTERM, SIGHUP (and Ctrl-C) unwind the stack while a server is being set up or runs
# --------------------------------------------------------------------------------------------
class _Terminated(SystemExit):
    """SIGTERM/SIGHUP while starting or waiting on a server: unwinds the stack so everything is cleaned up."""


_TERMINATING = False


def _raise_terminated(signum, frame) -> None:
    global _TERMINATING
    if _TERMINATING:  # the first signal is already unwinding: a second must not cut its cleanup short
        return
    _TERMINATING = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(128 + signum)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """In the main thread, make SIGTERM/SIGHUP raise SystemExit(128 + signal) and Ctrl-C KeyboardInterrupt, once.

    Only signals still at Python's defaults are taken over (a caller's own handler is
    left alone), and the previous handlers come back on exit. A repeated signal while the
    first one unwinds is ignored, so the cleanup it triggered runs to the end.
    """
    import threading

    global _TERMINATING
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGHUP, signal.SIG_DFL),
                                (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(signum) is default:
                handlers[signum] = signal.signal(signum, _raise_terminated)
    outermost = bool(handlers) and not _TERMINATING
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if outermost:
            _TERMINATING = False


# --------------------------------------------------------------------------------------------
# checks before a start
# --------------------------------------------------------------------------------------------
MAX_READY_TIMEOUT = 3600.0  # seconds: an hour covers a cold start of a large model; beyond it, a hang
MAX_STOP_TIMEOUT = 600.0


def check_timeout(value: Any, what: str, maximum: float) -> float:
    """``value`` as seconds: a finite real number in (0, maximum], else one line naming ``what``."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MMExportError(f"{what} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 < seconds <= maximum:
        raise MMExportError(f"{what} must be a finite number of seconds, more than 0 and at most {maximum:g}, got {value!r}")
    return seconds


def check_port(label: str, port: Any) -> None:
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise MMExportError(f"{label} port must be 1-65535, got {port!r}")


def check_ports_free(host: str, ports: Sequence[tuple[str, int | None]]) -> None:
    """Each requested port can be bound on ``host`` now, else one line naming it (another server holds it?)."""
    bind_host = LOOPBACK if host in ("", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in bind_host.strip("[]") else socket.AF_INET
    for label, port in ports:
        check_port(label, port)
        if port is None:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As a server binds: a port whose last connections linger in TIME_WAIT is free to reuse.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind_host.strip("[]"), port))
            except OSError as exc:
                reason = "is in use (another server?)" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
                raise MMExportError(f"{label} port {port} on {host or LOOPBACK} {reason}; choose another or leave it out "
                                    "to pick a free one") from None


def _listening_ports(pid: int) -> set[int] | None:
    """The TCP ports process ``pid`` listens on (from /proc), or None where /proc cannot tell."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as handle:
                next(handle, None)
                for row in handle:
                    fields = row.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------
_LIVE: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the server's process group (the server and its stubs), then reap the server."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=10)


def _parent_death_signal():
    """A pre-exec hook asking Linux to SIGTERM the server when the thread that started it dies (prctl PDEATHSIG).

    It covers what no finaliser can: the owning process killed with SIGKILL. Used only
    when the server is started from the main thread (the signal follows the starting
    *thread*, so a worker thread's exit would stop the server).
    """
    import ctypes
    import threading

    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return hook


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(timeout=5)


_BENIGN = ("CudaDriverHelper has not been initialized", "Unable to allocate pinned system memory",
           "Failed to initialize NVML", "CUDA driver version is insufficient")


def _log_tail(path: Path | None, lines: int = 5, limit: int = 800) -> str:
    """The last error lines of a server log (else its last lines), as one line."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path is not None else ""
    except OSError:
        return "no log"
    rows = [" ".join(row.split()) for row in text.splitlines() if row.strip() and not row.startswith(("+", "|"))]
    rows = [row for row in rows if not any(b in row for b in _BENIGN)]
    errors = [row for row in rows if (row[:1] == "E" and row[1:5].isdigit()) or "error" in row.lower()
              or "Traceback" in row or "exception" in row.lower()]
    chosen = (errors or rows)[-lines:]
    tail = " | ".join(chosen) or "empty log"
    return tail if len(tail) <= limit else "…" + tail[-limit:]


class TritonServer:
    """``tritonserver`` on a model repository, as a context manager (or :meth:`start` / :meth:`stop`).

    ``http_port``/``grpc_port``/``metrics_port`` default to free ports picked at start;
    ``host`` (default ``127.0.0.1``) is where all three listen. ``model_control_mode``
    is Triton's (``none``: load everything at start; ``poll``; ``explicit`` with
    ``load_models``). ``log_file`` keeps the log there (default: a temporary folder that
    is removed on a clean stop and kept, named in the error, when the start fails).
    ``prepare_python`` creates the stub's Python environment when it is needed and
    missing (pip, once; see :func:`prepare_python_environment`).
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        host: str = LOOPBACK,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        log_file: str | os.PathLike[str] | None = None,
        log_verbose: int = 0,
        installation: TritonInstallation | None = None,
        extra_args: Sequence[str] = (),
        prepare_python: bool = False,
    ) -> None:
        self.repository = Path(repository).expanduser().absolute()
        if not self.repository.is_dir():
            raise MMExportError(f"{self.repository}: no such model repository")
        if model_control_mode not in CONTROL_MODES:
            raise MMExportError(f"unknown model control mode {model_control_mode!r}; choose one of {', '.join(CONTROL_MODES)}")
        if load_models and model_control_mode != "explicit":
            raise MMExportError("load_models needs model_control_mode explicit")
        for label, port in (("HTTP", http_port), ("gRPC", grpc_port), ("metrics", metrics_port)):
            check_port(label, port)
        ready_timeout = check_timeout(ready_timeout, "the ready timeout", MAX_READY_TIMEOUT)
        stop_timeout = check_timeout(stop_timeout, "the stop timeout", MAX_STOP_TIMEOUT)
        self.host = host
        self.requested_ports = (http_port, grpc_port, metrics_port)
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.ready_timeout = float(ready_timeout)
        self.stop_timeout = float(stop_timeout)
        self.log_verbose = int(log_verbose)
        self.extra_args = tuple(extra_args)
        self.installation = installation
        self.prepare_python = prepare_python
        self._log_file = Path(log_file).expanduser().absolute() if log_file is not None else None
        self.log_path: Path | None = self._log_file
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._shm_tag: str | None = None
        self._shm_tags: list[str] = []
        self._group: tuple[int, int | None] | None = None  # (pgid, leader start time) told to the guardian
        self.server_id: str | None = None  # --id of the process started, checked on /v2 before it counts as ready
        self.start_seconds = float("nan")

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return LOOPBACK if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifetime ----------------------------------------------------------------------------
    def _backend_directory(self, installation: TritonInstallation, workdir: Path) -> Path:
        """The wheel's backends, with the stub for this Python placed in ``python/`` (as pytriton does)."""
        if installation.stub is None:
            return installation.backends
        backends = workdir / "backends"
        for item in installation.backends.iterdir():
            if item.name == "python":
                python = backends / "python"
                python.mkdir(parents=True)
                for part in item.iterdir():
                    if part.is_file():
                        os.symlink(part, python / part.name)
                os.symlink(installation.stub, python / "triton_python_backend_stub")
            elif item.is_dir():
                backends.mkdir(parents=True, exist_ok=True)
                os.symlink(item, backends / item.name)
        return backends

    def _command(self, backends: Path, ports: Sequence[int], tag: str) -> list[str]:
        assert self.installation is not None
        http, grpc, metrics = ports
        command = [
            str(self.installation.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-address={self.host}", f"--http-port={http}",
            f"--grpc-address={self.host}", f"--grpc-port={grpc}",
            f"--metrics-address={self.host}", f"--metrics-port={metrics}",
            "--allow-gpu-metrics=false",
            # Triton waits this long for open connections and requests on SIGTERM; stop() kills after stop_timeout.
            f"--exit-timeout-secs={max(1, int(self.stop_timeout / 2))}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--disable-auto-complete-config",
            f"--log-verbose={self.log_verbose}",
            # A per-launch identity (GET /v2 returns it): readiness counts only from the server this call started.
            f"--id={self.server_id}",
            # Shared-memory regions of the Python backend's stubs, unique to this server:
            # two servers on one host (parallel test runs) must not meet in /dev/shm.
            f"--backend-config=python,shm-region-prefix-name={tag}",
        ]
        if self.installation.source.startswith("nvidia-pytriton"):
            caches = self.installation.binary.parent.parent / "caches"
            if caches.is_dir():
                command.append(f"--cache-directory={caches}")
        if self.model_control_mode == "poll":
            command.append("--repository-poll-secs=2")
        command += [f"--load-model={name}" for name in self.load_models]
        return command + list(self.extra_args)

    def start(self, progress: ProgressSink | None = None) -> "TritonServer":
        """Start the server and wait until it is ready (up to ``ready_timeout`` seconds).

        Requested ports are checked free first (one line naming a busy one), and the
        server counts as ready only when the process started here answers: ``/v2`` reports
        this launch's ``--id`` and (Linux) the process itself listens on all three ports.
        """
        if self.process is not None:
            raise MMExportError("this Triton server was already started")
        progress = sink(progress)
        labels = ("HTTP", "gRPC", "metrics")
        check_ports_free(self.host, list(zip(labels, self.requested_ports)))
        with _signals_unwind():
            remove_dead_owners_leftovers()
            self.installation = self.installation or find_tritonserver()
            started = time.monotonic()
            self._workdir = owned_temporary_directory("triton")
            try:
                return self._start(progress, started)
            except MMExportError:
                self.stop(keep_log=True)  # a failed start keeps the log its error names
                raise
            except BaseException:
                self.stop()
                raise

    def _start(self, progress: ProgressSink, started: float) -> TritonServer:
        assert self.installation is not None and self._workdir is not None
        backends = self._backend_directory(self.installation, self._workdir)
        python_bin = stub_python_bin(self.installation, prepare=self.prepare_python, progress=progress)
        env = server_environment(self.installation, python_bin=python_bin)
        attempts = 1 if all(p is not None for p in self.requested_ports) else 3
        for attempt in range(attempts):
            free = iter(free_ports(3, self.host if self.host not in ("", "0.0.0.0", "::") else LOOPBACK))
            ports = [p if p is not None else next(free) for p in self.requested_ports]
            self.http_port, self.grpc_port, self.metrics_port = ports
            self.log_path = self._log_file or self._workdir / f"tritonserver-{attempt}.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            tag = self._shm_tag = f"mmexport{os.getpid()}x{os.urandom(4).hex()}_"
            self._shm_tags.append(tag)
            _write_owner_record(self._workdir, self._shm_tags)  # a dead owner's regions are removed with its folder
            _guardian().own("shm", tag)
            self.server_id = f"mmexport-{os.getpid()}-{os.urandom(8).hex()}"
            command = self._command(backends, ports, tag)
            progress.message(f"starting tritonserver on {self.host} (HTTP {ports[0]}, gRPC {ports[1]}, metrics {ports[2]})")
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                env=env, cwd=self._workdir, start_new_session=True,
                                                preexec_fn=_parent_death_signal())
            self._group = (self.process.pid, _process_start_time(self.process.pid))
            _guardian().own("group", list(self._group))
            self._finalizer = weakref.finalize(self, _kill_group, self.process)
            _LIVE.add(self)
            if self._wait_ready(started + self.ready_timeout):
                self.start_seconds = time.monotonic() - started
                progress.message(f"tritonserver ready after {self.start_seconds:.1f} s")
                return self
            tail = _log_tail(self.log_path)
            code = self.process.poll()
            busy = code is not None and ("already in use" in tail.lower() or "address in use" in tail.lower())
            self._stop_process()
            if busy and attempt + 1 < attempts:
                continue  # another process took a port between picking and binding it
            if code is None:
                raise MMExportError(f"tritonserver was not ready within {self.ready_timeout:g} s: {tail} "
                                    f"(log: {self.log_path})")
            raise MMExportError(f"tritonserver exited with code {code} before it was ready: {tail} (log: {self.log_path})")
        raise MMExportError("tritonserver could not bind its ports")  # pragma: no cover - the loop returns or raises

    def _answers_as_this_server(self) -> bool:
        """Whether the HTTP endpoint is the process started here: ready, with this launch's id, on all its ports."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as response:
                if response.status != 200:
                    return False
            with urllib.request.urlopen(f"{self.http_url}/v2", timeout=1.0) as response:
                metadata = parse_json_object(response.read(64 * 1024), f"{self.http_url}/v2")
        except (urllib.error.URLError, OSError, ValueError, MMExportError):
            return False
        if metadata.get("name") != self.server_id:
            return False  # another server answers on this port (it held the port, or took it meanwhile)
        listening = _listening_ports(self.process.pid) if self.process is not None else None
        return listening is None or {self.http_port, self.grpc_port, self.metrics_port} <= listening

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if self._answers_as_this_server():
                return self.process.poll() is None
            time.sleep(0.2)
        return False

    def model_ready(self, name: str, version: int | None = None, timeout: float = 2.0) -> bool:
        """Whether Triton reports the model (version) ready (one request, bounded by ``timeout``)."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version is not None else "") + "/ready"
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, timeout: float | None = None, *, keep_log: bool = False) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after ``timeout`` s; returns the exit code.

        The temporary folder (backend links, the log unless ``log_file`` was given) is
        removed, unless ``keep_log`` (a failed start keeps the log it names: the folder
        then is the user's, no longer a leftover any cleanup takes).
        """
        code = self._stop_process(timeout)
        if self._workdir is not None:
            keep = keep_log and self.log_path is not None and self._workdir in self.log_path.parents
            if keep:
                shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            release_temporary_directory(self._workdir, keep=keep)
            self._workdir = None
        return code

    def _stop_process(self, timeout: float | None = None) -> int | None:
        process, self.process = self.process, None
        code = None
        if process is not None:
            limit = self.stop_timeout if timeout is None else timeout
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(process)  # the stubs too, whatever the server did with them
            code = process.returncode
            if self._group is not None:
                _guardian().release("group", list(self._group))
                self._group = None
            for tag in self._shm_tags:
                _remove_shared_memory(tag)
                _guardian().release("shm", tag)
            self._shm_tags = []
            if self._finalizer is not None:
                self._finalizer.detach()
            _LIVE.discard(self)
        return code

    def wait(self, poll_seconds: float = 0.5) -> int:
        """Block until the server exits; a server that dies is an error.

        Ctrl-C raises KeyboardInterrupt here; in the main thread SIGTERM and SIGHUP raise
        SystemExit(128 + signal), so a ``with`` block around the wait stops the server either way.
        """
        with _signals_unwind():
            while True:
                if self.process is None:
                    return 0
                try:
                    code = self.process.wait(timeout=poll_seconds)
                except subprocess.TimeoutExpired:
                    continue
                tail = _log_tail(self.log_path) if self.log_path else "no log"
                raise MMExportError(f"tritonserver exited with code {code}: {tail}")

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def __enter__(self) -> "TritonServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# serve: a run's artifact behind Triton
# --------------------------------------------------------------------------------------------
@dataclass
class ServingSession:
    """A running server and the model it serves: endpoints, and what to send them."""
    server: TritonServer
    model: str
    version: int
    repository: Path
    preprocess: bool
    image_size: int
    classes: tuple[str, ...]
    artifact: str
    run: Path | None
    verified: bool | None
    temporary_repository: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    @property
    def infer_url(self) -> str:
        return f"{self.http_url}/v2/models/{self.model}/infer"

    def curl_example(self, image: str = "lesion.png", top: int = 3) -> str:
        """A shell snippet (bash, curl, perl) that classifies a PNG/JPEG over Triton's HTTP/REST (KServe v2) API.

        The request uses Triton's binary-data extension: a JSON header, then the image as
        a BYTES element (4-byte little-endian length, then the bytes). The answer is JSON
        with the ``top`` classes as ``"score:index:label"`` (the classification extension).
        """
        if not self.preprocess:
            return (f"curl -s {self.http_url}/v2/models/{self.model}   # model metadata; send FP32 "
                    f"[N,3,{self.image_size},{self.image_size}] normalised images to {self.infer_url}")
        return (
            f"IMG={image}\n"
            "HEADER='{\"inputs\":[{\"name\":\"image_bytes\",\"shape\":[1,1],\"datatype\":\"BYTES\","
            "\"parameters\":{\"binary_data_size\":'$(( $(stat -c%s \"$IMG\") + 4 ))'}}],"
            f"\"outputs\":[{{\"name\":\"logits\",\"parameters\":{{\"classification\":{top}}}}}]}}'\n"
            "{ printf '%s' \"$HEADER\"; perl -e 'print pack(\"V\", -s $ARGV[0])' \"$IMG\"; cat \"$IMG\"; } |\n"
            "  curl -s --data-binary @- -H 'Content-Type: application/octet-stream' "
            f"-H \"Inference-Header-Content-Length: ${{#HEADER}}\" {self.infer_url}"
        )

    def wait(self) -> int:
        return self.server.wait()


@contextlib.contextmanager
def serve(
    target: str | os.PathLike[str],
    *,
    repo: str | os.PathLike[str] | None = None,
    name: str | None = None,
    precision: str = "fp32",
    artifact: str | None = None,
    preprocess: bool = True,
    max_batch: int | None = None,
    instance_kind: str | None = None,
    threads: int | None = None,
    host: str = LOOPBACK,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    log_file: str | os.PathLike[str] | None = None,
    allow_untracked: bool = False,
    prepare_python: bool = False,
    progress: ProgressSink | None = None,
) -> Iterator[ServingSession]:
    """Serve a run's verified artifact (or an artifact file of a run) with Triton on this machine.

    Exports a Python-backend repository (:func:`mmexport.serving.triton.export_repository`,
    with the encoded-image input unless ``preprocess=False``) into ``repo`` -- a new
    version of ``name`` -- or into a temporary repository removed afterwards, starts
    :class:`TritonServer` on it (``host`` defaults to loopback), waits until the model is
    ready, and yields the session. Leaving the ``with`` block (normally, by an error or
    by Ctrl-C) stops the server. ``prepare_python`` creates the stub's Python
    environment if it is needed and missing (see :func:`prepare_python_environment`).
    """

    ready_timeout = check_timeout(ready_timeout, "the ready timeout", MAX_READY_TIMEOUT)
    check_ports_free(host, [("HTTP", http_port), ("gRPC", grpc_port), ("metrics", metrics_port)])  # before the copy
    progress = sink(progress)
    # The server and its Python before anything is written: a host without the prepared stub environment
    # (`mmexport prepare-serving`) is told so in one line, with no repository version and no pip run.
    installation = find_tritonserver()
    stub_python_bin(installation, prepare=prepare_python, progress=progress)
    temporary = repo is None
    with _signals_unwind():  # SIGTERM/SIGHUP anywhere below unwinds through the cleanup
        remove_dead_owners_leftovers()
        repository = owned_temporary_directory("repo") if temporary else Path(repo).expanduser().absolute()
        try:
            if not temporary:
                repository.mkdir(parents=True, exist_ok=True)
            result = export_repository(target, repository, precision=precision, backend="python", name=name,
                                       preprocess=preprocess, max_batch=max_batch, instance_kind=instance_kind,
                                       artifact=artifact, threads=threads, allow_untracked=allow_untracked, progress=progress)
            record = read_version_record(result.version_dir)
            classes = tuple(record["interface"]["classes"])
            size = result.inputs[0].dims[-1]
            server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                                  model_control_mode="explicit", load_models=(result.name,), ready_timeout=ready_timeout,
                                  log_file=log_file, installation=installation)
            server.start(progress)
            try:
                if not server.model_ready(result.name) or not server.is_running:
                    raise MMExportError(f"tritonserver is up but {result.name} is not ready: {_log_tail(server.log_path)}")
                yield ServingSession(server=server, model=result.name, version=result.version, repository=repository,
                                     preprocess=preprocess, image_size=size, classes=classes, artifact=result.artifact,
                                     run=result.run, verified=result.verified, temporary_repository=temporary)
            finally:
                server.stop()
        finally:
            if temporary:
                release_temporary_directory(repository)


__all__ = [
    "DEFAULT_READY_TIMEOUT", "DEFAULT_STOP_TIMEOUT", "ENV_BINARY", "ENV_PYTHON", "MAX_READY_TIMEOUT", "MAX_STOP_TIMEOUT",
    "OWNER_RECORD", "STUB_NUMPY", "ServingPreparation", "ServingSession", "TritonInstallation", "TritonServer",
    "check_ports_free", "check_timeout", "find_tritonserver", "free_ports", "owned_temporary_directory",
    "prepare_python_environment", "prepare_serving",
    "python_environment_path", "python_library_dir", "python_path_entries", "release_temporary_directory",
    "remove_dead_owners_leftovers", "serve", "server_environment", "stub_python_bin", "stub_requirements",
]
