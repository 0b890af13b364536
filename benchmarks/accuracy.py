"""Accuracy table: every method on a dataset, several seeds, mean ± std of macro F1 and accuracy.

By default it runs on the study's regimes (``benchmarks/_study.py``: synthetic lesions
at 64 px, scikit-learn digits at 32 px with 10 and 60 labels per class, synthetic
lesions at 32 px with one unrelated source), building their sources first; on your own
data give both sources and the dataset:

    python benchmarks/accuracy.py                                   # the regimes, 2 seeds
    python benchmarks/accuracy.py --tasks /data/ham10000 --arch resnet50 \\
        --source-a torchvision:ResNet50_Weights.IMAGENET1K_V2 --source-b isic.pth --seeds 0 1 2

Every method gets the same total epoch budget (stage 1 + stage 2) and the library's
default settings; model selection is on val macro F1 and the test split is reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _study

from mmexport.torchside.train import METHODS

DEFAULT_EPOCHS = (8, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmexport-study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", default=list(_study.REGIMES),
                        help="regime names (benchmarks/_study.py), target-300, or dataset specs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--merge-epochs", type=int, default=DEFAULT_EPOCHS[0])
    parser.add_argument("--finetune-epochs", type=int, default=DEFAULT_EPOCHS[1])
    parser.add_argument("--arch")
    parser.add_argument("--source-a")
    parser.add_argument("--source-b")
    args = parser.parse_args()
    if args.arch:
        _study.ARCH = args.arch
    if args.source_a or args.source_b:
        _study.SOURCES = {"A": Path(args.source_a), "B": Path(args.source_b)}
    for task in args.tasks:
        _study.TASKS.setdefault(task, task)  # a dataset spec stands for itself
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.jsonl"
    epochs = {"merge_epochs": args.merge_epochs, "finetune_epochs": args.finetune_epochs}
    for method in args.methods:
        for task in args.tasks:
            for seed in args.seeds:
                record = _study.run_one(args.work, log, method, task, seed, {**epochs, "method": method})
                print(f"{method:11s} {task:11s} seed {seed}  val F1 {record['val_macro_f1']:.3f}  "
                      f"test F1 {record['test_macro_f1']:.3f}  test acc {record['test_accuracy']:.3f}", flush=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    note = (f"{_study.ARCH}; {args.merge_epochs}+{args.finetune_epochs} epochs for every method (finetune-* spend both "
            f"in stage 2); library defaults; mean ± std over seeds {', '.join(map(str, args.seeds))}; selection on val "
            "macro-F1, test reported. Command: `python benchmarks/accuracy.py`. A run whose effective configuration "
            "equals one already trained by `benchmarks/merge_study.py` (same work directory) is reused, not retrained: "
            "see `reused_from` in `log.jsonl`.")
    (args.out / "README.md").write_text(_study.table(records, args.methods, args.tasks, "Accuracy by method", note))
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
