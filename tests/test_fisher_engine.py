"""The Fisher engine beyond [B, C] classifiers: sequence outputs with masks, the auto path on
every layer family, mixed precision and float32 accuracy, each against a float64 reference."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import LinenMLP, TinyCausalLM, init_plain_mlp, plain_mlp
from jax.flatten_util import ravel_pytree

import ewc_jax
from benchmarks.families import FAMILIES, build
from ewc_jax import _fast_fisher

METHODS = ("auto", "one_pass", "general")


def _max_rel_err(a, b, floor=0.0):
    """Worst leaf's max|a - b| / max|b| (``floor`` x the largest entry for all-zero leaves)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    a = [np.asarray(u, np.float64) for u in jax.tree.leaves(a)]
    b = [np.asarray(v, np.float64) for v in jax.tree.leaves(b)]
    top = max(float(np.max(np.abs(v))) for v in b)
    errs = []
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        scale = max(float(np.max(np.abs(v))), floor * top)
        errs.append(0.0 if scale == 0 else float(np.max(np.abs(u - v))) / scale)
    return max(errs)


# ---- sequence outputs --------------------------------------------------------------------


def _float64():
    # Flax's LayerNorm promotes to float32 internally, which strict promotion refuses for
    # float64 inputs: the float64 references run under standard promotion.
    return jax.enable_x64(True), jax.numpy_dtype_promotion("standard")


def _lm_problem(n=5, t=4):
    model = TinyCausalLM()
    tokens = jax.random.randint(jax.random.key(1), (n, t), 0, model.vocab)
    params = model.init(jax.random.key(0), tokens[:1])
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    labels = jax.random.randint(jax.random.key(2), (n, t), 0, model.vocab)
    lengths = jnp.array([4, 2, 3, 1, 4])[:n]  # ragged: padding after each sequence's length
    mask = jnp.arange(t)[None] < lengths[:, None]
    return model.apply, params, tokens, labels, mask


def _dense_sequence_reference(apply_fn, params, tokens, labels, mask, estimator, key=None, bs=2):
    """diag of the Fisher from jacrev of the per-token logits, sequence by sequence."""
    flat, unravel = ravel_pytree(params)
    n, t = tokens.shape

    def logits_fn(theta, seq):
        return apply_fn(unravel(theta), seq[None])[0]  # [T, V]

    def token_scores(theta, seq):
        jac = jax.jacrev(logits_fn)(theta, seq)  # [T, V, P]
        probs = jax.nn.softmax(logits_fn(theta, seq))  # [T, V]
        eye = jnp.eye(probs.shape[-1], dtype=probs.dtype)
        # score[t, c] = ∇θ log p(y_t = c) = J_tᵀ (e_c − p_t)
        return jnp.einsum("tvp,tcv->tcp", jac, eye[None] - probs[:, None]), probs

    keys = jax.random.split(key, n) if estimator == "sampled" else None
    scores = []
    diag = jnp.zeros_like(flat)
    for i in range(n):
        s, probs = token_scores(flat, tokens[i])
        m = mask[i].astype(flat.dtype)
        if estimator == "exact":
            diag = diag + jnp.einsum("t,tc,tcp->p", m, probs, s**2)
            continue
        if estimator in ("empirical", "batched"):
            y = labels[i]
        elif estimator == "argmax":
            y = jnp.argmax(logits_fn(flat, tokens[i]), axis=-1)
        else:
            y = jax.random.categorical(keys[i], logits_fn(flat, tokens[i]))
        g = jnp.einsum("t,tp->p", m, s[jnp.arange(t), y])  # the whole sequence's score
        scores.append(g)
        diag = diag + g**2
    if estimator == "batched":
        means = [sum(scores[j : j + bs]) / len(scores[j : j + bs]) for j in range(0, n, bs)]
        return unravel(sum(g**2 for g in means) / len(means))
    return unravel(diag / n)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("estimator", typing.get_args(ewc_jax.Estimator))
def test_sequence_outputs_match_dense_reference(estimator, method):
    x64, promotion = _float64()
    with x64, promotion:
        apply_fn, params, tokens, labels, mask = _lm_problem()
        key = jax.random.key(7)
        want = _dense_sequence_reference(apply_fn, params, tokens, labels, mask, estimator, key)
        got = ewc_jax.fisher_diagonal(
            apply_fn,
            params,
            tokens,
            labels,
            estimator=estimator,
            key=key,
            mask=mask,
            batch_size=2,
            chunk_size=3,  # two chunks, the second overlapping the first
            method=method,
        )
        assert _max_rel_err(got, want, floor=1e-9) < 1e-6


def test_sequence_mask_drops_tokens_and_defaults_to_all():
    x64, promotion = _float64()
    with x64, promotion:
        apply_fn, params, tokens, labels, mask = _lm_problem()
        everything = jnp.ones_like(mask)
        full = ewc_jax.fisher_diagonal(apply_fn, params, tokens, labels, estimator="empirical")
        ones = ewc_jax.fisher_diagonal(
            apply_fn, params, tokens, labels, estimator="empirical", mask=everything
        )
        masked = ewc_jax.fisher_diagonal(
            apply_fn, params, tokens, labels, estimator="empirical", mask=mask
        )
        assert _max_rel_err(full, ones) < 1e-12
        assert _max_rel_err(masked, full) > 1e-2


def test_sequence_argument_errors():
    with jax.enable_x64(True):
        apply_fn, params, tokens, labels, mask = _lm_problem()
    with pytest.raises(ValueError, match=r"labels must have shape \[N, T\]"):
        ewc_jax.fisher_diagonal(apply_fn, params, tokens, labels[:, 0], estimator="empirical")
    with pytest.raises(ValueError, match=r"mask must have shape \[N, T\]"):
        ewc_jax.fisher_diagonal(apply_fn, params, tokens, mask=mask[:, :2])
    with pytest.raises(ValueError, match="only 0/1"):
        ewc_jax.fisher_diagonal(apply_fn, params, tokens, mask=2 * mask.astype(jnp.int32))
    mlp_params = init_plain_mlp(jax.random.key(0), (3, 4, 2))
    with pytest.raises(ValueError, match=r"mask selects tokens of sequence outputs"):
        ewc_jax.fisher_diagonal(plain_mlp, mlp_params, jnp.ones((4, 3)), mask=jnp.ones(4))
    with pytest.raises(ValueError, match="Unknown method"):
        ewc_jax.fisher_diagonal(plain_mlp, mlp_params, jnp.ones((4, 3)), method="fastest")


# ---- every layer family, every path ------------------------------------------------------


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical", "argmax"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_path_agrees_on_every_family(family, estimator):
    apply_fn, params, x, y = build(family, width=4, n=6)
    key = jax.random.key(3)
    results = {
        m: ewc_jax.fisher_diagonal(
            apply_fn, params, x, y, estimator=estimator, key=key, method=m, chunk_size=4
        )
        for m in METHODS
    }
    # The general path is jax.vmap(jax.grad): the reference the others are held to. Leaves
    # that are zero in exact arithmetic (an attention key bias) are compared at 1e-6 of the max.
    for m in ("auto", "one_pass"):
        assert _max_rel_err(results[m], results["general"], floor=1e-6) < 1e-4, m


def test_grouped_convolution_kernels_come_from_patches_not_a_batched_grouped_conv():
    apply_fn, params, x, _ = build("grouped_conv", width=4, n=8)
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
    plan = _fast_fisher.make_plan(apply_fn, params, example)
    convs = [t for t in plan.taps if plan.nodes[t.node].eqn.primitive.name.startswith("conv")]
    assert len(convs) == 2 and not any(t.one_term for t in convs)

    def conv_groups(method):
        fn = lambda p: ewc_jax.fisher_diagonal(apply_fn, p, x, method=method, chunk_size=8)
        jaxpr = jax.make_jaxpr(fn)(params)
        found = []

        def visit(j):
            for eqn in j.eqns:
                if eqn.primitive.name == "conv_general_dilated":
                    found.append(eqn.params["feature_group_count"])
                for v in eqn.params.values():
                    for sub in v if isinstance(v, tuple) else (v,):
                        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                            visit(getattr(sub, "jaxpr", sub))

        visit(jaxpr.jaxpr)
        return found

    assert max(conv_groups("general")) >= 8  # vmap turns examples into conv groups
    # Only the model's own groups and the patch extraction's (one group per input channel).
    assert max(conv_groups("auto")) < 8


def test_cost_model_choices():
    def choice(family, estimator):
        apply_fn, params, x, _ = build(family, width=16, n=2)
        example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
        plan = _fast_fisher.make_plan(apply_fn, params, example)
        logits = jax.eval_shape(apply_fn, params, x[:1])
        labels = logits.shape[-1] * int(np.prod(logits.shape[1:-1])) if estimator == "exact" else 1
        return _fast_fisher.choose(plan, labels)

    # Dense layers on flat features: one contraction instead of per-example gradients.
    assert choice("mlp", "argmax") == () and choice("mlp", "exact") == ()
    # Grouped convolutions: vmap's per-example grouped convolution is what must be avoided.
    assert choice("grouped_conv", "argmax") == () and choice("grouped_conv", "exact") == ()
    # Plain convolutions: vmap's per-example kernels are cheap for one label (measured 1.4x
    # faster than patches), ruinous inside the exact Fisher's scan over labels (4.6x slower).
    assert choice("conv", "argmax") is None and choice("conv", "exact") == ()
    # A gather (embedding) falls back, and the general path then does everything once.
    assert choice("tiny_lm", "argmax") is None


def test_eager_calls_trace_the_model_once():
    traces = []
    model = LinenMLP(features=(8,), num_classes=3)

    def apply_fn(p, x):
        traces.append(1)
        return model.apply(p, x)

    params = model.init(jax.random.key(0), jnp.ones((1, 5)))
    x = jax.random.normal(jax.random.key(1), (16, 5))
    ewc_jax.fisher_diagonal(apply_fn, params, x)
    first = len(traces)
    for _ in range(3):
        ewc_jax.fisher_diagonal(apply_fn, params, 2 * x)
    assert len(traces) == first


# ---- precision ----------------------------------------------------------------------------


def test_float16_contraction_does_not_overflow():
    k1, k2 = jax.random.split(jax.random.key(0))
    p = {"w": (jax.random.normal(k1, (6, 5)) / 30).astype(jnp.float16)}
    x = (30 * jax.random.normal(k2, (2048, 6))).astype(jnp.float16)
    apply_fn = lambda p, x: x @ p["w"]
    with jax.enable_x64(True):
        want = ewc_jax.fisher_diagonal(
            apply_fn, jax.tree.map(lambda a: a.astype(jnp.float64), p), x.astype(jnp.float64)
        )
    for method in METHODS:
        got = ewc_jax.fisher_diagonal(apply_fn, p, x, method=method)
        assert got["w"].dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(got["w"])))
        assert _max_rel_err(got, want) < 2e-2, method  # float16 logits: ~1e-3 per example


@pytest.mark.parametrize("low", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_mlp_against_float64(low):
    model = LinenMLP(features=(32, 16), num_classes=5)
    params = model.init(jax.random.key(0), jnp.ones((1, 12)))
    x = jax.random.normal(jax.random.key(1), (300, 12))
    params_low = jax.tree.map(lambda p: p.astype(low), params)
    with jax.enable_x64(True):
        # The reference: the same low-precision weights and inputs, exactly, in float64.
        want = ewc_jax.fisher_diagonal(
            model.apply,
            jax.tree.map(lambda p: p.astype(jnp.float64), params_low),
            x.astype(low).astype(jnp.float64),
            estimator="exact",
            method="general",
        )
    tolerance = 0.03 if low == jnp.float16 else 0.2  # bfloat16 keeps 8 bits of mantissa
    for method in METHODS:
        got = ewc_jax.fisher_diagonal(
            model.apply, params_low, x.astype(low), estimator="exact", method=method
        )
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
        assert _max_rel_err(got, want) < tolerance, method
    state = ewc_jax.consolidate(None, params_low, got)
    assert jax.tree.leaves(state.precision)[0].dtype == jnp.float32
    assert jax.tree.leaves(state.anchor)[0].dtype == low
    moved = jax.tree.map(lambda p: (p + 0.01).astype(low), params_low)
    value = ewc_jax.penalty(moved, state, 2.0)
    assert value.dtype == jnp.float32 and float(value) > 0
    twice = ewc_jax.consolidate(state, moved, got)
    assert jax.tree.leaves(twice.precision)[0].dtype == jnp.float32


# ---- float32 accuracy ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [10_000, pytest.param(100_000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_float32_fisher_within_1e6_of_float64(n, method):
    # A smooth (tanh) model, so float32 and float64 take the same branches everywhere; with
    # ReLU, the few pre-activations within rounding of zero flip and move the Fisher by a
    # discrete amount that no accumulation can recover (see BENCHMARKS.md).
    params = init_plain_mlp(jax.random.key(0), (64, 64, 64, 10))
    x = jax.random.uniform(jax.random.key(1), (n, 64))
    got = ewc_jax.fisher_diagonal(plain_mlp, params, x, estimator="argmax", method=method)
    with jax.enable_x64(True):
        want = ewc_jax.fisher_diagonal(
            plain_mlp,
            jax.tree.map(lambda p: p.astype(jnp.float64), params),
            x.astype(jnp.float64),
            estimator="argmax",
            method="one_pass",
        )
    assert _max_rel_err(got, want) < 1e-6


def test_auto_runs_the_chosen_paths_own_executable():
    from ewc_jax import _fisher

    for family, chosen in (("mlp", "one_pass"), ("tiny_lm", "general")):
        apply_fn, params, x, y = build(family, width=4, n=6)
        ewc_jax.fisher_diagonal(apply_fn, params, x, y, estimator="argmax", method=chosen)
        compiled = _fisher._chunked_fisher._cache_size()
        ewc_jax.fisher_diagonal(apply_fn, params, x, y, estimator="argmax", method="auto")
        assert _fisher._chunked_fisher._cache_size() == compiled, family
