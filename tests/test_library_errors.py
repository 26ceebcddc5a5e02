"""Bad input to the library, as a careful new user makes it: one clear line naming the argument
and the fix, never a crash deep inside JAX or a silently zero result (issue 17, item 7).

Each message is asserted whole, so that a change of wording is a visible change of this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import optax
import pytest
from _xla import xla_flags

import ewc_jax


def _linear(params, x):
    return x @ params["w"] + params["b"][None]


def _params():
    return {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


def _exactly(message: str) -> str:
    """The whole message (JAX may add its own note on the lines after it, as under jit)."""
    return "^" + re.escape(message) + r"(\n|$)"


NO_STATE = (
    "state is None: {} needs a consolidated state; build it with "
    "ewc_jax.consolidate(None, params, fisher) after the first task, or "
    "ewc_jax.empty_state(params) before it."
)


def test_penalty_with_state_none():
    with pytest.raises(TypeError, match=_exactly(NO_STATE.format("penalty"))):
        ewc_jax.penalty(_params(), None, 1.0)
    with pytest.raises(TypeError, match=_exactly(NO_STATE.format("penalty"))):
        jax.jit(lambda p: ewc_jax.penalty(p, None, 1.0))(_params())
    with pytest.raises(TypeError, match=_exactly(NO_STATE.format("set_ewc_state"))):
        ewc_jax.set_ewc_state(optax.sgd(1.0).init(_params()), None)


def test_penalty_with_something_that_is_not_a_state():
    message = (
        "state must be an ewc_jax.EWCState (or another ewc_jax.Precision, such as a "
        "ewc_jax.kfac.KFACState) from ewc_jax.consolidate, got dict."
    )
    with pytest.raises(TypeError, match=_exactly(message)):
        ewc_jax.penalty(_params(), _params(), 1.0)


def test_inputs_as_a_python_list():
    x = jnp.arange(12.0).reshape(4, 3)
    message = (
        "inputs holds 12 Python scalars (a list of numbers?); pass an array with a leading "
        "example axis, e.g. jnp.asarray(inputs)."
    )
    with pytest.raises(ValueError, match=_exactly(message)):
        ewc_jax.fisher_diagonal(_linear, _params(), x.tolist())
    with pytest.raises(ValueError, match=_exactly(message)):
        ewc_jax.importance.mas_importance(_linear, _params(), x.tolist())


def test_inputs_of_different_lengths_list_a_few_shapes():
    inputs = {"a": jnp.ones((4, 3)), "b": jnp.ones((5, 3))}
    message = (
        "every leaf of inputs needs the same leading example axis N; got shapes (4, 3), (5, 3) "
        "(2 leaves)."
    )
    with pytest.raises(ValueError, match=_exactly(message)):
        ewc_jax.fisher_diagonal(lambda p, x: _linear(p, x["a"]), _params(), inputs)


@pytest.mark.parametrize("key", [0, 7])
def test_sampled_with_an_int_key(key):
    message = f"key must be a PRNG key, e.g. key=jax.random.key({key}) for a seed; got int {key}."
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match=_exactly(message)):
        ewc_jax.fisher_diagonal(_linear, _params(), x, estimator="sampled", key=key)
    with pytest.raises(TypeError, match=_exactly(message)):
        ewc_jax.kfac.kfac_fisher(_linear, _params(), x, estimator="sampled", key=key)


def test_sampled_with_a_legacy_key_works():
    x = jnp.ones((4, 3))
    legacy = ewc_jax.fisher_diagonal(
        _linear, _params(), x, estimator="sampled", key=jax.random.PRNGKey(0)
    )
    typed = ewc_jax.fisher_diagonal(
        _linear, _params(), x, estimator="sampled", key=jax.random.wrap_key_data(
            jax.random.PRNGKey(0)
        )
    )  # fmt: skip
    for a, b in zip(jax.tree.leaves(legacy), jax.tree.leaves(typed), strict=True):
        assert jnp.array_equal(a, b)


WHERE_NOTHING = (
    "where selects none of the parameters (every flag is False); select at least one, or leave "
    "EWC out."
)


def test_where_that_selects_nothing():
    params = _params()
    nothing = {"w": False, "b": False}
    with pytest.raises(ValueError, match=_exactly(WHERE_NOTHING)):
        ewc_jax.penalty(params, ewc_jax.empty_state(params), 1.0, where=nothing)
    with pytest.raises(ValueError, match=_exactly(WHERE_NOTHING)):
        ewc_jax.empty_state(params, where=lambda p: jax.tree.map(lambda _: False, p))
    with pytest.raises(ValueError, match=_exactly(WHERE_NOTHING)):
        ewc_jax.fisher_diagonal(_linear, params, jnp.ones((4, 3)), where=nothing)


MISSING_WHERE = (
    "{} covers a where= selection (optax.MaskedNode in place of the unselected parameters) but "
    "where= is not given; pass the same where= here."
)


def test_state_built_with_where_used_without_it():
    params = _params()
    where = {"w": True, "b": False}
    state = ewc_jax.consolidate(None, params, jax.tree.map(jnp.ones_like, params), where=where)
    message = _exactly(MISSING_WHERE.format("state"))
    with pytest.raises(ValueError, match=message):
        ewc_jax.penalty(params, state, 1.0)
    with pytest.raises(ValueError, match=message):
        ewc_jax.consolidate(state, params, jax.tree.map(jnp.ones_like, params))
    tx = ewc_jax.add_ewc_penalty(1.0)
    other = (
        "ewc_state and the optimiser's add_ewc_penalty state cover different parameters (one "
        "was built with where=, the other without); give add_ewc_penalty the same where= as "
        "consolidate."
    )
    with pytest.raises(ValueError, match=_exactly(other)):
        ewc_jax.set_ewc_state(tx.init(params), state)
    with pytest.raises(ValueError, match=message):
        tx.update(params, ewc_jax.AddEWCPenaltyState(ewc=state), params)
    # With where= it works, and covers w only.
    assert (
        float(ewc_jax.penalty(jax.tree.map(jnp.zeros_like, params), state, 2.0, where=where)) == 6
    )


def test_masked_fisher_consolidated_without_where():
    params = _params()
    fisher = ewc_jax.fisher_diagonal(
        _linear, params, jnp.ones((4, 3)), where={"w": True, "b": False}
    )
    with pytest.raises(ValueError, match=_exactly(MISSING_WHERE.format("fisher"))):
        ewc_jax.consolidate(None, params, fisher)


def test_fisher_on_another_device_than_params():
    # XLA fixes the device count at start-up: two CPU devices in a subprocess.
    code = """
        import jax, jax.numpy as jnp, ewc_jax
        first, second = jax.devices()[:2]
        params = jax.device_put({"w": jnp.ones(3)}, first)
        fisher = jax.device_put({"w": jnp.ones(3)}, second)
        try:
            ewc_jax.consolidate(None, params, fisher)
        except ValueError as error:
            print(error)
        state = ewc_jax.consolidate(None, params, jax.device_put(fisher, first))
        print(float(state.precision["w"][0]))
    """
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "fisher['w'] is on cpu:1 but params['w'] is on cpu:0; put fisher where params "
        "is, e.g. jax.device_put(fisher, jax.tree.map(lambda p: p.sharding, params)).",
        "1.0",
    ]


ONE_LOGIT = (
    "apply_fn returns one logit per example ([B, 1]): a softmax over one class has zero "
    "gradient, so the Fisher would be zero. For a binary model return two logits, e.g. "
    "jnp.concatenate([jnp.zeros_like(z), z], axis=-1) (the same Bernoulli likelihood, "
    "sigmoid(z))."
)


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical", "argmax", "batched"])
def test_one_logit_per_example(estimator):
    one_logit = lambda p, x: _linear(p, x)[:, :1]
    x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
    kwargs = dict(key=jax.random.key(0), batch_size=2)
    with pytest.raises(ValueError, match=_exactly(ONE_LOGIT)):
        ewc_jax.fisher_diagonal(one_logit, _params(), x, y, estimator=estimator, **kwargs)
    if estimator in ewc_jax.kfac.KFAC_ESTIMATORS:
        with pytest.raises(ValueError, match=_exactly(ONE_LOGIT)):
            ewc_jax.kfac.kfac_fisher(
                one_logit, _params(), x, y, estimator=estimator, key=kwargs["key"]
            )


def test_two_logits_as_the_message_says_give_the_bernoulli_fisher():
    # Known answer: at z = x·w with sigmoid p, the Bernoulli Fisher of w is p (1 - p) x².
    x = jnp.array([[1.0], [2.0], [-1.0]])
    params = {"w": jnp.array([0.5])}
    z_of = lambda p, x: x @ p["w"][:, None]
    two = lambda p, x: jnp.concatenate([jnp.zeros_like(z_of(p, x)), z_of(p, x)], axis=-1)
    fisher = ewc_jax.fisher_diagonal(two, params, x, estimator="exact")
    p = jax.nn.sigmoid(x[:, 0] * 0.5)
    assert jnp.allclose(fisher["w"], jnp.mean(p * (1 - p) * x[:, 0] ** 2), rtol=1e-6)


ALL_ZERO_MASK = (
    "mask selects no token (it is all zeros), so the Fisher would be zero; select at least one "
    "token (an empty input is refused the same way)."
)


def test_all_zero_sequence_mask():
    params = {"w": jnp.ones((3,)), "b": jnp.zeros(3)}
    seq = lambda p, x: x[..., None] * p["w"][None, None] + p["b"][None, None]  # [B, T, 3]
    x, mask = jnp.ones((4, 5)), jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=_exactly(ALL_ZERO_MASK)):
        ewc_jax.fisher_diagonal(seq, params, x, mask=mask)
    # Traced (the mask an argument of an outer jit): the compiled program fails the same way.
    with pytest.raises(Exception, match="RuntimeError: " + re.escape(ALL_ZERO_MASK) + "\n"):
        jax.block_until_ready(
            jax.jit(lambda m: ewc_jax.fisher_diagonal(seq, params, x, mask=m))(mask)
        )
    some = mask.at[0, 0].set(1)
    assert float(jax.tree.leaves(ewc_jax.fisher_diagonal(seq, params, x, mask=some))[0].sum()) > 0
