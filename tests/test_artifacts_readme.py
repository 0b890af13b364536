"""The README's registry table lists exactly the registry's files (it is the user's map of a run)."""

from __future__ import annotations

import re
from pathlib import Path

from mmexport import artifacts

README = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "docs" / "run-directory.md"


def test_readme_registry_table_lists_every_registry_file():
    text = README.read_text()
    section = text[text.index("**The registry**"):text.index("**Verification in two steps.**")]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            listed.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    expected = set()
    for row in artifacts.REGISTRY.values():
        expected.add(row.filename)
        if row.sidecar:
            expected.add(row.sidecar)
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))


# -- the metadata-only client of docs/deploying.md gives the runtime's pixels for every image the runtime takes --

DEPLOYING = README.parent / "deploying.md"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _snippet(name: str) -> str:
    """The python block between ``<!-- snippet:NAME -->`` and its closing marker, as a user copies it."""
    text = DEPLOYING.read_text()
    block = text.split(f"<!-- snippet:{name} -->", 1)[1].split(f"<!-- /snippet:{name} -->", 1)[0]
    return block.split("```python", 1)[1].rsplit("```", 1)[0]


def _image_files(root: Path) -> dict[str, Path]:
    """One file per colour mode the runtime accepts, each with content that tells the conversions apart."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    size = (23, 19)  # (width, height): not square, so the resize and the crop both act
    shape = (size[1], size[0])
    files: dict[str, Path] = {}

    def save(name: str, image, mode: str) -> None:
        files[mode if mode not in files else name] = path = root / name
        image.save(path)

    grey16 = rng.integers(0, 65536, shape, dtype=np.uint16)
    save("grey16.png", Image.fromarray(grey16), "I;16")
    save("grey16be.tif", Image.frombytes("I;16B", size, grey16.astype(">u2").tobytes()), "I;16B")
    wide = rng.integers(-20000, 90000, shape, dtype=np.int32)  # 32-bit: below 0 and above 65535 clip
    save("grey32.tif", Image.fromarray(wide), "I")
    rgb = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    save("palette.png", rgb.quantize(16), "P")
    transparent = rgb.quantize(16)
    transparent.info["transparency"] = 3
    save("palette-transparent.png", transparent, "P-transparency")
    save("rgba.png", Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8)), "RGBA")
    save("la.png", Image.fromarray(rng.integers(0, 256, (*shape, 2), dtype=np.uint8), "LA"), "LA")
    save("cmyk.jpg", Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8), "CMYK"), "CMYK")
    save("bilevel.png", Image.fromarray(rng.integers(0, 2, shape, dtype=np.uint8) * 255).convert("1"), "1")
    return files


def test_the_metadata_only_client_gives_the_runtimes_pixels_for_every_image_mode(tmp_path):
    """docs/deploying.md's plain numpy + PIL + onnxruntime client, executed as written, against mmexport.runtime."""
    import numpy as np
    from PIL import Image

    from mmexport import runtime
    from mmexport.runtime.modelinfo import ModelInfo
    from mmexport.runtime.preprocess import Preprocessing, preprocess_image
    from tests.runtime.test_hostile_runtime import tiny_onnx

    prep = Preprocessing.center_crop(16, MEAN, STD)
    model = tiny_onnx(tmp_path / "model.onnx", ModelInfo("resnet18", ("a", "b", "c"), 16, MEAN, STD,
                                                         preprocessing=prep).to_metadata(), size=16, classes=3)
    files = _image_files(tmp_path)
    for mode, path in files.items():  # each file really opens in the mode it stands for
        with Image.open(path) as image:
            assert image.mode == mode.split("-")[0], (path.name, image.mode)
            assert mode != "P-transparency" or "transparency" in image.info
    snippet = _snippet("metadata-only").replace('"model.onnx"', repr(str(model)))
    with runtime.load(model) as predictor:
        expected = predictor.predict([str(p) for p in files.values()])
    for index, (mode, path) in enumerate(files.items()):
        printed = []
        namespace = {"IMAGE": str(path), "print": printed.append}
        exec(compile(snippet, "deploying.md snippet", "exec"), namespace)  # noqa: S102 - our own docs' code
        pixels = namespace["preprocess"](str(path))
        np.testing.assert_array_equal(pixels[0], preprocess_image(str(path), prep), err_msg=mode)
        np.testing.assert_array_equal(namespace["logits"][0], expected.logits[index], err_msg=mode)
        assert printed == [expected.labels[index]]
    # what the snippet used to do (and what the runtime does not): Pillow's own conversion saturates 16-bit grey
    for mode in ("I;16", "I;16B", "I"):
        with Image.open(files[mode]) as image:
            naive = np.asarray(image.convert("RGB"))
        with Image.open(files[mode]) as image:
            rgb_v1 = np.asarray(namespace["to_rgb"](image))
        assert (naive != rgb_v1).any(axis=-1).mean() > 0.5 and (naive == 255).mean() > 0.5, mode
