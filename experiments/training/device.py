"""A scenario's data on device: padded to fixed capacities, placed on one device or a mesh.

Owns the data-parallel mesh (:func:`data_mesh`, its shardings, and the FSDP layout of the
parameters, :func:`param_shardings`) and :class:`TaskData`, the padded arrays every step reads.
Padding every task to one capacity makes a new task change values only, never shapes, so the
jitted steps compile once per run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from experiments import scenarios
from experiments.spec import MeshSpec
from experiments.training.methods import MethodSpec

DATA_AXIS = "data"
"""Name of the mesh axis that examples (or, in a sweep, runs) are split over."""


def data_mesh(spec: MeshSpec) -> jax.sharding.Mesh | None:
    """The 1-D ``("data",)`` mesh of ``spec.data_parallel``, or None.

    ``spec.mesh_devices`` devices (0: all of ``jax.devices()``, which after
    ``jax.distributed.initialize`` are those of every host).
    """
    if not spec.data_parallel:
        return None
    devices = jax.devices()
    count = spec.mesh_devices or len(devices)
    return jax.sharding.Mesh(np.asarray(devices[:count]), (DATA_AXIS,))


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Leading axis split over the mesh's data axis."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """A full copy on every device of the mesh."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], devices: int) -> jax.sharding.PartitionSpec:
    """The FSDP layout of an array of ``shape``: its largest axis divisible by ``devices`` split
    over the data axis (the first such axis on a tie); replicated when no axis divides.

    Example:
        >>> fsdp_spec((32, 128), 8), fsdp_spec((3, 5), 8), fsdp_spec((), 8)
        (P(None, 'data'), P(), P())
    """
    divisible = [axis for axis, size in enumerate(shape) if size and size % devices == 0]
    if not divisible:
        return jax.sharding.PartitionSpec()
    axis = max(divisible, key=lambda a: shape[a])
    return jax.sharding.PartitionSpec(*(None,) * axis, DATA_AXIS)


def param_shardings(params: Any, mesh: jax.sharding.Mesh) -> Any:
    """FSDP over the data axis: the ``NamedSharding`` of :func:`fsdp_spec` for every leaf.

    The layout depends on a leaf's shape only, so the optimiser moments, the EWC anchor and
    precision and SI's path integral, shaped like the params, get the params' layout, and
    scalars (step counts, the PRNG key, the strength) stay replicated. Each device then holds
    ``1/D`` of every split leaf; a jitted step all-gathers a leaf where the model needs it
    whole and reduces its gradient onto the shards (GSPMD).

    Args:
        params: a pytree of arrays (or anything with ``.shape``).
        mesh: the data mesh of :func:`data_mesh`.

    Returns:
        A pytree of ``NamedSharding`` of the same structure.
    """
    devices = mesh.devices.size
    return jax.tree.map(
        lambda leaf: jax.sharding.NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), devices)),
        params,
    )


class TaskData(NamedTuple):
    """A task's examples on device, padded to a fixed capacity so that all tasks share shapes.

    Attributes:
        images: float32 ``[capacity, H, W, C]`` (text: int32 ``[capacity, T]``); rows past
            ``num_valid`` are zero.
        labels: int32 ``[capacity]`` (text: ``[capacity, T]``).
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
        images: float32 ``[N, ...]`` (or int32 byte sequences, kept as int32).
        labels: int ``[N, ...]``.
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
    dtype = np.int32 if np.issubdtype(images.dtype, np.integer) else np.float32
    padded_images = np.zeros((capacity, *images.shape[1:]), dtype)
    padded_images[:num] = images
    padded_labels = np.zeros((capacity, *labels.shape[1:]), np.int32)
    padded_labels[:num] = labels
    padded_heads = np.zeros(capacity, np.int32)
    padded_heads[:num] = heads
    return TaskData(
        images=jax.device_put(padded_images, device),
        labels=jax.device_put(padded_labels, device),
        heads=jax.device_put(padded_heads, device),
        num_valid=jax.device_put(np.asarray(num, np.int32), device),
    )


@dataclasses.dataclass
class DeviceScenario:
    """A scenario's data on device, padded so every task has one shape.

    Attributes:
        scenario: the host-side scenario.
        train: per task, its own training data; None if no method uses it.
        joint_train: per task, the union of tasks ``0..i`` (for a method with
            ``cumulative_data``, joint training); None if unused.
        test: per task, its test data.
    """

    scenario: scenarios.Scenario
    train: list[TaskData] | None
    joint_train: list[TaskData] | None
    test: list[TaskData]

    def training_sets(self, method: MethodSpec) -> list[TaskData]:
        """The training set of each task for ``method``: the cumulative ones for joint."""
        sets = self.joint_train if method.method.cumulative_data else self.train
        if sets is None:
            raise ValueError(f"put_scenario was not asked for the training data of {method.name!r}")
        return sets


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


def put_for_methods(
    scenario: scenarios.Scenario,
    methods: Sequence[MethodSpec],
    mesh: jax.sharding.Mesh | None = None,
) -> DeviceScenario:
    """:func:`put_scenario` with the training sets ``methods`` use (joint: the cumulative ones)."""
    return put_scenario(
        scenario,
        need_train=any(not m.method.cumulative_data for m in methods),
        need_joint=any(m.method.cumulative_data for m in methods),
        mesh=mesh,
    )
