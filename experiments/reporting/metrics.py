"""Continual-learning metrics computed from an accuracy matrix (or a bits-per-character one).

The accuracy matrix ``R`` of a stream of ``T`` tasks is ``T x T``: ``R[i, j]`` is the test
accuracy on task ``j`` after training on tasks ``0..i``. Entries with ``j > i`` (tasks not
trained yet) are recorded too, but none of the metrics below reads them.

A language sequence records test bits per character instead (:data:`METRICS`), where lower is
better; :func:`summarize` then reports the average final bits per character, and backward
transfer and forgetting with their signs kept: negative transfer and positive forgetting are
losses, as for accuracy (:func:`backward_transfer` and :func:`average_forgetting` with
``higher_is_better=False``).

Example:
    >>> import numpy as np
    >>> R = np.array([[0.75, 0.25], [0.5, 1.0]])
    >>> average_accuracy(R), backward_transfer(R), average_forgetting(R)
    (0.75, -0.25, 0.25)
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike


@dataclasses.dataclass(frozen=True)
class Metric:
    """What a scenario's evaluation measures.

    Attributes:
        name: the key, e.g. ``"accuracy"``.
        label: for axes and tables, e.g. ``"test accuracy"``.
        average: the name of the final average in :func:`summarize`.
        higher_is_better: accuracy yes, bits per character no.
        bounds: the plots' fixed axis range, or None to fit the data.
    """

    name: str
    label: str
    average: str
    higher_is_better: bool
    bounds: tuple[float, float] | None


METRICS = {
    "accuracy": Metric("accuracy", "test accuracy", "average_accuracy", True, (0.0, 1.0)),
    "bits_per_character": Metric(
        "bits_per_character", "test bits per character", "average_bits_per_character", False, None
    ),
}
"""The metrics a scenario may record, by name."""


def _as_square_matrix(accuracy_matrix: ArrayLike) -> np.ndarray:
    matrix = np.asarray(accuracy_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(
            f"the accuracy matrix must be square and non-empty (T x T), got shape {matrix.shape}"
        )
    return matrix


def average_accuracy(accuracy_matrix: ArrayLike) -> float:
    r"""Average accuracy over all tasks after training on the last one.

    .. math:: A_T = \frac{1}{T} \sum_{j=1}^{T} R_{T,j}

    Args:
        accuracy_matrix: ``[T, T]`` matrix, ``R[i, j]`` = accuracy on task ``j`` after task ``i``.

    Returns:
        The mean of the last row.

    References:
        Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (ACC).
    """
    matrix = _as_square_matrix(accuracy_matrix)
    return float(matrix[-1].mean())


def backward_transfer(accuracy_matrix: ArrayLike, *, higher_is_better: bool = True) -> float:
    r"""Backward transfer: how training later tasks changed the accuracy on earlier ones.

    .. math:: \mathrm{BWT} = \frac{1}{T-1} \sum_{j=1}^{T-1} \left(R_{T,j} - R_{j,j}\right)

    Negative values mean forgetting. Zero for a single task. For a metric where lower is better
    (bits per character) the sign is flipped, ``R_{j,j} - R_{T,j}``, so negative still means
    forgetting.

    Args:
        accuracy_matrix: ``[T, T]`` matrix, ``R[i, j]`` = accuracy on task ``j`` after task ``i``.
        higher_is_better: False for a loss-like metric.

    Returns:
        The mean over the first ``T - 1`` tasks of the final accuracy minus the accuracy just
        after learning the task.

    References:
        Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", eq. (BWT).
    """
    matrix = _as_square_matrix(accuracy_matrix)
    num_tasks = matrix.shape[0]
    if num_tasks == 1:
        return 0.0
    earlier = np.arange(num_tasks - 1)
    change = matrix[-1, earlier] - matrix[earlier, earlier]
    return float(np.mean(change if higher_is_better else -change))


def average_forgetting(accuracy_matrix: ArrayLike, *, higher_is_better: bool = True) -> float:
    r"""Average forgetting: the drop from each earlier task's best accuracy to its final one.

    .. math::
        f_j = \max_{l \in \{1, \dots, T-1\}} R_{l,j} - R_{T,j}, \qquad
        F_T = \frac{1}{T-1} \sum_{j=1}^{T-1} f_j

    The maximum runs over every row before the last, as in the paper. Zero for a single task.
    For a metric where lower is better (bits per character) it is the rise from the best:
    :math:`f_j = R_{T,j} - \min_{l < T} R_{l,j}`.

    Args:
        accuracy_matrix: ``[T, T]`` matrix, ``R[i, j]`` = accuracy on task ``j`` after task ``i``.
        higher_is_better: False for a loss-like metric.

    Returns:
        The mean of ``f_j`` over the first ``T - 1`` tasks.

    References:
        Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning: Understanding Forgetting
        and Intransigence", eq. (4)-(5).
    """
    matrix = _as_square_matrix(accuracy_matrix)
    num_tasks = matrix.shape[0]
    if num_tasks == 1:
        return 0.0
    before_last = matrix[:-1, : num_tasks - 1]
    if not higher_is_better:
        return float(np.mean(matrix[-1, : num_tasks - 1] - before_last.min(axis=0)))
    return float(np.mean(before_last.max(axis=0) - matrix[-1, : num_tasks - 1]))


def summarize(accuracy_matrix: ArrayLike, metric: str = "accuracy") -> dict[str, float]:
    """All metrics of one accuracy (or bits-per-character) matrix, by name.

    Args:
        accuracy_matrix: ``[T, T]`` matrix, ``R[i, j]`` = the metric on task ``j`` after task
            ``i``.
        metric: a key of :data:`METRICS`.

    Returns:
        ``{"average_accuracy": ..., "backward_transfer": ..., "average_forgetting": ...}``;
        for bits per character the first is ``"average_bits_per_character"``.
    """
    spec = METRICS[metric]
    better = spec.higher_is_better
    return {
        spec.average: average_accuracy(accuracy_matrix),
        "backward_transfer": backward_transfer(accuracy_matrix, higher_is_better=better),
        "average_forgetting": average_forgetting(accuracy_matrix, higher_is_better=better),
    }


def average_ranks(values: ArrayLike) -> np.ndarray:
    """Ranks ``1..n`` of ``values``, ties sharing the mean of the ranks they span.

    Example:
        >>> average_ranks([10.0, 30.0, 20.0, 30.0]).tolist()
        [1.0, 3.5, 2.0, 3.5]
    """
    values = np.asarray(values, np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Runs of equal values: each gets the mean of the ranks (1-based) it occupies.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    r"""Spearman's rank correlation: Pearson's correlation of the average ranks of ``x`` and ``y``,

    .. math:: ρ = \frac{\sum_i (r_i - \bar r)(s_i - \bar s)}
        {\sqrt{\sum_i (r_i - \bar r)^2 \sum_i (s_i - \bar s)^2}},

    ``nan`` for fewer than two pairs or a constant side.

    Example:
        >>> spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0])
        0.8
    """
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs pairs: got {x.size} and {y.size} values")
    if x.size < 2:
        return float("nan")
    r, s = average_ranks(x), average_ranks(y)
    r, s = r - r.mean(), s - s.mean()
    denominator = np.sqrt(np.sum(r * r) * np.sum(s * s))
    return float(np.sum(r * s) / denominator) if denominator > 0 else float("nan")
