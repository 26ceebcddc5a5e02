"""Every public function and class carries an example, and every example runs (doctest).

The examples are known answers worked by hand in their comments (a Fisher at zero weights, a
merged anchor, a penalty), so a doctest that passes checks the code as well as the docs. They
run under JAX's default numerics, as a reader who copies them would (the suite's strict dtype
and rank promotion would reject ``x @ w + b``).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io

import jax
import pytest

PUBLIC_MODULES = (
    "ewc_jax",
    "ewc_jax.kfac",
    "ewc_jax.importance",
    "ewc_jax.evidence",
    "ewc_jax.io",
)


def _public_callables() -> dict[str, object]:
    found = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found[f"{module_name}.{name}"] = obj
    return found


PUBLIC = _public_callables()


def test_the_public_names_were_found():
    assert {"ewc_jax.fisher_diagonal", "ewc_jax.kfac.kfac_fisher", "ewc_jax.Precision"} <= set(
        PUBLIC
    )


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_example_runs(name):
    obj = PUBLIC[name]
    doc = obj.__doc__ or ""
    assert ">>>" in doc, f"{name} has no doctest example"
    assert "Example::" not in doc, f"{name} has an example that is not a doctest"
    (test,) = doctest.DocTestFinder(recurse=False).find(obj, name, module=False, globs={})
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        result = runner.run(test, out=report.write)
    assert result.attempted > 0
    assert result.failed == 0, report.getvalue()
