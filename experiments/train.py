"""Continual-learning training loop: finetune, L2, EWC, online EWC and joint training.

One :class:`Trainer` holds the jitted functions for a model, an optimiser and a batch size, and
serves every task, method and seed of a run:

* ``train_epoch`` is one ``jax.lax.scan`` over the mini-batches of an epoch, shuffling with
  ``jax.random`` on device. The EWC state and the strength are arguments, never closure
  constants, and each task's data is padded to one capacity, so a new task, a new consolidated
  state or a new method changes values only. The one static argument is the scan length, the
  epoch's batch count rounded up to a power of two (:func:`scan_length`): tasks of equal size
  share one compiled program, and a task of very different size (MNIST's 4,000 digits next to
  Fashion-MNIST's 60,000) gets its own instead of scanning over 14x more skipped batches.
* ``evaluate`` is a jitted, batched accuracy on a padded test set.
* the Fisher comes from :func:`ewc_jax.fisher_diagonal` with inputs ``(images, heads)``, so a
  multi-head model's logits are those of each example's own head.

After every epoch (or every ``eval_every_steps`` steps) the tasks seen so far are evaluated (the
learning curves); after every task a row of the accuracy matrix ``R[i, j]`` (accuracy on task
``j`` after training task ``i``) is recorded, then the method consolidates.

:func:`train_and_evaluate` runs every method and seed of a config on identical data and writes
``config.json``, ``metrics.csv``, the figures and, last and atomically, ``results.json``. Each
method and seed checkpoints after every task (and every ``checkpoint_every_steps`` steps, at
epoch ends), and a rerun in the same workdir resumes by default (:mod:`experiments.checkpoint`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import ewc_jax
from experiments import checkpoint, metrics, models, plots, scenarios

METHODS = ("finetune", "l2", "ewc", "online_ewc", "joint")
REGULARIZED_METHODS = ("l2", "ewc", "online_ewc")
OPTIMIZERS = ("sgd", "adam")
RESULTS_SCHEMA_VERSION = 1

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
"""How often each jitted function of a :class:`Trainer` was traced (i.e. compiled)."""


class ConfigError(ValueError):
    """A config that cannot run: raised before any data is loaded or any step is taken."""


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


class WorkdirExistsError(FileExistsError):
    """The workdir already holds finished results and ``overwrite`` was not given."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One continual-learning method with its hyperparameters.

    Attributes:
        name: one of :data:`METHODS`.
        strength: EWC/L2 strength λ (0 for finetune and joint).
        estimator: Fisher estimator of :func:`ewc_jax.fisher_diagonal`.
        fisher_samples: examples of the finished task the Fisher is averaged over.
        fisher_batch_size: mini-batch size of the ``"batched"`` estimator.
        gamma: decay of old precision for online EWC (1 for the others).
    """

    name: str
    strength: float = 0.0
    estimator: str = "exact"
    fisher_samples: int = 512
    fisher_batch_size: int | None = None
    gamma: float = 1.0

    @property
    def regularized(self) -> bool:
        """Whether the method adds a quadratic penalty after each task."""
        return self.name in REGULARIZED_METHODS

    @property
    def needs_fisher(self) -> bool:
        """Whether the method estimates a Fisher (L2 uses precision 1 instead)."""
        return self.name in ("ewc", "online_ewc")


def parse_methods(config: ml_collections.ConfigDict) -> list[str]:
    """The methods a config runs: ``method`` when set, else the comma-separated ``methods``."""
    if config.get("method"):
        return [str(config.method)]
    return scenarios.parse_list(config.methods)


def parse_seeds(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds a config runs: ``seed`` when set, else the comma-separated ``seeds``."""
    if config.get("seed") is not None:
        return [int(config.seed)]
    return scenarios.parse_list(config.seeds, int)


def method_strength(config: ml_collections.ConfigDict, name: str) -> float:
    """``strengths.<name>`` when set, else ``strength``; 0 for unregularised methods."""
    if name not in REGULARIZED_METHODS:
        return 0.0
    specific = config.strengths.get(name) if "strengths" in config else None
    return float(config.strength if specific is None else specific)


def method_specs(config: ml_collections.ConfigDict) -> list[MethodSpec]:
    """The validated :class:`MethodSpec` of every method the config runs."""
    validate_config(config)
    return [
        MethodSpec(
            name=name,
            strength=method_strength(config, name),
            estimator=config.estimator,
            fisher_samples=int(config.fisher_samples),
            fisher_batch_size=int(config.fisher_batch_size) or None,
            gamma=float(config.gamma) if name == "online_ewc" else 1.0,
        )
        for name in parse_methods(config)
    ]


def _choice(config: ml_collections.ConfigDict, field: str, valid: tuple[str, ...]) -> None:
    if config[field] not in valid:
        raise ConfigError(f"unknown {field} {config[field]!r}; valid choices: {', '.join(valid)}")


def _check_known_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses fields that ``configs/default.py`` does not define (a typo would be ignored)."""
    from experiments.configs import default

    known = default.get_config()
    for field in config:
        if field not in known:
            close = difflib.get_close_matches(field, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config field {field!r}{hint}; the valid fields are those of "
                "experiments/configs/default.py"
            )
    for name in config.get("strengths", {}):
        if name not in REGULARIZED_METHODS:
            raise ConfigError(
                f"unknown config field 'strengths.{name}'; per-method strengths exist for "
                f"{', '.join(REGULARIZED_METHODS)}"
            )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` with a clear message for a config that cannot run.

    Checked: no unknown fields; method, estimator, scenario, split mode, model and optimiser
    names; strengths >= 0; gamma in [0, 1]; positive sizes; at least one method and seed; at
    least 2 permuted tasks (the task count of the other scenarios is checked once their data is
    loaded, by :func:`check_scenario`).

    Args:
        config: the experiment config.

    Raises:
        ConfigError: the first problem found.
    """
    _check_known_fields(config)
    try:
        names = parse_methods(config)
        seeds = parse_seeds(config)
    except ValueError as error:
        raise ConfigError(f"cannot parse methods/seeds: {error}") from None
    if not names:
        raise ConfigError("no method given: set --config.method or --config.methods")
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods listed twice: {names}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one, got {seeds}")
    _choice(config, "estimator", ewc_jax.ESTIMATORS)
    _choice(config, "scenario", scenarios.SCENARIOS)
    if config.scenario == "split":
        _choice(config, "split_mode", scenarios.SPLIT_MODES)
    _choice(config, "model", models.MODELS)
    _choice(config, "optimizer", OPTIMIZERS)
    strengths = {"strength": config.strength}
    for name in REGULARIZED_METHODS:
        value = config.strengths.get(name)
        if value is not None:
            strengths[f"strengths.{name}"] = value
    for field, value in strengths.items():
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ConfigError(f"{field} must be a finite number >= 0, got {value!r}")
    if not 0.0 <= float(config.gamma) <= 1.0:
        raise ConfigError(f"gamma must lie in [0, 1], got {config.gamma!r}")
    for field in ("batch_size", "eval_batch_size", "fisher_samples"):
        if int(config[field]) < 1:
            raise ConfigError(f"{field} must be >= 1, got {config[field]!r}")
    for field in ("steps_per_task", "eval_every_steps", "train_limit", "test_limit"):
        if int(config[field]) < 0:
            raise ConfigError(f"{field} must be >= 0, got {config[field]!r}")
    if int(config.steps_per_task) == 0 and int(config.epochs) < 1:
        raise ConfigError("epochs must be >= 1 (or set steps_per_task)")
    if not float(config.learning_rate) > 0:
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate!r}")
    if config.estimator == "batched" and int(config.fisher_batch_size) < 1:
        raise ConfigError("estimator 'batched' needs fisher_batch_size >= 1")
    if config.scenario == "sequence" and not scenarios.parse_list(config.datasets):
        raise ConfigError("scenario 'sequence' needs datasets, e.g. 'embedded:mnist,idx:<dir>'")
    if config.scenario == "permuted" and int(config.num_tasks) < 2:
        raise ConfigError(
            f"num_tasks must be >= 2 (continual learning needs a second task to forget the "
            f"first on), got {config.num_tasks!r}"
        )
    if config.scenario == "rotated":
        try:
            angles = scenarios.parse_list(config.angles, float)
        except ValueError:
            raise ConfigError(
                f"angles must be comma-separated numbers: {config.angles!r}"
            ) from None
        if not angles:
            raise ConfigError("scenario 'rotated' needs angles, e.g. '0,45,90'")
    mesh_devices = int(config.get("mesh_devices", 0))
    if not 0 <= mesh_devices <= jax.device_count():
        raise ConfigError(
            f"mesh_devices must lie in [0, {jax.device_count()}] (0: all devices), "
            f"got {mesh_devices}"
        )
    from experiments import sweep

    sweep.validate_sweep(config)


class TaskData(NamedTuple):
    """A task's examples on device, padded to a fixed capacity so that all tasks share shapes.

    Attributes:
        images: float32 ``[capacity, H, W, C]``; rows past ``num_valid`` are zero.
        labels: int32 ``[capacity]``.
        heads: int32 ``[capacity]``, the output head of each example.
        num_valid: int32 scalar, how many leading rows are real examples.
    """

    images: jax.Array
    labels: jax.Array
    heads: jax.Array
    num_valid: jax.Array


def pad_task_data(
    images: np.ndarray,
    labels: np.ndarray,
    heads: np.ndarray,
    capacity: int,
    device: jax.sharding.Sharding | None = None,
) -> TaskData:
    """Pads examples to ``capacity`` rows and puts them on ``device``.

    Args:
        images: float32 ``[N, ...]``.
        labels: int ``[N]``.
        heads: int ``[N]``.
        capacity: rows of the result, >= N.
        device: where the arrays go (e.g. :func:`replicated` over a mesh); None: the default
            device.

    Returns:
        The padded :class:`TaskData`.
    """
    num = len(labels)
    if num > capacity:
        raise ValueError(f"{num} examples do not fit a capacity of {capacity}")
    padded_images = np.zeros((capacity, *images.shape[1:]), np.float32)
    padded_images[:num] = images
    padded_labels = np.zeros(capacity, np.int32)
    padded_labels[:num] = labels
    padded_heads = np.zeros(capacity, np.int32)
    padded_heads[:num] = heads
    return TaskData(
        images=jax.device_put(padded_images, device),
        labels=jax.device_put(padded_labels, device),
        heads=jax.device_put(padded_heads, device),
        num_valid=jax.device_put(np.asarray(num, np.int32), device),
    )


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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD (with optional momentum) or Adam, as the config says."""
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate)
    return optax.sgd(config.learning_rate, momentum=float(config.momentum) or None)


DATA_AXIS = "data"
"""Name of the mesh axis that examples (or, in a sweep, runs) are split over."""


def data_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
    """The 1-D ``("data",)`` mesh of ``config.data_parallel``, or None.

    ``mesh_devices`` devices (0: all of ``jax.devices()``, which after
    ``jax.distributed.initialize`` are those of every host).
    """
    if not config.get("data_parallel", False):
        return None
    devices = jax.devices()
    count = int(config.get("mesh_devices", 0)) or len(devices)
    return jax.sharding.Mesh(np.asarray(devices[:count]), (DATA_AXIS,))


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Leading axis split over the mesh's data axis."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """A full copy on every device of the mesh."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


class Trainer:
    """The jitted train, evaluation and Fisher functions of one model, optimiser and batch size.

    Build one per run and reuse it for every task, method and seed: jit caches live on it.

    Example:
        >>> import optax
        >>> trainer = Trainer(models.MLP((16,), 10), optax.sgd(0.1), batch_size=8)
        >>> isinstance(trainer.num_traces("train_epoch"), int)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        *,
        batch_size: int,
        eval_batch_size: int = 1000,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.model = model
        self.tx = tx
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.mesh = mesh
        self._counter_prefix = f"{id(self)}:"
        self.train_epoch = jax.jit(self._train_epoch, static_argnames=("num_batches",))
        self.evaluate = jax.jit(self._evaluate)

    def num_traces(self, name: str) -> int:
        """How often this trainer's ``train_epoch`` or ``evaluate`` was traced."""
        return TRACE_COUNTS[self._counter_prefix + name]

    @property
    def num_devices(self) -> int:
        """Devices of the data axis: the mesh's size, 1 without a mesh."""
        return 1 if self.mesh is None else self.mesh.devices.size

    def init(self, key: jax.Array, example_images: jax.Array) -> Any:
        """Initial parameters for a batch like ``example_images``, replicated on the mesh."""
        heads = jnp.zeros((example_images.shape[0],), jnp.int32)
        params = self.model.init(key, example_images, heads)["params"]
        if self.mesh is not None:
            params = jax.device_put(params, replicated(self.mesh))
        return params

    def _shard_batch(self, tree: Any) -> Any:
        """Splits the leading (example) axis over the mesh; a no-op without one."""
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, data_sharding(self.mesh))

    def logits(self, params: Any, inputs: tuple[jax.Array, jax.Array]) -> jax.Array:
        """``apply_fn`` of the Fisher: logits ``[B, C]`` of inputs ``(images, heads)``."""
        images, heads = inputs
        return self.model.apply({"params": params}, images, heads)

    def _train_epoch(
        self,
        params: Any,
        opt_state: Any,
        ewc_state: ewc_jax.EWCState,
        strength: jax.Array,
        data: TaskData,
        num_steps: jax.Array,
        key: jax.Array,
        *,
        num_batches: int | None = None,
    ) -> tuple[Any, Any, jax.Array]:
        """At most one pass over ``data`` in ``num_steps`` shuffled mini-batches.

        With a mesh, each mini-batch is split over the devices (params stay replicated; XLA adds
        the all-reduce of the gradients). A ``batch_size`` not divisible by the device count is
        padded up to the next multiple with further examples of the shuffled order whose
        cross-entropy weight is 0, and the loss is the weighted sum divided by ``batch_size``:
        every example of the batch counts once, the padding not at all. Without a mesh the
        padding is empty and the same code runs.

        The scan has ``num_batches`` iterations (default ``ceil(capacity / batch_size)``); those
        at or past ``num_steps`` are skipped by ``lax.cond``, so the last, partial epoch of a
        task measured in steps reuses the same compiled program. A batch that runs past the end
        of the valid examples wraps around to the start of the shuffled order.

        Returns:
            ``(params, opt_state, mean cross-entropy over the steps taken)``.
        """
        TRACE_COUNTS[self._counter_prefix + "train_epoch"] += 1
        batch_size = self.batch_size
        capacity = data.labels.shape[0]
        num_batches = num_batches or -(-capacity // batch_size)
        padded_size = -(-batch_size // self.num_devices) * self.num_devices
        weights = self._shard_batch((jnp.arange(padded_size) < batch_size).astype(jnp.float32))
        scores = jax.random.uniform(key, (capacity,))
        scores = jnp.where(jnp.arange(capacity) < data.num_valid, scores, 2.0)
        order = jnp.argsort(scores)

        def loss_fn(p: Any, images: jax.Array, labels: jax.Array, heads: jax.Array):
            logits = self.model.apply({"params": p}, images, heads)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            ce = jnp.sum(weights * ce) / jnp.float32(batch_size)
            return ce + ewc_jax.penalty(p, ewc_state, strength), ce

        def train_step(carry: tuple[Any, Any], index: jax.Array):
            params, opt_state = carry
            positions = (index * batch_size + jnp.arange(padded_size)) % data.num_valid
            batch = order[positions]
            images, labels, heads = self._shard_batch(
                (data.images[batch], data.labels[batch], data.heads[batch])
            )
            grads, ce = jax.grad(loss_fn, has_aux=True)(params, images, labels, heads)
            # optax.adam's bias correction computes `b1 ** count` (float ** int32), which
            # jax_numpy_dtype_promotion="strict" rejects; our own code stays strict-clean.
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = self.tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), ce

        def skip_step(carry: tuple[Any, Any], index: jax.Array):
            del index
            return carry, jnp.zeros((), jnp.float32)

        def step(carry: tuple[Any, Any], index: jax.Array):
            return jax.lax.cond(index < num_steps, train_step, skip_step, carry, index)

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), jnp.arange(num_batches, dtype=jnp.int32)
        )
        mean_loss = jnp.sum(losses) / jnp.maximum(num_steps, 1).astype(jnp.float32)
        return params, opt_state, mean_loss

    def _evaluate(self, params: Any, data: TaskData) -> jax.Array:
        """Accuracy on the valid rows of ``data``, in chunks of ``eval_batch_size``.

        With a mesh, the chunk is rounded up to a multiple of the device count and split over the
        devices when the capacity allows it (:func:`put_scenario` pads it to a multiple).
        """
        TRACE_COUNTS[self._counter_prefix + "evaluate"] += 1
        capacity = data.labels.shape[0]
        devices = self.num_devices
        chunk = min(-(-self.eval_batch_size // devices) * devices, capacity)
        shard = self._shard_batch if chunk % devices == 0 else lambda tree: tree
        num_chunks = -(-capacity // chunk)

        def count(total: jax.Array, index: jax.Array):
            # The last chunk overlaps the one before; rows already counted are masked.
            start = jnp.minimum(index * chunk, capacity - chunk)
            rows = start + jnp.arange(chunk)
            take = lambda a: shard(jax.lax.dynamic_slice_in_dim(a, start, chunk))
            logits = self.model.apply({"params": params}, take(data.images), take(data.heads))
            hits = (jnp.argmax(logits, axis=-1) == take(data.labels)) & (rows < data.num_valid)
            hits &= rows >= index * chunk
            return total + jnp.sum(hits.astype(jnp.int32)), None

        correct, _ = jax.lax.scan(count, jnp.zeros((), jnp.int32), jnp.arange(num_chunks))
        return correct.astype(jnp.float32) / data.num_valid.astype(jnp.float32)

    def fisher(
        self,
        params: Any,
        images: jax.Array,
        labels: jax.Array,
        heads: jax.Array,
        spec: MethodSpec,
        key: jax.Array,
    ) -> Any:
        """The diagonal Fisher of ``spec.estimator`` over the given examples.

        With a mesh the examples are split over its devices by :func:`ewc_jax.fisher_diagonal`,
        which pads a count not divisible by the device count and masks the padding.
        """
        needs_labels = spec.estimator in ("empirical", "batched")
        return ewc_jax.fisher_diagonal(
            self.logits,
            params,
            (images, heads),
            labels if needs_labels else None,
            estimator=spec.estimator,
            key=key if spec.estimator == "sampled" else None,
            batch_size=spec.fisher_batch_size if spec.estimator == "batched" else None,
            mesh=self.mesh,
        )


@dataclasses.dataclass
class RunRecord:
    """What one method and seed produced.

    Attributes:
        method: the method's name.
        seed: the seed.
        accuracy_matrix: ``R[i][j]``, accuracy on task ``j`` after training task ``i``.
        curves: one entry per evaluation during training: ``task`` being trained, ``epoch``
            within it, global ``step``, mean training ``loss`` of the epoch, and ``accuracy``
            on tasks ``0..task``.
        task_wall_time_s: seconds per task (training, evaluation and consolidation).
        fisher_wall_time_s: seconds per task spent estimating the Fisher and consolidating.
        steps_per_task: SGD steps taken on each task.
        metrics: :func:`experiments.metrics.summarize` of the matrix.
    """

    method: str
    seed: int
    accuracy_matrix: list[list[float]]
    curves: list[dict[str, Any]]
    task_wall_time_s: list[float]
    fisher_wall_time_s: list[float]
    steps_per_task: list[int]
    metrics: dict[str, float]


def _progress(total: int, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, disable=not sys.stderr.isatty())


@dataclasses.dataclass
class DeviceScenario:
    """A scenario's data on device, padded so every task has one shape.

    Attributes:
        scenario: the host-side scenario.
        train: per task, its own training data (for all methods but joint); None if unused.
        joint_train: per task, the union of tasks ``0..i`` (for joint); None if unused.
        test: per task, its test data.
    """

    scenario: scenarios.Scenario
    train: list[TaskData] | None
    joint_train: list[TaskData] | None
    test: list[TaskData]


def put_scenario(
    scenario: scenarios.Scenario,
    *,
    need_train: bool = True,
    need_joint: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> DeviceScenario:
    """Pads every task of ``scenario`` to a common capacity and puts it on device.

    The joint training set of task ``i`` is the first ``sum_{k<=i} N_k`` rows of one array
    holding all tasks in order; only ``num_valid`` differs between tasks, so one compiled
    ``train_epoch`` serves them all.

    With a mesh every array is replicated on its devices (mini-batches are gathered from the
    full set, then split) and the test capacity is rounded up to a multiple of the device count
    so that evaluation chunks split evenly; the training capacity is left as it is, because the
    shuffling draws one number per row.

    Args:
        scenario: the task stream.
        need_train: build the per-task training sets.
        need_joint: build the cumulative training sets of joint training.
        mesh: the data-parallel mesh, or None for the default device.

    Returns:
        The :class:`DeviceScenario`.
    """
    tasks = scenario.tasks

    device = None if mesh is None else replicated(mesh)
    devices = 1 if mesh is None else mesh.devices.size

    def heads(task: scenarios.Task, n: int) -> np.ndarray:
        return np.full(n, task.head, np.int32)

    train = None
    if need_train:
        capacity = max(len(t.train_labels) for t in tasks)
        train = [
            pad_task_data(
                t.train_images, t.train_labels, heads(t, len(t.train_labels)), capacity, device
            )
            for t in tasks
        ]
    joint = None
    if need_joint:
        total = sum(len(t.train_labels) for t in tasks)
        full = pad_task_data(
            np.concatenate([t.train_images for t in tasks]),
            np.concatenate([t.train_labels for t in tasks]),
            np.concatenate([heads(t, len(t.train_labels)) for t in tasks]),
            total,
            device,
        )
        cumulative = np.cumsum([len(t.train_labels) for t in tasks])
        joint = [full._replace(num_valid=jax.device_put(np.int32(n), device)) for n in cumulative]
    test_capacity = -(-max(len(t.test_labels) for t in tasks) // devices) * devices
    test = [
        pad_task_data(
            t.test_images, t.test_labels, heads(t, len(t.test_labels)), test_capacity, device
        )
        for t in tasks
    ]
    return DeviceScenario(scenario, train, joint, test)


def _divergence_message(
    spec: MethodSpec, ewc_state: ewc_jax.EWCState, config: ml_collections.ConfigDict, task: int
) -> str:
    message = f"{spec.name}: the training loss became non-finite on task {task + 1}"
    if spec.regularized and int(ewc_state.num_tasks) > 0:
        top = max(float(jnp.max(p)) for p in jax.tree.leaves(ewc_state.precision))
        # Plain gradient descent on λ/2·Λ·θ² is stable only while lr·λ·Λ < 2.
        product = float(config.learning_rate) * spec.strength * top
        message += (
            f"; learning_rate * strength * max precision = {config.learning_rate:g} * "
            f"{spec.strength:g} * {top:.3g} = {product:.3g}"
        )
        if config.optimizer == "sgd" and product >= 2:
            message += " >= 2, so SGD on the penalty diverges"
        message += ": lower the strength or the learning rate"
    return message + "."


def run_method(
    trainer: Trainer,
    data: DeviceScenario,
    spec: MethodSpec,
    config: ml_collections.ConfigDict,
    seed: int,
    *,
    checkpoints: checkpoint.RunCheckpoints | None = None,
) -> RunRecord:
    """Trains one method on the whole task stream and records curves and accuracy matrix.

    With ``checkpoints``, the run resumes from the latest complete checkpoint there (returning
    the saved record at once if the method already finished), then saves one after every task
    and at the end of the first epoch at or past every ``config.checkpoint_every_steps`` steps
    of a task (see :mod:`experiments.checkpoint`).

    Args:
        trainer: the shared jitted functions.
        data: the scenario on device.
        spec: the method.
        config: needs ``epochs``, ``steps_per_task``, ``eval_every_steps``, ``reset_optimizer``;
            ``checkpoint_every_steps`` is read when given.
        seed: seeds the initial parameters, the shuffling and the Fisher's examples; every method
            with the same seed starts from the same parameters.
        checkpoints: where this method and seed checkpoint; None: no checkpoints.

    Returns:
        The :class:`RunRecord`.

    Raises:
        checkpoint.CheckpointError: the latest checkpoint is corrupt or of another model.
    """
    tasks = data.scenario.tasks
    num_tasks = len(tasks)
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    params = trainer.init(init_key, data.test[0].images[:1])
    opt_state = trainer.tx.init(params)
    ewc_state = ewc_jax.empty_state(params)
    strength = jnp.asarray(spec.strength, jnp.float32)
    fisher_rng = np.random.default_rng(seed)
    train_sets = data.joint_train if spec.name == "joint" else data.train
    assert train_sets is not None, "put_scenario was not asked for this method's training data"

    matrix = np.zeros((num_tasks, num_tasks))
    curves: list[dict[str, Any]] = []
    task_times: list[float] = []
    fisher_times: list[float] = []
    steps_taken: list[int] = []
    global_step = first_task = done = epoch = 0
    next_eval, task_elapsed = None, 0.0
    checkpoint_every = int(config.get("checkpoint_every_steps", 0))

    def state_arrays() -> dict[str, Any]:
        return {
            "params": params,
            "opt_state": opt_state,
            "ewc_state": ewc_state,
            "key": jax.random.key_data(key),
        }

    def save(progress: dict[str, Any]) -> None:
        assert checkpoints is not None
        path = checkpoints.save(state_arrays(), {"method": spec.name, "seed": seed, **progress})
        where = (
            "finished"
            if "record" in progress
            else f"task {progress['task'] + 1}, step {progress['steps_done']}"
        )
        print(f"[{spec.name} seed {seed}] checkpoint {path} ({where})", flush=True)

    def position(task: int, steps_done: int, elapsed: float) -> dict[str, Any]:
        return {
            "task": task,
            "steps_done": steps_done,
            "epoch": epoch,
            "next_eval": next_eval,
            "global_step": global_step,
            "task_elapsed_s": elapsed,
            "fisher_rng": fisher_rng.bit_generator.state,
            "accuracy_rows": matrix[:task].tolist(),
            "curves": curves,
            "task_wall_time_s": task_times,
            "fisher_wall_time_s": fisher_times,
            "steps_per_task": steps_taken,
        }

    if checkpoints is not None:
        restored = checkpoints.restore(state_arrays())
        if restored is not None:
            arrays, progress = restored
            if progress.get("record") is not None:
                print(
                    f"[{spec.name} seed {seed}] finished earlier: record from "
                    f"{checkpoints.latest()}",
                    flush=True,
                )
                return RunRecord(**progress["record"])
            params, opt_state, ewc_state = (
                arrays["params"],
                arrays["opt_state"],
                arrays["ewc_state"],
            )
            key = jax.random.wrap_key_data(arrays["key"])
            fisher_rng.bit_generator.state = progress["fisher_rng"]
            first_task, done, epoch = progress["task"], progress["steps_done"], progress["epoch"]
            global_step, next_eval = progress["global_step"], progress["next_eval"]
            task_elapsed = progress["task_elapsed_s"]
            matrix[:first_task] = np.asarray(progress["accuracy_rows"]).reshape(-1, num_tasks)
            curves = progress["curves"]
            task_times = progress["task_wall_time_s"]
            fisher_times = progress["fisher_wall_time_s"]
            steps_taken = progress["steps_per_task"]
            print(
                f"[{spec.name} seed {seed}] resuming task {first_task + 1}/{num_tasks} at step "
                f"{done} from {checkpoints.latest()}",
                flush=True,
            )

    for i in range(first_task, num_tasks):
        task = tasks[i]
        start = time.perf_counter() - task_elapsed
        if i > 0 and config.reset_optimizer and done == 0:
            opt_state = trainer.tx.init(params)
        train_data = train_sets[i]
        num_valid = int(train_data.num_valid)
        steps_per_epoch = -(-num_valid // trainer.batch_size)
        capacity = train_data.labels.shape[0]
        num_batches = scan_length(steps_per_epoch, capacity, trainer.batch_size)
        total_steps = int(config.steps_per_task) or int(config.epochs) * steps_per_epoch
        every = int(config.eval_every_steps)
        if done == 0:
            next_eval, epoch = every, 0
        bar = _progress(total_steps, f"{spec.name} seed {seed} task {i + 1}/{num_tasks}")
        bar.update(done)
        while done < total_steps:
            steps = min(steps_per_epoch, total_steps - done)
            key, epoch_key = jax.random.split(key)
            params, opt_state, loss = trainer.train_epoch(
                params,
                opt_state,
                ewc_state,
                strength,
                train_data,
                jnp.int32(steps),
                epoch_key,
                num_batches=num_batches,
            )
            if not math.isfinite(float(loss)):
                raise TrainingDivergedError(_divergence_message(spec, ewc_state, config, i))
            done += steps
            epoch += 1
            global_step += steps
            bar.update(steps)
            if every == 0 or done >= next_eval or done == total_steps:
                while every and next_eval <= done:
                    next_eval += every
                accuracy = [float(trainer.evaluate(params, data.test[j])) for j in range(i + 1)]
                curves.append(
                    {
                        "task": i,
                        "epoch": epoch,
                        "step": global_step,
                        "loss": float(loss),
                        "accuracy": accuracy,
                    }
                )
                bar.set_postfix(acc=" ".join(f"{a:.3f}" for a in accuracy))
            crossed = checkpoint_every and done // checkpoint_every > (done - steps) // (
                checkpoint_every
            )
            if checkpoints is not None and crossed and done < total_steps:
                save(position(i, done, time.perf_counter() - start))
        bar.close()
        matrix[i] = [float(trainer.evaluate(params, data.test[j])) for j in range(num_tasks)]

        fisher_start = time.perf_counter()
        if spec.regularized:
            key, fisher_key = jax.random.split(key)
            if spec.needs_fisher:
                own = data.train[i]
                n = int(own.num_valid)
                chosen = np.sort(fisher_rng.choice(n, min(n, spec.fisher_samples), replace=False))
                fisher = trainer.fisher(
                    params,
                    own.images[chosen],
                    own.labels[chosen],
                    own.heads[chosen],
                    spec,
                    fisher_key,
                )
            else:
                fisher = jax.tree.map(jnp.ones_like, params)
            mode = "online" if spec.name == "online_ewc" else "separate"
            ewc_state = ewc_jax.consolidate(ewc_state, params, fisher, mode=mode, gamma=spec.gamma)
            jax.block_until_ready(ewc_state)
        end = time.perf_counter()
        fisher_times.append(end - fisher_start)
        task_times.append(end - start)
        steps_taken.append(done)
        print(
            f"[{spec.name} seed {seed}] task {i + 1}/{num_tasks} {task.name}: "
            f"accuracy {' '.join(f'{a:.3f}' for a in matrix[i, : i + 1])} "
            f"({done} steps, {end - start:.1f} s)",
            flush=True,
        )
        done, task_elapsed = 0, 0.0
        if checkpoints is not None and i + 1 < num_tasks:
            save(position(i + 1, 0, 0.0))
    record = RunRecord(
        method=spec.name,
        seed=seed,
        accuracy_matrix=matrix.tolist(),
        curves=curves,
        task_wall_time_s=task_times,
        fisher_wall_time_s=fisher_times,
        steps_per_task=steps_taken,
        metrics=metrics.summarize(matrix),
    )
    if checkpoints is not None:
        save({**position(num_tasks, 0, 0.0), "record": dataclasses.asdict(record)})
    return record


def summarize_runs(runs: list[RunRecord]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation (ddof=1; 0 for one seed) over seeds, per method.

    Args:
        runs: records of every method and seed.

    Returns:
        ``{method: {metric: {"mean", "std", "values"}, "final_accuracy": {"mean", "std"},
        "accuracy_matrix_mean": [[...]], "num_seeds"}}``.
    """
    by_method: dict[str, list[RunRecord]] = collections.defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)

    def stats(values: list[float]) -> dict[str, Any]:
        array = np.asarray(values, np.float64)
        std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        return {"mean": float(array.mean()), "std": std, "values": array.tolist()}

    summary = {}
    for name, group in by_method.items():
        matrices = np.asarray([r.accuracy_matrix for r in group])
        entry: dict[str, Any] = {k: stats([r.metrics[k] for r in group]) for k in group[0].metrics}
        entry["wall_time_s"] = stats([sum(r.task_wall_time_s) for r in group])
        final = matrices[:, -1]
        final_std = final.std(axis=0, ddof=1) if len(group) > 1 else np.zeros(final.shape[1])
        entry["final_accuracy"] = {"mean": final.mean(axis=0).tolist(), "std": final_std.tolist()}
        entry["accuracy_matrix_mean"] = matrices.mean(axis=0).tolist()
        entry["num_seeds"] = len(group)
        summary[name] = entry
    return summary


def environment() -> dict[str, Any]:
    """Versions and device of this run."""
    import flax

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "ewc_jax": ewc_jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": device.platform,
        "device": getattr(device, "device_kind", str(device)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _metrics_csv(runs: list[RunRecord], task_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metric_names = list(runs[0].metrics)
    writer.writerow(
        ["method", "seed", *metric_names, *(f"final_acc_{n}" for n in task_names), "wall_time_s"]
    )
    for run in runs:
        writer.writerow(
            [
                run.method,
                run.seed,
                *(f"{run.metrics[m]:.6f}" for m in metric_names),
                *(f"{a:.6f}" for a in run.accuracy_matrix[-1]),
                f"{sum(run.task_wall_time_s):.3f}",
            ]
        )
    return buffer.getvalue()


def format_summary(summary: dict[str, dict[str, Any]], task_names: list[str]) -> str:
    """The end-of-run table: one row per method, mean ± std over seeds.

    Args:
        summary: from :func:`summarize_runs`.
        task_names: names of the tasks (for the final per-task accuracies).

    Returns:
        A plain-text table.
    """

    def cell(entry: dict[str, Any], digits: int = 3) -> str:
        if entry.get("values") is not None and len(entry["values"]) > 1:
            return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
        return f"{entry['mean']:.{digits}f}"

    header = ["method", "seeds", "avg acc", "BWT", "forgetting", "final acc per task", "time s"]
    rows = []
    for name, entry in summary.items():
        finals = " ".join(f"{a:.3f}" for a in entry["final_accuracy"]["mean"])
        rows.append(
            [
                name,
                str(entry["num_seeds"]),
                cell(entry["average_accuracy"]),
                cell(entry["backward_transfer"]),
                cell(entry["average_forgetting"]),
                finals,
                cell(entry["wall_time_s"], 1),
            ]
        )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"tasks: {', '.join(task_names)}")
    return "\n".join(lines)


def _load_datasets(
    config: ml_collections.ConfigDict, load: Callable[..., Any] | None
) -> dict[str, Any]:
    if load is None:
        from experiments.data import load_dataset as load
    from experiments.data import validate_dataset

    data_dir = config.get("data_dir")
    datasets = {spec: load(spec, data_dir=data_dir) for spec in scenarios.dataset_specs(config)}
    for dataset in datasets.values():
        # The default loader validates already; a loader passed in gets the same checks.
        validate_dataset(dataset)
    return datasets


def check_scenario(scenario: scenarios.Scenario) -> None:
    """Raises :class:`ConfigError` for a task stream that cannot mean anything.

    A stream needs at least two tasks (with one there is nothing to consolidate for and no
    forgetting to measure) and every task needs training and test examples.
    """
    if scenario.num_tasks < 2:
        raise ConfigError(
            f"scenario {scenario.name!r} has {scenario.num_tasks} task; continual learning "
            "needs at least 2 (set num_tasks, angles, datasets or class_groups accordingly)"
        )
    for task in scenario.tasks:
        for split, labels in (("training", task.train_labels), ("test", task.test_labels)):
            if len(labels) == 0:
                raise ConfigError(
                    f"task {task.name!r} of scenario {scenario.name!r} has no {split} examples; "
                    "check class_groups against the dataset's labels, or train_limit/test_limit"
                )


def build_trainer(
    config: ml_collections.ConfigDict,
    scenario: scenarios.Scenario,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Trainer:
    """The :class:`Trainer` of the config's model and optimiser, sized for ``scenario``."""
    model = models.build_model(
        config.model,
        num_heads=scenario.num_heads,
        num_outputs=scenario.num_outputs,
        hidden_sizes=scenarios.parse_list(config.hidden_sizes, int),
        relu_on_logits=bool(config.relu_on_logits),
    )
    return Trainer(
        model,
        make_optimizer(config),
        batch_size=int(config.batch_size),
        eval_batch_size=int(config.eval_batch_size),
        mesh=mesh,
    )


def _iterate_runs(
    config: ml_collections.ConfigDict,
    seeds: list[int],
    specs: list[MethodSpec],
    datasets: dict,
    checkpoint_fingerprint: str | None = None,
    workdir: Path | None = None,
) -> Iterator[tuple[scenarios.Scenario, RunRecord]]:
    trainer = None
    mesh = data_mesh(config)
    for seed in seeds:
        scenario = scenarios.build_scenario(config, datasets, seed)
        check_scenario(scenario)
        if trainer is None:
            trainer = build_trainer(config, scenario, mesh=mesh)
        data = put_scenario(
            scenario,
            need_train=any(s.name != "joint" for s in specs),
            need_joint=any(s.name == "joint" for s in specs),
            mesh=mesh,
        )
        for spec in specs:
            checkpoints = None
            if workdir is not None and checkpoint_fingerprint is not None:
                checkpoints = checkpoint.RunCheckpoints(
                    checkpoint.checkpoints_root(workdir) / f"{spec.name}-seed{seed}",
                    checkpoint_fingerprint,
                )
            yield scenario, run_method(trainer, data, spec, config, seed, checkpoints=checkpoints)


def _check_same_run(config_path: Path, resolved: dict[str, Any]) -> None:
    """Refuses a workdir with checkpoints whose ``config.json`` is another run's config.

    Without checkpoints there is no progress to lose (the run failed before its first one), so
    the workdir is reused.
    """
    if not config_path.exists() or not checkpoint.has_checkpoints(config_path.parent):
        return
    try:
        previous = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise WorkdirExistsError(
            f"{config_path} cannot be read ({error}), so the workdir may hold another run; "
            "pass --overwrite to start afresh or choose another --workdir"
        ) from None
    old, new = checkpoint.run_identity(previous), checkpoint.run_identity(resolved)
    if old != new:
        fields = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields[:5])
        raise WorkdirExistsError(
            f"{config_path.parent} holds another run (config differs in {changes}); resuming "
            "needs the same config: choose another --workdir or pass --overwrite to discard it"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    load_dataset: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Runs every method and seed of ``config`` and writes the results to ``workdir``.

    The config is validated and the workdir checked before any data is loaded. ``results.json``
    is written last, atomically (temporary file + ``os.replace``), so its presence means the run
    finished; with ``overwrite`` an old one is removed first.

    Resume is the default: a workdir whose ``config.json`` is this resolved config continues from
    its checkpoints (:mod:`experiments.checkpoint`), and a workdir with checkpoints of another
    config is refused unless ``overwrite``, which deletes them. The checkpoints are deleted once
    ``results.json`` is written.

    Args:
        config: an experiment config (see ``experiments/configs``).
        workdir: output directory; created if missing.
        overwrite: replace finished results already in ``workdir``.
        load_dataset: ``load_dataset(spec, data_dir=...)``; default
            :func:`experiments.data.load_dataset`.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError: the config cannot run.
        WorkdirExistsError: ``workdir`` holds finished results, or the config of another run,
            and ``overwrite`` is False.
        checkpoint.CheckpointError: a checkpoint in ``workdir`` is corrupt or of another config.
    """
    from experiments import sweep

    validate_config(config)
    if sweep.sweep_requested(config):
        return sweep.run_sweep(config, workdir, overwrite=overwrite, load_dataset=load_dataset)
    specs = method_specs(config)
    seeds = parse_seeds(config)
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if results_path.exists() and not overwrite:
        raise WorkdirExistsError(
            f"{results_path} already holds finished results; pass --overwrite to replace them "
            "or choose another --workdir"
        )
    resolved = json.loads(config.to_json_best_effort())
    fingerprint = checkpoint.fingerprint(resolved)
    if overwrite:
        checkpoint.remove_all(workdir)
    else:
        _check_same_run(workdir / "config.json", resolved)
        checkpoint.verify_workdir(workdir, fingerprint)
    workdir.mkdir(parents=True, exist_ok=True)
    results_path.unlink(missing_ok=True)
    _write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")

    started = time.perf_counter()
    datasets = _load_datasets(config, load_dataset)
    runs: list[RunRecord] = []
    scenario_name, task_names = "", []
    for scenario, run in _iterate_runs(config, seeds, specs, datasets, fingerprint, workdir):
        runs.append(run)
        scenario_name, task_names = scenario.name, scenario.task_names
    summary = summarize_runs(runs)

    figures = plots.write_figures(runs, summary, task_names, workdir)
    _write_atomic(workdir / "metrics.csv", _metrics_csv(runs, task_names))
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "finished": True,
        "config": config.to_dict(),
        "scenario": scenario_name,
        "task_names": task_names,
        "methods": [s.name for s in specs],
        "seeds": seeds,
        "runs": [dataclasses.asdict(run) for run in runs],
        "summary": summary,
        "figures": [str(path.name) for path in figures],
        "environment": environment(),
        "wall_time_s": time.perf_counter() - started,
    }
    _write_atomic(results_path, json.dumps(results, indent=2) + "\n")
    checkpoint.remove_all(workdir)
    print(format_summary(summary, task_names))
    for path in figures:
        print(f"figure: {path}")
    print(f"results: {results_path}")
    return results
