"""The tapped forward pass and its VJP, and the layer geometry the one-pass estimators share.

:func:`tapped_vjp` runs a :class:`~ewc_jax._engine.plan.Plan` on a chunk of examples with a zero
perturbation added at the output of every chosen node, and returns the logits, the pullback
(whose cotangent for the perturbations is ``δ``, the gradient at each node's output) and the
recorded other operands (``a``, each layer's input). The diagonal Fisher (``a² · δ²``), MAS
(``|a| · |δ|``) and K-FAC (``E[a aᵀ]``, ``E[δ δᵀ]``) are all built from these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._engine.plan import Node, Plan, evaluate

Pullback = Callable[[jax.Array], tuple[dict[int, jax.Array], dict[int, jax.Array]]]
"""Maps a cotangent of the logits to ``({node: δ}, {leaf: per-example gradient})``: the gradients
at the perturbed outputs and those of the leaves perturbed per example."""
Recorded = dict[tuple[int, int], Any]
"""``recorded[(node, operand)]``: a tapped node's other operand, per example."""


def tapped_vjp(
    plan: Plan,
    param_leaves: Sequence[Any],
    example_leaves: Sequence[Any],
    nodes: Sequence[int],
    per_example: Sequence[int] = (),
) -> tuple[jax.Array, Pullback, Recorded]:
    """``(logits, pullback, recorded)`` of the plan on a chunk, perturbed at ``nodes``' outputs.

    ``pullback(cotangent)`` returns ``({node: δ [B, *node output]}, {leaf: g [B, *leaf]})``:
    the gradient of ``Σ cotangent · logits`` at each perturbed output and, for each leaf in
    ``per_example``, its per-example gradient (each example sees the leaf plus its own zero
    perturbation, whose gradient that is: what ``vmap(grad)`` gives, from the same backward
    pass). ``recorded[(node, operand)]`` holds each tapped node's other operand ``[B, ...]``
    (see :func:`~ewc_jax._engine.plan.evaluate`).
    """
    chunk = jax.tree.leaves(example_leaves)[0].shape[0]
    eps0 = {
        i: jnp.zeros(
            (chunk, *plan.nodes[i].outputs[0].aval.shape), plan.nodes[i].outputs[0].aval.dtype
        )
        for i in nodes
    }
    leaf_eps0 = {
        i: jnp.zeros((chunk, *jnp.shape(param_leaves[i])), jnp.result_type(param_leaves[i]))
        for i in per_example
    }

    def one(x, eps, leaf_eps):
        leaves = list(param_leaves)
        for i, e in leaf_eps.items():
            leaves[i] = leaves[i] + e
        return evaluate(plan, leaves, x, eps)

    def forward(eps, leaf_eps):
        return jax.vmap(one)(example_leaves, eps, leaf_eps)

    return jax.vjp(forward, eps0, leaf_eps0, has_aux=True)


def patch_conv(node: Node, operand: int) -> bool:
    """Whether a tapped convolution kernel's per-example gradients come from image patches."""
    return (
        node.eqn.primitive.name == "conv_general_dilated"
        and operand == 1
        and node.eqn.params["batch_group_count"] == 1
    )


def conv_patches(node: Node, lhs: jax.Array, dtype: Any) -> jax.Array:
    """``[B, S, C_in·K]``: each example's input patches at the S output positions (im2col).

    ``lhs`` is the recorded per-example input ``[B, (1-sized batch and the rest in the conv's
    layout)]``. Features are ordered channel-major (``c·K + k``, K the kernel's spatial size), as
    ``lax.conv_general_dilated_patches`` returns them.
    """
    params = node.eqn.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    rhs_shape = node.inputs[1].aval.shape
    images = stack_examples(lhs.astype(dtype), lhs_spec[0])
    patches = jax.lax.conv_general_dilated_patches(
        images,
        filter_shape=[rhs_shape[d] for d in rhs_spec[2:]],
        window_strides=params["window_strides"],
        padding=params["padding"],
        lhs_dilation=params["lhs_dilation"],
        rhs_dilation=params["rhs_dilation"],
        dimension_numbers=params["dimension_numbers"],
        precision=jax.lax.Precision.HIGHEST,
    )
    # To [B, spatial..., features], then flatten the spatial axes.
    patches = jnp.transpose(patches, (out_spec[0], *out_spec[2:], out_spec[1]))
    return patches.reshape(patches.shape[0], -1, patches.shape[-1])


def conv_kernel_grads(node: Node, patches: jax.Array, delta: jax.Array, dtype: Any) -> jax.Array:
    """Per-example kernel gradients ``[B, *kernel]`` of a convolution: patchesᵀ · δ per group.

    The gradient of ``Σ_s δ_s · conv(x)_s`` with respect to the kernel is
    ``Σ_s patch_s ⊗ δ_s``, a batched matrix product; forming it from patches avoids the
    per-example grouped convolution that ``vmap`` of the convolution's VJP would build.
    """
    params = node.eqn.params
    _, rhs_spec, out_spec = params["dimension_numbers"]
    rhs_shape = node.inputs[1].aval.shape
    groups = params["feature_group_count"]
    spatial = [rhs_shape[d] for d in rhs_spec[2:]]
    in_per_group, out_features = rhs_shape[rhs_spec[1]], rhs_shape[rhs_spec[0]]
    d = stack_examples(delta.astype(dtype), out_spec[0])
    d = jnp.transpose(d, (out_spec[0], *out_spec[2:], out_spec[1]))
    batch = d.shape[0]
    d = d.reshape(batch, -1, groups, out_features // groups)
    p = patches.reshape(batch, d.shape[1], groups, in_per_group * math.prod(spatial))
    grads = jnp.einsum("bsgi,bsgo->bgoi", p, d, precision=jax.lax.Precision.HIGHEST)
    # [B, O, I, *spatial] in (out, in, spatial) order, then into the kernel's own layout.
    grads = grads.reshape(batch, out_features, in_per_group, *spatial)
    order = np.argsort(rhs_spec)
    return jnp.transpose(grads, (0, *(1 + order)))


def stacked_axes(node: Node, operand: int) -> tuple[int, int] | None:
    """For a one-term ``dot_general``: a size-1 free axis of the other operand that can hold the
    examples, and the output axis it becomes; None for other operations."""
    if node.eqn.primitive.name != "dot_general":
        return None
    (contract_l, contract_r), _ = node.eqn.params["dimension_numbers"]
    lhs_free = [d for d in range(len(node.inputs[0].aval.shape)) if d not in contract_l]
    rhs_free = [d for d in range(len(node.inputs[1].aval.shape)) if d not in contract_r]
    free = lhs_free if operand == 1 else rhs_free
    if not free:
        return None
    out_axis = 0 if operand == 1 else len(lhs_free)  # output = (lhs free, rhs free)
    return free[0], out_axis


def stack_examples(x: jax.Array, axis: int) -> jax.Array:
    """``[B, ..., 1 (at axis), ...]`` -> ``[..., B (at axis), ...]``: examples on a size-1 axis."""
    return jnp.moveaxis(jnp.squeeze(x, axis + 1), 0, axis)


def expand(w: jax.Array, ndim: int) -> jax.Array:
    """``[B]`` weights reshaped to broadcast against a ``[B, ...]`` array of rank ``ndim``."""
    return w.reshape(w.shape + (1,) * (ndim - 1))
