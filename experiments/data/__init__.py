"""Data: the loaders of every dataset spec (:mod:`.loading`), IDX files (:mod:`.idx`) and byte
windows of text (:mod:`.text`), all returning one :class:`Dataset` tuple."""

from experiments.data.dataset import Dataset, MissingDependencyError
from experiments.data.loading import (
    flatten,
    load_dataset,
    load_datasets,
    load_idx,
    validate_dataset,
)

__all__ = [
    "Dataset",
    "MissingDependencyError",
    "flatten",
    "load_dataset",
    "load_datasets",
    "load_idx",
    "validate_dataset",
]
