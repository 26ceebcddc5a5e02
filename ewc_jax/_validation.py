"""Checks that turn bad input into errors that say what was wrong and what to do."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ewc_jax._types import PyTree


def concrete_or_none(x: Any) -> np.ndarray | None:
    """Returns ``x`` as a NumPy array, or None when it is a tracer (value unknown under jit)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_same_structure(reference: PyTree, other: PyTree, ref_name: str, other_name: str) -> None:
    """Raises ValueError naming the first path where two trees differ in structure or shape."""
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    oth_leaves, oth_def = jax.tree_util.tree_flatten_with_path(other)
    if ref_def != oth_def:
        ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_leaves]
        oth_paths = [jax.tree_util.keystr(p) for p, _ in oth_leaves]
        for i in range(max(len(ref_paths), len(oth_paths))):
            a = ref_paths[i] if i < len(ref_paths) else "<missing>"
            b = oth_paths[i] if i < len(oth_paths) else "<missing>"
            if a != b:
                raise ValueError(
                    f"{other_name} does not have the tree structure of {ref_name}: first "
                    f"difference at leaf {i}: {ref_name} has {a}, {other_name} has {b}. Build "
                    f"{other_name} from the same parameters (e.g. jax.tree.map over {ref_name})."
                )
        raise ValueError(
            f"{other_name} does not have the tree structure of {ref_name} (same leaf paths, "
            f"different node types: {ref_def} vs {oth_def})."
        )
    for (path, a), (_, b) in zip(ref_leaves, oth_leaves, strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{other_name} and {ref_name} differ in shape at {jax.tree_util.keystr(path)}: "
                f"{np.shape(b)} vs {np.shape(a)}."
            )


def check_finite(tree: PyTree, name: str) -> None:
    """Raises ValueError naming the first leaf with a NaN or Inf (skipped under jit)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = concrete_or_none(leaf)
        if value is not None and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise ValueError(
                f"{name} has {bad} non-finite value(s) (NaN or Inf) at "
                f"{jax.tree_util.keystr(path)}; consolidating them would make every later "
                "penalty non-finite. Check the training run that produced them."
            )


def check_nonnegative_scalar(value: Any, name: str) -> None:
    """Raises ValueError if a concrete scalar is negative or not finite."""
    v = concrete_or_none(value)
    if v is not None and (v.shape != () or not np.isfinite(v) or v < 0):
        raise ValueError(f"{name} must be a finite scalar >= 0, got {value!r}.")


def check_unit_interval(value: Any, name: str) -> None:
    """Raises ValueError if a concrete scalar lies outside [0, 1]."""
    v = concrete_or_none(value)
    if v is not None and (v.shape != () or not 0.0 <= float(v) <= 1.0):
        raise ValueError(f"{name} must be a scalar in [0, 1], got {value!r}.")
