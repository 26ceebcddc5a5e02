"""The cost model: which path each parameter takes, and how many examples go in a chunk.

:func:`policy` estimates each path's per-example FLOPs and bytes from the traced program
(:func:`path_costs`) and picks one; :func:`default_chunk_size` is the one place a chunk size is
chosen when the caller gives none, for the Fisher, MAS and K-FAC alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import numpy as np
from jax.extend import core as jex

from ewc_jax._engine.model import Model, output_shape
from ewc_jax._engine.plan import (
    LAYOUT_OPS,
    Plan,
    make_plan,
    move_to_fallback,
    num_params,
    restrict,
)
from ewc_jax._engine.tapped import patch_conv

MEMORY_BUDGET_BYTES = 512 * 2**20
"""Working memory a chunk may use when ``chunk_size`` is not given."""


MAX_GENERAL_CHUNK = 1024
"""The largest default chunk where per-example gradients are formed (the general path)."""
MAX_FAST_CHUNK = 16384
"""The largest default chunk of the one-pass path when every layer has one term per example."""
MAX_SMALL_CHUNK = 256
"""The largest default chunk of MAS and the K-FAC factors."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which path each parameter leaf takes; hashable, a static argument of the jitted sums.

    ``general=True``: every leaf on the general path. Otherwise the one-pass plan is rebuilt
    inside the jit and the leaves in ``to_general`` are untapped: differentiated per example in
    the same pass, as the leaves the plan cannot tap are.
    """

    general: bool
    selected: tuple[int, ...]
    to_general: tuple[int, ...] = ()
    bytes_per_example: int = 1
    max_chunk: int = MAX_GENERAL_CHUNK
    check_logits: bool = True  # fail on NaN/Inf logits (see ewc_jax.checks_enabled)


@functools.lru_cache(maxsize=256)
def policy(
    model: Model, num_labels: int, method: str, selected: tuple[int, ...] | None = None
) -> Policy:
    """Which path each selected leaf takes (``None``: all leaves): all general, all one-pass, or
    the cost model's choice."""
    if selected is None:
        selected = tuple(range(len(model.params)))
    general_bytes = general_bytes_per_example(model.params, selected)
    if method == "general":
        return Policy(general=True, selected=selected, bytes_per_example=general_bytes)
    plan = make_plan(model.shape_fn(), model.params_tree(), model.example_tree())
    plan = restrict(plan, selected)
    choice: tuple[int, ...] = ()
    if method == "auto":
        chosen = choose(plan, num_labels)
        if chosen is None:
            return Policy(general=True, selected=selected, bytes_per_example=general_bytes)
        choice = tuple(chosen)
        plan = move_to_fallback(plan, choice)
    per_example = bytes_per_example(plan)
    # Large chunks pay off only where no per-example gradient is formed (one-term layers);
    # with per-layer per-example gradients, chunks as small as the general path's keep them
    # in cache (measured 15-20% faster for Dense layers over sequences at N = 4096).
    max_chunk = MAX_FAST_CHUNK
    if plan.fallback or not all(t.one_term for t in plan.taps):
        max_chunk = MAX_GENERAL_CHUNK
    if plan.fallback:
        per_example += general_bytes_per_example(model.params, plan.fallback)
    return Policy(
        general=False,
        selected=selected,
        to_general=choice,
        bytes_per_example=per_example,
        max_chunk=max_chunk,
    )


def general_bytes_per_example(params_spec, leaf_indices) -> int:
    return 3 * sum(
        math.prod(params_spec[i].shape) * max(params_spec[i].dtype.itemsize, 4)
        for i in leaf_indices
    )


def num_labels(estimator: str, num_classes: int, token_shape: tuple[int, ...]) -> int:
    """Backward passes per chunk: one per label for the exact Fisher (per token and label)."""
    return num_classes * math.prod(token_shape) if estimator == "exact" else 1


def default_chunk_size(bytes_per_example: int, max_chunk: int) -> int:
    """Examples per chunk when the caller gives none: the one place a chunk size is chosen.

    As many examples as keep the working memory (``bytes_per_example`` each, an estimate) under
    ``MEMORY_BUDGET_BYTES``, at least 1 and at most ``max_chunk`` (larger chunks stop paying
    off: see :class:`Policy`).
    """
    return int(np.clip(MEMORY_BUDGET_BYTES // max(bytes_per_example, 1), 1, max_chunk))


def auto_method(model: Model, estimator: str) -> Literal["one_pass", "general"]:
    """The path ``method="auto"`` takes for this model and estimator (for benchmarks)."""
    token_shape, num_classes = output_shape(model)
    labels = num_labels(estimator, num_classes, token_shape)
    return "general" if policy(model, labels, "auto").general else "one_pass"


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
        if patch_conv(node, tap.operand):
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
      and that gradient's bytes; per leaf it does not tap (differentiated per example in the same
      backward pass), per label the FLOPs of the operations it enters and its gradient's bytes.

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
    all_params = sum(bytes_of(plan.inputs[i].aval) for i in range(num_params(plan)))
    general = forward + num_labels * (3 * forward + conv_extra + 3 * all_params)
    one_pass = forward + num_labels * forward
    for tap in plan.taps:
        node = plan.nodes[tap.node]
        flops = _eqn_flops(node.eqn)
        if tap.one_term:
            one_pass += flops + num_labels * 3 * bytes_of(node.outputs[0].aval)
        else:
            leaf_bytes = bytes_of(plan.inputs[tap.leaf].aval)
            if patch_conv(node, tap.operand):
                flops *= _PATCH_PRODUCT_PENALTY
            one_pass += num_labels * (flops + 3 * leaf_bytes)
            if patch_conv(node, tap.operand):
                one_pass += (
                    2
                    * bytes_of(node.inputs[0].aval)
                    * math.prod(node.inputs[1].aval.shape)
                    / node.inputs[1].aval.shape[node.eqn.params["dimension_numbers"].rhs_spec[0]]
                )
    for leaf in plan.fallback:
        # Differentiated per example in the same backward pass: per label, the weight gradients
        # of the operations it enters (vmap batches them, as the general path does) and that
        # gradient's bytes.
        consumers = _consumers(plan, leaf)
        flops = sum(_eqn_flops(plan.nodes[i].eqn) for i in consumers)
        flops += sum(
            (_GROUPED_CONV_PENALTY if n.eqn.params["feature_group_count"] > 1 else plain - 1)
            * _eqn_flops(n.eqn)
            for n in (plan.nodes[i] for i in consumers)
            if n.eqn.primitive.name == "conv_general_dilated"
        )
        one_pass += num_labels * (flops + 3 * bytes_of(plan.inputs[leaf].aval))
    return one_pass, general


def _consumers(plan: Plan, leaf: int) -> set[int]:
    """The nodes that take the leaf as an input, followed through layout-only operations."""
    found: set[int] = set()
    frontier = {id(plan.inputs[leaf])}
    while frontier:
        following = set()
        for i, node in enumerate(plan.nodes):
            if i in found or not any(id(r) in frontier for r in node.inputs):
                continue
            if node.eqn.primitive.name in LAYOUT_OPS and len(node.outputs) == 1:
                following.update(id(r) for r in node.outputs if r is not None)
            else:
                found.add(i)
        frontier = following
    return found


def choose(plan: Plan, num_labels: int) -> tuple[int, ...] | None:
    """The cost model's choice: ``None`` for the general path everywhere, or the tapped leaves
    to differentiate per example instead (none today: a several-term layer costs about the same
    either way)."""
    one_pass, general = path_costs(plan, num_labels)
    return None if general < one_pass else ()
