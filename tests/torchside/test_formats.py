"""Real-world dataset formats (mmexport.torchside.data.formats): ImageFolder, class-folder tree, CSV (HAM10000 layout), MedMNIST .npz."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmexport.torchside.data import IMAGENET_MEAN, IMAGENET_STD
from mmexport.errors import DataError
from mmexport.torchside.data.formats import check_image, load_file_task
from tests.conftest import one_line

MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float64)
STD = np.asarray(IMAGENET_STD, dtype=np.float64)




def refused(spec: str, *needles: str, image_size: int | None = 16) -> str:
    with pytest.raises(DataError) as exc:
        load_file_task(spec, image_size)
    message = one_line(exc)
    for needle in needles:
        assert needle in message, message
    return message


def normalised(rgb) -> torch.Tensor:
    """The value every pixel of a solid ``rgb`` image must have after the ImageNet normalisation."""
    return torch.tensor((np.asarray(rgb) / 255.0 - MEAN) / STD, dtype=torch.float32).view(3, 1, 1)


_RNG = np.random.default_rng(0)


def save_image(path: Path, pixels: np.ndarray | None = None, size: int = 20, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = _RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_tree(root: Path, counts: dict[str, int], ext: str = "png") -> Path:
    for name, count in counts.items():
        for i in range(count):
            save_image(root / name / f"{name}_{i:03d}.{ext}")
    return root


def write_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, counts in layout.items():
        write_tree(root / split, counts)
    return root


def truncated_jpeg(path: Path) -> Path:
    save_image(path, size=64, fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def sample_keys(task, split: str) -> list[str]:
    return sorted(Path(p).name for p, _ in task.dataset(split).samples)


# --------------------------------------------------------------------------- ImageFolder (train/ val/ [test/])


def test_imagefolder_happy_path(tmp_path):
    root = write_folder(tmp_path / "data", {
        "train": {"zeta": 4, "alpha": 2, "mid": 3}, "val": {"mid": 2, "zeta": 1, "alpha": 1},
        "test": {"alpha": 1, "mid": 1, "zeta": 2},
    })
    solid = np.empty((30, 30, 3), dtype=np.uint8)
    solid[...] = (255, 0, 51)
    save_image(root / "val" / "zeta" / "zeta_000.png", solid)
    task = load_file_task(str(root), 16)
    assert task.classes == ["alpha", "mid", "zeta"]
    assert task.splits == ("train", "val", "test")
    assert task.image_size == 16 and (task.mean, task.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert task.labels("train").tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert task.dataset("val").targets == [0, 1, 1, 2]
    images, labels = task.arrays("val")
    assert images.shape == (4, 3, 16, 16) and images.dtype == np.float32
    assert labels.tolist() == [0, 1, 1, 2]
    torch.testing.assert_close(torch.from_numpy(images[3]), normalised((255, 0, 51)).expand(3, 16, 16), rtol=0, atol=1e-5)
    d = task.description
    json.dumps(d)
    assert d["kind"] == "imagefolder" and d["source"] == str(root.absolute()) and d["image_size"] == 16
    assert d["counts"] == {"train": 9, "val": 4, "test": 4}
    assert d["class_counts"]["train"] == {"alpha": 2, "mid": 3, "zeta": 4}
    assert d["skipped"]["val"] == {"unreadable": 0, "missing": 0, "examples": []}
    assert load_file_task(str(root), None).dataset("val")[0][0].shape == (3, 224, 224)  # default FOLDER_IMAGE_SIZE


def test_imagefolder_ignores_hidden_and_non_image_files(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "train" / "b" / "._b_000.png").write_bytes(b"macOS resource fork")  # hidden: ignored, not corrupt
    write_tree(root / "train" / ".ipynb_checkpoints", {"x": 1})  # a hidden folder is no class
    write_tree(root / "val", {".ipynb_checkpoints": 1})
    task = load_file_task(str(root), 16)
    assert task.classes == ["a", "b"]
    assert task.description["counts"] == {"train": 4, "val": 2}
    assert task.description["skipped"]["train"]["unreadable"] == 0
    assert task.description["ignored_files"]["train"] == 3  # notes.txt, .DS_Store, ._b_000.png: listed, not used


def test_nested_class_folders_hidden_subfolders_and_symlink_cycles(tmp_path):
    root = write_tree(tmp_path / "tree", {"a": 5, "b": 5})
    save_image(root / "a" / "nested" / "deeper" / "n.png")  # recursive, like ImageFolder
    save_image(root / "b" / ".thumbnails" / "t.png")  # hidden: never entered
    (root / "b" / "loop").symlink_to(root / "b", target_is_directory=True)
    task = load_file_task(str(root), 16)
    assert task.description["class_counts"]["train"]["a"] + task.description["class_counts"]["val"]["a"] == 6
    files = [p for s in task.splits for p, label in task.dataset(s).samples if label == 1]
    assert len(files) == 5 and not any(".thumbnails" in f or "loop" in f for f in files)


def test_image_modes_become_rgb(tmp_path):
    root = tmp_path / "data"
    write_folder(root, {"train": {"a": 1, "b": 1}, "val": {"a": 1}})
    folder = root / "val" / "b"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(folder / "0_grey16.png")  # I;16
    Image.fromarray(np.full((20, 20), 100, dtype=np.uint8)).save(folder / "1_grey8.png")  # L
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(folder / "2_rgba.png")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([40, 50, 60] * 256)
    palette.info["transparency"] = 0
    palette.save(folder / "3_palette.png", transparency=0)
    Image.fromarray(np.full((20, 20, 3), 200, dtype=np.uint8)).save(folder / "4_rgb.jpg", quality=100)
    task = load_file_task(str(root), 16)
    images, _ = task.arrays("val")
    assert images.shape == (6, 3, 16, 16)
    expected = [(255, 255, 255), (100, 100, 100), (10, 20, 30), (40, 50, 60)]
    for image, rgb in zip(images[1:5], expected):
        torch.testing.assert_close(torch.from_numpy(image), normalised(rgb).expand(3, 16, 16), rtol=0, atol=1e-5)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    Image.fromarray(np.full((20, 20), 4112, dtype=np.uint16)).save(root / "val" / "b" / "b_000.png")  # 4112/257 = 16
    image, label = load_file_task(str(root), 16).dataset("val")[1]
    assert label == 1
    torch.testing.assert_close(image, normalised((16, 16, 16)).expand(3, 16, 16), rtol=0, atol=1e-5)


def test_imagefolder_class_mismatch_between_splits(tmp_path):
    root = write_folder(tmp_path / "a", {"train": {"x": 2, "y": 2}, "val": {"x": 1, "y": 1}, "test": {"x": 1, "y": 1, "zz": 1}})
    refused(str(root), str(root / "test"), "zz", "not in train")
    root = write_folder(tmp_path / "b", {"train": {"x": 2, "y": 2, "w": 1}, "val": {"x": 1, "y": 1}})
    refused(str(root), str(root / "val"), "w", "missing from val")


def test_imagefolder_single_class(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"only": 3}, "val": {"only": 1}})
    refused(str(root), str(root / "train"), "2 classes")


# --------------------------------------------------------------------------- corrupt images


def test_check_image_catches_what_verify_misses(tmp_path):
    good_jpg = save_image(tmp_path / "good.jpg", size=64, fmt="JPEG")
    good_png = save_image(tmp_path / "good.png")
    cut_jpg = truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(cut_jpg) as image:
        image.verify()  # the reason verify() alone is not enough: this truncated JPEG passes it
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    png = good_png.read_bytes()
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(png[: len(png) // 2])
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    flipped_png = tmp_path / "flipped.png"
    flipped_png.write_bytes(bytes(flipped))
    assert check_image(good_jpg) is None and check_image(good_png) is None
    for bad in (cut_jpg, noise, cut_png, flipped_png):
        assert check_image(bad) not in (None, "missing"), bad
    assert check_image(tmp_path / "absent.png") == "missing"


def test_corrupt_and_truncated_images_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}})
    noise = root / "train" / "a" / "a_001.png"
    noise.write_bytes(np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes())
    cut = truncated_jpeg(root / "train" / "b" / "b_zz.jpg")
    task = load_file_task(f"{root}?max_bad=0.2", 16)
    skipped = task.description["skipped"]
    assert skipped["train"]["unreadable"] == 2 and skipped["train"]["missing"] == 0
    assert sorted(skipped["train"]["examples"]) == sorted([str(noise), str(cut)])
    assert skipped["val"]["unreadable"] == 0
    assert task.description["counts"] == {"train": 11, "val": 4}
    assert str(noise) not in [p for p, _ in task.dataset("train").samples]
    assert task.arrays("train")[0].shape == (11, 3, 16, 16)

    # default max_bad=0.01: 2 of 13 is refused, with the count, the fraction and the files
    message = refused(str(root), str(root), "train", "2 of 13", "15.4%", str(noise), str(cut), "max_bad")
    assert "max_bad=0.01" in message


def test_image_changed_after_load_is_a_data_error(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    task = load_file_task(str(root), 16)
    victim = root / "val" / "b" / "b_000.png"
    victim.write_bytes(b"overwritten")
    dataset = task.dataset("val")
    dataset[0]  # still fine
    with pytest.raises(DataError) as exc:
        dataset[1]
    assert str(victim) in one_line(exc)


# --------------------------------------------------------------------------- one tree, stratified split


def test_tree_stratified_split(tmp_path):
    root = write_tree(tmp_path / "tree", {"benign": 60, "malignant": 20, "rare": 5}, ext="png")
    task = load_file_task(f"{root}?val=0.2&test=0.1&seed=7", 16)
    assert task.classes == ["benign", "malignant", "rare"]
    assert task.splits == ("train", "val", "test")
    cc = task.description["class_counts"]
    assert cc["val"] == {"benign": 12, "malignant": 4, "rare": 1}
    assert cc["test"] == {"benign": 6, "malignant": 2, "rare": 1}
    assert cc["train"] == {"benign": 42, "malignant": 14, "rare": 3}
    split = task.description["split"]
    assert (split["val"], split["test"], split["seed"]) == (0.2, 0.1, 7)
    assert split["sizes"] == {"train": 59, "val": 17, "test": 9}
    assert task.description["kind"] == "imagetree"
    json.dumps(task.description)
    keys = {s: sample_keys(task, s) for s in task.splits}
    everything = sum(keys.values(), [])
    assert len(everything) == len(set(everything)) == 85  # a partition: no overlap, nothing lost
    for s in task.splits:  # labels follow the folders
        for file, label in task.dataset(s).samples:
            assert Path(file).parent.name == task.classes[label]

    again = load_file_task(f"{root}?seed=7&test=0.1&val=0.2", 16)
    assert {s: sample_keys(again, s) for s in again.splits} == keys  # deterministic
    other = load_file_task(f"{root}?val=0.2&test=0.1&seed=8", 16)
    assert sample_keys(other, "val") != keys["val"]  # another seed, another split
    assert other.description["class_counts"] == cc  # same sizes


def test_tree_defaults_and_fractions(tmp_path):
    root = write_tree(tmp_path / "tree", {"a": 31, "b": 9}, ext="jpg")
    task = load_file_task(str(root), 16)
    assert task.splits == ("train", "val")
    assert task.description["split"]["seed"] == 0 and task.description["split"]["val"] == 0.2
    assert task.description["class_counts"]["val"] == {"a": 6, "b": 2}  # round(31*0.2), round(9*0.2)
    val_fraction = task.description["counts"]["val"] / 40
    assert abs(val_fraction - 0.2) < 0.05
    assert task.dataset("train").targets == task.labels("train").tolist()


def test_tree_class_too_small_and_single_class(tmp_path):
    root = write_tree(tmp_path / "small", {"big": 10, "tiny": 1})
    refused(str(root), str(root), "'tiny'", "1 image")
    root = write_tree(tmp_path / "two", {"big": 10, "pair": 2})
    load_file_task(str(root), 16)  # 2 images: one train, one val
    refused(f"{root}?test=0.1", "'pair'", "2 image", "needs at least 3")
    root = write_tree(tmp_path / "one", {"only": 8})
    refused(str(root), str(root), "2 classes", "only")


def test_tree_split_assigned_before_skipping(tmp_path):
    root = write_tree(tmp_path / "tree", {"a": 40, "b": 40})
    before = load_file_task(str(root), 16)
    val_a = sorted(p for p, label in before.dataset("val").samples if label == 0)
    Path(val_a[0]).write_bytes(b"broken")
    after = load_file_task(f"{root}?max_bad=0.2", 16)
    assert after.description["skipped"]["val"]["unreadable"] == 1
    assert sorted(p for p, label in after.dataset("val").samples if label == 0) == val_a[1:]
    assert sample_keys(after, "train") == sample_keys(before, "train")  # the split did not move


# --------------------------------------------------------------------------- augmentation


def test_augmentation_only_when_asked(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    task = load_file_task(str(root), 16)
    plain = task.dataset("train")
    first = plain[0][0]
    assert all(torch.equal(plain[0][0], first) for _ in range(5))  # eval transform is deterministic
    torch.manual_seed(0)
    augmented = task.dataset("train", augment=True)
    draws = [augmented[0] for _ in range(6)]
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0 for image, label in draws)
    assert not torch.equal(draws[0][0], first)
    assert len({tuple(image.flatten().tolist()) for image, _ in draws}) == len(draws)  # differs on every call


# --------------------------------------------------------------------------- CSV (HAM10000 layout)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ham(root: Path, counts: dict[str, int], *, per_lesion: int = 1, image_dir: str = "images") -> tuple[Path, list[list[str]]]:
    rows = []
    n = 0
    for dx, count in counts.items():
        for i in range(count):
            image_id = f"ISIC_{n:07d}"
            save_image(root / image_dir / f"{image_id}.jpg", size=24, fmt="JPEG")
            rows.append([f"HAM_{dx}_{i // per_lesion:04d}", image_id, dx, "histo", "45.0", "male", "back"])
            n += 1
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    return write_csv(root / "HAM10000_metadata.csv", header, rows), rows


def test_csv_ham10000_layout(tmp_path):
    meta, _ = ham(tmp_path, {"nv": 30, "mel": 10, "bkl": 10})
    task = load_file_task(f"{meta}?images=images&val=0.2&seed=3", 16)
    assert task.classes == ["bkl", "mel", "nv"]
    assert task.splits == ("train", "val")
    d = task.description
    json.dumps(d)
    assert d["kind"] == "csv" and d["source"] == str(meta.absolute())
    assert d["class_counts"]["val"] == {"bkl": 2, "mel": 2, "nv": 6}
    assert d["counts"] == {"train": 40, "val": 10}
    assert d["split"]["seed"] == 3 and d["csv"]["rows"] == 50
    assert d["options"] == {"images": "images", "val": "0.2", "seed": "3"}
    images, labels = task.arrays("val")
    assert images.shape == (10, 3, 16, 16) and images.dtype == np.float32
    for file, label in task.dataset("train").samples:
        assert file.endswith(".jpg") and Path(file).parent == tmp_path / "images"
    assert task.dataset("val").targets == labels.tolist()


def test_csv_several_image_directories_and_pickling(tmp_path):
    meta, rows = ham(tmp_path, {"nv": 8, "mel": 8}, image_dir="HAM10000_images_part_1")
    part2 = tmp_path / "HAM10000_images_part_2"
    part2.mkdir()
    moved = [row[1] for row in rows[::2]]
    for image_id in moved:
        (tmp_path / "HAM10000_images_part_1" / f"{image_id}.jpg").rename(part2 / f"{image_id}.jpg")
    task = load_file_task(f"{meta}?images=HAM10000_images_part_1,HAM10000_images_part_2", 16)
    assert sum(task.description["counts"].values()) == 16
    assert sum(s["missing"] for s in task.description["skipped"].values()) == 0
    folders = {Path(p).parent.name for s in task.splits for p, _ in task.dataset(s).samples}
    assert folders == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    clone = pickle.loads(pickle.dumps(task.dataset("train", augment=True)))  # DataLoader workers need this
    assert clone[0][0].shape == (3, 16, 16)


def test_csv_images_next_to_csv_and_explicit_columns(tmp_path):
    rows = []
    for i in range(12):
        label = "pneumonia" if i % 3 else "normal"
        save_image(tmp_path / f"scan{i}.png")
        rows.append([f"scan{i}", label, "train" if i < 6 else ("Val" if i < 9 else "test")])
    meta = write_csv(tmp_path / "labels.csv", ["file", "finding", "fold"], rows)
    task = load_file_task(f"{meta}?image_col=file&label_col=finding&split_col=fold&ext=png", 16)
    assert task.classes == ["normal", "pneumonia"]
    assert task.splits == ("train", "val", "test")
    assert task.description["counts"] == {"train": 6, "val": 3, "test": 3}
    assert task.labels("test").tolist() == [0, 1, 1]  # rows 9, 10, 11, in CSV order
    assert task.description["split"]["method"] == "column fold"
    # a class of train absent from a given split is refused, naming split and class
    rows[9][1] = "pneumonia"
    meta = write_csv(tmp_path / "labels2.csv", ["file", "finding", "fold"], rows)
    refused(f"{meta}?image_col=file&label_col=finding&split_col=fold", str(meta), "test split", "normal")


def test_csv_groups_never_straddle_splits(tmp_path):
    meta, rows = ham(tmp_path, {"nv": 40, "mel": 20}, per_lesion=3)
    task = load_file_task(f"{meta}?images=images&group_col=lesion_id&val=0.25", 16)
    lesion_of = {row[1]: row[0] for row in rows}
    split_of_lesion: dict[str, set[str]] = {}
    for split in task.splits:
        for file, _ in task.dataset(split).samples:
            split_of_lesion.setdefault(lesion_of[Path(file).stem], set()).add(split)
    assert all(len(s) == 1 for s in split_of_lesion.values())
    assert 0.15 < task.description["counts"]["val"] / 60 < 0.35

    # a given split column that leaks a lesion into two splits is refused
    leaky = [[lesion, image_id, dx, "train" if i % 2 else "val"] for i, (lesion, image_id, dx, *_) in enumerate(rows)]
    meta2 = write_csv(tmp_path / "leaky.csv", ["lesion_id", "image_id", "dx", "split"], leaky)
    refused(f"{meta2}?images=images&split_col=split&group_col=lesion_id", "lesion_id", "more than one split")


def test_csv_missing_images_counted_then_refused(tmp_path):
    meta, rows = ham(tmp_path, {"nv": 60, "mel": 40})
    victims = [rows[i][1] for i in (0, 1, 2)]
    for image_id in victims:
        (tmp_path / "images" / f"{image_id}.jpg").unlink()
    task = load_file_task(f"{meta}?images=images&max_bad=0.05", 16)
    skipped = task.description["skipped"]
    missing = sum(skipped[s]["missing"] for s in task.splits)
    assert missing == 3 and sum(task.description["counts"].values()) == 97
    assert all(s["unreadable"] == 0 for s in skipped.values())
    examples = sum((skipped[s]["examples"] for s in task.splits), [])
    assert all(any(v in e for v in victims) for e in examples)
    # above the limit (default 0.01): refused, naming the count and a missing image
    message = refused(f"{meta}?images=images", str(meta), "missing", "max_bad")
    assert any(v in message for v in victims)


def test_csv_default_image_dir_is_csv_dir(tmp_path):
    meta, _ = ham(tmp_path, {"nv": 6, "mel": 6}, image_dir=".")
    task = load_file_task(str(meta), 16)
    assert task.description["counts"] == {"train": 10, "val": 2}


@pytest.mark.parametrize("option, column", [("image_col", "file_name"), ("label_col", "diagnosis"), ("split_col", "fold")])
def test_csv_missing_column(tmp_path, option, column):
    meta, _ = ham(tmp_path, {"nv": 4, "mel": 4})
    refused(f"{meta}?images=images&{option}={column}", str(meta), f"'{column}'", "lesion_id, image_id, dx")


def test_csv_label_unknown_to_train(tmp_path):
    rows = []
    for i in range(6):
        save_image(tmp_path / f"{i}.png")
        rows.append([str(i), ["a", "b"][i % 2], "train"])
    save_image(tmp_path / "6.png")
    rows.append(["6", "vasc", "val"])
    meta = write_csv(tmp_path / "meta.csv", ["image_id", "dx", "split"], rows)
    refused(f"{meta}?split_col=split", str(meta), "'vasc'", "val", "line 8")


def test_csv_bad_inputs(tmp_path):
    meta, rows = ham(tmp_path, {"nv": 4, "mel": 4})
    refused(f"{meta}?images=nowhere", "nowhere", "does not exist")
    refused(f"{meta}?images=images&split_col=dx&val=0.3", "split_col")
    dup = write_csv(tmp_path / "dup.csv", ["image_id", "dx"], [[r[1], r[2]] for r in rows] + [[rows[0][1], "nv"]])
    refused(f"{dup}?images=images", str(dup), rows[0][1], "twice")
    blank = write_csv(tmp_path / "blank.csv", ["image_id", "dx"], [[r[1], r[2]] for r in rows] + [["ISIC_x", ""]])
    refused(f"{blank}?images=images", str(blank), "line 10", "'dx'")
    bad_split = write_csv(tmp_path / "split.csv", ["image_id", "dx", "s"], [[r[1], r[2], "holdout"] for r in rows])
    refused(f"{bad_split}?images=images&split_col=s", "'holdout'")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    refused(str(empty), str(empty), "empty")


# --------------------------------------------------------------------------- MedMNIST .npz


def medmnist(path: Path, size: int = 28, rgb: bool = False, counts=(20, 8, 8), classes: int = 3, **overrides) -> Path:
    rng = np.random.default_rng(5)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        if n == 0:
            continue
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_grey_native_size(tmp_path):
    path = medmnist(tmp_path / "pneumoniamnist.npz", classes=2)
    task = load_file_task(str(path), None)
    assert task.image_size == 28 and task.classes == ["0", "1"]
    assert task.splits == ("train", "val", "test")
    images, labels = task.arrays("val")
    assert images.shape == (8, 3, 28, 28) and images.dtype == np.float32
    assert labels.tolist() == [0, 1] * 4 and task.labels("val").tolist() == [0, 1] * 4
    raw = np.load(path)["val_images"].astype(np.float64) / 255.0
    for channel in range(3):  # grey replicated, then normalised per channel
        expected = (raw - MEAN[channel]) / STD[channel]
        np.testing.assert_allclose(images[:, channel], expected, rtol=0, atol=1e-5)
    d = task.description
    json.dumps(d)
    assert d["kind"] == "npz" and d["counts"] == {"train": 20, "val": 8, "test": 8}
    assert d["class_counts"]["train"] == {"0": 10, "1": 10} and d["resized"] is False
    assert d["channels"]["train"].startswith("grey")


def test_npz_rgb_resized_once_with_antialias(tmp_path):
    path = medmnist(tmp_path / "dermamnist.npz", size=64, rgb=True, classes=7, counts=(21, 7, 0))
    task = load_file_task(f"{path}?classes=akiec,bcc,bkl,df,mel,nv,vasc", 32)
    assert task.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert task.splits == ("train", "val") and task.image_size == 32
    images, _ = task.arrays("val")
    assert images.shape == (7, 3, 32, 32)
    raw = np.load(path)["val_images"]
    # The recorded pipeline (Pillow bilinear, antialiased) applied to the native images by the runtime's own
    # code gives exactly the training side's arrays: what a server computes is what evaluation computed.
    from mmexport.runtime.preprocess import preprocess_image

    assert task.preprocessing.resize == "exact" and task.preprocessing.resize_size == (32, 32)
    served = np.stack([preprocess_image(image, task.preprocessing) for image in raw])
    np.testing.assert_array_equal(served, images)
    # ... and it is a real antialiased resize: close to torch's antialiased bilinear of the same pixels
    tensor = torch.from_numpy(raw).permute(0, 3, 1, 2).float()
    smooth = torch.nn.functional.interpolate(tensor, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    smooth = (smooth / 255.0 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert float((torch.from_numpy(images) - smooth).abs().mean()) < 0.02
    assert task.description["resized"] is True and task.description["native_size"] == [64, 64]
    # resizing happened once: the dataset holds uint8 pixels at the target size
    assert task.dataset("train").images.shape == (21, 32, 32, 3) and task.dataset("train").images.dtype == np.uint8
    assert task.dataset("train").images is task.dataset("train", augment=True).images  # no copy per call
    grey = load_file_task(str(medmnist(tmp_path / "g.npz", size=28)), 64)
    assert grey.dataset("train")[0][0].shape == (3, 64, 64)
    augmented = grey.dataset("train", augment=True)
    assert augmented[0][0].shape == (3, 64, 64)


def test_npz_flat_int_labels(tmp_path):
    path = medmnist(tmp_path / "x.npz", counts=(6, 3, 0), train_labels=np.array([0, 1, 2, 3, 0, 1], dtype=np.int64),
                    val_labels=np.array([3, 2, 1], dtype=np.int32))
    task = load_file_task(str(path), None)
    assert task.classes == ["0", "1", "2", "3"]
    assert task.labels("val").tolist() == [3, 2, 1]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"val_labels": None}, ["val_labels", "arrays present"]),
        ({"test_images": None}, ["test_images"]),
        ({"train_labels": np.zeros((19, 1), np.uint8)}, ["train_images", "train_labels", "20", "19"]),
        ({"train_labels": np.zeros((20, 4), np.uint8)}, ["train_labels", "multi-label"]),
        ({"train_images": np.zeros((20, 28, 28), np.float32)}, ["train_images", "float32", "uint8"]),
        ({"val_images": np.zeros((8, 28, 28, 2), np.uint8)}, ["val_images", "shape"]),
        ({"val_images": np.zeros((8, 784), np.uint8)}, ["val_images", "shape"]),
        ({"val_labels": np.zeros(8, np.float32)}, ["val_labels", "float32"]),
        ({"val_labels": np.full(8, -1, np.int64)}, ["val_labels", "-1"]),
        ({"val_labels": np.full((8, 1), 7, np.uint8)}, ["val_labels", "7", "train_labels"]),
        ({"train_images": np.zeros((0, 28, 28), np.uint8), "train_labels": np.zeros(0, np.uint8)}, ["train_images", "empty"]),
    ],
)
def test_npz_bad_arrays(tmp_path, overrides, needles):
    path = medmnist(tmp_path / "bad.npz", **overrides)
    refused(str(path), str(path), *needles)


def test_npz_classes_option_must_match(tmp_path):
    path = medmnist(tmp_path / "m.npz", classes=3)
    refused(f"{path}?classes=a,b", str(path), "2 classes", "3 classes")
    refused(f"{path}?classes=a,b,a", "distinct")
    refused(f"{path}?classes=a,b,c&seed=1", "'seed'", "classes")
    single = medmnist(tmp_path / "single.npz", classes=1)
    refused(str(single), str(single), "2 classes")


def test_npz_object_array_refused_without_pickle(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, train_images=np.array([{"x": 1}, None], dtype=object), train_labels=np.zeros(2, np.uint8),
             val_images=np.zeros((2, 28, 28), np.uint8), val_labels=np.zeros(2, np.uint8))
    refused(str(path), str(path), "train_images", "pickle")


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    refused(str(path), str(path), "not a readable .npz")
    single = tmp_path / "single.npz"
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(single)
    refused(str(single), str(single), ".npy")


# --------------------------------------------------------------------------- specs and options


def test_unknown_option_lists_known(tmp_path):
    root = write_tree(tmp_path / "tree", {"a": 5, "b": 5})
    refused(f"{root}?vall=0.3", str(root), "'vall'", "val, test, seed, max_bad")
    folder = write_folder(tmp_path / "folder", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    refused(f"{folder}?seed=1", "'seed'", "max_bad")  # nothing to split in an ImageFolder
    meta, _ = ham(tmp_path / "ham", {"nv": 4, "mel": 4})
    refused(f"{meta}?label=dx", "'label'", "image_col", "label_col", "split_col")


@pytest.mark.parametrize(
    "query, needles",
    [
        ("val=abc", ["val", "'abc'"]),
        ("val=0", ["val"]),
        ("val=1.5", ["val", "'1.5'"]),
        ("val=0.6&test=0.5", ["val + test"]),
        ("test=-0.1", ["test"]),
        ("seed=-1", ["seed", "'-1'"]),
        ("seed=1.5", ["seed"]),
        ("seed=%0Afoo", ["seed"]),  # a newline in the value must not break the line
        ("max_bad=2", ["max_bad"]),
        ("val=0.2&val=0.3", ["val", "twice"]),
    ],
)
def test_bad_option_values(tmp_path, query, needles):
    root = write_tree(tmp_path / "tree", {"a": 5, "b": 5})
    refused(f"{root}?{query}", str(root), *needles)


def test_missing_path_and_unsupported_files(tmp_path):
    refused(str(tmp_path / "nowhere"), str(tmp_path / "nowhere"), "no such dataset", "synthetic:target")
    refused(f"{tmp_path / 'nowhere.csv'}?val=0.1", str(tmp_path / "nowhere.csv"), "synthetic:target")
    other = tmp_path / "data.parquet"
    other.write_bytes(b"x")
    refused(str(other), str(other), "directory", ".csv", ".npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(str(empty), str(empty), "no class subfolders")
    refused(str(write_folder(tmp_path / "noval", {"train": {"a": 1, "b": 1}})), "train/ and val/")


@pytest.mark.parametrize("size", [0, -5, 2.5, True])
def test_invalid_image_size(tmp_path, size):
    root = write_tree(tmp_path / "tree", {"a": 5, "b": 5})
    refused(str(root), "image_size", image_size=size)
