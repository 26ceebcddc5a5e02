"""K-FAC for Dense kernels with several output axes (attention's q/k/v projections, Flax
``DenseGeneral(features=(H, Dh))``, kernel ``[D, H, Dh]``, bias ``[H, Dh]``), in float64, against
the same layer written as a plain ``[D, H·Dh]`` Dense layer, the exact GGN block of a deep linear
network (Eschenhagen et al. 2023's setting) and the explicit ``jnp.kron`` quadratic."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax
from tests.test_kfac_sequence import _ggn_block, _same_logit_inputs

N, T, D, H, DH, H2, C = 3, 4, 6, 2, 3, 4, 3


class _Heads(nn.Module):
    """``DenseGeneral((H, Dh))`` (the projection under test), then tanh and a Dense head over
    the flattened heads: ``[..., D] -> [..., C]``."""

    @nn.compact
    def __call__(self, x):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        h = nn.DenseGeneral((H, DH), name="proj", **f64)(x)
        h = jnp.tanh(h.reshape(*h.shape[:-2], H * DH))
        return nn.Dense(C, name="head", **f64)(h)


def _heads_params(key):
    params = _Heads().init(key, jnp.zeros((1, D), jnp.float64))["params"]
    # Flax initialises biases at 0; random ones make the bias rows of the factors visible.
    keys = iter(jax.random.split(jax.random.fold_in(key, 1), 2))
    return {
        name: {**layer, "bias": jax.random.normal(next(keys), layer["bias"].shape, jnp.float64)}
        for name, layer in params.items()
    }


def _heads(params, x):
    return _Heads().apply({"params": params}, x)


def _flattened(params):
    """The projection's kernel as ``[D, H·Dh]`` and its bias as ``[H·Dh]``."""
    proj = params["proj"]
    return {
        **params,
        "proj": {"kernel": proj["kernel"].reshape(D, H * DH), "bias": proj["bias"].reshape(-1)},
    }


def _flat(params, x):
    """The same model in plain JAX with the projection ``x @ W [D, H·Dh] + b`` (params from
    :func:`_flattened`), independently of Flax and of the kernel's output axes."""
    lead = (1,) * (x.ndim - 1)
    h = jnp.tanh(x @ params["proj"]["kernel"] + params["proj"]["bias"].reshape(*lead, H * DH))
    return h @ params["head"]["kernel"] + params["head"]["bias"].reshape(*lead, C)


def _blocks(fisher, params):
    """``{kernel path: (bias path, A, G)}`` of the factored layers."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return {paths[f.kernel]: (paths[f.bias], f.a, f.g) for f in fisher.layers}


def _assert_same_blocks(got, want, params):
    got, want = _blocks(got, params), _blocks(want, _flattened(params))
    assert set(got) == set(want) == {"['head']['kernel']", "['proj']['kernel']"}
    for name, (bias, a, g) in want.items():
        assert got[name][0] == bias
        np.testing.assert_allclose(got[name][1], a, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[name][2], g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sequence", ["expand", "reduce"])
def test_one_position_equals_the_flattened_dense_layer(sequence):
    """T = 1: expand and reduce are both the Dense K-FAC of the kernel as ``[D, H·Dh]``."""
    with jax.enable_x64(True):
        params = _heads_params(jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (5, 1, D), jnp.float64)
        got = ewc_jax.kfac.kfac_fisher(_heads, params, x, estimator="exact", sequence=sequence)
        want = ewc_jax.kfac.kfac_fisher(_flat, _flattened(params), x[:, 0], estimator="exact")
        a = _blocks(got, params)["['proj']['kernel']"][1]
        assert a.shape == (D + 1, D + 1) and float(jnp.min(jnp.diagonal(a))) > 0
        _assert_same_blocks(got, want, params)
        np.testing.assert_array_equal(got.diagonal["proj"]["kernel"], 0.0)
        np.testing.assert_array_equal(got.diagonal["proj"]["bias"], 0.0)


def test_unbatched_positions_equal_the_flattened_dense_layer():
    """``[B, D]`` inputs (no extra axes): the plain Dense K-FAC of ``[D, H·Dh]``."""
    with jax.enable_x64(True):
        params = _heads_params(jax.random.key(2))
        x = jax.random.normal(jax.random.key(3), (5, D), jnp.float64)
        got = ewc_jax.kfac.kfac_fisher(_heads, params, x, estimator="exact")
        want = ewc_jax.kfac.kfac_fisher(_flat, _flattened(params), x, estimator="exact")
        _assert_same_blocks(got, want, params)


@pytest.mark.parametrize("sequence", ["expand", "reduce"])
def test_sequence_equals_the_flattened_dense_layer(sequence):
    """``[B, T, D]`` inputs with a mask: the same factors as the layer written ``[D, H·Dh]``."""
    with jax.enable_x64(True):
        params = _heads_params(jax.random.key(4))
        x = jax.random.normal(jax.random.key(5), (N, T, D), jnp.float64)
        mask = jnp.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0]], bool)
        kw = dict(estimator="sampled", key=jax.random.key(6), sequence=sequence, mask=mask)
        got = ewc_jax.kfac.kfac_fisher(_heads, params, x, **kw)
        want = ewc_jax.kfac.kfac_fisher(_flat, _flattened(params), x, **kw)
        _assert_same_blocks(got, want, params)


def _first_layer(params, x):
    """``DenseGeneral((H, Dh))`` in plain JAX: ``[B, T, D] -> [B, T, H·Dh]``."""
    h = jax.lax.dot_general(x, params["l0"]["w"], (((2,), (0,)), ((), ())))
    h = h + params["l0"]["b"][None, None]
    return h.reshape(*h.shape[:2], H * DH)


def _linear_heads(params, x):
    """A deep linear network whose first layer is ``DenseGeneral((H, Dh))``, applied at
    every position: ``[B, T, D] -> [B, T, C]``."""
    return _first_layer(params, x) @ params["l1"]["w"] @ params["l2"]["w"]


def _pooled_heads(params, x):
    """The same layers with the positions averaged after the first: ``[B, T, D] -> [B, C]``."""
    return jnp.mean(_first_layer(params, x), axis=1) @ params["l1"]["w"] @ params["l2"]["w"]


def _linear_heads_params(key):
    k = jax.random.split(key, 4)
    return {
        "l0": {
            "w": jax.random.normal(k[0], (D, H, DH), jnp.float64) / 2,
            "b": jax.random.normal(k[1], (H, DH), jnp.float64) / 2,
        },
        "l1": {"w": jax.random.normal(k[2], (H * DH, H2), jnp.float64) / 2},
        "l2": {"w": jax.random.normal(k[3], (H2, C), jnp.float64) / 2},
    }


@pytest.mark.parametrize(
    ("sequence", "apply_fn", "mask"),
    [
        ("expand", _linear_heads, [[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]]),
        ("reduce", _pooled_heads, None),
    ],
)
def test_exact_ggn_for_a_multi_output_kernel(sequence, apply_fn, mask):
    """Eschenhagen et al.'s settings (deep linear network, positions sharing the kernel, the
    same logits everywhere; expand: a loss term per position, reduce: a loss of the positions'
    mean): ``A ⊗ G`` is the exact GGN block of ``[W; b]`` with ``W`` the ``[D, H, Dh]`` kernel
    as ``[D, H·Dh]`` and ``b`` the flattened ``[H, Dh]`` bias."""
    with jax.enable_x64(True):
        params = _linear_heads_params(jax.random.key(7))
        flat = {**params, "l0": {"w": params["l0"]["w"].reshape(D, H * DH)}}
        x = _same_logit_inputs(flat, jax.random.key(8), (N, T))
        logits = _linear_heads(params, x)
        np.testing.assert_allclose(logits, jnp.broadcast_to(logits[0, 0], logits.shape), atol=1e-12)
        mask = None if mask is None else jnp.array(mask, bool)
        fisher = ewc_jax.kfac.kfac_fisher(
            apply_fn, params, x, estimator="exact", sequence=sequence, mask=mask
        )
        assert len(fisher.layers) == 3
        (layer,) = [f for f in fisher.layers if f.kernel == 1]  # leaves: l0.b, l0.w, l1, l2
        assert (layer.bias, layer.kernel_axes) == (0, (0, 1, 2))
        assert layer.a.shape == (D + 1, D + 1) and layer.g.shape == (H * DH, H * DH)
        ggn = _ggn_block(apply_fn, params, x, "l0", mask)
        assert ggn.shape == ((D + 1) * H * DH,) * 2 and np.abs(ggn).max() > 1e-3
        np.testing.assert_allclose(jnp.kron(layer.a, layer.g), ggn, rtol=1e-9, atol=1e-12)


def test_penalty_equals_explicit_kronecker_quadratic():
    """The penalty of the ``[D, H, Dh]`` layer is ``½ λ vᵀ (A ⊗ G) v`` with ``v`` the flattened
    ``[ΔW [D, H·Dh]; Δb [H·Dh]]``, and its gradient is that quadratic's (``jax.grad`` of the
    explicit form)."""
    with jax.enable_x64(True):
        params = _heads_params(jax.random.key(9))
        x = jax.random.normal(jax.random.key(10), (N, T, D), jnp.float64)
        fisher = ewc_jax.kfac.kfac_fisher(
            _heads, params, x, estimator="sampled", key=jax.random.key(11)
        )
        state = ewc_jax.consolidate(None, params, fisher)
        noise = jax.random.split(jax.random.key(12), 4)
        moved = jax.tree.unflatten(
            jax.tree.structure(params),
            [
                p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                for p, k in zip(jax.tree.leaves(params), noise, strict=True)
            ],
        )
        blocks = _blocks(fisher, params)
        lam = 1.7

        def explicit(p):
            total = 0.0
            for name, out in (("proj", H * DH), ("head", C)):
                _, a, g = blocks[f"['{name}']['kernel']"]
                dw = (p[name]["kernel"] - params[name]["kernel"]).reshape(-1, out)
                db = (p[name]["bias"] - params[name]["bias"]).reshape(1, out)
                v = jnp.concatenate([dw, db]).reshape(-1)
                total += 0.5 * lam * v @ jnp.kron(a, g) @ v
            return total

        assert float(explicit(moved)) > 0
        np.testing.assert_allclose(ewc_jax.penalty(moved, state, lam), explicit(moved), rtol=1e-12)
        got = state.penalty_gradient(moved, lam)
        want = jax.grad(explicit)(moved)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
