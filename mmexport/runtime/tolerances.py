"""The equivalence policy, stated once and printed in every report.

One row per comparison. An element passes its row if

    |candidate − reference| ≤ atol + rtol·|reference| + range_rtol·range(sample)

where ``range(sample)`` is the spread ``max − min`` of that sample's reference
logits. Besides the element bound a row may require a minimum cosine similarity per
sample, a minimum top-1 agreement, and (on labelled data) a maximum macro-F1 drop.

Why each row is what it is:

* ``fold`` is a fixed, tight element bound: the unmerged and the folded network
  run the same torch kernels on the same weights.
* ``fp32`` adds 1e-5 of the sample's logit range to the fixed 1e-4 bound: another
  library sums in another order, and float32 rounding then scales with the size of
  the summands, not of the result -- a logit near zero in a sample whose logits
  reach ±800 (untrained or out-of-distribution networks) is off by ~6e-4 with
  nothing wrong (measured: a dual-backbone ONNX export, max relative error 7e-7 of
  the logit scale). For trained networks (logit ranges of 10–20) the extra term is
  1–2e-4, the size of the fixed bound.
* ``fp16`` is *scale-aware*. float16 has an 11-bit significand, so every
  operation carries a relative error of about 5e-4 and a deep network's logits
  carry about 1e-3 of their own magnitude: logits of 10–20 are off by 0.01–0.02
  in a perfectly good model, and a fixed 5e-3 bound refused such models (top-1
  100 %, cosine 0.999996). The bound is therefore 1 % of each sample's logit
  range plus 1e-3, together with a per-sample cosine ≥ 0.999 and top-1 ≥ 99 %
  (below).
  A real fault still fails it: a saturated/overflowing layer gives Inf/NaN or a
  collapsed output (cosine, range), and a wrong constant moves logits by a
  visible fraction of their range (tests/convert/test_export_onnx.py plants both).
* ``int8`` is judged as a classifier, not element-wise: quantisation moves logits
  by several percent by design. It needs top-1 agreement ≥ 99 % and a macro-F1
  drop ≤ 1 point, and only on labelled held-out target images: random inputs
  lie outside the calibrated ranges and would measure clipping, not the artifact.

How a top-1 floor is judged (:func:`top1_rule`):

* floor 100 % (``fold``, ``fp32``): *every* sample must agree. The two sides
  compute the same function in float32; one flip is a fault, not a rate.
* floor below 100 % (``fp16``, ``int8``) on labelled held-out images: a claim
  about the images a deployment will see, of which the reference holds a sample.
  The **Wilson score lower bound** of the agreement, one-sided at 95 %
  confidence (z = 1.645, :data:`TOP1_CONFIDENCE`), must clear the floor: 99 % of
  N = 300 with 3 flips is a point estimate, the bound (98.0 %) is what the sample
  shows. Perfect agreement clears a floor f only from N ≥ z²·f/(1 − f)
  (:func:`samples_to_show`): 268 images for 99 %. A smaller set fails with that
  number in its message -- too few images cannot show the floor.
* floor below 100 % on unlabelled inputs (fp16's seeded random images): those
  probe the numeric range and stand for no population a deployment sees, so no
  confidence bound is claimed; the observed rate must clear the floor.

fp16's floor was 99.5 % of the observed rate; judged by the bound, 99.5 % would
need 539 perfect agreements, more than many held-out splits hold, while its
per-sample element bound and cosine (every sample) already refuse faults. The
floor is 99 % of the bound: at the old default of 512 images it allows one flip
(the old rule let 510 of 512 pass, whose bound is 98.8 %); it is at least as strict
as the old rule below N = 1,157 and one flip more lenient above.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mmexport.artifacts import check_precision

TOP1_CONFIDENCE = 0.95  # one-sided: P(true agreement >= bound) = 95 %
TOP1_Z = 1.6448536269514722  # the standard normal's 95th percentile (statistics.NormalDist().inv_cdf(0.95))


def wilson_lower_bound(successes: int, n: int, z: float = TOP1_Z) -> float:
    """The Wilson score interval's lower end for ``successes`` of ``n`` (0.0 for n = 0).

    With the default ``z`` it is the one-sided 95 % lower confidence bound of the
    proportion (the lower end of the two-sided 90 % interval); z = 1.96 gives the
    lower end of the two-sided 95 % interval (Wilson 1927; Newcombe 1998, method 3).
    """
    if n <= 0:
        return 0.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


def samples_to_show(floor: float, z: float = TOP1_Z) -> int:
    """The smallest N whose perfect agreement (N of N) has a Wilson lower bound >= ``floor`` (floor < 1)."""
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"a floor below 1 is needed, got {floor}")
    # N of N: bound = N / (N + z²) >= floor  <=>  N >= z²·floor / (1 - floor)
    n = max(1, math.ceil(z * z * floor / (1 - floor) - 1e-9))
    while wilson_lower_bound(n, n, z) < floor:  # guard the float edge
        n += 1
    return n


def top1_rule(floor: float, labelled: bool) -> str:
    """How a top-1 ``floor`` is judged: ``all`` (floor 1: every sample agrees), ``bound`` (the Wilson lower
    bound on labelled held-out images) or ``observed`` (the observed rate, on unlabelled probe inputs)."""
    if floor >= 1.0:
        return "all"
    return "bound" if labelled else "observed"


@dataclass(frozen=True)
class Tolerance:
    name: str
    description: str
    rtol: float | None  # None: no element-wise bound (int8)
    atol: float | None
    min_top1_agreement: float  # fraction of samples whose argmax matches the reference
    max_macro_f1_drop: float | None = None  # absolute drop (0.01 = 1 point), judged on labelled data
    range_rtol: float = 0.0  # element bound grows with each sample's logit range (max − min)
    min_cosine: float | None = None  # per-sample cosine similarity of the logit vectors
    labelled_data_only: bool = False  # judged only on labelled held-out images (int8)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def elementwise(self) -> bool:
        return self.rtol is not None and self.atol is not None

    def describe(self) -> str:
        """The row as one line, for every printed report."""
        parts = []
        if self.elementwise:
            bound = f"|a−e| ≤ {self.atol:g} + {self.rtol:g}·|e|"
            if self.range_rtol:
                bound += f" + {self.range_rtol:g}·range(sample)"
            parts.append(bound)
        if self.min_cosine is not None:
            parts.append(f"cosine ≥ {self.min_cosine:g}")
        if self.min_top1_agreement >= 1.0:
            parts.append("top-1 100 % (every sample)")
        else:
            parts.append(f"top-1 ≥ {self.min_top1_agreement:.1%} "
                         f"({TOP1_CONFIDENCE:.0%} one-sided Wilson lower bound on labelled images)")
        if self.max_macro_f1_drop is not None:
            parts.append(f"macro-F1 drop ≤ {100 * self.max_macro_f1_drop:g} pt")
        if self.labelled_data_only:
            parts.append("labelled held-out images only")
        return ", ".join(parts)


FOLD = Tolerance("fold", "unmerged vs folded, torch fp32", 1e-5, 1e-5, 1.0)
FP32 = Tolerance("fp32", "torch fp32 vs ONNX/TensorRT fp32", 1e-4, 1e-4, 1.0, range_rtol=1e-5)
FP16 = Tolerance("fp16", "fp16 artifact vs fp32 reference (scale-aware)", 0.0, 1e-3, 0.99, range_rtol=1e-2,
                 min_cosine=0.999)
INT8 = Tolerance("int8", "int8 artifact vs fp32 reference", None, None, 0.99, max_macro_f1_drop=0.01,
                 labelled_data_only=True)

TOLERANCES: dict[str, Tolerance] = {t.name: t for t in (FOLD, FP32, FP16, INT8)}


def for_precision(precision: str) -> Tolerance:
    """The row that judges an artifact of ``precision`` against the fp32 reference."""
    return TOLERANCES[check_precision(precision)]
