"""Tests of the seeded synthetic lesion generator (mmexport.torchside.data.synthetic)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from mmexport.torchside.data import synthetic
from mmexport.errors import DataError
from mmexport.torchside.data.synthetic import TASKS, class_names, generate, write_imagefolder


# ---------------------------------------------------------------- helpers: tiny image analysis
def _minmax_filter(x: np.ndarray, k: int, fn) -> np.ndarray:
    """Separable k x k max/min filter over axes 1, 2 (edge padded)."""
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p)), mode="edge")
    h, w = x.shape[1:]
    rows = xp[:, :, :w]
    for j in range(1, k):
        rows = fn(rows, xp[:, :, j:j + w])
    out = rows[:, :h]
    for i in range(1, k):
        out = fn(out, rows[:, i:i + h])
    return out


def _lesion_mask(images: np.ndarray) -> np.ndarray:
    """Lesion pixels: hair-free luminance (grey opening) below a per-image Otsu threshold."""
    lum = images.astype(np.float64).mean(-1)
    lum = _minmax_filter(_minmax_filter(lum, 3, np.maximum), 3, np.minimum)
    n, size = len(lum), lum.shape[1]
    flat = np.clip(lum.reshape(n, -1).astype(np.int64), 0, 255)
    hist = np.bincount((flat + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    w0, mu = np.cumsum(hist, 1), np.cumsum(hist * np.arange(256), 1)
    between = (mu[:, -1:] * w0 - mu * w0[:, -1:]) ** 2 / np.maximum(w0 * (w0[:, -1:] - w0), 1)
    thr = np.argmax(between, 1)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    disc = c[:, None] ** 2 + c[None, :] ** 2 < 0.95 ** 2     # ignore vignetted corners
    return (lum <= thr[:, None, None]) & disc


def _colour_features(images: np.ndarray) -> np.ndarray:
    """log(mean lesion RGB / mean skin RGB): colour relative to the image's own skin."""
    m = _lesion_mask(images)[..., None]
    x = images.astype(np.float64)
    lesion = (x * m).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1)
    skin = (x * ~m).sum((1, 2)) / np.maximum((~m).sum((1, 2)), 1)
    return np.log((lesion + 1) / (skin + 1))


def _shape_features(images: np.ndarray) -> np.ndarray:
    """Elongation, perimeter/sqrt(area), and spread of the whitened boundary radius."""
    m = _lesion_mask(images)
    size = m.shape[1]
    yy, xx = np.mgrid[0:size, 0:size]
    area = np.maximum(m.sum((1, 2)), 1).astype(float)
    dy = yy - ((m * yy).sum((1, 2)) / area)[:, None, None]
    dx = xx - ((m * xx).sum((1, 2)) / area)[:, None, None]
    sxx, syy, sxy = ((m * a * b).sum((1, 2)) / area for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    half_tr, disc = (sxx + syy) / 2, np.sqrt(np.maximum(((sxx - syy) / 2) ** 2 + sxy ** 2, 0))
    elong = np.log((half_tr + disc + 1e-3) / (half_tr - disc + 1e-3)) / 2
    p = np.pad(m, ((0, 0), (1, 1), (1, 1)))
    edge = m & ~(p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:])
    perim = np.maximum(edge.sum((1, 2)), 1)
    cov = np.stack([np.stack([sxx, sxy], -1), np.stack([sxy, syy], -1)], -2)
    inv = np.linalg.inv(cov + 1e-6 * np.eye(2))
    r = np.sqrt(inv[:, 0, 0, None, None] * dx * dx + 2 * inv[:, 0, 1, None, None] * dx * dy
                + inv[:, 1, 1, None, None] * dy * dy)     # an ellipse becomes a circle
    mean_r = (edge * r).sum((1, 2)) / perim
    spread = np.sqrt((edge * (r - mean_r[:, None, None]) ** 2).sum((1, 2)) / perim) / np.maximum(mean_r, 1e-3)
    return np.stack([elong, perim / np.sqrt(area), spread], 1)


def _nearest_centroid(f_train: np.ndarray, y_train: np.ndarray, n_classes: int):
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-9
    cent = np.stack([((f_train - mu) / sd)[y_train == c].mean(0) for c in range(n_classes)])
    return lambda f: np.argmin(((((f - mu) / sd)[:, None] - cent[None]) ** 2).sum(-1), 1)


@pytest.fixture(scope="module")
def source_features():
    """Colour and shape features and labels of 300 train + 300 val images of each source task."""
    out = {}
    for task in ("pigment", "border"):
        for split in ("train", "val"):
            images, labels = generate(task, 300, seed=3, split=split)
            out[task, split] = (_colour_features(images), _shape_features(images), labels)
    return out


# ---------------------------------------------------------------- API, validation
def test_class_names():
    assert TASKS == ("pigment", "border", "target")
    assert class_names("pigment") == ["light-brown", "dark-brown", "blue-grey", "red-pink"]
    assert class_names("border") == ["round-regular", "oval-regular", "irregular", "multilobed"]
    target = class_names("target")
    assert len(target) == 5 and len(set(target)) == 5 and target[0] == "nevus"
    class_names("target").append("x")   # callers get a copy
    assert len(class_names("target")) == 5
    with pytest.raises(DataError) as e:
        class_names("x")
    assert str(e.value) == "unknown synthetic task 'x'; choose one of pigment, border, target"


@pytest.mark.parametrize("kwargs", [
    dict(task="x", n=4), dict(task="target", n=0), dict(task="target", n=-3),
    dict(task="target", n=2.0), dict(task="target", n=True), dict(task="target", n=4, split="dev"),
    dict(task="target", n=4, image_size=15), dict(task="target", n=4, seed=-1),
])
def test_generate_rejects_bad_arguments(kwargs):
    task, n = kwargs.pop("task"), kwargs.pop("n")
    with pytest.raises(DataError) as e:
        generate(task, n, **kwargs)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- determinism and layout
def test_deterministic_and_prefix_stable():
    a_img, a_lab = generate("target", 12, seed=7)
    b_img, b_lab = generate("target", 12, seed=7)
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    p_img, p_lab = generate("target", 5, seed=7)
    np.testing.assert_array_equal(p_img, a_img[:5])
    np.testing.assert_array_equal(p_lab, a_lab[:5])
    # across the internal rendering chunk boundary (64 images at 128 px)
    big, _ = generate("border", 70, image_size=128, seed=1)
    small, _ = generate("border", 66, image_size=128, seed=1)
    np.testing.assert_array_equal(big[:66], small)


def test_seed_split_and_task_change_the_images():
    base, _ = generate("target", 8, seed=0, split="train")
    for other in (generate("target", 8, seed=1, split="train")[0],
                  generate("target", 8, seed=0, split="val")[0],
                  generate("target", 8, seed=0, split="test")[0],
                  generate("pigment", 8, seed=0, split="train")[0]):
        # every single image differs, not just the set
        assert all(not np.array_equal(base[i], other[i]) for i in range(8))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", [16, 64, 100])
def test_shapes_dtypes_and_every_class_present(task, size):
    k = len(class_names(task))
    images, labels = generate(task, k, image_size=size, seed=2, split="val")
    assert images.shape == (k, size, size, 3) and images.dtype == np.uint8
    assert labels.shape == (k,) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.arange(k))      # first k images: one per class
    images, labels = generate(task, 3 * k, image_size=size, seed=2)
    assert labels.min() >= 0 and labels.max() < k and set(labels.tolist()) == set(range(k))
    assert images.std() > 5    # not a blank canvas


# ---------------------------------------------------------------- label structure
def test_target_is_imbalanced_and_follows_priors():
    _, _, labels = synthetic._sample_attributes("target", 4000, seed=11)
    freq = np.bincount(labels, minlength=5) / len(labels)
    np.testing.assert_allclose(freq, synthetic.TARGET_PRIORS, atol=0.03)
    assert freq.max() > 5 * freq.min()
    assert abs(synthetic.TARGET_PRIORS.sum() - 1) < 1e-12


def test_target_is_a_function_of_both_attributes_and_of_neither_alone():
    pig, bor, lab = synthetic._sample_attributes("target", 3000, seed=4, split="test")
    np.testing.assert_array_equal(lab, synthetic._TARGET_OF[pig, bor])
    assert set(lab.tolist()) == set(range(5))
    for attr in (pig, bor):
        for value in range(4):
            assert len(set(lab[attr == value].tolist())) >= 2   # no value pins the diagnosis


@pytest.mark.parametrize("task", ["pigment", "border"])
def test_source_label_is_its_attribute_and_the_other_is_independent(task):
    pig, bor, lab = synthetic._sample_attributes(task, 4000, seed=9)
    own, other = (pig, bor) if task == "pigment" else (bor, pig)
    np.testing.assert_array_equal(lab, own)
    table = np.zeros((4, 4))
    np.add.at(table, (own, other), 1)
    assert np.all(np.abs(table / 250 - 1) < 0.3)    # ~uniform joint: 250 expected per cell


# ---------------------------------------------------------------- what the pixels carry
def _accuracies(feats, task):
    """Validation accuracy of nearest-centroid classifiers on colour and on shape features."""
    ctr, str_, ytr = feats[task, "train"]
    cva, sva, yva = feats[task, "val"]
    by_colour, by_shape = _nearest_centroid(ctr, ytr, 4), _nearest_centroid(str_, ytr, 4)
    return (by_colour(cva) == yva).mean(), (by_shape(sva) == yva).mean()


def test_pigment_is_in_the_colour_and_not_in_the_shape(source_features):
    colour_acc, shape_acc = _accuracies(source_features, "pigment")   # ~0.97 and ~0.25
    assert colour_acc > 0.8
    assert shape_acc < 0.4


def test_border_is_in_the_shape_and_not_in_the_colour(source_features):
    colour_acc, shape_acc = _accuracies(source_features, "border")    # ~0.25 and ~0.8
    assert shape_acc > 0.55
    assert colour_acc < 0.4


def test_target_needs_both_sources(source_features):
    """Colour and shape read off with the sources' classifiers beat any one-attribute oracle."""
    colour_p, _, yp = source_features["pigment", "train"]
    _, shape_b, yb = source_features["border", "train"]
    pigment_of, border_of = _nearest_centroid(colour_p, yp, 4), _nearest_centroid(shape_b, yb, 4)
    xt, yt = generate("target", 500, seed=3, split="test")
    composed = synthetic._TARGET_OF[pigment_of(_colour_features(xt)), border_of(_shape_features(xt))]
    # exact joint law of (pigment, border): a class's prior split evenly over its pairs
    target_of = synthetic._TARGET_OF
    pairs_per_class = np.bincount(target_of.ravel(), minlength=5)
    joint = synthetic.TARGET_PRIORS[target_of] / pairs_per_class[target_of]
    assert abs(joint.sum() - 1) < 1e-12
    oracle = []   # best possible accuracy knowing one attribute exactly
    for axis in (1, 0):
        by_value = joint if axis == 1 else joint.T
        owner = target_of if axis == 1 else target_of.T
        oracle.append(sum(max(by_value[v][owner[v] == t].sum() for t in range(5)) for v in range(4)))
    assert max(oracle) < 0.75                                           # 0.60 and 0.70
    assert (composed == yt).mean() > max(oracle) + 0.05                 # ~0.85


def test_generation_is_vectorised():
    generate("target", 8)   # warm-up
    start = time.perf_counter()
    images, _ = generate("target", 1000)
    elapsed = time.perf_counter() - start
    assert images.shape == (1000, 64, 64, 3)
    assert elapsed < 6.0, f"1000 images took {elapsed:.2f}s"   # ~0.8 s on 2 CPU cores


# ---------------------------------------------------------------- ImageFolder output
def test_write_imagefolder_layout_and_round_trip(tmp_path):
    root = tmp_path / "data"
    out = write_imagefolder(root, "target", n_train=9, n_val=5, n_test=6, image_size=32, seed=5)
    assert out == root
    names = class_names("target")
    for split, count in (("train", 9), ("val", 5), ("test", 6)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(names)
        images, labels = generate("target", count, image_size=32, seed=5, split=split)
        files = sorted((root / split).glob("*/*.png"))
        assert len(files) == count
        for name in names:
            assert any((root / split / name).iterdir())
        for f in files:
            i = int(f.stem)
            assert f.parent.name == names[labels[i]]
            np.testing.assert_array_equal(np.asarray(Image.open(f).convert("RGB")), images[i])


def test_write_imagefolder_without_test_split(tmp_path):
    write_imagefolder(tmp_path, "pigment", n_train=4, n_val=4, image_size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "val"]


@pytest.mark.parametrize("kwargs", [
    dict(task="x", n_train=10, n_val=10), dict(task="target", n_train=10, n_val=3),
    dict(task="target", n_train=10, n_val=10, n_test=2), dict(task="target", n_train=0, n_val=10),
    dict(task="target", n_train=10, n_val=10, image_size=8),
    dict(task="border", n_train=10, n_val=10, seed=-2),
])
def test_write_imagefolder_validates_before_writing(tmp_path, kwargs):
    root = tmp_path / "out"
    task = kwargs.pop("task")
    with pytest.raises(DataError):
        write_imagefolder(root, task, **kwargs)
    assert not root.exists()
