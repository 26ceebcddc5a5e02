"""The end of a task: the method's importance folded into the consolidated state, and the
steps of :mod:`experiments.training.steps` under ``jax.vmap`` over a sweep's run axis.

A sweep runs the same functions over a leading run axis of the state (:func:`sweep_init`,
:func:`sweep_train_epoch`, ...): seeds and strengths are data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

import ewc_jax
import ewc_jax.evidence
from experiments.training import forecast
from experiments.training.device import TaskData
from experiments.training.methods import ImportanceInputs, MethodSpec, fisher_importance
from experiments.training.steps import (
    StepSetup,
    TrainState,
    evaluate_chunked,
    init_state,
    keep_layout,
    reset_optimizer,
    scan_epoch,
)


def fisher(
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    heads: jax.Array,
    key: jax.Array,
    *,
    setup: StepSetup,
    method: MethodSpec,
) -> Any:
    """The diagonal Fisher of ``method.estimator`` over the given examples (EWC's importance).

    With a mesh the examples are split over its devices by :func:`ewc_jax.fisher_diagonal`,
    which pads a count not divisible by the device count and masks the padding.
    """
    inputs = ImportanceInputs(
        setup.logits, params, None, images, labels, heads, key, setup.mesh, method, setup.where
    )
    return fisher_importance(inputs)[0]


def consolidate_task(
    state: TrainState,
    images: jax.Array | None,
    labels: jax.Array | None,
    heads: jax.Array | None,
    *,
    setup: StepSetup,
    method: MethodSpec,
) -> TrainState:
    r"""Folds the finished task into the EWC state with the method's importance.

    The importance is the method's entry of :data:`experiments.training.methods.METHODS`; its
    ``mode`` says how it joins the earlier tasks' (``separate``: one quadratic per task;
    ``online``: summed, with decay ``gamma`` when the method ``decays``, anchored at the latest
    parameters); with adapters (``setup.lora``) the state covers them only (``where=``), the
    importance's other leaves dropped (K-FAC computes none: a block per adapter factor, none
    for the frozen base). K-FAC's Kronecker terms of all tasks are merged into one
    per layer, :math:`(\sum_t A_t) ⊗ (\frac1T \sum_t G_t)`
    (:func:`ewc_jax.kfac.merge_kronecker_terms`, kept as a running mean of ``G``).

    Args:
        state: the state at the end of the task.
        images: the examples of the finished task the importance is averaged over (None for
            a method that needs none), with their ``labels`` and ``heads``.
        setup: model and optimiser (:func:`method_setup` of ``method``).
        method: a regularised method.

    Returns:
        The state with the new EWC state (and, for SI, the reset path integral), the PRNG
        key split once for the importance, and, if it keeps a forecast store, the task's own
        solution and precision in its row (:mod:`experiments.training.forecast`).
    """
    entry = method.method
    key, inputs = _importance_inputs(state, images, labels, heads, setup, method)
    precision, opt_state = entry.importance(inputs)
    store = state.forecast
    if store is not None:  # the task's own solution and Fisher, for the forgetting forecast
        done = state.ewc_state.num_tasks
        store = forecast.record(store, done, state.params, precision)
    ewc_state = ewc_jax.consolidate(
        state.ewc_state,
        state.params,
        precision,
        mode=entry.mode,
        gamma=method.gamma,
        where=setup.where,
    )
    if entry.kronecker:
        ewc_state = _merge_running(state.ewc_state, ewc_state)
    ewc_state, opt_state = keep_layout((ewc_state, opt_state), setup)
    return state._replace(ewc_state=ewc_state, opt_state=opt_state, key=key, forecast=store)


def choose_strength(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    heads: jax.Array,
    *,
    setup: StepSetup,
    method: MethodSpec,
    num_examples: int,
) -> tuple[TrainState, ewc_jax.evidence.Evidence]:
    r"""The state with λ re-chosen by the Laplace evidence of the current task.

    The current task's curvature :math:`H` is the method's own importance (the Fisher of its
    estimator, diagonal or K-FAC) at the current parameters on ``images``; λ is the maximiser
    of

    .. math::
        \log Z(λ) = -\frac{N λ}{2} (θ - θ̄)^\top Λ (θ - θ̄) + \frac12 \sum_k \log
            \frac{λ}{r_k + λ}

    (:func:`ewc_jax.evidence.evidence_strength`, :math:`r_k` the eigenvalues of :math:`H`
    relative to the consolidated precision :math:`Λ`, :math:`N` = ``num_examples``). A
    non-finite choice (θ at the anchor: every λ fits) keeps the old λ. The strength is a value
    of the state, so the jitted epoch is not recompiled when it changes.

    Args:
        state: the state during (or at the end of) a task after the first.
        images: examples of the current task for its curvature, with their ``labels`` and
            ``heads``.
        setup: model and optimiser (:func:`method_setup` of ``method``).
        method: a method whose entry allows ``evidence``.
        num_examples: N, the current task's training examples (the mean loss runs over them).

    Returns:
        The state with the new strength and the PRNG key split once (as for the importance),
        and the :class:`ewc_jax.evidence.Evidence` of the choice.
    """
    key, inputs = _importance_inputs(state, images, labels, heads, setup, method)
    curvature = method.method.importance(inputs)[0]
    chosen = ewc_jax.evidence.evidence_strength(
        state.ewc_state, state.params, curvature, num_examples=num_examples
    )
    strength = chosen.strength.astype(state.strength.dtype)
    strength = jnp.where(jnp.isfinite(strength), strength, state.strength)
    return state._replace(strength=strength, key=key), chosen


choose_strength_jit = jax.jit(choose_strength, static_argnames=("setup", "method", "num_examples"))
""":func:`choose_strength`, jitted: one compilation per task size, reused for every choice."""


def _merge_running(
    previous: ewc_jax.kfac.KFACState, state: ewc_jax.kfac.KFACState
) -> ewc_jax.kfac.KFACState:
    """One term per layer again: ``A`` summed, ``G`` the mean over the tasks so far.

    ``state`` holds ``previous``'s one merged term (the mean ``G`` of its ``n`` tasks) and the
    new task's. :func:`ewc_jax.kfac.merge_kronecker_terms` would average the two ``G`` equally;
    weighting them ``n : 1`` gives the mean over all tasks, i.e. exactly what merging every
    task's own term would give (and the zero placeholder of :func:`init_state`, ``n = 0``,
    drops out).
    """
    merged = ewc_jax.kfac.merge_kronecker_terms(state)

    def mean_g(g: jax.Array) -> jax.Array:
        n = previous.num_tasks.astype(g.dtype)
        return ((n * g[0] + g[1]) / (n + 1))[None]

    layers = tuple(
        dataclasses.replace(layer, g=mean_g(terms.g))
        for layer, terms in zip(merged.layers, state.layers, strict=True)
    )
    return merged._replace(layers=layers)


@functools.partial(jax.jit, static_argnames=("setup",))
def sweep_init(
    keys: jax.Array, example_images: jax.Array, strengths: jax.Array, *, setup: StepSetup
) -> TrainState:
    """:func:`init_state` of every run: ``keys`` and ``strengths`` carry the run axis."""
    init = functools.partial(init_state, setup=setup)
    return jax.vmap(init, in_axes=(0, None, 0))(keys, example_images, strengths)


@functools.partial(jax.jit, static_argnames=("setup", "num_batches"))
def sweep_train_epoch(
    states: TrainState,
    data: TaskData,
    num_steps: jax.Array,
    *,
    setup: StepSetup,
    num_batches: int,
    task: jax.Array | int = 0,
) -> tuple[TrainState, jax.Array]:
    """:func:`train_epoch` of every run on the same data (task ``task``)."""
    epoch = functools.partial(scan_epoch, setup=setup, num_batches=num_batches)
    return jax.vmap(lambda s: epoch(s, data, num_steps, task=task))(states)


@functools.partial(jax.jit, static_argnames=("setup",))
def sweep_evaluate(params: Any, data: TaskData, *, setup: StepSetup) -> jax.Array:
    """:func:`evaluate` of every run's parameters on the same data: ``[R]``."""
    return jax.vmap(functools.partial(evaluate_chunked, setup=setup), in_axes=(0, None))(
        params, data
    )


@functools.partial(jax.jit, static_argnames=("setup", "method"))
def sweep_consolidate(
    states: TrainState,
    images: jax.Array | None,
    labels: jax.Array | None,
    heads: jax.Array | None,
    *,
    setup: StepSetup,
    method: MethodSpec,
) -> TrainState:
    """:func:`consolidate_task` of every run, each on its own examples (``[R, n, ...]``)."""
    axis = 0 if method.needs_fisher else None
    one = functools.partial(consolidate_task, setup=setup, method=method)
    return jax.vmap(one, in_axes=(0, axis, axis, axis))(states, images, labels, heads)


@functools.partial(jax.jit, static_argnames=("setup",))
def sweep_reset_optimizer(states: TrainState, *, setup: StepSetup) -> TrainState:
    """:func:`reset_optimizer` of every run."""
    return jax.vmap(functools.partial(reset_optimizer, setup=setup))(states)


def _importance_inputs(
    state: TrainState,
    images: jax.Array | None,
    labels: jax.Array | None,
    heads: jax.Array | None,
    setup: StepSetup,
    method: MethodSpec,
) -> tuple[jax.Array, ImportanceInputs]:
    """The state's next PRNG key and the importance's inputs, with the key split once for it."""
    key, importance_key = jax.random.split(state.key)
    inputs = ImportanceInputs(
        setup.logits, state.params, state.opt_state, images, labels, heads, importance_key,
        setup.mesh, method, setup.where,
    )  # fmt: skip
    return key, inputs
