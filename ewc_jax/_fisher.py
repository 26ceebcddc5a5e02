r"""The diagonal Fisher information of a categorical model, estimated five ways."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, TypeAlias, get_args

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import _calibration, _fast_fisher, _where
from ewc_jax._types import ApplyFn, Params, PyTree
from ewc_jax._validation import (
    check_trainable_only,
    concrete_or_none,
    fail_if,
    holds,
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
    gradient otherwise (see ``ewc_jax._fast_fisher``); all other parameters take the general path.
    ``method="auto"`` (default) estimates the FLOPs and bytes of each choice from the shapes the
    model traces to and takes the cheaper per layer, or the general path for everything when that
    is cheaper as a whole. All three agree to float rounding. Examples are processed
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
      chunk_size: examples per chunk; default: as many as fit in ``MEMORY_BUDGET_BYTES``, or,
        for a large enough call, the fastest of a few sizes within that budget, measured at the
        first call for this model, shapes and estimator (``EWC_JAX_CALIBRATE=auto|on|off``, see
        ``ewc_jax._calibration``). Results depend on it only through float rounding.
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
    check_trainable_only(params)
    _check_params(params)
    n = _num_examples(inputs)
    model = _Model.of(apply_fn, params, inputs, model_state)
    token_shape, num_classes = _output_shape(model)
    if estimator in ("empirical", "batched"):
        if labels is None:
            raise ValueError(
                f"estimator={estimator!r} needs labels (the true class of each input)."
            )
        labels = _checked_labels(labels, (n, *token_shape), num_classes)
    else:
        labels = None
    mask = _checked_mask(mask, (n, *token_shape))
    if estimator == "sampled" and key is None:
        raise ValueError("estimator='sampled' needs key, e.g. key=jax.random.key(0).")
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    selected = _where.selected_leaves(params, where)
    leaves = jax.tree.leaves(params)
    out_dtypes = tuple(_result_dtype(leaves[i], dtype) for i in selected)
    static_fn = _Static(apply_fn)
    result_def = jax.tree.structure(_where.select(params, params, where))
    # Before the computation, so that a NaN input is named rather than the NaN logits it gives.
    failures = non_finite(params, "params", "the Fisher would be NaN")
    failures += non_finite(inputs, "inputs", "the Fisher would be NaN")
    params, inputs = fail_if((params, inputs), failures, every_leaf=True)
    checks = runtime_checks()
    traced = is_traced((params, inputs, labels, key, mask, model_state))

    if estimator == "batched":
        if batch_size is None:
            raise ValueError("estimator='batched' needs batch_size (the mini-batch size).")
        fisher = _logit_errors_as_value_errors(
            _batched_fisher,
            traced,
            params,
            inputs,
            labels,
            mask,
            apply_fn=static_fn,
            batch_size=batch_size,
            out_dtypes=out_dtypes,
            selected=selected,
            check_logits=checks,
            model_state=model_state,
        )
        return jax.tree.unflatten(result_def, fisher)

    keys = jax.random.split(key, n) if estimator == "sampled" else None
    policy = _policy(model, _num_labels(estimator, num_classes, token_shape), method, selected)
    policy = dataclasses.replace(policy, check_logits=checks)
    if chunk_size is None:  # the byte-budget default, or the fastest chunk measured here
        static = dict(apply_fn=static_fn, estimator=estimator, policy=policy, mesh=mesh)
        static.update(out_dtypes=out_dtypes, layout=_Layout())
        arrays = (params, inputs, labels, keys, mask)
        default = _default_chunk_size(policy)
        chunk_size = _calibration.chunk_size(
            default, n, _chunked_fisher, arrays, {"model_state": model_state}, static
        )
    layout = _Layout.of(leaves, mesh)
    fisher = _logit_errors_as_value_errors(
        _chunked_fisher,
        traced,
        layout.enter(params),
        *layout.enter_examples((inputs, labels, keys, mask)),
        apply_fn=static_fn,
        estimator=estimator,
        chunk_size=min(int(chunk_size), n),
        policy=policy,
        out_dtypes=out_dtypes,
        mesh=None if layout.shardings else mesh,
        layout=layout,
        model_state=model_state,
    )
    return jax.tree.unflatten(result_def, layout.restore(selected, fisher))


_NON_FINITE_LOGITS = (
    "logits has non-finite values (NaN or Inf): apply_fn returned them for finite params and "
    "inputs; check the model (an overflow, a log or division of zero) and model_state"
)


def _checked_logits(logits: jax.Array, policy_checks: bool) -> jax.Array:
    if not policy_checks:
        return logits
    bad = jnp.logical_not(jnp.all(jnp.isfinite(logits)))
    return fail_if(logits, [(bad, _NON_FINITE_LOGITS, lambda: ".")])


def _logit_errors_as_value_errors(compute, traced, *args, **kwargs):
    """Runs ``compute``; called eagerly, a failed logits check raises ValueError, as the other
    checks do (under an outer jit it fails that program with the same message)."""
    if traced:
        return compute(*args, **kwargs)
    try:
        return jax.block_until_ready(compute(*args, **kwargs))
    except jax.errors.JaxRuntimeError as error:
        if _NON_FINITE_LOGITS in str(error):
            raise ValueError(_NON_FINITE_LOGITS + ".") from None
        raise


def _with_state(apply_fn: Callable[..., jax.Array], model_state: PyTree | None) -> ApplyFn:
    """``apply_fn`` itself, or ``(params, x) -> apply_fn(params, model_state, x)``."""
    if model_state is None:
        return apply_fn
    return lambda params, x: apply_fn(params, model_state, x)


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


@dataclasses.dataclass(frozen=True)
class _Model:
    """``apply_fn`` with the shapes and dtypes of its params and of one example: hashable, so
    what is derived from it (output shape, path choice) is traced once, not on every call."""

    fn: _Static
    params_def: Any
    params: tuple[jax.ShapeDtypeStruct, ...]
    inputs_def: Any
    example: tuple[jax.ShapeDtypeStruct, ...]
    state_def: Any = None
    state: tuple[jax.ShapeDtypeStruct, ...] | None = None  # None: no model_state

    @classmethod
    def of(
        cls, apply_fn: ApplyFn, params: Params, inputs: PyTree, model_state: PyTree = None
    ) -> _Model:
        spec = lambda a, lead: jax.ShapeDtypeStruct(np.shape(a)[lead:], jnp.result_type(a))
        params_leaves, params_def = jax.tree.flatten(params)
        input_leaves, inputs_def = jax.tree.flatten(inputs)
        state_leaves, state_def = jax.tree.flatten(model_state)
        return cls(
            _Static(apply_fn),
            params_def,
            tuple(spec(p, 0) for p in params_leaves),
            inputs_def,
            tuple(spec(x, 1) for x in input_leaves),
            state_def,
            None if model_state is None else tuple(spec(s, 0) for s in state_leaves),
        )

    def shape_fn(self) -> ApplyFn:
        """``(params, x) -> logits`` for tracing shapes; ``model_state`` becomes zeros."""
        if self.state is None:
            return self.fn.fn
        zeros = lambda: [jnp.zeros(s.shape, s.dtype) for s in self.state]
        return lambda p, x: self.fn.fn(p, jax.tree.unflatten(self.state_def, zeros()), x)

    def params_tree(self) -> PyTree:
        return jax.tree.unflatten(self.params_def, self.params)

    def example_tree(self, batch: int | None = None) -> PyTree:
        leaves = self.example
        if batch is not None:
            leaves = tuple(jax.ShapeDtypeStruct((batch, *x.shape), x.dtype) for x in leaves)
        return jax.tree.unflatten(self.inputs_def, leaves)


@functools.lru_cache(maxsize=256)
def _output_shape(model: _Model) -> tuple[tuple[int, ...], int]:
    """``(token shape S, classes C)`` of the logits ``[B, *S, C]`` ``apply_fn`` returns."""
    out = jax.eval_shape(model.shape_fn(), model.params_tree(), model.example_tree(batch=2))
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) < 2 or shape[0] != 2:
        raise ValueError(
            "apply_fn must return logits of shape [B, C] (or [B, T, C] for sequences); for a "
            f"batch of 2 it returned {shape}. For a multi-head model, pass an apply_fn that "
            "selects one head."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"apply_fn must return floating-point logits, got dtype {out.dtype}.")
    return tuple(int(d) for d in shape[1:-1]), int(shape[-1])


def _checked_labels(labels: Any, shape: tuple[int, ...], num_classes: int) -> jax.Array:
    if np.shape(labels) != shape:
        what = "[N]" if len(shape) == 1 else "[N, T] (one label per token)"
        raise ValueError(f"labels must have shape {what} = {shape}, got {np.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}.")
    out_of_range = lambda y: jnp.any((y < 0) | (y >= num_classes))

    def found() -> str:
        value = np.asarray(labels)
        return f"; found {value[(value < 0) | (value >= num_classes)][:5].tolist()}."

    message = f"labels must lie in [0, {num_classes}) for the model's {num_classes} logits"
    labels = fail_if(labels, [(holds(out_of_range, labels), message, found)])
    return jnp.asarray(labels, jnp.int32)


def _checked_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
    if mask is None:
        return None
    if len(shape) == 1:
        raise ValueError(
            "mask selects tokens of sequence outputs [B, T, C]; this apply_fn returns [B, C]. "
            "To leave examples out, leave them out of inputs."
        )
    if np.shape(mask) != shape:
        raise ValueError(f"mask must have shape [N, T] = {shape}, got {np.shape(mask)}.")
    dtype = jnp.result_type(mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.number)):
        raise ValueError(f"mask must be booleans or 0/1 numbers, got dtype {dtype}.")
    value = concrete_or_none(mask)
    if value is not None and not np.isin(value, (0, 1)).all():
        raise ValueError("mask must hold only 0/1 (or False/True): it selects tokens.")
    return jnp.asarray(mask, jnp.bool_)


def _accumulate_dtype(dtype: Any) -> np.dtype:
    """Sums run in float32 at least (bfloat16/float16 squares would lose most digits)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


def _result_dtype(leaf: Any, dtype: Any) -> np.dtype:
    if dtype is None:
        return _accumulate_dtype(jnp.result_type(leaf))
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
    return dtype


@dataclasses.dataclass(frozen=True)
class _Policy:
    """Which path each parameter leaf takes; hashable, a static argument of the jitted sums.

    ``general=True``: every leaf on the general path. Otherwise the one-pass plan is rebuilt
    inside the jit and the leaves in ``to_general`` are moved from its taps to the general path.
    """

    general: bool
    selected: tuple[int, ...]
    to_general: tuple[int, ...] = ()
    bytes_per_example: int = 1
    max_chunk: int = _MAX_GENERAL_CHUNK
    check_logits: bool = True  # fail on NaN/Inf logits (see ewc_jax.checks_enabled)


@functools.lru_cache(maxsize=256)
def _policy(
    model: _Model, num_labels: int, method: str, selected: tuple[int, ...] | None = None
) -> _Policy:
    """Which path each selected leaf takes (``None``: all leaves): all general, all one-pass, or
    the cost model's choice."""
    if selected is None:
        selected = tuple(range(len(model.params)))
    general_bytes = _general_bytes_per_example(model.params, selected)
    if method == "general":
        return _Policy(general=True, selected=selected, bytes_per_example=general_bytes)
    plan = _fast_fisher.make_plan(model.shape_fn(), model.params_tree(), model.example_tree())
    plan = _restrict(plan, selected)
    choice: tuple[int, ...] = ()
    if method == "auto":
        chosen = _fast_fisher.choose(plan, num_labels)
        if chosen is None:
            return _Policy(general=True, selected=selected, bytes_per_example=general_bytes)
        choice = tuple(chosen)
        plan = _fast_fisher.move_to_fallback(plan, choice)
    per_example = _fast_fisher.bytes_per_example(plan)
    # Large chunks pay off only where no per-example gradient is formed (one-term layers);
    # with per-layer per-example gradients, chunks as small as the general path's keep them
    # in cache (measured 15-20% faster for Dense layers over sequences at N = 4096).
    max_chunk = _MAX_FAST_CHUNK
    if plan.fallback or not all(t.one_term for t in plan.taps):
        max_chunk = _MAX_GENERAL_CHUNK
    if plan.fallback:
        per_example += _general_bytes_per_example(model.params, plan.fallback)
    return _Policy(
        general=False,
        selected=selected,
        to_general=choice,
        bytes_per_example=per_example,
        max_chunk=max_chunk,
    )


def _restrict(plan: _fast_fisher.Plan, selected: tuple[int, ...]) -> _fast_fisher.Plan:
    """The plan with unselected leaves neither tapped nor differentiated (counted as unused)."""
    keep = set(selected)
    if keep.issuperset(range(_fast_fisher._num_params(plan))):
        return plan
    dropped = [t.leaf for t in plan.taps if t.leaf not in keep]
    dropped += [i for i in plan.fallback if i not in keep]
    return dataclasses.replace(
        plan,
        taps=tuple(t for t in plan.taps if t.leaf in keep),
        fallback=tuple(i for i in plan.fallback if i in keep),
        unused=tuple(sorted({*plan.unused, *dropped})),
    )


def _general_bytes_per_example(params_spec, leaf_indices) -> int:
    return 3 * sum(
        math.prod(params_spec[i].shape) * max(params_spec[i].dtype.itemsize, 4)
        for i in leaf_indices
    )


def _num_labels(estimator: str, num_classes: int, token_shape: tuple[int, ...]) -> int:
    """Backward passes per chunk: one per label for the exact Fisher (per token and label)."""
    return num_classes * math.prod(token_shape) if estimator == "exact" else 1


def _default_chunk_size(policy: _Policy) -> int:
    """Examples per chunk so that the working memory stays under ``MEMORY_BUDGET_BYTES``."""
    return int(
        np.clip(MEMORY_BUDGET_BYTES // max(policy.bytes_per_example, 1), 1, policy.max_chunk)
    )


def _targets(
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
    acc = _accumulate_dtype(logits.dtype)
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


def _per_example_logits(apply_fn: ApplyFn, params: Params, x: PyTree) -> jax.Array:
    """The logits of one example (no batch axis)."""
    return apply_fn(params, jax.tree.map(lambda a: a[None], x))[0]


def _general_sums(
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
            return _per_example_logits(apply_fn, jax.tree.unflatten(treedef, full), x_n)

        out, pull = jax.vjp(logits_of, selected)
        return pull(v_n.astype(out.dtype))[0]

    selected = [leaves[i] for i in leaf_indices]
    per_example = jax.vmap(score, in_axes=(None, 0, 0))
    zero = [jnp.zeros(s.shape, _accumulate_dtype(s.dtype)) for s in selected]

    def one_label(total, k):
        v, w = target(k)
        grads = per_example(selected, x, v)
        # A dot with the weights, not a sum over the batch axis: XLA:CPU runs it several
        # times faster, and the weights also mask the overlap of the last chunk.
        return [
            t + jnp.tensordot(w.astype(t.dtype), jnp.square(g.astype(t.dtype)), axes=1)
            for t, g in zip(total, grads, strict=True)
        ], None

    if num_labels == 1:
        total, _ = one_label(zero, 0)
    else:
        total, _ = jax.lax.scan(one_label, zero, jnp.arange(num_labels))
    return dict(zip(leaf_indices, total, strict=True))


def _chunk_sums(
    apply_fn: ApplyFn,
    params: Params,
    x: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    mask: jax.Array | None,
    weight: jax.Array,
    estimator: str,
    policy: _Policy,
) -> list[jax.Array]:
    leaves, _ = jax.tree.flatten(params)

    def targets(logits):
        logits = _checked_logits(logits, policy.check_logits)
        return _targets(logits, estimator, labels, keys, mask, weight)

    if policy.general:
        num_labels, target = targets(apply_fn(params, x))
        sums = _general_sums(apply_fn, params, x, num_labels, target, policy.selected)
        return _as_list(sums, leaves, policy.selected)

    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
    plan = _fast_fisher.make_plan(apply_fn, params, example)
    plan = _fast_fisher.move_to_fallback(_restrict(plan, policy.selected), policy.to_general)
    chosen = {}

    def remembered_targets(logits):
        num_labels, target = targets(logits)
        chosen.update(num_labels=num_labels, target=target)
        return num_labels, target

    sums, _ = _fast_fisher.tapped_sums(
        plan, leaves, jax.tree.leaves(x), remembered_targets, _accumulate_dtype
    )
    if plan.fallback:
        sums.update(
            _general_sums(
                apply_fn, params, x, chosen["num_labels"], chosen["target"], plan.fallback
            )
        )
    return _as_list(sums, leaves, policy.selected)


def _as_list(
    sums: dict[int, jax.Array], leaves: list[Any], selected: tuple[int, ...]
) -> list[jax.Array]:
    """Sums of the selected leaves in leaf order; leaves the logits do not depend on get
    zeros."""
    return [
        sums[i] if i in sums else jnp.zeros(leaves[i].shape, _accumulate_dtype(leaves[i].dtype))
        for i in selected
    ]


def _local_sums(
    params: Params,
    inputs: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    mask: jax.Array | None,
    num_valid: jax.Array | int,
    *,
    apply_fn: ApplyFn,
    estimator: str,
    chunk_size: int,
    policy: _Policy,
) -> list[jax.Array]:
    """Sums of weighted squared gradients over the first ``num_valid`` examples, chunk by chunk."""
    n = jax.tree.leaves(inputs)[0].shape[0]
    chunk_size = min(chunk_size, n)
    num_chunks = -(-n // chunk_size)

    def take(tree, start):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk_size), tree)

    def chunk(i):
        # The last chunk is the final `chunk_size` examples; those already counted are masked,
        # and so are padding examples past `num_valid`.
        start = jnp.minimum(i * chunk_size, n - chunk_size)
        index = start + jnp.arange(chunk_size)
        weight = (index >= i * chunk_size) & (index < num_valid)
        return _chunk_sums(
            apply_fn,
            params,
            take(inputs, start),
            *(None if a is None else take(a, start) for a in (labels, keys, mask)),
            weight,
            estimator,
            policy,
        )

    leaves = jax.tree.leaves(params)
    zero = [jnp.zeros(leaves[i].shape, _accumulate_dtype(leaves[i].dtype)) for i in policy.selected]
    return _kahan_sum(chunk, zero, num_chunks)


def _kahan_sum(
    term: Callable[[jax.Array], list[jax.Array]], zero: list[jax.Array], num_chunks: int
) -> list[jax.Array]:
    """``Σ_i term(i)`` over ``num_chunks`` chunks in a ``lax.scan``, with Kahan compensation: the
    running total's rounding error is carried along and added back, so the error does not grow
    with the number of chunks."""
    if num_chunks == 1:
        return term(0)

    def body(carry, i):
        totals, errors = carry
        new_totals, new_errors = [], []
        for total, error, t in zip(totals, errors, term(i), strict=True):
            corrected = t - error
            updated = total + corrected
            new_errors.append((updated - total) - corrected)
            new_totals.append(updated)
        return (new_totals, new_errors), None

    (total, _), _ = jax.lax.scan(body, (zero, zero), jnp.arange(num_chunks))
    return total


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the parameter leaves live when params carry a sharded ``NamedSharding``.

    ``shardings``: each leaf's sharding (empty: params are not sharded, the older
    replicated/shard_map path runs); ``partitioned``: the same layouts on a mesh of
    ``AxisType.Auto`` axes, which the jitted program constrains its sums to and GSPMD
    propagates; ``data``: the mesh axis that splits each chunk's examples, or None.
    """

    shardings: tuple[jax.sharding.NamedSharding, ...] = ()
    partitioned: tuple[jax.sharding.NamedSharding, ...] = ()
    data: str | None = None

    @classmethod
    def of(cls, leaves: list[Any], mesh: jax.sharding.Mesh | None) -> _Layout:
        # Traced params (fisher_diagonal called under an outer jit) have no placement here.
        found = [
            None if isinstance(leaf, jax.core.Tracer) else getattr(leaf, "sharding", None)
            for leaf in leaves
        ]
        named = [s for s in found if isinstance(s, jax.sharding.NamedSharding)]
        if not any(not s.is_fully_replicated for s in named):
            return cls()
        meshes = {(s.mesh.axis_names, s.mesh.devices.tobytes()) for s in named}
        if len(meshes) > 1:
            raise ValueError("params are sharded over different meshes; put them on one mesh.")
        param_mesh = named[0].mesh
        data = None if mesh is None else mesh.axis_names[0]
        if data is not None and data not in param_mesh.axis_names:
            raise ValueError(
                f"mesh's first axis {data!r} (the examples' axis) is not an axis of the mesh the "
                f"params are sharded over, {param_mesh.axis_names}."
            )
        auto = jax.sharding.Mesh(
            param_mesh.devices,
            param_mesh.axis_names,
            axis_types=(jax.sharding.AxisType.Auto,) * len(param_mesh.axis_names),
        )
        spec = lambda s: s.spec if isinstance(s, jax.sharding.NamedSharding) else _P()
        shardings = tuple(
            s if isinstance(s, jax.sharding.NamedSharding) else jax.NamedSharding(param_mesh, _P())
            for s in found
        )
        partitioned = tuple(jax.NamedSharding(auto, spec(s)) for s in found)
        return cls(shardings, partitioned, data)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.partitioned[0].mesh

    def enter(self, params: Params) -> Params:
        """Params on the Auto-axes mesh (same devices and layout: no data moves)."""
        if not self.shardings:
            return params

        def auto(leaf):
            sharding = getattr(leaf, "sharding", None)
            if not isinstance(sharding, jax.sharding.NamedSharding):
                return jax.device_put(leaf, jax.NamedSharding(self.mesh, _P()))
            return jax.device_put(leaf, jax.NamedSharding(self.mesh, sharding.spec))

        return jax.tree.map(auto, params)

    def enter_examples(self, tree: PyTree) -> PyTree:
        """Example arrays already placed on a mesh, moved to the Auto-axes mesh (no data moves);
        others are left for the computation to place. One program sees one mesh."""
        if not self.shardings:
            return tree

        def auto(leaf):
            sharding = getattr(leaf, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh != self.mesh:
                return jax.device_put(leaf, jax.NamedSharding(self.mesh, sharding.spec))
            return leaf

        return jax.tree.map(auto, tree)

    def restore(self, selected: tuple[int, ...], results: list[jax.Array]) -> list[jax.Array]:
        """The selected leaves' results on their params' own shardings (no data moves)."""
        if not self.shardings:
            return results
        return [
            jax.device_put(r, self.shardings[i]) for r, i in zip(results, selected, strict=True)
        ]

    def examples(self, ndim: int) -> jax.sharding.NamedSharding:
        """``[chunks, chunk, ...]``: each chunk's examples split over the data axis."""
        return jax.NamedSharding(self.mesh, _P(None, self.data, *([None] * (ndim - 2))))


_P = jax.sharding.PartitionSpec


def _partitioned_sums(
    params: Params,
    inputs: PyTree,
    labels: jax.Array | None,
    keys: jax.Array | None,
    mask: jax.Array | None,
    *,
    layout: _Layout,
    apply_fn: ApplyFn,
    estimator: str,
    chunk_size: int,
    policy: _Policy,
) -> list[jax.Array]:
    """Sharding-preserving sums: the chunked computation on sharded params, partitioned by GSPMD.

    The examples are padded (weight 0) to whole chunks, each a multiple of the data axis' size,
    and laid out ``[chunks, chunk, ...]`` with the chunk axis split over the data axis; every
    chunk's sums and the running totals are constrained to their parameter's sharding, so XLA
    reduces each chunk's per-device partial sums straight into the parameter's shards
    (all-reduce for tensor-parallel leaves, reduce-scatter for FSDP leaves) and never forms a
    whole copy of a sharded leaf.
    """
    n = jax.tree.leaves(inputs)[0].shape[0]
    devices = 1 if layout.data is None else layout.mesh.shape[layout.data]
    chunk = -(-min(chunk_size, n) // devices) * devices
    num_chunks = -(-n // chunk)

    def split(a):
        if num_chunks * chunk > n:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], num_chunks * chunk - n, axis=0)])
        a = a.reshape(num_chunks, chunk, *a.shape[1:])
        return jax.lax.with_sharding_constraint(a, layout.examples(a.ndim))

    inputs, labels, keys, mask = jax.tree.map(split, (inputs, labels, keys, mask))
    shardings = [layout.partitioned[i] for i in policy.selected]

    def constrained(arrays):
        return [
            jax.lax.with_sharding_constraint(a, s) for a, s in zip(arrays, shardings, strict=True)
        ]

    def chunk_sums(i):
        take = lambda a: None if a is None else a[i]
        weight = i * chunk + jnp.arange(chunk) < n
        x = jax.tree.map(take, inputs)
        sums = _chunk_sums(
            apply_fn, params, x, take(labels), take(keys), take(mask), weight, estimator, policy
        )
        return constrained(sums)

    leaves = jax.tree.leaves(params)
    zero = constrained(
        [jnp.zeros(leaves[i].shape, _accumulate_dtype(leaves[i].dtype)) for i in policy.selected]
    )
    return _kahan_sum(chunk_sums, zero, num_chunks)


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
    apply_fn: _Static,
    estimator: str,
    chunk_size: int,
    policy: _Policy,
    out_dtypes: tuple[np.dtype, ...],
    mesh: jax.sharding.Mesh | None,
    layout: _Layout,
    model_state: PyTree = None,
) -> list[jax.Array]:
    """The Fisher of the selected leaves (``policy.selected``), in leaf order."""
    n = jax.tree.leaves(inputs)[0].shape[0]
    # model_state is traced here: a new state gives a new Fisher, without a recompile.
    apply_fn = _Static(_with_state(apply_fn.fn, model_state))
    static = dict(apply_fn=apply_fn.fn, estimator=estimator, chunk_size=chunk_size, policy=policy)
    if layout.shardings:
        total = _partitioned_sums(params, inputs, labels, keys, mask, layout=layout, **static)
    elif mesh is None:
        total = _local_sums(params, inputs, labels, keys, mask, n, **static)
    else:
        total = _sharded_sums(params, inputs, labels, keys, mask, mesh=mesh, **static)
    results = [(t / n).astype(d) for t, d in zip(total, out_dtypes, strict=True)]
    if layout.shardings:
        shardings = [layout.partitioned[i] for i in policy.selected]
        results = [
            jax.lax.with_sharding_constraint(r, s) for r, s in zip(results, shardings, strict=True)
        ]
    return results


def _sharded_sums(params, inputs, labels, keys, mask, *, mesh, **static) -> list[jax.Array]:
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
    inputs, labels, keys, mask = jax.tree.map(
        lambda a: jax.device_put(pad(a), sharded), (inputs, labels, keys, mask)
    )
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def per_device(params, inputs, labels, keys, mask):
        num_valid = jnp.clip(n - jax.lax.axis_index(axis) * local, 0, local)
        sums = _local_sums(params, inputs, labels, keys, mask, num_valid, **static)
        return jax.lax.psum(sums, axis)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(), data, data, data, data),
        out_specs=jax.sharding.PartitionSpec(),
        # The fast path re-binds primitives traced outside shard_map (e.g. relu's `x > 0.0`
        # against an unvarying literal), which the varying-axes check would reject.
        check_vma=False,
    )(params, inputs, labels, keys, mask)


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
    apply_fn: _Static,
    batch_size: int,
    out_dtypes: tuple[np.dtype, ...],
    selected: tuple[int, ...],
    check_logits: bool,
    model_state: PyTree = None,
) -> list[jax.Array]:
    apply_fn = _Static(_with_state(apply_fn.fn, model_state))
    n = labels.shape[0]
    size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    leaves, treedef = jax.tree.flatten(params)

    def mean_log_lik(chosen, x, y, tokens, examples):
        full = list(leaves)
        for i, value in zip(selected, chosen, strict=True):
            full[i] = value
        logits = _checked_logits(apply_fn.fn(jax.tree.unflatten(treedef, full), x), check_logits)
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

    zero = [jnp.zeros(p.shape, _accumulate_dtype(p.dtype)) for p in chosen]
    total, _ = jax.lax.scan(body, zero, jnp.arange(num_batches))
    return [(t / num_batches).astype(d) for t, d in zip(total, out_dtypes, strict=True)]
