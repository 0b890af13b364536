"""Which MedMerge defaults are safe: every setting on several regimes, judged by the WORST-CASE gap.

Each configuration trains resnet18 on every regime (``_study.REGIMES``: synthetic
lesions at 64 px, scikit-learn digits at 32 px with 10 and 60 labels per class,
synthetic lesions at 32 px with one unrelated source) for several seeds with the
same total epoch budget as the single-source baselines. A setting's score is its
gap to the best single-source fine-tune (``finetune-a``/``finetune-b`` with the same
augmentation) per regime; defaults are chosen by the worst regime, not the mean.

The ``auto`` rows are the logit learning-rate probe (``--lr-logits-probe``): a probe
run is exactly the fixed-rate run of the rate it chooses (tests/torchside/test_train_methods.py
checks this bit for bit), so its result is read off the fixed-rate runs' per-epoch
validation scores instead of training it again; ``--check-auto`` trains real probe
runs to confirm.

Results are appended to ``log.jsonl`` as they finish, so an interrupted study continues.

    python benchmarks/merge_study.py --out benchmarks/results/merge_study       # needs pip install -e '.[study]'
    python benchmarks/merge_study.py --report-only                               # rebuild README.md from log.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _study
from mmexport.torchside.comparison import judge_gap

EPOCHS = {"merge_epochs": 8, "finetune_epochs": 8}
LIGHT = {"augmentation": "light"}
# name -> overrides of TrainConfig (besides EPOCHS). Runs go in this order, so the ones that
# decide the defaults finish first.
CONFIGS: dict[str, dict] = {
    "finetune-a": {"method": "finetune-a", **LIGHT},
    "finetune-b": {"method": "finetune-b", **LIGHT},
    "lr1e-1": {"lr_logits": 1e-1, **LIGHT},
    "lr1e-1 align": {"lr_logits": 1e-1, "align": "weights", **LIGHT},
    "lr3e-2 align": {"lr_logits": 3e-2, "align": "weights", **LIGHT},
    "lr3e-1 align": {"lr_logits": 3e-1, "align": "weights", **LIGHT},
    # mmexport 0.3's default: align where the lineage check finds no shared ancestor. Its row is read off the
    # lr1e-1 / lr1e-1 align runs (simulate_align_auto); training it checks that reading (identical runs).
    "lr1e-1 auto": {"lr_logits": 1e-1, "align": "auto", **LIGHT},
    "average align": {"method": "average", "align": "weights", **LIGHT},
    "lr3e-1": {"lr_logits": 3e-1, **LIGHT},
    # the defaults of mmexport 0.1: logit lr 0.3, flips on both axes (+ crop and jitter for files)
    "old-defaults medmerge": {"lr_logits": 3e-1, "augmentation": "legacy"},
    "old-defaults finetune-a": {"method": "finetune-a", "augmentation": "legacy"},
    "old-defaults finetune-b": {"method": "finetune-b", "augmentation": "legacy"},
    "lr3e-2": {"lr_logits": 3e-2, **LIGHT},
    "lr1": {"lr_logits": 1.0, **LIGHT},
    "average": {"method": "average", **LIGHT},
    "lpft-a": {"method": "lpft-a", **LIGHT},
    "lpft-b": {"method": "lpft-b", **LIGHT},
    "none finetune-a": {"method": "finetune-a", "augmentation": "none"},
    "none finetune-b": {"method": "finetune-b", "augmentation": "none"},
    "none lr1e-1": {"lr_logits": 1e-1, "augmentation": "none"},
    "lr3e-1 bound0.1": {"lr_logits": 3e-1, "sigma_bound": 0.1, **LIGHT},
    "lr1e-1 4+12": {"lr_logits": 1e-1, "merge_epochs": 4, "finetune_epochs": 12, **LIGHT},
    "lr1e-1 blend": {"lr_logits": 1e-1, "bn_init": "blend", **LIGHT},
}
AUTO_CANDIDATES = {"lr3e-2": 3e-2, "lr1e-1": 1e-1, "lr3e-1": 3e-1}
AUTO_EPOCHS = (1, 2)
SINGLE = {"legacy": ("old-defaults finetune-a", "old-defaults finetune-b"),
          "light": ("finetune-a", "finetune-b"), "none": ("none finetune-a", "none finetune-b")}


AUTO_ALIGN_RATES = tuple(AUTO_CANDIDATES)  # the fixed rates, each read off with --align auto


def align_auto_name(rate: str) -> str:
    return f"{rate} auto (read off)"


def simulate_align_auto(records: list[dict], lineage: dict[str, dict]) -> list[dict]:
    """``--align auto`` per (rate, regime, seed), read off the fixed runs: ``lrX`` where the regime's lineage
    check says shared-ancestor (auto leaves B as stored), ``lrX align`` elsewhere (auto aligns, as weights)."""
    out = []
    for rate in AUTO_ALIGN_RATES:
        name = align_auto_name(rate)
        for record in records:
            check = lineage.get(record["task"])
            if check is None:
                continue
            wanted = rate if check["lineage"] == "shared-ancestor" else f"{rate} align"
            if record["config"] == wanted:
                out.append({**record, "config": name, "key": f"{name}|{record['task']}|{record['seed']}"})
    return out


def _augmentation(name: str) -> str:
    return CONFIGS[name].get("augmentation", "light") if name in CONFIGS else "light"


def simulate_auto(records: list[dict], probe_epochs: int) -> list[dict]:
    """The probe's result per (regime, seed), read off the fixed-rate runs (see the module docstring)."""
    out = []
    keys = {(r["task"], r["seed"]) for r in records if r["config"] in AUTO_CANDIDATES}
    for task, seed in sorted(keys):
        runs = {r["config"]: r for r in records if r["task"] == task and r["seed"] == seed and r["config"] in AUTO_CANDIDATES}
        if len(runs) < len(AUTO_CANDIDATES):
            continue
        score = {name: max(runs[name]["history"]["merge"][:probe_epochs]) for name in runs}
        chosen = max(runs, key=lambda name: (score[name], -AUTO_CANDIDATES[name]))
        out.append({**runs[chosen], "config": f"auto p={probe_epochs}", "chosen": AUTO_CANDIDATES[chosen],
                    "key": f"auto p={probe_epochs}|{task}|{seed}"})
    return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def gap(records: list[dict], config: str, task: str) -> tuple[float, float, int, str] | None:
    """(mean, std over seeds of the paired difference, n, best single) of ``config`` minus the best single source.

    The best single source is the better (by mean test macro-F1) of finetune-a/finetune-b
    trained with the same augmentation preset; differences are paired by seed.
    """
    singles = SINGLE[_augmentation(config.split(" p=")[0] if config.startswith("auto") else config)]
    by_seed = {r["seed"]: r["test_macro_f1"] for r in records if r["config"] == config and r["task"] == task}
    single_runs = {s: {r["seed"]: r["test_macro_f1"] for r in records if r["config"] == s and r["task"] == task}
                   for s in singles}
    if not by_seed or any(not v for v in single_runs.values()):
        return None
    best = max(singles, key=lambda s: _mean(list(single_runs[s].values())))
    seeds = sorted(set(by_seed) & set(single_runs[best]))
    if not seeds:
        return None
    diffs = [by_seed[s] - single_runs[best][s] for s in seeds]
    return _mean(diffs), _std(diffs), len(seeds), best


VERDICT_SHORT = {"paid": "paid", "inside the seed spread": "spread", "did not pay": "lost", "one seed": "1 seed"}


def regime_lineage(records: list[dict], work: Path | None) -> dict[str, dict]:
    """regime -> the lineage check its merge runs recorded (before any alignment): lineage and median cosine.

    Read from the record, else from the run's manifest in ``work`` (records logged before the
    study recorded it); regimes with neither are left out.
    """
    found: dict[str, dict] = {}
    for record in records:
        task = record["task"]
        if task in found or record["overrides"].get("method", "medmerge") not in ("medmerge", "average"):
            continue
        check = record.get("compatibility")
        if check is None and work is not None:
            manifest = work / "runs" / record.get("reused_from", record["key"]).replace("|", "_") / "manifest.json"
            if manifest.is_file():
                check = json.loads(manifest.read_text())["training"].get("compatibility")
        if check:
            found[task] = check["lineage"]
    return found


def _lineage_cell(check: dict | None) -> str:
    return f"{check['lineage']} ({check['median_cosine']:.2f})" if check else "—"


def report(records: list[dict], tasks: list[str], seeds: list[int], started: str | None = None,
           lineage: dict[str, dict] | None = None) -> str:
    lineage = lineage or {}
    related = [t for t in tasks if lineage.get(t, {}).get("lineage") == "shared-ancestor"]
    unrelated = [t for t in tasks if lineage.get(t, {}).get("lineage") == "unrelated"]
    records = records + [r for p in AUTO_EPOCHS for r in simulate_auto(records, p)] + simulate_align_auto(records, lineage)
    configs = [c for c in list(CONFIGS) + [f"auto p={p}" for p in AUTO_EPOCHS] + [align_auto_name(r) for r in AUTO_ALIGN_RATES]
               if any(r["config"] == c for r in records)]
    lines = ["# MedMerge settings study: worst case over regimes", ""]
    lines += ["Regimes (`benchmarks/_study.py`, every one rebuilt from seed 0; runs vary `--seed`):", "",
              "| regime | images | size | labels per class | sources | lineage check (median kernel cosine) | orientation |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for task in tasks:
        r = _study.REGIMES[task]
        lines.append(f"| {task} | {r.description} | {r.image_size or 64} px | {r.labels_per_class} | {r.sources_note} | "
                     f"{_lineage_cell(lineage.get(task))} | {r.orientation} |")
    lines += ["", f"resnet18, every run {EPOCHS['merge_epochs']}+{EPOCHS['finetune_epochs']} epochs (synthetic-demo: the demo's "
              "6+4; finetune-* spend both in stage 2), library defaults otherwise; model selection on val macro-F1, test macro-F1 reported as mean ± std "
              f"over seeds {', '.join(map(str, seeds))} (×100). Command: `python benchmarks/merge_study.py`.", ""]
    lines += ["## Gap to the best single-source fine-tune (test macro-F1 points, paired by seed)", "",
              "Per regime: mean ± std over seeds of (config − best of finetune-a/finetune-b with the same augmentation), "
              "and the verdict `mmexport train --compare` would print on those seeds (`comparison.judge_gap`: *paid* "
              "when the gap is positive and larger than its std, *lost* when negative and larger, *spread* inside it). "
              "**worst** = the lowest regime mean, the criterion the defaults are chosen by; *worst related* / *worst "
              "unrelated* = the same over the regimes whose lineage check says shared-ancestor / unrelated; "
              "*paid/spread/lost* counts the verdicts.", ""]
    lines.append("| config | " + " | ".join(tasks) + " | worst | worst related | worst unrelated | mean | paid/spread/lost |")
    lines.append("|" + " --- |" * (len(tasks) + 6))
    for config in configs:
        if config.replace("old-defaults ", "").replace("none ", "") in ("finetune-a", "finetune-b", "lr1e-1 auto"):
            continue
        cells, means, verdicts = [], {}, []
        for task in tasks:
            g = gap(records, config, task)
            if g is None:
                cells.append("—")
                continue
            means[task] = g[0]
            verdicts.append(judge_gap(g[0], g[1] if g[2] > 1 else None))
            cells.append(f"{100 * g[0]:+.1f} ± {100 * g[1]:.1f} {VERDICT_SHORT[verdicts[-1]]}")
        complete = len(means) == len(tasks)

        def worst_of(group: list[str]) -> str:
            return f"{100 * min(means[t] for t in group):+.1f}" if complete and group else "—"

        mean = f"{100 * _mean(list(means.values())):+.1f}" if complete else "—"
        counts = "/".join(str(verdicts.count(v)) for v in ("paid", "inside the seed spread", "did not pay"))
        lines.append(f"| {config} | " + " | ".join(cells) + f" | {worst_of(tasks)} | {worst_of(related)} | "
                     f"{worst_of(unrelated)} | {mean} | {counts if complete else '—'} |")
    read_off = {(r["task"], r["seed"]): r for r in records if r["config"] == align_auto_name("lr1e-1")}
    trained = [(r, read_off.get((r["task"], r["seed"]))) for r in records if r["config"] == "lr1e-1 auto"]
    if trained:
        same = sum(1 for r, o in trained if o is not None and r["test_macro_f1"] == o["test_macro_f1"]
                   and r["val_macro_f1"] == o["val_macro_f1"])
        lines += ["", f"*{align_auto_name('lr1e-1')}* checked by training `--align auto` itself: {same} of {len(trained)} runs "
                  "(" + ", ".join(f"{r['task']} seed {r['seed']}" for r, _ in trained) + ") give exactly the val and "
                  "test macro-F1 of the run the row reads off."]
    lines += ["", "## Test macro-F1 per regime (mean ± std over seeds, n runs)", ""]
    lines.append("| config | " + " | ".join(tasks) + " |")
    lines.append("|" + " --- |" * (len(tasks) + 1))
    for config in configs:
        cells = []
        for task in tasks:
            chosen = [r["test_macro_f1"] for r in records if r["config"] == config and r["task"] == task]
            cells.append(f"{_study.mean_std(chosen)} (n={len(chosen)})" if chosen else "—")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    lines += ["", "## Diagnostics (means over seeds)", "",
              "σ saturation: fraction of merge coefficients beyond 0.1/0.9 after stage 1. Stage 1 / probes: val macro-F1 "
              "at the end of stage 1 and of the head-only probe of each source (×100). auto: the rate each seed chose.", ""]
    lines.append("| config | regime | σ saturated | stage-1 val F1 | probe A | probe B | stage 1 below a probe | s/run |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for config in configs:
        for task in tasks:
            chosen = [r for r in records if r["config"] == config and r["task"] == task]
            if not chosen:
                continue
            diag = [r.get("diagnostics") or {} for r in chosen]
            sat = [d["sigma_saturation"] for d in diag if "sigma_saturation" in d]
            probes = {label: [d["source_probes"][label]["val_macro_f1"] for d in diag if label in d.get("source_probes", {})]
                      for label in "AB"}
            below = sum(bool(d.get("stage1_below_probe")) for d in diag)
            stage1 = [r["stage1_val_macro_f1"] for r in chosen
                      if r.get("stage1_val_macro_f1") is not None and ("merge" in r["history"] or "probe" in r["history"])]
            picks = ", ".join(f"{r['chosen']:g}" for r in chosen) if config.startswith("auto") else ""
            note = f" (chose {picks})" if picks else ""
            saturated = f"{100 * _mean(sat):.1f} %" if sat else "—"
            lines.append(
                f"| {config}{note} | {task} | {saturated} | "
                f"{f'{100 * _mean(stage1):.1f}' if stage1 else '—'} | " + " | ".join(f"{100 * _mean(v):.1f}" if v else "—" for v in probes.values())
                + f" | {below}/{len(chosen)} | {_mean([r['seconds'] for r in chosen]):.0f} |")
    if started:
        lines += ["", started]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/merge_study"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmexport-study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--regimes", nargs="+", default=list(_study.REGIMES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--check-auto", action="store_true",
                        help="also train real --lr-logits-probe runs (candidates 0.03,0.1,0.3, 2 probe epochs)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.jsonl"
    configs = dict(CONFIGS)
    if args.check_auto:
        configs["auto p=2 (trained)"] = {"lr_logits_probe": (3e-2, 1e-1, 3e-1), "lr_probe_epochs": 2, **LIGHT}
        args.configs.append("auto p=2 (trained)")
    start = time.time()
    if not args.report_only:
        for name in args.configs:
            for regime in args.regimes:
                budget = _study.REGIMES[regime].epochs if regime in _study.REGIMES else None
                epochs = dict(zip(("merge_epochs", "finetune_epochs"), budget)) if budget else EPOCHS
                # alignment explicit: a config names what it trains whatever the library's default
                overrides = {**epochs, "align": "none", **configs[name]}
                for seed in args.seeds:
                    record = _study.run_one(args.work, log, name, regime, seed, overrides)
                    print(f"{name:26s} {regime:13s} seed {seed}  val F1 {record['val_macro_f1']:.3f}  "
                          f"test F1 {record['test_macro_f1']:.3f}  ({record['seconds']:.0f} s)", flush=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    total = sum(r["seconds"] for r in records if "reused_from" not in r)
    note = f"Training time of all runs in the log: {total / 60:.0f} min (2-core shared CPU)."
    lineage = regime_lineage(records, args.work)
    (args.out / "README.md").write_text(report(records, args.regimes, args.seeds, note, lineage))
    print((args.out / "README.md").read_text())
    print(f"wall {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
