"""Request latency through Triton (Python backend, HTTP and gRPC) vs in-process ``mmexport.runtime``.

The same run's ``model.onnx`` is served by ``tritonserver`` (the nvidia-pytriton wheel,
127.0.0.1, the Python-backend repository of ``mmexport.serving.triton``) and loaded in this
process with ``mmexport.runtime.load``. Requests of the stored reference inputs are sent
one at a time, the three paths interleaved round by round (so load from other processes
hits them alike), and p50/p99 wall-clock latency is reported per path and batch size.
Every Triton answer is also judged against the stored reference under the fp32 row.
Figures, not assertions.

    python benchmarks/triton_latency.py --run runs/ham            # a run with model.onnx
    python benchmarks/triton_latency.py                           # trains a tiny synthetic run first (needs PyTorch)

Results go to ``benchmarks/results/triton/latency-<machine>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmexport import runtime
from mmexport.runs.manifest import RunDir
from mmexport.runtime.compare import compare_outputs
from mmexport.runtime.tolerances import FP32
from mmexport.serving.server import TritonServer, find_tritonserver
from mmexport.serving.triton import export_repository

RESULTS = Path(__file__).parent / "results" / "triton"


def tiny_run(root: Path) -> Path:
    """The tests' tiny run: resnet18 sources with random weights, the synthetic target, fp32 ONNX."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from conftest import backbone_state  # noqa: E402

    from mmexport.torchside.checkpoints import save_state_dict
    from mmexport.config import TrainConfig
    from mmexport.torchside.train import train
    from mmexport.torchside.operations import export_onnx_run

    sources = []
    for name, seed in (("a", 1), ("b", 2)):
        path = root / f"{name}.safetensors"
        save_state_dict(path, backbone_state("resnet18", seed))
        sources.append(path)
    run = train(TrainConfig(arch="resnet18", source_a=str(sources[0]), source_b=str(sources[1]),
                            data="synthetic:target?n_train=32&n_val=16&n_test=16", out=str(root / "run"),
                            merge_epochs=1, finetune_epochs=1, batch_size=16, device="cpu", verify_samples=8))
    export_onnx_run(run, "fp32")
    return Path(run)


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1e3
    return {"n": len(values), "p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(values.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="run directory with a verified model.onnx (default: train a tiny one)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per path and batch size")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    with tempfile.TemporaryDirectory(prefix="triton-latency-") as scratch:
        run_dir = args.run or tiny_run(Path(scratch))
        reference = RunDir.open(run_dir).reference()
        inputs = reference.inputs("random")
        stored = reference.sets["random"].outputs["logits"]
        repo = Path(scratch) / "repository"
        export_repository(run_dir, repo, backend="python", name="model")
        installation = find_tritonserver()
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        results: dict[str, dict] = {}
        worst = 0.0
        with TritonServer(repo, installation=installation, prepare_python=True) as server, \
                runtime.load(run_dir / "model.onnx") as predictor:
            http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=30)
            grpc = grpcclient.InferenceServerClient(server.grpc_url)

            def via(module, client, batch):
                tensor = module.InferInput("image", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                extra = {"client_timeout": 30} if module is grpcclient else {}
                return client.infer("model", [tensor], **extra).as_numpy("logits")

            paths = {
                "in-process mmexport.runtime": lambda b: predictor.logits(b),
                "Triton HTTP": lambda b: via(httpclient, http, b),
                "Triton gRPC": lambda b: via(grpcclient, grpc, b),
            }
            for size in sizes:
                samples = {name: [] for name in paths}
                for index in range(args.warmup + args.requests):
                    start_row = (index * size) % max(1, len(inputs) - size + 1)
                    batch = np.ascontiguousarray(inputs[start_row : start_row + size])
                    for name, call in paths.items():
                        began = time.perf_counter()
                        logits = call(batch)
                        elapsed = time.perf_counter() - began
                        if index >= args.warmup:
                            samples[name].append(elapsed)
                        if index < 3:
                            stats = compare_outputs(stored[start_row : start_row + size], logits, FP32)
                            assert stats.passed, (name, stats.failures)
                            worst = max(worst, stats.max_abs_error)
                results[f"batch {size}"] = {name: percentiles(values) for name, values in samples.items()}
            http.close()
            grpc.close()
            startup = server.start_seconds
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "triton": installation.source, "load_average": os.getloadavg()}
    report = {"machine": machine, "server_start_s": startup, "max_abs_error_vs_reference": worst,
              "requests_per_path": args.requests, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"latency-{platform.machine()}-{os.cpu_count()}cpu"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Triton vs in-process latency ({machine['machine']}, {machine['cpus']} CPUs, {installation.source})", "",
             f"{args.requests} timed requests per path and batch size, interleaved; server ready after {startup:.1f} s; "
             f"max abs error vs the stored reference {worst:.3g} (fp32 row).", "",
             "| batch | path | p50 ms | p90 ms | p99 ms |", "| ---: | --- | ---: | ---: | ---: |"]
    for batch, rows in results.items():
        for name, row in rows.items():
            lines.append(f"| {batch.split()[1]} | {name} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
