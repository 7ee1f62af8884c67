"""The package's shape: no import cycle, imports at the top of modules, small files.

Static checks over ``src/bitfit_peft`` (``ast``, no import of the package), so a new module is covered the day it is
added. Each check is also run on a small synthetic package, so a check that silently finds nothing fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bitfit_peft"
MAX_LINES = 450
#: a deferred intra-package import must say why on its line or the line above (e.g. "deferred: fastapi is heavy")
DEFERRED_MARK = "deferred"


def _module_name(root: Path, path: Path) -> str:
    parts = path.with_suffix("").relative_to(root.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(node: ast.ImportFrom | ast.Import, package: str, names: set[str]) -> set[str]:
    """The package's modules an import statement reads (``from a import b`` reads ``a.b`` if it is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in names}
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    found = set()
    for alias in node.names:
        for candidate in (f"{base}.{alias.name}", base):
            if candidate in names:
                found.add(candidate)
                break
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """``({module: modules it imports}, [(file, line, module) of intra-package imports inside functions]``."""
    paths = {p: _module_name(root, p) for p in root.rglob("*.py")}
    names = set(paths.values())
    graph: dict[str, set[str]] = {name: set() for name in names}
    inside: list[tuple[str, int, str]] = []
    for path, module in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        source = path.read_text()
        tree = ast.parse(source)
        lines = source.splitlines()
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _imported_modules(node, package, names) - {module}
            graph[module] |= targets
            scope = parents.get(node)
            while scope is not None and not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
                scope = parents.get(scope)
            said = " ".join(lines[max(0, node.lineno - 2) : node.lineno])
            if scope is not None and targets and DEFERRED_MARK not in said:
                inside.append((str(path), node.lineno, sorted(targets)[0]))
    # typer's registration idiom: the cli package imports its subcommands, which import the app from it
    for module, targets in graph.items():
        if module.startswith(f"{root.name}.cli."):
            targets.discard(f"{root.name}.cli")
    return graph, inside


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


@pytest.fixture
def knotted(tmp_path: Path) -> Path:
    """A package with a three-module cycle (one edge inside a function) and an unexplained lazy import."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.sub import b\n")
    (root / "sub" / "b.py").write_text("from ..c import thing\n")
    (root / "c.py").write_text("def thing():\n    from pkg import a\n    return a\n")
    (root / "d.py").write_text("def lazy():\n    # deferred: said why\n    from pkg import c\n    return c\n")
    return root


def test_the_checks_find_a_cycle_and_an_unexplained_lazy_import(knotted: Path) -> None:
    graph, inside = import_graph(knotted)
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert [(Path(f).name, line) for f, line, _ in inside] == [("c.py", 2)]


def test_no_import_cycle_inside_the_package() -> None:
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 40, "the import graph found too few modules: is PACKAGE right?"
    found = cycles(graph)
    assert not found, "import cycle(s) in src/bitfit_peft: " + "; ".join(" <-> ".join(c) for c in found)


def test_package_imports_sit_at_the_top_of_modules() -> None:
    _, inside = import_graph(PACKAGE)
    assert not inside, (
        "intra-package imports inside functions (move them to the top, or say why they are deferred with a "
        f"'# {DEFERRED_MARK}: ...' comment): " + ", ".join(f"{f}:{line} ({mod})" for f, line, mod in inside)
    )


def test_no_source_file_is_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes, "no source files found"
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"source files over {MAX_LINES} lines (split them by responsibility): {over}"
