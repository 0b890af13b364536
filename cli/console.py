"""Rich rendering shared by the commands: progress sink and result tables."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from mmexport.runtime.compare import VerificationReport

# Piped output (CI logs, files) would otherwise be cut at 80 columns, truncating the numbers
# an auditor reads; an explicit COLUMNS still wins.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
console = Console(width=_WIDTH)
error_console = Console(stderr=True)


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
        console.print(f"  {escape(text)}", soft_wrap=True)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def verification_table(report: VerificationReport) -> Table:
    """One column per input set and output, one row per statistic: readable at any terminal width."""
    tol = report.tolerance
    table = Table(title=escape(f"{report.candidate} vs {report.reference}  [{tol.name}: {tol.describe()}]"),
                  title_justify="left")
    table.add_column("statistic", no_wrap=True)
    cells = [(input_set.name, output, stats) for input_set in report.input_sets for output, stats in input_set.outputs.items()]
    for name, output, _ in cells:
        table.add_column(escape(name if output == "logits" else f"{name}/{output}"), justify="right", no_wrap=True)
    rows = [
        ("N", lambda st: str(st.n_samples)),
        ("max abs error", lambda st: _fmt(st.max_abs_error)),
        ("mean abs error", lambda st: _fmt(st.mean_abs_error)),
        ("p99 abs error", lambda st: _fmt(st.p99_abs_error)),
        ("max rel error", lambda st: _fmt(st.max_rel_error)),
        ("min / mean cosine", lambda st: f"{_fmt(st.min_cosine, '.6f')} / {_fmt(st.mean_cosine, '.6f')}"),
        ("top-1 agreement", lambda st: f"{st.top1_agreement:.1%}"),
        ("top-k agreement", lambda st: "—" if not st.topk else f"{st.topk_agreement:.1%} (k={st.topk})"),
        ("macro-F1 ref → cand", lambda st: "—" if st.reference_macro_f1 is None
         else f"{st.reference_macro_f1:.3f} → {st.candidate_macro_f1:.3f}"),
        ("NaN / Inf", lambda st: f"{st.nan_count} / {st.inf_count}"),
        ("result", lambda st: "[green]pass[/green]" if st.passed else "[red]FAIL[/red]"),
    ]
    for label, render in rows:
        table.add_row(label, *(render(stats) for _, _, stats in cells))
    if report.notes:
        table.caption = escape("FAIL: " + "; ".join(report.notes))
    return table


def bench_table(report) -> Table:
    table = Table(title=f"{report.engine} {report.precision} — {escape(report.machine.get('cpu_model', ''))}",
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
    for column in ("batch", "ratio", "median", "mean"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for row in report.ratios:
        table.add_row(str(row["batch_size"]), row["ratio"], f"{row['median_ratio']:.3f}", f"{row['mean_ratio']:.3f}")
    return table
