"""One progress/event channel for every long library call (training, export, calibration, benchmarking).

The library reports through a :class:`ProgressSink` and never prints; the CLI passes
one that draws rich progress bars and lines. Diagnostics that are not progress go
through ``logging.getLogger(__name__)`` of the module that has them.
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressSink(Protocol):
    def start(self, description: str, total: int) -> None:
        """A task of ``total`` steps begins (a bar)."""

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current task are done."""

    def finish(self) -> None:
        """The current task is over (the bar goes away)."""

    def epoch(self, record: dict[str, Any]) -> None:
        """One training epoch's record (stage, epoch, train loss, val accuracy, val macro F1, lr)."""

    def message(self, text: str) -> None:
        """One line worth showing the user (what is being done now, a result)."""


class SilentProgress:
    """The default sink: drops everything."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def finish(self) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class OnceProgress:
    """Forwards everything to ``inner`` but a message it has already forwarded.

    For a command that runs the same step many times (``train --compare``: every run
    describes the same data and sources): each line is shown once.
    """

    def __init__(self, inner: ProgressSink) -> None:
        self.inner = inner
        self.shown: set[str] = set()

    def start(self, description: str, total: int) -> None:
        self.inner.start(description, total)

    def advance(self, steps: int = 1) -> None:
        self.inner.advance(steps)

    def finish(self) -> None:
        self.inner.finish()

    def epoch(self, record: dict[str, Any]) -> None:
        self.inner.epoch(record)

    def message(self, text: str) -> None:
        if text not in self.shown:
            self.shown.add(text)
            self.inner.message(text)


def sink(progress: ProgressSink | None) -> ProgressSink:
    return progress if progress is not None else SilentProgress()


__all__ = ["OnceProgress", "ProgressSink", "SilentProgress", "sink"]
