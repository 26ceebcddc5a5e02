"""K-FAC's one chunked pass: the Kronecker factors of every layer and the diagonal Fisher of the
leaves no block covers, from the same forward, labels and backward (see
:func:`ewc_jax.kfac.kfac_fisher`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ewc_jax._engine.chunking import chunked_sum
from ewc_jax._engine.dtypes import accumulate_dtype
from ewc_jax._engine.onepass import SquareSums
from ewc_jax._engine.plan import make_plan, restrict
from ewc_jax._engine.tapped import tapped_vjp
from ewc_jax._engine.targets import (
    checked_logits,
    label_targets,
    sum_over_labels,
)
from ewc_jax._kfac_layers import layer_deltas, layer_inputs
from ewc_jax._kfac_sequence import (
    gram,
    input_sum,
    output_sum,
    position_weights,
    positions,
)


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "estimator",
        "sequence",
        "token_shape",
        "chunk_size",
        "layers",
        "shardings",
        "diagonal",
        "diagonal_shardings",
        "out_dtypes",
        "check_logits",
    ),
)
def factors_pass(
    params,
    inputs,
    labels,
    keys,
    mask,
    *,
    apply_fn,
    estimator,
    sequence,
    token_shape,
    chunk_size,
    layers,
    shardings,
    diagonal,
    diagonal_shardings,
    out_dtypes,
    check_logits,
):
    """``([(A, G)] per layer, [diagonal Fisher] per leaf in ``diagonal``)`` from one chunked
    pass: chunked sums of ``ā āᵀ`` (with the count they average over) and of ``δ δᵀ``, the
    latter divided by N, each constrained to its ``(A, G)`` shardings in ``shardings``; and
    the same pass's ``Σ w g²`` of the ``diagonal`` leaves divided by N, as ``fisher_diagonal``
    sums them (:class:`~ewc_jax._engine.onepass.SquareSums`), each constrained to its
    ``diagonal_shardings`` (None: unconstrained)."""
    leaves = jax.tree.leaves(params)
    n = jax.tree.leaves(inputs)[0].shape[0]
    flat = shardings is None  # Gram products over flattened rows, unless split (see gram)

    def placed(sums, diag):  # A, G and the diagonal on their shardings
        if shardings is not None:
            sums = [
                (
                    jax.lax.with_sharding_constraint(a, sa),
                    *rest[:-1],
                    jax.lax.with_sharding_constraint(rest[-1], sg),
                )
                for (a, *rest), (sa, sg) in zip(sums, shardings, strict=True)
            ]
        if diagonal_shardings is not None:
            diag = [
                jax.lax.with_sharding_constraint(d, s)
                for d, s in zip(diag, diagonal_shardings, strict=True)
            ]
        return sums, diag

    def sums(data, weight):
        x, y, k, m = data
        example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
        plan = make_plan(apply_fn.fn, params, example)
        # The leaves without a block: tapped where fisher_diagonal's one-pass path taps them,
        # the rest (embeddings, a leaf used twice) differentiated per example in the same pass.
        diag_plan = restrict(plan, diagonal)
        nodes = sorted({node for node, *_ in layers} | set(diag_plan.perturbed_nodes))
        logits, pullback, recorded = tapped_vjp(
            plan, leaves, jax.tree.leaves(x), nodes, diag_plan.fallback
        )
        logits = checked_logits(logits, check_logits)
        num_labels, target = label_targets(logits, estimator, y, k, m, weight)
        squares = SquareSums.of(diag_plan, leaves, recorded, weight.shape[0], diag_plan.fallback)
        dtypes = [accumulate_dtype(leaves[kernel].dtype) for _, kernel, *_ in layers]
        batch = weight.shape[0]
        # [B, S] counted positions of each Dense layer applied over extra axes; None otherwise.
        counted = [
            None
            if positions(plan.nodes[node]) is None
            else position_weights(plan.nodes[node], m, token_shape, batch, dtype)
            for (node, *_), dtype in zip(layers, dtypes, strict=True)
        ]
        a_sums = []
        for (node, _, bias, *_), dtype, c in zip(layers, dtypes, counted, strict=True):
            a = layer_inputs(plan, node, recorded, dtype)
            if bias is not None:
                a = jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), dtype)], axis=2)
            if c is not None:  # K-FAC-expand or -reduce (Eschenhagen et al. 2023).
                a_sums.append(input_sum(a, c, weight, sequence, flat))
                continue
            # Σ over output positions (Grosse & Martens 2016; one position for Dense).
            w = weight.astype(dtype)
            a_sums.append((gram(a, jnp.broadcast_to(w[:, None], a.shape[:2]), flat), jnp.sum(w)))

        def add_label(totals, label):
            g_sums, diag = totals
            cotangent, w = target(label)
            deltas, grads = pullback(cotangent.astype(logits.dtype))
            new = []
            for total, (node, *_), dtype, c in zip(g_sums, layers, dtypes, counted, strict=True):
                d = layer_deltas(plan, node, deltas[node], dtype)
                if c is not None:
                    new.append(total + output_sum(d, c, w, sequence, flat))
                    continue
                # Mean over output positions (spatial homogeneity; Grosse & Martens 2016).
                scale = jnp.asarray(1.0 / d.shape[1], dtype)
                ws = jnp.broadcast_to(w.astype(dtype)[:, None], d.shape[:2])
                new.append(total + scale * gram(d, ws, flat))
            return (new, squares.add(diag, deltas, grads, w)), None

        zero = [
            jnp.zeros((out, out), dtype) for (*_, out), dtype in zip(layers, dtypes, strict=True)
        ]
        g_sums, diag = sum_over_labels(add_label, (zero, squares.zero()), num_labels)
        diag = squares.finish(diag)
        # Leaves the logits do not depend on get zeros, as in fisher_diagonal.
        diag = [
            diag[i] if i in diag else jnp.zeros(leaves[i].shape, accumulate_dtype(leaves[i].dtype))
            for i in diagonal
        ]
        factor_sums = [(a, count, g) for (a, count), g in zip(a_sums, g_sums, strict=True)]
        return placed(factor_sums, diag)

    factor_sums, diag = chunked_sum(sums, (inputs, labels, keys, mask), chunk_size)
    return placed(
        [(a / count, g / n) for a, count, g in factor_sums],
        [(t / n).astype(d) for t, d in zip(diag, out_dtypes, strict=True)],
    )
