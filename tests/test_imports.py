"""tfqat's import graph: no cycle between modules, ``tfqat.quant`` imports nothing above it, and
the ``.tflite`` readers (runtime, export checks) import no TensorFlow.

The graph is read from the source (AST), not by importing it, so every ``import`` and ``from ...
import`` counts wherever it stands, function-local ones included (the usual way a cycle hides).
Resolution: ``from p import name`` is an edge to the module ``p.name`` when there is one, else to
``p``, or, when ``p`` is a package whose ``__init__`` resolves names lazily through an
``_EXPORTS = {module: (names, ...)}`` table (PEP 562, as ``tfqat.quant`` and ``tfqat.export``
do), to the module that defines ``name``. Not edges: imports under ``if TYPE_CHECKING:`` (they
never run) and the implicit import of a module's parent packages (a package ``__init__`` that
imports its own submodules is not a cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What tfqat.quant may import: itself and what it is built on (the models, the config, atomic writes).
QUANT_BELOW = ("quant", "models", "config", "atomic")


def module_files(pkg_dir: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module in the package at ``pkg_dir``."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    """``{name: module}`` from a module-level ``_EXPORTS = {module: (names, ...)}`` literal."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS"
                                                for t in node.targets):
            table = ast.literal_eval(node.value)
            return {name: module for module, names in table.items() for name in names}
    return {}


def _imports(tree: ast.Module):
    """Every Import / ImportFrom node, in functions too, except under ``if TYPE_CHECKING:``."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(pkg_dir: Path) -> dict[str, dict[str, int]]:
    """``{module: {imported module of the package: line of the first such import}}``."""
    files = module_files(pkg_dir)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}
    lazy = {name: _lazy_table(tree) for name, tree in trees.items()}
    graph: dict[str, dict[str, int]] = {name: {} for name in files}
    for name, tree in trees.items():
        package = name if files[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else lazy.get(base, {}).get(alias.name, base))
            for target in targets:
                while target and target not in files:  # ``import a.b.c`` of a non-module: its package
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle ``[m0, m1, ..., m0]`` per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph of one package is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:  # breadth first back to start, inside the group
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in group]
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(cycles)


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join([cycle[0]] + [f"{b} (line {graph[a][b]} of {a})" for a, b in zip(cycle, cycle[1:])])


def upward_from_quant(graph: dict[str, dict[str, int]], root: str) -> list[str]:
    """Imports from ``<root>.quant`` to a module of ``root`` outside :data:`QUANT_BELOW`."""
    below = tuple(f"{root}.{p}" for p in QUANT_BELOW)
    under = tuple(b + "." for b in below)
    return [f"{m} line {line}: imports {t}" for m, edges in sorted(graph.items())
            if m == f"{root}.quant" or m.startswith(f"{root}.quant.")
            for t, line in sorted(edges.items()) if not (t in below or t.startswith(under))]


# ---- tfqat ----------------------------------------------------------------------------------------

def test_tfqat_has_no_import_cycle():
    graph = import_graph(ROOT / "tfqat")
    # the walker sees the package: function-local and lazy-table edges are there to be checked
    assert len(graph) > 40
    assert "tfqat.qat_stage" in graph["tfqat.export.write"]  # function-local, in export_run
    assert "tfqat.export.write" in graph["tfqat.agile.exportable"]  # through tfqat.export's _EXPORTS
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)


def test_tfqat_quant_imports_nothing_above_it():
    graph = import_graph(ROOT / "tfqat")
    assert "tfqat.quant.recipes" in graph["tfqat.quant.qat"]
    bad = upward_from_quant(graph, "tfqat")
    assert not bad, "tfqat.quant imports a module above it:\n" + "\n".join(bad)


def test_flatbuffer_reading_imports_no_tensorflow():
    """The runtime and the export's checks read .tflite files on machines without TensorFlow."""
    code = ("import sys, tfqat.runtime, tfqat.export, tfqat.export.checks\n"
            "heavy = {'tensorflow', 'keras'} & set(sys.modules)\n"
            "assert not heavy, sorted(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- the checks can fail ----------------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checks_find_hidden_cycles_and_upward_imports(tmp_path):
    """A synthetic package with a cycle through a function-local relative import, one through a
    lazy ``_EXPORTS`` table, one only under TYPE_CHECKING (not a cycle), and a quant module
    importing its pipeline."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from .a import x\n    return x\n",
        "pkg/lazy/__init__.py": "_EXPORTS = {'pkg.lazy.impl': ('thing',)}\n",
        "pkg/lazy/impl.py": "import pkg.c\n",
        "pkg/c.py": "from pkg.lazy import thing\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import E\n",
        "pkg/e.py": "import pkg.d\n",
        "pkg/quant/__init__.py": "",
        "pkg/quant/q.py": "from pkg.models import m\n\n\nclass Q:\n    def run(self):\n"
                          "        from pkg.pipeline import stage\n        return stage\n",
        "pkg/models.py": "m = 1\n",
        "pkg/pipeline.py": "from pkg.quant.q import Q\nstage = Q\n",
    })
    graph = import_graph(tmp_path / "pkg")
    assert graph["pkg.b"] == {"pkg.a": 2} and graph["pkg.c"] == {"pkg.lazy.impl": 1}
    assert graph["pkg.d"] == {} and graph["pkg.e"] == {"pkg.d": 1}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.lazy.impl", "pkg.c"],
                      ["pkg.pipeline", "pkg.quant.q", "pkg.pipeline"]]
    assert describe(cycles[0], graph) == "pkg.a -> pkg.b (line 1 of pkg.a) -> pkg.a (line 2 of pkg.b)"
    assert upward_from_quant(graph, "pkg") == ["pkg.quant.q line 6: imports pkg.pipeline"]
