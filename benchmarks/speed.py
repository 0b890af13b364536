"""The published speed table, the export targets, and the harness-overhead check.

For each architecture, the stock torchvision network (a folded network has exactly
its graph) is measured at batch 1/8/32 in PyTorch eager (fp32), ONNX Runtime fp32 and
ONNX Runtime int8 (static QDQ), all interleaved in one process (``mmexport.bench``), so
the ratios are side by side. Then:

* ONNX Runtime fp32 ÷ torch eager at batch 1 (target: ORT ≥ 1.4× faster),
* int8 ÷ fp32 on ONNX Runtime at batch 1 (target: int8 ≥ 2.5× faster),
* the harness's measured latency vs a bare ``session.run`` loop on the same inputs
  (target: within 3 %).

Results go to ``benchmarks/results/speed-<machine>-<versions>.{json,md}``; the performance
section of docs/measured.md is generated from the markdown (benchmarks/update_readme.py).

    python benchmarks/speed.py                         # resnet18, resnet50, densenet121
    python benchmarks/speed.py --archs resnet18 --batch-sizes 1 --duration 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmexport.torchside.backbones import get_backbone
from mmexport.runtime.timing import BenchSettings, ModelUnderTest, benchmark, machine_info
from mmexport.convert.precision import quantize_int8
from mmexport.torchside.onnx_export import export_onnx
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner
from mmexport.torchside.torch_runner import TorchRunner
from mmexport.runtime.compare import random_inputs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build(arch: str, size: int, workdir: Path, threads: int) -> list[ModelUnderTest]:
    torch.manual_seed(0)
    model = get_backbone(arch).build(5).eval()
    info = ModelInfo(arch, tuple(f"c{i}" for i in range(5)), size, MEAN, STD)
    fp32 = workdir / f"{arch}.onnx"
    int8 = workdir / f"{arch}.int8.onnx"
    export_onnx(model, info, fp32, weights_sha256="0" * 64)
    quantize_int8(fp32, int8, random_inputs(32, size, MEAN, STD, seed=1), max_images=32)
    return [
        ModelUnderTest(f"{arch} torch", lambda: TorchRunner(model, "torch"), image_size=size, engine="torch"),
        ModelUnderTest(f"{arch} ort-fp32", lambda: OnnxRuntimeRunner(fp32, threads=threads), fp32.stat().st_size,
                       size, "onnxruntime", "fp32"),
        ModelUnderTest(f"{arch} ort-int8", lambda: OnnxRuntimeRunner(int8, threads=threads), int8.stat().st_size,
                       size, "onnxruntime", "int8"),
    ]


def harness_overhead(path: Path, size: int, threads: int, seconds: float, rounds: int = 6) -> dict:
    """Median latency through the harness vs a bare ``session.run`` loop, interleaved."""
    runner = OnnxRuntimeRunner(path, threads=threads)
    batches = [np.random.default_rng(i).standard_normal((1, 3, size, size), dtype=np.float32) for i in range(4)]
    harness, bare = [], []
    with runner:
        session, name = runner.session, runner.input_name
        for _ in range(5):
            runner.infer(batches[0])
        settings = BenchSettings(batch_sizes=(1,), warmup_s=0.0, duration_s=seconds / rounds, rounds=1)
        for _ in range(rounds):
            model = ModelUnderTest("h", lambda: _Borrowed(runner), image_size=size)
            harness.extend([benchmark([model], settings)[0].latency.median_ms])
            samples = []
            deadline = time.perf_counter() + seconds / rounds
            index = 0
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                session.run(None, {name: batches[index % 4]})
                samples.append(time.perf_counter() - start)
                index += 1
            bare.append(statistics.median(samples) * 1e3)
    h, b = statistics.median(harness), statistics.median(bare)
    return {"harness_median_ms": h, "bare_median_ms": b, "overhead": h / b - 1}


class _Borrowed:
    """An already-open runner lent to the harness (its session must not be re-created)."""

    def __init__(self, runner):
        self.runner, self.name = runner, runner.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def infer(self, batch):
        return self.runner.infer(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "densenet121"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--duration", type=float, default=4.0, help="timed seconds per model and batch size")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = BenchSettings(batch_sizes=tuple(args.batch_sizes), warmup_s=1.0, duration_s=args.duration,
                             rounds=args.rounds)
    rows, extra = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            print(f"{arch}: exporting and quantizing", flush=True)
            models = build(arch, args.size, Path(tmp), args.threads)
            results = benchmark(models, settings, on_progress=lambda m: print(f"  {m}", flush=True))
            rows.extend(results)
            if arch == args.archs[0]:
                extra["harness_overhead"] = harness_overhead(Path(tmp) / f"{arch}.onnx", args.size, args.threads,
                                                             seconds=max(6.0, args.duration * 2))
    machine = machine_info()
    tag = f"{platform.machine()}-{args.threads}t-torch{torch.__version__.split('+')[0]}-ort{machine['packages']['onnxruntime']}"
    by = {(r.model, r.batch_size): r.latency for r in rows}
    targets = []
    for arch in args.archs:
        if (f"{arch} torch", 1) in by:
            eager, fp32, int8 = (by[(f"{arch} {k}", 1)].median_ms for k in ("torch", "ort-fp32", "ort-int8"))
            targets.append({"arch": arch, "ort_fp32_speedup_vs_eager": eager / fp32, "int8_speedup_vs_fp32": fp32 / int8})
    payload = {"machine": machine, "settings": settings.__dict__, "results": [r.as_dict() for r in rows],
               "targets": targets, **extra}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"speed-{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Speed: stock torchvision networks, {args.size} px, {args.threads} threads",
        "",
        f"Machine: {machine.get('cpu_model', platform.processor())}, {machine['cpu_count']} cores; torch "
        f"{machine.get('torch_build', machine['packages']['torch'])}, onnxruntime {machine['packages']['onnxruntime']}. "
        f"Median latency per batch (ms) and throughput (images/s); models interleaved in {args.rounds} rounds, "
        f"{args.duration:g} s each. A folded MedMerge network has exactly the stock graph.",
        "",
        "| arch | batch | torch eager ms | ORT fp32 ms | ORT int8 ms | torch img/s | ORT fp32 img/s | ORT int8 img/s | max CV |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arch in args.archs:
        for batch in args.batch_sizes:
            cells = [by[(f"{arch} {k}", batch)] for k in ("torch", "ort-fp32", "ort-int8")]
            lines.append(f"| {arch} | {batch} | " + " | ".join(f"{c.median_ms:.1f}" for c in cells) + " | "
                         + " | ".join(f"{c.throughput_ips:.0f}" for c in cells) + f" | {max(c.cv for c in cells):.0%} |")
    lines += ["", "| arch | ORT fp32 speed-up vs eager, batch 1 (target ≥ 1.4) | int8 speed-up vs fp32, batch 1 (target ≥ 2.5) |",
              "| --- | ---: | ---: |"]
    lines += [f"| {t['arch']} | {t['ort_fp32_speedup_vs_eager']:.2f} | {t['int8_speedup_vs_fp32']:.2f} |" for t in targets]
    if "harness_overhead" in extra:
        o = extra["harness_overhead"]
        lines += ["", f"Harness overhead ({args.archs[0]}, ORT fp32, batch 1): harness median {o['harness_median_ms']:.3f} ms vs "
                  f"bare `session.run` loop {o['bare_median_ms']:.3f} ms: {100 * o['overhead']:+.2f} % (target within ±3 %)."]
    lines += ["", f"Command: `python benchmarks/speed.py` (file `speed-{tag}.md`)."]
    (args.out / f"speed-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
