"""Rich rendering shared by the commands: progress sink and result tables."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mmexport.verify import VerificationReport

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
        console.print(
            f"  {record['stage']:<22} epoch {record['epoch']:>2}  loss {record['train_loss']:.4f}  "
            f"val acc {record['val_accuracy']:.3f}  val macro-F1 {record['val_macro_f1']:.3f}",
            soft_wrap=True,
        )

    def message(self, text: str) -> None:
        console.print(f"  {text}", soft_wrap=True)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def verification_table(report: VerificationReport) -> Table:
    tol = report.tolerance
    limits = (
        f"rtol {tol.rtol:g}, atol {tol.atol:g}, " if tol.rtol is not None else ""
    ) + f"top-1 ≥ {tol.min_top1_agreement:.1%}" + (
        f", macro-F1 drop ≤ {100 * tol.max_macro_f1_drop:g} pt" if tol.max_macro_f1_drop is not None else ""
    )
    table = Table(title=f"{report.candidate} vs {report.reference}  [{tol.name}: {limits}]", title_justify="left")
    for column in ("inputs", "output", "N", "max abs", "mean abs", "p99 abs", "max rel", "min cos", "top-1", "NaN/Inf", "result"):
        table.add_column(column, justify="right" if column not in ("inputs", "output", "result") else "left")
    for input_set in report.input_sets:
        for output, stats in input_set.outputs.items():
            table.add_row(
                input_set.name, output, str(stats.n_samples), _fmt(stats.max_abs_error), _fmt(stats.mean_abs_error),
                _fmt(stats.p99_abs_error), _fmt(stats.max_rel_error), _fmt(stats.min_cosine, ".6f"),
                f"{stats.top1_agreement:.1%}", f"{stats.nan_count}/{stats.inf_count}",
                "[green]pass[/green]" if stats.passed else "[red]FAIL[/red]",
            )
    return table


def bench_table(report: dict) -> Table:
    table = Table(title=f"{report['engine']} {report['precision']} — {report['machine'].get('cpu_model', '')}", title_justify="left")
    for column in ("model", "batch", "median ms", "mean ms", "p90", "p95", "p99", "min", "max", "CV", "images/s",
                   "load s", "size MB", "+peak RSS MB", "n"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in report["results"]:
        lat = r.latency
        table.add_row(
            r.model, str(r.batch_size), f"{lat.median_ms:.2f}", f"{lat.mean_ms:.2f}", f"{lat.p90_ms:.2f}",
            f"{lat.p95_ms:.2f}", f"{lat.p99_ms:.2f}", f"{lat.min_ms:.2f}", f"{lat.max_ms:.2f}",
            ("[yellow]" if lat.cv > 0.1 else "") + f"{lat.cv:.1%}", f"{lat.throughput_ips:.1f}", f"{r.load_s:.2f}",
            "—" if r.artifact_bytes is None else f"{r.artifact_bytes / 1e6:.1f}",
            "—" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / 1e6:.0f}", str(lat.iterations),
        )
    return table


def ratio_table_view(report: dict) -> Table:
    table = Table(title="headline: median latency ratios (1.00 = same cost)", title_justify="left")
    for column in ("batch", "ratio", "median", "mean"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for row in report["ratios"]:
        table.add_row(str(row["batch_size"]), row["ratio"], f"{row['median_ratio']:.3f}", f"{row['mean_ratio']:.3f}")
    return table
