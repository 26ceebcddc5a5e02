"""Continual-learning metrics computed from an accuracy matrix.

The accuracy matrix ``R`` of a stream of ``T`` tasks is ``T x T``: ``R[i, j]`` is the test
accuracy on task ``j`` after training on tasks ``0..i``. Entries with ``j > i`` (tasks not
trained yet) are recorded too, but none of the metrics below reads them.

Example:
    >>> import numpy as np
    >>> R = np.array([[0.75, 0.25], [0.5, 1.0]])
    >>> average_accuracy(R), backward_transfer(R), average_forgetting(R)
    (0.75, -0.25, 0.25)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


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


def backward_transfer(accuracy_matrix: ArrayLike) -> float:
    r"""Backward transfer: how training later tasks changed the accuracy on earlier ones.

    .. math:: \mathrm{BWT} = \frac{1}{T-1} \sum_{j=1}^{T-1} \left(R_{T,j} - R_{j,j}\right)

    Negative values mean forgetting. Zero for a single task.

    Args:
        accuracy_matrix: ``[T, T]`` matrix, ``R[i, j]`` = accuracy on task ``j`` after task ``i``.

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
    return float(np.mean(matrix[-1, earlier] - matrix[earlier, earlier]))


def average_forgetting(accuracy_matrix: ArrayLike) -> float:
    r"""Average forgetting: the drop from each earlier task's best accuracy to its final one.

    .. math::
        f_j = \max_{l \in \{1, \dots, T-1\}} R_{l,j} - R_{T,j}, \qquad
        F_T = \frac{1}{T-1} \sum_{j=1}^{T-1} f_j

    The maximum runs over every row before the last, as in the paper. Zero for a single task.

    Args:
        accuracy_matrix: ``[T, T]`` matrix, ``R[i, j]`` = accuracy on task ``j`` after task ``i``.

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
    best_before_last = matrix[:-1, : num_tasks - 1].max(axis=0)
    return float(np.mean(best_before_last - matrix[-1, : num_tasks - 1]))


def summarize(accuracy_matrix: ArrayLike) -> dict[str, float]:
    """All metrics of one accuracy matrix, by name.

    Args:
        accuracy_matrix: ``[T, T]`` matrix, ``R[i, j]`` = accuracy on task ``j`` after task ``i``.

    Returns:
        ``{"average_accuracy": ..., "backward_transfer": ..., "average_forgetting": ...}``.
    """
    return {
        "average_accuracy": average_accuracy(accuracy_matrix),
        "backward_transfer": backward_transfer(accuracy_matrix),
        "average_forgetting": average_forgetting(accuracy_matrix),
    }
