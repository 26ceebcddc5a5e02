"""One experiment from config to results: :func:`train_and_evaluate`, which the CLI calls.

Single runs and sweeps take one path. The config is read once into a
:class:`experiments.config.RunSpec` and the workdir locked and prepared
(:mod:`experiments.storage.workdir`) before anything is loaded; then the datasets are loaded and
the experiment's *jobs* run: one job per method and seed for single runs (each seed builds its
own scenario), one per method for a sweep (its seeds x strengths side by side on the first
seed's scenario, :mod:`experiments.training.runners`). Every job builds its scenario, checks it,
places it on device and runs the one loop with checkpoints (:mod:`experiments.runs.resume`);
the finished jobs become the results (:mod:`experiments.runs.report`), which
:func:`experiments.storage.workdir.finish` writes, ``results.json`` last.

A sweep (``--config.sweep.seeds=S`` and/or ``--config.sweep.strengths=...``): the task data is
shared by its runs, so every run sees the scenario built from the first seed (permutations,
subsets), and the seed varies the initial parameters, the shuffling and the Fisher's examples.
With ``data_parallel`` and several devices the run axis is split over the mesh (padded with
copies of the last run up to a multiple of the device count; the copies are dropped).

    python -m experiments.main --config experiments/configs/permuted_mnist.py:small \\
        --workdir runs/sweep --config.methods=finetune --config.methods=ewc \\
        --config.sweep.seeds=5 --config.sweep.strengths=10,100,1000,10000
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from experiments import data, scenarios
from experiments.config import RunSpec, read_spec
from experiments.runs import first_task, report
from experiments.runs.jobs import Job, jobs
from experiments.runs.resume import run_with_checkpoints
from experiments.spec import ConfigError
from experiments.storage import checkpoint, workdir
from experiments.storage.first_task import FirstTaskParams
from experiments.training import loop, runners, steps
from experiments.training.device import DeviceScenario, data_mesh, put_for_methods


@dataclasses.dataclass
class Stage:
    """A scenario built and checked, its data on device, and the steps' shared setup."""

    scenario: scenarios.Scenario
    data: DeviceScenario
    setup: steps.StepSetup


def task_sizes(scenario: scenarios.Scenario) -> list[tuple[str, int]]:
    """Each task's name and number of training examples."""
    return [(task.name, len(task.train_labels)) for task in scenario.tasks]


def check_task_sizes(batch_size: int, sizes: list[tuple[str, int]]) -> None:
    """Refuses a ``batch_size`` larger than the smallest task's training set (a mini-batch
    larger than a task would be mostly padding); called before any training."""
    name, smallest = min(sizes, key=lambda item: item[1])
    if batch_size > smallest:
        raise ConfigError(
            f"batch_size {batch_size} is larger than task {name!r}, which has "
            f"{smallest} training examples; set batch_size <= {smallest}"
        )


def build_stage(
    spec: RunSpec, datasets: dict[str, data.Dataset], seed: int, setup: steps.StepSetup | None
) -> Stage:
    """The scenario of ``seed``, checked and on device; ``setup`` is built for the first.

    A sweep splits its runs over the mesh, not its examples: its setup has no mesh.
    """
    scenario = scenarios.build_scenario(spec.data, datasets, seed)
    scenarios.check_scenario(scenario)
    check_task_sizes(spec.schedule.batch_size, task_sizes(scenario))
    mesh = data_mesh(spec.mesh)
    if setup is None:
        setup = steps.build_setup(
            spec.model,
            spec.optimizer,
            spec.schedule,
            scenario,
            mesh=None if spec.sweep.requested else mesh,
            param_sharding=spec.mesh.param_sharding,
        )
    return Stage(scenario, put_for_methods(scenario, spec.methods, mesh), setup)


def run_job(
    spec: RunSpec, job: Job, stage: Stage, checkpoints: checkpoint.RunCheckpoints | None
) -> loop.Progress:
    """Runs ``job`` on ``stage`` through the one loop, resuming from its checkpoints."""
    if job.vmapped:
        mesh = data_mesh(spec.mesh)
        # Copies of the last run pad the run axis to a multiple of the device count.
        padding = 0 if mesh is None else -len(job.seeds) % mesh.devices.size
        seeds = (*job.seeds, *job.seeds[-1:] * padding)
        strengths = (*job.strengths, *job.strengths[-1:] * padding)
        fns = runners.sweep_fns(
            stage.setup, job.method, seeds, strengths, len(job.seeds), stage.data, mesh
        )
    else:
        seeds = job.seeds
        fns = runners.single_run_fns(stage.setup, job.method, job.seeds[0], stage.data)
    plan = loop.make_plan(
        spec.schedule,
        spec.optimizer,
        stage.data,
        job.method,
        seeds,
        label=job.label,
        sweep=job.vmapped,
    )
    shared = shared_first_task(spec, job, plan, stage, seeds)
    return run_with_checkpoints(plan, fns, stage.data, checkpoints, shared)


def shared_first_task(
    spec: RunSpec, job: Job, plan: loop.Plan, stage: Stage, seeds: tuple[int, ...]
) -> first_task.SharedFirstTask | None:
    """The stores of task 1 shared by runs (``spec.first_task_params``), or None: none asked
    for, or a method that trains task 1 its own way (it says so)."""
    if not spec.first_task_params:
        return None
    if not job.method.method.shares_first_task:
        print(
            f"{job.label} trains task 1 itself: its first task is not plain training "
            "(first_task_params unused)",
            flush=True,
        )
        return None
    train = stage.data.training_sets(job.method)[0]
    stores = {
        seed: FirstTaskParams(
            spec.first_task_params, seed, first_task.identity(spec, plan, train, seed)
        )
        for seed in dict.fromkeys(seeds)
    }
    return first_task.SharedFirstTask(
        stores, seeds, vmapped=job.vmapped, curves=plan.eval_every is not None, label=job.label
    )


def run_jobs(
    spec: RunSpec,
    datasets: dict[str, data.Dataset],
    checkpoints_dir: Path | None = None,
    fingerprint: str = "",
) -> tuple[Stage, list[tuple[Job, loop.Progress]]]:
    """Runs every job of ``spec``; jobs of one scenario seed share one stage, and all jobs one
    compiled set of steps.

    Returns:
        The last stage and every job with its finished progress, in order.
    """
    stage, stage_seed, setup, done = None, None, None, []
    for job in jobs(spec):
        if job.scenario_seed != stage_seed:
            stage = build_stage(spec, datasets, job.scenario_seed, setup)
            stage_seed, setup = job.scenario_seed, stage.setup
        checkpoints = None
        if checkpoints_dir is not None:
            checkpoints = checkpoint.RunCheckpoints(
                checkpoints_dir / job.checkpoint_name, fingerprint
            )
        done.append((job, run_job(spec, job, stage, checkpoints)))
    assert stage is not None
    return stage, done


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    load_dataset: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Runs every method and seed of ``config`` (or its sweep) and writes the results.

    The config is read and checked, and the workdir locked and checked, before any data is
    loaded; ``batch_size`` is checked against the smallest task once the tasks are built, before
    any training. ``results.json`` is written last, atomically, so its presence means the run
    finished; with ``overwrite`` the old results stay until the new ones replace them. Resume is
    the default (see :func:`experiments.storage.workdir.prepare`); the checkpoints are deleted
    once ``results.json`` is written.

    Args:
        config: an experiment config (see ``experiments/configs``).
        workdir_path: output directory; created if missing.
        overwrite: replace finished results (or another run's checkpoints) in the workdir.
        load_dataset: ``load_dataset(spec, data_dir=...)``; default
            :func:`experiments.data.load_dataset`.

    Returns:
        The content of ``results.json``.

    Raises:
        experiments.spec.ConfigError: the config cannot run.
        experiments.storage.workdir.WorkdirExistsError: the workdir holds finished results, or
            the config of another run, and ``overwrite`` is False.
        experiments.storage.workdir.WorkdirBusyError: another run holds the workdir.
        experiments.storage.workdir.WorkdirUnusableError: the workdir is a file or not writable.
        experiments.storage.checkpoint.CheckpointError: a checkpoint in the workdir is corrupt
            or of another config.
    """
    spec = read_spec(config)
    if not os.fspath(workdir_path):
        raise workdir.WorkdirUnusableError(
            "--workdir is empty; give a directory for the results (e.g. --workdir runs/demo)"
        )
    with workdir.locked(workdir_path):
        fingerprint, run_dir = workdir.prepare(spec.resolved, workdir_path, overwrite=overwrite)
        started = time.perf_counter()
        datasets = data.load_datasets(
            spec.data.datasets, data_dir=spec.data.data_dir, load=load_dataset
        )
        stage, done = run_jobs(spec, datasets, checkpoint.checkpoints_root(run_dir), fingerprint)
        # Per task, the examples its importance averaged over: fisher_samples, or the whole
        # training set of a task that has fewer.
        fisher_used = [
            min(spec.methods[0].fisher_samples, size) for _, size in task_sizes(stage.scenario)
        ]
        return report.write(spec, stage.scenario, done, run_dir, started, fisher_used)
