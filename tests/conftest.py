"""Test-wide JAX settings: strict numerics, as in equinox's tests.

No persistent XLA compilation cache: with one shared by pytest-xdist's workers (a fresh directory
per run, set through ``jax.config``), a full ``make test`` lost a worker to a segmentation fault
inside XLA while compiling a MAS program of tests/test_reference_matrix.py, and JAX writes its
cache entries without a lock or an atomic rename when eviction is off. It saved about 19% of the
CPU time of the library's test files; a crash that fails CI once in a while costs more.

Compiles are made cheaper instead: ``XLA_FLAGS`` gets LLVM's ``-O0`` (``tests/_xla.py`` says why
and how to turn it off), set here before JAX creates its backend, so that every test and every
subprocess that inherits the environment compiles the same way.
"""

import os

from _xla import run_flags

os.environ["XLA_FLAGS"] = run_flags()

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(items: list) -> None:
    """Tests marked ``slow`` run first (the order is otherwise kept): under ``pytest -n 2`` a
    minutes-long test collected last would leave one worker alone at the end of the run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
