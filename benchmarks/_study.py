"""Shared machinery of the accuracy benchmarks: regimes (target + sources), resumable result log, tables.

A *regime* is a target task with its two sources, built reproducibly from seeds. Three
lineages (what the sources share, as ``mmexport.torchside.compatibility`` measures it):

* **one random initialisation** (kernel cosine ~0.98): ``synthetic-64`` (synthetic lesions,
  64 px; A pigment, B border), ``digits-32`` (scikit-learn digits, 32 px, 10 labels per
  class; A digits 0-4, B digits 5-9), ``digits-32-60`` (60 per class; A parity, B digit >= 5),
  ``synthetic-demo``. Both sources were trained from scratch from the same seeded init.
* **a pretrained ancestor** (the paper's setting, cosine ~1.0): an ancestor trained on
  another image family (synthetic lesions for digits, all digits for synthetic lesions),
  fine-tuned into A and B: ``digits-32-shared`` (10 per class), ``digits-32-40-shared``
  (40), ``synth-32-shared`` (100 images), ``synth-32-60-shared`` (300 images).
* **unrelated** (cosine ~0): ``digits-32-unrelated`` and ``digits-32-60-unrelated`` (B from
  another random initialisation), ``synth-32-rnd`` (B an untrained random network).

The digits regimes need scikit-learn (the ``study`` extra: its wheel ships the
images, nothing is downloaded). Target and source images are disjoint: the 1797
digits are split per class by a seeded permutation into a target pool and a
source pool.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmexport.config import TrainConfig
from mmexport.torchside.train import train

ARCH = "resnet18"
SOURCE_EPOCHS = 8
SOURCE_DATA = "?n_train=2000&n_val=400"
REGIME_SEED = 0  # every regime's data and sources are drawn from this seed; runs vary their own --seed


@dataclass
class Regime:
    name: str
    description: str
    image_size: int | None
    labels_per_class: str
    sources_note: str
    orientation: str  # "free" or "sensitive"
    build: Callable[[Path], dict[str, str]] = field(repr=False)  # work dir -> {"data", "A", "B"}
    epochs: tuple[int, int] | None = None  # (merge, finetune) when the regime fixes its own budget


# --------------------------------------------------------------------------- synthetic regimes


def _synthetic_sources(work: Path) -> dict[str, Path]:
    """Train (once; cached in ``work``) the two synthetic source backbones: pigment (A) and border (B)."""
    from mmexport.demo import train_synthetic_sources

    marker = work / "sources" / "done.json"
    paths = {"A": work / "sources" / "pigment.safetensors", "B": work / "sources" / "border.safetensors"}
    if marker.is_file():
        return paths
    trained, summary = train_synthetic_sources(work / "sources", arch=ARCH, epochs=SOURCE_EPOCHS, data_options=SOURCE_DATA,
                                               seed=REGIME_SEED)
    marker.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in summary.items()}, indent=2))
    return trained


def _synthetic_64(work: Path) -> dict[str, str]:
    paths = _synthetic_sources(work)
    return {"data": "synthetic:target?n_train=300&n_val=300&n_test=600&seed=0", "A": str(paths["A"]), "B": str(paths["B"])}


def _synthetic_demo(work: Path) -> dict[str, str]:
    """The demo's setting: its sources (5 epochs on 1200 images each) and target (300/300/300), 6+4 epochs."""
    from mmexport.demo import DemoConfig, train_synthetic_sources

    demo = DemoConfig()
    marker = work / "demo-sources" / "done.json"
    paths = {"A": work / "demo-sources" / "pigment.safetensors", "B": work / "demo-sources" / "border.safetensors"}
    if not marker.is_file():
        _, summary = train_synthetic_sources(work / "demo-sources", arch=ARCH, epochs=demo.source_epochs,
                                             data_options=demo.source_data, seed=demo.seed)
        marker.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in summary.items()}))
    return {"data": f"synthetic:target{demo.target_data}", "A": str(paths["A"]), "B": str(paths["B"])}


def _synthetic_32_random(work: Path) -> dict[str, str]:
    paths = _synthetic_sources(work)
    return {"data": "synthetic:target?n_train=100&n_val=200&n_test=600&seed=3", "A": str(paths["A"]),
            "B": f"scratch:{REGIME_SEED + 7}"}


# --------------------------------------------------------------------------- scikit-learn digits


def digits_pools(seed: int = REGIME_SEED, target_per_class: int = 90) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's 1797 digits (8x8, 0-16) as uint8 0-255, split per class into a target and a source pool.

    Each class's images are permuted with ``numpy.random.default_rng(seed)``; the first
    ``target_per_class`` form the target pool, the rest the source pool (disjoint).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("the digits regimes need scikit-learn: pip install -e '.[study]'") from exc
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    target_idx, source_idx = [], []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        target_idx.append(members[:target_per_class])
        source_idx.append(members[target_per_class:])
    target, source = np.concatenate(target_idx), np.concatenate(source_idx)
    return {"images": images[target], "labels": labels[target]}, {"images": images[source], "labels": labels[source]}


def _split_per_class(labels: np.ndarray, counts: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Indices per split, ``counts[split]`` per class, drawn by a seeded permutation of each class."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {split: [] for split in counts}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        offset = 0
        for split, count in counts.items():
            out[split].append(members[offset : offset + count])
            offset += count
        if offset > len(members):
            raise ValueError(f"class {label}: {len(members)} images, {offset} asked")
    return {split: np.sort(np.concatenate(parts)) for split, parts in out.items()}


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray]) -> Path:
    """A MedMNIST-layout .npz (``{split}_images``/``{split}_labels``), written once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, index in splits.items():
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index]
    np.savez_compressed(path, **arrays)
    return path


def digits_target(path: Path, per_class: dict[str, int], *, seed: int = REGIME_SEED) -> Path:
    """Target task: digit identity (10 classes): the target pool, ``per_class`` images per class and split.

    The target pool holds exactly ``sum(per_class.values())`` images per class; the rest of
    the 1797 images are the source pool of this regime.
    """
    target, _ = digits_pools(seed, sum(per_class.values()))
    splits = _split_per_class(target["labels"], per_class, seed + 1)
    return write_npz(path, target["images"], target["labels"], splits)


SOURCE_TASKS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    # name -> (which source-pool images it uses, their label)
    "low-digits": (lambda y: y < 5, lambda y: y),
    "high-digits": (lambda y: y >= 5, lambda y: y - 5),
    "parity": (lambda y: np.ones_like(y, bool), lambda y: y % 2),
    "high-or-low": (lambda y: np.ones_like(y, bool), lambda y: (y >= 5).astype(np.int64)),
}


def digits_source_task(path: Path, task: str, *, seed: int = REGIME_SEED, val_fraction: float = 0.2,
                       target_per_class: int = 90) -> Path:
    """A source task over the source pool (disjoint from every target image of the same ``target_per_class``)."""
    _, source = digits_pools(seed, target_per_class)
    select, relabel = SOURCE_TASKS[task]
    keep = select(source["labels"])
    images, labels = source["images"][keep], relabel(source["labels"][keep])
    rng = np.random.default_rng(seed + 2)
    order = rng.permutation(len(labels))
    cut = int(round(len(labels) * val_fraction))
    return write_npz(path, images, labels, {"train": np.sort(order[cut:]), "val": np.sort(order[:cut])})


def train_source(data: str, out: Path, *, image_size: int, epochs: int = 10, seed: int = REGIME_SEED,
                 init: Path | None = None, lr: float = 1e-3) -> tuple[Path, dict]:
    """Train a resnet18 on ``data`` (light augmentation) and save its state dict.

    From scratch, or fine-tuned from the backbone in ``init`` (an ancestor; the head is new).
    """
    from mmexport.torchside.backbones import get_backbone
    from mmexport.torchside.checkpoints import load_source, save_state_dict
    from mmexport.torchside.data import load_task
    from mmexport.torchside.train import resolve_device, seed_everything, train_plain

    seed_everything(seed)
    task = load_task(data, image_size=image_size)
    backbone = get_backbone(ARCH)
    model = backbone.build(task.num_classes)
    if init is not None:
        missing, unexpected = model.load_state_dict(load_source(str(init), ARCH).state_dict, strict=False)
        assert not unexpected and all(backbone.is_head_key(k) for k in missing), (missing, unexpected)
    start = time.perf_counter()
    result = train_plain(model, task, epochs=epochs, lr=lr, batch_size=32, seed=seed, device=resolve_device("cpu"),
                         augmentation="light")
    save_state_dict(out, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    return out, {"val_accuracy": result.best_metrics["accuracy"], "val_macro_f1": result.best_metrics["macro_f1"],
                 "seconds": time.perf_counter() - start, "data": data}


def _digits(name: str, per_class: dict[str, int], tasks: tuple[str, str], size: int,
            b_seed: int = REGIME_SEED) -> Callable[[Path], dict[str, str]]:
    """A digits regime. Both sources start from the random initialisation of ``REGIME_SEED`` unless
    ``b_seed`` differs: same init = a shared (random) ancestor, kernel cosine ~0.98 after training."""
    def build(work: Path) -> dict[str, str]:
        root = work / "regimes" / name
        marker = root / "done.json"
        target = root / "target.npz"
        paths = {"A": root / f"source-{tasks[0]}.safetensors", "B": root / f"source-{tasks[1]}.safetensors"}
        if not marker.is_file():
            digits_target(target, per_class)
            summary = {}
            for label, task in zip("AB", tasks):
                source_data = digits_source_task(root / f"source-{task}.npz", task,
                                                 target_per_class=sum(per_class.values()))
                _, summary[label] = train_source(str(source_data), paths[label], image_size=size,
                                                 seed=b_seed if label == "B" else REGIME_SEED)
            marker.write_text(json.dumps(summary, indent=2))
        return {"data": str(target), "A": str(paths["A"]), "B": str(paths["B"])}

    return build


# -- sources that share an ancestor (the paper's setting) ---------------------------------------------
# The ancestor comes from ANOTHER image family, as ImageNet does for medical images: synthetic lesions
# for the digits regimes, all of scikit-learn's digits for the synthetic ones. A and B are that ancestor
# fine-tuned (lr 3e-4, 5 epochs) on two different tasks; the target is merged from them with few labels.
FINETUNE_LR, FINETUNE_EPOCHS = 3e-4, 5


def _ancestor(work: Path, family: str) -> Path:
    root = work / "ancestors"
    path = root / f"{family}.safetensors"
    marker = root / f"{family}.json"
    if not marker.is_file():
        root.mkdir(parents=True, exist_ok=True)
        if family == "synthetic-32":
            data = "synthetic:target?n_train=2000&n_val=400&seed=11"
        else:  # all 1797 digits, 10 classes: the synthetic regimes never see a digit
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
            labels = digits.target.astype(np.int64)
            order = np.random.default_rng(REGIME_SEED + 5).permutation(len(labels))
            data = str(write_npz(root / "digits-all.npz", images, labels,
                                 {"train": np.sort(order[300:]), "val": np.sort(order[:300])}))
        _, summary = train_source(data, path, image_size=32, epochs=SOURCE_EPOCHS)
        marker.write_text(json.dumps(summary, indent=2))
    return path


def _fine_tuned_pair(work: Path, folder: Path, family: str,
                     tasks: dict[str, tuple[str, Callable[[], str]]]) -> dict[str, Path]:
    """Sources A and B (once; cached in ``folder``): the ``family`` ancestor fine-tuned on each task.

    ``tasks``: label -> (file name, a callable giving the task's data spec, called only when training).
    """
    paths = {label: folder / f"{name}.safetensors" for label, (name, _) in tasks.items()}
    marker = folder / "done.json"
    if not marker.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        ancestor = _ancestor(work, family)
        summary = {}
        for label, (_, data) in tasks.items():
            _, summary[label] = train_source(data(), paths[label], image_size=32, epochs=FINETUNE_EPOCHS,
                                             init=ancestor, lr=FINETUNE_LR)
        marker.write_text(json.dumps(summary, indent=2))
    return paths


def _shared_digits(name: str, per_class: dict[str, int]) -> Callable[[Path], dict[str, str]]:
    def build(work: Path) -> dict[str, str]:
        root = work / "regimes" / name
        target = root / "target.npz"
        if not target.is_file():
            digits_target(target, per_class)
        # the sources depend only on the source pool (90 target images per class held out): shared by both budgets
        shared = work / "regimes" / "digits-shared-sources"
        paths = _fine_tuned_pair(work, shared, "synthetic-32", {
            "A": ("low-digits", lambda: str(digits_source_task(shared / "low-digits.npz", "low-digits", target_per_class=90))),
            "B": ("high-digits", lambda: str(digits_source_task(shared / "high-digits.npz", "high-digits",
                                                                target_per_class=90)))})
        return {"data": str(target), "A": str(paths["A"]), "B": str(paths["B"])}

    return build


def _shared_synthetic(n_train: int) -> Callable[[Path], dict[str, str]]:
    def build(work: Path) -> dict[str, str]:
        paths = _fine_tuned_pair(work, work / "regimes" / "synthetic-shared-sources", "digits", {
            "A": ("pigment", lambda: f"synthetic:pigment{SOURCE_DATA}"),
            "B": ("border", lambda: f"synthetic:border{SOURCE_DATA}")})
        return {"data": f"synthetic:target?n_train={n_train}&n_val=200&n_test=600&seed=3", "A": str(paths["A"]),
                "B": str(paths["B"])}

    return build


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime("synthetic-64", "synthetic lesions, 5 imbalanced classes (45/25/15/10/5 %)", None,
               "~60 (300 images)", "A pigment, B border: each carries half of what the target needs; both trained from one random initialisation", "free",
               _synthetic_64),
        Regime("digits-32", "scikit-learn digits (8x8 scans upsampled to 32 px), 10 classes", 32, "10",
               "A identity of digits 0-4, B identity of 5-9 (disjoint source images), both trained from one random initialisation", "sensitive",
               _digits("digits-32", {"train": 10, "val": 20, "test": 60}, ("low-digits", "high-digits"), 32)),
        Regime("digits-32-60", "scikit-learn digits, 32 px, 10 classes", 32, "60",
               "A parity, B digit >= 5 (coarse tasks, disjoint source images), both trained from one random initialisation", "sensitive",
               _digits("digits-32-60", {"train": 60, "val": 20, "test": 40}, ("parity", "high-or-low"), 32)),
        Regime("synth-32-rnd", "synthetic lesions at 32 px, 5 imbalanced classes", 32, "~20 (100 images)",
               "A pigment (trained at 64 px), B a random initialisation (unrelated)", "free", _synthetic_32_random),
        Regime("synthetic-demo", "the demo's setting: synthetic lesions, 64 px, a short budget (6+4 epochs)", None,
               "~60 (300 images)", "the demo's sources: A pigment, B border, 5 epochs on 1200 images each", "free",
               _synthetic_demo, epochs=(6, 4)),
        Regime("digits-32-unrelated", "scikit-learn digits (8x8 scans upsampled to 32 px), 10 classes", 32, "10",
               "A digits 0-4, B digits 5-9, from DIFFERENT random initialisations (unrelated)", "sensitive",
               _digits("digits-32-unrelated", {"train": 10, "val": 20, "test": 60}, ("low-digits", "high-digits"), 32,
                       b_seed=REGIME_SEED + 1)),
        Regime("digits-32-60-unrelated", "scikit-learn digits, 32 px, 10 classes", 32, "60",
               "A parity, B digit >= 5, from DIFFERENT random initialisations (unrelated)", "sensitive",
               _digits("digits-32-60-unrelated", {"train": 60, "val": 20, "test": 40}, ("parity", "high-or-low"), 32,
                       b_seed=REGIME_SEED + 1)),
        Regime("digits-32-shared", "scikit-learn digits, 32 px, 10 classes", 32, "10",
               "A digits 0-4, B digits 5-9, both fine-tuned from one ancestor (synthetic lesions)", "sensitive",
               _shared_digits("digits-32-shared", {"train": 10, "val": 20, "test": 60})),
        Regime("digits-32-40-shared", "scikit-learn digits, 32 px, 10 classes", 32, "40",
               "the same shared-ancestor sources as digits-32-shared", "sensitive",
               _shared_digits("digits-32-40-shared", {"train": 40, "val": 20, "test": 30})),
        Regime("synth-32-shared", "synthetic lesions at 32 px, 5 imbalanced classes", 32, "~20 (100 images)",
               "A pigment, B border, both fine-tuned from one ancestor (all digits)", "free", _shared_synthetic(100)),
        Regime("synth-32-60-shared", "synthetic lesions at 32 px, 5 imbalanced classes", 32, "~60 (300 images)",
               "the same shared-ancestor sources as synth-32-shared", "free", _shared_synthetic(300)),
    )
}
SHARED_REGIMES = ("digits-32-shared", "digits-32-40-shared", "synth-32-shared", "synth-32-60-shared")
# What the lineage check found: the sources of synthetic-64, digits-32 and digits-32-60 were trained from ONE
# random initialisation (train_source and the demo seed every source alike): kernel cosine 0.97-0.98, a shared
# (random) ancestor. Only synth-32-rnd and digits-32-unrelated have unrelated sources.
SAME_INIT_REGIMES = ("synthetic-64", "digits-32", "digits-32-60")
UNRELATED_REGIMES = ("synth-32-rnd", "digits-32-unrelated", "digits-32-60-unrelated")
# Kept for benchmarks/accuracy.py: a task name or a dataset spec standing for itself.
TASKS: dict[str, str] = {"target-300": "synthetic:target?n_train=300&n_val=300&n_test=600&seed=0"}
SOURCES: dict[str, Path] | None = None  # set to use given checkpoints instead of the synthetic sources


def resolve(work: Path, regime: str) -> tuple[dict[str, str], int | None]:
    """(``{"data", "A", "B"}``, image size) of a regime, or of an accuracy.py task name / dataset spec."""
    if regime in REGIMES:
        return REGIMES[regime].build(work), REGIMES[regime].image_size
    data = TASKS.get(regime, regime)
    paths = SOURCES if SOURCES is not None else _synthetic_sources(work)
    return {"data": data, "A": str(paths["A"]), "B": str(paths["B"])}, None


def effective_config(inputs: dict[str, str], image_size: int | None, seed: int, overrides: dict[str, Any]) -> str:
    """What a run trains, as a canonical string: runs with equal strings give equal results."""
    config = TrainConfig(arch=ARCH, source_a=inputs["A"], source_b=inputs["B"], data=inputs["data"], out="", seed=seed,
                         image_size=image_size, **overrides)
    ignored = {"out", "force", "resume", "device", "num_workers", "intended_use"}  # words, not training
    if config.align == "none":  # the default: runs from before --align existed stay comparable
        ignored.add("align")
    if config.method != "medmerge":  # σ is fixed (average) or absent: the logit settings do nothing
        ignored |= {"lr_logits", "granularity", "initial_logit", "lr_logits_probe", "lr_probe_epochs", "sigma_bound"}
    if config.method not in ("medmerge", "average"):  # no blended BatchNorm statistics to initialise
        ignored |= {"bn_init"}
    if "A" not in config.sources_needed():
        ignored.add("source_a")
    if "B" not in config.sources_needed():
        ignored.add("source_b")
    fields_ = {k: v for k, v in asdict(config).items() if k not in ignored}
    return json.dumps(fields_, sort_keys=True, default=list)


def run_one(work: Path, log: Path, name: str, regime: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one (config, regime, seed) unless an equal run is cached; append the result to the log.

    The cache (``work/cache.jsonl``) is shared by every script using ``work``, so the
    accuracy table reuses the study's runs whose effective configuration is identical.
    """
    key = f"{name}|{regime}|{seed}"
    inputs, image_size = resolve(work, regime)
    effective = effective_config(inputs, image_size, seed, overrides)
    for line in log.read_text().splitlines() if log.exists() else []:
        record = json.loads(line)
        if record["key"] == key and record.get("effective", effective) == effective:
            return record
    cache = work / "cache.jsonl"
    for line in cache.read_text().splitlines() if cache.exists() else []:
        record = json.loads(line)
        if record["effective"] == effective:
            record = {**record, "key": key, "config": name, "task": regime, "reused_from": record["key"]}
            with log.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            return record
    (work / "runs").mkdir(parents=True, exist_ok=True)
    config = TrainConfig(arch=ARCH, source_a=inputs["A"], source_b=inputs["B"], data=inputs["data"],
                         out=str(work / "runs" / key.replace("|", "_")), seed=seed, force=True, device="cpu",
                         verify_samples=16, image_size=image_size, **overrides)
    start = time.perf_counter()
    run = train(config)
    manifest = json.loads((run / "manifest.json").read_text())
    training = manifest["training"]
    final = training["final"]
    stages = training["stages"]
    record = {
        "key": key, "effective": effective, "config": name, "task": regime, "seed": seed, "overrides": overrides,
        "seconds": time.perf_counter() - start,
        "val_macro_f1": final["val"]["macro_f1"], "val_accuracy": final["val"]["accuracy"],
        "test_macro_f1": final["test"]["macro_f1"], "test_accuracy": final["test"]["accuracy"],
        "stage1_val_macro_f1": next(iter(stages.values()))["best_metrics"].get("macro_f1"),
        "mean_sigma": _mean_sigma(manifest),
        "history": {stage: [round(h["val_macro_f1"], 5) for h in value["history"]] for stage, value in stages.items()},
        "diagnostics": training.get("diagnostics"),
        "lr_probe": training.get("lr_probe"),
        "compatibility": training.get("compatibility"),
        "code": code_version(),
    }
    for path in (log, cache):
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    return record


def code_version() -> str:
    """mmexport's version and the commit the study ran (``+changes`` when mmexport/ differed from it): a log
    row is reproducible by that code only (a training change shifts every later run's random stream)."""
    import subprocess

    import mmexport

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mmexport"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return mmexport.__version__
    return f"{mmexport.__version__} {head}{'+changes' if dirty else ''}"


def _mean_sigma(manifest: dict) -> float | None:
    rows = manifest["training"].get("layer_coefficients")
    return statistics.fmean(r[1] for r in rows) if rows else None


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(records: list[dict], rows: list[str], tasks: list[str], title: str, note: str) -> str:
    lines = [f"# {title}", "", note, ""]
    header = "| config | " + " | ".join(f"{t} test macro-F1 | {t} test acc | {t} val macro-F1" for t in tasks) + " | n |"
    lines += [header, "|" + " --- |" * (1 + 3 * len(tasks) + 1)]
    for row in rows:
        cells, count = [], 0
        for task in tasks:
            chosen = [r for r in records if r["config"] == row and r["task"] == task]
            count = max(count, len(chosen))
            if not chosen:
                cells += ["—", "—", "—"]
                continue
            cells += [mean_std([r["test_macro_f1"] for r in chosen]), mean_std([r["test_accuracy"] for r in chosen]),
                      mean_std([r["val_macro_f1"] for r in chosen])]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {count} |")
    return "\n".join(lines) + "\n"
