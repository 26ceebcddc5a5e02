"""The host half of a run's state: :class:`Progress` (JSON), and the draws of its generators.

Checkpoints save it beside the arrays (:mod:`experiments.storage.checkpoint`); the loop
(:mod:`experiments.training.loop`) updates it in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Progress:
    """The host half of a run's state: where it stands and what it has produced (JSON).

    Attributes:
        task: the task being trained (the number of tasks once finished).
        steps_done: SGD steps taken in that task.
        epoch: epochs taken in that task.
        next_eval: the step count of the task at or past which the curves are evaluated next.
        global_step: SGD steps taken over all tasks.
        task_elapsed_s: seconds spent on the current task before the last checkpoint.
        fisher_rngs: the NumPy generator state choosing the Fisher's examples, per seed.
        accuracy_rows: per finished task ``i``, the accuracy on every task (per run in a sweep).
        diverged: per run, whether its loss became non-finite (a sweep keeps going).
        curves: one entry per evaluation during training: ``task``, ``epoch`` within it, global
            ``step``, mean training ``loss`` of the epoch, ``accuracy`` on tasks ``0..task``.
        task_wall_time_s: seconds per task (training, evaluation and consolidation).
        fisher_wall_time_s: seconds per task spent estimating the Fisher and consolidating.
        steps_per_task: SGD steps taken on each task.
        strengths_per_task: with ``strengths.<method>=evidence``, the λ the evidence chose at
            each task's end (None for the first task, which has no prior); else empty.
        strength_choices: every choice of λ by the evidence: ``task``, ``epoch`` (the epochs
            of the task done; at the task's end its last), ``strength``, ``log_evidence`` and
            ``effective_parameters`` (γ).
        own_losses: with a forgetting forecast, each task's mean loss ``[train, test]`` at its
            own end (at :math:`θ^*_k`); else empty.
        forecast: the forgetting forecast (:mod:`experiments.training.forecast`): after each
            task ``after_task``, for every earlier ``task``, the ``predicted`` rise of its mean
            loss, ½ Δθᵀ F_k Δθ, and the ``measured_train`` and ``measured_test`` rises.
    """

    task: int = 0
    steps_done: int = 0
    epoch: int = 0
    next_eval: int = 0
    global_step: int = 0
    task_elapsed_s: float = 0.0
    fisher_rngs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    accuracy_rows: list[Any] = dataclasses.field(default_factory=list)
    diverged: list[bool] = dataclasses.field(default_factory=list)
    curves: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    task_wall_time_s: list[float] = dataclasses.field(default_factory=list)
    fisher_wall_time_s: list[float] = dataclasses.field(default_factory=list)
    steps_per_task: list[int] = dataclasses.field(default_factory=list)
    strengths_per_task: list[float | None] = dataclasses.field(default_factory=list)
    strength_choices: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    own_losses: list[list[float]] = dataclasses.field(default_factory=list)
    forecast: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def fisher_examples(
    progress: Progress, seeds: tuple[int, ...], count: int, num_valid: int
) -> list[np.ndarray]:
    """Per run (of ``seeds``), the sorted indices of ``count`` of the ``num_valid`` examples
    for a Fisher; advances each distinct seed's generator in ``progress``."""
    by_seed = {}
    count = min(num_valid, count)
    for index, seed in enumerate(dict.fromkeys(seeds)):
        rng = np.random.default_rng()
        rng.bit_generator.state = progress.fisher_rngs[index]
        by_seed[seed] = np.sort(rng.choice(num_valid, count, replace=False))
        progress.fisher_rngs[index] = rng.bit_generator.state
    return [by_seed[seed] for seed in seeds]


def progress_bar(total: int, done: int, description: str) -> Any:
    """A tqdm bar of ``total`` steps starting at ``done``, shown only when stderr is a terminal
    (a log file gets the loop's printed lines instead)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=done,
        desc=description,
        leave=False,
        disable=not sys.stderr.isatty(),
    )
