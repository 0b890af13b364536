"""compare_methods: the table that says whether the merge paid, written into the run."""

import json

import numpy as np
import pytest

from mmexport.errors import MMExportError
from mmexport.fileio import sha256_file
from mmexport.runs.manifest import RunDir
from mmexport.torchside.comparison import (
    COMPARISON_FILE,
    Score,
    compare_methods,
    judge_gap,
    table_from_runs,
)
from tests.conftest import one_line
from tests.torchside.test_train import config


def fake_run(root, name, val_f1, test_f1=None):
    """A published run directory whose manifest holds only what the table reads."""
    run = RunDir.create(root / name)
    final = {"val": {"accuracy": val_f1 + 0.1, "macro_f1": val_f1}}
    if test_f1 is not None:
        final["test"] = {"accuracy": test_f1 + 0.1, "macro_f1": test_f1}
    run.manifest["training"] = {"method": name, "final": final}
    run.save()
    return run.publish()


def test_scores_and_gap_are_paired_by_seed(tmp_path):
    runs = {
        "medmerge": {0: fake_run(tmp_path, "m0", 0.8, 0.70), 1: fake_run(tmp_path, "m1", 0.8, 0.80)},
        "finetune-a": {0: fake_run(tmp_path, "a0", 0.7, 0.60), 1: fake_run(tmp_path, "a1", 0.7, 0.66)},
        "finetune-b": {0: fake_run(tmp_path, "b0", 0.6, 0.50), 1: fake_run(tmp_path, "b1", 0.6, 0.52)},
    }
    table = table_from_runs(runs)
    assert table.split == "test" and table.seeds == (0, 1) and table.best_single == "finetune-a"
    medmerge = table.method("medmerge").scores["test_macro_f1"]
    assert medmerge.mean == pytest.approx(0.75) and medmerge.std == pytest.approx(0.0707107, abs=1e-6)
    assert medmerge.values == (0.70, 0.80)
    assert table.gap == pytest.approx(0.12)  # (0.10 + 0.14) / 2
    assert table.gap_std == pytest.approx(0.0282843, abs=1e-6)
    assert "the merge paid" in table.verdict
    data = table.as_dict()
    assert data["format"] == "mmexport-comparison/1"
    assert data["methods"][0]["scores"]["test_macro_f1"]["values"] == [0.70, 0.80]
    json.dumps(data)  # plain JSON


def test_a_gap_inside_the_seed_spread_is_not_a_win(tmp_path):
    runs = {
        "medmerge": {0: fake_run(tmp_path, "m0", 0.5, 0.70), 1: fake_run(tmp_path, "m1", 0.5, 0.60)},
        "finetune-b": {0: fake_run(tmp_path, "b0", 0.5, 0.60), 1: fake_run(tmp_path, "b1", 0.5, 0.66)},
    }
    table = table_from_runs(runs)
    assert table.gap == pytest.approx(0.02) and "inside the seed spread" in table.verdict
    worse = table_from_runs({"medmerge": {0: fake_run(tmp_path, "w0", 0.3), 1: fake_run(tmp_path, "w1", 0.32)},
                             "lpft-a": {0: fake_run(tmp_path, "l0", 0.6), 1: fake_run(tmp_path, "l1", 0.61)}})
    assert worse.split == "val" and worse.best_single == "lpft-a" and "did not pay; use lpft-a" in worse.verdict
    single = table_from_runs({"medmerge": {0: fake_run(tmp_path, "s0", 0.9)}, "finetune-a": {0: fake_run(tmp_path, "s1", 0.5)}})
    assert single.gap_std is None and "one seed" in single.verdict


def test_score_formatting():
    assert str(Score.of([0.5])) == "0.500" and str(Score.of([0.5, 0.7])) == "0.600 ± 0.141"


def test_compare_methods_writes_the_table_into_the_run_and_keeps_the_best_baseline(resnet18_sources, tmp_path):
    from mmexport.cli.app import app
    from typer.testing import CliRunner

    from mmexport import runtime
    from mmexport.runtime.reference import ReferenceData
    from mmexport.torchside.operations import export_onnx_run

    cfg = config(resnet18_sources, tmp_path / "runs" / "medmerge")
    table = compare_methods(cfg, ["finetune-a", "finetune-b"], seeds=[0])  # --keep-runs best, the default
    run = tmp_path / "runs" / "medmerge"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["outputs"][COMPARISON_FILE]["sha256"] == sha256_file(run / COMPARISON_FILE)
    written = json.loads((run / COMPARISON_FILE).read_text())
    assert written["reference"] == "medmerge" and [m["method"] for m in written["methods"]] == ["medmerge", "finetune-a", "finetune-b"]
    assert manifest["comparison"]["verdict"] == table.verdict == written["verdict"]
    # the run's own scores are the run's final metrics
    assert written["methods"][0]["scores"]["test_macro_f1"]["values"] == [manifest["training"]["final"]["test"]["macro_f1"]]
    assert table.best_single in ("finetune-a", "finetune-b") and table.split == "test"
    RunDir.open(run).checked_file(COMPARISON_FILE)

    # the best single source is kept as a complete run, where the manifest's comparison record says
    kept = tmp_path / "runs" / "medmerge.compare" / f"{table.best_single}-seed0"
    assert manifest["comparison"]["kept"]["policy"] == "best"
    assert manifest["comparison"]["kept"]["best_single"]["path"] == str(kept)
    assert manifest["comparison"]["kept"]["runs"] == [str(kept)]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["medmerge", "medmerge.compare"]
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]  # the other baseline is removed, no leftovers
    kept_manifest = RunDir.open(kept).manifest
    assert kept_manifest["training"]["method"] == table.best_single and kept_manifest["config"]["out"] == str(kept)
    assert {"model.safetensors", "reference.npz"} <= set(kept_manifest["outputs"])
    best_row = next(m for m in written["methods"] if m["method"] == table.best_single)
    assert best_row["runs"] == [str(kept)]
    assert best_row["scores"]["test_macro_f1"]["values"] == [kept_manifest["training"]["final"]["test"]["macro_f1"]]
    # ... that the commands take like any run: verify --manifest, fold to ONNX, the torch-free runtime
    result = CliRunner().invoke(app, ["verify", str(kept), "--manifest"])
    assert result.exit_code == 0, result.output
    export_onnx_run(kept, "fp32")
    reference = ReferenceData.load(kept / "reference.npz")
    with runtime.load(kept / "model.onnx") as predictor:
        logits = predictor.logits(reference.inputs("random", 4))
    assert logits.shape == (4, len(kept_manifest["model"]["classes"]))
    np.testing.assert_allclose(logits, reference.sets["random"].outputs["logits"][:4], atol=1e-3)


def fake_train(scores):
    """A stand-in for train(): publishes a run whose test macro-F1 is ``scores[(method, seed)]``."""
    def train(config, progress=None, *, command="", lock_wait=None):
        run = RunDir.create(config.out, force=config.force, command=command)
        f1 = scores[(config.method, config.seed)]
        run.manifest["training"] = {"method": config.method, "final": {
            "val": {"accuracy": f1, "macro_f1": f1}, "test": {"accuracy": f1, "macro_f1": f1}}}
        run.manifest["config"] = {"out": config.out}
        run.write_output("model.safetensors", lambda p: p.write_bytes(config.method.encode()), "model")
        run.save()
        return run.publish(lock_wait=lock_wait)
    return train


SCORES = {("medmerge", 0): 0.5, ("medmerge", 1): 0.52, ("finetune-a", 0): 0.6, ("finetune-a", 1): 0.7,
          ("finetune-b", 0): 0.4, ("finetune-b", 1): 0.45}


@pytest.mark.parametrize("policy", ["best", "all", "none"])
def test_keep_runs_policies(tmp_path, monkeypatch, policy):
    import mmexport.torchside.train as train_module

    monkeypatch.setattr(train_module, "train", fake_train(SCORES))
    out = tmp_path / "runs" / "m"
    table = compare_methods(config(("a", "b"), out), ["finetune-a", "finetune-b"], seeds=[0, 1], keep_runs=policy)
    assert "did not pay; use finetune-a" in table.verdict
    folder = tmp_path / "runs" / "m.compare"
    best = table.kept["best_single"]
    assert (best["method"], best["seed"], best["test_macro_f1"]) == ("finetune-a", 1, 0.7)  # the best seed of the best
    expected = {"best": ["finetune-a-seed1"], "none": [],
                "all": ["finetune-a-seed0", "finetune-a-seed1", "finetune-b-seed0", "finetune-b-seed1", "medmerge-seed1"]}
    kept = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert kept == expected[policy]  # and nothing else: the call's own folder is gone
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == (["m"] + (["m.compare"] if kept else []))
    assert sorted(table.kept["runs"]) == [str(folder / name) for name in expected[policy]]
    assert best["path"] == (None if policy == "none" else str(folder / "finetune-a-seed1"))
    for name in kept:
        opened = RunDir.open(folder / name)
        opened.checked_file("model.safetensors")
        assert opened.manifest["config"]["out"] == str(folder / name)
    recorded = json.loads((out / "manifest.json").read_text())["comparison"]["kept"]
    assert recorded == {**table.kept, "runs": list(table.kept["runs"])} and recorded["policy"] == policy


def test_keep_runs_replaces_a_previous_kept_run_in_a_given_folder_and_refuses_bad_requests(tmp_path, monkeypatch):
    import mmexport.torchside.train as train_module

    monkeypatch.setattr(train_module, "train", fake_train(SCORES))
    out, folder = tmp_path / "m", tmp_path / "baselines"
    cfg = config(("a", "b"), out)
    first = compare_methods(cfg, ["finetune-a"], seeds=[0, 1], runs_dir=folder)
    second = compare_methods(config(("a", "b"), out, force=True), ["finetune-a"], seeds=[0, 1], runs_dir=folder)
    assert first.kept["runs"] == second.kept["runs"] == [str(folder / "finetune-a-seed1")]
    assert sorted(p.name for p in folder.iterdir()) == ["finetune-a-seed1"]
    # the 0.2 forms: a folder object keeps every run there, None keeps none
    old_form = compare_methods(config(("a", "b"), out, force=True), ["finetune-a"], keep_runs=tmp_path / "old")
    assert old_form.kept["policy"] == "all" and old_form.kept["runs"] == [str(tmp_path / "old" / "finetune-a-seed0")]
    assert compare_methods(config(("a", "b"), out, force=True), ["finetune-a"], keep_runs=None).kept["runs"] == []
    (folder / "finetune-a-seed1" / "notes.txt").write_text("mine\n")  # a user's file: --force would not replace it
    calls = []
    monkeypatch.setattr(train_module, "train", lambda *a, **k: calls.append(a))
    for kwargs, needle in [
        ({"keep_runs": "some/folder"}, "--keep-runs must be one of best, all, none"),
        ({"keep_runs": "none", "runs_dir": folder}, "--keep-runs none keeps none"),
        ({"runs_dir": out / "inside"}, "is inside the run"),
        ({"runs_dir": folder}, "files the run did not make"),
    ]:
        with pytest.raises(MMExportError) as info:
            compare_methods(config(("a", "b"), out, force=True), ["finetune-a"], seeds=[0, 1], **kwargs)
        assert needle in one_line(info)
    assert calls == []  # refused before anything was trained
    (folder / "file").write_text("x")
    with pytest.raises(MMExportError, match="not a directory"):
        compare_methods(config(("a", "b"), out, force=True), ["finetune-a"], keep_runs="all", runs_dir=folder / "file")


def test_compare_refuses_bad_requests_before_training(resnet18_sources, tmp_path):
    with pytest.raises(MMExportError) as info:
        compare_methods(config(resnet18_sources, tmp_path / "run"), ["finetune-c"])
    assert "unknown method 'finetune-c'" in one_line(info)
    with pytest.raises(MMExportError) as info:
        compare_methods(config((resnet18_sources[0], ""), tmp_path / "run", method="finetune-a"), ["finetune-b"])
    assert "finetune-b needs --source-b" in one_line(info)
    with pytest.raises(MMExportError) as info:
        compare_methods(config(resnet18_sources, tmp_path / "run"), ["finetune-a"], seeds=[2**40])
    assert "--seeds" in one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_cli_seeds_need_compare(tmp_path):
    from mmexport.cli.app import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["train", "--arch", "resnet18", "--source-a", "a", "--source-b", "b", "--data", "d",
                                      "--out", str(tmp_path / "o"), "--seeds", "0,1"])
    assert result.exit_code != 0 and "--seeds is the seed list of --compare" in str(result.exception)
    result = CliRunner().invoke(app, ["train", "--arch", "resnet18", "--source-a", "a", "--source-b", "b", "--data", "d",
                                      "--out", str(tmp_path / "o"), "--seed", str(2**32)])
    assert result.exit_code != 0 and "--seed must be an integer from 0 to 4294967295" in str(result.exception)
    result = CliRunner().invoke(app, ["train", "--arch", "resnet18", "--source-a", "a", "--source-b", "b", "--data", "d",
                                      "--out", str(tmp_path / "o"), "--keep-runs", "all"])
    assert result.exit_code != 0 and "--keep-runs and --runs-dir say which --compare runs are kept" in str(result.exception)
    result = CliRunner().invoke(app, ["train", "--arch", "resnet18", "--source-a", "a", "--source-b", "b", "--data", "d",
                                      "--out", str(tmp_path / "o"), "--compare", "--keep-runs", "some/folder"])
    assert result.exit_code != 0 and "--keep-runs must be one of best, all, none" in str(result.exception)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("gap,std,kind", [
    (0.03, 0.01, "paid"), (-0.03, 0.01, "did not pay"), (0.01, 0.01, "inside the seed spread"),
    (-0.009, 0.02, "inside the seed spread"), (0.05, None, "one seed"),
])
def test_judge_gap_is_the_rule_compare_and_the_study_share(gap, std, kind):
    assert judge_gap(gap, std) == kind


def test_the_merge_keeps_its_alignment_on_every_seed_and_the_baselines_train_as_stored(tmp_path, monkeypatch):
    """--align weights --compare --seeds 0,1: medmerge seed 1 is aligned like seed 0; finetune-* and average are not."""
    import mmexport.torchside.train as train_module

    seen = []
    scores = {**SCORES, ("average", 0): 0.3, ("average", 1): 0.3}
    fake = fake_train(scores)

    def recording(config, progress=None, *, command="", lock_wait=None):
        seen.append((config.method, config.seed, config.align))
        return fake(config, progress, command=command, lock_wait=lock_wait)

    monkeypatch.setattr(train_module, "train", recording)
    compare_methods(config(("a", "b"), tmp_path / "m", align="weights"), ["finetune-a", "finetune-b", "average"],
                    seeds=[0, 1], keep_runs="none")
    assert sorted(seen) == [("average", 0, "none"), ("average", 1, "none"), ("finetune-a", 0, "none"),
                            ("finetune-a", 1, "none"), ("finetune-b", 0, "none"), ("finetune-b", 1, "none"),
                            ("medmerge", 0, "weights"), ("medmerge", 1, "weights")]


def test_compare_shows_a_line_every_run_repeats_once(tmp_path, monkeypatch):
    """Nine runs describe the same data and sources: the user reads each such line once, and every other line."""
    import mmexport.torchside.train as train_module

    fake = fake_train(SCORES)

    def chatty(config, progress=None, *, command="", lock_wait=None):
        progress.message("data: 10 classes, the same for every run")
        progress.message(f"head-only probe of {config.method} seed {config.seed}")
        progress.epoch({"stage": "merge", "epoch": 1})
        return fake(config, progress, command=command, lock_wait=lock_wait)

    class Recording:
        def __init__(self):
            self.lines, self.epochs = [], 0

        def start(self, description, total): ...
        def advance(self, steps=1): ...
        def finish(self): ...

        def epoch(self, record):
            self.epochs += 1

        def message(self, text):
            self.lines.append(text)

    monkeypatch.setattr(train_module, "train", chatty)
    progress = Recording()
    compare_methods(config(("a", "b"), tmp_path / "m"), ["finetune-a", "finetune-b"], seeds=[0, 1], progress=progress,
                    keep_runs="none")
    assert progress.lines.count("data: 10 classes, the same for every run") == 1
    assert sum(line.startswith("head-only probe of") for line in progress.lines) == 6 and progress.epochs == 6
    assert sum(line.startswith("compare: run ") for line in progress.lines) == 5
