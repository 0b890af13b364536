"""Hostile and careless inputs to ``mmexport train``: source checkpoints, datasets, options, a relative --data.

Every refused case runs ``mmexport train`` in its own process on tiny inputs the test makes
itself and checks: exit 1 (2 for usage errors), exactly one line on stderr starting
with ``error:`` and containing the expected fragment, no traceback (``MMEXPORT_DEBUG`` unset),
nothing created where the run would go (neither ``--out`` nor a hidden ``.NAME.partial``), and
a pre-existing run byte-identical (file list and sha256) where the case passes ``--force``
over one. No code-executing pickle ever runs (a sentinel file must never appear).

Speed: importing mmexport's training stack costs ~2.6 s of CPU per process, most of these
cases' time on a 2-core machine. So the cases that need no existing run are each run in a
process *forked* from one server process that imported it once (``FORK_SERVER``: the CLI's
``main()`` with the case's argv, cwd and environment, stdout and stderr to files, the exit
status taken from the process); the cases that run ``--force`` over an existing run, and
everything else, run as plain ``python -m mmexport``.

The accepted cases (fp16 and bf16 sources; 16-bit, RGBA, grey and palette PNGs; unicode
file and class names; class names that are rich markup) share one successful training run,
which is also the run that ``inspect`` and the relative ``--data`` checks read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.data import check_recorded_data, load_task, recorded_spec
from mmexport.errors import DataError
from tests.conftest import tree_hashes

TIMEOUT = 240
SYNTH = "synthetic:target?n_train=16&n_val=8&n_test=0"
TINY = ["--arch", "resnet18", "--image-size", "32", "--merge-epochs", "1", "--finetune-epochs", "0",
        "--batch-size", "8", "--device", "cpu", "--no-amp"]
MARKUP_CLASSES = ("[bold]x[/]", "[/]", "naïve 名前")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- running the CLI


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMEXPORT_DEBUG", "COLUMNS", "TORCH_HOME")}
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "400", "NO_COLOR": "1"})
    env.update(extra or {})
    return env


def mmexport(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
             timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmexport", *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(env), timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str, code: int = 1) -> str:
    stderr = result.stderr
    assert result.returncode == code, (result.returncode, stderr[-3000:], result.stdout[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
        assert len(lines[0]) < 1000, f"{len(lines[0])} characters: {lines[0][:300]}…"
    assert fragment in stderr, stderr[-3000:]
    return lines[0] if lines else ""


FORK_SERVER = r"""
import json, os, signal, sys, traceback
import mmexport.torchside.train, mmexport.torchside.data.formats, mmexport.torchside.checkpoints  # the expensive imports, once, before forking
from mmexport.cli.app import main

jobs, width = json.load(sys.stdin), int(sys.argv[1])
codes, running, queue = {}, {}, list(range(len(jobs)))


def child(job):
    code = 1
    try:
        signal.alarm(job["timeout"])
        os.chdir(job["cwd"])
        os.environ.update(job["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = ["mmexport", *job["argv"]]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()  # what the interpreter would print for an uncaught exception
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


while queue or running:
    while queue and len(running) < width:
        index = queue.pop(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(jobs[index])
        running[pid] = index
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(jobs))]))
"""


def run_forked(jobs: list[dict], width: int = 2, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run ``mmexport`` argv lists, each in its own process forked from one that imported mmexport once."""
    server = subprocess.run([sys.executable, "-c", FORK_SERVER, str(width)], input=json.dumps(jobs), text=True,
                            capture_output=True, env=_env(), timeout=timeout)
    assert server.returncode == 0, server.stderr[-3000:]
    codes = json.loads(server.stdout.strip().splitlines()[-1])
    return [subprocess.CompletedProcess(job["argv"], code, Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text())
            for job, code in zip(jobs, codes)]


# --------------------------------------------------------------------------- making hostile files


def resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return get_backbone("resnet18").build(7).state_dict()


def save_st(path: Path, state: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 2) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def corrupt_stream_png(path: Path) -> Path:
    """Valid signature, chunks and CRCs; the IDAT's deflate stream is invalid (reserved block type)."""
    path.write_bytes(png_bytes(16, 16, b"\x78\x9c" + b"\xff" * 64))
    with Image.open(path) as image:
        image.verify()  # the reason verify() alone is not enough: every CRC is right
    return path


def bomb_png(path: Path, side: int) -> Path:
    """A 1-bit grey PNG of side x side zero pixels: a few KB on disk, side² pixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    stream = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.compress(row * (side % 1000))
    path.write_bytes(png_bytes(side, side, stream + packer.flush(), bit_depth=1, colour=0))
    return path


def save_png(path: Path, seed: int = 0, size: int = 24, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16)).save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    elif mode == "RGBA":
        Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), "RGBA").save(path)
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert("P")
        image.save(path, transparency=0)
    else:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def image_folder(root: Path, train: dict[str, int] | None = None, val: dict[str, int] | None = None) -> Path:
    train = {"a": 4, "b": 4} if train is None else train
    val = {"a": 2, "b": 2} if val is None else val
    seed = 0
    for split, counts in (("train", train), ("val", val)):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                seed += 1
                save_png(root / split / name / f"{index}.png", seed)
    return root


def write_npz(path: Path, train_labels, val_labels=(0, 1), shape=(8, 8)) -> Path:
    train_labels, val_labels = np.asarray(train_labels, np.int64), np.asarray(val_labels, np.int64)
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.integers(0, 256, (len(train_labels), *shape), dtype=np.uint8),
             train_labels=train_labels[:, None], val_images=rng.integers(0, 256, (len(val_labels), *shape), dtype=np.uint8),
             val_labels=val_labels[:, None])
    return path


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------- the refused cases


@dataclass
class Case:
    surface: str
    name: str
    make: Callable[[Path], list[str]]  # workdir -> train arguments (sources, data, options); --out is added
    expect: str
    code: int = 1
    force_over_run: bool = False  # train --force over an existing run, which must stay byte-identical
    sentinel: bool = False  # workdir/SENTINEL must never appear
    env: Callable[[Path], dict[str, str]] | None = None
    skip: str | None = None
    outcome: dict = field(default_factory=dict)


def _source(make_file: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda w: ["--source-a", str(make_file(w)), "--source-b", "scratch", "--data", SYNTH]


def _data(make_spec: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    return lambda w: ["--source-a", "scratch", "--source-b", "scratch:1", "--data", make_spec(w)]


def _option(*extra: str) -> Callable[[Path], list[str]]:
    return lambda w: ["--source-a", "scratch", "--source-b", "scratch:1", "--data", SYNTH, *extra]


def _evil_pickle(w: Path) -> Path:
    state = {**resnet18_state(), "conv1.extra": _Payload(w / "SENTINEL")}
    torch.save(state, w / "evil.pt")
    return w / "evil.pt"


def _foreign_globals(w: Path) -> Path:
    import argparse

    torch.save({"state_dict": resnet18_state(), "args": argparse.Namespace(lr=0.1)}, w / "lightning.pt")
    return w / "lightning.pt"


def _truncated(w: Path) -> Path:
    data = save_st(w / "full.safetensors", resnet18_state()).read_bytes()
    (w / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return w / "cut.safetensors"


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(w: Path) -> Path:
        (w / name).write_bytes(data)
        return w / name
    return make


def _edited(edit: Callable[[dict[str, torch.Tensor]], None], name: str = "edited.safetensors") -> Callable[[Path], Path]:
    def make(w: Path) -> Path:
        state = resnet18_state()
        edit(state)
        return save_st(w / name, state)
    return make


def _densenet(w: Path) -> Path:
    torch.manual_seed(0)
    return save_st(w / "densenet121.safetensors", get_backbone("densenet121").build(7).state_dict())


def _symlink_loop(w: Path) -> Path:
    (w / "one.safetensors").symlink_to(w / "two.safetensors")
    (w / "two.safetensors").symlink_to(w / "one.safetensors")
    return w / "one.safetensors"


def _unreadable(w: Path) -> Path:
    path = save_st(w / "locked.safetensors", resnet18_state())
    path.chmod(0)
    return path


def _directory(w: Path) -> Path:
    (w / "weights.safetensors").mkdir()
    return w / "weights.safetensors"


TORCHVISION_FILE = "resnet18-f37072fd.pth"  # ResNet18_Weights.IMAGENET1K_V1: sha256 starts f37072fd


def _poisoned_hub(w: Path) -> list[str]:
    cache = w / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state(), cache / TORCHVISION_FILE)  # loads fine; not the published file
    return ["--source-a", "torchvision:ResNet18_Weights.IMAGENET1K_V1", "--source-b", "scratch", "--data", SYNTH]


def _with_bad_image(write_bad: Callable[[Path], Path], options: str = "") -> Callable[[Path], str]:
    def make(w: Path) -> str:
        root = image_folder(w / "data")
        write_bad(root / "train" / "a" / "bad.png")
        return str(root) + options
    return make


def _empty_class(w: Path) -> str:
    root = image_folder(w / "data")
    for file in (root / "train" / "b").iterdir():
        file.unlink()
    return str(root)


def _symlink_in_class(target: Callable[[Path], Path]) -> Callable[[Path], str]:
    def make(w: Path) -> str:
        root = image_folder(w / "data")
        (root / "train" / "a" / "more").symlink_to(target(root), target_is_directory=True)
        return str(root)
    return make


def _image_symlink(w: Path) -> str:
    root = image_folder(w / "data")
    (root / "train" / "a" / "extra.png").symlink_to(root / "train" / "b" / "0.png")
    return str(root)


def _csv(rows: list[str], images: dict[str, int] | None = None, options: str = "?split_col=split") -> Callable[[Path], str]:
    def make(w: Path) -> str:
        folder = w / "csvdata"
        for index, name in enumerate(images or {}):
            save_png(folder / f"{name}.png", index)
        (folder / "meta.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return str(folder / "meta.csv") + options
    return make


_GOOD_ROWS = ["image_id,dx,split", "i0,x,train", "i1,x,train", "i2,y,train", "i3,y,train", "i4,x,val", "i5,y,val"]
_IMAGES = {f"i{i}": 1 for i in range(6)}


def _npz(train_labels, val_labels=(0, 1), shape=(8, 8), options: str = "") -> Callable[[Path], str]:
    return lambda w: str(write_npz(w / "data.npz", train_labels, val_labels, shape)) + options


def _nonfinite(option: str, value: str) -> Case:
    args = ("--lr-logits-probe", f"0.1,{value}") if option == "--lr-logits-probe" else (option, value)
    return Case("options", f"{option} {value}", _option(*args), option + " must be")


CASES = [
    # source checkpoints
    Case("source", "pickle that runs code", _source(_evil_pickle), "refused for safety", sentinel=True, force_over_run=True),
    Case("source", "pickle with a non-allowlisted global", _source(_foreign_globals), "argparse.Namespace"),
    Case("source", "truncated safetensors", _source(_truncated), "corrupt or truncated safetensors"),
    Case("source", "empty safetensors", _source(_bytes("empty.safetensors", b"")), "file is empty"),
    Case("source", "garbage safetensors", _source(_bytes("noise.safetensors", os.urandom(4096))), "corrupt or truncated"),
    Case("source", "safetensors header of 2**60 bytes",
         _source(_bytes("huge.safetensors", struct.pack("<Q", 2**60) + b'{"a":{}}')), "corrupt or truncated"),
    Case("source", "densenet121 weights for resnet18", _source(_densenet), "these weights fit densenet121"),
    Case("source", "NaN weights", _source(_edited(lambda s: s["conv1.weight"].view(-1).__setitem__(3, float("nan")))),
         "contain NaN or Inf"),
    Case("source", "Inf running variance",
         _source(_edited(lambda s: s["bn1.running_var"].__setitem__(0, float("inf")))), "contain NaN or Inf"),
    Case("source", "float64 1e300 overflows float32",
         _source(_edited(lambda s: s.update({k: v.double() for k, v in s.items() if v.is_floating_point()})
                         or s["layer1.0.conv1.weight"].view(-1).__setitem__(0, 1e300))), "overflow float32"),
    Case("source", "a directory", _source(_directory), "is a directory"),
    Case("source", "symlink loop", _source(_symlink_loop), "symlink loop"),
    Case("source", "unreadable file (mode 000)", _source(_unreadable), "permission denied",
         skip="running as root, which reads a mode-000 file anyway" if IS_ROOT else None),
    Case("source", "torchvision hub cache file not matching its hash", _poisoned_hub, "does not match the hash in its name",
         env=lambda w: {"TORCH_HOME": str(w / "torch_home")}),
    # datasets
    Case("data", "empty class folder", _data(_empty_class), "contain no images"),
    Case("data", "one class only", _data(lambda w: str(image_folder(w / "data", {"a": 4}, {"a": 2}))),
         "need at least 2 classes"),
    Case("data", "corrupt image (bit flip)",
         _data(_with_bad_image(lambda p: p.write_bytes(bytes(b ^ 0x5A if i == 60 else b for i, b in enumerate(save_png(p).read_bytes()))))),
         "more than max_bad"),
    Case("data", "zero-byte image", _data(_with_bad_image(lambda p: p.write_bytes(b""))), "more than max_bad"),
    Case("data", "PNG with valid CRCs and a corrupt zlib stream", _data(_with_bad_image(corrupt_stream_png)),
         "more than max_bad", force_over_run=True),
    Case("data", "decompression bomb (256 Mpx)", _data(_with_bad_image(lambda p: bomb_png(p, 16000))), "DecompressionBomb"),
    Case("data", "image above the bomb warning limit (100 Mpx)", _data(_with_bad_image(lambda p: bomb_png(p, 10000))),
         "DecompressionBombWarning"),
    Case("data", "symlink in a class folder to its parent",
         _data(_symlink_in_class(lambda root: root / "train")), "which holds this class folder"),
    Case("data", "symlink in a class folder to another class folder",
         _data(_symlink_in_class(lambda root: root / "train" / "b")), "which holds class folder"),
    Case("data", "symlink in a class folder to the val split of its class",
         _data(_symlink_in_class(lambda root: root / "val" / "a")), "which holds class folder"),
    Case("data", "image symlink into another class folder", _data(_image_symlink), "an image of another class folder"),
    Case("data", "CSV without the label column", _data(_csv(["image_id,diagnosis,split", "i0,x,train"], _IMAGES)),
         "no column 'dx'"),
    Case("data", "CSV naming files that do not exist", _data(_csv(_GOOD_ROWS, {"i0": 1, "i2": 1, "i4": 1, "i5": 1})),
         "missing"),
    Case("data", "CSV with an empty label", _data(_csv(_GOOD_ROWS[:3] + ["i2,,train"] + _GOOD_ROWS[4:], _IMAGES)),
         "empty value in column 'dx'"),
    Case("data", "CSV label only in val", _data(_csv(_GOOD_ROWS[:5] + ["i5,z,val"], _IMAGES)), "does not occur in train"),
    Case("data", "npz with zero-sized images", _data(_npz([0, 1, 0, 1], shape=(0, 0))), "images of zero size"),
    Case("data", "npz label 1e9", _data(_npz([0, 1, 0, 10**9])), "1000000001 classes"),
    Case("data", "npz label 1e5", _data(_npz([0, 1, 0, 10**5])), "100001 classes"),
    Case("data", "npz label 1e9 with class names", _data(_npz([0, 1, 0, 10**9], options="?classes=x,y")),
         "goes up to 1000000000"),
    Case("data", "npz negative label", _data(_npz([0, 1, -1, 1])), "negative label -1"),
    # options
    Case("options", "--image-size 10000", _option("--image-size", "10000"), "GiB of memory", force_over_run=True),
    Case("options", "--image-size 8", _option("--image-size", "8"), "--image-size must be an integer >= 16"),
    Case("options", "--seed 2**32", _option("--seed", str(2**32)), "--seed must be an integer from 0 to 4294967295"),
    Case("options", "--seed -1", _option("--seed", "-1"), "--seed must be an integer"),
    *[_nonfinite(option, value) for option in ("--lr-logits", "--lr-head", "--lr-backbone", "--weight-decay",
                                               "--warmup-epochs", "--sigma-bound", "--lr-logits-probe")
      for value in ("nan", "inf")],
]
assert len({(c.surface, c.name) for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    """One training run on everything that must be accepted (see the module docstring)."""
    work = tmp_path_factory.mktemp("accepted")
    state = resnet18_state(3)
    save_st(work / "fp16.safetensors", {k: v.half() if v.is_floating_point() else v for k, v in state.items()})
    save_st(work / "bf16.safetensors", {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()})
    folder = work / "data"
    modes = ("RGB", "I;16", "RGBA", "L", "P", "RGB")
    rows = ["image_id,dx,split"]
    for c, name in enumerate(MARKUP_CLASSES):
        for i in range(6):
            file = f"ünï_{c}_{i}_名前.png"
            save_png(folder / file, 100 * c + i, mode=modes[i])
            rows.append(f"{file},{name},{'train' if i < 4 else 'val'}")
    (folder / "meta.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    spec = "data/meta.csv?split_col=split"  # relative on purpose
    # Started here, awaited where needed: the refused cases run meanwhile.
    process = subprocess.Popen([sys.executable, "-m", "mmexport", "train", *TINY, "--source-a", "fp16.safetensors",
                                "--source-b", "bf16.safetensors", "--data", spec, "--out", "runs/run"],
                               cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    accepted = {"work": work, "run": work / "runs" / "run", "spec": spec, "process": process}
    yield accepted
    if process.poll() is None:
        process.kill()
        process.wait()


def finished(accepted: dict) -> subprocess.CompletedProcess:
    if "result" not in accepted:
        process = accepted["process"]
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        accepted["result"] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return accepted["result"]


@pytest.fixture(scope="module")
def success(accepted):
    finished(accepted)
    return accepted


@pytest.fixture(scope="module")
def existing_run(success):
    assert success["result"].returncode == 0, success["result"].stderr[-3000:]
    return success["run"]


def _prepare(case: Case, workdir: Path, existing: Path | None) -> list[str]:
    args = case.make(workdir)
    out = workdir / "runs" / "run"
    if case.force_over_run:
        shutil.copytree(existing, out, copy_function=os.link)  # hard links: cheap, and any in-place write shows
        args += ["--force"]
    case.outcome = {"workdir": workdir, "out": out, "parent_before": sorted(os.listdir(workdir)),
                    "before": tree_hashes(out) if out.exists() else None}
    return ["train", *TINY, *args, "--out", str(out)]


def _record(case: Case, result: subprocess.CompletedProcess) -> Case:
    workdir, out = case.outcome["workdir"], case.outcome["out"]
    case.outcome.update({"result": result, "after": tree_hashes(out) if out.exists() else None,
                         "parent_after": sorted(os.listdir(workdir)),
                         "runs": sorted(os.listdir(workdir / "runs")) if (workdir / "runs").exists() else None,
                         "sentinel": (workdir / "SENTINEL").exists()})
    return case


def _plain(case: Case, existing: Path | None) -> Case:
    argv = _prepare(case, case.outcome["workdir"], existing)
    env = case.env(case.outcome["workdir"]) if case.env else None
    return _record(case, mmexport(argv, cwd=case.outcome["workdir"], env=env))


@pytest.fixture(scope="module")
def outcomes(accepted, tmp_path_factory):
    todo = [case for case in CASES if case.skip is None]
    forked = [case for case in todo if not case.force_over_run]
    jobs = []
    for case in forked:
        workdir = tmp_path_factory.mktemp("hostile")
        argv = _prepare(case, workdir, None)
        jobs.append({"argv": argv, "cwd": str(workdir), "env": case.env(workdir) if case.env else {},
                     "stdout": str(workdir.parent / f"{workdir.name}.stdout"),
                     "stderr": str(workdir.parent / f"{workdir.name}.stderr"), "timeout": TIMEOUT})
    done = [_record(case, result) for case, result in zip(forked, run_forked(jobs))]
    result = finished(accepted)  # the cases that replace a run need the accepted run
    assert result.returncode == 0, result.stderr[-3000:]
    for case in todo:
        if case.force_over_run:
            case.outcome = {"workdir": tmp_path_factory.mktemp("hostile")}
            done.append(_plain(case, accepted["run"]))
    return {(case.surface, case.name): case for case in done}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.surface}: {c.name}" for c in CASES])
def test_refused_in_one_line_and_nothing_written(case, request):
    if case.skip:
        pytest.skip(case.skip)
    outcomes = request.getfixturevalue("outcomes")
    out = outcomes[(case.surface, case.name)].outcome
    assert_one_line_error(out["result"], case.expect, case.code)
    assert not out["sentinel"], "the pickle's code ran"
    if case.force_over_run:
        assert out["after"] == out["before"], "the existing run changed"
        assert out["runs"] in (["run"], [".run.lock", "run"]), out["runs"]
    else:
        assert out["after"] is None, "the run directory was created"
        assert out["runs"] in (None, [], [".run.lock"]), out["runs"]  # no .run.partial
    created = set(out["parent_after"]) - set(out["parent_before"])
    assert not created - {"runs"}, created


def test_case_counts():
    counts: dict[str, int] = {}
    for case in CASES:
        counts[case.surface] = counts.get(case.surface, 0) + 1
    assert counts["source"] >= 12 and counts["data"] >= 18 and counts["options"] >= 14, counts


# --------------------------------------------------------------------------- the accepted cases


def test_fp16_bf16_sources_grey16_rgba_grey_palette_unicode_and_markup_names_train(success):
    result = success["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not result.stderr.strip(), result.stderr[-3000:]
    manifest = json.loads((success["run"] / "manifest.json").read_text())
    inputs = manifest["inputs"]
    assert inputs["source_a"]["converted_from_dtypes"] == ["float16"]
    assert inputs["source_b"]["converted_from_dtypes"] == ["bfloat16"]
    assert manifest["model"]["classes"] == sorted(MARKUP_CLASSES)
    assert inputs["data"]["skipped"]["train"]["unreadable"] == 0 and inputs["data"]["counts"] == {"train": 12, "val": 6}


def test_markup_class_names_are_printed_literally_by_train_and_inspect(success, existing_run):
    for name in MARKUP_CLASSES:
        assert name in success["result"].stdout, success["result"].stdout[-3000:]
    result = mmexport(["inspect", str(existing_run)])
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for name in MARKUP_CLASSES:
        assert name in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "L", "P"])
def test_image_modes_are_read_as_rgb(tmp_path, mode):
    root = image_folder(tmp_path / "data")
    save_png(root / "val" / "a" / "odd.png", 7, mode=mode)
    task = load_task(str(root), image_size=16)
    assert task.description["skipped"]["val"]["unreadable"] == 0
    pixels, labels = task.pixels("val")
    assert pixels.shape == (5, 16, 16, 3) and pixels.dtype == np.uint8 and labels.tolist() == [0, 0, 0, 1, 1]


def test_corrupt_zlib_png_is_caught_at_load_time_and_counted_within_max_bad(tmp_path):
    root = image_folder(tmp_path / "data", {"a": 6, "b": 6})
    corrupt_stream_png(root / "train" / "a" / "bad.png")
    task = load_task(f"{root}?max_bad=0.2", image_size=16)
    skipped = task.description["skipped"]["train"]
    assert skipped["unreadable"] == 1 and skipped["examples"] == [str(root / "train" / "a" / "bad.png")]
    images, _ = task.arrays("train")  # every image that is left decodes
    assert images.shape == (12, 3, 16, 16)


def test_symlink_cycle_to_its_own_class_folder_is_still_ignored(tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "train" / "a" / "again").symlink_to(root / "train" / "a", target_is_directory=True)
    task = load_task(str(root), image_size=16)
    assert task.description["counts"]["train"] == 8


def test_npz_label_1e9_is_refused_before_any_allocation(tmp_path):
    import resource
    import time

    path = write_npz(tmp_path / "d.npz", [0, 1, 0, 10**9])
    start, peak = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="1000000001 classes") as info:
        load_task(str(path))
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KiB: nothing sized by the label
    assert len(str(info.value)) < 400


# --------------------------------------------------------------------------- a relative --data


def test_the_run_records_the_resolved_data_path_and_a_content_fingerprint(success, existing_run):
    data = json.loads((existing_run / "manifest.json").read_text())["inputs"]["data"]
    assert data["path"] == str((success["work"] / "data" / "meta.csv").resolve())
    assert data["fingerprint"].startswith("sha256:") and len(data["fingerprint"]) == 71
    assert recorded_spec(success["spec"], data) == data["path"] + "?split_col=split"


def _other_dataset(where: Path, success: dict) -> None:
    """The same relative path and classes elsewhere, with other images."""
    shutil.copytree(success["work"] / "data", where / "data")
    save_png(next((where / "data").glob("ünï_0_0_*.png")), 999)


def test_same_relative_spec_elsewhere_is_refused_by_the_library(success, existing_run, tmp_path):
    recorded = json.loads((existing_run / "manifest.json").read_text())["inputs"]["data"]
    _other_dataset(tmp_path, success)
    spec = success["spec"]
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        task = load_task(spec, image_size=32)
    finally:
        os.chdir(here)
    with pytest.raises(DataError, match="now resolves to") as info:
        check_recorded_data(spec, task, recorded, run_spec=spec)
    assert "\n" not in str(info.value)
    # an identical copy elsewhere is the same dataset; a deliberately other path is not this check's business
    same = load_task(recorded_spec(spec, recorded), image_size=32)
    check_recorded_data(spec, same, recorded, run_spec=spec)
    check_recorded_data(str(tmp_path / "data" / "meta.csv"), task, recorded, run_spec=spec)


def test_verify_with_the_same_relative_data_from_another_directory_is_refused(success, existing_run, tmp_path):
    _other_dataset(tmp_path, success)
    before = tree_hashes(existing_run)
    result = mmexport(["verify", str(existing_run), "--data", success["spec"], "--samples", "4"], cwd=tmp_path)
    assert_one_line_error(result, "now resolves to")
    assert tree_hashes(existing_run) == before


def test_unreadable_source_is_named_as_such_not_as_corrupt(tmp_path, monkeypatch):
    """The mode-000 case above, where root cannot make a file unreadable: the access check itself."""
    from mmexport.torchside.checkpoints import load_source
    from mmexport.errors import CheckpointError

    path = save_st(tmp_path / "locked.safetensors", resnet18_state())
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw))
    with pytest.raises(CheckpointError, match="permission denied") as info:
        load_source(str(path), "resnet18", label="source A")
    assert "corrupt" not in str(info.value) and "\n" not in str(info.value)


def test_hub_cache_file_is_checked_against_the_hash_prefix_in_its_name(tmp_path):
    from mmexport.torchside.checkpoints import _check_cached_hash
    from mmexport.errors import CheckpointError
    from mmexport.fileio import sha256_file

    cached = tmp_path / "weights.pth"
    torch.save(resnet18_state(), cached)
    digest = sha256_file(cached)
    named = cached.rename(tmp_path / f"resnet18-{digest[:8]}.pth")
    assert _check_cached_hash("spec", named, f"https://download.pytorch.org/models/{named.name}") == digest
    other = tmp_path / TORCHVISION_FILE
    named.rename(other)
    with pytest.raises(CheckpointError, match=f"sha256 {digest[:12]}…, expected f37072fd…"):
        _check_cached_hash("spec", other, f"https://download.pytorch.org/models/{TORCHVISION_FILE}")
    assert _check_cached_hash("spec", tmp_path / "absent.pth", "https://x/resnet18-00000000.pth") is None
