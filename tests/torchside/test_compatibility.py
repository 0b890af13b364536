"""The lineage check (mmexport.torchside.compatibility) tells the user which case they are in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from mmexport.torchside.align import align_weights, permutation_spec, permute_state
from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.compatibility import (
    SHARED_ANCESTOR_MIN,
    UNRELATED_MAX,
    check_lineage,
)


def _init(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    backbone = get_backbone("resnet18")
    return {k: v for k, v in backbone.build(num_classes=3).state_dict().items() if not backbone.is_head_key(k)}


def _fine_tuned(ancestor: dict[str, torch.Tensor], seed: int, drift: float) -> dict[str, torch.Tensor]:
    """The ancestor moved by a random step of relative size ``drift`` per tensor (what fine-tuning does, roughly)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in ancestor.items():
        if value.is_floating_point() and value.dim() >= 2:
            step = torch.randn(value.shape, generator=generator)
            value = value + drift * step * value.norm() / step.norm()
        out[name] = value
    return out


def test_two_fine_tunes_of_one_ancestor_are_recognised():
    ancestor = _init(0)
    check = check_lineage(_fine_tuned(ancestor, 1, 0.5), _fine_tuned(ancestor, 2, 0.5))
    assert check.lineage == "shared-ancestor" and check.median >= SHARED_ANCESTOR_MIN
    assert "share an ancestor" in check.verdict() and "warning" not in check.verdict()
    record = check.to_record()
    assert record["lineage"] == "shared-ancestor" and record["kernels"] == len(check.cosines) == 20  # conv1, 16 block convs, 3 shortcuts; the head is dropped
    assert not any(name.endswith(("bias", "running_mean")) for name in check.cosines)


def test_unrelated_initialisations_are_warned_about():
    check = check_lineage(_init(1), _init(2))
    assert check.lineage == "unrelated" and abs(check.median) < UNRELATED_MAX
    assert check.verdict().startswith("warning: the sources share no ancestor") and "--align weights" in check.verdict()


def test_a_shuffled_copy_reads_unrelated_until_aligned():
    """The same network with its channels shuffled: unrelated by the weights as stored, identical once aligned."""
    a = _init(3)
    rng = np.random.default_rng(0)
    spec = permutation_spec("resnet18")
    shuffled = permute_state(a, spec, {p: rng.permutation(n) for p, n in spec.sizes.items()})
    assert check_lineage(a, shuffled).lineage == "unrelated"
    aligned = align_weights("resnet18", a, shuffled).state
    after = check_lineage(a, aligned, aligned=True)
    assert after.lineage == "shared-ancestor" and abs(after.median - 1.0) < 1e-9


def test_a_merge_records_the_check_aligns_b_and_inspect_shows_it(tmp_path):
    """train --align weights: the check before stage 1 lands in the manifest and inspect, and the aligned B is
    merged and folded like any source (training's own fold check passes)."""
    from mmexport.config import TrainConfig
    from mmexport.runs.inspect import inspect_run
    from mmexport.torchside.train import train

    run = train(TrainConfig(arch="resnet18", source_a="scratch", source_b="scratch", out=str(tmp_path / "run"),
                            data="synthetic:target?n_train=16&n_val=8&n_test=8", merge_epochs=1, finetune_epochs=0,
                            batch_size=8, device="cpu", verify_samples=4, image_size=32, align="weights"))
    record = json.loads((run / "manifest.json").read_text())["training"]["compatibility"]
    assert record["lineage"]["lineage"] == "unrelated" and record["lineage"]["aligned"] is False
    alignment = record["alignment"]
    assert alignment["moved_channels"] > 0 and alignment["weight_cosine_after"] > alignment["weight_cosine_before"]
    assert alignment["lineage_after"]["aligned"] is True and len(alignment["permutations_sha256"]) == 64
    # the check's other half: each source's head-only probe, run before stage 1 trains
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["training"]["diagnostics"]["source_probes"]) == {"A", "B"}
    lines = inspect_run(run).training.sources_check
    assert lines[0].startswith("warning: the sources share no ancestor") and "after alignment" in lines[0]
    assert lines[1].startswith("source B aligned to A by weight matching") and len(lines) == 2


@pytest.mark.parametrize("mode,method,arch,lineage,expected", [
    ("auto", "medmerge", "resnet18", "unrelated", (True, None)),
    ("auto", "medmerge", "resnet50", "unclear", (True, None)),
    ("auto", "medmerge", "resnet18", "shared-ancestor", (False, "share an ancestor")),
    ("auto", "average", "resnet18", "unrelated", (False, "--method average merges the sources as stored")),
    ("auto", "medmerge", "densenet121", "unrelated", (False, "densenet121 cannot be aligned")),
    ("weights", "average", "resnet18", "shared-ancestor", (True, None)),
    ("none", "medmerge", "resnet18", "unrelated", (False, None)),
])
def test_auto_aligns_medmerge_only_where_no_ancestor_is_shared(mode, method, arch, lineage, expected):
    from mmexport.torchside.compatibility import alignment_decision

    apply, reason = alignment_decision(mode, method, arch, lineage)
    assert apply is expected[0]
    assert (reason is None) if expected[1] is None else (expected[1] in reason and "\n" not in reason)


def test_auto_aligns_an_unrelated_pair_and_leaves_a_related_one_as_stored():
    from mmexport.runs.model_card import sources_check_lines
    from mmexport.torchside.compatibility import prepare_sources

    a, b = _init(0), _init(1)
    aligned, record = prepare_sources("resnet18", a, b, align="auto")
    assert record["alignment"]["mode"] == "auto" and record["alignment"]["applied"] is True
    assert record["alignment"]["moved_channels"] > 0 and any(not torch.equal(aligned[k], b[k]) for k in b)
    kept, record = prepare_sources("resnet18", a, a, align="auto")
    assert record["alignment"] == {"mode": "auto", "applied": False,
                                   "reason": "the sources share an ancestor, so their channels are already in one order"}
    assert all(kept[k] is a[k] for k in a)  # B as stored: not even copied
    assert sources_check_lines(record)[1] == ("source B not aligned (--align auto): the sources share an ancestor, "
                                              "so their channels are already in one order")
    _, record = prepare_sources("resnet18", a, b, align="none")
    assert "alignment" not in record and "--align weights" in record["verdict"]


def test_densenet_under_auto_is_merged_unaligned_and_not_told_to_align():
    from mmexport.torchside.compatibility import prepare_sources

    def densenet(seed):
        torch.manual_seed(seed)
        return {k: v for k, v in torchvision.models.densenet121(num_classes=2).state_dict().items()
                if not k.startswith("classifier.")}

    a, b = densenet(0), densenet(1)
    kept, record = prepare_sources("densenet121", a, b, align="auto")
    assert record["lineage"]["lineage"] == "unrelated" and record["alignment"]["applied"] is False
    assert "densenet121 cannot be aligned" in record["alignment"]["reason"]
    assert "--align weights" not in record["verdict"] and all(kept[k] is b[k] for k in b)
