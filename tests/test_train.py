import json

import pytest
import torch

from mmexport.errors import MMExportError, VerificationError
from mmexport.fileio import sha256_file
from mmexport.modelfile import load_model, load_unmerged
from mmexport.config import TrainConfig
from mmexport.train import train
from tests.conftest import TINY_TARGET


def config(sources, out, **overrides):
    values = dict(
        arch="resnet18", source_a=str(sources[0]), source_b=str(sources[1]), data=TINY_TARGET, out=str(out),
        merge_epochs=1, finetune_epochs=1, batch_size=8, image_size=32, device="cpu", verify_samples=8,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_train_writes_a_complete_traceable_run(resnet18_sources, tmp_path):
    run = train(config(resnet18_sources, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"unmerged.safetensors", "folded.safetensors", "model.safetensors", "reference.npz",
                                        "coefficients.png"}
    for name, entry in manifest["outputs"].items():
        assert entry["sha256"] == sha256_file(run / name)
    assert manifest["inputs"]["source_a"]["sha256"] == sha256_file(resnet18_sources[0])
    assert manifest["inputs"]["data"]["classes"] == manifest["model"]["classes"]
    assert manifest["verification"][0]["passed"] and manifest["verification"][0]["tolerance"]["name"] == "fold"
    stages = manifest["training"]["stages"]
    history = stages["merge"]["history"] + stages["finetune"]["history"]
    assert [h["stage"] for h in history] == ["merge", "finetune"]
    assert {"val", "test"} <= set(manifest["training"]["final"])
    model, info = load_model(run / "model.safetensors")
    assert info.image_size == 32 and len(info.classes) == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_unmerged_checkpoint_folds_to_the_published_fold(resnet18_sources, tmp_path):
    run = train(config(resnet18_sources, tmp_path / "run", finetune_epochs=0))
    merged, _ = load_unmerged(run / "unmerged.safetensors")
    folded, _ = load_model(run / "folded.safetensors")
    final, _ = load_model(run / "model.safetensors")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(merged(images), folded(images))
        assert torch.equal(folded(images), final(images))  # no stage 2: the final model is the fold


def test_same_seed_same_weights(resnet18_sources, tmp_path):
    first = train(config(resnet18_sources, tmp_path / "a"))
    second = train(config(resnet18_sources, tmp_path / "b"))
    for name in ("unmerged.safetensors", "model.safetensors"):
        assert sha256_file(first / name) == sha256_file(second / name)


def test_bn_reestimation_changes_the_starting_statistics(resnet18_sources, tmp_path):
    blend = train(config(resnet18_sources, tmp_path / "blend", finetune_epochs=0, bn_init="blend"))
    reest = train(config(resnet18_sources, tmp_path / "reest", finetune_epochs=0, bn_init="reestimate"))
    a, _ = load_unmerged(blend / "unmerged.safetensors")
    b, _ = load_unmerged(reest / "unmerged.safetensors")
    assert not torch.allclose(a.template.bn1.running_mean, b.template.bn1.running_mean)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"granularity": "pixel"}, "granularity"),
        ({"bn_init": "zero"}, "bn-init"),
        ({"merge_epochs": 0}, "merge-epochs"),
        ({"lr_logits": 0.0}, "lr-logits"),
        ({"arch": "vgg16"}, "unknown architecture"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(resnet18_sources, tmp_path, overrides, message):
    with pytest.raises(MMExportError, match=message):
        train(config(resnet18_sources, tmp_path / "run", **overrides))
    assert list(tmp_path.iterdir()) == []


def test_failed_fold_verification_publishes_nothing(resnet18_sources, tmp_path, monkeypatch):
    import mmexport.train as train_module
    from mmexport import fold as fold_module

    def corrupt_fold(merged):
        model = fold_module.fold(merged)
        with torch.no_grad():
            model.conv1.weight.mul_(1.01)
        return model

    monkeypatch.setattr(train_module, "fold", corrupt_fold)
    with pytest.raises(VerificationError, match="fold verification failed"):
        train(config(resnet18_sources, tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []
