"""The package's house plan, checked: imports only point down the layers, and functions stay short.

Layers, bottom to top (a module may import its own layer and the layers below it):

    errors < config < platform < parallel < log < models < checkpoint < data
           < growth | training (side by side: never import each other)
           < analysis < interop < experiments < cli < __main__

Read by parsing every module (imports inside functions included), so a lazy import cannot
hide an upward dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_grow"

LAYERS = [
    ("errors",), ("config",), ("platform",), ("parallel",), ("log",), ("models",), ("checkpoint",), ("data",),
    ("growth", "training"), ("analysis",), ("interop",), ("experiments",), ("cli",), ("__main__",),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_FUNCTION_LINES = 60


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
        if top == "__init__":
            continue
        yield path, top, ast.parse(path.read_text(encoding="utf-8"))


def _imported_packages(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_grow."):
            yield node.lineno, node.module.split(".")[1]
        elif isinstance(node, ast.ImportFrom) and node.module == "megatron_grow":
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_grow."):
                    yield node.lineno, alias.name.split(".")[1]


def test_every_top_level_module_has_a_layer():
    unknown = sorted({top for _, top, _ in _modules()} - set(LEVEL))
    assert not unknown, f"add {unknown} to LAYERS in this test (and to README's layout)"


def test_imports_only_point_down():
    upward = []
    for path, top, tree in _modules():
        for lineno, target in _imported_packages(tree):
            if target not in LEVEL or top not in LEVEL:
                continue
            same_rank_sibling = LEVEL[target] == LEVEL[top] and target != top
            if LEVEL[target] > LEVEL[top] or same_rank_sibling:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{lineno} ({top} -> {target})")
    assert not upward, "imports that point up (or between growth and training):\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    tree = ast.parse("from megatron_grow.training.trainer import Trainer\n")
    assert [t for _, t in _imported_packages(tree)] == ["training"]
    assert LEVEL["training"] > LEVEL["config"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
    return ".".join(parts)


def _import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over ``sources`` (``{module name: source}``), counting
    imports anywhere in the file (inside functions and ``if TYPE_CHECKING:`` too)."""
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # ``from pkg import mod`` imports the module pkg.mod when there is one, else names of pkg
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in sources else node.module
                           for a in node.names]
            graph[name].update(t for t in targets if t in sources and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found




def test_no_import_cycles_within_a_folder():
    """Imports only point down between folders (above), so a cycle can only close inside one folder:
    none may, not even through an import inside a function."""
    sources = {_module_name(p): p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}
    cycles = _cycles(_import_graph(sources))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_function_level_cycle():
    sources = {
        "megatron_grow.parallel.a": "from megatron_grow.parallel.b import f\n",
        "megatron_grow.parallel.b": "def f():\n    from megatron_grow.parallel import a\n",
        "megatron_grow.parallel.c": "from megatron_grow.parallel import a\n",
    }
    assert _cycles(_import_graph(sources)) == [["megatron_grow.parallel.a", "megatron_grow.parallel.b"]]


def test_the_entry_point_names_no_command():
    """``__main__`` dispatches by what a command module declares, so adding a command is adding its file."""
    from megatron_grow.__main__ import available_commands

    tree = ast.parse((PACKAGE / "__main__.py").read_text(encoding="utf-8"))
    code = [node for node in tree.body if not isinstance(node, ast.Expr)]  # the module docstring may give examples
    named = sorted({node.value for part in code for node in ast.walk(part)
                    if isinstance(node, ast.Constant) and node.value in available_commands()})
    assert not named, f"__main__.py special-cases commands {named}: declare it in the command's module instead"


def _literals_outside(allowed: set[str], keep) -> list[str]:
    found = []
    for path, _, tree in _modules():
        rel = str(path.relative_to(PACKAGE))
        if rel in allowed:
            continue
        found += [f"{rel}:{node.lineno}" for node in ast.walk(tree) if keep(node)]
    return found


def test_exit_codes_are_defined_once():
    """``errors.py`` names the exit codes; no other module assigns or returns them as bare numbers."""
    def bare_exit_code(node) -> bool:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and type(node.value.value) is int:
            return any(isinstance(t, ast.Name) and "EXIT" in t.id for t in node.targets)
        return isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) \
            and type(node.value.value) is int and node.value.value in (2, 3, 4)

    found = _literals_outside({"errors.py"}, bare_exit_code)
    assert not found, f"exit codes spelled as numbers (import them from megatron_grow.errors): {found}"


def test_hf_classes_are_named_only_by_their_family():
    """A supported Hugging Face class is named once, in its ``interop/hf/families/<name>.py``."""
    def class_name(node) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith("ForCausalLM")

    families = {str(p.relative_to(PACKAGE)) for p in (PACKAGE / "interop" / "hf" / "families").glob("*.py")}
    found = _literals_outside(families, class_name)
    assert not found, f"HF class names outside interop/hf/families/ (import FAMILIES instead): {found}"
