"""Provenance of a run (``verify --manifest``): re-hash every file the manifest lists and every Triton
repository the run exported, trace each deployable artifact back to the source checkpoints, and say of
every file the manifest does not list whether mmexport (or a runtime it feeds) would read it.

Also the provenance each deployable artifact carries *inside* itself, so that a file found alone
can be traced (``docs/deploying.md``, "Trace an artifact found alone"): :func:`artifact_provenance`
gives the metadata fields (``method``, ``model_kind``, ``model_description``, ``run_id`` and the
``provenance`` JSON: source sha256s, the data fingerprint, the final metrics) written into
``model.safetensors`` and every ONNX file; :func:`verification_metadata` the ``verification`` JSON
written into an artifact once it has passed (or, with ``--allow-unverified``, failed) its check;
:func:`read_embedded` reads both back from a file with nothing but ``onnx`` or ``safetensors``, and
:func:`embedded_differences` compares them with a run's manifest.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmexport import artifacts
from mmexport.errors import CheckpointError, MMExportError, one_line
from mmexport.fileio import sha256_file
from mmexport.jsonread import parse_json
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


# -- provenance embedded in the artifacts --------------------------------------------------------------------

PROVENANCE_FORMAT = "mmexport-provenance/1"
VERIFICATION_FORMAT = "mmexport-verification/1"
# The metadata keys this module writes (top level, every value a string; structured values are JSON).
PROVENANCE_KEYS = ("method", "model_kind", "model_description", "run_id", "provenance")
VERIFICATION_KEY = "verification"
MAX_EMBEDDED_CHARS = 16384  # of one embedded JSON value: a real one is about 1-2 kB
_TEXT = 200  # characters of one name or spec copied into a file
_SHOWN_FAILURES = 3

# method -> (model_kind, what the network is). A merge method's network is its fold (then, with stage-2
# epochs, fine-tuned); the baselines never merge: their network is one source's, probed and/or fine-tuned.
_MERGED = {
    "medmerge": "MedMerge merge of sources A and B (per-{granularity} coefficients learned on the target), folded into "
                "one stock {arch}",
    "average": "weight average of sources A and B (σ fixed at 0.5, nothing learned in the blend; not MedMerge), folded "
               "into one stock {arch}",
}
_SINGLE = {
    "finetune-a": "stock {arch} from source A alone, fine-tuned (no merge)",
    "finetune-b": "stock {arch} from source B alone, fine-tuned (no merge)",
    "lpft-a": "stock {arch} from source A alone, linear probe{then} (no merge)",
    "lpft-b": "stock {arch} from source B alone, linear probe{then} (no merge)",
}


def method_kind(config: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(method, model_kind, description)`` of a run's final network, from its recorded config.

    ``model_kind`` is ``folded`` for a merge method (MedMerge, average), ``finetuned`` or ``probed``
    for a single-source baseline: what the file holds, not what the project is about.
    """
    method = str(config.get("method", "?"))
    arch = str(config.get("arch", "?"))
    fine_tuned = bool(config.get("finetune_epochs")) or method.startswith("finetune-")
    if method in _MERGED:
        what = _MERGED[method].format(granularity=config.get("granularity", "kernel"), arch=arch)
        return method, "folded", what + (", then fine-tuned on the target" if fine_tuned else "")
    if method in _SINGLE:
        what = _SINGLE[method].format(arch=arch, then=", then fine-tuned" if fine_tuned else " only")
        return method, "finetuned" if fine_tuned else "probed", what
    return method, "unknown", f"{arch} trained with method {method[:_TEXT]!r}"


def _clip(value: Any) -> str:
    text = one_line(value)
    return text if len(text) <= _TEXT else text[: _TEXT - 1] + "…"


def _number(value: Any) -> Any:
    """A JSON-safe number: NaN/Inf (which JSON cannot carry) become null."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return None


def _source_record(entry: Mapping[str, Any]) -> dict[str, Any]:
    # the file name only, never the directory it was read from (a path says nothing a hash does not)
    name = Path(str(entry["path"])).name if entry.get("path") else entry.get("spec")
    return {"sha256": entry.get("sha256"), "format": entry.get("format"), "name": None if name is None else _clip(name)}


def _data_record(entry: Mapping[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"kind": entry.get("kind"), "fingerprint": entry.get("fingerprint")}
    if entry.get("kind") == "synthetic":  # generated from its spec: the spec is its identity
        record["spec"] = _clip(entry.get("source", ""))
    return record


def _metrics(final: Mapping[str, Any]) -> dict[str, Any]:
    return {split: {key: _number(scores.get(key)) for key in ("accuracy", "macro_f1", "num_samples")}
            for split, scores in final.items() if isinstance(scores, Mapping)}


def artifact_provenance(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The metadata fields every deployable artifact of the run carries: what it is and where it came from.

    ``method``, ``model_kind``, ``model_description``, ``run_id`` as text, and ``provenance`` as
    JSON: those four, the sources' sha256s (file names, never directories), the data's content
    fingerprint, and the final network's val/test metrics (torch fp32, as the manifest records
    them). Needs the run's final metrics: call it once training has evaluated the final network.
    """
    config = manifest.get("config") or {}
    method, kind, description = method_kind(config)
    inputs = manifest.get("inputs") or {}
    final = (manifest.get("training") or {}).get("final")
    if not isinstance(final, Mapping):
        raise MMExportError("the run records no final metrics yet; provenance is written after the final evaluation")
    record = {
        "format": PROVENANCE_FORMAT,
        "run_id": manifest.get("run_id"),
        "run_created": manifest.get("created"),
        "method": method,
        "model_kind": kind,
        "description": description,
        "arch": config.get("arch"),
        "seed": manifest.get("seed", config.get("seed")),
        "sources": {key: _source_record(value) for key, value in sorted(inputs.items())
                    if key.startswith("source_") and isinstance(value, Mapping)},
        "data": _data_record(inputs.get("data") or {}),
        "metrics": _metrics(final),
        "metrics_of": "the run's final network, torch fp32 (model.safetensors), as manifest.json records them",
    }
    return {
        "method": method,
        "model_kind": kind,
        "model_description": description,
        "run_id": str(manifest.get("run_id")),
        "provenance": _bounded(record, "provenance"),
    }


def _bounded(record: Mapping[str, Any], what: str) -> str:
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if len(text) > MAX_EMBEDDED_CHARS:
        raise MMExportError(f"the embedded {what} record is {len(text)} characters, over {MAX_EMBEDDED_CHARS}")
    return text


def verification_metadata(record: Mapping[str, Any], *, graph_sha256: str | None,
                          reference: Mapping[str, Any]) -> dict[str, str]:
    """The ``verification`` field for an artifact from its check's manifest record (``RunDir.publish_verified``).

    A bounded summary: the artifact, passed or not, the tolerance row that judged it (every
    field), what it was compared with (``reference``: the stored ``reference.npz`` and its sha256),
    each input set's sample count and worst statistics, the first failures, and ``graph_sha256``:
    the graph that was checked, which the metadata write leaves unchanged. No timestamp, so a
    re-export of the same run writes the same bytes.
    """
    sets = []
    for item in record.get("input_sets") or []:
        stats = (item.get("outputs") or {}).get("logits") or {}
        sets.append({"name": _clip(item.get("name", "?")), "passed": bool(item.get("passed")),
                     **{key: _number(stats.get(key)) for key in (
                         "n_samples", "top1_agreement", "max_abs_error", "min_cosine", "reference_macro_f1",
                         "candidate_macro_f1")}})
    tolerance = record.get("tolerance") or {}
    failures = [_clip(f) for f in list(record.get("notes") or [])[:_SHOWN_FAILURES]]
    for item in record.get("input_sets") or []:
        for name, stats in (item.get("outputs") or {}).items():
            failures += [_clip(f"{item.get('name')}/{name}: {f}") for f in stats.get("failures") or []]
    summary = {
        "format": VERIFICATION_FORMAT,
        "artifact": record.get("artifact"),
        "passed": bool(record.get("passed")),
        "command": record.get("command"),
        "tolerance": {key: _number(value) if not isinstance(value, str) else _clip(value)
                      for key, value in tolerance.items()},
        "reference": dict(reference),
        "candidate": _clip(record.get("candidate", "")),
        "graph_sha256": graph_sha256,
        "input_sets": sets,
        "failures": failures[:_SHOWN_FAILURES],
    }
    return {VERIFICATION_KEY: _bounded(summary, "verification")}


def reference_model_verification(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The ``verification`` field of ``model.safetensors``: it *is* the reference every other artifact is judged
    against (``reference.npz`` holds its torch fp32 outputs), checked finite; a merge's fold check is named."""
    folds = [r for r in manifest.get("verification", []) if r.get("artifact") == artifacts.filename("folded")]
    summary = {
        "format": VERIFICATION_FORMAT,
        "artifact": artifacts.filename("model"),
        "role": "reference",
        "passed": True,
        "checks": "the run's reference network: every artifact of the run is judged against its torch fp32 outputs "
                  "(reference.npz); its tensors were checked finite",
        "fold_check": None if not folds else {"artifact": folds[-1].get("artifact"), "passed": bool(folds[-1].get("passed")),
                                              "tolerance": (folds[-1].get("tolerance") or {}).get("name")},
    }
    return {VERIFICATION_KEY: _bounded(summary, "verification")}


@dataclass(frozen=True)
class EmbeddedProvenance:
    """What an artifact says about itself: its metadata's provenance fields, parsed."""
    path: str
    metadata: dict[str, str]
    provenance: dict[str, Any] | None  # None: the file carries none (made before mmexport 0.2's provenance)
    verification: dict[str, Any] | None
    graph_sha256: str | None  # recomputed from an ONNX file's graph (None for other formats)

    @property
    def run_id(self) -> str | None:
        return self.metadata.get("run_id")


def _embedded_json(metadata: Mapping[str, str], key: str, where: str) -> dict[str, Any] | None:
    text = metadata.get(key)
    if text is None:
        return None
    if len(text) > MAX_EMBEDDED_CHARS:
        raise CheckpointError(f"{where}: metadata field {key} is {len(text)} characters, over {MAX_EMBEDDED_CHARS}")
    value = parse_json(text, f"{where}: metadata field {key}", error=CheckpointError)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: metadata field {key} must be a JSON object")
    return value


def read_embedded(path: str | os.PathLike[str]) -> EmbeddedProvenance:
    """The provenance an artifact carries, from the file alone: an ONNX file's ``metadata_props`` (and its graph's
    sha256), a safetensors model's header, or a TensorRT engine's sidecar (``<engine>.json``). No run needed."""
    from mmexport.convert.onnxfile import get_metadata, graph_sha256, load_onnx
    from mmexport.runs.verify import _safetensors_metadata
    from mmexport.runtime.engine import EngineSidecar, sidecar_path

    target = Path(path)
    graph = None
    if target.suffix == ".onnx":
        model = load_onnx(target)
        metadata, graph = get_metadata(model), graph_sha256(model)
    elif target.suffix == ".safetensors":
        metadata = _safetensors_metadata(target)
    elif target.suffix in (".plan", ".engine") or target.name.endswith((".plan.json", ".engine.json")):
        sidecar = target if target.suffix == ".json" else sidecar_path(target)
        metadata = dict(EngineSidecar.read(sidecar).model_metadata)
    else:
        raise MMExportError(f"{target}: not an artifact mmexport embeds provenance in (.onnx, .safetensors, .plan)")
    return EmbeddedProvenance(str(target), metadata, _embedded_json(metadata, "provenance", str(target)),
                              _embedded_json(metadata, VERIFICATION_KEY, str(target)), graph)


def embedded_differences(embedded: EmbeddedProvenance, manifest: Mapping[str, Any], name: str) -> list[str]:
    """Each way ``embedded`` (read from the artifact ``name``) disagrees with the run ``manifest``; empty when it is
    the run's: run id, method, kind, sources, data, metrics, and, for a checked artifact, its verification (the
    graph it names is the file's, it passed as the manifest says, under the tolerance row the manifest records)."""
    if embedded.provenance is None:
        return ["carries no embedded provenance"]
    problems = []
    expected = json.loads(artifact_provenance(manifest)["provenance"])
    for key in ("run_id", "method", "model_kind", "sources", "data", "metrics"):
        if embedded.provenance.get(key) != expected.get(key):
            problems.append(f"embedded {key} {json.dumps(embedded.provenance.get(key))[:80]} differs from the run's "
                            f"{json.dumps(expected.get(key))[:80]}")
    for key in ("method", "model_kind", "run_id"):
        if embedded.metadata.get(key) != expected.get(key):
            problems.append(f"metadata field {key} {json.dumps(embedded.metadata.get(key))[:80]} differs from the run's "
                            f"{json.dumps(expected.get(key))[:80]}")
    check = embedded.verification
    if check is None:
        return problems + ["carries no verification record"]
    if check.get("artifact") != name and check.get("role") is None:
        problems.append(f"its verification record is of {json.dumps(check.get('artifact'))[:80]}, not {name}")
    if embedded.graph_sha256 is not None and check.get("graph_sha256") != embedded.graph_sha256:
        problems.append("its verification record names another graph than the file holds (graph_sha256 differs)")
    entry = (manifest.get("outputs") or {}).get(name) or {}
    if "verified" in entry and bool(check.get("passed")) != bool(entry["verified"]):
        problems.append(f"embedded verification passed={check.get('passed')} but the manifest says verified="
                        f"{entry['verified']}")
    records = [r for r in manifest.get("verification", []) if r.get("artifact") == name]
    publish = [r for r in records if r.get("command") == check.get("command")] or records
    if check.get("role") is None and publish:
        row = (publish[-1].get("tolerance") or {}).get("name")
        if (check.get("tolerance") or {}).get("name") != row:
            problems.append(f"embedded tolerance row {json.dumps((check.get('tolerance') or {}).get('name'))} differs "
                            f"from the manifest's {json.dumps(row)}")
    return problems


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
    # (deployable artifact, "matches" / "differs" / "none", detail): what each file says of itself against the manifest
    embedded: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def unexpected(self) -> list[UntrackedFile]:
        """The unlisted files that would be read as part of the run (they fail the check)."""
        return [u for u in self.untracked if u.read_by_mmexport]

    @property
    def passed(self) -> bool:
        return (all(f.state == "intact" for f in self.files) and all(state == "intact" for _, state, _ in self.repositories)
                and not self.unexpected and all(state != "differs" for _, state, _ in self.embedded))


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
    # exports written outside the run: Triton repositories (files relative to the model folder) and
    # MONAI Bundles (files relative to the recorded folder: the bundle's, or the zip's parent)
    exported = [(Path(repo["path"]) / repo["model"], repo["files"]) for repo in manifest.get("triton_repositories", [])]
    exported += [(Path(str(bundle.get("path", ""))), bundle.get("files") or {})
                 for bundle in manifest.get("monai_bundles", []) if isinstance(bundle, dict)]
    for base, recorded in exported:
        for relative, expected in recorded.items():
            target = base / relative
            if not target.is_file():
                repositories.append((str(target), "missing", ""))
            else:
                ok = sha256_file(target) == expected
                repositories.append((str(target), "intact" if ok else "altered", "" if ok else f"expected {expected[:12]}…"))
    return ProvenanceReport(str(run.path), files, inputs, chains, repositories, untracked, _embedded_states(run, files))


def _embedded_states(run: RunDir, files: list[FileState]) -> list[tuple[str, str, str]]:
    """Each intact deployable artifact's embedded provenance against the manifest (an altered file already fails)."""
    intact = {f.name for f in files if f.state == "intact"}
    states = []
    for row in artifacts.deployable():
        if row.filename not in intact:
            continue
        try:
            embedded = read_embedded(run.file(row.filename))
        except MMExportError as exc:
            states.append((row.filename, "differs", one_line(exc)[:300]))
            continue
        if embedded.provenance is None and embedded.verification is None:
            states.append((row.filename, "none", "carries no embedded provenance (made before mmexport recorded it)"))
            continue
        problems = embedded_differences(embedded, run.manifest, row.filename)
        states.append((row.filename, "differs", "; ".join(problems)) if problems else
                      (row.filename, "matches", f"run {str(embedded.run_id)[:12]}…, {embedded.metadata.get('method')}"))
    return states


__all__ = [
    "LOADED_SUFFIXES", "MAX_EMBEDDED_CHARS", "PROVENANCE_FORMAT", "PROVENANCE_KEYS", "VERIFICATION_FORMAT",
    "VERIFICATION_KEY", "EmbeddedProvenance", "FileState", "ProvenanceReport", "UntrackedFile", "artifact_provenance",
    "classify_untracked", "embedded_differences", "method_kind", "read_embedded", "reference_model_verification",
    "verification_metadata", "verify_manifest",
]
