"""Hostile cases of ``mmexport serve`` and the Triton Python model (issue 18).

* the Python model hashes every file its ``mmexport.json`` records before it loads: an
  altered artifact, a record without the served artifact's hash, a record naming a file
  outside the version each leave the model not ready with one line in the server's log;
* every bad request (malformed body, wrong dtype/shape, no or both inputs, an empty batch,
  bytes that are no image, hostile images) gets an error response and the server keeps
  answering valid requests correctly;
* a port another process holds is refused in one line before anything is written, and
  readiness counts only from the server this call started (its ``--id``), never from a
  server that answers on the same port;
* ``ready_timeout`` inf/nan/<=0/huge is refused in one line;
* SIGTERM during start-up and SIGKILL after it leave no folder, process or shared-memory
  region behind, and the ports are free at once;
* the next start removes a dead owner's leftovers and keeps a live owner's folder and a
  user's look-alike folders byte-identical.

Few server launches (each costs seconds): one for the model checks and requests, one that
fails fast on a borrowed port, two serving children for the signals. Loopback only.
"""

from __future__ import annotations

import http.client
import http.server
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmexport import runtime
from mmexport.errors import MMExportError
from mmexport.serving import server as server_module
from mmexport.serving.server import (
    MAX_READY_TIMEOUT,
    OWNER_RECORD,
    TritonServer,
    remove_dead_owners_leftovers,
    serve,
)
from mmexport.serving.triton import export_repository
from tests.conftest import one_line, tree_hashes
from tests.serving.test_triton import _group_members, run_dir, triton  # noqa: F401  (module fixtures)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0  # seconds: every request, every wait on a child


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _mine(pid: int | None = None) -> list[str]:
    """Temporary folders (and shared-memory regions) named after process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    found = [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(("mmexport-repo-", "mmexport-triton-"))
             and name.split("-")[2] == str(pid)]
    if os.path.isdir("/dev/shm"):
        found += [name for name in os.listdir("/dev/shm") if name.startswith(f"mmexport{pid}x")]
    return sorted(found)


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 16000) -> bytes:
    """A grey PNG of side x side pixels (256 M: over every budget) whose data is zlib-compressed zeros (~250 kB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor, row, parts = zlib.compressobj(9), bytes(side + 1), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = side.to_bytes(4, "big") * 2 + bytes((8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _infer(port: int, model: str, body: bytes, header_length: int | None = None) -> tuple[int, dict]:
    """POST one KServe v2 request (JSON, or a JSON header + binary data); returns (status, JSON answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    headers = {"Content-Type": "application/octet-stream" if header_length is not None else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        response = connection.getresponse()
        text = response.read()
    finally:
        connection.close()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"raw": text[:200].decode("utf-8", "replace")}
    return response.status, answer


def _bytes_request(items: list[bytes], shape: list[int] | None = None) -> tuple[bytes, int]:
    """A request with the encoded images as one BYTES tensor (Triton's binary-data extension)."""
    payload = b"".join(len(item).to_bytes(4, "little") + item for item in items)
    header = json.dumps({"inputs": [{"name": "image_bytes", "shape": shape or [len(items), 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(payload)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    return header + payload, len(header)


def _json_request(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def _load(server: TritonServer, name: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=TIMEOUT)
    try:
        connection.request("POST", f"/v2/repository/models/{name}/load", body=b"")
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def _dead_pid() -> tuple[int, int]:
    """The pid and start time of a process that has exited (an owner that died)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = server_module._process_start_time(child.pid)
    child.kill()
    child.wait(timeout=TIMEOUT)
    assert start is not None
    return child.pid, start


def _owned_folder(root: Path, kind: str, pid: int, start: int, *, record: dict | None = None) -> Path:
    folder = root / f"mmexport-{kind}-{pid}-{start}-{os.urandom(4).hex()}"
    (folder / "m" / "1").mkdir(parents=True)
    (folder / "m" / "1" / "model.onnx").write_bytes(b"a model copy")
    owner = {"pid": pid, "start_time": start, "boot_id": server_module._boot_id(), "shm_tags": []}
    (folder / OWNER_RECORD).write_text(json.dumps(record if record is not None else owner))
    return folder


# --------------------------------------------------------------------------------------------
# no server needed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf, 0, -1.0, MAX_READY_TIMEOUT * 2, True, "10"])
def test_ready_timeout_must_be_finite_positive_and_bounded(bad, tmp_path):
    before = _mine()
    with pytest.raises(MMExportError) as excinfo, serve(tmp_path / "no-run", ready_timeout=bad):
        pass
    message = one_line(excinfo)
    assert "ready timeout" in message and "seconds" in message
    with pytest.raises(MMExportError) as excinfo:
        TritonServer(tmp_path, ready_timeout=bad)
    assert "ready timeout" in one_line(excinfo)
    assert _mine() == before  # refused before anything was created


def test_a_port_in_use_is_refused_in_one_line_before_anything_is_written(run_dir, tmp_path):  # noqa: F811
    before, run_before = _mine(), tree_hashes(run_dir)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for option in ("http_port", "grpc_port", "metrics_port"):
            with pytest.raises(MMExportError) as excinfo, serve(run_dir, **{option: port}, ready_timeout=30):
                pass
            message = one_line(excinfo)
            assert f"port {port}" in message and "in use" in message, message
        with pytest.raises(MMExportError) as excinfo:
            TritonServer(tmp_path, http_port=port).start()
        assert f"HTTP port {port}" in one_line(excinfo)
        # The command: one line on stderr, exit 1, no traceback (the CLI loaded from the source tree).
        shim = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('mmexport.cli', "
                f"{str(ROOT / 'cli' / '__init__.py')!r}, submodule_search_locations=[{str(ROOT / 'cli')!r}]); "
                "module = importlib.util.module_from_spec(spec); sys.modules['mmexport.cli'] = module; "
                "spec.loader.exec_module(module); sys.argv[0] = 'mmexport'; from mmexport.cli.app import main; main()")
        env = {k: v for k, v in os.environ.items() if k != "MMEXPORT_DEBUG"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        done = subprocess.run([sys.executable, "-c", shim, "serve", str(run_dir), "--grpc-port", str(port)],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert _mine() == before and tree_hashes(run_dir) == run_before
    assert not list(tmp_path.iterdir())  # the command wrote nothing where it ran


def test_dead_owners_leftovers_are_removed_and_nothing_else(tmp_path):
    dead_pid, dead_start = _dead_pid()
    root = tmp_path / "tmp"
    root.mkdir()
    dead_repo = _owned_folder(root, "repo", dead_pid, dead_start)
    dead_work = _owned_folder(root, "triton", dead_pid, dead_start)
    tag = f"mmexport{dead_pid}x{os.urandom(4).hex()}_"
    record = json.loads((dead_work / OWNER_RECORD).read_text())
    (dead_work / OWNER_RECORD).write_text(json.dumps({**record, "shm_tags": [tag]}))
    region = Path("/dev/shm") / f"{tag}region"
    other_region = Path("/dev/shm") / f"mmexport{dead_pid}x00000000_not-listed"
    if Path("/dev/shm").is_dir():
        region.write_bytes(b"x")
        other_region.write_bytes(b"x")
    # The pid now belongs to a live process that started later (this one): the recorded owner is dead.
    reused = _owned_folder(root, "repo", os.getpid(), dead_start)
    # A server that outlived its killed owner: its working directory is the dead owner's folder.
    orphan = subprocess.Popen(["bash", "-c", "exec -a tritonserver sleep 60"], cwd=dead_work)
    shell = subprocess.Popen(["bash", "-c", "exec -a bash sleep 60"], cwd=dead_work)  # a user's shell in there: kept
    kept = {
        "live owner": _owned_folder(root, "repo", os.getpid(), server_module._process_start_time(os.getpid())),
        "no owner record": root / f"mmexport-repo-{dead_pid}-{dead_start}-abcdefgh",
        "record of another owner": _owned_folder(root, "triton", dead_pid, dead_start,
                                                 record={"pid": dead_pid + 1, "start_time": dead_start}),
        "record not JSON": root / f"mmexport-triton-{dead_pid}-{dead_start}-zzzzzzzz",
        "old-style name": root / "mmexport-repo-k2j4h5g6",
        "user's folder": root / "mmexport-repo-notes",
    }
    for name in ("no owner record", "record not JSON", "old-style name", "user's folder"):
        kept[name].mkdir()
        (kept[name] / "notes.txt").write_text("mine\n")
    (kept["record not JSON"] / OWNER_RECORD).write_text("{not json")
    (kept["old-style name"] / OWNER_RECORD).write_text(json.dumps({"pid": dead_pid, "start_time": dead_start}))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("keep\n")
    link = root / f"mmexport-repo-{dead_pid}-{dead_start}-symlink1"
    link.symlink_to(outside, target_is_directory=True)
    snapshot = {name: tree_hashes(path) for name, path in kept.items()}
    outside_before = tree_hashes(outside)
    try:
        removed = remove_dead_owners_leftovers(root)
        assert sorted(removed) == sorted([dead_repo, dead_work, reused])
        assert not dead_repo.exists() and not dead_work.exists() and not reused.exists()
        assert orphan.wait(timeout=TIMEOUT) == -signal.SIGKILL  # the dead owner's server went with its folder
        assert shell.poll() is None
        for name, path in kept.items():
            assert path.is_dir() and tree_hashes(path) == snapshot[name], name
        assert link.is_symlink() and tree_hashes(outside) == outside_before
        if Path("/dev/shm").is_dir():
            assert not region.exists() and other_region.exists()  # only the regions its record lists
    finally:
        for process in (orphan, shell):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=TIMEOUT)
        for path in (region, other_region):
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# one server: the model's file checks, then bad requests against the good model
# --------------------------------------------------------------------------------------------
def _tamper(repo: Path, run: Path) -> dict[str, str]:
    """Models whose version folder disagrees with its record; returns name -> what the log line must say."""
    altered = export_repository(run, repo, backend="python", name="altered", preprocess=True)
    data = bytearray((altered.version_dir / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x55  # one weight changed: still a loadable ONNX model
    (altered.version_dir / "model.onnx").write_bytes(bytes(data))

    unhashed = export_repository(run, repo, backend="python", name="unhashed", preprocess=True)
    record = json.loads((unhashed.version_dir / "mmexport.json").read_text())
    del record["files"]["model.onnx"]
    (unhashed.version_dir / "mmexport.json").write_text(json.dumps(record))

    escaping = export_repository(run, repo, backend="python", name="escaping", preprocess=True)
    record = json.loads((escaping.version_dir / "mmexport.json").read_text())
    record["served_artifact"] = "../../altered/1/model.onnx"
    (escaping.version_dir / "mmexport.json").write_text(json.dumps(record))

    nan = export_repository(run, repo, backend="python", name="nan_record", preprocess=True)
    text = (nan.version_dir / "mmexport.json").read_text()
    (nan.version_dir / "mmexport.json").write_text(text.replace('"max_batch_size": 32', '"max_batch_size": NaN'))
    return {"altered": "differs from the sha256 recorded", "unhashed": "whose sha256 the record does not hold",
            "escaping": "served_artifact", "nan_record": "malformed JSON"}


def test_the_model_checks_its_files_and_every_bad_request_gets_an_error(triton, run_dir, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    export_repository(run_dir, repo, backend="python", name="good", preprocess=True)
    expected_lines = _tamper(repo, run_dir)
    dead_pid, dead_start = _dead_pid()  # a dead owner's leftover in the real temporary directory
    leftover = _owned_folder(Path(tempfile.gettempdir()), "repo", dead_pid, dead_start)
    log = tmp_path / "server.log"
    with TritonServer(repo, model_control_mode="explicit", load_models=["good"], ready_timeout=120,
                      installation=triton, log_file=log) as server:
        assert not leftover.exists()  # removed by the start
        for name, expected in expected_lines.items():
            status, text = _load(server, name)
            assert status == 400 and expected in text, (name, text)
            assert not server.model_ready(name)
            ours = [line for line in log.read_text().splitlines() if "mmexport: " in line and f"/{name}/1/" in line]
            assert len(ours) == 1 and ours[0].startswith("E") and expected in ours[0], (name, ours)
        assert server.model_ready("good")

        port = server.http_port
        image = np.zeros((1, 3, 64, 64), np.float32).tolist()
        float_input = {"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": image}
        truncated = _png(64, 64)[:40]
        bad_bodies = {
            "garbage JSON": (b'{"inputs": [', None),
            "not JSON at all": (b"\xff\xfe\x00garbage", None),
            "missing input": (_json_request([]), None),
            "both inputs": (_json_request([float_input, {"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                                                         "data": ["abc"]}]), None),
            "wrong dtype": (_json_request([{**float_input, "datatype": "FP64"}]), None),
            "wrong shape": (_json_request([{**float_input, "shape": [1, 3, 32, 32],
                                            "data": np.zeros((1, 3, 32, 32)).tolist()}]), None),
            "empty float batch": (_json_request([{**float_input, "shape": [0, 3, 64, 64], "data": []}]), None),
            "empty bytes batch": _bytes_request([], shape=[0, 1]),
            "not an image": _bytes_request([b"not an image at all"]),
            "random bytes": _bytes_request([os.urandom(4096)]),
            "truncated PNG": _bytes_request([truncated]),
            "65000 x 1 PNG": _bytes_request([_png(65000, 1)]),
            "1 x 1000000 PNG": _bytes_request([_png(1, 1_000_000, "L")]),
            "decompression bomb": _bytes_request([_bomb_png()]),
        }
        for case, (body, header_length) in bad_bodies.items():
            started = time.monotonic()
            status, answer = _infer(port, "good", body, header_length)
            # 400 for every request error (the model's are INVALID_ARG); Triton's own JSON parser answers 500
            assert status == (500 if "JSON" in case else 400) and answer.get("error"), (case, status, answer)
            assert "\n" not in answer["error"] and len(answer["error"]) <= 600, (case, answer)
            assert time.monotonic() - started < 30, case  # refused, not decoded at length
            assert server.is_running and server.model_ready("good"), case

        # The server still answers correctly: the same label as the in-process runtime on the same image.
        rng = np.random.default_rng(3)
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(png, format="PNG")
        with runtime.load(run_dir / "model.onnx") as predictor:
            expected = predictor.predict([png.getvalue()]).logits
        status, answer = _infer(port, "good", *_bytes_request([png.getvalue()]))
        assert status == 200, answer
        got = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(expected.shape)
        assert np.allclose(got, expected, atol=1e-4) and int(got.argmax()) == int(expected.argmax())


def test_readiness_counts_only_from_the_server_this_call_started(triton, tmp_path, monkeypatch):  # noqa: F811
    """Another server answering 'ready' on the HTTP port (it took the port after the check) is not ours."""
    asked = []

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = json.dumps({"name": "somebody-else", "version": "2.51.0", "extensions": []}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(server_module, "check_ports_free", lambda host, ports: None)  # the race: port taken after it
    (tmp_path / "repo").mkdir()
    before = _mine()
    try:
        server = TritonServer(tmp_path / "repo", model_control_mode="explicit", http_port=impostor.server_port,
                              ready_timeout=60, installation=triton, log_file=tmp_path / "server.log")
        with pytest.raises(MMExportError) as excinfo:
            server.start()
    finally:
        impostor.shutdown()
        impostor.server_close()
    message = one_line(excinfo)
    assert "before it was ready" in message and "in use" in message, message
    assert "/v2/health/ready" in asked  # the probe did reach the impostor, and did not believe it
    assert server.process is None and _mine() == before


# --------------------------------------------------------------------------------------------
# signals: SIGTERM during start-up, SIGKILL after it
# --------------------------------------------------------------------------------------------
CHILD = """
import json, os, signal, sys
from mmexport.serving import server
from mmexport.serving.server import serve

class Progress:
    def message(self, text):
        if sys.argv[2] == "term-while-copying" and text.startswith("copying model.onnx"):
            os.kill(os.getpid(), signal.SIGTERM)  # the repository's folder exists, the copy is about to start
    def __getattr__(self, name):
        return lambda *args, **kwargs: None

if sys.argv[2] == "term-while-starting":
    def first_probe(self):  # the server is launched and loading its model
        os.kill(os.getpid(), signal.SIGTERM)
        return False
    server.TritonServer._answers_as_this_server = first_probe

with serve(sys.argv[1], name="m", ready_timeout=120, progress=Progress()) as session:
    info = {"pid": session.server.pid, "ports": [session.server.http_port, session.server.grpc_port,
            session.server.metrics_port]}
    with open(sys.argv[3] + ".tmp", "w") as handle:
        json.dump(info, handle)
    os.replace(sys.argv[3] + ".tmp", sys.argv[3])
    session.wait()
"""


def _child(run: Path, mode: str, ready: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run), mode, str(ready)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _working_in(pid: int) -> list[int]:
    """Processes whose working directory is one of ``pid``'s temporary folders (its server and stubs)."""
    prefixes = [os.path.join(tempfile.gettempdir(), f"mmexport-{kind}-{pid}-") for kind in ("repo", "triton")]
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if any(cwd.startswith(prefix) for prefix in prefixes):
            found.append(int(entry))
    return found


def _settled(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.mark.parametrize("moment", ["term-while-copying", "term-while-starting"])
def test_sigterm_during_start_up_leaves_nothing(moment, triton, run_dir, tmp_path):  # noqa: F811
    child = _child(run_dir, moment, tmp_path / "ready.json")
    try:
        _, err = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=TIMEOUT)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert not (tmp_path / "ready.json").exists()  # it never got to serving
    assert "Traceback" not in err, err
    assert _settled(lambda: not _working_in(child.pid)), "a server or stub outlived its terminated owner"
    assert _mine(child.pid) == []  # no repository copy, work directory or shared memory left


def test_sigkill_of_the_owner_frees_the_ports_at_once_and_leaves_nothing(triton, run_dir, tmp_path):  # noqa: F811
    ready = tmp_path / "ready.json"
    child = _child(run_dir, "serve", ready)
    try:
        deadline = time.monotonic() + 180
        while not ready.is_file():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate(timeout=30)[1][-2000:]
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        assert _group_members(info["pid"]) and _mine(child.pid)
        child.kill()  # no Python code of the owner runs: its guardian and the kernel's parent-death signal act
        child.wait(timeout=TIMEOUT)
        killed = time.monotonic()
        assert _settled(lambda: all(_port_free(port) for port in info["ports"]), 5.0)
        freed = time.monotonic() - killed
        assert _settled(lambda: not _group_members(info["pid"]) and not _working_in(child.pid))
        assert _settled(lambda: _mine(child.pid) == [])
        print(f"\nports free {freed:.2f} s after SIGKILL of the owner")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=TIMEOUT)
