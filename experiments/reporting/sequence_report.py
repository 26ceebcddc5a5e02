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
model).
Runs of single-run and sweep ``results.json`` files mix freely; a later file's runs of a
(method, strength) already seen are added as further seeds.
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


def _method_order(label: str) -> tuple[int, str]:
    names = list(METHODS)
    method = label.split(" ")[0]
    return (names.index(method) if method in names else len(names), label)


def _single_run_strength(config: dict[str, Any], name: str) -> float:
    if name not in METHODS or not METHODS[name].regularized:
        return 0.0
    specific = (config.get("strengths") or {}).get(name)
    return float(config["strength"] if specific is None else specific)


def _mean_std(values: Sequence[float]) -> str:
    values = np.asarray(values, np.float64)
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.3f} ± {std:.3f}"


def markdown_table(runs: dict[str, list[np.ndarray]], every: int) -> str:
    """The table: per label, seeds, then average accuracy and BWT after every ``every`` tasks."""
    num_tasks = min(m.shape[0] for matrices in runs.values() for m in matrices)
    points = list(range(every, num_tasks + 1, every)) or [num_tasks]
    header = ["method", "seeds"]
    header += [f"avg acc @{t}" for t in points] + [f"BWT @{t}" for t in points]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, matrices in runs.items():
        accuracy = [[average_accuracy_curve(m)[t - 1] for m in matrices] for t in points]
        transfer = [[backward_transfer_after(m, t) for m in matrices] for t in points]
        cells = [label, str(len(matrices))]
        cells += [_mean_std(v) for v in accuracy] + [_mean_std(v) for v in transfer]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    runs = collect_runs(args.results)
    print(markdown_table(runs, args.every))
    if args.matrices is not None:
        first = json.loads(Path(args.results[0]).read_text())
        summary = {
            label: {"accuracy_matrix_mean": np.mean(np.stack(ms), axis=0)}
            for label, ms in runs.items()
        }
        path = plots.plot_accuracy_matrices(
            summary, first["task_names"], args.matrices, metric=first["metric"]
        )
        print(f"figure: {path}")
    if args.plot is not None:
        curves = {
            label: np.stack([average_accuracy_curve(m) for m in ms]) for label, ms in runs.items()
        }
        print(
            f"figure: {plots.plot_average_accuracy_over_tasks(curves, args.plot, title=args.title)}"
        )


if __name__ == "__main__":
    main()
