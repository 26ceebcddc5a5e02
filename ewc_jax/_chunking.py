"""Sums over examples, a fixed-size chunk at a time, inside one ``lax.scan``.

The same scheme as :func:`ewc_jax.fisher_diagonal`: the last chunk is the final ``chunk_size``
examples and masks those an earlier chunk already counted, so every example counts once and
every chunk has the same shape (one compiled body); chunk sums are added with Kahan
compensation, so float32 totals do not drift with the number of chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ewc_jax._types import PyTree


def chunked_sum(fn: Callable[[PyTree, jax.Array], PyTree], data: PyTree, chunk_size: int) -> PyTree:
    """``Σ_chunks fn(chunk, weight)`` where ``weight`` [chunk] is 1 for examples not yet counted.

    Args:
      fn: maps a chunk of ``data`` (every leaf sliced to ``chunk_size`` along axis 0) and a
        boolean ``[chunk_size]`` weight to a pytree of sums; it must treat a weight of 0 as
        "leave this example out".
      data: a pytree whose leaves share a leading example axis N (None leaves allowed).
      chunk_size: examples per chunk; clipped to N.

    Returns:
      The total, a pytree like ``fn``'s result.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    chunk_size = min(chunk_size, n)
    num_chunks = -(-n // chunk_size)

    def chunk(i):
        start = jnp.minimum(i * chunk_size, n - chunk_size)
        weight = start + jnp.arange(chunk_size) >= i * chunk_size
        part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk_size), data)
        return fn(part, weight)

    if num_chunks == 1:
        return chunk(0)

    def body(carry, i):
        total, error = carry
        corrected = jax.tree.map(jnp.subtract, chunk(i), error)
        updated = jax.tree.map(jnp.add, total, corrected)
        error = jax.tree.map(lambda u, t, c: (u - t) - c, updated, total, corrected)
        return (updated, error), None

    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk, 0))
    (total, _), _ = jax.lax.scan(body, (zero, zero), jnp.arange(num_chunks))
    return total
