"""Training configuration: plain data, no torch, so the CLI can build its options (and ``--help``) without it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from mmexport.errors import ArchitectureError, MMExportError

# Kept equal to mmexport.backbones.BACKBONES (checked there at import).
ARCHITECTURES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "densenet169", "densenet201",
)
METHODS = ("medmerge", "average", "finetune-a", "finetune-b", "lpft-a", "lpft-b")
MERGE_METHODS = ("medmerge", "average")
GRANULARITIES: tuple[str, ...] = ("kernel", "filter", "layer")
BN_INITS = ("blend", "reestimate")
SCHEDULES = ("cosine", "constant")
BALANCING = ("none", "balanced")
# Options that may differ between an interrupted run and its --resume.
RESUME_FREE = ("force", "resume", "device", "num_workers")


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
    # Defaults chosen by benchmarks/merge_study.py (see benchmarks/results/merge_study/):
    # a logit learning rate of 1e-2 barely moves σ away from 0.5 in a short stage 1.
    lr_logits: float = 3e-1
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    patience: int = 0  # epochs without val macro-F1 improvement before a stage stops; 0 = never
    class_weights: str = "none"
    sampler: str = "none"
    augment: bool = True
    initial_logit: float = 0.0
    bn_init: str = "reestimate"
    image_size: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    verify_samples: int = 64
    num_workers: int = 0
    force: bool = False
    resume: bool = False

    def validate(self) -> None:
        check_arch(self.arch)
        check_finite({f.name: getattr(self, f.name) for f in fields(self)})
        choices = {
            "method": METHODS, "granularity": GRANULARITIES, "bn_init": BN_INITS, "schedule": SCHEDULES,
            "class_weights": BALANCING, "sampler": BALANCING,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MMExportError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.merge_epochs < 0 or self.finetune_epochs < 0 or self.merge_epochs + self.finetune_epochs < 1:
            raise MMExportError("--merge-epochs and --finetune-epochs must be >= 0 and not both 0")
        if self.method in MERGE_METHODS and self.merge_epochs < 1:
            raise MMExportError(f"--merge-epochs must be at least 1 for --method {self.method} (stage 1 is the merge)")
        if self.batch_size < 1 or self.warmup_epochs < 0 or self.patience < 0:
            raise MMExportError("--batch-size must be >= 1, --warmup-epochs and --patience >= 0")
        for name in ("lr_logits", "lr_head", "lr_backbone"):
            if not getattr(self, name) > 0:
                raise MMExportError(f"--{name.replace('_', '-')} must be positive")
        if self.force and self.resume:
            raise MMExportError("--force and --resume contradict each other: choose one")

    def stage_epochs(self) -> tuple[int, int]:
        """(stage 1, stage 2) epochs; plain fine-tuning spends the whole budget in stage 2."""
        if self.method.startswith("finetune-"):
            return 0, self.merge_epochs + self.finetune_epochs
        return self.merge_epochs, self.finetune_epochs
