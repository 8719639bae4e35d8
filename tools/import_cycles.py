"""Import cycles among the modules of a package, found from the source with ``ast``.

    python tools/import_cycles.py [PACKAGE_DIR]     # default: kvtier/ beside this folder

Every ``import`` and ``from ... import`` counts, at any depth: inside a function, a method or an
``if TYPE_CHECKING:`` block alike (a lazy import is still a dependency, and a type-only one still
ties the two modules' designs together). Relative imports are resolved against the importing
module. ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``; importing
``a.b`` is not counted as importing ``a`` (the parent package's ``__init__``), as in grimp.
Symbolic links to folders are followed: ``kvtier/server`` and ``kvtier/bench`` are links to the
repository's ``server/`` and ``bench/``, which install as ``kvtier.server`` and ``kvtier.bench``.

Prints each cycle (one shortest loop per strongly connected group, with the importing lines) and
exits 1 if there is any, else 0.
"""

from __future__ import annotations

import ast
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement's dependency: ``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str  # absolute dotted name as written (resolved if relative); may be third-party
    path: Path
    line: int


def modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package rooted at ``package_dir``: dotted name -> file. A compiled
    module counts by its stub (``x.pyi`` with no ``x.py``: ``kvtier/_fastcopy.c``)."""
    root = package_dir.name
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(package_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel = Path(dirpath).relative_to(package_dir).parts
        for f in sorted(filenames):
            stub = f.endswith(".pyi") and f[:-1] not in filenames
            if not (f.endswith(".py") or stub):
                continue
            stem = f[:-4] if stub else f[:-3]
            parts = (root, *rel) if f == "__init__.py" else (root, *rel, stem)
            found[".".join(parts)] = Path(dirpath) / f
    return found


def imports(mods: dict[str, Path]) -> list[Import]:
    """Every import statement of every module, with relative names made absolute."""
    out: list[Import] = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [Import(name, a.name, path, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                out += [Import(name, f"{base}.{a.name}" if a.name != "*" else base, path, node.lineno)
                        for a in node.names]
    return out


def graph(mods: dict[str, Path], imps: list[Import]) -> dict[str, dict[str, Import]]:
    """Edges between the package's own modules: importer -> {imported module: first import}."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in mods}
    for imp in imps:
        target = imp.target
        while target and target not in mods:  # a.b.NAME -> a.b; a namespace package -> nothing
            target = target.rpartition(".")[0]
        if target and target != imp.source:
            edges[imp.source].setdefault(target, imp)
    return edges


def strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(groups)


def shortest_loop(edges: dict[str, dict[str, Import]], group: list[str]) -> list[Import]:
    """One shortest cycle through the group's first module, as the imports that make it."""
    start, members = group[0], set(group)
    came: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w, imp in edges[v].items():
            if w not in members:
                continue
            if w == start:
                loop = [imp]
                while loop[0].source != start:
                    loop.insert(0, came[loop[0].source])
                return loop
            if w not in came:
                came[w] = imp
                queue.append(w)
    raise AssertionError(f"{group} is not strongly connected")


@dataclass(frozen=True, slots=True)
class Cycle:
    """Modules that import each other (directly or not), and one shortest loop among them."""

    modules: tuple[str, ...]
    loop: tuple[Import, ...]


def cycles(package_dir: Path) -> list[Cycle]:
    """The groups of the package's modules that import each other, each with one loop."""
    mods = modules(package_dir)
    edges = graph(mods, imports(mods))
    return [Cycle(tuple(g), tuple(shortest_loop(edges, g))) for g in strongly_connected(edges)]


def describe(cycle: Cycle, root: Path | None = None) -> str:
    def where(imp: Import) -> str:
        p = imp.path
        if root is not None:
            p = Path(os.path.relpath(p, root))
        return f"{p}:{imp.line}"

    loop = cycle.loop
    names = " -> ".join([i.source for i in loop] + [loop[0].source])
    lines = "\n".join(f"    {where(i)}: {i.source} imports {i.target}" for i in loop)
    return f"cycle among {', '.join(cycle.modules)}\n  shortest: {names}\n{lines}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    here = Path(__file__).resolve().parents[1]
    package_dir = Path(args[0]) if args else here / "kvtier"
    found = cycles(package_dir)
    for cycle in found:
        print(describe(cycle, Path.cwd()))
    print(f"{len(found)} import cycle(s) in {package_dir.name}" if found
          else f"no import cycle in {package_dir.name}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
