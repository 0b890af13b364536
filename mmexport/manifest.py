"""The run directory: every file a run makes, with its provenance, in ``manifest.json``.

A clinical user must be able to answer "which weights produced this artifact, and
was it checked?" from the manifest alone. A new run is built in a hidden staging
directory beside its destination and renamed into place only when complete, so
an interrupted run leaves the previous run or nothing.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mmexport import __version__
from mmexport.artifacts import REGISTRY
from mmexport.errors import RunDirError
from mmexport.fileio import atomic_path, sha256_file, write_json_atomic

if TYPE_CHECKING:
    from mmexport.runtime.compare import VerificationReport

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mmexport-run/2"
_VERSIONED_PACKAGES = ("torch", "torchvision", "numpy", "safetensors", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment_info() -> dict[str, Any]:
    """Versions of everything that shapes the numbers (read from metadata, nothing imported)."""
    versions: dict[str, str | None] = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    torch = sys.modules.get("torch")  # imported by then in every command that writes a manifest
    build = {}
    if torch is not None:
        build = {"torch_build": torch.__version__, "cuda_runtime": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available()}
    return {
        "mmexport": __version__,
        "python": sys.version.split()[0],
        **build,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
    }


def staging_path(final: Path) -> Path:
    """Where a run is built before it is published (one per destination, so it can be resumed)."""
    return final.parent / f".{final.name}.partial"


def _is_run_dir(path: Path) -> bool:
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError):
        return False


class RunDir:
    """A run directory and its manifest; every write goes through here."""

    def __init__(self, path: Path, manifest: dict[str, Any], final_path: Path | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self._final_path = final_path  # set while staging

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, destination: str | os.PathLike[str], *, force: bool = False, command: str = "") -> "RunDir":
        """Start a new run that will become ``destination`` on :meth:`publish`.

        An existing non-empty ``destination`` is refused unless ``force``; even with
        ``force`` only a previous mmexport run is ever replaced.
        """
        final = Path(destination).expanduser().absolute()
        if final.exists():
            if not final.is_dir():
                raise RunDirError(f"{final}: exists and is not a directory")
            if any(final.iterdir()):
                if not force:
                    raise RunDirError(f"{final}: run directory exists and is not empty (use --force to replace it)")
                if not _is_run_dir(final):
                    raise RunDirError(f"{final}: not an mmexport run directory (no {MANIFEST_NAME}); refusing to replace it")
        parent = final.parent
        if not parent.is_dir():
            raise RunDirError(f"{parent}: parent directory does not exist")
        if not os.access(parent, os.W_OK):
            raise RunDirError(f"{parent}: directory is not writable")
        staging = staging_path(final)
        if staging.exists():
            if not force:
                raise RunDirError(
                    f"{staging}: an interrupted run of {final.name} exists; continue it with --resume or discard it with --force"
                )
            shutil.rmtree(staging)
        staging.mkdir()
        manifest = {
            "format": MANIFEST_FORMAT,
            "created": _now(),
            "command": command,
            "environment": environment_info(),
            "inputs": {},
            "config": {},
            "outputs": {},
            "verification": [],
        }
        run = cls(staging, manifest, final_path=final)
        run.save()
        return run

    @classmethod
    def resume(cls, destination: str | os.PathLike[str]) -> "RunDir":
        """Reopen the staging directory an interrupted run left beside ``destination``."""
        final = Path(destination).expanduser().absolute()
        staging = staging_path(final)
        if not staging.is_dir():
            raise RunDirError(f"{final}: no interrupted run to resume (no {staging.name} beside it)")
        run = cls.open(staging)
        run._final_path = final
        run.manifest.setdefault("resumed", []).append(_now())
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "RunDir":
        run_path = Path(path).expanduser().absolute()
        manifest_path = run_path / MANIFEST_NAME
        if not run_path.is_dir():
            raise RunDirError(f"{run_path}: no such run directory")
        if not manifest_path.is_file():
            raise RunDirError(f"{run_path}: not an mmexport run directory (no {MANIFEST_NAME})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{manifest_path}: unreadable manifest ({exc})") from None
        found = manifest.get("format") if isinstance(manifest, dict) else None
        if found != MANIFEST_FORMAT:
            if isinstance(found, str) and found.startswith("mmexport-run/"):
                made_by = (manifest.get("environment") or {}).get("mmexport", "an earlier version")
                raise RunDirError(
                    f"{run_path}: a run of mmexport {made_by} (manifest format {found}); mmexport {__version__} reads "
                    f"{MANIFEST_FORMAT}: retrain it with this version, or read it with the version that made it"
                )
            raise RunDirError(f"{manifest_path}: unknown manifest format {found!r}")
        return cls(run_path, manifest)

    @property
    def staging(self) -> bool:
        return self._final_path is not None

    def publish(self) -> Path:
        """Move a completed staging directory into place (replacing a previous run)."""
        if self._final_path is None:
            return self.path
        final = self._final_path
        self.manifest["completed"] = _now()
        for row in REGISTRY.values():
            if row.transient:
                self.file(row.filename).unlink(missing_ok=True)
        self.save()
        retired = None
        if final.exists():
            retired = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, retired)
        os.replace(self.path, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        self.path, self._final_path = final, None
        return final

    def abandon(self) -> None:
        """Remove a staging directory after a failure; a published run is never touched."""
        if self._final_path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    # -- files ------------------------------------------------------------------------------
    def file(self, relative: str) -> Path:
        return self.path / relative

    def save(self) -> None:
        write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def write_output(self, relative: str, writer: Callable[[Path], None], kind: str, **details: Any) -> Path:
        """Write ``relative`` atomically with ``writer(tmp_path)``, then hash it into the manifest."""
        target = self.file(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            writer(tmp)
        self.record_output(relative, kind, **details)
        return target

    def record_output(self, relative: str, kind: str, **details: Any) -> None:
        target = self.file(relative)
        self.manifest["outputs"][relative] = {
            "kind": kind,
            "sha256": sha256_file(target),
            "size_bytes": target.stat().st_size,
            "created": _now(),
            **details,
        }
        self.save()

    def checked_file(self, relative: str) -> Path:
        """The path of an output, after checking it still has the hash the manifest recorded."""
        entry = self.manifest["outputs"].get(relative)
        target = self.file(relative)
        if entry is None:
            raise RunDirError(f"{self.path}: the manifest records no {relative}")
        if not target.is_file():
            raise RunDirError(f"{target}: listed in the manifest but missing")
        actual = sha256_file(target)
        if actual != entry["sha256"]:
            raise RunDirError(
                f"{target}: sha256 {actual[:12]}… differs from the manifest's {entry['sha256'][:12]}… "
                "(the file was altered after it was written)"
            )
        return target

    def refuse_overwrite(self, target: str | os.PathLike[str]) -> None:
        """A user-supplied output path may not replace the manifest or any file the run tracks."""
        resolved = Path(target).expanduser().resolve()
        protected = {(self.path / MANIFEST_NAME).resolve()} | {(self.path / name).resolve() for name in self.manifest.get("outputs", {})}
        if resolved in protected:
            raise RunDirError(f"{target}: is a file of the run {self.path.name} (refusing to overwrite it); choose another path")

    def has(self, relative: str) -> bool:
        return relative in self.manifest["outputs"]

    def add_verification(self, report: dict[str, Any]) -> None:
        self.manifest["verification"].append(report)
        self.save()

    def publish_verified(self, relative: str, write: Callable[[Path], dict], check: Callable[[Path], Any], kind: str,
                         details: dict[str, Any], command: str, *,
                         mark_unverified: Callable[[Path, str], None] | None = None) -> tuple[dict, Any]:
        """Write ``relative`` under a hidden temporary name, verify it there, and only then publish it.

        ``check(tmp)`` returns a verification report (``.passed``, ``.as_dict()``). A failed
        check removes the temporary file: nothing is published, the previous artifact (if
        any) stays, the failed report is recorded, and :class:`VerificationError` is raised.
        Only with ``mark_unverified`` (the user's explicit ``--allow-unverified``) is a failed
        artifact published: ``mark_unverified(tmp, reason)`` first writes the failure into
        the file itself, and the manifest records ``verified: false`` with the reason.
        """
        from mmexport.errors import VerificationError

        target = self.file(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            facts = write(tmp)
            report = check(tmp)
            self.add_verification({"artifact": relative, "command": command, **report.as_dict()})
            reason = "; ".join(report.failures())
            if not report.passed:
                if mark_unverified is None:
                    raise VerificationError(f"{relative}: verification failed, nothing published: {reason}", report)
                mark_unverified(tmp, reason)
        recorded = {k: v for k, v in (facts or {}).items() if k not in ("sha256", "size_bytes")}
        status = {"verified": True} if report.passed else {"verified": False, "unverified_reason": reason,
                                                            "published_unverified_by": command + " --allow-unverified"}
        self.record_output(relative, kind, **{**recorded, **details, **status})
        return facts, report

    def reference(self):
        """The run's stored reference set, hash-checked, and checked to belong to its final network."""
        from mmexport.artifacts import filename
        from mmexport.runtime.reference import ReferenceData

        name = filename("reference")
        if not self.has(name):
            raise RunDirError(f"{self.path}: no {name} (the stored reference outputs); retrain the run with this version")
        reference = ReferenceData.load(self.checked_file(name))
        model_entry = self.manifest["outputs"].get(filename("model"), {})
        if model_entry.get("sha256") != reference.model_sha256:
            raise RunDirError(f"{self.path}: {name} was computed from another {filename('model')} than the run's")
        return reference


@dataclass
class PublishedArtifact:
    """A file a command wrote into a run: where, its hash, the facts of making it, and its verification."""

    name: str
    path: Path
    sha256: str
    size_bytes: int
    report: VerificationReport | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    reproduced: bool | None = None  # a re-fold: bit-identical to the file it replaced (None: nothing replaced)


def published(run: RunDir, name: str, report: VerificationReport | None, facts: dict | None = None,
               reproduced: bool | None = None) -> PublishedArtifact:
    entry = run.manifest["outputs"][name]
    return PublishedArtifact(name, run.file(name), entry["sha256"], entry["size_bytes"], report, dict(facts or {}),
                             reproduced)
