r"""The K-FAC estimator: Kronecker factors ``A = E[ā āᵀ]`` and ``G = E[δ δᵀ]`` per layer.

The layers are found in the traced program by the engine's plan (``ewc_jax._engine.plan``), and
``ā`` and ``δ`` come from the same tapped forward and backward pass as the one-pass Fisher
(``ewc_jax._engine.tapped``). The state the factors consolidate into is in
``ewc_jax._kfac_state``.
"""

from __future__ import annotations

from typing import Literal, TypeAlias, get_args

import jax
import jax.numpy as jnp

from ewc_jax._engine.chunking import even_chunk_size
from ewc_jax._engine.cost import (
    MAX_SMALL_CHUNK,
    bytes_per_example,
    default_chunk_size,
    general_bytes_per_example,
)
from ewc_jax._engine.dtypes import result_dtype
from ewc_jax._engine.inputs import (
    check_positive,
    num_examples,
)
from ewc_jax._engine.model import Static, output_shape
from ewc_jax._engine.placement import Layout
from ewc_jax._engine.plan import restrict
from ewc_jax._engine.targets import (
    logit_errors_as_value_errors,
)
from ewc_jax._fisher import checked_model_and_data, fisher_diagonal
from ewc_jax._kfac_layers import plan_and_layers, selected_layers
from ewc_jax._kfac_pass import factors_pass
from ewc_jax._kfac_sequence import (
    SequenceMode,
    check_mask_fits,
    check_sequence,
    positions,
)
from ewc_jax._kfac_state import KFACFisher, KroneckerFactors
from ewc_jax._types import ApplyFn, Params, PyTree
from ewc_jax._validation import (
    fail_if,
    is_traced,
    non_finite,
    runtime_checks,
)
from ewc_jax._where import Where, selected_leaves, selected_tree

KFACEstimator: TypeAlias = Literal["exact", "sampled", "empirical"]
"""The label distributions :func:`kfac_fisher` takes (those of :data:`ewc_jax.Estimator` that
give a per-example Fisher)."""


KFAC_ESTIMATORS: tuple[KFACEstimator, ...] = get_args(KFACEstimator)
"""The values of :data:`KFACEstimator`, as a tuple."""


def kfac_fisher(
    apply_fn: ApplyFn,
    params: Params,
    inputs: PyTree,
    labels: jax.typing.ArrayLike | None = None,
    *,
    estimator: KFACEstimator = "exact",
    key: jax.Array | None = None,
    mask: jax.typing.ArrayLike | None = None,
    sequence: SequenceMode = "expand",
    chunk_size: int | None = None,
    where: Where | None = None,
) -> KFACFisher:
    r"""Kronecker-factored Fisher of ``p(y | x, θ) = softmax(apply_fn(θ, x))_y``.

    For every Dense layer (a kernel ``[in, out]`` contracted once per example with an
    ``[in]`` input, with or without a bias added to its output):

    .. math:: A = \frac1N \sum_n ā_n ā_n^\top,\qquad
              G = \frac1N \sum_n \mathbb{E}_{y \sim q_n}\left[δ_{ny} δ_{ny}^\top\right],\qquad
              δ_{ny} = \frac{\partial \log p(y \mid x_n, θ)}{\partial z_n},

    where ``ā = [a; 1]`` when the layer has a bias, so that ``A ⊗ G`` covers kernel and bias
    jointly, as Ritter et al. do (``[W; b]``, ``[in + 1, out]``). The label distribution ``q_n``
    is that of :func:`fisher_diagonal`'s estimator: ``"exact"`` (every class weighted by the
    model's probability: one backward pass per class), ``"sampled"`` (one label drawn from the
    model, ``key`` required; the same draws as ``fisher_diagonal`` with the same key) or
    ``"empirical"`` (the given ``labels``).

    For every convolution (without feature groups) the kernel and bias are factored as in KFC
    (Grosse & Martens 2016), with ``ā_{ns}`` the input patch (channel-major: input channel,
    then kernel position) at output position ``s`` and ``δ_{nys}`` the output gradient there:

    .. math:: A = \frac1N \sum_n \sum_s ā_{ns} ā_{ns}^\top,\qquad
              G = \frac1N \sum_n \mathbb{E}_{y \sim q_n}\Big[\frac1S \sum_s δ_{nys}
              δ_{nys}^\top\Big]

    (activations and output gradients independent, output gradients uncorrelated across
    positions). Its rows ``W̄`` are the kernel transposed to ``[in, spatial..., out]`` and
    flattened (see :class:`KroneckerFactors`).

    **Kernels with several axes.** A Dense kernel ``[*in, *out]`` contracted over its leading
    axes (attention's output projection ``DenseGeneral(D, axis=(-2, -1))``, kernel
    ``[H, Dh, D]``; its per-head ``q``/``k``/``v`` projections ``DenseGeneral((H, Dh))``,
    kernel ``[D, H, Dh]`` with bias ``[H, Dh]``) is the Dense layer of its kernel reshaped to
    ``[prod(in), prod(out)]`` (bias flattened to ``[prod(out)]``): ``in = H·Dh`` or
    ``out = H·Dh``.

    **Dense layers over extra axes** (a kernel ``[*in, *out]`` applied at every position ``t``
    of a ``[T, *in]`` or ``[*P, *in]`` input: Flax ``Dense`` or ``DenseGeneral`` on
    ``[B, T, D]``, ``x @ w + b`` in plain JAX) are factored by K-FAC-expand or K-FAC-reduce
    (Eschenhagen et al. 2023), chosen by ``sequence``; with ``g_{nt}`` the gradient of the
    example's log-likelihood at the layer's output at position ``t`` and ``m`` the mask:

    .. math:: \text{expand:}\quad A = \frac{\sum_{n,t} m_{nt} ā_{nt} ā_{nt}^\top}
              {\sum_{n,t} m_{nt}},\qquad
              G = \frac1N \sum_{n,t} m_{nt}\, \mathbb{E}_y\big[g_{nt} g_{nt}^\top\big]

    .. math:: \text{reduce:}\quad â_n = \frac{\sum_t m_{nt} ā_{nt}}{\sum_t m_{nt}},\quad
              ĝ_n = \sum_t m_{nt} g_{nt},\qquad A = \frac{1}{N'} \sum_n â_n â_n^\top,\qquad
              G = \frac1N \sum_n \mathbb{E}_y\big[ĝ_n ĝ_n^\top\big]

    (``N'``: examples with a counted position). These are the paper's sums over the data set
    divided by ``N``, with ``A`` averaged over what it counts, so that ``A ⊗ G`` is the mean
    Fisher block exactly where the paper proves each exact (deep linear networks with the
    positions sharing the kernel: expand for a loss with one term per position, reduce for a
    loss of the positions' mean) and an approximation elsewhere. ``"expand"`` (default) suits
    a per-token loss (a language model), ``"reduce"`` a sequence-level one (a classifier of
    pooled tokens). With one position both equal the Dense factors above.

    **Sequence outputs.** ``apply_fn`` may return ``[B, T, C]`` logits (labels ``[N, T]``), as
    for :func:`fisher_diagonal`: an example's log-likelihood is
    :math:`\sum_t m_{nt} \log p(y_{nt} \mid x_n, t)`; ``"exact"`` takes every (token, class)
    pair (T·C backward passes per chunk: small T·C only), ``"sampled"`` one label per token
    (one pass; the estimator for a large vocabulary), ``"empirical"`` the given labels. A
    masked token contributes nothing: its label term is left out, and a Dense layer applied
    over the same ``[T]`` positions as the logits leaves its input and output gradient out of
    ``A`` and ``G`` (its own mask is the token mask; a layer over other positions with a mask
    given is refused).

    Layers are found in the traced program, as the one-pass Fisher finds them
    (``ewc_jax._engine.plan``): Flax ``Dense``/``DenseGeneral``/``Conv``, NNX
    ``Linear``/``Conv``, or ``x @ w + b`` and ``lax.conv_general_dilated`` in plain JAX. Every
    other parameter keeps its diagonal Fisher from :func:`fisher_diagonal`, which is exact for
    it: grouped convolutions; ``dot_general`` forms other than these (a batch axis, an
    ``einsum`` that XLA lowers differently) and Equinox ``Linear`` applied over a sequence
    (``W @ x`` under a nested ``vmap``); normalisation scales and biases of unfactored layers;
    embeddings (a gather of one-hot rows: their ``A`` would be the diagonal
    ``diag(token frequency)``, so the diagonal Fisher loses only ``G``'s off-diagonal terms and
    avoids a ``V × V`` input factor); and any parameter used more than once (a tied embedding,
    a kernel applied twice): the sum of Kronecker products over its uses is not one Kronecker
    product, and no block is formed for it rather than a wrong one.

    **A subset of the parameters** (``where``, as :func:`ewc_jax.consolidate` takes it: a LoRA
    fine-tune's adapters, the base frozen): blocks are formed, and their factors computed, only
    for the layers whose kernel is selected; a selected kernel whose bias is not selected is
    factored alone (``ā = a``: the block of the kernel's rows of ``[W; b]``); the diagonal Fisher
    is computed for the selected leaves no block covers, and the result's ``diagonal`` holds the
    selected leaves only (``optax.MaskedNode()`` elsewhere, as :func:`ewc_jax.fisher_diagonal`'s
    with ``where``). A low-rank adapter ``W x + (α/r) B (A x)`` is two Dense layers, ``x A``
    then ``(x A) B``, each with its own block; the frozen ``W`` gets none. The layers are still
    found on the whole model, and its forward pass runs whole: the selection saves the factors
    and diagonal of the unselected layers, not the pass. Consolidate and penalise with the same
    ``where``.

    **One pass.** The diagonal Fisher of the leaves without a block is computed in the factors'
    own chunked pass: the same forward, the same labels (for ``"sampled"`` the same draws as
    :func:`fisher_diagonal` with the same key) and, per label, the same backward pass, whose
    ``δ`` give both ``G`` and the squared per-example gradients
    :math:`\frac1N \sum_n \mathbb{E}_y[g_{ny}^2]` of those leaves: ``(a²)ᵀ δ²`` for a scale
    or bias met once per example, that layer's own per-example gradient where it is met several
    times (a LayerNorm over positions), and, for a leaf no layer taps (an embedding's gather, a
    tied embedding), its per-example gradient from the same backward pass (a zero perturbation
    of the leaf per example). The result equals
    ``fisher_diagonal(..., where=those leaves)`` to float rounding. A model with no factored
    layer gets :func:`fisher_diagonal` of every selected leaf (itself one pass).

    Params that carry a sharded ``NamedSharding`` (tensor parallel, FSDP) are used where they
    are: the computation is partitioned by XLA over their mesh (examples already placed on it,
    e.g. split over its data axis, stay there), and each layer's factors are computed and come
    back with its kernel's layout: ``A``'s first axis split over the mesh axis of the kernel's
    ``in`` axis (whole for a layer with a bias, whose ``in + 1`` rows that axis cannot split
    evenly, or a convolution with a split spatial axis), ``G``'s over that of its ``out`` axis,
    both replicated for a replicated kernel. Each chunk's sums are reduced into those shards;
    no sharded kernel is gathered whole. The K-FAC state keeps the same layout.

    Factors are means over examples, like :func:`fisher_diagonal`: Ritter et al.'s Hessian of
    the whole data set's log-likelihood is ``N`` times this, a factor the strength absorbs.

    Args:
      apply_fn: ``apply_fn(params, inputs_batch) -> logits [B, C]`` or ``[B, T, C]``;
        examples independent.
      params: a pytree of floating-point arrays.
      inputs: an array or pytree of arrays with a leading example axis N.
      labels: int labels ``[N]`` (``[N, T]`` for sequence outputs); required for
        ``"empirical"``.
      estimator: ``"exact"``, ``"sampled"`` or ``"empirical"``.
      key: PRNG key for ``"sampled"``.
      mask: for sequence outputs, ``[N, T]`` booleans or 0/1 numbers: which tokens count (as
        in :func:`fisher_diagonal`).
      sequence: ``"expand"`` (default) or ``"reduce"``: how Dense layers applied over extra
        axes are factored (see above).
      chunk_size: examples per chunk; default: as many as fit the memory budget, at most 256,
        then evened out over the chunks N needs, so that the last chunk (which overlaps the
        one before and masks the overlap) computes fewer examples it does not count than there
        are chunks.
      where: the parameters to cover (see above); ``None`` (default): all.

    Returns:
      A :class:`KFACFisher` (factors in float32 at least), restricted to ``where``.

    Raises:
      ValueError: unknown estimator or sequence mode, missing labels/key, labels or mask of
        the wrong shape, a mask with a Dense layer applied over positions other than the
        logits' tokens, a ``where`` that selects nothing or is not a bool prefix of params;
        params holding model state, NaN or Inf in ``params``, ``inputs`` or the logits (the
        checks of :func:`fisher_diagonal`; under an outer ``jax.jit`` the value checks fail the
        compiled program).

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]  # one Dense layer, two classes
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
      >>> fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact")
      >>> (layer,) = fisher.layers
      >>> layer.a.diagonal().tolist()  # E[ā²] for ā = (x, 1)
      [1.0, 2.0, 0.0, 1.0]
      >>> layer.g.tolist()  # E_y[δ δᵀ] = diag(p) - p pᵀ at p = (½, ½)
      [[0.25, -0.25], [-0.25, 0.25]]

      The same kernel applied at two positions (``[N, T, in]`` inputs, per-token logits):
      expand averages the positions' ``a aᵀ``, reduce takes the outer product of their mean:

      >>> tokens = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # N = 1, T = 2
      >>> w_only = {"w": jnp.zeros((3, 2))}
      >>> seq = lambda p, x: x @ p["w"]
      >>> for mode in ("expand", "reduce"):
      ...     fisher = ewc_jax.kfac.kfac_fisher(seq, w_only, tokens, sequence=mode)
      ...     print(mode, fisher.layers[0].a[:2, :2].tolist())
      expand [[0.5, 0.0], [0.0, 0.5]]
      reduce [[0.25, 0.25], [0.25, 0.25]]

    References:
      Ritter, Botev & Barber, "Online Structured Laplace Approximations for Overcoming
      Catastrophic Forgetting", NeurIPS 2018.
      Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
      Curvature", ICML 2015.
      Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution
      layers", ICML 2016.
      Eschenhagen, Immer, Turner, Schneider & Hennig, "Kronecker-Factored Approximate
      Curvature for Modern Neural Network Architectures", NeurIPS 2023.
    """
    n, model, token_shape, labels, mask = _checked_arguments(
        apply_fn, params, inputs, labels, mask, key, estimator, sequence, chunk_size
    )
    plan, layers = plan_and_layers(model)
    selected = frozenset(selected_leaves(params, where))
    layers = selected_layers(layers, selected)
    if mask is not None:
        for node, *_ in layers:
            if positions(plan.nodes[node]) is not None:
                check_mask_fits(plan.nodes[node], token_shape)
    leaves, treedef = jax.tree.flatten(params)
    covered = {i for _, kernel, bias, *_ in layers for i in (kernel, bias) if i is not None}
    uncovered = tuple(i for i in sorted(selected) if i not in covered)

    if not layers:  # nothing to factor: the diagonal Fisher of the selection, its own one pass
        # A callable where=, since a flags tree of an Equinox model is itself callable.
        flags = jax.tree.unflatten(treedef, [i in selected for i in range(len(leaves))])
        diagonal = fisher_diagonal(
            apply_fn,
            params,
            inputs,
            labels,
            estimator=estimator,
            key=key,
            mask=mask,
            chunk_size=chunk_size,
            where=lambda _: flags,
        )
        return KFACFisher(
            _diagonal_tree(
                params, where, dict(zip(uncovered, jax.tree.leaves(diagonal), strict=True))
            ),
            (),
        )
    # The checks fisher_diagonal makes, whose diagonal this pass computes.
    failures = non_finite(params, "params", "the Fisher would be NaN")
    failures += non_finite(inputs, "inputs", "the Fisher would be NaN")
    params = fail_if(params, failures, every_leaf=True)
    traced = is_traced((params, inputs, labels, key, mask))
    keys = jax.random.split(key, n) if estimator == "sampled" else None
    # Sharded params (tensor parallel, FSDP): one program on the params' devices with Auto
    # axes, partitioned by XLA, as fisher_diagonal runs it, each factor's sums constrained to
    # the layout its layer's kernel gives it and each diagonal to its leaf's: reduced into its
    # shards, never gathered.
    layout = Layout.of(leaves, None)
    shardings = layout.kronecker(
        leaves, tuple((k, b is not None, ax, out) for _, k, b, ax, out in layers)
    )
    # Per example: the tapped layers' working memory, and the per-example gradients of the
    # leaves the plan cannot tap (embeddings), as fisher_diagonal's cost model counts them.
    per_example = bytes_per_example(plan) + general_bytes_per_example(
        model.params, restrict(plan, uncovered).fallback
    )
    factors, diagonal = logit_errors_as_value_errors(
        factors_pass,
        traced,
        layout.enter(params),
        *layout.enter_examples((inputs, labels, keys, mask)),
        apply_fn=Static(apply_fn),
        estimator=estimator,
        sequence=sequence,
        token_shape=token_shape,
        chunk_size=min(int(chunk_size), n)
        if chunk_size
        else even_chunk_size(default_chunk_size(per_example, MAX_SMALL_CHUNK), n),
        layers=layers,
        shardings=shardings,
        diagonal=uncovered,
        diagonal_shardings=tuple(layout.partitioned[i] for i in uncovered)
        if layout.shardings
        else None,
        out_dtypes=tuple(result_dtype(leaves[i], None) for i in uncovered),
        check_logits=runtime_checks(),
    )
    factors = layout.leave(factors, shardings)
    diagonal = dict(zip(uncovered, layout.restore(uncovered, diagonal), strict=True))
    return KFACFisher(
        _diagonal_tree(params, where, diagonal),
        tuple(
            KroneckerFactors(a, g, kernel, bias, axes)
            for (a, g), (_, kernel, bias, axes, _) in zip(factors, layers, strict=True)
        ),
    )


def _checked_arguments(
    apply_fn, params, inputs, labels, mask, key, estimator, sequence, chunk_size
):
    """``(N, model, token shape, labels, mask)`` after :func:`kfac_fisher`'s argument checks:
    its own (estimator, sequence mode, chunk size), then :func:`fisher_diagonal`'s."""
    if estimator not in KFAC_ESTIMATORS:
        raise ValueError(
            f"Unknown estimator {estimator!r} for K-FAC; valid estimators: {KFAC_ESTIMATORS}."
        )
    check_sequence(sequence)
    check_positive("chunk_size", chunk_size)
    model, labels, mask = checked_model_and_data(
        apply_fn, params, inputs, labels, mask, key, estimator, None
    )
    token_shape, _ = output_shape(model)
    return num_examples(inputs), model, token_shape, labels, mask


def _diagonal_tree(params: Params, where: Where | None, diagonal: dict[int, jax.Array]) -> PyTree:
    """The selected leaves: their diagonal Fisher (``diagonal``, by leaf index), or zeros where a
    block covers them."""
    leaves = jax.tree.leaves(params)
    return selected_tree(
        params,
        where,
        lambda i: (
            diagonal[i]
            if i in diagonal
            else jnp.zeros(leaves[i].shape, result_dtype(leaves[i], None))
        ),
    )
