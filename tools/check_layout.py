"""Check the package's layering: no import circles, no import running back up a layer.

Every ``import`` in ``mmexport/`` and ``cli/`` counts, at module level or inside a function:
an import hidden in a function to dodge a circle is still a circle. Run it as
``python tools/check_layout.py`` (exit 1 on any finding); the tests run it too.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layers, lowest first. A module may import its own layer and the layers below it, never above.
# The first matching prefix decides a module's layer (longest prefixes first).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("mmexport.errors", "mmexport.jsonread", "mmexport.progress", "mmexport.config", "mmexport.fileio",
                "mmexport.artifacts", "mmexport.environment", "mmexport.plots")),
    ("runtime", ("mmexport.runtime",)),
    ("convert", ("mmexport.convert",)),
    ("runs", ("mmexport.runs",)),
    ("serving", ("mmexport.serving",)),
    ("torchside", ("mmexport.torchside",)),
    ("top", ("mmexport.bench", "mmexport.demo", "mmexport.cli", "mmexport.__main__")),
]
PACKAGE_ROOTS = {"mmexport": ROOT / "mmexport", "mmexport.cli": ROOT / "cli"}


@dataclass(frozen=True)
class Finding:
    kind: str  # "circle" or "upward"
    text: str


def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name (cli/ is installed as mmexport.cli)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    stem = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{alias.name}" for alias in node.names] or [stem]
            for target in targets:
                resolved = _resolve(target, modules)
                # a package's own __init__ re-exporting its children is not a dependency of the child on it
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def layer_of(module: str) -> int:
    if module == "mmexport":  # the root package holds only the version: ground
        return 0
    best = (-1, -1)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = (index, len(prefix))
    return best[0]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def findings() -> list[Finding]:
    graph = import_graph()
    result = [Finding("circle", " <-> ".join(component)) for component in circles(graph)]
    for source, targets in sorted(graph.items()):
        if layer_of(source) < 0:
            result.append(Finding("unplaced", f"{source} is in no layer of tools/check_layout.py"))
            continue
        for target in sorted(targets):
            if layer_of(target) > layer_of(source):
                result.append(Finding("upward", f"{source} ({LAYERS[layer_of(source)][0]}) imports "
                                                f"{target} ({LAYERS[layer_of(target)][0]})"))
    return result


def main() -> int:
    problems = findings()
    for problem in problems:
        print(f"{problem.kind}: {problem.text}")
    kinds = {kind: sum(p.kind == kind for p in problems) for kind in ("circle", "upward", "unplaced")}
    print(f"{len(module_files())} modules; " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
