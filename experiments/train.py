"""One experiment from config to results: :func:`train_and_evaluate`, which the CLI calls.

Data flows one way: the config (:mod:`experiments.config`) is validated and the workdir
prepared (:mod:`experiments.workdir`) before anything is loaded; then the datasets
(:mod:`experiments.data`), the task stream of each seed (:mod:`experiments.scenarios`), its
arrays on device (:mod:`experiments.device_data`), the loop over every method
(:mod:`experiments.loop`), and last the records, summaries, figures and ``results.json``
(:mod:`experiments.results`, :mod:`experiments.plots`). A sweep (:mod:`experiments.sweep`)
takes the same path with a run axis.

Each method and seed checkpoints after every task (and every ``checkpoint_every_steps`` steps,
at epoch ends), and a rerun in the same workdir resumes by default (:mod:`experiments.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from experiments import checkpoint, data, loop, plots, results, scenarios, steps, sweep, workdir
from experiments import config as config_lib
from experiments.device_data import data_mesh, put_for_methods


def run_all(
    config: ml_collections.ConfigDict,
    datasets: dict[str, data.Dataset],
    *,
    checkpoints_dir: Path | None = None,
    fingerprint: str = "",
) -> tuple[scenarios.Scenario, list[results.RunRecord]]:
    """Trains every method on every seed's scenario; all share one compiled set of steps.

    Args:
        config: a validated config.
        datasets: the loaded datasets, keyed by spec.
        checkpoints_dir: ``<workdir>/checkpoints``; None: no checkpoints.
        fingerprint: the config's fingerprint, stored in (and checked against) checkpoints.

    Returns:
        The scenario of the last seed and one record per method and seed, seed-major.
    """
    specs = config_lib.method_specs(config)
    mesh = data_mesh(config)
    setup, records = None, []
    for seed in config_lib.run_seeds(config):
        scenario = scenarios.build_scenario(config, datasets, seed)
        scenarios.check_scenario(scenario)
        config_lib.check_task_sizes(config, task_sizes(scenario))
        setup = setup or steps.build_setup(config, scenario, mesh=mesh)
        device_data = put_for_methods(scenario, config.methods, mesh)
        for spec in specs:
            plan = loop.make_plan(
                config, device_data, spec, (seed,), label=f"[{spec.name} seed {seed}]"
            )
            fns = loop.single_run_fns(setup, spec, seed, device_data)
            checkpoints = None
            if checkpoints_dir is not None:
                checkpoints = checkpoint.RunCheckpoints(
                    checkpoints_dir / f"{spec.name}-seed{seed}", fingerprint
                )
            progress = loop.run_with_checkpoints(plan, fns, device_data, checkpoints)
            records.append(
                results.RunRecord.from_progress(spec.name, seed, progress, scenario.metric)
            )
    return scenario, records


def task_sizes(scenario: scenarios.Scenario) -> list[tuple[str, int]]:
    """Each task's name and number of training examples."""
    return [(task.name, len(task.train_labels)) for task in scenario.tasks]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    load_dataset: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Runs every method and seed of ``config`` (or its sweep) and writes the results.

    The config is validated and the workdir locked and checked before any data is loaded;
    ``batch_size`` is checked against the smallest task once the tasks are built, before any
    training. ``results.json`` is written last, atomically, so its presence means the run
    finished; with ``overwrite`` the old results stay until the new ones replace them. Resume is
    the default (see :func:`experiments.workdir.prepare`); the checkpoints are deleted once
    ``results.json`` is written.

    Args:
        config: an experiment config (see ``experiments/configs``).
        workdir_path: output directory; created if missing.
        overwrite: replace finished results (or another run's checkpoints) in the workdir.
        load_dataset: ``load_dataset(spec, data_dir=...)``; default
            :func:`experiments.data.load_dataset`.

    Returns:
        The content of ``results.json``.

    Raises:
        experiments.config.ConfigError: the config cannot run.
        experiments.workdir.WorkdirExistsError: the workdir holds finished results, or the
            config of another run, and ``overwrite`` is False.
        experiments.workdir.WorkdirBusyError: another run holds the workdir.
        experiments.workdir.WorkdirUnusableError: the workdir is a file or not writable.
        experiments.checkpoint.CheckpointError: a checkpoint in the workdir is corrupt or of
            another config.
    """
    config_lib.validate(config)
    with workdir.locked(workdir_path):
        fingerprint, run_dir = workdir.prepare(config, workdir_path, overwrite=overwrite)
        return _train_in(config, run_dir, fingerprint, load_dataset)


def _train_in(
    config: ml_collections.ConfigDict,
    run_dir: Path,
    fingerprint: str,
    load_dataset: Callable[..., Any] | None,
) -> dict[str, Any]:
    """Loads the data, trains and writes the results in the prepared ``run_dir``."""
    started = time.perf_counter()
    datasets = data.load_datasets(config.datasets, data_dir=config.data_dir, load=load_dataset)
    checkpoints_dir = checkpoint.checkpoints_root(run_dir)
    if config_lib.sweep_requested(config):
        return sweep.run_sweep(config, run_dir, datasets, checkpoints_dir, fingerprint)
    scenario, runs = run_all(
        config, datasets, checkpoints_dir=checkpoints_dir, fingerprint=fingerprint
    )
    summary = results.summarize_runs(runs)
    figures = plots.write_figures(
        runs, summary, scenario.task_names, run_dir, metric=scenario.metric
    )
    output = results.results_document(
        config,
        scenario,
        config_lib.run_seeds(config),
        [dataclasses.asdict(run) for run in runs],
        summary,
        figures,
        started,
        fisher_samples_used=config_lib.fisher_samples_used(config, task_sizes(scenario)),
    )
    files = {"metrics.csv": results.metrics_csv(runs, scenario.task_names)}
    results_path = workdir.finish(run_dir, files, output)
    print(results.format_summary(summary, scenario.task_names, scenario.metric))
    for path in figures:
        print(f"figure: {results_path.parent / path.name}")
    print(f"results: {results_path}")
    return output
