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
merge methods). So every method gets the same total epoch budget. The library
reports progress through a :class:`ProgressSink`, so the CLI can draw rich bars
while the library stays silent.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from mmexport import artifacts
from mmexport.backbones import get_backbone
from mmexport.checkpoints import check_compatible, load_source
from mmexport.config import MERGE_METHODS, METHODS, RESUME_FREE, TrainConfig
from mmexport.data import TaskData, load_task
from mmexport.distributed import (
    DistContext, average_batchnorm_statistics, barrier, broadcast_object, cleanup, init_distributed, wrap_ddp,
)
from mmexport.errors import MMExportError, RunDirError, VerificationError
from mmexport.fileio import atomic_path
from mmexport.fold import fold
from mmexport.manifest import RunDir
from mmexport.merge import MergedModel, reestimate_bn_statistics
from mmexport.modelfile import save_model, save_unmerged
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.progress import ProgressSink, SilentProgress
from mmexport.runtime.metrics import classification_metrics
from mmexport.verification import make_reference, verify_fold

UNMERGED_FILE = artifacts.filename("unmerged")
FOLDED_FILE = artifacts.filename("folded")
MODEL_FILE = artifacts.filename("model")
FIGURE_FILE = artifacts.filename("figure")
CHECKPOINT_FILE = artifacts.filename("checkpoint")
REFERENCE_FILE = artifacts.filename("reference")

__all__ = ["METHODS", "MERGE_METHODS", "TrainConfig", "train", "train_plain", "verify_fold", "evaluate"]


@dataclass
class StageResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early_at: int | None = None


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


def _epoch_indices(labels: np.ndarray, config: TrainConfig, stage: str, epoch: int, ctx: DistContext) -> list[int]:
    """This rank's sample order for one epoch: shuffled or class-balanced, then sharded."""
    generator = torch.Generator().manual_seed(_epoch_seed(config.seed, stage, epoch))
    if config.sampler == "balanced":
        counts = np.bincount(labels, minlength=labels.max() + 1).astype(np.float64)
        weights = torch.as_tensor(1.0 / counts[labels])
        order = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    else:
        order = torch.randperm(len(labels), generator=generator)
    if ctx.enabled:  # equal shards (pad by wrapping) so every rank takes the same number of steps
        per_rank = math.ceil(len(order) / ctx.world_size)
        order = torch.cat([order, order[: per_rank * ctx.world_size - len(order)]])[ctx.rank :: ctx.world_size]
    return order.tolist()


def _class_weights(labels: np.ndarray, num_classes: int, mode: str, device: torch.device) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


@dataclass
class _StageSpec:
    name: str  # "merge", "probe" or "finetune"
    epochs: int
    param_groups: list[dict[str, Any]]
    optimizer: str  # "adam" or "adamw"


def run_stage(
    model: nn.Module, spec: _StageSpec, task: TaskData, config: TrainConfig, device: torch.device, ctx: DistContext,
    progress: ProgressSink, save_checkpoint: Callable[[dict[str, Any]], None], resume_state: dict[str, Any] | None = None,
) -> StageResult:
    """Train one stage with warm-up + cosine, val macro-F1 selection, early stopping and per-epoch checkpoints."""
    train_labels = task.labels("train")
    train_set = task.dataset("train", augment=config.augment)
    val_loader = task.loader("val", config.batch_size, num_workers=config.num_workers)
    steps_per_epoch = math.ceil(len(_epoch_indices(train_labels, config, spec.name, 1, ctx)) / config.batch_size)
    if spec.optimizer == "adam":
        optimizer = torch.optim.Adam(spec.param_groups)
    else:
        optimizer = torch.optim.AdamW(spec.param_groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(spec.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch), config.schedule),
    )
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(train_labels, task.num_classes, config.class_weights, device))
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    result, best_state, best_f1, stale, start = StageResult(), None, -1.0, 0, 1
    if resume_state is not None:
        model.load_state_dict(resume_state["model"], strict=False)
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        result = StageResult(**resume_state["result"])
        best_state, best_f1, stale = resume_state["best_state"], resume_state["best_f1"], resume_state["stale"]
        start = resume_state["epoch"] + 1
    trained = wrap_ddp(model, ctx, device)

    for epoch in range(start, spec.epochs + 1):
        if result.stopped_early_at is not None:
            break
        torch.manual_seed(_epoch_seed(config.seed, spec.name, epoch) + ctx.rank)  # augmentation draws
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, sampler=_epoch_indices(train_labels, config, spec.name, epoch, ctx),
            num_workers=config.num_workers,
        )
        model.train()
        progress.start(f"{spec.name} epoch {epoch}/{spec.epochs}", len(loader))
        total_loss, seen = 0.0, 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = loss_fn(trained(images), labels)
            if not torch.isfinite(loss):
                raise MMExportError(f"{spec.name}: loss became {loss.item()} at epoch {epoch}; lower the learning rates")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            progress.advance()
        progress.finish()
        average_batchnorm_statistics(model, ctx)
        metrics = evaluate(model, val_loader, task.num_classes, device)
        record = {
            "stage": spec.name, "epoch": epoch, "train_loss": total_loss / max(seen, 1),
            "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"], "lr": scheduler.get_last_lr()[0],
        }
        result.history.append(record)
        progress.epoch(record)
        if metrics["macro_f1"] > best_f1:
            best_f1, best_state, stale = metrics["macro_f1"], _snapshot(model), 0
            result.best_epoch, result.best_metrics = epoch, metrics
        else:
            stale += 1
            if config.patience and stale >= config.patience:
                result.stopped_early_at = epoch
                progress.message(f"{spec.name}: no val macro-F1 gain for {stale} epochs, stopping at epoch {epoch}")
        save_checkpoint({
            "stage": spec.name, "epoch": epoch, "model": _snapshot(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "result": asdict(result),
            "best_state": best_state, "best_f1": best_f1, "stale": stale,
        })
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return result


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


def _config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    current = asdict(config)
    return [
        f"{k} ({saved.get(k)!r} → {current[k]!r})"
        for k in current
        if k not in RESUME_FREE and saved.get(k) != current[k]
    ]


def _open_run(config: TrainConfig, command: str) -> RunDir:
    if not config.resume:
        return RunDir.create(config.out, force=config.force, command=command)
    run = RunDir.resume(config.out)
    differences = _config_differences(run.manifest.get("config", {}), config)
    if differences:
        raise RunDirError(f"{config.out}: cannot resume with a different config: {', '.join(differences)}")
    return run


def train(
    config: TrainConfig, progress: ProgressSink | None = None, command: str = "",
    after_epoch: Callable[[str, int], None] | None = None,
) -> Path:
    """Run a method's two stages into ``config.out`` and return the published run directory.

    ``after_epoch(stage, epoch)`` is called after each epoch's checkpoint is saved (tests
    use it to interrupt a run). Under torchrun only rank 0 writes; it returns the same path
    on every rank.
    """
    progress = progress or SilentProgress()
    config.validate()
    device = resolve_device(config.device)
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        return _train(config, progress, command, after_epoch, device, ctx)
    finally:
        cleanup(ctx)


def _train(config, progress, command, after_epoch, device, ctx) -> Path:
    seed_everything(config.seed)
    task = load_task(config.data, image_size=config.image_size)
    needed = {"medmerge": "AB", "average": "AB", "finetune-a": "A", "lpft-a": "A", "finetune-b": "B", "lpft-b": "B"}
    sources = {}
    for label in needed[config.method]:
        spec = config.source_a if label == "A" else config.source_b
        sources[label] = load_source(spec, config.arch, label=f"source {label}")
    if len(sources) == 2:
        check_compatible(sources["A"], sources["B"])
    info = _model_info(config, task)

    run = None
    if ctx.is_main:
        error = None
        try:
            run = _open_run(config, command)
        except MMExportError as exc:
            error = exc
        broadcast_object(ctx, str(error) if error else None)
        if error:
            raise error
    else:
        message = broadcast_object(ctx, None)
        if message:
            raise RunDirError(message)

    checkpoint_path = run.file(CHECKPOINT_FILE) if run else None
    checkpoint_path = broadcast_object(ctx, checkpoint_path)
    resume_state = None
    if config.resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        resume_state = torch.load(checkpoint_path, map_location=device, weights_only=True)

    def save_checkpoint(state: dict[str, Any]) -> None:
        if run is not None:
            with atomic_path(checkpoint_path) as tmp:
                torch.save(state, tmp)
        barrier(ctx)
        if after_epoch is not None:
            after_epoch(state["stage"], state["epoch"])

    try:
        if run is not None and not config.resume:
            run.manifest["config"] = {**asdict(config), "device_used": str(device), "world_size": ctx.world_size}
            run.manifest["seed"] = config.seed
            run.manifest["inputs"] = {
                **{f"source_{k.lower()}": v.info for k, v in sources.items()}, "data": task.description,
            }
            run.manifest["model"] = info.as_dict()
            run.manifest["training"] = {"method": config.method, "stages": {}}
            run.save()
        final = _run_method(config, task, sources, info, device, ctx, progress, run, save_checkpoint, resume_state)
        if run is None:
            barrier(ctx)
            return Path(config.out).expanduser().absolute()
        evaluation = {"val": evaluate(final, task.loader("val", config.batch_size), task.num_classes, device)}
        if "test" in task.splits:
            evaluation["test"] = evaluate(final, task.loader("test", config.batch_size), task.num_classes, device)
        run.manifest["training"]["final"] = evaluation
        run.save()
        published = run.publish()
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


def _run_method(config, task, sources, info, device, ctx, progress, run, save_checkpoint, resume_state) -> nn.Module:
    stage1_epochs, stage2_epochs = config.stage_epochs()
    merging = config.method in MERGE_METHODS
    resume_stage = resume_state["stage"] if resume_state else None
    stages_done = run.manifest["training"]["stages"] if run is not None else {}

    # -- stage 1 ---------------------------------------------------------------------------
    backbone = get_backbone(config.arch)
    if resume_stage == "finetune":
        # Stage 1 and the fold are already published; the checkpoint holds the stage-2 network.
        plain = backbone.build(task.num_classes).to(device)
    else:
        if merging:
            network: nn.Module = MergedModel(
                config.arch, [sources["A"].state_dict, sources["B"].state_dict], task.num_classes,
                granularity=config.granularity, initial_logit=config.initial_logit,
            ).to(device)
            if config.method == "average":
                network.logits.requires_grad_(False)
        else:
            label = config.method[-1].upper()
            network = _plain_from_source(config.arch, sources[label].state_dict, task.num_classes).to(device)
        if stage1_epochs:
            if config.bn_init == "reestimate" and merging and resume_state is None:
                seen = reestimate_bn_statistics(network, task.loader("train", config.batch_size))
                progress.message(f"re-estimated BatchNorm statistics on {seen} target images")
            if not merging:
                for name, param in network.named_parameters():
                    param.requires_grad_(backbone.is_head_key(name))  # linear probe: backbone frozen
            head_params = [p for n, p in network.named_parameters() if backbone.is_head_key(n.removeprefix("template."))]
            groups = [{"params": head_params, "lr": config.lr_head}]
            if config.method == "medmerge":
                groups.insert(0, {"params": list(network.logits.parameters()), "lr": config.lr_logits})
            spec = _StageSpec("merge" if config.method == "medmerge" else "probe", stage1_epochs, groups, "adam")
            result = run_stage(network, spec, task, config, device, ctx, progress, save_checkpoint, resume_state)
            stages_done[spec.name] = asdict(result)
            resume_state = None

        # -- fold ----------------------------------------------------------------------------
        if merging:
            network.eval()
            plain = fold(network)
            if run is not None and FOLDED_FILE not in run.manifest["outputs"]:
                _publish_fold(run, network, plain, task, info, config, device)
        else:
            plain = network
        if run is not None:
            run.save()

    # -- stage 2 ---------------------------------------------------------------------------
    final = copy.deepcopy(plain) if merging and resume_stage != "finetune" else plain
    if stage2_epochs:
        fresh_head = not stage1_epochs
        for param in final.parameters():
            param.requires_grad_(True)
        head_ids = {id(p) for n, p in final.named_parameters() if backbone.is_head_key(n)}
        groups = [
            {"params": [p for p in final.parameters() if id(p) not in head_ids], "lr": config.lr_backbone},
            {"params": [p for p in final.parameters() if id(p) in head_ids],
             "lr": config.lr_head if fresh_head else config.lr_backbone},
        ]
        spec = _StageSpec("finetune", stage2_epochs, groups, "adamw")
        state = resume_state if resume_stage == "finetune" else None
        result = run_stage(final, spec, task, config, device, ctx, progress, save_checkpoint, state)
        stages_done["finetune"] = asdict(result)
    final.eval()
    if run is not None:
        stage_name = "finetuned" if stage2_epochs else ("folded" if merging else "probed")
        run.write_output(MODEL_FILE, lambda p: save_model(p, final, info, stage_name), "model", stage=stage_name,
                         method=config.method)
        _publish_reference(run, final, task, info, config, device)
    return final


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


def train_plain(
    model: nn.Module, task: TaskData, *, epochs: int, lr: float, batch_size: int, seed: int, device: torch.device,
    progress: ProgressSink | None = None, stage: str = "train",
) -> StageResult:
    """Ordinary supervised training of a plain network (the demo's source backbones)."""
    model.to(device)
    # run_stage reads its loop options from a TrainConfig; the model/source fields are unused here.
    config = TrainConfig(arch="", source_a="", source_b="", data="", out="", batch_size=batch_size, seed=seed,
                         lr_backbone=lr, warmup_epochs=0.0, schedule="cosine")
    spec = _StageSpec(stage, epochs, [{"params": list(model.parameters()), "lr": lr}], "adamw")
    return run_stage(model, spec, task, config, device, DistContext(), progress or SilentProgress(), lambda state: None)
