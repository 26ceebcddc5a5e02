r"""The one-pass diagonal Fisher: squared per-example gradients from layer inputs and ``δ``.

For a tapped layer ``z_n = a_n W`` the per-example gradient is ``a_n ⊗ δ_n``, so

.. math:: \sum_n w_n\, g_n^2 = (a^2)^\top (w \odot δ^2)

is the layer's own contraction applied to squares: one matrix product per layer, no
per-example gradient formed. A layer with several terms per example (a convolution, a Dense
layer over a sequence) forms that one layer's per-example gradients instead (from image patches
for a convolution kernel). See :mod:`ewc_jax._engine.plan` for how layers are found.

:class:`SquareSums` adds these up one label's backward pass at a time, so that another
estimator's pass (K-FAC's factors) can carry the diagonal of the leaves it does not factor.

A leaf the plan cannot tap (an embedding's gather, a table tied to the output projection,
positions added by broadcasting, a leaf used twice) is perturbed per example instead: each
example sees the leaf plus its own zero, so the same backward pass returns that leaf's
per-example gradients ``g_n`` (what ``vmap(grad)`` gives, without a second forward and
backward), and ``Σ_n w_n g_n²`` is a dot with the weights.

MAS's importance takes the same pass with the absolute value in place of the square:
``|a_n ⊗ δ_n| = |a_n| ⊗ |δ_n|`` as ``(a_n ⊗ δ_n)² = a_n² ⊗ δ_n²``, so
``Σ_n w_n |g_n| = |a|ᵀ (w ⊙ |δ|)`` (:class:`SquareSums`' ``elementwise``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._engine.dtypes import accumulate_dtype
from ewc_jax._engine.plan import Plan, Tap, consume, through_layout
from ewc_jax._engine.tapped import (
    Recorded,
    conv_kernel_grads,
    conv_patches,
    expand,
    patch_conv,
    stack_examples,
    stacked_axes,
    tapped_vjp,
)
from ewc_jax._engine.targets import sum_over_labels

Targets = Callable[[jax.Array], tuple[int, Callable[[jax.Array], tuple[jax.Array, jax.Array]]]]
"""Maps the logits ``[B, ..., C]`` to ``(K, target)``; ``target(k)`` gives the gradient of the
log-likelihood at the logits for the k-th label of every example (``[B, ..., C]``) and the weight
of that (label, example) term (``[B]``)."""


def tapped_sums(
    plan: Plan,
    param_leaves: Sequence[Any],
    example_leaves: Sequence[Any],
    targets: Targets,
) -> tuple[dict[int, jax.Array], jax.Array]:
    """``Σ_k Σ_n w_kn g_kn²`` for every leaf of the plan, from one forward and K backward passes.

    The tapped leaves from their layers' ``a`` and ``δ``; the leaves the plan cannot tap
    (``plan.fallback``: an embedding's gather, a tied embedding, a leaf used twice) from their
    per-example gradients, which the same backward pass returns
    (:func:`~ewc_jax._engine.tapped.tapped_vjp`'s ``per_example``): no second pass.

    Args:
      plan: from :func:`~ewc_jax._engine.plan.make_plan`.
      param_leaves: parameter leaves (unbatched).
      example_leaves: input leaves with a leading chunk axis ``B``.
      targets: the labels to differentiate (:data:`Targets`).

    Returns:
      ``({leaf index: params-leaf-shaped sum}, logits)``.
    """
    logits, pullback, recorded = tapped_vjp(
        plan, param_leaves, example_leaves, plan.perturbed_nodes, plan.fallback
    )
    num_labels, target = targets(logits)
    squares = SquareSums.of(plan, param_leaves, recorded, logits.shape[0], plan.fallback)

    def add_label(totals, k):
        # One backward pass for one label per example (K passes for the exact Fisher, one
        # after another, so memory does not grow with the number of labels).
        cotangent, w = target(k)
        return squares.add(totals, *pullback(cotangent.astype(logits.dtype)), w), None

    return squares.finish(sum_over_labels(add_label, squares.zero(), num_labels)), logits


@dataclasses.dataclass(frozen=True)
class SquareSums:
    """``Σ_k Σ_n w_kn g_kn²`` of a chunk, added up one label's backward pass at a time.

    For the leaves a plan taps (:func:`tapped_sums`, and K-FAC's pass for the leaves without a
    Kronecker block, which shares the forward, labels and backward of its factors) and, with
    ``per_example``, for leaves whose per-example gradients the pullback returns (perturbed by
    :func:`~ewc_jax._engine.tapped.tapped_vjp`'s ``per_example``: a leaf the plan cannot tap,
    such as an embedding). Per label, :meth:`add` takes that pass's ``δ`` at the tapped nodes
    and those gradients; :meth:`finish` turns the totals into sums per leaf. ``elementwise`` is
    the square (the Fisher) or, for MAS's ``Σ_n w_n |g_n|``, the absolute value: either maps
    ``a_n ⊗ δ_n`` to ``φ(a_n) ⊗ φ(δ_n)``, which is what the one-term layers' contraction uses.
    """

    plan: Plan
    param_leaves: Sequence[Any]
    recorded: Recorded
    chunk: int
    per_example: tuple[int, ...]
    patches: dict[int, jax.Array]
    elementwise: Callable[[jax.Array], jax.Array] = jnp.square

    @classmethod
    def of(
        cls,
        plan: Plan,
        param_leaves: Sequence[Any],
        recorded: Recorded,
        chunk: int,
        per_example: Sequence[int] = (),
        elementwise: Callable[[jax.Array], jax.Array] = jnp.square,
    ) -> SquareSums:
        patches = {
            t.leaf: conv_patches(
                plan.nodes[t.node], recorded[(t.node, 0)], _dtype(param_leaves, t.leaf)
            )
            for t in plan.taps
            if not t.one_term and patch_conv(plan.nodes[t.node], t.operand)
        }
        return cls(plan, param_leaves, recorded, chunk, tuple(per_example), patches, elementwise)

    def _node_dtypes(self) -> dict[int, Any]:
        return {t.node: _dtype(self.param_leaves, t.leaf) for t in self.plan.taps}

    def zero(self) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
        """``({one-term node: Σ w δ² [B, *out]}, {leaf: Σ w g²})``, all zeros."""
        node_dtype = self._node_dtypes()
        one_term = sorted({t.node for t in self.plan.taps if t.one_term})
        summed = [t.leaf for t in self.plan.taps if not t.one_term] + list(self.per_example)
        return (
            {
                i: jnp.zeros((self.chunk, *self.plan.nodes[i].outputs[0].aval.shape), node_dtype[i])
                for i in one_term
            },
            {
                i: jnp.zeros(jnp.shape(self.param_leaves[i]), _dtype(self.param_leaves, i))
                for i in summed
            },
        )

    def add(
        self,
        totals: tuple[dict[int, jax.Array], dict[int, jax.Array]],
        deltas: dict[int, jax.Array],
        grads: dict[int, jax.Array],
        w: jax.Array,
    ) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
        """The totals with one label's terms added: ``δ`` at the tapped nodes, the per-example
        gradients ``grads`` of the ``per_example`` leaves, ``w [B]`` the terms' weights."""
        node_dtype = self._node_dtypes()
        squares, sums = totals
        squares = {
            i: squares[i]
            + expand(w, deltas[i].ndim).astype(node_dtype[i])
            * self.elementwise(deltas[i].astype(node_dtype[i]))
            for i in squares
        }
        several = {t.leaf: (t, deltas[t.node]) for t in self.plan.taps if not t.one_term}
        new = {}
        for i, total in sums.items():
            dtype = total.dtype
            if i in several:  # that layer's own per-example gradient
                tap, delta = several[i]
                g = _per_example_grads(
                    self.plan, tap, self.param_leaves, self.recorded, self.patches, dtype, delta
                )
            else:  # from the pullback: a leaf perturbed per example
                g = grads[i].astype(dtype)
            # A dot with the weights, not a sum over the batch axis (see general_sums).
            new[i] = total + jnp.tensordot(w.astype(dtype), self.elementwise(g), axes=1)
        return squares, new

    def finish(
        self, totals: tuple[dict[int, jax.Array], dict[int, jax.Array]]
    ) -> dict[int, jax.Array]:
        """``{leaf: Σ_k Σ_n w_kn g_kn²}``: the one-term layers' contractions of ``Σ w δ²``."""
        squares, sums = totals
        sums = dict(sums)
        for tap in self.plan.taps:
            if tap.one_term:
                sums[tap.leaf] = _one_term_sum(
                    self.plan,
                    tap,
                    self.param_leaves,
                    self.recorded,
                    squares[tap.node],
                    _dtype(self.param_leaves, tap.leaf),
                    self.elementwise,
                )
        return sums


def _dtype(param_leaves: Sequence[Any], leaf: int) -> Any:
    return accumulate_dtype(jnp.result_type(param_leaves[leaf]))


def _per_example_grads(
    plan: Plan,
    tap: Tap,
    param_leaves: Sequence[Any],
    recorded: dict[tuple[int, int], Any],
    patches: dict[int, jax.Array],
    dtype: Any,
    delta: jax.Array,
) -> jax.Array:
    """``[B, *leaf]``: one several-term layer's per-example gradients (from patches for a
    convolution kernel, else the VJP of its own contraction per example)."""
    leaf = param_leaves[tap.leaf].astype(dtype)
    if tap.leaf in patches:
        kernel_grads = conv_kernel_grads(plan.nodes[tap.node], patches[tap.leaf], delta, dtype)
        _, pull = jax.vjp(lambda p: through_layout(plan, tap, p, dtype), leaf)
        return jax.vmap(lambda g: pull(g)[0])(kernel_grads)

    def one(o, d):
        _, pull = jax.vjp(lambda p: consume(plan, tap, p, o, dtype), leaf)
        return pull(d.astype(dtype))[0]

    return jax.vmap(one)(recorded[(tap.node, 1 - tap.operand)], delta)


def _one_term_sum(
    plan: Plan,
    tap: Tap,
    param_leaves: Sequence[Any],
    recorded: dict[tuple[int, int], Any],
    squares: jax.Array,
    dtype: Any,
    elementwise: Callable[[jax.Array], jax.Array] = jnp.square,
) -> jax.Array:
    """``Σ_n w_n (a_n ⊗ δ_n)² = (a²)ᵀ (w δ²)`` for a one-term layer, from ``w δ²`` summed over
    labels: the layer's own contraction, applied to squares (in the accumulation dtype), with
    the examples stacked along a size-1 free axis so that XLA sees one plain matmul. With
    ``elementwise`` the absolute value: ``|a|ᵀ (w |δ|)``."""
    leaf = param_leaves[tap.leaf].astype(dtype)
    other_sq = elementwise(recorded[(tap.node, 1 - tap.operand)].astype(dtype))
    stacked = stacked_axes(plan.nodes[tap.node], tap.operand)
    if stacked is None:

        def contraction(p):
            return jax.vmap(lambda o: consume(plan, tap, p, o, dtype))(other_sq)

        _, pull = jax.vjp(contraction, leaf)
        (total,) = pull(squares)
    else:
        other_axis, out_axis = stacked
        other_cat = stack_examples(other_sq, other_axis)
        _, pull = jax.vjp(lambda p: consume(plan, tap, p, other_cat, dtype), leaf)
        (total,) = pull(stack_examples(squares, out_axis))
    return jnp.abs(total)
