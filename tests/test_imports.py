"""The project's import graph: no cycles, and data flows one way.

Every ``.py`` under ``dresd/``, ``pipelines/`` and ``schemas/`` is parsed (nothing is imported),
and every import statement counts wherever it stands: at module level, inside a function, under
``if TYPE_CHECKING:``. A lazy import still ties the two modules together, and a cycle hidden in
a function is one refactoring away from an import-time failure.

- no module of the project may (transitively) import itself;
- ``dresd`` (the runtime) and ``schemas`` (the store format) never import ``pipelines`` (the
  builder): pipelines write a store, the runtime reads it;
- ``schemas`` never imports ``dresd``.

An import names the module it loads: ``import a.b``, ``from a.b import X`` and
``from a import b`` (``b`` a submodule) are imports of ``a.b``; ``import a`` and
``from a import X`` (``X`` not a submodule) are imports of ``a/__init__.py``. Relative imports
are resolved against the importing module's package. The parents a submodule import also runs
(``a/__init__.py`` for ``a.b``) are not counted: by then they are already being imported.
"""

from __future__ import annotations

import ast
import collections
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dresd", "pipelines", "schemas")
# importer's top-level package -> top-level packages it must never import
FORBIDDEN = {"dresd": {"pipelines"}, "schemas": {"pipelines", "dresd"}}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module of the project
    where: str  # "path:line"


def _modules(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the packages (``a/__init__.py`` is ``a``)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _known(name: str, modules) -> str | None:
    """``name``, or the longest prefix of it that is a module of the project (None if none:
    a third-party or standard-library import)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _base(module: str, is_package: bool, level: int, where: str) -> str:
    """The package a relative import of ``level`` dots in ``module`` starts from."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise AssertionError(f"{where}: relative import beyond the top-level package")
    return ".".join(package[:len(package) - (level - 1)])


def _targets(node: ast.AST, module: str, is_package: bool, modules, where: str) -> list[str]:
    """The project's modules one import statement (or ``importlib.import_module("literal")``
    call) loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = _base(module, is_package, node.level, where)
            base = f"{base}.{node.module}" if node.module else base
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
          and not node.args[0].value.startswith(".")):
        names = [node.args[0].value]
    else:
        return []
    return [k for k in (_known(n, modules) for n in names) if k is not None]


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, Path], list[Import]]:
    """Every module of ``packages`` under ``root``, and every import among them."""
    modules = _modules(root, packages)
    imports = []
    for module, path in modules.items():
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            for target in _targets(node, module, is_package, modules, where):
                if target != module:
                    imports.append(Import(module, target, where))
    return modules, list(dict.fromkeys(imports))  # one per statement and module


def _graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for i in imports:
        graph[i.source].add(i.target)
    return graph


def tangles(imports: list[Import]) -> list[set[str]]:
    """The strongly connected components of two or more modules (each module of one reaches
    every other through imports)."""
    graph = _graph(imports)
    # Tarjan's algorithm, iterative (no recursion limit on a deep chain).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        components.append(component)
    return components


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """The import cycles: per tangle (``tangles``), one shortest cycle through its first
    module by name, as ``[a, b, ..., a]``; sorted. No tangle, no cycle."""
    graph = _graph(imports)
    cycles = []
    for component in tangles(imports):
        first = min(component)
        # breadth-first from ``first`` inside the component, back to ``first``
        parent = {first: None}
        queue = collections.deque([first])
        end = None
        while queue and end is None:
            v = queue.popleft()
            for w in sorted(graph[v] & component):
                if w == first:
                    end = v
                    break
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
        back = []  # end, its parent, ..., first
        while end is not None:
            back.append(end)
            end = parent[end]
        cycles.append([*back[::-1], first])
    return sorted(cycles)


def _describe(cycle: list[str], imports: list[Import]) -> str:
    """The cycle, where each of its imports stands, and the other modules tangled with it."""
    sites: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for i in imports:
        if i.where not in sites[i.source, i.target]:
            sites[i.source, i.target].append(i.where)
    steps = [f"{a} -> {b} ({', '.join(sites[a, b])})" for a, b in zip(cycle, cycle[1:])]
    out = " -> ".join(cycle) + "\n    " + "\n    ".join(steps)
    tangle = next(c for c in tangles(imports) if cycle[0] in c)
    if len(tangle) > len(cycle) - 1:
        out += f"\n    (tangled with {', '.join(sorted(tangle - set(cycle)))} as well)"
    return out


def test_no_import_cycles():
    _, imports = import_graph(ROOT)
    cycles = find_cycles(imports)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(
        _describe(c, imports) for c in cycles)


def test_data_flows_one_way():
    """The runtime and the store format never import the builder; the format never imports
    the runtime."""
    _, imports = import_graph(ROOT)
    bad = [f"{i.where}: {i.source} imports {i.target}" for i in imports
           if i.target.split(".")[0] in FORBIDDEN.get(i.source.split(".")[0], ())]
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_the_graph_sees_every_module_and_resolves_every_form(tmp_path):
    """The finder on a synthetic package: absolute, relative, ``from pkg import module``,
    function-level and TYPE_CHECKING imports are resolved to the right module, and a cycle
    through any of them is reported."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "import os\nfrom . import b\nA = 1\n",  # a -> b
        "pkg/b.py": "def f():\n    from .sub import c\n",  # b -> sub.c (in a function)
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from ..a import A\n",  # c -> a (under TYPE_CHECKING)
        "pkg/d.py": "import pkg\nfrom pkg import A\nfrom pkg.sub import c as cc\n"
                    "import importlib\nimportlib.import_module('pkg.e')\n",
        "pkg/e.py": "from pkg.d import x\n",  # d <-> e through a literal import_module
        "pkg/f.py": "import pkg.sub.c\nimport numpy\n",  # no cycle: f is imported by nobody
        "other/__init__.py": "",
        "other/g.py": "from pkg import b\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules, imports = import_graph(tmp_path, ("pkg", "other"))
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.d", "pkg.e",
                            "pkg.f", "other", "other.g"}
    edges = {(i.source, i.target) for i in imports}
    assert edges == {("pkg", "pkg.a"), ("pkg.a", "pkg.b"), ("pkg.b", "pkg.sub.c"),
                     ("pkg.sub.c", "pkg.a"), ("pkg.d", "pkg"), ("pkg.d", "pkg.sub.c"),
                     ("pkg.d", "pkg.e"), ("pkg.e", "pkg.d"), ("pkg.f", "pkg.sub.c"),
                     ("other.g", "pkg.b")}
    assert find_cycles(imports) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"],
                                    ["pkg.d", "pkg.e", "pkg.d"]]
    report = _describe(["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"], imports)
    assert "pkg/b.py:2" in report and "pkg/sub/c.py:3" in report
    # breaking one edge of a cycle removes it; adding one creates it
    (tmp_path / "pkg/e.py").write_text("x = 1\n")
    (tmp_path / "pkg/f.py").write_text("import pkg.sub.c\nimport pkg.f\n")  # self: ignored
    (tmp_path / "pkg/sub/__init__.py").write_text("from pkg.f import y\n")
    (tmp_path / "pkg/sub/c.py").write_text("from pkg import sub\n")  # c -> sub -> f -> c
    # and a tangle of three holding a shorter cycle: reported by that cycle, naming the third
    (tmp_path / "other/x.py").write_text("from other import y\n")
    (tmp_path / "other/y.py").write_text("from . import x, z\n")
    (tmp_path / "other/z.py").write_text("from .x import X\n")
    _, imports = import_graph(tmp_path, ("pkg", "other"))
    cycles = find_cycles(imports)
    assert cycles == [["other.x", "other.y", "other.x"],
                      ["pkg.f", "pkg.sub.c", "pkg.sub", "pkg.f"]]
    assert "tangled with other.z as well" in _describe(cycles[0], imports)
    assert "tangled" not in _describe(cycles[1], imports)
