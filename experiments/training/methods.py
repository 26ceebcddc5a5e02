r"""The table of continual-learning methods: one :class:`Method` entry each, in :data:`METHODS`.

An entry says everything the rest of the experiments ask about a method: its default strength,
how its importance (the precision :math:`\Omega` of the penalty
:math:`\frac{\lambda}{2} \sum_i \Omega_i (\theta_i - \theta^*_i)^2`) is computed at the end of a
task, how it is folded into the consolidated state (``mode``), whether it needs examples of the
finished task, what it trains on (``joint``: every task so far), what it does to the optimiser
(SI), what configs it refuses, and whether its precision is a Laplace approximation (``laplace``:
the evidence may choose its strength, ``--config.strengths.<name>=evidence``, and its precision
forecasts forgetting). No other module names a method; adding one is an entry here plus its
test (``docs/experiments.md`` has a worked example).

Importance functions take an :class:`ImportanceInputs` and return ``(precision, opt_state)``:
the optimiser state comes back because SI's importance reads (and resets) the path integral it
keeps there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import ewc_jax
from experiments.spec import ConfigError


class ImportanceInputs(NamedTuple):
    """What an importance function may read at the end of a task.

    Attributes:
        logits: ``logits(params, (images, heads)) -> [B, C]`` of the model.
        params: the parameters at the end of the task.
        opt_state: the optimiser state (SI's path integral lives there).
        images: the finished task's examples chosen for the importance (None unless the method
            ``needs_examples``), with their ``labels`` and ``heads``.
        labels: see ``images``.
        heads: see ``images``.
        key: a PRNG key of its own (the sampled estimator draws labels with it).
        mesh: the data-parallel mesh the examples are split over, or None.
        spec: the method's :class:`MethodSpec` (estimator, sample counts, damping).
        where: the parameters the EWC state covers (``where=`` of :func:`ewc_jax.consolidate`:
            a LoRA run's adapters), or None for all. K-FAC computes its factors for those
            only; the other importances are computed whole and their other leaves dropped by
            the consolidation.
    """

    logits: Callable[..., jax.Array]
    params: Any
    opt_state: Any
    images: jax.Array | None
    labels: jax.Array | None
    heads: jax.Array | None
    key: jax.Array
    mesh: jax.sharding.Mesh | None
    spec: MethodSpec
    where: Any = None


Importance = Callable[[ImportanceInputs], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the table.

    Attributes:
        name: the name the config uses (``--config.methods=<name>``).
        summary: one line for the docs and ``--help``.
        default_strength: λ when ``strengths.<name>`` is not set: a number, or None to take the
            config's ``strength``. Unused when ``importance`` is None.
        importance: the end-of-task precision, or None for a method without a penalty.
        mode: how precisions of successive tasks combine (:data:`ewc_jax.ConsolidationMode`):
            ``separate`` (one quadratic per task) or ``online`` (summed, anchored at the latest
            parameters).
        needs_examples: whether ``importance`` reads examples of the finished task.
        decays: whether ``gamma`` decays the old precision (online EWC).
        cumulative_data: trains task ``i`` on the union of tasks ``0..i`` (joint training).
        kronecker: the consolidated state is a merged :class:`ewc_jax.kfac.KFACState`.
        wrap_optimizer: turns the optimiser into the one the method trains with (SI), or None.
        estimators: the Fisher estimators it takes (None: every one of
            :data:`ewc_jax.Estimator`).
        laplace: whether the importance is the task's Fisher (diagonal, or K-FAC merged into
            one Kronecker term per layer), the precision of a Laplace approximation. Then
            ``strengths.<name>=evidence`` may choose the strength by the Laplace evidence
            (:func:`ewc_jax.evidence.evidence_strength`, the current task's curvature from the
            same estimator), and every single run keeps each task's own Fisher and solution to
            forecast its forgetting (:mod:`experiments.training.forecast`).
    """

    name: str
    summary: str
    default_strength: float | None = None
    importance: Importance | None = None
    mode: str = "separate"
    needs_examples: bool = False
    decays: bool = False
    cumulative_data: bool = False
    kronecker: bool = False
    wrap_optimizer: Callable[[optax.GradientTransformation], Any] | None = None
    estimators: tuple[str, ...] | None = None
    laplace: bool = False

    @property
    def regularized(self) -> bool:
        """Whether the method adds a quadratic penalty after each task."""
        return self.importance is not None

    @property
    def shares_first_task(self) -> bool:
        """Whether its first task trains as plain training does, so that shared first-task
        params (``config.first_task_params``) serve it: not SI, whose path integral runs during
        task 1 in its optimiser state, nor joint, whose task 1 set is the cumulative one padded
        to all tasks' size (another shuffle). The others' penalty is zero before the first
        consolidation."""
        return self.wrap_optimizer is None and not self.cumulative_data

    def refusal(self, *, estimator: str) -> str | None:
        """Why this method cannot run with ``estimator``, or None."""
        if self.estimators is not None and estimator not in self.estimators:
            return (
                f"estimator {estimator!r} has no version for method {self.name!r}; it takes "
                f"{', '.join(self.estimators)}"
            )
        return None


def _ones(inputs: ImportanceInputs) -> tuple[Any, Any]:
    """L2: precision 1 for every parameter."""
    return jax.tree.map(jnp.ones_like, inputs.params), inputs.opt_state


def fisher_importance(inputs: ImportanceInputs) -> tuple[Any, Any]:
    """EWC: the diagonal Fisher of ``spec.estimator`` (:func:`ewc_jax.fisher_diagonal`)."""
    spec = inputs.spec
    precision = ewc_jax.fisher_diagonal(
        inputs.logits,
        inputs.params,
        (inputs.images, inputs.heads),
        inputs.labels if spec.estimator in ("empirical", "batched") else None,
        estimator=spec.estimator,
        key=inputs.key if spec.estimator == "sampled" else None,
        batch_size=spec.fisher_batch_size if spec.estimator == "batched" else None,
        mesh=inputs.mesh,
    )
    return precision, inputs.opt_state


def _mas(inputs: ImportanceInputs) -> tuple[Any, Any]:
    """MAS: :func:`ewc_jax.importance.mas_importance` of the logits (labels unused)."""
    precision = ewc_jax.importance.mas_importance(
        inputs.logits, inputs.params, (inputs.images, inputs.heads)
    )
    return precision, inputs.opt_state


def _si(inputs: ImportanceInputs) -> tuple[Any, Any]:
    """SI: :func:`ewc_jax.importance.si_importance` of the path integral (resets it)."""
    return ewc_jax.importance.si_importance(
        inputs.opt_state, inputs.params, damping=inputs.spec.damping
    )


def _kfac(inputs: ImportanceInputs) -> tuple[Any, Any]:
    """K-FAC: the Kronecker-factored Fisher (:func:`ewc_jax.kfac.kfac_fisher`); a Dense layer
    applied over a language model's positions is factored by ``spec.kfac_sequence`` (expand or
    reduce). The text windows have no padding, so every token counts (no ``mask``). With
    ``where`` (a LoRA run's adapters) the factors and diagonal of the selected parameters only:
    a block per adapter factor ``A`` and ``B``, none for the frozen base."""
    spec = inputs.spec
    precision = ewc_jax.kfac.kfac_fisher(
        inputs.logits,
        inputs.params,
        (inputs.images, inputs.heads),
        inputs.labels if spec.estimator == "empirical" else None,
        estimator=spec.estimator,
        key=inputs.key if spec.estimator == "sampled" else None,
        sequence=spec.kfac_sequence,
        where=inputs.where,
    )
    return precision, inputs.opt_state


def plus_penalty(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied to ``updates + penalty_gradient`` (a keyword argument of ``update``).

    SI's optimiser is ``si_path_integral(plus_penalty(inner))``: the path integral
    ``ω += -g·Δθ`` integrates the gradient ``g`` of the task loss alone against the actual step,
    penalty included, as Zenke et al. do.
    """

    def update_fn(updates, state, params=None, *, penalty_gradient, **extra_args):
        del extra_args
        total = jax.tree.map(jnp.add, updates, penalty_gradient)
        return inner.update(total, state, params)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _si_optimizer(inner: optax.GradientTransformation) -> Any:
    return ewc_jax.importance.si_path_integral(plus_penalty(inner))


_TABLE = (
    Method("finetune", "plain training on each task in turn (the lower baseline)"),
    Method(
        "l2",
        "precision 1: an isotropic pull to the previous tasks' parameters",
        importance=_ones,
    ),
    Method(
        "ewc",
        "diagonal Fisher, one quadratic per task (Kirkpatrick et al. 2017)",
        importance=fisher_importance,
        needs_examples=True,
        laplace=True,
    ),
    Method(
        "online_ewc",
        "diagonal Fisher summed with decay gamma (Schwarz et al. 2018)",
        importance=fisher_importance,
        mode="online",
        needs_examples=True,
        decays=True,
        laplace=True,
    ),
    Method(
        "si",
        "path integral of the task loss's gradient (Zenke et al. 2017)",
        default_strength=10.0,
        importance=_si,
        mode="online",
        wrap_optimizer=_si_optimizer,
    ),
    Method(
        "mas",
        "gradient magnitude of the squared output norm (Aljundi et al. 2018)",
        default_strength=0.03,
        importance=_mas,
        mode="online",
        needs_examples=True,
    ),
    Method(
        "kfac",
        "Kronecker-factored Fisher, one merged term per layer (Ritter et al. 2018)",
        default_strength=10.0,
        importance=_kfac,
        mode="online",
        needs_examples=True,
        kronecker=True,
        estimators=tuple(ewc_jax.kfac.KFAC_ESTIMATORS),
        laplace=True,
    ),
    Method(
        "joint",
        "trains task i on tasks 0..i together (the upper baseline)",
        cumulative_data=True,
    ),
)

METHODS: Mapping[str, Method] = {method.name: method for method in _TABLE}
"""Every method, by name, in the order of the docs' table."""


def method_named(name: str) -> Method:
    """The entry of ``name``; :class:`ConfigError` naming the valid ones for another name."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method of a run with its hyperparameters (hashable: jit takes it as static).

    Attributes:
        name: a name of :data:`METHODS`.
        strength: λ of the penalty (0 for a method without one).
        estimator: Fisher estimator of :func:`ewc_jax.fisher_diagonal`.
        fisher_samples: examples of the finished task the importance is averaged over.
        fisher_batch_size: mini-batch size of the ``"batched"`` estimator.
        gamma: decay of the old precision (1 unless the method ``decays``).
        damping: SI's ``ξ`` in ``Ω = ω / (Δθ² + ξ)`` (Zenke et al.'s 0.1 for MNIST).
        evidence: the strength is re-chosen by the Laplace evidence during training
            (``strengths.<name>=evidence``); ``strength`` is then only its starting value.
        evidence_every: with ``evidence``, re-choose it every this many epochs of a task (0:
            at task ends only), and always at a task's end.
        kfac_sequence: K-FAC's factors of a Dense layer applied over extra axes, ``"expand"``
            or ``"reduce"`` (:data:`ewc_jax.kfac.SequenceMode`).
    """

    name: str
    strength: float = 0.0
    estimator: str = "exact"
    fisher_samples: int = 512
    fisher_batch_size: int | None = None
    gamma: float = 1.0
    damping: float = 0.1
    evidence: bool = False
    evidence_every: int = 0
    kfac_sequence: str = "expand"

    def __post_init__(self) -> None:
        method_named(self.name)

    @property
    def method(self) -> Method:
        """The method's entry of the table."""
        return METHODS[self.name]

    @property
    def regularized(self) -> bool:
        """Whether the method adds a quadratic penalty after each task."""
        return self.method.regularized

    @property
    def needs_fisher(self) -> bool:
        """Whether consolidation reads examples of the finished task (Fisher, MAS, K-FAC)."""
        return self.method.needs_examples
