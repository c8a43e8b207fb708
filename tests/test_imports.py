"""No import cycles in `pti`: the graph of module-level imports is acyclic, and every module imports
as the first `pti` module of a fresh interpreter.

Only imports that run when a module is imported count: module-level statements, also inside
`if`/`try`/`with` blocks and class bodies. Imports inside functions are lazy by design (the CLI
keeps `--help` fast that way) and `if TYPE_CHECKING:` blocks never run; both are left out.
`import a.b` and `from a import b` (b a submodule) are edges to `a.b`; `from a.b import name` is an
edge to `a.b`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pti

PTI_DIR = Path(pti.__file__).parent


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    """Every module of the package on disk, by dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _runs_on_import(tree: ast.Module):
    """Import statements executed when the module is imported (not in functions, not TYPE_CHECKING)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports at import time."""
    modules = module_names(package_dir, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _runs_on_import(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, `level - 1` packages up
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


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
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, package, str(where)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- pti itself


def test_pti_has_no_import_cycle() -> None:
    graph = import_graph(PTI_DIR, "pti")
    assert "pti.engine.checkpoint" in graph and "pti.engine.loaded" in graph["pti.engine.nvidia_pkl"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


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
            from cyc import a
        def f():
            from cyc import a
            return a
    """,
    "cyc/sub/__init__.py": "",
    "cyc/sub/d.py": "from ..a import X\ntry:\n    from . import e\nexcept ImportError:\n    pass\n",
    "cyc/sub/e.py": "class K:\n    import cyc.lazy\n",
}


def test_a_cycle_is_found_and_lazy_imports_are_not_edges(tmp_path) -> None:
    pkg = _write_package(tmp_path, CYCLIC) / "cyc"
    graph = import_graph(pkg, "cyc")
    assert graph["cyc.a"] == {"cyc.b"} and graph["cyc.b"] == {"cyc.c"} and graph["cyc.c"] == {"cyc.a"}
    assert graph["cyc.lazy"] == set()  # inside a function, or only for type checkers
    assert graph["cyc.sub.d"] == {"cyc.a", "cyc.sub.e"}  # relative imports, and inside try
    assert graph["cyc.sub.e"] == {"cyc.lazy"}  # a class body runs on import
    assert find_cycle(graph) == ["cyc.a", "cyc.b", "cyc.c", "cyc.a"]
    graph["cyc.c"] = set()
    assert find_cycle(graph) is None


def test_a_cycle_that_breaks_at_run_time_is_reported(tmp_path) -> None:
    _write_package(tmp_path, CYCLIC)
    errors = import_each_fresh("cyc", tmp_path)["errors"]
    assert "partially initialized" in errors["cyc.a"] or "cannot import name" in errors["cyc.a"]
    assert "cyc.lazy" not in errors and "cyc.sub.e" not in errors
