"""Run an artifact on a stored reference and judge it: the two verification steps joined for one runner.

Also the other half of judging a deployable artifact: that the model description it carries
(:class:`~mmexport.runtime.modelinfo.ModelInfo`: classes, input size, the preprocessing block)
is the one its run recorded. The numbers are compared on already-preprocessed reference
inputs, so a file whose embedded ``std`` or class list was changed passes them and is still
wrong as deployed: the runtime normalises with that ``std`` and names that class.
"""

from __future__ import annotations

import json
from typing import Any

from mmexport.errors import VerificationError
from mmexport.runtime.compare import VerificationReport, compare_sets, judged_sets, run_batched
from mmexport.runtime.modelinfo import ModelInfo
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
        inputs = reference.input_view(name, limits.get(name))  # normalised batch by batch, not the whole set at once
        # an empty set still goes to the comparison, which fails it: zero samples prove nothing
        produced[name] = run_batched(runner, inputs, step) if len(inputs) else {
            k: v[:0] for k, v in references[name].outputs.items()}
    return compare_sets(references, produced, tolerance, reference_name=reference_name, candidate_name=runner.name)


# The fields of ModelInfo that decide what a deployment computes and reports; ``precision`` and
# ``weights_sha256`` are judged against what the caller knows of the artifact, ``extra`` is provenance.
_DESCRIBED_FIELDS = ("arch", "classes", "image_size", "mean", "std", "channel_order", "layout")
_SHOWN_CHARS = 160  # of one value in a message


def _shown(value: Any) -> str:
    # JSON with ASCII escapes: a forged value cannot break the one-line message or reach a terminal raw
    text = json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=True)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def model_info_differences(deployed: ModelInfo, recorded: ModelInfo, *, precision: str | None = None,
                           weights_sha256: str | None = None) -> list[tuple[str, str, str]]:
    """Each field where ``deployed`` (read from an artifact) describes another model than ``recorded`` (the run's).

    Returns ``(field, deployed value, recorded value)`` with values as JSON text; the
    preprocessing block is compared field by field (``preprocessing.std``). ``precision``:
    the precision the artifact is published as; ``weights_sha256``: the sha256 of the
    weights file the run records, compared where the artifact records one.
    """
    found = []
    for name in _DESCRIBED_FIELDS:
        mine, theirs = getattr(deployed, name), getattr(recorded, name)
        if mine != theirs:
            found.append((name, _shown(mine), _shown(theirs)))
    mine_block, their_block = deployed.preprocessing.to_dict(), recorded.preprocessing.to_dict()
    for key in sorted(set(mine_block) | set(their_block)):
        if mine_block.get(key) != their_block.get(key):
            found.append((f"preprocessing.{key}", _shown(mine_block.get(key)), _shown(their_block.get(key))))
    if precision is not None and deployed.precision != precision:
        found.append(("precision", _shown(deployed.precision), _shown(precision)))
    if weights_sha256 is not None and deployed.weights_sha256 is not None and deployed.weights_sha256 != weights_sha256:
        found.append(("weights_sha256", _shown(deployed.weights_sha256), _shown(weights_sha256)))
    return found


def check_model_info(deployed: ModelInfo, recorded: ModelInfo, where: str, *, precision: str | None = None,
                     weights_sha256: str | None = None) -> None:
    """Raise :class:`VerificationError` (one line naming every differing field) unless ``deployed`` is ``recorded``.

    The one comparison of an artifact's embedded model description with its run's record:
    ``verify`` calls it for every deployable artifact, and so should anything that publishes
    or exports one (see :func:`model_info_differences` for the arguments).
    """
    found = model_info_differences(deployed, recorded, precision=precision, weights_sha256=weights_sha256)
    if not found:
        return
    shown = "; ".join(f"embedded {name} {mine} differs from the run's {theirs}" for name, mine, theirs in found[:3])
    more = f"; also {', '.join(name for name, _, _ in found[3:])}" if len(found) > 3 else ""
    raise VerificationError(f"{where}: {shown}{more} (a deployment uses the file's own description)")


__all__ = ["check_model_info", "check_runner", "model_info_differences"]
