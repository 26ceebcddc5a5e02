"""Every model family x every estimator x every path against a dense float64 reference.

One matrix replaces the suites that held the one-pass path to the general one: here both, and
``"auto"``, are held to ``tests/_reference.py``'s per-example ``jax.jacrev`` Jacobians, which
share no code with the library. Everything runs in float64, so the only differences are
rounding: ``rtol=1e-8`` per entry, plus ``1e-11`` of the tree's largest entry for entries that
are zero in exact arithmetic (an attention key bias).

Budget: unmarked, every family appears once (21 entries); the rest of the 253-entry cross
product is ``exhaustive`` (``make test-exhaustive``; ``make test`` leaves it out). A family's
model, data and reference Jacobians are built once (``functools.cache``) and shared by its
entries, and XLA's optimisation passes are off in this module (most of the compile time of
programs this small).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import (
    NNXCNN,
    NNXMLP,
    LinenCNN,
    LinenMixed,
    LinenMLP,
    LinenMultiHead,
    TinyCausalLM,
    init_plain_mlp,
    nnx_apply,
    plain_mlp,
)
from _reference import fisher_from, jacobians, mas_from
from flax import nnx

import ewc_jax
from benchmarks.families import FAMILIES

N = 6  # chunk_size=4 below: two chunks, the second overlapping the first
CHUNK = 4
BATCH = 4  # "batched": batches of 4 and 2
METHODS = ("auto", "one_pass", "general")


@dataclasses.dataclass(frozen=True)
class Problem:
    apply_fn: Callable[..., jax.Array]  # what the library is given
    params: Any
    inputs: Any
    mask: jax.Array | None = None
    model_state: Any = None
    labels: jax.Array | None = None  # random classes, drawn by `problem`

    def logits_of(self, params, x):
        """The model as the reference sees it: model state closed over."""
        if self.model_state is None:
            return self.apply_fn(params, x)
        return self.apply_fn(params, self.model_state, x)


def _f64(tree):
    """Floating leaves in float64, cast by numpy (an eager ``astype`` compiles per shape)."""
    return jax.tree.map(
        lambda a: (
            jnp.asarray(np.asarray(a, np.float64)) if jnp.issubdtype(a.dtype, jnp.floating) else a
        ),
        tree,
    )


def _linen(model, shape, **call):
    x = jax.random.normal(jax.random.key(1), (N, *shape), jnp.float64)
    params = _f64(jax.jit(functools.partial(model.init, **call))(jax.random.key(0), x[:1]))
    apply_fn = (lambda p, xb: model.apply(p, xb, **call)) if call else model.apply
    return Problem(apply_fn, params, x)


def _nnx(model, shape):
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (N, *shape), jnp.float64)
    return Problem(nnx_apply(graphdef), _f64(state), x)


def _benchmark_family(name):
    """A family of ``benchmarks/families.py`` at width 4 (its init jitted: eager Flax init
    compiles every op on its own)."""
    make_model, make_inputs = FAMILIES[name]
    model = make_model(4)
    x = _f64(jnp.asarray(make_inputs(N, 4, np.random.default_rng(0))))
    return Problem(model.apply, _f64(jax.jit(model.init)(jax.random.key(0), x[:1])), x)


class _BatchNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(3)(nn.tanh(x))


def _batchnorm():
    model = _BatchNormMLP()
    x = jax.random.normal(jax.random.key(1), (N, 4), jnp.float64)
    variables = _f64(jax.jit(model.init)(jax.random.key(0), x[:1]))
    # Statistics that are not the initial ones, so that passing them matters.
    stats = {
        "BatchNorm_0": {
            "mean": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64),
            "var": jnp.linspace(0.5, 2.0, 5, dtype=jnp.float64),
        }
    }
    apply_fn = lambda p, s, xb: model.apply({"params": p, "batch_stats": s}, xb)
    return Problem(apply_fn, variables["params"], x, model_state=stats)


def _lm(model, tokens_shape, vocab):
    tokens = jax.random.randint(jax.random.key(1), (N, *tokens_shape), 0, vocab)
    params = _f64(jax.jit(model.init)(jax.random.key(0), tokens[:1]))
    lengths = jnp.array([4, 2, 3, 1, 4, 3])  # ragged: padding after each sequence's length
    mask = jnp.arange(tokens_shape[0])[None] < lengths[:, None]
    return Problem(model.apply, params, tokens, mask=mask)


def _plain():
    params = init_plain_mlp(jax.random.key(0), (5, 6, 4), jnp.float64)
    return Problem(plain_mlp, params, jax.random.normal(jax.random.key(1), (N, 5), jnp.float64))


def _lm_family():
    lm = _benchmark_family("tiny_lm")
    lengths = jnp.array([8, 3, 5, 1, 8, 6])
    return dataclasses.replace(lm, mask=jnp.arange(lm.inputs.shape[1])[None] < lengths[:, None])


BUILDERS: dict[str, Callable[[], Problem]] = {
    "plain_mlp": _plain,
    "linen_mlp": lambda: _linen(LinenMLP(features=(6, 5), num_classes=4), (5,)),
    "linen_cnn": lambda: _linen(LinenCNN(), (6, 6, 2)),
    "multihead": lambda: _linen(LinenMultiHead(num_tasks=3), (5,), task=1),
    "mixed": lambda: _linen(LinenMixed(), (6,)),
    "nnx_mlp": lambda: _nnx(NNXMLP(5, 7, 3, rngs=nnx.Rngs(0)), (5,)),
    "nnx_cnn": lambda: _nnx(NNXCNN(rngs=nnx.Rngs(0)), (6, 6, 1)),
    "conv": lambda: _benchmark_family("conv"),
    "grouped_conv": lambda: _benchmark_family("grouped_conv"),
    "transformer_block": lambda: _benchmark_family("transformer_block"),
    "sequence_dense": lambda: _benchmark_family("sequence_dense"),
    "dense_general": lambda: _benchmark_family("dense_general_2axes"),
    # Sequence outputs [B, T, V] with a ragged token mask; Embed, attention, LayerNorm.
    "causal_lm": lambda: _lm(TinyCausalLM(), (4,), 5),
    "batchnorm_state": _batchnorm,
    "scanned_layers": lambda: _benchmark_family("scanned_layers"),
    "tiny_lm": _lm_family,
}


def _float64():
    # Flax's LayerNorm computes its statistics in float32 at least, which strict promotion
    # refuses to mix with float64: the float64 runs use standard promotion.
    return jax.enable_x64(True), jax.numpy_dtype_promotion("standard")


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """XLA's optimisation passes are most of the compile time of these small programs and
    change nothing but float64 rounding: off for this module, restored after it."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@functools.cache
def problem(family: str) -> Problem:
    out = BUILDERS[family]()
    logits = jax.eval_shape(out.logits_of, out.params, jax.tree.map(lambda a: a[:1], out.inputs))
    labels = jax.random.randint(jax.random.key(2), (N, *logits.shape[1:-1]), 0, logits.shape[-1])
    return dataclasses.replace(out, labels=labels)


@functools.cache
def reference_jacobians(family: str):
    p = problem(family)
    return jacobians(p.logits_of, p.params, p.inputs)


def assert_close_to_reference(got, want):
    """Same structure and shapes; every entry within 1e-8 relative, or 1e-11 of the tree's
    largest entry (entries that are zero in exact arithmetic)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    top = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    assert top > 0
    for (path, g), w in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        assert g.shape == w.shape and g.dtype == jnp.float64, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            g, w, rtol=1e-8, atol=1e-11 * top, err_msg=jax.tree_util.keystr(path)
        )


# The rest of the cross product is marked `exhaustive`: `make test-exhaustive` runs it (about 3
# minutes on 2 cores), `make test` does not. Unmarked, every family appears once,
# with (estimator, path) pairs that rotate so that each of the 4 x 3 pairs is unmarked for at
# least one family, and "batched" (one path: mini-batch mean gradients) on a classifier and a
# masked sequence model.
_ESTIMATORS = ("exact", "sampled", "empirical", "argmax")
_BATCHED_UNMARKED = ("plain_mlp", "causal_lm")


def _cases():
    cases = []
    for i, family in enumerate(BUILDERS):
        # tiny_lm (the benchmark's LM: causal_lm's layers again, longer) is unmarked in MAS.
        unmarked = (_ESTIMATORS[i % 4], METHODS[i % 3]) if family != "tiny_lm" else None
        for estimator in _ESTIMATORS:
            for method in METHODS:
                slow = (estimator, method) != unmarked
                marks = (pytest.mark.exhaustive,) if slow else ()
                cases.append(pytest.param(family, estimator, method, marks=marks))
        marks = () if family in _BATCHED_UNMARKED else (pytest.mark.exhaustive,)
        cases.append(pytest.param(family, "batched", "auto", marks=marks))
    return cases


@pytest.mark.parametrize(("family", "estimator", "method"), _cases())
def test_fisher_matches_dense_reference(family, estimator, method):
    x64, promotion = _float64()
    with x64, promotion:
        p = problem(family)
        key = jax.random.key(3)
        got = ewc_jax.fisher_diagonal(
            p.apply_fn, p.params, p.inputs, p.labels, estimator=estimator, key=key,
            mask=p.mask, chunk_size=CHUNK, batch_size=BATCH, method=method,
            model_state=p.model_state,
        )  # fmt: skip
        jac, logits, unravel = reference_jacobians(family)
        want = unravel(
            fisher_from(estimator, jac, logits, p.labels, key=key, mask=p.mask, batch_size=BATCH)
        )
        assert_close_to_reference(got, want)


# MAS has no labels, mask or model state: the families whose outputs are the model's own.
# Unmarked: the one-pass path on a model with parameters it does not cover (the general path
# takes those), on convolutions, and on an embedding model with sequence outputs.
_MAS_UNMARKED = {("mixed", "one_pass"), ("linen_cnn", "one_pass"), ("tiny_lm", "general")}


def _mas_cases():
    return [
        pytest.param(f, m, marks=() if (f, m) in _MAS_UNMARKED else (pytest.mark.exhaustive,))
        for f in BUILDERS
        if f != "batchnorm_state"
        for m in ("auto", "one_pass", "general")
    ]


@pytest.mark.parametrize(("family", "method"), _mas_cases())
def test_mas_matches_dense_reference(family, method):
    x64, promotion = _float64()
    with x64, promotion:
        p = problem(family)
        got = ewc_jax.importance.mas_importance(
            p.apply_fn, p.params, p.inputs, chunk_size=CHUNK, method=method
        )
        jac, logits, unravel = reference_jacobians(family)
        assert_close_to_reference(got, unravel(mas_from(jac, logits)))
