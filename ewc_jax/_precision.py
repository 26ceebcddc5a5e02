r"""The protocol every consolidated precision follows, so that the core never names its types.

EWC remembers a Gaussian prior :math:`\mathcal N(θ̄, (λ Λ)^{-1})` over the parameters; its negative
log density (up to a constant) is the penalty :math:`\frac{λ}{2} (θ - θ̄)^\top Λ (θ - θ̄)`. How
:math:`Λ` is stored differs: a diagonal (:class:`ewc_jax.EWCState`), Kronecker blocks per layer
(:class:`ewc_jax.kfac.KFACState`), or a later structure. Each state type brings its own fold of a
new task, penalty and penalty gradient, and :func:`ewc_jax.consolidate`, :func:`ewc_jax.penalty`,
:func:`ewc_jax.add_ewc_penalty` and :func:`ewc_jax.set_ewc_state` call those methods: no
``isinstance`` chain on state types, and the core imports no structured precision.

A structured Fisher (one that is not a params-shaped tree, like
:class:`ewc_jax.kfac.KFACFisher`) says which state it starts with (:class:`Curvature`), so that
``consolidate(None, params, fisher)`` needs no type switch either.
"""

from __future__ import annotations

from typing import Literal, Protocol, Self, TypeAlias, TypeVar, runtime_checkable

import jax

from ewc_jax._types import Params
from ewc_jax._where import Where

ConsolidationMode: TypeAlias = Literal["separate", "online"]
"""How :func:`ewc_jax.consolidate` combines tasks: ``"separate"`` (a sum of per-task quadratics,
Kirkpatrick et al. 2017) or ``"online"`` (decay and re-anchor, Schwarz et al. 2018)."""


@runtime_checkable
class Precision(Protocol):
    r"""A consolidated quadratic prior :math:`\frac{λ}{2}(θ - θ̄)^\top Λ (θ - θ̄)` over the params.

    What :func:`consolidate` returns and :func:`penalty` and :func:`add_ewc_penalty` take:
    :class:`EWCState` (diagonal :math:`Λ`) and :class:`ewc_jax.kfac.KFACState` (Kronecker
    blocks) implement it, and so can a new structure without any change to those functions.
    An implementation is a pytree (passed to jitted code as an argument) with:

    * ``anchor``: the params-shaped tree of the latest anchor (``set_ewc_state`` checks that
      the optimiser's and the new state's anchors have one structure);
    * ``num_tasks``: how many tasks have been folded in;
    * ``consolidated(params, importance, ...)``: the state with one more task folded in;
    * ``penalty(params, strength, ...)``: :math:`\frac{λ}{2}(θ - θ̄)^\top Λ (θ - θ̄)`;
    * ``penalty_gradient(params, strength, ...)``: its gradient :math:`λ Λ (θ - θ̄)`.

    The public functions check ``mode`` and ``strength``; the methods compute.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> state = ewc_jax.consolidate(None, params, {"w": jnp.array([4.0, 0.0])})
      >>> isinstance(state, ewc_jax.Precision)
      True
      >>> moved = {"w": jnp.array([1.5, 3.0])}
      >>> float(state.penalty(moved, 2.0))  # (2/2) * 4 * 0.5², the second weight is free
      1.0
      >>> state.penalty_gradient(moved, 2.0)["w"].tolist()  # 2 * 4 * 0.5
      [4.0, 0.0]
    """

    @property
    def anchor(self) -> Params:
        """The params-shaped centre θ̄ of the latest quadratic."""
        ...

    @property
    def num_tasks(self) -> jax.Array:
        """How many tasks have been consolidated (an int32 scalar)."""
        ...

    def consolidated(
        self,
        params: Params,
        importance: Params | Curvature,
        *,
        mode: ConsolidationMode,
        gamma: jax.typing.ArrayLike,
        where: Where | None = None,
        anchor_dtype: jax.typing.DTypeLike | None = None,
        precision_dtype: jax.typing.DTypeLike | None = None,
    ) -> Self:
        """The state with the task that ended at ``params`` folded in (see :func:`consolidate`)."""
        ...

    def penalty(
        self, params: Params, strength: jax.typing.ArrayLike, *, where: Where | None = None
    ) -> jax.Array:
        r""":math:`\frac{λ}{2}(θ - θ̄)^\top Λ (θ - θ̄)` at ``params`` (see :func:`penalty`)."""
        ...

    def penalty_gradient(
        self, params: Params, strength: jax.typing.ArrayLike, *, where: Where | None = None
    ) -> Params:
        r""":math:`λ Λ (θ - θ̄)`, over the parameters ``where`` selects (all for ``None``)."""
        ...


def check_state(state: object, function: str) -> None:
    """Raises TypeError unless ``state`` is a :class:`Precision` (None before the first task
    gets its own message: what to build instead)."""
    if state is None:
        raise TypeError(
            f"state is None: {function} needs a consolidated state; build it with "
            "ewc_jax.consolidate(None, params, fisher) after the first task, or "
            "ewc_jax.empty_state(params) before it."
        )
    if not isinstance(state, Precision):
        raise TypeError(
            f"state must be an ewc_jax.EWCState (or another ewc_jax.Precision, such as a "
            f"ewc_jax.kfac.KFACState) from ewc_jax.consolidate, got {type(state).__name__}."
        )


@runtime_checkable
class Curvature(Protocol):
    """A structured Fisher (not a params-shaped tree) that starts its own kind of state."""

    def empty_precision(self, params: Params, *, where: Where | None = None) -> Precision:
        """The state before any task, of the type this curvature consolidates into, over the
        parameters ``where`` selects (all for ``None``)."""
        ...


PrecisionT = TypeVar("PrecisionT", bound=Precision)
"""The type of a state that :func:`ewc_jax.consolidate` returns: the type of the one passed in."""
