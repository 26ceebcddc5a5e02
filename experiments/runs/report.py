"""The end of an experiment: its finished jobs become records, summaries, figures and files,
written by :func:`experiments.storage.workdir.finish` (``results.json`` last), and a table on
the terminal. Single runs report per method and seed (learning curves, ``metrics.csv``); a
sweep per method and strength over its seeds (``sweep_summary.csv``, ``sweep_runs.csv``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.config import RunSpec
from experiments.reporting import plots, results, sweeps
from experiments.runs.jobs import Job
from experiments.scenarios import Scenario
from experiments.storage import workdir
from experiments.training.loop import Progress


def write(
    spec: RunSpec,
    scenario: Scenario,
    done: Sequence[tuple[Job, Progress]],
    run_dir: Path,
    started: float,
    fisher_samples_used: list[int],
) -> dict[str, Any]:
    """Writes the results of the finished jobs into ``run_dir`` and prints their table.

    Args:
        spec: the experiment.
        scenario: the task stream (the last seed's; a sweep's only one).
        done: every job with its finished progress.
        run_dir: the prepared workdir (or its staging directory).
        started: ``time.perf_counter()`` when the experiment started.
        fisher_samples_used: per task, the examples its importance averaged over.

    Returns:
        The content of ``results.json``.
    """
    sweep = spec.sweep.requested
    body = _sweep(scenario, done, run_dir) if sweep else _single(scenario, done, run_dir)
    summary, runs, figures, files, extra, table = body
    output = results.results_document(
        spec.resolved,
        scenario,
        list(spec.seeds),
        runs,
        summary,
        figures,
        started,
        **extra,
        fisher_samples_used=fisher_samples_used,
    )
    results_path = workdir.finish(run_dir, files, output)
    print(table)
    for path in figures:
        print(f"figure: {results_path.parent / path.name}")
    print(f"results: {results_path}")
    return output


def _single(scenario: Scenario, done: Sequence[tuple[Job, Progress]], run_dir: Path) -> tuple:
    """Per method and seed: records, their summary, the figures and ``metrics.csv``."""
    records = [
        results.RunRecord.from_progress(job.method.name, job.seeds[0], progress, scenario.metric)
        for job, progress in done
    ]
    summary = results.summarize_runs(records)
    figures = plots.write_figures(
        records, summary, scenario.task_names, run_dir, metric=scenario.metric
    )
    files = {"metrics.csv": results.metrics_csv(records, scenario.task_names)}
    table = results.format_summary(summary, scenario.task_names, scenario.metric)
    runs = [dataclasses.asdict(record) for record in records]
    return summary, runs, figures, files, {}, table


def _sweep(scenario: Scenario, done: Sequence[tuple[Job, Progress]], run_dir: Path) -> tuple:
    """Per method and strength over the seeds: summary, runs, the sensitivity figure, CSVs."""
    metric = scenario.metric
    outcomes = [
        sweeps.SweepResult(
            method=job.method.name,
            seeds=list(job.seeds),
            strengths=list(job.strengths),
            accuracy_matrices=np.asarray(progress.accuracy_rows, np.float64).transpose(1, 0, 2),
            diverged=progress.diverged,
            wall_time_s=sum(progress.task_wall_time_s),
        )
        for job, progress in done
    ]
    summary = sweeps.summarize_sweep(outcomes, metric)
    runs = sweeps.run_entries(outcomes, metric)
    figure = plots.plot_strength_sensitivity(
        summary, Path(run_dir) / "strength_sensitivity.png", metric
    )
    extra = {
        "sweep": True,
        "scenario_seed": done[0][0].scenario_seed,
        "strengths": {o.method: sorted(set(o.strengths)) for o in outcomes},
        "method_wall_time_s": {o.method: o.wall_time_s for o in outcomes},
    }
    files = {
        "sweep_summary.csv": sweeps.summary_csv(summary, metric),
        "sweep_runs.csv": sweeps.runs_csv(runs, scenario.task_names, metric),
    }
    table = sweeps.format_sweep_summary(summary, metric)
    if any(any(o.diverged) for o in outcomes):
        table += "\nwarning: some runs diverged (non-finite loss); see the 'diverged' column"
    table += f"\ntasks: {', '.join(scenario.task_names)}"
    return summary, runs, [figure], files, extra, table
