"""Real-world target datasets: ImageFolder trees, one-tree class folders, CSV metadata and MedMNIST ``.npz``.

One entry point, :func:`load_file_task`, for specs of the form ``PATH[?key=value&...]``:

``DIR`` with ``train/`` and ``val/`` (optional ``test/``) subfolders
    ImageFolder layout: one subfolder per class in every split; classes are
    the sorted subfolders of ``train/``. Options: ``max_bad``. (A directory
    with any of train/, val/, test/ is read as this layout, never as a tree
    with a class called "test".)
``DIR`` with class subfolders directly
    One tree, split here into train/val[/test] by a seeded stratified split.
    Options: ``val`` (0.2), ``test`` (0.0), ``seed`` (0), ``max_bad``.
``FILE.csv``
    One row per image (HAM10000 metadata layout). Options: ``images``
    (comma-separated image directories, relative ones resolved against the
    CSV's directory; default the CSV's directory), ``image_col`` (image_id),
    ``label_col`` (dx), ``ext`` (default: ``.jpg``/``.jpeg``/``.png`` tried when
    the id has no image extension), ``split_col`` (column holding
    train/val/test; otherwise a stratified split with ``val``/``test``/``seed``),
    ``group_col`` (e.g. ``lesion_id``: all images of a group land in the same
    split, so near-duplicates of one lesion never straddle train and val),
    ``max_bad``.
``FILE.npz``
    MedMNIST arrays ``{train,val,test}_{images,labels}``. Options: ``classes``
    (comma-separated names, in label order).

Decisions, so that a dataset description can be defended:

* File-based splits are made by ordering every class's items (or groups) by
  ``sha256(seed, item key)`` and cutting ``round(n*test)`` then ``round(n*val)``
  items (at least one each) off the front. The split depends only on the file
  list, the options and the seed -- not on numpy's RNG or directory order --
  and adding an image moves at most the items at the cut points.
* The split is made over every candidate image; unreadable or missing ones
  are then dropped from whichever split they fell in and counted there. A
  split whose dropped fraction exceeds ``max_bad`` (default 0.01) is refused.
* The load-time scan (every image, once): ``Image.open`` + ``verify()`` for all
  formats. ``verify()`` checks the CRC of every PNG chunk, IDAT included, and
  needs the IEND chunk, so it catches truncation and bit flips; but a PNG whose
  compressed (zlib) stream was corrupt *before* its CRCs were computed passes
  it and fails mid-training, so PNGs are also decoded (~1-2 ms per 224 px
  image). It is not enough for JPEG (no checksums; ``verify()`` reads only the header and
  misses truncated files), so JPEGs are also decoded at 1/8 scale with
  ``draft()``: the whole entropy-coded stream is still read, so truncation is
  caught, for ~1.2 ms per 600x450 image (full decode ~1.5 ms). Other formats
  (BMP, TIFF, WebP, ...) are fully decoded. Measured on a 2-core CPU; threads
  gave no speed-up, so the scan is serial. A corrupted byte inside a JPEG's
  entropy-coded data is not detectable by any reader and decodes as noise.
  Every image is opened with the runtime's bounded reader
  (:func:`mmexport.runtime.preprocess.open_image`): its header's size is checked
  before decoding against the pixel budgets (decoded pixels, aspect ratio, and size
  after the dataset's recorded resize -- what evaluation and a server would do with
  it), so an image beyond them is unreadable here, not a crash or gigabytes
  mid-training. Each file is read once, and its sha256
  goes into the dataset's content ``fingerprint`` (every split's labelled image
  digests: independent of where the dataset lies and of file names).
* Class names must be names every exported artifact can carry
  (:func:`mmexport.runtime.modelinfo.check_class_names`: printable, one line, no
  surrounding blanks, distinct); another name is refused at load, in one line.
* Labels come from folders: a symlink inside a class folder that leads to an
  ancestor of a class folder, or into another class folder (of any split), is
  refused -- following it would file another class's (or split's) images under
  this label.
* ``split.sizes`` in the description counts every candidate per split;
  ``counts`` and ``class_counts`` count the images actually used.
* Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``, macOS
  ``._x.jpg`` forks) are ignored, as are files without an image extension
  that are not DICOM files.
* DICOM files are recognised by content (``is_dicom``), whatever their names. A dataset
  is all DICOM or all image files (mixing them is refused). A DICOM dataset's block
  carries the DICOM pixel policy (``dicom=``; default ``DicomPixels.full_range()``), so
  the scan (one decode per file, by :func:`read_dicom`), evaluation and the runtime
  apply one pipeline; the policy given for a dataset without DICOM files is refused.
* Pixels: every image is converted to RGB. 16-bit greyscale (``I;16``, ``I``)
  is scaled by 255/65535 -- PIL's own conversion clips it at 255, which turns
  a real X-ray white. Palette images with transparency go through RGBA; alpha
  is dropped.
* ``.npz`` files are read with ``allow_pickle=False``; an object array is
  refused. Images are resized once at load (bilinear, antialiased) and kept
  in memory as uint8: ``N * size * size * 3`` bytes per split.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmexport.config import check_int
from mmexport.errors import CheckpointError, DataError
from mmexport.fileio import sha256_file
from mmexport.runtime.modelinfo import check_class_names
from mmexport.runtime.preprocess import (
    DicomPixels,
    Preprocessing,
    is_dicom,
    normalize,
    open_image,
    pil_pipeline,
    read_dicom,
    read_rgb,
)
from mmexport.torchside.data.tasks import (
    FOLDER_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    AugmentationPreset,
    TaskData,
    _ArrayImages,
    augmentation_preset,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
CSV_DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_EXAMPLES = 3

# kind -> option -> default (None: no default / derived). The order is the order printed in errors.
OPTIONS: dict[str, dict[str, Any]] = {
    "imagefolder": {"max_bad": 0.01},
    "imagetree": {"val": 0.2, "test": 0.0, "seed": 0, "max_bad": 0.01},
    "csv": {
        "images": None, "image_col": "image_id", "label_col": "dx", "ext": None, "split_col": None,
        "group_col": None, "val": 0.2, "test": 0.0, "seed": 0, "max_bad": 0.01,
    },
    "npz": {"classes": None},
}


def _error(message: str) -> DataError:
    """A DataError whose message is guaranteed to be one line."""
    return DataError(message.replace("\r", "\\r").replace("\n", "\\n").strip())


# --------------------------------------------------------------------------- entry point


def load_file_task(spec: str, image_size: int | None, dicom: DicomPixels | None = None) -> TaskData:
    """Load ``PATH[?key=value&...]``: an ImageFolder root, a class-folder tree, a ``.csv`` or a MedMNIST ``.npz``.

    ``dicom``: the DICOM pixel policy to record (a dataset of DICOM files without one gets
    :meth:`DicomPixels.full_range`); given for a dataset without DICOM files, it is refused.
    """
    if image_size is not None:
        check_int(image_size, f"{spec}: image_size", error=DataError)
    raw_path, _, query = spec.partition("?")
    if query and Path(spec).expanduser().exists():  # a path that really contains '?'
        raw_path, query = spec, ""
    path = Path(raw_path).expanduser()
    if not raw_path:
        raise _error(f"{spec!r}: no dataset path given (or use synthetic:target)")
    if not path.exists():
        raise _error(f"{path}: no such dataset file or directory (or use synthetic:target)")
    if path.is_dir():
        subdirs = {entry.name for entry in _visible_dirs(path)}
        kind = "imagefolder" if subdirs & set(SPLITS) else "imagetree"
    elif path.suffix.lower() == ".csv":
        kind = "csv"
    elif path.suffix.lower() == ".npz":
        kind = "npz"
    else:
        raise _error(
            f"{path}: not a dataset: expected a directory (train/ and val/ subfolders, or one subfolder per class), "
            f"a .csv or a .npz file"
        )
    options = _parse_query(path, query, kind)
    if kind == "npz" and dicom is not None:
        raise _error(no_dicom_files(path))
    loader = {"imagefolder": _imagefolder, "imagetree": _imagetree, "csv": _csv}.get(kind)
    if loader is None:
        return _npz(path, options, image_size)
    return loader(path, options, image_size, dicom)


def no_dicom_files(path: Path | str) -> str:
    return (f"{path}: a DICOM pixel policy (--dicom-voi/--dicom-frame) was given, but this dataset holds no DICOM "
            "files: drop the option")


def _parse_query(path: Path, query: str, kind: str) -> dict[str, str]:
    known = OPTIONS[kind]
    given: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in known:
            raise _error(f"{path}: unknown option {key!r} ({kind} dataset); known: {', '.join(known)}")
        if key in given:
            raise _error(f"{path}: option {key} given twice")
        given[key] = value
    return given


def _fraction(path: Path, given: dict[str, str], key: str, default: float, *, low_open: bool, high: float = 1.0) -> float:
    if key not in given:
        return default
    value = given[key]
    try:
        number = float(value)
    except ValueError:
        raise _error(f"{path}: option {key} must be a number, got {value!r}") from None
    low_ok = number > 0 if low_open else number >= 0
    if not (math.isfinite(number) and low_ok and number < high):
        bound = "0 <" if low_open else "0 <="
        raise _error(f"{path}: option {key} must satisfy {bound} {key} < {high:g}, got {value!r}")
    return number


def _split_options(path: Path, given: dict[str, str]) -> tuple[float, float, int]:
    val = _fraction(path, given, "val", 0.2, low_open=True)
    test = _fraction(path, given, "test", 0.0, low_open=False)
    if val + test >= 1.0:
        raise _error(f"{path}: val + test must be below 1 (nothing left for train), got val={val:g} test={test:g}")
    seed_text = given.get("seed", "0")
    try:
        seed = int(seed_text)
    except ValueError:
        raise _error(f"{path}: option seed must be a non-negative integer, got {seed_text!r}") from None
    if seed < 0:
        raise _error(f"{path}: option seed must be a non-negative integer, got {seed_text!r}")
    return val, test, seed


def _max_bad(path: Path, given: dict[str, str]) -> float:
    if "max_bad" not in given:
        return 0.01
    value = given["max_bad"]
    try:
        number = float(value)
    except ValueError:
        raise _error(f"{path}: option max_bad must be a fraction in [0, 1], got {value!r}") from None
    if not (0.0 <= number <= 1.0):
        raise _error(f"{path}: option max_bad must be a fraction in [0, 1], got {value!r}")
    return number


# --------------------------------------------------------------------------- file-based images


def _visible_dirs(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(
            (e for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)), key=lambda e: e.name
        )


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_images(folder: Path, others: tuple[str, ...] = ()) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursively, sorted like torchvision's ImageFolder) and the count of other files.

    ``others``: the real paths of every other class folder of the dataset. A symlink that
    leads to an ancestor of a class folder (this one included) or into another class folder
    is refused: its images would be filed under this folder's label.
    """
    found: list[Path] = []
    ignored = 0
    listed: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    own = os.path.realpath(folder)
    classes = (own, *others)

    def refuse(link: str, real: str, why: str) -> DataError:
        return _error(f"{link}: a symlink to {real}, {why}: what it leads to would be labelled {folder.name!r}; "
                      "remove the link (or make it point elsewhere)")

    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink cycle
            dirs[:] = []
            continue
        if real != own:
            above = [c for c in classes if _inside(c, real)]
            if above:
                what = "this class folder" if own in above else f"class folder {above[0]}"
                raise refuse(root, real, f"which holds {what}")
            inner = next((c for c in others if _inside(real, c)), None)
            if inner is not None and not _inside(real, own):
                raise refuse(root, real, f"inside another class folder ({inner})")
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place: hidden folders are never entered
        listed.append((root, files))
    for root, files in sorted(listed, key=lambda entry: entry[0]):
        for name in sorted(files):
            # DICOMs are recognised by content (they are often named without an extension, or .dcm)
            if _is_image_name(name) or (not name.startswith(".") and is_dicom(Path(root) / name)):
                file = Path(root) / name
                if others and os.path.islink(file):
                    real = os.path.realpath(file)
                    inner = next((c for c in others if _inside(real, c)), None)
                    if inner is not None and not _inside(real, own):
                        raise refuse(str(file), real, f"an image of another class folder ({inner})")
                found.append(file)
            else:
                ignored += 1
    return found, ignored


def check_image(path: str | os.PathLike, preprocessing: Preprocessing | None = None) -> str | None:
    """``None`` if ``path`` is a readable image, else a short reason (see the module docstring for the method)."""
    return scan_image(path, preprocessing)[0]


def scan_image(path: str | os.PathLike, preprocessing: Preprocessing | None = None) -> tuple[str | None, str | None]:
    """(``None`` or the reason ``path`` is unusable, sha256 of its bytes or ``None``); each file is read once.

    Read with the runtime's bounded reader: an image beyond the pixel budgets (with ``preprocessing``,
    also after its resize) is unusable, found from its header before anything is decoded.
    """
    path = Path(path)
    if not path.is_file():
        return "missing", None
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})", None
    if not data:
        return "empty file (0 bytes)", None
    digest = hashlib.sha256(data).hexdigest()
    if is_dicom(data):
        try:  # decoded once, by the recorded DICOM pipeline (a block without one refuses it in one line)
            read_dicom(data, preprocessing, where=path.name)
        except DataError as exc:
            return str(exc).removeprefix(f"{path.name}: "), digest
        except Exception as exc:  # noqa: BLE001 - any failure to decode makes the file unusable
            return _first_line(exc), digest
        return None, digest
    try:
        with warnings.catch_warnings():
            # Pillow only warns (on stderr, mid-run) above a MAX_IMAGE_PIXELS a user lowered below our budget.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(data, preprocessing, where=path.name) as image:
                image_format = image.format
                image.verify()
            with open_image(data, preprocessing, where=path.name) as image:
                if image_format == "JPEG":
                    image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except DataError as exc:  # the bounded reader: one line, every decoding failure included
        return str(exc).removeprefix(f"{path.name}: "), digest
    except Exception as exc:  # noqa: BLE001 - any failure to decode makes the file unusable
        return _first_line(exc).replace(_IN_MEMORY, path.name), digest
    return None, digest


_IN_MEMORY = "<_io.BytesIO object>"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", _IN_MEMORY, " ".join(str(exc).split()))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FileImages(Dataset):
    """``(path, label)`` samples -> float CHW tensors; ``targets`` lists the labels.

    Without ``augment`` the transform is the recorded evaluation pipeline
    (:mod:`mmexport.runtime.preprocess`), run by the same code as the runtime's predictor.
    """

    def __init__(self, samples: list[tuple[str, int]], preprocessing: Preprocessing, train_transform: Callable | None) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.preprocessing = preprocessing
        self.train_transform = train_transform

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int):
        path, label = self.samples[index]
        try:
            return read_rgb(path, self.preprocessing), label
        except Exception as exc:  # noqa: BLE001 - changed on disk since the load-time scan
            raise _error(f"{path}: cannot read image ({exc}); it passed the load-time check") from None

    def pixels(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self._read(index)
        return np.asarray(pil_pipeline(image, self.preprocessing), dtype=np.uint8), label

    def __getitem__(self, index: int):
        if self.train_transform is None:
            pixels, label = self.pixels(index)
            return torch.from_numpy(normalize(pixels, self.preprocessing)), label
        image, label = self._read(index)
        return self.train_transform(image), label


def train_transform(size: int, preset: str | AugmentationPreset = "legacy",
                    preprocessing: Preprocessing | None = None) -> Callable:
    """Training augmentation for image files: a PIL image -> normalised float CHW tensor.

    A preset with a crop crops from the original image (random resized crop to ``size``);
    one without keeps the evaluation geometry (``preprocessing``'s resize and centre crop).
    Flips, rotations and colour jitter follow on the uint8 pixels, then the recorded
    normalisation (:func:`mmexport.runtime.preprocess.normalize`), as for evaluation.
    """
    preset = augmentation_preset(preset)
    preprocessing = preprocessing or Preprocessing.center_crop(size, IMAGENET_MEAN, IMAGENET_STD)
    return _FileAugmentation(preset, size, preprocessing)


class _FileAugmentation:
    """Picklable (DataLoader workers) augmentation of a decoded PIL image."""
    def __init__(self, preset: AugmentationPreset, size: int, preprocessing: Preprocessing) -> None:
        from torchvision.transforms import v2

        self.preset = preset
        self.preprocessing = preprocessing
        self.crop = (v2.RandomResizedCrop(size, scale=preset.crop_scale, ratio=preset.crop_ratio, antialias=True)
                     if preset.crop_scale is not None else None)
        self.rest = preset.pil_transform(size, crop=False)

    def __call__(self, image) -> torch.Tensor:
        image = self.crop(image) if self.crop is not None else pil_pipeline(image, self.preprocessing)
        if self.rest is not None:
            image = self.rest(image)
        return torch.from_numpy(normalize(np.asarray(image, dtype=np.uint8), self.preprocessing))


def _stable_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogatepass")).hexdigest()


def stratified_split(
    where: str, items: list[tuple[str, str, str]], val: float, test: float, seed: int
) -> list[str]:
    """Split name for each ``(key, class, group)`` item; a group never straddles splits.

    Per class (a group's class is its most common label), groups are ordered by
    ``sha256(seed, group)``; the first ones make ``round(n*test)`` images for test,
    the next ``round(n*val)`` for val (at least one each), the rest train.
    """
    group_labels: dict[str, Counter] = {}
    group_sizes: Counter = Counter()
    for _, label, group in items:
        group_labels.setdefault(group, Counter())[label] += 1
        group_sizes[group] += 1
    by_class: dict[str, list[str]] = {}
    for group, labels in group_labels.items():
        label = min(labels, key=lambda name: (-labels[name], name))
        by_class.setdefault(label, []).append(group)
    wanted_splits = ["test", "val"] if test > 0 else ["val"]
    group_split: dict[str, str] = {}
    for label in sorted(by_class):
        groups = sorted(by_class[label], key=lambda g: _stable_rank(seed, g))
        total = sum(group_sizes[g] for g in groups)
        quota = {"test": max(1, math.floor(total * test + 0.5)) if test > 0 else 0,
                 "val": max(1, math.floor(total * val + 0.5))}
        needed = len(wanted_splits) + 1
        in_groups = f" in {len(groups)} group(s)" if len(groups) != total else ""
        if quota["test"] + quota["val"] >= total or len(groups) < needed:
            raise _error(
                f"{where}: class {label!r} has {total} image(s){in_groups}: too few to split into "
                f"train/{'/'.join(reversed(wanted_splits))} with val={val:g} test={test:g} (needs at least {needed})"
            )
        position = 0
        for split in wanted_splits:
            taken = 0
            while taken < quota[split] and len(groups) - position > 1:
                group_split[groups[position]] = split
                taken += group_sizes[groups[position]]
                position += 1
        for group in groups[position:]:
            group_split[group] = "train"
        assigned = {group_split[g] for g in groups}
        if len(assigned) < needed:  # only possible with very uneven groups
            raise _error(
                f"{where}: class {label!r} has {total} image(s){in_groups}: cannot give every split a group "
                f"with val={val:g} test={test:g}"
            )
    return [group_split[group] for _, _, group in items]


def _finish_file_task(
    path: Path,
    kind: str,
    candidates: dict[str, list[tuple[Path | None, str, str]]],
    classes: list[str],
    image_size: int | None,
    max_bad: float,
    given: dict[str, str],
    extra: dict[str, Any],
    dicom: DicomPixels | None = None,
) -> TaskData:
    """Scan every candidate ``(path or None if missing, class, display name)`` per split, skip and count bad ones, build TaskData.

    A dataset of DICOM files (by content) records ``dicom`` (default :meth:`DicomPixels.full_range`)
    in its preprocessing block, so evaluation, export and the runtime apply the same DICOM pipeline.
    """
    _check_classes(classes, path)
    size = image_size or FOLDER_IMAGE_SIZE
    try:
        preprocessing = Preprocessing.center_crop(size, IMAGENET_MEAN, IMAGENET_STD)
    except CheckpointError as exc:  # an image size beyond what the block allows
        raise _error(f"{path}: image size {size}: {exc}") from None
    present = [file for items in candidates.values() for file, _, _ in items if file is not None and file.is_file()]
    dicoms = [file for file in present if is_dicom(file)]
    if dicoms:
        others = [file for file in present if not is_dicom(file)]
        if others:
            raise _error(
                f"{path}: mixes {len(dicoms)} DICOM file(s) with {len(others)} other image file(s) (e.g. "
                f"{', '.join(str(f) for f in others[:MAX_EXAMPLES])}): a dataset is either DICOM or image files, "
                "since DICOM pixels go through the recorded DICOM pipeline; separate or convert them"
            )
        preprocessing = preprocessing.with_dicom(dicom or DicomPixels.full_range())
    elif dicom is not None:
        raise _error(no_dicom_files(path))
    index = {name: i for i, name in enumerate(classes)}
    digests: list[str] = []
    samples: dict[str, list[tuple[str, int]]] = {}
    skipped: dict[str, dict[str, Any]] = {}
    for split, items in candidates.items():
        good: list[tuple[str, int]] = []
        counts = {"unreadable": 0, "missing": 0}
        examples: list[str] = []
        reasons: list[str] = []
        for file, label, shown in items:
            reason, digest = ("missing", None) if file is None else scan_image(file, preprocessing)
            if reason is None:
                good.append((str(file), index[label]))
                digests.append(f"{split}\t{label}\t{digest}")
                continue
            counts["missing" if reason == "missing" else "unreadable"] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(shown)
                reasons.append(reason)
        bad = counts["unreadable"] + counts["missing"]
        skipped[split] = {**counts, "examples": examples}
        if items and bad / len(items) > max_bad:
            raise _error(
                f"{path}: {split} split: {bad} of {len(items)} images skipped ({bad / len(items):.1%}; "
                f"{counts['unreadable']} unreadable, {counts['missing']} missing), more than max_bad={max_bad:g}; "
                f"e.g. {'; '.join(f'{e} ({r})' for e, r in zip(examples, reasons))}"
            )
        samples[split] = good
    class_counts = {split: {name: 0 for name in classes} for split in samples}
    for split, good in samples.items():
        for _, label in good:
            class_counts[split][classes[label]] += 1
        empty = [name for name, count in class_counts[split].items() if count == 0]
        if empty:
            raise _error(f"{path}: {split} split has no readable images of class(es) {', '.join(empty)}")
    splits = tuple(s for s in SPLITS if s in samples)

    def factory(split: str, augment: AugmentationPreset | None) -> Dataset:
        transform = train_transform(size, augment, preprocessing) if augment is not None else None
        return FileImages(samples[split], preprocessing, transform)

    description = {
        "source": str(path.absolute()),
        "path": str(path.resolve()),
        "fingerprint": _fingerprint(digests),
        "kind": kind,
        "image_size": size,
        "classes": list(classes),
        "counts": {s: len(samples[s]) for s in splits},
        "class_counts": {s: class_counts[s] for s in splits},
        **extra,
        "skipped": {s: skipped[s] for s in splits},
        "max_bad": max_bad,
        "scan": ("every DICOM decoded by the recorded DICOM pipeline" if preprocessing.dicom is not None else
                 "PIL verify(); JPEG also decoded at 1/8 scale, every other format (PNG included) fully decoded"),
        **({"pixels": "DICOM", "dicom": preprocessing.dicom.to_dict()} if preprocessing.dicom is not None else {}),
        "options": dict(given),
        "preprocessing": preprocessing.describe(),
    }
    return TaskData(list(classes), size, IMAGENET_MEAN, IMAGENET_STD, description, factory, splits, preprocessing)


def _check_classes(classes: list[str], path: Path) -> None:
    """Refuse, at load, class names no exported model could carry (one line), rather than train a model that cannot ship."""
    try:
        check_class_names(classes, f"{path}: class names")
    except CheckpointError as exc:
        raise _error(str(exc)) from None


def _fingerprint(lines: list[str]) -> str:
    """sha256 over the sorted ``split, class, image sha256`` lines: the labelled content, wherever it lies."""
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return "sha256:" + digest.hexdigest()


def _class_folders(*split_dirs: Path) -> list[dict[str, tuple[list[Path], int]]]:
    """Per split directory: class name -> (image files, ignored count). Symlinks across class folders are refused."""
    entries = [_visible_dirs(split_dir) for split_dir in split_dirs]
    reals = [os.path.realpath(entry.path) for listing in entries for entry in listing]
    result = []
    for listing in entries:
        folders = {}
        for entry in listing:
            own = os.path.realpath(entry.path)
            folders[entry.name] = _walk_images(Path(entry.path), tuple(r for r in reals if r != own))
        result.append(folders)
    return result


def _imagefolder(path: Path, given: dict[str, str], image_size: int | None, dicom: DicomPixels | None) -> TaskData:
    max_bad = _max_bad(path, given)
    present = [s for s in SPLITS if (path / s).is_dir()]
    if "train" not in present or "val" not in present:
        raise _error(f"{path}: expected train/ and val/ subfolders, found {', '.join(s + '/' for s in present) or 'neither'}")
    folders = dict(zip(present, _class_folders(*(path / split for split in present))))
    classes = sorted(folders["train"])
    if not classes:
        raise _error(f"{path / 'train'}: no class subfolders (expected one subfolder per class)")
    for split in present:
        empty = [name for name, (files, _) in folders[split].items() if not files]
        if empty:
            raise _error(f"{path / split}: class folder(s) {', '.join(empty)} contain no images ({', '.join(IMAGE_EXTENSIONS)})")
    for split in present[1:]:
        missing = [c for c in classes if c not in folders[split]]
        unknown = [c for c in folders[split] if c not in classes]
        if missing:
            raise _error(f"{path / split}: class(es) {', '.join(missing)} of train/ missing from {split}/")
        if unknown:
            raise _error(f"{path / split}: class(es) {', '.join(unknown)} in {split}/ not in train/")
    if len(classes) < 2:
        raise _error(f"{path / 'train'}: need at least 2 classes, found {len(classes)} ({', '.join(classes)})")
    candidates = {
        split: [(file, name, str(file)) for name in classes for file in folders[split][name][0]] for split in present
    }
    ignored = {split: sum(n for _, n in folders[split].values()) for split in present}
    return _finish_file_task(path, "imagefolder", candidates, classes, image_size, max_bad, given,
                             {"ignored_files": ignored}, dicom)


def _imagetree(path: Path, given: dict[str, str], image_size: int | None, dicom: DicomPixels | None) -> TaskData:
    max_bad = _max_bad(path, given)
    val, test, seed = _split_options(path, given)
    (folders,) = _class_folders(path)
    if not folders:
        raise _error(
            f"{path}: no class subfolders (expected train/ and val/ subfolders, or one subfolder per class)"
        )
    empty = [name for name, (files, _) in folders.items() if not files]
    if empty:
        raise _error(f"{path}: class folder(s) {', '.join(empty)} contain no images ({', '.join(IMAGE_EXTENSIONS)})")
    classes = sorted(folders)
    if len(classes) < 2:
        raise _error(f"{path}: need at least 2 classes (one subfolder each), found {len(classes)} ({', '.join(classes)})")
    items = [(file, name) for name in classes for file in folders[name][0]]
    keys = [(file.relative_to(path).as_posix(), name, file.relative_to(path).as_posix()) for file, name in items]
    assignment = stratified_split(str(path), keys, val, test, seed)
    splits = [s for s in SPLITS if s in assignment]
    candidates = {split: [] for split in splits}
    for (file, name), split in zip(items, assignment):
        candidates[split].append((file, name, str(file)))
    split_info = {"method": "stratified sha256(seed, relative path)", "val": val, "test": test, "seed": seed,
                  "sizes": {s: len(candidates[s]) for s in splits}}
    return _finish_file_task(path, "imagetree", candidates, classes, image_size, max_bad, given,
                             {"split": split_info, "ignored_files": sum(n for _, n in folders.values())}, dicom)


# --------------------------------------------------------------------------- CSV


def _csv(path: Path, given: dict[str, str], image_size: int | None, dicom: DicomPixels | None) -> TaskData:
    max_bad = _max_bad(path, given)
    image_col = given.get("image_col", "image_id")
    label_col = given.get("label_col", "dx")
    split_col = given.get("split_col") or None
    group_col = given.get("group_col") or None
    if split_col is not None:
        clash = [k for k in ("val", "test", "seed") if k in given]
        if clash:
            raise _error(f"{path}: option(s) {', '.join(clash)} make a split and cannot be combined with split_col={split_col}")
    else:
        val, test, seed = _split_options(path, given)
    ext = given.get("ext")
    if ext is not None:
        ext = ext if ext.startswith(".") else "." + ext
        if ext == ".":
            raise _error(f"{path}: option ext must be an extension such as .jpg, got {given['ext']!r}")
    folders = [p.strip() for p in given["images"].split(",")] if "images" in given else [""]
    image_dirs = []
    for folder in folders:
        directory = path.parent / Path(folder).expanduser() if folder else path.parent
        if not directory.is_dir():
            raise _error(
                f"{path}: image directory {directory} does not exist (relative images= paths are resolved against the CSV's directory)"
            )
        image_dirs.append(directory)

    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise _error(f"{path}: empty CSV file (expected a header row with {image_col} and {label_col})")
            header = [name.strip() for name in header]
            columns = {}
            for option, name in (("image_col", image_col), ("label_col", label_col), ("split_col", split_col),
                                 ("group_col", group_col)):
                if name is None:
                    continue
                if name not in header:
                    raise _error(f"{path}: no column {name!r} ({option}); columns present: {', '.join(header)}")
                columns[option] = header.index(name)
            rows = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) < len(header):
                    raise _error(f"{path}: line {reader.line_num} has {len(row)} fields, the header has {len(header)}")
                rows.append((reader.line_num, {option: row[i].strip() for option, i in columns.items()}))
    except UnicodeDecodeError as exc:
        raise _error(f"{path}: not a UTF-8 CSV file ({exc})") from None
    except csv.Error as exc:
        raise _error(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise _error(f"{path}: no data rows")

    seen: dict[str, int] = {}
    for line, values in rows:
        for option in ("image_col", "label_col", "split_col"):
            if option in columns and not values[option]:
                raise _error(f"{path}: line {line}: empty value in column {header[columns[option]]!r} ({option})")
        image_id = values["image_col"]
        if image_id in seen:
            raise _error(f"{path}: image {image_id!r} listed twice (lines {seen[image_id]} and {line})")
        seen[image_id] = line

    def resolve(image_id: str) -> Path | None:
        if ext is not None:
            names = [image_id if image_id.lower().endswith(ext.lower()) else image_id + ext]
        elif os.path.splitext(image_id)[1].lower() in IMAGE_EXTENSIONS:
            names = [image_id]
        else:
            names = [image_id + e for e in CSV_DEFAULT_EXTENSIONS]
        for directory in image_dirs:
            for name in names:
                candidate = directory / name
                if candidate.is_file():
                    return candidate
        if ext is None:  # a DICOM, by content, named as the CSV gives it (often .dcm or no extension)
            for directory in image_dirs:
                candidate = directory / image_id
                if candidate.is_file() and is_dicom(candidate):
                    return candidate
        return None

    if split_col is not None:
        assignment = []
        for line, values in rows:
            split = SPLIT_ALIASES.get(values["split_col"].lower())
            if split is None:
                raise _error(f"{path}: line {line}: {split_col} value {values['split_col']!r} is not train, val or test")
            assignment.append(split)
        split_info: dict[str, Any] = {"method": f"column {split_col}"}
    else:
        # a row without a group value is its own group
        keyed = [(v["image_col"], v["label_col"], "g:" + v["group_col"] if v.get("group_col") else "i:" + v["image_col"])
                 for _, v in rows]
        assignment = stratified_split(str(path), keyed, val, test, seed)
        split_info = {"method": f"stratified sha256(seed, {'group' if group_col else 'image id'})", "val": val,
                      "test": test, "seed": seed}
    for required in ("train", "val"):
        if required not in assignment:
            raise _error(f"{path}: no {required} rows in column {split_col}")
    if group_col is not None:
        group_splits: dict[str, set[str]] = {}
        for (_, values), split in zip(rows, assignment):
            if values["group_col"]:
                group_splits.setdefault(values["group_col"], set()).add(split)
        leaks = sorted(g for g, s in group_splits.items() if len(s) > 1)
        if leaks:
            raise _error(
                f"{path}: {len(leaks)} {group_col} group(s) appear in more than one split (e.g. {', '.join(leaks[:MAX_EXAMPLES])}): "
                f"images of one group in train and val inflate validation scores"
            )
    splits = [s for s in SPLITS if s in assignment]
    classes = sorted({v["label_col"] for (_, v), s in zip(rows, assignment) if s == "train"})
    for (line, values), split in zip(rows, assignment):
        if values["label_col"] not in classes:
            raise _error(f"{path}: line {line}: {label_col} {values['label_col']!r} of the {split} split does not occur in train")
    if len(classes) < 2:
        raise _error(f"{path}: need at least 2 classes in column {label_col}, found {len(classes)} ({', '.join(classes)})")
    candidates: dict[str, list[tuple[Path | None, str, str]]] = {s: [] for s in splits}
    for (line, values), split in zip(rows, assignment):
        file = resolve(values["image_col"])
        shown = str(file) if file is not None else f"{values['image_col']} (line {line})"
        candidates[split].append((file, values["label_col"], shown))
    split_info["sizes"] = {s: len(candidates[s]) for s in splits}
    extra = {
        "split": split_info,
        "csv": {"rows": len(rows), "image_col": image_col, "label_col": label_col, "split_col": split_col,
                "group_col": group_col, "images": [str(d.absolute()) for d in image_dirs],
                "ext": ext or list(CSV_DEFAULT_EXTENSIONS)},
    }
    return _finish_file_task(path, "csv", candidates, classes, image_size, max_bad, given, extra, dicom)


# --------------------------------------------------------------------------- MedMNIST .npz


def _npz(path: Path, given: dict[str, str], image_size: int | None) -> TaskData:
    try:
        fingerprint = "sha256:" + _sha256(path)
    except OSError as exc:
        raise _error(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _error(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _error(f"{path}: a single .npy array, not an .npz archive with train_images, train_labels, ...")
    with archive:
        names = set(archive.files)
        splits = [s for s in SPLITS if f"{s}_images" in names or f"{s}_labels" in names]
        for split in ("train", "val", *(["test"] if "test" in splits else [])):
            for part in ("images", "labels"):
                if f"{split}_{part}" not in names:
                    raise _error(f"{path}: no array {split}_{part}; arrays present: {', '.join(sorted(names)) or 'none'}")
        splits = [s for s in SPLITS if s in ("train", "val") or s in splits]
        raw = {split: (_npz_array(archive, path, f"{split}_images"), _npz_array(archive, path, f"{split}_labels"))
               for split in splits}

    native = None
    channels = {}
    labels: dict[str, np.ndarray] = {}
    for split, (images, label_array) in raw.items():
        name = f"{split}_images"
        if images.dtype != np.uint8:
            raise _error(f"{path}: {name} has dtype {images.dtype}, expected uint8")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
            raise _error(f"{path}: {name} has shape {images.shape}, expected (N, H, W) grey or (N, H, W, 3) RGB")
        if images.shape[0] == 0:
            raise _error(f"{path}: {name} is empty")
        if images.shape[1] == 0 or images.shape[2] == 0:
            raise _error(f"{path}: {name} has shape {images.shape}: images of zero size")
        hw = tuple(images.shape[1:3])
        if native is None:
            native = hw
        elif hw != native and image_size is None:
            raise _error(f"{path}: {name} images are {hw[0]}x{hw[1]} but train_images are {native[0]}x{native[1]}; pass an image size")
        channels[split] = 3 if images.ndim == 4 and images.shape[-1] == 3 else 1
        lname = f"{split}_labels"
        if label_array.ndim == 2 and label_array.shape[1] > 1:
            raise _error(f"{path}: {lname} has shape {label_array.shape}: multi-label targets are not supported")
        if not (label_array.ndim == 1 or (label_array.ndim == 2 and label_array.shape[1] == 1)):
            raise _error(f"{path}: {lname} has shape {label_array.shape}, expected (N,) or (N, 1)")
        if label_array.dtype.kind not in "iu":
            raise _error(f"{path}: {lname} has dtype {label_array.dtype}, expected integers")
        flat = label_array.reshape(-1).astype(np.int64)
        if len(flat) != len(images):
            raise _error(f"{path}: {name} has {len(images)} images but {lname} has {len(flat)} labels")
        if flat.min() < 0:
            raise _error(f"{path}: {lname} has negative label {int(flat.min())}")
        labels[split] = flat

    top = max(int(flat.max()) for flat in labels.values())
    worst = max(labels, key=lambda s: int(labels[s].max()))
    # Labels are checked against the class list before anything is sized by them (a label of 1e9
    # would otherwise make a billion class names and a billion-wide count array).
    if "classes" not in given:
        present = np.unique(labels["train"])
        if top + 1 > len(present):
            missing, probe = [], 0
            known = set(present.tolist())
            while len(missing) < MAX_EXAMPLES and probe <= top:
                if probe not in known:
                    missing.append(str(probe))
                probe += 1
            more = top + 1 - len(present) - len(missing)
            listed = ", ".join(missing) + (f" and {more} more" if more > 0 else "")
            raise _error(
                f"{path}: {worst}_labels goes up to {top}, i.e. {top + 1} classes 0..{top}, but train_labels has "
                f"{len(present)} distinct labels: class(es) {listed} have no images in train_labels "
                "(labels must be 0..K-1; name them with classes=)"
            )
    if "classes" in given:
        classes = [name.strip() for name in given["classes"].split(",")]
        if any(not name for name in classes) or len(set(classes)) != len(classes):
            raise _error(f"{path}: option classes must be distinct non-empty comma-separated names, got {given['classes']!r}")
        if len(classes) != top + 1:
            raise _error(
                f"{path}: classes= names {len(classes)} classes but {worst}_labels goes up to {top} ({top + 1} classes)"
            )
    else:
        classes = [str(i) for i in range(top + 1)]
    if len(classes) < 2:
        raise _error(f"{path}: need at least 2 classes, all labels are {top}")
    _check_classes(classes, path)
    train_counts = np.bincount(labels["train"], minlength=len(classes))
    absent = [classes[i] for i in range(len(classes)) if train_counts[i] == 0]
    if absent:
        where = [s for s in splits if s != "train" and np.isin(labels[s], [classes.index(c) for c in absent]).any()]
        found = f"occur in {', '.join(s + '_labels' for s in where)} but " if where else ""
        raise _error(f"{path}: class(es) {', '.join(absent)} {found}have no images in train_labels")

    size = image_size or native[0]
    if image_size is None and native[0] != native[1]:
        raise _error(f"{path}: images are {native[0]}x{native[1]}, not square: pass an image size")
    try:
        tensors = {split: _npz_images(raw[split][0], size) for split in splits}
    except (DataError, CheckpointError) as exc:  # over the pixel budget, or a size the block refuses
        raise _error(f"{path}: {exc}") from None
    del raw
    class_counts = {s: dict(zip(classes, np.bincount(labels[s], minlength=len(classes)).tolist())) for s in splits}

    preprocessing = Preprocessing.exact(size, IMAGENET_MEAN, IMAGENET_STD)

    def factory(split: str, augment: AugmentationPreset | None) -> Dataset:
        return _ArrayImages(tensors[split], labels[split], preprocessing, augment)

    description = {
        "source": str(path.absolute()),
        "path": str(path.resolve()),
        "fingerprint": fingerprint,
        "kind": "npz",
        "image_size": size,
        "classes": classes,
        "counts": {s: int(len(labels[s])) for s in splits},
        "class_counts": class_counts,
        "native_size": list(native),
        "channels": {s: "rgb" if channels[s] == 3 else "grey (replicated to 3 channels)" for s in splits},
        "resized": bool(size != native[0] or size != native[1]),
        "interpolation": "Pillow bilinear (antialiased), once at load" if (size, size) != native else None,
        "classes_absent": {s: [c for c, n in class_counts[s].items() if n == 0] for s in splits if s != "train"},
        "options": dict(given),
    }
    return TaskData(list(classes), size, IMAGENET_MEAN, IMAGENET_STD, description, factory, tuple(splits), preprocessing)


def _sha256(path: Path) -> str:

    return sha256_file(path)


def _npz_array(archive, path: Path, name: str) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise _error(f"{path}: array {name} is an object (pickled) array; refused (only plain numeric arrays are read)") from None
        raise _error(f"{path}: array {name} cannot be read ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _error(f"{path}: array {name} cannot be read ({type(exc).__name__}: {exc})") from None


def _npz_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N,H,W[,C]) -> uint8 (N,size,size,3): grey replicated, resized once with the recorded pipeline.

    Resizing goes through :func:`mmexport.runtime.preprocess.pil_pipeline` (Pillow
    bilinear, antialiased), so an image of the native size given to the runtime's
    predictor is resized exactly as training and evaluation saw it.
    """
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    n, height, width = images.shape[:3]
    if (height, width) == (size, size):
        return np.ascontiguousarray(np.broadcast_to(images[..., None], (n, size, size, 3)) if images.ndim == 3 else images)
    prep = Preprocessing.exact(size, IMAGENET_MEAN, IMAGENET_STD)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for index in range(n):
        out[index] = np.asarray(pil_pipeline(Image.fromarray(images[index]), prep))
    return out
