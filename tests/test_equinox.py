"""Equinox models through ``eqx.partition``: every importance against a dense float64 reference.

The Fisher and MAS references are ``tests/_reference.py``'s per-example ``jax.jacrev``
Jacobians; the K-FAC factors are written out by hand from the layers' inputs and output
gradients. Everything runs in float64, so library and reference agree to rounding.
"""

import functools
import re
import typing
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import EqxCNN, EqxMLP, eqx_split
from _reference import assert_trees_close, fisher_from, jacobians
from _reference import fisher as dense_fisher
from _reference import mas as dense_mas

import ewc_jax

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "equinox.md"

MODELS = {
    "mlp": (lambda key: EqxMLP((4, 6, 5, 3), key=key, dtype=jnp.float64), (4,)),
    "cnn": (lambda key: EqxCNN(key=key, dtype=jnp.float64), (2, 6, 6)),
}


@functools.cache
def _problem(name, n=9):
    """``(apply_fn, params, x, y)`` in float64; built once per model, so that its reference
    Jacobians (cached below) are too."""
    build, shape = MODELS[name]
    apply_fn, params = eqx_split(build(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (n, *shape), jnp.float64)
    classes = apply_fn(params, x[:1]).shape[-1]
    y = jax.random.randint(jax.random.key(2), (n,), 0, classes)
    return apply_fn, params, x, y


@functools.cache
def _reference_jacobians(name):
    apply_fn, params, x, _ = _problem(name)
    return jacobians(apply_fn, params, x)


@pytest.mark.parametrize("method", ["one_pass", "general"])
@pytest.mark.parametrize("estimator", typing.get_args(ewc_jax.Estimator))
@pytest.mark.parametrize("name", list(MODELS))
def test_fisher_matches_dense_reference(name, estimator, method):
    with jax.enable_x64(True):
        apply_fn, params, x, y = _problem(name)
        key = jax.random.key(3)
        got = ewc_jax.fisher_diagonal(
            apply_fn, params, x, y, estimator=estimator, key=key, batch_size=4,
            chunk_size=4, method=method,
        )  # fmt: skip
        jac, logits, unravel = _reference_jacobians(name)
        want = unravel(fisher_from(estimator, jac, logits, y, key=key, batch_size=4))
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(got))
        assert_trees_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["one_pass", "general"])
@pytest.mark.parametrize("name", list(MODELS))
def test_mas_matches_dense_reference(name, method):
    with jax.enable_x64(True):
        apply_fn, params, x, _ = _problem(name)
        got = ewc_jax.importance.mas_importance(apply_fn, params, x, chunk_size=4, method=method)
        assert_trees_close(got, dense_mas(apply_fn, params, x), rtol=1e-9, atol=1e-12)


def test_one_pass_path_taps_every_equinox_layer():
    # Linear's `weight @ x` and Conv's kernel are contractions the one-pass path covers: no
    # parameter falls back to per-example gradients.
    from ewc_jax._engine import plan as plan_lib

    for name in MODELS:
        with jax.enable_x64(True):
            apply_fn, params, x, _ = _problem(name)
        plan = plan_lib.make_plan(apply_fn, params, x[0])
        assert not plan.fallback, name
        assert sorted(t.leaf for t in plan.taps) == list(range(len(jax.tree.leaves(params))))


def _ramp(p):
    """``0, 1, 2, ...`` in the shape and dtype of ``p``: a deterministic, uneven step."""
    return jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)


# -- K-FAC ------------------------------------------------------------------------------------


def _hand_factors(mlp, x):
    """A = E[ā āᵀ] and G = E_n Σ_c p_c δ_c δ_cᵀ per Linear layer, from a hand-written forward
    pass ``z = W a + b`` with the ReLU/tanh of :class:`EqxMLP` and hand-derived δ's."""
    weights = [layer.weight for layer in mlp.layers]
    biases = [layer.bias for layer in mlp.layers]
    acts = [jax.nn.relu, jnp.tanh]
    slopes = [lambda z: (z > 0).astype(z.dtype), lambda z: 1 - jnp.tanh(z) ** 2]
    a_sum = [0.0] * len(weights)
    g_sum = [0.0] * len(weights)
    for xn in np.asarray(x):
        inputs, pre = [], []
        a = jnp.asarray(xn)
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            inputs.append(a)
            pre.append(w @ a + b)
            a = acts[i % 2](pre[-1]) if i < len(weights) - 1 else pre[-1]
        p = jax.nn.softmax(a)
        for c in range(p.shape[0]):
            delta = jnp.eye(p.shape[0], dtype=p.dtype)[c] - p  # ∂ log p_c / ∂ logits
            deltas = [delta]
            for i in range(len(weights) - 1, 0, -1):
                delta = (weights[i].T @ delta) * slopes[(i - 1) % 2](pre[i - 1])
                deltas.insert(0, delta)
            for i, d in enumerate(deltas):
                g_sum[i] = g_sum[i] + p[c] * jnp.outer(d, d)
        for i, a_in in enumerate(inputs):
            abar = jnp.concatenate([a_in, jnp.ones(1, a_in.dtype)])
            a_sum[i] = a_sum[i] + jnp.outer(abar, abar)
    n = x.shape[0]
    return [(a / n, g / n) for a, g in zip(a_sum, g_sum, strict=True)]


def test_kfac_factors_of_linear_layers():
    with jax.enable_x64(True):
        mlp = EqxMLP((4, 6, 5, 3), key=jax.random.key(0), dtype=jnp.float64)
        apply_fn, params = eqx_split(mlp)
        x = jax.random.normal(jax.random.key(1), (7, 4), jnp.float64)
        got = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact", chunk_size=3)
        # Leaves in order: (weight, bias) per layer.
        assert [(f.kernel, f.bias) for f in got.layers] == [(0, 1), (2, 3), (4, 5)]
        for factors, (a, g) in zip(got.layers, _hand_factors(mlp, x), strict=True):
            np.testing.assert_allclose(factors.a, a, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(factors.g, g, rtol=1e-10, atol=1e-14)
        assert not any(np.any(leaf) for leaf in jax.tree.leaves(got.diagonal))

        # The penalty is the Kronecker quadratic of X = [ΔWᵀ; Δb] ([in + 1, out], row-major
        # vec): this holds whatever layout the factors are stored in.
        state = ewc_jax.consolidate(None, params, got)
        delta = jax.tree.map(lambda p: 0.1 * jnp.cos(_ramp(p)), params)
        moved = jax.tree.map(jnp.add, params, delta)
        want = 0.0
        for layer, (a, g) in zip(delta.layers, _hand_factors(mlp, x), strict=True):
            xmat = jnp.concatenate([layer.weight.T, layer.bias[None]]).reshape(-1)
            want += 0.5 * 3.0 * xmat @ jnp.kron(a, g) @ xmat
        np.testing.assert_allclose(ewc_jax.penalty(moved, state, 3.0), want, rtol=1e-10)

        # One example: A ⊗ G is the exact Fisher of [Wᵀ; b] (the dense jacrev Fisher block).
        one = ewc_jax.kfac.kfac_fisher(apply_fn, params, x[:1], estimator="exact")
        last = mlp.layers[-1]
        jac = jax.jacrev(lambda w, b: eqx.combine(
            eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), params, (w, b)),
            eqx.partition(mlp, eqx.is_inexact_array)[1])(x[0]), argnums=(0, 1)
        )(last.weight, last.bias)  # fmt: skip
        j = jnp.concatenate([jnp.swapaxes(jac[0], 1, 2), jac[1][:, None]], axis=1).reshape(3, -1)
        p = jax.nn.softmax(apply_fn(params, x[:1])[0])
        dense = j.T @ (jnp.diag(p) - jnp.outer(p, p)) @ j
        np.testing.assert_allclose(
            jnp.kron(one.layers[-1].a, one.layers[-1].g), dense, rtol=1e-10, atol=1e-14
        )


# -- penalty and Optax ------------------------------------------------------------------------


def test_penalty_and_optax_transform_on_the_partitioned_tree():
    with jax.enable_x64(True):
        apply_fn, params, x, _ = _problem("mlp")
        static = eqx.partition(MODELS["mlp"][0](jax.random.key(0)), eqx.is_inexact_array)[1]
        fisher = ewc_jax.fisher_diagonal(apply_fn, params, x, estimator="exact")
        state = ewc_jax.consolidate(None, params, fisher)
        strength = 5.0
        assert float(ewc_jax.penalty(params, state, strength)) == 0.0  # zero at the anchor

        delta = jax.tree.map(lambda p: jnp.sin(_ramp(p) + 1.0), params)
        moved = jax.tree.map(jnp.add, params, delta)
        f_leaves, d_leaves = jax.tree.leaves(fisher), jax.tree.leaves(delta)
        want = (
            0.5
            * strength
            * sum(
                float(np.sum(np.asarray(f) * np.asarray(d) ** 2))
                for f, d in zip(f_leaves, d_leaves, strict=True)
            )
        )
        np.testing.assert_allclose(ewc_jax.penalty(moved, state, strength), want, rtol=1e-12)
        grad = jax.grad(ewc_jax.penalty)(moved, state, strength)
        want_grad = jax.tree.map(lambda f, d: strength * f * d, fisher, delta)
        assert_trees_close(grad, want_grad, rtol=1e-12)

        # add_ewc_penalty adds the same gradient; sgd(1) then steps by minus it.
        tx = optax.chain(ewc_jax.add_ewc_penalty(strength), optax.sgd(1.0))
        opt_state = ewc_jax.set_ewc_state(tx.init(params), state)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = jax.jit(tx.update)(zeros, opt_state, moved)
        assert_trees_close(updates, jax.tree.map(jnp.negative, want_grad), rtol=1e-12)
        stepped = eqx.combine(optax.apply_updates(moved, updates), static)
        assert isinstance(stepped, EqxMLP)
        np.testing.assert_allclose(
            stepped.layers[0].weight, moved.layers[0].weight - want_grad.layers[0].weight
        )


# -- the guide --------------------------------------------------------------------------------


def _guide_block(path):
    """The first Python block of a docs page (the recipe the page teaches)."""
    return re.search(r"```python\n(.*?)```", path.read_text(), re.DOTALL).group(1)


def test_guide_recipe():
    with jax.enable_x64(True):
        model = EqxCNN(key=jax.random.key(0), dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (6, 2, 6, 6), jnp.float64)
        space = {"model": model, "x_task_a": x, "task_loss": jnp.zeros((), jnp.float64)}
        exec(_guide_block(GUIDE), space)
        params, fisher = space["params"], space["fisher"]
        assert isinstance(fisher, EqxCNN)
        want = dense_fisher("exact", space["apply_fn"], params, x)
        assert_trees_close(fisher, want, rtol=1e-9, atol=1e-12)
        assert float(space["loss"]) == 0.0  # the penalty at the anchor


class _BatchNormNet(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(4, 5, key=k1, dtype=jnp.float64)
        self.norm = eqx.nn.BatchNorm(
            5, axis_name="batch", inference=True, mode="ema", dtype=jnp.float64
        )
        self.head = eqx.nn.Linear(5, 3, key=k2, dtype=jnp.float64)

    def __call__(self, x, state):
        h, state = self.norm(self.linear(x), state)
        return self.head(jnp.tanh(h)), state


def test_batchnorm_state_as_model_state():
    with jax.enable_x64(True):
        model, bn_state = eqx.nn.make_with_state(_BatchNormNet)(jax.random.key(0))
        params, static = eqx.partition(model, eqx.is_inexact_array)
        # Running statistics that are not the initial ones, so that using them matters.
        bn_state = bn_state.set(
            model.norm.ema_state_index,
            (jnp.linspace(-1.0, 1.0, 5), jnp.linspace(0.5, 2.0, 5)),
        )

        def apply_fn(params, state, x):
            net = eqx.combine(params, static)
            return jax.vmap(lambda xn: net(xn, state)[0], axis_name="batch")(x)

        x = jax.random.normal(jax.random.key(1), (7, 4), jnp.float64)
        got = ewc_jax.fisher_diagonal(apply_fn, params, x, model_state=bn_state)
        want = dense_fisher("exact", lambda p, xb: apply_fn(p, bn_state, xb), params, x)
        assert_trees_close(got, want, rtol=1e-9, atol=1e-12)
