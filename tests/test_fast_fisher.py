"""The one-pass path's plan, and that it never forms per-example Dense gradients. Its values
against dense references: tests/test_reference_matrix.py."""

import jax
import jax.numpy as jnp
import pytest
from _models import NNXCNN, NNXMLP, LinenCNN, LinenMixed, LinenMLP, LinenMultiHead, nnx_apply
from flax import nnx
from jax.extend import core as jex

import ewc_jax
from ewc_jax._engine import plan as plan_lib


def _linen(model, shape, task=None):
    params = model.init(jax.random.key(0), jnp.ones((1, *shape)))
    if task is None:
        return model.apply, params
    return (lambda p, x: model.apply(p, x, task=task)), params


def _nnx(model):
    graphdef, state = nnx.split(model)
    return nnx_apply(graphdef), state


MODELS = {
    "mlp": (lambda: _linen(LinenMLP(features=(32, 16), num_classes=6), (20,)), (20,)),
    "cnn": (lambda: _linen(LinenCNN(), (8, 8, 2)), (8, 8, 2)),
    "multihead": (lambda: _linen(LinenMultiHead(num_tasks=3), (5,), task=1), (5,)),
    "mixed": (lambda: _linen(LinenMixed(), (6,)), (6,)),
    "nnx_mlp": (lambda: _nnx(NNXMLP(5, 7, 3, rngs=nnx.Rngs(0))), (5,)),
    "nnx_cnn": (lambda: _nnx(NNXCNN(rngs=nnx.Rngs(0))), (6, 6, 1)),
}


def _leaf_names(params):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def test_plan_covers_dense_conv_and_biases_and_falls_back_for_the_rest():
    apply_fn, params = MODELS["mixed"][0]()
    plan = plan_lib.make_plan(apply_fn, params, jnp.ones(6))
    names = _leaf_names(params)
    tapped = {names[t.leaf]: t.one_term for t in plan.taps}
    fallback = {names[i] for i in plan.fallback}
    assert fallback == {"['params']['log_scale']", "['params']['tied']"}
    assert tapped["['params']['Dense_0']['kernel']"] is True
    assert tapped["['params']['Dense_0']['bias']"] is True
    # Dense over a [2, 5] "sequence": two terms per example, per-example gradient formed.
    assert tapped["['params']['Dense_1']['kernel']"] is False

    apply_fn, params = MODELS["cnn"][0]()
    plan = plan_lib.make_plan(apply_fn, params, jnp.ones((8, 8, 2)))
    names = _leaf_names(params)
    tapped = {names[t.leaf]: t.one_term for t in plan.taps}
    assert not plan.fallback
    assert tapped["['params']['Conv_0']['kernel']"] is False
    assert tapped["['params']['Dense_0']['kernel']"] is True
    assert tapped["['params']['DenseGeneral_0']['kernel']"] is True


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(var.aval.shape)
        for param in eqn.params.values():
            inner = param.jaxpr if isinstance(param, jex.ClosedJaxpr) else param
            if isinstance(inner, jex.Jaxpr):
                yield from _all_shapes(inner)


@pytest.mark.parametrize("estimator", ["argmax", "exact"])
def test_fast_path_forms_no_per_example_dense_gradients(estimator):
    model = LinenMLP(features=(64, 48), num_classes=10)
    params = model.init(jax.random.key(0), jnp.ones((1, 30)))
    x = jnp.ones((40, 30))

    def shapes(method):
        jaxpr = jax.make_jaxpr(
            lambda p: ewc_jax.fisher_diagonal(
                model.apply, p, x, estimator=estimator, chunk_size=40, method=method
            )
        )(params).jaxpr
        return set(_all_shapes(jaxpr))

    per_example_kernel = (40, 30, 64)
    assert per_example_kernel in shapes("general")  # the general path does form them
    one_pass = shapes("one_pass")
    assert per_example_kernel not in one_pass
    assert not any(len(s) == 3 and s[1:] in {(30, 64), (64, 48), (48, 10)} for s in one_pass)


def test_unused_parameters_get_zero_fisher_on_both_paths():
    apply_fn, params = MODELS["multihead"][0]()  # head 1 of 3: heads 0 and 2 do not matter
    x = jax.random.normal(jax.random.key(1), (9, 5))
    for method in ("one_pass", "general"):
        fisher = ewc_jax.fisher_diagonal(apply_fn, params, x, method=method)
        assert float(jnp.max(fisher["params"]["head0"]["kernel"])) == 0.0
        assert float(jnp.max(fisher["params"]["head1"]["kernel"])) > 0.0
