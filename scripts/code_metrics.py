"""Count the seams that the house plan cares about, per top-level folder of ``megatron_grow/``.

Prints, per folder: lines of code (not blank, comment or docstring lines), imports inside
function bodies (and per 1,000 lines), and the share of public definitions (module-level
functions and classes, and public methods of public classes, whose names do not start with
``_``) that carry a docstring, and the share whose docstring names its arguments (an
``Args:`` section, for those that take arguments).

    python scripts/code_metrics.py            # the table
    python scripts/code_metrics.py --list cli # also list the function-level imports of one folder
"""

from __future__ import annotations

import argparse
import ast
import pathlib
from collections import defaultdict

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "megatron_grow"


def _folder(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else "(top)"


def _function_level_imports(tree: ast.AST) -> list[int]:
    lines = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lines.append(node.lineno)
    return sorted(set(lines))


def _docstring_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def _public_definitions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                        yield item


def _takes_arguments(node) -> bool:
    if isinstance(node, ast.ClassDef):
        return False
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return any(n not in ("self", "cls") for n in names)


def measure() -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        row = stats[_folder(path)]
        docs = _docstring_lines(tree)
        row["lines"] += sum(1 for i, line in enumerate(text.splitlines(), 1)
                            if line.strip() and not line.strip().startswith("#") and i not in docs)
        row["function_imports"] += len(_function_level_imports(tree))
        for node in _public_definitions(tree):
            doc = ast.get_docstring(node) or ""
            row["public"] += 1
            row["documented"] += bool(doc)
            if _takes_arguments(node):
                row["with_args"] += 1
                row["args_documented"] += "Args:" in doc
    return stats


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _row(name: str, row: dict[str, int]) -> str:
    per_1k = 1000 * row["function_imports"] / row["lines"]
    return (f"{name:<12} {row['lines']:>6} {row['function_imports']:>10} {per_1k:>6.1f} "
            f"{_percent(row['documented'], row['public']):>9} {_percent(row['args_documented'], row['with_args']):>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", metavar="FOLDER", help="list the function-level imports of this folder")
    args = parser.parse_args()
    stats = measure()
    total: dict[str, int] = defaultdict(int)
    print(f"{'folder':<12} {'lines':>6} {'fn-imports':>10} {'per 1k':>6} {'docstring':>9} {'Args:':>6}")
    for folder in sorted(stats):
        for key, value in stats[folder].items():
            total[key] += value
        print(_row(folder, stats[folder]))
    outside_cli = total["function_imports"] - stats.get("cli", {}).get("function_imports", 0)
    print(_row("total", total))
    print(f"function-level imports outside cli/: {outside_cli}")
    if args.list:
        for path in sorted(PACKAGE.rglob("*.py")):
            if _folder(path) == args.list:
                for lineno in _function_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
                    line = path.read_text(encoding="utf-8").splitlines()[lineno - 1].strip()
                    print(f"  {path.relative_to(PACKAGE.parent)}:{lineno}: {line}")


if __name__ == "__main__":
    main()
