"""Comparison as a pure function over arrays: reference outputs vs candidate outputs, judged by a policy row.

Verification runs in two steps. *Run*: a runner produces outputs for a set of
inputs (``run_batched``); the torch fp32 reference outputs are computed once
when a run's final network is written and stored in ``reference.npz``. *Compare*:
this module, which needs nothing but numpy, so a host with TensorRT and no
PyTorch can judge an engine against the stored reference.

Every report gives, per input set and output: max / mean / p99 absolute error,
max relative error, min and mean cosine similarity, top-1 and top-k agreement,
the number of samples and of NaN/Inf values, and on labelled data the macro F1 of
both sides. Top-1 agreement comes with N, the count that agreed and its Wilson
lower bound (one-sided 95 %), and the rule that judged it
(:func:`mmexport.runtime.tolerances.top1_rule`). A comparison over zero samples is
a failure, never a pass.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from mmexport.runtime.metrics import classification_metrics
from mmexport.runtime.tolerances import TOLERANCES, TOP1_CONFIDENCE, Tolerance, samples_to_show, top1_rule, wilson_lower_bound

_TINY = np.finfo(np.float64).tiny
TOPK = 3  # top-k agreement: the candidate's k best classes are the reference's (as a set); k = min(3, classes)


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
    topk: int = 0
    topk_agreement: float = float("nan")
    max_logit_range: float = float("nan")
    reference_macro_f1: float | None = None
    candidate_macro_f1: float | None = None
    failures: list[str] = field(default_factory=list)
    # top-1 as a statistic: how many of n_samples agreed, the Wilson lower bound of the rate at
    # top1_confidence (one-sided), and the rule the row judged it by (all / bound / observed).
    # None / "" in records written before they existed.
    top1_agreed: int | None = None
    top1_lower_bound: float | None = None
    top1_confidence: float | None = None
    top1_rule: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures

    def top1_text(self) -> str:
        """Top-1 agreement with its evidence, e.g. ``99.1 % (1933/1950, ≥ 98.7 % at 95 %)``."""
        if self.top1_agreed is None or self.top1_lower_bound is None:
            return f"{self.top1_agreement:.1%} (N={self.n_samples})"
        confidence = self.top1_confidence if self.top1_confidence is not None else TOP1_CONFIDENCE
        return (f"{self.top1_agreement:.1%} ({self.top1_agreed}/{self.n_samples}, "
                f"≥ {self.top1_lower_bound:.1%} at {confidence:.0%})")

    @property
    def macro_f1_drop(self) -> float | None:
        if self.reference_macro_f1 is None or self.candidate_macro_f1 is None:
            return None
        return self.reference_macro_f1 - self.candidate_macro_f1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OutputStats":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class InputSetReport:
    name: str  # "random" or "data:<split>"
    outputs: dict[str, OutputStats]

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(stats.passed for stats in self.outputs.values())


@dataclass
class VerificationReport:
    reference: str
    candidate: str
    tolerance: Tolerance
    input_sets: list[InputSetReport]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    notes: list[str] = field(default_factory=list)  # report-level failures (no labelled data, zero samples)

    @property
    def passed(self) -> bool:
        return not self.notes and bool(self.input_sets) and all(s.passed for s in self.input_sets)

    def failures(self) -> list[str]:
        """Why the report failed, never empty for a failed report (an empty reason misleads)."""
        found = [f"{s.name}/{out}: {msg}" for s in self.input_sets for out, st in s.outputs.items() for msg in st.failures]
        reasons = list(self.notes) + found
        if not reasons and not self.passed:
            reasons.append("no input set was compared")
        return reasons

    def stats(self, output: str = "logits") -> dict[str, OutputStats]:
        """Input-set name -> the statistics of ``output``."""
        return {s.name: s.outputs[output] for s in self.input_sets if output in s.outputs}

    def as_dict(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "tolerance": self.tolerance.as_dict(),
            "passed": self.passed,
            "created": self.created,
            "notes": list(self.notes),
            "input_sets": [
                {"name": s.name, "passed": s.passed, "outputs": {k: v.as_dict() for k, v in s.outputs.items()}}
                for s in self.input_sets
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VerificationReport":
        tolerance_fields = dict(data["tolerance"])
        known = set(Tolerance.__dataclass_fields__)
        tolerance = Tolerance(**{k: v for k, v in tolerance_fields.items() if k in known})
        sets = [InputSetReport(s["name"], {k: OutputStats.from_dict(v) for k, v in s["outputs"].items()})
                for s in data.get("input_sets", [])]
        return cls(data.get("reference", "?"), data.get("candidate", "?"), tolerance, sets,
                   created=data.get("created", ""), notes=list(data.get("notes", [])))


def _as_2d(values: np.ndarray) -> np.ndarray:
    return values.reshape(len(values), -1)


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, labels: np.ndarray | None = None
) -> OutputStats:
    """Statistics of ``candidate`` against ``reference`` (both (N, classes)) and the policy's verdict."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        return _shape_mismatch(reference, candidate)
    if len(reference) == 0:
        return _empty(reference)
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    nan_count = int(np.isnan(cand).sum())
    inf_count = int(np.isinf(cand).sum())
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf candidates are counted, not warned about
        diff = np.abs(cand - ref)
        abs_err = np.where(np.isfinite(diff), diff, np.inf)
        rel_err = abs_err / np.maximum(np.abs(ref), _TINY)
    flat_ref = _as_2d(ref)
    flat_cand = np.nan_to_num(_as_2d(cand), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
    cosine = np.divide((flat_ref * flat_cand).sum(axis=1), norms, out=np.zeros(len(ref)), where=norms > 0)
    safe_cand = np.nan_to_num(flat_cand, nan=-np.inf)
    ref_top = flat_ref.argmax(axis=1)
    agreed = int(np.sum(ref_top == safe_cand.argmax(axis=1)))
    top1 = agreed / len(ref)
    lower = wilson_lower_bound(agreed, len(ref))
    k = min(TOPK, flat_ref.shape[1])
    ref_k = np.sort(np.argsort(-flat_ref, axis=1, kind="stable")[:, :k], axis=1)
    cand_k = np.sort(np.argsort(-safe_cand, axis=1, kind="stable")[:, :k], axis=1)
    topk = float(np.mean(np.all(ref_k == cand_k, axis=1)))
    sample_range = flat_ref.max(axis=1) - flat_ref.min(axis=1)

    failures: list[str] = []
    if nan_count or inf_count:
        failures.append(f"{nan_count} NaN and {inf_count} Inf values in the candidate")
    out_of_tol = 0
    if tolerance.elementwise:
        bound = tolerance.atol + tolerance.rtol * np.abs(ref)
        if tolerance.range_rtol:
            bound = bound + tolerance.range_rtol * sample_range.reshape((-1,) + (1,) * (ref.ndim - 1))
        out_of_tol = int(np.sum(~(abs_err <= bound)))
        if out_of_tol:
            failures.append(
                f"{out_of_tol} of {abs_err.size} elements exceed the bound {tolerance.describe().split(', ')[0]} "
                f"(max abs error {float(abs_err.max()):.3g})"
            )
    if tolerance.min_cosine is not None and float(cosine.min()) < tolerance.min_cosine:
        below = int(np.sum(cosine < tolerance.min_cosine))
        failures.append(f"{below} sample(s) with cosine below {tolerance.min_cosine:g} (min {float(cosine.min()):.6f})")
    rule = top1_rule(tolerance.min_top1_agreement, labels is not None)
    top1_failure = _top1_failure(rule, agreed, len(ref), lower, tolerance.min_top1_agreement)
    if top1_failure:
        failures.append(top1_failure)

    ref_f1 = cand_f1 = None
    if labels is not None:
        num_classes = flat_ref.shape[1]
        ref_f1 = classification_metrics(labels, ref_top, num_classes)["macro_f1"]
        cand_f1 = classification_metrics(labels, safe_cand.argmax(axis=1), num_classes)["macro_f1"]
        if tolerance.max_macro_f1_drop is not None and ref_f1 - cand_f1 > tolerance.max_macro_f1_drop + 1e-12:
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
        topk=k,
        topk_agreement=topk,
        max_logit_range=float(sample_range.max()),
        reference_macro_f1=ref_f1,
        candidate_macro_f1=cand_f1,
        failures=failures,
        top1_agreed=agreed,
        top1_lower_bound=lower,
        top1_confidence=TOP1_CONFIDENCE,
        top1_rule=rule,
    )


def _top1_failure(rule: str, agreed: int, n: int, lower: float, floor: float) -> str | None:
    """Why ``agreed`` of ``n`` fails the row's top-1 ``floor`` under ``rule``, or None."""
    observed = agreed / n
    if rule == "all":
        if agreed < n:
            return f"top-1 agreement {observed:.2%} ({agreed} of {n}): the row requires every sample to agree"
        return None
    if rule == "observed":
        if observed < floor:
            return f"top-1 agreement {observed:.2%} ({agreed} of {n}) below the required {floor:.2%}"
        return None
    if lower >= floor:
        return None
    needed = samples_to_show(floor)
    if n < needed:
        return (f"top-1 agreement {observed:.2%} ({agreed} of {n}): N={n} labelled images cannot show "
                f"≥ {floor:.1%} at {TOP1_CONFIDENCE:.0%} confidence (even {n} of {n} has a Wilson lower bound of "
                f"{wilson_lower_bound(n, n):.1%}); judge on ≥ {needed} held-out images")
    return (f"top-1 agreement {observed:.2%} ({agreed} of {n}): its {TOP1_CONFIDENCE:.0%} Wilson lower bound "
            f"{lower:.2%} is below the required {floor:.1%}")


def _nan_stats(n: int, message: str) -> OutputStats:
    nan = float("nan")
    return OutputStats(
        n_samples=n, max_abs_error=nan, mean_abs_error=nan, p99_abs_error=nan, max_rel_error=nan,
        min_cosine=nan, mean_cosine=nan, top1_agreement=0.0, nan_count=0, inf_count=0, elements_out_of_tolerance=0,
        failures=[message],
    )


def _shape_mismatch(reference: np.ndarray, candidate: np.ndarray) -> OutputStats:
    return _nan_stats(int(len(reference)), f"output shape {candidate.shape} differs from the reference {reference.shape}")


def _empty(reference: np.ndarray) -> OutputStats:
    return _nan_stats(0, "no samples compared: a check over zero samples proves nothing")


@dataclass
class ReferenceSet:
    """One input set's reference outputs (name -> array) and optional labels."""

    outputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None


def judged_sets(sets: Mapping[str, Any], tolerance: Tolerance) -> tuple[list[str], list[str]]:
    """Which input sets a row judges, and report-level failures (e.g. int8 without labelled data)."""
    names = list(sets)
    notes: list[str] = []
    if tolerance.labelled_data_only:
        labelled = [n for n in names if getattr(sets[n], "labels", None) is not None]
        if not labelled:
            notes.append(
                f"no labelled held-out target data: the {tolerance.name} policy (top-1 agreement and macro-F1 drop) "
                "can only be judged on it"
            )
        names = labelled
    if not names:
        if not notes:
            notes.append("no input sets to compare")
    return names, notes


def compare_sets(
    reference: Mapping[str, ReferenceSet],
    candidate: Mapping[str, Mapping[str, np.ndarray]],
    tolerance: Tolerance,
    *,
    reference_name: str,
    candidate_name: str,
) -> VerificationReport:
    """Judge ``candidate[set][output]`` against ``reference[set].outputs[output]`` for every set the row judges."""
    names, notes = judged_sets(reference, tolerance)
    reports = []
    for set_name in names:
        ref_set = reference[set_name]
        produced = candidate.get(set_name, {})
        outputs: dict[str, OutputStats] = {}
        if not ref_set.outputs:  # a set of zero inputs produced no output arrays at all
            notes.append(f"{set_name}: no samples compared: a check over zero samples proves nothing")
        for key, ref_value in ref_set.outputs.items():
            if key not in produced:
                outputs[key] = _nan_stats(int(len(ref_value)), f"candidate has no output {key!r}")
                continue
            outputs[key] = compare_outputs(ref_value, produced[key], tolerance, ref_set.labels)
        reports.append(InputSetReport(set_name, outputs))
    return VerificationReport(reference_name, candidate_name, tolerance, reports, notes=notes)


def run_batched(runner: Any, inputs: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """All outputs of ``runner`` (a :class:`~mmexport.runtime.runners.base.BaseRunner`) over ``inputs``, concatenated."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(inputs), batch_size):
        result = runner.infer(inputs[start : start + batch_size])
        for key, value in result.items():
            chunks.setdefault(key, []).append(np.asarray(value))
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def verify_runners(
    reference: Any,
    candidate: Any,
    input_sets: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    tolerance: Tolerance,
    batch_size: int = 16,
) -> VerificationReport:
    """Run both runners over every input set the row judges, then compare (the two steps in one call).

    Runners that are not active yet are activated here and deactivated afterwards.
    """
    references, produced = {}, {}
    names, _ = judged_sets({k: ReferenceSet({}, v[1]) for k, v in input_sets.items()}, tolerance)
    opened = [r for r in (reference, candidate) if not r.is_active]
    for runner in opened:
        runner.activate()
    try:
        for set_name in names:
            inputs, labels = input_sets[set_name]
            references[set_name] = ReferenceSet(run_batched(reference, inputs, batch_size), labels)
            produced[set_name] = run_batched(candidate, inputs, batch_size)
    finally:
        for runner in opened:
            runner.deactivate()
    if not names:  # keep the report-level note
        references = {k: ReferenceSet({}, v[1]) for k, v in input_sets.items()}
    return compare_sets(references, produced, tolerance, reference_name=reference.name, candidate_name=candidate.name)


def random_images(count: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Seeded uniformly random RGB uint8 images, NHWC: the "random" reference inputs before normalisation."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)


def random_inputs(
    count: int, image_size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> np.ndarray:
    """Seeded uniform [0, 1] RGB images, normalised with ``mean``/``std`` like real inputs (float32 NCHW)."""
    rng = np.random.default_rng(seed)
    images = rng.random((count, 3, image_size, image_size), dtype=np.float32)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (images - mean_arr) / std_arr


__all__ = [
    "InputSetReport", "OutputStats", "ReferenceSet", "TOLERANCES", "VerificationReport", "compare_outputs",
    "compare_sets", "judged_sets", "random_images", "random_inputs", "run_batched", "verify_runners",
]
