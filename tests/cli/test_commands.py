"""The command line as a user runs it: real subprocesses, real exit codes, real stderr.

One tiny run is trained once per module (``trained``). Every other invocation
is independent of the others, so the ``runs`` fixture starts them all at once
in a small thread pool (each is its own ``python -m mmexport`` process; most of
their time is importing torch) and the tests below only inspect the results.
A test that needs a run it may change gets its own copy of the trained one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torchvision

from mmexport import __version__
from mmexport.torchside.checkpoints import save_state_dict
from mmexport.errors import VerificationError
from mmexport.runs.manifest import RunDir
from mmexport.torchside.modelfile import load_model, save_model
from mmexport.torchside.operations import verify_run
from tests.conftest import TINY_TARGET, backbone_state, tree_hashes, write_image_folder

TINY = [
    "--arch", "resnet18", "--data", TINY_TARGET, "--image-size", "32",
    "--merge-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8",
]
RUN_FILES = {"unmerged.safetensors", "folded.safetensors", "model.safetensors"}
TIMEOUT = 300
WORKERS = 3


def cli(*args, debug: bool = False, wide: bool = False, script: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m mmexport ARGS`` (or the console script) with the user's environment.

    MMEXPORT_DEBUG is removed unless ``debug``. ``wide`` sets COLUMNS so rich tables are
    not truncated where a test reads them; errors are checked at the default width (80).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG", "COLUMNS", "FORCE_COLOR")}
    env["PYTHONIOENCODING"] = "utf-8"
    # Several of these processes run at once on a small machine: one compute thread each avoids
    # oversubscription (spinning OpenMP workers cost more CPU than the tiny models themselves).
    env.setdefault("OMP_NUM_THREADS", "1")
    if debug:
        env["MMEXPORT_DEBUG"] = "1"
    if wide:
        env["COLUMNS"] = "220"
    command = [str(script)] if script else [sys.executable, "-m", "mmexport"]
    return subprocess.run(
        [*command, *map(str, args)], env=env, capture_output=True, text=True, encoding="utf-8",
        errors="replace", timeout=TIMEOUT, umask=0o022,
    )


def show(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(out: Path) -> list[str]:
    """Hidden staging / retired siblings of a run directory (``.NAME.partial-*``, ``.NAME.old-*``).

    The run's lock file ``.NAME.lock`` is not counted here: a writer that failed leaves it with the record of its
    temporaries (for the next writer); one that finished removes it (tests/runs/test_lock.py)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.lock")


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 1, show(result)
    assert "Traceback" not in result.stderr, show(result)
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, show(result)
    line = result.stderr.rstrip("\n")
    assert line.startswith("error: ") and line[len("error: "):].strip(), show(result)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def train_args(source_a: Path, source_b: Path, out: Path, *extra) -> list:
    return ["train", *TINY, "--source-a", source_a, "--source-b", source_b, "--out", out, *extra]


def manifest_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# --------------------------------------------------------------------------- the shared run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, resnet18_sources):
    parent = tmp_path_factory.mktemp("cli_run")
    out = parent / "run"
    result = cli(*train_args(*resnet18_sources, out), wide=True)
    assert result.returncode == 0, show(result)
    return out, result


# --------------------------------------------------------------------------- everything else, concurrently


class Evil:
    """Unpickling this runs code: ``open(marker, "w")`` creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Case:
    """One bad invocation and what it must (not) leave behind."""

    argv: list
    needles: list = field(default_factory=list)
    out: Path | None = None  # must not exist afterwards, nor any staging sibling
    preserved: Path | None = None  # must be unchanged afterwards
    marker: Path | None = None  # must not be created
    debug: bool = False
    before: dict = field(default_factory=dict)


# Mistakes click itself catches: a usage message and exit 2, never a traceback.
USAGE_ERRORS = {
    "usage_no_command": [],
    "usage_unknown_option": ["train", "--bogus"],
    "usage_bad_integer": ["verify", "RUN", "--samples", "many"],
}


def _source(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(path, state) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


def _image_folder(root: Path, val: dict | None = None) -> Path:
    return write_image_folder(root, {"train": {"benign": 6, "malignant": 4}, "val": val or {"benign": 3, "malignant": 3}})


def bad_cases(root: Path, source_a: Path, source_b: Path, run: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}

    def train_case(name: str, needles: list, *extra, source_b_path: Path | None = None, data: Path | None = None):
        out = root / name / "run"
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = train_args(source_a, source_b_path or source_b, out, *extra)
        if data is not None:
            argv[argv.index("--data") + 1] = data
        cases[name] = Case(argv, needles, out=out)
        return cases[name]

    bad = _source(root / "different_arch" / "resnet34.safetensors", backbone_state("resnet34", 3))
    train_case("different_arch", ["source B", bad.name, "resnet34"], source_b_path=bad)

    state = backbone_state("resnet18", 3)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    bad = _source(root / "wrong_shape" / "gray.safetensors", state)
    train_case("wrong_shape", ["source B", bad.name, "conv1.weight", "(64, 1, 7, 7)"], source_b_path=bad)

    bad = root / "pickled_module" / "module.pt"
    bad.parent.mkdir()
    torch.save(torchvision.models.resnet18(num_classes=3), bad)
    train_case("pickled_module", ["source B", bad.name, "refused"], source_b_path=bad)

    marker = root / "code_pickle" / "PWNED"
    bad = _source(root / "code_pickle" / "evil.pt", {"state_dict": backbone_state("resnet18", 4), "hook": Evil(marker)})
    train_case("code_pickle", ["source B", bad.name, "refused"], source_b_path=bad).marker = marker

    bad = root / "empty_file" / "empty.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"")
    train_case("empty_file", ["source B", bad.name, "empty"], source_b_path=bad)

    bad = root / "truncated" / "cut.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(source_b.read_bytes()[: source_b.stat().st_size // 2])
    train_case("truncated", ["source B", bad.name, "truncated"], source_b_path=bad)

    bad = root / "directory" / "weights.safetensors"
    bad.mkdir(parents=True)
    train_case("directory", ["source B", bad.name, "directory"], source_b_path=bad)

    state = backbone_state("resnet18", 3)
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad = _source(root / "nan_weights" / "nan.safetensors", state)
    train_case("nan_weights", ["source B", bad.name, "layer2.0.conv1.weight", "NaN"], source_b_path=bad)

    train_case("unknown_arch", ["'resnet19'", "resnet18", "resnet50", "densenet121"], "--arch", "resnet19")

    data = root / "no_images" / "data"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    train_case("no_images", [str(data / "train")], data=data)

    data = _image_folder(root / "val_lacks_class" / "data", val={"benign": 3})
    train_case("val_lacks_class", [str(data / "val"), "malignant"], data=data)

    train_case("unknown_granularity", ["'kernels'", "kernel, filter, layer"], "--granularity", "kernels")
    train_case("unknown_bn_init", ["'reset'", "blend, reestimate"], "--bn-init", "reset")
    train_case("unknown_align", ["'foo'", "none, weights"], "--align", "foo")
    train_case("align_one_source", ["--align weights", "finetune-a", "drop --align"], "--method", "finetune-a",
               "--align", "weights")
    train_case("align_densenet", ["densenet121", "concatenat", "not supported"], "--arch", "densenet121",
               "--source-a", "scratch", "--source-b", "scratch:1", "--align", "weights")

    existing = root / "existing_not_run" / "run"
    existing.mkdir(parents=True)
    (existing / "patient_notes.txt").write_text("do not delete")
    cases["existing_not_run"] = Case(
        train_args(source_a, source_b, existing, "--force"), [str(existing), "not an mmexport run"], preserved=existing
    )

    altered = root / "verify_altered" / "run"
    shutil.copytree(run, altered)
    folded = altered / "folded.safetensors"
    blob = bytearray(folded.read_bytes())
    blob[-1] ^= 0x01  # one bit of one weight
    folded.write_bytes(bytes(blob))
    cases["verify_altered"] = Case(["verify", altered], [str(folded), "sha256", "altered"], preserved=altered)

    not_run = root / "verify_not_run"
    not_run.mkdir()
    (not_run / "data.txt").write_text("x")
    cases["verify_not_run"] = Case(["verify", not_run], [str(not_run), "not an mmexport run"], preserved=not_run)
    cases["fold_unknown_format"] = Case(["fold", run, "--to", "onnx2"], ["'onnx2'", "safetensors, pt"], preserved=run)

    data = _image_folder(root / "negative_image_size" / "data")
    argv = train_case("negative_image_size", ["image"], data=data).argv
    argv[argv.index("--image-size") + 1] = "-5"

    data = _image_folder(root / "corrupt_image" / "data")
    (data / "train" / "benign" / "2.png").write_bytes(b"not a png at all")
    train_case("corrupt_image", [str(data / "train" / "benign" / "2.png")], data=data)

    state = backbone_state("resnet18", 3)
    state["conv1.weight"][0, 0, 0, 0] = float("inf")
    bad = _source(root / "debug" / "inf.safetensors", state)
    train_case("debug", [], source_b_path=bad).debug = True

    for name, argv in USAGE_ERRORS.items():
        cases[name] = Case([run if arg == "RUN" else arg for arg in argv])
    return cases


def _fold_chain(run: Path) -> dict:
    before = manifest_of(run)
    to_pt = cli("fold", run, "--to", "pt", wide=True)
    refold = cli("fold", run, wide=True)
    return {"run": run, "before": before, "to_pt": to_pt, "refold": refold}


def _verify_chain(run: Path) -> dict:
    plain = cli("verify", run, "--samples", "8", wide=True)
    with_data = cli("verify", run, "--samples", "8", "--data", TINY_TARGET, wide=True)
    return {"run": run, "plain": plain, "with_data": with_data}


def _force_chain(run: Path, source_a: Path, source_b: Path) -> dict:
    original = tree_hashes(run)
    refused = cli(*train_args(source_a, source_b, run))
    after_refused = tree_hashes(run)
    # a failure after the staging directory exists (the loss blows up) must leave the old run as it was
    failed = cli(*train_args(source_a, source_b, run, "--force", "--lr-head", "1e30", "--lr-logits", "1e30"))
    after_failed, leftovers_failed = tree_hashes(run), leftovers(run)
    replaced = cli(*train_args(source_a, source_b, run, "--force", "--seed", "5", "--finetune-epochs", "0"))
    return {
        "run": run, "original": original, "refused": refused, "after_refused": after_refused, "failed": failed,
        "after_failed": after_failed, "leftovers_failed": leftovers_failed, "replaced": replaced,
    }


def _script_help() -> subprocess.CompletedProcess | None:
    script = Path(sys.executable).with_name("mmexport")
    if not script.exists():
        found = shutil.which("mmexport")
        if found is None:
            return None
        script = Path(found)
    return cli("--help", script=script)


class Results(dict):
    """name -> future; reading a result re-raises that job's own exception in the test that reads it."""

    def __getitem__(self, name: str):
        return super().__getitem__(name).result()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, resnet18_sources, trained) -> Results:
    root = tmp_path_factory.mktemp("cli_jobs")
    run = trained[0]

    def copy(name: str) -> Path:
        target = root / name / "run"
        shutil.copytree(run, target)
        return target

    cases = bad_cases(root / "bad", *resnet18_sources, run)
    for case in cases.values():
        if case.preserved is not None:
            case.before = tree_hashes(case.preserved)
    jobs: dict[str, Callable[[], object]] = {
        name: (lambda case=case: (case, cli(*case.argv, debug=case.debug))) for name, case in cases.items()
    }
    fold_run, verify_run_dir, force_run = copy("fold"), copy("verify"), copy("force")
    jobs.update({
        "help": lambda: cli("--help"),
        "version": lambda: cli("--version"),
        "train_help": lambda: cli("train", "--help", wide=True),
        "script_help": _script_help,
        "inspect": lambda: cli("inspect", run, wide=True),
        "inspect_all": lambda: cli("inspect", run, "--all", wide=True),
        "fold": lambda: _fold_chain(fold_run),
        "verify": lambda: _verify_chain(verify_run_dir),
        "force": lambda: _force_chain(force_run, *resnet18_sources),
    })
    # the longest chains first, so they do not end up last on a busy pool
    order = ["force", "fold", "verify"] + [name for name in jobs if name not in ("force", "fold", "verify")]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = Results((name, pool.submit(jobs[name])) for name in order)
    return results  # the pool has finished every job here


# --------------------------------------------------------------------------- 1. entry points


def test_help_and_version(runs):
    result = runs["help"]
    assert result.returncode == 0, show(result)
    assert "Usage" in result.stdout and result.stderr == "", show(result)
    for command in ("train", "fold", "verify", "inspect"):
        assert command in result.stdout
    version = runs["version"]
    assert version.returncode == 0, show(version)
    assert version.stdout.strip() == f"mmexport {__version__}"
    train_help = runs["train_help"]
    assert train_help.returncode == 0, show(train_help)
    for option in ("--source-a", "--source-b", "--granularity", "--bn-init", "--force"):
        assert option in train_help.stdout


def test_console_script_help(runs):
    result = runs["script_help"]
    assert result is not None, "the mmexport console script is not installed"
    assert result.returncode == 0, show(result)
    assert "Usage: mmexport" in result.stdout
    assert "inspect" in result.stdout and "fold" in result.stdout


@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_usage_errors_exit_2_without_traceback(runs, name):
    case, result = runs[name]
    assert "Traceback" not in result.stderr, show(result)
    assert "Usage" in result.stdout + result.stderr, show(result)
    if case.argv:
        assert result.returncode == 2, show(result)
        assert "Error" in result.stderr, show(result)
    else:
        assert result.returncode in (0, 2), show(result)


# --------------------------------------------------------------------------- 2. happy path


def test_train_prints_summary(trained):
    out, result = trained
    assert "run written to" in result.stdout and str(out) in result.stdout, show(result)
    assert "final val" in result.stdout and "final test" in result.stdout
    assert result.stderr == "", show(result)


def test_train_manifest_outputs_match_files(trained):
    out, _ = trained
    manifest = manifest_of(out)
    assert manifest["format"] == "mmexport-run/2"
    assert RUN_FILES <= set(manifest["outputs"])
    # every file the run holds is accounted for in the manifest, and nothing it lists is missing
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == set(manifest["outputs"]) | {"manifest.json"}
    for name, entry in manifest["outputs"].items():
        path = out / name
        assert entry["sha256"] == sha256(path), name
        assert entry["size_bytes"] == path.stat().st_size, name
    assert manifest["outputs"]["unmerged.safetensors"]["kind"] == "unmerged"
    assert manifest["outputs"]["model.safetensors"]["stage"] == "finetuned"
    assert manifest["outputs"]["folded.safetensors"]["stage"] == "folded"
    assert "completed" in manifest and manifest["command"].startswith("mmexport train")


def test_train_manifest_provenance(trained, resnet18_sources):
    out, _ = trained
    manifest = manifest_of(out)
    config = manifest["config"]
    assert (config["arch"], config["data"], config["image_size"]) == ("resnet18", TINY_TARGET, 32)
    assert (config["merge_epochs"], config["finetune_epochs"], config["batch_size"]) == (1, 1, 8)
    assert config["granularity"] == "kernel" and config["device_used"] == "cpu"
    assert manifest["seed"] == 0
    for key, path in zip(("source_a", "source_b"), resnet18_sources):
        source = manifest["inputs"][key]
        assert source["sha256"] == sha256(path)
        assert source["size_bytes"] == path.stat().st_size
        assert source["path"] == str(path.resolve())
        assert source["format"] == "safetensors"
    assert manifest["inputs"]["source_a"]["sha256"] != manifest["inputs"]["source_b"]["sha256"]
    data = manifest["inputs"]["data"]
    assert (data["source"], data["n_train"], data["n_val"], data["n_test"]) == (TINY_TARGET, 24, 16, 16)
    environment = manifest["environment"]
    for package in ("torch", "torchvision", "safetensors", "numpy"):
        assert environment["packages"][package] == importlib.metadata.version(package)
    assert environment["mmexport"] == __version__
    assert environment["python"] == sys.version.split()[0]
    assert manifest["model"]["classes"] == ["nevus", "melanoma", "seborrheic-keratosis", "blue-nevus", "vascular"]
    (check,) = manifest["verification"]
    assert check["artifact"] == "folded.safetensors" and check["passed"] is True
    assert check["tolerance"]["name"] == "fold"
    assert {s["name"] for s in check["input_sets"]} == {"random", "data:val"}
    for input_set in check["input_sets"]:
        assert input_set["passed"] is True
        assert input_set["outputs"]["logits"]["top1_agreement"] == 1.0
    assert manifest["training"]["final"]["test"]["num_samples"] == 16


def test_train_leaves_no_staging_directory(trained):
    out, _ = trained
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == ["run"]


def test_published_files_honour_umask(trained):
    out, _ = trained  # trained with umask 022
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert modes == {name: oct(0o644) for name in modes}


def test_fold_to_pt(runs):
    chain = runs["fold"]
    run, result = chain["run"], chain["to_pt"]
    assert result.returncode == 0, show(result)
    assert "pass" in result.stdout and "FAIL" not in result.stdout
    pt = run / "folded.pt"
    assert str(pt) in result.stdout
    payload = torch.load(pt, weights_only=True, map_location="cpu")
    assert payload["mmexport"]["arch"] == "resnet18" and payload["mmexport"]["stage"] == "folded"
    network = torchvision.models.resnet18(num_classes=5)
    network.load_state_dict(payload["state_dict"], strict=True)
    network.eval()
    reference, _ = load_model(run / "folded.safetensors")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(network(images), reference(images))
    manifest = manifest_of(run)
    assert manifest["outputs"]["folded.pt"]["sha256"] == sha256(pt)
    assert manifest["outputs"]["folded.pt"]["format"] == "torch-state-dict"
    pt_checks = [v for v in manifest["verification"] if v["artifact"] == "folded.pt"]
    assert len(pt_checks) == 1 and pt_checks[0]["passed"] is True and pt_checks[0]["command"] == "fold"


def test_refold_is_bit_identical(runs):
    chain = runs["fold"]
    run, result = chain["run"], chain["refold"]
    assert result.returncode == 0, show(result)
    assert "bit-identical" in result.stdout and "differs" not in result.stdout, show(result)
    old_sha = chain["before"]["outputs"]["folded.safetensors"]["sha256"]
    assert manifest_of(run)["outputs"]["folded.safetensors"]["sha256"] == old_sha == sha256(run / "folded.safetensors")
    assert [v.get("command") for v in manifest_of(run)["verification"]] == [None, "fold", "fold"]
    assert leftovers(run) == [] and not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_verify_passes_and_is_recorded(runs):
    chain = runs["verify"]
    plain, with_data = chain["plain"], chain["with_data"]
    assert plain.returncode == 0, show(plain)
    assert "pass" in plain.stdout and "verification passed" in plain.stdout and "FAIL" not in plain.stdout
    assert "random" in plain.stdout and "data:val" not in plain.stdout
    assert with_data.returncode == 0, show(with_data)
    assert "pass" in with_data.stdout and "data:val" in with_data.stdout, show(with_data)

    checks = manifest_of(chain["run"])["verification"]
    assert len(checks) == 3
    for check, sets in zip(checks[1:], ({"random"}, {"random", "data:val"})):
        assert check["command"] == "verify" and check["artifact"] == "folded.safetensors"
        assert check["passed"] is True
        assert {s["name"] for s in check["input_sets"]} == sets
        assert check["input_sets"][0]["outputs"]["logits"]["n_samples"] == 8


def test_inspect_shows_coefficients(runs, trained):
    result, everything = runs["inspect"], runs["inspect_all"]
    assert result.returncode == 0, show(result)
    text = result.stdout
    assert "σ(λ)" in text and "conv1.weight" in text and "layer4.1.conv2.weight" in text
    assert "intact" in text and "resnet18" in text
    assert "bn1.weight" not in text  # only conv weights without --all
    # stage-1 diagnostics of the manifest: the share of saturated coefficients and the head-only probes
    diagnostics = manifest_of(trained[0])["training"]["diagnostics"]
    assert f"beyond 0.1/0.9 after stage 1: {diagnostics['sigma_saturation']:.1%}" in text
    assert f"source A {diagnostics['source_probes']['A']['val_macro_f1']:.3f}" in text
    assert ("stage 1 ended below the head-only probe" in text) == bool(diagnostics["stage1_below_probe"])
    assert everything.returncode == 0, show(everything)
    assert "bn1.weight" in everything.stdout and "layer4.1.bn2.bias" in everything.stdout
    assert "norm" in everything.stdout
    assert len(everything.stdout.splitlines()) > len(text.splitlines()) + 20
    # inspect only reads: the shared run still holds exactly what training wrote
    manifest = manifest_of(trained[0])
    assert len(manifest["verification"]) == 1


# --------------------------------------------------------------------------- 3. bad input


BAD_INPUTS = [
    "different_arch", "wrong_shape", "pickled_module", "code_pickle", "empty_file", "truncated", "directory",
    "nan_weights", "unknown_arch", "no_images", "val_lacks_class", "unknown_granularity", "unknown_bn_init",
    "unknown_align", "align_one_source", "align_densenet",
    "existing_not_run", "verify_altered", "verify_not_run", "fold_unknown_format",
    "negative_image_size",
    "corrupt_image",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_error(runs, name):
    case, result = runs[name]
    assert_one_line_error(result, *case.needles)
    if case.out is not None:
        assert not case.out.exists(), f"{case.out} was created"
        assert leftovers(case.out) == []
    if case.preserved is not None:
        assert tree_hashes(case.preserved) == case.before
        assert leftovers(case.preserved) == []
    if case.marker is not None:
        assert not case.marker.exists(), "unpickling the checkpoint ran code"


def test_code_pickle_payload_is_live(tmp_path):
    # The refusal above only means something if the payload really runs code when unpickled freely.
    marker = tmp_path / "RAN"
    # plain pickle is the unrestricted unpickler torch.load would fall back to; never used by mmexport
    import pickle

    restored = pickle.loads(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "hook": Evil(marker)}))
    restored["hook"].close()
    assert marker.exists()


def test_debug_env_shows_traceback(runs):
    case, result = runs["debug"]
    assert result.returncode == 1, show(result)
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr, show(result)
    assert "conv1.weight" in result.stderr
    assert not case.out.exists() and leftovers(case.out) == []


def test_existing_run_needs_force_and_force_replaces(runs):
    chain = runs["force"]
    run = chain["run"]
    assert_one_line_error(chain["refused"], str(run), "--force")
    assert chain["after_refused"] == chain["original"]

    assert_one_line_error(chain["failed"], "loss")
    assert chain["after_failed"] == chain["original"]
    assert chain["leftovers_failed"] == []

    replaced = chain["replaced"]
    assert replaced.returncode == 0, show(replaced)
    manifest = manifest_of(run)
    assert manifest["seed"] == 5 and manifest["config"]["force"] is True
    assert manifest["config"]["finetune_epochs"] == 0
    assert manifest["outputs"]["model.safetensors"]["stage"] == "folded"
    assert tree_hashes(run) == {**{name: e["sha256"] for name, e in manifest["outputs"].items()},
                           "manifest.json": sha256(run / "manifest.json")}
    assert tree_hashes(run)["unmerged.safetensors"] != chain["original"]["unmerged.safetensors"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # the finished writer removed its lock file


# --------------------------------------------------------------------------- 4. a failed numerical check


def test_verification_failure_exits_nonzero_and_is_recorded(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    folded_path = run / "folded.safetensors"
    model, info = load_model(folded_path)
    with torch.no_grad():
        model.fc.bias.add_(1e-3)  # every logit moves equally: top-1 agrees, only the tolerance catches it
    save_model(folded_path, model, info, "folded")
    RunDir.open(run).record_output("folded.safetensors", "model")  # so the sha256 check cannot catch it

    with pytest.raises(VerificationError) as exc:
        verify_run(run, samples=8)
    report = exc.value.report
    assert report is not None and not report.passed
    stats = report.input_sets[0].outputs["logits"]
    assert stats.top1_agreement == 1.0 and stats.max_abs_error == pytest.approx(1e-3, rel=1e-2)
    assert "folded.safetensors" in str(exc.value)
    checks = manifest_of(run)["verification"]
    assert len(checks) == 2 and checks[-1]["passed"] is False and checks[-1]["command"] == "verify"

    result = cli("verify", run, "--samples", "8", wide=True)
    assert_one_line_error(result, "folded.safetensors", "verification failed")
    assert "FAIL" in result.stdout and "verification passed" not in result.stdout, show(result)
    checks = manifest_of(run)["verification"]
    assert len(checks) == 3 and checks[-1]["passed"] is False
    assert checks[-1]["input_sets"][0]["outputs"]["logits"]["elements_out_of_tolerance"] > 0
