"""Two-stage MedMerge training: stage 1 (merge logits + head), fold, stage 2 (fine-tune).

The library reports progress through a :class:`ProgressSink` so the CLI can draw
rich bars while the library stays silent.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mmexport.backbones import get_backbone
from mmexport.checkpoints import check_compatible, load_source
from mmexport.data import TaskData, load_task
from mmexport.errors import MMExportError, VerificationError
from mmexport.fold import fold
from mmexport.manifest import RunDir
from mmexport.merge import GRANULARITIES, MergedModel, reestimate_bn_statistics
from mmexport.metrics import classification_metrics
from mmexport.modelfile import ModelInfo, save_model, save_unmerged
from mmexport.runners import TorchRunner
from mmexport.tolerances import FOLD
from mmexport.verify import VerificationReport, random_inputs, verify_runners

UNMERGED_FILE = "unmerged.safetensors"
FOLDED_FILE = "folded.safetensors"
MODEL_FILE = "model.safetensors"
BN_INITS = ("blend", "reestimate")


class ProgressSink(Protocol):
    def start(self, description: str, total: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def finish(self) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentProgress:
    def start(self, description: str, total: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def finish(self) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class TrainConfig:
    arch: str
    source_a: str
    source_b: str
    data: str
    out: str
    granularity: str = "kernel"
    merge_epochs: int = 10
    finetune_epochs: int = 10
    batch_size: int = 32
    lr_logits: float = 1e-2
    lr_head: float = 1e-3
    lr_finetune: float = 1e-4
    weight_decay: float = 1e-4
    initial_logit: float = 0.0
    bn_init: str = "blend"
    image_size: int | None = None
    seed: int = 0
    device: str = "auto"
    verify_samples: int = 64
    force: bool = False

    def validate(self) -> None:
        get_backbone(self.arch)
        if self.granularity not in GRANULARITIES:
            raise MMExportError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.bn_init not in BN_INITS:
            raise MMExportError(f"unknown --bn-init {self.bn_init!r}; choose one of {', '.join(BN_INITS)}")
        if self.merge_epochs < 1:
            raise MMExportError("--merge-epochs must be at least 1 (stage 1 is the merge)")
        if self.finetune_epochs < 0 or self.batch_size < 1:
            raise MMExportError("--finetune-epochs must be >= 0 and --batch-size >= 1")
        for name in ("lr_logits", "lr_head", "lr_finetune"):
            if not getattr(self, name) > 0:
                raise MMExportError(f"--{name.replace('_', '-')} must be positive")


@dataclass
class StageResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MMExportError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MMExportError(f"device {name!r} requested but CUDA is not available")
    return device


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for images, targets in loader:
        predictions.append(model(images.to(device)).argmax(dim=1).cpu())
        labels.append(targets)
    model.train(was_training)
    return classification_metrics(torch.cat(labels).numpy(), torch.cat(predictions).numpy(), num_classes)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    # Frozen source copies never change; skip them to keep best-epoch snapshots cheap.
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("sources.")}


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: TaskData,
    *,
    epochs: int,
    stage: str,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: ProgressSink,
) -> StageResult:
    """Train ``epochs`` epochs, evaluate val macro F1 after each, restore the best epoch."""
    train_loader = task.loader("train", batch_size, shuffle=True, augment=True, seed=seed)
    val_loader = task.loader("val", batch_size)
    loss_fn = nn.CrossEntropyLoss()
    result = StageResult()
    best_f1, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        progress.start(f"{stage} epoch {epoch}/{epochs}", len(train_loader))
        total_loss, seen = 0.0, 0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            if not torch.isfinite(loss):
                raise MMExportError(f"{stage}: loss became {loss.item()} at epoch {epoch}; lower the learning rate")
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            progress.advance()
        progress.finish()
        metrics = evaluate(model, val_loader, task.num_classes, device)
        record = {
            "stage": stage,
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "val_accuracy": metrics["accuracy"],
            "val_macro_f1": metrics["macro_f1"],
        }
        result.history.append(record)
        progress.epoch(record)
        if metrics["macro_f1"] > best_f1:
            best_f1, best_state = metrics["macro_f1"], _snapshot(model)
            result.best_epoch, result.best_metrics = epoch, metrics
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return result


def verify_fold(
    merged: MergedModel, folded: nn.Module, task: TaskData | None, info: ModelInfo, samples: int, seed: int,
    device: torch.device,
) -> VerificationReport:
    """Unmerged vs folded, eval mode, on seeded random inputs and (when given) real val images."""
    input_sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "random": (random_inputs(samples, info.image_size, info.mean, info.std, seed=seed), None)
    }
    if task is not None:
        input_sets["data:val"] = task.arrays("val", limit=max(samples, 1))
    with TorchRunner(merged, "unmerged (torch fp32)", device) as ref, TorchRunner(folded, "folded (torch fp32)", device) as cand:
        return verify_runners(ref, cand, input_sets, FOLD)


def _model_info(config: TrainConfig, task: TaskData) -> ModelInfo:
    return ModelInfo(config.arch, tuple(task.classes), task.image_size, tuple(task.mean), tuple(task.std))


def train(config: TrainConfig, progress: ProgressSink | None = None, command: str = "") -> Path:
    """Run both stages into ``config.out``; returns the published run directory."""
    progress = progress or SilentProgress()
    config.validate()
    device = resolve_device(config.device)
    seed_everything(config.seed)
    task = load_task(config.data, image_size=config.image_size)
    source_a = load_source(config.source_a, config.arch, label="source A")
    source_b = load_source(config.source_b, config.arch, label="source B")
    check_compatible(source_a, source_b)
    info = _model_info(config, task)

    run = RunDir.create(config.out, force=config.force, command=command)
    try:
        run.manifest["config"] = {**asdict(config), "device_used": str(device)}
        run.manifest["seed"] = config.seed
        run.manifest["inputs"] = {"source_a": source_a.info, "source_b": source_b.info, "data": task.description}
        run.manifest["model"] = info.as_dict()
        run.save()

        merged = MergedModel(
            config.arch, [source_a.state_dict, source_b.state_dict], task.num_classes,
            granularity=config.granularity, initial_logit=config.initial_logit,
        ).to(device)
        if config.bn_init == "reestimate":
            seen = reestimate_bn_statistics(merged, task.loader("train", config.batch_size))
            progress.message(f"re-estimated BatchNorm statistics on {seen} target images")
        optimizer = torch.optim.Adam(
            [
                {"params": list(merged.logits.parameters()), "lr": config.lr_logits},
                {"params": [p for p in merged.template.parameters() if p.requires_grad], "lr": config.lr_head},
            ]
        )
        stage1 = fit(merged, optimizer, task, epochs=config.merge_epochs, stage="merge", batch_size=config.batch_size,
                     seed=config.seed, device=device, progress=progress)
        merged.eval()
        run.write_output(UNMERGED_FILE, lambda p: save_unmerged(p, merged.cpu(), info), "unmerged", stage="merge")
        merged.to(device)

        folded = fold(merged)
        report = verify_fold(merged, folded, task, info, config.verify_samples, config.seed, device)
        run.add_verification({"artifact": FOLDED_FILE, **report.as_dict()})
        if not report.passed:
            raise VerificationError("fold verification failed: " + "; ".join(report.failures()), report)
        run.write_output(FOLDED_FILE, lambda p: save_model(p, folded, info, "folded"), "model", stage="folded")

        final, stage2 = folded, StageResult()
        if config.finetune_epochs > 0:
            final = copy.deepcopy(folded)
            optimizer = torch.optim.AdamW(final.parameters(), lr=config.lr_finetune, weight_decay=config.weight_decay)
            stage2 = fit(final, optimizer, task, epochs=config.finetune_epochs, stage="finetune",
                         batch_size=config.batch_size, seed=config.seed + 1, device=device, progress=progress)
        final.eval()
        stage_name = "finetuned" if config.finetune_epochs > 0 else "folded"
        run.write_output(MODEL_FILE, lambda p: save_model(p, final, info, stage_name), "model", stage=stage_name)

        evaluation = {"val": evaluate(final, task.loader("val", config.batch_size), task.num_classes, device)}
        if "test" in task.splits:
            evaluation["test"] = evaluate(final, task.loader("test", config.batch_size), task.num_classes, device)
        run.manifest["training"] = {
            "merge": asdict(stage1),
            "finetune": asdict(stage2),
            "final": evaluation,
            "layer_coefficients": merged.layer_coefficients(),
        }
        run.save()
        return run.publish()
    except BaseException:
        run.abandon()
        raise


def train_plain(
    model: nn.Module, task: TaskData, *, epochs: int, lr: float, batch_size: int, seed: int, device: torch.device,
    progress: ProgressSink | None = None, stage: str = "train",
) -> StageResult:
    """Ordinary supervised training of a plain network (the demo's source backbones, baselines)."""
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    return fit(model, optimizer, task, epochs=epochs, stage=stage, batch_size=batch_size, seed=seed, device=device,
               progress=progress or SilentProgress())


