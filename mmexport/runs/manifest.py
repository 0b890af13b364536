"""The run directory: every file a run makes, with its provenance, in ``manifest.json``.

A clinical user must be able to answer "which weights produced this artifact, and
was it checked?" from the manifest alone. A new run is built in a hidden staging
directory beside its destination and renamed into place only when complete, so
an interrupted run leaves the previous run or nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmexport import __version__
from mmexport.artifacts import REGISTRY, ArtifactFacts, filename
from mmexport.environment import environment_info
from mmexport.errors import RunDirError, VerificationError
from mmexport.fileio import atomic_path, compare_tree, remove_temporaries, sha256_file, write_json_atomic, writer_token
from mmexport.jsonread import parse_json_object
from mmexport.runs.lock import is_held_here, writing
from mmexport.runs.model_card import MODEL_CARD_KIND, MODEL_CARD_NAME, has_model_card, render_model_card
from mmexport.runtime.compare import VerificationReport
from mmexport.runtime.reference import ReferenceData

PENDING = "pending"  # manifest key: writes recorded before their rename, settled by the next writer
# manifest key of a staging run: the temporary-file tokens of the processes writing it (train is not
# under the run's lock while it stages); a resume removes the leftovers of the earlier, killed, ones
STAGING_WRITERS = "staging_writers"


def _output_entry(kind: str, sha256: str, size_bytes: int, details: dict[str, Any]) -> dict[str, Any]:
    """One ``outputs`` entry of the manifest."""
    return {"kind": kind, "sha256": sha256, "size_bytes": size_bytes, "created": _now(), **details}


MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mmexport-run/2"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


SCHEMA_FILE = Path(__file__).parents[1] / "schemas" / "run-manifest.schema.json"


def manifest_schema() -> dict[str, Any]:
    """The published JSON Schema of ``manifest.json`` (``mmexport/schemas/run-manifest.schema.json``)."""
    return json.loads(SCHEMA_FILE.read_text())


_VALIDATOR = None
_NAME_PATTERN: re.Pattern[str] | None = None
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a forged manifest must not steer the terminal or split a line."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def is_run_relative_name(name: object) -> bool:
    """Whether ``name`` is a relative POSIX path that stays inside the run (the schema's ``relative_name``):
    no leading ``/``, no ``.``/``..`` or empty segment, no backslash, no control character."""
    global _NAME_PATTERN
    if _NAME_PATTERN is None:  # one definition, in the published schema
        _NAME_PATTERN = re.compile(manifest_schema()["$defs"]["relative_name"]["pattern"])
    return isinstance(name, str) and _NAME_PATTERN.fullmatch(name) is not None


# the manifest's maps keyed by a file's name inside the run (what a writer may write, hash or commit)
_NAMED_FILES = ("outputs", PENDING)


def validate_manifest(manifest: Any, where: str | os.PathLike[str] = MANIFEST_NAME) -> None:
    """Refuse (one line) a manifest that does not follow the schema, before anything trusts it."""
    global _VALIDATOR
    import jsonschema

    if isinstance(manifest, dict):  # named first, in words: a path out of the run is the dangerous case
        for section in _NAMED_FILES:
            names = manifest.get(section)
            for name in names if isinstance(names, dict) else ():
                if not is_run_relative_name(name):
                    raise RunDirError(_printable(
                        f"{where}: malformed manifest at {section}: {json.dumps(name)[:120]} is not a relative path "
                        "inside the run (no leading '/', '..', empty segment, backslash or control character)"))
    if _VALIDATOR is None:
        schema = manifest_schema()
        _VALIDATOR = jsonschema.Draft202012Validator(schema)
    try:
        error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(manifest))
    except RecursionError:
        raise RunDirError(f"{where}: malformed manifest (nested too deeply)") from None
    if error is not None:
        location = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) < 200 else error.message[:200] + "…"
        raise RunDirError(_printable(f"{where}: malformed manifest at {location}: {message}"))


def staging_path(final: Path) -> Path:
    """Where a run is built before it is published (one per destination, so it can be resumed)."""
    return final.parent / f".{final.name}.partial"


def _refuse_odd_staging(staging: Path) -> None:
    """A staging path mmexport did not make (a symbolic link, a file) is refused, never followed or deleted."""
    if staging.is_symlink():
        raise RunDirError(f"{staging}: is a symbolic link, not a staging directory mmexport made; refusing to follow "
                          "it (remove the link; nothing was changed)")
    if staging.exists() and not staging.is_dir():
        raise RunDirError(f"{staging}: is not a directory, so not a staging run mmexport made; refusing to touch it "
                          "(move it away; nothing was changed)")


def _refuse_symlinked_run(final: Path) -> None:
    if final.is_symlink():
        raise RunDirError(f"{final}: is a symbolic link; give the directory it points to (a run is published by "
                          "renaming, which would replace the link, not its target)")


def check_replaceable(path: Path) -> None:
    """``--force`` may replace a directory only if it is a valid run holding nothing but what its manifest lists.

    A manifest that does not validate is not trusted (a hand-written ``manifest.json`` must
    not license deleting a directory), and a file the run did not make (a user's notes) or
    one altered since is kept: the replacement is refused with one line naming it.
    """
    if not (path / MANIFEST_NAME).is_file():
        raise RunDirError(f"{path}: not an mmexport run directory (no {MANIFEST_NAME}); refusing to replace it")
    try:
        run = RunDir.open(path)
    except RunDirError as exc:
        raise RunDirError(f"{path}: its manifest is not a valid mmexport run ({exc}); refusing to replace it") from None
    listed = {name: entry["sha256"] for name, entry in run.manifest["outputs"].items()}
    _, altered, foreign = compare_tree(path, listed, MANIFEST_NAME)
    if foreign or altered:
        shown = ", ".join((foreign + altered)[:3])
        what = "files the run did not make" if foreign else "files altered since the run made them"
        raise RunDirError(f"{path}: holds {what} ({shown}); --force replaces only a run's own files: "
                          "move them or choose another --out")


class RunDir:
    """A run directory and its manifest; every write goes through here."""
    def __init__(self, path: Path, manifest: dict[str, Any], final_path: Path | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self._final_path = final_path  # set while staging

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, destination: str | os.PathLike[str], *, force: bool = False, command: str = "") -> RunDir:
        """Start a new run that will become ``destination`` on :meth:`publish`.

        An existing non-empty ``destination`` is refused unless ``force``; even with
        ``force`` only a previous mmexport run is ever replaced.
        """
        final = Path(destination).expanduser().absolute()
        _refuse_symlinked_run(final)
        if final.exists():
            if not final.is_dir():
                raise RunDirError(f"{final}: exists and is not a directory")
            if any(final.iterdir()):
                if not force:
                    raise RunDirError(f"{final}: run directory exists and is not empty (use --force to replace it)")
                check_replaceable(final)
        parent = final.parent
        try:  # `--out runs/x` in a fresh checkout: make runs/ (and any missing parents)
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"{parent}: cannot create the parent directory ({exc.strerror or exc})") from None
        if not os.access(parent, os.W_OK):
            raise RunDirError(f"{parent}: directory is not writable")
        staging = staging_path(final)
        _refuse_odd_staging(staging)
        if staging.exists():
            if not force:
                raise RunDirError(
                    f"{staging}: an interrupted run of {final.name} exists; continue it with --resume or discard it with --force"
                )
            try:
                shutil.rmtree(staging)
            except OSError as exc:
                raise RunDirError(f"{staging}: cannot discard the interrupted run ({exc.strerror or exc})") from None
        try:
            staging.mkdir()
        except OSError as exc:
            raise RunDirError(f"{staging}: cannot create the staging directory ({exc.strerror or exc})") from None
        manifest = {
            "format": MANIFEST_FORMAT,
            "run_id": uuid.uuid4().hex,  # a replaced run gets a new id: writers opened on the old one are refused
            "created": _now(),
            "command": command,
            "environment": environment_info(),
            "inputs": {},
            "config": {},
            "outputs": {},
            "verification": [],
            STAGING_WRITERS: [writer_token()],  # before this process makes any temporary file in it
        }
        run = cls(staging, manifest, final_path=final)
        run.save()
        return run

    @classmethod
    def resume(cls, destination: str | os.PathLike[str]) -> RunDir:
        """Reopen the staging directory an interrupted run left beside ``destination``."""
        final = Path(destination).expanduser().absolute()
        staging = staging_path(final)
        _refuse_odd_staging(staging)
        if not staging.is_dir():
            raise RunDirError(f"{final}: no interrupted run to resume (no {staging.name} beside it)")
        run = cls.open(staging)
        run._final_path = final
        # The temporaries of the earlier (killed) writers, by their recorded tokens, and nothing else.
        earlier = [token for token in run.manifest.get(STAGING_WRITERS, []) if token != writer_token()]
        remove_temporaries(staging, earlier)
        run.manifest[STAGING_WRITERS] = [writer_token()]
        run.manifest.setdefault("resumed", []).append(_now())
        run.save()
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunDir:
        run_path = Path(path).expanduser().absolute()
        manifest_path = run_path / MANIFEST_NAME
        if not run_path.is_dir():
            raise RunDirError(f"{run_path}: no such run directory")
        if not manifest_path.is_file():
            raise RunDirError(f"{run_path}: not an mmexport run directory (no {MANIFEST_NAME})")
        try:
            text = manifest_path.read_bytes()
        except OSError as exc:
            raise RunDirError(f"{manifest_path}: unreadable manifest ({exc.strerror or exc})") from None
        manifest = parse_json_object(text, f"{manifest_path}: unreadable manifest", error=RunDirError)
        found = manifest.get("format") if isinstance(manifest, dict) else None
        if found != MANIFEST_FORMAT:
            if isinstance(found, str) and found.startswith("mmexport-run/"):
                made_by = (manifest.get("environment") or {}).get("mmexport", "an earlier version")
                raise RunDirError(
                    f"{run_path}: a run of mmexport {made_by} (manifest format {found}); mmexport {__version__} reads "
                    f"{MANIFEST_FORMAT}: retrain it with this version, or read it with the version that made it"
                )
            raise RunDirError(f"{manifest_path}: unknown manifest format {found!r}")
        validate_manifest(manifest, manifest_path)
        run = cls(run_path, manifest)
        if manifest.get(PENDING) and is_held_here(run_path):  # only a writer settles what a killed writer left
            run.settle_pending()
        return run

    @property
    def staging(self) -> bool:
        return self._final_path is not None

    def publish(self, *, lock_wait: float | None = None) -> Path:
        """Move a completed staging directory into place (replacing a previous run).

        ``lock_wait``: seconds to wait for another command writing the run it replaces.
        """
        if self._final_path is None:
            return self.path
        final = self._final_path
        _refuse_odd_staging(self.path)
        _refuse_symlinked_run(final)
        self.manifest["completed"] = _now()
        self.manifest.pop(STAGING_WRITERS, None)  # every write is complete: no temporary of this run remains
        for row in REGISTRY.values():
            if row.transient:
                self.file(row.filename).unlink(missing_ok=True)
        self.save()

        retired = None
        with writing(final, "train (publishing the run)", wait=lock_wait, may_be_missing=True):
            _refuse_symlinked_run(final)  # again, under the lock
            if final.exists() and any(final.iterdir()):
                check_replaceable(final)  # again: files may have appeared while the new run trained
            try:
                if final.exists():
                    retired = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
                    os.replace(final, retired)
                os.replace(self.path, final)
            except OSError as exc:
                raise RunDirError(f"{final}: cannot publish the run from {self.path.name} ({exc.strerror or exc})") from None
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        self.path, self._final_path = final, None
        return final

    def abandon(self) -> None:
        """Remove a staging directory after a failure; a published run is never touched."""
        if self._final_path is not None and self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path, ignore_errors=True)  # (a link put in its place is never followed)

    # -- files ------------------------------------------------------------------------------
    def file(self, relative: str) -> Path:
        """The path of ``relative`` in the run, refused unless it stays inside the run.

        A name (often from the manifest) must be a relative path without ``..``, and no
        symbolic link on the way (a linked parent folder, or the file itself) may lead out of
        the run: nothing is written, hashed or reported intact outside it.
        """
        if not is_run_relative_name(relative):
            raise RunDirError(_printable(f"{self.path}: {json.dumps(relative)[:120]} is not a relative path inside the run"))
        target = self.path / relative
        root = self.path.resolve()
        resolved = target.resolve()
        if resolved != root and root not in resolved.parents:
            raise RunDirError(_printable(f"{target}: leads out of the run (a symbolic link on the way points to "
                                         f"{resolved}); refusing to use it"))
        return target

    @classmethod
    @contextlib.contextmanager
    def writer(cls, path: str | os.PathLike[str], command: str, wait: float | None = None) -> Iterator[RunDir]:
        """Open a published run for writing: the run's lock is held for the block, the manifest read under it."""

        with writing(path, command, wait):
            yield cls.open(path)

    def save(self) -> None:
        manifest_path = self.path / MANIFEST_NAME
        if self._final_path is None and manifest_path.is_file():
            # A run replaced (train --force) while this command ran must not receive this run's manifest.
            try:
                on_disk = parse_json_object(manifest_path.read_bytes(), str(manifest_path), error=RunDirError).get("run_id")
            except (OSError, RunDirError):
                on_disk = None
            if on_disk != self.manifest.get("run_id"):
                raise RunDirError(f"{self.path}: the run was replaced while this command ran; nothing was recorded")
        self._write_model_card()
        write_json_atomic(manifest_path, self.manifest)

    def refresh_model_card(self) -> Path:
        """Regenerate ``model_card.md`` from the manifest, record it and save (what every :meth:`save` does)."""
        if not has_model_card(self.manifest):
            raise RunDirError(f"{self.path}: has no trained network yet (no model in its manifest): no model card to write")
        self.save()
        return self.file(MODEL_CARD_NAME)

    def _write_model_card(self) -> None:
        """Render the card from the manifest about to be saved; write it and record it in ``outputs`` if it changed.

        The card is derived data: the file is replaced first, then the manifest (the caller's write)
        records its hash; a process killed in between leaves a card newer than the manifest, which
        ``verify --manifest`` reports as altered until the next save renders the same card again.
        A file of that name the run did not make (not in ``outputs``) is never overwritten.
        """
        if not has_model_card(self.manifest):
            return
        # rendered from the manifest as it will be read back (tuples become lists), so a card made by this save
        # is the card any later save of the same record renders
        as_read = json.loads(json.dumps(self.manifest))
        data = render_model_card(as_read, self._final_path or self.path).encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        target = self.file(MODEL_CARD_NAME)
        entry = self.manifest["outputs"].get(MODEL_CARD_NAME)
        if entry is None and (target.exists() or target.is_symlink()):
            raise RunDirError(f"{target}: a file the run did not make is in the way of the run's model card; "
                              "move it away (nothing was recorded)")
        if entry is not None and entry.get("sha256") == digest and target.is_file() and sha256_file(target) == digest:
            return
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        self.manifest["outputs"].pop(MODEL_CARD_NAME, None)  # listed after the files it describes
        self.manifest["outputs"][MODEL_CARD_NAME] = _output_entry(MODEL_CARD_KIND, digest, len(data), {})

    def write_output(self, relative: str, writer: Callable[[Path], None], kind: str, **details: Any) -> Path:
        """Write ``relative`` atomically with ``writer(tmp_path)``, then hash it into the manifest."""
        target = self.file(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            writer(tmp)
            self.stage(relative, tmp, kind, details)
        self.settle_pending(relative, renamed=True)
        return target

    def stage(self, relative: str, staged: Path, kind: str, details: dict[str, Any],
              verification: dict[str, Any] | None = None) -> None:
        """Record, before ``staged`` is renamed to ``relative``, what the file will be (see :meth:`settle_pending`).

        A process killed between this save and the rename leaves the manifest's outputs and
        verifications as they were plus this pending entry, which the next writer settles; the
        temporary file ``staged`` carries this process's token, recorded before it was made
        (:mod:`mmexport.runs.lock`), and the next writer removes it.
        """
        self.file(relative)  # a name inside the run, or refused before anything is recorded
        self.manifest.setdefault(PENDING, {})[relative] = {
            "sha256": sha256_file(staged), "size_bytes": staged.stat().st_size, "kind": kind, "entry": details,
            "verification": verification,
        }
        self.save()

    def settle_pending(self, relative: str | None = None, *, renamed: bool = False) -> None:
        """Commit each pending record whose file is in place with the recorded hash; drop the others.

        ``renamed``: the caller has just renamed ``relative`` into place (no need to re-hash).
        A record whose rename never happened (the writer was killed) is dropped: the run is
        left exactly as before that write, and the orphaned temporary file is removed by the
        next writer (:mod:`mmexport.runs.lock`, by the token the killed writer recorded).
        """
        pending = self.manifest.get(PENDING) or {}
        for name in [relative] if relative is not None else list(pending):
            record = pending.pop(name, None)
            if record is None:
                continue
            try:
                target = self.file(name)
            except RunDirError:  # leads out of the run (a linked folder): never committed, dropped
                continue
            if renamed or (target.is_file() and sha256_file(target) == record["sha256"]):
                if record.get("verification") is not None:
                    self.manifest["verification"].append(record["verification"])
                self.manifest["outputs"][name] = _output_entry(record["kind"], record["sha256"], record["size_bytes"],
                                                               record["entry"])
        if not pending:
            self.manifest.pop(PENDING, None)
        self.save()

    def record_output(self, relative: str, kind: str, **details: Any) -> None:
        target = self.file(relative)
        self.manifest["outputs"][relative] = _output_entry(kind, sha256_file(target), target.stat().st_size, details)
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

    def publish_verified(self, relative: str, write: Callable[[Path], ArtifactFacts | None],
                         check: Callable[[Path], VerificationReport], kind: str, details: dict[str, Any], command: str, *,
                         mark_unverified: Callable[[Path, str], None] | None = None,
                         previous_sha256: str | None = None,
                         stamp: Callable[[Path, dict[str, Any]], dict[str, Any] | None] | None = None) -> PublishedArtifact:
        """Write ``relative`` under a hidden temporary name, verify it there, and only then publish it.

        ``write(tmp)`` makes the file and returns what making it established (recorded in the
        manifest); ``check(tmp)`` returns its verification report. A failed check removes the
        temporary file: nothing is published, the previous artifact (if any) stays, the failed
        report is recorded, and :class:`VerificationError` is raised. Only with ``mark_unverified``
        (the user's explicit ``--allow-unverified``) is a failed artifact published:
        ``mark_unverified(tmp, reason)`` first writes the failure into the file itself, and the
        manifest records ``verified: false`` with the reason. ``previous_sha256``: the hash of the
        file this one replaces, to report whether the new one reproduces it bit for bit.
        ``stamp(tmp, record)``: once judged (and marked), writes the check's record into the file's own
        metadata, leaving what was checked (graph, weights) unchanged; what it returns joins the manifest
        entry. The manifest hashes the stamped file, the one published.
        """
        target = self.file(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            facts = write(tmp)
            report = check(tmp)
            record = {"artifact": relative, "command": command, **report.as_dict()}
            reason = "; ".join(report.failures())
            if not report.passed:
                if mark_unverified is None:
                    self.add_verification(record)  # the failed check is history; nothing is published
                    hint = f"; {facts.hint}" if facts is not None and facts.hint else ""
                    raise VerificationError(f"{relative}: verification failed, nothing published: {reason}{hint}", report)
                mark_unverified(tmp, reason)
            stamped = (stamp(tmp, record) or {}) if stamp is not None else {}
            recorded = {**(facts.as_record() if facts is not None else {}), **stamped}
            status = {"verified": True} if report.passed else {"verified": False, "unverified_reason": reason,
                                                                "published_unverified_by": command + " --allow-unverified"}
            # the check's record and the output entry land together, after the rename (or not at all)
            self.stage(relative, tmp, kind, {**recorded, **details, **status}, verification=record)
        self.settle_pending(relative, renamed=True)
        sha = self.manifest["outputs"][relative]["sha256"]
        return published(self, relative, report, facts, reproduced=None if previous_sha256 is None else previous_sha256 == sha)

    def reference(self):
        """The run's stored reference set, hash-checked, and checked to belong to its final network."""

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
    facts: ArtifactFacts | None = None
    reproduced: bool | None = None  # a re-fold: bit-identical to the file it replaced (None: nothing replaced)


def published(run: RunDir, name: str, report: VerificationReport | None, facts: ArtifactFacts | None = None,
               reproduced: bool | None = None) -> PublishedArtifact:
    """The run's record of ``name`` as a :class:`PublishedArtifact`."""
    entry = run.manifest["outputs"][name]
    return PublishedArtifact(name, run.file(name), entry["sha256"], entry["size_bytes"], report, facts, reproduced)
