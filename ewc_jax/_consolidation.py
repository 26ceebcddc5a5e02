"""Consolidation state and the EWC penalty.

After task ``k`` the posterior over parameters is approximated by a Gaussian centred on the
trained parameters ``θ*_k`` with diagonal precision ``F_k`` (the Fisher). Everything EWC needs
to remember is therefore one anchor and one precision per parameter, kept in :class:`EWCState`.
"""

from __future__ import annotations

from typing import NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._engine.dtypes import widest
from ewc_jax._precision import ConsolidationMode, Curvature, Precision, PrecisionT, check_state
from ewc_jax._types import Params
from ewc_jax._validation import (
    check_same_devices,
    check_same_structure,
    fail_if,
    holds,
    negative_or_non_finite,
    non_finite,
    outside_unit_interval,
)
from ewc_jax._where import Where, check_where_given, select

CONSOLIDATION_MODES: tuple[ConsolidationMode, ...] = get_args(ConsolidationMode)


class EWCState(NamedTuple):
    r"""What EWC remembers about past tasks: a pytree, passed to jitted code as an argument.

    The diagonal :class:`Precision`: the penalty is :math:`\frac{λ}{2} \sum_i Λ_i (θ_i - θ̄_i)^2`.

    Attributes:
      anchor: params-shaped tree, the centre ``θ̄`` of the quadratic penalty.
      precision: params-shaped tree, the diagonal precision ``Λ`` (summed or decayed Fishers).
      num_tasks: int32 scalar, how many tasks have been consolidated.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> state = ewc_jax.EWCState(
      ...     anchor={"w": jnp.zeros(2)}, precision={"w": jnp.array([1.0, 3.0])},
      ...     num_tasks=jnp.ones((), jnp.int32))
      >>> float(ewc_jax.penalty({"w": jnp.ones(2)}, state, strength=1.0))  # (1 + 3) / 2
      2.0
    """

    anchor: Params
    precision: Params
    num_tasks: jax.Array

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
    ) -> EWCState:
        """The state with one more task folded in: :func:`consolidate` for a diagonal state."""
        return _consolidated(
            self,
            params,
            importance,
            mode=mode,
            gamma=gamma,
            where=where,
            anchor_dtype=anchor_dtype,
            precision_dtype=precision_dtype,
        )

    def penalty(
        self, params: Params, strength: jax.typing.ArrayLike, *, where: Where | None = None
    ) -> jax.Array:
        r""":math:`\frac{λ}{2} \sum_i Λ_i (θ_i - θ̄_i)^2` over the leaves ``where`` selects."""
        check_where_given(self.anchor, "state", where, params)
        params = select(params, params, where)
        check_same_structure(self.anchor, params, "state.anchor", "params")
        terms = jax.tree.leaves(
            jax.tree.map(
                lambda p, a, f: jnp.sum(
                    f.astype(widest(p, f))
                    * jnp.square(p.astype(widest(p, f)) - a.astype(widest(p, f)))
                ),
                params,
                self.anchor,
                self.precision,
            )
        )
        dtype = widest(*terms)
        total = sum((t.astype(dtype) for t in terms), start=jnp.zeros((), dtype))
        return jnp.asarray(0.5 * strength, dtype) * total

    def penalty_gradient(
        self, params: Params, strength: jax.typing.ArrayLike, *, where: Where | None = None
    ) -> Params:
        r""":math:`λ Λ (θ - θ̄)` over the leaves ``where`` selects, in float32 at least.

        bfloat16 params, anchors or precisions are widened before the subtraction.
        """
        check_where_given(self.anchor, "state", where, params)
        return jax.tree.map(
            lambda p, a, f: (
                jnp.asarray(strength, widest(p, a, f))
                * f.astype(widest(p, a, f))
                * (p.astype(widest(p, a, f)) - a.astype(widest(p, a, f)))
            ),
            select(params, params, where),
            self.anchor,
            self.precision,
        )


def empty_state(
    params: Params,
    *,
    where: Where | None = None,
    anchor_dtype: jax.typing.DTypeLike | None = None,
    precision_dtype: jax.typing.DTypeLike | None = None,
) -> EWCState:
    """The state before any task: zero precision, so the penalty is zero everywhere.

    Lets a jitted train step take an ``EWCState`` argument from the first task on, so that
    consolidating later changes only values, never the traced program.

    Args:
      params: the model parameters (defines the tree structure, shapes and dtypes).
      where: the parameters EWC covers (see :func:`consolidate`); ``None``: all.
      anchor_dtype: storage dtype of the anchor; default: each parameter's own.
      precision_dtype: storage dtype of the precision; default: float32 at least.

    Returns:
      ``EWCState(anchor=params, precision=zeros_like(params), num_tasks=0)``, both restricted
      to ``where``. Sharded params give a state sharded the same way.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> state = ewc_jax.empty_state({"w": jnp.ones(2, jnp.bfloat16)})
      >>> state.precision["w"].dtype, int(state.num_tasks)  # float32 at least
      (dtype('float32'), 0)
      >>> float(ewc_jax.penalty({"w": jnp.zeros(2)}, state, strength=1e6))
      0.0
    """
    params = select(params, params, where)
    return EWCState(
        anchor=_stored(params, anchor_dtype),
        precision=jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=precision_dtype or widest(p)), params
        ),
        num_tasks=jnp.zeros((), jnp.int32),
    )


def _stored(tree: Params, dtype: jax.typing.DTypeLike | None) -> Params:
    """``tree`` cast to the storage ``dtype`` (``None``: unchanged)."""
    if dtype is None:
        return tree
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"a storage dtype must be floating-point, got {np.dtype(dtype)}.")
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def consolidate(
    state: PrecisionT | None,
    params: Params,
    fisher: Params | Curvature,
    *,
    mode: ConsolidationMode = "separate",
    gamma: jax.typing.ArrayLike = 1.0,
    where: Where | None = None,
    anchor_dtype: jax.typing.DTypeLike | None = None,
    precision_dtype: jax.typing.DTypeLike | None = None,
) -> PrecisionT:
    r"""Folds a finished task's parameters and Fisher into the EWC state.

    ``mode="separate"`` (Kirkpatrick et al. 2017) keeps one quadratic per past task,
    :math:`\sum_k F_k (θ - θ_k)^2`. That sum is itself one quadratic,

    .. math:: \sum_k F_k (θ - θ_k)^2 = Λ (θ - θ̄)^2 + \text{const},\quad
              Λ = \sum_k F_k,\quad θ̄ = \frac{\sum_k F_k θ_k}{\sum_k F_k},

    so it is stored in O(1) memory, with the same gradient as the explicit per-task sum. Where
    ``Λ = 0`` the anchor is the latest ``params`` (the penalty does not depend on it there).

    ``mode="online"`` (Schwarz et al. 2018, online EWC): :math:`Λ \leftarrow γ Λ + F`,
    :math:`θ̄ \leftarrow θ`.

    Any params-shaped non-negative importance takes the place of the Fisher: MAS
    (:func:`mas_importance`), SI (:func:`si_importance`, with ``mode="online", gamma=1`` as
    its authors sum importances), or a unit precision ``jax.tree.map(jnp.ones_like, params)``
    for plain L2 towards the previous parameters.

    A :class:`ewc_jax.kfac.KFACFisher` (from :func:`ewc_jax.kfac.kfac_fisher`) with a
    :class:`ewc_jax.kfac.KFACState` or None gives a ``KFACState``: every state type is a
    :class:`Precision` and folds the new task in by its own rule.

    Args:
      state: the state so far (any :class:`Precision`), or None before the first task.
      params: parameters at the end of the task just finished (``θ*``).
      fisher: its diagonal Fisher, same tree as ``params`` (see :func:`fisher_diagonal`).
      mode: ``"separate"`` or ``"online"``.
      gamma: decay of the old precision in online mode, in [0, 1]; must be 1 in separate mode.
      where: the parameters EWC covers, as ``optax.masked`` takes it: a pytree of bools with
        the structure of ``params`` or a prefix of it, or a callable returning one (e.g. only a
        LoRA fine-tune's adapters, or everything but the embeddings). The state then holds
        anchors and precisions for those leaves only (``optax.MaskedNode()`` elsewhere);
        ``fisher`` may be full or already restricted (``fisher_diagonal(..., where=...)``).
        A K-FAC state takes it too: Kronecker terms for the selected kernels only
        (``kfac_fisher(..., where=...)`` computes no others). ``None`` (default): all.
      anchor_dtype: storage dtype of the anchor, e.g. ``jnp.bfloat16`` to halve its memory;
        default: each parameter's own dtype. The merge and the penalty run in float32 at
        least whatever is stored.
      precision_dtype: storage dtype of the precision; default: float32 at least. bfloat16
        (on request) keeps about 3 significant digits: each parameter's weight in the penalty
        is then off by up to 0.4%.

    Returns:
      The new state, of the type of ``state`` (an ``EWCState`` for a diagonal Fisher and
      ``state=None``); sharded params and Fisher give a state sharded the same way.

    Raises:
      ValueError: unknown mode, gamma outside [0, 1] (or not 1 in separate mode), trees that
        differ (the message names the first differing path), or NaN/Inf/negative values in
        ``params`` or ``fisher`` (naming the first bad leaf). The value checks hold under
        ``jax.jit`` and ``jax.vmap`` too: the compiled program fails with the same message
        (``equinox.error_if``; see :func:`ewc_jax.checks_enabled`).

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> a = ewc_jax.consolidate(None, {"w": jnp.array([0.0])}, {"w": jnp.array([1.0])})
      >>> b = ewc_jax.consolidate(a, {"w": jnp.array([4.0])}, {"w": jnp.array([3.0])})
      >>> b.anchor["w"].tolist(), b.precision["w"].tolist()  # (1·0 + 3·4) / (1 + 3), 1 + 3
      ([3.0], [4.0])

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
      Schwarz et al., "Progress & Compress: A scalable framework for continual learning",
      ICML 2018.
    """
    if mode not in CONSOLIDATION_MODES:
        raise ValueError(
            f"Unknown consolidation mode {mode!r}; valid modes: {CONSOLIDATION_MODES}."
        )
    if state is not None:
        check_state(state, "consolidate")
    if state is None:
        if isinstance(fisher, Curvature):
            state = fisher.empty_precision(params, where=where)
        else:
            state = empty_state(
                params, where=where, anchor_dtype=anchor_dtype, precision_dtype=precision_dtype
            )
    return state.consolidated(
        params,
        fisher,
        mode=mode,
        gamma=gamma,
        where=where,
        anchor_dtype=anchor_dtype,
        precision_dtype=precision_dtype,
    )


def _consolidated(
    state: EWCState,
    params: Params,
    fisher: Params | Curvature,
    *,
    mode: ConsolidationMode,
    gamma: jax.typing.ArrayLike,
    where: Where | None,
    anchor_dtype: jax.typing.DTypeLike | None,
    precision_dtype: jax.typing.DTypeLike | None,
) -> EWCState:
    """:func:`consolidate` into a diagonal state: the checks, then the merge of one task."""
    if isinstance(fisher, Curvature):
        raise ValueError(
            f"state is an EWCState but fisher is a {type(fisher).__name__}, which consolidates "
            "into its own state type; start its consolidation from state=None."
        )
    check_where_given(state.anchor, "state", where, params)
    check_where_given(fisher, "fisher", where, params)
    failures = outside_unit_interval(gamma, "gamma")
    if mode == "separate":
        failures.append(
            (
                holds(lambda g: g != 1, gamma),
                "gamma must be 1 in mode='separate' (every task keeps its full penalty; "
                "mode='online' decays it)",
                lambda: f", got {gamma!r}.",
            )
        )
    params = select(params, params, where)
    fisher = select(fisher, fisher, where)
    check_same_structure(params, fisher, "params", "fisher")
    check_same_structure(params, state.anchor, "params", "state.anchor")
    check_same_structure(params, state.precision, "params", "state.precision")
    check_same_devices(params, fisher, "params", "fisher")
    check_same_devices(params, state.anchor, "params", "state.anchor")
    why = (
        "consolidating them would make every later penalty non-finite; check the training run "
        "that produced them"
    )
    failures += non_finite(params, "params", why) + non_finite(fisher, "fisher", why)
    for path, leaf in jax.tree_util.tree_flatten_with_path(fisher)[0]:
        failures.append(
            (
                holds(lambda a: jnp.any(a < 0), leaf),
                f"fisher has negative values at {jax.tree_util.keystr(path)}; a diagonal Fisher "
                "is a mean of squares and cannot be negative",
                lambda: ".",
            )
        )
    # Concrete values are checked now; traced ones on the result (see fail_if).
    fail_if(fisher, failures)

    if mode == "separate":
        precision = jax.tree.map(
            lambda p, f: p.astype(widest(p, f)) + f.astype(widest(p, f)), state.precision, fisher
        )
        anchor = jax.tree.map(
            _precision_weighted_mean, precision, state.precision, state.anchor, fisher, params
        )
    else:
        anchor = params
        precision = jax.tree.map(
            lambda p, f: (
                jnp.asarray(gamma, widest(p, f)) * p.astype(widest(p, f)) + f.astype(widest(p, f))
            ),
            state.precision,
            fisher,
        )
    if anchor_dtype is None:
        # Keep the storage dtype of the state passed in (a bfloat16 anchor stays bfloat16).
        anchor = jax.tree.map(lambda new, old: new.astype(old.dtype), anchor, state.anchor)
    if precision_dtype is None:
        # Likewise a precision stored narrower than float32 on request.
        precision = jax.tree.map(
            lambda new, old: new.astype(old.dtype) if old.dtype.itemsize < 4 else new,
            precision,
            state.precision,
        )
    precision = fail_if(precision, failures)
    return EWCState(
        anchor=_stored(anchor, anchor_dtype),
        precision=_stored(precision, precision_dtype),
        num_tasks=state.num_tasks + 1,
    )


def _precision_weighted_mean(total, old_precision, old_anchor, fisher, theta):
    """``(Λ_old θ̄_old + F θ) / (Λ_old + F)``, or ``θ`` where the total precision is zero."""
    dtype = total.dtype
    positive = total > 0
    safe_total = jnp.where(positive, total, jnp.ones_like(total))
    merged = (
        old_precision.astype(dtype) * old_anchor.astype(dtype)
        + fisher.astype(dtype) * theta.astype(dtype)
    ) / safe_total
    # Where nothing was consolidated before, the anchor is exactly θ (no rounding).
    return jnp.where(positive & (old_precision > 0), merged.astype(theta.dtype), theta)


def penalty(
    params: Params,
    state: Precision,
    strength: jax.typing.ArrayLike,
    *,
    where: Where | None = None,
) -> jax.Array:
    r"""The EWC penalty :math:`\frac{λ}{2} \sum_i Λ_i (θ_i - θ̄_i)^2`.

    Add it to the loss of the current task: :math:`L(θ) = L_B(θ) + \frac{λ}{2}\sum_i
    F_i (θ_i - θ^*_{A,i})^2`. Its gradient is :math:`λ Λ (θ - θ̄)`.

    Any :class:`Precision` brings its own quadratic: with a :class:`ewc_jax.kfac.KFACState` the
    Kronecker quadratics of its layers are added to the diagonal part.

    The ½ is the paper's convention. The PyTorch tutorial this project started from writes
    ``importance * Σ F (θ - θ*)²`` without the ½: its ``importance=1000`` is ``strength=2000`` here.

    Args:
      params: current parameters θ.
      state: an :class:`EWCState` from :func:`consolidate` or :func:`empty_state` (or another
        :class:`Precision`); pass it as an argument of jitted code, never close over it.
      strength: λ >= 0 (a Python float or a scalar array). A negative or non-finite λ raises
        ``ValueError``; a traced one fails the compiled program with the same message.
      where: the parameters the state covers, as given to :func:`consolidate`; the sum runs
        over those only, so the penalty's gradient is zero on the others. ``None``: all.

    Returns:
      A float32 (or wider) scalar, whatever the storage dtypes of the state (bfloat16 anchors
      and precisions are widened before the subtraction).

    Example:
      >>> import jax, jax.numpy as jnp, ewc_jax
      >>> state = ewc_jax.consolidate(None, {"w": jnp.array([1.0])}, {"w": jnp.array([2.0])})
      >>> float(ewc_jax.penalty({"w": jnp.array([4.0])}, state, strength=1.0))  # ½·2·3²
      9.0
      >>> jax.grad(ewc_jax.penalty)({"w": jnp.array([4.0])}, state, 1.0)["w"].tolist()  # 2·3
      [6.0]

    References:
      Kirkpatrick et al., PNAS 2017, Eq. 3.
    """
    check_state(state, "penalty")
    failures = negative_or_non_finite(strength, "strength")
    return fail_if(state.penalty(params, strength, where=where), failures)
