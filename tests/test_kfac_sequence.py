"""K-FAC-expand and K-FAC-reduce against the exact GGN block and hand-written factors (float64).

Eschenhagen et al. (2023) prove each approximation exact for deep linear networks with weight
sharing, in its own setting, when the loss's Hessian in the outputs does not depend on the
position or the example (MSE: the identity). Our likelihood is the softmax, whose Hessian
``Λ = diag(p) - p pᵀ`` depends on the logits; the tests make it the same everywhere by feeding
inputs that differ only in the left null space of the network's end-to-end matrix: every
position's logits are then equal while every layer's inputs differ, which is the paper's
setting with ``Λ`` in place of the identity.
"""

import os
import subprocess
import sys
import typing
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _xla import xla_flags

import ewc_jax
from ewc_jax._kfac_sequence import gram

N, T, D, H1, H2, C = 3, 4, 6, 5, 4, 3


def _linear_params(key):
    k = jax.random.split(key, 4)
    return {
        "l0": {
            "w": jax.random.normal(k[0], (D, H1), jnp.float64) / 2,
            "b": jax.random.normal(k[1], (H1,), jnp.float64) / 2,
        },
        "l1": {"w": jax.random.normal(k[2], (H1, H2), jnp.float64) / 2},
        "l2": {"w": jax.random.normal(k[3], (H2, C), jnp.float64) / 2},
    }


def _end_to_end(params):
    return params["l0"]["w"] @ params["l1"]["w"] @ params["l2"]["w"]


def _same_logit_inputs(params, key, shape):
    """``x0 + u`` with every ``u`` in the left null space of the end-to-end matrix ``P``:
    ``x P`` is the same for every row while ``x W0`` is not."""
    p = np.asarray(_end_to_end(params))
    null = np.linalg.svd(p.T)[2][C:]  # [D - C, D], rows orthogonal to P's columns
    k0, k1 = jax.random.split(key)
    x0 = jax.random.normal(k0, (D,), jnp.float64)
    coeffs = jax.random.normal(k1, (*shape, D - C), jnp.float64)
    return x0[None, None] + coeffs @ jnp.asarray(null)


def _per_token(params, x):
    """A deep linear network applied at every position: ``[B, T, D] -> [B, T, C]``."""
    h = x @ params["l0"]["w"] + params["l0"]["b"][None, None]
    return h @ params["l1"]["w"] @ params["l2"]["w"]


def _pooled(params, x):
    """The same layers with the positions averaged after the first: ``[B, T, D] -> [B, C]``."""
    h = jnp.mean(x @ params["l0"]["w"] + params["l0"]["b"][None, None], axis=1)
    return h @ params["l1"]["w"] @ params["l2"]["w"]


def _augmented_jacobian(apply_fn, params, x, name):
    """``∂ logits / ∂ vec([W; b])`` of one layer, ``[N, *S, C, (in (+1)) · out]`` (row-major)."""
    jac = jax.jacrev(apply_fn)(params, x)[name]
    logits_ndim = apply_fn(params, x).ndim
    w = jac["w"]
    if "b" in jac:
        b = jnp.expand_dims(jac["b"], logits_ndim)
        w = jnp.concatenate([w, b], axis=logits_ndim)
    return w.reshape(*w.shape[:logits_ndim], -1)


def _ggn_block(apply_fn, params, x, name, mask=None):
    r"""The exact mean GGN (= Fisher) block :math:`\frac1N \sum_{n,t} m_{nt} J^\top Λ J`."""
    logits = apply_fn(params, x)
    p = jax.nn.softmax(logits, axis=-1)
    lam = (
        jax.vmap(jnp.diag)(p.reshape(-1, C)).reshape(*p.shape, C)
        - p[..., :, None] * p[..., None, :]
    )
    if mask is not None:
        lam = lam * mask[..., None, None].astype(lam.dtype)
    jac = _augmented_jacobian(apply_fn, params, x, name)
    lead = "nt" if logits.ndim == 3 else "n"
    return jnp.einsum(f"{lead}ci,{lead}cd,{lead}dj->ij", jac, lam, jac) / x.shape[0]


def _layer(fisher, params, name):
    """The factors of the layer whose kernel is ``params[name]["w"]``."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    (layer,) = [f for f in fisher.layers if paths[f.kernel] == f"['{name}']['w']"]
    return layer


@pytest.mark.parametrize("masked", [False, True])
def test_expand_equals_exact_ggn_in_expand_setting(masked):
    with jax.enable_x64(True):
        params = _linear_params(jax.random.key(0))
        x = _same_logit_inputs(params, jax.random.key(1), (N, T))
        logits = _per_token(params, x)
        np.testing.assert_allclose(logits, jnp.broadcast_to(logits[0, 0], logits.shape), atol=1e-12)
        mask = jnp.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0]], bool) if masked else None
        fisher = ewc_jax.kfac.kfac_fisher(
            _per_token, params, x, estimator="exact", sequence="expand", mask=mask
        )
        assert len(fisher.layers) == 3
        for name in ("l0", "l1", "l2"):
            layer = _layer(fisher, params, name)
            ggn = _ggn_block(_per_token, params, x, name, mask)
            assert np.abs(ggn).max() > 1e-3
            np.testing.assert_allclose(jnp.kron(layer.a, layer.g), ggn, rtol=1e-9, atol=1e-12)
        # The other mode is an approximation here, and a visibly different one.
        reduce = ewc_jax.kfac.kfac_fisher(
            _per_token, params, x, estimator="exact", sequence="reduce", mask=mask
        )
        layer = _layer(reduce, params, "l0")
        ggn = _ggn_block(_per_token, params, x, "l0", mask)
        assert not np.allclose(jnp.kron(layer.a, layer.g), ggn, rtol=1e-3)


def test_reduce_equals_exact_ggn_in_reduce_setting():
    with jax.enable_x64(True):
        params = _linear_params(jax.random.key(2))
        x = _same_logit_inputs(params, jax.random.key(3), (N, T))
        fisher = ewc_jax.kfac.kfac_fisher(_pooled, params, x, estimator="exact", sequence="reduce")
        assert len(fisher.layers) == 3
        for name in ("l0", "l1", "l2"):
            layer = _layer(fisher, params, name)
            ggn = _ggn_block(_pooled, params, x, name)
            assert np.abs(ggn).max() > 1e-3
            np.testing.assert_allclose(jnp.kron(layer.a, layer.g), ggn, rtol=1e-9, atol=1e-12)
        expand = ewc_jax.kfac.kfac_fisher(_pooled, params, x, estimator="exact", sequence="expand")
        layer = _layer(expand, params, "l0")
        assert not np.allclose(
            jnp.kron(layer.a, layer.g), _ggn_block(_pooled, params, x, "l0"), rtol=1e-3
        )


def _tanh_params(key):
    k = jax.random.split(key, 3)
    return {
        "l0": {
            "w": jax.random.normal(k[0], (D, H1), jnp.float64) / 2,
            "b": jax.random.normal(k[1], (H1,), jnp.float64) / 2,
        },
        "l1": {"w": jax.random.normal(k[2], (H1, C), jnp.float64) / 2},
    }


def _tanh_tokens(params, x):
    """Dense, tanh, Dense over every position, a causal running mean between: positions interact."""
    h = jnp.tanh(x @ params["l0"]["w"] + params["l0"]["b"][None, None])
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, x.shape[1] + 1, dtype=h.dtype)[None, :, None]
    return h @ params["l1"]["w"]


def _reference(params, x, labels, mask, sequence):
    """Both layers' A and G from a hand-written forward pass with explicit perturbations."""
    w0, b0, w1 = params["l0"]["w"], params["l0"]["b"], params["l1"]["w"]

    def parts(xn, e0, e1):
        a0 = jnp.concatenate([xn, jnp.ones((T, 1), xn.dtype)], axis=1)
        h = jnp.tanh(a0[:, :D] @ w0 + b0[None] + e0)
        h = jnp.cumsum(h, axis=0) / jnp.arange(1, T + 1, dtype=h.dtype)[:, None]
        return a0, h, h @ w1 + e1

    def log_lik(e0, e1, xn, yn, mn):
        logp = jax.nn.log_softmax(parts(xn, e0, e1)[2])
        return jnp.sum(mn * jnp.take_along_axis(logp, yn[:, None], axis=1)[:, 0])

    zeros = (jnp.zeros((T, H1), jnp.float64), jnp.zeros((T, C), jnp.float64))
    sums = {"a0": 0.0, "a1": 0.0, "g0": 0.0, "g1": 0.0, "c": 0.0}
    for n in range(N):
        m = mask[n].astype(jnp.float64)
        a0, h, _ = parts(x[n], *zeros)
        g0, g1 = jax.grad(log_lik, (0, 1))(*zeros, x[n], labels[n], m)
        if sequence == "expand":
            sums["a0"] += jnp.einsum("t,ti,tj->ij", m, a0, a0)
            sums["a1"] += jnp.einsum("t,ti,tj->ij", m, h, h)
            sums["g0"] += jnp.einsum("t,ti,tj->ij", m, g0, g0)
            sums["g1"] += jnp.einsum("t,ti,tj->ij", m, g1, g1)
            sums["c"] += jnp.sum(m)
        else:
            mean0, mean1 = m @ a0 / jnp.sum(m), m @ h / jnp.sum(m)
            sums["a0"] += jnp.outer(mean0, mean0)
            sums["a1"] += jnp.outer(mean1, mean1)
            sums["g0"] += jnp.outer(m @ g0, m @ g0)
            sums["g1"] += jnp.outer(m @ g1, m @ g1)
            sums["c"] += 1.0
    return (
        (sums["a0"] / sums["c"], sums["g0"] / N),
        (sums["a1"] / sums["c"], sums["g1"] / N),
    )


@pytest.mark.parametrize("sequence", ["expand", "reduce"])
@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
def test_factors_match_hand_written_reference(sequence, estimator):
    with jax.enable_x64(True):
        params = _tanh_params(jax.random.key(4))
        x = jax.random.normal(jax.random.key(5), (N, T, D), jnp.float64)
        mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
        key = jax.random.key(6)
        if estimator == "sampled":
            keys = jax.random.split(key, N)
            labels = jax.vmap(jax.random.categorical)(keys, _tanh_tokens(params, x))
        else:
            labels = jax.random.randint(jax.random.key(7), (N, T), 0, C)
        fisher = ewc_jax.kfac.kfac_fisher(
            _tanh_tokens,
            params,
            x,
            labels if estimator == "empirical" else None,
            estimator=estimator,
            key=key,
            mask=mask,
            sequence=sequence,
            chunk_size=2,  # two chunks, the last one overlapping
        )
        expected = _reference(params, x, labels, mask, sequence)
        for name, (a, g) in zip(("l0", "l1"), expected, strict=True):
            layer = _layer(fisher, params, name)
            np.testing.assert_allclose(layer.a, a, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(layer.g, g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("shape", [(7, 3, 5), (7, 5)])
def test_gram_is_the_weighted_sum_of_outer_products(flat, shape):
    """Both forms of the factors' product (flattened rows; two contracted axes, kept for split
    factors) against the sum of ``w_r x_r x_rᵀ`` row by row in NumPy."""
    with jax.enable_x64(True):
        x = np.asarray(jax.random.normal(jax.random.key(0), shape, jnp.float64))
        w = np.asarray(jax.random.uniform(jax.random.key(1), shape[:-1], jnp.float64))
        rows, weights = x.reshape(-1, shape[-1]), w.reshape(-1)
        expected = sum(wr * np.outer(xr, xr) for wr, xr in zip(weights, rows, strict=True))
        got = gram(jnp.asarray(x), jnp.asarray(w), flat)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_masked_tokens_do_not_change_the_factors():
    with jax.enable_x64(True):
        params = _tanh_params(jax.random.key(8))
        x = jax.random.normal(jax.random.key(9), (N, T, D), jnp.float64)
        labels = jax.random.randint(jax.random.key(10), (N, T), 0, C)
        # Causal model: masking the tail of a sequence (padding) leaves the rest unchanged.
        mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
        noise = jax.random.normal(jax.random.key(11), x.shape, jnp.float64)
        x2 = jnp.where(mask[..., None], x, 100.0 * noise)
        labels2 = jnp.where(mask, labels, (labels + 1) % C)
        for sequence in ("expand", "reduce"):
            for estimator in ("exact", "empirical"):
                kwargs = dict(estimator=estimator, mask=mask, sequence=sequence)
                f1 = ewc_jax.kfac.kfac_fisher(_tanh_tokens, params, x, labels, **kwargs)
                f2 = ewc_jax.kfac.kfac_fisher(_tanh_tokens, params, x2, labels2, **kwargs)
                for l1, l2 in zip(f1.layers, f2.layers, strict=True):
                    np.testing.assert_allclose(l1.a, l2.a, rtol=1e-12, atol=1e-14)
                    np.testing.assert_allclose(l1.g, l2.g, rtol=1e-12, atol=1e-14)
                unmasked = ewc_jax.kfac.kfac_fisher(
                    _tanh_tokens, params, x2, labels2, **{**kwargs, "mask": None}
                )
                assert not np.allclose(unmasked.layers[0].a, f1.layers[0].a)


@pytest.mark.parametrize("sequence", ["expand", "reduce"])
def test_one_position_equals_dense_kfac(sequence):
    with jax.enable_x64(True):
        params = _tanh_params(jax.random.key(12))
        x = jax.random.normal(jax.random.key(13), (5, D), jnp.float64)

        def flat(p, xb):
            return jnp.tanh(xb @ p["l0"]["w"] + p["l0"]["b"][None]) @ p["l1"]["w"]

        dense = ewc_jax.kfac.kfac_fisher(flat, params, x, estimator="exact")
        tokens = ewc_jax.kfac.kfac_fisher(
            _tanh_tokens, params, x[:, None], estimator="exact", sequence=sequence
        )
        assert len(dense.layers) == len(tokens.layers) == 2
        for l1, l2 in zip(dense.layers, tokens.layers, strict=True):
            assert (l1.kernel, l1.bias, l1.kernel_axes) == (l2.kernel, l2.bias, l2.kernel_axes)
            np.testing.assert_allclose(l1.a, l2.a, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(l1.g, l2.g, rtol=1e-12, atol=1e-14)


def test_penalty_equals_explicit_kronecker_quadratic():
    with jax.enable_x64(True):
        params = _tanh_params(jax.random.key(14))
        x = jax.random.normal(jax.random.key(15), (N, T, D), jnp.float64)
        fisher = ewc_jax.kfac.kfac_fisher(
            _tanh_tokens, params, x, estimator="sampled", key=jax.random.key(16)
        )
        state = ewc_jax.consolidate(None, params, fisher)
        moved = jax.tree.map(
            lambda p, k: p + 0.3 * jax.random.normal(k, p.shape, p.dtype),
            params,
            jax.tree.unflatten(
                jax.tree.structure(params),
                list(jax.random.split(jax.random.key(17), len(jax.tree.leaves(params)))),
            ),
        )
        lam = 1.7
        expected = 0.0
        for name in ("l0", "l1"):
            layer = _layer(fisher, params, name)
            dw = moved[name]["w"] - params[name]["w"]
            if "b" in params[name]:
                dw = jnp.concatenate([dw, (moved[name]["b"] - params[name]["b"])[None]])
            v = dw.reshape(-1)
            expected += 0.5 * lam * v @ jnp.kron(layer.a, layer.g) @ v
        np.testing.assert_allclose(ewc_jax.penalty(moved, state, lam), expected, rtol=1e-12)


def test_tied_kernel_keeps_its_diagonal_fisher():
    """A kernel used twice gets no Kronecker block (the sum over its uses is not one): its
    diagonal Fisher, which is exact, stays; the other layer is still factored."""
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(18), 2)
        params = {
            "tied": jax.random.normal(k[0], (D, D), jnp.float64) / 3,
            "out": jax.random.normal(k[1], (D, C), jnp.float64) / 2,
        }

        def twice(p, xb):
            return jnp.tanh(jnp.tanh(xb @ p["tied"]) @ p["tied"]) @ p["out"]

        x = jax.random.normal(jax.random.key(19), (N, T, D), jnp.float64)
        fisher = ewc_jax.kfac.kfac_fisher(twice, params, x, estimator="exact")
        (layer,) = fisher.layers
        assert layer.kernel == 0  # "out" (leaves sorted: out, tied)
        diagonal = ewc_jax.fisher_diagonal(twice, params, x, estimator="exact")
        np.testing.assert_allclose(fisher.diagonal["tied"], diagonal["tied"], rtol=1e-12)
        assert float(jnp.max(fisher.diagonal["tied"])) > 0
        np.testing.assert_array_equal(fisher.diagonal["out"], 0.0)


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 3), name="q")(x)  # heads: [D, H, Dh], out = H·Dh
        k = nn.DenseGeneral((2, 3), name="k")(x)
        v = nn.DenseGeneral((2, 3), name="v")(x)
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), axis=-1)
        h = jnp.einsum("bhts,bshd->bthd", att, v)
        h = nn.DenseGeneral(D, axis=(-2, -1), name="o")(h)  # [H, Dh, D]: a block, in = H·Dh
        h = nn.Dense(H1, name="mlp")(nn.LayerNorm(name="ln")(h + x))
        return nn.DenseGeneral(C, name="head")(jax.nn.gelu(h))


def test_flax_attention_block_factors_its_dense_layers():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = _Attention()
        x = jax.random.normal(jax.random.key(20), (N, T, D), jnp.float64)
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), model.init(jax.random.key(21), x)["params"]
        )
        apply_fn = lambda p, xb: model.apply({"params": p}, xb)
        fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="exact", chunk_size=2)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        blocks = {paths[f.kernel]: paths[f.bias] for f in fisher.layers}
        assert blocks == {
            **{f"['{n}']['kernel']": f"['{n}']['bias']" for n in ("q", "k", "v")},
            "['o']['kernel']": "['o']['bias']",
            "['mlp']['kernel']": "['mlp']['bias']",
            "['head']['kernel']": "['head']['bias']",
        }
        diagonal = ewc_jax.fisher_diagonal(apply_fn, params, x, estimator="exact")
        for name in ("ln",):
            for leaf in fisher.diagonal[name]:
                np.testing.assert_allclose(
                    fisher.diagonal[name][leaf], diagonal[name][leaf], rtol=1e-10, atol=1e-20
                )


@pytest.mark.parametrize("sequence", ["expand", "reduce"])
def test_two_contracted_axes_equal_the_flattened_dense_layer(sequence):
    """A kernel ``[H, Dh, out]`` contracted over both input axes (attention's output
    projection, as Flax's ``DenseGeneral`` writes it) has the factors of the same layer
    written as ``[H·Dh, out]``."""
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(26), 3)
        params = {
            "o": jax.random.normal(k[0], (2, 3, D), jnp.float64) / 2,
            "b": jax.random.normal(k[1], (D,), jnp.float64) / 2,
            "out": jax.random.normal(k[2], (D, C), jnp.float64) / 2,
        }
        flat = {**params, "o": params["o"].reshape(6, D)}
        heads = jax.random.normal(jax.random.key(27), (N, T, 2, 3), jnp.float64)

        def two_axes(p, h):
            return (
                jnp.tanh(
                    jax.lax.dot_general(h, p["o"], (((2, 3), (0, 1)), ((), ())))
                    + p["b"][None, None]
                )
                @ p["out"]
            )

        def one_axis(p, h):
            return jnp.tanh(h.reshape(*h.shape[:2], -1) @ p["o"] + p["b"][None, None]) @ p["out"]

        kw = dict(estimator="exact", sequence=sequence)
        got = ewc_jax.kfac.kfac_fisher(two_axes, params, heads, **kw)
        want = ewc_jax.kfac.kfac_fisher(one_axis, flat, heads, **kw)
        assert len(got.layers) == len(want.layers) == 2
        for g, w in zip(got.layers, want.layers, strict=True):
            assert (g.kernel, g.bias) == (w.kernel, w.bias)
            np.testing.assert_allclose(g.a, w.a, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(g.g, w.g, rtol=1e-12, atol=1e-14)
        # Leaves in tree order: b, o, out.
        assert {(f.kernel, f.bias, f.kernel_axes) for f in got.layers} == {
            (1, 0, (0, 1, 2)),
            (2, None, (0, 1)),
        }
        moved = jax.tree.map(lambda a: a + 0.1, params)
        moved_flat = {**moved, "o": moved["o"].reshape(6, D)}
        np.testing.assert_allclose(
            ewc_jax.penalty(moved, ewc_jax.consolidate(None, params, got), 3.0),
            ewc_jax.penalty(moved_flat, ewc_jax.consolidate(None, flat, want), 3.0),
            rtol=1e-12,
        )
        grads = jax.grad(ewc_jax.penalty)(moved, ewc_jax.consolidate(None, params, got), 3.0)
        grads_flat = jax.grad(ewc_jax.penalty)(
            moved_flat, ewc_jax.consolidate(None, flat, want), 3.0
        )
        np.testing.assert_allclose(grads["o"].reshape(6, D), grads_flat["o"], rtol=1e-12)


def test_refusals():
    with jax.enable_x64(True):
        params = _tanh_params(jax.random.key(22))
        x = jax.random.normal(jax.random.key(23), (N, T, D), jnp.float64)
        assert typing.get_args(ewc_jax.kfac.SequenceMode) == ewc_jax.kfac.SEQUENCE_MODES
        assert ewc_jax.kfac.SEQUENCE_MODES == ("expand", "reduce")
        with pytest.raises(ValueError, match="Unknown sequence 'mean'"):
            ewc_jax.kfac.kfac_fisher(_tanh_tokens, params, x, sequence="mean")

        def pooled_tokens(p, xb):  # the first Dense runs over T, the logits over T - 1
            return _tanh_tokens(p, xb)[:, 1:]

        mask = jnp.ones((N, T - 1), bool)
        with pytest.raises(ValueError, match="applied over positions of shape"):
            ewc_jax.kfac.kfac_fisher(pooled_tokens, params, x, mask=mask)


MESH_CODE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import ewc_jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((2, 4), ("data", "model"))


def model(p, x):
    h = jnp.tanh(x @ p["l0"]["w"] + p["l0"]["b"][None, None])
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, x.shape[1] + 1, dtype=h.dtype)[None, :, None]
    return h @ p["l1"]["w"]


k = jax.random.split(jax.random.key(0), 5)
params = {
    "l0": {"w": jax.random.normal(k[0], (8, 16)) / 3, "b": jax.random.normal(k[1], (16,))},
    "l1": {"w": jax.random.normal(k[2], (16, 4)) / 3},
}
x = jax.random.normal(k[3], (8, 6, 8))
mask = jnp.arange(6)[None, :] < jax.random.randint(k[4], (8, 1), 1, 7)
spec = {"l0": {"w": P(None, "model"), "b": P("model")}, "l1": {"w": P("model", None)}}
sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, spec)
x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
mask_sharded = jax.device_put(mask, NamedSharding(mesh, P("data")))
assert not sharded["l0"]["w"].sharding.is_fully_replicated
for sequence in ("expand", "reduce"):
    kw = dict(estimator="sampled", key=jax.random.key(1), sequence=sequence, chunk_size=4)
    one = ewc_jax.kfac.kfac_fisher(model, params, x, mask=mask, **kw)
    many = ewc_jax.kfac.kfac_fisher(model, sharded, x_sharded, mask=mask_sharded, **kw)
    assert len(one.layers) == len(many.layers) == 2
    for a, b in zip(one.layers, many.layers, strict=True):
        np.testing.assert_allclose(np.asarray(b.a), np.asarray(a.a), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(np.asarray(b.g), np.asarray(a.g), rtol=1e-10, atol=1e-13)
    assert many.layers[0].a.sharding.mesh.axis_names == ("data", "model")
    state = ewc_jax.consolidate(None, sharded, many)
    moved = jax.tree.map(lambda a: a + 0.1, sharded)
    reference = ewc_jax.consolidate(None, params, one)
    want = ewc_jax.penalty(jax.tree.map(lambda a: a + 0.1, params), reference, 2.0)
    np.testing.assert_allclose(float(ewc_jax.penalty(moved, state, 2.0)), float(want), rtol=1e-10)
print("ok")
"""


@pytest.mark.slow
def test_factors_on_a_2x4_mesh_equal_one_device():
    """Params sharded over "model", examples over "data" of 8 simulated CPU devices (XLA fixes
    the device count at start-up: a subprocess): the same factors and penalty as one device."""
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", MESH_CODE], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "ok" in result.stdout


class _TokenModel(nn.Module):
    """Embeddings, a LayerNorm and a kernel used twice (diagonal) around two Dense layers over
    the tokens (factored)."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(11, D, name="embed")(tokens)
        mix = self.param("mix", nn.initializers.normal(0.5), (D, D))
        h = nn.LayerNorm(name="ln")(h + jnp.tanh(h) @ mix @ mix)
        h = jnp.tanh(nn.Dense(H1, name="mlp")(h))
        return nn.Dense(C, name="head")(h)


def test_diagonal_part_equals_fisher_diagonal_of_unfactored_leaves():
    """The diagonal K-FAC keeps for unfactored leaves (computed for those leaves only, in the
    factors' own pass) is fisher_diagonal's over all parameters, same labels and mask, to
    float32 rounding (the sums run in another order); factored leaves are zero."""
    model = _TokenModel()
    tokens = jax.random.randint(jax.random.key(30), (N + 2, T), 0, 11)
    params = model.init(jax.random.key(31), tokens)["params"]
    apply_fn = lambda p, xb: model.apply({"params": p}, xb)
    mask = jnp.array([[1, 1, 1, 0]] * (N + 2))
    key = jax.random.key(32)
    kwargs = dict(estimator="sampled", key=key, mask=mask)
    fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, tokens, **kwargs)
    diagonal = ewc_jax.fisher_diagonal(apply_fn, params, tokens, **kwargs)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    factored = {paths[i] for f in fisher.layers for i in (f.kernel, f.bias)}
    assert factored == {f"['{n}']['{w}']" for n in ("mlp", "head") for w in ("kernel", "bias")}
    got = jax.tree_util.tree_leaves_with_path(fisher.diagonal)
    for (path, leaf), expected in zip(got, jax.tree.leaves(diagonal), strict=True):
        assert leaf.dtype == expected.dtype == jnp.float32
        assert leaf.shape == expected.shape
        if jax.tree_util.keystr(path) in factored:
            np.testing.assert_array_equal(leaf, 0.0)
        else:
            assert float(jnp.max(leaf)) > 0
            scale = float(jnp.max(expected))
            np.testing.assert_allclose(leaf, expected, rtol=1e-5, atol=1e-6 * scale)
