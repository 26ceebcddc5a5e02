"""The one training loop: for each task, train it, evaluate, estimate the Fisher, consolidate, save.

A run's state is a :class:`RunState`: the arrays of :class:`experiments.training.steps.TrainState`
(parameters, optimiser and EWC state, PRNG key, strength) and its :class:`Progress` (the
position in the task stream, the NumPy generator state of the Fisher's example choice, and the
results so far). Checkpoints save and restore it whole. :func:`run` threads it through the
steps of a :class:`StepFns` (:mod:`experiments.training.runners`): a single run's jitted
steps, or the same steps under ``jax.vmap`` over a leading run axis for a sweep. The cadences
(when to evaluate for the learning curves, when to checkpoint within a task) are fields of the
:class:`Plan`.

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
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.spec import OptimizerSpec, ScheduleSpec
from experiments.training import forecast, steps
from experiments.training.device import DeviceScenario, TaskData
from experiments.training.methods import MethodSpec
from experiments.training.signals import Interrupted, safe_points, stop_requested, stop_signal


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


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


class RunState(NamedTuple):
    """Everything a run is: its arrays and its progress; checkpoints hold exactly this."""

    arrays: steps.TrainState
    progress: Progress


class StepFns(NamedTuple):
    """The steps the loop calls, bound to one setup and method (single run or sweep).

    Attributes:
        init: the fresh :class:`experiments.training.steps.TrainState`.
        train_epoch: ``(state, data, num_steps, *, num_batches) -> (state, loss)``.
        evaluate: ``(params, data) -> accuracy`` as float64 NumPy (``[R]`` in a sweep).
        consolidate: ``(state, images, labels, heads) -> state``.
        reset_optimizer: ``state -> state`` with a fresh optimiser state.
        select: the Fisher's example indices, one array per run, as the steps take them.
        unpad: drops the runs that only pad a sweep to the device count (identity otherwise).
        choose_strength: ``(state, images, labels, heads, *, num_examples) -> (state,
            evidence)``: λ re-chosen by the Laplace evidence
            (:func:`experiments.training.consolidation.choose_strength`); None for a sweep.
        mean_loss: ``(params, data) -> mean cross-entropy`` for the forgetting forecast
            (:func:`experiments.training.forecast.mean_loss`); None for a sweep.
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

    Returns:
        The finished state (``progress.task == plan.num_tasks``).

    Raises:
        TrainingDivergedError: a loss became non-finite and ``plan.raise_on_divergence``.
        Interrupted: SIGINT or SIGTERM under :func:`stop_on_signals`; the state at the safe
            point was saved first.
    """
    with safe_points():
        return _run(state, plan, fns, data, save)


def _run(
    state: RunState,
    plan: Plan,
    fns: StepFns,
    data: DeviceScenario,
    save: Callable[[RunState], None],
) -> RunState:
    train_sets = data.training_sets(plan.method)
    progress = state.progress
    for task in range(progress.task, plan.num_tasks):
        start_time = time.perf_counter() - progress.task_elapsed_s
        if progress.steps_done == 0:
            if task > 0 and plan.reset_optimizer:
                state = state._replace(arrays=fns.reset_optimizer(state.arrays))
            progress.next_eval, progress.epoch = plan.eval_every or 0, 0
        bar = _progress_bar(plan, task, progress.steps_done)
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
    arrays, loss = fns.train_epoch(
        state.arrays, train, jnp.int32(num_steps), num_batches=plan.num_batches[task]
    )
    finite = fns.unpad(np.isfinite(np.asarray(loss)))
    if not np.all(finite):
        if plan.raise_on_divergence:
            raise TrainingDivergedError(divergence_message(plan, state.arrays, task))
        progress.diverged = (np.asarray(progress.diverged) | ~finite).tolist()
    progress.steps_done += num_steps
    progress.epoch += 1
    progress.global_step += num_steps
    every = plan.method.evidence_every
    if (
        plan.method.evidence
        and task > 0
        and every
        and progress.epoch % every == 0
        and progress.steps_done < plan.total_steps[task]  # the task's end chooses anyway
    ):
        arrays = _choose_strength(arrays, plan, fns, data, progress, task)
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
        _forecast(arrays, fns, data, progress, task)
    fisher_start = time.perf_counter()
    if plan.method.evidence:
        progress.strengths_per_task.append(None)
        if task > 0:
            arrays = _choose_strength(arrays, plan, fns, data, progress, task)
            progress.strengths_per_task[-1] = progress.strength_choices[-1]["strength"]
    if plan.method.regularized:
        images = labels = heads = None
        if plan.method.needs_fisher:
            own = data.train[task]
            chosen = fns.select(_fisher_examples(plan, progress, int(own.num_valid)))
            images, labels, heads = own.images[chosen], own.labels[chosen], own.heads[chosen]
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


def _forecast(
    arrays: steps.TrainState, fns: StepFns, data: DeviceScenario, progress: Progress, task: int
) -> None:
    """Task ``task``'s own losses, and the forecast of every earlier task's forgetting beside
    its measured rise (training and test data), appended to ``progress``."""
    tokens = jnp.float32(forecast.tokens_per_example(data.train[task]))
    for k in range(task + 1):
        train_loss = float(fns.mean_loss(arrays.params, data.train[k]))
        test_loss = float(fns.mean_loss(arrays.params, data.test[k]))
        if k == task:
            progress.own_losses.append([train_loss, test_loss])
            continue
        predicted = forecast.predicted_rise(arrays.params, arrays.forecast, jnp.int32(k), tokens)
        own_train, own_test = progress.own_losses[k]
        progress.forecast.append(
            {
                "after_task": task,
                "task": k,
                "predicted": float(predicted),
                "measured_train": train_loss - own_train,
                "measured_test": test_loss - own_test,
            }
        )


def _choose_strength(
    arrays: steps.TrainState,
    plan: Plan,
    fns: StepFns,
    data: DeviceScenario,
    progress: Progress,
    task: int,
) -> steps.TrainState:
    """λ re-chosen by the evidence of task ``task`` on ``fisher_samples`` of its training
    examples (drawn as the Fisher's are); the choice is appended to ``strength_choices``."""
    own = data.train[task]
    num_valid = int(own.num_valid)
    chosen = fns.select(_fisher_examples(plan, progress, num_valid))
    arrays, evidence = fns.choose_strength(
        arrays, own.images[chosen], own.labels[chosen], own.heads[chosen], num_examples=num_valid
    )
    progress.strength_choices.append(
        {
            "task": task,
            "epoch": progress.epoch,
            "strength": float(arrays.strength),
            "log_evidence": float(evidence.log_evidence),
            "effective_parameters": float(evidence.effective_parameters),
        }
    )
    return arrays


def _fisher_examples(plan: Plan, progress: Progress, num_valid: int) -> list[np.ndarray]:
    """Per run, the sorted indices of the Fisher's examples; advances each seed's generator."""
    by_seed = {}
    for index, seed in enumerate(dict.fromkeys(plan.seeds)):
        rng = np.random.default_rng()
        rng.bit_generator.state = progress.fisher_rngs[index]
        count = min(num_valid, plan.method.fisher_samples)
        by_seed[seed] = np.sort(rng.choice(num_valid, count, replace=False))
        progress.fisher_rngs[index] = rng.bit_generator.state
    return [by_seed[seed] for seed in plan.seeds]


def divergence_message(plan: Plan, arrays: steps.TrainState, task: int) -> str:
    """Why a single run's loss became non-finite, and what to change."""
    method = plan.method
    message = f"{method.name}: the training loss became non-finite on task {task + 1}"
    if method.regularized and int(arrays.ewc_state.num_tasks) > 0:
        ewc = arrays.ewc_state
        # K-FAC: the diagonal of each layer's A ⊗ G besides the uncovered parameters' precision.
        diagonals = [
            jnp.diagonal(t.a[-1])[:, None] * jnp.diagonal(t.g[-1])[None]
            for t in getattr(ewc, "layers", ())
        ]
        ewc = getattr(ewc, "diagonal", ewc)
        top = max(float(jnp.max(p)) for p in jax.tree.leaves(ewc.precision) + diagonals)
        # Plain gradient descent on λ/2·Λ·θ² is stable only while lr·λ·Λ < 2.
        product = plan.learning_rate * method.strength * top
        message += (
            f"; learning_rate * strength * max precision = {plan.learning_rate:g} * "
            f"{method.strength:g} * {top:.3g} = {product:.3g}"
        )
        if plan.optimizer == "sgd" and product >= 2:
            message += " >= 2, so SGD on the penalty diverges"
        message += ": lower the strength or the learning rate"
    return message + "."


def _progress_bar(plan: Plan, task: int, done: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=plan.total_steps[task],
        initial=done,
        desc=f"{plan.label.strip('[]')} task {task + 1}/{plan.num_tasks}",
        leave=False,
        disable=not sys.stderr.isatty(),
    )
