"""The experiments' layout: imports point down the flow, no cycle, small modules and functions.

Read with ``ast`` only (nothing is imported), so the test is cheap. The layers, bottom first:
the spec pieces; data; scenarios; models; training; storage (checkpoints and the workdir);
reporting; the config reader; the runs and the configs; the CLI. A module imports from its own
layer or those below it, never above; every import counts, at module level or inside a function
(under ``TYPE_CHECKING`` too), and no chain of imports comes back to where it started.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = (
    "experiments.spec",
    "experiments.data",
    "experiments.scenarios",
    "experiments.models",
    "experiments.training",
    "experiments.storage",
    "experiments.reporting",
    "experiments.config",
    ("experiments.runs", "experiments.configs"),
    "experiments.main",
)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
BENCHMARKS = (
    "epoch.py",
    "checks.py",
    "memory.py",
    "sizing.py",
    "families.py",
    "reproduce_tutorial.py",
    "torch_tutorial.py",
)
"""The benchmark files held to the same size limits (the others have their own owner)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def experiment_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / "experiments").rglob("*.py"))}


def layer(name: str) -> int:
    for index, entry in enumerate(LAYERS):
        for prefix in (entry,) if isinstance(entry, str) else entry:
            if name == prefix or name.startswith(prefix + "."):
                return index
    return -1  # experiments/__init__.py: imports nothing


def imports(path: Path, known: set[str]) -> set[str]:
    """The experiments modules ``path`` imports anywhere in its body (a name imported from a
    package that is itself a module counts as that module)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("experiments"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("experiments"):
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return found


def graph() -> dict[str, set[str]]:
    modules = experiment_modules()
    return {name: imports(path, set(modules)) for name, path in modules.items()}


def test_every_import_points_down_the_flow():
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in graph().items()
        for target in targets
        if layer(target) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of its modules, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_known_cycle_and_none_in_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    # A package's __init__ re-exports its modules; a module importing its own package's
    # __init__ would close a loop through it, and is counted like any other import.
    assert find_cycle(graph()) is None


def code_lines(node: ast.AST, source: list[str]) -> int:
    """Lines of a function that hold code: no docstring, blank or comment-only lines."""
    body = node.body
    skip = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = range(node.lineno, node.end_lineno + 1)
    return sum(
        1
        for n in lines
        if n not in skip and source[n - 1].strip() and not source[n - 1].strip().startswith("#")
    )


def checked_files() -> list[Path]:
    return [*experiment_modules().values(), *(REPO / "benchmarks" / f for f in BENCHMARKS)]


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_and_function_sizes(path):
    text = path.read_text()
    source = text.splitlines()
    assert len(source) <= MAX_MODULE_LINES, f"{len(source)} lines"
    long = [
        f"{node.name}: {code_lines(node, source)} lines of code"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and code_lines(node, source) > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_method_names_live_in_the_table_only():
    """No ``method == "..."`` or ``name in ("ewc", ...)`` outside the table of methods."""
    table = REPO / "experiments" / "training" / "methods.py"
    names = {
        node.args[0].value
        for node in ast.walk(ast.parse(table.read_text()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "Method"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert {"finetune", "l2", "ewc", "online_ewc", "si", "mas", "kfac", "joint"} <= names
    offenders = []
    for name, path in experiment_modules().items():
        if name in ("experiments.training.methods",) or name.startswith("experiments.configs"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    many = isinstance(side, ast.Tuple | ast.List | ast.Set)
                    values = side.elts if many else [side]
                    hits = [v.value for v in values if isinstance(v, ast.Constant)]
                    if names & set(hits):
                        offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders
