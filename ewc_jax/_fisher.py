r"""The diagonal Fisher information of a categorical model, estimated five ways.

``fisher_diagonal`` checks its arguments, asks the cost model for a path and a chunk size, and
sums the chosen estimator's squared per-example gradients over the examples: the one-pass sums
and the ``vmap(grad)`` sums of the engine (``ewc_jax._engine``), chunked and placed by it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, TypeAlias, get_args

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import _calibration, _where
from ewc_jax._engine.chunking import even_chunk_size
from ewc_jax._engine.cost import Policy, default_chunk_size, num_labels, policy
from ewc_jax._engine.dtypes import accumulate_dtype, result_dtype
from ewc_jax._engine.inputs import (
    check_key,
    check_positive,
    checked_mask,
    estimator_labels,
    num_examples,
)
from ewc_jax._engine.model import (
    Model,
    Static,
    check_classes,
    check_params,
    output_shape,
    with_state,
)
from ewc_jax._engine.onepass import tapped_sums
from ewc_jax._engine.placement import Layout, placed_sums
from ewc_jax._engine.plan import make_plan, move_to_fallback, restrict
from ewc_jax._engine.targets import (
    checked_logits,
    general_sums,
    label_targets,
    logit_errors_as_value_errors,
)
from ewc_jax._types import ApplyFn, Params, PyTree
from ewc_jax._validation import (
    check_trainable_only,
    fail_if,
    is_traced,
    non_finite,
    runtime_checks,
)

Estimator: TypeAlias = Literal["exact", "sampled", "empirical", "argmax", "batched"]
"""The label distributions :func:`fisher_diagonal` can average over (its docstring defines each):
``"exact"`` (the true Fisher), ``"sampled"``, ``"empirical"``, ``"argmax"`` and ``"batched"``."""
ESTIMATORS: tuple[Estimator, ...] = get_args(Estimator)
Method: TypeAlias = Literal["auto", "one_pass", "general"]
"""How :func:`fisher_diagonal` computes per-example squares (its docstring's "Paths")."""
METHODS: tuple[Method, ...] = get_args(Method)


def fisher_diagonal(
    apply_fn: ApplyFn,
    params: Params,
    inputs: PyTree,
    labels: jax.typing.ArrayLike | None = None,
    *,
    estimator: Estimator = "exact",
    key: jax.Array | None = None,
    mask: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    method: Method = "auto",
    dtype: jax.typing.DTypeLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
    where: _where.Where | None = None,
    model_state: PyTree | None = None,
) -> Params:
    r"""Diagonal of the Fisher information of ``p(y | x, θ) = softmax(apply_fn(θ, x))_y``.

    .. math:: F_i = \frac{1}{N} \sum_{n=1}^{N} \mathbb{E}_{y \sim q_n}
              \left[\left(\frac{\partial \log p(y \mid x_n, θ)}{\partial θ_i}\right)^2\right]

    a mean over examples of *squared per-example* gradients (never the square of a mean gradient,
    except for ``"batched"``). The estimators differ only in the label distribution ``q_n``:

    * ``"exact"``: the true Fisher, ``q_n = p(· | x_n, θ)``: all C classes, each weighted by the
      model's probability. Cost: the one-pass path combines ``Σ_c p_c δ_c²`` before the weight
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

    **Sequence outputs.** ``apply_fn`` may return ``[B, T, C]`` logits (a language model, a token
    classifier; any ``[B, *S, C]``), with ``labels`` and ``mask`` of shape ``[B, T]``. An example
    is a whole sequence, scored under teacher forcing: :math:`\log p(y_n \mid x_n) = \sum_t m_{nt}
    \log p(y_{nt} \mid x_n, θ)` with the token mask ``m`` (1 where a token counts; padding and
    prompt tokens 0). The Fisher stays a mean over the N sequences:

    * ``"exact"``: tokens' labels are independent given the teacher-forced inputs, and each
      token's score has zero mean, so the cross terms of the square vanish in expectation and
      :math:`F = \frac1N \sum_{n,t} m_{nt} \sum_c p_{ntc} (\partial_θ \log p(c \mid x_n, t))^2`.
      This needs one backward pass per (token, class) pair: T·C passes per chunk, in a scan (memory
      does not grow). Affordable for small T·C only; for language models use ``"sampled"``.
    * ``"sampled"``: one label per token drawn from the model, and the square of the whole
      sequence's score :math:`(\sum_t m_{nt}\, \partial_θ \log p(y_{nt} \mid x_n, t))^2`: an
      unbiased estimate of ``"exact"`` (the same cross terms vanish in expectation) for one
      backward pass per chunk.
    * ``"empirical"`` / ``"argmax"``: the square of the sequence's score at the given labels (at
      each token's most likely class): one backward pass. As for classification, its expectation
      is not the Fisher; unlike ``"exact"``, the cross terms between tokens stay in.
    * ``"batched"``: the mini-batch mean over sequences of the sequence scores, squared.

    **Paths.** ``method="general"`` computes per-example gradients with ``jax.vmap`` of a VJP
    (``jax.vmap(jax.grad)``). ``method="one_pass"`` computes parameters that enter through dense
    or convolution contractions, biases and elementwise scales from one forward and one backward
    pass per chunk: from layer inputs ``a`` and output gradients ``δ`` as :math:`(a^2)^\top δ^2`
    when each parameter meets one output per example, or from that one layer's per-example
    gradient otherwise (see ``ewc_jax._engine.plan``). Every other parameter (an embedding's
    gather, a table tied to the output projection, positions added by broadcasting, a parameter
    used twice) is perturbed per example by zero in that same pass, so its one backward pass also
    returns their per-example gradients: no second forward and backward. ``method="auto"``
    (default) estimates the FLOPs and bytes of each choice from the shapes the model traces to
    and takes the cheaper per layer, or the general path for everything when that is cheaper as
    a whole. All three agree to float rounding. Examples are processed
    ``chunk_size`` at a time inside one jitted ``lax.scan``, so working memory does not grow with
    N; the last chunk overlaps the previous one and masks the overlap, so every example counts
    exactly once. Chunk sums are added with Kahan compensation, so float32 results stay within
    about 1e-7 of a float64 computation of the same model however large N is.

    Args:
      apply_fn: ``apply_fn(params, inputs_batch) -> logits`` of shape ``[B, C]`` or ``[B, T, C]``
        (e.g. a Flax ``model.apply``), or ``apply_fn(params, model_state, inputs_batch)`` when
        ``model_state`` is given. It must treat examples independently (BatchNorm in eval mode).
        Everything it reads must come in through its arguments: it is a static argument of an
        internal ``jax.jit``, traced once per distinct function object, so arrays it closes
        over are frozen at their first values (a closure over BatchNorm statistics or a shift
        that change between tasks silently gives the first task's Fisher again).
      params: a pytree of floating-point arrays.
      inputs: an array, or a pytree of arrays, with a leading example axis N.
      labels: int labels ``[N]`` (or ``[N, T]``) in ``[0, C)``; required for ``"empirical"`` and
        ``"batched"``.
      estimator: one of ``"exact"``, ``"sampled"``, ``"empirical"``, ``"argmax"``, ``"batched"``.
      key: a PRNG key; required for ``"sampled"``. Example ``n`` uses ``split(key, N)[n]``, so
        results do not depend on ``chunk_size``.
      mask: for sequence outputs, ``[N, T]`` booleans or 0/1 numbers: which tokens count.
      chunk_size: examples per chunk; default: as many as fit in a 512 MiB working-memory
        budget (``ewc_jax._engine.cost.MEMORY_BUDGET_BYTES``), evened out over the chunks that
        takes (``n = 2048`` at 857 per chunk: three chunks of 683, not three of 857 with the
        last one overlapping), or, for a large enough call, the fastest of a few sizes within
        that budget, measured at the first call for this model, shapes and estimator
        (``EWC_JAX_CALIBRATE=auto|on|off``, see ``ewc_jax._calibration``).
        Results depend on it only through float rounding.
      batch_size: mini-batch size for ``"batched"``.
      method: ``"auto"`` (default), ``"one_pass"`` or ``"general"``, as above.
      dtype: the dtype of the result; default: float32 for bfloat16/float16 parameters (whose
        squares would under- and overflow), otherwise the parameter's own. Sums always run in
        float32 or wider.
      mesh: data parallelism: a ``jax.sharding.Mesh`` whose first axis splits the examples
        across devices. Replicated params: each device runs the chunked computation on its
        shard and one ``psum`` adds them up. ``None``: one device. ``"batched"`` ignores it.
        Params that carry a sharded ``NamedSharding`` (tensor parallel, FSDP) stay sharded:
        the computation is partitioned by XLA (GSPMD) with each chunk's examples split over
        this axis (``None``: not split), every leaf of the result has its parameter's
        sharding, and no sharded parameter is gathered whole (beyond what ``apply_fn``'s own
        forward pass does, e.g. FSDP's per-layer gathers).
      where: which parameters to compute the Fisher for, as ``optax.masked`` takes it: a pytree
        of bools with the structure of ``params`` or a prefix of it, or a callable returning
        one. Only selected leaves are differentiated (one-pass: only their layers are tapped),
        so the cost is theirs only; unselected ones are ``optax.MaskedNode()`` in the result.
        ``None`` (default): all.
      model_state: the model's non-trainable state (Linen ``batch_stats``, the ``rest`` of
        ``nnx.split(model, nnx.Param, ...)``), a pytree passed to ``apply_fn`` as its second
        argument. It is a traced argument of the compiled computation: a new value gives a new
        Fisher without recompiling. It gets no Fisher. ``None`` (default): ``apply_fn`` takes
        two arguments.

    Returns:
      A pytree with the structure and shapes of ``params`` (unselected sub-trees
      ``optax.MaskedNode()``) and dtype ``dtype``; entries >= 0.

    Raises:
      ValueError: unknown estimator or method, a missing ``labels``/``key``/``batch_size``,
        labels or mask of the wrong shape or out of range, logits that are not ``[B, C]`` or
        ``[B, T, C]``, an empty input; NaN or Inf in ``params``, ``inputs`` (naming the first
        bad leaf, e.g. ``inputs['image']``) or the logits; a ``params`` that holds model state
        (a whole Linen ``variables`` dict, NNX ``BatchStat``/``RngKey``/``RngCount``
        variables), with what to pass instead. Under an outer ``jax.jit``/``jax.vmap`` the
        value checks fail the compiled program with the same message (see
        :func:`ewc_jax.checks_enabled`).

    A causal language model (tokens ``[N, T]`` in, logits ``[N, T, V]`` out, padding masked)::

        fisher = ewc_jax.fisher_diagonal(lm.apply, params, tokens[:, :-1], estimator="sampled",
                                         key=jax.random.key(0), mask=attention_mask[:, 1:])

    Example:
      A linear softmax classifier at zero weights predicts ``p = (½, ½)``, so its exact Fisher
      is :math:`F_{ic} = p_c (1 - p_c)\,\overline{x_i^2} = \overline{x_i^2} / 4`:

      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
      >>> fisher = ewc_jax.fisher_diagonal(apply_fn, params, x, estimator="exact")
      >>> jnp.round(fisher["w"], 6).tolist()  # mean x² = (1, 2, 0), over 4
      [[0.25, 0.25], [0.5, 0.5], [0.0, 0.0]]
      >>> jnp.round(fisher["b"], 6).tolist()
      [0.25, 0.25]

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
      Kunstner, Balles & Hennig, "Limitations of the empirical Fisher approximation for natural
      gradient descent", NeurIPS 2019.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; valid estimators: {ESTIMATORS}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid methods: {METHODS}.")
    check_positive("chunk_size", chunk_size)
    check_positive("batch_size", batch_size)
    model, labels, mask = checked_model_and_data(
        apply_fn, params, inputs, labels, mask, key, estimator, model_state
    )
    n = num_examples(inputs)
    selected = _where.selected_leaves(params, where)
    leaves = jax.tree.leaves(params)
    out_dtypes = tuple(result_dtype(leaves[i], dtype) for i in selected)
    result_def = jax.tree.structure(_where.select(params, params, where))
    # Before the computation, so that a NaN input is named rather than the NaN logits it gives.
    failures = non_finite(params, "params", "the Fisher would be NaN")
    failures += non_finite(inputs, "inputs", "the Fisher would be NaN")
    params = fail_if(params, failures, every_leaf=True)
    traced = is_traced((params, inputs, labels, key, mask, model_state))
    if estimator == "batched":
        if batch_size is None:
            raise ValueError("estimator='batched' needs batch_size (the mini-batch size).")
        fisher = logit_errors_as_value_errors(
            _batched_fisher,
            traced,
            params,
            inputs,
            labels,
            mask,
            apply_fn=Static(apply_fn),
            batch_size=batch_size,
            out_dtypes=out_dtypes,
            selected=selected,
            check_logits=runtime_checks(),
            model_state=model_state,
        )
        return jax.tree.unflatten(result_def, fisher)

    keys = jax.random.split(key, n) if estimator == "sampled" else None
    token_shape, num_classes = output_shape(model)
    path = policy(model, num_labels(estimator, num_classes, token_shape), method, selected)
    path = dataclasses.replace(path, check_logits=runtime_checks())
    if chunk_size is None:  # the byte-budget default, or the fastest chunk measured here
        static = dict(apply_fn=Static(apply_fn), estimator=estimator, policy=path, mesh=mesh)
        static.update(out_dtypes=out_dtypes, layout=Layout())
        # As many chunks as the budget needs, evened out so the last one recomputes little.
        default = even_chunk_size(default_chunk_size(path.bytes_per_example, path.max_chunk), n)
        chunk_size = _calibration.chunk_size(
            default,
            n,
            _chunked_fisher,
            (params, inputs, labels, keys, mask),
            {"model_state": model_state},
            static,
        )
    layout = Layout.of(leaves, mesh)
    fisher = logit_errors_as_value_errors(
        _chunked_fisher,
        traced,
        layout.enter(params),
        *layout.enter_examples((inputs, labels, keys, mask)),
        apply_fn=Static(apply_fn),
        estimator=estimator,
        chunk_size=min(int(chunk_size), n),
        policy=path,
        out_dtypes=out_dtypes,
        mesh=None if layout.shardings else mesh,
        layout=layout,
        model_state=model_state,
    )
    return jax.tree.unflatten(result_def, layout.restore(selected, fisher))


def checked_model_and_data(
    apply_fn: ApplyFn,
    params: Params,
    inputs: PyTree,
    labels: jax.typing.ArrayLike | None,
    mask: jax.typing.ArrayLike | None,
    key: jax.Array | None,
    estimator: Estimator,
    model_state: PyTree | None,
) -> tuple[Model, jax.Array | None, jax.Array | None]:
    """The model's shapes, and the labels (None unless the estimator uses them) and token mask,
    checked against the logits the model returns."""
    check_trainable_only(params)
    check_params(params)
    n = num_examples(inputs)
    model = Model.of(apply_fn, params, inputs, model_state)
    token_shape, num_classes = output_shape(model)
    check_classes(num_classes)
    labels = estimator_labels(estimator, labels, (n, *token_shape), num_classes)
    mask = checked_mask(mask, (n, *token_shape))
    if estimator == "sampled":
        check_key(key)
    return model, labels, mask


def _chunk_sums(
    apply_fn: ApplyFn,
    params: Params,
    x: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    mask: jax.Array | None,
    weight: jax.Array,
    estimator: str,
    policy: Policy,
) -> list[jax.Array]:
    leaves, _ = jax.tree.flatten(params)

    def targets(logits):
        logits = checked_logits(logits, policy.check_logits)
        return label_targets(logits, estimator, labels, keys, mask, weight)

    if policy.general:
        num_labels, target = targets(apply_fn(params, x))
        sums = general_sums(apply_fn, params, x, num_labels, target, policy.selected)
        return _as_list(sums, leaves, policy.selected)

    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
    plan = make_plan(apply_fn, params, example)
    plan = move_to_fallback(restrict(plan, policy.selected), policy.to_general)
    # The leaves the plan cannot tap are differentiated per example in the same pass.
    sums, _ = tapped_sums(plan, leaves, jax.tree.leaves(x), targets)
    return _as_list(sums, leaves, policy.selected)


def _as_list(
    sums: dict[int, jax.Array], leaves: list[Any], selected: tuple[int, ...]
) -> list[jax.Array]:
    """Sums of the selected leaves in leaf order; leaves the logits do not depend on get
    zeros."""
    return [
        sums[i] if i in sums else jnp.zeros(leaves[i].shape, accumulate_dtype(leaves[i].dtype))
        for i in selected
    ]


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "estimator",
        "chunk_size",
        "policy",
        "out_dtypes",
        "mesh",
        "layout",
    ),
)
def _chunked_fisher(
    params: Params,
    inputs: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    mask: jax.Array | None,
    *,
    apply_fn: Static,
    estimator: str,
    chunk_size: int,
    policy: Policy,
    out_dtypes: tuple[np.dtype, ...],
    mesh: jax.sharding.Mesh | None,
    layout: Layout,
    model_state: PyTree = None,
) -> list[jax.Array]:
    """The Fisher of the selected leaves (``policy.selected``), in leaf order."""
    n = jax.tree.leaves(inputs)[0].shape[0]
    # model_state is traced here: a new state gives a new Fisher, without a recompile.
    apply_fn = Static(with_state(apply_fn.fn, model_state))

    def chunk_sums(params, chunk, weight):
        x, y, k, m = chunk
        return _chunk_sums(apply_fn.fn, params, x, y, k, m, weight, estimator, policy)

    total = placed_sums(
        chunk_sums,
        params,
        (inputs, labels, keys, mask),
        chunk_size=chunk_size,
        selected=policy.selected,
        layout=layout,
        mesh=mesh,
    )
    results = [(t / n).astype(d) for t, d in zip(total, out_dtypes, strict=True)]
    if layout.shardings:
        shardings = [layout.partitioned[i] for i in policy.selected]
        results = [
            jax.lax.with_sharding_constraint(r, s) for r, s in zip(results, shardings, strict=True)
        ]
    return results


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "batch_size", "out_dtypes", "selected", "check_logits"),
)
def _batched_fisher(
    params: Params,
    inputs: PyTree,
    labels: jax.Array,
    mask: jax.Array | None,
    *,
    apply_fn: Static,
    batch_size: int,
    out_dtypes: tuple[np.dtype, ...],
    selected: tuple[int, ...],
    check_logits: bool,
    model_state: PyTree = None,
) -> list[jax.Array]:
    apply_fn = Static(with_state(apply_fn.fn, model_state))
    n = labels.shape[0]
    size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    leaves, treedef = jax.tree.flatten(params)

    def mean_log_lik(chosen, x, y, tokens, examples):
        full = list(leaves)
        for i, value in zip(selected, chosen, strict=True):
            full[i] = value
        logits = checked_logits(apply_fn.fn(jax.tree.unflatten(treedef, full), x), check_logits)
        log_lik = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]
        if tokens is not None:
            log_lik = jnp.where(tokens, log_lik, 0)
        log_lik = log_lik.reshape(log_lik.shape[0], -1).sum(axis=1)
        w = examples.astype(log_lik.dtype)
        return jnp.sum(w * log_lik) / jnp.sum(w)

    chosen = [leaves[i] for i in selected]

    def body(total, i):
        start = jnp.minimum(i * batch_size, n - size)
        take = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size)
        examples = start + jnp.arange(size) >= i * batch_size
        grads = jax.grad(mean_log_lik)(
            chosen, jax.tree.map(take, inputs), take(labels), take(mask), examples
        )
        return [t + jnp.square(g.astype(t.dtype)) for t, g in zip(total, grads, strict=True)], None

    zero = [jnp.zeros(p.shape, accumulate_dtype(p.dtype)) for p in chosen]
    total, _ = jax.lax.scan(body, zero, jnp.arange(num_batches))
    return [(t / num_batches).astype(d) for t, d in zip(total, out_dtypes, strict=True)]
