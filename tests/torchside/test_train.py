"""Training a merged run (mmexport.torchside.train): a complete traceable run, determinism, refusals, nothing half-published."""

import json

import pytest
import torch

from mmexport.errors import MMExportError, VerificationError
from mmexport.fileio import sha256_file
from mmexport.torchside.modelfile import load_model, load_unmerged
from mmexport.config import TrainConfig
from mmexport.torchside.train import train
from tests.conftest import TINY_TARGET, one_line, same_file_but_the_run


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
                                        "coefficients.png", "model_card.md"}
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
    assert sha256_file(first / "unmerged.safetensors") == sha256_file(second / "unmerged.safetensors")
    same_file_but_the_run(first / "model.safetensors", second / "model.safetensors")  # each names its own run


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
        ({"seed": 2**32}, r"--seed must be an integer from 0 to 4294967295"),
        ({"seed": -1}, r"--seed must be an integer from 0"),
        ({"batch_size": 0}, "--batch-size must be an integer from 1"),
        ({"num_workers": -1}, "--workers must be an integer from 0"),
        ({"augmentation": "flips"}, "unknown --augmentation 'flips'"),
        ({"sigma_bound": 0.5}, "--sigma-bound"),
        ({"lr_logits_probe": (0.1, float("nan"))}, "must be a finite number"),
        ({"lr_logits_probe": (0.1, 0.1)}, "--lr-logits-probe"),
        ({"lr_logits_probe": (0.1, 0.3), "lr_probe_epochs": 2}, "--lr-probe-epochs"),
        ({"source_b": ""}, "--source-b is required"),
        ({"align": "activations"}, "unknown --align 'activations'"),
        ({"method": "finetune-a", "align": "weights"}, "--align weights aligns source B to source A before a merge"),
        ({"intended_use": "two\nlines"}, "--intended-use must be one printable line"),
        ({"intended_use": "x" * 501}, "--intended-use must be one printable line"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(resnet18_sources, tmp_path, overrides, message):
    with pytest.raises(MMExportError, match=message) as info:
        train(config(resnet18_sources, tmp_path / "run", **overrides))
    one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_failed_fold_verification_publishes_nothing(resnet18_sources, tmp_path, monkeypatch):
    import mmexport.torchside.train as train_module
    from mmexport.torchside import fold as fold_module
    def corrupt_fold(merged):
        model = fold_module.fold(merged)
        with torch.no_grad():
            model.conv1.weight.mul_(1.01)
        return model

    monkeypatch.setattr(train_module, "fold", corrupt_fold)
    with pytest.raises(VerificationError, match="fold verification failed"):
        train(config(resnet18_sources, tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []


class RecordingProgress:
    def __init__(self):
        self.messages, self.epochs = [], []

    def start(self, description, total): ...
    def advance(self, steps=1): ...
    def finish(self): ...

    def epoch(self, record):
        self.epochs.append(record)

    def message(self, text):
        self.messages.append(text)


@pytest.mark.parametrize("method", ["medmerge", "average", "finetune-a", "lpft-b"])
def test_a_last_batch_of_one_image_trains_for_every_method(resnet18_sources, tmp_path, method):
    # 9 images in batches of 8 leave a batch of ONE: at 32 px resnet18's last feature map is 1x1,
    # so BatchNorm in training mode (stage 1, stage 2 and BN re-estimation) would see one value per channel.
    progress = RecordingProgress()
    run = train(config(resnet18_sources, tmp_path / "run", method=method, data="synthetic:target?n_train=9&n_val=8&n_test=8"),
                progress)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["training"]["method"] == method and "test" in manifest["training"]["final"]
    first_epoch = next(i for i, m in enumerate(progress.messages) if m.startswith("data:"))
    assert "train 9, val 8, test 8" in progress.messages[first_epoch]
    assert "augmentation: light" in progress.messages[first_epoch] and "32 px" in progress.messages[first_epoch]
    assert len(progress.epochs) == 2


def test_fewer_images_than_one_batch_train_and_one_image_is_refused(resnet18_sources, tmp_path):
    run = train(config(resnet18_sources, tmp_path / "run", data="synthetic:target?n_train=3&n_val=4&n_test=0"))
    assert json.loads((run / "manifest.json").read_text())["training"]["final"]["val"]
    with pytest.raises(MMExportError) as info:
        train(config(resnet18_sources, tmp_path / "one", data="synthetic:target?n_train=1&n_val=4&n_test=0"))
    assert "BatchNorm needs at least 2" in one_line(info)
    assert not (tmp_path / "one").exists() and not (tmp_path / ".one.partial").exists()


def test_manifest_records_augmentation_probes_and_saturation(resnet18_sources, tmp_path):
    run = train(config(resnet18_sources, tmp_path / "deep" / "er" / "run", augmentation="none"))  # parents are created
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["augmentation"] == "none"
    diagnostics = manifest["training"]["diagnostics"]
    assert set(diagnostics["source_probes"]) == {"A", "B"}
    for probe in diagnostics["source_probes"].values():
        assert 0.0 <= probe["val_macro_f1"] <= 1.0 and probe["seconds"] >= 0 and probe["train_images"] == 24
    assert diagnostics["stage1_val_macro_f1"] == manifest["training"]["stages"]["merge"]["best_metrics"]["macro_f1"]
    below = [label for label, p in diagnostics["source_probes"].items()
             if p["val_macro_f1"] > diagnostics["stage1_val_macro_f1"]]
    assert diagnostics["stage1_below_probe"] == sorted(below)
    merged, _ = load_unmerged(run / "unmerged.safetensors")
    sigma = torch.cat([torch.sigmoid(logit.detach()).flatten() for logit in merged.logits.values()])
    assert diagnostics["sigma_saturation"] == pytest.approx(float(((sigma < 0.1) | (sigma > 0.9)).float().mean()))


def test_sigma_bound_keeps_every_coefficient_inside_it(resnet18_sources, tmp_path):
    run = train(config(resnet18_sources, tmp_path / "run", finetune_epochs=0, lr_logits=50.0, sigma_bound=0.2))
    merged, _ = load_unmerged(run / "unmerged.safetensors")
    sigma = torch.cat([torch.sigmoid(logit.detach()).flatten() for logit in merged.logits.values()])
    assert float(sigma.min()) >= 0.2 - 1e-6 and float(sigma.max()) <= 0.8 + 1e-6
    assert float(((sigma < 0.2 + 1e-3) | (sigma > 0.8 - 1e-3)).float().mean()) > 0.5  # lr 50 drives them to the bound


def test_scratch_source_for_single_source_methods_needs_no_source_b(tmp_path):
    run = train(config(("scratch", ""), tmp_path / "run", method="finetune-a", lr_backbone=1e-3))
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"source_a", "data"}
    assert manifest["inputs"]["source_a"]["format"] == "scratch" and manifest["inputs"]["source_a"]["seed"] == 0
    from mmexport.torchside.train import scratch_source

    again = scratch_source("scratch", "resnet18", "A", 0)
    assert again.info["sha256"] == manifest["inputs"]["source_a"]["sha256"]
    assert scratch_source("scratch:5", "resnet18", "A", 0).info["sha256"] != again.info["sha256"]
    with pytest.raises(MMExportError) as info:
        train(config(("scratch", ""), tmp_path / "merge", method="medmerge"))
    assert "--source-b is required for --method medmerge" in one_line(info)


def test_float64_weights_that_overflow_float32_are_refused(resnet18_sources, tmp_path):
    from mmexport.torchside.checkpoints import save_state_dict
    from tests.conftest import backbone_state

    state = {k: v.double() if v.is_floating_point() else v for k, v in backbone_state("resnet18", 5).items()}
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = 1e300  # finite in float64, Inf in float32
    path = tmp_path / "huge.safetensors"
    save_state_dict(path, state)
    with pytest.raises(MMExportError) as info:
        train(config((path, resnet18_sources[1]), tmp_path / "run"))
    message = one_line(info)
    assert "overflow float32" in message and "layer1.0.conv1.weight" in message
    assert not (tmp_path / "run").exists()


def test_a_network_with_infinite_batchnorm_statistics_is_not_published(tmp_path):
    from mmexport.torchside.checkpoints import save_state_dict
    from tests.conftest import backbone_state

    state = backbone_state("resnet18", 6)
    state["conv1.weight"] *= 1e30  # finite weights whose activations' variance overflows float32
    path = tmp_path / "loud.safetensors"
    save_state_dict(path, state)
    with pytest.raises(MMExportError) as info:
        train(config((path, ""), tmp_path / "run", method="lpft-a", finetune_epochs=0))
    message = one_line(info)
    assert "NaN or Inf" in message and "running_var" in message and "nothing was published" in message
    assert not (tmp_path / "run").exists()
