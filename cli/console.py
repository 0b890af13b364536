"""Rich rendering of the commands' typed results: the progress sink, the tables and the reports.

Every function here takes what a library call returned and prints it (``print_*``) or
returns a rich table (``*_table``); none computes anything the library did not.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from mmexport.runtime.compare import VerificationReport

if TYPE_CHECKING:  # the commands import the library lazily; so does the rendering of its results
    from mmexport.bench import BenchReport
    from mmexport.demo import DemoSummary
    from mmexport.runs.engine_build import DoctorReport
    from mmexport.runs.inspect import RunSummary, SplitMetrics, TrainingOutcome, TrainingReport
    from mmexport.runs.manifest import PublishedArtifact
    from mmexport.runs.predict import PredictReport
    from mmexport.runs.provenance import ProvenanceReport
    from mmexport.serving.server import ServingPreparation, ServingSession
    from mmexport.serving.triton import RepositoryResult

# Piped output (CI logs, files) would otherwise be cut at 80 columns, truncating the numbers
# an auditor reads; an explicit COLUMNS still wins.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
console = Console(width=_WIDTH)
error_console = Console(stderr=True)

# Characters a terminal acts on instead of showing: C0/C1 controls (ESC starts screen clears and
# window-title sequences, U+009B is an 8-bit CSI), line breaks (a forged line would read as ours),
# format characters (bidi overrides reorder what is shown) and lone surrogates (undecodable file names).
_ACTIVE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if unicodedata.category(char) not in _ACTIVE_CATEGORIES:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def one_line(value: object) -> str:
    """``value`` as text a terminal shows as is, on one line: every control, line-break, bidi-format
    character and lone surrogate written as its escape (``\\x1b``, ``\\n``, ``\\u202e``)."""
    text = str(value)
    return text if text.isprintable() else "".join(map(_visible, text))


def literal(value: object) -> str:
    """User or file text (a path, a manifest field, a class name, an error message) as rich markup that
    prints exactly that text on one line: :func:`one_line`, then rich's markup escape. Everything the CLI
    prints that it did not write itself goes through here."""
    return escape(one_line(value))


class RichProgress:
    """Implements the library's ProgressSink with one rich bar per epoch and a line per result."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None

    def start(self, description: str, total: int) -> None:
        self.finish()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def epoch(self, record: dict[str, Any]) -> None:
        console.print(  # the stage name is the library's own text, not user input
            f"  {record['stage']:<22} epoch {record['epoch']:>2}  loss {record['train_loss']:.4f}  "
            f"val acc {record['val_accuracy']:.3f}  val macro-F1 {record['val_macro_f1']:.3f}",
            soft_wrap=True,
        )

    def message(self, text: str) -> None:
        console.print(f"  {literal(text)}", soft_wrap=True)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def verification_table(report: VerificationReport) -> Table:
    """One column per input set and output, one row per statistic: readable at any terminal width."""
    tol = report.tolerance
    table = Table(title=literal(f"{report.candidate} vs {report.reference}  [{tol.name}: {tol.describe()}]"),
                  title_justify="left")
    table.add_column("statistic", no_wrap=True)
    cells = [(input_set.name, output, stats) for input_set in report.input_sets for output, stats in input_set.outputs.items()]
    for name, output, _ in cells:
        table.add_column(literal(name if output == "logits" else f"{name}/{output}"), justify="right", no_wrap=True)
    rows = [
        ("N", lambda st: str(st.n_samples)),
        ("max abs error", lambda st: _fmt(st.max_abs_error)),
        ("mean abs error", lambda st: _fmt(st.mean_abs_error)),
        ("p99 abs error", lambda st: _fmt(st.p99_abs_error)),
        ("max rel error", lambda st: _fmt(st.max_rel_error)),
        ("min / mean cosine", lambda st: f"{_fmt(st.min_cosine, '.6f')} / {_fmt(st.mean_cosine, '.6f')}"),
        ("top-1 agreement", lambda st: f"{st.top1_agreement:.1%}"),
        ("top-1 agreed / lower bound", lambda st: "—" if st.top1_agreed is None or st.top1_lower_bound is None
         else f"{st.top1_agreed}/{st.n_samples}, ≥ {st.top1_lower_bound:.1%} ({st.top1_rule})"),
        ("top-k agreement", lambda st: "—" if not st.topk else f"{st.topk_agreement:.1%} (k={st.topk})"),
        ("macro-F1 ref → cand", lambda st: "—" if st.reference_macro_f1 is None
         else f"{st.reference_macro_f1:.3f} → {st.candidate_macro_f1:.3f}"),
        ("NaN / Inf", lambda st: f"{st.nan_count} / {st.inf_count}"),
        ("result", lambda st: "[green]pass[/green]" if st.passed else "[red]FAIL[/red]"),
    ]
    for label, render in rows:
        table.add_row(label, *(render(stats) for _, _, stats in cells))
    if report.notes:
        table.caption = literal("FAIL: " + "; ".join(report.notes))
    return table


def print_verification(report: VerificationReport) -> None:
    """A report's table; a report that compared nothing (the artifact was refused before it ran) as one line."""
    if report.input_sets:
        console.print(verification_table(report))
        return
    verdict = "[green]pass[/green]" if report.passed else "[red]FAIL[/red]"
    console.print(f"{literal(report.candidate)} vs {literal(report.reference)}: {verdict}: "
                  f"{literal('; '.join(report.failures()))}", soft_wrap=True, highlight=False)


def bench_table(report) -> Table:
    table = Table(title=f"{report.engine} {report.precision} — {literal(report.machine.get('cpu_model', ''))}",
                  title_justify="left")
    for column in ("model", "batch", "median ms", "mean ms", "p90", "p95", "p99", "min", "max", "CV", "images/s",
                   "load s", "size MB", "+peak RSS MB", "n", "verified"):
        table.add_column(column, justify="left" if column in ("model", "verified") else "right")
    for r in report.results:
        lat = r.latency
        verified = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "—"}[r.verified]
        table.add_row(
            r.model, str(r.batch_size), f"{lat.median_ms:.2f}", f"{lat.mean_ms:.2f}", f"{lat.p90_ms:.2f}",
            f"{lat.p95_ms:.2f}", f"{lat.p99_ms:.2f}", f"{lat.min_ms:.2f}", f"{lat.max_ms:.2f}",
            ("[yellow]" if lat.cv > 0.1 else "") + f"{lat.cv:.1%}", f"{lat.throughput_ips:.1f}", f"{r.load_s:.2f}",
            "—" if r.artifact_bytes is None else f"{r.artifact_bytes / 1e6:.1f}",
            "—" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / 1e6:.0f}", str(lat.iterations), verified,
        )
    return table


def device_table(report) -> Table:
    """trtexec's statistics for GPU runners (H2D + compute + D2H, enqueue, CV of compute)."""
    table = Table(title="GPU timings, trtexec's statistics (ms; latency = H2D + compute + D2H)", title_justify="left")
    for column in ("model", "batch", "latency median", "p99", "compute median", "p99", "H2D median", "D2H median",
                   "enqueue median", "compute CV", "CUDA graphs", "images/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in report.results:
        d = r.device
        if not d:
            continue
        table.add_row(
            r.model, str(r.batch_size), f"{d['latency']['median']:.3f}", f"{d['latency']['p99']:.3f}",
            f"{d['compute']['median']:.3f}", f"{d['compute']['p99']:.3f}", f"{d['h2d']['median']:.3f}",
            f"{d['d2h']['median']:.3f}", f"{d['enqueue']['median']:.3f}",
            ("[yellow]" if d.get("unstable") else "") + f"{d['compute']['cv_percent']:.1f}%",
            "on" if d.get("cuda_graphs") else "off", f"{d['images_per_s']:.1f}",
        )
    return table


def ratio_table_view(report) -> Table:
    table = Table(title="headline: median latency ratios (1.00 = same cost)", title_justify="left")
    for column in ("batch", "ratio", "median", "mean", "rounds agree (95 %)"):
        table.add_column(column, justify="left" if column in ("ratio", "rounds agree (95 %)") else "right")
    for row in report.ratios:
        settled, rounds = row.get("settled"), row.get("round_ratios") or []
        if settled is False and rounds:  # the rounds disagree: the range, not a headline number
            median = f"[yellow]unsettled {min(rounds):.2f}–{max(rounds):.2f}[/yellow]"
            agree = f"[yellow]no (±{row['half_width']:.0%}); --rounds {row['rounds_needed']}[/yellow]"
        else:
            median = f"{row['median_ratio']:.3f}"
            agree = "—" if settled is None else f"yes (±{row['half_width']:.1%})"
        table.add_row(str(row["batch_size"]), row["ratio"], median, f"{row['mean_ratio']:.3f}", agree)
    return table


def _wrote(text: str) -> None:
    console.print(f"[green]wrote[/green] {text}", soft_wrap=True)


# --------------------------------------------------------------------------- train


def print_final_metrics(final: Mapping[str, SplitMetrics], indent: str = "") -> None:
    for split, metrics in final.items():
        console.print(f"{indent}final {literal(split)}: accuracy {metrics.accuracy:.3f}  macro-F1 {metrics.macro_f1:.3f}")


def print_training_outcome(outcome: TrainingOutcome) -> None:
    """What ``train`` prints when the run is published: final scores, the per-class table, the training report."""
    final = outcome.final_metrics
    print_final_metrics(final, indent="  ")
    split = "test" if "test" in final else "val"
    rows = final[split].per_class if split in final and outcome.classes else None
    if rows:
        table = Table(title=f"per class, {split} (confusion matrix in manifest.json)", title_justify="left")
        for column in ("class", "precision", "recall", "F1", "support"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for row in rows:
            table.add_row(literal(row.name), f"{row.precision:.3f}", f"{row.recall:.3f}", f"{row.f1:.3f}",
                          f"{row.support:.0f}")
        console.print(table)
    print_training_report(outcome.training)
    console.print(f"[green]run written to[/green] {literal(outcome.path)}")


def print_training_report(training: TrainingReport) -> None:
    """Stage-1 diagnostics (σ saturation, head-only probes) and the --compare table, when the run has them."""
    for line in training.sources_check:  # what the sources share, checked before stage 1
        console.print(f"  {literal(line)}", soft_wrap=True)
    if training.sigma_saturation is not None:
        console.print(f"  merge coefficients beyond 0.1/0.9 after stage 1: {training.sigma_saturation:.1%}")
    if training.source_probes:
        bars = ", ".join(f"source {literal(label)} {score:.3f}" for label, score in training.source_probes.items())
        stage1 = float("nan") if training.stage1_val_macro_f1 is None else training.stage1_val_macro_f1
        console.print(f"  stage 1 val macro-F1 {stage1:.3f}; head-only probes: {bars}")
        if training.stage1_below_probe:
            console.print(f"  [yellow]warning:[/yellow] stage 1 ended below the head-only probe of source "
                          f"{literal(', '.join(training.stage1_below_probe))}")
    comparison = training.comparison
    if comparison:
        view = Table(title=f"did the merge pay? same budget and settings, seeds {literal(', '.join(map(str, comparison.seeds)))} "
                           "(mean ± std)", title_justify="left")
        columns = [f"{part} {label}" for part in (("test", "val") if comparison.split == "test" else ("val",))
                   for label in ("macro-F1", "accuracy")]
        view.add_column("method")
        for column in columns:
            view.add_column(column, justify="right")
        for row in comparison.methods:
            cells = []
            for column in columns:
                part, label = column.split(" ")
                score = row.scores.get(f"{part}_{'macro_f1' if label == 'macro-F1' else 'accuracy'}")
                cells.append("—" if score is None else (f"{score.mean:.3f} ± {score.std:.3f}"
                                                        if score.n_values > 1 else f"{score.mean:.3f}"))
            name = row.method + (" (this run)" if row.method == comparison.reference else "")
            view.add_row(literal(name), *cells)
        console.print(view)
        console.print(f"  {literal(comparison.verdict)}")
        best, kept = comparison.kept.get("best_single"), comparison.kept.get("runs") or []
        if best and best.get("path"):
            console.print(f"  best single source kept as a complete run: {literal(best['method'])} seed {best['seed']} "
                          f"in {literal(best['path'])}", soft_wrap=True)
        if len(kept) > (1 if best and best.get("path") in kept else 0):
            console.print(f"  {len(kept)} comparison runs kept in {literal(comparison.kept.get('directory'))}", soft_wrap=True)
        elif comparison.kept.get("policy") == "none":
            console.print("  the comparison runs were not kept (--keep-runs none)")


# --------------------------------------------------------------------------- fold


def print_refold(result: PublishedArtifact) -> None:
    """``fold --to safetensors|pt``: the check and the file, and whether it reproduced the previous fold."""
    print_verification(result.report)
    reproduced = {None: "", True: " (bit-identical to the training-time fold)", False: " (differs from the previous fold!)"}
    _wrote(f"{literal(str(result.path))}  sha256 {result.sha256[:16]}…{reproduced[result.reproduced]}")


def print_published(result: PublishedArtifact) -> None:
    """A verified artifact (ONNX, engine): its check, then path, size and hash."""
    print_verification(result.report)
    _wrote(f"{literal(str(result.path))}  {result.size_bytes / 1e6:.1f} MB  sha256 {result.sha256[:16]}…")


def print_onnx_exports(results: Iterable[PublishedArtifact]) -> None:
    """``fold --to onnx``: each exported precision's check, the layers int8 kept in float, the file (or UNVERIFIED)."""
    from mmexport.convert.precision import Int8Export

    for result in results:
        print_verification(result.report)
        floats = result.facts.float_layers() if isinstance(result.facts, Int8Export) else []
        if floats:
            console.print(f"  int8: {len(floats)} layer(s) kept in float to meet the policy: {literal(', '.join(floats))}",
                          soft_wrap=True)
        if not result.report.passed:
            console.print(f"[red]published UNVERIFIED (--allow-unverified)[/red]: {literal(str(result.path))}", soft_wrap=True)
            continue
        _wrote(f"{literal(str(result.path))}  {result.size_bytes / 1e6:.1f} MB  sha256 {result.sha256[:16]}…")


def print_comparison_model(kind: str, made: PublishedArtifact) -> None:
    state = "" if made.report is None else (" (verified)" if made.report.passed else " [red](FAILED its check)[/red]")
    _wrote(f"{kind} comparison model {literal(made.name)}  {made.size_bytes / 1e6:.1f} MB{state}")


def print_triton_export(result: RepositoryResult) -> None:
    """``fold --to triton``: the version written and each file's hash."""
    _wrote(f"{literal(result.name)} version {result.version} ({result.backend}, "
           f"max_batch_size {result.max_batch_size}) into {literal(str(result.repository))}")
    for relative, digest in result.files.items():
        console.print(f"  {literal(relative)}  sha256 {digest[:16]}…", soft_wrap=True)
    if result.compute_capabilities:
        console.print("  engines: " + ", ".join(f"sm {cc} → {literal(f)}" for cc, f in sorted(result.compute_capabilities.items())),
                      soft_wrap=True)


def print_monai_bundle(result: Any) -> None:
    """``fold --to monai-bundle``: each model file's check, MONAI's own check, the bundle and how the run records it."""
    for report in result.reports.values():
        print_verification(report)
    console.print(f"  MONAI verify_net_in_out: {literal(result.net_in_out)}", soft_wrap=True)
    what = "zip" if result.zipped else "folder"
    _wrote(f"MONAI Bundle ({what}) {literal(str(result.path))}" + (f"  sha256 {result.sha256[:16]}…" if result.sha256 else ""))
    for relative, digest in result.files.items():
        console.print(f"  {literal(relative)}  sha256 {digest[:16]}…", soft_wrap=True)
    where = "outputs of the run" if result.inside_run else "the run's manifest (monai_bundles: the sha256 of every file)"
    console.print(f"  recorded in {where}", soft_wrap=True)


# --------------------------------------------------------------------------- verify --manifest, inspect


def print_provenance(report: ProvenanceReport) -> None:
    """``verify --manifest``: every file against its recorded sha256, the inputs, the chains, the Triton repositories."""
    table = Table(title=f"files of {literal(report.run)} against manifest.json", title_justify="left")
    for column in ("file", "kind", "sha256 (manifest)", "state", "latest check"):
        table.add_column(column)
    for f in report.files:
        state = "[green]intact[/green]" if f.state == "intact" else f"[red]{literal(f.state)}[/red]" + (
            f" (now {f.actual_sha256[:12]}…)" if f.actual_sha256 else "")
        check = {True: "[green]passed[/green]", False: "[red]FAILED[/red]", None: "—"}[f.verified]
        table.add_row(literal(f.name), literal(f.kind), literal(f.expected_sha256[:16]) + "…", state, check)
    console.print(table)
    for name, recorded, state in report.inputs:
        colour = "green" if state == "unchanged" else ("red" if state.startswith("CHANGED") else "yellow")
        console.print(f"input {literal(name)}: sha256 {literal(recorded[:16])}…  [{colour}]{literal(state)}[/{colour}]", soft_wrap=True)
    for chain in report.chains:
        console.print("chain: " + literal(" ← ".join(chain)), soft_wrap=True)
    for target, state, detail in report.repositories:
        colour = "green" if state == "intact" else "red"
        console.print(f"exported {literal(target)}: [{colour}]{literal(state)}[/{colour}] {literal(detail)}", soft_wrap=True)
    for name, state, detail in report.embedded:  # what each deployable file says of itself (docs/deploying.md)
        colour = {"matches": "green", "differs": "red"}.get(state, "yellow")
        console.print(f"embedded provenance of {literal(name)}: [{colour}]{literal(state)}[/{colour}] {literal(detail)}",
                      soft_wrap=True)
    # every unlisted file that would be read is shown (they fail the check); of the others, the first ten
    others = [u for u in report.untracked if not u.read_by_mmexport]
    for item in report.unexpected + others[:10]:
        colour = "red" if item.read_by_mmexport else "yellow"
        console.print(f"[{colour}]not in the manifest[/{colour}]: {literal(item.name)}: {literal(item.why)}", soft_wrap=True)
    if len(others) > 10:
        console.print(f"[yellow]not in the manifest[/yellow]: {len(others) - 10} more file(s) not part of the run, "
                      "not read by mmexport", soft_wrap=True)


def print_run_summary(summary: RunSummary, *, all_parameters: bool = False,
                      final_saturation: float | None = None) -> None:
    """``inspect``: the run, its inputs, outputs and checks, the training report and the merge coefficients.

    ``final_saturation``: the share of saturated coefficients of the final fold, shown when
    training recorded none; ``all_parameters``: every merged parameter, not only conv weights.
    """
    console.print(f"[bold]{literal(summary.path)}[/bold]  created {literal(summary.created)}  by `{literal(summary.command)}`",
                  soft_wrap=True)
    console.print(f"arch {literal(summary.arch)}  classes {literal(', '.join(map(str, summary.classes)))}  "
                  f"image {literal(summary.image_size)}px  granularity {literal(summary.granularity)}  "
                  f"seed {literal(summary.seed)}", soft_wrap=True)
    if summary.preprocessing is not None:
        console.print(f"preprocessing: {literal(summary.preprocessing.describe())}", soft_wrap=True)
    if summary.model_card is not None:
        console.print(f"model card: {literal(summary.model_card)}", soft_wrap=True)
    inputs = Table(title="inputs", title_justify="left")
    for column in ("input", "spec", "sha256"):
        inputs.add_column(column)
    for record in summary.inputs:
        digest = {"generated": "(generated)"}.get(record.hashed, "—") if record.sha256 is None else \
            record.sha256[:16] + (" (content)" if record.hashed == "content" else "")
        inputs.add_row(literal(record.name), literal(record.spec), literal(digest))
    console.print(inputs)
    outputs = Table(title="outputs", title_justify="left")
    for column in ("file", "kind", "deployable", "size", "sha256", "state"):
        outputs.add_column(column)
    for out in summary.outputs:
        state = "[green]intact[/green]" if out.intact else f"[red]{literal(out.state)}[/red]"
        if out.verified is False:
            state += " [yellow](unverified)[/yellow]"
        outputs.add_row(literal(out.name), literal(out.kind), "yes" if out.deployable else "",
                        f"{out.size_bytes / 1e6:.1f} MB", literal(out.sha256[:16]), state)
    console.print(outputs)
    checks = Table(title="verification (latest check of each published artifact)", title_justify="left")
    for column in ("artifact", "policy", "when", "max abs error", "top-1", "result"):
        checks.add_column(column)
    for check in summary.verifications:
        checks.add_row(
            literal(check.artifact), literal(check.policy), literal(check.created),
            "—" if check.max_abs_error is None else f"{check.max_abs_error:.3g}",
            "—" if check.top1_agreement is None else f"{check.top1_agreement:.1%}",
            "[green]pass[/green]" if check.passed else "[red]FAIL[/red]",
        )
    console.print(checks)
    print_final_metrics(summary.final_metrics)
    print_training_report(summary.training)
    if final_saturation is not None:
        console.print(f"  merge coefficients beyond 0.1/0.9 (final fold): {final_saturation:.1%}")
    if summary.coefficients is None and summary.has_unmerged:
        console.print("merge coefficients: PyTorch is not installed here, so the per-layer profile is not shown")
    rows = [r for r in (summary.coefficients or []) if all_parameters or (r["layer"] == "conv" and r["name"].endswith("weight"))]
    agreement = summary.training.comparison.sigma_agreement if summary.training.comparison else None
    per_layer = (agreement or {}).get("layers") or {}
    if rows:
        table = Table(title="mean weight of source A, σ(λ), input → output; its spread over the layer's coefficients"
                            + (" and agreement across seeds (r)" if per_layer else ""), title_justify="left")
        numeric = ("#", "σ(λ)", "σ std", "beyond 0.4/0.6", "saturated", "seeds r")
        for column in ("#", "parameter", "layer", "σ(λ)", "σ std", "beyond 0.4/0.6", "saturated",
                       *(("seeds r",) if per_layer else ()), ""):
            table.add_column(column, justify="right" if column in numeric else "left")
        for index, row in enumerate(rows):
            bar = round(20 * row["mean"])
            spread = [_fmt(row.get("std"), ".3f"), "—" if row.get("off_centre") is None else f"{row['off_centre']:.0%}"]
            seeds_r = [_fmt(per_layer.get(row["name"]), "+.2f")] if per_layer else []
            table.add_row(str(index), literal(row["name"]), literal(row["layer"]), f"{row['mean']:.3f}", *spread,
                          f"{row['saturated']:.0%}", *seeds_r, "A " + "█" * bar + "·" * (20 - bar) + " B")
        console.print(table)
    if agreement:
        overall = agreement.get("overall")
        console.print(f"merge coefficients across seeds {literal(', '.join(map(str, agreement.get('seeds', []))))}: "
                      f"r = {_fmt(overall, '+.2f')} over every coefficient (1: the same kernels lean to the same "
                      "source in every seed; 0: unrelated choices)", soft_wrap=True)


# --------------------------------------------------------------------------- bench, doctor, serve, demo


def print_bench(report: BenchReport) -> None:
    """``bench``: the timings, trtexec's GPU statistics where there are any, the headline ratios, the warnings."""
    console.print(bench_table(report))
    if any(r.device for r in report.results):
        console.print(device_table(report))
    console.print(ratio_table_view(report))
    for warning in report.warnings():
        console.print(f"[yellow]warning[/yellow] {literal(warning)}", soft_wrap=True)


def print_predictions(report: PredictReport) -> None:
    """``predict``: the model and its verification, then one row per file (its answer, or its one-line error)."""
    model = report.model
    colour = "green" if model.verified else "red"
    console.print(f"model {literal(str(model.path))}  sha256 {literal(model.sha256[:16])}…  "
                  f"[{colour}]{literal(model.verification)}[/{colour}]", soft_wrap=True)
    table = Table(title_justify="left")
    for column in ("file", "label", "probability", f"top {report.top}"):
        table.add_column(column, justify="right" if column == "probability" else "left")
    if report.sr_out is not None:
        table.add_column("SR")
    for row in report.rows:
        if row.label is None:
            cells = [literal(row.file), "[red]error[/red]", "—", f"[red]{literal(row.error)}[/red]"]
        else:
            ranked = ", ".join(f"{literal(label)} {p:.3f}" for label, p in row.top)
            cells = [literal(row.file), literal(row.label), f"{row.probability:.3f}", ranked]
        if report.sr_out is not None:
            if row.sr is not None:
                cells.append(literal(Path(row.sr).name))
            elif row.label is not None and row.error is not None:
                cells.append(f"[red]{literal(row.error)}[/red]")
            else:
                cells.append(literal(row.note or "—"))
        table.add_row(*cells)
    console.print(table)
    if report.sr_out is not None:
        written = sum(row.sr is not None for row in report.rows)
        console.print(f"{written} Structured Report(s) in {literal(str(report.sr_out))} (not for clinical use)", soft_wrap=True)


def print_written(path: str | os.PathLike[str]) -> None:
    console.print(f"[green]wrote[/green] {literal(str(path))}")


def print_doctor(report: DoctorReport, run: Path | None = None) -> None:
    """``doctor``: what this machine can do and, for a run, which of its artifacts can run here."""
    table = Table(title="this machine", title_justify="left")
    for column in ("component", "", "detail"):
        table.add_column(column)
    for cap in report.capabilities:
        table.add_row(literal(cap.name), "[green]yes[/green]" if cap.available else "[red]no[/red]", literal(cap.detail))
    console.print(table)
    if run is not None:
        runs = Table(title=f"artifacts of {literal(str(run))}", title_justify="left")
        for column in ("file", "runs here", "how / why not"):
            runs.add_column(column)
        for name, ok, why in report.artifacts:
            runs.add_row(literal(name), "[green]yes[/green]" if ok else "[red]no[/red]", literal(why))
        console.print(runs)


def print_serving(session: ServingSession) -> None:
    """``serve``: what is served from where, the endpoints, and how to classify an image."""
    origin = f"{session.run.name}/{session.artifact}" if session.run is not None else session.artifact
    state = ("[green]verified[/green]" if session.verified
             else "[yellow]untracked: not checked against a run's verification[/yellow]")
    console.print(f"[bold]{literal(session.model)}[/bold] version {session.version} serving {literal(origin)} ({state})",
                  soft_wrap=True)
    table = Table(title="Triton Inference Server", title_justify="left")
    table.add_column("endpoint")
    table.add_column("address")
    table.add_row("HTTP/REST (KServe v2)", literal(session.http_url))
    table.add_row("gRPC", literal(session.grpc_url))
    table.add_row("metrics", literal(session.metrics_url))
    table.add_row("inference", literal(session.infer_url))
    table.add_row("repository", literal(str(session.repository)) + (" (temporary)" if session.temporary_repository else ""))
    console.print(table)
    console.print("classify an image (top 3 classes as score:index:label):")
    console.print(one_line(session.curl_example("lesion.png")), markup=False, highlight=False, soft_wrap=True)
    console.print("Ctrl-C stops the server.")


def print_serving_preparation(prepared: ServingPreparation) -> None:
    """``prepare-serving``: the server found, and the Python environment its Python backend will use."""
    console.print(f"tritonserver: {literal(prepared.installation.describe())}", soft_wrap=True)
    if prepared.configured is not None:
        console.print(f"Python of the Python backend: ${literal('MMEXPORT_TRITON_PYTHON')}={literal(prepared.configured)} "
                      "(used as is)", soft_wrap=True)
    elif prepared.environment is None:
        console.print("Python of the Python backend: this interpreter as it is (nothing to prepare)", soft_wrap=True)
    else:
        state = "created" if prepared.created else "already prepared"
        console.print(f"Python of the Python backend ({literal(', '.join(prepared.requirements))}): {state} in "
                      f"{literal(str(prepared.environment))}", soft_wrap=True)
    console.print("[green]ready to serve[/green]: `mmexport serve RUN` runs no pip")


def print_demo(summary: DemoSummary) -> None:
    """``demo``: each step's result and time, the benchmark headline, MedMerge against each source alone."""
    table = Table(title="demo summary", title_justify="left")
    table.add_column("step")
    table.add_column("result")
    table.add_column("time", justify="right")
    t = summary.timings
    for label in ("A", "B"):
        s = summary.sources[label]
        table.add_row(f"source {label} ({s['task']})", f"val acc {s['val_accuracy']:.3f}  macro-F1 {s['val_macro_f1']:.3f}", f"{t[f'source_{label}']:.0f} s")
    mb = summary.merge_best
    table.add_row("stage 1 merge (best epoch)", f"val acc {mb['val_accuracy']:.3f}  macro-F1 {mb['val_macro_f1']:.3f}", "")
    table.add_row("MedMerge run", literal(summary.run), f"{t['train']:.0f} s")
    for name, stats in summary.fold_stats.items():
        table.add_row(f"fold check ({name})", f"max abs err {stats.max_abs_error:.3g}, top-1 {stats.top1_text()}", "")
    table.add_row("fold + verify", "bit-identical re-fold" if summary.fold_reproduced else "re-folded", f"{t['fold_verify']:.0f} s")
    for export in summary.exports:
        for name, stats in export.stats.items():
            detail = f"max abs err {stats.max_abs_error:.3g}, top-1 {stats.top1_text()}"
            if stats.candidate_macro_f1 is not None:
                detail += f", macro-F1 {stats.reference_macro_f1:.3f} → {stats.candidate_macro_f1:.3f}"
            table.add_row(f"ONNX {export.precision} ({name})", detail, "")
        if export.refused is not None:
            table.add_row(f"ONNX {export.precision}", f"[red]refused by the {export.precision} policy, not published[/red]: "
                          f"{literal(export.refused.split(': ')[-1])}", "")
        else:
            table.add_row(f"ONNX {export.precision} file", f"{export.size_bytes / 1e6:.1f} MB", "")
    if "export" in t:
        table.add_row("export + verify", "", f"{t['export']:.0f} s")
    console.print(table)
    if summary.bench is not None:
        console.print(ratio_table_view(summary.bench))
        for r in summary.bench.results:
            console.print(f"  {r.model:9s} ONNX Runtime batch 1: median {r.latency.median_ms:.2f} ms, file "
                          f"{(r.artifact_bytes or 0) / 1e6:.1f} MB", soft_wrap=True)
    comparison = Table(title="MedMerge vs each source fine-tuned alone (same epochs), synthetic target", title_justify="left")
    for column in ("method", "test macro-F1", "test accuracy", "val macro-F1"):
        comparison.add_column(column, justify="left" if column == "method" else "right")
    labels = {"medmerge": "medmerge (A+B merged)", "finetune-a": "finetune-a (source A alone)",
              "finetune-b": "finetune-b (source B alone)"}
    for method, metrics in summary.comparison.items():
        test = metrics.get("test", metrics["val"])
        comparison.add_row(labels.get(method, method), f"{test['macro_f1']:.3f}", f"{test['accuracy']:.3f}",
                           f"{metrics['val']['macro_f1']:.3f}")
    console.print(comparison)
    gap = summary.merge_gap()
    if gap is not None:
        console.print(f"  MedMerge − best single source ({gap[0]}): {gap[1]:+.3f} test macro-F1, one seed; "
                      "`mmexport train --compare --seeds 0,1,2` judges it against the seed spread", soft_wrap=True)
    console.print(f"total {sum(t.values()):.0f} s; everything is in {literal(summary.out)} (see `mmexport inspect {literal(summary.run)}`)",
                  soft_wrap=True)
