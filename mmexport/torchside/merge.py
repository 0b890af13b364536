"""MedMerge: learnable kernel-level merge coefficients between source backbones.

The unmerged model keeps one stock torchvision module as a *template* (it owns
the target head and the BatchNorm running statistics) plus frozen copies of
every source's backbone parameters. Each forward pass computes the blended
parameter dict and runs the template with ``torch.func.functional_call``, so
the fold (``mmexport.torchside.fold``) is literally "compute the same dict once and
``load_state_dict`` it" — equivalence by construction, still verified by
measurement.

Two sources use the paper's form ``p = σ(λ)·p_A + (1 − σ(λ))·p_B``; N > 2
sources use a softmax over N logits (the paper's future work), so nothing here
is tied to two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from mmexport.torchside.backbones import get_backbone
from mmexport.errors import ArchitectureError, CheckpointError

Granularity = Literal["kernel", "filter", "layer"]
GRANULARITIES: tuple[str, ...] = ("kernel", "filter", "layer")
BN_BUFFERS = ("running_mean", "running_var")
UNMERGED_FORMAT = "mmexport-unmerged/1"


def coefficient_shape(param_shape: Sequence[int], granularity: str) -> tuple[int, ...]:
    """Shape of the logit tensor for a parameter of ``param_shape`` (broadcastable to it).

    kernel: conv (O, I, kh, kw) -> (O, I, 1, 1); linear (O, I) -> (O, 1); (C,) -> (C,)
    filter: (O, 1, 1, 1) / (O, 1) / (C,)
    layer:  one scalar per parameter tensor
    """
    if granularity not in GRANULARITIES:
        raise ArchitectureError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    shape = tuple(param_shape)
    if granularity == "layer" or len(shape) == 0:
        return ()
    if len(shape) == 1:
        return shape
    if granularity == "kernel" and len(shape) > 2:
        return shape[:2] + (1,) * (len(shape) - 2)
    return shape[:1] + (1,) * (len(shape) - 1)


def mixing_weights(logit: torch.Tensor, num_sources: int) -> torch.Tensor:
    """Per-source weights from a logit tensor: σ(λ), 1 − σ(λ) for two sources, softmax over dim 0 for more."""
    if num_sources == 2:
        weight_a = torch.sigmoid(logit)
        return torch.stack([weight_a, 1 - weight_a])
    return torch.softmax(logit, dim=0)


def _slot(name: str) -> str:
    # Module attribute names may not contain dots; torchvision names never contain "__".
    return name.replace(".", "__")


class _TensorBag(nn.Module):
    """Frozen tensors registered as buffers so ``.to(device)`` moves them; addressed by original name."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(_slot(name), value.detach().clone())

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, _slot(name))


class MergedModel(nn.Module):
    """The unmerged MedMerge network: N frozen sources, merge logits, template with head and BN buffers."""

    def __init__(
        self,
        arch: str,
        sources: Sequence[dict[str, torch.Tensor]],
        num_classes: int,
        *,
        granularity: str = "kernel",
        initial_logit: float = 0.0,
    ) -> None:
        super().__init__()
        if len(sources) < 2:
            raise ArchitectureError(f"merging needs at least 2 sources, got {len(sources)}")
        backbone = get_backbone(arch)
        self.arch = arch
        self.granularity = granularity
        self.num_classes = num_classes
        self.template = backbone.build(num_classes)
        template_state = self.template.state_dict()
        self.merge_names = [n for n, _ in self.template.named_parameters() if not backbone.is_head_key(n)]
        self.head_names = [n for n, _ in self.template.named_parameters() if backbone.is_head_key(n)]
        self.buffer_names = [n for n, _ in self.template.named_buffers()]

        for index, source in enumerate(sources):
            missing = [n for n in self.merge_names + self.buffer_names if n not in source]
            if missing:
                raise CheckpointError(f"source {index}: missing {len(missing)} keys, e.g. {', '.join(missing[:5])}")
            for name in self.merge_names:
                if tuple(source[name].shape) != tuple(template_state[name].shape):
                    raise ArchitectureError(
                        f"source {index}: {name} has shape {tuple(source[name].shape)}, "
                        f"expected {tuple(template_state[name].shape)}"
                    )
        self.sources = nn.ModuleList(
            _TensorBag({n: s[n].float() for n in self.merge_names}) for s in sources
        )
        self.num_sources = len(sources)
        lead = () if self.num_sources == 2 else (self.num_sources,)
        self.logits = nn.ParameterDict(
            {
                _slot(n): nn.Parameter(
                    torch.full(lead + coefficient_shape(template_state[n].shape, granularity), float(initial_logit))
                )
                for n in self.merge_names
            }
        )
        # The template's own backbone parameters are never used in forward (functional_call
        # substitutes the blend); freeze them so optimisers built from .parameters() skip them.
        for name, param in self.template.named_parameters():
            param.requires_grad_(name in self.head_names)
        self._init_bn_buffers(sources)

    # -- the blend -------------------------------------------------------------------------
    def logit(self, name: str) -> torch.Tensor:
        return self.logits[_slot(name)]

    def mixing_weights(self, name: str) -> torch.Tensor:
        """Per-source weights, shape (N, *coefficient_shape), summing to 1 over dim 0."""
        return mixing_weights(self.logit(name), self.num_sources)

    def blend(self, name: str) -> torch.Tensor:
        logit = self.logit(name)
        if self.num_sources == 2:
            # σ·A + (1 − σ)·B as one fused kernel (forward and backward): the blend is the
            # only per-step cost stage 1 adds over plain fine-tuning.
            return torch.lerp(self.sources[1].get(name), self.sources[0].get(name), torch.sigmoid(logit))
        weights = mixing_weights(logit, self.num_sources)
        return sum(weights[i] * bag.get(name) for i, bag in enumerate(self.sources))

    def blended_parameters(self) -> dict[str, torch.Tensor]:
        return {name: self.blend(name) for name in self.merge_names}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Head parameters and BN buffers come from the template itself, so BN running
        # statistics update in place in training mode exactly as in a plain network.
        return functional_call(self.template, self.blended_parameters(), (images,))

    # -- BatchNorm statistics ----------------------------------------------------------------
    def _init_bn_buffers(self, sources: Sequence[dict[str, torch.Tensor]]) -> None:
        """Running stats start as the blend of the sources' stats, using the BN weight's coefficient."""
        with torch.no_grad():
            for name, buffer in self.template.named_buffers():
                module_prefix, _, leaf = name.rpartition(".")
                if leaf in BN_BUFFERS:
                    weights = self.mixing_weights(f"{module_prefix}.weight")
                    stacked = torch.stack([s[name].float() for s in sources])
                    weights = weights.reshape(*weights.shape, *([1] * (stacked.dim() - weights.dim())))
                    buffer.copy_((weights * stacked).sum(0))
                elif leaf == "num_batches_tracked":
                    buffer.copy_(max(int(s[name]) for s in sources))
                else:
                    raise ArchitectureError(f"{self.arch}: do not know how to merge buffer {name}")

    # -- inspection ---------------------------------------------------------------------------
    def source_a_weight(self, name: str) -> torch.Tensor:
        """σ(λ): the weight of source A (index 0) for this parameter."""
        return self.mixing_weights(name)[0]

    def layer_coefficients(self) -> list[tuple[str, float]]:
        """Mean weight of source A per merged parameter, input to output (the paper's depth-wise view)."""
        with torch.no_grad():
            return [(n, float(self.source_a_weight(n).mean())) for n in self.merge_names]

    # -- serialisation --------------------------------------------------------------------------
    def unmerged_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this model, with readable keys."""
        tensors: dict[str, torch.Tensor] = {}
        for index, bag in enumerate(self.sources):
            for name in self.merge_names:
                tensors[f"source.{index}/{name}"] = bag.get(name)
        for name in self.merge_names:
            tensors[f"logit/{name}"] = self.logit(name)
        template_state = self.template.state_dict()
        for name in self.head_names + self.buffer_names:
            tensors[f"template/{name}"] = template_state[name]
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def unmerged_metadata(self) -> dict[str, str]:
        return {
            "format": UNMERGED_FORMAT,
            "arch": self.arch,
            "granularity": self.granularity,
            "num_sources": str(self.num_sources),
            "num_classes": str(self.num_classes),
        }

    @classmethod
    def from_unmerged_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "MergedModel":
        if metadata.get("format") != UNMERGED_FORMAT:
            raise CheckpointError(
                f"not an unmerged mmexport checkpoint (format {metadata.get('format')!r}, expected {UNMERGED_FORMAT!r})"
            )
        num_sources = int(metadata["num_sources"])
        sources = [
            {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"source.{i}/")}
            for i in range(num_sources)
        ]
        template_part = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("template/")}
        for source in sources:  # buffers are re-set from the checkpoint below; any value serves here
            source.update({k: v for k, v in template_part.items() if k not in source})
        model = cls(
            metadata["arch"], sources, int(metadata["num_classes"]), granularity=metadata["granularity"]
        )
        with torch.no_grad():
            for name in model.merge_names:
                key = f"logit/{name}"
                if key not in tensors:
                    raise CheckpointError(f"unmerged checkpoint lacks {key}")
                model.logit(name).copy_(tensors[key])
        expected = set(model.head_names + model.buffer_names)
        if set(template_part) != expected:
            missing = sorted(expected - set(template_part))
            extra = sorted(set(template_part) - expected)
            raise CheckpointError(f"unmerged checkpoint template keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
        model.template.load_state_dict({**model.template.state_dict(), **template_part}, strict=True)
        return model


@torch.no_grad()
def reestimate_bn_statistics(model: nn.Module, batches, max_batches: int | None = None) -> int:
    """Recompute every BatchNorm's running statistics as the exact average over ``batches``.

    A blend of two unrelated networks' weights does not have the blend of their
    statistics; re-estimating on target images before stage 1 fixes that. Returns the
    number of images seen. Only BN layers are put in training mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    saved_momentum = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over batches
        m.train()
    device = next(model.parameters()).device
    seen = 0
    for index, (images, _labels) in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        model(images.to(device))
        seen += len(images)
    for m, momentum in zip(norms, saved_momentum):
        m.momentum = momentum
    model.train(was_training)
    return seen
