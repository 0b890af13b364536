"""The deployment side works where PyTorch is not installed.

A subprocess blocks ``torch`` and ``torchvision`` with a meta-path finder (any attempt
to import them raises ImportError) and then does what an inference server and an
auditor on a torch-free host do: imports ``mmexport.runtime``, classifies a PNG file
with an exported ONNX model, imports the ONNX Runtime runner, the comparison policy
and the bench harness, and runs ``mmexport --help``, ``verify --backend onnx``,
``bench --engine onnx`` and ``inspect`` on a run. The core dependencies in pyproject.toml are checked
against what the torch-free modules import (a real install without torch: test_torch_free_install.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_layout_tool, train_exported_run

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked in this test (a torch-free host)")
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, resnet18_sources):
    root = tmp_path_factory.mktemp("torchfree")
    run = train_exported_run(root / "run", resnet18_sources)
    rng = np.random.default_rng(3)
    png = root / "lesion.png"
    Image.fromarray(rng.integers(0, 256, (80, 70, 3), dtype=np.uint8)).save(png)
    return run, png


def _run_blocked(script: str, cwd: Path) -> subprocess.CompletedProcess:
    code = BLOCKER + textwrap.dedent(script)
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
                          check=False)


# The module map is the folder layout: ``mmexport/torchside/`` may import torch; so may the demo, which
# trains (it orchestrates both sides from the top). Every other module must import with torch blocked.
MAY_IMPORT_TORCH_AT_TOP = {"mmexport.demo"}
NOT_IMPORTABLE_ALONE = {"mmexport.serving.python_model"}  # runs inside Triton's Python backend (triton_python_backend_utils)


def _package_modules() -> list[str]:
    """Every module of the package from the source folders (``cli/`` installs as ``mmexport.cli``)."""
    return sorted(load_layout_tool().module_files())


def _is_torch_side(module: str) -> bool:
    return module.startswith("mmexport.torchside") or module in MAY_IMPORT_TORCH_AT_TOP


TORCH_FREE = [m for m in _package_modules() if not _is_torch_side(m) and m not in NOT_IMPORTABLE_ALONE]
TORCH_SIDE = [m for m in _package_modules() if _is_torch_side(m)]


def test_the_map_follows_the_folders():
    """The lists come from the folders; this pins that the split is real (both sides non-empty, the
    runtime, run, conversion and serving packages torch-free, the CLI included)."""
    for package in ("mmexport.runtime", "mmexport.runs", "mmexport.convert", "mmexport.serving", "mmexport.cli"):
        assert package in TORCH_FREE
    assert "mmexport.torchside.train" in TORCH_SIDE and "mmexport.torchside.data.formats" in TORCH_SIDE
    assert len(TORCH_FREE) > 40 and len(TORCH_SIDE) > 15


def test_torch_free_modules_import_with_torch_blocked(tmp_path):
    result = _run_blocked(
        f"""
        import importlib, sys
        for name in {TORCH_FREE!r}:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
        assert not leaked, leaked
        print("imported", len({TORCH_FREE!r}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(TORCH_FREE)}" in result.stdout


def test_layering_has_no_circles_and_no_upward_imports():
    """tools/check_layout.py: no import circles (function-level imports included), no import from a higher layer."""
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "check_layout.py")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 circle, 0 upward, 0 unplaced" in result.stdout


def test_blocker_really_blocks_torch(tmp_path):
    result = _run_blocked("import torch\n", tmp_path)
    assert result.returncode != 0 and "blocked in this test" in result.stderr


def test_runtime_classifies_a_png_without_torch(exported_run):
    run, png = exported_run
    from mmexport import runtime

    with runtime.load(run / "model.onnx") as predictor:  # the same call with torch available: the expected answer
        expected = predictor.predict([str(png)])
    result = _run_blocked(
        f"""
        import json, sys
        from mmexport import runtime
        from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner
        from mmexport.runtime.compare import compare_outputs
        from mmexport.runtime.tolerances import FP32
        from mmexport.runtime.timing import BenchSettings, ModelUnderTest, benchmark
        with runtime.load({str(run / "model.onnx")!r}) as predictor:
            prediction = predictor.predict([{str(png)!r}])
        settings = BenchSettings(batch_sizes=(1,), warmup_s=0, duration_s=None, iterations=2, rounds=1)
        bench = benchmark([ModelUnderTest("m", lambda: OnnxRuntimeRunner({str(run / "model.onnx")!r}), image_size=64,
                                          engine="onnxruntime")], settings)
        stats = compare_outputs(prediction.logits, prediction.logits, FP32)
        print(json.dumps({{"label": prediction.labels[0], "logits": prediction.logits.tolist(),
                          "iterations": bench[0].latency.iterations, "passed": stats.passed,
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}}))
        """,
        run.parent,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["torch"] == []
    assert answer["label"] == expected.labels[0]
    np.testing.assert_array_equal(np.asarray(answer["logits"], dtype=np.float32), expected.logits)
    assert answer["iterations"] == 2 and answer["passed"]


def test_cli_help_verify_bench_inspect_without_torch(exported_run):
    run, _ = exported_run
    script = """
        import sys
        from mmexport.cli.app import main
        sys.argv = ["mmexport"] + sys.argv[1:]
        try:
            main()
        finally:
            leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
            print("TORCH-MODULES:", leaked, file=sys.stderr)
    """
    commands = [
        ["--help"],
        ["verify", str(run), "--backend", "onnx"],
        ["bench", str(run), "--engine", "onnx", "--models", "folded", "--batch-sizes", "1", "--iterations", "3",
         "--rounds", "1", "--warmup", "0"],
        ["inspect", str(run)],
    ]
    for args in commands:
        code = BLOCKER + textwrap.dedent(script)
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=run.parent,
                                env={**os.environ, "COLUMNS": "200"}, timeout=300, check=False)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
        assert "TORCH-MODULES: []" in result.stderr, (args, result.stderr[-500:])
    manifest = json.loads((run / "manifest.json").read_text())
    assert any(v["artifact"] == "model.onnx" and v["command"] == "verify" and v["passed"] for v in manifest["verification"])


# -- the install matches the map: `pip install mmexport` (the core) brings what the torch-free modules import -----

IMPORT_TO_DISTRIBUTION = {"PIL": "pillow", "onnxconverter_common": "onnxconverter-common"}
TORCH_EXTRA = {"torch", "torchvision", "onnxscript", "onnxconverter-common", "matplotlib", "scipy"}


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names a module imports when it is imported (not inside functions), stdlib excluded."""
    import ast

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # lazy: runs only when called
            if isinstance(child, ast.Import):
                found.update(alias.name.split(".")[0] for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.add(child.module.split(".")[0])
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name not in sys.stdlib_module_names and name != "mmexport"}


def test_core_dependencies_are_what_the_torch_free_modules_import():
    """Every package a torch-free module imports at module level is a core dependency (so `pip install mmexport`
    imports them all), and the core has none of the torch extra's packages (they are `mmexport[torch]`)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = _requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert not core & TORCH_EXTRA, sorted(core & TORCH_EXTRA)
    assert TORCH_EXTRA <= _requirement_names(extras["torch"]) <= TORCH_EXTRA
    assert TORCH_EXTRA <= _requirement_names(extras["test"])  # the tests train and export
    files = load_layout_tool().module_files()
    needed = {}
    for module in TORCH_FREE:
        for name in _module_level_imports(files[module]):
            needed.setdefault(IMPORT_TO_DISTRIBUTION.get(name, name).lower(), module)
    missing = {dist: module for dist, module in needed.items() if dist not in core}
    assert not missing, f"imported at module level by torch-free modules but not core dependencies: {missing}"


# imports no extra declares, each with the reason
PROVIDED_ELSEWHERE = {
    "triton_python_backend_utils": "Triton's Python backend provides it inside the server",
    "google": "protobuf, which tritonclient[grpc] brings (parse_config names tritonclient when it is missing)",
}
IMPORT_TO_DISTRIBUTION_ALL = {**IMPORT_TO_DISTRIBUTION, "sklearn": "scikit-learn"}


def _every_import(path: Path) -> set[str]:
    """Top-level third-party package names ``path`` imports anywhere, lazy imports inside functions included."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in ("mmexport", "cli")}


def test_every_import_is_declared_by_the_core_or_an_extra():
    """A lazy import (scipy inside --align weights) is still a dependency: the core or some extra must declare it,
    or the user who installed that extra meets a bare ModuleNotFoundError."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = _requirement_names(project["dependencies"])
    for requirements in project["optional-dependencies"].values():
        declared |= _requirement_names(requirements)
    undeclared = {}
    for path in sorted([*(root / "mmexport").rglob("*.py"), *(root / "cli").rglob("*.py")]):
        for name in _every_import(path) - set(PROVIDED_ELSEWHERE):
            if IMPORT_TO_DISTRIBUTION_ALL.get(name, name).lower() not in declared:
                undeclared.setdefault(name, str(path.relative_to(root)))
    assert not undeclared, f"imported but declared by no dependency list: {undeclared}"


def test_figures_without_matplotlib_name_the_plot_extra(monkeypatch):
    """matplotlib is an extra (torch, plot): drawing without it is one line, importing mmexport.plots is not an error."""
    import importlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # installed nowhere: `import matplotlib` raises ImportError
    plots = importlib.reload(importlib.import_module("mmexport.plots"))
    from mmexport.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError) as missing:
        plots.plot_latency([], "unused.png", "title")
    assert str(missing.value) == "drawing figures needs matplotlib: pip install 'mmexport[plot]'"
