"""What two sources share, measured before training: the lineage signal of their weights.

MedMerge blends the two sources kernel by kernel. That pays where the sources share an
ancestor (an ImageNet backbone and a model fine-tuned from it; two models fine-tuned from
one public checkpoint): their kernels still sit in the same channel order and close to
each other. Two networks trained from different random initialisations have kernels in
unrelated orders, and a blend near σ = 0.5 averages unrelated channels, which destroys
features (Git Re-Basin, ZipIt!).

The cheap signal: the cosine similarity of each conv/linear kernel of A with the same
kernel of B. Independent initialisations give |cos| ≈ 0 (a random direction in a space of
thousands of dimensions); fine-tuning from one ancestor keeps it far from 0. The thresholds
below sit between the two populations the merge study measures (docs/merge-study.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch

from mmexport.errors import ArchitectureError

SHARED_ANCESTOR_MIN = 0.3  # median kernel cosine at or above: the sources share an ancestor
UNRELATED_MAX = 0.1  # median kernel cosine below: unrelated initialisations


@dataclass(frozen=True)
class LineageCheck:
    """Per-kernel cosine similarities of A and B and the lineage they indicate."""

    cosines: dict[str, float]  # kernel name -> cosine(A, B), in network order
    aligned: bool = False  # measured after --align weights

    @property
    def median(self) -> float:
        return median(self.cosines.values())

    @property
    def lineage(self) -> str:
        """``shared-ancestor``, ``unrelated`` or ``unclear``."""
        if self.median >= SHARED_ANCESTOR_MIN:
            return "shared-ancestor"
        if self.median < UNRELATED_MAX:
            return "unrelated"
        return "unclear"

    def verdict(self, *, can_align: bool = True) -> str:
        """One line a user reads before training: which case they are in and what to expect.

        ``can_align``: whether ``--align weights`` is an option to suggest (False for DenseNet).
        """
        measured = f"median kernel cosine {self.median:.2f} over {len(self.cosines)} kernels" + (
            " after alignment" if self.aligned else "")
        if self.lineage == "shared-ancestor":
            return f"the sources share an ancestor ({measured}): the setting MedMerge is made for"
        if self.lineage == "unrelated":
            hint = "" if self.aligned or not can_align else (
                "their channels are in unrelated orders, so a blend averages unrelated features; align B first "
                "(--align weights) or ")
            # the study's unrelated regimes: the merge tied or lost to the better single source, aligned or not
            return (f"warning: the sources share no ancestor ({measured}): expect no gain over the better source "
                    f"fine-tuned alone; {hint}check with --compare")
        return (f"warning: the sources are only weakly related ({measured}): the merge may not beat a single "
                "source; check with --compare")

    def to_record(self) -> dict[str, Any]:
        return {
            "signal": "kernel cosine similarity",
            "aligned": self.aligned,
            "kernels": len(self.cosines),
            "median_cosine": round(self.median, 6),
            "min_cosine": round(min(self.cosines.values()), 6),
            "max_cosine": round(max(self.cosines.values()), 6),
            "lineage": self.lineage,
            "verdict": self.verdict(),
            "thresholds": {"shared_ancestor_min": SHARED_ANCESTOR_MIN, "unrelated_max": UNRELATED_MAX},
        }


def kernel_cosines(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> dict[str, float]:
    """cosine(A, B) of every weight with ≥ 2 dimensions (conv and linear kernels) the two share."""
    cosines: dict[str, float] = {}
    for name, a in state_a.items():
        b = state_b.get(name)
        if b is None or a.dim() < 2 or a.shape != b.shape or not name.endswith("weight"):
            continue
        va, vb = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
        norm = float(va.norm() * vb.norm())
        cosines[name] = float(torch.dot(va, vb)) / norm if norm > 0 else 0.0
    return cosines


def check_lineage(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], *,
                  aligned: bool = False) -> LineageCheck:
    """The lineage check of two same-architecture source backbones (heads dropped)."""
    cosines = kernel_cosines(state_a, state_b)
    if not cosines:
        raise ArchitectureError("the sources share no kernel of equal shape: nothing to compare")
    return LineageCheck(cosines, aligned=aligned)


# --align auto aligns for these methods only. The study (docs/merge-study.md) found alignment raised MedMerge's
# worst case over the unrelated regimes and lowered the plain average's; `average` is also the paper's baseline,
# which averages the sources as stored.
AUTO_ALIGN_METHODS = ("medmerge",)


def alignment_decision(mode: str, method: str, arch: str, lineage: str) -> tuple[bool, str | None]:
    """(align B?, why not) for ``--align mode``; the reason is given only when ``auto`` decided against it."""
    from mmexport.torchside.align import alignable

    if mode != "auto":
        return mode == "weights", None
    if method not in AUTO_ALIGN_METHODS:
        return False, f"--method {method} merges the sources as stored, the paper's baseline (--align weights aligns it)"
    if lineage == "shared-ancestor":
        return False, "the sources share an ancestor, so their channels are already in one order"
    if not alignable(arch):
        return False, f"{arch} cannot be aligned (its concatenations need one permutation per slice), so it is merged unaligned"
    return True, None


def prepare_sources(arch: str, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], *,
                    align: str, method: str = "medmerge") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Source B as the merge will use it (aligned to A when ``align`` says so) and the check's record.

    The record (for the manifest's ``training.compatibility``): the lineage before alignment,
    and under ``weights``/``auto`` what alignment did (its facts and the lineage after it) or
    why ``auto`` left B as stored. Its ``verdict`` is the line to show before stage 1. How well
    each source's features separate the target is the other half of the check: the head-only
    probes ``train`` runs right after it, before stage 1 trains (``train.head_probe``,
    recorded in ``training.diagnostics.source_probes``).
    """
    from mmexport.torchside.align import alignable

    before = check_lineage(state_a, state_b)
    record: dict[str, Any] = {"lineage": before.to_record(), "verdict": before.verdict(can_align=alignable(arch))}
    apply, reason = alignment_decision(align, method, arch, before.lineage)
    if reason is not None:
        record["alignment"] = {"mode": align, "applied": False, "reason": reason}
    if apply:
        from mmexport.torchside.align import align_weights

        result = align_weights(arch, state_a, state_b, seed=0)
        after = check_lineage(state_a, result.state, aligned=True)
        text = json.dumps(result.permutations, sort_keys=True, separators=(",", ":"))
        record["alignment"] = {
            "mode": align, "applied": True,
            "method": "weight matching (Git Re-Basin)", "sweeps": result.iterations,
            "moved_channels": result.moved_channels, "total_channels": result.total_channels,
            "weight_cosine_before": round(result.cosine_before, 6), "weight_cosine_after": round(result.cosine_after, 6),
            "permutations_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "lineage_after": after.to_record(),
        }
        record["verdict"] = after.verdict() if before.lineage != "shared-ancestor" else before.verdict()
        state_b = result.state
    return state_b, record
