"""Regenerate the performance section of ``docs/measured.md`` from the committed benchmark results.

    python benchmarks/update_readme.py

Copies ``benchmarks/results/speed-*.md`` and ``train_step-*.md`` (newest of each)
between the ``<!-- perf:start -->`` / ``<!-- perf:end -->`` markers of ``docs/measured.md``
(the README links there), demoting headings; links are relative to that document.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf:start -->", "<!-- perf:end -->"
DOC = ROOT / "docs" / "measured.md"


def newest(pattern: str) -> Path | None:
    files = sorted((ROOT / "benchmarks" / "results").glob(pattern), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def section() -> str:
    parts = []
    for pattern in ("speed-*.md", "train_step-*.md"):
        path = newest(pattern)
        if path is not None:
            text = re.sub(r"^# ", "### ", path.read_text().strip(), flags=re.M)
            link = Path(os.path.relpath(path, DOC.parent)).as_posix()
            parts.append(f"{text}\n\n(from [`{path.relative_to(ROOT).as_posix()}`]({link}))")
    return "\n\n".join(parts)


def main() -> None:
    text = DOC.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC.relative_to(ROOT)} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{section()}\n{END}{tail}")


if __name__ == "__main__":
    main()
