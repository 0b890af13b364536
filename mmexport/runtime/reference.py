"""The stored reference: inputs and the torch fp32 outputs every artifact of a run is judged against.

Written once, when a run's final network is written (``reference.npz``, hashed in
the manifest), so every later check -- ONNX Runtime on a CPU, TensorRT on a GPU
host without PyTorch -- is "run the artifact on these inputs, compare with these
outputs" (:mod:`mmexport.runtime.compare`).

Two input sets:

* ``random``: seeded uniformly random 8-bit RGB images at the model's size,
  normalised like real inputs (they cover the whole normalised range);
* ``data:<split>``: labelled held-out target images (the test split when the
  dataset has one, else val), after the colour/resize/crop steps of the recorded
  preprocessing, kept as 8 bits.

How many held-out images a new reference keeps is sized by memory, not a fixed
count: every image of the split, up to :data:`HELD_OUT_BUDGET_BYTES` (256 MiB) of
stored pixels (:func:`held_out_limit`: 1,783 images at 224 px, 606 at 384 px) and
at most :data:`MAX_HELD_OUT_IMAGES` (20,000; reached below 66 px). A top-1 floor is judged by a confidence
bound whose width shrinks with N (:mod:`mmexport.runtime.tolerances`), so the
reference keeps what the split has rather than a sample of it.

Both are stored as uint8 pixels (a quarter of float32's size) and normalised on
load by :func:`mmexport.runtime.preprocess.normalize` -- the function the training
side's evaluation used -- so the normalised inputs are bit-identical to what the
reference outputs were computed from. The file is read with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmexport.config import MAX_SEED, check_int
from mmexport.errors import CheckpointError, one_line
from mmexport.fileio import atomic_path, is_sha256_hex
from mmexport.runtime.compare import ReferenceSet
from mmexport.runtime.modelinfo import check_class_names
from mmexport.runtime.preprocess import Preprocessing, normalize

REFERENCE_FORMAT = "mmexport-reference/1"
RANDOM_SET = "random"
DATA_SET_PREFIX = "data:"  # labelled held-out images: data:<split>

HELD_OUT_BUDGET_BYTES = 256 * 2**20  # stored held-out pixels (uint8 S x S x 3 each) a new reference may hold
MAX_HELD_OUT_IMAGES = 20_000  # and at most this many: beyond it time, not memory, dominates (the bound of
#                               20,000 perfect agreements is 99.99 %, nothing a floor needs more of)


def held_out_limit(image_size: int, budget_bytes: int = HELD_OUT_BUDGET_BYTES) -> int:
    """How many held-out images of ``image_size`` px a new reference keeps: ``budget_bytes`` of uint8 pixels,
    at most :data:`MAX_HELD_OUT_IMAGES`, at least 1."""
    per_image = 3 * int(image_size) * int(image_size)
    return max(1, min(MAX_HELD_OUT_IMAGES, int(budget_bytes) // per_image))


class NormalisedView:
    """The normalised float32 NCHW inputs of uint8 pixels, computed slice by slice (``len`` and ``view[a:b]``).

    A verification runs a set batch by batch (:func:`mmexport.runtime.compare.run_batched`), so the
    float32 copy -- four times the stored pixels -- exists one batch at a time, never for the whole set.
    """

    def __init__(self, pixels: np.ndarray, preprocessing: Preprocessing) -> None:
        self.pixels, self.preprocessing = pixels, preprocessing

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("a NormalisedView is read by slices")
        part = self.pixels[index]
        return normalize(part, self.preprocessing) if len(part) else np.zeros((0, 3, *part.shape[1:3]), np.float32)


@dataclass
class StoredSet:
    pixels: np.ndarray  # uint8 N x H x W x 3, after colour/resize/crop
    outputs: dict[str, np.ndarray]  # output name -> float32 reference outputs
    labels: np.ndarray | None = None


@dataclass
class ReferenceData:
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    model_sha256: str
    seed: int
    sets: dict[str, StoredSet] = field(default_factory=dict)

    # -- inputs --------------------------------------------------------------------------------
    def inputs(self, name: str, limit: int | None = None) -> np.ndarray:
        """The normalised float32 NCHW inputs of one set (its first ``limit`` samples)."""
        pixels = self.sets[name].pixels
        if limit is not None:
            pixels = pixels[:limit]
        return normalize(pixels, self.preprocessing) if len(pixels) else np.zeros((0, 3, *pixels.shape[1:3]), np.float32)

    def input_view(self, name: str, limit: int | None = None) -> NormalisedView:
        """:meth:`inputs` normalised lazily, batch by batch (what a verification of a large set runs on)."""
        pixels = self.sets[name].pixels
        return NormalisedView(pixels[:limit] if limit is not None else pixels, self.preprocessing)

    def reference_sets(self, limits: dict[str, int] | None = None) -> dict[str, ReferenceSet]:
        """Each set's stored outputs (and labels), cut to the same ``limits`` as :meth:`inputs`."""
        limits = limits or {}
        result = {}
        for name, stored in self.sets.items():
            limit = limits.get(name)
            cut = (lambda a: a[:limit]) if limit is not None else (lambda a: a)
            result[name] = ReferenceSet({k: cut(v) for k, v in stored.outputs.items()},
                                        None if stored.labels is None else cut(stored.labels))
        return result

    @property
    def labelled_set(self) -> str | None:
        return next((name for name, s in self.sets.items() if s.labels is not None), None)

    def counts(self) -> dict[str, int]:
        return {name: int(len(s.pixels)) for name, s in self.sets.items()}

    # -- file ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        arrays: dict[str, np.ndarray] = {
            "format": np.array(REFERENCE_FORMAT),
            "classes": np.array(list(self.classes), dtype=np.str_),
            "preprocessing": np.array(self.preprocessing.to_json()),
            "model_sha256": np.array(self.model_sha256),
            "seed": np.array(self.seed, dtype=np.int64),
            "sets": np.array(list(self.sets), dtype=np.str_),
        }
        for index, (name, stored) in enumerate(self.sets.items()):
            arrays[f"set{index}/pixels"] = np.ascontiguousarray(stored.pixels, dtype=np.uint8)
            arrays[f"set{index}/output_names"] = np.array(list(stored.outputs), dtype=np.str_)
            for j, value in enumerate(stored.outputs.values()):
                arrays[f"set{index}/output{j}"] = np.ascontiguousarray(value, dtype=np.float32)
            if stored.labels is not None:
                arrays[f"set{index}/labels"] = np.asarray(stored.labels, dtype=np.int64)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)  # uncompressed: random pixels do not compress, loading stays fast
                handle.flush()
                os.fsync(handle.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ReferenceData":
        """Read and validate a reference file (:func:`_read_validated`): one-line :class:`CheckpointError` otherwise."""
        where = Path(path)
        try:
            with np.load(where, allow_pickle=False) as archive:
                if not hasattr(archive, "zip"):  # a bare .npy: np.load returned an array
                    raise CheckpointError(f"{where}: not an mmexport reference set (a single array, not an .npz archive)")
                return _read_validated(cls, archive, str(where))
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{where}: unreadable reference set ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


# -- reading: every array's header is checked before its data is read ---------------------------
# A forged or damaged file must fail in one line naming the field, never load as a smaller, still
# "passing" reference (a set dropped, labels ignored) and never allocate what its header claims
# beyond these bounds. A reference mmexport writes holds 64 random images (verify_samples) and at
# most HELD_OUT_BUDGET_BYTES (256 MiB) / MAX_HELD_OUT_IMAGES held-out ones: ~260 MiB at 224 px.
# The bounds leave room above that (a larger --verify-samples, a 1,024 px model's random set)
# and stay far below what a forged header could make a reader allocate.
MAX_SETS = 16
MAX_OUTPUTS = 16
MAX_SAMPLES = 5 * MAX_HELD_OUT_IMAGES  # images of one set (100,000)
MAX_CLASSES = 100_000
MAX_NAME = 256  # characters of a set or output name
MAX_TEXT_CHARS = 2**20  # of one string (the preprocessing block is ~300)
MAX_REFERENCE_BYTES = 32 * HELD_OUT_BUDGET_BYTES  # all arrays together, as their headers declare them (8 GiB)


class _Archive:
    """The arrays of an open ``.npz``, each read only after its header passed :meth:`array`'s checks."""

    def __init__(self, archive: Any, where: str) -> None:
        self.archive, self.where = archive, where
        self.members = {name.removesuffix(".npy"): name for name in archive.zip.namelist()}
        self.read: set[str] = set()
        self.budget = MAX_REFERENCE_BYTES

    def fail(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: reference field {key!r} {problem}")

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        if key not in self.members:
            raise self.fail(key, "is missing")
        with self.archive.zip.open(self.members[key]) as handle:
            try:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                else:
                    raise ValueError(f"npy format version {version} is not one numpy.savez writes here")
            except ValueError as exc:
                raise self.fail(key, f"is not a readable array ({one_line(exc)})") from None
        return tuple(shape), np.dtype(dtype)

    def array(self, key: str, *, kinds: str, ndim: int, what: str, shape: tuple[int | None, ...] | None = None,
              max_len: int | None = None, exact: type | None = None) -> np.ndarray:
        """The array ``key`` if its dtype kind is one of ``kinds`` (or its dtype ``exact``) and its shape fits.

        ``None`` in ``shape``: any length. Checked on the header, before the data is read.
        """
        found_shape, dtype = self.header(key)
        if dtype.kind not in kinds or dtype.hasobject or (exact is not None and dtype != np.dtype(exact)):
            raise self.fail(key, f"must be {what}, got dtype {dtype}")
        if dtype.kind == "U" and dtype.itemsize // 4 > MAX_TEXT_CHARS:
            raise self.fail(key, f"holds strings of {dtype.itemsize // 4} characters, over the {MAX_TEXT_CHARS} allowed")
        if len(found_shape) != ndim or (shape is not None and any(
                want is not None and got != want for got, want in zip(found_shape, shape))):
            raise self.fail(key, f"must be {what}, got shape {found_shape}")
        if max_len is not None and ndim and found_shape[0] > max_len:
            raise self.fail(key, f"holds {found_shape[0]} entries, more than the {max_len} a reference set may hold")
        size = int(np.prod(found_shape, dtype=np.float64) * dtype.itemsize)  # float: a forged shape must not overflow
        if size > self.budget:
            raise self.fail(key, f"declares {size} bytes: over the {MAX_REFERENCE_BYTES // 2**30} GiB of a reference file")
        self.budget -= size
        self.read.add(key)
        return self.archive[key]

    def text(self, key: str) -> str:
        return str(self.array(key, kinds="U", ndim=0, what="one string"))

    def strings(self, key: str, *, max_len: int, what: str) -> list[str]:
        return [str(v) for v in self.array(key, kinds="U", ndim=1, what=f"a 1-D array of {what}", max_len=max_len)]

    def names(self, key: str, *, max_len: int, what: str) -> list[str]:
        values = self.strings(key, max_len=max_len, what=what)
        for value in values:
            if not value or len(value) > MAX_NAME or not value.isprintable():
                raise self.fail(key, f"holds {value[:40]!r}: {what} are 1-{MAX_NAME} printable characters")
        if len(set(values)) != len(values):
            raise self.fail(key, f"names a {what[:-1]} twice")
        return values




def _read_validated(cls: type[ReferenceData], archive: Any, where: str) -> ReferenceData:
    """Every field the format defines, checked: names present, dtypes, shapes, counts, label range, no stray arrays."""
    arrays = _Archive(archive, where)
    found_format = arrays.text("format") if "format" in arrays.members else "none"
    if found_format != REFERENCE_FORMAT:
        raise CheckpointError(f"{where}: not an mmexport reference set (format {found_format[:80]!r}, "
                              f"expected {REFERENCE_FORMAT})")
    names = arrays.strings("classes", max_len=MAX_CLASSES, what="class names")
    try:  # the one class-name rule of the package (one line for every reader, distinct, printable)
        classes = check_class_names(names, where)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (reference field 'classes')") from None
    try:
        preprocessing = Preprocessing.from_json(arrays.text("preprocessing"))
        height, width = (int(v) for v in preprocessing.output_size)
    except (CheckpointError, TypeError, ValueError) as exc:
        raise arrays.fail("preprocessing", f"is not a valid preprocessing block ({one_line(exc)})") from None
    model_sha256 = arrays.text("model_sha256")
    if not is_sha256_hex(model_sha256):
        raise arrays.fail("model_sha256", "must be 64 lowercase hex digits (a sha256)")
    seed = arrays.array("seed", kinds="iu", ndim=0, what="one integer")
    data = cls(classes=classes, preprocessing=preprocessing, model_sha256=model_sha256,
               seed=check_int(seed.item(), f"{where}: reference field 'seed'", low=0, high=MAX_SEED, error=CheckpointError))
    set_names = arrays.names("sets", max_len=MAX_SETS, what="set names")
    if RANDOM_SET not in set_names:
        raise arrays.fail("sets", f"does not name the {RANDOM_SET!r} set every reference holds")
    for index, name in enumerate(set_names):
        data.sets[name] = _read_set(arrays, f"set{index}", name, len(classes), (height, width))
    stray = sorted(set(arrays.members) - arrays.read)
    if stray:  # e.g. a set the 'sets' list does not name: it would be silently ignored
        raise arrays.fail(stray[0], f"is not part of the reference format (the 'sets' list names {len(set_names)} set(s))")
    return data


def _read_set(arrays: _Archive, prefix: str, name: str, num_classes: int, size: tuple[int, int]) -> StoredSet:
    pixels = arrays.array(f"{prefix}/pixels", kinds="u", exact=np.uint8, ndim=4, shape=(None, *size, 3), max_len=MAX_SAMPLES,
                          what=f"uint8 pixels N x {size[0]} x {size[1]} x 3 (set {name!r})")
    count = len(pixels)
    output_names = arrays.names(f"{prefix}/output_names", max_len=MAX_OUTPUTS, what="output names")
    if not output_names:  # no outputs: every comparison of the set would pass on nothing
        raise arrays.fail(f"{prefix}/output_names", f"is empty: set {name!r} has no reference outputs")
    outputs = {}
    for j, output in enumerate(output_names):
        key = f"{prefix}/output{j}"
        value = arrays.array(key, kinds="f", exact=np.float32, ndim=2, shape=(count, num_classes),
                             what=f"float32 outputs {count} x {num_classes} (set {name!r}, output {output!r})")
        if not np.isfinite(value).all():
            raise arrays.fail(key, f"holds values that are not finite (set {name!r}, output {output!r})")
        outputs[output] = value
    labels = None
    label_key = f"{prefix}/labels"
    if label_key in arrays.members:
        labels = arrays.array(label_key, kinds="iu", ndim=1, shape=(count,),
                              what=f"integer class indices, one per image ({count}) of set {name!r}")
        if count and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise arrays.fail(label_key, f"holds class indices outside 0..{num_classes - 1} (set {name!r})")
        labels = labels.astype(np.int64)
    elif name.startswith(DATA_SET_PREFIX):  # held-out data is stored with its labels; without them it judges nothing int8 needs
        raise arrays.fail(label_key, f"is missing: the labelled set {name!r} has no labels")
    return StoredSet(pixels, outputs, labels)


__all__ = ["DATA_SET_PREFIX", "HELD_OUT_BUDGET_BYTES", "MAX_HELD_OUT_IMAGES", "NormalisedView", "RANDOM_SET",
           "REFERENCE_FORMAT", "ReferenceData", "StoredSet", "held_out_limit"]
