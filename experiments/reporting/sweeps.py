"""A sweep's results: per method and strength the mean and standard deviation over seeds, its
table, and its CSV files (``sweep_summary.csv``, ``sweep_runs.csv``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.reporting import metrics, results

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
            :attr:`experiments.reporting.results.RunRecord.accuracy_matrix`.
        diverged: per run, whether its training loss became non-finite.
        wall_time_s: seconds for all runs of the method together.
    """

    method: str
    seeds: list[int]
    strengths: list[float]
    accuracy_matrices: np.ndarray
    diverged: list[bool]
    wall_time_s: float


def summarize_sweep(
    outcomes: Sequence[SweepResult], metric: str = "accuracy"
) -> dict[str, list[dict[str, Any]]]:
    """Per method and strength, mean and standard deviation (ddof=1; 0 for one seed) over seeds.

    ``metric`` is the scenario's (:data:`experiments.reporting.metrics.METRICS`); for bits per
    character
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


def run_entries(outcomes: Sequence[SweepResult], metric: str) -> list[dict[str, Any]]:
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


def summary_csv(summary: dict[str, list[dict[str, Any]]], metric: str) -> str:
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


def runs_csv(runs: list[dict[str, Any]], task_names: list[str], metric: str) -> str:
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
