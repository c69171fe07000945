"""The house rules of the layout, checked on the source: sketchstore imports nothing of cropi or
the CLI, no project module imports in a cycle (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sketchstore", "cropi", "cli")


def module_imports() -> dict[str, set[str]]:
    """Project module -> every project name it imports anywhere in its body (packages included)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).glob("*.py"):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            targets = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        base = ".".join([package, base]) if base else package
                    targets.add(base)
                    targets.update(f"{base}.{alias.name}" for alias in node.names)
            graph[name] = {t for t in targets if t.split(".")[0] in PACKAGES and t != name}
    return graph


def test_sketchstore_imports_no_cropi_and_no_cli():
    graph = module_imports()
    leaks = {m: sorted(t for t in ts if not t.startswith("sketchstore")) for m, ts in graph.items()
             if m.startswith("sketchstore")}
    assert not any(leaks.values()), leaks


def test_no_import_cycles():
    raw = module_imports()
    modules = set(raw) - set(PACKAGES)  # a package's __init__ re-exports its modules: not an edge of its own
    graph = {m: {t for t in targets if t in modules} for m, targets in raw.items() if m in modules}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])  # the modules in progress are the path
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
