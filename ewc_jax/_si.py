r"""Synaptic Intelligence: importance as the path integral of the loss decrease during training."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ewc_jax._consolidation import _wide
from ewc_jax._types import Params
from ewc_jax._validation import check_same_structure, fail_if, negative_or_non_finite


class SIState(NamedTuple):
    """State of :func:`si_path_integral`.

    Attributes:
      inner: the wrapped optimiser's state.
      path_integral: params-shaped ``ω``, the running :math:`-\\sum_t g_t ⊙ Δθ_t` of the current
        task (float32 at least).
      start: params-shaped ``θ_start``, the parameters when the current task began.

    Example:
      >>> import jax.numpy as jnp, optax, ewc_jax
      >>> params = {"w": jnp.array([1.0])}
      >>> tx = ewc_jax.importance.si_path_integral(optax.sgd(0.5))
      >>> opt_state = tx.init(params)
      >>> updates, opt_state = tx.update({"w": jnp.array([2.0])}, opt_state, params)
      >>> params = optax.apply_updates(params, updates)  # w: 1 → 0
      >>> opt_state.path_integral["w"].tolist(), opt_state.start["w"].tolist()
      ([2.0], [1.0])
    """

    inner: optax.OptState
    path_integral: Params
    start: Params


def si_path_integral(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    r"""Wraps an optimiser and accumulates the SI path integral :math:`ω \mathrel{+}= -g ⊙ Δθ`.

    Every ``update`` passes the gradient ``g`` it receives to ``inner`` and gets back the
    update ``Δθ`` that ``optax.apply_updates`` will add to the parameters; the running
    :math:`ω_i = -\sum_t g_{t,i}\, Δθ_{t,i}` is each parameter's share of the decrease of the
    loss along the training trajectory (Zenke et al.: the first-order path integral).
    At the end of a task, :func:`si_importance` turns it into a precision.

    **Where it goes in the chain.** SI integrates the gradient of the *task loss* (the authors'
    ``unreg_grads``) against the *actual* parameter change, penalty included. So wrap the
    penalty together with the optimiser, and make this the outermost transformation (nothing
    after it may change the updates)::

        tx = ewc_jax.importance.si_path_integral(
            optax.chain(ewc_jax.add_ewc_penalty(strength), optax.adam(1e-3))
        )
        updates, opt_state = tx.update(grad_of_task_loss, opt_state, params)

    If the penalty is instead added to the loss before differentiating, ``g`` includes its
    gradient and ``ω`` counts the penalty's work too (a different quantity).

    Args:
      inner: the optimiser (any ``optax.GradientTransformation``).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires ``params`` only if
      ``inner`` does; its state is an :class:`SIState`.

    Example:
      >>> import jax.numpy as jnp, optax, ewc_jax
      >>> params = {"w": jnp.array([1.0])}
      >>> tx = ewc_jax.importance.si_path_integral(optax.sgd(0.5))
      >>> opt_state = tx.init(params)
      >>> updates, opt_state = tx.update({"w": jnp.array([2.0])}, opt_state, params)
      >>> params = optax.apply_updates(params, updates)  # w: 1 → 0
      >>> opt_state.path_integral["w"].tolist()  # ω = -g Δθ = -2 · (-1)
      [2.0]

    References:
      Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.
    """

    def init_fn(params):
        return SIState(
            inner=inner.init(params),
            path_integral=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _wide(p)), params),
            start=params,
        )

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        path_integral = jax.tree.map(
            lambda w, g, u: w - g.astype(w.dtype) * u.astype(w.dtype),
            state.path_integral,
            updates,
            new_updates,
        )
        return new_updates, SIState(inner_state, path_integral, state.start)

    return optax.GradientTransformation(init_fn, update_fn)


def si_importance(
    state: optax.OptState, params: Params, *, damping: jax.typing.ArrayLike = 0.1
) -> tuple[Params, optax.OptState]:
    r"""The SI importance of the task just finished, and the state reset for the next task.

    .. math:: Ω_i = \frac{\max(ω_i, 0)}{(θ_i - θ^{\text{start}}_i)^2 + ξ}

    with ``ω`` the path integral accumulated by :func:`si_path_integral` since the task began,
    ``θ`` the current ``params`` and ``θ_start`` the parameters at the task's start (Zenke et al.;
    ``ξ`` = ``damping`` keeps the ratio bounded where a parameter barely moved).
    Negative path integrals (the task loss rose along that coordinate, e.g. pushed there by the
    penalty) are clamped to 0 so that ``Ω`` is a valid precision for :func:`consolidate`. The
    authors' code applies the same ``relu`` to the running sum over tasks,
    ``relu(Ω_prev + ω/(Δθ² + ξ))``; clamping each task's term instead differs only where a
    task's ``ω`` is negative.

    The returned state has ``ω = 0`` and ``θ_start = params``, ready for the next task.
    Consolidate as the authors do, summing importances and anchoring at the latest parameters::

        omega, opt_state = ewc_jax.importance.si_importance(opt_state, params, damping=0.1)
        ewc = ewc_jax.consolidate(ewc, params, omega, mode="online", gamma=1.0)
        opt_state = ewc_jax.set_ewc_state(opt_state, ewc)

    Their penalty :math:`c \sum_i Ω_i (θ_i - θ̃_i)^2` has no ½: ``c`` is ``strength=2c`` here.

    Args:
      state: an :class:`SIState`, or any Optax state containing exactly one.
      params: the parameters at the end of the task.
      damping: ``ξ`` > 0 (0.1 in the paper's MNIST experiments, 1e-3 for CIFAR).

    Returns:
      ``(omega, new_state)``: a params-shaped importance (float32 at least, entries >= 0) and
      ``state`` with its SI part reset.

    Raises:
      ValueError: ``state`` holds no (or several) ``SIState``; trees that differ; a negative
        damping.

    Example:
      >>> import jax.numpy as jnp, optax, ewc_jax
      >>> params = {"w": jnp.array([1.0])}
      >>> tx = ewc_jax.importance.si_path_integral(optax.sgd(0.5))
      >>> opt_state = tx.init(params)
      >>> updates, opt_state = tx.update({"w": jnp.array([2.0])}, opt_state, params)
      >>> params = optax.apply_updates(params, updates)  # w: 1 → 0
      >>> omega, opt_state = ewc_jax.importance.si_importance(opt_state, params, damping=1.0)
      >>> omega["w"].tolist()  # ω / (Δθ² + ξ) = 2 / (1 + 1)
      [1.0]
      >>> opt_state.path_integral["w"].tolist()  # reset for the next task
      [0.0]

    References:
      Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.
    """
    damping = fail_if(damping, negative_or_non_finite(damping, "damping"))
    found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SIState))
    found = [leaf for leaf in found if isinstance(leaf, SIState)]
    if len(found) != 1:
        raise ValueError(
            f"state must contain exactly one si_path_integral state, found {len(found)}; "
            "build the optimiser as ewc_jax.importance.si_path_integral(inner)."
        )
    (si,) = found
    check_same_structure(si.start, params, "the SI state's start parameters", "params")

    def omega(w, p, s):
        delta = p.astype(w.dtype) - s.astype(w.dtype)
        return jnp.maximum(w, 0) / (jnp.square(delta) + jnp.asarray(damping, w.dtype))

    importance = jax.tree.map(omega, si.path_integral, params, si.start)
    reset = SIState(si.inner, jax.tree.map(jnp.zeros_like, si.path_integral), params)
    return importance, _replace_si(state, reset)


def _replace_si(state: optax.OptState, new: SIState) -> optax.OptState:
    return jax.tree.map(
        lambda x: new if isinstance(x, SIState) else x,
        state,
        is_leaf=lambda x: isinstance(x, SIState),
    )
