"""What makes MedMerge pay off: logit learning rate, BN statistics, granularity, stage split.

Every configuration trains resnet18 on the synthetic targets for several seeds with
the same total epoch budget as the baselines, and is compared with the best single
source (``lpft-a``/``finetune-a``…, from ``benchmarks/accuracy.py``'s log when present).
Results are appended to a log as they finish, so an interrupted study continues.

    python benchmarks/merge_study.py --out benchmarks/results/merge_study
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _study

EPOCHS = {"merge_epochs": 8, "finetune_epochs": 8}
CONFIGS: dict[str, dict] = {
    # the straightforward reading of DESIGN §1
    "lr1e-2 blend": {"lr_logits": 1e-2, "bn_init": "blend"},
    "lr1e-2 reestimate": {"lr_logits": 1e-2, "bn_init": "reestimate"},
    "lr1e-1 blend": {"lr_logits": 1e-1, "bn_init": "blend"},
    "lr1e-1 reestimate": {"lr_logits": 1e-1, "bn_init": "reestimate"},
    "lr3e-1 reestimate": {"lr_logits": 3e-1, "bn_init": "reestimate"},
    "lr1e-1 reestimate filter": {"lr_logits": 1e-1, "bn_init": "reestimate", "granularity": "filter"},
    "lr1e-1 reestimate layer": {"lr_logits": 1e-1, "bn_init": "reestimate", "granularity": "layer"},
    "lr1e-1 reestimate 4+12": {"lr_logits": 1e-1, "bn_init": "reestimate", "merge_epochs": 4, "finetune_epochs": 12},
    "lr3e-1 reestimate filter": {"lr_logits": 3e-1, "bn_init": "reestimate", "granularity": "filter"},
    "lr3e-1 reestimate layer": {"lr_logits": 3e-1, "bn_init": "reestimate", "granularity": "layer"},
    "lr3e-1 reestimate 4+12": {"lr_logits": 3e-1, "bn_init": "reestimate", "merge_epochs": 4, "finetune_epochs": 12},
    "lr1 reestimate": {"lr_logits": 1.0, "bn_init": "reestimate"},
}
BASELINES = ["finetune-a", "finetune-b", "lpft-a", "lpft-b", "average"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/merge_study"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmexport-study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(_study.TASKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS) + BASELINES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.jsonl"
    for name in args.configs:
        overrides = {**EPOCHS, **CONFIGS[name]} if name in CONFIGS else {**EPOCHS, "method": name, "bn_init": "reestimate"}
        for task in args.tasks:
            for seed in args.seeds:
                record = _study.run_one(args.work, log, name, task, seed, overrides)
                print(f"{name:28s} {task:11s} seed {seed}  val F1 {record['val_macro_f1']:.3f}  "
                      f"test F1 {record['test_macro_f1']:.3f}  ({record['seconds']:.0f} s)", flush=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    note = (f"resnet18, 64 px, sources trained {_study.SOURCE_EPOCHS} epochs on synthetic pigment (A) and border (B); "
            f"every row {EPOCHS['merge_epochs']}+{EPOCHS['finetune_epochs']} epochs; mean ± std over seeds "
            f"{', '.join(map(str, args.seeds))}; model selection on val macro-F1, test reported. "
            "Command: `python benchmarks/merge_study.py`.")
    present = [c for c in args.configs if any(r["config"] == c for r in records)]
    (args.out / "README.md").write_text(_study.table(records, present, args.tasks, "MedMerge settings study", note))
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
