"""Seeded synthetic skin-lesion images with three related classification tasks.

MedMerge merges two source backbones trained on *different* tasks and learns,
per kernel, how much of each to keep for a third one. To test that without
real data this module draws lesion-like blobs on skin-like backgrounds whose
label sets are built so that each source carries part of what the target needs:

* ``pigment`` (source A): the class is the lesion colour only; the border is
  drawn at random, independently.
* ``border`` (source B): the class is the boundary shape only; the colour is
  random. The boundary is ``r(t) = r0 (1 + sum_k a_k sin(k t + phi_k))`` in a
  stretched (aspect ratio), rotated frame: near-circle, elongated ellipse,
  many sizable higher harmonics (irregular), or one strong 3-5 lobe harmonic.
* ``target``: a diagnosis that is a fixed function ``_TARGET_OF[pigment, border]``.
  Every pigment maps to at least two diagnoses and so does every border
  (nevus and melanoma share dark-brown and differ by border; melanoma and
  seborrheic keratosis share the irregular border and differ by pigment), so
  neither source's features alone solve the target but together they do. The
  target is imbalanced: the class is drawn with ``TARGET_PRIORS``, then a
  (pigment, border) pair uniformly among those that give it.

Nuisances on every image: skin tone (light to medium-dark), skin texture,
illumination gradient and vignetting, lesion position/size/rotation, soft edge,
mottled interior with a darker core, per-image pigment jitter, dark hairs,
pixel noise. Image ``i`` of a split comes from its own RNG (a ``SeedSequence``
keyed by ``(seed, task, split)`` with spawn key ``i``), so it does not depend
on ``n``; images ``0 .. n_classes-1`` are forced to classes ``0 .. n_classes-1``
so every split with ``n >= n_classes`` holds every class. Rendering is batched
numpy; transcendental functions run in float64 so output bytes do not depend
on the CPU's SIMD flavour (up to vanishingly rare rounding ties).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from mmexport.config import check_int
from mmexport.errors import DataError

TASKS: tuple[str, ...] = ("pigment", "border", "target")
SPLITS: tuple[str, ...] = ("train", "val", "test")

PIGMENTS = ("light-brown", "dark-brown", "blue-grey", "red-pink")
BORDERS = ("round-regular", "oval-regular", "irregular", "multilobed")
DIAGNOSES = ("nevus", "melanoma", "seborrheic-keratosis", "blue-nevus", "vascular")
TARGET_PRIORS = np.array([0.45, 0.25, 0.15, 0.10, 0.05])

_NV, _MEL, _SK, _BN, _VASC = range(5)
# rows: pigment, columns: border (round, oval, irregular, multilobed)
_TARGET_OF = np.array([
    [_NV, _NV, _SK, _SK],        # light-brown
    [_NV, _NV, _MEL, _MEL],      # dark-brown
    [_BN, _BN, _MEL, _MEL],      # blue-grey (blue-white veil when irregular)
    [_VASC, _VASC, _MEL, _VASC],  # red-pink (amelanotic melanoma when irregular)
])
_PAIRS = [np.argwhere(_TARGET_OF == t) for t in range(len(DIAGNOSES))]

# Lesion colours (linear-ish RGB in [0, 1]) and skin tone range.
_PIGMENT_RGB = np.array([
    [0.70, 0.46, 0.30], [0.34, 0.21, 0.14], [0.42, 0.48, 0.60], [0.84, 0.38, 0.44]])
_SKIN_LIGHT = np.array([0.97, 0.84, 0.76])
_SKIN_DARK = np.array([0.74, 0.54, 0.41])
_HAIR_RGB = np.array([0.12, 0.08, 0.06])

_K = 12                      # harmonics 1.._K of the boundary
_NTHETA = 512                # boundary look-up table resolution
_HAIRS = 3                   # at most this many hairs
# uniform columns per image
(_U_CLS, _U_PAIR, _U_CX, _U_CY, _U_R0, _U_ASP, _U_ROT, _U_LOBEK, _U_LOBEA, _U_SOFT,
 _U_SKIN, _U_RED, _U_BRIGHT, _U_MIX, _U_MOTTLE, _U_CORE, _U_GRAD, _U_GDIR, _U_VIG,
 _U_NOISE, _U_NHAIR) = range(21)
_U_AMP = 21                  # _K amplitude draws
_U_PHI = _U_AMP + _K         # _K phase draws
_U_HAIR = _U_PHI + _K        # _HAIRS * 5 hair draws
_NU = _U_HAIR + 5 * _HAIRS
_NG = 3                      # gaussian pigment-colour jitter
_TEX = 8                     # texture control grid

# aspect ratio range and harmonic amplitude ceiling per border class
_ASPECT = np.array([[1.0, 1.12], [1.6, 2.2], [1.0, 1.35], [1.0, 1.15]])
_k = np.arange(1, _K + 1)
_AMP_MAX = np.zeros((4, _K))
_AMP_MAX[0, 1:4] = _AMP_MAX[1, 1:4] = 0.03
_AMP_MAX[2, 1:] = 0.34 / _k[1:] ** 0.8
_AMP_MAX[3, 1:6] = 0.03
_AMP_FLOOR = np.array([0.0, 0.0, 0.35, 0.0])   # irregular borders are never nearly smooth


def class_names(task: str) -> list[str]:
    """Ordered class names of a synthetic task."""
    _check_task(task)
    return list({"pigment": PIGMENTS, "border": BORDERS, "target": DIAGNOSES}[task])


def _check_task(task: object) -> None:
    if task not in TASKS:
        raise DataError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")


def _check_int(name: str, value: object, minimum: int) -> None:
    check_int(value, f"synthetic {name}", low=minimum, error=DataError)


def _validate(task: str, n: int, image_size: int, seed: int, split: str) -> None:
    _check_task(task)
    _check_int("n", n, 1)
    _check_int("image_size", image_size, 16)
    _check_int("seed", seed, 0)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _attributes(task: str, index: np.ndarray, u_cls: np.ndarray, u_pair: np.ndarray):
    """(pigment, border, label) from two uniforms per image; index < n_classes forces the class."""
    ncls = len(class_names(task))
    if task == "target":
        label = np.minimum(np.searchsorted(np.cumsum(TARGET_PRIORS), u_cls, side="right"), ncls - 1)
        label = np.where(index < ncls, index, label)
        pig, bor = np.empty_like(label), np.empty_like(label)
        for t, pairs in enumerate(_PAIRS):
            sel = label == t
            pick = pairs[(u_pair[sel] * len(pairs)).astype(np.int64)]
            pig[sel], bor[sel] = pick[:, 0], pick[:, 1]
        return pig, bor, label
    a = np.where(index < 4, index, (u_cls * 4).astype(np.int64))
    b = (u_pair * 4).astype(np.int64)
    return (a, b, a) if task == "pigment" else (b, a, a)


def _draw(task: str, start: int, stop: int, size: int, seed: int, split: str) -> dict:
    key = [seed, TASKS.index(task), SPLITS.index(split)]
    m = stop - start
    u, g = np.empty((m, _NU)), np.empty((m, _NG))
    tex = np.empty((m, 2, _TEX, _TEX))
    noise = np.empty((m, size, size, 3), np.float32)
    for j in range(m):
        rng = np.random.default_rng(np.random.SeedSequence(key, spawn_key=(start + j,)))
        u[j], g[j] = rng.random(_NU), rng.standard_normal(_NG)
        tex[j] = rng.standard_normal((2, _TEX, _TEX))
        noise[j] = rng.standard_normal((size, size, 3), dtype=np.float32)
    pig, bor, label = _attributes(task, np.arange(start, stop), u[:, _U_CLS], u[:, _U_PAIR])
    return dict(u=u, g=g, tex=tex, noise=noise, pigment=pig, border=bor, label=label)


def _sample_attributes(task: str, n: int, *, seed: int = 0, split: str = "train"):
    """(pigment, border, label) int64 arrays of the first ``n`` images (test helper)."""
    _validate(task, n, 16, seed, split)
    d = _draw(task, 0, n, 16, seed, split)
    return d["pigment"], d["border"], d["label"]


def _upsample_matrix(size: int) -> np.ndarray:
    """(size, _TEX) linear interpolation from a coarse grid to pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (_TEX - 1)
    return np.stack([np.interp(pos, np.arange(_TEX), np.eye(_TEX)[c]) for c in range(_TEX)], 1)


def _render(d: dict, size: int) -> np.ndarray:
    u, bor = d["u"], d["border"]
    m = len(u)
    col = lambda a: a[:, None, None]  # noqa: E731  per-image scalar -> (m, 1, 1)
    px = 2.0 / size                                          # one pixel in [-1, 1] units
    xs = (np.arange(size) + 0.5) * px - 1.0
    x, y = xs[None, None, :], xs[None, :, None]
    # --- lesion geometry: stretched, rotated frame and polar boundary look-up
    cx, cy = 0.4 * u[:, _U_CX] - 0.2, 0.4 * u[:, _U_CY] - 0.2
    r0 = 0.28 + 0.17 * u[:, _U_R0]
    lo, hi = _ASPECT[bor, 0], _ASPECT[bor, 1]
    sq = np.sqrt(lo + (hi - lo) * u[:, _U_ASP])
    rot = np.pi * u[:, _U_ROT]
    c, s = np.cos(rot), np.sin(rot)
    dx, dy = x - col(cx), y - col(cy)
    fu = (col(c) * dx + col(s) * dy) / col(sq)
    fv = (col(c) * dy - col(s) * dx) * col(sq)
    rho = np.sqrt(fu * fu + fv * fv)
    floor = _AMP_FLOOR[bor, None]
    amp = _AMP_MAX[bor] * (floor + (1 - floor) * u[:, _U_AMP:_U_AMP + _K])
    lobed = np.nonzero(bor == 3)[0]
    amp[lobed, 2 + (u[lobed, _U_LOBEK] * 3).astype(np.int64)] += 0.22 + 0.14 * u[lobed, _U_LOBEA]
    phi = 2 * np.pi * u[:, _U_PHI:_U_PHI + _K]
    theta = np.arange(_NTHETA + 1) * (2 * np.pi / _NTHETA)
    kt = _k[:, None] * theta[None, :]
    table = 1.0 + (amp * np.cos(phi)) @ np.sin(kt) + (amp * np.sin(phi)) @ np.cos(kt)
    table = np.maximum(table, 0.3) * r0[:, None]               # (m, _NTHETA + 1)
    pos = (np.arctan2(fv, fu) % (2 * np.pi)) * (_NTHETA / (2 * np.pi))
    i0 = np.minimum(pos.astype(np.int64), _NTHETA - 1).reshape(m, -1)
    frac = pos.reshape(m, -1) - i0
    t0 = np.take_along_axis(table, i0, 1)
    radius = (t0 + frac * (np.take_along_axis(table, i0 + 1, 1) - t0)).reshape(rho.shape)
    soft = (0.7 + 1.3 * u[:, _U_SOFT]) * px
    a = np.clip(0.5 + (radius - rho) / (2 * col(soft)), 0.0, 1.0)
    alpha = (a * a * (3 - 2 * a)).astype(np.float32)[..., None]
    inner = np.clip(1.0 - rho / radius, 0.0, 1.0).astype(np.float32)[..., None]
    # --- colours
    up = _upsample_matrix(size)
    tex = (up @ d["tex"] @ up.T).astype(np.float32)[..., None]  # (m, 2, S, S, 1)
    tone = u[:, _U_SKIN, None]
    skin = _SKIN_LIGHT + tone * (_SKIN_DARK - _SKIN_LIGHT)
    skin = skin * (1 + np.outer(0.06 * u[:, _U_RED] - 0.03, [1.0, -0.5, -0.5]))
    skin_px = skin[:, None, None, :].astype(np.float32) * (1 + 0.03 * tex[:, 1])
    lesion = _PIGMENT_RGB[d["pigment"]] * (0.88 + 0.24 * u[:, _U_BRIGHT, None]) * (1 + 0.05 * d["g"])
    mix = 0.05 + 0.15 * u[:, _U_MIX, None]                      # translucency towards skin
    # keep contrast on darker skin: the lesion is at most 65% as bright as its skin
    lesion = lesion * np.minimum(1.0, 0.65 * skin.mean(1, keepdims=True) / lesion.mean(1, keepdims=True))
    lesion = ((1 - mix) * lesion + mix * skin)[:, None, None, :].astype(np.float32)
    mottle = (0.05 + 0.08 * u[:, _U_MOTTLE]).astype(np.float32)
    core = (0.2 * u[:, _U_CORE]).astype(np.float32)
    lesion_px = lesion * (1 + col(mottle)[..., None] * tex[:, 0]) * (1 - col(core)[..., None] * inner)
    img = skin_px + alpha * (lesion_px - skin_px)
    # --- illumination: linear gradient times vignetting
    gdir = 2 * np.pi * u[:, _U_GDIR]
    light = (1 + col(0.12 * u[:, _U_GRAD]) * (col(np.cos(gdir)) * x + col(np.sin(gdir)) * y)) \
        * (1 - col(0.2 * u[:, _U_VIG]) * (x * x + y * y) / 2)
    img = img * light.astype(np.float32)[..., None]
    # --- hairs: thin, slightly curved dark lines on about a third of the images
    nhair = np.searchsorted([0.65, 0.8, 0.92], u[:, _U_NHAIR], side="right")
    for h in range(_HAIRS):
        idx = np.nonzero(nhair > h)[0]
        if len(idx) == 0:
            continue
        hu = u[idx, _U_HAIR + 5 * h:_U_HAIR + 5 * h + 5]
        ang, off = np.pi * hu[:, 0], 1.6 * hu[:, 1] - 0.8
        curv, width = 0.4 * hu[:, 2] - 0.2, (0.5 + 0.6 * hu[:, 3]) * px
        nx, ny = col(-np.sin(ang)), col(np.cos(ang))
        along = col(np.cos(ang)) * x + col(np.sin(ang)) * y
        dist = np.abs(nx * x + ny * y - col(off) - col(curv) * along * along)
        ha = np.clip(1 - dist / col(width), 0, 1) * col(0.6 + 0.35 * hu[:, 4])
        ha = ha.astype(np.float32)[..., None]
        img[idx] += ha * (_HAIR_RGB.astype(np.float32) - img[idx])
    img += d["noise"] * col(0.01 + 0.03 * u[:, _U_NOISE]).astype(np.float32)[..., None]
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _generate_full(task: str, n: int, image_size: int, seed: int, split: str):
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels, pig, bor = (np.empty(n, np.int64) for _ in range(3))
    chunk = max(1, (1 << 20) // (image_size * image_size))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        d = _draw(task, start, stop, image_size, seed, split)
        images[start:stop] = _render(d, image_size)
        labels[start:stop], pig[start:stop], bor[start:stop] = d["label"], d["pigment"], d["border"]
    return images, labels, pig, bor


def generate(task: str, n: int, *, image_size: int = 64, seed: int = 0,
             split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: uint8 ``(n, image_size, image_size, 3)`` and int64 ``(n,)``."""
    _validate(task, n, image_size, seed, split)
    images, labels, _, _ = _generate_full(task, int(n), int(image_size), int(seed), split)
    return images, labels


def write_imagefolder(root: str | os.PathLike, task: str, *, n_train: int, n_val: int,
                      n_test: int = 0, image_size: int = 64, seed: int = 0) -> pathlib.Path:
    """Write ``root/<split>/<class>/<index>.png`` for train, val (and test if ``n_test > 0``).

    Every written split needs at least one image per class (torchvision's
    ImageFolder rejects empty class folders); all arguments are checked before
    anything is written.
    """
    _validate(task, 1, image_size, seed, "train")
    names = class_names(task)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, count in counts.items():
        _check_int(f"n_{split}", count, 0 if split == "test" else 1)
        if 0 < count < len(names):
            raise DataError(f"n_{split}={count} is below the {len(names)} classes of task {task!r}: "
                            "every written split needs one image per class")
    from PIL import Image

    root = pathlib.Path(root)
    for split, count in counts.items():
        if count == 0:
            continue
        images, labels = generate(task, count, image_size=image_size, seed=seed, split=split)
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(root / split / names[lab] / f"{i:06d}.png")
    return root
