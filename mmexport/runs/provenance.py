"""Provenance of a run (``verify --manifest``): re-hash every file the manifest lists and every Triton
repository the run exported, and trace each deployable artifact back to the source checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmexport import artifacts
from mmexport.fileio import sha256_file
from mmexport.runs.manifest import MANIFEST_NAME, RunDir


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
    untracked: list[str] = field(default_factory=list)  # files in the run the manifest does not list

    @property
    def passed(self) -> bool:
        return all(f.state == "intact" for f in self.files) and all(state == "intact" for _, state, _ in self.repositories)


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
    untracked = sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*")
                       if p.is_file() and str(p.relative_to(run.path)) not in listed)
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


__all__ = ["FileState", "ProvenanceReport", "verify_manifest"]
