"""Seed x strength sweeps: the single-run steps and loop under ``jax.vmap`` over a run axis.

``--config.sweep.seeds=S`` and/or ``--config.sweep.strengths=100,1000,10000`` turn a run into a
sweep: for every method of the config, its S x K runs (one per seed and strength; unregularised
methods have one strength, 0) train side by side. The loop is :func:`experiments.loop.run`, the
same as for a single run; only its steps differ (:func:`sweep_fns`): they are the functions of
:mod:`experiments.steps` under ``jax.vmap`` over a leading *run* axis of the state:

* params, optimiser state, EWC state, PRNG key and strength carry the run axis; each run's
  parameters are initialised from its seed's key, exactly as a single run's are;
* the strength is a traced ``[R]`` array, so one compiled program serves every strength;
* the Fisher is ``jax.vmap`` over :func:`ewc_jax.fisher_diagonal`, on each run's own examples,
  chosen by a NumPy generator per seed as in a single run;
* the task data is shared (``in_axes=None``): every run sees the scenario built from the first
  seed (permutations, subsets), and the seed varies the initial parameters, the shuffling and
  the Fisher's examples.

Run ``r`` therefore equals the single run with the same seed and strength on that scenario, to
float rounding (``tests/test_sweep.py`` checks it). With ``data_parallel`` and several devices,
the run axis is split over the mesh (padded with copies of the last run up to a multiple of the
device count; the copies are dropped), while the data is replicated.

A sweep checkpoints and resumes like a single run (one checkpoint directory per method,
``checkpoints/sweep-<method>/``). The workdir gets ``results.json`` (every run's accuracy matrix
and metrics, and per method and strength the mean and standard deviation over seeds),
``sweep_summary.csv``, ``sweep_runs.csv`` and ``strength_sensitivity.png``. Learning curves are
not recorded in a sweep.

    python -m experiments.main --config experiments/configs/permuted_mnist.py:small \\
        --workdir runs/sweep --config.methods=finetune --config.methods=ewc \\
        --config.sweep.seeds=5 --config.sweep.strengths=10,100,1000,10000
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import checkpoint, loop, metrics, plots, results, scenarios, steps, workdir
from experiments.config import (
    MethodSpec,
    check_task_sizes,
    fisher_samples_used,
    method_specs,
    run_seeds,
    sweep_strengths,
)
from experiments.data import Dataset
from experiments.device_data import DeviceScenario, data_mesh, data_sharding, put_for_methods

SWEEP_METRICS = ("average_accuracy", "backward_transfer", "average_forgetting")
"""The summarised metrics of an accuracy sweep (:func:`sweep_metrics` for any metric)."""


def sweep_metrics(metric: str = "accuracy") -> tuple[str, str, str]:
    """The summarised metrics for the scenario's ``metric``: its average, BWT, forgetting."""
    return (metrics.METRICS[metric].average, *SWEEP_METRICS[1:])


@dataclasses.dataclass
class SweepResult:
    """The runs of one method in a sweep.

    Attributes:
        method: the method's name.
        seeds: seed of each run.
        strengths: strength of each run.
        accuracy_matrices: ``[R, T, T]``, ``R[r, i, j]`` as in
            :attr:`experiments.results.RunRecord.accuracy_matrix`.
        diverged: per run, whether its training loss became non-finite.
        wall_time_s: seconds for all runs of the method together.
    """

    method: str
    seeds: list[int]
    strengths: list[float]
    accuracy_matrices: np.ndarray
    diverged: list[bool]
    wall_time_s: float


def sweep_fns(
    setup: steps.StepSetup,
    method: MethodSpec,
    seeds: Sequence[int],
    strengths: Sequence[float],
    num_runs: int,
    data: DeviceScenario,
    mesh: jax.sharding.Mesh | None,
) -> loop.StepFns:
    """The :class:`experiments.loop.StepFns` of runs ``(seeds[r], strengths[r])``, vmapped.

    With a mesh the run axis is split over the devices; runs past ``num_runs`` only pad it to a
    multiple of the device count, and :attr:`~experiments.loop.StepFns.unpad` drops them.
    """

    setup = steps.method_setup(setup, method)

    def place(tree: Any) -> Any:
        return tree if mesh is None else jax.device_put(tree, data_sharding(mesh))

    def init() -> steps.TrainState:
        keys = place(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)))
        strength = place(jnp.asarray(strengths, jnp.float32))
        return place(steps.sweep_init(keys, data.test[0].images[:1], strength, setup=setup))

    return loop.StepFns(
        init=init,
        train_epoch=functools.partial(steps.sweep_train_epoch, setup=setup),
        evaluate=lambda params, task_data: np.asarray(
            steps.sweep_evaluate(params, task_data, setup=setup), np.float64
        ),
        consolidate=functools.partial(steps.sweep_consolidate, setup=setup, method=method),
        reset_optimizer=functools.partial(steps.sweep_reset_optimizer, setup=setup),
        select=lambda chosen: place(jnp.asarray(np.stack(chosen))),
        unpad=lambda values: values[:num_runs],
    )


def run_sweep_method(
    config: ml_collections.ConfigDict,
    setup: steps.StepSetup,
    data: DeviceScenario,
    spec: MethodSpec,
    seeds: Sequence[int],
    checkpoints: checkpoint.RunCheckpoints | None = None,
) -> SweepResult:
    """Trains every (seed, strength) pair of one method side by side, through the one loop.

    Runs are seed-major: run ``r`` is ``seeds[r // K]`` with ``strengths[r % K]``.

    Args:
        config: the experiment config.
        setup: model and optimiser, without a mesh (a sweep splits runs, not examples).
        data: the scenario on device.
        spec: the method (its ``strength`` is replaced by the sweep's strengths).
        seeds: the seeds.
        checkpoints: where this method's sweep checkpoints; None: no checkpoints.

    Returns:
        The :class:`SweepResult`.
    """
    strengths = sweep_strengths(config, spec)
    run_seeds = [s for s in seeds for _ in strengths]
    run_strengths = [float(v) for _ in seeds for v in strengths]
    mesh = data_mesh(config)
    # Copies of the last run pad the run axis to a multiple of the device count.
    padding = 0 if mesh is None else -len(run_seeds) % mesh.devices.size
    padded_seeds = (*run_seeds, *run_seeds[-1:] * padding)
    padded_strengths = (*run_strengths, *run_strengths[-1:] * padding)
    fns = sweep_fns(setup, spec, padded_seeds, padded_strengths, len(run_seeds), data, mesh)
    plan = loop.make_plan(
        config, data, spec, padded_seeds, label=f"[sweep {spec.name}]", sweep=True
    )
    progress = loop.run_with_checkpoints(plan, fns, data, checkpoints)
    return SweepResult(
        method=spec.name,
        seeds=run_seeds,
        strengths=run_strengths,
        accuracy_matrices=np.asarray(progress.accuracy_rows, np.float64).transpose(1, 0, 2),
        diverged=progress.diverged,
        wall_time_s=sum(progress.task_wall_time_s),
    )


def summarize_sweep(
    outcomes: Sequence[SweepResult], metric: str = "accuracy"
) -> dict[str, list[dict[str, Any]]]:
    """Per method and strength, mean and standard deviation (ddof=1; 0 for one seed) over seeds.

    ``metric`` is the scenario's (:data:`experiments.metrics.METRICS`); for bits per character
    ``average_accuracy`` below is ``average_bits_per_character``.

    Returns:
        ``{method: [{"strength", "num_seeds", "diverged", <metric>: {"mean", "std", "values"},
        "final_accuracy": {"mean", "std"}, "accuracy_matrix_mean"}, ...]}``, strengths in
        ascending order.
    """

    summary: dict[str, list[dict[str, Any]]] = {}
    for result in outcomes:
        strengths = np.asarray(result.strengths)
        rows = []
        for value in sorted(set(result.strengths)):
            chosen = np.flatnonzero(strengths == value)
            matrices = result.accuracy_matrices[chosen]
            per_run = [metrics.summarize(m, metric) for m in matrices]
            entry: dict[str, Any] = {
                "strength": value,
                "num_seeds": len(chosen),
                "diverged": int(sum(result.diverged[r] for r in chosen)),
            }
            for name in sweep_metrics(metric):
                entry[name] = results.stats([m[name] for m in per_run])
            entry["final_accuracy"] = results.final_accuracy(matrices)
            entry["accuracy_matrix_mean"] = matrices.mean(axis=0).tolist()
            rows.append(entry)
        summary[result.method] = rows
    return summary


def format_sweep_summary(summary: dict[str, list[dict[str, Any]]], metric: str = "accuracy") -> str:
    """The end-of-sweep table: one row per method and strength, mean ± std over seeds."""
    average = "avg acc" if metric == "accuracy" else "avg bpc"
    header = ["method", "strength", "seeds", average, "BWT", "forgetting", "diverged"]
    rows = []
    for method, entries in summary.items():
        for entry in entries:
            rows.append(
                [
                    method,
                    f"{entry['strength']:g}",
                    str(entry["num_seeds"]),
                    *(
                        f"{entry[m]['mean']:.3f} ± {entry[m]['std']:.3f}"
                        for m in sweep_metrics(metric)
                    ),
                    str(entry["diverged"]),
                ]
            )
    return results.table(header, rows)


def _run_entries(outcomes: Sequence[SweepResult], metric: str) -> list[dict[str, Any]]:
    """One ``results.json`` entry per run: method, seed, strength, matrix, metrics, diverged."""
    return [
        {
            "method": outcome.method,
            "seed": seed,
            "strength": strength,
            "accuracy_matrix": matrix.tolist(),
            "metrics": metrics.summarize(matrix, metric),
            "diverged": diverged,
        }
        for outcome in outcomes
        for seed, strength, matrix, diverged in zip(
            outcome.seeds,
            outcome.strengths,
            outcome.accuracy_matrices,
            outcome.diverged,
            strict=True,
        )
    ]


def _summary_csv(summary: dict[str, list[dict[str, Any]]], metric: str) -> str:
    names = sweep_metrics(metric)
    stat_columns = [f"{m}_{s}" for m in names for s in ("mean", "std")]
    rows = [
        [
            method,
            f"{entry['strength']:g}",
            entry["num_seeds"],
            *(f"{entry[m][s]:.6f}" for m in names for s in ("mean", "std")),
            entry["diverged"],
        ]
        for method, entries in summary.items()
        for entry in entries
    ]
    return results.csv_text(["method", "strength", "num_seeds", *stat_columns, "diverged"], rows)


def _runs_csv(runs: list[dict[str, Any]], task_names: list[str], metric: str) -> str:
    names = sweep_metrics(metric)
    short = "acc" if metric == "accuracy" else "bpc"
    finals = [f"final_{short}_{n}" for n in task_names]
    rows = [
        [
            run["method"],
            run["seed"],
            f"{run['strength']:g}",
            *(f"{run['metrics'][m]:.6f}" for m in names),
            *(f"{a:.6f}" for a in run["accuracy_matrix"][-1]),
            run["diverged"],
        ]
        for run in runs
    ]
    header = ["method", "seed", "strength", *names, *finals, "diverged"]
    return results.csv_text(header, rows)


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir_path: str | os.PathLike[str],
    datasets: dict[str, Dataset],
    checkpoints_dir: Path,
    fingerprint: str,
) -> dict[str, Any]:
    """Runs the sweep of every method on the scenario of the first seed; writes its results.

    Called by :func:`experiments.train.train_and_evaluate` once the config is validated, the
    workdir prepared and the data loaded.

    Args:
        config: a validated config that asks for a sweep.
        workdir_path: the prepared workdir.
        datasets: the loaded datasets, keyed by spec.
        checkpoints_dir: ``<workdir>/checkpoints``.
        fingerprint: the config's fingerprint, stored in (and checked against) checkpoints.

    Returns:
        The content of ``results.json``.
    """
    specs = method_specs(config)
    seeds = run_seeds(config)
    started = time.perf_counter()
    scenario = scenarios.build_scenario(config, datasets, seeds[0])
    scenarios.check_scenario(scenario)
    sizes = [(task.name, len(task.train_labels)) for task in scenario.tasks]
    check_task_sizes(config, sizes)
    setup = steps.build_setup(config, scenario)
    data = put_for_methods(scenario, config.methods, data_mesh(config))
    outcomes = [
        run_sweep_method(
            config,
            setup,
            data,
            spec,
            seeds,
            checkpoint.RunCheckpoints(checkpoints_dir / f"sweep-{spec.name}", fingerprint),
        )
        for spec in specs
    ]
    metric = scenario.metric
    summary = summarize_sweep(outcomes, metric)
    runs = _run_entries(outcomes, metric)
    figure = plots.plot_strength_sensitivity(
        summary, Path(workdir_path) / "strength_sensitivity.png", metric
    )
    output = results.results_document(
        config,
        scenario,
        seeds,
        runs,
        summary,
        [figure],
        started,
        sweep=True,
        scenario_seed=seeds[0],
        strengths={o.method: sorted(set(o.strengths)) for o in outcomes},
        method_wall_time_s={o.method: o.wall_time_s for o in outcomes},
        fisher_samples_used=fisher_samples_used(config, sizes),
    )
    files = {
        "sweep_summary.csv": _summary_csv(summary, metric),
        "sweep_runs.csv": _runs_csv(runs, scenario.task_names, metric),
    }
    results_path = workdir.finish(workdir_path, files, output)
    print(format_sweep_summary(summary, metric))
    if any(any(o.diverged) for o in outcomes):
        print("warning: some runs diverged (non-finite loss); see the 'diverged' column")
    print(f"tasks: {', '.join(scenario.task_names)}")
    print(f"figure: {results_path.parent / figure.name}")
    print(f"results: {results_path}")
    return output
