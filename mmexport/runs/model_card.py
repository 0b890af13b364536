"""The run's model card (``model_card.md``): generated from its manifest, never written by hand.

:func:`render_model_card` turns a run's ``manifest.json`` into Markdown -- intended use and
its limits, the two sources with their sha256, the target data (path, fingerprint, class
counts per split), the method and its settings, test metrics per class, the ``--compare``
table and verdict, the preprocessing in words, every deployable artifact with its latest
verification, the provenance chain and the limitations the recorded numbers imply. It is a
pure function of the manifest: the same manifest gives the same bytes.

:class:`~mmexport.runs.manifest.RunDir` regenerates the card whenever it saves the manifest
and records it in ``outputs`` (kind ``model-card``), so ``verify --manifest`` re-hashes it
and reports a hand edit as ``altered``. The card never holds its own hash: its own entry
(and any pending write) is left out of what it renders.

Where the manifest lacks a fact the card says "not recorded" rather than guess; every
value read from the manifest is rendered defensively (a forged manifest can make the card
say odd things, never make saving the run fail).
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmexport import artifacts
from mmexport.errors import MMExportError, one_line
from mmexport.runtime.metrics import per_class_scores
from mmexport.runtime.preprocess import Preprocessing
from mmexport.runtime.report import NOT_FOR_CLINICAL_USE

MODEL_CARD_NAME = "model_card.md"
MODEL_CARD_KIND = "model-card"
SMALL_TEST_SET = 100  # fewer test images than this: the card warns that the scores are rough
SMALL_CLASS_SUPPORT = 10  # fewer test images of a class than this: its precision/recall are rough
_Z95 = 1.959963984540054

__all__ = ["MODEL_CARD_KIND", "MODEL_CARD_NAME", "has_model_card", "render_model_card", "write_model_card"]


class _Run(Protocol):  # what write_model_card needs of a RunDir (mmexport.runs.manifest imports this module)
    def refresh_model_card(self) -> Path: ...


def has_model_card(manifest: dict[str, Any]) -> bool:
    """Whether a run has a card to write: it has a network (``model``), i.e. training got that far."""
    return isinstance(manifest.get("model"), dict)


def write_model_card(run: _Run) -> Path:
    """Regenerate ``model_card.md`` in ``run`` from its manifest, record it in ``outputs`` and save; its path.

    Every :meth:`RunDir.save` does the same, so a run's card is current after any command that
    wrote the run; this is for a run made before cards existed (open it with ``RunDir.writer``)."""
    return run.refresh_model_card()


# -- text helpers: everything from the manifest is hostile until shown otherwise ------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _text(value: Any, limit: int = 300) -> str:
    """One line of inline Markdown: control characters escaped, Markdown-active characters neutralised."""
    text = value if isinstance(value, str) else one_line(value) if value is not None else ""
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def _code(value: Any, limit: int = 300) -> str:
    """A value as inline code (paths, hashes, file names); a backtick inside falls back to plain text."""
    text = value if isinstance(value, str) else one_line(value) if value is not None else ""
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if not text:
        return "—"
    return f"`{text}`" if "`" not in text and "|" not in text else _text(text, limit)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return f"{float(value):.{digits}f}"
    return "?"


def _int(value: Any) -> int | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) \
            and float(value) == int(value):
        return int(value)
    return None


def _count(value: Any) -> int | None:
    """A recorded number of images: a non-negative integer, else None."""
    number = _int(value)
    return number if number is not None and number >= 0 else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _size(value: Any) -> str:
    size = _int(value)
    if size is None:
        return "?"
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _wilson_interval(correct: float, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion ``correct / n``."""
    p = correct / n
    denominator = 1 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# -- the sections ---------------------------------------------------------------------------------
def render_model_card(manifest: dict[str, Any], run_dir: Path | None = None) -> str:
    """The Markdown model card of the run whose manifest is ``manifest``.

    Pure: reads nothing but the manifest (``run_dir`` is accepted for callers that have it and not
    used: a card never names its folder), so the same manifest renders the same card. The card's own ``outputs`` entry is never shown (a card cannot hold
    its own hash)."""
    manifest = _dict(manifest)
    outputs = {name: _dict(entry) for name, entry in _dict(manifest.get("outputs")).items()
               if isinstance(name, str) and name != MODEL_CARD_NAME}
    model = _dict(manifest.get("model"))
    classes = [str(c) for c in _list(model.get("classes"))]
    # The title names what the run made, never its folder: a run moved or copied keeps the same card.
    arch, method = model.get("arch"), _dict(manifest.get("training")).get("method")
    title = " ".join(_text(v) for v in (arch, method) if isinstance(v, str) and v) or "mmexport run"
    lines = [f"# Model card: {title}", ""]
    environment = _dict(manifest.get("environment"))
    lines += [
        (f"Generated by mmexport {_text(environment.get('mmexport') or '?')} from this run's `manifest.json` "
        f"(run {_code(manifest.get('run_id'))}). It is regenerated whenever the manifest is saved and is listed "
        "in the manifest's outputs: do not edit it by hand (`mmexport verify --manifest RUN` reports an edit as "
        "altered). Every number here is the manifest's."), "",
    ]
    limitations: list[str] = []
    sections = (_intended_use, _model_section, _sources_section, _data_section, _method_section, _metrics_section,
                _comparison_section, _preprocessing_section, _artifacts_section, _provenance_section)
    for section in sections:
        lines += section(manifest, outputs, classes, limitations)
    lines += ["## Known limitations", ""]
    lines += [f"- {item}" for item in limitations] or ["- none derived from what the manifest records"]
    return "\n".join(lines).rstrip() + "\n"


def _intended_use(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    stated = _dict(manifest.get("config")).get("intended_use")  # TrainConfig.intended_use (train --intended-use)
    lines = ["## Intended use", ""]
    if isinstance(stated, str) and stated.strip():
        lines += [f"Stated when the run was trained: {_text(stated, 2000)}", ""]
    else:
        lines += [(f"**{NOT_FOR_CLINICAL_USE}** No intended use was stated when the run was trained, so none is "
                  "claimed: the network has not been validated for diagnosis, triage or any decision about a patient."),
                  ""]
    names = ", ".join(_text(c) for c in classes) or "the recorded classes"
    lines += [
        "Limits of use:", "",
        (f"- It answers one of {len(classes) or '?'} classes ({names}) for every input, including images of none of "
        "them: it has no \"other\" or \"unknown\" output."),
        ("- Its scores hold only for images like the target data below, preprocessed exactly as described under "
        "Preprocessing (the deployable artifacts carry that block; `mmexport predict` and the Triton python backend "
        "apply it)."),
        "- A probability is the softmax of the logits, not a calibrated risk.", "",
    ]
    return lines


def _model_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    model = _dict(manifest.get("model"))
    size = _int(model.get("image_size"))
    final = outputs.get(artifacts.filename("model"), {})
    lines = ["## Model", ""]
    lines += [
        (f"- Architecture: {_code(model.get('arch'))} (a stock torchvision network after the fold), "
        f"{len(classes)} classes: {', '.join(_text(c) for c in classes) or 'not recorded'}"),
        (f"- Input: `image`, {_text(model.get('layout') or 'NCHW')} float32, 3×{size or '?'}×{size or '?'}, "
        f"{_text(model.get('channel_order') or 'RGB')}; output: `logits`, one per class, in the order above"),
        f"- Final weights: {_code(artifacts.filename('model'))} sha256 {_code(final.get('sha256') or 'not recorded')}",
        "",
    ]
    return lines


def _source_origin(info: dict[str, Any]) -> str:
    """What the run knows of what a source was trained on."""
    fmt = info.get("format")
    weights = info.get("weights")
    if isinstance(weights, str) and weights:
        return f"torchvision's published weights {_code(weights)} (ImageNet-1k, per torchvision's weights table)"
    if fmt == "scratch":
        return "nothing: randomly initialised (seed " + _text(info.get("seed")) + ")"
    dropped = [str(k) for k in _list(info.get("dropped_keys"))]
    head = f"; its own classifier head ({', '.join(_code(k) for k in dropped[:4])}) was dropped" if dropped else ""
    return f"not recorded (a {_text(fmt or 'checkpoint')} file; the run cannot know its training data){head}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sources_check_lines(record: Any) -> list[str]:
    """The lines of the check made before stage 1 (``training.compatibility``; docs/lineage.md).

    ``train`` prints them before stage 1, ``inspect`` again from the manifest, and the card lists them.
    """
    if not isinstance(record, dict):
        return []
    lines = [one_line(record["verdict"])[:400]] if isinstance(record.get("verdict"), str) else []
    alignment = record.get("alignment")
    if isinstance(alignment, dict) and alignment.get("applied") is False and isinstance(alignment.get("reason"), str):
        lines.append(f"source B not aligned (--align {one_line(str(alignment.get('mode')))[:20]}): "
                     f"{one_line(alignment['reason'])[:300]}")
    elif isinstance(alignment, dict):
        moved, total, sweeps = (_number(alignment.get(k)) for k in ("moved_channels", "total_channels", "sweeps"))
        before, after = _number(alignment.get("weight_cosine_before")), _number(alignment.get("weight_cosine_after"))
        if None not in (moved, total, sweeps, before, after):
            lines.append(f"source B aligned to A by weight matching: {moved:.0f} of {total:.0f} channels moved "
                         f"({sweeps:.0f} sweeps), kernel cosine {before:.3f} → {after:.3f}")
    return lines


def _sources_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    inputs = _dict(manifest.get("inputs"))
    rows = []
    unknown = []
    for key in ("source_a", "source_b"):
        info = _dict(inputs.get(key))
        if not info:
            continue
        rows.append([_text(info.get("label") or key), _code(info.get("spec") or info.get("path")),
                     _code(info.get("sha256") or "not recorded"), _source_origin(info)])
        if not info.get("weights") and info.get("format") != "scratch":
            unknown.append(_text(info.get("label") or key))
    lines = ["## Sources", ""]
    if not rows:
        return lines + ["No source checkpoint is recorded.", ""]
    lines += _table(["source", "checkpoint", "sha256", "trained on"], rows) + [""]
    if len(rows) == 1:
        lines += ["The method used one source only.", ""]
    checked = sources_check_lines(_dict(manifest.get("training")).get("compatibility"))
    if checked:
        lines += ["What the sources share, checked before training (docs/lineage.md):", ""]
        lines += [f"- {_text(line)}" for line in checked] + [""]
    if unknown:
        limitations.append(f"What {' and '.join(unknown)} {'was' if len(unknown) == 1 else 'were'} trained on is not "
                           "recorded: overlap between a source's training data and the target's test split, which "
                           "would inflate the test scores, cannot be ruled out from the run alone.")
    return lines


def _split_counts(manifest: dict[str, Any], classes: list[str]) -> dict[str, dict[str, int | None]]:
    """Images per class per split: the data's own counts where recorded, else the final evaluation's support."""
    data = _dict(_dict(manifest.get("inputs")).get("data"))
    recorded = _dict(data.get("class_counts"))
    final = _dict(_dict(manifest.get("training")).get("final"))
    counts: dict[str, dict[str, int | None]] = {}
    for split in ("train", "val", "test"):
        if isinstance(recorded.get(split), dict):
            counts[split] = {c: _int(recorded[split].get(c)) for c in classes}
            continue
        support = _list(_dict(_dict(final.get(split)).get("per_class")).get("support"))
        if len(support) == len(classes) and classes:
            counts[split] = {c: _count(s) for c, s in zip(classes, support)}
    return counts


def _data_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    data = _dict(_dict(manifest.get("inputs")).get("data"))
    lines = ["## Target data", ""]
    if not data:
        return lines + ["Not recorded.", ""]
    lines += [
        f"- Dataset: {_code(data.get('source'))} ({_text(data.get('kind') or '?')})",
        f"- Path: {_code(data.get('path')) if data.get('path') else 'none (generated data)'}",
        f"- Content fingerprint: {_code(data.get('fingerprint') or 'not recorded')}",
    ]
    totals = _dict(data.get("counts")) or {s: data.get(f"n_{s}") for s in ("train", "val", "test") if f"n_{s}" in data}
    if totals:
        lines.append("- Images per split: " + ", ".join(f"{_text(s)} {_int(n) if _int(n) is not None else '?'}"
                                                        for s, n in totals.items()))
    lines.append("")
    counts = _split_counts(manifest, classes)
    if counts:
        splits = list(counts)
        rows = [[_text(c)] + [str(counts[s].get(c)) if counts[s].get(c) is not None else "?" for s in splits]
                for c in classes]
        lines += ["Images per class and split:", ""] + _table(["class", *splits], rows) + [""]
        if "train" not in counts and totals:
            lines += ["(The training split's class counts are not recorded for this kind of dataset.)", ""]
    if data.get("kind") == "synthetic":
        limitations.append("The target data is synthetic (generated by mmexport for tests and demos): the scores say "
                           "nothing about any real image.")
    skipped = _dict(data.get("skipped"))
    dropped = sum((_int(_dict(v).get("unreadable")) or 0) + (_int(_dict(v).get("missing")) or 0) for v in skipped.values())
    if dropped:
        limitations.append(f"{dropped} image(s) of the dataset were unreadable or missing and were left out "
                           f"(max_bad={_text(data.get('max_bad'))}).")
    return lines


_SETTINGS = ("method", "granularity", "merge_epochs", "finetune_epochs", "batch_size", "lr_logits", "lr_head",
             "lr_backbone", "weight_decay", "schedule", "warmup_epochs", "patience", "class_weights", "sampler",
             "augmentation", "initial_logit", "bn_init", "sigma_bound", "image_size", "seed", "amp", "device_used",
             "world_size")


def _method_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    config = _dict(manifest.get("config"))
    training = _dict(manifest.get("training"))
    method = training.get("method") or config.get("method")
    lines = ["## Method and settings", ""]
    lines += [f"Method: {_code(method or 'not recorded')}. "
              + ("Stage 1 learns a per-kernel blend of the two sources (MedMerge) with a new head; the blend is "
                 "folded into one stock network, which stage 2 fine-tunes." if method == "medmerge" else
                 "A single-source baseline (no merge)." if isinstance(method, str) and method.startswith(("finetune", "lpft"))
                 else ""), ""]
    shown = [[_code(key), _code(config[key])] for key in _SETTINGS if key in config and key != "method"]
    if shown:
        lines += _table(["setting", "value"], shown) + [""]
    stages = _dict(training.get("stages"))
    for stage, record in stages.items():
        record = _dict(record)
        best = _dict(record.get("best_metrics"))
        epochs = len(_list(record.get("history")))
        stopped = record.get("stopped_early_at")
        lines.append(f"- Stage {_text(stage)}: {epochs} epoch(s), best epoch {_text(record.get('best_epoch'))}, "
                     f"val macro-F1 {_num(best.get('macro_f1'))}" + (f", stopped early at {_text(stopped)}" if stopped else ""))
    diagnostics = _dict(training.get("diagnostics"))
    probes = _dict(diagnostics.get("source_probes"))
    if probes:
        lines.append("- Head-only probe of each source (val macro-F1): "
                     + ", ".join(f"{_text(k)} {_num(_dict(v).get('val_macro_f1'))}" for k, v in probes.items()))
    below = [str(x) for x in _list(diagnostics.get("stage1_below_probe"))]
    if below:
        lines.append(f"- The stage-1 merge (val macro-F1 {_num(diagnostics.get('stage1_val_macro_f1'))}) scored below "
                     f"the head-only probe of source(s) {', '.join(_text(b) for b in below)}")
        limitations.append(f"The stage-1 merge scored below a head-only probe of source(s) {', '.join(_text(b) for b in below)} "
                           "on val: the merge itself did not add over that source before fine-tuning.")
    if stages or probes:
        lines.append("")
    return lines


def _per_class(metrics: dict[str, Any], classes: list[str]) -> list[list[Any]] | None:
    """Per class (precision, recall, f1, support): recorded, or computed from the recorded confusion matrix."""
    table = _dict(metrics.get("per_class"))
    columns = [_list(table.get(k)) for k in ("precision", "recall", "f1", "support")]
    if classes and all(len(col) == len(classes) for col in columns):
        return [list(row) for row in zip(*columns)]
    matrix = _list(metrics.get("confusion_matrix"))
    n = len(classes)
    if n and len(matrix) == n and all(len(_list(r)) == n and all(_count(v) is not None and v < 2**53 for v in r)
                                      for r in matrix):
        scores = per_class_scores(np.asarray(matrix, dtype=np.int64))  # the same scores training records
        return [[float(scores[k][i]) if k != "support" else int(scores[k][i]) for k in ("precision", "recall", "f1", "support")]
                for i in range(n)]
    return None


def _metrics_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    final = _dict(_dict(manifest.get("training")).get("final"))
    lines = ["## Performance", ""]
    if not final:
        return lines + ["No final scores are recorded (training did not finish).", ""]
    split = "test" if "test" in final else "val"
    if split == "val":
        limitations.append("The dataset has no test split: the scores below are on val, which also chose the best "
                           "epoch, so they are optimistic.")
    for part in ("test", "val"):
        metrics = _dict(final.get(part))
        if not metrics:
            continue
        n = _count(metrics.get("num_samples"))
        accuracy = metrics.get("accuracy")
        interval = ""
        if n and isinstance(accuracy, numbers.Real) and 0 <= accuracy <= 1:
            low, high = _wilson_interval(float(accuracy) * n, n)
            interval = f" (95 % Wilson interval {low:.3f}–{high:.3f})"
        lines.append(f"- {part} ({n if n is not None else '?'} images): accuracy {_num(accuracy)}{interval}, "
                     f"macro-F1 {_num(metrics.get('macro_f1'))}")
    lines.append("")
    metrics = _dict(final.get(split))
    rows = _per_class(metrics, classes)
    if rows is None:
        lines += [f"Per-class precision and recall on {split}: not recorded.", ""]
    else:
        computed = "" if _dict(metrics.get("per_class")) else " (computed from the recorded confusion matrix)"
        lines += [f"Per class on {split}{computed}:", ""]
        lines += _table(["class", "precision", "recall", "F1", "support"],
                        [[_text(c), _num(p), _num(r), _num(f), str(_count(s)) if _count(s) is not None else "?"]
                         for c, (p, r, f, s) in zip(classes, rows)]) + [""]
        missed = [c for c, row in zip(classes, rows) if _count(row[3]) and isinstance(row[1], numbers.Real) and row[1] == 0]
        if missed:
            limitations.append(f"On {split} the network never recognised {', '.join(_text(c) for c in missed)} "
                               "(recall 0).")
        rare = [f"{_text(c)} ({_count(row[3])})" for c, row in zip(classes, rows)
                if _count(row[3]) is not None and _count(row[3]) < SMALL_CLASS_SUPPORT]
        if rare:
            limitations.append(f"Few {split} images of {', '.join(rare)}: fewer than {SMALL_CLASS_SUPPORT} each, so their "
                               "precision and recall rest on a handful of cases.")
    n = _count(metrics.get("num_samples"))
    if n is not None and n < SMALL_TEST_SET:
        limitations.append(f"Small {split} set ({n} images): the accuracy's 95 % interval above is wide; differences "
                           "of a few points are noise.")
    return lines


def _score(value: Any) -> str:
    score = _dict(value)
    values = _list(score.get("values"))
    if not score:
        return "—"
    spread = f" ± {_num(score.get('std'))}" if len(values) > 1 else ""
    return f"{_num(score.get('mean'))}{spread}"


def _comparison_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    comparison = _dict(manifest.get("comparison"))
    lines = ["## Comparison with single-source baselines", ""]
    if not comparison:
        return lines + [("Not run: `mmexport train ... --compare` trains the single-source fine-tunes with the same "
                        "budget and settings and records the table here."), ""]
    split = comparison.get("split") if comparison.get("split") in ("test", "val") else "test"
    seeds = [str(s) for s in _list(comparison.get("seeds"))]
    lines += [f"Same data, budget and settings, seeds {', '.join(seeds) or '?'}; mean ± std over seeds:", ""]
    rows = []
    for row in _list(comparison.get("methods")):
        row = _dict(row)
        scores = _dict(row.get("scores"))
        marker = " (this run)" if row.get("method") == comparison.get("reference") else ""
        rows.append([_code(row.get("method")) + marker, _score(scores.get(f"{split}_macro_f1")),
                     _score(scores.get(f"{split}_accuracy")), _score(scores.get("val_macro_f1"))])
    lines += _table(["method", f"{split} macro-F1", f"{split} accuracy", "val macro-F1"], rows) + [""]
    verdict = comparison.get("verdict")
    lines += [f"Verdict: {_text(verdict or 'not recorded', 500)}", ""]
    if isinstance(verdict, str):
        best = _text(comparison.get("best_single") or "the best single source")
        if "inside the seed spread" in verdict:
            limitations.append(f"The merge ties {best} on this data (the gap is inside the seed spread): a single-source "
                               "fine-tune would do as well.")
        elif "did not pay" in verdict:
            limitations.append(f"The merge scored below {best} on this data beyond the seed spread: {best} is the "
                               "better model here.")
        elif "one seed" in verdict:
            limitations.append("The comparison ran one seed: no spread to judge the gap to the single sources by.")
    return lines


def _preprocessing_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    model = _dict(manifest.get("model"))
    block = model.get("preprocessing")
    lines = ["## Preprocessing", ""]
    try:
        preprocessing = Preprocessing.from_dict(block)
    except (MMExportError, TypeError, ValueError) as exc:
        return lines + [f"The recorded block is not readable ({_text(one_line(exc), 200)}).", ""]
    steps = []
    if preprocessing.dicom is not None:
        steps.append(f"A DICOM file is turned into an 8-bit image first: {_text(preprocessing.dicom.describe(), 600)}.")
    steps.append("The image is converted to 8-bit RGB (16-bit greyscale scaled by 255/65535, alpha dropped).")
    if preprocessing.resize == "shorter_side":
        steps.append(f"Its shorter side is resized to {preprocessing.resize_size[0]} px ({preprocessing.interpolation}, "
                     "antialiased), keeping the aspect ratio.")
    elif preprocessing.resize == "exact":
        steps.append(f"It is resized to {preprocessing.resize_size[0]}×{preprocessing.resize_size[1]} px "
                     f"({preprocessing.interpolation}, antialiased), whatever its aspect ratio.")
    else:
        steps.append("It is not resized.")
    if preprocessing.crop == "center":
        steps.append(f"The centre {preprocessing.crop_size[0]}×{preprocessing.crop_size[1]} px are cropped.")
    steps.append(f"Pixel values are divided by {preprocessing.scale:g}, then normalised per channel with mean "
                 f"{list(preprocessing.mean)} and std {list(preprocessing.std)}, as {preprocessing.layout} "
                 f"{preprocessing.dtype}.")
    if preprocessing.dicom is None:
        steps.append("DICOM input is refused (the network was trained on image files; no DICOM pixel policy is recorded).")
    lines += [f"{i}. {step}" for i, step in enumerate(steps, start=1)] + [""]
    return lines


def _latest_checks(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for record in _list(manifest.get("verification")):
        record = _dict(record)
        if isinstance(record.get("artifact"), str):
            latest[record["artifact"]] = record
    return latest


def _check_numbers(record: dict[str, Any]) -> str:
    stats = [_dict(o) for s in _list(record.get("input_sets")) for o in _dict(_dict(s).get("outputs")).values()]
    errors = [o.get("max_abs_error") for o in stats if isinstance(o.get("max_abs_error"), numbers.Real)]
    agreement = [o.get("top1_agreement") for o in stats if isinstance(o.get("top1_agreement"), numbers.Real)]
    parts = []
    if errors:
        parts.append(f"max abs error {max(errors):.2e}")
    if agreement:
        parts.append(f"top-1 agreement {min(agreement):.3f}")
    drops = [(o.get("reference_macro_f1"), o.get("candidate_macro_f1")) for o in stats
             if isinstance(o.get("reference_macro_f1"), numbers.Real) and isinstance(o.get("candidate_macro_f1"), numbers.Real)]
    if drops:
        parts.append(f"macro-F1 {drops[-1][0]:.3f} → {drops[-1][1]:.3f}")
    return ", ".join(parts) or "no statistics recorded"


def _artifacts_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    latest = _latest_checks(manifest)
    rows = []
    unverified = []
    for name, entry in outputs.items():
        row = artifacts.by_filename(name)
        if row is None or not row.deployable or name != row.filename:
            continue
        check = latest.get(name)
        if name == artifacts.filename("model"):
            policy, result = "—", "the reference the others are checked against (torch fp32)"
        elif check is None:
            policy, result = "—", "never checked"
        else:
            tolerance = _dict(check.get("tolerance"))
            policy = _code(tolerance.get("name") or "?")
            result = ("passed" if check.get("passed") is True else "**FAILED**") + f" ({_check_numbers(check)})"
        if entry.get("verified") is False:
            result += f"; **published unverified**: {_text(entry.get('unverified_reason'), 200)}"
            unverified.append(name)
        rows.append([_code(name), _text(row.precision or "?"), _text(row.runner or "?"),
                     _code(str(entry.get("sha256") or "?")), _size(entry.get("size_bytes")), policy, result])
    lines = ["## Deployable artifacts", ""]
    if not rows:
        lines += ["None yet.", ""]
    else:
        lines += _table(["file", "precision", "runs on", "sha256", "size", "verification policy", "latest check"], rows)
        lines += ["", ("Each check compares the artifact's outputs with the run's stored torch fp32 reference outputs "
                  "(`reference.npz`) under the policy named (see docs/verification.md)."), ""]
    if unverified:
        limitations.append(f"{', '.join(_code(n) for n in unverified)} failed verification and was published anyway "
                           "(--allow-unverified): do not deploy it.")
    others = [[_code(name), _text(entry.get("kind") or "?"), _code(str(entry.get("sha256") or "?"))]
              for name, entry in outputs.items() if not (artifacts.by_filename(name) or _NOT_DEPLOYABLE).deployable]
    if others:
        lines += ["Other files of the run:", ""] + _table(["file", "kind", "sha256"], others) + [""]
    repositories = [_dict(r) for r in _list(manifest.get("triton_repositories"))]
    if repositories:
        lines += [("Exported to Triton model repositories (each version's files are hashed in its `mmexport.json` "
                  "and re-hashed by `verify --manifest`):"), ""]
        lines += [f"- {_code(r.get('path'))} model {_code(r.get('model'))} version {_text(r.get('version'))}: "
                  f"{_code(r.get('artifact'))}, backend {_text(r.get('backend'))}" for r in repositories] + [""]
    latest: dict[str, dict] = {}
    for record in (_dict(v) for v in _list(manifest.get("verification"))):
        if isinstance(record.get("artifact"), str):
            latest[record["artifact"]] = record
    refused = [(name, record) for name, record in latest.items()
               if record.get("passed") is False and name not in outputs and "/" not in name]
    if refused:
        lines += ["Checked and refused, so not published (the check's record stays in the manifest):", ""]
        lines += [f"- {_code(name)}: failed the {_code(_dict(record.get('tolerance')).get('name') or '?')} policy"
                  for name, record in refused] + [""]
    bundles = [_dict(b) for b in _list(manifest.get("monai_bundles"))]
    if bundles:
        lines += ["Exported as MONAI Bundles (every file hashed in the manifest and re-hashed by `verify --manifest`):", ""]
        lines += [f"- {_code(b.get('bundle'))} ({_text(b.get('format'))}), models verified: "
                  f"{'yes' if b.get('verified') is True else 'no'}" for b in bundles] + [""]
    return lines


_NOT_DEPLOYABLE = artifacts.Artifact("", "", "", "", (), "")


def _chain(manifest: dict[str, Any], outputs: dict[str, dict[str, Any]], name: str) -> list[str]:
    """``name`` and what it was made from (the manifest's ``source`` field, else the registry's), down to the sources."""
    inputs = _dict(manifest.get("inputs"))
    chain: list[str] = []
    seen: set[str] = set()
    current: str | None = name
    while current and current not in seen:
        seen.add(current)
        chain.append(_code(current) + f" {_code(str(outputs.get(current, {}).get('sha256') or '?')[:12])}")
        parent = outputs.get(current, {}).get("source")
        row = artifacts.by_filename(current)
        if not isinstance(parent, str) and row is not None:
            made_from = [artifacts.REGISTRY[k].filename for k in row.made_from if k in artifacts.REGISTRY]
            parent = next((f for f in made_from if f in outputs and f != artifacts.filename("reference")), None)
            if parent is None and any(k.startswith("source") for k in row.made_from):
                chain.append("sources " + ", ".join(
                    f"{_text(_dict(inputs.get(k)).get('label') or k)} {_code(str(_dict(inputs.get(k)).get('sha256') or '?')[:12])}"
                    for k in ("source_a", "source_b") if k in inputs))
        current = parent if isinstance(parent, str) else None
    return chain


def _provenance_section(manifest: dict[str, Any], outputs: dict, classes: list[str], limitations: list[str]) -> list[str]:
    lines = ["## Provenance", ""]
    deployable = [row.filename for row in artifacts.deployable() if row.filename in outputs]
    for name in deployable:
        lines.append("- " + " ← ".join(_chain(manifest, outputs, name)))
    if deployable:
        lines += ["", ("(file, first 12 hex digits of its sha256, made from the file to its right; the full hashes are "
                  "above and in `manifest.json`)"), ""]
    environment = _dict(manifest.get("environment"))
    packages = _dict(environment.get("packages"))
    versions = ", ".join(f"{_text(k)} {_text(v)}" for k, v in packages.items() if isinstance(v, str))
    command = manifest.get("command")
    lines += [
        f"- Trained: {_text(manifest.get('created') or '?')}" + (f", completed {_text(manifest.get('completed'))}"
                                                                 if manifest.get("completed") else ""),
        f"- Command: {_code(command) if command else 'not recorded (made through the Python API)'}",
        f"- Environment: mmexport {_text(environment.get('mmexport') or '?')}, Python {_text(environment.get('python') or '?')}"
        + (f", {versions}" if versions else "") + f"; {_text(environment.get('platform') or '?')}",
        f"- Seed: {_text(manifest.get('seed'))}", "",
    ]
    return lines
