"""What a finished run reports: its record, the summaries over seeds, tables, CSVs, environment.

:class:`RunRecord` is one method and seed's accuracy matrix, curves and timings (made from the
loop's :class:`experiments.training.loop.Progress`); :func:`summarize_runs` gives mean and standard
deviation over seeds; :func:`format_summary` the printed table; :func:`metrics_csv` the rows of
``metrics.csv``. :func:`stats`, :func:`final_accuracy`, :func:`table` and :func:`csv_text` are
shared with the sweep's summaries.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import ewc_jax
from experiments.reporting import metrics
from experiments.scenarios import Scenario
from experiments.training.loop import Progress

RESULTS_SCHEMA_VERSION = 1


@dataclasses.dataclass
class RunRecord:
    """What one method and seed produced.

    Attributes:
        method: the method's name.
        seed: the seed.
        accuracy_matrix: ``R[i][j]``, accuracy on task ``j`` after training task ``i`` (on a
            language sequence: test bits per character; ``results.json``'s ``metric`` says
            which).
        curves: one entry per evaluation during training: ``task`` being trained, ``epoch``
            within it, global ``step``, mean training ``loss`` of the epoch, and ``accuracy``
            on tasks ``0..task``.
        task_wall_time_s: seconds per task (training, evaluation and consolidation).
        fisher_wall_time_s: seconds per task spent estimating the Fisher and consolidating.
        steps_per_task: SGD steps taken on each task.
        metrics: :func:`experiments.reporting.metrics.summarize` of the matrix.
        strengths_per_task: with ``strengths.<method>=evidence``, the λ chosen at each task's
            end (None for the first task); else empty.
        strength_choices: every choice of λ by the evidence
            (:attr:`experiments.training.loop.Progress.strength_choices`).
        own_losses: per task, its mean loss ``[train, test]`` at its own end (methods with a
            Laplace precision; else empty).
        forecast: the forgetting forecast
            (:attr:`experiments.training.loop.Progress.forecast`): predicted and measured
            rises of each earlier task's mean loss after each task.
    """

    method: str
    seed: int
    accuracy_matrix: list[list[float]]
    curves: list[dict[str, Any]]
    task_wall_time_s: list[float]
    fisher_wall_time_s: list[float]
    steps_per_task: list[int]
    metrics: dict[str, float]
    strengths_per_task: list[float | None] = dataclasses.field(default_factory=list)
    strength_choices: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    own_losses: list[list[float]] = dataclasses.field(default_factory=list)
    forecast: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def from_progress(
        cls, method: str, seed: int, progress: Progress, metric: str = "accuracy"
    ) -> RunRecord:
        """The record of a finished run's :class:`experiments.training.loop.Progress` (``metric``:
        its
        scenario's, :data:`experiments.reporting.metrics.METRICS`)."""
        matrix = np.asarray(progress.accuracy_rows, np.float64)
        return cls(
            method=method,
            seed=seed,
            accuracy_matrix=matrix.tolist(),
            curves=progress.curves,
            task_wall_time_s=progress.task_wall_time_s,
            fisher_wall_time_s=progress.fisher_wall_time_s,
            steps_per_task=progress.steps_per_task,
            metrics=metrics.summarize(matrix, metric),
            strengths_per_task=list(progress.strengths_per_task),
            strength_choices=list(progress.strength_choices),
            own_losses=list(progress.own_losses),
            forecast=list(progress.forecast),
        )


def stats(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Mean, standard deviation (ddof=1; 0 for one value) and the values."""
    array = np.asarray(values, np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": array.tolist()}


def final_accuracy(matrices: np.ndarray) -> dict[str, list[float]]:
    """Mean and standard deviation over runs of the last row of ``[runs, T, T]`` matrices."""
    final = matrices[:, -1]
    std = final.std(axis=0, ddof=1) if len(final) > 1 else np.zeros(final.shape[1])
    return {"mean": final.mean(axis=0).tolist(), "std": std.tolist()}


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """CSV with ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def summarize_runs(runs: list[RunRecord]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation (ddof=1; 0 for one seed) over seeds, per method.

    Args:
        runs: records of every method and seed.

    Returns:
        ``{method: {metric: {"mean", "std", "values"}, "final_accuracy": {"mean", "std"},
        "accuracy_matrix_mean": [[...]], "num_seeds"}}``, and, for a strength chosen by the
        evidence, ``"strengths_per_task"``: per seed, the λ chosen at each task's end; with a
        forgetting forecast, ``"forgetting_forecast"`` (:func:`forecast_summary`).
    """
    by_method: dict[str, list[RunRecord]] = collections.defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)

    summary = {}
    for name, group in by_method.items():
        matrices = np.asarray([r.accuracy_matrix for r in group])
        entry: dict[str, Any] = {k: stats([r.metrics[k] for r in group]) for k in group[0].metrics}
        entry["wall_time_s"] = stats([sum(r.task_wall_time_s) for r in group])
        entry["final_accuracy"] = final_accuracy(matrices)
        entry["accuracy_matrix_mean"] = matrices.mean(axis=0).tolist()
        entry["num_seeds"] = len(group)
        if group[0].strengths_per_task:
            entry["strengths_per_task"] = [r.strengths_per_task for r in group]
        if group[0].forecast:
            entry["forgetting_forecast"] = forecast_summary(group)
        summary[name] = entry
    return summary


def forecast_summary(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """How well the quadratic ½ Δθᵀ F_k Δθ ranked the measured forgetting, over every pair
    (task ``k`` after task ``t``) of every seed: Spearman's ρ against the rise of the mean
    training loss and of the mean test loss (None for fewer than two pairs or a constant
    side), and the number of pairs."""
    pairs = [pair for run in runs for pair in run.forecast]
    predicted = [p["predicted"] for p in pairs]

    def rho(split: str) -> float | None:
        value = metrics.spearman(predicted, [p[f"measured_{split}"] for p in pairs])
        return None if np.isnan(value) else value  # JSON has no NaN

    return {"spearman_train": rho("train"), "spearman_test": rho("test"), "pairs": len(pairs)}


def results_document(
    config: dict[str, Any],
    scenario: Scenario,
    seeds: list[int],
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    figures: list[Path],
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    """The content of ``results.json``; ``extra`` holds a sweep's own fields.

    Args:
        config: the resolved experiment config (as JSON).
        scenario: the task stream (of the first seed for a sweep).
        seeds: the seeds.
        runs: one entry per run (method, seed[, strength], accuracy matrix, metrics, ...).
        summary: the summary over seeds.
        figures: the figures written.
        started: ``time.perf_counter()`` when the experiment started.
        **extra: further fields, placed after the summary.
    """
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "finished": True,
        "config": config,
        "scenario": scenario.name,
        "metric": scenario.metric,
        "higher_is_better": metrics.METRICS[scenario.metric].higher_is_better,
        "task_names": scenario.task_names,
        "methods": list(config["methods"]),
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        **extra,
        "figures": [path.name for path in figures],
        "environment": environment(),
        "wall_time_s": time.perf_counter() - started,
    }


def environment() -> dict[str, Any]:
    """Versions and device of this run."""
    import flax

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "ewc_jax": ewc_jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": device.platform,
        "device": getattr(device, "device_kind", str(device)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }


def metrics_csv(runs: list[RunRecord], task_names: list[str]) -> str:
    """``metrics.csv``: one row per method and seed, its metrics and final accuracies."""
    metric_names = list(runs[0].metrics)
    header = ["method", "seed", *metric_names, *(f"final_acc_{n}" for n in task_names)]
    rows = [
        [
            run.method,
            run.seed,
            *(f"{run.metrics[m]:.6f}" for m in metric_names),
            *(f"{a:.6f}" for a in run.accuracy_matrix[-1]),
            f"{sum(run.task_wall_time_s):.3f}",
        ]
        for run in runs
    ]
    return csv_text([*header, "wall_time_s"], rows)


def format_summary(
    summary: dict[str, dict[str, Any]], task_names: list[str], metric: str = "accuracy"
) -> str:
    """The end-of-run table: one row per method, mean ± std over seeds.

    Args:
        summary: from :func:`summarize_runs`.
        task_names: names of the tasks (for the final per-task accuracies).
        metric: the scenario's metric (:data:`experiments.reporting.metrics.METRICS`).

    Returns:
        A plain-text table.
    """

    def cell(entry: dict[str, Any], digits: int = 3) -> str:
        if entry.get("values") is not None and len(entry["values"]) > 1:
            return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
        return f"{entry['mean']:.{digits}f}"

    average = metrics.METRICS[metric].average
    short = "acc" if metric == "accuracy" else "bpc"
    header = ["method", "seeds", f"avg {short}", "BWT", "forgetting", f"final {short} per task"]
    rows = []
    for name, entry in summary.items():
        finals = " ".join(f"{a:.3f}" for a in entry["final_accuracy"]["mean"])
        rows.append(
            [
                name,
                str(entry["num_seeds"]),
                cell(entry[average]),
                cell(entry["backward_transfer"]),
                cell(entry["average_forgetting"]),
                finals,
                cell(entry["wall_time_s"], 1),
            ]
        )
    lines = [table([*header, "time s"], rows), f"tasks: {', '.join(task_names)}"]
    for name, entry in summary.items():
        if entry.get("strengths_per_task"):
            per_seed = "; ".join(
                " ".join("-" if v is None else f"{v:.3g}" for v in values)
                for values in entry["strengths_per_task"]
            )
            lines.append(f"{name}: evidence λ per task (per seed): {per_seed}")
    for name, entry in summary.items():
        if entry.get("forgetting_forecast"):
            f = entry["forgetting_forecast"]
            train, test = (
                "n/a" if f[key] is None else f"{f[key]:.3f}"
                for key in ("spearman_train", "spearman_test")
            )
            lines.append(
                f"{name}: forgetting forecast ½ Δθᵀ F_k Δθ vs measured loss rise, Spearman ρ "
                f"train {train} test {test} ({f['pairs']} pairs)"
            )
    return "\n".join(lines)
