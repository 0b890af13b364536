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

Both are stored as uint8 pixels (a quarter of float32's size) and normalised on
load by :func:`mmexport.runtime.preprocess.normalize` -- the function the training
side's evaluation used -- so the normalised inputs are bit-identical to what the
reference outputs were computed from. The file is read with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmexport.errors import CheckpointError
from mmexport.fileio import atomic_path
from mmexport.runtime.compare import ReferenceSet
from mmexport.runtime.preprocess import Preprocessing, normalize

REFERENCE_FORMAT = "mmexport-reference/1"
RANDOM_SET = "random"


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
        where = Path(path)
        try:
            with np.load(where, allow_pickle=False) as archive:
                if "format" not in archive.files or str(archive["format"]) != REFERENCE_FORMAT:
                    found = str(archive["format"]) if "format" in archive.files else "none"
                    raise CheckpointError(f"{where}: not an mmexport reference set (format {found}, expected {REFERENCE_FORMAT})")
                data = cls(
                    classes=tuple(str(c) for c in archive["classes"]),
                    preprocessing=Preprocessing.from_json(str(archive["preprocessing"])),
                    model_sha256=str(archive["model_sha256"]),
                    seed=int(archive["seed"]),
                )
                for index, name in enumerate(str(n) for n in archive["sets"]):
                    names = [str(n) for n in archive[f"set{index}/output_names"]]
                    outputs = {n: archive[f"set{index}/output{j}"] for j, n in enumerate(names)}
                    labels = archive[f"set{index}/labels"] if f"set{index}/labels" in archive.files else None
                    data.sets[name] = StoredSet(archive[f"set{index}/pixels"], outputs, labels)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise CheckpointError(f"{where}: unreadable reference set ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
        for name, stored in data.sets.items():
            count = len(stored.pixels)
            if stored.pixels.dtype != np.uint8 or stored.pixels.ndim != 4 or any(len(v) != count for v in stored.outputs.values()):
                raise CheckpointError(f"{where}: reference set {name!r} is inconsistent (pixels vs outputs)")
            if stored.labels is not None and (len(stored.labels) != count or (count and (
                    stored.labels.min() < 0 or stored.labels.max() >= len(data.classes)))):
                raise CheckpointError(f"{where}: reference set {name!r} has labels outside 0..{len(data.classes) - 1}")
        return data


__all__ = ["RANDOM_SET", "REFERENCE_FORMAT", "ReferenceData", "StoredSet"]
