"""The project's import graph, read from the source (``ast``, nothing is imported), and the layer
rules of docs/ARCHITECTURE.md checked against it.

    python -m tests.import_graph        # prints every broken rule and cycle; exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stable_sam", "labelstudio", "runtime", "training", "backend", "bench", "tests")

# What each package may import of the project's packages (itself always). Listed bottom up.
ALLOWED: dict[str, frozenset[str]] = {
    "stable_sam": frozenset(),
    "labelstudio": frozenset(),
    "runtime": frozenset({"stable_sam", "labelstudio"}),
    "training": frozenset({"stable_sam", "labelstudio", "runtime"}),
    "backend": frozenset({"stable_sam", "labelstudio", "runtime"}),
    "bench": frozenset({"stable_sam", "labelstudio", "runtime", "training", "backend"}),
    "tests": frozenset(PACKAGES),
}
# Third-party packages a package must not import (the adapter: no torch, no web framework).
FORBIDDEN_THIRD_PARTY: dict[str, frozenset[str]] = {
    "labelstudio": frozenset({"torch", "torchvision", "segment_anything", "fastapi", "starlette"}),
    "stable_sam": frozenset({"fastapi", "starlette", "redis", "rq", "httpx"}),
    "runtime": frozenset({"fastapi", "starlette"}),
    "training": frozenset({"fastapi", "starlette"}),
}


@dataclass(frozen=True)
class Import:
    source: str  # dotted module name of the importing file
    target: str  # dotted module name imported (the longest prefix that is a project module)
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding an attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            for alias in node.names:
                yield f"{prefix}.{alias.name}", node.lineno
            yield prefix, node.lineno


def imports(modules: dict[str, Path] | None = None) -> list[Import]:
    """Every import in the project's files, with where it points (module level and inside
    functions alike: a deferred import is still a dependency)."""
    modules = modules if modules is not None else project_modules()
    found: set[Import] = set()
    third_party: set[Import] = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in _imported_names(tree, module, path.name == "__init__.py"):
            target = _resolve(name, modules)
            if target is None:
                third_party.add(Import(module, name.split(".")[0], line))
            elif target != module:
                found.add(Import(module, target, line))
    return sorted(found | third_party, key=lambda i: (i.source, i.line, i.target))


def layer_violations(edges: list[Import]) -> list[str]:
    problems = []
    for edge in edges:
        source_pkg = edge.source.split(".")[0]
        target_pkg = edge.target.split(".")[0]
        if target_pkg in PACKAGES:
            if target_pkg != source_pkg and target_pkg not in ALLOWED[source_pkg]:
                problems.append(f"{edge.source}:{edge.line} imports {edge.target}")
        elif target_pkg in FORBIDDEN_THIRD_PARTY.get(source_pkg, ()):
            problems.append(f"{edge.source}:{edge.line} imports {target_pkg}")
    return problems


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.target.split(".")[0] in PACKAGES:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def main() -> int:
    modules = project_modules()
    edges = imports(modules)
    problems = layer_violations(edges)
    found_cycles = cycles(edges)
    for problem in problems:
        print("layer:", problem)
    for component in found_cycles:
        print("cycle:", " <-> ".join(component))
    return 1 if problems or found_cycles else 0


if __name__ == "__main__":
    raise SystemExit(main())
