"""Fold: evaluate the blend once and load it into the stock torchvision network."""

from __future__ import annotations

import torch
from torch import nn

from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.merge import MergedModel


@torch.no_grad()
def folded_state_dict(merged: MergedModel) -> dict[str, torch.Tensor]:
    """The blended backbone plus the template's head and BN buffers, keyed as the stock network."""
    state = {name: tensor.detach().clone() for name, tensor in merged.blended_parameters().items()}
    template_state = merged.template.state_dict()
    for name in merged.head_names + merged.buffer_names:
        state[name] = template_state[name].detach().clone()
    return state


def fold(merged: MergedModel) -> nn.Module:
    """A stock ``torchvision.models.<arch>(num_classes=K)`` holding the merge, loaded with strict=True."""
    model = get_backbone(merged.arch).build(merged.num_classes)
    device = next(merged.parameters()).device
    model.load_state_dict(folded_state_dict(merged), strict=True)
    return model.to(device).eval()
