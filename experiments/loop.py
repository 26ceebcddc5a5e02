"""The one training loop: for each task, train it, evaluate, estimate the Fisher, consolidate, save.

A run's state is a :class:`RunState`: the arrays of :class:`experiments.steps.TrainState`
(parameters, optimiser and EWC state, PRNG key, strength) and its :class:`Progress` (the
position in the task stream, the NumPy generator state of the Fisher's example choice, and the
results so far). Checkpoints save and restore it whole. :func:`run` threads it through the
steps of a :class:`StepFns`: the single-run steps of :func:`single_run_fns`, or the same steps
under ``jax.vmap`` over a leading run axis for a sweep (:func:`experiments.sweep.sweep_fns`).
The cadences (when to evaluate for the learning curves, when to checkpoint within a task) are
fields of the :class:`Plan`.

After every task a row of the accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training
task ``i``) is recorded, then the method consolidates. The matrix holds the scenario's metric
(:attr:`experiments.scenarios.Scenario.metric`): accuracy, or test bits per character on a
language sequence; ``accuracy_rows`` and the curves' ``accuracy`` keep their names for both.

Stopping: under :func:`stop_on_signals` (the CLI), SIGINT and SIGTERM do not kill the run where
it stands: :func:`run` finishes the epoch it is in (its safe point), saves a checkpoint and
raises :class:`Interrupted`. A signal outside the training loop (loading data, compiling,
writing results), or a second one, raises :class:`Interrupted` at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import checkpoint, steps
from experiments.config import MethodSpec
from experiments.device_data import DeviceScenario, TaskData


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run (after saving a checkpoint at a safe point).

    Attributes:
        signum: the signal.
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _Stop:
    """The signal handlers' state: inside the training loop, and the signal received."""

    in_loop = False
    signum: int | None = None


def _handle(signum: int, frame: Any) -> None:
    del frame
    if _Stop.in_loop and _Stop.signum is None:
        _Stop.signum = signum  # stop at the next safe point
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop training at the next safe point (module doc)."""
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _Stop.signum = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _Stop.signum = None


@contextlib.contextmanager
def _safe_points() -> Iterator[None]:
    """Marks the training loop, where a signal waits for the next safe point."""
    outer = _Stop.in_loop
    _Stop.in_loop = True
    try:
        yield
    finally:
        _Stop.in_loop = outer
    if _Stop.signum is not None:  # arrived after the last safe point
        raise Interrupted(_Stop.signum)


def _stop_requested() -> bool:
    """At a safe point: whether a signal asked to stop; a second one now interrupts at once."""
    if _Stop.signum is None:
        return False
    _Stop.in_loop = False
    return True


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


class RunState(NamedTuple):
    """Everything a run is: its arrays and its progress; checkpoints hold exactly this."""

    arrays: steps.TrainState
    progress: Progress


class StepFns(NamedTuple):
    """The steps the loop calls, bound to one setup and method (single run or sweep).

    Attributes:
        init: the fresh :class:`experiments.steps.TrainState`.
        train_epoch: ``(state, data, num_steps, *, num_batches) -> (state, loss)``.
        evaluate: ``(params, data) -> accuracy`` as float64 NumPy (``[R]`` in a sweep).
        consolidate: ``(state, images, labels, heads) -> state``.
        reset_optimizer: ``state -> state`` with a fresh optimiser state.
        select: the Fisher's example indices, one array per run, as the steps take them.
        unpad: drops the runs that only pad a sweep to the device count (identity otherwise).
    """

    init: Callable[[], steps.TrainState]
    train_epoch: Callable[..., tuple[steps.TrainState, jax.Array]]
    evaluate: Callable[[Any, TaskData], np.ndarray]
    consolidate: Callable[..., steps.TrainState]
    reset_optimizer: Callable[[steps.TrainState], steps.TrainState]
    select: Callable[[list[np.ndarray]], Any]
    unpad: Callable[[np.ndarray], np.ndarray]


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
        num_batches: scan length of each task's epoch (:func:`experiments.steps.scan_length`).
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
    config: ml_collections.ConfigDict,
    data: DeviceScenario,
    method: MethodSpec,
    seeds: tuple[int, ...],
    *,
    label: str,
    sweep: bool = False,
) -> Plan:
    """The :class:`Plan` of ``method`` on ``data`` as the config says (a sweep: no curves)."""
    train_sets = data.training_sets(method.name)
    batch_size = int(config.batch_size)
    per_epoch = [-(-int(d.num_valid) // batch_size) for d in train_sets]
    return Plan(
        label=label,
        method=method,
        seeds=seeds,
        task_names=tuple(data.scenario.task_names),
        total_steps=tuple(
            (i == 0 and int(config.first_task_steps))
            or int(config.steps_per_task)
            or int(config.epochs) * n
            for i, n in enumerate(per_epoch)
        ),
        steps_per_epoch=tuple(per_epoch),
        num_batches=tuple(
            steps.scan_length(n, d.labels.shape[0], batch_size)
            for n, d in zip(per_epoch, train_sets, strict=True)
        ),
        eval_every=None if sweep else int(config.eval_every_steps),
        checkpoint_every=int(config.checkpoint_every_steps),
        reset_optimizer=bool(config.reset_optimizer),
        raise_on_divergence=not sweep,
        learning_rate=float(config.learning_rate),
        optimizer=str(config.optimizer),
        metric=data.scenario.metric,
    )


def single_run_fns(
    setup: steps.StepSetup, method: MethodSpec, seed: int, data: DeviceScenario
) -> StepFns:
    """The :class:`StepFns` of one run: the jitted steps as they are."""
    setup = steps.method_setup(setup, method)
    return StepFns(
        init=lambda: steps.init_state(
            jax.random.key(seed), data.test[0].images[:1], method.strength, setup=setup
        ),
        train_epoch=functools.partial(steps.train_epoch, setup=setup),
        evaluate=lambda params, task_data: np.float64(
            float(steps.evaluate(params, task_data, setup=setup))
        ),
        consolidate=functools.partial(steps.consolidate_task, setup=setup, method=method),
        reset_optimizer=functools.partial(steps.reset_optimizer, setup=setup),
        select=lambda chosen: chosen[0],
        unpad=lambda values: values,
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
    with _safe_points():
        return _run(state, plan, fns, data, save)


def _run(
    state: RunState,
    plan: Plan,
    fns: StepFns,
    data: DeviceScenario,
    save: Callable[[RunState], None],
) -> RunState:
    train_sets = data.training_sets(plan.method.name)
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
                stop = _stop_requested()
                if stop or _crossed(plan.checkpoint_every, before, progress.steps_done):
                    progress.task_elapsed_s = time.perf_counter() - start_time
                    save(state)
                if stop:
                    bar.close()
                    raise Interrupted(_Stop.signum)
        bar.close()
        state = _finish_task(state, plan, fns, data, task, start_time)
        save(state)
        if _stop_requested():
            raise Interrupted(_Stop.signum)
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
    fisher_start = time.perf_counter()
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
    print(
        f"{plan.label} task {task + 1}/{plan.num_tasks} {plan.task_names[task]}: "
        f"{'mean ' if row.ndim > 1 else ''}{plan.metric.replace('_', ' ')} "
        f"{' '.join(f'{a:.3f}' for a in shown)} "
        f"({progress.steps_done} steps, {end - start:.1f} s)",
        flush=True,
    )
    progress.task, progress.steps_done, progress.task_elapsed_s = task + 1, 0, 0.0
    return RunState(arrays, progress)


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


def run_with_checkpoints(
    plan: Plan, fns: StepFns, data: DeviceScenario, checkpoints: checkpoint.RunCheckpoints | None
) -> Progress:
    """Resumes ``plan`` from its latest checkpoint (or starts it) and runs it to the end.

    Args:
        plan: the run.
        fns: its steps.
        data: the scenario on device.
        checkpoints: where this run checkpoints; None: no checkpoints.

    Returns:
        The finished run's progress (its results).

    Raises:
        checkpoint.CheckpointError: the latest checkpoint is corrupt or of another model.
    """
    state = start(plan, fns)
    if checkpoints is None:
        return run(state, plan, fns, data).progress
    restored = checkpoints.restore(_storable(state.arrays))
    if restored is not None:
        arrays, progress = restored
        state = RunState(_from_storable(arrays), Progress(**progress))
        if state.progress.task == plan.num_tasks:
            print(f"{plan.label} finished earlier: results from {checkpoints.latest()}", flush=True)
            return state.progress

    def save(state: RunState) -> None:
        progress = dataclasses.asdict(state.progress)
        path = checkpoints.save(_storable(state.arrays), progress)
        position = state.progress
        where = (
            "finished"
            if position.task == plan.num_tasks
            else f"task {position.task + 1}, step {position.steps_done}"
        )
        print(f"{plan.label} checkpoint {path} ({where})", flush=True)

    # The resume line is printed inside the safe points, so that a signal sent on reading it stops
    # at the next epoch end with a checkpoint rather than at once (as one before the loop does).
    with _safe_points():
        if restored is not None:
            position = state.progress
            print(
                f"{plan.label} resuming task {position.task + 1}/{plan.num_tasks} at step "
                f"{position.steps_done} from {checkpoints.latest()}",
                flush=True,
            )
        return run(state, plan, fns, data, save).progress


def _storable(arrays: steps.TrainState) -> steps.TrainState:
    """The arrays as Orbax stores them: the PRNG key as its raw ``key_data``."""
    return arrays._replace(key=jax.random.key_data(arrays.key))


def _from_storable(arrays: steps.TrainState) -> steps.TrainState:
    return arrays._replace(key=jax.random.wrap_key_data(arrays.key))
