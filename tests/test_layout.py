"""The package's size limits (issue 32): no function in `lib/` over 80 lines, no module over 600.

A function's length is `end_lineno - lineno + 1` of its `def` (decorators not counted), for every def and
async def: module-level, methods and nested ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600
# (path under lib/, qualified name) of functions allowed over the limit: none.
FUNCTION_ALLOW_LIST: set[tuple[str, str]] = set()


def function_lengths(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function in `tree`, methods and nested ones included."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                name += "."
            visit(child, name)

    visit(tree, "")
    return out


def sources() -> list[tuple[str, str]]:
    return [(path.relative_to(LIB).as_posix(), path.read_text(encoding="utf-8")) for path in sorted(LIB.rglob("*.py"))]


def test_the_walk_covers_the_package():
    names = [rel for rel, _ in sources()]
    assert "metabolic/train/loop.py" in names and "metabolic/generate/budgeted.py" in names


def test_no_function_over_80_lines():
    offenders = [f"{rel}:{line} {name} ({n} lines)"
                 for rel, text in sources() for name, line, n in function_lengths(ast.parse(text))
                 if n > MAX_FUNCTION_LINES and (rel, name) not in FUNCTION_ALLOW_LIST]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them): " + "; ".join(offenders)


def test_no_module_over_600_lines():
    offenders = [f"{rel} ({len(text.splitlines())} lines)" for rel, text in sources()
                 if len(text.splitlines()) > MAX_MODULE_LINES]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines (move a cohesive part out): " + "; ".join(offenders)


def test_methods_and_nested_functions_are_measured():
    tree = ast.parse("class A:\n    @staticmethod\n    def f():\n        def g():\n            pass\n        return g\n")
    assert function_lengths(tree) == [("A.f", 3, 4), ("A.f.g", 4, 2)]


def test_the_limits_catch_an_offender():
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    ((name, _, n),) = function_lengths(ast.parse(f"async def f():\n{long_body}\n"))
    assert name == "f" and n == MAX_FUNCTION_LINES + 1 > MAX_FUNCTION_LINES
