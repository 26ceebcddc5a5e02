"""Low and single precision against float64 references that share no code with the library.

A bfloat16 or float16 model's Fisher is compared with the dense float64 Fisher of *the same
rounded weights and inputs* (``tests/_reference.py``), so the only difference is the rounding
of the computation itself, and the tolerance is a multiple of the format's unit roundoff
``u = eps / 2`` (bfloat16: 2^-8, float16: 2^-11):

* bfloat16, ``16 u = 2^-4``: one example's gradient through this 3-layer MLP is rounded about
  ``2L + 1 = 7`` times (each layer's forward output and backward VJP, then the logits' one),
  each time by at most ``u`` relative; squaring doubles the relative error: 14 u, rounded up
  to 16 u. Measured: 5.9 u.
* float16, ``64 u = 2^-5``: the same, times 4 for float16's narrow range: cotangents of
  unlikely classes and their products fall below 2^-14, where float16 is subnormal and its
  spacing is a fixed 2^-24 rather than ``u`` relative (bfloat16 has float32's range). Measured:
  26 u.

Both reject a Fisher scaled by 1.1 (a relative error of 0.1 > 2^-4), as
``test_format_tolerance_rejects_a_ten_percent_scaling`` shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import LinenMLP, init_plain_mlp, plain_mlp
from _reference import fisher as dense_fisher

import ewc_jax

METHODS = ("auto", "one_pass", "general")
FORMATS = {"bfloat16": (jnp.bfloat16, 16), "float16": (jnp.float16, 64)}


def _tolerance(low, factor):
    return factor * float(jnp.finfo(low).eps) / 2


def _max_rel_err(got, want):
    """Worst leaf's ``max |got - want| / max |want|``."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        errs.append(float(np.max(np.abs(g - w))) / float(np.max(np.abs(w))))
    return max(errs)


def _as_float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _low_precision_problem(low):
    model = LinenMLP(features=(32, 16), num_classes=5)
    params = model.init(jax.random.key(0), jnp.ones((1, 12)))
    x = jax.random.normal(jax.random.key(1), (300, 12))
    params_low = jax.tree.map(lambda p: p.astype(low), params)
    x_low = x.astype(low)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        # The reference: the rounded weights and inputs, exactly, in float64.
        want = dense_fisher("exact", model.apply, _as_float64(params_low), _as_float64(x_low))
    return model.apply, params_low, x_low, want


@pytest.fixture(scope="module", params=list(FORMATS))
def low_precision(request):
    low, factor = FORMATS[request.param]
    return (*_low_precision_problem(low), low, _tolerance(low, factor))


def test_low_precision_fisher_against_dense_float64_of_rounded_weights(low_precision):
    apply_fn, params_low, x_low, want, low, tolerance = low_precision
    for method in METHODS:
        got = ewc_jax.fisher_diagonal(apply_fn, params_low, x_low, estimator="exact", method=method)
        # Sums run in float32: the result is float32 unless asked otherwise.
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
        assert _max_rel_err(got, want) < tolerance, method
    asked = ewc_jax.fisher_diagonal(apply_fn, params_low, x_low, dtype=low)
    assert all(leaf.dtype == low for leaf in jax.tree.leaves(asked))
    assert _max_rel_err(asked, want) < tolerance + float(jnp.finfo(low).eps)

    # Consolidation and the penalty widen to float32 whatever the params' format.
    state = ewc_jax.consolidate(None, params_low, got)
    assert jax.tree.leaves(state.precision)[0].dtype == jnp.float32
    assert jax.tree.leaves(state.anchor)[0].dtype == low
    moved = jax.tree.map(lambda p: (p + 0.01).astype(low), params_low)
    value = ewc_jax.penalty(moved, state, 2.0)
    assert value.dtype == jnp.float32 and float(value) > 0
    twice = ewc_jax.consolidate(state, moved, got)
    assert jax.tree.leaves(twice.precision)[0].dtype == jnp.float32


def test_format_tolerance_rejects_a_ten_percent_scaling(low_precision):
    apply_fn, params_low, x_low, want, _, tolerance = low_precision
    got = ewc_jax.fisher_diagonal(apply_fn, params_low, x_low, estimator="exact")
    assert _max_rel_err(got, want) < tolerance
    scaled = jax.tree.map(lambda f: 1.1 * f, got)
    assert _max_rel_err(scaled, want) > tolerance


def test_float16_contraction_does_not_overflow():
    # Inputs of size ~30 and weights ~1/30: products fit float16, but a sum of squares over
    # 2048 examples (~2048 * 30^2) would not: the sums must run in float32.
    k1, k2 = jax.random.split(jax.random.key(0))
    p = {"w": (jax.random.normal(k1, (6, 5)) / 30).astype(jnp.float16)}
    x = (30 * jax.random.normal(k2, (2048, 6))).astype(jnp.float16)
    apply_fn = lambda p, x: x @ p["w"]
    with jax.enable_x64(True):
        want = dense_fisher("exact", apply_fn, _as_float64(p), _as_float64(x))
    for method in METHODS:
        got = ewc_jax.fisher_diagonal(apply_fn, p, x, method=method)
        assert got["w"].dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(got["w"])))
        assert _max_rel_err(got, want) < _tolerance(jnp.float16, 64), method


def _argmax_fisher_float64(params, x, chunk=1000):
    """``(1/N) Σ_n (∇θ log p(argmax | x_n))²`` in float64, from ``jax.grad`` per example."""

    @jax.jit
    def chunk_sum(params, xs):
        def grad_sq(xn):
            log_p = lambda q: jax.nn.log_softmax(plain_mlp(q, xn[None])[0])
            label = jnp.argmax(log_p(params))
            return jax.tree.map(jnp.square, jax.grad(lambda q: log_p(q)[label])(params))

        return jax.tree.map(lambda g: jnp.sum(g, axis=0), jax.vmap(grad_sq)(xs))

    total = None
    for start in range(0, x.shape[0], chunk):
        part = chunk_sum(params, x[start : start + chunk])
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda t: t / x.shape[0], total)


@pytest.mark.parametrize("n", [10_000, pytest.param(100_000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_float32_fisher_within_1e6_of_float64(n, method):
    # A smooth (tanh) model, so float32 and float64 take the same branches everywhere; with
    # ReLU, the few pre-activations within rounding of zero flip and move the Fisher by a
    # discrete amount that no accumulation can recover (see BENCHMARKS.md).
    params = init_plain_mlp(jax.random.key(0), (64, 64, 64, 10))
    x = jax.random.uniform(jax.random.key(1), (n, 64))
    got = ewc_jax.fisher_diagonal(plain_mlp, params, x, estimator="argmax", method=method)
    with jax.enable_x64(True):
        want = _argmax_fisher_float64(_as_float64(params), _as_float64(x))
    assert _max_rel_err(got, want) < 1e-6
