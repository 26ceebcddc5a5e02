"""Evaluation: the scenario's metric (accuracy, or test bits per character for a language model)
on a padded test set, in chunks, jitted (:func:`evaluate`). ``setup`` is the run's
:class:`experiments.training.steps.StepSetup`."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments.training.device import TaskData, data_sharding


def shard_batch(tree: Any, setup: Any) -> Any:
    """Splits the leading (example) axis over the mesh; a no-op without one."""
    if setup.mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, data_sharding(setup.mesh))


def evaluate_chunked(params: Any, data: TaskData, *, setup: Any) -> jax.Array:
    r"""The metric on the valid rows of ``data``, in chunks of ``eval_batch_size``.

    ``setup.metric`` ``"accuracy"``: the fraction of rows whose argmax is the label.
    ``"bits_per_character"``: the total code length of the target bytes over the number of
    characters among them (:func:`experiments.data.text.bits_per_character`),

    .. math:: \frac{-\sum_{n,t} \log_2 p(y_{nt} \mid y_{n,<t})}{\#\{(n,t): y_{nt}
        \text{ is not a UTF-8 continuation byte}\}}.

    With a mesh, the chunk is rounded up to a multiple of the device count and split over the
    devices when the capacity allows it (:func:`experiments.training.device.put_scenario` pads it
    to a multiple).
    """
    capacity = data.labels.shape[0]
    devices = setup.num_devices
    chunk = min(-(-setup.eval_batch_size // devices) * devices, capacity)
    shard = (lambda tree: shard_batch(tree, setup)) if chunk % devices == 0 else (lambda t: t)
    num_chunks = -(-capacity // chunk)

    def count(totals: tuple[jax.Array, jax.Array], index: jax.Array):
        # The last chunk overlaps the one before; rows already counted are masked.
        start = jnp.minimum(index * chunk, capacity - chunk)
        rows = start + jnp.arange(chunk)
        take = lambda a: shard(jax.lax.dynamic_slice_in_dim(a, start, chunk))
        logits = setup.model.apply({"params": params}, take(data.images), take(data.heads))
        labels = take(data.labels)
        valid = (rows < data.num_valid) & (rows >= index * chunk)
        if setup.metric == "bits_per_character":
            valid = valid.reshape(-1, *(1,) * (labels.ndim - 1))
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            starts = (labels & 0xC0) != 0x80
            numerator = jnp.sum(jnp.where(valid, nll, 0.0))
            denominator = jnp.sum((valid & starts).astype(jnp.float32))
        else:
            hits = (jnp.argmax(logits, axis=-1) == labels) & valid
            numerator, denominator = jnp.sum(hits.astype(jnp.float32)), jnp.float32(0.0)
        return (totals[0] + numerator, totals[1] + denominator), None

    zero = jnp.zeros((), jnp.float32)
    (total, characters), _ = jax.lax.scan(count, (zero, zero), jnp.arange(num_chunks))
    if setup.metric == "bits_per_character":
        return total / jnp.float32(math.log(2.0)) / characters
    return total / data.num_valid.astype(jnp.float32)


evaluate = jax.jit(evaluate_chunked, static_argnames=("setup",))
