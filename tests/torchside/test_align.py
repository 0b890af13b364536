"""Weight-matching alignment (mmexport.torchside.align): exact, structure-respecting, and it finds a hidden permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmexport.errors import ArchitectureError
from mmexport.torchside.align import (
    align_weights,
    check_lossless,
    permutation_spec,
    permute_state,
)
from mmexport.torchside.backbones import get_backbone


def _random_network(arch: str, seed: int, *, head: bool = False) -> dict[str, torch.Tensor]:
    """A network with random weights AND random BatchNorm affine/statistics (a fresh BN is the identity,
    which would hide a statistic left in the wrong channel)."""
    torch.manual_seed(seed)
    backbone = get_backbone(arch)
    model = backbone.build(num_classes=5)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.3)
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return {k: v for k, v in model.state_dict().items() if head or not backbone.is_head_key(k)}


def _random_perms(arch: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.permutation(size) for name, size in permutation_spec(arch).sizes.items()}


def _logits(arch: str, state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    model = get_backbone(arch).build(num_classes=5)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(images)


@settings(max_examples=5, deadline=None)
@given(net_seed=st.integers(0, 2**16), perm_seed=st.integers(0, 2**16))
def test_a_permuted_network_computes_exactly_what_it_computed(net_seed, perm_seed):
    """With the head kept, permuting every hidden channel leaves the logits unchanged (float summation order only)."""
    state = _random_network("resnet18", net_seed, head=True)
    spec = permutation_spec("resnet18", include_head=True)
    perms = _random_perms("resnet18", perm_seed)
    permuted = permute_state(state, spec, perms)
    assert any(not torch.equal(state[k], permuted[k]) for k in state)  # it really moved channels
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(perm_seed))
    before, after = _logits("resnet18", state, images), _logits("resnet18", permuted, images)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5 * float(before.abs().max())), (before - after).abs().max()


def test_a_wrong_permutation_is_caught():
    """The exactness check can fail: one residual-stream tensor left in the old order changes the output."""
    state = _random_network("resnet18", 1, head=True)
    spec = permutation_spec("resnet18", include_head=True)
    perms = _random_perms("resnet18", 2)
    permuted = permute_state(state, spec, perms)
    permuted["layer1.0.bn2.running_mean"] = state["layer1.0.bn2.running_mean"]  # a statistic that did not move
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(_logits("resnet18", state, images), _logits("resnet18", permuted, images), atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_weight_matching_undoes_a_hidden_permutation(arch):
    """B = A with every hidden channel shuffled: matching finds the shuffle, aligned B equals A bit for bit."""
    a = _random_network(arch, 3)
    b = permute_state(a, permutation_spec(arch), _random_perms(arch, 4))
    result = align_weights(arch, a, b, seed=0)
    assert result.cosine_before < 0.5 and result.cosine_after == pytest.approx(1.0, abs=1e-9)
    assert all(torch.equal(result.state[k], a[k]) for k in a)
    assert result.moved_channels > 0.9 * result.total_channels


def test_alignment_of_unrelated_networks_is_lossless_and_raises_similarity():
    a, b = _random_network("resnet18", 5), _random_network("resnet18", 6)
    result = align_weights("resnet18", a, b, seed=0)
    assert result.cosine_after > result.cosine_before
    assert result.history == sorted(result.history)  # coordinate ascent never goes down
    images = torch.randn(2, 3, 32, 32)
    assert check_lossless("resnet18", b, result.state, result.permutations, images) < 1e-4 * 100
    assert set(result.state) == set(b) and all(result.state[k].shape == b[k].shape for k in b)


def test_residual_streams_share_one_permutation():
    spec = permutation_spec("resnet18")
    # conv1/bn1 and the output of every layer1 block add into one stream
    assert spec.axes["conv1.weight"][0] == spec.axes["layer1.0.conv2.weight"][0] == spec.axes["layer1.1.conv2.weight"][0]
    assert spec.axes["layer1.1.conv1.weight"][1] == spec.axes["bn1.running_var"][0]
    # a downsampling block opens a new stream that its shortcut and its last conv both write
    assert spec.axes["layer2.0.downsample.0.weight"][0] == spec.axes["layer2.0.conv2.weight"][0] \
        == spec.axes["layer2.1.conv2.weight"][0] != spec.axes["conv1.weight"][0]
    assert spec.axes["layer2.0.downsample.0.weight"][1] == spec.axes["conv1.weight"][0]
    # BatchNorm parameters and statistics move with their conv's output channels
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert spec.axes[f"layer3.1.bn1.{key}"] == (spec.axes["layer3.1.conv1.weight"][0],)


def test_densenet_is_refused_in_one_line():
    with pytest.raises(ArchitectureError) as caught:
        permutation_spec("densenet121")
    assert "densenet121" in str(caught.value) and "\n" not in str(caught.value)
