r"""The EWC strength chosen by the Laplace evidence instead of a sweep.

EWC is a Laplace approximation: after the earlier tasks the posterior is
:math:`\mathcal N(θ̄, (N λ Λ)^{-1})`, and training task :math:`t` on :math:`N` examples with the loss
:math:`\bar L_t(θ) + \frac{λ}{2} (θ - θ̄)^\top Λ (θ - θ̄)` (mean loss plus the penalty) is MAP
estimation under that prior. The Laplace approximation of the marginal likelihood of task
:math:`t`'s data at the current parameters θ, with :math:`H` the current task's own curvature (the
Fisher of its mean loss from the same estimators), is

.. math::

    \log Z(λ) = \log p(D_t \mid θ) - \frac{N λ}{2} (θ - θ̄)^\top Λ (θ - θ̄)
        + \frac12 \log\det(N λ Λ) - \frac12 \log\det(N H + N λ Λ)
    \;=\; \log p(D_t \mid θ) - \frac{N λ}{2} q + \frac12 \sum_k \log \frac{λ}{r_k + λ},

where :math:`q = (θ - θ̄)^\top Λ (θ - θ̄)` and the :math:`r_k` are the eigenvalues of the task's
curvature relative to the prior precision (:math:`Λ^{-1/2} H Λ^{-1/2}`):

* diagonal (EWC, online EWC): :math:`r_i = H_i / Λ_i` for every parameter with :math:`Λ_i > 0`;
* K-FAC, :math:`Λ = A ⊗ G` and :math:`H = A_t ⊗ G_t` per layer: :math:`r_{ij} = μ_i ν_j`, the
  products of the generalised eigenvalues :math:`μ` of :math:`(A_t, A)` and :math:`ν` of
  :math:`(G_t, G)`. With :math:`A = L_A L_A^\top`,
  :math:`A_t ⊗ G_t + λ A ⊗ G = (L_A ⊗ L_G)(M_A ⊗ M_G + λ I)(L_A ⊗ L_G)^\top` with
  :math:`M_A = L_A^{-1} A_t L_A^{-\top}`, so the log-determinants are exact, never forming a
  Kronecker product.

Parameters the prior does not cover (:math:`Λ_i = 0`, or the null space of a singular factor) have
an improper prior: their terms do not depend on λ and are left out. A singular factor's null
space is projected out exactly: the Schur complement of a Kronecker product is the Kronecker
product of the Schur complements, so :math:`M_A` is built from the Schur complement of
:math:`A_t` onto the range of :math:`A`.

The derivative in :math:`u = \log λ` is :math:`\frac12(γ(λ) - N λ q)` with
:math:`γ(λ) = \sum_k r_k / (r_k + λ)` (the effective number of parameters the task determines),
strictly decreasing in :math:`u`, so :math:`\log Z` is concave in :math:`\log λ` with one maximum,
MacKay's fixed point :math:`λ = γ(λ) / (N q)`. :func:`evidence_strength` finds it by bisection in
:math:`\log λ`.

References:
  MacKay, "Bayesian Interpolation", Neural Computation 1992;
  Immer et al., "Scalable Marginal Likelihood Estimation for Model Selection in Deep Learning",
  ICML 2021; Ritter, Botev & Barber, NeurIPS 2018 (Kronecker-factored Laplace for continual
  learning).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._consolidation import EWCState
from ewc_jax._types import Params
from ewc_jax._where import Where
from ewc_jax.kfac import KFACFisher, KFACState

__all__ = ["Evidence", "evidence_strength", "log_evidence", "relative_curvatures"]

_BISECTION_STEPS = 200
_LOG_RANGE = 120.0  # the bracket's width in log λ below the upper bound γ_max / (N q)


class Evidence(NamedTuple):
    """The evidence-maximising strength.

    Attributes:
      strength: λ that maximises :math:`\\log Z(λ)` at the given parameters.
      log_evidence: :math:`\\log Z` at that λ (plus the ``log_likelihood`` given).
      effective_parameters: :math:`γ(λ) = \\sum_k r_k / (r_k + λ)` at that λ.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> from ewc_jax.evidence import evidence_strength
      >>> state = ewc_jax.EWCState({"w": jnp.zeros(1)}, {"w": jnp.full(1, 0.5)},
      ...                          jnp.ones((), jnp.int32))
      >>> best = evidence_strength(state, {"w": jnp.ones(1)}, {"w": jnp.full(1, 0.5)},
      ...                          num_examples=1)
      >>> # r = H / Λ = 1 and q = Λ (θ - θ̄)² = ½: γ(λ) = 1 / (1 + λ) = N λ q at λ = 1
      >>> round(float(best.strength), 4), round(float(best.effective_parameters), 4)
      (1.0, 0.5)
    """

    strength: jax.Array
    log_evidence: jax.Array
    effective_parameters: jax.Array


def relative_curvatures(
    state: EWCState | KFACState,
    curvature: Params | KFACFisher,
    *,
    rtol: float = 1e-6,
) -> jax.Array:
    r"""The eigenvalues :math:`r_k` of the task's curvature relative to the prior precision.

    Diagonal: :math:`r_i = H_i / Λ_i` where :math:`Λ_i > 0`. K-FAC layer :math:`A ⊗ G` with task
    factors :math:`A_t ⊗ G_t`: :math:`r_{ij} = μ_i ν_j` (module docstring). Directions the prior
    does not cover are returned as ``nan`` and left out of every sum.

    Args:
      state: the consolidated precision: an :class:`~ewc_jax.EWCState`, or a
        :class:`~ewc_jax.kfac.KFACState` with one Kronecker term per layer (apply
        :func:`~ewc_jax.kfac.merge_kronecker_terms` first).
      curvature: the current task's Fisher from the same estimator family: a params-shaped tree
        (:func:`~ewc_jax.fisher_diagonal`) for an ``EWCState``, a
        :class:`~ewc_jax.kfac.KFACFisher` (:func:`~ewc_jax.kfac.kfac_fisher`) for a
        ``KFACState``.
      rtol: eigenvalues of a prior factor below ``rtol`` times its largest count as its null
        space.

    Returns:
      A 1-D float array (float32 at least), ``nan`` where the prior is improper.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> from ewc_jax.evidence import relative_curvatures
      >>> state = ewc_jax.EWCState({"w": jnp.zeros(3)}, {"w": jnp.array([1.0, 2.0, 0.0])},
      ...                          jnp.ones((), jnp.int32))
      >>> relative_curvatures(state, {"w": jnp.array([3.0, 1.0, 5.0])})
      Array([3. , 0.5, nan], dtype=float32)
    """
    if isinstance(state, KFACState):
        if not isinstance(curvature, KFACFisher):
            raise TypeError(
                "a KFACState needs the current task's curvature as a KFACFisher "
                f"(ewc_jax.kfac.kfac_fisher), got {type(curvature).__name__}."
            )
        return _kronecker_relative(state, curvature, rtol)
    if not isinstance(state, EWCState):
        raise TypeError(
            f"state must be an EWCState or a KFACState, got {type(state).__name__}; build it with "
            "ewc_jax.consolidate."
        )
    if isinstance(curvature, KFACFisher):
        raise TypeError("an EWCState needs a diagonal curvature (ewc_jax.fisher_diagonal).")
    return _diagonal_relative(state.precision, curvature)


def _diagonal_relative(precision: Params, curvature: Params) -> jax.Array:
    if jax.tree.structure(precision) != jax.tree.structure(curvature):
        raise ValueError(
            "curvature must have the structure of the state's precision (the same parameters, "
            "and the same where= selection): got "
            f"{jax.tree.structure(curvature)} for {jax.tree.structure(precision)}."
        )
    ratios = []
    for p, h in zip(jax.tree.leaves(precision), jax.tree.leaves(curvature), strict=True):
        if p.shape != h.shape:
            raise ValueError(f"curvature leaf of shape {h.shape} for a precision of {p.shape}.")
        dtype = np.promote_types(jnp.result_type(p, h), np.float32)
        p, h = p.astype(dtype).ravel(), h.astype(dtype).ravel()
        ratios.append(jnp.where(p > 0, h / jnp.where(p > 0, p, 1), jnp.nan))
    return jnp.concatenate(ratios) if ratios else jnp.zeros((0,), jnp.float32)


def _kronecker_relative(state: KFACState, curvature: KFACFisher, rtol: float) -> jax.Array:
    parts = [_diagonal_relative(state.diagonal.precision, curvature.diagonal)]
    current = {factors.kernel: factors for factors in curvature.layers}
    for terms in state.layers:
        if terms.a.shape[0] != 1:
            raise ValueError(
                f"the layer of leaf {terms.kernel} holds {terms.a.shape[0]} Kronecker terms; the "
                "closed-form evidence needs one per layer: merge them with "
                "ewc_jax.kfac.merge_kronecker_terms (mode='online')."
            )
        if terms.kernel not in current:
            raise ValueError(
                f"curvature has no Kronecker factors for the layer of leaf {terms.kernel}."
            )
        task = current[terms.kernel]
        mu = _generalised_eigenvalues(task.a, terms.a[0], rtol)
        nu = _generalised_eigenvalues(task.g, terms.g[0], rtol)
        parts.append(jnp.outer(mu, nu).ravel())
    dtype = jnp.result_type(*parts)
    return jnp.concatenate([p.astype(dtype) for p in parts])


def _generalised_eigenvalues(task: jax.Array, prior: jax.Array, rtol: float) -> jax.Array:
    r"""Eigenvalues of :math:`S^{-1/2} U_s^\top \operatorname{schur}(T) U_s S^{-1/2}` on the range
    of the prior factor (``nan`` on its null space): the relative curvature of one factor."""
    dtype = np.promote_types(jnp.result_type(task, prior), np.float32)
    task, prior = task.astype(dtype), prior.astype(dtype)
    s, u = jnp.linalg.eigh((prior + prior.T) / 2)
    kept = s > rtol * jnp.max(s)
    # Rotate into the prior's eigenbasis; the Schur complement of the task factor onto the kept
    # directions is the inverse of the kept block of its inverse (pinv: the task factor may be
    # singular too, as when an input never varies).
    rotated = u.T @ ((task + task.T) / 2) @ u
    kept_block = jnp.where(
        kept[:, None] & kept[None, :], jnp.linalg.pinv(rotated, hermitian=True), 0
    )
    schur = jnp.linalg.pinv(kept_block, hermitian=True)
    scale = jnp.where(kept, 1 / jnp.sqrt(jnp.where(kept, s, 1)), 0)
    relative = scale[:, None] * schur * scale[None, :]
    values = jnp.linalg.eigvalsh(relative)
    # eigvalsh sorts ascending; the null space gives exact zeros from the masked rows, so the
    # covered directions are the largest count(kept) values.
    order = jnp.arange(values.shape[0])
    covered = order >= values.shape[0] - jnp.sum(kept)
    return jnp.where(covered, jnp.maximum(values, 0), jnp.nan)


def log_evidence(
    strength: jax.typing.ArrayLike,
    state: EWCState | KFACState,
    params: Params,
    curvature: Params | KFACFisher,
    *,
    num_examples: int,
    log_likelihood: jax.typing.ArrayLike = 0.0,
    where: Where | None = None,
) -> jax.Array:
    r"""The Laplace log evidence of the current task as a function of the strength λ.

    .. math::
        \log Z(λ) = \log p(D_t \mid θ) - \frac{N λ}{2} (θ - θ̄)^\top Λ (θ - θ̄)
            + \frac12 \sum_k \log \frac{λ}{r_k + λ}

    (module docstring: the derivation, and the :math:`r_k`). At fixed θ the likelihood term does
    not depend on λ; pass it as ``log_likelihood`` (:math:`-N` times the mean loss) for the full
    value, or leave it 0 to compare strengths.

    Args:
      strength: λ > 0 (a scalar, or an array of strengths: the result has its shape).
      state: the consolidated precision and anchor (:func:`relative_curvatures`).
      params: the current parameters θ (the MAP estimate for task ``t`` at this λ, once trained).
      curvature: the current task's Fisher at ``params`` (:func:`relative_curvatures`).
      num_examples: N, the number of examples of the current task the mean loss runs over.
      log_likelihood: :math:`\log p(D_t \mid θ)`, added as it is.
      where: the selection the state was consolidated with (:func:`ewc_jax.consolidate`'s
        ``where``, e.g. low-rank adapters), if any; ``params`` are the whole model's.

    Returns:
      :math:`\log Z(λ)`, float32 at least.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> from ewc_jax.evidence import log_evidence
      >>> state = ewc_jax.EWCState({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, jnp.ones((), jnp.int32))
      >>> z = log_evidence(jnp.array([0.1, 1.0, 10.0]), state, {"w": jnp.array([0.1, -0.1])},
      ...                  {"w": jnp.array([1.0, 1.0])}, num_examples=100)
      >>> int(jnp.argmax(z))  # the middle strength fits this deviation best
      1
    """
    relative = relative_curvatures(state, curvature)
    q = _deviation_quadratic(params, state, where)
    strength = jnp.asarray(strength, q.dtype)
    return _log_evidence(strength, relative, q, num_examples) + jnp.asarray(log_likelihood, q.dtype)


def _deviation_quadratic(
    params: Params, state: EWCState | KFACState, where: Where | None
) -> jax.Array:
    """:math:`q = (θ - θ̄)^\\top Λ (θ - θ̄)`, from the state's own penalty at strength 2."""
    return state.penalty(params, 2.0, where=where)


def _log_evidence(strength: jax.Array, relative: jax.Array, q: jax.Array, n: int) -> jax.Array:
    lam = strength[..., None]
    r = relative.reshape((1,) * strength.ndim + relative.shape)
    terms = jnp.where(jnp.isnan(r), 0, jnp.log(lam) - jnp.log(jnp.nan_to_num(r) + lam))
    return -0.5 * n * strength * q + 0.5 * jnp.sum(terms, axis=-1)


def _effective_parameters(strength: jax.Array, relative: jax.Array) -> jax.Array:
    r = jnp.nan_to_num(relative)
    return jnp.sum(jnp.where(jnp.isnan(relative), 0, r / (r + strength)))


def evidence_strength(
    state: EWCState | KFACState,
    params: Params,
    curvature: Params | KFACFisher,
    *,
    num_examples: int,
    log_likelihood: jax.typing.ArrayLike = 0.0,
    where: Where | None = None,
) -> Evidence:
    r"""The strength λ that maximises the Laplace evidence of the current task, and its value.

    Solves :math:`γ(λ) = N λ q` (MacKay's fixed point, :math:`γ(λ) = \sum_k r_k / (r_k + λ)`) by
    bisection in :math:`\log λ` between :math:`e^{-120} λ_{\max}` and
    :math:`λ_{\max} = γ_{\max} / (N q)`, where :math:`γ_{\max}` counts the covered directions:
    :math:`\log Z` is concave in :math:`\log λ` (module docstring), so the root is the maximum.
    Online across tasks: call it after each task (or every few epochs during one, as Immer et al.
    do) with the current parameters and the current task's curvature, and train on with the
    strength it returns. Works under ``jax.jit`` (``num_examples`` static).

    Args:
      state: the consolidated precision and anchor (:func:`relative_curvatures`).
      params: the current parameters θ; they must differ from the anchor where the prior
        covers them (:math:`q > 0`), else every λ fits and the maximum is at infinity.
      curvature: the current task's Fisher at ``params`` (:func:`relative_curvatures`).
      num_examples: N, the number of examples the current task's mean loss runs over.
      log_likelihood: added to the returned log evidence (:func:`log_evidence`).
      where: the state's ``where`` selection, if it was consolidated with one; ``params`` and
        ``curvature`` are then the whole model's and the selection's, as
        :func:`ewc_jax.fisher_diagonal` and :func:`~ewc_jax.kfac.kfac_fisher` return them with
        the same ``where``.

    Returns:
      An :class:`Evidence`: the maximising strength, :math:`\log Z` there and :math:`γ` there.
      With :math:`q = 0` the strength is ``inf``.

    Example:
      >>> import jax.numpy as jnp, ewc_jax
      >>> from ewc_jax.evidence import evidence_strength
      >>> state = ewc_jax.EWCState({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, jnp.ones((), jnp.int32))
      >>> best = evidence_strength(state, {"w": jnp.array([0.1, -0.1])},
      ...                          {"w": jnp.array([1.0, 1.0])}, num_examples=100)
      >>> round(float(best.strength), 4)  # γ(λ) = N λ q: 2 / (1 + λ) = 2 λ
      0.618
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples must be a positive count, got {num_examples}.")
    relative = relative_curvatures(state, curvature)
    q = _deviation_quadratic(params, state, where)
    strength, value, gamma = _maximise(relative, q, jnp.asarray(num_examples, q.dtype))
    return Evidence(strength, value + jnp.asarray(log_likelihood, q.dtype), gamma)


@jax.jit
def _maximise(
    relative: jax.Array, q: jax.Array, n: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Bisection on ``2 d log Z / d log λ = γ(λ) - N λ q`` (decreasing) in ``log λ``."""
    covered = jnp.sum(~jnp.isnan(relative)).astype(q.dtype)
    upper = jnp.log(covered) - jnp.log(n * q)

    def bisect(_: int, bracket: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        low, high = bracket
        middle = (low + high) / 2
        lam = jnp.exp(middle)
        rising = _effective_parameters(lam, relative) - n * lam * q > 0
        return jnp.where(rising, middle, low), jnp.where(rising, high, middle)

    low, high = jax.lax.fori_loop(0, _BISECTION_STEPS, bisect, (upper - _LOG_RANGE, upper))
    strength = jnp.where(q > 0, jnp.exp((low + high) / 2), jnp.inf)
    finite = jnp.where(q > 0, strength, 1.0)
    value = jnp.where(q > 0, _log_evidence(finite, relative, q, n), jnp.inf)
    return strength, value, _effective_parameters(finite, relative)
