"""Target datasets: synthetic specs and ImageFolder trees (mmexport.torchside.data.load_task)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmexport.torchside.data import synthetic
from mmexport.torchside.data import IMAGENET_MEAN, IMAGENET_STD, load_task
from mmexport.errors import DataError
from tests.conftest import one_line, write_image_folder

TARGET_CLASSES = ["nevus", "melanoma", "seborrheic-keratosis", "blue-nevus", "vascular"]
SMALL = "synthetic:target?n_train=12&n_val=7&n_test=6&seed=3"

MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float64)
STD = np.asarray(IMAGENET_STD, dtype=np.float64)




def normalised(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC pixels -> the CHW float values load_task should produce, computed independently."""
    return ((pixels.astype(np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


# --------------------------------------------------------------------------- synthetic specs


def test_synthetic_options_applied():
    task = load_task(SMALL, image_size=24)
    assert task.splits == ("train", "val", "test")
    assert task.image_size == 24
    assert (task.mean, task.std) == (IMAGENET_MEAN, IMAGENET_STD)
    for split, count in (("train", 12), ("val", 7), ("test", 6)):
        images, labels = task.arrays(split)
        assert images.shape == (count, 3, 24, 24) and images.dtype == np.float32
        assert labels.shape == (count,) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() < 5
    d = task.description
    assert (d["kind"], d["task"], d["source"]) == ("synthetic", "target", SMALL)
    assert (d["n_train"], d["n_val"], d["n_test"], d["seed"], d["image_size"]) == (12, 7, 6, 3, 24)
    assert d["classes"] == TARGET_CLASSES


def test_synthetic_defaults_and_missing_test_split():
    target = load_task("synthetic:target")  # nothing is generated until a split is read
    assert target.image_size == 64
    assert target.splits == ("train", "val", "test")
    assert (target.description["n_train"], target.description["n_val"], target.description["n_test"]) == (300, 300, 300)
    assert target.description["seed"] == 0

    pigment = load_task("synthetic:pigment?n_train=4&n_val=4", image_size=16)
    assert pigment.splits == ("train", "val")  # the source tasks have no test split by default
    with pytest.raises(DataError) as exc:
        pigment.dataset("test")
    message = one_line(exc)
    assert "'test'" in message and "synthetic:pigment" in message


@pytest.mark.parametrize(
    "task, classes",
    [
        ("target", TARGET_CLASSES),
        ("pigment", ["light-brown", "dark-brown", "blue-grey", "red-pink"]),
        ("border", ["round-regular", "oval-regular", "irregular", "multilobed"]),
    ],
)
def test_synthetic_class_names_in_order(task, classes):
    data = load_task(f"synthetic:{task}?n_train=6&n_val=4&n_test=0", image_size=16)
    assert data.classes == classes
    assert data.num_classes == len(classes)
    assert data.description["classes"] == classes
    # label i is classes[i]: the first images of a split are forced to classes 0..K-1
    _, labels = data.arrays("train", limit=len(classes))
    assert labels.tolist() == list(range(len(classes)))


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("synthetic:target?foo=1", ["'foo'", "n_train", "seed"]),
        ("synthetic:target?image_size=32", ["'image_size'"]),
        ("synthetic:target?n_train=abc", ["n_train", "'abc'"]),
        ("synthetic:target?n_train=1.5", ["n_train", "'1.5'"]),
        ("synthetic:target?seed=%0Afoo", ["seed"]),  # a newline in the value must not break the line
        ("synthetic:target?n_val=", ["n_val"]),
        ("synthetic:target?n_val=0", ["n_val"]),
        ("synthetic:target?n_train=-3", ["n_train"]),
        ("synthetic:lesions", ["'lesions'", "pigment, border, target"]),
        ("synthetic:", ["pigment, border, target"]),
    ],
)
def test_synthetic_bad_specs(spec, needles):
    with pytest.raises(DataError) as exc:
        load_task(spec)
    message = one_line(exc)
    for needle in needles:
        assert needle in message, message


def test_synthetic_negative_seed_rejected_when_parsed():
    with pytest.raises(DataError) as exc:
        load_task("synthetic:target?n_train=8&n_val=8&seed=-1")
    assert "seed" in one_line(exc)


def test_synthetic_normalisation_matches_generator_pixels():
    task = load_task("synthetic:target?n_train=6&n_val=5&n_test=0&seed=2", image_size=20)
    images, labels = task.arrays("val")
    raw, raw_labels = synthetic.generate("target", 5, image_size=20, seed=2, split="val")
    np.testing.assert_array_equal(labels, raw_labels)
    expected = np.stack([normalised(p) for p in raw])
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)


def test_synthetic_known_pixel_values(monkeypatch):
    pixels = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 0, 51  # R = 1.0, G = 0.0, B = 0.2

    def fake_generate(task, n, *, image_size, seed, split):
        return pixels[:n], np.array([0, 1][:n], dtype=np.int64)

    monkeypatch.setattr(synthetic, "generate", fake_generate)
    image, label = load_task("synthetic:target?n_train=2&n_val=2", image_size=16).dataset("train")[1]
    assert label == 1 and image.shape == (3, 16, 16)
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(image[channel], torch.full((16, 16), value), rtol=0, atol=1e-6)


def test_augment_flips_only_when_asked():
    task = load_task("synthetic:target?n_train=3&n_val=3&n_test=0", image_size=24)
    base = task.dataset("train")[0][0]
    variants = {
        "identity": base,
        "hflip": base.flip(-1),
        "vflip": base.flip(-2),
        "both": base.flip(-1).flip(-2),
    }
    # the test is only meaningful if the flips are distinguishable from each other
    assert len({tuple(v.flatten().tolist()) for v in variants.values()}) == 4

    torch.manual_seed(0)
    plain = task.dataset("train", augment=False)
    for _ in range(20):
        assert torch.equal(plain[0][0], base)

    torch.manual_seed(0)
    augmented = task.dataset("train", augment="legacy")  # the flips-only preset (augment=True is now "light")
    seen = set()
    for _ in range(60):
        image, label = augmented[0]
        assert label == plain[0][1]
        matches = [name for name, v in variants.items() if torch.equal(image, v)]
        assert len(matches) == 1, "augmentation did something other than a flip"
        seen.add(matches[0])
    assert seen == set(variants)  # 60 draws: every flip combination appears (p(miss) < 1e-7)


def test_arrays_deterministic_and_limited():
    first = load_task(SMALL, image_size=16)
    second = load_task(SMALL, image_size=16)
    a_images, a_labels = first.arrays("train")
    again_images, again_labels = first.arrays("train")
    b_images, b_labels = second.arrays("train")
    np.testing.assert_array_equal(a_images, again_images)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    np.testing.assert_array_equal(a_labels, again_labels)

    limited, limited_labels = first.arrays("train", limit=5)
    assert limited.shape == (5, 3, 16, 16)
    np.testing.assert_array_equal(limited, a_images[:5])
    np.testing.assert_array_equal(limited_labels, a_labels[:5])
    assert first.arrays("val", limit=100)[0].shape[0] == 7  # limit above the split size

    other_seed, _ = load_task(SMALL.replace("seed=3", "seed=4"), image_size=16).arrays("train")
    assert not np.array_equal(other_seed, a_images)
    other_split, _ = first.arrays("test")
    assert not np.array_equal(other_split, a_images[:6])


def test_loader_shuffle_is_seeded():
    task = load_task(SMALL, image_size=16)

    def order(seed):
        return torch.cat([labels for _, labels in task.loader("train", 4, shuffle=True, seed=seed)]).tolist()

    def images(seed):
        return torch.cat([x for x, _ in task.loader("train", 4, shuffle=True, seed=seed)])

    assert order(1) == order(1)
    assert torch.equal(images(1), images(1))
    assert not torch.equal(images(1), images(2))
    plain = torch.cat([x for x, _ in task.loader("train", 5)])
    np.testing.assert_array_equal(plain.numpy(), task.arrays("train")[0])


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_classes_sorted_and_labels(tmp_path):
    root = write_image_folder(
        tmp_path / "data",
        {"train": {"zeta": 4, "alpha": 2, "mid": 3}, "val": {"mid": 2, "zeta": 1, "alpha": 1}},
    )
    task = load_task(str(root), image_size=16)
    assert task.classes == ["alpha", "mid", "zeta"]
    assert task.splits == ("train", "val")
    _, labels = task.arrays("train")
    assert np.bincount(labels, minlength=3).tolist() == [2, 3, 4]
    _, val_labels = task.arrays("val")
    assert np.bincount(val_labels, minlength=3).tolist() == [1, 2, 1]
    d = task.description
    assert d["kind"] == "imagefolder"
    assert d["source"] == str(root.absolute())
    assert d["classes"] == ["alpha", "mid", "zeta"]
    assert d["counts"] == {"train": 9, "val": 4}
    assert d["image_size"] == 16
    with pytest.raises(DataError):
        task.dataset("test")


def test_imagefolder_optional_test_split_counted(tmp_path):
    root = write_image_folder(
        tmp_path / "data",
        {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 2, "b": 3}},
    )
    task = load_task(str(root), image_size=16)
    assert task.splits == ("train", "val", "test")
    assert task.description["counts"] == {"train": 5, "val": 2, "test": 5}
    assert task.arrays("test")[1].tolist() == [0, 0, 1, 1, 1]


def test_imagefolder_image_size_applied(image_folder):
    small = load_task(str(image_folder), image_size=24)
    images, _ = small.arrays("val")
    assert images.shape == (6, 3, 24, 24)
    augmented, _ = small.dataset("train", augment=True)[0]
    assert augmented.shape == (3, 24, 24)

    default = load_task(str(image_folder))
    assert default.image_size == 224 and default.description["image_size"] == 224
    assert default.dataset("val")[0][0].shape == (3, 224, 224)  # 40 px images are resized up


def test_imagefolder_normalisation(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    solid = np.empty((40, 40, 3), dtype=np.uint8)
    solid[...] = (255, 0, 51)
    Image.fromarray(solid).save(root / "val" / "b" / "0.png")
    image, label = load_task(str(root), image_size=16).dataset("val")[1]
    assert label == 1 and image.shape == (3, 16, 16)
    expected = torch.from_numpy(normalised(solid[:16, :16])).float()
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)


def _no_images(root: Path) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    return root


def _val_without_images(root: Path) -> Path:
    write_image_folder(root, {"train": {"a": 2, "b": 2}})
    (root / "val" / "a").mkdir(parents=True)
    (root / "val" / "b").mkdir()
    return root


def _empty_class_folder(root: Path) -> Path:
    write_image_folder(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "empty").mkdir()
    (root / "val" / "empty").mkdir()
    return root


def _file_instead_of_dir(root: Path) -> Path:
    root.write_bytes(b"not a dataset")
    return root


SETUPS = {
    "missing directory": (lambda root: root, lambda root: [str(root)]),
    "file instead of directory": (_file_instead_of_dir, lambda root: [str(root), "directory"]),
    "no train/": (
        lambda root: write_image_folder(root, {"val": {"a": 1, "b": 1}}),
        lambda root: [str(root), "train/"],
    ),
    "no val/": (
        lambda root: write_image_folder(root, {"train": {"a": 1, "b": 1}}),
        lambda root: [str(root), "val/"],
    ),
    "no images at all": (_no_images, lambda root: [str(root / "train")]),
    "val split with empty class folders": (_val_without_images, lambda root: [str(root / "val")]),
    "class missing from val": (
        lambda root: write_image_folder(root, {"train": {"a": 2, "b": 2, "c": 1}, "val": {"a": 1, "b": 1}}),
        lambda root: [str(root / "val"), "c"],
    ),
    "class in val unknown to train": (
        lambda root: write_image_folder(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1, "zz": 1}}),
        lambda root: [str(root / "val"), "zz"],
    ),
    "class missing from test": (
        lambda root: write_image_folder(
            root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 1}}
        ),
        lambda root: [str(root / "test"), "b"],
    ),
    "empty class folder": (_empty_class_folder, lambda root: [str(root / "train"), "empty"]),
    "single class": (
        lambda root: write_image_folder(root, {"train": {"only": 3}, "val": {"only": 1}}),
        lambda root: [str(root / "train"), "2 classes"],
    ),
}


@pytest.mark.parametrize("case", list(SETUPS))
def test_imagefolder_bad_inputs(tmp_path, case):
    setup, needles = SETUPS[case]
    root = setup(tmp_path / "data")
    with pytest.raises(DataError) as exc:
        load_task(str(root), image_size=16)
    message = one_line(exc)
    for needle in needles(root):
        assert needle in message, message


def test_imagefolder_corrupt_image_is_a_data_error(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError) as exc:
        load_task(str(root), image_size=16).arrays("train")
    assert str(bad) in one_line(exc)


@pytest.mark.parametrize("kind, size", [("folder", -5), ("folder", 0), ("synthetic", 0)])
def test_invalid_image_size_rejected(image_folder, kind, size):
    spec = str(image_folder) if kind == "folder" else "synthetic:target?n_train=8&n_val=8"
    with pytest.raises(DataError) as exc:
        load_task(spec, image_size=size)
    assert "image" in one_line(exc)


def test_labels_match_arrays_without_decoding(tmp_path):
    synthetic_task = load_task(SMALL, image_size=16)
    folder = load_task(
        str(write_image_folder(tmp_path / "data", {"train": {"b": 2, "a": 3}, "val": {"a": 1, "b": 2}})), image_size=16
    )
    for task in (synthetic_task, folder):
        for split in task.splits:
            labels = task.labels(split)
            assert labels.dtype == np.int64
            np.testing.assert_array_equal(labels, task.arrays(split)[1])
    assert folder.labels("train").tolist() == [0, 0, 0, 1, 1]
