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

from mmexport.config import TrainConfig
from mmexport.train import train
from mmexport.workflows import export_onnx_run

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
    run = train(TrainConfig(arch="resnet18", source_a=str(resnet18_sources[0]), source_b=str(resnet18_sources[1]),
                            data="synthetic:target?n_train=32&n_val=16&n_test=16", out=str(root / "run"),
                            merge_epochs=1, finetune_epochs=1, batch_size=16, device="cpu", verify_samples=8))
    export_onnx_run(run, "fp32")
    rng = np.random.default_rng(3)
    png = root / "lesion.png"
    Image.fromarray(rng.integers(0, 256, (80, 70, 3), dtype=np.uint8)).save(png)
    return run, png


def _run_blocked(script: str, cwd: Path) -> subprocess.CompletedProcess:
    code = BLOCKER + textwrap.dedent(script)
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


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
