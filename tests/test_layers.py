"""The package's architecture, enforced: imports point one way down the stage order, no cycles,
and no function-local import of a `metabolic` module outside the command-line entry point.

Layer order (a module may import its own layer and the layers before it, never a later one):

    core -> data -> csc -> model -> train -> generate -> evaluate -> energy -> pipeline -> report -> cli

`core` holds what every layer needs (config, errors, artefacts, assets, numerics); `pipeline` is the only
layer that runs stages and unpacks `StudyConfig` into the config sections domain code takes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import metabolic
import pytest

LAYERS = ("core", "data", "csc", "model", "train", "generate", "evaluate", "energy", "pipeline", "report", "cli")
PACKAGE = Path(metabolic.__file__).resolve().parent
# Modules whose function-local `metabolic` imports are allowed: the command-line entry point imports
# lazily so that `numerics.pin` runs before anything loads torch.
LAZY_ALLOWED = {"metabolic.cli"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    """Rank of a module in LAYERS; the package root (`__version__` only) is below everything."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    head = "cli" if parts[1] in ("cli", "__main__") else parts[1]
    if head not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its subpackage to LAYERS in {__file__}")
    return LAYERS.index(head)


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported metabolic module, line, function-local?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    local_lines.add(inner.lineno)
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == "metabolic" or a.name.startswith("metabolic.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "metabolic" or node.module.startswith("metabolic.")):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                targets.append(sub if sub in modules else node.module)
        for target in targets:
            out.append((target, node.lineno, node.lineno in local_lines))
    return out


MODULES = _modules()
EDGES = {name: _imports(path, MODULES) for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layer_order(module):
    mine = _layer(module)
    upward = [f"line {line}: {target} ({LAYERS[_layer(target)]})" for target, line, _ in EDGES[module]
              if _layer(target) > mine]
    where = LAYERS[mine] if mine >= 0 else "root"
    assert not upward, f"{module} ({where}) imports a later layer: " + "; ".join(upward)


@pytest.mark.parametrize("module", sorted(set(MODULES) - LAZY_ALLOWED))
def test_no_function_local_import_of_metabolic(module):
    lazy = [f"line {line}: {target}" for target, line, local in EDGES[module] if local]
    assert not lazy, f"{module} imports metabolic modules inside functions (move them to the top): " + "; ".join(lazy)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in EDGES[m] if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_subpackage_is_a_layer():
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert found == set(LAYERS) - {"cli"}


def test_numerics_never_imports_torch():
    """`metabolic.core.numerics` must run before torch loads (it sets the environment torch reads)."""
    tree = ast.parse((PACKAGE / "core" / "numerics.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "metabolic"}, f"numerics imports {names} at module level: standard library only"


def test_only_pipeline_and_report_unpack_the_study_config():
    """Domain code takes its own config section or plain arguments; the whole StudyConfig stays in
    core (where it is defined), pipeline (which runs stages) and report (notebook glue, figure stamps)."""
    allowed = {"core", "pipeline", "report"}
    for module, path in _modules().items():
        parts = module.split(".")
        if len(parts) > 1 and parts[1] in allowed:
            continue
        assert "StudyConfig" not in path.read_text(encoding="utf-8"), f"{module} uses StudyConfig: pass it a config section"


def test_pipeline_modules_stay_small():
    """One small module per stage: no module of `pipeline` grows into a hub again (issue 23: <= 450 lines)."""
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items() if m.startswith("metabolic.pipeline.")}
    assert sizes and not {m: n for m, n in sizes.items() if n > 450}
