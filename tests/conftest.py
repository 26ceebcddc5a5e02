"""Test-wide JAX settings: strict numerics, as in equinox's tests."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
