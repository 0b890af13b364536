"""Safe checkpoint loading/saving: formats, wrappers, refusals, validation, torchvision specs."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path
from urllib.error import URLError

import pytest
import safetensors.torch
import torch
from torchvision.models import ResNet18_Weights

from mmexport.torchside import checkpoints as ck
from mmexport.torchside.backbones import backbone_state_keys, get_backbone
from mmexport.torchside.checkpoints import (
    SourceCheckpoint,
    check_compatible,
    load_safetensors_with_metadata,
    load_source,
    read_state_dict,
    save_state_dict,
)
from mmexport.errors import ArchitectureError, CheckpointError
from mmexport.fileio import sha256_file

HEAD = ["fc.bias", "fc.weight"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return get_backbone("resnet18").build(10).state_dict()


@pytest.fixture(scope="module")
def r18_pt(r18, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("r18") / "resnet18.pt"
    torch.save(r18, path)
    return path


@pytest.fixture(scope="module")
def densenet(tmp_path_factory) -> dict[str, torch.Tensor]:
    return get_backbone("densenet121").build(10).state_dict()


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path, monkeypatch):
    # torch.hub's cache lives under TORCH_HOME: never touch the real one.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    assert message.strip() == message and message
    return message


def assert_backbone(src: SourceCheckpoint, reference: dict[str, torch.Tensor], arch: str = "resnet18") -> None:
    expected = backbone_state_keys(arch)
    assert list(src.state_dict) == list(expected)
    for key, tensor in src.state_dict.items():
        assert tensor.shape == expected[key]
        assert tensor.device.type == "cpu" and tensor.is_contiguous()
        if key.endswith("num_batches_tracked"):
            assert tensor.dtype == torch.int64
        else:
            assert tensor.dtype == torch.float32
        if key in reference:
            torch.testing.assert_close(tensor, reference[key].to(tensor.dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------- formats and wrappers


def test_safetensors_round_trip(r18, tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict(path, r18, metadata={"arch": "resnet18"})
    tensors, metadata = load_safetensors_with_metadata(path)
    assert metadata == {"arch": "resnet18"}
    assert set(tensors) == set(r18)
    for key in r18:
        assert torch.equal(tensors[key], r18[key])
    assert set(read_state_dict(path)) == set(r18)

    src = load_source(str(path), "resnet18", label="source A")
    assert_backbone(src, r18)
    info = src.info
    assert info["format"] == "safetensors"
    assert info["path"] == str(path.resolve()) and os.path.isabs(info["path"])
    assert info["sha256"] == sha256_file(path)
    assert info["size_bytes"] == path.stat().st_size
    assert info["dropped_keys"] == HEAD
    assert info["stripped_prefix"] is None and info["weights"] is None
    assert info["spec"] == str(path)
    assert info["converted_from_dtypes"] == [] and info["filled_keys"] == []


def test_torch_state_dict(r18, r18_pt):
    src = load_source(str(r18_pt), "resnet18")
    assert_backbone(src, r18)
    assert src.info["format"] == "torch"
    assert src.info["dropped_keys"] == HEAD
    assert src.info["container_key"] is None


@pytest.mark.parametrize(
    "wrap, container",
    [
        (lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 10}, "state_dict"),
        (lambda sd: {"model": sd, "args": {"lr": 0.1}}, "model"),
        (lambda sd: {"checkpoint": 1, "model": {"state_dict": sd, "step": 2}}, "model.state_dict"),
    ],
)
def test_wrapped_state_dicts(r18, tmp_path, wrap, container):
    path = tmp_path / "w.ckpt"
    torch.save(wrap(r18), path)
    assert set(read_state_dict(path)) == set(r18)
    src = load_source(str(path), "resnet18")
    assert_backbone(src, r18)
    assert src.info["container_key"] == container


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.model.", "encoder."])
def test_prefix_stripped_and_recorded(r18, tmp_path, prefix):
    path = tmp_path / "w.pth"
    torch.save({prefix + k: v for k, v in r18.items()}, path)
    src = load_source(str(path), "resnet18")
    assert_backbone(src, r18)
    assert src.info["stripped_prefix"] == prefix
    assert src.info["dropped_keys"] == HEAD


def test_headless_checkpoint_drops_nothing(r18, tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict(path, {k: v for k, v in r18.items() if not k.startswith("fc.")})
    src = load_source(str(path), "resnet18")
    assert_backbone(src, r18)
    assert src.info["dropped_keys"] == []


def test_fp16_checkpoint_converted(r18, tmp_path):
    path = tmp_path / "half.safetensors"
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in r18.items()}
    save_state_dict(path, half)
    src = load_source(str(path), "resnet18")
    assert src.info["converted_from_dtypes"] == ["float16"]
    assert_backbone(src, {k: v.float() for k, v in half.items()})


def test_missing_num_batches_tracked_filled(r18, tmp_path):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in r18.items() if not k.endswith("num_batches_tracked")}, path)
    src = load_source(str(path), "resnet18")
    assert_backbone(src, r18)
    nbt = [k for k in backbone_state_keys("resnet18") if k.endswith("num_batches_tracked")]
    assert src.info["filled_keys"] == sorted(nbt) and nbt
    assert all(src.state_dict[k].item() == 0 for k in nbt)


def test_legacy_densenet_keys_renamed(densenet, tmp_path):
    legacy = {}
    for key, value in densenet.items():
        if key.endswith("num_batches_tracked"):
            continue
        for new, old in (("norm1.", "norm.1."), ("norm2.", "norm.2."), ("conv1.", "conv.1."), ("conv2.", "conv.2.")):
            if "denselayer" in key and f".{new}" in key:
                key = key.replace(f".{new}", f".{old}")
        legacy[key] = value
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, path)
    src = load_source(str(path), "densenet121")
    assert_backbone(src, densenet, arch="densenet121")
    assert src.info["renamed_legacy_keys"] > 0
    assert src.info["dropped_keys"] == ["classifier.bias", "classifier.weight"]


# --------------------------------------------------------------------------- refusals: unsafe pickles


def _record_torch_load(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


def test_pickled_module_refused(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save(get_backbone("resnet18").build(10), path)
    calls = _record_torch_load(monkeypatch)
    with pytest.raises(CheckpointError) as exc_info:
        read_state_dict(path)
    message = one_line(exc_info)
    assert str(path) in message
    assert "safety" in message and "pickle" in message
    assert "torchvision.models.resnet.ResNet" in message
    assert calls and all(call.get("weights_only") is True for call in calls)
    # load_source prefixes the label and keeps it one line
    with pytest.raises(CheckpointError, match=r"^source B: .*refused for safety") as exc_info:
        load_source(str(path), "resnet18", label="source B")
    one_line(exc_info)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_payload_really_executes_under_plain_pickle(tmp_path):
    # Control: proves the payload used below is live code, so its absence later means something.
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_code_carrying_pickle_never_executes(r18, tmp_path, monkeypatch, zip_format):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    evil = dict(r18)
    evil["conv1.extra"] = _Payload(marker)
    torch.save(evil, path, _use_new_zipfile_serialization=zip_format)
    calls = _record_torch_load(monkeypatch)
    with pytest.raises(CheckpointError) as exc_info:
        load_source(str(path), "resnet18")
    message = one_line(exc_info)
    assert "safety" in message and str(path) in message
    assert not marker.exists()
    assert calls and all(call.get("weights_only") is True for call in calls)


# --------------------------------------------------------------------------- refusals: bad files


def _cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("name", ["empty.pt", "empty.safetensors"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.touch()
    with pytest.raises(CheckpointError) as exc_info:
        read_state_dict(path)
    message = one_line(exc_info)
    assert str(path) in message and "empty" in message


def test_truncated_safetensors(r18, tmp_path):
    full = tmp_path / "full.safetensors"
    save_state_dict(full, r18)
    cut = _cut_in_half(full, tmp_path / "cut.safetensors")
    for reader in (read_state_dict, load_safetensors_with_metadata):
        with pytest.raises(CheckpointError) as exc_info:
            reader(cut)
        message = one_line(exc_info)
        assert str(cut) in message and "truncated" in message


def test_truncated_pt(r18_pt, tmp_path):
    cut = _cut_in_half(r18_pt, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError) as exc_info:
        read_state_dict(cut)
    message = one_line(exc_info)
    assert str(cut) in message and "truncated" in message
    assert len(message) < 400  # torch's paragraph is not dumped


def test_garbage_pt(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint at all\n" * 20)
    with pytest.raises(CheckpointError) as exc_info:
        read_state_dict(path)
    assert str(path) in one_line(exc_info)


def test_directory(tmp_path):
    folder = tmp_path / "ckpt.pt"
    folder.mkdir()
    with pytest.raises(CheckpointError) as exc_info:
        read_state_dict(folder)
    assert one_line(exc_info) == f"{folder}: is a directory, expected a checkpoint file"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError) as exc_info:
        load_source(str(path), "resnet18", label="source A")
    message = one_line(exc_info)
    assert message.startswith("source A: ") and str(path) in message and "no such file" in message


def test_unknown_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError) as exc_info:
        read_state_dict(path)
    message = one_line(exc_info)
    assert "'.npz'" in message
    for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        assert suffix in message


@pytest.mark.parametrize(
    "obj, needle",
    [
        ([torch.zeros(1)], "found list"),
        ({"conv1.weight": torch.zeros(1), "note": "hello"}, "note"),
        ({"state_dict": [torch.zeros(1)]}, "state_dict"),
        ({}, "empty"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, needle):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as exc_info:
        read_state_dict(path)
    message = one_line(exc_info)
    assert str(path) in message and needle in message


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights(r18, tmp_path, bad, word):
    broken = dict(r18)
    broken["layer2.0.conv1.weight"] = r18["layer2.0.conv1.weight"].clone()
    broken["layer2.0.conv1.weight"][0, 0, 0, 0] = bad
    broken["bn1.running_var"] = r18["bn1.running_var"].clone().fill_(bad)
    path = tmp_path / "broken.safetensors"
    save_state_dict(path, broken)
    with pytest.raises(CheckpointError) as exc_info:
        load_source(str(path), "resnet18", label="source A")
    message = one_line(exc_info)
    assert word in message and str(path.resolve()) in message
    assert "layer2.0.conv1.weight" in message and "bn1.running_var" in message


def test_integer_weights_refused(r18, tmp_path):
    broken = dict(r18)
    broken["conv1.weight"] = r18["conv1.weight"].to(torch.int8)
    path = tmp_path / "int.safetensors"
    save_state_dict(path, broken)
    with pytest.raises(CheckpointError) as exc_info:
        load_source(str(path), "resnet18")
    assert "conv1.weight (int8)" in one_line(exc_info)


# --------------------------------------------------------------------------- architecture fit


def test_resnet34_for_resnet18(tmp_path):
    path = tmp_path / "r34.safetensors"
    save_state_dict(path, get_backbone("resnet34").build(10).state_dict())
    with pytest.raises(ArchitectureError) as exc_info:
        load_source(str(path), "resnet18", label="source A")
    message = one_line(exc_info)
    assert message.startswith(f"source A ({path.resolve()}): does not fit resnet18: unexpected ")
    assert "layer1.2.bn1.bias" in message and "more" in message
    assert "missing" not in message
    assert "fit resnet34" in message


def test_densenet_for_resnet18(densenet, tmp_path):
    path = tmp_path / "dn.pth"
    torch.save(densenet, path)
    with pytest.raises(ArchitectureError) as exc_info:
        load_source(str(path), "resnet18")
    message = one_line(exc_info)
    assert "does not fit resnet18" in message
    assert "missing" in message and "bn1.bias" in message
    assert "unexpected" in message and "classifier.bias" in message
    assert "fit densenet121" in message
    assert len(message) < 1000


def test_wrong_shape_named_with_both_shapes(r18, tmp_path):
    grey = dict(r18)
    grey["conv1.weight"] = r18["conv1.weight"][:, :1].clone()
    path = tmp_path / "grey.safetensors"
    save_state_dict(path, grey)
    with pytest.raises(ArchitectureError) as exc_info:
        load_source(str(path), "resnet18")
    message = one_line(exc_info)
    assert "wrong shape: conv1.weight (64, 1, 7, 7) vs expected (64, 3, 7, 7)" in message
    assert "missing" not in message and "unexpected" not in message


def test_check_compatible(r18, r18_pt, tmp_path):
    a = load_source(str(r18_pt), "resnet18", label="source A")
    b = load_source(str(r18_pt), "resnet18", label="source B")
    check_compatible(a, b)
    b.state_dict.pop("layer4.1.bn2.weight")
    b.state_dict["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(ArchitectureError) as exc_info:
        check_compatible(a, b)
    message = one_line(exc_info)
    assert "source A" in message and "source B" in message
    assert "layer4.1.bn2.weight" in message and "conv1.weight (64, 3, 7, 7)" in message


# --------------------------------------------------------------------------- torchvision specs


def _fake_hub(monkeypatch, state: dict[str, torch.Tensor] | None = None, error: BaseException | None = None):
    calls: list[dict] = []

    def get_state_dict(self, *args, **kwargs):
        calls.append(kwargs)
        if error is not None:
            raise error
        return dict(state)

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", get_state_dict)
    return calls


def test_torchvision_download_failure(monkeypatch):
    calls = _fake_hub(monkeypatch, error=URLError("[Errno -3] Temporary failure in name resolution"))
    spec = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(CheckpointError) as exc_info:
        load_source(spec, "resnet18", label="source A")
    message = one_line(exc_info)
    assert message.startswith(f"source A: {spec}: could not download torchvision weights")
    assert "name resolution" in message and ".pth" in message
    assert calls[0]["weights_only"] is True and calls[0]["check_hash"] is True


def test_torchvision_success(r18, monkeypatch):
    # Old torchvision checkpoints have no num_batches_tracked: the stock file looks like this.
    hosted = {k: v for k, v in r18.items() if not k.endswith("num_batches_tracked")}
    calls = _fake_hub(monkeypatch, state=hosted)
    src = load_source("torchvision:ResNet18_Weights.IMAGENET1K_V1", "resnet18")
    assert_backbone(src, r18)
    info = src.info
    assert info["format"] == "torchvision" and info["path"] is None
    assert info["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert info["url"] == ResNet18_Weights.IMAGENET1K_V1.url
    assert info["dropped_keys"] == HEAD and info["filled_keys"]
    assert info["sha256"] is None  # nothing in the (isolated) hub cache
    assert calls[0]["weights_only"] is True and calls[0]["map_location"] == "cpu"


def test_torchvision_shorthand_records_cache_hash(r18, monkeypatch, tmp_path):
    _fake_hub(monkeypatch, state=r18)
    weights = ResNet18_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"stand-in for the downloaded file")
    # torchvision names the file after its sha256 prefix: a stand-in under the real name is refused ...
    with pytest.raises(CheckpointError, match="does not match the hash in its name"):
        load_source("torchvision:IMAGENET1K_V1", "resnet18")
    # ... and accepted (and its hash recorded) under a name that carries its own prefix
    prefix = sha256_file(cache)[:8]
    cache = cache.rename(cache.with_name(f"resnet18-{prefix}.pth"))
    monkeypatch.setattr(weights.value, "url", weights.url.rsplit("/", 1)[0] + f"/{cache.name}")
    src = load_source("torchvision:IMAGENET1K_V1", "resnet18")
    assert src.info["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert src.info["sha256"] == sha256_file(cache)
    assert src.info["size_bytes"] == cache.stat().st_size


def test_torchvision_wrong_architecture():
    with pytest.raises(ArchitectureError) as exc_info:
        load_source("torchvision:ResNet50_Weights.IMAGENET1K_V1", "resnet18")
    message = one_line(exc_info)
    assert "resnet50" in message and "resnet18" in message and "ResNet18_Weights" in message


@pytest.mark.parametrize("spec", ["torchvision:Nope.X", "torchvision:ResNet18_Weights.NOPE", "torchvision:"])
def test_torchvision_unknown(spec):
    with pytest.raises(CheckpointError) as exc_info:
        load_source(spec, "resnet18")
    message = one_line(exc_info)
    assert "unknown torchvision weights" in message
    assert "ResNet18_Weights.IMAGENET1K_V1" in message


# --------------------------------------------------------------------------- saving


def test_save_is_atomic(r18, tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    save_state_dict(path, {"a": torch.ones(3)}, metadata={"v": "1"})
    before = path.read_bytes()
    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(path, r18)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]

    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(OSError):
        save_state_dict(fresh, r18)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_save_shared_and_non_contiguous(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"w": base, "tied": base, "t": base.t(), "row": base[1]}
    path = tmp_path / "shared.safetensors"
    save_state_dict(path, tensors, metadata={"note": "tied"})
    loaded, metadata = load_safetensors_with_metadata(path)
    assert metadata == {"note": "tied"}
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor)


def test_save_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError):
        save_state_dict(tmp_path / "x.safetensors", {"a": torch.ones(1)}, metadata={"n": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_no_unsafe_torch_load_in_module():
    source = Path(ck.__file__).read_text()
    assert "weights_only=True" in source
    assert "weights_only" + "=False" not in source.replace(" ", "")
