"""consolidate, penalty and add_ewc_penalty against hand-computed answers."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ewc_jax


def _tree(values):
    return {"dense": {"kernel": jnp.asarray(values[0]), "bias": jnp.asarray(values[1])}}


def _random_tree(seed, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "dense": {
            "kernel": scale * jax.random.normal(k1, (3, 2)),
            "bias": scale * jax.random.normal(k2, (2,)),
        }
    }


def _positive_tree(seed):
    return jax.tree.map(jnp.abs, _random_tree(seed))


finite = st.floats(-100, 100, allow_nan=False, width=32)
nonneg = st.floats(0, 100, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    theta=hnp.arrays(np.float32, 5, elements=finite),
    anchor=hnp.arrays(np.float32, 5, elements=finite),
    precision=hnp.arrays(np.float32, 5, elements=nonneg),
    strength=nonneg,
)
def test_penalty_properties(theta, anchor, precision, strength):
    state = ewc_jax.EWCState(
        {"w": jnp.asarray(anchor)}, {"w": jnp.asarray(precision)}, jnp.int32(1)
    )
    params = {"w": jnp.asarray(theta)}
    value = ewc_jax.penalty(params, state, strength)
    want = 0.5 * strength * np.sum(precision.astype(np.float64) * (theta - anchor) ** 2)
    np.testing.assert_allclose(float(value), want, rtol=1e-4, atol=1e-3)
    assert float(value) >= 0
    assert float(ewc_jax.penalty({"w": jnp.asarray(anchor)}, state, strength)) == 0.0
    grad = jax.grad(ewc_jax.penalty)(params, state, strength)["w"]
    np.testing.assert_allclose(
        grad, strength * precision * (theta - anchor), rtol=1e-4, atol=1e-3 * (1 + strength)
    )


def test_penalty_known_value_and_half_convention():
    params = _tree(([[1.0, 2.0]], [3.0]))
    state = ewc_jax.EWCState(_tree(([[0.0, 0.0]], [1.0])), _tree(([[1.0, 2.0]], [4.0])), 1)
    # 1·1² + 2·2² + 4·2² = 25; ½·λ·25 with λ = 2.
    assert float(ewc_jax.penalty(params, state, 2.0)) == pytest.approx(25.0)
    # The tutorial's importance·Σ F (θ − θ*)² with importance=1000 is strength=2000 here.
    tutorial = 1000.0 * 25.0
    assert float(ewc_jax.penalty(params, state, 2000.0)) == pytest.approx(tutorial)


def test_first_consolidation_anchors_at_params():
    params, fisher = _random_tree(0), _positive_tree(1)
    state = ewc_jax.consolidate(None, params, fisher)
    assert int(state.num_tasks) == 1
    jax.tree.map(np.testing.assert_array_equal, state.anchor, params)
    jax.tree.map(np.testing.assert_array_equal, state.precision, fisher)
    assert float(ewc_jax.penalty(params, state, 5.0)) == 0.0


def test_separate_mode_equals_explicit_sum_of_task_penalties():
    tasks = [(_random_tree(10 + k), _positive_tree(20 + k)) for k in range(3)]
    # Some entries with zero Fisher in every task: the anchor falls back to the latest params.
    tasks[0][1]["dense"]["bias"] = jnp.zeros(2)
    tasks[1][1]["dense"]["bias"] = jnp.zeros(2)
    tasks[2][1]["dense"]["bias"] = jnp.zeros(2).at[1].set(0.7)
    state = None
    for params, fisher in tasks:
        state = ewc_jax.consolidate(state, params, fisher, mode="separate")
    assert int(state.num_tasks) == 3

    def explicit(theta):
        return sum(
            0.5
            * 3.0
            * sum(
                jnp.sum(f * (t - a) ** 2)
                for t, a, f in zip(
                    jax.tree.leaves(theta), jax.tree.leaves(anc), jax.tree.leaves(fi), strict=True
                )
            )
            for anc, fi in tasks
        )

    for seed in range(3):
        theta = _random_tree(100 + seed, scale=2.0)
        got = jax.grad(ewc_jax.penalty)(theta, state, 3.0)
        want = jax.grad(explicit)(theta)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
    np.testing.assert_array_equal(state.anchor["dense"]["bias"][0], tasks[2][0]["dense"]["bias"][0])


def test_online_mode_recurrence_by_hand():
    p1, p2, p3 = (_tree(([[v, -v]], [2 * v])) for v in (1.0, 2.0, 3.0))
    f1, f2, f3 = (_tree(([[v, 2 * v]], [v])) for v in (1.0, 0.5, 0.25))
    s = ewc_jax.consolidate(None, p1, f1, mode="online", gamma=0.9)
    s = ewc_jax.consolidate(s, p2, f2, mode="online", gamma=0.9)
    s = ewc_jax.consolidate(s, p3, f3, mode="online", gamma=0.9)
    # Λ = 0.9·(0.9·F1 + F2) + F3, anchor = last params.
    np.testing.assert_allclose(
        s.precision["dense"]["kernel"], [[0.81 + 0.45 + 0.25, 1.62 + 0.9 + 0.5]]
    )
    np.testing.assert_allclose(s.precision["dense"]["bias"], [0.81 + 0.45 + 0.25])
    jax.tree.map(np.testing.assert_array_equal, s.anchor, p3)
    assert int(s.num_tasks) == 3
    # gamma = 0 forgets everything but the last task; the penalty never silently becomes zero.
    s0 = ewc_jax.consolidate(
        ewc_jax.consolidate(None, p1, f1, mode="online", gamma=0.0),
        p2,
        f2,
        mode="online",
        gamma=0.0,
    )
    jax.tree.map(np.testing.assert_array_equal, s0.precision, f2)
    assert float(ewc_jax.penalty(p1, s, 1.0)) > 0


def _task_loss(params, batch):
    x, y = batch
    logits = x @ params["dense"]["kernel"] + params["dense"]["bias"][None]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@pytest.mark.parametrize(
    "make_opt", [lambda: optax.sgd(0.1), lambda: optax.adam(0.05)], ids=["sgd", "adam"]
)
def test_optax_transform_equals_loss_term(make_opt):
    params0 = _random_tree(0)
    state = ewc_jax.consolidate(None, _random_tree(1), _positive_tree(2))
    strength = 4.0
    x = jax.random.normal(jax.random.key(3), (16, 3))
    y = jax.random.randint(jax.random.key(4), (16,), 0, 2)

    # (a) Penalty as a loss term, gradient fed to the plain optimiser.
    opt = make_opt()
    params_a, opt_a = params0, opt.init(params0)
    # (b) The transform chained before the same optimiser.
    tx = optax.chain(ewc_jax.add_ewc_penalty(strength), make_opt())
    params_b = params0
    opt_b = ewc_jax.set_ewc_state(tx.init(params0), state)

    loss = lambda p: _task_loss(p, (x, y)) + ewc_jax.penalty(p, state, strength)
    # optax.adam's bias correction mixes a Python float with an int32 count.
    with jax.numpy_dtype_promotion("standard"):
        _run_both(loss, opt, opt_a, params_a, tx, opt_b, params_b, x, y)


def _run_both(loss, opt, opt_a, params_a, tx, opt_b, params_b, x, y):
    for _ in range(5):
        g = jax.grad(loss)(params_a)
        updates, opt_a = opt.update(g, opt_a, params_a)
        params_a = optax.apply_updates(params_a, updates)

        g = jax.grad(_task_loss)(params_b, (x, y))
        updates, opt_b = tx.update(g, opt_b, params_b)
        params_b = optax.apply_updates(params_b, updates)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_a, params_b
        )


def test_jitted_step_does_not_recompile_when_state_changes():
    traces = []
    tx = optax.chain(ewc_jax.add_ewc_penalty(1.0), optax.sgd(0.1))

    @jax.jit
    def step(params, opt_state, ewc_state, batch):
        traces.append(1)  # runs only while tracing
        loss = lambda p: _task_loss(p, batch) + ewc_jax.penalty(p, ewc_state, 2.0)
        g = jax.grad(loss)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = _random_tree(0)
    ewc = ewc_jax.empty_state(params)
    opt_state = tx.init(params)
    batch = (jax.random.normal(jax.random.key(1), (4, 3)), jnp.array([0, 1, 1, 0]))
    for task in range(4):
        for _ in range(2):
            params, opt_state = step(params, opt_state, ewc, batch)
        ewc = ewc_jax.consolidate(ewc, params, _positive_tree(task), mode="separate")
        opt_state = ewc_jax.set_ewc_state(opt_state, ewc)
    assert len(traces) == 1
    assert step._cache_size() == 1


# --- bad input ------------------------------------------------------------------------------


def test_mismatched_trees_name_the_first_differing_path():
    params = _random_tree(0)
    bad = {"dense": {"kernel": params["dense"]["kernel"], "scale": params["dense"]["bias"]}}
    with pytest.raises(ValueError, match=r"fisher does not have the tree structure.*\['bias'\]"):
        ewc_jax.consolidate(None, params, bad)
    wrong_shape = jax.tree.map(lambda a: a, params)
    wrong_shape["dense"]["bias"] = jnp.zeros(3)
    with pytest.raises(
        ValueError, match=r"differ in shape at \['dense'\]\['bias'\]: \(3,\) vs \(2,\)"
    ):
        ewc_jax.consolidate(None, params, wrong_shape)
    state = ewc_jax.consolidate(None, params, _positive_tree(1))
    with pytest.raises(ValueError, match=r"state.anchor.*\['dense'\]"):
        ewc_jax.consolidate(state, {"other": params["dense"]}, {"other": params["dense"]})
    with pytest.raises(ValueError, match=r"params does not have the tree structure"):
        ewc_jax.penalty({"other": params["dense"]}, state, 1.0)
    with pytest.raises(ValueError, match=r"params does not have the tree structure"):
        jax.jit(ewc_jax.penalty)({"other": params["dense"]}, state, 1.0)


def test_bad_strength_gamma_mode():
    params, fisher = _random_tree(0), _positive_tree(1)
    state = ewc_jax.consolidate(None, params, fisher)
    with pytest.raises(ValueError, match=r"strength must be a finite scalar >= 0, got -1.0"):
        ewc_jax.penalty(params, state, -1.0)
    with pytest.raises(ValueError, match=r"strength must be a finite scalar >= 0"):
        ewc_jax.add_ewc_penalty(-3.0)
    for gamma in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"gamma must be a scalar in \[0, 1\]"):
            ewc_jax.consolidate(None, params, fisher, mode="online", gamma=gamma)
    with pytest.raises(ValueError, match=r"gamma must be 1 in mode='separate'.*got 0.5"):
        ewc_jax.consolidate(None, params, fisher, mode="separate", gamma=0.5)
    with pytest.raises(ValueError, match=r"Unknown consolidation mode 'sum'.*'separate', 'online'"):
        ewc_jax.consolidate(None, params, fisher, mode="sum")


def test_non_finite_values_are_refused_with_their_path():
    params, fisher = _random_tree(0), _positive_tree(1)
    nan_fisher = jax.tree.map(lambda a: a, fisher)
    nan_fisher["dense"]["kernel"] = fisher["dense"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"fisher\['dense'\]\['kernel'\] has non-finite.*\(1 of"):
        ewc_jax.consolidate(None, params, nan_fisher)
    inf_params = jax.tree.map(lambda a: a, params)
    inf_params["dense"]["bias"] = params["dense"]["bias"].at[1].set(jnp.inf)
    with pytest.raises(ValueError, match=r"params\['dense'\]\['bias'\] has non-finite.*\(1 of"):
        ewc_jax.consolidate(None, inf_params, fisher)
    neg = jax.tree.map(lambda a: -a, fisher)
    with pytest.raises(ValueError, match=r"fisher has negative values"):
        ewc_jax.consolidate(None, params, neg)


def test_transform_errors():
    params = _random_tree(0)
    tx = ewc_jax.add_ewc_penalty(1.0)
    state = tx.init(params)
    with pytest.raises(
        ValueError, match=r"needs the current params.*tx.update\(updates, state, params\)"
    ):
        tx.update(params, state)
    with pytest.raises(ValueError, match="contains no add_ewc_penalty state"):
        ewc_jax.set_ewc_state(optax.sgd(0.1).init(params), ewc_jax.empty_state(params))
    with pytest.raises(ValueError, match=r"anchor does not have the tree structure"):
        ewc_jax.set_ewc_state(state, ewc_jax.empty_state({"x": jnp.zeros(2)}))
