"""The pure steps of a run: initialise, train one epoch, evaluate (the end of a task, importance
and consolidation, is :mod:`experiments.training.consolidation`).

Every step is a plain function of a :class:`TrainState` (or parameters) and data, returning new
values; the model, optimiser and batch sizes travel in a hashable :class:`StepSetup` that jit
takes as a static argument, so nothing is captured from ``self`` or a closure:

* :func:`train_epoch` is one ``jax.lax.scan`` over the mini-batches of an epoch, shuffling with
  ``jax.random`` on device. The EWC state and the strength are part of the state, never
  constants, and each task's data is padded to one capacity, so a new task, a new consolidated
  state or a new method changes values only. The one other static argument is the scan length,
  the epoch's batch count rounded up to a power of two (:func:`scan_length`): tasks of equal size
  share one compiled program, and a task of very different size (MNIST's 4,000 digits next to
  Fashion-MNIST's 60,000) gets its own instead of scanning over 14x more skipped batches.
* :func:`evaluate` (:mod:`experiments.training.evaluation`) is a jitted, batched accuracy on a
  padded test set, or, for a language model on byte sequences, the test bits per character.
* :meth:`StepSetup.logits` is the model's ``apply_fn`` on inputs ``(images, heads)``, so a
  multi-head model's logits are those of each example's own head; the importances of
  :mod:`experiments.training.methods` take it.

A sweep runs the same functions under ``jax.vmap`` over a leading run axis of the state
(:mod:`experiments.training.consolidation`): seeds and strengths are data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import ewc_jax
from experiments import models
from experiments.models import lora
from experiments.scenarios import Scenario
from experiments.spec import ModelSpec, OptimizerSpec, ScheduleSpec
from experiments.training import forecast
from experiments.training.device import TaskData, param_shardings, replicated
from experiments.training.evaluation import evaluate as evaluate
from experiments.training.evaluation import evaluate_chunked as evaluate_chunked
from experiments.training.evaluation import shard_batch
from experiments.training.forecast import ForecastStore
from experiments.training.methods import MethodSpec


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """What the steps of a run share: hashable, so jit takes it as a static argument.

    Attributes:
        model: the Flax module, called as ``model.apply({"params": p}, images, heads)``.
        tx: the optimiser.
        batch_size: examples per SGD step.
        eval_batch_size: examples per evaluation chunk.
        mesh: the data-parallel mesh that mini-batches are split over, or None.
        init: the initial parameters: ``"flax"``, ``"torch"`` or the path of an ``.npz``
            PyTorch state_dict (:func:`experiments.models.init_params`).
        metric: what :func:`evaluate` measures (:data:`experiments.reporting.metrics.METRICS`).
        kronecker: whether the EWC state is a (merged) :class:`ewc_jax.kfac.KFACState` instead of
            an :class:`ewc_jax.EWCState` (see :func:`method_setup`).
        param_sharding: ``"replicated"`` (every device holds the whole state) or ``"fsdp"``:
            params, optimiser and EWC state split over the mesh's data axis
            (:func:`experiments.training.device.param_shardings`); needs a mesh.
        forecast_tasks: the tasks whose solution and own precision the state keeps for the
            forgetting forecast (:class:`experiments.training.forecast.ForecastStore`); 0:
            none (a method without a Laplace precision, or a sweep).
        lora: the model has low-rank adapters (:mod:`experiments.models.lora`): the first task
            trains the base with the adapters frozen, every later task the adapters with the
            base frozen, and the EWC state covers the adapters only (:attr:`where`).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    batch_size: int
    eval_batch_size: int = 1000
    mesh: jax.sharding.Mesh | None = None
    init: str = "flax"
    metric: str = "accuracy"
    kronecker: bool = False
    param_sharding: str = "replicated"
    forecast_tasks: int = 0
    lora: bool = False

    @property
    def where(self) -> Any:
        """The parameters the EWC state covers, as ``where=`` takes it: the adapters
        (:func:`experiments.models.lora.adapter_mask`) with ``lora``, else None (all)."""
        return lora.adapter_mask if self.lora else None

    @property
    def num_devices(self) -> int:
        """Devices of the data axis: the mesh's size, 1 without a mesh."""
        return 1 if self.mesh is None else self.mesh.devices.size

    def logits(self, params: Any, inputs: tuple[jax.Array, jax.Array]) -> jax.Array:
        """``apply_fn`` of the Fisher: logits ``[B, C]`` of inputs ``(images, heads)``.

        Equal setups give equal bound methods, so the Fisher's jit cache serves every task.
        """
        images, heads = inputs
        return self.model.apply({"params": params}, images, heads)


class TrainState(NamedTuple):
    """The arrays of one run (or, in a sweep, of every run along a leading axis).

    Attributes:
        params: model parameters.
        opt_state: optimiser state.
        ewc_state: the consolidated tasks' anchor and precision (a K-FAC state for ``kfac``).
        key: the PRNG key the next epoch and Fisher split from.
        strength: the penalty strength λ, float32.
        forecast: every task's solution and own precision for the forgetting forecast, or
            None (:attr:`StepSetup.forecast_tasks` 0).
    """

    params: Any
    opt_state: Any
    ewc_state: ewc_jax.EWCState | ewc_jax.kfac.KFACState
    key: jax.Array
    strength: jax.Array
    forecast: ForecastStore | None = None


def make_optimizer(spec: OptimizerSpec) -> optax.GradientTransformation:
    """SGD (with optional momentum) or Adam, as ``spec`` says."""
    if spec.name == "adam":
        return optax.adam(spec.learning_rate)
    return optax.sgd(spec.learning_rate, momentum=spec.momentum or None)


def build_setup(
    model: ModelSpec,
    optimizer: OptimizerSpec,
    schedule: ScheduleSpec,
    scenario: Scenario,
    *,
    mesh: jax.sharding.Mesh | None = None,
    param_sharding: str = "replicated",
) -> StepSetup:
    """The :class:`StepSetup` of the model and optimiser, sized for ``scenario``."""
    return StepSetup(
        models.build(model, num_heads=scenario.num_heads, num_outputs=scenario.num_outputs),
        make_optimizer(optimizer),
        batch_size=schedule.batch_size,
        eval_batch_size=schedule.eval_batch_size,
        mesh=mesh,
        init=model.init,
        metric=scenario.metric,
        param_sharding=param_sharding,
        lora=model.lora_rank > 0,
    )


@functools.cache
def method_setup(setup: StepSetup, method: MethodSpec) -> StepSetup:
    """The setup ``method`` trains with: the shared one, with the method's optimiser
    (:attr:`~experiments.training.methods.Method.wrap_optimizer`, SI's path integral) and its
    kind of consolidated state (K-FAC's merged Kronecker terms keep the first task's shapes, so
    the compiled steps serve every task).

    Cached, so equal arguments give the same (equal-hashing) setup and jit compiles once.
    """
    entry = method.method
    tx = setup.tx if entry.wrap_optimizer is None else entry.wrap_optimizer(setup.tx)
    return dataclasses.replace(setup, tx=tx, kronecker=entry.kronecker)


def scan_length(steps_per_epoch: int, capacity: int, batch_size: int) -> int:
    """Iterations of the epoch scan: ``steps_per_epoch`` rounded up to a power of two.

    Capped at ``ceil(capacity / batch_size)``. Skipped iterations cost a copy of the carry
    (about 3% of a step of the tutorial's MLP on CPU), so rounding wastes little, while every
    distinct length is one more compilation.

    Example:
        >>> scan_length(125, 60000, 32), scan_length(1875, 60000, 32)
        (128, 1875)
    """
    return min(1 << max(steps_per_epoch - 1, 0).bit_length(), -(-capacity // batch_size))


def init_state(
    key: jax.Array, example_images: jax.Array, strength: float | jax.Array, *, setup: StepSetup
) -> TrainState:
    """A fresh run: parameters from ``key``'s first split (or ``setup.init``'s file), replicated
    on the mesh if any, or split over it (``setup.param_sharding == "fsdp"``) with the optimiser
    and EWC state laid out like them.

    Args:
        key: the run's seed key, e.g. ``jax.random.key(seed)``.
        example_images: a batch shaped like the data, e.g. ``images[:1]``.
        strength: the penalty strength λ.
        setup: model and optimiser.

    Returns:
        The :class:`TrainState`: fresh optimiser state, empty EWC state.
    """
    init_key, key = jax.random.split(key)
    heads = jnp.zeros((example_images.shape[0],), jnp.int32)
    params = models.init_params(setup.model, init_key, example_images, heads, setup.init)
    if setup.mesh is not None:
        fsdp = setup.param_sharding == "fsdp"
        layout = param_shardings(params, setup.mesh) if fsdp else replicated(setup.mesh)
        params = jax.device_put(params, layout)
    if setup.kronecker:
        ewc_state = _empty_kronecker_state(params, (example_images, heads), setup)
    else:
        ewc_state = ewc_jax.empty_state(params, where=setup.where)
    store = None
    if setup.forecast_tasks:
        precision = params
        if setup.kronecker:
            precision = jax.eval_shape(
                lambda p: ewc_jax.kfac.kfac_fisher(
                    setup.logits, p, (example_images, heads), where=setup.where
                ),
                params,
            )
        store = forecast.empty_store(params, precision, setup.forecast_tasks)
    state = TrainState(
        params=params,
        opt_state=setup.tx.init(params),
        ewc_state=ewc_state,
        key=key,
        strength=jnp.asarray(strength, jnp.float32),
        forecast=store,
    )
    return keep_layout(state, setup)


def keep_layout(tree: Any, setup: StepSetup) -> Any:
    """FSDP: every leaf constrained (under jit) or moved (eagerly) to its layout of
    :func:`experiments.training.device.param_shardings`; otherwise ``tree`` as it is.

    Constraining what a step returns keeps the state split from step to step, instead of
    leaving the output layout to XLA's sharding propagation.
    """
    if setup.param_sharding != "fsdp":
        return tree
    return jax.lax.with_sharding_constraint(tree, param_shardings(tree, setup.mesh))


def _empty_kronecker_state(
    params: Any, inputs: tuple[jax.Array, jax.Array], setup: StepSetup
) -> ewc_jax.kfac.KFACState:
    """A K-FAC state of zero factors and precision (penalty 0) with one term per layer (per
    layer whose kernel ``setup.where`` selects: with adapters, one per adapter factor)."""
    shapes = jax.eval_shape(
        lambda p: ewc_jax.kfac.kfac_fisher(setup.logits, p, inputs, where=setup.where), params
    )
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    state = ewc_jax.consolidate(None, params, zero, mode="online", where=setup.where)
    return state._replace(diagonal=state.diagonal._replace(num_tasks=jnp.zeros((), jnp.int32)))


def reset_optimizer(state: TrainState, *, setup: StepSetup) -> TrainState:
    """The state with a fresh optimiser state (before a new task).

    SI's path integral and start parameters are kept: only :func:`ewc_jax.importance.si_importance`
    (at the end of a task) resets them.
    """
    fresh = setup.tx.init(state.params)
    if isinstance(state.opt_state, ewc_jax.importance.SIState):
        fresh = state.opt_state._replace(inner=fresh.inner)
    return state._replace(opt_state=keep_layout(fresh, setup))


def _updated(params: Any, updates: Any, task: jax.Array | int, setup: StepSetup) -> Any:
    """``params + updates``; with adapters, the part that task ``task`` leaves frozen keeps its
    values bit for bit (:func:`experiments.models.lora.keep_frozen`)."""
    new_params = optax.apply_updates(params, updates)
    if setup.lora:
        new_params = lora.keep_frozen(params, new_params, jnp.asarray(task) > 0)
    return new_params


def scan_epoch(
    state: TrainState,
    data: TaskData,
    num_steps: jax.Array,
    *,
    setup: StepSetup,
    num_batches: int | None = None,
    task: jax.Array | int = 0,
) -> tuple[TrainState, jax.Array]:
    """At most one pass over ``data`` in ``num_steps`` shuffled mini-batches of task ``task``.

    With a mesh, each mini-batch is split over the devices (replicated params: XLA adds the
    all-reduce of the gradients; FSDP: also the all-gather of each split leaf, each device
    updating its own shards, and the carry keeps the state's layout). A ``batch_size``
    not divisible by the device count is padded up to the next multiple with further examples
    of the shuffled order whose cross-entropy weight is 0, and the loss is the weighted sum
    divided by ``batch_size``: every example of the batch counts once, the padding not at
    all. Without a mesh the padding is empty and the same code runs.

    The scan has ``num_batches`` iterations (default ``ceil(capacity / batch_size)``); those
    at or past ``num_steps`` are skipped by ``lax.cond``, so the last, partial epoch of a
    task measured in steps reuses the same compiled program. A batch that runs past the end
    of the valid examples wraps around to the start of the shuffled order.

    For sequence outputs (logits ``[B, T, C]``, labels ``[B, T]``) an example's cross-entropy
    is its mean over the ``T`` positions (every position of a byte window is a real token).

    With ``setup.lora`` only part of the parameters trains: the base on the first task
    (``task`` 0, traced), the adapters on every later one; the other part keeps its values bit
    for bit (:func:`experiments.models.lora.keep_frozen`), and the penalty covers the adapters.

    Returns:
        ``(state, mean cross-entropy over the steps taken)``.
    """
    batch_size = setup.batch_size
    capacity = data.labels.shape[0]
    num_batches = num_batches or -(-capacity // batch_size)
    padded_size = -(-batch_size // setup.num_devices) * setup.num_devices
    weights = shard_batch((jnp.arange(padded_size) < batch_size).astype(jnp.float32), setup)
    key, epoch_key = jax.random.split(state.key)
    scores = jax.random.uniform(epoch_key, (capacity,))
    scores = jnp.where(jnp.arange(capacity) < data.num_valid, scores, 2.0)
    order = jnp.argsort(scores)

    def task_loss(p: Any, images: jax.Array, labels: jax.Array, heads: jax.Array):
        logits = setup.model.apply({"params": p}, images, heads)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        ce = jnp.mean(ce.reshape(ce.shape[0], -1), axis=1)  # a sequence's mean over positions
        return jnp.sum(weights * ce) / jnp.float32(batch_size)

    def loss_fn(p: Any, images: jax.Array, labels: jax.Array, heads: jax.Array):
        ce = task_loss(p, images, labels, heads)
        penalty = ewc_jax.penalty(p, state.ewc_state, state.strength, where=setup.where)
        return ce + penalty, ce

    def gradients(params: Any, images: jax.Array, labels: jax.Array, heads: jax.Array):
        """``(gradient, ce, extra update arguments)``; SI's gradient is the task loss's."""
        if not isinstance(state.opt_state, ewc_jax.importance.SIState):
            grads, ce = jax.grad(loss_fn, has_aux=True)(params, images, labels, heads)
            return grads, ce, {}
        ce, grads = jax.value_and_grad(task_loss)(params, images, labels, heads)
        penalty_gradient = jax.grad(ewc_jax.penalty)(
            params, state.ewc_state, state.strength, where=setup.where
        )
        return grads, ce, {"penalty_gradient": penalty_gradient}

    def train_step(carry: tuple[Any, Any], index: jax.Array):
        params, opt_state = carry
        positions = (index * batch_size + jnp.arange(padded_size)) % data.num_valid
        batch = order[positions]
        images, labels, heads = shard_batch(
            (data.images[batch], data.labels[batch], data.heads[batch]), setup
        )
        grads, ce, extra = gradients(params, images, labels, heads)
        # optax.adam's bias correction computes `b1 ** count` (float ** int32), which
        # jax_numpy_dtype_promotion="strict" rejects; our own code stays strict-clean.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = setup.tx.update(grads, opt_state, params, **extra)
        new_params = _updated(params, updates, task, setup)
        return keep_layout((new_params, opt_state), setup), ce

    def skip_step(carry: tuple[Any, Any], index: jax.Array):
        del index
        return carry, jnp.zeros((), jnp.float32)

    def step(carry: tuple[Any, Any], index: jax.Array):
        return jax.lax.cond(index < num_steps, train_step, skip_step, carry, index)

    (params, opt_state), losses = jax.lax.scan(
        step, (state.params, state.opt_state), jnp.arange(num_batches, dtype=jnp.int32)
    )
    mean_loss = jnp.sum(losses) / jnp.maximum(num_steps, 1).astype(jnp.float32)
    return state._replace(params=params, opt_state=opt_state, key=key), mean_loss


train_epoch = jax.jit(scan_epoch, static_argnames=("setup", "num_batches"))
