r"""The one-pass diagonal Fisher: squared per-example gradients from layer inputs and ``δ``.

For a tapped layer ``z_n = a_n W`` the per-example gradient is ``a_n ⊗ δ_n``, so

.. math:: \sum_n w_n\, g_n^2 = (a^2)^\top (w \odot δ^2)

is the layer's own contraction applied to squares: one matrix product per layer, no
per-example gradient formed. A layer with several terms per example (a convolution, a Dense
layer over a sequence) forms that one layer's per-example gradients instead (from image patches
for a convolution kernel). See :mod:`ewc_jax._engine.plan` for how layers are found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._engine.dtypes import accumulate_dtype
from ewc_jax._engine.plan import Plan, Tap, consume, through_layout
from ewc_jax._engine.tapped import (
    conv_kernel_grads,
    conv_patches,
    expand,
    patch_conv,
    stack_examples,
    stacked_axes,
    tapped_vjp,
)

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
    """``Σ_k Σ_n w_kn g_kn²`` for every tapped leaf, from one forward and K backward passes.

    Args:
      plan: from :func:`~ewc_jax._engine.plan.make_plan`.
      param_leaves: parameter leaves (unbatched).
      example_leaves: input leaves with a leading chunk axis ``B``.
      targets: the labels to differentiate (:data:`Targets`).

    Returns:
      ``({leaf index: params-leaf-shaped sum}, logits)``.
    """
    chunk = jax.tree.leaves(example_leaves)[0].shape[0]
    logits, pullback, recorded = tapped_vjp(
        plan, param_leaves, example_leaves, plan.perturbed_nodes
    )
    num_labels, target = targets(logits)
    one_term_nodes = sorted({t.node for t in plan.taps if t.one_term})
    several = [t for t in plan.taps if not t.one_term]
    dtypes = {t.leaf: accumulate_dtype(param_leaves[t.leaf].dtype) for t in plan.taps}
    node_dtype = {t.node: dtypes[t.leaf] for t in plan.taps}
    patches = {
        t.leaf: conv_patches(plan.nodes[t.node], recorded[(t.node, 0)], dtypes[t.leaf])
        for t in several
        if patch_conv(plan.nodes[t.node], t.operand)
    }

    def add_label(totals, k):
        # One backward pass for one label per example (K passes for the exact Fisher, one
        # after another, so memory does not grow with the number of labels).
        cotangent, w = target(k)
        deltas = pullback(cotangent.astype(logits.dtype))[0]
        squares, sums = totals
        squares = {
            i: squares[i]
            + expand(w, deltas[i].ndim).astype(node_dtype[i])
            * jnp.square(deltas[i].astype(node_dtype[i]))
            for i in squares
        }
        sums = {
            t.leaf: sums[t.leaf]
            + jnp.tensordot(
                w.astype(dtypes[t.leaf]),
                jnp.square(
                    _per_example_grads(
                        plan, t, param_leaves, recorded, patches, dtypes[t.leaf], deltas[t.node]
                    )
                ),
                axes=1,
            )
            for t in several
        }
        return (squares, sums), None

    totals = (
        {
            i: jnp.zeros((chunk, *plan.nodes[i].outputs[0].aval.shape), node_dtype[i])
            for i in one_term_nodes
        },
        {t.leaf: jnp.zeros(param_leaves[t.leaf].shape, dtypes[t.leaf]) for t in several},
    )
    if num_labels == 1:
        (squares, sums), _ = add_label(totals, 0)
    else:
        (squares, sums), _ = jax.lax.scan(add_label, totals, jnp.arange(num_labels))
    for tap in plan.taps:
        if tap.one_term:
            sums[tap.leaf] = _one_term_sum(
                plan, tap, param_leaves, recorded, squares[tap.node], dtypes[tap.leaf]
            )
    return sums, logits


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
) -> jax.Array:
    """``Σ_n w_n (a_n ⊗ δ_n)² = (a²)ᵀ (w δ²)`` for a one-term layer, from ``w δ²`` summed over
    labels: the layer's own contraction, applied to squares (in the accumulation dtype), with
    the examples stacked along a size-1 free axis so that XLA sees one plain matmul."""
    leaf = param_leaves[tap.leaf].astype(dtype)
    other_sq = jnp.square(recorded[(tap.node, 1 - tap.operand)].astype(dtype))
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
