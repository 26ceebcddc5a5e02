"""Average accuracy and BWT every few tasks of a long sequence, from ``results.json`` files.

    python -m experiments.reporting.sequence_report runs/permuted_long/results.json --every 5 \
        --plot docs/permuted_long.png

Prints a Markdown table, one row per method (and strength, where the files hold several):
after every ``--every`` tasks ``t``, the average accuracy over tasks ``1 .. t`` and the backward
transfer over the first ``t`` tasks (:mod:`experiments.reporting.metrics` on the ``t x t`` top-left
block
of each run's accuracy matrix), mean ± std (ddof 1) over seeds. ``--plot`` draws the average
accuracy after every task (:func:`experiments.reporting.plots.plot_average_accuracy_over_tasks`),
``--matrices`` each label's matrix averaged over its seeds, as heatmaps in the first file's metric
(:func:`experiments.reporting.plots.plot_accuracy_matrices`; bits per character for the language
model), ``--matrices-of`` naming the labels to draw (say, each method at its best strength).
Runs of single-run and sweep ``results.json`` files mix freely; a later file's runs of a
(method, strength) already seen are added as further seeds.

``--final`` adds a table of every task's value after the last task (the matrix's last row) and
their mean, mean ± std over seeds; ``--trade-off`` draws the first task's final value against
the last task's, one point per label (± std), a method's strengths joined by a line; and
``--equal-cost A,B`` prints, for every label of method ``A``, method ``B``'s first-task value and
its mean over the tasks before the last at the same last-task value, linearly interpolated
between ``B``'s strengths (mean over seeds):
"K-FAC against EWC at equal cost on the last language" for a language sequence.

    python -m experiments.reporting.sequence_report runs/lm_large/*/results.json --every 4 \
        --final --equal-cost kfac,ewc --trade-off docs/figures/fortunes_lm_large_trade_off.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.reporting import metrics, plots
from experiments.training.methods import METHODS


def average_accuracy_curve(accuracy_matrix: Any) -> np.ndarray:
    """``[T]``: entry ``t`` is the mean of row ``t``'s first ``t + 1`` accuracies.

    Example:
        >>> average_accuracy_curve([[1.0, 0.1], [0.5, 0.9]]).tolist()
        [1.0, 0.7]
    """
    matrix = np.asarray(accuracy_matrix, np.float64)
    return np.asarray([matrix[t, : t + 1].mean() for t in range(matrix.shape[0])])


def backward_transfer_after(accuracy_matrix: Any, num_tasks: int) -> float:
    """BWT of the first ``num_tasks`` tasks, measured after training the last of them."""
    matrix = np.asarray(accuracy_matrix, np.float64)
    return metrics.backward_transfer(matrix[:num_tasks, :num_tasks])


def collect_runs(paths: Sequence[Path]) -> dict[str, list[np.ndarray]]:
    """Accuracy matrices by label (``method λ=<strength>``, or ``method`` unregularised), in
    the order of :data:`experiments.training.methods.METHODS`."""
    runs: dict[str, list[np.ndarray]] = {}
    for path in paths:
        document = json.loads(Path(path).read_text())
        strength_of = {}
        if not document.get("sweep"):
            for name in document["config"]["methods"]:
                strength_of[name] = _single_run_strength(document["config"], name)
        for run in document["runs"]:
            method = run["method"]
            strength = run.get("strength", strength_of.get(method, 0.0))
            label = method if not strength else f"{method} λ={strength:g}"
            runs.setdefault(label, []).append(np.asarray(run["accuracy_matrix"], np.float64))
    return dict(sorted(runs.items(), key=lambda item: _method_order(item[0])))


def _method_order(label: str) -> tuple[int, str, float]:
    """Methods in :data:`METHODS`' order, a method's strengths by value (``λ=3`` before
    ``λ=10``)."""
    names = list(METHODS)
    method, _, strength = label.partition(" λ=")
    rank = names.index(method) if method in names else len(names)
    return (rank, method, float(strength) if strength else 0.0)


def _single_run_strength(config: dict[str, Any], name: str) -> float:
    if name not in METHODS or not METHODS[name].regularized:
        return 0.0
    specific = (config.get("strengths") or {}).get(name)
    return float(config["strength"] if specific is None else specific)


def _mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (ddof 1) over seeds; one seed has no spread and prints its value alone."""
    values = np.asarray(values, np.float64)
    if values.size == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def markdown_table(runs: dict[str, list[np.ndarray]], every: int, metric: str = "accuracy") -> str:
    """The table: per label, seeds, then average accuracy (or bits per character, ``metric``)
    and BWT after every ``every`` tasks."""
    num_tasks = min(m.shape[0] for matrices in runs.values() for m in matrices)
    points = list(range(every, num_tasks + 1, every)) or [num_tasks]
    average = "avg acc" if metric == "accuracy" else "avg bpc"
    header = ["method", "seeds"]
    header += [f"{average} @{t}" for t in points] + [f"BWT @{t}" for t in points]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, matrices in runs.items():
        accuracy = [[average_accuracy_curve(m)[t - 1] for m in matrices] for t in points]
        transfer = [[backward_transfer_after(m, t) for m in matrices] for t in points]
        cells = [label, str(len(matrices))]
        cells += [_mean_std(v) for v in accuracy] + [_mean_std(v) for v in transfer]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(runs: dict[str, list[np.ndarray]], task_names: Sequence[str]) -> str:
    """Per label: seeds, each task's value after the last task, and their mean (mean ± std)."""
    header = ["method", "seeds", *[f"{name} final" for name in task_names], "average final"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, matrices in runs.items():
        last = np.stack([m[-1] for m in matrices])
        cells = [label, str(len(matrices))]
        cells += [_mean_std(last[:, k]) for k in range(last.shape[1])]
        lines.append("| " + " | ".join([*cells, _mean_std(last.mean(axis=1))]) + " |")
    return "\n".join(lines)


def _end_points(matrices: list[np.ndarray]) -> tuple[float, float, float]:
    """The mean over seeds of the last task's, the first task's and the earlier tasks' mean
    value after the last task."""
    last = np.stack([m[-1] for m in matrices])
    return float(last[:, -1].mean()), float(last[:, 0].mean()), float(last[:, :-1].mean())


def equal_cost_lines(runs: dict[str, list[np.ndarray]], method: str, other: str) -> list[str]:
    """For every label of ``method``: ``other``'s first-task value, and its mean over every
    task before the last, at the same last-task value.

    ``other``'s labels (its strengths), sorted by their mean last-task value, are joined by
    straight lines; a value outside their range is not extrapolated.

    Example:
        >>> first_rows = [[2.0, 9.0, 9.0], [2.5, 2.0, 9.0]]  # only the last row counts
        >>> runs = {"kfac λ=1": [np.array([*first_rows, [2.9, 3.1, 3.0]])],
        ...         "ewc λ=0.1": [np.array([*first_rows, [3.5, 3.3, 2.5]])],
        ...         "ewc λ=1": [np.array([*first_rows, [3.1, 3.5, 3.5]])]}
        >>> for part in equal_cost_lines(runs, "kfac", "ewc")[0].split("; "):
        ...     print(part)
        kfac λ=1: last 3.000, first 2.900, earlier 3.000
        ewc at that last: first 3.300, earlier 3.350
    """
    mine = [label for label in runs if label.split(" ")[0] == method]
    theirs = sorted(
        (_end_points(runs[label]) for label in runs if label.split(" ")[0] == other),
    )
    if not mine or len(theirs) < 2:
        raise ValueError(
            f"--equal-cost needs runs of {method!r} and at least two strengths of {other!r}; "
            f"labels: {', '.join(runs)}"
        )
    xs, ys, earlier = np.asarray(theirs).T
    lines = []
    for label in mine:
        last, first, mean = _end_points(runs[label])
        head = (
            f"{label}: last {last:.3f}, first {first:.3f}, earlier {mean:.3f}; {other} at that last"
        )
        if xs[0] <= last <= xs[-1]:
            at = np.interp(last, xs, ys), np.interp(last, xs, earlier)
            lines.append(f"{head}: first {at[0]:.3f}, earlier {at[1]:.3f}")
        else:
            lines.append(f"{head}: outside its range {xs[0]:.3f}-{xs[-1]:.3f}")
    return lines


def plot_trade_off(
    runs: dict[str, list[np.ndarray]], task_names: Sequence[str], path: Path, metric: str
) -> Path:
    """The first task's final value against the last task's, one point per label (mean ± std
    over seeds), the strengths of a method joined by a line in the order of the last task."""
    figure = plots._new_figure(6.0, 4.5)
    ax = figure.subplots()
    methods = list(dict.fromkeys(label.split(" ")[0] for label in runs))
    for k, method in enumerate(methods):
        labels = [label for label in runs if label.split(" ")[0] == method]
        finals = [np.stack([m[-1] for m in runs[label]]) for label in labels]
        x = np.array([f[:, -1].mean() for f in finals])
        y = np.array([f[:, 0].mean() for f in finals])
        spread = [(f.std(axis=0, ddof=1) if len(f) > 1 else np.zeros(f.shape[1])) for f in finals]
        order = np.argsort(x)
        ax.plot(x[order], y[order], color=f"C{k}", marker="o", label=method)
        ax.errorbar(
            x,
            y,
            xerr=[s[-1] for s in spread],
            yerr=[s[0] for s in spread],
            fmt="none",
            color=f"C{k}",
            alpha=0.6,
        )
        for label, xi, yi in zip(labels, x, y, strict=True):
            if "=" in label:
                ax.annotate(
                    label.split("=")[1],
                    (xi, yi),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    label = metrics.METRICS[metric].label
    ax.set_xlabel(f"{task_names[-1]} after the last task: {label}")
    ax.set_ylabel(f"{task_names[0]} after the last task: {label}")
    ax.set_title(
        "first task against last task, after the last (mean ± std over seeds)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return plots._save(figure, path)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the table of the given ``results.json`` files and, with ``--plot``, the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    parser.add_argument("--every", type=int, default=5, help="tasks between table columns")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the accuracy curves")
    parser.add_argument("--title", default="", help="title of the figure")
    parser.add_argument(
        "--matrices", type=Path, default=None, help="PNG of each label's mean matrix (heatmaps)"
    )
    parser.add_argument(
        "--matrices-of",
        default="",
        help="comma-separated labels the --matrices figure draws (default: every label)",
    )
    parser.add_argument("--final", action="store_true", help="table of the last row")
    parser.add_argument("--trade-off", type=Path, default=None, help="PNG: first vs last task")
    parser.add_argument("--equal-cost", default="", help="A,B: B's first task at A's last")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.results if not path.is_file()]
    if missing:
        parser.error(
            f"no such results file: {', '.join(missing)} (a run writes results.json when all its "
            "seeds and tasks are done)"
        )
    runs = collect_runs(args.results)
    first = json.loads(Path(args.results[0]).read_text())
    print(markdown_table(runs, args.every, first["metric"]))
    if args.final:
        print(final_table(runs, first["task_names"]))
    if args.equal_cost:
        method, other = args.equal_cost.split(",")
        print("\n".join(equal_cost_lines(runs, method, other)))
    if args.trade_off is not None:
        path = plot_trade_off(runs, first["task_names"], args.trade_off, first["metric"])
        print(f"figure: {path}")
    if args.matrices is not None:
        chosen = [label.strip() for label in args.matrices_of.split(",") if label.strip()]
        unknown = sorted(set(chosen) - set(runs))
        if unknown:
            parser.error(f"--matrices-of: no runs labelled {unknown}; labels: {', '.join(runs)}")
        summary = {
            label: {"accuracy_matrix_mean": np.mean(np.stack(ms), axis=0)}
            for label, ms in runs.items()
            if not chosen or label in chosen
        }
        path = plots.plot_accuracy_matrices(
            summary, first["task_names"], args.matrices, metric=first["metric"]
        )
        print(f"figure: {path}")
    if args.plot is not None:
        curves = {
            label: np.stack([average_accuracy_curve(m) for m in ms]) for label, ms in runs.items()
        }
        path = plots.plot_average_accuracy_over_tasks(
            curves, args.plot, title=args.title, metric=first["metric"]
        )
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
