"""The Laplace evidence for the EWC strength against exact answers.

For Bayesian linear regression with Gaussian noise the Laplace approximation is exact, so the
library's log evidence at the MAP estimate must equal the Gaussian marginal likelihood computed
densely with ``jnp.linalg``, and MacKay's fixed point (re-fit, re-choose) must land on the exact
maximiser found by brute force. The Kronecker log-determinants are checked against ``jnp.kron``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax
from ewc_jax import kfac
from ewc_jax.evidence import evidence_strength, log_evidence, relative_curvatures

SIGMA = 0.7


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _gaussian_log_density(y: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    diff = y - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (diff @ np.linalg.solve(cov, diff) + logdet + y.shape[0] * np.log(2 * np.pi))


def _spd(key: jax.Array, n: int, rank: int | None = None) -> jax.Array:
    m = jax.random.normal(key, (n, rank or n))
    return m @ m.T / n + (0 if rank else 0.1) * jnp.eye(n)


def _regression(seed: int, n: int, d_in: int, d_out: int):
    """Inputs, targets and the prior anchor of a multi-output linear regression ``Y = X W + E``."""
    kx, kw, ke, ka = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, d_in))
    w_true = jax.random.normal(kw, (d_in, d_out))
    y = x @ w_true + SIGMA * jax.random.normal(ke, (n, d_out))
    anchor = w_true + 0.5 * jax.random.normal(ka, (d_in, d_out))
    return x, y, anchor


def _map_and_exact(x, y, anchor, prior, strength: float):
    """MAP ``W`` and the exact log marginal likelihood under the prior
    ``vec(W) ~ N(vec(anchor), (N λ P)^{-1})`` (row-major vec, ``P = prior``), in NumPy float64."""
    x, y, anchor, prior = (np.asarray(t, np.float64) for t in (x, y, anchor, prior))
    n, d_in = x.shape
    d_out = y.shape[1]
    design = np.kron(x, np.eye(d_out))  # vec(X W) = (X ⊗ I) vec(W), row-major
    prior_precision = n * strength * prior
    posterior = design.T @ design / SIGMA**2 + prior_precision
    rhs = design.T @ y.ravel() / SIGMA**2 + prior_precision @ anchor.ravel()
    w_map = np.linalg.solve(posterior, rhs).reshape(d_in, d_out)
    cov = SIGMA**2 * np.eye(n * d_out) + design @ np.linalg.solve(prior_precision, design.T)
    exact = _gaussian_log_density(y.ravel(), design @ anchor.ravel(), cov)
    return jnp.asarray(w_map), exact


def _log_likelihood(x, y, w) -> jax.Array:
    resid = y - x @ w
    return jnp.sum(-0.5 * resid**2 / SIGMA**2 - 0.5 * jnp.log(2 * jnp.pi * SIGMA**2))


def _diagonal_problem(seed: int = 0):
    """Orthogonal design columns: the likelihood's Hessian is diagonal, so the diagonal Laplace
    evidence is exact."""
    n, d = 40, 5
    x, y, anchor = _regression(seed, n, d, 1)
    q, _ = jnp.linalg.qr(x)
    x = q * jnp.sqrt(n) * jnp.arange(1.0, d + 1)[None, :]  # orthogonal columns, own scales
    y = x @ anchor + SIGMA * jax.random.normal(jax.random.key(seed + 9), (n, 1))
    anchor = anchor + 0.3 * jax.random.normal(jax.random.key(seed + 7), anchor.shape)
    precision = jnp.linspace(0.2, 2.0, d)[:, None]
    state = ewc_jax.EWCState({"w": anchor}, {"w": precision}, jnp.ones((), jnp.int32))
    curvature = {"w": (jnp.sum(x**2, axis=0) / (n * SIGMA**2))[:, None]}  # mean-loss Hessian
    return x, y, anchor, state, curvature, jnp.diag(precision[:, 0])


def test_diagonal_log_evidence_is_the_exact_marginal_likelihood():
    x, y, anchor, state, curvature, prior = _diagonal_problem()
    for strength in (0.01, 0.3, 2.0, 40.0):
        w_map, exact = _map_and_exact(x, y, anchor, prior, strength)
        got = log_evidence(
            strength,
            state,
            {"w": w_map},
            curvature,
            num_examples=x.shape[0],
            log_likelihood=_log_likelihood(x, y, w_map),
        )
        np.testing.assert_allclose(got, exact, rtol=1e-10)


def _fixed_point(x, y, anchor, state, curvature, prior, make_params) -> float:
    """MacKay: fit the MAP at λ, choose λ by the evidence there, repeat."""
    strength = 1.0
    for _ in range(200):
        w_map, _ = _map_and_exact(x, y, anchor, prior, strength)
        new = float(
            evidence_strength(
                state, make_params(w_map), curvature, num_examples=x.shape[0]
            ).strength
        )
        if abs(np.log(new / strength)) < 1e-12:
            return new
        strength = new
    raise AssertionError("the fixed point did not converge")


def _brute_force_maximiser(x, y, anchor, prior) -> float:
    grid = np.exp(np.linspace(np.log(1e-4), np.log(1e4), 161))
    values = [float(_map_and_exact(x, y, anchor, prior, s)[1]) for s in grid]
    i = int(np.argmax(values))
    low, high = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    for _ in range(80):  # golden-section refinement of the bracketing grid cell
        a = high - 0.618 * (high - low)
        b = low + 0.618 * (high - low)
        fa = float(_map_and_exact(x, y, anchor, prior, np.exp(a))[1])
        fb = float(_map_and_exact(x, y, anchor, prior, np.exp(b))[1])
        low, high = (low, b) if fa > fb else (a, high)
    return float(np.exp((low + high) / 2))


def test_diagonal_fixed_point_is_the_exact_maximiser():
    x, y, anchor, state, curvature, prior = _diagonal_problem(seed=3)
    got = _fixed_point(x, y, anchor, state, curvature, prior, lambda w: {"w": w})
    np.testing.assert_allclose(got, _brute_force_maximiser(x, y, anchor, prior), rtol=1e-5)


def _kronecker_problem(seed: int = 1, prior_rank: int | None = None):
    n, d_in, d_out = 30, 4, 3
    x, y, anchor = _regression(seed, n, d_in, d_out)
    ka, kg = jax.random.split(jax.random.key(seed + 100))
    a, g = _spd(ka, d_in, prior_rank), _spd(kg, d_out)
    params = {"w": anchor}
    terms = kfac.KroneckerTerms(a=a[None], g=g[None], anchor=anchor[None], kernel=0, bias=None)
    empty = ewc_jax.EWCState(params, {"w": jnp.zeros_like(anchor)}, jnp.ones((), jnp.int32))
    state = kfac.KFACState(diagonal=empty, layers=(terms,))
    # The mean-loss Hessian of Gaussian regression is exactly Kronecker: (XᵀX / N) ⊗ (I / σ²).
    factors = kfac.KroneckerFactors(a=x.T @ x / n, g=jnp.eye(d_out) / SIGMA**2, kernel=0, bias=None)
    curvature = kfac.KFACFisher(diagonal={"w": jnp.zeros_like(anchor)}, layers=(factors,))
    return x, y, anchor, state, curvature, jnp.kron(a, g)


def test_kronecker_log_evidence_is_the_exact_marginal_likelihood():
    x, y, anchor, state, curvature, prior = _kronecker_problem()
    for strength in (0.05, 1.0, 20.0):
        w_map, exact = _map_and_exact(x, y, anchor, prior, strength)
        got = log_evidence(
            strength,
            state,
            {"w": w_map},
            curvature,
            num_examples=x.shape[0],
            log_likelihood=_log_likelihood(x, y, w_map),
        )
        np.testing.assert_allclose(got, exact, rtol=1e-10)


def test_kronecker_fixed_point_is_the_exact_maximiser():
    x, y, anchor, state, curvature, prior = _kronecker_problem(seed=4)
    got = _fixed_point(x, y, anchor, state, curvature, prior, lambda w: {"w": w})
    np.testing.assert_allclose(got, _brute_force_maximiser(x, y, anchor, prior), rtol=1e-5)


def test_kronecker_log_determinant_equals_the_dense_one():
    keys = jax.random.split(jax.random.key(11), 4)
    a, g = _spd(keys[0], 5), _spd(keys[1], 3)
    a_t, g_t = _spd(keys[2], 5, rank=2), _spd(keys[3], 3)  # a singular task factor too
    _, _, _, state, _, _ = _kronecker_problem()
    state = state._replace(
        layers=(kfac.KroneckerTerms(a[None], g[None], jnp.zeros((1, 5, 3)), 0, None),),
        diagonal=state.diagonal._replace(
            anchor={"w": jnp.zeros((5, 3))}, precision={"w": jnp.zeros((5, 3))}
        ),
    )
    curvature = kfac.KFACFisher(
        {"w": jnp.zeros((5, 3))}, (kfac.KroneckerFactors(a_t, g_t, kernel=0, bias=None),)
    )
    r = relative_curvatures(state, curvature)
    for strength in (0.1, 3.0):
        dense = (
            jnp.linalg.slogdet(strength * jnp.kron(a, g))[1]
            - jnp.linalg.slogdet(jnp.kron(a_t, g_t) + strength * jnp.kron(a, g))[1]
        )
        covered = r[~jnp.isnan(r)]  # the diagonal part covers nothing here
        got = jnp.sum(jnp.log(strength / (covered + strength)))
        np.testing.assert_allclose(got, dense, rtol=1e-10)


def test_a_singular_prior_factor_leaves_its_null_space_out_exactly():
    """λ-dependent part against the dense Schur-complement formula: with ``P`` singular,
    ``log det(H + λP) = log det(H_CC) + log det(S + λ P_KK)`` in the prior's eigenbasis, and only
    ``log det(S + λ P_KK) - log det(λ P_KK)`` depends on λ."""
    keys = jax.random.split(jax.random.key(5), 4)
    a = _spd(keys[0], 5, rank=3)  # prior input factor of rank 3
    g = _spd(keys[1], 2)
    a_t, g_t = _spd(keys[2], 5), _spd(keys[3], 2)
    state = kfac.KFACState(
        diagonal=ewc_jax.EWCState(
            {"w": jnp.zeros((5, 2))}, {"w": jnp.zeros((5, 2))}, jnp.ones((), jnp.int32)
        ),
        layers=(kfac.KroneckerTerms(a[None], g[None], jnp.zeros((1, 5, 2)), 0, None),),
    )
    curvature = kfac.KFACFisher(
        {"w": jnp.zeros((5, 2))}, (kfac.KroneckerFactors(a_t, g_t, kernel=0, bias=None),)
    )
    r = relative_curvatures(state, curvature)
    assert int(jnp.sum(~jnp.isnan(r))) == 3 * 2
    prior, task = jnp.kron(a, g), jnp.kron(a_t, g_t)
    s, u = jnp.linalg.eigh(prior)
    kept = s > 1e-9 * s.max()
    h = u.T @ task @ u
    h_kk, h_kc, h_cc = h[kept][:, kept], h[kept][:, ~kept], h[~kept][:, ~kept]
    schur = h_kk - h_kc @ jnp.linalg.solve(h_cc, h_kc.T)
    p_kk = jnp.diag(s[kept])
    for strength in (0.2, 5.0):
        dense = (
            jnp.linalg.slogdet(strength * p_kk)[1] - jnp.linalg.slogdet(schur + strength * p_kk)[1]
        )
        got = jnp.nansum(jnp.log(strength / (r + strength)))
        np.testing.assert_allclose(got, dense, rtol=1e-8)


def test_uncovered_parameters_are_left_out():
    state = ewc_jax.EWCState(
        {"w": jnp.zeros(3)}, {"w": jnp.array([1.0, 0.0, 4.0])}, jnp.ones((), jnp.int32)
    )
    r = relative_curvatures(state, {"w": jnp.array([2.0, 7.0, 2.0])})
    np.testing.assert_array_equal(np.isnan(r), [False, True, False])
    np.testing.assert_allclose(r[np.array([0, 2])], [2.0, 0.5])
    best = evidence_strength(
        state,
        {"w": jnp.array([0.1, 5.0, -0.2])},
        {"w": jnp.array([2.0, 7.0, 2.0])},
        num_examples=50,
    )
    # γ(λ) = N λ q at the returned λ, with γ over the two covered parameters only.
    q = 1.0 * 0.1**2 + 4.0 * 0.2**2
    gamma = 2.0 / (2.0 + best.strength) + 0.5 / (0.5 + best.strength)
    np.testing.assert_allclose(gamma, 50 * best.strength * q, rtol=1e-9)
    np.testing.assert_allclose(best.effective_parameters, gamma, rtol=1e-12)


def test_evidence_strength_under_jit_equals_eager():
    x, y, anchor, state, curvature, prior = _diagonal_problem()
    w_map, _ = _map_and_exact(x, y, anchor, prior, 1.0)
    eager = evidence_strength(state, {"w": w_map}, curvature, num_examples=40)
    jitted = jax.jit(evidence_strength, static_argnames="num_examples")(
        state, {"w": w_map}, curvature, num_examples=40
    )
    np.testing.assert_allclose(jitted.strength, eager.strength, rtol=1e-12)
    np.testing.assert_allclose(jitted.log_evidence, eager.log_evidence, rtol=1e-12)


def test_no_deviation_gives_an_infinite_strength():
    state = ewc_jax.EWCState({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, jnp.ones((), jnp.int32))
    best = evidence_strength(state, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, num_examples=10)
    assert jnp.isinf(best.strength)


def test_bad_arguments_are_refused():
    _, _, anchor, state, curvature, _ = _kronecker_problem()
    two = state._replace(
        layers=tuple(
            kfac.KroneckerTerms(
                jnp.concatenate([t.a, t.a]),
                jnp.concatenate([t.g, t.g]),
                jnp.concatenate([t.anchor, t.anchor]),
                t.kernel,
                t.bias,
            )
            for t in state.layers
        )
    )
    with pytest.raises(ValueError, match=r"merge them with ewc_jax\.kfac\.merge_kronecker_terms"):
        relative_curvatures(two, curvature)
    with pytest.raises(TypeError, match="needs the current task's curvature as a KFACFisher"):
        relative_curvatures(state, {"w": jnp.zeros_like(anchor)})
    diag = ewc_jax.EWCState({"w": anchor}, {"w": jnp.ones_like(anchor)}, jnp.ones((), jnp.int32))
    with pytest.raises(ValueError, match="structure of the state's precision"):
        relative_curvatures(diag, {"v": jnp.ones_like(anchor)})
    with pytest.raises(ValueError, match="num_examples must be a positive count"):
        evidence_strength(diag, {"w": anchor}, {"w": jnp.ones_like(anchor)}, num_examples=0)


def test_a_where_state_takes_the_deviation_of_its_selection_alone():
    """A K-FAC state over one layer of two (``where=``): ``q`` is that layer's explicit
    ``vec(X)ᵀ (A ⊗ G) vec(X)`` with ``X = [ΔW; Δb]``, and the strength returned solves
    ``γ(λ) = N λ q``; without ``where`` the call is refused, as the penalty is."""
    import flax.linen as nn

    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = functools.partial(nn.Dense, param_dtype=jnp.float64)
            return dense(3, name="out")(jnp.tanh(dense(4, name="hidden")(x)))

    model = TwoLayers()
    x = jax.random.normal(jax.random.key(0), (32, 5))
    y = jnp.arange(32) % 3
    params = model.init(jax.random.key(1), x[:1])["params"]
    where = {"hidden": False, "out": True}

    def fisher(p):
        apply = lambda p, x: model.apply({"params": p}, x)
        return kfac.kfac_fisher(apply, p, x, y, estimator="empirical", where=where)

    state = ewc_jax.consolidate(None, params, fisher(params), where=where)
    moved = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), params
    )
    best = evidence_strength(state, moved, fisher(moved), num_examples=32, where=where)
    (terms,) = state.layers
    kernel, bias = (moved["out"][k] - params["out"][k] for k in ("kernel", "bias"))
    delta = jnp.concatenate([kernel, bias[None]]).ravel()  # row-major vec of [ΔW; Δb]
    q = delta @ jnp.kron(terms.a[0], terms.g[0]) @ delta
    r = relative_curvatures(state, fisher(moved))
    gamma = jnp.nansum(r / (r + best.strength))
    assert 0 < best.strength < jnp.inf
    np.testing.assert_allclose(gamma, 32 * best.strength * q, rtol=1e-8)
    with pytest.raises(ValueError, match="pass the same where= here"):
        evidence_strength(state, moved, fisher(moved), num_examples=32)
