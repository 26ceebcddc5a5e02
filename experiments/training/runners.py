"""The steps the loop calls (:class:`experiments.training.loop.StepFns`) for one run, and for a
sweep's runs side by side: the same functions under ``jax.vmap`` over a leading run axis.

A sweep's params, optimiser state, EWC state, PRNG key and strength carry the run axis; each
run's parameters are initialised from its seed's key, exactly as a single run's are; the
strength is a traced ``[R]`` array, so one compiled program serves every strength; the
importance is ``jax.vmap`` over the single run's, on each run's own examples; the task data is
shared (``in_axes=None``). Run ``r`` therefore equals the single run with the same seed and
strength on that scenario, to float rounding (``tests/test_sweep.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.training import consolidation, forecast, steps
from experiments.training.device import DeviceScenario, data_sharding
from experiments.training.loop import StepFns
from experiments.training.methods import MethodSpec


def single_run_fns(
    setup: steps.StepSetup, method: MethodSpec, seed: int, data: DeviceScenario
) -> StepFns:
    """The :class:`StepFns` of one run: the jitted steps as they are."""
    setup = steps.method_setup(setup, method)
    if method.method.laplace:  # keeps every task's solution and Fisher for the forecast
        setup = dataclasses.replace(setup, forecast_tasks=len(data.scenario.task_names))
    return StepFns(
        init=lambda: steps.init_state(
            jax.random.key(seed), data.test[0].images[:1], method.strength, setup=setup
        ),
        train_epoch=functools.partial(steps.train_epoch, setup=setup),
        evaluate=lambda params, task_data: np.float64(
            float(steps.evaluate(params, task_data, setup=setup))
        ),
        consolidate=functools.partial(consolidation.consolidate_task, setup=setup, method=method),
        reset_optimizer=functools.partial(steps.reset_optimizer, setup=setup),
        select=lambda chosen: chosen[0],
        unpad=lambda values: values,
        choose_strength=functools.partial(
            consolidation.choose_strength_jit, setup=setup, method=method
        ),
        mean_loss=functools.partial(forecast.mean_loss, setup=setup),
    )


def sweep_fns(
    setup: steps.StepSetup,
    method: MethodSpec,
    seeds: Sequence[int],
    strengths: Sequence[float],
    num_runs: int,
    data: DeviceScenario,
    mesh: jax.sharding.Mesh | None,
) -> StepFns:
    """The :class:`experiments.training.loop.StepFns` of runs ``(seeds[r], strengths[r])``, vmapped.

    With a mesh the run axis is split over the devices; runs past ``num_runs`` only pad it to a
    multiple of the device count, and :attr:`~experiments.training.loop.StepFns.unpad` drops them.
    """

    setup = steps.method_setup(setup, method)

    def place(tree: Any) -> Any:
        return tree if mesh is None else jax.device_put(tree, data_sharding(mesh))

    def init() -> steps.TrainState:
        keys = place(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)))
        strength = place(jnp.asarray(strengths, jnp.float32))
        return place(consolidation.sweep_init(keys, data.test[0].images[:1], strength, setup=setup))

    return StepFns(
        init=init,
        train_epoch=functools.partial(consolidation.sweep_train_epoch, setup=setup),
        evaluate=lambda params, task_data: np.asarray(
            consolidation.sweep_evaluate(params, task_data, setup=setup), np.float64
        ),
        consolidate=functools.partial(consolidation.sweep_consolidate, setup=setup, method=method),
        reset_optimizer=functools.partial(consolidation.sweep_reset_optimizer, setup=setup),
        select=lambda chosen: place(jnp.asarray(np.stack(chosen))),
        unpad=lambda values: values[:num_runs],
    )
