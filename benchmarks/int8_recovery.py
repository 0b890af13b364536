"""Accuracy-aware int8 on trained runs: what the plain int8 graph gives, which layers the search keeps in
float, what the kept layers cost in latency.

For each architecture: two sources trained from scratch on the synthetic pigment and border
tasks, a MedMerge run on the synthetic target, its fp32 ONNX export, then int8 twice --
fully quantized (``accuracy_aware=False``) and accuracy-aware (the default) -- each judged
on the run's held-out images by the int8 policy (top-1 ≥ 99 %, macro-F1 drop ≤ 1 pt).
Latency: fp32, plain int8 and accuracy-aware int8 in ONNX Runtime, batch 1, interleaved.

    python benchmarks/int8_recovery.py --archs resnet18,densenet121 --out benchmarks/results/int8
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mmexport.config import TrainConfig
from mmexport.demo import train_synthetic_sources
from mmexport.errors import VerificationError
from mmexport.convert.onnxfile import read_onnx_metadata
from mmexport.runtime.timing import BenchSettings, ModelUnderTest, benchmark
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner
from mmexport.torchside.train import train
from mmexport.torchside.operations import export_onnx_run


def _stats(report) -> dict:
    stats = next(iter(report.stats().values()))
    return {"passed": report.passed, "top1_agreement": stats.top1_agreement, "macro_f1_drop": stats.macro_f1_drop,
            "reference_macro_f1": stats.reference_macro_f1, "n": stats.n_samples, "top1_agreed": stats.top1_agreed,
            "top1_lower_bound": stats.top1_lower_bound}


def run_arch(arch: str, root: Path, args) -> dict:
    torch.manual_seed(0)
    sources, _ = train_synthetic_sources(root / "sources", arch=arch, epochs=args.source_epochs,
                                         data_options=f"?n_train={args.source_images}&n_val=200",
                                         image_size=args.image_size,
                                         device=torch.device("cpu"))
    run = train(TrainConfig(arch=arch, source_a=str(sources["A"]), source_b=str(sources["B"]),
                            data=args.data, out=str(root / "run"), image_size=args.image_size,
                            merge_epochs=args.merge_epochs, finetune_epochs=args.finetune_epochs, device="cpu"))
    export_onnx_run(run, "fp32")
    result = {"arch": arch, "final": json.loads((run / "manifest.json").read_text())["training"]["final"]}
    plain = root / "plain"
    shutil.copytree(run, plain)
    start = time.perf_counter()
    try:
        out = export_onnx_run(plain, "int8", accuracy_aware=False)["int8"]
        result["plain"] = {**_stats(out.report), "seconds": time.perf_counter() - start}
    except VerificationError as exc:
        result["plain"] = {**_stats(exc.report), "seconds": time.perf_counter() - start}
    plain_file = root / "plain.int8.onnx"
    # the plain graph, published or not, for the latency table
    from mmexport.convert.precision import quantize_int8
    from mmexport.runs.manifest import RunDir

    run_dir = RunDir.open(run)
    calibration = __import__("mmexport.torchside.data", fromlist=["load_task"]).load_task(
        run_dir.manifest["config"]["data"], image_size=int(run_dir.manifest["model"]["image_size"])).arrays(
        "train", limit=256, spread=True)[0]
    quantize_int8(run / "model.onnx", plain_file, calibration)
    start = time.perf_counter()
    try:
        out = export_onnx_run(run, "int8", int8_max_float=args.max_float)["int8"]
        search = out.facts.int8_search
        aware = {**_stats(out.report), "float_nodes": out.facts.float_nodes, "float_modules": out.facts.float_modules,
                 "attempts": search.attempts if search is not None else []}
    except VerificationError as exc:
        aware = {**_stats(exc.report), "float_nodes": None}
    aware["seconds"] = time.perf_counter() - start
    result["accuracy_aware"] = aware
    size = int(run_dir.manifest["model"]["image_size"])
    files = {"fp32": run / "model.onnx", "int8 (all layers)": plain_file}
    if (run / "model.int8.onnx").exists():
        files["int8 (accuracy-aware)"] = run / "model.int8.onnx"
    models = [ModelUnderTest(name, (lambda p=path: OnnxRuntimeRunner(p, threads=args.threads)), path.stat().st_size,
                             size, "onnxruntime") for name, path in files.items()]
    settings = BenchSettings(batch_sizes=(1,), warmup_s=0.5, duration_s=args.duration, rounds=4)
    result["latency_ms"] = {r.model: r.latency.median_ms for r in benchmark(models, settings)}
    recipe = read_onnx_metadata(run / "model.int8.onnx").get("int8_recipe") if (run / "model.int8.onnx").exists() else None
    result["recipe"] = json.loads(recipe) if recipe else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,densenet121")
    parser.add_argument("--data", default="synthetic:target?n_train=300&n_val=300&n_test=300")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--name", default="int8_recovery", help="results file stem")
    parser.add_argument("--max-float", type=float, default=0.5, help="int8 search budget (fraction of layers in float)")
    parser.add_argument("--out", default="benchmarks/results/int8")
    parser.add_argument("--source-epochs", type=int, default=2)
    parser.add_argument("--source-images", type=int, default=1200)
    parser.add_argument("--merge-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for arch in args.archs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"int8-{arch}-") as tmp:
            results.append(run_arch(arch, Path(tmp), args))
        (out / f"{args.name}.json").write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                            "args": vars(args), "results": results}, indent=2))
    lines = ["| arch | int8, all layers: top-1 / macro-F1 drop | accuracy-aware: layers kept in float | top-1 / macro-F1 drop | "
             "latency ms fp32 / int8 all / int8 aware (batch 1) |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        p, a, lat = r["plain"], r["accuracy_aware"], r["latency_ms"]
        kept = "n/a (failed)" if a["float_nodes"] is None else (", ".join(a["float_nodes"]) or "none")
        lines.append(
            f"| {r['arch']} | {p['top1_agreement']:.2%} / {100 * (p['macro_f1_drop'] or 0):.2f} pt "
            f"({'pass' if p['passed'] else 'FAIL'}) | {kept} | {a['top1_agreement']:.2%} / "
            f"{100 * (a['macro_f1_drop'] or 0):.2f} pt ({'pass' if a['passed'] else 'FAIL'}) | "
            f"{lat.get('fp32', float('nan')):.2f} / {lat.get('int8 (all layers)', float('nan')):.2f} / "
            f"{lat.get('int8 (accuracy-aware)', float('nan')):.2f} |")
    text = "\n".join(lines)
    command = "python benchmarks/int8_recovery.py " + " ".join(
        f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items() if v is not None)
    (out / f"{args.name}.md").write_text(f"Command: `{command}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
