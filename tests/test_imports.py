"""The floors of `pti`: every import points down or sideways, never up, and no imports go round in a circle.

Every import statement counts, wherever it is: module level, inside `if`/`try`/`with` blocks and
class bodies, inside functions (lazy imports: the CLI keeps `--help` fast that way, optional extras
load on first use), and under `if TYPE_CHECKING:`. A lazy import is still a dependency a reader has
to hold in their head, so it must respect the floors and close no cycle. `importlib.import_module`
and `__import__` with a literal name count too; a name computed at run time (the kernel dispatch's
`f"pti.kernels.{module}"`, the CLI's list of command modules) cannot be seen by reading the source.

`import a.b` and `from a import b` (b a submodule) are edges to `a.b`; `from a.b import name` is an
edge to `a.b`. Importing `a.b` also runs `a/__init__.py`, but that implicit edge to the parent
package is left out (every package would otherwise be a cycle with its submodules).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import pti

PTI_DIR = Path(pti.__file__).parent

# The floors, bottom to top (as in the README's architecture section). A module may import from its own
# floor or below. Inside one floor any direction is fine (`pti.engine.*` among themselves, `pti.kernels.*`
# among themselves), as long as it makes no cycle. A name covers that module and, for a package, every
# module under it; the longest name that covers a module decides (pti.export.contract is on 5, the rest
# of pti.export on 5.5); `pti` alone is the package's own __init__.py (the lazy public API: pti.tune,
# pti.render, pti.load_generator). A module that no entry covers fails the test: give it a floor here.
FLOORS: dict[float, tuple[str, ...]] = {
    1: ("pti._version", "pti.errors", "pti.signals"),  # leaves
    2: ("pti.fsutil",),  # atomic writes, the ledger of completed files, hashing
    3: ("pti.kernels",),  # reference ops, the impl= dispatch, Triton kernels
    4: ("pti.engine",),  # generator, checkpoints, losses, invert, tune, identity, edits, align, weights
    5: ("pti.export.contract",),  # the export contract (names, shapes, profiles, checks): below every format
    5.5: ("pti.export", "pti.pipeline", "pti.clip"),  # the export formats and backends; one photo or clip
    6: ("pti.batch", "pti.rendering"),  # many photos; edits rendered through a backend
    7: ("pti", "pti.api", "pti.studio", "pti.benchmark"),  # the public API, the web app, pti bench
    8: ("pti.commands", "pti.cli", "pti.__main__"),  # the console script
}
# Leaves below everything: they import nothing from pti at all (pti.signals may import these).
LEAVES = ("pti._version", "pti.errors")


@dataclass(frozen=True)
class Import:
    """One import of a package module, where it is written and what it says."""

    source: str  # the importing module, "pti.api"
    target: str  # the imported module, "pti.batch"
    where: str  # "pti/api.py:123"
    scope: str  # "module level", or the function or class it is in: "in tune()"
    statement: str  # the source text, "from pti.batch import tune_many"

    def __str__(self) -> str:
        return f"{self.where} ({self.scope}): {self.statement}"


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    """Every module of the package on disk, by dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


class _Statements(ast.NodeVisitor):
    """Every import statement of a module, and every `importlib.import_module("literal")` / `__import__`."""

    def __init__(self) -> None:
        self.scope: list[ast.AST] = []  # the functions and classes around the current node
        self.found: list[tuple[ast.AST, str]] = []  # (node, scope)

    def _nested(self, node) -> None:
        self.scope.append(node)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _nested

    def _scope(self) -> str:
        if not self.scope:
            return "module level"
        call = "" if isinstance(self.scope[-1], ast.ClassDef) else "()"
        return "in " + ".".join(n.name for n in self.scope) + call

    def visit_Import(self, node) -> None:
        self.found.append((node, self._scope()))

    visit_ImportFrom = visit_Import

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not (name == "import_module" and len(node.args) > 1)
        ):
            self.found.append((node, self._scope()))
        self.generic_visit(node)


def _defined_names(tree: ast.Module) -> set[str] | None:
    """Names a module defines at its top level (None: it could define anything: `import *`, `__getattr__`)."""
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return None
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For, ast.With)):
            for target in (
                [*node.targets]
                if isinstance(node, ast.Assign)
                else [i.optional_vars for i in node.items if i.optional_vars]
                if isinstance(node, ast.With)
                else [node.target]
            ):
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    names |= {n for g in ast.walk(tree) if isinstance(g, ast.Global) for n in g.names}
    return names


def package_imports(package_dir: Path, package: str) -> tuple[list[Import], list[str]]:
    """Every import of one of the package's modules, and the imports that name no module or name of it."""
    modules = module_names(package_dir, package)
    root = package_dir.parent
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    defined = {name: _defined_names(tree) for name, tree in trees.items()}
    imports: list[Import] = []
    broken: list[str] = []
    for name, tree in trees.items():
        path = modules[name]
        visitor = _Statements()
        visitor.visit(tree)
        for node, scope in visitor.found:
            where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
            statement = ast.unparse(node)
            statement = statement if len(statement) <= 100 else statement[:97] + "..."
            pairs: list[tuple[str, str | None]] = []  # (module, the name imported from it, if any)
            if isinstance(node, ast.Call):
                pairs = [(node.args[0].value, None)]
            elif isinstance(node, ast.Import):
                pairs = [(alias.name, None) for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, `level - 1` packages up
                    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    pairs.append((sub, None) if sub in modules else (base, alias.name))
            for target, attr in pairs:
                if target != package and not target.startswith(package + "."):
                    continue  # the standard library or a third-party package
                if target not in modules:
                    broken.append(f"{where} ({scope}): {statement}: there is no module {target}")
                    continue
                if attr is not None and attr != "*" and defined[target] is not None and attr not in defined[target]:
                    broken.append(f"{where} ({scope}): {statement}: {target} defines no {attr}")
                if target != name and Import(name, target, where, scope, statement) not in imports:
                    imports.append(Import(name, target, where, scope, statement))
    return imports, broken


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its source."""
    graph: dict[str, set[str]] = {name: set() for name in module_names(package_dir, package)}
    for imp in package_imports(package_dir, package)[0]:
        graph[imp.source].add(imp.target)
    return graph


def find_tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The modules that import each other round in a circle, one set per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    tangles: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; pti's graph is far too shallow for the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                tangles.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(tangles, key=min)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] per tangle, [] when the graph is acyclic."""
    cycles = []
    for component in find_tangles(graph):
        start = min(component)
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parent:  # breadth first inside the tangle, back to the start
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
            frontier = nxt
        cycle = [start]
        while len(cycle) == 1 or cycle[-1] != start:
            cycle.append(parent[cycle[-1]])
        cycles.append(cycle[::-1])
    return cycles


def describe_cycles(graph: dict[str, set[str]], imports: list[Import]) -> str:
    """Per tangle: its shortest cycle, then every import between its modules (the ones to untangle)."""
    tangles = find_tangles(graph)
    lines = [f"{len(tangles)} import cycle(s); every import counts, lazy ones included:"]
    for tangle, cycle in zip(tangles, find_cycles(graph)):
        whole = f"  (the tangle: {', '.join(sorted(tangle))})" if len(tangle) > 2 else ""
        lines.append("  " + " -> ".join(cycle) + whole)
        lines += [f"      {imp}" for imp in imports if imp.source in tangle and imp.target in tangle]
    return "\n".join(lines)


def floor_of(module: str, floors: dict[float, tuple[str, ...]], package: str) -> float | None:
    """The floor of a module: its longest covering entry (`package` alone covers only its __init__.py)."""
    best = None
    for floor, names in floors.items():
        for entry in names:
            covers = module == entry or (entry != package and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > len(best[1])):
                best = (floor, entry)
    return best and best[0]


def floor_violations(
    package_dir: Path, package: str, floors: dict[float, tuple[str, ...]], leaves: tuple[str, ...] = ()
) -> list[str]:
    """Each import that points up a floor or out of a leaf, and each module without a floor, as one line."""
    out = []
    for module in module_names(package_dir, package):
        if floor_of(module, floors, package) is None:
            out.append(f"{module} has no floor: give it one in FLOORS ({__name__})")
    for imp in package_imports(package_dir, package)[0]:
        mine, theirs = floor_of(imp.source, floors, package), floor_of(imp.target, floors, package)
        if imp.source in leaves:
            out.append(f"{imp.where} ({imp.scope}): {imp.source} is a leaf and imports {imp.target}: {imp.statement}")
        elif mine is not None and theirs is not None and theirs > mine:
            out.append(
                f"{imp.where} ({imp.scope}): {imp.source} (floor {mine}) imports {imp.target} (floor {theirs}), "
                f"a floor above it: {imp.statement}"
            )
    return out


# Imports each module as the first module of its package: the package's modules already loaded are
# dropped from sys.modules before each import, so no earlier import can mask an order-dependent failure.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    package, where = sys.argv[1], sys.argv[2]
    sys.path.insert(0, where)
    pkg = importlib.import_module(package)
    names = sorted({package} | {m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")})
    errors = {}
    for name in names:
        for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    print(json.dumps({"modules": names, "errors": errors}))
""")


def import_each_fresh(package: str, where: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, package, str(where)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- pti itself


def test_pti_has_no_import_cycle() -> None:
    graph = import_graph(PTI_DIR, "pti")
    assert "pti.engine.checkpoint" in graph and "pti.engine.loaded" in graph["pti.engine.nvidia_pkl"]
    assert "pti.cli" in graph["pti.__main__"]  # imported inside main(): lazy imports are edges
    if find_tangles(graph):
        pytest.fail(describe_cycles(graph, package_imports(PTI_DIR, "pti")[0]), pytrace=False)


def test_pti_imports_only_from_its_own_floor_or_below() -> None:
    violations = floor_violations(PTI_DIR, "pti", FLOORS, LEAVES)
    if violations:
        pytest.fail(
            f"{len(violations)} import(s) against the floors (FLOORS in {__name__}):\n" + "\n".join(violations),
            pytrace=False,
        )


def test_every_pti_import_names_a_module_or_name_that_exists() -> None:
    """A lazy import of something moved away fails only when its function runs; here it fails at once."""
    broken = package_imports(PTI_DIR, "pti")[1]
    if broken:
        pytest.fail("\n".join(broken), pytrace=False)


def test_every_pti_module_imports_first_in_a_fresh_interpreter() -> None:
    result = import_each_fresh("pti", PTI_DIR.parent)
    assert result["errors"] == {}
    assert set(result["modules"]) == set(module_names(PTI_DIR, "pti"))  # the AST walk sees every module


def test_loaders_sit_below_the_module_that_dispatches_to_them() -> None:
    graph = import_graph(PTI_DIR, "pti")
    for loader in ("pti.engine.nvidia_pkl", "pti.engine.rosinality"):
        assert "pti.engine.checkpoint" not in graph[loader]
        assert loader in graph["pti.engine.checkpoint"]


# ---------------------------------------------------------------------------- the checks can fail


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, src in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(src))
    return root


CYCLIC = {
    "cyc/__init__.py": "",
    "cyc/a.py": "from cyc import b\nX = 1\n",
    "cyc/b.py": "from . import c\n",
    "cyc/c.py": "from cyc.a import X\n",  # a -> b -> c -> a, and a's X is not defined yet: fails at run time
    "cyc/lazy.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from cyc import b
        def f():
            from cyc import a
            return a
    """,
    "cyc/sub/__init__.py": "",
    "cyc/sub/d.py": "from ..a import X\ntry:\n    from . import e\nexcept ImportError:\n    pass\n",
    "cyc/sub/e.py": "class K:\n    import cyc.lazy\n",
}


def test_a_cycle_is_found_and_every_kind_of_import_is_an_edge(tmp_path) -> None:
    pkg = _write_package(tmp_path, CYCLIC) / "cyc"
    graph = import_graph(pkg, "cyc")
    assert graph["cyc.a"] == {"cyc.b"} and graph["cyc.b"] == {"cyc.c"} and graph["cyc.c"] == {"cyc.a"}
    assert graph["cyc.lazy"] == {"cyc.a", "cyc.b"}  # inside a function, and for type checkers only
    assert graph["cyc.sub.d"] == {"cyc.a", "cyc.sub.e"}  # relative imports, and inside try
    assert graph["cyc.sub.e"] == {"cyc.lazy"}  # a class body
    assert find_cycles(graph) == [["cyc.a", "cyc.b", "cyc.c", "cyc.a"]]
    graph["cyc.c"] = set()
    assert find_cycles(graph) == []


def test_a_cycle_through_lazy_imports_only_is_reported_with_file_and_line(tmp_path) -> None:
    pkg = (
        _write_package(
            tmp_path,
            {
                "lz/__init__.py": "",
                "lz/api.py": "import os\n\ndef tune():\n    from lz.batch import tune_many\n    return tune_many\n",
                "lz/batch.py": "def tune_many():\n    import lz.api as api\n    return api\n",
                "lz/ok.py": "def f():\n    from lz import api\n",  # one way only: no cycle
            },
        )
        / "lz"
    )
    assert import_each_fresh("lz", tmp_path)["errors"] == {}  # nothing breaks at import time...
    graph = import_graph(pkg, "lz")
    assert find_cycles(graph) == [["lz.api", "lz.batch", "lz.api"]]  # ...and still the cycle is found
    message = describe_cycles(graph, package_imports(pkg, "lz")[0])
    assert "lz/api.py:4 (in tune()): from lz.batch import tune_many" in message
    assert "lz/batch.py:2 (in tune_many()): import lz.api as api" in message
    assert "lz/ok.py" not in message


def test_two_tangles_give_two_cycles_and_a_dynamic_import_by_literal_counts(tmp_path) -> None:
    pkg = (
        _write_package(
            tmp_path,
            {
                "tg/__init__.py": "",
                "tg/k1.py": "def f():\n    from tg import k2\n",
                "tg/k2.py": "import importlib\ndef g():\n    return importlib.import_module('tg.k1')\n",
                "tg/e1.py": "from tg.e2 import Y\nclass C:\n    def m(self):\n        from tg.e3 import Z\n",
                "tg/e2.py": "Y = 1\n",
                "tg/e3.py": "Z = 1\ndef h():\n    return __import__('tg.e1')\n",
            },
        )
        / "tg"
    )
    graph = import_graph(pkg, "tg")
    assert find_cycles(graph) == [["tg.e1", "tg.e3", "tg.e1"], ["tg.k1", "tg.k2", "tg.k1"]]
    message = describe_cycles(graph, package_imports(pkg, "tg")[0])
    assert message.startswith("2 import cycle(s)")
    assert "tg/e1.py:4 (in C.m()): from tg.e3 import Z" in message
    assert "tg/k2.py:3 (in g()): importlib.import_module('tg.k1')" in message


FLOORED = {
    "fl/__init__.py": "def __getattr__(name):\n    from fl.top import run\n    return run\n",
    "fl/errors.py": "def describe():\n    from fl.io import write\n",  # a leaf that imports: one violation
    "fl/io.py": "from fl.errors import describe\n\ndef write():\n    pass\n",
    "fl/engine/__init__.py": "",
    "fl/engine/a.py": "from fl.engine import b\nfrom fl import io\n",  # sideways and down: fine
    "fl/engine/b.py": "def f():\n    from fl.top import run\n",  # up two floors, lazily: a violation
    "fl/top.py": "from fl.engine.a import b\n\ndef run():\n    pass\n",
    "fl/stray.py": "",  # in no floor
}
FLOORED_FLOORS = {1: ("fl.errors",), 2: ("fl.io",), 3: ("fl.engine",), 4: ("fl", "fl.top")}


def test_a_floor_violation_is_reported_with_file_and_line(tmp_path) -> None:
    pkg = _write_package(tmp_path, FLOORED) / "fl"
    violations = floor_violations(pkg, "fl", FLOORED_FLOORS, leaves=("fl.errors",))
    assert violations == [
        f"fl.stray has no floor: give it one in FLOORS ({__name__})",
        "fl/engine/b.py:2 (in f()): fl.engine.b (floor 3) imports fl.top (floor 4), a floor above it: "
        "from fl.top import run",
        "fl/errors.py:2 (in describe()): fl.errors is a leaf and imports fl.io: from fl.io import write",
    ]
    assert floor_of("fl", FLOORED_FLOORS, "fl") == 4 and floor_of("fl.engine.a", FLOORED_FLOORS, "fl") == 3
    assert floor_of("fl.stray", FLOORED_FLOORS, "fl") is None  # `fl` covers only fl/__init__.py
    assert floor_of("fl.io", {1: ("fl.i",)}, "fl") is None  # an entry covers whole names only
    assert floor_of("pti.export.contract", FLOORS, "pti") == 5 < floor_of("pti.export.onnx", FLOORS, "pti")  # longest
    fixed = {1: ("fl.errors",), 2: ("fl.io", "fl.stray"), 3: ("fl.engine",), 4: ("fl", "fl.top")}
    (pkg / "errors.py").write_text("")
    (pkg / "engine" / "b.py").write_text("")
    assert floor_violations(pkg, "fl", fixed, leaves=("fl.errors",)) == []


def test_an_import_of_something_moved_away_is_reported(tmp_path) -> None:
    pkg = (
        _write_package(
            tmp_path,
            {
                "mv/__init__.py": "from mv.a import X\n",
                "mv/a.py": "X = 1\ntry:\n    import json as J\nexcept ImportError:\n    J = None\nclass K: pass\n",
                "mv/b.py": "from mv.a import X, J, K\nfrom . import a\n"
                "def f():\n    from mv.a import gone\n    from mv.old import Y\n    from mv import X\n",
                "mv/c.py": "def __getattr__(name):\n    return 1\n",
                "mv/d.py": "from mv.c import anything\n",  # a module-level __getattr__ may define anything
            },
        )
        / "mv"
    )
    assert package_imports(pkg, "mv")[1] == [
        "mv/b.py:4 (in f()): from mv.a import gone: mv.a defines no gone",
        "mv/b.py:5 (in f()): from mv.old import Y: there is no module mv.old",
    ]


@pytest.mark.parametrize(
    "module, planted",
    [
        ("pti.kernels.ref", "from pti.engine.generator import Generator"),  # kernels -> engine -> kernels
        ("pti.export.contract", "from pti.export.onnx import export_onnx"),  # a back-up import inside export
        ("pti.errors", "from pti.fsutil import atomic_path"),  # a leaf that imports
    ],
    ids=["up-a-floor", "inside-export", "leaf"],
)
def test_a_lazy_import_planted_in_a_copy_of_pti_is_caught(tmp_path, module, planted) -> None:
    """The real floors table on the real tree: one lazy import, and both checks fail, saying where it is."""
    copy = tmp_path / "pti"
    shutil.copytree(PTI_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = floor_violations(copy, "pti", FLOORS, LEAVES)
    path = copy.joinpath(*module.split(".")[1:]).with_suffix(".py")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + ["", "", "def _planted():", f"    {planted}", ""]))
    where = f"{path.relative_to(tmp_path).as_posix()}:{len(lines) + 4} (in _planted()): "
    target = planted.split()[1]
    new = set(floor_violations(copy, "pti", FLOORS, LEAVES)) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith(where + module) and next(iter(new)).endswith(planted)
    assert target in next(iter(new))
    graph = import_graph(copy, "pti")
    assert any({module, target} <= tangle for tangle in find_tangles(graph))
    assert where + planted in describe_cycles(graph, package_imports(copy, "pti")[0])


def test_a_cycle_that_breaks_at_run_time_is_reported(tmp_path) -> None:
    _write_package(tmp_path, CYCLIC)
    errors = import_each_fresh("cyc", tmp_path)["errors"]
    assert "partially initialized" in errors["cyc.a"] or "cannot import name" in errors["cyc.a"]
    assert "cyc.lazy" not in errors and "cyc.sub.e" not in errors
