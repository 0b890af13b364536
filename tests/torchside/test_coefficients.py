"""inspect's view of the merge coefficients: the spread of σ per layer, and agreement across seeds."""

from __future__ import annotations

import pytest
import torch

from mmexport.runs.manifest import RunDir
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.torchside.coefficients import layer_coefficients, seed_agreement
from mmexport.torchside.merge import MergedModel
from mmexport.torchside.modelfile import save_unmerged
from tests.torchside.test_merge import backbone_only

SOURCES = None


def _sources():
    global SOURCES
    if SOURCES is None:
        SOURCES = [backbone_only("resnet18", 1), backbone_only("resnet18", 2)]
    return SOURCES


def merged_run(path, logits_of):
    """A run holding an unmerged checkpoint whose merge logits are ``logits_of(name, shape)``."""
    merged = MergedModel("resnet18", _sources(), 2)
    with torch.no_grad():
        for name in merged.merge_names:
            logit = merged.logit(name)
            logit.copy_(logits_of(name, logit.shape))
    info = ModelInfo("resnet18", ("a", "b"), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    run = RunDir.create(path, command="test")
    run.write_output("unmerged.safetensors", lambda p: save_unmerged(p, merged, info), "unmerged")
    return RunDir.open(run.publish())


def split(noise=0.0, seed=0):
    """Half of each parameter's logits at -2, half at +2 (σ 0.12 / 0.88), plus ``noise``."""
    generator = torch.Generator().manual_seed(seed)

    def logits(name, shape):
        values = torch.full(shape, 2.0)
        values.view(-1)[: values.numel() // 2] = -2.0
        return values + noise * torch.randn(shape, generator=generator)
    return logits


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    return merged_run(tmp_path_factory.mktemp("coefficients") / "split", split())


def test_the_spread_says_what_the_mean_hides(split_run):
    """Half the kernels at σ≈0.12, half at σ≈0.88: the mean reads 0.5, the spread does not."""
    rows = {r["name"]: r for r in layer_coefficients(split_run)}
    conv = rows["layer1.0.conv1.weight"]
    assert conv["mean"] == pytest.approx(0.5, abs=1e-6) and conv["count"] == 64 * 64
    assert conv["std"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item() - 0.5, abs=1e-6)
    assert conv["off_centre"] == 1.0 and conv["saturated"] == 0.0  # σ 0.12/0.88: beyond 0.4/0.6, not 0.1/0.9


def test_agreement_across_seeds_of_real_runs(split_run, tmp_path):
    agreement = seed_agreement({0: split_run, 1: merged_run(tmp_path / "s1", split(noise=0.5, seed=1))})
    assert agreement["seeds"] == [0, 1] and 0.8 < agreement["overall"] < 1.0
    assert set(agreement["layers"]) == {r["name"] for r in layer_coefficients(split_run)}
    assert all(0.5 < r < 1.0 for name, r in agreement["layers"].items() if name.endswith("conv1.weight"))
    # inspect shows both: the spread columns, and r per layer and overall from the --compare record
    from mmexport.cli.app import app
    from typer.testing import CliRunner

    score = {"mean": 0.5, "std": 0.0, "values": [0.5, 0.5]}
    with RunDir.writer(tmp_path / "s1", "test") as run:
        run.manifest["comparison"] = {"split": "val", "seeds": [0, 1], "reference": "medmerge", "verdict": "v",
                                      "methods": [{"method": "medmerge", "scores": {"val_macro_f1": score}}],
                                      "sigma_agreement": agreement}
        run.save()
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "s1")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "σ std" in result.output and "beyond 0.4/0.6" in result.output and "seeds r" in result.output
    row = next(line for line in result.output.splitlines() if " layer1.0.conv1.weight " in line)
    assert f"{agreement['layers']['layer1.0.conv1.weight']:+.2f}" in row
    assert f"across seeds 0, 1: r = {agreement['overall']:+.2f}" in result.output


def test_agreement_measures_the_same_choices_not_the_distance(monkeypatch):
    from types import SimpleNamespace

    from mmexport.torchside import coefficients

    generator = torch.Generator().manual_seed(0)
    lean = torch.randn(1000, generator=generator)
    runs = {name: SimpleNamespace(has=lambda _: True, weights={"conv.weight": torch.sigmoid(values)})
            for name, values in [("same", lean), ("opposite", -lean), ("unrelated", torch.randn(1000, generator=generator)),
                                 ("flat", torch.zeros(1000)), ("scaled", 3 * lean)]}
    monkeypatch.setattr(coefficients, "_read_weights", lambda run: run.weights)
    r = {name: seed_agreement({0: runs["same"], 1: runs[name]})["overall"] for name in runs if name != "same"}
    assert r["opposite"] < -0.95 and abs(r["unrelated"]) < 0.1 and r["scaled"] > 0.9
    assert r["flat"] is None  # still at 0.5 everywhere: no evidence either way
    assert seed_agreement({0: runs["same"]}) is None
    assert seed_agreement({0: runs["same"], 1: SimpleNamespace(has=lambda _: False)}) is None  # not a merge run
