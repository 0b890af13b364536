"""Provenance of a run (``verify --manifest``): re-hash every file the manifest lists and every Triton
repository the run exported, trace each deployable artifact back to the source checkpoints, and say of
every file the manifest does not list whether mmexport (or a runtime it feeds) would read it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmexport import artifacts
from mmexport.fileio import sha256_file
from mmexport.runs.manifest import MANIFEST_NAME, PENDING, RunDir

# Formats something loads as a model, weights, reference data or code: a file of one of these in a run
# is taken for part of it (by a person, a script, Triton's repository scan or a runtime pointed at it).
LOADED_SUFFIXES = (".onnx", ".plan", ".engine", ".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".npz", ".npy",
                   ".data", ".py", ".pbtxt", ".so")


@dataclass(frozen=True)
class UntrackedFile:
    """A file inside the run that the manifest does not list, and whether that matters."""
    name: str  # relative to the run
    read_by_mmexport: bool  # True: mmexport, a runtime or Triton would read or load it as part of the run
    why: str


def classify_untracked(name: str, manifest: dict[str, Any]) -> UntrackedFile:
    """Whether an unlisted file would be read as part of the run: a name the artifact registry knows
    (an artifact, an engine sidecar, a benchmark model), a write still pending, or a format that is
    loaded (model, weights, engine, reference data, code). Anything else (a user's notes) is not."""
    row = artifacts.by_filename(name)
    if name in (manifest.get(PENDING) or {}):
        return UntrackedFile(name, True, "written by an interrupted command and not yet settled (the next writing "
                                         "command commits or removes it)")
    if row is not None:
        what = "sidecar of " + row.filename if name != row.filename else row.description
        return UntrackedFile(name, True, f"a file the registry names ({what}) that the manifest does not record: "
                                         "unverified, yet loaded by anyone who takes it for the run's")
    suffix = next((s for s in LOADED_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is not None or name.lower().endswith((".plan.json", ".engine.json")):
        return UntrackedFile(name, True, f"a {suffix or 'engine sidecar'} file: loadable as a model or code, "
                                         "and no check covers it")
    return UntrackedFile(name, False, "not part of the run, not read by mmexport")


@dataclass
class FileState:
    name: str
    kind: str
    state: str  # intact, altered, missing
    expected_sha256: str
    actual_sha256: str | None
    verified: bool | None  # the latest check of this file passed (None: never checked)


@dataclass
class ProvenanceReport:
    run: str
    files: list[FileState]
    inputs: list[tuple[str, str, str]]  # (input, sha256 recorded, state now: unchanged / changed / not reachable here)
    chains: list[list[str]]  # per deployable artifact: itself, what it was made from, ... down to the sources
    repositories: list[tuple[str, str, str]] = field(default_factory=list)  # (repository file, state, detail)
    untracked: list[UntrackedFile] = field(default_factory=list)  # files in the run the manifest does not list

    @property
    def unexpected(self) -> list[UntrackedFile]:
        """The unlisted files that would be read as part of the run (they fail the check)."""
        return [u for u in self.untracked if u.read_by_mmexport]

    @property
    def passed(self) -> bool:
        return (all(f.state == "intact" for f in self.files) and all(state == "intact" for _, state, _ in self.repositories)
                and not self.unexpected)


def _latest_verification(manifest: dict[str, Any]) -> dict[str, bool]:
    latest: dict[str, bool] = {}
    for record in manifest.get("verification", []):
        latest[record.get("artifact", "?")] = bool(record.get("passed"))
    return latest


def _chain(manifest: dict[str, Any], name: str) -> list[str]:
    """``name`` and everything it was made from, by the manifest's ``source`` fields and the registry's rows."""
    outputs = manifest.get("outputs", {})
    chain, seen = [], set()
    current: str | None = name
    while current and current not in seen:
        seen.add(current)
        chain.append(current)
        entry = outputs.get(current, {})
        row = artifacts.by_filename(current)
        parent = entry.get("source")
        if parent is None and row is not None:
            made_from = [artifacts.REGISTRY[key].filename for key in row.made_from if key in artifacts.REGISTRY]
            parent = next((f for f in made_from if f in outputs and f != artifacts.filename("reference")), None)
            if parent is None and any(key.startswith("source") for key in row.made_from):
                chain.append("sources: " + ", ".join(
                    f"{k} {str(manifest.get('inputs', {}).get(k, {}).get('sha256') or '?')[:12]}"
                    for k in ("source_a", "source_b") if k in manifest.get("inputs", {})))
        current = parent
    return chain


def _input_state(entry: dict[str, Any]) -> str:
    spec, recorded = entry.get("path") or entry.get("spec"), entry.get("sha256")
    if not recorded or not spec or not Path(str(spec)).is_file():
        return "not reachable here"
    return "unchanged" if sha256_file(spec) == recorded else "CHANGED since the run was trained"


def verify_manifest(run_path: str | os.PathLike[str]) -> ProvenanceReport:
    """Re-hash every file the manifest lists (and every Triton repository the run exported) and trace each
    deployable artifact back to the source checkpoints. Reads only; nothing is written."""
    run = RunDir.open(run_path)
    manifest = run.manifest
    latest = _latest_verification(manifest)
    files = []
    for name, entry in manifest["outputs"].items():
        path = run.file(name)
        actual = sha256_file(path) if path.is_file() else None
        state = "missing" if actual is None else ("intact" if actual == entry["sha256"] else "altered")
        files.append(FileState(name, entry.get("kind", "?"), state, entry["sha256"], actual, latest.get(name)))
    listed = set(manifest["outputs"]) | {MANIFEST_NAME}
    untracked = [classify_untracked(name, manifest) for name in sorted(
        p.relative_to(run.path).as_posix() for p in run.path.rglob("*")
        if p.is_file() and p.relative_to(run.path).as_posix() not in listed)]
    inputs = [(key, str(value.get("sha256") or "—"), _input_state(value))
              for key, value in manifest.get("inputs", {}).items() if isinstance(value, dict) and "sha256" in value]
    chains = [_chain(manifest, row.filename) for row in artifacts.deployable() if row.filename in manifest["outputs"]]
    repositories = []
    for repo in manifest.get("triton_repositories", []):
        base = Path(repo["path"]) / repo["model"]  # files are recorded relative to the model folder
        for relative, expected in repo["files"].items():
            target = base / relative
            if not target.is_file():
                repositories.append((str(target), "missing", ""))
            else:
                ok = sha256_file(target) == expected
                repositories.append((str(target), "intact" if ok else "altered", "" if ok else f"expected {expected[:12]}…"))
    return ProvenanceReport(str(run.path), files, inputs, chains, repositories, untracked)


__all__ = ["LOADED_SUFFIXES", "FileState", "ProvenanceReport", "UntrackedFile", "classify_untracked", "verify_manifest"]
