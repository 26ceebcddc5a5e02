"""The EWC penalty as an Optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ewc_jax import _kfac
from ewc_jax._consolidation import EWCState, _wide, empty_state
from ewc_jax._validation import check_same_structure, fail_if, negative_or_non_finite
from ewc_jax._where import Where, merge, select


class AddEWCPenaltyState(NamedTuple):
    """State of :func:`add_ewc_penalty`: the consolidated anchors and precisions."""

    ewc: EWCState


def add_ewc_penalty(strength: float, *, where: Where | None = None) -> optax.GradientTransformation:
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
    same way, and the update is elementwise, so every device touches its own shards only.

    Args:
      strength: λ >= 0, with the ½ convention of :func:`penalty`.
      where: the parameters EWC covers; ``None`` (default): all.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires ``params``.

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
        ewc = state.ewc
        if not isinstance(ewc, EWCState):  # a KFACState
            if where is not None:
                raise ValueError("where= applies to a diagonal EWCState, not to a K-FAC state.")
            grads = _kfac.kfac_penalty_gradient(params, ewc, strength)
            updates = jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, grads)
            return fail_if(updates, failures), state
        # λ F (θ - θ̄) in float32 at least (bfloat16 params, anchors or precisions are
        # widened), then added to the gradient in its own dtype.
        selected = jax.tree.map(
            lambda g, p, a, f: (
                g
                + (
                    jnp.asarray(strength, _wide(p, a, f))
                    * f.astype(_wide(p, a, f))
                    * (p.astype(_wide(p, a, f)) - a.astype(_wide(p, a, f)))
                ).astype(g.dtype)
            ),
            select(updates, params, where),
            select(params, params, where),
            ewc.anchor,
            ewc.precision,
        )
        return fail_if(merge(updates, params, where, selected), failures), state

    return optax.GradientTransformation(init_fn, update_fn)


def set_ewc_state(opt_state: Any, ewc_state: EWCState | Any) -> Any:
    """Returns ``opt_state`` with the state of every :func:`add_ewc_penalty` in it replaced.

    Works on any nesting of Optax states (``optax.chain``, ``optax.multi_transform``, ...).

    Args:
      opt_state: an Optax state containing at least one ``AddEWCPenaltyState``.
      ewc_state: the new consolidated state, from :func:`consolidate`: an ``EWCState`` or a
        ``KFACState`` (replacing one type by the other changes the state's structure, so a
        jitted step compiles once more).

    Returns:
      The new optimiser state; shapes and dtypes are unchanged, so jitted steps do not recompile.

    Raises:
      ValueError: if ``opt_state`` holds no ``AddEWCPenaltyState`` or the trees differ.
    """
    if not isinstance(ewc_state, EWCState) or _kfac.holds_kfac_state(opt_state):
        return _kfac.set_state(opt_state, ewc_state)
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
