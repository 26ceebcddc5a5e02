"""Value checks that hold under jit and vmap, model state as an argument, batch statistics refused.

Every check is exercised eagerly (a ValueError) and under ``jax.jit`` (the compiled program fails
with the same message); one under ``jax.vmap``. Fishers with a ``model_state`` are compared with
a dense Fisher built independently from ``jax.jacrev`` Jacobians.
"""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import init_plain_mlp, plain_mlp
from flax import nnx
from jax.flatten_util import ravel_pytree

import ewc_jax
from ewc_jax import _fisher

README = Path(__file__).parent.parent / "README.md"


def _raises_both_ways(fn, args, message, traced_argnums):
    """``fn(*args)`` raises ValueError eagerly and fails under jit; both messages hold
    ``message``, the eager one starting with it."""
    with pytest.raises(ValueError) as eager:
        fn(*args)
    assert str(eager.value).startswith(message), str(eager.value)

    def with_traced(*traced):
        full = list(args)
        for i, value in zip(traced_argnums, traced, strict=True):
            full[i] = value
        return fn(*full)

    with pytest.raises(Exception) as jitted:
        jax.block_until_ready(jax.jit(with_traced)(*(args[i] for i in traced_argnums)))
    assert message in str(jitted.value)


def _dense_exact_fisher(logits_of, params, x):
    """``diag(1/N Σ_n Jₙᵀ (diag p - p pᵀ) Jₙ)`` from full ``jax.jacrev`` Jacobians."""
    flat, unravel = ravel_pytree(params)

    def one(xn):
        logits = lambda theta: logits_of(unravel(theta), xn[None])[0]
        jac = jax.jacrev(logits)(flat)
        p = jax.nn.softmax(logits(flat))
        return jnp.diag(jac.T @ (jnp.diag(p) - jnp.outer(p, p)) @ jac)

    return unravel(jnp.mean(jax.vmap(one)(x), axis=0))


def _assert_trees_close(got, want, rtol=2e-4):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-7)


def _tree(seed):
    return init_plain_mlp(jax.random.key(seed), (3, 4, 2))


# -- strength, gamma, finite Fisher and params ------------------------------------------------


def test_strength_is_checked_eagerly_and_under_jit():
    params = _tree(0)
    state = ewc_jax.consolidate(None, params, jax.tree.map(jnp.square, _tree(1)))
    message = "strength must be a finite scalar >= 0"
    for bad in (-1.0, float("nan"), float("inf")):
        _raises_both_ways(ewc_jax.penalty, (params, state, bad), message, traced_argnums=(0, 1, 2))
    # A good strength gives the same value both ways.
    want = ewc_jax.penalty(_tree(2), state, 3.0)
    got = jax.jit(ewc_jax.penalty)(_tree(2), state, jnp.asarray(3.0))
    np.testing.assert_allclose(got, want, rtol=1e-6)

    def ewc_update(strength, grads, params):
        tx = ewc_jax.add_ewc_penalty(strength)
        return tx.update(grads, tx.init(params), params)[0]

    _raises_both_ways(ewc_update, (-2.0, params, params), message, traced_argnums=(0, 1, 2))


def test_strength_is_checked_under_vmap():
    params = _tree(0)
    state = ewc_jax.consolidate(None, params, jax.tree.map(jnp.square, _tree(1)))
    sweep = jax.jit(jax.vmap(ewc_jax.penalty, in_axes=(None, None, 0)))
    good = sweep(_tree(2), state, jnp.array([0.0, 1.0, 2.0]))
    np.testing.assert_allclose(good, good[1] * jnp.array([0.0, 1.0, 2.0]), rtol=1e-6)
    with pytest.raises(Exception, match=r"strength must be a finite scalar >= 0\."):
        jax.block_until_ready(sweep(_tree(2), state, jnp.array([1.0, -1.0, 2.0])))


@pytest.mark.parametrize("gamma", [-1.0, 1.5, float("nan")])
def test_online_gamma_is_checked_eagerly_and_under_jit(gamma):
    params, fisher = _tree(0), jax.tree.map(jnp.square, _tree(1))

    def online(params, fisher, gamma):
        return ewc_jax.consolidate(None, params, fisher, mode="online", gamma=gamma)

    _raises_both_ways(
        online, (params, fisher, gamma), "gamma must be a scalar in [0, 1]", traced_argnums=(2,)
    )
    want = online(params, fisher, 0.5)
    got = jax.jit(online)(params, fisher, jnp.asarray(0.5))
    _assert_trees_close(got.precision, want.precision)


def test_separate_mode_gamma_is_checked_under_jit():
    params, fisher = _tree(0), jax.tree.map(jnp.square, _tree(1))

    def separate(params, fisher, gamma):
        return ewc_jax.consolidate(None, params, fisher, mode="separate", gamma=gamma)

    _raises_both_ways(
        separate, (params, fisher, 0.5), "gamma must be 1 in mode='separate'", traced_argnums=(2,)
    )


def test_non_finite_or_negative_fisher_and_params_fail_under_jit_with_their_path():
    params, fisher = _tree(0), jax.tree.map(jnp.square, _tree(1))
    nan_fisher = jax.tree.map(lambda a: a, fisher)
    nan_fisher["layer1"]["w"] = fisher["layer1"]["w"].at[0, 0].set(jnp.nan)
    inf_params = jax.tree.map(lambda a: a, params)
    inf_params["layer0"]["b"] = params["layer0"]["b"].at[1].set(-jnp.inf)
    negative = jax.tree.map(lambda a: a, fisher)
    negative["layer0"]["w"] = -fisher["layer0"]["w"]
    consolidate = lambda p, f: ewc_jax.consolidate(None, p, f)
    for args, message in (
        ((params, nan_fisher), "fisher['layer1']['w'] has non-finite values (NaN or Inf)"),
        ((inf_params, fisher), "params['layer0']['b'] has non-finite values (NaN or Inf)"),
        ((params, negative), "fisher has negative values at ['layer0']['w']"),
    ):
        # The traced message is the full sentence; the eager one adds how many values.
        with pytest.raises(ValueError, match=re.escape(message)):
            consolidate(*args)
        with pytest.raises(Exception, match=re.escape(message)):
            jax.block_until_ready(jax.jit(consolidate)(*args))


def test_checks_can_be_switched_off_for_traced_values():
    params = _tree(0)
    state = ewc_jax.consolidate(None, params, jax.tree.map(jnp.square, _tree(1)))
    with ewc_jax.checks_enabled(False):
        # Traced: no check compiled in, the (meaningless) value comes back.
        value = jax.jit(lambda *args: ewc_jax.penalty(*args))(_tree(2), state, jnp.asarray(-1.0))
        # Concrete values are still checked: that costs nothing in compiled code.
        with pytest.raises(ValueError, match="strength must be a finite scalar >= 0"):
            ewc_jax.penalty(params, state, -1.0)
    np.testing.assert_allclose(value, -ewc_jax.penalty(_tree(2), state, 1.0), rtol=1e-6)
    # The switch acts at trace time: a function traced afresh outside the block has the check.
    checked = jax.jit(lambda *args: ewc_jax.penalty(*args))
    with pytest.raises(Exception, match=r"strength must be a finite scalar >= 0\."):
        jax.block_until_ready(checked(_tree(2), state, jnp.asarray(-1.0)))


# -- fisher_diagonal: labels, inputs, logits -----------------------------------------------------


def _problem(n=6):
    params = _tree(0)
    x = jax.random.normal(jax.random.key(1), (n, 3))
    y = jax.random.randint(jax.random.key(2), (n,), 0, 2)
    return params, x, y


@pytest.mark.parametrize("estimator", ["empirical", "batched"])
def test_labels_out_of_range_fail_eagerly_and_under_jit(estimator):
    params, x, y = _problem()

    def fisher(params, x, y):
        return ewc_jax.fisher_diagonal(plain_mlp, params, x, y, estimator=estimator, batch_size=2)

    bad = y.at[3].set(2) if estimator == "empirical" else y.at[0].set(-1)
    _raises_both_ways(
        fisher,
        (params, x, bad),
        "labels must lie in [0, 2) for the model's 2 logits",
        traced_argnums=(0, 1, 2),
    )
    np.testing.assert_allclose(
        jax.jit(fisher)(params, x, y)["layer0"]["w"], fisher(params, x, y)["layer0"]["w"], 1e-5
    )


@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_non_finite_inputs_fail_naming_the_first_bad_leaf(method):
    params, x, _ = _problem()
    model = lambda p, inputs: plain_mlp(p, inputs["image"] + inputs["offset"])
    inputs = {"image": x.at[2, 1].set(jnp.nan), "offset": x.at[0, 0].set(jnp.inf)}

    def fisher(params, inputs):
        return ewc_jax.fisher_diagonal(model, params, inputs, method=method)

    _raises_both_ways(
        fisher,
        (params, inputs),
        "inputs['image'] has non-finite values (NaN or Inf); the Fisher would be NaN",
        traced_argnums=(0, 1),
    )


@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_non_finite_logits_fail_eagerly_and_under_jit(method):
    params, x, y = _problem()
    # log of a negative number: NaN logits from finite params and inputs.
    model = lambda p, x: jnp.log(plain_mlp(p, x) - 100.0)
    message = "logits has non-finite values (NaN or Inf)"
    for estimator in ("exact", "batched"):

        def fisher(params, x, y, estimator=estimator):
            return ewc_jax.fisher_diagonal(
                model, params, x, y, estimator=estimator, method=method, batch_size=3
            )

        _raises_both_ways(fisher, (params, x, y), message, traced_argnums=(0, 1, 2))
        with ewc_jax.checks_enabled(False):
            unchecked = fisher(params, x, y)
        assert not np.all(np.isfinite(unchecked["layer0"]["w"]))


# -- model_state ---------------------------------------------------------------------------------


def _shifted(params, state, x):
    return (x - state["shift"][None]) @ params["w"]


@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_model_state_is_an_argument_not_a_frozen_closure(method):
    # The example: a shift kept in state. A closure would give F1 again.
    p = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
    x = jax.random.normal(jax.random.key(1), (8, 4))
    fisher = lambda s: ewc_jax.fisher_diagonal(_shifted, p, x, model_state=s, method=method)
    s1, s2 = {"shift": jnp.zeros(4)}, {"shift": 3 * jnp.ones(4)}
    f1, f2 = fisher(s1), fisher(s2)
    for state, got in ((s1, f1), (s2, f2)):
        want = _dense_exact_fisher(lambda q, xb, state=state: _shifted(q, state, xb), p, x)
        _assert_trees_close(got, want)
    assert not np.allclose(f2["w"], f1["w"], rtol=0.5)
    # A new state changes values only: no recompilation.
    before = _fisher._chunked_fisher._cache_size()
    fisher({"shift": -jnp.ones(4)})
    assert _fisher._chunked_fisher._cache_size() == before


class _BatchNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(3)(nn.tanh(x))


@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_linen_batch_stats_as_model_state(method):
    model = _BatchNormMLP()
    x = jax.random.normal(jax.random.key(1), (7, 4))
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    stats = jax.tree.map(
        lambda a: a + jax.random.uniform(jax.random.key(2), a.shape, minval=0.5, maxval=2.0),
        variables["batch_stats"],
    )

    def apply_fn(p, s, x):
        return model.apply({"params": p, "batch_stats": s}, x)

    got = ewc_jax.fisher_diagonal(apply_fn, params, x, model_state=stats, method=method)
    want = _dense_exact_fisher(lambda q, xb: apply_fn(q, stats, xb), params, x)
    _assert_trees_close(got, want)
    assert set(got) == set(params)  # no Fisher for the statistics
    other = ewc_jax.fisher_diagonal(
        apply_fn, params, x, model_state=variables["batch_stats"], method=method
    )
    assert not np.allclose(other["Dense_0"]["kernel"], got["Dense_0"]["kernel"])


# -- batch statistics never get a Fisher --------------------------------------------------------


def test_whole_linen_variables_are_refused_with_the_fix():
    model = _BatchNormMLP()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=re.escape("Pass params=variables['params'], model_state")):
        ewc_jax.fisher_diagonal(model.apply, variables, x)


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x)))))


def test_nnx_state_with_batch_stats_or_rngs_is_refused_with_the_fix():
    model = _NNXNet(nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
    with pytest.raises(ValueError, match=r"NNX BatchStat at \['bn'\]\['mean'\].*nnx.Param, \.\.\."):
        ewc_jax.fisher_diagonal(apply_fn, state, jnp.ones((2, 4)))
    no_bn = nnx.split(_NNXNet(nnx.Rngs(0)), nnx.Not(nnx.BatchStat), ...)[1]
    with pytest.raises(ValueError, match=r"NNX RngCount at \['drop'\]\['rngs'\]\['count'\]"):
        ewc_jax.fisher_diagonal(apply_fn, no_bn, jnp.ones((2, 4)))


def _guide_block(path):
    """The first Python block of a docs page (the recipe the page teaches)."""
    return re.search(r"```python\n(.*?)```", path.read_text(), re.DOTALL).group(1)


def test_readme_nnx_recipe_on_a_model_with_dropout_and_batchnorm():
    model = _NNXNet(nnx.Rngs(0))
    # Statistics that are not the initial ones, so that using them matters.
    model.bn.mean.value = jnp.linspace(-1.0, 1.0, 6)
    model.bn.var.value = jnp.linspace(0.5, 2.0, 6)
    x = jax.random.normal(jax.random.key(1), (9, 4))
    space = {"model": model, "x_task_a": x, "task_loss": jnp.zeros(()), "nnx": nnx}
    space |= {"ewc_jax": ewc_jax, "jax": jax, "jnp": jnp, "optax": optax}
    exec(_guide_block(README.parent / "docs" / "guides" / "nnx.md"), space)
    params, rest, fisher = space["params"], space["rest"], space["fisher"]
    assert jax.tree.structure(fisher) == jax.tree.structure(params)
    graphdef = space["graphdef"]
    want = _dense_exact_fisher(lambda q, xb: nnx.merge(graphdef, q, rest)(xb), params, x)
    _assert_trees_close(fisher, want)
    # Eval mode: the running statistics were used, not the batch's own (the Fisher with the
    # initial statistics differs).
    model.bn.mean.value = jnp.zeros(6)
    rest = nnx.split(model, nnx.Param, ...)[2]
    reset = ewc_jax.fisher_diagonal(space["apply_fn"], params, x, model_state=rest)
    assert not np.allclose(reset["l1"]["kernel"][...], fisher["l1"]["kernel"][...])
    assert float(space["loss"]) == 0.0  # the penalty at the anchor
