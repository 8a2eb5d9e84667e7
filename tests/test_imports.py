"""The packages' layering: no import cycle between modules, neither end imports the other.

Read with ``ast``, so imports under ``if TYPE_CHECKING:`` and inside functions count too
(a cycle that only the type checker follows is coupling all the same). Print the graph
of a tree with ``python tests/test_imports.py [ROOT]`` (default: this one).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGES = ("protocol", "childproc", "link", "agent", "controller")
_ROOT = Path(__file__).resolve().parent.parent


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
              modules: set[str]) -> set[str]:
    """The project's modules that ``node`` (in ``module``) imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: resolved against the importing module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        # ``from pkg import name``: the submodule pkg.name if there is one, else pkg.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    found = set()
    for name in names:
        # ``import a.b.c`` imports a, a.b and a.b.c: count the deepest one we know.
        known = name
        while known and known not in modules:
            known = known.rpartition(".")[0]
        if known and known != module:
            found.add(known)
    return found


def import_graph(root: Path = _ROOT) -> dict[str, set[str]]:
    """Each module of the project's packages under ``root`` → the project modules it
    imports (any import: top level, TYPE_CHECKING, inside functions)."""
    paths = {
        _module_name(root, path): path
        for package in PACKAGES if (root / package).is_dir()
        for path in sorted((root / package).rglob("*.py"))
    }
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(module, path.name == "__init__.py", node, modules)
        graph[module] = edges
    return graph


def _package_of(module: str) -> str:
    return module.partition(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Which package imports which (a package's imports of itself left out)."""
    packages: dict[str, set[str]] = {_package_of(m): set() for m in graph}
    for module, imported in graph.items():
        packages[_package_of(module)] |= {_package_of(i) for i in imported} - {
            _package_of(module)}
    return packages


def test_no_module_is_part_of_an_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_ends_do_not_import_each_other() -> None:
    packages = package_graph(import_graph())
    assert "controller" not in packages["agent"]
    assert "agent" not in packages["controller"]
    # Both stand on the link and the protocol; those stand on neither end.
    for lower in ("protocol", "link"):
        assert packages[lower].isdisjoint({"agent", "controller", "childproc"}), lower


def test_the_walk_sees_cycles_and_type_checking_imports(tmp_path: Path) -> None:
    package = tmp_path / "agent"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_a.py").write_text("from ._b import B\n")
    (package / "_b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agent._a import A\n")
    (package / "_c.py").write_text("from . import _a\n")
    graph = import_graph(tmp_path)
    assert graph == {"agent": set(), "agent._a": {"agent._b"}, "agent._b": {"agent._a"},
                     "agent._c": {"agent._a"}}
    assert cycles(graph) == [["agent._a", "agent._b"]]


def test_importing_the_controller_loads_neither_the_agent_nor_childproc() -> None:
    script = ("import sys, controller\n"
              "print(sorted({m.partition('.')[0] for m in sys.modules} & "
              "{'agent', 'childproc', 'link', 'protocol'}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                          timeout=60, cwd=_ROOT)
    assert done.stdout.decode().strip() == "['link', 'protocol']"


def main(argv: list[str]) -> None:
    root = Path(argv[0]).resolve() if argv else _ROOT
    graph = import_graph(root)
    print("packages:")
    for package, imported in sorted(package_graph(graph).items()):
        print(f"  {package} -> {', '.join(sorted(imported)) or '-'}")
    print("modules:")
    for module, imported in sorted(graph.items()):
        print(f"  {module} -> {', '.join(sorted(imported)) or '-'}")
    found = cycles(graph)
    print("cycles:" if found else "cycles: none")
    for group in found:
        print(f"  {' <-> '.join(group)}")


if __name__ == "__main__":
    main(sys.argv[1:])
