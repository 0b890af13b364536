"""The study's regime generators (benchmarks/_study.py) and its worst-case report (benchmarks/merge_study.py).

One fast test per generator; the study itself runs outside CI.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _study  # noqa: E402
import merge_study  # noqa: E402

from mmexport.torchside.data import load_task  # noqa: E402

import sklearn  # noqa: E402,F401  (the test extra installs it: CI keeps every regime generator tested)


def test_digits_pools_are_disjoint_reproducible_and_stratified():
    target, source = _study.digits_pools(seed=0)
    assert np.bincount(target["labels"]).tolist() == [90] * 10
    assert len(target["labels"]) + len(source["labels"]) == 1797
    assert target["images"].dtype == np.uint8 and target["images"].shape[1:] == (8, 8) and target["images"].max() == 255
    again, _ = _study.digits_pools(seed=0)
    other, _ = _study.digits_pools(seed=1)
    assert np.array_equal(again["images"], target["images"]) and not np.array_equal(other["images"], target["images"])
    # disjoint: no target image is a source image (compared as bytes, per label)
    source_keys = {(img.tobytes(), lab) for img, lab in zip(source["images"], source["labels"])}
    target_keys = {(img.tobytes(), lab) for img, lab in zip(target["images"], target["labels"])}
    shared = target_keys & source_keys
    assert len(shared) <= 2  # the 8x8 scans repeat a handful of identical images; the index split is disjoint


def test_digits_target_has_the_asked_labels_per_class_and_loads_at_32_px(tmp_path):
    path = _study.digits_target(tmp_path / "t.npz", {"train": 10, "val": 20, "test": 60})
    task = load_task(str(path), image_size=32)
    assert task.num_classes == 10 and task.image_size == 32 and task.splits == ("train", "val", "test")
    for split, count in (("train", 10), ("val", 20), ("test", 60)):
        assert np.bincount(task.labels(split)).tolist() == [count] * 10
    assert task.dataset("train")[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name,classes", [("low-digits", 5), ("high-digits", 5), ("parity", 2), ("high-or-low", 2)])
def test_digits_source_tasks_label_the_source_pool(tmp_path, name, classes):
    path = _study.digits_source_task(tmp_path / f"{name}.npz", name)
    data = np.load(path)
    labels = np.concatenate([data["train_labels"], data["val_labels"]])
    _, source = _study.digits_pools()
    select, relabel = _study.SOURCE_TASKS[name]
    assert len(labels) == int(select(source["labels"]).sum())
    assert sorted(set(labels.tolist())) == list(range(classes))
    assert abs(len(data["val_labels"]) - 0.2 * len(labels)) <= 1


def test_synthetic_regimes_are_specs_over_cached_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(_study, "_synthetic_sources", lambda work: {"A": work / "a.safetensors", "B": work / "b.safetensors"})
    spec = _study.REGIMES["synthetic-64"].build(tmp_path)
    assert spec["data"].startswith("synthetic:target?n_train=300") and spec["B"].endswith("b.safetensors")
    random_b = _study.REGIMES["synth-32-rnd"].build(tmp_path)
    assert random_b["B"].startswith("scratch:") and _study.REGIMES["synth-32-rnd"].image_size == 32
    assert load_task(random_b["data"], image_size=32).labels("train").shape == (100,)


def test_every_regime_is_described_and_differs_in_what_matters():
    regimes = list(_study.REGIMES.values())
    assert {r.orientation for r in regimes} == {"free", "sensitive"}
    assert {r.image_size or 64 for r in regimes} == {32, 64}
    assert len({r.labels_per_class for r in regimes}) >= 3


def _record(config, task, seed, test, merge_history=None):
    return {"config": config, "task": task, "seed": seed, "test_macro_f1": test, "val_macro_f1": test,
            "history": {"merge": merge_history or []}, "seconds": 1.0, "stage1_val_macro_f1": 0.5}


def test_auto_rows_pick_the_rate_with_the_best_early_validation_score():
    records = [
        _record("lr3e-2", "r", 0, 0.60, [0.2, 0.3, 0.5]),
        _record("lr1e-1", "r", 0, 0.70, [0.25, 0.4, 0.6]),
        _record("lr3e-1", "r", 0, 0.65, [0.3, 0.35, 0.7]),
    ]
    assert merge_study.simulate_auto(records, 1)[0]["chosen"] == 0.3  # best after 1 epoch
    picked = merge_study.simulate_auto(records, 2)[0]
    assert picked["chosen"] == 0.1 and picked["test_macro_f1"] == 0.70 and picked["config"] == "auto p=2"
    tie = [dict(r, history={"merge": [0.5, 0.5]}) for r in records]
    assert merge_study.simulate_auto(tie, 2)[0]["chosen"] == 0.03  # ties go to the smaller rate


def test_gap_is_paired_by_seed_against_the_best_single_source():
    records = [
        _record("lr1e-1", "r", 0, 0.80), _record("lr1e-1", "r", 1, 0.70),
        _record("finetune-a", "r", 0, 0.75), _record("finetune-a", "r", 1, 0.75),
        _record("finetune-b", "r", 0, 0.60), _record("finetune-b", "r", 1, 0.60),
    ]
    mean, std, n, best = merge_study.gap(records, "lr1e-1", "r")
    assert best == "finetune-a" and n == 2 and mean == pytest.approx(0.0) and std == pytest.approx(0.0707107, abs=1e-6)
    assert merge_study.gap(records, "old-defaults medmerge", "r") is None  # no legacy single sources in the log


def _lineage(kind, cosine):
    return {"lineage": {"lineage": kind, "median_cosine": cosine}}


def test_report_judges_each_regime_like_compare_and_takes_the_worst_per_lineage():
    related, unrelated = "digits-32-shared", "digits-32-unrelated"
    records = []
    for seed, (merge_r, merge_u) in enumerate([(0.90, 0.70), (0.92, 0.71), (0.91, 0.69)]):
        records += [_record("finetune-a", t, seed, 0.85) for t in (related, unrelated)]
        records += [_record("finetune-b", t, seed, 0.80) for t in (related, unrelated)]
        records += [_record("lr1e-1", related, seed, merge_r), _record("lr1e-1", unrelated, seed, merge_u)]
    lineage = {related: _lineage("shared-ancestor", 0.999)["lineage"], unrelated: _lineage("unrelated", 0.0)["lineage"]}
    text = merge_study.report(records, [related, unrelated], [0, 1, 2], lineage=lineage)
    row = next(line for line in text.splitlines() if line.startswith("| lr1e-1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # +6.0 ± 1.0 over finetune-a: paid; -15.0 ± 1.0: lost (the rule of --compare)
    assert cells[1] == "+6.0 ± 1.0 paid" and cells[2] == "-15.0 ± 1.0 lost"
    assert cells[3:] == ["-15.0", "+6.0", "-15.0", "-4.5", "1/0/1"]  # worst, worst related, worst unrelated, mean, counts
    assert "shared-ancestor (1.00)" in text and "unrelated (0.00)" in text


def test_regime_lineage_reads_the_record_or_else_the_run_manifest(tmp_path):
    import json

    recorded = dict(_record("lr1e-1", "a", 0, 0.5), key="lr1e-1|a|0", overrides={},
                    compatibility=_lineage("unrelated", 0.01))
    single = dict(_record("finetune-a", "b", 0, 0.5), key="finetune-a|b|0", overrides={"method": "finetune-a"})
    older = dict(_record("average", "b", 0, 0.5), key="x|b|0", reused_from="average|b|1", overrides={"method": "average"})
    run = tmp_path / "runs" / "average_b_1"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"training": {"compatibility": _lineage("shared-ancestor", 0.97)}}))
    found = merge_study.regime_lineage([recorded, single, older], tmp_path)
    assert found == {"a": {"lineage": "unrelated", "median_cosine": 0.01},
                     "b": {"lineage": "shared-ancestor", "median_cosine": 0.97}}
    assert merge_study.regime_lineage([single], tmp_path) == {}  # single-source runs check no lineage


def test_align_auto_row_takes_the_unaligned_run_where_an_ancestor_is_shared_and_the_aligned_one_elsewhere():
    records = [_record("lr1e-1", "rel", 0, 0.80), _record("lr1e-1 align", "rel", 0, 0.80),
               _record("lr1e-1", "unrel", 0, 0.60), _record("lr1e-1 align", "unrel", 0, 0.65),
               _record("lr1e-1", "unknown", 0, 0.5)]
    lineage = {"rel": {"lineage": "shared-ancestor", "median_cosine": 0.99},
               "unrel": {"lineage": "unrelated", "median_cosine": 0.0}}
    rows = {r["task"]: r for r in merge_study.simulate_align_auto(records, lineage)
            if r["config"] == merge_study.align_auto_name("lr1e-1")}
    assert set(rows) == {"rel", "unrel"}  # a regime without a lineage record gets no row
    assert rows["unrel"]["test_macro_f1"] == 0.65 and rows["rel"]["test_macro_f1"] == 0.80
    assert rows["unrel"]["config"] == "lr1e-1 auto (read off)"
