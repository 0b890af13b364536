"""inspect: the inputs table shows the hash each input has (a dataset's content fingerprint included), and the
--compare record says where the kept runs are."""

from __future__ import annotations

import json

import pytest

from mmexport.runs.inspect import inspect_run
from mmexport.runs.manifest import RunDir
from tests.conftest import write_image_folder


def _run(tmp_path, inputs, comparison=None):
    run = RunDir.create(tmp_path / "run", command="test")
    run.manifest["inputs"] = inputs
    if comparison is not None:
        run.manifest["comparison"] = comparison
    run.write_output("model.safetensors", lambda p: p.write_bytes(b"m"), "model")
    return run.publish()


def _cli_inspect(run):
    from mmexport.cli.app import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_the_data_row_shows_the_recorded_content_fingerprint(tmp_path):
    """The dataset records ``fingerprint`` (not ``sha256``): inspect showed "—" for it."""
    from mmexport.torchside.data import load_task

    root = write_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=16)
    description = json.loads(json.dumps(load_task(str(root), image_size=16).description, default=str))
    digest = "ab" * 32
    run = _run(tmp_path, {"source_a": {"spec": "/models/a.pt", "sha256": digest}, "data": description,
                          "source_b": {"spec": "torchvision:ResNet18_Weights.IMAGENET1K_V1", "sha256": None}})
    records = {r.name: r for r in inspect_run(run).inputs}
    assert records["data"].sha256 == description["fingerprint"].removeprefix("sha256:") and records["data"].hashed == "content"
    assert records["source_a"].sha256 == digest and records["source_a"].hashed == "file"
    assert records["source_b"].sha256 is None
    text = _cli_inspect(run)
    data_line = next(line for line in text.splitlines() if line.strip("│ ").startswith("data"))
    assert description["fingerprint"][7:23] in data_line and "(content)" in data_line and "—" not in data_line


@pytest.mark.parametrize("entry, shown, hashed", [
    ({"kind": "npz", "source": "/d/x.npz", "fingerprint": "sha256:" + "cd" * 32}, "cd" * 32, "file"),
    ({"kind": "synthetic", "source": "synthetic:target"}, None, "generated"),
    ({"kind": "folder", "source": "/d", "fingerprint": "md5:abc"}, None, "file"),  # not a sha256: nothing shown
])
def test_other_datasets(tmp_path, entry, shown, hashed):
    record = next(r for r in inspect_run(_run(tmp_path, {"data": entry})).inputs if r.name == "data")
    assert (record.sha256, record.hashed) == (shown, hashed)


def test_inspect_says_where_the_kept_comparison_run_is(tmp_path):
    kept = str(tmp_path / "run.compare" / "finetune-b-seed2")
    score = {"mean": 0.5, "std": 0.0, "values": [0.5]}
    comparison = {"split": "test", "seeds": [0], "reference": "medmerge", "verdict": "the merge did not pay; use finetune-b",
                  "methods": [{"method": "medmerge", "scores": {"test_macro_f1": score}},
                              {"method": "finetune-b", "scores": {"test_macro_f1": score}}],
                  "kept": {"policy": "best", "directory": str(tmp_path / "run.compare"), "runs": [kept],
                           "best_single": {"method": "finetune-b", "seed": 2, "test_macro_f1": 0.5, "path": kept}}}
    run = _run(tmp_path, {}, comparison)
    assert inspect_run(run).training.comparison.kept["best_single"]["path"] == kept
    text = _cli_inspect(run)
    assert "best single source kept as a complete run: finetune-b seed 2" in text and kept in text.replace("\n", "")
