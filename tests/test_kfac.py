"""K-FAC Laplace against per-example references and explicit Kronecker products (float64)."""

import dataclasses

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import LinenMLP

import ewc_jax
from ewc_jax import _kfac_layers
from ewc_jax._engine import plan as plan_lib


def _init(key, dtype=jnp.float64):
    k = jax.random.split(key, 4)
    return {
        "l0": {
            "w": jax.random.normal(k[0], (4, 5), dtype) / 2,
            "b": 0.3 * jax.random.normal(k[1], (5,), dtype),
        },
        "l1": {"w": jax.random.normal(k[2], (5, 3), dtype) / 2},
        "s": 1.0 + 0.2 * jax.random.normal(k[3], (5,), dtype),
    }


def _model(params, x):
    """Dense with bias, tanh, an elementwise scale (a diagonal leaf), Dense without bias."""
    h = jnp.tanh(x @ params["l0"]["w"] + params["l0"]["b"][None]) * params["s"][None]
    return h @ params["l1"]["w"]


def _reference_factors(params, x, labels, estimator, key=None):
    """A and G of both layers from a hand-written forward pass with explicit perturbations."""
    w0, b0, w1, s = params["l0"]["w"], params["l0"]["b"], params["l1"]["w"], params["s"]

    def logits_of(xn, e0, e1):
        h = jnp.tanh(xn @ w0 + b0 + e0) * s
        return h @ w1 + e1

    @jax.jit
    def deltas(xn, c):
        e0, e1 = jnp.zeros(5, xn.dtype), jnp.zeros(3, xn.dtype)
        return jax.grad(lambda e0, e1: jax.nn.log_softmax(logits_of(xn, e0, e1))[c], (0, 1))(e0, e1)

    n = x.shape[0]
    keys = jax.random.split(key, n) if estimator == "sampled" else None
    a0 = jnp.zeros((5, 5), x.dtype)
    a1 = jnp.zeros((5, 5), x.dtype)
    g0 = jnp.zeros((5, 5), x.dtype)
    g1 = jnp.zeros((3, 3), x.dtype)
    for i in range(n):
        xn = x[i]
        abar = jnp.concatenate([xn, jnp.ones(1, x.dtype)])
        h = jnp.tanh(xn @ w0 + b0) * s
        a0, a1 = a0 + jnp.outer(abar, abar), a1 + jnp.outer(h, h)
        logits = h @ w1
        probs = jax.nn.softmax(logits)
        if estimator == "exact":
            pairs = [(c, probs[c]) for c in range(3)]
        elif estimator == "sampled":
            pairs = [(jax.random.categorical(keys[i], logits), 1.0)]
        else:
            pairs = [(labels[i], 1.0)]
        for c, weight in pairs:
            d0, d1 = deltas(xn, c)
            g0, g1 = g0 + weight * jnp.outer(d0, d0), g1 + weight * jnp.outer(d1, d1)
    return [(a0 / n, g0 / n), (a1 / n, g1 / n)]


def _data(seed, n=7):
    x = jax.random.normal(jax.random.key(seed), (n, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 3)
    return x, y


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical"])
def test_factors_match_per_example_reference(estimator):
    with jax.enable_x64(True):
        params = _init(jax.random.key(0))
        x, y = _data(1)
        key = jax.random.key(5)
        # chunk_size=3: three chunks, the last overlapping the second.
        got = ewc_jax.kfac.kfac_fisher(
            _model, params, x, y, estimator=estimator, key=key, chunk_size=3
        )
        ref = _reference_factors(params, x, y, estimator, key)
        # Leaves in order: l0.b, l0.w, l1.w, s.
        assert [(f.kernel, f.bias) for f in got.layers] == [(1, 0), (2, None)]
        for factors, (a, g) in zip(got.layers, ref, strict=True):
            assert factors.a.dtype == jnp.float64
            np.testing.assert_allclose(factors.a, a, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(factors.g, g, rtol=1e-10, atol=1e-14)
        # The scale keeps its diagonal Fisher; the factored leaves have 0 there.
        if estimator == "exact":
            diag = ewc_jax.fisher_diagonal(_model, params, x, y, estimator=estimator, key=key)
            np.testing.assert_allclose(got.diagonal["s"], diag["s"], rtol=1e-12)
        for path in (("l0", "w"), ("l0", "b"), ("l1", "w")):
            leaf = got.diagonal[path[0]][path[1]]
            assert leaf.shape == params[path[0]][path[1]].shape
            assert not np.any(leaf)


def test_one_example_empirical_diagonal_equals_empirical_fisher():
    # For one example, A ⊗ G = (ā āᵀ) ⊗ (δ δᵀ) = vec(g) vec(g)ᵀ with g = ā δᵀ the gradient of
    # [W; b]: its diagonal is the empirical Fisher of kernel and bias.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = LinenMLP(features=(6,), num_classes=4)
        x = jax.random.normal(jax.random.key(1), (1, 5), jnp.float64)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), x))
        y = jnp.array([2])
        kfac = ewc_jax.kfac.kfac_fisher(model.apply, params, x, y, estimator="empirical")
        diag = ewc_jax.fisher_diagonal(model.apply, params, x, y, estimator="empirical")
        leaves = jax.tree.leaves(diag)
        assert len(kfac.layers) == 2
        for factors in kfac.layers:
            kron = jnp.diag(jnp.kron(factors.a, factors.g)).reshape(factors.a.shape[0], -1)
            np.testing.assert_allclose(kron[:-1], leaves[factors.kernel], rtol=1e-10)
            np.testing.assert_allclose(kron[-1], leaves[factors.bias], rtol=1e-10)


def _two_tasks(mode, gamma):
    params_1, params_2, now = (_init(jax.random.key(k)) for k in (0, 10, 20))
    x1, y1 = _data(1)
    x2, y2 = _data(3)
    f1 = ewc_jax.kfac.kfac_fisher(_model, params_1, x1, y1, estimator="exact")
    f2 = ewc_jax.kfac.kfac_fisher(_model, params_2, x2, y2, estimator="empirical")
    state = ewc_jax.consolidate(None, params_1, f1, mode=mode)
    state = ewc_jax.consolidate(state, params_2, f2, mode=mode, gamma=gamma)
    return state, now, [(params_1, f1), (params_2, f2)]


def _explicit_terms(mode, gamma, tasks):
    """(weight, anchor params, fisher) per task as the mode defines them."""
    (p1, f1), (p2, f2) = tasks
    if mode == "separate":
        return [(1.0, p1, f1), (1.0, p2, f2)]
    return [(gamma, p2, f1), (1.0, p2, f2)]


def _augmented(params, layer):
    if layer == 0:
        return jnp.concatenate([params["l0"]["w"], params["l0"]["b"][None]])
    return params["l1"]["w"]


@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.5)])
def test_penalty_equals_explicit_kronecker_quadratic(mode, gamma):
    with jax.enable_x64(True):
        state, now, tasks = _two_tasks(mode, gamma)
        assert isinstance(state, ewc_jax.kfac.KFACState)
        assert int(state.diagonal.num_tasks) == 2
        lam = 3.0
        terms = _explicit_terms(mode, gamma, tasks)

        def explicit(theta):
            """(diagonal part, Kronecker part) of Σ_t w_t (θ - θ_t)ᵀ F_t (θ - θ_t)."""
            diag = kron = 0.0
            for weight, anchor, fisher in terms:
                diag += weight * jnp.sum(fisher.diagonal["s"] * (theta["s"] - anchor["s"]) ** 2)
                for layer, factors in enumerate(fisher.layers):
                    v = (_augmented(theta, layer) - _augmented(anchor, layer)).reshape(-1)
                    kron += weight * v @ jnp.kron(factors.a, factors.g) @ v
            return diag, kron

        diag, kron = explicit(now)
        got = ewc_jax.penalty(now, state, lam)
        # The Kronecker quadratics exactly; the diagonal part is stored as one merged quadratic
        # (equal up to a constant in separate mode), so compare it through a difference.
        np.testing.assert_allclose(
            got - ewc_jax.penalty(now, state.diagonal, lam), 0.5 * lam * kron, rtol=1e-12
        )
        other = _init(jax.random.key(30))
        np.testing.assert_allclose(
            got - ewc_jax.penalty(other, state, lam),
            0.5 * lam * (sum(explicit(now)) - sum(explicit(other))),
            rtol=1e-10,
        )
        if mode == "online":
            np.testing.assert_allclose(got, 0.5 * lam * (diag + kron), rtol=1e-12)
        np.testing.assert_allclose(jax.jit(ewc_jax.penalty)(now, state, lam), got, rtol=1e-12)


@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.5)])
def test_penalty_gradient_and_optax_transform(mode, gamma):
    with jax.enable_x64(True):
        state, now, tasks = _two_tasks(mode, gamma)
        lam = 2.5
        grads = jax.grad(ewc_jax.penalty)(now, state, lam)
        # λ Σ_t w_t A_t X_t G_t per augmented kernel, λ Σ_t w_t F_t (s - s_t) for the scale.
        want_layers = [0.0, 0.0]
        want_s = 0.0
        for weight, anchor, fisher in _explicit_terms(mode, gamma, tasks):
            want_s += lam * weight * fisher.diagonal["s"] * (now["s"] - anchor["s"])
            for layer, factors in enumerate(fisher.layers):
                x = _augmented(now, layer) - _augmented(anchor, layer)
                want_layers[layer] += lam * weight * factors.a @ x @ factors.g
        np.testing.assert_allclose(grads["l0"]["w"], want_layers[0][:-1], rtol=1e-10)
        np.testing.assert_allclose(grads["l0"]["b"], want_layers[0][-1], rtol=1e-10)
        np.testing.assert_allclose(grads["l1"]["w"], want_layers[1], rtol=1e-10)
        np.testing.assert_allclose(grads["s"], want_s, rtol=1e-10)

        # The Optax transform adds the same gradient (here to zero task gradients).
        tx = optax.chain(ewc_jax.add_ewc_penalty(lam), optax.sgd(1.0))
        opt_state = ewc_jax.set_ewc_state(tx.init(now), state)
        zeros = jax.tree.map(jnp.zeros_like, now)
        updates, _ = jax.jit(tx.update)(zeros, opt_state, now)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(u, -g, rtol=1e-10)
        # And back to a diagonal state (e.g. a later method switch).
        diag_state = ewc_jax.consolidate(None, now, jax.tree.map(jnp.ones_like, now))
        back = ewc_jax.set_ewc_state(opt_state, diag_state)
        assert isinstance(back[0].ewc, ewc_jax.EWCState)


def test_merged_terms_are_exact_for_a_shared_output_factor():
    with jax.enable_x64(True):
        params, now = _init(jax.random.key(0)), _init(jax.random.key(20))
        x, y = _data(1)
        f1 = ewc_jax.kfac.kfac_fisher(_model, params, x, y, estimator="empirical")
        # Task 2: other input factors, the same output factors: the merge is exact.
        f2 = ewc_jax.kfac.KFACFisher(
            jax.tree.map(lambda d: 2 * d, f1.diagonal),
            tuple(dataclasses.replace(f, a=f.a @ f.a + jnp.eye(f.a.shape[0])) for f in f1.layers),
        )
        state = ewc_jax.consolidate(None, params, f1, mode="online")
        state = ewc_jax.consolidate(state, params, f2, mode="online", gamma=0.5)
        merged = ewc_jax.kfac.merge_kronecker_terms(state)
        assert all(t.a.shape[0] == 1 and t.anchor.shape[0] == 1 for t in merged.layers)
        np.testing.assert_allclose(
            ewc_jax.penalty(now, merged, 2.0), ewc_jax.penalty(now, state, 2.0), rtol=1e-12
        )
        separate = ewc_jax.consolidate(None, params, f1)
        separate = ewc_jax.consolidate(separate, now, f2)
        with pytest.raises(ValueError, match="one shared anchor"):
            ewc_jax.kfac.merge_kronecker_terms(separate)


class _GroupedCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(2, (2, 2), feature_group_count=2)(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_grouped_conv_is_left_to_the_diagonal_fisher():
    # Which layers get factors is decided on the traced program: the grouped convolution is
    # not factored (its parameters keep the diagonal Fisher), the Dense layer is.
    model = _GroupedCNN()
    x = jnp.ones((1, 3, 3, 2))
    params = model.init(jax.random.key(0), x)
    plan = plan_lib.make_plan(model.apply, params, x[0])
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    layers = _kfac_layers.factored_layers(plan)
    assert [(names[k], names[b]) for _, k, b, *_ in layers] == [
        ("['params']['Dense_0']['kernel']", "['params']['Dense_0']['bias']")
    ]


_DN = ("NHWC", "HWIO", "NHWC")


def _conv_model(params, x):
    """A 2x2 VALID convolution with bias on [4, 4, 2] images, tanh, a Dense layer."""
    y = jax.lax.conv_general_dilated(x, params["k"], (1, 1), "VALID", dimension_numbers=_DN)
    h = jnp.tanh(y + params["cb"][None, None, None])
    return h.reshape(x.shape[0], -1) @ params["w"] + params["b"][None]


def _conv_kernel_rows(kernel):
    """[h, w, in, out] -> [in·h·w, out], rows ordered channel-major as the patches below."""
    return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, kernel.shape[-1])


def test_conv_factors_penalty_and_gradient():
    # KFC (Grosse & Martens 2016): A = E[Σ_s ā_s ā_sᵀ] over output positions s,
    # G = E[(1/S) Σ_s δ_s δ_sᵀ]; patches cut by hand here.
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 4)
        params = {
            "k": 0.5 * jax.random.normal(k[0], (2, 2, 2, 3), jnp.float64),
            "cb": 0.1 * jax.random.normal(k[1], (3,), jnp.float64),
            "w": 0.3 * jax.random.normal(k[2], (27, 4), jnp.float64),
            "b": jnp.zeros(4, jnp.float64),
        }
        x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2), jnp.float64)
        got = ewc_jax.kfac.kfac_fisher(_conv_model, params, x, estimator="exact")
        conv = [f for f in got.layers if f.a.shape[0] == 9]
        assert len(got.layers) == 2 and len(conv) == 1
        (conv,) = conv

        @jax.jit
        def deltas(xn, c):
            def log_p(e):
                y = jax.lax.conv_general_dilated(
                    xn[None], params["k"], (1, 1), "VALID", dimension_numbers=_DN
                )[0]
                h = jnp.tanh(y + params["cb"][None, None] + e)
                return jax.nn.log_softmax(h.reshape(-1) @ params["w"] + params["b"])[c]

            return jax.grad(log_p)(jnp.zeros((3, 3, 3), jnp.float64)).reshape(9, 3)

        a_ref = np.zeros((9, 9))
        g_ref = jnp.zeros((3, 3), jnp.float64)
        probs = jax.nn.softmax(_conv_model(params, x))
        xs = np.asarray(x)
        for n in range(3):
            for i in range(3):
                for j in range(3):
                    patch = np.transpose(xs[n, i : i + 2, j : j + 2], (2, 0, 1)).reshape(-1)
                    abar = np.concatenate([patch, [1.0]])
                    a_ref += np.outer(abar, abar)
            for c in range(4):
                d = deltas(x[n], c)
                g_ref = g_ref + probs[n, c] * d.T @ d / 9
        np.testing.assert_allclose(conv.a, a_ref / 3, rtol=1e-10)
        np.testing.assert_allclose(conv.g, g_ref / 3, rtol=1e-10, atol=1e-15)

        # Penalty and gradient against the explicit Kronecker product on [rows(k); cb].
        state = ewc_jax.consolidate(None, params, got)
        now = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)
        dense = next(f for f in got.layers if f is not conv)

        def rows(theta, conv_layer):
            if conv_layer:
                return jnp.concatenate([_conv_kernel_rows(theta["k"]), theta["cb"][None]])
            return jnp.concatenate([theta["w"], theta["b"][None]])

        want = 0.0
        for factors, is_conv in ((conv, True), (dense, False)):
            v = (rows(now, is_conv) - rows(params, is_conv)).reshape(-1)
            want += v @ jnp.kron(factors.a, factors.g) @ v
        np.testing.assert_allclose(ewc_jax.penalty(now, state, 2.0), want, rtol=1e-12)
        grads = jax.grad(ewc_jax.penalty)(now, state, 2.0)
        x_conv = rows(now, True) - rows(params, True)
        want_rows = 2.0 * conv.a @ x_conv @ conv.g
        np.testing.assert_allclose(_conv_kernel_rows(grads["k"]), want_rows[:-1], rtol=1e-10)
        np.testing.assert_allclose(grads["cb"], want_rows[-1], rtol=1e-10)
        tx = optax.chain(ewc_jax.add_ewc_penalty(2.0), optax.sgd(1.0))
        opt_state = ewc_jax.set_ewc_state(tx.init(now), state)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, now), opt_state, now)
        # (The logits' bias gradient is ~0: softmax output gradients sum to zero, G 1 = 0.)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(u, -g, rtol=1e-10, atol=1e-15)


def test_kfac_rejects_bad_inputs():
    params = _init(jax.random.key(0), jnp.float32)
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="Unknown estimator"):
        ewc_jax.kfac.kfac_fisher(_model, params, x, estimator="argmax")
    with pytest.raises(ValueError, match="needs labels"):
        ewc_jax.kfac.kfac_fisher(_model, params, x, estimator="empirical")
    fisher = ewc_jax.kfac.KFACFisher(diagonal=params, layers=())
    ewc = ewc_jax.consolidate(None, params, jax.tree.map(jnp.ones_like, params))
    with pytest.raises(
        ValueError, match="is a KFACFisher, which consolidates into its own state type; start its"
    ):
        ewc_jax.consolidate(ewc, params, fisher)


class _EqxModel(eqx.Module):
    """``_model`` as Equinox writes it: ``Linear`` keeps ``W [out, in]`` and computes ``W @ x``."""

    l0: eqx.nn.Linear
    s: jax.Array
    l1: eqx.nn.Linear

    def __call__(self, x):
        return self.l1(jnp.tanh(self.l0(x)) * self.s)


def _eqx_model(params):
    keys = jax.random.split(jax.random.key(9), 2)
    model = _EqxModel(
        eqx.nn.Linear(4, 5, key=keys[0], dtype=jnp.float64),
        params["s"],
        eqx.nn.Linear(5, 3, use_bias=False, key=keys[1], dtype=jnp.float64),
    )
    return eqx.tree_at(
        lambda m: (m.l0.weight, m.l0.bias, m.l1.weight),
        model,
        (params["l0"]["w"].T, params["l0"]["b"], params["l1"]["w"].T),
    )


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical"])
def test_equinox_linear_layers_are_factored(estimator):
    # eqx.nn.Linear is `W @ x` with W [out, in] under vmap, its bias added after a transpose:
    # the same layers as _model, so the same factors as the hand-written reference.
    with jax.enable_x64(True):
        params = _init(jax.random.key(0))
        x, y = _data(1)
        key = jax.random.key(5)
        eqx_params, static = eqx.partition(_eqx_model(params), eqx.is_inexact_array)
        apply_fn = lambda p, xs: jax.vmap(eqx.combine(p, static))(xs)
        got = ewc_jax.kfac.kfac_fisher(
            apply_fn, eqx_params, x, y, estimator=estimator, key=key, chunk_size=3
        )
        names = [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(eqx_params)[0]
        ]
        assert [(names[f.kernel], f.bias is not None and names[f.bias]) for f in got.layers] == [
            (".l0.weight", ".l0.bias"),
            (".l1.weight", False),
        ]
        assert [f.kernel_axes for f in got.layers] == [(1, 0), (1, 0)]
        for factors, (a, g) in zip(
            got.layers, _reference_factors(params, x, y, estimator, key), strict=True
        ):
            np.testing.assert_allclose(factors.a, a, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(factors.g, g, rtol=1e-10, atol=1e-14)
        assert not np.any(got.diagonal.l0.weight) and not np.any(got.diagonal.l1.weight)


def test_equinox_kfac_penalty_is_the_explicit_kronecker_quadratic():
    with jax.enable_x64(True):
        params = _init(jax.random.key(0))
        x, y = _data(1)
        eqx_params, static = eqx.partition(_eqx_model(params), eqx.is_inexact_array)
        apply_fn = lambda p, xs: jax.vmap(eqx.combine(p, static))(xs)
        fisher = ewc_jax.kfac.kfac_fisher(apply_fn, eqx_params, x, y, estimator="exact")
        state = ewc_jax.consolidate(None, eqx_params, fisher)
        moved = jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape, p.dtype), eqx_params
        )
        # Rows of W̄ = [Wᵀ; b] ([in + 1, out]), vec row-major, as the module docstring defines.
        rows = lambda m, with_bias: (
            jnp.concatenate([m.weight.T, m.bias[None]]) if with_bias else m.weight.T
        )
        want = 0.0
        for factors, name, with_bias in zip(
            fisher.layers, ("l0", "l1"), (True, False), strict=True
        ):
            v = rows(getattr(moved, name), with_bias) - rows(getattr(eqx_params, name), with_bias)
            v = v.reshape(-1)
            want += v @ jnp.kron(factors.a, factors.g) @ v
        ds = moved.s - eqx_params.s
        want += jnp.sum(fisher.diagonal.s * ds**2)
        np.testing.assert_allclose(ewc_jax.penalty(moved, state, 2.0), want, rtol=1e-10)
        grads = jax.grad(ewc_jax.penalty)(moved, state, 2.0)
        tx = optax.chain(ewc_jax.add_ewc_penalty(2.0), optax.sgd(1.0))
        opt_state = ewc_jax.set_ewc_state(tx.init(moved), state)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, moved), opt_state, moved)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(u, -g, rtol=1e-10, atol=1e-15)
