"""Stage-1 (MedMerge) training step vs a plain fine-tuning step: same arch, batch, device.

The merge adds the blend σ(λ)·A + (1−σ(λ))·B of every backbone parameter to each
forward pass and its gradient to each backward pass. This script measures what
that costs, as a ratio of median step times, with the two steps interleaved so
machine noise hits both alike.

    python benchmarks/train_step.py                      # the published configurations
    python benchmarks/train_step.py --arch resnet50 --batch 16 --size 224 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mmexport.torchside.backbones import get_backbone
from mmexport.environment import environment_info
from mmexport.torchside.merge import MergedModel

DEFAULT_CONFIGS = [("resnet18", 32, 64), ("resnet18", 16, 224), ("resnet50", 16, 224), ("densenet121", 16, 224)]


def _sources(arch: str) -> list[dict[str, torch.Tensor]]:
    backbone = get_backbone(arch)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append({k: v for k, v in backbone.build(10).state_dict().items() if not backbone.is_head_key(k)})
    return states


def measure(arch: str, batch: int, size: int, repeats: int, device: torch.device, classes: int = 5) -> dict:
    merged = MergedModel(arch, _sources(arch), classes).to(device).train()
    plain = get_backbone(arch).build(classes).to(device).train()
    stage1_opt = torch.optim.Adam(
        [{"params": list(merged.logits.parameters()), "lr": 1e-2},
         {"params": [p for p in merged.template.parameters() if p.requires_grad], "lr": 1e-3}]
    )
    finetune_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        step(merged, stage1_opt)
        step(plain, finetune_opt)
    stage1, finetune = [], []
    for _ in range(repeats):
        stage1.append(step(merged, stage1_opt))
        finetune.append(step(plain, finetune_opt))
    s1, ft = statistics.median(stage1), statistics.median(finetune)
    return {
        "arch": arch, "batch": batch, "image_size": size, "device": str(device), "repeats": repeats,
        "stage1_median_s": s1, "finetune_median_s": ft, "ratio": s1 / ft,
        "stage1_min_s": min(stage1), "finetune_min_s": min(finetune), "ratio_of_minima": min(stage1) / min(finetune),
        "trainable_stage1": sum(p.numel() for p in merged.parameters() if p.requires_grad),
        "trainable_finetune": sum(p.numel() for p in plain.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write JSON + markdown results here (directory)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    configs = [(args.arch, args.batch, args.size)] if args.arch else DEFAULT_CONFIGS
    rows = []
    for arch, batch, size in configs:
        row = measure(arch, batch, size, args.repeats, device)
        rows.append(row)
        print(f"{arch:12s} batch {batch:3d} {size:3d}px  stage-1 {row['stage1_median_s'] * 1e3:8.1f} ms  "
              f"fine-tune {row['finetune_median_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.3f}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = f"{platform.machine()}-{device.type}-torch{torch.__version__.split('+')[0]}"
        payload = {"environment": environment_info(), "cpu_threads": torch.get_num_threads(), "results": rows}
        (args.out / f"train_step-{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
        lines = [
            f"# Stage-1 step ÷ fine-tune step ({tag}, {torch.get_num_threads()} threads)", "",
            "| arch | batch | size | stage-1 (ms) | fine-tune (ms) | ratio (median) | ratio (min) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ] + [
            f"| {r['arch']} | {r['batch']} | {r['image_size']} | {r['stage1_median_s'] * 1e3:.1f} | "
            f"{r['finetune_median_s'] * 1e3:.1f} | {r['ratio']:.3f} | {r['ratio_of_minima']:.3f} |" for r in rows
        ] + ["", f"Command: `python benchmarks/train_step.py --out benchmarks/results` ({args.repeats} interleaved repeats)."]
        (args.out / f"train_step-{tag}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
