"""Shared fixtures: tiny source checkpoints and datasets the tests make themselves."""

from __future__ import annotations

import hashlib
import json

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.checkpoints import save_state_dict
from mmexport.runtime.runners.base import BaseRunner, TensorMetadata

def one_line(exc_info) -> str:
    """The message of a raised error, asserted to be one non-empty line."""
    message = str(exc_info.value)
    assert message and message == message.strip(), repr(message)
    assert "\n" not in message and "\r" not in message, repr(message)
    return message


TINY_TARGET = "synthetic:target?n_train=24&n_val=16&n_test=16"


def backbone_state(arch: str, seed: int, num_classes: int = 7) -> dict[str, torch.Tensor]:
    """A randomly initialised network's full state dict (head included), with non-trivial BN stats."""
    torch.manual_seed(seed)
    model = get_backbone(arch).build(num_classes)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed + 1000)
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
        elif key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    return state


@pytest.fixture(scope="session")
def resnet18_sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sources")
    paths = []
    for name, seed in (("a", 1), ("b", 2)):
        path = root / f"{name}.safetensors"
        save_state_dict(path, backbone_state("resnet18", seed))
        paths.append(path)
    return paths[0], paths[1]


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative POSIX path) with its sha256: the 'is it untouched' snapshot."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def train_exported_run(out: Path, sources: tuple[Path, Path], *, image_size: int | None = None) -> Path:
    """A tiny merged run (1 + 1 epochs on 32 synthetic images) with its fp32 ONNX: the deployment tests' subject."""
    from mmexport.config import TrainConfig
    from mmexport.torchside.train import train
    from mmexport.torchside.operations import export_onnx_run

    run = train(TrainConfig(arch="resnet18", source_a=str(sources[0]), source_b=str(sources[1]),
                            data="synthetic:target?n_train=32&n_val=16&n_test=16", out=str(out),
                            merge_epochs=1, finetune_epochs=1, batch_size=16, device="cpu", verify_samples=8,
                            image_size=image_size))
    export_onnx_run(run, "fp32")
    return Path(run)


def write_image_folder(root: Path, classes: dict[str, dict[str, int]], size: int = 40) -> Path:
    """``classes`` maps split -> {class: count}; writes small random PNGs."""
    rng = np.random.default_rng(0)
    for split, counts in classes.items():
        for class_name, count in counts.items():
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    return write_image_folder(
        tmp_path / "data", {"train": {"benign": 6, "malignant": 4}, "val": {"benign": 3, "malignant": 3}}
    )


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # Keep runs comparable on the 2-core CI machine.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def _tensorrt_missing() -> str | None:
    """Why the TensorRT tests cannot run here, or None when they can."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "needs the tensorrt package (pip install 'mmexport[gpu]') and an NVIDIA GPU"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU for TensorRT (torch.cuda.is_available() is False)"
    return None


def pytest_runtest_setup(item):
    """GPU and TensorRT tests skip with a reason when the hardware or package is absent.

    MMEXPORT_REQUIRE_GPU=1 (set on GPU machines) turns those skips into failures.
    """
    reason = None
    if "gpu" in item.keywords and not torch.cuda.is_available():
        reason = "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if reason is None and "tensorrt" in item.keywords:
        reason = _tensorrt_missing()
    if reason is not None:
        if os.environ.get("MMEXPORT_REQUIRE_GPU") == "1":
            pytest.fail(f"MMEXPORT_REQUIRE_GPU=1 but the test cannot run: {reason}")
        pytest.skip(reason)


class FunctionRunner(BaseRunner):
    """A runner computing ``fn(batch) -> logits`` (tests of verification and benchmarking)."""

    def __init__(self, name, fn, rank: int = 4):
        super().__init__(name)
        self.fn = fn
        self.rank = rank
        self.seen = []

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def input_metadata_impl(self):
        return {"image": TensorMetadata(np.dtype(np.float32), (None,) * self.rank)}

    def infer_impl(self, feed):
        self.seen.append(feed["image"])
        return {"logits": np.asarray(self.fn(feed["image"]), dtype=np.float32)}


def load_layout_tool():
    """``tools/check_layout.py`` as a module (the tools folder is not a package)."""
    import importlib.util

    path = Path(__file__).parents[1] / "tools" / "check_layout.py"
    spec = importlib.util.spec_from_file_location("check_layout", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_layout", module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return sys.modules["check_layout"]


def same_file_but_the_run(first, second) -> None:
    """Two runs' model files: bit-identical tensors and the same metadata, but for the run's identity.

    Each file names its own run (``run_id``, ``run_created``: docs/deploying.md), so two runs never
    write the same bytes; everything else -- weights, description, inputs, metrics -- must agree.
    """
    from safetensors.numpy import load_file

    def read(path):
        from mmexport.runs.verify import _safetensors_metadata

        metadata = _safetensors_metadata(path)
        provenance = json.loads(metadata.pop("provenance"))
        assert metadata.pop("run_id") == provenance.pop("run_id") and provenance.pop("run_created")
        return load_file(str(path)), metadata, provenance

    (tensors_a, meta_a, prov_a), (tensors_b, meta_b, prov_b) = read(first), read(second)
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert tensors_a[key].tobytes() == tensors_b[key].tobytes(), key
    assert (meta_a, prov_a) == (meta_b, prov_b)
