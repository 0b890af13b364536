"""Training configuration: plain data, no torch, so the CLI can build its options (and ``--help``) without it."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields

from mmexport.errors import ArchitectureError, MMExportError

# Kept equal to mmexport.torchside.backbones.BACKBONES (checked there at import).
ARCHITECTURES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "densenet169", "densenet201",
)
METHODS = ("medmerge", "average", "finetune-a", "finetune-b", "lpft-a", "lpft-b")
MERGE_METHODS = ("medmerge", "average")
# Which sources each method reads.
METHOD_SOURCES = {"medmerge": "AB", "average": "AB", "finetune-a": "A", "lpft-a": "A", "finetune-b": "B", "lpft-b": "B"}
# Training augmentation presets (built in mmexport.torchside.data). None of the defaults may change
# what an image means: flips and rotations are wrong wherever orientation or laterality is
# part of the label (chest X-rays, fundus left/right eye, text and digits).
AUGMENTATIONS: dict[str, str] = {
    "none": "no augmentation: the evaluation transform",
    "light": "random resized crop of 80-100 % of the area (aspect 0.9-1.1) and brightness/contrast/saturation "
             "jitter of 10 %; no flips or rotations, so it never changes what an image means",
    "orientation-free": "random resized crop of 60-100 %, horizontal and vertical flips, rotations by 90°, colour "
                        "jitter: for images with no preferred orientation (dermoscopy, histology)",
    "legacy": "the default of mmexport 0.1: random resized crop of 60-100 %, horizontal and vertical flips and colour "
              "jitter for image files, flips only for arrays; wrong for orientation-sensitive images",
}
DEFAULT_AUGMENTATION = "light"
# The source spec that asks for a randomly initialised backbone (``scratch`` or ``scratch:SEED``).
SCRATCH = "scratch"
MAX_SEED = 2**32 - 1  # NumPy's seed range
MAX_BATCH_SIZE = 65536
MIN_IMAGE_SIZE = 16  # below this the torchvision backbones' downsampling runs out of pixels
# Training keeps every layer's activations for the backward pass: for these backbones that is
# over 100 times the float32 input per image (ResNet-18: ~115x). Counting only 32x gives a
# lower bound, so a size refused by it cannot train here whatever the architecture.
ACTIVATION_FACTOR = 32
GRANULARITIES: tuple[str, ...] = ("kernel", "filter", "layer")
BN_INITS = ("blend", "reestimate")
# Source B's channels before the merge: as stored, or permuted into A's order by weight matching
# (Git Re-Basin; mmexport.torchside.align). Only merges read it: a single source has nothing to match.
# auto: weights where the lineage check finds no shared ancestor, for medmerge on a ResNet; as stored otherwise
# (compatibility.alignment_decision). The default stays none: in the study (docs/merge-study.md) auto did not win
# the worst case (-0.6 against -0.5 test macro-F1 points, 5 seeds, inside the spread).
ALIGNMENTS = ("auto", "none", "weights")
MAX_INTENDED_USE = 500  # characters of --intended-use
SCHEDULES = ("cosine", "constant")
BALANCING = ("none", "balanced")
# Options that may differ between an interrupted run and its --resume.
RESUME_FREE = ("force", "resume", "device", "num_workers", "intended_use")


def max_workers() -> int:
    """The largest --workers accepted: 4 per CPU core, at least 64."""
    return max(64, 4 * (os.cpu_count() or 1))


def _comma_list(text: str, convert, error: str) -> list:
    """The non-empty comma-separated parts of ``text``, each through ``convert``; ``error`` names a bad part."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            values.append(convert(part))
        except ValueError:
            raise MMExportError(error.format(part=part)) from None
    return values


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``"0.03,0.1,0.3"`` -> (0.03, 0.1, 0.3); an empty string -> (); one-line errors."""
    return tuple(_comma_list(text, float, option + ": {part!r} is not a number (give comma-separated numbers, e.g. 0.03,0.1,0.3)"))


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2), each in [0, 2**32 - 1], no repeats."""
    seeds = _comma_list(text, int, "--seeds: {part!r} is not an integer (give comma-separated seeds, e.g. 0,1,2)")
    for index, seed in enumerate(seeds):
        check_seed(seed, "--seeds")
        if seed in seeds[:index]:
            raise MMExportError(f"--seeds: seed {seed} given twice")
    if not seeds:
        raise MMExportError("--seeds: give at least one seed, e.g. 0,1,2")
    return tuple(seeds)


def check_int(value: object, what: str, *, low: int = 1, high: int | None = None,
              error: type[MMExportError] = MMExportError) -> int:
    """``value`` if it is an integer in ``[low, high]`` (a bool is not), else one line naming ``what``.

    The one integer validator of the package: options, settings objects and file fields all use it,
    so every refusal reads the same way.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        if high is not None:
            wanted = f"an integer from {low} to {high}"
        else:
            wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        what = what.replace("\r", "\\r").replace("\n", "\\n")  # a path in ``what`` must not break the one line
        # repr() of an int over 4300 digits raises; a forged file can hold one
        shown = (f"an integer of {len(str(abs(value)).lstrip('0')) if value.bit_length() < 10000 else 'over 3000'} digits"
                 if isinstance(value, int) and abs(value) >= 10**18 else repr(value)[:80])
        raise error(f"{what} must be {wanted}, got {shown}")
    return int(value)


def check_seed(seed: object, option: str = "--seed") -> int:
    return check_int(seed, option, low=0, high=MAX_SEED)


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_image_size(image_size: object, batch_size: int, option: str = "--image-size") -> None:
    """An explicit input size: an integer >= MIN_IMAGE_SIZE whose training memory fits this machine.

    The estimate is a lower bound (``batch x 3 x S x S`` float32 input x ACTIVATION_FACTOR), so a
    refused size could not train here; it is checked before any image or network is allocated.
    """
    if image_size is None:
        return
    check_int(image_size, option, low=MIN_IMAGE_SIZE)
    need = batch_size * 3 * image_size * image_size * 4 * ACTIVATION_FACTOR
    have = physical_memory()
    if have is not None and need > have:
        raise MMExportError(
            f"{option} {image_size} needs at least {_gib(need)} of memory to train a batch of {batch_size} "
            f"({batch_size} x 3 x {image_size}x{image_size} float32 x {ACTIVATION_FACTOR} for the activations); "
            f"this machine has {_gib(have)}: use a smaller --image-size or --batch-size"
        )


DICOM_VOI_POLICIES = ("none", "file", "window")
DICOM_WINDOW_FUNCTIONS = ("linear", "linear_exact", "sigmoid")
# The DICOM policy's bounds, for the options here and for mmexport.runtime.dicom (which imports them).
# A window is in modality units (HU for CT: lung -600/1500, brain 40/80, bone 400/1800); 1e7 covers
# 32-bit stored values rescaled, and keeps a forged block's numbers finite.
MAX_DICOM_WINDOW = 1e7
MAX_DICOM_FRAME = 65535  # Number of Frames is an IS; real cine loops and tomosynthesis stay far below


def parse_dicom_voi(text: object) -> dict:
    """``none`` | ``file`` | ``window:CENTER,WIDTH[:linear|linear_exact|sigmoid]`` -> the VOI fields; one-line errors.

    Plain data (this module is below the runtime): the runtime's ``DicomPixels`` is built from it.
    """
    usage = "give none, file or window:CENTER,WIDTH[:linear|linear_exact|sigmoid] (e.g. window:-600,1500)"
    if not isinstance(text, str):
        raise MMExportError(f"--dicom-voi must be a string; {usage}")
    shown = repr(text[:60]).replace("\n", "\\n")
    kind, _, rest = text.strip().partition(":")
    if kind in ("none", "file") and not rest:
        return {"voi": kind, "window_center": None, "window_width": None, "window_function": None}
    if kind != "window" or not rest:
        raise MMExportError(f"--dicom-voi {shown}: unknown policy; {usage}")
    numbers_text, _, function = rest.partition(":")
    function = function.strip() or "linear"
    if function not in DICOM_WINDOW_FUNCTIONS:
        raise MMExportError(f"--dicom-voi {shown}: unknown window function {function!r}; "
                            f"choose one of {', '.join(DICOM_WINDOW_FUNCTIONS)}")
    parts = [p.strip() for p in numbers_text.split(",")]
    try:
        center, width = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        center = width = None
    if center is None or width is None:
        raise MMExportError(f"--dicom-voi {shown}: the window must be two numbers CENTER,WIDTH; {usage}")
    if not (math.isfinite(center) and math.isfinite(width) and abs(center) <= MAX_DICOM_WINDOW
            and width <= MAX_DICOM_WINDOW):
        raise MMExportError(f"--dicom-voi {shown}: centre and width must be finite numbers of magnitude "
                            f"at most {MAX_DICOM_WINDOW:g}")
    if function == "linear" and width < 1:
        raise MMExportError(f"--dicom-voi {shown}: a linear window needs a width of at least 1 (PS3.3 C.11.2.1.2)")
    if width <= 0:
        raise MMExportError(f"--dicom-voi {shown}: the window width must be above 0")
    return {"voi": "window", "window_center": center, "window_width": width, "window_function": function}


def check_arch(name: str) -> str:
    if name not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    return name


def check_finite(values: dict[str, float]) -> None:
    """Every numeric option must be a finite number (NaN/inf would train garbage silently)."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise MMExportError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


@dataclass
class TrainConfig:
    arch: str
    source_a: str
    source_b: str
    data: str
    out: str
    method: str = "medmerge"
    granularity: str = "kernel"
    merge_epochs: int = 10
    finetune_epochs: int = 10
    batch_size: int = 32
    # Defaults chosen by benchmarks/merge_study.py (see benchmarks/results/merge_study/).
    lr_logits: float = 1e-1
    # Candidate logit learning rates tried for ``lr_probe_epochs`` epochs each at the start of
    # stage 1; the best on val macro-F1 continues (empty: use ``lr_logits``).
    lr_logits_probe: tuple[float, ...] = ()
    lr_probe_epochs: int = 2
    # Keep σ inside [bound, 1 - bound] by clamping the logits after each step (0: unbounded).
    sigma_bound: float = 0.0
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    patience: int = 0  # epochs without val macro-F1 improvement before a stage stops; 0 = never
    class_weights: str = "none"
    sampler: str = "none"
    augmentation: str = DEFAULT_AUGMENTATION
    initial_logit: float = 0.0
    bn_init: str = "reestimate"
    align: str = "none"
    # What the model is for, in the user's words: the model card's "intended use" (None: research use only,
    # not for clinical use). One printable line.
    intended_use: str | None = None
    image_size: int | None = None
    # The DICOM pixel policy recorded in the run's preprocessing block (see docs/dicom.md): ``none``,
    # ``file`` or ``window:CENTER,WIDTH[:FUNCTION]``; None: ``none`` for a DICOM dataset, nothing otherwise.
    dicom_voi: str | None = None
    dicom_frame: int | None = None  # None: multi-frame DICOMs are refused; N: their frame N (0-based)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    verify_samples: int = 64
    num_workers: int = 0
    force: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        self.lr_logits_probe = tuple(self.lr_logits_probe)

    def validate(self) -> None:
        check_arch(self.arch)
        check_finite({f.name: getattr(self, f.name) for f in fields(self)})
        for value in self.lr_logits_probe:
            check_finite({"lr_logits_probe": value})
        choices = {
            "method": METHODS, "granularity": GRANULARITIES, "bn_init": BN_INITS, "align": ALIGNMENTS, "schedule": SCHEDULES,
            "class_weights": BALANCING, "sampler": BALANCING, "augmentation": tuple(AUGMENTATIONS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MMExportError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.merge_epochs < 0 or self.finetune_epochs < 0 or self.merge_epochs + self.finetune_epochs < 1:
            raise MMExportError("--merge-epochs and --finetune-epochs must be >= 0 and not both 0")
        if self.method in MERGE_METHODS and self.merge_epochs < 1:
            raise MMExportError(f"--merge-epochs must be at least 1 for --method {self.method} (stage 1 is the merge)")
        if self.align == "weights" and self.method not in MERGE_METHODS:
            raise MMExportError(f"--align {self.align} aligns source B to source A before a merge; --method {self.method} "
                                "trains one source: drop --align")
        if self.intended_use is not None and (
                not isinstance(self.intended_use, str) or not self.intended_use.strip()
                or len(self.intended_use) > MAX_INTENDED_USE or not self.intended_use.isprintable()):
            raise MMExportError(f"--intended-use must be one printable line of 1-{MAX_INTENDED_USE} characters")
        check_seed(self.seed)
        check_int(self.batch_size, "--batch-size", low=1, high=MAX_BATCH_SIZE)
        check_int(self.num_workers, "--workers", low=0, high=max_workers())
        check_image_size(self.image_size, self.batch_size)
        self.dicom_policy()
        if self.warmup_epochs < 0 or self.patience < 0:
            raise MMExportError("--warmup-epochs and --patience must be >= 0")
        for name in ("lr_logits", "lr_head", "lr_backbone"):
            if not getattr(self, name) > 0:
                raise MMExportError(f"--{name.replace('_', '-')} must be positive")
        if any(not v > 0 for v in self.lr_logits_probe) or len(set(self.lr_logits_probe)) != len(self.lr_logits_probe):
            raise MMExportError(f"--lr-logits-probe: candidates must be distinct positive numbers, got {list(self.lr_logits_probe)}")
        if self.lr_logits_probe and not 1 <= self.lr_probe_epochs <= self.merge_epochs:
            raise MMExportError(f"--lr-probe-epochs must be from 1 to --merge-epochs ({self.merge_epochs}), got {self.lr_probe_epochs}")
        if not 0.0 <= self.sigma_bound < 0.5:
            raise MMExportError(f"--sigma-bound must be in [0, 0.5) (0 = unbounded), got {self.sigma_bound}")
        for label, spec in (("a", self.source_a), ("b", self.source_b)):
            if label.upper() in METHOD_SOURCES.get(self.method, "") and not str(spec).strip():
                raise MMExportError(f"--source-{label} is required for --method {self.method}")
        if self.force and self.resume:
            raise MMExportError("--force and --resume contradict each other: choose one")

    def dicom_policy(self) -> dict | None:
        """The DICOM section's fields (for ``DicomPixels(**...)``), or None when neither option was given."""
        if self.dicom_voi is None and self.dicom_frame is None:
            return None
        policy = parse_dicom_voi("none" if self.dicom_voi is None else self.dicom_voi)
        if self.dicom_frame is None:
            return {**policy, "multiframe": "refuse", "frame_index": None}
        check_int(self.dicom_frame, "--dicom-frame", low=0, high=MAX_DICOM_FRAME)
        return {**policy, "multiframe": "frame", "frame_index": int(self.dicom_frame)}

    def sources_needed(self) -> str:
        """"AB", "A" or "B": the sources this method reads."""
        return METHOD_SOURCES[self.method]

    def stage_epochs(self) -> tuple[int, int]:
        """(stage 1, stage 2) epochs; plain fine-tuning spends the whole budget in stage 2."""
        if self.method.startswith("finetune-"):
            return 0, self.merge_epochs + self.finetune_epochs
        return self.merge_epochs, self.finetune_epochs
