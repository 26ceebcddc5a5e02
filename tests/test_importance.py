"""MAS against a float64 jacrev reference; SI against a path integral computed by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import TinyCausalLM, init_plain_mlp, plain_mlp
from jax.flatten_util import ravel_pytree

import ewc_jax


def _assert_trees_close(a, b, rtol, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _mas_reference(apply_fn, params, x):
    """mean_n |∂‖f(x_n)‖²/∂θ| from the full Jacobian of one example at a time (jacrev)."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def abs_grad(xn):
        out_fn = lambda theta: apply_fn(unravel(theta), xn[None])[0].reshape(-1)
        jac = jax.jacrev(out_fn)(flat)  # [outputs, P]
        return jnp.abs(2 * jac.T @ out_fn(flat))  # ∂‖f‖² = 2 Jᵀ f

    return unravel(sum(abs_grad(x[i]) for i in range(x.shape[0])) / x.shape[0])


class _TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(2, (2, 2))(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("method", ["one_pass", "general", "auto"])
def test_mas_matches_jacrev_reference_mlp(method):
    with jax.enable_x64(True):
        params = init_plain_mlp(jax.random.key(0), (5, 7, 4), jnp.float64)
        x = jax.random.normal(jax.random.key(1), (11, 5), jnp.float64)
        # chunk_size=4: three chunks, the last overlapping the second.
        got = ewc_jax.importance.mas_importance(plain_mlp, params, x, chunk_size=4, method=method)
        _assert_trees_close(got, _mas_reference(plain_mlp, params, x), rtol=1e-10, atol=1e-14)


def test_mas_cnn_one_pass_matches_reference():
    # Conv kernels and spatially broadcast biases are several-term: one_pass sends them to the
    # general path; the Dense kernel and bias take |a|ᵀ|δ|. Flax layers mix in float32
    # constants, hence standard promotion.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = _TinyCNN()
        x = jax.random.normal(jax.random.key(1), (3, 4, 4, 1), jnp.float64)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), x[:1]))
        ref = _mas_reference(model.apply, params, x)
        got = ewc_jax.importance.mas_importance(
            model.apply, params, x, method="one_pass", chunk_size=2
        )
        _assert_trees_close(got, ref, rtol=1e-9, atol=1e-13)


def test_mas_language_model_one_pass_matches_reference():
    # The embedding table (a gather), the attention projections over the tokens (several-term)
    # and the LayerNorms take per-example gradients from the one backward pass; the output
    # layer over [B, T, D] too. Against the jacrev reference, float64, both paths.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = TinyCausalLM()
        tokens = jax.random.randint(jax.random.key(1), (5, 4), 0, 5)
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), tokens[:1])
        )
        ref = _mas_reference(model.apply, params, tokens)
        for method in ("one_pass", "general"):
            got = ewc_jax.importance.mas_importance(
                model.apply, params, tokens, method=method, chunk_size=2
            )
            _assert_trees_close(got, ref, rtol=1e-9, atol=1e-13)


def test_mas_is_per_example_abs_not_abs_of_mean():
    # Two examples x and -x through a linear model: their gradients of ‖Wx‖² are equal, but
    # for a bias the per-example |∂| differs from |mean ∂|: check the known answer by hand.
    params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5, 0.25])}
    apply = lambda p, x: x @ p["w"] + p["b"][None]
    x = jnp.array([[1.0], [-1.0]])
    # f(x) = x w + b; ∂‖f‖²/∂b = 2 f; ∂/∂w = 2 x f.
    f = np.array([[1.5, -1.75], [-0.5, 2.25]])
    want_b = np.mean(np.abs(2 * f), axis=0)
    want_w = np.mean(np.abs(2 * np.array([[1.0], [-1.0]]) * f), axis=0)[None]
    got = ewc_jax.importance.mas_importance(apply, params, x)
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-6)
    np.testing.assert_allclose(got["w"], want_w, rtol=1e-6)


def test_mas_rejects_bad_method():
    params = init_plain_mlp(jax.random.key(0), (3, 2))
    with pytest.raises(ValueError, match="Unknown method"):
        ewc_jax.importance.mas_importance(plain_mlp, params, jnp.ones((2, 3)), method="fast")


def _quadratic(h, c):
    """Task loss ½ Σ h (θ - c)² over a dict of two leaves."""
    return lambda p: 0.5 * sum(jnp.sum(h[k] * jnp.square(p[k] - c[k])) for k in ("a", "b"))


def test_si_matches_hand_computed_path_integral_with_sgd_and_penalty():
    # Task loss ½ Σ h (θ - c)², plain SGD, and an EWC penalty λ F (θ - θ̄) inside the chain:
    # SI integrates only the task gradient g against the actual step Δθ = -lr (g + λF(θ - θ̄)).
    h = {"a": np.array([1.0, 3.0, 0.5]), "b": np.array([2.0])}
    c = {"a": np.array([1.0, -1.0, 2.0]), "b": np.array([0.5])}
    theta0 = {"a": np.array([0.0, 0.5, 0.0]), "b": np.array([-1.0])}
    anchor = {"a": np.array([0.0, 0.0, -3.0]), "b": np.array([0.0])}
    fisher = {"a": np.array([0.0, 0.0, 4.0]), "b": np.array([0.0])}
    lr, lam, steps, xi = 0.1, 1.0, 5, 0.1

    theta = {k: v.copy() for k, v in theta0.items()}
    omega = {k: np.zeros_like(v) for k, v in theta0.items()}
    for _ in range(steps):
        for k in theta:
            g = h[k] * (theta[k] - c[k])
            delta = -lr * (g + lam * fisher[k] * (theta[k] - anchor[k]))
            omega[k] += -g * delta
            theta[k] = theta[k] + delta
    want = {k: np.maximum(omega[k], 0) / ((theta[k] - theta0[k]) ** 2 + xi) for k in theta}
    # The third coordinate is pulled towards the anchor against its task gradient: ω < 0.
    assert omega["a"][2] < 0 and want["a"][2] == 0

    to_f32 = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
    hj, cj = to_f32(h), to_f32(c)
    tx = ewc_jax.importance.si_path_integral(
        optax.chain(ewc_jax.add_ewc_penalty(lam), optax.sgd(lr))
    )
    params = to_f32(theta0)
    ewc = ewc_jax.EWCState(to_f32(anchor), to_f32(fisher), jnp.ones((), jnp.int32))
    opt_state = ewc_jax.set_ewc_state(tx.init(params), ewc)
    loss = _quadratic(hj, cj)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    _assert_trees_close(params, to_f32(theta), rtol=1e-5, atol=1e-6)
    got, new_state = ewc_jax.importance.si_importance(opt_state, params, damping=xi)
    _assert_trees_close(got, to_f32(want), rtol=1e-5, atol=1e-6)

    # Reset for the next task: ω = 0 and θ_start = the current params; the inner state kept.
    si = new_state
    assert isinstance(si, ewc_jax.importance.SIState)
    _assert_trees_close(si.path_integral, jax.tree.map(jnp.zeros_like, params), rtol=0)
    _assert_trees_close(si.start, params, rtol=0)
    assert jax.tree.structure(new_state) == jax.tree.structure(opt_state)


def test_si_importance_finds_state_nested_in_a_chain_and_resets_it():
    # SI inside a chain after gradient clipping: ω integrates the clipped gradient it receives.
    h = {"a": jnp.array([2.0, 1.0]), "b": jnp.array([1.0])}
    c = {"a": jnp.array([1.0, -1.0]), "b": jnp.array([3.0])}
    tx = optax.chain(optax.clip(0.5), ewc_jax.importance.si_path_integral(optax.sgd(0.2)))
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    start = params
    opt_state = tx.init(params)
    want = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        g = jax.tree.map(lambda u: jnp.clip(u, -0.5, 0.5), jax.grad(_quadratic(h, c))(params))
        want = jax.tree.map(lambda w, gi: w + 0.2 * gi * gi, want, g)  # -g·(-lr g)
        updates, opt_state = tx.update(jax.grad(_quadratic(h, c))(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    got, new_state = ewc_jax.importance.si_importance(opt_state, params, damping=0.5)
    expected = jax.tree.map(lambda w, p, s: w / ((p - s) ** 2 + 0.5), want, params, start)
    _assert_trees_close(got, expected, rtol=1e-6)
    again, _ = ewc_jax.importance.si_importance(new_state, params, damping=0.5)
    _assert_trees_close(again, jax.tree.map(jnp.zeros_like, params), rtol=0)


def test_si_importance_needs_an_si_state():
    params = {"a": jnp.zeros(2)}
    with pytest.raises(ValueError, match="exactly one si_path_integral"):
        ewc_jax.importance.si_importance(optax.sgd(0.1).init(params), params)
