"""Baselines, resume, class balancing, early stopping and torchrun for mmexport.torchside.train."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmexport.errors import MMExportError, RunDirError
from mmexport.fileio import sha256_file
from mmexport.torchside.modelfile import load_model
from mmexport.torchside.train import DistContext, LoopOptions, _lr_lambda, batches, epoch_indices, train
from tests.conftest import same_file_but_the_run
from tests.torchside.test_train import config


@pytest.mark.parametrize("method", ["average", "finetune-a", "lpft-b"])
def test_every_method_publishes_a_plain_network(resnet18_sources, tmp_path, method):
    run = train(config(resnet18_sources, tmp_path / "run", method=method))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["training"]["method"] == method
    model, info = load_model(run / "model.safetensors")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, len(info.classes))
    stages = manifest["training"]["stages"]
    if method == "finetune-a":
        # equal budget: stage 1's epochs are spent fine-tuning
        assert list(stages) == ["finetune"] and len(stages["finetune"]["history"]) == 2
        assert set(manifest["inputs"]) == {"source_a", "data"}
    elif method == "lpft-b":
        assert list(stages) == ["probe", "finetune"] and "unmerged.safetensors" not in manifest["outputs"]
        assert set(manifest["inputs"]) == {"source_b", "data"}
    else:
        assert list(stages) == ["probe", "finetune"] and "folded.safetensors" in manifest["outputs"]


def test_average_keeps_sigma_at_one_half(resnet18_sources, tmp_path):
    from mmexport.torchside.modelfile import load_unmerged

    run = train(config(resnet18_sources, tmp_path / "run", method="average", finetune_epochs=0))
    merged, _ = load_unmerged(run / "unmerged.safetensors")
    assert all(float(logit.detach().abs().max()) == 0.0 for logit in merged.logits.values())


def test_linear_probe_leaves_the_backbone_untouched(resnet18_sources, tmp_path):
    from mmexport.torchside.checkpoints import load_source

    run = train(config(resnet18_sources, tmp_path / "run", method="lpft-a", finetune_epochs=0))
    model, _ = load_model(run / "model.safetensors")
    source = load_source(str(resnet18_sources[0]), "resnet18").state_dict
    assert torch.equal(model.conv1.weight, source["conv1.weight"])
    assert torch.equal(model.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])


def _interrupt_after(stage, epoch):
    def hook(current_stage, current_epoch):
        if (current_stage, current_epoch) == (stage, epoch):
            raise KeyboardInterrupt

    return hook


@pytest.mark.parametrize("stop_at", [("merge", 1), ("finetune", 1)])
def test_killed_then_resumed_run_matches_uninterrupted(resnet18_sources, tmp_path, stop_at):
    overrides = dict(merge_epochs=2, finetune_epochs=2)
    reference = train(config(resnet18_sources, tmp_path / "ref", **overrides))
    target = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(resnet18_sources, target, **overrides), after_epoch=_interrupt_after(*stop_at))
    assert not target.exists() and (tmp_path / ".run.partial").is_dir()
    with pytest.raises(RunDirError, match="--resume"):
        train(config(resnet18_sources, target, **overrides))
    resumed = train(config(resnet18_sources, target, resume=True, **overrides))
    for name in ("unmerged.safetensors", "folded.safetensors"):
        assert sha256_file(resumed / name) == sha256_file(reference / name), name
    same_file_but_the_run(resumed / "model.safetensors", reference / "model.safetensors")
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["resumed"] and not list(resumed.glob("*.resume"))
    ref_history = json.loads((reference / "manifest.json").read_text())["training"]["stages"]
    assert manifest["training"]["stages"] == ref_history


def test_resume_with_a_different_config_is_refused(resnet18_sources, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(config(resnet18_sources, tmp_path / "run", merge_epochs=2), after_epoch=_interrupt_after("merge", 1))
    with pytest.raises(RunDirError, match=r"different config: lr_logits"):
        train(config(resnet18_sources, tmp_path / "run", merge_epochs=2, lr_logits=0.5, resume=True))
    with pytest.raises(RunDirError, match="no interrupted run"):
        train(config(resnet18_sources, tmp_path / "other", resume=True))


def test_early_stopping_stops_a_stage(resnet18_sources, tmp_path, monkeypatch):
    # Val macro-F1 that never improves after epoch 1 (BN statistics keep moving even at a
    # zero learning rate, so a real model cannot be relied on to plateau).
    import mmexport.torchside.train as train_module

    real_evaluate = train_module.evaluate
    scores = iter([0.5, 0.4, 0.45, 0.3, 0.2, 0.1])

    def plateau(model, loader, num_classes, device):
        metrics = real_evaluate(model, loader, num_classes, device)
        return {**metrics, "macro_f1": next(scores, 0.0)}

    monkeypatch.setattr(train_module, "evaluate", plateau)
    run = train(config(resnet18_sources, tmp_path / "run", merge_epochs=5, finetune_epochs=0, patience=2))
    stage = json.loads((run / "manifest.json").read_text())["training"]["stages"]["merge"]
    assert stage["stopped_early_at"] == 3 and len(stage["history"]) == 3 and stage["best_epoch"] == 1


def test_balanced_sampler_draws_classes_evenly():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    options = LoopOptions(batch_size=8, seed=3, sampler="balanced")
    drawn = np.concatenate([labels[epoch_indices(labels, options, "merge", e, DistContext())] for e in range(1, 31)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.all(np.abs(shares - 1 / 3) < 0.05), shares


def test_distributed_shards_partition_each_epoch():
    labels = np.arange(10) % 3
    options = LoopOptions(batch_size=8, seed=1)
    shards = [epoch_indices(labels, options, "merge", 4, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # 10 samples padded to 12
    assert set().union(*shards) == set(range(10))
    assert epoch_indices(labels, options, "merge", 4, DistContext()) != epoch_indices(labels, options, "merge", 5, DistContext())


def test_a_final_batch_of_one_joins_the_previous_batch():
    assert batches(list(range(17)), 8) == [list(range(8)), list(range(8, 17))]
    assert batches(list(range(16)), 8) == [list(range(8)), list(range(8, 16))]
    assert batches(list(range(3)), 8) == [[0, 1, 2]]  # fewer images than a batch: one smaller batch
    assert batches(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    # every DDP shard of an epoch gets the same batches: 17 images on 2 ranks = 9 each = 8 + 1 -> one batch of 9
    labels = np.arange(17) % 3
    for rank in range(2):
        shard = epoch_indices(labels, LoopOptions(batch_size=8, seed=0), "merge", 1, DistContext(rank=rank, world_size=2))
        assert [len(b) for b in batches(shard, 8)] == [9]


def test_warmup_then_cosine_schedule():
    factor = _lr_lambda(total_steps=10, warmup_steps=2, schedule="cosine")
    values = [factor(step) for step in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[2] == 1.0
    assert all(a >= b for a, b in zip(values[2:], values[3:])) and values[-1] < 0.1
    assert _lr_lambda(10, 0, "constant")(7) == 1.0


def test_class_weighted_loss_is_recorded_and_runs(resnet18_sources, tmp_path):
    run = train(config(resnet18_sources, tmp_path / "run", class_weights="balanced", sampler="balanced",
                       finetune_epochs=0))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["class_weights"] == "balanced" and manifest["config"]["sampler"] == "balanced"


def test_force_and_resume_together_are_refused(resnet18_sources, tmp_path):
    with pytest.raises(MMExportError, match="contradict"):
        train(config(resnet18_sources, tmp_path / "run", force=True, resume=True))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_gloo(resnet18_sources, tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k != "MMEXPORT_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "--master_addr=127.0.0.1", "-m", "mmexport", "train", "--arch", "resnet18",
        "--source-a", str(resnet18_sources[0]), "--source-b", str(resnet18_sources[1]),
        # 18 images on 2 ranks = 9 each = a batch of 8 and a batch of ONE, which at 32 px BatchNorm cannot train on
        "--data", "synthetic:target?n_train=18&n_val=16&n_test=16", "--image-size", "32", "--merge-epochs", "1",
        "--finetune-epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2
    assert manifest["verification"][0]["passed"]
    # rank 1 wrote nothing of its own (rank 0's run lock lives beside the run)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["ddp"]
    steps = len(manifest["training"]["stages"]["merge"]["history"])
    assert steps == 1


def test_logit_lr_probe_is_the_fixed_rate_run_of_the_rate_it_chooses(resnet18_sources, tmp_path):
    overrides = dict(merge_epochs=3, finetune_epochs=1)
    probed = train(config(resnet18_sources, tmp_path / "probe", lr_logits_probe=(0.02, 2.0), lr_probe_epochs=1, **overrides))
    probe = json.loads((probed / "manifest.json").read_text())["training"]["lr_probe"]
    assert probe["candidates"] == [0.02, 2.0] and probe["epochs"] == 1 and probe["extra_epochs"] == 1
    best = max(range(2), key=lambda i: (probe["val_macro_f1"][i], -probe["candidates"][i]))
    assert probe["chosen"] == probe["candidates"][best]
    fixed = train(config(resnet18_sources, tmp_path / "fixed", lr_logits=probe["chosen"], **overrides))
    assert sha256_file(probed / "unmerged.safetensors") == sha256_file(fixed / "unmerged.safetensors")
    same_file_but_the_run(probed / "model.safetensors", fixed / "model.safetensors")
    stages = lambda run: json.loads((run / "manifest.json").read_text())["training"]["stages"]  # noqa: E731
    assert stages(probed) == stages(fixed)


def test_resume_after_the_probe_keeps_the_chosen_rate(resnet18_sources, tmp_path):
    overrides = dict(merge_epochs=3, finetune_epochs=1, lr_logits_probe=(0.02, 2.0), lr_probe_epochs=1)
    reference = train(config(resnet18_sources, tmp_path / "ref", **overrides))
    with pytest.raises(KeyboardInterrupt):
        train(config(resnet18_sources, tmp_path / "run", **overrides), after_epoch=_interrupt_after("merge", 2))
    resumed = train(config(resnet18_sources, tmp_path / "run", resume=True, **overrides))
    same_file_but_the_run(resumed / "model.safetensors", reference / "model.safetensors")


def test_resume_refuses_when_a_source_file_changed(resnet18_sources, tmp_path):
    from mmexport.torchside.checkpoints import save_state_dict
    from tests.conftest import backbone_state, one_line

    source_a = tmp_path / "a.safetensors"
    save_state_dict(source_a, backbone_state("resnet18", 11))
    sources = (source_a, resnet18_sources[1])
    with pytest.raises(KeyboardInterrupt):
        train(config(sources, tmp_path / "run", merge_epochs=2), after_epoch=_interrupt_after("merge", 1))
    save_state_dict(source_a, backbone_state("resnet18", 12))  # same path, new weights
    with pytest.raises(RunDirError) as info:
        train(config(sources, tmp_path / "run", merge_epochs=2, resume=True))
    message = one_line(info)
    assert "inputs changed" in message and "source A sha256" in message and "--force" in message
    assert (tmp_path / ".run.partial").is_dir()  # the interrupted run is kept, not half-resumed


def test_resume_refuses_when_the_data_changed(resnet18_sources, tmp_path):
    from tests.conftest import one_line

    def write(path, n_train):
        rng = np.random.default_rng(n_train)
        arrays = {}
        for split, n in (("train", n_train), ("val", 8)):
            arrays[f"{split}_images"] = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
            arrays[f"{split}_labels"] = np.arange(n) % 3
        np.savez(path, **arrays)

    data = tmp_path / "data.npz"
    write(data, 12)
    with pytest.raises(KeyboardInterrupt):
        train(config(resnet18_sources, tmp_path / "run", data=str(data), merge_epochs=2),
              after_epoch=_interrupt_after("merge", 1))
    write(data, 15)
    with pytest.raises(RunDirError) as info:
        train(config(resnet18_sources, tmp_path / "run", data=str(data), merge_epochs=2, resume=True))
    assert "inputs changed" in one_line(info) and "data (" in one_line(info) and "counts" in one_line(info)
