"""K-FAC over a subset of the parameters (``where=``): a low-rank adapter ``W x + (α/r) B (A x)``
on a frozen Dense layer, applied over a sequence, in float64. The adapter's factors against
``kfac_fisher`` of the adapter alone as a plain function (base and head closed over), the
penalty and its gradient against the explicit ``jnp.kron`` quadratic plus the diagonal terms of
the selected uncovered leaves, and the unselected leaves against nothing at all."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax

N, T, D, R, H, C = 5, 3, 4, 2, 6, 3
ALPHA = 3.0
WHERE = {
    "adapter": True,
    "base": False,
    "head": {"b": False, "w": True},  # a kernel without its bias
    "s": True,  # an elementwise scale: no block, its diagonal Fisher
}
"""The adapter, the scale and the head's kernel; not the frozen base nor the head's bias."""


def _init(key):
    k = iter(jax.random.split(key, 7))
    normal = lambda shape, scale: scale * jax.random.normal(next(k), shape, jnp.float64)
    return {
        "adapter": {"a": normal((D, R), 0.5), "b": normal((R, H), 0.5)},
        "base": {"w": normal((D, H), 0.5), "b": normal((H,), 0.3)},
        "head": {"w": normal((H, C), 0.5), "b": normal((C,), 0.3)},
        "s": 1.0 + normal((H,), 0.2),
    }


def _model(params, x):
    """``[N, T, D] -> [N, T, C]``: the adapted Dense layer, tanh, a scale, a Dense head."""
    base, adapter, head = params["base"], params["adapter"], params["head"]
    lead = (1,) * (x.ndim - 1)
    up = (x @ adapter["a"]) @ adapter["b"]
    h = jnp.tanh(x @ base["w"] + (ALPHA / R) * up + base["b"].reshape(*lead, H))
    h = h * params["s"].reshape(*lead, H)
    return h @ head["w"] + head["b"].reshape(*lead, C)


def _data(seed):
    x = jax.random.normal(jax.random.key(seed), (N, T, D), jnp.float64)
    y = jax.random.randint(jax.random.key(seed + 1), (N, T), 0, C)
    return x, y


def _blocks(fisher, params):
    """``{kernel path: (bias path or None, A, G)}``."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return {
        paths[f.kernel]: (None if f.bias is None else paths[f.bias], f.a, f.g)
        for f in fisher.layers
    }


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_adapter_factors_equal_those_of_the_adapter_alone(estimator):
    with jax.enable_x64(True):
        params = _init(jax.random.key(0))
        x, y = _data(1)
        got = ewc_jax.kfac.kfac_fisher(_model, params, x, y, estimator=estimator, where=WHERE)
        # Blocks for the adapter's two factors and the head's kernel only: not for the frozen
        # base, and the head's block without its (unselected) bias row.
        blocks = _blocks(got, params)
        assert set(blocks) == {"['adapter']['a']", "['adapter']['b']", "['head']['w']"}
        assert all(bias is None for bias, _, _ in blocks.values())

        # The adapter as a plain function of its own two kernels, everything else constant.
        frozen = {k: v for k, v in params.items() if k != "adapter"}
        alone = ewc_jax.kfac.kfac_fisher(
            lambda adapter, x: _model({**frozen, "adapter": adapter}, x),
            params["adapter"],
            x,
            y,
            estimator=estimator,
        )
        want = _blocks(alone, params["adapter"])
        assert set(want) == {"['a']", "['b']"}
        for name in ("a", "b"):
            _, a, g = blocks[f"['adapter']['{name}']"]
            _, a_ref, g_ref = want[f"['{name}']"]
            assert a.shape == (D, D) if name == "a" else (R, R)
            np.testing.assert_allclose(a, a_ref, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14)

        # The head's kernel alone: the whole model's [W; b] block without its bias row.
        whole = _blocks(ewc_jax.kfac.kfac_fisher(_model, params, x, y, estimator=estimator), params)
        bias, a_full, g_full = whole["['head']['w']"]
        assert bias == "['head']['b']"
        _, a, g = blocks["['head']['w']"]
        np.testing.assert_allclose(a, a_full[:-1, :-1], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g, g_full, rtol=1e-12, atol=1e-14)

        # The diagonal: the scale's Fisher, zero on the blocks' kernels, nothing unselected.
        diag = ewc_jax.fisher_diagonal(_model, params, x, y, estimator=estimator)
        np.testing.assert_allclose(got.diagonal["s"], diag["s"], rtol=1e-12)
        assert not np.any(got.diagonal["adapter"]["a"]) and not np.any(got.diagonal["head"]["w"])
        assert isinstance(got.diagonal["base"], optax.MaskedNode)
        assert isinstance(got.diagonal["head"]["b"], optax.MaskedNode)


def _state(mode="separate"):
    """``(state, anchor, fisher computed without where)`` after one task."""
    params = _init(jax.random.key(0))
    x, y = _data(1)
    fisher = ewc_jax.kfac.kfac_fisher(_model, params, x, y, estimator="exact", where=WHERE)
    state = ewc_jax.consolidate(None, params, fisher, mode=mode, where=WHERE)
    return state, params, ewc_jax.kfac.kfac_fisher(_model, params, x, y, estimator="exact")


def _rows(params, path):
    """The kernel as ``[in, out]``: its rows, vec'd row-major as ``A ⊗ G`` takes them."""
    leaf = params[path[0]][path[1]]
    return leaf.reshape(leaf.shape[0], -1)


def _explicit(theta, anchor, full):
    """``Σ vec(X)ᵀ (A ⊗ G) vec(X)`` over the adapter's kernels and the head's (``A`` without
    the bias row), plus ``Σ F_s (s - s̄)²``, from the whole model's factors and diagonal."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(anchor)]
    total = 0.0
    for factors in full.layers:
        path = paths[factors.kernel]
        if path == "['base']['w']":
            continue
        key = tuple(path[2:-2].split("']['"))
        a = factors.a if factors.bias is None else factors.a[:-1, :-1]
        v = (_rows(theta, key) - _rows(anchor, key)).reshape(-1)
        total += v @ jnp.kron(a, factors.g) @ v
    fisher_s = ewc_jax.fisher_diagonal(_model, anchor, *_data(1), estimator="exact")["s"]
    return total + jnp.sum(fisher_s * (theta["s"] - anchor["s"]) ** 2)


def _moved(params, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            p + scale * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys, strict=True)
        ],
    )


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_penalty_is_the_explicit_kronecker_quadratic_over_the_selection(mode):
    with jax.enable_x64(True):
        state, anchor, full = _state(mode)
        # Leaves in order: adapter a, b; base b, w; head b, w; s.
        assert {t.kernel for t in state.layers} == {0, 1, 5}
        theta = _moved(anchor, 7)
        lam = 2.5
        got = ewc_jax.penalty(theta, state, lam, where=WHERE)
        want = 0.5 * lam * _explicit(theta, anchor, full)
        assert float(want) > 0
        np.testing.assert_allclose(got, want, rtol=1e-11)
        np.testing.assert_allclose(
            jax.jit(lambda t, s: ewc_jax.penalty(t, s, lam, where=WHERE))(theta, state),
            want,
            rtol=1e-11,
        )
        # A full Fisher restricted at consolidation gives the same state's penalty.
        restricted = ewc_jax.consolidate(None, anchor, full, mode=mode, where=WHERE)
        np.testing.assert_allclose(
            ewc_jax.penalty(theta, restricted, lam, where=WHERE), want, rtol=1e-11
        )


def test_unselected_leaves_do_not_change_the_penalty_nor_get_a_gradient():
    with jax.enable_x64(True):
        state, anchor, full = _state()
        theta = _moved(anchor, 7)
        lam = 1.5
        got = ewc_jax.penalty(theta, state, lam, where=WHERE)
        far = {
            **theta,
            "base": jax.tree.map(lambda p: p + 10.0, theta["base"]),
            "head": {**theta["head"], "b": theta["head"]["b"] - 10.0},
        }
        assert float(ewc_jax.penalty(far, state, lam, where=WHERE)) == float(got)

        # The gradient: λ A X G on each selected kernel, λ F (s - s̄), zero elsewhere.
        grads = jax.grad(ewc_jax.penalty)(theta, state, lam, where=WHERE)
        want = jax.grad(lambda t: 0.5 * lam * _explicit(t, anchor, full))(theta)
        for path in (("adapter", "a"), ("adapter", "b"), ("head", "w")):
            np.testing.assert_allclose(
                grads[path[0]][path[1]], want[path[0]][path[1]], rtol=1e-10, atol=1e-14
            )
        np.testing.assert_allclose(grads["s"], want["s"], rtol=1e-10)
        for leaf in (*jax.tree.leaves(grads["base"]), grads["head"]["b"]):
            assert not np.any(leaf)

        # The optax transform adds it to the selected updates and passes the others through.
        tx = optax.chain(ewc_jax.add_ewc_penalty(lam, where=WHERE), optax.sgd(1.0))
        opt_state = ewc_jax.set_ewc_state(tx.init(theta), state)
        ones = jax.tree.map(jnp.ones_like, theta)
        updates, _ = jax.jit(tx.update)(ones, opt_state, theta)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(u, -(1.0 + g), rtol=1e-10)


def test_where_refusals():
    with jax.enable_x64(True):
        state, anchor, full = _state()
        params = _moved(anchor, 3)
        x, y = _data(1)
        with pytest.raises(ValueError, match="covers a where= selection"):
            ewc_jax.penalty(params, state, 1.0)
        with pytest.raises(ValueError, match="covers a where= selection"):
            ewc_jax.consolidate(state, params, full, mode="separate")
        with pytest.raises(ValueError, match="selects none of the parameters"):
            ewc_jax.kfac.kfac_fisher(
                _model, params, x, y, where=jax.tree.map(lambda _: False, WHERE)
            )
        # A bias selected without its kernel: a full Fisher has only the block for it.
        bias_alone = {**WHERE, "head": {"b": True, "w": False}}
        with pytest.raises(ValueError, match=r"selects the bias .* whose kernel"):
            ewc_jax.consolidate(None, params, full, where=bias_alone)
        # kfac_fisher(where=) gives that bias its diagonal Fisher instead.
        own = ewc_jax.kfac.kfac_fisher(_model, params, x, y, where=bias_alone)
        diag = ewc_jax.fisher_diagonal(_model, params, x, y)
        np.testing.assert_allclose(own.diagonal["head"]["b"], diag["head"]["b"], rtol=1e-12)
        assert "['head']['w']" not in _blocks(own, params)
        with pytest.raises(ValueError, match="anchor_dtype= and precision_dtype= apply"):
            ewc_jax.consolidate(state, params, full, where=WHERE, anchor_dtype=jnp.float32)
