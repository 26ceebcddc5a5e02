"""Property tests: consolidation against a numpy model of each mode, the K-FAC quadratic
against an explicit ``jnp.kron``, on shapes and values hypothesis draws.

Few examples, no deadline (the first example of a shape compiles), ``derandomize=True`` so a
CI run draws the same examples every time.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ewc_jax

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True)


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def _tasks(draw):
    """A few tasks' (params, Fisher) on a two-leaf tree; Fisher entries >= 0, some exactly 0
    (a parameter a task does not use), so the Λ = 0 branch of the anchor is drawn too."""
    shapes = {"w": draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=3)), "b": (2,)}
    # No subnormal Fisher: a parameter a task uses has a Fisher of 1e-3 at least.
    importance = st.sampled_from([0.0, 0.5, 2.0]) | _floats(1e-3, 5)
    tasks = []
    for _ in range(draw(st.integers(1, 4))):
        params, fisher = {}, {}
        for k, shape in shapes.items():
            params[k] = draw(hnp.arrays(np.float64, shape, elements=_floats(-3, 3)))
            fisher[k] = draw(hnp.arrays(np.float64, shape, elements=importance))
        tasks.append((params, fisher))
    return tasks


def _numpy_state(tasks, mode, gamma):
    """Precision and anchor by the definitions in ``consolidate``'s docstring, in numpy.

    separate: Λ = Σ_k F_k, θ̄ = Σ_k F_k θ_k / Λ (the last θ where Λ = 0);
    online:   Λ = Σ_k γ^(K-k) F_k, θ̄ = θ_K.
    """
    last = tasks[-1][0]
    if mode == "separate":
        precision = {k: sum(f[k] for _, f in tasks) for k in last}
        anchor = {}
        for k in last:
            used = precision[k] > 0
            total = np.where(used, precision[k], 1.0)
            anchor[k] = np.where(used, sum(f[k] * p[k] for p, f in tasks) / total, last[k])
        return precision, anchor
    decay = [gamma ** (len(tasks) - 1 - i) for i in range(len(tasks))]
    precision = {k: sum(d * f[k] for d, (_, f) in zip(decay, tasks, strict=True)) for k in last}
    return precision, dict(last)


@PROPERTY
@given(
    tasks=_tasks(),
    mode=st.sampled_from(ewc_jax.CONSOLIDATION_MODES),
    gamma=_floats(0, 1),
    theta_seed=st.integers(0, 2**16),
)
def test_consolidation_modes_match_a_numpy_model(tasks, mode, gamma, theta_seed):
    gamma = 1.0 if mode == "separate" else gamma
    with jax.enable_x64(True):
        state = None
        for params, fisher in tasks:
            state = ewc_jax.consolidate(state, params, fisher, mode=mode, gamma=gamma)
        precision, anchor = _numpy_state(tasks, mode, gamma)
        assert int(state.num_tasks) == len(tasks)
        for k in precision:
            np.testing.assert_allclose(state.precision[k], precision[k], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(state.anchor[k], anchor[k], rtol=1e-12, atol=1e-12)

        # The penalty's gradient is that of the per-task sum it stands for: separate,
        # λ Σ_k F_k (θ - θ_k); online, λ Λ (θ - θ_K).
        rng = np.random.default_rng(theta_seed)
        theta = {k: rng.normal(size=np.shape(v)) for k, v in tasks[-1][0].items()}
        strength = 3.0
        grad = jax.grad(ewc_jax.penalty)(theta, state, strength)
        for k in theta:
            if mode == "separate":
                want = strength * sum(f[k] * (theta[k] - p[k]) for p, f in tasks)
            else:
                want = strength * precision[k] * (theta[k] - tasks[-1][0][k])
            np.testing.assert_allclose(grad[k], want, rtol=1e-10, atol=1e-10)


@st.composite
def _kronecker_problem(draw):
    fan_in, fan_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    # Symmetric positive semi-definite factors, as E[ā āᵀ] and E[δ δᵀ] are.
    b_a = rng.normal(size=(fan_in + 1, fan_in + 1))
    b_g = rng.normal(size=(fan_out, fan_out))
    params = {"b": rng.normal(size=fan_out), "w": rng.normal(size=(fan_in, fan_out))}
    delta = {"b": rng.normal(size=fan_out), "w": rng.normal(size=(fan_in, fan_out))}
    return params, delta, b_a @ b_a.T, b_g @ b_g.T


@settings(PROPERTY, max_examples=8)  # each new shape compiles the penalty and its gradient
@given(problem=_kronecker_problem())
def test_kfac_quadratic_equals_the_explicit_kronecker_product(problem):
    params, delta, a, g = problem
    strength = 2.0
    with jax.enable_x64(True):
        # Leaves in order: b (index 0), w (index 1); a Flax-layout kernel [in, out].
        fisher = ewc_jax.kfac.KFACFisher(
            diagonal=jax.tree.map(jnp.zeros_like, params),
            layers=(ewc_jax.kfac.KroneckerFactors(jnp.asarray(a), jnp.asarray(g), 1, 0),),
        )
        state = ewc_jax.consolidate(None, params, fisher)
        moved = jax.tree.map(np.add, params, delta)
        # X = [ΔW; Δb] ([in + 1, out]); vec row-major.
        x = np.concatenate([delta["w"], delta["b"][None]]).reshape(-1)
        kron = np.asarray(jnp.kron(a, g))
        np.testing.assert_allclose(
            ewc_jax.penalty(moved, state, strength), 0.5 * strength * x @ kron @ x, rtol=1e-10
        )
        # Its gradient: λ (A ⊗ G) vec(X), split back into the kernel rows and the bias row.
        want = (strength * kron @ x).reshape(a.shape[0], g.shape[0])
        grad = jax.grad(ewc_jax.penalty)(moved, state, strength)
        np.testing.assert_allclose(grad["w"], want[:-1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grad["b"], want[-1], rtol=1e-10, atol=1e-12)
        # The Optax transform adds the same gradient.
        tx = ewc_jax.add_ewc_penalty(strength)
        zeros = jax.tree.map(np.zeros_like, params)
        updates, _ = tx.update(zeros, ewc_jax.set_ewc_state(tx.init(params), state), moved)
        np.testing.assert_allclose(updates["w"], want[:-1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(updates["b"], want[-1], rtol=1e-10, atol=1e-12)
