"""Penalising a subset of the parameters: the ``where`` selection, as ``optax.masked`` takes it.

``where`` is a pytree of bools with the structure of ``params`` or a prefix of it (one bool for a
whole sub-tree), or a callable ``where(params) -> such a tree``. A leaf under ``True`` is
selected. Unselected parts become ``optax.MaskedNode()``, an empty pytree node as in
``optax.masked``: they cost no memory, so an EWC state over the adapters of a 7B-parameter model
holds anchors and precisions for the adapters only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import jax
import numpy as np
import optax

from ewc_jax._types import Params, PyTree

Where: TypeAlias = PyTree | Callable[[Params], PyTree]
"""Which parameters EWC covers: a bool pytree (a prefix of ``params``) or a callable on them."""


def _flags(params: Params, where: Where) -> PyTree:
    mask = where(params) if callable(where) else where
    for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(
                f"where must hold Python bools (a prefix of params, as optax.masked takes), got "
                f"{type(flag).__name__} at {jax.tree_util.keystr(path)}."
            )
    return mask


def select(tree: PyTree, params: Params, where: Where | None) -> PyTree:
    """``tree`` (params-shaped) with every unselected sub-tree replaced by ``optax.MaskedNode()``.

    Idempotent: a tree that is already masked comes back unchanged. ``where=None`` selects all.
    """
    if where is None:
        return tree
    mask = _flags(params, where)
    try:
        selected = jax.tree.map(lambda m, t: t if m else optax.MaskedNode(), mask, tree)
    except ValueError as error:
        raise ValueError(
            "where must be a pytree of bools with the structure of params or a prefix of it "
            f"(as optax.masked takes): {error}"
        ) from None
    if jax.tree.leaves(tree) and not jax.tree.leaves(selected):
        raise ValueError(
            "where selects none of the parameters (every flag is False); select at least one, "
            "or leave EWC out."
        )
    return selected


def is_masked(tree: PyTree) -> bool:
    """Whether ``tree`` was restricted by a ``where`` (holds an ``optax.MaskedNode``)."""
    return any(
        isinstance(node, optax.MaskedNode)
        for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    )


def check_where_given(tree: PyTree, name: str, where: Where | None, params: Params) -> None:
    """Raises ValueError when ``tree`` covers a ``where`` selection but no ``where`` is given
    (the trees would differ, and the difference is not in the params)."""
    if where is None and is_masked(tree) and not is_masked(params):
        raise ValueError(
            f"{name} covers a where= selection (optax.MaskedNode in place of the unselected "
            "parameters) but where= is not given; pass the same where= here."
        )


def _numbered(params: Params, where: Where | None) -> PyTree:
    """``params``' structure restricted to ``where``, each leaf its index in
    ``jax.tree.leaves(params)``."""
    numbered = jax.tree.unflatten(
        jax.tree.structure(params), list(range(len(jax.tree.leaves(params))))
    )
    return select(numbered, params, where)


def selected_leaves(params: Params, where: Where | None) -> tuple[int, ...]:
    """Indices (in ``jax.tree.leaves(params)`` order) of the selected leaves."""
    if where is None:
        return tuple(range(len(jax.tree.leaves(params))))
    return tuple(jax.tree.leaves(_numbered(params, where)))


def selected_tree(params: Params, where: Where | None, leaf: Callable[[int], PyTree]) -> PyTree:
    """The tree :func:`select` gives for a params-shaped tree whose leaf ``i`` (in
    ``jax.tree.leaves(params)`` order) is ``leaf(i)``, calling ``leaf`` for the selected leaves
    only (the others are never built)."""
    return jax.tree.map(leaf, _numbered(params, where))


def merge(full: PyTree, params: Params, where: Where | None, selected: PyTree) -> PyTree:
    """``full`` with its selected leaves replaced by the leaves of ``selected`` (a masked tree)."""
    if where is None:
        return selected
    leaves, treedef = jax.tree.flatten(full)
    for i, value in zip(selected_leaves(params, where), jax.tree.leaves(selected), strict=True):
        leaves[i] = value
    return jax.tree.unflatten(treedef, leaves)
