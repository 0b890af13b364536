"""Compare any two runners under the equivalence policy of ``mmexport.tolerances``.

Inputs are seeded random images in the normalised range *and*, when given, real
target images (random inputs alone hide real disagreement). Every report gives,
per output: max / mean / p99 absolute error, max relative error, cosine
similarity, top-1 agreement, sample count and NaN/Inf count.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from mmexport.metrics import classification_metrics
from mmexport.runners.base import Runner
from mmexport.tolerances import Tolerance

_TINY = np.finfo(np.float64).tiny


@dataclass
class OutputStats:
    n_samples: int
    max_abs_error: float
    mean_abs_error: float
    p99_abs_error: float
    max_rel_error: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float
    nan_count: int
    inf_count: int
    elements_out_of_tolerance: int
    reference_macro_f1: float | None = None
    candidate_macro_f1: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class InputSetReport:
    name: str  # "random" or "data:<split>"
    outputs: dict[str, OutputStats]

    @property
    def passed(self) -> bool:
        return all(stats.passed for stats in self.outputs.values())


@dataclass
class VerificationReport:
    reference: str
    candidate: str
    tolerance: Tolerance
    input_sets: list[InputSetReport]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        return bool(self.input_sets) and all(s.passed for s in self.input_sets)

    def failures(self) -> list[str]:
        return [f"{s.name}/{out}: {msg}" for s in self.input_sets for out, st in s.outputs.items() for msg in st.failures]

    def as_dict(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "tolerance": self.tolerance.as_dict(),
            "passed": self.passed,
            "created": self.created,
            "input_sets": [
                {"name": s.name, "passed": s.passed, "outputs": {k: {**asdict(v), "passed": v.passed} for k, v in s.outputs.items()}}
                for s in self.input_sets
            ],
        }


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, labels: np.ndarray | None = None
) -> OutputStats:
    """Statistics of ``candidate`` against ``reference`` (both (N, classes)) and the policy's verdict."""
    if reference.shape != candidate.shape:
        return _shape_mismatch(reference, candidate)
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    nan_count = int(np.isnan(cand).sum())
    inf_count = int(np.isinf(cand).sum())
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf candidates are counted, not warned about
        diff = np.abs(cand - ref)
        abs_err = np.where(np.isfinite(diff), diff, np.inf)
        rel_err = abs_err / np.maximum(np.abs(ref), _TINY)
    flat_ref = ref.reshape(len(ref), -1)
    flat_cand = np.nan_to_num(cand.reshape(len(cand), -1), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
    cosine = np.divide((flat_ref * flat_cand).sum(axis=1), norms, out=np.zeros(len(ref)), where=norms > 0)
    top1 = float(np.mean(ref.argmax(axis=1) == np.nan_to_num(cand, nan=-np.inf).argmax(axis=1)))

    failures: list[str] = []
    if nan_count or inf_count:
        failures.append(f"{nan_count} NaN and {inf_count} Inf values in the candidate")
    out_of_tol = 0
    if tolerance.rtol is not None and tolerance.atol is not None:
        out_of_tol = int(np.sum(~(abs_err <= tolerance.atol + tolerance.rtol * np.abs(ref))))
        if out_of_tol:
            failures.append(
                f"{out_of_tol} of {abs_err.size} elements exceed atol={tolerance.atol:g} + rtol={tolerance.rtol:g}·|ref| "
                f"(max abs error {float(abs_err.max()):.3g})"
            )
    if top1 < tolerance.min_top1_agreement:
        failures.append(f"top-1 agreement {top1:.2%} below the required {tolerance.min_top1_agreement:.2%}")

    ref_f1 = cand_f1 = None
    if labels is not None:
        num_classes = ref.shape[1]
        ref_f1 = classification_metrics(labels, ref.argmax(axis=1), num_classes)["macro_f1"]
        cand_f1 = classification_metrics(labels, cand.argmax(axis=1), num_classes)["macro_f1"]
        if tolerance.max_macro_f1_drop is not None and ref_f1 - cand_f1 > tolerance.max_macro_f1_drop:
            failures.append(
                f"macro-F1 drop {100 * (ref_f1 - cand_f1):.2f} pt exceeds {100 * tolerance.max_macro_f1_drop:.2f} pt"
            )

    return OutputStats(
        n_samples=int(len(ref)),
        max_abs_error=float(abs_err.max()),
        mean_abs_error=float(abs_err.mean()),
        p99_abs_error=float(np.percentile(abs_err, 99, method="higher")),  # no interpolation across inf
        max_rel_error=float(rel_err.max()),
        min_cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
        top1_agreement=top1,
        nan_count=nan_count,
        inf_count=inf_count,
        elements_out_of_tolerance=out_of_tol,
        reference_macro_f1=ref_f1,
        candidate_macro_f1=cand_f1,
        failures=failures,
    )


def _shape_mismatch(reference: np.ndarray, candidate: np.ndarray) -> OutputStats:
    nan = float("nan")
    return OutputStats(
        n_samples=int(len(reference)), max_abs_error=nan, mean_abs_error=nan, p99_abs_error=nan, max_rel_error=nan,
        min_cosine=nan, mean_cosine=nan, top1_agreement=0.0, nan_count=0, inf_count=0, elements_out_of_tolerance=0,
        failures=[f"output shape {candidate.shape} differs from the reference {reference.shape}"],
    )


def run_batched(runner: Runner, inputs: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """All outputs of ``runner`` over ``inputs``, concatenated; a bare array is named ``logits``."""
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(inputs), batch_size):
        result = runner.infer(inputs[start : start + batch_size])
        named = result if isinstance(result, dict) else {"logits": result}
        for key, value in named.items():
            chunks.setdefault(key, []).append(np.asarray(value))
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def random_inputs(
    count: int, image_size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> np.ndarray:
    """Seeded uniform [0, 1] RGB images, normalised with ``mean``/``std`` like real inputs."""
    rng = np.random.default_rng(seed)
    images = rng.random((count, 3, image_size, image_size), dtype=np.float32)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (images - mean_arr) / std_arr


def verify_runners(
    reference: Runner,
    candidate: Runner,
    input_sets: dict[str, tuple[np.ndarray, np.ndarray | None]],
    tolerance: Tolerance,
    batch_size: int = 16,
) -> VerificationReport:
    """Run both runners over every input set and judge each output under ``tolerance``."""
    reports = []
    for set_name, (inputs, labels) in input_sets.items():
        ref_out = run_batched(reference, inputs, batch_size)
        cand_out = run_batched(candidate, inputs, batch_size)
        outputs = {}
        for key, ref_value in ref_out.items():
            if key not in cand_out:
                outputs[key] = _shape_mismatch(ref_value, np.empty((0,)))
                outputs[key].failures = [f"candidate has no output {key!r}"]
                continue
            outputs[key] = compare_outputs(ref_value, cand_out[key], tolerance, labels)
        reports.append(InputSetReport(set_name, outputs))
    return VerificationReport(reference.name, candidate.name, tolerance, reports)
