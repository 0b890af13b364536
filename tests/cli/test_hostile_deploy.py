"""Hostile deployment surfaces through the CLI: a forged model description, a host without PyTorch,
terminal escape sequences in run files and paths, files planted in a run.

Each case runs the real entry point in a subprocess (the exit code and the absence of a traceback are
the point) and asserts one line on stderr (exit 1) or an exit 0 where nothing is wrong, nothing a
terminal would act on in the output, and every file outside what the command owns byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import onnx
import pytest

from tests.conftest import train_exported_run, tree_hashes

# A host without PyTorch: importing torch or torchvision fails exactly as it does where they are not installed.
NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    """
)
ENTRY = "import sys\nfrom mmexport.cli.app import main\nsys.argv = ['mmexport'] + sys.argv[1:]\nmain()\n"
HOSTILE = "A\x1b[2J\x1b]0;pwned\x07B\rC\nD\x9b31mE\u202eF"  # screen clear, window title, CR, LF, 8-bit CSI, bidi override
ACTIVE = ("Cc", "Cf", "Zl", "Zp", "Cs")  # what a terminal acts on instead of showing


@pytest.fixture(scope="module")
def exported(tmp_path_factory, resnet18_sources):
    root = tmp_path_factory.mktemp("deploy")
    return train_exported_run(root / "run", resnet18_sources, image_size=32)


@pytest.fixture()
def run(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "run"))


def mmexport(args: list[str], cwd: Path, *, without_torch: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG", "COLUMNS")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200")
    code = (NO_TORCH if without_torch else "") + ENTRY
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, encoding="utf-8",
                          cwd=cwd, env=env, timeout=300, check=False)


def terminal_safe(text: str) -> bool:
    return all(char == "\n" or unicodedata.category(char) not in ACTIVE for char in text)


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    assert terminal_safe(result.stderr) and terminal_safe(result.stdout)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def forge_onnx_description(run: Path) -> None:
    """The issue's forged run: model.onnx's std and class order altered, its sha256 rewritten in the manifest."""
    model = onnx.load(str(run / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    block = json.loads(props["preprocessing"])
    block["std"] = [0.5, 0.5, 0.5]
    props.update(preprocessing=json.dumps(block), std=json.dumps([0.5, 0.5, 0.5]),
                 classes=json.dumps(list(reversed(json.loads(props["classes"])))))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(run / "model.onnx"))
    manifest = json.loads((run / "manifest.json").read_text())
    data = (run / "model.onnx").read_bytes()
    manifest["outputs"]["model.onnx"].update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    (run / "manifest.json").write_text(json.dumps(manifest))


# -- verification as deployed ------------------------------------------------------------------------------


def test_verify_onnx_fails_on_a_forged_embedded_description(run):
    forge_onnx_description(run)
    before = tree_hashes(run)
    line = one_error_line(mmexport(["verify", str(run), "--backend", "onnx"], run.parent),
                          "verification failed", "model.onnx: embedded classes", "embedded preprocessing.std [0.5, 0.5, 0.5] "
                          "differs from the run's [0.229, 0.224, 0.225]")
    assert "vascular" in line  # the values are shown, not only the field
    after = tree_hashes(run)
    # the failed check, recorded (and shown by the model card, which follows the manifest)
    assert {k for k in before if before[k] != after.get(k)} == {"manifest.json", "model_card.md"}
    assert json.loads((run / "manifest.json").read_text())["verification"][-1]["passed"] is False


# -- no PyTorch on this host: one line naming the extra to install, for every torch-side command ----------

TORCH_SIDE = {
    "verify (torch backend)": lambda r, s, w: ["verify", str(r)],
    "fold to onnx": lambda r, s, w: ["fold", str(r), "--to", "onnx"],
    "fold to safetensors": lambda r, s, w: ["fold", str(r), "--to", "safetensors"],
    "train": lambda r, s, w: ["train", "--arch", "resnet18", "--source-a", str(s[0]), "--source-b", str(s[1]),
                              "--data", "synthetic:target", "--out", str(w / "trained")],
    "demo": lambda r, s, w: ["demo", "--out", str(w / "demo")],
    "bench torch": lambda r, s, w: ["bench", str(r), "--engine", "torch", "--models", "folded", "--batch-sizes", "1",
                                    "--iterations", "1", "--rounds", "1", "--warmup", "0"],
}


@pytest.mark.parametrize("name", list(TORCH_SIDE))
def test_torch_side_commands_without_torch_say_what_to_install(run, resnet18_sources, tmp_path, name):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    before_run, before_cwd = tree_hashes(run), tree_hashes(workdir)
    args = TORCH_SIDE[name](run, resnet18_sources, workdir)
    result = mmexport(args, workdir, without_torch=True)
    # the same line for every torch-side command: the command, what it needs, the extra that brings it
    line = one_error_line(result, f"mmexport {args[0]} needs PyTorch: pip install 'mmexport[torch]'")
    assert line == f"error: mmexport {args[0]} needs PyTorch: pip install 'mmexport[torch]'"
    assert tree_hashes(run) == before_run
    assert tree_hashes(workdir) == before_cwd and not any(workdir.iterdir())  # no run, demo folder or lock left


# -- terminal escape sequences in file text and paths ---------------------------------------------------------


def test_inspect_prints_forged_manifest_text_literally(run):
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["command"] = HOSTILE
    manifest["created"] = HOSTILE
    manifest["model"]["classes"][0] = HOSTILE
    manifest["inputs"]["source_a"]["spec"] = HOSTILE
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = tree_hashes(run)
    result = mmexport(["inspect", str(run)], run.parent)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert terminal_safe(result.stdout) and terminal_safe(result.stderr)
    shown = "A\\x1b[2J\\x1b]0;pwned\\x07B\\rC\\nD\\x9b31mE\\u202eF"
    header = next(line for line in result.stdout.splitlines() if " created " in line)
    assert header.count(shown) == 2  # created and command, on the one line they belong to
    assert shown in next(line for line in result.stdout.splitlines() if line.startswith("arch "))
    assert tree_hashes(run) == before


def test_verify_manifest_prints_a_hostile_file_name_on_one_line(run):
    (run / f"notes{HOSTILE}.txt").write_text("a user's notes")
    before = tree_hashes(run)
    result = mmexport(["verify", str(run), "--manifest"], run.parent)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert terminal_safe(result.stdout)
    line = next(line for line in result.stdout.splitlines() if line.startswith("not in the manifest"))
    assert "notesA\\x1b[2J" in line and line.endswith("not part of the run, not read by mmexport")
    assert tree_hashes(run) == before


@pytest.mark.parametrize("command", ["verify", "inspect", "doctor"])
def test_error_line_escapes_a_hostile_path(tmp_path, command):
    missing = tmp_path / f"run{HOSTILE}"
    line = one_error_line(mmexport([command, str(missing)], tmp_path), "no such run directory")
    assert "run" + "A\\x1b[2J\\x1b]0;pwned\\x07B\\rC\\nD" in line
    assert not any(tmp_path.iterdir())  # no lock file dropped beside a path that is not a run


# -- files planted in a run: listed, and the ones mmexport would read fail the check ---------------------------


def test_verify_manifest_fails_on_an_unrecorded_artifact_name(run):
    shutil.copyfile(run / "model.onnx", run / "model.int8.onnx")  # registry name, no manifest entry, no check
    (run / "extra").mkdir()
    (run / "extra" / "model.py").write_text("import os\n")
    before = tree_hashes(run)
    result = mmexport(["verify", str(run), "--manifest"], run.parent)
    one_error_line(result, "2 file(s) the manifest does not list would be read as part of the run",
                   "model.int8.onnx", "extra/model.py")
    assert "model.int8.onnx: a file the registry names" in result.stdout
    assert tree_hashes(run) == before


def test_verify_manifest_lists_a_users_notes_and_passes(run):
    (run / "notes.txt").write_text("trained on the March export")
    result = mmexport(["verify", str(run), "--manifest"], run.parent)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "notes.txt: not part of the run, not read by mmexport" in result.stdout
    assert "every file matches the manifest (1 other file(s)" in result.stdout


def test_only_the_torch_extras_import_failures_become_the_install_line():
    """A package of the torch extra names the extra; any other missing package stays what it is (a bug with its
    traceback), not advice to install torch."""
    from mmexport.cli.app import _torch_import_failure

    assert _torch_import_failure(ModuleNotFoundError("No module named 'pydantic'", name="pydantic"), "fold") is None
    assert _torch_import_failure(ImportError("cannot import name 'x' from 'mmexport.config'"), "fold") is None
    translated = _torch_import_failure(ModuleNotFoundError("No module named 'torchvision.models'",
                                                           name="torchvision.models"), "train")
    assert str(translated) == "mmexport train needs PyTorch: pip install 'mmexport[torch]'"
    exporter = _torch_import_failure(ModuleNotFoundError("No module named 'onnxscript'", name="onnxscript"), "fold")
    assert str(exporter) == "mmexport fold needs onnxscript (part of the torch extra): pip install 'mmexport[torch]'"
