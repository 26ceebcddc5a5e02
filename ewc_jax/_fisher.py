r"""The diagonal Fisher information of a categorical model, estimated five ways."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import _fast_fisher
from ewc_jax._types import ApplyFn, Params, PyTree
from ewc_jax._validation import concrete_or_none

ESTIMATORS = ("exact", "sampled", "empirical", "argmax", "batched")
Estimator = Literal["exact", "sampled", "empirical", "argmax", "batched"]

MEMORY_BUDGET_BYTES = 512 * 2**20
"""Working memory a chunk may use when ``chunk_size`` is not given."""

_MAX_GENERAL_CHUNK = 1024
_MAX_FAST_CHUNK = 16384


class _Static:
    """Wraps ``apply_fn`` so it can be a static jit argument, compared by identity."""

    def __init__(self, fn: ApplyFn):
        self.fn = fn

    def __hash__(self) -> int:
        try:
            return hash(self.fn)
        except TypeError:
            return id(getattr(self.fn, "__func__", self.fn))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self.fn == other.fn


def fisher_diagonal(
    apply_fn: ApplyFn,
    params: Params,
    inputs: PyTree,
    labels: jax.typing.ArrayLike | None = None,
    *,
    estimator: Estimator = "exact",
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    fast: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> Params:
    r"""Diagonal of the Fisher information of ``p(y | x, θ) = softmax(apply_fn(θ, x))_y``.

    .. math:: F_i = \frac{1}{N} \sum_{n=1}^{N} \mathbb{E}_{y \sim q_n}
              \left[\left(\frac{\partial \log p(y \mid x_n, θ)}{\partial θ_i}\right)^2\right]

    a mean over examples of *squared per-example* gradients (never the square of a mean gradient,
    except for ``"batched"``). The estimators differ only in the label distribution ``q_n``:

    * ``"exact"``: the true Fisher, ``q_n = p(· | x_n, θ)``: all C classes, each weighted by the
      model's probability. Cost: the fast path combines ``Σ_c p_c δ_c²`` before the weight
      contraction, so it is a small multiple of one backward pass.
    * ``"sampled"``: one label per example drawn from ``p(· | x_n, θ)`` (``key`` required): an
      unbiased Monte-Carlo estimate of the true Fisher.
    * ``"empirical"``: the given ``labels`` (the "empirical Fisher"; Kunstner et al. 2019 show it
      can differ badly from the true one away from a perfect fit).
    * ``"argmax"``: the model's most likely class, as the PyTorch tutorial and
      moskomule/ewc.pytorch do.
    * ``"batched"``: squares of *mini-batch mean* gradients over consecutive batches of
      ``batch_size`` true-labelled examples, averaged over batches, as Avalanche computes it:
      :math:`\frac{1}{M}\sum_b (\frac{1}{|b|}\sum_{n\in b} g_n)^2`. Cross terms between examples
      mostly cancel, so it is roughly ``1/batch_size`` of the empirical Fisher plus the squared
      mean gradient: a different quantity that needs a far larger strength. Offered only to
      reproduce such results; ``batch_size=1`` equals ``"empirical"``.

    Per-example gradients are ``jax.vmap(jax.grad(log p))`` on the general path. With
    ``fast=True`` (default), parameters that enter through dense/convolution contractions,
    biases and elementwise scales are computed in one forward and one backward pass per chunk,
    from layer inputs ``a`` and output gradients ``δ`` as :math:`(a^2)^\top δ^2` (see
    ``ewc_jax._fast_fisher``); all other parameters take the general path. Both agree to float
    rounding. Examples are processed ``chunk_size`` at a time inside one jitted ``lax.scan``, so
    working memory does not grow with N; the last chunk overlaps the previous one and masks the
    overlap, so every example counts exactly once.

    Args:
      apply_fn: ``apply_fn(params, inputs_batch) -> logits`` of shape ``[B, C]`` (e.g. a Flax
        ``model.apply``). It must treat examples independently.
      params: a pytree of floating-point arrays.
      inputs: an array, or a pytree of arrays, with a leading example axis N.
      labels: int labels ``[N]`` in ``[0, C)``; required for ``"empirical"`` and ``"batched"``.
      estimator: one of ``"exact"``, ``"sampled"``, ``"empirical"``, ``"argmax"``, ``"batched"``.
      key: a PRNG key; required for ``"sampled"``. Example ``n`` uses ``split(key, N)[n]``, so
        results do not depend on ``chunk_size``.
      chunk_size: examples per chunk; default: as many as fit in ``MEMORY_BUDGET_BYTES``.
      batch_size: mini-batch size for ``"batched"``.
      fast: use the one-pass path where it applies; ``False`` forces ``vmap(grad)`` everywhere.
      mesh: data parallelism: a ``jax.sharding.Mesh`` whose first axis splits the examples
        across devices (params replicated); each device runs the chunked computation on its
        shard and one ``psum`` adds them up. ``None``: one device. ``"batched"`` ignores it.

    Returns:
      A pytree with the structure, shapes and dtypes of ``params``; every entry >= 0.

    Raises:
      ValueError: unknown estimator, a missing ``labels``/``key``/``batch_size``, labels of the
        wrong length or out of range, logits that are not ``[B, C]``, an empty input.

    Example::

        fisher = ewc_jax.fisher_diagonal(model.apply, params, x_train[:512], estimator="exact")

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
      Kunstner, Balles & Hennig, "Limitations of the empirical Fisher approximation for natural
      gradient descent", NeurIPS 2019.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; valid estimators: {ESTIMATORS}.")
    _check_params(params)
    n = _num_examples(inputs)
    num_classes = _num_classes(apply_fn, params, inputs)
    if estimator in ("empirical", "batched"):
        if labels is None:
            raise ValueError(
                f"estimator={estimator!r} needs labels (the true class of each input)."
            )
        labels = _checked_labels(labels, n, num_classes)
    else:
        labels = None
    if estimator == "sampled" and key is None:
        raise ValueError("estimator='sampled' needs key, e.g. key=jax.random.key(0).")
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    static_fn = _Static(apply_fn)

    if estimator == "batched":
        if batch_size is None:
            raise ValueError("estimator='batched' needs batch_size (the mini-batch size).")
        return _batched_fisher(params, inputs, labels, apply_fn=static_fn, batch_size=batch_size)

    keys = jax.random.split(key, n) if estimator == "sampled" else None
    if chunk_size is None:
        chunk_size = _default_chunk_size(apply_fn, params, inputs, fast)
    return _chunked_fisher(
        params,
        inputs,
        labels,
        keys,
        apply_fn=static_fn,
        estimator=estimator,
        chunk_size=min(int(chunk_size), n),
        fast=fast,
        mesh=mesh,
    )


def _check_params(params: Params) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("params has no array leaves.")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; the "
                "Fisher is defined for floating-point parameters only."
            )


def _num_examples(inputs: PyTree) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("inputs has no array leaves.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "every leaf of inputs needs the same leading example axis N; got shapes "
            f"{[np.shape(x) for x in leaves]}."
        )
    (n,) = sizes
    if n == 0:
        raise ValueError("inputs is empty (N = 0): the Fisher needs at least one example.")
    return int(n)


def _num_classes(apply_fn: ApplyFn, params: Params, inputs: PyTree) -> int:
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2, *np.shape(x)[1:]), x.dtype), inputs)
    out = jax.eval_shape(apply_fn, params, batch)
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != 2:
        raise ValueError(
            f"apply_fn must return logits of shape [B, C]; for a batch of 2 it returned {shape}. "
            "For a multi-head model, pass an apply_fn that selects one head."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"apply_fn must return floating-point logits, got dtype {out.dtype}.")
    return int(shape[1])


def _checked_labels(labels: Any, n: int, num_classes: int) -> jax.Array:
    if np.shape(labels) != (n,):
        raise ValueError(f"labels must have shape [N] = ({n},), got {np.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}.")
    value = concrete_or_none(labels)
    if value is not None and ((value < 0).any() or (value >= num_classes).any()):
        bad = value[(value < 0) | (value >= num_classes)]
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for the model's {num_classes} logits; "
            f"found {bad[:5].tolist()}."
        )
    return jnp.asarray(labels, jnp.int32)


def _accumulate_dtype(dtype: Any) -> np.dtype:
    """Sums run in float32 at least (bfloat16/float16 squares would lose most digits)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


def _default_chunk_size(apply_fn: ApplyFn, params: Params, inputs: PyTree, fast: bool) -> int:
    """Examples per chunk so that the working memory stays under ``MEMORY_BUDGET_BYTES``."""
    leaves = jax.tree.leaves(params)
    general_bytes = 3 * sum(math.prod(np.shape(p)) * jnp.result_type(p).itemsize for p in leaves)
    if not fast:
        return int(np.clip(MEMORY_BUDGET_BYTES // general_bytes, 1, _MAX_GENERAL_CHUNK))
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), inputs)
    plan = _fast_fisher.make_plan(apply_fn, params, example)
    per_example = _fast_fisher.bytes_per_example(plan)
    limit = _MAX_FAST_CHUNK
    if plan.fallback:
        fallback_bytes = 3 * sum(
            math.prod(np.shape(leaves[i])) * jnp.result_type(leaves[i]).itemsize
            for i in plan.fallback
        )
        per_example += fallback_bytes
        limit = _MAX_GENERAL_CHUNK
    return int(np.clip(MEMORY_BUDGET_BYTES // per_example, 1, limit))


def _targets(
    logits: jax.Array, estimator: str, labels: jax.Array | None, keys: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Which labels to differentiate, and their weights: ``([K, B] int32, [K, B] float)``."""
    logits = jax.lax.stop_gradient(logits)
    batch, num_classes = logits.shape
    if estimator == "exact":
        probs = jax.nn.softmax(logits.astype(_accumulate_dtype(logits.dtype)), axis=-1)
        classes = jnp.broadcast_to(
            jnp.arange(num_classes, dtype=jnp.int32)[:, None], (num_classes, batch)
        )
        return classes, probs.T
    if estimator == "argmax":
        chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    elif estimator == "sampled":
        chosen = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    else:
        chosen = labels
    return chosen[None], jnp.ones((1, batch), _accumulate_dtype(logits.dtype))


def _log_likelihood(apply_fn: ApplyFn, params: Params, x: PyTree, y: jax.Array) -> jax.Array:
    """``log p(y | x, θ)`` for one example (no batch axis)."""
    logits = apply_fn(params, jax.tree.map(lambda a: a[None], x))[0]
    return jax.nn.log_softmax(logits)[y]


def _general_sums(
    apply_fn: ApplyFn,
    params: Params,
    x: PyTree,
    classes: jax.Array,
    weights: jax.Array,
    leaf_indices: tuple[int, ...],
) -> dict[int, jax.Array]:
    """``Σ_k Σ_n w_kn g_kn²`` via ``vmap(grad)`` for the chosen parameter leaves."""
    leaves, treedef = jax.tree.flatten(params)

    def log_lik(selected, x_n, y_n):
        full = list(leaves)
        for i, value in zip(leaf_indices, selected, strict=True):
            full[i] = value
        return _log_likelihood(apply_fn, jax.tree.unflatten(treedef, full), x_n, y_n)

    selected = [leaves[i] for i in leaf_indices]
    per_example = jax.vmap(jax.grad(log_lik), in_axes=(None, 0, 0))
    zero = [jnp.zeros(s.shape, _accumulate_dtype(s.dtype)) for s in selected]

    def one_class(total, class_and_weight):
        y, w = class_and_weight
        grads = per_example(selected, x, y)
        # A dot with the weights, not a sum over the batch axis: XLA:CPU runs it several
        # times faster, and the weights also mask the overlap of the last chunk.
        return [
            t + jnp.tensordot(w.astype(t.dtype), jnp.square(g.astype(t.dtype)), axes=1)
            for t, g in zip(total, grads, strict=True)
        ], None

    if classes.shape[0] == 1:
        total, _ = one_class(zero, (classes[0], weights[0]))
    else:
        total, _ = jax.lax.scan(one_class, zero, (classes, weights))
    return dict(zip(leaf_indices, total, strict=True))


def _chunk_sums(
    apply_fn: ApplyFn,
    params: Params,
    x: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    mask: jax.Array,
    estimator: str,
    fast: bool,
) -> list[jax.Array]:
    leaves, _ = jax.tree.flatten(params)
    all_leaves = tuple(range(len(leaves)))

    def classes_and_weights(logits):
        classes, weights = _targets(logits, estimator, labels, keys)
        return classes, weights * mask.astype(weights.dtype)[None]

    if not fast:
        classes, weights = classes_and_weights(apply_fn(params, x))
        return _as_list(_general_sums(apply_fn, params, x, classes, weights, all_leaves), leaves)

    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
    plan = _fast_fisher.make_plan(apply_fn, params, example)
    chosen = {}

    def cotangents_and_weights(logits):
        # d log p(y | x) / d logits = e_y - softmax(logits), for each of the K labels.
        classes, weights = classes_and_weights(logits)
        chosen.update(classes=classes, weights=weights)
        probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(weights.dtype), axis=-1)
        onehots = jax.nn.one_hot(classes, logits.shape[-1], dtype=probs.dtype)
        return onehots - probs[None], weights

    sums, _ = _fast_fisher.tapped_sums(
        plan, leaves, jax.tree.leaves(x), cotangents_and_weights, _accumulate_dtype
    )
    if plan.fallback:
        sums.update(
            _general_sums(apply_fn, params, x, chosen["classes"], chosen["weights"], plan.fallback)
        )
    return _as_list(sums, leaves)


def _as_list(sums: dict[int, jax.Array], leaves: list[Any]) -> list[jax.Array]:
    """Leaf sums in leaf order; leaves the logits do not depend on get zeros."""
    return [
        sums[i] if i in sums else jnp.zeros(leaf.shape, _accumulate_dtype(leaf.dtype))
        for i, leaf in enumerate(leaves)
    ]


def _local_sums(
    params: Params,
    inputs: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    num_valid: jax.Array | int,
    *,
    apply_fn: ApplyFn,
    estimator: str,
    chunk_size: int,
    fast: bool,
) -> list[jax.Array]:
    """Sums of weighted squared gradients over the first ``num_valid`` examples, chunk by chunk."""
    n = jax.tree.leaves(inputs)[0].shape[0]
    chunk_size = min(chunk_size, n)
    num_chunks = -(-n // chunk_size)

    def take(tree, start):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk_size), tree)

    def body(total, i):
        # The last chunk is the final `chunk_size` examples; those already counted are masked,
        # and so are padding examples past `num_valid`.
        start = jnp.minimum(i * chunk_size, n - chunk_size)
        index = start + jnp.arange(chunk_size)
        mask = (index >= i * chunk_size) & (index < num_valid)
        sums = _chunk_sums(
            apply_fn,
            params,
            take(inputs, start),
            None if labels is None else take(labels, start),
            None if keys is None else take(keys, start),
            mask,
            estimator,
            fast,
        )
        return [t + s for t, s in zip(total, sums, strict=True)], None

    zero = [jnp.zeros(p.shape, _accumulate_dtype(p.dtype)) for p in jax.tree.leaves(params)]
    if num_chunks == 1:
        total, _ = body(zero, 0)
    else:
        total, _ = jax.lax.scan(body, zero, jnp.arange(num_chunks))
    return total


@functools.partial(jax.jit, static_argnames=("apply_fn", "estimator", "chunk_size", "fast", "mesh"))
def _chunked_fisher(
    params: Params,
    inputs: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    *,
    apply_fn: _Static,
    estimator: str,
    chunk_size: int,
    fast: bool,
    mesh: jax.sharding.Mesh | None,
) -> Params:
    n = jax.tree.leaves(inputs)[0].shape[0]
    leaves, treedef = jax.tree.flatten(params)
    static = dict(apply_fn=apply_fn.fn, estimator=estimator, chunk_size=chunk_size, fast=fast)
    if mesh is None:
        total = _local_sums(params, inputs, labels, keys, n, **static)
    else:
        total = _sharded_sums(params, inputs, labels, keys, mesh=mesh, **static)
    return jax.tree.unflatten(
        treedef, [(t / n).astype(p.dtype) for t, p in zip(total, leaves, strict=True)]
    )


def _sharded_sums(params, inputs, labels, keys, *, mesh, **static) -> list[jax.Array]:
    """Data parallel: each device sums over its shard of the examples; one psum at the end.

    N not divisible by the device count is padded by repeating the last example, and the
    padding is masked out, so no example is dropped or counted twice.
    """
    axis = mesh.axis_names[0]
    devices = mesh.shape[axis]
    n = jax.tree.leaves(inputs)[0].shape[0]
    local = -(-n // devices)

    def pad(a):
        if a is None or local * devices == n:
            return a
        return jnp.concatenate([a, jnp.repeat(a[-1:], local * devices - n, axis=0)])

    data = jax.sharding.PartitionSpec(axis)
    sharded = jax.sharding.NamedSharding(mesh, data)
    inputs, labels, keys = jax.tree.map(
        lambda a: jax.device_put(pad(a), sharded), (inputs, labels, keys)
    )
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def per_device(params, inputs, labels, keys):
        num_valid = jnp.clip(n - jax.lax.axis_index(axis) * local, 0, local)
        sums = _local_sums(params, inputs, labels, keys, num_valid, **static)
        return jax.lax.psum(sums, axis)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(), data, data, data),
        out_specs=jax.sharding.PartitionSpec(),
        # The fast path re-binds primitives traced outside shard_map (e.g. relu's `x > 0.0`
        # against an unvarying literal), which the varying-axes check would reject.
        check_vma=False,
    )(params, inputs, labels, keys)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def _batched_fisher(
    params: Params, inputs: PyTree, labels: jax.Array, *, apply_fn: _Static, batch_size: int
) -> Params:
    n = labels.shape[0]
    size = min(batch_size, n)
    num_batches = -(-n // batch_size)

    def mean_log_lik(p, x, y, mask):
        logits = apply_fn.fn(p, x)
        log_lik = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        w = mask.astype(log_lik.dtype)
        return jnp.sum(w * log_lik) / jnp.sum(w)

    def body(total, i):
        start = jnp.minimum(i * batch_size, n - size)
        x = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), inputs)
        y = jax.lax.dynamic_slice_in_dim(labels, start, size)
        mask = start + jnp.arange(size) >= i * batch_size
        grads = jax.grad(mean_log_lik)(params, x, y, mask)
        return jax.tree.map(lambda t, g: t + jnp.square(g.astype(t.dtype)), total, grads), None

    zero = jax.tree.map(lambda p: jnp.zeros(p.shape, _accumulate_dtype(p.dtype)), params)
    total, _ = jax.lax.scan(body, zero, jnp.arange(num_batches))
    return jax.tree.map(lambda t, p: (t / num_batches).astype(p.dtype), total, params)
