"""Test-wide JAX settings: strict numerics, as in equinox's tests.

No persistent XLA compilation cache: with one shared by pytest-xdist's workers (a fresh directory
per run, set through ``jax.config``), a full ``make test`` lost a worker to a segmentation fault
inside XLA while compiling a MAS program of tests/test_reference_matrix.py, and JAX writes its
cache entries without a lock or an atomic rename when eviction is off. It saved about 19% of the
CPU time of the library's test files; a crash that fails CI once in a while costs more.
"""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
