"""Which labels to differentiate, and the general path: per-example gradients by ``vmap(grad)``.

Every estimator of the Fisher is ``Σ_k Σ_n w_kn (J_nᵀ v_kn)²`` for some label distribution: ``v``
is the gradient of the log-likelihood at the logits, ``e_y - softmax(logits)``, and ``w`` the
weight of that label. :func:`label_targets` gives ``(K, target)`` for each estimator;
:func:`general_sums` computes the sum for any parameter with per-example VJPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._engine.dtypes import accumulate_dtype
from ewc_jax._engine.model import per_example_logits
from ewc_jax._types import ApplyFn, Params, PyTree
from ewc_jax._validation import fail_if

NON_FINITE_LOGITS = (
    "logits has non-finite values (NaN or Inf): apply_fn returned them for finite params and "
    "inputs; check the model (an overflow, a log or division of zero) and model_state"
)


def checked_logits(logits: jax.Array, policy_checks: bool) -> jax.Array:
    if not policy_checks:
        return logits
    bad = jnp.logical_not(jnp.all(jnp.isfinite(logits)))
    return fail_if(logits, [(bad, NON_FINITE_LOGITS, lambda: ".")])


def logit_errors_as_value_errors(compute, traced, *args, **kwargs):
    """Runs ``compute``; called eagerly, a failed logits check raises ValueError, as the other
    checks do (under an outer jit it fails that program with the same message)."""
    if traced:
        return compute(*args, **kwargs)
    try:
        return jax.block_until_ready(compute(*args, **kwargs))
    except jax.errors.JaxRuntimeError as error:
        if NON_FINITE_LOGITS in str(error):
            raise ValueError(NON_FINITE_LOGITS + ".") from None
        raise


def label_targets(
    logits: jax.Array,
    estimator: str,
    labels: jax.Array | None,
    keys: jax.Array | None,
    mask: jax.Array | None,
    weight: jax.Array,
) -> tuple[int, Callable[[jax.Array], tuple[jax.Array, jax.Array]]]:
    """The labels to differentiate, as ``(K, target)`` with ``target(k) -> (v [B, *S, C], w [B])``.

    ``v`` is the gradient of the log-likelihood at the logits, ``e_y - softmax(logits)`` at every
    counted token, and ``w`` the weight of that term in the Fisher sum. ``weight`` [B] masks
    examples (the overlap of the last chunk, padding).
    """
    logits = jax.lax.stop_gradient(logits)
    acc = accumulate_dtype(logits.dtype)
    batch, num_classes = logits.shape[0], logits.shape[-1]
    tokens = math.prod(logits.shape[1:-1])
    probs = jax.nn.softmax(logits.astype(acc), axis=-1)
    token_mask = jnp.ones(logits.shape[:-1], acc) if mask is None else mask.astype(acc)
    weight = weight.astype(acc)
    if estimator == "exact":
        flat_probs = probs.reshape(batch, tokens, num_classes)
        flat_mask = token_mask.reshape(batch, tokens)

        def target(k):
            token, label = k // num_classes, k % num_classes
            onehot = jax.nn.one_hot(label, num_classes, dtype=acc)
            v = jnp.zeros_like(flat_probs).at[:, token].set(onehot[None] - flat_probs[:, token])
            w = weight * flat_mask[:, token] * flat_probs[:, token, label]
            return v.reshape(probs.shape), w

        return tokens * num_classes, target
    if estimator == "argmax":
        chosen = jnp.argmax(logits, axis=-1)
    elif estimator == "sampled":
        chosen = jax.vmap(jax.random.categorical)(keys, logits.astype(acc))
    else:
        chosen = labels
    v = (jax.nn.one_hot(chosen, num_classes, dtype=acc) - probs) * token_mask[..., None]
    return 1, lambda k: (v, weight)


def general_sums(
    apply_fn: ApplyFn,
    params: Params,
    x: PyTree,
    num_labels: int,
    target: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    leaf_indices: tuple[int, ...],
) -> dict[int, jax.Array]:
    """``Σ_k Σ_n w_kn g_kn²`` via per-example VJPs (``vmap(grad)``) for the chosen leaves."""
    leaves, treedef = jax.tree.flatten(params)

    def score(selected, x_n, v_n):
        # ∇θ log p(y | x) = Jᵀ (e_y − p): the VJP of the logits with the cotangent v.
        def logits_of(sel):
            full = list(leaves)
            for i, value in zip(leaf_indices, sel, strict=True):
                full[i] = value
            return per_example_logits(apply_fn, jax.tree.unflatten(treedef, full), x_n)

        out, pull = jax.vjp(logits_of, selected)
        return pull(v_n.astype(out.dtype))[0]

    selected = [leaves[i] for i in leaf_indices]
    per_example = jax.vmap(score, in_axes=(None, 0, 0))
    zero = [jnp.zeros(s.shape, accumulate_dtype(s.dtype)) for s in selected]

    def one_label(total, k):
        v, w = target(k)
        grads = per_example(selected, x, v)
        # A dot with the weights, not a sum over the batch axis: XLA:CPU runs it several
        # times faster, and the weights also mask the overlap of the last chunk.
        return [
            t + jnp.tensordot(w.astype(t.dtype), jnp.square(g.astype(t.dtype)), axes=1)
            for t, g in zip(total, grads, strict=True)
        ], None

    return dict(zip(leaf_indices, sum_over_labels(one_label, zero, num_labels), strict=True))


def sum_over_labels(add_label: Callable[[Any, Any], tuple[Any, None]], zero: Any, num_labels: int):
    """``add_label`` folded over the labels ``0..K-1`` (a ``lax.scan`` when ``K > 1``)."""
    if num_labels == 1:
        total, _ = add_label(zero, 0)
    else:
        total, _ = jax.lax.scan(add_label, zero, jnp.arange(num_labels))
    return total
