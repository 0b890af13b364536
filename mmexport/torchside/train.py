"""Two-stage training for MedMerge and the paper's baselines.

Every method is "build a network, stage 1, stage 2" with the same run layout:

============  ==========================================  =========================
method        network at the start                        stage 1 (``merge_epochs``)
============  ==========================================  =========================
medmerge      A and B blended by learnable logits          logits + fresh head
average       A and B blended with σ fixed at 0.5          fresh head only
lpft-a/b      source A (or B)                              fresh head only (probe)
finetune-a/b  source A (or B)                              none: its epochs go to stage 2
============  ==========================================  =========================

Stage 2 (``finetune_epochs``) fine-tunes the whole plain network (the fold, for
merge methods). So every method gets the same total epoch budget.

The module has two layers, like torchvision's ``references/classification/train.py``:

* **Loop primitives**, free of :class:`TrainConfig`: :func:`epoch_indices` and
  :func:`batches` (what one process trains on in one epoch), :func:`train_one_epoch`,
  :func:`evaluate` and :func:`fit_stage` (warm-up + cosine, val macro-F1 selection,
  early stopping, a :class:`StageState` after every epoch to checkpoint or continue).
  They take a :class:`LoopOptions` and a :class:`StagePlan`.
* **Orchestration** of methods and stages (:func:`train`): sources, the start
  network, the source head-only probes, the optional logit learning-rate probe,
  stage 1, fold, stage 2, publishing, resume and torchrun.

The library reports progress through a :class:`ProgressSink`, so the CLI can draw
rich bars while the library stays silent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mmexport import artifacts
from mmexport.config import (
    AUGMENTATIONS,
    DEFAULT_AUGMENTATION,
    MERGE_METHODS,
    METHODS,
    RESUME_FREE,
    SCRATCH,
    TrainConfig,
    check_seed,
)
from mmexport.errors import CheckpointError, DataError, MMExportError, RunDirError, VerificationError
from mmexport.fileio import atomic_path
from mmexport.progress import ProgressSink, SilentProgress
from mmexport.runs.model_card import sources_check_lines
from mmexport.runs.manifest import RunDir
from mmexport.runs.provenance import artifact_provenance, reference_model_verification
from mmexport.runtime.metrics import classification_metrics
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import DicomPixels
from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.checkpoints import SourceCheckpoint, check_compatible, load_source
from mmexport.torchside.compatibility import prepare_sources
from mmexport.torchside.data import TaskData, load_task
from mmexport.torchside.distributed import (
    DistContext,
    average_batchnorm_statistics,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    wrap_ddp,
)
from mmexport.torchside.fold import fold
from mmexport.torchside.merge import MergedModel, mixing_weights, reestimate_bn_statistics
from mmexport.torchside.modelfile import save_model, save_unmerged
from mmexport.torchside.reference import make_reference, verify_fold

UNMERGED_FILE = artifacts.filename("unmerged")
FOLDED_FILE = artifacts.filename("folded")
MODEL_FILE = artifacts.filename("model")
FIGURE_FILE = artifacts.filename("figure")
CHECKPOINT_FILE = artifacts.filename("checkpoint")
REFERENCE_FILE = artifacts.filename("reference")
CHECKPOINT_FORMAT = "mmexport-checkpoint/2"
SATURATION = (0.1, 0.9)  # σ beyond these counts as saturated (as in mmexport.torchside.coefficients)
PROBE_IMAGES = 2048  # the source head-only probes look at most at this many training images

__all__ = [
    "METHODS", "MERGE_METHODS", "TrainConfig", "LoopOptions", "StagePlan", "StageResult", "StageState", "Checkpoint",
    "train", "train_plain", "train_one_epoch", "evaluate", "fit_stage", "epoch_indices", "batches", "head_probe",
    "verify_fold",
]


# =========================================================================== loop primitives


@dataclass
class StageResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early_at: int | None = None


@dataclass(frozen=True)
class LoopOptions:
    """How the loop trains, independent of methods and sources."""
    batch_size: int
    seed: int
    sampler: str = "none"  # or "balanced"
    class_weights: str = "none"  # or "balanced"
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # or "constant"
    patience: int = 0  # epochs without val macro-F1 gain before a stage stops; 0 = never
    amp: bool = True
    num_workers: int = 0
    augmentation: str = "none"  # a preset of mmexport.torchside.data.tasks.PRESETS

    @classmethod
    def from_config(cls, config: TrainConfig) -> "LoopOptions":
        return cls(batch_size=config.batch_size, seed=config.seed, sampler=config.sampler,
                   class_weights=config.class_weights, warmup_epochs=config.warmup_epochs, schedule=config.schedule,
                   patience=config.patience, amp=config.amp, num_workers=config.num_workers,
                   augmentation=config.augmentation)


@dataclass
class StagePlan:
    """One stage: which parameters train, with which optimiser, for how many epochs."""
    name: str  # "merge", "probe", "finetune", or any label (train_plain)
    epochs: int
    param_groups: list[dict[str, Any]]
    optimizer: str = "adam"  # or "adamw"
    weight_decay: float = 0.0  # adamw only
    after_step: Callable[[], None] | None = None  # e.g. keep σ inside its bound


@dataclass
class StageState:
    """Everything needed to continue a stage after ``epoch``: the payload of a checkpoint."""
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    result: StageResult
    best_state: dict[str, torch.Tensor] | None
    best_f1: float
    stale: int

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "result": asdict(self.result), "best_state": self.best_state,
                "best_f1": self.best_f1, "stale": self.stale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageState":
        return cls(**{**data, "result": StageResult(**data["result"])})


@dataclass
class Checkpoint:
    """The resume file: the stage in progress, its state, and what the run decided before it."""
    stage: str
    state: StageState
    lr_logits: float | None = None  # the logit learning rate in use (chosen by the probe, if any)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "stage": self.stage, "state": self.state.to_dict(),
                        "lr_logits": self.lr_logits}, tmp)

    @classmethod
    def load(cls, path: str | Path, device: torch.device) -> "Checkpoint":
        data = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise RunDirError(f"{path}: written by another mmexport version; start again with --force")
        return cls(data["stage"], StageState.from_dict(data["state"]), data.get("lr_logits"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, stage: str, epoch: int) -> int:
    # Each epoch's shuffling and augmentation depend only on (seed, stage, epoch), so a
    # resumed run draws exactly what the uninterrupted run would have drawn.
    return (seed * 1_000_003 + sum(map(ord, stage)) * 10_007 + epoch) % (2**63)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MMExportError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MMExportError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise MMExportError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for images, targets in loader:
        predictions.append(model(images.to(device)).argmax(dim=1).cpu())
        labels.append(torch.as_tensor(targets))
    model.train(was_training)
    return classification_metrics(torch.cat(labels).numpy(), torch.cat(predictions).numpy(), num_classes)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    # Frozen source copies never change; skip them to keep snapshots and checkpoints small.
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("sources.")}


def _lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_indices(labels: np.ndarray, options: LoopOptions, stage: str, epoch: int, ctx: DistContext) -> list[int]:
    """This process's sample order for one epoch: shuffled or class-balanced, then sharded."""
    generator = torch.Generator().manual_seed(_epoch_seed(options.seed, stage, epoch))
    if options.sampler == "balanced":
        counts = np.bincount(labels, minlength=labels.max() + 1).astype(np.float64)
        weights = torch.as_tensor(1.0 / counts[labels])
        order = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    else:
        order = torch.randperm(len(labels), generator=generator)
    if ctx.enabled:  # equal shards (pad by wrapping) so every rank takes the same number of steps
        per_rank = math.ceil(len(order) / ctx.world_size)
        order = torch.cat([order, order[: per_rank * ctx.world_size - len(order)]])[ctx.rank :: ctx.world_size]
    return order.tolist()


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``indices``; a final batch of ONE image joins the one before it.

    BatchNorm cannot normalise one image in training mode (a 1x1 feature map has a single
    value per channel), so a split of ``k * batch_size + 1`` images trains ``k`` batches, the
    last one ``batch_size + 1`` images, instead of crashing or dropping an image.
    """
    chunks = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2].extend(chunks.pop())
    return chunks


def check_trainable(count: int, ctx: DistContext, where: str = "training split") -> None:
    """Refuse a training split that leaves a process fewer than 2 images (BatchNorm needs 2)."""
    per_process = math.ceil(count / ctx.world_size) if count else 0
    if per_process < 2:
        shard = f" ({ctx.world_size} processes: {per_process} each)" if ctx.enabled else ""
        raise DataError(f"{where} has {count} image(s){shard}: BatchNorm needs at least 2 per batch to train")


def _class_weights(labels: np.ndarray, num_classes: int, mode: str, device: torch.device) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


def train_one_epoch(
    model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, scaler, loss_fn: nn.Module,
    device: torch.device, *, amp_dtype: torch.dtype | None = None, after_step: Callable[[], None] | None = None,
    progress: ProgressSink | None = None, name: str = "train", epoch: int = 0,
) -> float:
    """One pass over ``loader``; returns the mean training loss. ``amp_dtype`` None trains in fp32."""
    progress = progress or SilentProgress()
    model.train()
    total_loss, seen = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), labels)
        if not torch.isfinite(loss):
            raise MMExportError(f"{name}: loss became {loss.item()} at epoch {epoch}; lower the learning rates")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(labels)
        seen += len(labels)
        progress.advance()
    return total_loss / max(seen, 1)


def fit_stage(
    model: nn.Module, plan: StagePlan, task: TaskData, options: LoopOptions, device: torch.device,
    ctx: DistContext | None = None, progress: ProgressSink | None = None, *,
    on_epoch: Callable[[StageState], None] | None = None, start: StageState | None = None,
    stop_after: int | None = None,
) -> StageState:
    """Train one stage: warm-up + cosine, val macro-F1 selection, early stopping.

    ``start`` continues from a saved :class:`StageState` (resume, or the logit-lr probe's
    winner). ``on_epoch(state)`` is called after every epoch (checkpointing). With
    ``stop_after`` the stage pauses after that epoch and the model keeps its last weights
    (so it can continue); otherwise the best epoch's weights are loaded at the end.
    """
    ctx = ctx or DistContext()
    progress = progress or SilentProgress()
    train_labels = task.labels("train")
    train_set = task.dataset("train", augment=options.augmentation)
    val_loader = task.loader("val", options.batch_size, num_workers=options.num_workers)
    steps_per_epoch = len(batches(epoch_indices(train_labels, options, plan.name, 1, ctx), options.batch_size))
    if plan.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(plan.param_groups)
    else:
        optimizer = torch.optim.AdamW(plan.param_groups, weight_decay=plan.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(plan.epochs * steps_per_epoch, round(options.warmup_epochs * steps_per_epoch), options.schedule),
    )
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(train_labels, task.num_classes, options.class_weights, device))
    use_amp = options.amp and device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    result, best_state, best_f1, stale, first = StageResult(), None, -1.0, 0, 1
    if start is not None:
        model.load_state_dict(start.model, strict=False)
        optimizer.load_state_dict(start.optimizer)
        scheduler.load_state_dict(start.scheduler)
        scaler.load_state_dict(start.scaler)
        result = copy.deepcopy(start.result)
        best_state, best_f1, stale, first = start.best_state, start.best_f1, start.stale, start.epoch + 1
    trained = wrap_ddp(model, ctx, device)
    state = start
    last = plan.epochs if stop_after is None else min(plan.epochs, stop_after)

    for epoch in range(first, last + 1):
        if result.stopped_early_at is not None:
            break
        torch.manual_seed(_epoch_seed(options.seed, plan.name, epoch) + ctx.rank)  # augmentation draws
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=batches(epoch_indices(train_labels, options, plan.name, epoch, ctx), options.batch_size),
            num_workers=options.num_workers,
        )
        progress.start(f"{plan.name} epoch {epoch}/{plan.epochs}", len(loader))
        loss = train_one_epoch(trained, loader, optimizer, scheduler, scaler, loss_fn, device, amp_dtype=amp_dtype,
                               after_step=plan.after_step, progress=progress, name=plan.name, epoch=epoch)
        progress.finish()
        average_batchnorm_statistics(model, ctx)
        metrics = evaluate(model, val_loader, task.num_classes, device)
        record = {
            "stage": plan.name, "epoch": epoch, "train_loss": loss,
            "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"], "lr": scheduler.get_last_lr()[0],
        }
        result.history.append(record)
        progress.epoch(record)
        if metrics["macro_f1"] > best_f1:
            best_f1, best_state, stale = metrics["macro_f1"], _snapshot(model), 0
            result.best_epoch, result.best_metrics = epoch, metrics
        else:
            stale += 1
            if options.patience and stale >= options.patience:
                result.stopped_early_at = epoch
                progress.message(f"{plan.name}: no val macro-F1 gain for {stale} epochs, stopping at epoch {epoch}")
        state = StageState(epoch, _snapshot(model), optimizer.state_dict(), scheduler.state_dict(), scaler.state_dict(),
                           copy.deepcopy(result), best_state, best_f1, stale)
        if on_epoch is not None:
            on_epoch(state)
    if state is None:  # nothing to do (e.g. continued at the last epoch)
        state = StageState(0, _snapshot(model), optimizer.state_dict(), scheduler.state_dict(), scaler.state_dict(),
                           result, best_state, best_f1, stale)
    paused = stop_after is not None and state.epoch < plan.epochs and state.result.stopped_early_at is None
    if not paused and best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return state


def _train_batches(task: TaskData, batch_size: int, limit: int | None = None, num_workers: int = 0):
    """The training split in order, evaluation transform, with :func:`batches`' batch-of-one rule."""
    dataset = task.dataset("train")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist() if count < len(dataset) else list(range(count))
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches(indices, batch_size), num_workers=num_workers)


@torch.no_grad()
def _features(model: nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    feats, labels = [], []
    for images, targets in loader:
        feats.append(model(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)


def head_probe(arch: str, state_dict: dict[str, torch.Tensor], task: TaskData, *, batch_size: int, seed: int,
               device: torch.device, class_weights: str = "none", steps: int = 300,
               max_images: int = PROBE_IMAGES) -> dict[str, Any]:
    """Val macro-F1 of a linear head on one source's frozen features (its BN statistics re-estimated on target images).

    The bar a merge's stage 1 should clear: if the merged network ends stage 1 below the
    head-only probe of a source, the merge did not use that source as well as a linear
    classifier on it alone. Costs about three forward passes over at most ``max_images``
    training images and one over val, plus ``steps`` full-batch steps of a linear layer.
    Leaves every global random generator as it found it.
    """
    start = time.perf_counter()
    backbone = get_backbone(arch)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = _plain_from_source(arch, state_dict, task.num_classes).to(device)
        reestimate_bn_statistics(model, _train_batches(task, batch_size, max_images))
        setattr(model, backbone.head, nn.Identity())
        x_train, y_train = _features(model, _train_batches(task, batch_size, max_images), device)
        x_val, y_val = _features(model, task.loader("val", batch_size), device)
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        head = nn.Linear(x_train.shape[1], task.num_classes)
        weights = _class_weights(y_train.numpy(), task.num_classes, class_weights, torch.device("cpu"))
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(head(x_train), y_train).backward()
                optimizer.step()
        with torch.no_grad():
            predictions = head(x_val).argmax(1)
    metrics = classification_metrics(y_val.numpy(), predictions.numpy(), task.num_classes)
    return {"val_macro_f1": metrics["macro_f1"], "val_accuracy": metrics["accuracy"],
            "train_images": int(len(y_train)), "features": int(x_train.shape[1]), "steps": steps,
            "seconds": round(time.perf_counter() - start, 3)}


def train_plain(
    model: nn.Module, task: TaskData, *, epochs: int, lr: float, batch_size: int, seed: int, device: torch.device,
    progress: ProgressSink | None = None, stage: str = "train", augmentation: str | None = None,
) -> StageResult:
    """Ordinary supervised training of a plain network (the demo's and the study's source backbones).

    ``augmentation`` is a preset name (default: the library default, which never flips).
    """

    model.to(device)
    options = LoopOptions(batch_size=batch_size, seed=seed, warmup_epochs=0.0, schedule="cosine",
                          augmentation=augmentation or DEFAULT_AUGMENTATION)
    check_trainable(len(task.labels("train")), DistContext())
    plan = StagePlan(stage, epochs, [{"params": list(model.parameters()), "lr": lr}], "adamw", weight_decay=1e-4)
    return fit_stage(model, plan, task, options, device, DistContext(), progress or SilentProgress()).result


# =========================================================================== orchestration


def _model_info(config: TrainConfig, task: TaskData) -> ModelInfo:
    return ModelInfo(config.arch, tuple(task.classes), task.image_size, tuple(task.mean), tuple(task.std),
                     preprocessing=task.preprocessing)


def _plain_from_source(arch: str, state: dict[str, torch.Tensor], num_classes: int) -> nn.Module:
    backbone = get_backbone(arch)
    model = backbone.build(num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)  # the fresh head is what is missing
    if unexpected or any(not backbone.is_head_key(k) for k in missing):
        raise MMExportError(f"{arch}: source does not fill the backbone (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def scratch_source(spec: str, arch: str, label: str, default_seed: int) -> SourceCheckpoint:
    """``scratch`` / ``scratch:SEED``: torchvision's own random initialisation of ``arch``, seeded."""
    _, _, text = spec.partition(":")
    if text:
        try:
            seed = check_seed(int(text), f"source {label} ({spec})")
        except ValueError:
            raise MMExportError(f"source {label}: {spec!r}: write scratch or scratch:SEED with an integer SEED") from None
    else:
        seed = default_seed
    backbone = get_backbone(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = backbone.build(2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not backbone.is_head_key(k)}
    info = {"spec": spec, "label": f"source {label}", "format": "scratch", "path": None, "seed": seed,
            "sha256": _tensor_digest(state), "size_bytes": None, "weights": None, "container_key": None,
            "note": "random initialisation (torchvision's), no pre-training"}
    return SourceCheckpoint(state_dict=state, info=info)


def _load_sources(config: TrainConfig) -> dict[str, SourceCheckpoint]:
    sources = {}
    for label in config.sources_needed():
        spec = (config.source_a if label == "A" else config.source_b).strip()
        if spec == SCRATCH or spec.startswith(SCRATCH + ":"):
            # A and B drawn from one --seed must differ: B's default seed is the next one.
            default = (config.seed + (0 if label == "A" else 1)) % 2**32
            sources[label] = scratch_source(spec, config.arch, label, default)
        else:
            sources[label] = load_source(spec, config.arch, label=f"source {label}")
    if len(sources) == 2:
        check_compatible(sources["A"], sources["B"])
    return sources


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    current = _jsonable(asdict(config))
    return [
        f"{k} ({saved.get(k)!r} → {current[k]!r})"
        for k in current
        if k not in RESUME_FREE and saved.get(k) != current[k]
    ]


def _input_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed in the run's inputs (source contents, data description) since it was started."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if key.startswith("source_"):
            label = "source " + key[len("source_"):].upper()
            if old is None or new is None:
                changes.append(f"{label} {'added' if old is None else 'removed'}")
                continue
            for fact in ("sha256", "weights", "seed"):
                if old.get(fact) != new.get(fact):
                    short = (lambda v: f"{v[:12]}…" if isinstance(v, str) and len(v) > 12 else repr(v))
                    changes.append(f"{label} {fact} {short(old.get(fact))} → {short(new.get(fact))}")
                    break
        elif key == "data" and old != new:
            fields = sorted(k for k in set(old or {}) | set(new or {}) if (old or {}).get(k) != (new or {}).get(k))
            changes.append(f"data ({', '.join(fields[:4])}{', …' if len(fields) > 4 else ''})")
    return changes


def _open_run(config: TrainConfig, command: str, inputs: dict[str, Any]) -> RunDir:
    if not config.resume:
        return RunDir.create(config.out, force=config.force, command=command)
    run = RunDir.resume(config.out)
    differences = _config_differences(run.manifest.get("config", {}), config)
    if differences:
        raise RunDirError(f"{config.out}: cannot resume with a different config: {', '.join(differences)}")
    changed = _input_differences(run.manifest.get("inputs", {}), _jsonable(inputs))
    if changed:
        raise RunDirError(f"{config.out}: cannot resume: inputs changed since the run started: {'; '.join(changed)} "
                          "(start again with --force)")
    return run


def check_finite_network(model: nn.Module, what: str) -> None:
    """Refuse a network with a non-finite parameter or buffer (a NaN/Inf BN statistic, a weight)."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise MMExportError(f"{what}: {len(bad)} tensor(s) contain NaN or Inf ({names}); nothing was published: "
                            "check the sources' weights or lower the learning rates")


def sigma_saturation(merged: MergedModel, bounds: tuple[float, float] = SATURATION) -> float:
    """The fraction of all merge coefficients (weight of source A) beyond ``bounds``."""
    low, high = bounds
    beyond, total = 0, 0
    with torch.no_grad():
        for name in merged.merge_names:
            weight_a = mixing_weights(merged.logit(name), merged.num_sources)[0]
            beyond += int(((weight_a < low) | (weight_a > high)).sum())
            total += weight_a.numel()
    return beyond / total if total else 0.0


def _describe_task(task: TaskData, augmentation: str) -> str:
    counts = ", ".join(f"{split} {len(task.labels(split))}" for split in task.splits)
    names = ", ".join(task.classes[:6]) + (", …" if len(task.classes) > 6 else "")
    return (f"data: {task.num_classes} classes ({names}); images {counts}; {task.image_size} px; "
            f"preprocessing: {task.preprocessing.describe()}; augmentation: {augmentation} ({AUGMENTATIONS[augmentation]})")


@dataclass
class _Session:
    """What every step of one training run needs: its config, data, sources, device and run directory."""
    config: TrainConfig
    task: TaskData
    sources: dict[str, SourceCheckpoint]
    info: ModelInfo
    device: torch.device
    ctx: DistContext
    progress: ProgressSink
    run: RunDir | None  # None on every rank but 0
    checkpoint_path: str | None
    after_epoch: Callable[[str, int], None] | None = None

    @property
    def options(self) -> LoopOptions:
        return LoopOptions.from_config(self.config)

    @property
    def training(self) -> dict[str, Any]:
        return self.run.manifest["training"] if self.run is not None else {}

    def checkpointer(self, stage: str, lr_logits: float | None = None) -> Callable[[StageState], None]:
        def save(state: StageState) -> None:
            if self.run is not None:
                Checkpoint(stage, state, lr_logits).save(self.checkpoint_path)
            barrier(self.ctx)
            if self.after_epoch is not None:
                self.after_epoch(stage, state.epoch)

        return save

    def save_manifest(self) -> None:
        if self.run is not None:
            self.run.save()


def train(
    config: TrainConfig, progress: ProgressSink | None = None, command: str = "",
    after_epoch: Callable[[str, int], None] | None = None, *, lock_wait: float | None = None,
) -> Path:
    """Run a method's two stages into ``config.out`` and return the published run directory.

    ``after_epoch(stage, epoch)`` is called after each epoch's checkpoint is saved (tests
    use it to interrupt a run). ``lock_wait``: seconds to wait, when publishing, for another
    command writing the run this one replaces. Under torchrun only rank 0 writes; it returns the same path
    on every rank.
    """
    progress = progress or SilentProgress()
    config.validate()
    device = resolve_device(config.device)
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        return _train(config, progress, command, after_epoch, device, ctx, lock_wait=lock_wait)
    finally:
        cleanup(ctx)


def _train(config: TrainConfig, progress: ProgressSink, command: str, after_epoch, device: torch.device,
           ctx: DistContext, *, lock_wait: float | None = None) -> Path:
    seed_everything(config.seed)
    policy = config.dicom_policy()
    try:
        dicom = DicomPixels(**policy) if policy is not None else None
    except CheckpointError as exc:  # config checked the syntax; the runtime's policy has the last word
        raise MMExportError(f"--dicom-voi/--dicom-frame: {exc}") from None
    task = load_task(config.data, image_size=config.image_size, dicom=dicom)
    check_trainable(len(task.labels("train")), ctx)
    sources = _load_sources(config)
    inputs = {**{f"source_{k.lower()}": v.info for k, v in sources.items()}, "data": task.description}
    compatibility = None
    if len(sources) == 2:  # what the sources share, before stage 1 (and B aligned to A under --align weights)
        aligned_b, compatibility = prepare_sources(config.arch, sources["A"].state_dict, sources["B"].state_dict,
                                                   align=config.align, method=config.method)
        sources["B"] = replace(sources["B"], state_dict=aligned_b)

    run = None
    if ctx.is_main:
        error = None
        try:
            run = _open_run(config, command, inputs)
        except MMExportError as exc:
            error = exc
        broadcast_object(ctx, str(error) if error else None)
        if error:
            raise error
    else:
        message = broadcast_object(ctx, None)
        if message:
            raise RunDirError(message)

    checkpoint_path = broadcast_object(ctx, str(run.file(CHECKPOINT_FILE)) if run else None)
    resume = None
    if config.resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        resume = Checkpoint.load(checkpoint_path, device)
    session = _Session(config, task, sources, _model_info(config, task), device, ctx, progress, run, checkpoint_path,
                       after_epoch)

    try:
        if run is not None and not config.resume:
            run.manifest["config"] = {**_jsonable(asdict(config)), "device_used": str(device), "world_size": ctx.world_size}
            run.manifest["seed"] = config.seed
            run.manifest["inputs"] = _jsonable(inputs)
            run.manifest["model"] = session.info.as_dict()
            run.manifest["training"] = {"method": config.method, "stages": {}}
            if compatibility is not None:
                run.manifest["training"]["compatibility"] = compatibility
            run.save()
        progress.message(_describe_task(task, config.augmentation))
        if compatibility is not None and ctx.is_main:
            for line in sources_check_lines(compatibility):
                progress.message(line)
        _run_method(session, resume)  # evaluates the final network (rank 0) before writing it: its file carries the metrics
        if run is None:
            barrier(ctx)
            return Path(config.out).expanduser().absolute()
        run.save()
        published = run.publish(lock_wait=lock_wait)
        barrier(ctx)
        return published
    except MMExportError:
        if run is not None:
            run.abandon()
        raise
    except BaseException:
        # Interrupted (Ctrl-C, a crash): keep the staging directory so --resume can continue.
        if run is not None and Path(checkpoint_path).is_file():
            progress.message(f"interrupted: continue with --resume (state kept in {run.path})")
        elif run is not None:
            run.abandon()
        raise


def _start_network(s: _Session) -> nn.Module:
    """The network stage 1 starts from: the merge of A and B, or one source with a fresh head."""
    config = s.config
    if config.method in MERGE_METHODS:
        network: nn.Module = MergedModel(
            config.arch, [s.sources["A"].state_dict, s.sources["B"].state_dict], s.task.num_classes,
            granularity=config.granularity, initial_logit=config.initial_logit,
        ).to(s.device)
        if config.method == "average":
            network.logits.requires_grad_(False)
        return network
    label = config.method[-1].upper()
    return _plain_from_source(config.arch, s.sources[label].state_dict, s.task.num_classes).to(s.device)


def _run_method(s: _Session, resume: Checkpoint | None) -> nn.Module:
    config = s.config
    stage1_epochs, stage2_epochs = config.stage_epochs()
    merging = config.method in MERGE_METHODS
    backbone = get_backbone(config.arch)

    if resume is not None and resume.stage == "finetune":
        # Stage 1 and the fold are already published; the checkpoint holds the stage-2 network.
        final = backbone.build(s.task.num_classes).to(s.device)
    else:
        network = _start_network(s)
        if stage1_epochs:
            _stage_one(s, network, resume)
            resume = None
        if merging:
            network.eval()
            check_finite_network(network, "stage 1 (merge)")
            plain = fold(network)
            if s.run is not None and FOLDED_FILE not in s.run.manifest["outputs"]:
                _publish_fold(s.run, network, plain, s.task, s.info, config, s.device)
        else:
            plain = network
        s.save_manifest()
        final = copy.deepcopy(plain) if merging else plain

    if stage2_epochs:
        for param in final.parameters():
            param.requires_grad_(True)
        head_ids = {id(p) for n, p in final.named_parameters() if backbone.is_head_key(n)}
        fresh_head = not stage1_epochs
        groups = [
            {"params": [p for p in final.parameters() if id(p) not in head_ids], "lr": config.lr_backbone},
            {"params": [p for p in final.parameters() if id(p) in head_ids],
             "lr": config.lr_head if fresh_head else config.lr_backbone},
        ]
        plan = StagePlan("finetune", stage2_epochs, groups, "adamw", weight_decay=config.weight_decay)
        start = resume.state if resume is not None and resume.stage == "finetune" else None
        state = fit_stage(final, plan, s.task, s.options, s.device, s.ctx, s.progress,
                          on_epoch=s.checkpointer("finetune"), start=start)
        if s.run is not None:
            s.training["stages"]["finetune"] = asdict(state.result)
    final.eval()
    check_finite_network(final, f"the final network ({config.method})")
    if s.run is not None:
        stage_name = "finetuned" if stage2_epochs else ("folded" if merging else "probed")
        evaluation = {"val": evaluate(final, s.task.loader("val", config.batch_size), s.task.num_classes, s.device)}
        if "test" in s.task.splits:
            evaluation["test"] = evaluate(final, s.task.loader("test", config.batch_size), s.task.num_classes, s.device)
        s.training["final"] = evaluation
        # the file says what it is and where it came from (method, run, input hashes, metrics), read alone
        described = s.info.with_precision(s.info.precision, **artifact_provenance(s.run.manifest),
                                          **reference_model_verification(s.run.manifest))
        s.run.write_output(MODEL_FILE, lambda p: save_model(p, final, described, stage_name), "model", stage=stage_name,
                           method=config.method)
        _publish_reference(s.run, final, s.task, s.info, config, s.device)
    return final


def _stage_one(s: _Session, network: nn.Module, resume: Checkpoint | None) -> None:
    """Stage 1: merge logits + head (medmerge), head only (average, lpft-*)."""
    config = s.config
    backbone = get_backbone(config.arch)
    merging = config.method in MERGE_METHODS
    stage1_epochs = config.stage_epochs()[0]
    if resume is None:
        if merging and config.bn_init == "reestimate":
            seen = reestimate_bn_statistics(network, _train_batches(s.task, config.batch_size,
                                                                    num_workers=config.num_workers))
            s.progress.message(f"re-estimated BatchNorm statistics on {seen} target images")
        if merging and s.run is not None and "source_probes" not in s.training.get("diagnostics", {}):
            _source_probes(s)
    if not merging:
        for name, param in network.named_parameters():
            param.requires_grad_(backbone.is_head_key(name))  # linear probe: backbone frozen

    name = "merge" if config.method == "medmerge" else "probe"

    def plan(lr_logits: float) -> StagePlan:
        head = [p for n, p in network.named_parameters() if backbone.is_head_key(n.removeprefix("template."))]
        groups = [{"params": head, "lr": config.lr_head}]
        after_step = None
        if config.method == "medmerge":
            groups.insert(0, {"params": list(network.logits.parameters()), "lr": lr_logits})
            if config.sigma_bound > 0:
                limit = math.log((1 - config.sigma_bound) / config.sigma_bound)
                logits = list(network.logits.parameters())

                def after_step() -> None:
                    with torch.no_grad():
                        for logit in logits:
                            logit.clamp_(-limit, limit)
        return StagePlan(name, stage1_epochs, groups, "adam", after_step=after_step)

    lr_logits = config.lr_logits
    start = None
    if resume is not None:
        lr_logits = resume.lr_logits if resume.lr_logits is not None else config.lr_logits
        start = resume.state
    elif config.method == "medmerge" and config.lr_logits_probe:
        lr_logits, start = _probe_logit_lr(s, network, plan)
    state = fit_stage(network, plan(lr_logits), s.task, s.options, s.device, s.ctx, s.progress,
                      on_epoch=s.checkpointer(name, lr_logits if config.method == "medmerge" else None), start=start)
    if s.run is not None:
        s.training["stages"][name] = asdict(state.result)
        if merging:
            _stage_one_diagnostics(s, network, state.result)


def _probe_logit_lr(s: _Session, network: nn.Module, plan: Callable[[float], StagePlan]) -> tuple[float, StageState]:
    """Train each candidate logit learning rate for ``lr_probe_epochs`` from the same start; keep the best.

    The winner continues from its own state, so the run is exactly the fixed-rate run of the
    chosen rate; the other candidates' epochs are the price ((n - 1) x probe epochs of stage 1).
    Ties go to the smaller rate (less saturation).
    """
    config = s.config
    start_time = time.perf_counter()
    initial = _snapshot(network)
    candidates = sorted(config.lr_logits_probe)
    scores, states = [], []
    for lr in candidates:
        network.load_state_dict(initial, strict=False)
        s.progress.message(f"logit learning-rate probe: {lr:g} for {config.lr_probe_epochs} epoch(s)")
        state = fit_stage(network, plan(lr), s.task, s.options, s.device, s.ctx, s.progress,
                          stop_after=config.lr_probe_epochs)
        scores.append(state.best_f1)
        states.append(state)
    best = max(range(len(candidates)), key=lambda i: (scores[i], -candidates[i]))
    chosen = candidates[best]
    seconds = time.perf_counter() - start_time
    s.progress.message("logit learning-rate probe: " + ", ".join(f"{lr:g} → val macro-F1 {f1:.3f}" for lr, f1 in
                                                                  zip(candidates, scores)) + f"; continuing with {chosen:g}")
    if s.run is not None:
        s.training["lr_probe"] = {
            "candidates": candidates, "epochs": config.lr_probe_epochs, "val_macro_f1": scores, "chosen": chosen,
            "seconds": round(seconds, 3), "extra_epochs": (len(candidates) - 1) * config.lr_probe_epochs,
        }
        s.save_manifest()
    return chosen, states[best]


def _source_probes(s: _Session) -> None:
    """Head-only probe of each source on the target (rank 0; recorded in the manifest)."""
    probes = {}
    for label, source in s.sources.items():
        probes[label] = head_probe(s.config.arch, source.state_dict, s.task, batch_size=s.config.batch_size,
                                   seed=s.config.seed, device=s.device, class_weights=s.config.class_weights)
        s.progress.message(f"head-only probe of source {label}: val macro-F1 {probes[label]['val_macro_f1']:.3f} "
                           f"({probes[label]['seconds']:.1f} s)")
    s.training.setdefault("diagnostics", {})["source_probes"] = probes
    s.save_manifest()


def _stage_one_diagnostics(s: _Session, network: nn.Module, result: StageResult) -> None:
    diagnostics = s.training.setdefault("diagnostics", {})
    stage1 = float(result.best_metrics.get("macro_f1", float("nan")))
    diagnostics["stage1_val_macro_f1"] = stage1
    if s.config.method == "medmerge":
        diagnostics["sigma_saturation"] = sigma_saturation(network)
        diagnostics["sigma_saturation_bounds"] = list(SATURATION)
    probes = diagnostics.get("source_probes", {})
    below = sorted(label for label, probe in probes.items() if stage1 < probe["val_macro_f1"])
    diagnostics["stage1_below_probe"] = below
    if below:
        bars = ", ".join(f"{label} {probes[label]['val_macro_f1']:.3f}" for label in below)
        s.progress.message(f"warning: stage 1 ended at val macro-F1 {stage1:.3f}, below the head-only probe of source "
                           f"{bars}: the merge used the sources worse than a linear head on one of them")


def _publish_reference(run: RunDir, final: nn.Module, task: TaskData, info: ModelInfo, config: TrainConfig,
                       device: torch.device) -> None:
    """The stored inputs and torch fp32 outputs every later artifact of the run is judged against."""
    reference = make_reference(final, task, info, run.manifest["outputs"][MODEL_FILE]["sha256"],
                               random_count=config.verify_samples, seed=config.seed, device=device)
    run.write_output(REFERENCE_FILE, reference.save, "reference", sets=reference.counts(),
                     model_sha256=reference.model_sha256)


def _publish_fold(run: RunDir, merged: MergedModel, folded: nn.Module, task, info, config, device) -> None:
    """Write the stage-1 merge, verify its fold, write the fold (rank 0 only)."""
    run.write_output(UNMERGED_FILE, lambda p: save_unmerged(p, merged, info), "unmerged", stage="merge")
    report = verify_fold(merged, folded, task, info, config.verify_samples, config.seed, device)
    run.add_verification({"artifact": FOLDED_FILE, **report.as_dict()})
    if not report.passed:
        raise VerificationError("fold verification failed: " + "; ".join(report.failures()), report)
    run.write_output(FOLDED_FILE, lambda p: save_model(p, folded, info, "folded"), "model", stage="folded")
    rows = merged.layer_coefficients()
    run.manifest["training"]["layer_coefficients"] = rows
    try:
        from mmexport.plots import plot_coefficients
    except ImportError:  # matplotlib missing: the table in the manifest still has the numbers
        return
    title = f"{config.arch} {config.method}: mean σ(λ) per layer (1 = source A)"
    run.write_output(FIGURE_FILE, lambda p: plot_coefficients(rows, p, title, arch=config.arch), "figure")
