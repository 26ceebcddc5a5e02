"""Continual-learning metrics on hand-made accuracy matrices with hand-computed answers."""

import numpy as np
import pytest

from experiments.reporting import metrics

# R[i, j]: accuracy on task j after training task i. Entries above the diagonal (tasks not yet
# trained) are filled with values that would change every answer if a metric read them.
FORGETTING = np.array(
    [
        [0.90, 0.99, 0.99],
        [0.60, 0.80, 0.99],
        [0.50, 0.70, 0.95],
    ]
)


def test_average_accuracy_is_mean_of_last_row():
    # (0.50 + 0.70 + 0.95) / 3
    assert metrics.average_accuracy(FORGETTING) == pytest.approx(2.15 / 3)


def test_backward_transfer_by_hand():
    # ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = (-0.40 - 0.10) / 2
    assert metrics.backward_transfer(FORGETTING) == pytest.approx(-0.25)


def test_average_forgetting_by_hand():
    # task 0: max(0.90, 0.60) - 0.50 = 0.40; task 1: max(0.99, 0.80) - 0.70 = 0.29, where 0.99 is
    # R[0, 1]: Chaudhry et al.'s max runs over every row l < T, trained on task j or not.
    assert metrics.average_forgetting(FORGETTING) == pytest.approx((0.40 + 0.29) / 2)


def test_forgetting_uses_the_best_accuracy_not_the_one_after_learning():
    # Task 0 improves when task 1 is learned (0.5 -> 0.9), then drops to 0.7: BWT counts the final
    # gain over 0.5, forgetting counts the loss from the peak 0.9.
    matrix = np.array(
        [
            [0.5, 0.0, 0.0],
            [0.9, 0.8, 0.0],
            [0.7, 0.6, 0.9],
        ]
    )
    # BWT = ((0.7 - 0.5) + (0.6 - 0.8)) / 2 = 0; forgetting = ((0.9 - 0.7) + (0.8 - 0.6)) / 2.
    assert metrics.backward_transfer(matrix) == pytest.approx(0.0)
    assert metrics.average_forgetting(matrix) == pytest.approx(0.2)
    assert metrics.average_accuracy(matrix) == pytest.approx(2.2 / 3)


def test_no_forgetting_and_positive_transfer():
    matrix = np.array([[0.8, 0.1], [0.9, 0.85]])
    assert metrics.backward_transfer(matrix) == pytest.approx(0.1)
    assert metrics.average_forgetting(matrix) == pytest.approx(-0.1)
    assert metrics.average_accuracy(matrix) == pytest.approx(0.875)


def test_single_task_has_no_transfer_or_forgetting():
    matrix = [[0.7]]
    assert metrics.average_accuracy(matrix) == pytest.approx(0.7)
    assert metrics.backward_transfer(matrix) == 0.0
    assert metrics.average_forgetting(matrix) == 0.0


def test_summarize_collects_all_metrics():
    summary = metrics.summarize(FORGETTING)
    assert summary == {
        "average_accuracy": pytest.approx(2.15 / 3),
        "backward_transfer": pytest.approx(-0.25),
        "average_forgetting": pytest.approx(0.345),
    }


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros(3), np.zeros((0, 0))])
def test_non_square_matrix_is_rejected(bad):
    with pytest.raises(ValueError, match="square and non-empty"):
        metrics.average_accuracy(bad)
    with pytest.raises(ValueError, match="square and non-empty"):
        metrics.average_forgetting(bad)
