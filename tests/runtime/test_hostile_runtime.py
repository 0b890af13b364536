"""The torch-free runtime against hostile inputs: images sized to exhaust memory, forged metadata, malformed batches.

Each case asserts one :class:`~mmexport.errors.MMExportError` line (the per-request error a server
returns), never another exception, and that the files read are left byte-identical. The images
are a few hundred bytes that *declare* sizes (65000x1, 1x1,000,000, 14000²): a reader that
decoded or resized them would take seconds and gigabytes, so each refusal is also timed and its
memory growth bounded.
"""

from __future__ import annotations

import io
import json
import math
import resource
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmexport.errors import CheckpointError, DataError, MMExportError
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import (
    MAX_ASPECT_RATIO,
    MAX_DECODED_PIXELS,
    MAX_RESIZED_PIXELS,
    MAX_SIZE,
    PREPROCESSING_FORMAT,
    Preprocessing,
    check_pixel_budget,
    is_dicom,
    model_pixels,
    preprocess_image,
    read_rgb,
    resized_size,
)
from tests.conftest import one_line, tree_hashes

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 8
CLASSES = ("amber", "blue", "green")
FILES = Preprocessing.center_crop(224, MEAN, STD)  # the image-file default: shorter side -> 256, crop 224
SMALL_FILES = Preprocessing.center_crop(32, MEAN, STD)  # shorter side -> 37, crop 32


# --------------------------------------------------------------------------- hostile images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, *, valid: bool = True) -> bytes:
    """A 1-bit grey PNG declaring width x height: a few hundred bytes for any size (rows of zeros compress well).

    ``valid=False`` gives a header-only file (an empty IDAT): enough for a reader that sizes images
    from the header, a decoding error for one that decodes first.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    stream = b""
    if valid:
        row = b"\x00" * (1 + (width + 7) // 8)
        packer = zlib.compressobj(9)
        stream = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
        stream += packer.compress(row * (height % 1000)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _refused_fast(call, fragment: str) -> str:
    """``call()`` raises one DataError line containing ``fragment``, in well under a second and 64 MB."""
    before, start = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(DataError) as exc:
        call()
    elapsed, grown = time.perf_counter() - start, _peak_rss_mb() - before
    message = one_line(exc)
    assert fragment in message, message
    assert elapsed < 2.0 and grown < 64, (elapsed, grown)
    return message


@pytest.mark.parametrize("width, height, prep, fragment", [
    # before: ~12.8 GB (resize of the shorter side 1 -> 256 makes 16,640,000 x 256)
    (65000, 1, FILES, "would be resized to 16640000x256"),
    # before: 36 s and 6.7 GB at 32 px
    (1, 1_000_000, SMALL_FILES, "would be resized to 37x37000000"),
    # an exact resize bounds the output, not the aspect ratio
    (21 * 3, 3, Preprocessing.exact(32, MEAN, STD), "aspect ratio of 21:1"),
    (10_000, 10_000, FILES, "over the decoding budget of 80 Mpx"),  # Pillow only warns at this size
])
def test_images_over_the_budget_are_refused_before_decoding(width, height, prep, fragment):
    data = png(width, height)
    assert len(data) < 64 * 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even Pillow's DecompressionBombWarning on the way
        _refused_fast(lambda: preprocess_image(data, prep), fragment)


def test_pillow_decompression_bomb_is_one_line_not_an_escaping_exception():
    # before: PIL.Image.DecompressionBombError escaped uncaught from predict
    data = png(14_000, 14_000)
    _refused_fast(lambda: preprocess_image(data, FILES), "over the decoding budget of 80 Mpx, refused before decoding")


def test_the_budget_is_checked_on_the_header_not_after_decoding():
    # header-only files: a reader that decoded first would fail with "cannot decode" instead
    for width, height, fragment in ((65000, 1, "65000x1 px would be resized"), (9000, 9000, "9000x9000 px (81.0 Mpx)"),
                                    (200_000, 200_000, "over the decoding budget")):  # Pillow's own check, first
        data = png(width, height, valid=False)
        message = _refused_fast(lambda data=data: read_rgb(data, FILES), fragment)
        assert "cannot decode" not in message


def test_arrays_and_pil_images_get_the_same_budget(tmp_path):
    _refused_fast(lambda: preprocess_image(np.zeros((1, 65000, 3), np.uint8), FILES), "would be resized")
    _refused_fast(lambda: preprocess_image(Image.new("L", (65000, 1)), FILES), "would be resized")
    _refused_fast(lambda: preprocess_image(np.zeros((0, 5, 3), np.uint8), FILES), "has no pixels")
    path = tmp_path / "wide.png"
    path.write_bytes(png(65000, 1))
    before = tree_hashes(tmp_path)
    _refused_fast(lambda: model_pixels(path, FILES), f"{path}: image of 65000x1 px")
    assert tree_hashes(tmp_path) == before


def test_the_budget_admits_real_medical_images_and_uses_the_pipelines_resize_rule():
    check_pixel_budget(8192, 8192, FILES)  # a digital mammogram / large radiograph
    check_pixel_budget(4096, 8192, Preprocessing.exact(MAX_SIZE, MEAN, STD))
    check_pixel_budget(20 * 100, 100, FILES)  # 20:1, the bound itself
    with pytest.raises(DataError):
        check_pixel_budget(20 * 100 + 1, 100, FILES)
    # the bound after the resize is the pipeline's own rule: exactly at the budget passes, one row more does not
    tall = Preprocessing("shorter_side", (4096,), "center", (64, 64), MEAN, STD)
    assert resized_size(10, 40, tall) == (4096, 16384) and 4096 * 16384 == MAX_RESIZED_PIXELS
    check_pixel_budget(10, 40, tall)
    with pytest.raises(DataError, match="would be resized to 4096x16793"):
        check_pixel_budget(10, 41, tall)
    assert MAX_DECODED_PIXELS < Image.MAX_IMAGE_PIXELS  # so Pillow never warns about an admitted image
    assert MAX_ASPECT_RATIO >= 3  # full-spine radiographs


def test_only_raster_formats_are_opened_and_only_the_first_frame():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Pillow's EPS plugin runs Ghostscript
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buffer, "ICO")
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(noise, "PNG")
    truncated = noise.getvalue()[: len(noise.getvalue()) // 2]
    for data in (eps, buffer.getvalue(), b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, truncated):
        _refused_fast(lambda data=data: preprocess_image(data, FILES), "cannot decode image")
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    rgb = read_rgb(gif.getvalue())
    assert rgb.size == (40, 30) and rgb.getpixel((0, 0))[0] > 200  # the first (red) frame


@pytest.mark.parametrize("source", ["/nonexistent/x.png", "."])
def test_unreadable_paths_are_one_line(source):
    with pytest.raises(DataError) as exc:
        preprocess_image(source, FILES)
    assert source in one_line(exc)


# --------------------------------------------------------------------------- a tiny deployable model


def tiny_onnx(path: Path, metadata: dict[str, str], size: int = SIZE, classes: int = len(CLASSES)) -> Path:
    """Global average pool + a 3 x classes matmul, with ``metadata`` as its metadata_props (no torch)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, classes)).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def good_metadata(prep: Preprocessing | None = None) -> dict[str, str]:
    prep = prep or Preprocessing.center_crop(SIZE, MEAN, STD)
    return ModelInfo("resnet18", CLASSES, SIZE, MEAN, STD, preprocessing=prep).to_metadata()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from mmexport import runtime

    path = tiny_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx", good_metadata())
    with runtime.load(path) as loaded:
        yield loaded


def test_the_tiny_model_serves_a_real_image(predictor):
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 140, 40)).save(buffer, "PNG")
    prediction = predictor.predict([buffer.getvalue(), np.zeros((12, 9, 3), np.uint8)])
    assert prediction.logits.shape == (2, 3) and np.isfinite(prediction.logits).all()


@pytest.mark.parametrize("images, fragment", [
    (np.zeros((0, 3, SIZE, SIZE), np.float32), "empty batch"),  # before: ValueError (np.concatenate)
    (np.zeros((0, SIZE, SIZE, 3), np.uint8), "no images given"),
    ([], "no images given"),
    (np.full((1, 3, SIZE, SIZE), np.nan, np.float32), "NaN or Inf"),
    (np.full((2, 3, SIZE, SIZE), np.inf, np.float32), "NaN or Inf"),
    (np.zeros((1, 3, SIZE + 1, SIZE), np.float32), "already-normalised batch"),
    ([png(65000, 1)], "aspect ratio of 65000:1"),  # the Triton image_bytes path: Predictor.preprocess
    ([png(14_000, 14_000)], "refused before decoding"),
    ([b"\x00" * 16], "cannot decode image"),
    ([object()], "cannot read an image from object"),
])
def test_malformed_requests_are_one_line(predictor, images, fragment):
    with pytest.raises(DataError) as exc:
        predictor.predict(images)
    assert fragment in one_line(exc)


def test_empty_batches_are_refused_at_every_entry(predictor):
    empty = np.zeros((0, 3, SIZE, SIZE), np.float32)
    with pytest.raises(DataError, match="empty batch"):
        predictor.logits(empty)
    with pytest.raises(DataError, match="is empty") as exc:
        predictor.runner.infer(empty)
    one_line(exc)
    # a caller that skips the input checks gets ONNX Runtime's refusal as one line too
    with pytest.raises(DataError, match="ONNX Runtime could not run this batch") as exc:
        predictor.runner.infer(np.zeros((1, 3, SIZE + 1, SIZE), np.float32), check_inputs=False)
    one_line(exc)


# --------------------------------------------------------------------------- forged metadata


def _block(**change) -> str:
    return json.dumps({**Preprocessing.center_crop(SIZE, MEAN, STD).to_dict(), **change})


FORGED = [
    ("classes", '"abcde"', "classes must be a list of names, got str"),
    ("classes", "[NaN]", "malformed JSON"),
    ("classes", "[" * 5000 + "]" * 5000, "nested"),
    ("classes", '["a", "a\\u2028b", "c"]', "class 1"),
    ("mean", "[0, 0, 0]", "mean [0.0, 0.0, 0.0] differs from the preprocessing block's"),
    ("std", "[1e400, 1, 1]", "field std: malformed JSON"),
    ("mean", '"abc"', "mean must be a list of 3 numbers"),
    ("image_size", str(10**12), "image_size must be a decimal integer from 1 to 8192"),
    ("image_size", "0", "image_size must be a decimal integer"),
    ("image_size", " 8", "image_size must be a decimal integer"),
    ("image_size", "9" * 5000, "image_size must be a decimal integer"),
    ("image_size", "16", "preprocessing produces (8, 8), but the model takes 16 px"),
    ("arch", "", "arch must be a non-empty name"),
    ("arch", "resnet18\nx", "arch must be a non-empty name"),
    ("layout", "NHWC", "channel_order/layout must be RGB/NCHW"),
    ("preprocessing", _block(std=[float("nan"), 1, 1]), "malformed JSON (NaN"),
    ("preprocessing", _block(antialias=False), "antialias must be true"),
    ("preprocessing", _block(antialias="yes"), "antialias must be true"),
    ("preprocessing", _block(resize_size=[100000]), "resize_size values must be integers from 1 to 8192"),
    ("preprocessing", _block(resize_size=[10**12]), "resize_size values must be integers from 1 to 8192"),
    ("preprocessing", _block(resize_size=[10**400]), "resize_size values must be integers from 1 to 8192"),
    ("preprocessing", _block(crop_size=[0, 0]), "crop_size values must be integers from 1 to 8192"),
    ("preprocessing", _block(crop_size=[SIZE, 20]), "crop_size [8, 20] is larger than the resize output"),
    ("preprocessing", _block(resize_size=[True]), "resize_size values must be integers"),
    ("preprocessing", _block(scale=0), "scale must be finite and from 0.001"),
    ("preprocessing", _block(scale="255"), "scale must be a number"),
    ("preprocessing", _block(std=[1e-30, 1, 1]), "std must be finite and from 1e-06"),
    ("preprocessing", _block(mean=[[1], [2], [3]]), "mean must be a list of 3 numbers"),
    ("preprocessing", _block(extra_step="sharpen"), "unknown field(s) 'extra_step'"),
    ("preprocessing", json.dumps({k: v for k, v in json.loads(_block()).items() if k != "antialias"}),
     "missing field(s) antialias"),
    ("preprocessing", '{"format": "mmexport-preprocessing/1", "x": ' + "[" * 100 + "]" * 100 + "}", "nested deeper"),
    ("preprocessing", '"just a string"', "must be a JSON object"),
]


@pytest.mark.parametrize("field, value, fragment", FORGED, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(FORGED)])
def test_forged_metadata_is_refused_in_one_line_and_the_file_is_untouched(tmp_path, field, value, fragment):
    from mmexport import runtime

    path = tiny_onnx(tmp_path / "model.onnx", {**good_metadata(), field: value})
    before = tree_hashes(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        runtime.load(path)
    message = one_line(exc)
    assert fragment in message and str(path) in message, message
    assert len(message) < 600
    assert tree_hashes(tmp_path) == before


def test_metadata_fields_must_be_text_and_present():
    metadata = good_metadata()
    with pytest.raises(CheckpointError, match="field image_size must be text, got int"):
        ModelInfo.from_metadata({**metadata, "image_size": 8}, "sidecar")
    with pytest.raises(CheckpointError, match="has no field classes"):
        ModelInfo.from_metadata({k: v for k, v in metadata.items() if k != "classes"}, "sidecar")
    with pytest.raises(CheckpointError, match="must be a map"):
        ModelInfo.from_metadata(["arch"], "sidecar")  # type: ignore[arg-type]


@pytest.mark.parametrize("change, fragment", [
    ({"classes": "abcde"}, "classes must be a list of names, got str"),
    ({"classes": ("a", 3)}, "class 1 must be a string"),
    ({"image_size": True}, "image_size must be an integer from 1 to 8192, got True"),
    ({"image_size": 10**5000}, "an integer of"),
    ({"mean": (math.nan, 0, 0)}, "mean must be finite"),
    ({"std": (1.0, 1.0)}, "std must be a list of 3 numbers"),
    ({"arch": None}, "arch must be a non-empty name"),
    ({"preprocessing": {"resize": "exact"}}, "preprocessing must be a preprocessing block"),
])
def test_model_info_is_checked_however_it_is_made(change, fragment):
    fields = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": MEAN, "std": STD, **change}
    with pytest.raises(CheckpointError) as exc:
        ModelInfo(**fields)
    assert fragment in one_line(exc)


# --------------------------------------------------------------------------- training reads with the same reader


def test_training_refuses_images_over_the_budget_and_unshippable_class_names(tmp_path):
    from mmexport.torchside.data.formats import check_image, load_file_task
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "data", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}}, size=24)
    (root / "train" / "a" / "wide.png").write_bytes(png(65000, 1))
    assert "would be resized to" in check_image(root / "train" / "a" / "wide.png", FILES)
    before = tree_hashes(tmp_path)
    with pytest.raises(DataError) as exc:
        load_file_task(str(root), None)  # 1 of 4 train images skipped: over max_bad
    message = one_line(exc)
    assert "wide.png (image of 65000x1 px would be resized to 16640000x256" in message, message
    assert tree_hashes(tmp_path) == before
    # with room for a bad image, it is skipped and counted, its reason recorded
    task = load_file_task(f"{root}?max_bad=0.5", None)
    assert task.description["skipped"]["train"]["unreadable"] == 1
    (root / "train" / "a" / "wide.png").unlink()
    (root / "train" / "b").rename(root / "train" / "b\u2028c")
    (root / "val" / "b").rename(root / "val" / "b\u2028c")
    with pytest.raises(DataError) as exc:
        load_file_task(str(root), None)
    assert "class names: class 1" in one_line(exc)


# --------------------------------------------------------------------------- property: any block, any image

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=8,
)
# sizes that are valid but cheap, plus the edges and the absurd (8192 itself is covered above: too slow here)
size_value = st.integers(1, 72) | st.sampled_from([0, -1, 8193, 100_000, 10**12, 2**63, 10**400]) | junk
sizes = st.lists(size_value, min_size=0, max_size=3) | junk
number = (st.floats(-2, 2) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**400, 10**400)
          | st.sampled_from([0.0, 1e-7, 255.0, 1e300]) | junk)
valid_sizes = st.lists(st.integers(1, 72), min_size=1, max_size=2)
FIELD_VALUES = {  # each field: plausible values, then hostile ones
    "resize": st.sampled_from(["shorter_side", "exact", "none", "stretch", ""]) | junk,
    "resize_size": valid_sizes | sizes,
    "crop": st.sampled_from(["center", "none", "random"]) | junk,
    "crop_size": st.none() | valid_sizes | sizes,
    "mean": st.lists(st.floats(-2, 2), min_size=3, max_size=3) | st.lists(number, min_size=3, max_size=3) | junk,
    "std": st.lists(st.floats(0.01, 3), min_size=3, max_size=3) | st.lists(number, min_size=3, max_size=3) | junk,
    "scale": st.floats(1, 1000) | number,
    "antialias": st.just(True) | junk,
    "interpolation": st.just("bilinear") | junk,
    "color": st.just("rgb-v1") | junk,
    "layout": st.just("NCHW") | junk,
    "dtype": st.just("float32") | junk,
}


@st.composite
def blocks(draw):
    base = draw(st.sampled_from([
        Preprocessing.center_crop(draw(st.integers(1, 56)), MEAN, STD).to_dict(),
        Preprocessing.exact(draw(st.integers(1, 64)), MEAN, STD).to_dict(),
    ]))
    for name in draw(st.sets(st.sampled_from(sorted(FIELD_VALUES)), max_size=4)):
        base[name] = draw(FIELD_VALUES[name])
    if draw(st.integers(0, 5)) == 5:  # a missing field
        del base[draw(st.sampled_from(sorted(base)))]
    if draw(st.integers(0, 5)) == 5:  # an unknown field (or a known one overwritten with junk)
        base[draw(st.text(max_size=6))] = draw(junk)
    return base


# (width, height): small real images, slivers, and sizes far over the budget (header-only files)
image_sizes = st.tuples(st.integers(1, 80), st.integers(1, 80)) | st.sampled_from(
    [(65000, 1), (1, 1_000_000), (9000, 9000), (100_000, 100_000), (2**31 - 1, 1), (300, 10), (10, 250)])


def _within_budget(width: int, height: int, prep: Preprocessing) -> bool:
    resized = resized_size(width, height, prep)
    return (width * height <= MAX_DECODED_PIXELS and resized[0] * resized[1] <= MAX_RESIZED_PIXELS
            and max(width, height) <= MAX_ASPECT_RATIO * min(width, height))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=blocks(), size=image_sizes, as_json=st.booleans(), seed=st.integers(0, 2**16))
def test_any_block_validates_and_preprocesses_within_budget_or_is_refused_in_one_line(block, size, as_json, seed):
    try:
        text = json.dumps(block)
    except (ValueError, OverflowError):  # an integer beyond json's str() limit: only the dict path can carry it
        text, as_json = None, False
    try:
        prep = Preprocessing.from_json(text) if as_json else Preprocessing.from_dict(block)
    except CheckpointError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 2000, message
        event("block refused")
        return
    # validated: every field is what the documentation says
    assert all(isinstance(v, int) and 1 <= v <= MAX_SIZE for v in prep.resize_size + (prep.crop_size or ()))
    assert all(math.isfinite(v) for v in prep.mean + prep.std + (prep.scale,)) and min(prep.std) > 0
    assert prep.antialias is True and Preprocessing.from_json(prep.to_json()) == prep
    width, height = size
    small = width * height <= 80 * 80
    if small:
        image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        source = image if seed % 2 else Image.fromarray(image)
    else:
        source = png(width, height, valid=False)
    try:
        out = preprocess_image(source, prep)
    except DataError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        if not _within_budget(width, height, prep):
            assert "budget" in message or "aspect ratio" in message, message  # never "cannot decode"
        else:
            assert small and "smaller than the" in message, message  # a crop larger than the resized image
        event("block valid, image refused")
        return
    assert small and _within_budget(width, height, prep)
    assert out.shape == (3, *prep.output_size) and out.dtype == np.float32 and np.isfinite(out).all()
    event("block valid, image preprocessed")


def test_documented_block_format_is_the_one_validated():
    assert json.loads(Preprocessing.center_crop(224, MEAN, STD).to_json())["format"] == PREPROCESSING_FORMAT
    with pytest.raises(MMExportError):
        Preprocessing.from_dict({"format": PREPROCESSING_FORMAT})


json_text = junk.map(lambda value: json.dumps(value)) | st.text(max_size=20)


@settings(max_examples=150, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(["arch", "classes", "image_size", "mean", "std", "channel_order", "layout",
                                                "preprocessing", "precision", "weights_sha256", "model_info_format"]),
                               json_text | junk, max_size=3))
def test_any_model_metadata_is_read_or_refused_in_one_line(changes):
    metadata = {**good_metadata(), **changes}
    try:
        info = ModelInfo.from_metadata(metadata, "model.onnx")
    except CheckpointError as exc:
        message = str(exc)
        assert message.startswith("model.onnx: ") and "\n" not in message and len(message) < 2000, message
        return
    assert info.preprocessing.mean == info.mean and info.preprocessing.output_size == (info.image_size,) * 2
    assert ModelInfo.from_metadata(info.to_metadata(), "again") == info


def _dual_personality():
    """A DICOM Part 10 file whose 128-byte preamble is a TIFF header (as radiography systems write them)."""
    tiff = io.BytesIO()
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(tiff, format="TIFF")
    data = tiff.getvalue()[:128].ljust(128, b"\0") + b"DICM" + b"\x02\x00\x10\x00UI\x00\x00"
    return data


@pytest.mark.parametrize("as_file", [False, True])
def test_a_dicom_is_recognised_by_its_content_before_any_other_decoder(tmp_path, as_file):
    """Before: a DICOM carrying a TIFF header was decoded as that TIFF (raw stored values, no rescale, no window)."""
    data = _dual_personality()
    source = data
    if as_file:
        source = tmp_path / "radiograph.tif"  # the extension says TIFF; the content says DICOM
        source.write_bytes(data)
    with pytest.raises(DataError) as excinfo:
        read_rgb(source)
    assert "a DICOM file" in one_line(excinfo)
    assert is_dicom(data) and not is_dicom(data[:128] + b"DICX")
