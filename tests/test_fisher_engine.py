"""The Fisher engine beyond [B, C] classifiers: sequence masks and argument errors, the plan and
cost model of the one-pass path, tracing and compiling once. Values against dense references:
tests/test_reference_matrix.py (every family, estimator and path) and tests/test_precision.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import LinenMLP, TinyCausalLM, init_plain_mlp, plain_mlp

import ewc_jax
from benchmarks.families import build
from ewc_jax._engine import cost
from ewc_jax._engine import plan as plan_lib


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


# ---- the one-pass plan and the cost model ------------------------------------------------


def test_grouped_convolution_kernels_come_from_patches_not_a_batched_grouped_conv():
    apply_fn, params, x, _ = build("grouped_conv", width=4, n=8)
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
    plan = plan_lib.make_plan(apply_fn, params, example)
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
        plan = plan_lib.make_plan(apply_fn, params, example)
        logits = jax.eval_shape(apply_fn, params, x[:1])
        labels = logits.shape[-1] * int(np.prod(logits.shape[1:-1])) if estimator == "exact" else 1
        return cost.choose(plan, labels)

    # Dense layers on flat features: one contraction instead of per-example gradients.
    assert choice("mlp", "argmax") == () and choice("mlp", "exact") == ()
    # Grouped convolutions: vmap's per-example grouped convolution is what must be avoided.
    assert choice("grouped_conv", "argmax") == () and choice("grouped_conv", "exact") == ()
    # Plain convolutions: vmap's per-example kernels are cheap for one label (measured 1.4x
    # faster than patches), ruinous inside the exact Fisher's scan over labels (4.6x slower).
    assert choice("conv", "argmax") is None and choice("conv", "exact") == ()
    # A gather (embedding) is differentiated per example in the tapped pass itself, so the
    # transformer's Dense layers keep their contractions (measured 1.5x faster than vmap(grad)).
    assert choice("tiny_lm", "argmax") == ()


@pytest.mark.parametrize("estimator", ["sampled", "empirical", "argmax", "exact"])
def test_untapped_leaves_in_the_same_pass_match_vmap_grad(estimator):
    # One table for the input gather and the output projection cannot be tapped: it is
    # differentiated per example in the tapped pass, beside the tapped positions and hidden
    # layer; vmap(grad) (method="general") is the reference.
    vocab, width, n, t = 7, 6, 9, 5
    k = jax.random.split(jax.random.key(0), 6)
    params = {
        "table": jax.random.normal(k[0], (vocab, width)) / 2,
        "positions": jax.random.normal(k[1], (t, width)) / 2,
        "hidden": jax.random.normal(k[2], (width, width)) / 2,
    }

    def apply_fn(p, tokens):
        x = p["table"][tokens] + p["positions"][None]
        return jnp.tanh(x @ p["hidden"]) @ p["table"].T

    tokens = jax.random.randint(k[3], (n, t), 0, vocab)
    labels = jax.random.randint(k[4], (n, t), 0, vocab)
    mask = jax.random.bernoulli(k[5], 0.7, (n, t))
    example = jax.ShapeDtypeStruct((t,), tokens.dtype)
    plan = plan_lib.make_plan(apply_fn, params, example)
    assert plan.fallback == (2,)  # the table (leaves sorted: hidden, positions, table)
    kw = dict(estimator=estimator, labels=labels, mask=mask, key=jax.random.key(1))
    one_pass = ewc_jax.fisher_diagonal(
        apply_fn, params, tokens, method="one_pass", chunk_size=4, **kw
    )
    general = ewc_jax.fisher_diagonal(apply_fn, params, tokens, method="general", **kw)
    assert _max_rel_err(one_pass, general) < 1e-5
    assert all(float(jnp.max(v)) > 0 for v in jax.tree.leaves(general))


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


def test_auto_runs_the_chosen_paths_own_executable():
    from ewc_jax import _fisher

    for family, chosen in (("mlp", "one_pass"), ("tiny_lm", "one_pass"), ("conv", "general")):
        apply_fn, params, x, y = build(family, width=4, n=6)
        ewc_jax.fisher_diagonal(apply_fn, params, x, y, estimator="argmax", method=chosen)
        compiled = _fisher._chunked_fisher._cache_size()
        ewc_jax.fisher_diagonal(apply_fn, params, x, y, estimator="argmax", method="auto")
        assert _fisher._chunked_fisher._cache_size() == compiled, family
