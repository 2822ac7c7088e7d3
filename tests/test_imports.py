"""Imports inside `pipeline` run one way: no module circles, and nothing from launchers, data_prep or tests.

The graph is read from the source with `ast`, not from `sys.modules`, so an
import hidden inside a function counts as much as one at the top: a circle held
together by a lazy import is still a circle. Only imports under
`if TYPE_CHECKING:` are left out (they never run).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"
FORBIDDEN = ("launchers", "data_prep", "tests")
"""Top-level packages that import `pipeline` and so must never be imported by it."""

Edges = dict[str, dict[str, list[str]]]
"""module -> imported module -> where ("path:line") the import is written."""


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under `root/pipeline/`; a package is its `__init__.py`."""
    out = {}
    for file in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions too), except under `if TYPE_CHECKING:`."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: n.lineno)


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported module, name taken from it or None) for each alias of one import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    base = _base(module, is_package, node)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append((sub, None) if sub in modules else (base, alias.name))
    return out


def _reexports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Package -> name its `__init__` imports -> the module that name comes from."""
    out: dict[str, dict[str, str]] = {}
    for name, file in modules.items():
        if file.name != "__init__.py":
            continue
        names = out[name] = {}
        for node in _imports(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ImportFrom):
                for alias, (target, _) in zip(node.names, _targets(name, True, node, modules), strict=True):
                    names[alias.asname or alias.name] = target
    return out


def import_graph(root: Path = ROOT) -> tuple[Edges, list[str]]:
    """The `pipeline.*` import graph, and every import of a forbidden package ("path:line: name")."""
    modules = _modules(root)
    reexports = _reexports(modules)
    edges: Edges = {name: {} for name in modules}
    forbidden = []
    for module, file in modules.items():
        is_package = file.name == "__init__.py"
        where = file.relative_to(root)
        for node in _imports(ast.parse(file.read_text(), str(file))):
            for target, name in _targets(module, is_package, node, modules):
                top = target.partition(".")[0]
                if top in FORBIDDEN:
                    forbidden.append(f"{where}:{node.lineno}: {target}")
                if top != PACKAGE:
                    continue
                if module.startswith(target + "."):
                    # A submodule importing from its own ancestor package. Python runs the
                    # package's __init__ first, and that __init__ usually imports its
                    # submodules, so an edge here would close a circle for every package that
                    # re-exports anything. What the submodule really needs is the module a
                    # re-exported name comes from, so the edge goes there; a bare `import
                    # pipeline.a` (or a name the __init__ does not import) only reaches the
                    # package object, which already exists at that point, and is left out.
                    target = reexports.get(target, {}).get(name or "", "")
                    if not target or target == module or module.startswith(target + "."):
                        continue
                while target not in modules and "." in target:  # `import pipeline.a.b.func`-style
                    target = target.rpartition(".")[0]
                lines = edges[module].setdefault(target, []) if target != module else []
                if target != module and f"{where}:{node.lineno}" not in lines:
                    lines.append(f"{where}:{node.lineno}")
    return edges, forbidden


def _strongly_connected(edges: Edges) -> list[list[str]]:
    """Tarjan's components with more than one module (a self-import is not recorded)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _one_cycle(edges: Edges, component: list[str]) -> list[str]:
    """A shortest circle through the first module of a strongly connected component."""
    start, inside = component[0], set(component)
    parent: dict[str, str] = {}
    todo = deque([start])
    while todo:
        v = todo.popleft()
        for w in sorted(edges[v]):
            if w not in inside:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in parent:
                parent[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a component


def describe_cycles(edges: Edges) -> list[str]:
    """One line per circle: the modules in order, each edge with the import that makes it."""
    lines = []
    for component in _strongly_connected(edges):
        cycle = _one_cycle(edges, component)
        hops = [f"{a} -> {b} ({', '.join(edges[a][b])})" for a, b in zip(cycle, cycle[1:], strict=False)]
        lines.append(f"cycle among {len(component)} modules {component}:\n    " + "\n    ".join(hops))
    return lines


def test_pipeline_imports_no_launchers_data_prep_or_tests():
    _, forbidden = import_graph()
    assert not forbidden, "pipeline must not import these:\n" + "\n".join(forbidden)


def test_pipeline_import_graph_has_no_cycle():
    edges, _ = import_graph()
    cycles = describe_cycles(edges)
    assert not cycles, "import cycles (lazy imports count too):\n" + "\n".join(cycles)


def test_the_graph_reader_on_a_small_tree(tmp_path):
    """Lazy, relative and re-exported imports make edges; TYPE_CHECKING ones do not."""
    files = {
        "__init__.py": "",
        "a/__init__.py": "from pipeline.a.c import y\n",
        "a/b.py": "from pipeline.a import y\n",  # really needs a.c, not the package
        "a/c.py": "def f():\n    from ..d import z\ny = 1\n",  # lazy and relative
        "d.py": "from pipeline.a.b import q\nz = 2\n",
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipeline.d\nimport launchers.x\n",
    }
    for name, text in files.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text)
    edges, forbidden = import_graph(tmp_path)
    assert edges == {
        "pipeline": {}, "pipeline.a": {"pipeline.a.c": ["pipeline/a/__init__.py:1"]},
        "pipeline.a.b": {"pipeline.a.c": ["pipeline/a/b.py:1"]},
        "pipeline.a.c": {"pipeline.d": ["pipeline/a/c.py:2"]},
        "pipeline.d": {"pipeline.a.b": ["pipeline/d.py:1"]}, "pipeline.e": {},
    }
    assert forbidden == ["pipeline/e.py:4: launchers.x"]
    assert describe_cycles(edges) == [
        "cycle among 3 modules ['pipeline.a.b', 'pipeline.a.c', 'pipeline.d']:\n"
        "    pipeline.a.b -> pipeline.a.c (pipeline/a/b.py:1)\n"
        "    pipeline.a.c -> pipeline.d (pipeline/a/c.py:2)\n"
        "    pipeline.d -> pipeline.a.b (pipeline/d.py:1)"
    ]
