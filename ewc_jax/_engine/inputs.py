"""Checks of the data the estimators take: inputs, labels, token masks, chunk sizes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._types import PyTree
from ewc_jax._validation import concrete_or_none, fail_if, holds


def num_examples(inputs: PyTree) -> int:
    """N, the leading example axis every leaf of ``inputs`` shares."""
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("inputs has no array leaves.")
    scalars = sum(not hasattr(x, "shape") for x in leaves)
    if scalars:
        raise ValueError(
            f"inputs holds {scalars} Python scalars (a {type(inputs).__name__} of numbers?); "
            "pass an array with a leading example axis, e.g. jnp.asarray(inputs)."
        )
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [np.shape(x) for x in leaves]
        listed = ", ".join(map(str, shapes[:4])) + (", ..." if len(shapes) > 4 else "")
        raise ValueError(
            "every leaf of inputs needs the same leading example axis N; got shapes "
            f"{listed} ({len(shapes)} leaves)."
        )
    (n,) = sizes
    if n == 0:
        raise ValueError("inputs is empty (N = 0): the Fisher needs at least one example.")
    return int(n)


def checked_labels(labels: Any, shape: tuple[int, ...], num_classes: int) -> jax.Array:
    if np.shape(labels) != shape:
        what = "[N]" if len(shape) == 1 else "[N, T] (one label per token)"
        raise ValueError(f"labels must have shape {what} = {shape}, got {np.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}.")
    out_of_range = lambda y: jnp.any((y < 0) | (y >= num_classes))

    def found() -> str:
        value = np.asarray(labels)
        return f"; found {value[(value < 0) | (value >= num_classes)][:5].tolist()}."

    message = f"labels must lie in [0, {num_classes}) for the model's {num_classes} logits"
    labels = fail_if(labels, [(holds(out_of_range, labels), message, found)])
    return jnp.asarray(labels, jnp.int32)


def estimator_labels(
    estimator: str, labels: Any, shape: tuple[int, ...], num_classes: int
) -> jax.Array | None:
    """The checked labels for the estimators that use them (``"empirical"``, ``"batched"``),
    None for the others (they draw or choose their own)."""
    if estimator not in ("empirical", "batched"):
        return None
    if labels is None:
        raise ValueError(f"estimator={estimator!r} needs labels (the true class of each input).")
    return checked_labels(labels, shape, num_classes)


def checked_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
    if mask is None:
        return None
    if len(shape) == 1:
        raise ValueError(
            "mask selects tokens of sequence outputs [B, T, C]; this apply_fn returns [B, C]. "
            "To leave examples out, leave them out of inputs."
        )
    if np.shape(mask) != shape:
        raise ValueError(f"mask must have shape [N, T] = {shape}, got {np.shape(mask)}.")
    dtype = jnp.result_type(mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.number)):
        raise ValueError(f"mask must be booleans or 0/1 numbers, got dtype {dtype}.")
    value = concrete_or_none(mask)
    if value is not None and not np.isin(value, (0, 1)).all():
        raise ValueError("mask must hold only 0/1 (or False/True): it selects tokens.")
    mask = jnp.asarray(mask, jnp.bool_)
    message = (
        "mask selects no token (it is all zeros), so the Fisher would be zero; select at "
        "least one token (an empty input is refused the same way)"
    )
    return fail_if(mask, [(holds(lambda m: ~jnp.any(m), mask), message, lambda: ".")])


def check_key(key: object) -> None:
    """``key`` for ``estimator="sampled"``: a PRNG key (typed, or a legacy ``uint32[2]``)."""
    if key is None:
        raise ValueError("estimator='sampled' needs key, e.g. key=jax.random.key(0).")
    if isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        return
    raise TypeError(
        f"key must be a PRNG key, e.g. key=jax.random.key({key!r}) for a seed; got "
        f"{type(key).__name__} {key!r}."
        if isinstance(key, int)
        else f"key must be a PRNG key, e.g. key=jax.random.key(0); got {type(key).__name__}."
    )


def check_positive(name: str, value: int | None) -> None:
    """``chunk_size``/``batch_size``: None or a positive int."""
    if value is not None and (not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
