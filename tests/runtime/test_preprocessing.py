"""The recorded preprocessing block: its format, its exactness, and accuracy reproduced from files alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmexport.errors import CheckpointError, DataError
from mmexport.runtime.preprocess import Preprocessing, pil_pipeline, preprocess_image, to_rgb

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
README = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "docs" / "deploying.md"


def test_block_round_trips_and_is_versioned():
    for prep in (Preprocessing.center_crop(224, MEAN, STD), Preprocessing.exact(32, MEAN, STD)):
        text = prep.to_json()
        assert json.loads(text)["format"] == "mmexport-preprocessing/1"
        assert Preprocessing.from_json(text) == prep
    crop = Preprocessing.center_crop(224, MEAN, STD)
    assert (crop.resize, crop.resize_size, crop.crop, crop.crop_size) == ("shorter_side", (256,), "center", (224, 224))
    assert crop.output_size == (224, 224)


@pytest.mark.parametrize("change, fragment", [
    ({"format": "mmexport-preprocessing/9"}, "unknown preprocessing block"),
    ({"resize": "stretch"}, "resize 'stretch'"),
    ({"crop": "none"}, "without a crop the resize must be exact"),
    ({"interpolation": "nearest"}, "unsupported interpolation"),
    ({"std": [0.2, 0.0, 0.2]}, "std must be finite and from 1e-06"),
])
def test_malformed_blocks_are_refused(change, fragment):
    data = {**Preprocessing.center_crop(64, MEAN, STD).to_dict(), **change}
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        Preprocessing.from_dict(data)


@pytest.mark.parametrize("size", [(80, 60), (60, 80), (73, 73), (300, 41), (37, 37)])
def test_shorter_side_and_center_crop_are_torchvision_exactly(size):
    """The block's rule is torchvision's Resize(int) + CenterCrop on PIL images, pixel for pixel."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    prep = Preprocessing.center_crop(32, MEAN, STD)
    expected = v2.Compose([v2.Resize(prep.resize_size[0], antialias=True), v2.CenterCrop(32)])(image)
    np.testing.assert_array_equal(np.asarray(pil_pipeline(image, prep)), np.asarray(expected))
    normalised = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])(expected)
    np.testing.assert_allclose(preprocess_image(image, prep), normalised.numpy(), rtol=0, atol=1e-6)


def test_colour_rule_and_inputs_accepted():
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(grey16)).max() == 255  # scaled, not clipped white-everywhere of the low values
    half = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(half))[0, 0, 0] == 128
    prep = Preprocessing.exact(8, MEAN, STD)
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert preprocess_image(rgba, prep).shape == (3, 8, 8)
    with pytest.raises(DataError, match="uint8"):
        preprocess_image(np.zeros((8, 8, 3), np.float32), prep)
    with pytest.raises(DataError, match="cannot decode"):
        preprocess_image(b"not an image", prep)


def _readme_snippet(name: str = "metadata-only") -> str:
    text = README.read_text()
    block = text.split(f"<!-- snippet:{name} -->", 1)[1].split(f"<!-- /snippet:{name} -->", 1)[0]
    return block.split("```python", 1)[1].rsplit("```", 1)[0]


def _image_folder(root: Path) -> Path:
    """Three classes of coloured blobs on PNGs of varied, non-square sizes (so resize and crop matter)."""
    rng = np.random.default_rng(7)
    colours = {"amber": (200, 140, 40), "blue": (40, 70, 200), "green": (50, 170, 60)}
    counts = {"train": 14, "val": 6, "test": 9}
    for split, count in counts.items():
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                pixels = rng.integers(90, 170, (height, width, 3)).astype(np.float64)
                cy, cx, r = height / 2 + rng.normal(0, 5), width / 2 + rng.normal(0, 5), min(width, height) / 3
                yy, xx = np.mgrid[:height, :width]
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
                pixels[mask] = np.asarray(colour) + rng.normal(0, 25, (mask.sum(), 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, resnet18_sources):
    from mmexport.config import TrainConfig
    from mmexport.torchside.train import train
    from mmexport.torchside.operations import export_onnx_run

    root = tmp_path_factory.mktemp("files")
    data = _image_folder(root / "data")
    run = train(TrainConfig(arch="resnet18", source_a=str(resnet18_sources[0]), source_b=str(resnet18_sources[1]),
                            data=str(data), out=str(root / "run"), method="lpft-a", merge_epochs=2, finetune_epochs=2,
                            batch_size=8, image_size=32, device="cpu", verify_samples=8, lr_head=1e-2))
    export_onnx_run(run, "fp32")
    return run, data


def test_runtime_reproduces_the_manifest_accuracy_from_image_files(file_run):
    from mmexport import runtime

    run, data = file_run
    manifest = json.loads((run / "manifest.json").read_text())
    classes = manifest["model"]["classes"]
    files = sorted((data / "test").glob("*/*.png"))
    truth = [classes.index(path.parent.name) for path in files]
    with runtime.load(run / "model.onnx") as predictor:
        assert predictor.info.preprocessing.resize == "shorter_side" and predictor.info.preprocessing.crop == "center"
        batched = predictor.predict([str(p) for p in files])
        one_by_one = np.concatenate([predictor.predict(str(p)).logits for p in files])
    np.testing.assert_array_equal(batched.logits, one_by_one)  # batched and single-image calls agree exactly
    accuracy = float(np.mean(batched.indices == np.asarray(truth)))
    assert accuracy == manifest["training"]["final"]["test"]["accuracy"]
    assert manifest["training"]["final"]["test"]["num_samples"] == len(files)


def test_metadata_only_snippet_from_the_readme_gives_the_same_answers(file_run):
    from mmexport import runtime

    run, data = file_run
    files = sorted((data / "test").glob("*/*.png"))
    snippet = _readme_snippet().replace('"model.onnx"', repr(str(run / "model.onnx")))
    with runtime.load(run / "model.onnx") as predictor:
        expected = predictor.predict([str(p) for p in files])
    labels = []
    for index, path in enumerate(files):
        namespace = {"IMAGE": str(path), "print": labels.append}
        exec(compile(snippet, "README snippet", "exec"), namespace)  # noqa: S102 - our own README's code
        np.testing.assert_allclose(namespace["logits"][0], expected.logits[index], rtol=0, atol=0)
    assert labels == expected.labels


def test_the_dicom_twin_of_the_snippet_gives_the_runtimes_answers(tmp_path):
    """docs/deploying.md's DICOM client, on real pydicom test files, against a model with a /2 block."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from mmexport import runtime
    from mmexport.runtime.dicom import DicomPixels
    from mmexport.runtime.modelinfo import ModelInfo
    from tests.runtime.test_hostile_runtime import tiny_onnx

    prep = Preprocessing.center_crop(16, MEAN, STD).with_dicom(DicomPixels.full_range())
    info = ModelInfo("resnet18", ("effusion", "nodule", "normal"), 16, MEAN, STD, preprocessing=prep)
    model = tiny_onnx(tmp_path / "model.onnx", info.to_metadata(), size=16, classes=3)
    snippet = _readme_snippet("metadata-only-dicom").replace('"model.onnx"', repr(str(model)))
    # CT and MR (MONOCHROME2, rescaled), CR MONOCHROME1 (inverted), YBR_FULL (converted to RGB)
    files = [get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "RG3_UNCR.dcm",
                                                  "SC_ybr_full_uncompressed.dcm")]
    with runtime.load(model) as predictor:
        expected = predictor.predict(files)
    assert len({tuple(row) for row in expected.logits}) == len(files)  # four different images, not one grey one
    labels = []
    for index, path in enumerate(files):
        namespace = {"DICOM_FILE": path, "print": labels.append}
        exec(compile(snippet, "deploying.md DICOM snippet", "exec"), namespace)  # noqa: S102 - our own docs' code
        np.testing.assert_allclose(namespace["logits"][0], expected.logits[index], rtol=0, atol=0)
    assert labels == expected.labels
    # A model without a DICOM section: the snippet stops rather than guess the pixels.
    plain = tiny_onnx(tmp_path / "plain.onnx", ModelInfo("resnet18", ("a", "b", "c"), 16, MEAN, STD,
                                                        preprocessing=Preprocessing.center_crop(16, MEAN, STD)).to_metadata(),
                      size=16, classes=3)
    with pytest.raises(SystemExit, match="no DICOM pipeline"):
        exec(compile(_readme_snippet("metadata-only-dicom").replace('"model.onnx"', repr(str(plain))),  # noqa: S102
                     "deploying.md DICOM snippet", "exec"), {"DICOM_FILE": files[0]})
