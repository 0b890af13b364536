"""Permutation alignment of source B to source A by weight matching (Git Re-Basin).

Two networks trained from different random initialisations compute similar features in
unrelated channel orders; a σ-blend of them averages unrelated channels. Permuting B's
hidden channels changes nothing B computes, yet can put its channels in A's order before
the merge (Ainsworth, Hayase & Srinivasa, *Git Re-Basin*, ICLR 2023, weight matching).

What a ResNet requires:

* a residual stream (the stem's output, and each stage's stream from its first
  downsampling block on) shares ONE permutation: every block adds into it;
* each block's inner channels (conv1→conv2, and conv2→conv3 in a bottleneck) have their own;
* a BatchNorm's weight, bias and running statistics move with their conv's output channels;
* the backbone's last stream feeds the classifier head, whose input columns move with it
  (the sources' heads are dropped before a merge, so there the last stream's order is free).

DenseNet concatenates every earlier layer's channels into each later layer's input: one
permutation per concatenated slice, which weight matching as published does not cover.
It is refused in one line rather than half-aligned.

The aligned B is just another source: the merge, the fold and its exactness proof do not
change. :func:`permute_state` is exact (only copies values), which the tests prove on
random networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from mmexport.errors import ArchitectureError
from mmexport.torchside.backbones import get_backbone

# param name -> one permutation name (or None) per axis
AxisPerms = tuple[str | None, ...]
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class PermutationSpec:
    """Which permutation acts on which axis of which tensor, and the size of each permutation."""

    axes: dict[str, AxisPerms]
    sizes: dict[str, int]

    def users(self, perm: str) -> list[tuple[str, int]]:
        """(tensor name, axis) pairs that ``perm`` permutes."""
        return [(name, axis) for name, perms in self.axes.items() for axis, p in enumerate(perms) if p == perm]


def _conv(axes: dict, name: str, out_perm: str | None, in_perm: str | None) -> None:
    axes[f"{name}.weight"] = (out_perm, in_perm, None, None)


def _bn(axes: dict, name: str, perm: str) -> None:
    for key in BN_KEYS:
        axes[f"{name}.{key}"] = (perm,)


def permutation_spec(arch: str, *, include_head: bool = False) -> PermutationSpec:
    """The permutation structure of ``arch`` (a torchvision ResNet); one-line refusal otherwise."""
    backbone = get_backbone(arch)
    with torch.device("meta"):
        model = backbone.build(num_classes=2)
    if not isinstance(model, ResNet):
        raise ArchitectureError(
            f"--align weights handles ResNets; {arch} concatenates every earlier layer's channels (DenseNet), "
            "which needs one permutation per concatenated slice: not supported, merge it unaligned"
        )
    axes: dict[str, AxisPerms] = {}
    sizes: dict[str, int] = {}
    stream = "stream.0"
    sizes[stream] = model.conv1.out_channels
    _conv(axes, "conv1", stream, None)
    _bn(axes, "bn1", stream)
    for stage in range(1, 5):
        for index, block in enumerate(getattr(model, f"layer{stage}")):
            prefix = f"layer{stage}.{index}"
            convs = ["conv1", "conv2"] if isinstance(block, BasicBlock) else ["conv1", "conv2", "conv3"]
            if not isinstance(block, (BasicBlock, Bottleneck)):
                raise ArchitectureError(f"{arch}: block {prefix} is a {type(block).__name__}, not a torchvision ResNet block")
            incoming = stream
            if block.downsample is not None:  # the block starts a new residual stream
                stream = f"stream.{prefix}"
                sizes[stream] = getattr(block, convs[-1]).out_channels
                _conv(axes, f"{prefix}.downsample.0", stream, incoming)
                _bn(axes, f"{prefix}.downsample.1", stream)
            previous = incoming
            for position, conv in enumerate(convs):
                last = position == len(convs) - 1
                out = stream if last else f"{prefix}.{conv}"
                if not last:
                    sizes[out] = getattr(block, conv).out_channels
                _conv(axes, f"{prefix}.{conv}", out, previous)
                _bn(axes, f"{prefix}.bn{position + 1}", out)
                previous = out
    if include_head:
        axes["fc.weight"] = (None, stream)
        axes["fc.bias"] = (None,)
    return PermutationSpec(axes, sizes)


def alignable(arch: str) -> bool:
    """Whether ``--align weights`` handles ``arch`` (torchvision ResNets; DenseNet is refused)."""
    try:
        permutation_spec(arch)
    except ArchitectureError:
        return False
    return True


def permute_state(state: dict[str, torch.Tensor], spec: PermutationSpec,
                  perms: dict[str, np.ndarray | torch.Tensor], *, skip: tuple[str, int] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with every axis permuted: ``new[..., i, ...] = old[..., perm[i], ...]``.

    Keys outside the spec (e.g. ``num_batches_tracked``, a dropped head) are copied unchanged.
    ``skip``: leave that one (tensor, axis) unpermuted (weight matching's cost for that axis).
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        for axis, perm in enumerate(spec.axes.get(name, ())):
            if perm is None or (name, axis) == skip:
                continue
            index = torch.as_tensor(np.asarray(perms[perm]), dtype=torch.long, device=value.device)
            value = torch.index_select(value, axis, index)
        out[name] = value
    return out


@dataclass
class Alignment:
    """B permuted into A's channel order, and what it bought in weight similarity."""

    state: dict[str, torch.Tensor]
    permutations: dict[str, list[int]]
    iterations: int
    moved_channels: int  # channels not left in place, over all permutations
    total_channels: int
    cosine_before: float  # of all conv/linear kernels (flattened together), A vs B
    cosine_after: float
    history: list[float] = field(default_factory=list)  # matching objective after each sweep


def _flat_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    va = torch.cat([a[n].reshape(-1).double() for n in names])
    vb = torch.cat([b[n].reshape(-1).double() for n in names])
    return float(torch.dot(va, vb) / (va.norm() * vb.norm()).clamp_min(1e-300))


def align_weights(arch: str, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], *,
                  seed: int = 0, max_sweeps: int = 100) -> Alignment:
    """Weight matching: coordinate ascent over permutations of B maximising Σ ⟨W_A, P W_B Pᵀ⟩.

    Each step solves one permutation exactly (a linear assignment, scipy's Hungarian solver)
    with the others fixed; sweeps in a seeded random order until no permutation improves.
    Only learnable weights enter the objective (BatchNorm statistics follow their channels).
    """
    from scipy.optimize import (
        linear_sum_assignment,  # the torch extra's scipy: only alignment needs it
    )

    spec = permutation_spec(arch)
    weights = [n for n in spec.axes if not n.endswith(("running_mean", "running_var"))]
    missing = [n for n in spec.axes if n not in state_a or n not in state_b]
    if missing:
        raise ArchitectureError(f"{arch}: cannot align, the sources lack {len(missing)} tensors, e.g. {missing[0]}")
    a = {n: state_a[n].detach().double().cpu() for n in spec.axes}
    b = {n: state_b[n].detach().double().cpu() for n in spec.axes}
    perms = {p: np.arange(size) for p, size in spec.sizes.items()}
    rng = np.random.default_rng(seed)
    names = sorted(spec.sizes)
    history: list[float] = []
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        improved = False
        for perm in rng.permutation(names):
            size = spec.sizes[perm]
            cost = torch.zeros(size, size, dtype=torch.float64)
            for name, axis in spec.users(perm):
                if name not in weights:
                    continue
                moved_b = permute_state({name: b[name]}, spec, perms, skip=(name, axis))[name]
                cost += torch.movedim(a[name], axis, 0).reshape(size, -1) @ torch.movedim(moved_b, axis, 0).reshape(size, -1).T
            cost_np = cost.numpy()
            _, choice = linear_sum_assignment(cost_np, maximize=True)
            old = cost_np[np.arange(size), perms[perm]].sum()
            new = cost_np[np.arange(size), choice].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[perm] = choice
                improved = True
        aligned = permute_state(b, spec, perms)
        history.append(float(sum((a[n] * aligned[n]).sum() for n in weights)))
        if not improved:
            break
    result = permute_state(dict(state_b), spec, perms)
    kernels = [n for n in weights if a[n].dim() >= 2]  # BatchNorm's γ ≈ 1 would dominate a cosine of everything
    moved = sum(int((p != np.arange(len(p))).sum()) for p in perms.values())
    return Alignment(
        state=result,
        permutations={p: [int(i) for i in v] for p, v in perms.items()},
        iterations=sweeps,
        moved_channels=moved,
        total_channels=sum(spec.sizes.values()),
        cosine_before=_flat_cosine(a, b, kernels),
        cosine_after=_flat_cosine(a, permute_state(b, spec, perms), kernels),
        history=history,
    )


def check_lossless(arch: str, state: dict[str, torch.Tensor], aligned: dict[str, torch.Tensor],
                   permutations: dict[str, list[int]], images: torch.Tensor) -> float:
    """Largest |difference| between B's and aligned B's final features (aligned features un-permuted).

    The backbone's last stream order is free (the head is dropped), so the aligned network's
    features are B's features in that stream's new order; 0 up to float summation order.
    """
    spec = permutation_spec(arch)
    backbone = get_backbone(arch)

    def features(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        model = backbone.build(num_classes=2)
        setattr(model, backbone.head, nn.Identity())
        model.load_state_dict({k: v for k, v in weights.items() if not backbone.is_head_key(k)}, strict=True)
        model.eval()
        with torch.no_grad():
            return model(images)

    last_stream = [p for p in spec.sizes if p.startswith("stream.")][-1]
    order = torch.as_tensor(permutations[last_stream])
    restored = torch.empty_like(order)
    restored[order] = torch.arange(len(order))
    return float((features(state) - features(aligned)[:, restored]).abs().max())
