"""Merging a K-FAC state's remembered Kronecker terms into one per layer (an approximation)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ewc_jax._kfac_state import KFACState
from ewc_jax._validation import concrete_or_none


def merge_kronecker_terms(state: KFACState) -> KFACState:
    r"""Collapses each layer's remembered Kronecker terms into one (an approximation).

    .. math:: \sum_{t=1}^{T} A_t \otimes G_t \approx \Big(\sum_t A_t\Big) \otimes
              \Big(\frac1T \sum_t G_t\Big)

    Exact when every task has the same ``G`` (and whenever ``T = 1``); otherwise it drops the
    cross-task structure, in exchange for a state of fixed size: the penalty then costs the
    same after 50 tasks as after one, and a jitted step stops recompiling. Only for a state
    whose terms share one anchor, i.e. ``mode="online"`` (the separate mode's per-task
    anchors cannot be merged). Apply it after every :func:`consolidate`::

        state = ewc_jax.kfac.merge_kronecker_terms(
            ewc_jax.consolidate(state, params, fisher, mode="online", gamma=gamma)
        )

    The online decay ``γ`` is already folded into the old ``A_t``, so it carries over.

    Args:
      state: a K-FAC state whose layers' terms share one anchor.

    Returns:
      The state with one Kronecker term per layer.

    Raises:
      ValueError: the terms of a layer have different anchors (checked where concrete).

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]  # one Dense layer, two classes
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
      >>> fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact")
      >>> state = ewc_jax.consolidate(None, params, fisher, mode="online")
      >>> state = ewc_jax.consolidate(state, params, fisher, mode="online", gamma=0.5)
      >>> state.layers[0].a.shape  # two tasks, two terms
      (2, 4, 4)
      >>> merged = ewc_jax.kfac.merge_kronecker_terms(state)
      >>> merged.layers[0].a.shape, merged.layers[0].a[0].diagonal().tolist()  # ½ A + A
      ((1, 4, 4), [1.5, 3.0, 0.0, 1.5])
    """
    layers = []
    for terms in state.layers:
        anchors = concrete_or_none(terms.anchor)
        if anchors is not None and not np.all(anchors == anchors[-1:]):
            raise ValueError(
                "merge_kronecker_terms needs terms with one shared anchor (mode='online'); "
                f"the layer of leaf {terms.kernel} has {anchors.shape[0]} different anchors."
            )
        layers.append(
            dataclasses.replace(
                terms,
                a=jnp.sum(terms.a, axis=0, keepdims=True),
                g=jnp.mean(terms.g, axis=0, keepdims=True),
                anchor=terms.anchor[-1:],
            )
        )
    return KFACState(diagonal=state.diagonal, layers=tuple(layers))
