r"""Memory Aware Synapses: parameter importance from the sensitivity of the output, no labels."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._engine.chunking import chunked_sum
from ewc_jax._engine.cost import (
    MAX_SMALL_CHUNK,
    bytes_per_example,
    default_chunk_size,
    general_bytes_per_example,
)
from ewc_jax._engine.dtypes import accumulate_dtype, result_dtype
from ewc_jax._engine.inputs import check_positive, num_examples
from ewc_jax._engine.model import Model, Static, check_params, output_shape, per_example_logits
from ewc_jax._engine.onepass import SquareSums
from ewc_jax._engine.plan import make_plan
from ewc_jax._engine.tapped import tapped_vjp
from ewc_jax._fisher import METHODS, Method
from ewc_jax._types import ApplyFn, Params, PyTree


def mas_importance(
    apply_fn: ApplyFn,
    params: Params,
    inputs: PyTree,
    *,
    chunk_size: int | None = None,
    method: Method = "auto",
    dtype: jax.typing.DTypeLike | None = None,
) -> Params:
    r"""MAS importance :math:`Ω_i = \frac1N \sum_n \left|\frac{\partial \lVert f(x_n; θ)\rVert_2^2}
    {\partial θ_i}\right|`.

    ``f`` is the model output ``apply_fn(θ, x)`` (the logits, before any softmax) and the norm is
    the *squared* L2 norm over all of one example's outputs, the choice Aljundi et al. make for
    their experiments (its gradient is ``2 Jᵀ f``). The absolute value is taken per example,
    then averaged over the N examples, as the paper defines it; the authors' released code
    instead takes the absolute value of mini-batch gradients of the outputs' mean square, a
    smaller quantity (triangle inequality, and the mean over output units). No labels are
    needed: importance measures how much the output moves, whatever the task. The result is a
    params-shaped precision: use it where a Fisher goes, in :func:`consolidate` and
    :func:`penalty` (the MAS penalty
    :math:`λ \sum_i Ω_i (θ_i - θ^*_i)^2` is ``penalty(..., strength=2λ)``).

    **Paths.** ``method="general"``: per-example gradients with ``jax.vmap(jax.grad)``, chunk by
    chunk. ``method="one_pass"``: parameters that enter through a one-term contraction (a Dense
    kernel on a ``[features]`` input, a bias added once, an elementwise scale) take their
    per-example gradient ``a_n ⊗ δ_n``, whose absolute value is ``|a_n| ⊗ |δ_n|``, so that
    :math:`\sum_n |a_n ⊗ δ_n| = |a|^\top |δ|`, one matrix product per layer from one forward and
    one backward pass; the others (a convolution's kernel, an embedding, a leaf used twice) take
    their per-example gradients from the same backward pass (the diagonal Fisher's one pass,
    :mod:`ewc_jax._engine.onepass`, with ``|·|`` in place of ``(·)²``). ``"auto"`` (default) is
    ``"one_pass"`` when at least one parameter is covered, else ``"general"``. Both agree to
    float rounding.

    Args:
      apply_fn: ``apply_fn(params, inputs_batch) -> outputs [B, ...]``; examples independent.
      params: a pytree of floating-point arrays.
      inputs: an array or pytree of arrays with a leading example axis N.
      chunk_size: examples per chunk (memory vs. speed); default: as many as fit the memory
        budget, at most 256.
      method: ``"auto"``, ``"one_pass"`` or ``"general"``.
      dtype: dtype of the result; default float32 for 16-bit params, else the param's own.

    Returns:
      A pytree with the structure and shapes of ``params``, entries >= 0.

    Raises:
      ValueError: unknown method, non-float params, an empty input, a bad chunk_size.

    Example:
      A linear model at zero weights outputs its bias ``b``, so
      :math:`Ω_{W_{ic}} = 2 |b_c| \overline{|x_i|}` and :math:`Ω_{b_c} = 2 |b_c|`:

      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.array([1.0, -0.5])}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
      >>> omega = ewc_jax.importance.mas_importance(apply_fn, params, x)
      >>> omega["w"].tolist(), omega["b"].tolist()  # mean |x| = (1, 1, 0)
      ([[2.0, 1.0], [2.0, 1.0], [0.0, 0.0]], [2.0, 1.0])
      >>> state = ewc_jax.consolidate(None, params, omega)  # Ω takes the Fisher's place

    References:
      Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, "Memory Aware Synapses: Learning what
      (not) to forget", ECCV 2018.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid methods: {METHODS}.")
    check_positive("chunk_size", chunk_size)
    check_params(params)
    n = num_examples(inputs)
    model = Model.of(apply_fn, params, inputs)
    output_shape(model)
    out_dtypes = tuple(result_dtype(leaf, dtype) for leaf in jax.tree.leaves(params))
    plan = None
    if method != "general":
        plan = make_plan(apply_fn, model.params_tree(), model.example_tree())
    one_pass = plan is not None and (method == "one_pass" or any(t.one_term for t in plan.taps))
    if chunk_size is None:
        general = range(len(model.params))
        per_example = general_bytes_per_example(model.params, general)
        if one_pass:
            general = {*plan.fallback, *(t.leaf for t in plan.taps if not t.one_term)}
            per_example = bytes_per_example(plan) + general_bytes_per_example(model.params, general)
        chunk_size = default_chunk_size(per_example, MAX_SMALL_CHUNK)
    return _mas(
        params,
        inputs,
        apply_fn=Static(apply_fn),
        chunk_size=min(int(chunk_size), n),
        one_pass=one_pass,
        out_dtypes=out_dtypes,
    )


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size", "one_pass", "out_dtypes"))
def _mas(params, inputs, *, apply_fn, chunk_size, one_pass, out_dtypes):
    leaves, treedef = jax.tree.flatten(params)
    n = jax.tree.leaves(inputs)[0].shape[0]

    def sums(x, weight):
        if not one_pass:
            return _as_list(_general_abs_sums(apply_fn.fn, params, x, weight, range(len(leaves))))
        return _as_list(_one_pass_abs_sums(apply_fn.fn, params, x, weight))

    def _as_list(found: dict[int, jax.Array]) -> list[jax.Array]:
        return [
            found[i] if i in found else jnp.zeros(p.shape, accumulate_dtype(p.dtype))
            for i, p in enumerate(leaves)
        ]

    total = chunked_sum(sums, inputs, chunk_size)
    return jax.tree.unflatten(
        treedef, [(t / n).astype(d) for t, d in zip(total, out_dtypes, strict=True)]
    )


def _squared_norm(out: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(out.astype(accumulate_dtype(out.dtype))))


def _general_abs_sums(
    apply_fn: ApplyFn, params: Params, x: PyTree, weight: jax.Array, leaf_indices: Any
) -> dict[int, jax.Array]:
    """``Σ_n w_n |∇_θ ‖f(x_n)‖²|`` for the chosen leaves, via ``vmap(grad)``."""
    leaves, treedef = jax.tree.flatten(params)
    leaf_indices = tuple(leaf_indices)

    def sensitivity(selected, x_n):
        def norm_of(sel):
            full = list(leaves)
            for i, value in zip(leaf_indices, sel, strict=True):
                full[i] = value
            return _squared_norm(
                per_example_logits(apply_fn, jax.tree.unflatten(treedef, full), x_n)
            )

        return jax.grad(norm_of)(selected)

    selected = [leaves[i] for i in leaf_indices]
    grads = jax.vmap(sensitivity, in_axes=(None, 0))(selected, x)
    out = {}
    for i, g in zip(leaf_indices, grads, strict=True):
        acc = accumulate_dtype(leaves[i].dtype)
        out[i] = jnp.tensordot(weight.astype(acc), jnp.abs(g.astype(acc)), axes=1)
    return out


def _one_pass_abs_sums(
    apply_fn: ApplyFn, params: Params, x: PyTree, weight: jax.Array
) -> dict[int, jax.Array]:
    """``Σ_n w_n |g_n|`` from one forward and one backward pass: ``|a|ᵀ (w |δ|)`` for one-term
    layers, per-example gradients for the rest (the Fisher's pass with ``|·|`` for ``(·)²``)."""
    leaves = jax.tree.leaves(params)
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
    plan = make_plan(apply_fn, params, example)
    out, pullback, recorded = tapped_vjp(
        plan, leaves, jax.tree.leaves(x), plan.perturbed_nodes, plan.fallback
    )
    sums = SquareSums.of(
        plan, leaves, recorded, weight.shape[0], plan.fallback, elementwise=jnp.abs
    )
    # δ = ∂‖f‖²/∂z = Jᵀ 2f at every tapped output z; one "label" of weight w.
    deltas, grads = pullback(2 * jax.lax.stop_gradient(out))
    return sums.finish(sums.add(sums.zero(), deltas, grads, weight))
