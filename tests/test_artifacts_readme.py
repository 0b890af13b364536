"""The README's registry table lists exactly the registry's files (it is the user's map of a run)."""

from __future__ import annotations

import re
from pathlib import Path

from mmexport import artifacts

README = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "docs" / "run-directory.md"


def test_readme_registry_table_lists_every_registry_file():
    text = README.read_text()
    section = text[text.index("**The registry**"):text.index("**Verification in two steps.**")]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            listed.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    expected = set()
    for row in artifacts.REGISTRY.values():
        expected.add(row.filename)
        if row.sidecar:
            expected.add(row.sidecar)
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))
