r"""One-pass diagonal Fisher for parameters that enter a model through a contraction.

For a dense layer ``z_n = a_n W`` the per-example gradient of ``log p(y_n | x_n)`` is the outer
product ``a_n ⊗ δ_n`` of the layer input and the gradient at the layer output
``δ_n = ∂ log p(y_n|x_n) / ∂ z_n``. Its square is ``a_n² ⊗ δ_n²``, so

.. math:: \sum_n w_n\, g_n^2 = (a^2)^\top (w \odot δ^2),

one matrix product per layer, and no per-example parameter gradient is ever formed. For the
exact (true) Fisher the per-class output gradients are combined first,
``Σ_c p_c δ_c²``, and contracted once.

How the layers are found: the model is traced for a single example into a jaxpr, and every
parameter leaf is followed through layout-only operations (reshape, broadcast, convert, ...)
to the one operation that consumes it. When that is a ``dot_general``, ``conv_general_dilated``,
``mul``, ``add`` or ``sub`` (Flax ``Dense``, ``DenseGeneral``, ``Conv``, NNX ``Linear``,
``Conv``, their biases, LayerNorm scales, or the same written by hand in plain JAX), the
parameter is "tapped": the evaluator records the other operand and adds a zero perturbation to
the output, whose gradient is ``δ``. This works the same for Linen, NNX and plain functions,
because it reads what the model computes rather than how it was written.

Two cases:

* one term per example (a dense layer on a ``[features]`` input, a bias added once, an
  elementwise scale): the squared-sum contraction above;
* several terms per example (a convolution, a dense layer applied at every position of a
  sequence, a bias broadcast over space): the per-example gradient of that one layer is formed
  with ``jax.vmap`` (memory: chunk × that layer's size, not chunk × the whole model), squared
  and summed.

Every other parameter (used twice, or by an operation not listed: an embedding's gather) is
in ``Plan.fallback``: the one-pass sums perturb it per example in the same pass, whose backward
then returns its per-example gradients (:mod:`ewc_jax._engine.onepass`). Models must treat
examples independently (no batch statistics), as every per-example-gradient method assumes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from ewc_jax._types import Params, PyTree

LAYOUT_OPS = frozenset(
    {
        "reshape",
        "broadcast_in_dim",
        "convert_element_type",
        "squeeze",
        "expand_dims",
        "transpose",
        "copy",
        "copy_p",
    }
)

_INLINED_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})

_TAPPABLE = frozenset({"dot_general", "conv_general_dilated", "mul", "add", "sub"})


class Ref:
    """A value of the flattened program (fresh for every inlined call site)."""

    __slots__ = ("aval",)

    def __init__(self, aval: Any):
        self.aval = aval


@dataclasses.dataclass(frozen=True)
class Node:
    eqn: Any  # the original jex.JaxprEqn: primitive and parameters
    inputs: tuple[Any, ...]  # Ref or jex.Literal
    outputs: tuple[Ref | None, ...]  # None for dropped outputs


@dataclasses.dataclass(frozen=True)
class Tap:
    """How one parameter leaf reaches the operation that consumes it."""

    leaf: int
    node: int  # index of the consuming node
    operand: int  # which input of that node carries the parameter
    layout: tuple[int, ...]  # indices of the layout-only nodes between leaf and consumer
    one_term: bool  # each parameter element meets one output element per example


@dataclasses.dataclass(frozen=True)
class Plan:
    """The traced per-example program and which parameter leaves the fast path covers."""

    nodes: tuple[Node, ...]
    inputs: tuple[Ref, ...]  # parameter leaves, then input leaves
    consts: tuple[tuple[Ref, Any], ...]
    outputs: tuple[Any, ...]
    taps: tuple[Tap, ...]
    fallback: tuple[int, ...]  # leaves not tapped: differentiated per example
    unused: tuple[int, ...]  # leaves the logits do not depend on: Fisher zero

    @property
    def perturbed_nodes(self) -> tuple[int, ...]:
        return tuple(sorted({t.node for t in self.taps}))


def _flatten(jaxpr: Any, refs: Sequence[Any], nodes: list[Node], consts: list) -> list[Any]:
    """Appends ``jaxpr``'s equations to ``nodes``, inlining nested jit calls; returns outputs.

    ``refs`` stand for ``jaxpr.constvars`` followed by ``jaxpr.invars``.
    """
    binders = [*jaxpr.constvars, *jaxpr.invars]
    env: dict[Any, Any] = dict(zip(binders, refs, strict=True))

    def read(v: Any) -> Any:
        return v if isinstance(v, jex.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr")
        if eqn.primitive.name in _INLINED_CALLS and isinstance(inner, jex.ClosedJaxpr):
            const_refs = []
            for var, value in zip(inner.jaxpr.constvars, inner.consts, strict=True):
                ref = Ref(var.aval)
                consts.append((ref, value))
                const_refs.append(ref)
            outs = _flatten(inner.jaxpr, [*const_refs, *ins], nodes, consts)
            for var, ref in zip(eqn.outvars, outs, strict=True):
                env[var] = ref
            continue
        new = tuple(None if isinstance(v, jex.DropVar) else Ref(v.aval) for v in eqn.outvars)
        for var, ref in zip(eqn.outvars, new, strict=True):
            if ref is not None:
                env[var] = ref
        nodes.append(Node(eqn, tuple(ins), new))
    return [read(v) for v in jaxpr.outvars]


def make_plan(
    apply_fn: Callable[[Params, PyTree], jax.Array], params: Params, example: PyTree
) -> Plan:
    """Traces ``apply_fn`` on one example and decides which parameter leaves to tap.

    Args:
      apply_fn: ``apply_fn(params, batch) -> [B, C]`` logits.
      params: parameters (arrays or ShapeDtypeStructs).
      example: one example (no leading batch axis), arrays or ShapeDtypeStructs.

    Returns:
      The plan.
    """

    def logits_of_one(p, x):
        return apply_fn(p, jax.tree.map(lambda a: a[None], x))[0]

    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    closed = jax.make_jaxpr(logits_of_one)(jax.tree.map(spec, params), jax.tree.map(spec, example))
    jaxpr = closed.jaxpr
    nodes: list[Node] = []
    consts: list[tuple[Ref, Any]] = []
    const_refs = []
    for var, value in zip(jaxpr.constvars, closed.consts, strict=True):
        ref = Ref(var.aval)
        consts.append((ref, value))
        const_refs.append(ref)
    in_refs = [Ref(v.aval) for v in jaxpr.invars]
    outputs = _flatten(jaxpr, [*const_refs, *in_refs], nodes, consts)

    uses: dict[int, list[tuple[int, int]]] = {}
    for i, node in enumerate(nodes):
        for pos, ref in enumerate(node.inputs):
            if isinstance(ref, Ref):
                uses.setdefault(id(ref), []).append((i, pos))
    for ref in outputs:
        if isinstance(ref, Ref):
            uses.setdefault(id(ref), []).append((-1, 0))

    num_leaves = len(jax.tree.leaves(params))
    taps, fallback, unused = [], [], []
    for leaf in range(num_leaves):
        tap = _find_tap(leaf, in_refs[leaf], nodes, uses)
        if tap == "unused":
            unused.append(leaf)
        elif tap is None:
            fallback.append(leaf)
        else:
            taps.append(tap)
    return Plan(
        nodes=tuple(nodes),
        inputs=tuple(in_refs),
        consts=tuple(consts),
        outputs=tuple(outputs),
        taps=tuple(taps),
        fallback=tuple(fallback),
        unused=tuple(unused),
    )


def _find_tap(leaf: int, ref: Ref, nodes: Sequence[Node], uses: dict) -> Tap | str | None:
    layout: list[int] = []
    current = ref
    while True:
        current_uses = uses.get(id(current), [])
        if not current_uses:
            return "unused" if not layout else None
        if len(current_uses) > 1 or current_uses[0][0] < 0:
            return None
        index, operand = current_uses[0]
        node = nodes[index]
        name = node.eqn.primitive.name
        if name in LAYOUT_OPS and len(node.inputs) == 1 and len(node.outputs) == 1:
            layout.append(index)
            current = node.outputs[0]
            continue
        if name not in _TAPPABLE or len(node.inputs) != 2 or node.outputs[0] is None:
            return None
        one_term = _is_one_term(node, operand, ref.aval)
        if one_term is None:
            return None
        return Tap(leaf, index, operand, tuple(layout), one_term)


def _is_one_term(node: Node, operand: int, leaf_aval: Any) -> bool | None:
    """Whether each parameter element meets exactly one output element per example.

    Returns None when the consuming operation is not linear in the parameter in a way this
    module handles (then the leaf takes the general path).
    """
    name = node.eqn.primitive.name
    out_size = math.prod(node.outputs[0].aval.shape)
    leaf_size = math.prod(leaf_aval.shape)
    if name == "conv_general_dilated":
        return False if operand == 1 else None
    if name == "dot_general":
        (contract_l, contract_r), (batch_l, batch_r) = node.eqn.params["dimension_numbers"]
        if batch_l or batch_r:
            return False
        other = node.inputs[1 - operand]
        other_shape = other.aval.shape
        other_contract = contract_r if operand == 0 else contract_l
        free = [d for d in range(len(other_shape)) if d not in other_contract]
        own_size = math.prod(node.inputs[operand].aval.shape)
        return math.prod(other_shape[d] for d in free) == 1 and own_size == leaf_size
    return out_size == leaf_size


def _read(env: dict[int, Any], ref: Any) -> Any:
    return ref.val if isinstance(ref, jex.Literal) else env[id(ref)]


def bind(node: Node, values: Sequence[Any]) -> list[Any]:
    params = node.eqn.primitive.get_bind_params(node.eqn.params)
    out = node.eqn.primitive.bind(*values, **params)
    return list(out) if node.eqn.primitive.multiple_results else [out]


def evaluate(
    plan: Plan, param_leaves: Sequence[Any], example_leaves: Sequence[Any], eps: dict[int, Any]
) -> tuple[jax.Array, dict[tuple[int, int], Any]]:
    """Runs the per-example program, perturbing tapped outputs and recording other operands.

    Returns:
      ``(logits, recorded)`` where ``recorded[(node, operand)]`` is the operand that multiplies
      (or is added to) the parameter in that node.
    """
    env: dict[int, Any] = {id(ref): value for ref, value in plan.consts}
    for ref, value in zip(plan.inputs, [*param_leaves, *example_leaves], strict=True):
        env[id(ref)] = value
    wanted = {(t.node, 1 - t.operand) for t in plan.taps}
    recorded: dict[tuple[int, int], Any] = {}
    for i, node in enumerate(plan.nodes):
        values = [_read(env, ref) for ref in node.inputs]
        for pos in (0, 1):
            if (i, pos) in wanted:
                recorded[(i, pos)] = values[pos]
        outs = bind(node, values)
        if i in eps:
            outs[0] = outs[0] + eps[i]
        for ref, value in zip(node.outputs, outs, strict=True):
            if ref is not None:
                env[id(ref)] = value
    (logits,) = [_read(env, ref) for ref in plan.outputs]
    return logits, recorded


def through_layout(plan: Plan, tap: Tap, leaf_value: Any, dtype: Any = None) -> Any:
    """The leaf as its consumer sees it; with ``dtype``, dtype conversions are skipped."""
    value = leaf_value
    for index in tap.layout:
        node = plan.nodes[index]
        if dtype is not None and node.eqn.primitive.name == "convert_element_type":
            continue
        (value,) = bind(node, [value])
    return value


def consume(plan: Plan, tap: Tap, leaf_value: Any, other: Any, dtype: Any = None) -> Any:
    """Applies the tapped operation to the leaf and another operand (in ``dtype`` if given)."""
    operands = [other, other]
    operands[tap.operand] = through_layout(plan, tap, leaf_value, dtype)
    node = plan.nodes[tap.node]
    if dtype is None:
        (out,) = bind(node, operands)
        return out
    operands = [jnp.asarray(o).astype(dtype) for o in operands]
    bind_params = node.eqn.primitive.get_bind_params(node.eqn.params)
    if "preferred_element_type" in bind_params:
        bind_params = {**bind_params, "preferred_element_type": np.dtype(dtype)}
    return node.eqn.primitive.bind(*operands, **bind_params)


def move_to_fallback(plan: Plan, leaves: Sequence[int]) -> Plan:
    """The plan with the given tapped leaves untapped (differentiated per example instead)."""
    if not leaves:
        return plan
    leaves = set(leaves)
    return dataclasses.replace(
        plan,
        taps=tuple(t for t in plan.taps if t.leaf not in leaves),
        fallback=tuple(sorted({*plan.fallback, *leaves})),
    )


def restrict(plan: Plan, selected: tuple[int, ...]) -> Plan:
    """The plan with unselected leaves neither tapped nor differentiated (counted as unused)."""
    keep = set(selected)
    if keep.issuperset(range(num_params(plan))):
        return plan
    dropped = [t.leaf for t in plan.taps if t.leaf not in keep]
    dropped += [i for i in plan.fallback if i not in keep]
    return dataclasses.replace(
        plan,
        taps=tuple(t for t in plan.taps if t.leaf in keep),
        fallback=tuple(i for i in plan.fallback if i in keep),
        unused=tuple(sorted({*plan.unused, *dropped})),
    )


def num_params(plan: Plan) -> int:
    return len(plan.taps) + len(plan.fallback) + len(plan.unused)
