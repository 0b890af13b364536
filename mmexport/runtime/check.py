"""Run an artifact on a stored reference and judge it: the two verification steps joined for one runner."""

from __future__ import annotations

from mmexport.runtime.compare import VerificationReport, compare_sets, judged_sets, run_batched
from mmexport.runtime.reference import RANDOM_SET, ReferenceData
from mmexport.runtime.runners.base import BaseRunner
from mmexport.runtime.tolerances import Tolerance


def check_runner(
    runner: BaseRunner,
    reference: ReferenceData,
    tolerance: Tolerance,
    *,
    random_limit: int | None = None,
    batch_size: int = 16,
    reference_name: str = "torch fp32 (reference.npz)",
) -> VerificationReport:
    """``runner`` (active) on every input set ``tolerance`` judges, compared with the stored outputs.

    ``random_limit`` keeps the first N random inputs (``verify --samples``); ``batch_size``
    is capped by the runner's own batch limit (a TensorRT profile's max).
    """
    limits = {RANDOM_SET: random_limit} if random_limit is not None else {}
    references = reference.reference_sets(limits)
    names, _ = judged_sets(references, tolerance)
    cap = runner.max_batch
    step = min(batch_size, cap) if cap else batch_size
    produced = {}
    for name in names:
        inputs = reference.inputs(name, limits.get(name))
        # an empty set still goes to the comparison, which fails it: zero samples prove nothing
        produced[name] = run_batched(runner, inputs, step) if len(inputs) else {
            k: v[:0] for k, v in references[name].outputs.items()}
    return compare_sets(references, produced, tolerance, reference_name=reference_name, candidate_name=runner.name)


__all__ = ["check_runner"]
