"""Task 1 trained once per seed and shared by every run that would train it the same way
(``config.first_task_params``; the files: :mod:`experiments.storage.first_task`).

:func:`identity` lists what determines task 1's training: the seed, the model (and the bytes of
an ``.npz`` it is initialised from), the optimiser, the batch size, task 1's step count and scan
length, the devices, and the SHA-256 of task 1's padded training arrays (which covers the
datasets, their subsets and the padding capacity that the shuffling draws over). Runs whose
identity matches load task 1's parameters, optimiser state and PRNG key and go on from there:
task 1 is still evaluated and its importance computed by each run, from the loaded parameters.
A single run that loads them therefore gives the same matrix, bit for bit, as the run that
trained task 1 and saved them (same method and seed); another method, or a sweep's runs side by
side under ``jax.vmap``, trains task 1 with the same steps but another compiled program, equal
to float rounding. A sweep builds every run's scenario from its first seed: with a
seed-dependent subset of the data (``train_limit``), its later seeds' task 1 is not their single
runs', and a store saved by those is refused.

Methods whose task 1 differs from plain training (:attr:`Method.shares_first_task
<experiments.training.methods.Method.shares_first_task>` false: SI, whose path integral runs
during task 1, and joint, whose task 1 set is padded to all tasks' size) train it themselves,
and neither load nor save the shared params.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import RunSpec
from experiments.storage.first_task import FirstTaskParams
from experiments.training import loop
from experiments.training.device import TaskData
from experiments.training.progress import Progress
from experiments.training.steps import TrainState

_PROGRESS = ("steps_done", "epoch", "global_step", "curves")
"""The fields of :class:`~experiments.training.progress.Progress` that task 1 moves."""


def identity(spec: RunSpec, plan: loop.Plan, train: TaskData, seed: int) -> dict[str, Any]:
    """What determines the training of task 1 of ``plan`` for ``seed`` (JSON values).

    Args:
        spec: the experiment.
        plan: the run's plan (task 1's steps and scan length).
        train: task 1's padded training data on device.
        seed: the run's seed.
    """
    model = dataclasses.asdict(spec.model)
    if Path(spec.model.init).is_file():
        model["init_sha256"] = hashlib.sha256(Path(spec.model.init).read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for array in (train.images, train.labels, train.heads, train.num_valid):
        host = np.asarray(array)
        digest.update(f"{host.dtype}{host.shape}".encode())
        digest.update(np.ascontiguousarray(host).tobytes())
    optimizer = dataclasses.asdict(spec.optimizer)
    del optimizer["reset_per_task"]  # acts between tasks only
    return {
        "seed": seed,
        "task": plan.task_names[0],
        "train_data_sha256": digest.hexdigest(),
        "model": model,
        "optimizer": optimizer,
        "batch_size": spec.schedule.batch_size,
        "steps": plan.total_steps[0],
        "steps_per_epoch": plan.steps_per_epoch[0],
        "scan_length": plan.num_batches[0],
        "mesh": dataclasses.asdict(spec.mesh),
    }


class SharedFirstTask:
    """:class:`experiments.training.loop.FirstTask` over the stores of a job's seeds.

    A single run has one store; a sweep's runs carry a leading axis, and run ``r`` takes the
    store of its seed ``seeds[r]`` (its strengths share it: no penalty acts during task 1).
    """

    def __init__(
        self,
        stores: dict[int, FirstTaskParams],
        seeds: tuple[int, ...],
        *,
        vmapped: bool,
        curves: bool,
        label: str,
    ):
        """
        Args:
            stores: the store of every seed of ``seeds``.
            seeds: the seed of every run (a sweep's run axis, padding included).
            vmapped: whether the arrays carry a leading run axis.
            curves: whether the run records learning curves (a loaded task 1 brings its own).
            label: prefix of the printed lines.
        """
        self.stores, self.seeds = stores, seeds
        self.vmapped, self.curves, self.label = vmapped, curves, label

    def _run(self, tree: Any, seed: int) -> Any:
        """The part of ``tree`` of the first run of ``seed``."""
        if not self.vmapped:
            return tree
        index = self.seeds.index(seed)
        return jax.tree.map(lambda a: a[index], tree)

    def load(self, arrays: TrainState, progress: Progress) -> TrainState | None:
        """Task 1's arrays of every run from its seed's store (``progress`` moved to the end of
        task 1), or None, leaving both as they are, when a seed has none saved yet."""
        whole = _stored(arrays)
        found = {}
        for seed, store in self.stores.items():
            loaded = store.load(self._run(whole, seed))
            if loaded is None:
                return None
            found[seed] = loaded
        per_run = [found[seed][0] for seed in self.seeds]
        tree = jax.tree.map(lambda *xs: jnp.stack(xs), *per_run) if self.vmapped else per_run[0]
        tree = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), tree, whole)
        saved = found[self.seeds[0]][1]
        for field in _PROGRESS:
            if field != "curves" or self.curves:
                setattr(progress, field, saved[field])
        paths = ", ".join(str(store.path) for store in self.stores.values())
        print(
            f"{self.label} task 1: {saved['steps_done']} steps loaded from {paths} "
            f"(trained in {saved['train_s']:.0f} s by an earlier run)",
            flush=True,
        )
        return arrays._replace(
            params=tree["params"],
            opt_state=tree["opt_state"],
            key=jax.random.wrap_key_data(tree["key"]),
        )

    def save(self, arrays: TrainState, progress: Progress) -> None:
        """Saves every seed's task 1 (its first run's, unless that run diverged) where none is."""
        whole = _stored(arrays)
        values = {field: getattr(progress, field) for field in _PROGRESS}
        values["train_s"] = progress.task_elapsed_s
        for seed, store in self.stores.items():
            if progress.diverged and progress.diverged[self.seeds.index(seed)]:
                continue
            if store.save(self._run(whole, seed), values) is not None:
                print(f"{self.label} task 1 saved to {store.path} for later runs", flush=True)


def _stored(arrays: TrainState) -> dict[str, Any]:
    """The arrays task 1 changes, as the store keeps them (the PRNG key as its ``key_data``)."""
    return {
        "params": arrays.params,
        "opt_state": arrays.opt_state,
        "key": jax.random.key_data(arrays.key),
    }
