"""Test-wide JAX settings: strict numerics, as in equinox's tests, and a compilation cache.

The persistent XLA compilation cache lives in a fresh directory for each test run (shared by
pytest-xdist's workers, removed at the end): many tests build the same program from a new
closure, which misses ``jax.jit``'s in-memory cache but not this one. It is set in this process
only (``jax.config``, not ``JAX_COMPILATION_CACHE_DIR``), so subprocesses that a test starts
compile for themselves: tests/test_sharding.py reads the HLO its subprocess dumps with
``--xla_dump_to``, which a cache hit would not write.
"""

import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_CACHE_KEY = "ewc_jax_compilation_cache_dir"
_cache_dir = pytest.StashKey[str]()


def _use_compilation_cache(path: str) -> None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config: pytest.Config) -> None:
    worker = getattr(config, "workerinput", None)
    if worker is not None:  # an xdist worker: the controller's directory
        _use_compilation_cache(worker[_CACHE_KEY])
        return
    path = tempfile.mkdtemp(prefix="ewc_jax_xla_cache_")
    config.stash[_cache_dir] = path
    _use_compilation_cache(path)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: every worker of this run shares the controller's directory."""
    node.workerinput[_CACHE_KEY] = node.config.stash[_cache_dir]


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_cache_dir, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
