"""The package's import graph: no module of src/sparselm imports, directly or through others, a module that imports it.

Every `import`/`from … import` counts, at the top of a module and inside functions alike (a function-level import
that closes a cycle only postpones it). Imports under `if TYPE_CHECKING:` never run and are left out: they name
types for annotations only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sparselm

PACKAGE_ROOT = Path(sparselm.__file__).parent
Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    parts = ["sparselm", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, path: Path) -> str:
    """The package a module's relative imports start from (a package's `__init__` is its own package)."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def runtime_import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the module except those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imported_modules(node: ast.Import | ast.ImportFrom, package: str, modules: set[str]) -> set[str]:
    """The sparselm modules one statement imports: `from pkg import sub` is the submodule when `sub` is one."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    targets = {f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names}
    return targets & modules


def import_graph(root: Path = PACKAGE_ROOT) -> Graph:
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: Graph = {}
    for name, path in files.items():
        package = package_of(name, path)
        edges: set[str] = set()
        for node in runtime_import_nodes(ast.parse(path.read_text(), filename=str(path))):
            edges |= imported_modules(node, package, set(files))
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as the list of modules along it (first == last), or None when the graph is acyclic."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_storage_and_the_lower_layers_never_import_the_model_loader():
    """Data flows one way: models → weights → masks → storage/runtime; `models` may use storage, never the reverse."""
    graph = import_graph()
    lower = ("sparselm.storage", "sparselm.sources", "sparselm.facts", "sparselm.weights", "sparselm.masks",
             "sparselm.io")
    assert "sparselm.storage" in graph["sparselm.models"]  # the loader opens packed directories through storage
    assert sorted(name for name in graph if name.startswith(lower) and "sparselm.models" in graph[name]) == []


def test_evaluation_never_imports_what_changes_a_model():
    graph = import_graph()
    writers = ("sparselm.pruning", "sparselm.finetune", "sparselm.recovery", "sparselm.storage.pack")
    offenders = {name: sorted(t for t in graph[name] if t.startswith(writers))
                 for name in graph if name.startswith("sparselm.evaluation")}
    assert {name: found for name, found in offenders.items() if found} == {}


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "sparselm"
    for relative, text in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    return package


def test_a_cycle_through_a_function_level_import_is_found_and_named(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    from .sub.g import h\n",
        "sub/__init__.py": "app = 1\n",
        "sub/g.py": "from .. import a\n\ndef h():\n    pass\n",
        "sub/k.py": "from . import app\n",
    })
    graph = import_graph(package)
    assert graph["sparselm.sub.g"] == {"sparselm.a"}  # `from .. import a` imports the module a
    assert graph["sparselm.sub.k"] == {"sparselm.sub"}  # `app` is a name in sub/__init__, not a module
    assert find_cycle(graph) == ["sparselm.a", "sparselm.b", "sparselm.sub.g", "sparselm.a"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"__init__.py": "", "a.py": "from .b import x\n", "b.py": "def f():\n    from .a import y\n"},
         ["sparselm.a", "sparselm.b", "sparselm.a"]),
        ({"__init__.py": "", "a.py": "import sparselm.c\n", "b.py": "from . import a\n",
          "c.py": "from .b import z\n"},
         ["sparselm.a", "sparselm.c", "sparselm.b", "sparselm.a"]),
    ],
)
def test_cycles_are_reported_along_their_path(tmp_path, files, expected):
    assert find_cycle(import_graph(write_package(tmp_path, files))) == expected


def test_type_checking_imports_are_not_edges(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .b import B\nelse:\n    from .c import C\n",
        "b.py": "from .a import A\n",
        "c.py": "",
    })
    graph = import_graph(package)
    assert graph["sparselm.a"] == {"sparselm.c"}
    assert find_cycle(graph) is None
