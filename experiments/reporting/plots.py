"""Figures of a run: learning curves per task, accuracy-matrix heatmaps, a method comparison, the
forgetting forecast.

Matplotlib is imported inside the functions and used through ``matplotlib.figure.Figure`` with
the Agg canvas, so no display, no pyplot and no global backend state are involved. Every figure
is written to a temporary file and moved into place with ``os.replace``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.reporting.metrics import METRICS
from experiments.storage.checkpoint import os_error_in
from experiments.storage.workdir import WorkdirUnusableError, unusable_message

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from experiments.reporting.results import RunRecord


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    """Writes the PNG beside ``path``, then renames it; a failed write (a full disk) leaves
    nothing behind and raises :class:`experiments.storage.workdir.WorkdirUnusableError`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except Exception as error:  # PIL and matplotlib wrap the OSError of a full disk
        tmp.unlink(missing_ok=True)
        cause = os_error_in(error)
        if cause is None:
            raise
        raise WorkdirUnusableError(unusable_message(path, cause)) from None
    return path


def plot_accuracy_curves(
    runs: Sequence[RunRecord], task_names: Sequence[str], path: Path, metric: str = "accuracy"
) -> Path:
    """Test accuracy of each task over training, one panel per task, one line per method.

    ``metric`` names what the curves hold (:data:`experiments.reporting.metrics.METRICS`), e.g.
    bits per character on a language sequence.

    Dotted vertical lines mark task boundaries, as in the PyTorch EWC tutorial's plots. The
    first run of each method is drawn.

    Args:
        runs: records (only the first of each method is drawn).
        task_names: names of the tasks.
        path: output PNG.

    Returns:
        ``path``.
    """
    first: dict[str, RunRecord] = {}
    for run in runs:
        first.setdefault(run.method, run)
    num_tasks = len(task_names)
    columns = min(num_tasks, 5)
    rows = math.ceil(num_tasks / columns)
    figure = _new_figure(3.2 * columns, 2.6 * rows)
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    boundaries = np.cumsum(next(iter(first.values())).steps_per_task)[:-1]
    for j, name in enumerate(task_names):
        ax = axes[j // columns][j % columns]
        for method, run in first.items():
            points = [(c["step"], c["accuracy"][j]) for c in run.curves if c["task"] >= j]
            if points:
                steps, accuracy = zip(*points, strict=True)
                ax.plot(steps, accuracy, marker="." if len(points) < 60 else None, label=method)
        for boundary in boundaries:
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"task {j + 1}: {name}")
        ax.set_xlabel("training step")
        bounds = METRICS[metric].bounds
        if bounds is not None:
            ax.set_ylim(bounds[0], bounds[1] * 1.02)
        ax.grid(alpha=0.3)
        if j % columns == 0:
            ax.set_ylabel(METRICS[metric].label)
    for k in range(num_tasks, rows * columns):
        axes[k // columns][k % columns].set_visible(False)
    axes[0][0].legend(fontsize="small")
    return _save(figure, path)


def plot_accuracy_matrices(
    summary: dict[str, dict[str, Any]],
    task_names: Sequence[str],
    path: Path,
    metric: str = "accuracy",
) -> Path:
    """Heatmap of the accuracy matrix ``R[i, j]`` (mean over seeds), one panel per method.

    For a metric without fixed bounds (bits per character) the colour scale spans the values
    of all panels, reversed so that better is brighter as for accuracy.

    Args:
        summary: from :func:`experiments.reporting.results.summarize_runs`.
        task_names: names of the tasks.
        path: output PNG.

    Returns:
        ``path``.
    """
    methods = list(summary)
    num_tasks = len(task_names)
    size = max(2.8, 0.45 * num_tasks + 1.5)
    figure = _new_figure(size * len(methods), size)
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    image = None
    spec = METRICS[metric]
    everything = np.asarray([summary[m]["accuracy_matrix_mean"] for m in methods])
    low, high = spec.bounds or (float(everything.min()), float(everything.max()))
    cmap = "viridis" if spec.higher_is_better else "viridis_r"
    for ax, method in zip(axes, methods, strict=True):
        matrix = np.asarray(summary[method]["accuracy_matrix_mean"])
        image = ax.imshow(matrix, vmin=low, vmax=high, cmap=cmap)
        if num_tasks <= 10:
            for i in range(num_tasks):
                for j in range(num_tasks):
                    share = (matrix[i, j] - low) / max(high - low, 1e-12)
                    bright = share > 0.6 if spec.higher_is_better else share < 0.4
                    color = "black" if bright else "white"
                    ax.text(
                        j,
                        i,
                        f"{matrix[i, j]:.2f}",
                        ha="center",
                        va="center",
                        color=color,
                        fontsize=8,
                    )
        ax.set_title(method)
        ax.set_xticks(range(num_tasks), task_names, rotation=45, fontsize=7)
        ax.set_yticks(range(num_tasks), task_names, fontsize=7)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task i")
    figure.colorbar(image, ax=list(axes), shrink=0.8, label=spec.label)
    return _save(figure, path)


def plot_method_comparison(
    summary: dict[str, dict[str, Any]], path: Path, metric: str = "accuracy"
) -> Path:
    """Bar chart of average accuracy and average forgetting per method (± std over seeds).

    With ``metric="bits_per_character"``: the average final bits per character and the average
    rise of bits per character (forgetting); lower is better for both.

    Args:
        summary: from :func:`experiments.reporting.results.summarize_runs`.
        path: output PNG.

    Returns:
        ``path``.
    """
    methods = list(summary)
    figure = _new_figure(max(5.0, 1.4 * len(methods) + 2.0), 3.2)
    axes = figure.subplots(1, 2)
    positions = np.arange(len(methods))
    spec = METRICS[metric]
    better = "higher" if spec.higher_is_better else "lower"
    average_title = f"average {spec.label.removeprefix('test ')} ({better} is better)"
    for ax, key, title in (
        (axes[0], spec.average, average_title),
        (axes[1], "average_forgetting", "average forgetting (lower is better)"),
    ):
        means = [summary[m][key]["mean"] for m in methods]
        several_seeds = any(summary[m]["num_seeds"] > 1 for m in methods)
        stds = [summary[m][key]["std"] for m in methods] if several_seeds else None
        bars = ax.bar(positions, means, yerr=stds, capsize=4, color=[f"C{k}" for k in positions])
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in means], fontsize=8, padding=2)
        ax.set_xticks(positions, methods)
        ax.set_title(title, fontsize=10)
        if spec.bounds is not None:
            ax.set_ylim(spec.bounds[0], spec.bounds[1] * 1.1)
        ax.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def forecast_figure(runs: Sequence[RunRecord]) -> Figure:
    r"""Predicted against measured forgetting, log-log, one colour (one series) per method.

    Each point is an earlier task ``k`` after a later task ``t`` of a run: x is the predicted
    rise of task ``k``'s mean loss, :math:`\frac12 Δθ^\top F_k Δθ`, y the measured rise on its
    training data (filled) and test data (open). Pairs whose rise is not positive cannot be
    drawn on a log axis; the legend counts them. The dashed line is y = x.

    Args:
        runs: records of every method and seed; those without a forecast are skipped.

    Returns:
        The figure (its axes hold one ``PathCollection`` per method and data split).
    """
    figure = _new_figure(5.0, 4.2)
    ax = figure.subplots()
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run.forecast:
            by_method.setdefault(run.method, []).extend(run.forecast)
    low, high = np.inf, 0.0
    for k, (method, pairs) in enumerate(by_method.items()):
        predicted = np.asarray([p["predicted"] for p in pairs])
        for split, filled in (("train", True), ("test", False)):
            measured = np.asarray([p[f"measured_{split}"] for p in pairs])
            shown = (predicted > 0) & (measured > 0)
            hidden = int(np.sum(~shown))
            label = f"{method} ({split}{f', {hidden} not > 0' if hidden else ''})"
            ax.scatter(
                predicted[shown],
                measured[shown],
                s=18,
                color=f"C{k}",
                facecolors=f"C{k}" if filled else "none",
                label=label,
            )
            if np.any(shown):
                both = np.r_[predicted[shown], measured[shown]]
                low, high = min(low, float(both.min())), max(high, float(both.max()))
    if high > 0:
        ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    else:  # nothing drawable (every rise <= 0, e.g. a later task helped the earlier one)
        ax.set_xlim(1e-6, 1.0)
        ax.set_ylim(1e-6, 1.0)
        ax.text(1e-3, 1e-3, "no pair with positive rises", ha="center", fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted loss rise ½ Δθᵀ F_k Δθ")
    ax.set_ylabel("measured loss rise of task k")
    ax.set_title("forgetting forecast (filled: train, open: test)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return figure


def plot_forgetting_forecast(runs: Sequence[RunRecord], path: Path) -> Path:
    """:func:`forecast_figure` written to ``path``."""
    return _save(forecast_figure(runs), path)


def write_figures(
    runs: Sequence[RunRecord],
    summary: dict[str, dict[str, Any]],
    task_names: Sequence[str],
    workdir: Path,
    metric: str = "accuracy",
) -> list[Path]:
    """Writes all figures of a run into ``workdir``.

    Args:
        runs: records of every method and seed.
        summary: from :func:`experiments.reporting.results.summarize_runs`.
        task_names: names of the tasks.
        workdir: output directory.
        metric: the scenario's metric (:data:`experiments.reporting.metrics.METRICS`).

    Returns:
        Paths of ``accuracy_curves.png``, ``accuracy_matrix.png``, ``method_comparison.png``
        and, when a run holds a forgetting forecast, ``forgetting_forecast.png``.
    """
    figures = [
        plot_accuracy_curves(runs, task_names, workdir / "accuracy_curves.png", metric),
        plot_accuracy_matrices(summary, task_names, workdir / "accuracy_matrix.png", metric),
        plot_method_comparison(summary, workdir / "method_comparison.png", metric),
    ]
    if any(run.forecast for run in runs):
        figures.append(plot_forgetting_forecast(runs, workdir / "forgetting_forecast.png"))
    return figures


def plot_strength_sensitivity(
    summary: dict[str, list[dict[str, Any]]], path: Path, metric: str = "accuracy"
) -> Path:
    """Final average accuracy against the strength λ, one line per method, ± std band over seeds.

    ``metric`` is the scenario's (:data:`experiments.reporting.metrics.METRICS`): for a language
    sequence the line is the final average bits per character.

    A method with a single strength (finetune, joint, or a regularised method run at one λ) is
    drawn as a horizontal dashed line with its band across the whole strength axis. The axis is
    logarithmic when every strength is positive and they span at least a factor of 10.

    Args:
        summary: from :func:`experiments.reporting.sweeps.summarize_sweep`.
        path: output PNG.

    Returns:
        ``path``.
    """
    swept = [e["strength"] for entries in summary.values() if len(entries) > 1 for e in entries]
    swept = swept or [e["strength"] for entries in summary.values() for e in entries]
    span = [min(swept), max(swept)]
    if span[0] == span[1]:
        span = [span[0] * 0.5, span[0] * 2.0] if span[0] > 0 else [0.0, 1.0]
    log_axis = span[0] > 0 and span[1] / span[0] >= 10
    spec = METRICS[metric]
    figure = _new_figure(5.5, 3.6)
    ax = figure.subplots()
    for k, (method, entries) in enumerate(summary.items()):
        mean = np.asarray([e[spec.average]["mean"] for e in entries])
        std = np.asarray([e[spec.average]["std"] for e in entries])
        seeds = max(e["num_seeds"] for e in entries)
        label = f"{method} ({seeds} seed{'s' if seeds > 1 else ''})"
        color = f"C{k}"
        if len(entries) == 1:
            x = np.asarray(span)
            mean, std = np.repeat(mean, 2), np.repeat(std, 2)
            ax.plot(x, mean, linestyle="--", color=color, label=label)
        else:
            x = np.asarray([e["strength"] for e in entries])
            ax.plot(x, mean, marker="o", color=color, label=label)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    if log_axis:
        ax.set_xscale("log")
    ax.set_xlabel("strength λ")
    ax.set_ylabel(f"final average {spec.label.removeprefix('test ')}")
    ax.set_title("strength sensitivity (mean ± std over seeds)", fontsize=10)
    if spec.bounds is not None:
        ax.set_ylim(spec.bounds[0], spec.bounds[1] * 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


def plot_average_accuracy_over_tasks(
    curves: dict[str, np.ndarray], path: Path, *, title: str = "", metric: str = "accuracy"
) -> Path:
    """Average accuracy (or ``metric``) on the tasks seen so far against their number, one line
    per method.

    ``curves[label][s, t]`` is seed ``s``'s mean accuracy over tasks ``1 .. t+1`` after training
    task ``t+1`` (:func:`experiments.reporting.sequence_report.average_accuracy_curve`); the line
    is the mean over seeds, the band ± one standard deviation.

    Args:
        curves: ``{label: [S, T] array}``.
        path: output PNG.
        title: the figure's title.
        metric: what the curves hold (:data:`experiments.reporting.metrics.METRICS`): its label
            names the axis, its bounds (if any) fix it; bits per character fit the data.

    Returns:
        ``path``.
    """
    spec = METRICS[metric]
    figure = _new_figure(6.0, 4.0)
    ax = figure.subplots()
    for k, (label, values) in enumerate(curves.items()):
        values = np.asarray(values, np.float64).reshape(-1, np.shape(values)[-1])
        tasks = np.arange(1, values.shape[1] + 1)
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        ax.plot(tasks, mean, color=f"C{k}", marker=".", label=label)
        ax.fill_between(tasks, mean - std, mean + std, color=f"C{k}", alpha=0.2, linewidth=0)
    num_tasks = max(np.shape(values)[-1] for values in curves.values())
    ax.set_xticks(np.arange(1, num_tasks + 1, max(1, num_tasks // 10)))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel(f"average {spec.label} on the tasks so far")
    ax.set_title(title or f"average {spec.label} (mean ± std over seeds)", fontsize=10)
    if spec.bounds is not None:
        ax.set_ylim(spec.bounds[0], spec.bounds[1] * 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(figure, path)
