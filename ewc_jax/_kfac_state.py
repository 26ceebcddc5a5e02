r"""Kronecker-factored Laplace: a block-structured precision for Dense and convolution layers.

For a Dense layer ``z = a W + b`` (Flax layout: kernel ``W`` is ``[in, out]``) write the augmented
input ``ā = [a; 1]`` and kernel ``W̄ = [W; b]`` (``[in + 1, out]``), so ``z = ā W̄``. The
per-example gradient of ``log p(y | x)`` is ``ā δᵀ`` with ``δ = ∂ log p / ∂z``, and K-FAC
(Martens & Grosse 2015) approximates the layer's Fisher block by a Kronecker product of two
small expectations, as Ritter et al. (2018) do for the Laplace posterior:

.. math:: F_{\text{layer}} \approx A \otimes G,\qquad A = \mathbb{E}_n[ā_n ā_n^\top],\qquad
          G = \mathbb{E}_n \mathbb{E}_{y \sim q_n}[δ_n δ_n^\top]

(``vec`` row-major over ``[in + 1, out]``). The quadratic form needs no Kronecker product:

.. math:: \operatorname{vec}(X)^\top (A \otimes G) \operatorname{vec}(X)
          = \operatorname{tr}(X^\top A X G) = \textstyle\sum (X \odot A X G),

and its gradient is ``2 A X G`` (A, G symmetric). A convolution is the same with ``a`` an
input patch at each output position (Grosse & Martens 2016). Other parameters keep a diagonal
Fisher.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as _P

from ewc_jax._consolidation import EWCState, empty_state
from ewc_jax._engine.dtypes import widest
from ewc_jax._engine.kronecker import (
    augmented,
    kernel_rows,
    kronecker_axes,
    layer_specs,
    leaf_spec,
    pinned,
    quadratic_products,
    reshaped,
    sharding_of,
    stacked,
)
from ewc_jax._precision import ConsolidationMode, Curvature
from ewc_jax._types import Params
from ewc_jax._validation import (
    fail_if,
    non_finite,
    outside_unit_interval,
)
from ewc_jax._where import Where, check_where_given, select, selected_leaves


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "g"],
    meta_fields=["kernel", "bias", "kernel_axes"],
)
@dataclasses.dataclass(frozen=True)
class KroneckerFactors:
    """The Kronecker factors of one layer's Fisher block, ``A ⊗ G``.

    Attributes:
      a: ``[in + 1, in + 1]`` input factor ``E[ā āᵀ]`` (``[in, in]`` for a layer without bias;
        for a convolution ``in`` counts a patch: input channels × kernel positions).
      g: ``[out, out]`` output factor ``E[δ δᵀ]``.
      kernel: index of the kernel among ``jax.tree.leaves(params)`` (static).
      bias: index of the bias leaf, or None (static).
      kernel_axes: the kernel's axes in the order (input, spatial..., output): the rows of
        ``W̄`` are ``kernel.transpose(kernel_axes).reshape(-1, out)`` with ``out`` the size of
        ``g`` (static; ``(0, 1)`` for Dense, ``(2, 0, 1, 3)`` for a Flax ``Conv`` kernel
        ``[h, w, in, out]``; the identity for a kernel with several input or output axes,
        ``[H, Dh, D]`` or ``[D, H, Dh]``, whose ``in`` and ``out`` are then the products of
        those axes).

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]  # one Dense layer, two classes
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
      >>> fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact")
      >>> (layer,) = fisher.layers
      >>> layer.kernel, layer.bias, layer.kernel_axes  # leaves in tree order: b, w
      (1, 0, (0, 1))
      >>> layer.a.shape, layer.g.shape  # [in + 1, in + 1], [out, out]
      ((4, 4), (2, 2))
    """

    a: jax.Array
    g: jax.Array
    kernel: int
    bias: int | None
    kernel_axes: tuple[int, ...] = (0, 1)


class KFACFisher(NamedTuple):
    """A Kronecker-factored Fisher, from :func:`kfac_fisher`.

    Attributes:
      diagonal: params-shaped diagonal Fisher of the parameters no factor covers (0 where a
        factor does); with ``kfac_fisher(..., where=)`` the selected leaves only
        (``optax.MaskedNode()`` elsewhere).
      layers: one :class:`KroneckerFactors` per Dense layer (per selected kernel with
        ``where``).

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]  # one Dense layer, two classes
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
      >>> fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact")
      >>> len(fisher.layers), fisher.diagonal["w"].tolist()  # the layer's block covers w
      (1, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    """

    diagonal: Params
    layers: tuple[KroneckerFactors, ...]

    def empty_precision(self, params: Params, *, where: Where | None = None) -> KFACState:
        """The K-FAC state before any task: zero diagonal precision, no Kronecker terms yet;
        over the parameters ``where`` selects (:meth:`restricted`)."""
        leaves = jax.tree.leaves(params)
        return KFACState(
            diagonal=empty_state(params, where=where),
            layers=tuple(
                _empty_terms(leaves, factors) for factors in self.restricted(params, where).layers
            ),
        )

    def restricted(self, params: Params, where: Where | None) -> KFACFisher:
        """The factors and diagonal of the parameters ``where`` selects, as
        ``kfac_fisher(..., where=where)`` computes them (idempotent; ``None``: unchanged).

        A layer whose kernel is not selected is dropped; a selected kernel whose bias is not
        selected keeps the block of its own rows, ``A`` without the bias row and column.

        Raises:
          ValueError: a selected bias whose kernel is not selected: its Fisher is inside the
            dropped block, and this Fisher has no diagonal for it (``kfac_fisher(...,
            where=)`` computes one).

        Example:
          >>> import jax.numpy as jnp, ewc_jax
          >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]  # one Dense layer, two classes
          >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
          >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
          >>> fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x)
          >>> (kernel,) = fisher.restricted(params, {"w": True, "b": False}).layers
          >>> kernel.a.diagonal().tolist(), kernel.bias  # E[a²]: no bias row
          ([1.0, 2.0, 0.0], None)
        """
        if where is None:
            return self
        chosen = frozenset(selected_leaves(params, where))
        layers = []
        for factors in self.layers:
            if factors.kernel not in chosen:
                if factors.bias in chosen:
                    raise ValueError(
                        f"where selects the bias (leaf {factors.bias}) of a layer whose kernel "
                        f"(leaf {factors.kernel}) it does not select: the bias's Fisher is in "
                        "the layer's Kronecker block, and this Fisher has no diagonal for it; "
                        "compute it with kfac_fisher(..., where=) instead."
                    )
                continue
            if factors.bias is not None and factors.bias not in chosen:
                factors = dataclasses.replace(factors, a=factors.a[:-1, :-1], bias=None)
            layers.append(factors)
        return KFACFisher(select(self.diagonal, params, where), tuple(layers))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "g", "anchor"],
    meta_fields=["kernel", "bias", "kernel_axes"],
)
@dataclasses.dataclass(frozen=True)
class KroneckerTerms:
    """One Dense layer's consolidated quadratics, one per remembered task ``t``.

    Attributes:
      a: ``[T, in + 1, in + 1]`` input factors.
      g: ``[T, out, out]`` output factors.
      anchor: ``[T, in + 1, out]`` augmented kernels ``[W; b]`` each quadratic is centred on.
      kernel: index of the kernel leaf (static).
      bias: index of the bias leaf, or None (static).
      kernel_axes: as in :class:`KroneckerFactors` (static).

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]  # one Dense layer, two classes
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
      >>> fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact")
      >>> state = ewc_jax.consolidate(None, params, fisher, mode="online")
      >>> (terms,) = state.layers
      >>> terms.a.shape, terms.g.shape, terms.anchor.shape  # one task: T = 1
      ((1, 4, 4), (1, 2, 2), (1, 4, 2))
    """

    a: jax.Array
    g: jax.Array
    anchor: jax.Array
    kernel: int
    bias: int | None
    kernel_axes: tuple[int, ...] = (0, 1)


class KFACState(NamedTuple):
    """What K-FAC Laplace remembers: a diagonal EWC part and Kronecker terms per Dense layer.

    Accepted by :func:`consolidate`, :func:`penalty`, :func:`add_ewc_penalty` (via
    :func:`set_ewc_state`) wherever an :class:`EWCState` is.
    With sharded params its terms keep their kernel's layout, as :func:`kfac_fisher`'s
    factors do, and the penalty gathers no sharded kernel (see the sharding guide).

    With ``where`` (given to :func:`consolidate`, :func:`penalty` and :func:`add_ewc_penalty`
    alike) it covers the selected parameters only: Kronecker terms for the layers whose kernel
    is selected, the diagonal part over the selected leaves (``optax.MaskedNode()`` elsewhere,
    as an :class:`EWCState` with ``where``), and the penalty's terms over those alone.

    Attributes:
      diagonal: an :class:`EWCState` for the parameters no factor covers (zero precision at
        the covered ones); its ``num_tasks`` counts the consolidated tasks.
      layers: one :class:`KroneckerTerms` per Dense layer.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]  # one Dense layer, two classes
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
      >>> fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact")
      >>> state = ewc_jax.consolidate(None, params, fisher)
      >>> isinstance(state, ewc_jax.kfac.KFACState), isinstance(state, ewc_jax.Precision)
      (True, True)
      >>> moved = {"w": params["w"].at[1, 0].set(1.0), "b": params["b"]}
      >>> float(ewc_jax.penalty(moved, state, strength=2.0))  # ½ · 2 · A₁₁ G₀₀ = 2 · ¼
      0.5
    """

    diagonal: EWCState
    layers: tuple[KroneckerTerms, ...]

    @property
    def anchor(self) -> Params:
        """The latest parameters consolidated (the anchor of the diagonal part)."""
        return self.diagonal.anchor

    @property
    def num_tasks(self) -> jax.Array:
        """How many tasks have been consolidated."""
        return self.diagonal.num_tasks

    def consolidated(
        self,
        params: Params,
        importance: Params | Curvature,
        *,
        mode: ConsolidationMode,
        gamma: jax.typing.ArrayLike,
        where: Where | None = None,
        anchor_dtype: None = None,
        precision_dtype: None = None,
    ) -> KFACState:
        """One more Kronecker quadratic per layer: :func:`consolidate` for a K-FAC state.

        ``where`` restricts it as :class:`KFACState` says (the state must have been started
        with the same one); ``anchor_dtype`` and ``precision_dtype`` must be None: a K-FAC
        state keeps the dtype of its factors.
        """
        if anchor_dtype is not None or precision_dtype is not None:
            raise ValueError(
                "anchor_dtype= and precision_dtype= apply to a diagonal EWCState; a K-FAC state "
                "keeps the dtype of its factors."
            )
        return _consolidated(self, params, importance, mode=mode, gamma=gamma, where=where)

    def penalty(
        self, params: Params, strength: jax.typing.ArrayLike, *, where: Where | None = None
    ) -> jax.Array:
        r"""The diagonal part's penalty plus each layer's Kronecker quadratics:

        .. math:: \frac{λ}{2}\Big[\sum_i Λ_i (θ_i - θ̄_i)^2 + \sum_{\text{layers}} \sum_t
                  \operatorname{tr}\big(X_t^\top A_t X_t G_t\big)\Big],\qquad X_t = W̄ - W̄_t,

        each :math:`\operatorname{vec}(X_t)^\top (A_t ⊗ G_t) \operatorname{vec}(X_t)` computed
        as ``Σ X ⊙ (A X G)`` (two matmuls, never the Kronecker product); ``i`` and the layers
        run over what ``where`` selects (the ``where`` the state was consolidated with).
        """
        return _penalty(params, self, strength, where)

    def penalty_gradient(
        self, params: Params, strength: jax.typing.ArrayLike, *, where: Where | None = None
    ) -> Params:
        r"""The gradient of :meth:`penalty`: :math:`λ Λ (θ - θ̄)` on the diagonal part and
        :math:`λ \sum_t A_t X_t G_t` on each augmented kernel ``[W; b]``; with ``where``, a
        tree of the selected leaves only (``optax.MaskedNode()`` elsewhere)."""
        return _penalty_gradient(params, self, strength, where)


def _consolidated(
    state: KFACState,
    params: Params,
    fisher: Params | Curvature,
    *,
    mode: ConsolidationMode,
    gamma: jax.typing.ArrayLike,
    where: Where | None,
) -> KFACState:
    r""":func:`consolidate` for a :class:`KFACFisher`: one more Kronecker quadratic per layer.

    The sum of two Kronecker products is not a Kronecker product, so no sum is approximated:
    every task's factors are kept (memory and penalty cost grow linearly with the number of
    tasks; each new task changes the state's shapes, so a jitted step compiles once per task).

    * ``mode="separate"`` (Kirkpatrick et al.'s sum of per-task penalties): task ``t`` keeps
      its own anchor, :math:`\sum_t \operatorname{vec}(W̄ - W̄_t)^\top (A_t ⊗ G_t)
      \operatorname{vec}(W̄ - W̄_t)`.
    * ``mode="online"`` (Ritter et al.'s online Laplace: the precision after task t is
      :math:`Λ_t = H_t + γ Λ_{t-1}` centred on the latest parameters): every term is
      re-anchored at ``params`` and the old factors ``A`` are scaled by ``γ``
      (:math:`γ (A ⊗ G) = (γ A) ⊗ G`).

    The diagonal part follows :func:`consolidate` with the same mode, ``gamma`` and ``where``;
    a full ``fisher`` is restricted to ``where`` first (:meth:`KFACFisher.restricted`).
    """
    if not isinstance(fisher, KFACFisher):
        raise ValueError("a KFACState is consolidated with a KFACFisher (from kfac_fisher).")
    gamma = fail_if(gamma, outside_unit_interval(gamma, "gamma"))
    check_where_given(fisher.diagonal, "fisher", where, params)
    fisher = fisher.restricted(params, where)
    diagonal = state.diagonal.consolidated(
        params, fisher.diagonal, mode=mode, gamma=gamma, where=where
    )
    leaves = jax.tree.leaves(params)
    why = "consolidating them would make every later penalty non-finite"
    checked = []
    for layer in fisher.layers:
        a, g = fail_if(
            (layer.a, layer.g), non_finite((layer.a, layer.g), "the Kronecker factors", why)
        )
        checked.append(dataclasses.replace(layer, a=a, g=g))
    fisher = fisher._replace(layers=tuple(checked))
    old = state.layers
    if [(t.kernel, t.bias) for t in old] != [(f.kernel, f.bias) for f in fisher.layers]:
        raise ValueError(
            "the Kronecker factors do not cover the same layers as the state "
            f"({[(t.kernel, t.bias) for t in old]} vs "
            f"{[(f.kernel, f.bias) for f in fisher.layers]}); compute them for the same model "
            "and consolidate with the same where= as the state's."
        )
    layers = []
    for terms, factors in zip(old, fisher.layers, strict=True):
        dtype = terms.a.dtype
        like, (a_spec, g_spec, anchor_spec) = layer_specs(
            leaves[factors.kernel],
            factors.kernel_axes,
            factors.g.shape[-1],
            factors.bias is not None,
        )
        anchor = augmented(leaves, factors, terms.anchor.dtype)
        a_old, anchor_old = terms.a, terms.anchor
        if mode == "online":
            a_old = jnp.asarray(gamma, dtype) * a_old
            anchor_old = jnp.broadcast_to(anchor, anchor_old.shape)
        layers.append(
            KroneckerTerms(
                a=stacked(a_old, factors.a.astype(dtype), a_spec, like),
                g=stacked(terms.g, factors.g.astype(dtype), g_spec, like),
                anchor=stacked(anchor_old, anchor, anchor_spec, like),
                kernel=factors.kernel,
                bias=factors.bias,
                kernel_axes=factors.kernel_axes,
            )
        )
    return KFACState(diagonal=diagonal, layers=tuple(layers))


def _empty_terms(leaves: list[Any], factors: KroneckerFactors) -> KroneckerTerms:
    dtype = widest(factors.a, factors.g, leaves[factors.kernel])
    anchor = augmented(leaves, factors, widest(leaves[factors.kernel]))
    like, specs = layer_specs(
        leaves[factors.kernel], factors.kernel_axes, factors.g.shape[-1], factors.bias is not None
    )
    empty = [
        pinned(jnp.zeros((0, *shape), d), _P(None, *spec), like)
        for shape, d, spec in zip(
            (factors.a.shape, factors.g.shape, anchor.shape),
            (dtype, dtype, anchor.dtype),
            specs,
            strict=True,
        )
    ]
    return KroneckerTerms(
        *empty, kernel=factors.kernel, bias=factors.bias, kernel_axes=factors.kernel_axes
    )


def _penalty(
    params: Params, state: KFACState, strength: jax.typing.ArrayLike, where: Where | None
) -> jax.Array:
    r""":func:`penalty` for a :class:`KFACState`:

    .. math:: \frac{λ}{2}\Big[\sum_i Λ_i (θ_i - θ̄_i)^2 + \sum_{\text{layers}} \sum_t
              \operatorname{tr}\big(X_t^\top A_t X_t G_t\big)\Big],\qquad X_t = W̄ - W̄_t,

    the diagonal part plus, per Dense layer and remembered task, the Kronecker quadratic
    :math:`\operatorname{vec}(X_t)^\top (A_t ⊗ G_t) \operatorname{vec}(X_t)` computed as
    ``Σ X ⊙ (A X G)`` (two matmuls, never the Kronecker product; see :func:`_products`).
    The diagonal part runs over the leaves ``where`` selects; the layers' kernel and bias
    indices count the leaves of the whole ``params``.
    """
    total = state.diagonal.penalty(params, strength, where=where)
    leaves = jax.tree.leaves(params)
    for terms in state.layers:
        quad, _, _ = _products(leaves, terms)
        total = total + (jnp.asarray(0.5 * strength, terms.a.dtype) * quad).astype(total.dtype)
    return total


def _products(
    leaves: list[Any], terms: KroneckerTerms
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(Σ_t tr(X_tᵀ A_t X_t G_t), Σ_t A_t X_t G_t`` on the kernel rows and on the bias row or
    None)``, laid out like the kernel
    (:func:`~ewc_jax._engine.kronecker.quadratic_products`)."""
    dtype = terms.a.dtype
    kernel = leaves[terms.kernel]
    out = terms.g.shape[-1]
    like = sharding_of(kernel)
    axes = (
        (None, None) if like is None else kronecker_axes(like, kernel.shape, terms.kernel_axes, out)
    )
    w = kernel_rows(leaves, terms, dtype, axes, like)
    b = None
    if terms.bias is not None:
        b = reshaped(leaves[terms.bias].astype(dtype), (1, out), (None, axes[1]), like)
    return quadratic_products(w, b, terms.a, terms.g, terms.anchor, like, axes)


def _penalty_gradient(
    params: Params, state: KFACState, strength: jax.typing.ArrayLike, where: Where | None
) -> Params:
    r"""The gradient of ``_penalty``: :math:`λ Λ (θ - θ̄)` for the diagonal part and
    :math:`λ \sum_t A_t X_t G_t` for each augmented kernel ``[W; b]`` (its kernel rows and
    bias row from :func:`_products`, each in its parameter's layout). Leaves are in float32 at
    least; with ``where``, the selected ones only."""
    ewc = state.diagonal
    check_where_given(ewc.anchor, "state", where, params)
    grads = jax.tree.map(
        lambda p, a, f: (
            jnp.asarray(strength, f.dtype) * f * (p.astype(f.dtype) - a.astype(f.dtype))
        ),
        select(params, params, where),
        ewc.anchor,
        ewc.precision,
    )
    leaves = jax.tree.leaves(params)
    grad_leaves, treedef = jax.tree.flatten(grads)
    # The terms index the leaves of the whole params; the gradient holds the selected ones.
    position = {leaf: k for k, leaf in enumerate(selected_leaves(params, where))}
    for terms in state.layers:
        _, rows_grad, bias_grad = _products(leaves, terms)
        scale = jnp.asarray(strength, terms.a.dtype)
        kernel, axes = leaves[terms.kernel], terms.kernel_axes
        spec = leaf_spec(kernel)
        kernel_grad = reshaped(
            scale * rows_grad,
            tuple(kernel.shape[a] for a in axes),
            tuple(spec[a] for a in axes),
            sharding_of(kernel),
        )
        kernel_grad = jnp.transpose(
            kernel_grad, tuple(int(i) for i in np.argsort(terms.kernel_axes))
        )
        k = position[terms.kernel]
        grad_leaves[k] = grad_leaves[k] + kernel_grad.astype(grad_leaves[k].dtype)
        if bias_grad is not None:
            bias = leaves[terms.bias]
            bias_grad = reshaped(scale * bias_grad, bias.shape, leaf_spec(bias), sharding_of(bias))
            b = position[terms.bias]
            grad_leaves[b] = grad_leaves[b] + bias_grad.astype(grad_leaves[b].dtype)
    return jax.tree.unflatten(treedef, grad_leaves)
