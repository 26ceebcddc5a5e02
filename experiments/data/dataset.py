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


def bytes_to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 to float32 0..1, dividing in place to hold one float copy at a time."""
    result = images.astype(np.float32)
    result /= np.float32(255.0)
    return result
