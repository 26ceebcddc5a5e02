"""Penalising a subset of the parameters (``where=``) and storing the state in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import LinenMLP

import ewc_jax

MODEL = LinenMLP(features=(16, 16), num_classes=5)
# Everything but the first layer, as a prefix of params (one bool per layer).
WHERE = {"params": {"Dense_0": False, "Dense_1": True, "Dense_2": True}}


@pytest.fixture(scope="module")
def problem():
    params = MODEL.init(jax.random.key(0), jnp.ones((1, 7)))
    x = jax.random.normal(jax.random.key(1), (23, 7))
    y = jax.random.randint(jax.random.key(2), (23,), 0, 5)
    return params, x, y


def selected(tree):
    return {k: v for k, v in tree["params"].items() if k != "Dense_0"}


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="one_pass", estimator="exact"),
        dict(method="general", estimator="sampled", key=jax.random.key(3)),
        dict(method="auto", estimator="empirical"),
        dict(estimator="batched", batch_size=4),
    ],
)
def test_where_fisher_equals_the_full_fisher_on_selected_leaves(problem, kw):
    params, x, y = problem
    full = ewc_jax.fisher_diagonal(MODEL.apply, params, x, y, chunk_size=5, **kw)
    for where in (WHERE, lambda p: jax.tree.map(lambda _: True, p) | {"params": WHERE["params"]}):
        masked = ewc_jax.fisher_diagonal(MODEL.apply, params, x, y, chunk_size=5, where=where, **kw)
        assert isinstance(masked["params"]["Dense_0"], optax.MaskedNode)
        for a, b in zip(
            jax.tree.leaves(selected(masked)), jax.tree.leaves(selected(full)), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_where_computes_only_the_selected_leaves(problem):
    """Compiled FLOPs (XLA's cost analysis, not wall time): the head alone costs far less."""
    params, _, _ = problem
    model = LinenMLP(features=(64, 64), num_classes=10)
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))
    x = jax.random.normal(jax.random.key(1), (256, 32))
    head = {"params": {"Dense_0": False, "Dense_1": False, "Dense_2": True}}
    for method in ("one_pass", "general"):

        def flops(where, method=method):
            fisher = lambda p: ewc_jax.fisher_diagonal(
                model.apply, p, x, method=method, where=where
            )
            return jax.jit(fisher).lower(params).compile().cost_analysis()["flops"]

        # Measured: 0.40 (one pass) and 0.41 (general) of the full Fisher's FLOPs.
        assert flops(head) < 0.5 * flops(None), method


def test_penalty_and_transform_cover_only_selected_leaves(problem):
    params, x, _ = problem
    fisher = ewc_jax.fisher_diagonal(MODEL.apply, params, x, where=WHERE)
    state = ewc_jax.consolidate(None, params, fisher, where=WHERE)
    assert isinstance(state.anchor["params"]["Dense_0"], optax.MaskedNode)
    # A full Fisher is restricted the same way.
    full = ewc_jax.fisher_diagonal(MODEL.apply, params, x)
    again = ewc_jax.consolidate(None, params, full, where=WHERE)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    moved = jax.tree.map(lambda p: p + 0.1, params)
    strength = 7.0
    grads = jax.grad(ewc_jax.penalty)(moved, state, strength, where=WHERE)
    for leaf in jax.tree.leaves(grads["params"]["Dense_0"]):
        assert not np.any(leaf)
    # Known answer on the selected leaves: λ F (θ - θ*) = λ F · 0.1; penalty λ/2 Σ F · 0.01.
    for g, f in zip(
        jax.tree.leaves(selected(grads)), jax.tree.leaves(selected(fisher)), strict=True
    ):
        np.testing.assert_allclose(g, strength * f * 0.1, rtol=1e-5)
    expected = 0.5 * strength * 0.01 * sum(float(jnp.sum(f)) for f in jax.tree.leaves(fisher))
    np.testing.assert_allclose(ewc_jax.penalty(moved, state, strength, where=WHERE), expected, 1e-5)

    tx = ewc_jax.add_ewc_penalty(strength, where=WHERE)
    opt_state = ewc_jax.set_ewc_state(tx.init(params), state)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(ones, opt_state, moved)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(u, 1.0 + g, rtol=1e-6)


def test_bfloat16_storage_halves_memory_and_keeps_the_penalty_in_float32(problem):
    params, x, _ = problem
    fisher = ewc_jax.fisher_diagonal(MODEL.apply, params, x)
    wide = ewc_jax.consolidate(None, params, fisher)
    narrow = ewc_jax.consolidate(
        None, params, fisher, anchor_dtype=jnp.bfloat16, precision_dtype=jnp.bfloat16
    )
    nbytes = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))
    assert nbytes(narrow.anchor) * 2 == nbytes(wide.anchor) == nbytes(params)
    assert nbytes(narrow.precision) * 2 == nbytes(wide.precision)
    # A later task keeps the storage dtype of the state passed in.
    later = ewc_jax.consolidate(narrow, params, fisher)
    assert {a.dtype for a in jax.tree.leaves((later.anchor, later.precision))} == {
        np.dtype(jnp.bfloat16)
    }
    moved = jax.tree.map(
        lambda p, k: p + 0.05 * jax.random.normal(k, p.shape),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params),
            list(jax.random.split(jax.random.key(4), len(jax.tree.leaves(params)))),
        ),
    )
    value = ewc_jax.penalty(moved, narrow, 2.0)
    assert value.dtype == jnp.float32
    # Computed in float32 from the stored bfloat16 values: equals a float64 reference of the
    # same stored values to float32 rounding (a bfloat16 computation would be off by ~1e-3).
    reference = (
        0.5
        * 2.0
        * sum(
            np.sum(
                np.asarray(f, np.float64)
                * (np.asarray(p, np.float64) - np.asarray(a, np.float64)) ** 2
            )
            for p, a, f in zip(
                jax.tree.leaves(moved),
                jax.tree.leaves(narrow.anchor),
                jax.tree.leaves(narrow.precision),
                strict=True,
            )
        )
    )
    np.testing.assert_allclose(float(value), reference, rtol=1e-5)
    # Against float32 storage: bfloat16 rounding of anchor (~0.4% of |θ|) and precision (0.4%)
    # for a displacement of 0.05: measured 0.3% here.
    np.testing.assert_allclose(float(value), float(ewc_jax.penalty(moved, wide, 2.0)), rtol=1e-2)
    with pytest.raises(ValueError, match="floating-point"):
        ewc_jax.consolidate(None, params, fisher, anchor_dtype=jnp.int32)
