"""The :class:`Dataset` tuple every loader returns, and the error of a missing dependency."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class MissingDependencyError(ImportError):
    """A spec needs a package that is not installed; the message says what to install."""


class Dataset(NamedTuple):
    """A labelled image-classification dataset, split into train and test.

    Attributes:
        name: The spec it was loaded from, e.g. ``"embedded:mnist"``.
        train_images: float32 [N, H, W, C], values in [0, 1].
        train_labels: int32 [N], values in [0, num_classes).
        test_images: float32 [M, H, W, C], values in [0, 1].
        test_labels: int32 [M], values in [0, num_classes).
        num_classes: The number of classes.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
