"""K-FAC's diagonal part: the parameters without a Kronecker block get, from the factors' own
pass, the diagonal Fisher that :func:`ewc_jax.fisher_diagonal` gives them (same labels: the
sampled estimator's draws are the same for the same key).

The reference is ``fisher_diagonal(..., method="general", where=those leaves)``: per-example
gradients by ``vmap(grad)``, none of the tapped pass that K-FAC uses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax
from ewc_jax import _kfac
from ewc_jax._engine.chunking import chunked_sum, even_chunk_size
from experiments.models.language import CausalTransformer

N, T, V = 12, 4, 5


class TokenMLP(nn.Module):
    """Dense, LayerNorm, tanh, Dense: per token for ``[B, T, D]`` inputs (logits ``[B, T, C]``),
    per example for ``[B, D]`` (logits ``[B, C]``)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.LayerNorm()(nn.Dense(6)(x)))
        return nn.Dense(V)(h)


def _workload(name):
    keys = jax.random.split(jax.random.key(0), 4)
    if name == "lm":  # embeddings (a gather: differentiated per example), positions, LayerNorms
        model = CausalTransformer(num_layers=1, width=8, num_heads=2, vocab_size=V)
        inputs = jax.random.randint(keys[0], (N, T), 0, V)
    elif name == "token_mlp":  # LayerNorm over the positions: several terms per example
        model = TokenMLP()
        inputs = jax.random.normal(keys[0], (N, T, 3))
    else:  # LayerNorm once per example: one term
        model = TokenMLP()
        inputs = jax.random.normal(keys[0], (N, 3))
    params = model.init(keys[1], inputs[:1])["params"]
    labels = jax.random.randint(keys[2], inputs.shape[:2] if name != "mlp" else (N,), 0, V)
    mask = jax.random.bernoulli(keys[3], 0.7, (N, T))
    return (lambda p, x: model.apply({"params": p}, x)), params, inputs, labels, mask


CASES = [
    (name, estimator, masked)
    for name in ("lm", "token_mlp", "mlp")
    for estimator in ewc_jax.kfac.KFAC_ESTIMATORS
    for masked in ((False, True) if name != "mlp" else (False,))
]


@pytest.mark.parametrize("name, estimator, masked", CASES)
def test_unfactored_leaves_get_fisher_diagonal_in_the_factors_pass(
    name, estimator, masked, monkeypatch
):
    apply_fn, params, inputs, labels, mask = _workload(name)
    kw = dict(estimator=estimator, key=jax.random.key(7), mask=mask if masked else None)
    # One pass: kfac_fisher must not fall back on a second, separate fisher_diagonal call.
    monkeypatch.setattr(_kfac, "fisher_diagonal", lambda *a, **k: pytest.fail("second pass"))
    fisher = ewc_jax.kfac.kfac_fisher(apply_fn, params, inputs, labels, chunk_size=5, **kw)
    monkeypatch.undo()

    leaves, treedef = jax.tree.flatten(params)
    covered = {i for t in fisher.layers for i in (t.kernel, t.bias) if i is not None}
    uncovered = [i not in covered for i in range(len(leaves))]
    assert fisher.layers and any(uncovered)
    flags = jax.tree.unflatten(treedef, uncovered)
    reference = ewc_jax.fisher_diagonal(
        apply_fn, params, inputs, labels, method="general", where=lambda _: flags, **kw
    )
    expected = iter(jax.tree.leaves(reference))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    got = jax.tree.leaves(fisher.diagonal)
    assert jax.tree.structure(fisher.diagonal) == treedef
    for i, leaf in enumerate(got):
        assert leaf.shape == leaves[i].shape and leaf.dtype == leaves[i].dtype, paths[i]
        if i in covered:
            np.testing.assert_array_equal(leaf, 0.0, err_msg=paths[i])
            continue
        want = next(expected)
        assert float(jnp.max(want)) > 0, paths[i]  # a check that can fail
        np.testing.assert_allclose(
            leaf, want, rtol=2e-5, atol=1e-6 * float(jnp.max(want)), err_msg=paths[i]
        )
    if name == "lm":
        assert any("embedding" in paths[i] for i, u in enumerate(uncovered) if u)


def test_chunk_size_changes_only_rounding():
    apply_fn, params, inputs, labels, mask = _workload("lm")
    kw = dict(estimator="sampled", key=jax.random.key(3), mask=mask)
    one = ewc_jax.kfac.kfac_fisher(apply_fn, params, inputs, labels, chunk_size=N, **kw)
    many = ewc_jax.kfac.kfac_fisher(apply_fn, params, inputs, labels, chunk_size=5, **kw)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), one.diagonal,
        many.diagonal,
    )  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1, 5, 86, 116, 256, 400])
def test_even_chunks_keep_the_chunk_count_and_count_each_example_once(chunk_size):
    for n in (1, 7, 255, 256, 257):
        even = even_chunk_size(chunk_size, n)
        chunks = -(-n // min(chunk_size, n))
        assert even <= min(chunk_size, n) and -(-n // even) == chunks
        assert chunks * even - n < chunks  # the overlap computed and masked out
        x = jnp.arange(n, dtype=jnp.float32) + 1.0  # each example counted once: sum n(n+1)/2
        total = chunked_sum(lambda a, w: jnp.sum(jnp.where(w, a, 0.0)), x, even)
        assert float(total) == n * (n + 1) / 2
