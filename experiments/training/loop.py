"""The one training loop: for each task, train it, evaluate, estimate the Fisher, consolidate, save.

A run's state is a :class:`RunState`: the arrays of :class:`experiments.training.steps.TrainState`
(parameters, optimiser and EWC state, PRNG key, strength) and its :class:`Progress` (the
position in the task stream, the NumPy generator state of the Fisher's example choice, and the
results so far). Checkpoints save and restore it whole. :func:`run` threads it through the
steps of a :class:`StepFns` (:mod:`experiments.training.runners`): a single run's jitted
steps, or the same steps under ``jax.vmap`` over a leading run axis for a sweep. The cadences
(evaluations for the learning curves, checkpoints within a task) are :class:`Plan` fields.

After every task a row of the accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training
task ``i``) is recorded, then the method consolidates. The matrix holds the scenario's metric
(:attr:`experiments.scenarios.Scenario.metric`): accuracy, or test bits per character on a
language sequence; ``accuracy_rows`` and the curves' ``accuracy`` keep their names for both.

Stopping: under :func:`experiments.training.signals.stop_on_signals` (the CLI), SIGINT and
SIGTERM do not kill the run where it stands: :func:`run` finishes the epoch it is in (its safe
point), saves a checkpoint and raises :class:`~experiments.training.signals.Interrupted`. A
signal outside the training loop (loading data, compiling, writing results), or a second one,
raises it at once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from experiments.spec import OptimizerSpec, ScheduleSpec
from experiments.training import forecast, steps
from experiments.training.device import DeviceScenario, TaskData
from experiments.training.divergence import TrainingDivergedError, divergence_message
from experiments.training.methods import MethodSpec
from experiments.training.progress import Progress, fisher_examples, progress_bar
from experiments.training.signals import Interrupted, safe_points, stop_requested, stop_signal


class RunState(NamedTuple):
    """Everything a run is: its arrays and its progress; checkpoints hold exactly this."""

    arrays: steps.TrainState
    progress: Progress


class StepFns(NamedTuple):
    """The steps the loop calls, bound to one setup and method (single run or sweep).

    Attributes:
        init: the fresh :class:`experiments.training.steps.TrainState`.
        train_epoch: ``(state, data, num_steps, *, num_batches, task) -> (state, loss)``.
        evaluate: ``(params, data) -> accuracy`` as float64 NumPy (``[R]`` in a sweep).
        consolidate: ``(state, images, labels, heads) -> state``.
        reset_optimizer: ``state -> state`` with a fresh optimiser state.
        select: the Fisher's example indices, one array per run, as the steps take them.
        unpad: drops the runs that only pad a sweep to the device count (identity otherwise).
        choose_strength: λ by the evidence (:func:`.consolidation.choose_strength`), or None.
        mean_loss: the mean loss for the forecast (:func:`.forecast.mean_loss`), or None.
    """

    init: Callable[[], steps.TrainState]
    train_epoch: Callable[..., tuple[steps.TrainState, jax.Array]]
    evaluate: Callable[[Any, TaskData], np.ndarray]
    consolidate: Callable[..., steps.TrainState]
    reset_optimizer: Callable[[steps.TrainState], steps.TrainState]
    select: Callable[[list[np.ndarray]], Any]
    unpad: Callable[[np.ndarray], np.ndarray]
    choose_strength: Callable[..., tuple[steps.TrainState, Any]] | None = None
    mean_loss: Callable[[Any, TaskData], jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the loop does for one method: tasks, step counts and the cadences, as data.

    Attributes:
        label: prefix of every printed line, e.g. ``"[ewc seed 0]"``.
        method: the method.
        seeds: the seed of every run (one for a single run; a sweep's run axis, padding
            included); each distinct seed has its own generator for the Fisher's examples.
        task_names: the tasks' names.
        total_steps: SGD steps of each task.
        steps_per_epoch: SGD steps of one pass over each task's training set.
        num_batches: scan length of each task's epoch
        (:func:`experiments.training.steps.scan_length`).
        eval_every: evaluate the curves at the first epoch end at or past every this many steps
            of a task (0: after every epoch; None: only the accuracy matrix, at task ends).
        checkpoint_every: checkpoint at the first epoch end at or past every this many steps of
            a task (0: after tasks only).
        reset_optimizer: fresh optimiser state for every task.
        raise_on_divergence: raise :class:`TrainingDivergedError` at once (single runs), or
            record the run as diverged and go on (sweeps).
        learning_rate: for the divergence message.
        optimizer: for the divergence message.
        metric: the scenario's metric, for the printed lines.
    """

    label: str
    method: MethodSpec
    seeds: tuple[int, ...]
    task_names: tuple[str, ...]
    total_steps: tuple[int, ...]
    steps_per_epoch: tuple[int, ...]
    num_batches: tuple[int, ...]
    eval_every: int | None
    checkpoint_every: int
    reset_optimizer: bool
    raise_on_divergence: bool
    learning_rate: float
    optimizer: str
    metric: str = "accuracy"

    @property
    def num_tasks(self) -> int:
        """Tasks in the stream."""
        return len(self.task_names)


class FirstTask(Protocol):
    """Where a run may find task 1 trained already, and leaves it once it has trained it
    (:class:`experiments.runs.first_task.SharedFirstTask`)."""

    def load(self, arrays: steps.TrainState, progress: Progress) -> steps.TrainState | None:
        """The arrays with task 1's trained ones (``progress`` moved to its end), or None."""

    def save(self, arrays: steps.TrainState, progress: Progress) -> None:
        """Keeps the arrays and progress at the end of task 1's training (before its
        evaluation and importance)."""


def make_plan(
    schedule: ScheduleSpec,
    optimizer: OptimizerSpec,
    data: DeviceScenario,
    method: MethodSpec,
    seeds: tuple[int, ...],
    *,
    label: str,
    sweep: bool = False,
) -> Plan:
    """The :class:`Plan` of ``method`` on ``data`` with ``schedule`` (a sweep: no curves)."""
    train_sets = data.training_sets(method)
    batch_size = schedule.batch_size
    per_epoch = [-(-int(d.num_valid) // batch_size) for d in train_sets]
    return Plan(
        label=label,
        method=method,
        seeds=seeds,
        task_names=tuple(data.scenario.task_names),
        total_steps=tuple(schedule.task_steps(i, n) for i, n in enumerate(per_epoch)),
        steps_per_epoch=tuple(per_epoch),
        num_batches=tuple(
            steps.scan_length(n, d.labels.shape[0], batch_size)
            for n, d in zip(per_epoch, train_sets, strict=True)
        ),
        eval_every=None if sweep else schedule.eval_every_steps,
        checkpoint_every=schedule.checkpoint_every_steps,
        reset_optimizer=optimizer.reset_per_task,
        raise_on_divergence=not sweep,
        learning_rate=optimizer.learning_rate,
        optimizer=optimizer.name,
        metric=data.scenario.metric,
    )


def start(plan: Plan, fns: StepFns) -> RunState:
    """A fresh run of ``plan``."""
    distinct = list(dict.fromkeys(plan.seeds))
    progress = Progress(
        fisher_rngs=[np.random.default_rng(seed).bit_generator.state for seed in distinct],
        diverged=fns.unpad(np.zeros(len(plan.seeds), bool)).tolist(),
    )
    return RunState(fns.init(), progress)


def run(
    state: RunState,
    plan: Plan,
    fns: StepFns,
    data: DeviceScenario,
    save: Callable[[RunState], None] = lambda state: None,
    first_task: FirstTask | None = None,
) -> RunState:
    """Trains from where ``state`` stands to the end of the task stream.

    For each task: epochs until its step count (evaluating the learning curves and checkpointing
    at the plan's cadences), then the accuracy on every task, the Fisher and consolidation, and a
    checkpoint. Progress is updated in place; the arrays are replaced by each step.

    Args:
        state: a fresh (:func:`start`) or restored run.
        plan: tasks, step counts and cadences.
        fns: the steps.
        data: the scenario on device.
        save: writes a checkpoint of the state it is given.
        first_task: task 1 trained by an earlier run: loaded instead of training it when it
            holds it, else given task 1's state once trained. Task 1 is still evaluated and its
            importance computed in this run.

    Returns:
        The finished state (``progress.task == plan.num_tasks``).

    Raises:
        TrainingDivergedError: a loss became non-finite and ``plan.raise_on_divergence``.
        Interrupted: SIGINT or SIGTERM under :func:`stop_on_signals`; the state at the safe
            point was saved first.
    """
    with safe_points():
        return _run(state, plan, fns, data, save, first_task)


def _run(
    state: RunState,
    plan: Plan,
    fns: StepFns,
    data: DeviceScenario,
    save: Callable[[RunState], None],
    first_task: FirstTask | None,
) -> RunState:
    train_sets = data.training_sets(plan.method)
    progress = state.progress
    for task in range(progress.task, plan.num_tasks):
        start_time = time.perf_counter() - progress.task_elapsed_s
        if progress.steps_done == 0:
            if task > 0 and plan.reset_optimizer:
                state = state._replace(arrays=fns.reset_optimizer(state.arrays))
            progress.next_eval, progress.epoch = plan.eval_every or 0, 0
        loaded = None
        if task == 0 and first_task is not None and progress.steps_done == 0:
            loaded = first_task.load(state.arrays, progress)
            state = state if loaded is None else state._replace(arrays=loaded)
        bar = progress_bar(
            plan.total_steps[task],
            progress.steps_done,
            f"{plan.label.strip('[]')} task {task + 1}/{plan.num_tasks}",
        )
        while progress.steps_done < plan.total_steps[task]:
            before = progress.steps_done
            state = _train_epoch(state, plan, fns, train_sets[task], data, task)
            bar.update(progress.steps_done - before)
            if progress.steps_done < plan.total_steps[task]:
                stop = stop_requested()
                if stop or _crossed(plan.checkpoint_every, before, progress.steps_done):
                    progress.task_elapsed_s = time.perf_counter() - start_time
                    save(state)
                if stop:
                    bar.close()
                    raise Interrupted(stop_signal())
        bar.close()
        if task == 0 and first_task is not None and loaded is None:
            progress.task_elapsed_s = time.perf_counter() - start_time
            first_task.save(state.arrays, progress)
        state = _finish_task(state, plan, fns, data, task, start_time)
        save(state)
        if stop_requested():
            raise Interrupted(stop_signal())
    return state


def _crossed(every: int, before: int, after: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(before, after]`` (never for ``every`` 0)."""
    return bool(every) and after // every > before // every


def _train_epoch(
    state: RunState, plan: Plan, fns: StepFns, train: TaskData, data: DeviceScenario, task: int
) -> RunState:
    """One epoch (or what is left of the task), the divergence check and the curves' cadence."""
    progress = state.progress
    num_steps = min(plan.steps_per_epoch[task], plan.total_steps[task] - progress.steps_done)
    steps_now, batches = jnp.int32(num_steps), plan.num_batches[task]
    arrays, loss = fns.train_epoch(
        state.arrays, train, steps_now, num_batches=batches, task=jnp.int32(task)
    )
    finite = fns.unpad(np.isfinite(np.asarray(loss)))
    if not np.all(finite):
        if plan.raise_on_divergence:
            raise TrainingDivergedError(
                divergence_message(
                    plan.method, plan.learning_rate, plan.optimizer, state.arrays, task
                )
            )
        progress.diverged = (np.asarray(progress.diverged) | ~finite).tolist()
    progress.steps_done += num_steps
    progress.epoch += 1
    progress.global_step += num_steps
    every, ending = plan.method.evidence_every, progress.steps_done >= plan.total_steps[task]
    # λ by the evidence at its cadence (the task's end chooses anyway, after the last epoch).
    if plan.method.evidence and task and every and progress.epoch % every == 0 and not ending:
        arrays = _choose_strength(RunState(arrays, progress), plan, fns, data, task)
    if _curves_due(plan, progress, task):
        accuracy = [float(fns.evaluate(arrays.params, data.test[j])) for j in range(task + 1)]
        progress.curves.append(
            {
                "task": task,
                "epoch": progress.epoch,
                "step": progress.global_step,
                "loss": float(loss),
                "accuracy": accuracy,
            }
        )
        # One line per point, so that a long task's curve can be followed in a log.
        print(
            f"{plan.label} task {task + 1} step {progress.steps_done}: "
            f"{plan.metric.replace('_', ' ')} {' '.join(f'{a:.3f}' for a in accuracy)} "
            f"(training loss {float(loss):.3f})",
            flush=True,
        )
    return RunState(arrays, progress)


def _curves_due(plan: Plan, progress: Progress, task: int) -> bool:
    """Whether the epoch just taken ends at the curves' cadence; advances ``next_eval``."""
    every, done = plan.eval_every, progress.steps_done
    if every is None:
        return False
    if every and done < progress.next_eval and done < plan.total_steps[task]:
        return False
    while every and progress.next_eval <= done:
        progress.next_eval += every
    return True


def _finish_task(
    state: RunState, plan: Plan, fns: StepFns, data: DeviceScenario, task: int, start: float
) -> RunState:
    """Accuracy on every task, then the Fisher and consolidation; moves to the next task."""
    arrays, progress = state
    row = np.stack([fns.unpad(fns.evaluate(arrays.params, test)) for test in data.test], axis=-1)
    if arrays.forecast is not None and fns.mean_loss is not None:
        own, pairs = forecast.measure(
            arrays.params, arrays.forecast, fns.mean_loss, data, progress.own_losses, task
        )
        progress.own_losses.append(own)
        progress.forecast.extend(pairs)
    fisher_start = time.perf_counter()
    if plan.method.evidence:
        progress.strengths_per_task.append(None)
        if task > 0:
            arrays = _choose_strength(RunState(arrays, progress), plan, fns, data, task)
            progress.strengths_per_task[-1] = progress.strength_choices[-1]["strength"]
    if plan.method.regularized:
        images = labels = heads = None
        if plan.method.needs_fisher:
            images, labels, heads = _task_examples(plan, fns, data, progress, task)
        arrays = fns.consolidate(arrays, images, labels, heads)
        jax.block_until_ready(arrays.ewc_state)
    end = time.perf_counter()
    progress.accuracy_rows.append(row.tolist())
    progress.fisher_wall_time_s.append(end - fisher_start)
    progress.task_wall_time_s.append(end - start)
    progress.steps_per_task.append(progress.steps_done)
    shown = row.reshape(-1, row.shape[-1]).mean(axis=0)[: task + 1]
    chosen_strength = (progress.strengths_per_task or [None])[-1]
    print(
        f"{plan.label} task {task + 1}/{plan.num_tasks} {plan.task_names[task]}: "
        f"{'mean ' if row.ndim > 1 else ''}{plan.metric.replace('_', ' ')} "
        f"{' '.join(f'{a:.3f}' for a in shown)} "
        f"({progress.steps_done} steps, {end - start:.1f} s"
        f"{'' if chosen_strength is None else f', evidence λ {chosen_strength:.4g}'})",
        flush=True,
    )
    progress.task, progress.steps_done, progress.task_elapsed_s = task + 1, 0, 0.0
    return RunState(arrays, progress)


def _task_examples(
    plan: Plan, fns: StepFns, data: DeviceScenario, progress: Progress, task: int
) -> tuple[Any, Any, Any]:
    """``fisher_samples`` of task ``task``'s training examples (images, labels, heads), drawn
    by each seed's generator in ``progress``."""
    own = data.train[task]
    count, valid = plan.method.fisher_samples, int(own.num_valid)
    chosen = fns.select(fisher_examples(progress, plan.seeds, count, valid))
    return own.images[chosen], own.labels[chosen], own.heads[chosen]


def _choose_strength(
    state: RunState, plan: Plan, fns: StepFns, data: DeviceScenario, task: int
) -> steps.TrainState:
    """The arrays with λ re-chosen by the evidence of task ``task`` on ``fisher_samples`` of
    its training examples (drawn as the Fisher's are), appended to ``strength_choices``."""
    arrays, progress = state
    examples = _task_examples(plan, fns, data, progress, task)
    num_examples = int(data.train[task].num_valid)
    arrays, evidence = fns.choose_strength(arrays, *examples, num_examples=num_examples)
    progress.strength_choices.append(
        {"task": task, "epoch": progress.epoch, "strength": float(arrays.strength)}
        | {
            name: float(getattr(evidence, name))
            for name in ("log_evidence", "effective_parameters")
        }
    )
    return arrays
