"""K-FAC's layers: the Dense and convolution layers (kernel, bias, axes) found in a traced plan.

:func:`ewc_jax.kfac.kfac_fisher` factors each layer :func:`factored_layers` returns; every other
parameter keeps its diagonal Fisher.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._engine.model import Model
from ewc_jax._engine.plan import LAYOUT_OPS, Plan, Tap, make_plan
from ewc_jax._engine.tapped import conv_patches, stack_examples
from ewc_jax._kfac_sequence import dense_kernel, positions


@functools.lru_cache(maxsize=64)
def plan_and_layers(model: Model) -> tuple[Plan, tuple[Any, ...]]:
    """The model's traced plan and its factored layers (:func:`factored_layers`), traced once per
    model, params and example shapes rather than on every call (as ``jax.jit`` caches it)."""
    plan = make_plan(model.shape_fn(), model.params_tree(), model.example_tree())
    return plan, factored_layers(plan)


def selected_layers(
    layers: tuple[tuple[int, int, int | None, tuple[int, ...], int], ...],
    selected: frozenset[int],
) -> tuple[tuple[int, int, int | None, tuple[int, ...], int], ...]:
    """The layers of :func:`factored_layers` whose kernel is among the ``selected`` leaves (a
    ``where=``), each keeping its bias only if that is selected too: a kernel without its bias
    is factored alone, ``ā = a``, which is the block ``A ⊗ G`` of the kernel's rows of
    ``[W; b]`` (``A`` without its bias row and column)."""
    return tuple(
        (node, kernel, bias if bias in selected else None, axes, out)
        for node, kernel, bias, axes, out in layers
        if kernel in selected
    )


def factored_layers(
    plan: Plan,
) -> tuple[tuple[int, int, int | None, tuple[int, ...], int], ...]:
    """``(node, kernel leaf, bias leaf or None, kernel axes, out features)`` for every factored
    layer.

    A Dense kernel: a leaf reaching a ``dot_general`` unchanged, either as the right operand
    ``[*in, *out]`` contracted over its leading axes with the trailing axes of a per-example
    input ``[1, *P, *in]`` (Flax ``Dense``/``DenseGeneral``, plain JAX ``x @ W``; ``P`` are
    extra axes such as a sequence's) or as the 2-D left operand over its second axis (Equinox
    ``W @ x`` under ``vmap``, kernel ``[out, in]``). A convolution kernel: a leaf reaching a
    ``conv_general_dilated`` unchanged as its kernel, without feature or batch groups. A bias:
    a leaf of the output's shape (``[*out]``, up to axes of size 1: ``[out]``, ``[1, out]``,
    ``[H, Dh]``) added, alone and once, to the layer's output or, for a Dense layer, to that
    output moved by layout-only operations (the transpose ``vmap`` puts after ``W @ x``).
    """
    layers = []
    for tap in plan.taps:
        if tap.layout:
            continue
        kernel = kernel_axes(plan, tap) or dense_kernel(plan, tap)
        if kernel is None:
            continue
        axes, out_shape = kernel
        squeezed = tuple(d for d in out_shape if d != 1)
        outputs = carried_outputs(plan, tap.node)
        bias = None
        for other in plan.taps:
            adder = plan.nodes[other.node]
            shape = plan.inputs[other.leaf].aval.shape
            if (
                adder.eqn.primitive.name == "add"
                and any(adder.inputs[1 - other.operand] is out for out in outputs)
                and tuple(d for d in shape if d != 1) == squeezed
            ):
                bias = other.leaf
        layers.append((tap.node, tap.leaf, bias, axes, math.prod(out_shape)))
    return tuple(layers)


def kernel_axes(plan: Plan, tap: Tap) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(kernel axes in the order (input, spatial..., output), output shape)`` when the
    tapped leaf is the kernel of an ungrouped convolution or the ``[out, in]`` kernel of
    Equinox's ``W @ x``; else None (a Dense ``x @ W`` kernel: :func:`dense_kernel`)."""
    node = plan.nodes[tap.node]
    name = node.eqn.primitive.name
    leaf_shape = plan.inputs[tap.leaf].aval.shape
    if name == "conv_general_dilated":
        params = node.eqn.params
        if tap.operand != 1 or params["feature_group_count"] != 1:
            return None
        if params["batch_group_count"] != 1:
            return None
        rhs_spec = params["dimension_numbers"].rhs_spec
        axes = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])
        return tuple(int(a) for a in axes), (leaf_shape[rhs_spec[0]],)
    if name != "dot_general" or len(leaf_shape) != 2 or not tap.one_term:
        return None
    (contract_l, contract_r), batch = node.eqn.params["dimension_numbers"]
    contract = (tuple(contract_l), tuple(contract_r))
    other_shape = node.inputs[1 - tap.operand].aval.shape
    if batch != ((), ()):
        return None
    if tap.operand == 0 and other_shape == (1, leaf_shape[1]) and contract == ((1,), (1,)):
        return (1, 0), (leaf_shape[0],)  # vmap(W @ x), W [out, in]
    return None


def carried_outputs(plan: Plan, node: int) -> list[Any]:
    """The node's output and, for a ``dot_general``, the outputs of the layout-only operations
    that carry it on (each the only consumer of the one before)."""
    carried = [plan.nodes[node].outputs[0]]
    if plan.nodes[node].eqn.primitive.name != "dot_general":
        return carried
    while True:
        users = [n for n in plan.nodes if any(ref is carried[-1] for ref in n.inputs)]
        if (
            len(users) != 1
            or users[0].eqn.primitive.name not in LAYOUT_OPS
            or len(users[0].inputs) != 1
        ):
            return carried
        carried.append(users[0].outputs[0])


def layer_inputs(plan: Plan, node: int, recorded: Any, dtype: Any) -> jax.Array:
    """``[B, S, in]``: each example's layer inputs at its S output positions (S = 1: Dense)."""
    (kernel_operand,) = {t.operand for t in plan.taps if t.node == node}
    inputs = recorded[(node, 1 - kernel_operand)]
    if plan.nodes[node].eqn.primitive.name == "conv_general_dilated":
        return conv_patches(plan.nodes[node], inputs, dtype)
    if (extra := positions(plan.nodes[node])) is not None:  # [B, 1, *P, *in]
        return inputs.reshape(inputs.shape[0], math.prod(extra), -1).astype(dtype)
    return inputs.reshape(inputs.shape[0], 1, -1).astype(dtype)


def layer_deltas(plan, node: int, delta: jax.Array, dtype: Any) -> jax.Array:
    """``[B, S, out]``: the output gradients at the S output positions."""
    eqn = plan.nodes[node].eqn
    if eqn.primitive.name == "conv_general_dilated":
        out_spec = eqn.params["dimension_numbers"].out_spec
        d = stack_examples(delta.astype(dtype), out_spec[0])
        d = jnp.transpose(d, (out_spec[0], *out_spec[2:], out_spec[1]))
        return d.reshape(d.shape[0], -1, d.shape[-1])
    if (extra := positions(plan.nodes[node])) is not None:  # [B, 1, *P, *out]
        return delta.reshape(delta.shape[0], math.prod(extra), -1).astype(dtype)
    return delta.reshape(delta.shape[0], 1, -1).astype(dtype)
