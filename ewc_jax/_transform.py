"""The EWC penalty as an Optax gradient transformation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from ewc_jax._consolidation import empty_state
from ewc_jax._precision import Precision, check_state
from ewc_jax._validation import check_same_structure, fail_if, negative_or_non_finite
from ewc_jax._where import Where, is_masked, merge, select


class AddEWCPenaltyState(NamedTuple):
    """State of :func:`add_ewc_penalty`: the consolidated anchors and precisions.

    Attributes:
      ewc: the consolidated state (an :class:`EWCState` at ``init``; any :class:`Precision`
        after :func:`set_ewc_state`).

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> opt_state = ewc_jax.add_ewc_penalty(1.0).init({"w": jnp.ones(2)})
      >>> opt_state.ewc.precision["w"].tolist()  # empty: no task consolidated yet
      [0.0, 0.0]
    """

    ewc: Precision


def add_ewc_penalty(
    strength: jax.typing.ArrayLike, *, where: Where | None = None
) -> optax.GradientTransformation:
    r"""Adds the gradient of the EWC penalty, :math:`λ Λ (θ - θ̄)`, to the updates.

    The EWC sibling of ``optax.add_decayed_weights`` (whose ``g + s·θ`` is this with
    ``Λ = 1`` and ``θ̄ = 0``). Chained before an optimiser,
    ``optax.chain(add_ewc_penalty(λ), optax.sgd(lr))`` takes exactly the step that
    ``optax.sgd(lr)`` takes on ``grad(task_loss + penalty(·, state, λ))``.

    The consolidated state lives in the optimiser state and starts empty (zero precision).
    After each task, put the new one in with :func:`set_ewc_state`::

        tx = optax.chain(ewc_jax.add_ewc_penalty(2000.0), optax.sgd(1e-3))
        opt_state = tx.init(params)
        ...  # train task A
        ewc = ewc_jax.consolidate(None, params, fisher_a)
        opt_state = ewc_jax.set_ewc_state(opt_state, ewc)

    With ``where`` (as ``optax.masked`` takes it, and as given to :func:`consolidate`) the
    penalty covers the selected parameters only: the state holds their anchors and precisions
    only, and the other updates pass through unchanged. Sharded params give a state sharded the
    same way, and the update is elementwise, so every device touches its own shards only; a
    K-FAC state's update multiplies its factors with each kernel's own shards and reduces the
    partial products, gathering no sharded kernel (see :class:`ewc_jax.kfac.KFACState`).

    Args:
      strength: λ >= 0, with the ½ convention of :func:`penalty`.
      where: the parameters EWC covers; ``None`` (default): all.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, ewc_jax
      >>> params = {"w": jnp.array([3.0])}
      >>> tx = optax.chain(ewc_jax.add_ewc_penalty(2.0), optax.sgd(1.0))
      >>> state = ewc_jax.consolidate(None, {"w": jnp.array([1.0])}, {"w": jnp.array([0.5])})
      >>> opt_state = ewc_jax.set_ewc_state(tx.init(params), state)
      >>> updates, _ = tx.update({"w": jnp.zeros(1)}, opt_state, params)
      >>> updates["w"].tolist()  # -lr · λ F (θ - θ̄) = -1 · 2 · 0.5 · 2
      [-2.0]

    References:
      Kirkpatrick et al., PNAS 2017.
    """
    failures = negative_or_non_finite(strength, "strength")
    fail_if(strength, failures)  # a concrete strength: raises now

    def init_fn(params):
        return AddEWCPenaltyState(ewc=empty_state(params, where=where))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "add_ewc_penalty needs the current params: call tx.update(updates, state, params)."
            )
        # λ Λ (θ - θ̄) in float32 at least (the state's own rule), added to the gradient in
        # its own dtype.
        grads = state.ewc.penalty_gradient(params, strength, where=where)
        selected = jax.tree.map(
            lambda g, d: g + d.astype(g.dtype), select(updates, params, where), grads
        )
        return fail_if(merge(updates, params, where, selected), failures), state

    return optax.GradientTransformation(init_fn, update_fn)


def set_ewc_state(opt_state: optax.OptState, ewc_state: Precision) -> optax.OptState:
    """Returns ``opt_state`` with the state of every :func:`add_ewc_penalty` in it replaced.

    Works on any nesting of Optax states (``optax.chain``, ``optax.multi_transform``, ...).

    Args:
      opt_state: an Optax state containing at least one ``AddEWCPenaltyState``.
      ewc_state: the new consolidated state, from :func:`consolidate`: an ``EWCState``, a
        ``KFACState`` or any :class:`Precision` (replacing one type by another, or a K-FAC
        state by one with more terms, changes the state's structure or shapes, so a jitted
        step compiles once more).

    Returns:
      The new optimiser state; for an ``EWCState`` shapes and dtypes are unchanged, so jitted
      steps do not recompile.

    Raises:
      ValueError: if ``opt_state`` holds no ``AddEWCPenaltyState`` or the anchors' trees
        differ.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> params = {"w": jnp.ones(2)}
      >>> opt_state = ewc_jax.add_ewc_penalty(1.0).init(params)
      >>> state = ewc_jax.consolidate(None, params, {"w": jnp.full(2, 3.0)})
      >>> ewc_jax.set_ewc_state(opt_state, state).ewc.precision["w"].tolist()
      [3.0, 3.0]
    """
    check_state(ewc_state, "set_ewc_state")
    is_state = lambda _, value: isinstance(value, Precision)
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "ewc", filtering=is_state)
    if not found:
        raise ValueError(
            "opt_state contains no add_ewc_penalty state; build the optimiser with "
            "optax.chain(ewc_jax.add_ewc_penalty(strength), ...)."
        )
    for _, old in found:
        if is_masked(old.anchor) != is_masked(ewc_state.anchor):
            raise ValueError(
                "ewc_state and the optimiser's add_ewc_penalty state cover different parameters "
                "(one was built with where=, the other without); give add_ewc_penalty the same "
                "where= as consolidate."
            )
        check_same_structure(old.anchor, ewc_state.anchor, "the optimiser's EWC anchor", "anchor")
    return optax.tree_utils.tree_set(opt_state, is_state, ewc=ewc_state)
