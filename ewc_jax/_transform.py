"""The EWC penalty as an Optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ewc_jax._consolidation import EWCState, empty_state
from ewc_jax._validation import check_same_structure, fail_if, negative_or_non_finite


class AddEWCPenaltyState(NamedTuple):
    """State of :func:`add_ewc_penalty`: the consolidated anchors and precisions."""

    ewc: EWCState


def add_ewc_penalty(strength: float) -> optax.GradientTransformation:
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

    Args:
      strength: λ >= 0, with the ½ convention of :func:`penalty`.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires ``params``.

    References:
      Kirkpatrick et al., PNAS 2017.
    """
    failures = negative_or_non_finite(strength, "strength")
    fail_if(strength, failures)  # a concrete strength: raises now

    def init_fn(params):
        return AddEWCPenaltyState(ewc=empty_state(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "add_ewc_penalty needs the current params: call tx.update(updates, state, params)."
            )
        ewc = state.ewc
        # λ F (θ - θ̄) in float32 at least (bfloat16 params keep a float32 precision), then
        # added to the gradient in its own dtype.
        updates = jax.tree.map(
            lambda g, p, a, f: (
                g
                + (
                    jnp.asarray(strength, f.dtype) * f * (p.astype(f.dtype) - a.astype(f.dtype))
                ).astype(g.dtype)
            ),
            updates,
            params,
            ewc.anchor,
            ewc.precision,
        )
        return fail_if(updates, failures), state

    return optax.GradientTransformation(init_fn, update_fn)


def set_ewc_state(opt_state: Any, ewc_state: EWCState) -> Any:
    """Returns ``opt_state`` with the state of every :func:`add_ewc_penalty` in it replaced.

    Works on any nesting of Optax states (``optax.chain``, ``optax.multi_transform``, ...).

    Args:
      opt_state: an Optax state containing at least one ``AddEWCPenaltyState``.
      ewc_state: the new consolidated state, from :func:`consolidate`.

    Returns:
      The new optimiser state; shapes and dtypes are unchanged, so jitted steps do not recompile.

    Raises:
      ValueError: if ``opt_state`` holds no ``AddEWCPenaltyState`` or the trees differ.
    """
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, "ewc", filtering=lambda _, value: isinstance(value, EWCState)
    )
    if not found:
        raise ValueError(
            "opt_state contains no add_ewc_penalty state; build the optimiser with "
            "optax.chain(ewc_jax.add_ewc_penalty(strength), ...)."
        )
    for _, old in found:
        check_same_structure(old.anchor, ewc_state.anchor, "the optimiser's EWC anchor", "anchor")
        check_same_structure(
            old.precision, ewc_state.precision, "the optimiser's EWC precision", "precision"
        )
    return optax.tree_utils.tree_set(
        opt_state, lambda _, value: isinstance(value, EWCState), ewc=ewc_state
    )
