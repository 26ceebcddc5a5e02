r"""Dense references for the importances, from full per-example ``jax.jacrev`` Jacobians.

Nothing here calls ``ewc_jax``: each function writes its quantity from its definition, for one
example at a time, so a test that compares the library with it compares two independent
computations. Run them in float64 (``jax.enable_x64``) on tiny models; the Jacobian of one
example is ``[*S, C, P]`` (tokens, classes, all parameters).

With ``J_{nt}`` the Jacobian of example ``n``'s logits at token ``t`` (``[C, P]``, rows ``J_c``),
``p_{nt}`` its softmax and ``m_{nt}`` the token mask (a classifier has one token, ``m = 1``):

* the score of label ``y`` at a token is ``g_y = Jᵀ (e_y − p)``;
* exact: :math:`F = \frac1N \sum_{n,t} m_{nt}\, \mathrm{diag}(J^\top(\mathrm{diag}\,p - pp^\top)J)`,
  computed as :math:`\mathbb{E}_p[J_c^2] - \mathbb{E}_p[J_c]^2` per token;
* sampled / empirical / argmax: :math:`F = \frac1N \sum_n s_n^2`,
  :math:`s_n = \sum_t m_{nt} g_{y_{nt}}`, with ``y`` drawn as the library documents it
  (example ``n`` uses ``split(key, N)[n]``), given, or the most likely class;
* batched: :math:`\frac1M \sum_b (\frac1{|b|}\sum_{n \in b} s_n)^2` over consecutive batches;
* MAS: :math:`Ω = \frac1N \sum_n |2 J_n^\top f_n|` over all of one example's outputs ``f_n``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def jacobians(logits_of, params, inputs):
    """``(J [N, *S, C, P], logits [N, *S, C], unravel)``, one example at a time.

    ``logits_of(params, batch)`` is the model; each example is passed as a batch of one.
    """
    flat, unravel = ravel_pytree(params)

    def one(x_n):
        batch = jax.tree.map(lambda a: a[None], x_n)
        logits = lambda theta: logits_of(unravel(theta), batch)[0]
        return jax.jacrev(logits)(flat), logits(flat)

    jac, logits = jax.jit(jax.vmap(one))(inputs)
    return jac, logits, unravel


def _token_mask(logits, mask):
    if mask is None:
        return jnp.ones(logits.shape[:-1], logits.dtype)
    return jnp.asarray(mask).astype(logits.dtype)


def labels_for(estimator, logits, labels=None, key=None):
    """The label each token is scored at: given, the argmax, or drawn from the model with
    ``split(key, N)[n]`` for example ``n`` (the draws the library documents)."""
    if estimator == "empirical":
        return jnp.asarray(labels)
    if estimator == "argmax":
        return jnp.argmax(logits, axis=-1)
    if estimator == "sampled":
        keys = jax.random.split(key, logits.shape[0])
        return jax.vmap(jax.random.categorical)(keys, logits)
    raise ValueError(estimator)


def example_scores(jac, logits, labels, mask=None):
    """``s_n = Σ_t m_nt J_ntᵀ (e_{y_nt} − p_nt)``: ``[N, P]``."""
    v = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype) - jax.nn.softmax(logits)
    v = v * _token_mask(logits, mask)[..., None]
    n, p = jac.shape[0], jac.shape[-1]
    return jnp.einsum("nk,nkp->np", v.reshape(n, -1), jac.reshape(n, -1, p))


def fisher(estimator, logits_of, params, inputs, labels=None, *, key=None, mask=None,
           batch_size=None):  # fmt: skip
    """The diagonal Fisher of ``estimator`` as a params-shaped tree (see the module docstring)."""
    jac, logits, unravel = jacobians(logits_of, params, inputs)
    return unravel(fisher_from(estimator, jac, logits, labels, key=key, mask=mask,
                               batch_size=batch_size))  # fmt: skip


def fisher_from(estimator, jac, logits, labels=None, *, key=None, mask=None, batch_size=None):
    """The flat ``[P]`` Fisher of ``estimator`` from precomputed Jacobians and logits."""
    n = jac.shape[0]
    if estimator == "exact":
        p = jax.nn.softmax(logits)[..., None]
        per_token = jnp.sum(p * jac**2, axis=-2) - jnp.sum(p * jac, axis=-2) ** 2
        m = _token_mask(logits, mask)[..., None]
        return jnp.sum(m * per_token, axis=tuple(range(per_token.ndim - 1))) / n
    if estimator == "batched":
        s = example_scores(jac, logits, labels, mask)
        means = [jnp.mean(s[i : i + batch_size], axis=0) for i in range(0, n, batch_size)]
        return jnp.mean(jnp.stack(means) ** 2, axis=0)
    s = example_scores(jac, logits, labels_for(estimator, logits, labels, key), mask)
    return jnp.mean(s**2, axis=0)


def mas(outputs_of, params, inputs):
    """MAS importance ``(1/N) Σ_n |∂‖f(x_n)‖² / ∂θ| = (1/N) Σ_n |2 J_nᵀ f_n|`` as a tree."""
    jac, out, unravel = jacobians(outputs_of, params, inputs)
    return unravel(mas_from(jac, out))


def mas_from(jac, out):
    """The flat ``[P]`` MAS importance from precomputed Jacobians ``[N, *O, P]`` and outputs."""
    n, p = jac.shape[0], jac.shape[-1]
    grads = 2 * jnp.einsum("no,nop->np", out.reshape(n, -1), jac.reshape(n, -1, p))
    return jnp.mean(jnp.abs(grads), axis=0)


def assert_trees_close(got, want, *, rtol, atol=0.0):
    """Structure, then shapes, then values (``atol`` relative to each leaf's largest entry)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        name = jax.tree_util.keystr(path)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = float(np.max(np.abs(w), initial=0.0))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale, err_msg=name)
