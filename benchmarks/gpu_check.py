"""One prepared check for a lent GPU machine (H100/H200; CUDA torch, cuda-bindings, CuPy; no TensorRT).

    python benchmarks/gpu_check.py --out benchmarks/results

Finishes in well under 8 minutes and does three things:

1. ``pytest -m "gpu and not tensorrt"`` with MMEXPORT_REQUIRE_GPU=1: every GPU test must
   run (a skip for a missing GPU is a failure), and pass. Then ``pytest -m tensorrt``
   *without* MMEXPORT_REQUIRE_GPU: with TensorRT absent they must all skip, saying so.
2. The CUDA layer (``mmexport.runtime.cuda``) for real, with every backend that is
   available (cuda-bindings, torch, pycuda): device and page-locked allocations through
   one ``BufferPool`` (grown only for larger batches; a second pass over the same batch
   sizes must allocate nothing), async H2D/D2H copies on a non-default stream, CUDA
   events around each phase, and an engine stand-in on that stream: a torchvision
   ResNet-18 (fp32, eval) reading and writing the pool's raw device pointers, checked
   against the same network run directly in torch. cuda-bindings also captures the
   stand-in (a CuPy kernel) into a CUDA graph and replays it.
3. H2D / compute / D2H device timings for a few batch sizes (224 px), summarised the
   way trtexec does (``mmexport.runtime.trt_stats``).

Writes ``<out>/gpu-<card-name-slug>.json`` and ``.md`` and exits 1 when a check failed
(2 when there is no GPU at all).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mmexport.errors import MissingDependencyError  # noqa: E402
from mmexport.runtime import cuda as cudamod  # noqa: E402
from mmexport.runtime.trt_stats import trtexec_summary  # noqa: E402

DEADLINE_S = 6.5 * 60  # no new backend check after this; the whole run stays under 8 minutes
IMAGE = 224
CLASSES = 1000


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-gpu"


# ------------------------------------------------------------------------------------------------
# 1. the test suite's GPU tests
# ------------------------------------------------------------------------------------------------
def run_pytest(marker: str, require_gpu: bool, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("MMEXPORT_REQUIRE_GPU", None)
    if require_gpu:
        env["MMEXPORT_REQUIRE_GPU"] = "1"
    command = [sys.executable, "-m", "pytest", "-m", marker, "-q", "-rs", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else (p or "") for p in (exc.stdout, exc.stderr)]
        output, code = "".join(parts) + f"\n[gpu_check] pytest timed out after {timeout:.0f} s", -1
    counts = {key: 0 for key in ("passed", "failed", "skipped", "errors", "deselected")}
    pattern = r"(\d+) (passed|failed|skipped|errors?|deselected)"
    summary_line = next((line for line in reversed(output.splitlines()) if re.search(pattern, line) and " in " in line), "")
    for number, word in re.findall(pattern, summary_line):
        counts["errors" if word.startswith("error") else word] = int(number)
    return {
        "command": " ".join(command[1:]) + (" (MMEXPORT_REQUIRE_GPU=1)" if require_gpu else ""),
        "returncode": code,
        "seconds": round(time.perf_counter() - start, 1),
        "counts": counts,
        "skip_reasons": sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", output))),
        "tail": output.strip().splitlines()[-25:],
    }


# ------------------------------------------------------------------------------------------------
# 2./3. the CUDA layer with an engine stand-in
# ------------------------------------------------------------------------------------------------
class _Cai:
    """A raw device pointer as ``__cuda_array_interface__`` (zero-copy for torch and CuPy)."""

    def __init__(self, ptr: int, shape: tuple[int, ...]):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (ptr, False), "version": 3,
                                         "strides": None, "stream": None}


class ResNetStandIn:
    """torchvision ResNet-18 (fp32, eval, seeded) on the caller's stream, reading/writing raw pointers."""

    name = "torchvision resnet18 fp32 (torch, on the runner's stream)"

    def __init__(self) -> None:
        import torch
        import torchvision

        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.torch = torch
        self.model = torchvision.models.resnet18(num_classes=CLASSES).cuda().eval()

    def __call__(self, src_ptr: int, dst_ptr: int, batch: int, stream_handle: int) -> None:
        torch = self.torch
        with torch.no_grad(), torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
            x = torch.as_tensor(_Cai(src_ptr, (batch, 3, IMAGE, IMAGE)), device="cuda")
            y = torch.as_tensor(_Cai(dst_ptr, (batch, CLASSES)), device="cuda")
            y.copy_(self.model(x))

    def reference(self, images: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(images).cuda()).cpu().numpy()


def _elementwise(src_ptr: int, dst_ptr: int, count: int, stream_handle: int) -> None:
    import cupy

    with cupy.cuda.ExternalStream(stream_handle):
        x = cupy.asarray(_Cai(src_ptr, (count,)))
        y = cupy.asarray(_Cai(dst_ptr, (count,)))
        cupy.multiply(x, 2, out=y)
        cupy.add(y, 1, out=y)


def check_backend(name: str, standin: ResNetStandIn | None, batches: list[int], iterations: int, warmup: int,
                  checks: list[dict]) -> dict[str, Any]:
    def check(what: str, ok: bool, detail: str = "") -> bool:
        checks.append({"name": f"{name}: {what}", "ok": bool(ok), "detail": detail})
        return ok

    try:
        backend = cudamod.get_cuda(name)
    except MissingDependencyError as exc:
        return {"available": False, "reason": str(exc)}
    result: dict[str, Any] = {"available": True}
    try:
        props = backend.device_properties()
        runtime, driver = backend.versions()
        result.update(device=props.name, compute_capability=list(props.compute_capability),
                      total_memory=props.total_memory, cuda_runtime=runtime, cuda_driver=driver)
        pool = cudamod.BufferPool(backend)
        stream = backend.stream_create()
        timer = cudamod.EventTimer(backend)
        handle = backend.stream_handle(stream)
        check("stream is not the default stream", handle != 0, f"handle {handle:#x}")
        per_batch: dict[str, Any] = {}
        rng = np.random.default_rng(0)
        for batch in batches:
            in_bytes, out_bytes = batch * 3 * IMAGE * IMAGE * 4, batch * CLASSES * 4
            h_in, h_out = pool.host("image", in_bytes), pool.host("logits", out_bytes)
            d_in, d_out = pool.device("image", in_bytes), pool.device("logits", out_bytes)
            images = rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)
            h2d, compute, d2h, enqueue = [], [], [], []
            wall_start = None
            for index in range(warmup + iterations):
                if index == warmup:
                    wall_start = time.perf_counter()
                np.copyto(h_in.view(np.float32, images.shape), images)
                timer.mark(0, stream)
                backend.copy_htod(d_in, h_in, in_bytes, stream)
                timer.mark(1, stream)
                t0 = time.perf_counter()
                if standin is not None:
                    standin(d_in.ptr, d_out.ptr, batch, handle)
                else:
                    _elementwise(d_in.ptr, d_out.ptr, batch * CLASSES, handle)
                enqueued = (time.perf_counter() - t0) * 1000
                timer.mark(2, stream)
                backend.copy_dtoh(h_out, d_out, out_bytes, stream)
                timer.mark(3, stream)
                backend.stream_synchronize(stream)
                if index >= warmup:
                    t = timer.timings()
                    h2d.append(t["h2d"])
                    compute.append(t["compute"])
                    d2h.append(t["d2h"])
                    enqueue.append(enqueued)
            wall = time.perf_counter() - wall_start
            got = h_out.view(np.float32, (batch, CLASSES)).copy()
            if standin is not None:
                expected = standin.reference(images)
                error = float(np.abs(got - expected).max())
                tolerance = 1e-3 * max(1.0, float(np.abs(expected).max()))
                check(f"batch {batch}: stand-in output through pinned buffers matches torch", error <= tolerance,
                      f"max abs error {error:.2e}")
            else:
                flat = images.reshape(-1)[: batch * CLASSES]
                check(f"batch {batch}: elementwise output", bool(np.allclose(got.reshape(-1), 2 * flat + 1)))
            summary = trtexec_summary(h2d, compute, d2h, enqueue, batch_size=batch, cuda_graphs=False,
                                      data_transfers_included=True, walltime_s=wall)
            per_batch[str(batch)] = summary.as_dict()
            medians = f"{summary.h2d.median:.3f} / {summary.compute.median:.3f} / {summary.d2h.median:.3f} ms"
            check(f"batch {batch}: event timings are positive", min(compute) > 0 and min(h2d) > 0 and min(d2h) > 0,
                  f"median h2d / compute / d2h {medians}")
        allocations = pool.allocations
        for batch in sorted(batches, reverse=True):  # the same sizes again: everything is reused
            pool.device("image", batch * 3 * IMAGE * IMAGE * 4), pool.host("image", batch * 3 * IMAGE * IMAGE * 4)
            pool.device("logits", batch * CLASSES * 4), pool.host("logits", batch * CLASSES * 4)
        check("buffers are reused (no allocation on a second pass)", pool.allocations == allocations,
              f"{allocations} allocations for batches {batches}")
        result["allocations"] = allocations
        result["batches"] = per_batch
        if backend.supports_graphs:
            result["cuda_graph"] = graph_check(backend, stream, pool, check)
        timer.close()
        pool.close()
        check("all buffers freed", not pool.device_buffers and not pool.host_buffers)
        backend.stream_destroy(stream)
    except Exception as exc:  # a failed backend is a failed check, not a crashed script
        check("ran without error", False, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        backend.close()
    return result


def graph_check(backend: Any, stream: Any, pool: Any, check: Callable[..., bool]) -> dict[str, Any]:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return {"skipped": "CuPy is not installed"}
    count = 1 << 20
    d_in, d_out = pool.device("graph-in", count * 4), pool.device("graph-out", count * 4)
    h_in, h_out = pool.host("graph-in", count * 4), pool.host("graph-out", count * 4)
    handle = backend.stream_handle(stream)
    h_in.view(np.float32, (count,))[:] = 1.0
    backend.copy_htod(d_in, h_in, count * 4, stream)
    _elementwise(d_in.ptr, d_out.ptr, count, handle)  # warm-up: CuPy compiles outside the capture
    backend.stream_synchronize(stream)
    backend.graph_begin_capture(stream)
    _elementwise(d_in.ptr, d_out.ptr, count, handle)
    graph = backend.graph_end_capture(stream)
    h_in.view(np.float32, (count,))[:] = 10.0
    backend.copy_htod(d_in, h_in, count * 4, stream)
    start, end = backend.event_create(), backend.event_create()
    backend.event_record(start, stream)
    for _ in range(100):
        backend.graph_launch(graph, stream)
    backend.event_record(end, stream)
    backend.copy_dtoh(h_out, d_out, count * 4, stream)
    backend.stream_synchronize(stream)
    replay_ms = backend.elapsed_ms(start, end) / 100
    backend.event_record(start, stream)
    for _ in range(100):
        _elementwise(d_in.ptr, d_out.ptr, count, handle)
    backend.event_record(end, stream)
    backend.stream_synchronize(stream)
    direct_ms = backend.elapsed_ms(start, end) / 100
    backend.event_destroy(start), backend.event_destroy(end)
    backend.graph_destroy(graph)
    ok = bool(np.all(h_out.view(np.float32, (count,)) == 21.0))
    check("CUDA graph capture + replay gives the captured kernel's result", ok)
    return {"elements": count, "replay_ms_per_launch": replay_ms, "direct_ms_per_launch": direct_ms, "ok": ok}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for module in ("torch", "torchvision", "cupy", "onnxruntime", "tensorrt", "pycuda"):
        try:
            found[module] = getattr(__import__(module), "__version__", "?")
        except Exception:
            found[module] = None
    try:
        from importlib.metadata import version

        found["cuda-bindings"] = version("cuda-bindings")
    except Exception:
        found["cuda-bindings"] = None
    return found


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['card']}", "", f"{report['date']}; {report['elapsed_s']:.0f} s; "
             f"versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), ""]
    lines += ["## Checks", "", "| check | ok | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in report["checks"]]
    lines += ["", "## Device timings (ms; median, p99 over the timed iterations)", "",
              "| backend | batch | H2D | compute | D2H | latency | enqueue | images/s | compute CV % |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in report["backends"].items():
        for batch, s in result.get("batches", {}).items():
            lines.append(
                f"| {name} | {batch} | {s['h2d']['median']:.3f} / {s['h2d']['p99']:.3f} | "
                f"{s['compute']['median']:.3f} / {s['compute']['p99']:.3f} | {s['d2h']['median']:.3f} / {s['d2h']['p99']:.3f} | "
                f"{s['latency']['median']:.3f} / {s['latency']['p99']:.3f} | {s['enqueue']['median']:.3f} | "
                f"{s['images_per_s']:.0f} | {s['compute']['cv_percent']:.2f} |"
            )
    for name, result in report["backends"].items():
        if not result.get("available"):
            lines.append(f"\n{name}: not available ({result.get('reason')})")
        elif "cuda_graph" in result:
            g = result["cuda_graph"]
            if "skipped" in g:
                lines.append(f"\n{name}: CUDA graph check skipped ({g['skipped']})")
            else:
                lines.append(f"\n{name}: CUDA graph replay {g['replay_ms_per_launch']:.4f} ms vs direct "
                             f"{g['direct_ms_per_launch']:.4f} ms per launch ({g['elements']} elements)")
    lines += ["", f"Stand-in engine: {report['standin']}; input {IMAGE}x{IMAGE} float32, output {CLASSES} float32.",
              "Latency = H2D + compute + D2H per iteration (trtexec's definition, `mmexport.runtime.trt_stats`).",
              "", "Command: `python benchmarks/gpu_check.py --out benchmarks/results`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-pytest", action="store_true", help="only the CUDA-layer checks")
    args = parser.parse_args()
    started = time.perf_counter()
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    card = None
    for name in cudamod.BACKENDS:
        try:
            backend = cudamod.get_cuda(name)
        except MissingDependencyError:
            continue
        card = backend.device_properties().name
        backend.close()
        break
    if card is None:
        try:
            cudamod.get_cuda("auto")
        except MissingDependencyError as exc:
            print(f"gpu_check: no usable GPU: {exc}", file=sys.stderr)
        return 2

    checks: list[dict] = []
    report: dict[str, Any] = {"card": card, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(),
                              "versions": versions(), "checks": checks, "backends": {}, "pytest": {}}
    if not args.skip_pytest:
        gpu = run_pytest("gpu and not tensorrt", True, timeout=240)
        report["pytest"]["gpu"] = gpu
        c = gpu["counts"]
        checks.append({"name": "pytest -m 'gpu and not tensorrt' (MMEXPORT_REQUIRE_GPU=1) passes", "ok":
                       gpu["returncode"] == 0 and c["passed"] > 0 and c["failed"] == 0 and c["errors"] == 0,
                       "detail": ", ".join(f"{v} {k}" for k, v in c.items() if v)})
        trt = run_pytest("tensorrt", False, timeout=90)
        report["pytest"]["tensorrt"] = trt
        c = trt["counts"]
        absent = report["versions"]["tensorrt"] is None
        skipped_for_trt = c["skipped"] > 0 and c["passed"] == 0 and c["failed"] == 0 and any(
            "tensorrt" in r.lower() for r in trt["skip_reasons"])
        ok = skipped_for_trt if absent else (trt["returncode"] == 0 and c["failed"] == 0)
        detail = ", ".join(f"{v} {k}" for k, v in c.items() if v)
        if trt["skip_reasons"]:
            detail += f"; reason: {trt['skip_reasons'][0]}"
        what = "skipped because TensorRT is absent" if absent else "passes"
        checks.append({"name": f"pytest -m tensorrt: {what}", "ok": ok, "detail": detail})

    standin = None
    try:
        standin = ResNetStandIn()
        report["standin"] = ResNetStandIn.name
    except Exception as exc:
        report["standin"] = f"CuPy elementwise 2x+1 (torch stand-in unavailable: {type(exc).__name__}: {exc})"
    for name in cudamod.BACKENDS:
        if time.perf_counter() - started > DEADLINE_S:
            report["backends"][name] = {"available": None, "reason": "skipped: time budget used"}
            continue
        report["backends"][name] = check_backend(name, standin, batches, args.iterations, args.warmup, checks)
    if not any(r.get("available") for r in report["backends"].values()):
        checks.append({"name": "at least one CUDA backend works", "ok": False, "detail": ""})

    report["elapsed_s"] = time.perf_counter() - started
    report["ok"] = all(c["ok"] for c in checks)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{slug(card)}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    for c in checks:
        print(f"[{'ok' if c['ok'] else 'FAIL'}] {c['name']}" + (f" -- {c['detail']}" if c["detail"] else ""))
    print(f"wrote {args.out / stem}.json and .md in {report['elapsed_s']:.0f} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
