"""Re-judge the published fp16 and int8 studies under the confidence-bound top-1 rule.

The studies stored each comparison's top-1 agreement and its N (held-out images), so
the new verdict is exact without re-running a model: the count that agreed is
``round(agreement · N)``, and :func:`mmexport.runtime.tolerances.wilson_lower_bound`
(one-sided 95 %) of it must clear the row's floor on labelled held-out images
(the observed rate on random probe inputs; macro-F1 drop and the element/cosine
checks are unchanged and taken from the stored verdicts).

    python benchmarks/rejudge_top1.py   # writes benchmarks/results/precision/top1-bound-rejudged.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmexport.runtime.tolerances import (
    FP16,
    INT8,
    TOP1_CONFIDENCE,
    samples_to_show,
    top1_rule,
    wilson_lower_bound,
)

RESULTS = Path(__file__).parent / "results"


def verdict(agreement: float, n: int, floor: float, labelled: bool) -> dict:
    agreed = round(agreement * n)
    if abs(agreed - agreement * n) > 1e-6 * n:
        raise ValueError(f"agreement {agreement} is not a count of {n}")
    rule = top1_rule(floor, labelled)
    lower = wilson_lower_bound(agreed, n)
    ok = (agreed == n) if rule == "all" else (lower >= floor if rule == "bound" else agreed / n >= floor)
    return {"n": n, "agreed": agreed, "top1": agreed / n, "lower_bound": round(lower, 6), "rule": rule,
            "top1_passes": ok}


def int8_recovery() -> list[dict]:
    rows = []
    for path in sorted((RESULTS / "int8").glob("*.json")):
        for result in json.loads(path.read_text())["results"]:
            for variant in ("plain", "accuracy_aware"):
                judged = result.get(variant)
                if not judged or judged.get("top1_agreement") is None:
                    continue
                new = verdict(judged["top1_agreement"], judged["n"], INT8.min_top1_agreement, True)
                f1_ok = judged["macro_f1_drop"] is not None and judged["macro_f1_drop"] <= INT8.max_macro_f1_drop + 1e-12
                attempts = judged.get("attempts") or []
                first_new = next((a["float_nodes"] for a in attempts if a["top1_agreement"] is not None
                                  and verdict(round(a["top1_agreement"] * judged["n"]) / judged["n"], judged["n"],
                                              INT8.min_top1_agreement, True)["top1_passes"]
                                  and (a["macro_f1_drop"] or 0) <= INT8.max_macro_f1_drop), None)
                rows.append({"study": f"int8/{path.name}", "arch": result["arch"], "variant": variant,
                             "old_passed": judged["passed"], "new_passed": new["top1_passes"] and f1_ok, **new,
                             "macro_f1_drop": judged["macro_f1_drop"],
                             "first_recorded_attempt_passing_new_rule": first_new if attempts else None,
                             "float_nodes": judged.get("float_nodes")})
    return rows


def int8_tools() -> list[dict]:
    data = json.loads((RESULTS / "precision" / "int8_tools.json").read_text())
    rows = []
    for case in data["results"]:
        n = case["heldout"]
        for tool, record in case["tools"].items():
            for runner, judged in (record.get("runs") or {}).items():
                if judged.get("top1_agreement") is None:
                    continue
                new = verdict(judged["top1_agreement"], n, INT8.min_top1_agreement, True)
                f1_ok = judged["macro_f1_drop"] <= INT8.max_macro_f1_drop + 1e-12
                rows.append({"study": "precision/int8_tools.json", "case": case["case"], "tool": tool, "runner": runner,
                             "old_passed": judged["passed"], "new_passed": new["top1_passes"] and f1_ok, **new,
                             "macro_f1_drop": judged["macro_f1_drop"]})
    return rows


def fp16_study() -> list[dict]:
    data = json.loads((RESULTS / "precision" / "fp16_study.json").read_text())
    rows = []
    for case in data["results"]:
        sizes = {"random": case["n_random"], "data": case["n_data"]}
        for recipe, record in case["recipes"].items():
            for runner in ("ort", "emulated"):
                for set_name, n in sizes.items():
                    judged = (record.get(runner) or {}).get(set_name)
                    if not judged:
                        continue
                    new = verdict(judged["top1"], n, FP16.min_top1_agreement, set_name == "data")
                    # the element bound and cosine are unchanged: a set that failed them still fails
                    others_ok = not [f for f in judged.get("failures_new", []) if "top-1" not in f]
                    rows.append({"study": "precision/fp16_study.json", "case": case["case"], "recipe": recipe,
                                 "runner": runner, "set": set_name, "old_passed": judged["pass_new"],
                                 "new_passed": new["top1_passes"] and others_ok, **new})
    return rows


def _table(rows: list[dict], keys: list[str]) -> list[str]:
    lines = ["| " + " | ".join(keys + ["N", "agreed", "top-1", "95 % lower bound", "old", "new"]) + " |",
             "| " + " | ".join(["---"] * (len(keys) + 6)) + " |"]
    for r in rows:
        lines.append("| " + " | ".join([str(r[k]) for k in keys] + [
            str(r["n"]), str(r["agreed"]), f"{r['top1']:.2%}", f"{r['lower_bound']:.2%}" if r["rule"] == "bound" else
            f"({r['lower_bound']:.2%}, {r['rule']})", "pass" if r["old_passed"] else "FAIL",
            ("pass" if r["new_passed"] else "**FAIL**")]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "precision")
    args = parser.parse_args()
    report = {
        "rule": {"confidence": TOP1_CONFIDENCE, "sided": "one", "method": "Wilson score lower bound",
                 "int8_floor": INT8.min_top1_agreement, "fp16_floor": FP16.min_top1_agreement,
                 "perfect_agreements_needed": {"int8": samples_to_show(INT8.min_top1_agreement),
                                               "fp16": samples_to_show(FP16.min_top1_agreement)}},
        "int8_recovery": int8_recovery(), "int8_tools": int8_tools(), "fp16_study": fp16_study(),
    }
    changed = [r for part in ("int8_recovery", "int8_tools", "fp16_study") for r in report[part]
               if r["old_passed"] != r["new_passed"]]
    report["changed"] = len(changed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "top1-bound-rejudged.json").write_text(json.dumps(report, indent=1) + "\n")
    fp16_data = [r for r in report["fp16_study"] if r["set"] == "data"]
    lines = [
        "# The fp16 and int8 studies re-judged by the 95 % Wilson lower bound (`python benchmarks/rejudge_top1.py`)",
        "",
        (f"Rule: top-1 agreement on labelled held-out images passes when its one-sided {TOP1_CONFIDENCE:.0%} Wilson "
        f"lower bound clears the floor (int8 {INT8.min_top1_agreement:.0%}, fp16 {FP16.min_top1_agreement:.0%}); "
        f"N of N perfect agreements clear 99 % from N = {samples_to_show(0.99)}. Exact from the stored agreements "
        "and N (no model re-run); macro-F1, element and cosine verdicts as stored. "
         f"{len(changed)} verdicts changed."),
        "",
        "## Accuracy-aware int8 (`benchmarks/results/int8/`)", "",
        *_table(report["int8_recovery"], ["study", "arch", "variant"]), "",
        "## int8 tools (`precision/int8_tools.json`)", "",
        *_table(report["int8_tools"], ["case", "tool", "runner"]), "",
        "## fp16 recipes, held-out images (`precision/fp16_study.json`; random probe sets are judged on the observed rate)", "",
        *_table(fp16_data, ["case", "recipe", "runner"]), "",
    ]
    (args.out / "top1-bound-rejudged.md").write_text("\n".join(lines))
    print(f"{len(changed)} verdicts changed; wrote {args.out / 'top1-bound-rejudged.json'} and .md")


if __name__ == "__main__":
    main()
