"""Type aliases shared by the public API (one place, as kfac-jax keeps them)."""

from collections.abc import Callable
from typing import Any, TypeAlias

import jax

PyTree: TypeAlias = Any
"""A JAX pytree (nested dicts, lists, tuples, NamedTuples, Flax/NNX states) of arrays."""

Params: TypeAlias = PyTree
"""Model parameters: a pytree of floating-point arrays."""

ApplyFn: TypeAlias = Callable[[Params, PyTree], jax.Array]
"""``apply_fn(params, inputs_batch) -> logits`` of shape ``[B, C]``."""
