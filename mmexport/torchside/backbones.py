"""Registry of supported architectures.

Each entry names the stock torchvision builder, the attribute holding the
classifier head, and the torchvision weights enum, so that a folded network is
loadable with nothing but ``torchvision.models.<builder>(num_classes=K)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models

from mmexport.errors import ArchitectureError


@dataclass(frozen=True)
class Backbone:
    name: str
    builder: Callable[..., nn.Module]
    head: str  # attribute of the model that is the final nn.Linear
    weights_enum: str  # torchvision weights enum class name, e.g. "ResNet18_Weights"

    @property
    def head_prefix(self) -> str:
        return self.head + "."

    def build(self, num_classes: int) -> nn.Module:
        """The stock torchvision network with a fresh ``num_classes`` head, no weights loaded."""
        if num_classes < 2:
            raise ArchitectureError(f"{self.name}: need at least 2 classes, got {num_classes}")
        return self.builder(weights=None, num_classes=num_classes)

    def is_head_key(self, key: str) -> bool:
        return key.startswith(self.head_prefix)


def _entry(name: str, builder: Callable[..., nn.Module], head: str, weights_enum: str) -> Backbone:
    return Backbone(name, builder, head, weights_enum)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _entry("resnet18", models.resnet18, "fc", "ResNet18_Weights"),
        _entry("resnet34", models.resnet34, "fc", "ResNet34_Weights"),
        _entry("resnet50", models.resnet50, "fc", "ResNet50_Weights"),
        _entry("resnet101", models.resnet101, "fc", "ResNet101_Weights"),
        _entry("resnet152", models.resnet152, "fc", "ResNet152_Weights"),
        _entry("densenet121", models.densenet121, "classifier", "DenseNet121_Weights"),
        _entry("densenet169", models.densenet169, "classifier", "DenseNet169_Weights"),
        _entry("densenet201", models.densenet201, "classifier", "DenseNet201_Weights"),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        supported = ", ".join(BACKBONES)
        raise ArchitectureError(f"unknown architecture {name!r}; supported: {supported}") from None


def backbone_state_keys(arch: str) -> dict[str, torch.Size]:
    """Expected backbone keys (parameters and buffers, head excluded) with their shapes."""
    backbone = get_backbone(arch)
    with torch.device("meta"):
        model = backbone.build(num_classes=2)
    return {k: v.shape for k, v in model.state_dict().items() if not backbone.is_head_key(k)}
