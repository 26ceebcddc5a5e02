"""Build a run's task stream from its :class:`experiments.spec.DataSpec` and check it."""

from __future__ import annotations

import numpy as np

from experiments.data.dataset import Dataset
from experiments.scenarios.streams import (
    LabeledImages,
    Scenario,
    class_permutation,
    permuted,
    rotated,
    split,
    task_sequence,
)
from experiments.spec import SCENARIOS, ConfigError, DataSpec


def subsample(
    dataset: LabeledImages, train_limit: int, test_limit: int, seed: int
) -> LabeledImages:
    """A random subset of at most ``train_limit`` / ``test_limit`` examples (0 keeps all).

    Args:
        dataset: the dataset.
        train_limit: how many training examples to keep; 0 keeps all.
        test_limit: how many test examples to keep; 0 keeps all.
        seed: NumPy seed of the choice; examples keep their original order.

    Returns:
        The dataset itself when nothing is dropped, else a subset with the same fields.
    """
    num_train, num_test = len(dataset.train_labels), len(dataset.test_labels)
    if (not train_limit or train_limit >= num_train) and (not test_limit or test_limit >= num_test):
        return dataset
    rng = np.random.default_rng(seed)

    def choose(n: int, limit: int) -> np.ndarray:
        if not limit or limit >= n:
            return np.arange(n)
        return np.sort(rng.choice(n, size=limit, replace=False))

    train_idx, test_idx = choose(num_train, train_limit), choose(num_test, test_limit)
    return Dataset(
        name=dataset.name,
        train_images=dataset.train_images[train_idx],
        train_labels=dataset.train_labels[train_idx],
        test_images=dataset.test_images[test_idx],
        test_labels=dataset.test_labels[test_idx],
        num_classes=dataset.num_classes,
    )


def build_scenario(spec: DataSpec, datasets: dict[str, LabeledImages], seed: int) -> Scenario:
    """Builds the scenario ``spec`` describes from already loaded datasets.

    Args:
        spec: the data and task stream of the run.
        datasets: loaded datasets keyed by spec (``spec.datasets``).
        seed: seed of the subsets, of the permutations and of a permuted class order.

    Returns:
        The scenario.
    """
    chosen = [
        subsample(datasets[name], spec.train_limit, spec.test_limit, seed) for name in spec.datasets
    ]
    if spec.scenario == "sequence":
        return task_sequence(chosen)
    (base,) = chosen
    if spec.scenario == "permuted":
        return permuted(base, spec.num_tasks, seed, first_unpermuted=spec.first_task_unpermuted)
    if spec.scenario == "split":
        order = None
        if spec.class_order == "permuted":
            order = class_permutation(base.num_classes, seed)
        return split(base, spec.split_mode, spec.class_groups or None, order)
    if spec.scenario == "rotated":
        return rotated(base, [float(angle) for angle in spec.angles])
    raise ConfigError(f"unknown scenario {spec.scenario!r}; valid scenarios: {SCENARIOS}")


def check_scenario(scenario: Scenario) -> None:
    """Raises :class:`experiments.spec.ConfigError` for a task stream that cannot mean anything.

    A stream needs at least two tasks (with one there is nothing to consolidate for and no
    forgetting to measure), heads of at least two outputs (a one-class head is right whatever
    the model does), and training and test examples in every task.
    """
    if scenario.num_tasks < 2:
        raise ConfigError(
            f"scenario {scenario.name!r} has {scenario.num_tasks} task; continual learning "
            "needs at least 2 (set num_tasks, angles, datasets or class_groups accordingly)"
        )
    if scenario.num_outputs < 2:
        raise ConfigError(
            f"every head of scenario {scenario.name!r} has {scenario.num_outputs} output: a "
            "one-class head is right whatever the model learns; give every task at least 2 "
            "classes in class_groups (or use split_mode 'class')"
        )
    for task in scenario.tasks:
        for split_name, labels in (("training", task.train_labels), ("test", task.test_labels)):
            if len(labels) == 0:
                raise ConfigError(
                    f"task {task.name!r} of scenario {scenario.name!r} has no {split_name} "
                    "examples; check class_groups against the dataset's labels, or "
                    "train_limit/test_limit"
                )
