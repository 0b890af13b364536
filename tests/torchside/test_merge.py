"""The merged model (mmexport.torchside.merge): coefficient shapes, the sigma-weighted blend, trainable parts, BN statistics."""

import math

import pytest
import torch

from mmexport.torchside.backbones import get_backbone
from mmexport.errors import ArchitectureError
from mmexport.torchside.merge import MergedModel, coefficient_shape, reestimate_bn_statistics
from tests.conftest import backbone_state


def backbone_only(arch, seed):
    backbone = get_backbone(arch)
    return {k: v for k, v in backbone_state(arch, seed).items() if not backbone.is_head_key(k)}


@pytest.mark.parametrize(
    "shape,granularity,expected",
    [
        ((64, 3, 7, 7), "kernel", (64, 3, 1, 1)),
        ((64, 3, 7, 7), "filter", (64, 1, 1, 1)),
        ((64, 3, 7, 7), "layer", ()),
        ((64,), "kernel", (64,)),
        ((64,), "filter", (64,)),
        ((64,), "layer", ()),
        ((10, 20), "kernel", (10, 1)),
        ((10, 20), "filter", (10, 1)),
    ],
)
def test_coefficient_shape_follows_design(shape, granularity, expected):
    assert coefficient_shape(shape, granularity) == expected


def test_unknown_granularity_is_refused():
    with pytest.raises(ArchitectureError, match="granularity"):
        coefficient_shape((3, 3), "channel")


def test_blend_is_sigma_weighted_sum_of_sources():
    a, b = backbone_only("resnet18", 1), backbone_only("resnet18", 2)
    model = MergedModel("resnet18", [a, b], 3)
    with torch.no_grad():
        model.logit("conv1.weight").fill_(1.5)
    sigma = 1 / (1 + math.exp(-1.5))
    expected = sigma * a["conv1.weight"] + (1 - sigma) * b["conv1.weight"]
    torch.testing.assert_close(model.blend("conv1.weight"), expected, rtol=1e-6, atol=1e-7)
    # λ = 0 start: plain average
    torch.testing.assert_close(model.blend("layer1.0.bn1.bias"), (a["layer1.0.bn1.bias"] + b["layer1.0.bn1.bias"]) / 2)


def test_kernel_level_coefficients_act_per_kernel():
    a, b = backbone_only("resnet18", 1), backbone_only("resnet18", 2)
    model = MergedModel("resnet18", [a, b], 3)
    with torch.no_grad():
        model.logit("conv1.weight")[5, 1] = 50.0  # σ≈1: kernel (5, 1) comes from A only
        model.logit("conv1.weight")[6, 2] = -50.0  # σ≈0: kernel (6, 2) from B only
    blended = model.blend("conv1.weight")
    torch.testing.assert_close(blended[5, 1], a["conv1.weight"][5, 1])
    torch.testing.assert_close(blended[6, 2], b["conv1.weight"][6, 2])
    torch.testing.assert_close(blended[5, 0], (a["conv1.weight"][5, 0] + b["conv1.weight"][5, 0]) / 2)


def test_only_logits_and_head_are_trainable_and_get_gradients():
    model = MergedModel("resnet18", [backbone_only("resnet18", 1), backbone_only("resnet18", 2)], 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"logits.{k}" for k in model.logits} | {"template.fc.weight", "template.fc.bias"}
    model.train()
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert model.logit("layer4.1.conv2.weight").grad.abs().sum() > 0
    assert model.logit("conv1.weight").grad.abs().sum() > 0
    assert all(b.grad is None for b in model.sources.parameters())  # sources are buffers
    sources_before = model.sources[0].get("conv1.weight").clone()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(model.sources[0].get("conv1.weight"), sources_before)


def test_bn_running_stats_start_as_blend():
    a, b = backbone_only("resnet18", 1), backbone_only("resnet18", 2)
    model = MergedModel("resnet18", [a, b], 3)
    torch.testing.assert_close(model.template.bn1.running_mean, (a["bn1.running_mean"] + b["bn1.running_mean"]) / 2)
    torch.testing.assert_close(model.template.layer2[0].bn2.running_var, (a["layer2.0.bn2.running_var"] + b["layer2.0.bn2.running_var"]) / 2)


def test_reestimated_bn_statistics_are_exact_batch_means():
    model = MergedModel("resnet18", [backbone_only("resnet18", 1), backbone_only("resnet18", 2)], 3).eval()
    images = torch.randn(12, 3, 32, 32)
    seen = reestimate_bn_statistics(model, [(images[:6], None), (images[6:], None)])
    assert seen == 12
    # the first BN sees conv1's output: its running mean is the per-channel mean over both batches
    with torch.no_grad():
        conv_out = torch.nn.functional.conv2d(images, model.blend("conv1.weight"), stride=2, padding=3)
    torch.testing.assert_close(model.template.bn1.running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.template.bn1.momentum == 0.1  # restored
    assert not model.training and not model.template.bn1.training  # mode restored


def test_three_sources_use_softmax():
    sources = [backbone_only("resnet18", s) for s in (1, 2, 3)]
    model = MergedModel("resnet18", sources, 3)
    assert model.logit("conv1.weight").shape == (3, 64, 3, 1, 1)
    torch.testing.assert_close(model.blend("bn1.weight"), sum(s["bn1.weight"] for s in sources) / 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_mismatched_source_shape_is_named():
    a, b = backbone_only("resnet18", 1), backbone_only("resnet18", 2)
    b["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ArchitectureError, match=r"layer1\.0\.conv1\.weight"):
        MergedModel("resnet18", [a, b], 3)


def test_unmerged_state_dict_round_trip_is_exact():
    model = MergedModel("resnet18", [backbone_only("resnet18", 1), backbone_only("resnet18", 2)], 3)
    with torch.no_grad():
        for logit in model.logits.values():
            logit.normal_()
    model.eval()
    rebuilt = MergedModel.from_unmerged_state_dict(model.unmerged_state_dict(), model.unmerged_metadata()).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
