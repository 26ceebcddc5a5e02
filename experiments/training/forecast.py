r"""The forgetting forecast: how much the quadratic penalty says each earlier task has forgotten.

EWC rests on one assumption: near task :math:`k`'s solution :math:`θ^*_k`, its mean loss is the
quadratic of its Fisher :math:`F_k`,

.. math::
    L_k(θ) - L_k(θ^*_k) \approx \frac12 (θ - θ^*_k)^\top F_k (θ - θ^*_k).

After each task :math:`t`, for every earlier task :math:`k < t`, the loop puts the predicted
rise of task :math:`k`'s mean loss at :math:`θ_t` (:func:`predicted_rise`) beside the measured
one, :math:`L_k(θ_t) - L_k(θ^*_k)` on task :math:`k`'s training and test data
(:func:`mean_loss`). :math:`F_k` is task :math:`k`'s own precision, not the consolidated one:
the diagonal Fisher (EWC, online EWC) or its Kronecker factors (K-FAC), from the method's own
estimator. For a language model both are per token: the Fisher of a sequence's log-likelihood
(:func:`ewc_jax.fisher_diagonal` on ``[B, T, C]`` logits) is divided by the ``T`` positions,
as the loss is their mean.

Memory: every single run of a method whose entry is
:attr:`~experiments.training.methods.Method.laplace` keeps, for every task, its solution and its
own Fisher (:class:`ForecastStore`, allocated at the start for all tasks so that the jitted
steps never see a new shape): ``2 × tasks × parameters`` floats for a diagonal Fisher (the
demo's MLP: 4 × 2 × 89,610 × 4 bytes = 2.9 MB; 20 tasks of a 784-1000-1000 MLP: 0.6 GB), and
the Kronecker factors instead of the second copy for K-FAC. Sweeps keep none (no forecast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import ewc_jax
from experiments.training.device import TaskData


class ForecastStore(NamedTuple):
    """Every task's solution and own precision, each leaf with a leading ``[num_tasks]`` axis.

    Attributes:
        anchors: params-shaped, :math:`θ^*_k` at row ``k``.
        precisions: params-shaped (diagonal Fisher) or a :class:`ewc_jax.kfac.KFACFisher`,
            :math:`F_k` at row ``k``; zero for tasks not finished yet.
    """

    anchors: Any
    precisions: Any


def empty_store(params: Any, precision_shapes: Any, num_tasks: int) -> ForecastStore:
    """Zeros for ``num_tasks`` tasks: ``precision_shapes`` is a tree of arrays or
    ``jax.ShapeDtypeStruct`` shaped like one task's precision."""

    def rows(leaf: Any) -> jax.Array:
        return jnp.zeros((num_tasks, *leaf.shape), leaf.dtype)

    return ForecastStore(jax.tree.map(rows, params), jax.tree.map(rows, precision_shapes))


def record(store: ForecastStore, task: jax.Array, params: Any, precision: Any) -> ForecastStore:
    """``store`` with row ``task`` set to the task's solution and own precision."""

    def put(rows: jax.Array, value: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_index_in_dim(rows, value.astype(rows.dtype), task, 0)

    return ForecastStore(
        jax.tree.map(put, store.anchors, params), jax.tree.map(put, store.precisions, precision)
    )


@jax.jit
def predicted_rise(params: Any, store: ForecastStore, task: jax.Array, tokens: jax.Array):
    r""":math:`\frac{1}{T}\,\frac12 (θ - θ^*_k)^\top F_k (θ - θ^*_k)` for row ``k = task``.

    The quadratic is :func:`ewc_jax.penalty` of the one-task state
    ``ewc_jax.consolidate(None, θ*_k, F_k)`` at strength 1 (diagonal, or the Kronecker
    quadratics of a :class:`ewc_jax.kfac.KFACFisher`), over the parameters :math:`F_k` covers
    (a LoRA run's K-FAC factors cover the adapters only); ``tokens`` is :math:`T`, the positions
    a sequence's Fisher sums over (1 for a classifier).
    """
    row = jax.tree.map(lambda rows: rows[task], store)
    where = _covered(row.precisions)
    one_task = ewc_jax.consolidate(None, row.anchors, row.precisions, where=where)
    return ewc_jax.penalty(params, one_task, 1.0, where=where) / tokens


def _covered(precision: Any) -> Any:
    """The ``where=`` of the leaves a precision covers: False where it holds an
    ``optax.MaskedNode()`` (computed with ``where=``), True elsewhere."""
    tree = precision.diagonal if isinstance(precision, ewc_jax.kfac.KFACFisher) else precision
    is_masked = lambda node: isinstance(node, optax.MaskedNode)
    return jax.tree.map(lambda node: not is_masked(node), tree, is_leaf=is_masked)


def _mean_loss(params: Any, data: TaskData, *, setup: Any) -> jax.Array:
    """Mean cross-entropy over the valid rows of ``data`` (per token for sequences), in chunks
    of ``eval_batch_size`` (the same chunks as :func:`experiments.training.steps.evaluate`);
    ``setup`` is the run's :class:`experiments.training.steps.StepSetup` (which imports this
    module, so it is not named in the signature)."""
    capacity = data.labels.shape[0]
    chunk = min(setup.eval_batch_size, capacity)
    num_chunks = -(-capacity // chunk)

    def add(total: jax.Array, index: jax.Array):
        start = jnp.minimum(index * chunk, capacity - chunk)
        rows = start + jnp.arange(chunk)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk)
        logits = setup.model.apply({"params": params}, take(data.images), take(data.heads))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, take(data.labels))
        ce = jnp.mean(ce.reshape(ce.shape[0], -1), axis=1)  # a sequence's mean over positions
        valid = (rows < data.num_valid) & (rows >= index * chunk)
        return total + jnp.sum(jnp.where(valid, ce, 0.0)), None

    total, _ = jax.lax.scan(add, jnp.zeros((), jnp.float32), jnp.arange(num_chunks))
    return total / data.num_valid.astype(jnp.float32)


mean_loss = jax.jit(_mean_loss, static_argnames=("setup",))
"""The mean cross-entropy of ``params`` on a task's data (:func:`_mean_loss`), jitted."""


def measure(
    params: Any,
    store: ForecastStore,
    loss: Callable[[Any, TaskData], jax.Array],
    data: Any,
    own_losses: list[list[float]],
    task: int,
) -> tuple[list[float], list[dict[str, Any]]]:
    """The forecast after task ``task``: its own losses, and for every earlier task ``k`` the
    predicted and measured rises of its mean loss.

    Args:
        params: the parameters at the end of task ``task`` (:math:`θ_t`).
        store: every finished task's solution and own precision.
        loss: ``loss(params, task_data)``, the mean loss (:func:`mean_loss` bound to a setup).
        data: the scenario on device (:class:`experiments.training.device.DeviceScenario`).
        own_losses: ``[train, test]`` mean loss of each earlier task at its own end.
        task: the task just finished.

    Returns:
        ``[train, test]`` mean loss of task ``task`` now, and one entry per earlier task:
        ``after_task``, ``task``, ``predicted``, ``measured_train``, ``measured_test``.
    """
    tokens = jnp.float32(tokens_per_example(data.train[task]))
    pairs = []
    for k in range(task):
        train_rise = float(loss(params, data.train[k])) - own_losses[k][0]
        test_rise = float(loss(params, data.test[k])) - own_losses[k][1]
        predicted = predicted_rise(params, store, jnp.int32(k), tokens)
        pairs.append(
            {
                "after_task": task,
                "task": k,
                "predicted": float(predicted),
                "measured_train": train_rise,
                "measured_test": test_rise,
            }
        )
    own = [float(loss(params, data.train[task])), float(loss(params, data.test[task]))]
    return own, pairs


def tokens_per_example(data: TaskData) -> int:
    """The positions a sequence's Fisher sums over: ``T`` of ``[N, T]`` labels, else 1."""
    return 1 if data.labels.ndim == 1 else int(data.labels.shape[1])
