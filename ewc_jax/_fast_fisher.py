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

Every other parameter (used twice, or by an operation not listed) goes through the general
``jax.vmap(jax.grad(...))`` path, exactly as with ``method="general"``. Models must treat examples
independently (no batch statistics), as every per-example-gradient method assumes.
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

_LAYOUT_OPS = frozenset(
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


class _Ref:
    """A value of the flattened program (fresh for every inlined call site)."""

    __slots__ = ("aval",)

    def __init__(self, aval: Any):
        self.aval = aval


@dataclasses.dataclass(frozen=True)
class _Node:
    eqn: Any  # the original jex.JaxprEqn: primitive and parameters
    inputs: tuple[Any, ...]  # _Ref or jex.Literal
    outputs: tuple[_Ref | None, ...]  # None for dropped outputs


@dataclasses.dataclass(frozen=True)
class _Tap:
    """How one parameter leaf reaches the operation that consumes it."""

    leaf: int
    node: int  # index of the consuming node
    operand: int  # which input of that node carries the parameter
    layout: tuple[int, ...]  # indices of the layout-only nodes between leaf and consumer
    one_term: bool  # each parameter element meets one output element per example


@dataclasses.dataclass(frozen=True)
class Plan:
    """The traced per-example program and which parameter leaves the fast path covers."""

    nodes: tuple[_Node, ...]
    inputs: tuple[_Ref, ...]  # parameter leaves, then input leaves
    consts: tuple[tuple[_Ref, Any], ...]
    outputs: tuple[Any, ...]
    taps: tuple[_Tap, ...]
    fallback: tuple[int, ...]  # leaves for the general path
    unused: tuple[int, ...]  # leaves the logits do not depend on: Fisher zero

    @property
    def perturbed_nodes(self) -> tuple[int, ...]:
        return tuple(sorted({t.node for t in self.taps}))


def _flatten(jaxpr: Any, refs: Sequence[Any], nodes: list[_Node], consts: list) -> list[Any]:
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
                ref = _Ref(var.aval)
                consts.append((ref, value))
                const_refs.append(ref)
            outs = _flatten(inner.jaxpr, [*const_refs, *ins], nodes, consts)
            for var, ref in zip(eqn.outvars, outs, strict=True):
                env[var] = ref
            continue
        new = tuple(None if isinstance(v, jex.DropVar) else _Ref(v.aval) for v in eqn.outvars)
        for var, ref in zip(eqn.outvars, new, strict=True):
            if ref is not None:
                env[var] = ref
        nodes.append(_Node(eqn, tuple(ins), new))
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
    nodes: list[_Node] = []
    consts: list[tuple[_Ref, Any]] = []
    const_refs = []
    for var, value in zip(jaxpr.constvars, closed.consts, strict=True):
        ref = _Ref(var.aval)
        consts.append((ref, value))
        const_refs.append(ref)
    in_refs = [_Ref(v.aval) for v in jaxpr.invars]
    outputs = _flatten(jaxpr, [*const_refs, *in_refs], nodes, consts)

    uses: dict[int, list[tuple[int, int]]] = {}
    for i, node in enumerate(nodes):
        for pos, ref in enumerate(node.inputs):
            if isinstance(ref, _Ref):
                uses.setdefault(id(ref), []).append((i, pos))
    for ref in outputs:
        if isinstance(ref, _Ref):
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


def _find_tap(leaf: int, ref: _Ref, nodes: Sequence[_Node], uses: dict) -> _Tap | str | None:
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
        if name in _LAYOUT_OPS and len(node.inputs) == 1 and len(node.outputs) == 1:
            layout.append(index)
            current = node.outputs[0]
            continue
        if name not in _TAPPABLE or len(node.inputs) != 2 or node.outputs[0] is None:
            return None
        one_term = _is_one_term(node, operand, ref.aval)
        if one_term is None:
            return None
        return _Tap(leaf, index, operand, tuple(layout), one_term)


def _is_one_term(node: _Node, operand: int, leaf_aval: Any) -> bool | None:
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


def _bind(node: _Node, values: Sequence[Any]) -> list[Any]:
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
        outs = _bind(node, values)
        if i in eps:
            outs[0] = outs[0] + eps[i]
        for ref, value in zip(node.outputs, outs, strict=True):
            if ref is not None:
                env[id(ref)] = value
    (logits,) = [_read(env, ref) for ref in plan.outputs]
    return logits, recorded


def _through_layout(plan: Plan, tap: _Tap, leaf_value: Any, dtype: Any = None) -> Any:
    """The leaf as its consumer sees it; with ``dtype``, dtype conversions are skipped."""
    value = leaf_value
    for index in tap.layout:
        node = plan.nodes[index]
        if dtype is not None and node.eqn.primitive.name == "convert_element_type":
            continue
        (value,) = _bind(node, [value])
    return value


def _consume(plan: Plan, tap: _Tap, leaf_value: Any, other: Any, dtype: Any = None) -> Any:
    """Applies the tapped operation to the leaf and another operand (in ``dtype`` if given)."""
    operands = [other, other]
    operands[tap.operand] = _through_layout(plan, tap, leaf_value, dtype)
    node = plan.nodes[tap.node]
    if dtype is None:
        (out,) = _bind(node, operands)
        return out
    operands = [jnp.asarray(o).astype(dtype) for o in operands]
    bind_params = node.eqn.primitive.get_bind_params(node.eqn.params)
    if "preferred_element_type" in bind_params:
        bind_params = {**bind_params, "preferred_element_type": np.dtype(dtype)}
    return node.eqn.primitive.bind(*operands, **bind_params)


def move_to_fallback(plan: Plan, leaves: Sequence[int]) -> Plan:
    """The plan with the given tapped leaves moved to the general path."""
    if not leaves:
        return plan
    leaves = set(leaves)
    return dataclasses.replace(
        plan,
        taps=tuple(t for t in plan.taps if t.leaf not in leaves),
        fallback=tuple(sorted({*plan.fallback, *leaves})),
    )


def tapped_sums(
    plan: Plan,
    param_leaves: Sequence[Any],
    example_leaves: Sequence[Any],
    targets: Callable[[jax.Array], tuple[int, Callable[[jax.Array], tuple[jax.Array, jax.Array]]]],
    accumulate_dtype: Callable[[Any], Any],
) -> tuple[dict[int, jax.Array], jax.Array]:
    """``Σ_k Σ_n w_kn g_kn²`` for every tapped leaf, from one forward and K backward passes.

    Args:
      plan: from :func:`make_plan`.
      param_leaves: parameter leaves (unbatched).
      example_leaves: input leaves with a leading chunk axis ``B``.
      targets: maps the logits ``[B, ..., C]`` to ``(K, target)``, where ``target(k)`` gives the
        gradient of the log-likelihood at the logits for the k-th label of every example
        (``[B, ..., C]``) and the weight of that (label, example) term (``[B]``).
      accumulate_dtype: maps a leaf dtype to the dtype of its sum.

    Returns:
      ``({leaf index: params-leaf-shaped sum}, logits)``.
    """
    first = jax.tree.leaves(example_leaves)[0]
    chunk = first.shape[0]
    eps0 = {
        i: jnp.zeros(
            (chunk, *plan.nodes[i].outputs[0].aval.shape), plan.nodes[i].outputs[0].aval.dtype
        )
        for i in plan.perturbed_nodes
    }

    def forward(eps):
        return jax.vmap(lambda x, e: evaluate(plan, param_leaves, x, e))(example_leaves, eps)

    logits, pullback, recorded = jax.vjp(forward, eps0, has_aux=True)
    num_labels, target = targets(logits)
    one_term_nodes = sorted({t.node for t in plan.taps if t.one_term})
    several = [t for t in plan.taps if not t.one_term]
    dtypes = {t.leaf: accumulate_dtype(param_leaves[t.leaf].dtype) for t in plan.taps}
    node_dtype = {t.node: dtypes[t.leaf] for t in plan.taps}

    patches = {
        t.leaf: _conv_patches(plan.nodes[t.node], recorded[(t.node, 0)], dtypes[t.leaf])
        for t in several
        if _patch_conv(plan.nodes[t.node], t.operand)
    }

    def per_example_grads(tap, delta):
        dtype = dtypes[tap.leaf]
        leaf = param_leaves[tap.leaf].astype(dtype)
        if tap.leaf in patches:
            kernel_grads = _conv_kernel_grads(plan.nodes[tap.node], patches[tap.leaf], delta, dtype)
            _, pull = jax.vjp(lambda p: _through_layout(plan, tap, p, dtype), leaf)
            return jax.vmap(lambda g: pull(g)[0])(kernel_grads)

        def one(o, d):
            _, pull = jax.vjp(lambda p: _consume(plan, tap, p, o, dtype), leaf)
            return pull(d.astype(dtype))[0]

        return jax.vmap(one)(recorded[(tap.node, 1 - tap.operand)], delta)

    def add_label(totals, k):
        # One backward pass for one label per example (K passes for the exact Fisher, one
        # after another, so memory does not grow with the number of labels).
        cotangent, w = target(k)
        deltas = pullback(cotangent.astype(logits.dtype))[0]
        squares, sums = totals
        squares = {
            i: squares[i]
            + _expand(w, deltas[i].ndim).astype(node_dtype[i])
            * jnp.square(deltas[i].astype(node_dtype[i]))
            for i in squares
        }
        sums = {
            t.leaf: sums[t.leaf]
            + jnp.tensordot(
                w.astype(dtypes[t.leaf]),
                jnp.square(per_example_grads(t, deltas[t.node])),
                axes=1,
            )
            for t in several
        }
        return (squares, sums), None

    totals = (
        {i: jnp.zeros(eps0[i].shape, node_dtype[i]) for i in one_term_nodes},
        {t.leaf: jnp.zeros(param_leaves[t.leaf].shape, dtypes[t.leaf]) for t in several},
    )
    if num_labels == 1:
        (squares, sums), _ = add_label(totals, 0)
    else:
        (squares, sums), _ = jax.lax.scan(add_label, totals, jnp.arange(num_labels))

    for tap in plan.taps:
        if not tap.one_term:
            continue
        dtype = dtypes[tap.leaf]
        leaf = param_leaves[tap.leaf].astype(dtype)
        other_sq = jnp.square(recorded[(tap.node, 1 - tap.operand)].astype(dtype))

        # Σ_n w_n (a_n ⊗ δ_n)² = (a²)ᵀ (w δ²): the layer's own contraction, applied to squares
        # (in the accumulation dtype), with the examples stacked along a size-1 free axis so
        # that XLA sees one plain matmul.
        stacked = _stacked_axes(plan.nodes[tap.node], tap.operand)
        if stacked is None:

            def contraction(p, other_sq=other_sq, tap=tap, dtype=dtype):
                return jax.vmap(lambda o: _consume(plan, tap, p, o, dtype))(other_sq)

            _, pull = jax.vjp(contraction, leaf)
            (total,) = pull(squares[tap.node])
        else:
            other_axis, out_axis = stacked
            other_cat = _stack_examples(other_sq, other_axis)
            _, pull = jax.vjp(
                lambda p, o=other_cat, t=tap, d=dtype: _consume(plan, t, p, o, d), leaf
            )
            (total,) = pull(_stack_examples(squares[tap.node], out_axis))
        sums[tap.leaf] = jnp.abs(total)
    return sums, logits


def _patch_conv(node: _Node, operand: int) -> bool:
    """Whether a tapped convolution kernel's per-example gradients come from image patches."""
    return (
        node.eqn.primitive.name == "conv_general_dilated"
        and operand == 1
        and node.eqn.params["batch_group_count"] == 1
    )


def _conv_patches(node: _Node, lhs: jax.Array, dtype: Any) -> jax.Array:
    """``[B, S, C_in·K]``: each example's input patches at the S output positions (im2col).

    ``lhs`` is the recorded per-example input ``[B, (1-sized batch and the rest in the conv's
    layout)]``. Features are ordered channel-major (``c·K + k``, K the kernel's spatial size), as
    ``lax.conv_general_dilated_patches`` returns them.
    """
    params = node.eqn.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    rhs_shape = node.inputs[1].aval.shape
    images = _stack_examples(lhs.astype(dtype), lhs_spec[0])
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


def _conv_kernel_grads(node: _Node, patches: jax.Array, delta: jax.Array, dtype: Any) -> jax.Array:
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
    d = _stack_examples(delta.astype(dtype), out_spec[0])
    d = jnp.transpose(d, (out_spec[0], *out_spec[2:], out_spec[1]))
    batch = d.shape[0]
    d = d.reshape(batch, -1, groups, out_features // groups)
    p = patches.reshape(batch, d.shape[1], groups, in_per_group * math.prod(spatial))
    grads = jnp.einsum("bsgi,bsgo->bgoi", p, d, precision=jax.lax.Precision.HIGHEST)
    # [B, O, I, *spatial] in (out, in, spatial) order, then into the kernel's own layout.
    grads = grads.reshape(batch, out_features, in_per_group, *spatial)
    order = np.argsort(rhs_spec)
    return jnp.transpose(grads, (0, *(1 + order)))


def _stacked_axes(node: _Node, operand: int) -> tuple[int, int] | None:
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


def _stack_examples(x: jax.Array, axis: int) -> jax.Array:
    """``[B, ..., 1 (at axis), ...]`` -> ``[..., B (at axis), ...]``: examples on a size-1 axis."""
    return jnp.moveaxis(jnp.squeeze(x, axis + 1), 0, axis)


def _expand(w: jax.Array, ndim: int) -> jax.Array:
    """``[B]`` weights reshaped to broadcast against a ``[B, ...]`` array of rank ``ndim``."""
    return w.reshape(w.shape + (1,) * (ndim - 1))


def bytes_per_example(plan: Plan) -> int:
    """A rough working-memory estimate of the fast path per example, for choosing chunks.

    Per tapped operation: its other operand, the output gradient and the running sum of squared
    output gradients; per several-terms parameter: one per-example gradient and its square; per
    convolution kernel taken from patches, the patches (float32). Labels are processed one after
    another, so the estimate does not depend on their number.
    """
    total = 0
    for tap in plan.taps:
        node = plan.nodes[tap.node]
        other = node.inputs[1 - tap.operand]
        itemsize = np.dtype(node.outputs[0].aval.dtype).itemsize
        out_size = math.prod(node.outputs[0].aval.shape)
        total += itemsize * (math.prod(other.aval.shape) + 3 * out_size)
        if not tap.one_term:
            total += 2 * itemsize * math.prod(plan.inputs[tap.leaf].aval.shape)
        if _patch_conv(node, tap.operand):
            rhs = node.inputs[1].aval.shape
            patch_features = math.prod(rhs) // rhs[node.eqn.params["dimension_numbers"].rhs_spec[0]]
            spatial_out = out_size // rhs[node.eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 4 * spatial_out * patch_features * node.eqn.params["feature_group_count"]
    return max(total, 1)


# The cost model below counts per-example FLOPs and bytes from the traced program. One byte moved
# costs about as much as this many FLOPs (a CPU core does ~50 GFLOP/s but streams ~10 GB/s).
_FLOPS_PER_BYTE = 4.0
# Measured on XLA:CPU (benchmarks/paths.py, 2-core x86): the general path's per-example kernel
# gradients of a convolution (vmap turns the examples into convolution groups) cost about 1.5x
# their FLOP count for one label but ~30x inside the scan over labels of the exact Fisher, and a
# model's own grouped convolution (feature_group_count > 1) becomes hundreds of times slower; the
# one-pass path's patch products (a batched matmul per label) run at about a third of the
# machine's matmul speed.
_CONV_PENALTY_ONE_LABEL = 1.5
_CONV_PENALTY_SCANNED = 30.0
_GROUPED_CONV_PENALTY = 1000.0
_PATCH_PRODUCT_PENALTY = 3.0


def _eqn_flops(eqn: Any) -> float:
    """FLOPs of one equation for one example (sub-programs of scan/cond/while included)."""
    name = eqn.primitive.name
    out_size = sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    if name == "dot_general":
        (contract_l, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = eqn.invars[0].aval.shape
        return 2.0 * out_size * math.prod(lhs_shape[d] for d in contract_l)
    if name == "conv_general_dilated":
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec
        rhs_shape = eqn.invars[1].aval.shape
        return 2.0 * out_size * math.prod(rhs_shape) / rhs_shape[rhs_spec[0]]
    inner = [v for v in eqn.params.values() if isinstance(v, jex.ClosedJaxpr | jex.Jaxpr)]
    inner += [
        b
        for v in eqn.params.values()
        if isinstance(v, tuple)
        for b in v
        if isinstance(b, jex.ClosedJaxpr | jex.Jaxpr)
    ]
    if inner:
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        return repeat * sum(_jaxpr_flops(j) for j in inner)
    return float(out_size)


def _jaxpr_flops(jaxpr: Any) -> float:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return sum(_eqn_flops(e) for e in jaxpr.eqns)


def path_costs(plan: Plan, num_labels: int) -> tuple[float, float]:
    """Estimated per-example cost ``(one_pass, general)`` in FLOP-equivalents.

    * general: one forward for the logits, then per label a forward, a backward for the
      activations and one for the weights (``3F``), and every per-example gradient written,
      squared and summed (``3 × 4`` bytes per parameter);
    * one pass: one forward (``F``) and per label one backward for the activations (``F``);
      per one-term layer its own contraction once (the layer's forward FLOPs) and ``δ²`` per
      label; per several-term layer, per label, its per-example gradient (its forward FLOPs)
      and that gradient's bytes; plus the general path for the leaves it does not cover.

    Convolution kernels' per-example gradients cost a measured multiple of their FLOPs on the
    general path (a grouped convolution with one group per example, see the constants above);
    the one-pass path builds them from image patches instead (the patches' bytes once, a
    batched matmul per label).
    """
    forward = sum(_eqn_flops(node.eqn) for node in plan.nodes)
    bytes_of = lambda aval: math.prod(aval.shape) * 4 * _FLOPS_PER_BYTE
    convs = [n for n in plan.nodes if n.eqn.primitive.name == "conv_general_dilated"]
    plain = _CONV_PENALTY_ONE_LABEL if num_labels == 1 else _CONV_PENALTY_SCANNED
    conv_extra = sum(
        (_GROUPED_CONV_PENALTY if n.eqn.params["feature_group_count"] > 1 else plain - 1)
        * _eqn_flops(n.eqn)
        for n in convs
    )
    all_params = sum(bytes_of(plan.inputs[i].aval) for i in range(_num_params(plan)))
    general = forward + num_labels * (3 * forward + conv_extra + 3 * all_params)
    one_pass = forward + num_labels * forward
    for tap in plan.taps:
        node = plan.nodes[tap.node]
        flops = _eqn_flops(node.eqn)
        if tap.one_term:
            one_pass += flops + num_labels * 3 * bytes_of(node.outputs[0].aval)
        else:
            leaf_bytes = bytes_of(plan.inputs[tap.leaf].aval)
            if _patch_conv(node, tap.operand):
                flops *= _PATCH_PRODUCT_PENALTY
            one_pass += num_labels * (flops + 3 * leaf_bytes)
            if _patch_conv(node, tap.operand):
                one_pass += (
                    2
                    * bytes_of(node.inputs[0].aval)
                    * math.prod(node.inputs[1].aval.shape)
                    / node.inputs[1].aval.shape[node.eqn.params["dimension_numbers"].rhs_spec[0]]
                )
    if plan.fallback:
        fallback_bytes = sum(bytes_of(plan.inputs[i].aval) for i in plan.fallback)
        one_pass += forward + num_labels * (3 * forward + conv_extra + 3 * fallback_bytes)
    return one_pass, general


def _num_params(plan: Plan) -> int:
    return len(plan.taps) + len(plan.fallback) + len(plan.unused)


def choose(plan: Plan, num_labels: int) -> tuple[int, ...] | None:
    """The cost model's choice: ``None`` for the general path everywhere, or the tapped leaves
    to move to the general path (none today: a several-term layer costs the same on both, and
    the general path's fixed cost is the forward and backward it adds)."""
    one_pass, general = path_costs(plan, num_labels)
    return None if general < one_pass else ()
