"""The import graph of Tailor's own packages: every import of one module by another, those under
`TYPE_CHECKING` and inside functions included, read from the source (nothing is imported).

    .venv/bin/python -m tests.architecture      # levels, cycles and lines per package

A module's level is 0 when it imports none of the project's modules, else one more than the highest
level it imports; a cycle makes every module on it unlevelled.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "index_builder", "tailor")

Graph = dict[str, set[str]]


def modules(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages (a package is its __init__)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, known: set[str]) -> Iterator[str]:
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` imports the module; `from module import name` the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            target = name
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                yield target


def graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Graph:
    found = modules(root, packages)
    known = set(found)
    return {module: set(_imported(module, path, known)) for module, path in found.items()}


def cycles(edges: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for node in sorted(edges):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def levels(edges: Graph) -> dict[str, int]:
    """Each module's level (see the module docstring); modules on or above a cycle are left out."""
    level: dict[str, int] = {}
    remaining = dict(edges)
    while remaining:
        ready = [m for m, targets in remaining.items() if all(t in level for t in targets)]
        if not ready:
            break
        for module in ready:
            level[module] = 1 + max((level[t] for t in remaining[module]), default=-1)
            del remaining[module]
    return level


def lines_per_package(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, tuple[int, int]]:
    """Package -> (modules, lines), each package counting only its own files (not its subpackages')."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for module, path in modules(root, packages).items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        totals[package][0] += 1
        totals[package][1] += len(path.read_text().splitlines())
    return {package: (count, lines) for package, (count, lines) in sorted(totals.items())}


def main() -> None:
    edges = graph()
    level = levels(edges)
    loops = cycles(edges)
    print("package                          modules   lines")
    for package, (count, lines) in lines_per_package().items():
        print(f"{package:32s} {count:7d} {lines:7d}")
    print(f"\nimport levels: {max(level.values(), default=-1) + 1} (modules levelled: {len(level)} of {len(edges)})")
    print(f"import cycles: {len(loops)}")
    for loop in loops:
        print("  " + " <-> ".join(loop))


if __name__ == "__main__":
    main()
