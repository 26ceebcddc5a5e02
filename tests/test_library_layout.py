"""The library's layout rules, checked by parsing ``ewc_jax/`` with ``ast``.

* no module imports another module's private names (``_x`` functions, classes or constants;
  importing a private *module*, such as ``ewc_jax._engine.plan``, is how the package is built);
* no function-level imports, and no import cycle between the library's modules;
* no module over 500 lines, no function over 80 lines of code (docstring, blank and comment
  lines aside).

(tests/test_layout.py is the experiments' layout test.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ewc_jax"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> list[tuple[ast.stmt, str, str | None]]:
    """``(node, imported module, imported name or None)`` for every import in ``module``."""
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found += [(node, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    found.append((node, f"{source}.{alias.name}", None))
                else:
                    found.append((node, source, alias.name))
    return found


def test_the_parse_found_the_library():
    assert {"ewc_jax", "ewc_jax._fisher", "ewc_jax._engine.plan", "ewc_jax.kfac"} <= set(MODULES)


def test_no_module_imports_another_modules_private_names():
    bad = [
        f"{module}: from {source} import {name}"
        for module in MODULES
        for _, source, name in _imports(module)
        if source.startswith("ewc_jax") and name is not None and name.startswith("_")
    ]
    # `module._name` on an imported library module, too.
    for module, tree in TREES.items():
        imported = {
            (alias.asname or alias.name.rpartition(".")[2])
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("ewc_jax")
            for alias in node.names
            if f"{_resolve(module, node)}.{alias.name}" in MODULES
        }
        bad += [
            f"{module}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_function_level_imports():
    bad = []
    for module, tree in TREES.items():
        top = set(map(id, tree.body))
        bad += [
            f"{module}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top
        ]
    assert not bad, "imports inside functions or blocks: " + ", ".join(bad)


def test_no_import_cycle():
    graph = {
        module: {
            target
            for _, target, _ in _imports(module)
            if target in MODULES and target != module and not module.startswith(f"{target}.")
        }
        for module in MODULES
    }
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        if module in visiting:
            cycle = [*visiting[visiting.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines"


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    nested_docs = set()
    for node in ast.walk(function):
        if (
            node is not function
            and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        ):
            doc = node.body[0]
            nested_docs.update(range(doc.lineno, doc.end_lineno + 1))
    lines = source[body[0].lineno - 1 : function.end_lineno]
    return sum(
        1
        for number, line in enumerate(lines, start=body[0].lineno)
        if line.strip() and not line.strip().startswith("#") and number not in nested_docs
    )


def test_functions_are_short():
    long = []
    for module, tree in TREES.items():
        source = MODULES[module].read_text().splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = _code_lines(node, source)
                if count > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {count} lines of code")
    assert not long, "\n".join(long)
