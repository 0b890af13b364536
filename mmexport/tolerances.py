"""The equivalence policy (DESIGN §4), stated once and printed in every report.

An element passes if ``|candidate - reference| <= atol + rtol * |reference|``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Tolerance:
    name: str
    description: str
    rtol: float | None  # None: element-wise closeness is not required (int8)
    atol: float | None
    min_top1_agreement: float  # fraction of samples whose argmax matches the reference
    max_macro_f1_drop: float | None = None  # absolute drop (0.01 = 1 point), judged on labelled data

    def as_dict(self) -> dict:
        return asdict(self)


FOLD = Tolerance("fold", "unmerged vs folded, torch fp32", 1e-5, 1e-5, 1.0)
FP32 = Tolerance("fp32", "torch fp32 vs ONNX/TensorRT fp32", 1e-4, 1e-4, 1.0)
FP16 = Tolerance("fp16", "fp16 artifact vs fp32 reference", 5e-3, 5e-3, 0.995)
INT8 = Tolerance("int8", "int8 artifact vs fp32 reference", None, None, 0.99, max_macro_f1_drop=0.01)

TOLERANCES: dict[str, Tolerance] = {t.name: t for t in (FOLD, FP32, FP16, INT8)}
