"""The package's import graph has no cycles, counting imports inside functions too.

A cycle hidden in a function-level import works until someone moves the import to the top; it
also means two modules each hold half of one concern. The graph is read from the source (ast),
not from `sys.modules`, so lazy imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tinyr1

PACKAGE_ROOT = Path(tinyr1.__file__).resolve().parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its source (functions included)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycles(root: Path, package: str) -> list[list[str]]:
    """Every import cycle, each as a path `a -> b -> ... -> a` (one per strongly connected group)."""
    modules = module_names(root, package)
    graph = {name: sorted(imports_of(name, path, modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                groups.append(group)

    for v in graph:
        if v not in index:
            connect(v)
    return [_cycle_path(graph, set(g)) for g in groups]


def _cycle_path(graph: dict[str, list[str]], group: set[str]) -> list[str]:
    """One concrete cycle inside a strongly connected group, for the error message."""
    start = min(group)
    path, seen = [start], {start}
    while True:
        nxt = next(w for w in graph[path[-1]] if w in group)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_tinyr1_has_no_import_cycles() -> None:
    cycles = find_cycles(PACKAGE_ROOT, "tinyr1")
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..c import h\n    return h\n")
    (pkg / "c.py").write_text("import pkg.a\nh = 1\n")
    (pkg / "d.py").write_text("from pkg import c\n")  # imports into the cycle, not part of it
    cycles = find_cycles(pkg, "pkg")
    assert len(cycles) == 1
    assert set(cycles[0]) == {"pkg.a", "pkg.sub.b", "pkg.c"} and cycles[0][0] == cycles[0][-1]
    (pkg / "c.py").write_text("h = 1\n")
    assert find_cycles(pkg, "pkg") == []
