"""Sums over examples, a fixed-size chunk at a time, inside one ``lax.scan``: the one chunked sum.

The last chunk is the final ``chunk_size`` examples and masks those an earlier chunk already
counted, so every example counts once and every chunk has the same shape (one compiled body);
chunk sums are added with Kahan compensation, so float32 totals stay within about 1e-7 of a
float64 computation however many chunks there are.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ewc_jax._types import PyTree


def kahan_sum(term: Callable[[jax.Array], PyTree], zero: PyTree, num_chunks: int) -> PyTree:
    """``Σ_i term(i)`` over ``num_chunks`` chunks in a ``lax.scan``, with Kahan compensation: the
    running total's rounding error is carried along and added back, so the error does not grow
    with the number of chunks. ``zero`` is a pytree of zeros shaped like ``term``'s result."""
    if num_chunks == 1:
        return term(0)

    def body(carry, i):
        total, error = carry
        corrected = jax.tree.map(jnp.subtract, term(i), error)
        updated = jax.tree.map(jnp.add, total, corrected)
        error = jax.tree.map(lambda u, t, c: (u - t) - c, updated, total, corrected)
        return (updated, error), None

    (total, _), _ = jax.lax.scan(body, (zero, zero), jnp.arange(num_chunks))
    return total


def even_chunk_size(chunk_size: int, n: int) -> int:
    """The smallest chunk size that covers ``n`` examples in as many chunks as ``chunk_size``.

    :func:`chunked_sum`'s last chunk overlaps the one before it and computes the overlap only
    to mask it out: ``n = 256`` in chunks of 116 computes 348 examples, in chunks of 86 only
    258, with the same number of chunks and no more memory per chunk.
    """
    num_chunks = -(-n // min(chunk_size, n))
    return -(-n // num_chunks)


def chunked_sum(
    fn: Callable[[PyTree, jax.Array], PyTree],
    data: PyTree,
    chunk_size: int,
    *,
    num_valid: jax.Array | int | None = None,
    zero: PyTree | None = None,
) -> PyTree:
    """``Σ_chunks fn(chunk, weight)`` where ``weight`` [chunk] is True for examples to count.

    Args:
      fn: maps a chunk of ``data`` (every leaf sliced to ``chunk_size`` along axis 0) and a
        boolean ``[chunk_size]`` weight to a pytree of sums; it must treat a weight of False as
        "leave this example out".
      data: a pytree whose leaves share a leading example axis N (None leaves allowed).
      chunk_size: examples per chunk; clipped to N.
      num_valid: count only the first ``num_valid`` examples (the rest are padding); default N.
      zero: zeros shaped like ``fn``'s result; default: found by tracing ``fn`` once more.

    Returns:
      The total, a pytree like ``fn``'s result.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    chunk_size = min(chunk_size, n)
    num_chunks = -(-n // chunk_size)

    def chunk(i):
        # The last chunk is the final `chunk_size` examples; those already counted are masked,
        # and so are padding examples past `num_valid`.
        start = jnp.minimum(i * chunk_size, n - chunk_size)
        index = start + jnp.arange(chunk_size)
        weight = index >= i * chunk_size
        if num_valid is not None:
            weight = weight & (index < num_valid)
        part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk_size), data)
        return fn(part, weight)

    if zero is None and num_chunks > 1:
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk, 0))
    return kahan_sum(chunk, zero, num_chunks)
