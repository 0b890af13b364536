"""compare_methods: the table that says whether the merge paid, written into the run."""

import json

import pytest

from mmexport.torchside.comparison import COMPARISON_FILE, Score, compare_methods, table_from_runs
from mmexport.errors import MMExportError
from mmexport.fileio import sha256_file
from mmexport.runs.manifest import RunDir
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


def test_compare_methods_writes_the_table_into_the_run(resnet18_sources, tmp_path):
    cfg = config(resnet18_sources, tmp_path / "runs" / "medmerge")
    table = compare_methods(cfg, ["finetune-a", "finetune-b"], seeds=[0])
    run = tmp_path / "runs" / "medmerge"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["outputs"][COMPARISON_FILE]["sha256"] == sha256_file(run / COMPARISON_FILE)
    written = json.loads((run / COMPARISON_FILE).read_text())
    assert written["reference"] == "medmerge" and [m["method"] for m in written["methods"]] == ["medmerge", "finetune-a", "finetune-b"]
    assert manifest["comparison"]["verdict"] == table.verdict == written["verdict"]
    # the run's own scores are the run's final metrics
    assert written["methods"][0]["scores"]["test_macro_f1"]["values"] == [manifest["training"]["final"]["test"]["macro_f1"]]
    assert table.best_single in ("finetune-a", "finetune-b") and table.split == "test"
    left = sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.endswith(".lock"))
    assert left == ["medmerge"]  # the baselines' runs are removed
    RunDir.open(run).checked_file(COMPARISON_FILE)


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
    from typer.testing import CliRunner

    from mmexport.cli.app import app

    result = CliRunner().invoke(app, ["train", "--arch", "resnet18", "--source-a", "a", "--source-b", "b", "--data", "d",
                                      "--out", str(tmp_path / "o"), "--seeds", "0,1"])
    assert result.exit_code != 0 and "--seeds is the seed list of --compare" in str(result.exception)
    result = CliRunner().invoke(app, ["train", "--arch", "resnet18", "--source-a", "a", "--source-b", "b", "--data", "d",
                                      "--out", str(tmp_path / "o"), "--seed", str(2**32)])
    assert result.exit_code != 0 and "--seed must be an integer from 0 to 4294967295" in str(result.exception)
