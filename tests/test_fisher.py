"""fisher_diagonal against a dense Fisher built independently with jax.jacrev."""

import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import NNXMLP, LinenMLP, init_plain_mlp, nnx_apply, plain_mlp
from flax import nnx
from jax.flatten_util import ravel_pytree

import ewc_jax

PER_EXAMPLE = ("exact", "sampled", "empirical", "argmax")


def _problem(dtype, n=10, sizes=(3, 4, 3)):
    key = jax.random.key(0)
    params = init_plain_mlp(key, sizes, dtype)
    x = jax.random.normal(jax.random.key(1), (n, sizes[0]), dtype)
    y = jax.random.randint(jax.random.key(2), (n,), 0, sizes[-1])
    return params, x, y


def _dense_reference(params, x, y, estimator, key=None, batch_size=None):
    """Builds the full P x P Fisher from jacrev Jacobians, example by example; returns diag."""
    flat, unravel = ravel_pytree(params)
    n = x.shape[0]

    def logits_fn(theta, xn):
        return plain_mlp(unravel(theta), xn[None])[0]

    @jax.jit
    def score(theta, xn, c):
        # ∇θ log p(c | x) = Jᵀ (e_c − p), J the Jacobian of the logits.
        jac = jax.jacrev(logits_fn)(theta, xn)
        p = jax.nn.softmax(logits_fn(theta, xn))
        return jac.T @ (jax.nn.one_hot(c, p.shape[0], dtype=p.dtype) - p)

    if estimator == "batched":
        sums = []
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            g = sum(score(flat, x[i], y[i]) for i in idx) / len(idx)
            sums.append(jnp.outer(g, g))
        return unravel(jnp.diag(sum(sums) / len(sums)))

    keys = jax.random.split(key, n) if estimator == "sampled" else None
    full = jnp.zeros((flat.size, flat.size), flat.dtype)
    for i in range(n):
        logits = logits_fn(flat, x[i])
        probs = jax.nn.softmax(logits)
        if estimator == "exact":
            for c in range(logits.shape[0]):
                g = score(flat, x[i], c)
                full = full + probs[c] * jnp.outer(g, g)
            continue
        if estimator == "empirical":
            c = y[i]
        elif estimator == "argmax":
            c = jnp.argmax(logits)
        else:
            c = jax.random.categorical(keys[i], logits)
        g = score(flat, x[i], c)
        full = full + jnp.outer(g, g)
    return unravel(jnp.diag(full / n))


def _max_rel_err(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    errs = []
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        errs.append(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))))
    return max(errs)


@pytest.mark.parametrize("method", ["one_pass", "general"])
@pytest.mark.parametrize("estimator", [*PER_EXAMPLE, "batched"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-6), ("float32", 1e-4)])
def test_matches_dense_fisher_diagonal(estimator, method, dtype, tol):
    with jax.enable_x64(dtype == "float64"):
        params, x, y = _problem(jnp.dtype(dtype))
        key = jax.random.key(3)
        kwargs = dict(labels=y, key=key, batch_size=3)
        got = ewc_jax.fisher_diagonal(
            plain_mlp, params, x, estimator=estimator, method=method, chunk_size=4, **kwargs
        )
        want = _dense_reference(params, x, y, estimator, key=key, batch_size=3)
        assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, params)
        assert _max_rel_err(got, want) < tol


def test_batched_with_batch_size_one_equals_empirical():
    params, x, y = _problem(jnp.float32)
    batched = ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator="batched", batch_size=1)
    empirical = ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator="empirical")
    assert _max_rel_err(batched, empirical) < 1e-5


def test_batched_is_smaller_than_empirical_for_large_batches():
    # Squares of mean gradients: cross terms cancel, so it is far below the per-example Fisher.
    params, x, y = _problem(jnp.float32, n=256)
    batched = ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator="batched", batch_size=64)
    empirical = ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator="empirical")
    ratio = sum(float(b.sum()) for b in jax.tree.leaves(batched)) / sum(
        float(e.sum()) for e in jax.tree.leaves(empirical)
    )
    assert ratio < 0.2


@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_sampled_approaches_exact_as_draws_grow(method):
    # Repeating each example R times gives R independent label draws per example.
    params, x, _ = _problem(jnp.float32, n=6)
    exact = ewc_jax.fisher_diagonal(plain_mlp, params, x, estimator="exact", method=method)
    errors = {}
    for draws in (1, 4000):
        xs = jnp.tile(x, (draws, 1))
        sampled = ewc_jax.fisher_diagonal(
            plain_mlp, params, xs, estimator="sampled", key=jax.random.key(7), method=method
        )
        flat_s, _ = ravel_pytree(sampled)
        flat_e, _ = ravel_pytree(exact)
        errors[draws] = float(jnp.linalg.norm(flat_s - flat_e) / jnp.linalg.norm(flat_e))
    # Monte-Carlo error shrinks like 1/sqrt(draws): ~0.5 at 1 draw, ~0.01 at 4000.
    assert errors[4000] < 0.05
    assert errors[4000] < errors[1] / 5
    # And the estimate is not the argmax Fisher, which a wrong sampler could give.
    argmax = ewc_jax.fisher_diagonal(plain_mlp, params, x, estimator="argmax")
    flat_a, _ = ravel_pytree(argmax)
    assert float(jnp.linalg.norm(flat_a - flat_e) / jnp.linalg.norm(flat_e)) > 0.1


@pytest.mark.parametrize("estimator", ESTIMATORS := typing.get_args(ewc_jax.Estimator))
def test_all_estimators_nonnegative_and_shaped_like_params(estimator):
    params, x, y = _problem(jnp.float32, n=20)
    fisher = ewc_jax.fisher_diagonal(
        plain_mlp, params, x, y, estimator=estimator, key=jax.random.key(0), batch_size=4
    )
    assert jax.tree.structure(fisher) == jax.tree.structure(params)
    for f, p in zip(jax.tree.leaves(fisher), jax.tree.leaves(params), strict=True):
        assert f.shape == p.shape and f.dtype == p.dtype
        assert bool(jnp.all(f >= 0)) and bool(jnp.any(f > 0))


@pytest.mark.parametrize("method", ["one_pass", "general"])
@pytest.mark.parametrize("estimator", [*PER_EXAMPLE, "batched"])
def test_independent_of_chunk_size(estimator, method):
    params, x, y = _problem(jnp.float32, n=23)
    results = [
        ewc_jax.fisher_diagonal(
            plain_mlp,
            params,
            x,
            y,
            estimator=estimator,
            key=jax.random.key(1),
            batch_size=5,
            chunk_size=chunk,
            method=method,
        )
        for chunk in (3, 100)
    ]
    for other in results[1:]:
        assert _max_rel_err(other, results[0]) < 1e-5


def test_every_example_counted_exactly_once_with_uneven_chunks():
    # Weighting: the Fisher of N examples is the mean of the single-example Fishers.
    params, x, y = _problem(jnp.float32, n=11)
    whole = ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator="empirical", chunk_size=4)
    singles = [
        ewc_jax.fisher_diagonal(
            plain_mlp, params, x[i : i + 1], y[i : i + 1], estimator="empirical"
        )
        for i in range(11)
    ]
    mean = jax.tree.map(lambda *fs: sum(fs) / 11, *singles)
    assert _max_rel_err(whole, mean) < 1e-5


def _tutorial_numpy_fisher(layers, x):
    """The tutorial's loop in NumPy: one example at a time, argmax label, F += g**2 / N.

    The model is the tutorial's MLP with ReLU on every layer, logits included; gradients are
    back-propagated by hand, independently of JAX.
    """
    fisher = [(np.zeros_like(w), np.zeros_like(b)) for w, b in layers]
    n = x.shape[0]
    for xn in x:
        acts, pre = [xn[None].astype(np.float64)], []
        for w, b in layers:
            z = acts[-1] @ w + b
            pre.append(z)
            acts.append(np.maximum(z, 0))
        out = acts[-1][0]
        label = int(np.argmax(out))
        p = np.exp(out - out.max())
        p /= p.sum()
        grad_out = p.copy()
        grad_out[label] -= 1.0  # d(-log p_label)/d out
        delta = grad_out[None] * (pre[-1] > 0)
        for i in reversed(range(len(layers))):
            gw = acts[i].T @ delta
            gb = delta[0]
            fisher[i] = (fisher[i][0] + gw**2 / n, fisher[i][1] + gb**2 / n)
            delta = (delta @ layers[i][0].T) * (pre[i - 1] > 0) if i > 0 else None
    return fisher


@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_tutorial_formula_parity_argmax(method):
    model = LinenMLP(features=(256, 256, 256), num_classes=10, relu_logits=True)
    params = model.init(jax.random.key(0), jnp.ones((1, 784)))
    x = jax.random.uniform(jax.random.key(1), (24, 784))
    got = ewc_jax.fisher_diagonal(model.apply, params, x, estimator="argmax", method=method)
    layers = [
        (
            np.asarray(params["params"][f"Dense_{i}"]["kernel"], np.float64),
            np.asarray(params["params"][f"Dense_{i}"]["bias"], np.float64),
        )
        for i in range(4)
    ]
    want = _tutorial_numpy_fisher(layers, np.asarray(x, np.float64))
    for i, (fw, fb) in enumerate(want):
        got_w = np.asarray(got["params"][f"Dense_{i}"]["kernel"])
        got_b = np.asarray(got["params"][f"Dense_{i}"]["bias"])
        np.testing.assert_allclose(got_w, fw, rtol=2e-4, atol=1e-4 * fw.max())
        np.testing.assert_allclose(got_b, fb, rtol=2e-4, atol=1e-4 * fb.max())


def test_linen_model_matches_plain_function_with_same_weights():
    model = LinenMLP(features=(4,), num_classes=3)
    lparams = model.init(jax.random.key(0), jnp.ones((1, 3)))
    plain = {
        "layer0": {
            "w": lparams["params"]["Dense_0"]["kernel"],
            "b": lparams["params"]["Dense_0"]["bias"],
        },
        "layer1": {
            "w": lparams["params"]["Dense_1"]["kernel"],
            "b": lparams["params"]["Dense_1"]["bias"],
        },
    }

    def relu_plain(params, x):
        h = jax.nn.relu(x @ params["layer0"]["w"] + params["layer0"]["b"][None])
        return h @ params["layer1"]["w"] + params["layer1"]["b"][None]

    x = jax.random.normal(jax.random.key(1), (9, 3))
    a = ewc_jax.fisher_diagonal(model.apply, lparams, x)
    b = ewc_jax.fisher_diagonal(relu_plain, plain, x)
    np.testing.assert_allclose(a["params"]["Dense_0"]["kernel"], b["layer0"]["w"], rtol=1e-5)
    np.testing.assert_allclose(a["params"]["Dense_1"]["bias"], b["layer1"]["b"], rtol=1e-5)


def test_nnx_model_through_split_merge():
    model = NNXMLP(3, 6, 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (9, 3))
    fisher = ewc_jax.fisher_diagonal(nnx_apply(graphdef), state, x, estimator="exact")
    assert jax.tree.structure(fisher) == jax.tree.structure(state)
    # Same weights as a plain function: the same Fisher.
    plain = {
        "layer0": {"w": state["l1"]["kernel"][...], "b": state["l1"]["bias"][...]},
        "layer1": {"w": state["l2"]["kernel"][...], "b": state["l2"]["bias"][...]},
    }

    def gelu_plain(params, x):
        h = jax.nn.gelu(x @ params["layer0"]["w"] + params["layer0"]["b"][None])
        return h @ params["layer1"]["w"] + params["layer1"]["b"][None]

    want = ewc_jax.fisher_diagonal(gelu_plain, plain, x, estimator="exact", method="general")
    np.testing.assert_allclose(fisher["l1"]["kernel"][...], want["layer0"]["w"], rtol=1e-5)
    np.testing.assert_allclose(fisher["l2"]["bias"][...], want["layer1"]["b"], rtol=1e-5)
    # And the result feeds straight into consolidation and the penalty.
    ewc = ewc_jax.consolidate(None, state, fisher)
    assert float(ewc_jax.penalty(state, ewc, 1.0)) == 0.0


def test_pytree_inputs():
    params, x, _ = _problem(jnp.float32)

    def two_input_model(params, inputs):
        return plain_mlp(params, inputs["a"] + 2.0 * inputs["b"])

    inputs = {"a": x, "b": 0.5 * x}
    got = ewc_jax.fisher_diagonal(two_input_model, params, inputs, estimator="exact")
    want = ewc_jax.fisher_diagonal(plain_mlp, params, 2.0 * x, estimator="exact")
    assert _max_rel_err(got, want) < 1e-5


def test_runs_under_an_outer_jit():
    params, x, y = _problem(jnp.float32)

    @jax.jit
    def fisher_of(params, x, y):
        return ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator="empirical")

    assert (
        _max_rel_err(
            fisher_of(params, x, y),
            ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator="empirical"),
        )
        < 1e-6
    )


# --- bad input ------------------------------------------------------------------------------


def test_unknown_estimator_lists_valid_ones():
    params, x, _ = _problem(jnp.float32)
    with pytest.raises(ValueError, match=r"Unknown estimator 'true'.*'exact', 'sampled'"):
        ewc_jax.fisher_diagonal(plain_mlp, params, x, estimator="true")


@pytest.mark.parametrize(
    "estimator,missing,match",
    [
        ("empirical", "labels", "needs labels"),
        ("batched", "labels", "needs labels"),
        ("sampled", "key", "needs key"),
        ("batched", "batch_size", "needs batch_size"),
    ],
)
def test_missing_argument_for_estimator(estimator, missing, match):
    params, x, y = _problem(jnp.float32)
    kwargs = dict(labels=y, key=jax.random.key(0), batch_size=2)
    kwargs[missing] = None
    with pytest.raises(ValueError, match=match):
        ewc_jax.fisher_diagonal(plain_mlp, params, x, estimator=estimator, **kwargs)


def test_labels_of_wrong_length_or_range():
    params, x, y = _problem(jnp.float32)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \(10,\)"):
        ewc_jax.fisher_diagonal(plain_mlp, params, x, y[:4], estimator="empirical")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[7\]"):
        ewc_jax.fisher_diagonal(plain_mlp, params, x, y.at[2].set(7), estimator="empirical")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[-1\]"):
        ewc_jax.fisher_diagonal(
            plain_mlp, params, x, y.at[0].set(-1), estimator="batched", batch_size=2
        )
    with pytest.raises(ValueError, match="labels must be integers"):
        ewc_jax.fisher_diagonal(plain_mlp, params, x, y.astype(jnp.float32), estimator="empirical")


def test_logits_must_be_batch_by_classes():
    params, x, _ = _problem(jnp.float32)
    with pytest.raises(ValueError, match=r"logits of shape \[B, C\].*\(2,\)"):
        ewc_jax.fisher_diagonal(lambda p, xb: plain_mlp(p, xb)[:, 0], params, x)
    with pytest.raises(ValueError, match=r"logits of shape \[B, C\].*\(1, 3\)"):
        ewc_jax.fisher_diagonal(lambda p, xb: plain_mlp(p, xb)[:1], params, x)


def test_empty_inputs_and_bad_sizes():
    params, x, _ = _problem(jnp.float32)
    with pytest.raises(ValueError, match="inputs is empty"):
        ewc_jax.fisher_diagonal(plain_mlp, params, x[:0])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ewc_jax.fisher_diagonal(plain_mlp, params, x, chunk_size=0)
    with pytest.raises(ValueError, match=r"dtype int32.*floating-point"):
        ewc_jax.fisher_diagonal(plain_mlp, jax.tree.map(lambda p: p.astype(jnp.int32), params), x)


def test_flax_dense_on_images_is_flattened_by_the_model():
    # A model that flattens inside: inputs keep their image shape.
    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    model = Flat()
    x = jax.random.uniform(jax.random.key(0), (7, 4, 4, 1))
    params = model.init(jax.random.key(1), x[:1])
    fast = ewc_jax.fisher_diagonal(model.apply, params, x, method="one_pass")
    general = ewc_jax.fisher_diagonal(model.apply, params, x, method="general")
    assert _max_rel_err(fast, general) < 1e-5
