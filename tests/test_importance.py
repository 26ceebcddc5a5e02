"""MAS against a float64 jacrev reference; SI against a path integral computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import LinenCNN, init_plain_mlp, plain_mlp
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


@pytest.mark.parametrize("method", ["one_pass", "general", "auto"])
def test_mas_matches_jacrev_reference_mlp(method):
    with jax.enable_x64(True):
        params = init_plain_mlp(jax.random.key(0), (5, 7, 4), jnp.float64)
        x = jax.random.normal(jax.random.key(1), (11, 5), jnp.float64)
        # chunk_size=4: three chunks, the last overlapping the second.
        got = ewc_jax.mas_importance(plain_mlp, params, x, chunk_size=4, method=method)
        _assert_trees_close(got, _mas_reference(plain_mlp, params, x), rtol=1e-10, atol=1e-14)


def test_mas_cnn_one_pass_equals_general_and_reference():
    # Conv kernels and spatially broadcast biases are several-term: one_pass sends them to the
    # general path; Dense kernels and LayerNorm scales take |a|ᵀ|δ|. Flax layers mix in float32
    # constants, hence standard promotion.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = LinenCNN()
        x = jax.random.normal(jax.random.key(1), (3, 5, 5, 1), jnp.float64)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), x[:1]))
        ref = _mas_reference(model.apply, params, x)
        for method in ("one_pass", "general"):
            got = ewc_jax.mas_importance(model.apply, params, x, method=method, chunk_size=2)
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
    got = ewc_jax.mas_importance(apply, params, x)
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-6)
    np.testing.assert_allclose(got["w"], want_w, rtol=1e-6)


def test_mas_rejects_bad_method():
    params = init_plain_mlp(jax.random.key(0), (3, 2))
    with pytest.raises(ValueError, match="Unknown method"):
        ewc_jax.mas_importance(plain_mlp, params, jnp.ones((2, 3)), method="fast")
