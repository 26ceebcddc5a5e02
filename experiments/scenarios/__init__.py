"""Scenarios: the task streams of continual learning (:mod:`.streams`: sequences, permuted, split
and rotated datasets) and how a run's :class:`experiments.spec.DataSpec` becomes one
(:mod:`.build`)."""

from experiments.scenarios.build import build_scenario, check_scenario, subsample
from experiments.scenarios.streams import (
    Scenario,
    Task,
    class_pairs,
    class_permutation,
    permuted,
    pixel_permutations,
    rotate_images,
    rotated,
    short_name,
    split,
    task_sequence,
)

__all__ = [
    "Scenario",
    "Task",
    "build_scenario",
    "check_scenario",
    "class_pairs",
    "class_permutation",
    "permuted",
    "pixel_permutations",
    "rotate_images",
    "rotated",
    "short_name",
    "split",
    "subsample",
    "task_sequence",
]
