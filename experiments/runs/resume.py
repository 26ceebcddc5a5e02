"""Resume: a run starts from its latest complete checkpoint (or afresh) and saves as it goes.

:func:`run_with_checkpoints` joins the loop (:mod:`experiments.training.loop`) and the
checkpoints (:mod:`experiments.storage.checkpoint`): it restores the :class:`RunState` saved
last, prints where it resumes, and gives the loop a ``save`` that writes one.
"""

from __future__ import annotations

import dataclasses

import jax

from experiments.storage import checkpoint
from experiments.training import loop
from experiments.training.device import DeviceScenario
from experiments.training.signals import safe_points
from experiments.training.steps import TrainState


def run_with_checkpoints(
    plan: loop.Plan,
    fns: loop.StepFns,
    data: DeviceScenario,
    checkpoints: checkpoint.RunCheckpoints | None,
    first_task: loop.FirstTask | None = None,
) -> loop.Progress:
    """Resumes ``plan`` from its latest checkpoint (or starts it) and runs it to the end.

    Args:
        plan: the run.
        fns: its steps.
        data: the scenario on device.
        checkpoints: where this run checkpoints; None: no checkpoints.
        first_task: task 1 shared with other runs (:func:`experiments.training.loop.run`).

    Returns:
        The finished run's progress (its results).

    Raises:
        checkpoint.CheckpointError: the latest checkpoint is corrupt or of another model.
    """
    state = loop.start(plan, fns)
    if checkpoints is None:
        return loop.run(state, plan, fns, data, first_task=first_task).progress
    restored = checkpoints.restore(storable(state.arrays))
    if restored is not None:
        arrays, progress = restored
        state = loop.RunState(from_storable(arrays), loop.Progress(**progress))
        if state.progress.task == plan.num_tasks:
            print(f"{plan.label} finished earlier: results from {checkpoints.latest()}", flush=True)
            return state.progress

    def save(state: loop.RunState) -> None:
        progress = dataclasses.asdict(state.progress)
        path = checkpoints.save(storable(state.arrays), progress)
        position = state.progress
        where = (
            "finished"
            if position.task == plan.num_tasks
            else f"task {position.task + 1}, step {position.steps_done}"
        )
        print(f"{plan.label} checkpoint {path} ({where})", flush=True)

    # The resume line is printed inside the safe points, so that a signal sent on reading it stops
    # at the next epoch end with a checkpoint rather than at once (as one before the loop does).
    with safe_points():
        if restored is not None:
            position = state.progress
            print(
                f"{plan.label} resuming task {position.task + 1}/{plan.num_tasks} at step "
                f"{position.steps_done} from {checkpoints.latest()}",
                flush=True,
            )
        return loop.run(state, plan, fns, data, save, first_task).progress


def storable(arrays: TrainState) -> TrainState:
    """The arrays as Orbax stores them: the PRNG key as its raw ``key_data``."""
    return arrays._replace(key=jax.random.key_data(arrays.key))


def from_storable(arrays: TrainState) -> TrainState:
    return arrays._replace(key=jax.random.wrap_key_data(arrays.key))
