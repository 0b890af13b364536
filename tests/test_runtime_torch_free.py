"""The deployment side works where PyTorch is not installed.

A subprocess blocks ``torch`` and ``torchvision`` with a meta-path finder (any attempt
to import them raises ImportError) and then does what an inference server and an
auditor on a torch-free host do: imports ``mmexport.runtime``, classifies a PNG file
with an exported ONNX model, imports the ONNX Runtime runner, the comparison policy
and the bench harness, and runs ``mmexport --help``, ``verify --backend onnx``,
``bench --engine onnx`` and ``inspect`` on a run.
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

from tests.conftest import train_exported_run

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
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


# The module map: what may import torch. Every module of the package is in exactly one list.
TORCH_FREE = [
    "mmexport", "mmexport.__main__", "mmexport.errors", "mmexport.fileio", "mmexport.artifacts", "mmexport.config",
    "mmexport.progress", "mmexport.manifest", "mmexport.runlock", "mmexport.checks", "mmexport.engines",
    "mmexport.benchrun", "mmexport.synthetic", "mmexport.plots", "mmexport.triton", "mmexport.serve",
    "mmexport.runtime", "mmexport.runtime.modelinfo", "mmexport.runtime.preprocess", "mmexport.runtime.predictor",
    "mmexport.runtime.compare", "mmexport.runtime.tolerances", "mmexport.runtime.check", "mmexport.runtime.reference",
    "mmexport.runtime.bench", "mmexport.runtime.metrics", "mmexport.runtime.cuda", "mmexport.runtime.engine",
    "mmexport.runtime.trt_stats", "mmexport.runtime.runners", "mmexport.runtime.runners.base",
    "mmexport.runtime.runners.onnxruntime", "mmexport.runtime.runners.tensorrt", "mmexport.export",
    "mmexport.export.onnxfile", "mmexport.export.precision", "mmexport.export.fp16_recipe", "mmexport.export.tensorrt", "mmexport.cli",
    "mmexport.cli.app", "mmexport.cli.console",
]
TORCH_SIDE = [
    "mmexport.backbones", "mmexport.checkpoints", "mmexport.merge", "mmexport.fold", "mmexport.data", "mmexport.formats",
    "mmexport.train", "mmexport.distributed", "mmexport.modelfile", "mmexport.torch_runner", "mmexport.verification",
    "mmexport.workflows", "mmexport.coefficients", "mmexport.demo", "mmexport.comparison", "mmexport.export.onnx",
]
NOT_IMPORTABLE_ALONE = ["mmexport.triton_python_model"]  # runs inside Triton's Python backend (triton_python_backend_utils)


def test_every_module_is_on_the_map():
    import pkgutil

    import mmexport

    found = {"mmexport"} | {m.name for m in pkgutil.walk_packages(mmexport.__path__, "mmexport.")}
    mapped = set(TORCH_FREE) | set(TORCH_SIDE) | set(NOT_IMPORTABLE_ALONE)
    assert found - mapped == set(), "new modules must be put on the map (torch-free or torch side)"


def test_torch_free_modules_import_with_torch_blocked(tmp_path):
    present = [m for m in TORCH_FREE if m not in ("mmexport.triton", "mmexport.serve") or
               (Path(__file__).parents[1] / "mmexport" / f"{m.split('.')[-1]}.py").exists()]
    result = _run_blocked(
        f"""
        import importlib, sys
        for name in {present!r}:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
        assert not leaked, leaked
        print("imported", len({present!r}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(present)}" in result.stdout


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
        from mmexport.runtime.bench import BenchSettings, ModelUnderTest, benchmark
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
                                env={**os.environ, "COLUMNS": "200"}, timeout=300)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
        assert "TORCH-MODULES: []" in result.stderr, (args, result.stderr[-500:])
    manifest = json.loads((run / "manifest.json").read_text())
    assert any(v["artifact"] == "model.onnx" and v["command"] == "verify" and v["passed"] for v in manifest["verification"])
