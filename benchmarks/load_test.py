"""A load test of ``mmexport serve`` (the real Triton server, ``--preprocess``): valid, hostile and malformed requests.

The run's ``model.onnx`` is served with :func:`mmexport.serving.server.serve` (Python
backend, encoded-image input, 127.0.0.1). A fixed, shuffled schedule of requests goes to
it from a thread pool (one keep-alive HTTP connection per worker), mixing

* valid requests: PNG/JPEG images of assorted sizes (``image_bytes``) and normalised
  FP32 batches (``image``), whose answer is known in advance from the in-process
  :class:`mmexport.runtime.Predictor` on the same bytes: a different top label, or logits
  off by more than ``--atol``, is a wrong answer;
* hostile images: a 65000x1 PNG, a 1x1,000,000 PNG, a decompression bomb (16000x16000,
  250 kB), a truncated PNG, random bytes;
* malformed requests: wrong dtype, wrong shape, no input, both inputs, garbage JSON,
  an empty batch.

It reports the requests, the answers by kind, whether every bad request got an error
(and every valid one a right answer), whether the server is still ready afterwards, the
resident memory of ``tritonserver`` and its Python-backend stubs (``/proc``) after a
warm-up and after the run, and p50/p99 latency of the valid requests. Results go to
``benchmarks/results/load-<machine>-<N>cpu.json``.

    python benchmarks/load_test.py --run runs/ham          # a run with a verified model.onnx
    python benchmarks/load_test.py                         # trains the tests' tiny run first (needs PyTorch)

``perf_analyzer`` (Triton's load generator) is not used: the package index reachable
here offers only ``perf-analyzer`` 0.1.0, a placeholder whose package holds one
``hello()`` function and no binary; the client below is ``http.client`` with a
``ThreadPoolExecutor``, which can also send the malformed requests perf_analyzer cannot.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmexport import runtime
from mmexport.serving.server import serve

RESULTS = Path(__file__).parent / "results"
TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    kind: str  # "valid" or "hostile" / "malformed"
    case: str
    body: bytes
    header_length: int | None  # binary-data extension: the JSON header's length
    expected: np.ndarray | None = None  # logits the in-process predictor gives


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 16000) -> bytes:
    """A grey PNG of side x side pixels whose data is zlib-compressed zeros (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor, row = zlib.compressobj(9), bytes(side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = side.to_bytes(4, "big") * 2 + bytes((8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _bytes_body(items: list[bytes], shape: list[int] | None = None) -> tuple[bytes, int]:
    payload = b"".join(len(item).to_bytes(4, "little") + item for item in items)
    header = json.dumps({"inputs": [{"name": "image_bytes", "shape": shape or [len(items), 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(payload)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    return header + payload, len(header)


def _float_input(array: np.ndarray, datatype: str = "FP32", shape: list[int] | None = None) -> dict:
    return {"name": "image", "shape": shape or list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}


def build_requests(predictor: runtime.Predictor, seed: int) -> dict[str, list[Request]]:
    """The distinct requests of each kind (valid ones with their expected logits)."""
    rng = np.random.default_rng(seed)
    size = predictor.info.image_size
    valid: list[Request] = []
    for index in range(24):
        height, width = int(rng.integers(24, 200)), int(rng.integers(24, 200))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if index % 3 == 2:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            encoded, case = buffer.getvalue(), "jpeg image"
        else:
            encoded, case = _png(image), "png image"
        expected = predictor.predict([encoded]).logits[0]
        body, length = _bytes_body([encoded])
        valid.append(Request("valid", case, body, length, expected))
    for batch in (1, 4):
        array = predictor.preprocess([_png(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
                                      for _ in range(batch)])
        expected = predictor.logits(array)
        body = json.dumps({"inputs": [_float_input(array)],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
        valid.append(Request("valid", f"fp32 batch {batch}", body, None, expected))

    hostile_images = {
        "65000x1 png": _png(Image.new("RGB", (65000, 1))),
        "1x1000000 png": _png(Image.new("L", (1, 1_000_000))),
        "decompression bomb": _bomb_png(),
        "truncated png": _png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:200],
        "random bytes": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    }
    hostile = [Request("hostile", case, *_bytes_body([data])) for case, data in hostile_images.items()]

    good = np.zeros((1, 3, size, size), np.float32)
    malformed_bodies = {
        "wrong dtype": json.dumps({"inputs": [_float_input(good.astype(np.float64), "FP64")]}).encode(),
        "wrong shape": json.dumps({"inputs": [_float_input(np.zeros((1, 3, size // 2, size // 2), np.float32))]}).encode(),
        "missing input": json.dumps({"inputs": []}).encode(),
        "both inputs": json.dumps({"inputs": [_float_input(good), {"name": "image_bytes", "shape": [1, 1],
                                                                   "datatype": "BYTES", "data": ["abc"]}]}).encode(),
        "garbage json": b'{"inputs": [{"name": "image", "shape": [1, 3',
        "empty batch": json.dumps({"inputs": [_float_input(np.zeros((0, 3, size, size), np.float32))]}).encode(),
    }
    malformed = [Request("malformed", case, body, None) for case, body in malformed_bodies.items()]
    return {"valid": valid, "hostile": hostile, "malformed": malformed}


def schedule(requests: dict[str, list[Request]], total: int, seed: int) -> list[Request]:
    """``total`` requests, 60 % valid, 20 % hostile, 20 % malformed, shuffled with ``seed``."""
    picker = random.Random(seed)
    counts = {"valid": int(total * 0.6), "hostile": int(total * 0.2)}
    counts["malformed"] = total - sum(counts.values())
    plan = [requests[kind][i % len(requests[kind])] for kind, count in counts.items() for i in range(count)]
    picker.shuffle(plan)
    return plan


# --------------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------------
class Client:
    """One keep-alive HTTP connection per worker thread."""

    def __init__(self, port: int, model: str) -> None:
        self.port, self.path = port, f"/v2/models/{model}/infer"
        self.local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        return connection

    def send(self, request: Request) -> tuple[int, dict, float]:
        headers = {"Content-Type": "application/json"}
        if request.header_length is not None:
            headers = {"Content-Type": "application/octet-stream",
                       "Inference-Header-Content-Length": str(request.header_length)}
        started = time.perf_counter()
        try:
            connection = self._connection()
            connection.request("POST", self.path, body=request.body, headers=headers)
            response = connection.getresponse()
            text = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            self.local.connection = None
            return -1, {"error": f"transport: {type(exc).__name__}: {exc}"}, time.perf_counter() - started
        elapsed = time.perf_counter() - started
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {"raw": text[:200].decode("utf-8", "replace")}
        return status, answer, elapsed


def judge(request: Request, status: int, answer: dict, atol: float) -> str:
    """``ok``, or what went wrong: ``wrong answer``, ``no error for a bad request``, ``transport error`` ..."""
    if status == -1:
        return "transport error"
    if request.kind != "valid":
        return "ok" if status >= 400 and isinstance(answer.get("error"), str) and answer["error"] else \
            "no error for a bad request"
    if status != 200:
        return f"error for a valid request: {answer.get('error', answer)}"[:300]
    try:
        got = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(np.shape(request.expected))
    except (KeyError, IndexError, TypeError, ValueError):
        return "malformed answer"
    expected = np.asarray(request.expected)
    if not np.array_equal(got.argmax(-1), expected.argmax(-1)) or not np.allclose(got, expected, atol=atol, rtol=0):
        return "wrong answer"
    return "ok"


# --------------------------------------------------------------------------------------------
# the server's memory
# --------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def server_rss(pid: int) -> dict[str, int]:
    """Resident memory (bytes) of tritonserver and each of its child processes (the Python-backend stubs)."""
    rss = {}
    for member in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{member}/status").read_text()
            name = Path(f"/proc/{member}/comm").read_text().strip()
        except OSError:
            continue
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        rss[f"{name}[{member}]"] = kb * 1024
    return rss


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def tiny_run(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from triton_latency import (
        tiny_run as make,  # the tests' tiny run (resnet18, synthetic target, fp32 ONNX)
    )

    return make(root)


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q)) if samples else float("nan")


def load_test(run: Path, total: int, concurrency: int, seed: int, atol: float) -> dict:
    with runtime.load(run / "model.onnx") as predictor:
        requests = build_requests(predictor, seed)
    plan = schedule(requests, total, seed)
    warmup = [requests["valid"][i % len(requests["valid"])] for i in range(50)]
    with serve(run, name="load", preprocess=True, ready_timeout=300) as session:
        client = Client(session.server.http_port, session.model)
        pid = session.server.pid
        with ThreadPoolExecutor(concurrency) as pool:
            warm = list(pool.map(client.send, warmup))
            assert all(status == 200 for status, _, _ in warm), "the warm-up failed"
            rss_before = server_rss(pid)
            samples_rss = [(0, sum(rss_before.values()))]
            outcomes: Counter = Counter()
            by_case: dict[str, Counter] = {}
            latencies: list[float] = []
            failures: list[str] = []
            started = time.perf_counter()
            for offset in range(0, len(plan), 500):
                chunk = plan[offset : offset + 500]
                for request, (status, answer, elapsed) in zip(chunk, pool.map(client.send, chunk)):
                    verdict = judge(request, status, answer, atol)
                    outcomes[(request.kind, verdict if verdict in ("ok", "wrong answer") else "failed")] += 1
                    by_case.setdefault(f"{request.kind}: {request.case}", Counter())[
                        "ok" if verdict == "ok" else "not ok"] += 1
                    if verdict != "ok" and len(failures) < 20:
                        failures.append(f"{request.kind}/{request.case}: {verdict}")
                    if request.kind == "valid" and status == 200:
                        latencies.append(elapsed)
                samples_rss.append((offset + len(chunk), sum(server_rss(pid).values())))
            wall = time.perf_counter() - started
        rss_after = server_rss(pid)
        still_ready = session.server.is_running and session.server.model_ready(session.model)
        check = judge(requests["valid"][0], *client.send(requests["valid"][0])[:2], atol)
        example_errors = {}
        for request in requests["hostile"] + requests["malformed"]:
            status, answer, _ = client.send(request)
            example_errors[f"{request.kind}: {request.case}"] = f"{status}: {answer.get('error', answer)}"[:240]
    valid = [r for r in plan if r.kind == "valid"]
    bad = [r for r in plan if r.kind != "valid"]
    before, after = sum(rss_before.values()), sum(rss_after.values())
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU, {platform.system()}",
        "server": "tritonserver (nvidia-pytriton wheel), Python backend, mmexport serve --preprocess, 127.0.0.1",
        "client": f"http.client, ThreadPoolExecutor({concurrency}), one keep-alive connection per worker",
        "requests": len(plan), "concurrency": concurrency, "seconds": round(wall, 2),
        "requests_per_second": round(len(plan) / wall, 1),
        "valid_requests": len(valid), "bad_requests": len(bad),
        "valid_right": outcomes[("valid", "ok")], "valid_wrong_answers": outcomes[("valid", "wrong answer")],
        "valid_failed": outcomes[("valid", "failed")],
        "bad_with_error": outcomes[("hostile", "ok")] + outcomes[("malformed", "ok")],
        "bad_without_error": len(bad) - outcomes[("hostile", "ok")] - outcomes[("malformed", "ok")],
        "every_bad_request_an_error": outcomes[("hostile", "ok")] + outcomes[("malformed", "ok")] == len(bad),
        "zero_wrong_answers": outcomes[("valid", "ok")] == len(valid),
        "by_case": {case: dict(counter) for case, counter in sorted(by_case.items())},
        "error_messages": example_errors,
        "first_failures": failures,
        "still_ready_after": bool(still_ready and check == "ok"),
        "rss_bytes_before": rss_before, "rss_bytes_after": rss_after,
        "rss_total_mb_before": round(before / 2**20, 1), "rss_total_mb_after": round(after / 2**20, 1),
        "rss_growth_mb": round((after - before) / 2**20, 1),
        "rss_total_mb_every_500": [(n, round(b / 2**20, 1)) for n, b in samples_rss],
        "valid_latency_ms": {"p50": round(percentile_ms(latencies, 50), 2), "p99": round(percentile_ms(latencies, 99), 2),
                             "n": len(latencies)},
        "perf_analyzer": "not used: the reachable index has only perf-analyzer 0.1.0, a placeholder without the binary",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run directory with a verified model.onnx (default: train a tiny one)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference from the in-process answer")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/load-<machine>-<N>cpu.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmexport-load-test.") as scratch:
        run = args.run or tiny_run(Path(scratch))
        result = load_test(run, args.requests, args.concurrency, args.seed, args.atol)
    out = args.out or RESULTS / f"load-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    latency = result["valid_latency_ms"]
    print(f"{result['requests']} requests at concurrency {result['concurrency']} in {result['seconds']} s "
          f"({result['requests_per_second']}/s)")
    print(f"valid: {result['valid_requests']}, right {result['valid_right']}, wrong answers "
          f"{result['valid_wrong_answers']}, failed {result['valid_failed']}; p50 {latency['p50']} ms, p99 {latency['p99']} ms")
    print(f"bad: {result['bad_requests']}, with an error {result['bad_with_error']}, without {result['bad_without_error']}")
    for case, counts in result["by_case"].items():
        print(f"  {case}: {counts}")
    print(f"server still ready afterwards: {result['still_ready_after']}")
    print(f"server RSS (tritonserver + stubs): {result['rss_total_mb_before']} MB after warm-up -> "
          f"{result['rss_total_mb_after']} MB after the run ({result['rss_growth_mb']:+} MB)")
    print(f"written: {out}")
    if not (result["zero_wrong_answers"] and result["every_bad_request_an_error"] and result["still_ready_after"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
